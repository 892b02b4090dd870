"""The prior's nonlinear ops on (target, difference) pairs: ``g(a + d) - g(a)`` without cancellation.

DiffLoss compares the prior on two inputs that differ very little: the restored image and its
target, noised with the same noise. At high timesteps the inputs differ by about 1% of the
restoration error, below bf16's resolution, so two low-precision passes subtracted at the end
return mostly rounding noise. Instead the prior carries, through every layer, the target
branch's activation ``a`` and the difference ``d`` (restored minus target), each stored at its
own scale. Linear ops map ``d`` by themselves (no bias). The nonlinear ops here compute
``g(a + d) - g(a)`` in fp32 (fp64 for fp64 inputs) from forms that never subtract two nearly equal numbers:

- GroupNorm, from the statistics of ``a``, of ``d`` and their covariance: with centred
  ``ca``, ``cd`` and ``s = 1/sqrt(var + eps)``, ``norm(a + d) - norm(a) = cd * s_r +
  ca * (s_r - s_a)``, where ``s_r - s_a = -(2 cov + var_d) * s_a * s_r / (sigma_a + sigma_r)``.
- FiLM (``* (1 + scale) + shift``, the same for both branches): linear in the difference.
- SiLU: ``silu(u + e) - silu(u) = e * sig(u + e) + u * sig(u + e) * (1 - sig(u)) * -expm1(-e)``.
- softmax attention: ``S_d = (q_a k_d + q_d k_a + q_d k_d) * scale`` exactly, then
  ``P_r - P_a = P_a * expm1(S_d - log1p(sum_j P_a expm1(S_d)))`` row by row, and
  ``o_r - o_a = (P_r - P_a) v_a + P_r v_d``.

``d`` is stored multiplied by ``d_scale``, a power of two chosen from the input so that the
difference sits where the storage format resolves it best (fp16's normal range starts at
6e-5; at high timesteps a good restoration's difference starts below that). Linear ops commute
with that factor; these ops divide by it in fp32 and multiply their output difference by it.

Only the forward needs these forms. ``a`` carries no gradient, so the derivative of
``g(a + d) - g(a)`` with respect to ``d`` is ``g'(a + d)``: the backward is the ordinary one at
the restored point ``r = a + d``, whose rounding error is relative to the gradient itself. Each
op saves ``r`` (one activation, as a two-pass restored branch would) and differentiates the
plain op there. Each op's plain twin, ``g(a + d) - g(a)`` computed directly, is what the tests
hold it to in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .group_norm_silu import group_norm_silu_torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: fp32, or fp64 for fp64 (so that gradcheck can run)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _silu_difference(u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``silu(u + e) - silu(u)``, fp32, without cancellation."""
    sig_r = torch.sigmoid(u + e)
    return e * sig_r + u * sig_r * (1 - torch.sigmoid(u)) * -torch.expm1(-e)


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


def attention_difference_torch(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """``(attn(q_a, k_a, v_a), (attn(q_a + q_d / d_scale, ...) - attn(q_a, ...)) * d_scale)``
    for softmax attention over the second-to-last dim ((..., T, dh) operands), in fp32,
    rounded once to the inputs' dtype."""
    dtype = q_a.dtype
    q_a, k_a, v_a = (_acc(t) for t in (q_a, k_a, v_a))
    q_d, k_d, v_d = (_acc(t) / d_scale for t in (q_d, k_d, v_d))
    scale = q_a.shape[-1] ** -0.5
    s_a = q_a @ k_a.transpose(-1, -2) * scale
    s_d = (q_a @ k_d.transpose(-1, -2) + q_d @ (k_a + k_d).transpose(-1, -2)) * scale
    p_a = s_a.softmax(-1)
    log_ratio = torch.log1p((p_a * torch.expm1(s_d)).sum(-1, keepdim=True))
    dp = p_a * torch.expm1(s_d - log_ratio)
    return (p_a @ v_a).to(dtype), ((dp @ v_a + (p_a + dp) @ v_d) * d_scale).to(dtype)


class _AttentionDifference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_d, k_d, v_d, q_a, k_a, v_a, d_scale):
        out_a, out_d = attention_difference_torch(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
        restored = [(_acc(x) + _acc(y) / d_scale).to(y.dtype)
                    for x, y in ((q_a, q_d), (k_a, k_d), (v_a, v_d))]
        ctx.save_for_backward(*restored)
        ctx.mark_non_differentiable(out_a)
        return out_a, out_d

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, _grad_a, grad_d):
        with torch.enable_grad():
            q, k, v = (_acc(t).requires_grad_(True) for t in ctx.saved_tensors)
            out = F.scaled_dot_product_attention(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), grad_d.to(q.dtype))
        return (*(g.to(grad_d.dtype) for g in grads), None, None, None, None)


def attention_difference(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """``(attn(a), (attn(a + d / d_scale) - attn(a)) * d_scale)``, differentiable to the
    differences only."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_d, k_d, v_d))):
        return attention_difference_torch(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
    return _AttentionDifference.apply(q_d, k_d, v_d, q_a.detach(), k_a.detach(), v_a.detach(),
                                      d_scale)


class GradientScale:
    """A power of two that brings the gradients entering the prior's backward to about 1, so
    that fp16 neither underflows nor overflows in it: DiffLoss's gradients at the prior's
    outputs are of the order of the differences over the element count, far below fp16's
    smallest normal number at high timesteps. :func:`scale_gradients` at the outputs sets it
    and multiplies by it; :func:`unscale_gradient` at the input divides by it. It stays a
    tensor on the device (no host sync)."""

    def __init__(self):
        self.value: torch.Tensor | None = None


class _ScaleGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale: GradientScale, *outputs):
        ctx.scale = scale
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        peak = torch.stack([g.detach().abs().amax().float() for g in present]).amax()
        ok = torch.isfinite(peak) & (peak > 0)
        value = torch.where(ok, torch.exp2(-torch.floor(torch.log2(peak))), torch.ones_like(peak))
        ctx.scale.value = value
        return (None, *(None if g is None else (g.float() * value).to(g.dtype) for g in grads))


class _UnscaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale: GradientScale, x):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        value = ctx.scale.value
        if value is None:  # no gradient came through the outputs
            return None, grad
        return None, (grad.float() / value).to(grad.dtype)


def scale_gradients(scale: GradientScale, *outputs):
    """``outputs``, whose gradients are multiplied by one power of two chosen from them."""
    present = [o for o in outputs if o is not None]
    if not (torch.is_grad_enabled() and any(o.requires_grad for o in present)):
        return outputs
    scaled = iter(_ScaleGradients.apply(scale, *present))
    return tuple(None if o is None else next(scaled) for o in outputs)


def unscale_gradient(scale: GradientScale, x: torch.Tensor) -> torch.Tensor:
    """``x``, whose gradient is divided by the power of two the outputs chose."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _UnscaleGradient.apply(scale, x)
