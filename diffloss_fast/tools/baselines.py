"""The baselines a speedup is quoted against: what a user would run instead of DiffLoss.

Each is named for what it is, and all run upstream's own modules:

- ``reference-fp32``: ReferenceDiffLoss in strict fp32 (TF32 off while it runs, restored after);
- ``reference-tf32``: the same with PyTorch's default TF32 settings;
- ``reference-bf16``: upstream's UNet under ``torch.autocast(dtype=bfloat16)``;
- ``upstream-fp16``: guided-diffusion's own fp16 torso (``use_fp16=True``, ``convert_to_fp16()``),
  as its published flags run the ADM checkpoints;
- ``reference-compiled``: ``reference-bf16`` under ``torch.compile``.

For the semantic term alone every baseline runs only upstream's ``input_blocks`` and
``middle_block`` (:class:`UpstreamLoss`): a careful user never runs the decoder for it, and a
speedup against the full UNet would count work nobody does.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
from guided_diffusion.nn import timestep_embedding

from ..loss import ReferenceDiffLoss, resolve_precision
from ..prior import UNetModel

BASELINES = ("reference-fp32", "reference-tf32", "reference-bf16", "upstream-fp16",
             "reference-compiled")
ALIASES = {"reference": "reference-fp32"}  # the name of reference-fp32 in earlier releases
# What each baseline computes in: the label of its rows.
PRECISIONS = {"reference-fp32": "fp32", "reference-tf32": "tf32", "reference-bf16": "bf16",
              "upstream-fp16": "fp16", "reference-compiled": "bf16"}
# (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) while a baseline runs:
# strict fp32, and PyTorch's defaults. Set, not assumed, so that each name stays true whatever
# the process set before.
_TF32 = {"reference-fp32": (False, False), "reference-tf32": (False, True)}


def canonical(name: str) -> str:
    """A variant's current name (``reference`` is ``reference-fp32``)."""
    return ALIASES.get(name, name)


def unsupported(name: str, device: torch.device) -> str | None:
    """Why ``name`` is not run on ``device``, or None when it is."""
    if name == "upstream-fp16" and device.type != "cuda":
        return "upstream's fp16 torso is timed on CUDA only"
    return None


@contextlib.contextmanager
def numerics(name: str) -> Iterator[None]:
    """The TF32 settings baseline ``name`` runs under, for the block only (forward and
    backward both run inside it); other variants leave the process's settings alone."""
    if name not in _TF32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _TF32[name]
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fp16_torso(prior: UNetModel) -> UNetModel:
    """A copy of ``prior`` as guided-diffusion runs it with ``use_fp16=True``: the convolutions
    of input, middle and output blocks in fp16 (``convert_to_fp16``) and the torso's activations
    cast to fp16 (the model's ``dtype``); the time embedding, norms' statistics, attention's
    softmax and the output layer stay in fp32, as upstream keeps them."""
    torso = copy.deepcopy(prior)
    torso.convert_to_fp16()
    torso.dtype = torch.float16
    return torso


def upstream_features(prior: UNetModel, x: torch.Tensor, t: torch.Tensor, *,
                      decoder: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """ε_θ (the first three output channels; None without the decoder) and the middle block's
    output, by upstream's modules called in ``UNetModel.forward``'s order: no hooks, so that
    torch.compile can take the whole of it."""
    emb = prior.time_embed(timestep_embedding(t, prior.model_channels))
    h, skips = x.type(prior.dtype), []
    for module in prior.input_blocks:
        h = module(h, emb)
        if decoder:
            skips.append(h)
    middle = h = prior.middle_block(h, emb)
    if not decoder:
        return None, middle
    for module in prior.output_blocks:
        h = module(torch.cat([h, skips.pop()], dim=1), emb)
    return prior.out(h.type(x.dtype))[:, :3], middle


class UpstreamLoss(ReferenceDiffLoss):
    """ReferenceDiffLoss computed by :func:`upstream_features`: with both terms (or the natural
    term) the same full UNet, which ``compile=True`` hands to torch.compile whole; for the
    semantic term alone the encoder and middle block only, never the decoder."""

    def __init__(self, prior: UNetModel, *, compile: bool = False, **kwargs):
        super().__init__(prior, **kwargs)
        self.decoder = self.natural_weight > 0
        run = functools.partial(upstream_features, decoder=self.decoder)
        self._run = torch.compile(run, dynamic=False) if compile else run

    def _run_prior(self, x_t, t):
        return self._run(self.prior, x_t, t)

    def _loss(self, restored, gt, t, noise, c):
        if self.decoder:
            return super()._loss(restored, gt, t, noise, c)
        acc = torch.promote_types(restored.dtype, torch.float32)
        view = lambda v: v.to(acc).view(-1, 1, 1, 1)  # noqa: E731
        sqrt_abar, sqrt_1m = view(c["sqrt_abar"]), view(c["sqrt_one_minus_abar"])
        noise = noise.detach().to(acc)
        xt_res = sqrt_abar * (restored.to(acc) * self.scale + self.offset) + sqrt_1m * noise
        xt_gt = sqrt_abar * (gt.detach().to(acc) * self.scale + self.offset) + sqrt_1m * noise
        precision = resolve_precision(self.precision, restored.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.autocast(restored.device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                _, h_gt = self._run_prior(xt_gt, t)
            _, h_res = self._run_prior(xt_res, t)
        semantic = (view(c["weight"]) * (h_res.to(acc) - h_gt.to(acc)).square()).mean()
        self.last_terms = {"natural": None, "semantic": semantic.detach()}
        return self.semantic_weight * semantic


def make_baseline(prior: UNetModel, name: str, *, natural_weight: float,
                  semantic_weight: float) -> ReferenceDiffLoss:
    """The loss module of baseline ``name`` for these weights. Run it inside
    ``numerics(name)``; ``upstream-fp16`` brings its own fp16 copy of the prior."""
    name = canonical(name)
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    if name == "upstream-fp16":
        prior = fp16_torso(prior)
    # the fp16 torso casts inside upstream's forward; autocast is the other baselines' bf16
    precision = "bf16" if PRECISIONS[name] == "bf16" else "fp32"
    weights = dict(natural_weight=natural_weight, semantic_weight=semantic_weight,
                   precision=precision)
    if name == "reference-compiled" or natural_weight == 0:
        return UpstreamLoss(prior, compile=name == "reference-compiled", **weights)
    return ReferenceDiffLoss(prior, **weights)
