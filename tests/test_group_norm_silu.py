"""The fused GroupNorm (+ FiLM) + SiLU kernels against their plain-PyTorch twin.

The kernels read channels_last tensors; every other layout is also checked, through the copies
the wrapper makes. On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py), so
shapes stay small.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from diffloss_fast.ops.group_norm_silu import group_norm_silu_torch, group_norm_silu_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (N, C, H, W, groups): 2 channels a group; 3 (not a power of two); 1; a 1x1 map; 1600
# positions with 2 channels a group, so one group is split over several programs.
SHAPES = [(2, 8, 5, 7, 4), (2, 24, 6, 6, 8), (3, 6, 4, 4, 6), (2, 16, 1, 1, 4),
          (1, 4, 40, 40, 2)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def layout(t, name):
    if name == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # every other column of a wider tensor: H and W do not flatten
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def inputs(shape, dtype, film, x_layout="nchw"):
    N, C, H, W, G = shape
    x = layout((torch.randn(N, C, H, W, device=DEVICE) * 1.5 + 0.5).to(dtype), x_layout)
    weight = (torch.randn(C, device=DEVICE) + 1).to(dtype)
    bias = torch.randn(C, device=DEVICE).to(dtype)
    scale = shift = None
    if film:  # as the prior makes them: halves of one (N, 2C, 1, 1) embedding projection
        scale, shift = (torch.randn(N, 2 * C, 1, 1, device=DEVICE) * 0.5).to(dtype).chunk(2, 1)
    return x, G, weight, bias, scale, shift


def run(fn, x, G, weight, bias, scale, shift, dy, x_bias=None):
    x = x.detach().requires_grad_(True)
    y = fn(x, G, weight, bias, 1e-5, scale, shift, x_bias)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("film", [False, True], ids=["plain", "film"])
@pytest.mark.parametrize("x_layout", ["nchw", "cl", "strided"])
def test_fp32_matches_twin(shape, film, x_layout):
    x, G, w, b, sc, sh = inputs(shape, torch.float32, film, x_layout)
    dy = torch.randn(x.shape, device=DEVICE)
    y, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy)
    y_ref, dx_ref = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())
    if x_layout != "strided":  # the output keeps the input's memory format
        assert y.stride() == x.stride()


@pytest.mark.parametrize("shape, x_layout", [
    *((shape, x_layout) for shape in (SHAPES[0], SHAPES[4])
      for x_layout in ("nchw", "cl", "strided")),
    ((1, 64, 56, 80, 8), "cl")], ids=str)
def test_x_bias_matches_twin(shape, x_layout):
    """A preceding convolution's bias, added to x inside the kernels (every statistic, output
    and gradient is of x + x_bias), against the twin that adds it first; a sample's pixels
    split over several programs."""
    x, G, w, b, sc, sh = inputs(shape, torch.float32, True, x_layout)
    x_bias = torch.randn(shape[1], device=DEVICE) * 2
    dy = torch.randn(x.shape, device=DEVICE)
    y, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy, x_bias)
    y_ref, dx_ref = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy, x_bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())
    y_plain = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy)[0]
    assert (y_plain - y_ref).abs().max() > 0.1  # the bias is not a no-op on these inputs


@pytest.mark.parametrize("dy_layout", ["cl", "strided"])
def test_gradient_in_another_layout(dy_layout):
    x, G, w, b, sc, sh = inputs(SHAPES[1], torch.float32, True)
    dy = layout(torch.randn(x.shape, device=DEVICE), dy_layout)
    _, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy)
    _, dx_ref = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy.contiguous())
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())
    assert dx.stride() == x.stride()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("film", [False, True], ids=["plain", "film"])
def test_half_precision_against_fp64(dtype, film):
    """Half types: the fused op rounds once, the twin after every op; both are compared with
    the fp64 twin, and the fused one must be at least about as close."""
    shape = SHAPES[1]
    x, G, w, b, sc, sh = inputs(shape, DTYPES[dtype], film, "cl")
    dy = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    y, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy)
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    y64, dx64 = run(group_norm_silu_torch, x.double(), G, w.double(), b.double(), wide(sc),
                    wide(sh), dy.double())
    y_tw, dx_tw = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy)
    rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    x_bias = torch.randn(x.shape[1], device=DEVICE).to(x.dtype)
    y_xb, dx_xb = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy, x_bias)
    y64_xb, dx64_xb = run(group_norm_silu_torch, x.double(), G, w.double(), b.double(),
                          wide(sc), wide(sh), dy.double(), x_bias.double())
    assert rel(y_xb, y64_xb) < 1e-2 and rel(dx_xb, dx64_xb) < 2e-2
    assert y.dtype == dx.dtype == x.dtype
    assert rel(y, y64) < 1e-2 and rel(dx, dx64) < 2e-2
    assert rel(y, y64) <= 1.5 * rel(y_tw, y64) + 1e-4
    assert F.cosine_similarity(dx.double().flatten(), dx64.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("x_layout", ["nchw", "cl"])
def test_variance_when_the_mean_dwarfs_the_spread(x_layout):
    """|mean| = 1e4 * std: a naive E[x^2] - E[x]^2 in fp32 loses the variance entirely."""
    N, C, H, W, G = 2, 8, 6, 6, 2
    x = layout(torch.randn(N, C, H, W, device=DEVICE) * 1e-1 + 1e3, x_layout)
    w, b = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    y = group_norm_silu_triton(x, G, w, b, 1e-5)
    y64 = group_norm_silu_torch(x.double(), G, w.double(), b.double(), 1e-5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-3, atol=1e-3)
    # The same offset carried by a preceding convolution's bias instead of by x.
    x_bias = torch.full((C,), 1e3, device=DEVICE) + torch.arange(C, device=DEVICE) * 1e-2
    y = group_norm_silu_triton(x - 1e3, G, w, b, 1e-5, x_bias=x_bias)
    y64 = group_norm_silu_torch((x - 1e3).double(), G, w.double(), b.double(), 1e-5,
                                x_bias=x_bias.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-3, atol=1e-3)


def test_channels_last_sample_split_over_many_programs():
    """channels_last reads pixel rows: 4480 positions of 64 channels split over 70 programs
    per sample, more partial sums than the group kernel folds in one step."""
    x, G, w, b, sc, sh = inputs((1, 64, 56, 80, 8), torch.float32, True, "cl")
    dy = torch.randn(x.shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy)
    y_ref, dx_ref = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())
    assert y.stride() == dx.stride() == x.stride()


def test_launch_shape_follows_the_problem_size():
    """Tile, split and warps come from the shape alone: ADM-256's first level, its middle
    block, and a sample split over more programs than the group kernel folds in one step."""
    from diffloss_fast.ops.group_norm_silu import _launch
    assert _launch(8, 32, 256 * 256, 256) == (16, 256, 8, 64, 128, 512, 8)
    assert _launch(8, 32, 8 * 8, 1024) == (4, 1024, 32, 16, 16, 4, 8)
    assert _launch(1, 8, 56 * 80, 64) == (64, 64, 8, 64, 70, 64, 8)
    assert _launch(2, 2, 1, 4) == (2, 4, 2, 2, 1, 2, 4)  # every block dim at least 2


@pytest.fixture
def small_launches(monkeypatch):
    """Smaller tiles and fewer programs than a GPU launch gets: what only prior-sized tensors
    reach there (several tiles a program, a last program with fewer) at interpreter sizes."""
    from diffloss_fast.ops import group_norm_silu as gns

    def use(tile, programs):
        monkeypatch.setattr(gns, "_TILE", tile)
        monkeypatch.setattr(gns, "_PROGRAMS", programs)
        gns._launch.cache_clear()

    yield use
    gns._launch.cache_clear()  # shapes of the patched constants must not outlive the test


@pytest.mark.parametrize("tile, programs", [
    (256, 7),    # 4 pixels a tile, 4 programs a sample of 5 tiles each
    (1024, 3),   # 16 pixels a tile, 2 programs a sample: 3 tiles, then 1.5
    (8192, 1)])  # the whole sample in one program and one tile
def test_other_launch_shapes_compute_the_same_op(small_launches, tile, programs):
    small_launches(tile, programs)
    x, G, w, b, sc, sh = inputs((2, 64, 9, 8, 8), torch.float32, True, "cl")
    x_bias = torch.randn(64, device=DEVICE)
    dy = torch.randn(x.shape, device=DEVICE)
    y, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy, x_bias)
    y_ref, dx_ref = run(group_norm_silu_torch, x, G, w, b, sc, sh, dy, x_bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())


def test_rows_wider_than_a_tile_take_the_twin():
    """More channels than the kernels hold a row of: the twin's result, gradient included."""
    from diffloss_fast.ops.group_norm_silu import _MAX_CHANNELS
    C = 2 * _MAX_CHANNELS
    x = torch.randn(1, C, 1, 2, device=DEVICE).requires_grad_(True)
    w, b = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    y, passed = group_norm_silu_triton(x, 32, w, b, 1e-5, pass_x=True)
    torch.testing.assert_close(y, group_norm_silu_torch(x, 32, w, b, 1e-5), rtol=0, atol=0)
    assert passed is x


@pytest.mark.parametrize("x_layout", ["nchw", "cl"])
def test_without_silu_is_group_norm(x_layout):
    """silu=False: GroupNorm alone (an attention block's), against F.group_norm, gradient
    included; with x passed on, as the attention's residual sum takes it."""
    x, G, w, b, _, _ = inputs(SHAPES[4], torch.float32, False, x_layout)
    dy, dz = torch.randn(x.shape, device=DEVICE), torch.randn(x.shape, device=DEVICE)
    x_ref = x.detach().requires_grad_(True)
    y_ref = F.group_norm(x_ref, G, w, b, 1e-5)
    (dx_ref,) = torch.autograd.grad([y_ref, x_ref * 2], x_ref, [dy, dz])
    x_in = x.detach().requires_grad_(True)
    y, passed = group_norm_silu_triton(x_in, G, w, b, 1e-5, pass_x=True, silu=False)
    (dx,) = torch.autograd.grad([y, passed * 2], x_in, [dy, dz])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())
    twin = group_norm_silu_torch(x, G, w, b, 1e-5, silu=False)
    torch.testing.assert_close(twin, y_ref.detach(), rtol=0, atol=0)


class _Adds(TorchDispatchMode):
    """Counts the adds dispatched while active (autograd's accumulation of gradients is one)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("x_layout", ["nchw", "cl", "strided"])
def test_passed_on_input_gets_both_gradients(x_layout):
    """pass_x hands x on beside the norm (a ResBlock's skip path); the gradient that comes
    back that way is added by the kernel writing dx, and equals autograd's sum of both paths,
    which without pass_x is an add of its own. Each path alone is right too."""
    x, G, w, b, sc, sh = inputs(SHAPES[4], torch.float32, True, x_layout)
    x_bias = torch.randn(x.shape[1], device=DEVICE)
    dy, dz = torch.randn(x.shape, device=DEVICE), torch.randn(x.shape, device=DEVICE)

    def grad(fn, uses, pass_x):
        x_in = x.detach().requires_grad_(True)
        if pass_x:
            y, passed = fn(x_in, G, w, b, 1e-5, sc, sh, x_bias, pass_x=True)
            assert torch.equal(passed, x_in)
        else:
            y, passed = fn(x_in, G, w, b, 1e-5, sc, sh, x_bias), x_in
        paths = {"norm": [(y, dy)], "skip": [(passed * 3 - 1, dz)]}
        outs, grads = zip(*(paths["norm"] + paths["skip"] if uses == "both" else paths[uses]))
        with _Adds() as adds:
            (dx,) = torch.autograd.grad(outs, x_in, grads)
        return dx, adds.count

    for uses in ("both", "norm", "skip"):
        want, _ = grad(group_norm_silu_torch, uses, pass_x=False)
        got, adds = grad(group_norm_silu_triton, uses, pass_x=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        assert adds == 0, uses
    assert grad(group_norm_silu_triton, "both", pass_x=False)[1] == 1  # autograd's own add
    with torch.no_grad():
        y, passed = group_norm_silu_triton(x, G, w, b, 1e-5, sc, sh, x_bias, pass_x=True)
    torch.testing.assert_close(y, group_norm_silu_torch(x, G, w, b, 1e-5, sc, sh, x_bias),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(passed, x)


def test_without_autograd_saves_nothing_and_matches():
    x, G, w, b, sc, sh = inputs(SHAPES[0], torch.float32, True)
    with torch.no_grad():
        y = group_norm_silu_triton(x.requires_grad_(True), G, w, b, 1e-5, sc, sh, b)
    assert y.grad_fn is None
    torch.testing.assert_close(y, group_norm_silu_torch(x.detach(), G, w, b, 1e-5, sc, sh, b),
                               rtol=1e-5, atol=1e-5)


def test_default_affine():
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    torch.testing.assert_close(group_norm_silu_triton(x, 4, None, None, 1e-5),
                               F.silu(F.group_norm(x, 4, eps=1e-5)), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x, G, w, b, sc, sh = inputs(SHAPES[0], torch.float32, True)
    with pytest.raises(ValueError, match="groups"):
        group_norm_silu_triton(x, 3, w, b, 1e-5)
    with pytest.raises(ValueError, match="both scale and shift"):
        group_norm_silu_triton(x, G, w, b, 1e-5, sc, None)
    with pytest.raises(ValueError, match="x only"):
        group_norm_silu_triton(x, G, w.clone().requires_grad_(True), b, 1e-5)
    with pytest.raises(ValueError, match="x only"):
        group_norm_silu_triton(x, G, w, b, 1e-5, sc.clone().requires_grad_(True), sh)
    with pytest.raises(ValueError, match="torch twin"):
        group_norm_silu_triton(x.double(), G, w.double(), b.double(), 1e-5)
    with pytest.raises(ValueError, match="4-D"):
        group_norm_silu_triton(x[0], G, w, b, 1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        group_norm_silu_triton(x, G, w, b, 1e-5, x_bias=b[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="prior-sized tensors: CUDA only")
@pytest.mark.parametrize("x_layout", ["nchw", "cl"])
def test_prior_sized_on_cuda(x_layout):
    """ADM-256's shapes (a sample split over many programs, many tiles each) in bf16."""
    for shape in [(4, 256, 128, 128, 32), (4, 1024, 8, 8, 32), (4, 768, 32, 32, 32)]:
        x, G, w, b, sc, sh = inputs(shape, torch.bfloat16, True, x_layout)
        dy = torch.randn(x.shape, device=DEVICE).to(x.dtype)
        y, dx = run(group_norm_silu_triton, x, G, w, b, sc, sh, dy)
        wide = lambda t: t.double()  # noqa: E731
        y64, dx64 = run(group_norm_silu_torch, wide(x), G, wide(w), wide(b), wide(sc), wide(sh),
                        wide(dy))
        rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
        assert rel(y, y64) < 1e-2 and rel(dx, dx64) < 2e-2, shape
        assert y.stride() == x.stride() and dx.stride() == x.stride()
