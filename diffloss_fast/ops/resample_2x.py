"""ADM's 2x resampling: 2x2 average pooling and nearest-neighbour 2x upsampling, each the
other's backward.

ADM's ResBlocks downsample both of their paths with ``avg_pool2d(h, 2)`` and upsample them
with ``interpolate(h, scale_factor=2, mode="nearest")``. For a 2x2 window with stride 2 over
even sizes, each input pixel of the pooling gets a quarter of its window's gradient (a scaled
upsampling), and each input pixel of the upsampling the sum of its four copies' gradients (a
pooling, times 4). So neither needs to keep anything of its input for the backward pass.

- :func:`avg_pool_2x2` and :func:`upsample_2x_torch`: PyTorch's ops with these backward passes
  (autograd's own pooling backward makes several passes over memory);
- :func:`avg_pool_2x2_triton` and :func:`upsample_2x_triton`: one Triton kernel per direction,
  each a single pass that reads and writes in the tensors' own layout, where PyTorch's
  channels_last pooling and upsampling kernels run far above the bandwidth floor
  (``benchmarks/test_bench_ops.py`` times both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton_common import INT32_MAX, TRITON_DTYPES, cdiv, require_triton, triton, tl
from .autocast import without_autocast
from .checks import is_channels_last


class _AvgPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return F.avg_pool2d(x, 2)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        return F.interpolate(grad * 0.25, scale_factor=2, mode="nearest")


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)``; its backward upsamples instead of pooling backward and keeps
    nothing of x. Odd sizes (whose last row or column the window drops) take the plain op."""
    if x.shape[-1] % 2 or x.shape[-2] % 2 or not (torch.is_grad_enabled() and x.requires_grad):
        return F.avg_pool2d(x, 2)
    return _AvgPool2x2.apply(x)


def upsample_2x_torch(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")``: the twin of the Triton kernel."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _nchw_at(i, C, H, W, CHANNELS_LAST: tl.constexpr):
        """(n, c, h, w) of element i of an (N, C, H, W) tensor dense in the given layout.
        (``_triton_common.chw`` splits an index within one sample; splitting i by C * H * W
        first hides from Triton that channels_last c runs contiguously, and its loads stop
        being vectorized.)"""
        if CHANNELS_LAST:
            c = i % C
            r = i // C
            w = r % W
            r = r // W
            h = r % H
            n = r // H
        else:
            w = i % W
            r = i // W
            h = r % H
            r = r // H
            c = r % C
            n = r // C
        return n, c, h, w

    @triton.jit
    def _pool_2x2_kernel(x_ptr, out_ptr, numel, C, Ho, Wo, sN, sC, sH, sW, scale,
                         BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        """out[n, c, h, w] = scale * (sum of x over the 2x2 window at (2h, 2w)); x strided,
        out dense in the chosen layout."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        n, c, h, w = _nchw_at(i, C, Ho, Wo, CHANNELS_LAST)
        base = (n.to(tl.int64) * sN + c.to(tl.int64) * sC + (2 * h).to(tl.int64) * sH
                + (2 * w).to(tl.int64) * sW)
        acc = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(x_ptr + base + sW, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(x_ptr + base + sH, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(x_ptr + base + sH + sW, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _upsample_2x_kernel(x_ptr, out_ptr, numel, C, H2, W2, sN, sC, sH, sW, scale,
                            BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        """out[n, c, h, w] = scale * x[n, c, h // 2, w // 2]; x strided, out dense in the chosen
        layout."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        n, c, h, w = _nchw_at(i, C, H2, W2, CHANNELS_LAST)
        src = (n.to(tl.int64) * sN + c.to(tl.int64) * sC + (h // 2).to(tl.int64) * sH
               + (w // 2).to(tl.int64) * sW)
        v = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32) * scale
        tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=mask)


def _resample(kernel, x: torch.Tensor, out_hw: tuple[int, int], scale: float,
              channels_last: bool) -> torch.Tensor:
    """Launch one of the kernels: out (N, C, *out_hw), dense in the chosen layout."""
    N, C = x.shape[:2]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((N, C, *out_hw), dtype=x.dtype, device=x.device, memory_format=layout)
    if out.numel():
        kernel[(cdiv(out.numel(), _BLOCK),)](
            x, out, out.numel(), C, *out_hw, *x.stride(), scale, BLOCK=_BLOCK,
            CHANNELS_LAST=channels_last, num_warps=4)
    return out


def _pool(x, scale, channels_last):
    return _resample(_pool_2x2_kernel, x, (x.shape[2] // 2, x.shape[3] // 2), scale,
                     channels_last)


def _upsample(x, scale, channels_last):
    return _resample(_upsample_2x_kernel, x, (2 * x.shape[2], 2 * x.shape[3]), scale,
                     channels_last)


class _Resample2xTriton(torch.autograd.Function):
    """One direction forward, the other backward (each a (kernel launcher, scale) pair):
    nothing of x is kept but its layout."""

    @staticmethod
    def forward(ctx, x, there, back):
        ctx.channels_last, ctx.back = is_channels_last(x), back
        return there[0](x, there[1], ctx.channels_last)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        return ctx.back[0](grad, ctx.back[1], ctx.channels_last), None, None


def _resample_2x(x: torch.Tensor, there: tuple, back: tuple) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Resample2xTriton.apply(x, there, back)
    return there[0](x, there[1], is_channels_last(x))


def _triton_ready(x: torch.Tensor, op: str, out_numel: int) -> bool:
    """Whether the kernel takes x (it indexes elements with int32); refuses what the torch op
    would not take either."""
    require_triton(f"{op}_triton")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}: the triton kernel takes fp32/fp16/bf16, got {x.dtype}")
    return max(out_numel, x.numel()) <= INT32_MAX


def avg_pool_2x2_triton(x: torch.Tensor) -> torch.Tensor:
    """Fused Triton version of :func:`avg_pool_2x2` (odd sizes and tensors of 2^31 elements
    or more take it too)."""
    if not _triton_ready(x, "avg_pool_2x2", x.numel() // 4) or x.shape[-1] % 2 or x.shape[-2] % 2:
        return avg_pool_2x2(x)
    return _resample_2x(x, there=(_pool, 0.25), back=(_upsample, 0.25))


def upsample_2x_triton(x: torch.Tensor) -> torch.Tensor:
    """Fused Triton version of :func:`upsample_2x_torch` (tensors whose output has 2^31
    elements or more take it)."""
    if not _triton_ready(x, "upsample_2x", 4 * x.numel()):
        return upsample_2x_torch(x)
    return _resample_2x(x, there=(_upsample, 1.0), back=(_pool, 1.0))
