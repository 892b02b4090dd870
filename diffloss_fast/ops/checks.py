"""Input checks of ``q_sample_pair`` shared by its fused backends, and the layout test the
fused ops share.

The Triton and native wrappers take the same shapes and devices but different dtypes, so the
dtypes are parameters; every message names ``q_sample_pair`` and what came.
"""
from __future__ import annotations

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor dense in channels_last and not also NCHW-contiguous (as a 1x1 map or a
    single channel is): the layouts differ, and the channels_last one is in use."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


class DtypeError(TypeError, ValueError):
    """A dtype a backend cannot take: both a TypeError (the wrong kind of dtype) and a ValueError
    (a dtype this backend has no kernel for), so callers of either backend may catch either."""


def _dtype_error(msg: str, dtype) -> DtypeError:
    """The torch twin computes in any float dtype: point there when the dtype is one."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        msg += "; use backend='torch' for it"
    return DtypeError(msg)


def _names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def check_q_sample_pair(restored, gt, noise, out_dtype, *, backend: str, out_dtypes,
                        in_dtypes=None) -> None:
    """Refuse bad images and ``out_dtype`` before a kernel sees them.

    ``in_dtypes=None`` takes images of any dtype, for a backend that converts them to the
    accumulation dtype as the torch twin does."""
    for name, t in (("restored", restored), ("gt", gt), ("noise", noise)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"q_sample_pair: {name} must be a tensor, got {type(t).__name__}")
        if in_dtypes is not None and t.dtype not in in_dtypes:
            raise _dtype_error(f"q_sample_pair: the {backend} backend reads {_names(in_dtypes)} "
                               f"{name}, got {t.dtype}", t.dtype)
    if restored.dim() != 4:
        raise ValueError(f"q_sample_pair: restored must be 4-D (B, C, H, W), got shape "
                         f"{tuple(restored.shape)}")
    if gt.shape != restored.shape or noise.shape != restored.shape:
        raise ValueError(f"q_sample_pair: gt and noise must have restored's shape "
                         f"{tuple(restored.shape)}, got {tuple(gt.shape)} and "
                         f"{tuple(noise.shape)}")
    for name, t in (("gt", gt), ("noise", noise)):
        if t.device != restored.device:
            raise ValueError(f"q_sample_pair: {name} is on {t.device}, restored on "
                             f"{restored.device}")
    if out_dtype not in out_dtypes:
        raise _dtype_error(f"q_sample_pair: the {backend} backend writes {_names(out_dtypes)}, "
                           f"got out_dtype={out_dtype}", out_dtype)
