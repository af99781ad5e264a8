"""A discrete-time DDPM (Stable Diffusion's UNets) seen as an EDM denoiser D(x, sigma).

A DDPM with cumulative signal rates alpha_bar_t noises x0 to sqrt(alpha_bar_t) x0 + sqrt(1 -
alpha_bar_t) n. Divided by sqrt(alpha_bar_t) that is EDM's x0 + sigma_t n with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), so the network sees c_in x with
c_in = 1 / sqrt(1 + sigma^2), at the timestep whose sigma it is (interpolated in log sigma between
the 1000 trained timesteps, as k-diffusion's discrete wrappers do). Its epsilon or v prediction
becomes x0_hat through c_skip and c_out. Noise levels outside the trained range
[sigma_0, sigma_999] are outside what the network knows; `levels` draws only trained ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.precond import Precond

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction")


def ddpm_sigmas(
    beta_start: float, beta_end: float, beta_schedule: str, num_train_timesteps: int
) -> torch.Tensor:
    """sigma_t of timesteps 0..T-1 (increasing), from the scheduler's beta schedule, in float64
    (diffusers' formulas: scaled_linear is linear in sqrt(beta); squaredcos_cap_v2 is the
    cosine schedule of Nichol & Dhariwal with betas capped at 0.999)."""
    steps = num_train_timesteps
    cpu64 = dict(dtype=torch.float64, device="cpu")  # explicit: networks may be built on meta
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, **cpu64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, **cpu64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [
                min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                for i in range(steps)
            ],
            **cpu64,
        )
    else:
        raise DisbackError(
            f"beta schedule {beta_schedule!r} is not supported (known: {', '.join(BETA_SCHEDULES)})"
        )
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


class DiscreteDDPMPrecond(Precond):
    """Epsilon- or v-predicting discrete DDPM as D(x; sigma) = c_skip x + c_out F(c_in x, t(sigma)).

    epsilon: x0 = x - sigma eps, so c_skip = 1, c_out = -sigma.
    v:       x0 = sqrt(a) x_t - sqrt(1 - a) v, so c_skip = 1 / (1 + sigma^2),
             c_out = -sigma / sqrt(1 + sigma^2).
    Both: c_in = 1 / sqrt(1 + sigma^2) (the DDPM's own input scale), sigma_data = 1 (latents are
    scaled to unit variance by the VAE's scaling factor).
    """

    sigma_data = 1.0

    def __init__(
        self,
        model: nn.Module,
        data_shape: tuple[int, ...],
        label_dim: int = 0,
        use_fp16: bool = False,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",  # What F predicts.
        beta_start: float = 0.00085,  # First beta of the schedule (Stable Diffusion's).
        beta_end: float = 0.012,  # Last beta.
        beta_schedule: str = "scaled_linear",  # How betas go from start to end.
        num_train_timesteps: int = 1000,  # Timesteps the network was trained on.
    ) -> None:
        super().__init__(model, data_shape, label_dim, use_fp16)
        if prediction_type not in PREDICTIONS:
            raise DisbackError(
                f"prediction type {prediction_type!r} is not supported "
                f"(known: {', '.join(PREDICTIONS)})"
            )
        if not (0 < beta_start < beta_end < 1 and 2 <= num_train_timesteps <= 100_000):
            raise DisbackError(
                "beta schedule must have 0 < beta_start < beta_end < 1 and 2..1e5 steps"
            )
        self.prediction_type = prediction_type
        sigmas = ddpm_sigmas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        # Derived from the schedule, so not in the state dict (files hold the network's weights).
        self.register_buffer("sigmas", sigmas.to(torch.float32), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().to(torch.float32), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep of sigma: linear in log sigma between trained timesteps,
        clamped to the trained range."""
        log_sigma = sigma.to(torch.float32).log().reshape(-1, 1)
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        low = (log_sigma >= log_sigmas).sum(dim=1).sub(1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.flatten() - lo) / (hi - lo)).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.prediction_type == "epsilon":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        else:
            c_skip, c_out = 1 / (sigma**2 + 1), -sigma * c_in
        return c_skip, c_out, c_in, self.timestep(sigma)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) that turns |D - x0|^2 into the network's own training loss: the
        epsilon MSE (|D - x0|^2 / sigma^2) or the v MSE ((1 + sigma^2) |D - x0|^2 / sigma^2)."""
        if self.prediction_type == "epsilon":
            return 1 / sigma**2
        return (sigma**2 + 1) / sigma**2


@dataclass(frozen=True)
class DiscreteSigma:
    """Noise levels of a discrete-time teacher: its sigma_t at a timestep drawn uniformly from
    `low <= t < high` (default: all of them, as DMD2 trains its fake score on SD)."""

    table: torch.Tensor  # sigma_t of timesteps 0..T-1
    low: int = 0
    high: int | None = None

    def sample(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        high = len(self.table) if self.high is None else self.high
        index = torch.randint(self.low, high, (n,), generator=rng, device=device)
        return self.table.to(device)[index]

    @classmethod
    def generator_levels(cls, table: torch.Tensor) -> DiscreteSigma:
        """Where DMD2 queries the scores of an SD teacher for the generator: timesteps
        int(0.02 T) .. int(0.98 T), both included."""
        steps = len(table)
        return cls(table, int(0.02 * steps), int(0.98 * steps) + 1)
