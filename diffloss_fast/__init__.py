"""diffloss_fast: DiffLoss (ACCV 2024), a diffusion-prior loss for image restoration, made fast.

    import diffloss_fast as dl
    loss_fn = dl.DiffLoss(dl.load_prior("256x256_diffusion_uncond.pt"))  # prior stays on the CPU
    loss = F.mse_loss(restored, gt) + loss_fn(restored, gt)
"""
from .loss import DiffLoss, ReferenceDiffLoss
from .prior import PRESETS, build_prior, downsampling_factor, load_prior
from .schedule import LinearSchedule

__all__ = ["DiffLoss", "ReferenceDiffLoss", "load_prior", "build_prior", "downsampling_factor",
           "PRESETS", "LinearSchedule"]
__version__ = "0.1.0"
