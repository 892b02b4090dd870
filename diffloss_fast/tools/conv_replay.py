"""Replay the traced step's convolutions on a device: how fast each distinct call runs.

The roofline says how fast the convolutions could run; this says how fast cuDNN (or the CPU)
runs them, one distinct call at a time (same ATen op, shapes, strides and dtype as in the step,
NCHW or channels_last, on random data), each timed alone after warm-up. Summed with their
counts, that is the step's convolution time without anything around it, so its rate against
the matmul rate is the convolutions' own efficiency, and the slow shapes stand out.
"""
from __future__ import annotations

import statistics
from collections import Counter
from typing import NamedTuple

import torch
from tqdm import tqdm

from . import hardware


class TensorSpec(NamedTuple):
    """A tensor argument as the replay rebuilds it."""
    shape: tuple[int, ...]
    dtype: torch.dtype


def freeze(value):
    """An op's arguments as a hashable call signature: tensors become TensorSpecs. Layouts
    are not kept: meta tensors do not propagate channels_last as CUDA convolutions do, so the
    replay sets the layout of every 4-D tensor itself."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def _thaw(value, device: torch.device, gen: torch.Generator, channels_last: bool):
    if isinstance(value, TensorSpec):
        t = torch.randn(value.shape, dtype=value.dtype, device=device, generator=gen)
        if channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(value, tuple):
        return [_thaw(v, device, gen, channels_last) for v in value]
    return value


def describe(call) -> str:
    """``forward x(8, 256, 64, 64) w(256, 256, 3, 3) stride 1`` and the like."""
    func, args = call
    if func is torch.ops.aten.convolution.default:  # transposed (args[6]): a frozen dgrad
        side = "input grad dy" if args[6] else "forward x"
        what, w, stride = f"{side}{args[0].shape}", args[1], args[3]
    else:  # convolution_backward: grad_output, input, weight, ..., stride at 4
        what, w, stride = f"input grad dy{args[0].shape}", args[2], args[4]
    return f"{what} w{w.shape} stride {max(stride)}"


def time_calls(calls: list[tuple], flops: dict, device: torch.device, *,
               channels_last: bool = False, warmup: int = 2, repeats: int = 5) -> list[dict]:
    """Each distinct call of ``calls`` timed alone on ``device``, its 4-D tensors NCHW or
    ``channels_last``; ``flops``: call -> FLOPs. Rows sorted by total time, largest first."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for call, count in tqdm(Counter(calls).items(), desc="convolutions", unit="call"):
        func, args = call
        live = _thaw(args, device, gen, channels_last)
        ms = statistics.median(hardware.time_ms(lambda: func(*live), device, warmup=warmup,
                                                repeats=repeats))
        rows.append({"call": describe(call), "count": count, "gflop": flops[call] / 1e9,
                     "ms": ms, "total_ms": count * ms, "tflops": flops[call] / ms / 1e9})
    return sorted(rows, key=lambda r: -r["total_ms"])
