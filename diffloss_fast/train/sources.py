"""Which images a command trains and validates on, chosen from its command-line arguments."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from .data import DATASETS, DatasetError, PairedImages, check_pairs, paired_folders
from .synthetic import SyntheticPairs

SYNTHETIC_VAL_SEED = 2024  # one fixed validation set, whatever the training seed
SYNTHETIC_EPOCH = 10_000   # virtual epoch length of the endless synthetic stream
FALLBACK_VAL_PAIRS = 8


@dataclass
class Sources:
    train: Dataset | None
    val: Dataset
    channel: str  # the metric channel the task's papers report
    note: str     # what was chosen, printed before training


def _task_channel(args) -> str:
    if args.metric_channel:
        return args.metric_channel
    return "y" if "rain" in (args.dataset, args.synthetic) else "rgb"


def _pairs(args):
    """(train, val) pair lists of a data set on disk; val may be empty."""
    if args.dataset == "paired":
        if not (args.input_dir and args.target_dir):
            raise DatasetError("--dataset paired needs --input-dir and --target-dir")
        val = (paired_folders(args.val_input_dir, args.val_target_dir)
               if args.val_input_dir and args.val_target_dir else [])
        return paired_folders(args.input_dir, args.target_dir), val
    if args.dataset in DATASETS:
        if not args.data_root:
            raise DatasetError(f"--dataset {args.dataset} needs --data-root")
        train, val = DATASETS[args.dataset](Path(args.data_root))
        if args.val_root:
            val = sum(DATASETS[args.dataset](Path(args.val_root)), [])
        return train, val
    raise DatasetError("choose the data: --synthetic KIND, --dataset NAME --data-root DIR, "
                       "or --dataset paired --input-dir DIR --target-dir DIR")


def select(args, *, patch_size: int | None = None) -> Sources:
    """Training set (with ``patch_size``: random crops of that size) and validation set.

    Without ``patch_size`` (evaluation) there is no training set and the validation set is the
    layout's held-out split, or every pair where the layout has none. Every image is checked
    here, so a bad file stops the command before any work is done.
    """
    channel = _task_channel(args)
    if args.synthetic and (args.dataset or args.input_dir):
        raise DatasetError("--synthetic makes its own data: drop --dataset/--input-dir, "
                           "or drop --synthetic")
    if args.synthetic:
        val = SyntheticPairs(args.synthetic, args.val_size, args.val_images or 4,
                             seed=SYNTHETIC_VAL_SEED)
        train = (SyntheticPairs(args.synthetic, patch_size, SYNTHETIC_EPOCH)
                 if patch_size else None)
        return Sources(train, val, channel,
                       f"synthetic {args.synthetic} pairs generated on the fly, "
                       f"{len(val)} fixed {args.val_size}x{args.val_size} validation pairs")
    train, val = _pairs(args)
    source = (f"{args.input_dir} -> {args.target_dir}" if args.dataset == "paired"
              else f"{args.dataset} at {args.data_root}")
    note = ""
    if not val:
        if patch_size:
            val = train[:FALLBACK_VAL_PAIRS]
            note = (f" (no held-out split: validating on the first {len(val)} training pairs; "
                    "pass --val-root or --val-input-dir/--val-target-dir for a real one)")
        else:
            val = train
    if args.val_images:
        val = val[:args.val_images]
    if patch_size:
        check_pairs(train, min_size=patch_size)
    check_pairs(val)
    counts = (f"{len(train)} training pairs, " if patch_size else "") + f"{len(val)} " + (
        "validation" if patch_size else "evaluation") + " pairs"
    return Sources(PairedImages(train, patch_size) if patch_size else None, PairedImages(val),
                   channel, f"{source}: {counts}{note}")
