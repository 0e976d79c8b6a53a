"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", section 3.1 and appendix G): an encoder to a diagonal Gaussian posterior over
a small latent, and a mirrored decoder back to pixels.

The autoencoder owns the latent normalisation (`scaling_factor`, `shift_factor`): `encode` returns
model-ready latents (z - shift) * scale and `decode` undoes it, so callers never see raw latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Pretrained
from .diffusers_format import autoencoder_config_to_diffusers, autoencoder_fields_from_diffusers
from .errors import (MAX_SIZE, EncdiffError, check_bool, check_field, check_int, check_number, check_tuple, is_finite_number,
                     is_flag, is_positive_int)
from .layers import (CHANNELS_LAST, Downsample, GroupNorm, Level, MidBlock, ResnetBlock, SelfAttention, Upsample,
                     norm_silu, run_block)


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # channels per level; each level after the first halves H, W
    attention_levels: tuple[bool, ...] = (False, False, False, False)  # self-attention after every ResNet block at these levels
    layers_per_block: int = 2  # ResNet blocks per level in the encoder (the decoder has one more)
    latent_channels: int = 4  # channels of the latent z
    norm_num_groups: int = 32  # GroupNorm groups; must divide every channel count
    mid_attention: bool = True  # self-attention in the mid blocks
    use_quant_conv: bool = True  # 1x1 conv on (mean, logvar) after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    scaling_factor: float = 1.0  # latents = (z - shift) * scaling_factor: brings latents to unit variance
    shift_factor: tuple[float, ...] | None = None  # per-channel mean of z (None: zero), measured on the data
    sample_size: int = 32  # training image size in pixels (informational)

    def __post_init__(self):
        check_tuple(self.block_out_channels, "block_out_channels", None, is_positive_int)
        check_tuple(self.attention_levels, "attention_levels", len(self.block_out_channels), is_flag)
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                     "sample_size"):
            check_int(getattr(self, name), name, maximum=MAX_SIZE)
        check_field(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "norm_num_groups",
                    self.norm_num_groups, f"a divisor of every block_out_channels value {self.block_out_channels}")
        for name in ("mid_attention", "use_quant_conv", "use_post_quant_conv"):
            check_bool(getattr(self, name), name)
        check_number(self.scaling_factor, "scaling_factor", positive=True)
        if self.shift_factor is not None:
            check_tuple(self.shift_factor, "shift_factor", self.latent_channels, is_finite_number)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in LDM: exp() of a wild log-variance early in training would overflow.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; the standard normal `noise` is drawn from `generator` unless given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over latent elements (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        block = dict(groups=c.norm_num_groups, eps=1e-6)
        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = c.block_out_channels[0]
        for i, (out_channels, attention) in enumerate(zip(c.block_out_channels, c.attention_levels)):
            resnets = [ResnetBlock(channels if j == 0 else out_channels, out_channels, **block)
                       for j in range(c.layers_per_block)]
            attentions = [SelfAttention(out_channels, **block) for _ in resnets] if attention else []
            last = i == len(c.block_out_channels) - 1
            self.down_blocks.append(Level(resnets, attentions, downsample=None if last else Downsample(out_channels, padding=0)))
            channels = out_channels
        self.mid_block = MidBlock(channels, attention=c.mid_attention, **block)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, 2 * c.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(x.contiguous(memory_format=CHANNELS_LAST))
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = run_block(resnet, h, checkpointing=ckpt)
                if level.attentions:
                    h = run_block(level.attentions[j], h, checkpointing=ckpt)
            if level.resample is not None:
                h = level.resample(h)  # B, C, H/2, W/2
        h = self.mid_block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, h))  # B, 2 * latent_channels, h, w


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        block = dict(groups=c.norm_num_groups, eps=1e-6)
        channels = c.block_out_channels[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, channels, 3, padding=1)
        self.mid_block = MidBlock(channels, attention=c.mid_attention, **block)
        self.up_blocks = nn.ModuleList()
        levels = list(zip(c.block_out_channels, c.attention_levels))[::-1]
        for i, (out_channels, attention) in enumerate(levels):
            resnets = [ResnetBlock(channels if j == 0 else out_channels, out_channels, **block)
                       for j in range(c.layers_per_block + 1)]
            attentions = [SelfAttention(out_channels, **block) for _ in resnets] if attention else []
            last = i == len(levels) - 1
            self.up_blocks.append(Level(resnets, attentions, upsample=None if last else Upsample(out_channels)))
            channels = out_channels
        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, c.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.mid_block(self.conv_in(z.contiguous(memory_format=CHANNELS_LAST)))
        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = run_block(resnet, h, checkpointing=ckpt)
                if level.attentions:
                    h = run_block(level.attentions[j], h, checkpointing=ckpt)
            if level.resample is not None:
                h = level.resample(h)  # B, C, 2H, 2W
        return self.conv_out(norm_silu(self.conv_norm_out, h))


class Autoencoder(Pretrained, nn.Module):
    """KL autoencoder. `encode` / `decode` speak normalised latents; `posterior` and `decode_raw`
    expose the raw latent space for training."""

    config_class = AutoencoderConfig
    diffusers_class_name = "AutoencoderKL"
    fields_from_diffusers = staticmethod(autoencoder_fields_from_diffusers)
    diffusers_config = staticmethod(autoencoder_config_to_diffusers)

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for module in (self.encoder, self.decoder, self.encoder.mid_block, self.decoder.mid_block):
            module.gradient_checkpointing = enabled

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) for images in [-1, 1], B x in_channels x H x W, H and W divisible by the downsample factor."""
        self._check_images(images)
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents z -> model-ready latents (z - shift) * scale."""
        if self.config.shift_factor is not None:
            z = z - z.new_tensor(self.config.shift_factor)[:, None, None]
        return z * self.config.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + z.new_tensor(self.config.shift_factor)[:, None, None]
        return z

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents (the posterior mean: deterministic)."""
        return self.normalize(self.posterior(images).mode())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (nominally in [-1, 1]; not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise EncdiffError(f"latents of shape {tuple(latents.shape)}: expected B x {self.config.latent_channels} x h x w")
        images = self.decode_raw(self.denormalize(latents))
        # NaN weights would otherwise give flat grey images and a PSNR of 3 dB, silently (checked when not training).
        if not images.requires_grad and not torch.isfinite(images).all():
            raise EncdiffError("the autoencoder's decoder output contains NaN or inf: its weights are not finite "
                               "(a diverged or damaged model?)" if torch.isfinite(latents).all() else
                               "latents given to the decoder contain NaN or inf")
        return images

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True, noise: torch.Tensor | None = None,
                latent_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: reconstruction from a posterior sample (or its mode), and the posterior. `latent_noise`, in
        the normalised latents' units (those the U-Net sees), is added to the sample before it is decoded."""
        posterior = self.posterior(images)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        if latent_noise is not None:
            z = z + latent_noise.to(z) / self.config.scaling_factor
        return self.decode_raw(z), posterior

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise EncdiffError(f"images of shape {tuple(images.shape)}: expected B x {self.config.in_channels} x H x W "
                               f"with H and W divisible by {f}")

class IdentityAutoencoder(nn.Module):
    """The autoencoder interface for pixel-space diffusion: latents are the images themselves."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels
        self.downsample_factor = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
