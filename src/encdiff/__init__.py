"""encdiff: encoder-decoder diffusion models (KL autoencoder + denoising U-Net), weight-compatible with diffusers."""

from .autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, IdentityAutoencoder
from .errors import EncdiffError
from .unet import UNet, UNetConfig

__all__ = [
    "Autoencoder", "AutoencoderConfig", "DiagonalGaussian", "IdentityAutoencoder", "EncdiffError", "UNet", "UNetConfig",
]
__version__ = "0.1.0"
