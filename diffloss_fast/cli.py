"""The ``diffloss-fast`` command line: bench, memory, profile, train, eval."""
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


def write_json(path: str | Path, data: dict) -> None:
    """A command's numbers as indented JSON, its folder made first; says where it went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, memory, profile
    from .train.cli import add_parsers as add_training_parsers
    parser = argparse.ArgumentParser(
        prog="diffloss-fast",
        description="DiffLoss, a diffusion-prior loss for image restoration, computed fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    memory.add_parser(sub)
    profile.add_parser(sub)
    add_training_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_", category=FutureWarning)
    args = build_parser().parse_args(argv)
    args.func(args)
