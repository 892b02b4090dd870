"""`diffloss-fast memory`: the batch search, the plot and the CPU-only refusal (no GPU needed)."""
from __future__ import annotations

import argparse

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


def fake_rows():
    rows = []
    for variant, per_image, ceiling in (("reference", 5.0, 3), ("fast", 1.5, 10),
                                        ("fast-ckpt", 0.6, 30)):
        for b in (1, 2, 4, 8, 16, 32):
            fits = b <= ceiling
            rows.append(memory.Row(variant, "fp32" if variant == "reference" else "bf16", "both",
                                   b, fits, 2.1 + per_image * b if fits else None,
                                   2.6 + per_image * b if fits else None))
    return rows


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "sub" / "memory.png"
    out = memory.plot_rows(fake_rows(), path, cap_gib=24, device="NVIDIA H100 80GB HBM3",
                           resolution=256)
    assert out == path and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # a real figure, not an empty file
    # dict rows (as read back from the JSON) plot as well
    dict_path = tmp_path / "dicts.png"
    memory.plot_rows([memory.asdict(r) for r in fake_rows()], dict_path, cap_gib=24,
                     device="x", resolution=256)
    assert dict_path.read_bytes()[:8] == PNG_MAGIC


def test_table_and_summary_from_rows():
    rows = fake_rows()
    best = memory.max_batches(rows, ["reference", "fast", "fast-ckpt"])
    assert best == {"reference": 2, "fast": 8, "fast-ckpt": 16}
    line = memory.summary_line(best, 24.0)
    assert "reference 2" in line and "fast 8" in line and "fast/reference 4.00x" in line
    assert "fast-ckpt/reference 8.00x" in line
    table = memory.format_table(rows)
    assert table.count("OOM") == sum(not r.fits for r in rows) == 18 - 2 - 4 - 5
    assert "peak alloc GiB" in table and "NVML used GiB" in table
    assert memory.max_batches([], ["fast"]) == {"fast": 0}


def namespace(**overrides):
    parser = argparse.ArgumentParser()
    memory.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_parser_defaults():
    args = namespace()
    assert args.func is memory.run
    assert args.variants == ["reference", "fast", "fast-fused", "fast-ckpt"]
    assert args.cap_gib == 24 and args.resolution == 256 and args.prior == "adm-256-uncond"
    assert args.batch_sizes is None and args.terms == "both" and args.precision == "auto"
    assert args.fast_prior == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_without_cuda_the_sweep_refuses_with_exit_code_2(device, capsys, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(memory.harness, "build_prior", lambda *a, **k: built.append(a) or 1 / 0)
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
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "memory" not in sub.choices:
        pytest.skip("cli.py does not register the memory subcommand yet")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["memory"])
    assert excinfo.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# smaller than the "tiny" preset: the glue test runs three real loss steps
SMALLEST = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="8", num_head_channels=16, learn_sigma=True,
                class_cond=False, resblock_updown=True, use_scale_shift_norm=True,
                use_new_attention_order=False, dropout=0.0)


class FakeCuda:
    """Just enough of torch.cuda for ``memory.run`` to drive a tiny prior on the CPU: a 40 GiB
    card whose allocator 'runs out' above a per-variant batch, so the glue code (search per
    variant, OOM rows, JSON, plot, the cap set and lifted) is exercised without a GPU."""

    def __init__(self, monkeypatch, ceilings):
        self.fractions, self.ceilings, self.batch, self.variant = [], ceilings, 0, None
        cuda = torch.cuda
        props = argparse.Namespace(total_memory=40 * 2 ** 30, uuid="fake")
        for name, value in {
            "is_available": lambda: True, "current_device": lambda: 0,
            "get_device_properties": lambda d=None: props,
            "get_device_name": lambda d=None: "Fake GPU 40GB",
            "synchronize": lambda d=None: None, "empty_cache": lambda: None,
            "reset_peak_memory_stats": lambda d=None: None,
            "memory_allocated": lambda d=None: 123,
            "max_memory_allocated": lambda d=None: (1 + self.batch) * 2 ** 30,
            "is_bf16_supported": lambda *a, **k: True,
            "set_per_process_memory_fraction": lambda f, d=None: self.fractions.append(f),
        }.items():
            monkeypatch.setattr(cuda, name, value)
        real_inputs, real_step, real_measure = (memory.harness.make_inputs,
                                                memory.harness.loss_step, memory.measure_step)
        monkeypatch.setattr(memory.harness, "make_inputs",
                            lambda b, r, device, seed=0: real_inputs(b, r, torch.device("cpu")))

        def measure_step(loss_fn, variant, *args, **kwargs):
            self.variant = variant
            return real_measure(loss_fn, variant, *args, **kwargs)

        def loss_step(loss_fn, restored, *rest):
            self.batch = restored.shape[0]
            if self.batch > self.ceilings[self.variant]:  # (test_oom_step_frees_its_tensors
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            if self.batch == 1:  # one real step per variant (a busy 2-core CPU is slow)
                real_step(loss_fn, restored, *rest)  # checks an OOM in the middle of a step)
        monkeypatch.setattr(memory, "measure_step", measure_step)
        monkeypatch.setattr(memory.harness, "loss_step", loss_step)
        real_build = memory.harness.build_prior
        monkeypatch.setattr(memory.harness, "build_prior", lambda config: argparse.Namespace(
            to=lambda device: real_build(SMALLEST)))
        monkeypatch.setattr(memory.hardware, "resolve_device",
                            lambda d: torch.device("cuda", 0))


def test_run_glue_on_a_faked_card(monkeypatch, tmp_path, capsys):
    import json
    fake = FakeCuda(monkeypatch, {"reference": 1, "fast": 2, "fast-ckpt": 3})
    json_path, png_path = tmp_path / "m.json", tmp_path / "m.png"
    # fast-fused left out: on the CPU its kernels would run interpreted
    result = memory.run(namespace(resolution=16, json=str(json_path), plot=str(png_path),
                                  backend="torch", precision="fp32", max_batch=64,
                                  variants=["reference", "fast", "fast-ckpt"]))
    assert result["max_batch"] == {"reference": 1, "fast": 2, "fast-ckpt": 3}
    assert fake.fractions == [pytest.approx(24 / 40), 1.0]  # capped, then lifted
    saved = json.loads(json_path.read_text())
    assert {"device", "date", "torch", "cap_gib", "rows", "max_batch"} <= set(saved)
    assert saved["cap_gib"] == 24 and saved["device"] == "Fake GPU 40GB"
    assert saved["fast_prior"] == "cpu"
    assert saved["prior"] == "adm-256-uncond" and saved["weights"] is None
    assert saved["max_batch"] == result["max_batch"]
    assert set(saved["rows"][0]) == {"variant", "precision", "terms", "batch", "fits",
                                     "peak_allocated_gib", "nvml_used_gib"}
    ref = [r for r in saved["rows"] if r["variant"] == "reference"]
    assert [(r["batch"], r["fits"]) for r in ref] == [(1, True), (2, False)]
    assert ref[0]["precision"] == "fp32" and ref[0]["peak_allocated_gib"] == 2.0
    assert ref[1]["peak_allocated_gib"] is None
    ckpt = [(r["batch"], r["fits"]) for r in saved["rows"] if r["variant"] == "fast-ckpt"]
    assert ckpt == [(1, True), (2, True), (3, True), (4, False)]  # sorted by batch
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "fast/reference 2.00x" in out and "fast-ckpt/reference 3.00x" in out


def test_run_refuses_a_cap_above_the_card(monkeypatch, capsys):
    FakeCuda(monkeypatch, {})
    with pytest.raises(SystemExit) as excinfo:
        memory.run(namespace(cap_gib=48))
    assert excinfo.value.code == 2
    assert "--cap-gib 48" in capsys.readouterr().err


def test_oom_step_frees_its_tensors(monkeypatch):
    """An out-of-memory error in the middle of the forward: the row says it did not fit, and
    nothing the step made (inputs, activations, the traceback's frames) outlives the call."""
    import weakref
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
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

    nvml = argparse.Namespace(used_gib=lambda: 3.0)
    cpu = torch.device("cpu")
    loss_fn = Loss(2)  # kept alive, as the sweep keeps it for the next batch
    row = memory.measure_step(loss_fn, "fast", "bf16", "both", 4, 8, cpu, nvml)
    assert row == memory.Row("fast", "bf16", "both", 4, False, None, None)
    assert len(alive) == 4 and all(ref() is None for ref in alive), "the failed step leaked"
    alive.clear()
    row = memory.measure_step(Loss(8), "fast", "bf16", "both", 4, 8, cpu, nvml)
    assert row == memory.Row("fast", "bf16", "both", 4, True, 1.5, 3.0)
    with pytest.raises(RuntimeError, match="not memory"):  # other errors are not swallowed
        memory.measure_step(_Raises(RuntimeError("not memory")), "fast", "bf16", "both", 1, 8,
                            cpu, nvml)


class _Raises(torch.nn.Module):
    def __init__(self, err):
        super().__init__()
        self.err = err

    def forward(self, *args, **kwargs):
        raise self.err
