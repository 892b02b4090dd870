"""Fused, per-sample weighted squared error with fp32 accumulation: both DiffLoss reductions.

    d    = p - q                                         (x is None)
    d    = x_coef[b] * (x - y) - p_coef[b] * (p - q)     (x given)
    loss = sum_b weight[b] * sum_i d^2 / p.numel()

The natural term with target "eps" and the semantic term use the first form; the natural term
with target "x_prev" uses the second (x, y: restored and gt images; p, q: predicted noise of the
two branches). Gradients flow to p and x only: q and y come from the ground-truth branch.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton_common import (TRITON_DTYPES, cdiv, channels_innermost, dense_alike, needs_i64,
                             require_triton, triton, tl)
from .autocast import without_autocast


def _check(p, q, weight, x, y, x_coef, p_coef):
    if p.shape != q.shape:
        raise ValueError(f"weighted_l2: p and q must have the same shape, got {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")
    if weight.shape != (p.shape[0],):
        raise ValueError(f"weighted_l2: weight must have shape ({p.shape[0]},), got "
                         f"{tuple(weight.shape)}")
    if x is not None:
        if y is None or x_coef is None or p_coef is None:
            raise ValueError("weighted_l2: x needs y, x_coef and p_coef")
        if x.shape != p.shape or y.shape != p.shape:
            raise ValueError(f"weighted_l2: x and y must have p's shape {tuple(p.shape)}, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")


def weighted_l2_torch(p, q, weight, x=None, y=None, x_coef=None, p_coef=None):
    """Plain-PyTorch twin: the definition the fused kernels are tested against.

    Accumulates in fp32 (fp64 for fp64 inputs, so that gradcheck can use it)."""
    _check(p, q, weight, x, y, x_coef, p_coef)
    acc = torch.promote_types(p.dtype, torch.float32)
    view = (-1,) + (1,) * (p.dim() - 1)
    d = p.to(acc) - q.detach().to(acc)
    if x is not None:
        d = (x_coef.to(acc).view(view) * (x.to(acc) - y.detach().to(acc))
             - p_coef.to(acc).view(view) * d)
    return (weight.to(acc).view(view) * d.square()).sum() / p.numel()


# Triton backend: 4D strided indexing (p may be channels_last while x is NCHW), fp32
# accumulation, and a deterministic reduction: one partial sum per program, summed by torch.
_BLOCK = 1024

if triton is not None:
    from ._triton_common import chw

    @triton.jit
    def _wl2_diff(p_ptr, q_ptr, x_ptr, y_ptr, xc, pc, b, i, mask, C, H, W,
                  ps0, ps1, ps2, ps3, qs0, qs1, qs2, qs3,
                  xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
                  HAS_X: tl.constexpr, CL: tl.constexpr, DENSE: tl.constexpr):
        """d of the module docstring, in fp32; also returns p's and x's element offsets."""
        if DENSE:
            p_off = b * ps0 + i
            q_off = b * qs0 + i
            x_off = b * xs0 + i
            y_off = b * ys0 + i
        else:
            c, h, w = chw(i, C, H, W, CL)
            p_off = b * ps0 + c * ps1 + h * ps2 + w * ps3
            q_off = b * qs0 + c * qs1 + h * qs2 + w * qs3
            x_off = b * xs0 + c * xs1 + h * xs2 + w * xs3
            y_off = b * ys0 + c * ys1 + h * ys2 + w * ys3
        p = tl.load(p_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + q_off, mask=mask, other=0.0).to(tl.float32)
        d = p - q
        if HAS_X:
            x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
            d = xc * (x - y) - pc * d
        return d, p_off, x_off

    @triton.jit
    def _wl2_fwd_kernel(
            p_ptr, q_ptr, x_ptr, y_ptr, w_ptr, xc_ptr, pc_ptr, part_ptr, C, H, W,
            ps0, ps1, ps2, ps3, qs0, qs1, qs2, qs3,
            xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
            HAS_X: tl.constexpr, BLOCK: tl.constexpr, CL: tl.constexpr,
            DENSE: tl.constexpr, I64: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        nblk = tl.num_programs(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        if I64:
            b = b.to(tl.int64)
            i = i.to(tl.int64)
        mask = i < C * H * W
        xc = 0.0
        pc = 0.0
        if HAS_X:
            xc = tl.load(xc_ptr + b)
            pc = tl.load(pc_ptr + b)
        d, p_off, x_off = _wl2_diff(p_ptr, q_ptr, x_ptr, y_ptr, xc, pc, b, i, mask, C, H, W,
                                    ps0, ps1, ps2, ps3, qs0, qs1, qs2, qs3,
                                    xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
                                    HAS_X, CL, DENSE)
        wb = tl.load(w_ptr + b)
        tl.store(part_ptr + b * nblk + blk, wb * tl.sum(d * d, axis=0))

    @triton.jit
    def _wl2_bwd_kernel(
            p_ptr, q_ptr, x_ptr, y_ptr, w_ptr, xc_ptr, pc_ptr, go_ptr, gp_ptr, gx_ptr,
            inv_n, C, H, W,
            ps0, ps1, ps2, ps3, qs0, qs1, qs2, qs3,
            xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
            gps0, gps1, gps2, gps3, gxs0, gxs1, gxs2, gxs3,
            HAS_X: tl.constexpr, NEED_P: tl.constexpr, NEED_X: tl.constexpr,
            BLOCK: tl.constexpr, CL: tl.constexpr, DENSE: tl.constexpr, I64: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        if I64:
            b = b.to(tl.int64)
            i = i.to(tl.int64)
        mask = i < C * H * W
        xc = 0.0
        pc = 0.0
        if HAS_X:
            xc = tl.load(xc_ptr + b)
            pc = tl.load(pc_ptr + b)
        d, p_off, x_off = _wl2_diff(p_ptr, q_ptr, x_ptr, y_ptr, xc, pc, b, i, mask, C, H, W,
                                    ps0, ps1, ps2, ps3, qs0, qs1, qs2, qs3,
                                    xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
                                    HAS_X, CL, DENSE)
        # dloss/dd = 2 * weight[b] * d * grad_out / N
        k = 2.0 * tl.load(w_ptr + b) * tl.load(go_ptr).to(tl.float32) * inv_n
        gd = d * k
        if NEED_P:
            if DENSE:
                gp_off = b * gps0 + i
            else:
                c, h, w = chw(i, C, H, W, CL)
                gp_off = b * gps0 + c * gps1 + h * gps2 + w * gps3
            if HAS_X:
                gp = -pc * gd
            else:
                gp = gd
            tl.store(gp_ptr + gp_off, gp.to(gp_ptr.dtype.element_ty), mask=mask)
        if NEED_X:
            if DENSE:
                gx_off = b * gxs0 + i
            else:
                c, h, w = chw(i, C, H, W, CL)
                gx_off = b * gxs0 + c * gxs1 + h * gxs2 + w * gxs3
            tl.store(gx_ptr + gx_off, (xc * gd).to(gx_ptr.dtype.element_ty), mask=mask)


def _as4d(t):
    """A view with trailing size-1 dims: any strides, no copy."""
    while t is not None and t.dim() < 4:
        t = t.unsqueeze(-1)
    return t


def _check_triton(p, q, weight, x, y, x_coef, p_coef):
    for name, t in (("p", p), ("q", q), ("x", x), ("y", y)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"weighted_l2: {name} must be a float tensor, got {t.dtype}")
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"weighted_l2: the triton backend takes fp32/fp16/bf16 {name}, got "
                             f"{t.dtype}; use backend='torch' (fp64 accumulation) for it")
    if not 1 <= p.dim() <= 4:
        raise ValueError(f"weighted_l2: the triton backend takes 1D to 4D p, got shape "
                         f"{tuple(p.shape)}")
    B = p.shape[0]
    for name, t in (("x_coef", x_coef), ("p_coef", p_coef)):
        if x is not None and t.shape != (B,):
            raise ValueError(f"weighted_l2: {name} must have shape ({B},), got {tuple(t.shape)}")
    for name, t in (("q", q), ("weight", weight), ("x", x), ("y", y), ("x_coef", x_coef),
                    ("p_coef", p_coef)):
        if t is not None and t.device != p.device:
            raise ValueError(f"weighted_l2: {name} is on {t.device}, p on {p.device}")


def _coefs(weight, x_coef, p_coef, has_x):
    f = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    w = f(weight)
    return (w, f(x_coef), f(p_coef)) if has_x else (w, w, w)


def _wl2_args(p, q, x, y):
    """The four 4D views the kernels read (x, y stand in for themselves when absent)."""
    p4, q4 = _as4d(p), _as4d(q)
    has_x = x is not None
    x4, y4 = (_as4d(x), _as4d(y)) if has_x else (p4, q4)
    return p4, q4, x4, y4, has_x


def _wl2_forward(p, q, weight, x, y, x_coef, p_coef):
    p4, q4, x4, y4, has_x = _wl2_args(p, q, x, y)
    w, xc, pc = _coefs(weight, x_coef, p_coef, has_x)
    B, C, H, W = p4.shape
    n = p.numel()
    if n == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=p.device)
    nblk = cdiv(C * H * W, _BLOCK)
    partials = torch.empty(B * nblk, dtype=torch.float32, device=p.device)
    _wl2_fwd_kernel[(B, nblk)](
        p4, q4, x4, y4, w, xc, pc, partials, C, H, W,
        *p4.stride(), *q4.stride(), *x4.stride(), *y4.stride(),
        HAS_X=has_x, BLOCK=_BLOCK, CL=channels_innermost(p4), DENSE=dense_alike(p4, q4, x4, y4),
        I64=needs_i64(p4, q4, x4, y4), num_warps=4)
    return partials.sum() / n


class _WeightedL2(torch.autograd.Function):
    """Autograd of the fused reduction: saves only the inputs, recomputes d in backward."""

    @staticmethod
    def forward(ctx, p, q, weight, x, y, x_coef, p_coef):
        ctx.save_for_backward(p, q, weight, x, y, x_coef, p_coef)
        return _wl2_forward(p, q, weight, x, y, x_coef, p_coef)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad_out):
        p, q, weight, x, y, x_coef, p_coef = ctx.saved_tensors
        need_p, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        p4, q4, x4, y4, has_x = _wl2_args(p, q, x, y)
        w, xc, pc = _coefs(weight, x_coef, p_coef, has_x)
        grad_p = torch.empty_like(p) if need_p else None
        grad_x = torch.empty_like(x) if need_x else None
        gp4 = _as4d(grad_p) if need_p else p4
        gx4 = _as4d(grad_x) if need_x else x4
        B, C, H, W = p4.shape
        if p.numel() and (need_p or need_x):
            go = grad_out.detach().to(torch.float32).reshape(1)
            _wl2_bwd_kernel[(B, cdiv(C * H * W, _BLOCK))](
                p4, q4, x4, y4, w, xc, pc, go, gp4, gx4, 1.0 / p.numel(), C, H, W,
                *p4.stride(), *q4.stride(), *x4.stride(), *y4.stride(),
                *gp4.stride(), *gx4.stride(),
                HAS_X=has_x, NEED_P=need_p, NEED_X=need_x, BLOCK=_BLOCK, CL=channels_innermost(p4),
                DENSE=dense_alike(p4, q4, x4, y4, gp4, gx4),
                I64=needs_i64(p4, q4, x4, y4, gp4, gx4), num_warps=4)
        return grad_p, None, None, grad_x, None, None, None


def weighted_l2_triton(p, q, weight, x=None, y=None, x_coef=None, p_coef=None):
    """Fused Triton version of :func:`weighted_l2_torch`; returns a 0-dim fp32 tensor.

    Gradients go to p and x only (weight and coefficients are schedule constants)."""
    require_triton("weighted_l2_triton")
    _check(p, q, weight, x, y, x_coef, p_coef)
    _check_triton(p, q, weight, x, y, x_coef, p_coef)
    q = q.detach()
    y = y.detach() if y is not None else None
    needs = p.requires_grad or (x is not None and x.requires_grad)
    if needs and torch.is_grad_enabled():
        return _WeightedL2.apply(p, q, weight.detach(), x, y,
                                 None if x_coef is None else x_coef.detach(),
                                 None if p_coef is None else p_coef.detach())
    return _wl2_forward(p.detach(), q, weight, None if x is None else x.detach(), y,
                        x_coef, p_coef)
