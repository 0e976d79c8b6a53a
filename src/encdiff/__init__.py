"""encdiff: encoder-decoder diffusion models (KL autoencoder + denoising U-Net), weight-compatible with diffusers."""

from .autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, IdentityAutoencoder
from .denoiser import (LOSS_WEIGHTS, NOISE_LEVELS, Denoiser, EDMDenoiser, FlowDenoiser, GaussianDenoiser, GuidedDenoiser,
                       VPDenoiser, denoising_loss, training_loss)
from .errors import EncdiffError
from .mp_unet import MPUNet, MPUNetConfig
from .pipeline import DenoiserSpec, Generator, Sampling
from .samplers import SAMPLERS, generate, get_sampler
from .schedules import SCHEDULES, TRAIN_SCHEDULES, get_alpha_bars, get_sigmas
from .unet import UNet, UNetConfig

__all__ = [
    "Autoencoder", "AutoencoderConfig", "DiagonalGaussian", "IdentityAutoencoder", "UNet", "UNetConfig",
    "Denoiser", "VPDenoiser", "EDMDenoiser", "FlowDenoiser", "GuidedDenoiser", "GaussianDenoiser", "training_loss", "denoising_loss",
    "LOSS_WEIGHTS", "NOISE_LEVELS", "SAMPLERS", "get_sampler", "generate", "SCHEDULES", "TRAIN_SCHEDULES",
    "get_sigmas", "get_alpha_bars", "Generator", "DenoiserSpec", "Sampling", "EncdiffError", "MPUNet", "MPUNetConfig",
]
__version__ = "0.4.0.dev0"
