"""The commands that train and export: train-autoencoder, train, distill, export, posthoc-ema, train-feature-net."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import EncdiffError
from .flags import check_writable_folder, train_overrides


def cmd_train(args: argparse.Namespace, stage: str) -> int:
    from ..training.state import latest_training_state
    from ..training import train_autoencoder, train_consistency, train_diffusion, train_light_decoder
    from ..training.config import check_model_name, config_to_json, load_config

    if not Path(args.data).is_dir():
        raise EncdiffError(f"{args.data}: " + ("a file, not a folder" if Path(args.data).exists() else "no such folder")
                           + "; give the image folder to train on")
    if stage == "diffusion" and bool(args.autoencoder) == bool(args.pixel):
        raise EncdiffError("give exactly one of --autoencoder MODEL (latent diffusion) or --pixel")
    overrides = train_overrides(args, stage)
    config = load_config(args.config, args.preset, stage, overrides)
    if (stage in ("autoencoder", "diffusion") and not config.model) or (stage == "light_decoder" and
                                                                          config.autoencoder):
        if stage == "diffusion" and args.pixel:
            raise EncdiffError("no model: pass --model NAME or --preset NAME (pixel-space U-Nets are not sized "
                               "from the data; latent diffusion is, with --autoencoder MODEL)")
        # No preset, model or config file (a light decoder: always, under any of them): the data and the autoencoder
        # decide (training/sizing.py), and it is said.
        from ..autoencoder import Autoencoder
        from ..training.sizing import plan_for_folder, survey_folder

        # The diffusion or light-decoder stage's autoencoder, or the one an autoencoder run starts from: they fix
        # size and channels.
        source = config.init if stage == "autoencoder" else config.autoencoder
        autoencoder = Autoencoder.from_pretrained(source) if source else None
        plan = plan_for_folder(survey_folder(args.data, exclude=(Path(config.run_dir),)), stage, autoencoder,
                               resolution=overrides.get("resolution"), channels=overrides.get("channels"))
        config = load_config(args.config, args.preset, stage, overrides, base=plan.values)
        # The lines above say the data's choices; what a flag or config file changed is said apart, so the screen
        # never shows a value the run will not train with as the last word.
        trained = json.loads(json.dumps(config_to_json(config)))
        given = [f"{field} {json.dumps(trained[field])} (the data's: {json.dumps(value)})"
                 for field, value in json.loads(json.dumps(plan.values)).items() if trained.get(field) != value]
        print("encdiff: sized from the data (any flag overrides a choice; --dry-run shows the whole config):\n  "
              + "\n  ".join(plan.lines + ([f"given instead: {', '.join(given)}"] if given else [])), file=sys.stderr)
    if stage == "consistency" and config.teacher:  # the student's size, channels and buckets are its teacher's
        from ..training.distillation import teacher_defaults

        config = load_config(args.config, args.preset, stage, overrides, base=teacher_defaults(config.teacher))
    check_model_name(config, stage)  # a dry run shows only a config that would train
    if stage in ("autoencoder", "light_decoder"):
        from ..autoencoder_loss import check_alpha_weights

        check_alpha_weights(config.alpha_weight, config.alpha_edge_weight, config.channels)
    check_writable_folder(Path(config.run_dir), "--run-dir")
    checkpoint = latest_training_state(config.run_dir)
    if checkpoint is not None:
        # Said before training as well as in a dry run: the screen above shows the planned steps and decay, but a
        # resumed time-budget run trains the ones its budget fitted (Run.resume adopts them the same way).
        from ..training.budget import resumed_config
        from ..training.state import training_state_meta

        meta = training_state_meta(checkpoint)
        resumed, adopted, _ = resumed_config(config, meta)
        taken = ", ".join(f"{field} {value}" for field, value in adopted.items())
        print(f"encdiff: {config.run_dir} holds a checkpoint at step {meta.get('step')}: the run resumes from it"
              + (f", with its time budget's {taken}" if taken else ""), file=sys.stderr)
        if args.dry_run:  # the config the resume trains, not the one the command alone would
            config = resumed
    if args.dry_run:
        print(json.dumps({"stage": stage, **config_to_json(config)}, indent=2))
        return 0
    if args.resume and checkpoint is None:
        raise EncdiffError(f"--resume: no complete checkpoint in {config.run_dir}")
    train = {"autoencoder": train_autoencoder, "diffusion": train_diffusion, "consistency": train_consistency,
             "light_decoder": train_light_decoder}[stage]
    out = train(config)
    print(out)
    return 0


def cmd_train_guide(args: argparse.Namespace) -> int:
    """A guide for autoguidance, trained by the diffusion stage on the generator's latents, stored in its folder."""
    from ..training.config import config_to_json, load_config
    from ..training.guide import guide_defaults, train_guide

    if not Path(args.data).is_dir():
        raise EncdiffError(f"{args.data}: no such folder; give the image folder the generator was trained on")
    config = load_config(args.config, None, "diffusion", train_overrides(args, "diffusion"),
                         base=guide_defaults(args.generator))
    check_writable_folder(Path(config.run_dir), "--run-dir")
    if args.dry_run:
        print(json.dumps({"stage": "diffusion", **config_to_json(config)}, indent=2))
        return 0
    print(train_guide(config, args.generator))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..training import export_run

    sampling = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("guidance_scale", args.guidance),
                                  ("sigmas", args.sigmas), ("guidance_interval", args.guidance_interval),
                                  ("guidance_kind", args.guidance_kind), ("decoder", args.decoder))
                if v is not None}
    if args.sigmas is not None and args.steps is None:
        sampling["steps"] = len(args.sigmas)
    step = args.at_step
    if args.at_fraction is not None:
        if args.sigma_rel is None:
            raise EncdiffError("--at-fraction picks one of the run's post-hoc EMA snapshots: give --sigma-rel too "
                               "(or --at-step N for a kept checkpoint)")
        from ..phema import snapshot_nearest

        step = snapshot_nearest(args.run, args.at_fraction)
    out = export_run(args.run, args.out, diffusers=args.diffusers, dtype=torch.float16 if args.half else None,
                     sampling=sampling, sigma_rel=args.sigma_rel, step=step)
    what = "EMA" if args.sigma_rel is None else f"post-hoc EMA (sigma_rel {args.sigma_rel})"
    print(f"exported the {what} weights of {args.run}" + (f" at step {step}" if step is not None else "")
          + f" to {out}")
    return 0


def cmd_posthoc_ema(args: argparse.Namespace) -> int:
    """One model folder per sigma_rel, reconstructed from the run's snapshots (EDM2 sec. 3)."""
    from ..phema import check_sigma_rel, snapshots
    from ..training import export_run

    for value in args.sigma_rel:
        check_sigma_rel(value, "--sigma-rel")
    if not snapshots(args.run):
        raise EncdiffError(f"{args.run}: no post-hoc EMA snapshots (train with --phema-every N to store them)")
    out = check_writable_folder(Path(args.out), "--out")
    for value in args.sigma_rel:
        folder = export_run(args.run, out / f"sigma-rel-{value:g}", dtype=torch.float16 if args.half else None,
                            sigma_rel=value)
        print(folder)
    return 0


def _split_folders(data: Path, test: str | None) -> tuple[Path, Path | None]:
    """DATA with train/ (and test/) subfolders, or DATA itself as the training folder."""
    if (data / "train").is_dir():
        return data / "train", Path(test) if test else (data / "test" if (data / "test").is_dir() else None)
    return data, Path(test) if test else None


def cmd_train_feature_net(args: argparse.Namespace) -> int:
    from ..data import ImageDataset
    from ..featurenet import FeatureNetConfig, FeatureNetTraining, train_feature_net

    data = Path(args.data)
    if not data.is_dir():
        raise EncdiffError(f"{data}: not a folder; give an image folder with class subfolders "
                           "(or a folder holding train/ and test/ ones)")
    train_dir, test_dir = _split_folders(data, args.test)
    cache = args.cache_dir
    train = ImageDataset(train_dir, 32, cache_dir=cache)
    if train.labels is None:
        raise EncdiffError(f"{train_dir}: no class subfolders, so no labels to train a classifier on")
    test = ImageDataset(test_dir, 32, cache_dir=cache) if test_dir is not None else None
    if test is not None and test.class_names != train.class_names:
        raise EncdiffError(f"{test_dir}: classes {test.class_names} differ from {train_dir}'s {train.class_names}")
    if args.epochs < 0 or (args.epochs == 0 and not args.init):
        raise EncdiffError(f"--epochs {args.epochs}: expected at least 1 (or 0 together with --init FILE)")
    settings = FeatureNetTraining(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  bf16=args.bf16)
    config = FeatureNetConfig(num_classes=train.num_classes, class_names=tuple(train.class_names))
    train_feature_net(train.images, train.labels, args.out, settings, config,
                      None if test is None else test.images, None if test is None else test.labels, init=args.init)
    print(f"wrote {args.out}")
    return 0
