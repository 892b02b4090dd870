"""The roofline's FLOPs and bytes against hand counts, and its trace against a real step."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffloss_fast import DiffLoss, build_prior
from diffloss_fast.cli import main
from diffloss_fast.tools.roofline import (CARDS, Card, Op, _fused_attention, _Recorder, analyse,
                                          by_category, card_for, floors_ms,
                                          saved_activation_bytes, trace_step)

META = torch.device("meta")
BF16 = 2  # bytes per element


def record(fn):
    ops = []
    with _Recorder(ops):
        fn()
    return ops


def test_convolution_forward_counts_every_multiply_add_and_each_tensor_once():
    b, cin, cout, k, hw = 2, 8, 16, 3, 10
    x = torch.empty(b, cin, hw, hw, device=META, dtype=torch.bfloat16)
    w = torch.empty(cout, cin, k, k, device=META, dtype=torch.bfloat16)
    bias = torch.empty(cout, device=META, dtype=torch.bfloat16)
    [op] = record(lambda: F.conv2d(x, w, bias, padding=1))
    assert op.category == "convolution"
    assert op.flops == 2 * b * cout * cin * k * k * hw * hw
    assert op.bytes == BF16 * (x.numel() + w.numel() + cout + b * cout * hw * hw)


def test_input_gradient_of_a_frozen_convolution_does_not_read_the_forward_input():
    x = torch.empty(2, 8, 10, 10, device=META, requires_grad=True)
    w = torch.empty(4, 8, 3, 3, device=META)
    y = F.conv2d(x, w, padding=1)
    grad = torch.empty_like(y)
    [op] = record(lambda: y.backward(grad))
    assert op.name == "aten::convolution_backward"
    assert op.bytes == 4 * (grad.numel() + w.numel() + x.numel())  # dy and w in, dx out
    assert op.flops == 2 * 2 * 4 * 8 * 9 * 100  # one transposed convolution's worth


def test_views_move_nothing_and_a_copy_moves_its_tensor_twice():
    x = torch.empty(4, 6, device=META)
    assert record(lambda: x.view(-1).unflatten(0, (3, 8)).t().expand(2, 8, 3)) == []
    [op] = record(lambda: x.t().contiguous())
    assert op.category == "copy" and op.bytes == 2 * 4 * x.numel() and op.flops == 0


def test_group_norm_statistics_read_the_activation_only():
    x = torch.empty(2, 32, 8, 8, device=META, dtype=torch.bfloat16)
    weight = torch.empty(32, device=META, dtype=torch.bfloat16)
    [op] = record(lambda: F.group_norm(x, 8, weight, weight))
    assert op.category == "norm"
    assert op.stat_bytes == BF16 * x.numel()
    assert op.bytes > 2 * op.stat_bytes  # plus its output, its parameters and its statistics


def test_fused_attention_is_one_kernel_each_way_with_flash_attentions_traffic():
    b, heads, tokens, d = 2, 4, 64, 16
    q, k, v = (torch.empty(b, heads, tokens, d, device=META, requires_grad=True)
               for _ in range(3))
    ops = []
    out = _fused_attention(ops)(q, k, v)
    assert out.shape == q.shape
    out.backward(torch.empty_like(out))
    forward, backward = ops
    qk = 2 * b * heads * tokens * tokens * d  # one of the T x T matmuls
    assert forward.flops == 2 * qk  # scores, then scores @ v
    assert backward.flops == 5 * qk  # scores recomputed, then four gradient matmuls
    size = 4 * q.numel()
    assert forward.bytes == 4 * size  # q, k, v in; o out
    assert backward.bytes == 8 * size  # q, k, v, o, do in; dq, dk, dv out


def test_fused_norms_replace_norm_silu_and_film_passes_by_their_kernels_traffic():
    plain = trace_step("tiny", terms="both", batch=2, resolution=32)
    fused = trace_step("tiny", terms="both", batch=2, resolution=32, fused_norm=True)
    names = lambda ops: [op.name for op in ops]  # noqa: E731
    fused_forward = [op for op in fused if op.name == "group_norm_silu (fused forward)"]
    fused_backward = [op for op in fused if op.name == "group_norm_silu (fused backward)"]
    # every norm is fused, the attention blocks' (no SiLU after them) too: one per norm
    # forward, one per norm backward of the restored branch
    assert len(fused_forward) == names(plain).count("aten::native_group_norm")
    assert len(fused_backward) == names(plain).count("aten::native_group_norm_backward")
    assert names(plain).count("aten::silu_backward") < len(fused_backward)
    assert "aten::addcmul" not in names(fused)
    for op in fused_forward:
        assert op.bytes == 3 * op.stat_bytes  # x read twice, y written once
    assert sum(op.flops for op in fused) == sum(op.flops for op in plain)
    assert sum(op.bytes for op in fused) < sum(op.bytes for op in plain)


def test_resblock_convolutions_leave_their_biases_to_the_ops_after_them():
    """Every ResBlock convolution runs without its bias (the norm after the first and the
    residual sum after the last add it); only the input and output convolutions keep theirs.
    The fused path's residual sum is one kernel per ResBlock and branch."""
    from guided_diffusion.unet import ResBlock
    from diffloss_fast.prior import prior_architecture

    def forward_convs(ops):
        return [op.call[1] for op in ops
                if op.call and op.call[0] is torch.ops.aten.convolution.default
                and not op.call[1][6]]
    plain = trace_step("tiny", terms="both", batch=2, resolution=32)
    fused = trace_step("tiny", terms="both", batch=2, resolution=32, fused_norm=True)
    assert len(forward_convs(fused)) == len(forward_convs(plain)) > 4
    for ops in (plain, fused):  # input and output convolution, two branches
        assert sum(args[2] is not None for args in forward_convs(ops)) == 2 * 2
    blocks = sum(isinstance(m, ResBlock) for m in prior_architecture("tiny").modules())
    assert [op.name for op in fused].count("residual_bias_add (fused)") == 2 * blocks


def test_fused_norm_adds_the_skip_paths_gradient(monkeypatch):
    """Each ResBlock hands its input to the skip path through its first norm (each attention
    block to its residual sum through its norm), so the fused backward adds that path's
    gradient as it writes dx: one add fewer per block of the restored branch than when the
    input fans out directly, and one read instead of an add's three passes."""
    from guided_diffusion.unet import AttentionBlock, ResBlock
    from diffloss_fast.fast_unet import FastUNet
    from diffloss_fast.prior import prior_architecture

    adds = lambda ops: [op.name for op in ops].count("aten::add")  # noqa: E731
    passed = trace_step("tiny", terms="both", batch=2, resolution=32, fused_norm=True)

    def fan_out(self, norm, h, scale=None, shift=None, x_bias=None, pass_x=False, silu=True):
        y = self.plan.norm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps, scale,
                                shift, x_bias, False, silu)
        return (y, h) if pass_x else y

    monkeypatch.setattr(FastUNet, "_norm_silu", fan_out)
    fanned = trace_step("tiny", terms="both", batch=2, resolution=32, fused_norm=True)
    blocks = sum(isinstance(m, (ResBlock, AttentionBlock))
                 for m in prior_architecture("tiny").modules())
    assert adds(fanned) - adds(passed) == blocks > 0
    assert sum(op.bytes for op in passed) < sum(op.bytes for op in fanned)


def test_floors_take_the_slower_of_compute_and_memory_per_op():
    card = Card("test", peak_tflops=100.0, bandwidth_tbs=1.0)
    ops = [Op("conv", "convolution", flops=10 ** 12, bytes=10 ** 9),   # 10 ms compute, 1 ms memory
           Op("mm", "matmul", flops=10 ** 9, bytes=4 * 10 ** 9),       # 0.01 ms compute, 4 ms memory
           Op("silu", "elementwise", flops=0, bytes=2 * 10 ** 9),      # 2 ms
           Op("gn", "norm", flops=0, bytes=3 * 10 ** 9, stat_bytes=10 ** 9)]  # 3 ms, 1 fused
    floors = floors_ms(ops, card)
    assert floors["eager"] == pytest.approx(10 + 4 + 2 + 3)
    assert floors["fused"] == pytest.approx(10 + 4 + 0 + 1)
    assert floors["compute"] == pytest.approx((10 ** 12 + 10 ** 9) / 1e14 * 1e3)


def test_fp8_scenario_runs_forward_convolutions_at_the_fp8_rate_on_one_byte_operands():
    bf16_only = Card("test", peak_tflops=100.0, bandwidth_tbs=1.0)
    card = Card("test", peak_tflops=100.0, bandwidth_tbs=1.0, fp8_peak_tflops=200.0)
    # 10 ms of bf16 compute; 3 GB of operands (1 GB of it the output): 3 ms, 2 ms in FP8
    forward = Op("aten::convolution", "convolution", flops=10 ** 12, bytes=3 * 10 ** 9,
                 written=10 ** 9)
    # a memory-bound forward: 10 GB moved (2 GB written), 0.1 ms of compute
    thin = Op("aten::convolution", "convolution", flops=10 ** 10, bytes=10 ** 10,
              written=2 * 10 ** 9)
    dgrad = Op("aten::convolution", "convolution", flops=10 ** 12, bytes=10 ** 9,
               input_gradient=True)
    gn = Op("gn", "norm", flops=0, bytes=3 * 10 ** 9, stat_bytes=10 ** 9)
    ops = [forward, thin, dgrad, gn]
    assert "fused-fp8" not in floors_ms(ops, bf16_only)
    floors = floors_ms(ops, card)
    assert floors["fused"] == pytest.approx(10 + 10 + 10 + 1)
    # forward at half the time, the thin one at (8 / 2 + 2) GB, the input gradient unchanged
    assert floors["fused-fp8"] == pytest.approx(5 + 6 + 10 + 1)
    assert "fused-fp8" not in analyse(ops, card)["mfu_ceiling"]


def test_convolutions_record_what_they_write_and_whether_they_are_input_gradients():
    ops = trace_step("tiny", terms="semantic", batch=2, resolution=32)
    convs = [op for op in ops if op.category == "convolution"]
    assert all(0 < op.written < op.bytes for op in convs)
    # the frozen convolutions' input gradients are transposed convolutions, one per forward
    # convolution the restored branch's backward passes through
    forward = [op for op in convs if not op.input_gradient]
    dgrad = [op for op in convs if op.input_gradient]
    assert len(dgrad) > 0 and len(forward) > len(dgrad)
    assert sum(op.flops for op in dgrad) < sum(op.flops for op in forward)


@pytest.mark.parametrize("terms", ["both", "semantic"])
def test_trace_holds_every_flop_of_a_real_step(terms):
    """The meta trace against torch's FLOP counter on a real CPU step of the same network.
    The CPU's fused attention kernel is not in the counter's formulas, so attention (checked
    against hand counts above) is left out of the comparison."""
    natural = terms == "both"
    traced = trace_step("tiny", terms=terms, batch=2, resolution=32)
    loss_fn = DiffLoss(build_prior("tiny"), natural_weight=float(natural),
                       semantic_weight=1.0, precision="fp32")
    net = loss_fn._net(torch.device("cpu"), torch.float32, decoder=natural)
    x_gt, x_res = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32, requires_grad=True)
    t = torch.tensor([3, 700])
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            net(x_gt, t)
        eps, h = net(x_res, t)
        outputs = [h] + ([eps] if natural else [])
        torch.autograd.backward(outputs, [torch.randn_like(y) for y in outputs])
    assert any(op.category == "attention" for op in traced)
    assert (sum(op.flops for op in traced if op.category != "attention")
            == counter.get_total_flops() > 0)


def test_adm256_step_flops_match_the_design_counts():
    """DESIGN.md: full forward 2.24 TFLOP, encoder + middle 0.58 TFLOP per 256x256 image; a
    step is three of them (two forwards, one backward to the input)."""
    both = sum(op.flops for op in trace_step(terms="both", batch=1)) / 1e12
    semantic = sum(op.flops for op in trace_step(terms="semantic", batch=1)) / 1e12
    assert both == pytest.approx(3 * 2.24, rel=0.01)
    assert semantic == pytest.approx(3 * 0.58, rel=0.01)


def test_command_writes_floors_ordered_as_the_scenarios_allow(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    main(["roofline", "--prior", "tiny", "--batch", "2", "--resolution", "32",
          "--card", "h100-sxm", "--peak-tflops", "800", "--json", str(out),
          "--plot", str(tmp_path / "roofline.png")])
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert result["card"]["peak_tflops"] == 800 and result["card"]["bandwidth_tbs"] == 3.35
    assert result["prior"] == "tiny" and result["activation_checkpointing"] is False
    for terms in ("both", "semantic"):
        floors = result["terms"][terms]["floors_ms"]
        assert floors["eager"] >= floors["fused"] >= floors["compute"] > 0
        assert 0 < floors["fused-fp8"] < floors["fused"]  # the H100 has an FP8 rate
        assert 0 < result["terms"][terms]["mfu_ceiling"]["eager"] <= 1
    assert 0 < result["terms"]["semantic"]["saved_gib_per_image"] < result["terms"]["both"][
        "saved_gib_per_image"]
    both, semantic = (result["terms"][k]["floors_ms"]["compute"] for k in ("both", "semantic"))
    assert result["semantic_speedup_bound"]["compute"] == pytest.approx(both / semantic)
    assert "semantic only vs both terms" in capsys.readouterr().out


def test_categories_split_the_eager_floor_without_loss():
    card = CARDS["h100-sxm"]
    ops = trace_step("tiny", terms="both", batch=2, resolution=32)
    rows = by_category(ops, card)
    assert sum(r["ops"] for r in rows) == len(ops)
    for scenario in ("eager", "fused"):
        assert (sum(r[f"{scenario}_ms"] for r in rows)
                == pytest.approx(floors_ms(ops, card)[scenario]))
    assert {r["category"] for r in rows} >= {"convolution", "norm", "elementwise", "attention"}


def test_saved_activations_grow_with_the_batch_and_shrink_with_each_option():
    saved = lambda **kw: saved_activation_bytes("tiny", resolution=32, **kw)  # noqa: E731
    assert saved(batch=4) == 2 * saved(batch=2) > 0  # activations only, no fixed part
    plain, fused = saved(batch=2), saved(batch=2, fused_norm=True)
    checkpointed = saved(batch=2, checkpoint=True)
    assert checkpointed < fused < plain
    assert saved(batch=2, terms="semantic") < plain  # no decoder


def test_cards_are_found_by_their_cuda_device_names():
    assert card_for("NVIDIA H200").bandwidth_tbs == 4.8
    assert card_for("NVIDIA H100 80GB HBM3") is CARDS["h100-sxm"]
    assert card_for("NVIDIA H100 PCIe") is CARDS["h100-pcie"]
    assert card_for("NVIDIA GeForce RTX 4090") is CARDS["rtx-4090"]
    assert card_for("CPU (x86_64, 2 threads)") is None
