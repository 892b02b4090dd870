"""The ``diffloss-fast`` command line: bench, memory, profile, roofline, train, eval."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type of batch sizes, resolutions and step counts."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_measurement_arguments(p: argparse.ArgumentParser, *, device_help: str,
                              prior_default: str | None, resolution_default: int | None) -> None:
    """The options bench, memory and profile share: what to measure, on which device."""
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--prior", default=prior_default, help="preset name: adm-256-uncond | tiny")
    p.add_argument("--checkpoint", default=None, help="real weights (.pt/.safetensors)")
    p.add_argument("--resolution", type=positive_int, default=resolution_default)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="of the fast variants; the reference is always fp32")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "native"))


def write_json(path: str | Path, data: dict) -> None:
    """A command's numbers as indented JSON, its folder made first; says where it went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, memory, profile, roofline
    from .train.cli import add_parsers as add_training_parsers
    parser = argparse.ArgumentParser(
        prog="diffloss-fast",
        description="DiffLoss, a diffusion-prior loss for image restoration, computed fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    memory.add_parser(sub)
    profile.add_parser(sub)
    roofline.add_parser(sub)
    add_training_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_", category=FutureWarning)
    args = build_parser().parse_args(argv)
    args.func(args)
