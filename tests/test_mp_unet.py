"""The magnitude-preserving U-Net (EDM2 config E): unit magnitudes at init, forced weight normalisation after every
optimizer step, the uncertainty-weighted loss, and every path the ADM-style U-Net takes (generator folders, guidance,
distillation, exact resume, DDP, export; diffusers export refused)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from conftest import colour_classes, run_encdiff
from encdiff import EncdiffError
from encdiff.denoiser import EDMDenoiser, training_loss
from encdiff.mp_unet import MPConv, MPUNet, MPUNetConfig, mp_cat, mp_silu, mp_sum
from encdiff.pipeline import Generator
from encdiff.presets import MP_UNETS
from encdiff.training import TrainConfig, export_run, train_consistency, train_diffusion

CONFIG = MPUNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(32, 64, 64),
                      attention_levels=(False, True, True), layers_per_block=2, channels_per_head=32, num_classes=5,
                      logvar_channels=16)


def rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


def test_the_magnitude_preserving_operations_keep_unit_variance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 64, generator=g), torch.randn(4096, 32, generator=g)
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.02)
    assert rms(mp_sum(a[:, :32], b, t=0.3)) == pytest.approx(1.0, abs=0.02)
    assert rms(mp_cat(a, b, t=0.3)) == pytest.approx(1.0, abs=0.02)
    conv = MPConv(64, 48, ())
    assert rms(conv(a)) == pytest.approx(1.0, abs=0.05)
    conv3 = MPConv(16, 16, (3, 3))
    assert rms(conv3(torch.randn(64, 16, 8, 8, generator=g))[:, :, 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.05)


def test_activations_keep_unit_magnitude_through_the_network_at_init():
    torch.manual_seed(0)
    net = MPUNet(CONFIG)
    magnitudes = {}
    for name, block in [*(("enc." + n, b) for n, b in net.enc.items()), *(("dec." + n, b) for n, b in net.dec.items())]:
        block.register_forward_hook(lambda m, i, o, name=name: magnitudes.__setitem__(name, rms(o)))
    with torch.no_grad():
        out = net(torch.randn(128, 4, 8, 8), torch.randn(128) * 0.3, torch.randint(0, 6, (128,)))
    assert len(magnitudes) == len(net.enc) + len(net.dec)
    assert all(0.6 < m < 1.4 for m in magnitudes.values()), magnitudes
    assert torch.equal(out, torch.zeros_like(out))  # the output gain starts at 0: D = c_skip x


def pixel_config(**changes):
    return {**dict(resolution=16, batch_size=8, steps=4, log_every=2, sample_every=0, workers=0, warmup_steps=1,
                   checkpoint_every=2, lr=1e-2), **changes}


def test_forced_weight_normalisation_holds_after_every_optimizer_step(tmp_path, monkeypatch):
    data = colour_classes(tmp_path / "data", per_class=6, size=16)
    config = TrainConfig(data=str(data), run_dir=str(tmp_path / "run"), backbone="edm2", model="tiny",
                         **pixel_config())
    after_steps = []
    original = MPUNet.normalize_weights_

    def record(self):
        original(self)
        after_steps.append([m.weight.detach().clone() for m in self.modules() if isinstance(m, MPConv)])

    monkeypatch.setattr(MPUNet, "normalize_weights_", record)
    train_diffusion(config)
    assert len(after_steps) == config.steps
    moved = False
    for before, weights in zip([None, *after_steps], after_steps):
        for i, w in enumerate(weights):
            norms = w.flatten(1).norm(dim=1) / math.sqrt(w[0].numel())
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-3, rtol=0)
            moved |= before is not None and not torch.equal(before[i], w)
    assert moved  # the steps changed the weights, and the projection brought them back to unit norm


def test_the_uncertainty_loss_is_edm2s_and_trains_its_head():
    torch.manual_seed(0)
    net = MPUNet(CONFIG)
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        net.logvar_linear.weight.mul_(3.0)
    denoiser = EDMDenoiser(net, sigma_data=1.0)
    x0 = torch.randn(6, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    loss = training_loss(denoiser, x0, g, torch.arange(6) % 5, noise_level="lognormal", weighting="edm",
                         uncertainty=True)
    # the same draws by hand: lambda / exp(u) * mse + u
    g = torch.Generator().manual_seed(3)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(6, generator=g, dtype=torch.float64))
    eps = torch.randn(x0.shape, generator=g)
    denoised, logvar = denoiser(x0 + sigma.float()[:, None, None, None] * eps, sigma, torch.arange(6) % 5,
                                return_logvar=True)
    weight = ((sigma**2 + 1) / sigma**2).float()
    expected = (weight / logvar.exp() * (denoised - x0).square().flatten(1).mean(1) + logvar).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert net.logvar_linear.weight.grad.abs().sum() > 0


def tiny_edm2_generator(run_dir: Path, data: Path, **changes) -> Path:
    config = TrainConfig(data=str(data), run_dir=str(run_dir), backbone="edm2", model="tiny", uncertainty=True,
                         lr_schedule="inv_sqrt", lr_decay_steps=2, betas=(0.9, 0.99), **pixel_config(**changes))
    return train_diffusion(config)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return colour_classes(tmp_path_factory.mktemp("data"), per_class=6, size=16)


def test_an_edm2_generator_samples_guides_distils_and_refuses_diffusers_export(folder, tmp_path):
    model = tiny_edm2_generator(tmp_path / "run", folder)
    generator = Generator.from_pretrained(model)
    assert isinstance(generator.unet, MPUNet)
    labels = torch.tensor([0, 1, 2])
    guided = generator.images([1, 2, 3], labels, steps=4, guidance_scale=2.0)
    assert guided.shape == (3, 3, 16, 16) and guided.dtype == torch.uint8
    assert not torch.equal(guided, generator.images([1, 2, 3], labels, steps=4, guidance_scale=1.0))
    with pytest.raises(EncdiffError, match="no diffusers equivalent"):
        export_run(tmp_path / "run", tmp_path / "out", diffusers=True)
    with pytest.raises(EncdiffError, match="no diffusers equivalent"):
        generator.unet.save_pretrained(tmp_path / "d", diffusers=True)
    student = train_consistency(TrainConfig(data=str(folder), run_dir=str(tmp_path / "student"), teacher=str(model),
                                            **pixel_config(steps=2, intervals=4)))
    made = Generator.from_pretrained(student).images([0, 1], torch.tensor([0, 1]))
    assert made.shape == (2, 3, 16, 16)


def test_edm2_training_resumes_exactly(folder, tmp_path):
    from safetensors.torch import load_file

    tiny_edm2_generator(tmp_path / "whole", folder, phema_every=2)
    tiny_edm2_generator(tmp_path / "split", folder, phema_every=2, **{"steps": 2})
    tiny_edm2_generator(tmp_path / "split", folder, phema_every=2)
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "step-00000004" / "state.safetensors")) for d in
            ("whole", "split"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))


@pytest.mark.slow  # two torchrun processes
def test_two_gloo_processes_equal_one_for_the_edm2_backbone(folder, tmp_path):
    args = ["train", str(folder), "--pixel", "--backbone", "edm2", "--model", "tiny", "--uncertainty",
            "--lr-schedule", "inv_sqrt", "--lr-decay-steps", "2", "--resolution", "16", "--batch-size", "8",
            "--steps", "4", "--checkpoint-every", "4", "--log-every", "2", "--sample-every", "0", "--workers", "0",
            "--phema-every", "2"]
    run_encdiff([*args, "--run-dir", str(tmp_path / "ddp")], processes=2, port=29700)
    run_encdiff([*args, "--run-dir", str(tmp_path / "one")])
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "checkpoints" / "step-00000004" / "state.safetensors")) for d in
            ("ddp", "one"))
    for key in (k for k in b if k.startswith(("model.", "ema.", "phema."))):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_presets_build_and_the_bundled_size_class_matches_the_adm_unet():
    net = MPUNet(MP_UNETS["cifar10_latent"])
    assert 4.5e6 < sum(p.numel() for p in net.parameters()) < 5.5e6
    with pytest.raises(EncdiffError, match="sample_size"):
        dataclasses.replace(MP_UNETS["cifar10_latent"], sample_size=6)
