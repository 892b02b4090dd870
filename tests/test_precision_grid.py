"""Reduced precision keeps the loss (DESIGN.md section 3): over restorations close to their
target (delta RMS 0.3, 0.05, 0.01) and timesteps 50/300/600/950, each term and both together
stay within 2% of the fp32 loss with input-gradient cosine >= 0.995, in bf16 and fp16.

bf16 runs on an ADM-shaped prior (128 channels, channel_mult 1,2,3,4, attention at 16 and 8,
random weights scaled by 1/sqrt(fan_in)) at 2x3x64x64. fp16 runs on the tiny prior: the CPU
has no fast fp16 convolutions (one ADM-shaped step takes minutes there); the GPU verify run
covers fp16 at ADM-256 (``diffloss-fast check-precision``).
"""
import pytest
import torch

import diffloss_fast as dl
from random_unets import TINY, randomized_unet

ADM_SHAPED = dict(TINY, image_size=64, num_channels=128, channel_mult="1,2,3,4",
                  attention_resolutions="16,8", num_head_channels=64)
DELTAS = (0.3, 0.05, 0.01)
TIMESTEPS = (50, 300, 600, 950)
TERMS = {"natural": (1.0, 0.0), "semantic": (0.0, 1.0), "both": (1e-3, 1e-6)}


def cell_inputs(delta, t, size, seed):
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, size, size, generator=gen) * 0.8 + 0.1
    restored = gt + delta * torch.randn(2, 3, size, size, generator=gen)
    return restored, gt, torch.tensor([t, t]), torch.randn(2, 3, size, size, generator=gen)


def loss_and_grad(prior, precision, weights, inputs):
    loss_fn = dl.DiffLoss(prior, precision=precision, natural_weight=weights[0],
                          semantic_weight=weights[1], check_range=False)
    restored, gt, t, noise = inputs
    x = restored.clone().requires_grad_(True)
    loss = loss_fn(x, gt, t=t, noise=noise)
    loss.backward()
    return float(loss.detach()), x.grad.flatten()


def cosine(x, y):
    """Cosine similarity of two gradients, however small (F.cosine_similarity clamps the
    product of the norms at 1e-8, which DiffLoss's gradients at high t fall far below)."""
    x, y = x.double(), y.double()
    return float(x @ y / (x.norm() * y.norm()))


def grid(prior, precision, size):
    """Every cell's (relative loss error, gradient cosine) against fp32, and the failures."""
    rows, failures = [], []
    for i, delta in enumerate(DELTAS):
        for j, t in enumerate(TIMESTEPS):
            inputs = cell_inputs(delta, t, size, seed=10 * i + j)
            for term, weights in TERMS.items():
                want, want_grad = loss_and_grad(prior, "fp32", weights, inputs)
                got, grad = loss_and_grad(prior, precision, weights, inputs)
                err = abs(got - want) / want
                cos = cosine(grad, want_grad)
                rows.append(f"delta {delta} t {t} {term}: loss error {err:.2e}, cosine {cos:.5f}")
                if not (err <= 0.02 and cos >= 0.995):
                    failures.append(rows[-1])
    return rows, failures


@pytest.mark.parametrize("precision, config, size", [
    ("bf16", ADM_SHAPED, 64),
    ("fp16", TINY, 32),
], ids=["bf16-adm-shaped", "fp16-tiny"])
def test_reduced_precision_keeps_the_loss(precision, config, size):
    prior = randomized_unet(config)
    rows, failures = grid(prior, precision, size)
    assert not failures, "\n".join(failures)
    assert len(rows) == len(DELTAS) * len(TIMESTEPS) * len(TERMS)
