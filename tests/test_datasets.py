"""Paired data sets: every layout on tiny generated folders, pairing by name, bad-data errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffloss_fast.train import data as D
from diffloss_fast.train.sampling import SeededSampler
from diffloss_fast.train.synthetic import DEGRADATIONS, SyntheticPairs

SIZE = (40, 48)  # H, W


def png(path, ident: int, size=SIZE):
    """An image whose red channel is ``ident`` everywhere: a pair's two files share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*size, 3), np.uint8)
    arr[..., 0] = ident
    arr[..., 1] = np.random.default_rng(ident).integers(0, 255, size)
    Image.fromarray(arr).save(path)
    return path


def ident(path) -> int:
    return int(np.asarray(Image.open(path))[0, 0, 0])


def assert_paired(pairs, expected_ids):
    assert sorted(ident(a) for a, _ in pairs) == sorted(expected_ids)
    for a, b in pairs:
        assert ident(a) == ident(b), (a, b)


# --- layouts ----------------------------------------------------------------------------------

def test_lol(tmp_path):
    for i in (1, 2, 10):
        png(tmp_path / "our485/low" / f"{i}.png", i)
        png(tmp_path / "our485/high" / f"{i}.png", i)
    png(tmp_path / "eval15/low/22.png", 22)
    png(tmp_path / "eval15/high/22.png", 22)
    train, val = D.lol(tmp_path)
    assert_paired(train, [1, 2, 10])
    assert [p[0].name for p in train] == ["1.png", "2.png", "10.png"]  # natural order
    assert_paired(val, [22])


@pytest.mark.parametrize("style", ["real", "synthetic"])
def test_lolv2(tmp_path, style):
    for split, ids in (("Train", (1, 2, 3)), ("Test", (4,))):
        for i in ids:
            low, normal = ((f"low{i:05d}.png", f"normal{i:05d}.png") if style == "real"
                           else (f"r{i:04d}x.png", f"r{i:04d}x.png"))
            png(tmp_path / split / "Low" / low, i)
            # Normal names in reverse order of Low names: position would mismatch them.
            png(tmp_path / split / "Normal" / normal, i)
    train, val = D.lolv2(tmp_path)
    assert_paired(train, [1, 2, 3])
    assert_paired(val, [4])


@pytest.mark.parametrize("nested", [False, True])
def test_densehaze(tmp_path, nested):
    for i in (1, 2, 50, 51, 55):
        png(tmp_path / ("hazy" if nested else "") / f"{i:02d}_hazy.png", i)
        png(tmp_path / ("GT" if nested else "") / f"{i:02d}_GT.png", i)
    train, val = D.densehaze(tmp_path)
    assert_paired(train, [1, 2, 50])
    assert_paired(val, [51, 55])


def test_rain_restormer_layout(tmp_path):
    for i in (3, 1, 2):
        png(tmp_path / "input" / f"{i}.png", i)
        png(tmp_path / "target" / f"{i}.png", i)
    train, val = D.rain(tmp_path)
    assert_paired(train, [1, 2, 3])
    assert val == []


@pytest.mark.parametrize("subfolders", [False, True])
def test_rain_old_naming(tmp_path, subfolders):
    for i in (1, 2, 12):
        png(tmp_path / ("rain" if subfolders else "") / f"rain-{i}.png", i)
        png(tmp_path / ("norain" if subfolders else "") / f"norain-{i}.png", i)
    train, _ = D.rain(tmp_path)
    assert_paired(train, [1, 2, 12])
    assert all(a.name.startswith("rain-") and b.name.startswith("norain-") for a, b in train)


def test_paired_folders_by_stem(tmp_path):
    # The target folder holds JPEG-free PNGs of other names in another order: stems decide.
    for i, name in ((5, "b"), (6, "a"), (7, "c")):
        png(tmp_path / "in" / f"{name}.png", i)
        png(tmp_path / "gt" / f"{name}.bmp", i)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    pairs = D.paired_folders(tmp_path / "in", tmp_path / "gt")
    assert_paired(pairs, [5, 6, 7])
    assert [p[0].stem for p in pairs] == ["a", "b", "c"]


# --- bad data ---------------------------------------------------------------------------------

def test_input_without_target_names_it(tmp_path):
    for i in (1, 2, 3):
        png(tmp_path / "in" / f"{i}.png", i)
    for i in (1, 3):
        png(tmp_path / "gt" / f"{i}.png", i)
    with pytest.raises(D.DatasetError, match=r"in/2\.png has no target"):
        D.paired_folders(tmp_path / "in", tmp_path / "gt")


def test_target_without_input_names_it(tmp_path):
    png(tmp_path / "our485/low/1.png", 1)
    png(tmp_path / "our485/high/1.png", 1)
    png(tmp_path / "our485/high/7.png", 7)
    with pytest.raises(D.DatasetError, match=r"high/7\.png has no input"):
        D.lol(tmp_path)


def test_densehaze_missing_gt_names_it(tmp_path):
    png(tmp_path / "01_hazy.png", 1)
    png(tmp_path / "01_GT.png", 1)
    png(tmp_path / "02_hazy.png", 2)
    with pytest.raises(D.DatasetError, match=r"02_hazy\.png has no target"):
        D.densehaze(tmp_path)


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(D.DatasetError, match=r"no such folder: .*our485/low"):
        D.lol(tmp_path)


def test_rain_without_known_layout(tmp_path):
    png(tmp_path / "x.png", 1)
    with pytest.raises(D.DatasetError, match="input/ and target/"):
        D.rain(tmp_path)


def test_unreadable_image_names_it(tmp_path):
    png(tmp_path / "in/1.png", 1)
    png(tmp_path / "gt/1.png", 1)
    png(tmp_path / "in/2.png", 2)
    (tmp_path / "gt/2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    pairs = D.paired_folders(tmp_path / "in", tmp_path / "gt")
    with pytest.raises(D.DatasetError, match=r"cannot read image .*gt/2\.png"):
        D.check_pairs(pairs)


def test_truncated_image_names_it(tmp_path):
    png(tmp_path / "in/1.png", 1, size=(64, 64))
    good = png(tmp_path / "gt/1.png", 1, size=(64, 64))
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(D.DatasetError, match=r"cannot read image .*gt/1\.png"):
        D.check_pairs(D.paired_folders(tmp_path / "in", tmp_path / "gt"))


def test_size_mismatch_and_too_small(tmp_path):
    png(tmp_path / "in/1.png", 1)
    png(tmp_path / "gt/1.png", 1, size=(40, 40))
    with pytest.raises(D.DatasetError, match=r"pair sizes differ: .*in/1\.png is 40x48"):
        D.check_pairs(D.paired_folders(tmp_path / "in", tmp_path / "gt"))
    png(tmp_path / "gt/1.png", 1)
    with pytest.raises(D.DatasetError, match=r"in/1\.png is 40x48, smaller than the 64x64"):
        D.check_pairs(D.paired_folders(tmp_path / "in", tmp_path / "gt"), min_size=64)


# --- items ------------------------------------------------------------------------------------

def test_same_crop_and_flip_for_both_images(tmp_path):
    png(tmp_path / "in/a.png", 9)
    png(tmp_path / "gt/a.png", 9)
    ds = D.PairedImages(D.paired_folders(tmp_path / "in", tmp_path / "gt"), patch_size=16)
    crops = set()
    for seed in range(8):
        x, y = ds[(0, seed)]
        assert x.shape == y.shape == (3, 16, 16) and x.dtype == torch.float32
        assert torch.equal(x, y)  # identical files, so identical crops
        assert torch.equal(x, ds[(0, seed)][0])  # the seed alone decides
        crops.add(x.numpy().tobytes())
    assert len(crops) > 1
    full_x, _ = D.PairedImages(ds.pairs)[0]
    assert full_x.shape == (3, *SIZE) and 0 <= full_x.min() and full_x.max() <= 1


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_synthetic_pairs(kind):
    ds = SyntheticPairs(kind, 32, 10, seed=1)
    degraded, clean = ds[(3, 77)]
    assert degraded.shape == clean.shape == (3, 32, 32)
    assert 0 <= degraded.min() and degraded.max() <= 1 and 0 <= clean.min() and clean.max() <= 1
    assert (degraded - clean).abs().mean() > 0.003
    assert torch.equal(degraded, ds[(3, 77)][0]) and not torch.equal(degraded, ds[(3, 78)][0])
    assert torch.equal(ds[2][0], SyntheticPairs(kind, 32, 10, seed=1)[2][0])  # fixed val set


def test_haze_follows_the_scattering_model():
    rng = np.random.default_rng(0)
    clean = np.zeros((32, 32, 3), np.float32)
    hazy = DEGRADATIONS["haze"](clean, rng)
    # J = 0: I = A * (1 - t), brighter where the scene is farther (the top rows).
    assert hazy[0].mean() > hazy[-1].mean() > 0


def test_sampler_resumes_mid_stream_and_splits_ranks():
    ds = list(range(10))
    full = SeededSampler(ds, seed=3, world=1)
    stream = [x for _, x in zip(range(25), full)]
    resumed = [x for _, x in zip(range(18), SeededSampler(ds, seed=3, world=1, start=7))]
    assert resumed == stream[7:]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))  # one epoch = a permutation
    ranks = [[i for (i, _), _ in zip(SeededSampler(ds, seed=3, rank=r, world=2), range(5))]
             for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
