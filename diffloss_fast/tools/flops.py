"""FLOPs of the work actually run, counted by torch.utils.flop_counter."""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.flop_counter import FlopCounterMode


def count_flops(step: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``step`` (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()
