"""What the device can do and how to time on it: the datasheet table of cards, synchronisation,
the measured matmul rate, a first call cut at a time budget, peak memory."""
from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Card:
    name: str
    peak_tflops: float     # dense bf16/fp16 tensor-core rate with fp32 accumulation
    bandwidth_tbs: float   # memory bandwidth, TB/s (10^12 bytes/s)
    fp8_peak_tflops: float | None = None  # dense e4m3 rate with fp32 accumulation; None: no FP8


# Datasheet figures, dense (the datasheets' "with sparsity" figures are twice these). MFU is
# quoted against these; the matmul rate measured in the same process stands beside it.
CARDS = {
    # "NVIDIA H100 Tensor Core GPU Architecture" whitepaper, H100 SXM5: peak BF16 tensor
    # TFLOPS with FP32 accumulate 989.4 (1978.9 sparse), FP8 1978.9 (3957.8 sparse); H100
    # datasheet: 3.35 TB/s.
    "h100-sxm": Card("NVIDIA H100 SXM", 989.4, 3.35, 1978.9),
    # the same whitepaper, H100 PCIe: 756 (1513 sparse), FP8 1513 (3026 sparse); H100
    # datasheet: 2 TB/s.
    "h100-pcie": Card("NVIDIA H100 PCIe", 756.0, 2.0, 1513.0),
    # "NVIDIA H200 Tensor Core GPU" datasheet, H200 SXM: BF16 tensor core 1,979 TFLOPS, FP8
    # 3,958, both with sparsity (the H100 SXM5's GH100 at the same clocks); 4.8 TB/s.
    "h200": Card("NVIDIA H200", 989.4, 4.8, 1978.9),
    # "NVIDIA A100 Tensor Core GPU" datasheet: BF16 tensor core 312 TFLOPS (624 sparse), every
    # A100 form factor; 2,039 GB/s for the 80GB SXM, 1,555 GB/s for the 40GB.
    "a100-80gb": Card("NVIDIA A100 80GB SXM", 312.0, 2.039),
    "a100-40gb": Card("NVIDIA A100 40GB", 312.0, 1.555),
    # "NVIDIA L40S" datasheet: BF16 tensor core 362.05 TFLOPS (733 sparse), FP8 733 (1,466
    # sparse); 864 GB/s.
    "l40s": Card("NVIDIA L40S", 362.05, 0.864, 733.0),
    # "NVIDIA ADA GPU ARCHITECTURE" whitepaper, GeForce RTX 4090: peak BF16 tensor TFLOPS with
    # FP32 accumulate 165.2 (330.4 sparse), FP8 with FP32 accumulate 330.3 (660.6 sparse);
    # 1008 GB/s.
    "rtx-4090": Card("NVIDIA GeForce RTX 4090", 165.2, 1.008, 330.3),
    # "NVIDIA AMPERE GA102 GPU ARCHITECTURE" whitepaper, GeForce RTX 3090: peak BF16 tensor
    # TFLOPS with FP32 accumulate 71 (142 sparse); 936 GB/s.
    "rtx-3090": Card("NVIDIA GeForce RTX 3090", 71.0, 0.936),
}
# Variants of these names with other peaks (H100 NVL, H200 NVL, RTX 3090 Ti, RTX 4090 D,
# laptop parts, the L40 beside the L40S) are unknown cards, not the nearest entry.
_OTHER_PARTS = ("nvl", " ti", "4090 d", "laptop", "mobile")


def card_for(device_name: str) -> Card | None:
    """The datasheet card a device name (``torch.cuda.get_device_name``) is, None if unknown
    (the CPU, or a card not in the table)."""
    name = device_name.lower()
    if any(part in name for part in _OTHER_PARTS):
        return None
    if "h100" in name:
        return CARDS["h100-pcie" if "pcie" in name else "h100-sxm"]
    if "a100" in name:
        return CARDS["a100-40gb" if "40gb" in name else "a100-80gb"]
    for key, fragment in (("h200", "h200"), ("l40s", "l40s"),
                          ("rtx-4090", "rtx 4090"), ("rtx-3090", "rtx 3090")):
        if fragment in name:
            return CARDS[key]
    return None


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: the current CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this torch sees no CUDA device")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call for ``repeats`` synchronised calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, *,
                       size: int | None = None) -> float:
    """Measured dense matmul rate on random data: the denominator of MFU."""
    size = size or (8192 if device.type == "cuda" else 512)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    repeats = 20 if device.type == "cuda" else 3
    ms = statistics.median(time_ms(lambda: a @ b, device, warmup=3, repeats=repeats))
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


class BudgetExceeded(Exception):
    """Raised inside a call that ran past its time budget (see :func:`first_call_s`)."""


def first_call_s(fn: Callable[[], object], device: torch.device,
                 budget_s: float | None = None) -> tuple[float, bool]:
    """Seconds the first call of ``fn`` took (a compilation, when ``fn`` compiles), and whether
    it ran past ``budget_s``. In the main thread on POSIX the call is cut at the budget: a
    SIGALRM raises :class:`BudgetExceeded` inside it, and again every quarter second, since
    code that swallows exceptions (a finalizer, a compiler's fallback) may catch one. Elsewhere
    the call runs out and is judged after."""
    cut = (budget_s is not None and hasattr(signal, "setitimer")
           and threading.current_thread() is threading.main_thread())
    armed = [cut]

    def stop(signum, frame):
        if armed[0]:
            raise BudgetExceeded(f"past the {budget_s:g} s budget")

    if cut:
        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, budget_s, 0.25)
    error = None
    start = time.perf_counter()
    try:
        try:
            fn()
            synchronize(device)
        finally:
            armed[0] = False
    except Exception as err:  # noqa: BLE001 - judged below: the cut, maybe wrapped, or a failure
        armed[0] = False
        error = err
    finally:
        if cut:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    over = budget_s is not None and seconds >= budget_s
    if error is not None and not over:
        raise error
    return seconds, over


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak bytes held by torch's allocator since the last reset (CUDA only)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30
