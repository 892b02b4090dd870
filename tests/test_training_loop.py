"""The loss inside the training loops people write: autocast, mixed dtypes, a parent module that
holds the loss, DistributedDataParallel, and timing the prior's share of a step."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffloss_fast as dl

SHAPE = (2, 3, 32, 32)
T = torch.tensor([40, 930])


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE, generator=gen), torch.rand(SHAPE, generator=gen),
            torch.randn(SHAPE, generator=gen))


LOSSES = {
    "fast-torch": lambda prior: dl.DiffLoss(prior, natural_weight=1.0, semantic_weight=0.1,
                                            precision="fp32", backend="torch"),
    "fast-triton": lambda prior: dl.DiffLoss(prior, natural_weight=1.0, semantic_weight=0.1,
                                             precision="fp32", backend="triton"),
    "reference": lambda prior: dl.ReferenceDiffLoss(prior, natural_weight=1.0,
                                                    semantic_weight=0.1),
}


def plain_step(loss_fn, restored, gt, noise):
    """Loss and gradient with no autocast anywhere, in fp32: what every pattern must give."""
    x = restored.float().clone().requires_grad_(True)
    loss = loss_fn(x, gt.float(), t=T, noise=noise)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("pattern", ["backward_outside", "backward_inside", "bf16_restored"])
def test_autocast_region_does_not_change_the_loss(tiny_unet, name, pattern):
    """The AMP recipe (forward under autocast, backward outside), backward inside it too, and a
    network's bf16 output next to an fp32 target: the loss computes in its own precision, the
    same loss and gradient as without autocast; the gradient comes back in restored's dtype.
    A backward inside the region runs PyTorch's own backward matmuls under autocast (its
    documented behaviour, beyond the loss's reach): equal to bf16 rounding of a few ops."""
    loss_fn = LOSSES[name](tiny_unet)
    restored, gt, noise = batch()
    dtype = torch.bfloat16 if pattern == "bf16_restored" else torch.float32
    restored = restored.to(dtype)
    want, want_grad = plain_step(loss_fn, restored, gt, noise)

    x = restored.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(x, gt, t=T, noise=noise)
        if pattern == "backward_inside":
            loss.backward()
    if pattern != "backward_inside":
        loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0)
    assert x.grad.dtype == dtype
    if pattern == "backward_inside":
        assert float((x.grad - want_grad).norm() / want_grad.norm()) < 1e-3
    else:
        torch.testing.assert_close(x.grad, want_grad.to(dtype), rtol=1e-5, atol=1e-9)


def test_mixed_float_dtypes_without_autocast(tiny_unet):
    """restored in bf16, gt in fp32 (or the other way): cast to the common dtype."""
    loss_fn = LOSSES["fast-torch"](tiny_unet)
    restored, gt, noise = batch(1)
    want, want_grad = plain_step(loss_fn, restored.bfloat16(), gt, noise)
    x = restored.bfloat16().requires_grad_(True)
    loss = loss_fn(x, gt, t=T, noise=noise)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, want_grad.bfloat16())
    y = gt.bfloat16()
    torch.testing.assert_close(loss_fn(restored, y, t=T, noise=noise),
                               loss_fn(restored, y.float(), t=T, noise=noise))


class Restorer(nn.Module):
    """A parent module holding the loss as a submodule, as BasicSR-style code does."""

    def __init__(self, prior):
        super().__init__()
        self.body = nn.Conv2d(3, 3, 3, padding=1)
        nn.init.normal_(self.body.weight, std=0.01)  # a small residual: outputs stay in range
        self.criterion = dl.DiffLoss(prior, precision="fp32")

    def forward(self, degraded, gt):
        restored = degraded + self.body(degraded)
        return F.mse_loss(restored, gt) + self.criterion(restored, gt)


def test_prior_stays_out_of_a_parent_module(tiny_unet):
    model = Restorer(tiny_unet)
    assert model.criterion.state_dict() == {}
    assert set(model.state_dict()) == {"body.weight", "body.bias"}
    assert {id(p) for p in model.parameters()} == {id(model.body.weight), id(model.body.bias)}
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    model.half()
    model.double()
    model.to("meta")
    assert all(v.dtype == torch.float32 and v.device.type == "cpu"
               for v in tiny_unet.state_dict().values())
    assert all(torch.equal(v, before[k]) for k, v in tiny_unet.state_dict().items())


def test_the_reference_keeps_the_prior_as_a_submodule(tiny_unet):
    """It runs the prior itself, so moving it moves the prior (documented)."""
    keys = dl.ReferenceDiffLoss(tiny_unet).state_dict().keys()
    assert set(keys) == {f"prior.{k}" for k in tiny_unet.state_dict()}


def test_distributed_data_parallel_sees_only_the_network(tiny_unet, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        model = Restorer(tiny_unet)
        ddp = DistributedDataParallel(model)
        assert {id(p) for p in ddp.parameters()} == {id(model.body.weight), id(model.body.bias)}
        degraded, gt, _ = batch(2)
        ddp(degraded, gt).backward()
        assert model.body.weight.grad is not None
        assert all(p.grad is None for p in tiny_unet.parameters())
    finally:
        dist.destroy_process_group()


def test_timings_measure_each_call_and_change_nothing(tiny_unet):
    loss_fn = LOSSES["fast-torch"](tiny_unet)
    restored, gt, noise = batch(3)
    _, want_grad = plain_step(loss_fn, restored, gt, noise)

    x = restored.clone().requires_grad_(True)
    with loss_fn.timings() as timer:
        start = time.perf_counter()
        loss = loss_fn(x, gt, t=T, noise=noise)
        forward_wall = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        (F.mse_loss(x, gt) + loss).backward()
        backward_wall = (time.perf_counter() - start) * 1e3
        with torch.no_grad():
            loss_fn(restored, gt, t=T, noise=noise)  # a forward without backward
    outside = loss_fn(x, gt, t=T, noise=noise)  # not timed
    outside.backward()

    assert timer.calls == 2
    first, second = timer.records
    assert 0 < first.forward_ms <= forward_wall
    assert 0 < first.backward_ms <= backward_wall
    assert second.forward_ms > 0 and second.backward_ms is None
    assert timer.forward_ms == pytest.approx(first.forward_ms + second.forward_ms)
    assert timer.backward_ms == pytest.approx(first.backward_ms)
    mse_grad = 2 * (restored - gt) / restored.numel()
    torch.testing.assert_close(x.grad, 2 * want_grad + mse_grad)  # two backwards summed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_with_grad_scaler(tiny_unet):
    """The CUDA AMP recipe: fp16 autocast and a GradScaler around a loss computing in bf16 (or
    fp16): the unscaled gradient equals the one computed without autocast and scaler."""
    loss_fn = dl.DiffLoss(tiny_unet, natural_weight=1.0, semantic_weight=0.1)
    net = nn.Conv2d(3, 3, 3, padding=1).cuda()
    restored_in, gt, noise = (v.cuda() for v in batch(4))
    t = T.cuda()

    def grads(amp: bool):
        net.zero_grad()
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = (restored_in + 0.1 * net(restored_in)).clamp(0, 1)
            loss = F.mse_loss(out.float(), gt) + loss_fn(out, gt, t=t, noise=noise)
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(net.parameters(), lr=0.0)) if amp else None
        return net.weight.grad.clone()

    want, got = grads(False), grads(True)
    assert torch.isfinite(got).all()
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
