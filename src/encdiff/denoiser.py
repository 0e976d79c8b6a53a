"""The denoiser D(x; sigma): a backbone network plus its parameterisation, and the training objective.

Notation (EDM, Karras et al. 2022, Table 1; used throughout this module and samplers.py):

    x0           clean data (pixels or latents)
    eps          standard normal noise
    sigma        noise level; the noisy input is x = x0 + sigma * eps (variance-exploding form)
    alpha_bar    VP signal fraction; x_t = sqrt(alpha_bar) * (x0 + sigma * eps), alpha_bar = 1 / (1 + sigma^2)
    t            discrete training timestep 0 .. T-1 of a VP model, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    F            the raw backbone network, F(c_in * x, c_noise)
    c_skip, c_out, c_in, c_noise
                 preconditioning: D(x; sigma) = c_skip * x + c_out * F(c_in * x, c_noise)   (EDM eq. 7)
    denoised     D(x; sigma), the estimate of x0
    lambda_      loss weight lambda(sigma) of the x0-space loss   (EDM Table 1, eq. 8)
    sigma_data   standard deviation of the data (EDM: 0.5)

The backbone knows nothing of schedules: it receives the scaled input and c_noise (the timestep t for
a VP model, ln(sigma)/4 for EDM) and returns a tensor of the input's shape. Samplers and losses only
ever call ``denoiser(x, sigma, class_labels)``.
"""

import inspect
import math

import torch

from encdiff.errors import EncdiffError, count, lookup
from encdiff.schedules import vp_sigmas


def _as_batch(sigma, x):
    """sigma as a float64 (B,) tensor on x's device: a scalar applies to the whole batch."""
    B = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(B)
    if sigma.shape != (B,):
        raise EncdiffError(f"sigma must be a scalar or have shape ({B},), got shape {tuple(sigma.shape)}")
    return sigma


def _per_image(c, x):
    """A (B,) coefficient reshaped to broadcast over an NCHW x, in x's dtype."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7) around any backbone F.

    Subclasses define the preconditioning (``scalings``, ``c_noise``) and the noise range
    (``sigma_min``, ``sigma_max``). The class-label contract of the backbone is read from
    ``net.config.num_classes`` and ``net.config.null_class`` (absent config: unconditional).
    """

    sigma_min: float
    sigma_max: float
    num_train_timesteps = None  # continuous models have no discrete grid

    def __init__(self, net):
        super().__init__()
        self.net = net
        config = getattr(net, "config", None)
        self.num_classes = int(getattr(config, "num_classes", 0) or 0)
        self.null_class = bool(getattr(config, "null_class", False)) and self.num_classes > 0

    def scalings(self, sigma):
        """(c_skip, c_out, c_in) as float64 tensors of sigma's shape."""
        raise NotImplementedError

    def c_noise(self, sigma):
        """The noise label the backbone was trained with."""
        raise NotImplementedError

    def check_class_labels(self, class_labels, B):
        """Validate labels against the backbone; the null class (index num_classes) is allowed if it has one."""
        if class_labels is None:
            if self.num_classes > 0 and not self.null_class:
                raise EncdiffError(
                    f"class_labels are required: the model is conditional on {count(self.num_classes, 'class', 'classes')} "
                    "and has no null class"
                )
            return None
        if self.num_classes == 0:
            raise EncdiffError("class_labels were given, but the model is unconditional (num_classes = 0)")
        class_labels = torch.as_tensor(class_labels)
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise EncdiffError(f"class_labels must be integer indices, got dtype {class_labels.dtype}")
        if class_labels.shape != (B,):
            raise EncdiffError(f"class_labels must have shape ({B},), got {tuple(class_labels.shape)}")
        # Checked here so the message names the valid range, not an index error (or CUDA assert) in the embedding.
        highest = self.num_classes if self.null_class else self.num_classes - 1
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > highest):
            raise EncdiffError(
                f"class_labels out of range: got values in [{int(class_labels.min())}, {int(class_labels.max())}], "
                f"valid 0..{highest}" + (f" ({self.num_classes} = no class)" if self.null_class else "")
            )
        return class_labels

    evaluations = 0  # images passed through the network since the count was last reset (NFE x images)

    def forward(self, x, sigma, class_labels=None, net=None, return_logvar=False):
        """D(x; sigma). `net` replaces the backbone for this call (the trainer passes its DDP wrapper, so the
        gradients are synchronised); `return_logvar` also returns the backbone's uncertainty u(sigma) (EDM2 eq. 8)."""
        B = x.shape[0]
        self.evaluations += B
        net = self.net if net is None else net
        sigma = _as_batch(sigma, x)
        class_labels = self.check_class_labels(class_labels, B)
        c_skip, c_out, c_in = self.scalings(sigma)
        # The only cast to the network's precision; the sampler's x and the sigma grid stay as they are.
        params = net.parameters() if isinstance(net, torch.nn.Module) else ()
        net_dtype = next((p.dtype for p in params), x.dtype)
        extra = {"return_logvar": True} if return_logvar else {}
        F = net((_per_image(c_in, x) * x).to(net_dtype), self.c_noise(sigma).to(net_dtype), class_labels, **extra)
        logvar = None
        if return_logvar:
            F, logvar = F
        # A NaN here would otherwise propagate through every later step into a silently black image. Not
        # checked while training (F needs grad): the loop checks its loss once per step, without this GPU sync.
        if not F.requires_grad and not torch.isfinite(F).all():
            raise EncdiffError(
                f"model output contains NaN or inf at sigma in [{sigma.min().item():.4g}, {sigma.max().item():.4g}]"
            )
        denoised = _per_image(c_skip, x) * x + _per_image(c_out, x) * F.to(x.dtype)
        return (denoised, logvar) if return_logvar else denoised


PREDICTIONS = ("epsilon", "v", "x0")  # what a VP network predicts (VPDenoiser.prediction)


class VPDenoiser(Denoiser):
    """A discrete variance-preserving (DDPM) model with eps-, v- or x0-prediction, in sigma space.

    The backbone sees the VP-scaled input x_t = x / sqrt(1 + sigma^2) and the timestep t (EDM Table 1,
    "VP" column). sigma -> t interpolates linearly in log(sigma) between the training levels, so any
    sigma in [sigma_min, sigma_max] maps to a (fractional) timestep and grid sigmas to integers;
    ``quantize=True`` rounds t to the nearest training step (for models only trained on integer t).
    """

    def __init__(self, net, alpha_bars, prediction="epsilon", quantize=False):
        super().__init__(net)
        lookup(dict.fromkeys(PREDICTIONS), prediction, "prediction")
        self.prediction = prediction
        self.quantize = quantize
        alpha_bars = torch.as_tensor(alpha_bars, dtype=torch.float64)
        if alpha_bars.ndim != 1 or len(alpha_bars) < 2 or not ((alpha_bars > 0) & (alpha_bars < 1)).all():
            raise EncdiffError("alpha_bars must be a 1-D schedule of at least 2 values strictly inside (0, 1)")
        if not (alpha_bars[1:] < alpha_bars[:-1]).all():
            raise EncdiffError("alpha_bars must decrease strictly with the timestep")
        self.register_buffer("train_sigmas", vp_sigmas(alpha_bars), persistent=False)
        self.num_train_timesteps = len(alpha_bars)
        self.sigma_min = self.train_sigmas[0].item()
        self.sigma_max = self.train_sigmas[-1].item()

    def t_to_sigma(self, t):
        """sigma(t), linear in log(sigma) between integer timesteps (exact on the training grid)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.train_sigmas.device)
        t = t.clamp(0, self.num_train_timesteps - 1)
        # Interpolating log(sigma), not sigma, makes this the exact inverse of diffusers' _sigma_to_t, so a
        # Karras sigma maps to the same fractional timestep; clamping `low` keeps t = T-1 inside the table.
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        log_sigmas = self.train_sigmas.log()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def sigma_to_t(self, sigma):
        """The inverse of ``t_to_sigma``; sigma outside the training range clamps to t = 0 or T-1."""
        log_sigmas = self.train_sigmas.to(torch.as_tensor(sigma).device).log()
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=log_sigmas.device).log()
        # train_sigmas increase with t, so searchsorted finds the interval [low, low + 1] holding sigma.
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_train_timesteps - 2)
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
        t = low + w
        return t.round() if self.quantize else t

    def scalings(self, sigma):
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.prediction == "epsilon":
            # x0 = x - sigma * eps  (DDPM eq. 15 divided by sqrt(alpha_bar))
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction == "v":
            # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0  (Salimans & Ho 2022, sec. 4), solved for x0
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def c_noise(self, sigma):
        return self.sigma_to_t(sigma)


class ContinuousDenoiser(Denoiser):
    """A backbone trained at any sigma in a range, labelled by EDM's c_noise = ln(sigma) / 4 (Table 1); subclasses
    give the preconditioning."""

    def __init__(self, net, sigma_min=0.002, sigma_max=80.0):
        super().__init__(net)
        if not 0 < sigma_min < sigma_max:
            raise EncdiffError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def c_noise(self, sigma):
        return sigma.log() / 4


class EDMDenoiser(ContinuousDenoiser):
    """EDM preconditioning (Karras et al. 2022, eq. 7, Table 1, App. B.6) for a continuous-sigma backbone."""

    def __init__(self, net, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0):
        super().__init__(net, sigma_min, sigma_max)
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        # Unit-variance input and training target at every sigma (EDM Appendix B.6).
        sigma_data = self.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in


class FlowDenoiser(ContinuousDenoiser):
    """Flow matching with the linear interpolant (rectified flow: Liu et al. 2023, "Flow Straight and Fast";
    Lipman et al. 2023, "Flow Matching for Generative Modeling"; the objective of Stable Diffusion 3, Esser et al.
    2024), written as a denoiser in sigma space so that every sampler, guidance and editing path applies unchanged.

    The interpolant z_t = (1 - t) x0 + t eps (Esser et al. eq. 1 with a_t = 1 - t, b_t = t) is the sigma-space
    x = x0 + sigma eps scaled by 1 / (1 + sigma), with sigma = t / (1 - t). The network predicts the velocity
    v = dz_t/dt = eps - x0 from z_t, so x0 = z_t - t v, that is

        D(x; sigma) = x / (1 + sigma) - sigma / (1 + sigma) * F(x / (1 + sigma), c_noise):
        c_skip = c_in = 1 / (1 + sigma),  c_out = -sigma / (1 + sigma)   (EDM eq. 7's form).

    The conditional flow-matching loss ||F - (eps - x0)||^2 is (1 + sigma)^2 / sigma^2 ||D - x0||^2 in x0 space
    (`loss_weight_flow`), and SD3's logit-normal t (logit t ~ N(m, s^2), sec. 3.1) is ln(sigma) ~ N(m, s^2), the
    "lognormal" noise level, since ln(t / (1 - t)) = ln(sigma). The noise label is EDM's ln(sigma) / 4 rather than
    t: any one-to-one label names the level, and this one is the range every backbone's embedding was built for.
    """

    def scalings(self, sigma):
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in


class ConsistencyDenoiser(EDMDenoiser):
    """A consistency function f(x; sigma) (Song et al. 2023, eq. 5 and App. C), EDM's preconditioning with the
    boundary moved to sigma_min:

        c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
        c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)

    so f(x; sigma_min) = x exactly (c_skip = 1, c_out = 0) and, for sigma >> sigma_min, f has the EDM denoiser's
    coefficients: a student initialised with its teacher's network starts as the teacher's D (ECT, Geng et al.
    2024, sec. 3). c_in and c_noise are EDM's, so the teacher's weights mean the same thing to it.
    """

    def scalings(self, sigma):
        sigma_data, shifted = self.sigma_data, sigma - self.sigma_min
        c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
        c_out = shifted * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in


class FlowConsistencyDenoiser(FlowDenoiser):
    """A consistency function (Song et al. 2023, eq. 5) distilled from a flow-matching teacher: FlowDenoiser's
    preconditioning with the boundary moved to sigma_min, as ConsistencyDenoiser moves EDM's. With
    s = sigma - sigma_min,

        c_skip = 1 / (1 + s),  c_out = -s / (1 + s),  c_in = 1 / (1 + sigma),  c_noise = ln(sigma) / 4

    so f(x; sigma_min) = x exactly, and for sigma >> sigma_min f has the teacher's coefficients while c_in and
    c_noise are exactly the teacher's: its velocity network, copied into the student, starts as the teacher's D
    (ECT, Geng et al. 2024, sec. 3).
    """

    def scalings(self, sigma):
        shifted = sigma - self.sigma_min
        return 1 / (1 + shifted), -shifted / (1 + shifted), 1 / (1 + sigma)


class GuidedDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with guidance_scale = 1 + w), in one batched forward pass:

        D_guided = D(x; sigma, null) + w * (D(x; sigma, c) - D(x; sigma, null))

    w = 1 is the conditional model, w = 0 the unconditional one. With a `guide` denoiser instead, autoguidance
    (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2):

        D_guided = D_guide(x; sigma, c) + w * (D(x; sigma, c) - D_guide(x; sigma, c))

    where the guide is a smaller, shorter-trained model of the same data and latent space: the difference pushes away
    from the errors the weaker model makes, without the unconditional model's pull towards class prototypes, so it
    works for unconditional models too (c is then absent for both).

    With an `interval` (sigma_lo, sigma_hi), guidance applies only where sigma_lo < sigma <= sigma_hi and the main
    model alone runs elsewhere, one evaluation instead of two (Kynkaenniemi et al. 2024, "Applying Guidance in a
    Limited Interval Improves Sample and Distribution Quality in Diffusion Models", sec. 3): guidance at high noise
    levels pulls every sample of a class towards one layout, and at low ones it adds nothing. Any other attribute
    (sigma range, training grid) is the wrapped denoiser's, so samplers and schedules treat it as a denoiser.
    """

    def __init__(self, denoiser, guidance_scale, interval=None, guide=None):
        if guide is not None:
            if (guide.num_classes, guide.null_class) != (denoiser.num_classes, denoiser.null_class):
                raise EncdiffError(f"the guide is conditional on {count(guide.num_classes, 'class', 'classes')}, the "
                                   f"model on {count(denoiser.num_classes, 'class', 'classes')}: a guide must take the "
                                   "same labels")
        elif denoiser.num_classes == 0:
            raise EncdiffError("classifier-free guidance needs a class-conditional model; this one is unconditional "
                               "(num_classes = 0): autoguidance works for it (a guide model: encdiff train-guide)")
        elif not denoiser.null_class:
            raise EncdiffError("guidance needs a model trained with a null class (config.null_class); this has none")
        if not math.isfinite(guidance_scale):
            raise EncdiffError(f"guidance_scale must be finite, got {guidance_scale}")
        if interval is not None and not (len(interval) == 2 and 0 <= interval[0] <= interval[1]):
            raise EncdiffError(f"guidance interval {interval!r}: expected (sigma_lo, sigma_hi) with 0 <= lo <= hi")
        self.denoiser = denoiser
        self.guide = guide
        self.guidance_scale = guidance_scale
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))

    def __getattr__(self, name):
        return getattr(self.__dict__["denoiser"], name)

    def guided(self, sigma):
        """Where guidance applies: (B,) bool, sigma_lo < sigma <= sigma_hi (everywhere without an interval)."""
        if self.interval is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        return (sigma > self.interval[0]) & (sigma <= self.interval[1])

    def __call__(self, x, sigma, class_labels=None):
        B = x.shape[0]
        if class_labels is None and self.guide is None:
            raise EncdiffError("classifier-free guidance needs class_labels (the class to guide towards)")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device)
        sigma = _as_batch(sigma, x)
        inside = self.guided(sigma)
        if not inside.any():  # outside the interval: the main model, one evaluation
            return self.denoiser(x, sigma, class_labels)
        if self.guide is not None:
            denoised, weak = self.denoiser(x, sigma, class_labels), self.guide(x, sigma, class_labels)
        else:
            # One forward over [conditional; unconditional] halves the passes and keeps both halves' numerics
            # identical.
            null = torch.full_like(class_labels, self.denoiser.num_classes)
            denoised, weak = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                           torch.cat([class_labels, null])).split(B)
        guided = weak + self.guidance_scale * (denoised - weak)
        if inside.all():
            return guided
        return torch.where(_per_image(inside, x).bool(), guided, denoised)  # per-image levels (training)


# ---------------------------------------------------------------------------------------------
# Training objective: denoising score matching in x0 space (EDM eq. 2 weighted by lambda(sigma), i.e. eq. 8)
#   L = E_{sigma, x0, eps} lambda(sigma) || D(x0 + sigma * eps; sigma) - x0 ||^2
# Every classic loss is this with a particular lambda(sigma) and p(sigma).
# ---------------------------------------------------------------------------------------------


def loss_weight_epsilon(sigma):
    """lambda = 1/sigma^2: DDPM's "simple" eps-MSE (Ho et al. 2020, eq. 14), as D - x0 = -sigma (eps_hat - eps)."""
    return 1 / sigma**2


def loss_weight_v(sigma):
    """lambda = 1 + 1/sigma^2: the v-MSE (Salimans & Ho 2022, sec. 4), as ||v_hat - v||^2 = (1 + SNR) ||D - x0||^2."""
    return 1 + 1 / sigma**2


def loss_weight_min_snr(sigma, gamma=5.0):
    """lambda = min(SNR, gamma) with SNR = 1/sigma^2 (Min-SNR-gamma weighting, Hang et al. 2023).

    In x0 space this is the same weight whatever the parameterisation: the paper's min(SNR, gamma)/SNR
    for eps-MSE and min(SNR, gamma)/(SNR + 1) for v-MSE both equal it.
    """
    return (1 / sigma**2).clamp(max=gamma)


def loss_weight_edm(sigma, sigma_data=0.5):
    """lambda = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 = 1/c_out^2 (EDM Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def loss_weight_flow(sigma):
    """lambda = (1 + sigma)^2 / sigma^2 = 1 / t^2: the conditional flow-matching loss ||v_hat - (eps - x0)||^2 (Lipman
    et al. 2023, eq. 23 for the linear path), as x0_hat - x0 = -t (v_hat - v) with t = sigma / (1 + sigma)."""
    return ((1 + sigma) / sigma) ** 2


LOSS_WEIGHTS = {
    "epsilon": loss_weight_epsilon,
    "v": loss_weight_v,
    "min_snr": loss_weight_min_snr,
    "edm": loss_weight_edm,
    "flow": loss_weight_flow,
}


def noise_levels_uniform_t(denoiser, batch_size, generator):
    """t ~ U{0, .., T-1}, sigma = sigma_t (DDPM Algorithm 1, line 3)."""
    if denoiser.num_train_timesteps is None:
        raise EncdiffError("noise level 'uniform_t' needs a discrete (VP) model; use 'lognormal' for continuous ones")
    t = torch.randint(0, denoiser.num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
    return denoiser.train_sigmas[t.to(denoiser.train_sigmas.device)]


def noise_levels_lognormal(denoiser, batch_size, generator, p_mean=-1.2, p_std=1.2):
    """ln(sigma) ~ N(P_mean, P_std^2) (EDM sec. 5, Table 1)."""
    z = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
    log_sigma = p_mean + p_std * z
    return log_sigma.exp()


NOISE_LEVELS = {
    "uniform_t": noise_levels_uniform_t,
    "lognormal": noise_levels_lognormal,
}


def denoising_loss(denoiser, x0, sigma, eps, class_labels=None, weighting="epsilon", net=None, uncertainty=False,
                   **weighting_options):
    """Per-image loss lambda(sigma) * mean || D(x0 + sigma eps; sigma) - x0 ||^2 (EDM eqs. 2 and 8), shape (B,).

    With `uncertainty`, the backbone's learned log-variance u(sigma) weighs it (EDM2 eq. 8, from Kendall & Gal
    2017): lambda(sigma) / exp(u(sigma)) * mean ||D - x0||^2 + u(sigma), which is minimised by u = ln of the weighted
    loss at that sigma, so every noise level contributes about equally. `net` is the network trained (its DDP
    wrapper). Deterministic given (sigma, eps); ``training_loss`` draws them. Works for pixels and latents alike.
    """
    lambda_fn = lookup(LOSS_WEIGHTS, weighting, "loss weighting")
    sigma = _as_batch(sigma, x0)
    # The forward process in sigma space (EDM eq. 2 with s(t) = 1); VP scaling happens inside the denoiser.
    x = x0 + _per_image(sigma, x0) * eps
    lambda_ = lambda_fn(sigma, **weighting_options).to(x0.dtype)
    through = {} if net is None else {"net": net}  # any denoiser-like callable works without a net to pass
    if not uncertainty:
        denoised = denoiser(x, sigma, class_labels, **through)
        return lambda_ * (denoised - x0).square().flatten(1).mean(1)
    denoised, logvar = denoiser(x, sigma, class_labels, return_logvar=True, **through)
    logvar = logvar.to(x0.dtype)
    return lambda_ / logvar.exp() * (denoised - x0).square().flatten(1).mean(1) + logvar


def nearest_noise(x0, candidates):
    """Of `k` Gaussian draws per image, the one nearest that image in L2: Immiscible Diffusion's noise assignment
    in its KNN form (Li et al. 2025, "Improved Immiscible Diffusion: Accelerate Diffusion Training by Reducing Its
    Miscibility", which replaces the batch-wide linear assignment of Li et al. 2024, Algorithm 1, by this per-image
    choice). Each image is then noised towards nearby noise, so the noise a region of latent space receives is less
    mixed with other regions' and the denoiser's target is less ambiguous at high sigma.

    The distance |x0 - eps|^2 includes |eps|^2, so the kept draw is also a little shorter than a plain one (its
    variance falls below 1 as k grows, by a few per cent at k = 16 on 256 values): the method's own bias, which the
    sampler's unit-variance starting noise does not share; keep k small.

    x0: (B, ...); candidates: (B, k, ...) -> (B, ...). The choice needs no other image of the batch, so DDP processes
    each choosing for their own rows equal one process with the global batch; the distance is taken in float32.
    """
    if candidates.shape[0] != x0.shape[0] or candidates.shape[2:] != x0.shape[1:]:
        raise EncdiffError(f"noise candidates of shape {tuple(candidates.shape)} do not match images of shape "
                           f"{tuple(x0.shape)}: expected (B, k, ...) with the images' B and shape")
    distance = (candidates.float() - x0.float().unsqueeze(1)).square().flatten(2).sum(2)  # (B, k)
    nearest = distance.argmin(1)
    return candidates[torch.arange(len(candidates), device=candidates.device), nearest]


def drop_labels(class_labels, p, null_label, generator, shard=(0, 1)):
    """Replace each label by the null class with probability p, to train for guidance (Ho & Salimans 2022, Alg. 1)."""
    rank, world_size = shard
    drop = torch.rand(len(class_labels) * world_size, generator=generator, device=generator.device)[rank::world_size] < p
    return torch.where(drop.to(class_labels.device), torch.full_like(class_labels, null_label), class_labels)


def training_loss(
    denoiser, x0, generator, class_labels=None, noise_level="uniform_t", weighting="epsilon", label_dropout=0.0,
    shard=(0, 1), net=None, uncertainty=False, noise_candidates=1, **options,
):
    """Draw sigma, eps (and label dropout) from ``generator`` and return the mean ``denoising_loss``.

    ``noise_candidates`` k > 1 draws k noises per image and keeps the nearest (``nearest_noise``, Immiscible
    Diffusion); k = 1 is plain Gaussian noise, drawn exactly as before the option existed.

    ``options`` go to the noise-level sampler or the weighting, by name (e.g. ``gamma``, ``p_mean``).
    ``shard = (rank, world_size)``: every process draws the randomness of the whole global batch from the
    same generator state and keeps rows rank::world_size (its samples under DistributedSampler), so K
    processes train exactly like one process with the global batch, each with different noise.
    """
    rank, world_size = shard
    sample_sigma = lookup(NOISE_LEVELS, noise_level, "noise level")
    lambda_fn = lookup(LOSS_WEIGHTS, weighting, "loss weighting")
    if label_dropout:
        if class_labels is None or not denoiser.null_class:
            raise EncdiffError("label_dropout needs class_labels and a model with a null class (config.null_class)")
        class_labels = drop_labels(torch.as_tensor(class_labels), label_dropout, denoiser.num_classes, generator, shard)
    # Route each option to whichever of the two functions declares it, and refuse typos.
    level_options = {k: v for k, v in options.items() if k in inspect.signature(sample_sigma).parameters}
    weight_options = {k: v for k, v in options.items() if k in inspect.signature(lambda_fn).parameters}
    if weighting == "edm" and "sigma_data" not in weight_options and hasattr(denoiser, "sigma_data"):
        weight_options["sigma_data"] = denoiser.sigma_data  # the weight must match the preconditioning
    unknown = set(options) - set(level_options) - set(weight_options)
    if unknown:
        raise EncdiffError(
            f"unknown loss option(s) {sorted(unknown)} for noise level {noise_level!r} and weighting {weighting!r}"
        )
    if isinstance(noise_candidates, bool) or not isinstance(noise_candidates, int) or noise_candidates < 1:
        raise EncdiffError(f"noise_candidates {noise_candidates!r}: expected an integer >= 1 (1: plain noise)")
    B = x0.shape[0] * world_size
    sigma = sample_sigma(denoiser, B, generator, **level_options)[rank::world_size]
    # Drawn in float32 like the samplers' noise, so a seed gives the same batch in any training precision.
    k = () if noise_candidates == 1 else (noise_candidates,)
    eps = torch.randn((B, *k, *x0.shape[1:]), generator=generator, device=generator.device, dtype=torch.float32)
    eps = eps[rank::world_size].to(x0.device)
    eps = (eps if noise_candidates == 1 else nearest_noise(x0, eps)).to(x0.dtype)
    return denoising_loss(denoiser, x0, sigma, eps, class_labels, weighting, net=net, uncertainty=uncertainty,
                          **weight_options).mean()


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of Gaussian data x0 ~ N(mu, s^2 I): a reference for testing samplers and losses.

    D(x; sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE
    dx/dsigma = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2) has the closed-form solution
    x(sigma') = mu + (x(sigma) - mu) sqrt((s^2 + sigma'^2) / (s^2 + sigma^2)). mu and s may be tensors
    broadcasting against one image (per-pixel mean and std).
    """

    num_train_timesteps = None
    num_classes = 0
    null_class = False

    def __init__(self, mu=0.0, s=0.5, sigma_min=0.002, sigma_max=80.0):
        super().__init__()
        self.mu, self.s = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def forward(self, x, sigma, class_labels=None):
        sigma = _per_image(_as_batch(sigma, x), x)
        mu, s = self.mu.to(x), self.s.to(x)
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    def ode_solution(self, x, sigma, sigma_next):
        """The exact probability-flow ODE solution from noise level sigma to sigma_next."""
        mu, s = self.mu.to(x), self.s.to(x)
        return mu + (x - mu) * ((s**2 + sigma_next**2) / (s**2 + sigma**2)).sqrt()
