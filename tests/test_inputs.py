"""Every bad input of DESIGN.md section 3 raises a clear error, and the loss survives it."""
import pytest
import torch

import diffloss_fast as dl


@pytest.fixture(scope="module")
def loss_fn(tiny_unet):
    return dl.DiffLoss(tiny_unet, precision="fp32")


def images(shape=(2, 3, 32, 32), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=gen).to(dtype), torch.rand(shape, generator=gen).to(dtype)


def nan_at(x, value):
    x = x.clone()
    x[0, 0, 0, 0] = value
    return x


@pytest.mark.parametrize("case, error, words", [
    (lambda r, g: (r[0], g[0]), ValueError, ["restored", "ndim 3"]),
    (lambda r, g: (r[:, :1], g[:, :1]), ValueError, ["restored", "3 channels", "got 1"]),
    (lambda r, g: (r, g[:1]), ValueError, ["batch", "2 and 1"]),
    (lambda r, g: (r, g[..., :16]), ValueError, ["same shape"]),
    (lambda r, g: (r[..., :30], g[..., :30]), ValueError, ["multiples of 4", "32x30"]),
    (lambda r, g: (nan_at(r, float("nan")), g), ValueError, ["restored", "NaN", "check_finite"]),
    (lambda r, g: (r, nan_at(g, float("inf"))), ValueError, ["gt", "Inf"]),
    (lambda r, g: (r * 255, g), ValueError, ["restored", "[0", "255", "input_range=(0, 1)",
                                            "divide them by 255", "check_range=False"]),
    (lambda r, g: (r, g * 2 - 1), ValueError, ["gt", "input_range=(0, 1)",
                                               "input_range=(-1, 1)"]),
    (lambda r, g: ((r * 255).to(torch.uint8), g), TypeError, ["restored", "floating-point", "uint8"]),
    (lambda r, g: (r.numpy(), g), TypeError, ["restored", "torch.Tensor"]),
])
def test_bad_images(loss_fn, case, error, words):
    restored, gt = case(*images())
    with pytest.raises(error) as info:
        loss_fn(restored, gt)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("t, error, words", [
    (torch.tensor([0, 1000]), ValueError, ["t must lie in [0, 1000)", "1000"]),
    (torch.tensor([-1, 3]), ValueError, ["[0, 1000)", "-1"]),
    (torch.tensor([1, 2, 3]), ValueError, ["t must have shape (2,)", "(3,)"]),
    (torch.tensor([[1, 2]]), ValueError, ["shape (2,)"]),
    (torch.tensor([1.0, 2.0]), TypeError, ["integer", "float32"]),
])
def test_bad_timesteps(loss_fn, t, error, words):
    with pytest.raises(error) as info:
        loss_fn(*images(), t=t)
    for word in words:
        assert word in str(info.value)


def test_bad_noise(loss_fn):
    with pytest.raises(ValueError, match=r"noise must have restored's shape \(2, 3, 32, 32\)"):
        loss_fn(*images(), noise=torch.randn(2, 3, 32, 16))
    with pytest.raises(ValueError, match="noise contains NaN"):
        loss_fn(*images(), noise=nan_at(torch.randn(2, 3, 32, 32), float("nan")))


def test_check_finite_can_be_turned_off(tiny_unet):
    restored, gt = images()
    loss = dl.DiffLoss(tiny_unet, precision="fp32", check_finite=False)(
        nan_at(restored, float("nan")), gt)
    assert torch.isnan(loss)


def test_slightly_out_of_range_outputs_pass(tiny_unet):
    """A network's output overshoots its target range a little; only a wrong range is refused:
    the bounds are half the range's width beyond it, for either range."""
    restored, gt = images()
    for low, high in ((0.0, 1.0), (-1.0, 1.0)):
        loss_fn = dl.DiffLoss(tiny_unet, precision="fp32", input_range=(low, high))
        width = high - low
        r, g = low + width * restored, low + width * gt
        over = r.clone()
        over[0, 0, 0, 0], over[1, 2, 5, 5] = low - 0.49 * width, high + 0.49 * width
        assert torch.isfinite(loss_fn(over, g))
        over[1, 2, 5, 5] = high + 0.51 * width
        with pytest.raises(ValueError, match="far outside"):
            loss_fn(over, g)


def test_range_check_can_be_turned_off(tiny_unet):
    restored, gt = images()
    loss_fn = dl.DiffLoss(tiny_unet, precision="fp32", check_range=False)
    assert torch.isfinite(loss_fn(restored * 255, gt * 255))
    with pytest.raises(ValueError, match="NaN"):  # the finite check stays on
        loss_fn(nan_at(restored, float("nan")), gt)


@pytest.mark.parametrize("kwargs, words", [
    (dict(target="x0"), ["target", "'x0'"]),
    (dict(natural_weight=-1.0), ["natural_weight", ">= 0", "-1.0"]),
    (dict(semantic_weight=-0.5), ["semantic_weight", "-0.5"]),
    (dict(precision="fp4"), ["precision", "'fp4'"]),
    (dict(backend="cuda-magic"), ["backend", "'cuda-magic'"]),
    (dict(input_range=(1.0, 0.0)), ["input_range", "high > low"]),
    (dict(compile="fastest"), ["compile", "'fastest'", "regional"]),
])
def test_bad_options(tiny_unet, kwargs, words):
    for cls in (dl.DiffLoss, dl.ReferenceDiffLoss):
        with pytest.raises(ValueError) as info:
            cls(tiny_unet, **kwargs)
        for word in words:
            assert word in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(attention="flash3"), ["attention", "'flash3'"]),
    (dict(execution="fastest"), ["execution", "'fastest'", "graphed"]),
    (dict(execution="eager", cuda_graph=True), ["disagree", "execution="]),
    (dict(execution="graphed", compile="regional"), ["disagree"]),
    (dict(compile=True, cuda_graph=True), ["not combined"]),
    (dict(execution="graphed", checkpoint=True), ["not combined with checkpoint"]),
])
def test_bad_fast_path_options(tiny_unet, kwargs, words):
    with pytest.raises(ValueError) as info:
        dl.DiffLoss(tiny_unet, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("option", ["execution", "fused_kernels", "fused_norm", "cuda_graph",
                                    "channels_last", "attention", "checkpoint"])
def test_reference_refuses_what_only_steers_the_fast_path(tiny_unet, option):
    """It runs upstream's UNet as it is: an option it would ignore is an error, not a no-op."""
    with pytest.raises(TypeError, match=option):
        dl.ReferenceDiffLoss(tiny_unet, **{option: "auto"})


@pytest.mark.parametrize("kwargs, execution", [
    (dict(), "auto"), (dict(cuda_graph=True), "graphed"), (dict(cuda_graph=False), "eager"),
    (dict(cuda_graph="auto"), "auto"), (dict(compile=True), "compiled"),
    (dict(compile="max-autotune"), "compiled"), (dict(compile="regional"), "regional"),
    (dict(execution="regional", compile="regional"), "regional"),
])
def test_older_spellings_map_onto_execution(tiny_unet, kwargs, execution):
    assert dl.DiffLoss(tiny_unet, **kwargs).execution == execution


def test_prior_must_be_a_unet():
    with pytest.raises(TypeError, match="UNetModel"):
        dl.DiffLoss(torch.nn.Linear(2, 2))


def test_inputs_are_not_modified_and_loss_survives_errors(loss_fn):
    restored, gt = images()
    restored.requires_grad_(True)
    noise, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 600])
    before = [v.detach().clone() for v in (restored, gt, noise, t)]
    first = loss_fn(restored, gt, t=t, noise=noise)
    with pytest.raises(ValueError):
        loss_fn(restored, gt[:1])
    with pytest.raises(ValueError):
        loss_fn(restored, gt, t=torch.tensor([0, 5000]))
    second = loss_fn(restored, gt, t=t, noise=noise)
    second.backward()
    for old, new in zip(before, (restored, gt, noise, t)):
        assert torch.equal(old, new.detach())
    assert torch.equal(first.detach(), second.detach())
    assert gt.grad is None and noise.grad is None


def test_prior_device_mismatch_is_explained(tiny_unet):
    """The reference runs the prior itself, so it must be on the images' device; DiffLoss
    copies it to the images' device, and only refuses a prior without weights."""
    import copy
    meta = copy.deepcopy(tiny_unet).to("meta")
    ref = dl.ReferenceDiffLoss(meta)
    with pytest.raises(ValueError, match=r"restored is on cpu but the prior is on meta.*\.to\(device\)"):
        ref(*images())
    with pytest.raises(ValueError, match=r"meta device \(it has no weights\)"):
        dl.DiffLoss(meta, precision="fp32")(*images())
