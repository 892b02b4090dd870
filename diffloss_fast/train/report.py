"""What a run leaves in its output folder: metrics.json, validation grids, the loss-curve plot.

Files are written whole and then renamed, so a reader never sees half a file. The plot uses
Matplotlib's Agg canvas directly: no display is needed and the global backend is left alone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


def _replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    _replace(path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> HWC uint8."""
    return (image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255
            + 0.5).astype(np.uint8)


def save_image(path: Path, image: torch.Tensor) -> None:
    _replace(path, lambda p: Image.fromarray(to_uint8(image)).save(p, format="PNG"))


def save_grid(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """One row per image, its panels (input | output | target) side by side; rows of different
    widths are padded with black on the right."""
    strips = [np.concatenate([to_uint8(panel) for panel in row], axis=1) for row in rows]
    width = max(s.shape[1] for s in strips)
    grid = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0))) for s in strips])
    _replace(path, lambda p: Image.fromarray(grid).save(p, format="PNG"))


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` where it was recorded (not None)."""
    pairs = [(e["step"], e[key]) for e in entries if e.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_losses(path: Path, train: list[dict], val_history: list[dict]) -> Figure:
    """Two panels: the pixel loss and the weighted DiffLoss against the step, each on its own
    log-scale axis (their sizes differ by orders of magnitude, and each falls by orders over a
    run), above the validation PSNR. Returns the figure."""
    fig = Figure(figsize=(7, 6), dpi=100)
    FigureCanvasAgg(fig)
    losses, psnr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    lines = losses.plot(*_series(train, "pixel"), color="tab:blue", label="pixel")
    losses.set_ylabel("pixel loss", color="tab:blue")
    losses.set_yscale("log")
    if any(e.get("diffloss") is not None for e in train):
        diff = losses.twinx()
        lines += diff.plot(*_series(train, "diffloss"), color="tab:orange",
                           label="DiffLoss (weighted)")
        diff.set_ylabel("DiffLoss (weighted)", color="tab:orange")
        diff.set_yscale("log")
    losses.legend(lines, [line.get_label() for line in lines])
    losses.grid(True, alpha=0.3)
    losses.set_title("training losses")
    psnr.plot(*_series(val_history, "psnr"), marker="o", color="tab:green")
    psnr.set_ylabel("PSNR (dB)")
    psnr.set_xlabel("step")
    psnr.grid(True, alpha=0.3)
    psnr.set_title("validation PSNR")
    fig.tight_layout()
    _replace(path, lambda p: fig.savefig(p, format="png"))
    return fig
