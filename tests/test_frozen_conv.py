"""frozen_conv2d against autograd's own convolution, and what it keeps for the backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffloss_fast import DiffLoss, build_prior
from diffloss_fast.ops.frozen_conv import frozen_conv2d


def frozen(conv: nn.Conv2d, dtype) -> nn.Conv2d:
    conv = conv.to(dtype)
    conv.requires_grad_(False)
    return conv


CONVS = {  # the prior's kinds: 3x3, the strided 3x3 of Downsample, the 1x1 skip
    "3x3": lambda: nn.Conv2d(8, 16, 3, padding=1),
    "3x3 stride 2": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1),
    "1x1": lambda: nn.Conv2d(8, 4, 1),
}


@pytest.mark.parametrize("kind", CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("size", [10, 11])  # odd: the strided convolution drops a row
def test_matches_autograd_convolution(kind, channels_last, dtype, tol, size):
    torch.manual_seed(0)
    conv = frozen(CONVS[kind](), dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, size, size, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    y = frozen_conv2d(conv, x)
    ref_x = x.detach().double().requires_grad_()
    ref = F.conv2d(ref_x, conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)
    dy = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(y, x, dy.to(dtype))
    ref.backward(dy)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_x.grad, rtol=tol, atol=tol)
    cosine = F.cosine_similarity(grad.double().flatten(), ref_x.grad.flatten(), dim=0)
    assert cosine > 0.9999


@pytest.mark.parametrize("kind", CONVS)
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_channels_last_input_gets_a_channels_last_gradient(kind, weight_layout):
    """The backward has no input to take the layout from, only the weight; a 1x1 weight is
    contiguous in both layouts, so its gradient came back NCHW. A gradient in the other layout
    than the activations costs a transposing copy or a strided add at every use."""
    torch.manual_seed(1)
    conv = frozen(CONVS[kind](), torch.float32)
    if weight_layout == "channels_last":
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    ref = F.conv2d(ref_x, conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)
    dy = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(frozen_conv2d(conv, x), x, dy.float())
    (ref_grad,) = torch.autograd.grad(ref, ref_x, dy)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


def test_double_precision_gradient_passes_gradcheck():
    conv = frozen(nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.float64)
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: frozen_conv2d(conv, x), (x,))


def test_keeps_only_the_weight_for_the_backward():
    conv = frozen(nn.Conv2d(8, 8, 3, padding=1), torch.float32)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        frozen_conv2d(conv, x)
    assert len(kept) == 1 and kept[0] is conv.weight
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        conv(x)  # autograd's convolution keeps its input too
    assert any(t is x for t in kept[1:])


def test_without_grad_it_is_a_plain_convolution():
    conv = frozen(nn.Conv2d(8, 8, 3, padding=1), torch.float32)
    x = torch.randn(2, 8, 6, 6)
    y = frozen_conv2d(conv, x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, conv(x))


@pytest.mark.parametrize("grad", [False, True])
def test_bias_left_out_for_a_later_kernel(grad):
    """``bias=False``: the convolution without its bias, with or without autograd; the
    gradient is the same, since the bias only shifts the output."""
    conv = frozen(nn.Conv2d(8, 8, 3, padding=1), torch.float32)
    x = torch.randn(2, 8, 6, 6, requires_grad=grad)
    y = frozen_conv2d(conv, x, bias=False)
    want = F.conv2d(x, conv.weight, None, padding=1)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(y + conv.bias[:, None, None], conv(x))
    if grad:
        dy = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                                   torch.autograd.grad(conv(x), x, dy)[0])


def test_refuses_a_trainable_or_padded_by_name_convolution():
    with pytest.raises(ValueError, match="must not require grad"):
        frozen_conv2d(nn.Conv2d(2, 2, 3), torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="numeric zero padding"):
        frozen_conv2d(frozen(nn.Conv2d(2, 2, 3, padding="same"), torch.float32),
                      torch.randn(1, 2, 5, 5))


def test_the_restored_branch_keeps_no_convolution_input():
    loss_fn = DiffLoss(build_prior("tiny"), precision="fp32")
    net = loss_fn._net(torch.device("cpu"), torch.float32, decoder=True)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    eps, h = net(x, torch.tensor([10]))
    kinds, stack, seen = set(), [eps.grad_fn, h.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    assert "ConvolutionBackward0" not in kinds
    assert any("FrozenConv2d" in k for k in kinds)


@pytest.mark.parametrize("kind", CONVS)
def test_backward_copies_nothing(kind):
    """The input's gradient comes straight from the dgrad: ATen's convolution backward, handed
    no real input, copied a stand-in the input's size first (41 ms of an H200 step)."""
    from torch.profiler import ProfilerActivity, profile

    conv = frozen(CONVS[kind](), torch.float32)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    y = frozen_conv2d(conv, x.requires_grad_())
    dy = torch.randn_like(y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(y, x, dy)
    names = {event.name for event in prof.events()}
    assert "aten::copy_" not in names and "aten::contiguous" not in names, sorted(names)
