"""Fused GroupNorm (+ FiLM) + SiLU, the pre-activation of every ResBlock convolution.

The prior applies, before each 3x3 convolution of a ResBlock,

    y = silu((group_norm(x + x_bias[c]) * weight + bias) * (1 + scale[n, c]) + shift[n, c])

(``scale``/``shift`` from the timestep embedding; without them, plain GroupNorm + SiLU;
``x_bias``, if given, the bias of the convolution that made x, which then need not add it in a
pass of its own), and, without the SiLU, the GroupNorm that opens each attention block. Eager
PyTorch runs this as three or four memory-bound kernels and keeps their outputs for the
backward pass; here the forward reads x twice (statistics, then output) and writes y once, the
backward reads x and dy twice and writes dx once, and only x and two floats per group are
saved. ``pass_x`` hands x back beside y for the op that also reads it (a ResBlock's skip path,
an attention block's residual sum); the backward then adds that op's gradient as it writes dx.

The prior is frozen, so only x is differentiable: weight, bias, scale and shift must not
require grad. Statistics and arithmetic are fp32 whatever the storage dtype.

The kernels read channels_last tensors, the layout the fused path keeps its activations in.
There a group's channels are a few elements of every pixel's row of C (16 bytes at ADM-256's
256-channel levels), so reading them group by group would leave most of each memory
transaction unused. Each program instead reads whole pixel rows of one sample, all groups at
once, and keeps per-channel partial sums; a small kernel folds them into per-group statistics.
A tensor in another layout is copied to channels_last and its results copied back.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton_common import TRITON_DTYPES, cdiv, next_power_of_2, require_triton, triton, tl
from .autocast import without_autocast

_CL = torch.channels_last


def group_norm_silu_torch(x, num_groups, weight, bias, eps, scale=None, shift=None,
                         x_bias=None, pass_x=False, silu=True):
    """Plain-PyTorch twin: the definition the fused kernels are tested against, and what the
    prior runs without them. ``scale``/``shift``: (N, C) or broadcastable to x, or None;
    ``x_bias``: (C,), added to x before the norm, or None; ``pass_x``: return (y, x);
    ``silu=False``: no SiLU after the norm."""
    inp = x
    if x_bias is not None:
        x = x + x_bias.reshape(1, -1, 1, 1)
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        view = lambda v: v.reshape(x.shape[0], x.shape[1], 1, 1)  # noqa: E731
        h = torch.addcmul(view(shift), h, 1 + view(scale))
    y = F.silu(h) if silu else h
    return (y, inp) if pass_x else y


if triton is not None:

    @triton.jit
    def _rows(n, start, HW, C, BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr):
        """Offsets and mask of pixels [start, start + BLOCK_S) of sample n, all channels, in a
        channels_last-contiguous tensor (pixel p's channels at (n * HW + p) * C)."""
        s = start + tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_CC)
        mask = (s < HW)[:, None] & (c < C)[None, :]
        return (n.to(tl.int64) * HW + s[:, None]) * C + c[None, :], mask

    @triton.jit
    def _row_channels(n, G, C, Cg: tl.constexpr, BLOCK_CC: tl.constexpr):
        """The channels of a row, their mask, and the index of their (sample, group)."""
        c = tl.arange(0, BLOCK_CC)
        cm = c < C
        return c, cm, n * G + c // Cg

    @triton.jit
    def _store_partials(part_ptr, n, sp, SPLIT, C, c, cm, a, b):
        """This program's per-channel sums of the tiles a and b: part[n, sp, 0 | 1, c]."""
        p = part_ptr + (n * SPLIT + sp).to(tl.int64) * 2 * C + c
        tl.store(p, tl.sum(a, axis=0), mask=cm)
        tl.store(p + C, tl.sum(b, axis=0), mask=cm)

    @triton.jit
    def _x_bias(xb_ptr, c, cm, HAS_XB: tl.constexpr):
        """The bias added to x at channels c (masked by cm): x_bias, or zeros."""
        xb = tl.zeros(c.shape, tl.float32)
        if HAS_XB:
            xb = tl.load(xb_ptr + c, mask=cm, other=0.0).to(tl.float32)
        return xb

    @triton.jit
    def _shift(x_ptr, off, xb_ptr, c0, m, HAS_XB: tl.constexpr):
        """The shift k of a group's sums: its first element of x + x_bias (at offset off of x
        and channel c0; scalars, or vectors masked by m)."""
        k = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_XB:
            k += tl.load(xb_ptr + c0, mask=m, other=0.0).to(tl.float32)
        return k

    @triton.jit
    def _affine(c, cm, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, scN, mean, rstd,
                HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr):
        """At channels c (masked by cm): (mul, add) with u = x * mul + add, the FiLM'd weight
        w * (1 + scale), and the centre, the x of zero xhat (mean - x_bias). mean and rstd are
        per-channel vectors (their groups')."""
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
        centre = mean - _x_bias(xb_ptr, c, cm, HAS_XB)
        gain = tl.zeros_like(w) + 1.0
        add = b - centre * w * rstd
        if HAS_FILM:
            gain += tl.load(sc_ptr + n.to(tl.int64) * scN + c, mask=cm, other=0.0).to(tl.float32)
            sh = tl.load(sh_ptr + n.to(tl.int64) * scN + c, mask=cm, other=0.0).to(tl.float32)
            add = add * gain + sh
        return w * rstd * gain, add, w * gain, centre

    @triton.jit
    def _row_affine(n, G, C, Cg: tl.constexpr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                    xb_ptr, scN, BLOCK_CC: tl.constexpr, HAS_FILM: tl.constexpr,
                    HAS_XB: tl.constexpr):
        """Per-channel statistics of the channel's group and the affine terms of a row."""
        c, cm, grp = _row_channels(n, G, C, Cg, BLOCK_CC)
        mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
        mul, add, dgain, centre = _affine(c, cm, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, scN,
                                          mean, rstd, HAS_FILM, HAS_XB)
        return c, cm, grp, centre, rstd, mul, add, dgain

    @triton.jit
    def _activation(u, SILU: tl.constexpr):
        """silu(u), or u itself (a norm with no activation after it)."""
        if SILU:
            u = u * tl.sigmoid(u)
        return u

    @triton.jit
    def _dxhat_of(x, du, mask, mul, add, dgain, centre, rstd, SILU: tl.constexpr):
        """The normalized input and its gradient from a tile of x and of the output's
        gradient du, both fp32 (recomputing the forward's u)."""
        if SILU:
            u = x * mul[None, :] + add[None, :]
            sig = tl.sigmoid(u)
            du = du * sig * (1.0 + u * (1.0 - sig))
        return (x - centre[None, :]) * rstd[None, :], tl.where(mask, du * dgain[None, :], 0.0)

    @triton.jit
    def _dxhat(x_ptr, dy_ptr, off, mask, mul, add, dgain, centre, rstd, SILU: tl.constexpr):
        """:func:`_dxhat_of` of the tile at ``off`` of x and dy."""
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        du = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        return _dxhat_of(x, du, mask, mul, add, dgain, centre, rstd, SILU)

    # Each loop keeps one tile in flight (num_stages=1): a streaming pass gains nothing from
    # software pipelining (benchmarks/NOTES.md).

    @triton.jit
    def _gn_stats_kernel(x_ptr, xb_ptr, part_ptr, HW, G, C, Cg: tl.constexpr, S_PER, SPLIT,
                         BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr, HAS_XB: tl.constexpr):
        """Per-channel partial sums of (x + x_bias - k) and its square over a slice of pixels,
        k the first element of x + x_bias in the channel's group: shifted sums keep the
        variance accurate when |mean| >> std."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        c, cm, _ = _row_channels(n, G, C, Cg, BLOCK_CC)
        first = (c // Cg) * Cg
        k = _shift(x_ptr, n.to(tl.int64) * HW * C + first, xb_ptr, first, cm, HAS_XB) \
            - _x_bias(xb_ptr, c, cm, HAS_XB)
        s1 = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        s2 = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=1):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            v = tl.where(mask, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                         - k[None, :], 0.0)
            s1 += v
            s2 += v * v
        _store_partials(part_ptr, n, sp, SPLIT, C, c, cm, s1, s2)

    @triton.jit
    def _gn_group_kernel(part_ptr, x_ptr, xb_ptr, out1_ptr, out2_ptr, HW, G, C,
                         Cg: tl.constexpr, SPLIT, eps, BLOCK_P: tl.constexpr,
                         BLOCK_G: tl.constexpr, FORWARD: tl.constexpr, HAS_XB: tl.constexpr):
        """One (sample, group): fold its channels' partial sums into the group's statistics.
        Forward: mean and 1/std. Backward: the means of dxhat and of dxhat * xhat."""
        ng = tl.program_id(0)
        n = ng // G
        g = ng % G
        j = tl.arange(0, BLOCK_G)
        a = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        b = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        for p0 in range(0, SPLIT, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p < SPLIT)[:, None] & (j < Cg)[None, :]
            off = (n * SPLIT + p[:, None]).to(tl.int64) * 2 * C + g * Cg + j[None, :]
            a += tl.load(part_ptr + off, mask=m, other=0.0)
            b += tl.load(part_ptr + off + C, mask=m, other=0.0)
        count = HW * Cg * 1.0
        sa = tl.sum(tl.sum(a, axis=1), axis=0) / count
        sb = tl.sum(tl.sum(b, axis=1), axis=0) / count
        if FORWARD:
            k = _shift(x_ptr, n.to(tl.int64) * HW * C + g * Cg, xb_ptr, g * Cg, True, HAS_XB)
            tl.store(out1_ptr + ng, k + sa)
            tl.store(out2_ptr + ng, 1.0 / tl.sqrt(tl.maximum(sb - sa * sa, 0.0) + eps))
        else:
            tl.store(out1_ptr + ng, sa)
            tl.store(out2_ptr + ng, sb)

    @triton.jit
    def _gn_silu_fwd_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                            xb_ptr, HW, G, C, Cg: tl.constexpr, scN, S_PER,
                            BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr,
                            HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr, SILU: tl.constexpr):
        n = tl.program_id(0)
        sp = tl.program_id(1)
        _, _, _, _, _, mul, add, _ = _row_affine(n, G, C, Cg, mean_ptr, rstd_ptr, w_ptr, b_ptr,
                                                 sc_ptr, sh_ptr, xb_ptr, scN, BLOCK_CC,
                                                 HAS_FILM, HAS_XB)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=1):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            u = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) * mul[None, :] \
                + add[None, :]
            tl.store(y_ptr + off, _activation(u, SILU).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_silu_bwd_stats_kernel(x_ptr, dy_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
                                  sc_ptr, sh_ptr, xb_ptr, HW, G, C, Cg: tl.constexpr, scN,
                                  S_PER, SPLIT, BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr,
                                  HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr,
                                  SILU: tl.constexpr):
        """Per-channel partial sums of dxhat and dxhat * xhat over a slice of pixels."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        c, cm, _, centre, rstd, mul, add, dgain = _row_affine(
            n, G, C, Cg, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, scN, BLOCK_CC,
            HAS_FILM, HAS_XB)
        a = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        b = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=1):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            xhat, dxhat = _dxhat(x_ptr, dy_ptr, off, mask, mul, add, dgain, centre, rstd, SILU)
            a += dxhat
            b += dxhat * xhat
        _store_partials(part_ptr, n, sp, SPLIT, C, c, cm, a, b)

    @triton.jit
    def _gn_silu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, dp_ptr, mean_ptr, rstd_ptr, ma_ptr, mb_ptr,
                            w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, HW, G, C, Cg: tl.constexpr,
                            scN, S_PER, BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr,
                            HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr,
                            HAS_DP: tl.constexpr, SILU: tl.constexpr):
        """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over each group, plus
        dp, the gradient of x passed through, if given."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        _, cm, grp, centre, rstd, mul, add, dgain = _row_affine(
            n, G, C, Cg, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, scN, BLOCK_CC,
            HAS_FILM, HAS_XB)
        ma = tl.load(ma_ptr + grp, mask=cm, other=0.0)
        mb = tl.load(mb_ptr + grp, mask=cm, other=0.0)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=1):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            xhat, dxhat = _dxhat(x_ptr, dy_ptr, off, mask, mul, add, dgain, centre, rstd, SILU)
            dx = rstd[None, :] * (dxhat - ma[None, :] - xhat * mb[None, :])
            if HAS_DP:
                dx += tl.load(dp_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_TILE = 4096          # elements of x a program holds per loop step: whole pixel rows
_PROGRAMS = 1024      # programs a launch aims for: enough to cover every SM several times
_MAX_CHANNELS = 4096  # two rows of more would put over 16 elements on each thread of 16 warps


class _Launch(NamedTuple):
    block_s: int   # pixels per tile
    block_cc: int  # channels per pixel row, padded to a power of two
    block_g: int   # channels per group, padded
    block_p: int   # partial sums the group kernel folds per step
    split: int     # programs per sample
    s_per: int     # pixels per program, a whole number of tiles
    num_warps: int


@functools.lru_cache(maxsize=256)  # one entry per shape a network's norms see; read only
def _launch(N, G, HW, C) -> _Launch:
    """The launch shape, from the problem size alone (as Liger-Kernel's
    ``calculate_settings``): a tile of whole pixel rows, each sample's pixels split over
    programs to about ``_PROGRAMS`` in all, and a warp per 512 elements of the tile (16 a
    thread), 4 to 16 warps; more elements a thread spill the backward kernels' registers
    (``tests/kernel_compile.py``). Every block dim is at least 2 (masked): one-element aranges
    are where Triton's code generation is least exercised."""
    block_cc = max(2, next_power_of_2(C))
    block_s = max(2, min(next_power_of_2(HW), _TILE // block_cc))
    split = max(1, min(cdiv(_PROGRAMS, N), cdiv(HW, block_s)))
    s_per = cdiv(cdiv(HW, split), block_s) * block_s
    split = cdiv(HW, s_per)
    return _Launch(block_s=block_s, block_cc=block_cc, block_g=max(2, next_power_of_2(C // G)),
                   block_p=max(2, min(64, next_power_of_2(split))), split=split, s_per=s_per,
                   num_warps=min(16, max(4, block_s * block_cc // 512)))


def _forward(x, G, weight, bias, eps, scale, shift, x_bias, silu):
    """y, the per-group mean and 1/std (of x + x_bias), and the launch shape (reused by the
    backward pass); x channels_last."""
    N, C, H, W = x.shape
    HW, Cg = H * W, C // G
    film, has_xb = scale is not None, x_bias is not None
    sc, sh = (scale, shift) if film else (weight, weight)  # never read without FiLM
    xb = x_bias if has_xb else weight  # never read without x_bias
    mean = torch.empty(N * G, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    k = _launch(N, G, HW, C)
    part = torch.empty(N * k.split * 2 * C, dtype=torch.float32, device=x.device)
    _gn_stats_kernel[(N, k.split)](x, xb, part, HW, G, C, Cg, k.s_per, k.split,
                                   BLOCK_S=k.block_s, BLOCK_CC=k.block_cc, HAS_XB=has_xb,
                                   num_warps=k.num_warps)
    _gn_group_kernel[(N * G,)](part, x, xb, mean, rstd, HW, G, C, Cg, k.split, float(eps),
                               BLOCK_P=k.block_p, BLOCK_G=k.block_g, FORWARD=True,
                               HAS_XB=has_xb, num_warps=4)
    _gn_silu_fwd_kernel[(N, k.split)](x, y, mean, rstd, weight, bias, sc, sh, xb, HW, G, C, Cg,
                                      sc.stride(0), k.s_per, BLOCK_S=k.block_s,
                                      BLOCK_CC=k.block_cc, HAS_FILM=film, HAS_XB=has_xb,
                                      SILU=silu, num_warps=k.num_warps)
    return y, mean, rstd, k


def _backward(x, dy, dp, mean, rstd, weight, bias, sc, sh, xb, G, film, has_xb, silu, k):
    """dx, channels_last like x, dy and dp (the gradient of the passed-on x, or None)."""
    N, C, H, W = x.shape
    HW, Cg = H * W, C // G
    dx = torch.empty_like(x)
    part = torch.empty(N * k.split * 2 * C, dtype=torch.float32, device=x.device)
    ma, mb = torch.empty_like(mean), torch.empty_like(mean)
    _gn_silu_bwd_stats_kernel[(N, k.split)](
        x, dy, part, mean, rstd, weight, bias, sc, sh, xb, HW, G, C, Cg, sc.stride(0), k.s_per,
        k.split, BLOCK_S=k.block_s, BLOCK_CC=k.block_cc, HAS_FILM=film, HAS_XB=has_xb,
        SILU=silu, num_warps=k.num_warps)
    _gn_group_kernel[(N * G,)](part, x, xb, ma, mb, HW, G, C, Cg, k.split, 0.0,
                               BLOCK_P=k.block_p, BLOCK_G=k.block_g, FORWARD=False,
                               HAS_XB=has_xb, num_warps=4)
    _gn_silu_bwd_kernel[(N, k.split)](
        x, dy, dx, dx if dp is None else dp, mean, rstd, ma, mb, weight, bias, sc, sh, xb, HW,
        G, C, Cg, sc.stride(0), k.s_per, BLOCK_S=k.block_s, BLOCK_CC=k.block_cc,
        HAS_FILM=film, HAS_XB=has_xb, HAS_DP=dp is not None, SILU=silu,
        num_warps=k.num_warps)
    return dx


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of y and dx: channels_last for x dense in it, else NCHW."""
    return _CL if x.is_contiguous(memory_format=_CL) else torch.contiguous_format


class _GroupNormSiLU(torch.autograd.Function):
    """y, or (y, x) with ``pass_x``: x handed on (as a view) to the op beside the norm, whose
    gradient the kernel writing dx adds, instead of autograd in a pass of its own."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, scale, shift, x_bias, silu, pass_x):
        rows = x.contiguous(memory_format=_CL)
        y, mean, rstd, k = _forward(rows, num_groups, weight, bias, eps, scale, shift, x_bias,
                                    silu)
        film, has_xb = scale is not None, x_bias is not None
        sc, sh = (scale, shift) if film else (weight, weight)
        ctx.save_for_backward(rows, mean, rstd, weight, bias, sc, sh,
                              x_bias if has_xb else weight)
        ctx.num_groups, ctx.film, ctx.has_xb, ctx.silu, ctx.launch = (num_groups, film, has_xb,
                                                                      silu, k)
        ctx.layout = _layout(x)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        y = y.contiguous(memory_format=ctx.layout)
        return (y, x) if pass_x else y

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, dy, dp=None):
        rows, mean, rstd, weight, bias, sc, sh, xb = ctx.saved_tensors
        nones = (None,) * 9
        if dy is None:  # only the passed-on x was used
            return (None if dp is None else dp.contiguous(memory_format=ctx.layout),) + nones
        if dp is not None:
            dp = dp.contiguous(memory_format=_CL)
        dx = _backward(rows, dy.contiguous(memory_format=_CL), dp, mean, rstd, weight, bias,
                       sc, sh, xb, ctx.num_groups, ctx.film, ctx.has_xb, ctx.silu, ctx.launch)
        return (dx.contiguous(memory_format=ctx.layout),) + nones


def norm_parameters(op: str, x: torch.Tensor, name: str, num_groups: int, weight, bias,
                    scale, shift, x_bias):
    """The norm's parameters checked against ``x`` (N, C, H, W; ``name`` in messages) and shaped
    as the kernels read them: weight and bias (C,) (ones and zeros for None), scale and shift
    (N, C) with one row stride, or None, x_bias (C,) or None. The prior is frozen: none may
    require grad. Errors name ``op``."""
    N, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"{op}: {C} channels do not split into {num_groups} groups")
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: give both scale and shift, or neither")
    weight = x.new_ones(C) if weight is None else weight
    bias = x.new_zeros(C) if bias is None else bias
    params = {"weight": weight, "bias": bias}
    if scale is not None:
        params["scale"] = scale = scale.reshape(N, C)
        params["shift"] = shift = shift.reshape(N, C)
    if x_bias is not None:
        if x_bias.numel() != C:
            raise ValueError(f"{op}: x_bias must have one value per channel ({C}), got shape "
                             f"{tuple(x_bias.shape)}")
        params["x_bias"] = x_bias = x_bias.reshape(C).contiguous()
    for key, t in params.items():
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: the triton backend differentiates to {name} only (a frozen "
                             f"prior), but {key} requires grad")
        if t.device != x.device:
            raise ValueError(f"{op}: {key} is on {t.device}, {name} on {x.device}")
    weight, bias = weight.reshape(C).contiguous(), bias.reshape(C).contiguous()
    if scale is not None and (scale.stride(1) != 1 or shift.stride() != scale.stride()):
        scale, shift = scale.contiguous(), shift.contiguous()  # one row stride for both
    return weight, bias, scale, shift, x_bias


def group_norm_silu_triton(x, num_groups, weight, bias, eps, scale=None, shift=None,
                           x_bias=None, pass_x=False, silu=True):
    """Fused Triton version of :func:`group_norm_silu_torch`; differentiable in ``x`` only.
    ``pass_x``: return (y, x), x to use beside the norm (a ResBlock's skip path), so that its
    gradient is added to the norm's by the kernel that writes dx. ``silu=False``: the norm
    alone (an attention block's). Rows wider than ``_MAX_CHANNELS`` (no ADM prior has them)
    take the twin."""
    require_triton("group_norm_silu_triton")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"group_norm_silu: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    N, C = x.shape[:2]
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"group_norm_silu: the triton backend takes fp32/fp16/bf16, got "
                         f"{x.dtype}; use the torch twin for it")
    weight, bias, scale, shift, x_bias = norm_parameters(
        "group_norm_silu", x, "x", num_groups, weight, bias, scale, shift, x_bias)
    if C > _MAX_CHANNELS:
        return group_norm_silu_torch(x, num_groups, weight, bias, eps, scale, shift, x_bias,
                                     pass_x, silu)
    if x.numel() == 0:
        y = torch.empty_like(x, memory_format=_layout(x))
        return (y, x) if pass_x else y
    if x.requires_grad and torch.is_grad_enabled():
        return _GroupNormSiLU.apply(x, num_groups, weight, bias, eps, scale, shift, x_bias,
                                    silu, pass_x)
    rows = x.detach().contiguous(memory_format=_CL)
    y = _forward(rows, num_groups, weight, bias, eps, scale, shift, x_bias, silu)[0]
    y = y.contiguous(memory_format=_layout(x))
    return (y, x) if pass_x else y
