"""PSNR and SSIM as restoration papers report them, computed by scikit-image.

Images are clipped to [0, 1] and measured with an explicit ``data_range=1.0`` (scikit-image
would otherwise guess the range of a float image). Deraining papers measure the luma (Y of
ITU-R BT.601 YCbCr, as MATLAB's rgb2ycbcr computes it); dehazing and low-light papers measure
RGB. SSIM uses the Gaussian 11x11 window with sigma 1.5 and population covariance of Wang et
al. (2004).
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

CHANNELS = ("rgb", "y")


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y in [0, 1] (16..235 mapped back by /255) of an HWC RGB image in [0, 1]."""
    return (16.0 + rgb @ np.array([65.481, 128.553, 24.966])) / 255.0


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0).astype(np.float64)


def psnr_ssim(restored: torch.Tensor, target: torch.Tensor,
              channel: str = "rgb") -> tuple[float, float]:
    """PSNR (dB) and SSIM of one (3, H, W) image pair in [0, 1], on ``rgb`` or ``y``."""
    if channel not in CHANNELS:
        raise ValueError(f"metric channel must be one of {CHANNELS}, got {channel!r}")
    a, b = _hwc(restored), _hwc(target)
    if channel == "y":
        a, b = luma(a), luma(b)
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0)
    ssim = structural_similarity(b, a, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False,
                                 channel_axis=None if channel == "y" else 2)
    return float(psnr), float(ssim)
