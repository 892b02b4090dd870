"""The ``diffloss-fast`` command line: bench, memory, profile, train, eval."""
from __future__ import annotations

import argparse
import warnings


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
