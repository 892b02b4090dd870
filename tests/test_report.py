"""benchmarks/report.py turns a device check's raw output into result files: run on the
output of real CPU runs of ``bench`` and ``profile``."""
import json
from pathlib import Path

from benchmark_scripts import load
from diffloss_fast.cli import build_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_report_from_cpu_runs(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "results"
    bench = run(["bench", "--device", "cpu", "--batch-sizes", "1", "--repeats", "1",
                 "--warmup", "1", "--json", str(raw / "bench_cpu.json")])
    run(["profile", "--device", "cpu", "--batch", "1", "--steps", "1", "--warmup", "1",
         "--json", str(raw / "profile_fast_both.json")])
    run(["roofline", "--prior", "tiny", "--batch", "1", "--resolution", "16", "--terms",
         "semantic", "--time-convolutions", "--device", "cpu", "--channels-last",
         "--json", str(raw / "roofline_convs.json")])
    load("report").main([str(raw), "--card", "cpu", "--run", "t", "--out", str(out),
                        "--note", "a test run"])
    stem = f"{bench['date']}-cpu-t"
    result = json.loads((out / f"{stem}.json").read_text())
    assert {r["variant"] for r in result["rows"]} == {"reference-fp32", "fast"}
    assert all(r["norms"] == "plain" for r in result["rows"])
    by_variant = {r["variant"]: r for r in result["rows"]}
    timed = {r["variant"]: r for r in bench["rows"]}
    for variant in ("reference-fp32", "fast"):
        for key in ("ms_per_step", "ms_min", "ms_max", "mfu_measured"):
            assert by_variant[variant][key] == timed[variant][key]
    assert result["peak_fp32_tflops"] == bench["peak"]["measured_median"]
    assert result["datasheet_bf16_tflops"] is None
    assert result["profiles"][0]["variant"] == "fast"
    md = (out / f"{stem}.md").read_text()
    assert "## Profile: fast" in md and "| convolution |" in md and "a test run" in md
    [convolutions] = result["convolutions"]
    assert convolutions["terms"] == "semantic" and convolutions["channels_last"]
    assert "## Convolutions alone: semantic, batch 1, channels_last" in md
    assert convolutions["calls"][0]["call"] in md  # the slowest call heads its table
    for png in (f"{stem}-speed.png", f"{stem}-profile.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_report_puts_each_fast_row_against_its_roofline(tmp_path):
    """On real H200 output (run 3, committed): every fast row's floor lies under its time.
    A bf16 profile of the tiny prior on the CPU stands in for a GPU profile."""
    raw = tmp_path / "raw"
    raw.mkdir()
    source = Path(__file__).parents[1] / "tests/data/h200-run3-bench_b8_nchw.json"
    (raw / "bench_b8_nchw.json").write_text(source.read_text())
    run(["profile", "--device", "cpu", "--precision", "bf16", "--batch", "1", "--steps", "1",
         "--warmup", "1", "--json", str(raw / "profile_fast_both.json")])
    load("report").main([str(raw), "--card", "h200", "--out", str(tmp_path / "results")])
    [path] = (tmp_path / "results").glob("*.json")
    result = json.loads(path.read_text())
    fast = [r for r in result["rows"] if r["variant"] == "fast"]
    assert {r["terms"] for r in fast} == {"both", "semantic"}
    for r in fast:
        assert 0 < r["roofline_ms"] < r["ms_per_step"]
    both = next(r["roofline_ms"] for r in fast if r["terms"] == "both")
    semantic = next(r["roofline_ms"] for r in fast if r["terms"] == "semantic")
    assert 3 < both / semantic < 3.9  # under the FLOP ratio: more memory-bound work per FLOP
    assert all("roofline_ms" not in r for r in result["rows"] if r["variant"] == "reference-fp32")
    # a run before the datasheet table: its "reference" is reference-fp32, its MFU the measured
    source_rows = json.loads(source.read_text())["rows"]
    assert {r["variant"] for r in result["rows"]} == {"reference-fp32", "fast"}
    assert sorted(r["mfu_measured"] for r in result["rows"]) == sorted(
        r["mfu"] for r in source_rows if r["status"] == "ok")
    floors = {c["category"]: c["roofline_ms"] for c in result["profiles"][0]["categories"]}
    assert floors["convolution"] > 0 and floors["norm"] > 0
    md = path.with_suffix(".md").read_text()
    assert "of roofline" in md and "| roofline ms |" in md
    # semantic rows against the semantic baseline, never against the both-terms reference
    ref = {r["terms"]: r["ms_per_step"] for r in result["rows"]
           if r["variant"] == "reference-fp32"}
    speeds = load("report").speedups(result["rows"])
    for r in fast:
        if r["terms"] in ref:
            assert speeds[id(r)] == ref[r["terms"]] / r["ms_per_step"]
        else:
            assert id(r) not in speeds
    profile_png = path.with_name(path.stem + "-profile.png")
    assert profile_png.read_bytes()[:8] == PNG_MAGIC


def test_row_names_say_what_differs():
    """The speed plot's labels: each option a row ran, and nothing it did not."""
    name = load("report").row_name
    assert name({"variant": "reference-bf16", "precision": "bf16"}) == "reference-bf16 (baseline)"
    plain = {"variant": "fast", "precision": "bf16", "compiled": False, "norms": "plain"}
    assert name(plain) == "DiffLoss bf16, PyTorch norms"
    graphed = dict(plain, norms="fused", cuda_graph=True, channels_last=True)
    assert name(graphed) == "DiffLoss bf16, fused norms, CUDA graphs, NHWC"
    compiled = dict(plain, compiled=True, compile_mode="regional", cudnn_benchmark=True,
                    channels_last="auto")
    assert name(compiled) == "DiffLoss bf16, compiled (regional), PyTorch norms, cuDNN autotuned"
