"""`export_run`: the EMA weights (or a post-hoc EMA) of a run's newest checkpoint, or of the run as it stood at an
earlier step, as a model folder, encdiff's or diffusers' format."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig
from ..backbones import CONFIGS, backbone_class
from ..buckets import parse_shape
from ..errors import EncdiffError, config_from_dict
from ..phema import reconstruct, snapshot_nearest, snapshots
from ..pipeline import DenoiserSpec, Generator, Sampling, guide_record
from .config import TrainConfig, dataset_of
from .latents import measure_latent_statistics
from .state import complete_checkpoints, latest_training_state, load_training_state, training_state_meta


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, diffusers: bool = False,
               dtype: torch.dtype | None = None, sampling: dict[str, Any] | None = None,
               sigma_rel: float | None = None, step: int | None = None) -> Path:
    """Write the EMA weights of a run's newest checkpoint as a model folder: an autoencoder (its latent
    statistics measured on the run's data, as at the end of training) or a generator. With `diffusers`,
    the networks are written in diffusers' format (`unet/`, `vae/`); `dtype` (e.g. torch.float16) stores the
    weights in that precision; `sampling` sets a generator's default sampler/steps/guidance_scale; `sigma_rel`
    exports the post-hoc EMA of that width reconstructed from the run's snapshots (phema.reconstruct) instead of
    the run's EMA. `step` exports the run as it stood at that step: the EMA of its checkpoint there, or with
    `sigma_rel` the post-hoc EMA from the snapshots up to then (a checkpoint or a snapshot of that step gives its
    time): an early, shorter-trained version of the model, which is what autoguidance's guide is."""
    path = latest_training_state(run_dir)
    if path is None:
        raise EncdiffError(f"{run_dir}: no complete checkpoint to export")
    images = None
    if step is not None:
        path, images = _state_at(run_dir, step, posthoc=sigma_rel is not None, newest=path)
    tensors, meta = load_training_state(path)
    info = meta.get("export", {})
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    if sigma_rel is not None:
        posthoc, record = reconstruct(run_dir, sigma_rel, images)
        missing = sorted(set(ema) - set(posthoc))
        if missing:
            raise EncdiffError(f"{run_dir}: the post-hoc EMA snapshots lack {missing[0]!r}: not this run's model")
        ema = {**ema, **posthoc}
        print(f"post-hoc EMA: sigma_rel {sigma_rel} at {record['images']} images from {record['snapshots']} "
              f"(profile fit error {record['fit_error']:.2%})", file=sys.stderr)
    out = Path(out)
    if meta["stage"] == "autoencoder":
        autoencoder = Autoencoder(config_from_dict(AutoencoderConfig, info["model_config"], f"{path} model_config"))
        autoencoder.load_state_dict(ema)
        config = config_from_dict(TrainConfig, meta["config"], f"{path} config")
        if config.decoder_only:  # the latent space (statistics included) is the init autoencoder's
            autoencoder.eval().save_pretrained(out, diffusers=diffusers, dtype=dtype)
            return out
        dataset = dataset_of(config, run_dir, factor=autoencoder.downsample_factor)
        measure_latent_statistics(autoencoder, dataset, "cpu").save_pretrained(out, diffusers=diffusers, dtype=dtype)
        return out
    backbone = info.get("backbone", "unet")  # runs before the edm2 backbone recorded none
    if diffusers and backbone != "unet":
        raise EncdiffError(f"{run_dir}: a {backbone!r} U-Net (magnitude-preserving, EDM2) has no diffusers "
                           "equivalent; export it without --diffusers")
    unet = backbone_class(backbone)(config_from_dict(CONFIGS[backbone], info["model_config"], f"{path} model_config"))
    unet.load_state_dict(ema)
    autoencoder = Autoencoder.from_pretrained(info["autoencoder"]) if info.get("autoencoder") else None
    # A student's run records its own sampling (consistency); the caller's settings change it as `but` does.
    sampling = Sampling.from_dict(info.get("sampling"), f"{path} sampling").but(**(sampling or {}))
    distillation = info.get("distillation")
    if distillation is not None:
        distillation = {**distillation, "images": meta["images_seen"]}
    sizes = [parse_shape(size, f"{path} sizes") for size in info.get("sizes", [])]  # runs before buckets: none
    generator = Generator(unet, DenoiserSpec(**info["denoiser"]), autoencoder, info.get("class_names"), sampling,
                          distillation, sizes=sizes)
    if not diffusers:
        return generator.save_pretrained(out, dtype=dtype)
    unet.save_pretrained(out / "unet", diffusers=True, dtype=dtype)
    if autoencoder is not None:
        autoencoder.save_pretrained(out / "vae", diffusers=True, dtype=dtype)
    return out


# The run's own early state as its guide (`guide_at`), as measured on unconditional CIFAR-10 (BENCHMARKS.md, "Guides
# from the main run's own early steps"): its post-hoc EMA at sigma_rel 0.05 (as good as the run's EMA there), stored
# in float16 (+42 % of the folder instead of +83 %, the same samples), sampled with autoguidance 5 in (0.5, 10]: FID
# -31 % against unguided at 3/8 of a 2.56 M-image run (4-5 were best from 1 M images on). The interval was measured on
# latents of unit standard deviation; it is taken in units of the model's sigma_data.
OWN_GUIDE_SIGMA_REL = 0.05
OWN_GUIDANCE_SCALE, OWN_GUIDANCE_INTERVAL = 5.0, (0.5, 10.0)


def with_own_guide(generator: Generator, run_dir: str | os.PathLike, fraction: float) -> Generator:
    """`generator` (the run's final model) with the run's own post-hoc EMA at `fraction` of the way through it (the
    snapshot nearest, phema.snapshot_nearest) as its autoguidance guide, in float16: the paper's shorter-trained
    degradation of the model itself, at no training cost. An unconditional generator samples with it by default
    (autoguidance OWN_GUIDANCE_SCALE in OWN_GUIDANCE_INTERVAL times its sigma_data); a class-conditional one keeps
    classifier-free guidance (on CIFAR-10 it measured better) and offers the guide as --guidance-kind auto."""
    step = snapshot_nearest(run_dir, fraction)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix="own-guide-") as tmp:
        early = Generator.from_pretrained(export_run(run_dir, Path(tmp) / "early", sigma_rel=OWN_GUIDE_SIGMA_REL,
                                                     step=step))
    source = f"{Path(run_dir).resolve()} at step {step} ({fraction:g} of the run), post-hoc EMA sigma_rel " \
             f"{OWN_GUIDE_SIGMA_REL}"
    guided = generator.with_guide(early.unet, guide_record(early.unet, source, float16=True))
    if guided.num_classes:
        return guided
    interval = tuple(level * generator.spec.sigma_data for level in OWN_GUIDANCE_INTERVAL)
    return guided.with_sampling(dataclasses.replace(guided.sampling, guidance_kind="auto",
                                                    guidance_scale=OWN_GUIDANCE_SCALE, guidance_interval=interval))


def _state_at(run_dir, step: int, posthoc: bool, newest: Path) -> tuple[Path, int]:
    """The checkpoint that `export_run(step=...)` reads and the images seen at `step`: the checkpoint of that step;
    for a post-hoc EMA the newest checkpoint (its model and settings; the weights come from the snapshots) and the
    time of a checkpoint or snapshot taken at that step."""
    checkpoints = dict(complete_checkpoints(run_dir))
    if step in checkpoints:
        return (newest if posthoc else checkpoints[step]), int(training_state_meta(checkpoints[step])["images_seen"])
    # snapshot-<step>.safetensors (PowerEMA.save_snapshot)
    taken = {int(p.stem[len("snapshot-"):]): images for p, images, _ in (snapshots(run_dir) if posthoc else [])
             if p.stem[len("snapshot-"):].isdigit()}
    if step in taken:
        return newest, taken[step]
    kept = ", ".join(str(s) for s in checkpoints)
    if not posthoc:
        raise EncdiffError(f"{run_dir}: no checkpoint at step {step} (kept: {kept}); with --sigma-rel, a post-hoc "
                           "EMA snapshot of that step serves (train with --phema-every N to store them)")
    near = ", ".join(str(s) for s in sorted(taken, key=lambda s: abs(s - step))[:3]) or "none"
    raise EncdiffError(f"{run_dir}: no checkpoint at step {step} (kept: {kept}) and no post-hoc EMA snapshot at it "
                       f"(the nearest: {near})")
