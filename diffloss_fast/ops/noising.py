"""Fused forward noising (q_sample) of the restored and the ground-truth image.

Both branches share one noise tensor and one timestep per sample, so a single pass reads
restored, gt and noise once and writes both noised images in the prior's compute dtype and
memory layout:

    x0   = scale * x + offset                  (caller's range -> the prior's [-1, 1])
    x_t  = coef_signal[b] * x0 + coef_noise[b] * noise

Only the restored branch is differentiable: d x_t^res / d restored = scale * coef_signal[b].
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton_common import (TRITON_DTYPES, cdiv, channels_innermost, dense_alike, needs_i64,
                             require_triton, triton, tl)
from .autocast import without_autocast
from .checks import check_q_sample_pair


def _out_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def q_sample_pair_torch(restored, gt, noise, coef_signal, coef_noise, *, scale, offset,
                        out_dtype, channels_last=False):
    """Plain-PyTorch twin: the definition the fused kernels are tested against."""
    acc = torch.promote_types(restored.dtype, torch.float32)
    a = coef_signal.to(acc).view(-1, 1, 1, 1)
    b = coef_noise.to(acc).view(-1, 1, 1, 1)
    n = noise.detach().to(acc)
    fmt = _out_format(channels_last)
    xt_res = (a * (scale * restored.to(acc) + offset) + b * n).to(out_dtype)
    with torch.no_grad():
        xt_gt = (a * (scale * gt.detach().to(acc) + offset) + b * n).to(out_dtype)
    return xt_res.contiguous(memory_format=fmt), xt_gt.contiguous(memory_format=fmt)


# Triton backend. Every tensor is indexed through its own 4 strides, so NCHW, channels_last and
# non-contiguous views are read and written in place, without a copy.
_BLOCK = 1024

if triton is not None:
    from ._triton_common import chw

    @triton.jit
    def _q_sample_pair_fwd_kernel(
            r_ptr, g_ptr, n_ptr, a_ptr, bn_ptr, xr_ptr, xg_ptr,
            C, H, W, scale, offset,
            rs0, rs1, rs2, rs3, gs0, gs1, gs2, gs3, ns0, ns1, ns2, ns3,
            os0, os1, os2, os3,
            BLOCK: tl.constexpr, CL: tl.constexpr, DENSE: tl.constexpr, I64: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        if I64:
            b = b.to(tl.int64)
            i = i.to(tl.int64)
        mask = i < C * H * W
        if DENSE:
            r_off = b * rs0 + i
            g_off = b * gs0 + i
            n_off = b * ns0 + i
            o_off = b * os0 + i
        else:
            c, h, w = chw(i, C, H, W, CL)
            r_off = b * rs0 + c * rs1 + h * rs2 + w * rs3
            g_off = b * gs0 + c * gs1 + h * gs2 + w * gs3
            n_off = b * ns0 + c * ns1 + h * ns2 + w * ns3
            o_off = b * os0 + c * os1 + h * os2 + w * os3
        a = tl.load(a_ptr + b)
        bn = tl.load(bn_ptr + b)
        r = tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        n = tl.load(n_ptr + n_off, mask=mask, other=0.0).to(tl.float32)
        xr = a * (scale * r + offset) + bn * n
        xg = a * (scale * g + offset) + bn * n
        tl.store(xr_ptr + o_off, xr.to(xr_ptr.dtype.element_ty), mask=mask)
        tl.store(xg_ptr + o_off, xg.to(xg_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _q_sample_pair_bwd_kernel(
            go_ptr, a_ptr, gr_ptr, C, H, W, scale,
            ss0, ss1, ss2, ss3, ds0, ds1, ds2, ds3,
            BLOCK: tl.constexpr, CL: tl.constexpr, DENSE: tl.constexpr, I64: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        if I64:
            b = b.to(tl.int64)
            i = i.to(tl.int64)
        mask = i < C * H * W
        if DENSE:
            s_off = b * ss0 + i
            d_off = b * ds0 + i
        else:
            c, h, w = chw(i, C, H, W, CL)
            s_off = b * ss0 + c * ss1 + h * ss2 + w * ss3
            d_off = b * ds0 + c * ds1 + h * ds2 + w * ds3
        a = tl.load(a_ptr + b)
        go = tl.load(go_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
        gr = (go * a) * scale
        tl.store(gr_ptr + d_off, gr.to(gr_ptr.dtype.element_ty), mask=mask)


def _check_coefs(restored, coef_signal, coef_noise):
    """The kernels load one coefficient per sample from a (B,) tensor on restored's device."""
    B = restored.shape[0]
    for name, t in (("coef_signal", coef_signal), ("coef_noise", coef_noise)):
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"q_sample_pair: {name} must have shape ({B},), got {shape}")
        if t.device != restored.device:
            raise ValueError(f"q_sample_pair: {name} is on {t.device}, restored on "
                             f"{restored.device}")


def _q_sample_pair_fwd(restored, gt, noise, a, bn, scale, offset, out_dtype, channels_last):
    B, C, H, W = restored.shape
    fmt = _out_format(channels_last)
    xt_res = torch.empty(restored.shape, dtype=out_dtype, device=restored.device,
                         memory_format=fmt)
    xt_gt = torch.empty(restored.shape, dtype=out_dtype, device=restored.device,
                        memory_format=fmt)
    if restored.numel() == 0:
        return xt_res, xt_gt
    grid = (B, cdiv(C * H * W, _BLOCK))
    _q_sample_pair_fwd_kernel[grid](
        restored, gt, noise, a, bn, xt_res, xt_gt, C, H, W, float(scale), float(offset),
        *restored.stride(), *gt.stride(), *noise.stride(), *xt_res.stride(),
        BLOCK=_BLOCK, CL=channels_innermost(xt_res), DENSE=dense_alike(xt_res, restored, gt, noise),
        I64=needs_i64(restored, gt, noise, xt_res), num_warps=4)
    return xt_res, xt_gt


class _QSamplePair(torch.autograd.Function):
    """Autograd of the fused noising: only restored is differentiable, by a second kernel."""

    @staticmethod
    def forward(ctx, restored, gt, noise, a, bn, scale, offset, out_dtype, channels_last):
        xt_res, xt_gt = _q_sample_pair_fwd(restored, gt, noise, a, bn, scale, offset,
                                           out_dtype, channels_last)
        ctx.mark_non_differentiable(xt_gt)
        ctx.save_for_backward(a)
        ctx.scale = float(scale)
        # restored's layout for its gradient, without keeping restored alive
        ctx.r_meta = (restored.shape, torch.empty_like(restored, device="meta").stride(),
                      restored.dtype, restored.device)
        return xt_res, xt_gt

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad_res, grad_gt):
        (a,) = ctx.saved_tensors
        shape, stride, dtype, device = ctx.r_meta
        grad_r = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        B, C, H, W = shape
        if grad_r.numel():
            grid = (B, cdiv(C * H * W, _BLOCK))
            _q_sample_pair_bwd_kernel[grid](
                grad_res, a, grad_r, C, H, W, ctx.scale,
                *grad_res.stride(), *grad_r.stride(),
                BLOCK=_BLOCK, CL=channels_innermost(grad_r), DENSE=dense_alike(grad_r, grad_res),
                I64=needs_i64(grad_res, grad_r), num_warps=4)
        return grad_r, None, None, None, None, None, None, None, None


def q_sample_pair_triton(restored, gt, noise, coef_signal, coef_noise, *, scale, offset,
                         out_dtype, channels_last=False):
    """Fused Triton version of :func:`q_sample_pair_torch`: one pass over the three inputs.

    Arithmetic in fp32 (fp64 inputs are refused: use the torch twin for gradcheck)."""
    require_triton("q_sample_pair_triton")
    check_q_sample_pair(restored, gt, noise, out_dtype, backend="triton",
                        in_dtypes=TRITON_DTYPES, out_dtypes=TRITON_DTYPES)
    _check_coefs(restored, coef_signal, coef_noise)
    a = coef_signal.detach().to(torch.float32).contiguous()
    bn = coef_noise.detach().to(torch.float32).contiguous()
    gt, noise = gt.detach(), noise.detach()
    if restored.requires_grad and torch.is_grad_enabled():
        return _QSamplePair.apply(restored, gt, noise, a, bn, scale, offset, out_dtype,
                                  channels_last)
    return _q_sample_pair_fwd(restored.detach(), gt, noise, a, bn, scale, offset, out_dtype,
                              channels_last)
