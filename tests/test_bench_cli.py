"""``diffloss-fast bench`` on the CPU: the main job of the quick start, end to end."""
import json

import pytest

from diffloss_fast.tools import bench
from diffloss_fast.cli import build_parser


def test_cpu_bench_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        ["bench", "--device", "cpu", "--resolution", "32", "--batch-sizes", "1", "--repeats",
         "1", "--warmup", "1", "--terms", "both", "semantic", "--json", str(out)])
    result = args.func(args)
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["prior"] == "tiny"
    assert saved["weights"] is None and saved["resolution"] == 32
    assert saved["warmup"] == 1 and saved["repeats"] == 1
    rows = {(r["variant"], r["terms"]): r for r in saved["rows"]}
    # the reference runs once (it always computes both terms); fast once per terms
    assert set(rows) == {("reference", "both"), ("fast", "both"), ("fast", "semantic")}
    ref, fast = rows["reference", "both"], rows["fast", "both"]
    assert all(r["status"] == "ok" and 0 < r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
               for r in rows.values())
    assert fast["speedup"] == pytest.approx(ref["ms_per_step"] / fast["ms_per_step"])
    assert fast["tflops"] > 0 and fast["mfu"] == pytest.approx(
        fast["tflops"] / saved["peak_fp32_tflops"])
    out = capsys.readouterr().out
    assert "ms/step" in out and "min" in out and "max" in out
    assert "overhead" in out and "tiny random-weight prior" in out and "README" in out


def fake_measure(seen):
    """``bench.measure`` without the timing: a fixed spread per variant, what it was asked."""
    spreads = {"reference": (100.0, 90.0, 130.0), "fast": (40.0, 35.0, 60.0)}

    def measure(prior, variant, terms, batch, resolution, device, *, warmup, repeats, **kwargs):
        seen.append((variant, batch, resolution, warmup, repeats))
        median, low, high = spreads[variant]
        return bench.Row(variant, "fp32", False, "torch", terms, batch, resolution,
                         ms_per_step=median, ms_min=low, ms_max=high,
                         images_per_s=batch / median * 1e3)
    return measure


def test_cpu_defaults_and_the_printed_spread(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "measure", fake_measure(seen))
    monkeypatch.setattr(bench.hardware, "matmul_peak_tflops", lambda *a, **k: 1.0)
    args = build_parser().parse_args(["bench", "--device", "cpu"])
    result = args.func(args)
    assert seen == [("reference", 4, 64, 2, 10), ("fast", 4, 64, 2, 10)]
    assert result["prior"] == "tiny" and result["resolution"] == 64
    fast = next(r for r in result["rows"] if r["variant"] == "fast")
    assert (fast["ms_min"], fast["ms_per_step"], fast["ms_max"]) == (35.0, 40.0, 60.0)
    assert fast["speedup"] == pytest.approx(2.5)
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("variant"))
    assert head.split()[4:7] == ["ms/step", "min", "max"]
    row = next(line for line in lines if line.startswith("fast "))
    assert row.split()[4:7] == ["40.00", "35.00", "60.00"] and "2.50x" in row
    notes = [line for line in lines if line.startswith("note: CPU timings")]
    assert len(notes) == 1 and "overhead" in notes[0] and "README" in notes[0]


def test_cpu_note_names_the_weights_measured():
    assert "tiny random-weight prior" in bench.cpu_note(None, "tiny")
    assert "adm-256-uncond preset with random weights" in bench.cpu_note(None, "adm-256-uncond")
    assert "the weights in prior.pt" in bench.cpu_note("prior.pt", "adm-256-uncond")


def test_compile_option():
    assert bench.compile_option("graph") is True
    assert bench.compile_option("regional") == "regional"
    assert bench.compile_option("reduce-overhead") == "reduce-overhead"
