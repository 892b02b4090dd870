"""Turn a device check's raw output into the committed result files.

    python benchmarks/report.py RAW_DIR --card h200 [--date YYYY-MM-DD]

RAW_DIR holds bench_*.json (from ``diffloss-fast bench --json``), and may hold memory.json
(``diffloss-fast memory --json``), profile_*.json (``diffloss-fast profile --json``),
roofline_*.json (``diffloss-fast roofline --time-convolutions --json``) and suite_*.json
(pytest-benchmark). Writes, under benchmarks/results/:
``<date>-<card>[-<run>].json`` (baseline rows keep their names, fast rows are ``fast`` with
``norms`` saying whether the fused GroupNorm + SiLU kernels ran), ``.md`` (tables), ``-speed.png``
(images/s per variant at each batch size) and, with profiles, ``-profile.png`` (device time per
kernel kind). A speedup is against the fastest baseline timed for the same terms and batch.
On a card ``diffloss-fast roofline`` knows, each fast row also gets its floor (``roofline_ms``:
eager rows the eager floor, compiled rows the fused one, at the run's measured matmul rate),
and each eager profile the floor of each kind of kernel.

The verify run's result files are written by ``benchmarks/verify.py``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from diffloss_fast.tools import hardware, roofline
from diffloss_fast.tools.baselines import BASELINES, canonical

ROW_KEYS = ("variant", "precision", "compiled", "backend", "terms", "batch", "resolution",
            "ms_per_step", "ms_min", "ms_max", "images_per_s", "tflops", "mfu_datasheet",
            "mfu_measured", "peak_mem_gib", "channels_last")


def _peak(bench: dict) -> tuple[str, float, float | None]:
    """(dtype, measured matmul TFLOP/s, datasheet bf16 TFLOP/s or None) of one bench output;
    outputs before the datasheet table held the measured rate alone."""
    if "peak" in bench:
        p = bench["peak"]
        return ("bf16" if p["dtype"] == "bfloat16" else "fp32", p["measured_median"],
                p["datasheet_tflops"])
    dtype = "bf16" if "peak_bf16_tflops" in bench else "fp32"
    return dtype, bench[f"peak_{dtype}_tflops"], None


def merge(raw: Path) -> dict:
    benches = [json.loads(p.read_text()) for p in sorted(raw.glob("bench_*.json"))]
    if not benches:
        raise SystemExit(f"no bench_*.json in {raw}")
    first = benches[0]
    rows, seen = [], set()
    for b in benches:
        for r in b["rows"]:
            if r.get("status", "ok") != "ok":
                continue
            norms = "fused" if r["variant"] in ("fast-fused", "fast-graphed") else "plain"
            tuned = b.get("cudnn_benchmark", False)
            key = (r["variant"], r["precision"], r["terms"], r["batch"], r["resolution"],
                   r.get("channels_last"), r.get("compile_mode"), tuned)
            if key in seen:  # the same configuration timed twice: keep the first run's row
                continue
            seen.add(key)
            row = {k: r.get(k) for k in ROW_KEYS}
            if "mfu" in r:  # a run before the datasheet table: its MFU was the measured one
                row["mfu_measured"] = r["mfu"]
            row["channels_last"] = r.get("channels_last", "auto")
            variant = canonical(r["variant"])
            row["variant"] = variant if variant in BASELINES else "fast"
            row["norms"] = norms
            row["cuda_graph"] = r["variant"] == "fast-graphed"
            row["cudnn_benchmark"] = tuned
            row["compile_mode"] = r.get("compile_mode")
            row["compile_s"] = r.get("compile_s")
            rows.append(row)
    dtype, measured, sheet = _peak(first)
    peak = f"peak_{dtype}_tflops"  # the CPU's runs measure fp32
    result = {"device": first["device"], "date": first["date"], "torch": first["torch"],
              "triton": first["triton"], "prior": first.get("prior"), peak: measured,
              f"{peak}_per_run": [_peak(b)[1] for b in benches],
              "datasheet_bf16_tflops": sheet, "rows": rows}
    suites = {}
    for path in sorted(raw.glob("suite_*.json")):  # pytest-benchmark --benchmark-json output
        for b in json.loads(path.read_text())["benchmarks"]:
            suites[b["fullname"]] = {"group": b["group"], "median_ms": b["stats"]["median"] * 1e3,
                                     "rounds": b["stats"]["rounds"]}
    if suites:
        result["pytest_benchmark"] = suites
    profiles = [json.loads(p.read_text()) for p in sorted(raw.glob("profile_*.json"))]
    if profiles:
        result["profiles"] = profiles
    convolutions = []  # roofline --time-convolutions: the step's convolutions timed alone
    for path in sorted(raw.glob("roofline_*.json")):
        r = json.loads(path.read_text())
        for terms, analysis in r["terms"].items():
            if "convolutions" in analysis:
                convolutions.append({"terms": terms, "batch": r["batch"],
                                     "cudnn_benchmark": r.get("cudnn_benchmark", False),
                                     "peak_tflops": r["card"]["peak_tflops"],
                                     **analysis["convolutions"]})
    if convolutions:
        result["convolutions"] = convolutions
    memory = raw / "memory.json"
    if memory.exists():
        m = json.loads(memory.read_text())
        result["memory"] = {"budget_gib": m["budget_gib"], "rows": m["rows"],
                            "max_batch": m["max_batch"]}
    return result


def add_roofline(result: dict) -> None:
    """Each fast row's floor on this card (``diffloss-fast roofline``), and each eager profile's
    floor per kind of kernel, if the card is known."""
    card = hardware.card_for(result["device"])
    if card is None or "peak_bf16_tflops" not in result or not result.get("prior"):
        return
    card = hardware.Card(card.name, result["peak_bf16_tflops"], card.bandwidth_tbs)
    traces = {}

    def ops(prior, terms, batch, resolution, precision, fused):
        key = (prior, terms, batch, resolution, precision, fused)
        if key not in traces:
            traces[key] = roofline.trace_step(prior, terms=terms, batch=batch,
                                              resolution=resolution, precision=precision,
                                              fused_norm=fused)
        return traces[key]

    for r in result["rows"]:
        if r["variant"] in BASELINES or r["precision"] not in ("bf16", "fp16"):
            continue
        floors = roofline.floors_ms(ops(result["prior"], r["terms"], r["batch"], r["resolution"],
                                        r["precision"], r.get("norms") == "fused"), card)
        r["roofline_ms"] = floors["fused" if r["compiled"] else "eager"]
    for p in result.get("profiles", []):
        fused = p["variant"] in ("fast-fused", "fast-graphed")
        if (p["variant"] == "fast" or fused) and p.get("prior") and p["precision"] != "fp32":
            traced = ops(p["prior"], p["terms"], p["batch"], p["resolution"], p["precision"],
                         fused)
            floors = {c["category"]: c["eager_ms"] for c in roofline.by_category(traced, card)}
            for c in p["categories"]:
                c["roofline_ms"] = floors.get(c["category"], 0.0)
    result["roofline_card"] = {"name": card.name, "bandwidth_tbs": card.bandwidth_tbs}


def speedups(rows: list[dict]) -> dict:
    """id(row) -> its speedup over the fastest baseline timed for the same terms and batch."""
    fastest = {}
    for r in rows:
        if r["variant"] in BASELINES:
            key = r["terms"], r["batch"]
            fastest[key] = min(fastest.get(key, r["ms_per_step"]), r["ms_per_step"])
    return {id(r): fastest[r["terms"], r["batch"]] / r["ms_per_step"]
            for r in rows if (r["terms"], r["batch"]) in fastest}


def markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: (r["terms"], r["batch"],
                                                 r["variant"] not in BASELINES, r["compiled"],
                                                 r["precision"]))
    up = speedups(rows)
    speed = lambda r: f"{up[id(r)]:.2f}x" if id(r) in up else "-"  # noqa: E731
    peak_name = "bf16" if "peak_bf16_tflops" in result else "fp32"
    peak = result[f"peak_{peak_name}_tflops"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    share = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    of_roofline = lambda r: (f"{r['roofline_ms'] / r['ms_per_step']:.0%}"  # noqa: E731
                             if r.get("roofline_ms") else "-")
    out = [f"# {result['device']}, {result['date']}",
           "",
           f"torch {result['torch']}, triton {result['triton']}; measured {peak_name} matmul peak "
           f"{peak:.3g} TFLOP/s"
           + (f"; datasheet dense bf16 peak {result['datasheet_bf16_tflops']:g} TFLOP/s"
              if result.get("datasheet_bf16_tflops") else "")
           + ". Loss step = forward + backward to the restored image, random weights, median "
           "of synchronised runs after warm-up. Speedup is against the fastest baseline timed "
           "for the same terms and batch size (for the semantic term alone the baselines run "
           "upstream's encoder and middle block only).",
           "",
           "| variant | precision | compiled | norms | CUDA graph | channels_last | cuDNN autotune | backend | terms | batch | ms/step | images/s | speedup | TFLOP/s | MFU (datasheet) | MFU (measured matmul) | of roofline | peak GiB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        layout = "-" if r["variant"] in BASELINES else r.get("channels_last", "auto")
        compiled = (r.get("compile_mode") or "yes") if r["compiled"] else "no"
        graph = "yes" if r.get("cuda_graph") else "no"
        norms = r.get("norms", "plain")
        out.append(f"| {r['variant']} | {r['precision']} | {compiled} | {norms} | "
                   f"{graph} | {layout} | {'yes' if r.get('cudnn_benchmark') else 'no'} | {r['backend']} | "
                   f"{r['terms']} | {r['batch']} | {r['ms_per_step']:.1f} | "
                   f"{r['images_per_s']:.1f} | {speed(r)} | {r['tflops']:.3g} | "
                   f"{share(r['mfu_datasheet'])} | {share(r['mfu_measured'])} | "
                   f"{of_roofline(r)} | {fmt(r['peak_mem_gib'])} |")
    if result.get("roofline_card"):
        card = result["roofline_card"]
        out += ["", f"Of roofline: the least time `diffloss-fast roofline` gives the row's step "
                f"(eager rows: every op a memory pass; compiled rows: elementwise work fused) at "
                f"the measured matmul rate and the {card['name']}'s {card['bandwidth_tbs']:g} "
                f"TB/s, over its measured time."]
    compiled = [r for r in rows if r.get("compile_s")]
    if compiled:
        out += ["", "Compile time (first call, not in the timings): " + ", ".join(
            f"{r['terms']} batch {r['batch']}: {r['compile_s']:.0f} s" for r in compiled) + "."]
    if result.get("pytest_benchmark"):
        out += ["", "## pytest-benchmark suites (median)", "", "| benchmark | group | median |",
                "| --- | --- | ---: |"]
        for name, b in result["pytest_benchmark"].items():
            ms = b["median_ms"]
            out.append(f"| `{name.split('::')[-1]}` | {b['group']} | "
                       + (f"{ms:.1f} ms" if ms >= 1 else f"{ms * 1e3:.0f} us") + " |")
    for p in result.get("profiles", []):
        out += ["", f"## Profile: {p['what']}", "",
                f"Device busy {p['busy_ms_per_step']:.1f} ms of {p['wall_ms_per_step']:.1f} ms "
                f"wall per step ({p['busy_ms_per_step'] / p['wall_ms_per_step']:.0%}).", "",
                "| kernel kind | ms/step | share | roofline ms |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {c['category']} | {c['ms_per_step']:.1f} | {c['share']:.1%} | "
                + (f"{c['roofline_ms']:.2f} |" if "roofline_ms" in c else "- |")
                for c in p["categories"]]
        for category, chains in p.get("sources", {}).items():
            out += ["", f"Where its {category} kernels were launched from (innermost operator "
                    "first):", "", "| ms/step | calls | operators |", "| ---: | ---: | --- |"]
            out += [f"| {r['ms_per_step']:.1f} | {r['calls_per_step']:.0f} | "
                    f"{r['chain'].replace('|', '/')} |" for r in chains[:5]]
    for c in result.get("convolutions", []):
        layout = "channels_last" if c["channels_last"] else "NCHW"
        tuned = ", cuDNN autotuned" if c["cudnn_benchmark"] else ""
        of_peak = (f", {c['of_peak']:.0%} of the {c['peak_tflops']:.0f} TFLOP/s matmul rate"
                   if c["of_peak"] is not None else "")
        out += ["", f"## Convolutions alone: {c['terms']}, batch {c['batch']}, {layout}{tuned}",
                "", f"The step's {c['ops']} convolutions ({c['distinct']} distinct calls), each "
                f"timed alone: {c['measured_ms']:.1f} ms against a {c['floor_ms']:.1f} ms floor, "
                f"{c['tflops']:.3g} TFLOP/s{of_peak}.", "",
                "| call | count | ms each | TFLOP/s |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {r['call']} | {r['count']} | {r['ms']:.3f} | {r['tflops']:.3g} |"
                for r in c["calls"][:15]]
    if result.get("note"):
        out += ["", result["note"]]
    mem = result.get("memory")
    if mem:
        out += ["", f"## Memory within a {mem['budget_gib']:g} GiB budget as NVML counts the "
                "process (an RTX 4090, emulated)", "",
                "| variant | terms | batch | fits | NVML used GiB | allocator peak GiB | ms/step |",
                "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for r in mem["rows"]:
            out.append(f"| {r['variant']} | {r['terms']} | {r['batch']} | "
                       f"{'yes' if r['fits'] else 'no'} | {fmt(r['nvml_used_gib'])} | "
                       f"{fmt(r['allocator_peak_gib'])} | {fmt(r.get('ms_per_step'))} |")
        out += ["", "Largest batch that fits: " + ", ".join(
            f"{k} {v}" for k, v in mem["max_batch"].items()) + "."]
    return "\n".join(out) + "\n"


def row_name(r: dict) -> str:
    """What a result row ran, in a few words: variant, precision and the options that differ."""
    if r["variant"] in BASELINES:
        return f"{r['variant']} (baseline)"
    parts = [f"DiffLoss {r['precision']}"]
    if r["compiled"]:
        parts.append(f"compiled ({r['compile_mode']})" if r.get("compile_mode") else "compiled")
    if r.get("norms") == "fused":
        parts.append("fused norms")
    else:
        parts.append("PyTorch norms")
    if r.get("cuda_graph"):
        parts.append("CUDA graphs")
    layout = {True: "NHWC", False: "NCHW"}.get(r.get("channels_last"))
    if layout:
        parts.append(layout)
    if r.get("cudnn_benchmark"):
        parts.append("cuDNN autotuned")
    return ", ".join(parts)


def plot(result: dict, path: Path) -> None:
    """One horizontal bar per row, images/s, grouped by terms and batch, each bar labelled
    with its speedup over the reference at the same batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: (r["terms"] != "both", r["terms"], r["batch"],
                                                 r["variant"] not in BASELINES, r["images_per_s"]))
    up = speedups(rows)
    colors = {"baseline": "0.55", "both": "C0", "semantic": "C1", "natural": "C2"}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.36 * len(rows)), dpi=120)
    ys = range(len(rows))
    kinds = ["baseline" if r["variant"] in BASELINES else r["terms"] for r in rows]
    ax.barh(ys, [r["images_per_s"] for r in rows], color=[colors[k] for k in kinds])
    ax.set_yticks(ys, [f"{row_name(r)}: {r['terms']}, batch {r['batch']}" for r in rows],
                  fontsize=7)
    for y, r in zip(ys, rows):
        text = f" {r['images_per_s']:.1f}/s" + (f", {up[id(r)]:.2f}x" if id(r) in up else "")
        ax.text(r["images_per_s"], y, text, va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25 * max(r["images_per_s"] for r in rows))
    ax.set_xlabel("images / s, forward + backward of the loss\n"
                  "(x: against the fastest baseline for the same terms and batch)")
    res = rows[0]["resolution"]
    ax.set_title(f"DiffLoss at {res}x{res}, {result['device']}, {result['date']}", loc="left")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


def plot_profiles(profiles: list[dict], path: Path) -> None:
    """Stacked bars: device ms per step of each kernel kind, one bar per profiled variant, each
    followed by its roofline (the floor of each kind) where the report computed one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(c["category"] for p in profiles for c in p["categories"]))
    bars = []  # (label, ms per kind, wall ms or None)
    for p in profiles:
        label = f"{p['variant']} ({p['terms']})"
        bars.append((label, {c["category"]: c["ms_per_step"] for c in p["categories"]},
                     p["wall_ms_per_step"]))
        if any("roofline_ms" in c for c in p["categories"]):
            bars.append((f"{label}: roofline",
                         {c["category"]: c.get("roofline_ms", 0.0) for c in p["categories"]},
                         None))
    fig, ax = plt.subplots(figsize=(8, 2.0 + 0.6 * len(bars)), dpi=120)
    labels = [label for label, _, _ in bars]
    left = [0.0] * len(bars)
    for kind in kinds:
        ms = [per_kind.get(kind, 0.0) for _, per_kind, _ in bars]
        ax.barh(labels, ms, left=left, label=kind)
        left = [a + b for a, b in zip(left, ms)]
    for i, (_, _, wall) in enumerate(bars):
        if wall is not None:
            ax.plot([wall] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.set_xlabel("device ms per loss step (black bar: wall time)")
    ax.set_title(f"Where the step goes, batch {profiles[0]['batch']} at "
                 f"{profiles[0]['resolution']}x{profiles[0]['resolution']}")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--card", required=True, help="short card name for file names, e.g. h200")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--run", default="", help="suffix naming the run, e.g. run1")
    parser.add_argument("--commit", default=None, help="the commit the run measured")
    parser.add_argument("--note", default=None, help="a sentence on what this run measured")
    args = parser.parse_args(argv)
    result = merge(args.raw)
    add_roofline(result)
    result.update({k: v for k, v in (("commit", args.commit), ("note", args.note)) if v})
    stem = f"{result['date']}-{args.card}" + (f"-{args.run}" if args.run else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}-speed.png")
    if result.get("profiles"):
        plot_profiles(result["profiles"], args.out / f"{stem}-profile.png")
    if (args.raw / "memory.png").exists():
        shutil.copy(args.raw / "memory.png", args.out / f"{stem}-memory.png")
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
