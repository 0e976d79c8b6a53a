"""A time budget for a run (`--time 45m`): the steps that fit, from the seconds a step takes on this machine, measured
at the start of the run without leaving a trace in it."""

from __future__ import annotations

import copy
import math
import re
import sys
import time
from typing import Any

import torch

from ..errors import EncdiffError, count
from .step import autocast_of, optimizer_step


PROBE_STEPS = 3  # timed optimizer steps per phase, after one untimed (allocation, caches)
FINISH_SHARE = 0.03  # of the budget kept for what follows the last step (statistics, export)


def fit_to_time_budget(run: Any, recipe: Any) -> None:
    """`time_budget`: set the step count so the run ends in time with a finished model, from the seconds one step
    takes on this machine, measured here, at the start of each phase whose cost differs (`Recipe.phases`, e.g. the
    GAN's), with every state the probe touches put back, so the run is the one a plain `steps` would train.

    A resumed run keeps the steps planned when it started (they are in its checkpoint): to extend a finished run,
    resume it without a budget and with more `steps`."""
    config, dist_ = run.config, run.dist
    if run.step > 0:
        planned = run.resumed_steps
        if planned != config.steps:
            run.reconfigure(steps=planned)
        return
    left = config.time_budget * (1 - FINISH_SHARE) - (time.perf_counter() - run.started)
    phases = sorted({0, *(p for p in recipe.phases if 0 < p)})
    seconds = [probe_step_seconds(run, recipe, at) for at in phases]
    # the same plan on every rank: the slowest rank's speed decides
    seconds = [float(dist_.max(torch.tensor(s, device=dist_.device))) for s in seconds]
    steps, spent = 0, 0.0
    for i, (start, per_step) in enumerate(zip(phases, seconds)):
        end = phases[i + 1] if i + 1 < len(phases) else math.inf
        affordable = max(0.0, left - spent) / per_step
        if affordable < end - start:
            steps = start + int(affordable)
            break
        steps, spent = end, spent + (end - start) * per_step
    steps = max(1, steps)
    speed = ", ".join(f"{config.batch_size / s:.0f} img/s from step {p}" for p, s in zip(phases, seconds))
    if dist_.main:
        print(f"encdiff: time budget {format_duration(config.time_budget)}: {speed} -> {steps} steps "
              f"({count(steps * config.batch_size, 'image')})", file=sys.stderr)
    run.reconfigure(steps=steps)


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
