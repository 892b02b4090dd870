"""GroupNorm (+ FiLM) (+ SiLU) on a (target, difference) pair: ``g(a + d) - g(a)`` without
cancellation (see :mod:`diffloss_fast.ops.difference` for why the prior runs on pairs).

From the statistics of ``a``, of ``d`` and their covariance: with centred ``ca``, ``cd`` and
``s = 1/sqrt(var + eps)``, ``norm(a + d) - norm(a) = cd * s_r + ca * (s_r - s_a)``, where
``s_r - s_a = -(2 cov + var_d) * s_a * s_r / (sigma_a + sigma_r)``. FiLM (``* (1 + scale) +
shift``, the same for both branches) is linear in the difference. SiLU:
``silu(u + e) - silu(u) = e * sig(u + e) + u * sig(u + e) * (1 - sig(u)) * -expm1(-e)``.

The backward is the plain op's at the restored point ``r = a + d``, which the forward saves.

Two implementations: :func:`group_norm_silu_difference_torch`, the twin that defines the op,
and the Triton kernels of :func:`group_norm_silu_difference_triton`, which read channels_last
pairs the way :mod:`.group_norm_silu` reads one activation (whole pixel rows of a sample per
program, per-channel partial sums folded into groups by a small kernel) and share its helpers
and launch shape:

- the statistics kernel reads ``a`` and ``d`` once and keeps per-channel partial sums of
  ``a + x_bias`` and ``d / d_scale``, their squares and their product, each shifted by the
  first element of its group so that the variances and the covariance stay accurate when a
  group's mean is far larger than its spread;
- the group kernel folds them into ``mean_a``, ``s_a``, ``mean_d``, ``s_r``, ``s_r - s_a``
  (by the form above, which never subtracts the two) and ``mean_r = mean_a + mean_d``;
- the apply kernel reads the pair again and computes in fp32 registers ``na = ca * s_a``,
  ``nd = cd * s_r + ca * (s_r - s_a)``, the affine and FiLM terms and the SiLU difference, and
  writes ``g(a)``, the difference times ``d_scale``, and, when a backward will follow, ``r`` in
  d's dtype. ``expm1`` is a Taylor polynomial where ``exp(x) - 1`` would cancel (``|x| <
  1/2``), and from ``|e| = 1`` on the SiLU difference is taken directly, at the cost of an
  fp32 ulp of ``silu(u)`` and without the overflow of ``expm1(-e)`` (see
  ``_silu_difference_f32``).

``d_scale`` stays a device tensor the kernels read: the pair pass runs inside CUDA graphs,
where a host read would be a sync (and a stale value on replay). The backward runs
:mod:`.group_norm_silu`'s backward kernels on the saved ``r`` with ``mean_r`` and ``s_r``
from the forward's group kernel, so it recomputes no mean or variance of ``r``; ``d_scale``
cancels there (the gradient of ``out * s`` with respect to ``d`` at ``d / s`` is ``g'(r)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton_common import TRITON_DTYPES, next_power_of_2, require_triton, triton, tl
from .autocast import without_autocast
from .difference import to_accumulation as _acc
from .group_norm_silu import (_CL, _MAX_CHANNELS, _backward, _launch, _layout,
                              group_norm_silu_torch, norm_parameters)

if triton is not None:
    from .group_norm_silu import _row_channels, _rows, _x_bias


def _silu_difference(u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``silu(u + e) - silu(u)``, fp32, without cancellation: the stable form for |e| < 1,
    the difference itself beyond, where it cancels little and the stable form's ``expm1(-e)``
    would overflow (as the kernels' :func:`_silu_difference_f32`)."""
    sig_r = torch.sigmoid(u + e)
    stable = e * sig_r + u * sig_r * torch.sigmoid(-u) * -torch.expm1(-e)
    direct = (u + e) * sig_r - u * torch.sigmoid(u)
    return torch.where(e.abs() < 1, stable, direct)


def _group_norm_pair(a, d, num_groups, eps):
    """``(norm(a), norm(a + d) - norm(a))`` in fp32, no affine: from per-group statistics of a,
    d and their covariance."""
    n, c = a.shape[:2]
    ag, dg = _acc(a).reshape(n, num_groups, -1), _acc(d).reshape(n, num_groups, -1)
    ca, cd = ag - ag.mean(-1, keepdim=True), dg - dg.mean(-1, keepdim=True)
    var_a = ca.square().mean(-1, keepdim=True)
    extra = 2 * (ca * cd).mean(-1, keepdim=True) + cd.square().mean(-1, keepdim=True)
    sigma_a = (var_a + eps).sqrt()
    sigma_r = (var_a + extra).clamp_min(0).add(eps).sqrt()
    s_a, s_r = sigma_a.reciprocal(), sigma_r.reciprocal()
    ds = -extra * s_a * s_r / (sigma_a + sigma_r)
    shape = a.shape
    return (ca * s_a).reshape(shape), (cd * s_r + ca * ds).reshape(shape)


def group_norm_silu_difference_torch(a, d, d_scale, num_groups, weight, bias, eps, scale=None,
                                     shift=None, x_bias=None, silu=True):
    """``(g(a), (g(a + d / d_scale) - g(a)) * d_scale)`` for g the prior's GroupNorm (+ FiLM)
    (+ SiLU) of :func:`group_norm_silu_torch`, in fp32, rounded once to a's dtype. ``x_bias``
    is added to ``a`` only (a bias is part of the target's activation, never of the
    difference)."""
    af = _acc(a)
    if x_bias is not None:
        af = af + _acc(x_bias).reshape(1, -1, 1, 1)
    na, nd = _group_norm_pair(af, _acc(d) / d_scale, num_groups, eps)
    w, b = _acc(weight).reshape(1, -1, 1, 1), _acc(bias).reshape(1, -1, 1, 1)
    ya, yd = na * w + b, nd * w
    if scale is not None:
        view = lambda v: _acc(v).reshape(a.shape[0], a.shape[1], 1, 1)  # noqa: E731
        gain = 1 + view(scale)
        ya, yd = ya * gain + view(shift), yd * gain
    if silu:
        ya, yd = F.silu(ya), _silu_difference(ya, yd)
    return ya.to(a.dtype), (yd * d_scale).to(d.dtype)


class _GroupNormSiLUDifference(torch.autograd.Function):
    """Forward: the stable difference; backward: the plain op's backward at ``r = a + d``."""

    @staticmethod
    def forward(ctx, d, a, d_scale, num_groups, weight, bias, eps, scale, shift, x_bias, silu):
        ya, yd = group_norm_silu_difference_torch(a, d, d_scale, num_groups, weight, bias, eps,
                                                  scale, shift, x_bias, silu)
        ctx.save_for_backward((_acc(a) + _acc(d) / d_scale).to(d.dtype), weight, bias, scale,
                              shift, x_bias)
        ctx.config = num_groups, eps, silu
        ctx.mark_non_differentiable(ya)
        return ya, yd

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, _grad_a, grad_d):
        r, weight, bias, scale, shift, x_bias = ctx.saved_tensors
        num_groups, eps, silu = ctx.config
        with torch.enable_grad():
            x = _acc(r).requires_grad_(True)
            f = lambda v: None if v is None else v.to(x.dtype)  # noqa: E731
            y = group_norm_silu_torch(x, num_groups, f(weight), f(bias), eps, f(scale),
                                      f(shift), f(x_bias), False, silu)
            (grad_x,) = torch.autograd.grad(y, x, grad_d.to(x.dtype))
        # d(out * s)/d(d) at d / s is g'(r): the factor cancels
        return grad_x.to(r.dtype), None, None, None, None, None, None, None, None, None, None


def group_norm_silu_difference(a, d, d_scale, num_groups, weight, bias, eps, scale=None,
                               shift=None, x_bias=None, silu=True):
    """``(g(a), (g(a + d / d_scale) - g(a)) * d_scale)``, differentiable to ``d`` only (see
    the module docstring)."""
    if not (torch.is_grad_enabled() and d.requires_grad):
        return group_norm_silu_difference_torch(a, d, d_scale, num_groups, weight, bias, eps,
                                                scale, shift, x_bias, silu)
    return _GroupNormSiLUDifference.apply(d, a.detach(), d_scale, num_groups, weight, bias, eps,
                                          scale, shift, x_bias, silu)


# --- the Triton kernels --------------------------------------------------------------------

_SUMS = 5  # partial sums per channel: a, d, a * a, d * d, a * d (each shifted)
# a convolution epilogue's partials per (pixel tile, channel): see _gnd_tile_fold_kernel
TILE_PARTIALS = 7
_STATS = 6  # per (sample, group): mean_a, s_a, mean_d, s_r, s_r - s_a, mean_r

if triton is not None:

    @triton.jit
    def _expm1(x):
        """exp(x) - 1 to fp32 rounding for |x| < 1: for |x| < 1/2, where exp(x) - 1 would
        cancel, its Taylor polynomial to x**8 (the rest is below 2**-26 of the result)."""
        p = x * (1.0 / 40320.0) + (1.0 / 5040.0)
        p = p * x + (1.0 / 720.0)
        p = p * x + (1.0 / 120.0)
        p = p * x + (1.0 / 24.0)
        p = p * x + (1.0 / 6.0)
        p = p * x + 0.5
        p = p * x + 1.0
        return tl.where(tl.abs(x) < 0.5, p * x, tl.exp(x) - 1.0)

    @triton.jit
    def _silu_difference_f32(u, e):
        """silu(u + e) - silu(u) in fp32, within a few fp32 ulps of |e|: for |e| < 1, e *
        sig(u + e) + u * (sig(u + e) - sig(u)), the second difference as sig(u + e) * sig(-u)
        * -expm1(-e), which cancels nothing. From |e| = 1 on, the difference itself: it errs by
        an ulp of silu(u), at most |u| ulps of |e|, and needs neither exp(-e), which overflows
        for large negative e, nor its product with sig(u + e), whose relative error grows with
        |u + e|."""
        sig_r = tl.sigmoid(u + e)
        stable = e * sig_r + u * sig_r * tl.sigmoid(-u) * -_expm1(-e)
        direct = (u + e) * sig_r - u * tl.sigmoid(u)
        return tl.where(tl.abs(e) < 1.0, stable, direct)

    @triton.jit
    def _d_scale(ds_ptr):
        """d_scale, read on the device (the pass runs in CUDA graphs: no host read), and its
        reciprocal, exact for a power of two: d * inv is d / d_scale."""
        s = tl.load(ds_ptr).to(tl.float32)
        return s, 1.0 / s

    @triton.jit
    def _cat_load(p1, p2, pix, c, C1, C2, mask, TWO: tl.constexpr):
        """fp32 values at pixels pix (n * HW + p, int64) and channels c of x1 (C1 channels) or,
        with TWO, of the channel concatenation [x1, x2] (x2's C2 channels after x1's), both
        channels_last, read in place: the decoder's concatenated input, never copied."""
        if TWO:
            first = c < C1
            x1 = tl.load(p1 + pix * C1 + c, mask=mask & first, other=0.0).to(tl.float32)
            x2 = tl.load(p2 + pix * C2 + tl.where(first, 0, c - C1), mask=mask & (c >= C1),
                         other=0.0).to(tl.float32)
            return tl.where(first, x1, x2)
        return tl.load(p1 + pix * C1 + c, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _gnd_stats_kernel(a_ptr, d_ptr, a2_ptr, d2_ptr, ds_ptr, xb_ptr, part_ptr, HW, G, C, C1,
                          Cg: tl.constexpr, S_PER, SPLIT, BLOCK_S: tl.constexpr,
                          BLOCK_CC: tl.constexpr, HAS_XB: tl.constexpr, TWO: tl.constexpr):
        """Per-channel partial sums over a slice of pixels of va = a + x_bias - ka and vd = d /
        d_scale - kd, of their squares and of va * vd, ka and kd the first elements of the
        channel's group (shifted sums keep variances and covariance accurate when |mean| >>
        std): part[n, sp, 0..4, c]. With TWO, a and d are the concatenations [a, a2] and
        [d, d2] (C1 channels from the first of each)."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        _, inv = _d_scale(ds_ptr)
        c, cm, _ = _row_channels(n, G, C, Cg, BLOCK_CC)
        first = (c // Cg) * Cg
        pix0 = n.to(tl.int64) * HW
        ka = _cat_load(a_ptr, a2_ptr, pix0, first, C1, C - C1, cm, TWO) \
            + _x_bias(xb_ptr, first, cm, HAS_XB) - _x_bias(xb_ptr, c, cm, HAS_XB)
        kd = _cat_load(d_ptr, d2_ptr, pix0, first, C1, C - C1, cm, TWO) * inv
        sa = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        sd = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        saa = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        sdd = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        sad = tl.zeros([BLOCK_S, BLOCK_CC], tl.float32)
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=1):
            s = start + tl.arange(0, BLOCK_S)
            mask = (s < HW)[:, None] & cm[None, :]
            pix = (pix0 + s)[:, None]
            va = tl.where(mask, _cat_load(a_ptr, a2_ptr, pix, c[None, :], C1, C - C1, mask, TWO)
                          - ka[None, :], 0.0)
            vd = tl.where(mask, _cat_load(d_ptr, d2_ptr, pix, c[None, :], C1, C - C1, mask, TWO)
                          * inv - kd[None, :], 0.0)
            sa += va
            sd += vd
            saa += va * va
            sdd += vd * vd
            sad += va * vd
        p = part_ptr + (n * SPLIT + sp).to(tl.int64) * 5 * C + c
        tl.store(p, tl.sum(sa, axis=0), mask=cm)
        tl.store(p + C, tl.sum(sd, axis=0), mask=cm)
        tl.store(p + 2 * C, tl.sum(saa, axis=0), mask=cm)
        tl.store(p + 3 * C, tl.sum(sdd, axis=0), mask=cm)
        tl.store(p + 4 * C, tl.sum(sad, axis=0), mask=cm)

    @triton.jit
    def _gnd_group_kernel(part_ptr, a_ptr, d_ptr, a2_ptr, d2_ptr, ds_ptr, xb_ptr, st_ptr, NG, HW,
                          G, C, C1, Cg: tl.constexpr, SPLIT, eps, BLOCK_P: tl.constexpr,
                          BLOCK_G: tl.constexpr, HAS_XB: tl.constexpr, TWO: tl.constexpr):
        """One (sample, group): fold its channels' shifted partial sums into st[0..5, ng] =
        mean_a, s_a, mean_d, s_r, s_r - s_a (without subtracting the two) and mean_r."""
        ng = tl.program_id(0)
        n = ng // G
        g = ng % G
        j = tl.arange(0, BLOCK_G)
        sa = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        sd = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        saa = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        sdd = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        sad = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        for p0 in range(0, SPLIT, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p < SPLIT)[:, None] & (j < Cg)[None, :]
            off = (n * SPLIT + p[:, None]).to(tl.int64) * 5 * C + g * Cg + j[None, :]
            sa += tl.load(part_ptr + off, mask=m, other=0.0)
            sd += tl.load(part_ptr + off + C, mask=m, other=0.0)
            saa += tl.load(part_ptr + off + 2 * C, mask=m, other=0.0)
            sdd += tl.load(part_ptr + off + 3 * C, mask=m, other=0.0)
            sad += tl.load(part_ptr + off + 4 * C, mask=m, other=0.0)
        count = HW * Cg * 1.0
        ma = tl.sum(tl.sum(sa, axis=1), axis=0) / count
        md = tl.sum(tl.sum(sd, axis=1), axis=0) / count
        var_a = tl.sum(tl.sum(saa, axis=1), axis=0) / count - ma * ma
        var_d = tl.sum(tl.sum(sdd, axis=1), axis=0) / count - md * md
        cov = tl.sum(tl.sum(sad, axis=1), axis=0) / count - ma * md
        _, inv = _d_scale(ds_ptr)
        pix0 = n.to(tl.int64) * HW
        mean_a = _cat_load(a_ptr, a2_ptr, pix0, g * Cg, C1, C - C1, True, TWO) + ma
        if HAS_XB:
            mean_a += tl.load(xb_ptr + g * Cg).to(tl.float32)
        mean_d = _cat_load(d_ptr, d2_ptr, pix0, g * Cg, C1, C - C1, True, TWO) * inv + md
        _store_statistics(st_ptr, NG, ng, mean_a, mean_d, var_a, var_d, cov, eps)

    @triton.jit
    def _store_statistics(st_ptr, NG, ng, mean_a, mean_d, var_a, var_d, cov, eps):
        """st[0..5, ng] = mean_a, s_a, mean_d, s_r, s_r - s_a (without subtracting the two)
        and mean_r of a group from its means, variances and covariance."""
        var_a = tl.maximum(var_a, 0.0)
        extra = 2.0 * cov + var_d  # var_r - var_a
        sigma_a = tl.sqrt(var_a + eps)
        sigma_r = tl.sqrt(tl.maximum(var_a + extra, 0.0) + eps)
        s_a = 1.0 / sigma_a
        s_r = 1.0 / sigma_r
        tl.store(st_ptr + ng, mean_a)
        tl.store(st_ptr + NG + ng, s_a)
        tl.store(st_ptr + 2 * NG + ng, mean_d)
        tl.store(st_ptr + 3 * NG + ng, s_r)
        tl.store(st_ptr + 4 * NG + ng, -extra * s_a * s_r / (sigma_a + sigma_r))
        tl.store(st_ptr + 5 * NG + ng, mean_a + mean_d)

    @triton.jit
    def _tile_partials(part_ptr, n, g, j, p0, ra, rd, HW, C, Cg: tl.constexpr, TILES, TILE_M,
                       BLOCK_P: tl.constexpr):
        """Tiles p0 .. p0 + BLOCK_P of a group's epilogue partials (channels j of group g):
        their mask and offsets, pixel counts n_t, and shifts relative to R (ka - ra, kd - rd)
        with the shifted sums of a and d."""
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < TILES)[:, None] & (j < Cg)[None, :]
        off = (n * TILES + p[:, None]).to(tl.int64) * 7 * C + g * Cg + j[None, :]
        n_t = tl.maximum(tl.minimum(HW - p * TILE_M, TILE_M), 1).to(tl.float32)[:, None]
        return (m, off, n_t, tl.load(part_ptr + off + 5 * C, mask=m, other=0.0) - ra,
                tl.load(part_ptr + off, mask=m, other=0.0),
                tl.load(part_ptr + off + 6 * C, mask=m, other=0.0) - rd,
                tl.load(part_ptr + off + C, mask=m, other=0.0))

    @triton.jit
    def _gnd_tile_fold_kernel(part_ptr, st_ptr, NG, HW, G, C, Cg: tl.constexpr, TILES, TILE_M,
                              eps, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr):
        """One (sample, group): its statistics from the per-(pixel tile, channel) partials a
        convolution's epilogue writes (tiles of TILE_M pixels, the last ragged),
        part[n, tile, 0..6, c] = the tile's sums of a - ka and d - kd (x_bias and 1 / d_scale
        applied), the second moments of a and d about the tile's own means, and its shifts ka,
        kd. Chan's parallel formulas, about the group's first element R: each tile's mean
        offset from R is (k - R) + sum / n_t, the group's mean offset mu their weighted mean,
        and the group's second moments the tiles' plus n_t times the products of their mean
        offsets from mu. Every term is of the size of the spread, however far the mean lies
        from it: nothing cancels."""
        ng = tl.program_id(0)
        n = ng // G
        g = ng % G
        j = tl.arange(0, BLOCK_G)
        first = (n * TILES).to(tl.int64) * 7 * C + g * Cg
        ra = tl.load(part_ptr + first + 5 * C)
        rd = tl.load(part_ptr + first + 6 * C)
        sa = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        sd = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        for p0 in range(0, TILES, BLOCK_P):
            m, off, n_t, ka, s1a, kd, s1d = _tile_partials(part_ptr, n, g, j, p0, ra, rd, HW, C,
                                                           Cg, TILES, TILE_M, BLOCK_P)
            sa += tl.where(m, n_t * ka + s1a, 0.0)
            sd += tl.where(m, n_t * kd + s1d, 0.0)
        count = HW * Cg * 1.0
        mu_a = tl.sum(tl.sum(sa, axis=1), axis=0) / count
        mu_d = tl.sum(tl.sum(sd, axis=1), axis=0) / count
        maa = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        mdd = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        mad = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
        for p0 in range(0, TILES, BLOCK_P):
            m, off, n_t, ka, s1a, kd, s1d = _tile_partials(part_ptr, n, g, j, p0, ra, rd, HW, C,
                                                           Cg, TILES, TILE_M, BLOCK_P)
            oa = ka + s1a / n_t - mu_a
            od = kd + s1d / n_t - mu_d
            maa += tl.load(part_ptr + off + 2 * C, mask=m, other=0.0) \
                + tl.where(m, n_t * oa * oa, 0.0)
            mdd += tl.load(part_ptr + off + 3 * C, mask=m, other=0.0) \
                + tl.where(m, n_t * od * od, 0.0)
            mad += tl.load(part_ptr + off + 4 * C, mask=m, other=0.0) \
                + tl.where(m, n_t * oa * od, 0.0)
        _store_statistics(st_ptr, NG, ng, ra + mu_a, rd + mu_d,
                          tl.sum(tl.sum(maa, axis=1), axis=0) / count,
                          tl.sum(tl.sum(mdd, axis=1), axis=0) / count,
                          tl.sum(tl.sum(mad, axis=1), axis=0) / count, eps)

    @triton.jit
    def _gnd_fwd_kernel(a_ptr, d_ptr, ds_ptr, ya_ptr, yd_ptr, r_ptr, st_ptr, NG, w_ptr, b_ptr,
                        sc_ptr, sh_ptr, xb_ptr, HW, G, C, Cg: tl.constexpr, scN, S_PER,
                        BLOCK_S: tl.constexpr, BLOCK_CC: tl.constexpr, HAS_FILM: tl.constexpr,
                        HAS_XB: tl.constexpr, SILU: tl.constexpr, SAVE_R: tl.constexpr):
        """ya = g(a), yd = (g(a + d / d_scale) - g(a)) * d_scale and, with SAVE_R, r = a + d /
        d_scale (in d's dtype, for the backward), over a slice of pixels."""
        n = tl.program_id(0)
        sp = tl.program_id(1)
        s, inv = _d_scale(ds_ptr)
        c, cm, grp = _row_channels(n, G, C, Cg, BLOCK_CC)
        centre = tl.load(st_ptr + grp, mask=cm, other=0.0) - _x_bias(xb_ptr, c, cm, HAS_XB)
        s_a = tl.load(st_ptr + NG + grp, mask=cm, other=0.0)
        mean_d = tl.load(st_ptr + 2 * NG + grp, mask=cm, other=0.0)
        s_r = tl.load(st_ptr + 3 * NG + grp, mask=cm, other=0.0)
        ds = tl.load(st_ptr + 4 * NG + grp, mask=cm, other=0.0)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        add = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_FILM:
            gain = 1.0 + tl.load(sc_ptr + n.to(tl.int64) * scN + c, mask=cm,
                                 other=0.0).to(tl.float32)
            w = w * gain
            add = add * gain + tl.load(sh_ptr + n.to(tl.int64) * scN + c, mask=cm,
                                       other=0.0).to(tl.float32)
        # ua = ca * s_a * w + add, e = (cd * s_r + ca * ds) * w; ca, cd formed first, exactly
        # where the mean dwarfs the spread
        mul_a = s_a * w
        mul_d = s_r * w
        mul_x = ds * w
        for start in tl.range(sp * S_PER, (sp + 1) * S_PER, BLOCK_S, num_stages=1):
            off, mask = _rows(n, start, HW, C, BLOCK_S, BLOCK_CC)
            a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32) * inv
            ca = a - centre[None, :]
            ua = ca * mul_a[None, :] + add[None, :]
            e = (d - mean_d[None, :]) * mul_d[None, :] + ca * mul_x[None, :]
            if SILU:
                ya = ua * tl.sigmoid(ua)
                e = _silu_difference_f32(ua, e)
            else:
                ya = ua
            tl.store(ya_ptr + off, ya.to(ya_ptr.dtype.element_ty), mask=mask)
            tl.store(yd_ptr + off, (e * s).to(yd_ptr.dtype.element_ty), mask=mask)
            if SAVE_R:
                tl.store(r_ptr + off, (a + d).to(r_ptr.dtype.element_ty), mask=mask)


def _statistics(a, d, d_scale, G, eps, xb, has_xb, concat=None):
    """The (_STATS, N * G) statistics of the pair (a + x_bias, d / d_scale) and the launch
    shape; a and d channels_last, ``xb`` x_bias (any tensor when ``has_xb`` is False).
    ``concat``: (a2, d2), channels_last, whose channels follow a's and d's."""
    N, C1, H, W = a.shape
    a2, d2 = concat if concat is not None else (a, d)
    C = C1 + (a2.shape[1] if concat is not None else 0)
    HW, Cg = H * W, C // G
    k = _launch(N, G, HW, C)
    part = torch.empty(N * k.split * _SUMS * C, dtype=torch.float32, device=a.device)
    stats = torch.empty(_STATS, N * G, dtype=torch.float32, device=a.device)
    two = concat is not None
    _gnd_stats_kernel[(N, k.split)](a, d, a2, d2, d_scale, xb, part, HW, G, C, C1, Cg, k.s_per,
                                    k.split, BLOCK_S=k.block_s, BLOCK_CC=k.block_cc,
                                    HAS_XB=has_xb, TWO=two, num_warps=k.num_warps)
    _gnd_group_kernel[(N * G,)](part, a, d, a2, d2, d_scale, xb, stats, N * G, HW, G, C, C1, Cg,
                                k.split, float(eps), BLOCK_P=k.block_p, BLOCK_G=k.block_g,
                                HAS_XB=has_xb, TWO=two, num_warps=4)
    return stats, k


def fold_tile_statistics(part: torch.Tensor, HW: int, tile_m: int, num_groups: int,
                         eps: float) -> torch.Tensor:
    """The (_STATS, N * num_groups) statistics from a convolution epilogue's partials
    ``part`` (N, tiles, TILE_PARTIALS, C), fp32, tiles of ``tile_m`` pixels of HW (see
    :func:`_gnd_tile_fold_kernel`)."""
    N, tiles, _, C = part.shape
    Cg = C // num_groups
    stats = torch.empty(_STATS, N * num_groups, dtype=torch.float32, device=part.device)
    _gnd_tile_fold_kernel[(N * num_groups,)](
        part, stats, N * num_groups, HW, num_groups, C, Cg, tiles, tile_m, float(eps),
        BLOCK_P=max(2, min(64, next_power_of_2(tiles))), BLOCK_G=max(2, next_power_of_2(Cg)),
        num_warps=4)
    return stats


def pair_statistics_triton(a, d, d_scale, num_groups, eps, x_bias=None,
                           concat=None) -> torch.Tensor:
    """The statistics of the pair norm alone, for a kernel that applies the norm itself (the
    fused convolution's prologue, :mod:`.pair_conv`): a (6, N * num_groups) fp32 tensor of
    rows mean_a (of a + x_bias), s_a, mean_d (of d / d_scale), s_r, s_r - s_a and mean_r. No
    gradient; a and d are read in place when channels_last (else copied). ``concat``:
    ``(a2, d2)``, the statistics of the channel concatenations ``[a, a2]``, ``[d, d2]``, read
    in place (x_bias then has one value per channel of the concatenation)."""
    require_triton("pair_statistics_triton")
    if not isinstance(d_scale, torch.Tensor):
        d_scale = torch.tensor(float(d_scale), dtype=torch.float32, device=a.device)
    cl = lambda t: t.detach().contiguous(memory_format=torch.channels_last)  # noqa: E731
    a, d = cl(a), cl(d)
    if concat is not None:
        concat = tuple(cl(t) for t in concat)
    has_xb = x_bias is not None
    xb = x_bias.reshape(-1).contiguous() if has_xb else a
    return _statistics(a, d, d_scale, num_groups, eps, xb, has_xb, concat)[0]


def _pair_forward(a, d, d_scale, G, weight, bias, eps, scale, shift, x_bias, silu, save_r):
    """ya, yd, r (None unless save_r), the (_STATS, N * G) statistics and the launch shape;
    a and d channels_last."""
    N, C, H, W = a.shape
    HW, Cg = H * W, C // G
    film, has_xb = scale is not None, x_bias is not None
    sc, sh = (scale, shift) if film else (weight, weight)  # never read without FiLM
    xb = x_bias if has_xb else weight  # never read without x_bias
    stats, k = _statistics(a, d, d_scale, G, eps, xb, has_xb)
    ya, yd = torch.empty_like(a), torch.empty_like(d)
    r = torch.empty_like(d) if save_r else None
    _gnd_fwd_kernel[(N, k.split)](a, d, d_scale, ya, yd, yd if r is None else r, stats, N * G,
                                  weight, bias, sc, sh, xb, HW, G, C, Cg, sc.stride(0),
                                  k.s_per, BLOCK_S=k.block_s, BLOCK_CC=k.block_cc,
                                  HAS_FILM=film, HAS_XB=has_xb, SILU=silu, SAVE_R=save_r,
                                  num_warps=k.num_warps)
    return ya, yd, r, stats, k


class _GroupNormSiLUDifferenceTriton(torch.autograd.Function):
    """The kernels' forward; backward: :mod:`.group_norm_silu`'s backward kernels at the
    saved ``r`` with the forward's ``mean_r`` and ``s_r``."""

    @staticmethod
    def forward(ctx, d, a, d_scale, num_groups, weight, bias, eps, scale, shift, x_bias, silu):
        ya, yd, r, stats, k = _pair_forward(
            a.contiguous(memory_format=_CL), d.contiguous(memory_format=_CL), d_scale,
            num_groups, weight, bias, eps, scale, shift, x_bias, silu, save_r=True)
        film, has_xb = scale is not None, x_bias is not None
        sc, sh = (scale, shift) if film else (weight, weight)
        ctx.save_for_backward(r, stats, weight, bias, sc, sh, x_bias if has_xb else weight)
        ctx.config = num_groups, film, has_xb, silu, k
        ctx.layout = _layout(d)
        ctx.set_materialize_grads(False)  # ya is never differentiated
        ya, yd = ya.contiguous(memory_format=_layout(a)), yd.contiguous(memory_format=ctx.layout)
        ctx.mark_non_differentiable(ya)
        return ya, yd

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, _grad_a, grad_d):
        nones = (None,) * 10
        if grad_d is None:
            return (None,) + nones
        r, stats, weight, bias, sc, sh, xb = ctx.saved_tensors
        num_groups, film, has_xb, silu, k = ctx.config
        # d(out * s)/d(d) at d / s is g'(r): the factor cancels
        dx = _backward(r, grad_d.contiguous(memory_format=_CL), None, stats[5], stats[3],
                       weight, bias, sc, sh, xb, num_groups, film, has_xb, silu, k)
        return (dx.contiguous(memory_format=ctx.layout),) + nones


def group_norm_silu_difference_triton(a, d, d_scale, num_groups, weight, bias, eps, scale=None,
                                      shift=None, x_bias=None, silu=True):
    """Triton kernels for :func:`group_norm_silu_difference`: ``(g(a), (g(a + d / d_scale) -
    g(a)) * d_scale)``, differentiable to ``d`` only (``a`` is detached, ``g(a)`` carries no
    gradient; the prior's weight, bias, scale and shift must not require grad). ``d_scale``: a
    one-element tensor on a's device, read by the kernels (a number is made one). Results
    keep their inputs' layouts. Rows wider than the kernels hold (no ADM prior has them) take
    the twin."""
    require_triton("group_norm_silu_difference_triton")
    for name, t in (("a", a), ("d", d)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"group_norm_silu_difference: {name} must be a 4-D (N, C, H, W) tensor, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"group_norm_silu_difference: the triton backend takes "
                             f"fp32/fp16/bf16, got {name} in {t.dtype}; use the torch twin")
    if a.shape != d.shape:
        raise ValueError(f"group_norm_silu_difference: a {tuple(a.shape)} and d "
                         f"{tuple(d.shape)} differ in shape")
    C = a.shape[1]
    if not isinstance(d_scale, torch.Tensor):
        d_scale = torch.tensor(float(d_scale), dtype=torch.float32, device=a.device)
    if d_scale.numel() != 1 or not d_scale.is_floating_point():
        raise ValueError(f"group_norm_silu_difference: d_scale must be one floating-point "
                         f"value, got {d_scale.dtype} of shape {tuple(d_scale.shape)}")
    if d_scale.device != a.device or d.device != a.device:
        raise ValueError(f"group_norm_silu_difference: d on {d.device} and d_scale on "
                         f"{d_scale.device}, a on {a.device}")
    weight, bias, scale, shift, x_bias = norm_parameters(
        "group_norm_silu_difference", a, "d", num_groups, weight, bias, scale, shift, x_bias)
    if C > _MAX_CHANNELS:
        return group_norm_silu_difference(a, d, d_scale, num_groups, weight, bias, eps, scale,
                                          shift, x_bias, silu)
    if a.numel() == 0:
        return (torch.empty_like(a, memory_format=_layout(a)),
                torch.empty_like(d, memory_format=_layout(d)))
    a = a.detach()
    if d.requires_grad and torch.is_grad_enabled():
        return _GroupNormSiLUDifferenceTriton.apply(d, a, d_scale, num_groups, weight, bias,
                                                    eps, scale, shift, x_bias, silu)
    ya, yd = _pair_forward(a.contiguous(memory_format=_CL),
                           d.detach().contiguous(memory_format=_CL), d_scale, num_groups,
                           weight, bias, eps, scale, shift, x_bias, silu, save_r=False)[:2]
    return ya.contiguous(memory_format=_layout(a)), yd.contiguous(memory_format=_layout(d))
