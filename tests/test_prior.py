"""load_prior / build_prior: presets, formats, frozen state, and every loading failure."""
import ast
import pickle
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

import diffloss_fast as dl
from random_unets import MICRO, TINY, randomized_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.script_util import create_model


def assert_frozen_cpu_fp32(model):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_build_prior_randomizes_zero_initialised_layers():
    prior = dl.build_prior("tiny", seed=3)
    assert_frozen_cpu_fp32(prior)
    assert prior.out[2].weight.abs().sum() > 0  # upstream zero-initialises this
    assert all(b.out_layers[3].weight.abs().sum() > 0 for b in prior.middle_block[::2])
    out = prior(torch.rand(1, 3, 32, 32), torch.tensor([10]))
    assert out.shape == (1, 6, 32, 32) and out[:, :3].abs().mean() > 1e-3
    same = dl.build_prior("tiny", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(prior.parameters(), same.parameters()))


def test_presets_and_config_dict():
    assert set(dl.PRESETS) >= {"adm-256-uncond", "tiny"}
    prior = dl.build_prior(dict(TINY, num_channels=64))
    assert prior.model_channels == 64
    assert dl.downsampling_factor(dl.build_prior("tiny")) == 4
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        dl.build_prior("nope")
    with pytest.raises(ValueError, match="create_model"):
        dl.build_prior(dict(TINY, not_an_argument=1))


def test_adm_256_architecture_on_meta():
    with torch.device("meta"):
        prior = dl.build_prior("adm-256-uncond")
    assert abs(sum(p.numel() for p in prior.parameters()) / 1e6 - 552.81) < 0.01
    assert dl.downsampling_factor(prior) == 32


@pytest.mark.parametrize("fmt", ["pt", "pth", "safetensors", "dict"])
def test_load_prior_formats(tmp_path, tiny_unet, fmt):
    state = tiny_unet.state_dict()
    if fmt == "dict":
        source = state
    elif fmt == "safetensors":
        source = tmp_path / "prior.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    else:
        source = tmp_path / f"prior.{fmt}"
        torch.save(state, source)
    prior = dl.load_prior(source, config=TINY)
    assert_frozen_cpu_fp32(prior)
    for (k, a), b in zip(state.items(), prior.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        dl.load_prior(tmp_path / "no_such.pt", config="tiny")


@pytest.mark.parametrize("name, payload", [("corrupt.pt", b"\x80\x04not a checkpoint"),
                                           ("corrupt.safetensors", b"garbage bytes")])
def test_corrupt_file(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=name):
        dl.load_prior(path, config="tiny")


class _Hostile:
    """Unpickling this would create a file: weights_only loading must refuse to run it."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_pickle_never_runs(tmp_path, tiny_unet):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "hostile.pt"
    state = dict(tiny_unet.state_dict())
    state["payload"] = _Hostile(marker)
    with open(path, "wb") as f:
        pickle.dump(state, f)
    assert not marker.exists()
    with pytest.raises(ValueError, match="hostile.pt"):
        dl.load_prior(path, config=TINY)
    assert not marker.exists()


def test_mismatched_weights_name_the_keys(tmp_path, tiny_unet):
    state = dict(tiny_unet.state_dict())
    state["out.2.weight"] = torch.zeros(6, 32, 5, 5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad\.pt.*out\.2\.weight.*\(6, 32, 5, 5\).*\(6, 32, 3, 3\)"):
        dl.load_prior(path, config=TINY)
    del state["out.2.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys.*out\.2\.weight.*unexpected keys.*extra\.weight"):
        dl.load_prior(state, config=TINY)
    with pytest.raises(ValueError, match="do not match the config"):
        dl.load_prior(tiny_unet.state_dict(), config="adm-256-uncond")


def test_directory_names_the_path_and_the_files_it_holds(tmp_path, tiny_unet):
    """A checkpoint directory (a download folder, a run directory) is the commonest wrong path."""
    torch.save(tiny_unet.state_dict(), tmp_path / "ema.pt")
    with pytest.raises(IsADirectoryError) as err:
        dl.load_prior(tmp_path, config=TINY)
    message = str(err.value)
    assert str(tmp_path) in message and ".safetensors" in message and "ema.pt" in message
    assert dl.load_prior(tmp_path / "ema.pt", config=TINY) is not None


def _save(state, path, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "pt")


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
@pytest.mark.parametrize("fmt", ["pt", "legacy-pt", "safetensors"])
def test_truncated_file_says_truncated(tmp_path, tiny_unet, fmt, fraction):
    """A download cut short must read as such, not as the parser's internal error; legacy
    (pre-zip) torch.save files fail in many different ways depending on where they end."""
    full = tmp_path / ("full.safetensors" if fmt == "safetensors" else "full.pt")
    _save(tiny_unet.state_dict(), full, fmt)
    cut = tmp_path / ("cut" + full.suffix)
    data = full.read_bytes()
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ValueError) as err:
        dl.load_prior(cut, config=TINY)
    message = str(err.value)
    assert message.startswith(f"checkpoint {cut}: truncated or corrupt (")
    assert "re-download" in message and "weights_only=False" not in message


def test_refused_pickle_is_not_called_corrupt(tmp_path):
    """A whole file that weights-only loading refuses needs re-saving, not re-downloading;
    torch's own advice (weights_only=False) would run the file's code."""
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "with_object.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Hostile(marker)}, path)
    with pytest.raises(ValueError) as err:
        dl.load_prior(path, config=TINY)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path}: refused")
    assert re.search(r"references \S*open", message)
    assert "state_dict()" in message and "truncated" not in message
    assert "weights_only=False" not in message and not marker.exists()


_IMPLIED = re.compile(r"(\w+)=('[^']*'|\w+) \(config: ")


@pytest.mark.parametrize("other", [
    MICRO,
    dict(TINY, num_channels=64, num_res_blocks=2, channel_mult="1,2", attention_resolutions="16",
         learn_sigma=False, resblock_updown=False, use_scale_shift_norm=False),
])
def test_wrong_architecture_implies_a_config_that_loads(tmp_path, other):
    """The implied arguments are read from the weights; applying exactly them to the config must
    load the checkpoint, so the hint is both right and sufficient."""
    state = randomized_unet(other, seed=1).state_dict()
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        dl.load_prior(path, config=TINY)
    message = str(err.value)
    assert str(path) in message and "config=" in message and "--prior-config" in message
    implied = {k: ast.literal_eval(v) for k, v in _IMPLIED.findall(message)}
    assert implied == {k: other[k] for k in implied} and len(implied) >= 2
    assert {k for k in TINY if TINY[k] != other[k]} <= set(implied)
    prior = dl.load_prior(path, config=dict(TINY, **implied))
    for (k, a), b in zip(state.items(), prior.state_dict().values()):
        assert torch.equal(a, b), k


def test_wrong_architecture_without_inference_still_names_the_fix():
    """A mismatch the weights cannot explain (a stray key) still points at config=."""
    state = dict(randomized_unet().state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"extra\.weight.*config=.*--prior-config") as err:
        dl.load_prior(state, config=TINY)
    assert "imply" not in str(err.value)


def test_class_conditional_checkpoint_names_the_unconditional_file(tmp_path):
    """256x256_diffusion.pt and 256x256_diffusion_uncond.pt differ only by label_emb: the
    likeliest download mix-up."""
    state = create_model(**dict(TINY, class_cond=True)).state_dict()
    path = tmp_path / "256x256_diffusion.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        dl.load_prior(path, config=TINY)
    message = str(err.value)
    assert str(path) in message and "class-conditional" in message and "1000 classes" in message
    assert "use 256x256_diffusion_uncond.pt" in message


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, tiny_unet, prefix):
    """DistributedDataParallel saves module.-prefixed keys, torch.compile _orig_mod.-prefixed."""
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in tiny_unet.state_dict().items()}, path)
    wrapped = dl.load_prior(path, config=TINY)
    plain = dl.load_prior(tiny_unet.state_dict(), config=TINY)
    for (k, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.equal(a, b), k
