"""Replaying the traced step's convolutions: every one of them, as the step ran it."""
import json

import pytest
import torch

from diffloss_fast.tools import hardware
from diffloss_fast.cli import main
from diffloss_fast.tools.conv_replay import TensorSpec, _thaw, freeze
from diffloss_fast.tools.roofline import CARDS, time_convolutions, trace_step

CPU = torch.device("cpu")


def test_a_frozen_call_rebuilds_its_tensors_in_the_layout_asked_for():
    x = torch.empty(2, 8, 4, 4, device="meta", dtype=torch.bfloat16)
    w = torch.empty(16, 8, 3, 3, device="meta", dtype=torch.bfloat16)
    spec = freeze((x, w, None, [1, 1], [True, False]))
    assert spec == (TensorSpec((2, 8, 4, 4), torch.bfloat16),
                    TensorSpec((16, 8, 3, 3), torch.bfloat16), None, (1, 1), (True, False))
    hash(spec)  # a call signature must be usable as a key
    for channels_last in (False, True):
        live_x, live_w, bias, stride, mask = _thaw(spec, CPU, torch.Generator().manual_seed(0),
                                                   channels_last)
        assert live_x.shape == x.shape and live_x.dtype == torch.bfloat16
        for t in (live_x, live_w):
            assert t.is_contiguous() != channels_last
            assert t.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert bias is None and stride == [1, 1] and mask == [True, False]


def test_every_traced_convolution_is_replayed_once_per_distinct_call():
    ops = trace_step("tiny", terms="both", batch=1, resolution=16)
    convs = [op for op in ops if op.category == "convolution"]
    assert convs and all(op.call is not None for op in convs)
    timed = time_convolutions(ops, CARDS["h100-sxm"], CPU)
    assert sum(r["count"] for r in timed["calls"]) == timed["ops"] == len(convs)
    assert timed["distinct"] == len({op.call for op in convs}) < len(convs)
    assert (sum(r["count"] * r["gflop"] for r in timed["calls"]) * 1e9
            == pytest.approx(sum(op.flops for op in convs)))
    kinds = {r["call"].split(" x(")[0].split(" dy(")[0] for r in timed["calls"]}
    assert kinds == {"forward", "input grad"}  # the frozen prior: no weight gradients
    assert timed["measured_ms"] == sum(r["count"] * r["ms"] for r in timed["calls"]) > 0
    assert timed["of_peak"] is None  # a CPU is not the card whose peak the floor uses
    assert timed["device"] == hardware.device_name(CPU)


def test_channels_last_replay_times_the_same_calls():
    ops = trace_step("tiny", terms="semantic", batch=1, resolution=16)
    nchw = time_convolutions(ops, CARDS["h100-sxm"], CPU)
    nhwc = time_convolutions(ops, CARDS["h100-sxm"], CPU, channels_last=True)
    assert nhwc["channels_last"] and not nchw["channels_last"]
    assert sorted(r["call"] for r in nhwc["calls"]) == sorted(r["call"] for r in nchw["calls"])


def test_command_times_the_convolutions_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    main(["roofline", "--prior", "tiny", "--batch", "1", "--resolution", "16", "--terms",
          "semantic", "--time-convolutions", "--device", "cpu", "--json", str(out)])
    timed = json.loads(out.read_text())["terms"]["semantic"]["convolutions"]
    assert timed["calls"] and timed["tflops"] > 0
    assert "convolutions alone (NCHW) on CPU" in capsys.readouterr().out
