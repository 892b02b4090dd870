"""Gradients: float64 gradcheck through the torch path, and where gradients must never go."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffloss_fast as dl
from random_unets import randomized_unet


@pytest.mark.parametrize("target", ["eps", "x_prev"])
def test_gradcheck_float64(target):
    prior = randomized_unet(seed=1).double()
    loss_fn = dl.DiffLoss(prior, natural_weight=1.0, semantic_weight=0.5, target=target,
                          precision="fp32", backend="torch")
    gen = torch.Generator().manual_seed(0)
    restored = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    gt = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 999])
    # fast_mode checks the Jacobian along random directions: a few passes instead of 2 per input
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, gt, t=t, noise=noise), (restored,),
                                    eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=True)


class ConvLog(TorchDispatchMode):
    """Records the output channels of every convolution that runs."""

    def __init__(self):
        super().__init__()
        self.out_channels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.out_channels.append(args[1].shape[0])
        return func(*args, **(kwargs or {}))


def encoder_convs(unet):
    blocks = list(unet.input_blocks) + [unet.middle_block]
    return sum(isinstance(m, torch.nn.Conv2d) for b in blocks for m in b.modules())


def all_convs(unet):
    return sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())


@pytest.mark.parametrize("weights, decoder", [((0.0, 1.0), False), ((1.0, 1.0), True),
                                              ((1.0, 0.0), True)])
def test_truncation(tiny_unet, weights, decoder):
    loss_fn = dl.DiffLoss(tiny_unet, natural_weight=weights[0], semantic_weight=weights[1],
                          precision="fp32")
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad(), ConvLog() as log:
        loss_fn(x, y)
    per_branch = all_convs(tiny_unet) if decoder else encoder_convs(tiny_unet)
    assert len(log.out_channels) == 2 * per_branch  # two branches, every conv once
    assert 6 not in log.out_channels  # the variance channels are never computed
    assert (3 in log.out_channels) == decoder


def test_gradients_reach_only_the_restored_image(tiny_unet):
    loss_fn = dl.DiffLoss(tiny_unet, precision="fp32")
    restored = torch.rand(2, 3, 32, 32, requires_grad=True)
    gt = torch.rand(2, 3, 32, 32, requires_grad=True)
    noise = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss_fn(restored, gt, noise=noise).backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert gt.grad is None and noise.grad is None
    params = list(tiny_unet.parameters()) + [p for net in loss_fn._nets.values()
                                             for p in net.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in params)


def test_both_weights_zero_does_no_work(tiny_unet):
    loss_fn = dl.DiffLoss(tiny_unet, natural_weight=0.0, semantic_weight=0.0)
    with ConvLog() as log:
        loss = loss_fn(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert float(loss) == 0.0 and log.out_channels == []
    assert loss_fn.last_terms == {"natural": None, "semantic": None}


def test_activation_checkpointing_matches(tiny_unet):
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    t, noise = torch.tensor([3, 700]), torch.randn(2, 3, 32, 32, generator=gen)
    grads = []
    for ckpt in (False, True):
        xr = x.clone().requires_grad_(True)
        dl.DiffLoss(tiny_unet, precision="fp32", checkpoint=ckpt)(xr, y, t=t, noise=noise).backward()
        grads.append(xr.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
