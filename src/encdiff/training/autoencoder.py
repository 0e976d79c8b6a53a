"""Stage 1, `train_autoencoder`: a KL autoencoder (Rombach et al. 2022, sec. 3) on any image folder: reconstruction
(L1/L2, optionally SSIM and a focal frequency term) + a small KL, a PatchGAN with feature matching after its warm-up
(autoencoder_loss.py); at the end the latent statistics are measured and stored as the autoencoder's scale/shift."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig
from ..autoencoder_loss import AutoencoderObjective, DiscriminatorConfig, PatchDiscriminator
from ..errors import EncdiffError
from ..images import image_grid, on_checkerboard, save_png, to_uint8
from ..presets import AUTOENCODERS, preset
from .config import TrainConfig, model_config
from .latents import measure_latent_statistics
from .loop import Recipe, Run, RunLock, prepare, train_loop


def train_autoencoder(config: TrainConfig) -> Path:
    """Train a KL autoencoder; see `_train_autoencoder`. The run folder is locked while it trains."""
    with RunLock(config.run_dir):
        return _train_autoencoder(config)


def _train_autoencoder(config: TrainConfig) -> Path:
    """Train a KL autoencoder on `config.data`; returns the folder of the final (EMA) autoencoder.

    With `config.init`, training starts from that autoencoder; with `config.decoder_only` as well, only the decoder
    (and post_quant_conv) learn: the encoder, its posterior and the stored latent scale/shift stay bit for bit, so
    the latent space, and every U-Net trained on it, is unchanged."""
    if config.init:
        init = Autoencoder.from_pretrained(config.init)  # a bad folder fails before the data is decoded
    else:
        preset(AUTOENCODERS, config.model)
    if config.init:
        ae_config = init.config
        if (ae_config.in_channels, ae_config.sample_size) != (config.channels, config.resolution):
            raise EncdiffError(f"--init {config.init}: an autoencoder for {ae_config.in_channels}-channel "
                               f"{ae_config.sample_size}x{ae_config.sample_size} images; this run has channels "
                               f"{config.channels}, resolution {config.resolution}")
    else:
        ae_config = model_config(AUTOENCODERS, config, AutoencoderConfig, in_channels=config.channels,
                                 out_channels=config.channels, sample_size=config.resolution)
    if config.resolution % ae_config.downsample_factor:
        raise EncdiffError(f"resolution {config.resolution} is not divisible by the autoencoder's downsampling "
                           f"factor {ae_config.downsample_factor}")
    dist_, dataset = prepare(config, "autoencoder", factor=ae_config.downsample_factor)
    torch.manual_seed(config.seed)  # the initial weights (of the discriminator too)
    autoencoder = Autoencoder(ae_config)
    if config.init:
        autoencoder.load_state_dict(init.state_dict())
    if config.decoder_only:
        frozen_modules(autoencoder).requires_grad_(False)
    discriminator = None
    if config.adv_weight > 0:
        discriminator = PatchDiscriminator(DiscriminatorConfig(in_channels=config.channels,
                                                               channels=config.disc_channels, layers=config.disc_layers))
    run = Run(config, "autoencoder", autoencoder, dataset, dist_, discriminator=discriminator)
    run.resume()
    preview = dataset.batch(dataset.sample_indices(8))[0]
    objective = AutoencoderObjective(
        recon_loss=config.recon_loss, kl_weight=config.kl_weight, ssim_weight=config.ssim_weight,
        fft_weight=config.fft_weight, adv_weight=config.adv_weight, fm_weight=config.fm_weight,
        discriminator=run.discriminator, last_layer=run.model.decoder.conv_out.weight, all_reduce=dist_.mean,
        alpha_weight=config.alpha_weight, channels=config.channels,
        alpha_edge_weight=config.alpha_edge_weight)

    f = ae_config.downsample_factor

    def loss(model, x, labels):
        B, C, H, W = x.shape
        rank, world_size = run.shard
        shape = (B * world_size, ae_config.latent_channels, H // f, W // f)
        noise = torch.randn(shape, generator=run.generators["noise"], device=x.device)[rank::world_size]
        extra = None
        if config.latent_noise:
            # The decoder meets latents off the encoder's manifold as a sampler leaves them (its posterior's own
            # noise is ~0.006 of the latents' spread: emoji64): sigma ~ U(0, latent_noise) per image, drawn for the
            # global batch as the posterior's noise is, so every rank count trains alike.
            gen = run.generators["noise"]
            sigma = config.latent_noise * torch.rand((B * world_size, 1, 1, 1), generator=gen, device=x.device)
            extra = (sigma * torch.randn(shape, generator=gen, device=x.device))[rank::world_size]
        reconstruction, posterior = model(x, noise=noise, latent_noise=extra)
        return objective.loss(x, reconstruction, posterior, run.step >= run.config.adv_start,
                              run.wrapped.get("discriminator"))

    def sample(run: Run) -> None:
        with torch.inference_mode():
            out = run.ema.model.decode(run.ema.model.encode(preview.to(dist_.device))).clamp(-1, 1).cpu()
        pairs = torch.stack([preview, out], 1).flatten(0, 1)  # original | reconstruction, side by side
        save_png(image_grid(on_checkerboard(to_uint8(pairs)), rows=len(preview) // 2),
                 run.dir / f"reconstructions-{run.step:08d}.png")

    train_loop(run, Recipe(batch=dataset.batch, loss=loss, sample=sample,
                           phases={"adv_start": config.adv_start} if config.adv_weight > 0 else {}))
    out = run.dir / "model"
    if dist_.main:
        # A decoder-only run keeps the latent space, statistics included; otherwise they are measured anew.
        autoencoder = run.ema.model if config.decoder_only else measure_latent_statistics(run.ema.model, dataset,
                                                                                          dist_.device)
        autoencoder.save_pretrained(out)
        print(f"autoencoder written to {out} (scaling_factor {autoencoder.config.scaling_factor:.4g})", file=sys.stderr)
    dist_.barrier()
    return out


def frozen_modules(autoencoder: Autoencoder) -> torch.nn.ModuleList:
    """What a decoder-only fine-tune keeps fixed: everything that maps an image to its latent."""
    return torch.nn.ModuleList([m for m in (autoencoder.encoder, autoencoder.quant_conv) if m is not None])


