"""The commands that make images: sample, reconstruct, edit (img2img, inpaint, invert, interpolate)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..errors import EncdiffError, count
from .flags import check_output, check_writable_folder, generator_of, in_range, say_replaced


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..buckets import parse_shape
    from ..images import image_grid, save_png

    num = args.num
    if num is not None and num < 1:
        raise EncdiffError(f"--num {num}: expected at least 1 image")
    if args.batch_size < 1:
        raise EncdiffError(f"--batch-size {args.batch_size}: expected at least 1")
    grid_path = check_output(Path(args.out or "samples.png"), (".png",), "--out") if args.out or not args.out_dir \
        else None
    out_dir = check_writable_folder(Path(args.out_dir), "--out-dir") if args.out_dir else None
    generator = generator_of(args)
    if num is None:
        # a class-conditional model with no --class: one row of ten per class
        num = 10 * generator.num_classes if generator.num_classes and args.class_ is None else 16
    if grid_path is not None and num > MAX_GRID_IMAGES:
        raise EncdiffError(f"--num {num}: a grid of more than {MAX_GRID_IMAGES} images is too large to hold; write "
                           "the images one by one with --out-dir (and no --out)")
    if not 0 <= args.seed <= 2**63 - num:
        raise EncdiffError(f"--seed {args.seed}: expected 0 .. 2**63 - num (image i uses seed + i)")
    size = generator.check_size(parse_shape(args.size, "--size") if args.size else None)
    labels = generator.labels(num, args.class_)
    if args.guidance is not None and labels is None:
        raise EncdiffError("--guidance needs a class-conditional model")
    # Flags win over the generator's own sampling settings (measured for the bundled model), as in the library.
    settings = generator.settings(labels, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                                  sigmas=args.sigmas, guidance_interval=args.guidance_interval,
                                  guidance_kind=args.guidance_kind, decoder=args.decoder)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(num)]
    kept = []  # only for the grid; --out-dir alone streams the images to disk and keeps none
    # In batches (each image depends on its own seed only, so the pixels equal one big batch's), memory bounded.
    with tqdm(total=num, desc="sampling", unit="img", disable=num <= args.batch_size) as bar:
        for start in range(0, num, args.batch_size):
            batch_seeds = seeds[start:start + args.batch_size]
            batch_labels = None if labels is None else labels[start:start + args.batch_size]
            images = generator.images(batch_seeds, batch_labels, settings, size=size)
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

    from ..autoencoder import Autoencoder
    from ..data import image_files_under
    from ..images import UnreadableImageError, image_grid, load_image, save_png, to_uint8, to_unit

    in_range(args.resolution, "--resolution", 1, 4096)
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


def _ode_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The inversion's ODE settings: its own (an exact inverse needs a one-step method and a fine grid, not the
    generator's sampling), changed by --sampler and --steps."""
    from ..editing import INVERSION_SAMPLER, INVERSION_STEPS, ODE_SAMPLERS

    sampler = args.sampler or INVERSION_SAMPLER
    if sampler not in ODE_SAMPLERS:
        raise EncdiffError(f"--sampler {sampler}: inversion integrates the ODE deterministically, one step at a "
                           f"time; use one of {', '.join(ODE_SAMPLERS)}")
    return dict(sampler=sampler, steps=args.steps or INVERSION_STEPS)


def cmd_edit(args: argparse.Namespace) -> int:
    from .. import editing
    from ..images import image_grid, load_image, save_png

    out = check_output(Path(args.out), (".png",), "--out")
    gif = check_output(Path(args.gif), (".gif",), "--gif") if getattr(args, "gif", None) else None
    in_range(args.seed, "--seed", 0, 2**63 - 1)
    in_range(args.steps, "--steps", 1)
    generator = generator_of(args)
    read = lambda path: torch.from_numpy(load_image(path, generator.image_size, generator.image_channels))[None]
    label = lambda name: (None if name is None else
                          torch.tensor([generator.class_index(name)]))
    labels = label(args.class_)
    # Every name is checked before the work starts (an inversion takes a while).
    target = label(getattr(args, "to_class", None))
    if args.guidance is not None and labels is None and target is None:
        raise EncdiffError("--guidance needs --class (the class to guide towards)")
    common = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    for name in ("guidance_interval", "guidance_kind", "decoder"):
        if getattr(args, name, None) is not None:
            common[name] = getattr(args, name)
    if args.mode in ("img2img", "inpaint"):
        generator.settings(labels, **common)  # a sampler that does not fit is refused before the image is read
    if args.mode == "img2img":
        editing.check_strength(args.strength)
        image = read(args.image)
        result = editing.img2img(generator, image, [args.seed], labels, strength=args.strength, **common)
        steps = generator.settings(labels, steps=args.steps).steps
        print(f"img2img: {editing.steps_run(steps, args.strength)} of {steps} steps from the encoded image")
        say_replaced(out)
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
        say_replaced(out)
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
        say_replaced(out)
        save_png(image_grid(torch.cat([image, generator.decode(latents)]), rows=1), out)
    else:
        frames = args.frames
        if (args.seeds is None) == (args.images is None):
            raise EncdiffError("give exactly one of --seeds A B (two noises) or --images A B (two real images)")
        if args.seeds is not None:
            # Between two generated images: the generator's own sampling, so the ends are `encdiff sample --seed A`
            # and `--seed B` exactly.
            for seed in args.seeds:
                in_range(seed, "--seeds", 0, 2**63 - 1)
            images = editing.interpolate_seeds(generator, tuple(args.seeds), frames, labels, **common)
        else:
            # Between two real images: their exact ODE inversions, regenerated over the same grid.
            ode = _ode_settings(args)
            ends = [editing.invert(generator, read(path), labels, **ode) for path in args.images]
            path_noise = editing.interpolate_noise(ends[0].double(), ends[1].double(), frames)
            images = editing.regenerate(generator, path_noise, None if labels is None else labels.expand(frames),
                                        guidance_scale=args.guidance, **ode)
        say_replaced(out)
        save_png(image_grid(images, rows=1), out)
        if gif is not None:
            from PIL import Image

            pictures = [Image.fromarray(i.permute(1, 2, 0).squeeze(-1).numpy()) for i in images]
            pictures += pictures[-2:0:-1]  # there and back
            say_replaced(gif)
            pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=120, loop=0)
            print(gif)
    print(out)
    return 0


def _read_mask(path: Path, image_path: str, resolution: int) -> torch.Tensor:
    """A binary mask PNG of the image's own size (white = repaint), resized and cropped like the image (nearest)."""
    import numpy as np
    from PIL import Image

    from ..images import fit

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
