"""The frozen diffusion prior: presets, random construction and safe checkpoint loading."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# guided-diffusion decorates its checkpoint helper with the deprecated torch.cuda.amp API.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.script_util import create_model
    from guided_diffusion.unet import UNetModel

PRESETS: dict[str, dict] = {
    # OpenAI guided-diffusion, ImageNet 256x256 unconditional (256x256_diffusion_uncond.pt).
    "adm-256-uncond": dict(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
        attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
        class_cond=False, resblock_updown=True, use_scale_shift_norm=True,
        use_new_attention_order=False, dropout=0.0),
    # The same family of blocks, small enough for CPU tests and demos (random weights only).
    "tiny": dict(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
        attention_resolutions="16,8", num_head_channels=16, learn_sigma=True,
        class_cond=False, resblock_updown=True, use_scale_shift_norm=True,
        use_new_attention_order=False, dropout=0.0),
}
DEFAULT_PRESET = "adm-256-uncond"


def resolve_config(config: str | Mapping | None) -> dict:
    """A preset name or a dict of ``create_model`` keyword arguments -> keyword arguments."""
    if config is None:
        config = DEFAULT_PRESET
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"config: unknown preset {config!r}; expected one of "
                             f"{sorted(PRESETS)} or a dict of create_model arguments")
        return dict(PRESETS[config])
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a preset name, a dict or None, got {type(config).__name__}")


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _create(config) -> UNetModel:
    kwargs = resolve_config(config)
    try:
        model = create_model(**kwargs)
    except TypeError as err:
        raise ValueError(f"config: not valid create_model arguments: {err}") from None
    if kwargs.get("class_cond"):
        raise ValueError("config: class_cond=True priors need labels; DiffLoss uses an "
                         "unconditional prior")
    return model


def build_prior(config: str | Mapping | None = None, seed: int = 0) -> UNetModel:
    """The prior's architecture with random weights (benchmarks, tests, demos).

    Every parameter, including the output projections guided-diffusion initialises to zero,
    gets a random value, so that the network is not an identity and predicts nonzero noise.
    """
    model = _create(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return _freeze(model)


def prior_architecture(config: str | Mapping | None = None) -> UNetModel:
    """The prior's architecture on the meta device: every shape, no weights and no memory
    (for analysis such as ``diffloss-fast roofline``; DiffLoss refuses it)."""
    with torch.device("meta"):
        return _freeze(_create(config))


def _read_state_dict(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt file
            raise ValueError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - weights_only refusals and corrupt files alike
        raise ValueError(f"checkpoint {path}: cannot be loaded as a weights-only state dict "
                         f"(corrupt, or a pickle that would run code): {err}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_prior(checkpoint, config: str | Mapping | None = None) -> UNetModel:
    """Load a pre-trained prior, frozen, in eval mode, fp32, on the CPU.

    ``checkpoint`` is a ``.pt``/``.pth`` state dict (read with ``weights_only=True``, so a
    checkpoint never runs code), a ``.safetensors`` file, or a state dict.
    """
    source = "state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    state = _read_state_dict(checkpoint)
    model = _create(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[:3]}")
        if wrong:
            k, got, want = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches, first {k}: checkpoint {got} vs "
                         f"config {want}")
        raise ValueError(f"checkpoint {source}: weights do not match the config: "
                         + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return _freeze(model.float())


def downsampling_factor(prior: UNetModel) -> int:
    """Input height and width must be multiples of this (2 ** number of downsamplings)."""
    return 2 ** (len(prior.channel_mult) - 1)
