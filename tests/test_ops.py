"""The Triton kernels of the fused ops against their plain-PyTorch twins (the definitions).

On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small.
"""
import importlib

import pytest
import torch

from diffloss_fast import ops
from diffloss_fast.ops.noising import q_sample_pair_torch, q_sample_pair_triton
from diffloss_fast.ops.weighted_l2 import weighted_l2_torch, weighted_l2_triton

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = [(2, 3, 17, 23), (3, 5, 7, 9)]  # C*H*W = 1173 (two blocks, masked tail) and 315
LAYOUTS = ["nchw", "cl", "strided", "permuted"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(shape, dtype=torch.float32, layout="nchw", requires_grad=False):
    """A random tensor of logical ``shape`` in the given memory layout (never a copy later)."""
    B, C, H, W = shape
    if layout == "nchw":
        t = torch.randn(shape, device=DEVICE, dtype=dtype)
    elif layout == "cl":
        t = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view: every other column
        t = torch.randn(B, C, H, 2 * W + 1, device=DEVICE, dtype=dtype)[..., 1::2]
    elif layout == "permuted":  # NHCW in memory
        t = torch.randn(B, H, C, W, device=DEVICE, dtype=dtype).permute(0, 2, 1, 3)
    else:
        raise AssertionError(layout)
    assert t.shape == shape
    return t.requires_grad_(requires_grad)


def close(actual, expected, dtype):
    """fp32: tight; half types: one rounding of the same fp32 value. atol is relative to the
    largest reference value, so small gradients (weight / numel) are compared as tightly."""
    assert actual.dtype == expected.dtype
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-3)
    scale = max(expected.detach().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)


def _qs_inputs(shape, dtype, layout):
    B = shape[0]
    r = make(shape, dtype, layout, requires_grad=True)
    gt = make(shape, dtype, "cl" if layout == "nchw" else "nchw")  # layouts may differ
    noise = make(shape, dtype, layout)
    coef_s, coef_n = torch.rand(B, device=DEVICE) + 0.1, torch.rand(B, device=DEVICE) + 0.1
    return r, gt, noise, coef_s, coef_n


# ------------------------------------------------------------------------- q_sample_pair
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out_dtype", list(DTYPES))
@pytest.mark.parametrize("in_dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_q_sample_pair_matches_twin(layout, in_dtype, out_dtype, channels_last):
    in_dt, out_dt = DTYPES[in_dtype], DTYPES[out_dtype]
    shape = SHAPES[(len(in_dtype) + len(out_dtype) + channels_last) % 2]
    r, gt, noise, a, b = _qs_inputs(shape, in_dt, layout)
    kw = dict(scale=2.0, offset=-1.0, out_dtype=out_dt, channels_last=channels_last)
    res, gtt = q_sample_pair_triton(r, gt, noise, a, b, **kw)
    ref_res, ref_gt = q_sample_pair_torch(r, gt, noise, a, b, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for out, ref in ((res, ref_res), (gtt, ref_gt)):
        assert out.shape == shape and out.is_contiguous(memory_format=fmt)
        close(out, ref, out_dt)
    assert res.requires_grad and not gtt.requires_grad

    up = torch.randn(shape, device=DEVICE).to(out_dt)  # a random upstream gradient
    (g,) = torch.autograd.grad(res, r, up)
    (ref_g,) = torch.autograd.grad(ref_res, r, up)
    assert g.shape == r.shape and g.dtype == r.dtype
    assert g.stride() == torch.empty_like(r).stride()
    close(g, ref_g, in_dt)  # upstream grad is exact in fp32: one rounding to restored's dtype


@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_pair_mixed_layouts_and_range(shape):
    """Every input in another layout, noise broadcast over the batch (stride 0), (-1,1) range."""
    B = shape[0]
    r = make(shape, torch.float32, "permuted", requires_grad=True)
    gt = make(shape, torch.bfloat16, "strided")
    noise = torch.randn((1,) + shape[1:], device=DEVICE).expand(shape)
    a, b = torch.rand(B, device=DEVICE, dtype=torch.float64), torch.rand(B, device=DEVICE)
    kw = dict(scale=1.0, offset=0.0, out_dtype=torch.float32, channels_last=True)
    outs = q_sample_pair_triton(r, gt, noise, a, b, **kw)
    refs = q_sample_pair_torch(r, gt, noise, a.float(), b, **kw)
    for out, ref in zip(outs, refs):
        close(out, ref, torch.float32)
    up = torch.randn(shape, device=DEVICE)
    close(torch.autograd.grad(outs[0], r, up)[0], torch.autograd.grad(refs[0], r, up)[0],
          torch.float32)


def test_q_sample_pair_no_grad_paths():
    shape = SHAPES[1]
    r, gt, noise, a, b = _qs_inputs(shape, torch.float32, "nchw")
    kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32)
    ref = q_sample_pair_torch(r.detach(), gt, noise, a, b, **kw)
    out = q_sample_pair_triton(r.detach(), gt, noise, a, b, **kw)
    assert not out[0].requires_grad
    close(out[0], ref[0], torch.float32)
    with torch.no_grad():
        out = q_sample_pair_triton(r, gt, noise, a, b, **kw)
    assert not out[0].requires_grad
    close(out[0], ref[0], torch.float32)


def test_q_sample_pair_gt_and_noise_get_no_gradient():
    shape = SHAPES[1]
    r, gt, noise, a, b = _qs_inputs(shape, torch.float32, "nchw")
    gt.requires_grad_(True)
    noise.requires_grad_(True)
    a.requires_grad_(True)
    res, gtt = q_sample_pair_triton(r, gt, noise, a, b, scale=2.0, offset=-1.0,
                                    out_dtype=torch.float32)
    assert not gtt.requires_grad
    grads = torch.autograd.grad(res.sum(), (r, gt, noise), allow_unused=True)
    assert grads[1] is None and grads[2] is None
    # the upstream gradient of .sum() is an expanded (stride 0) tensor: strides are honoured
    close(grads[0], (2.0 * a.detach()).view(-1, 1, 1, 1).expand(shape), torch.float32)
    # restored without grad: nothing is differentiable even though gt and noise are
    res, gtt = q_sample_pair_triton(r.detach(), gt, noise, a, b, scale=2.0, offset=-1.0,
                                    out_dtype=torch.float32)
    assert not res.requires_grad and not gtt.requires_grad


def test_q_sample_pair_leaves_inputs_unchanged():
    shape = SHAPES[0]
    r, gt, noise, a, b = _qs_inputs(shape, torch.bfloat16, "cl")
    before = [t.detach().clone() for t in (r, gt, noise, a, b)]
    res, _ = q_sample_pair_triton(r, gt, noise, a, b, scale=2.0, offset=-1.0,
                                  out_dtype=torch.float16, channels_last=True)
    res.backward(torch.randn_like(res))
    for t, t0 in zip((r, gt, noise, a, b), before):
        assert torch.equal(t.detach(), t0) and t.stride() == t0.stride()


def test_q_sample_pair_dispatch():
    r, gt, noise, a, b = _qs_inputs(SHAPES[1], torch.float32, "nchw")
    kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32, channels_last=True)
    outs = ops.q_sample_pair(r, gt, noise, a, b, backend="triton", **kw)
    refs = ops.q_sample_pair(r, gt, noise, a, b, backend="torch", **kw)
    for out, ref in zip(outs, refs):
        close(out, ref, torch.float32)


def test_q_sample_pair_bad_input():
    shape = SHAPES[1]
    r, gt, noise, a, b = _qs_inputs(shape, torch.float32, "nchw")
    kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="gt"):
        q_sample_pair_triton(r, gt[:, :, 1:], noise, a, b, **kw)
    with pytest.raises(ValueError, match="noise"):
        q_sample_pair_triton(r, gt, noise[:1], a, b, **kw)
    with pytest.raises(ValueError, match="coef_signal"):
        q_sample_pair_triton(r, gt, noise, a[:1], b, **kw)
    with pytest.raises(ValueError, match="coef_noise"):
        q_sample_pair_triton(r, gt, noise, a, b.view(-1, 1), **kw)
    with pytest.raises(ValueError, match="4-D"):
        q_sample_pair_triton(r[0], gt[0], noise[0], a, b, **kw)
    with pytest.raises(ValueError, match="backend='torch'"):
        q_sample_pair_triton(r.double(), gt, noise, a, b, **kw)
    with pytest.raises(TypeError, match="float"):
        q_sample_pair_triton(r, gt.to(torch.int32), noise, a, b, **kw)
    with pytest.raises(ValueError, match="out_dtype"):
        q_sample_pair_triton(r, gt, noise, a, b, scale=2.0, offset=-1.0, out_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"q_sample_pair: the triton backend writes "
                                        r"float32/float16/bfloat16, got out_dtype=torch.int8$"):
        q_sample_pair_triton(r, gt, noise, a, b, scale=2.0, offset=-1.0, out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"q_sample_pair: noise is on meta, restored on cpu"):
        q_sample_pair_triton(r.cpu(), gt.cpu(), noise.to("meta"), a.cpu(), b.cpu(), **kw)
    with pytest.raises(TypeError, match="q_sample_pair: gt must be a tensor, got ndarray"):
        q_sample_pair_triton(r, gt.cpu().numpy(), noise, a, b, **kw)


# --------------------------------------------------------------------------- weighted_l2
def _wl2_inputs(shape, dtype, x_dtype, p_layout, x_layout, with_x):
    B = shape[0]
    p = make(shape, dtype, p_layout, requires_grad=True)
    q = make(shape, dtype, "cl" if p_layout == "nchw" else "nchw")
    w = torch.rand(B, device=DEVICE) + 0.1
    if not with_x:
        return p, q, w, None, None, None, None
    x = make(shape, x_dtype, x_layout, requires_grad=True)
    y = make(shape, x_dtype, x_layout)
    xc, pc = torch.rand(B, device=DEVICE) + 0.5, torch.rand(B, device=DEVICE) + 0.1
    return p, q, w, x, y, xc, pc


@pytest.mark.parametrize("with_x", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("cl", "nchw"), ("cl", "cl"),
                                     ("strided", "permuted")])
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_l2_matches_twin(shape, layouts, dtype, with_x):
    dt = DTYPES[dtype]
    x_dt = torch.float32 if dtype == "bf16" else dt  # images may stay fp32 beside half eps
    args = _wl2_inputs(shape, dt, x_dt, *layouts, with_x)
    loss = weighted_l2_triton(*args)
    ref = weighted_l2_torch(*args)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)

    go = torch.rand((), device=DEVICE) * 3 + 0.5  # grad_output != 1
    p, x = args[0], args[3]
    leaves = (p, x) if with_x else (p,)
    grads = torch.autograd.grad(loss, leaves, go)
    refs = torch.autograd.grad(ref, leaves, go)
    for leaf, g, r in zip(leaves, grads, refs):
        assert g.stride() == torch.empty_like(leaf).stride()
        close(g, r, leaf.dtype)


@pytest.mark.parametrize("with_x", [False, True])
def test_weighted_l2_semantic_shape_and_low_dims(with_x):
    """h-space shaped (B, 1024, 8, 8) in miniature, channels_last; and 2D/3D inputs."""
    args = _wl2_inputs((2, 64, 4, 4), torch.bfloat16, torch.float32, "cl", "nchw", with_x)
    torch.testing.assert_close(weighted_l2_triton(*args), weighted_l2_torch(*args),
                               rtol=1e-5, atol=1e-7)
    p = torch.randn(3, 7, 5, device=DEVICE, requires_grad=True)
    q, w = torch.randn(3, 7, 5, device=DEVICE), torch.rand(3, device=DEVICE)
    loss, ref = weighted_l2_triton(p, q, w), weighted_l2_torch(p, q, w)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    close(torch.autograd.grad(loss * 2, p)[0], torch.autograd.grad(ref * 2, p)[0],
          torch.float32)


def test_weighted_l2_only_x_requires_grad_and_no_grad():
    args = list(_wl2_inputs(SHAPES[1], torch.float32, torch.float32, "nchw", "cl", True))
    args[0] = args[0].detach()
    loss, ref = weighted_l2_triton(*args), weighted_l2_torch(*args)
    close(torch.autograd.grad(loss, args[3])[0], torch.autograd.grad(ref, args[3])[0],
          torch.float32)
    with torch.no_grad():
        loss = weighted_l2_triton(*args)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)


def test_weighted_l2_q_and_y_get_no_gradient():
    p, q, w, x, y, xc, pc = _wl2_inputs(SHAPES[1], torch.float32, torch.float32, "nchw",
                                        "nchw", True)
    q.requires_grad_(True)
    y.requires_grad_(True)
    loss = weighted_l2_triton(p, q, w, x, y, xc, pc)
    grads = torch.autograd.grad(loss, (p, q, x, y), allow_unused=True)
    assert grads[0] is not None and grads[2] is not None
    assert grads[1] is None and grads[3] is None
    assert not weighted_l2_triton(p.detach(), q, w).requires_grad


def test_weighted_l2_deterministic_and_inputs_unchanged():
    args = _wl2_inputs(SHAPES[0], torch.float16, torch.float16, "cl", "nchw", True)
    before = [t.detach().clone() for t in args]
    l1 = weighted_l2_triton(*args)
    l2 = weighted_l2_triton(*args)
    assert torch.equal(l1, l2)
    g1 = torch.autograd.grad(l1, (args[0], args[3]))
    g2 = torch.autograd.grad(l2, (args[0], args[3]))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    for t, t0 in zip(args, before):
        assert torch.equal(t.detach(), t0) and t.stride() == t0.stride()


def test_weighted_l2_dispatch():
    args = _wl2_inputs(SHAPES[1], torch.float32, torch.float32, "nchw", "nchw", True)
    torch.testing.assert_close(ops.weighted_l2(*args, backend="triton"),
                               ops.weighted_l2(*args, backend="torch"), rtol=1e-5, atol=1e-7)


def test_weighted_l2_bad_input():
    p, q, w, x, y, xc, pc = _wl2_inputs(SHAPES[1], torch.float32, torch.float32, "nchw",
                                        "nchw", True)
    with pytest.raises(ValueError, match="same shape"):
        weighted_l2_triton(p, q[:, 1:], w)
    with pytest.raises(ValueError, match="weight"):
        weighted_l2_triton(p, q, w[:1])
    with pytest.raises(ValueError, match="x needs"):
        weighted_l2_triton(p, q, w, x)
    with pytest.raises(ValueError, match="x and y"):
        weighted_l2_triton(p, q, w, x[:, 1:], y[:, 1:], xc, pc)
    with pytest.raises(ValueError, match="x_coef"):
        weighted_l2_triton(p, q, w, x, y, xc[:1], pc)
    with pytest.raises(ValueError, match="backend='torch'"):
        weighted_l2_triton(p.double(), q.double(), w)
    with pytest.raises(TypeError, match="float"):
        weighted_l2_triton(p, q.to(torch.int64), w)
    with pytest.raises(ValueError, match="4D"):
        weighted_l2_triton(p[None], q[None], torch.rand(1, device=DEVICE))


# ------------------------------------------------------------------------------- both
def test_int64_indexing_path(monkeypatch):
    """Tensors past 2^31 elements switch the kernels to int64 offsets: force that path here."""
    for mod in ("noising", "weighted_l2"):  # modules: ops.weighted_l2 is the dispatcher
        monkeypatch.setattr(importlib.import_module(f"diffloss_fast.ops.{mod}"), "needs_i64",
                            lambda *ts: True)
    r, gt, noise, a, b = _qs_inputs(SHAPES[0], torch.float32, "permuted")
    kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32, channels_last=True)
    res, _ = q_sample_pair_triton(r, gt, noise, a, b, **kw)
    ref, _ = q_sample_pair_torch(r, gt, noise, a, b, **kw)
    close(res, ref, torch.float32)
    up = torch.randn_like(res)
    close(torch.autograd.grad(res, r, up)[0], torch.autograd.grad(ref, r, up)[0], torch.float32)
    args = _wl2_inputs(SHAPES[0], torch.float32, torch.float32, "cl", "strided", True)
    loss, ref = weighted_l2_triton(*args), weighted_l2_torch(*args)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for g, gr in zip(torch.autograd.grad(loss, (args[0], args[3])),
                     torch.autograd.grad(ref, (args[0], args[3]))):
        close(g, gr, torch.float32)
