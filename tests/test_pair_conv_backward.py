"""The pair convolution's input gradient with the norm's partial sums in the dgrad's epilogue,
against float64 autograd of the plain ops and against the unfused norm backward.

The float64 reference differentiates ``conv2d(group_norm_silu_torch(r))`` at the stored r.
Normwise bounds from an error model: dy rounded to the storage dtype and dx rounded again (two
half-ulps, ``u``, each, doubled for what the norm's projection may gather); the fp32 sum of
K = Cout * kh * kw products in the dgrad, whose normwise error grows as sqrt(K) half-ulps of
fp32 (a probabilistic bound, 4 standard deviations); and ``C_NORM`` fp32 roundings of the
norm's backward and of its statistics. On the CPU the kernels run under TRITON_INTERPRET=1
(conftest.py): shapes stay tiny.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from diffloss_fast.ops import pair_conv_backward as pcb
from diffloss_fast.ops._conv_common import _ConvLaunch
from diffloss_fast.ops.group_norm_silu import _backward as gn_backward
from diffloss_fast.ops.group_norm_silu import _launch as gn_launch
from diffloss_fast.ops.group_norm_silu import group_norm_silu_torch
from diffloss_fast.ops.pair_conv_backward import SavedNorm, pair_conv_input_gradient

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
U32 = 2.0 ** -24
C_NORM = 32
EPS = 1e-5

# name -> (N, kernel, Cin, Cout, groups (None: no norm), H, W, film, x_bias, silu)
CASES = {
    "3x3_film_xbias_silu": (2, 3, 24, 16, 3, 5, 7, True, True, True),
    "3x3_silu_2_per_group": (2, 3, 16, 24, 8, 8, 8, False, False, True),
    "1x1_xbias_no_silu": (2, 1, 32, 16, 4, 5, 7, False, True, False),
    "1x1_film_no_silu": (2, 1, 16, 32, 2, 8, 8, True, False, False),
    "3x3_plain": (2, 3, 24, 16, None, 5, 7, False, False, False),
    "1x1_plain": (2, 1, 16, 24, None, 8, 8, False, False, False),
}
# tiles of 16: 35 pixels in 3 tiles (the last ragged), 24 input channels in 2 tiles with a
# 12-channel group across them, 20 output channels in 2 reduction steps
SMALL = _ConvLaunch(16, 16, 16, 4, 2)
CASES["tiles_film_xbias_silu"] = (2, 3, 24, 20, 2, 5, 7, True, True, True)
CASES["tiles_plain"] = (2, 3, 24, 20, None, 5, 7, False, False, False)
# 66 pixel tiles: more partials than the group kernel folds in one step (64)
CASES["many_tiles"] = (1, 1, 16, 16, 4, 32, 33, False, True, True)


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def make(case, dtype, seed=0):
    """r around 0.5, the output's gradient and the parameters, stored in ``dtype``; the
    statistics of r + x_bias in float64, kept in fp32 as the forward keeps them."""
    n, k, cin, cout, groups, h, w, film, xb, silu = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0, shift=0.0: (  # noqa: E731
        torch.randn(*shape, generator=gen, dtype=F64) * scale + shift).to(dtype).to(DEVICE)
    cl = torch.channels_last
    t = dict(weight=rand(cout, cin, k, k, scale=(cout * k * k) ** -0.5),
             grad=rand(n, cout, h, w).contiguous(memory_format=cl), cin=cin, norm=None)
    if groups is None:
        t["r"] = rand(n, cin, h, w).contiguous(memory_format=cl)
        return t
    r = rand(n, cin, h, w, shift=0.5).contiguous(memory_format=cl)
    gw, gb = rand(cin, scale=0.3, shift=1.0), rand(cin, scale=0.3)
    sc, sh = (rand(n, cin, scale=0.5), rand(n, cin, scale=0.5)) if film else (gw, gw)
    x_bias = rand(cin, scale=0.5) if xb else gw
    x = r.double() + (x_bias.double().reshape(1, -1, 1, 1) if xb else 0)
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(-1).reshape(-1).float()
    rstd = (grouped.var(-1, unbiased=False) + EPS).rsqrt().reshape(-1).float()
    t["r"] = r
    t["norm"] = SavedNorm(r, mean, rstd, gw, gb, sc, sh, x_bias, groups, film, xb, silu)
    return t


def reference(t):
    """float64 gradient with respect to r of conv2d(norm(r)) for the output gradient."""
    w = t["weight"].double()
    r = t["r"].double().requires_grad_(True)
    y = r
    p = t["norm"]
    if p is not None:
        d = lambda v: v.double()  # noqa: E731
        y = group_norm_silu_torch(r, p.num_groups, d(p.weight), d(p.bias), EPS,
                                  d(p.scale) if p.film else None,
                                  d(p.shift) if p.film else None,
                                  d(p.x_bias) if p.has_xb else None, silu=p.silu)
    out = F.conv2d(y, w, padding=w.shape[-1] // 2)
    (g,) = torch.autograd.grad(out, r, t["grad"].double())
    return g


def bound(t, dtype):
    """Normwise relative bound of dx (see the module docstring)."""
    K = t["weight"].shape[0] * t["weight"][0, 0].numel()
    return 4 * unit_roundoff(dtype) + (4 * math.sqrt(K) + C_NORM) * U32


def cosine(x, y):
    return F.cosine_similarity(x.double().flatten(), y.double().flatten(), dim=0).item()


@pytest.fixture(autouse=True)
def _ieee_fp32(true_fp32):
    """fp32 products in IEEE fp32: the kernel follows cuDNN's TF32 switch."""


def small_tiles(monkeypatch, case):
    if case.startswith(("tiles", "many")):
        monkeypatch.setattr(pcb, "_conv_launch", lambda *args: SMALL)


def check_float64(case, dtype):
    t = make(case, dtype)
    dx = pair_conv_input_gradient(t["grad"], t["weight"], t["cin"], t["norm"])
    assert dx.dtype == dtype and dx.shape == t["r"].shape
    assert dx.is_contiguous(memory_format=torch.channels_last)
    want = reference(t)
    rel = ((dx.double() - want).norm() / want.norm()).item()
    allowed = bound(t, dtype)
    assert rel <= allowed, f"relative error {rel:.3g} > {allowed:.3g}"
    assert cosine(dx, want) >= 1 - allowed ** 2 / 2
    return rel


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("tiles", "many"))])
def test_matches_float64(case, dtype):
    """3x3 and 1x1, with and without FiLM, x_bias and the SiLU, 2 to 8 channels a group,
    odd maps (5x7) and no norm at all (the plain dgrad)."""
    check_float64(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["tiles_film_xbias_silu", "tiles_plain"])
def test_several_tiles_in_every_dim(monkeypatch, case, dtype):
    """Ragged tiles of 16 pixels, input and output channels, a group across two channel
    tiles; the weight in another layout (channels_last), read through its strides."""
    small_tiles(monkeypatch, case)
    t = make(case, dtype)
    t["weight"] = t["weight"].contiguous(memory_format=torch.channels_last)
    dx = pair_conv_input_gradient(t["grad"], t["weight"], t["cin"], t["norm"])
    want = reference(t)
    rel = ((dx.double() - want).norm() / want.norm()).item()
    assert rel <= bound(t, dtype), f"relative error {rel:.3g} > {bound(t, dtype):.3g}"


def stored_partials(t, dy, block_m):
    """float64 sums, per (sample, pixel tile, channel), of dxhat and dxhat * xhat from the
    stored dy and r, and the sums of their magnitudes."""
    p = t["norm"]
    n, c, h, w = dy.shape
    d = lambda v: v.double()  # noqa: E731
    per_channel = lambda v: d(v).reshape(n, p.num_groups, 1).expand(  # noqa: E731
        n, p.num_groups, c // p.num_groups).reshape(n, c, 1, 1)
    mean, rstd = per_channel(p.mean_r), per_channel(p.rstd_r)
    gain = 1 + d(p.scale).reshape(n, c, 1, 1) if p.film else 1
    wg = d(p.weight).reshape(1, c, 1, 1) * gain
    centre = mean - (d(p.x_bias).reshape(1, c, 1, 1) if p.has_xb else 0)
    xhat = (d(t["r"]) - centre) * rstd
    du = d(dy)
    if p.silu:
        u = xhat * wg + d(p.bias).reshape(1, c, 1, 1) * gain + \
            (d(p.shift).reshape(n, c, 1, 1) if p.film else 0)
        sig = torch.sigmoid(u)
        du = du * sig * (1 + u * (1 - sig))
    dxhat = du * wg
    split = -(-h * w // block_m)

    def tiles(v):  # (n, c, h, w) -> (n, split, c): sums over each tile of pixels
        v = F.pad(v.reshape(n, c, h * w), (0, split * block_m - h * w))
        return v.reshape(n, c, split, block_m).sum(-1).transpose(1, 2)

    terms = (dxhat, dxhat * xhat)
    return [tiles(v) for v in terms], [tiles(v.abs()) for v in terms]


@pytest.mark.parametrize("case,dtype", [
    (case, dtype) for case in ("3x3_film_xbias_silu", "1x1_xbias_no_silu",
                               "tiles_film_xbias_silu") for dtype in DTYPES]
    + [("many_tiles", "fp32")])
def test_partials_are_the_stored_dys(monkeypatch, case, dtype):
    """The epilogue's partial sums are those of dy as stored (rounded to the storage dtype),
    to the fp32 roundings of a tile's sum; and dx is the unfused backward's of the same dy:
    its stats pass sums the same terms in another order."""
    dtype = DTYPES[dtype]
    small_tiles(monkeypatch, case)
    t = make(case, dtype)
    p = t["norm"]
    dy, part = pcb._dgrad(t["grad"], t["weight"], t["cin"], p)
    n, c, h, w = dy.shape
    block_m = pcb._conv_launch(h * w, t["weight"].shape[0], c, dy.element_size(), False,
                               dtype == torch.float32).block_m
    assert part.shape == (n, -(-h * w // block_m), 2, c)
    sums, mags = stored_partials(t, dy, block_m)
    for i in range(2):
        err = (part[:, :, i].double() - sums[i]).abs()
        tol = (block_m + 16) * U32 * mags[i] + 1e-30
        ratio = (err / tol).max().item()
        assert ratio <= 1, f"partials {i}: error {ratio:.3g} times its bound"

    fused = pair_conv_input_gradient(t["grad"], t["weight"], t["cin"], p)
    unfused = gn_backward(p.r, dy, None, p.mean_r, p.rstd_r, p.weight, p.bias, p.scale,
                          p.shift, p.x_bias, p.num_groups, p.film, p.has_xb, p.silu,
                          gn_launch(n, p.num_groups, h * w, c))
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)): each path's group sums
    # (of count terms, in any order) are off by up to count half-ulps of fp32 of their sums of
    # magnitudes, the means by that over count; the fp32 dx then rounded to the storage dtype
    # (one ulp apart at most for fp32 values this close)
    G = p.num_groups
    group_sum = lambda v: v.sum(1).reshape(n, G, -1).sum(-1, keepdim=True)  # noqa: E731
    spread = lambda v: v.expand(n, G, c // G).reshape(n, c, 1, 1)  # noqa: E731
    rstd = spread(p.rstd_r.double().reshape(n, G, 1))
    centre = spread(p.mean_r.double().reshape(n, G, 1)) \
        - (p.x_bias.double().reshape(1, c, 1, 1) if p.has_xb else 0)
    xhat = (t["r"].double() - centre).abs() * rstd
    mean_err = 2 * U32 * (spread(group_sum(mags[0])) + xhat * spread(group_sum(mags[1])))
    tol = rstd * mean_err + 4 * unit_roundoff(dtype) * unfused.double().abs() + 1e-30
    ratio = ((fused.double() - unfused.double()).abs() / tol).max().item()
    assert ratio <= 1, f"fused vs unfused dx: error {ratio:.3g} times its bound"
    if case == "many_tiles":
        check_float64(case, dtype)


def test_empty_map_gives_an_empty_gradient():
    t = make("3x3_film_xbias_silu", torch.float32)
    grad = t["grad"][:, :, :0]
    p = t["norm"]._replace(r=t["r"][:, :, :0])
    dx = pair_conv_input_gradient(grad, t["weight"], t["cin"], p)
    assert dx.shape == (2, 24, 0, 7)
