"""The pair network with FP8 (e4m3) convolutions: what DiffLoss runs for ``precision="fp8"``.

:class:`~diffloss_fast.difference_unet.DifferenceUNet` in bf16, with every convolution (not
the attention projections; see :mod:`diffloss_fast.ops.fp8`) run on e4m3 operands: the weights
quantized once per output channel from the prior's own fp32 weights as the copy is built, the
target activation ``a`` and the difference ``d`` each at its own delayed per-tensor scale. It
is the pair that makes FP8 possible at all: ``d`` at its own scale keeps the restoration's
small difference from the target in e4m3's 3 mantissa bits, where two passes quantized apart
and subtracted at the end would lose it entirely.

A ResBlock's norm + convolution blocks, and the noise head's, may run fused
(:mod:`diffloss_fast.ops.pair_conv` on e4m3 operands): the norm's output is formed as the
kernel loads it and never written, so the kernel quantizes it at the history's scale alone
(:meth:`~.ops.fp8.DelayedScaling.scale_for`) and returns its amax for the history
(:meth:`~.ops.fp8.DelayedScaling.record`). They fuse where the dispatch table measured the
FP8 block itself faster (keys of kind ``fp8-in``, ``fp8-out``, ``fp8-cat-in``,
``fp8-up-in``, ``fp8-down-in`` and ``fp8-head``, apart from the bf16 blocks'), and only from
the second call on: the first has no history to take a scale from.
"""
from __future__ import annotations

import torch
from torch import nn

from .difference_unet import DifferenceUNet, Pair
from .ops.fp8 import DelayedScaling, e4m3_conv2d, quantize_weight
from .ops.pair_conv import E4M3Operands, NextNorm, pair_conv2d
from .prior import UNetModel


class FP8DifferenceUNet(DifferenceUNet):
    """``forward(a_t, d_t, t, d_scale)`` as :class:`DifferenceUNet`'s, built from the same
    arguments (``dtype`` bf16), each call advancing the delayed scaling (``scaling``) by one."""

    def __init__(self, unet: UNetModel, **kwargs):
        super().__init__(unet, **kwargs)
        sources = dict(unet.named_modules())
        convs = [(name, m) for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]
        for slot, (name, conv) in enumerate(convs):
            # the copy keeps the prior's module names; the noise head is the output
            # convolution sliced to its first three channels
            source = unet.out[2] if name == "out_conv" else sources[name]
            weight = source.weight.detach()[:conv.out_channels]
            q, scale = quantize_weight(weight.to(conv.weight.device, torch.float32))
            if self.channels_last:
                q = q.contiguous(memory_format=torch.channels_last)
            conv.register_buffer("weight_e4m3", q, persistent=False)
            conv.register_buffer("weight_scale", scale, persistent=False)
            conv.fp8_slot = slot  # the scaling slots 2 * slot (for a) and 2 * slot + 1 (for d)
        self.scaling = DelayedScaling(2 * len(convs), device=self.film_weight.device)

    def _fused(self, kind: str, shape, conv: nn.Conv2d) -> bool:
        """Whether this block runs as the fused kernel on e4m3 operands: where the table's
        FP8 entry (kind ``fp8-<kind>``, never the bf16 block's) says so, once the scaling has
        an earlier call's amaxes."""
        return super()._fused(f"fp8-{kind}", shape, conv) and self.scaling.calls > 1

    def _pair_conv(self, conv: nn.Conv2d, pair: Pair, bias, prologue, residual=None,
                   next_norm: NextNorm | None = None, concat=None, resample=None):
        """The fused block on e4m3 operands at the history's scales, its inputs' amaxes,
        found by the kernel, recorded as the unfused convolutions record theirs."""
        a, d, s = pair
        slot = 2 * conv.fp8_slot
        q = E4M3Operands(conv.weight_e4m3, conv.weight_scale, self.scaling.scale_for(slot),
                         self.scaling.scale_for(slot + 1))
        amax = torch.zeros(2, device=a.device)
        out = pair_conv2d(a, d, s, conv.weight, bias, padding=conv.padding, prologue=prologue,
                          residual=residual, concat=concat, next_norm=next_norm, quantized=q,
                          amax_out=amax, resample=resample)
        self.scaling.record(slot, amax[0])
        self.scaling.record(slot + 1, amax[1])
        return (out[0], out[1], s), (out[2] if next_norm is not None else None)

    def _quantized(self, conv: nn.Conv2d, x: torch.Tensor, role: int, bias: bool):
        return e4m3_conv2d(conv, x, self.scaling.scale(2 * conv.fp8_slot + role, x), bias=bias)

    def _conv(self, conv: nn.Conv2d, pair: Pair, bias: bool = True) -> Pair:
        a, d, s = pair
        return self._quantized(conv, a, 0, bias), self._quantized(conv, d, 1, False), s

    def _library_head(self, h: Pair) -> torch.Tensor:
        normed = self._norm_silu_pair(self.out_norm, h)
        return self._quantized(self.out_conv, normed[1], 1, False)

    def forward(self, a: torch.Tensor, d: torch.Tensor, t: torch.Tensor, d_scale: torch.Tensor):
        self.scaling.begin_call()
        return super().forward(a, d, t, d_scale)
