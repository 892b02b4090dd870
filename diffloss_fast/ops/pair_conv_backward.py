"""The pair convolution's input gradient with the norm's partial sums in the dgrad's epilogue.

After a prologue, the gradient with respect to the convolution's input d is the transposed
convolution of the output's gradient (dgrad: dy, the gradient at the norm's output) followed
by the GroupNorm (+ FiLM) (+ SiLU) backward at the restored point r. That backward needs, per
(sample, group), the sums of dxhat and dxhat * xhat over every pixel before it can write any
dx; unfused, a pass of its own reads r and dy back to form them. Here the dgrad's epilogue,
which holds a tile of dy at known pixels and channels, loads r there and adds up its
channels' partial sums: the stats pass, a full read of r and dy, is gone, for one read of r
in the epilogue. The group kernel folds the partials and the norm's apply pass writes dx, as
unfused.

The partial sums are of dy as stored (the fp32 accumulator rounded to the storage dtype), the
dy the apply pass reads: the result is the unfused backward's of the same dy, up to the order
of fp32 sums. Each (sample, pixel tile) program row writes its own slot of partials for the
channels of its channel tile; a GroupNorm's per-channel sums need nothing from the other
channel tiles, so a group may straddle them.

A prologue that ends in a 2x resampling (a ResBlock that changes resolution) puts the
resampling's adjoint between the two: the dgrad's output is at the convolution's input, the
norm's input is of the other size. There the dgrad writes dy alone, one resampling kernel
takes it back to r's size, and the norm's own backward (its statistics pass included) runs on
that.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._conv_common import _conv_launch, _precision
from ._triton_common import cdiv, next_power_of_2, require_triton, triton, tl
from .group_norm_silu import _backward as _gn_backward
from .group_norm_silu import _launch as _gn_launch
from .resample_2x import _pool, _upsample

_CL = torch.channels_last


class SavedNorm(NamedTuple):
    """What the pair convolution's backward keeps of its prologue: r (N, C, H, W),
    channels_last, the restored input; the per-(sample, group) mean of r + x_bias and its
    1/std, flat (N * G), fp32; the norm's weight and bias (C,); FiLM's scale and shift (N, C)
    with one row stride (None or anything, never read, without ``film``); x_bias (C,) (the
    same without ``has_xb``); the number of groups and the options."""
    r: torch.Tensor
    mean_r: torch.Tensor
    rstd_r: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    x_bias: torch.Tensor
    num_groups: int
    film: bool
    has_xb: bool
    silu: bool


if triton is not None:
    from ._conv_common import _gemm_tile, _mm, _to
    from .group_norm_silu import (_affine, _dxhat_of, _gn_group_kernel, _gn_silu_bwd_kernel,
                                  _store_partials)

    @triton.jit
    def _dgrad_norm_kernel(g_ptr, w_ptr, dy_ptr, r_ptr, part_ptr, mean_ptr, rstd_ptr, gw_ptr,
                           gb_ptr, sc_ptr, sh_ptr, xb_ptr, H, W, Cin, Cout, G, scN,
                           sw_o, sw_c, sw_y, sw_x, Cg: tl.constexpr, KH: tl.constexpr,
                           KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_FILM: tl.constexpr,
                           HAS_XB: tl.constexpr, SILU: tl.constexpr, PRECISION: tl.constexpr,
                           INTERPRETED: tl.constexpr):
        """A tile of input pixels x input channels of one sample's dy, as the implicit GEMM of
        a 'same'-padded stride-1 convolution's input gradient: the reduction runs over (tap,
        output channel) of the output's gradient at the pixels each tap maps the input pixel
        to. Channels_last in and out. NORM: then, from the stored (rounded) dy and r at the
        same elements, part[n, pixel tile, 0 | 1, c] = the tile's sums of dxhat and
        dxhat * xhat for its channels."""
        n, _, pid_m, m, m_ok, ih, iw, ci, ci_ok = _gemm_tile(H, W, Cin, BLOCK_M, BLOCK_N)
        HW = H * W
        kc = tl.arange(0, BLOCK_K)
        g_base = g_ptr + n.to(tl.int64) * HW * Cout
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        c_blocks = tl.cdiv(Cout, BLOCK_K)
        for kk in range(0, KH * KW * c_blocks):
            tap = kk // c_blocks
            co = (kk - tap * c_blocks) * BLOCK_K + kc
            ky = tap // KW
            kx = tap - ky * KW
            oh = ih - (ky - KH // 2)
            ow = iw - (kx - KW // 2)
            pix_ok = m_ok & (oh >= 0) & (oh < H) & (ow >= 0) & (ow < W)
            co_ok = co < Cout
            g = tl.load(g_base + (oh * W + ow)[:, None] * Cout + co[None, :],
                        mask=pix_ok[:, None] & co_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + co[:, None] * sw_o + ci[None, :] * sw_c + ky * sw_y + kx * sw_x,
                         mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
            acc = _mm(g, wt, acc, PRECISION, INTERPRETED)
        out = n.to(tl.int64) * HW * Cin + m[:, None] * Cin + ci[None, :]
        mask = m_ok[:, None] & ci_ok[None, :]
        dy = _to(acc, dy_ptr.dtype.element_ty, INTERPRETED)
        tl.store(dy_ptr + out, dy, mask=mask)
        if NORM:
            grp = n * G + ci // Cg
            mean = tl.load(mean_ptr + grp, mask=ci_ok, other=0.0)
            rstd = tl.load(rstd_ptr + grp, mask=ci_ok, other=0.0)
            mul, add, dgain, centre = _affine(ci, ci_ok, gw_ptr, gb_ptr, sc_ptr, sh_ptr, xb_ptr,
                                              n, scN, mean, rstd, HAS_FILM, HAS_XB)
            x = tl.load(r_ptr + out, mask=mask, other=0.0).to(tl.float32)
            xhat, dxhat = _dxhat_of(x, dy.to(tl.float32), mask, mul, add, dgain, centre, rstd,
                                    SILU)
            _store_partials(part_ptr, n, pid_m, tl.num_programs(1), Cin, ci, ci_ok, dxhat,
                            dxhat * xhat)


def _dgrad(grad, weight, cin, norm: SavedNorm | None = None):
    """dy, channels_last in grad's dtype, and with ``norm`` the partial sums
    (N, pixel tiles, 2, cin), fp32 (else None). grad channels_last."""
    N, Cout, H, W = grad.shape
    KH, KW = weight.shape[2:]
    HW = H * W
    dy = torch.empty((N, cin, H, W), dtype=grad.dtype, device=grad.device, memory_format=_CL)
    if dy.numel() == 0:
        part = None if norm is None else dy.new_zeros((N, 0, 2, cin), dtype=torch.float32)
        return dy, part
    precision = _precision(grad.dtype)
    k = _conv_launch(HW, Cout, cin, grad.element_size(), False,
                     grad.dtype == torch.float32 and precision == "ieee")
    grid = (cdiv(cin, k.block_n), cdiv(HW, k.block_m), N)
    if norm is None:
        part = None
        tensors = (grad,) * 9  # never read
        G, Cg, scN, film, has_xb, silu = 1, 1, 0, False, False, False
    else:
        part = torch.empty((N, grid[1], 2, cin), dtype=torch.float32, device=grad.device)
        tensors = (norm.r, part, *norm[1:8])
        G, film, has_xb, silu = norm.num_groups, norm.film, norm.has_xb, norm.silu
        Cg, scN = cin // G, norm.scale.stride(0)
    _dgrad_norm_kernel[grid](grad, weight, dy, *tensors, H, W, cin, Cout, G, scN,
                             *weight.stride(), Cg=Cg, KH=KH, KW=KW, BLOCK_M=k.block_m,
                             BLOCK_N=k.block_n, BLOCK_K=k.block_k, NORM=norm is not None,
                             HAS_FILM=film, HAS_XB=has_xb, SILU=silu, PRECISION=precision,
                             INTERPRETED=grad.device.type == "cpu", num_warps=k.num_warps,
                             num_stages=k.num_stages)
    return dy, part


def _norm_backward(norm: SavedNorm, dy, part):
    """dx from dy and the dgrad's partial sums: the group kernel folds them (over as many
    partials as there were pixel tiles), the norm's apply pass writes dx, channels_last."""
    r = norm.r
    N, C, H, W = r.shape
    HW, G = H * W, norm.num_groups
    Cg, split = C // G, part.shape[1]
    ma = torch.empty(N * G, dtype=torch.float32, device=r.device)
    mb = torch.empty_like(ma)
    _gn_group_kernel[(N * G,)](part, r, norm.x_bias, ma, mb, HW, G, C, Cg, split, 0.0,
                               BLOCK_P=max(2, min(64, next_power_of_2(split))),
                               BLOCK_G=max(2, next_power_of_2(Cg)), FORWARD=False,
                               HAS_XB=norm.has_xb, num_warps=4)
    dx = torch.empty_like(r, memory_format=_CL)
    k = _gn_launch(N, G, HW, C)
    _gn_silu_bwd_kernel[(N, k.split)](
        r, dy, dx, dx, norm.mean_r, norm.rstd_r, ma, mb, norm.weight, norm.bias, norm.scale,
        norm.shift, norm.x_bias, HW, G, C, Cg, norm.scale.stride(0), k.s_per,
        BLOCK_S=k.block_s, BLOCK_CC=k.block_cc, HAS_FILM=norm.film, HAS_XB=norm.has_xb,
        HAS_DP=False, SILU=norm.silu, num_warps=k.num_warps)
    return dx


def _resampled_norm_backward(norm: SavedNorm, dy, resample: str):
    """dx at r's size from dy at the resampled size: the resampling's adjoint (an upsampling's
    is the sum of each pixel's four copies, a 2x2 average's a quarter of the gradient to each
    of the four), then the norm's backward."""
    dy = _pool(dy, 1.0, True) if resample == "up" else _upsample(dy, 0.25, True)
    r = norm.r
    N, C, H, W = r.shape
    G = norm.num_groups
    return _gn_backward(r, dy, None, norm.mean_r, norm.rstd_r, norm.weight, norm.bias,
                        norm.scale, norm.shift, norm.x_bias, G, norm.film, norm.has_xb,
                        norm.silu, _gn_launch(N, G, H * W, C))


def pair_conv_input_gradient(grad: torch.Tensor, weight: torch.Tensor, cin: int,
                             norm: SavedNorm | None = None,
                             resample: str | None = None) -> torch.Tensor:
    """The gradient with respect to the input of a 'same'-padded stride-1 convolution
    (``weight`` (Cout, cin, kh, kw), odd kernels, any strides) from its output's gradient
    ``grad`` (N, Cout, H, W), channels_last in grad's dtype: after the prologue ``norm``,
    with respect to the norm's input, at r; with ``resample`` (``"up"`` or ``"down"``, with
    ``norm``) through the prologue's 2x resampling too, to r's size. fp32 products follow
    ``torch.backends.cudnn.allow_tf32``."""
    require_triton("pair_conv_input_gradient")
    grad = grad.contiguous(memory_format=_CL)
    if norm is not None:
        p = norm.weight  # stands in, never read, for what an option leaves out
        norm = norm._replace(r=norm.r.contiguous(memory_format=_CL),
                             scale=norm.scale if norm.film else p,
                             shift=norm.shift if norm.film else p,
                             x_bias=norm.x_bias if norm.has_xb else p)
    if resample is not None:
        dy, _ = _dgrad(grad, weight, cin)
        return _resampled_norm_backward(norm, dy, resample)
    dy, part = _dgrad(grad, weight, cin, norm)
    if norm is None or dy.numel() == 0:
        return dy
    return _norm_backward(norm, dy, part)
