"""What the generator stages (diffusion, distillation) write while they train: sample grids of the EMA weights,
and FID/KID/P&R evaluations with the best generator kept."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch

from ..checkpoint import atomic_write_bytes
from ..data import ImageDataset
from ..images import image_grid, on_checkerboard, save_png
from ..pipeline import Generator
from .config import TrainConfig
from .loop import Run


def sample_grid(generator_of: Callable[[Run], Generator], dataset: ImageDataset,
                **sampling: Any) -> Callable[[Run], None]:
    """samples-<step>.png: 8 seeds per row, one row per class (at most 10), the same seeds at every step;
    transparency shown on a checkerboard."""
    def sample(run: Run) -> None:
        rows = max(1, min(dataset.num_classes, 10))
        per_row = 8
        labels = torch.arange(rows).repeat_interleave(per_row) if dataset.num_classes else None
        images = generator_of(run).images(list(range(rows * per_row)), labels, **sampling)
        save_png(image_grid(on_checkerboard(images), rows=rows), run.dir / f"samples-{run.step:08d}.png")
    return sample


def evaluation_hook(config: TrainConfig, dataset: ImageDataset, generator_of: Callable[[Run], Generator],
                    **sampling: Any) -> Callable[[Run], None]:
    """FID/KID/P&R of the EMA weights every `eval_every` steps, logged to metrics.jsonl; the best generator so far
    is kept in the run's best/ folder."""
    reference = []  # the data's feature statistics, computed at the first evaluation

    def evaluate(run: Run) -> None:
        from ..evaluate import class_counts, evaluate_generator, reference_stats

        if not reference:
            # A seeded random subset (the data may be ordered by class) of up to 10,000 images, each in its
            # aspect-ratio bucket: the generator is sampled at every shape it trains at, in the data's proportions.
            idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))[:10_000]
            # the subset's classes: an unbalanced folder is sampled in its proportions, as `eval` does
            counts = None if dataset.labels is None else class_counts(dataset.labels[idx], dataset.class_names)
            reference.append(reference_stats(dataset.images_by_bucket(idx), cache_dir=run.dir / "cache",
                                              source=config.data, class_counts=counts, resolution=dataset.resolution))
        generator = generator_of(run)
        metrics = evaluate_generator(generator, reference[0], config.eval_samples, seed=0, **sampling)
        row = {"step": run.step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        previous_best = min((r["fid"] for r in run.history if "fid" in r), default=math.inf)
        run.log(row)
        if row["fid"] < previous_best:
            generator.save_pretrained(run.dir / "best")
            atomic_write_bytes(run.dir / "best" / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())

    return evaluate
