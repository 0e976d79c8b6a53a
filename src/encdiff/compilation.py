"""torch.compile for inference: whether it is asked for, and the one way a network is compiled for sampling.

Compiling fuses what eager mode runs as separate kernels (bf16 casts, GroupNorm, SiLU, the residual additions), which
is most of a small latent U-Net's time on a CPU: BENCHMARKS.md ("The fast path on a CPU with native bf16, and
compiled sampling") measures 1.9x diffusers' float32 per evaluation in bf16 compiled, against 1.15x eager. A graph is
compiled once per input shape (`dynamic=False`: a fixed batch, as `eval`, `sample` and a server's requests of one
size use, gets static kernels) and cached for the process's lifetime; TorchInductor's on-disk cache makes a later
process compile the same shapes in seconds instead of minutes. Off unless asked for (`encdiff --compile`,
`ENCDIFF_COMPILE=1`, `Generator(..., compile=True)`): the first call at a new shape costs far more than a short run
saves.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch

from .errors import EncdiffError

ENV = "ENCDIFF_COMPILE"
ON, OFF = ("1", "true", "on", "yes"), ("", "0", "false", "off", "no")
COMPILERS = ("g++", "c++", "clang++")  # what TorchInductor's CPU backend can build its kernels with


def compile_requested() -> bool:
    """Whether ENCDIFF_COMPILE asks for compiled sampling (unset: no)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ON + OFF:
        raise EncdiffError(f"{ENV} = {os.environ[ENV]!r}: expected 1 or 0 (on or off)")
    return value in ON


def check_compiler(device: torch.device | str) -> None:
    """TorchInductor writes C++ for the CPU: without a compiler the first sampling call would fail deep inside it."""
    if torch.device(device).type == "cpu" and not any(shutil.which(cc) for cc in COMPILERS):
        raise EncdiffError("compiled sampling (--compile, ENCDIFF_COMPILE) needs a C++ compiler on a CPU "
                           "(g++ or clang++ on the PATH): install one, or sample without compiling")


def compiled(fn: Callable) -> Callable:
    """`fn` (a module or a method) compiled for inference: static shapes, one graph per input shape."""
    return torch.compile(fn, dynamic=False)
