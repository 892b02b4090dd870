"""Why and how the prior runs on (target, difference) pairs, and what its pair ops share.

DiffLoss compares the prior on two inputs that differ very little: the restored image and its
target, noised with the same noise. At high timesteps the inputs differ by about 1% of the
restoration error, below bf16's resolution, so two low-precision passes subtracted at the end
return mostly rounding noise. Instead the prior carries, through every layer, the target
branch's activation ``a`` and the difference ``d`` (restored minus target), each stored at its
own scale. Linear ops map ``d`` by themselves (no bias). The nonlinear ops compute ``g(a + d) - g(a)``
in fp32 (fp64 for fp64 inputs) from forms that never subtract two nearly equal numbers:
GroupNorm + FiLM + SiLU in :mod:`.group_norm_silu_difference`, softmax attention in
:mod:`.attention_difference`. This module holds what they share: the accumulation dtype and
the power-of-two gradient scale of the pair pass's backward.

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
from torch.autograd.function import once_differentiable

from .autocast import without_autocast


def to_accumulation(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: fp32, or fp64 for fp64 (so that gradcheck can run)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


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
