"""DiffLoss with the fused kernels of the prior's ops (GroupNorm + SiLU, residual sums, 2x
resampling) against the plain reference, and how ``fused_kernels`` is chosen.

The kernels themselves are compared with their twin, in every dtype and layout, in
test_group_norm_silu.py; here the whole loss is, once (each interpreted launch costs seconds
on the CPU), so that every norm of the prior (plain, FiLM'd, the output norm) is wired right.
"""
import pytest
import torch

import diffloss_fast as dl
from diffloss_fast import ops
from diffloss_fast.ops.group_norm_silu import group_norm_silu_triton
from diffloss_fast.ops.noising import q_sample_pair_triton
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
        dl.DiffLoss(micro_unet, fused_kernels=True, channels_last=True, backend="torch", **kw),
        *data)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name in ("natural", "semantic"):
        torch.testing.assert_close(terms[name], want_terms[name], rtol=1e-5, atol=0)
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5


def test_refused_with_compile_nchw_and_without_triton(micro_unet, monkeypatch):
    with pytest.raises(ValueError, match="eager path"):
        dl.DiffLoss(micro_unet, fused_kernels=True, compile=True)
    with pytest.raises(ValueError, match="reads channels_last"):
        dl.DiffLoss(micro_unet, fused_kernels=True, channels_last=False)
    for bad in ("yes", 1, None):
        for name in ("fused_kernels", "fused_norm"):
            with pytest.raises(ValueError, match="True, False or 'auto'"):
                dl.DiffLoss(micro_unet, **{name: bad})
    monkeypatch.setattr(ops, "triton_available", lambda device: False)
    fn = dl.DiffLoss(randomized_unet(MICRO), fused_kernels=True, precision="fp32")
    x, y, t, noise = (v.cpu() for v in batch())
    with pytest.raises(ValueError, match="needs Triton"):
        fn(x, y, t=t, noise=noise)
    fn = dl.DiffLoss(randomized_unet(MICRO).double(), fused_kernels=True, precision="fp32")
    monkeypatch.setattr(ops, "triton_available", lambda device: True)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        fn(x.double(), y.double(), t=t, noise=noise.double())


def test_fused_norm_is_an_alias(micro_unet):
    """The option's first name sets it; given beside the new name, it is refused."""
    for value in (True, False, "auto"):
        assert dl.DiffLoss(micro_unet, fused_norm=value).fused_kernels == value
    with pytest.raises(ValueError, match="not both"):
        dl.DiffLoss(micro_unet, fused_kernels=False, fused_norm=True)
    with pytest.raises(ValueError, match="eager path"):
        dl.DiffLoss(micro_unet, fused_norm=True, compile=True)


def test_with_checkpointing_matches_reference(micro_unet, true_fp32):
    """Activation checkpointing recomputes the restored branch in the backward pass, fused
    norms (and their passed-on inputs) included; the semantic term alone, so that the encoder
    and middle block (ResBlocks and attention) run without the decoder's interpreted
    launches."""
    kw = dict(natural_weight=0.0, semantic_weight=1.0, precision="fp32")
    data = batch(seed=9)
    want, want_grad, _ = loss_and_grad(dl.ReferenceDiffLoss(micro_unet, **kw), *data)
    got, grad, _ = loss_and_grad(
        dl.DiffLoss(micro_unet, fused_kernels=True, channels_last=True, checkpoint=True,
                    backend="torch", **kw), *data)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5


def test_auto_fuses_eager_cuda_steps_only(micro_unet, monkeypatch):
    """The default: the fused kernels where Triton builds them (CUDA) on an eager step, in
    fp32/bf16/fp16, with channels_last activations; never on the CPU (where they would run
    interpreted), never compiled, never in fp64, never with channels_last=False; True and
    False are kept as given. One plan per device and dtype, made once."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(ops, "triton_available", lambda device: True)
    auto = dl.DiffLoss(micro_unet)
    assert auto.fused_kernels == "auto"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        plan = auto._plan(cuda, dtype)
        assert plan.fused is True and plan.norm_silu is group_norm_silu_triton
        assert plan.q_sample_pair is q_sample_pair_triton  # backend="auto" on CUDA
        assert auto._channels_last(cuda, dtype) is True
        assert auto._plan(cuda, dtype) is plan
    assert auto._plan(cuda, torch.float64).fused is False
    assert auto._plan(cpu, torch.float32).fused is False
    assert auto._channels_last(cpu, torch.float32) is False
    assert dl.DiffLoss(micro_unet, compile=True)._plan(cuda, torch.bfloat16).fused is False
    assert dl.DiffLoss(micro_unet, channels_last=False)._plan(cuda, torch.bfloat16).fused is False
    assert dl.DiffLoss(micro_unet, fused_kernels=False)._plan(cuda, torch.bfloat16).fused is False
    fused_cpu = dl.DiffLoss(micro_unet, fused_kernels=True)
    assert fused_cpu._plan(cpu, torch.float32).fused is True
    assert fused_cpu._channels_last(cpu, torch.float32) is True  # wherever the kernels run
    monkeypatch.setattr(ops, "triton_available", lambda device: False)
    assert dl.DiffLoss(micro_unet)._plan(cuda, torch.bfloat16).fused is False
