"""Difference propagation: the (target, difference) ops against ``g(a + d) - g(a)``, the pair
network against two passes of the plain one, and the property it exists for: bf16 and fp16
keep the fp32 loss and gradient where two low-precision passes subtracted do not."""
import pytest
import torch
import torch.nn.functional as F

import diffloss_fast as dl
from diffloss_fast.difference_unet import DifferenceUNet
from diffloss_fast.fast_unet import FastUNet
from diffloss_fast.ops.attention_difference import attention_difference, attention_difference_torch
from diffloss_fast.ops.group_norm_silu_difference import group_norm_silu_difference
from diffloss_fast.ops.group_norm_silu import group_norm_silu_torch
from random_unets import TINY, randomized_unet

F64 = torch.float64


def rand(*shape, scale=1.0, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)


NORM_CASES = {
    "film_silu": dict(scale=True, x_bias=True, silu=True),
    "silu": dict(scale=False, x_bias=False, silu=True),
    "norm_only": dict(scale=False, x_bias=False, silu=False),
}


def norm_args(case, channels=12, batch=2):
    weight, bias = 1 + rand(channels, scale=0.3, seed=1), rand(channels, scale=0.3, seed=2)
    scale = rand(batch, channels, 1, 1, scale=0.5, seed=3) if case["scale"] else None
    shift = rand(batch, channels, 1, 1, scale=0.5, seed=4) if case["scale"] else None
    x_bias = rand(channels, scale=0.5, seed=5) if case["x_bias"] else None
    return dict(weight=weight, bias=bias, scale=scale, shift=shift, x_bias=x_bias,
                silu=case["silu"])


@pytest.mark.parametrize("case", NORM_CASES)
@pytest.mark.parametrize("d_scale", [1.0, 1024.0])
def test_norm_difference_is_the_difference_of_two_norms(case, d_scale):
    """float64: equal to g(a + d) - g(a) of the plain op (odd sizes: 12 channels in 3 groups,
    5x7 pixels), the stored difference carrying its scale; the backward is g'(a + d)."""
    kw = norm_args(NORM_CASES[case])
    a, d = rand(2, 12, 5, 7, seed=6), rand(2, 12, 5, 7, scale=1e-3, seed=7)
    g = lambda x: group_norm_silu_torch(x, 3, kw["weight"], kw["bias"], 1e-5, kw["scale"],  # noqa: E731
                                        kw["shift"], kw["x_bias"], False, kw["silu"])
    stored = (d * d_scale).requires_grad_(True)
    out_a, out_d = group_norm_silu_difference(a, stored, torch.tensor(d_scale, dtype=F64), 3,
                                              kw["weight"], kw["bias"], 1e-5, kw["scale"],
                                              kw["shift"], kw["x_bias"], kw["silu"])
    torch.testing.assert_close(out_a, g(a))
    torch.testing.assert_close(out_d / d_scale, g(a + d) - g(a), rtol=1e-9, atol=1e-15)
    grad_out = rand(*out_d.shape, seed=8)
    (got,) = torch.autograd.grad(out_d, stored, grad_out)
    r = (a + d).requires_grad_(True)
    (want,) = torch.autograd.grad(g(r), r, grad_out)
    torch.testing.assert_close(got, want)


def test_attention_difference_is_the_difference_of_two_attentions():
    """float64, 3 heads of 5 tokens by 4 dims: the stable softmax difference equals the
    difference of two attentions; its backward is attention's at the restored point."""
    q_a, k_a, v_a = (rand(2, 3, 5, 4, seed=s) for s in (1, 2, 3))
    q_d, k_d, v_d = (rand(2, 3, 5, 4, scale=1e-4, seed=s) for s in (4, 5, 6))
    s = torch.tensor(4096.0, dtype=F64)
    stored = [(x * s).requires_grad_(True) for x in (q_d, k_d, v_d)]
    out_a, out_d = attention_difference(q_a, k_a, v_a, *stored, s)
    attn = F.scaled_dot_product_attention
    torch.testing.assert_close(out_a, attn(q_a, k_a, v_a))
    want = attn(q_a + q_d, k_a + k_d, v_a + v_d) - attn(q_a, k_a, v_a)
    torch.testing.assert_close(out_d / s, want, rtol=1e-8, atol=1e-16)
    grad_out = rand(*out_d.shape, seed=7)
    got = torch.autograd.grad(out_d, stored, grad_out)
    restored = [(x + y).requires_grad_(True) for x, y in ((q_a, q_d), (k_a, k_d), (v_a, v_d))]
    want = torch.autograd.grad(attn(*restored), restored, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bf16_pair_ops_resolve_what_two_bf16_passes_cannot():
    """A difference of 1e-3 relative to its activation: rounded in bf16 before the op, the
    plain op's difference is mostly rounding noise; the pair op stays within bf16 of the
    float64 truth."""
    a64, d64 = rand(2, 12, 8, 8, seed=9), rand(2, 12, 8, 8, scale=1e-3, seed=10)
    kw = norm_args(NORM_CASES["film_silu"])
    g = lambda x: group_norm_silu_torch(x, 3, kw["weight"], kw["bias"], 1e-5, kw["scale"],  # noqa: E731
                                        kw["shift"], kw["x_bias"], False, True)
    truth = g(a64 + d64) - g(a64)
    err = lambda x: float((x.double() - truth).norm() / truth.norm())  # noqa: E731
    bf = lambda v: None if v is None else v.bfloat16()  # noqa: E731
    two_pass = g((a64 + d64).bfloat16().double()) - g(a64.bfloat16().double())
    one = torch.tensor(1.0)
    _, pair = group_norm_silu_difference(a64.bfloat16(), d64.bfloat16(), one, 3,
                                         bf(kw["weight"]), bf(kw["bias"]), 1e-5,
                                         bf(kw["scale"]), bf(kw["shift"]), bf(kw["x_bias"]))
    assert err(two_pass) > 0.3
    assert err(pair) < 2e-2
    q_a, k_a, v_a = (rand(2, 2, 16, 8, seed=s) for s in (11, 12, 13))
    q_d, k_d, v_d = (rand(2, 2, 16, 8, scale=1e-3, seed=s) for s in (14, 15, 16))
    attn = F.scaled_dot_product_attention
    truth = attn(q_a + q_d, k_a + k_d, v_a + v_d) - attn(q_a, k_a, v_a)
    b = [x.bfloat16() for x in (q_a + q_d, k_a + k_d, v_a + v_d, q_a, k_a, v_a)]
    two_pass = (attn(*b[:3]).double() - attn(*b[3:]).double())
    _, pair = attention_difference_torch(*b[3:], q_d.bfloat16(), k_d.bfloat16(),
                                         v_d.bfloat16(), one)
    assert err(two_pass) > 0.3
    assert err(pair) < 2e-2


@pytest.mark.parametrize("decoder", [True, False], ids=["both", "semantic"])
def test_pair_network_equals_two_passes_in_float64(decoder):
    prior = randomized_unet(TINY).double()
    kw = dict(dtype=F64, decoder=decoder)
    plain, pair = FastUNet(prior, **kw), DifferenceUNet(prior, **kw)
    a, d = rand(2, 3, 32, 32, seed=1), rand(2, 3, 32, 32, scale=1e-2, seed=2)
    t = torch.tensor([10, 870])
    eps_a, h_a = plain(a, t)
    s = torch.tensor(64.0, dtype=F64)
    stored = (d * s).requires_grad_(True)
    eps_d, h_d = pair(a, stored, t, s)
    x = (a + d).requires_grad_(True)
    eps_r, h_r = plain(x, t)
    torch.testing.assert_close(h_d / s, h_r - h_a, rtol=1e-7, atol=1e-12)
    loss_pair, loss_plain = (h_d / s).square().sum(), (h_r - h_a).square().sum()
    if decoder:
        torch.testing.assert_close(eps_d / s, eps_r - eps_a, rtol=1e-7, atol=1e-12)
        loss_pair, loss_plain = loss_pair + (eps_d / s).square().sum(), \
            loss_plain + (eps_r - eps_a).square().sum()
    else:
        assert eps_d is None
    (got,) = torch.autograd.grad(loss_pair, stored)
    (want,) = torch.autograd.grad(loss_plain, x)
    torch.testing.assert_close(got * s, want, rtol=1e-7, atol=1e-14)


def test_identical_images_give_exactly_zero(tiny_unet):
    loss_fn = dl.DiffLoss(tiny_unet, precision="bf16", natural_weight=1.0, semantic_weight=1.0)
    assert loss_fn._difference(torch.bfloat16)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = loss_fn(x, x.detach().clone(), t=torch.tensor([3, 990]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((x.grad == 0).all())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("target", ["eps", "x_prev"])
def test_large_differences_at_low_t_match_fp32(tiny_unet, precision, target):
    """Where two passes were already fine (delta 0.3 at t = 0) the pair path matches too."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    t, noise = torch.tensor([0, 0]), torch.randn(2, 3, 32, 32, generator=gen)
    results = []
    for p in ("fp32", precision):
        loss_fn = dl.DiffLoss(tiny_unet, precision=p, natural_weight=1.0, semantic_weight=0.1,
                              target=target)
        xx = x.clone().requires_grad_(True)
        loss = loss_fn(xx, y, t=t, noise=noise)
        loss.backward()
        results.append((float(loss.detach()), xx.grad.flatten()))
    (want, want_grad), (got, grad) = results
    assert abs(got - want) / want < 0.02
    assert float(F.cosine_similarity(grad, want_grad, dim=0)) > 0.995


def test_two_pass_stays_the_fp32_path_and_can_be_asked_for(tiny_unet):
    assert not dl.DiffLoss(tiny_unet, precision="fp32")._difference(torch.float32)
    assert not dl.DiffLoss(tiny_unet, propagation="two-pass")._difference(torch.bfloat16)
    assert dl.DiffLoss(tiny_unet, propagation="difference")._difference(torch.float32)
    with pytest.raises(ValueError, match="propagation"):
        dl.DiffLoss(tiny_unet, propagation="fast")


def test_recorded_graphs_replay_the_pair_pass(tiny_unet, monkeypatch):
    """The pair pass through the CUDA-graph bookkeeping (captures stood in for by eager
    reruns): several forwards before one backward give the eager gradient."""
    import diffloss_fast.cuda_graph as cuda_graph
    from test_cuda_graph import EagerCapture
    monkeypatch.setattr(cuda_graph, "CAPTURE", EagerCapture)
    kw = dict(precision="bf16", natural_weight=1.0, semantic_weight=0.1)
    eager, graphed = dl.DiffLoss(tiny_unet, execution="eager", **kw), \
        dl.DiffLoss(tiny_unet, execution="graphed", **kw)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    y = (x + 0.05 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    noises = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)]
    t = torch.tensor([100, 900])
    grads = []
    for loss_fn in (eager, graphed):
        xx = x.clone().requires_grad_(True)
        sum(loss_fn(xx * (1 - 0.1 * k), y, t=t, noise=n) for k, n in enumerate(noises)).backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[1], grads[0])
    (graphs,) = graphed._graphs._graphs.values()
    assert len(graphs.instances) == 2 and graphs.idle


@pytest.mark.parametrize("target", ["eps", "x_prev"])
def test_fused_reductions_read_the_differences(tiny_unet, target):
    """The Triton reductions (under the interpreter) on the pair path's fp32 differences and
    their broadcast zeros give the torch twin's loss and gradient (the pair path in fp32, so
    that the noised target is the same from both backends' noising, to rounding)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    y = (x + 0.05 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    t, noise = torch.tensor([200, 800]), torch.randn(2, 3, 32, 32, generator=gen)
    results = []
    for backend in ("torch", "triton"):
        loss_fn = dl.DiffLoss(tiny_unet, precision="fp32", propagation="difference",
                              backend=backend, target=target,
                              natural_weight=1.0, semantic_weight=0.1)
        xx = x.clone().requires_grad_(True)
        loss = loss_fn(xx, y, t=t, noise=noise)
        loss.backward()
        results.append((loss.detach(), xx.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-12)


def test_activation_checkpointing_recomputes_the_pair_pass(tiny_unet):
    """Recomputed in the backward pass, the pair ops give the same gradient as kept ones."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    y = (x + 0.05 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    t, noise = torch.tensor([100, 900]), torch.randn(2, 3, 32, 32, generator=gen)
    grads = []
    for checkpoint in (False, True):
        loss_fn = dl.DiffLoss(tiny_unet, precision="bf16", checkpoint=checkpoint,
                              natural_weight=1.0, semantic_weight=0.1)
        xx = x.clone().requires_grad_(True)
        loss_fn(xx, y, t=t, noise=noise).backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
