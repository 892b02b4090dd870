"""load_prior / build_prior: presets, formats, frozen state, and every loading failure."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

import diffloss_fast as dl
from random_unets import TINY


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
