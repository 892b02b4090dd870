"""``diffloss-fast bench`` on the CPU: the baselines beside the fast path in one process, the
speedup against the fastest of them, MFU against the datasheet and the measured matmul rate,
the compile budget, and the table of cards."""
import json
import signal
import statistics
import time

import pytest
import torch

from diffloss_fast.cli import build_parser
from diffloss_fast.tools import bench, hardware, roofline

CPU = torch.device("cpu")


def run(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cpu_bench_times_baselines_and_fast_path_per_terms(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = run(["bench", "--device", "cpu", "--resolution", "16", "--batch-sizes", "1",
                  "--repeats", "2", "--warmup", "1", "--terms", "both", "semantic",
                  "--variants", "reference", "reference-tf32", "upstream-fp16", "fast",
                  "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["prior"] == "tiny"
    assert saved["weights"] is None and saved["resolution"] == 16
    assert saved["warmup"] == 1 and saved["repeats"] == 2
    rows = {(r["variant"], r["terms"]): r for r in saved["rows"]}
    # every variant for each terms; "reference" is reference-fp32
    assert set(rows) == {(v, t) for v in ("reference-fp32", "reference-tf32", "upstream-fp16",
                                          "fast") for t in ("both", "semantic")}
    for terms in ("both", "semantic"):
        assert rows["upstream-fp16", terms]["status"].startswith("skipped")
        timed = [rows[v, terms] for v in ("reference-fp32", "reference-tf32", "fast")]
        assert all(r["status"] == "ok" and r["repeats"] == 2
                   and 0 < r["ms_min"] <= r["ms_per_step"] <= r["ms_max"] for r in timed)
        fastest = min(timed[:2], key=lambda r: r["ms_per_step"])
        fp32 = rows["reference-fp32", terms]["ms_per_step"]
        for r in timed:
            assert r["speedup_over"] == fastest["variant"]
            assert r["speedup"] == pytest.approx(fastest["ms_per_step"] / r["ms_per_step"])
            assert r["vs_fp32"] == pytest.approx(fp32 / r["ms_per_step"])
    peak = saved["peak"]
    assert peak["dtype"] == "float32" and peak["datasheet_tflops"] is None
    assert len(peak["measured_tflops"]) == 3
    assert peak["measured_median"] == statistics.median(peak["measured_tflops"])
    for r in saved["rows"]:
        if r["status"] == "ok":
            assert r["mfu_datasheet"] is None  # no datasheet for a CPU
            assert r["mfu_measured"] == pytest.approx(r["tflops"] / peak["measured_median"])

    def flops(r):
        return r["tflops"] * r["ms_per_step"] * 1e9
    # the semantic baselines run no decoder
    assert flops(rows["reference-fp32", "semantic"]) < 0.5 * flops(rows["reference-fp32", "both"])
    printed = capsys.readouterr().out
    assert "skipped: upstream's fp16 torso is timed on CUDA only" in printed
    assert "over the fastest baseline" in printed and "MFU sheet: no datasheet" in printed
    assert "tiny random-weight prior" in printed


def fake_measure(seen):
    """``bench.measure`` without the timing: a fixed spread per variant, what it was asked."""
    spreads = {"reference-fp32": (100.0, 90.0, 130.0), "fast": (40.0, 35.0, 60.0)}

    def measure(prior, variant, terms, batch, resolution, device, *, warmup, repeats, **kwargs):
        seen.append((variant, batch, resolution, warmup, repeats))
        median, low, high = spreads[variant]
        return bench.Row(variant, "fp32", False, "torch", terms, batch, resolution,
                         ms_per_step=median, ms_min=low, ms_max=high, repeats=repeats,
                         images_per_s=batch / median * 1e3, tflops=1.0)
    return measure


def test_cpu_defaults_the_spread_and_three_matmul_rates(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "measure", fake_measure(seen))
    rates = iter([1.0, 4.0, 2.0])
    monkeypatch.setattr(bench.hardware, "matmul_peak_tflops", lambda *a, **k: next(rates))
    result = run(["bench", "--device", "cpu"])
    assert seen == [("reference-fp32", 4, 64, 2, 10), ("fast", 4, 64, 2, 10)]
    assert result["prior"] == "tiny" and result["resolution"] == 64
    assert result["peak"]["measured_tflops"] == [1.0, 4.0, 2.0]
    fast = next(r for r in result["rows"] if r["variant"] == "fast")
    assert (fast["ms_min"], fast["ms_per_step"], fast["ms_max"]) == (35.0, 40.0, 60.0)
    assert fast["speedup"] == pytest.approx(2.5) and fast["speedup_over"] == "reference-fp32"
    assert fast["mfu_measured"] == pytest.approx(0.5)  # of the median rate, 2.0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("variant"))
    assert head.split()[4:7] == ["ms/step", "min", "max"]
    row = next(line for line in lines if line.startswith("fast "))
    assert row.split()[4:8] == ["40.00", "35.00", "60.00", "2.50x"]
    assert any("median 2 TFLOP/s (1-4 over 3 measurements)" in line for line in lines)
    notes = [line for line in lines if line.startswith("note: CPU timings")]
    assert len(notes) == 1 and "overhead" in notes[0] and "README" in notes[0]


def row(variant, terms, ms, status="ok"):
    return bench.Row(variant, "bf16", False, "torch", terms, 8, 256,
                     ms_per_step=ms if status == "ok" else None, status=status)


def test_speedup_is_over_the_fastest_baseline_for_the_same_terms():
    rows = [row("reference-fp32", "both", 2400.0), row("reference-bf16", "both", 300.0),
            row("upstream-fp16", "both", 250.0), row("reference-compiled", "both", None, "OOM"),
            row("fast-graphed", "both", 100.0),
            row("reference-fp32", "semantic", 600.0), row("reference-bf16", "semantic", 90.0),
            row("fast-graphed", "semantic", 30.0)]
    bench.add_speedups(rows)
    graphed_both, graphed_sem = rows[4], rows[7]
    assert graphed_both.speedup == pytest.approx(2.5)
    assert graphed_both.speedup_over == "upstream-fp16"
    assert graphed_both.vs_fp32 == pytest.approx(24.0)
    # semantic against the semantic baselines only: never against a both-terms step
    assert graphed_sem.speedup == pytest.approx(3.0)
    assert graphed_sem.speedup_over == "reference-bf16"
    assert graphed_sem.vs_fp32 == pytest.approx(20.0)
    assert rows[3].speedup is None and rows[1].speedup == pytest.approx(250 / 300)


class SlowFirstCall:
    """A loss whose first call takes ``first_s`` (a compilation), the others nothing."""

    def __init__(self, first_s):
        self.first_s, self.calls = first_s, 0

    def __call__(self, restored, gt, *, t, noise):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.first_s)
        return (restored * gt).sum()


@pytest.mark.parametrize("variant", ["reference-compiled", "fast-compiled", "fast-regional"])
def test_a_compilation_past_its_budget_is_cut_and_says_so(monkeypatch, variant):
    monkeypatch.setattr(bench, "make_loss", lambda *a, **k: SlowFirstCall(30.0))
    start = time.perf_counter()
    r = bench.measure(None, variant, "both", 1, 8, CPU, precision="fp32", backend="torch",
                      warmup=1, repeats=2, compile_budget_s=0.3)
    assert time.perf_counter() - start < 5  # cut, not slept out
    assert r.status.startswith("compile over budget") and "0.3 s" in r.status
    assert 0.3 <= r.compile_s < 5 and r.ms_per_step is None and r.compiled
    monkeypatch.setattr(bench, "make_loss", lambda *a, **k: SlowFirstCall(0.05))
    r = bench.measure(None, variant, "both", 1, 8, CPU, precision="fp32", backend="torch",
                      warmup=1, repeats=2, compile_budget_s=5.0)
    assert r.status == "ok" and 0.05 <= r.compile_s < 5 and r.repeats == 2
    assert r.ms_per_step is not None and r.ms_per_step < 1000 * r.compile_s


def test_first_call_cut_survives_a_swallowed_alarm():
    """Code that catches the first alarm (a finalizer, a compiler's fallback) is interrupted
    again; the previous SIGALRM handler is back afterwards."""
    before = signal.getsignal(signal.SIGALRM)

    def stubborn():
        for _ in range(3):
            try:
                time.sleep(30)
            except hardware.BudgetExceeded:
                pass
    start = time.perf_counter()
    seconds, over = hardware.first_call_s(stubborn, CPU, 0.2)
    assert over and 0.2 <= seconds < 5 and time.perf_counter() - start < 5
    assert signal.getsignal(signal.SIGALRM) is before
    with pytest.raises(ValueError, match="a real failure"):
        hardware.first_call_s(lambda: (_ for _ in ()).throw(ValueError("a real failure")),
                              CPU, 10.0)
    seconds, over = hardware.first_call_s(lambda: None, CPU)
    assert not over and seconds >= 0


def test_skipped_variant_becomes_a_row():
    r = bench.measure(None, "upstream-fp16", "semantic", 1, 8, CPU, precision="auto",
                      backend="auto", warmup=1, repeats=2)
    assert r.status.startswith("skipped") and r.precision == "fp16" and r.ms_per_step is None


# Each card's dense bf16 peak is half the datasheet's "with sparsity" figure, read from the
# same documents (the L40S datasheet rounds its two figures differently).
SPARSE = {"h100-sxm": 1978.9, "h100-pcie": 1513.0, "h200": 1979.0, "a100-80gb": 624.0,
          "a100-40gb": 624.0, "l40s": 733.0, "rtx-4090": 330.4, "rtx-3090": 142.0}


def test_one_table_of_cards_with_dense_peaks():
    assert roofline.CARDS is hardware.CARDS and roofline.card_for is hardware.card_for
    assert set(hardware.CARDS) == set(SPARSE)
    for key, card in hardware.CARDS.items():
        assert card.peak_tflops == pytest.approx(SPARSE[key] / 2, rel=0.015), key


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA GeForce RTX 3090", "rtx-3090"),
    # parts with other peaks are unknown, not the nearest entry
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA L40", None),
    ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("CPU (x86_64, 2 threads)", None)])
def test_card_for_device_names(name, key):
    assert hardware.card_for(name) is (hardware.CARDS[key] if key else None)


def test_train_flag_runs_the_training_step_benchmark(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench, "run_train_bench", lambda args: seen.append(args) or {"rows": []})
    out = tmp_path / "train.json"
    result = run(["bench", "--device", "cpu", "--train", "--nets", "resunet", "--patch", "16",
                  "--json", str(out)])
    assert result == {"rows": []} and json.loads(out.read_text()) == result
    [args] = seen
    assert args.nets == ["resunet"] and args.patch == 16 and args.device == "cpu"


def test_compile_option():
    assert bench.compile_option("graph") is True
    assert bench.compile_option("regional") == "regional"
    assert bench.compile_option("reduce-overhead") == "reduce-overhead"
