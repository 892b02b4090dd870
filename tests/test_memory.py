"""`diffloss-fast memory`: the batch search, the budget (NVML and the allocator faked), the plot
and the CPU-only refusal (no GPU needed)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import types

import pytest
import torch

from diffloss_fast.tools import memory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def recorder(threshold: int):
    """fits(b) is true up to ``threshold``; remembers every batch it was asked about."""
    calls: list[int] = []

    def fits(batch: int) -> bool:
        calls.append(batch)
        return batch <= threshold
    return fits, calls


@pytest.mark.parametrize("threshold", [1, 5, 8, 100, 0])
def test_search_finds_the_exact_largest_batch(threshold):
    fits, calls = recorder(threshold)
    assert memory.find_max_batch(fits, limit=1024) == threshold
    assert len(calls) == len(set(calls)), f"a batch was measured twice: {calls}"
    assert all(1 <= b <= 1024 for b in calls)
    if threshold == 0:
        assert calls == [1]  # nothing fits: stop at the first step
    else:
        # doubling up to the first failure, then bisection: never a batch beyond twice the answer
        assert max(calls) <= 2 * threshold
        assert threshold in calls and threshold + 1 in calls


def test_search_sequence_is_doubling_then_bisection():
    fits, calls = recorder(5)
    memory.find_max_batch(fits)
    assert calls == [1, 2, 4, 8, 6, 5]
    fits, calls = recorder(8)
    memory.find_max_batch(fits)
    assert calls == [1, 2, 4, 8, 16, 12, 10, 9]


@pytest.mark.parametrize("threshold", [1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 255, 511, 1000, 1023])
def test_search_many_thresholds(threshold):
    fits, calls = recorder(threshold)
    assert memory.find_max_batch(fits, limit=1024) == threshold
    assert len(calls) <= 2 * 11


def test_search_stops_at_the_limit():
    fits, calls = recorder(10 ** 6)  # everything fits
    assert memory.find_max_batch(fits, limit=1024) == 1024
    assert max(calls) == 1024 and calls[-1] == 1024
    fits, calls = recorder(10 ** 6)
    assert memory.find_max_batch(fits, limit=100) == 100  # not a power of two: tried exactly
    assert max(calls) == 100
    fits, calls = recorder(70)
    assert memory.find_max_batch(fits, limit=100) == 70
    assert max(calls) <= 100
    with pytest.raises(ValueError):
        memory.find_max_batch(lambda b: True, limit=0)


def test_allocator_cap_is_the_budget_less_what_the_process_holds_outside_it():
    gib = memory.GIB
    # NVML sees 3.5 GiB, the allocator reserves 2 of them: 1.5 GiB of context and libraries
    assert memory.allocator_cap_bytes(24 * gib, int(3.5 * gib), 2 * gib) == int(22.5 * gib)
    # nothing outside the allocator (NVML can lag it by a page): the whole budget
    assert memory.allocator_cap_bytes(24 * gib, 2 * gib - 4096, 2 * gib) == 24 * gib
    # the context alone is over the budget: nothing fits
    assert memory.allocator_cap_bytes(1 * gib, 3 * gib, gib) <= 0


def fake_rows():
    """Four variants at batches 1..32: fitting up to a ceiling; for reference-bf16 and fast the
    first batch above it ran, and NVML saw it over the budget; the others ran out of memory."""
    rows = []
    batches = (1, 2, 4, 8, 16, 32)
    for variant, per_image, ceiling in (("reference-fp32", 5.0, 3), ("reference-bf16", 3.0, 5),
                                        ("fast", 1.5, 10), ("fast-ckpt", 0.6, 30)):
        largest = max(b for b in batches if b <= ceiling)
        for b in batches:
            fits = b <= ceiling
            ran = fits or (variant in ("reference-bf16", "fast") and b == 2 * largest)
            rows.append(memory.Row(variant, "both", b, fits,
                                   2.6 + per_image * b if ran else None,
                                   2.1 + per_image * b if ran else None,
                                   12.5 if b == largest else None))
    return rows


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "sub" / "memory.png"
    out = memory.plot_rows(fake_rows(), path, budget_gib=24, device="NVIDIA H100 80GB HBM3",
                           resolution=256)
    assert out == path and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # a real figure, not an empty file
    # dict rows (as read back from the JSON) plot as well
    dict_path = tmp_path / "dicts.png"
    memory.plot_rows([memory.asdict(r) for r in fake_rows()], dict_path, budget_gib=24,
                     device="x", resolution=256)
    assert dict_path.read_bytes()[:8] == PNG_MAGIC


def test_table_and_summary_from_rows():
    rows = fake_rows()
    variants = ["reference-fp32", "reference-bf16", "fast", "fast-ckpt"]
    best = memory.max_batches(rows, variants)
    assert best == {"reference-fp32": 2, "reference-bf16": 4, "fast": 8, "fast-ckpt": 16}
    line = memory.summary_line(best, 24.0)
    # against the best baseline, not the first one
    assert "best baseline (reference-bf16 4)" in line
    assert "fast 2.00x" in line and "fast-ckpt 4.00x" in line and "reference-fp32 2" in line
    table = memory.format_table(rows)
    over = sum(r.nvml_used_gib is not None and not r.fits for r in rows)
    assert over == 2
    assert table.count("over budget") == over
    assert table.count("OOM") == sum(not r.fits for r in rows) - over
    assert "NVML used GiB" in table and "alloc peak GiB" in table and "12.50" in table
    assert memory.max_batches([], ["fast"]) == {"fast": 0}
    assert "no baseline fits" in memory.summary_line({"reference-fp32": 0, "fast": 3}, 24)


def namespace(**overrides):
    parser = argparse.ArgumentParser()
    memory.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_parser_defaults_and_old_spellings():
    args = namespace()
    assert args.func is memory.run
    assert args.variants == ["reference-fp32", "reference-bf16", "upstream-fp16", "fast",
                             "fast-fused", "fast-ckpt"]
    assert args.budget_gib == 24 and args.resolution == 256 and args.prior == "adm-256-uncond"
    assert args.batch_sizes is None and args.terms == "both" and args.precision == "auto"
    assert args.fast_prior == "cpu" and args.repeats == 10 and args.warmup == 2
    parser = argparse.ArgumentParser()
    memory.add_parser(parser.add_subparsers(dest="command"))
    old = parser.parse_args(["memory", "--cap-gib", "16", "--variants", "reference", "fast"])
    assert old.budget_gib == 16 and old.variants == ["reference-fp32", "fast"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_without_cuda_the_sweep_refuses_with_exit_code_2(device, capsys, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(memory.harness, "measurement_prior",
                        lambda *a: built.append(a) or 1 / 0)
    json_path = tmp_path / "out.json"
    with pytest.raises(SystemExit) as excinfo:
        memory.run(namespace(device=device, json=str(json_path), plot=str(tmp_path / "p.png")))
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err
    assert not built and not json_path.exists()  # and it did nothing else


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cli_memory_exit_code_2(capsys):
    from diffloss_fast import cli
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["memory"])
    assert excinfo.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# smaller than the "tiny" preset: the glue test runs real loss steps
SMALLEST = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="8", num_head_channels=16, learn_sigma=True,
                class_cond=False, resblock_updown=True, use_scale_shift_norm=True,
                use_new_attention_order=False, dropout=0.0)
GIB = memory.GIB


class FakeCard:
    """Just enough of torch.cuda and NVML for ``memory.run`` to drive a tiny prior on the CPU:
    a 40 GiB card whose process holds ``context`` GiB outside torch's allocator, and whose
    allocator honours the fraction ``run`` sets. A variant keeps ``weights`` GiB reserved and
    its step reserves ``per_image`` GiB more per image; at batch >= 16, ``library`` GiB more
    appear outside the allocator (a library loading kernels of its own) and stay. The warm-up
    runs the real loss step, so every variant's loss module is exercised."""

    MODELS = {"reference-fp32": (2.0, 5.0), "reference-bf16": (2.0, 2.5),
              "fast": (1.0, 1.0), "fast-ckpt": (1.0, 0.5)}

    def __init__(self, monkeypatch, *, context=1.5, library=1.0, nvml=True):
        self.fractions, self.variant, self.context, self.library = [], None, context, library
        self.reserved = self.peak_reserved = self.peak_allocated = 0.0
        self.outside = 0.0  # library memory loaded so far
        card = self
        props = argparse.Namespace(total_memory=40 * GIB, uuid="fake")
        for name, value in {
            "is_available": lambda: True, "current_device": lambda: 0,
            "get_device_properties": lambda d=None: props,
            "get_device_name": lambda d=None: "Fake GPU 40GB",
            "synchronize": lambda d=None: None, "empty_cache": self.empty_cache,
            "reset_peak_memory_stats": self.reset_peak,
            "memory_allocated": lambda d=None: 123,
            "memory_reserved": lambda d=None: int(self.reserved * GIB),
            "max_memory_reserved": lambda d=None: int(self.peak_reserved * GIB),
            "max_memory_allocated": lambda d=None: int(self.peak_allocated * GIB),
            "is_bf16_supported": lambda *a, **k: True,
            "set_per_process_memory_fraction": lambda f, d=None: self.fractions.append(f),
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

        class Nvml:
            def __init__(self, device):
                self.source, self.note = None, "fake NVML" if nvml else "NVML unavailable (x)"

            def settle(self):
                self.source = "process" if nvml else None

            def used_bytes(self):
                return int((card.context + card.outside + card.reserved) * GIB)

            def close(self):
                pass

        monkeypatch.setattr(memory, "NvmlReader", Nvml)
        monkeypatch.setattr(memory, "_open_context", lambda device: None)
        monkeypatch.setattr(memory, "device_copy", lambda prior, device: copy.deepcopy(prior))
        real_numerics, real_inputs = memory.numerics, memory.harness.make_inputs
        real_step = memory.harness.loss_step

        @contextlib.contextmanager
        def numerics(variant):
            self.variant = variant
            with real_numerics(variant):
                yield
        monkeypatch.setattr(memory, "numerics", numerics)
        monkeypatch.setattr(memory.harness, "make_inputs",
                            lambda b, r, device, seed=0: real_inputs(b, r, torch.device("cpu")))

        def loss_step(loss_fn, restored, *rest):
            batch = restored.shape[0]
            weights, per_image = self.MODELS[self.variant]
            need = weights + per_image * batch
            if need > self.fractions[-1] * 40:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            if self.fractions[-1] == 1.0:  # the warm-up, uncapped
                real_step(loss_fn, restored, *rest)
            if batch >= 16:
                self.outside = max(self.outside, self.library)
            self.reserved = need
            self.peak_reserved = max(self.peak_reserved, need)
            self.peak_allocated = max(self.peak_allocated, need - 0.25)
        monkeypatch.setattr(memory.harness, "loss_step", loss_step)
        real_build = memory.harness.build_prior
        monkeypatch.setattr(memory.harness, "measurement_prior",
                            lambda *a: real_build(SMALLEST))
        monkeypatch.setattr(memory.hardware, "resolve_device",
                            lambda d: torch.device("cuda", 0))

    def empty_cache(self):
        self.reserved = self.MODELS[self.variant][0] if self.variant else 0.0

    def reset_peak(self, device=None):
        self.peak_reserved, self.peak_allocated = self.reserved, 0.0


def test_run_on_a_faked_card_counts_what_nvml_sees(monkeypatch, tmp_path, capsys, one_thread):
    import json
    fake = FakeCard(monkeypatch)
    json_path, png_path = tmp_path / "m.json", tmp_path / "m.png"
    # fast-fused and upstream-fp16 left out: on the CPU the fused kernels would run
    # interpreted, and upstream's fp16 torso is for CUDA
    result = memory.run(namespace(resolution=16, json=str(json_path), plot=str(png_path),
                                  backend="torch", precision="fp32", max_batch=64, warmup=0,
                                  repeats=2,
                                  variants=["reference-fp32", "reference-bf16", "fast",
                                            "fast-ckpt"]))
    # the allocator capped at 24 - 1.5 GiB of context: reference-fp32 2 + 5b <= 22.5, bf16
    # 2 + 2.5b <= 22.5; fast: 1 + b <= 22.5 lets 21 through the allocator, but at 16 and
    # above a library holds 1 GiB more, and NVML then sees 24.5 GiB at 21: 20 fits.
    # fast-ckpt is capped at 24 - 2.5 (the library stays loaded): 1 + 0.5b <= 21.5.
    assert result["max_batch"] == {"reference-fp32": 4, "reference-bf16": 8, "fast": 20,
                                   "fast-ckpt": 41}
    assert fake.fractions == pytest.approx([1.0, 22.5 / 40] * 3 + [1.0, 21.5 / 40, 1.0])
    assert result["allocator_cap_gib"] == pytest.approx(
        {"reference-fp32": 22.5, "reference-bf16": 22.5, "fast": 22.5, "fast-ckpt": 21.5})
    assert result["outside_allocator_gib"]["fast-ckpt"] == pytest.approx(2.5)
    saved = json.loads(json_path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["budget_gib"] == 24 and saved["device"] == "Fake GPU 40GB"
    assert saved["nvml_source"] == "process" and saved["fast_prior"] == "cpu"
    assert saved["precisions"]["reference-fp32"] == "fp32"
    assert saved["precisions"]["reference-bf16"] == "bf16" and saved["precisions"]["fast"] == "fp32"
    for row in saved["rows"]:
        assert set(row) == {"variant", "terms", "batch", "fits", "nvml_used_gib",
                            "allocator_peak_gib", "ms_per_step"}
        if row["fits"]:  # verified: the process within the budget
            assert row["nvml_used_gib"] <= 24
        largest = row["batch"] == saved["max_batch"][row["variant"]]
        assert (row["ms_per_step"] is not None) == largest, row
    fast = {r["batch"]: r for r in saved["rows"] if r["variant"] == "fast"}
    assert sorted(fast) == [1, 2, 4, 8, 16, 20, 21, 22, 24, 32]
    over = fast[21]  # the allocator let it through; NVML did not
    assert not over["fits"] and over["nvml_used_gib"] == pytest.approx(24.5)
    assert over["allocator_peak_gib"] == pytest.approx(21.75)
    assert fast[20]["fits"] and fast[20]["nvml_used_gib"] == pytest.approx(23.5)
    assert fast[22]["nvml_used_gib"] is None and not fast[22]["fits"]  # the allocator refused
    ref = [(r["batch"], r["fits"]) for r in saved["rows"] if r["variant"] == "reference-fp32"]
    assert ref == [(1, True), (2, True), (4, True), (5, False), (6, False), (8, False)]
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "best baseline (reference-bf16 8)" in out and "fast 2.50x" in out
    assert "over budget" in out


def test_run_needs_nvml(monkeypatch, capsys):
    FakeCard(monkeypatch, nvml=False)
    with pytest.raises(SystemExit) as excinfo:
        memory.run(namespace())
    assert excinfo.value.code == 2
    assert "NVML" in capsys.readouterr().err


def test_run_refuses_a_budget_above_the_card(monkeypatch, capsys):
    FakeCard(monkeypatch)
    with pytest.raises(SystemExit) as excinfo:
        memory.run(namespace(budget_gib=48))
    assert excinfo.value.code == 2
    assert "--budget-gib 48" in capsys.readouterr().err


def fake_pynvml(monkeypatch, processes):
    module = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: f"handle {uuid}",
        nvmlDeviceGetComputeRunningProcesses=lambda handle: processes,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=10 * GIB))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(uuid="GPU-1234"))


def test_nvml_reads_this_process_or_says_it_reads_the_card(monkeypatch):
    other = types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=7 * GIB)
    mine = types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * GIB)
    fake_pynvml(monkeypatch, [other, mine])
    reader = memory.NvmlReader(torch.device("cuda", 0))
    assert reader.handle == "handle GPU-1234" and reader.used_bytes() is None  # not settled
    reader.settle()
    assert reader.source == "process" and reader.used_bytes() == 3 * GIB

    fake_pynvml(monkeypatch, [other])  # a container: NVML lists host PIDs
    reader = memory.NvmlReader(torch.device("cuda", 0))
    reader.settle()
    assert reader.source == "device" and reader.used_bytes() == 10 * GIB
    assert "upper bound" in reader.note

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    reader = memory.NvmlReader(torch.device("cuda", 0))
    reader.settle()
    assert reader.source is None and reader.used_bytes() is None
    assert "NVML unavailable" in reader.note


def test_step_memory_released_before_the_reading_still_counts(monkeypatch):
    """NVML is read after the step; an allocator peak given back during it (a cache flush on
    a failed allocation) is added back, so a transient excursion past the budget is seen."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 6 * GIB)
    monkeypatch.setattr(memory.hardware, "reset_peak_memory", lambda d: None)
    monkeypatch.setattr(memory.hardware, "peak_memory_gib", lambda d: 4.0)
    nvml = types.SimpleNamespace(used_bytes=lambda: 7 * GIB)
    cpu = torch.device("cpu")
    row = memory.measure_step(_Square(), "fast", "both", 2, 8, cpu, nvml, 8.0)
    assert row == memory.Row("fast", "both", 2, True, 8.0, 4.0)
    row = memory.measure_step(_Square(), "fast", "both", 2, 8, cpu, nvml, 7.5)
    assert row == memory.Row("fast", "both", 2, False, 8.0, 4.0)


def test_oom_step_frees_its_tensors(monkeypatch):
    """An out-of-memory error in the middle of the forward: the row says it did not fit, and
    nothing the step made (inputs, activations, the traceback's frames) outlives the call."""
    import weakref
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 0)
    monkeypatch.setattr(memory.hardware, "reset_peak_memory", lambda d: None)
    monkeypatch.setattr(memory.hardware, "peak_memory_gib", lambda d: 1.5)
    alive = []

    class Loss(torch.nn.Module):
        def __init__(self, limit):
            super().__init__()
            self.weight, self.limit = torch.nn.Parameter(torch.ones(()), False), limit

        def forward(self, restored, gt, *, t, noise):
            hidden = (restored * self.weight).exp()
            alive.extend(weakref.ref(x) for x in (restored, gt, noise, hidden))
            if restored.shape[0] > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
            return (hidden - gt).square().mean()

    nvml = types.SimpleNamespace(used_bytes=lambda: 3 * GIB)
    cpu = torch.device("cpu")
    loss_fn = Loss(2)  # kept alive, as the sweep keeps it for the next batch
    row = memory.measure_step(loss_fn, "fast", "both", 4, 8, cpu, nvml, 24.0)
    assert row == memory.Row("fast", "both", 4, False, None, None)
    assert len(alive) == 4 and all(ref() is None for ref in alive), "the failed step leaked"
    alive.clear()
    row = memory.measure_step(Loss(8), "fast", "both", 4, 8, cpu, nvml, 24.0)
    assert row == memory.Row("fast", "both", 4, True, 3.0, 1.5)
    with pytest.raises(RuntimeError, match="not memory"):  # other errors are not swallowed
        memory.measure_step(_Raises(RuntimeError("not memory")), "fast", "both", 1, 8, cpu,
                            nvml, 24.0)


class _Square(torch.nn.Module):
    def forward(self, restored, gt, *, t, noise):
        return (restored - gt).square().mean()


class _Raises(torch.nn.Module):
    def __init__(self, err):
        super().__init__()
        self.err = err

    def forward(self, *args, **kwargs):
        raise self.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real sweep needs CUDA and NVML")
def test_cuda_sweep_stays_within_the_budget():
    """On a real card: the context and libraries are seen outside the allocator, the cap is
    the budget less them, and every batch that fits is within the budget by NVML's figure."""
    result = memory.run(namespace(prior="tiny", resolution=32, budget_gib=4.0, max_batch=8,
                                  variants=["reference-fp32", "fast"], warmup=1, repeats=2))
    assert result["nvml_source"] in ("process", "device")
    for variant in ("reference-fp32", "fast"):
        assert result["max_batch"][variant] >= 1
        outside = result["outside_allocator_gib"][variant]
        assert outside > 0  # the CUDA context at least
        assert result["allocator_cap_gib"][variant] == pytest.approx(4.0 - outside)
    for row in result["rows"]:
        if row["fits"]:
            assert row["nvml_used_gib"] <= 4.0 and row["allocator_peak_gib"] > 0
