"""The linear noise schedule of guided-diffusion (T = 1000), tabulated in float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearSchedule:
    """beta = linspace(1e-4, 0.02, T); alpha = 1 - beta; abar = cumprod(alpha)."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def betas(self) -> torch.Tensor:
        # Scaled as guided-diffusion's get_named_beta_schedule("linear") does for T != 1000.
        scale = 1000 / self.num_timesteps
        return torch.linspace(scale * self.beta_start, scale * self.beta_end,
                              self.num_timesteps, dtype=torch.float64)

    def coefficients(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample coefficients at integer timesteps ``t``, float64 on t's device."""
        betas = self.betas.to(t.device)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        beta_t, alpha_t, abar_t = betas[t], alphas[t], abar[t]
        return {
            "beta": beta_t,
            "alpha": alpha_t,
            "sqrt_abar": abar_t.sqrt(),
            "sqrt_one_minus_abar": (1.0 - abar_t).sqrt(),
            # x_{t-1} = (x_t - eps_coef * eps) / sqrt(alpha)
            "eps_coef": beta_t / (1.0 - abar_t).sqrt(),
        }
