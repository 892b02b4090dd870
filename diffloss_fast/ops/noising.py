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

from .autocast import without_autocast
from .checks import check_q_sample_pair
from .launch_math import cdiv


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


# ---------------------------------------------------------------------------------------------
# Triton backend. Every tensor is indexed through its own 4 strides, so NCHW, channels_last and
# non-contiguous views are read and written in place, without a copy.
# ---------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch twin still works
    triton = None

_BLOCK = 1024
_INT32_MAX = 2 ** 31 - 1
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _sample_dense(t: torch.Tensor) -> bool:
    """Whether one sample of ``t`` (dims 1..3) is one dense block, in whatever dim order."""
    dims = sorted((t.stride(i), t.size(i)) for i in range(1, 4) if t.size(i) > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_alike(*ts: torch.Tensor) -> bool:
    """Same strides (size-1 dims aside) and dense samples: then a flat in-sample index is the
    same logical element in every tensor and the kernel skips the (c, h, w) arithmetic."""
    ref = ts[0]
    if not _sample_dense(ref):
        return False
    return all(t.stride(i) == ref.stride(i) for t in ts[1:] for i in range(1, 4)
               if ref.size(i) > 1)


def _is_cl(t: torch.Tensor) -> bool:
    """Channels are the innermost dim in memory: iterate (h, w, c) so accesses coalesce."""
    return t.size(1) > 1 and t.stride(1) == 1 and t.stride(3) != 1


def _needs_i64(*ts: torch.Tensor) -> bool:
    """Offsets overflow int32 beyond 2^31 elements of span; only then pay for int64 math."""
    for t in ts:
        if t.numel() > _INT32_MAX:
            return True
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= _INT32_MAX:
            return True
    return False


def _strides(t: torch.Tensor):
    return tuple(t.stride())


if triton is not None:

    @triton.jit
    def _chw(i, C, H, W, CL: tl.constexpr):
        """Logical (c, h, w) of in-sample index i, in NCHW or NHWC iteration order."""
        if CL:
            c = i % C
            hw = i // C
            w = hw % W
            h = hw // W
        else:
            w = i % W
            ch = i // W
            h = ch % H
            c = ch // H
        return c, h, w

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
            c, h, w = _chw(i, C, H, W, CL)
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
            c, h, w = _chw(i, C, H, W, CL)
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
        *_strides(restored), *_strides(gt), *_strides(noise), *_strides(xt_res),
        BLOCK=_BLOCK, CL=_is_cl(xt_res), DENSE=_dense_alike(xt_res, restored, gt, noise),
        I64=_needs_i64(restored, gt, noise, xt_res), num_warps=4)
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
                *_strides(grad_res), *_strides(grad_r),
                BLOCK=_BLOCK, CL=_is_cl(grad_r), DENSE=_dense_alike(grad_r, grad_res),
                I64=_needs_i64(grad_res, grad_r), num_warps=4)
        return grad_r, None, None, None, None, None, None, None, None


def q_sample_pair_triton(restored, gt, noise, coef_signal, coef_noise, *, scale, offset,
                         out_dtype, channels_last=False):
    """Fused Triton version of :func:`q_sample_pair_torch`: one pass over the three inputs.

    Arithmetic in fp32 (fp64 inputs are refused: use the torch twin for gradcheck)."""
    if triton is None:
        raise ValueError("q_sample_pair_triton needs the triton package, which is not installed")
    check_q_sample_pair(restored, gt, noise, out_dtype, backend="triton",
                        in_dtypes=_TRITON_DTYPES, out_dtypes=_TRITON_DTYPES)
    _check_coefs(restored, coef_signal, coef_noise)
    a = coef_signal.detach().to(torch.float32).contiguous()
    bn = coef_noise.detach().to(torch.float32).contiguous()
    gt, noise = gt.detach(), noise.detach()
    if restored.requires_grad and torch.is_grad_enabled():
        return _QSamplePair.apply(restored, gt, noise, a, bn, scale, offset, out_dtype,
                                  channels_last)
    return _q_sample_pair_fwd(restored.detach(), gt, noise, a, bn, scale, offset, out_dtype,
                              channels_last)
