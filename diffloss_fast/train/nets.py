"""Restoration networks: three built-in ones that span what the field trains (a small residual
U-Net, a NAFNet-class convolutional network, a Restormer-class transformer), or any nn.Module
named by import path."""
from __future__ import annotations

import copy
import importlib
import json

import torch
import torch.nn.functional as F
from torch import nn


def _through_u(net: nn.Module, h: torch.Tensor, middle: nn.Module) -> torch.Tensor:
    """The U of a network with ``encoders``/``downs`` going down, ``middle`` at the bottom, and
    ``ups``/``fuse``/``decoders`` coming up, each level's skip concatenated before its fuse."""
    skips = []
    for encode, down in zip(net.encoders, net.downs):
        h = encode(h)
        skips.append(h)
        h = down(h)
    h = middle(h)
    for up, fuse, decode, skip in zip(*(reversed(m) for m in (net.ups, net.fuse, net.decoders)),
                                      reversed(skips)):
        h = decode(fuse(torch.cat([up(h), skip], dim=1)))
    return h


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
    art model (``nafnet`` and ``restormer`` are the bigger built-ins).
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
        return x + self.tail(_through_u(self, self.head(x), self.middle))


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of each pixel: the transformer's norm on a feature map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def simple_gate(x):
    """Half the channels gating the other half: a nonlinearity without an activation."""
    a, b = x.chunk(2, dim=1)
    return a * b


class GatedConvBlock(nn.Module):
    """NAFNet-class block: a depthwise-conv mixer with a simple gate and channel attention from
    global pooling, then a gated pointwise feed-forward; each branch scaled by a learned
    per-channel factor that starts at zero, so a deep stack starts as the identity."""

    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        hidden = channels * expand
        self.norm1 = LayerNorm2d(channels)
        self.expand1 = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                       nn.Conv2d(hidden // 2, hidden // 2, 1))
        self.project1 = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.expand2 = nn.Conv2d(channels, hidden, 1)
        self.project2 = nn.Conv2d(hidden // 2, channels, 1)
        self.scale1 = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale2 = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        h = simple_gate(self.depthwise(self.expand1(self.norm1(x))))
        x = x + self.scale1 * self.project1(h * self.attention(h))
        h = simple_gate(self.expand2(self.norm2(x)))
        return x + self.scale2 * self.project2(h)


class NAFNetLike(nn.Module):
    """A NAFNet-class U-shaped convolutional restoration network (about 16 GMAC per 256x256
    image with the defaults): gated depthwise-conv blocks, stride-2 convolutions down,
    pixel-shuffle up, skips added, the output a correction to the input.

    ``encoder_blocks[i]`` blocks at level i (one stride-2 downsampling after each level, width
    doubling), ``middle_blocks`` at the bottom, ``decoder_blocks[i]`` on the way back up. Inputs
    must be multiples of ``2 ** len(encoder_blocks)``.
    """

    def __init__(self, width: int = 32, encoder_blocks=(2, 2, 4, 8), middle_blocks: int = 12,
                 decoder_blocks=(2, 2, 2, 2), channels: int = 3):
        super().__init__()
        if len(encoder_blocks) != len(decoder_blocks):
            raise ValueError(f"encoder_blocks {tuple(encoder_blocks)} and decoder_blocks "
                             f"{tuple(decoder_blocks)} need one entry per level each")
        self.size_multiple = 2 ** len(encoder_blocks)
        widths = [width * 2 ** i for i in range(len(encoder_blocks) + 1)]
        stack = lambda c, n: nn.Sequential(*[GatedConvBlock(c) for _ in range(n)])  # noqa: E731
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.encoders = nn.ModuleList(stack(c, n) for c, n in zip(widths, encoder_blocks))
        self.downs = nn.ModuleList(nn.Conv2d(c, 2 * c, 2, stride=2) for c in widths[:-1])
        self.middle = stack(widths[-1], middle_blocks)
        self.ups = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1, bias=False),
                                               nn.PixelShuffle(2)) for c in widths[:-1])
        self.decoders = nn.ModuleList(stack(c, n) for c, n in zip(widths, decoder_blocks))
        self.tail = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        skips = []
        for encode, down in zip(self.encoders, self.downs):
            h = encode(h)
            skips.append(h)
            h = down(h)
        h = self.middle(h)
        for up, decode, skip in zip(reversed(self.ups), reversed(self.decoders), reversed(skips)):
            h = decode(up(h) + skip)
        return x + self.tail(h)


class TransposedAttention(nn.Module):
    """Restormer-class MDTA: attention across channels rather than pixels (a C/heads x C/heads
    map per head, linear in the number of pixels), queries, keys and values from pointwise then
    depthwise convolutions, queries and keys L2-normalised with a learned temperature per head."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.qkv_depthwise = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1,
                                       groups=3 * channels, bias=False)
        self.project = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w)
                   for t in self.qkv_depthwise(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project((attn @ v).reshape(b, c, h, w))


class GatedDconvFeedForward(nn.Module):
    """Restormer-class GDFN: pointwise expansion, a depthwise 3x3, one half GELU-gating the
    other, pointwise projection back."""

    def __init__(self, channels: int, expansion: float):
        super().__init__()
        hidden = int(channels * expansion)
        self.expand = nn.Conv2d(channels, 2 * hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden,
                                   bias=False)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        gate, value = self.depthwise(self.expand(x)).chunk(2, dim=1)
        return self.project(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """Pre-norm residual transposed attention, then a pre-norm residual gated feed-forward."""

    def __init__(self, channels: int, heads: int, expansion: float):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(channels, eps=1e-5), LayerNorm2d(channels, eps=1e-5)
        self.attention = TransposedAttention(channels, heads)
        self.feed_forward = GatedDconvFeedForward(channels, expansion)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class RestormerLike(nn.Module):
    """A Restormer-class U-shaped transformer restoration network (about 140 GMAC per 256x256
    image with the defaults): transposed-attention blocks at every scale, pixel-unshuffle down
    and pixel-shuffle up, skips concatenated, refinement blocks at full resolution, the output a
    correction to the input.

    Level i has ``blocks[i]`` blocks of ``width * 2 ** i`` channels and ``heads[i]`` heads; the
    last level is the bottleneck. Inputs must be multiples of ``2 ** (len(blocks) - 1)``.
    """

    def __init__(self, width: int = 48, blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8),
                 refinement_blocks: int = 4, expansion: float = 2.66, channels: int = 3):
        super().__init__()
        if len(blocks) != len(heads) or len(blocks) < 2:
            raise ValueError(f"blocks {tuple(blocks)} and heads {tuple(heads)} need one entry "
                             "per level each, at least two levels")
        levels = len(blocks)
        self.size_multiple = 2 ** (levels - 1)
        widths = [width * 2 ** i for i in range(levels)]
        stack = lambda c, n, nh: nn.Sequential(  # noqa: E731
            *[TransformerBlock(c, nh, expansion) for _ in range(n)])
        self.head = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.encoders = nn.ModuleList(stack(c, n, nh) for c, n, nh in
                                      zip(widths[:-1], blocks[:-1], heads[:-1]))
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1, bias=False),
                                                 nn.PixelUnshuffle(2)) for c in widths[:-1])
        self.bottleneck = stack(widths[-1], blocks[-1], heads[-1])
        self.ups = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, padding=1, bias=False),
                                               nn.PixelShuffle(2)) for c in widths[:-1])
        # the full-resolution decoder keeps the concatenation's doubled width
        self.fuse = nn.ModuleList([nn.Identity()] + [nn.Conv2d(2 * c, c, 1, bias=False)
                                                     for c in widths[1:-1]])
        decoder_widths = [2 * width] + widths[1:-1]
        self.decoders = nn.ModuleList(stack(c, n, nh) for c, n, nh in
                                      zip(decoder_widths, blocks[:-1], heads[:-1]))
        self.refinement = stack(2 * width, refinement_blocks, heads[0])
        self.tail = nn.Conv2d(2 * width, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.tail(self.refinement(_through_u(self, self.head(x), self.bottleneck)))


BUILTIN = {"resunet": ResidualUNet, "nafnet": NAFNetLike, "restormer": RestormerLike}


def gmacs(net: nn.Module, height: int = 256, width: int = 256) -> float:
    """Multiply-accumulates of one forward of ``net`` on one (1, 3, height, width) image, in
    billions: torch.utils.flop_counter's count (convolutions, matmuls) halved, on a meta-device
    copy so that nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(net).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, 3, height, width, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


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
    """A built-in net by name (``resunet``, ``nafnet``, ``restormer``) or
    ``package.module:Class``, called with ``kwargs`` (a dict or a JSON object string)."""
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
