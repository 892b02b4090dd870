"""The ``diffloss-fast`` command line: bench, memory, profile, roofline, conv-sweep,
check-precision, train, eval.

The only module that imports the measuring tools (:mod:`diffloss_fast.tools`) and the training
commands (:mod:`diffloss_fast.train`).
"""
from __future__ import annotations

import argparse
import warnings

from .tools.harness import Parser


def build_parser() -> argparse.ArgumentParser:
    from .tools import bench, conv_sweep, memory, precision, profile, roofline
    from .train.cli import add_parsers as add_training_parsers
    parser = Parser(
        prog="diffloss-fast",
        description="DiffLoss, a diffusion-prior loss for image restoration, computed fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    memory.add_parser(sub)
    profile.add_parser(sub)
    roofline.add_parser(sub)
    conv_sweep.add_parser(sub)
    precision.add_parser(sub)
    add_training_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_", category=FutureWarning)
    args = build_parser().parse_args(argv)
    args.func(args)
