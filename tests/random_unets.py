"""Upstream UNets with every weight random, for tests that must not trust build_prior."""
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.script_util import create_model

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
            attention_resolutions="16,8", num_head_channels=16, learn_sigma=True,
            class_cond=False, resblock_updown=True, use_scale_shift_norm=True,
            use_new_attention_order=False, dropout=0.0)
# One level, one res block: every block type of ADM (FiLM'd res blocks, a resampling res
# block, attention), for tests where each layer is slow (compilation, interpreted kernels).
MICRO = dict(TINY, channel_mult="1,1", attention_resolutions="16")


def randomized_unet(config=TINY, seed=0):
    """An upstream UNet with EVERY weight random: guided-diffusion zero-initialises its output
    projections, which would make a fresh model an identity that predicts zero noise."""
    model = create_model(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval().requires_grad_(False)
