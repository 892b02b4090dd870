"""The two fused ops of DiffLoss behind one interface, with a choice of backend.

- ``torch``: plain PyTorch, the reference every other backend is tested against.
- ``triton``: fused Triton kernels (CUDA; on the CPU only under ``TRITON_INTERPRET=1``).
- ``native``: C++/CUDA extension from ``csrc/``, built on first use.

``backend="auto"`` picks ``triton`` for CUDA tensors when Triton imports, else ``torch``.
"""
from __future__ import annotations

import importlib
import os

import torch

from .noising import q_sample_pair_torch
from .weighted_l2 import weighted_l2_torch

BACKENDS = ("auto", "torch", "triton", "native")


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device`` here."""
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map ``auto`` to a concrete backend and refuse one that cannot run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"backend='triton' cannot run on device {device}: Triton needs a CUDA device "
            "(or TRITON_INTERPRET=1 set before diffloss_fast is imported, for testing on the CPU)"
            if importlib.util.find_spec("triton") else
            "backend='triton' needs the triton package, which is not installed")
    return backend


def _impl(backend: str):
    if backend == "torch":
        return q_sample_pair_torch, weighted_l2_torch
    if backend == "triton":
        from .noising import q_sample_pair_triton
        from .weighted_l2 import weighted_l2_triton
        return q_sample_pair_triton, weighted_l2_triton
    if backend == "native":
        from .native import q_sample_pair_native, weighted_l2_native
        return q_sample_pair_native, weighted_l2_native
    raise ValueError(f"backend must be one of {BACKENDS[1:]} here, got {backend!r}")


def q_sample_pair(restored, gt, noise, coef_signal, coef_noise, *, scale, offset, out_dtype,
                  channels_last=False, backend="torch"):
    """Noise both branches with shared noise; see :mod:`diffloss_fast.ops.noising`."""
    return _impl(backend)[0](restored, gt, noise, coef_signal, coef_noise, scale=scale,
                             offset=offset, out_dtype=out_dtype, channels_last=channels_last)


def weighted_l2(p, q, weight, x=None, y=None, x_coef=None, p_coef=None, *, backend="torch"):
    """Per-sample weighted squared error; see :mod:`diffloss_fast.ops.weighted_l2`."""
    return _impl(backend)[1](p, q, weight, x, y, x_coef, p_coef)
