"""DiffLoss against ReferenceDiffLoss and against a direct computation on upstream modules."""
import math

import pytest
import torch
import torch.nn.functional as F

import diffloss_fast as dl
from guided_diffusion.gaussian_diffusion import (GaussianDiffusion, LossType, ModelMeanType,
                                                 ModelVarType, get_named_beta_schedule)

T = 1000
WEIGHTS = {"both": (1e-3, 1e-6), "natural": (1.0, 0.0), "semantic": (0.0, 1.0)}


def upstream_diffusion():
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", T),
                             model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=ModelVarType.LEARNED_RANGE,
                             loss_type=LossType.MSE, rescale_timesteps=False)


def direct_diffloss(unet, restored, gt, t, noise, *, target, natural_weight, semantic_weight):
    """DiffLoss written out from the paper on upstream guided-diffusion pieces, in fp32:
    upstream q_sample, upstream UNetModel.forward, the middle block read by a hook."""
    diffusion = upstream_diffusion()
    x0_res, x0_gt = 2 * restored - 1, 2 * gt - 1
    xt_res, xt_gt = diffusion.q_sample(x0_res, t, noise), diffusion.q_sample(x0_gt, t, noise)
    feats = []
    hook = unet.middle_block.register_forward_hook(lambda m, a, out: feats.append(out))
    try:
        eps_res = unet(xt_res, t)[:, :3]
        with torch.no_grad():
            eps_gt = unet(xt_gt, t)[:, :3]
    finally:
        hook.remove()
    h_res, h_gt = feats
    if target == "eps":
        natural = F.mse_loss(eps_res, eps_gt)
    else:
        betas = torch.tensor(diffusion.betas, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        prev = lambda xt, eps: (xt - betas / (1 - abar).sqrt() * eps) / (1 - betas).sqrt()  # noqa: E731
        natural = F.mse_loss(prev(xt_res, eps_res), prev(xt_gt, eps_gt))
    semantic = F.mse_loss(h_res, h_gt)
    return natural_weight * natural + semantic_weight * semantic


def make_batch(shape, seed, t_values):
    gen = torch.Generator().manual_seed(seed)
    restored = torch.rand(shape, generator=gen)
    gt = torch.rand(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    return restored, gt, torch.tensor(t_values), noise


def loss_and_grad(loss_fn, restored, gt, t, noise):
    x = restored.clone().requires_grad_(True)
    loss = loss_fn(x, gt, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("target", ["eps", "x_prev"])
@pytest.mark.parametrize("terms", ["both", "natural", "semantic"])
def test_fast_matches_reference_fp32(tiny_unet, target, terms):
    nw, sw = WEIGHTS[terms]
    restored, gt, t, noise = make_batch((3, 3, 32, 48), seed=1, t_values=[0, 517, T - 1])
    kw = dict(natural_weight=nw, semantic_weight=sw, target=target, precision="fp32")
    ref_loss, ref_grad = loss_and_grad(dl.ReferenceDiffLoss(tiny_unet, **kw), restored, gt, t, noise)
    fast_loss, fast_grad = loss_and_grad(dl.DiffLoss(tiny_unet, **kw), restored, gt, t, noise)
    assert ref_loss > 0 and ref_grad.abs().sum() > 0
    assert rel(fast_loss, ref_loss) < 1e-5
    assert rel(fast_grad, ref_grad) < 1e-5


@pytest.mark.parametrize("target", ["eps", "x_prev"])
@pytest.mark.parametrize("terms", ["both", "natural", "semantic"])
def test_fast_matches_direct_upstream_computation(tiny_unet, target, terms):
    nw, sw = WEIGHTS[terms]
    # non-square, not the training size (32), one image at each end of the schedule
    restored, gt, t, noise = make_batch((2, 3, 24, 40), seed=2, t_values=[0, T - 1])
    x = restored.clone().requires_grad_(True)
    want = direct_diffloss(tiny_unet, x, gt, t, noise, target=target, natural_weight=nw,
                           semantic_weight=sw)
    (want_grad,) = torch.autograd.grad(want, x)
    got, got_grad = loss_and_grad(
        dl.DiffLoss(tiny_unet, natural_weight=nw, semantic_weight=sw, target=target,
                    precision="fp32"), restored, gt, t, noise)
    assert rel(got, want.detach()) < 1e-5
    assert rel(got_grad, want_grad) < 1e-5


def test_x_prev_is_the_upstream_posterior_mean(tiny_unet):
    """Target x_prev is guided-diffusion's own p_mean_variance mean of each branch."""
    restored, gt, t, noise = make_batch((2, 3, 32, 32), seed=3, t_values=[0, 400])
    diffusion = upstream_diffusion()
    xt = [diffusion.q_sample(2 * v - 1, t, noise) for v in (restored, gt)]
    means = [diffusion.p_mean_variance(tiny_unet, v, t, clip_denoised=False)["mean"] for v in xt]
    want = F.mse_loss(means[0], means[1])
    loss_fn = dl.DiffLoss(tiny_unet, natural_weight=1.0, semantic_weight=0.0, target="x_prev",
                          precision="fp32")
    loss_fn(restored, gt, t=t, noise=noise)
    assert rel(loss_fn.last_terms["natural"], want) < 1e-4


def test_input_range_minus_one_one(tiny_unet):
    restored, gt, t, noise = make_batch((2, 3, 32, 32), seed=4, t_values=[10, 900])
    a = dl.DiffLoss(tiny_unet, precision="fp32")(restored, gt, t=t, noise=noise)
    b = dl.DiffLoss(tiny_unet, precision="fp32", input_range=(-1.0, 1.0))(
        2 * restored - 1, 2 * gt - 1, t=t, noise=noise)
    assert rel(b, a) < 1e-5


def test_timestep_weight_scales_each_sample(tiny_unet):
    restored, gt, t, noise = make_batch((2, 3, 32, 32), seed=5, t_values=[3, 800])
    per_sample = []
    for i in range(2):
        fn = dl.DiffLoss(tiny_unet, precision="fp32")
        per_sample.append(fn(restored[i:i + 1], gt[i:i + 1], t=t[i:i + 1], noise=noise[i:i + 1]))
    weighted = dl.DiffLoss(tiny_unet, precision="fp32",
                           timestep_weight=lambda ts: torch.where(ts > 500, 3.0, 0.5))
    want = (0.5 * per_sample[0] + 3.0 * per_sample[1]) / 2
    assert rel(weighted(restored, gt, t=t, noise=noise), want) < 1e-5


def test_generator_makes_draws_reproducible_and_shared(tiny_unet):
    restored, gt, _, _ = make_batch((2, 3, 32, 32), seed=6, t_values=[0, 0])
    fast, ref = dl.DiffLoss(tiny_unet, precision="fp32"), dl.ReferenceDiffLoss(tiny_unet)
    a = fast(restored, gt, generator=torch.Generator().manual_seed(7))
    b = ref(restored, gt, generator=torch.Generator().manual_seed(7))
    c = fast(restored, gt, generator=torch.Generator().manual_seed(8))
    assert rel(a, b) < 1e-5 and rel(a, c) > 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_close_to_fp32(tiny_unet, precision):
    restored, gt, t, noise = make_batch((4, 3, 32, 32), seed=9, t_values=[0, 250, 600, T - 1])
    kw = dict(natural_weight=1.0, semantic_weight=0.1)
    ref_loss, ref_grad = loss_and_grad(dl.ReferenceDiffLoss(tiny_unet, **kw), restored, gt, t, noise)
    loss, grad = loss_and_grad(dl.DiffLoss(tiny_unet, precision=precision, **kw),
                               restored, gt, t, noise)
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) < 5e-2
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99


def test_last_terms_are_unweighted_and_detached(tiny_unet):
    restored, gt, t, noise = make_batch((2, 3, 32, 32), seed=10, t_values=[5, 50])
    fn = dl.DiffLoss(tiny_unet, natural_weight=2.0, semantic_weight=3.0, precision="fp32")
    loss = fn(restored.requires_grad_(True), gt, t=t, noise=noise)
    terms = fn.last_terms
    assert not terms["natural"].requires_grad and not terms["semantic"].requires_grad
    assert math.isclose(float(loss.detach()), 2 * float(terms["natural"]) + 3 * float(terms["semantic"]),
                        rel_tol=1e-6)
