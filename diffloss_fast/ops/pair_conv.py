"""A stride-1 convolution of a (target, difference) pair, with the GroupNorm (+ FiLM) + SiLU
before it and the bias and residual sum after it fused into its kernel.

In the pair pass (:mod:`diffloss_fast.ops.difference`) every ResBlock convolution reads the
output of a pair norm: ``ya = g(a)`` and ``yd = (g(a + d / s) - g(a)) * s`` for g the
GroupNorm (+ FiLM) (+ SiLU) and s the difference's power-of-two scale. Unfused, the norm
writes ``ya`` and ``yd`` (two activations) for the convolutions to read back, and the bias and
the ResBlock's residual sum each take a pass over the outputs of their own. Here an implicit
GEMM convolution applies the norm to each input tile as it loads it (from per-(sample, group)
statistics computed beforehand, :func:`pair_norm_statistics`), so the normalized pair is never
written or read; its epilogue adds the bias to the target's output and the residual pair to
both outputs before the single store.

The GEMM: rows are output pixels of one sample, columns output channels, the reduction runs
over (tap, input channel). The target's rows and the difference's rows meet the same weight
tile, loaded once for both: the weight is read once per pair, not once per branch. Zero
padding is applied after the prologue, as the unfused network pads the SiLU's output.

The prologue computes ``g(a + d / s) - g(a)`` in fp32 from forms without cancellation (those
of :mod:`.group_norm_silu_difference`); the GEMM rounds its operands to the storage dtype and
accumulates in fp32. ``a`` and ``out_a`` carry no gradient; the weights are frozen. The
derivative of the difference with respect to ``d`` is the plain op's at the restored point
``r = a + d / s``: the backward is the transposed convolution of the output's gradient
(another implicit GEMM, whose epilogue adds up the norm backward's partial sums,
:mod:`.pair_conv_backward`) followed by the plain GroupNorm + SiLU backward at ``r``, which
the forward kernel writes as it loads ``a`` and ``d`` (one activation saved, the one a
restored branch would keep; the normalized pair is not kept). The residual's gradient passes
on unchanged.

FP8: with ``quantized=`` (:class:`E4M3Operands`) the GEMM runs on e4m3 operands, the
convolution of :mod:`.fp8` (what :class:`~diffloss_fast.fp8_unet.FP8DifferenceUNet` runs
through :func:`~.fp8.e4m3_conv2d`) with the prologue and the epilogue fused around it: each
input tile, after the prologue and its rounding to the storage dtype (where the unfused norm
writes its bf16 output), is divided by its tensor's scale, clamped to ±448 and rounded to
e4m3; the dots multiply e4m3 operands exactly and accumulate in fp32; the epilogue multiplies
each accumulator by ``input_scale * weight_scale[c]``, adds the bias (``a`` only) and the
residual in fp32 and rounds once to the storage dtype. The difference is quantized as it is
stored, times ``d_scale``, at its own scale, as the unfused network quantizes it. The backward
is unchanged: the bf16 dgrad with the unquantized weight, straight through the quantizer.
Delayed scaling (:class:`~.fp8.DelayedScaling`) records each convolution input's amax, but
the fused input is never written: with ``amax_out`` the kernel finds the amax of its operands
as it quantizes them, on the device, for the history.

:func:`pair_conv2d_torch` composes the plain ops (:func:`group_norm_silu_difference_torch`,
``F.conv2d``, and for FP8 :mod:`.fp8`'s quantizer and e4m3 convolution): the definition the
kernels are tested against.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton_common import INT32_MAX, TRITON_DTYPES, cdiv, require_triton
from ._triton_common import triton, tl
from ._conv_common import _conv_launch, _precision
from .autocast import without_autocast
from .difference import to_accumulation as _acc
from .fp8 import E4M3, _E4M3Conv2d, _e4m3_forward, check_device, quantize_weight
from .frozen_conv import _channels_last_weight
from .group_norm_silu import _MAX_CHANNELS
from .group_norm_silu_difference import (TILE_PARTIALS, fold_tile_statistics,
                                         group_norm_silu_difference_torch,
                                         pair_statistics_triton)
from .pair_conv_backward import SavedNorm, pair_conv_input_gradient
from .resample_2x import avg_pool_2x2, upsample_2x_torch

_CL = torch.channels_last
# The 2x resamplings a prologue may end in (the kernel's RESAMPLE): a ResBlock that changes
# resolution resamples its first norm's output before its first convolution.
RESAMPLE_CODES = {None: 0, "up": 1, "down": 2}
# Their twins (guided-diffusion's Upsample and Downsample without convolution), applied to the
# norm's two outputs.
RESAMPLE_TORCH = {"up": upsample_2x_torch, "down": avg_pool_2x2}


def resampled_size(height: int, width: int, resample: str | None) -> tuple[int, int]:
    """The size of a (height, width) input after ``resample`` (see :data:`RESAMPLE_CODES`)."""
    if resample == "up":
        return 2 * height, 2 * width
    if resample == "down":
        return height // 2, width // 2
    return height, width


class PairNormStatistics(NamedTuple):
    """Per-(sample, group) statistics of a pair norm, each (N, G), fp32 (fp64 for fp64)."""
    mean_a: torch.Tensor  # mean of a + x_bias
    rstd_a: torch.Tensor  # 1 / sqrt(var(a) + eps)
    mean_d: torch.Tensor  # mean of d / d_scale
    rstd_r: torch.Tensor  # 1 / sqrt(var(a + d / d_scale) + eps)
    drstd: torch.Tensor   # rstd_r - rstd_a, computed without subtracting them


class PairPrologue(NamedTuple):
    """The pair norm a convolution applies to its input as it loads it: the statistics of
    :func:`pair_norm_statistics` (of the same a, d, d_scale, num_groups, eps and x_bias) and
    the norm's parameters. ``scale``/``shift``: FiLM, (N, C) or (N, C, 1, 1), or None;
    ``x_bias``: (C,), added to a only (the previous convolution's bias), or None."""
    mean_a: torch.Tensor
    rstd_a: torch.Tensor
    mean_d: torch.Tensor
    rstd_r: torch.Tensor
    drstd: torch.Tensor
    num_groups: int
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    x_bias: torch.Tensor | None = None
    silu: bool = True


class NextNorm(NamedTuple):
    """The pair norm that reads a convolution's output, whose statistics the convolution's
    epilogue adds up as it writes the output (no pass of their own): its number of groups,
    its eps, and ``x_bias`` (C_out,), added to out_a before the norm (a bias the convolution
    leaves to it), or None."""
    num_groups: int
    eps: float
    x_bias: torch.Tensor | None = None


class E4M3Operands(NamedTuple):
    """What a convolution on e4m3 operands needs beyond the bf16 one (see :mod:`.fp8`):
    ``weight``, the weight (Cout, Cin, kh, kw) as ``torch.float8_e4m3fn`` with its fp32
    per-output-channel scales ``weight_scale`` (Cout,) (:func:`~.fp8.quantize_weight`), and the
    per-tensor fp32 scales (0-dim, on the device: read by the kernel, never on the host) of
    the convolution's two inputs as it sees them, after the prologue: ``a_scale`` of the
    target's, ``d_scale_q`` of the difference's as stored, times ``d_scale``."""
    weight: torch.Tensor
    weight_scale: torch.Tensor
    a_scale: torch.Tensor
    d_scale_q: torch.Tensor


def e4m3_operands(weight, a_scale, d_scale_q) -> E4M3Operands:
    """:class:`E4M3Operands` of a bf16 (or fp32) weight, quantized per output channel by
    :func:`~.fp8.quantize_weight`, with the given input scales."""
    q, scale = quantize_weight(weight.detach())
    return E4M3Operands(q, scale, a_scale, d_scale_q)


def pair_norm_statistics(a, d, d_scale, num_groups, eps, x_bias=None) -> PairNormStatistics:
    """The statistics of ``norm(a + x_bias)`` and ``norm(a + x_bias + d / d_scale)``, from
    centred sums (as :func:`group_norm_silu_difference_torch` computes them):
    ``var_r = var_a + 2 cov(a, d) + var_d`` and ``rstd_r - rstd_a = -(var_r - var_a) rstd_a
    rstd_r / (sigma_a + sigma_r)``, which never subtracts two nearly equal numbers."""
    n, c = a.shape[:2]
    af = _acc(a)
    if x_bias is not None:
        af = af + _acc(x_bias).reshape(1, -1, 1, 1)
    ag = af.reshape(n, num_groups, -1)
    dg = (_acc(d) / d_scale).reshape(n, num_groups, -1)
    mean_a, mean_d = ag.mean(-1), dg.mean(-1)
    ca, cd = ag - mean_a[..., None], dg - mean_d[..., None]
    var_a = ca.square().mean(-1)
    extra = 2 * (ca * cd).mean(-1) + cd.square().mean(-1)
    sigma_a = (var_a + eps).sqrt()
    sigma_r = (var_a + extra).clamp_min(0).add(eps).sqrt()
    rstd_a, rstd_r = sigma_a.reciprocal(), sigma_r.reciprocal()
    drstd = -extra * rstd_a * rstd_r / (sigma_a + sigma_r)
    return PairNormStatistics(mean_a, rstd_a, mean_d, rstd_r, drstd)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pair_prologue(a, d, d_scale, num_groups, weight, bias, eps, scale=None, shift=None,
                  x_bias=None, silu=True, concat=None,
                  statistics: PairNormStatistics | None = None) -> PairPrologue:
    """The :class:`PairPrologue` of the pair norm with these parameters, its statistics
    computed by the pair norm's Triton kernels where they run
    (:func:`~.group_norm_silu_difference.pair_statistics_triton`), else by
    :func:`pair_norm_statistics`. They carry no gradient: the convolution's
    backward differentiates the whole norm, statistics included, at the restored point.
    ``concat`` ``(a2, d2)``: the norm of the channel concatenations ``[a, a2]``, ``[d, d2]``
    (read in place by the kernels). ``statistics``: these statistics, already computed (by
    the epilogue of the convolution that wrote ``a`` and ``d``, :class:`NextNorm`), used as
    given."""
    if statistics is not None:
        stats = statistics
    elif triton is not None and (a.is_cuda or _interpreted()) and a.dtype in TRITON_DTYPES:
        rows = pair_statistics_triton(a, d, d_scale, num_groups, eps, x_bias, concat)
        stats = PairNormStatistics(*(r.view(a.shape[0], num_groups) for r in rows[:5]))
    else:
        if concat is not None:
            a, d = torch.cat([a, concat[0]], 1), torch.cat([d, concat[1]], 1)
        with torch.no_grad():
            stats = pair_norm_statistics(a, d, d_scale, num_groups, eps, x_bias)
    return PairPrologue(*stats, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                        scale=scale, shift=shift, x_bias=x_bias, silu=silu)


def _e4m3_conv_f32(x, x_scale, q: E4M3Operands, weight, bias, stride, padding, dilation,
                   groups):
    """:mod:`.fp8`'s e4m3 convolution of x at x_scale, in fp32 (not yet rounded to x's
    dtype); differentiable to x straight through the quantizer with the bf16 ``weight``, as
    :func:`~.fp8.e4m3_conv2d` is."""
    pairs = [torch.nn.modules.utils._pair(v) for v in (stride, padding, dilation)]
    args = (x_scale, q.weight, q.weight_scale, bias, *pairs, groups)  # as nn.Conv2d holds them
    if torch.is_grad_enabled() and x.requires_grad:
        # x.float() holds x exactly, so the quantized operand is the same; the fp32 output's
        # gradient is rounded back to the weight's dtype before the dgrad, as x's would be
        return _E4M3Conv2d.apply(x.float(), weight, *args)
    return _e4m3_forward(x, *args, torch.float32)


def _raise_amax(amax_out, ya, yd):
    """amax_out[0], amax_out[1] raised to max |ya|, max |yd| (NaN as inf), in place."""
    if ya.numel() == 0:
        return
    with torch.no_grad():
        own = torch.stack([ya.detach().abs().amax().float(), yd.detach().abs().amax().float()])
        own = torch.where(torch.isnan(own), torch.full_like(own, float("inf")), own)
        torch.maximum(amax_out, own, out=amax_out)


def pair_conv2d_torch(a, d, d_scale, weight, bias=None, *, padding, prologue=None,
                      residual=None, concat=None, next_norm: NextNorm | None = None, stride=1,
                      dilation=1, groups=1, padding_mode="zeros",
                      quantized: E4M3Operands | None = None,
                      amax_out: torch.Tensor | None = None, resample: str | None = None):
    """Plain-PyTorch twin: ``(conv(ya) + bias [+ res_a], conv(yd) [+ res_d])`` with
    ``(ya, yd)`` the prologue's pair norm of ``(a, d)`` (or ``(a, d)`` itself), each
    resampled where ``resample`` says (``"up"``: :func:`~.resample_2x.upsample_2x_torch`,
    ``"down"``: :func:`~.resample_2x.avg_pool_2x2`). The prologue's statistics are not read:
    the norm computes its own.

    With ``quantized``, each convolution is :mod:`.fp8`'s e4m3 one (:func:`~.fp8.quantize` of
    ya at ``a_scale``, of yd at ``d_scale_q``, exact products, fp32 sums, the scales and the
    bias applied in fp32), the residual added in fp32 and the sum rounded once to a's dtype:
    the fused kernel's epilogue. (The unfused FP8 network rounds the convolution's output
    before its separate residual sum; without a residual the two are the same.)
    ``amax_out`` (with ``quantized``): see :func:`pair_conv2d`. ``concat`` ``(a2, d2)``: the
    input is ``torch.cat([a, a2], 1)``, ``torch.cat([d, d2], 1)``. ``next_norm``: a third
    output, :func:`pair_norm_statistics` of the two outputs for that norm."""
    if resample is not None and (resample not in RESAMPLE_TORCH or prologue is None):
        raise ValueError(f"pair_conv2d: resample is 'up' or 'down', after a prologue; got "
                         f"{resample!r}" + ("" if prologue is not None else " without one"))
    out = _pair_conv2d_torch(a, d, d_scale, weight, bias, padding, prologue, residual, concat,
                             stride, dilation, groups, padding_mode, quantized, amax_out,
                             resample)
    if next_norm is None:
        return out
    with torch.no_grad():
        stats = pair_norm_statistics(out[0], out[1], d_scale, next_norm.num_groups,
                                     next_norm.eps, next_norm.x_bias)
    return (*out, stats)


def _pair_conv2d_torch(a, d, d_scale, weight, bias, padding, prologue, residual, concat, stride,
                       dilation, groups, padding_mode, quantized, amax_out, resample):
    if padding_mode != "zeros":
        raise ValueError(f"pair_conv2d: zero padding only, got padding_mode={padding_mode!r}")
    a = a.detach()
    if concat is not None:
        a, d = torch.cat([a, concat[0].detach()], 1), torch.cat([d, concat[1]], 1)
    if prologue is not None:
        p = prologue
        ya, yd = group_norm_silu_difference_torch(a, d, d_scale, p.num_groups, p.weight, p.bias,
                                                  p.eps, p.scale, p.shift, p.x_bias, p.silu)
        if resample is not None:
            ya, yd = RESAMPLE_TORCH[resample](ya), RESAMPLE_TORCH[resample](yd)
    else:
        ya, yd = a, d
    if quantized is not None:
        if amax_out is not None:
            _raise_amax(amax_out, ya, yd)
        conv = functools.partial(_e4m3_conv_f32, q=quantized, weight=weight, stride=stride,
                                 padding=padding, dilation=dilation, groups=groups)
        out_a = conv(ya, quantized.a_scale, bias=bias)
        out_d = conv(yd, quantized.d_scale_q, bias=None)
        if residual is not None:
            out_a = out_a + residual[0].detach().float()
            out_d = out_d + residual[1].float()
        return out_a.to(a.dtype), out_d.to(d.dtype)
    out_a = F.conv2d(ya, weight, bias, stride, padding, dilation, groups)
    out_d = F.conv2d(yd, weight, None, stride, padding, dilation, groups)
    if residual is not None:
        out_a, out_d = out_a + residual[0].detach(), out_d + residual[1]
    return out_a, out_d


if triton is not None:
    from ._conv_common import _gemm_tile, _mm, _to
    from .group_norm_silu_difference import _d_scale, _silu_difference_f32


    @triton.jit
    def _quantize(x, scale, INTERPRETED: tl.constexpr):
        """x / scale rounded to the nearest e4m3 value (ties to even), saturating at ±448: the
        value :func:`~.fp8.quantize` gives (an IEEE division, as torch's, not the approximate
        one ``/`` lowers to). A GPU (sm_89+) converts fp32 to e4m3 to nearest even, saturating.
        The CPU interpreter does not (it rounds ties away from zero, carries a rounded-up
        mantissa into the wrong bits, and truncates subnormals): there the value is rounded to
        e4m3 in fp32 first, on the bits for normals (3 mantissa bits kept) and by adding and
        subtracting 1.5 * 2**14, whose fp32 spacing is e4m3's subnormal one (2**-9), below
        2**-6; the conversion of the exact value is then exact."""
        y = tl.div_rn(x.to(tl.float32), scale)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)  # E4M3_MAX
        if INTERPRETED:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
            ay = tl.abs(y)
            sub = (ay + 24576.0) - 24576.0
            y = tl.where(ay < 0.015625, tl.where(y < 0, -sub, sub),
                         bits.to(tl.float32, bitcast=True))
        return y.to(tl.float8e4nv)

    @triton.jit
    def _tile_amax(y, mask):
        """max |y| over the tile's unmasked elements, fp32, with NaN as inf (an atomic max of
        fp32 bit patterns orders every value but NaN; the history keeps no non-finite amax
        either way), and 0 for none."""
        v = tl.abs(y.to(tl.float32))
        v = tl.where(v != v, float("inf"), v)
        return tl.max(tl.max(tl.where(mask, v, 0.0), axis=1), axis=0)

    @triton.jit
    def _mm8(x, y, acc):
        """acc + x @ y for e4m3 x and y, in fp32. On Hopper an FP8 MMA's own accumulator is
        narrower than fp32: its partial sums are added into the fp32 accumulator after every
        32 products (one MMA's reduction), as a GEMM without 'fast accumulation' does. The CPU
        interpreter decodes e4m3 exactly and multiplies in fp32: no emulation needed."""
        return tl.dot(x, y, acc, max_num_imprecise_acc=32)

    @triton.jit
    def _silu_pair(u, e):
        """(silu(u), silu(u + e) - silu(u)), the difference without cancellation (the pair
        norm's own form, :func:`_silu_difference_f32`)."""
        return u * tl.sigmoid(u), _silu_difference_f32(u, e)

    @triton.jit
    def _prologue_params(n, c, c_ok, G, Cg: tl.constexpr, scN, ma_ptr, sa_ptr, md_ptr, sr_ptr,
                         dsr_ptr, gw_ptr, gb_ptr, sc_ptr, sh_ptr, xb_ptr,
                         HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr):
        """Per input channel c of sample n: the centre offset ka (x_bias - mean_a), mean_d,
        and the FiLM'd affine terms: u_a = (a + ka) * mul_a + add, u_d = cd * mul_r + ca *
        mul_dr."""
        grp = n * G + c // Cg
        mean_a = tl.load(ma_ptr + grp, mask=c_ok, other=0.0)
        rstd_a = tl.load(sa_ptr + grp, mask=c_ok, other=0.0)
        mean_d = tl.load(md_ptr + grp, mask=c_ok, other=0.0)
        rstd_r = tl.load(sr_ptr + grp, mask=c_ok, other=0.0)
        drstd = tl.load(dsr_ptr + grp, mask=c_ok, other=0.0)
        w = tl.load(gw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        add = tl.load(gb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_FILM:
            row = n.to(tl.int64) * scN + c
            gain = 1.0 + tl.load(sc_ptr + row, mask=c_ok, other=0.0).to(tl.float32)
            w = w * gain
            add = add * gain + tl.load(sh_ptr + row, mask=c_ok, other=0.0).to(tl.float32)
        ka = -mean_a
        if HAS_XB:
            ka += tl.load(xb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        return ka, mean_d, rstd_a * w, add, rstd_r * w, drstd * w

    @triton.jit
    def _prologue_tile(xa, xd, r_ptrs, r_mask, save, inv_s, ka, mean_d, mul_a, add, mul_r,
                       mul_dr, SAVE_R: tl.constexpr, SILU: tl.constexpr,
                       INTERPRETED: tl.constexpr):
        """(ua, ud), fp32: the pair norm's target output and difference (of d / s) at a loaded
        input tile; where ``save`` (SAVE_R), r = a + d / s stored at r_ptrs (r_mask)."""
        fa = xa.to(tl.float32)
        fd = xd.to(tl.float32) * inv_s
        if SAVE_R:
            if save:
                tl.store(r_ptrs, _to(fa + fd, r_ptrs.dtype.element_ty, INTERPRETED),
                         mask=r_mask)
        ca = fa + ka[None, :]
        ua = ca * mul_a[None, :] + add[None, :]
        ud = (fd - mean_d[None, :]) * mul_r[None, :] + ca * mul_dr[None, :]
        if SILU:
            ua, ud = _silu_pair(ua, ud)
        return ua, ud

    @triton.jit
    def _segment_load(p1, p2, pix, c, C1, C2, mask, second):
        """The tile at pixels pix and channels c of a segment of the input: of x1 (C1
        channels), or where ``second`` (per channel, the same for the whole step) of x2 (C2
        channels), both channels_last: a reduction step over a concatenated input reads its
        own part in place. The other segment's load is masked off entirely: it moves no
        data."""
        off = pix[:, None] * tl.where(second, C2, C1)[None, :] + c[None, :]
        x1 = tl.load(p1 + off, mask=mask & ~second[None, :], other=0.0)
        x2 = tl.load(p2 + off, mask=mask & second[None, :], other=0.0)
        return tl.where(second[None, :], x2, x1)

    @triton.jit
    def _pair_conv_fwd_kernel(
            a_ptr, d_ptr, a2_ptr, d2_ptr, w_ptr, bias_ptr, ra_ptr, rd_ptr, oa_ptr, od_ptr, r_ptr, ds_ptr,
            ma_ptr, sa_ptr, md_ptr, sr_ptr, dsr_ptr, gw_ptr, gb_ptr, sc_ptr, sh_ptr, xb_ptr,
            ws_ptr, qa_ptr, qd_ptr, am_ptr, part_ptr, xbn_ptr,
            H, W, Cin, C1, Cout, G, scN, sw_o, sw_c, sw_y, sw_x,
            Cg: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TWO: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PROLOGUE: tl.constexpr, HAS_FILM: tl.constexpr, HAS_XB: tl.constexpr,
            SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
            SAVE_R: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr,
            AMAX: tl.constexpr, STATS: tl.constexpr, HAS_XBN: tl.constexpr,
            RESAMPLE: tl.constexpr, INTERPRETED: tl.constexpr):
        """One tile of output pixels x output channels of one sample, for both branches.
        Inputs and outputs channels_last; 'same' padding (KH // 2, KW // 2), so that the
        centre tap reads the tile's own pixels: there, the first channel-block programs write
        r = a + d / s (SAVE_R), each input element once. QUANT: w_ptr holds the e4m3 weight,
        ws_ptr its per-channel scales, qa_ptr and qd_ptr the inputs' scales; the operands are
        quantized as they are formed, the scales applied in the epilogue. AMAX (with QUANT):
        am_ptr[0] and am_ptr[1] are raised to the largest |operand| of a and of d before its
        scale, each input element counted once, at the centre tap of the first channel-block
        programs (the pixels and channels SAVE_R writes), NaN counted as inf. TWO: the input
        is the channel concatenation [a, a2], [d, d2] (C1 channels from a and d, Cin in all),
        read in place as two segments of the reduction, each step within one segment. STATS:
        the next pair norm's partials of the outputs as stored, part[n, pixel tile, 0..6, c]
        (:func:`~.group_norm_silu_difference.fold_tile_statistics`), of out_a + x_bias
        (xbn_ptr, HAS_XBN) and out_d / d_scale. RESAMPLE (with PROLOGUE, without TWO): the
        convolution's input is the prologue's output resampled 2x, H x W (the output's size),
        read from a and d of the source size: 1, nearest upsampling (a, d of H/2 x W/2); 2,
        2x2 average pooling (a, d of 2H x 2W), the four normalized values averaged in fp32
        and rounded once; r is of the source size, each element written once."""
        n, pid_n, pid_m, m, m_ok, oh, ow, co, co_ok = _gemm_tile(H, W, Cout, BLOCK_M, BLOCK_N)
        HW = H * W
        # the source's row length and pixels a sample
        if RESAMPLE == 1:
            Ws = W // 2
            HWs = HW // 4
        elif RESAMPLE == 2:
            Ws = 2 * W
            HWs = 4 * HW
        else:
            Ws = W
            HWs = HW
        kc = tl.arange(0, BLOCK_K)
        C2 = Cin - C1  # 0 without TWO
        a_base = a_ptr + n.to(tl.int64) * HWs * C1  # 64-bit per sample, 32-bit within it
        d_base = d_ptr + n.to(tl.int64) * HWs * C1
        r_base = r_ptr + n.to(tl.int64) * HWs * Cin
        if TWO:
            a2_base = a2_ptr + n.to(tl.int64) * HW * C2
            d2_base = d2_ptr + n.to(tl.int64) * HW * C2
        dtype = a_ptr.dtype.element_ty
        if PROLOGUE:
            s = tl.load(ds_ptr).to(tl.float32)
            inv_s = 1.0 / s  # exact: s is a power of two
        if QUANT:
            qa = tl.load(qa_ptr)
            qd = tl.load(qd_ptr)
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_d = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if AMAX:
            amax_a = tl.zeros([], tl.float32)
            amax_d = tl.zeros([], tl.float32)
        blocks1 = tl.cdiv(C1, BLOCK_K)
        c_blocks = blocks1 + tl.cdiv(C2, BLOCK_K)
        for kk in range(0, KH * KW * c_blocks):
            tap = kk // c_blocks
            j = kk - tap * c_blocks
            ky = tap // KW
            kx = tap - ky * KW
            ih = oh + (ky - KH // 2)
            iw = ow + (kx - KW // 2)
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = ih * W + iw
            if TWO:
                second = (kc * 0 + j) >= blocks1  # per channel: one segment a step
                cs = (j - tl.where(second, blocks1, 0)) * BLOCK_K + kc  # within its segment
                c_ok = cs < tl.where(second, C2, C1)
                c = cs + tl.where(second, C1, 0)  # within the concatenation
                mask = pix_ok[:, None] & c_ok[None, :]
                xa = _segment_load(a_base, a2_base, pix, cs, C1, C2, mask, second)
                xd = _segment_load(d_base, d2_base, pix, cs, C1, C2, mask, second)
            else:
                c = j * BLOCK_K + kc
                c_ok = c < Cin
                mask = pix_ok[:, None] & c_ok[None, :]
                if RESAMPLE == 1:
                    pix = (ih // 2) * Ws + iw // 2  # the source pixel it repeats
                if RESAMPLE != 2:
                    xa = tl.load(a_base + pix[:, None] * Cin + c[None, :], mask=mask, other=0.0)
                    xd = tl.load(d_base + pix[:, None] * Cin + c[None, :], mask=mask, other=0.0)
            if PROLOGUE:
                ka, mean_d, mul_a, add, mul_r, mul_dr = _prologue_params(
                    n, c, c_ok, G, Cg, scN, ma_ptr, sa_ptr, md_ptr, sr_ptr, dsr_ptr, gw_ptr,
                    gb_ptr, sc_ptr, sh_ptr, xb_ptr, HAS_FILM, HAS_XB)
                # r is written at the centre tap of the first channel-block programs
                centre = (pid_n == 0) & (tap == (KH // 2) * KW + KW // 2)
                if RESAMPLE == 2:
                    ua = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
                    ud = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
                    for q in range(4):  # not unrolled: one source pixel's tile live at a time
                        off = ((2 * ih + q // 2) * Ws + 2 * iw + q % 2)[:, None] * Cin + c[None, :]
                        u, e = _prologue_tile(
                            tl.load(a_base + off, mask=mask, other=0.0),
                            tl.load(d_base + off, mask=mask, other=0.0), r_base + off, mask,
                            centre, inv_s, ka, mean_d, mul_a, add, mul_r, mul_dr, SAVE_R, SILU,
                            INTERPRETED)
                        ua += u
                        ud += e
                    ua *= 0.25
                    ud *= 0.25
                else:
                    r_mask = mask
                    if RESAMPLE == 1:  # each source pixel once: at its top-left copy
                        r_mask = mask & ((ih % 2 == 0) & (iw % 2 == 0))[:, None]
                    ua, ud = _prologue_tile(xa, xd, r_base + pix[:, None] * Cin + c[None, :],
                                            r_mask, centre, inv_s, ka, mean_d, mul_a, add,
                                            mul_r, mul_dr, SAVE_R, SILU, INTERPRETED)
                # zero padding of the activated input, as the unfused convolution pads it
                ya = _to(tl.where(mask, ua, 0.0), dtype, INTERPRETED)
                yd = _to(tl.where(mask, ud * s, 0.0), dtype, INTERPRETED)
            else:
                ya = xa
                yd = xd
            wt = tl.load(w_ptr + co[None, :] * sw_o + c[:, None] * sw_c + ky * sw_y + kx * sw_x,
                         mask=c_ok[:, None] & co_ok[None, :], other=0.0)
            if QUANT:
                if AMAX:
                    if (pid_n == 0) & (tap == (KH // 2) * KW + KW // 2):
                        amax_a = tl.maximum(amax_a, _tile_amax(ya, mask))
                        amax_d = tl.maximum(amax_d, _tile_amax(yd, mask))
                # from the storage dtype's values, as the unfused network quantizes its
                # norm's bf16 output; the padding and masked channels quantize to 0
                acc_a = _mm8(_quantize(ya, qa, INTERPRETED), wt, acc_a)
                acc_d = _mm8(_quantize(yd, qd, INTERPRETED), wt, acc_d)
            else:
                acc_a = _mm(ya, wt, acc_a, PRECISION, INTERPRETED)
                acc_d = _mm(yd, wt, acc_d, PRECISION, INTERPRETED)
        if AMAX:
            if pid_n == 0:  # non-negative floats: an atomic max of their bit patterns
                tl.atomic_max(am_ptr, amax_a)
                tl.atomic_max(am_ptr + 1, amax_d)
        out = n.to(tl.int64) * HW * Cout + m[:, None] * Cout + co[None, :]
        omask = m_ok[:, None] & co_ok[None, :]
        if QUANT:
            # (input scale * weight scale) first, then the product: fp8.py's order
            w_scale = tl.load(ws_ptr + co, mask=co_ok, other=0.0)
            acc_a = acc_a * (qa * w_scale)[None, :]
            acc_d = acc_d * (qd * w_scale)[None, :]
        if HAS_BIAS:
            acc_a += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc_a += tl.load(ra_ptr + out, mask=omask, other=0.0).to(tl.float32)
            acc_d += tl.load(rd_ptr + out, mask=omask, other=0.0).to(tl.float32)
        ya = _to(acc_a, oa_ptr.dtype.element_ty, INTERPRETED)
        yd = _to(acc_d, od_ptr.dtype.element_ty, INTERPRETED)
        tl.store(oa_ptr + out, ya, mask=omask)
        tl.store(od_ptr + out, yd, mask=omask)
        if STATS:
            va = ya.to(tl.float32)
            if HAS_XBN:
                va += tl.load(xbn_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
            _, inv = _d_scale(ds_ptr)
            _tile_moments(part_ptr, (n * tl.num_programs(1) + pid_m).to(tl.int64), Cout, co,
                          co_ok, omask, m_ok, va, yd.to(tl.float32) * inv)

    @triton.jit
    def _tile_moments(part_ptr, row, C, co, co_ok, mask, m_ok, va, vd):
        """part[row, 0..6, co]: per channel over the tile's unmasked pixels, the sums of va
        - ka and vd - kd, the second moments of va and vd about the tile's own means, and the
        shifts ka, kd (the tile's first pixel): Chan's partials, each formed from values near
        the spread rather than the mean, which a fold adds without cancellation
        (:func:`~.group_norm_silu_difference.fold_tile_statistics`)."""
        first = (tl.arange(0, va.shape[0]) == 0)[:, None]
        ka = tl.sum(tl.where(first, va, 0.0), axis=0)
        kd = tl.sum(tl.where(first, vd, 0.0), axis=0)
        count = tl.maximum(tl.sum(m_ok.to(tl.float32), axis=0), 1.0)
        va = tl.where(mask, va - ka[None, :], 0.0)
        vd = tl.where(mask, vd - kd[None, :], 0.0)
        sa = tl.sum(va, axis=0)
        sd = tl.sum(vd, axis=0)
        ca = tl.where(mask, va - (sa / count)[None, :], 0.0)
        cd = tl.where(mask, vd - (sd / count)[None, :], 0.0)
        p = part_ptr + row * 7 * C + co
        tl.store(p, sa, mask=co_ok)
        tl.store(p + C, sd, mask=co_ok)
        tl.store(p + 2 * C, tl.sum(ca * ca, axis=0), mask=co_ok)
        tl.store(p + 3 * C, tl.sum(cd * cd, axis=0), mask=co_ok)
        tl.store(p + 4 * C, tl.sum(ca * cd, axis=0), mask=co_ok)
        tl.store(p + 5 * C, ka, mask=co_ok)
        tl.store(p + 6 * C, kd, mask=co_ok)


class _Norm(NamedTuple):
    """A prologue's tensors as the kernels read them: statistics flat (N * G), fp32;
    parameters contiguous; placeholders (never read) where FiLM or x_bias is absent."""
    mean_a: torch.Tensor
    rstd_a: torch.Tensor
    mean_d: torch.Tensor
    rstd_r: torch.Tensor
    drstd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    x_bias: torch.Tensor
    num_groups: int
    film: bool
    has_xb: bool
    silu: bool


def _norm_tensors(p: PairPrologue, N: int, C: int) -> _Norm:
    flat = [t.reshape(-1).float().contiguous() for t in p[:5]]
    weight = p.weight.reshape(C).contiguous()
    bias = p.bias.reshape(C).contiguous()
    film, has_xb = p.scale is not None, p.x_bias is not None
    if film:
        scale, shift = p.scale.reshape(N, C), p.shift.reshape(N, C)
        if scale.stride(1) != 1 or shift.stride() != scale.stride():
            scale, shift = scale.contiguous(), shift.contiguous()  # one row stride for both
    else:
        scale = shift = weight
    x_bias = p.x_bias.reshape(C).contiguous() if has_xb else weight
    return _Norm(*flat, weight, bias, scale, shift, x_bias, p.num_groups, film, has_xb,
                 bool(p.silu))


def _forward(a, d, d_scale, weight, bias, norm: _Norm | None, res_a, res_d, save_r,
             quantized: E4M3Operands | None = None, amax_out: torch.Tensor | None = None,
             concat=None, next_norm: NextNorm | None = None, resample: str | None = None):
    """(out_a, out_d, r or None, statistics or None), all channels_last; a, d, residuals
    channels_last, weight with unit stride over input channels. With ``quantized`` (its
    weight laid out as ``weight``, its scales fp32 and contiguous) the GEMM reads its e4m3
    weight instead, and raises ``amax_out`` (2 fp32 values) to its operands' amaxes where
    given. ``concat``: (a2, d2), channels_last, whose channels follow a's and d's in the input
    (r holds the whole concatenation). ``next_norm``: the (6, N * G) statistics of that norm
    of the outputs, from the epilogue's partials. ``resample``: see :func:`pair_conv2d` (r of
    a's size, the outputs of the resampled size)."""
    N, C1, Hs, Ws = a.shape
    H, W = resampled_size(Hs, Ws, resample)
    a2, d2 = concat if concat is not None else (a, d)
    Cin = C1 + (a2.shape[1] if concat is not None else 0)
    Cout, _, KH, KW = weight.shape
    HW = H * W
    out_a = torch.empty((N, Cout, H, W), dtype=a.dtype, device=a.device, memory_format=_CL)
    out_d = torch.empty_like(out_a)
    r = (torch.empty((N, Cin, Hs, Ws), dtype=d.dtype, device=d.device, memory_format=_CL)
         if save_r else None)
    precision = _precision(a.dtype)
    k = _conv_launch(HW, Cin, Cout, a.element_size(), norm is not None,
                     a.dtype == torch.float32 and precision == "ieee", quantized is not None)
    if quantized is not None:
        weight = quantized.weight
        scales = quantized[1:]
    else:
        scales = (a,) * 3
    if norm is None:
        stats = (a,) * 5
        params = (a,) * 5
        G, Cg, scN, film, has_xb, silu = 1, 1, 0, False, False, False
    else:
        stats = norm[:5]
        params = norm[5:10]
        G, film, has_xb, silu = norm.num_groups, norm.film, norm.has_xb, norm.silu
        Cg, scN = Cin // G, norm.scale.stride(0)
    has_res = res_a is not None
    grid = (cdiv(Cout, k.block_n), cdiv(HW, k.block_m), N)
    part = xbn = a  # never read without next_norm, or without its x_bias
    if next_norm is not None:
        part = torch.empty((N, grid[1], TILE_PARTIALS, Cout), dtype=torch.float32,
                           device=a.device)
        if next_norm.x_bias is not None:
            xbn = next_norm.x_bias.reshape(-1).contiguous()
    _pair_conv_fwd_kernel[grid](
        a, d, a2, d2, weight, a if bias is None else bias, res_a if has_res else a,
        res_d if has_res else a, out_a, out_d, a if r is None else r, d_scale, *stats, *params,
        *scales, a if amax_out is None else amax_out, part, xbn, H, W, Cin, C1, Cout, G, scN,
        *weight.stride(), Cg=Cg, KH=KH, KW=KW, TWO=concat is not None, BLOCK_M=k.block_m,
        BLOCK_N=k.block_n, BLOCK_K=k.block_k, PROLOGUE=norm is not None, HAS_FILM=film,
        HAS_XB=has_xb, SILU=silu, HAS_BIAS=bias is not None, HAS_RES=has_res, SAVE_R=save_r,
        PRECISION=precision, QUANT=quantized is not None, AMAX=amax_out is not None,
        STATS=next_norm is not None, HAS_XBN=next_norm is not None
        and next_norm.x_bias is not None, RESAMPLE=RESAMPLE_CODES[resample],
        INTERPRETED=a.device.type == "cpu",
        num_warps=k.num_warps, num_stages=k.num_stages)
    if next_norm is None:
        return out_a, out_d, r, None
    return out_a, out_d, r, fold_tile_statistics(part, HW, k.block_m, next_norm.num_groups,
                                                 next_norm.eps)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of the outputs: channels_last for x dense in it, else NCHW."""
    return _CL if x.is_contiguous(memory_format=_CL) else torch.contiguous_format


class _PairConv2d(torch.autograd.Function):
    """Forward: the fused kernel. Backward, to d (and res_d) only: the transposed convolution
    of out_d's gradient, then, after a prologue, the plain norm's backward at the saved
    r = a + d / s."""

    @staticmethod
    def forward(ctx, d, d2, res_d, a, a2, d_scale, weight, bias, norm, res_a, layout, quantized,
                amax_out, next_norm, resample):
        ctx.input_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        save_r = norm is not None and ctx.input_grad
        concat = None if a2 is None else (a2, d2)
        out_a, out_d, r, stats = _forward(a, d, d_scale, weight, bias, norm, res_a, res_d,
                                          save_r, quantized, amax_out, concat, next_norm,
                                          resample)
        ctx.resample = resample
        if save_r:
            ctx.save_for_backward(weight, r, (norm.mean_a + norm.mean_d).contiguous(),
                                  norm.rstd_r, norm.weight, norm.bias, norm.scale, norm.shift,
                                  norm.x_bias)
            ctx.norm = norm.num_groups, norm.film, norm.has_xb, norm.silu
        else:
            ctx.save_for_backward(weight)
            ctx.norm = None
        ctx.c1 = a.shape[1]
        ctx.cin = a.shape[1] + (0 if a2 is None else a2.shape[1])
        ctx.set_materialize_grads(False)
        out_a = out_a.contiguous(memory_format=layout)
        stats = out_a.new_empty(0, dtype=torch.float32) if stats is None else stats
        ctx.mark_non_differentiable(out_a, stats)
        return out_a, out_d.contiguous(memory_format=layout), stats

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, _grad_a, grad_d, _grad_stats):
        nones = (None,) * 12
        if grad_d is None:
            return (None, None, None) + nones
        grad_res = grad_d if ctx.needs_input_grad[2] else None
        if not ctx.input_grad:
            return (None, None, grad_res) + nones
        weight, *saved = ctx.saved_tensors
        # d(out_d)/d(d) at d / s is the plain norm's derivative at r: the scale cancels
        norm = None if ctx.norm is None else SavedNorm(*saved, *ctx.norm)
        dy = pair_conv_input_gradient(grad_d, weight, ctx.cin, norm, ctx.resample)
        if ctx.cin == ctx.c1:
            return (dy, None, grad_res) + nones  # channels_last, like the d the kernel read
        # a concatenated input's two parts: views of the one gradient
        return (dy[:, :ctx.c1], dy[:, ctx.c1:], grad_res) + nones


def _pair(value, name):
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"pair_conv2d: {name} must be an int or two ints, got {value!r}")
    return value


def _check_quantized(q, a, weight):
    if not isinstance(q, E4M3Operands):
        raise ValueError(f"pair_conv2d: quantized must be an E4M3Operands, got {type(q)}")
    if a.dtype != torch.bfloat16:
        raise ValueError(f"pair_conv2d: e4m3 operands with bf16 activations only (the FP8 "
                         f"network's storage dtype), got {a.dtype}")
    if q.weight.dtype != E4M3 or q.weight.shape != weight.shape:
        raise ValueError(f"pair_conv2d: quantized.weight must be the weight {tuple(weight.shape)}"
                         f" in {E4M3}, got {q.weight.dtype} {tuple(q.weight.shape)}")
    for name, numel in (("weight_scale", weight.shape[0]), ("a_scale", 1), ("d_scale_q", 1)):
        t = getattr(q, name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != numel:
            raise ValueError(f"pair_conv2d: quantized.{name} must be an fp32 tensor of {numel} "
                             f"value(s) (scales are read on the device)")
    for name, t in q._asdict().items():
        if t.device != a.device:
            raise ValueError(f"pair_conv2d: quantized.{name} is on {t.device}, a on {a.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"pair_conv2d: quantized.{name} requires grad (the prior is "
                             f"frozen)")
    check_device(a.device)


def _check(a, d, d_scale, weight, bias, padding, prologue, residual, stride, dilation, groups,
           padding_mode, concat=None, next_norm=None, resample=None):
    for name, t in (("a", a), ("d", d), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"pair_conv2d: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if d.shape != a.shape:
        raise ValueError(f"pair_conv2d: d must have a's shape {tuple(a.shape)}, got "
                         f"{tuple(d.shape)}")
    tensors = {"d": d, "weight": weight}
    C = a.shape[1]
    if concat is not None:
        if len(concat) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() == 4
                                       for t in concat):
            raise ValueError("pair_conv2d: concat must be a pair of 4-D tensors (a2, d2)")
        a2, d2 = concat
        if (a2.shape[0], *a2.shape[2:]) != (a.shape[0], *a.shape[2:]) or d2.shape != a2.shape:
            raise ValueError(f"pair_conv2d: concat's a2 and d2 must share a's batch and size "
                             f"{(a.shape[0], *a.shape[2:])} and each other's shape, got "
                             f"{tuple(a2.shape)} and {tuple(d2.shape)}")
        tensors.update(a2=a2, d2=d2)
        C += a2.shape[1]
    if _pair(stride, "stride") != (1, 1) or _pair(dilation, "dilation") != (1, 1):
        raise ValueError(f"pair_conv2d: stride and dilation 1 only, got stride={stride!r}, "
                         f"dilation={dilation!r}")
    if groups != 1:
        raise ValueError(f"pair_conv2d: groups=1 only, got groups={groups!r}")
    if padding_mode != "zeros" or isinstance(padding, str):
        raise ValueError(f"pair_conv2d: numeric zero padding only, got padding={padding!r}, "
                         f"padding_mode={padding_mode!r}")
    N, _, H, W = a.shape
    if resample is not None:
        if resample not in RESAMPLE_TORCH or prologue is None or concat is not None:
            raise ValueError(f"pair_conv2d: resample is 'up' or 'down', after a prologue and "
                             f"without concat; got resample={resample!r}"
                             + (" without a prologue" if prologue is None else "")
                             + (" with concat" if concat is not None else ""))
        if resample == "down" and (H % 2 or W % 2):
            raise ValueError(f"pair_conv2d: resample='down' pools even sizes, got {H}x{W}")
    Hs, Ws = H, W  # the input's size, before resampling
    H, W = resampled_size(H, W, resample)
    Cout, Cin, KH, KW = weight.shape
    if Cin != C:
        raise ValueError(f"pair_conv2d: the weight {tuple(weight.shape)} takes {Cin} input "
                         f"channels, the input has {C}")
    if KH % 2 == 0 or KW % 2 == 0 or _pair(padding, "padding") != (KH // 2, KW // 2):
        raise ValueError(f"pair_conv2d: odd kernels with 'same' padding (kernel // 2) only, "
                         f"got kernel {KH}x{KW}, padding={padding!r}")
    if a.dtype not in TRITON_DTYPES:
        raise ValueError(f"pair_conv2d: the triton kernel takes fp32/fp16/bf16, got {a.dtype}; "
                         f"use pair_conv2d_torch for it")
    if bias is not None:
        if bias.numel() != Cout:
            raise ValueError(f"pair_conv2d: bias must have one value per output channel "
                             f"({Cout}), got shape {tuple(bias.shape)}")
        tensors["bias"] = bias
    if residual is not None:
        if len(residual) != 2:
            raise ValueError("pair_conv2d: residual must be a pair (res_a, res_d)")
        for name, t in zip(("res_a", "res_d"), residual):
            if t.shape != (N, Cout, H, W):
                raise ValueError(f"pair_conv2d: {name} must have the output's shape "
                                 f"{(N, Cout, H, W)}, got {tuple(t.shape)}")
            tensors[name] = t
    for name, t in tensors.items():
        if t.dtype != a.dtype:
            raise ValueError(f"pair_conv2d: {name} must have a's dtype {a.dtype}, got {t.dtype}")
    if max(C * max(H * W, Hs * Ws), Cout * H * W) > INT32_MAX:
        raise ValueError("pair_conv2d: one sample must have fewer than 2**31 elements")
    frozen = {"weight": weight, "bias": bias}
    if next_norm is not None:
        if not isinstance(next_norm, NextNorm):
            raise ValueError(f"pair_conv2d: next_norm must be a NextNorm, got "
                             f"{type(next_norm)}")
        if next_norm.num_groups < 1 or Cout % next_norm.num_groups:
            raise ValueError(f"pair_conv2d: next_norm: {Cout} output channels do not split "
                             f"into {next_norm.num_groups} groups")
        if next_norm.x_bias is not None and next_norm.x_bias.numel() != Cout:
            raise ValueError(f"pair_conv2d: next_norm.x_bias must have one value per output "
                             f"channel ({Cout}), got shape {tuple(next_norm.x_bias.shape)}")
        frozen["next_norm.x_bias"] = next_norm.x_bias
    if prologue is not None:
        G = prologue.num_groups
        if G < 1 or C % G:
            raise ValueError(f"pair_conv2d: {C} channels do not split into {G} groups")
        if C > _MAX_CHANNELS:
            raise ValueError(f"pair_conv2d: a prologue takes up to {_MAX_CHANNELS} channels")
        for name in PairNormStatistics._fields:
            if getattr(prologue, name).numel() != N * G:
                raise ValueError(f"pair_conv2d: prologue.{name} must have one value per "
                                 f"(sample, group) ({N}x{G})")
        for name in ("weight", "bias", "x_bias"):
            t = getattr(prologue, name)
            if t is not None and t.numel() != C:
                raise ValueError(f"pair_conv2d: prologue.{name} must have one value per "
                                 f"channel ({C}), got shape {tuple(t.shape)}")
        if (prologue.scale is None) != (prologue.shift is None):
            raise ValueError("pair_conv2d: give the prologue both scale and shift, or neither")
        for name in ("scale", "shift"):
            t = getattr(prologue, name)
            if t is not None and t.numel() != N * C:
                raise ValueError(f"pair_conv2d: prologue.{name} must have one value per "
                                 f"(sample, channel) ({N}x{C}), got shape {tuple(t.shape)}")
        frozen.update({f"prologue.{k}": v for k, v in prologue._asdict().items()
                       if isinstance(v, torch.Tensor)})
    for name, t in frozen.items():
        if t is None:
            continue
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"pair_conv2d: differentiable to d only (a frozen prior), but "
                             f"{name} requires grad")
        if t.device != a.device:
            raise ValueError(f"pair_conv2d: {name} is on {t.device}, a on {a.device}")
    for name, t in tensors.items():
        if t.device != a.device:
            raise ValueError(f"pair_conv2d: {name} is on {t.device}, a on {a.device}")


def pair_conv2d(a, d, d_scale, weight, bias=None, *, padding, prologue=None, residual=None,
                concat=None, next_norm: NextNorm | None = None, stride=1, dilation=1,
                groups=1, padding_mode="zeros", quantized: E4M3Operands | None = None,
                amax_out: torch.Tensor | None = None, resample: str | None = None):
    """Fused Triton version of :func:`pair_conv2d_torch`: ``(out_a, out_d)`` for a stride-1
    convolution with 'same' zero padding (3x3 padding 1, 1x1 padding 0) of the pair
    ``(a, d)`` (``d`` the difference times ``d_scale``, a 0-dim fp32 power-of-two tensor),
    after ``prologue``'s pair norm if given, the bias added to out_a only and ``residual``'s
    pair ``(res_a, res_d)`` to the outputs. Differentiable to ``d`` and ``res_d`` only.
    Inputs are copied to channels_last where they are not (a weight kept channels_last is
    read in place); the outputs take a's layout. fp32 products follow
    ``torch.backends.cudnn.allow_tf32``, as ``F.conv2d``'s do.

    ``concat`` (``(a2, d2)``): the input is the channel concatenation ``[a, a2]``,
    ``[d, d2]`` (the decoder's skip connection after its own input), read in place as two
    segments of the reduction instead of copied; ``prologue`` and ``weight`` are the
    concatenation's. Differentiable to ``d2`` too.

    ``resample`` (with a ``prologue``, without ``concat``): ``"up"`` or ``"down"``, the
    convolution's input is the prologue's output upsampled 2x to the nearest pixel or
    2x2-average pooled (even sizes), formed as the kernel loads it: a ResBlock that changes
    resolution, whose norm's output is resampled before its first convolution, writes neither
    the normalized nor the resampled pair. The outputs, and ``residual``, have the resampled
    size; the prologue's statistics are of ``(a, d)``.

    ``next_norm`` (:class:`NextNorm`): a third output, the :class:`PairNormStatistics` of
    that norm of the two outputs (as stored), added up in the epilogue from per-tile partials
    and folded without cancellation: the next block's :func:`pair_prologue` takes them as
    ``statistics=``, and its input needs no statistics pass.

    ``quantized`` (:class:`E4M3Operands`, bf16 activations, CUDA sm_89+ or the interpreter):
    the forward convolves e4m3 operands, as :func:`pair_conv2d_torch` with it defines;
    ``weight`` stays the bf16 weight, which the backward (unchanged) uses.

    ``amax_out`` (with ``quantized``; 2 fp32 values on a's device): raised in place, on the
    device, to the largest magnitude of the convolution's two inputs as it quantizes them
    (after the prologue and its rounding, before the scale; padding not counted), a's in
    ``amax_out[0]``, d's (times ``d_scale``) in ``amax_out[1]``, NaN counted as inf. What
    delayed scaling records of an input the fused kernel forms without writing it
    (:meth:`~.fp8.DelayedScaling.record`); zero it first for this call's amaxes alone."""
    require_triton("pair_conv2d")
    _check(a, d, d_scale, weight, bias, padding, prologue, residual, stride, dilation, groups,
           padding_mode, concat, next_norm, resample)
    if quantized is not None:
        _check_quantized(quantized, a, weight)
    if amax_out is not None:
        if quantized is None:
            raise ValueError("pair_conv2d: amax_out is the e4m3 operands' amax: it needs "
                             "quantized")
        if (not isinstance(amax_out, torch.Tensor) or amax_out.dtype != torch.float32
                or amax_out.shape != (2,) or not amax_out.is_contiguous()
                or amax_out.device != a.device or amax_out.requires_grad):
            raise ValueError("pair_conv2d: amax_out must be a contiguous fp32 tensor of 2 "
                             "values on a's device, without grad")
    N, C, H, W = a.shape
    a2 = d2 = None
    if concat is not None:
        a2 = concat[0].detach().contiguous(memory_format=_CL)
        d2 = concat[1].contiguous(memory_format=_CL)
        C += a2.shape[1]
    layout = _layout(a)
    a = a.detach().contiguous(memory_format=_CL)
    if not isinstance(d_scale, torch.Tensor):
        d_scale = torch.tensor(float(d_scale), device=a.device)
    d_scale = d_scale.to(device=a.device, dtype=torch.float32)
    w = _channels_last_weight(weight)
    bias = None if bias is None else bias.reshape(-1).contiguous()
    norm = None if prologue is None else _norm_tensors(prologue, N, C)
    res_a = res_d = None
    if residual is not None:
        res_a = residual[0].detach().contiguous(memory_format=_CL)
        res_d = residual[1].contiguous(memory_format=_CL)
    if a.numel() == 0 or weight.shape[0] == 0:
        return pair_conv2d_torch(a, d, d_scale, weight, bias, padding=padding,
                                 prologue=prologue, residual=residual, concat=concat,
                                 next_norm=next_norm, quantized=quantized, amax_out=amax_out,
                                 resample=resample)
    if quantized is not None:
        qw = _channels_last_weight(quantized.weight)
        if qw.stride() != w.stride():  # one set of strides for both weights
            qw = torch.empty_like(w, dtype=E4M3).copy_(qw)
        quantized = E4M3Operands(qw, quantized.weight_scale.reshape(-1).contiguous(),
                                 quantized.a_scale.reshape(()), quantized.d_scale_q.reshape(()))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (d, d2, res_d))
    d = d.contiguous(memory_format=_CL)
    if grad:
        out_a, out_d, stats = _PairConv2d.apply(d, d2, res_d, a, a2, d_scale, w, bias, norm,
                                                res_a, layout, quantized, amax_out, next_norm,
                                                resample)
    else:
        out_a, out_d, _, stats = _forward(a, d, d_scale, w, bias, norm, res_a, res_d, False,
                                          quantized, amax_out,
                                          None if a2 is None else (a2, d2), next_norm,
                                          resample)
        out_a, out_d = (out_a.contiguous(memory_format=layout),
                        out_d.contiguous(memory_format=layout))
    if next_norm is None:
        return out_a, out_d
    return out_a, out_d, PairNormStatistics(*(r.view(N, next_norm.num_groups)
                                              for r in stats[:5]))
