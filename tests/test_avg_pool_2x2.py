"""avg_pool_2x2 against autograd's own 2x2 average pooling."""
import pytest
import torch
import torch.nn.functional as F

from diffloss_fast.ops.avg_pool_2x2 import avg_pool_2x2


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
