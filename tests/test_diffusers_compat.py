"""Weight and output compatibility with diffusers' UNet2DModel and AutoencoderKL, in both directions:
(a) a folder written by diffusers' `save_pretrained` loads with our `from_pretrained` and computes the
same function; (b) our `save_pretrained(..., diffusers=True)` loads with diffusers' `from_pretrained`
and computes the same function. Every parameter is randomised first (our init zeroes the last layer of
each residual branch, which would make the comparisons trivial). Tolerance: 1e-5 max abs in float32.

Each case is written as diffusers' own constructor arguments, the form its config.json takes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DModel  # noqa: E402

from conftest import max_abs_diff, randomize_  # noqa: E402
from encdiff import Autoencoder, UNet, presets  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

TOL = 1e-5

UNET_CASES = {
    # google/ddpm-cifar10-32
    "ddpm_cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
        attention_head_dim=None),
    # ADM-style: scale-shift conditioning, class embeddings, several heads, its own embedding width.
    "scale_shift_classes_multihead": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1, attention_head_dim=16, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        num_class_embeds=6, time_embedding_dim=48),
    # Scale-shift with a normalised mid-block attention (attn_norm_num_groups set).
    "scale_shift_attn_norm": dict(
        sample_size=8, block_out_channels=[16, 32], down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"], layers_per_block=1, attention_head_dim=8,
        norm_num_groups=8, attn_norm_num_groups=8, resnet_time_scale_shift="scale_shift"),
    "no_mid_attention": dict(
        sample_size=16, block_out_channels=[16, 32, 32],
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], layers_per_block=2, add_attention=False,
        norm_num_groups=8, attention_head_dim=None, dropout=0.1, norm_eps=1e-6, flip_sin_to_cos=False,
        freq_shift=1, downsample_padding=0),
    "padding1_flip_shift0": dict(
        sample_size=16, in_channels=1, out_channels=2, block_out_channels=[16, 32],
        down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
        layers_per_block=1, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, attention_head_dim=8,
        norm_num_groups=8),
}

AE_CASES = {
    # Stable Diffusion's VAE shape (run at 32x32).
    "sd": dict(
        in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    "attention_blocks": dict(
        block_out_channels=[16, 32], down_block_types=["AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D"], layers_per_block=1, latent_channels=3,
        norm_num_groups=8, scaling_factor=0.5),
    "no_quant_convs_no_mid_attention": dict(
        in_channels=1, out_channels=2, block_out_channels=[16, 32, 32],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"], layers_per_block=2,
        latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, scaling_factor=1.0),
    # Flux-style scalar shift.
    "shift_factor": dict(
        block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=8, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159),
    # SDXL-pipeline-style per-channel statistics.
    "latents_mean": dict(
        block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        scaling_factor=0.7, latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[0.5] * 4),
}

# The heavy shapes run at batch 1.
UNET_BATCH = {"ddpm_cifar10": 1}
AE_INPUT = {"sd": (1, 32)}  # batch, size


def unet_inputs(kwargs: dict, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = kwargs.get("sample_size") or 32
    x = torch.randn(batch, kwargs.get("in_channels", 3), size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    classes = kwargs.get("num_class_embeds")
    labels = torch.randint(0, classes, (batch,), generator=g) if classes else None
    return x, t, labels


def ae_inputs(kwargs: dict, name: str, seed: int = 0) -> torch.Tensor:
    batch, size = AE_INPUT.get(name, (2, 16))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, kwargs.get("in_channels", 3), size, size, generator=g) * 2 - 1


def assert_unets_match(ours: UNet, theirs: UNet2DModel, kwargs: dict, batch: int) -> None:
    x, t, labels = unet_inputs(kwargs, batch)
    with torch.no_grad():
        a = ours(x, t, labels)
        b = theirs(x, t, class_labels=labels).sample
    assert b.abs().max() > 0.1  # a non-trivial function
    assert max_abs_diff(a, b) < TOL


def diffusers_normalize(config, z: torch.Tensor) -> torch.Tensor:
    """What diffusers' pipelines do to the VAE's raw latents (outside the model)."""
    if config.latents_mean is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        return (z - mean) * config.scaling_factor / std
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def diffusers_denormalize(config, latents: torch.Tensor) -> torch.Tensor:
    if config.latents_mean is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def assert_autoencoders_match(ours: Autoencoder, theirs: AutoencoderKL, x: torch.Tensor) -> None:
    with torch.no_grad():
        posterior = ours.posterior(x)
        their_posterior = theirs.encode(x).latent_dist
        assert max_abs_diff(posterior.mean, their_posterior.mean) < TOL
        assert max_abs_diff(posterior.logvar, their_posterior.logvar) < TOL
        assert their_posterior.mean.abs().max() > 0.1

        z = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
        decoded = theirs.decode(z).sample
        assert max_abs_diff(ours.decode_raw(z), decoded) < TOL
        assert decoded.abs().max() > 0.1

        # The latent normalisation, which diffusers leaves to its pipelines: on the encoder's latents, and
        # decoding the unit-variance latents a sampler produces.
        assert max_abs_diff(ours.encode(x), diffusers_normalize(theirs.config, their_posterior.mean)) < TOL
        latents = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(2))
        assert max_abs_diff(ours.decode(latents),
                            theirs.decode(diffusers_denormalize(theirs.config, latents)).sample) < TOL


def assert_config_reproduced(theirs_config, kwargs: dict) -> None:
    """Every field of the original diffusers config survives our export."""
    for key, value in kwargs.items():
        got = theirs_config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key


# ---------------------------------------------------------------------------------------------------------
# U-Net


@pytest.mark.parametrize("name", sorted(UNET_CASES))
def test_unet_loads_diffusers_folder_and_matches(tmp_path, name):
    kwargs = UNET_CASES[name]
    theirs = randomize_(UNet2DModel(**kwargs).eval(), 0)
    theirs.save_pretrained(tmp_path)
    ours = UNet.from_pretrained(tmp_path)
    assert_unets_match(ours, theirs, kwargs, UNET_BATCH.get(name, 2))


@pytest.mark.parametrize("name", sorted(UNET_CASES))
def test_unet_saved_in_diffusers_format_loads_in_diffusers_and_matches(tmp_path, name):
    kwargs = UNET_CASES[name]
    ours = randomize_(UNet(UNet.config_from_diffusers(kwargs)).eval(), 1)
    ours.save_pretrained(tmp_path, diffusers=True)
    theirs = UNet2DModel.from_pretrained(tmp_path).eval()
    assert_config_reproduced(theirs.config, kwargs)
    assert_unets_match(ours, theirs, kwargs, UNET_BATCH.get(name, 2))


def test_null_class_model_exported_to_diffusers_uses_the_last_row_as_null(tmp_path):
    kwargs = UNET_CASES["scale_shift_classes_multihead"]
    config = UNet.config_from_diffusers({**kwargs, "num_class_embeds": 5, "_encdiff_null_class": True})
    assert config.num_classes == 4 and config.null_class
    ours = randomize_(UNet(config).eval(), 2)
    ours.save_pretrained(tmp_path, diffusers=True)
    theirs = UNet2DModel.from_pretrained(tmp_path).eval()
    assert theirs.config.num_class_embeds == 5
    x, t, _ = unet_inputs(kwargs, 2)
    with torch.no_grad():
        unconditional = ours(x, t)
        assert max_abs_diff(unconditional, theirs(x, t, class_labels=torch.tensor([4, 4])).sample) < TOL
        labels = torch.tensor([0, 3])
        assert max_abs_diff(ours(x, t, labels), theirs(x, t, class_labels=labels).sample) < TOL


def test_ddpm_cifar10_preset_is_diffusers_ddpm_cifar10_with_35_7m_parameters():
    kwargs = UNET_CASES["ddpm_cifar10"]
    converted = UNet.config_from_diffusers(kwargs)
    # null_class is meaningless without classes (its round trip is covered in test_checkpoint.py).
    assert dataclasses.replace(converted, null_class=True) == presets.UNETS["ddpm_cifar10"]
    with torch.device("meta"):
        ours, theirs = UNet(presets.UNETS["ddpm_cifar10"]), UNet2DModel(**kwargs)
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e5) == 357
    assert n == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Autoencoder


@pytest.mark.parametrize("name", sorted(AE_CASES))
def test_autoencoder_loads_diffusers_folder_and_matches(tmp_path, name):
    kwargs = AE_CASES[name]
    theirs = randomize_(AutoencoderKL(**kwargs).eval(), 0)
    theirs.save_pretrained(tmp_path)
    ours = Autoencoder.from_pretrained(tmp_path)
    assert_autoencoders_match(ours, theirs, ae_inputs(kwargs, name))


@pytest.mark.parametrize("name", sorted(AE_CASES))
def test_autoencoder_saved_in_diffusers_format_loads_in_diffusers_and_matches(tmp_path, name):
    kwargs = AE_CASES[name]
    ours = randomize_(Autoencoder(Autoencoder.config_from_diffusers(kwargs)).eval(), 1)
    ours.save_pretrained(tmp_path, diffusers=True)
    theirs = AutoencoderKL.from_pretrained(tmp_path).eval()
    assert_autoencoders_match(ours, theirs, ae_inputs(kwargs, name))


def test_sd_preset_is_the_stable_diffusion_vae_shape():
    kwargs = AE_CASES["sd"]
    assert Autoencoder.config_from_diffusers(kwargs) == presets.AUTOENCODERS["sd"]
    with torch.device("meta"):
        ours, theirs = Autoencoder(presets.AUTOENCODERS["sd"]), AutoencoderKL(**kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6) == 84
