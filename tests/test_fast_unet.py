"""The truncated prior's copy: built on the images' device in the compute dtype, whatever
device the prior is on."""
import torch
from guided_diffusion.unet import ResBlock
from torch import nn

from diffloss_fast.fast_unet import FastUNet


def test_built_on_another_device_in_the_compute_dtype(tiny_unet):
    net = FastUNet(tiny_unet, dtype=torch.bfloat16, decoder=True, device="meta")
    for module in net.modules():
        for p in module.parameters(recurse=False):
            assert p.device.type == "meta"
            want = torch.float32 if isinstance(module, nn.Linear) else torch.bfloat16
            assert p.dtype == want, (type(module).__name__, p.dtype)
    # nothing of the prior moved or changed
    assert all(p.device.type == "cpu" and p.dtype == torch.float32
               for p in tiny_unet.parameters())


def test_fp32_projections_shared_on_the_same_device(tiny_unet):
    """The timestep MLP is the prior's own on its device; the ResBlocks' projections are
    views of one stacked copy (``film_weight``), the rest cast copies."""
    net = FastUNet(tiny_unet, dtype=torch.bfloat16, decoder=False)
    prior_ids = {id(p) for p in tiny_unet.parameters()}
    mlp = list(net.time_embed.parameters())
    assert mlp and all(id(p) in prior_ids for p in mlp)
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    for blk in blocks:
        for p in blk.emb_layers[1].parameters():
            assert p.dtype == torch.float32 and id(p) not in prior_ids
            stacked = net.film_weight if p.dim() == 2 else net.film_bias
            assert p.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert net.film_weight.shape[0] == sum(b.emb_layers[1].out_features for b in blocks)
    others = [p for m in net.modules() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)]
    assert others and not any(id(p) in prior_ids for p in others)


def test_one_matmul_makes_every_blocks_film(tiny_unet):
    """Each ResBlock's emb_layers(emb) comes out of one stacked matmul, equal to the block's
    own projection of silu(emb); a forward runs one matmul on the embedding, not one a block."""
    from torch.utils._python_dispatch import TorchDispatchMode

    prior = tiny_unet.float()
    net = FastUNet(prior, dtype=torch.float32, decoder=True)
    t = torch.tensor([3, 700])
    emb = net.time_embed(net.timestep_embedding(t))
    film = torch.nn.functional.linear(torch.nn.functional.silu(emb), net.film_weight,
                                      net.film_bias)
    upstream = [m for m in prior.modules() if isinstance(m, ResBlock)]
    ours = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(upstream) == len(ours) > 2
    for up, blk in zip(upstream, ours):
        torch.testing.assert_close(film[:, blk.film], up.emb_layers(emb), rtol=1e-6, atol=1e-6)

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widths = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
                    and args[-2].shape == emb.shape):  # a matmul of the embedding
                self.widths.append(args[-1].shape[-1])  # columns of the weight operand
            return func(*args, **(kwargs or {}))

    with Matmuls() as seen, torch.no_grad():
        net(torch.randn(2, 3, 32, 32), t)
    # the timestep MLP's second layer and the stacked projection: none a block
    assert seen.widths == [emb.shape[1], net.film_weight.shape[0]]


def test_timestep_embedding_is_guided_diffusions(tiny_unet):
    """The same sinusoids, bit for bit, from frequencies that stay on the device."""
    from guided_diffusion.nn import timestep_embedding

    net = FastUNet(tiny_unet, dtype=torch.float32, decoder=True)
    t = torch.tensor([0, 1, 17, 500, 999])
    assert torch.equal(net.timestep_embedding(t), timestep_embedding(t, net.model_channels))
