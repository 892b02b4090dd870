"""What the device can do and how to time on it: synchronisation, matmul peak, peak memory."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


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
