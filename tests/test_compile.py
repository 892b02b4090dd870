"""torch.compile of the truncated prior gives the eager result (one test: compiling is slow)."""
import pytest
import torch

import diffloss_fast as dl
from random_unets import MICRO, randomized_unet


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, "regional"])
def test_compiled_matches_eager(compile):
    unet = randomized_unet(MICRO)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)
    t, noise = torch.tensor([0, 999]), torch.randn(2, 3, 16, 16, generator=gen)
    results = []
    for mode in (False, compile):
        xr = x.clone().requires_grad_(True)
        loss = dl.DiffLoss(unet, precision="fp32", compile=mode)(xr, y, t=t, noise=noise)
        loss.backward()
        results.append((loss.detach(), xr.grad))
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert torch.allclose(compiled, eager, rtol=1e-4)
    assert float((compiled_grad - eager_grad).norm() / eager_grad.norm()) < 1e-4
