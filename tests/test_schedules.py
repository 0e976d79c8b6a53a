"""Training schedules and sampling grids, checked against their definitions and diffusers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from encdiff.denoiser import EDMDenoiser, VPDenoiser
from encdiff.errors import EncdiffError
from encdiff.schedules import (
    SCHEDULES,
    get_alpha_bars,
    get_sigmas,
    sigmas_exponential,
    sigmas_karras,
    vp_sigmas,
)


def vp_denoiser(schedule="scaled_linear"):
    return VPDenoiser(torch.nn.Identity(), get_alpha_bars(schedule))


@pytest.mark.parametrize(
    "name, diffusers_config",
    [
        ("linear", dict(beta_schedule="linear")),
        ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        ("cosine", dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_training_schedules_match_diffusers(name, diffusers_config):
    """Ours are float64; diffusers accumulates its cumprod in float32, hence the 3e-5 relative tolerance."""
    ours = get_alpha_bars(name)
    theirs = DDPMScheduler(**diffusers_config).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours, theirs, rtol=3e-5, atol=0)


def test_cosine_schedule_definition():
    """alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2) (Nichol & Dhariwal 2021, eq. 17).

    Checked up to t = 900: past it the beta clip at 0.999 takes over."""
    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    alpha_bars = get_alpha_bars("cosine")
    torch.testing.assert_close(alpha_bars[:900], torch.tensor(f[1:901], dtype=torch.float64) / f[0])


def test_vp_sigmas():
    alpha_bars = torch.tensor([0.5, 0.2], dtype=torch.float64)
    torch.testing.assert_close(vp_sigmas(alpha_bars), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_karras_schedule():
    """EDM eq. 5: sigma_i^(1/rho) linear in i from sigma_max to sigma_min."""
    denoiser = EDMDenoiser(torch.nn.Identity())
    sigmas = sigmas_karras(11, denoiser, rho=7.0)
    assert sigmas.dtype == torch.float64 and sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    steps = sigmas ** (1 / 7)
    torch.testing.assert_close(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(10))
    assert sigmas_karras(3, denoiser, sigma_min=1.0, sigma_max=4.0, rho=1.0).tolist() == pytest.approx([4.0, 2.5, 1.0])


def test_exponential_schedule():
    sigmas = sigmas_exponential(3, EDMDenoiser(torch.nn.Identity(), sigma_min=0.01, sigma_max=100.0))
    assert sigmas.tolist() == pytest.approx([100.0, 1.0, 0.01])


@pytest.mark.parametrize("n", [1, 7, 10, 50, 1000])
@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
def test_timestep_spacings_match_diffusers(n, spacing, offset):
    """Lin et al. 2024, Table 2, as diffusers' Euler scheduler computes them (fractional for linspace)."""
    if spacing == "linspace" and n == 1:
        pytest.skip("diffusers' 1-step linspace starts at t = 0 (no noise); ours starts at T-1")
    if offset and n == 1000:
        pytest.skip("t = 1000 is past the grid; see test_leading_offset_past_the_grid")
    denoiser = vp_denoiser()
    options = dict(steps_offset=offset) if offset else {}
    sigmas = get_sigmas(spacing, n, denoiser, **options)
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing, steps_offset=offset
    )
    scheduler.set_timesteps(n)
    torch.testing.assert_close(denoiser.sigma_to_t(sigmas[:-1]).float(), scheduler.timesteps, rtol=0, atol=1e-3)
    assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    if spacing == "trailing":
        # trailing always starts from pure noise
        assert sigmas[0].item() == pytest.approx(denoiser.sigma_max, rel=1e-14)


def test_final_sigma():
    denoiser = vp_denoiser()
    assert get_sigmas("leading", 4, denoiser, final_sigma=denoiser.sigma_min)[-1] == denoiser.sigma_min


def test_unknown_schedule_lists_valid_names():
    valid = "karras, exponential, consistency, linspace, leading, trailing"
    with pytest.raises(EncdiffError, match=f"unknown schedule 'karas'; valid: {valid}"):
        get_sigmas("karas", 10, vp_denoiser())
    with pytest.raises(EncdiffError, match="unknown training schedule 'cos'; valid: linear, scaled_linear, cosine"):
        get_alpha_bars("cos")
    assert list(SCHEDULES) == ["karras", "exponential", "consistency", "linspace", "leading", "trailing"]


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_step_count_below_one_or_not_an_integer(n):
    with pytest.raises(EncdiffError, match="number of steps"):
        get_sigmas("karras", n, vp_denoiser())


def test_step_count_beyond_the_training_timesteps():
    with pytest.raises(EncdiffError, match="1001 exceeds the 1000 training timesteps"):
        get_sigmas("trailing", 1001, vp_denoiser())
    assert len(get_sigmas("karras", 1001, vp_denoiser())) == 1002  # continuous grids have no such limit


def test_leading_offset_past_the_grid():
    with pytest.raises(EncdiffError, match="steps_offset=1 puts the first timestep at 1000"):
        get_sigmas("leading", 1000, vp_denoiser(), steps_offset=1)


def test_timestep_spacing_needs_a_discrete_model():
    with pytest.raises(EncdiffError, match="'leading'.*continuous"):
        get_sigmas("leading", 10, EDMDenoiser(torch.nn.Identity()))
