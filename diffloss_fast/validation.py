"""Argument checks with messages that name the argument, what was expected and what came."""
from __future__ import annotations

import torch


def check_images(restored, gt, *, factor: int) -> None:
    """Types, shapes and devices: what can be told without reading the values. The two may
    differ in float dtype (the loss brings them to a common one)."""
    for name, x in (("restored", restored), ("gt", gt)):
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, 3, H, W), got ndim {x.dim()} "
                             f"with shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"{name} must have 3 channels (B, 3, H, W), got {x.shape[1]} "
                             f"channels in shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} has an empty batch: shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % factor or w % factor:
            raise ValueError(f"{name}: height and width must be multiples of {factor} "
                             f"(the prior's downsampling factor), got {h}x{w}")
    if restored.shape[0] != gt.shape[0]:
        raise ValueError(f"restored and gt must have the same batch size, got "
                         f"{restored.shape[0]} and {gt.shape[0]}")
    if restored.shape != gt.shape:
        raise ValueError(f"restored and gt must have the same shape, got "
                         f"{tuple(restored.shape)} and {tuple(gt.shape)}")
    if restored.device != gt.device:
        raise ValueError(f"restored and gt must be on the same device, got "
                         f"{restored.device} and {gt.device}")


def _range_hint(low: float, high: float, found_low: float, found_high: float) -> str:
    """The likely mix-up behind values far outside ``(low, high)``, and its fix."""
    if found_low >= -1e-3 and 2.0 < found_high <= 255.0:
        return "8-bit images? divide them by 255, or pass input_range=(0, 255)"
    if found_low >= -1.0 - 1e-3 and found_high <= 1.0 + 1e-3 and (low, high) != (-1.0, 1.0):
        return "images in [-1, 1]? pass input_range=(-1, 1)"
    return "pass the input_range your images use"


def check_values(restored, gt, *, input_range: tuple[float, float], check_finite: bool,
                 check_range: bool) -> None:
    """NaN/Inf, and values far outside ``input_range`` (by more than half its width: [0, 255]
    or [-1, 1] images given to a (0, 1) loss), from one read of each tensor and one device
    sync. A network's slightly out-of-range output passes."""
    if not (check_finite or check_range):
        return
    found = torch.stack([torch.stack(torch.aminmax(x.detach())).float() for x in (restored, gt)])
    (r_low, r_high), (g_low, g_high) = found.tolist()
    low, high = input_range
    margin = (high - low) / 2
    for name, (lo, hi) in (("restored", (r_low, r_high)), ("gt", (g_low, g_high))):
        finite = lo == lo and hi == hi and abs(lo) != float("inf") and abs(hi) != float("inf")
        if check_finite and not finite:
            raise ValueError(f"{name} contains NaN or Inf values "
                             "(pass check_finite=False to skip this check)")
        if check_range and finite and (lo < low - margin or hi > high + margin):
            raise ValueError(
                f"{name} has values in [{lo:.4g}, {hi:.4g}], far outside input_range="
                f"({low:g}, {high:g}) (by more than half its width): "
                f"{_range_hint(low, high, lo, hi)} (check_range=False skips this check)")


def check_timesteps(t, batch: int, num_timesteps: int, device) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"t must be an int64 tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"t must be an integer (int64) tensor, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) (one timestep per sample), "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t must be on {device} like the images, got {t.device}")
    if bool(((t < 0) | (t >= num_timesteps)).any()):
        raise ValueError(f"t must lie in [0, {num_timesteps}), got values from "
                         f"{int(t.min())} to {int(t.max())}")


def check_noise(noise, like: torch.Tensor, check_finite: bool) -> None:
    if not torch.is_tensor(noise):
        raise TypeError(f"noise must be a tensor shaped like restored, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if noise.shape != like.shape:
        raise ValueError(f"noise must have restored's shape {tuple(like.shape)}, "
                         f"got {tuple(noise.shape)}")
    if noise.device != like.device:
        raise ValueError(f"noise must be on {like.device} like the images, got {noise.device}")
    if check_finite and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or Inf values")


def check_options(*, natural_weight, semantic_weight, target, input_range, precision,
                  backend, targets, precisions, backends) -> None:
    for name, w in (("natural_weight", natural_weight), ("semantic_weight", semantic_weight)):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w != w:
            raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        if w < 0:
            raise ValueError(f"{name} must be >= 0, got {w}")
    if target not in targets:
        raise ValueError(f"target must be one of {targets}, got {target!r}")
    if (not isinstance(input_range, (tuple, list)) or len(input_range) != 2
            or not float(input_range[1]) > float(input_range[0])):
        raise ValueError(f"input_range must be a pair (low, high) with high > low, "
                         f"e.g. (0.0, 1.0) or (-1.0, 1.0), got {input_range!r}")
    if precision not in precisions:
        raise ValueError(f"precision must be one of {precisions}, got {precision!r}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
