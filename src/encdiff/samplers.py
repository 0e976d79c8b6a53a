"""Samplers: from noise at sigmas[0] to an image at sigmas[-1], one pure function per method.

Notation (as in denoiser.py; EDM, Karras et al. 2022, and k-diffusion):

    x            current state, x = x0 + sigma * eps (variance-exploding form; a VP model's x_t is x * sqrt(alpha_bar))
    sigmas       float64 grid sigma_0 > sigma_1 > ... > sigma_N >= 0, walked in N steps (schedules.get_sigmas)
    sigma, sigma_next
                 sigmas[i], sigmas[i+1]
    denoised     D(x; sigma), the denoiser's estimate of x0
    d            dx/dsigma = (x - denoised) / sigma, the probability-flow ODE (EDM eqs. 1 and 3, sigma(t) = t)
    eps          (x - denoised) / sigma, the implied noise
    sigma_up, sigma_down
                 an ancestral step goes deterministically to sigma_down, then adds fresh noise of std sigma_up,
                 with sigma_down^2 + sigma_up^2 = sigma_next^2
    lambda_      log-SNR of DPM-Solver, lambda = -log(sigma); h = lambda_next - lambda

Every sampler has the signature

    sample_xxx(denoiser, x, sigmas, class_labels=None, generator=None, callback=None, **method_options) -> x

x is the initial noise already scaled to sigmas[0] (e.g. ``noise * sigmas[0]``, see ``generate``); the
result is at sigmas[-1] (the image when it is 0). Arithmetic happens in x's dtype with coefficients from
the float64 grid: pass float64 x for ODE-accurate work, the denoiser casts to the network's dtype.
Fresh noise comes only from ``generator``: one ``torch.Generator``, or a list of one per image so a batch
equals its images made one by one. ``callback(i, sigma, x, denoised)`` runs after step i, x then at sigmas[i+1].
"""

import math

import torch

from encdiff.denoiser import GuidedDenoiser, _per_image
from encdiff.errors import EncdiffError, count, lookup
from encdiff.schedules import get_sigmas


def noise(shape, generator, dtype=torch.float32, device=None):
    """Standard normal noise from an explicit generator (or one generator per image along dim 0).

    Always drawn in float32 on the generator's device, then converted, so a seed gives the same image
    whatever the sampling precision, and the same numbers as diffusers' ``randn_tensor``.
    """
    shape = tuple(shape)
    if generator is None:
        raise EncdiffError("generator is required: randomness only comes from an explicit torch.Generator")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise EncdiffError(f"generator list has {count(len(generator), 'generator')} for a batch of {count(shape[0], 'image')}")
        # Each image draws from its own stream, so it does not depend on its position or batch size.
        z = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generator])
    else:
        z = torch.randn(shape, generator=generator, device=generator.device).to(device)
    return z.to(dtype)


def _check_sigmas(sigmas, x):
    # The grid lives on the CPU as Python floats: step coefficients are scalars, computed in float64.
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise EncdiffError(f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not (sigmas[1:] < sigmas[:-1]).all() or sigmas[-1] < 0 or not torch.isfinite(sigmas).all():
        raise EncdiffError("sigmas must be finite, strictly decreasing and non-negative")
    if not x.dtype.is_floating_point:
        raise EncdiffError(f"x must be a floating-point tensor, got {x.dtype}")
    return sigmas.tolist()


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of DDIM eq. 16 (Song et al. 2021a) rewritten in sigma space.

    The DDPM posterior variance (Ho et al. 2020, eq. 7) is sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
    at eta = 1; eta scales its std; sigma_down keeps the marginal variance at sigma_next^2.
    """
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


ODE_SOLVERS = ("heun", "euler")  # ode_step's solvers


def ode_step(denoiser, x, sigma, sigma_next, class_labels=None, solver="euler"):
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eqs. 1, 3) from sigma to
    sigma_next > 0: Euler, or Heun's trapezoidal correction with the slope at sigma_next (EDM Alg. 1, lines 5-8).
    The one step of the samplers, of distillation's teacher and of inversion (which walks it upwards). sigma and
    sigma_next are numbers, or (B,) tensors of per-image levels. Returns (x_next, D(x; sigma))."""
    per_image = lambda s: _per_image(s, x) if torch.is_tensor(s) else s  # noqa: E731
    denoised = denoiser(x, sigma, class_labels)
    d = (x - denoised) / per_image(sigma)
    h = per_image(sigma_next - sigma)
    x_next = x + h * d
    if solver == "heun":
        d_next = (x_next - denoiser(x_next, sigma_next, class_labels)) / per_image(sigma_next)
        x_next = x + h * (d + d_next) / 2
    return x_next, denoised


def sample_euler(denoiser, x, sigmas, class_labels=None, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (EDM, Karras et al. 2022, Alg. 1 without its correction); order 1."""
    sigmas = _check_sigmas(sigmas, x)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x, denoised = ode_step(denoiser, x, sigma, sigma_next, class_labels, "euler")
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


def sample_heun(
    denoiser, x, sigmas, class_labels=None, generator=None, callback=None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
):
    """EDM's 2nd-order Heun sampler with optional churn (Karras et al. 2022, Alg. 2).

    2N-1 model evaluations for N steps ending at sigma = 0: the last step is Euler (Alg. 2, line 9),
    which is why diffusers' HeunDiscreteScheduler lists every inner timestep twice.
    """
    sigmas = _check_sigmas(sigmas, x)
    N = len(sigmas) - 1
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # Alg. 2 lines 4-6: raise the noise level to sigma_hat = sigma (1 + gamma) by adding fresh noise.
        gamma = min(s_churn / N, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise(x.shape, generator, x.dtype, x.device)
        # Lines 7-11: Euler step from sigma_hat to sigma_next and the trapezoidal correction with the slope at
        # sigma_next, skipped at sigma_next = 0.
        x, denoised = ode_step(denoiser, x, sigma_hat, sigma_next, class_labels,
                               "heun" if sigma_next != 0 else "euler")
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


def sample_ddim(denoiser, x, sigmas, class_labels=None, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021a, eq. 12 with sigma_t(eta) of eq. 16), in sigma space.

    eta = 0 is deterministic (and the same update as Euler); eta = 1 is DDPM ancestral sampling.
    On a VP model's integer-timestep grid this reproduces diffusers' DDIMScheduler step for step.
    """
    sigmas = _check_sigmas(sigmas, x)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma, class_labels)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        # Eq. 12 divided by sqrt(alpha_bar_next): "predicted x0" + "direction pointing to x_t" + "random noise".
        x = denoised + sigma_down * eps
        # No draw when sigma_up = 0 (eta = 0, or the last step into sigma = 0), so deterministic runs need no generator.
        if sigma_up > 0:
            x = x + sigma_up * noise(x.shape, generator, x.dtype, x.device)
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


def sample_ddpm(denoiser, x, sigmas, class_labels=None, generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2; posterior variance beta-tilde) = DDIM with eta = 1.

    (Song et al. 2021a, sec. 4.1.) diffusers' DDPMScheduler with variance_type="fixed_small" matches it.
    """
    return sample_ddim(denoiser, x, sigmas, class_labels, generator, callback, eta=1.0)


def sample_euler_ancestral(denoiser, x, sigmas, class_labels=None, generator=None, callback=None, eta=1.0):
    """Euler ancestral (k-diffusion): an Euler step to sigma_down plus noise sigma_up, i.e. the DDIM(eta) update."""
    return sample_ddim(denoiser, x, sigmas, class_labels, generator, callback, eta=eta)


def _dpmpp_multistep(denoiser, x, sigmas, class_labels, callback, order):
    """DPM-Solver++ multistep in data prediction (Lu et al. 2022b: Alg. 2 for order 2; order 3 as in diffusers).

    The order ramps up as model outputs accumulate, and the step into sigma = 0 (lambda = inf) is first
    order, as in DPM-Solver++ and diffusers (``final_sigmas_type="zero"``).
    """
    sigmas = _check_sigmas(sigmas, x)
    denoised_history, h_history = [], []  # D and h of the previous steps, newest last
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma, class_labels)
        if sigma_next == 0:
            x = denoised  # lambda_next = inf: the exact first-order step lands on D
        else:
            h = math.log(sigma / sigma_next)  # h = lambda_next - lambda, lambda = -log(sigma)
            phi_1 = math.expm1(-h)  # e^{-h} - 1
            # First order (DPM-Solver++(1) = DDIM): x_next = (sigma_next/sigma) x - (e^{-h} - 1) D.
            x_next = (sigma_next / sigma) * x - phi_1 * denoised
            k = min(order, len(denoised_history) + 1)
            if k >= 2:
                # Backward differences in lambda (r = h_prev / h): D1_0 ~ h dD/dlambda; order 3 adds D2.
                r0 = h_history[-1] / h
                D1_0 = (denoised - denoised_history[-1]) / r0
                if k == 2:
                    # Alg. 2: D = (1 + 1/(2 r)) D_i - 1/(2 r) D_{i-1}, i.e. extra term -(e^{-h}-1) D1_0 / 2.
                    x_next = x_next - phi_1 / 2 * D1_0
                else:
                    r1 = h_history[-2] / h
                    D1_1 = (denoised_history[-1] - denoised_history[-2]) / r1
                    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                    D2 = (D1_0 - D1_1) / (r0 + r1)
                    # Exponential-integrator weights of the 1st and 2nd lambda-derivatives of D (Taylor terms).
                    weight_d1 = phi_1 / h + 1  # (e^{-h} - 1)/h + 1
                    weight_d2 = (phi_1 + h) / h**2 - 0.5  # (e^{-h} - 1 + h)/h^2 - 1/2
                    x_next = x_next + weight_d1 * D1 - weight_d2 * D2
            x = x_next
            denoised_history = (denoised_history + [denoised])[-2:]
            h_history = (h_history + [h])[-2:]
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, class_labels=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): second-order multistep, one model evaluation per step."""
    return _dpmpp_multistep(denoiser, x, sigmas, class_labels, callback, order=2)


def sample_dpmpp_3m(denoiser, x, sigmas, class_labels=None, generator=None, callback=None):
    """DPM-Solver++(3M) (Lu et al. 2022b): third-order multistep in data prediction, one evaluation per step.

    More accurate than 2M from ~20 model evaluations, less at 5-10 (benchmarks/sampler_accuracy.md).
    """
    return _dpmpp_multistep(denoiser, x, sigmas, class_labels, callback, order=3)


def sample_consistency(denoiser, x, sigmas, class_labels=None, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) for a consistency function f = denoiser.

    x0 = f(x; sigmas[0]); then for each later level: x = x0 + sqrt(sigma^2 - sigma_min^2) z, x0 = f(x; sigma).
    One evaluation per level; the grid's final 0 is where the last x0 lands. With the levels of a probability-flow
    ODE's teacher this is the ODE's map plus fresh noise at every restart (so a seed needs its generator).
    """
    sigmas = _check_sigmas(sigmas, x)
    if sigmas[-1] != 0:
        raise EncdiffError(f"consistency sampling ends on the image: the grid's last level must be 0, got {sigmas[-1]}")
    sigma_min = denoiser.sigma_min
    if sigmas[-2] <= sigma_min:
        raise EncdiffError(f"consistency sampling needs levels above sigma_min = {sigma_min}, got {sigmas[-2]:.4g}")
    denoised = None
    for i, sigma in enumerate(sigmas[:-1]):
        if denoised is not None:  # Alg. 1, line 5: back to level sigma with fresh noise
            x = denoised + math.sqrt(sigma**2 - sigma_min**2) * noise(x.shape, generator, x.dtype, x.device)
        denoised = denoiser(x, sigma, class_labels)
        if callback is not None:
            callback(i, sigma, denoised, denoised)
    return denoised


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler_ancestral": sample_euler_ancestral,
    "consistency": sample_consistency,
}


def draws_fresh_noise(sampler, steps):
    """Whether a sampler adds new noise between its steps (so its result is not a function of the starting noise
    alone): DDPM and Euler ancestral at every step; multistep consistency sampling after its first step."""
    return sampler in ("ddpm", "euler_ancestral") or (sampler == "consistency" and steps > 1)


def get_sampler(name):
    """The sampler function registered as ``name`` in ``SAMPLERS``."""
    return lookup(SAMPLERS, name, "sampler")


@torch.no_grad()
def generate(
    denoiser, shape, generator, sampler="dpmpp_2m", steps=20, schedule="karras", class_labels=None,
    guidance_scale=None, callback=None, dtype=torch.float32, device=None, sigmas=None, x=None, guidance_interval=None,
    guide=None, **sampler_options,
):
    """Noise -> images: x = noise * sigmas[0] (EDM Alg. 1, line 2), then the named sampler over ``steps`` steps.

    With a list of generators (one per image) every image depends only on its own seed. ``guidance_scale``
    turns on classifier-free guidance towards ``class_labels``; a scale of 1 is the conditional model itself
    (eq. 6 with w = 0), so it runs without the unconditional half of the batch; ``guidance_interval`` (sigma_lo,
    sigma_hi) limits guidance to those noise levels; with a ``guide`` denoiser the guidance is autoguidance instead
    (GuidedDenoiser), for unconditional models too. Editing starts elsewhere: ``sigmas``
    replaces the schedule's grid (e.g. its tail, for img2img) and ``x`` the initial noise (already at sigmas[0]).
    """
    sample_fn = get_sampler(sampler)
    if sigmas is None:
        sigmas = get_sigmas(schedule, steps, denoiser)
    if guidance_scale is not None and guidance_scale != 1:
        denoiser = GuidedDenoiser(denoiser, guidance_scale, guidance_interval, guide)
    if x is None:
        x = noise(shape, generator, dtype, device) * sigmas[0].item()
    return sample_fn(denoiser, x, sigmas, class_labels, generator, callback, **sampler_options)
