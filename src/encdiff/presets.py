"""Named model configs: `tiny` for tests, published shapes for compatibility, and our CIFAR-10 models."""

from __future__ import annotations

from .autoencoder import AutoencoderConfig
from .errors import lookup
from .mp_unet import MPUNetConfig
from .unet import UNetConfig

AUTOENCODERS: dict[str, AutoencoderConfig] = {
    # A few thousand parameters: unit tests on the CPU.
    "tiny": AutoencoderConfig(block_out_channels=(8, 16), attention_levels=(False, True), layers_per_block=1,
                              latent_channels=4, norm_num_groups=4, sample_size=16),
    # 32x32x3 -> 8x8x4: the CIFAR-10-sized autoencoder of the speed benchmark.
    "cifar10_f4": AutoencoderConfig(block_out_channels=(64, 128, 128), attention_levels=(False, False, False),
                                    layers_per_block=2, latent_channels=4, sample_size=32),
    # The bundled CIFAR-10 autoencoder (32x32x3 -> 8x8x8, 0.95M parameters): sized for a CPU training budget,
    # f and latent channels chosen by measurement (BENCHMARKS.md).
    "cifar10_small": AutoencoderConfig(block_out_channels=(32, 64, 64), attention_levels=(False, False, False),
                                       layers_per_block=1, latent_channels=8, norm_num_groups=16, sample_size=32),
    # Stable Diffusion's VAE shape (f = 8, 4 latent channels).
    "sd": AutoencoderConfig(block_out_channels=(128, 256, 512, 512), attention_levels=(False,) * 4,
                            layers_per_block=2, latent_channels=4, scaling_factor=0.18215, sample_size=512),
}

UNETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(block_out_channels=(8, 16), attention_levels=(False, True), layers_per_block=1,
                       norm_num_groups=4, sample_size=16),
    # DDPM's CIFAR-10 model (Ho et al. 2020; diffusers' google/ddpm-cifar10-32): 35.7M parameters.
    "ddpm_cifar10": UNetConfig(block_out_channels=(128, 256, 256, 256), attention_levels=(False, True, False, False),
                               layers_per_block=2, downsample_padding=0, freq_shift=1.0, flip_sin_to_cos=False,
                               norm_eps=1e-6, sample_size=32),
    # A small pixel-space U-Net for 32x32 images.
    "pixel_small": UNetConfig(block_out_channels=(64, 128, 128), attention_levels=(False, True, False),
                              layers_per_block=2, attention_head_dim=32, sample_size=32),
    # A latent U-Net for 8x8x4 latents (the cifar10_f4 autoencoder), class-conditional with a null class.
    "latent_8x8": UNetConfig(in_channels=4, out_channels=4, block_out_channels=(128, 256, 256),
                             attention_levels=(False, True, True), layers_per_block=2, attention_head_dim=64,
                             scale_shift=True, flip_sin_to_cos=True, freq_shift=0.0, num_classes=10, sample_size=8),
    # The bundled CIFAR-10 generator's U-Net on the 8x8x8 latents of AUTOENCODERS["cifar10_small"] (4.95M
    # parameters): one ResNet block per level measured 1.5x faster to train and 1.9x faster to sample than two on
    # the CPU, which decides what a fixed budget can reach (BENCHMARKS.md).
    "cifar10_latent": UNetConfig(in_channels=8, out_channels=8, block_out_channels=(64, 128, 128),
                                 attention_levels=(False, True, True), layers_per_block=1, attention_head_dim=32,
                                 scale_shift=True, flip_sin_to_cos=True, freq_shift=0.0, num_classes=10, sample_size=8),
}


# The magnitude-preserving U-Net of EDM2 config E (mp_unet.py), `backbone = "edm2"` in a training config.
MP_UNETS: dict[str, MPUNetConfig] = {
    "tiny": MPUNetConfig(block_out_channels=(8, 16), attention_levels=(False, True), layers_per_block=1,
                         channels_per_head=8, logvar_channels=8, sample_size=16),
    # The bundled generator's size class on 8x8 latents: 64/128/128, one block per level, attention at 4x4 and 2x2
    # and in the decoder's first block; 5.0M parameters like the ADM-style `cifar10_latent`.
    "cifar10_latent": MPUNetConfig(in_channels=8, out_channels=8, block_out_channels=(64, 128, 128),
                                   attention_levels=(False, True, True), layers_per_block=1, channels_per_head=64,
                                   num_classes=10, sample_size=8),
}


def preset(table: dict, name: str):
    """Look up a named config, with an error listing the valid names."""
    return lookup(table, name, "preset")
