"""A time budget for a run (`--time 45m`): the steps that fit, from the seconds a step takes on this machine, measured
at the start of the run without leaving a trace in it."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import time
from typing import Any

import torch

from ..errors import EncdiffError, count
from .config import config_to_json
from .step import autocast_of, optimizer_step


PROBE_STEPS = 3  # timed optimizer steps per phase, after one untimed (allocation, caches)
FINISH_SHARE = 0.03  # of the budget kept for what follows the last step (statistics, export)
# Step counts of the plan that move with the fitted steps, though a step costs the same either side of them: the
# learning rate's decay point (EDM2's t_ref) and the post-hoc EMA's snapshot interval (so the snapshots stay as many).
SCALED_WITH_STEPS = ("lr_decay_steps", "phema_every")


def fit_to_time_budget(run: Any, recipe: Any) -> None:
    """`time_budget`: set the step count so the run ends in time with a finished model, from the seconds one step
    takes on this machine, measured here, at the start of each phase whose cost differs (`Recipe.phases`, e.g. the
    GAN's), with every state the probe touches put back, so the run is the one a plain `steps` would train.

    The plan keeps its proportions: each phase covers the share of the steps it was planned to (a GAN planned from a
    quarter of the steps starts at a quarter of the fitted ones; the rate's decay point and the post-hoc EMA's
    interval move too), so the objective the plan describes is the one that trains, whatever the machine's speed.
    The planned and fitted values are kept with the checkpoints (`Run.budget_plan`); a resumed run takes the fitted
    ones back (`resumed_plan`)."""
    config, dist_ = run.config, run.dist
    if run.step > 0:
        return
    left = config.time_budget * (1 - FINISH_SHARE) - (time.perf_counter() - run.started)
    planned = config.steps
    # A phase planned at step 0 or beyond the end has no share to keep: it stays where it is.
    milestones = {field: step for field, step in recipe.phases.items() if 0 < step < planned}
    starts = sorted({0, *milestones.values()})
    milestones.update({field: getattr(config, field) for field in SCALED_WITH_STEPS
                       if 0 < getattr(config, field) < planned})
    seconds = [probe_step_seconds(run, recipe, at) for at in starts]
    # the same plan on every rank: the slowest rank's speed decides
    seconds = [float(dist_.max(torch.tensor(s, device=dist_.device))) for s in seconds]
    ends = starts[1:] + [planned]
    per_step = sum((end - start) * s for start, end, s in zip(starts, ends, seconds)) / planned  # the plan's mean
    steps = max(1, int(max(0.0, left) / per_step))
    moved = {field: max(1, round(step * steps / planned)) for field, step in milestones.items()}
    speed = ", ".join(f"{config.batch_size / s:.0f} img/s from step {p}" for p, s in zip(starts, seconds))
    if dist_.main:
        also = "".join(f"; {field} {step} -> {moved[field]}" for field, step in milestones.items())
        print(f"encdiff: time budget {format_duration(config.time_budget)}: {speed} -> {steps} steps "
              f"({count(steps * config.batch_size, 'image')}){also}", file=sys.stderr)
    run.budget_plan = {"planned": {"steps": planned, **milestones}, "fitted": {"steps": steps, **moved}}
    run.reconfigure(steps=steps, **moved)


def resumed_plan(meta: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What a resumed run takes back from its checkpoint's time budget: the fitted value of each field the command
    gives at its planned value again (the same command: a sized plan is sized anew from the data), and the plan to
    keep writing. A field given another value (`--steps 8000` to extend a finished run) stays as given."""
    then = meta["config"]
    plan = meta.get("budget")
    if plan is None and then.get("time_budget") is not None and now.get("time_budget") is not None:
        # checkpoints written before the plan was stored: only the step count was fitted
        plan = {"planned": {"steps": now["steps"]}, "fitted": {"steps": then["steps"]}}
    if plan is None:
        return {}, None
    return {field: plan["fitted"][field] for field, value in plan["planned"].items() if now.get(field) == value}, plan


def resumed_config(config: Any, meta: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """`config` (a TrainConfig) as a resume from a checkpoint with meta `meta` trains it: the time budget's fitted
    values taken back (`resumed_plan`); returns it, the fields taken back and the plan to keep writing."""
    adopted, plan = resumed_plan(meta, config_to_json(config))
    return (dataclasses.replace(config, **adopted) if adopted else config), adopted, plan


def probe_step_seconds(run: Any, recipe: Any, at_step: int) -> float:
    """Seconds per optimizer step at step `at_step`, measured on the run itself: every state a step changes
    (weights, optimizer moments, RNG streams, the sampler's position) is saved first and restored after."""
    saved = {"groups": {name: (copy.deepcopy(g.module.state_dict()), copy.deepcopy(g.optimizer.state_dict()))
                        for name, g in run.groups.items()},
             "rng": {name: g.get_state() for name, g in run.generators.items()},
             "sampler": run.sampler.state_dict(), "step": run.step}
    autocast = autocast_of(run.config, run.dist)
    try:
        run.step = at_step
        optimizer_step(run, recipe, autocast)
        start = time.perf_counter()
        for _ in range(PROBE_STEPS):
            optimizer_step(run, recipe, autocast)
        if run.dist.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / PROBE_STEPS
    finally:
        for name, (module_state, optimizer_state) in saved["groups"].items():
            run.groups[name].module.load_state_dict(module_state)
            run.groups[name].optimizer.load_state_dict(optimizer_state)
        for name, state in saved["rng"].items():
            run.generators[name].set_state(state)
        run.sampler.load_state_dict(saved["sampler"])
        run.step = saved["step"]


def parse_duration(text: str) -> float:
    """"45m", "1h30m", "90s", "2h" or a number of minutes -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 60
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or match is None:
        raise EncdiffError(f"time budget {text!r}: expected a duration such as 45m, 1h30m, 90s or 2h")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float) -> str:
    """2h05m, 45m or 40s."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
