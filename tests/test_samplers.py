"""Samplers: exact convergence on Gaussian data, step-for-step equivalence with diffusers, seeds, bad input."""

import math
import types

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from encdiff.denoiser import EDMDenoiser, GaussianDenoiser, VPDenoiser
from encdiff.errors import EncdiffError
from encdiff.schedules import alpha_bars_cosine, alpha_bars_linear, alpha_bars_scaled_linear, get_sigmas, sigmas_karras
from encdiff.samplers import SAMPLERS, generate, get_sampler, noise, sample_ddim, sample_euler, sample_heun

SHAPE = (2, 3, 8, 8)


def gaussian(C=3, H=4, W=4):
    """Gaussian data with a different mean and std per pixel, so no sampler is exact by symmetry."""
    g = torch.Generator().manual_seed(1)
    mu = torch.randn((C, H, W), generator=g, dtype=torch.float64) * 0.5
    s = 0.2 + torch.rand((C, H, W), generator=g, dtype=torch.float64)
    return GaussianDenoiser(mu, s)


def ode_error(name, denoiser, n):
    """Max error at sigma_min after n-1 Karras steps (no final jump to 0: we test the ODE solver, not the grid)."""
    sigmas = sigmas_karras(n, denoiser)
    x = noise((2, *denoiser.mu.shape), torch.Generator().manual_seed(0), torch.float64) * sigmas[0].item()
    exact = denoiser.ode_solution(x, sigmas[0].item(), sigmas[-1].item())
    return (SAMPLERS[name](denoiser, x, sigmas) - exact).abs().max().item()


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_gaussian(name, order):
    denoiser = gaussian()
    errors = [ode_error(name, denoiser, n) for n in (32, 64, 128)]
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(p - order) < 0.25 for p in measured), (errors, measured)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ddim"])
def test_deterministic_samplers_reach_the_exact_image(name):
    """Through the final step to sigma = 0 the error falls at least 10x from 10 to 160 steps (first order: 16x)."""
    denoiser = gaussian()
    x_T = noise((2, *denoiser.mu.shape), torch.Generator().manual_seed(0), torch.float64) * 80.0
    exact = denoiser.ode_solution(x_T, 80.0, 0.0)
    errors = []
    for n in (10, 40, 160):
        sigmas = get_sigmas("karras", n, denoiser)
        errors.append((SAMPLERS[name](denoiser, x_T, sigmas) - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < errors[0] / 10, errors


def test_ddim_eta0_is_euler():
    denoiser = gaussian()
    sigmas = get_sigmas("karras", 7, denoiser)
    x = noise((2, *denoiser.mu.shape), torch.Generator().manual_seed(0), torch.float64) * 80.0
    torch.testing.assert_close(sample_ddim(denoiser, x, sigmas), sample_euler(denoiser, x, sigmas), rtol=0, atol=1e-12)


# --- Step-for-step equivalence with diffusers -----------------------------------------------------


class StandIn(torch.nn.Module):
    """A deterministic nonlinear model of (x_t, t) with O(1) outputs, shared by both sides.

    Near-ideal noise prediction for unit-variance data (E[eps | x_t] = sqrt(1 - alpha_bar) x_t) plus a
    nonlinear, t-dependent perturbation, so every step and every timestep value matters.
    """

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod.double()

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        low = t.floor().long().clamp(max=len(self.alphas_cumprod) - 2)
        alpha_bar = torch.lerp(self.alphas_cumprod[low], self.alphas_cumprod[low + 1], t - low)
        scale = (1 - alpha_bar).sqrt().to(x.dtype).reshape(-1, 1, 1, 1)
        t = t.to(x.dtype).reshape(-1, 1, 1, 1)
        return scale * x + 0.2 * torch.tanh(1.3 * x.roll(1, -1) + torch.sin(t / 37.0))


SCHEDULE_CONFIGS = {
    "scaled_linear": (
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        alpha_bars_scaled_linear,
    ),
    "linear": (dict(beta_schedule="linear"), alpha_bars_linear),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), alpha_bars_cosine),
}


def run_diffusers(scheduler, model, n, seed, **step_options):
    """The standard diffusers denoising loop; returns the final latents in diffusers' own (VP or VE) space."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(n)
    latents = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    stochastic = "generator" in scheduler.step.__code__.co_varnames
    for t in scheduler.timesteps:
        model_output = model(scheduler.scale_model_input(latents, t), t)
        step = scheduler.step(model_output, t, latents, **({"generator": g} if stochastic else {}), **step_options)
        latents = step.prev_sample
    return latents


def run_ours(sampler, denoiser, sigmas, seed, vp_space, **options):
    """Our sampler from the same initial noise. diffusers' DDIM/DDPM/DPM-Solver keep x_t = x / sqrt(1 + sigma^2)
    (VP space, initial noise std 1); Euler/Heun keep x (VE space, initial std init_noise_sigma)."""
    g = torch.Generator().manual_seed(seed)
    z = noise(SHAPE, g)
    sigma_first, sigma_last = sigmas[0].item(), sigmas[-1].item()
    x = z * (math.sqrt(1 + sigma_first**2) if vp_space else sigma_first)
    x = SAMPLERS[sampler](denoiser, x, sigmas, generator=g, **options)
    return x / math.sqrt(1 + sigma_last**2) if vp_space else x


def equivalence_case(schedule, prediction, quantize=False):
    config, alpha_bars_fn = SCHEDULE_CONFIGS[schedule]
    diffusers_prediction = {"epsilon": "epsilon", "v": "v_prediction"}[prediction]
    model = StandIn(DDPMScheduler(**config).alphas_cumprod)
    denoiser = VPDenoiser(model, alpha_bars_fn(), prediction, quantize=quantize)
    return dict(config, prediction_type=diffusers_prediction), model, denoiser


def assert_equivalent(ours, theirs):
    assert theirs.abs().max() > 0.1  # a real image, not a collapsed one
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


PREDICTIONS = ["epsilon", "v"]
STEPS = [4, 10, 25]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(
    "options, spacing",
    [
        (dict(), dict(schedule="leading")),  # diffusers defaults
        (dict(steps_offset=1, set_alpha_to_one=False), dict(schedule="leading", steps_offset=1)),  # Stable Diffusion
        (dict(timestep_spacing="trailing"), dict(schedule="trailing")),
    ],
)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(prediction, n, options, spacing, eta):
    config, model, denoiser = equivalence_case("scaled_linear", prediction)
    if spacing["schedule"] == "trailing" and 1000 % n:
        pytest.skip("diffusers' DDIM steps to t - T//n, off its own trailing grid unless n divides T")
    scheduler = DDIMScheduler(**config, clip_sample=False, **options)
    theirs = run_diffusers(scheduler, model, n, seed=3, eta=eta)
    # set_alpha_to_one=False ends at alpha_bar_0, i.e. sigma_min, instead of sigma = 0.
    final_sigma = 0.0 if options.get("set_alpha_to_one", True) else denoiser.sigma_min
    spacing = dict(spacing)
    sigmas = get_sigmas(spacing.pop("schedule"), n, denoiser, final_sigma=final_sigma, **spacing)
    assert_equivalent(run_ours("ddim", denoiser, sigmas, seed=3, vp_space=True, eta=eta), theirs)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddpm_matches_diffusers(prediction, n, spacing):
    config, model, denoiser = equivalence_case("linear", prediction)
    scheduler = DDPMScheduler(**config, clip_sample=False, timestep_spacing=spacing)
    theirs = run_diffusers(scheduler, model, n, seed=4)
    # diffusers' DDPM runs on its (integer) timesteps; every step uses the posterior variance (DDPM eq. 7).
    timesteps = scheduler.timesteps.double()
    sigmas = torch.cat([denoiser.t_to_sigma(timesteps), torch.zeros(1, dtype=torch.float64)])
    if spacing != "linspace":  # linspace rounds to integers in DDPM, but not in our (Euler-style) grid
        torch.testing.assert_close(sigmas, get_sigmas(spacing, n, denoiser))
    assert_equivalent(run_ours("ddpm", denoiser, sigmas, seed=4, vp_space=True), theirs)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler, scheduler_cls", [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)])
def test_euler_heun_match_diffusers(prediction, n, karras, sampler, scheduler_cls):
    config, model, denoiser = equivalence_case("scaled_linear", prediction)
    theirs = run_diffusers(scheduler_cls(**config, use_karras_sigmas=karras), model, n, seed=5)
    sigmas = get_sigmas("karras" if karras else "linspace", n, denoiser)
    assert_equivalent(run_ours(sampler, denoiser, sigmas, seed=5, vp_space=False), theirs)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_heun_match_diffusers_leading_spacing(sampler):
    """Stable Diffusion's configuration: leading spacing with steps_offset=1, initial noise std sqrt(sigma^2 + 1)."""
    config, model, denoiser = equivalence_case("scaled_linear", "epsilon")
    cls = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}[sampler]
    theirs = run_diffusers(cls(**config, timestep_spacing="leading", steps_offset=1), model, 10, seed=6)
    sigmas = get_sigmas("leading", 10, denoiser, steps_offset=1)
    x_T = noise(SHAPE, torch.Generator().manual_seed(6)) * math.sqrt(1 + sigmas[0].item() ** 2)
    assert_equivalent(SAMPLERS[sampler](denoiser, x_T, sigmas), theirs)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(
    "schedule, prediction, karras",
    [
        ("scaled_linear", "epsilon", False),
        ("scaled_linear", "v", False),
        ("scaled_linear", "epsilon", True),
        ("scaled_linear", "v", True),
        # Cosine only with v: eps-prediction at alpha_bar_999 = 2.4e-9 divides float32 rounding by 5e-5 on both
        # sides (1e-3 apart, neither right), and diffusers truncates cosine's Karras timesteps to int64 and fails.
        ("cosine", "v", False),
    ],
)
def test_dpmpp_2m_matches_diffusers(n, schedule, prediction, karras):
    # With Karras sigmas diffusers rounds the model's timesteps to integers: quantize=True does the same.
    config, model, denoiser = equivalence_case(schedule, prediction, quantize=karras)
    scheduler = DPMSolverMultistepScheduler(**config, use_karras_sigmas=karras)
    theirs = run_diffusers(scheduler, model, n, seed=7)
    if karras:
        sigmas = get_sigmas("karras", n, denoiser)
    else:  # DPM-Solver's own linspace: n+1 rounded timesteps over [T-1, 0], dropping t = 0
        timesteps = torch.linspace(999, 0, n + 1, dtype=torch.float64).round()[:-1]
        sigmas = torch.cat([denoiser.t_to_sigma(timesteps), torch.zeros(1, dtype=torch.float64)])
    assert_equivalent(run_ours("dpmpp_2m", denoiser, sigmas, seed=7, vp_space=True), theirs)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_3m_matches_diffusers_from_15_steps(karras):
    """diffusers drops to 2nd order on the second-to-last step below 15 steps; from 15 on both are plain 3M."""
    config, model, denoiser = equivalence_case("scaled_linear", "epsilon", quantize=karras)
    scheduler = DPMSolverMultistepScheduler(**config, use_karras_sigmas=karras, solver_order=3)
    theirs = run_diffusers(scheduler, model, 16, seed=8)
    if karras:
        sigmas = get_sigmas("karras", 16, denoiser)
    else:
        timesteps = torch.linspace(999, 0, 17, dtype=torch.float64).round()[:-1]
        sigmas = torch.cat([denoiser.t_to_sigma(timesteps), torch.zeros(1, dtype=torch.float64)])
    assert_equivalent(run_ours("dpmpp_3m", denoiser, sigmas, seed=8, vp_space=True), theirs)


# --- Golden numbers ------------------------------------------------------------------------------


def fixed_conv_net():
    """A small fixed random conv net (weights from a seeded generator), an EDM-style backbone."""
    g = torch.Generator().manual_seed(1234)
    conv1, conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)
    with torch.no_grad():
        for p in [*conv1.parameters(), *conv2.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    class Net(torch.nn.Module):
        config = types.SimpleNamespace(num_classes=0, null_class=False)

        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv1, conv2

        def forward(self, x, noise_labels, class_labels=None):
            h = torch.nn.functional.silu(self.conv1(x) + noise_labels.reshape(-1, 1, 1, 1))
            return self.conv2(h)

    return Net()


# images[0, :, 0, 0] for seed 2024, 6 steps on the default Karras grid (recorded from this implementation).
GOLDEN = {
    "heun": [-1.798524, 0.224776, 2.515612],
    "dpmpp_2m": [-0.98168, 0.125362, 1.395622],
    "ddpm": [-0.498, 0.339255, -0.020899],
}


@pytest.mark.parametrize("sampler", sorted(GOLDEN))
def test_golden_values(sampler):
    denoiser = EDMDenoiser(fixed_conv_net())
    with torch.no_grad():
        images = generate(denoiser, (1, 3, 4, 4), torch.Generator().manual_seed(2024), sampler=sampler, steps=6)
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor(GOLDEN[sampler]), rtol=0, atol=1e-5)


# --- Randomness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("euler_ancestral", {}), ("heun", dict(s_churn=10.0))])
def test_per_image_seeds_make_a_batch_equal_images_made_one_by_one(sampler, options):
    denoiser = EDMDenoiser(fixed_conv_net())
    seeds = [11, 12, 13]
    with torch.no_grad():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        batch = generate(denoiser, (3, 3, 4, 4), generators, sampler=sampler, steps=5, **options)
        singles = [
            generate(denoiser, (1, 3, 4, 4), [torch.Generator().manual_seed(s)], sampler=sampler, steps=5, **options)
            for s in seeds
        ]
    torch.testing.assert_close(batch, torch.cat(singles), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_same_seed_same_image_and_stochastic_samplers_use_the_noise():
    denoiser = EDMDenoiser(fixed_conv_net())
    with torch.no_grad():
        a, b, c = (
            generate(denoiser, (1, 3, 4, 4), torch.Generator().manual_seed(seed), sampler="ddpm", steps=5)
            for seed in (1, 1, 2)
        )
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_noise_is_drawn_in_float32_whatever_the_dtype():
    z32 = noise((2, 3), torch.Generator().manual_seed(0))
    z64 = noise((2, 3), torch.Generator().manual_seed(0), torch.float64)
    assert z64.dtype == torch.float64 and torch.equal(z64.float(), z32)


def test_callback_sees_every_step():
    denoiser = gaussian()
    seen = []
    sigmas = get_sigmas("karras", 5, denoiser)
    x = torch.zeros((1, *denoiser.mu.shape), dtype=torch.float64)
    sample_heun(denoiser, x, sigmas, callback=lambda i, sigma, x, denoised: seen.append((i, sigma)))
    assert seen == [(i, sigmas[i].item()) for i in range(5)]


# --- Bad input -----------------------------------------------------------------------------------


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(EncdiffError, match="unknown sampler 'eulr'.*euler.*heun.*dpmpp_2m"):
        get_sampler("eulr")


def test_stochastic_sampler_without_generator():
    denoiser = gaussian()
    x = torch.zeros((1, *denoiser.mu.shape))
    with pytest.raises(EncdiffError, match="generator"):
        SAMPLERS["ddpm"](denoiser, x, get_sigmas("karras", 3, denoiser))


def test_generator_list_must_match_batch():
    with pytest.raises(EncdiffError, match="2 generators for a batch of 3"):
        noise((3, 1), [torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 2.0, 0.0], [1.0, 0.5, -0.1], [float("nan"), 0.0]])
def test_bad_sigma_grids(sigmas):
    with pytest.raises(EncdiffError, match="sigmas"):
        sample_euler(gaussian(), torch.zeros(1, 3, 4, 4), torch.tensor(sigmas))


def test_step_count_validated_through_generate():
    with pytest.raises(EncdiffError, match="steps"):
        generate(gaussian(), (1, 3, 4, 4), torch.Generator(), steps=0)


def test_nan_model_output_is_an_error_not_a_nan_image():
    class Broken(torch.nn.Module):
        def forward(self, x, noise_labels, class_labels=None):
            return torch.where(noise_labels.reshape(-1, 1, 1, 1) < 0, torch.nan, x)

    with pytest.raises(EncdiffError, match="NaN"):
        generate(EDMDenoiser(Broken()), (1, 3, 4, 4), torch.Generator().manual_seed(0), sampler="euler", steps=10)
