"""GroupNorm (+ FiLM) (+ SiLU) on a (target, difference) pair: ``g(a + d) - g(a)`` without
cancellation (see :mod:`diffloss_fast.ops.difference` for why the prior runs on pairs).

From the statistics of ``a``, of ``d`` and their covariance: with centred ``ca``, ``cd`` and
``s = 1/sqrt(var + eps)``, ``norm(a + d) - norm(a) = cd * s_r + ca * (s_r - s_a)``, where
``s_r - s_a = -(2 cov + var_d) * s_a * s_r / (sigma_a + sigma_r)``. FiLM (``* (1 + scale) +
shift``, the same for both branches) is linear in the difference. SiLU:
``silu(u + e) - silu(u) = e * sig(u + e) + u * sig(u + e) * (1 - sig(u)) * -expm1(-e)``.

The backward is the plain op's at the restored point ``r = a + d``, which the forward saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .difference import to_accumulation as _acc
from .group_norm_silu import group_norm_silu_torch


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
