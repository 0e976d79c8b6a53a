"""Noise schedules: how much noise a model was trained with, and which noise levels a sampler visits.

Everything is expressed through the noise level sigma of the variance-exploding form
x = x0 + sigma * eps (EDM, Karras et al. 2022, sec. 2). A discrete variance-preserving (DDPM) model
with x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps is the same process rescaled by
sqrt(alpha_bar_t), with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (EDM Table 1: s = 1/sqrt(1 + sigma^2)).

Two families of small pure functions, all float64:

- ``alpha_bars_*(num_train_timesteps, ...)``: the training schedule of a discrete VP model,
  alpha_bar_t for t = 0 .. T-1 (``TRAIN_SCHEDULES``).
- ``sigmas_*(n, denoiser, ...)``: n decreasing noise levels for sampling, read off the denoiser's
  noise range (``denoiser.sigma_min``, ``denoiser.sigma_max``) or, for the timestep spacings, its
  discrete training grid (``denoiser.num_train_timesteps``, ``denoiser.t_to_sigma``)
  (``SCHEDULES``). ``get_sigmas`` validates the step count and appends the final noise level.
"""

import math

import torch

from encdiff.errors import EncdiffError, lookup

# ---------------------------------------------------------------------------------------------
# Training schedules of discrete VP models: alpha_bar_t = prod_{s <= t} (1 - beta_s).
# ---------------------------------------------------------------------------------------------


def alpha_bars_from_betas(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM, Ho et al. 2020, sec. 2)."""
    return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)


def alpha_bars_linear(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2):
    """DDPM linear schedule: beta_t linear in t (Ho et al. 2020, sec. 4)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return alpha_bars_from_betas(betas)


def alpha_bars_scaled_linear(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """Latent/Stable Diffusion schedule: sqrt(beta_t) linear in t (Rombach et al. 2022)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return alpha_bars_from_betas(betas)


def alpha_bars_cosine(num_train_timesteps=1000, s=0.008, max_beta=0.999):
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta as in the paper."""

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    # beta_t = 1 - alpha_bar(t+1) / alpha_bar(t) on the continuous curve, then clipped; the clip
    # (only active near t = T) keeps alpha_bar_{T-1} > 0 so that sigma_max stays finite.
    betas = [min(1 - f((t + 1) / T) / f(t / T), max_beta) for t in range(T)]
    return alpha_bars_from_betas(betas)


TRAIN_SCHEDULES = {
    "linear": alpha_bars_linear,
    "scaled_linear": alpha_bars_scaled_linear,
    "cosine": alpha_bars_cosine,
}


def get_alpha_bars(name, num_train_timesteps=1000, **options):
    """alpha_bar_t of the named training schedule (one of ``TRAIN_SCHEDULES``)."""
    return lookup(TRAIN_SCHEDULES, name, "training schedule")(num_train_timesteps, **options)


def vp_sigmas(alpha_bars):
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the VE noise level of a VP timestep (EDM Table 1)."""
    alpha_bars = torch.as_tensor(alpha_bars, dtype=torch.float64)
    return ((1 - alpha_bars) / alpha_bars).sqrt()


# ---------------------------------------------------------------------------------------------
# Sampling grids: sigmas_*(n, denoiser, ...) -> n decreasing noise levels, float64.
# ---------------------------------------------------------------------------------------------


def sigmas_karras(n, denoiser, rho=7.0, sigma_min=None, sigma_max=None):
    """Karras rho-schedule (EDM, Karras et al. 2022, eq. 5): equal steps in sigma^(1/rho)."""
    sigma_min = denoiser.sigma_min if sigma_min is None else sigma_min
    sigma_max = denoiser.sigma_max if sigma_max is None else sigma_max
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    # rho = 7 spends most steps at low noise, where the ODE's curvature (and the error) is largest.
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def sigmas_exponential(n, denoiser, sigma_min=None, sigma_max=None):
    """Equal steps in log(sigma), i.e. in the log-SNR lambda = -log(sigma) (DPM-Solver, Lu et al. 2022a)."""
    sigma_min = denoiser.sigma_min if sigma_min is None else sigma_min
    sigma_max = denoiser.sigma_max if sigma_max is None else sigma_max
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def sigmas_consistency(n, denoiser, rho=7.0):
    """The first n levels of a Karras grid of n + 1 (eq. 5): sigma_max first and none at sigma_min, where a
    consistency function is the identity; n = 1 is the one-step sample from sigma_max (Song et al. 2023, Alg. 1)."""
    return sigmas_karras(n + 1, denoiser, rho)[:n]


def _training_grid(denoiser, spacing):
    """(T, t_to_sigma) of a discrete model; the timestep spacings only make sense for those."""
    T = getattr(denoiser, "num_train_timesteps", None)
    if T is None:
        raise EncdiffError(
            f"schedule {spacing!r} spaces the discrete training timesteps, but this denoiser is continuous; "
            "use 'karras' or 'exponential'"
        )
    return T, denoiser.t_to_sigma


def sigmas_linspace(n, denoiser):
    """Timesteps evenly spaced over [T-1, 0], fractional (Lin et al. 2024, Table 2, "linspace")."""
    T, t_to_sigma = _training_grid(denoiser, "linspace")
    return t_to_sigma(torch.linspace(T - 1, 0, n, dtype=torch.float64))


def sigmas_leading(n, denoiser, steps_offset=0):
    """Timesteps k * (T // n) + steps_offset, k = n-1 .. 0 (Lin et al. 2024, Table 2, "leading")."""
    T, t_to_sigma = _training_grid(denoiser, "leading")
    timesteps = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + steps_offset
    if timesteps[0] > T - 1:
        raise EncdiffError(
            f"steps_offset={steps_offset} puts the first timestep at {int(timesteps[0])}, past the last one ({T - 1})"
        )
    return t_to_sigma(timesteps)


def sigmas_trailing(n, denoiser):
    """Timesteps round(T - k * T / n) - 1, k = 0 .. n-1: always starts at t = T-1 (Lin et al. 2024, Table 2)."""
    T, t_to_sigma = _training_grid(denoiser, "trailing")
    timesteps = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1
    return t_to_sigma(timesteps)


SCHEDULES = {
    "karras": sigmas_karras,
    "exponential": sigmas_exponential,
    "consistency": sigmas_consistency,
    "linspace": sigmas_linspace,
    "leading": sigmas_leading,
    "trailing": sigmas_trailing,
}


def get_sigmas(schedule, n, denoiser, final_sigma=0.0, **options):
    """The grid sigma_0 > ... > sigma_{n-1} > sigma_n = final_sigma that a sampler walks in n steps.

    ``final_sigma=0`` ends on the denoised image; ``denoiser.sigma_min`` ends one noise level above it
    (diffusers' ``final_sigmas_type="sigma_min"`` / DDIM ``set_alpha_to_one=False``).
    """
    lookup(SCHEDULES, schedule, "schedule")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EncdiffError(f"number of steps must be an integer >= 1, got {n!r}")
    T = getattr(denoiser, "num_train_timesteps", None)
    if T is not None and schedule in ("linspace", "leading", "trailing") and n > T:
        raise EncdiffError(
            f"number of steps {n} exceeds the {T} training timesteps of this model (schedule {schedule!r})"
        )
    sigmas = SCHEDULES[schedule](n, denoiser, **options)
    return torch.cat([sigmas, sigmas.new_tensor([final_sigma])])
