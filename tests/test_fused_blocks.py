"""Fused norm + convolution blocks in the pair network, and the table that decides them.

The dispatch table ships empty (no GPU has measured a block yet), so DiffLoss runs the library
path everywhere; these tests force every block fused and hold the network to the library path
and to fp32, with the Triton kernels under the interpreter (tiny prior)."""
import json

import pytest
import torch
import torch.nn.functional as F

import diffloss_fast as dl
import diffloss_fast.difference_unet as difference_unet
import diffloss_fast.loss as loss_module
from diffloss_fast.ops import conv_dispatch
from diffloss_fast.ops.conv_dispatch import EVERY_BLOCK, Block, fused_blocks, load_table
from guided_diffusion.unet import ResBlock
from random_unets import MICRO, TINY, randomized_unet


# 16x16 images: the smallest the one-level MICRO prior takes with every block type (its
# attention at 8x8), as the interpreted kernels' time grows with the pixels
SIZE = 16


def test_blocks_are_fused_only_where_the_sweep_measured_them_faster(monkeypatch, tmp_path):
    fast = Block("out", 8, 256, 256, 64, 64).key()
    slow = Block("in", 8, 256, 256, 64, 64).key()
    assert fast == "out:8x256x64x64->256"
    table = {"sm_90": {fast: {"fused_ms": 1.0, "library_ms": 1.5},
                       slow: {"fused_ms": 2.0, "library_ms": 1.5}}}
    assert fused_blocks("cpu", table) == frozenset()  # no card family off CUDA
    monkeypatch.setattr(conv_dispatch, "card_family", lambda device: "sm_90")
    assert fused_blocks("cuda", table) == {fast}
    monkeypatch.setattr(conv_dispatch, "card_family", lambda device: "sm_89")
    assert fused_blocks("cuda", table) == frozenset()  # another family's measurements
    bad = tmp_path / "table.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="dispatch table"):
        load_table(bad)
    assert load_table(tmp_path / "missing.json") == {}


def test_the_shipped_table_fuses_nothing_until_measured():
    """Every entry of the shipped table must have been measured both ways; until a GPU sweep
    fills it, it is empty and every card keeps the library path."""
    for family, entries in load_table().items():
        assert family.startswith("sm_")
        for key, entry in entries.items():
            assert set(entry) >= {"fused_ms", "library_ms"}, key


def _step(loss_fn, x, y, t, noise):
    xx = x.clone().requires_grad_(True)
    loss = loss_fn(xx, y, t=t, noise=noise)
    loss.backward()
    return float(loss.detach()), xx.grad.flatten().double()


@pytest.fixture(scope="module")
def micro_unet():
    return randomized_unet(MICRO)


def _inputs(delta, t, size=SIZE):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=gen) * 0.8 + 0.1
    y = x + delta * torch.randn(1, 3, size, size, generator=gen)
    return x, y, torch.tensor([t]), torch.randn(1, 3, size, size, generator=gen)


def _fuse_every_block(monkeypatch, module, calls):
    """Every block of the networks built from now on fused, each fused call of ``module``'s
    ``pair_conv2d`` counted in ``calls`` by its block's kind."""
    real = module.pair_conv2d

    def counted(*args, **kwargs):
        if args[3].shape[0] == 3:  # the noise head's convolution, sliced to 3 channels
            calls.append("head")
        elif kwargs.get("concat") is not None:
            calls.append("cat-in" if kwargs.get("prologue") is not None else "cat-skip")
        elif kwargs.get("resample") is not None:
            calls.append(f"{kwargs['resample']}-in")
        else:
            calls.append("out" if kwargs.get("residual") is not None else "in")
        if kwargs.get("next_norm") is not None:
            calls.append("stats")  # the next norm's statistics from this call's epilogue
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "pair_conv2d", counted)
    monkeypatch.setattr(loss_module, "fused_blocks", lambda device: EVERY_BLOCK)


def _assert_every_block_fused(prior, calls):
    """Every ResBlock's second block ran fused; the decoder's concatenated inputs were read in
    place by their first and skip convolutions; the resampling ResBlocks' first blocks ran
    fused with their resampling, the other first blocks plain; the noise head once."""
    assert calls.count("head") == 1
    blocks = [m for m in prior.modules() if isinstance(m, ResBlock)]
    decoder = [block[0] for block in prior.output_blocks]
    assert calls.count("out") == len(blocks)
    assert calls.count("cat-in") == calls.count("cat-skip") == len(decoder) > 0
    assert calls.count("in") == sum(not blk.updown for blk in blocks) - len(decoder) > 0
    for kind, resampling in (("up-in", "Upsample"), ("down-in", "Downsample")):
        assert calls.count(kind) == sum(type(blk.h_upd).__name__ == resampling
                                        for blk in blocks) > 0


def _fused_loss(prior, monkeypatch, calls, **kw):
    """A DiffLoss whose pair network fuses every block it can, counting the fused calls."""
    loss_fn = dl.DiffLoss(prior, fused_kernels=True, execution="eager", **kw)
    _fuse_every_block(monkeypatch, difference_unet, calls)
    return loss_fn


def test_fused_blocks_compute_the_library_paths_loss_in_fp32(micro_unet, monkeypatch,
                                                           one_thread):
    kw = dict(precision="fp32", propagation="difference", natural_weight=1.0,
              semantic_weight=0.1)
    inputs = _inputs(0.05, 600)
    want = _step(dl.DiffLoss(micro_unet, fused_kernels=True, execution="eager", **kw), *inputs)
    calls = []
    got = _step(_fused_loss(micro_unet, monkeypatch, calls, **kw), *inputs)
    _assert_every_block_fused(micro_unet, calls)
    # each fused first block added up its fused second block's norm statistics, and each
    # fused last block those of the next ResBlock's first norm where that reads its output:
    # in the encoder and middle block, and within a decoder block; and the decoder's last
    # ResBlock those of the noise head's norm
    encoder = [layer for block in (*micro_unet.input_blocks, micro_unet.middle_block)
               for layer in block]
    handed_on = sum(isinstance(x, ResBlock) and isinstance(y, ResBlock)
                    for layers in (encoder, *map(list, micro_unet.output_blocks))
                    for x, y in zip(layers, layers[1:]))
    assert handed_on > 0 and isinstance(micro_unet.output_blocks[-1][-1], ResBlock)
    handed_on += 1
    first_blocks = sum(calls.count(kind) for kind in ("in", "cat-in", "up-in", "down-in"))
    assert calls.count("stats") == first_blocks + handed_on
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4 * want[1].abs().max())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_kernels_keep_the_fp32_loss_where_two_passes_cannot(micro_unet, monkeypatch,
                                                                  one_thread, precision):
    """A good restoration at a high timestep, the cell the pair exists for: the pair path with
    every Triton pair kernel (norm, attention, fused blocks) within the accuracy grid's bounds
    (2%, cosine 0.995) of fp32's two passes."""
    kw = dict(natural_weight=1.0, semantic_weight=0.1)
    inputs = _inputs(0.01, 950)
    want = _step(dl.DiffLoss(micro_unet, precision="fp32", **kw), *inputs)
    calls = []
    got = _step(_fused_loss(micro_unet, monkeypatch, calls, precision=precision, **kw), *inputs)
    assert calls
    assert abs(got[0] - want[0]) / want[0] < 0.02
    assert float(F.cosine_similarity(got[1], want[1], dim=0)) >= 0.995


def test_the_sweep_times_exactly_the_blocks_the_network_asks_about(micro_unet, tmp_path,
                                                                  monkeypatch):
    """The sweep's block keys against the keys the pair network itself looks up in a forward
    (recorded from ``_fused``), each timed both ways; the table it writes is what
    ``fused_blocks`` reads."""
    from diffloss_fast.tools import conv_sweep
    asked = set()
    real = difference_unet.DifferenceUNet._fused

    def spy(self, kind, shape, conv):
        n, c, height, width = shape
        asked.add(Block(kind, n, c, conv.out_channels, height, width).key())
        return real(self, kind, shape, conv)
    monkeypatch.setattr(difference_unet.DifferenceUNet, "_fused", spy)
    timed = []

    def timer(net, blk, shape, film, fused, device, *, warmup, repeats):
        timed.append(fused)
        return 1.0 if fused else 2.0  # every block "faster" fused
    entries = conv_sweep.sweep(micro_unet, torch.device("cpu"), [2], SIZE, timer=timer)
    assert set(entries) == asked
    assert {key.split(":")[0] for key in entries} == {"in", "out", "cat-in", "up-in",
                                                      "down-in", "head"}
    assert all(e == {"library_ms": 2.0, "fused_ms": 1.0} for e in entries.values())
    assert sorted(map(len, timed)) == [0] * len(entries) + [1] * len(entries)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"sm_89": {"in:1x1x1x1->1": {"fused_ms": 1, "library_ms": 2}}}))
    table = conv_sweep.write_table(entries, "sm_90", path)
    assert set(table) == {"sm_89", "sm_90"}  # another family's entries are kept
    monkeypatch.setattr(conv_dispatch, "card_family", lambda device: "sm_90")
    assert fused_blocks("cuda", load_table(path)) == set(entries)


def test_a_block_is_timed_for_real_both_ways(micro_unet, one_thread):
    from diffloss_fast.tools import conv_sweep
    loss_fn = dl.DiffLoss(micro_unet, precision="bf16", fused_kernels=True, execution="eager")
    net = loss_fn._net(torch.device("cpu"), torch.bfloat16, decoder=True)
    blocks = conv_sweep.recorded_blocks(net, 1, SIZE, torch.device("cpu"))
    first = blocks[0]
    concatenated = next(b for b in blocks if b[0].startswith("cat-in:"))
    assert len(concatenated[2]) == 2  # the decoder block's two input shapes
    head = next(b for b in blocks if b[0].startswith("head:"))
    assert head[1] is None and head[3] is None  # no ResBlock, no FiLM
    for key, blk, shape, film in (first, concatenated, head):
        for fused in (frozenset(), frozenset({key})):
            ms = conv_sweep.time_block(net, blk, shape, film, fused, torch.device("cpu"),
                                       warmup=0, repeats=1)
            assert ms > 0
    assert net.fused_blocks == frozenset()  # left as found


@pytest.fixture(scope="module")
def fp8_fused_and_unfused(micro_unet):
    """precision="fp8" with every ResBlock block fused (the e4m3 pair kernel) and without, and
    fp32, at the cell the pair exists for (delta 0.01, t 950). A first call (without
    gradient, on other images at another timestep) gives both the same history: fused blocks
    need an earlier call's amaxes."""
    import diffloss_fast.fp8_unet as fp8_unet
    kw = dict(natural_weight=1.0, semantic_weight=0.1)
    # 32x32: at 16x16 a few deep slots' amaxes drift apart by more than an e4m3 step
    warm, cell = _inputs(0.05, 600, 32), _inputs(0.01, 950, 32)
    warm = (warm[0].flip(-1), *warm[1:])  # other images than the cell's
    runs, nets, calls = {}, {}, []
    for name in ("unfused", "fused"):
        with pytest.MonkeyPatch.context() as patch:
            if name == "fused":
                _fuse_every_block(patch, fp8_unet, calls)
            loss_fn = dl.DiffLoss(micro_unet, precision="fp8", fused_kernels=True,
                                  execution="eager", **kw)
            with torch.no_grad():
                loss_fn(warm[0], warm[1], t=warm[2], noise=warm[3])
            (net,) = loss_fn._nets.values()
            first_call = net.scaling.pending.clone()
            assert not calls  # the first call has no history: nothing fused
            runs[name] = _step(loss_fn, *cell)
            nets[name] = net, first_call
    runs["fp32"] = _step(dl.DiffLoss(micro_unet, precision="fp32", **kw), *cell)
    return runs, nets, calls


def test_fp8_fused_blocks_run_the_e4m3_kernel_and_record_its_amaxes(fp8_fused_and_unfused,
                                                                    micro_unet):
    """Every ResBlock block fused (FP8's own keys), each recording the amaxes the kernel found.
    The fused and unfused networks do not quantize the same values: the kernel's prologue and
    the unfused norm compute the same fp32 norm in different orders, and the fused block
    rounds its residual sum once where the unfused rounds twice; one bf16 ulp apart, an input
    falls on either side of an e4m3 rounding boundary (steps of 2**-4 .. 2**-3 of it), and
    those flips, layer after layer, are the size of FP8's own error. So the two are held
    together exactly where their inputs are the same, to a bf16 ulp at the first fused block,
    and elsewhere to the accuracy FP8 itself is held to."""
    runs, nets, calls = fp8_fused_and_unfused
    _assert_every_block_fused(micro_unet, calls)
    (fused, fused_first), (unfused, unfused_first) = nets["fused"], nets["unfused"]
    assert fused.fused_blocks and not unfused.fused_blocks
    assert torch.equal(fused_first, unfused_first)  # the same history before this call
    got, want = fused.scaling.pending, unfused.scaling.pending
    # the input convolution runs before any fused block: its inputs are the same
    assert torch.equal(got[:2], want[:2])
    # the first fused block reads the same a and d: its amaxes within one bf16 ulp
    first = 2 * next(m for m in fused.modules() if isinstance(m, ResBlock)
                     and not m.updown).in_layers[2].fp8_slot
    torch.testing.assert_close(got[first:first + 2], want[first:first + 2], rtol=2.0 ** -7,
                               atol=0)
    slots = sorted({2 * m.fp8_slot + r for blk in fused.modules() if isinstance(blk, ResBlock)
                    for m in (blk.in_layers[2], blk.out_layers[3]) for r in (0, 1)})
    assert (got[slots] > 0).all() and torch.isfinite(got).all()
    # after the call, the history the next call reads: within an e4m3 step; which the first
    # call's amaxes are not, in fused slots (the fused blocks recorded this call's)
    moved = (fused_first[slots] - want[slots]).abs() > 2.0 ** -3 * want[slots]
    assert moved.sum() >= len(slots) // 4
    for net in (fused, unfused):
        net.scaling.begin_call()
    # the fused noise head convolves both halves and records a's amax too, which the unfused
    # head (the difference alone) has no use for
    head_a = 2 * fused.out_conv.fp8_slot
    assert fused.scaling.history[head_a, 0] > 0 and unfused.scaling.history[head_a, 0] == 0
    rest = [slot for slot in range(len(got)) if slot != head_a]
    torch.testing.assert_close(fused.scaling.history[rest], unfused.scaling.history[rest],
                               rtol=2.0 ** -3, atol=0)
    # the loss and its gradient: the fused network is no further from the unfused one than
    # the accuracy bounds FP8 is held to from fp32 (5%, cosine 0.98)
    (loss, grad), (loss_u, grad_u) = runs["fused"], runs["unfused"]
    assert abs(loss - loss_u) / loss_u <= 0.05
    assert float(F.cosine_similarity(grad, grad_u, dim=0)) >= 0.98


def test_fp8_fused_blocks_keep_the_fp32_loss(fp8_fused_and_unfused):
    """The accuracy cell (delta 0.01, t 950) with every FP8 block fused: within FP8's bounds
    (5%, cosine 0.98) of fp32, as the unfused FP8 network is on this prior."""
    runs = fp8_fused_and_unfused[0]
    want = runs["fp32"]
    for name in ("unfused", "fused"):
        loss, grad = runs[name]
        assert abs(loss - want[0]) / want[0] < 0.05, name
        assert float(F.cosine_similarity(grad, want[1], dim=0)) >= 0.98, name


def test_fp8_blocks_have_their_own_keys(micro_unet):
    """bf16 measurements never switch an FP8 block on: FP8 looks its blocks up as fp8-in and
    fp8-out, and fuses nothing before its scaling has an earlier call."""
    from diffloss_fast.fp8_unet import FP8DifferenceUNet
    loss_fn = dl.DiffLoss(micro_unet, precision="fp8", fused_kernels=True, execution="eager")
    net = loss_fn._net(torch.device("cpu"), torch.bfloat16, decoder=True)
    assert isinstance(net, FP8DifferenceUNet)
    blk = next(m for m in net.modules() if isinstance(m, ResBlock) and not m.updown)
    conv = blk.in_layers[2]
    x = torch.zeros(2, conv.in_channels, 16, 16)
    bf16_key = Block("in", 2, conv.in_channels, conv.out_channels, 16, 16).key()
    fp8_key = Block("fp8-in", 2, conv.in_channels, conv.out_channels, 16, 16).key()
    assert fp8_key.startswith("fp8-in:")
    net.scaling.calls = 2
    net.fused_blocks = frozenset({bf16_key})
    assert not net._fused("in", tuple(x.shape), conv)
    net.fused_blocks = frozenset({fp8_key})
    assert net._fused("in", tuple(x.shape), conv)
    net.scaling.calls = 1  # the first call: no history to scale from
    assert not net._fused("in", tuple(x.shape), conv)


def test_the_sweep_times_the_fp8_blocks_under_their_own_keys(micro_unet):
    """On a card with FP8 tensor cores (forced here) the sweep also times the FP8 network's
    blocks, the same blocks as bf16's under fp8- keys, each with the scaling past its first
    call (where FP8 blocks may fuse at all)."""
    from diffloss_fast.fp8_unet import FP8DifferenceUNet
    from diffloss_fast.tools import conv_sweep
    timed = []

    def timer(net, blk, shape, film, fused, device, *, warmup, repeats):
        fp8 = isinstance(net, FP8DifferenceUNet)
        assert all(k.startswith("fp8-") == fp8 for k in fused)
        assert not fp8 or net.scaling.calls > 1
        timed.append(fp8)
        return 1.0 if fused else 2.0
    assert not conv_sweep.has_fp8(torch.device("cpu"))
    entries = conv_sweep.sweep(micro_unet, torch.device("cpu"), [1], SIZE, timer=timer,
                               fp8=True)
    bf16 = {k for k in entries if not k.startswith("fp8-")}
    assert any(k.startswith("cat-in:") for k in bf16)
    assert set(entries) == bf16 | {f"fp8-{k}" for k in bf16}
    assert timed.count(True) == timed.count(False) == 2 * len(bf16)


def test_a_fused_block_that_changes_channels_runs_its_skip_on_the_pair_kernel(one_thread):
    """An encoder ResBlock whose 1x1 skip changes the channels (TINY's, at a level's first
    block): fused, its skip runs on the pair kernel with its first block, and the block's
    outputs and input gradient are the library path's, in fp32."""
    from diffloss_fast.tools import conv_sweep
    prior = randomized_unet(TINY)
    loss_fn = dl.DiffLoss(prior, precision="fp32", propagation="difference",
                          fused_kernels=True, execution="eager")
    net = loss_fn._net(torch.device("cpu"), torch.float32, decoder=True)
    key, blk, shape, film = next(
        b for b in conv_sweep.recorded_blocks(net, 1, SIZE, torch.device("cpu"))
        if b[0].startswith("in:") and isinstance(b[1].skip_connection, torch.nn.Conv2d))
    assert blk.skip_connection.in_channels != blk.skip_connection.out_channels
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    d = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    s = torch.tensor(4.0)
    runs, calls = {}, []
    real = difference_unet.pair_conv2d

    def counted(*args, **kwargs):
        calls.append(kwargs.get("prologue") is None)
        return real(*args, **kwargs)
    for name, fused in (("library", frozenset()), ("fused", frozenset({key}))):
        net.fused_blocks = fused
        dd = d.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(difference_unet, "pair_conv2d", counted)
            out_a, out_d, _ = net._resblock(blk, (a, dd, s), film)
        out_d.backward(torch.ones_like(out_d))
        runs[name] = out_a, out_d.detach(), dd.grad
    net.fused_blocks = frozenset()
    assert calls == [False, True]  # the first block, then the skip without a prologue
    for got, want in zip(runs["fused"], runs["library"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
