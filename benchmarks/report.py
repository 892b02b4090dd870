"""Turn a device check's raw output into the committed result files.

    python benchmarks/report.py RAW_DIR --card h200 [--date YYYY-MM-DD]

RAW_DIR holds bench_*.json (from ``diffloss-fast bench --json``) and memory.json (from
``diffloss-fast memory --json``). Writes, under benchmarks/results/:
``<date>-<card>[-<run>].json`` (the schema of the performance issue), ``.md`` (tables) and
``-speed.png`` (images/s per variant at each batch size).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROW_KEYS = ("variant", "precision", "compiled", "backend", "terms", "batch", "resolution",
            "ms_per_step", "images_per_s", "tflops", "mfu", "peak_mem_gib", "channels_last")


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
            key = (r["variant"], r["precision"], r["terms"], r["batch"], r["resolution"],
                   r.get("channels_last"))
            if key in seen:  # the same configuration timed twice: keep the first run's row
                continue
            seen.add(key)
            row = {k: r.get(k) for k in ROW_KEYS}
            row["channels_last"] = r.get("channels_last", "auto")
            row["variant"] = "reference" if r["variant"] == "reference" else "fast"
            row["compile_s"] = r.get("compile_s")
            rows.append(row)
    result = {"device": first["device"], "date": first["date"], "torch": first["torch"],
              "triton": first["triton"], "peak_bf16_tflops": first["peak_bf16_tflops"],
              "peak_bf16_tflops_per_run": [b["peak_bf16_tflops"] for b in benches],
              "rows": rows}
    suites = {}
    for path in sorted(raw.glob("suite_*.json")):  # pytest-benchmark --benchmark-json output
        for b in json.loads(path.read_text())["benchmarks"]:
            suites[b["fullname"]] = {"group": b["group"], "median_ms": b["stats"]["median"] * 1e3,
                                     "rounds": b["stats"]["rounds"]}
    if suites:
        result["pytest_benchmark"] = suites
    memory = raw / "memory.json"
    if memory.exists():
        m = json.loads(memory.read_text())
        result["memory"] = {"cap_gib": m["cap_gib"], "rows": m["rows"],
                            "max_batch": m["max_batch"]}
    return result


def speedups(rows: list[dict]) -> dict:
    ref = {(r["terms"], r["batch"]): r["ms_per_step"] for r in rows if r["variant"] == "reference"}
    ref_both = {b: ms for (terms, b), ms in ref.items() if terms == "both"}
    return {id(r): ref_both.get(r["batch"]) / r["ms_per_step"]
            for r in rows if ref_both.get(r["batch"])}


def markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: (r["terms"], r["batch"], r["variant"] != "reference",
                                                 r["compiled"], r["precision"]))
    up = speedups(rows)
    speed = lambda r: f"{up[id(r)]:.2f}x" if id(r) in up else "-"  # noqa: E731
    out = [f"# {result['device']}, {result['date']}",
           "",
           f"torch {result['torch']}, triton {result['triton']}; measured bf16 matmul peak "
           f"{result['peak_bf16_tflops']:.0f} TFLOP/s. Loss step = forward + backward to the "
           "restored image, ADM-256 (random weights), median of synchronised runs after warm-up. "
           "Speedup is against the strict-fp32 reference at the same batch size (the reference always "
           "runs the full UNet, so it costs the same whatever the terms).",
           "",
           "| variant | precision | compiled | channels_last | backend | terms | batch | ms/step | images/s | speedup | TFLOP/s | MFU | peak GiB |",
           "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        layout = "-" if r["variant"] == "reference" else r.get("channels_last", "auto")
        out.append(f"| {r['variant']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | "
                   f"{layout} | {r['backend']} | {r['terms']} | {r['batch']} | {r['ms_per_step']:.1f} | "
                   f"{r['images_per_s']:.1f} | {speed(r)} | {r['tflops']:.0f} | "
                   f"{r['mfu']:.1%} | {r['peak_mem_gib']:.2f} |")
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
    if result.get("note"):
        out += ["", result["note"]]
    mem = result.get("memory")
    if mem:
        out += ["", f"## Memory under a {mem['cap_gib']:g} GiB cap (an RTX 4090, emulated)", "",
                "| variant | precision | terms | batch | fits | peak allocated GiB | NVML used GiB |",
                "| --- | --- | --- | ---: | --- | ---: | ---: |"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        for r in mem["rows"]:
            out.append(f"| {r['variant']} | {r['precision']} | {r['terms']} | {r['batch']} | "
                       f"{'yes' if r['fits'] else 'OOM'} | {fmt(r['peak_allocated_gib'])} | "
                       f"{fmt(r['nvml_used_gib'])} |")
        out += ["", "Largest batch that fits: " + ", ".join(
            f"{k} {v}" for k, v in mem["max_batch"].items()) + "."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    key = lambda r: (r["variant"], r["precision"], r["compiled"], r["terms"],  # noqa: E731
                     str(r.get("channels_last")))
    labels = sorted({key(r) for r in rows}, key=lambda k: (k[3], k[0] != "reference", k[2], k[1], k[4]))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        variant, precision, compiled, terms, layout = label
        ys = []
        for b in batches:
            match = [r for r in rows if key(r) == label and r["batch"] == b]
            ys.append(match[0]["images_per_s"] if match else 0)
        layout = {"True": ", NHWC", "False": ", NCHW"}.get(layout, "") if variant != "reference" else ""
        name = f"{variant} {precision}{' compiled' if compiled else ''}{layout} ({terms})"
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (forward + backward of the loss)")
    ax.set_title(f"DiffLoss on ADM-256 at 256x256, {result['device']}, {result['date']}")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--card", required=True, help="short card name for file names, e.g. h200")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--run", default="", help="suffix naming the run, e.g. run1")
    parser.add_argument("--commit", default=None, help="the commit the run measured")
    parser.add_argument("--note", default=None, help="a sentence on what this run measured")
    args = parser.parse_args()
    result = merge(args.raw)
    result.update({k: v for k, v in (("commit", args.commit), ("note", args.note)) if v})
    stem = f"{result['date']}-{args.card}" + (f"-{args.run}" if args.run else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}-speed.png")
    if (args.raw / "memory.png").exists():
        shutil.copy(args.raw / "memory.png", args.out / f"{stem}-memory.png")
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
