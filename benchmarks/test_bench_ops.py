"""pytest-benchmark suite of the fused ops, forward + backward, per backend.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only          # on a CUDA machine
    python -m pytest benchmarks/test_bench_ops.py --benchmark-disable -q    # CPU smoke run

CUDA: DiffLoss's real sizes (B=8, 3x256x256 images, 1024x8x8 h-space; for the norms, ADM-256's
first level, 256x256x256, and its middle block) in the compute dtype (bf16, channels_last). CPU:
small fp32 tensors, so the suite stays a quick smoke test there.
``triton`` runs on CUDA only (the interpreter is no benchmark); ``native`` only where its
extension builds (set DIFFLOSS_BENCH_NATIVE=0 to skip even trying the build).
"""
import functools
import os

import pytest
import torch

from diffloss_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
B = 8 if CUDA else 2
IMAGE = (B, 3, 256, 256) if CUDA else (B, 3, 32, 32)
HSPACE = (B, 1024, 8, 8) if CUDA else (B, 64, 8, 8)
# the prior's compute dtype and layout: what the noising writes and the reductions read
COMPUTE = (torch.bfloat16 if CUDA and torch.cuda.is_bf16_supported() else
           torch.float16 if CUDA else torch.float32)
CHANNELS_LAST = CUDA
BACKENDS = ["torch", "triton", "native"]


@functools.lru_cache(maxsize=None)
def _native_problem():
    """Why the native backend cannot run on DEVICE here (None when it can); tried once."""
    if os.environ.get("DIFFLOSS_BENCH_NATIVE") == "0":
        return "DIFFLOSS_BENCH_NATIVE=0"
    try:
        import diffloss_fast.ops.native  # noqa: F401
        t = torch.randn(1, 1, 2, 2, device=DEVICE)
        c = torch.ones(1, device=DEVICE)
        ops.q_sample_pair(t, t, t, c, c, scale=2.0, offset=-1.0, out_dtype=torch.float32,
                          backend="native")
        ops.weighted_l2(t, t, c, backend="native")
    except Exception as exc:  # noqa: BLE001 - import error, build failure, no CUDA kernels
        return f"{type(exc).__name__}: {exc}"
    return None


def _use(backend):
    if backend == "triton" and not CUDA:
        pytest.skip("triton is benchmarked on CUDA only (on the CPU it runs interpreted)")
    if backend == "triton" and not ops.triton_available(DEVICE):
        pytest.skip("triton is not installed")
    if backend == "native":
        problem = _native_problem()
        if problem is not None:
            pytest.skip(f"native backend unavailable: {problem}"[:300])


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, step, **info):
    """Warm up (Triton compiles, the extension loads) outside the timing, then time."""
    step()
    _sync()
    benchmark.extra_info.update({k: str(v) for k, v in info.items()}, device=str(DEVICE))
    if CUDA:
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark(step)


@pytest.mark.benchmark(group="op:q_sample_pair")
@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_pair(benchmark, backend):
    _use(backend)
    torch.manual_seed(0)
    restored = torch.rand(IMAGE, device=DEVICE, requires_grad=True)
    gt, noise = torch.rand(IMAGE, device=DEVICE), torch.randn(IMAGE, device=DEVICE)
    a, b = torch.rand(B, device=DEVICE), torch.rand(B, device=DEVICE)
    fmt = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
    up = torch.randn(IMAGE, device=DEVICE, dtype=COMPUTE).contiguous(memory_format=fmt)

    def step():
        xt_res, xt_gt = ops.q_sample_pair(restored, gt, noise, a, b, scale=2.0, offset=-1.0,
                                          out_dtype=COMPUTE, channels_last=CHANNELS_LAST,
                                          backend=backend)
        (grad,) = torch.autograd.grad(xt_res, restored, up)
        _sync()
        return grad

    _run(benchmark, step, backend=backend, shape=IMAGE, out_dtype=COMPUTE,
         channels_last=CHANNELS_LAST, inputs="fp32 NCHW")


# natural "eps": eps of both branches; natural "x_prev": also the noised images x_t;
# semantic: the h-space of both branches
WL2_CASES = {"natural-eps": (IMAGE, False), "natural-x_prev": (IMAGE, True),
             "semantic": (HSPACE, False)}


@pytest.mark.benchmark(group="op:weighted_l2")
@pytest.mark.parametrize("case", list(WL2_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_l2(benchmark, backend, case):
    _use(backend)
    torch.manual_seed(0)
    shape, with_x = WL2_CASES[case]
    fmt = torch.channels_last if CHANNELS_LAST else torch.contiguous_format

    def make(requires_grad):
        t = torch.randn(shape, device=DEVICE, dtype=COMPUTE).contiguous(memory_format=fmt)
        return t.requires_grad_(requires_grad)

    p, q = make(True), make(False)
    weight = torch.rand(B, device=DEVICE)
    x = y = x_coef = p_coef = None
    leaves = (p,)
    if with_x:
        x, y = make(True), make(False)
        x_coef, p_coef = torch.rand(B, device=DEVICE) + 1.0, torch.rand(B, device=DEVICE)
        leaves = (p, x)

    def step():
        loss = ops.weighted_l2(p, q, weight, x, y, x_coef, p_coef, backend=backend)
        grads = torch.autograd.grad(loss, leaves)
        _sync()
        return grads

    _run(benchmark, step, backend=backend, case=case, shape=shape, dtype=COMPUTE,
         channels_last=CHANNELS_LAST)


# GroupNorm + FiLM + SiLU at ADM-256's largest activation (level 0) and at its middle block
GNS_CASES = {"level0": (B, 256, 256, 256) if CUDA else (B, 32, 16, 16),
             "middle": (B, 1024, 8, 8) if CUDA else (B, 64, 4, 4)}


# PyTorch's norms in either layout against the kernels, which read channels_last (given NCHW,
# they would time the wrapper's copies)
@pytest.mark.benchmark(group="op:group_norm_silu")
@pytest.mark.parametrize("case", list(GNS_CASES))
@pytest.mark.parametrize("backend, layout", [("torch", "nchw"), ("torch", "channels_last"),
                                             ("triton", "channels_last")])
def test_group_norm_silu(benchmark, backend, layout, case):
    from diffloss_fast.ops.group_norm_silu import group_norm_silu_torch, group_norm_silu_triton
    _use(backend)
    torch.manual_seed(0)
    shape = GNS_CASES[case]
    N, C = shape[:2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE, dtype=COMPUTE).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    weight = torch.randn(C, device=DEVICE, dtype=COMPUTE)
    bias = torch.randn(C, device=DEVICE, dtype=COMPUTE)
    scale, shift = torch.randn(N, 2 * C, 1, 1, device=DEVICE, dtype=COMPUTE).chunk(2, dim=1)
    fn = group_norm_silu_triton if backend == "triton" else group_norm_silu_torch

    def step():
        y = fn(x, 32, weight, bias, 1e-5, scale, shift)
        (grad,) = torch.autograd.grad(y, x, dy)
        _sync()
        return grad

    _run(benchmark, step, backend=backend, case=case, shape=shape, dtype=COMPUTE, layout=layout)


# The host's share of a fused norm call: everything its wrapper does (checks, launch shape,
# allocations, autograd) with each Triton launch recorded, not run. Where a step is
# launch-bound, this is time the GPU waits. Runs on the CPU too (what it times is host work).
@pytest.mark.benchmark(group="host:group_norm_silu wrapper (launches not run)")
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
def test_group_norm_silu_host_time(benchmark, monkeypatch, passes):
    from diffloss_fast.ops.group_norm_silu import group_norm_silu_triton
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    for kind in (JITFunction, InterpretedFunction):  # compiled, or under TRITON_INTERPRET=1
        monkeypatch.setattr(kind, "run", lambda self, *args, grid, warmup, **kwargs: None)
    x = torch.randn(8, 512, 16, 16, device=DEVICE, dtype=COMPUTE).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn_like(x)
    weight = torch.randn(512, device=DEVICE, dtype=COMPUTE)
    scale, shift = torch.randn(8, 1024, 1, 1, device=DEVICE, dtype=COMPUTE).chunk(2, dim=1)

    def step():
        y, passed = group_norm_silu_triton(x, 32, weight, weight, 1e-5, scale, shift, weight,
                                           pass_x=True)
        if passes == "forward+backward":
            torch.autograd.grad(y, x, dy)

    _run(benchmark, step, passes=passes, dtype=COMPUTE)


# A ResBlock's residual sum at ADM-256's largest activation: the twin adds the convolution
# bias as a pass of its own (as PyTorch's convolution does), the kernel in the same pass
@pytest.mark.benchmark(group="op:residual_bias_add")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_bias_add(benchmark, backend):
    from diffloss_fast.ops.residual_bias_add import (residual_bias_add_torch,
                                                     residual_bias_add_triton)
    _use(backend)
    torch.manual_seed(0)
    shape = GNS_CASES["level0"]
    fmt = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
    x, y = (torch.randn(shape, device=DEVICE, dtype=COMPUTE).contiguous(memory_format=fmt)
            for _ in range(2))
    bias = torch.randn(shape[1], device=DEVICE, dtype=COMPUTE)
    fn = residual_bias_add_triton if backend == "triton" else residual_bias_add_torch

    def step():
        out = fn(x, y, bias)
        _sync()
        return out

    _run(benchmark, step, backend=backend, shape=shape, dtype=COMPUTE,
         channels_last=CHANNELS_LAST)


# ADM-256's 2x resampling at its largest activation, forward + backward (each the other's
# backward): PyTorch's ops against the Triton kernels
@pytest.mark.benchmark(group="op:resample_2x")
@pytest.mark.parametrize("op", ["avg_pool_2x2", "upsample_2x"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resample_2x(benchmark, backend, op):
    from diffloss_fast.ops import resample_2x
    _use(backend)
    torch.manual_seed(0)
    shape = GNS_CASES["level0"]
    if op == "upsample_2x":  # upsampled to the level-0 size
        shape = (*shape[:2], shape[2] // 2, shape[3] // 2)
    fmt = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE, dtype=COMPUTE).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    fn = getattr(resample_2x, f"{op}_triton" if backend == "triton" else
                 {"avg_pool_2x2": "avg_pool_2x2", "upsample_2x": "upsample_2x_torch"}[op])
    dy = torch.randn_like(fn(x))

    def step():
        (grad,) = torch.autograd.grad(fn(x), x, dy)
        _sync()
        return grad

    _run(benchmark, step, backend=backend, op=op, shape=shape, dtype=COMPUTE,
         channels_last=CHANNELS_LAST)
