"""What the pair convolution's kernels share, forward and backward: the tile sizes of a
convolution shape, the dot of two tiles and the rounding of fp32 to a storage dtype as a GPU
does them (and as the CPU interpreter must be told to), and the dots' input precision."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._triton_common import next_power_of_2, triton, tl

if triton is not None:

    @triton.jit
    def _gemm_tile(H, W, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's tile of an implicit-GEMM convolution over a (column tiles, pixel
        tiles, samples) grid: its sample, its column and pixel tile indices, its pixels (flat
        index, mask, row, column) and its columns (channel, mask)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return (tl.program_id(2), pid_n, pid_m, m, m < H * W, m // W, m % W, cols,
                cols < COLS)

    @triton.jit
    def _mm(x, y, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc + x @ y, fp32 sums of exact products. Triton's CPU interpreter multiplies bf16
        bit patterns as integers: there the operands go up to fp32 first, which computes the
        same products."""
        if INTERPRETED:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, y, acc, input_precision=PRECISION)

    @triton.jit
    def _to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
        """fp32 x rounded to the nearest value of dtype. The CPU interpreter truncates fp32 to
        bf16 (a GPU rounds to nearest): there the rounding is done on the bits first (to
        nearest, ties to even), which leaves the truncation exact."""
        if INTERPRETED:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)


class _ConvLaunch(NamedTuple):
    block_m: int  # output pixels per tile
    block_n: int  # output channels per tile
    block_k: int  # input channels per reduction step (one tap at a time)
    num_warps: int
    num_stages: int


# Elements of the output tile a program holds per branch: the forward holds two such
# accumulators, the prologue's fp32 temporaries beside them.
_TILE = 8192


@functools.lru_cache(maxsize=256)  # one entry per convolution shape of a network; read only
def _conv_launch(HW: int, Cin: int, Cout: int, itemsize: int, prologue: bool,
                 fma: bool, fp8: bool = False) -> _ConvLaunch:
    """Tile sizes from the shape alone: up to 128 output channels a tile (a ResBlock's
    convolution is then applied to each loaded input tile for 128 channels at once, the
    prologue recomputed for every further 128), pixels to fill ``_TILE``, every dim at least
    16 (tl.dot's smallest). Reduction steps of 64 input channels for 16-bit tiles without a
    prologue; 32 with one (its fp32 temporaries sit beside both accumulators) and for fp32
    (twice the shared memory a step), fp32 with a prologue in tiles of half the size. IEEE
    fp32 (``fma``: no tensor cores) holds its dots' operands in registers: tiles of half the
    size, steps of 16, always 8 warps. Otherwise 8
    warps for full tiles, 4 for smaller ones. e4m3 operands (``fp8``) take the 16-bit tiles,
    in steps of 32 (an FP8 MMA's reduction on sm_89 and sm_90, and the products after which
    sm_90 adds its MMA's narrower partial sums into fp32: with steps of 64 and no prologue,
    Triton's sm_90 pipeline rejects that interval)."""
    # fp32 operands with the prologue's temporaries beside them: half the tile, or sm_89
    # spills registers
    tile = _TILE // 2 if fma or (prologue and itemsize > 2) else _TILE
    block_n = min(64 if fma else 128, max(16, next_power_of_2(Cout)))
    block_m = max(16, min(128, next_power_of_2(HW), tile // block_n))
    step = 16 if fma else 32 if prologue or itemsize > 2 or fp8 else 64
    block_k = 32 if fp8 else min(step, max(16, next_power_of_2(Cin)))
    return _ConvLaunch(block_m=block_m, block_n=block_n, block_k=block_k,
                       num_warps=8 if fma or block_m * block_n >= tile else 4, num_stages=2)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 follows cuDNN's TF32 switch, as F.conv2d does (16-bit
    operands are multiplied exactly either way)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
