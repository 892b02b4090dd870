"""DiffLoss as a BasicSR loss: importing this module registers ``DiffLoss`` in BasicSR's
``LOSS_REGISTRY``, with BasicSR's ``loss_weight`` convention.

Import it before BasicSR builds its losses (from your model or arch file, or the script that
calls ``basicsr.train.train_pipeline``), name it in the options file, and add it to the loss of
your model's ``optimize_parameters``:

    # options.yml, under train:
    diffloss_opt:
      type: DiffLoss
      loss_weight: 1.0
      prior: /path/to/256x256_diffusion_uncond.pt   # or "tiny" (random weights) to try it out

    # in a model subclassing SRModel
    self.cri_diff = build_loss(train_opt["diffloss_opt"])      # init_training_settings
    l_total = l_total + self.cri_diff(self.output, self.gt)    # optimize_parameters

No ``.to(self.device)`` is needed (and one moves nothing): the prior is not a submodule, it
stays on the CPU in fp32, and DiffLoss builds its compute-dtype copy on the images' device.
"""
from __future__ import annotations

from torch import nn

try:
    from basicsr.utils.registry import LOSS_REGISTRY
except ImportError as err:
    raise ImportError("diffloss_fast.integrations.basicsr needs BasicSR (pip install basicsr); "
                      "the rest of diffloss_fast works without it") from err

import diffloss_fast as dl


@LOSS_REGISTRY.register()
class DiffLoss(nn.Module):
    """``loss_weight * DiffLoss(pred, target)`` for BasicSR's images in [0, 1].

    ``prior``: a guided-diffusion checkpoint path (architecture ``prior_config``, default
    adm-256-uncond) or ``"tiny"``; the other arguments are :class:`diffloss_fast.DiffLoss`'s.
    Image sides must be multiples of the prior's downsampling factor (32 for ADM-256).
    """

    def __init__(self, prior: str, loss_weight: float = 1.0, prior_config=None,
                 natural_weight: float = 1e-3, semantic_weight: float = 1e-6,
                 target: str = "eps", precision: str = "auto", backend: str = "auto",
                 compile: bool = False):
        super().__init__()
        model = (dl.build_prior("tiny") if prior == "tiny"
                 else dl.load_prior(prior, config=prior_config))
        self.loss_weight = loss_weight
        self.diffloss = dl.DiffLoss(model, natural_weight=natural_weight,
                                    semantic_weight=semantic_weight, target=target,
                                    precision=precision, backend=backend, compile=compile)

    def forward(self, pred, target, weight=None, **kwargs):
        if weight is not None:
            raise ValueError("DiffLoss has no per-element weight: pass weight=None")
        return self.loss_weight * self.diffloss(pred, target)
