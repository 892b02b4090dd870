"""What the prior costs inside a caller's own training step: forward and backward time per call.

The loss marks four moments of each call: entering and leaving its forward, and, in the
backward pass, the gradient reaching the loss's output and leaving through ``restored``. On
CUDA the marks are events on the current stream (read lazily, so timing adds no
synchronization to the step); on the CPU they are wall-clock readings. The backward interval
is the time from the gradient entering the loss to it leaving: work autograd interleaves from
other branches of the caller's graph in that window is counted too.
"""
from __future__ import annotations

import time

import torch
from torch.autograd.function import once_differentiable


class _Mark:
    """One moment: a CUDA event recorded on the current stream, or a wall-clock reading."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record(torch.cuda.current_stream(device))
            self.seconds = None
        else:
            self.event, self.seconds = None, time.perf_counter()

    def ms_until(self, later: _Mark) -> float:
        if self.event is not None:
            later.event.synchronize()
            return float(self.event.elapsed_time(later.event))
        return (later.seconds - self.seconds) * 1e3


class CallTiming:
    """The marks of one loss call; an interval is None until both its ends were recorded."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: dict[str, _Mark] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = _Mark(self.device)

    def _ms(self, start: str, end: str) -> float | None:
        if start in self.marks and end in self.marks:
            return self.marks[start].ms_until(self.marks[end])
        return None

    @property
    def forward_ms(self) -> float | None:
        return self._ms("forward_start", "forward_end")

    @property
    def backward_ms(self) -> float | None:
        return self._ms("backward_start", "backward_end")


class _MarkInBackward(torch.autograd.Function):
    """The identity; its backward records a mark as the gradient passes through it."""

    @staticmethod
    def forward(ctx, x, timing: CallTiming, name: str):
        ctx.timing, ctx.name = timing, name
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ctx.timing.mark(ctx.name)
        return grad, None, None


def mark_in_backward(x: torch.Tensor, timing: CallTiming, name: str) -> torch.Tensor:
    """``x``, with ``name`` marked in ``timing`` when the backward pass goes through it."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _MarkInBackward.apply(x, timing, name)


class PriorTimer:
    """The calls of one loss made inside a ``with loss_fn.timings() as timer:`` block.

    ``forward_ms`` and ``backward_ms`` are totals over those calls (a call whose backward has
    not run adds nothing to ``backward_ms``); ``records`` holds each call's ``CallTiming``.
    Reading a total waits for the device to reach the marks it needs.
    """

    def __init__(self):
        self.records: list[CallTiming] = []

    def start_call(self, device: torch.device) -> CallTiming:
        call = CallTiming(device)
        self.records.append(call)
        return call

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def forward_ms(self) -> float:
        return sum(ms for ms in (c.forward_ms for c in self.records) if ms is not None)

    @property
    def backward_ms(self) -> float:
        return sum(ms for ms in (c.backward_ms for c in self.records) if ms is not None)

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    def __repr__(self) -> str:
        return (f"PriorTimer(calls={self.calls}, forward_ms={self.forward_ms:.3f}, "
                f"backward_ms={self.backward_ms:.3f})")
