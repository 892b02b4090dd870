"""pytest-benchmark suite of the loss step (forward + backward): each fast variant beside the
baselines a user would run instead, one group per set of terms (for the semantic term alone the
baselines run upstream's encoder and middle block only).

    pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-json=out.json
"""
import pytest
import torch

from diffloss_fast import ops
from diffloss_fast.tools.baselines import BASELINES, PRECISIONS, numerics, unsupported
from diffloss_fast.tools.harness import loss_step, make_inputs, make_loss
from diffloss_fast.tools.hardware import synchronize

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROUNDS, WARMUP = (10, 3) if CUDA else (3, 1)
TERMS = ["both", "semantic"]

FAST = [
    # (variant, precision, backend)
    ("fast", "bf16", "auto"),
    ("fast", "fp16", "auto"),
    ("fast", "bf16", "torch"),
    ("fast", "bf16", "native"),
    ("fast-fused", "bf16", "auto"),
    ("fast-graphed", "bf16", "auto"),
    ("fast-two-pass", "bf16", "auto"),  # what propagating the difference costs
    ("fast-fp8", "fp8", "auto"),  # the e4m3 twin: what precision="fp8" costs today
    ("fast-compiled", "bf16", "auto"),
    ("fast-compiled", "fp16", "auto"),
    ("fast-regional", "bf16", "auto"),
]


def _run(benchmark, variant, loss_fn, inputs):
    def step():
        loss_step(loss_fn, *inputs)
        synchronize(DEVICE)
    with numerics(variant):
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _skip_compiled_on_cpu(variant):
    if variant in ("reference-compiled", "fast-compiled", "fast-regional") and not CUDA:
        pytest.skip("torch.compile is timed on CUDA only (compiling on 2 CPU cores takes minutes)")


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("variant", BASELINES)
def test_baseline(benchmark, bench_prior, bench_shape, variant, terms):
    why = unsupported(variant, DEVICE)
    if why:
        pytest.skip(why)
    _skip_compiled_on_cpu(variant)
    benchmark.group = f"loss:{terms}"
    benchmark.extra_info.update(variant=variant, precision=PRECISIONS[variant], terms=terms,
                                batch=bench_shape[0], resolution=bench_shape[1])
    loss_fn = make_loss(bench_prior, variant, terms, precision="fp32", backend="torch")
    _run(benchmark, variant, loss_fn, make_inputs(*bench_shape, DEVICE))


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("variant, precision, backend", FAST)
def test_fast(benchmark, bench_prior, bench_shape, variant, precision, backend, terms):
    _skip_compiled_on_cpu(variant)
    if variant in ("fast-fused", "fast-graphed", "fast-two-pass") and not CUDA:
        pytest.skip("the fused norm kernels and CUDA graphs are timed on CUDA only (on the "
                    "CPU the kernels run interpreted)")
    if precision in ("bf16", "fp8") and CUDA and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if precision == "fp8" and CUDA and torch.cuda.get_device_capability(DEVICE) < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9 or later")
    if backend == "native":
        from diffloss_fast.ops.native import native_available
        if not native_available():
            pytest.skip("the native extension cannot be built here")
    resolved = ops.resolve_backend(backend, DEVICE)
    benchmark.group = f"loss:{terms}"
    benchmark.extra_info.update(variant=variant, precision=precision, backend=resolved,
                                terms=terms, batch=bench_shape[0], resolution=bench_shape[1])
    loss_fn = make_loss(bench_prior, variant, terms, precision=precision, backend=backend)
    _run(benchmark, variant, loss_fn, make_inputs(*bench_shape, DEVICE))
