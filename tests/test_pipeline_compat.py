"""End to end with real networks: diffusers folders loaded by encdiff and sampled through the
Denoiser + sampler path give the images diffusers' own loop gives (latent diffusion: U-Net, DDIM, VAE)."""

import math

import pytest
import torch

from conftest import randomize_
from encdiff import Autoencoder, UNet, VPDenoiser, get_alpha_bars, get_sigmas
from encdiff.samplers import noise, sample_ddim, sample_dpmpp_2m

diffusers = pytest.importorskip("diffusers")

LATENT_SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A class-conditional diffusers UNet2DModel on 8x8x4 latents and an AutoencoderKL, saved by diffusers."""
    root = tmp_path_factory.mktemp("pipeline")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="scale_shift", num_class_embeds=3)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, latent_channels=4, scaling_factor=0.7,
        shift_factor=0.1)
    randomize_(unet, seed=1)
    randomize_(vae, seed=2)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    return root, unet.eval(), vae.eval()


def diffusers_images(unet, vae, scheduler, steps, labels, seed):
    """diffusers' latent-diffusion loop: initial VP noise, scheduler steps, unscale latents, decode."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn(LATENT_SHAPE, generator=g) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_output = unet(scheduler.scale_model_input(latents, t), t, labels).sample
            latents = scheduler.step(model_output, t, latents).prev_sample
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z).sample


def encdiff_images(root, sampler, sigmas_fn, steps, labels, seed):
    unet = UNet.from_pretrained(root / "unet")
    vae = Autoencoder.from_pretrained(root / "vae")
    denoiser = VPDenoiser(unet, get_alpha_bars("linear"), prediction="epsilon")
    sigmas = sigmas_fn(denoiser, steps)
    # diffusers starts these VP samplers from x_T ~ N(0, I); in sigma space that is x = x_T * sqrt(1 + sigma^2).
    x = noise(LATENT_SHAPE, torch.Generator().manual_seed(seed)) * math.sqrt(1 + sigmas[0].item() ** 2)
    with torch.no_grad():
        latents = sampler(denoiser, x, sigmas, class_labels=labels)
        return vae.decode(latents)


@pytest.mark.parametrize("steps", [5, 12])
def test_ddim_latent_pipeline_matches_diffusers(folders, steps):
    root, unet, vae = folders
    labels = torch.tensor([0, 2])
    theirs = diffusers_images(unet, vae, diffusers.DDIMScheduler(clip_sample=False), steps, labels, seed=5)
    ours = encdiff_images(root, sample_ddim, lambda d, n: get_sigmas("leading", n, d), steps, labels, seed=5)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_dpmpp_2m_latent_pipeline_matches_diffusers(folders):
    root, unet, vae = folders
    labels = torch.tensor([1, 1])
    theirs = diffusers_images(unet, vae, diffusers.DPMSolverMultistepScheduler(), 10, labels, seed=6)

    def dpm_solver_grid(denoiser, n):  # DPM-Solver's own linspace: n + 1 rounded timesteps over [T-1, 0], minus 0
        timesteps = torch.linspace(999, 0, n + 1, dtype=torch.float64).round()[:-1]
        return torch.cat([denoiser.t_to_sigma(timesteps), torch.zeros(1, dtype=torch.float64)])

    ours = encdiff_images(root, sample_dpmpp_2m, dpm_solver_grid, 10, labels, seed=6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
