"""``diffloss-fast profile``: kernel names sorted into categories, and a CPU run end to end."""
import json

import pytest

from diffloss_fast.tools import profile
from diffloss_fast.cli import build_parser


@pytest.mark.parametrize("name, category", [
    # cuDNN convolutions are implicit GEMMs: they must not count as matmuls
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolution"),
    ("aten::mkldnn_convolution", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("aten::addmm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>", "norm"),
    # PyTorch's GroupNorm: statistics, per-channel coefficients, the backward's reductions over
    # dy and x, and the elementwise passes its implementation launches
    ("void at::native::(anonymous namespace)::ComputeInternalGradientsCUDAKernel<c10::BFloat16>",
     "norm"),
    ("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<c10::BFloat16>", "norm"),
    ("void at::native::(anonymous namespace)::ComputeBackwardFusedParamsCUDAKernel<float>", "norm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel2<c10::BFloat16>", "norm"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
     "(anonymous namespace)::GroupNormKernelImplInternal<c10::BFloat16, float>", "norm"),
    ("_gn_silu_fwd_kernel", "norm"),
    ("triton_red_fused_native_group_norm_silu_0", "norm"),
    ("_q_sample_pair_fwd_kernel", "fused loss ops"),
    ("_wl2_bwd_kernel", "fused loss ops"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::OpaqueType<2>>",
     "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float>>",
     "elementwise"),
    ("aten::addcmul", "elementwise"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "elementwise"),
    ("aten::avg_pool2d", "other"),
    # the fused path's own kernels fall where PyTorch's ops they replace fall
    ("_gn_rows_silu_bwd_kernel", "norm"),
    ("_residual_bias_add_kernel", "elementwise"),
    ("_pool_2x2_kernel", "other"),
    ("_upsample_2x_kernel", "other"),
])
def test_categories(name, category):
    assert profile.categorize(name) == category


def test_summary_per_step_and_shares():
    times = {"aten::mkldnn_convolution": (6000.0, 4), "aten::add": (2000.0, 8),
             "aten::avg_pool2d": (2000.0, 2)}
    s = profile.summarize(times, steps=2, wall_ms=10.0, top=2)
    assert s["busy_ms_per_step"] == pytest.approx(5.0)  # 10 ms over 2 steps
    cats = {c["category"]: c for c in s["categories"]}
    assert cats["convolution"]["ms_per_step"] == pytest.approx(3.0)
    assert cats["convolution"]["share"] == pytest.approx(0.6)
    assert sum(c["share"] for c in s["categories"]) == pytest.approx(1.0)
    assert [k["name"] for k in s["top"]] == ["aten::mkldnn_convolution", "aten::add"]
    assert s["top"][1]["calls_per_step"] == 4


def test_cpu_run_writes_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = build_parser().parse_args(["profile", "--device", "cpu", "--steps", "1",
                                      "--warmup", "1", "--batch", "1", "--json", str(out)])
    result = args.func(args)
    saved = json.loads(out.read_text())
    assert saved["kernels"] == "CPU operators (self time)" and saved["batch"] == 1
    assert saved["prior"] == "tiny" and saved["weights"] is None
    by_name = {c["category"]: c["ms_per_step"] for c in saved["categories"]}
    assert by_name["convolution"] > 0 and by_name["norm"] > 0 and by_name["attention"] > 0
    assert sum(by_name.values()) == pytest.approx(saved["busy_ms_per_step"])
    assert 0 < saved["busy_ms_per_step"] <= saved["wall_ms_per_step"] * 1.05
    assert result["categories"] == saved["categories"]
    assert "device busy" in capsys.readouterr().out


def test_sources_name_the_operators_around_each_launch():
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(256, 256)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("outer_op"):
            x.t().contiguous()
        x + 1
    sources = profile.kernel_sources(prof, ["copy", "elementwise"], steps=1, cuda=False)
    copies = [r["chain"].split(" < ") for r in sources["copy"]]
    assert ["aten::copy_", "aten::clone", "aten::contiguous", "outer_op"] in copies
    assert [r["chain"] for r in sources["elementwise"]] == ["aten::add"]
    assert sources["elementwise"][0]["calls_per_step"] == 1
