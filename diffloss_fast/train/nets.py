"""Restoration networks: a compact built-in baseline, or any nn.Module named by import path."""
from __future__ import annotations

import importlib
import json

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class ResidualUNet(nn.Module):
    """A small U-Net of residual blocks that predicts a correction added to its input.

    ``depth`` stride-2 downsamplings (inputs must be multiples of ``2 ** depth``), ``width``
    channels at full resolution, doubled at each level. The defaults have about 1.1M parameters:
    a quick baseline to compare pixel loss alone with pixel loss + DiffLoss, not a state of the
    art model (use ``--net`` for one).
    """

    def __init__(self, width: int = 32, depth: int = 2, blocks: int = 2, channels: int = 3):
        super().__init__()
        self.size_multiple = 2 ** depth
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.encoders = nn.ModuleList(
            nn.Sequential(*[ResBlock(c) for _ in range(blocks)]) for c in widths[:-1])
        self.downs = nn.ModuleList(
            nn.Conv2d(c, c2, 3, stride=2, padding=1) for c, c2 in zip(widths, widths[1:]))
        self.middle = nn.Sequential(*[ResBlock(widths[-1]) for _ in range(blocks)])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(c2, c, 2, stride=2) for c, c2 in zip(widths, widths[1:]))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in widths[:-1])
        self.decoders = nn.ModuleList(
            nn.Sequential(*[ResBlock(c) for _ in range(blocks)]) for c in widths[:-1])
        self.tail = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        skips = []
        for encode, down in zip(self.encoders, self.downs):
            h = encode(h)
            skips.append(h)
            h = down(h)
        h = self.middle(h)
        for up, fuse, decode, skip in zip(*(reversed(m) for m in
                                            (self.ups, self.fuse, self.decoders)), reversed(skips)):
            h = decode(fuse(torch.cat([up(h), skip], dim=1)))
        return x + self.tail(h)


BUILTIN = {"resunet": ResidualUNet}


def parse_kwargs(kwargs: dict | str | None) -> dict:
    """``--net-kwargs``: a dict, a JSON object string, or nothing."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--net-kwargs is not valid JSON ({err}): {kwargs!r}") from None
    kwargs = kwargs or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"--net-kwargs must be a JSON object, got {kwargs!r}")
    return kwargs


def build_net(spec: str = "resunet", kwargs: dict | str | None = None) -> nn.Module:
    """``resunet`` (the built-in baseline) or ``package.module:Class``, called with ``kwargs``
    (a dict or a JSON object string)."""
    kwargs = parse_kwargs(kwargs)
    if spec in BUILTIN:
        cls = BUILTIN[spec]
    else:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"--net must be one of {sorted(BUILTIN)} or 'package.module:Class', "
                             f"got {spec!r}")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"--net {spec!r}: cannot import it: {err}") from None
    net = cls(**kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"--net {spec!r} built a {type(net).__name__}, not a torch.nn.Module")
    return net


def size_multiple(net: nn.Module, default: int = 32) -> int:
    """What the net's input sides must be multiples of: its ``size_multiple`` if it says."""
    return int(getattr(net, "size_multiple", default))


def restore(net: nn.Module, image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Run ``net`` on a whole (B, 3, H, W) image of any size: pad the bottom and right edges
    (replicating them) up to multiples of ``multiple``, then crop the output back."""
    h, w = image.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    padded = nn.functional.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
    return net(padded)[..., :h, :w]
