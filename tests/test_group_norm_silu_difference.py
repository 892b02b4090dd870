"""The Triton GroupNorm (+ FiLM) (+ SiLU) pair kernels against the torch twin and against an
independent float64 ``g(a + d / s) - g(a)`` (two plain group norms in float64, which resolve
the difference far below any storage format's epsilon).

Tolerances come from the formats, not from what the kernels happen to reach. Each output is
rounded once from fp32 (``eps / 2`` relative; two independent roundings, kernel and twin, may
land one ulp apart: ``eps``), subnormals have a fixed spacing, and the fp32 arithmetic before
the rounding (a few dozen operations and sums over a group) errs by a small multiple of fp32's
epsilon of the output's scale: ``FP32_OPS``. The gradient is the plain op's at ``r`` rounded to
d's dtype: its error relative to the exact point's is a few of that dtype's epsilon
(``GRAD_EPS``).

On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py): shapes stay small.
"""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from diffloss_fast.ops._triton_common import triton, tl
from diffloss_fast.ops.group_norm_silu import _launch, group_norm_silu_torch
from diffloss_fast.ops.group_norm_silu_difference import (
    _pair_forward, _silu_difference_f32, group_norm_silu_difference,
    group_norm_silu_difference_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
FP32_OPS = 32  # the fp32 arithmetic's error, in fp32 epsilons of the output's scale
# the gradient's error (relative, in norm) from rounding r and the gradient to d's dtype, in
# its epsilons: r's rounding moves the normalized value by eps * |r| / std, about eps here
# (means within a spread of 0), and is counted for the gradient's terms in x and in the
# group's mean of dxhat * xhat; the gradient's own rounding adds one more
GRAD_EPS = 4
# (N, C, H, W, groups): 2 channels a group; 3; 1; 8 (ADM's); a 1x1 map; 1600 positions, a
# sample's pixels split over several programs (checked below)
SHAPES = [(2, 8, 5, 7, 4), (2, 24, 6, 6, 8), (3, 6, 4, 4, 6), (2, 32, 3, 3, 4),
          (2, 16, 1, 1, 4), (1, 8, 40, 40, 4)]
D_SCALES = (1.0, 2.0 ** 10, 2.0 ** -6)
# Triton's interpreter truncates fp32 to bf16 (a GPU, and Triton's semantics, round to nearest)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def eps(dtype):
    return torch.finfo(dtype).eps


def rounding(dtype):
    """The kernels' error from storing an fp32 value in dtype, relative: half an ulp, or a
    whole one where the interpreter truncates to bf16."""
    return eps(dtype) * (1.0 if INTERPRETED and dtype == torch.bfloat16 else 0.5)


def assert_within(got, want, dtype, rel, what, scale=None, fp32_ops=FP32_OPS):
    """|got - want| <= rel * |want| + fp32_ops * EPS32 * scale + the dtype's subnormal
    spacing, elementwise; scale: max |want| unless given."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if scale is None else scale
    bound = (rel * want.abs() + fp32_ops * EPS32 * scale
             + torch.finfo(dtype).tiny * eps(dtype))
    excess = ((got - want).abs() / bound).max().item()
    assert excess <= 1, f"{what}: error {excess:.3g} x the bound ({dtype})"


def layout(t, name):
    return t.contiguous(memory_format=torch.channels_last) if name == "cl" else t.contiguous()


def make(shape, dtype, d_scale, film=True, x_bias=True, rel=1e-2, mean=0.5, seed=0,
         layouts=("nchw", "nchw")):
    """a, the stored difference d * d_scale (d about rel of a's spread, partly along a), and
    the prior's parameters, all in dtype."""
    N, C, H, W, G = shape
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    a = rand(N, C, H, W) * 1.5 + mean
    d = rel * (0.5 * (a - mean) + rand(N, C, H, W))
    kw = dict(weight=rand(C) * 0.3 + 1, bias=rand(C) * 0.3, scale=None, shift=None,
              x_bias=rand(C) * 0.5 if x_bias else None)
    if film:  # as the prior makes them: halves of one (N, 2C, 1, 1) embedding projection
        kw["scale"], kw["shift"] = (rand(N, 2 * C, 1, 1) * 0.5).to(dtype).to(DEVICE).chunk(2, 1)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    kw = {k: cast(v) for k, v in kw.items()}
    a, d = layout(cast(a), layouts[0]), layout(cast(d * d_scale), layouts[1])
    return a, d, torch.tensor(d_scale, device=DEVICE), G, kw


def forward(fn, a, d, s, G, kw, silu, grad=None):
    """(ya, yd, the gradient of <grad, yd> with respect to d, or None)."""
    d = d.detach().requires_grad_(grad is not None)
    ya, yd = fn(a, d, s, G, kw["weight"], kw["bias"], 1e-5, kw["scale"], kw["shift"],
                kw["x_bias"], silu)
    dd = None if grad is None else torch.autograd.grad(yd, d, grad)[0]
    return ya, yd, dd


def plain64(G, kw, silu=True):
    """The plain op g in float64, with the op's parameters."""
    w = {k: None if v is None else v.double() for k, v in kw.items()}
    return lambda x: group_norm_silu_torch(x, G, w["weight"], w["bias"], 1e-5, w["scale"],
                                           w["shift"], w["x_bias"], False, silu)


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def float64_reference(a, d, s, G, kw, silu, grad):
    """g(a) and (g(a + d / s) - g(a)) * s of the plain op in float64, and the gradient of
    <grad, g(a + d / s) * s> with respect to the stored d, g'(a + d / s), at the exact point."""
    g = plain64(G, kw, silu)
    a64, s64 = a.double(), s.double()
    r = (a64 + d.double() / s64).requires_grad_(True)
    y_r = g(r)
    (dd,) = torch.autograd.grad(y_r, r, grad.double())
    return g(a64), ((y_r - g(a64)) * s64).detach(), dd


def check_case(shape, dtype, d_scale, film, x_bias, silu, layouts=("nchw", "nchw"), rel=1e-2,
               mean=0.5, seed=0):
    a, d, s, G, kw = make(shape, dtype, d_scale, film, x_bias, rel, mean, seed, layouts)
    grad = torch.randn(d.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ya, yd, dd = forward(group_norm_silu_difference_triton, a, d, s, G, kw, silu, grad)
    ya_tw, yd_tw, dd_tw = forward(group_norm_silu_difference, a, d, s, G, kw, silu, grad)
    ya64, yd64, dd64 = float64_reference(a, d, s, G, kw, silu, grad)
    assert ya.dtype == yd.dtype == dd.dtype == dtype
    assert ya.stride() == a.stride() and yd.stride() == dd.stride() == d.stride()
    assert not ya.requires_grad and yd.requires_grad
    # against the twin: two roundings of nearly the same fp32 value
    twice = rounding(dtype) + eps(dtype) / 2
    assert_within(ya, ya_tw, dtype, twice, "ya vs twin")
    assert_within(yd, yd_tw, dtype, twice, "yd vs twin")
    # against float64 on the same stored inputs: one rounding
    assert_within(ya, ya64, dtype, rounding(dtype), "ya vs float64")
    assert_within(yd, yd64, dtype, rounding(dtype), "yd vs float64")
    # the gradient: the twin's at the same rounded r (whose statistics it recomputes), and
    # the exact point's
    bound = GRAD_EPS * eps(dtype) + FP32_OPS * EPS32
    assert rel_err(dd, dd_tw) <= bound, "gradient vs twin"
    assert rel_err(dd, dd64) <= bound, "gradient vs float64"
    assert F.cosine_similarity(dd.double().flatten(), dd64.flatten(), dim=0) >= 1 - bound ** 2 / 2
    return ya, yd, dd


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes(shape, dtype):
    """Every shape in every dtype, FiLM, x_bias and SiLU on; channels_last inputs for every
    other shape, and d's layout not a's for one."""
    i = SHAPES.index(shape)
    layouts = [("nchw", "nchw"), ("cl", "cl"), ("nchw", "cl")][i % 3]
    check_case(shape, DTYPES[dtype], D_SCALES[i % 3], True, True, True, layouts)


def test_a_sample_spans_several_programs():
    N, C, H, W, G = SHAPES[-1]
    k = _launch(N, G, H * W, C)
    assert k.split > 1 and k.split * k.s_per > H * W  # several programs, the last one short


@pytest.mark.parametrize("film, x_bias, silu", list(itertools.product([False, True], repeat=3)),
                         ids=lambda v: str(int(v)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_options(film, x_bias, silu, dtype):
    """With and without FiLM, the preceding convolution's bias and the SiLU, each with one of
    the difference scales (1, 2**10, 2**-6)."""
    d_scale = D_SCALES[(4 * film + 2 * x_bias + silu) % 3]
    check_case(SHAPES[0], DTYPES[dtype], d_scale, film, x_bias, silu, ("cl", "cl"), seed=2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tiny_differences(dtype):
    """The case the pair exists for: a difference of 1e-5 of the activations, far below the
    format's resolution of a, kept to the format's resolution of the output difference, where
    two passes subtracted return rounding noise."""
    dtype = DTYPES[dtype]
    a, d, s, G, kw = make(SHAPES[1], dtype, 2.0 ** 16, rel=1e-5, layouts=("cl", "cl"))
    _, yd, _ = forward(group_norm_silu_difference_triton, a, d, s, G, kw, True)
    grad = torch.zeros(d.shape)
    _, yd64, _ = float64_reference(a, d, s, G, kw, True, grad)
    assert_within(yd, yd64, dtype, rounding(dtype), "tiny yd vs float64")
    g = plain64(G, kw)
    two_pass = g((a.double() + d.double() / s).to(dtype).double()) - g(a.double())
    assert rel_err(two_pass * s, yd64) > 0.5


@pytest.mark.parametrize("x_bias", [False, True], ids=["in_a", "in_x_bias"])
def test_mean_far_larger_than_spread(x_bias):
    """Means 1e4 times the spread (a's, or the preceding bias's), and a difference whose own
    mean is 100 times its spread: the shifted sums give variances, covariance and s_r - s_a to
    fp32's accuracy (naive E[x^2] - E[x]^2 loses them); the outputs lose only what fp32's
    resolution of the mean costs, eps32 * |mean| / std of the output's scale."""
    N, C, H, W, G = 2, 8, 6, 6, 2
    gen = torch.Generator().manual_seed(3)
    spread = 0.1
    a = torch.randn(N, C, H, W, generator=gen, dtype=F64) * spread
    d = 1e-2 * a + 1e-3 * torch.randn(N, C, H, W, generator=gen, dtype=F64) + 0.1
    offset = torch.full((C,), 1e3, dtype=F64) + torch.arange(C) * 1e-2
    if not x_bias:
        a, offset = a + offset.view(1, C, 1, 1), None
    a32, d32, xb32 = a.float(), d.float(), None if offset is None else offset.float()
    a, d = a32.double(), d32.double()  # the stored inputs, exactly
    offset = None if offset is None else xb32.double()
    s = torch.tensor(1.0)
    w, b = torch.ones(C), torch.zeros(C)
    ya, yd, _, stats, _ = _pair_forward(
        a32.contiguous(memory_format=torch.channels_last),
        d32.contiguous(memory_format=torch.channels_last), s, G, w, b, 1e-5, None, None, xb32,
        True, save_r=False)
    ab = a if offset is None else a + offset.view(1, C, 1, 1)
    ag, dg = ab.reshape(N * G, -1), d.reshape(N * G, -1)
    var_a, var_r = ag.var(-1, unbiased=False), (ag + dg).var(-1, unbiased=False)
    s_a, s_r = (var_a + 1e-5).rsqrt(), (var_r + 1e-5).rsqrt()
    want = {1: s_a, 3: s_r, 4: s_r - s_a, 2: dg.mean(-1)}
    for row, value in want.items():
        err = ((stats[row].double() - value).abs() / value.abs()).max().item()
        assert err <= FP32_OPS * EPS32, (row, err)
    ratio = 1e3 / spread
    w64, b64 = w.double(), b.double()
    g = lambda x: group_norm_silu_torch(x, G, w64, b64, 1e-5, x_bias=offset)  # noqa: E731
    ya64, yd64 = g(a), g(a + d) - g(a)
    assert_within(ya, ya64, torch.float32, rounding(torch.float32), "ya",
                  fp32_ops=FP32_OPS * ratio)
    assert_within(yd, yd64, torch.float32, rounding(torch.float32), "yd",
                  fp32_ops=FP32_OPS * ratio)


if triton is not None:

    @triton.jit
    def _silu_difference_test_kernel(u_ptr, e_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        u = tl.load(u_ptr + i, mask=m)
        e = tl.load(e_ptr + i, mask=m)
        tl.store(out_ptr + i, _silu_difference_f32(u, e), mask=m)


# the branch a lane does not take may overflow there (numpy, running the interpreter, warns)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning",
                            "ignore:invalid value encountered in multiply:RuntimeWarning")
def test_silu_difference_in_fp32():
    """The kernels' silu(u + e) - silu(u) against 40-digit arithmetic, over differences from
    1e-9 to 100 of either sign (both sides of the Taylor polynomial's |x| < 1/2 and of the
    direct difference from |e| = 1): within a few fp32 ulps of |e|, plus, where the
    difference is taken directly, of silu(u) (|u| ulps); results below fp32's normal range
    are held to it absolutely."""
    mpmath = pytest.importorskip("mpmath")
    us = [-30.0, -8.0, -1.28, -0.3, 0.0, 0.7, 3.0, 12.0, 40.0]
    mags = [1e-9, 1e-6, 1e-3, 0.1, 0.4999, 0.5, 0.5001, 0.9999, 1.0, 2.0, 30.0, 63.9, 100.0]
    pairs = [(u, s * m) for u in us for m in mags for s in (1, -1)]
    u, e = (torch.tensor(v, dtype=torch.float32) for v in zip(*pairs))
    out = torch.empty_like(u)
    _silu_difference_test_kernel[(triton.cdiv(u.numel(), 64),)](u.to(DEVICE), e.to(DEVICE),
                                                                  out, u.numel(), BLOCK=64)
    mpmath.mp.dps = 40
    silu = lambda x: x / (1 + mpmath.exp(-x))  # noqa: E731
    want = torch.tensor([float(silu(mpmath.mpf(float(x)) + mpmath.mpf(float(y)))
                               - silu(mpmath.mpf(float(x)))) for x, y in zip(u, e)], dtype=F64)
    u64, e64 = u.double(), e.double()
    scale = e64.abs() + (e64.abs() >= 1) * u64.abs()
    bound = 8 * EPS32 * scale + torch.finfo(torch.float32).tiny
    excess = ((out.cpu().double() - want).abs() / bound).max().item()
    assert excess <= 1, excess


def test_only_the_difference_carries_a_gradient():
    """ya is non-differentiable (a is the target's, detached), so a loss may use yd alone or
    both; the gradient reaches d only, and is the twin's."""
    a, d, s, G, kw = make(SHAPES[0], torch.float32, 2.0 ** 10)
    a.requires_grad_(True)
    d.requires_grad_(True)
    ya, yd = group_norm_silu_difference_triton(a, d, s, G, kw["weight"], kw["bias"], 1e-5,
                                               kw["scale"], kw["shift"], kw["x_bias"])
    assert not ya.requires_grad
    (yd.square().sum() + ya.sum()).backward()
    assert a.grad is None
    d2 = d.detach().requires_grad_(True)
    _, yd_tw = group_norm_silu_difference(a, d2, s, G, kw["weight"], kw["bias"], 1e-5,
                                          kw["scale"], kw["shift"], kw["x_bias"])
    (want,) = torch.autograd.grad(yd_tw.square().sum(), d2)
    assert_within(d.grad, want, torch.float32, EPS32, "gradient through yd alone")


def test_without_autograd():
    """No gradient asked for (no_grad, or d not requiring it): the same outputs, nothing
    saved."""
    a, d, s, G, kw = make(SHAPES[1], torch.bfloat16, 2.0 ** 10, layouts=("cl", "cl"))
    args = (s, G, kw["weight"], kw["bias"], 1e-5, kw["scale"], kw["shift"], kw["x_bias"])
    ya, yd = group_norm_silu_difference_triton(a, d.requires_grad_(True), *args)
    with torch.no_grad():
        ya_ng, yd_ng = group_norm_silu_difference_triton(a, d, *args)
    ya_nr, yd_nr = group_norm_silu_difference_triton(a, d.detach(), *args)
    assert yd_ng.grad_fn is None and yd_nr.grad_fn is None
    for y, y_ng, y_nr in ((ya, ya_ng, ya_nr), (yd, yd_ng, yd_nr)):
        assert torch.equal(y, y_ng) and torch.equal(y, y_nr)
        assert y_ng.stride() == y.stride()


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value to the host (``.item()``, ``float(t)``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._overloadpacket in (torch.ops.aten._local_scalar_dense,
                                               torch.ops.aten.item)
        return func(*args, **(kwargs or {}))


def test_d_scale_is_never_read_on_the_host():
    """The pair pass is captured in CUDA graphs: d_scale reaches the kernels as a device
    tensor, and neither pass reads a value back."""
    a, d, s, G, kw = make(SHAPES[0], torch.float16, 2.0 ** 10)
    d.requires_grad_(True)
    with _HostReads() as reads:
        _, yd = group_norm_silu_difference_triton(a, d, s, G, kw["weight"], kw["bias"], 1e-5,
                                                  kw["scale"], kw["shift"], kw["x_bias"])
        yd.backward(torch.ones_like(yd))
    assert reads.count == 0


def test_default_affine_and_a_number_for_d_scale():
    a, d, s, G, _ = make(SHAPES[0], torch.float32, 4.0)
    ya, yd = group_norm_silu_difference_triton(a, d, 4.0, G, None, None, 1e-5)
    ya_tw, yd_tw = group_norm_silu_difference(a, d, s, G, torch.ones(8), torch.zeros(8), 1e-5)
    assert_within(ya, ya_tw, torch.float32, EPS32, "ya")
    assert_within(yd, yd_tw, torch.float32, EPS32, "yd")


def test_bad_inputs():
    a, d, s, G, kw = make(SHAPES[0], torch.float32, 1.0)
    w, b, sc, sh = kw["weight"], kw["bias"], kw["scale"], kw["shift"]
    fn = group_norm_silu_difference_triton
    with pytest.raises(ValueError, match="groups"):
        fn(a, d, s, 3, w, b, 1e-5)
    with pytest.raises(ValueError, match="both scale and shift"):
        fn(a, d, s, G, w, b, 1e-5, sc, None)
    with pytest.raises(ValueError, match="d only"):
        fn(a, d, s, G, w.clone().requires_grad_(True), b, 1e-5)
    with pytest.raises(ValueError, match="d only"):
        fn(a, d, s, G, w, b, 1e-5, sc, sh.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="torch twin"):
        fn(a.double(), d.double(), s, G, w.double(), b.double(), 1e-5)
    with pytest.raises(ValueError, match="4-D"):
        fn(a[0], d[0], s, G, w, b, 1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        fn(a, d[:1], s, G, w, b, 1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        fn(a, d, s, G, w, b, 1e-5, x_bias=b[:-1])
    with pytest.raises(ValueError, match="d_scale"):
        fn(a, d, torch.ones(2), G, w, b, 1e-5)
