"""The built-in restoration networks: their size in multiply-accumulates, their shapes, their
registry names."""
from __future__ import annotations

import pytest
import torch

from diffloss_fast.train import nets

# per 256x256 image: NAFNet-width32 and Restormer as published, the built-in as it is
TARGET_GMACS = {"resunet": 13.3, "nafnet": 16.0, "restormer": 140.0}


@pytest.mark.parametrize("name", sorted(TARGET_GMACS))
def test_gmacs_within_a_quarter_of_the_target(name):
    with torch.device("meta"):  # no weights to initialise
        net = nets.build_net(name)
    macs = nets.gmacs(net, 256, 256)
    assert abs(macs / TARGET_GMACS[name] - 1) <= 0.25, f"{name}: {macs:.2f} GMAC"


def test_gmacs_counts_one_convolution_exactly():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert nets.gmacs(conv, 16, 32) == pytest.approx(16 * 32 * 8 * 3 * 9 / 1e9)
    assert conv.weight.device.type == "cpu"  # counted on a copy: the net itself stays put


SMALL = {"resunet": dict(width=8, depth=2, blocks=1),
         "nafnet": dict(width=8, encoder_blocks=(1, 1), middle_blocks=1, decoder_blocks=(1, 1)),
         "restormer": dict(width=8, blocks=(1, 1, 1), heads=(1, 2, 4), refinement_blocks=1)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_maps_images_to_images_at_multiples_of_its_size_multiple(name):
    torch.manual_seed(0)
    net = nets.build_net(name, SMALL[name])
    m = nets.size_multiple(net)
    for h, w in ((m, 2 * m), (3 * m, m)):
        x = torch.rand(2, 3, h, w, requires_grad=True)
        y = net(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        assert not torch.equal(y, x)  # the tail is not zero-initialised: not the identity
        y.square().mean().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name, multiple", [("resunet", 4), ("nafnet", 16), ("restormer", 8)])
def test_full_size_defaults_run_at_their_size_multiple(name, multiple):
    torch.manual_seed(0)
    net = nets.build_net(name)
    assert nets.size_multiple(net) == multiple
    x = torch.rand(1, 3, multiple, 2 * multiple)
    with torch.no_grad():
        assert net(x).shape == x.shape


def test_transposed_attention_is_over_channels():
    """The attention map is C/heads x C/heads per head, whatever the number of pixels, and each
    row of it is a distribution."""
    torch.manual_seed(0)
    attention = nets.TransposedAttention(8, heads=2)
    seen = {}
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        out = real_softmax(self, *args, **kwargs)
        seen["map"] = out
        return out
    for side in (4, 8):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "softmax", spy)
            out = attention(torch.randn(3, 8, side, side))
        assert out.shape == (3, 8, side, side)
        assert seen["map"].shape == (3, 2, 4, 4)
        torch.testing.assert_close(seen["map"].sum(-1), torch.ones(3, 2, 4))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="heads"):
        nets.TransposedAttention(10, heads=4)
    with pytest.raises(ValueError, match="per level"):
        nets.NAFNetLike(encoder_blocks=(1, 1), decoder_blocks=(1,))
    with pytest.raises(ValueError, match="per level"):
        nets.RestormerLike(blocks=(1, 1), heads=(1,))
