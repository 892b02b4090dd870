"""The frozen diffusion prior: presets, random construction and safe checkpoint loading."""
from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
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


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
# Wrappers whose state dicts prefix every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _corrupt(path: Path, detail: str) -> ValueError:
    """The file's size is in the message: a download cut short shows against the published one."""
    size = path.stat().st_size
    if size == 0:
        found = "empty file"
    elif size >= 2 ** 30:
        found = f"{detail}; {size / 2 ** 30:.2f} GiB on disk"
    elif size >= 2 ** 20:
        found = f"{detail}; {size / 2 ** 20:.1f} MiB on disk"
    else:
        found = f"{detail}; {size} bytes on disk"
    return ValueError(f"checkpoint {path}: truncated or corrupt ({found}); "
                      f"re-download or re-save it")


def _pickles_complete(path: Path, count: int = 5) -> bool:
    """Whether the file's leading pickle streams (the legacy torch.save layout has five before
    the raw tensor bytes) are whole. Walks the opcodes only: nothing is unpickled or run."""
    with open(path, "rb") as f:
        for _ in range(count):
            if not f.read(1):
                return True
            f.seek(-1, 1)
            try:
                for _ in pickletools.genops(f):
                    pass
            except ValueError:
                return False
    return True


def _read_state_dict_file(path: Path):
    """``torch.load(weights_only=True)``, its failures told apart: a truncated or damaged file
    needs downloading again, a whole file that is refused needs saving differently."""
    if path.stat().st_size == 0:
        raise _corrupt(path, "")
    with open(path, "rb") as f:
        is_zip_format = f.read(4) == b"PK\x03\x04"
    if is_zip_format and not zipfile.is_zipfile(path):
        raise _corrupt(path, "its zip directory, at the end of the file, is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's text suggests weights_only=False; never pass that on for an untrusted file.
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        detail = found.group(1).split(" was not an allowed")[0].strip() if found else "refused"
        detail = detail.replace("Unsupported global: GLOBAL ", "it references ")
        if zipfile.is_zipfile(path) or _pickles_complete(path):
            raise ValueError(
                f"checkpoint {path}: refused by weights-only loading ({detail}): it is not a plain "
                f"torch.save state dict, and loading it could run code; re-save the weights with "
                f"torch.save(model.state_dict(), path) or as .safetensors") from None
        raise _corrupt(path, f"unreadable pickle: {detail}") from None
    except Exception as err:  # noqa: BLE001 - any other parse failure means a damaged file
        detail = str(err).strip().split("\n")[0].split(". ")[0]
        detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        raise _corrupt(path, detail[:120]) from None


def _read_state_dict(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = Path(checkpoint)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        hint = f"; it holds {', '.join(found[:3])}" + (", ..." if len(found) > 3 else "") \
            if found else ""
        raise IsADirectoryError(f"checkpoint {path}: is a directory; expected a checkpoint file "
                                f"({', '.join(CHECKPOINT_SUFFIXES)}){hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise _corrupt(path, f"not a complete safetensors file: {err}") from None
    state = _read_state_dict_file(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path}: holds a {type(state).__name__}, not a state dict")
    return state


def _strip_wrapper_prefixes(state: Mapping) -> Mapping:
    """Keys saved through DistributedDataParallel (``module.``) or torch.compile
    (``_orig_mod.``) name the same parameters as the bare model's."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES
                       if all(isinstance(k, str) and k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape(state: Mapping, key: str) -> tuple | None:
    value = state.get(key)
    return tuple(value.shape) if torch.is_tensor(value) else None


def _implied_architecture(state: Mapping, image_size: int = 256) -> dict:
    """The create_model arguments that a guided-diffusion UNet state dict's keys and shapes
    determine. Head counts, attention order, dropout and image_size leave no trace in the
    weights and are not reported; attention_resolutions is given for ``image_size``."""
    arch: dict = {}
    first = _shape(state, "input_blocks.0.0.weight")
    if first is None or len(first) != 4:
        return arch
    channels, in_channels = first[0], first[1]
    arch["num_channels"] = channels
    out = _shape(state, "out.2.weight")
    if out is not None and in_channels == 3 and out[0] in (3, 6):
        arch["learn_sigma"] = out[0] == 6
    emb = _shape(state, "input_blocks.1.0.emb_layers.1.weight")
    res_out = _shape(state, "input_blocks.1.0.out_layers.3.weight")
    if emb is not None and res_out is not None:
        arch["use_scale_shift_norm"] = emb[0] == 2 * res_out[0]

    # Each level of the decoder ends in an upsampler (all but the last level): a resampling
    # res block (resblock_updown) or an Upsample conv, after the block's res block/attention.
    kinds: dict[int, dict[int, str]] = {}
    n_in = 0
    for key in state:
        if not isinstance(key, str):
            continue
        if m := re.match(r"input_blocks\.(\d+)\.", key):
            n_in = max(n_in, int(m[1]) + 1)
        if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(in_layers|qkv|conv)\.", key):
            kinds.setdefault(int(m[1]), {})[int(m[2])] = m[3]
    n_out = max(kinds, default=-1) + 1
    ups = sorted(i for i, subs in kinds.items()
                 if any(j >= 1 and kind in ("in_layers", "conv") for j, kind in subs.items()))
    if n_out == 0:
        return arch
    res_blocks = ups[0] if ups else n_out - 1
    step = res_blocks + 1
    levels = n_out // step
    if (res_blocks < 1 or n_out % step or ups != [res_blocks + step * k for k in range(levels - 1)]
            or n_in != 1 + levels * res_blocks + levels - 1):
        return arch
    arch["num_res_blocks"] = res_blocks
    if ups:
        upsampler = kinds[ups[0]]
        arch["resblock_updown"] = upsampler[max(upsampler)] == "in_layers"
    widths = [_shape(state, f"input_blocks.{1 + level * step}.0.out_layers.3.weight")
              for level in range(levels)]
    if all(w is not None and w[0] % channels == 0 for w in widths):
        arch["channel_mult"] = ",".join(str(w[0] // channels) for w in widths)
    attention = [2 ** level for level in range(levels)
                 if f"input_blocks.{1 + level * step}.1.qkv.weight" in state]
    if attention and all(image_size % ds == 0 for ds in attention):
        arch["attention_resolutions"] = ",".join(str(image_size // ds) for ds in attention)
    return arch


def _architecture_hint(state: Mapping, expected: Mapping, image_size: int) -> str:
    hint = ""
    first = _shape(state, "input_blocks.0.0.weight")
    if not any(k in state for k in expected):
        hint = " None of the config's keys are in the checkpoint: is it a guided-diffusion UNet?"
    elif first is not None and len(first) == 4 and first[1] != 3:
        hint = (f" Its first layer takes {first[1]} channels, not 3: it is not an image prior "
                f"that create_model builds (a super-resolution model?).")
    else:
        got = _implied_architecture(state, image_size)
        want = _implied_architecture(expected, image_size)
        diffs = [f"{k}={v!r} (config: {want[k]!r})" for k, v in got.items()
                 if k in want and v != want[k]]
        diffs = [d + f" at image_size={image_size}" if d.startswith("attention") else d
                 for d in diffs]
        if diffs:
            hint = f" The weights imply {', '.join(diffs)}."
    return (hint + " Pass the checkpoint's architecture with config= (a preset name or a dict of "
            "create_model arguments; CLI: --prior-config).")


def load_prior(checkpoint, config: str | Mapping | None = None) -> UNetModel:
    """Load a pre-trained prior, frozen, in eval mode, fp32, on the CPU.

    ``checkpoint`` is a ``.pt``/``.pth`` state dict (read with ``weights_only=True``, so a
    checkpoint never runs code), a ``.safetensors`` file, or a state dict. Keys saved through
    DistributedDataParallel (``module.``) or torch.compile (``_orig_mod.``) are accepted.
    """
    source = "state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    state = _strip_wrapper_prefixes(_read_state_dict(checkpoint))
    with torch.device("meta"):  # shapes only: a mismatch is reported before any allocation
        expected = _create(config).state_dict()
    if "label_emb.weight" in state:
        classes = _shape(state, "label_emb.weight")
        count = f" ({classes[0]} classes)" if classes else ""
        raise ValueError(f"checkpoint {source}: class-conditional weights{count}, such as "
                         f"guided-diffusion's 256x256_diffusion.pt; DiffLoss needs the "
                         f"unconditional prior: use 256x256_diffusion_uncond.pt instead")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, _shape(state, k), tuple(v.shape)) for k, v in expected.items()
             if k in state and _shape(state, k) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[:3]}")
        if wrong:
            k, got, want = wrong[0]
            got = "not a tensor" if got is None else got
            parts.append(f"{len(wrong)} shape mismatches, first {k}: checkpoint {got} vs "
                         f"config {want}")
        image_size = resolve_config(config).get("image_size", 256)
        raise ValueError(f"checkpoint {source}: weights do not match the config: "
                         + "; ".join(parts) + "." + _architecture_hint(state, expected, image_size))
    model = _create(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return _freeze(model.float())


def downsampling_factor(prior: UNetModel) -> int:
    """Input height and width must be multiples of this (2 ** number of downsamplings)."""
    return 2 ** (len(prior.channel_mult) - 1)
