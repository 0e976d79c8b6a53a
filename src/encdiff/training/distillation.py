"""Consistency distillation, `train_consistency`: a few-step student from a stage-2 generator (consistency.py), with
the teacher's guidance built in; the same loop as the other stages (exact resume, DDP, EMA, logs, grids, evaluations)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch

from ..autoencoder import Autoencoder
from ..backbones import backbone_class, backbone_name
from ..buckets import format_shape
from ..checkpoint import sha256_file
from ..consistency import distillation_grid, distillation_loss, interval_probabilities
from ..errors import EncdiffError, count
from ..pipeline import CONSISTENCY_PRECONDITIONINGS, Generator, Sampling
from .config import TrainConfig, generator_data_fields
from .hooks import evaluation_hook, sample_grid
from .latents import cached_latents, latent_batches
from .loop import Recipe, Run, RunLock, prepare, train_loop


def teacher_defaults(teacher_folder: str | Path) -> dict[str, object]:
    """What a student takes from its teacher unless a config file or a flag says otherwise (generator_data_fields)."""
    return generator_data_fields(Generator.from_pretrained(teacher_folder))


def guidance_interval(config: TrainConfig, teacher: Generator, guidance: float | None) -> tuple[float, float] | None:
    """The sigma interval the student's built-in guidance applies in: the config's (() for every sigma), else the
    teacher's stored one, so that by default the student learns the ODE its teacher samples along."""
    if config.guidance_interval is None:
        return teacher.sampling.guidance_interval if guidance is not None else None
    if guidance is None and config.guidance_interval:
        raise EncdiffError(f"guidance_interval {list(config.guidance_interval)}: the student is distilled without "
                           "guidance (guidance 1, or a teacher that samples unguided); give --guidance too")
    return tuple(config.guidance_interval) or None


def check_same_guidance(then: dict, guidance: float | None, interval: tuple[float, float] | None, run_dir,
                        kind: str | None = None) -> None:
    """A resumed distillation keeps the guidance it started with: the teacher's stored defaults may have changed
    since (set-sampling), and a checkpoint from before intervals existed was guided at every sigma."""
    was = then.get("guidance_scale"), tuple(then["guidance_interval"]) if then.get("guidance_interval") else None
    was_kind = then.get("guidance_kind")  # recorded for autoguidance only: absent, classifier-free
    if (*was, was_kind) != (guidance, interval, kind):
        flags = f"--guidance {was[0] or 1}" + (f" --guidance-interval {was[1][0]:g} {was[1][1]:g}" if was[1] else
                                               " --no-guidance-interval" if was[0] else "")
        if was_kind != kind:
            flags = f"a teacher that samples with {'autoguidance' if was_kind else 'classifier-free guidance'}"
        raise EncdiffError(f"{run_dir}: this run was distilling with {describe_guidance(*was, was_kind)}, now with "
                           f"{describe_guidance(guidance, interval, kind)}; resume with {flags} or use another "
                           "--run-dir")


def describe_guidance(scale: float | None, interval: tuple[float, float] | None, kind: str | None = None) -> str:
    """The guidance a student has built in, in words (the run's start, a refused resume, `encdiff info`)."""
    if not scale:
        return "no guidance"
    return (f"{'autoguidance' if kind == 'auto' else 'guidance'} {scale:g}"
            + (f" in sigma ({interval[0]:g}, {interval[1]:g}]" if interval else " at every sigma"))


def train_consistency(config: TrainConfig) -> Path:
    """Distil the generator folder `config.teacher` into a consistency student (consistency.py) that samples in
    `student_steps` evaluations with the teacher's guidance built in; returns the student's generator folder. The
    same loop as the other stages: exact resume, DDP, EMA, logs, sample grids, evaluations."""
    with RunLock(config.run_dir):
        return _train_consistency(config)


def _train_consistency(config: TrainConfig) -> Path:
    if not config.teacher:
        raise EncdiffError("no teacher: pass the generator folder to distil (encdiff distill TEACHER DATA)")
    teacher = Generator.from_pretrained(config.teacher)  # a bad folder fails before the data is decoded
    if teacher.spec.kind not in CONSISTENCY_PRECONDITIONINGS:
        raise EncdiffError(f"{config.teacher}: a {teacher.spec.kind!r} generator; distillation needs a continuous-sigma "
                           f"teacher ({' or '.join(CONSISTENCY_PRECONDITIONINGS)}: its probability-flow ODE is the "
                           "student's target and its preconditioning the student's)")
    guidance = config.guidance if config.guidance is not None else teacher.sampling.guidance_scale
    guidance = None if guidance == 1 else guidance
    # the kind the teacher samples with: autoguidance (its own guide, e.g. `train --guide-at`) is built in as it is
    kind = "auto" if guidance is not None and teacher.sampling.guidance_kind == "auto" else None
    if guidance is not None and not teacher.num_classes and kind is None:
        raise EncdiffError(f"guidance {guidance}: the teacher {config.teacher} is unconditional; autoguidance is "
                           "distilled from a teacher that samples with it (encdiff set-guide, then set-sampling "
                           "--guidance-kind auto)")
    interval = guidance_interval(config, teacher, guidance)
    if config.resolution != teacher.image_size:
        raise EncdiffError(f"resolution {config.resolution}: the teacher {config.teacher} makes "
                           f"{teacher.image_size}x{teacher.image_size} images (pass --resolution {teacher.image_size})")
    dist_, dataset = prepare(config, "consistency", factor=teacher.downsample_factor)
    if dist_.main:
        source = lambda value: "the teacher's" if value is None else "set"
        print(f"encdiff: the student learns the teacher's ODE with {describe_guidance(guidance, interval, kind)} (scale: "
              f"{source(config.guidance)}, interval: {source(config.guidance_interval)})", file=sys.stderr)
    if dataset.num_classes != teacher.num_classes:
        raise EncdiffError(f"{config.data}: {count(dataset.num_classes, 'class folder')}, but the teacher {config.teacher} "
                           f"is conditional on {count(teacher.num_classes, 'class', 'classes')}; distil on its training data")
    teacher_net = teacher.unet.to(dist_.device).requires_grad_(False)
    teacher_denoiser = teacher.spec.build(teacher_net)
    guide = teacher.spec.build(teacher.guide.to(dist_.device).requires_grad_(False)) if kind == "auto" else None
    latent = isinstance(teacher.autoencoder, Autoencoder)
    autoencoder = teacher.autoencoder.to(dist_.device) if latent else None
    spec = dataclasses.replace(teacher.spec, kind="consistency", preconditioning=teacher.spec.kind)
    torch.manual_seed(config.seed)
    backbone = backbone_name(teacher.unet)
    student_config = teacher.unet.config
    if backbone == "edm2":  # the consistency loss has no use for an uncertainty head (DDP needs every parameter used)
        student_config = dataclasses.replace(student_config, logvar_channels=0)
    student = backbone_class(backbone)(student_config)
    own = student.state_dict()
    student.load_state_dict({k: v for k, v in teacher.unet.state_dict().items() if k in own})  # ECT: from the teacher
    sampling = Sampling(sampler="consistency", steps=config.student_steps, schedule="consistency")
    distillation = {"method": "consistency distillation (Song et al. 2023) with iCT's metric and weighting",
                    "teacher_unet_sha256": sha256_file(Path(config.teacher) / "unet" / "model.safetensors"),
                    "guidance_scale": guidance, "guidance_interval": interval, "intervals": config.intervals,
                    "solver": config.solver, **({"guidance_kind": kind} if kind else {})}
    ae_folder = Path(config.teacher) / "autoencoder"
    # the shapes the student can draw at: those it was tuned on that its teacher was trained at
    sizes = [shape for shape in dataset.shapes if shape in teacher.sizes] if dataset.bucketed else None
    export_info = {"denoiser": dataclasses.asdict(spec), "class_names": teacher.class_names,
                   "sizes": [format_shape(shape) for shape in sizes or ()],
                   "autoencoder": str(ae_folder.resolve()) if latent else None, "backbone": backbone,
                   "sampling": dataclasses.asdict(sampling), "distillation": distillation}
    run = Run(config, "consistency", student, dataset, dist_, export_info)
    if run.resume():
        then = run.resumed_export.get("distillation", {}).get("teacher_unet_sha256")
        if then != distillation["teacher_unet_sha256"]:
            raise EncdiffError(f"{config.teacher}: not the teacher this run was distilling (its U-Net's sha256 "
                               f"{distillation['teacher_unet_sha256'][:16]}, the checkpoint's {str(then)[:16]}); "
                               "resume with the original teacher or use another --run-dir")
        check_same_guidance(run.resumed_export.get("distillation", {}), guidance, interval, config.run_dir, kind)

    batch = (latent_batches(cached_latents(autoencoder, dataset, Path(config.run_dir) / "cache", str(ae_folder),
                                           dist_), dataset)
             if latent else dataset.batch)

    grid = distillation_grid(config.intervals, teacher_denoiser)
    # iCT's log-normal over the intervals (P_mean -1.1, P_std 2 at sigma_data 0.5), shifted to the data's scale
    options = {"p_mean": -1.1 + math.log(spec.sigma_data / 0.5), "p_std": 2.0, **config.loss_options}
    unknown = sorted(set(options) - {"p_mean", "p_std"})
    if unknown:
        raise EncdiffError(f"unknown loss option(s) {unknown} for distillation; valid: p_mean, p_std")
    probabilities = interval_probabilities(grid, options["p_mean"], options["p_std"])
    label_dropout = config.label_dropout if dataset.num_classes else 0.0
    student_denoiser = spec.build(run.model)

    def loss(model, x, labels):
        # DDP syncs gradients only for calls through its wrapper: the student runs the network it is given, its
        # stop-gradient target the plain module.
        return distillation_loss(student_denoiser, teacher_denoiser, x, run.generators["noise"], grid, probabilities,
                                 class_labels=labels, guidance_scale=guidance, guidance_interval=interval,
                                 label_dropout=label_dropout, solver=config.solver, huber_c=config.huber_c,
                                 shard=run.shard, net=model, guide=guide)

    def student_of(run: Run) -> Generator:
        return Generator(run.ema.model, spec, autoencoder, teacher.class_names, sampling,
                         {**distillation, "images": run.images_seen}, sizes=sizes)

    train_loop(run, Recipe(batch=batch, loss=loss, sample=sample_grid(student_of, dataset),
                           evaluate=evaluation_hook(config, dataset, student_of)))
    out = run.dir / "model"
    if dist_.main:
        student_of(run).save_pretrained(out)
        print(f"consistency student written to {out}", file=sys.stderr)
    dist_.barrier()
    return out
