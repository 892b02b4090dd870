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
from diffloss_fast.ops.conv_dispatch import Block, fused_blocks, load_table
from guided_diffusion.unet import ResBlock
from random_unets import MICRO, randomized_unet


class EveryBlock(frozenset):
    """A fused-block set that holds every key."""

    def __contains__(self, key):
        return True


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


def _inputs(delta, t):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 0.8 + 0.1
    y = x + delta * torch.randn(1, 3, 32, 32, generator=gen)
    return x, y, torch.tensor([t]), torch.randn(1, 3, 32, 32, generator=gen)


def _fused_loss(prior, monkeypatch, calls, **kw):
    """A DiffLoss whose pair network fuses every block it can, counting the fused calls."""
    loss_fn = dl.DiffLoss(prior, fused_kernels=True, execution="eager", **kw)
    real = difference_unet.pair_conv2d

    def counted(*args, **kwargs):
        calls.append("out" if kwargs.get("residual") is not None else "in")
        return real(*args, **kwargs)
    monkeypatch.setattr(difference_unet, "pair_conv2d", counted)
    monkeypatch.setattr(loss_module, "fused_blocks", lambda device: EveryBlock({"*"}))
    return loss_fn


def test_fused_blocks_compute_the_library_paths_loss_in_fp32(micro_unet, monkeypatch,
                                                           one_thread):
    kw = dict(precision="fp32", propagation="difference", natural_weight=1.0,
              semantic_weight=0.1)
    inputs = _inputs(0.05, 600)
    want = _step(dl.DiffLoss(micro_unet, fused_kernels=True, execution="eager", **kw), *inputs)
    calls = []
    got = _step(_fused_loss(micro_unet, monkeypatch, calls, **kw), *inputs)
    # every ResBlock's second block ran fused, and the first of those that do not resample
    blocks = [m for m in micro_unet.modules() if isinstance(m, ResBlock)]
    assert calls.count("out") == len(blocks)
    assert calls.count("in") == sum(not blk.updown for blk in blocks) > 0
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

    def spy(self, kind, x, conv):
        n, c, height, width = x[0].shape
        asked.add(Block(kind, n, c, conv.out_channels, height, width).key())
        return real(self, kind, x, conv)
    monkeypatch.setattr(difference_unet.DifferenceUNet, "_fused", spy)
    timed = []

    def timer(net, blk, shape, film, fused, device, *, warmup, repeats):
        timed.append(fused)
        return 1.0 if fused else 2.0  # every block "faster" fused
    entries = conv_sweep.sweep(micro_unet, torch.device("cpu"), [2], 32, timer=timer)
    assert set(entries) == asked
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
    block, blk, shape, film = conv_sweep.recorded_blocks(net, 1, 32, torch.device("cpu"))[0]
    for fused in (frozenset(), frozenset({block.key()})):
        ms = conv_sweep.time_block(net, blk, shape, film, fused, torch.device("cpu"),
                                   warmup=0, repeats=1)
        assert ms > 0
    assert net.fused_blocks == frozenset()  # left as found
