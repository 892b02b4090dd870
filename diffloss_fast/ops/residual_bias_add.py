"""A ResBlock's residual sum with its convolutions' bias: ``x + y + bias[c]`` in one pass.

Every ResBlock of the prior ends in ``skip(x) + conv(h)``. PyTorch adds a convolution's bias
after cuDNN's kernel, as a pass of its own over the output: one more read and write of every
activation a convolution makes. Run without their biases, the last convolution and a 1x1 skip
convolution leave the sum of both biases to this kernel, which reads x and y and writes the
sum once, as the plain residual add did. The gradient goes unchanged to
x and y; the bias is the frozen prior's and gets none.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton_common import TRITON_DTYPES, cdiv, require_triton, triton, tl
from .autocast import without_autocast
from .checks import is_channels_last


def residual_bias_add_torch(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin: the definition the kernel is tested against."""
    return x + y + bias.reshape(1, -1, 1, 1)


_BLOCK = 2048

if triton is not None:

    @triton.jit
    def _residual_bias_add_kernel(x_ptr, y_ptr, b_ptr, out_ptr, numel, C, HW,
                                  BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = off < numel
        c = off % C if CHANNELS_LAST else (off // HW) % C
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, (x + y + b).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + y + bias in x's memory format (y copied to it if it differs)."""
    cl = is_channels_last(x)
    layout = torch.channels_last if cl else torch.contiguous_format
    x, y = x.contiguous(memory_format=layout), y.contiguous(memory_format=layout)
    out = torch.empty_like(x)
    N, C, H, W = x.shape
    if out.numel():
        _residual_bias_add_kernel[(cdiv(out.numel(), _BLOCK),)](
            x, y, bias, out, out.numel(), C, H * W, BLOCK=_BLOCK, CHANNELS_LAST=cl,
            num_warps=4)
    return out


class _ResidualBiasAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, bias):
        ctx.needs = ctx.needs_input_grad[:2]
        return _launch(x, y, bias)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        return (grad if ctx.needs[0] else None), (grad if ctx.needs[1] else None), None


def residual_bias_add_triton(x: torch.Tensor, y: torch.Tensor,
                             bias: torch.Tensor) -> torch.Tensor:
    """Fused Triton version of :func:`residual_bias_add_torch`; differentiable in x and y."""
    require_triton("residual_bias_add_triton")
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"residual_bias_add: x and y must be 4-D (N, C, H, W) tensors of one "
                         f"shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in TRITON_DTYPES:
        raise ValueError(f"residual_bias_add: x and y must share one of fp32/fp16/bf16, got "
                         f"{x.dtype} and {y.dtype}")
    if bias.numel() != x.shape[1]:
        raise ValueError(f"residual_bias_add: bias must have one value per channel "
                         f"({x.shape[1]}), got shape {tuple(bias.shape)}")
    if bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("residual_bias_add: the bias is the frozen prior's and must not "
                         "require grad")
    if not x.device == y.device == bias.device:
        raise ValueError(f"residual_bias_add: x, y and bias must share a device, got "
                         f"{x.device}, {y.device} and {bias.device}")
    bias = bias.reshape(-1).contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _ResidualBiasAdd.apply(x, y, bias)
    return _launch(x, y, bias)
