"""The README's Python examples run as written (on a randomly initialised diffusers VAE folder)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_reconstruct_example_runs_on_a_diffusers_vae_folder(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "path/to/stable-diffusion/vae")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "Autoencoder.from_pretrained" in b)
    exec(compile(block, "README.md", "exec"), {})
    out = Image.open(tmp_path / "reconstruction.png")
    assert out.size == (256, 256) and out.mode == "RGB"
    assert (tmp_path / "my-vae" / "model.safetensors").is_file()


def test_generate_example_runs_on_a_diffusers_unet_folder(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=32, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)
    unet.save_pretrained(tmp_path / "path/to/ddpm-cifar10-32/unet")
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "generate(" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    images = scope["images"]
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
