"""``diffloss-fast check-precision`` on the tiny prior: one table row per comparison, the
difference path inside each precision's bounds (fp8 with its own), the two-pass path beside it
on request, and its JSON; which reduced precisions a device offers."""
import json

import pytest
import torch

from diffloss_fast.cli import main
from diffloss_fast.tools import precision


def test_check_precision_on_the_tiny_prior(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "DELTAS", (0.01,))
    monkeypatch.setattr(precision, "TIMESTEPS", (950,))
    out = tmp_path / "precision.json"
    main(["check-precision", "--device", "cpu", "--prior", "tiny", "--resolution", "32",
          "--batch", "1", "--precisions", "bf16", "fp8", "--two-pass", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # three term sets: bf16 and fp8 difference, bf16 two-pass (fp8 has no two-pass)
    assert len(rows) == 3 * 3
    mine = [r for r in rows if r["propagation"] == "difference"]
    assert {(r["precision"], r["term"]) for r in mine} == {
        (p, term) for p in ("bf16", "fp8") for term in ("natural", "semantic", "both")}
    assert all(r["ok"] and r["rel_error"] <= 0.02 and r["cosine"] >= 0.995
               for r in mine if r["precision"] == "bf16")
    # fp8 is judged by its own bounds (whether the tiny preset's random weights meet them is
    # the grid's business: tests/test_fp8.py)
    assert all(r["ok"] == (r["rel_error"] <= 0.05 and r["cosine"] >= 0.98)
               for r in mine if r["precision"] == "fp8")
    # two bf16 passes subtracted at t = 950 cannot resolve a 0.01 restoration error
    two_pass = [r for r in rows if r["propagation"] == "two-pass"]
    assert {r["precision"] for r in two_pass} == {"bf16"} and not any(r["ok"] for r in two_pass)
    printed = capsys.readouterr().out
    outside = sum(not r["ok"] for r in mine)
    assert f"outside them: {outside}" in printed and printed.count("two-pass") == 3
    assert ("bounds: bf16: loss within 2% of fp32, gradient cosine >= 0.995; "
            "fp8: loss within 5% of fp32, gradient cosine >= 0.98;") in printed


def test_ok_reads_each_precisions_own_bounds():
    assert precision.BOUNDS == {"bf16": (0.02, 0.995), "fp16": (0.02, 0.995),
                                "fp8": (0.05, 0.98)}
    assert precision.bounds_text(["bf16", "fp16", "fp8"]) == (
        "bf16/fp16: loss within 2% of fp32, gradient cosine >= 0.995; "
        "fp8: loss within 5% of fp32, gradient cosine >= 0.98")


@pytest.mark.parametrize("bf16, capability, expected", [
    (True, (9, 0), ["bf16", "fp16", "fp8"]),
    (True, (8, 9), ["bf16", "fp16", "fp8"]),
    (True, (8, 0), ["bf16", "fp16"]),
    (False, (7, 5), ["fp16"]),
])
def test_reduced_precisions(monkeypatch, bf16, capability, expected):
    assert precision.reduced_precisions(torch.device("cpu")) == ["bf16", "fp16", "fp8"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.reduced_precisions(torch.device("cuda")) == expected


def test_fp8_where_the_device_has_none_is_a_usage_error(capsys, monkeypatch):
    # a CUDA device of compute capability 8.6, wherever this runs
    monkeypatch.setattr(precision, "check_device", lambda parser, text: torch.device(text))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(SystemExit) as excinfo:
        main(["check-precision", "--device", "cuda", "--precisions", "fp8"])
    assert excinfo.value.code == 2
    assert "argument --precisions: precision='fp8' needs" in capsys.readouterr().err


def test_check_precision_with_every_block_fused(tmp_path, monkeypatch):
    """``--fuse-every-block``: the pair network's blocks all run on the fused pair kernel
    (counted), and the grid's cell the pair exists for stays inside bf16's bounds, for the
    network with its decoder (the natural term) and the one truncated after the middle
    block (the semantic term)."""
    import diffloss_fast.difference_unet as difference_unet
    monkeypatch.setattr(precision, "DELTAS", (0.01,))
    monkeypatch.setattr(precision, "TIMESTEPS", (950,))
    monkeypatch.setattr(precision, "TERMS", {k: precision.TERMS[k]
                                             for k in ("natural", "semantic")})
    calls = []
    real = difference_unet.pair_conv2d

    def counted(*args, **kwargs):
        calls.append(kwargs.get("prologue") is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(difference_unet, "pair_conv2d", counted)
    out = tmp_path / "precision.json"
    main(["check-precision", "--device", "cpu", "--prior", "tiny", "--resolution", "16",
          "--batch", "1", "--precisions", "bf16", "--fuse-every-block", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["fuse_every_block"] and len(result["rows"]) == 2
    assert all(r["ok"] for r in result["rows"]), result["rows"]
    assert sum(calls) > 0  # the fused blocks ran (with their prologues)


def test_fuse_every_block_on_the_cpu_needs_the_interpreter(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        main(["check-precision", "--device", "cpu", "--fuse-every-block"])
    assert "set TRITON_INTERPRET=1" in capsys.readouterr().err
