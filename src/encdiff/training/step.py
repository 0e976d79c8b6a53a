"""One optimizer step of a run (loop.Run) over a stage's recipe (loop.Recipe): the batch, the loss, backward,
clipping, the divergence check, every optimizer group's update. The loop and the time budget's probe share it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..data import random_flips
from ..errors import EncdiffError
from .config import TrainConfig
from .state import latest_training_state


def optimizer_step(run: Any, recipe: Any, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                     dict[str, torch.Tensor]]:
    """One optimizer step of every group with gradients: the batch (all accumulation rounds), the loss, backward,
    clipping, the divergence check, the updates. Returns the loss (averaged over ranks), its named parts and the
    groups' gradient norms. Neither the step count nor the EMA moves: that is the loop's."""
    config, dist_ = run.config, run.dist
    ddp_model = run.wrapped["model"]
    run.model.train()
    total = torch.zeros((), device=dist_.device)
    parts_total: dict[str, torch.Tensor] = {}
    for micro in range(config.grad_accum):
        indices = next(run.sampler)
        rank, world_size = run.shard
        flips = random_flips(len(indices) * world_size, run.generators["data"])[rank::world_size]
        if not config.flips:  # drawn all the same, so the data stream does not depend on the choice
            flips = torch.zeros_like(flips)
        x, labels = recipe.batch(indices, flips)
        # Gradients are all-reduced on the last accumulation round only.
        sync = micro == config.grad_accum - 1 or dist_.world_size == 1
        context = ddp_model.no_sync() if not sync else contextlib.nullcontext()
        with context, torch.autocast(dist_.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = recipe.loss(ddp_model, to_device(x, dist_.device),
                               None if labels is None else labels.to(dist_.device))
        # A loss may come with named parts (the autoencoder's terms) to log beside it.
        loss, parts = loss if isinstance(loss, tuple) else (loss, {})
        (loss / config.grad_accum).backward()
        total += loss.detach() / config.grad_accum
        for name, value in parts.items():
            parts_total[name] = parts_total.get(name, 0.0) + value.detach().float() / config.grad_accum
    total = dist_.mean(total)
    # A group whose loss term has not started yet (a discriminator before `adv_start`) has no gradients
    # and takes no step.
    stepping = {name: group for name, group in run.groups.items() if any(p.grad is not None for p in group.trainable)}
    norms = {name: torch.nn.utils.clip_grad_norm_(group.trainable, group.clip) for name, group in stepping.items()}
    if not (torch.isfinite(total) and all(torch.isfinite(n) for n in norms.values())):
        last = latest_training_state(run.dir)
        what = "".join(f", {'' if name == 'model' else name + ' '}gradient norm {n.item():.4g}"
                       for name, n in norms.items())
        raise EncdiffError(f"training diverged at step {run.step + 1}: loss {total.item():.4g}{what}; the "
                           f"last good checkpoint is {last or 'none'} (lower --lr or raise --warmup-steps, "
                           "then resume)")
    for group in stepping.values():
        group.optimizer.step()
        group.optimizer.zero_grad(set_to_none=True)
        if hasattr(group.module, "normalize_weights_"):
            group.module.normalize_weights_()  # forced weight normalisation (EDM2 sec. 2.4), on every rank
    return total, parts_total, norms


def to_device(x: torch.Tensor | tuple[torch.Tensor, ...], device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A batch on the device: one tensor, or a tuple of them (a stage that reads images with their latents)."""
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def autocast_of(config: TrainConfig, dist_: Any) -> bool:
    return config.bf16 if config.bf16 is not None else dist_.device.type == "cuda"
