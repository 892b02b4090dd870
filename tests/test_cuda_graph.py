"""DiffLoss(cuda_graph=True) against the same loss run eagerly; its options and refusals.

The replays run on CUDA only (skipped without it); the checks of the options run anywhere.
"""
import pytest
import torch
import torch.nn.functional as F

import diffloss_fast as dl

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def step(loss_fn, seed, shape=(3, 3, 32, 32)):
    """Loss and gradient for fresh random images, timesteps and noise."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(shape, device="cuda", generator=gen).requires_grad_(True)
    y = torch.rand(shape, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (shape[0],), device="cuda", generator=gen)
    noise = torch.randn(shape, device="cuda", generator=gen)
    loss = loss_fn(x, y, t=t, noise=noise)
    loss.backward()
    return loss.detach(), x.grad, dict(loss_fn.last_terms)


@needs_cuda
@pytest.mark.parametrize("fused_norm", [False, True], ids=["eager_norm", "fused_norm"])
@pytest.mark.parametrize("weights", [(1.0, 0.1), (0.0, 1.0)], ids=["both", "semantic"])
def test_replays_match_the_eager_step(tiny_unet, fused_norm, weights, true_fp32):
    """Several steps with different inputs: every replay computes that step's loss, not the
    captured one's. fp32, so the two must agree to rounding."""
    prior = tiny_unet.cuda()
    kw = dict(natural_weight=weights[0], semantic_weight=weights[1], precision="fp32",
              fused_norm=fused_norm)
    eager, graphed = dl.DiffLoss(prior, **kw), dl.DiffLoss(prior, cuda_graph=True, **kw)
    for seed in range(3):
        want, want_grad, want_terms = step(eager, seed)
        got, grad, terms = step(graphed, seed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        for name, value in want_terms.items():
            if value is None:
                assert terms[name] is None
            else:
                torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=0)
        assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5
    assert len(graphed._graphs) == 1  # one capture for one input shape


@needs_cuda
def test_half_precision_replay_matches_eager(tiny_unet):
    prior = tiny_unet.cuda()
    kw = dict(natural_weight=1.0, semantic_weight=0.1, precision="bf16", fused_norm=True)
    want, want_grad, _ = step(dl.DiffLoss(prior, **kw), 7)
    got, grad, _ = step(dl.DiffLoss(prior, cuda_graph=True, **kw), 7)
    assert abs(float(got - want)) / float(want) < 1e-2
    assert F.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) > 0.999


@needs_cuda
def test_a_backward_after_a_later_replay_is_refused(tiny_unet):
    """Its activations live in the graph's memory, which the later forward overwrote."""
    loss_fn = dl.DiffLoss(tiny_unet.cuda(), natural_weight=1.0, semantic_weight=0.1,
                          cuda_graph=True)
    x = torch.rand(2, 3, 32, 32, device="cuda", requires_grad=True)
    y = torch.rand(2, 3, 32, 32, device="cuda")
    first = loss_fn(x, y)
    second = loss_fn(x, y)
    with pytest.raises(RuntimeError, match="replayed by a later forward"):
        first.backward()
    second.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@needs_cuda
def test_without_autograd_replays_the_no_grad_graph(tiny_unet):
    prior = tiny_unet.cuda()
    kw = dict(natural_weight=1.0, semantic_weight=0.1, precision="fp32")
    x, y = torch.rand(2, 3, 32, 32, device="cuda"), torch.rand(2, 3, 32, 32, device="cuda")
    t, noise = torch.tensor([3, 900], device="cuda"), torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        want = dl.DiffLoss(prior, **kw)(x, y, t=t, noise=noise)
        got = dl.DiffLoss(prior, cuda_graph=True, **kw)(x, y, t=t, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_refused_off_cuda_and_with_compile_or_checkpointing(tiny_unet):
    with pytest.raises(ValueError, match="True or False"):
        dl.DiffLoss(tiny_unet, cuda_graph="yes")
    for other in (dict(compile=True), dict(checkpoint=True)):
        with pytest.raises(ValueError, match="not combined"):
            dl.DiffLoss(tiny_unet, cuda_graph=True, **other)
    if not CUDA:
        loss_fn = dl.DiffLoss(tiny_unet, cuda_graph=True)
        with pytest.raises(ValueError, match="needs a CUDA device"):
            loss_fn(torch.rand(1, 3, 32, 32, requires_grad=True), torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("fused_norm", [False, True], ids=["eager_norm", "fused_norm"])
@pytest.mark.parametrize("decoder", [True, False], ids=["both", "semantic"])
def test_prior_step_moves_nothing_from_the_host(decoder, fused_norm, monkeypatch):
    """What a CUDA graph cannot capture, looked for without a GPU: the prior's forward and
    backward run on the meta device, and no op may read a CPU tensor (a host-to-device copy,
    as guided-diffusion's timestep embedding made) or read a value back (``.item()``). With
    the fused kernels, their wrappers run in full and each launch is recorded, not run."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = []
    for kind in (JITFunction, InterpretedFunction):  # compiled, or under TRITON_INTERPRET=1
        monkeypatch.setattr(kind, "run",
                            lambda self, *args, grid, warmup, **kwargs: launches.append(self))

    from diffloss_fast.fast_unet import FastUNet
    from diffloss_fast.prior import prior_architecture

    class HostTraffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            devices = {t.device.type for t in tree_leaves((args, kwargs or {}))
                       if isinstance(t, torch.Tensor) and t.dim() > 0}
            if "cpu" in devices or func is torch.ops.aten._local_scalar_dense.default:
                self.found.append(str(func))
            return func(*args, **(kwargs or {}))

    net = FastUNet(prior_architecture("tiny"), dtype=torch.bfloat16, decoder=decoder,
                   device="meta", channels_last=True, fused_norm=fused_norm)
    x = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.zeros(2, dtype=torch.long, device="meta")
    with HostTraffic() as mode:
        with torch.no_grad():
            net(x.detach(), t)
        outs = [o for o in net(x, t) if o is not None]
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    assert mode.found == []
    assert bool(launches) == fused_norm
