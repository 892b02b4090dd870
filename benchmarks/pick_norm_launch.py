"""Name the fastest launch shape of the channels_last norm kernels from a sweep's results.

    python benchmarks/pick_norm_launch.py suite_sweep_norm.json [--margin 0.02]

Reads the pytest-benchmark JSON of ``test_group_norm_silu_launch`` (forward + backward at three
of ADM-256's levels), prints a table of each setting's median time at each level against the
default's to stderr, and prints to stdout the setting for ``DIFFLOSS_FAST_NORM_LAUNCH`` whose
summed time over the levels is least: the time a step spends in one norm of each level. A
setting must beat the default by more than ``--margin`` (run-to-run noise) to be named; otherwise
the output is empty (the default). Group-wise kernels ("groups:...") are shown, not chosen: the
variable sets the pixel-row kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

TEST = "test_group_norm_silu_launch"


def medians(results: dict) -> dict[str, dict[str, float]]:
    """{setting: {level: median ms}} of the sweep's benchmarks."""
    table = defaultdict(dict)
    for b in results["benchmarks"]:
        if b["name"].startswith(TEST):
            info = b["extra_info"]
            table[info["launch"]][info["level"]] = b["stats"]["median"] * 1e3
    return dict(table)


def pick(table: dict[str, dict[str, float]], margin: float) -> str:
    """The pixel-row setting with the least summed time over every level, if it beats the
    default by more than ``margin``; else "" (the default)."""
    if "" not in table:
        raise SystemExit(f"{TEST}: the default setting was not timed; nothing to compare with")
    levels = set(table[""])
    total = {setting: sum(times.values()) for setting, times in table.items()
             if not setting.startswith("groups:") and set(times) == levels}
    best = min(total, key=total.get)
    return best if total[best] < (1 - margin) * total[""] else ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--margin", type=float, default=0.02,
                        help="fraction the best setting must beat the default by (default 0.02)")
    args = parser.parse_args(argv)
    try:
        table = medians(json.loads(args.results.read_text()))
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read {args.results}: {err}") from None
    if not table:
        raise SystemExit(f"no {TEST} results in {args.results}")
    levels = sorted(table[""] if "" in table else next(iter(table.values())))
    print(f"{'setting':<40}" + "".join(f"{level:>22}" for level in levels), file=sys.stderr)
    for setting, times in sorted(table.items(), key=lambda kv: sum(kv[1].values())):
        cells = "".join(
            f"{times[level]:>10.3f} ms ({times[level] / table[''][level]:4.2f}x)"
            if level in times and level in table.get("", {}) else f"{'-':>22}" for level in levels)
        print(f"{setting or 'default':<40}{cells}", file=sys.stderr)
    print(pick(table, args.margin))


if __name__ == "__main__":
    main()
