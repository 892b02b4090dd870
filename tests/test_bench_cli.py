"""``diffloss-fast bench`` on the CPU: the main job of the quick start, end to end."""
import json

import pytest

from diffloss_fast import bench
from diffloss_fast.cli import build_parser


def test_cpu_bench_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        ["bench", "--device", "cpu", "--batch-sizes", "1", "--repeats", "1", "--warmup", "1",
         "--terms", "both", "semantic", "--json", str(out)])
    result = args.func(args)
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["prior"] == "tiny"
    rows = {(r["variant"], r["terms"]): r for r in saved["rows"]}
    # the reference runs once (it always computes both terms); fast once per terms
    assert set(rows) == {("reference", "both"), ("fast", "both"), ("fast", "semantic")}
    ref, fast = rows["reference", "both"], rows["fast", "both"]
    assert all(r["status"] == "ok" and r["ms_per_step"] > 0 for r in rows.values())
    assert fast["speedup"] == pytest.approx(ref["ms_per_step"] / fast["ms_per_step"])
    assert fast["tflops"] > 0 and fast["mfu"] == pytest.approx(
        fast["tflops"] / saved["peak_fp32_tflops"])
    assert "ms/step" in capsys.readouterr().out


def test_compile_option():
    assert bench.compile_option("graph") is True
    assert bench.compile_option("regional") == "regional"
    assert bench.compile_option("reduce-overhead") == "reduce-overhead"
