"""Softmax attention on a (target, difference) pair: ``attn(a + d) - attn(a)`` without
cancellation (see :mod:`diffloss_fast.ops.difference` for why the prior runs on pairs).

``S_d = (q_a k_d + q_d k_a + q_d k_d) * scale`` exactly, then ``P_r - P_a = P_a * expm1(S_d -
log1p(sum_j P_a expm1(S_d)))`` row by row, and ``o_r - o_a = (P_r - P_a) v_a + P_r v_d``.

The backward is the plain attention's at the restored point, whose q, k and v the forward saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .difference import to_accumulation as _acc


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
