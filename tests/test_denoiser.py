"""Denoiser parameterisations, guidance, class labels, and the denoising score-matching loss."""

import math
import types

import pytest
import torch

from encdiff.denoiser import (
    NOISE_LEVELS,
    EDMDenoiser,
    FlowDenoiser,
    GaussianDenoiser,
    GuidedDenoiser,
    VPDenoiser,
    denoising_loss,
    loss_weight_edm,
    loss_weight_min_snr,
    nearest_noise,
    training_loss,
)
from encdiff.errors import EncdiffError
from encdiff.schedules import alpha_bars_linear, alpha_bars_scaled_linear


class Recorder(torch.nn.Module):
    """A backbone returning a fixed function of its input, remembering what it was called with."""

    def __init__(self, num_classes=0, null_class=False):
        super().__init__()
        self.config = types.SimpleNamespace(num_classes=num_classes, null_class=null_class)
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x, noise_labels, class_labels))
        out = torch.sin(3 * x) + 0.1 * noise_labels.reshape(-1, 1, 1, 1)
        if class_labels is not None:
            out = out + class_labels.reshape(-1, 1, 1, 1).to(x.dtype)
        return out


def x_and_sigma(B=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.05, 1.0, 12.0], dtype=torch.float64)[:B]
    return torch.randn((B, 2, 4, 4), generator=g, dtype=dtype) * 3, sigma


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_vp_parameterisations_match_the_ddpm_formulas(prediction):
    """x0 from the network output in VP space (DDPM eq. 15; Salimans & Ho 2022 sec. 4), written independently."""
    net = Recorder()
    denoiser = VPDenoiser(net, alpha_bars_scaled_linear(), prediction)
    x, sigma = x_and_sigma()
    denoised = denoiser(x, sigma)
    x_in, t, _ = net.calls[-1]
    alpha_bar = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x
    torch.testing.assert_close(x_in, x_t)  # the network sees the VP-scaled input ...
    torch.testing.assert_close(denoiser.t_to_sigma(t), sigma)  # ... and the timestep of sigma
    F = net(x_t, t)
    expected = {
        "epsilon": (x_t - (1 - alpha_bar).sqrt() * F) / alpha_bar.sqrt(),
        "v": alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * F,
        "x0": F,
    }[prediction]
    torch.testing.assert_close(denoised, expected)


def test_edm_preconditioning():
    """EDM Table 1: c_skip, c_out, c_in, c_noise = ln(sigma)/4 with sigma_data = 0.5."""
    net = Recorder()
    denoiser = EDMDenoiser(net, sigma_data=0.5)
    x, sigma = x_and_sigma()
    denoised = denoiser(x, sigma)
    x_in, c_noise, _ = net.calls[-1]
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_in, x / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    expected = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * net(x_in, c_noise)
    torch.testing.assert_close(denoised, expected)


def ideal_net(kind, gaussian, prediction="epsilon"):
    """A backbone that predicts the exact eps / v / x0 / EDM-F target of Gaussian data, so that the
    wrapping denoiser must reproduce the exact D(x; sigma) if its parameterisation is right."""

    class Ideal(torch.nn.Module):
        config = types.SimpleNamespace(num_classes=0, null_class=False)

        def forward(self, x_in, noise_labels, class_labels=None):
            if kind == "vp":
                sigma = self.denoiser.t_to_sigma(noise_labels.double()).reshape(-1, 1, 1, 1)
                x = x_in * (1 + sigma**2).sqrt()
            elif kind == "flow":
                sigma = (4 * noise_labels.double()).exp().reshape(-1, 1, 1, 1)
                x = x_in * (1 + sigma)
            else:
                sigma = (4 * noise_labels.double()).exp().reshape(-1, 1, 1, 1)
                x = x_in * (sigma**2 + 0.25).sqrt()
            denoised = gaussian(x, sigma.reshape(-1))
            eps = (x - denoised) / sigma
            if kind == "flow":  # the velocity eps - x0 of the linear interpolant
                return eps - denoised
            if kind == "edm":  # F = (D - c_skip x) / c_out
                return (denoised - 0.25 / (sigma**2 + 0.25) * x) / (sigma * 0.5 / (sigma**2 + 0.25).sqrt())
            return {"epsilon": eps, "v": (eps - sigma * denoised) / (1 + sigma**2).sqrt(), "x0": denoised}[prediction]

    net = Ideal()
    denoiser = (VPDenoiser(net, alpha_bars_linear(), prediction) if kind == "vp"
                else FlowDenoiser(net) if kind == "flow" else EDMDenoiser(net))
    net.denoiser = denoiser
    return denoiser


IDEAL_CASES = [("vp", "epsilon"), ("vp", "v"), ("vp", "x0"), ("edm", None), ("flow", None)]


@pytest.mark.parametrize("kind, prediction", IDEAL_CASES)
def test_ideal_targets_give_the_exact_denoiser(kind, prediction):
    gaussian = GaussianDenoiser(mu=0.3, s=0.7)
    denoiser = ideal_net(kind, gaussian, prediction)
    x, sigma = x_and_sigma()
    torch.testing.assert_close(denoiser(x, sigma), gaussian(x, sigma))


# --- sigma <-> t on the discrete grid --------------------------------------------------------------


def test_sigma_t_maps():
    denoiser = VPDenoiser(Recorder(), alpha_bars_scaled_linear())
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(denoiser.t_to_sigma(t), denoiser.train_sigmas, rtol=1e-14, atol=0)
    torch.testing.assert_close(denoiser.sigma_to_t(denoiser.train_sigmas), t, rtol=0, atol=1e-9)
    fractional = torch.tensor([0.25, 17.5, 998.9], dtype=torch.float64)
    torch.testing.assert_close(denoiser.sigma_to_t(denoiser.t_to_sigma(fractional)), fractional)
    # log(sigma) is linear in t between grid points
    mid = denoiser.t_to_sigma(torch.tensor(17.5, dtype=torch.float64))
    torch.testing.assert_close(mid, (denoiser.train_sigmas[17] * denoiser.train_sigmas[18]).sqrt())
    # outside the trained range t clamps; quantize rounds to the nearest trained timestep
    assert denoiser.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]
    quantized = VPDenoiser(Recorder(), alpha_bars_scaled_linear(), quantize=True)
    assert quantized.sigma_to_t(denoiser.t_to_sigma(fractional)).tolist() == [0.0, 18.0, 999.0]


def test_sigma_to_t_matches_diffusers_interpolation():
    """diffusers' Euler/Heun/DPM-Solver map Karras sigmas to timesteps by the same log-sigma interpolation."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True
    )
    scheduler.set_timesteps(13)
    denoiser = VPDenoiser(Recorder(), scheduler.alphas_cumprod)
    ours = denoiser.sigma_to_t(scheduler.sigmas[:-1].double()).float()
    torch.testing.assert_close(ours, scheduler.timesteps, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "alpha_bars, match",
    [([0.9], "1-D schedule"), ([0.9, 1.0], "strictly inside"), ([0.5, 0.9], "decrease"), ([[0.9, 0.5]], "1-D")],
)
def test_bad_alpha_bars(alpha_bars, match):
    with pytest.raises(EncdiffError, match=match):
        VPDenoiser(Recorder(), torch.tensor(alpha_bars))


def test_unknown_prediction_lists_valid():
    with pytest.raises(EncdiffError, match="'eps'.*epsilon, v, x0"):
        VPDenoiser(Recorder(), alpha_bars_linear(), "eps")


def test_float64_sampling_with_a_float32_network():
    """The denoiser casts only the network's input to the network's dtype; D comes back in x's dtype."""

    class Float32Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float32))

        def forward(self, x, noise_labels, class_labels=None):
            self.seen = (x.dtype, noise_labels.dtype)
            return x * self.scale

    net = Float32Net()
    x, sigma = x_and_sigma()
    assert EDMDenoiser(net)(x, sigma).dtype == torch.float64 and net.seen == (torch.float32, torch.float32)


def test_nan_output_names_the_noise_level():
    net = Recorder()
    net.forward = lambda x, noise_labels, class_labels=None: x * torch.nan
    with pytest.raises(EncdiffError, match=r"NaN or inf at sigma in \[0.05, 12\]"):
        EDMDenoiser(net)(*x_and_sigma())


# --- class labels and guidance -------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_classes, null_class, labels, match",
    [
        (0, False, [0, 0, 0], "unconditional"),
        (5, False, None, "class_labels are required"),
        (5, False, [0, 5, 1], r"out of range.*valid 0\.\.4"),
        (5, True, [0, 6, 1], r"out of range.*valid 0\.\.5 \(5 = no class\)"),
        (5, True, [-1, 0, 1], "out of range"),
        (5, True, [0.0, 1.0, 2.0], "integer"),
        (5, True, [0, 1], r"shape \(3,\)"),
    ],
)
def test_bad_class_labels(num_classes, null_class, labels, match):
    denoiser = EDMDenoiser(Recorder(num_classes, null_class))
    x, sigma = x_and_sigma()
    with pytest.raises(EncdiffError, match=match):
        denoiser(x, sigma, None if labels is None else torch.tensor(labels))


def test_null_class_label_and_none_are_accepted_with_a_null_class():
    net = Recorder(5, True)
    x, sigma = x_and_sigma()
    EDMDenoiser(net)(x, sigma, torch.tensor([5, 0, 4]))
    EDMDenoiser(net)(x, sigma, None)
    assert net.calls[-1][2] is None  # the backbone itself substitutes its null class


def test_guidance_is_one_batched_forward_and_scale_1_is_the_conditional_model():
    net = Recorder(5, True)
    denoiser = EDMDenoiser(net)
    x, sigma = x_and_sigma()
    labels = torch.tensor([1, 2, 3])
    conditional = denoiser(x, sigma, labels)
    unconditional = denoiser(x, sigma, torch.full((3,), 5))
    net.calls.clear()
    torch.testing.assert_close(GuidedDenoiser(denoiser, 1.0)(x, sigma, labels), conditional)
    assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 6
    torch.testing.assert_close(GuidedDenoiser(denoiser, 0.0)(x, sigma, labels), unconditional)
    guided = GuidedDenoiser(denoiser, 4.0)(x, sigma, labels)
    torch.testing.assert_close(guided, unconditional + 4.0 * (conditional - unconditional))
    assert GuidedDenoiser(denoiser, 4.0).sigma_max == denoiser.sigma_max  # still usable by schedules


def test_generate_at_guidance_1_runs_the_conditional_model_alone():
    from encdiff.samplers import generate

    net = Recorder(5, True)
    labels = torch.tensor([1, 2, 3])
    plain = generate(EDMDenoiser(net), (3, 2, 4, 4), torch.Generator().manual_seed(0), steps=4, class_labels=labels)
    net.calls.clear()
    at_one = generate(EDMDenoiser(net), (3, 2, 4, 4), torch.Generator().manual_seed(0), steps=4, class_labels=labels,
                      guidance_scale=1.0)
    torch.testing.assert_close(at_one, plain, rtol=0, atol=0)
    assert {call[0].shape[0] for call in net.calls} == {3}  # no unconditional half


@pytest.mark.parametrize("num_classes, null_class, match", [(0, False, "unconditional"), (5, False, "null class")])
def test_guidance_needs_a_conditional_model_with_null_class(num_classes, null_class, match):
    with pytest.raises(EncdiffError, match=match):
        GuidedDenoiser(EDMDenoiser(Recorder(num_classes, null_class)), 3.0)


def test_guidance_needs_labels():
    x, sigma = x_and_sigma()
    with pytest.raises(EncdiffError, match="class_labels"):
        GuidedDenoiser(EDMDenoiser(Recorder(5, True)), 3.0)(x, sigma)


# --- the loss ------------------------------------------------------------------------------------

WEIGHTINGS = ["epsilon", "v", "min_snr", "edm", "flow"]


@pytest.mark.parametrize("kind, prediction", IDEAL_CASES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_is_zero_for_a_perfect_denoiser(kind, prediction, weighting):
    """Data that is a single point (s = 0): the ideal denoiser returns it exactly at every sigma."""
    mu = torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(2, 4, 4)
    denoiser = ideal_net(kind, GaussianDenoiser(mu=mu, s=0.0), prediction)
    g = torch.Generator().manual_seed(0)
    x0 = mu.expand(8, 2, 4, 4)
    sigma = torch.logspace(-1.5, 1.5, 8, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    loss = denoising_loss(denoiser, x0, sigma, eps, weighting=weighting)
    assert loss.shape == (8,) and loss.abs().max() < 1e-20


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_of_the_ideal_denoiser_is_the_posterior_variance(weighting):
    """For s > 0 the minimum of E||D - x0||^2 is the posterior variance s^2 sigma^2 / (s^2 + sigma^2),
    and any other denoiser does worse."""
    s = 0.7
    denoiser = GaussianDenoiser(mu=0.3, s=s)
    g = torch.Generator().manual_seed(0)
    B = 6
    x0 = 0.3 + s * torch.randn((B, 4, 32, 32), generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = torch.logspace(-1, 1, B, dtype=torch.float64)
    loss = denoising_loss(denoiser, x0, sigma, eps, weighting=weighting)
    lambda_ = {"epsilon": 1 / sigma**2, "v": 1 + 1 / sigma**2, "min_snr": (1 / sigma**2).clamp(max=5.0),
               "edm": loss_weight_edm(sigma), "flow": (1 + sigma) ** 2 / sigma**2}[weighting]
    torch.testing.assert_close(loss, lambda_ * s**2 * sigma**2 / (s**2 + sigma**2), rtol=0.05, atol=0)
    worse = GaussianDenoiser(mu=0.3, s=s * 1.2)
    assert (denoising_loss(worse, x0, sigma, eps, weighting=weighting) > loss).all()


def test_epsilon_and_v_weightings_are_the_familiar_mse_losses():
    """lambda = 1/sigma^2 makes the x0 loss the DDPM eps-MSE; 1 + 1/sigma^2 the v-MSE; min-SNR the diffusers form."""
    x0, sigma = x_and_sigma()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha_bar = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    for prediction, target in [("epsilon", eps), ("v", alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0)]:
        net = Recorder()
        denoiser = VPDenoiser(net, alpha_bars_linear(), prediction)
        loss = denoising_loss(denoiser, x0, sigma, eps, weighting=prediction)
        torch.testing.assert_close(net.calls[-1][0], x_t)
        mse = (net(x_t, net.calls[-1][1]) - target).square().flatten(1).mean(1)
        torch.testing.assert_close(loss, mse)
        snr = 1 / sigma**2
        min_snr = denoising_loss(denoiser, x0, sigma, eps, weighting="min_snr", gamma=5.0)
        diffusers_weight = snr.clamp(max=5.0) / (snr if prediction == "epsilon" else snr + 1)
        torch.testing.assert_close(min_snr, diffusers_weight * mse)


def test_edm_weighting_is_the_unit_weight_loss_on_the_network_output():
    """lambda(sigma) = 1/c_out^2 (EDM eq. 8 -> Table 1): the loss is || F - (x0 - c_skip x)/c_out ||^2."""
    x0, sigma = x_and_sigma()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = Recorder()
    denoiser = EDMDenoiser(net)
    loss = denoising_loss(denoiser, x0, sigma, eps, weighting="edm")
    c_skip, c_out, _ = (c.reshape(-1, 1, 1, 1) for c in denoiser.scalings(sigma))
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    target = (x0 - c_skip * x) / c_out
    torch.testing.assert_close(loss, (net(*net.calls[-1][:2]) - target).square().flatten(1).mean(1))


def test_flow_sees_the_linear_interpolant_and_its_loss_is_the_velocity_mse():
    """Rectified flow / SD3: the network sees z_t = (1 - t) x0 + t eps with t = sigma / (1 + sigma), D = z_t - t F,
    and weighting "flow" makes the x0 loss the conditional flow-matching loss || F - (eps - x0) ||^2."""
    x0, sigma = x_and_sigma()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = Recorder()
    denoiser = FlowDenoiser(net)
    loss = denoising_loss(denoiser, x0, sigma, eps, weighting="flow")
    z, c_noise, _ = net.calls[-1]
    t = (sigma / (1 + sigma)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(z, (1 - t) * x0 + t * eps)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    velocity = net(z, c_noise)
    torch.testing.assert_close(denoiser(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma), z - t * velocity)
    torch.testing.assert_close(loss, (velocity - (eps - x0)).square().flatten(1).mean(1))
    # SD3's logit-normal t is the lognormal sigma: logit(t) = ln(sigma)
    torch.testing.assert_close(torch.logit(t.reshape(-1)), sigma.log())


def test_min_snr_clamps_at_gamma():
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    assert loss_weight_min_snr(sigma, gamma=5.0).tolist() == pytest.approx([5.0, 1.0, 0.01])


@pytest.mark.parametrize(
    "noise_level, weighting", [("uniform_t", "epsilon"), ("uniform_t", "min_snr"), ("lognormal", "edm")]
)
def test_training_loss_reproduces_with_the_seed_for_latents_and_labels(noise_level, weighting):
    net = Recorder(10, True)
    denoiser = VPDenoiser(net, alpha_bars_scaled_linear(), "v") if noise_level == "uniform_t" else EDMDenoiser(net)
    latents = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9, 2])

    def loss(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return training_loss(denoiser, latents, g, labels, noise_level, weighting, **kw)

    assert loss(1) == loss(1) and loss(1) != loss(2) and loss(1).ndim == 0 and torch.isfinite(loss(1))
    unconditional = Recorder()
    denoiser.net = unconditional
    denoiser.num_classes, denoiser.null_class = 0, False
    g = torch.Generator().manual_seed(1)
    assert torch.isfinite(training_loss(denoiser, latents, g, None, noise_level, weighting))


def test_noise_level_distributions():
    g = torch.Generator().manual_seed(0)
    vp = VPDenoiser(Recorder(), alpha_bars_linear())
    sigma = NOISE_LEVELS["uniform_t"](vp, 20000, g)
    t = vp.sigma_to_t(sigma)
    assert torch.equal(t, t.round()) and t.min() == 0 and t.max() == 999 and abs(t.mean().item() - 499.5) < 10
    sigma = NOISE_LEVELS["lognormal"](vp, 20000, g)
    assert abs(sigma.log().mean().item() + 1.2) < 0.03 and abs(sigma.log().std().item() - 1.2) < 0.03


def test_label_dropout_uses_the_null_class_at_the_given_rate():
    net = Recorder(10, True)
    denoiser = VPDenoiser(net, alpha_bars_linear())
    labels = torch.zeros(4000, dtype=torch.long)
    training_loss(denoiser, torch.zeros((4000, 1, 2, 2)), torch.Generator().manual_seed(0), labels, label_dropout=0.25)
    seen = net.calls[-1][2]
    assert set(seen.tolist()) == {0, 10} and abs((seen == 10).float().mean().item() - 0.25) < 0.03


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_level="uniform"), "unknown noise level 'uniform'; valid: uniform_t, lognormal"),
        (dict(weighting="snr"), "unknown loss weighting 'snr'; valid: epsilon, v, min_snr, edm, flow"),
        (dict(gama=5.0), r"unknown loss option\(s\) \['gama'\]"),
        (dict(label_dropout=0.1), "label_dropout needs class_labels"),
    ],
)
def test_training_loss_bad_input(kwargs, match):
    denoiser = VPDenoiser(Recorder(), alpha_bars_linear())
    with pytest.raises(EncdiffError, match=match):
        training_loss(denoiser, torch.zeros((2, 1, 2, 2)), torch.Generator(), **kwargs)


class NoiseSpy:
    """A denoiser-like callable that returns zeros and keeps the noise each call was given: eps = (x - x0) / sigma."""

    def __init__(self, x0):
        self.x0, self.eps, self.sigma = x0, None, None

    def __call__(self, x, sigma, class_labels=None):
        self.sigma = sigma
        self.eps = (x - self.x0) / sigma.reshape(-1, *[1] * (x.ndim - 1))
        return torch.zeros_like(x)


def drawn_noise(x0, seed, **kw):
    spy = NoiseSpy(x0)
    training_loss(spy, x0, torch.Generator().manual_seed(seed), noise_level="lognormal", **kw)
    return spy.eps


def test_plain_noise_is_drawn_as_before_the_noise_candidates_option():
    """One candidate is the Gaussian draw right after the noise levels, in float32: runs and checkpoints written
    before the option existed resume on the same random stream."""
    x0 = torch.randn((6, 2, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    NOISE_LEVELS["lognormal"](None, 6, g)
    expected = torch.randn((6, 2, 4, 4), generator=g, dtype=torch.float32).double()
    torch.testing.assert_close(drawn_noise(x0, 3), expected)
    torch.testing.assert_close(drawn_noise(x0, 3, noise_candidates=1), expected)


def test_noise_candidates_keep_each_images_nearest_draw():
    """Immiscible Diffusion (KNN): of k draws per image, made right after the noise levels, the nearest is kept."""
    x0 = torch.randn((6, 2, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    NOISE_LEVELS["lognormal"](None, 6, g)
    candidates = torch.randn((6, 4, 2, 4, 4), generator=g, dtype=torch.float32).double()
    distances = (candidates - x0.unsqueeze(1)).square().sum((2, 3, 4))
    expected = candidates[torch.arange(6), distances.argmin(1)]
    assert len(set(distances.argmin(1).tolist())) > 1  # not always the first: the choice is per image
    torch.testing.assert_close(drawn_noise(x0, 3, noise_candidates=4), expected)
    torch.testing.assert_close(nearest_noise(x0, candidates), expected)


def test_more_noise_candidates_bring_the_noise_nearer_the_images_and_shorten_it_a_little():
    x0 = 0.5 * torch.randn((256, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def mean_distance(eps):
        return (eps - x0).square().flatten(1).sum(1).mean().item()

    plain, k4, k16 = (drawn_noise(x0, 1, noise_candidates=k) for k in (1, 4, 16))
    assert mean_distance(k16) < mean_distance(k4) < mean_distance(plain)
    # |x0 - eps|^2 includes |eps|^2, so the nearest draw is also a shorter one: the noise's variance falls below 1
    # as k grows (nearest_noise's docstring), by a few per cent at these k
    assert 0.85 < k16.var().item() < k4.var().item() < plain.var().item() < 1.05


def test_noise_candidates_split_over_processes_equal_one_process():
    """Each process draws the global batch's candidates and chooses for its own rows (rank::world_size), so the
    noise of two processes interleaved is the noise of one process with the whole batch."""
    x0 = torch.randn((8, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    whole = drawn_noise(x0, 7, noise_candidates=5)
    parts = [drawn_noise(x0[rank::2], 7, noise_candidates=5, shard=(rank, 2)) for rank in (0, 1)]
    torch.testing.assert_close(torch.stack(parts, 1).flatten(0, 1), whole)


@pytest.mark.parametrize("k", [0, -2, 2.0, True])
def test_noise_candidates_must_be_a_positive_integer(k):
    with pytest.raises(EncdiffError, match=f"noise_candidates {k!r}: expected an integer >= 1"):
        drawn_noise(torch.zeros((2, 1, 2, 2)), 0, noise_candidates=k)


def test_nearest_noise_refuses_candidates_of_another_shape():
    with pytest.raises(EncdiffError, match=r"noise candidates of shape \(2, 3, 1, 4, 4\) do not match images of "
                                           r"shape \(2, 1, 2, 2\)"):
        nearest_noise(torch.zeros((2, 1, 2, 2)), torch.zeros((2, 3, 1, 4, 4)))


def test_uniform_t_needs_a_discrete_model():
    with pytest.raises(EncdiffError, match="'uniform_t' needs a discrete"):
        training_loss(EDMDenoiser(Recorder()), torch.zeros((2, 1, 2, 2)), torch.Generator())


def test_gaussian_reference_solves_the_ode():
    """The closed-form PF-ODE solution satisfies dx/dsigma = (x - D)/sigma (checked by finite differences)."""
    gaussian = GaussianDenoiser(mu=0.3, s=0.7)
    x = torch.tensor([[[[2.0]]]], dtype=torch.float64)
    sigma, h = 1.3, 1e-6
    d_numeric = (gaussian.ode_solution(x, sigma, sigma + h) - gaussian.ode_solution(x, sigma, sigma - h)) / (2 * h)
    torch.testing.assert_close(d_numeric, (x - gaussian(x, sigma)) / sigma)
    assert math.isclose(gaussian.ode_solution(x, sigma, sigma).item(), 2.0)
