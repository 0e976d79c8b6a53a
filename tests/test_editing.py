"""Editing real images: img2img step counts and its strength-0 round trip, inpainting that keeps every unmasked
pixel, RePaint's cost, ODE inversion on the bundled model, slerp's norm, and the CLI's bad-input errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import count_forward_calls, extract_cifar_subset, needs_cifar, randomize_
from encdiff import Autoencoder, EncdiffError, UNet
from encdiff import editing
from encdiff.pipeline import DenoiserSpec, Generator, Sampling
from encdiff.presets import AUTOENCODERS, UNETS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_generator(latent: bool = True) -> Generator:
    """A class-conditional generator with random weights: 16x16 RGB images, 8x8x4 latents (or pixels)."""
    channels = 4 if latent else 3
    unet = UNet(dataclasses.replace(UNETS["tiny"], in_channels=channels, out_channels=channels,
                                    sample_size=8 if latent else 16, num_classes=3, null_class=True))
    randomize_(unet, seed=1)
    autoencoder = randomize_(Autoencoder(AUTOENCODERS["tiny"]), seed=2) if latent else None
    return Generator(unet, DenoiserSpec(kind="edm", sigma_data=1.0), autoencoder, ["a", "b", "c"])


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("strength, evaluations", [(0.0, 0), (0.25, 5), (0.5, 10), (1.0, 20)])
def test_img2img_runs_int_steps_times_strength_network_evaluations(strength, evaluations):
    generator = tiny_generator()
    calls = count_forward_calls(generator.unet)
    out = editing.img2img(generator, images(), [0, 1], torch.tensor([0, 1]), strength=strength, steps=20)
    assert len(calls) == evaluations and out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
    # guidance: still one (batched) network call per step
    calls.clear()
    editing.img2img(generator, images(), [0, 1], torch.tensor([0, 1]), strength=strength, steps=20, guidance_scale=2.0)
    assert len(calls) == evaluations


def test_img2img_strength_0_is_the_autoencoder_round_trip_bit_for_bit():
    generator = tiny_generator()
    x = images(3)
    expected = generator.decode(generator.autoencoder.encode(x.float() / 127.5 - 1))
    assert torch.equal(editing.img2img(generator, x, [0, 1, 2], strength=0.0), expected)


@pytest.mark.parametrize("sampler, guidance", [("dpmpp_2m", None), ("dpmpp_2m", 3.0), ("euler_ancestral", 2.0),
                                               ("ddpm", None)])
def test_img2img_strength_1_ignores_the_image_and_equals_generation_bit_for_bit(sampler, guidance):
    """Issue 25, defects 1 and 3: strength 1 starts from the seed's noise alone (not image + noise, which guidance
    amplified by up to 56 levels), and an ancestral sampler's fresh noise continues the seed's stream instead of
    drawing the starting noise a second time."""
    generator = tiny_generator()
    labels = torch.tensor([0, 1, 2])
    black, white = torch.zeros(3, 3, 16, 16, dtype=torch.uint8), torch.full((3, 3, 16, 16), 255, dtype=torch.uint8)
    settings = dict(sampler=sampler, steps=6, guidance_scale=guidance)
    from_noise = generator.images([4, 5, 6], labels, **settings)
    for x in (black, white, images(3)):
        assert torch.equal(editing.img2img(generator, x, [4, 5, 6], labels, strength=1.0, **settings), from_noise)


def test_img2img_draws_no_noise_twice():
    """Defect 3: at strength < 1, the ancestral step's fresh noise is the stream's next draw, not its first again."""
    generator = tiny_generator()
    x = images(1)
    z0 = generator.encode(x)
    seen = []
    editing.img2img(generator, x, [7], strength=0.5, sampler="euler_ancestral", steps=4,
                    callback=lambda i, sigma, state, denoised: seen.append(state.clone()))
    g = torch.Generator().manual_seed(7)
    first, second = torch.randn(z0.shape, generator=g), torch.randn(z0.shape, generator=g)
    # Replay the first step by hand with the second draw as its fresh noise.
    from encdiff.samplers import ancestral_step

    sigmas = generator.sampling.but(steps=4).grid(generator.denoiser)[2:].tolist()
    start = z0 + sigmas[0] * first
    denoised = generator.denoiser(start, sigmas[0], None)
    down, up = ancestral_step(sigmas[0], sigmas[1])
    expected = denoised + down * (start - denoised) / sigmas[0] + up * second
    assert torch.allclose(seen[0], expected, atol=1e-5)


def consistency_generator() -> Generator:
    """A tiny consistency "student" whose sampling stores explicit noise levels, as the bundled one does."""
    teacher = tiny_generator()
    spec = dataclasses.replace(teacher.spec, kind="consistency")
    sampling = Sampling(sampler="consistency", steps=2, schedule="consistency", sigmas=(80.0, 3.2))
    return Generator(teacher.unet, spec, teacher.autoencoder, teacher.class_names, sampling)


def test_editing_walks_the_generators_stored_noise_levels():
    """Defect 2: img2img and inpainting run the generator's own levels (80, 3.2), not the schedule's (80, 2.515)."""
    student = consistency_generator()
    visited = []
    record = lambda i, sigma, x, denoised: visited.append(round(float(sigma), 6))
    editing.img2img(student, images(1), [0], strength=0.5, callback=record)
    assert visited == [3.2]
    visited.clear()
    editing.img2img(student, images(1), [0], strength=1.0, callback=record)
    assert visited == [80.0, 3.2]
    assert torch.equal(editing.img2img(student, images(1), [3], torch.tensor([1]), strength=1.0),
                       student.images([3], torch.tensor([1])))
    visited.clear()
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    editing.inpaint(student, images(1), mask, [0], callback=record)
    assert visited == [80.0, 3.2]


def test_interpolating_two_seeds_starts_and_ends_at_what_they_generate():
    """Defect 4: the ends of `interpolate --seeds A B` are the images `sample --seed A` and `--seed B` make, with
    the generator's own sampling (guidance included); a sampler that draws fresh noise is refused."""
    generator = tiny_generator()
    label = torch.tensor([2])
    generator.sampling = generator.sampling.but(steps=5, guidance_scale=2.0)
    strip = editing.interpolate_seeds(generator, (11, 12), 4, label)
    assert strip.shape == (4, 3, 16, 16)
    assert torch.equal(strip[0], generator.images([11], label)[0])
    assert torch.equal(strip[-1], generator.images([12], label)[0])
    assert not torch.equal(strip[1], strip[0]) and not torch.equal(strip[1], strip[-1])
    with pytest.raises(EncdiffError, match="draws fresh noise"):
        editing.interpolate_seeds(generator, (11, 12), 4, label, sampler="euler_ancestral")
    student = consistency_generator()
    with pytest.raises(EncdiffError, match="consistency student at 1 step"):
        editing.interpolate_seeds(student, (1, 2), 3)
    one_step = editing.interpolate_seeds(student, (1, 2), 3, steps=1)
    assert torch.equal(one_step[0], student.images([1], steps=1)[0])


def test_img2img_depends_on_each_images_seed_only():
    generator = tiny_generator()
    x = images(2)
    both = editing.img2img(generator, x, [7, 8], torch.tensor([1, 2]), strength=0.6, steps=10)
    second = editing.img2img(generator, x[1:], [8], torch.tensor([2]), strength=0.6, steps=10)
    assert torch.equal(both[1], second[0])
    assert not torch.equal(both, editing.img2img(generator, x, [9, 10], torch.tensor([1, 2]), strength=0.6, steps=10))


@pytest.mark.parametrize("latent", [True, False])
def test_inpainting_keeps_every_unmasked_pixel_exactly(latent):
    generator = tiny_generator(latent)
    x = images(2)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1
    for guidance in (None, 2.0):  # guided too: the known region is replaced around the guided denoiser
        out = editing.inpaint(generator, x, mask, [0, 1], torch.tensor([0, 2]), steps=6, guidance_scale=guidance)
        keep = (mask == 0).expand_as(x)
        assert torch.equal(out[keep], x[keep])
        assert not torch.equal(out[~keep], x[~keep])  # the hole is repainted


def test_repaint_resampling_costs_steps_times_resample_evaluations():
    generator = tiny_generator()
    calls = count_forward_calls(generator.unet)
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    x = images(1)
    out = editing.inpaint(generator, x, mask, [3], sampler="euler", steps=5, resample=3)
    assert len(calls) == 15
    assert torch.equal(out[..., 8:, :], x[..., 8:, :])
    with pytest.raises(EncdiffError, match="one-step sampler"):
        editing.inpaint(generator, x, mask, [3], sampler="dpmpp_2m", steps=5, resample=2)


def test_bad_editing_input_is_refused_naming_what_is_wrong():
    generator = tiny_generator()
    x = images(1)
    with pytest.raises(EncdiffError, match="strength = 1.5"):
        editing.img2img(generator, x, [0], strength=1.5)
    with pytest.raises(EncdiffError, match=r"3 x 16 x 16"):
        editing.img2img(generator, images(1, size=32), [0], strength=0.5)
    with pytest.raises(EncdiffError, match="mask of shape"):
        editing.inpaint(generator, x, torch.zeros(8, 8), [0])
    with pytest.raises(EncdiffError, match="binary mask"):
        editing.inpaint(generator, x, torch.full((16, 16), 0.5), [0])
    with pytest.raises(EncdiffError, match="2 seeds for 1 image:"):
        editing.img2img(generator, x, [0, 1], strength=0.5)
    with pytest.raises(EncdiffError, match="euler, ddim, heun"):
        editing.invert(generator, x, sampler="dpmpp_2m")


def test_slerp_keeps_the_norm_of_gaussian_noise_within_one_percent():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, 8, 8, generator=g), torch.randn(1, 8, 8, 8, generator=g)
    path = editing.interpolate_noise(a, b, 9)
    norms = path.flatten(1).norm(dim=1)
    assert torch.equal(path[0], a) or torch.allclose(path[0], a, atol=1e-6)
    assert torch.allclose(path[-1], b, atol=1e-6)
    assert ((norms / a.norm()) - 1).abs().max() < 0.01 + abs(b.norm() / a.norm() - 1)
    # a straight line would lose ~30 % of the norm in the middle of two independent noises
    assert (a + b).norm() / 2 < 0.8 * a.norm() and (norms[4] / a.norm() - 1).abs() < 0.01 + abs(b.norm() / a.norm() - 1)


@needs_cifar
def test_inversion_round_trip_on_the_bundled_model(tmp_path):
    """50 Euler steps up and down, unguided: the latents come back within 1e-3 of their variance."""
    generator = Generator.bundled()
    extract_cifar_subset(tmp_path / "cifar", 4, seed=3, split="test")
    from encdiff.data import ImageDataset

    data = ImageDataset(tmp_path / "cifar", 32, workers=0, progress=False)
    x, labels = data.batch(torch.arange(len(data)))
    pixels = ((x + 1) * 127.5).round().to(torch.uint8)
    labels = torch.tensor([generator.class_names.index(data.class_names[i]) for i in labels])
    noise = editing.invert(generator, pixels, labels, sampler="euler", steps=50)
    latents = editing.regenerate_latents(generator, noise, labels, sampler="euler", steps=50)
    z0 = generator.encode(pixels)
    assert ((latents - z0).square().mean() / z0.var()).item() <= 1e-3
    assert 0.8 < (noise / generator.denoiser.sigma_max).std().item() < 1.2  # it is noise-like


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "encdiff", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def edit_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edit")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:16, :16]).save(root / "small-mask.png")
    Image.fromarray((mask // 2).astype(np.uint8) + 10).save(root / "grey-mask.png")
    (root / "text.png").write_text("not an image")
    return root


def test_cli_edits_write_their_pngs(edit_files, tmp_path):
    result = cli("edit", "img2img", str(edit_files / "image.png"), "--class", "cat", "--strength", "0.3", "--out",
                 str(tmp_path / "a.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 of 20 steps" in result.stdout and Image.open(tmp_path / "a.png").size == (64, 32)
    result = cli("edit", "inpaint", str(edit_files / "image.png"), "--mask", str(edit_files / "mask.png"), "--steps",
                 "4", "--sampler", "euler", "--resample", "2", "--out", str(tmp_path / "b.png"), cwd=tmp_path)
    assert result.returncode == 0 and "RePaint: 4 steps x 2 resamplings" in result.stdout, result.stderr
    strip = np.asarray(Image.open(tmp_path / "b.png"))
    original, repainted = strip[:, :32], strip[:, 64:]
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert (original[outside] == repainted[outside]).all()
    result = cli("edit", "interpolate", "--seeds", "1", "2", "--frames", "3", "--steps", "4", "--out",
                 str(tmp_path / "c.png"), "--gif", str(tmp_path / "c.gif"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "c.png").size == (96, 32) and Image.open(tmp_path / "c.gif").n_frames == 4


@pytest.mark.parametrize("args, message", [
    (["img2img", "{d}/image.png", "--strength", "1.5"], "strength = 1.5"),
    (["img2img", "{d}/image.png", "--strength", "nan"], "not a finite number"),
    (["img2img", "{d}/image.png", "--class", "zebra"], "unknown class 'zebra'"),
    (["img2img", "{d}/text.png"], "not an image"),
    (["img2img", "{d}/missing.png"], "missing.png"),
    (["img2img", "{d}/image.png", "--out", "result.jpg"], "ending in .png"),
    (["img2img", "{d}/image.png", "--guidance", "2"], "--guidance needs --class"),
    (["inpaint", "{d}/image.png", "--mask", "{d}/small-mask.png"], "16x16 pixels"),
    (["inpaint", "{d}/image.png", "--mask", "{d}/grey-mask.png"], "binary mask"),
    (["inpaint", "{d}/image.png", "--mask", "{d}/mask.png", "--resample", "0"], "resample = 0"),
    (["invert", "{d}/image.png", "--sampler", "dpmpp_2m"], "--sampler dpmpp_2m"),
    (["interpolate"], "exactly one of --seeds"),
    (["interpolate", "--seeds", "1", "2", "--frames", "1"], "frames = 1"),
])
def test_cli_bad_input_exits_2_with_one_line(edit_files, tmp_path, args, message):
    result = cli("edit", *[a.format(d=edit_files) for a in args], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not list(tmp_path.glob("*.png"))
