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
    eager = dl.DiffLoss(prior, cuda_graph=False, **kw)
    graphed = dl.DiffLoss(prior, cuda_graph=True, **kw)
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
    want, want_grad, _ = step(dl.DiffLoss(prior, cuda_graph=False, **kw), 7)
    got, grad, _ = step(dl.DiffLoss(prior, cuda_graph=True, **kw), 7)
    assert abs(float(got - want)) / float(want) < 1e-2
    assert F.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) > 0.999


@needs_cuda
def test_several_forwards_before_one_backward(tiny_unet, true_fp32):
    """A multi-stage network's outputs each through the loss, then one backward: each forward
    replays its own graph instance, so the gradient is the eager one."""
    prior = tiny_unet.cuda()
    kw = dict(natural_weight=1.0, semantic_weight=0.1, precision="fp32")
    grads = []
    for loss_fn in (dl.DiffLoss(prior, cuda_graph=False, **kw), dl.DiffLoss(prior, **kw)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.rand(2, 3, 32, 32, device="cuda", generator=gen, requires_grad=True)
        y = torch.rand(2, 3, 32, 32, device="cuda", generator=gen)
        noises = [torch.randn(2, 3, 32, 32, device="cuda", generator=gen) for _ in range(3)]
        t = torch.tensor([5, 700], device="cuda")
        sum(loss_fn(x * (0.5 + 0.2 * k), y, t=t, noise=n) for k, n in enumerate(noises)).backward()
        grads.append(x.grad)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-5


@needs_cuda
def test_shape_changes_dropped_forwards_and_partial_backward_on_cuda(tiny_unet, true_fp32):
    """The patterns of the recorded tests below, with real graphs: batch shapes that change,
    a forward dropped without backward, and a backward through one output only."""
    from diffloss_fast.cuda_graph import PriorGraphs
    from diffloss_fast.fast_unet import FastUNet
    prior = tiny_unet.cuda()
    kw = dict(natural_weight=1.0, semantic_weight=0.1, precision="fp32")
    eager, graphed = dl.DiffLoss(prior, cuda_graph=False, **kw), dl.DiffLoss(prior, **kw)
    for seed, batch in enumerate((2, 3, 2)):
        shape = (batch, 3, 32, 32)
        want, want_grad, _ = step(eager, seed, shape)
        graphed(torch.rand(shape, device="cuda", requires_grad=True),
                torch.rand(shape, device="cuda"))  # dropped: frees its instance
        got, grad, _ = step(graphed, seed, shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5
    assert all(len(g.instances) == 1 for g in graphed._graphs._graphs.values())
    net = FastUNet(prior, dtype=torch.float32, decoder=True, device="cuda")
    x, t = torch.rand(2, 3, 32, 32, device="cuda"), torch.tensor([5, 600], device="cuda")
    graphs = PriorGraphs(net, (x, t), 0)
    for use in (0, 1):
        xg = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(net(xg, t)[use].square().sum(), xg)
        xg = x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(graphs.differentiable((xg, t))[use].square().sum(), xg)
        assert float((got - want).norm() / want.norm()) < 1e-5


@needs_cuda
def test_without_autograd_replays_the_no_grad_graph(tiny_unet):
    prior = tiny_unet.cuda()
    kw = dict(natural_weight=1.0, semantic_weight=0.1, precision="fp32")
    x, y = torch.rand(2, 3, 32, 32, device="cuda"), torch.rand(2, 3, 32, 32, device="cuda")
    t, noise = torch.tensor([3, 900], device="cuda"), torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        want = dl.DiffLoss(prior, cuda_graph=False, **kw)(x, y, t=t, noise=noise)
        got = dl.DiffLoss(prior, cuda_graph=True, **kw)(x, y, t=t, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_refused_off_cuda_and_with_compile_or_checkpointing(tiny_unet):
    with pytest.raises(ValueError, match="True, False or 'auto'"):
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
    from diffloss_fast.ops import plan_ops
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
                   device="meta", channels_last=True,
                   plan=plan_ops("torch", fused_norm, "meta", torch.bfloat16))
    x = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.zeros(2, dtype=torch.long, device="meta")
    with HostTraffic() as mode:
        with torch.no_grad():
            net(x.detach(), t)
        outs = [o for o in net(x, t) if o is not None]
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    assert mode.found == []
    assert bool(launches) == fused_norm


# --- the bookkeeping around the graphs, on any device ----------------------------------------
class EagerCapture:
    """Stands in for a CUDA graph: ``replay()`` reruns the captured callable eagerly and returns
    its fresh outputs, so everything around the capture (static inputs, instances, leases,
    copies of the outputs) runs as it does on CUDA."""

    @staticmethod
    def check_device(device):
        pass

    @staticmethod
    def new_pool():
        return None

    @staticmethod
    def warm_up(fn):
        fn()

    def __init__(self, fn, pool=None):
        self.fn, self.outputs = fn, fn()

    def replay(self):
        with torch.enable_grad():  # a graph replays its autograd-recorded kernels anywhere
            return self.fn()


@pytest.fixture
def recorded(monkeypatch):
    import diffloss_fast.cuda_graph as cuda_graph
    monkeypatch.setattr(cuda_graph, "CAPTURE", EagerCapture)
    return cuda_graph


def cpu_pair(prior, **kw):
    kw = dict(natural_weight=1.0, semantic_weight=0.1, precision="fp32", **kw)
    return dl.DiffLoss(prior, cuda_graph=False, **kw), dl.DiffLoss(prior, cuda_graph=True, **kw)


def cpu_inputs(seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 32, 32)
    return (torch.rand(shape, generator=gen), torch.rand(shape, generator=gen),
            torch.randint(0, 1000, (batch,), generator=gen), torch.randn(shape, generator=gen))


def grad_of(loss_fn, calls):
    """Gradient of the sum of several calls' losses (all forwards first, then one backward)."""
    x = calls[0][0].clone().requires_grad_(True)
    sum(loss_fn(x * (1 - 0.1 * k), y, t=t, noise=n)
        for k, (_, y, t, n) in enumerate(calls)).backward()
    return x.grad


def test_recorded_forwards_before_one_backward_match_eager(tiny_unet, recorded):
    eager, graphed = cpu_pair(tiny_unet)
    calls = [cpu_inputs(seed) for seed in range(3)]
    torch.testing.assert_close(grad_of(graphed, calls), grad_of(eager, calls))
    (graphs,) = graphed._graphs._graphs.values()
    assert len(graphs.instances) == 3 and graphs.idle  # one per forward in flight, all freed
    torch.testing.assert_close(grad_of(graphed, calls[:2]), grad_of(eager, calls[:2]))
    assert len(graphs.instances) == 3  # reused, not captured again


def test_recorded_shape_changes_and_no_grad_calls(tiny_unet, recorded):
    eager, graphed = cpu_pair(tiny_unet)
    for batch in (2, 3, 2):
        calls = [cpu_inputs(batch, batch)]
        torch.testing.assert_close(grad_of(graphed, calls), grad_of(eager, calls))
        x, y, t, n = calls[0]
        with torch.no_grad():
            torch.testing.assert_close(graphed(x, y, t=t, noise=n), eager(x, y, t=t, noise=n))
    assert len(graphed._graphs) == 2


def test_recorded_forward_without_backward_frees_its_instance(tiny_unet, recorded):
    """A loss computed with autograd on but never differentiated (logged, then dropped)."""
    _, graphed = cpu_pair(tiny_unet)
    x, y, t, n = cpu_inputs(0)
    x.requires_grad_(True)
    for _ in range(6):
        graphed(x, y, t=t, noise=n)  # dropped at once
    (graphs,) = graphed._graphs._graphs.values()
    assert len(graphs.instances) == 1 and graphs.idle


def test_recorded_too_many_in_flight_run_eagerly(tiny_unet, recorded):
    eager, graphed = cpu_pair(tiny_unet)
    calls = [cpu_inputs(seed) for seed in range(recorded.MAX_IN_FLIGHT + 2)]
    with pytest.warns(UserWarning, match="runs eagerly"):
        got = grad_of(graphed, calls)
    torch.testing.assert_close(got, grad_of(eager, calls))
    (graphs,) = graphed._graphs._graphs.values()
    assert len(graphs.instances) == recorded.MAX_IN_FLIGHT


def test_recorded_stale_backward_is_refused(tiny_unet, recorded):
    """A second backward (retain_graph) after the instance served another forward would read
    that forward's activations: refused."""
    _, graphed = cpu_pair(tiny_unet)
    x, y, t, n = cpu_inputs(0)
    x.requires_grad_(True)
    first = graphed(x, y, t=t, noise=n)
    first.backward(retain_graph=True)
    graphed(x, y, t=t, noise=n).backward()  # reuses the freed instance
    with pytest.raises(RuntimeError, match="replayed by a later forward"):
        first.backward()


def test_recorded_backward_through_some_outputs(tiny_unet, recorded):
    """Outputs the loss never differentiates get a zero gradient in the replayed backward."""
    from diffloss_fast.cuda_graph import PriorGraphs
    from diffloss_fast.fast_unet import FastUNet
    net = FastUNet(tiny_unet, dtype=torch.float32, decoder=True)
    x, _, t, _ = cpu_inputs(1)
    graphs = PriorGraphs(net, (x, t), 0)
    for use in (0, 1):
        xg = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(net(xg, t)[use].square().sum(), xg)
        xg = x.clone().requires_grad_(True)
        out = graphs.differentiable((xg, t))[use]
        (got,) = torch.autograd.grad(out.square().sum(), xg)
        torch.testing.assert_close(got, want)


def test_auto_uses_graphs_on_cuda_only(tiny_unet, recorded):
    loss_fn = dl.DiffLoss(tiny_unet, precision="fp32")
    x, y, t, n = cpu_inputs(0)
    loss_fn(x.requires_grad_(True), y, t=t, noise=n).backward()
    assert loss_fn.execution == "auto" and len(loss_fn._graphs) == 0
    assert not dl.DiffLoss(tiny_unet, checkpoint=True)._cuda_graph(torch.device("cuda"))
    assert not dl.DiffLoss(tiny_unet, compile=True)._cuda_graph(torch.device("cuda"))
