"""The KL autoencoder: shapes, the normalised latent interface, the diagonal Gaussian posterior, the
training pass, input validation, initialisation, checkpointing, memory format, dtype and config
validation; and the identity autoencoder of pixel-space diffusion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import count_forward_calls, TINY_AE, max_abs_diff, randomize_
from encdiff import Autoencoder, AutoencoderConfig, DiagonalGaussian, EncdiffError, IdentityAutoencoder, presets
from encdiff.layers import ResnetBlock, SelfAttention


def make_ae(config: AutoencoderConfig = TINY_AE, seed: int | None = 0) -> Autoencoder:
    ae = Autoencoder(config).eval()
    return ae if seed is None else randomize_(ae, seed)


def images(batch: int = 2, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g) * 2 - 1


def test_three_levels_map_32x32x3_images_to_8x8x4_latents_and_back():
    ae = make_ae()
    assert ae.downsample_factor == 4 and ae.latent_channels == 4
    x = images()
    with torch.no_grad():
        posterior = ae.posterior(x)
        latents = ae.encode(x)
        decoded = ae.decode(latents)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert latents.shape == (2, 4, 8, 8)
    assert decoded.shape == (2, 3, 32, 32)


def test_non_square_images_and_other_channel_counts():
    config = dataclasses.replace(TINY_AE, in_channels=1, out_channels=2, latent_channels=3, shift_factor=None)
    ae = make_ae(config)
    with torch.no_grad():
        latents = ae.encode(torch.randn(1, 1, 16, 40))
        assert latents.shape == (1, 3, 4, 10)
        assert ae.decode(latents).shape == (1, 2, 16, 40)


def test_encode_is_the_normalised_posterior_mean_and_deterministic():
    ae = make_ae()
    x = images()
    with torch.no_grad():
        mean = ae.posterior(x).mean
        latents = ae.encode(x)
        again = ae.encode(x)
    shift = torch.tensor(TINY_AE.shift_factor).view(1, -1, 1, 1)
    assert torch.equal(latents, again)
    assert max_abs_diff(latents, (mean - shift) * TINY_AE.scaling_factor) < 1e-6
    assert max_abs_diff(latents, mean) > 1e-2  # the normalisation is not a no-op here


def test_encode_without_shift_only_scales():
    config = dataclasses.replace(TINY_AE, shift_factor=None, scaling_factor=0.18215)
    ae = make_ae(config)
    x = images()
    with torch.no_grad():
        assert max_abs_diff(ae.encode(x), ae.posterior(x).mean * 0.18215) < 1e-6


def test_decode_undoes_the_normalisation():
    ae = make_ae()
    x = images()
    with torch.no_grad():
        via_latents = ae.decode(ae.encode(x))
        raw = ae.decode_raw(ae.posterior(x).mean)
        z = torch.randn(2, 4, 8, 8)
        assert max_abs_diff(ae.denormalize(ae.normalize(z)), z) < 1e-6
    assert max_abs_diff(via_latents, raw) < 1e-5


def test_posterior_samples_are_reproducible_per_generator_seed(seeded):
    ae = make_ae()
    with torch.no_grad():
        posterior = ae.posterior(images())
    a, b, c = posterior.sample(seeded(1)), posterior.sample(seeded(1)), posterior.sample(seeded(2))
    assert torch.equal(a, b)
    assert max_abs_diff(a, c) > 1e-3
    noise = torch.randn(posterior.mean.shape, generator=seeded(1))
    assert max_abs_diff(a, posterior.mean + torch.exp(0.5 * posterior.logvar) * noise) < 1e-6


def test_mode_is_the_mean():
    moments = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussian(moments)
    assert torch.equal(posterior.mode(), moments[:, :4])
    assert torch.equal(posterior.logvar, moments[:, 4:])


def test_kl_equals_the_closed_form_per_image():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    kl = posterior.kl()
    assert kl.shape == (3,)
    assert torch.allclose(kl, expected, rtol=1e-10, atol=1e-10)


def test_kl_of_the_standard_normal_is_zero():
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 4, 4)).kl(), torch.zeros(2))


def test_log_variance_is_clamped():
    moments = torch.zeros(1, 2, 1, 3)
    moments[0, 1, 0] = torch.tensor([100.0, -100.0, 1.5])
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0, 1.5]
    assert torch.isfinite(posterior.std).all() and torch.isfinite(posterior.kl()).all()


def test_training_forward_decodes_a_reproducible_posterior_sample(seeded):
    ae = make_ae()
    x = images()
    with torch.no_grad():
        recon, posterior = ae(x, seeded(5))
        again, _ = ae(x, seeded(5))
        other, _ = ae(x, seeded(6))
        expected = ae.decode_raw(ae.posterior(x).sample(seeded(5)))
        mode_recon, _ = ae(x, sample_posterior=False)
        mode_expected = ae.decode_raw(posterior.mean)
    assert isinstance(posterior, DiagonalGaussian)
    assert recon.shape == x.shape
    assert torch.equal(recon, again)
    assert max_abs_diff(recon, other) > 1e-4
    assert max_abs_diff(recon, expected) < 1e-6
    assert max_abs_diff(mode_recon, mode_expected) < 1e-6


def test_training_forward_gives_gradients_to_encoder_and_decoder(seeded):
    ae = make_ae()
    recon, posterior = ae(images(), seeded(0))
    (recon.square().mean() + posterior.kl().mean()).backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert ae.decoder.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 30, 32), (2, 3, 32, 34), (3, 32, 32)],
                         ids=["channels", "height", "width", "no-batch"])
def test_bad_image_shapes_are_refused_naming_the_shape(shape):
    ae = make_ae(seed=None)
    for call in (ae.encode, ae.posterior, ae):
        with pytest.raises(EncdiffError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
            call(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 8, 8, 8), (4, 8, 8)], ids=["channels-3", "channels-8", "3d"])
def test_bad_latent_shapes_are_refused_naming_the_shape(shape):
    ae = make_ae(seed=None)
    with pytest.raises(EncdiffError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        ae.decode(torch.zeros(shape))


def test_every_residual_branch_ends_in_a_zero_initialised_layer():
    ae = Autoencoder(TINY_AE)
    resnets = [m for m in ae.modules() if isinstance(m, ResnetBlock)]
    attentions = [m for m in ae.modules() if isinstance(m, SelfAttention)]
    # encoder: 1 per level + 2 mid; decoder: 2 per level + 2 mid. Attention at the last level + both mids.
    assert len(resnets) == 3 * 1 + 2 + 3 * 2 + 2
    assert len(attentions) == 1 + 2 + 2
    for layer in [r.conv2 for r in resnets] + [a.to_out[0] for a in attentions]:
        assert all(torch.count_nonzero(p) == 0 for p in layer.parameters())
    assert all(torch.count_nonzero(r.conv1.weight) > 0 for r in resnets)


def _forward_backward(ae: Autoencoder, x: torch.Tensor, seed: int):
    ae.zero_grad()
    x = x.clone().requires_grad_(True)
    recon, posterior = ae(x, torch.Generator().manual_seed(seed))
    (recon.square().mean() + 1e-3 * posterior.kl().mean()).backward()
    return recon.detach(), x.grad, {name: p.grad.clone() for name, p in ae.named_parameters()}


def test_gradient_checkpointing_gives_same_outputs_and_gradients():
    ae = make_ae().train()
    x = images(size=16)
    calls = count_forward_calls(ae.encoder.down_blocks[0].resnets[0], ae.encoder.mid_block.resnets[0],
                                ae.decoder.up_blocks[0].resnets[0], ae.decoder.mid_block.resnets[1])
    plain = _forward_backward(ae, x, seed=1)
    assert len(calls) == 4
    ae.set_gradient_checkpointing(True)
    calls.clear()
    ckpt = _forward_backward(ae, x, seed=1)
    assert len(calls) == 8  # each block recomputed once in backward
    assert max_abs_diff(plain[0], ckpt[0]) < 1e-6
    assert max_abs_diff(plain[1], ckpt[1]) < 1e-6
    for name, grad in plain[2].items():
        assert max_abs_diff(grad, ckpt[2][name]) < 1e-5, name


def test_channels_last_gives_same_outputs():
    ae = make_ae()
    x = images()
    with torch.no_grad():
        mean, logvar = ae.posterior(x).mean, ae.posterior(x).logvar
        decoded = ae.decode(ae.encode(x))
        ae.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        posterior = ae.posterior(x_cl)
        assert max_abs_diff(posterior.mean, mean) < 1e-5
        assert max_abs_diff(posterior.logvar, logvar) < 1e-5
        assert max_abs_diff(ae.decode(ae.encode(x_cl)), decoded) < 1e-5


def test_float64_autoencoder_runs_in_float64_and_agrees_with_float32(seeded):
    ae = make_ae()
    x = images()
    with torch.no_grad():
        latents, decoded = ae.encode(x), ae.decode_raw(ae.posterior(x).mean)
        ae.double()
        latents64 = ae.encode(x.double())
        decoded64 = ae.decode(latents64)
        recon, posterior = ae(x.double(), seeded(0))
    assert latents64.dtype == decoded64.dtype == recon.dtype == posterior.kl().dtype == torch.float64
    assert max_abs_diff(latents64, latents) < 1e-4
    assert max_abs_diff(decoded64, decoded) < 1e-4


@pytest.mark.parametrize("name", sorted(presets.AUTOENCODERS))
def test_presets_build(name):
    with torch.device("meta"):
        ae = Autoencoder(presets.AUTOENCODERS[name])
    assert ae.downsample_factor == 2 ** (len(presets.AUTOENCODERS[name].block_out_channels) - 1)


INVALID = [
    (dict(norm_num_groups=3), "norm_num_groups"),
    (dict(attention_levels=(False, True)), "attention_levels"),
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=0), "out_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(scaling_factor=float("inf")), "scaling_factor"),
    (dict(shift_factor=(0.1, 0.2)), "shift_factor"),
    (dict(shift_factor=(0.1, 0.2, float("nan"), 0.0)), "shift_factor"),
    (dict(norm_num_groups=0), "norm_num_groups"),  # not a ZeroDivisionError
]


@pytest.mark.parametrize("changes, field", INVALID, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in INVALID])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(EncdiffError, match=field):
        dataclasses.replace(TINY_AE, **changes)


def test_identity_autoencoder_has_the_same_interface_and_is_the_identity():
    ae = IdentityAutoencoder(channels=1)
    assert ae.latent_channels == 1 and ae.downsample_factor == 1
    x = images(channels=1, size=8)
    assert torch.equal(ae.encode(x), x)
    assert torch.equal(ae.decode(x), x)
    assert torch.equal(ae.decode(ae.encode(x)), x)
    assert IdentityAutoencoder().latent_channels == 3


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_encode_and_decode_leave_their_inputs_untouched(grad):
    ae = make_ae()
    x = images()
    latents = torch.randn(2, 4, 8, 8)
    copies = x.clone(), latents.clone()
    with torch.set_grad_enabled(grad):
        ae.encode(x)
        ae.decode(latents)
        ae(x)
    assert torch.equal(x, copies[0]) and torch.equal(latents, copies[1])


def test_outputs_are_the_same_with_and_without_autograd():
    ae = make_ae()
    x = images()
    with torch.no_grad():
        latents, decoded = ae.encode(x), ae.decode_raw(ae.posterior(x).mean)
    assert max_abs_diff(ae.encode(x).detach(), latents) < 1e-6
    assert max_abs_diff(ae.decode_raw(ae.posterior(x).mean).detach(), decoded) < 1e-6
