"""Integer helpers for the fused ops' launch shapes, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: callable from kernels
and from the host, but each host call unwraps its arguments first, about 3-5 us (Triton 3.6 and
3.9). A GroupNorm call works out its launch shape with about fifteen of them, and a loss step
makes hundreds of such calls, all on the host's critical path when the step is launch-bound.
"""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
