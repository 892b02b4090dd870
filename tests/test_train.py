"""`diffloss-fast train|eval`: short runs on the CPU with the tiny random-weight prior."""
from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import diffloss_fast as dl
from diffloss_fast.train import cli, report
from diffloss_fast.train.checkpoint import read_checkpoint
from diffloss_fast.train.data import DatasetError
from diffloss_fast.train.distributed import Context
from diffloss_fast.train.evaluate import evaluate
from diffloss_fast.train.metrics import psnr_ssim
from diffloss_fast.train.nets import build_net
from diffloss_fast.train.sampling import derive_seed
from diffloss_fast.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
SMALL_NET = ["--net-kwargs", '{"width": 8, "blocks": 1}']
SMALL_RUN = ["--synthetic", "lowlight", "--patch-size", "32", "--val-size", "32",
             "--val-images", "2", "--workers", "0", *SMALL_NET]
QUICK = [*SMALL_RUN, "--prior", "tiny"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffloss-fast")
    cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}.safetensors"


def cosine_lr(done: int, *, max_steps: int, warmup: int = 1, lr: float = 2e-4,
              min_lr: float = 1e-6) -> float:
    """The cosine schedule's LR after ``done`` optimizer steps, past the warm-up."""
    progress = (done - warmup) / (max_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """3 steps of 2 accumulated micro-batches, checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("run_a")
    metrics = train(parse("train", *QUICK, "--max-steps", "3", "--batch-size", "1",
                          "--accum-steps", "2", "--warmup-steps", "1", "--val-every", "2",
                          "--save-every", "2", "--out", str(out)))
    return out, metrics


def test_three_step_run_writes_metrics_grids_plot_and_checkpoints(run_a):
    out, returned = run_a
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"] == returned["train"]
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3]
    for entry in metrics["train"]:
        assert set(entry) == {"step", "loss", "pixel", "diffloss", "natural", "semantic",
                              "grad_ratio", "lr", "ms_restoration", "ms_diffloss"}
        assert entry["pixel"] > 0 and entry["diffloss"] > 0
        assert math.isclose(entry["diffloss"], 1e-3 * entry["natural"]
                            + 1e-6 * entry["semantic"], rel_tol=1e-6)
        assert entry["grad_ratio"] > 0
        assert math.isclose(entry["loss"], entry["pixel"] + entry["diffloss"])
        assert entry["ms_restoration"] > 0 and entry["ms_diffloss"] > 0
    assert set(metrics["val"]) == {"psnr", "ssim"}
    assert math.isfinite(metrics["val"]["psnr"]) and 0 < metrics["val"]["ssim"] <= 1
    assert [e["step"] for e in metrics["val_history"]] == [2, 3]
    assert [e["lr"] for e in metrics["train"]] == pytest.approx(
        [2e-4, cosine_lr(1, max_steps=3), cosine_lr(2, max_steps=3)])
    for name in ("val/step_0000002.png", "val/step_0000003.png", "loss.png"):
        assert Image.open(out / name).format == "PNG"
    grid = Image.open(out / "val/step_0000003.png")
    assert grid.size == (3 * 32, 2 * 32)  # input | output | target, one row per image
    assert checkpoint(out, 2).is_file() and checkpoint(out, 3).is_file()


def test_resume_gives_the_same_next_step(run_a, tmp_path):
    """Resume from step 2 (with a data-loader worker this time): step 3 matches exactly."""
    out_a, _ = run_a
    out_b = tmp_path / "run_b"
    shutil.copytree(out_a, out_b)
    checkpoint(out_b, 3).unlink()
    metrics = train(parse("train", *QUICK, "--max-steps", "3", "--batch-size", "1",
                          "--accum-steps", "2", "--warmup-steps", "1", "--val-every", "2",
                          "--save-every", "2", "--workers", "1", "--resume", "latest",
                          "--out", str(out_b)))
    a, b = read_checkpoint(checkpoint(out_a, 3)), read_checkpoint(checkpoint(out_b, 3))
    assert b["step"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert a["scheduler"] == b["scheduler"]
    expected = json.loads((out_a / "metrics.json").read_text())["train"]
    got = metrics["train"]
    assert [e["step"] for e in got] == [1, 2, 3]  # steps 1-2 kept from the interrupted run
    for key in ("loss", "pixel", "diffloss"):
        assert got[2][key] == expected[2][key], key


def test_resume_with_a_larger_max_steps_follows_the_longer_schedule(run_a, tmp_path):
    """From the resumed step on, the LR is that of a run started with the new --max-steps."""
    out_a, _ = run_a
    out_b = tmp_path / "run_b"
    shutil.copytree(out_a, out_b)
    metrics = train(parse("train", *QUICK, "--max-steps", "7", "--batch-size", "1",
                          "--accum-steps", "2", "--warmup-steps", "1", "--val-every", "0",
                          "--save-every", "0", "--resume", "latest", "--out", str(out_b)))
    lrs = {e["step"]: e["lr"] for e in metrics["train"]}
    assert sorted(lrs) == list(range(1, 8))
    assert lrs[3] == pytest.approx(cosine_lr(2, max_steps=3))  # kept from the first run
    for step in range(4, 8):  # the update of step s uses the LR after s - 1 steps
        assert lrs[step] == pytest.approx(cosine_lr(step - 1, max_steps=7), rel=1e-6), step
    assert lrs[4] > lrs[3]  # the longer curve is higher at step 3 than the finished one
    assert read_checkpoint(checkpoint(out_b, 7))["scheduler"]["_last_lr"] == pytest.approx(
        [1e-6])


def test_grad_ratio_and_terms_match_an_independent_computation(tmp_path):
    """Two accumulated micro-batches; the check builds the same network, batches, DiffLoss and
    noise, and differentiates each loss on its own with respect to the restored images."""
    argv = ["train", *QUICK, "--max-steps", "1", "--batch-size", "2", "--accum-steps", "2",
            "--natural-weight", "0.01", "--semantic-weight", "1e-4", "--device", "cpu",
            "--val-every", "0", "--save-every", "0"]
    entry = train(parse(*argv, "--out", str(tmp_path / "run")))["train"][0]

    fresh = Trainer(parse(*argv, "--out", str(tmp_path / "check")),
                    Context(0, 1, torch.device("cpu")))
    net = copy.deepcopy(fresh.net).train()
    loss_fn = dl.DiffLoss(dl.build_prior("tiny", seed=0), natural_weight=0.01,
                          semantic_weight=1e-4)
    grad_pixel = grad_diff = 0.0
    terms = {"natural": 0.0, "semantic": 0.0}
    for micro, (inp, tgt) in enumerate(itertools.islice(iter(fresh.loader), 2)):
        out = net(inp).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.mse_loss(out, tgt), out)
        grad_pixel += g.double().square().sum().item()
        gen = torch.Generator().manual_seed(derive_seed(0, 1, micro, 0))
        (g,) = torch.autograd.grad(loss_fn(out, tgt, generator=gen), out)
        grad_diff += g.double().square().sum().item()
        for key in terms:
            terms[key] += loss_fn.last_terms[key].item() / 2
    assert entry["grad_ratio"] == pytest.approx(math.sqrt(grad_diff / grad_pixel), rel=1e-5)
    assert entry["natural"] == pytest.approx(terms["natural"], rel=1e-5)
    assert entry["semantic"] == pytest.approx(terms["semantic"], rel=1e-5)


def test_loss_plot_has_a_loss_panel_with_two_axes_and_a_psnr_panel(tmp_path):
    train_log = [{"step": s, "pixel": 0.1 / s, "diffloss": 1e-4 / s} for s in (1, 2, 3)]
    fig = report.plot_losses(tmp_path / "loss.png", train_log,
                             [{"step": 2, "psnr": 20.0}, {"step": 3, "psnr": 21.0}])
    assert Image.open(tmp_path / "loss.png").format == "PNG"
    pixel, psnr, diff = fig.axes  # the twin axis is added last
    assert pixel.get_ylabel() == "pixel loss" and pixel.get_yscale() == "log"
    assert diff.get_ylabel() == "DiffLoss (weighted)" and diff.get_yscale() == "log"
    assert list(diff.lines[0].get_ydata()) == [1e-4, 5e-5, 1e-4 / 3]
    assert psnr.get_title() == "validation PSNR"
    assert list(psnr.lines[0].get_xdata()) == [2, 3]
    baseline = report.plot_losses(tmp_path / "baseline.png",
                                  [{"step": 1, "pixel": 0.1, "diffloss": None}], [])
    assert len(baseline.axes) == 2  # no DiffLoss axis without DiffLoss


def test_baseline_l1_step_schedule_custom_net_on_a_folder(tmp_path):
    """--no-diffloss needs no prior; --net takes any nn.Module by import path."""
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        for sub in ("in", "gt"):
            (tmp_path / sub).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), np.uint8)).save(
                tmp_path / sub / f"{name}.png")
    out = tmp_path / "out"
    metrics = train(parse(
        "train", "--dataset", "paired", "--input-dir", str(tmp_path / "in"),
        "--target-dir", str(tmp_path / "gt"), "--no-diffloss", "--pixel-loss", "l1",
        "--schedule", "step", "--lr-step", "1", "--net", "torch.nn:Conv2d", "--net-kwargs",
        '{"in_channels": 3, "out_channels": 3, "kernel_size": 3, "padding": 1}',
        "--patch-size", "16", "--batch-size", "2", "--max-steps", "2", "--workers", "0",
        "--out", str(out)))
    for key in ("diffloss", "natural", "semantic", "grad_ratio", "ms_diffloss"):
        assert [e[key] for e in metrics["train"]] == [None, None], key
    assert metrics["train"][0]["loss"] == metrics["train"][0]["pixel"]
    # validation falls back to training pairs, whole images (24x20, padded inside) in the grid
    assert Image.open(out / "val/step_0000002.png").size == (3 * 20, 3 * 24)
    assert read_checkpoint(checkpoint(out, 2))["net"]["net"] == "torch.nn:Conv2d"


def test_prior_loaded_from_a_checkpoint_file(tmp_path, capsys):
    from safetensors.torch import save_file

    import diffloss_fast as dl

    path = tmp_path / "prior.safetensors"
    save_file(dl.build_prior("tiny", seed=3).state_dict(), str(path))
    metrics = train(parse("train", *SMALL_RUN, "--prior", str(path), "--prior-config", "tiny",
                          "--target", "x_prev", "--semantic-weight", "0", "--max-steps", "1",
                          "--batch-size", "1", "--out", str(tmp_path / "o")))
    assert metrics["train"][0]["diffloss"] > 0
    assert f"prior: {path} (tiny)" in capsys.readouterr().out


def test_eval_reports_psnr_ssim_and_writes_json(run_a, tmp_path, capsys):
    out_a, _ = run_a
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        for sub in ("in", "gt"):
            (tmp_path / sub).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (30, 26, 3), np.uint8)).save(
                tmp_path / sub / f"{name}.png")
    out = tmp_path / "eval"
    result = evaluate(parse("eval", "--checkpoint", str(checkpoint(out_a, 3)), "--input-dir",
                            str(tmp_path / "in"), "--target-dir", str(tmp_path / "gt"),
                            "--out", str(out), "--device", "cpu"))
    assert json.loads((out / "eval.json").read_text()) == result
    assert result["step"] == 3 and result["count"] == 2 and result["metric_channel"] == "rgb"
    assert [e["name"] for e in result["images"]] == ["x.png", "y.png"]
    assert math.isclose(result["psnr"], sum(e["psnr"] for e in result["images"]) / 2)
    for entry in result["images"]:  # the input's own scores, straight from scikit-image
        inp, gt = (np.asarray(Image.open(tmp_path / sub / entry["name"])) / 255.0
                   for sub in ("in", "gt"))
        assert entry["input_psnr"] == pytest.approx(
            peak_signal_noise_ratio(gt, inp, data_range=1.0), rel=1e-6)
        assert entry["input_ssim"] == pytest.approx(structural_similarity(
            gt, inp, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, channel_axis=2), rel=1e-6)
    assert math.isclose(result["input_psnr"],
                        sum(e["input_psnr"] for e in result["images"]) / 2)
    assert (f"input PSNR {result['input_psnr']:.2f} dB, SSIM {result['input_ssim']:.4f}"
            in capsys.readouterr().out)
    restored = np.asarray(Image.open(out / "x.png"))
    assert restored.shape == (30, 26, 3)
    only = evaluate(parse("eval", "--checkpoint", str(checkpoint(out_a, 3)), "--input-dir",
                          str(tmp_path / "in"), "--device", "cpu"))
    assert only["count"] == 2 and "psnr" not in only


def test_eval_on_synthetic_rain_uses_luma(run_a, capsys):
    out_a, _ = run_a
    result = evaluate(parse("eval", "--checkpoint", str(checkpoint(out_a, 3)), "--synthetic",
                            "rain", "--val-size", "32", "--max-images", "2", "--json"))
    assert result["metric_channel"] == "y" and result["count"] == 2
    assert json.loads(capsys.readouterr().out)["psnr"] == result["psnr"]


@pytest.mark.parametrize("argv, error, match", [
    (["--synthetic", "haze"], ValueError, "needs a prior"),
    (["--synthetic", "haze", "--prior", "tiny", "--patch-size", "30"], ValueError,
     "multiple of 4"),
    (["--synthetic", "haze", "--prior", "missing.pt"], FileNotFoundError, "missing.pt"),
    (["--no-diffloss", "--net", "nowhere.module:Net"], ValueError, "cannot import"),
    (["--no-diffloss", "--net-kwargs", "{oops"], ValueError, "not valid JSON"),
    (["--no-diffloss"], DatasetError, "choose the data"),
    (["--no-diffloss", "--synthetic", "rain", "--dataset", "lol"], DatasetError, "--synthetic"),
])
def test_bad_arguments_fail_before_training(tmp_path, argv, error, match):
    with pytest.raises(error, match=match):
        train(parse("train", *argv, "--out", str(tmp_path), "--workers", "0"))
    assert not (tmp_path / "metrics.json").exists()


def test_unreadable_image_stops_training_before_the_first_step(tmp_path):
    for sub in ("in", "gt"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / sub / "1.png")
    (tmp_path / "gt" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*gt/1\.png"):
        train(parse("train", "--dataset", "paired", "--input-dir", str(tmp_path / "in"),
                    "--target-dir", str(tmp_path / "gt"), "--no-diffloss", "--patch-size", "16",
                    "--out", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="diffloss-fast train: error: .*needs a prior"):
        cli.run_train(parse("train", "--synthetic", "haze", "--out", str(tmp_path)))


def test_help_lists_the_options():
    sub = argparse.ArgumentParser().add_subparsers()
    cli.add_parsers(sub)
    helps = {name: p.format_help() for name, p in sub.choices.items()}
    for option in ("--synthetic", "--dataset", "--prior", "--natural-weight", "--accum-steps",
                   "--schedule", "--resume", "--val-every", "--amp", "torchrun"):
        assert option in helps["train"]
    assert "--checkpoint" in helps["eval"] and "--json" in helps["eval"]


def test_metrics_use_data_range_one_and_luma():
    target = torch.full((3, 16, 16), 0.5)
    restored = target + 0.1  # MSE 0.01 -> exactly 20 dB with data_range=1
    psnr, ssim = psnr_ssim(restored, target)
    assert math.isclose(psnr, 20.0, rel_tol=1e-6) and 0 < ssim < 1
    # BT.601 luma scales differences by (65.481 + 128.553 + 24.966) / 255 = 219/255
    psnr_y, _ = psnr_ssim(restored, target, "y")
    assert math.isclose(psnr_y, 20.0 - 20 * math.log10(219 / 255), rel_tol=1e-6)


def test_builtin_net_keeps_the_image_size():
    net = build_net("resunet", {"width": 8, "depth": 3})
    assert net.size_multiple == 8
    assert net(torch.rand(2, 3, 24, 16)).shape == (2, 3, 24, 16)
    with pytest.raises(ValueError, match="module:Class"):
        build_net("not-a-net")


def test_torchrun_two_processes(tmp_path):
    """DDP over gloo: 2 processes, only rank 0 writes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "diffloss_fast", "train", "--synthetic", "lowlight", "--prior", "tiny",
           "--max-steps", "3", "--batch-size", "2", "--patch-size", "64", "--out", str(out),
           "--val-size", "64", "--val-images", "2", "--workers", "1", *SMALL_NET]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("done at step 3") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3]
    assert math.isfinite(metrics["val"]["psnr"])
    assert (out / "val/step_0000003.png").is_file() and (out / "loss.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003.safetensors"]


# --- BasicSR ----------------------------------------------------------------------------------

def _import_fresh(name):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.skipif(importlib.util.find_spec("basicsr") is not None, reason="basicsr installed")
def test_basicsr_integration_without_basicsr_says_so():
    with pytest.raises(ImportError, match="needs BasicSR"):
        _import_fresh("diffloss_fast.integrations.basicsr")


def test_basicsr_integration_registers_with_loss_weight(monkeypatch):
    """Against a stand-in registry shaped like BasicSR's (basicsr.utils.registry.Registry)."""
    class Registry(dict):
        def register(self):
            def deco(cls):
                self[cls.__name__] = cls
                return cls
            return deco
    registry = Registry()
    for name in ("basicsr", "basicsr.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    stub = types.ModuleType("basicsr.utils.registry")
    stub.LOSS_REGISTRY = registry
    monkeypatch.setitem(sys.modules, "basicsr.utils.registry", stub)
    try:
        module = _import_fresh("diffloss_fast.integrations.basicsr")
    finally:
        sys.modules.pop("diffloss_fast.integrations.basicsr", None)
    loss = registry["DiffLoss"](prior="tiny", loss_weight=2.0)
    assert isinstance(loss, module.DiffLoss)
    pred, target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    torch.manual_seed(0)
    got = loss(pred, target)
    torch.manual_seed(0)
    assert torch.allclose(got, 2.0 * loss.diffloss(pred, target))
    with pytest.raises(ValueError, match="weight"):
        loss(pred, target, weight=torch.ones_like(pred))


def test_basicsr_integration_with_real_basicsr():
    pytest.importorskip("basicsr")
    from basicsr.losses import build_loss

    import diffloss_fast.integrations.basicsr  # noqa: F401 - registers DiffLoss

    loss = build_loss({"type": "DiffLoss", "prior": "tiny", "loss_weight": 0.5})
    pred, target = torch.rand(1, 3, 16, 16, requires_grad=True), torch.rand(1, 3, 16, 16)
    loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
