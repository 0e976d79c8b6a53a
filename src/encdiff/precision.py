"""The precision inference runs in on this machine: bf16 autocast where the CPU computes it natively and a short
probe measures it faster, float32 elsewhere.

bf16 autocast ran convolutions 1.6-1.9x faster on CPUs with native bf16 (avx512_bf16, amx_bf16) and about 10x slower
on one without, so the choice follows the machine. Only the networks' matrix products and convolutions run in bf16:
weights stay float32, and the sampler's state, its sigma grid and the preconditioning stay in their own precision
(Denoiser casts in and out). `ENCDIFF_PRECISION` = float32 | bf16 | auto forces a choice; the default is auto: the
bundled generator's FID at 10,000 samples is the same in bf16 as in float32 (7.27 against 7.29, BENCHMARKS.md), so the
faster arithmetic costs nothing measurable where the CPU has it. A GPU runs float32 unless bf16 is forced.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

import torch

from .errors import EncdiffError

PRECISIONS = ("float32", "bf16", "auto")
DEFAULT = "auto"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_SPEEDUP = 1.2  # bf16 must be at least this much faster in the probe to be chosen


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere unknown, no flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", frozenset()
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def native_bf16(flags: frozenset[str]) -> bool:
    return any(flag in flags for flag in BF16_FLAGS)


def probe_speedup(repeats: int = 3) -> float:
    """float32 time / bf16-autocast time of a small stack of convolutions shaped like a latent U-Net's (a fixed,
    seeded input; the best of `repeats`)."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(128, 128, 3, padding=1) for _ in range(4)]).eval()
    x = torch.randn(64, 128, 16, 16, generator=g)

    def best(enabled: bool) -> float:
        times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            net(x)  # warm-up: kernel selection, allocation
            for _ in range(repeats):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(False) / best(True)


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "encdiff" / "precision.json"


def probe_key(model: str) -> str:
    """What the probe's answer depends on: the CPU, torch, and the instruction sets this process may use (ATen's
    vector kernels and oneDNN's, which ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower: without AVX-512 bf16
    autocast measured 40x slower on the same CPU), so a limited process never reuses an unlimited one's choice."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "all"
    return f"{model} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | oneDNN {isa}"


def auto_choice() -> str:
    """bf16 where the CPU has native bf16 and the probe measures it faster, cached under `probe_key`."""
    model, flags = cpu_info()
    if not native_bf16(flags):
        return "float32"
    key = probe_key(model)
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        speedup = probe_speedup()
        cached[key] = {"speedup": round(speedup, 3), "choice": "bf16" if speedup >= PROBE_SPEEDUP else "float32"}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=2) + "\n")
        except OSError:  # an unwritable cache only means the probe runs again next time
            pass
    return cached[key]["choice"]


@functools.lru_cache(maxsize=None)
def inference_precision(device_type: str = "cpu", requested: str | None = None) -> str:
    """"float32" or "bf16" for inference on `device_type`: `requested`, else ENCDIFF_PRECISION, else the default;
    "auto" decides from the CPU, and keeps float32 on a GPU; a forced bf16 applies on a GPU too (refused on one
    without bf16, rather than ignored)."""
    choice = requested or os.environ.get("ENCDIFF_PRECISION") or DEFAULT
    if choice not in PRECISIONS:
        raise EncdiffError(f"ENCDIFF_PRECISION = {choice!r}: expected one of {', '.join(PRECISIONS)}")
    if device_type == "cpu":
        return auto_choice() if choice == "auto" else choice
    if choice == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EncdiffError(f"precision bf16: this GPU ({torch.cuda.get_device_name()}) does not compute bf16; use "
                           "float32 or auto")
    return "bf16" if choice == "bf16" else "float32"


def autocast(device: torch.device | str, requested: str | None = None):
    """The context inference runs its networks in."""
    device_type = torch.device(device).type
    if inference_precision(device_type, requested) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
