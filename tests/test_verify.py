"""``benchmarks/device_check.sh verify`` in its CPU dry mode, end to end, and the schema check
of ``benchmarks/verify.py`` that every result file must pass."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load

ROOT = Path(__file__).parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
verify = load("verify")


def dry_run(part: str, out: Path) -> tuple[dict, Path]:
    """Run ``device_check.sh PART --dry`` into ``out``; its one result file and its path."""
    results_before = sorted(os.listdir(ROOT / "benchmarks" / "results"))
    env = {k: v for k, v in os.environ.items() if k not in ("BUDGET_S", "DRY", "COMMIT")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", "benchmarks/device_check.sh", part, "--dry"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "assemble rc=0" in done.stdout, done.stdout[-3000:]
    assert sorted(os.listdir(ROOT / "benchmarks" / "results")) == results_before
    assert (out / "device_check.tar.gz").stat().st_size > 0
    [path] = (out / "results").glob("*.json")
    return json.loads(path.read_text()), path


def table_row(md: str, section: str, variant: str) -> list[str]:
    """The cells of ``variant``'s row in the markdown table under ``## section``."""
    part = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in part.splitlines() if line.startswith(f"| {variant} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_dry_verify_writes_a_result_that_passes_the_schema(tmp_path):
    result, path = dry_run("verify", tmp_path)
    assert verify.validate(result, min_repeats=2) == []
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    assert result["commit"] == sha and path.name == f"{result['date']}-cpu-{sha[:7]}.json"
    assert result["device"].startswith("CPU")
    first = {(r["variant"], r["terms"]): r for r in result["rows"] if r["process"] == 1}
    assert set(first) == {(v, t) for v in ("reference-fp32", "reference-tf32", "reference-bf16",
                                           "upstream-fp16", "fast")
                          for t in ("both", "semantic")}
    assert all(first["upstream-fp16", t]["status"].startswith("skipped")
               for t in ("both", "semantic"))
    again = [r for r in result["rows"] if r["process"] == 2]
    # the headline rows: the fastest baseline and the fastest fast variant of each terms
    for terms in ("both", "semantic"):
        timed = [r for (v, t), r in first.items() if t == terms and r["status"] == "ok"]
        best = min((r for r in timed if r["variant"] != "fast"), key=lambda r: r["ms_per_step"])
        assert {(best["variant"], terms), ("fast", terms)} <= {(r["variant"], r["terms"])
                                                                for r in again}
    assert {(r["net"], r["terms"]) for r in result["training"]["rows"]} == {
        (n, t) for n in ("resunet", "nafnet", "restormer") for t in ("none", "both", "semantic")}
    assert result["memory"] == {"budget_gib": None, "rows": [], "max_batch": {}}
    assert result["peak"]["measured_bf16_tflops"] == []  # the CPU measures fp32

    md = path.with_suffix(".md").read_text()
    for terms in ("both", "semantic"):
        baselines = [r["ms_per_step"] for (v, t), r in first.items()
                     if t == terms and v != "fast" and r["status"] == "ok"]
        fast = first["fast", terms]["ms_per_step"]
        cells = table_row(md, terms, "fast")
        assert cells[5] == f"{min(baselines) / fast:.2f}x"
        assert cells[6] == f"{first['reference-fp32', terms]['ms_per_step'] / fast:.2f}x"
    assert "## The headline rows in a second process" in md
    assert "`diffloss-fast train --amp`: 1 steps" in md and "all finite" in md
    assert re.search(r"bench rc=0 \d+s", md) and "tests skipped" in md
    png = path.with_name(path.stem + "-speed.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_dry_verify_compile_cuts_each_compilation_at_its_budget(tmp_path):
    result, path = dry_run("verify-compile", tmp_path)
    assert path.name.endswith("-compile.json")
    assert verify.validate(result, min_repeats=2) == []
    assert result["memory"]["rows"] == [] and result["training"]["rows"] == []
    compiled = [r for r in result["rows"] if r["variant"] in
                ("reference-compiled", "fast-compiled", "fast-regional")]
    assert {(r["variant"], r["terms"]) for r in compiled} == {
        (v, t) for v in ("reference-compiled", "fast-compiled", "fast-regional")
        for t in ("both", "semantic")}
    for r in compiled:  # CPU compilation takes minutes: every one is cut at the 2 s budget
        assert r["status"].startswith("compile over budget") and 2 <= r["compile_s"] < 30
        assert r["ms_per_step"] is None
    md = path.with_suffix(".md").read_text()
    assert table_row(md, "both", "fast-compiled")[1].startswith("compile over budget")


def valid_result() -> dict:
    """A result as a GPU verify run writes it (numbers made up for the check only)."""
    row = {"variant": "fast-graphed", "terms": "both", "batch": 8, "resolution": 256,
           "ms_per_step": 100.0, "ms_min": 98.0, "ms_max": 104.0, "repeats": 10,
           "tflops": 500.0, "mfu_datasheet": 0.5, "mfu_measured": 0.6, "peak_mem_gib": 20.0,
           "compile_s": None, "status": "ok", "process": 1}
    return {"device": "NVIDIA H200", "date": "2026-12-01", "commit": "a" * 40,
            "torch": "2.11.0", "triton": "3.6.0",
            "peak": {"datasheet_bf16_tflops": 989.4, "measured_bf16_tflops": [780, 790, 800]},
            "rows": [row, dict(row, variant="reference-compiled", terms="semantic",
                               ms_per_step=None, ms_min=None, ms_max=None, repeats=0,
                               tflops=None, mfu_datasheet=None, mfu_measured=None,
                               compile_s=75.2, status="compile over budget: stopped at 75.2 s"
                                                       " of 75 s", process=2)],
            "memory": {"budget_gib": 24.0,
                       "rows": [{"variant": "fast-ckpt", "terms": "both", "batch": 48,
                                 "fits": True, "nvml_used_gib": 23.5,
                                 "allocator_peak_gib": 21.0, "ms_per_step": 700.0}],
                       "max_batch": {"fast-ckpt": 48}},
            "training": {"rows": [{"net": "nafnet", "net_gmacs": 16.1, "terms": "none",
                                   "batch": 8, "patch": 256, "ms_per_step": 40.0,
                                   "ms_diffloss": None, "overhead_x": 1.0, "status": "ok"}]}}


def broken(edit):
    result = valid_result()
    edit(result)
    return verify.validate(result)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("training"), "missing ['training']"),
    (lambda r: r.update(extra=1), "unexpected ['extra']"),
    (lambda r: r.update(commit="abc123"), "40-hex"),
    (lambda r: r.update(date="01/12/2026"), "YYYY-MM-DD"),
    (lambda r: r["peak"].update(measured_bf16_tflops=[780, 790]), "three rates"),
    (lambda r: r["rows"][0].update(ms_min=101.0), "min <= median <= max"),
    (lambda r: r["rows"][0].update(repeats=5), "fewer than 10"),
    (lambda r: r["rows"][0].update(variant="reference"), "unknown variant"),
    (lambda r: r["rows"][0].update(mfu_datasheet=None), "disagree"),
    (lambda r: r["rows"][0].pop("process"), "missing ['process']"),
    (lambda r: r["rows"][1].update(ms_per_step=3.0), "with a time"),
    (lambda r: r["rows"][1].update(status="ok", ms_per_step=3.0, ms_min=3.0, ms_max=3.0,
                                   repeats=10, tflops=1.0, mfu_measured=0.1,
                                   mfu_datasheet=0.1, compile_s=None), "compile time"),
    (lambda r: r["memory"]["rows"][0].update(nvml_used_gib=24.5), "not within the 24.0 GiB"),
    (lambda r: r["memory"]["rows"][0].pop("ms_per_step"), "missing ['ms_per_step']"),
    (lambda r: r["training"]["rows"][0].update(terms="natural"), "terms 'natural'"),
])
def test_schema_check_refuses_what_breaks_it(edit, message):
    assert verify.validate(valid_result()) == []
    problems = broken(edit)
    assert any(message in p for p in problems), problems


def test_schema_check_command(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(valid_result()))
    assert verify.main(["check", str(path)]) == 0
    bad = copy.deepcopy(valid_result())
    bad["rows"][0]["repeats"] = 3
    path.write_text(json.dumps(bad))
    assert verify.main(["check", str(path)]) == 1
    assert "fewer than 10" in capsys.readouterr().err
    assert verify.main(["check", str(path), "--min-repeats", "3"]) == 0


def test_headline_picks_the_fastest_baseline_and_fast_variant_of_each_terms():
    def r(variant, terms, ms, status="ok"):
        return {"variant": variant, "terms": terms, "ms_per_step": ms, "status": status}
    bench = {"rows": [r("reference-fp32", "both", 2400), r("upstream-fp16", "both", 250),
                      r("reference-bf16", "both", 300), r("reference-compiled", "both", 200),
                      r("fast", "both", 150), r("fast-graphed", "both", 90),
                      r("fast-compiled", "both", 80),
                      r("reference-bf16", "semantic", 70), r("upstream-fp16", "semantic", None,
                                                              "OOM"),
                      r("fast", "semantic", 20), r("fast-graphed", "semantic", 25)]}
    # compiled variants are not repeated: the second process would compile them again
    assert verify.headline(bench) == ["upstream-fp16", "fast-graphed", "reference-bf16", "fast"]


@pytest.mark.parametrize("device, name", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("CPU (x86_64, 2 threads)", "cpu"), ("NVIDIA H100 NVL", "h100-nvl")])
def test_card_names_for_file_names(device, name):
    assert verify.card_name(device) == name
