"""Assemble a ``benchmarks/device_check.sh verify`` run into its result files, and check them.

    python benchmarks/verify.py assemble RAW --out DIR --commit SHA [--part verify|compile]
    python benchmarks/verify.py headline RAW/bench.json    # the variants to time again
    python benchmarks/verify.py check FILE.json [--min-repeats N]

RAW holds the steps' raw outputs: ``bench.json`` (``diffloss-fast bench --json``: the baselines
and the fast variants in one process; ``bench_compile.json`` for the compile part),
``bench_repeat.json`` (the headline rows again, in a second process), ``memory.json``
(``diffloss-fast memory --json``), ``train_bench.json`` (``diffloss-fast bench --train
--json``), ``train_amp/metrics.json`` (``diffloss-fast train``) and ``steps.txt`` (each step's
exit status and seconds). ``assemble`` writes ``<date>-<card>-<short sha>[-compile].json`` in
the schema below, ``.md`` (the tables) and ``-speed.png`` (and ``-memory.png``, the sweep's own
plot) under DIR, and exits 1 when the JSON breaks the schema.

Every speed row carries, beyond the issue's schema, ``status`` (``ok``, ``OOM``, ``skipped:
...``, ``compile over budget: ...``, ``error: ...``; only an ``ok`` row has timings) and
``process`` (1: the run's bench; 2: the headline rows repeated in a second process). The
tables quote a speedup only against the fastest baseline timed in the same process for the
same terms, batch and resolution.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

from diffloss_fast.tools import hardware
from diffloss_fast.tools.baselines import BASELINES
from diffloss_fast.tools.harness import COMPILED_VARIANTS, TERMS, VARIANTS

TOP_KEYS = ("device", "date", "commit", "torch", "triton", "peak", "rows", "memory",
            "training")
PEAK_KEYS = ("datasheet_bf16_tflops", "measured_bf16_tflops")
ROW_KEYS = ("variant", "terms", "batch", "resolution", "ms_per_step", "ms_min", "ms_max",
            "repeats", "tflops", "mfu_datasheet", "mfu_measured", "peak_mem_gib", "compile_s",
            "status", "process")
MEMORY_KEYS = ("budget_gib", "rows", "max_batch")
MEMORY_ROW_KEYS = ("variant", "terms", "batch", "fits", "nvml_used_gib", "allocator_peak_gib",
                   "ms_per_step")
TRAINING_ROW_KEYS = ("net", "net_gmacs", "terms", "batch", "patch", "ms_per_step",
                     "ms_diffloss", "overhead_x", "status")
TRAINING_TERMS = ("none", "both", "semantic")
MIN_REPEATS = 10  # timed steps behind each median on a GPU


# --------------------------------------------------------------------------- assembling

def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def speed_rows(bench: dict, process: int) -> list[dict]:
    return [{**{k: r.get(k) for k in ROW_KEYS[:-1]}, "process": process} for r in bench["rows"]]


def assemble(raw: Path, commit: str, part: str = "verify") -> dict:
    """The result of one verify run from its raw outputs (see the module's docstring)."""
    bench = _load(raw / ("bench_compile.json" if part == "compile" else "bench.json"))
    if bench is None:
        raise SystemExit(f"verify: no bench output in {raw}: the bench step did not finish")
    rows = speed_rows(bench, 1)
    repeat = _load(raw / "bench_repeat.json") if part == "verify" else None
    if repeat is not None:
        rows += speed_rows(repeat, 2)
    peak = bench["peak"]
    memory = _load(raw / "memory.json") if part == "verify" else None
    training = _load(raw / "train_bench.json") if part == "verify" else None
    return {
        "device": bench["device"], "date": bench["date"], "commit": commit,
        "torch": bench["torch"], "triton": bench["triton"],
        "peak": {"datasheet_bf16_tflops": peak["datasheet_tflops"],
                 # the CPU's measured rate is fp32's: not the figure this key names
                 "measured_bf16_tflops": (peak["measured_tflops"]
                                          if peak["dtype"] == "bfloat16" else [])},
        "rows": rows,
        "memory": ({"budget_gib": memory["budget_gib"],
                    "rows": [{k: r.get(k) for k in MEMORY_ROW_KEYS} for r in memory["rows"]],
                    "max_batch": memory["max_batch"]} if memory is not None
                   else {"budget_gib": None, "rows": [], "max_batch": {}}),
        "training": {"rows": [{k: r.get(k) for k in TRAINING_ROW_KEYS}
                              for r in (training or {}).get("rows", [])]},
    }


def headline(bench: dict) -> list[str]:
    """Per terms, the fastest baseline and the fastest fast variant that are not compiled
    (a second process would spend its time compiling them again)."""
    chosen = []
    for terms in dict.fromkeys(r["terms"] for r in bench["rows"]):
        timed = [r for r in bench["rows"] if r["terms"] == terms and r["status"] == "ok"
                 and r["variant"] not in COMPILED_VARIANTS]
        for group in ([r for r in timed if r["variant"] in BASELINES],
                      [r for r in timed if r["variant"] not in BASELINES]):
            if group:
                chosen.append(min(group, key=lambda r: r["ms_per_step"])["variant"])
    return list(dict.fromkeys(chosen))


def card_name(device: str) -> str:
    """The short name of a device for file names: its key in the datasheet table, else
    ``cpu`` or the device's own name in lower case."""
    card = hardware.card_for(device)
    if card is not None:
        return next(key for key, known in hardware.CARDS.items() if known == card)
    if device.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.lower().removeprefix("nvidia ")).strip("-")


# --------------------------------------------------------------------------- checking

def _number(v, *, positive: bool = False) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and (v > 0 if positive else v >= 0))


def _keys(where: str, d, keys) -> list[str]:
    if not isinstance(d, dict):
        return [f"{where}: not an object"]
    missing, extra = set(keys) - set(d), set(d) - set(keys)
    return ([f"{where}: missing {sorted(missing)}"] if missing else []) + (
        [f"{where}: unexpected {sorted(extra)}"] if extra else [])


def validate(result: dict, *, min_repeats: int = MIN_REPEATS) -> list[str]:
    """What in ``result`` breaks the schema; empty when nothing does."""
    problems = _keys("result", result, TOP_KEYS)
    if problems:
        return problems
    for key in ("device", "torch"):
        if not (isinstance(result[key], str) and result[key]):
            problems.append(f"{key}: not a name")
    if not (isinstance(result["triton"], str) or result["triton"] is None):
        problems.append("triton: neither a version nor null")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(result["date"])):
        problems.append(f"date: {result['date']!r} is not YYYY-MM-DD")
    if not re.fullmatch(r"[0-9a-f]{40}", str(result["commit"])):
        problems.append(f"commit: {result['commit']!r} is not a 40-hex sha")

    peak = result["peak"]
    problems += _keys("peak", peak, PEAK_KEYS)
    if not _keys("peak", peak, PEAK_KEYS):
        sheet, measured = peak["datasheet_bf16_tflops"], peak["measured_bf16_tflops"]
        if not (sheet is None or _number(sheet, positive=True)):
            problems.append(f"peak.datasheet_bf16_tflops: {sheet!r}")
        cpu = result["device"].startswith("CPU")
        if not (isinstance(measured, list) and all(_number(v, positive=True) for v in measured)
                and (len(measured) == 3 or (cpu and not measured))):
            problems.append(f"peak.measured_bf16_tflops: {measured!r} is not three rates")

    rows = result["rows"]
    if not (isinstance(rows, list) and rows):
        problems.append("rows: none")
        rows = []
    for i, r in enumerate(rows):
        where = f"rows[{i}]"
        if _keys(where, r, ROW_KEYS):
            problems += _keys(where, r, ROW_KEYS)
            continue
        where = f"{where} ({r['variant']}, {r['terms']})"
        if r["variant"] not in VARIANTS:
            problems.append(f"{where}: unknown variant")
        if r["terms"] not in TERMS:
            problems.append(f"{where}: unknown terms")
        if not (isinstance(r["batch"], int) and r["batch"] > 0
                and isinstance(r["resolution"], int) and r["resolution"] > 0):
            problems.append(f"{where}: batch and resolution must be positive integers")
        if r["process"] not in (1, 2):
            problems.append(f"{where}: process {r['process']!r}")
        if not (r["compile_s"] is None or _number(r["compile_s"])):
            problems.append(f"{where}: compile_s {r['compile_s']!r}")
        if r["status"] == "ok":
            times = (r["ms_min"], r["ms_per_step"], r["ms_max"])
            if not (all(_number(v, positive=True) for v in times)
                    and times[0] <= times[1] <= times[2]):
                problems.append(f"{where}: min <= median <= max fails for {times}")
            if not (isinstance(r["repeats"], int) and r["repeats"] >= min_repeats):
                problems.append(f"{where}: {r['repeats']!r} timed steps, fewer than "
                                f"{min_repeats}")
            for key in ("tflops", "mfu_measured"):
                if not _number(r[key], positive=True):
                    problems.append(f"{where}: {key} {r[key]!r}")
            if not (r["mfu_datasheet"] is None or _number(r["mfu_datasheet"], positive=True)):
                problems.append(f"{where}: mfu_datasheet {r['mfu_datasheet']!r}")
            if (r["mfu_datasheet"] is None) != (peak.get("datasheet_bf16_tflops") is None):
                problems.append(f"{where}: mfu_datasheet and the datasheet peak disagree")
            if r["variant"] in COMPILED_VARIANTS and r["compile_s"] is None:
                problems.append(f"{where}: a compiled row without its compile time")
        elif not isinstance(r["status"], str) or r["ms_per_step"] is not None:
            problems.append(f"{where}: status {r['status']!r} with a time")

    memory = result["memory"]
    problems += _keys("memory", memory, MEMORY_KEYS)
    if not _keys("memory", memory, MEMORY_KEYS):
        budget = memory["budget_gib"]
        if not (_number(budget, positive=True) or (budget is None and not memory["rows"])):
            problems.append(f"memory.budget_gib: {budget!r}")
        for i, r in enumerate(memory["rows"]):
            where = f"memory.rows[{i}]"
            if _keys(where, r, MEMORY_ROW_KEYS):
                problems += _keys(where, r, MEMORY_ROW_KEYS)
                continue
            if not isinstance(r["fits"], bool):
                problems.append(f"{where}: fits {r['fits']!r}")
            if r["fits"] and not (_number(r["nvml_used_gib"]) and r["nvml_used_gib"] <= budget):
                problems.append(f"{where}: fits, but NVML's {r['nvml_used_gib']!r} GiB is not "
                                f"within the {budget} GiB budget")
        if not (isinstance(memory["max_batch"], dict) and all(
                isinstance(v, int) and v >= 0 for v in memory["max_batch"].values())):
            problems.append(f"memory.max_batch: {memory['max_batch']!r}")

    training = result["training"]
    problems += _keys("training", training, ("rows",))
    for i, r in enumerate(training.get("rows", []) if isinstance(training, dict) else []):
        where = f"training.rows[{i}]"
        if _keys(where, r, TRAINING_ROW_KEYS):
            problems += _keys(where, r, TRAINING_ROW_KEYS)
            continue
        if r["terms"] not in TRAINING_TERMS:
            problems.append(f"{where}: terms {r['terms']!r}")
        if r["status"] == "ok" and not _number(r["ms_per_step"], positive=True):
            problems.append(f"{where}: ms_per_step {r['ms_per_step']!r}")
    return problems


# --------------------------------------------------------------------------- tables and plot

def speedups(rows: list[dict]) -> dict[int, tuple[float, str, float | None]]:
    """id(row) -> (speedup over the fastest baseline timed in the same process for the same
    terms, batch and resolution; that baseline; ratio to reference-fp32 there, or None)."""
    def key(r):
        return r["process"], r["terms"], r["batch"], r["resolution"]
    timed = [r for r in rows if r["status"] == "ok"]
    fastest, fp32 = {}, {}
    for r in timed:
        if r["variant"] in BASELINES:
            if key(r) not in fastest or r["ms_per_step"] < fastest[key(r)]["ms_per_step"]:
                fastest[key(r)] = r
            if r["variant"] == "reference-fp32":
                fp32[key(r)] = r["ms_per_step"]
    return {id(r): (fastest[key(r)]["ms_per_step"] / r["ms_per_step"],
                    fastest[key(r)]["variant"],
                    fp32[key(r)] / r["ms_per_step"] if key(r) in fp32 else None)
            for r in timed if key(r) in fastest}


def _fmt(v, spec: str = ".1f", unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


def read_steps(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def train_amp_summary(path: Path) -> str | None:
    """One sentence on ``diffloss-fast train``'s run from its metrics.json."""
    metrics = _load(path)
    if not metrics or not metrics.get("train"):
        return None
    history = metrics["train"]
    losses = [e["loss"] for e in history]
    finite = all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in losses)
    ms = {k: statistics.median(e[k] for e in history if e.get(k) is not None)
          for k in ("ms_restoration", "ms_diffloss") if any(e.get(k) is not None
                                                           for e in history)}
    config = metrics.get("config", {})
    return (f"`diffloss-fast train --amp`: {len(history)} steps at batch "
            f"{config.get('batch_size')}, {config.get('patch_size')}x{config.get('patch_size')} "
            f"patches; losses {'all finite' if finite else 'NOT all finite'}, first "
            f"{losses[0]:.4g}, last {losses[-1]:.4g}"
            + "".join(f"; median {k} {v:.1f}" for k, v in ms.items()) + ".")


def markdown(result: dict, *, prior: str | None = None, steps: list[str] = (),
             train_amp: str | None = None) -> str:
    rows = result["rows"]
    up = speedups(rows)
    peak = result["peak"]
    measured = peak["measured_bf16_tflops"]
    first = next(iter(rows), {})
    out = [f"# verify: {result['device']}, {result['date']}, commit {result['commit'][:10]}", "",
           f"torch {result['torch']}, triton {result['triton']}; prior {prior or '?'} "
           f"(random weights); batch {first.get('batch')}, {first.get('resolution')}x"
           f"{first.get('resolution')}. A step is the loss's forward and backward to the "
           "restored image; each time is the median of the timed steps after warm-up, with "
           "their min and max.", "",
           "Datasheet dense bf16 peak: " + (f"{peak['datasheet_bf16_tflops']:g} TFLOP/s"
                                            if peak["datasheet_bf16_tflops"] else "none for "
                                            "this device")
           + "; bf16 matmul measured in the run: " + (
               ", ".join(f"{v:.1f}" for v in measured) + f" TFLOP/s (median "
               f"{statistics.median(measured):.1f})" if measured else "not measured (no bf16 "
               "fast path here)") + ".", ""]
    for terms in dict.fromkeys(r["terms"] for r in rows):
        group = [r for r in rows if r["terms"] == terms and r["process"] == 1]
        group.sort(key=lambda r: (r["variant"] not in BASELINES, r["ms_per_step"] is None,
                                  r["ms_per_step"] or 0))
        over = sorted({up[id(r)][1] for r in group if id(r) in up})
        out += [f"## {terms}" + (" (the semantic term alone: every baseline runs upstream's "
                                 "encoder and middle block only)" if terms == "semantic" else ""),
                "", "Speedup: over " + (", ".join(over) if over else "no baseline")
                + ", the fastest baseline timed for these terms in this process.", "",
                "| variant | ms/step | min | max | steps | speedup | vs reference-fp32 | "
                "TFLOP/s | MFU (datasheet) | MFU (measured matmul) | peak GiB | compile s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                "---: |"]
        for r in group:
            if r["status"] != "ok":
                out.append(f"| {r['variant']} | {r['status']} | | | | | | | | | | "
                           f"{_fmt(r['compile_s'])} |")
                continue
            speed, _, fp32 = up.get(id(r), (None, None, None))
            out.append(f"| {r['variant']} | {r['ms_per_step']:.2f} | {r['ms_min']:.2f} | "
                       f"{r['ms_max']:.2f} | {r['repeats']} | {_fmt(speed, '.2f', 'x')} | "
                       f"{_fmt(fp32, '.2f', 'x')} | {r['tflops']:.3g} | "
                       f"{_fmt(r['mfu_datasheet'], '.1%')} | {_fmt(r['mfu_measured'], '.1%')} | "
                       f"{_fmt(r['peak_mem_gib'], '.2f')} | {_fmt(r['compile_s'])} |")
        out.append("")
    again = [r for r in rows if r["process"] == 2 and r["status"] == "ok"]
    if again:
        out += ["## The headline rows in a second process", "",
                "| variant | terms | first process ms (min-max) | second process ms (min-max) | "
                "second / first |", "| --- | --- | ---: | ---: | ---: |"]
        def span(x):
            return f"{x['ms_per_step']:.2f} ({x['ms_min']:.2f}-{x['ms_max']:.2f})"
        for r in again:
            one = next((o for o in rows if o["process"] == 1 and o["status"] == "ok" and all(
                o[k] == r[k] for k in ("variant", "terms", "batch", "resolution"))), None)
            out.append(f"| {r['variant']} | {r['terms']} | {span(one) if one else '-'} | "
                       f"{span(r)} | "
                       + (f"{r['ms_per_step'] / one['ms_per_step']:.3f}" if one else "-") + " |")
        out.append("")
    memory = result["memory"]
    if memory["rows"]:
        out += [f"## Memory within {memory['budget_gib']:g} GiB, as NVML counts the process", "",
                "| variant | terms | batch | fits | NVML used GiB | allocator peak GiB | ms/step |",
                "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
        out += [f"| {r['variant']} | {r['terms']} | {r['batch']} | "
                f"{'yes' if r['fits'] else 'no'} | {_fmt(r['nvml_used_gib'], '.2f')} | "
                f"{_fmt(r['allocator_peak_gib'], '.2f')} | {_fmt(r['ms_per_step'], '.2f')} |"
                for r in memory["rows"]]
        out += ["", "Largest batch: " + ", ".join(f"{v} {b}" for v, b in
                                                  memory["max_batch"].items()) + ".", ""]
    training = result["training"]["rows"]
    if training:
        out += ["## A training step of a restoration network (forward, L2, DiffLoss, backward, "
                "AdamW)", "",
                "| net | GMAC/image | DiffLoss terms | batch | patch | ms/step | ms in DiffLoss | "
                "overhead |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {r['net']} | {_fmt(r['net_gmacs'], '.1f')} | {r['terms']} | {r['batch']} | "
                f"{r['patch']} | " + (f"{_fmt(r['ms_per_step'], '.2f')} | "
                                      f"{_fmt(r['ms_diffloss'], '.2f')} | "
                                      f"{_fmt(r['overhead_x'], '.2f', 'x')} |"
                                      if r["status"] == "ok" else f"{r['status']} | | |")
                for r in training]
        out.append("")
    if train_amp:
        out += [train_amp, ""]
    if steps:
        out += ["## Steps", "", "```", *steps, "```", ""]
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """Per terms, each variant's ms per step (first process) with its min-max, baselines in
    grey, labelled with the speedup over the fastest baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["process"] == 1 and r["status"] == "ok"]
    up = speedups(rows)
    groups = list(dict.fromkeys(r["terms"] for r in rows))
    fig, axes = plt.subplots(len(groups), 1, squeeze=False, dpi=120,
                             figsize=(8, 1.2 + 0.35 * len(rows) + 0.6 * len(groups)))
    for ax, terms in zip(axes[:, 0], groups):
        group = sorted((r for r in rows if r["terms"] == terms), key=lambda r: -r["ms_per_step"])
        ms = [r["ms_per_step"] for r in group]
        err = [[m - r["ms_min"] for m, r in zip(ms, group)],
               [r["ms_max"] - m for m, r in zip(ms, group)]]
        ax.barh(range(len(group)), ms, xerr=err, capsize=2,
                color=["0.6" if r["variant"] in BASELINES else "C0" for r in group])
        ax.set_yticks(range(len(group)), [r["variant"] for r in group], fontsize=8)
        for y, r in enumerate(group):
            ax.text(r["ms_max"], y, f" {r['ms_per_step']:.1f} ms"
                    + (f", {up[id(r)][0]:.2f}x" if id(r) in up else ""), va="center", fontsize=7)
        ax.set_xlim(0, 1.3 * max(r["ms_max"] for r in group))
        ax.set_title(f"{terms}: x = over the fastest baseline (grey) for these terms",
                     fontsize=9, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms per loss step (forward + backward), median with min-max")
    fig.suptitle(f"{result['device']}, {result['date']}, {result['commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assemble", help="write the result files of a run's raw folder")
    p.add_argument("raw", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", required=True, help="the commit the run measured (40-hex)")
    p.add_argument("--part", choices=("verify", "compile"), default="verify")
    p.add_argument("--min-repeats", type=int, default=MIN_REPEATS,
                   help="timed steps each row must have (a dry run on the CPU times fewer)")
    p = sub.add_parser("headline", help="print the variants to time again in a second process")
    p.add_argument("bench", type=Path)
    p = sub.add_parser("check", help="check a written result file against the schema")
    p.add_argument("file", type=Path)
    p.add_argument("--min-repeats", type=int, default=MIN_REPEATS)
    args = parser.parse_args(argv)

    if args.command == "headline":
        print(" ".join(headline(json.loads(args.bench.read_text()))))
        return 0
    if args.command == "check":
        result = json.loads(args.file.read_text())
    else:
        result = assemble(args.raw, args.commit, args.part)
        stem = (f"{result['date']}-{card_name(result['device'])}-{args.commit[:7]}"
                + ("-compile" if args.part == "compile" else ""))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        bench = _load(args.raw / ("bench_compile.json" if args.part == "compile"
                                  else "bench.json"))
        (args.out / f"{stem}.md").write_text(markdown(
            result, prior=bench.get("prior"), steps=read_steps(args.raw / "steps.txt"),
            train_amp=train_amp_summary(args.raw / "train_amp" / "metrics.json")))
        if any(r["status"] == "ok" for r in result["rows"]):
            plot(result, args.out / f"{stem}-speed.png")
        if (args.raw / "memory.png").exists():
            shutil.copy(args.raw / "memory.png", args.out / f"{stem}-memory.png")
        print(f"wrote {args.out / stem}.json, .md and plots")
    problems = validate(result, min_repeats=args.min_repeats)
    for problem in problems:
        print(f"schema: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
