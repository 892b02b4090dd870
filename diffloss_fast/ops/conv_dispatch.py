"""Which of the pair pass's norm + convolution blocks run as one fused Triton kernel
(:mod:`.pair_conv`), decided by measurement, per card family.

A fused block saves the passes between convolutions (the normalized tensor, the residual sum),
but its implicit GEMM competes with cuDNN's convolutions, which differ by shape and card. So
nothing is fused by default: ``diffloss-fast conv-sweep`` times, on a GPU, each block of the
prior at each batch both ways and writes the table this module reads, one entry per card family
(``sm_90``, ``sm_89``, ...) and block. A block is fused only where its entry says the fused
kernel was faster; a block, batch or card not in the table keeps the library path, so the worst
case is the speed without fused blocks.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch

TABLE = Path(__file__).with_name("conv_dispatch.json")
# The blocks a fused kernel can replace: a ResBlock's first norm + SiLU and 3x3 convolution
# ("in"), and its second norm + FiLM + SiLU, 3x3 convolution and residual sum ("out"); a
# decoder ResBlock's concatenated input, read in place by its norm's statistics, its first and
# its 1x1 skip convolution instead of copied ("cat-in"); a resampling ResBlock's first norm +
# SiLU, 2x upsampling or 2x2 average pooling and 3x3 convolution ("up-in", "down-in"); the
# noise head's norm + SiLU + 3x3 convolution ("head"); the precision="fp8" network's, on e4m3
# operands, under keys of their own ("fp8-" and the kind): a bf16 measurement never decides
# an FP8 block.
_BF16_KINDS = ("in", "out", "cat-in", "up-in", "down-in", "head")
KINDS = (*_BF16_KINDS, *(f"fp8-{kind}" for kind in _BF16_KINDS))


class Block(NamedTuple):
    """One block shape: what a table entry is for."""
    kind: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int

    def key(self) -> str:
        return (f"{self.kind}:{self.batch}x{self.in_channels}x{self.height}x{self.width}"
                f"->{self.out_channels}")


class _EveryBlock(frozenset):
    """A fused-block set that holds every key."""

    def __contains__(self, key):
        return True


# Every block fused, whatever the table says: what ``check-precision --fuse-every-block``
# checks the fused kernels' accuracy with, before a sweep has fused any.
EVERY_BLOCK = _EveryBlock({"*"})


def card_family(device: torch.device | str) -> str | None:
    """``sm_<major><minor>`` of a CUDA device; None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=4)
def load_table(path: Path = TABLE) -> dict:
    """``{family: {block key: {"fused_ms": ..., "library_ms": ...}}}``; empty without a file."""
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{path}: not a convolution dispatch table (a JSON object of card "
                         "families, each an object of blocks)")
    return table


def fused_blocks(device: torch.device | str, table: dict | None = None) -> frozenset[str]:
    """The keys of the blocks that run fused on ``device``: those whose measured fused time
    beat the library's on its card family."""
    family = card_family(device)
    entries = (load_table() if table is None else table).get(family, {}) if family else {}
    return frozenset(key for key, e in entries.items() if e["fused_ms"] < e["library_ms"])
