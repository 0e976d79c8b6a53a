"""Consistency distillation: a one- or few-step student from a trained (guided) denoiser.

Consistency distillation (CD; Song et al. 2023, "Consistency Models", Alg. 2) with the improvements of
improved consistency training (iCT; Song & Dhariwal 2023, sec. 3) and ECT (Geng et al. 2024):

    sigma_1 < ... < sigma_N        a Karras grid (EDM eq. 5) from sigma_min to sigma_max, float64
    n                              an interval index, drawn with iCT's discretised log-normal (sec. 3.5)
    x_{n+1} = x0 + sigma_{n+1} z   a training point on the forward process
    x_hat_n = Phi(x_{n+1}; sigma_{n+1} -> sigma_n)
                                   one Heun (or Euler) step of the teacher's probability-flow ODE (CD eq. 6),
                                   the teacher guided at a fixed scale w (LCM, Luo et al. 2023, eq. 9),
                                   within a sigma interval where it samples with one (Kynkaenniemi et al. 2024)
    L = lambda(sigma_n) d(f(x_{n+1}; sigma_{n+1}), sg f(x_hat_n; sigma_n))                    (CD eq. 7)
    lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n)                                             (iCT sec. 3.4)
    d(a, b) = sqrt(||a - b||^2 + c^2) - c, the pseudo-Huber metric                            (iCT sec. 3.3)

The target network is the student itself under stop-gradient (iCT sec. 3.2: no EMA teacher of the student),
and the student starts from the teacher's weights (ECT sec. 3), so with the consistency boundary condition
f(x; sigma_min) = x (denoiser.ConsistencyDenoiser) training starts close to the teacher's D. Why distillation
and not ECT's consistency *training* on the data: the student must reproduce the *guided* distribution in one
evaluation per step, which only a guided teacher's ODE defines.
"""

from __future__ import annotations

import math

import torch

from .denoiser import GuidedDenoiser, _per_image, drop_labels
from .errors import EncdiffError, lookup
from .samplers import ODE_SOLVERS, ode_step
from .schedules import sigmas_karras


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per image (iCT sec. 3.3): L2 near 0, L1-like for outliers. Computed as
    ||a - b||^2 / (sqrt(||a - b||^2 + c^2) + c), the same value without the cancellation when ||a - b|| << c."""
    squared = (a - b).float().square().flatten(1).sum(1)
    return squared / ((squared + c * c).sqrt() + c)


def default_huber_c(x0: torch.Tensor) -> float:
    """iCT's c = 0.00054 sqrt(d) for d dimensions per image (sec. 3.3)."""
    return 0.00054 * math.sqrt(x0[0].numel())


def distillation_grid(intervals: int, teacher, rho: float = 7.0) -> torch.Tensor:
    """sigma_1 < ... < sigma_{intervals + 1}: the Karras grid between the teacher's sigma_min and sigma_max (float64)."""
    return sigmas_karras(intervals + 1, teacher, rho).flip(0)


def interval_probabilities(grid: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_n - P_mean) / ...):
    the log-normal noise distribution of EDM training, discretised over the grid's intervals (iCT sec. 3.5)."""
    cdf = torch.erf((grid.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()



def distillation_loss(student, teacher, x0: torch.Tensor, generator: torch.Generator, grid: torch.Tensor,
                      probabilities: torch.Tensor, *, class_labels=None, guidance_scale: float | None = None,
                      guidance_interval: tuple[float, float] | None = None, label_dropout: float = 0.0,
                      solver: str = "heun", huber_c: float | None = None, target=None, shard=(0, 1),
                      net=None, guide=None) -> torch.Tensor:
    """The mean CD loss (eq. 7 with iCT's weighting and metric) of one batch; randomness only from `generator`.

    `student` and `teacher` are denoisers (the student a ConsistencyDenoiser); `net` replaces the student's network
    for its gradient-carrying call (the trainer's DDP wrapper, as in `training_loss`); `target` is the denoiser the
    stop-gradient target is computed with (default: `student` itself, with its own network, without gradient). A label replaced by
    the null class (probability `label_dropout`) is distilled from the unguided teacher: the student then also
    generates without a class. With `guidance_interval` (lo, hi) the teacher is guided only where lo < sigma <= hi
    (GuidedDenoiser), per image and per evaluation of the ODE step: the student learns the ODE the teacher samples
    along with that interval. With a `guide` (a denoiser of the same data: autoguidance) the teacher is guided away
    from it instead of from its unconditional output, which needs no classes. `shard = (rank, world_size)` as in
    denoiser.training_loss: every rank draws the whole global batch's randomness and keeps its rows, so K processes
    equal one.
    """
    lookup(dict.fromkeys(ODE_SOLVERS), solver, "ODE solver")
    rank, world_size = shard
    B = x0.shape[0] * world_size
    if label_dropout:
        if class_labels is None or not student.null_class:
            raise EncdiffError("label_dropout needs class_labels and a model with a null class (config.null_class)")
        class_labels = drop_labels(torch.as_tensor(class_labels), label_dropout, student.num_classes, generator, shard)
    # drawn on the generator's device (CUDA on a GPU), used to index the CPU grid
    n = torch.multinomial(probabilities.to(generator.device), B, replacement=True,
                          generator=generator)[rank::world_size].cpu()
    z = torch.randn((B, *x0.shape[1:]), generator=generator, device=generator.device,
                    dtype=torch.float32)[rank::world_size].to(x0)
    sigma, sigma_next = grid[n].to(x0.device), grid[n + 1].to(x0.device)
    x_next = x0 + _per_image(sigma_next, x0) * z
    guided = (GuidedDenoiser(teacher, guidance_scale, guidance_interval, guide=guide)
              if guidance_scale not in (None, 1) else teacher)
    with torch.no_grad():
        x_hat, _ = ode_step(guided, x_next, sigma_next, sigma, class_labels, solver)
        target_f = (target or student)(x_hat, sigma, class_labels)
    f = student(x_next, sigma_next, class_labels, net=net)
    weight = (1 / (sigma_next - sigma)).to(torch.float32)
    c = default_huber_c(x0) if huber_c is None else huber_c
    return (weight * pseudo_huber(f, target_f, c)).mean()

