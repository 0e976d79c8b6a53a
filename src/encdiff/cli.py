"""The `encdiff` command: train, distil, sample, edit, evaluate, serve, export and inspect models.

A user mistake (bad path, value or file) prints one line `encdiff: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import EncdiffError, TrainingInterrupted, count

EXAMPLES = """examples:
  encdiff sample                                   # the bundled CIFAR-10 model: samples.png, a row per class
  encdiff sample --class cat --num 16 --seed 7
  encdiff train-autoencoder data/cifar10/train --preset cifar10 --run-dir runs/ae
  encdiff train data/cifar10/train --autoencoder runs/ae/model --preset cifar10 --run-dir runs/ldm
  encdiff train my_images/ --pixel --model pixel_small --resolution 32 --steps 20000
  torchrun --nproc-per-node=4 -m encdiff train data/ --autoencoder runs/ae/model --run-dir runs/ldm
  encdiff sample runs/ldm/model --num 16 --class cat --guidance 2 --out samples.png
  encdiff distill runs/ldm/model data/cifar10/train --run-dir runs/student --steps 1000
  encdiff sample runs/student/model                  # 2 steps, guidance built in
  encdiff reconstruct runs/ae/model photos/ --out recon/
  encdiff export runs/ldm exported/ --diffusers
  encdiff info runs/ldm
  encdiff train-feature-net /tmp/cifar10 --out featurenet.safetensors
  encdiff eval runs/ldm/model --reference data/cifar10/test --num 10000 --out eval/"""


EDIT_EXAMPLES = """examples:
  encdiff edit img2img photo.png --class cat --strength 0.3 --out cat.png
  encdiff edit inpaint photo.png --mask centre.png --class dog --resample 4
  encdiff edit invert photo.png --class cat --to-class dog --out swap.png
  encdiff edit interpolate --seeds 1 2 --class horse --frames 8 --out strip.png --gif strip.gif"""


def _train_flags(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per TrainConfig field of this stage, named after the field, its help the field's comment."""
    from .training import TrainConfig, stage_fields

    if stage == "consistency":
        parser.add_argument("teacher", help="generator folder to distil (its U-Net starts the student)")
    parser.add_argument("data", help="image folder (class subfolders become labels)" +
                        ("; the teacher's training data" if stage == "consistency" else ""))
    parser.add_argument("--config", help="TOML file with TrainConfig fields")
    parser.add_argument("--preset", help="named training setup: cifar10, folder64")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in the run folder (a run resumes automatically when it has one)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in stage_fields(stage) or f.name in ("data", "teacher"):
            continue
        flag, help_ = "--" + f.name.replace("_", "-"), _field_comment(TrainConfig, f.name)
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif kind in ("int", "float", "str"):
            parser.add_argument(flag, type={"int": int, "float": _finite_float, "str": str}[kind], help=help_,
                                metavar=f.name.upper())
        elif kind == "tuple[float, float]":
            parser.add_argument(flag, type=_finite_float, nargs=2, help=help_, metavar=f.name.upper())
        elif kind == "tuple[float, ...]":
            parser.add_argument(flag, type=_finite_float, nargs="+", help=help_, metavar=f.name.upper())
        # dict fields (model_overrides, loss_options) come from --config TOML files only


def _finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused with the flag named by argparse)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


@functools.lru_cache(maxsize=None)
def _source_lines(cls: type) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.getsource(cls).splitlines())  # parsing the source is slow: once per class


def _field_comment(cls: type, name: str) -> str | None:
    """The `# comment` beside a config field in its source: one definition of every option's meaning."""
    for line in _source_lines(cls):
        if line.strip().startswith(f"{name}:") and "#" in line:
            return line.split("#", 1)[1].strip().replace("%", "%%")
    return None


def _train_overrides(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    from .training import stage_fields

    return {name: getattr(args, name) for name in stage_fields(stage) if hasattr(args, name)}


def cmd_train(args: argparse.Namespace, stage: str) -> int:
    from .training.state import latest_training_state
    from .training import train_autoencoder, train_consistency, train_diffusion
    from .training.config import check_model_name, config_to_json, load_config

    if not Path(args.data).is_dir():
        raise EncdiffError(f"{args.data}: " + ("a file, not a folder" if Path(args.data).exists() else "no such folder")
                           + "; give the image folder to train on")
    if stage == "diffusion" and bool(args.autoencoder) == bool(args.pixel):
        raise EncdiffError("give exactly one of --autoencoder MODEL (latent diffusion) or --pixel")
    config = load_config(args.config, args.preset, stage, _train_overrides(args, stage))
    if stage != "consistency" and not config.model and not config.init:
        raise EncdiffError("no model: pass --model NAME or --preset NAME" +
                           (" (or --init AUTOENCODER to start from one)" if stage == "autoencoder" else ""))
    check_model_name(config, stage)  # a dry run shows only a config that would train
    _check_writable_folder(Path(config.run_dir), "--run-dir")
    if args.dry_run:
        print(json.dumps({"stage": stage, **config_to_json(config)}, indent=2))
        return 0
    if args.resume and latest_training_state(config.run_dir) is None:
        raise EncdiffError(f"--resume: no complete checkpoint in {config.run_dir}")
    train = {"autoencoder": train_autoencoder, "diffusion": train_diffusion, "consistency": train_consistency}[stage]
    out = train(config)
    print(out)
    return 0


def _sampling_flags(parser: argparse.ArgumentParser, prefix: str = "", default: str = "the generator's",
                    sigmas: bool = True, interval: bool = True) -> None:
    """The flags of `Sampling`, declared once for every command that samples (sample, eval, edit, export): each
    maps to the Sampling field of the same meaning, and an unset one is the generator's own."""
    parser.add_argument("--sampler", help=f"{prefix}sampler, one of encdiff.SAMPLERS that fits the model "
                        f"(default: {default})")
    parser.add_argument("--steps", type=int, help=f"{prefix}sampler steps (default: {default})")
    parser.add_argument("--guidance", type=_finite_float, help=f"{prefix}classifier-free guidance scale, 1: none "
                        f"(default: {default})")
    if interval:
        parser.add_argument("--guidance-interval", type=_finite_float, nargs=2, metavar=("LO", "HI"),
                            help=f"{prefix}guide only where LO < sigma <= HI, one network evaluation per step "
                            f"elsewhere (Kynkaanniemi et al. 2024; default: {default})")
    if sigmas:
        parser.add_argument("--sigmas", type=_finite_float, nargs="+", metavar="SIGMA",
                            help=f"{prefix}explicit noise levels, one per step (overrides --steps and the schedule)")


def _model_flags(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """--model and --fast, the same for every command that uses a generator (sample and serve also take the model
    as their argument)."""
    parser.add_argument("--model", dest="model_flag" if positional else "model", metavar="MODEL",
                        help="generator folder (default: the CIFAR-10 model shipped in the package)")
    parser.add_argument("--fast", action="store_true", help="the bundled model's consistency student: 2 network "
                        "evaluations per image instead of 40, guidance built in")


def _generator(args: argparse.Namespace):
    """The generator a command names: a folder, or the bundled model (its consistency student with --fast)."""
    from .pipeline import Generator

    model, flag = args.model, getattr(args, "model_flag", None)
    if model and flag and Path(model) != Path(flag):
        raise EncdiffError(f"two models: {model} and --model {flag} (give one)")
    model = model or flag
    if model and args.fast:
        raise EncdiffError(f"--fast picks the bundled student; {model} is another model (give one of them)")
    return Generator.from_pretrained(model) if model else Generator.bundled(student=args.fast)


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .images import image_grid, save_png

    num = args.num
    if num is not None and num < 1:
        raise EncdiffError(f"--num {num}: expected at least 1 image")
    if args.batch_size < 1:
        raise EncdiffError(f"--batch-size {args.batch_size}: expected at least 1")
    grid_path = _check_output(Path(args.out or "samples.png"), (".png",), "--out") if args.out or not args.out_dir \
        else None
    out_dir = _check_writable_folder(Path(args.out_dir), "--out-dir") if args.out_dir else None
    generator = _generator(args)
    if num is None:
        # a class-conditional model with no --class: one row of ten per class
        num = 10 * generator.num_classes if generator.num_classes and args.class_ is None else 16
    if grid_path is not None and num > MAX_GRID_IMAGES:
        raise EncdiffError(f"--num {num}: a grid of more than {MAX_GRID_IMAGES} images is too large to hold; write "
                           "the images one by one with --out-dir (and no --out)")
    if not 0 <= args.seed <= 2**63 - num:
        raise EncdiffError(f"--seed {args.seed}: expected 0 .. 2**63 - num (image i uses seed + i)")
    labels = generator.labels(num, args.class_)
    if args.guidance is not None and labels is None:
        raise EncdiffError("--guidance needs a class-conditional model")
    # Flags win over the generator's own sampling settings (measured for the bundled model), as in the library.
    settings = generator.settings(labels, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                                  sigmas=args.sigmas, guidance_interval=args.guidance_interval)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(num)]
    kept = []  # only for the grid; --out-dir alone streams the images to disk and keeps none
    # In batches (each image depends on its own seed only, so the pixels equal one big batch's), memory bounded.
    with tqdm(total=num, desc="sampling", unit="img", disable=num <= args.batch_size) as bar:
        for start in range(0, num, args.batch_size):
            batch_seeds = seeds[start:start + args.batch_size]
            batch_labels = None if labels is None else labels[start:start + args.batch_size]
            images = generator.images(batch_seeds, batch_labels, settings)
            if out_dir is not None:
                for seed, image in zip(batch_seeds, images):
                    save_png(image, out_dir / f"{seed:06d}.png")
            if grid_path is not None:
                kept.append(images)
            bar.update(len(batch_seeds))
    if grid_path is not None:
        images = torch.cat(kept)
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        spread = labels is not None and args.class_ is None and num % generator.num_classes == 0
        # One row per class when the images cycle through the classes; otherwise a near-square grid.
        rows = min(generator.num_classes, num) if spread else max(1, round(num**0.5))
        save_png(image_grid(images[_class_major(labels, generator.num_classes)] if spread else images, rows=rows),
                 grid_path)
        print(grid_path)
    return 0


MAX_GRID_IMAGES = 10_000  # 10k 32x32 images make a 32 MB grid; beyond that, --out-dir


def _class_major(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The order that groups images by class, keeping seed order within a class."""
    return torch.argsort(labels * len(labels) + torch.arange(len(labels)))


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import warnings

    from .autoencoder import Autoencoder
    from .data import image_files_under
    from .images import UnreadableImageError, image_grid, load_image, save_png, to_uint8, to_unit

    _in_range(args.resolution, "--resolution", 1, 4096)
    if Path(args.out).is_file():
        raise EncdiffError(f"--out {args.out}: is a file; give a folder for the reconstructions")
    autoencoder = Autoencoder.from_pretrained(args.model)
    source = Path(args.input)
    files = image_files_under(source) if source.is_dir() else [source]
    if not files:
        raise EncdiffError(f"{source}: no images found")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = args.resolution or autoencoder.config.sample_size
    channels = autoencoder.config.in_channels
    psnrs, skipped = [], []
    for path in files:
        try:
            pixels = torch.from_numpy(load_image(path, size, channels))
        except UnreadableImageError as e:
            if not source.is_dir():
                raise
            skipped.append(str(e))  # a folder is read like training data: unreadable files are skipped, and said
            continue
        with torch.inference_mode():
            out = to_uint8(autoencoder.decode(autoencoder.encode(to_unit(pixels[None]))))[0]
        mse = (out.double() - pixels.double()).square().mean().item()
        psnrs.append(10 * torch.log10(torch.tensor(255.0**2 / max(mse, 1e-10))).item())
        save_png(image_grid(torch.stack([pixels, out]), rows=1), out_dir / f"{path.stem}.png")
        print(f"{path}: PSNR {psnrs[-1]:.2f} dB")
    if skipped:
        warnings.warn(f"{source}: skipped {count(len(skipped), 'unreadable image file')}: {'; '.join(skipped[:3])}"
                      + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""))
    if not psnrs:
        raise EncdiffError(f"{source}: no readable images among its {count(len(files), 'image file')}")
    print(f"mean PSNR over {count(len(psnrs), 'image')}: {sum(psnrs) / len(psnrs):.2f} dB")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .training import export_run

    sampling = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("guidance_scale", args.guidance),
                                  ("sigmas", args.sigmas), ("guidance_interval", args.guidance_interval))
                if v is not None}
    if args.sigmas is not None and args.steps is None:
        sampling["steps"] = len(args.sigmas)
    out = export_run(args.run, args.out, diffusers=args.diffusers, dtype=torch.float16 if args.half else None,
                     sampling=sampling, sigma_rel=args.sigma_rel)
    what = "EMA" if args.sigma_rel is None else f"post-hoc EMA (sigma_rel {args.sigma_rel})"
    print(f"exported the {what} weights of {args.run} to {out}")
    return 0


def cmd_posthoc_ema(args: argparse.Namespace) -> int:
    """One model folder per sigma_rel, reconstructed from the run's snapshots (EDM2 sec. 3)."""
    from .phema import check_sigma_rel, snapshots
    from .training import export_run

    for value in args.sigma_rel:
        check_sigma_rel(value, "--sigma-rel")
    if not snapshots(args.run):
        raise EncdiffError(f"{args.run}: no post-hoc EMA snapshots (train with --phema-every N to store them)")
    out = _check_writable_folder(Path(args.out), "--out")
    for value in args.sigma_rel:
        folder = export_run(args.run, out / f"sigma-rel-{value:g}", dtype=torch.float16 if args.half else None,
                            sigma_rel=value)
        print(folder)
    return 0


def _ode_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The inversion's ODE settings: its own (an exact inverse needs a one-step method and a fine grid, not the
    generator's sampling), changed by --sampler and --steps."""
    from .editing import INVERSION_SAMPLER, INVERSION_STEPS, ODE_SAMPLERS

    sampler = args.sampler or INVERSION_SAMPLER
    if sampler not in ODE_SAMPLERS:
        raise EncdiffError(f"--sampler {sampler}: inversion integrates the ODE deterministically, one step at a "
                           f"time; use one of {', '.join(ODE_SAMPLERS)}")
    return dict(sampler=sampler, steps=args.steps or INVERSION_STEPS)


def _check_output(path: Path, suffixes: tuple[str, ...], flag: str) -> Path:
    """Refuse an output file that cannot be written before any work is done."""
    if path.suffix.lower() not in suffixes:
        raise EncdiffError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise EncdiffError(f"{flag} {path}: is a folder; give a file name")
    _check_writable_folder(path.parent, flag, path)
    return path


def _check_writable_folder(folder: Path, flag: str, shown: Path | None = None) -> Path:
    """Refuse an output folder that cannot be made or written before any work is done: its nearest existing
    ancestor must be a folder in which a file can really be created (permission bits do not tell that for root,
    a read-only mount or /proc). Nothing is left behind."""
    import tempfile

    shown = shown or folder
    if folder.exists() and not folder.is_dir():
        raise EncdiffError(f"{flag} {shown}: {folder} is not a folder: it is a file")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise EncdiffError(f"{flag} {shown}: {parent} is not a folder: it is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".encdiff-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EncdiffError(f"{flag} {shown}: cannot write in {parent} ({e.strerror or e})") from None
    return folder


def _say_replaced(path: Path) -> None:
    """An output that already exists is replaced, as every command does, and said, not done silently."""
    if path.exists():
        print(f"encdiff: replacing {path}", file=sys.stderr)


def cmd_edit(args: argparse.Namespace) -> int:
    from . import editing
    from .images import image_grid, load_image, save_png

    out = _check_output(Path(args.out), (".png",), "--out")
    gif = _check_output(Path(args.gif), (".gif",), "--gif") if getattr(args, "gif", None) else None
    _in_range(args.seed, "--seed", 0, 2**63 - 1)
    _in_range(args.steps, "--steps", 1)
    generator = _generator(args)
    read = lambda path: torch.from_numpy(load_image(path, generator.image_size, generator.image_channels))[None]
    label = lambda name: (None if name is None else
                          torch.tensor([generator.class_index(name)]))
    labels = label(args.class_)
    # Every name is checked before the work starts (an inversion takes a while).
    target = label(getattr(args, "to_class", None))
    if args.guidance is not None and labels is None and target is None:
        raise EncdiffError("--guidance needs --class (the class to guide towards)")
    common = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    if getattr(args, "guidance_interval", None) is not None:
        common["guidance_interval"] = args.guidance_interval
    if args.mode in ("img2img", "inpaint"):
        generator.settings(labels, **common)  # a sampler that does not fit is refused before the image is read
    if args.mode == "img2img":
        editing.check_strength(args.strength)
        image = read(args.image)
        result = editing.img2img(generator, image, [args.seed], labels, strength=args.strength, **common)
        steps = generator.settings(labels, steps=args.steps).steps
        print(f"img2img: {editing.steps_run(steps, args.strength)} of {steps} steps from the encoded image")
        _say_replaced(out)
        save_png(image_grid(torch.cat([image, result]), rows=1), out)
    elif args.mode == "inpaint":
        image = read(args.image)
        mask = _read_mask(Path(args.mask), args.image, generator.image_size)
        if args.resample > 1:
            settings = generator.settings(labels, sampler=args.sampler, steps=args.steps)
            per_step = 2 if settings.sampler == "heun" else 1
            print(f"RePaint: {settings.steps} steps x {args.resample} resamplings = about "
                  f"{settings.steps * args.resample * per_step} model evaluations ({args.resample}x the cost of plain "
                  "inpainting)")
        result = editing.inpaint(generator, image, mask, [args.seed], labels, resample=args.resample, **common)
        _say_replaced(out)
        save_png(image_grid(torch.cat([image, (image.float() * (1 - mask)).to(torch.uint8), result]), rows=1), out)
    elif args.mode == "invert":
        ode = _ode_settings(args)
        image = read(args.image)
        noise = editing.invert(generator, image, labels, **ode)
        latents = editing.regenerate_latents(generator, noise, target if target is not None else labels,
                                             guidance_scale=args.guidance, **ode)
        if target is None:
            z0 = generator.encode(image).double()
            error = (latents.double() - z0).square().mean() / z0.var()
            print(f"inversion round trip: mean squared latent error {error:.3g} x the latent variance")
        _say_replaced(out)
        save_png(image_grid(torch.cat([image, generator.decode(latents)]), rows=1), out)
    else:
        frames = args.frames
        if (args.seeds is None) == (args.images is None):
            raise EncdiffError("give exactly one of --seeds A B (two noises) or --images A B (two real images)")
        if args.seeds is not None:
            # Between two generated images: the generator's own sampling, so the ends are `encdiff sample --seed A`
            # and `--seed B` exactly.
            for seed in args.seeds:
                _in_range(seed, "--seeds", 0, 2**63 - 1)
            images = editing.interpolate_seeds(generator, tuple(args.seeds), frames, labels, **common)
        else:
            # Between two real images: their exact ODE inversions, regenerated over the same grid.
            ode = _ode_settings(args)
            ends = [editing.invert(generator, read(path), labels, **ode) for path in args.images]
            path_noise = editing.interpolate_noise(ends[0].double(), ends[1].double(), frames)
            images = editing.regenerate(generator, path_noise, None if labels is None else labels.expand(frames),
                                        guidance_scale=args.guidance, **ode)
        _say_replaced(out)
        save_png(image_grid(images, rows=1), out)
        if gif is not None:
            from PIL import Image

            pictures = [Image.fromarray(i.permute(1, 2, 0).squeeze(-1).numpy()) for i in images]
            pictures += pictures[-2:0:-1]  # there and back
            _say_replaced(gif)
            pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=120, loop=0)
            print(gif)
    print(out)
    return 0


def _read_mask(path: Path, image_path: str, resolution: int) -> torch.Tensor:
    """A binary mask PNG of the image's own size (white = repaint), resized and cropped like the image (nearest)."""
    import numpy as np
    from PIL import Image

    from .images import fit

    try:
        with Image.open(path) as m:
            mask = m.convert("L")
        with Image.open(image_path) as im:
            image_size = im.size
    except (OSError, ValueError) as e:
        raise EncdiffError(f"--mask {path}: not a readable image ({e})") from None
    if mask.size != image_size:
        raise EncdiffError(f"--mask {path}: {mask.size[0]}x{mask.size[1]} pixels, the image {image_path} is "
                           f"{image_size[0]}x{image_size[1]}; give a mask of the image's size")
    values = np.unique(np.asarray(mask)).tolist()
    if not (set(values) <= {0, 255} or set(values) <= {0, 1}):
        raise EncdiffError(f"--mask {path}: grey levels {values[:6]}{'...' if len(values) > 6 else ''}; expected a "
                           "binary mask (black 0 = keep, white 255 = repaint), saved as PNG, not JPEG")
    binary = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8))
    return torch.from_numpy(np.asarray(fit(binary, resolution, Image.Resampling.NEAREST)).astype(np.float32))[None, None]


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    try:
        from .server import ServerLimits, serve
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise EncdiffError(f"encdiff serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install 'encdiff[serve]'") from None
    if not 0 < args.port < 65536:
        raise EncdiffError(f"--port {args.port}: expected 1..65535")
    limits = ServerLimits(max_images=args.max_images, max_steps=args.max_steps, queue_size=args.queue_size)
    for field in ("max_images", "max_steps", "queue_size"):
        if getattr(limits, field) < 1:
            raise EncdiffError(f"--{field.replace('_', '-')} {getattr(limits, field)}: expected at least 1")
    generator = _generator(args)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        raise EncdiffError(f"--host {args.host}: expected an IP address to bind (127.0.0.1, ::1, 0.0.0.0, ...)") from None
    if not loopback:
        print(f"encdiff: serving on {args.host}, reachable from other machines: anyone who can reach it can use "
              "this CPU/GPU; add --allowed-host NAME for each host name clients use", file=sys.stderr)
    serve(generator, args.host, args.port, limits, tuple(args.allowed_host or ()))
    return 0


def cmd_set_autoencoder(args: argparse.Namespace) -> int:
    from .autoencoder import Autoencoder
    from .pipeline import Generator

    generator = Generator.from_pretrained(args.generator)
    try:
        updated = generator.with_autoencoder(Autoencoder.from_pretrained(args.autoencoder))
    except EncdiffError as e:
        raise EncdiffError(f"{args.autoencoder}: {e}") from None
    out = Path(args.out or args.generator)
    updated.save_pretrained(out, dtype=torch.float16 if args.half else None)
    print(f"wrote {out} with the decoder of {args.autoencoder}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import folder_kind
    from .pipeline import Generator, bundled_path
    from .training.state import latest_training_state, load_training_state

    path = Path(args.path) if args.path else bundled_path()
    kind = folder_kind(path)
    if kind == "generator":
        # Loaded, not read raw: info vouches for exactly what `sample` and `eval` accept, with the same message.
        generator = Generator.from_pretrained(path)
        print(f"{path}: generator ({'latent' if generator.downsample_factor > 1 else 'pixel'} diffusion), denoiser "
              f"{generator.spec.kind}, classes: {', '.join(generator.class_names) or 'none'}")
        s = generator.sampling
        print(f"  sampling: {s.sampler}, {s.steps} steps"
              + (f" at noise levels {list(s.sigmas)}" if s.sigmas else f", {s.schedule} schedule")
              + (f", guidance {s.guidance_scale}" if s.guidance_scale else ""))
        if generator.distillation:
            d = generator.distillation
            print(f"  distilled: guidance {d.get('guidance_scale')} built in, {d.get('images')} images, "
                  f"{d.get('intervals')} intervals, {d.get('solver')} teacher steps")
        for sub in ("unet", "autoencoder"):
            if (path / sub).is_dir():
                _describe_model(path / sub)
        return 0
    if kind == "run":
        latest = latest_training_state(path)
        if latest is None:
            print(f"{path}: run folder without a complete checkpoint")
            return 0
        _, meta = load_training_state(latest)
        print(f"{path}: {meta['stage']} run, step {meta['step']} of {meta['config']['steps']}, "
              f"{meta['images_seen']} images seen, latest checkpoint {latest.name}")
        # Evaluation rows carry metrics, not the loss: the last row that has one.
        losses = [row for row in meta["history"] if "loss" in row]
        if losses:
            print(f"  last logged loss {losses[-1]['loss']:.4f} (step {losses[-1]['step']})")
        evals = [row for row in meta["history"] if "fid" in row]
        if evals:
            print(f"  last evaluation: FID {evals[-1]['fid']:.2f} (step {evals[-1]['step']})")
        print(f"  finished model: {path / 'model'}" if (path / "model").is_dir() else "  not finished")
        return 0
    if kind is not None:
        _describe_model(path)
        return 0
    raise EncdiffError(f"{path}: neither a model folder, a generator folder nor a run folder")


def _describe_model(folder: Path) -> None:
    from .autoencoder import Autoencoder
    from .checkpoint import CONFIG, read_json
    from .backbones import BACKBONES, CLASS_NAMES

    raw = read_json(folder / CONFIG)
    name = raw.get("encdiff_class") or raw.get("_class_name")
    cls = {"Autoencoder": Autoencoder, "AutoencoderKL": Autoencoder,
           **{n: BACKBONES[b] for n, b in CLASS_NAMES.items()}}.get(name)
    if cls is None:
        raise EncdiffError(f"{folder / CONFIG}: not an encdiff or diffusers model config")
    config, weights = cls.verify(folder)  # the weights are there, safetensors, and match their recorded hash
    fmt = "diffusers" if "_class_name" in raw else "encdiff"
    print(f"{folder}: {cls.__name__} ({fmt} format, weights {weights.name})")
    for key, value in dataclasses.asdict(config).items():
        print(f"  {key}: {value}")


def _split_folders(data: Path, test: str | None) -> tuple[Path, Path | None]:
    """DATA with train/ (and test/) subfolders, or DATA itself as the training folder."""
    if (data / "train").is_dir():
        return data / "train", Path(test) if test else (data / "test" if (data / "test").is_dir() else None)
    return data, Path(test) if test else None


def cmd_train_feature_net(args: argparse.Namespace) -> int:
    from .data import ImageDataset
    from .featurenet import FeatureNetConfig, FeatureNetTraining, train_feature_net

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


def _in_range(value: int | None, flag: str, minimum: int, maximum: int | None = None) -> None:
    """A numeric flag checked before any work: one line naming the flag and what it accepts."""
    if value is not None and (value < minimum or (maximum is not None and value > maximum)):
        raise EncdiffError(f"{flag} {value}: expected {minimum}" + (f" .. {maximum}" if maximum is not None else " or more"))


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalRequest, run_evaluation

    for flag, value, minimum in (("--num", args.num, 1), ("--batch-size", args.batch_size, 1),
                                 ("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2),
                                 ("--k", args.k, 1), ("--bpd-images", args.bpd_images, 1),
                                 ("--reference-num", args.reference_num, 1), ("--steps", args.steps, 1),
                                 ("--resolution", args.resolution, 1), ("--bpd-timesteps", args.bpd_timesteps, 1)):
        _in_range(value, flag, minimum)
    _in_range(args.seed, "--seed", 0, 2**63 - args.num)
    _in_range(args.resolution, "--resolution", 1, 4096)
    if args.out and Path(args.out).is_file():
        raise EncdiffError(f"--out {args.out}: is a file; give a folder for metrics.json and metrics.md")
    request = EvalRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest)})
    json_path, md_path = run_evaluation(request)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """A bad flag or value is one line on stderr and exit status 2, like every other user mistake (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="encdiff", description="Encoder-decoder diffusion models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train-autoencoder", help="stage 1: train a KL autoencoder on an image folder",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_flags(p, "autoencoder")

    p = commands.add_parser("train", help="stage 2: train a diffusion U-Net (latent or pixel space)",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_flags(p, "diffusion")
    p.add_argument("--pixel", action="store_true", help="diffusion in pixel space")

    p = commands.add_parser("distill", help="consistency-distil a generator into a 1-4 step student (guidance built in)",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_flags(p, "consistency")

    p = commands.add_parser("sample", help="generate images", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="generator folder (default: the CIFAR-10 model shipped in the package)")
    _model_flags(p, positional=True)
    p.add_argument("--num", type=int, help="number of images (default: 10 per class, one row each; "
                   "16 for an unconditional model or with --class)")
    p.add_argument("--class", dest="class_", help="class name or index")
    _sampling_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--out", help="grid PNG (default samples.png unless --out-dir)")
    p.add_argument("--out-dir", help="also write one PNG per image here (alone: no grid, any --num)")
    p.add_argument("--batch-size", type=int, default=100, help="images generated at once (memory)")

    p = commands.add_parser("reconstruct", help="encode and decode images; side-by-side PNGs and PSNR")
    p.add_argument("model", help="autoencoder folder (encdiff or diffusers)")
    p.add_argument("input", help="an image or a folder of images")
    p.add_argument("--out", default="reconstructions", help="output folder")
    p.add_argument("--resolution", type=int, help="resize/crop to this size (default: the model's sample_size)")

    p = commands.add_parser("export", help="write a run's EMA weights as a model folder")
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--diffusers", action="store_true", help="diffusers' folder format")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size; they load "
                   "back as float32)")
    _sampling_flags(p, "the generator's stored default: ", "the run's")
    p.add_argument("--sigma-rel", type=_finite_float, help="export the post-hoc EMA of this relative width "
                   "(EDM2), reconstructed from the run's snapshots, instead of its EMA")

    p = commands.add_parser("posthoc-ema", help="reconstruct a run's EMA at any widths after training (EDM2 "
                            "post-hoc EMA): one model folder per --sigma-rel")
    p.add_argument("run", help="run folder trained with --phema-every N")
    p.add_argument("--sigma-rel", type=_finite_float, nargs="+", required=True, metavar="S",
                   help="relative widths to reconstruct, in (0, 0.2887); EDM2's best are often 0.05-0.15")
    p.add_argument("--out", default="posthoc-ema", help="folder for the sigma-rel-S/ model folders")
    p.add_argument("--half", action="store_true", help="store the weights as float16")

    p = commands.add_parser("edit", help="edit real images: img2img, inpaint, invert (class swap), interpolate",
                            epilog=EDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True)
    for mode, help_ in (("img2img", "SDEdit: noise the encoded image part of the way and denoise it"),
                        ("inpaint", "repaint where a mask is white; every other pixel is kept exactly"),
                        ("invert", "ODE inversion to noise and back; --to-class regenerates under another class"),
                        ("interpolate", "a strip between two seeds' noises or two images' inversions")):
        m = modes.add_parser(mode, help=help_, epilog=EDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        if mode != "interpolate":
            m.add_argument("image", help="the image to edit (resized and centre-cropped to the model's size)")
        _model_flags(m)
        m.add_argument("--class", dest="class_", help="class name or index (default: none, the null class)")
        default = {"invert": "the inversion's own: euler, 50 steps",
                   "interpolate": "the generator's; with --images the inversion's: euler, 50 steps"}
        _sampling_flags(m, default=default.get(mode, "the generator's"), sigmas=False,
                        interval=mode != "invert")
        m.add_argument("--seed", type=int, default=0, help="seed of the noise")
        m.add_argument("--out", default=f"{mode}.png", help="output PNG")
        if mode == "img2img":
            m.add_argument("--strength", type=_finite_float, default=0.5,
                           help="0 keeps the image (autoencoder round trip), 1 ignores it; runs int(steps x strength) steps")
        if mode == "inpaint":
            m.add_argument("--mask", required=True, help="PNG of the image's size: white = repaint, black = keep")
            m.add_argument("--resample", type=int, default=1, help="RePaint resamplings per step (cost x this)")
        if mode == "invert":
            m.add_argument("--to-class", help="regenerate under this class instead (class swap)")
        if mode == "interpolate":
            m.add_argument("--seeds", type=int, nargs=2, help="two seeds: interpolate their noises")
            m.add_argument("--images", nargs=2, help="two images: interpolate their inversions")
            m.add_argument("--frames", type=int, default=8, help="images in the strip, both ends included")
            m.add_argument("--gif", help="also write an animated GIF here")

    p = commands.add_parser("serve", help="an HTTP API and a web page for a generator (needs encdiff[serve])")
    p.add_argument("model", nargs="?", help="generator folder (default: the bundled CIFAR-10 model)")
    _model_flags(p, positional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-images", type=int, default=16, help="images per request")
    p.add_argument("--max-steps", type=int, default=100, help="sampler steps per request")
    p.add_argument("--queue-size", type=int, default=4, help="requests running or waiting; more get 429")
    p.add_argument("--allowed-host", action="append", help="a host name clients use (Host/Origin check); repeatable")

    p = commands.add_parser("set-autoencoder", help="put a fine-tuned decoder into a generator (same latent space)")
    p.add_argument("generator", help="generator folder")
    p.add_argument("autoencoder", help="autoencoder folder sharing the generator's encoder (a decoder-only fine-tune)")
    p.add_argument("--out", help="write the new generator here (default: replace the generator folder's files)")
    p.add_argument("--half", action="store_true", help="store all weights as float16")

    p = commands.add_parser("info", help="describe a model, generator or run folder")
    p.add_argument("path", nargs="?", help="the folder (default: the bundled CIFAR-10 generator)")

    p = commands.add_parser("train-feature-net", help="train the CIFAR-style classifier whose features the "
                            "metrics use (its figures are not comparable to Inception FID)")
    p.add_argument("data", help="folder with train/ and test/ class subfolders, or one folder of class subfolders")
    p.add_argument("--test", help="held-out folder for test accuracy (default DATA/test when present)")
    p.add_argument("--out", default="featurenet.safetensors", help="output weights (fp16 safetensors)")
    p.add_argument("--epochs", type=int, default=18,
                   help="training epochs; 0 with --init re-calibrates and re-tests that net without training")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4, help="peak learning rate (one-cycle, SGD Nesterov)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--cache-dir", help="cache the decoded images here (safetensors)")
    p.add_argument("--init", help="start from this feature-net file (a further, shorter cycle)")

    p = commands.add_parser("eval", help="measure a generator, a folder of generated images or an autoencoder "
                            "(FID, KID, precision/recall, class accuracy, PSNR/SSIM, bits/dim)", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="generator folder, folder of generated images, or autoencoder folder")
    p.add_argument("--reference", help="reference image folder (e.g. a split) or reference-*.safetensors statistics")
    p.add_argument("--num", type=int, default=10000, help="samples to generate (autoencoder: images to reconstruct)")
    p.add_argument("--reference-num", type=int, help="use a seeded random subset of this many reference images")
    _sampling_flags(p)
    p.add_argument("--classes", help="comma-separated class names or indices to generate (default: all, balanced)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; also seeds subsets")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--resolution", type=int, help="resize and centre-crop reference (and sample folder) images to this")
    p.add_argument("--feature-net", help="feature-net file from `encdiff train-feature-net` (default: the shipped one)")
    p.add_argument("--inception", help="pytorch-fid's Inception weights (.pth): the standard Inception FID instead")
    p.add_argument("--cache-dir", help="cache decoded images and reference statistics here")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    p.add_argument("--bpd", action="store_true", help="also bits/dim of the reference images (pixel-space VP models)")
    p.add_argument("--bpd-images", type=int, default=1000)
    p.add_argument("--bpd-timesteps", type=int, help="per-image timestep draws (unbiased estimate; default all T)")
    p.add_argument("--workers", type=int, help="image decoding processes")
    p.add_argument("--out", help="output folder for metrics.json and metrics.md (default eval-<target name>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    # A warning (skipped files, a cache rebuilt) is one line, like an error, not Python's file:line form.
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
        f"encdiff: warning: {message}", file=sys.stderr)
    try:
        if args.command in ("train-autoencoder", "train", "distill"):
            return cmd_train(args, {"train-autoencoder": "autoencoder", "train": "diffusion",
                                    "distill": "consistency"}[args.command])
        return {"sample": cmd_sample, "reconstruct": cmd_reconstruct, "export": cmd_export,
                "info": cmd_info, "edit": cmd_edit, "posthoc-ema": cmd_posthoc_ema, "serve": cmd_serve, "set-autoencoder": cmd_set_autoencoder, "train-feature-net": cmd_train_feature_net,
                "eval": cmd_eval}[args.command](args)
    except TrainingInterrupted as e:
        print(f"encdiff: {e}", file=sys.stderr)
        return 128 + int(e.signum)  # 130 after Ctrl-C, 143 after SIGTERM: `a && b` does not carry on
    except EncdiffError as e:
        print(f"encdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `encdiff info ... | head`: the reader has gone. Python's documented remedy: point stdout at devnull so the
        # flush at exit does not fail again, and exit like a process killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
