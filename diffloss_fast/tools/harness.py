"""What the measuring tools share: the argument vocabulary of their subcommands, and the loss
step they time.

One flag name per meaning across the subcommands: ``--prior`` is the diffusion prior (a
checkpoint file, or a preset's architecture with random weights), ``--prior-config`` a
checkpoint file's architecture, ``--activation-checkpointing`` recomputation of the restored
branch's activations in the backward pass. Earlier spellings stay as hidden aliases.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..loss import DiffLoss
from ..prior import build_prior, load_prior
from .baselines import BASELINES, canonical, make_baseline

PRIOR_CONFIG_HELP = ("the architecture of a --prior checkpoint file: a preset name or a JSON "
                     "object of guided-diffusion create_model arguments (default adm-256-uncond)")
ACTIVATION_CHECKPOINTING_HELP = ("recompute the restored branch's activations in the backward "
                                 "pass instead of keeping them (less memory, one more forward)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands check their arguments together once parsed
    (``set_defaults(check=fn)``, called as ``fn(parser, args)``), so that what this machine
    cannot run is a usage error before any work, from ``main`` and ``parse_args`` alike."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        check = self.get_default("check")
        if check is not None:
            check(self, namespace)
        return namespace, extras


def positive_int(text: str) -> int:
    """argparse type of batch sizes, resolutions and step counts."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def hidden_alias(p: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """An earlier spelling of an option, still accepted for one release, no longer listed."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)


def add_prior_arguments(p: argparse.ArgumentParser, *, default: str | None, default_text: str,
                        legacy_weights: bool) -> None:
    """``--prior PATH|PRESET`` and ``--prior-config``; ``legacy_weights``: also the hidden
    ``--checkpoint FILE`` of earlier releases, whose architecture was ``--prior``."""
    from ..prior import PRESETS
    p.add_argument("--prior", default=default, metavar="PATH|PRESET",
                   help="the diffusion prior: a guided-diffusion checkpoint file (.pt/.pth state "
                        "dict or .safetensors), or a preset's architecture with random weights "
                        f"({', '.join(PRESETS)}); {default_text}")
    p.add_argument("--prior-config", default=None, metavar="PRESET|JSON", help=PRIOR_CONFIG_HELP)
    if legacy_weights:
        hidden_alias(p, "--checkpoint", "checkpoint", default=None)


def _parse_config(text: str | None):
    """A --prior-config value: a preset name, or a dict from a JSON object."""
    if text and text.lstrip().startswith("{"):
        return json.loads(text)
    return text


def prior_source(prior: str, prior_config: str | None, legacy_weights: str | None = None):
    """(weights file, or None for random weights; architecture) named by ``--prior``,
    ``--prior-config`` and the hidden ``--checkpoint FILE`` (its architecture ``--prior``)."""
    from ..prior import DEFAULT_PRESET, PRESETS
    config = _parse_config(prior_config)
    if legacy_weights:
        return legacy_weights, config or prior
    if prior in PRESETS:
        return None, prior
    return prior, config or DEFAULT_PRESET


def check_prior(parser: argparse.ArgumentParser, prior: str | None, prior_config: str | None,
                legacy_weights: str | None = None) -> None:
    """A usage error unless the prior options name a preset or an existing file, and a
    readable architecture."""
    from ..prior import PRESETS
    if legacy_weights:
        if prior is not None and prior not in PRESETS:
            parser.error(f"argument --prior: {prior} and --checkpoint {legacy_weights} both name "
                         "weights; give the file once, as --prior FILE")
        prior = legacy_weights
    if prior is not None and prior not in PRESETS and not Path(prior).is_file():
        parser.error(f"argument --prior: {prior} is neither a file nor a preset "
                     f"({', '.join(PRESETS)})")
    if prior_config is None:
        return
    if prior in PRESETS and not legacy_weights:
        parser.error(f"argument --prior-config: --prior {prior} is a preset, its own "
                     "architecture; --prior-config describes a checkpoint file's")
    try:
        config = _parse_config(prior_config)
    except json.JSONDecodeError as err:
        parser.error(f"argument --prior-config: not valid JSON ({err})")
    if isinstance(config, str) and config not in PRESETS:
        parser.error(f"argument --prior-config: {config!r} is neither a preset "
                     f"({', '.join(PRESETS)}) nor a JSON object")


def check_device(parser: argparse.ArgumentParser, text: str):
    """The torch device ``--device`` names; one this machine lacks is a usage error."""
    import torch

    from . import hardware
    try:
        device = hardware.resolve_device(text)
    except (ValueError, RuntimeError) as err:
        parser.error(f"argument --device: {err}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"argument --device: {device} asked for, but this torch sees "
                     f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def check_fast_path(parser: argparse.ArgumentParser, device, variants, backend: str,
                    channels_last: str = "auto") -> None:
    """A usage error for the variants and the backend ``device`` cannot run: CUDA graphs need
    CUDA, the fused kernels Triton on CUDA (or under its interpreter) and channels_last."""
    from .. import ops
    fused = [v for v in variants if v in FUSED_VARIANTS]
    if fused and channels_last == "off":
        parser.error(f"--channels-last off: {', '.join(fused)} run the fused kernels, which read "
                     f"channels_last activations only")
    graphed = [v for v in variants if v in ("fast-graphed", "fast-two-pass")]
    if graphed and device.type != "cuda":
        parser.error(f"{graphed[0]} replays CUDA graphs: it needs a CUDA device, and this run "
                     f"is on {device}")
    if "fast-fused" in variants and not ops.triton_available(device):
        parser.error(f"fast-fused runs the fused norms' Triton kernels: they need a CUDA "
                     f"device, and this run is on {device}")
    if "fast-fp8" in variants:
        from ..ops.fp8 import check_device as check_fp8_device
        try:
            check_fp8_device(device)
        except ValueError as err:
            parser.error(f"fast-fp8: {err}")
    try:
        ops.resolve_backend(backend, device)
    except ValueError as err:
        parser.error(f"argument --backend: {err}")


def add_measurement_arguments(p: argparse.ArgumentParser, *, device_help: str,
                              prior_default: str | None, prior_default_text: str,
                              resolution_default: int | None) -> None:
    """The options bench, memory and profile share: what to measure, on which device."""
    p.add_argument("--device", default="auto", help=device_help)
    add_prior_arguments(p, default=prior_default, default_text=prior_default_text,
                        legacy_weights=True)
    p.add_argument("--resolution", type=positive_int, default=resolution_default)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="of the fast variants; each baseline's is in its name")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "native"))


def write_json(path: str | Path, data: dict) -> None:
    """A command's numbers as indented JSON, its folder made first; says where it went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


# --- the loss step the tools time ----------------------------------------------------------
TERMS = {"both": (1e-3, 1e-6), "semantic": (0.0, 1e-6), "natural": (1e-3, 0.0)}
# fast: eager with PyTorch's norms (DiffLoss(fused_kernels=False, execution="eager"))
# fast-fused: eager with the fused kernels (fused_kernels=True, execution="eager")
# fast-graphed: fast-fused with both branches replayed as CUDA graphs (the default on CUDA)
# fast-compiled: torch.compile of the whole truncated UNet (execution="compiled", or --compile)
# fast-regional: torch.compile block by block (execution="regional")
# fast-two-pass: fast-graphed with the two branches apart, subtracted at the end (the default
# before difference propagation; beside it, what propagating the difference costs)
# fast-fp8: DiffLoss(precision="fp8") as it runs by default (its e4m3 convolutions are a
# fake-quantized twin until a native FP8 convolution exists: what fp8 costs today)
FAST_VARIANTS = ("fast", "fast-fused", "fast-graphed", "fast-two-pass", "fast-compiled",
                 "fast-regional", "fast-fp8")
VARIANTS = BASELINES + FAST_VARIANTS
COMPILED_VARIANTS = ("reference-compiled", "fast-compiled", "fast-regional")
FUSED_VARIANTS = ("fast-fused", "fast-graphed", "fast-two-pass")  # the fused kernels read channels_last only
# --compile: how fast-compiled compiles; "graph" is torch.compile's default mode on the whole
# truncated UNet, the others are DiffLoss compile modes (reduce-overhead adds CUDA graphs)
COMPILE_CHOICES = ("graph", "regional", "reduce-overhead", "max-autotune",
                   "max-autotune-no-cudagraphs")
CHANNELS_LAST_CHOICES = {"auto": "auto", "on": True, "off": False}


def eager_twin(variant: str) -> str:
    """The eager variant doing the same arithmetic as ``variant``: where FLOPs are counted
    (a compiled graph or a replayed CUDA graph hides its ops from the counter)."""
    if variant == "reference-compiled":
        return "reference-bf16"
    return "fast" if variant in FAST_VARIANTS else variant


def compile_option(choice: str) -> bool | str:
    """DiffLoss's ``compile`` argument for a ``--compile`` choice."""
    return True if choice == "graph" else choice


def measurement_prior(weights: str | None, config, device: torch.device, what: str):
    """The prior to measure with: real weights from the file ``weights``, else random ones
    (``what``, timing or memory, does not depend on the weights), on ``device``."""
    if weights:
        prior = load_prior(weights, config=config)
        print(f"prior: {weights} ({config})")
    else:
        prior = build_prior(config)
        print(f"prior: {config} with random weights ({what} does not depend on the weights; "
              "pass --prior FILE for real ones)")
    return prior.to(device)


def make_loss(prior, variant: str, terms: str, *, precision: str, backend: str,
              checkpoint: bool = False, channels_last: bool | str = "auto",
              compile_mode: bool | str = True):
    """The loss module of ``variant`` for ``terms``; a baseline (:mod:`.baselines`) ignores the
    fast path's options and runs in its own precision, inside ``baselines.numerics``."""
    natural_weight, semantic_weight = TERMS[terms]
    variant = canonical(variant)
    if variant in BASELINES:
        return make_baseline(prior, variant, natural_weight=natural_weight,
                             semantic_weight=semantic_weight)
    if variant == "fast-fp8":
        return DiffLoss(prior, natural_weight=natural_weight, semantic_weight=semantic_weight,
                        precision="fp8", backend=backend, checkpoint=checkpoint,
                        channels_last=channels_last)
    if variant == "fast-compiled":  # compile= carries torch.compile's mode too
        how = dict(compile=compile_mode)
    else:
        how = dict(execution={"fast-graphed": "graphed", "fast-two-pass": "graphed",
                              "fast-regional": "regional"}.get(variant, "eager"))
        if variant == "fast-two-pass":
            how["propagation"] = "two-pass"
    return DiffLoss(prior, natural_weight=natural_weight, semantic_weight=semantic_weight,
                    precision=precision, backend=backend, checkpoint=checkpoint,
                    channels_last=channels_last, fused_kernels=variant in FUSED_VARIANTS,
                    **how)


def make_inputs(batch: int, resolution: int, device: torch.device, seed: int = 0):
    """Random restored/gt images in [0, 1], timesteps and noise (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, 3, resolution, resolution)
    restored = torch.rand(shape, device=device, generator=gen).requires_grad_(True)
    gt = torch.rand(shape, device=device, generator=gen)
    t = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    noise = torch.randn(shape, device=device, generator=gen)
    return restored, gt, t, noise


def loss_step(loss_fn, restored, gt, t, noise):
    """One training step's worth of the loss: forward, then backward to the restored image."""
    restored.grad = None
    loss_fn(restored, gt, t=t, noise=noise).backward()

# --- kernel categories, shared by profile and roofline -----------------------------------
# (category, lower-case name fragments). Convolutions before matmuls: cuDNN's convolution
# kernels are implicit GEMMs and carry "gemm" in their names too. "copy" is every copy kernel:
# layout changes (NCHW <-> NHWC, concatenation) and dtype casts alike.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "matmul", "cutlass", "aten::mm", "aten::bmm", "aten::addmm",
                "aten::linear")),
    ("norm", ("group_norm", "groupnorm", "_gn_", "native_norm", "batch_norm", "moments",
              "internalgradients", "fusedparams", "gammabeta")),
    ("fused loss ops", ("q_sample", "weighted_l2", "_wl2_")),
    ("copy", ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "aten::cat", "catarray",
                     "contiguous", "permute", "clone")),
    ("elementwise", ("elementwise", "vectorized", "silu", "sigmoid", "add", "mul", "triton_poi",
                     "triton_")),
    ("reduction", ("reduce", "sum", "mean")),
)


def categorize(name: str) -> str:
    """The category of a kernel or operator name; ``other`` when no rule matches."""
    low = name.lower()
    for category, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"
