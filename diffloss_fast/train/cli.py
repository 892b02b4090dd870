"""The ``train`` and ``eval`` subcommands of ``diffloss-fast`` (``python -m diffloss_fast``)."""
from __future__ import annotations

import argparse
import sys

from ..prior import PRESETS
from ..tools.harness import (ACTIVATION_CHECKPOINTING_HELP, PRIOR_CONFIG_HELP, check_device,
                             check_prior, hidden_alias, positive_int)

TRAIN_EXAMPLES = """\
examples:
  # a quick end-to-end check on generated data, CPU friendly (random-weight prior):
  diffloss-fast train --synthetic lowlight --prior tiny --max-steps 200 --patch-size 64 \\
      --out runs/demo
  # low-light enhancement on LOL with the ImageNet ADM prior:
  diffloss-fast train --dataset lol --data-root data/LOL --prior 256x256_diffusion_uncond.pt \\
      --amp --out runs/lol
  # the pixel-loss baseline to compare against:
  diffloss-fast train --dataset lol --data-root data/LOL --no-diffloss --out runs/lol-l2
  # two GPUs (or two CPU processes):
  torchrun --nproc_per_node 2 -m diffloss_fast train --dataset rain \\
      --data-root Datasets/train/Rain13K --val-root Datasets/test/Rain100H \\
      --prior 256x256_diffusion_uncond.pt --amp --out runs/rain

outputs in --out: metrics.json (per-step losses and timings, validation PSNR/SSIM),
loss.png, val/step_NNNNNNN.png (input | output | target),
checkpoints/step_NNNNNNN.safetensors (network, optimizer, LR schedule, step)
"""

EVAL_EXAMPLES = """\
examples:
  diffloss-fast eval --checkpoint runs/lol/checkpoints/step_0010000.safetensors \\
      --dataset lol --data-root data/LOL --out runs/lol/eval
  # no targets: restore only
  diffloss-fast eval --checkpoint CKPT --input-dir my_photos/ --out restored/
"""


def _add_data_options(parser: argparse.ArgumentParser, *, training: bool) -> None:
    data = parser.add_argument_group("data (pairs are matched by file name, never by position)")
    data.add_argument("--synthetic", choices=["lowlight", "haze", "rain"],
                      help="degraded/clean pairs generated on the fly from procedural clean "
                           "images: gamma + noise, atmospheric scattering I = J*t + A*(1-t), "
                           "or rain streaks")
    data.add_argument("--dataset", choices=["lol", "lolv2", "densehaze", "rain", "paired"],
                      help="lol: DIR/our485|eval15/low|high; lolv2: DIR/Train|Test/Low|Normal "
                           "(Real_captured or Synthetic); densehaze: NN_hazy/NN_GT images, flat "
                           "or in hazy/ and GT/ (01-50 train, 51-55 validate); rain: DIR/input "
                           "and DIR/target (Restormer's Rain13K, Rain100H...) or rain-N/norain-N "
                           "images; paired: --input-dir and --target-dir, by file stem")
    data.add_argument("--data-root", metavar="DIR", help="the data set's folder")
    data.add_argument("--input-dir", metavar="DIR", help="degraded images (--dataset paired)")
    data.add_argument("--target-dir", metavar="DIR",
                      help="clean images with the same stems (--dataset paired)")
    data.add_argument("--metric-channel", choices=["y", "rgb"],
                      help="where PSNR/SSIM are measured; default y (BT.601 luma) for rain, "
                           "rgb otherwise, as each task's papers report")
    data.add_argument("--val-size", type=positive_int, default=128, metavar="N",
                      help="side of the synthetic validation images (default %(default)s)")
    if training:
        data.add_argument("--val-root", metavar="DIR",
                          help="validate on every pair of another folder laid out like "
                               "--data-root (for rain, e.g. Restormer's test/Rain100H)")
        data.add_argument("--val-input-dir", metavar="DIR",
                          help="validation inputs (--dataset paired)")
        data.add_argument("--val-target-dir", metavar="DIR",
                          help="validation targets (--dataset paired)")
        data.add_argument("--patch-size", type=positive_int, default=128, metavar="N",
                          help="side of the random training crops, the same crop and flip for "
                               "input and target; a multiple of the prior's downsampling factor "
                               "(32 for ADM-256, 4 for tiny) (default %(default)s)")
        data.add_argument("--val-images", type=positive_int, metavar="N",
                          help="validate on the first N pairs only (default: all; 4 synthetic)")
        data.add_argument("--workers", type=int, default=2, metavar="N",
                          help="data-loader worker processes per training process "
                               "(default %(default)s)")
    else:
        data.add_argument("--max-images", type=positive_int, dest="val_images", metavar="N",
                          help="evaluate the first N pairs only")
        parser.set_defaults(val_root=None, val_input_dir=None, val_target_dir=None)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a restoration network with a pixel loss + DiffLoss",
        description="Train a restoration network with a pixel loss (L2 or L1) plus DiffLoss, "
                    "the frozen diffusion prior's noise-prediction and h-space distances "
                    "between restored and clean images. Runs on one device, or on several "
                    "under torchrun (DistributedDataParallel over the restoration network; "
                    "the prior is replicated in each process).",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_options(p, training=True)

    net = p.add_argument_group("network")
    net.add_argument("--net", default="resunet", metavar="NAME|module:Class",
                     help="resunet (built-in residual U-Net, ~1.1M parameters) or any nn.Module "
                          "by import path, e.g. mypkg.models:NAFNet (default %(default)s)")
    net.add_argument("--net-kwargs", metavar="JSON", help="keyword arguments for --net, as a JSON "
                     "object, e.g. '{\"width\": 64}'")
    net.add_argument("--pad-multiple", type=positive_int, metavar="N",
                     help="validation images are padded to multiples of N (default: the net's "
                          "size_multiple attribute, else 32)")

    loss = p.add_argument_group("loss")
    loss.add_argument("--pixel-loss", choices=["l2", "l1"], default="l2",
                      help="pixel loss added to DiffLoss (default %(default)s, as in the paper)")
    loss.add_argument("--no-diffloss", action="store_true",
                      help="pixel loss only: the baseline to compare DiffLoss against")
    loss.add_argument("--prior", metavar="PATH|tiny",
                      help="the frozen diffusion prior: a guided-diffusion checkpoint (.pt/.pth "
                           "state dict or .safetensors, never unpickled), or 'tiny' for a small "
                           "random-weight preset that only checks the pipeline")
    loss.add_argument("--prior-config", metavar="PRESET|JSON", help=PRIOR_CONFIG_HELP)
    loss.add_argument("--natural-weight", type=float, default=1e-3, metavar="W",
                      help="weight of the noise-prediction term (default %(default)s)")
    loss.add_argument("--semantic-weight", type=float, default=1e-6, metavar="W",
                      help="weight of the h-space term; 0 drops that term only (the prior's "
                           "decoder still runs for the noise-prediction term: --natural-weight 0 "
                           "is what skips it) (default %(default)s)")
    loss.add_argument("--target", choices=["eps", "x_prev"], default="eps",
                      help="natural term on predicted noise (the authors' code) or on the "
                           "posterior mean x_{t-1} (the paper's equations) (default %(default)s)")
    loss.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                      help="DiffLoss compute precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    loss.add_argument("--backend", default="auto", metavar="NAME",
                      help="DiffLoss fused-op backend: auto, torch, triton, native")
    loss.add_argument("--compile", action="store_true", help="torch.compile the prior")
    loss.add_argument("--activation-checkpointing", action="store_true",
                      help=ACTIVATION_CHECKPOINTING_HELP)
    hidden_alias(loss, "--grad-checkpoint", "activation_checkpointing", action="store_true")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                     help="images per process per micro-batch (default %(default)s)")
    opt.add_argument("--accum-steps", type=positive_int, default=1, metavar="N",
                     help="micro-batches accumulated per optimizer step (default %(default)s)")
    opt.add_argument("--max-steps", type=positive_int, default=10000, metavar="N",
                     help="optimizer steps (default %(default)s)")
    opt.add_argument("--lr", type=float, default=2e-4, metavar="LR",
                     help="AdamW peak LR (default %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=1e-4, metavar="WD",
                     help="AdamW weight decay (default %(default)s)")
    opt.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                     help="cosine: decay to --min-lr at --max-steps; step: multiply by "
                          "--lr-gamma every --lr-step steps (default %(default)s)")
    opt.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                     help="linear LR warm-up steps (default %(default)s)")
    opt.add_argument("--min-lr", type=float, default=1e-6, metavar="LR",
                     help="final LR of the cosine schedule (default %(default)s)")
    opt.add_argument("--lr-step", type=positive_int, metavar="N",
                     help="step schedule period (default: a quarter of --max-steps)")
    opt.add_argument("--lr-gamma", type=float, default=0.5, metavar="G",
                     help="step schedule factor (default %(default)s)")
    opt.add_argument("--amp", action="store_true",
                     help="mixed precision for the restoration network on CUDA (bf16 where "
                          "supported, else fp16 with loss scaling); ignored on the CPU")

    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/train", metavar="DIR",
                     help="output folder (default %(default)s)")
    run.add_argument("--val-every", type=int, default=1000, metavar="N",
                     help="validate every N steps, and always at the end; 0: only at the end "
                          "(default %(default)s)")
    run.add_argument("--save-every", type=int, default=1000, metavar="N",
                     help="checkpoint every N steps, and always at the end (default %(default)s)")
    run.add_argument("--resume", metavar="CKPT|latest",
                     help="continue from a checkpoint (model, optimizer, LR schedule, step); "
                          "'latest': the newest in --out/checkpoints")
    run.add_argument("--seed", type=int, default=0, metavar="N",
                     help="seeds the network's initialisation, the data order, crops and "
                          "DiffLoss's timesteps and noise (default %(default)s)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="default: CUDA when available")
    p.set_defaults(func=run_train, check=check_train)


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="restore images with a trained checkpoint and report PSNR/SSIM",
        description="Restore a folder, or a data set's held-out split (every pair where its "
                    "layout has none), with a checkpoint written by 'train'. With targets, "
                    "reports PSNR/SSIM per image and on average (scikit-image, data_range=1).",
        epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoints/step_NNNNNNN.safetensors file from 'train'")
    _add_data_options(p, training=False)
    p.add_argument("--out", metavar="DIR", help="write the restored PNGs and eval.json here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--pad-multiple", type=positive_int, metavar="N",
                   help="pad inputs to multiples of N (default: the net's size_multiple, else 32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: CUDA when available")
    p.set_defaults(func=run_eval, check=check_eval)


def check_train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for a device this machine lacks and a prior that cannot be built."""
    check_device(parser, args.device)
    check_prior(parser, args.prior, args.prior_config)
    if args.prior in PRESETS and args.prior != "tiny":
        parser.error(f"argument --prior: train builds only the 'tiny' preset (random weights, "
                     f"a pipeline check); for {args.prior}, give its checkpoint file")


def check_eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for a device this machine lacks, and for a run that would leave nothing:
    images without targets are not measured, so without --out nothing would be kept."""
    check_device(parser, args.device)
    if args.input_dir and not args.target_dir and not args.out:
        parser.error("--input-dir without --target-dir restores images without measuring them: "
                     "give --out DIR to save them")


def add_parsers(subparsers) -> None:
    """Register ``train`` and ``eval`` on an ``argparse`` subparsers object."""
    _add_train(subparsers)
    _add_eval(subparsers)


def _fail(command: str, err: Exception):
    sys.exit(f"diffloss-fast {command}: error: {err}")


def run_train(args) -> None:
    from .trainer import train
    try:
        train(args)
    except (ValueError, FileNotFoundError) as err:
        _fail("train", err)


def run_eval(args) -> None:
    from .evaluate import evaluate
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError) as err:
        _fail("eval", err)
