"""Shared helpers for the network and model-folder tests.

Our initialisation zeroes the last layer of every residual branch and the U-Net's output conv, so
comparisons made with freshly built models would be trivially true: tests that compare two models
(or two code paths of one model) first randomise every parameter with `randomize_`.
"""

from __future__ import annotations

import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encdiff import AutoencoderConfig, UNetConfig
from encdiff.precision import inference_precision

# Golden numbers and equivalences are float32's and eager: a developer's ENCDIFF_PRECISION or ENCDIFF_COMPILE must not
# change them (the precision and compilation tests set them themselves); subprocesses inherit these.
os.environ["ENCDIFF_PRECISION"] = "float32"
os.environ.pop("ENCDIFF_COMPILE", None)


@pytest.fixture(autouse=True)
def process_settings(monkeypatch):
    """`encdiff --precision/--compile` set these variables for the process (and what it starts): a test that calls
    `main` in-process must not leave them to every later test. Left behind once, ENCDIFF_COMPILE=1 made every later
    CLI test compile its networks and CI took 27 minutes instead of 11."""
    monkeypatch.setenv("ENCDIFF_PRECISION", "float32")
    monkeypatch.delenv("ENCDIFF_COMPILE", raising=False)
    yield
    inference_precision.cache_clear()  # a choice cached under another setting goes with it


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter of `module` with seeded noise (biases and norm weights around 0.1,
    matrices scaled by 1/sqrt(fan-in) so activations stay O(1)); deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.5 / fan_in**0.5 + (0.1 if p.ndim == 1 else 0.0))
    return module


def count_forward_calls(*modules: torch.nn.Module) -> list:
    """A list that grows by one each time one of `modules` runs its forward (hooks are not called when
    checkpointing recomputes a block, so the forward itself is wrapped)."""
    calls = []
    for module in modules:
        def forward(*args, _forward=module.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        module.forward = forward
    return calls


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, shapes, dtypes and bit-identical values."""
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# Small configs: a few thousand to a few hundred thousand parameters, fast on two CPU cores.
TINY_UNET = UNetConfig(block_out_channels=(8, 16), attention_levels=(False, True), layers_per_block=1,
                       norm_num_groups=4, sample_size=16)
# Class-conditional with a null class, scale-shift conditioning and two attention heads per level.
TINY_UNET_CLASSES = UNetConfig(block_out_channels=(8, 16), attention_levels=(True, True), layers_per_block=1,
                               norm_num_groups=4, attention_head_dim=8, scale_shift=True, num_classes=5,
                               flip_sin_to_cos=True, freq_shift=0.0, sample_size=16)
# Three levels: 32x32x3 images -> 8x8x4 latents.
TINY_AE = AutoencoderConfig(block_out_channels=(8, 16, 16), attention_levels=(False, False, True),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.5,
                            shift_factor=(0.1, -0.2, 0.3, 0.0), sample_size=32)


@pytest.fixture
def randomize():
    """The seeded `randomize_(module, seed)` helper."""
    return randomize_


@pytest.fixture
def seeded():
    """A factory of seeded CPU generators: `seeded(3)`."""
    return lambda seed: torch.Generator().manual_seed(seed)


# The CIFAR-10 copy beside the project (../shared/data, see its README); tests using it skip without it.
CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
_cifar_present = pytest.mark.skipif(not CIFAR.is_file(), reason=f"the CIFAR-10 copy is absent ({CIFAR})")


EMOJI = CIFAR.parent / "emoji64.tar.gz"  # 64x64 RGBA PNGs in 9 unbalanced classes (../shared/data/README.md)
needs_emoji = pytest.mark.skipif(not EMOJI.is_file(), reason=f"the emoji64 copy is absent ({EMOJI})")


def extract_emoji(target: Path, n: int, seed: int = 0) -> list[Path]:
    """A seeded random subset of n emoji64 files into target/<class>/<file> (the archive is ordered by class)."""
    with tarfile.open(EMOJI) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".png")]
        chosen = sorted(random.Random(seed).sample(members, n), key=lambda m: m.offset)
        paths = []
        for member in chosen:
            *_, name, filename = member.name.split("/")
            (target / name).mkdir(parents=True, exist_ok=True)
            (target / name / filename).write_bytes(archive.extractfile(member).read())
            paths.append(target / name / filename)
    return paths


def needs_cifar(test):
    """Real CIFAR-10 images (skipped without the copy); such tests learn or measure, so they are `slow` too."""
    return pytest.mark.slow(_cifar_present(test))


def extract_cifar_subset(target: Path, n: int, split: str = "train", seed: int = 0) -> list[tuple[str, str]]:
    """Extract a seeded random subset of n images of a split into target/<class>/<file>; returns
    (class, file) pairs. Seeded and spread over the classes: the archive is ordered by class."""
    with tarfile.open(CIFAR) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(f"{split}/")]
        chosen = sorted(random.Random(seed).sample(members, n), key=lambda m: m.offset)
        for member in chosen:
            _, name, filename = member.name.split("/")
            (target / name).mkdir(parents=True, exist_ok=True)
            (target / name / filename).write_bytes(archive.extractfile(member).read())
    return [tuple(m.name.split("/")[1:]) for m in chosen]


COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def colour_classes(root: Path, classes: int = 3, per_class: int = 8, size: int = 16, spread: float = 30) -> Path:
    """A class-per-colour image folder (class0, class1, ...): noisy solid colours a tiny model can learn."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(COLOURS[:classes]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, spread, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_encdiff(args: list[str], processes: int = 1, port: int = 29800, timeout: float = 300):
    """`python -m encdiff ARGS`, or under torchrun with `processes` gloo processes (on `port` + a per-process offset,
    so parallel test runs do not collide); asserts success and returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--master-port",
                 str(port + os.getpid() % 150)] if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, "-m", "encdiff", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
