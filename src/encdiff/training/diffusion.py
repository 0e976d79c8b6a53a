"""Stage 2, `train_diffusion`: denoising score matching (Karras et al. 2022; EDM2's learned per-sigma weighting with
the magnitude-preserving backbone) on the autoencoder's latents, encoded once with their mirror images, or on pixels."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from ..autoencoder import Autoencoder
from ..backbones import CONFIGS, backbone_class
from ..buckets import format_shape
from ..checkpoint import read_json
from ..denoiser import training_loss
from ..errors import EncdiffError
from ..pipeline import DenoiserSpec, Generator, Sampling
from ..presets import preset
from .config import TrainConfig, backbone_presets, model_config
from .export import with_own_guide
from .hooks import evaluation_hook, sample_grid
from .latents import cached_latents, latent_batches
from .loop import Recipe, Run, RunLock, prepare, train_loop

# The classifier-free guidance scale a class-conditional generator (trained with label dropout) samples with unless
# told otherwise: the bundled CIFAR-10 model's (FID 25 unguided against 7.3 at 3, BENCHMARKS.md), and on emoji64 the
# samples at 3 are recognisable where unguided ones are blobs. Without it a user's labelled folder would sample
# unguided by default, the worst setting the model has.
DEFAULT_GUIDANCE = 3.0


def train_diffusion(config: TrainConfig) -> Path:
    """Train a (latent or pixel) diffusion U-Net; returns the folder of the final (EMA) generator. The run folder
    is locked while it trains."""
    with RunLock(config.run_dir):
        return _train_diffusion(config)


def _train_diffusion(config: TrainConfig) -> Path:
    table = backbone_presets(config.backbone)
    preset(table, config.model)  # a bad name or autoencoder folder fails before the data is decoded
    autoencoder = Autoencoder.from_pretrained(config.autoencoder) if config.autoencoder else None
    trained_by_us = autoencoder is not None and "encdiff_class" in read_json(Path(config.autoencoder) / "config.json")
    if trained_by_us and config.resolution != autoencoder.config.sample_size:
        # Convolutional, so it would run, but on latents of images at a scale it never saw: refused, not combined.
        # (A diffusers VAE's sample_size is not the size it was trained at, so it is not held to it.)
        raise EncdiffError(f"resolution {config.resolution}: the autoencoder {config.autoencoder} was trained on "
                           f"{autoencoder.config.sample_size}x{autoencoder.config.sample_size} images; train the "
                           f"diffusion stage at that size (--resolution {autoencoder.config.sample_size})")
    dist_, dataset = prepare(config, "diffusion", factor=autoencoder.downsample_factor if autoencoder else 1)
    if autoencoder is not None:
        autoencoder = autoencoder.to(dist_.device)
    factor = autoencoder.downsample_factor if autoencoder else 1
    channels = autoencoder.latent_channels if autoencoder else config.channels
    # The uncertainty head exists only when the loss uses it: a parameter no step touches would stall DDP.
    head = {"logvar_channels": model_config(table, config, CONFIGS["edm2"]).logvar_channels if config.uncertainty
            else 0} if config.backbone == "edm2" else {}
    unet_config = model_config(table, config, CONFIGS[config.backbone], in_channels=channels, out_channels=channels,
                               sample_size=config.resolution // factor, num_classes=dataset.num_classes,
                               null_class=True, **head)
    spec = DenoiserSpec(kind=config.denoiser, sigma_data=config.sigma_data, schedule=config.train_schedule,
                        prediction=config.prediction)
    torch.manual_seed(config.seed)
    sizes = dataset.shapes if dataset.bucketed else None  # the shapes the generator can draw at
    label_dropout = config.label_dropout if dataset.num_classes else 0.0
    sampling = Sampling(guidance_scale=DEFAULT_GUIDANCE if label_dropout > 0 else None)
    export_info = {"denoiser": dataclasses.asdict(spec), "class_names": dataset.class_names,
                   "sampling": dataclasses.asdict(sampling),
                   "sizes": [format_shape(shape) for shape in sizes or ()],
                   "autoencoder": str(Path(config.autoencoder).resolve()) if config.autoencoder else None,
                   "backbone": config.backbone}
    run = Run(config, "diffusion", backbone_class(config.backbone)(unet_config), dataset, dist_, export_info)
    run.resume()

    batch = (latent_batches(cached_latents(autoencoder, dataset, Path(config.run_dir) / "cache", config.autoencoder,
                                           dist_), dataset)
             if autoencoder is not None else dataset.batch)
    denoiser = spec.build(run.model)

    def loss(model, x, labels):
        # DDP syncs gradients only for calls through its wrapper: the loss runs the network it is given.
        return training_loss(denoiser, x, run.generators["noise"], class_labels=labels, noise_level=config.noise_level,
                             weighting=config.weighting, label_dropout=label_dropout, shard=run.shard, net=model,
                             uncertainty=config.uncertainty, noise_candidates=config.noise_candidates,
                             **config.loss_options)

    def generator_of(run: Run) -> Generator:
        return Generator(run.ema.model, spec, autoencoder, dataset.class_names, sampling, sizes=sizes)

    train_loop(run, Recipe(batch=batch, loss=loss, sample=sample_grid(generator_of, dataset, steps=config.sample_steps),
                           evaluate=evaluation_hook(config, dataset, generator_of, steps=config.sample_steps)))
    out = run.dir / "model"
    if dist_.main:
        generator = generator_of(run)
        if config.guide_at is not None:
            generator = with_own_guide(generator, run.dir, config.guide_at)
        generator.save_pretrained(out)
        print(f"generator written to {out}" + (f", its guide the run at {config.guide_at:g} of the way"
                                               if config.guide_at is not None else ""), file=sys.stderr)
    dist_.barrier()
    return out


