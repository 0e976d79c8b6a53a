"""Autoguidance's guide for a trained generator (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself"): a smaller model of the same data and latent space, trained for a fraction of the main model's images, so
its errors are the main model's, made worse; guiding away from it (GuidedDenoiser with a guide) sharpens samples
without classifier-free guidance's pull towards class prototypes, and needs no classes at all.

The paper's guide is the main model's architecture at a smaller size (EDM2-XS) trained for a fraction of the time;
here, by default, half the main U-Net's widths, 2,000 steps of 128 (256,000 images: a quarter of the bundled model's
images at about a third of its cost per image, so well under 25 % of its training compute), EMA half-life 50,000
images. It trains with the diffusion stage, the common trainer (exact resume, DDP, logs), on the generator's own
latents, and is stored in GENERATOR/guide/ (generator.json records how it was trained).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..backbones import backbone_name, load_backbone
from ..checkpoint import atomic_write_bytes, read_json
from ..errors import EncdiffError
from ..pipeline import GENERATOR_FILE, DenoiserSpec, Generator, stored_dtype
from .config import TrainConfig, generator_data_fields
from .diffusion import train_diffusion
from .state import latest_training_state, load_training_state

GUIDE_STEPS, GUIDE_BATCH, GUIDE_WIDTH = 2000, 128, 0.5
# The main U-Net's config fields the trainer sets itself from the data and the autoencoder.
FIXED = {"in_channels", "out_channels", "sample_size", "num_classes", "null_class", "logvar_channels"}


def guide_defaults(generator_folder: str | Path) -> dict[str, Any]:
    """The TrainConfig values of a guide for the generator in `generator_folder` (flags and a TOML file override them):
    its autoencoder and latents, its denoiser, its backbone at GUIDE_WIDTH of the widths, the short recipe above."""
    folder = Path(generator_folder)
    generator = Generator.from_pretrained(folder)
    if generator.spec.kind == "consistency":
        raise EncdiffError(f"{folder}: a consistency student samples in a few steps without guidance; train the guide "
                           "for its teacher")
    if not (folder / "autoencoder").is_dir():
        raise EncdiffError(f"{folder}: a pixel-space generator; guides are trained for latent generators")
    backbone = backbone_name(generator.unet)
    main = dataclasses.asdict(generator.unet.config)
    widths = [max(16, int(w * GUIDE_WIDTH) // 16 * 16) for w in main["block_out_channels"]]
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in main.items() if k not in FIXED}
    overrides["block_out_channels"] = widths
    spec = generator.spec
    values = dict(run_dir=f"runs/{folder.resolve().name}-guide", autoencoder=str(folder / "autoencoder"),
                  **generator_data_fields(generator), backbone=backbone, model="cifar10_latent",
                  model_overrides=overrides, denoiser=spec.kind, sigma_data=spec.sigma_data,
                  train_schedule=spec.schedule, prediction=spec.prediction, steps=GUIDE_STEPS, batch_size=GUIDE_BATCH,
                  ema_halflife_images=50_000.0, label_dropout=0.1 if generator.num_classes else 0.0)
    if backbone == "edm2":  # EDM2 config E, as the version 0.4 main model (configs/cifar10-v0.4/diffusion.toml)
        values.update(uncertainty=True, lr=1e-2, betas=[0.9, 0.99], warmup_steps=200, lr_schedule="inv_sqrt",
                      lr_decay_steps=GUIDE_STEPS // 4)
        if spec.kind == "edm":  # its noise levels for unit-variance latents; another kind keeps its own (OBJECTIVES)
            values["loss_options"] = {"p_mean": -0.5, "p_std": 1.2}
    else:
        values.update(lr=6e-4, warmup_steps=200)
    return values


def train_guide(config: TrainConfig, generator_folder: str | Path) -> Path:
    """Train a guide with `config` (from `guide_defaults`, changed at will) and store it in the generator folder,
    in the precision of the generator's own U-Net file; returns the generator folder."""
    folder = Path(generator_folder)
    generator = Generator.from_pretrained(folder)
    ours = DenoiserSpec(kind=config.denoiser, sigma_data=config.sigma_data, schedule=config.train_schedule,
                        prediction=config.prediction)
    if ours != generator.spec:
        raise EncdiffError(f"the guide's denoiser {dataclasses.asdict(ours)} differs from the generator's "
                           f"{dataclasses.asdict(generator.spec)}: a guide must denoise the same way")
    trained = train_diffusion(config)
    guide = load_backbone(trained / "unet")
    # What trained, from the run's newest checkpoint: a time budget (`--time`) fits the steps to the machine, so the
    # config's step count is only the plan.
    _, meta = load_training_state(latest_training_state(config.run_dir))
    generator.with_guide(guide)  # same latents and labels, or a clear refusal before anything is written
    # guide/ first, then its entry: an interruption between them leaves a folder that loads (with a warning)
    guide.save_pretrained(folder / "guide", dtype=stored_dtype(folder))
    info = read_json(folder / GENERATOR_FILE)
    info["guide"] = {"method": "autoguidance (Karras et al. 2024): a smaller, shorter-trained model of the same data",
                     "block_out_channels": list(guide.config.block_out_channels), "steps": meta["step"],
                     "images": meta["images_seen"], "run": str(Path(config.run_dir).resolve())}
    atomic_write_bytes(folder / GENERATOR_FILE, (json.dumps(info, indent=2) + "\n").encode())
    Generator.from_pretrained(folder)  # the folder loads as written
    print(f"guide written to {folder / 'guide'}", file=sys.stderr)
    return folder
