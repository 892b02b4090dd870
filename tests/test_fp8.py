"""``precision="fp8"``: the e4m3 quantizer and its delayed scaling against independent
computations, and DiffLoss on it against fp32 (DESIGN.md section 3: loss within 5%,
input-gradient cosine >= 0.98 over delta RMS 0.3/0.05/0.01 and t 50/300/600/950, each term and
both). On the CPU this is the fake-quantized twin, the same quantization a GPU runs.

The grid runs on an ADM-proportioned prior: the channel multipliers of the bf16 grid's
ADM-shaped prior (1,2,3,4, attention at 16 and 8) with ADM's two res blocks per level, since
FP8's rounding error adds up convolution after convolution, at 64 channels and 32x32 so that
it stays quick on the CPU, with the suite's random weights (``random_unets``). FP8's gradient
accuracy depends on the weights: with ``build_prior``'s (norm scales near 1) the cosine falls
short of 0.98 at t = 50 on this architecture (docs/difference-propagation.md), so the verdict
for the real prior is ``diffloss-fast check-precision`` with its checkpoint.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffloss_fast as dl
from diffloss_fast import fast_unet
from diffloss_fast.fp8_unet import FP8DifferenceUNet
from diffloss_fast.ops import fp8
from diffloss_fast.ops.frozen_conv import frozen_conv2d
from random_unets import TINY, randomized_unet

ADM_PROPORTIONED = dict(TINY, image_size=32, num_channels=64, channel_mult="1,2,3,4",
                        attention_resolutions="16,8", num_head_channels=32, num_res_blocks=2)
TIMESTEPS = (50, 300, 600, 950)
TERMS = {"natural": (1.0, 0.0), "semantic": (0.0, 1.0), "both": (1e-3, 1e-6)}
LOSS_BOUND, COSINE_BOUND = 0.05, 0.98


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn value, decoded from its bits by hand (1 sign, 4 exponent bits with
    bias 7, 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN, and there is no inf)."""
    values = []
    for bits in range(256):
        sign, exponent, mantissa = bits >> 7, (bits >> 3) & 15, bits & 7
        if exponent == 15 and mantissa == 7:
            continue
        magnitude = (mantissa / 8 * 2.0 ** -6 if exponent == 0
                     else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
        values.append(-magnitude if sign else magnitude)
    return torch.tensor(sorted(set(values)), dtype=torch.float64)


# --- the quantizer ----------------------------------------------------------------------
def test_the_grid_is_e4m3fn():
    grid = e4m3_values()
    assert grid.max() == fp8.E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max
    assert len(grid) == 253  # 254 finite codes, +0 and -0 being one value


def test_representable_values_round_trip_exactly():
    grid = e4m3_values().float()
    assert torch.equal(fp8.quantize(grid, torch.tensor(1.0)).float(), grid)
    scale = torch.tensor(0.375)  # an arbitrary scale: x = value * scale comes back as value
    assert torch.equal(fp8.quantize(grid * scale, scale).float(), grid)


def test_rounds_to_the_nearest_value():
    grid = e4m3_values()
    gen = torch.Generator().manual_seed(0)
    x = torch.exp2(torch.rand(20000, generator=gen) * 20 - 12)  # 2^-12 .. 2^8
    x = (x * torch.where(torch.rand(20000, generator=gen) < 0.5, -1.0, 1.0)).double()
    nearest = grid[(x[:, None] - grid[None]).abs().argmin(dim=1)]
    got = fp8.quantize(x.float(), torch.tensor(1.0)).double()
    # a tie between two neighbours (probability ~0 for random inputs) may go either way
    distance = (x - got).abs()
    assert torch.equal(distance, (x - nearest).abs())
    assert (got == nearest).float().mean() > 0.999


def test_saturates_instead_of_overflowing():
    x = torch.tensor([449.0, 464.0, 480.0, 1e6, float("inf"), -500.0, -1e30])
    got = fp8.quantize(x, torch.tensor(1.0)).float()
    assert torch.equal(got, torch.tensor([448.0] * 5 + [-448.0] * 2))
    # a scale from an earlier, smaller amax saturates the larger values, finite
    y = torch.linspace(-10, 10, 101)
    got = fp8.quantize(y, torch.tensor(5 / 448)).float()
    assert torch.isfinite(got).all() and got.abs().max() == 448
    assert torch.equal(got[y.abs() >= 5].abs(), torch.full_like(got[y.abs() >= 5], 448.0))


def test_weight_scales_put_each_output_channel_on_448():
    gen = torch.Generator().manual_seed(1)
    magnitudes = torch.tensor([1e-4, 1e-2, 1, 10, 300, 0.0]).view(-1, 1, 1, 1)
    w = torch.randn(6, 4, 3, 3, generator=gen) * magnitudes
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6,)
    peaks = q.float().flatten(1).abs().amax(dim=1)
    assert torch.equal(peaks[:5], torch.full((5,), 448.0))
    assert torch.equal(peaks[5], torch.tensor(0.0)) and scale[5] == 1  # zeros stay zeros
    assert torch.allclose(scale[:5], w.flatten(1).abs().amax(1)[:5] / 448, rtol=1e-6)
    # each element within half a step of the e4m3 grid at its channel's scale
    s = scale.view(-1, 1, 1, 1)
    error = (q.float() * s - w).abs()
    assert (error <= torch.maximum(w.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-5)).all()


# --- delayed scaling --------------------------------------------------------------------
def test_delayed_scaling_reads_earlier_calls_in_place():
    scaling = fp8.DelayedScaling(2, length=3)
    history, pointer = scaling.history, scaling.history.data_ptr()
    version = history._version

    def call(*amaxes):
        scaling.begin_call()
        return [float(scaling.scale(i, torch.tensor([-a, a / 3]))) for i, a in enumerate(amaxes)]

    # the first call has no history: each tensor's own amax lands on 448
    assert call(10.0, 2.0) == pytest.approx([10 / 448, 2 / 448])
    # later calls: the earlier calls' largest amax, with headroom, whatever this call holds
    assert call(5.0, 50.0) == pytest.approx([10 * fp8.HEADROOM / 448, 2 * fp8.HEADROOM / 448])
    assert call(1.0, 1.0) == pytest.approx([10 * fp8.HEADROOM / 448, 50 * fp8.HEADROOM / 448])
    assert call(1.0, 1.0) == pytest.approx([10 * fp8.HEADROOM / 448, 50 * fp8.HEADROOM / 448])
    # the history holds 3 calls: the first call's 10 has gone, the second's 50 not yet
    assert call(1.0, 1.0) == pytest.approx([5 * fp8.HEADROOM / 448, 50 * fp8.HEADROOM / 448])
    assert torch.equal(history, torch.tensor([[1.0, 1.0, 5.0], [1.0, 1.0, 50.0]]))
    assert scaling.history is history and history.data_ptr() == pointer
    assert history._version > version  # written in place


def test_a_recomputation_reproduces_the_call():
    """Activation checkpointing runs a layer again in the backward pass: it must read the
    same scale and record the same amax."""
    scaling = fp8.DelayedScaling(1)
    scaling.begin_call()
    scaling.scale(0, torch.tensor([3.0]))
    scaling.begin_call()
    first = scaling.scale(0, torch.tensor([7.0]))
    again = scaling.scale(0, torch.tensor([7.0]))
    assert torch.equal(first, again) and float(scaling.pending[0]) == 7.0


def test_no_value_is_read_on_the_host():
    """On the meta device a tensor has no values: any .item() or bool() of one raises. The
    scaling, the quantization and the convolution forward and backward run there."""
    meta = torch.device("meta")
    conv = nn.Conv2d(4, 6, 3, padding=1, device=meta).requires_grad_(False)
    q, scale = fp8.quantize_weight(conv.weight)
    conv = conv.to(torch.bfloat16)
    conv.register_buffer("weight_e4m3", q)
    conv.register_buffer("weight_scale", scale)
    scaling = fp8.DelayedScaling(2, device=meta)
    x = torch.empty(2, 4, 8, 8, device=meta, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):
        scaling.begin_call()
        y = fp8.e4m3_conv2d(conv, x, scaling.scale(1, x), bias=False)
        y.float().sum().backward()
    assert y.device == meta and x.grad.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_delayed_scaling_replays_in_a_cuda_graph():
    scaling = fp8.DelayedScaling(1, device="cuda")
    x = torch.ones(16, device="cuda")
    out = torch.empty((), device="cuda")

    def step():
        scaling.begin_call()
        out.copy_(scaling.scale(0, x))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up: the first call
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for value in (2.0, 8.0, 3.0):
        x.fill_(value)
        graph.replay()
    torch.cuda.synchronize()
    # the last replay read the amax of the earlier ones (8), not the value it was given
    assert float(out) == pytest.approx(8 * fp8.HEADROOM / 448)
    assert float(scaling.pending[0]) == 3.0


# --- the convolution --------------------------------------------------------------------
def _quantized_conv(seed=0, c_in=8, c_out=5, k=3, stride=1):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        conv.bias.copy_(torch.randn(c_out, generator=gen))
    q, scale = fp8.quantize_weight(conv.weight)
    conv = conv.to(torch.bfloat16)
    conv.register_buffer("weight_e4m3", q)
    conv.register_buffer("weight_scale", scale)
    return conv, gen


@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_is_the_quantized_operands_convolved_exactly(stride):
    conv, gen = _quantized_conv(stride=stride)
    x = (torch.randn(2, 8, 9, 9, generator=gen) * 3).bfloat16()
    x_scale = fp8.amax_to_scale(x.abs().amax())
    got = fp8.e4m3_conv2d(conv, x, x_scale)
    # independently: the e4m3 values times their scales, convolved in float64
    xq = fp8.quantize(x, x_scale).double() * x_scale.double()
    wq = conv.weight_e4m3.double() * conv.weight_scale.double().view(-1, 1, 1, 1)
    want = F.conv2d(xq, wq, conv.bias.double(), stride=stride, padding=1)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=2.0 ** -8, atol=1e-6 * want.abs().max())
    # and it is not the unquantized convolution
    assert not torch.allclose(got, frozen_conv2d(conv, x), rtol=2.0 ** -7, atol=0)


def test_backward_is_straight_through_in_bf16():
    conv, gen = _quantized_conv(stride=2)
    x = (torch.randn(2, 8, 9, 9, generator=gen)).bfloat16().requires_grad_(True)
    grad = torch.randn(2, 5, 5, 5, generator=gen).bfloat16()
    y = fp8.e4m3_conv2d(conv, x, fp8.amax_to_scale(x.detach().abs().amax()), bias=False)
    (got,) = torch.autograd.grad(y, x, grad)
    y_ref = frozen_conv2d(conv, x, bias=False)
    (want,) = torch.autograd.grad(y_ref, x, grad)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_devices():
    fp8.check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8.*mps"):
        fp8.check_device(torch.device("mps"))


@pytest.mark.parametrize("capability, ok", [((8, 6), False), ((8, 0), False),
                                            ((8, 9), True), ((9, 0), True)])
def test_cuda_needs_fp8_tensor_cores(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if ok:
        fp8.check_device(torch.device("cuda"))
    else:
        with pytest.raises(ValueError, match=r"8\.9 or later.*sm_%d%d" % capability):
            fp8.check_device(torch.device("cuda"))


# --- DiffLoss -----------------------------------------------------------------------------
def _images(delta, size=32, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand(batch, 3, size, size, generator=gen) * 0.8 + 0.1
    restored = gt + delta * torch.randn(batch, 3, size, size, generator=gen)
    return restored, gt, torch.randn(batch, 3, size, size, generator=gen)


def _loss_and_grad(loss_fn, restored, gt, t, noise):
    x = restored.clone().requires_grad_(True)
    loss = loss_fn(x, gt, t=t, noise=noise)
    loss.backward()
    return float(loss.detach()), x.grad.flatten().double()


def cosine(x, y):
    return float(x @ y / (x.norm() * y.norm()))


def test_restored_equal_to_target_gives_zero(tiny_unet, one_thread):
    _, gt, noise = _images(0.0)
    loss_fn = dl.DiffLoss(tiny_unet, precision="fp8", natural_weight=1.0, semantic_weight=1.0)
    for t in (0, 500, 999):
        x = gt.clone().requires_grad_(True)
        loss = loss_fn(x, gt, t=torch.tensor([t, t]), noise=noise)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        assert all(float(v) == 0.0 for v in loss_fn.last_terms.values())


def test_fp8_network_and_its_gradient(tiny_unet, one_thread):
    restored, gt, noise = _images(0.1)
    loss_fn = dl.DiffLoss(tiny_unet, precision="fp8")
    loss, grad = _loss_and_grad(loss_fn, restored, gt, torch.tensor([100, 800]), noise)
    assert loss > 0 and torch.isfinite(grad).all() and grad.abs().max() > 0
    assert all(p.grad is None for p in tiny_unet.parameters())
    (net,) = loss_fn._nets.values()
    assert isinstance(net, FP8DifferenceUNet) and net.dtype == torch.bfloat16
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight_e4m3.dtype == torch.float8_e4m3fn for c in convs)
    # the bf16 fused norm + convolution blocks never stand in for an e4m3 convolution
    net.fused_blocks = frozenset({"any"})
    assert not net._fused("in", tuple(restored.shape), convs[1])
    net.fused_blocks = frozenset()
    # quantized from the prior's own fp32 weights (the noise head: its first 3 channels)
    source = tiny_unet.out[2].weight[:3]
    q, scale = fp8.quantize_weight(source)
    assert torch.equal(net.out_conv.weight_e4m3.float(), q.float())
    assert torch.equal(net.out_conv.weight_scale, scale)
    # a state of 2 amaxes per convolution, advanced once per call
    assert net.scaling.history.shape == (2 * len(convs), fp8.HISTORY_LENGTH)
    assert (net.scaling.history[:, 0] == 0).all() and (net.scaling.pending[1::2] > 0).all()
    first = net.scaling.pending.clone()
    loss_fn(restored * 0.9 + 0.05, gt, t=torch.tensor([600, 300]), noise=noise)
    assert torch.equal(net.scaling.history[:, 0], first)
    assert not torch.equal(net.scaling.pending, first)


def test_activation_checkpointing_gives_the_same_steps(tiny_unet, one_thread):
    """Recomputed layers read the scales of their own call: the same loss and gradient,
    step after step."""
    plain = dl.DiffLoss(tiny_unet, precision="fp8")
    checkpointed = dl.DiffLoss(tiny_unet, precision="fp8", checkpoint=True)
    for seed, t in ((0, [50, 900]), (1, [300, 600])):
        restored, gt, noise = _images(0.05, seed=seed)
        want = _loss_and_grad(plain, restored, gt, torch.tensor(t), noise)
        got = _loss_and_grad(checkpointed, restored, gt, torch.tensor(t), noise)
        assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_refusals(tiny_unet):
    with pytest.raises(ValueError, match="two passes quantized to FP8"):
        dl.DiffLoss(tiny_unet, precision="fp8", propagation="two-pass")
    for execution in ("compiled", "regional"):
        with pytest.raises(ValueError, match=f"fp8.*execution='{execution}'"):
            dl.DiffLoss(tiny_unet, precision="fp8", execution=execution)
    with pytest.raises(ValueError, match="fp8.*compiled"):
        dl.DiffLoss(tiny_unet, precision="fp8", compile=True)
    with pytest.raises(ValueError, match="ReferenceDiffLoss has no precision='fp8'"):
        dl.ReferenceDiffLoss(tiny_unet, precision="fp8")
    assert dl.DiffLoss(tiny_unet, precision="fp8", propagation="difference")._difference(
        torch.bfloat16)


def _fake_quantized_conv(conv, x, *, bias=True):
    """A convolution of FastUNet with e4m3 operands, each tensor at its own amax (the most a
    per-tensor scale can give each branch)."""
    q, scale = fp8.quantize_weight(conv.weight)
    conv.weight_e4m3, conv.weight_scale = q, scale
    return fp8.e4m3_conv2d(conv, x, fp8.amax_to_scale(x.detach().abs().amax()), bias=bias)


def test_two_fp8_passes_lose_what_the_pair_keeps(tiny_unet, one_thread, monkeypatch):
    """Why the pair exists: at t = 950 a restoration 0.01 RMS off its target moves the noised
    input by ~1e-4 of its range, far below e4m3's 3 mantissa bits. Two passes quantized apart
    and subtracted measure rounding; the pair quantizes the difference at its own scale."""
    restored, gt, noise = _images(0.01)
    t = torch.tensor([950, 950])
    for term, (natural, semantic) in TERMS.items():
        reference = dl.DiffLoss(tiny_unet, precision="fp32", natural_weight=natural,
                                semantic_weight=semantic)
        want, want_grad = _loss_and_grad(reference, restored, gt, t, noise)
        pair = dl.DiffLoss(tiny_unet, precision="fp8", natural_weight=natural,
                           semantic_weight=semantic)
        got, grad = _loss_and_grad(pair, restored, gt, t, noise)
        assert abs(got - want) / want <= LOSS_BOUND and cosine(grad, want_grad) >= COSINE_BOUND
        with monkeypatch.context() as patch:
            patch.setattr(fast_unet, "frozen_conv2d", _fake_quantized_conv)
            two_pass = dl.DiffLoss(tiny_unet, precision="bf16", propagation="two-pass",
                                   natural_weight=natural, semantic_weight=semantic)
            got, grad = _loss_and_grad(two_pass, restored, gt, t, noise)
        assert abs(got - want) / want > 100 and cosine(grad, want_grad) < 0.5, term


@pytest.fixture(scope="module")
def adm_proportioned():
    return randomized_unet(ADM_PROPORTIONED)


@pytest.mark.parametrize("delta", [0.3, 0.05, 0.01])
def test_fp8_keeps_the_loss(adm_proportioned, one_thread, delta):
    """One fp8 loss per term goes through the four timesteps in turn, so that after the first
    each call's scales come from the calls before it, at other timesteps (delayed scaling as a
    training run has it, with ranges that moved in between)."""
    losses = {term: (dl.DiffLoss(adm_proportioned, precision="fp32", natural_weight=w[0],
                                 semantic_weight=w[1], check_range=False),
                     dl.DiffLoss(adm_proportioned, precision="fp8", natural_weight=w[0],
                                 semantic_weight=w[1], check_range=False))
              for term, w in TERMS.items()}
    rows, failures = [], []
    for j, t in enumerate(TIMESTEPS):
        restored, gt, noise = _images(delta, seed=10 * [0.3, 0.05, 0.01].index(delta) + j)
        for term, (reference, loss_fn) in losses.items():
            want, want_grad = _loss_and_grad(reference, restored, gt, torch.tensor([t, t]), noise)
            got, grad = _loss_and_grad(loss_fn, restored, gt, torch.tensor([t, t]), noise)
            err, cos = abs(got - want) / want, cosine(grad, want_grad)
            rows.append(f"delta {delta} t {t} {term}: loss error {err:.2e}, cosine {cos:.5f}")
            if not (err <= LOSS_BOUND and cos >= COSINE_BOUND):
                failures.append(rows[-1])
    print("\n".join(rows))
    assert not failures, "\n".join(failures)
    assert len(rows) == len(TIMESTEPS) * len(TERMS)
