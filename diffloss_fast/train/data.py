"""Paired restoration datasets, matched by file name and checked before training starts.

Pairs are matched by a key taken from each file's name, never by sorted position: one missing
or extra file would otherwise silently shift every later pair onto the wrong target. Every
image is decoded once up front so that a bad file stops the run before the first step, with
its path in the message, instead of crashing a worker hours later.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

Pair = tuple[Path, Path]


class DatasetError(ValueError):
    """A dataset that cannot be trained on: missing folder or partner, unreadable image."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"no such folder: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _index(files: Sequence[Path], key: Callable[[Path], str | None]) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in files:
        k = key(path)
        if k is None:
            continue
        if k in index:
            raise DatasetError(f"two files share the pairing key {k!r}: {index[k]} and {path}")
        index[k] = path
    return index


def match_pairs(inputs: Sequence[Path], targets: Sequence[Path],
                input_key: Callable[[Path], str | None],
                target_key: Callable[[Path], str | None] | None = None) -> list[Pair]:
    """Pair two file lists by key; any file without a partner is an error naming it.

    A key function returning None leaves that file out (it belongs to neither side).
    """
    ins = _index(inputs, input_key)
    tgts = _index(targets, target_key or input_key)
    for k, path in ins.items():
        if k not in tgts:
            raise DatasetError(f"input image {path} has no target: no file with key {k!r} "
                               f"among {len(tgts)} target images")
    for k, path in tgts.items():
        if k not in ins:
            raise DatasetError(f"target image {path} has no input: no file with key {k!r} "
                               f"among {len(ins)} input images")
    if not ins:
        raise DatasetError("no image pairs found")
    return [(ins[k], tgts[k]) for k in sorted(ins, key=_natural)]


def _natural(key: str):
    """Sort "2" before "10"."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _stem(path: Path) -> str:
    return path.stem


def paired_folders(input_dir: Path, target_dir: Path) -> list[Pair]:
    """Generic layout: two folders whose files pair by stem (``a.png`` with ``a.jpg`` too)."""
    return match_pairs(list_images(input_dir), list_images(target_dir), _stem)


# --- LOL and LOL-v2 ---------------------------------------------------------------------------

def _lolv2_key(path: Path) -> str:
    # Real_captured names low00001.png / normal00001.png; Synthetic uses the same name twice.
    return re.sub(r"^(low|normal)", "", path.stem, flags=re.IGNORECASE)


def lol(root: Path) -> tuple[list[Pair], list[Pair]]:
    """LOL: ``our485/low|high`` to train, ``eval15/low|high`` to validate."""
    root = Path(root)
    return tuple(paired_folders(root / split / "low", root / split / "high")
                 for split in ("our485", "eval15"))


def lolv2(root: Path) -> tuple[list[Pair], list[Pair]]:
    """LOL-v2 (Real_captured or Synthetic): ``Train|Test/Low|Normal``."""
    root = Path(root)
    return tuple(match_pairs(list_images(root / split / "Low"),
                             list_images(root / split / "Normal"), _lolv2_key)
                 for split in ("Train", "Test"))


# --- Dense-Haze -------------------------------------------------------------------------------

DENSEHAZE_LAST_TRAIN = 50  # NTIRE 2019 train + validation images; 51-55 are the test images


def _haze_key(suffix: str):
    pattern = re.compile(rf"^(.+)_{suffix}$", re.IGNORECASE)

    def key(path: Path) -> str | None:
        m = pattern.match(path.stem)
        return m.group(1) if m else None
    return key


def densehaze(root: Path) -> tuple[list[Pair], list[Pair]]:
    """Dense-Haze: ``NN_hazy.png`` with ``NN_GT.png``, flat or in ``hazy/`` and ``GT/``.

    Images 01-50 train, 51-55 validate (the test split of the NTIRE 2019 challenge).
    """
    root = Path(root)
    if (root / "hazy").is_dir():
        inputs, targets = list_images(root / "hazy"), list_images(root / "GT")
    else:
        inputs = targets = list_images(root)
    pairs = match_pairs(inputs, targets, _haze_key("hazy"), _haze_key("GT"))

    def number(pair: Pair) -> int:
        digits = re.match(r"\d+", pair[0].stem)
        return int(digits.group()) if digits else 0
    return ([p for p in pairs if number(p) <= DENSEHAZE_LAST_TRAIN],
            [p for p in pairs if number(p) > DENSEHAZE_LAST_TRAIN])


# --- Rain -------------------------------------------------------------------------------------

_RAIN_NAME = re.compile(r"^(norain|rain)-(.+)$", re.IGNORECASE)


def _rain_key(kind: str):
    def key(path: Path) -> str | None:
        m = _RAIN_NAME.match(path.stem)
        return m.group(2) if m and m.group(1).lower() == kind else None
    return key


def rain(root: Path) -> tuple[list[Pair], list[Pair]]:
    """Rain13K / Rain100H / Rain100L: Restormer's ``input/`` + ``target/`` (same names), or the
    older ``rain-N.png`` / ``norain-N.png`` naming, in one folder or its subfolders.

    No validation split is built in: pass ``--val-root`` (e.g. Restormer's ``test/Rain100H``).
    """
    root = Path(root)
    if (root / "input").is_dir():
        return paired_folders(root / "input", root / "target"), []
    files = list_images(root)
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files += list_images(sub)
    if not any(_RAIN_NAME.match(p.stem) for p in files):
        raise DatasetError(f"{root}: expected input/ and target/ folders, or rain-N / norain-N "
                           "images in it or its subfolders")
    return match_pairs(files, files, _rain_key("rain"), _rain_key("norain")), []


DATASETS: dict[str, Callable[[Path], tuple[list[Pair], list[Pair]]]] = {
    "lol": lol, "lolv2": lolv2, "densehaze": densehaze, "rain": rain,
}


# --- reading and checking ---------------------------------------------------------------------

def read_image(path: Path) -> np.ndarray:
    """An image as float32 RGB, HWC, in [0, 1]; a file Pillow cannot decode names itself."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


def _image_size(path: Path) -> tuple[int, int]:
    h, w = read_image(path).shape[:2]
    return h, w


def check_pairs(pairs: Sequence[Pair], min_size: int = 0) -> None:
    """Decode every image once; raise on an unreadable file, a size mismatch within a pair, or
    an image smaller than ``min_size`` (the training crop)."""
    files = [p for pair in pairs for p in pair]
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = dict(zip(files, pool.map(_image_size, files)))
    for inp, tgt in pairs:
        if sizes[inp] != sizes[tgt]:
            raise DatasetError(f"pair sizes differ: {inp} is {sizes[inp][0]}x{sizes[inp][1]}, "
                               f"{tgt} is {sizes[tgt][0]}x{sizes[tgt][1]} (HxW)")
        if min(sizes[inp]) < min_size:
            raise DatasetError(f"image {inp} is {sizes[inp][0]}x{sizes[inp][1]}, smaller than "
                               f"the {min_size}x{min_size} training patch")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def crop_and_flip(images: Sequence[np.ndarray], patch: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """The same random crop and horizontal/vertical flip for every image of a pair."""
    h, w = images[0].shape[:2]
    top, left = rng.integers(0, h - patch + 1), rng.integers(0, w - patch + 1)
    flip_h, flip_v = rng.random() < 0.5, rng.random() < 0.5
    out = []
    for im in images:
        im = im[top:top + patch, left:left + patch]
        if flip_h:
            im = im[:, ::-1]
        if flip_v:
            im = im[::-1]
        out.append(im)
    return out


class PairedImages(Dataset):
    """(input, target) float tensors in [0, 1].

    With ``patch_size`` the dataset is for training: it is indexed by ``(index, seed)`` and the
    seed alone decides the crop and flip, so a resumed run sees exactly the same patches.
    Without it, items are whole images indexed by position (validation, evaluation).
    """

    def __init__(self, pairs: Sequence[Pair], patch_size: int | None = None):
        self.pairs = list(pairs)
        self.patch_size = patch_size

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return self.pairs[index][0].name

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        images = [read_image(p) for p in self.pairs[index]]
        if self.patch_size is not None:
            images = crop_and_flip(images, self.patch_size, np.random.default_rng(seed))
        return tuple(to_tensor(im) for im in images)
