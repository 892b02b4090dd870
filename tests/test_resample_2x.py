"""The 2x resampling ops against autograd's own pooling and upsampling.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F

from diffloss_fast.ops.resample_2x import (avg_pool_2x2, avg_pool_2x2_triton, upsample_2x_torch,
                                           upsample_2x_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_matches_autograd_pooling(layout, dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 12, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    ref = F.avg_pool2d(ref_x, 2)
    dy = torch.randn_like(ref)
    y = avg_pool_2x2(x)
    (grad,) = torch.autograd.grad(y, x, dy.to(dtype))
    (ref_grad,) = torch.autograd.grad(ref, ref_x, dy)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)
    assert grad.is_contiguous(memory_format=layout)


def test_odd_sizes_drop_the_last_row_and_column_like_the_plain_op():
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    y, ref = avg_pool_2x2(x), F.avg_pool2d(ref_x, 2)
    dy = torch.randn_like(ref)
    y.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert x.grad[..., -1, :].abs().sum() == 0


def test_keeps_nothing_of_its_input_for_the_backward():
    saved = []
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        avg_pool_2x2(x).sum().backward()
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.avg_pool2d(x, 2).sum()
    assert saved, "the plain op should keep its input, or this test checks nothing"


def test_double_precision_gradcheck():
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))


# --- the Triton kernels ------------------------------------------------------------------------

OPS = {"pool": (avg_pool_2x2_triton, lambda x: F.avg_pool2d(x, 2)),
       "upsample": (upsample_2x_triton, lambda x: F.interpolate(x, scale_factor=2,
                                                                 mode="nearest"))}


def layout(t, name):
    if name == "cl":
        return t.contiguous(memory_format=CL)
    if name == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def pool_and_grad(fn, x, dy):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("x_layout", ["nchw", "cl", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 16, 10, 14)], ids=str)
def test_triton_fp32_matches_autograd(op, x_layout, shape):
    """Forward and gradient against PyTorch's ops and their autograd, in each layout; outputs
    and gradients dense in the input's layout (NCHW for a strided one)."""
    fn, ref_fn = OPS[op]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = layout(torch.randn(shape, generator=gen, device=DEVICE), x_layout)
    y_ref = ref_fn(x)
    dy = torch.randn(y_ref.shape, generator=gen, device=DEVICE)
    y, dx = pool_and_grad(fn, x, dy)
    y_ref, dx_ref = pool_and_grad(ref_fn, x, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    fmt = CL if x_layout == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("op", OPS)
def test_triton_gradient_in_another_layout(op):
    """A gradient that arrives in another layout (or strided) gives the same input gradient,
    in the input's layout."""
    fn, ref_fn = OPS[op]
    x = torch.randn(2, 8, 6, 8, device=DEVICE).contiguous(memory_format=CL)
    dy = layout(torch.randn(ref_fn(x).shape, device=DEVICE), "strided")
    _, dx = pool_and_grad(fn, x, dy)
    _, dx_ref = pool_and_grad(ref_fn, x, dy.contiguous())
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    assert dx.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_precision_against_fp64(op, dtype):
    fn, ref_fn = OPS[op]
    x = torch.randn(2, 8, 6, 8, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    dy = torch.randn(ref_fn(x).shape, device=DEVICE).to(dtype)
    y, dx = pool_and_grad(fn, x, dy)
    y64, dx64 = pool_and_grad(ref_fn, x.double(), dy.double())
    y, y64 = y.detach(), y64.detach()
    assert y.dtype == dx.dtype == dtype
    rel = lambda a, e: float((a.double() - e).norm() / e.norm())  # noqa: E731
    assert rel(y, y64) < 1e-2 and rel(dx, dx64) < 1e-2


@pytest.mark.parametrize("op", OPS)
def test_triton_keeps_nothing_for_the_backward_and_nothing_without_autograd(op):
    fn, ref_fn = OPS[op]
    saved = []
    x = torch.randn(2, 4, 8, 8, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x).sum().backward()
    assert saved == []
    with torch.no_grad():
        y = fn(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ref_fn(x.detach()))


def test_triton_pooling_of_odd_sizes_takes_the_plain_op():
    x = torch.randn(1, 2, 7, 9, device=DEVICE, requires_grad=True)
    y = avg_pool_2x2_triton(x)
    y.sum().backward()
    torch.testing.assert_close(y, F.avg_pool2d(x.detach(), 2))
    assert x.grad[..., -1, :].abs().sum() == 0


def test_upsample_twin_is_pytorchs_nearest_upsampling():
    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(upsample_2x_torch(x),
                               x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_triton_bad_inputs():
    with pytest.raises(ValueError, match="4-D"):
        avg_pool_2x2_triton(torch.randn(3, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        upsample_2x_triton(torch.randn(1, 1, 2, 2, dtype=torch.float64, device=DEVICE))
