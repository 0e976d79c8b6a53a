"""The autoencoder's training objective: reconstruction terms that keep detail and a patch discriminator.

- Reconstruction: L1 or L2, plus optionally 1 - SSIM (Wang et al. 2004, "Image Quality Assessment: From Error
  Visibility to Structural Similarity", eq. 13) and the focal frequency loss (Jiang et al. 2021, "Focal Frequency
  Loss for Image Reconstruction and Synthesis", eqs. 2-5); for RGBA images the alpha channel may weigh more than a
  colour channel in the first two, and the pixels at alpha's edges more than the rest in the first.
- Adversarial: a PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional
  Adversarial Networks", sec. 3.2.2) trained with the hinge loss (Lim & Ye 2017), its generator term weighted
  adaptively by the ratio of gradient norms at the decoder's last layer (Esser et al. 2021, "Taming Transformers
  for High-Resolution Image Synthesis", eq. 7), as latent diffusion's autoencoders are (Rombach et al. 2022).
- Perceptual: feature matching in the discriminator's own layers (Wang et al. 2018, "pix2pixHD", eq. 4).

Nothing here touches encdiff's evaluation feature net: training against the network that measures FID would make
every FID the autoencoder is measured by meaningless (tests/test_autoencoder_loss.py guards this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import MAX_SIZE, EncdiffError, check_int, lookup
from .layers import GroupNorm

RECON_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}  # TrainConfig.recon_loss


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3  # image channels
    channels: int = 64  # channels of the first layer; doubled at every further stride-2 layer (capped at 8x)
    layers: int = 2  # layers after the first (the last at stride 1): 2 -> 34-pixel patches, 3 -> 70 (pix2pix)
    norm_num_groups: int = 16  # GroupNorm groups: per-sample statistics, so DDP needs no synchronised BatchNorm

    def __post_init__(self):
        for name in ("in_channels", "channels", "layers", "norm_num_groups"):
            check_int(getattr(self, name), name, maximum=MAX_SIZE)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a fully convolutional net giving one real/fake logit per overlapping image patch
    (32 x 32 input, 2 layers: a 6 x 6 grid of logits, each seeing a 34-pixel receptive field)."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, config.layers + 1):
            out = config.channels * min(2 ** i, 8)
            # the last of these keeps the resolution (stride 1), as in pix2pix; no bias before a norm that
            # removes it (its gradient would be rounding noise, which Adam amplifies to full-size steps)
            layers += [nn.Conv2d(c, out, 4, 2 if i < config.layers else 1, 1, bias=False),
                       GroupNorm(min(config.norm_num_groups, out), out), nn.LeakyReLU(0.2)]
            c = out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits (B, 1, h, w); with `features`, also the activation after every LeakyReLU."""
        taps = []
        h = x
        for layer in self.main:
            h = layer(h)
            if isinstance(layer, nn.LeakyReLU):
                taps.append(h)
        return (h, taps) if features else h


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11,
         per_channel: bool = False) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004, eq. 13, Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03),
    differentiable; images in [-1, 1] by default (data_range 2). Reflection-padded windows centred on every pixel,
    as torchmetrics computes the SSIM that `encdiff eval` reports. `per_channel`: (B, C), one mean per channel."""
    with torch.autocast(x.device.type, enabled=False):  # the variances are small differences of large terms
        return _ssim(x.float(), y.float(), data_range, window, per_channel)


def _ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int, per_channel: bool = False) -> torch.Tensor:
    B, C, H, W = x.shape
    pad = (window - 1) // 2
    kernel = gaussian_window(window).to(x.device)[None, None].expand(C, 1, window, window)
    blur = lambda t: F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), kernel, groups=C)
    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x.square()).clamp_min(0.0)
    var_y = (blur(y * y) - mu_y.square()).clamp_min(0.0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.mean(dim=(2, 3)) if per_channel else s.mean(dim=(1, 2, 3))


def focal_frequency_loss(reconstruction: torch.Tensor, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Focal frequency loss (Jiang et al. 2021): the squared distance of the 2-D spectra (eq. 2-3), each frequency
    weighted by its own distance to the power alpha, normalised to [0, 1] per image and channel and not
    differentiated through (eq. 4-5), so the hard (usually high) frequencies get the attention."""
    with torch.autocast(reconstruction.device.type, enabled=False):
        # orthonormal: Parseval holds, so the scale matches a pixel-space L2
        difference = torch.fft.fft2(reconstruction.float() - target.float(), norm="ortho")  # linear: one FFT
    distance = difference.real.square() + difference.imag.square()  # B, C, H, W
    weight = distance.detach().sqrt() ** alpha
    weight = weight / weight.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (weight * distance).mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_rec))]) (Lim & Ye 2017; the 0.5 as in taming)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_grad: torch.Tensor, adv_grad: torch.Tensor, delta: float = 1e-4,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta) (Esser et al. 2021, eq. 7), clamped as in
    taming, from the gradients at the decoder's last layer G_L."""
    return (rec_grad.norm() / (adv_grad.norm() + delta)).clamp(0.0, max_weight).detach()


def check_alpha_weight(alpha_weight: float, channels: int, name: str = "alpha_weight",
                       what: str = "it weighs the fourth channel of RGBA") -> None:
    """An alpha weight other than 1 needs images with alpha: refused, not ignored, for 1- and 3-channel runs."""
    if alpha_weight != 1.0 and channels != 4:
        raise EncdiffError(f"{name} {alpha_weight}: the images have {channels} channel"
                           f"{'s' if channels != 1 else ''}, no alpha ({what})")


def check_alpha_weights(alpha_weight: float, alpha_edge_weight: float, channels: int) -> None:
    """Both RGBA weights of the objective, checked against the run's channel count."""
    check_alpha_weight(alpha_weight, channels)
    check_alpha_weight(alpha_edge_weight, channels, "alpha_edge_weight", "it weighs the pixels at alpha's edges")


def alpha_edges(alpha: torch.Tensor) -> torch.Tensor:
    """Where alpha has an edge: the pixels whose 3 x 3 neighbourhood holds more than one alpha value (B, 1, H, W,
    bool). That is the anti-aliased contour of a transparent image with the pixel on either side of it, where a
    reconstruction's misplaced or softened outline lies; flat regions, transparent or opaque, are never in it."""
    highest = F.max_pool2d(alpha, 3, stride=1, padding=1)
    lowest = -F.max_pool2d(-alpha, 3, stride=1, padding=1)
    return highest > lowest


class AutoencoderObjective:
    """The stage-1 loss for one batch: reconstruction terms, KL, and where asked (`adversarial`: the run decides
    from its config's `adv_start`) the adversarial and feature-matching terms plus the discriminator's own loss.

    `loss` returns one scalar whose gradient trains both networks at once: the discriminator's parameters
    receive only the gradient of its hinge loss (reconstructions are detached for it, and the generator's
    terms see its parameters as constants), the autoencoder's only that of its own terms.
    """

    def __init__(self, *, recon_loss: str, kl_weight: float, ssim_weight: float, fft_weight: float,
                 adv_weight: float, fm_weight: float, discriminator: PatchDiscriminator | None,
                 last_layer: torch.Tensor, all_reduce=None, alpha_weight: float = 1.0, channels: int = 3,
                 alpha_edge_weight: float = 1.0):
        self.recon = lookup(RECON_LOSSES, recon_loss, "reconstruction loss")
        check_alpha_weights(alpha_weight, alpha_edge_weight, channels)
        # RGBA: the alpha channel's weight in the L1/L2 and SSIM terms against each colour channel's 1. Alpha is
        # one channel of four, yet every error in it shows as a halo or a hole on any background (issue 24).
        self.alpha_weight = alpha_weight
        # RGBA: the weight of the pixels at alpha's edges (`alpha_edges`) in the L1/L2 term, every channel, against
        # 1 elsewhere: on emoji64 94 % of the alpha error lay on the 12 % of pixels with partial alpha, and the
        # colour error there was twice that on opaque pixels. Measured (issue 24, BENCHMARKS): W = 4 gained nothing
        # at 409 steps; what held those edges back was the GAN (no GAN at f = 4 since: alpha 28.6 -> 33.3 dB).
        self.alpha_edge_weight = alpha_edge_weight
        self.kl_weight, self.ssim_weight, self.fft_weight = kl_weight, ssim_weight, fft_weight
        self.adv_weight, self.fm_weight = adv_weight, fm_weight
        self.discriminator = discriminator
        self.last_layer = last_layer
        # Averages a tensor over ranks: the adaptive weight must be the one a single process with the whole
        # global batch would compute, so its gradients are averaged before their norms are taken.
        self.all_reduce = all_reduce or (lambda t: t)

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-channel weights (1, 1, 1, alpha_weight) for RGBA images, scaled so that 1 is the plain mean over
        channels; None where every channel weighs the same (the plain mean, bit for bit as before)."""
        if x.shape[1] != 4 or self.alpha_weight == 1.0:
            return None
        return torch.tensor([1.0, 1.0, 1.0, self.alpha_weight], device=x.device)

    def loss(self, x: torch.Tensor, reconstruction: torch.Tensor, posterior, adversarial: bool,
             discriminator_call: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, its named parts); `adversarial`: whether the GAN terms count at this step (they need a
        discriminator and adv_weight > 0); `discriminator_call` is the (possibly DDP-wrapped) discriminator whose
        gradients are to be synchronised."""
        reconstruction = reconstruction.float()
        weights = self.channel_weights(x)
        edges = x.shape[1] == 4 and self.alpha_edge_weight != 1.0
        if weights is None and not edges:
            parts: dict[str, torch.Tensor] = {"rec": self.recon(reconstruction, x)}
        else:
            distance = self.recon(reconstruction, x, reduction="none")
            if edges:  # W at the edges, 1 elsewhere: the plain loss plus (W - 1) times the edges' share of it
                distance = distance * (1.0 + (self.alpha_edge_weight - 1.0) * alpha_edges(x[:, 3:]))
            per_channel = distance.mean(dim=(0, 2, 3))
            parts = {"rec": per_channel.mean() if weights is None else (weights * per_channel).mean()}
        if self.ssim_weight:
            parts["ssim"] = 1.0 - (ssim(reconstruction, x).mean() if weights is None else
                                   (weights * ssim(reconstruction, x, per_channel=True).mean(0)).mean())
        if self.fft_weight:
            parts["fft"] = focal_frequency_loss(reconstruction, x)
        if weights is not None or edges:  # the alpha channel's own (weighted) distance, logged: issue 24's figure
            parts["alpha_rec"] = per_channel[3].detach()
        rec_total = parts["rec"] + self.ssim_weight * parts.get("ssim", 0.0) + self.fft_weight * parts.get("fft", 0.0)
        total = rec_total
        if self.kl_weight and posterior is not None and posterior.mean.requires_grad:
            parts["kl"] = posterior.kl().mean() / posterior.mean[0].numel()
            total = total + self.kl_weight * parts["kl"]
        if not (adversarial and self.discriminator is not None and self.adv_weight > 0):
            return total, parts
        # The generator's view of the discriminator: its parameters as constants (no gradient reaches them).
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        logits_fake, fake_features = functional_call(self.discriminator, frozen, (reconstruction,), {"features": True})
        parts["g_adv"] = -logits_fake.float().mean()
        generator_adv = parts["g_adv"]
        if self.fm_weight:
            with torch.no_grad():
                _, real_features = self.discriminator(x, features=True)
            parts["fm"] = sum(F.l1_loss(f.float(), r.float()) for f, r in zip(fake_features, real_features)) / len(fake_features)
            total = total + self.fm_weight * parts["fm"]
        rec_grad, = torch.autograd.grad(rec_total, self.last_layer, retain_graph=True)
        adv_grad, = torch.autograd.grad(generator_adv, self.last_layer, retain_graph=True)
        parts["adv_lambda"] = adaptive_weight(self.all_reduce(rec_grad), self.all_reduce(adv_grad))
        total = total + self.adv_weight * parts["adv_lambda"] * generator_adv
        # The discriminator's hinge loss, real and reconstructed images in one call (one DDP forward per step).
        call = discriminator_call or self.discriminator
        logits = call(torch.cat([x, reconstruction.detach()])).float()
        logits_real, logits_fake_d = logits.chunk(2)
        parts["d_loss"] = hinge_discriminator_loss(logits_real, logits_fake_d)
        parts["d_real"] = logits_real.mean().detach()
        parts["d_fake"] = logits_fake_d.mean().detach()
        return total + parts["d_loss"], parts

