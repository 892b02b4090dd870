"""The prior truncated to the layers DiffLoss needs, in the compute dtype and memory layout.

Built from an upstream guided-diffusion ``UNetModel`` without changing it: convolution and
attention weights are cast once to the compute dtype (the upstream fp16 recipe: GroupNorm
statistics and the timestep MLP stay fp32), attention runs through
``F.scaled_dot_product_attention`` (or xformers), the output convolution is sliced to the three
noise channels, and without the natural term the decoder is not built at all. Each
GroupNorm (+ FiLM) + SiLU, residual sum and 2x resampling runs as the op plan says
(:func:`diffloss_fast.ops.plan_ops`): plain PyTorch ops or fused Triton kernels. Each
convolution keeps only its weight for the backward pass (:mod:`diffloss_fast.ops.frozen_conv`).
The ResBlocks' convolutions leave their biases to the ops after them: the first one's to the
norm that reads its output, the last one's (and a 1x1 skip convolution's) to the residual sum
(:mod:`diffloss_fast.ops.residual_bias_add`); the fused kernels add them as they load, instead
of a pass of their own over each output. Every ResBlock's projection of the timestep embedding
(its FiLM scale and shift) comes out of one stacked matmul per forward instead of one silu,
matmul and cast per block.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .ops import OpPlan, plan_ops
from .ops.frozen_conv import frozen_conv2d
from .prior import UNetModel
from guided_diffusion.unet import AttentionBlock, Downsample, ResBlock, Upsample

ATTENTION_BACKENDS = ("sdpa", "xformers")


def _enough_recompiles():
    """Every block structure and input shape is one entry of ``_run``'s compile cache: ADM-256
    has a few dozen, more than dynamo's default limit of 8 per function."""
    import torch._dynamo
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: 128})


def _cast_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool,
               device: torch.device) -> nn.Module:
    """Copy ``module`` onto ``device`` with convolution and norm parameters cast; the
    timestep-embedding projections stay fp32 (guided-diffusion's own fp16 recipe), shared with
    the prior when it is on ``device`` already."""
    memo = {}
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if isinstance(sub, nn.Linear):
                data = p if p.device == device else p.detach().to(device)
            else:
                data = p.detach().to(device=device, dtype=dtype)
                if channels_last and data.dim() == 4:
                    data = data.contiguous(memory_format=torch.channels_last)
            memo[id(p)] = data if data is p else nn.Parameter(data, requires_grad=False)
    return copy.deepcopy(module, memo)


def _eps_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The output convolution sliced to its first three channels (the predicted noise)."""
    sliced = nn.Conv2d(conv.in_channels, 3, conv.kernel_size, padding=conv.padding,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    sliced.weight = nn.Parameter(conv.weight.detach()[:3].clone(memory_format=torch.preserve_format),
                                 requires_grad=False)
    sliced.bias = nn.Parameter(conv.bias.detach()[:3].clone(), requires_grad=False)
    return sliced


class FastUNet(nn.Module):
    """``forward(x_t, t) -> (eps or None, h)``: predicted noise and middle-block features.
    ``plan``: the ops to run (:func:`diffloss_fast.ops.plan_ops`); None: the PyTorch twins.
    The fused kernels read ``channels_last`` activations in place (others they copy)."""

    def __init__(self, unet: UNetModel, *, dtype: torch.dtype, decoder: bool,
                 device: torch.device | str | None = None,
                 channels_last: bool = False, attention: str = "sdpa",
                 checkpoint: bool = False, compile_blocks: bool = False,
                 plan: OpPlan | None = None):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        if attention == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError:
                raise ValueError("attention='xformers' needs the xformers package "
                                 "(pip install diffloss-fast[xformers])") from None
        if unet.num_classes is not None:
            raise ValueError("class-conditional priors are not supported")
        self.dtype, self.decoder, self.attention = dtype, decoder, attention
        self.channels_last, self.checkpoint = channels_last, checkpoint
        # Regional compilation: one compiled function for all blocks, so blocks of the same
        # structure and input shape share one compiled graph instead of being compiled again.
        self._run_compiled = torch.compile(self._run, dynamic=False) if compile_blocks else None
        self.model_channels = unet.model_channels
        device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.plan = plan if plan is not None else plan_ops("torch", False, device, dtype)
        cast = lambda m: _cast_copy(m, dtype, channels_last, device)  # noqa: E731
        # guided-diffusion's sinusoid frequencies, computed as it computes them (fp32, on the
        # CPU) and kept on the device: its timestep_embedding copies them over on every call,
        # which a CUDA graph cannot capture.
        half = self.model_channels // 2
        self._time_freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32)
                                     / half).to(device)
        self.time_embed = cast(unet.time_embed)  # fp32 and small: shared when on device
        self.input_blocks = cast(unet.input_blocks)
        self.middle_block = cast(unet.middle_block)
        if decoder:
            self.output_blocks = cast(unet.output_blocks)
            out = cast(unet.out)
            self.out_norm, self.out_conv = out[0], _eps_conv(out[2])
        for blk in self.modules():
            if isinstance(blk, ResBlock):
                blk.register_buffer("residual_bias", self._residual_bias(blk), persistent=False)
        self._stack_film_projections()

    @staticmethod
    def _residual_bias(blk: ResBlock) -> torch.Tensor:
        """The bias the residual sum adds: the last convolution's, plus the skip
        convolution's when the skip path has one."""
        bias = blk.out_layers[3].bias.detach()
        if isinstance(blk.skip_connection, nn.Conv2d):
            bias = bias + blk.skip_connection.bias.detach()
        return bias

    def _stack_film_projections(self) -> None:
        """Every ResBlock's projection of the timestep embedding (its FiLM scale and shift)
        as rows of one matrix, so one matmul per forward makes them all; each block keeps
        views of its rows and the columns ``blk.film`` of the product. All blocks read the
        same silu(emb), so this is the same arithmetic, without a silu, a matmul and a cast
        launched per block (three or four kernels, about 40 blocks a branch)."""
        blocks = [blk for blk in self.modules() if isinstance(blk, ResBlock)]
        weight = torch.cat([blk.emb_layers[1].weight.detach() for blk in blocks])
        bias = torch.cat([blk.emb_layers[1].bias.detach() for blk in blocks])
        self.register_buffer("film_weight", weight, persistent=False)
        self.register_buffer("film_bias", bias, persistent=False)
        start = 0
        for blk in blocks:
            p = blk.emb_layers[1]
            blk.film = slice(start, start + p.out_features)
            # the block's own copy gives way to views of the stacked rows (no second copy)
            p.weight = nn.Parameter(weight[blk.film], requires_grad=False)
            p.bias = nn.Parameter(bias[blk.film], requires_grad=False)
            start += p.out_features

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """``guided_diffusion.nn.timestep_embedding(t, model_channels)``, from device-resident
        frequencies."""
        args = t[:, None].float() * self._time_freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.model_channels % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    # --- layers -------------------------------------------------------------------------
    def _norm_silu(self, norm: nn.GroupNorm, h: torch.Tensor, scale=None, shift=None,
                   x_bias=None, pass_x=False, silu=True):
        """silu(GroupNorm(h + x_bias), FiLM'd by scale/shift if given), without the silu if
        ``silu=False``, as the plan runs it; with ``pass_x``, (that, h). GroupNorm32
        semantics: both accumulate the statistics of bf16/fp16 inputs in fp32 and round the
        result once, so no fp32 copy of h is made (or saved for the backward pass)."""
        return self.plan.norm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                   scale, shift, x_bias, pass_x, silu)

    def _resblock(self, blk: ResBlock, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        norm, conv = blk.in_layers[0], blk.in_layers[2]
        # x goes on to the skip path through the norm, whose backward then adds the skip
        # path's gradient as it writes its own (fused kernels; the twin hands x back as is)
        h, x = self._norm_silu(norm, x, pass_x=True)
        if blk.updown:
            h, x = self._resample(blk.h_upd, h), self._resample(blk.x_upd, x)
        emb_out = film[:, blk.film, None, None]  # this block's emb_layers(emb), see forward
        out_norm, out_conv = blk.out_layers[0], blk.out_layers[3]
        if blk.use_scale_shift_norm:  # the first convolution's bias rides in the norm after it
            h = self._norm_silu(out_norm, frozen_conv2d(conv, h, bias=False),
                                *emb_out.chunk(2, dim=1), x_bias=conv.bias)
        else:
            h = self._norm_silu(out_norm, frozen_conv2d(conv, h) + emb_out)
        # the last (and a skip) convolution's biases ride in the residual sum
        h = frozen_conv2d(out_conv, h, bias=False)
        skip = blk.skip_connection
        x = frozen_conv2d(skip, x, bias=False) if isinstance(skip, nn.Conv2d) else skip(x)
        return self.plan.residual_bias_add(x, h, blk.residual_bias)

    def _conv(self, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        return frozen_conv2d(conv, h)

    def _resample(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, Downsample):
            return frozen_conv2d(layer.op, h) if layer.use_conv else self.plan.avg_pool(h)
        if isinstance(layer, Upsample):
            h = self.plan.upsample(h)
            return frozen_conv2d(layer.conv, h) if layer.use_conv else h
        return h  # nn.Identity

    def _attn(self, blk: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads = blk.num_heads
        # x goes on to the residual sum through the norm, as in a ResBlock
        normed, x = self._norm_silu(blk.norm, x, pass_x=True, silu=False)
        tokens = normed.flatten(2).transpose(1, 2)                             # (b, T, c)
        qkv = F.linear(tokens, blk.qkv.weight.squeeze(-1), blk.qkv.bias)
        # guided-diffusion's legacy order: channels are (head, q|k|v, head_dim).
        q, k, v = qkv.unflatten(-1, (heads, 3, c // heads)).unbind(3)       # (b, T, heads, d)
        if self.attention == "xformers":
            import xformers.ops as xops
            a = xops.memory_efficient_attention(q, k, v)
        else:
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        a = F.linear(a.flatten(2), blk.proj_out.weight.squeeze(-1), blk.proj_out.bias)
        return x + a.transpose(1, 2).unflatten(2, (height, width))

    def _layer(self, layer: nn.Module, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, ResBlock):
            return self._resblock(layer, h, film)
        if isinstance(layer, AttentionBlock):
            return self._attn(layer, h)
        if isinstance(layer, (Downsample, Upsample)):
            return self._resample(layer, h)
        if isinstance(layer, nn.Conv2d):
            return self._conv(layer, h)
        raise TypeError(f"unsupported layer in the prior: {type(layer).__name__}")

    def _run(self, block: nn.Sequential, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = self._layer(layer, h, film)
        return h

    def _block(self, block: nn.Sequential, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        run = self._run_compiled or self._run
        with _enough_recompiles() if self._run_compiled else contextlib.nullcontext():
            if self.checkpoint and torch.is_grad_enabled():
                return activation_checkpoint(run, block, h, film, use_reentrant=False)
            return run(block, h, film)

    # --- the truncated forward ---------------------------------------------------------
    def _film(self, t: torch.Tensor) -> torch.Tensor:
        """Every ResBlock's emb_layers (SiLU, Linear) at once, in fp32, cast once."""
        emb_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(self.timestep_embedding(t).to(emb_dtype))
        return F.linear(F.silu(emb), self.film_weight, self.film_bias).to(self.dtype)

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        """An input in the compute dtype and memory layout."""
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _concat(self, h, skip):
        """A decoder block's input: the activation and the encoder's skip, channel-wise."""
        return torch.cat([h, skip], dim=1)

    def _feature(self, h):
        """What the loss reads of the middle block's output."""
        return h

    def _eps(self, h):
        """The predicted noise from the last decoder block's output."""
        return frozen_conv2d(self.out_conv, self._norm_silu(self.out_norm, h))

    def _walk(self, h, film: torch.Tensor):
        """The U: encoder, middle block, and (with the decoder) the output head."""
        skips = []
        for block in self.input_blocks:
            h = self._block(block, h, film)
            skips.append(h)
        h = self._block(self.middle_block, h, film)
        if not self.decoder:
            return None, self._feature(h)
        mid = self._feature(h)
        for block in self.output_blocks:
            h = self._block(block, self._concat(h, skips.pop()), film)
        return self._eps(h), mid

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        return self._walk(self._activation(x), self._film(t))
