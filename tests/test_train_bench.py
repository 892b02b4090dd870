"""The training-step benchmark (``bench --train``) on the CPU: tiny prior, small nets, tiny
patches; what it times, what it reports, how it fails."""
from __future__ import annotations

import argparse
import functools
import json

import pytest
import torch

import diffloss_fast as dl
from diffloss_fast.tools import train_bench
from diffloss_fast.train import nets

ROW_KEYS = {"net", "net_gmacs", "terms", "batch", "patch", "ms_per_step", "ms_min", "ms_max",
            "ms_diffloss", "overhead_x", "status"}
# each net's own architecture, small enough for a busy 2-core CPU; all take 16x16 patches
SMALL = {"resunet": functools.partial(nets.ResidualUNet, width=8, depth=2, blocks=1),
         "nafnet": functools.partial(nets.NAFNetLike, width=8, encoder_blocks=(1, 1),
                                     middle_blocks=1, decoder_blocks=(1, 1)),
         "restormer": functools.partial(nets.RestormerLike, width=8, blocks=(1, 1, 1),
                                        heads=(1, 2, 4), refinement_blocks=1)}
FAST = ["--device", "cpu", "--patch", "16", "--train-batch", "1", "--train-steps", "2", "--train-warmup", "0"]


@pytest.fixture
def small_nets(monkeypatch):
    monkeypatch.setattr(nets, "BUILTIN", SMALL)


def test_runs_every_net_and_terms_and_writes_the_rows(small_nets, tmp_path, capsys,
                                                     one_thread):
    path = tmp_path / "sub" / "train.json"
    result = train_bench.main(["--json", str(path), *FAST])
    rows = result["rows"]
    assert [(r["net"], r["terms"]) for r in rows] == [
        (n, t) for n in ("resunet", "nafnet", "restormer") for t in ("none", "both", "semantic")]
    for r in rows:
        assert set(r) == ROW_KEYS and r["status"] == "ok", r
        assert (r["batch"], r["patch"]) == (1, 16)
        assert 0 < r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert r["net_gmacs"] == pytest.approx(nets.gmacs(SMALL[r["net"]](), 16, 16))
        if r["terms"] == "none":
            assert r["ms_diffloss"] is None and r["overhead_x"] == 1.0
        else:  # DiffLoss's share is part of each step
            assert 0 < r["ms_diffloss"] <= r["ms_max"]
            base = next(b for b in rows if b["net"] == r["net"] and b["terms"] == "none")
            assert r["overhead_x"] == pytest.approx(r["ms_per_step"] / base["ms_per_step"])
    assert json.loads(path.read_text())["rows"] == rows
    assert result["prior"] == "tiny" and result["net_precision"] == "float32"
    assert result["diffloss_precision"] == "fp32" and result["steps"] == 2
    out = capsys.readouterr().out
    assert "overhead" in out and "restormer" in out


def test_without_diffloss_no_prior_is_built(small_nets, monkeypatch):
    monkeypatch.setattr(train_bench, "measurement_prior", lambda *a: 1 / 0)
    result = train_bench.main(["--nets", "resunet", "--train-terms", "none", *FAST])
    assert [r["terms"] for r in result["rows"]] == ["none"]


def test_one_step_trains_the_net_through_diffloss(one_thread):
    """The step updates the weights, and DiffLoss's gradient reaches them: with it the update
    differs from the pixel loss's alone, and its timer saw one forward and one backward."""
    torch.manual_seed(0)
    prior = dl.build_prior("tiny", seed=0)
    for p in prior.parameters():  # guided-diffusion zero-initialises its output projections
        p.data.normal_(0, 0.2)
    template = SMALL["resunet"]()
    degraded, target = train_bench.make_patches(2, 16, torch.device("cpu"))
    updated = {}
    for terms in ("none", "semantic"):
        net = train_bench.copy.deepcopy(template)
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        loss_fn = train_bench.make_diffloss(prior, terms, precision="fp32", backend="torch")
        timer = train_bench.train_step(net, optimizer, loss_fn, degraded, target, None)
        if terms == "none":
            assert timer is None
        else:
            assert timer.calls == 1 and timer.forward_ms > 0 and timer.backward_ms > 0
        updated[terms] = torch.cat([p.detach().flatten() for p in net.parameters()])
    before = torch.cat([p.detach().flatten() for p in template.parameters()])
    assert not torch.equal(updated["none"], before)
    assert not torch.equal(updated["semantic"], updated["none"])


def test_patch_not_a_multiple_is_a_usage_error(small_nets, monkeypatch, capsys):
    monkeypatch.setattr(nets, "BUILTIN", {**SMALL, "nafnet": functools.partial(
        nets.NAFNetLike, width=8, encoder_blocks=(1, 1, 1), middle_blocks=1,
        decoder_blocks=(1, 1, 1))})  # needs multiples of 8
    with pytest.raises(SystemExit) as excinfo:
        train_bench.main(["--nets", "nafnet", "resunet", "--patch", "12",
                          "--train-terms", "none"])
    assert excinfo.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("error: --patch 12 must be a multiple of 8 (nafnet)")  # resunet: 4


class _Fails(torch.nn.Module):
    def __init__(self, err):
        super().__init__()
        self.weight, self.err = torch.nn.Parameter(torch.ones(())), err

    def forward(self, x):
        raise self.err


def test_a_failing_configuration_becomes_its_row():
    cpu = torch.device("cpu")
    kwargs = dict(amp_dtype=None, warmup=0, steps=1)
    oom = train_bench.measure("x", _Fails(torch.cuda.OutOfMemoryError("CUDA out of memory")),
                              1.0, "none", None, 1, 8, cpu, **kwargs)
    assert oom.status == "OOM" and oom.ms_per_step is None
    broken = train_bench.measure("x", _Fails(KeyError("k")), 1.0, "none", None, 1, 8, cpu,
                                 **kwargs)
    assert broken.status.startswith("error: KeyError") and broken.ms_per_step is None


def test_overheads_and_table():
    row = functools.partial(train_bench.TrainRow, net_gmacs=1.5, batch=8, patch=256)
    rows = [row("a", terms="none", ms_per_step=10.0), row("a", terms="both", ms_per_step=35.0),
            row("b", terms="both", ms_per_step=20.0),  # no baseline: no overhead
            row("c", terms="none", status="OOM"), row("c", terms="semantic", ms_per_step=5.0)]
    train_bench.add_overheads(rows)
    assert [r.overhead_x for r in rows] == [1.0, 3.5, None, None, None]
    table = train_bench.format_table(rows)
    assert "3.50x" in table and "OOM" in table and len(table.splitlines()) == 2 + len(rows)


def test_net_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_bench.net_dtype("auto", cpu) is None
    assert train_bench.net_dtype("fp32", cuda) is None
    assert train_bench.net_dtype("bf16", cpu) is torch.bfloat16


def test_flags_do_not_clash_with_bench():
    """``bench --train`` takes these flags beside bench's own."""
    from diffloss_fast.tools import bench
    sub = argparse.ArgumentParser().add_subparsers()
    bench.add_parser(sub)
    parser = sub.choices["bench"]
    mine = argparse.ArgumentParser(add_help=False)
    train_bench.add_train_arguments(mine)
    if not set(mine._option_string_actions) <= set(parser._option_string_actions):
        train_bench.add_train_arguments(parser)  # argparse refuses a flag defined twice
    args = parser.parse_args(["--nets", "nafnet", "restormer", "--train-batch", "4",
                              "--patch", "64", "--train-steps", "12", "--train-terms", "both",
                              "--terms", "semantic", "--repeats", "3"])
    assert args.nets == ["nafnet", "restormer"] and args.train_batch == 4 and args.patch == 64
    assert args.train_steps == 12 and args.train_terms == ["both"]
    assert args.terms == ["semantic"] and args.repeats == 3  # bench's own, untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path of the step")
def test_cuda_step_with_diffloss_defaults(small_nets):
    """On CUDA: the network under bf16 autocast, DiffLoss with its defaults (graphed), its
    share of each step read from CUDA events."""
    result = train_bench.main(["--device", "cuda", "--prior", "tiny", "--patch", "32",
                               "--train-batch", "2", "--train-steps", "3",
                               "--train-warmup", "2"])
    assert result["net_precision"] == "bfloat16" and result["diffloss_precision"] == "bf16"
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert 0 < r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        if r["terms"] != "none":
            assert 0 < r["ms_diffloss"] <= r["ms_max"]
