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

Two kernel families, by layout. NCHW (and strided) tensors: a group's channels are one
contiguous run per sample, so each (sample, group) is split over several programs and the
partial sums are combined by the next kernel. channels_last tensors: a group's channels are a
few elements of every pixel's row of C (16 bytes at ADM-256's 256-channel levels), so reading
them group by group leaves most of each memory transaction unused (3.1x slower than NCHW on an
H200). There each program reads whole pixel rows of one sample, all groups at once, and keeps
per-channel partial sums; a small kernel folds them into per-group statistics.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .checks import is_channels_last
from .launch_math import cdiv, next_power_of_2


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


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch twin still works
    triton = None

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 2048          # elements per loop step of one program
_TARGET_PROGRAMS = 1024  # enough programs to cover every SM several times
_MAX_ROW_CHANNELS = 4096  # wider channels_last tensors take the group-wise kernels
LAUNCH_ENV = "DIFFLOSS_FAST_NORM_LAUNCH"


@dataclass(frozen=True)
class RowLaunch:
    """Launch shape of the channels_last (pixel-row) kernels, by role: ``reduce``, the passes
    that only read and sum (forward statistics, backward sums), and ``apply``, the passes that
    write y or dx. Each role has its elements per loop step (``*_tile``, whole pixel rows) and
    the tiles each program has in flight (``*_stages``: software pipelining of the loop's loads
    through shared memory; 1 loads each tile as it is used); ``programs`` is how many programs
    a launch aims for. The roles differ in what keeps them waiting: a reducing pass has only
    its loads in flight, an applying pass also its stores. Set from the environment variable
    ``DIFFLOSS_FAST_NORM_LAUNCH`` (see :meth:`parse`); swept on a GPU by
    ``benchmarks/test_bench_ops.py``."""

    reduce_tile: int = 4096
    reduce_stages: int = 1
    apply_tile: int = 4096
    apply_stages: int = 1
    programs: int = 1024

    def __post_init__(self):
        for name in ("reduce_tile", "apply_tile"):
            tile = getattr(self, name)
            if not 256 <= tile <= 8192 or tile & (tile - 1):
                raise ValueError(f"{LAUNCH_ENV}: {name} must be a power of two from 256 to "
                                 f"8192, got {tile}")
        for name in ("reduce_stages", "apply_stages"):
            if not 1 <= getattr(self, name) <= 4:
                raise ValueError(f"{LAUNCH_ENV}: {name} must be 1 to 4, got "
                                 f"{getattr(self, name)}")
        if not 1 <= self.programs <= 65536:
            raise ValueError(f"{LAUNCH_ENV}: programs must be 1 to 65536, got {self.programs}")

    @classmethod
    def parse(cls, text: str | None) -> "RowLaunch":
        """From ``"reduce_tile=8192,reduce_stages=3"``: comma-separated ``name=integer`` pairs,
        any subset of the fields (the rest keep their defaults); empty or None: the defaults."""
        fields = {}
        for item in filter(None, (part.strip() for part in (text or "").split(","))):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in cls.__dataclass_fields__:
                raise ValueError(f"{LAUNCH_ENV}: unknown setting {name!r} in {text!r}; known: "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            try:
                fields[name] = int(value)
            except ValueError:
                raise ValueError(f"{LAUNCH_ENV}: {name} must be an integer, got "
                                 f"{value.strip()!r}") from None
        return cls(**fields)

    def __str__(self) -> str:
        """The settings that differ from the defaults, in the form :meth:`parse` reads ("" for
        the defaults)."""
        default = RowLaunch()
        return ",".join(f"{name}={getattr(self, name)}" for name in self.__dataclass_fields__
                        if getattr(self, name) != getattr(default, name))


_ROW_LAUNCH = RowLaunch.parse(os.environ.get(LAUNCH_ENV))


def active_row_launch() -> RowLaunch:
    """The launch shape the channels_last kernels use in this process."""
    return _ROW_LAUNCH


if triton is not None:

    @triton.jit
    def _group_base(ng, G, Cg, sN, sC):
        n = ng // G
        g = ng % G
        return n, g, n.to(tl.int64) * sN + (g * Cg).to(tl.int64) * sC

    @triton.jit
    def _tile_offsets(start, HW, Cg, sS, sC, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        s = start + tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_C)
        mask = (s < HW)[:, None] & (c < Cg)[None, :]
        return s[:, None].to(tl.int64) * sS + c[None, :].to(tl.int64) * sC, mask

    @triton.jit
    def _store_partials(part_ptr, ng, sp, SPLIT, a, b):
        """This program's sums of the tiles a and b, for ``_combine`` in the next kernel."""
        tl.store(part_ptr + (ng * SPLIT + sp) * 2, tl.sum(tl.sum(a, axis=1), axis=0))
        tl.store(part_ptr + (ng * SPLIT + sp) * 2 + 1, tl.sum(tl.sum(b, axis=1), axis=0))

    @triton.jit
    def _combine(part_ptr, ng, SPLIT, BLOCK_P: tl.constexpr):
        """Sum the per-program partial sums (a, b) of one group."""
        p = tl.arange(0, BLOCK_P)
        m = p < SPLIT
        a = tl.sum(tl.load(part_ptr + (ng * SPLIT + p) * 2, mask=m, other=0.0), axis=0)
        b = tl.sum(tl.load(part_ptr + (ng * SPLIT + p) * 2 + 1, mask=m, other=0.0), axis=0)
        return a, b

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
    def _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, g, Cg, scN, mean, rstd,
                BLOCK_C: tl.constexpr, HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr):
        """``_affine_at`` for the channels of group g."""
        c = g * Cg + tl.arange(0, BLOCK_C)
        cm = tl.arange(0, BLOCK_C) < Cg
        return _affine_at(c, cm, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, scN, mean, rstd,
                          HAS_FILM, HAS_XB)

    @triton.jit
    def _affine_at(c, cm, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, scN, mean, rstd,
                   HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr):
        """At channels c (masked by cm): (mul, add) with u = x * mul + add, the FiLM'd weight
        w * (1 + scale), and the centre, the x of zero xhat (mean - x_bias). mean and rstd are
        scalars or per-channel vectors."""
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
    def _gn_stats_kernel(x_ptr, xb_ptr, part_ptr, HW, G, Cg: tl.constexpr, sN, sC, sS, S_PER,
                         SPLIT, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                         HAS_XB: tl.constexpr):
        """Partial sums of (x + x_bias - k) and its square over one slice of a group, k the
        group's first element of x + x_bias: shifted sums keep the variance accurate when
        |mean| >> std."""
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        n, g, base = _group_base(ng, G, Cg, sN, sC)
        k = _shift(x_ptr, base, xb_ptr, g * Cg, True, HAS_XB)
        k = k - _x_bias(xb_ptr, g * Cg + tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_C) < Cg,
                        HAS_XB)  # subtracted from x: (x + x_bias) - k
        s1 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for start in range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S):
            off, mask = _tile_offsets(start, HW, Cg, sS, sC, BLOCK_S, BLOCK_C)
            v = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32) - k[None, :]
            v = tl.where(mask, v, 0.0)
            s1 += v
            s2 += v * v
        _store_partials(part_ptr, ng, sp, SPLIT, s1, s2)

    @triton.jit
    def _gn_silu_fwd_kernel(x_ptr, y_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr,
                            sh_ptr, xb_ptr, HW, G, Cg: tl.constexpr, sN, sC, sS, scN, S_PER,
                            SPLIT, eps, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_P: tl.constexpr, HAS_FILM: tl.constexpr,
                            HAS_XB: tl.constexpr, SILU: tl.constexpr):
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        n, g, base = _group_base(ng, G, Cg, sN, sC)
        k = _shift(x_ptr, base, xb_ptr, g * Cg, True, HAS_XB)
        s1, s2 = _combine(part_ptr, ng, SPLIT, BLOCK_P)
        count = HW * Cg * 1.0
        d = s1 / count
        mean = k + d
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / count - d * d, 0.0) + eps)
        if sp == 0:
            tl.store(mean_ptr + ng, mean)
            tl.store(rstd_ptr + ng, rstd)
        mul, add, _, _ = _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, g, Cg, scN, mean, rstd,
                                 BLOCK_C, HAS_FILM, HAS_XB)
        for start in range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S):
            off, mask = _tile_offsets(start, HW, Cg, sS, sC, BLOCK_S, BLOCK_C)
            u = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32) * mul[None, :] \
                + add[None, :]
            tl.store(y_ptr + base + off, _activation(u, SILU).to(y_ptr.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def _activation(u, SILU: tl.constexpr):
        """silu(u), or u itself (a norm with no activation after it)."""
        if SILU:
            u = u * tl.sigmoid(u)
        return u

    @triton.jit
    def _dxhat(x_ptr, dy_ptr, base, dbase, off, doff, mask, mul, add, dgain, centre, rstd,
               SILU: tl.constexpr):
        """Recompute the forward for one tile: the normalized input and its gradient."""
        x = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
        du = tl.load(dy_ptr + dbase + doff, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            u = x * mul[None, :] + add[None, :]
            sig = tl.sigmoid(u)
            du = du * sig * (1.0 + u * (1.0 - sig))
        return (x - centre) * rstd, tl.where(mask, du * dgain[None, :], 0.0)

    @triton.jit
    def _bwd_group(ng, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, G, Cg, sN, sC,
                   dsN, dsC, scN, BLOCK_C: tl.constexpr, HAS_FILM: tl.constexpr,
                   HAS_XB: tl.constexpr):
        """Where a group starts in x (and dx) and in dy, its statistics and affine terms."""
        n, g, base = _group_base(ng, G, Cg, sN, sC)
        _, _, dbase = _group_base(ng, G, Cg, dsN, dsC)
        mean = tl.load(mean_ptr + ng)
        rstd = tl.load(rstd_ptr + ng)
        mul, add, dgain, centre = _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, g, Cg, scN,
                                          mean, rstd, BLOCK_C, HAS_FILM, HAS_XB)
        return base, dbase, centre, rstd, mul, add, dgain

    @triton.jit
    def _gn_silu_bwd_stats_kernel(x_ptr, dy_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
                                  sc_ptr, sh_ptr, xb_ptr, HW, G, Cg: tl.constexpr, sN, sC, sS,
                                  dsN, dsC, dsS, scN, S_PER, SPLIT, BLOCK_S: tl.constexpr,
                                  BLOCK_C: tl.constexpr, HAS_FILM: tl.constexpr,
                                  HAS_XB: tl.constexpr, SILU: tl.constexpr):
        """Partial sums of dxhat and dxhat * xhat over one slice of a group."""
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        base, dbase, centre, rstd, mul, add, dgain = _bwd_group(
            ng, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, G, Cg, sN, sC, dsN,
            dsC, scN, BLOCK_C, HAS_FILM, HAS_XB)
        a = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        b = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for start in range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S):
            off, mask = _tile_offsets(start, HW, Cg, sS, sC, BLOCK_S, BLOCK_C)
            doff, _ = _tile_offsets(start, HW, Cg, dsS, dsC, BLOCK_S, BLOCK_C)
            xhat, dxhat = _dxhat(x_ptr, dy_ptr, base, dbase, off, doff, mask, mul, add, dgain,
                                 centre[None, :], rstd, SILU)
            a += dxhat
            b += dxhat * xhat
        _store_partials(part_ptr, ng, sp, SPLIT, a, b)

    @triton.jit
    def _gn_silu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, dp_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr,
                            b_ptr, sc_ptr, sh_ptr, xb_ptr, HW, G, Cg: tl.constexpr, sN, sC, sS,
                            dsN, dsC, dsS, scN, S_PER, SPLIT, BLOCK_S: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                            HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr,
                            HAS_DP: tl.constexpr, SILU: tl.constexpr):
        """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group, plus
        dp (x's strides), the gradient of x passed through, if given."""
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        base, dbase, centre, rstd, mul, add, dgain = _bwd_group(
            ng, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, G, Cg, sN, sC, dsN,
            dsC, scN, BLOCK_C, HAS_FILM, HAS_XB)
        sa, sb = _combine(part_ptr, ng, SPLIT, BLOCK_P)
        count = HW * Cg * 1.0
        ma = sa / count
        mb = sb / count
        for start in range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S):
            off, mask = _tile_offsets(start, HW, Cg, sS, sC, BLOCK_S, BLOCK_C)
            doff, _ = _tile_offsets(start, HW, Cg, dsS, dsC, BLOCK_S, BLOCK_C)
            xhat, dxhat = _dxhat(x_ptr, dy_ptr, base, dbase, off, doff, mask, mul, add, dgain,
                                 centre[None, :], rstd, SILU)
            dx = rstd * (dxhat - ma - xhat * mb)
            if HAS_DP:
                dx += tl.load(dp_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + base + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


    # --- channels_last: whole pixel rows of one sample per program -----------------------

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
    def _store_row_partials(part_ptr, n, sp, SPLIT, C, c, cm, a, b):
        """This program's per-channel sums of the tiles a and b: part[n, sp, 0 | 1, c]."""
        p = part_ptr + (n * SPLIT + sp).to(tl.int64) * 2 * C + c
        tl.store(p, tl.sum(a, axis=0), mask=cm)
        tl.store(p + C, tl.sum(b, axis=0), mask=cm)

    @triton.jit
    def _gn_rows_stats_kernel(x_ptr, xb_ptr, part_ptr, HW, G, C, Cg: tl.constexpr, S_PER,
                              SPLIT, BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr,
                              HAS_XB: tl.constexpr, STAGES: tl.constexpr):
        """Per-channel partial sums of (x + x_bias - k) and its square over a slice of pixels,
        k the first element of x + x_bias in the channel's group (as in
        ``_gn_stats_kernel``)."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        c, cm, _ = _row_channels(n, G, C, Cg, BLOCK_CC)
        first = (c // Cg) * Cg
        k = _shift(x_ptr, n.to(tl.int64) * HW * C + first, xb_ptr, first, cm, HAS_XB) \
            - _x_bias(xb_ptr, c, cm, HAS_XB)
        s1 = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        s2 = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=STAGES):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            v = tl.where(mask, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                         - k[None, :], 0.0)
            s1 += v
            s2 += v * v
        _store_row_partials(part_ptr, n, sp, SPLIT, C, c, cm, s1, s2)

    @triton.jit
    def _gn_rows_group_kernel(part_ptr, x_ptr, xb_ptr, out1_ptr, out2_ptr, HW, G, C,
                              Cg: tl.constexpr, SPLIT, eps, BLOCK_P: tl.constexpr,
                              BLOCK_G: tl.constexpr, FORWARD: tl.constexpr,
                              HAS_XB: tl.constexpr):
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
    def _row_affine(n, G, C, Cg: tl.constexpr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                    xb_ptr, scN, BLOCK_CC: tl.constexpr, HAS_FILM: tl.constexpr,
                    HAS_XB: tl.constexpr):
        """Per-channel statistics of the channel's group and the affine terms of a row."""
        c, cm, grp = _row_channels(n, G, C, Cg, BLOCK_CC)
        mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
        mul, add, dgain, centre = _affine_at(c, cm, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, n, scN,
                                             mean, rstd, HAS_FILM, HAS_XB)
        return c, cm, grp, centre, rstd, mul, add, dgain

    @triton.jit
    def _gn_rows_silu_fwd_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr,
                                 sh_ptr, xb_ptr, HW, G, C, Cg: tl.constexpr, scN, S_PER,
                                 BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr,
                                 HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr,
                                 STAGES: tl.constexpr, SILU: tl.constexpr):
        n = tl.program_id(0)
        sp = tl.program_id(1)
        _, _, _, _, _, mul, add, _ = _row_affine(n, G, C, Cg, mean_ptr, rstd_ptr, w_ptr, b_ptr,
                                                 sc_ptr, sh_ptr, xb_ptr, scN, BLOCK_CC,
                                                 HAS_FILM, HAS_XB)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=STAGES):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            u = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) * mul[None, :] \
                + add[None, :]
            tl.store(y_ptr + off, _activation(u, SILU).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_rows_silu_bwd_stats_kernel(x_ptr, dy_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr,
                                       b_ptr, sc_ptr, sh_ptr, xb_ptr, HW, G, C, Cg: tl.constexpr,
                                       scN, S_PER, SPLIT, BLOCK_S: tl.constexpr,
                                       BLOCK_CC: tl.constexpr, HAS_FILM: tl.constexpr,
                                       HAS_XB: tl.constexpr, STAGES: tl.constexpr,
                                       SILU: tl.constexpr):
        """Per-channel partial sums of dxhat and dxhat * xhat over a slice of pixels."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        c, cm, _, centre, rstd, mul, add, dgain = _row_affine(
            n, G, C, Cg, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, scN, BLOCK_CC,
            HAS_FILM, HAS_XB)
        a = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        b = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=STAGES):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            xhat, dxhat = _dxhat(x_ptr, dy_ptr, 0, 0, off, off, mask, mul, add, dgain,
                                 centre[None, :], rstd[None, :], SILU)
            a += dxhat
            b += dxhat * xhat
        _store_row_partials(part_ptr, n, sp, SPLIT, C, c, cm, a, b)

    @triton.jit
    def _gn_rows_silu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, dp_ptr, mean_ptr, rstd_ptr, ma_ptr,
                                 mb_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, HW, G, C,
                                 Cg: tl.constexpr, scN, S_PER, BLOCK_S: tl.constexpr,
                                 BLOCK_CC: tl.constexpr, HAS_FILM: tl.constexpr,
                                 HAS_XB: tl.constexpr, HAS_DP: tl.constexpr,
                                 STAGES: tl.constexpr, SILU: tl.constexpr):
        """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over each group, plus
        dp, the gradient of x passed through, if given."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        _, cm, grp, centre, rstd, mul, add, dgain = _row_affine(
            n, G, C, Cg, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, xb_ptr, scN, BLOCK_CC,
            HAS_FILM, HAS_XB)
        ma = tl.load(ma_ptr + grp, mask=cm, other=0.0)
        mb = tl.load(mb_ptr + grp, mask=cm, other=0.0)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=STAGES):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            xhat, dxhat = _dxhat(x_ptr, dy_ptr, 0, 0, off, off, mask, mul, add, dgain,
                                 centre[None, :], rstd[None, :], SILU)
            dx = rstd[None, :] * (dxhat - ma[None, :] - xhat * mb[None, :])
            if HAS_DP:
                dx += tl.load(dp_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _spatial_stride(t: torch.Tensor) -> int | None:
    """The stride s with element (h, w) at offset (h * W + w) * s, if H and W flatten."""
    _, _, H, W = t.shape
    if H == 1 or W == 1:
        return t.stride(3) if H == 1 else t.stride(2)
    return t.stride(3) if t.stride(2) == W * t.stride(3) else None


def _flat(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy`` itself when its spatial dims flatten (the kernels take its own strides), else a
    copy in ``x``'s memory format."""
    if _spatial_stride(dy) is not None:
        return dy
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return dy.contiguous(memory_format=layout)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as NCHW- or channels_last-contiguous, so that y and dx (``empty_like``) share its
    strides and the kernels index all three alike."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), _spatial_stride(t)


def _split(HW: int, block_s: int, units: int, programs: int) -> tuple[int, int]:
    """Programs per unit (a sample's group, or a sample) and the pixels each covers, a whole
    number of tiles: about ``programs`` programs over all units, to fill the GPU several times."""
    split = max(1, min(cdiv(programs, units), cdiv(HW, block_s)))
    s_per = cdiv(cdiv(HW, split), block_s) * block_s
    return cdiv(HW, s_per), s_per


@functools.lru_cache(maxsize=256)  # one entry per shape a network's norms see; read only
def _launch(N, G, HW, Cg, tile, programs):
    """Block shape and the split of each group over programs. Every block dim is at least 2
    (masked): one-element aranges are where Triton's code generation is least exercised."""
    block_c = max(2, next_power_of_2(Cg))
    block_s = max(2, min(next_power_of_2(HW), tile // block_c))
    split, s_per = _split(HW, block_s, N * G, programs)
    return dict(rows=False, block_s=block_s, block_c=block_c,
                block_p=max(2, next_power_of_2(split)), split=split, s_per=s_per)


def _by_rows(x: torch.Tensor) -> bool:
    """Whether x takes the pixel-row kernels: channels_last, with a row of channels that fits
    a tile."""
    return is_channels_last(x) and x.shape[1] <= _MAX_ROW_CHANNELS


def _row_pass(N, HW, block_cc, tile, stages, programs):
    """One role's tile of whole pixel rows and the split of each sample's pixels over
    programs; a warp per 512 elements of the tile (16 a thread), 4 to 16 warps. More elements
    a thread spill the backward kernels' registers on sm_90 (``tests/kernel_compile.py``)."""
    block_s = max(2, min(next_power_of_2(HW), tile // block_cc))
    split, s_per = _split(HW, block_s, N, programs)
    return dict(block_s=block_s, split=split, s_per=s_per, stages=stages,
                num_warps=min(16, max(4, block_s * block_cc // 512)))


@functools.lru_cache(maxsize=256)
def _launch_rows(N, G, HW, C, launch: RowLaunch):
    """The reducing and the applying passes' launch shapes (``RowLaunch``), and the block of
    partial sums the group kernel folds at a time."""
    block_cc = max(2, next_power_of_2(C))
    reduce = _row_pass(N, HW, block_cc, launch.reduce_tile, launch.reduce_stages,
                       launch.programs)
    return dict(rows=True, block_cc=block_cc, block_g=max(2, next_power_of_2(C // G)),
                block_p=max(2, min(64, next_power_of_2(reduce["split"]))), reduce=reduce,
                apply=_row_pass(N, HW, block_cc, launch.apply_tile, launch.apply_stages,
                                launch.programs))


def _forward(x, G, weight, bias, eps, scale, shift, x_bias, silu):
    """y, the per-group mean and 1/std (of x + x_bias), and the launch shape (reused by the
    backward pass)."""
    N, C, H, W = x.shape
    HW, Cg = H * W, C // G
    film, has_xb = scale is not None, x_bias is not None
    sc, sh = (scale, shift) if film else (weight, weight)  # never read without FiLM
    xb = x_bias if has_xb else weight  # never read without x_bias
    mean = torch.empty(N * G, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    if _by_rows(x):
        k = _launch_rows(N, G, HW, C, _ROW_LAUNCH)
        r, a = k["reduce"], k["apply"]
        part = torch.empty(N * r["split"] * 2 * C, dtype=torch.float32, device=x.device)
        _gn_rows_stats_kernel[(N, r["split"])](
            x, xb, part, HW, G, C, Cg, r["s_per"], r["split"], BLOCK_S=r["block_s"],
            BLOCK_CC=k["block_cc"], HAS_XB=has_xb, STAGES=r["stages"], num_warps=r["num_warps"])
        _gn_rows_group_kernel[(N * G,)](part, x, xb, mean, rstd, HW, G, C, Cg, r["split"],
                                        float(eps), BLOCK_P=k["block_p"],
                                        BLOCK_G=k["block_g"], FORWARD=True, HAS_XB=has_xb,
                                        num_warps=4)
        _gn_rows_silu_fwd_kernel[(N, a["split"])](
            x, y, mean, rstd, weight, bias, sc, sh, xb, HW, G, C, Cg, sc.stride(0), a["s_per"],
            BLOCK_S=a["block_s"], BLOCK_CC=k["block_cc"], HAS_FILM=film, HAS_XB=has_xb,
            STAGES=a["stages"], SILU=silu, num_warps=a["num_warps"])
        return y, mean, rstd, k
    k = _launch(N, G, HW, Cg, _TILE, _TARGET_PROGRAMS)
    part = torch.empty(N * G * k["split"] * 2, dtype=torch.float32, device=x.device)
    grid = (N * G, k["split"])
    _gn_stats_kernel[grid](x, xb, part, HW, G, Cg, *_strides(x), k["s_per"], k["split"],
                           BLOCK_S=k["block_s"], BLOCK_C=k["block_c"], HAS_XB=has_xb,
                           num_warps=4)
    _gn_silu_fwd_kernel[grid](x, y, part, mean, rstd, weight, bias, sc, sh, xb, HW, G, Cg,
                              *_strides(x), sc.stride(0), k["s_per"], k["split"],
                              float(eps), BLOCK_S=k["block_s"], BLOCK_C=k["block_c"],
                              BLOCK_P=k["block_p"], HAS_FILM=film, HAS_XB=has_xb, SILU=silu,
                              num_warps=4)
    return y, mean, rstd, k


def _strided_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with x's strides (x dense): one offset indexes both."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _backward_rows(x, dy, dp, mean, rstd, weight, bias, sc, sh, xb, G, film, has_xb, silu,
                   k):
    N, C, H, W = x.shape
    HW, Cg = H * W, C // G
    dy = _strided_like(dy, x)
    dx = torch.empty_like(x)
    r, a = k["reduce"], k["apply"]
    part = torch.empty(N * r["split"] * 2 * C, dtype=torch.float32, device=x.device)
    ma, mb = torch.empty_like(mean), torch.empty_like(mean)
    _gn_rows_silu_bwd_stats_kernel[(N, r["split"])](
        x, dy, part, mean, rstd, weight, bias, sc, sh, xb, HW, G, C, Cg, sc.stride(0),
        r["s_per"], r["split"], BLOCK_S=r["block_s"], BLOCK_CC=k["block_cc"], HAS_FILM=film,
        HAS_XB=has_xb, STAGES=r["stages"], SILU=silu, num_warps=r["num_warps"])
    _gn_rows_group_kernel[(N * G,)](part, x, xb, ma, mb, HW, G, C, Cg, r["split"], 0.0,
                                    BLOCK_P=k["block_p"], BLOCK_G=k["block_g"],
                                    FORWARD=False, HAS_XB=has_xb, num_warps=4)
    _gn_rows_silu_bwd_kernel[(N, a["split"])](
        x, dy, dx, dx if dp is None else dp, mean, rstd, ma, mb, weight, bias, sc, sh, xb, HW,
        G, C, Cg, sc.stride(0), a["s_per"], BLOCK_S=a["block_s"], BLOCK_CC=k["block_cc"],
        HAS_FILM=film, HAS_XB=has_xb, HAS_DP=dp is not None, STAGES=a["stages"],
        SILU=silu, num_warps=a["num_warps"])
    return dx


def _backward_groups(x, dy, dp, mean, rstd, weight, bias, sc, sh, xb, G, film, has_xb, silu,
                     k):
    N, C, H, W = x.shape
    HW, Cg = H * W, C // G
    dy = _flat(dy, x)
    dx = torch.empty_like(x)
    part = torch.empty(N * G * k["split"] * 2, dtype=torch.float32, device=x.device)
    grid = (N * G, k["split"])
    _gn_silu_bwd_stats_kernel[grid](
        x, dy, part, mean, rstd, weight, bias, sc, sh, xb, HW, G, Cg, *_strides(x),
        *_strides(dy), sc.stride(0), k["s_per"], k["split"], BLOCK_S=k["block_s"],
        BLOCK_C=k["block_c"], HAS_FILM=film, HAS_XB=has_xb, SILU=silu, num_warps=4)
    _gn_silu_bwd_kernel[grid](
        x, dy, dx, dx if dp is None else dp, part, mean, rstd, weight, bias, sc, sh, xb, HW, G,
        Cg, *_strides(x), *_strides(dy), sc.stride(0), k["s_per"], k["split"],
        BLOCK_S=k["block_s"], BLOCK_C=k["block_c"], BLOCK_P=k["block_p"], HAS_FILM=film,
        HAS_XB=has_xb, HAS_DP=dp is not None, SILU=silu, num_warps=4)
    return dx


class _GroupNormSiLU(torch.autograd.Function):
    """y, or (y, x) with ``pass_x``: x handed on (as a view) to the op beside the norm, whose
    gradient the kernel writing dx adds, instead of autograd in a pass of its own."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, scale, shift, x_bias, silu, pass_x):
        y, mean, rstd, k = _forward(x, num_groups, weight, bias, eps, scale, shift, x_bias,
                                    silu)
        film, has_xb = scale is not None, x_bias is not None
        sc, sh = (scale, shift) if film else (weight, weight)
        ctx.save_for_backward(x, mean, rstd, weight, bias, sc, sh,
                              x_bias if has_xb else weight)
        ctx.num_groups, ctx.film, ctx.has_xb, ctx.silu, ctx.launch = (num_groups, film, has_xb,
                                                                      silu, k)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return (y, x) if pass_x else y

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, dy, dp=None):
        x, mean, rstd, weight, bias, sc, sh, xb = ctx.saved_tensors
        nones = (None,) * 9
        if dy is None:  # only the passed-on x was used
            return (None if dp is None else _strided_like(dp, x),) + nones
        if dp is not None:
            dp = _strided_like(dp, x)
        backward = _backward_rows if ctx.launch["rows"] else _backward_groups
        return (backward(x, dy, dp, mean, rstd, weight, bias, sc, sh, xb, ctx.num_groups,
                         ctx.film, ctx.has_xb, ctx.silu, ctx.launch),) + nones


def group_norm_silu_triton(x, num_groups, weight, bias, eps, scale=None, shift=None,
                           x_bias=None, pass_x=False, silu=True):
    """Fused Triton version of :func:`group_norm_silu_torch`; differentiable in ``x`` only.
    ``pass_x``: return (y, x), x to use beside the norm (a ResBlock's skip path), so that its
    gradient is added to the norm's by the kernel that writes dx. ``silu=False``: the norm
    alone (an attention block's)."""
    if triton is None:
        raise ValueError("group_norm_silu_triton needs the triton package, which is not installed")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"group_norm_silu: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    N, C = x.shape[:2]
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"group_norm_silu: the triton backend takes fp32/fp16/bf16, got "
                         f"{x.dtype}; use the torch twin for it")
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_silu: {C} channels do not split into {num_groups} groups")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_silu: give both scale and shift, or neither")
    weight = x.new_ones(C) if weight is None else weight
    bias = x.new_zeros(C) if bias is None else bias
    params = {"weight": weight, "bias": bias}
    if scale is not None:
        params["scale"] = scale = scale.reshape(N, C)
        params["shift"] = shift = shift.reshape(N, C)
    if x_bias is not None:
        if x_bias.numel() != C:
            raise ValueError(f"group_norm_silu: x_bias must have one value per channel ({C}), "
                             f"got shape {tuple(x_bias.shape)}")
        params["x_bias"] = x_bias = x_bias.reshape(C).contiguous()
    for name, t in params.items():
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"group_norm_silu: the triton backend differentiates to x only "
                             f"(a frozen prior), but {name} requires grad")
        if t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device}, x on {x.device}")
    weight, bias = weight.reshape(C).contiguous(), bias.reshape(C).contiguous()
    if scale is not None and (scale.stride(1) != 1 or shift.stride() != scale.stride()):
        scale, shift = scale.contiguous(), shift.contiguous()  # one row stride for both
    x = _dense(x)
    if x.numel() == 0:
        return (torch.empty_like(x), x) if pass_x else torch.empty_like(x)
    if x.requires_grad and torch.is_grad_enabled():
        return _GroupNormSiLU.apply(x, num_groups, weight, bias, eps, scale, shift, x_bias,
                                    silu, pass_x)
    y = _forward(x.detach(), num_groups, weight, bias, eps, scale, shift, x_bias, silu)[0]
    return (y, x) if pass_x else y
