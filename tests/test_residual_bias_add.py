"""The fused residual sum with a per-channel bias against its plain-PyTorch twin.

On the CPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F

from diffloss_fast.ops.residual_bias_add import residual_bias_add_torch, residual_bias_add_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last
# 2 x 3 x 5 x 7 = 210 elements (under one block); 2 x 16 x 20 x 20 = 12800 (several blocks,
# the last one partial)
SHAPES = [(2, 3, 5, 7), (2, 16, 20, 20)]


def inputs(shape, dtype=torch.float32, x_format=torch.contiguous_format,
           y_format=torch.contiguous_format):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x, y = (torch.randn(shape, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    bias = torch.randn(shape[1], generator=gen, device=DEVICE).to(dtype)
    return x.contiguous(memory_format=x_format), y.contiguous(memory_format=y_format), bias


def run(fn, x, y, bias, grad):
    x, y = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
    out = fn(x, y, bias)
    dx, dy = torch.autograd.grad(out, (x, y), grad)
    return out, dx, dy


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("formats", [(torch.contiguous_format,) * 2, (CL, CL),
                                     (CL, torch.contiguous_format)], ids=["nchw", "cl", "mixed"])
def test_fp32_matches_twin(shape, formats):
    x, y, bias = inputs(shape, torch.float32, *formats)
    grad = torch.randn(shape, device=DEVICE)
    out, dx, dy = run(residual_bias_add_triton, x, y, bias, grad)
    want, want_dx, want_dy = run(residual_bias_add_torch, x, y, bias, grad)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(dx, grad) and torch.equal(dy, grad)  # the sum's gradient, unchanged
    assert torch.equal(want_dx, grad) and torch.equal(want_dy, grad)
    assert out.stride() == x.stride()  # x's memory format


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_rounds_once(dtype):
    """Summed in fp32 and rounded once: on CUDA at least as close to the fp64 sum as the
    twin's two rounded adds. Triton's interpreter truncates casts to bf16 instead of rounding
    them (up to twice the error of one rounding), so on the CPU it may be up to twice as far."""
    x, y, bias = inputs(SHAPES[1], dtype, CL, CL)
    with torch.no_grad():
        out = residual_bias_add_triton(x, y, bias)
        exact = residual_bias_add_torch(x.double(), y.double(), bias.double())
        twin = residual_bias_add_torch(x, y, bias)
    err = lambda t: float((t.double() - exact).norm() / exact.norm())  # noqa: E731
    assert out.dtype == dtype
    assert err(out) <= (1 if DEVICE == "cuda" else 2) * err(twin) + 1e-6
    assert err(out) < 1e-2


def test_only_the_inputs_that_ask_get_a_gradient():
    x, y, bias = inputs(SHAPES[0])
    y = y.requires_grad_(True)
    out = residual_bias_add_triton(x, y, bias)
    (dy,) = torch.autograd.grad(out.sum(), y)
    assert torch.equal(dy, torch.ones_like(y)) and x.grad is None


def test_without_autograd_keeps_no_graph():
    x, y, bias = inputs(SHAPES[0])
    with torch.no_grad():
        out = residual_bias_add_triton(x.requires_grad_(True), y, bias)
    assert out.grad_fn is None
    torch.testing.assert_close(out, x.detach() + y + bias[:, None, None])


def test_a_resblock_sum_with_the_biases_left_out_of_its_convolutions():
    """How the prior uses it: conv(h) + skip_conv(x) with both biases added by the kernel
    equals the two biased convolutions summed."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen, device=DEVICE)
    h = torch.randn(2, 8, 6, 6, generator=gen, device=DEVICE)
    w, b = torch.randn(8, 8, 3, 3, generator=gen, device=DEVICE), torch.randn(8, device=DEVICE)
    ws, bs = torch.randn(8, 4, 1, 1, generator=gen, device=DEVICE), torch.randn(8, device=DEVICE)
    want = F.conv2d(x, ws, bs) + F.conv2d(h, w, b, padding=1)
    got = residual_bias_add_triton(F.conv2d(x, ws), F.conv2d(h, w, padding=1), b + bs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x, y, bias = inputs(SHAPES[0])
    with pytest.raises(ValueError, match="one shape"):
        residual_bias_add_triton(x, y[:, :2], bias)
    with pytest.raises(ValueError, match="4-D"):
        residual_bias_add_triton(x[0], y[0], bias)
    with pytest.raises(ValueError, match="share one of"):
        residual_bias_add_triton(x, y.double(), bias)
    with pytest.raises(ValueError, match="one value per channel"):
        residual_bias_add_triton(x, y, bias[:2])
    with pytest.raises(ValueError, match="frozen"):
        residual_bias_add_triton(x, y, bias.clone().requires_grad_(True))
