"""FP8 (e4m3) convolutions of the prior's pair pass, and the delayed scaling they read.

``precision="fp8"`` quantizes the operands of every convolution of the prior to
``torch.float8_e4m3fn`` (3 mantissa bits, largest finite value 448):

- weights once, when the truncated copy is built, with one scale per output channel
  (:func:`quantize_weight`: the channel's largest magnitude lands on 448): the prior is
  frozen, so one quantization serves every call.
- activations with one scale per tensor, kept separately for the target activation ``a`` and
  for the difference ``d`` of each convolution: the two have unrelated ranges (``d`` is stored
  times ``d_scale``), and one scale for both would waste the narrow format on one of them.
  The scale is *delayed* (:class:`DelayedScaling`): it comes from the largest magnitude seen
  in earlier calls (an amax history), because the prior is frozen and its ranges are stable,
  and a scale known before the tensor is read is what a fused FP8 kernel needs (it quantizes
  as it loads, with no extra pass to find the range first). The first call has no history and
  uses its own amax; later calls give the history's amax two binades of headroom
  (``HEADROOM``). Values beyond the scale's range saturate at ±448 (e4m3fn has no inf).

The attention's qkv and output projections are left in bf16: they are a small share of the
prior's work (the 3x3 convolutions dominate it), and they feed the softmax, where an error in
``a`` moves the attention weights themselves rather than adding noise to a difference.

The convolution (:func:`e4m3_conv2d`) multiplies the quantized operands exactly and
accumulates in fp32, then applies ``x_scale * w_scale[c]`` and the bias in fp32 and rounds
once to the storage dtype (bf16): what an FP8 GEMM with fp32 accumulation and a bf16 epilogue
computes. Here it is a *twin*: the e4m3 values are converted to fp32 (on the CPU) or bf16 (on
CUDA, accumulating in fp32), both of which hold every e4m3 value exactly, and the convolution
runs in that dtype. No native FP8 convolution kernel exists in this package yet; on CUDA the
twin runs too, for accuracy, not speed. The fused FP8 convolution is separate work.

The backward (dgrad) is the ordinary one in bf16 with the unquantized bf16 weight: the
quantizer's derivative is taken as the identity (straight-through). The prior is frozen and
only the input's gradient is wanted, so the gradient is that of the bf16 prior at the point the
FP8 forward reached; the rounding of the forward enters it only through the activations the
nonlinear ops save.

Nothing here reads a value on the host: the history, the scales and the amaxes stay tensors on
the device, updated in place, so that a CUDA graph can capture a call and replay it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .checks import is_channels_last
from .frozen_conv import input_gradient

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Calls an activation's amax is remembered for. Long enough to span the spread of timesteps
# and images of a few batches, short enough to follow a change of data.
HISTORY_LENGTH = 16
# A delayed scale maps HEADROOM times the earlier calls' amax onto 448: an activation may
# exceed what earlier calls saw (a batch of other timesteps, other images), and what goes past
# the scale's range saturates, clipping the largest values, which carry the most signal. Two
# binades of headroom cost only the precision of the smallest values (e4m3 spans about 18
# binades, and its relative precision is the same in each of its 15 normal ones).
HEADROOM = 4.0
# The CUDA devices with FP8 tensor cores (Ada and Hopper onwards).
MIN_CAPABILITY = (8, 9)


def check_device(device: torch.device) -> None:
    """Refuse a device where ``precision="fp8"`` has no meaning: CUDA before sm_89 (no FP8
    tensor cores), and devices other than the CPU (which runs the twin) and CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CAPABILITY:
            raise ValueError(
                f"precision='fp8' needs a CUDA device with FP8 tensor cores (compute capability "
                f"8.9 or later: Ada, Hopper); {device} is sm_{major}{minor}: use "
                f"precision='bf16' or 'fp16'")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"precision='fp8' runs on CUDA (sm_89+) and, as a fake-quantized twin, "
                         f"on the CPU; got {device}")


def amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps ``amax`` onto 448 (``amax / 448``), in fp32; 1 where ``amax`` is 0
    or not finite, so that a tensor of zeros quantizes to zeros and nothing divides by 0."""
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, amax / E4M3_MAX, torch.ones_like(amax))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to the nearest e4m3 value, saturating at ±448: a
    ``torch.float8_e4m3fn`` tensor. ``scale`` broadcasts against ``x`` (fp32)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution weight ``(C_out, ...)`` quantized with one scale per output channel:
    ``(q, scale)``, ``q`` in e4m3 and ``scale`` fp32 of shape ``(C_out,)``, with
    ``q * scale`` ≈ ``weight`` and each channel's largest magnitude quantized to 448."""
    amax = weight.detach().float().flatten(1).abs().amax(dim=1)
    scale = amax_to_scale(amax)
    return quantize(weight, scale.view(-1, *(1,) * (weight.dim() - 1))), scale


class DelayedScaling(nn.Module):
    """Per-tensor scales for ``slots`` tensors from the amaxes of earlier calls.

    ``history`` (slots, length) holds each slot's amax over the last ``length`` calls, newest
    first; ``pending`` the amaxes of the current call. :meth:`begin_call`, once per call of the
    network, moves ``pending`` into the history and reads each slot's largest value into
    ``amax``; :meth:`scale` then gives a tensor's scale from that, times ``HEADROOM`` (from the
    tensor's own amax where the history is empty: the first call), and records the tensor's
    own amax in ``pending``. A fused kernel, which forms its input as it loads it and so cannot
    have its amax read first, takes :meth:`scale_for` (the history's scale alone) and hands the
    amax it found to :meth:`record`. ``calls`` counts :meth:`begin_call` on the host (no
    device value read): from the second call on, every slot's history holds an earlier call.

    The history moves at the start of the next call, not as each tensor is read: a recomputation
    of the same call (activation checkpointing) reads the same scales and records the same
    amaxes, so it reproduces the forward exactly. Every update is in place on these buffers,
    and no value is read on the host."""

    def __init__(self, slots: int, length: int = HISTORY_LENGTH,
                 device: torch.device | str | None = None):
        super().__init__()
        if slots < 1 or length < 1:
            raise ValueError(f"DelayedScaling needs slots >= 1 and length >= 1, got {slots}, "
                             f"{length}")
        self.register_buffer("history", torch.zeros(slots, length, device=device))
        self.register_buffer("pending", torch.zeros(slots, device=device))
        self.register_buffer("amax", torch.zeros(slots, device=device))
        self.calls = 0

    def begin_call(self) -> None:
        """Commit the previous call's amaxes (zeros before the first call) and read this
        call's amax of each slot from the history."""
        self.history.copy_(torch.roll(self.history, 1, dims=1))
        self.history[:, 0].copy_(self.pending)
        torch.amax(self.history, dim=1, out=self.amax)
        self.calls += 1

    def scale(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """``x``'s scale (a 0-dim fp32 tensor): from the history's amax of earlier calls
        times ``HEADROOM``, or from ``x``'s own amax when there is none. Records ``x``'s amax
        for later calls."""
        own = x.detach().abs().amax().float()
        own = torch.where(torch.isfinite(own), own, torch.zeros_like(own))
        self.pending[slot].copy_(own)
        earlier = self.amax[slot]
        return amax_to_scale(torch.where(earlier > 0, earlier * HEADROOM, own))

    def scale_for(self, slot: int) -> torch.Tensor:
        """The slot's scale from the history alone (``HEADROOM`` times the earlier calls'
        amax), for a tensor whose own amax is not known before it is read: 1 where the
        history holds only zeros (before a second call, or after calls whose tensor was all
        zeros), as for a tensor of zeros."""
        return amax_to_scale(self.amax[slot] * HEADROOM)

    def record(self, slot: int, amax: torch.Tensor) -> None:
        """Record ``amax`` (0-dim, on the device), found elsewhere, as the slot's amax of this
        call, as :meth:`scale` records its tensor's own: a non-finite one as 0."""
        amax = amax.detach().float()
        self.pending[slot].copy_(torch.where(torch.isfinite(amax), amax,
                                             torch.zeros_like(amax)))


def _operand_dtype(device: torch.device) -> torch.dtype:
    """The dtype the twin convolves e4m3 values in: one that holds them exactly and
    accumulates in fp32 (bf16 on CUDA; on the CPU fp32, whose convolutions are the fast ones)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _e4m3_forward(x, x_scale, w_q, w_scale, bias, stride, padding, dilation, groups,
                  out_dtype):
    op = _operand_dtype(x.device)
    y = F.conv2d(quantize(x, x_scale).to(op), w_q.to(op), None, stride, padding, dilation,
                 groups)
    y = y.float() * (x_scale * w_scale).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(out_dtype)


class _E4M3Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, x_scale, w_q, w_scale, bias, stride, padding, dilation,
                groups):
        ctx.save_for_backward(weight)
        ctx.config = (x.shape, stride, padding, dilation, groups)
        ctx.channels_last = is_channels_last(x)
        return _e4m3_forward(x, x_scale, w_q, w_scale, bias, stride, padding, dilation, groups,
                             x.dtype)

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = input_gradient(grad.to(weight.dtype), weight, ctx.config, ctx.channels_last)
        return grad_x, *(None,) * 9


def e4m3_conv2d(conv: nn.Conv2d, x: torch.Tensor, x_scale: torch.Tensor, *,
                bias: bool = True) -> torch.Tensor:
    """``conv(x)`` with ``x`` quantized to e4m3 at ``x_scale`` and the weight at its
    per-channel scales (``conv.weight_e4m3``, ``conv.weight_scale``, from
    :func:`quantize_weight`), in ``x``'s dtype. Differentiable to ``x`` only, straight through
    the quantizer, with ``conv.weight`` (kept for the backward pass alone)."""
    b = conv.bias if bias else None
    args = (x_scale, conv.weight_e4m3, conv.weight_scale, b, conv.stride, conv.padding,
            conv.dilation, conv.groups)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _e4m3_forward(x, *args, x.dtype)
    return _E4M3Conv2d.apply(x, conv.weight, *args)
