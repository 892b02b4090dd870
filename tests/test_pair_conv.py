"""The fused pair convolution (GroupNorm + FiLM + SiLU prologue, bias/residual epilogue)
against its plain-PyTorch twin and against float64.

The float64 reference is the definition itself: two plain convolutions, of the plain norm's
output at ``a`` and at the restored point ``a + d / s``, subtracted in float64. Tolerances are
elementwise bounds from an error model, not fitted constants: the prologue's fp32 arithmetic
(a few dozen roundings of fp32, ``C_PROLOGUE`` ulps of its terms' magnitudes), the rounding of
the GEMM's operands to the storage dtype (half an ulp each, ``u``), the fp32 sum of K products
(``K`` fp32 half-ulps of the sum of their magnitudes) and the final rounding to the storage
dtype. On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py): shapes stay tiny.
"""
import pytest
import torch
import torch.nn.functional as F

from diffloss_fast.ops import pair_conv as pc
from diffloss_fast.ops._conv_common import _ConvLaunch
from diffloss_fast.ops.group_norm_silu import group_norm_silu_torch
from diffloss_fast.ops.pair_conv import (PairNormStatistics, pair_conv2d, pair_conv2d_torch,
                                         pair_norm_statistics, pair_prologue)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
U32 = 2.0 ** -24  # fp32's unit roundoff
# ulps of fp32 of the prologue: ~20 roundings in the kernel, the statistics' sums (log2 of a
# group's size) and their own few roundings
C_PROLOGUE = 64
EPS = 1e-5


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def underflow(dtype):
    """Half the spacing of the subnormals: the absolute rounding error below the normals."""
    return torch.finfo(dtype).smallest_normal * unit_roundoff(dtype)


# name -> (kernel, Cin, Cout, groups (None: no prologue), H, W, film, x_bias, silu, residual,
# bias, d_scale)
CASES = {
    "3x3_film_xbias_residual": (3, 12, 10, 3, 5, 7, True, True, True, True, True, 2.0 ** 10),
    "3x3_silu_1_per_group": (3, 6, 5, 6, 5, 7, False, False, True, False, True, 1.0),
    "3x3_plain": (3, 5, 3, None, 5, 7, False, False, False, False, False, 1.0),
    "1x1_norm_xbias_no_silu": (1, 8, 6, 2, 3, 5, False, True, False, False, True, 2.0 ** 10),
    "1x1_plain_residual": (1, 7, 9, None, 3, 5, False, False, False, True, True, 2.0 ** 10),
}
# the prologue's output resampled 2x before the convolution (``resample=``): name ->
# (resample, then CASES' fields, H and W the input's size, before resampling); "up" takes odd
# sizes, "down" even ones (odd outputs here); odd channel counts
RS_CASES = {
    "up_3x3_film_xbias_residual": ("up", 3, 9, 7, 3, 3, 5, True, True, True, True, True,
                                   2.0 ** 10),
    "down_3x3_film_xbias_residual": ("down", 3, 9, 7, 3, 8, 10, True, True, True, True, True,
                                     2.0 ** 10),
    "up_1x1_norm_xbias_no_silu": ("up", 1, 8, 5, 2, 3, 5, False, True, False, False, True,
                                  2.0 ** 10),
    "down_1x1_norm_xbias_no_silu": ("down", 1, 8, 5, 2, 4, 6, False, True, False, False, True,
                                    2.0 ** 10),
    "down_3x3_silu_1_per_group": ("down", 3, 5, 6, 5, 6, 6, False, False, True, True, False,
                                  1.0),
}


def spec(case):
    """(resample or None, the fields of CASES) of a case."""
    if case in RS_CASES:
        return RS_CASES[case][0], RS_CASES[case][1:]
    return None, CASES[case]


def resampled(x, resample):
    """x resampled 2x by torch's own ops, in x's dtype: the nearest-neighbour upsampling and
    the 2x2 average pooling of ADM's ResBlocks."""
    if resample == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if resample == "down":
        return F.avg_pool2d(x, 2)
    return x


def rand(*shape, scale=1.0, shift=0.0, gen):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale + shift


def make(case, dtype, seed=0):
    """Tensors of a case, stored in ``dtype`` on DEVICE: the target activation around 0.5,
    the difference about 1e-3 of it, times d_scale."""
    resample, (k, cin, cout, groups, h, w, film, xb, silu, res, has_bias, s) = spec(case)
    oh, ow = {"up": (2 * h, 2 * w), "down": (h // 2, w // 2)}.get(resample, (h, w))
    gen = torch.Generator().manual_seed(seed)
    n = 2
    put = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    t = dict(a=put(rand(n, cin, h, w, shift=0.5, gen=gen)),
             d=put(rand(n, cin, h, w, scale=1e-3 * s, gen=gen)),
             s=torch.tensor(s, device=DEVICE),
             weight=put(rand(cout, cin, k, k, scale=(cin * k * k) ** -0.5, gen=gen)),
             bias=put(rand(cout, scale=0.3, gen=gen)) if has_bias else None,
             residual=(put(rand(n, cout, oh, ow, gen=gen)),
                       put(rand(n, cout, oh, ow, gen=gen))) if res else None,
             norm=None, padding=k // 2, resample=resample)
    if groups is not None:
        t["norm"] = dict(
            num_groups=groups, weight=put(rand(cin, scale=0.3, shift=1.0, gen=gen)),
            bias=put(rand(cin, scale=0.3, gen=gen)),
            scale=put(rand(n, cin, scale=0.5, gen=gen)) if film else None,
            shift=put(rand(n, cin, scale=0.5, gen=gen)) if film else None,
            x_bias=put(rand(cin, scale=0.5, gen=gen)) if xb else None, silu=silu)
    return t


def prologue_of(t):
    p = t["norm"]
    if p is None:
        return None
    return pair_prologue(t["a"], t["d"], t["s"], p["num_groups"], p["weight"], p["bias"], EPS,
                         p["scale"], p["shift"], p["x_bias"], p["silu"])


def call(fn, t, d=None, residual=None):
    return fn(t["a"], t["d"] if d is None else d, t["s"], t["weight"], t["bias"],
              padding=t["padding"], prologue=prologue_of(t),
              residual=t["residual"] if residual is None else residual,
              resample=t["resample"])


def norm64(t, x):
    p = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in t["norm"].items()}
    return group_norm_silu_torch(x, p["num_groups"], p["weight"], p["bias"], EPS, p["scale"],
                                 p["shift"], p["x_bias"], False, p["silu"])


def reference(t, dtype):
    """float64: (out_a, out_d) by the definition, and elementwise bounds of the kernel's
    error on each (see the module docstring). With ``resample`` the norm's outputs are
    resampled (in float64) before the convolutions, and so are the bounds of their errors
    (an average's error is at most the average of the errors); "down" averages the four
    fp32 values in fp32 (three roundings of fp32 of the four's magnitudes) before its one
    rounding to the storage dtype, which the pooled ``u * |y|`` bounds."""
    a, d, s = t["a"].double(), t["d"].double(), float(t["s"])
    w = t["weight"].double()
    conv = lambda x, weight=w: F.conv2d(x, weight, padding=t["padding"])  # noqa: E731
    R = lambda x: resampled(x, t["resample"])  # noqa: E731
    u, tiny = unit_roundoff(dtype), underflow(dtype)
    K = w[0].numel()
    if t["norm"] is None:
        ya, yd = a, d
        in_a = in_d = torch.zeros_like(a)  # the stored inputs themselves: exact operands
        out_a, out_d = conv(a), conv(d)
    else:
        ya, yr = norm64(t, a), norm64(t, a + d / s)
        yd = (yr - ya) * s
        m_a, m_d = prologue_magnitudes(t, a, d, s)
        in_a = R(u * ya.abs() + tiny + C_PROLOGUE * U32 * m_a)
        in_d = R(u * yd.abs() + tiny + C_PROLOGUE * U32 * m_d)
        if t["resample"] == "down":
            in_a, in_d = in_a + 4 * U32 * R(ya.abs()), in_d + 4 * U32 * R(yd.abs())
        ya, yr = R(ya), R(yr)
        yd = (yr - ya) * s
        out_a, out_d = conv(ya), (conv(yr) - conv(ya)) * s
    sums_a, sums_d = conv(ya.abs(), w.abs()), conv(yd.abs(), w.abs())
    if t["bias"] is not None:
        out_a = out_a + t["bias"].double().reshape(1, -1, 1, 1)
        sums_a = sums_a + t["bias"].double().abs().reshape(1, -1, 1, 1)
    if t["residual"] is not None:
        out_a, out_d = out_a + t["residual"][0].double(), out_d + t["residual"][1].double()
        sums_a, sums_d = (sums_a + t["residual"][0].double().abs(),
                          sums_d + t["residual"][1].double().abs())
    tol_a = conv(in_a, w.abs()) + (K + 2) * U32 * sums_a + u * out_a.abs() + tiny
    tol_d = conv(in_d, w.abs()) + (K + 2) * U32 * sums_d + u * out_d.abs() + tiny
    return out_a, out_d, tol_a, tol_d


def prologue_magnitudes(t, a, d, s):
    """The magnitudes the prologue's fp32 errors are relative to, per input element: of the
    terms of u_a = (a + x_bias - mean_a) * rstd_a * w' + b' and of u_d = (d / s - mean_d) *
    rstd_r * w' + (a + x_bias - mean_a) * (rstd_r - rstd_a) * w', each times (1 + |u_a|)
    for what the SiLU (difference) multiplies them by."""
    p = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in t["norm"].items()}
    n, c = a.shape[:2]
    x = a if p["x_bias"] is None else a + p["x_bias"].reshape(1, -1, 1, 1)
    groups = p["num_groups"]
    grouped = lambda v: v.reshape(n, groups, -1)  # noqa: E731
    per_channel = lambda v: v.repeat_interleave(c // groups, 1).reshape(n, c, 1, 1)  # noqa: E731
    mean_a, mean_d = grouped(x).mean(-1), grouped(d / s).mean(-1)
    rstd_a = (grouped(x).var(-1, unbiased=False) + EPS).rsqrt()
    rstd_r = (grouped(x + d / s).var(-1, unbiased=False) + EPS).rsqrt()
    gain = 1 if p["scale"] is None else 1 + p["scale"].reshape(n, c, 1, 1)
    wg = p["weight"].reshape(1, -1, 1, 1) * gain
    bg = p["bias"].reshape(1, -1, 1, 1) * gain
    if p["shift"] is not None:
        bg = bg + p["shift"].reshape(n, c, 1, 1)
    ua = (x - per_channel(mean_a)) * per_channel(rstd_a) * wg + bg
    centre = x.abs() + per_channel(mean_a).abs()
    m_a = (centre * per_channel(rstd_a) * wg.abs() + bg.abs()) * (1 + ua.abs())
    m_d = s * ((d.abs() / s + per_channel(mean_d).abs()) * per_channel(rstd_r)
               + centre * per_channel(rstd_r - rstd_a).abs()) * wg.abs() * (1 + ua.abs())
    return m_a, m_d


def assert_within(got, want, tol, what):
    err = (got.double() - want).abs()
    ratio = (err / tol).max().item()
    assert ratio <= 1, f"{what}: error {ratio:.3g} times its bound (max error {err.max():.3g})"


def grad_reference(t, grad_out):
    """float64 gradient of out_d with respect to the stored difference: through the two
    plain convolutions of the definition (of the resampled norm's outputs, where
    resampled)."""
    a, s = t["a"].double(), float(t["s"])
    d = t["d"].double().requires_grad_(True)
    conv = lambda x: F.conv2d(resampled(x, t["resample"]), t["weight"].double(),  # noqa: E731
                              padding=t["padding"])
    if t["norm"] is None:
        out = conv(d)
    else:
        out = (conv(norm64(t, a + d / s)) - conv(norm64(t, a))) * s
    (g,) = torch.autograd.grad(out, d, grad_out.double())
    return g


def grad_bound(t, dtype):
    """Normwise relative bound of the input gradient: the output's gradient and r rounded to
    the storage dtype (the gradient of the norm at r moves by a few times r's rounding), the
    gradient at the norm's output rounded, the result rounded: 8 half-ulps; and the fp32 sum
    of Cout * kh * kw products. After an upsampling, the gradient at the norm's output is the
    sum of its four copies', added in fp32 (or wider) and rounded once more; a pooling's
    (a quarter of the gradient to each of the four) is exact."""
    k = t["weight"].shape[0] * t["weight"][0, 0].numel()
    up = unit_roundoff(dtype) + 4 * U32 if t["resample"] == "up" else 0
    return 8 * unit_roundoff(dtype) + (k + 2) * U32 + up


def twin_resample_slack(t, dtype):
    """What the twin's pooling adds to its error beyond :func:`reference`'s bounds (which
    the kernel's single rounding of the fp32 average meets), for out_a and out_d: it pools
    the norm's outputs already rounded to the storage dtype (torch's pooling adds the four
    in fp32 or wider, on the CPU and CUDA) and rounds the average again: u + 3 fp32
    half-ulps of the four's magnitudes, through the convolution's |weight|. 0 elsewhere."""
    if t["resample"] != "down":
        return 0, 0
    a, d, s = t["a"].double(), t["d"].double(), float(t["s"])
    ya = norm64(t, a)
    yd = (norm64(t, a + d / s) - ya) * s
    w = t["weight"].double().abs()
    slack = lambda y: F.conv2d(  # noqa: E731
        (unit_roundoff(dtype) + 4 * U32) * resampled(y.abs(), "down"), w, padding=t["padding"])
    return slack(ya), slack(yd)


def cosine(x, y):
    return F.cosine_similarity(x.double().flatten(), y.double().flatten(), dim=0).item()


def check_saved_r(t, out_d):
    """The r the forward saved for the backward (the one saved tensor of the input's shape:
    of the source size, not the resampled one): a + d / s in fp32 rounded once to the storage
    dtype (d / s is exact: s is a power of two), elementwise, so every element was written
    (torch.empty's leftovers would not match)."""
    saved = [x for x in out_d.grad_fn.saved_tensors if x.shape == t["a"].shape]
    assert len(saved) == 1
    want = (t["a"].float() + t["d"].float() / float(t["s"])).to(t["a"].dtype)
    torch.testing.assert_close(saved[0], want, rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _ieee_fp32(true_fp32):
    """fp32 convolutions in IEEE fp32 (no TF32) for the twin, cuDNN, and the kernel, which
    follows the same switch."""


def check_case(case, dtype, d_layout="cl"):
    t = make(case, dtype)
    if d_layout == "nchw":
        t["a"], t["d"] = t["a"].contiguous(), t["d"].contiguous()
    else:
        t["a"] = t["a"].contiguous(memory_format=torch.channels_last)
        t["d"] = t["d"].contiguous(memory_format=torch.channels_last)
    d = t["d"].detach().requires_grad_(True)
    residual = None
    if t["resample"] is not None and t["residual"] is not None:
        residual = (t["residual"][0], t["residual"][1].detach().requires_grad_(True))
    out_a, out_d = call(pair_conv2d, t, d=d, residual=residual)
    assert not out_a.requires_grad and out_d.requires_grad
    assert out_a.dtype == out_d.dtype == dtype
    fmt = torch.channels_last if d_layout == "cl" else torch.contiguous_format
    assert out_a.is_contiguous(memory_format=fmt) and out_d.is_contiguous(memory_format=fmt)
    if t["resample"] is not None:
        check_saved_r(t, out_d)
    grad_out = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(9),
                           dtype=F64).to(dtype).to(DEVICE)
    if residual is None:
        (grad,) = torch.autograd.grad(out_d, d, grad_out)
    else:  # res_d's gradient is out_d's, unchanged
        grad, grad_res = torch.autograd.grad(out_d, (d, residual[1]), grad_out)
        torch.testing.assert_close(grad_res, grad_out, rtol=0, atol=0)

    dt = t["d"].detach().requires_grad_(True)
    twin_a, twin_d = call(pair_conv2d_torch, t, d=dt)
    (twin_grad,) = torch.autograd.grad(twin_d, dt, grad_out)

    ref_a, ref_d, tol_a, tol_d = reference(t, dtype)
    # the twin rounds the convolution before it adds the residual: one more rounding
    extra = 0
    if t["residual"] is not None:
        extra = unit_roundoff(dtype) * (ref_d - t["residual"][1].double()).abs()
    assert_within(out_a, ref_a, tol_a, "out_a vs float64")
    assert_within(out_d, ref_d, tol_d, "out_d vs float64")
    extra_a = 0 if t["residual"] is None else \
        unit_roundoff(dtype) * (ref_a - t["residual"][0].double()).abs()
    slack_a, slack_d = twin_resample_slack(t, dtype)
    extra_a, extra = extra_a + slack_a, extra + slack_d
    assert_within(twin_a, ref_a, tol_a + extra_a, "twin out_a vs float64")
    assert_within(twin_d, ref_d, tol_d + extra, "twin out_d vs float64")
    assert_within(out_a, twin_a.double(), 2 * tol_a + extra_a, "out_a vs twin")
    assert_within(out_d, twin_d.double(), 2 * tol_d + extra, "out_d vs twin")

    g64 = grad_reference(t, grad_out)
    bound = grad_bound(t, dtype)
    for name, want in (("float64", g64), ("twin", twin_grad.double())):
        rel = ((grad.double() - want).norm() / want.norm()).item()
        allowed = bound if name == "float64" else 2 * bound
        assert rel <= allowed, f"grad vs {name}: relative error {rel:.3g} > {allowed:.3g}"
        assert cosine(grad, want) >= 1 - allowed ** 2 / 2
    twin_rel = ((twin_grad.double() - g64).norm() / g64.norm()).item()
    assert twin_rel <= bound, f"twin grad vs float64: {twin_rel:.3g} > {bound:.3g}"
    return t, out_a, out_d, grad


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES)
def test_matches_twin_and_float64(case, dtype):
    """Forward and the gradient to d, one 3x3 and 1x1 case each with and without the
    prologue, odd sizes (5x7 and 3x5 maps, channels not multiples of a block)."""
    check_case(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_blocks_in_every_dim(monkeypatch, dtype):
    """Blocks of 16 over 35 pixels, 20 input and 20 output channels: ragged tiles in M, N and
    K, the centre tap's r written by the first channel block's programs only."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 16, 4, 2))
    monkeypatch.setitem(CASES, "blocks", (3, 20, 20, 5, 5, 7, True, True, True, True, True,
                                          2.0 ** 10))
    check_case("blocks", dtype)


def test_nchw_inputs_give_nchw_outputs_and_the_same_values():
    """The wrapper copies NCHW inputs to channels_last; outputs come back in a's layout."""
    _, out_a, out_d, grad = check_case("3x3_film_xbias_residual", torch.float16, "nchw")
    _, cl_a, cl_d, cl_grad = check_case("3x3_film_xbias_residual", torch.float16, "cl")
    for x, y in ((out_a, cl_a), (out_d, cl_d), (grad, cl_grad)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["3x3_film_xbias_residual", "1x1_plain_residual"])
def test_no_grad_path_is_the_same_kernel(case):
    """Without a gradient to take, nothing is saved and the outputs are the same."""
    t = make(case, torch.bfloat16)
    with torch.no_grad():
        out_a, out_d = call(pair_conv2d, t)
    grad_a, grad_d = call(pair_conv2d, t, d=t["d"].detach().requires_grad_(True))
    assert out_d.grad_fn is None
    torch.testing.assert_close(out_a, grad_a, rtol=0, atol=0)
    torch.testing.assert_close(out_d, grad_d.detach(), rtol=0, atol=0)


def test_residual_gradient_passes_through():
    """res_d's gradient is out_d's, unchanged; res_a and a get none."""
    t = make("1x1_plain_residual", torch.float32)
    res_a = t["residual"][0].detach().requires_grad_(True)
    res_d = t["residual"][1].detach().requires_grad_(True)
    out_a, out_d = call(pair_conv2d, t, residual=(res_a, res_d))
    assert not out_a.requires_grad
    grad_out = torch.randn_like(out_d)
    (got,) = torch.autograd.grad(out_d, res_d, grad_out)
    torch.testing.assert_close(got, grad_out, rtol=0, atol=0)


def test_pair_norm_statistics_without_cancellation():
    """fp32 statistics of a pair whose difference is 1e-4 of the target: rstd_r - rstd_a to
    fp32's relative accuracy, which subtracting the two fp32 values would not give."""
    gen = torch.Generator().manual_seed(3)
    a64 = rand(2, 8, 6, 5, shift=0.7, gen=gen)
    d64 = rand(2, 8, 6, 5, scale=1e-4, gen=gen)
    xb = rand(8, scale=0.5, gen=gen)
    s = 2.0 ** 12
    stats = pair_norm_statistics(a64.float(), (d64 * s).float(), torch.tensor(s), 4, EPS,
                                 xb.float())
    assert isinstance(stats, PairNormStatistics)
    x = (a64.float().double() + xb.float().double().reshape(1, -1, 1, 1)).reshape(2, 4, -1)
    r = x + ((d64 * s).float().double() / s).reshape(2, 4, -1)
    want = PairNormStatistics(
        x.mean(-1), (x.var(-1, unbiased=False) + EPS).rsqrt(), (r - x).mean(-1),
        (r.var(-1, unbiased=False) + EPS).rsqrt(),
        (r.var(-1, unbiased=False) + EPS).rsqrt() - (x.var(-1, unbiased=False) + EPS).rsqrt())
    for name, got, ref in zip(stats._fields, stats, want):
        assert got.dtype == torch.float32 and got.shape == (2, 4)
        # sums over 60 elements: a few dozen fp32 ulps of the inputs' magnitude
        torch.testing.assert_close(got.double(), ref, rtol=64 * U32, atol=0, msg=name)
    naive = (stats.rstd_r - stats.rstd_a).double()
    assert ((naive - want.drstd).abs() / want.drstd.abs()).max() > 64 * U32


def test_python_float_d_scale():
    t = make("3x3_silu_1_per_group", torch.float32)
    got = call(pair_conv2d, t)
    t["s"] = float(t["s"])
    again = call(pair_conv2d, t)
    for x, y in zip(got, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# the decoder's concatenated input [a, a2], [d, d2], read in place (``concat=``): case, and
# the channels of the first part; a norm group straddles the boundary in the normed cases
SPLITS = {"3x3_film_xbias_residual": 7, "3x3_silu_1_per_group": 4, "1x1_plain_residual": 3}


def _parts(x, c1):
    cl = torch.channels_last
    return x[:, :c1].contiguous(memory_format=cl), x[:, c1:].contiguous(memory_format=cl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SPLITS)
def test_concatenated_input_read_in_place(monkeypatch, case, dtype):
    """Two segments of the reduction, each ragged in blocks of 16: the outputs within the
    kernel's float64 bounds of the concatenation's convolution, the gradients of both parts
    those of the whole, and the prologue's statistics of the two parts those of the whole
    (the same sums in the same order)."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 16, 4, 2))
    t = make(case, dtype)
    c1 = SPLITS[case]
    a1, a2 = _parts(t["a"], c1)
    d1, d2 = (x.detach().requires_grad_(True) for x in _parts(t["d"], c1))
    prologue = None
    if t["norm"] is not None:
        p = t["norm"]
        prologue = pair_prologue(a1, d1.detach(), t["s"], p["num_groups"], p["weight"],
                                 p["bias"], EPS, p["scale"], p["shift"], p["x_bias"],
                                 p["silu"], concat=(a2, d2.detach()))
        whole = prologue_of(t)
        for name in PairNormStatistics._fields:
            assert torch.equal(getattr(prologue, name), getattr(whole, name)), name
    out_a, out_d = pair_conv2d(a1, d1, t["s"], t["weight"], t["bias"], padding=t["padding"],
                               prologue=prologue, residual=t["residual"], concat=(a2, d2))
    ref_a, ref_d, tol_a, tol_d = reference(t, dtype)
    assert_within(out_a, ref_a, tol_a, "out_a vs float64")
    assert_within(out_d, ref_d, tol_d, "out_d vs float64")
    grad_out = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(9),
                           dtype=F64).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out_d, (d1, d2), grad_out)
    grad = torch.cat(grads, 1)
    g64 = grad_reference(t, grad_out)
    rel = ((grad.double() - g64).norm() / g64.norm()).item()
    assert rel <= grad_bound(t, dtype), f"grad vs float64: relative error {rel:.3g}"
    with torch.no_grad():
        again = pair_conv2d(a1, d1, t["s"], t["weight"], t["bias"], padding=t["padding"],
                            prologue=prologue, residual=t["residual"], concat=(a2, d2))
    for x, y in zip((out_a, out_d), again):
        assert torch.equal(x, y)


def test_concatenated_input_twin_is_the_concatenation():
    t = make("3x3_film_xbias_residual", torch.float64)
    a1, a2 = _parts(t["a"], 5)
    d1, d2 = _parts(t["d"], 5)
    got = pair_conv2d_torch(a1, d1, t["s"], t["weight"], t["bias"], padding=1,
                            prologue=prologue_of(t), residual=t["residual"], concat=(a2, d2))
    want = call(pair_conv2d_torch, t)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# the next norm's statistics from the epilogue (``next_norm=``): the target's output with a
# mean 64 times its spread (where sums of squares minus squared sums lose everything)
def check_epilogue_statistics(stats, out_a, out_d, s, x_bias):
    """The epilogue's statistics of the outputs (2 samples, 4 groups) against float64's: the
    means within 64 fp32 ulps of their magnitude plus their group's spread, the rstds within
    64 ulps, rstd_r - rstd_a within twice the statistics kernels' error (or 64 ulps)."""
    want = pair_norm_statistics(out_a.double(), out_d.double(), float(s), 4, EPS,
                                x_bias.double())
    kernels = pc.pair_statistics_triton(out_a, out_d, s, 4, EPS, x_bias)
    spread = {"mean_a": (out_a.double() + x_bias.double().reshape(1, -1, 1, 1)),
              "mean_d": out_d.double() / float(s)}
    spread = {k: v.reshape(2, 4, -1).std(-1) for k, v in spread.items()}
    for name, got, ref, other in zip(PairNormStatistics._fields, stats, want, kernels):
        assert got.shape == (2, 4) and got.dtype == torch.float32
        scale = ref.abs() + spread[name] if name in spread else ref.abs()
        err = ((got.double() - ref).abs() / scale).max().item()
        if name == "drstd":
            theirs = ((other.view(2, 4).double() - ref).abs() / ref.abs()).max().item()
            assert err <= max(2 * theirs, 64 * U32), f"{name}: {err:.3g} vs {theirs:.3g}"
        else:
            assert err <= 64 * U32, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["3x3_film_xbias_residual", "1x1_plain_residual"])
def test_next_norm_statistics_from_the_epilogue(monkeypatch, case, dtype):
    """Tiles of 16 (ragged pixels, two channel tiles with a group across them): the
    statistics of the stored outputs within 64 fp32 ulps of float64's where they are
    well conditioned (the means, the rstds), and rstd_r - rstd_a no further from float64 than
    the statistics kernels' own, the pass these replace; gradient and outputs unchanged."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 16, 4, 2))
    t = make(case, dtype)
    t["weight"] = torch.cat([t["weight"]] * 3)[:20].contiguous()  # 20 output channels
    cout = t["weight"].shape[0]
    gen = torch.Generator().manual_seed(5)
    t["bias"] = (64 + torch.randn(cout, generator=gen, dtype=F64)).to(dtype).to(DEVICE)
    t["residual"] = None
    x_bias = torch.randn(cout, generator=gen, dtype=F64).to(dtype).to(DEVICE)
    nn_ = pc.NextNorm(4, EPS, x_bias)  # groups of 5: channels 15..19 across both tiles
    d = t["d"].detach().requires_grad_(True)
    out_a, out_d, stats = pair_conv2d(t["a"], d, t["s"], t["weight"], t["bias"],
                                      padding=t["padding"], prologue=prologue_of(t),
                                      next_norm=nn_)
    plain = call(pair_conv2d, t)
    for x, y in zip((out_a, out_d), plain):
        assert torch.equal(x, y)
    check_epilogue_statistics(stats, out_a, out_d.detach(), t["s"], x_bias)
    twin = pair_conv2d_torch(t["a"].double(), t["d"].double(), float(t["s"]),
                             t["weight"].double(), t["bias"].double(), padding=t["padding"],
                             next_norm=pc.NextNorm(4, EPS, x_bias.double()))[2]
    assert isinstance(twin, PairNormStatistics)
    grad_out = torch.randn_like(out_d)
    (got,) = torch.autograd.grad(out_d, d, grad_out)
    d2 = t["d"].detach().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(call(pair_conv2d, t, d=d2)[1], d2, grad_out)
    assert torch.equal(got, want_grad)
    with torch.no_grad():
        again = pair_conv2d(t["a"], t["d"], t["s"], t["weight"], t["bias"],
                            padding=t["padding"], prologue=prologue_of(t), next_norm=nn_)
    for x, y in zip(stats, again[2]):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# the prologue's output resampled 2x before the convolution (``resample=``): the input of the
# convolutions is the pair norm's output upsampled to the nearest pixel or 2x2-average pooled;
# the definition is float64's norm, resampled, convolved (:func:`reference`), the twin's its
# pieces by hand; r saved at the input's size and the backward through the resampling's
# adjoint.

@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", RS_CASES)
def test_resampled_matches_twin_and_float64(case, dtype):
    """Forward, the gradient to d and to res_d (out_d's, unchanged) and the saved r: "up"
    from odd maps (3x5 to 6x10), "down" to odd ones (8x10 to 4x5, 6x6 to 3x3); 3x3 with
    FiLM, x_bias, SiLU, bias and the residual pair, 3x3 with one channel a group and no bias,
    1x1 without SiLU; odd channel counts. The outputs of the resampled size."""
    t, out_a, out_d, _ = check_case(case, dtype)
    n, _, h, w = t["a"].shape
    size = (2 * h, 2 * w) if t["resample"] == "up" else (h // 2, w // 2)
    assert out_a.shape == out_d.shape == (n, t["weight"].shape[0], *size)


@pytest.mark.parametrize("resample", ["up", "down"])
def test_resampled_several_blocks_in_every_dim(monkeypatch, resample):
    """Blocks of 16 over 60 output pixels (up from 3x5: tiles across rows of 10, each source
    pixel's four copies in one or two tiles) or 20 (down from 8x10), 20 input and 20 output
    channels: ragged tiles in M, N and K. The saved r (of the source size, written by the
    first channel block's programs at the top-left copy or from the four pooled pixels) is
    checked elementwise, every element written and with its value; fp32, whose gradient
    against float64 is as tight as r is right."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 16, 4, 2))
    size = (3, 5) if resample == "up" else (8, 10)
    monkeypatch.setitem(RS_CASES, "blocks", (resample, 3, 20, 20, 5, *size, True, True, True,
                                             True, True, 2.0 ** 10))
    check_case("blocks", torch.float32)


@pytest.mark.parametrize("resample", ["up", "down"])
def test_resampled_no_grad_path_is_the_same_kernel(resample):
    """Without a gradient to take, no r is saved and the outputs are the same."""
    t = make(f"{resample}_3x3_film_xbias_residual", torch.bfloat16)
    with torch.no_grad():
        out_a, out_d = call(pair_conv2d, t)
    grad_a, grad_d = call(pair_conv2d, t, d=t["d"].detach().requires_grad_(True))
    assert out_d.grad_fn is None and grad_d.grad_fn is not None
    torch.testing.assert_close(out_a, grad_a, rtol=0, atol=0)
    torch.testing.assert_close(out_d, grad_d.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("case", ["up_3x3_film_xbias_residual", "down_3x3_film_xbias_residual",
                                  "down_1x1_norm_xbias_no_silu"])
def test_resampled_twin_is_the_composition(case, dtype):
    """The twin with ``resample`` is, value for value and in its gradient to d, the pair
    norm's twin (group_norm_silu_difference_torch), then F.interpolate(nearest, 2) or
    F.avg_pool2d(2) of both of its outputs, then F.conv2d of each, the bias and the residual
    pair added."""
    t = make(case, dtype)
    p = t["norm"]
    d = t["d"].detach().requires_grad_(True)
    got_a, got_d = call(pair_conv2d_torch, t, d=d)
    by_hand = {"up": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
               "down": lambda x: F.avg_pool2d(x, 2)}[t["resample"]]
    dh = t["d"].detach().requires_grad_(True)
    ya, yd = group_norm_silu_difference_torch(t["a"], dh, t["s"], p["num_groups"], p["weight"],
                                              p["bias"], EPS, p["scale"], p["shift"],
                                              p["x_bias"], p["silu"])
    want_a = F.conv2d(by_hand(ya), t["weight"], t["bias"], padding=t["padding"])
    want_d = F.conv2d(by_hand(yd), t["weight"], padding=t["padding"])
    if t["residual"] is not None:
        want_a, want_d = want_a + t["residual"][0], want_d + t["residual"][1]
    n, _, h, w = t["a"].shape
    size = (2 * h, 2 * w) if t["resample"] == "up" else (h // 2, w // 2)
    assert got_a.shape == got_d.shape == (n, t["weight"].shape[0], *size)
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(got_d, want_d, rtol=0, atol=0)
    grad_out = torch.randn(want_d.shape, generator=torch.Generator().manual_seed(9),
                           dtype=F64).to(dtype).to(DEVICE)
    (got,) = torch.autograd.grad(got_d, d, grad_out)
    (want,) = torch.autograd.grad(want_d, dh, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("resample,dtype", [("up", torch.float32), ("down", torch.bfloat16)],
                         ids=["up-fp32", "down-bf16"])
def test_resampled_next_norm_statistics_from_the_epilogue(monkeypatch, resample, dtype):
    """The next norm's statistics of the resampled size's outputs (up: 60 pixels in 4 tiles
    of 16, down: 20 in 2; 20 output channels, groups of 5 across the two channel tiles; the
    residual pair added, the bias's mean 64 times its spread) as
    :func:`test_next_norm_statistics_from_the_epilogue` holds them: within 64 fp32 ulps of
    float64's statistics of the stored outputs, rstd_r - rstd_a no further than the
    statistics kernels' own; outputs and gradient unchanged by asking for them."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 16, 4, 2))
    t = make(f"{resample}_3x3_film_xbias_residual", dtype)
    t["weight"] = torch.cat([t["weight"]] * 3)[:20].contiguous()  # 20 output channels
    cout = t["weight"].shape[0]
    gen = torch.Generator().manual_seed(5)
    t["bias"] = (64 + torch.randn(cout, generator=gen, dtype=F64)).to(dtype).to(DEVICE)
    shape = (2, cout, *t["residual"][0].shape[2:])
    t["residual"] = tuple(torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)
                          for _ in range(2))
    x_bias = torch.randn(cout, generator=gen, dtype=F64).to(dtype).to(DEVICE)
    nn_ = pc.NextNorm(4, EPS, x_bias)  # groups of 5: channels 15..19 across both tiles
    d = t["d"].detach().requires_grad_(True)
    out_a, out_d, stats = pair_conv2d(t["a"], d, t["s"], t["weight"], t["bias"],
                                      padding=t["padding"], prologue=prologue_of(t),
                                      residual=t["residual"], next_norm=nn_,
                                      resample=resample)
    grad_out = torch.randn(out_d.shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)
    (got,) = torch.autograd.grad(out_d, d, grad_out)
    out_d = out_d.detach()
    d2 = t["d"].detach().requires_grad_(True)
    plain = call(pair_conv2d, t, d=d2)
    for x, y in zip((out_a, out_d), plain):
        assert torch.equal(x, y.detach())
    (want_grad,) = torch.autograd.grad(plain[1], d2, grad_out)
    assert torch.equal(got, want_grad)
    check_epilogue_statistics(stats, out_a, out_d.detach(), t["s"], x_bias)
    twin = pair_conv2d_torch(t["a"], t["d"], t["s"], t["weight"], t["bias"],
                             padding=t["padding"], prologue=prologue_of(t),
                             residual=t["residual"], next_norm=nn_, resample=resample)
    twin_want = pair_norm_statistics(twin[0], twin[1], t["s"], 4, EPS, x_bias)
    for x, y in zip(twin[2], twin_want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _refused(t, match, **kwargs):
    args = dict(padding=t["padding"], prologue=prologue_of(t), residual=t["residual"])
    args.update(kwargs)
    weight = args.pop("weight", t["weight"])
    d = args.pop("d", t["d"])
    with pytest.raises(ValueError, match=match):
        pair_conv2d(t["a"], d, t["s"], weight, t["bias"], **args)


def test_validation():
    t = make("3x3_film_xbias_residual", torch.float32)
    _refused(t, "stride", stride=2)
    _refused(t, "stride", stride=(1, 2))
    _refused(t, "dilation", dilation=2)
    _refused(t, "groups=1", groups=2)
    _refused(t, "zero padding", padding_mode="reflect")
    _refused(t, "zero padding", padding="same")
    _refused(t, "'same' padding", padding=0)
    _refused(t, "'same' padding", weight=t["weight"][..., :2, :2].contiguous(), padding=1)
    _refused(t, "d must have a's dtype", d=t["d"].half())
    _refused(t, "weight must have a's dtype", weight=t["weight"].double())
    _refused(t, "res_d must have a's dtype", residual=(t["residual"][0],
                                                       t["residual"][1].half()))
    _refused(t, "res_a must have the output's shape", residual=(t["residual"][0][:, :3],
                                                               t["residual"][1]))
    _refused(t, "input channels", weight=t["weight"][:, :5].contiguous())
    _refused(t, "requires grad", weight=t["weight"].detach().requires_grad_(True))
    _refused(t, "groups", prologue=prologue_of(t)._replace(num_groups=5))
    a2, d2 = t["a"][:, :4], t["d"][:, :4]
    _refused(t, "must be a NextNorm", next_norm=(2, EPS))
    _refused(t, "do not split into 3 groups", next_norm=pc.NextNorm(3, EPS))
    _refused(t, "one value per output", next_norm=pc.NextNorm(2, EPS, t["bias"][:3]))
    _refused(t, "concat must be a pair", concat=(a2,))
    _refused(t, "share a's batch and size", concat=(a2[:1], d2[:1]))
    _refused(t, "share a's batch and size", concat=(a2, d2[:, :3]))
    _refused(t, "the input has 16", concat=(a2, d2))
    _refused(t, "a2 must have a's dtype", concat=(a2.half(), d2),
             weight=torch.cat([t["weight"], t["weight"][:, :4]], 1))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        pair_conv2d(t["a"].double(), t["d"].double(), t["s"], t["weight"].double(),
                    padding=1)


def test_resample_refusals():
    """resample is "up" or "down", after a prologue, without concat; "down" pools even sizes;
    the residual has the resampled size. The twin refuses the first two too."""
    t = make("down_3x3_film_xbias_residual", torch.float32)
    for bad in ("left", "UP", 2):
        _refused(t, "resample is 'up' or 'down'", resample=bad)
    _refused(t, "resample is 'up' or 'down'.* without a prologue", resample="up",
             prologue=None)
    a2, d2 = t["a"][:, :4], t["d"][:, :4]
    _refused(t, "resample is 'up' or 'down'.* with concat", resample="down", concat=(a2, d2))
    for rows, cols in ((7, 10), (8, 9), (7, 9)):
        odd = dict(t, a=t["a"][:, :, :rows, :cols], residual=None)
        _refused(odd, "resample='down' pools even sizes", resample="down",
                 d=t["d"][:, :, :rows, :cols])
    _refused(t, "res_a must have the output's shape", resample="up")  # a 4x5 residual
    _refused(t, "res_a must have the output's shape", resample=None)
    for resample, prologue, match in (("left", prologue_of(t), "resample is 'up' or 'down'"),
                                      ("up", None, "without one")):
        with pytest.raises(ValueError, match=match):
            pair_conv2d_torch(t["a"], t["d"], t["s"], t["weight"], t["bias"], padding=1,
                              prologue=prologue, resample=resample)


# ---------------------------------------------------------------------------------------------
# e4m3 (FP8) operands: ``quantized=``. The definition is the twin (the prologue's norm, then
# ops/fp8.py's quantizer and e4m3 convolution, the residual added in fp32 and one rounding).
# The e4m3 products are exact in fp32, so kernel and twin differ only where their operands do
# (never without a prologue; with one, where the two fp32 prologues' bf16 outputs land on
# either side of an e4m3 rounding point) and in the order of their fp32 sums, before the
# final rounding to bf16.

from diffloss_fast.ops.fp8 import E4M3, amax_to_scale, quantize  # noqa: E402
from diffloss_fast.ops.fp8 import _e4m3_forward, _operand_dtype  # noqa: E402
from diffloss_fast.ops.group_norm_silu_difference import (  # noqa: E402
    group_norm_silu_difference_torch)
from diffloss_fast.ops.pair_conv import E4M3Operands, e4m3_operands  # noqa: E402

BF16 = torch.bfloat16
Q_CASES = ["3x3_film_xbias_residual", "3x3_plain", "1x1_norm_xbias_no_silu",
           "1x1_plain_residual"]
# the resampled cases on e4m3 operands
RS_Q_CASES = ["up_3x3_film_xbias_residual", "down_3x3_film_xbias_residual",
              "up_1x1_norm_xbias_no_silu", "down_1x1_norm_xbias_no_silu"]


def twin_norm(t):
    """The twin's (ya, yd): the prologue's norm in plain PyTorch (resampled by torch's ops,
    where the case resamples), or the stored inputs."""
    if t["norm"] is None:
        return t["a"], t["d"]
    p = t["norm"]
    ya, yd = group_norm_silu_difference_torch(t["a"], t["d"], t["s"], p["num_groups"],
                                              p["weight"], p["bias"], EPS, p["scale"],
                                              p["shift"], p["x_bias"], p["silu"])
    return resampled(ya, t["resample"]), resampled(yd, t["resample"])


def quantized_of(t, headroom_a=0.5, headroom_d=4.0):
    """E4M3Operands of a case: the weight per output channel; the input scales from the
    twin's norm output's amax times a headroom, as DelayedScaling gives them. 0.5 for a:
    the largest values of ya saturate at 448."""
    ya, yd = twin_norm(t)
    return e4m3_operands(t["weight"], amax_to_scale(ya.abs().amax().float() * headroom_a),
                         amax_to_scale(yd.abs().amax().float() * headroom_d))


def _fp32_toward(x, direction):
    """x (float64) rounded to fp32 toward -inf (direction -1) or +inf (+1)."""
    f = x.float()
    off = f.double() > x if direction < 0 else f.double() < x
    return torch.where(off, torch.nextafter(f, torch.full_like(f, direction * float("inf"))), f)


def operands_range(t, branch, dtype):
    """(lowest, highest) value in ``dtype`` each operand of ``branch`` may take in the kernel
    or the twin, before quantization. Without a prologue the stored input itself: one value.
    With one, each computes the norm in fp32 within the prologue's error model (the fp32 part
    of ``in_a``/``in_d`` of :func:`reference`) of the float64 norm and rounds it to ``dtype``:
    rounding is monotone, so its values lie between those of the interval's ends, rounded
    outwards to fp32. Resampled: "up" repeats each interval; "down" averages four values,
    which the kernel does in fp32 and rounds once and the twin does after rounding each to
    ``dtype`` (adding them in fp32 or, at worst, in ``dtype``): within the average of the
    four errors and 4 half-ulps of ``dtype`` of the four's magnitudes of the float64 average,
    before the last rounding."""
    if t["norm"] is None:
        x = t["a"] if branch == "a" else t["d"]
        return x, x
    a, d, s = t["a"].double(), t["d"].double(), float(t["s"])
    ya, yr = norm64(t, a), norm64(t, a + d / s)
    m_a, m_d = prologue_magnitudes(t, a, d, s)
    tiny = underflow(torch.float32)
    if branch == "a":
        y, err = ya, tiny + C_PROLOGUE * U32 * m_a
    else:
        y, err = (yr - ya) * s, tiny + C_PROLOGUE * U32 * m_d
    resample = t["resample"]
    if resample == "down":
        err = resampled(err, "down") + 4 * unit_roundoff(dtype) * resampled(y.abs() + err,
                                                                               "down")
    else:
        err = resampled(err, resample)
    y = resampled(y, resample)
    lo, hi = (_fp32_toward(y - err, -1).to(dtype), _fp32_toward(y + err, 1).to(dtype))
    twin = twin_norm(t)[0 if branch == "a" else 1]
    assert ((lo <= twin) & (twin <= hi)).all(), "the twin's norm output is outside the model"
    return lo, hi


def quantized_operands_range(t, branch, scale, dtype):
    """(lowest, highest) e4m3 value (float64, unscaled) each operand of ``branch`` may take
    in the kernel or the twin: those of :func:`operands_range`'s ends, x -> quantize(x,
    scale) being monotone (an IEEE division, a clamp, a rounding to nearest)."""
    lo, hi = operands_range(t, branch, dtype)
    return quantize(lo, scale).double(), quantize(hi, scale).double()


def quantized_bound(t, q, twin_a, twin_d, dtype):
    """Elementwise bounds of |kernel - twin| for out_a and out_d. Before the final rounding:
    sigma = fl(input scale * weight scale) times the sums of |operand spread| * |w_q| (what
    the operands may disagree by) and the two fp32 evaluations' errors, each within
    (K + 2) fp32 half-ulps of M = sigma * sum |q| |w_q| + |bias| + |residual| (K - 1 sums,
    the scaling, the bias and residual additions; an FMA only drops one). On CUDA the twin's
    e4m3 convolution returns its sums in bf16 (fp8.py's operand dtype there): one more bf16
    half-ulp of sigma * sum |q| |w_q|. Then both round to bf16: |fl(x) - fl(y)| <= |x - y|
    + u (|x| + |y|), with |y| <= |twin| / (1 - u) and |x| <= |y| + delta."""
    u, tiny = unit_roundoff(dtype), underflow(dtype)
    wq = q.weight.double().abs()
    K = wq[0].numel()
    conv = lambda x: F.conv2d(x, wq, padding=t["padding"])  # noqa: E731
    bounds = []
    for branch, twin, scale in (("a", twin_a, q.a_scale), ("d", twin_d, q.d_scale_q)):
        lo, hi = quantized_operands_range(t, branch, scale, dtype)
        sigma = (scale * q.weight_scale).double().reshape(1, -1, 1, 1)  # fp32 product
        sums = sigma * conv(torch.maximum(lo.abs(), hi.abs()))
        M = sums.clone()
        if branch == "a" and t["bias"] is not None:
            M = M + t["bias"].double().abs().reshape(1, -1, 1, 1)
        if t["residual"] is not None:
            M = M + t["residual"][0 if branch == "a" else 1].double().abs()
        delta = sigma * conv(hi - lo) + 2 * (K + 2) * U32 * M * (1 + 2 * K * U32)
        if _operand_dtype(twin.device) != torch.float32:
            delta = delta + unit_roundoff(_operand_dtype(twin.device)) * sums
        bounds.append(delta + u * (2 * twin.double().abs() / (1 - u) + delta) + 2 * tiny)
    return bounds


def check_quantized_case(case, seed=0):
    t = make(case, BF16, seed)
    t["a"] = t["a"].contiguous(memory_format=torch.channels_last)
    t["d"] = t["d"].contiguous(memory_format=torch.channels_last)
    q = quantized_of(t)
    out_a, out_d = pair_conv2d(t["a"], t["d"], t["s"], t["weight"], t["bias"],
                               padding=t["padding"], prologue=prologue_of(t),
                               residual=t["residual"], quantized=q, resample=t["resample"])
    twin_a, twin_d = pair_conv2d_torch(t["a"], t["d"], t["s"], t["weight"], t["bias"],
                                       padding=t["padding"], prologue=prologue_of(t),
                                       residual=t["residual"], quantized=q,
                                       resample=t["resample"])
    assert out_a.dtype == out_d.dtype == twin_a.dtype == BF16
    assert out_a.is_contiguous(memory_format=torch.channels_last)
    tol_a, tol_d = quantized_bound(t, q, twin_a, twin_d, BF16)
    assert_within(out_a, twin_a.double(), tol_a, "e4m3 out_a vs twin")
    assert_within(out_d, twin_d.double(), tol_d, "e4m3 out_d vs twin")
    return t, q, (out_a, out_d), (twin_a, twin_d)


@pytest.mark.parametrize("case", Q_CASES + RS_Q_CASES)
def test_e4m3_matches_twin(case):
    """3x3 and 1x1, with the prologue (FiLM, x_bias, residual; no SiLU) and without, odd
    maps and channel counts below one 32-wide reduction step; and of the resampled input
    (the twin's operands bounded after the resampling by :func:`operands_range`: the kernel
    rounds the fp32 average of four once, the twin each value and then their average), the
    outputs of the resampled size."""
    t, q, (out_a, out_d), (twin_a, twin_d) = check_quantized_case(case)
    n, _, h, w = t["a"].shape
    size = pc.resampled_size(h, w, t["resample"])
    assert out_a.shape == out_d.shape == (n, t["weight"].shape[0], *size)
    if t["residual"] is None:
        # without a residual the twin is fp8.py's e4m3 convolution of the norm's output (
        # resampled by torch), as the unfused FP8 network computes it
        ya, yd = twin_norm(t)
        args = (q.weight, q.weight_scale)
        conv = dict(stride=1, padding=t["padding"], dilation=1, groups=1, out_dtype=BF16)
        torch.testing.assert_close(twin_a, _e4m3_forward(ya, q.a_scale, *args, t["bias"],
                                                         **conv), rtol=0, atol=0)
        torch.testing.assert_close(twin_d, _e4m3_forward(yd, q.d_scale_q, *args, None,
                                                         **conv), rtol=0, atol=0)


def test_e4m3_several_blocks_in_every_dim(monkeypatch):
    """Blocks of 16 pixels, 16 output channels and 32 input channels (an FP8 MMA's smallest
    reduction) over 35 pixels, 40 input and 20 output channels: ragged tiles in M, N and K."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 32, 4, 2))
    monkeypatch.setitem(CASES, "blocks", (3, 40, 20, 5, 5, 7, True, True, True, True, True,
                                          2.0 ** 10))
    check_quantized_case("blocks")


def _e4m3_probe_values():
    """bf16 values that exercise e4m3's rounding: every midpoint between neighbouring normal
    e4m3 values (ties, to even) and one bf16 step either side of it, the subnormal midpoints
    (multiples of 2**-10), the change from subnormals to normals at 2**-6, saturation at 448
    (464 is 448's midpoint with 480, which e4m3fn lacks), zeros, and random magnitudes from
    2**-14 to 2**10; each with both signs."""
    mids = [(1 + (m + 0.5) / 8) * 2.0 ** e for e in range(-6, 9) for m in range(8)]
    step = [m * 2.0 ** -8 for m in mids]  # one bf16 ulp at the low end of the binade or less
    subnormal = [(k + 0.5) * 2.0 ** -9 for k in range(8)] + [k * 2.0 ** -10 for k in range(20)]
    edges = [2.0 ** -6, 2.0 ** -6 - 2.0 ** -10, 448.0, 464.0, 465.0, 480.0, 500.0, 1e4, 0.0]
    gen = torch.Generator().manual_seed(5)
    rnd = (2.0 ** (torch.rand(120, generator=gen) * 24 - 14)).tolist()
    pos = mids + [m + s for m, s in zip(mids, step)] + [m - s for m, s in zip(mids, step)]
    pos += subnormal + edges + rnd
    x = torch.tensor(pos + [-v for v in pos], dtype=F64).to(BF16)
    return x


def _identity_case(x, a_scale, d_scale_q):
    """A 1x1 convolution with an identity weight (e4m3 1.0, scale 1) of x laid out as
    (1, 8, H, W) for both a (as given) and d (reversed): each output is its input's
    quantized value times the input's scale, one exact product."""
    c = 8
    x = x[: x.numel() // c * c]
    a = x.reshape(1, c, 1, -1).contiguous(memory_format=torch.channels_last).to(DEVICE)
    d = x.flip(0).reshape(1, c, 1, -1).contiguous(memory_format=torch.channels_last).to(DEVICE)
    eye = torch.eye(c, dtype=BF16, device=DEVICE).reshape(c, c, 1, 1)
    q = E4M3Operands(eye.to(E4M3), torch.ones(c, device=DEVICE),
                     torch.tensor(a_scale, device=DEVICE), torch.tensor(d_scale_q, device=DEVICE))
    out = pair_conv2d(a, d, torch.tensor(1.0, device=DEVICE), eye, padding=0, quantized=q)
    return a, d, q, out


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 3.1e-3)], ids=["unit", "arbitrary"])
def test_e4m3_rounding_in_kernel_is_torchs(scales):
    """The kernel's quantization, elementwise, against torch's float8_e4m3fn rounding: with
    unit scales the outputs are x.clamp(-448, 448).to(float8_e4m3fn) itself (e4m3 values are
    bf16 values); with other scales, quantize(x, scale) * scale rounded to bf16, which also
    checks the kernel's division is IEEE's."""
    x = _e4m3_probe_values()
    a, d, q, (out_a, out_d) = _identity_case(x, *scales)
    if scales == (1.0, 1.0):
        torch.testing.assert_close(out_a.float(), a.float().clamp(-448, 448).to(E4M3).float(),
                                   rtol=0, atol=0)
    for out, x_, s in ((out_a, a, q.a_scale), (out_d, d, q.d_scale_q)):
        want = (quantize(x_, s).float() * s).to(BF16)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_e4m3_rounding_cases_are_reached():
    """The probe values do reach ties to even, saturation and subnormals (a guard on the test
    above): torch's rounding differs from rounding ties away from zero on some of them."""
    x = _e4m3_probe_values().float()
    q = x.clamp(-448, 448).to(E4M3).float()
    assert (q.abs() == 448).sum() >= 10
    sub = (q != 0) & (q.abs() < 2.0 ** -6)
    assert sub.sum() >= 10
    # ties: |x| exactly halfway, rounded down to the even neighbour at least once
    away = torch.sign(x) * (x.abs() * 1.0001)  # nudged up: rounds away from zero at ties
    assert (away.clamp(-448, 448).to(E4M3).float() != q).sum() >= 10


@pytest.mark.parametrize("case", ["3x3_film_xbias_residual", "1x1_norm_xbias_no_silu",
                                  "up_3x3_film_xbias_residual", "down_1x1_norm_xbias_no_silu"])
def test_e4m3_gradient_is_the_bf16_paths(case):
    """Backward unchanged: the bf16 dgrad with the unquantized weight at the restored point,
    bitwise the gradient without quantization; and within the bf16 gradient's bound of the
    twin's (straight through fp8.py's e4m3 convolution)."""
    t = make(case, BF16)
    q = quantized_of(t)
    grads = []
    for quantized in (q, None):
        d = t["d"].detach().requires_grad_(True)
        out_a, out_d = pair_conv2d(t["a"], d, t["s"], t["weight"], t["bias"],
                                   padding=t["padding"], prologue=prologue_of(t),
                                   residual=t["residual"], quantized=quantized,
                                   resample=t["resample"])
        assert not out_a.requires_grad
        grad_out = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(9),
                               dtype=F64).to(BF16).to(DEVICE)
        grads.append(torch.autograd.grad(out_d, d, grad_out)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    dt = t["d"].detach().requires_grad_(True)
    twin_d = pair_conv2d_torch(t["a"], dt, t["s"], t["weight"], t["bias"], padding=t["padding"],
                               prologue=prologue_of(t), residual=t["residual"],
                               quantized=q, resample=t["resample"])[1]
    (twin_grad,) = torch.autograd.grad(twin_d, dt, grad_out)
    rel = ((grads[0].double() - twin_grad.double()).norm() / twin_grad.double().norm()).item()
    assert rel <= 2 * grad_bound(t, BF16), rel


def test_e4m3_no_grad_path_is_the_same_kernel():
    t = make("3x3_film_xbias_residual", BF16)
    q = quantized_of(t)
    args = (t["a"], t["d"], t["s"], t["weight"], t["bias"])
    kw = dict(padding=1, prologue=prologue_of(t), residual=t["residual"], quantized=q)
    with torch.no_grad():
        plain = pair_conv2d(*args, **kw)
    args = (t["a"], t["d"].detach().requires_grad_(True)) + args[2:]
    graded = pair_conv2d(*args, **kw)
    for x, y in zip(plain, graded):
        torch.testing.assert_close(x, y.detach(), rtol=0, atol=0)


def test_e4m3_validation_refusals():
    t = make("3x3_film_xbias_residual", BF16)
    q = quantized_of(t)
    t32 = make("3x3_film_xbias_residual", torch.float32)
    _refused(t32, "bf16 activations only", quantized=quantized_of(t32))
    _refused(t, "quantized.weight must be", quantized=q._replace(weight=q.weight.float()))
    _refused(t, "quantized.weight must be",
             quantized=q._replace(weight=q.weight[:, :5].contiguous()))
    _refused(t, "quantized.weight_scale", quantized=q._replace(weight_scale=q.weight_scale[:3]))
    _refused(t, "quantized.a_scale", quantized=q._replace(a_scale=q.a_scale.double()))
    _refused(t, "quantized.d_scale_q", quantized=q._replace(d_scale_q=torch.ones(2)))
    _refused(t, "E4M3Operands", quantized=tuple(q))


def _amax_run(t, q, amax_out):
    return pair_conv2d(t["a"], t["d"], t["s"], t["weight"], t["bias"], padding=t["padding"],
                       prologue=prologue_of(t), residual=t["residual"], quantized=q,
                       amax_out=amax_out, resample=t["resample"])


@pytest.mark.parametrize("case", Q_CASES + RS_Q_CASES)
def test_e4m3_amax_is_the_quantized_inputs(case):
    """amax_out: the largest |value| of each input as the kernel quantizes it (after the
    prologue, rounded to bf16), as torch finds it in the twin's norm output, and the outputs
    unchanged by asking for it. Where the kernel's fp32 prologue and the twin's round to
    different bf16 values, the amax stays within the prologue's error model. Resampled, the
    twin's amax is exactly torch's of its resampled norm output, and the kernel's within
    what :func:`operands_range` allows the operands (the kernel rounds the fp32 average of
    four once, the twin each value and then their average: they may differ by an ulp)."""
    t = make(case, BF16)
    q = quantized_of(t)
    plain = _amax_run(t, q, None)
    got = torch.zeros(2, device=DEVICE)
    out = _amax_run(t, q, got)
    for x, y in zip(out, plain):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    ya, yd = twin_norm(t)
    want = torch.stack([ya.abs().amax().float(), yd.abs().amax().float()])
    twin = torch.zeros(2, device=DEVICE)
    pair_conv2d_torch(t["a"], t["d"], t["s"], t["weight"], t["bias"], padding=t["padding"],
                      prologue=prologue_of(t), residual=t["residual"], quantized=q,
                      amax_out=twin, resample=t["resample"])
    assert torch.equal(twin, want)
    assert got.dtype == torch.float32
    if t["resample"] is None:
        assert torch.equal(got, want), (got, want)
        return
    for i, branch in enumerate("ad"):
        least, most = _magnitude_range(*operands_range(t, branch, BF16))
        assert least <= got[i] <= most, (branch, got[i], least, most)


def test_e4m3_amax_over_ragged_tiles_counts_each_input_once(monkeypatch):
    """Tiles ragged in pixels, input and output channels (the masked lanes and the padding
    hold zeros, which a max of magnitudes ignores), several output-channel programs reading
    the same inputs; the amax is raised, never lowered, from what amax_out held."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 32, 4, 2))
    monkeypatch.setitem(CASES, "blocks", (3, 40, 20, 5, 5, 7, True, True, True, True, True,
                                          2.0 ** 10))
    t = make("blocks", BF16)
    q = quantized_of(t)
    ya, yd = twin_norm(t)
    want = torch.stack([ya.abs().amax().float(), yd.abs().amax().float()])
    got = torch.zeros(2, device=DEVICE)
    _amax_run(t, q, got)
    assert torch.equal(got, want), (got, want)
    high = torch.tensor([float(want[0]) * 2, 0.0], device=DEVICE)
    _amax_run(t, q, high)
    assert torch.equal(high, torch.stack([want[0] * 2, want[1]]))


def test_e4m3_amax_counts_nan_as_inf():
    """Non-finite inputs raise the amax to inf (NaN too: an atomic max of fp32 bit patterns
    has no order for NaN), which DelayedScaling.record keeps as 0, as scale() does."""
    t = make("3x3_plain", BF16)
    q = quantized_of(t)
    t["a"] = t["a"].clone()
    t["d"] = t["d"].clone()
    t["a"][0, 1, 2, 3] = float("nan")
    t["d"][1, 0, 4, 0] = -float("inf")
    got = torch.zeros(2, device=DEVICE)
    _amax_run(t, q, got)
    assert torch.equal(got, torch.full((2,), float("inf"), device=DEVICE))


def test_e4m3_amax_refusals():
    t = make("3x3_film_xbias_residual", BF16)
    q = quantized_of(t)
    with pytest.raises(ValueError, match="amax_out.*needs quantized"):
        _amax_run(t, None, torch.zeros(2, device=DEVICE))
    for bad in (torch.zeros(3, device=DEVICE), torch.zeros(2, dtype=F64, device=DEVICE),
                torch.zeros(4, device=DEVICE)[::2]):
        with pytest.raises(ValueError, match="amax_out must be"):
            _amax_run(t, q, bad)


def _magnitude_range(lo, hi):
    """The least and the greatest max |x| over x elementwise in [lo, hi]."""
    least = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo),
                        torch.minimum(lo.abs(), hi.abs()))
    return least.amax().float(), torch.maximum(lo.abs(), hi.abs()).amax().float()


def test_e4m3_resampled_amax_over_ragged_tiles(monkeypatch):
    """Down from 10x14 to 35 pixels in tiles of 16, 40 input channels in steps of 32 and 20
    output channels in tiles of 16 (a 1x1: the amax is taken at the centre tap), the amax
    raised from 0 and never lowered from above; the outputs within the bound of the twin's."""
    monkeypatch.setattr(pc, "_conv_launch", lambda *args: _ConvLaunch(16, 16, 32, 4, 2))
    monkeypatch.setitem(RS_CASES, "blocks", ("down", 1, 40, 20, 5, 10, 14, True, True, True,
                                             True, True, 2.0 ** 10))
    t, q, _, _ = check_quantized_case("blocks")
    got = torch.zeros(2, device=DEVICE)
    _amax_run(t, q, got)
    for i, branch in enumerate("ad"):
        least, most = _magnitude_range(*operands_range(t, branch, BF16))
        assert least <= got[i] <= most, (branch, got[i], least, most)
    high = torch.tensor([float(got[0]) * 2, 0.0], device=DEVICE)
    _amax_run(t, q, high)
    assert torch.equal(high, torch.stack([got[0] * 2, got[1]]))
