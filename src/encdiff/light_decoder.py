"""A light decoder: latents -> images at a fraction of the full decoder's cost, for fast sampling on a CPU.

The shape of TAESD (Bohan Ollin Boer's "Tiny AutoEncoder for Stable Diffusion"): a soft clamp of the latents, plain
3x3 convolutions with ReLU in residual blocks of three, nearest-neighbour upsampling, no attention and no
normalisation: what CPUs run fast. Unlike TAESD's constant 64 channels, the width halves at each upsampling, as a
convolution's cost grows with the pixels it covers: the default 64/32/16 for f = 4 costs about 31 M multiply-adds per
32x32 image, a fifth of the bundled decoder's 155 M. It reads the same normalised latents as `Autoencoder.decode` and is trained to
match it (and the data) on the frozen encoder's latents (training/light_decoder.py), so it decodes any generator of
that latent space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Pretrained
from .errors import MAX_SIZE, EncdiffError, check_int, check_tuple, is_positive_int


@dataclass(frozen=True)
class LightDecoderConfig:
    latent_channels: int = 16  # the autoencoder's latent channels
    out_channels: int = 3  # image channels (1, 3 or 4)
    block_out_channels: tuple[int, ...] = (64, 32, 16)  # width at the latents' resolution, then after each 2x
    # nearest-neighbour upsampling: log2(f) + 1 entries for the autoencoder's downsampling factor f
    blocks: int = 1  # residual blocks at each resolution (TAESD: 3)
    sample_size: int = 32  # image size trained at (informational: the network is convolutional)

    def __post_init__(self):
        for name in ("latent_channels", "out_channels", "blocks", "sample_size"):
            check_int(getattr(self, name), name, 1, MAX_SIZE)
        check_tuple(self.block_out_channels, "block_out_channels", None, is_positive_int)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Block(nn.Module):
    """x + conv(relu(conv(relu(conv(x))))), then ReLU: TAESD's block."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class LightDecoder(Pretrained, nn.Module):
    """Normalised latents (B, latent_channels, h, w) -> images (B, out_channels, f h, f w), nominally in [-1, 1]."""

    config_class = LightDecoderConfig

    def __init__(self, config: LightDecoderConfig):
        super().__init__()
        self.config = config
        widths = config.block_out_channels
        layers: list[nn.Module] = [conv(config.latent_channels, widths[0]), nn.ReLU()]
        layers += [Block(widths[0]) for _ in range(config.blocks)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c_in, c_out), nn.ReLU()]
            layers += [Block(c_out) for _ in range(config.blocks)]
        layers.append(conv(widths[-1], config.out_channels))
        self.layers = nn.Sequential(*layers)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise EncdiffError(f"latents of shape {tuple(latents.shape)}: expected B x {self.config.latent_channels} "
                               "x h x w")
        # TAESD's soft clamp: latents beyond +-3 (rare in unit-variance latents) saturate instead of exploding
        return self.layers(torch.tanh(latents / 3) * 3)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The full decoder's interface: normalised latents -> images."""
        images = self(latents)
        if not images.requires_grad and not torch.isfinite(images).all():
            raise EncdiffError("the light decoder's output contains NaN or inf: its weights are not finite")
        return images

    @classmethod
    def for_autoencoder(cls, autoencoder, **changes) -> "LightDecoder":
        """A light decoder shaped for an autoencoder's latents and images: 64 channels at the latents' resolution,
        halved at each upsampling (at least 16)."""
        c = autoencoder.config
        levels = round(math.log2(autoencoder.downsample_factor)) + 1
        widths = tuple(max(16, 64 >> level) for level in range(levels))
        return cls(LightDecoderConfig(**{"latent_channels": c.latent_channels, "out_channels": c.out_channels,
                                         "block_out_channels": widths, "sample_size": c.sample_size, **changes}))
