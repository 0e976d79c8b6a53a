"""The generator shipped inside the package: size limits, `encdiff sample` with no model, and that it draws the
class it is asked for (judged by the shipped feature network, an independent classifier)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from encdiff.featurenet import FeatureNet
from encdiff.pipeline import Generator, bundled_path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_bundled_weights_are_half_precision_and_within_the_size_limits():
    files = sorted(bundled_path().rglob("*.safetensors"))
    # A generator folder may carry a light decoder (issue 22); the bundled ones do.
    assert {f.parent.name for f in files} == {"unet", "autoencoder", "light_decoder"}
    sizes = [f.stat().st_size for f in files]
    assert sum(sizes) <= 30 * 2**20 and max(sizes) <= 16 * 2**20, sizes
    for f in files:
        with safe_open(str(f), "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}, f
    generator = Generator.bundled()
    assert generator.class_names[:2] == ["airplane", "automobile"] and generator.num_classes == 10
    assert generator.image_size == 32 and generator.sampling.guidance_scale > 1


@pytest.mark.slow  # the bundled model's 100-image grid
def test_sample_without_a_model_writes_one_row_per_class_of_recognisable_images(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-m", "encdiff", "sample", "--out", "samples.png",
                             "--out-dir", str(tmp_path / "each")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grid = np.array(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (10 * 32, 10 * 32, 3)
    # Image i has class i % 10 and sits in row i % 10 (class-major grid, seed order within a row).
    tiles = torch.from_numpy(grid).permute(2, 0, 1).unfold(1, 32, 32).unfold(2, 32, 32)  # (3, row, col, 32, 32)
    each = sorted((tmp_path / "each").iterdir())
    assert len(each) == 100
    first = torch.from_numpy(np.array(Image.open(each[3]))).permute(2, 0, 1)
    assert torch.equal(tiles[:, 3, 0], first)
    # One owner of the sampling settings: the library, with no arguments but seeds and classes, makes the same images
    # as `encdiff sample` (the generator's own sampler, steps, guidance and decoder in both). Same batch, so the same
    # convolution kernels: a batch of another size may move a rare pixel by one level (float rounding).
    library = Generator.bundled().images(list(range(100)), torch.arange(100) % 10)
    assert torch.equal(library[3], first)
    images = tiles.permute(1, 2, 0, 3, 4).reshape(100, 3, 32, 32).float() / 127.5 - 1
    with torch.inference_mode():
        predicted = FeatureNet.load()(images).argmax(1).view(10, 10)
    accuracy = (predicted == torch.arange(10).view(10, 1)).float().mean().item()
    # Chance is 0.1; the shipped model scores 0.955 on 10k samples at these settings (BENCHMARKS.md).
    assert accuracy >= 0.5, predicted


@pytest.mark.slow  # the bundled model's 100-image grid
def test_the_bundled_student_samples_recognisable_classes_in_two_evaluations(tmp_path):
    """`encdiff sample --fast`: the shipped consistency student, guidance built in, 2 evaluations per image."""
    student = Generator.bundled(student=True)
    assert student.spec.kind == "consistency" and student.distillation["guidance_scale"] == 5.0
    assert student.sampling.steps == 2 and student.sampling.sigmas == (80.0, 3.2)
    teacher = Generator.bundled()
    for key, value in teacher.autoencoder.state_dict().items():  # the same decoder: the student changes the U-Net only
        assert torch.equal(student.autoencoder.state_dict()[key], value), key
    files = sorted(bundled_path(student=True).rglob("*.safetensors")) + sorted(bundled_path().rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-m", "encdiff", "sample", "--fast", "--out", "fast.png"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "fast.png"))).permute(2, 0, 1)
    tiles = grid.unfold(1, 32, 32).unfold(2, 32, 32).permute(1, 2, 0, 3, 4).reshape(100, 3, 32, 32)
    # Row 0 holds seeds 0, 10, ..., 90 of class 0; the library makes them in the CLI's batch of 100 (another batch size
    # may move a rare pixel by one level: float rounding).
    assert torch.equal(tiles[:10], student.images(list(range(100)), torch.arange(100) % 10)[0::10])
    with torch.inference_mode():
        predicted = FeatureNet.load()(tiles.float() / 127.5 - 1).argmax(1).view(10, 10)
    # 0.968 on 10k samples (BENCHMARKS.md); chance is 0.1.
    assert (predicted == torch.arange(10).view(10, 1)).float().mean().item() >= 0.5, predicted
