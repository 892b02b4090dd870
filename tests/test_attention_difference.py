"""The fused Triton forward of pair attention: against its torch twin and against float64
attention of the stored operands, over dtypes, ragged lengths, head dims, difference scales and
the strided views the attention block passes; the tiny bf16 differences it exists for, where
two bf16 attentions subtracted fail the same bound; its expm1 and log1p; its backward (the
twin's); its validation and fallbacks.

Error bounds. The kernel computes in fp32 from the stored operands and rounds each output once
to the storage dtype, so against float64 of the same operands an output element errs by at
most half the dtype's epsilon relative to itself, plus what fp32 loses on the way: at most
``n eps32`` (n = keys + head dim, the length of its longest sums) times the magnitude of
everything summed into that element, plus, for bf16/fp16, ``(eps / 2)^2`` times that
magnitude from the probabilities' two-part rounding; and the dtype's smallest subnormal where
an output rounds into the subnormals.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from diffloss_fast.ops._triton_common import triton, tl
from diffloss_fast.ops.attention_difference import (attention_difference,
                                                    attention_difference_torch,
                                                    attention_difference_triton)

# the package re-exports a function under the module's name: reach the module itself
module = importlib.import_module("diffloss_fast.ops.attention_difference")

pytestmark = pytest.mark.skipif(triton is None, reason="needs triton")

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
attn = F.scaled_dot_product_attention


def projection_views(batch, heads, tokens, dh, dtype, scale, seed):
    """q, k, v as the attention block passes them: (B, heads, T, dh) views, through a
    transpose, of one (B, T, heads * 3 * dh) projection (legacy order: head, q|k|v, dh)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, heads * 3 * dh, generator=gen, dtype=F64) * scale
    x = x.to(dtype).to(DEVICE)
    return [u.transpose(1, 2) for u in x.unflatten(-1, (heads, 3, dh)).unbind(3)]


def pair(tokens, dh, dtype, d_scale, d_rel, batch=1, heads=2, seed=0):
    """Stored operands: a ~ N(0, 1); d ~ N(0, d_rel^2), stored multiplied by d_scale."""
    return (projection_views(batch, heads, tokens, dh, dtype, 1.0, seed),
            projection_views(batch, heads, tokens, dh, dtype, d_rel * d_scale, seed + 1))


def reference(a, d, d_scale):
    """float64 of the stored operands: ``attn(a)`` and ``(attn(a + d / s) - attn(a)) * s``
    through scaled_dot_product_attention, and per element the magnitude of all that each
    output sums: ``p_a |v_a|``; and ``s`` times ``|p_r - p_a| |v_a| + p_r |v_d|`` plus the
    score difference's own terms, ``p_a |S_d terms| |v_a|``, whose fp32 rounding moves dp."""
    qa, ka, va = (t.double() for t in a)
    qd, kd, vd = (t.double() / d_scale for t in d)
    out_a = attn(qa, ka, va)
    out_d = (attn(qa + qd, ka + kd, va + vd) - out_a) * d_scale
    scale = qa.shape[-1] ** -0.5
    t = lambda x: x.abs().transpose(-1, -2)  # noqa: E731
    p_a = (qa @ ka.transpose(-1, -2) * scale).softmax(-1)
    p_r = ((qa + qd) @ (ka + kd).transpose(-1, -2) * scale).softmax(-1)
    s_d_terms = (qa.abs() @ t(kd) + qd.abs() @ (t(ka) + t(kd))) * scale
    mag_a = p_a @ va.abs()
    mag_d = ((p_r - p_a).abs() + p_a * s_d_terms) @ va.abs() + p_r @ vd.abs()
    return out_a, out_d, mag_a, mag_d * d_scale


def bound(want, mag, dtype, n_terms):
    """The module docstring's bound on |got - want| for an output of ``dtype``."""
    eps = torch.finfo(dtype).eps
    subnormal = torch.finfo(dtype).tiny * eps
    split = (eps / 2) ** 2 if dtype != torch.float32 else 0.0
    return eps / 2 * want.abs() + (n_terms * EPS32 + split) * mag + subnormal


def excess(got, want, limit):
    """Largest ratio of error to bound (<= 1: within it)."""
    return float(((got.double() - want).abs() / limit).max())


SHAPES = [(4, 8), (7, 32), (64, 64), (80, 32), (80, 64)]  # (tokens, head dim)
# a difference scale and the size of the true difference relative to the activations: 2**10
# for the small differences of high timesteps, 2**-6 for large ones, where the series give
# way to exp and log
SCALES = [(1.0, 1e-2), (2.0 ** 10, 1e-3), (2.0 ** -6, 0.5)]


@pytest.mark.parametrize("d_scale,d_rel", SCALES, ids=["s1", "s2^10", "s2^-6"])
@pytest.mark.parametrize("tokens,dh", SHAPES, ids=[f"T{t}-dh{d}" for t, d in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_matches_the_twin_and_float64(dtype, tokens, dh, d_scale, d_rel, true_fp32):
    """Both outputs within the bound of float64 attention of the stored operands, as the twin
    is, and within twice it of the twin (both bounds' sum); in the twin's dtype and shape."""
    a, d = pair(tokens, dh, dtype, d_scale, d_rel)
    s = torch.tensor(d_scale, device=DEVICE)
    got_a, got_d = attention_difference_triton(*a, *d, s)
    twin_a, twin_d = attention_difference_torch(*a, *d, s)
    want_a, want_d, mag_a, mag_d = reference(a, d, d_scale)
    assert got_a.dtype == got_d.dtype == dtype and got_a.shape == got_d.shape == a[0].shape
    n = tokens + dh
    for got, twin, want, mag in ((got_a, twin_a, want_a, mag_a), (got_d, twin_d, want_d, mag_d)):
        limit = bound(want, mag, dtype, n)
        assert excess(got, want, limit) <= 1
        assert excess(twin, want, limit) <= 1
        assert excess(got, twin.double(), 2 * limit) <= 1


def test_tiny_bf16_differences_where_two_bf16_attentions_fail():
    """The case the pair exists for: differences 1e-3 of the activations, stored at 2^10 in
    bf16. The kernel's difference is within the bound of its float64 value; two attentions of
    bf16 operands (each computed exactly, only its inputs and output rounded to bf16)
    subtracted miss that bound almost everywhere, by orders of magnitude."""
    d_scale, dtype = 2.0 ** 10, torch.bfloat16
    a, d = pair(64, 32, dtype, d_scale, 1e-3, seed=3)
    _, got_d = attention_difference_triton(*a, *d, torch.tensor(d_scale, device=DEVICE))
    _, want_d, _, mag_d = reference(a, d, d_scale)
    limit = bound(want_d, mag_d, dtype, 64 + 32)
    assert excess(got_d, want_d, limit) <= 1

    a64 = [t.double() for t in a]
    restored = [(x + y.double() / d_scale).to(dtype).double() for x, y in zip(a64, d)]
    two_pass = (attn(*restored).to(dtype).double() - attn(*a64).to(dtype).double()) * d_scale
    ratio = (two_pass - want_d).abs() / limit
    assert float((ratio <= 1).double().mean()) < 0.05
    assert float(ratio.median()) > 30


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_any_strides(dtype, true_fp32):
    """Operands of other layouts than the projection's (head dim not the unit stride, a and d
    laid out differently) give what contiguous copies give; the outputs are (B, H, T, dh) views
    of (B, T, H, dh) memory, flattened back to channels without a copy."""
    gen = torch.Generator().manual_seed(5)
    shape = (2, 3, 20, 16)

    def strided(scale, order):  # (B, H, T, dh) view of memory laid out in `order`
        dims = [shape[i] for i in order]
        x = (torch.randn(*dims, generator=gen, dtype=F64) * scale).to(dtype).to(DEVICE)
        return x.permute(*[order.index(i) for i in range(4)])

    a = [strided(1.0, (0, 3, 1, 2)) for _ in range(3)]
    d = [strided(0.1, (2, 0, 3, 1)) for _ in range(3)]
    assert a[0].shape == shape and a[0].stride(3) != 1 and d[0].stride(3) != 1
    s = torch.tensor(4.0, device=DEVICE)
    got = attention_difference_triton(*a, *d, s)
    dense = attention_difference_triton(*(t.contiguous() for t in a + d), s)
    for g, w in zip(got, dense):
        assert torch.equal(g, w)
        assert g.transpose(1, 2).is_contiguous()


def restored_grads(a, d, d_scale, grad_out):
    """float64 gradient of attention at the restored point the Function saves (rounded to the
    storage dtype), for a float64 upstream gradient."""
    restored = [(x.float() + y.float() / d_scale).to(x.dtype).double().requires_grad_(True)
                for x, y in zip(a, d)]
    return torch.autograd.grad(attn(*restored), restored, grad_out.double())


@pytest.mark.parametrize("tokens,dh", [(7, 32), (80, 64)], ids=["T7-dh32", "T80-dh64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_backward_is_the_twins(dtype, tokens, dh, true_fp32):
    """Gradients reach the stored differences only: those of the twin's op exactly (one
    backward for both), and float64 attention's at the restored point to within the dtype's
    rounding (cosine and relative norm error); out_a carries none."""
    d_scale = 2.0 ** 6
    a, d = pair(tokens, dh, dtype, d_scale, 1e-2, seed=7)
    s = torch.tensor(d_scale, device=DEVICE)
    gen = torch.Generator().manual_seed(9)
    grad_out = torch.randn(a[0].shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)
    grads = []
    for op in (attention_difference_triton, attention_difference):
        a_in = [t.detach().requires_grad_(True) for t in a]
        d_in = [t.detach().requires_grad_(True) for t in d]
        out_a, out_d = op(*a_in, *d_in, s)
        assert not out_a.requires_grad and out_d.requires_grad
        grads.append(torch.autograd.grad(out_d, a_in + d_in, grad_out, allow_unused=True))
    got, twin = grads
    assert all(g is None for g in got[:3])
    for g, w in zip(got[3:], twin[3:]):
        assert torch.equal(g, w)
    eps = torch.finfo(dtype).eps
    for g, w in zip(got[3:], restored_grads(a, d, d_scale, grad_out)):
        g = g.double()
        rel = float((g - w).norm() / w.norm())
        cosine = float(F.cosine_similarity(g.flatten(), w.flatten(), dim=0))
        assert rel <= eps / 2 + (tokens + dh) * EPS32, rel
        assert cosine >= 1 - eps, cosine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_grad_path(dtype):
    """Without a difference needing a gradient (none requires it, or grad mode is off) the
    forward runs bare: the same outputs as the autograd path, neither requiring a gradient."""
    a, d = pair(7, 8, dtype, 16.0, 1e-2, seed=11)
    s = torch.tensor(16.0, device=DEVICE)
    plain = attention_difference_triton(*a, *d, s)
    with torch.no_grad():
        off = attention_difference_triton(*a, *(t.requires_grad_(True) for t in d), s)
    tracked = attention_difference_triton(*a, *d, s)
    assert tracked[1].grad_fn is not None
    for p, o, t in zip(plain, off, tracked):
        assert not p.requires_grad and not o.requires_grad
        assert torch.equal(p, o) and torch.equal(p, t.detach())


def test_fallbacks_run_the_twin():
    """Head dims beyond the kernel's (above 128; above 64 in fp32) and empty operands run the
    twin; a Python number serves as d_scale."""
    for dtype, dh in ((torch.bfloat16, 256), (torch.float32, 128)):
        a, d = pair(4, dh, dtype, 2.0, 1e-2, heads=1, seed=13)
        for g, w in zip(attention_difference_triton(*a, *d, torch.tensor(2.0, device=DEVICE)),
                        attention_difference_torch(*a, *d, torch.tensor(2.0, device=DEVICE))):
            assert torch.equal(g, w)
    empty = [torch.zeros(1, 2, 0, 8, device=DEVICE) for _ in range(6)]
    out_a, out_d = attention_difference_triton(*empty, torch.tensor(1.0, device=DEVICE))
    assert out_a.shape == out_d.shape == (1, 2, 0, 8)
    a, d = pair(7, 8, torch.float16, 2.0, 1e-2, seed=15)
    for g, w in zip(attention_difference_triton(*a, *d, 2.0),
                    attention_difference_triton(*a, *d, torch.tensor(2.0, device=DEVICE))):
        assert torch.equal(g, w)


def _operands(**changes):
    ops = dict(zip(("q_a", "k_a", "v_a", "q_d", "k_d", "v_d"),
                   (torch.zeros(1, 2, 5, 8, device=DEVICE) for _ in range(6))))
    ops["d_scale"] = torch.tensor(1.0, device=DEVICE)
    ops.update(changes)
    return ops


BAD = {
    "3-D": (ValueError, "must be 4-D", dict(q_a=torch.zeros(2, 5, 8))),
    "mixed dtypes": (ValueError, "q_a's dtype", dict(v_d=torch.zeros(1, 2, 5, 8,
                                                                    dtype=torch.float16))),
    "fp64": (ValueError, "fp32/fp16/bf16", {n: torch.zeros(1, 2, 5, 8, dtype=F64)
                                            for n in ("q_a", "k_a", "v_a", "q_d", "k_d", "v_d")}),
    "a and d shapes": (ValueError, "same shape", dict(k_d=torch.zeros(1, 2, 6, 8))),
    "q and k head dims": (ValueError, "head dim", {n: torch.zeros(1, 2, 5, 4)
                                                   for n in ("k_a", "k_d")}),
    "k and v tokens": (ValueError, "k's tokens", {n: torch.zeros(1, 2, 6, 8)
                                                  for n in ("v_a", "v_d")}),
    "devices": (ValueError, "is on meta", dict(k_a=torch.zeros(1, 2, 5, 8, device="meta"))),
    "d_scale size": (ValueError, "d_scale must be one float", dict(d_scale=torch.ones(2))),
    "d_scale device": (ValueError, "d_scale is on meta",
                       dict(d_scale=torch.ones((), device="meta"))),
    "not a tensor": (TypeError, "must be a tensor", dict(v_a=[[0.0]])),
}


@pytest.mark.parametrize("case", BAD)
def test_validation(case):
    error, match, changes = BAD[case]
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta"
               else v for k, v in changes.items()}
    with pytest.raises(error, match=match):
        attention_difference_triton(**_operands(**changes))


if triton is not None:

    @triton.jit
    def _series_kernel(x_ptr, e_ptr, y_ptr, l_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        tl.store(e_ptr + i, module._expm1(tl.load(x_ptr + i, mask=mask, other=0.0)), mask=mask)
        tl.store(l_ptr + i, module._log1p(tl.load(y_ptr + i, mask=mask, other=0.0)), mask=mask)


def test_expm1_and_log1p_to_fp32_accuracy():
    """The kernel's expm1 and log1p against torch's in float64, over tiny arguments, both sides
    of the switch to exp and log at 1/2, and large ones: within 4 fp32 ulps (relative to the
    result), plus |x| ulps for expm1 (a GPU's exp is 2^(x log2(e)), whose rounded argument
    costs that much); exp(x) - 1 in fp32 would miss tiny x entirely."""
    small = torch.logspace(-30, 0, 400, dtype=F64)
    edge = torch.tensor([0.49999, 0.5, 0.50001, 0.7, 1.0, 2.0, 5.0, 10.0], dtype=F64)
    x = torch.cat([small, -small, edge, -edge, torch.zeros(1, dtype=F64)]).float()
    y = torch.cat([small[small < 1], -small[small < 0.9], edge, -edge[edge < 0.9],
                   torch.tensor([-0.9, -0.99, 100.0], dtype=F64)]).float()
    n = max(len(x), len(y))
    x, y = F.pad(x, (0, n - len(x))), F.pad(y, (0, n - len(y)))
    x, y = x.to(DEVICE), y.to(DEVICE)
    e, lg = torch.empty_like(x), torch.empty_like(y)
    _series_kernel[(triton.cdiv(n, 256),)](x, e, y, lg, n, BLOCK=256)
    for got, want, ulps in ((e, torch.expm1(x.double()), 4 + x.double().abs()),
                            (lg, torch.log1p(y.double()), 4)):
        err = (got.double() - want).abs()
        assert bool((err <= ulps * EPS32 * want.abs()).all()), float((err / want.abs()).max())
    tiny = x.abs() < 1e-8
    assert bool(((torch.exp(x[tiny]) - 1) != torch.expm1(x[tiny])).any())
