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


def plot_losses(path: Path, train: list[dict]) -> None:
    """Total, pixel and DiffLoss terms against the step, on a log scale."""
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [e["step"] for e in train]
    for key, label in (("loss", "total"), ("pixel", "pixel"), ("diffloss", "DiffLoss (weighted)")):
        values = [e[key] for e in train]
        if any(v is not None and v > 0 for v in values):
            ax.plot(steps, [v if v is not None and v > 0 else np.nan for v in values], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _replace(path, lambda p: fig.savefig(p, format="png"))
