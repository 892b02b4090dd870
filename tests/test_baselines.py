"""The baselines a speedup is quoted against (tools/baselines.py), on the CPU with the tiny
prior: each computes what its name says, and the semantic ones never run the decoder."""
import copy
import warnings

import pytest
import torch

from diffloss_fast import ReferenceDiffLoss
from diffloss_fast.tools import baselines
from diffloss_fast.tools.harness import make_loss
from random_unets import TINY, randomized_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.script_util import create_model

CPU = torch.device("cpu")


def inputs(seed=0, batch=2, size=16):
    gen = torch.Generator().manual_seed(seed)
    restored = torch.rand(batch, 3, size, size, generator=gen)
    gt = (restored + 0.1 * torch.randn(restored.shape, generator=gen)).clamp(0, 1)
    return restored, gt, torch.tensor([30, 700]), torch.randn(restored.shape, generator=gen)


def loss_and_grad(loss_fn, restored, gt, t, noise):
    x = restored.clone().requires_grad_(True)
    loss = loss_fn(x, gt, t=t, noise=noise)
    loss.backward()
    return loss.detach(), x.grad


def count_decoder_calls(prior):
    """A list that grows by one each time the decoder's first block or the output layer runs
    (the hooks survive a deep copy of the prior)."""
    calls = []
    for module in (prior.output_blocks[0], prior.out):
        module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_semantic_baseline_is_the_reference_semantic_term_without_the_decoder(tiny_unet):
    prior = copy.deepcopy(tiny_unet)
    x = inputs()
    ref = ReferenceDiffLoss(prior, natural_weight=0.0, semantic_weight=1.0)
    want, want_grad = loss_and_grad(ref, *x)
    calls = count_decoder_calls(prior)
    semantic = baselines.UpstreamLoss(prior, natural_weight=0.0, semantic_weight=1.0)
    got, grad = loss_and_grad(semantic, *x)
    assert not calls  # the encoder and middle block only
    assert want > 0 and torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-12)
    assert semantic.last_terms["natural"] is None
    assert torch.equal(semantic.last_terms["semantic"], got)


def test_upstream_loss_with_the_decoder_is_the_reference(tiny_unet):
    x = inputs(1)
    weights = dict(natural_weight=1e-3, semantic_weight=1e-6)
    ref = ReferenceDiffLoss(tiny_unet, **weights)
    want, want_grad = loss_and_grad(ref, *x)
    up = baselines.UpstreamLoss(tiny_unet, **weights)
    got, grad = loss_and_grad(up, *x)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-14)
    for term in ("natural", "semantic"):
        assert torch.allclose(up.last_terms[term], ref.last_terms[term], rtol=1e-6)


def test_fp16_torso_is_guided_diffusions_use_fp16_model(tiny_unet):
    """Against upstream's own flags: create_model(use_fp16=True) then convert_to_fp16(), as its
    sampling scripts do, with the same weights."""
    torso = baselines.fp16_torso(tiny_unet)
    upstream = create_model(**TINY, use_fp16=True)
    upstream.load_state_dict(tiny_unet.state_dict())
    upstream.convert_to_fp16()
    upstream.eval()
    x, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([5, 500])
    with torch.no_grad():
        got, want = torso(x, t), upstream(x, t)
    assert torso.dtype == upstream.dtype == torch.float16
    assert torch.equal(got, want)
    assert tiny_unet.dtype == torch.float32  # the prior itself is left alone
    assert all(p.dtype == torch.float32 for p in tiny_unet.parameters())
    assert torso.input_blocks[0][0].weight.dtype == torch.float16
    assert torso.out[2].weight.dtype == torch.float32  # upstream keeps the output layer in fp32


@pytest.mark.parametrize("terms", ["both", "semantic"])
def test_fp16_baseline_stays_close_to_fp32(tiny_unet, terms):
    x = inputs(2)
    fp32, _ = loss_and_grad(make_loss(tiny_unet, "reference-fp32", terms, precision="fp32",
                                      backend="torch"), *x)
    fp16, _ = loss_and_grad(make_loss(tiny_unet, "upstream-fp16", terms, precision="fp32",
                                      backend="torch"), *x)
    assert fp16 != fp32 and fp16 == pytest.approx(fp32.item(), rel=0.05)


@pytest.mark.parametrize("name", ["reference-fp32", "reference-tf32", "reference-bf16",
                                  "upstream-fp16"])
def test_every_semantic_baseline_skips_the_decoder(name):
    prior = randomized_unet()
    calls = count_decoder_calls(prior)
    loss_fn = make_loss(prior, name, "semantic", precision="fp32", backend="torch")
    loss_and_grad(loss_fn, *inputs())
    assert not calls
    both = make_loss(prior, name, "both", precision="fp32", backend="torch")
    loss_and_grad(both, *inputs())
    assert len(calls) == 2 * 2  # both branches, through the decoder and the output layer


def test_bf16_baselines_compute_in_bf16(tiny_unet):
    seen = []
    prior = copy.deepcopy(tiny_unet)
    prior.middle_block.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    for terms in ("both", "semantic"):
        loss_and_grad(make_loss(prior, "reference-bf16", terms, precision="fp32",
                                backend="torch"), *inputs())
    assert seen == [torch.bfloat16] * 4


def test_reference_compiled_is_reference_bf16_handed_to_torch_compile(tiny_unet, monkeypatch):
    """torch.compile itself takes minutes on a CPU: what it is given, and that the loss around
    it is reference-bf16's, is checked with a compiler that returns its function unchanged."""
    compiled = []

    def compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn
    monkeypatch.setattr(baselines.torch, "compile", compile)
    x = inputs(3)
    for terms in ("both", "semantic"):
        got, grad = loss_and_grad(make_loss(tiny_unet, "reference-compiled", terms,
                                            precision="fp32", backend="torch"), *x)
        want, want_grad = loss_and_grad(make_loss(tiny_unet, "reference-bf16", terms,
                                                  precision="fp32", backend="torch"), *x)
        assert torch.allclose(got, want, rtol=1e-3) and torch.allclose(grad, want_grad,
                                                                        rtol=1e-2, atol=1e-9)
    assert compiled == [{"dynamic": False}] * 2


def test_numerics_sets_tf32_for_the_block_only():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = True, False  # neither strict nor PyTorch's default
        with baselines.numerics("reference-fp32"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, False)
        with pytest.raises(RuntimeError), baselines.numerics("reference-tf32"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
            raise RuntimeError("a failing step")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, False)
        for other in ("reference-bf16", "upstream-fp16", "fast"):
            with baselines.numerics(other):
                assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, False)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_names():
    assert baselines.canonical("reference") == "reference-fp32"
    assert baselines.canonical("fast") == "fast"
    assert set(baselines.PRECISIONS) == set(baselines.BASELINES)
    assert baselines.unsupported("upstream-fp16", CPU)
    assert baselines.unsupported("upstream-fp16", torch.device("cuda")) is None
    assert all(baselines.unsupported(n, CPU) is None for n in baselines.BASELINES
               if n != "upstream-fp16")
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.make_baseline(randomized_unet(), "fast", natural_weight=1.0,
                                semantic_weight=1.0)
