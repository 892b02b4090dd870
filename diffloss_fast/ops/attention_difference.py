"""Softmax attention on a (target, difference) pair: ``attn(a + d) - attn(a)`` without
cancellation (see :mod:`diffloss_fast.ops.difference` for why the prior runs on pairs).

``S_d = (q_a k_d + q_d k_a + q_d k_d) * scale`` exactly, then ``P_r - P_a = P_a * expm1(S_d -
log1p(sum_j P_a expm1(S_d)))`` row by row, and ``o_r - o_a = (P_r - P_a) v_a + P_r v_d``.

The backward is the plain attention's at the restored point, whose q, k and v the forward saves.
Both implementations of the forward share that backward: :func:`attention_difference_torch`, the
twin that defines the op, and the fused Triton kernel of :func:`attention_difference_triton`.

The kernel. One program takes one (batch, head) and a block of queries, and walks the keys in
blocks twice, never holding a score matrix in memory:

- pass 1 computes ``S_a`` and ``S_d`` for each key block and keeps, per query row, the running
  maximum ``m`` of ``S_a``, ``l = sum exp(S_a - m)`` and ``u = sum exp(S_a - m) expm1(S_d)``
  (both rescaled when ``m`` grows); then ``L = log1p(u / l)``, the log of the ratio of the two
  softmax normalizers. ``L`` is needed before any ``P_r - P_a`` can be formed without
  cancellation, which is why one online pass (as plain flash attention makes) is not enough;
- pass 2 recomputes the scores and accumulates ``p_a v_a`` and ``dp v_a + (p_a + dp) v_d``
  with ``p_a = exp(S_a - m) / l`` and ``dp = p_a expm1(S_d - L)``.

Precision: every product is formed in fp32. The scores are dots of the stored bf16/fp16
operands themselves, whose products are exact, accumulated in fp32; ``S_d`` is summed from
``q_a k_d + q_d k_a`` and ``q_d k_d / d_scale``, so that no sum of an activation and a
difference is ever rounded back to the storage format. The probabilities are fp32; each is
split into its storage-format rounding and the rounding of the remainder, and both parts are
multiplied into the values, so that the probabilities lose about 2^-16 (bf16) or 2^-22 (fp16)
rather than the storage format's own epsilon, which would rival the output's rounding. ``dp``
enters that product multiplied by ``d_scale``, at the scale where the stored differences sit,
so that fp16 does not flush it. fp32 operands use IEEE fp32 dots (not TF32), on FMA units. Triton
has no expm1 or log1p: :func:`_expm1` and :func:`_log1p` are short series for small
arguments, which is where the op lives, and the library exp and log elsewhere. The kernel
overflows about where the twin does (``S_d`` of several tens).

Shapes: any sequence lengths (query and key blocks are masked) and head dims up to 128 for
bf16/fp16, 64 for fp32, padded to a power of two of at least 16 (``tl.dot``'s smallest).
Wider heads run the twin (their tiles would outgrow the registers; fp32 dots hold whole
operand rows per thread), as do empty operands. Operands may have any strides: the attention block
hands over transposed views of its qkv projection. The outputs are ``(B, H, T, dh)`` views of
``(B, T, H, dh)`` memory, the layout in which the block flattens heads back into channels
without a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton_common import (TRITON_DTYPES, cdiv, needs_i64, next_power_of_2, require_triton,
                             triton, tl)
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
    """Forward: ``forward_impl``'s stable difference (the twin or the kernel); backward: plain
    attention's at the restored point, which both forwards share."""

    @staticmethod
    def forward(ctx, forward_impl, q_d, k_d, v_d, q_a, k_a, v_a, d_scale):
        out_a, out_d = forward_impl(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
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
        return (None, *(g.to(grad_d.dtype) for g in grads), None, None, None, None)


def _pair_attention(forward_impl, q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """``forward_impl``'s outputs, through the shared autograd Function when a difference needs
    a gradient."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_d, k_d, v_d))):
        return forward_impl(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
    return _AttentionDifference.apply(forward_impl, q_d, k_d, v_d, q_a.detach(), k_a.detach(),
                                      v_a.detach(), d_scale)


def attention_difference(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """``(attn(a), (attn(a + d / d_scale) - attn(a)) * d_scale)``, differentiable to the
    differences only."""
    return _pair_attention(attention_difference_torch, q_a, k_a, v_a, q_d, k_d, v_d, d_scale)


# --- the fused Triton forward ---------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _expm1(x):
        """exp(x) - 1 in fp32 without cancellation: below |x| = 1/2 the Taylor series to x^8
        (truncation under 2^-26 relative), the library exp above (where exp(x) - 1 loses at
        most a few ulps)."""
        # 1/k! for k = 1..8
        c = 1.9841269841269841e-4 + x * 2.4801587301587302e-5
        c = 1.3888888888888889e-3 + x * c
        c = 8.3333333333333332e-3 + x * c
        c = 4.1666666666666664e-2 + x * c
        c = 1.6666666666666666e-1 + x * c
        series = x * (1.0 + x * (0.5 + x * c))
        return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)

    @triton.jit
    def _log1p(y):
        """log(1 + y) in fp32 for small y: below |y| = 1/2, 2 atanh(z) with z = y / (2 + y)
        (|z| <= 1/3) by its odd series to z^13 (truncation under 2^-26 relative); the library
        log above, where 1 + y loses nothing that matters."""
        z = tl.math.div_rn(y, 2.0 + y)
        z2 = z * z
        # 1/(2k + 1) for k = 1..6
        c = 9.0909090909090909e-2 + z2 * 7.6923076923076923e-2
        c = 1.1111111111111111e-1 + z2 * c
        c = 1.4285714285714285e-1 + z2 * c
        c = 2.0e-1 + z2 * c
        series = 2.0 * z * (1.0 + z2 * (3.3333333333333333e-1 + z2 * c))
        return tl.where(tl.abs(y) < 0.5, series, tl.log(1.0 + y))

    @triton.jit
    def _mm(x, y, acc, F32: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc + x @ y of two operands of the storage dtype: exact products, fp32 sums (IEEE
        fp32 dots for fp32 storage, never TF32). Triton's CPU interpreter multiplies bf16 bit
        patterns as integers: there the operands go up to fp32 first, which computes the same
        exact products."""
        if F32:
            return tl.dot(x, y, acc, input_precision="ieee")
        if INTERPRETED:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, y, acc)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
        """fp32 x rounded to nearest (even) in ``dtype``. Triton's CPU interpreter truncates
        fp32 to bf16: there the rounding is done on the bits first, so that the interpreted
        kernel rounds as the compiled one does."""
        if INTERPRETED and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _mm_split(p, v, acc, F32: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc + p @ v for fp32 p and storage-dtype v: p as its storage-dtype rounding plus that
        of the remainder, so that p keeps about twice the storage format's mantissa bits. The
        remainder is multiplied by the inverse of the format's rounding step (a power of two)
        before it is rounded, so that fp16 does not flush it into its subnormals."""
        if F32:
            return tl.dot(p, v, acc, input_precision="ieee")
        if v.dtype == tl.float16:
            up = 2048.0
        else:
            up = 256.0
        hi = _round_to(p, v.dtype, INTERPRETED)
        lo = _round_to((p - hi.to(tl.float32)) * up, v.dtype, INTERPRETED)
        zero = tl.zeros(acc.shape, tl.float32)
        return _mm(hi, v, acc, F32, INTERPRETED) + _mm(lo, v, zero, F32, INTERPRETED) * (1.0 / up)

    @triton.jit
    def _scores(qa, qd, ka_ptrs, kd_ptrs, kvalid, dmask, inv_s, scale, F32: tl.constexpr,
                INTERPRETED: tl.constexpr):
        """(S_a, S_d) of a query block against one key block, k loaded as (dh, keys); S_a is
        -inf past the last key (S_d is 0 there)."""
        kmask = dmask[:, None] & kvalid[None, :]
        ka = tl.load(ka_ptrs, mask=kmask, other=0.0)
        kd = tl.load(kd_ptrs, mask=kmask, other=0.0)
        zero = tl.zeros((qa.shape[0], ka.shape[1]), tl.float32)
        s_a = _mm(qa, ka, zero, F32, INTERPRETED) * scale
        # q_a k_d + q_d k_a + (q_d k_d) / d_scale, all in units of the stored differences
        cross = _mm(qd, ka, _mm(qa, kd, zero, F32, INTERPRETED), F32, INTERPRETED)
        s_d = (cross + _mm(qd, kd, zero, F32, INTERPRETED) * inv_s) * (inv_s * scale)
        s_a = tl.where(kvalid[None, :], s_a, float("-inf"))
        return s_a, s_d

    @triton.jit
    def _attn_diff_fwd_kernel(
            qa_ptr, ka_ptr, va_ptr, qd_ptr, kd_ptr, vd_ptr, ds_ptr, oa_ptr, od_ptr,
            H, TQ, TK, D, scale,
            qas0, qas1, qas2, qas3, kas0, kas1, kas2, kas3, vas0, vas1, vas2, vas3,
            qds0, qds1, qds2, qds3, kds0, kds1, kds2, kds3, vds0, vds1, vds2, vds3,
            oas0, oas1, oas2, oas3, ods0, ods1, ods2, ods3,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            F32: tl.constexpr, INTERPRETED: tl.constexpr, I64: tl.constexpr):
        bh = tl.program_id(0)  # batch * heads on the axis without CUDA's 65535 limit
        pid_m = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        keys0 = tl.arange(0, BLOCK_N)
        if I64:
            b = b.to(tl.int64)
            h = h.to(tl.int64)
            rows = rows.to(tl.int64)
            cols = cols.to(tl.int64)
            keys0 = keys0.to(tl.int64)
        rmask = rows < TQ
        dmask = cols < D

        s = tl.load(ds_ptr).to(tl.float32)
        inv_s = tl.math.div_rn(1.0, s)
        qmask = rmask[:, None] & dmask[None, :]
        qa = tl.load(qa_ptr + b * qas0 + h * qas1 + rows[:, None] * qas2 + cols[None, :] * qas3,
                     mask=qmask, other=0.0)
        qd = tl.load(qd_ptr + b * qds0 + h * qds1 + rows[:, None] * qds2 + cols[None, :] * qds3,
                     mask=qmask, other=0.0)
        # keys as (dh, keys) tiles, values as (keys, dh)
        ka_base = ka_ptr + b * kas0 + h * kas1 + cols[:, None] * kas3
        kd_base = kd_ptr + b * kds0 + h * kds1 + cols[:, None] * kds3
        va_base = va_ptr + b * vas0 + h * vas1 + cols[None, :] * vas3
        vd_base = vd_ptr + b * vds0 + h * vds1 + cols[None, :] * vds3

        # pass 1: row max m of S_a, l = sum exp(S_a - m), u = sum exp(S_a - m) expm1(S_d)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        u = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, TK, BLOCK_N):
            keys = n0 + keys0
            kvalid = keys < TK
            ka_ptrs = ka_base + keys[None, :] * kas2
            kd_ptrs = kd_base + keys[None, :] * kds2
            s_a, s_d = _scores(qa, qd, ka_ptrs, kd_ptrs, kvalid, dmask, inv_s, scale, F32,
                               INTERPRETED)
            m_new = tl.maximum(m, tl.max(s_a, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(s_a - m_new[:, None])
            l = l * alpha + tl.sum(e, axis=1)
            u = u * alpha + tl.sum(e * _expm1(s_d), axis=1)
            m = m_new
        inv_l = tl.math.div_rn(1.0, l)
        log_ratio = _log1p(u * inv_l)

        # pass 2: p_a = exp(S_a - m) / l, dp = p_a expm1(S_d - L) = P_r - P_a;
        # out_a = p_a v_a, out_d = d_scale (dp v_a + P_r v_d / d_scale) = (d_scale dp) v_a + P_r v_d
        acc_a = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        acc_d = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, TK, BLOCK_N):
            keys = n0 + keys0
            kvalid = keys < TK
            ka_ptrs = ka_base + keys[None, :] * kas2
            kd_ptrs = kd_base + keys[None, :] * kds2
            s_a, s_d = _scores(qa, qd, ka_ptrs, kd_ptrs, kvalid, dmask, inv_s, scale, F32,
                               INTERPRETED)
            p = tl.exp(s_a - m[:, None]) * inv_l[:, None]
            dp = p * _expm1(s_d - log_ratio[:, None])
            vmask = kvalid[:, None] & dmask[None, :]
            va = tl.load(va_base + keys[:, None] * vas2, mask=vmask, other=0.0)
            vd = tl.load(vd_base + keys[:, None] * vds2, mask=vmask, other=0.0)
            acc_a = _mm_split(p, va, acc_a, F32, INTERPRETED)
            acc_d = _mm_split(dp * s, va, acc_d, F32, INTERPRETED)
            acc_d = _mm_split(p + dp, vd, acc_d, F32, INTERPRETED)

        oa = oa_ptr + b * oas0 + h * oas1 + rows[:, None] * oas2 + cols[None, :] * oas3
        od = od_ptr + b * ods0 + h * ods1 + rows[:, None] * ods2 + cols[None, :] * ods3
        tl.store(oa, _round_to(acc_a, oa_ptr.dtype.element_ty, INTERPRETED), mask=qmask)
        tl.store(od, _round_to(acc_d, od_ptr.dtype.element_ty, INTERPRETED), mask=qmask)


def _check_triton(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    named = dict(q_a=q_a, k_a=k_a, v_a=v_a, q_d=q_d, k_d=k_d, v_d=v_d)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_difference_triton: {name} must be a tensor, got "
                            f"{type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention_difference_triton: {name} must be 4-D (batch, heads, "
                             f"tokens, head dim), got shape {tuple(t.shape)}")
        if t.dtype != q_a.dtype:
            raise ValueError(f"attention_difference_triton: every operand must have q_a's dtype "
                             f"{q_a.dtype}, {name} has {t.dtype}")
        if t.device != q_a.device:
            raise ValueError(f"attention_difference_triton: {name} is on {t.device}, q_a on "
                             f"{q_a.device}")
    if q_a.dtype not in TRITON_DTYPES:
        raise ValueError(f"attention_difference_triton: takes fp32/fp16/bf16 operands, got "
                         f"{q_a.dtype}; use attention_difference (the fp32/fp64 twin) for it")
    for x, y in (("q_a", "q_d"), ("k_a", "k_d"), ("v_a", "v_d")):
        if named[x].shape != named[y].shape:
            raise ValueError(f"attention_difference_triton: {x} and {y} must have the same "
                             f"shape, got {tuple(named[x].shape)} and {tuple(named[y].shape)}")
    B, H, _, D = q_a.shape
    if k_a.shape[:2] != (B, H) or v_a.shape[:2] != (B, H) or k_a.shape[3] != D:
        raise ValueError(f"attention_difference_triton: q, k and v must share batch and heads, "
                         f"and q and k the head dim, got q {tuple(q_a.shape)}, k "
                         f"{tuple(k_a.shape)}, v {tuple(v_a.shape)}")
    if v_a.shape[2] != k_a.shape[2] or v_a.shape[3] != D:
        raise ValueError(f"attention_difference_triton: v must have k's tokens and q's head "
                         f"dim, got k {tuple(k_a.shape)}, v {tuple(v_a.shape)}")
    if isinstance(d_scale, torch.Tensor):
        if d_scale.numel() != 1 or not d_scale.is_floating_point():
            raise ValueError(f"attention_difference_triton: d_scale must be one float, got a "
                             f"{d_scale.dtype} tensor of shape {tuple(d_scale.shape)}")
        if d_scale.device != q_a.device:
            raise ValueError(f"attention_difference_triton: d_scale is on {d_scale.device}, "
                             f"the operands on {q_a.device}")


def _launch_config(t_q: int, t_k: int, dh: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). Blocks are at least 16 (tl.dot's smallest) and
    at most what keeps the kernel in registers, with a margin, on Hopper and Ada alike: a query
    block holds q_a, q_d and two fp32 accumulators across the key loop, besides the score tiles
    of a key block. fp32 dots run on FMA units, where every thread holds whole operand rows and
    columns, hence the smallest blocks."""
    block_d = max(16, next_power_of_2(dh))
    if dtype == torch.float32:
        most_m, most_n = 16, 16
    elif block_d <= 64:
        most_m, most_n = 32, 32
    else:
        most_m, most_n = 16, 32
    block_m = min(most_m, max(16, next_power_of_2(t_q)))
    block_n = min(most_n, max(16, next_power_of_2(t_k)))
    return block_m, block_n, block_d, 4


def _kernel_takes(dh: int, dtype: torch.dtype) -> bool:
    """Head dims up to 128 (64 for fp32): beyond, a query block's tiles outgrow the registers."""
    return dh <= (64 if dtype == torch.float32 else 128)


def _attention_difference_kernel(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """The fused forward: ``attention_difference_torch``'s outputs from one kernel launch."""
    B, H, t_q, dh = q_a.shape
    t_k = k_a.shape[2]
    out_a = torch.empty((B, t_q, H, dh), dtype=q_a.dtype, device=q_a.device).transpose(1, 2)
    out_d = torch.empty_like(out_a)
    ds = (d_scale if isinstance(d_scale, torch.Tensor)
          else torch.tensor(float(d_scale), device=q_a.device))
    ds = ds.detach().reshape(()).to(torch.float32)
    block_m, block_n, block_d, num_warps = _launch_config(t_q, t_k, dh, q_a.dtype)
    ops = (q_a, k_a, v_a, q_d, k_d, v_d, out_a, out_d)
    _attn_diff_fwd_kernel[(B * H, cdiv(t_q, block_m))](
        q_a, k_a, v_a, q_d, k_d, v_d, ds, out_a, out_d, H, t_q, t_k, dh, dh ** -0.5,
        *(s for t in ops for s in t.stride()),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, F32=q_a.dtype == torch.float32,
        INTERPRETED=q_a.device.type == "cpu", I64=needs_i64(*ops), num_warps=num_warps)
    return out_a, out_d


def _attention_difference_fused(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """The kernel where it applies; the twin for head dims beyond the kernel's registers and
    for empty operands (an empty key set has no softmax to take)."""
    if not _kernel_takes(q_a.shape[-1], q_a.dtype) or 0 in q_a.shape or 0 in k_a.shape:
        return attention_difference_torch(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
    return _attention_difference_kernel(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)


def attention_difference_triton(q_a, k_a, v_a, q_d, k_d, v_d, d_scale):
    """:func:`attention_difference` with the fused Triton forward: ``(attn(a), (attn(a + d /
    d_scale) - attn(a)) * d_scale)`` for (B, heads, T, dh) operands of one dtype
    (fp32/fp16/bf16) and any strides; ``d_scale`` a one-element tensor on their device, read
    by the kernel (no host sync). Differentiable to the differences only; ``out_a`` is not.
    Head dims above 128 and empty operands run the twin."""
    require_triton("attention_difference_triton")
    _check_triton(q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
    return _pair_attention(_attention_difference_fused, q_a, k_a, v_a, q_d, k_d, v_d, d_scale)
