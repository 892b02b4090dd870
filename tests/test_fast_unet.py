"""The truncated prior's copy: built on the images' device in the compute dtype, whatever
device the prior is on."""
import torch
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
    net = FastUNet(tiny_unet, dtype=torch.bfloat16, decoder=False)
    prior_ids = {id(p) for p in tiny_unet.parameters()}
    linear = [p for m in net.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    others = [p for m in net.modules() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)]
    assert linear and all(id(p) in prior_ids for p in linear)
    assert others and not any(id(p) in prior_ids for p in others)


def test_timestep_embedding_is_guided_diffusions(tiny_unet):
    """The same sinusoids, bit for bit, from frequencies that stay on the device."""
    from guided_diffusion.nn import timestep_embedding

    net = FastUNet(tiny_unet, dtype=torch.float32, decoder=True)
    t = torch.tensor([0, 1, 17, 500, 999])
    assert torch.equal(net.timestep_embedding(t), timestep_embedding(t, net.model_channels))
