"""The training config: every field of every stage, checked before any data is read; named presets; how a run's
config is loaded (defaults < preset < TOML < flags) and which fields a stage reads or a resume may change."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..autoencoder_loss import RECON_LOSSES
from ..backbones import BACKBONES
from ..buckets import format_shape, parse_shape, resolve_buckets
from ..data import ImageDataset
from ..denoiser import LOSS_WEIGHTS, NOISE_LEVELS, PREDICTIONS
from ..errors import (EncdiffError, check_bool, check_choice, check_field, check_int, check_number, check_tuple,
                      config_from_dict, is_finite_number)
from ..images import MODES, background_rgb
from ..phema import check_sigma_rel
from ..pipeline import TRAINED_KINDS
from ..presets import AUTOENCODERS, MP_UNETS, UNETS, preset
from ..samplers import ODE_SOLVERS
from ..schedules import TRAIN_SCHEDULES


LR_SCHEDULES = ("constant", "cosine", "inv_sqrt")  # after the warm-up (loop.lr_factor)
# The most noises drawn per training image (Immiscible Diffusion's candidates): all are held at once, and the kept
# one's length shrinks with their number (denoiser.nearest_noise); the papers' choices are far below it.
MAX_NOISE_CANDIDATES = 64
# The objective a denoiser kind trains with where the config leaves it out: its loss weighting, and the options of
# the lognormal noise level (ln sigma ~ N(p_mean, p_std^2)) not given in loss_options. EDM: its Table 1 weighting and
# levels (the function defaults of denoiser.py). Flow: the conditional flow-matching loss (Lipman et al. 2023, eq. 23)
# at SD3's logit-normal t, logit t ~ N(0, 1) (Esser et al. 2024, sec. 3.1; ln sigma = logit t), the recipe measured
# against EDM on CIFAR-10 (BENCHMARKS.md, "Flow matching at the same budget"), so that `--denoiser flow` alone trains
# flow matching. VP keeps the weighting it always had.
OBJECTIVES: dict[str, tuple[str, dict[str, float]]] = {
    "edm": ("edm", {}),
    "vp": ("edm", {}),
    "flow": ("flow", {"p_mean": 0.0, "p_std": 1.0}),
}


@dataclass(frozen=True)
class TrainConfig:
    # what to train on
    data: str = ""  # image folder: class subfolders -> labels, flat -> unconditional
    run_dir: str = "runs/run"  # checkpoints, logs, samples and the final model go here
    resolution: int = 32  # images are resized (shorter side) and center-cropped to this size
    channels: int = 3  # 3: RGB, 1: grayscale, 4: RGBA (transparency learnt); `encdiff train*` read it from the data
    background: str = "white"  # trained without alpha (channels 1 or 3): the colour transparent images go onto
    flips: bool = True  # random horizontal flips; false for data a mirror changes (text, flags, arrows, logos)
    balance_classes: bool = False  # draw every class equally often (with replacement), however many images it has
    buckets: tuple[str, ...] = ()  # aspect-ratio buckets "WxH" (buckets.py); auto: the rule's; none/empty: centre crops
    strict: bool = False  # unreadable files: error instead of a warning
    # the model
    model: str = ""  # preset name (presets.AUTOENCODERS for stage 1, presets.UNETS for stage 2)
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields to change in the preset
    autoencoder: str | None = None  # stage 2: autoencoder folder for latent diffusion; None: pixel space
    # optimisation
    steps: int = 10000  # optimizer steps
    time_budget: float | None = None  # seconds for the whole run: `steps` becomes what fits (measured at the start)
    batch_size: int = 64  # global batch per optimizer step (all ranks, all accumulation rounds)
    grad_accum: int = 1  # accumulation rounds per step
    lr: float = 2e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 200  # linear warm-up from 0 to lr
    lr_schedule: str = "constant"  # after warm-up: "constant", "cosine" (to 0 at `steps`) or "inv_sqrt" (EDM2)
    lr_decay_steps: int = 10000  # inv_sqrt: the rate is lr / sqrt(max(step / lr_decay_steps, 1)) (EDM2's t_ref)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_halflife_images: float = 50_000.0  # EMA half-life in training images (EDM)
    ema_rampup: float | None = 0.05  # cap the half-life at this fraction of images seen early on; None: off
    phema_every: int = 0  # steps between post-hoc EMA snapshots (EDM2 sec. 3; `encdiff posthoc-ema`); 0: none
    phema_sigma_rels: tuple[float, ...] = (0.05, 0.10)  # widths of the power-function EMA profiles stored (EDM2's)
    bf16: bool | None = None  # bf16 autocast; None: on CUDA only
    compile: bool = False  # torch.compile the network
    seed: int = 0  # every random stream derives from it (per rank)
    # stage 1: autoencoder
    recon_loss: str = "l1"  # "l1" or "l2" reconstruction loss
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) per latent element
    ssim_weight: float = 0.0  # weight of 1 - SSIM (11x11 Gaussian windows) added to the reconstruction loss
    fft_weight: float = 0.0  # weight of the focal frequency loss (spectrum distance, hard frequencies first)
    alpha_weight: float = 1.0  # RGBA: the alpha channel's weight in the L1/L2 and SSIM terms (each colour channel: 1)
    alpha_edge_weight: float = 1.0  # RGBA: weight of the pixels at alpha's edges in the L1/L2 term (elsewhere: 1)
    adv_weight: float = 0.0  # weight of the PatchGAN hinge term, times the adaptive gradient-norm ratio; 0: no GAN
    adv_start: int = 0  # optimizer step from which the discriminator trains and the adversarial term counts
    fm_weight: float = 0.0  # weight of feature matching in the discriminator's layers (a perceptual term)
    disc_lr: float | None = None  # discriminator learning rate (AdamW, betas 0.5/0.9); None: lr
    disc_channels: int = 64  # discriminator width (DiscriminatorConfig.channels)
    disc_layers: int = 2  # discriminator depth (DiscriminatorConfig.layers): 2 -> 34-pixel patches
    teacher_weight: float = 1.0  # light decoder: weight of the L1 distance to the full decoder's output
    init: str | None = None  # autoencoder folder to start from (its config replaces model / model_overrides)
    decoder_only: bool = False  # with init: train the decoder only; encoder, posterior and latent scale/shift frozen
    latent_noise: float = 0.0  # decoder-only: decode latents + sigma * noise, sigma ~ U(0, this) in the U-Net's units
    # stage 2: diffusion
    backbone: str = "unet"  # "unet" (ADM-style, presets.UNETS) or "edm2" (magnitude-preserving, presets.MP_UNETS)
    uncertainty: bool = False  # weigh the loss by the backbone's learned u(sigma) (EDM2 eq. 8; edm2 backbone)
    denoiser: str = "edm"  # "edm", "vp" or "flow" (DenoiserSpec.kind); it chooses the objective's defaults (OBJECTIVES)
    prediction: str = "epsilon"  # vp: epsilon, v or x0
    train_schedule: str = "linear"  # vp: beta schedule
    noise_level: str = "lognormal"  # how sigma is drawn (denoiser.NOISE_LEVELS)
    weighting: str | None = None  # loss weight lambda(sigma) (denoiser.LOSS_WEIGHTS); None: the denoiser's (OBJECTIVES)
    sigma_data: float = 0.5  # edm: data standard deviation (0.5 for pixels in [-1, 1]; 1 for encdiff's unit-variance latents)
    loss_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # noise-level/weighting options, e.g.
    # p_mean, p_std; one left out is the denoiser's (OBJECTIVES)
    label_dropout: float = 0.1  # probability of training on the null class (classifier-free guidance)
    noise_candidates: int = 1  # noises drawn per image, the nearest kept (Immiscible Diffusion, KNN); 1: plain noise
    guide_at: float | None = None  # the run's post-hoc EMA this far into it becomes its guide (needs phema_every)
    # consistency distillation (encdiff distill)
    teacher: str | None = None  # generator folder distilled: its U-Net initialises the student, its autoencoder is kept
    guidance: float | None = None  # guidance scale built into the student; None: the teacher's default (1: none)
    guidance_interval: tuple[float, ...] | None = None  # [lo, hi]: the built-in guidance applies where lo < sigma <= hi
    # (the teacher's ODE unguided elsewhere, as the teacher samples with an interval); []: at every sigma; None: the
    # teacher's stored interval
    intervals: int = 18  # noise-level intervals of the distillation grid (Karras, the teacher's sigma_min..sigma_max)
    solver: str = "heun"  # the teacher's ODE step over one interval: heun or euler
    huber_c: float | None = None  # pseudo-Huber constant of the loss; None: 0.00054 sqrt(dimensions) (iCT)
    student_steps: int = 2  # sampling steps stored as the student's default (multistep consistency sampling)
    # bookkeeping
    log_every: int = 50  # steps between metrics.jsonl rows
    checkpoint_every: int = 500  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept
    sample_every: int = 1000  # steps between sample grids (0: never)
    sample_steps: int = 20  # sampler steps of the sample grids and evaluations
    eval_every: int = 0  # stage 2: steps between FID/KID/P&R evaluations of the EMA weights (0: never); best kept in best/
    eval_samples: int = 2000  # images generated per evaluation (at least 257, the feature dimension + 1)
    workers: int | None = None  # image-decoding processes (None: up to 8)
    accept_data_change: bool = False  # resume although the data folder's files differ from the checkpoint's

    def __post_init__(self):
        """Every field is checked here, before any data is read or any step is taken."""
        for name in ("steps", "batch_size", "grad_accum", "resolution", "log_every", "checkpoint_every", "keep_last",
                     "sample_steps", "disc_channels", "disc_layers", "intervals", "student_steps", "lr_decay_steps"):
            check_int(getattr(self, name), name, 1)
        check_int(self.noise_candidates, "noise_candidates", 1, MAX_NOISE_CANDIDATES,
                  note="all are held at once")
        for name in ("warmup_steps", "sample_every", "eval_every", "adv_start", "phema_every"):
            check_int(getattr(self, name), name, 0)
        check_int(self.seed, "seed", 0, 2**63 // 1000 - 1)  # the RNG streams are seeded with seed * 1000 + k
        check_int(self.eval_samples, "eval_samples", 257)  # FID needs more images than the 256 feature dimensions
        check_int(self.workers, "workers", 0, optional=True)
        check_int(self.resolution, "resolution", 1, 4096)
        for name in ("lr", "ema_halflife_images", "sigma_data"):
            check_number(getattr(self, name), name, positive=True)
        for name in ("disc_lr", "ema_rampup", "guidance", "huber_c"):
            check_number(getattr(self, name), name, positive=True, optional=True)
        check_number(self.label_dropout, "label_dropout", minimum=0, below=1)
        check_number(self.guide_at, "guide_at", positive=True, below=1, optional=True)
        if self.guide_at is not None and not self.phema_every:
            raise EncdiffError(f"config field 'guide_at' = {self.guide_at}: the guide is the run's own post-hoc EMA at "
                               "that point, which needs its snapshots: set phema_every (e.g. --phema-every 250)")
        check_number(self.time_budget, "time_budget", positive=True, optional=True)
        for name in ("weight_decay", "grad_clip", "kl_weight", "ssim_weight", "fft_weight", "adv_weight", "fm_weight",
                     "teacher_weight", "latent_noise"):
            check_number(getattr(self, name), name, minimum=0)
        check_number(self.alpha_weight, "alpha_weight", positive=True)
        check_number(self.alpha_edge_weight, "alpha_edge_weight", positive=True)
        check_tuple(self.phema_sigma_rels, "phema_sigma_rels", None, is_finite_number)
        for value in self.phema_sigma_rels:
            check_sigma_rel(value, "config field 'phema_sigma_rels'")
        if self.guidance_interval is not None:
            check_field(isinstance(self.guidance_interval, (list, tuple)) and len(self.guidance_interval) in (0, 2)
                        and all(is_finite_number(v) for v in self.guidance_interval)
                        and (not self.guidance_interval or 0 <= self.guidance_interval[0] <= self.guidance_interval[1]),
                        "guidance_interval", self.guidance_interval, "[lo, hi] with 0 <= lo <= hi, or [] for every sigma")
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        check_tuple(self.betas, "betas", 2, is_adam_beta)
        for name in ("strict", "compile", "decoder_only", "accept_data_change", "uncertainty", "flips",
                     "balance_classes"):
            check_bool(getattr(self, name), name)
        check_bool(self.bf16, "bf16", optional=True)
        check_field(isinstance(self.buckets, (list, tuple)) and all(isinstance(v, str) for v in self.buckets),
                    "buckets", self.buckets, 'a list of sizes "WxH", or ["auto"]')
        # ["none"]: no buckets, as an empty list (what a flag can say)
        object.__setattr__(self, "buckets", () if list(self.buckets) == ["none"] else tuple(self.buckets))
        if "auto" in self.buckets and len(self.buckets) > 1:
            raise EncdiffError(f"config field 'buckets' = {list(self.buckets)}: 'auto' stands alone (the rule's "
                               "shapes), or list the shapes as WxH")
        for shape in self.buckets:
            if shape != "auto":
                parse_shape(shape, "config field 'buckets' entry")
        check_field(self.channels in MODES and not isinstance(self.channels, bool), "channels", self.channels,
                    "1 (grayscale), 3 (RGB) or 4 (RGBA)")
        check_field(isinstance(self.background, str), "background", self.background, "a colour name or #rrggbb")
        background_rgb(self.background)
        check_choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        check_choice(self.backbone, "backbone", tuple(BACKBONES))
        if self.uncertainty and self.backbone != "edm2":
            raise EncdiffError("config field 'uncertainty' = true needs backbone = \"edm2\" (its u(sigma) head)")
        check_choice(self.recon_loss, "recon_loss", tuple(RECON_LOSSES))
        check_choice(self.denoiser, "denoiser", TRAINED_KINDS)
        check_choice(self.prediction, "prediction", PREDICTIONS)
        check_choice(self.noise_level, "noise_level", tuple(NOISE_LEVELS))
        check_field(isinstance(self.loss_options, dict), "loss_options", self.loss_options,
                    "a table of option names and numbers, e.g. { p_mean = 0, p_std = 1 }")
        weighting, level_options = OBJECTIVES[self.denoiser]
        if self.weighting is None:
            object.__setattr__(self, "weighting", weighting)
        if self.noise_level == "lognormal":
            object.__setattr__(self, "loss_options", {**level_options, **self.loss_options})
        check_choice(self.weighting, "weighting", tuple(LOSS_WEIGHTS))
        check_choice(self.train_schedule, "train_schedule", tuple(TRAIN_SCHEDULES))
        check_choice(self.solver, "solver", ODE_SOLVERS)
        if self.decoder_only and not self.init:
            raise EncdiffError("config field 'decoder_only' = true needs 'init': the autoencoder whose decoder "
                               "is fine-tuned (--init MODEL)")
        if self.latent_noise and not self.decoder_only:
            # Only a frozen encoder keeps the latents' scale where the noise is measured against; a trained one
            # would outgrow any fixed noise (and the scale is measured after training).
            raise EncdiffError(f"config field 'latent_noise' = {self.latent_noise}: needs decoder_only = true "
                               "(--decoder-only --init MODEL), a decoder fine-tune in a fixed latent space")
        if self.init and (self.model or self.model_overrides):
            raise EncdiffError(f"config fields 'init' = {self.init!r} and 'model' = {self.model!r} / "
                               "'model_overrides': give one (the init folder's config is the model's)")


def is_adam_beta(v: Any) -> bool:
    """numbers in [0, 1)"""
    return is_finite_number(v) and 0 <= v < 1


# Named training setups: the resolved config of every run is saved beside it.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cifar10": {
        # L1 first; SSIM, the PatchGAN (adaptive weight) and feature matching once reconstructions are sound (LDM
        # starts its discriminator late too): the weights the decoder ablation of BENCHMARKS.md chose.
        "autoencoder": dict(model="cifar10_f4", resolution=32, steps=20000, batch_size=64, lr=2e-4,
                            ema_halflife_images=100_000.0, ssim_weight=0.2, adv_weight=0.5, adv_start=5000,
                            fm_weight=1.0),
        "diffusion": dict(model="latent_8x8", resolution=32, steps=100_000, batch_size=128, lr=2e-4,
                          ema_halflife_images=500_000.0),
    },
    "folder64": {
        "autoencoder": dict(model="cifar10_f4", resolution=64, steps=20000, batch_size=32, lr=2e-4),
        "diffusion": dict(model="latent_8x8", model_overrides={"sample_size": 16, "num_classes": 0},
                          resolution=64, steps=100_000, batch_size=64, lr=2e-4),
    },
}


# Fields that only some stages read; every other field is common to all. A consistency student's model is its
# teacher's, so it has no model fields.
STAGE_ONLY = {
    "autoencoder": frozenset({"recon_loss", "kl_weight", "ssim_weight", "fft_weight", "alpha_weight",
                              "alpha_edge_weight", "adv_weight", "adv_start", "fm_weight", "disc_lr", "disc_channels",
                              "disc_layers", "init", "decoder_only", "latent_noise", "model", "model_overrides"}),
    "diffusion": frozenset({"autoencoder", "backbone", "uncertainty", "denoiser", "prediction", "train_schedule", "noise_level", "weighting",
                            "sigma_data", "loss_options", "label_dropout", "noise_candidates", "guide_at",
                            "eval_every", "eval_samples", "model", "model_overrides"}),
    "consistency": frozenset({"teacher", "guidance", "guidance_interval", "intervals", "solver", "huber_c", "student_steps",
                              "loss_options", "label_dropout", "eval_every", "eval_samples"}),
    # a light decoder for an autoencoder's latents: its objective's terms, the teacher term, its shape
    "light_decoder": frozenset({"autoencoder", "recon_loss", "ssim_weight", "fft_weight", "alpha_weight",
                                "alpha_edge_weight", "adv_weight", "adv_start", "fm_weight", "disc_lr",
                                "disc_channels", "disc_layers", "teacher_weight", "model_overrides"}),
}


def stage_fields(stage: str) -> list[str]:
    """The TrainConfig fields a stage ("autoencoder", "diffusion", "consistency" or "light_decoder") reads, in
    declaration order."""
    others = set().union(*(fields for name, fields in STAGE_ONLY.items() if name != stage)) - STAGE_ONLY[stage]
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in others]


# Fields a resumed run may change: more steps extend training, the rest only touch logging and files.
RESUMABLE_CHANGES = frozenset({"steps", "time_budget", "log_every", "checkpoint_every", "keep_last", "sample_every",
                               "sample_steps", "workers", "eval_every", "eval_samples", "run_dir", "accept_data_change",
                               "guide_at"})
# Fields holding paths: a resumed run compares the folders they name, not their spelling.
PATH_FIELDS = ("data", "autoencoder", "init", "teacher")


def config_to_json(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def dataset_of(config: TrainConfig, run_dir: str | os.PathLike, progress: bool = True,
               factor: int = 1) -> ImageDataset:
    """The images a run trains on, for every stage and for export: decoded once into the run's cache; the run
    folder is never data, even inside the data folder (`cd images && encdiff train .`). `factor` is the
    autoencoder's downsampling: every bucket's sides are multiples of it, and a bucket holds at least a batch."""
    run_dir = Path(run_dir)
    buckets = resolve_buckets(config.buckets, config.resolution, factor)
    return ImageDataset(config.data, config.resolution, config.channels, strict=config.strict,
                        cache_dir=run_dir / "cache", workers=config.workers, progress=progress, exclude=(run_dir,),
                        background=config.background, buckets=buckets,
                        min_bucket=config.batch_size if buckets else 1)


def backbone_presets(backbone: str) -> dict:
    """The model presets of a backbone (TrainConfig.backbone)."""
    return {"unet": UNETS, "edm2": MP_UNETS}[backbone]


def model_config(table: dict, config: TrainConfig, config_class: type, **fixed: Any):
    base = dataclasses.asdict(preset(table, config.model))
    return config_from_dict(config_class, {**base, **config.model_overrides, **fixed}, "model config")


def check_model_name(config: TrainConfig, stage: str) -> None:
    """An unknown model preset is refused with the valid names (before any data is read)."""
    if config.model and stage in ("autoencoder", "diffusion"):
        preset(AUTOENCODERS if stage == "autoencoder" else backbone_presets(config.backbone), config.model)


def generator_data_fields(generator) -> dict[str, Any]:
    """The data fields a stage trained for an existing generator (its guide, its student) takes from it unless a
    config file or a flag says otherwise: its image size, its channels and its aspect-ratio buckets (trained on the
    square alone, neither could serve the generator's other shapes)."""
    values: dict[str, Any] = {"resolution": generator.image_size, "channels": generator.image_channels}
    if len(generator.sizes) > 1:
        values["buckets"] = [format_shape(size) for size in generator.sizes]
    return values


def load_config(path: str | None, preset_name: str | None, stage: str, overrides: dict[str, Any],
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < named preset, or `base` (the data's defaults, training/sizing.py; a guide's or a student's) < TOML
    file < command-line flags. `model_overrides` is merged field by field while the model stays the one it was made
    for: a TOML that sets `model_overrides = {dropout = 0.1}` over a guide's half widths keeps the half widths (it
    replaced the whole dict, so the guide trained at the preset's full widths); a layer that names another `model`
    leaves the earlier overrides behind, and one that names another `denoiser` the earlier `weighting` and
    `loss_options` (a folder's plan sets EDM's noise levels: `--denoiser flow` over it trains flow matching's)."""
    values: dict[str, Any] = dict(base or {})

    def update(layer: dict[str, Any]) -> None:
        ours, theirs = values.get("model_overrides"), layer.get("model_overrides")
        if "model" not in layer and isinstance(ours, dict) and isinstance(theirs, dict):
            layer = {**layer, "model_overrides": {**ours, **theirs}}
        elif layer.get("model", values.get("model")) != values.get("model") and "model_overrides" not in layer:
            values.pop("model_overrides", None)  # made for another model
        denoiser = values.get("denoiser", TrainConfig.denoiser)
        if layer.get("denoiser", denoiser) != denoiser:
            for name in ("weighting", "loss_options"):  # made for another objective: the new denoiser's instead
                if name not in layer:
                    values.pop(name, None)
        values.update(layer)

    if preset_name:
        if preset_name not in PRESETS:
            raise EncdiffError(f"unknown training preset {preset_name!r}; valid: {', '.join(sorted(PRESETS))}")
        if stage not in PRESETS[preset_name]:
            raise EncdiffError(f"training preset {preset_name!r} has no {stage} settings; it has "
                               f"{', '.join(PRESETS[preset_name])}")
        update(PRESETS[preset_name][stage])
    if path:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                update(tomllib.load(f))
        except FileNotFoundError:
            raise EncdiffError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise EncdiffError(f"{path}: not valid TOML ({e})") from None
    update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(TrainConfig, values, path or "training config")
