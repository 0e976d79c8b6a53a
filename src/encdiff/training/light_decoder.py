"""The light decoder's stage, `train_light_decoder`: a LightDecoder (light_decoder.py) learns to decode the frozen
encoder's latents, matching the images (the autoencoder objective: L1 + SSIM, PatchGAN and feature matching after
their warm-up) and the full decoder's output on the same latents (`teacher_weight`: the full decoder is the better
target where the data's detail is beyond what the latent holds). The encoder and its latent scale/shift never
change, so the result decodes every generator of that latent space (`encdiff set-autoencoder`'s rule). The latents
and the full decoder's images of them are computed once, into the run's cache (training/latents.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..autoencoder import Autoencoder
from ..autoencoder_loss import AutoencoderObjective, DiscriminatorConfig, PatchDiscriminator
from ..errors import EncdiffError
from ..images import image_grid, on_checkerboard, save_png, to_uint8
from ..light_decoder import LightDecoder
from .config import TrainConfig
from .latents import cached_decodings, cached_latents, image_and_latent_batches
from .loop import Recipe, Run, RunLock, prepare, train_loop


def train_light_decoder(config: TrainConfig) -> Path:
    """Train a light decoder for the autoencoder `config.autoencoder`; returns its model folder. The run folder is
    locked while it trains."""
    with RunLock(config.run_dir):
        return _train_light_decoder(config)


def _train_light_decoder(config: TrainConfig) -> Path:
    if not config.autoencoder:
        raise EncdiffError("no autoencoder: pass the autoencoder whose latents the light decoder reads "
                           "(--autoencoder MODEL, e.g. GENERATOR/autoencoder)")
    autoencoder = Autoencoder.from_pretrained(config.autoencoder)  # a bad folder fails before the data is decoded
    if (config.resolution, config.channels) != (autoencoder.config.sample_size, autoencoder.config.in_channels):
        raise EncdiffError(f"--autoencoder {config.autoencoder}: trained on {autoencoder.config.in_channels}-channel "
                           f"{autoencoder.config.sample_size}x{autoencoder.config.sample_size} images; this run has "
                           f"channels {config.channels}, resolution {config.resolution}")
    dist_, dataset = prepare(config, "light_decoder", factor=autoencoder.downsample_factor)
    autoencoder = autoencoder.to(dist_.device).eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    decoder = LightDecoder.for_autoencoder(autoencoder, **config.model_overrides)
    discriminator = None
    if config.adv_weight > 0:
        discriminator = PatchDiscriminator(DiscriminatorConfig(in_channels=config.channels,
                                                               channels=config.disc_channels, layers=config.disc_layers))
    run = Run(config, "light_decoder", decoder, dataset, dist_,
              {"autoencoder": str(Path(config.autoencoder).resolve())}, discriminator=discriminator)
    run.resume()
    objective = AutoencoderObjective(
        recon_loss=config.recon_loss, kl_weight=0.0, ssim_weight=config.ssim_weight, fft_weight=config.fft_weight,
        adv_weight=config.adv_weight, fm_weight=config.fm_weight,
        discriminator=run.discriminator, last_layer=run.model.layers[-1].weight, all_reduce=dist_.mean,
        alpha_weight=config.alpha_weight, channels=config.channels,
        alpha_edge_weight=config.alpha_edge_weight)
    preview = dataset.batch(dataset.sample_indices(8))[0]

    # The posterior means (as a generator's latents are decoded) and the full decoder's images of them, each image's
    # and its mirror's, computed once into the run's cache rather than at every step: they were two thirds of a
    # step's cost on a CPU (encoder 0.32 s, full decoder 0.62 s, the light decoder's forward and backward 0.40 s
    # per 64 images, the 16-channel CIFAR-10 autoencoder, one thread).
    cache, key = Path(config.run_dir) / "cache", str(Path(config.autoencoder))
    latents = cached_latents(autoencoder, dataset, cache, key, dist_)
    decoded = cached_decodings(autoencoder, latents, dataset, cache, key, dist_) if config.teacher_weight else None

    def loss(model, batch, labels):
        x, latents, teacher = batch
        images = model(latents)
        total, parts = objective.loss(x, images, None, run.step >= run.config.adv_start,
                                       run.wrapped.get("discriminator"))
        if config.teacher_weight:
            parts["teacher"] = F.l1_loss(images.float(), teacher)
            total = total + config.teacher_weight * parts["teacher"]
        return total, parts

    def sample(run: Run) -> None:
        with torch.inference_mode():
            latents = autoencoder.encode(preview.to(dist_.device))
            rows = [preview, autoencoder.decode(latents).clamp(-1, 1).cpu(), run.ema.model(latents).clamp(-1, 1).cpu()]
        triples = torch.stack(rows, 1).flatten(0, 1)  # original | full decoder | light decoder
        save_png(image_grid(on_checkerboard(to_uint8(triples)), rows=len(preview)),
                 run.dir / f"decoded-{run.step:08d}.png")

    train_loop(run, Recipe(batch=image_and_latent_batches(latents, decoded, dataset), loss=loss, sample=sample,
                           phases={"adv_start": config.adv_start} if config.adv_weight > 0 else {}))
    out = run.dir / "model"
    if dist_.main:
        run.ema.model.eval().save_pretrained(out)
        print(f"light decoder written to {out}", file=sys.stderr)
    dist_.barrier()
    return out
