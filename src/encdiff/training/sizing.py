"""Defaults from the data: what `encdiff train-autoencoder FOLDER` and `encdiff train FOLDER` choose when no preset,
model or config file says otherwise (and `encdiff train-light-decoder FOLDER`: its autoencoder's size and channels,
the folder's buckets). The folder is surveyed once (every file's class, a seeded sample's sizes and
modes, read from the headers only), and these rules, the only place they are written, size the run:

    resolution  the median shorter side, rounded down to a multiple of 16, within 32 .. 256
    channels    4 (RGBA) when at least half the sampled images carry transparency, 1 when all are grayscale, else 3
    buckets     aspect-ratio buckets (buckets.py: about resolution^2 pixels, aspect within 1:2 .. 2:1) when at
                least a quarter of the sampled images are not square (off 1:1 by more than 10 %), else centre crops
    autoencoder downsampling f = 4 up to 64 px, 8 above (latents of 8x8 to 32x32 cells); 8 latent channels at
                f = 4, 16 at f = 8 (emoji64, 64 px, the autoencoder 90 minutes, the U-Net 40: 8 channels generate
                better from the same U-Net budget, emoji-net FID and class accuracy, and reconstruct alpha at 31.2 dB
                against 33.3; 16 channels at f = 4, 4,096 numbers for 4,096 pixels, left the U-Net a target it
                learnt worse);
                widths 32/64/64 (f = 4) or 32/64/128/128 (f = 8), one ResNet block per level; the detail-preserving
                objective of the bundled model, L1 + 0.2 (1 - SSIM), at every size; the PatchGAN with feature
                matching from a quarter of the run at f = 8 only (at f = 4 `--adv-weight 0.5` adds it): at f = 4,
                8 or 16 latent values per 4x4 pixels reconstruct closely, and the GAN held the reconstruction
                where it stood when it started (emoji64, 64 px, 16 channels, `--time 90m`: the training L1 stayed at
                0.07-0.10 for the 1,700 GAN steps; without the GAN it fell to 0.03, and alpha PSNR rose from 28.6 to
                33.3 dB, colour from 27.0 to 32.3, while the relative rFID fell from 0.14 to 0.03); bf16 autocast where
                this CPU computes bf16 natively (avx512_bf16 / amx_bf16: 1.8x faster steps measured at 64 px; about
                10x slower on one without, so never there), and on CUDA as always; the weights stay float32
    U-Net       EDM2's magnitude-preserving backbone with its learned per-sigma weighting and the inverse-square-
                root rate (the bundled model's recipe); levels down to 2x2 cells (8-cell latents: 3 levels, 16: 4,
                32: 5), widths 64/128/128..., attention at 4x4 cells and below; bf16 autocast as for the
                autoencoder (1.7x faster steps on 16x16 latents)
    steps       the autoencoder 30 epochs, the U-Net 100 epochs, each within the bounds below
    balance     the U-Net draws every class equally often when the largest class has at least 4x the images of
                the smallest (emoji64, 170 to 4,522 per class, 40 minutes: a held-out-trained classifier recognised
                the samples as their class at 0.75 on average against 0.65 unbalanced, the smallest class 0.27
                against 0.09, at a recall of 0.35 against 0.46 in that classifier's features; `--no-balance-classes`
                keeps the data's proportions)

Stated on one screen before training (`--dry-run` shows it and stops); any flag or config field overrides a choice.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..buckets import bucket_shapes, format_shape
from ..data import scan_folder
from ..errors import EncdiffError, count
from ..images import has_alpha
from ..precision import cpu_info, native_bf16

SURVEY_SAMPLE = 2000  # files whose headers are read (seeded, spread over the folder); sizes and modes come from them
MIN_RESOLUTION, MAX_RESOLUTION, MULTIPLE = 32, 256, 16
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
AUTOENCODER_EPOCHS, AUTOENCODER_STEPS = 30, (1000, 20000)
DIFFUSION_EPOCHS, DIFFUSION_STEPS = 100, (2000, 100000)
AUTOENCODER_BATCH, DIFFUSION_BATCH = 64, 128
NON_SQUARE_SHARE = 0.25  # the share of non-square images from which a folder trains with aspect-ratio buckets
BALANCE_RATIO = 4  # largest / smallest class from which the U-Net draws the classes equally often


@dataclass(frozen=True)
class FolderSurvey:
    """What a folder holds, as far as sizing a run needs."""
    images: int  # image files found (unreadable ones included: decoding reports them)
    class_counts: dict[str, int]  # files per class subfolder; empty for a flat folder
    sampled: int  # files whose headers were read
    short_side: int  # median shorter side of the sampled images, in pixels
    aspect: float  # median width / height of the sampled images
    alpha: float  # fraction of the sampled images with transparency
    grayscale: float  # fraction of the sampled images stored as grayscale
    unreadable: int  # sampled files PIL could not open
    non_square: float = 0.0  # fraction of the sampled images whose width / height is off 1 by more than 10 %

    def classes_line(self) -> str:
        if not self.class_counts:
            return "no class subfolders: unconditional"
        counts = sorted(self.class_counts.values())
        balance = f", from {counts[0]} to {counts[-1]} per class" if counts[0] != counts[-1] else " each"
        listed = ", ".join(f"{name} {n}" for name, n in self.class_counts.items())
        return f"{count(len(counts), 'class', 'classes')}{balance} ({listed})"


def survey_folder(root: str | Path, sample: int = SURVEY_SAMPLE, seed: int = 0,
                  exclude: tuple[Path, ...] = ()) -> FolderSurvey:
    """Scan `root` like the trainer does and read the headers (size, mode) of a seeded random sample of its files."""
    files, labels, class_names = scan_folder(root, exclude)
    chosen = files if len(files) <= sample else random.Random(seed).sample(files, sample)
    sides, aspects, alpha, gray, unreadable = [], [], 0, 0, 0
    for path in chosen:
        try:
            with Image.open(path) as image:
                width, height = image.size
                alpha += has_alpha(image)
                gray += image.mode in GRAYSCALE_MODES or (image.mode == "P" and _grey_palette(image))
        except Exception:  # decoding names unreadable files later, with the reason
            unreadable += 1
            continue
        sides.append(min(width, height))
        aspects.append(width / height)
    if not sides:
        raise EncdiffError(f"{root}: none of the {count(len(chosen), 'sampled image file')} could be opened")
    counts = {name: 0 for name in class_names}
    for label in labels or ():
        counts[class_names[label]] += 1
    read = len(sides)
    return FolderSurvey(images=len(files), class_counts=counts, sampled=len(chosen),
                        short_side=int(statistics.median(sides)), aspect=float(statistics.median(aspects)),
                        alpha=alpha / read, grayscale=gray / read, unreadable=unreadable,
                        non_square=sum(abs(math.log(a)) > math.log(1.1) for a in aspects) / read)


def _grey_palette(image: Image.Image) -> bool:
    palette = image.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def default_resolution(short_side: int) -> int:
    """The median shorter side rounded down to a multiple of 16, within 32 .. 256 (smaller images are upscaled)."""
    return max(MIN_RESOLUTION, min(MAX_RESOLUTION, short_side // MULTIPLE * MULTIPLE))


def default_channels(survey: FolderSurvey) -> int:
    if survey.alpha >= 0.5:
        return 4
    return 1 if survey.grayscale == 1.0 else 3


def downsampling(resolution: int) -> int:
    """The autoencoder's factor f: 4 up to 64 px, 8 above, so the U-Net works on 8x8 .. 32x32 latents."""
    return 4 if resolution <= 64 else 8


def gan(factor: int) -> bool:
    """Whether the autoencoder trains with the PatchGAN: at f = 8, not at f = 4 (the rule in the module docstring)."""
    return factor > 4


def autoencoder_model(resolution: int) -> dict[str, Any]:
    """The autoencoder preset and its overrides for a resolution (rule in the module docstring)."""
    f = downsampling(resolution)
    widths = (32, 64, 64) if f == 4 else (32, 64, 128, 128)
    return {"model": "cifar10_small", "model_overrides": {
        "block_out_channels": list(widths), "attention_levels": [False] * len(widths),
        "latent_channels": 8 if f == 4 else 16}}


def unet_model(latent_side: int) -> dict[str, Any]:
    """The magnitude-preserving U-Net for latents of `latent_side` cells: levels down to 2x2 cells, attention at 4x4
    and below, as the bundled model on 8x8 latents (attention over more cells costs a CPU more than it gives)."""
    levels = max(2, round(math.log2(latent_side)))  # 8 -> 3 levels (8, 4, 2), 16 -> 4, 32 -> 5
    widths = [64] + [128] * (levels - 1)
    attention = [latent_side >> level <= 4 for level in range(levels)]
    return {"backbone": "edm2", "model": "cifar10_latent", "uncertainty": True,
            "model_overrides": {"block_out_channels": widths, "attention_levels": attention}}


def buckets_line(plan: Plan, survey: FolderSurvey, resolution: int, factor: int) -> None:
    """Aspect-ratio buckets for a folder of non-square images (the rule in the module docstring)."""
    if survey.non_square >= NON_SQUARE_SHARE:
        plan.values["buckets"] = ["auto"]
        shapes = ", ".join(format_shape(s) for s in bucket_shapes(resolution, 2 * factor))
        plan.lines.append(f"aspect-ratio buckets {shapes} ({survey.non_square:.0%} of the sampled images are not "
                          "square; those with fewer images than a batch merge into their neighbours; --buckets none: "
                          "centre crops)")


def epochs_to_steps(images: int, batch: int, epochs: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], math.ceil(epochs * images / batch)))


@dataclass
class Plan:
    """The config values a folder's defaults give one stage, and the lines that say why."""
    values: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def machine_bf16() -> dict[str, Any]:
    """bf16 autocast where this CPU computes bf16 natively; otherwise nothing (the config's default: CUDA only)."""
    return {"bf16": True} if native_bf16(cpu_info()[1]) else {}


def bf16_said(plan: Plan) -> str:
    return "; bf16 autocast (this CPU computes bf16 natively)" if plan.values.get("bf16") else ""


def plan_for_folder(survey: FolderSurvey, stage: str, autoencoder=None, resolution: int | None = None,
                    channels: int | None = None) -> Plan:
    """The defaults of `stage` ("autoencoder", "diffusion" or "light_decoder") for a surveyed folder. `resolution` and
    `channels`, when the user gave them, replace the rule's; a diffusion or light-decoder stage takes both from its
    `autoencoder`, and so does an autoencoder stage that starts from one (`--init`: its model is that autoencoder's,
    the rest is the rule's). Each takes aspect-ratio buckets where the folder's images are not square."""
    plan = Plan()
    say = plan.lines.append
    say(f"data: {count(survey.images, 'image')}; {survey.classes_line()}")
    say(f"  sizes: median shorter side {survey.short_side} px, median aspect {survey.aspect:.2f} (sampled "
        f"{survey.sampled}); transparency in {survey.alpha:.0%}, grayscale {survey.grayscale:.0%}")
    if stage == "autoencoder":
        init = autoencoder
        if init is not None:
            resolution, channels = init.config.sample_size, init.config.in_channels
        res = resolution or default_resolution(survey.short_side)
        ch = channels or default_channels(survey)
        why_res = "the init autoencoder's" if init else "given" if resolution else \
            f"the median shorter side {survey.short_side} rounded down to a multiple of {MULTIPLE}, within " \
            f"{MIN_RESOLUTION}..{MAX_RESOLUTION}"
        why_ch = "the init autoencoder's" if init else "given" if channels else (
            "most images are transparent" if ch == 4 else "every image is grayscale" if ch == 1 else
            "colour, no transparency")
        steps = epochs_to_steps(survey.images, AUTOENCODER_BATCH, AUTOENCODER_EPOCHS, AUTOENCODER_STEPS)
        model = {} if init else autoencoder_model(res)
        f = init.downsample_factor if init else downsampling(res)
        plan.values.update(resolution=res, channels=ch, **model, steps=steps, batch_size=AUTOENCODER_BATCH, lr=5e-4,
                           warmup_steps=100, ssim_weight=0.2, adv_weight=0.5 if gan(f) else 0.0,
                           adv_start=steps // 4, fm_weight=1.0, disc_lr=2e-4, disc_channels=32)
        plan.values.update(machine_bf16())
        say(f"resolution {res} ({why_res}); channels {ch} ({why_ch})")
        buckets_line(plan, survey, res, f)
        widths = init.config.block_out_channels if init else model["model_overrides"]["block_out_channels"]
        latent_channels = init.config.latent_channels if init else model["model_overrides"]["latent_channels"]
        say(f"autoencoder{' (the init one)' if init else ''}: f = {f} -> {res // f}x{res // f}x{latent_channels} "
            f"latents, widths {'/'.join(map(str, widths))}; L1 + 0.2 SSIM"
            + (f", PatchGAN and feature matching from step {steps // 4}" if gan(f) else
               f" (no GAN at f = 4: it held the reconstruction back; --adv-weight 0.5 adds it from step "
                 f"{steps // 4})")
            + bf16_said(plan))
        say(f"steps {steps} x batch {AUTOENCODER_BATCH} ({AUTOENCODER_EPOCHS} epochs within "
            f"{AUTOENCODER_STEPS[0]}..{AUTOENCODER_STEPS[1]} steps)")
        return plan
    if autoencoder is None:
        raise EncdiffError(f"the {stage.replace('_', ' ')} stage is sized from its autoencoder: pass --autoencoder MODEL")
    if stage == "light_decoder":  # it decodes the autoencoder's latents into the images the autoencoder was made for
        res, channels = autoencoder.config.sample_size, autoencoder.config.in_channels
        plan.values.update(resolution=res, channels=channels)
        say(f"resolution {res}, channels {channels} (the autoencoder's)")
        buckets_line(plan, survey, res, autoencoder.downsample_factor)
        return plan
    res = autoencoder.config.sample_size
    side = res // autoencoder.downsample_factor
    model = unet_model(side)
    steps = epochs_to_steps(survey.images, DIFFUSION_BATCH, DIFFUSION_EPOCHS, DIFFUSION_STEPS)
    plan.values.update(resolution=res, channels=autoencoder.config.in_channels, **model, steps=steps,
                       batch_size=DIFFUSION_BATCH, lr=1e-2, betas=[0.9, 0.99], warmup_steps=200,
                       lr_schedule="inv_sqrt", lr_decay_steps=max(1, steps // 4), sigma_data=1.0,
                       loss_options={"p_mean": -0.5, "p_std": 1.2}, phema_every=max(1, steps // 32))
    plan.values.update(machine_bf16())
    buckets_line(plan, survey, res, autoencoder.downsample_factor)
    counts = sorted(survey.class_counts.values())
    if len(counts) > 1 and counts[-1] >= BALANCE_RATIO * counts[0]:
        plan.values["balance_classes"] = True
        say(f"classes drawn equally often (the largest has {counts[-1] / counts[0]:.0f}x the images of the "
            f"smallest; --no-balance-classes keeps the data's proportions)")
    levels = model["model_overrides"]["block_out_channels"]
    say(f"U-Net: EDM2 magnitude-preserving on {side}x{side}x{autoencoder.latent_channels} latents (the "
        f"autoencoder's, at {res} px), widths {'/'.join(map(str, levels))}, learned per-sigma weighting"
        + bf16_said(plan))
    say(f"steps {steps} x batch {DIFFUSION_BATCH} ({DIFFUSION_EPOCHS} epochs within "
        f"{DIFFUSION_STEPS[0]}..{DIFFUSION_STEPS[1]} steps), post-hoc EMA snapshots every {max(1, steps // 32)}")
    if not survey.class_counts:
        say("no classes, so no classifier-free guidance: --guide-at 0.375 makes the run's own state 3/8 of the way "
            "its guide (autoguidance 5; unconditional CIFAR-10: FID -31 %)")
    return plan
