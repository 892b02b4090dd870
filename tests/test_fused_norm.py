"""DiffLoss with the fused GroupNorm + SiLU kernels against the plain reference.

The kernels themselves are compared with their twin, in every dtype and layout, in
test_group_norm_silu.py; here the whole loss is, once (each interpreted launch costs seconds
on the CPU), so that every norm of the prior (plain, FiLM'd, the output norm) is wired right.
"""
import pytest
import torch

import diffloss_fast as dl
from diffloss_fast import ops
from random_unets import MICRO, randomized_unet

pytestmark = pytest.mark.skipif(not ops.triton_available("cpu") and not torch.cuda.is_available(),
                                reason="the fused norms need Triton (or its interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def micro_unet():
    """Every interpreted kernel launch costs on the CPU: the smallest prior with all norms."""
    return randomized_unet(MICRO).to(DEVICE)


def batch(seed=5, size=8):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, size, size)
    x, y, noise = (torch.rand(shape, generator=gen), torch.rand(shape, generator=gen),
                   torch.randn(shape, generator=gen))
    return [v.to(DEVICE) for v in (x, y, torch.tensor([3, 870]), noise)]


def loss_and_grad(fn, x, y, t, noise):
    x = x.clone().requires_grad_(True)
    loss = fn(x, y, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, fn.last_terms


def test_fp32_matches_reference(micro_unet, true_fp32):
    """channels_last activations, the layout the fused kernels are for; both terms, with
    per-sample FiLM (two samples, two timesteps)."""
    kw = dict(natural_weight=1.0, semantic_weight=0.5, precision="fp32")
    data = batch()
    want, want_grad, want_terms = loss_and_grad(dl.ReferenceDiffLoss(micro_unet, **kw), *data)
    got, grad, terms = loss_and_grad(
        dl.DiffLoss(micro_unet, fused_norm=True, channels_last=True, backend="torch", **kw),
        *data)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name in ("natural", "semantic"):
        torch.testing.assert_close(terms[name], want_terms[name], rtol=1e-5, atol=0)
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5


def test_refused_with_compile_and_without_triton(micro_unet, monkeypatch):
    with pytest.raises(ValueError, match="eager path"):
        dl.DiffLoss(micro_unet, fused_norm=True, compile=True)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="True, False or 'auto'"):
            dl.DiffLoss(micro_unet, fused_norm=bad)
    monkeypatch.setattr(ops, "triton_available", lambda device: False)
    fn = dl.DiffLoss(randomized_unet(MICRO), fused_norm=True, precision="fp32")
    x, y, t, noise = (v.cpu() for v in batch())
    with pytest.raises(ValueError, match="needs Triton"):
        fn(x, y, t=t, noise=noise)


def test_with_checkpointing_matches_reference(micro_unet, true_fp32):
    """Activation checkpointing recomputes the restored branch in the backward pass, fused
    norms (and their passed-on inputs) included; the semantic term alone, so that the encoder
    and middle block (ResBlocks and attention) run without the decoder's interpreted
    launches."""
    kw = dict(natural_weight=0.0, semantic_weight=1.0, precision="fp32")
    data = batch(seed=9)
    want, want_grad, _ = loss_and_grad(dl.ReferenceDiffLoss(micro_unet, **kw), *data)
    got, grad, _ = loss_and_grad(
        dl.DiffLoss(micro_unet, fused_norm=True, channels_last=True, checkpoint=True,
                    backend="torch", **kw), *data)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5


def test_auto_fuses_eager_cuda_steps_only(micro_unet, monkeypatch):
    """The default: the fused kernels where Triton builds them (CUDA) on an eager step, in
    fp32/bf16/fp16; never on the CPU (where they would run interpreted), never compiled, never
    in fp64; True and False are kept as given."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(ops, "triton_available", lambda device: True)
    auto = dl.DiffLoss(micro_unet)
    assert auto.fused_norm == "auto"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert auto._fused_norm(cuda, dtype) is True
        assert auto._channels_last(cuda, dtype) is True
    assert auto._fused_norm(cuda, torch.float64) is False
    assert auto._fused_norm(cpu, torch.float32) is False
    assert auto._channels_last(cpu, torch.float32) is False
    assert dl.DiffLoss(micro_unet, compile=True)._fused_norm(cuda, torch.bfloat16) is False
    assert dl.DiffLoss(micro_unet, fused_norm=False)._fused_norm(cuda, torch.bfloat16) is False
    assert dl.DiffLoss(micro_unet, fused_norm=True)._fused_norm(cpu, torch.float32) is True
    monkeypatch.setattr(ops, "triton_available", lambda device: False)
    assert auto._fused_norm(cuda, torch.bfloat16) is False
