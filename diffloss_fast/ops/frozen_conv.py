"""Convolution with a frozen weight, whose backward pass keeps only the weight.

Autograd's convolution saves its input for the backward pass whatever needs a gradient, but
the input's gradient needs only the weight and the output's gradient (cuDNN's dgrad); the input
is read only for the weight's gradient, which a frozen prior never asks for. In the prior every
3x3 convolution reads the SiLU output of the norm before it, so saving it kept one more
activation per ResBlock alive until the backward pass (for ADM-256 about a third of what the
restored branch keeps). Here the forward keeps the weight and the input's shape, and the
backward computes the input's gradient as the transposed convolution of the output's gradient
(the same dgrad kernels), in the input's layout.

``torch.nn.grad.conv2d_input`` would compute the same, but it hands ATen's convolution
backward an expanded stand-in for the input, which that copies into a real input-sized tensor
before the dgrad: a write of every input a convolution has, for nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .checks import is_channels_last


def _channels_last_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight with channels_last strides, so that the input's gradient comes back
    channels_last: the backward has no input to take the layout from, only the weight. A 1x1
    kernel is contiguous in both layouts but keeps NCHW strides; a view gives it the other
    strides over the same memory, so no copy is made."""
    if is_channels_last(weight):
        return weight
    if weight.is_contiguous(memory_format=torch.channels_last):
        c_out, c_in, kh, kw = weight.shape
        return weight.as_strided(weight.shape, (c_in * kh * kw, 1, kw * c_in, c_in),
                                 weight.storage_offset())
    return weight.contiguous(memory_format=torch.channels_last)


def _output_padding(in_shape, out_shape, weight_shape, stride, padding, dilation) -> tuple:
    """The rows/columns a strided convolution dropped, which its transpose must add back to
    give the input's size."""
    return tuple(in_shape[d] - ((out_shape[d] - 1) * stride[d - 2] - 2 * padding[d - 2]
                                + dilation[d - 2] * (weight_shape[d] - 1) + 1)
                 for d in (2, 3))


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.config = (x.shape, stride, padding, dilation, groups)
        ctx.channels_last = is_channels_last(x)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return input_gradient(grad, weight, ctx.config, ctx.channels_last), *(None,) * 6


def input_gradient(grad: torch.Tensor, weight: torch.Tensor, config: tuple,
                   channels_last: bool) -> torch.Tensor:
    """The gradient of a convolution's input from its output's gradient and its weight
    alone (dgrad), in the input's layout. ``config``: (input shape, stride, padding, dilation,
    groups)."""
    shape, stride, padding, dilation, groups = config
    if channels_last:
        weight = _channels_last_weight(weight)
    return F.conv_transpose2d(grad, weight, None, stride, padding,
                              _output_padding(shape, grad.shape, weight.shape, stride, padding,
                                              dilation),
                              groups, dilation)


def frozen_conv2d(conv: nn.Conv2d, x: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
    """``conv(x)``, differentiable to ``x`` only, keeping only the weight for the backward.
    ``bias=False`` leaves the convolution's bias out, for a later kernel to add."""
    if conv.weight.requires_grad or (conv.bias is not None and conv.bias.requires_grad):
        raise ValueError("frozen_conv2d: the convolution's weight and bias must not require "
                         "grad (the prior is frozen)")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"frozen_conv2d: numeric zero padding only, got "
                         f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    b = conv.bias if bias else None
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.conv2d(x, conv.weight, b, conv.stride, conv.padding, conv.dilation,
                        conv.groups)
    return _FrozenConv2d.apply(x, conv.weight, b, conv.stride, conv.padding, conv.dilation,
                               conv.groups)
