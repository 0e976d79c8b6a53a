"""The run machinery every stage shares: processes (torchrun), the run folder's lock, the networks a run trains
with their optimizers, exact checkpoints, logs, and the optimizer loop that runs a stage's `Recipe`."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import atomic_write_bytes
from ..buckets import format_shape
from ..data import BatchSampler, ImageDataset
from ..ema import EMA
from ..errors import EncdiffError, TrainingInterrupted, count
from ..phema import PowerEMA
from .budget import fit_to_time_budget, resumed_config
from .config import PATH_FIELDS, RESUMABLE_CHANGES, TrainConfig, config_to_json, dataset_of
from .state import (flatten_state, latest_training_state, load_training_state, rng_state, save_training_state,
                    set_rng_state, unflatten_state)
from .step import autocast_of, optimizer_step


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
        self.started = time.perf_counter()  # a time budget counts from here: decoding and encoding included

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

    def max(self, value: torch.Tensor) -> torch.Tensor:
        """The largest value over ranks (identity on one process)."""
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
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


def class_weights(config: TrainConfig, dataset: ImageDataset) -> torch.Tensor | None:
    """With `balance_classes`, each image's draw weight 1 / (its class's image count): every class equally often."""
    if not config.balance_classes:
        return None
    if dataset.labels is None:
        raise EncdiffError(f"config field 'balance_classes' = true: {config.data} has no class subfolders to balance")
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes).double()
    return 1 / counts[dataset.labels]


@dataclass
class OptimizerGroup:
    """One network a run trains, with an optimizer of its own: the model, and a GAN's discriminator beside it.

    In checkpoints its weights are `{prefix}.<name>` and its optimizer's tensors `{optimizer_key}.<name>`, with the
    optimizer's JSON skeleton under the meta key `optimizer_key`."""
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    prefix: str
    optimizer_key: str
    clip: float = math.inf  # the global gradient-norm bound; inf: measured (for the divergence check), not clipped

    @functools.cached_property
    def trainable(self) -> list[torch.nn.Parameter]:
        # Gathered once: a stage freezes what it freezes before its run is built, and walking the module tree
        # twice a step is host time a GPU waits for.
        return [p for p in self.module.parameters() if p.requires_grad]


class Run:
    """The state every stage shares: data order, the networks and their optimizers, EMA, RNG streams, checkpoints
    and logs."""

    def __init__(self, config: TrainConfig, stage: str, model: torch.nn.Module, dataset: ImageDataset, dist_: Distributed,
                 export_info: dict[str, Any] | None = None, discriminator: torch.nn.Module | None = None):
        self.config, self.stage, self.dist = config, stage, dist_
        self.started = dist_.started
        # A time budget's plan ({"planned": {field: value}, "fitted": {...}}, budget.py), kept with the checkpoints.
        self.budget_plan: dict[str, Any] | None = None
        # The data's fingerprint (every file's path, size and time): a resumed run must train on the same data.
        self.data = {"images": len(dataset), "key": dataset.key}
        # What `export_run` needs to rebuild the model from any checkpoint: its config, and for a generator
        # the denoiser spec, class names and autoencoder folder.
        self.export_info = {"model_config": dataclasses.asdict(model.config), **(export_info or {})}
        self.dir = Path(config.run_dir)
        per_rank = config.batch_size // (dist_.world_size * config.grad_accum)
        if per_rank * dist_.world_size * config.grad_accum != config.batch_size or per_rank == 0:
            raise EncdiffError(f"batch_size {config.batch_size} is not divisible by world size {dist_.world_size} "
                               f"x grad_accum {config.grad_accum}")
        self.per_rank_batch = per_rank
        self.sampler = BatchSampler(len(dataset), per_rank, seed=config.seed, rank=dist_.rank,
                                    world_size=dist_.world_size, weights=class_weights(config, dataset),
                                    groups=dataset.bucket_of)
        model = model.to(dist_.device)
        # The fused kernel (CPU and CUDA) updates all tensors in one pass: ~2.7x faster than the per-tensor loop.
        # Frozen parameters (a decoder-only fine-tune's encoder) are not given to it.
        self.groups = {"model": OptimizerGroup(
            model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                     betas=config.betas, weight_decay=config.weight_decay, fused=True),
            "model", "optimizer", config.grad_clip or math.inf)}
        if discriminator is not None:
            # betas 0.5/0.9 as in taming/LDM; no EMA and no learning-rate schedule
            discriminator = discriminator.to(dist_.device)
            self.groups["discriminator"] = OptimizerGroup(
                discriminator, torch.optim.AdamW(discriminator.parameters(), lr=config.disc_lr or config.lr,
                                                 betas=(0.5, 0.9), fused=True), "disc", "disc_optimizer")
        self.wrapped: dict[str, torch.nn.Module] = {}  # the groups' modules as the loss calls them (DDP, compile)
        # The schedule reads the run's config at every step, not the one it was built with: a time budget's fitted
        # steps (`reconfigure`, or taken back from a checkpoint by `resume`) move its decay point and cosine end.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(self.config)(step))
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

    @property
    def model(self) -> torch.nn.Module:
        """The network the stage trains (plain, not wrapped): what the EMA follows and export writes."""
        return self.groups["model"].module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.groups["model"].optimizer

    @property
    def discriminator(self) -> torch.nn.Module | None:
        group = self.groups.get("discriminator")
        return group.module if group is not None else None

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
            tensors = {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
            skeletons = {}
            for group in self.groups.values():
                tensors.update({f"{group.prefix}.{k}": v for k, v in group.module.state_dict().items()})
                optimizer_tensors, skeletons[group.optimizer_key] = flatten_state(group.optimizer.state_dict(),
                                                                                  f"{group.optimizer_key}.")
                tensors.update(optimizer_tensors)
            if self.phema is not None:
                tensors.update({f"phema.{k}": v for k, v in self.phema.state_dict().items()})
            for rank, rank_states in enumerate(gathered):
                for name, state in rank_states.items():
                    tensors[f"rng.{name}.rank{rank}"] = torch.tensor(state, dtype=torch.uint8)
            meta = {"stage": self.stage, "step": self.step, "images_seen": self.images_seen,
                    "world_size": self.dist.world_size, "sampler": self.sampler.state_dict(),
                    "scheduler": self.scheduler.state_dict(), **skeletons,
                    "config": config_to_json(self.config), "history": self.history, "export": self.export_info,
                    "data": self.data, "window": self.window, "budget": self.budget_plan}
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
        # the time budget's plan, made when the run started
        self.config, _, self.budget_plan = resumed_config(self.config, meta)
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
        for group in self.groups.values():
            group.module.load_state_dict(take(f"{group.prefix}."))
            group.optimizer.load_state_dict(unflatten_state(tensors, meta[group.optimizer_key]))
        self.ema.load_state_dict(take("ema."))
        if self.phema is not None:
            self.phema.load_state_dict(take("phema."))
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

    def reconfigure(self, **changes: Any) -> None:
        """Change resumable fields (a time budget's steps) before the loop starts: the learning rate is set anew
        for them at the current step (the schedule follows `self.config`), and the run folder's config.json rewritten."""
        self.config = dataclasses.replace(self.config, **changes)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_factor(self.config)(self.step)
        if self.dist.main:
            write_run_config(self.dir, self.stage, self.config)

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


@dataclass
class Recipe:
    """What a stage gives the shared loop (`train_loop`); the batch travels through these in this order:

        indices, flips  (the run's BatchSampler and data stream)
        -> batch(indices, flips) = (x, labels)         images or cached latents, on the CPU
        -> loss(network, x, labels) = loss or (loss, {name: part})
                                                        `network` as the loop calls it (DDP, compile); a loss
                                                        that needs another group's module reads `run.wrapped`
        -> backward, clip, one optimizer step per group, EMA
    and every `sample_every` / `eval_every` steps `sample(run)` / `evaluate(run)` write into the run folder."""
    batch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor | None], Any]
    sample: Callable[[Run], None]
    evaluate: Callable[[Run], None] | None = None
    # Config fields naming a step from which a step costs differently ({"adv_start": 1200}: the GAN's start): a time
    # budget times each phase apart and moves these steps with the step count, so the plan keeps its proportions.
    phases: dict[str, int] = dataclasses.field(default_factory=dict)


def wrap(run: Run) -> dict[str, torch.nn.Module]:
    """Each group's module as the loss calls it: under DDP on several processes; the model also compiled."""
    dist_ = run.dist
    wrapped = {}
    for name, group in run.groups.items():
        module = group.module
        if dist_.world_size > 1:
            module = DistributedDataParallel(module, device_ids=[dist_.local_rank] if dist_.device.type == "cuda"
                                             else None)
        if name == "model" and run.config.compile:
            # Compiled around DDP (as PyTorch recommends); checkpoints and the EMA keep using the plain module.
            module = torch.compile(module)
        wrapped[name] = module
    return wrapped


def train_loop(run: Run, recipe: Recipe) -> str:
    """The optimizer loop every stage shares; returns "done", or raises TrainingInterrupted after a SIGINT or
    SIGTERM once the step in flight is finished and checkpointed."""
    dist_ = run.dist
    run.wrapped = wrap(run)
    if run.config.time_budget is not None:
        fit_to_time_budget(run, recipe)
    config = run.config
    autocast = autocast_of(config, dist_)
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
            total, parts_total, norms = optimizer_step(run, recipe, autocast)
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
                       "grad_norm": norms["model"].item() if "model" in norms else 0.0,
                       **{name: sum(values) / len(values) for name, values in window_parts.items()}}
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                     img_s=f"{row['images_per_s']:.1f}")
                run.log(row)
                window_start, window_images = time.perf_counter(), 0
                window_losses.clear()
                window_parts.clear()
            if config.sample_every and run.step % config.sample_every == 0 and dist_.main:
                recipe.sample(run)
            if recipe.evaluate is not None and config.eval_every and run.step % config.eval_every == 0 and dist_.main:
                recipe.evaluate(run)
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


def describe_classes(dataset: ImageDataset) -> str:
    """"7562 images in 9 classes, 170 (activities) to 4522 (people-and-body) per class", "... 10 classes, 5000
    each" or "... unconditional"."""
    if dataset.labels is None:
        return f"{count(len(dataset), 'image')}, no classes (unconditional)"
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes).tolist()
    low, high = min(range(len(counts)), key=counts.__getitem__), max(range(len(counts)), key=counts.__getitem__)
    names, classes = dataset.class_names, f"{count(len(dataset), 'image')} in {count(len(counts), 'class', 'classes')}"
    if counts[low] == counts[high]:  # balanced: naming one class as both ends would read as a range
        return f"{classes}, {counts[low]} each"
    return f"{classes}, {counts[low]} ({names[low]}) to {counts[high]} ({names[high]}) per class"


def prepare(config: TrainConfig, stage: str, factor: int = 1) -> tuple[Distributed, ImageDataset]:
    """The process group and the data (`factor`: the autoencoder's downsampling, for aspect-ratio buckets)."""
    dist_ = Distributed()
    run_dir = Path(config.run_dir)
    if dist_.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_.barrier()

    # Rank 0 decodes and caches; the other ranks then read the cache instead of decoding again.
    dataset = dataset_of(config, run_dir, progress=True, factor=factor) if dist_.main else None
    if dataset is not None:
        print(f"data: {describe_classes(dataset)}" + ("; classes drawn equally often" if config.balance_classes
                                                      else ""), file=sys.stderr)
        if dataset.bucketed:
            print(f"aspect-ratio buckets: {describe_buckets(dataset)}", file=sys.stderr)
    dist_.barrier()
    return dist_, dataset if dataset is not None else dataset_of(config, run_dir, progress=False, factor=factor)


def describe_buckets(dataset: ImageDataset) -> str:
    """"48x80 (120), 64x64 (5210), 80x48 (96)": each bucket in use, width first, and its images."""
    return ", ".join(f"{format_shape(shape)} ({len(part)})" for shape, part in zip(dataset.shapes, dataset.parts))


