"""The fused ops of DiffLoss, and the one place that chooses which implementation runs.

Each op is a file of its own: its Triton kernels, its autograd.Function and a plain-PyTorch
twin that defines it. Two groups of ops, chosen by two options of DiffLoss:

- the loss's own ops (``noising.q_sample_pair``, ``weighted_l2``), by ``backend``:
  ``torch`` (the twins), ``triton`` (CUDA; on the CPU only under ``TRITON_INTERPRET=1``) or
  ``native`` (the C++/CUDA extension from ``csrc/``, built on first use); ``auto`` picks
  ``triton`` for CUDA tensors when Triton imports, else ``torch``;
- the prior's ops (``group_norm_silu``, ``residual_bias_add``, ``resample_2x``, and the pair
  pass's ``group_norm_silu_difference`` and ``attention_difference``), by ``fused_kernels``:
  the Triton kernels or the twins. (``frozen_conv`` has one implementation, always used.)

:func:`plan_ops` makes both choices once per device and dtype, into an :class:`OpPlan`.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._triton_common import TRITON_DTYPES
# the pair ops' modules by their own names (their functions share them)
from . import attention_difference as _attention_pair
from . import group_norm_silu_difference as _norm_pair
from .group_norm_silu import group_norm_silu_torch, group_norm_silu_triton
from .native import q_sample_pair_native, weighted_l2_native
from .noising import q_sample_pair_torch, q_sample_pair_triton
from .resample_2x import avg_pool_2x2, avg_pool_2x2_triton, upsample_2x_torch, upsample_2x_triton
from .residual_bias_add import residual_bias_add_torch, residual_bias_add_triton
from .weighted_l2 import weighted_l2_torch, weighted_l2_triton

BACKENDS = ("auto", "torch", "triton", "native")

# backend -> (q_sample_pair, weighted_l2)
_LOSS_OPS = {"torch": (q_sample_pair_torch, weighted_l2_torch),
             "triton": (q_sample_pair_triton, weighted_l2_triton),
             "native": (q_sample_pair_native, weighted_l2_native)}
# fused kernels or not -> (norm_silu, residual_bias_add, avg_pool, upsample,
#                          norm_silu_difference, attention_difference)
_PRIOR_OPS = {True: (group_norm_silu_triton, residual_bias_add_triton, avg_pool_2x2_triton,
                     upsample_2x_triton, _norm_pair.group_norm_silu_difference_triton,
                     _attention_pair.attention_difference_triton),
              False: (group_norm_silu_torch, residual_bias_add_torch, avg_pool_2x2,
                      upsample_2x_torch, _norm_pair.group_norm_silu_difference,
                      _attention_pair.attention_difference)}


@dataclass(frozen=True)
class OpPlan:
    """The implementation of every op, for one device and dtype (see :func:`plan_ops`).
    ``fused``: the prior's ops are the Triton kernels, which read channels_last activations."""

    q_sample_pair: Callable
    weighted_l2: Callable
    fused: bool
    norm_silu: Callable
    residual_bias_add: Callable
    avg_pool: Callable
    upsample: Callable
    norm_silu_difference: Callable
    attention_difference: Callable


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


def _resolve_fused(fused_kernels: bool | str, device: torch.device, dtype: torch.dtype) -> bool:
    """``auto``: the Triton kernels on CUDA where Triton builds them (never on the CPU, where
    they would run interpreted), in the dtypes they take; True where they cannot run raises."""
    if fused_kernels == "auto":
        return device.type == "cuda" and dtype in TRITON_DTYPES and triton_available(device)
    if fused_kernels and not triton_available(device):
        raise ValueError(f"fused_kernels=True needs Triton on a CUDA device, got {device}")
    if fused_kernels and dtype not in TRITON_DTYPES:
        raise ValueError(f"fused_kernels=True computes in fp32/fp16/bf16, got {dtype}")
    return bool(fused_kernels)


def plan_ops(backend: str, fused_kernels: bool | str, device: torch.device | str,
             dtype: torch.dtype) -> OpPlan:
    """Every op's implementation for tensors of ``dtype`` on ``device``: the loss's ops from
    ``backend`` (:func:`resolve_backend`), the prior's from ``fused_kernels`` (True, False or
    ``"auto"``). Raises ValueError for a choice that cannot run there."""
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    fused = _resolve_fused(fused_kernels, device, dtype)
    q_sample, l2 = _LOSS_OPS[backend]
    norm_silu, residual, pool, upsample, norm_difference, attention = _PRIOR_OPS[fused]
    return OpPlan(q_sample_pair=q_sample, weighted_l2=l2, fused=fused, norm_silu=norm_silu,
                  residual_bias_add=residual, avg_pool=pool, upsample=upsample,
                  norm_silu_difference=norm_difference, attention_difference=attention)


def _loss_ops(backend: str):
    if backend not in _LOSS_OPS:
        raise ValueError(f"backend must be one of {tuple(_LOSS_OPS)} here, got {backend!r}")
    return _LOSS_OPS[backend]


def q_sample_pair(restored, gt, noise, coef_signal, coef_noise, *, scale, offset, out_dtype,
                  channels_last=False, backend="torch"):
    """Noise both branches with shared noise; see :mod:`diffloss_fast.ops.noising`."""
    return _loss_ops(backend)[0](restored, gt, noise, coef_signal, coef_noise, scale=scale,
                                 offset=offset, out_dtype=out_dtype, channels_last=channels_last)


def weighted_l2(p, q, weight, x=None, y=None, x_coef=None, p_coef=None, *, backend="torch"):
    """Per-sample weighted squared error; see :mod:`diffloss_fast.ops.weighted_l2`."""
    return _loss_ops(backend)[1](p, q, weight, x, y, x_coef, p_coef)
