"""The fast path on a real GPU: run by benchmarks/device_check.sh; skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

import diffloss_fast as dl

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def batch(shape, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda: torch.rand(shape, device="cuda", generator=gen)  # noqa: E731
    t = torch.tensor([0, 999] + [500] * (shape[0] - 2), device="cuda")[: shape[0]]
    return rand(), rand(), t, torch.randn(shape, device="cuda", generator=gen)


def loss_and_grad(loss_fn, x, y, t, noise):
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x, y, t=t, noise=noise)
    loss.backward()
    return loss.detach().float(), x.grad.float()


@pytest.fixture(scope="module")
def prior(tiny_unet):
    return tiny_unet.cuda()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("target", ["eps", "x_prev"])
@pytest.mark.parametrize("fused_norm", [False, True], ids=["eager_norm", "fused_norm"])
def test_cuda_fast_matches_reference(prior, precision, target, fused_norm, true_fp32):
    kw = dict(natural_weight=1.0, semantic_weight=0.1, target=target)
    x, y, t, noise = batch((4, 3, 32, 64))
    ref, ref_grad = loss_and_grad(dl.ReferenceDiffLoss(prior, **kw), x, y, t, noise)
    fast = dl.DiffLoss(prior, precision=precision, fused_norm=fused_norm, **kw)
    got, grad = loss_and_grad(fast, x, y, t, noise)
    tol = 1e-4 if precision == "fp32" else 5e-2
    assert abs(float(got - ref)) / float(ref) < tol
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_cuda_backends_match_torch(prior, backend):
    if backend == "native":
        from diffloss_fast.ops.native import native_available
        if not native_available():
            pytest.skip("the native extension did not build here")
    x, y, t, noise = batch((2, 3, 32, 32), seed=1)
    kw = dict(natural_weight=1.0, semantic_weight=0.5, target="x_prev", precision="bf16")
    want, want_grad = loss_and_grad(dl.DiffLoss(prior, backend="torch", **kw), x, y, t, noise)
    got, grad = loss_and_grad(dl.DiffLoss(prior, backend=backend, **kw), x, y, t, noise)
    assert abs(float(got - want)) / float(want) < 1e-3
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-2


def test_cuda_compiled_matches_eager(prior):
    x, y, t, noise = batch((2, 3, 32, 32), seed=2)
    eager, eager_grad = loss_and_grad(dl.DiffLoss(prior, precision="bf16"), x, y, t, noise)
    comp, comp_grad = loss_and_grad(dl.DiffLoss(prior, precision="bf16", compile=True),
                                    x, y, t, noise)
    assert abs(float(comp - eager)) / float(eager) < 2e-2
    assert F.cosine_similarity(comp_grad.flatten(), eager_grad.flatten(), dim=0) > 0.99


def test_cuda_prior_left_on_the_cpu():
    """A prior kept on the CPU: the truncated bf16 copy is built on the GPU, the fp32 weights
    never go there, and the loss is the one the prior on the GPU gives."""
    from random_unets import randomized_unet
    cpu_prior = randomized_unet()
    x, y, t, noise = batch((2, 3, 32, 32), seed=3)
    kw = dict(natural_weight=1.0, semantic_weight=0.5, precision="bf16", backend="torch")
    lean = dl.DiffLoss(cpu_prior, **kw)
    got, grad = loss_and_grad(lean, x, y, t, noise)
    assert all(p.device.type == "cpu" for p in cpu_prior.parameters())
    net_params = [p for net in lean._nets.values() for p in net.parameters()]
    assert net_params and all(p.is_cuda for p in net_params)
    want, want_grad = loss_and_grad(dl.DiffLoss(randomized_unet().cuda(), **kw), x, y, t, noise)
    assert abs(float(got - want)) / float(want) < 1e-3
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-3
