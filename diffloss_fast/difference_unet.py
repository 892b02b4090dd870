"""The truncated prior on (target, difference) pairs: what DiffLoss runs in bf16 and fp16.

Two low-precision passes of the prior, subtracted at the end, cannot resolve what DiffLoss
measures when the restoration is good and the timestep high: the two inputs then differ by
less than the storage format's rounding. ``DifferenceUNet`` carries through every layer the
target's activation ``a`` and the difference ``d`` (restored minus target), each stored at its
own scale (``d`` times ``d_scale``, a power of two). Linear ops (convolutions, projections, pooling, upsampling, concatenation, residual
sums) map ``d`` by itself, without bias; the nonlinear ones compute ``g(a + d) - g(a)`` in fp32
without cancellation (:mod:`diffloss_fast.ops.difference`). Its outputs are the differences the
loss reads: of the predicted noise and of the middle block's features. The work is that of two
passes; ``a`` needs no autograd, and the backward runs through the difference only, as the
ordinary backward at the restored point.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fast_unet import FastUNet
from .ops.conv_dispatch import Block
from .ops.frozen_conv import frozen_conv2d
from .ops.pair_conv import (NextNorm, PairNormStatistics, pair_conv2d, pair_prologue,
                            resampled_size)
from guided_diffusion.unet import AttentionBlock, Downsample, ResBlock, Upsample

# (target activation, difference times d_scale, d_scale): what flows from layer to layer
Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Concat(NamedTuple):
    """A decoder block's input, its own pair and the encoder's skip pair, not yet concatenated
    along channels: a fused block (``cat-in``) reads the two in place, anything else joins
    them first (:meth:`joined`)."""
    h: Pair
    skip: Pair

    def joined(self) -> Pair:
        return (torch.cat([self.h[0], self.skip[0]], 1), torch.cat([self.h[1], self.skip[1]], 1),
                self.h[2])


class StatPair(tuple):
    """A pair (a, d, s) with ``stats``, its next norm's statistics, added up by the epilogue
    of the fused convolution that wrote it: the next block's fused prologue takes them instead
    of a statistics pass. Any op that makes a new pair drops them."""

    def __new__(cls, pair: Pair, stats: PairNormStatistics):
        self = super().__new__(cls, pair)
        self.stats = stats
        return self


def resampling(blk: ResBlock) -> str | None:
    """How a ResBlock resamples its first norm's output (and its skip path): ``"up"``,
    ``"down"`` (guided-diffusion's resampling without convolution) or None."""
    if not blk.updown:
        return None
    return "up" if isinstance(blk.h_upd, Upsample) else "down"


def in_kind(blk: ResBlock) -> str:
    """The dispatch kind of a ResBlock's first norm + convolution: ``in``, or ``up-in`` /
    ``down-in`` where the norm's output is resampled before the convolution."""
    resample = resampling(blk)
    return "in" if resample is None else f"{resample}-in"


def input_shape(x: Pair | Concat) -> tuple[int, int, int, int]:
    """(batch, channels, height, width) of a block's input, concatenated or not."""
    if isinstance(x, Concat):
        n, c, height, width = x.h[0].shape
        return n, c + x.skip[0].shape[1], height, width
    return tuple(x[0].shape)


class DifferenceUNet(FastUNet):
    """``forward(a_t, d_t, t, d_scale) -> (d_eps or None, d_h)``: the differences of the
    predicted noise and of the middle-block features between ``a_t + d_t / d_scale`` and
    ``a_t``, times ``d_scale`` (a 0-dim fp32 tensor). Built like :class:`FastUNet`, from the
    same arguments.

    ``fused_blocks``: the keys (:class:`~diffloss_fast.ops.conv_dispatch.Block`) of the
    ResBlock norm + convolution blocks that run as one fused Triton kernel
    (:mod:`diffloss_fast.ops.pair_conv`), the norm applied as the convolution loads its input
    and the residual sum added as it writes, and of the decoder blocks whose concatenated
    input the fused kernels read in place (``cat-in``: its norm's statistics, its first and
    its skip convolution, no concatenation written), and of the resampling ResBlocks'
    first blocks (``up-in``, ``down-in``: the norm's output resampled as the kernel loads
    it), and of the noise head (``head``: its norm + SiLU + convolution); empty (the library
    path) unless the convolution dispatch table measured them faster on this card."""

    fused_blocks: frozenset[str] = frozenset()

    def _conv(self, conv: nn.Conv2d, pair: Pair, bias: bool = True) -> Pair:
        a, d, s = pair
        return frozen_conv2d(conv, a, bias=bias), frozen_conv2d(conv, d, bias=False), s

    def _linear(self, fn, pair: Pair) -> Pair:
        """A linear, bias-free op applied to both (pooling, upsampling)."""
        return fn(pair[0]), fn(pair[1]), pair[2]

    def _norm_silu_pair(self, norm: nn.GroupNorm, pair: Pair, scale=None, shift=None,
                        x_bias=None, silu=True) -> Pair:
        a, d, s = pair
        return (*self.plan.norm_silu_difference(a, d, s, norm.num_groups, norm.weight,
                                                norm.bias, norm.eps, scale, shift, x_bias,
                                                silu), s)

    def _fused(self, kind: str, shape: tuple[int, int, int, int], conv: nn.Conv2d) -> bool:
        """Whether this norm + convolution block, of an input of ``shape``, runs as one fused
        kernel (:mod:`diffloss_fast.ops.conv_dispatch`): only where the GPU sweep measured it
        faster."""
        if not self.fused_blocks:
            return False
        n, c, height, width = shape
        return Block(kind, n, c, conv.out_channels, height, width).key() in self.fused_blocks

    def _next_norm(self, blk: ResBlock, shape) -> NextNorm | None:
        """The ResBlock's second norm, for the epilogue of its first convolution (output of
        ``shape``) to add up its statistics, where that norm is applied by a fused block; else
        None (the norm computes its own)."""
        if not (blk.use_scale_shift_norm and self._fused("out", shape, blk.out_layers[3])):
            return None
        norm = blk.out_layers[0]
        return NextNorm(norm.num_groups, norm.eps, blk.in_layers[2].bias)

    @functools.cached_property
    def _followers(self) -> dict[ResBlock, tuple[str, nn.GroupNorm, nn.Conv2d]]:
        """Each ResBlock whose output the next layer reads as its input through a norm that
        a fused block applies, and that block (its kind, norm and convolution): a ResBlock's
        first block in the encoder and the middle block (a downsampling one's included) and
        within a decoder block (an upsampling one's after a ResBlock; a decoder block's first
        input is a concatenation), and the noise head after the decoder's last ResBlock."""
        found = {}
        decoder = list(self.output_blocks) if self.decoder else []  # truncated without it
        encoder = [layer for block in (*self.input_blocks, self.middle_block) for layer in block]
        for layers in (encoder, *map(list, decoder)):
            found.update((first, (in_kind(then), then.in_layers[0], then.in_layers[2]))
                         for first, then in zip(layers, layers[1:])
                         if isinstance(first, ResBlock) and isinstance(then, ResBlock))
        last = decoder[-1][-1] if decoder else None
        if isinstance(last, ResBlock):
            found[last] = ("head", self.out_norm, self.out_conv)
        return found

    def _follower_norm(self, blk: ResBlock, h: Pair) -> NextNorm | None:
        """The first norm of the layer that reads this ResBlock's output, for the epilogue of
        its fused last convolution (whose output has h's shape) to add up its statistics,
        where that norm is applied by a fused block; else None. Not in compiled blocks, which
        hand on plain pairs."""
        then = self._followers.get(blk) if self._run_compiled is None else None
        if then is None or not self._fused(then[0], tuple(h[0].shape), then[2]):
            return None
        return NextNorm(then[1].num_groups, then[1].eps)

    def _pair_conv(self, conv: nn.Conv2d, pair: Pair, bias, prologue, residual=None,
                   next_norm: NextNorm | None = None, concat=None,
                   resample: str | None = None) -> tuple[Pair, PairNormStatistics | None]:
        """A fused block's convolution: ``conv`` (its weight, ``bias`` on the target only) of
        ``prologue``'s pair norm of ``pair`` (followed by ``concat``'s (a2, d2) where given,
        resampled where ``resample`` says), plus ``residual``'s pair; and ``next_norm``'s
        statistics of the output, or None."""
        a, d, s = pair
        out = pair_conv2d(a, d, s, conv.weight, bias, padding=conv.padding, prologue=prologue,
                          residual=residual, concat=concat, next_norm=next_norm,
                          resample=resample)
        return (out[0], out[1], s), (out[2] if next_norm is not None else None)

    def _fused_concat(self, blk: ResBlock, x: Concat) -> bool:
        """Whether this decoder block reads its concatenated input in place (``cat-in``):
        a ResBlock whose skip is a 1x1 convolution, where the sweep measured it faster."""
        if blk.updown or not isinstance(blk.skip_connection, nn.Conv2d):
            return False
        return self._fused("cat-in", input_shape(x), blk.in_layers[2])

    def _concat_in(self, blk: ResBlock, x: Concat):
        """(h, x, statistics of h or None) of a decoder ResBlock after its first norm +
        convolution and its skip convolution, both reading the two parts of its input in
        place (see :meth:`_next_norm`)."""
        norm, conv = blk.in_layers[0], blk.in_layers[2]
        (a, d, s), (a2, d2, _) = x
        prologue = pair_prologue(a, d, s, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                 concat=(a2, d2))
        bias = conv.bias if not blk.use_scale_shift_norm else None
        n, _, height, width = a.shape
        next_norm = self._next_norm(blk, (n, conv.out_channels, height, width))
        h, stats = self._pair_conv(conv, (a, d, s), bias, prologue, next_norm=next_norm,
                                   concat=(a2, d2))
        x, _ = self._pair_conv(blk.skip_connection, (a, d, s), None, None, concat=(a2, d2))
        return h, x, stats

    def _resblock(self, blk: ResBlock, x: Pair | Concat, film: torch.Tensor) -> Pair:
        norm, conv = blk.in_layers[0], blk.in_layers[2]
        emb_out = film[:, blk.film, None, None]  # the same for both: t is shared
        scale_shift = blk.use_scale_shift_norm
        # with a scale-shift norm the first convolution's bias rides in the norm after it
        conv_bias = conv.bias if not scale_shift else None
        if isinstance(x, Concat):
            if self._fused_concat(blk, x):
                return self._resblock_out(blk, *self._concat_in(blk, x), emb_out)
            x = x.joined()
        stats = None
        skip = blk.skip_connection
        if fused := self._fused(in_kind(blk), input_shape(x), conv):
            resample = resampling(blk)
            n, _, height, width = x[0].shape
            height, width = resampled_size(height, width, resample)
            next_norm = self._next_norm(blk, (n, conv.out_channels, height, width))
            prologue = pair_prologue(*x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                     statistics=getattr(x, "stats", None))
            h, stats = self._pair_conv(conv, x, conv_bias, prologue, next_norm=next_norm,
                                       resample=resample)
            if resample is not None:
                x = self._resample(blk.x_upd, x)
        else:
            h = self._norm_silu_pair(norm, x)
            if blk.updown:
                h, x = self._resample(blk.h_upd, h), self._resample(blk.x_upd, x)
            h = self._conv(conv, h, bias=not scale_shift)
        if isinstance(skip, nn.Conv2d):
            # a 1x1 skip where the channels change runs on the pair kernel with its block
            # (the sweep times the whole ResBlock): one weight read for both halves
            x = self._pair_conv(skip, x, None, None)[0] if fused else self._conv(skip, x, False)
        return self._resblock_out(blk, h, x, stats, emb_out)

    def _resblock_out(self, blk: ResBlock, h: Pair, x: Pair, stats: PairNormStatistics | None,
                      emb_out: torch.Tensor) -> Pair:
        """A ResBlock's second norm (+ FiLM) + convolution of h, and the residual sum with
        its skip path's x; ``stats``: the norm's statistics of h where the convolution that
        wrote h added them up."""
        conv, out_norm, out_conv = blk.in_layers[2], blk.out_layers[0], blk.out_layers[3]
        scale_shift = blk.use_scale_shift_norm
        if scale_shift and self._fused("out", tuple(h[0].shape), out_conv):
            prologue = pair_prologue(*h, out_norm.num_groups, out_norm.weight, out_norm.bias,
                                     out_norm.eps, *emb_out.chunk(2, dim=1), x_bias=conv.bias,
                                     statistics=stats)
            out, stats = self._pair_conv(out_conv, h, blk.residual_bias, prologue,
                                         residual=x[:2], next_norm=self._follower_norm(blk, h))
            return out if stats is None else StatPair(out, stats)
        if scale_shift:
            h = self._norm_silu_pair(out_norm, h, *emb_out.chunk(2, dim=1), x_bias=conv.bias)
        else:
            h = self._norm_silu_pair(out_norm, (h[0] + emb_out, h[1], h[2]))
        h = self._conv(out_conv, h, bias=False)
        # the last (and a skip) convolution's biases ride in the residual sum
        return self.plan.residual_bias_add(x[0], h[0], blk.residual_bias), x[1] + h[1], x[2]

    def _resample(self, layer: nn.Module, pair: Pair) -> Pair:
        if isinstance(layer, Downsample):
            if layer.use_conv:
                return self._conv(layer.op, pair)
            return self._linear(self.plan.avg_pool, pair)
        if isinstance(layer, Upsample):
            pair = self._linear(self.plan.upsample, pair)
            return self._conv(layer.conv, pair) if layer.use_conv else pair
        return pair  # nn.Identity

    def _attn(self, blk: AttentionBlock, x: Pair) -> Pair:
        b, c, height, width = x[0].shape
        heads = blk.num_heads
        normed = self._norm_silu_pair(blk.norm, x, silu=False)
        weight = blk.qkv.weight.squeeze(-1)

        def heads_of(qkv):  # guided-diffusion's legacy order: channels are (head, q|k|v, dh)
            return [u.transpose(1, 2) for u in qkv.unflatten(-1, (heads, 3, c // heads)).unbind(3)]

        tokens = [n.flatten(2).transpose(1, 2) for n in normed[:2]]           # (b, T, c)
        q_a, k_a, v_a = heads_of(F.linear(tokens[0], weight, blk.qkv.bias))
        q_d, k_d, v_d = heads_of(F.linear(tokens[1], weight))
        # (b, heads, T, dh)
        out = self.plan.attention_difference(q_a, k_a, v_a, q_d, k_d, v_d, x[2])
        proj = blk.proj_out.weight.squeeze(-1)
        out_a = F.linear(out[0].transpose(1, 2).flatten(2), proj, blk.proj_out.bias)
        out_d = F.linear(out[1].transpose(1, 2).flatten(2), proj)
        back = lambda o: o.transpose(1, 2).unflatten(2, (height, width))  # noqa: E731
        return x[0] + back(out_a), x[1] + back(out_d), x[2]

    def _concat(self, h: Pair, skip: Pair) -> Pair | Concat:
        """Joined, unless some block may read the two in place (see :class:`Concat`)."""
        return Concat(h, skip) if self.fused_blocks else Concat(h, skip).joined()

    def _feature(self, h: Pair) -> torch.Tensor:
        return h[1]

    def _head(self, h: Pair) -> torch.Tensor | None:
        """The noise head's difference as one fused block (its norm + SiLU the pair
        convolution's prologue, the statistics handed on where the last ResBlock added them
        up) where the sweep measured it faster (``head``); else None."""
        if not self._fused("head", tuple(h[0].shape), self.out_conv):
            return None
        norm = self.out_norm
        prologue = pair_prologue(*h, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                 statistics=getattr(h, "stats", None))
        return self._pair_conv(self.out_conv, h, None, prologue)[0][1]

    def _eps(self, h: Pair) -> torch.Tensor:
        fused = self._head(h)
        return self._library_head(h) if fused is None else fused

    def _library_head(self, h: Pair) -> torch.Tensor:
        """The noise head's difference through the pair norm and the library convolution."""
        normed = self._norm_silu_pair(self.out_norm, h)
        return frozen_conv2d(self.out_conv, normed[1], bias=False)

    def forward(self, a: torch.Tensor, d: torch.Tensor, t: torch.Tensor, d_scale: torch.Tensor):
        return self._walk((self._activation(a.detach()), self._activation(d), d_scale),
                          self._film(t))
