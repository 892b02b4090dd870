"""Degraded/clean pairs made on the fly, so that training runs with no data set at all.

Clean images are procedural (colour gradients, shapes, striped textures); each is degraded with
the textbook model of its task. Everything an item contains follows from its seed, so runs are
reproducible and a resumed run sees the same images.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

from .data import to_tensor


def clean_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float32 image in [0, 1]: a smooth background and textured shapes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    corners = rng.random((4, 3), dtype=np.float32)
    img = (corners[0] * ((1 - xx) * (1 - yy))[..., None] + corners[1] * (xx * (1 - yy))[..., None]
           + corners[2] * ((1 - xx) * yy)[..., None] + corners[3] * (xx * yy)[..., None])
    for _ in range(rng.integers(3, 9)):
        cx, cy = rng.random(2)
        rx, ry = 0.05 + 0.3 * rng.random(2)
        if rng.random() < 0.5:
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        else:
            mask = (np.abs(xx - cx) < rx) & (np.abs(yy - cy) < ry)
        colour = rng.random(3, dtype=np.float32)
        shade = np.ones_like(xx)
        if rng.random() < 0.5:
            angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 24)
            shade = 0.7 + 0.3 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        img[mask] = (colour * shade[..., None])[mask]
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def lowlight(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Under-exposure: I = k * J^gamma plus signal-dependent (shot) and read noise."""
    gamma, k = rng.uniform(1.5, 3.0), rng.uniform(0.15, 0.5)
    dark = k * clean ** gamma
    shot, read = rng.uniform(0.005, 0.03), rng.uniform(0.002, 0.015)
    noise = rng.normal(0, 1, clean.shape) * np.sqrt(shot ** 2 * dark + read ** 2)
    return np.clip(dark + noise, 0, 1).astype(np.float32)


def haze(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering: I = J * t + A * (1 - t), t = exp(-beta * depth)."""
    size = clean.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    depth = (1 - yy) * rng.uniform(0.5, 1.0) + 0.15 * np.sin(
        2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.random()))
    depth = (depth - depth.min()) / (np.ptp(depth) + 1e-6)
    t = np.exp(-rng.uniform(0.5, 2.5) * depth)[..., None]
    airlight = rng.uniform(0.7, 1.0) * (1 + rng.uniform(-0.05, 0.05, 3))
    return np.clip(clean * t + airlight * (1 - t), 0, 1).astype(np.float32)


def rain(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: slanted, blurred bright lines, screen-blended over the image."""
    size = clean.shape[0]
    n = int(rng.uniform(0.03, 0.12) * size * size / 4)
    angle = rng.uniform(-0.5, 0.5) + rng.normal(0, 0.05, n)
    length = rng.uniform(0.05, 0.25) * size * rng.uniform(0.5, 1.0, n)
    steps = np.linspace(0, 1, max(2, int(0.25 * size)))
    x = rng.uniform(0, size, n)[:, None] + np.sin(angle)[:, None] * length[:, None] * steps
    y = rng.uniform(0, size, n)[:, None] + np.cos(angle)[:, None] * length[:, None] * steps
    xi, yi = x.round().astype(int), y.round().astype(int)
    inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
    layer = np.zeros((size, size), np.float32)
    brightness = np.broadcast_to(rng.uniform(0.3, 0.9, n)[:, None], xi.shape)
    np.maximum.at(layer, (yi[inside], xi[inside]), brightness[inside])
    layer = np.clip(gaussian_filter(layer, 0.7) * 1.5, 0, 1)[..., None]
    return (1 - (1 - clean) * (1 - layer)).astype(np.float32)


DEGRADATIONS = {"lowlight": lowlight, "haze": haze, "rain": rain}


class SyntheticPairs(Dataset):
    """(degraded, clean) tensors of ``size`` x ``size``, generated from each item's seed.

    Indexed like :class:`~diffloss_fast.train.data.PairedImages`: by ``(index, seed)`` when
    training, by plain position (seeded from ``seed`` and the index) for a fixed validation set.
    """

    def __init__(self, kind: str, size: int, length: int, seed: int = 0):
        if kind not in DEGRADATIONS:
            raise ValueError(f"synthetic kind must be one of {sorted(DEGRADATIONS)}, got {kind!r}")
        self.degrade, self.kind = DEGRADATIONS[kind], kind
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def name(self, index: int) -> str:
        return f"{self.kind}_{index:04d}.png"

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, (self.seed, item))
        rng = np.random.default_rng(seed)
        clean = clean_image(self.size, rng)
        return to_tensor(self.degrade(clean, rng)), to_tensor(clean)
