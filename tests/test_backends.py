"""DiffLoss gives the same loss and gradient with every fused-op backend."""
import pytest
import torch

import diffloss_fast as dl
from diffloss_fast import ops


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("target", ["eps", "x_prev"])
def test_backend_matches_torch(tiny_unet, backend, target):
    if backend == "triton" and not ops.triton_available("cpu"):
        pytest.skip("triton is not installed")
    if backend == "native":
        from diffloss_fast.ops.native import native_available
        if not native_available():
            pytest.skip("the native extension cannot be built here")
    gen = torch.Generator().manual_seed(11)
    x, y = torch.rand(2, 3, 32, 40, generator=gen), torch.rand(2, 3, 32, 40, generator=gen)
    t, noise = torch.tensor([0, 999]), torch.randn(2, 3, 32, 40, generator=gen)
    out = {}
    for be in ("torch", backend):
        xr = x.clone().requires_grad_(True)
        fn = dl.DiffLoss(tiny_unet, precision="fp32", backend=be, target=target,
                         natural_weight=1.0, semantic_weight=0.5)
        loss = fn(xr, y, t=t, noise=noise)
        loss.backward()
        out[be] = (loss.detach(), xr.grad, fn.last_terms)
    (want, want_grad, want_terms), (got, grad, terms) = out["torch"], out[backend]
    assert torch.allclose(got, want, rtol=1e-5)
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-5
    for name in ("natural", "semantic"):
        assert torch.allclose(terms[name], want_terms[name], rtol=1e-5)


def test_auto_backend_on_cpu_is_torch():
    assert ops.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cudnn", "cpu")
