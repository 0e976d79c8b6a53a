"""Training on any image folder, resumable bit for bit, on one process or under torchrun: one loop, three stages.

Stage 1, `train_autoencoder`: reconstruction (L1/L2) + a small KL (Rombach et al. 2022, sec. 3); at the end
the latent statistics are measured and stored as the autoencoder's scale/shift. Stage 2, `train_diffusion`:
denoising score matching (Karras et al. 2022) on latents encoded once (both flips), or on pixels. Then, optionally,
`train_consistency`: a few-step student distilled from a stage-2 generator (consistency.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .autoencoder import Autoencoder, AutoencoderConfig
from .autoencoder_loss import AutoencoderObjective, DiscriminatorConfig, PatchDiscriminator
from .checkpoint import atomic_write_bytes, read_json, sha256_file
from .train_state import (flatten_state, latest_training_state, load_training_state, rng_state, save_training_state,
                          set_rng_state, unflatten_state)
from .data import BatchSampler, ImageDataset, random_flips
from .denoiser import training_loss
from .ema import EMA
from .phema import PowerEMA, check_sigma_rel
from .errors import EncdiffError, TrainingInterrupted, config_from_dict, count
from .images import image_grid, save_png, to_uint8
from .pipeline import DenoiserSpec, Generator, Sampling
from .backbones import CONFIGS, backbone_class, backbone_name
from .presets import AUTOENCODERS, MP_UNETS, UNETS, preset


@dataclass(frozen=True)
class TrainConfig:
    # what to train on
    data: str = ""  # image folder: class subfolders -> labels, flat -> unconditional
    run_dir: str = "runs/run"  # checkpoints, logs, samples and the final model go here
    resolution: int = 32  # images are resized (shorter side) and center-cropped to this size
    channels: int = 3  # 3: RGB, 1: grayscale
    flips: bool = True  # random horizontal flips; false for data a mirror changes (text, flags, arrows, logos)
    strict: bool = False  # unreadable files: error instead of a warning
    # the model
    model: str = ""  # preset name (presets.AUTOENCODERS for stage 1, presets.UNETS for stage 2)
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields to change in the preset
    autoencoder: str | None = None  # stage 2: autoencoder folder for latent diffusion; None: pixel space
    # optimisation
    steps: int = 10000  # optimizer steps
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
    adv_weight: float = 0.0  # weight of the PatchGAN hinge term, times the adaptive gradient-norm ratio; 0: no GAN
    adv_start: int = 0  # optimizer step from which the discriminator trains and the adversarial term counts
    fm_weight: float = 0.0  # weight of feature matching in the discriminator's layers (a perceptual term)
    disc_lr: float | None = None  # discriminator learning rate (AdamW, betas 0.5/0.9); None: lr
    disc_channels: int = 64  # discriminator width (DiscriminatorConfig.channels)
    disc_layers: int = 2  # discriminator depth (DiscriminatorConfig.layers): 2 -> 34-pixel patches
    init: str | None = None  # autoencoder folder to start from (its config replaces model / model_overrides)
    decoder_only: bool = False  # with init: train the decoder only; encoder, posterior and latent scale/shift frozen
    # stage 2: diffusion
    backbone: str = "unet"  # "unet" (ADM-style, presets.UNETS) or "edm2" (magnitude-preserving, presets.MP_UNETS)
    uncertainty: bool = False  # weigh the loss by the backbone's learned u(sigma) (EDM2 eq. 8; edm2 backbone)
    denoiser: str = "edm"  # "edm" or "vp" (DenoiserSpec.kind)
    prediction: str = "epsilon"  # vp: epsilon, v or x0
    train_schedule: str = "linear"  # vp: beta schedule
    noise_level: str = "lognormal"  # how sigma is drawn (denoiser.NOISE_LEVELS)
    weighting: str = "edm"  # loss weight lambda(sigma) (denoiser.LOSS_WEIGHTS)
    sigma_data: float = 0.5  # edm: data standard deviation (0.5 for pixels in [-1, 1]; 1 for encdiff's unit-variance latents)
    loss_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # noise-level/weighting options, e.g. p_mean, p_std
    label_dropout: float = 0.1  # probability of training on the null class (classifier-free guidance)
    # consistency distillation (encdiff distill)
    teacher: str | None = None  # generator folder distilled: its U-Net initialises the student, its autoencoder is kept
    guidance: float | None = None  # guidance scale built into the student; None: the teacher's default (1: none)
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
        def integer(name: str, minimum: int, maximum: int | None = None) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
                    and (maximum is None or value <= maximum)):
                bound = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
                raise EncdiffError(f"config field {name!r} = {value!r}: expected {bound}")

        def number(name: str, minimum: float = 0.0, strict: bool = False, maximum: float | None = None,
                   optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and (value > minimum if strict else value >= minimum) and (maximum is None or value < maximum))
            if not ok:
                bound = f"{'>' if strict else '>='} {minimum:g}" + (f" and < {maximum:g}" if maximum is not None else "")
                raise EncdiffError(f"config field {name!r} = {value!r}: expected a finite number {bound}"
                                   + (" or null" if optional else ""))

        def choice(name: str, valid) -> None:
            if getattr(self, name) not in valid:
                raise EncdiffError(f"config field {name!r} = {getattr(self, name)!r}: expected one of "
                                   f"{', '.join(map(str, valid))}")

        for name in ("steps", "batch_size", "grad_accum", "resolution", "log_every", "checkpoint_every", "keep_last",
                     "sample_steps", "disc_channels", "disc_layers", "intervals", "student_steps", "lr_decay_steps"):
            integer(name, 1)
        for name in ("warmup_steps", "sample_every", "eval_every", "adv_start", "phema_every"):
            integer(name, 0)
        integer("seed", 0, 2**63 // 1000 - 1)  # the RNG streams are seeded with seed * 1000 + k
        integer("eval_samples", 257)  # FID needs more images than the 256 feature dimensions
        if self.workers is not None:
            integer("workers", 0)
        if self.resolution > 4096:
            raise EncdiffError(f"config field 'resolution' = {self.resolution}: expected at most 4096")
        number("lr", strict=True)
        number("disc_lr", strict=True, optional=True)
        number("ema_halflife_images", strict=True)
        number("ema_rampup", strict=True, optional=True)
        number("sigma_data", strict=True)
        number("label_dropout", maximum=1.0)
        if not (isinstance(self.phema_sigma_rels, (tuple, list)) and self.phema_sigma_rels):
            raise EncdiffError(f"config field 'phema_sigma_rels' = {self.phema_sigma_rels!r}: expected a list of "
                               "numbers in (0, 0.2887)")
        for value in self.phema_sigma_rels:
            check_sigma_rel(value, "config field 'phema_sigma_rels'")
        number("guidance", strict=True, optional=True)
        number("huber_c", strict=True, optional=True)
        for name in ("weight_decay", "grad_clip", "kl_weight", "ssim_weight", "fft_weight", "adv_weight", "fm_weight"):
            number(name)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            raise EncdiffError(f"config field 'betas' = {self.betas!r}: expected two numbers in [0, 1)")
        for name in ("strict", "compile", "decoder_only", "accept_data_change", "uncertainty", "flips"):
            if not isinstance(getattr(self, name), bool):
                raise EncdiffError(f"config field {name!r} = {getattr(self, name)!r}: expected true or false")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise EncdiffError(f"config field 'bf16' = {self.bf16!r}: expected true, false or null")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise EncdiffError(f"config field 'channels' = {self.channels!r}: expected 1 or 3")
        from .denoiser import LOSS_WEIGHTS, NOISE_LEVELS
        from .schedules import TRAIN_SCHEDULES

        choice("lr_schedule", ("constant", "cosine", "inv_sqrt"))
        choice("backbone", ("unet", "edm2"))
        if self.uncertainty and self.backbone != "edm2":
            raise EncdiffError("config field 'uncertainty' = true needs backbone = \"edm2\" (its u(sigma) head)")
        choice("recon_loss", ("l1", "l2"))
        choice("denoiser", ("edm", "vp"))
        choice("prediction", ("epsilon", "v", "x0"))
        choice("noise_level", tuple(NOISE_LEVELS))
        choice("weighting", tuple(LOSS_WEIGHTS))
        choice("train_schedule", tuple(TRAIN_SCHEDULES))
        choice("solver", ("heun", "euler"))
        if self.decoder_only and not self.init:
            raise EncdiffError("config field 'decoder_only' = true needs 'init': the autoencoder whose decoder "
                               "is fine-tuned (--init MODEL)")
        if self.init and (self.model or self.model_overrides):
            raise EncdiffError(f"config fields 'init' = {self.init!r} and 'model' = {self.model!r} / "
                               "'model_overrides': give one (the init folder's config is the model's)")


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
    "autoencoder": frozenset({"recon_loss", "kl_weight", "ssim_weight", "fft_weight", "adv_weight", "adv_start",
                              "fm_weight", "disc_lr", "disc_channels", "disc_layers", "init", "decoder_only",
                              "model", "model_overrides"}),
    "diffusion": frozenset({"autoencoder", "backbone", "uncertainty", "denoiser", "prediction", "train_schedule", "noise_level", "weighting",
                            "sigma_data", "loss_options", "label_dropout", "eval_every", "eval_samples",
                            "model", "model_overrides"}),
    "consistency": frozenset({"teacher", "guidance", "intervals", "solver", "huber_c", "student_steps",
                              "loss_options", "label_dropout", "eval_every", "eval_samples"}),
}


def stage_fields(stage: str) -> list[str]:
    """The TrainConfig fields a stage ("autoencoder", "diffusion" or "consistency") reads, in declaration order."""
    others = set().union(*(fields for name, fields in STAGE_ONLY.items() if name != stage)) - STAGE_ONLY[stage]
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in others]


# Fields a resumed run may change: more steps extend training, the rest only touch logging and files.
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "checkpoint_every", "keep_last", "sample_every", "sample_steps",
                               "workers", "eval_every", "eval_samples", "run_dir", "accept_data_change"})
# Fields holding paths: a resumed run compares the folders they name, not their spelling.
PATH_FIELDS = ("data", "autoencoder", "init", "teacher")


class Distributed:
    """torchrun's environment, or a single process; rank 0 alone writes files."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (identity on one process)."""
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class StopRequest:
    """SIGTERM/SIGINT set a flag: the step in flight finishes, a checkpoint is written, the run exits."""

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant, a cosine decay to zero at the last step, or EDM2's inverse square root."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "inv_sqrt":  # EDM2 config E: alpha_ref / sqrt(max(t / t_ref, 1))
            return 1 / math.sqrt(max(step / config.lr_decay_steps, 1.0))
        if config.lr_schedule == "cosine":
            progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


class Run:
    """The state shared by both stages: data, model, optimizer, EMA, RNG streams, checkpoints and logs."""

    def __init__(self, config: TrainConfig, stage: str, model: torch.nn.Module, dataset: ImageDataset, dist_: Distributed,
                 export_info: dict[str, Any] | None = None, discriminator: torch.nn.Module | None = None):
        self.config, self.stage, self.dist = config, stage, dist_
        # The data's fingerprint (every file's path, size and time): a resumed run must train on the same data.
        self.data = {"images": len(dataset), "key": dataset.key}
        dataset_len = len(dataset)
        # What `export_run` needs to rebuild the model from any checkpoint: its config, and for a generator
        # the denoiser spec, class names and autoencoder folder.
        self.export_info = {"model_config": dataclasses.asdict(model.config), **(export_info or {})}
        self.dir = Path(config.run_dir)
        self.model = model.to(dist_.device)
        per_rank = config.batch_size // (dist_.world_size * config.grad_accum)
        if per_rank * dist_.world_size * config.grad_accum != config.batch_size or per_rank == 0:
            raise EncdiffError(f"batch_size {config.batch_size} is not divisible by world size {dist_.world_size} "
                               f"x grad_accum {config.grad_accum}")
        self.per_rank_batch = per_rank
        self.sampler = BatchSampler(dataset_len, per_rank, seed=config.seed, rank=dist_.rank,
                                    world_size=dist_.world_size)
        # The fused kernel (CPU and CUDA) updates all tensors in one pass: ~2.7x faster than the per-tensor loop.
        # Frozen parameters (a decoder-only fine-tune's encoder) are not given to it.
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                           betas=config.betas, weight_decay=config.weight_decay, fused=True)
        # A GAN's discriminator has an optimizer of its own (betas 0.5/0.9 as in taming/LDM) and is checkpointed with
        # the rest; it has no EMA and no learning-rate schedule.
        self.discriminator = discriminator.to(dist_.device) if discriminator is not None else None
        self.disc_optimizer = (torch.optim.AdamW(self.discriminator.parameters(), lr=config.disc_lr or config.lr,
                                                 betas=(0.5, 0.9), fused=True)
                               if self.discriminator is not None else None)
        self.wrapped: dict[str, torch.nn.Module] = {}  # the modules as the loss calls them (DDP, compile): train_loop
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config))
        self.ema = EMA(self.model, config.ema_halflife_images, config.ema_rampup)
        # Post-hoc EMA (EDM2 sec. 3): power-function profiles, snapshotted every `phema_every` steps.
        self.phema = PowerEMA(self.model, tuple(config.phema_sigma_rels)) if config.phema_every else None
        # Two independent streams (augmentation, training noise), in the same state on every rank: each rank
        # draws the randomness of the whole global batch and keeps its own rows (`shard`), so K processes
        # train exactly like one process with the global batch, every sample with its own noise.
        self.generators = {name: torch.Generator(dist_.device).manual_seed(config.seed * 1000 + 17 * i)
                           for i, name in enumerate(("data", "noise"))}
        self.shard = (dist_.rank, dist_.world_size)
        self.step = 0
        self.images_seen = 0
        self.history: list[dict[str, float]] = []
        self.window: dict[str, Any] = {"loss": [], "parts": {}}  # per-step values since the last log row
        self.tensorboard = None
        if dist_.main:
            try:  # TensorBoard is optional: metrics.jsonl always has the same numbers
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                pass

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Every rank contributes its RNG states; rank 0 writes the checkpoint."""
        states = {name: rng_state(g) for name, g in self.generators.items()}
        if self.dist.world_size > 1:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, {k: v.tolist() for k, v in states.items()})
        else:
            gathered = [{k: v.tolist() for k, v in states.items()}]
        path = None
        if self.dist.main:
            optimizer_tensors, optimizer_skeleton = flatten_state(self.optimizer.state_dict(), "optimizer.")
            tensors = {**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                       **{f"ema.{k}": v for k, v in self.ema.state_dict().items()}, **optimizer_tensors}
            if self.phema is not None:
                tensors.update({f"phema.{k}": v for k, v in self.phema.state_dict().items()})
            disc_skeleton = None
            if self.discriminator is not None:
                disc_tensors, disc_skeleton = flatten_state(self.disc_optimizer.state_dict(), "disc_optimizer.")
                tensors.update({f"disc.{k}": v for k, v in self.discriminator.state_dict().items()}, **disc_tensors)
            for rank, rank_states in enumerate(gathered):
                for name, state in rank_states.items():
                    tensors[f"rng.{name}.rank{rank}"] = torch.tensor(state, dtype=torch.uint8)
            meta = {"stage": self.stage, "step": self.step, "images_seen": self.images_seen,
                    "world_size": self.dist.world_size, "sampler": self.sampler.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "optimizer": optimizer_skeleton,
                    "config": config_to_json(self.config), "history": self.history, "export": self.export_info,
                    "disc_optimizer": disc_skeleton, "data": self.data, "window": self.window}
            path = save_training_state(self.dir, self.step, tensors, meta, keep_last=self.config.keep_last)
        self.dist.barrier()
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint of the run folder, if any."""
        path = latest_training_state(self.dir)
        if path is None:
            if self.dist.main:
                write_run_config(self.dir, self.stage, self.config)
            return False
        tensors, meta = load_training_state(path)
        if meta.get("stage") != self.stage:
            raise EncdiffError(f"{path}: a {meta.get('stage')} checkpoint; this is a {self.stage} run "
                               "(use another --run-dir)")
        if meta.get("world_size") != self.dist.world_size:
            raise EncdiffError(f"{path}: written by {count(meta.get('world_size'), 'process', 'processes')}, resumed with "
                               f"{self.dist.world_size}; exact resume needs the same number")
        # A field added since the checkpoint was written has its default there: such a run resumes unchanged.
        now, then = config_to_json(self.config), {**config_to_json(TrainConfig()), **meta["config"]}
        for field in PATH_FIELDS:  # `data/` and `/abs/data` are the same folder
            if then.get(field) and now.get(field) and Path(then[field]).resolve() == Path(now[field]).resolve():
                then[field] = now[field]
        changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            values = "; ".join(f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}" for k in changed)
            raise EncdiffError(f"{path}: the run was started with a different config ({values}); resume with the "
                               f"same settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change) or use "
                               "another --run-dir")
        data = meta.get("data")
        if data is not None and data != self.data and not self.config.accept_data_change:
            raise EncdiffError(f"{path}: the data folder {self.config.data} is not what the run trained on "
                               f"(checkpoint: {count(data['images'], 'image')}, fingerprint {str(data['key'])[:16]}; now: "
                               f"{count(self.data['images'], 'image')}, fingerprint {str(self.data['key'])[:16]}); restore "
                               "the data, or pass --accept-data-change to continue on the new data")
        take = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.model.load_state_dict(take("model."))
        self.ema.load_state_dict(take("ema."))
        if self.phema is not None:
            self.phema.load_state_dict(take("phema."))
        self.optimizer.load_state_dict(unflatten_state(tensors, meta["optimizer"]))
        if self.discriminator is not None:
            self.discriminator.load_state_dict(take("disc."))
            self.disc_optimizer.load_state_dict(unflatten_state(tensors, meta["disc_optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.sampler.load_state_dict(meta["sampler"])
        for name, g in self.generators.items():
            set_rng_state(g, tensors[f"rng.{name}.rank{self.dist.rank}"])
        self.step, self.images_seen, self.history = meta["step"], meta["images_seen"], meta["history"]
        self.resumed_export = meta.get("export") or {}  # what the checkpoint recorded for export, to compare
        self.window = meta.get("window") or {"loss": [], "parts": {}}
        if self.dist.main:
            write_run_config(self.dir, self.stage, self.config)
            # Rows logged after the checkpoint are about to be redone: the log restarts from the checkpoint's.
            atomic_write_bytes(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history).encode())
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)
        return True

    # -- logs ----------------------------------------------------------------------------------------
    def log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if not self.dist.main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"{self.stage}/{key}", value, row["step"])
            self.tensorboard.flush()
        plot_loss(self.history, self.dir / "loss.png")


def config_to_json(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def plot_loss(history: list[dict[str, float]], path: Path) -> None:
    """The loss curve as a PNG (matplotlib, an optional extra: without it, metrics.jsonl holds the numbers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # said once, before the progress bar starts (train_loop)
        return
    rows = [r for r in history if "loss" in r]  # evaluation rows carry metrics, not the loss
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_loop(run: Run, loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor],
               images_of: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
               on_sample: Callable[[Run], None], on_eval: Callable[[Run], None] | None = None) -> str:
    """The optimizer loop shared by both stages; returns "done", or raises TrainingInterrupted after a SIGINT or
    SIGTERM once the step in flight is finished and checkpointed."""
    config, dist_ = run.config, run.dist
    autocast = config.bf16 if config.bf16 is not None else dist_.device.type == "cuda"
    ddp_model = run.model
    if dist_.world_size > 1:
        ddp_model = DistributedDataParallel(run.model, device_ids=[dist_.local_rank] if dist_.device.type == "cuda" else None)
    if config.compile:
        # Compiled around DDP (as PyTorch recommends); checkpoints and the EMA keep using the plain module.
        ddp_model = torch.compile(ddp_model)
    run.wrapped = {"model": ddp_model}
    if run.discriminator is not None:
        run.wrapped["discriminator"] = (DistributedDataParallel(run.discriminator, device_ids=[dist_.local_rank]
                                                                if dist_.device.type == "cuda" else None)
                                        if dist_.world_size > 1 else run.discriminator)
    if dist_.main and importlib.util.find_spec("matplotlib") is None:
        # Said on its own line before the bar is drawn, not glued onto it at the first log row.
        print("encdiff: no loss.png: it needs matplotlib (pip install 'encdiff[plot]'); metrics.jsonl has the numbers",
              file=sys.stderr)
    progress = tqdm(total=config.steps, initial=run.step, disable=not dist_.main, dynamic_ncols=True, desc=run.stage)
    # The losses since the last log row live in the run (and its checkpoints): a resumed run logs the same averages.
    window_start, window_images = time.perf_counter(), 0
    window_losses, window_parts = run.window["loss"], run.window["parts"]
    with StopRequest() as stop, progress:
        while run.step < config.steps:
            run.model.train()
            total = torch.zeros((), device=dist_.device)
            parts_total: dict[str, torch.Tensor] = {}
            for micro in range(config.grad_accum):
                indices = next(run.sampler)
                rank, world_size = run.shard
                flips = random_flips(len(indices) * world_size, run.generators["data"])[rank::world_size]
                if not config.flips:  # drawn all the same, so the data stream does not depend on the choice
                    flips = torch.zeros_like(flips)
                x, labels = images_of(indices, flips)
                # Gradients are all-reduced on the last accumulation round only.
                sync = micro == config.grad_accum - 1 or dist_.world_size == 1
                context = ddp_model.no_sync() if not sync else contextlib.nullcontext()
                with context, torch.autocast(dist_.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(ddp_model, x.to(dist_.device), None if labels is None else labels.to(dist_.device))
                # A loss may come with named parts (the autoencoder's terms) to log beside it.
                loss, parts = loss if isinstance(loss, tuple) else (loss, {})
                (loss / config.grad_accum).backward()
                total += loss.detach() / config.grad_accum
                for name, value in parts.items():
                    parts_total[name] = parts_total.get(name, 0.0) + value.detach().float() / config.grad_accum
            total = dist_.mean(total)
            trainable = [p for p in run.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip or float("inf"))
            disc_grads = run.discriminator is not None and any(p.grad is not None for p in run.discriminator.parameters())
            disc_norm = (torch.nn.utils.clip_grad_norm_(run.discriminator.parameters(), float("inf")) if disc_grads
                         else torch.zeros(()))
            if not (torch.isfinite(total) and torch.isfinite(grad_norm) and torch.isfinite(disc_norm)):
                last = latest_training_state(run.dir)
                what = f", discriminator gradient norm {disc_norm.item():.4g}" if disc_grads else ""
                raise EncdiffError(f"training diverged at step {run.step + 1}: loss {total.item():.4g}, gradient norm "
                                   f"{grad_norm.item():.4g}{what}; the last good checkpoint is {last or 'none'} "
                                   "(lower --lr or raise --warmup-steps, then resume)")
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if hasattr(run.model, "normalize_weights_"):
                run.model.normalize_weights_()  # forced weight normalisation (EDM2 sec. 2.4), the same on every rank
            if disc_grads:
                run.disc_optimizer.step()
                run.disc_optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            run.step += 1
            run.images_seen += config.batch_size
            run.ema.update(run.model, run.images_seen, config.batch_size)
            if run.phema is not None:
                run.phema.update(run.model, run.images_seen, config.batch_size)
                if run.step % config.phema_every == 0 and dist_.main:
                    run.phema.save_snapshot(run.dir, run.step, run.images_seen)
            window_images += config.batch_size
            window_losses.append(total.item())
            if parts_total:
                names = sorted(parts_total)
                averaged = dist_.mean(torch.stack([parts_total[n] for n in names]))
                for name, value in zip(names, averaged.tolist()):
                    window_parts.setdefault(name, []).append(value)
            progress.update(1)
            if run.step % config.log_every == 0 or run.step == config.steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": run.step, "images": run.images_seen, "loss": sum(window_losses) / len(window_losses),
                       "lr": run.scheduler.get_last_lr()[0], "images_per_s": window_images / elapsed,
                       "grad_norm": grad_norm.item(),
                       **{name: sum(values) / len(values) for name, values in window_parts.items()}}
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                     img_s=f"{row['images_per_s']:.1f}")
                run.log(row)
                window_start, window_images = time.perf_counter(), 0
                window_losses.clear()
                window_parts.clear()
            if config.sample_every and run.step % config.sample_every == 0 and dist_.main:
                on_sample(run)
            if on_eval is not None and config.eval_every and run.step % config.eval_every == 0 and dist_.main:
                on_eval(run)
            stopping = dist_.any(stop.requested)
            if run.step % config.checkpoint_every == 0 or run.step == config.steps or stopping:
                path = run.save()
            if stopping:
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, run.step,
                                          str(path) if path else str(latest_training_state(run.dir)))
    return "done"


def write_run_config(run_dir: Path, stage: str, config: TrainConfig) -> None:
    """The resolved config beside the run; written once the run is known to start or resume, so a refused resume
    leaves the original in place."""
    atomic_write_bytes(run_dir / "config.json",
                       (json.dumps({"stage": stage, **config_to_json(config)}, indent=2) + "\n").encode())


class RunLock:
    """An exclusive lock on a run folder for the life of a training call (rank 0 holds it): two runs writing the same
    checkpoints would corrupt each other. The second is refused, naming the process that holds the folder."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self):
        if os.environ.get("RANK", "0") != "0":
            return self
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:  # under a regular file, read-only, ...: before any data is read
            raise EncdiffError(f"run folder {self.path.parent}: cannot be written ({e.strerror or e})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise EncdiffError(f"{self.path.parent}: the run folder is in use by process {holder}; wait for it to "
                               "finish or stop it (it resumes exactly), or use another --run-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock


def prepare(config: TrainConfig, stage: str) -> tuple[Distributed, ImageDataset]:
    dist_ = Distributed()
    run_dir = Path(config.run_dir)
    if dist_.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_.barrier()

    # Rank 0 decodes and caches; the other ranks then read the cache instead of decoding again.
    dataset = dataset_of(config, run_dir, progress=True) if dist_.main else None
    dist_.barrier()
    return dist_, dataset if dataset is not None else dataset_of(config, run_dir, progress=False)


def dataset_of(config: TrainConfig, run_dir: str | os.PathLike, progress: bool = True) -> ImageDataset:
    """The images a run trains on, for every stage and for export: decoded once into the run's cache; the run
    folder is never data, even inside the data folder (`cd images && encdiff train .`)."""
    run_dir = Path(run_dir)
    return ImageDataset(config.data, config.resolution, config.channels, strict=config.strict,
                        cache_dir=run_dir / "cache", workers=config.workers, progress=progress, exclude=(run_dir,))


def backbone_presets(backbone: str) -> dict:
    """The model presets of a backbone (TrainConfig.backbone)."""
    return {"unet": UNETS, "edm2": MP_UNETS}[backbone]


def model_config(table: dict, config: TrainConfig, config_class: type, **fixed: Any):
    base = dataclasses.asdict(preset(table, config.model))
    return config_from_dict(config_class, {**base, **config.model_overrides, **fixed}, "model config")


# -- stage 1 ----------------------------------------------------------------------------------------------
def train_autoencoder(config: TrainConfig) -> Path:
    """Train a KL autoencoder; see `_train_autoencoder`. The run folder is locked while it trains."""
    with RunLock(config.run_dir):
        return _train_autoencoder(config)


def _train_autoencoder(config: TrainConfig) -> Path:
    """Train a KL autoencoder on `config.data`; returns the folder of the final (EMA) autoencoder.

    With `config.init`, training starts from that autoencoder; with `config.decoder_only` as well, only the decoder
    (and post_quant_conv) learn: the encoder, its posterior and the stored latent scale/shift stay bit for bit, so
    the latent space, and every U-Net trained on it, is unchanged."""
    if config.init:
        init = Autoencoder.from_pretrained(config.init)  # a bad folder fails before the data is decoded
    else:
        preset(AUTOENCODERS, config.model)
    dist_, dataset = prepare(config, "autoencoder")
    if config.init:
        ae_config = init.config
        if (ae_config.in_channels, ae_config.sample_size) != (config.channels, config.resolution):
            raise EncdiffError(f"--init {config.init}: an autoencoder for {ae_config.in_channels}-channel "
                               f"{ae_config.sample_size}x{ae_config.sample_size} images; this run has channels "
                               f"{config.channels}, resolution {config.resolution}")
    else:
        ae_config = model_config(AUTOENCODERS, config, AutoencoderConfig, in_channels=config.channels,
                                 out_channels=config.channels, sample_size=config.resolution)
    if config.resolution % ae_config.downsample_factor:
        raise EncdiffError(f"resolution {config.resolution} is not divisible by the autoencoder's downsampling "
                           f"factor {ae_config.downsample_factor}")
    torch.manual_seed(config.seed)  # the initial weights (of the discriminator too)
    autoencoder = Autoencoder(ae_config)
    if config.init:
        autoencoder.load_state_dict(init.state_dict())
    if config.decoder_only:
        frozen_modules(autoencoder).requires_grad_(False)
    discriminator = None
    if config.adv_weight > 0:
        discriminator = PatchDiscriminator(DiscriminatorConfig(in_channels=config.channels,
                                                               channels=config.disc_channels, layers=config.disc_layers))
    run = Run(config, "autoencoder", autoencoder, dataset, dist_, discriminator=discriminator)
    run.resume()
    preview = dataset.batch(torch.arange(0, len(dataset), max(1, len(dataset) // 8))[:8])[0]
    objective = AutoencoderObjective(
        recon_loss=config.recon_loss, kl_weight=config.kl_weight, ssim_weight=config.ssim_weight,
        fft_weight=config.fft_weight, adv_weight=config.adv_weight, adv_start=config.adv_start,
        fm_weight=config.fm_weight, discriminator=run.discriminator,
        last_layer=run.model.decoder.conv_out.weight, all_reduce=dist_.mean)

    f = ae_config.downsample_factor

    def loss_fn(model, x, labels):
        B, C, H, W = x.shape
        rank, world_size = run.shard
        noise = torch.randn((B * world_size, ae_config.latent_channels, H // f, W // f),
                            generator=run.generators["noise"], device=x.device)[rank::world_size]
        reconstruction, posterior = model(x, noise=noise)
        return objective.loss(x, reconstruction, posterior, run.step, run.wrapped.get("discriminator"))

    def on_sample(run: Run) -> None:
        with torch.inference_mode():
            out = run.ema.model.decode(run.ema.model.encode(preview.to(dist_.device))).clamp(-1, 1).cpu()
        pairs = torch.stack([preview, out], 1).flatten(0, 1)  # original | reconstruction, side by side
        save_png(image_grid(to_uint8(pairs), rows=len(preview) // 2),
                 run.dir / f"reconstructions-{run.step:08d}.png")

    status = train_loop(run, loss_fn, dataset.batch, on_sample)
    if status != "done":
        return run.dir
    out = run.dir / "model"
    if dist_.main:
        # A decoder-only run keeps the latent space, statistics included; otherwise they are measured anew.
        autoencoder = run.ema.model if config.decoder_only else measure_latent_statistics(run.ema.model, dataset,
                                                                                          dist_.device)
        autoencoder.save_pretrained(out)
        print(f"autoencoder written to {out} (scaling_factor {autoencoder.config.scaling_factor:.4g})", file=sys.stderr)
    dist_.barrier()
    return out


def frozen_modules(autoencoder: Autoencoder) -> torch.nn.ModuleList:
    """What a decoder-only fine-tune keeps fixed: everything that maps an image to its latent."""
    return torch.nn.ModuleList([m for m in (autoencoder.encoder, autoencoder.quant_conv) if m is not None])


@torch.inference_mode()
def measure_latent_statistics(autoencoder: Autoencoder, dataset: ImageDataset, device, batch: int = 256,
                              progress: bool = True) -> Autoencoder:
    """Set shift = per-channel mean and scale = 1 / std of the raw latents over the data (LDM sec. 4.3.2)."""
    n, total, total_sq = 0, 0.0, 0.0
    for start in tqdm(range(0, len(dataset), batch), desc="latent statistics", unit="batch", leave=False,
                      disable=not progress):
        x, _ = dataset.batch(torch.arange(start, min(start + batch, len(dataset))))
        z = autoencoder.posterior(x.to(device)).mode().double()
        total = total + z.sum(dim=(0, 2, 3))
        total_sq = total_sq + z.square().sum(dim=(0, 2, 3))
        n += z.shape[0] * z.shape[2] * z.shape[3]
    mean = total / n
    # The variance around the per-channel means, pooled over channels: one scale keeps channel ratios intact.
    var = (total_sq / n - mean.square()).mean()
    config = dataclasses.replace(autoencoder.config, scaling_factor=float(1 / var.sqrt()),
                                 shift_factor=tuple(float(m) for m in mean))
    measured = Autoencoder(config).to(device)
    measured.load_state_dict(autoencoder.state_dict())
    return measured.eval()


# -- stage 2 ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def encode_dataset(autoencoder: Autoencoder, dataset: ImageDataset, device, batch: int = 256,
                   progress: bool = True) -> torch.Tensor:
    """Latents of every image and of its mirror image: (N, 2, C, h, w) float32, flip index 1 = mirrored."""
    out = []
    # A progress bar from the first batch: encoding a large folder takes minutes on a CPU.
    for start in tqdm(range(0, len(dataset), batch), desc="encoding latents", unit="batch", disable=not progress):
        idx = torch.arange(start, min(start + batch, len(dataset)))
        x, _ = dataset.batch(idx)
        x = x.to(device)
        out.append(torch.stack([autoencoder.encode(x), autoencoder.encode(x.flip(-1))], 1).float().cpu())
    return torch.cat(out)


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
    dist_, dataset = prepare(config, "diffusion")
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
    export_info = {"denoiser": dataclasses.asdict(spec), "class_names": dataset.class_names,
                   "autoencoder": str(Path(config.autoencoder).resolve()) if config.autoencoder else None,
                   "backbone": config.backbone}
    run = Run(config, "diffusion", backbone_class(config.backbone)(unet_config), dataset, dist_, export_info)
    run.resume()

    images_of = (latent_batches(cached_latents(autoencoder, dataset, Path(config.run_dir) / "cache",
                                               config.autoencoder, dist_), dataset)
                 if autoencoder is not None else dataset.batch)

    label_dropout = config.label_dropout if dataset.num_classes else 0.0

    denoiser = spec.build(run.model)

    def loss_fn(model, x, labels):
        # DDP syncs gradients only for calls through its wrapper: the loss runs the network it is given.
        return training_loss(denoiser, x, run.generators["noise"], class_labels=labels, noise_level=config.noise_level,
                             weighting=config.weighting, label_dropout=label_dropout, shard=run.shard, net=model,
                             uncertainty=config.uncertainty, **config.loss_options)

    def on_sample(run: Run) -> None:
        generator = Generator(run.ema.model, spec, autoencoder, dataset.class_names)
        rows = max(1, min(dataset.num_classes, 10))
        per_row = 8
        labels = (torch.arange(rows).repeat_interleave(per_row) if dataset.num_classes else None)
        images = generator.images(list(range(rows * per_row)), labels, steps=config.sample_steps)
        save_png(image_grid(images, rows=rows), run.dir / f"samples-{run.step:08d}.png")

    on_eval = evaluation_hook(config, dataset, lambda run: Generator(run.ema.model, spec, autoencoder,
                                                                      dataset.class_names),
                              steps=config.sample_steps)
    train_loop(run, loss_fn, images_of, on_sample, on_eval)
    out = run.dir / "model"
    if dist_.main:
        Generator(run.ema.model, spec, autoencoder, dataset.class_names).save_pretrained(out)
        print(f"generator written to {out}", file=sys.stderr)
    dist_.barrier()
    return out


def evaluation_hook(config: TrainConfig, dataset: ImageDataset, generator_of: Callable[[Run], Generator],
                    **sampling: Any) -> Callable[[Run], None]:
    """FID/KID/P&R of the EMA weights every `eval_every` steps, logged to metrics.jsonl; the best generator so far
    is kept in the run's best/ folder."""
    reference = []  # the data's feature statistics, computed at the first evaluation

    def on_eval(run: Run) -> None:
        from .evaluate import evaluate_generator, reference_stats

        if not reference:
            # A seeded random subset: the data may be ordered by class.
            idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))[:10_000]
            reference.append(reference_stats(dataset.images[idx], cache_dir=run.dir / "cache", source=config.data))
        generator = generator_of(run)
        metrics = evaluate_generator(generator, reference[0], config.eval_samples, seed=0, **sampling)
        row = {"step": run.step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        previous_best = min((r["fid"] for r in run.history if "fid" in r), default=math.inf)
        run.log(row)
        if row["fid"] < previous_best:
            generator.save_pretrained(run.dir / "best")
            atomic_write_bytes(run.dir / "best" / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())

    return on_eval


def latent_batches(latents: torch.Tensor, dataset: ImageDataset):
    """`images_of` for the training loop over cached latents (N, 2, C, h, w): each image's latent, or its mirror's."""
    def images_of(indices, flips):
        return latents[indices, flips.long()], None if dataset.labels is None else dataset.labels[indices]
    return images_of


def cached_latents(autoencoder: Autoencoder, dataset: ImageDataset, cache_dir: Path, key: str,
                   dist_: Distributed) -> torch.Tensor:
    """Encode the data set once (rank 0) and keep it in the run's cache folder; every rank then loads it.

    The file is named by the autoencoder's weights and by what the images are (`ImageDataset.content_key`, the
    decoded pixels): replacing an image, or the autoencoder, encodes again. A damaged file is encoded again with a
    warning."""
    from safetensors.torch import load_file

    from .checkpoint import atomic_save_tensors

    ae_folder = Path(key)
    weights = next((p for p in (ae_folder / "model.safetensors", ae_folder / "diffusion_pytorch_model.safetensors")
                    if p.is_file()), None)
    tag = sha256_file(weights)[:16] if weights else "unknown"
    path = cache_dir / f"latents-{tag}-{dataset.content_key[:16]}-{len(dataset)}.safetensors"

    def usable() -> bool:
        try:
            latents = load_file(str(path))["latents"]
        except Exception as e:  # any damage: truncated, not safetensors, no such key
            warnings.warn(f"{path}: ignoring a damaged latent cache ({type(e).__name__}); encoding again", stacklevel=3)
            return False
        if tuple(latents.shape[:3]) != (len(dataset), 2, autoencoder.latent_channels):
            warnings.warn(f"{path}: ignoring a latent cache of shape {tuple(latents.shape)}; encoding again",
                          stacklevel=3)
            return False
        return True

    if dist_.main and not (path.is_file() and usable()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"latents": encode_dataset(autoencoder, dataset, dist_.device)}, path)
    dist_.barrier()
    return load_file(str(path))["latents"]


# -- consistency distillation ------------------------------------------------------------------------------
def train_consistency(config: TrainConfig) -> Path:
    """Distil the generator folder `config.teacher` into a consistency student (consistency.py) that samples in
    `student_steps` evaluations with the teacher's guidance built in; returns the student's generator folder. The
    same loop as the other stages: exact resume, DDP, EMA, logs, sample grids, evaluations."""
    with RunLock(config.run_dir):
        return _train_consistency(config)


def _train_consistency(config: TrainConfig) -> Path:
    from .consistency import distillation_grid, distillation_loss, interval_probabilities

    if not config.teacher:
        raise EncdiffError("no teacher: pass the generator folder to distil (encdiff distill TEACHER DATA)")
    teacher = Generator.from_pretrained(config.teacher)  # a bad folder fails before the data is decoded
    if teacher.spec.kind != "edm":
        raise EncdiffError(f"{config.teacher}: a {teacher.spec.kind!r} generator; distillation needs an EDM teacher "
                           "(its probability-flow ODE is the student's target)")
    guidance = config.guidance if config.guidance is not None else teacher.sampling.guidance_scale
    guidance = None if guidance == 1 else guidance
    if guidance is not None and not teacher.num_classes:
        raise EncdiffError(f"guidance {guidance}: the teacher {config.teacher} is unconditional")
    if config.resolution != teacher.image_size:
        raise EncdiffError(f"resolution {config.resolution}: the teacher {config.teacher} makes "
                           f"{teacher.image_size}x{teacher.image_size} images (pass --resolution {teacher.image_size})")
    dist_, dataset = prepare(config, "consistency")
    if dataset.num_classes != teacher.num_classes:
        raise EncdiffError(f"{config.data}: {count(dataset.num_classes, 'class folder')}, but the teacher {config.teacher} "
                           f"is conditional on {count(teacher.num_classes, 'class', 'classes')}; distil on its training data")
    teacher_net = teacher.unet.to(dist_.device).requires_grad_(False)
    teacher_denoiser = teacher.spec.build(teacher_net)
    latent = isinstance(teacher.autoencoder, Autoencoder)
    autoencoder = teacher.autoencoder.to(dist_.device) if latent else None
    spec = dataclasses.replace(teacher.spec, kind="consistency")
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
                    "guidance_scale": guidance, "intervals": config.intervals, "solver": config.solver}
    ae_folder = Path(config.teacher) / "autoencoder"
    export_info = {"denoiser": dataclasses.asdict(spec), "class_names": teacher.class_names,
                   "autoencoder": str(ae_folder.resolve()) if latent else None, "backbone": backbone,
                   "sampling": dataclasses.asdict(sampling), "distillation": distillation}
    run = Run(config, "consistency", student, dataset, dist_, export_info)
    if run.resume():
        then = run.resumed_export.get("distillation", {}).get("teacher_unet_sha256")
        if then != distillation["teacher_unet_sha256"]:
            raise EncdiffError(f"{config.teacher}: not the teacher this run was distilling (its U-Net's sha256 "
                               f"{distillation['teacher_unet_sha256'][:16]}, the checkpoint's {str(then)[:16]}); "
                               "resume with the original teacher or use another --run-dir")

    images_of = (latent_batches(cached_latents(autoencoder, dataset, Path(config.run_dir) / "cache", str(ae_folder),
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
    target = spec.build(run.model)  # the stop-gradient target: the student's own weights, not its DDP wrapper

    def loss_fn(model, x, labels):
        student_denoiser.net = model  # DDP syncs gradients only for calls through its wrapper
        return distillation_loss(student_denoiser, teacher_denoiser, x, run.generators["noise"], grid, probabilities,
                                 class_labels=labels, guidance_scale=guidance, label_dropout=label_dropout,
                                 solver=config.solver, huber_c=config.huber_c, target=target, shard=run.shard)

    def student_of(run: Run) -> Generator:
        return Generator(run.ema.model, spec, autoencoder, teacher.class_names, sampling,
                         {**distillation, "images": run.images_seen})

    def on_sample(run: Run) -> None:
        rows = max(1, min(dataset.num_classes, 10))
        labels = torch.arange(rows).repeat_interleave(8) if dataset.num_classes else None
        images = student_of(run).images(list(range(rows * 8)), labels)
        save_png(image_grid(images, rows=rows), run.dir / f"samples-{run.step:08d}.png")

    status = train_loop(run, loss_fn, images_of, on_sample, evaluation_hook(config, dataset, student_of))
    out = run.dir / "model"
    if status == "done" and dist_.main:
        student_of(run).save_pretrained(out)
        print(f"consistency student written to {out}", file=sys.stderr)
    dist_.barrier()
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, diffusers: bool = False,
               dtype: torch.dtype | None = None, sampling: dict[str, Any] | None = None,
               sigma_rel: float | None = None) -> Path:
    """Write the EMA weights of a run's newest checkpoint as a model folder: an autoencoder (its latent
    statistics measured on the run's data, as at the end of training) or a generator. With `diffusers`,
    the networks are written in diffusers' format (`unet/`, `vae/`); `dtype` (e.g. torch.float16) stores the
    weights in that precision; `sampling` sets a generator's default sampler/steps/guidance_scale; `sigma_rel`
    exports the post-hoc EMA of that width reconstructed from the run's snapshots (phema.reconstruct) instead of
    the run's EMA."""
    path = latest_training_state(run_dir)
    if path is None:
        raise EncdiffError(f"{run_dir}: no complete checkpoint to export")
    tensors, meta = load_training_state(path)
    info = meta.get("export", {})
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    if sigma_rel is not None:
        from .phema import reconstruct

        posthoc, record = reconstruct(run_dir, sigma_rel)
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
        dataset = dataset_of(config, run_dir)
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
    generator = Generator(unet, DenoiserSpec(**info["denoiser"]), autoencoder, info.get("class_names"), sampling,
                          distillation)
    if not diffusers:
        return generator.save_pretrained(out, dtype=dtype)
    unet.save_pretrained(out / "unet", diffusers=True, dtype=dtype)
    if autoencoder is not None:
        autoencoder.save_pretrained(out / "vae", diffusers=True, dtype=dtype)
    return out


def check_model_name(config: TrainConfig, stage: str) -> None:
    """An unknown model preset is refused with the valid names (before any data is read)."""
    if config.model and stage in ("autoencoder", "diffusion"):
        preset(AUTOENCODERS if stage == "autoencoder" else backbone_presets(config.backbone), config.model)


def load_config(path: str | None, preset_name: str | None, stage: str, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < named preset < TOML file < command-line flags."""
    values: dict[str, Any] = {}
    if preset_name:
        if preset_name not in PRESETS:
            raise EncdiffError(f"unknown training preset {preset_name!r}; valid: {', '.join(sorted(PRESETS))}")
        if stage not in PRESETS[preset_name]:
            raise EncdiffError(f"training preset {preset_name!r} has no {stage} settings; it has "
                               f"{', '.join(PRESETS[preset_name])}")
        values.update(PRESETS[preset_name][stage])
    if path:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except FileNotFoundError:
            raise EncdiffError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise EncdiffError(f"{path}: not valid TOML ({e})") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(TrainConfig, values, path or "training config")
