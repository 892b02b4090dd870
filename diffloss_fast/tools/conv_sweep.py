"""``diffloss-fast conv-sweep``: which norm + convolution blocks of the pair pass to fuse on this
card, decided by timing each both ways.

A fused block (:mod:`diffloss_fast.ops.pair_conv`) removes passes over memory but replaces
cuDNN's convolution by a Triton implicit GEMM, which may be slower for some shapes. For every
distinct block of the prior's pair pass (a ResBlock's first norm + convolution, ``in``, or
with its resampling, ``up-in`` and ``down-in``; its second norm + FiLM + convolution + residual
sum, ``out``; the noise head's norm + convolution, ``head``) at each batch, the sweep times the
whole ResBlock's (or the head's) forward and backward with that block fused and with none, on
random activations of the block's shapes (a decoder block's two inputs, ``cat-in``, read in
place when fused and concatenated otherwise), and writes both medians to the dispatch table
(:mod:`diffloss_fast.ops.conv_dispatch`) under the card's family. DiffLoss then fuses exactly
the blocks measured faster. On a card with FP8 tensor cores the ``precision="fp8"`` network's
blocks (the same kernel on e4m3 operands, against its e4m3 convolutions) are timed too, under
keys of their own (``fp8-`` and the kind): the two compete with different library paths.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from ..difference_unet import Concat, DifferenceUNet
from ..fp8_unet import FP8DifferenceUNet
from ..loss import DiffLoss
from ..ops import conv_dispatch
from ..ops.fp8 import MIN_CAPABILITY
from ..prior import build_prior
from . import hardware
from .harness import add_prior_arguments, check_device, check_prior, positive_int, prior_source

BATCHES = (1, 4, 8, 16)


class _Asked(frozenset):
    """A fused-block set that holds nothing and notes every key the network looks up in it."""

    def __new__(cls):
        self = super().__new__(cls, {"*"})  # non-empty: the network looks its blocks up
        self.keys = []
        return self

    def __contains__(self, key):
        self.keys.append(key)
        return False


def _shapes(x) -> tuple:
    """A ResBlock input's shape, or a decoder input's two shapes (its own and the skip's)."""
    if isinstance(x, Concat):
        return tuple(x.h[0].shape), tuple(x.skip[0].shape)
    return tuple(x[0].shape)


def recorded_blocks(net: DifferenceUNet, batch: int, resolution: int, device: torch.device):
    """``[(block key, ResBlock or None, input shape, FiLM rows or None)]``: every block the
    pair pass runs at this batch and resolution, once per distinct key, from one forward of
    ``net`` (no gradient), each key as the network itself looks it up in its fused blocks.
    A decoder block's input shape is the pair of its two parts' shapes; the noise head's
    entry has None for its ResBlock and FiLM rows."""
    seen, found = set(), []
    run, eps, saved = net._resblock, net._eps, net.fused_blocks
    asked = net.fused_blocks = _Asked()

    def recorded(fn, blk, x, *args):
        start = len(asked.keys)
        out = fn(x, *args)
        for key in asked.keys[start:]:
            if key not in seen:
                seen.add(key)
                found.append((key, blk, _shapes(x), args[0] if args else None))
        return out

    net._resblock = lambda blk, x, film: recorded(functools.partial(run, blk), blk, x, film)
    net._eps = lambda h: recorded(eps, None, h)
    try:
        shape = (batch, 3, resolution, resolution)
        a = torch.randn(shape, device=device, dtype=net.dtype)
        with torch.no_grad():
            net(a, torch.randn_like(a), torch.full((batch,), 500, device=device),
                torch.ones((), device=device))
    finally:
        del net._resblock, net._eps
        net.fused_blocks = saved
    return found


def time_block(net: DifferenceUNet, blk, shape, film, fused: frozenset[str],
               device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median ms of one ResBlock's pair forward and backward to its input difference (the
    noise head's where ``blk`` is None), with the blocks ``fused`` fused. ``shape``: as
    :func:`recorded_blocks` gives it."""
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.ones((), device=device)

    def pair(size):
        a = torch.randn(size, device=device, generator=gen, dtype=net.dtype)
        d = torch.randn(size, device=device, generator=gen, dtype=net.dtype)
        if net.channels_last:
            a, d = (x.contiguous(memory_format=torch.channels_last) for x in (a, d))
        return a, d.requires_grad_(True), s
    concat = isinstance(shape[0], tuple)
    x = Concat(pair(shape[0]), pair(shape[1])) if concat else pair(shape)
    saved, net.fused_blocks = net.fused_blocks, fused

    def step():
        out = net._eps(x) if blk is None else net._resblock(blk, x, film)[1]
        out.backward(torch.ones_like(out))
    try:
        return statistics.median(hardware.time_ms(step, device, warmup=warmup,
                                                  repeats=repeats))
    finally:
        net.fused_blocks = saved


def has_fp8(device: torch.device) -> bool:
    """Whether ``device`` runs precision="fp8" on FP8 tensor cores (CUDA sm_89+)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def sweep(prior, device: torch.device, batches, resolution: int, *, warmup: int = 3,
          repeats: int = 10, timer=time_block, fp8: bool | None = None) -> dict[str, dict]:
    """``{block key: {"fused_ms", "library_ms"}}`` for every block at every batch: the bf16
    network's, and with ``fp8`` (default: where the device has FP8 tensor cores) the FP8
    network's."""
    nets = []
    fp8 = has_fp8(device) if fp8 is None else fp8
    for precision in ("bf16", "fp8") if fp8 else ("bf16",):
        loss_fn = DiffLoss(prior, precision=precision, fused_kernels=True, execution="eager")
        nets.append(loss_fn._net(device, loss_fn._compute_dtype(precision), decoder=True))
    entries = {}
    for net, batch in ((net, batch) for net in nets for batch in batches):
        blocks = recorded_blocks(net, batch, resolution, device)
        if isinstance(net, FP8DifferenceUNet):
            # its blocks fuse from the second call on: commit the recorded forward's amaxes,
            # which the timed blocks then read their scales from
            net.scaling.begin_call()
        for key, blk, shape, film in tqdm(blocks, desc=f"batch {batch}", unit="block"):
            times = {name: timer(net, blk, shape, film, fused, device, warmup=warmup,
                                 repeats=repeats)
                     for name, fused in (("library_ms", frozenset()),
                                         ("fused_ms", frozenset({key})))}
            entries[key] = times
    return entries


def write_table(entries: dict, family: str, path: Path) -> dict:
    """The dispatch table at ``path`` with ``family``'s entries replaced by ``entries``."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table[family] = dict(sorted(entries.items()))
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table


def run(args: argparse.Namespace) -> dict:
    device = hardware.resolve_device(args.device)
    family = conv_dispatch.card_family(device)
    _, config = prior_source(args.prior, args.prior_config)
    prior = build_prior(config).to(device)  # timing does not depend on the weights
    path = Path(args.table)
    entries = {}
    for batch in args.batches:  # the table after each batch: a run cut short keeps its batches
        entries.update(sweep(prior, device, [batch], args.resolution, warmup=args.warmup,
                             repeats=args.repeats))
        write_table(entries, family, path)
    faster = sum(e["fused_ms"] < e["library_ms"] for e in entries.values())
    print(f"{hardware.device_name(device)} ({family}): {faster} of {len(entries)} blocks "
          "faster fused")
    for key, e in entries.items():
        mark = "fused" if e["fused_ms"] < e["library_ms"] else "library"
        print(f"  {key:<28}{e['library_ms']:>9.3f} ms library{e['fused_ms']:>9.3f} ms fused"
              f"  -> {mark}")
    print(f"wrote {path}")
    return entries


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_prior(parser, args.prior, args.prior_config)
    check_device(parser, args.device)
    if hardware.resolve_device(args.device).type != "cuda":
        parser.error("conv-sweep times Triton kernels against cuDNN: it needs a CUDA device")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "conv-sweep", help="time each fused norm + convolution block against the library "
                           "path, and write the dispatch table DiffLoss reads (CUDA)",
        description="Times, for every norm + convolution block of the prior's pair pass at "
                    "each batch, its ResBlock with the block fused and without, and writes "
                    "both to the convolution dispatch table under this card's family: "
                    "DiffLoss fuses exactly the blocks measured faster.")
    add_prior_arguments(p, default="adm-256-uncond",
                        default_text="its architecture with random weights is timed "
                                     "(default %(default)s)", legacy_weights=False)
    p.add_argument("--resolution", type=positive_int, default=256)
    p.add_argument("--batches", type=positive_int, nargs="+", default=list(BATCHES))
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--table", default=str(conv_dispatch.TABLE),
                   help="the dispatch table to update (default: the package's own)")
    p.set_defaults(func=run, check=check)
