"""backend="native": the C++ (CPU) / CUDA extension from csrc/ against the plain-PyTorch twins.

The first test that needs the extension builds it (a minute or two on 2 cores; later runs load
it from torch's extension cache). Parity tests run on the CPU, and on CUDA too where torch sees
a GPU (the CUDA kernels are compiled in when nvcc is found).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from diffloss_fast.ops import native, q_sample_pair, weighted_l2
from diffloss_fast.ops.native import q_sample_pair_native, weighted_l2_native
from diffloss_fast.ops.noising import q_sample_pair_torch
from diffloss_fast.ops.weighted_l2 import weighted_l2_torch

REPO = Path(__file__).resolve().parents[1]
PROBLEM = native.toolchain_problem()
needs_build = pytest.mark.skipif(
    PROBLEM is not None, reason=f"cannot build the native extension here: {PROBLEM}")

CUDA_HOME = torch.utils.cpp_extension.CUDA_HOME
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.skipif(
    CUDA_HOME is None, reason="torch sees a GPU but nvcc (CUDA_HOME) is missing: the native "
    "extension is built without its CUDA kernels"))] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(2, 3, 17, 23), (3, 5, 7, 9)]
# (rtol, atol) for tensors stored in each dtype
TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12),
       torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
# losses come back in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64)
LOSS_TOL = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-12, 1e-14),
            torch.float16: (1e-6, 1e-7), torch.bfloat16: (1e-6, 1e-7)}


@pytest.fixture(scope="module")
def ext():
    if PROBLEM is not None:
        pytest.skip(f"cannot build the native extension here: {PROBLEM}")
    module = native.load_extension()  # a build failure here is a test failure, not a skip
    assert native.native_available()
    if torch.cuda.is_available() and CUDA_HOME is not None and not module.with_cuda():
        pytest.fail(f"torch sees a GPU and nvcc is at {CUDA_HOME}, but the extension was "
                    "built without its CUDA kernels")
    return module


def close(actual, expected, dtype=None):
    rtol, atol = TOL[dtype or expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def layout(t, fmt):
    if fmt == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def sliced(t):
    """Same values as t, in a non-dense view (a slice of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., 1::2]
    view.copy_(t)
    return view


def randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def q_sample_case(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    g = torch.rand(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    n = randn(shape, dtype, device, gen)
    abar = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(device)
    return r, g, n, abar.sqrt(), (1 - abar).sqrt()


def run_q_sample(fn, r, g, n, cs, cn, upstream, **kw):
    r = r.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    xt_res, xt_gt = fn(r, g, n, cs, cn, **kw)
    xt_res.backward(upstream)
    return xt_res, xt_gt, r.grad


# ------------------------------------------------------------------------------------------------
# q_sample_pair

@needs_build
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_q_sample_pair_matches_twin(ext, device, shape, dtype, in_fmt, channels_last):
    r, g, n, cs, cn = q_sample_case(shape, dtype, device)
    r, g, n = (layout(t, in_fmt) for t in (r, g, n))
    kw = dict(scale=2.0, offset=-1.0, out_dtype=dtype, channels_last=channels_last)
    upstream = randn(shape, dtype, device, torch.Generator().manual_seed(7))
    got = run_q_sample(q_sample_pair_native, r, g, n, cs, cn, upstream, **kw)
    want = run_q_sample(q_sample_pair_torch, r, g, n, cs, cn, upstream, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in zip(got, want):
        close(a, b)
    for out in got[:2]:
        assert out.is_contiguous(memory_format=fmt)
        assert out.dtype == dtype and out.device.type == device
    assert got[0].requires_grad and not got[1].requires_grad
    assert got[2].dtype == dtype


@needs_build
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dtype,out_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float64, torch.float32),
    (torch.float16, torch.bfloat16)])
def test_q_sample_pair_casts_to_out_dtype(ext, device, in_dtype, out_dtype):
    shape = (2, 3, 17, 23)
    r, g, n, cs, cn = q_sample_case(shape, in_dtype, device, seed=1)
    kw = dict(scale=1.0, offset=0.0, out_dtype=out_dtype, channels_last=True)
    upstream = randn(shape, out_dtype, device, torch.Generator().manual_seed(3))
    got = run_q_sample(q_sample_pair_native, r, g, n, cs, cn, upstream, **kw)
    want = run_q_sample(q_sample_pair_torch, r, g, n, cs, cn, upstream, **kw)
    close(got[0], want[0])
    close(got[1], want[1])
    close(got[2], want[2])
    assert got[0].dtype == out_dtype and got[2].dtype == in_dtype


@needs_build
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 64, 96)], ids=["small", "chunks"])
def test_q_sample_pair_mixed_layouts_and_views(ext, device, shape):
    """Inputs with different strides (the strided path), an expanded upstream gradient, coefs
    given as one value, and mixed input dtypes."""
    r, g, n, cs, cn = q_sample_case(shape, torch.float32, device, seed=2)
    r = r.contiguous(memory_format=torch.channels_last)
    n = sliced(n)
    for channels_last in (False, True):
        kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32, channels_last=channels_last)
        got = q_sample_pair_native(r, g, n, cs, cn, **kw)
        want = q_sample_pair_torch(r, g, n, cs, cn, **kw)
        close(got[0], want[0])
        close(got[1], want[1])
    # upstream gradient of .sum() is an expanded (stride-0) tensor
    grads = []
    for fn in (q_sample_pair_native, q_sample_pair_torch):
        rr = r.detach().clone().requires_grad_(True)
        xt, _ = fn(rr, g, n, cs, cn, scale=2.0, offset=-1.0, out_dtype=torch.float32)
        (xt.sum() * 0.5).backward()
        grads.append(rr.grad)
    close(grads[0], grads[1])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    # one coefficient for the whole batch broadcasts; gt / noise in another dtype
    kw = dict(scale=1.0, offset=0.0, out_dtype=torch.float32)
    got = q_sample_pair_native(r, g.double(), n.half(), cs[:1], cn[:1], **kw)
    want = q_sample_pair_torch(r, g.double(), n.half(), cs[:1], cn[:1], **kw)
    close(got[0], want[0])
    close(got[1], want[1])


@needs_build
def test_q_sample_pair_without_grad(ext):
    r, g, n, cs, cn = q_sample_case((2, 3, 8, 8), torch.float32, "cpu")
    xt_res, xt_gt = q_sample_pair_native(r, g, n, cs, cn, scale=2.0, offset=-1.0,
                                         out_dtype=torch.float32)
    assert not xt_res.requires_grad and not xt_gt.requires_grad
    with torch.no_grad():
        xt_res, _ = q_sample_pair_native(r.requires_grad_(), g, n, cs, cn, scale=2.0, offset=-1.0,
                                         out_dtype=torch.float32)
    assert not xt_res.requires_grad


@needs_build
def test_q_sample_pair_gradcheck(ext):
    r, g, n, cs, cn = q_sample_case((2, 2, 3, 5), torch.float64, "cpu", seed=4)
    r.requires_grad_(True)

    def f(r):
        return q_sample_pair_native(r, g, n, cs, cn, scale=2.0, offset=-1.0,
                                    out_dtype=torch.float64, channels_last=True)[0]
    assert torch.autograd.gradcheck(f, (r,))


# ------------------------------------------------------------------------------------------------
# weighted_l2

def l2_case(shape, dtype, device, with_x, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p, q = randn(shape, dtype, device, gen), randn(shape, dtype, device, gen)
    w = torch.rand(shape[0], generator=gen).to(device)
    if not with_x:
        return p, q, w, None, None, None, None
    x = torch.rand(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x_coef = (1 + torch.rand(shape[0], generator=gen)).to(device)
    p_coef = (0.1 * torch.rand(shape[0], generator=gen)).to(device)
    return p, q, w, x, y, x_coef, p_coef


def run_l2(fn, p, q, w, x, y, xc, pc, upstream):
    p = p.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    if x is not None:
        x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    loss = fn(p, q, w, x, y, xc, pc)
    loss.backward(upstream)
    return loss, p.grad, (x.grad if x is not None else None)


def check_l2(p, q, w, x, y, xc, pc, seed=5):
    acc = torch.promote_types(p.dtype, torch.float32)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64).to(device=p.device, dtype=acc)
    got = run_l2(weighted_l2_native, p, q, w, x, y, xc, pc, upstream)
    want = run_l2(weighted_l2_torch, p, q, w, x, y, xc, pc, upstream)
    assert got[0].shape == () and got[0].dtype == acc
    rtol, atol = LOSS_TOL[p.dtype]
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    close(got[1], want[1], p.dtype)
    assert got[1].dtype == p.dtype
    if x is not None:
        close(got[2], want[2], x.dtype)
    return got


@needs_build
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_x", [False, True], ids=["x=None", "x"])
def test_weighted_l2_matches_twin(ext, device, shape, dtype, fmt, with_x):
    args = l2_case(shape, dtype, device, with_x)
    args = tuple(layout(t, fmt) if t is not None and t.dim() == 4 else t for t in args)
    got = check_l2(*args)
    if fmt == "channels_last":  # gradients keep the inputs' layout
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@needs_build
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 64, 96)], ids=["small", "chunks"])
@pytest.mark.parametrize("with_x", [False, True], ids=["x=None", "x"])
def test_weighted_l2_mixed_layouts_and_views(ext, device, shape, with_x):
    p, q, w, x, y, xc, pc = l2_case(shape, torch.float32, device, with_x, seed=1)
    p = p.contiguous(memory_format=torch.channels_last)
    q = sliced(q)
    if with_x:
        y = y.contiguous(memory_format=torch.channels_last)
        x = sliced(x)
    check_l2(p, q, w, x, y, xc, pc)


@needs_build
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4,), (3, 11), (2, 3, 13), (2, 3, 4, 5, 6), (2, 3, 64, 96),
                                   (1, 4, 8, 8), (0, 3, 4, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_weighted_l2_other_shapes(ext, device, shape):
    """Ranks other than 4, several chunks per sample (64x96x3 > 4096), batch 1 and batch 0."""
    for with_x in (False, True):
        args = l2_case(shape, torch.float32, device, with_x, seed=3)
        if shape[0] == 0:
            got = weighted_l2_native(*args)
            want = weighted_l2_torch(*args)
            assert torch.isnan(got) and torch.isnan(want)  # 0 / 0, like the twin
            continue
        check_l2(*args)


@needs_build
def test_weighted_l2_mixed_dtypes_and_scalar_coefs(ext):
    p, q, w, x, y, xc, pc = l2_case((2, 3, 17, 23), torch.float32, "cpu", True, seed=6)
    check_l2(p, q.half(), w, x, y.double(), xc[:1], pc[:1])
    check_l2(p.bfloat16(), q, w, x.half(), y, xc, pc)


@needs_build
def test_weighted_l2_is_deterministic_across_threads(ext):
    p, q, w, x, y, xc, pc = l2_case((4, 3, 64, 64), torch.float32, "cpu", True, seed=8)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            results.append(weighted_l2_native(p, q, w).item())
            results.append(weighted_l2_native(p, q, w, x, y, xc, pc).item())
    finally:
        torch.set_num_threads(threads)
    assert results[0::2] == [results[0]] * 3
    assert results[1::2] == [results[1]] * 3


@needs_build
def test_weighted_l2_gradcheck(ext):
    p, q, w, x, y, xc, pc = l2_case((2, 3, 4, 5), torch.float64, "cpu", True, seed=9)
    p.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: weighted_l2_native(p, q, w), (p,))
    assert torch.autograd.gradcheck(lambda p, x: weighted_l2_native(p, q, w, x, y, xc, pc),
                                    (p, x))


@needs_build
def test_weighted_l2_grad_only_where_asked(ext):
    p, q, w, x, y, xc, pc = l2_case((2, 3, 4, 5), torch.float32, "cpu", True)
    x.requires_grad_(True)
    weighted_l2_native(p, q, w, x, y, xc, pc).backward()
    assert x.grad is not None and p.grad is None
    x.grad = None
    p.requires_grad_(True)
    x.requires_grad_(False)
    weighted_l2_native(p, q, w, x, y, xc, pc).backward()
    assert p.grad is not None and x.grad is None


@needs_build
def test_dispatch_through_ops_interface(ext):
    r, g, n, cs, cn = q_sample_case((2, 3, 8, 8), torch.float32, "cpu")
    kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32, channels_last=True)
    got = q_sample_pair(r, g, n, cs, cn, backend="native", **kw)
    want = q_sample_pair(r, g, n, cs, cn, backend="torch", **kw)
    close(got[0], want[0])
    p, q, w, *_ = l2_case((2, 3, 8, 8), torch.float32, "cpu", False)
    close(weighted_l2(p, q, w, backend="native"), weighted_l2(p, q, w, backend="torch"))


# ------------------------------------------------------------------------------------------------
# validation and errors (these need no build)

def test_bad_arguments_raise_value_error():
    r, g, n, cs, cn = q_sample_case((2, 3, 4, 4), torch.float32, "cpu")
    kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        q_sample_pair_native(r[0], g[0], n[0], cs, cn, **kw)
    with pytest.raises(ValueError, match="shape"):
        q_sample_pair_native(r, g[:1], n, cs, cn, **kw)
    with pytest.raises(TypeError, match="out_dtype"):
        q_sample_pair_native(r, g, n, cs, cn, scale=2.0, offset=-1.0, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q_sample_pair: the native backend writes float32/"
                                         r"float64/float16/bfloat16, got out_dtype=torch.int32$"):
        q_sample_pair_native(r, g, n, cs, cn, scale=2.0, offset=-1.0, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q_sample_pair: gt is on meta, restored on cpu"):
        q_sample_pair_native(r, g.to("meta"), n, cs, cn, **kw)
    with pytest.raises(TypeError, match="q_sample_pair: noise must be a tensor, got ndarray"):
        q_sample_pair_native(r, g, n.numpy(), cs, cn, **kw)
    with pytest.raises(ValueError, match="same shape"):
        weighted_l2_native(r, g[:1], cs)
    with pytest.raises(ValueError, match="weight"):
        weighted_l2_native(r, g, cs[:1])
    with pytest.raises(ValueError, match="x needs y"):
        weighted_l2_native(r, g, cs, x=r)


@needs_build
def test_bad_coefficients_raise_value_error(ext):
    r, g, n, cs, cn = q_sample_case((2, 3, 4, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="coef_signal"):
        q_sample_pair_native(r, g, n, torch.ones(3), cn, scale=2.0, offset=-1.0,
                             out_dtype=torch.float32)


@needs_build
def test_unsupported_device_is_a_clear_error(ext):
    p = torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(RuntimeError, match="CPU and CUDA"):
        weighted_l2_native(p, p, torch.ones(2, device="meta"))


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget any extension already loaded in this process (restored after the test)."""
    monkeypatch.setattr(native, "_ext", None)
    monkeypatch.setattr(native, "_error", None)


def test_missing_compiler_is_a_clear_error(monkeypatch, fresh_state):
    monkeypatch.setattr(native.shutil, "which", lambda *a, **k: None)
    assert "C++ compiler" in native.toolchain_problem()
    with pytest.raises(RuntimeError, match=r"backend='native' could not be built: no C\+\+ comp"):
        native.load_extension()
    assert native.native_available() is False  # cached answer, no exception
    r, g, n, cs, cn = q_sample_case((2, 3, 4, 4), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend='native' could not be built"):
        q_sample_pair_native(r, g, n, cs, cn, scale=2.0, offset=-1.0, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="backend='native' could not be built"):
        weighted_l2_native(r, g, cs)


def test_missing_ninja_is_a_clear_error(monkeypatch, fresh_state):
    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(torch.utils.cpp_extension, "verify_ninja_availability", no_ninja)
    monkeypatch.setattr(native.shutil, "which", lambda *a, **k: "/usr/bin/c++")
    with pytest.raises(RuntimeError, match="could not be built: ninja"):
        native.load_extension()
    assert not native.native_available()


def test_sources_are_found():
    src = native.source_dir()
    assert (src / "diffloss_ops.cpp").is_file() and (src / "diffloss_ops_cuda.cu").is_file()


def test_import_does_not_build():
    """Importing the package (and this module) compiles nothing, even with no toolchain."""
    code = textwrap.dedent("""
        import sys
        import torch.utils.cpp_extension as ce
        def boom(*a, **k):
            raise AssertionError("cpp_extension.load called at import time")
        ce.load = boom
        import diffloss_fast
        import diffloss_fast.ops
        import diffloss_fast.ops.native as native
        assert native._ext is None and native._error is None
        assert not any(m.startswith("diffloss_fast_native") for m in sys.modules)
        assert native.native_available() is False          # no compiler: False, no exception
        assert "C++ compiler" in native._error, native._error
        print("ok")
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def random_view(t, gen):
    """t's values in a random layout: permuted storage order, maybe a slice, maybe expanded."""
    choice = int(torch.randint(0, 4, (1,), generator=gen))
    if choice == 0:  # storage in a random order of the inner dimensions
        perm = [0] + (torch.randperm(3, generator=gen) + 1).tolist()
        inv = [perm.index(i) for i in range(4)]
        return t.permute(perm).contiguous().permute(inv)
    if choice == 1:
        return sliced(t)
    if choice == 2 and t.shape[1] > 1:  # same value along the channels: an expanded view
        return t[:, :1].expand(t.shape)
    return t.contiguous(memory_format=torch.channels_last)


@needs_build
def test_random_layouts_match_twin(ext):
    gen = torch.Generator().manual_seed(11)
    for _ in range(24):
        shape = tuple(int(v) for v in torch.randint(1, 9, (4,), generator=gen))
        r, g, n, cs, cn = q_sample_case(shape, torch.float32, "cpu",
                                        seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        r, g, n = (random_view(t, gen) for t in (r, g, n))
        channels_last = bool(torch.randint(0, 2, (1,), generator=gen))
        kw = dict(scale=2.0, offset=-1.0, out_dtype=torch.float32, channels_last=channels_last)
        upstream = random_view(randn(shape, torch.float32, "cpu", gen), gen)
        got = run_q_sample(q_sample_pair_native, r, g, n, cs, cn, upstream, **kw)
        want = run_q_sample(q_sample_pair_torch, r, g, n, cs, cn, upstream, **kw)
        for a, b in zip(got, want):
            close(a, b)
        p, q, w, x, y, xc, pc = l2_case(shape, torch.float32, "cpu", True, seed=int(shape[1]))
        p, q, x, y = (random_view(t, gen) for t in (p, q, x, y))
        check_l2(p, q, w, None, None, None, None)
        check_l2(p, q, w, x, y, xc, pc)
