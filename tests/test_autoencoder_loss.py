"""The detail-preserving autoencoder objective: SSIM and focal-frequency terms against closed forms and
torchmetrics, the PatchGAN with hinge loss and adaptive weight, decoder-only fine-tuning that leaves the latent
space bit for bit, GAN state in exact resume and DDP, and the guard that the feature net is never trained against."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import colour_classes, randomize_, run_encdiff
from encdiff import Autoencoder, EncdiffError
from encdiff.autoencoder_loss import (AutoencoderObjective, DiscriminatorConfig, PatchDiscriminator, adaptive_weight,
                                      alpha_edges, focal_frequency_loss, hinge_discriminator_loss, ssim)
from encdiff.training.state import latest_training_state
from encdiff.presets import AUTOENCODERS
from encdiff.training import TrainConfig, train_autoencoder

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = dict(resolution=16, batch_size=8, log_every=2, sample_every=0, workers=0, warmup_steps=2)
GAN = dict(ssim_weight=0.2, fft_weight=0.5, adv_weight=0.5, fm_weight=1.0, disc_channels=8, disc_layers=2)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return colour_classes(tmp_path_factory.mktemp("images"), classes=2, spread=40)


@pytest.fixture(scope="module")
def base_autoencoder(image_folder, tmp_path_factory) -> Path:
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path_factory.mktemp("base")), model="tiny", steps=4,
                         checkpoint_every=4, **COMMON)
    return train_autoencoder(config)


def test_ssim_is_one_for_equal_images_and_matches_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    ours = ssim(x, y)
    theirs = torchmetrics.functional.structural_similarity_index_measure(y, x, data_range=2.0, reduction="none")
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert (ours < 0.9).all()


def test_focal_frequency_loss_without_focus_is_the_mse_by_parseval():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    # alpha = 0: every frequency weighs 1, and the orthonormal FFT keeps the squared error (Parseval).
    torch.testing.assert_close(focal_frequency_loss(x, y, alpha=0.0), F.mse_loss(x, y))
    assert focal_frequency_loss(x, x) == 0
    # Focus: the hardest frequency of each image and channel weighs exactly 1, the others less.
    assert focal_frequency_loss(x, y) < focal_frequency_loss(x, y, alpha=0.0)


def test_hinge_loss_and_adaptive_weight_closed_forms():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: max(0, 1 - 2) = 0, max(0, 1 - 0.5) = 0.5; fake: max(0, 1 - 2) = 0, max(0, 1 + 0) = 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert adaptive_weight(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])).item() == pytest.approx(5 / 0.5001)
    assert adaptive_weight(torch.ones(2), torch.zeros(2)).item() == 1e4  # clamped, as in taming


def test_patch_discriminator_gives_one_logit_per_patch():
    d = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2))
    logits, features = d(torch.zeros(2, 3, 32, 32), features=True)
    assert logits.shape == (2, 1, 6, 6) and len(features) == 3
    assert PatchDiscriminator(DiscriminatorConfig(channels=8, layers=3))(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 2, 2)


def test_gradients_of_each_network_come_only_from_its_own_terms():
    """One backward trains both: D gets exactly the hinge loss's gradient, the autoencoder exactly that of
    rec + ssim + fft + lambda * g_adv + fm (D's parameters as constants)."""
    torch.manual_seed(0)
    ae = randomize_(Autoencoder(AUTOENCODERS["tiny"]))
    disc = randomize_(PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2)), seed=1)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    objective = AutoencoderObjective(recon_loss="l1", kl_weight=0.0, ssim_weight=0.2, fft_weight=0.5, adv_weight=0.5,
                                     fm_weight=1.0, discriminator=disc,
                                     last_layer=ae.decoder.conv_out.weight)
    rec, posterior = ae(x, sample_posterior=False)
    total, parts = objective.loss(x, rec, posterior, adversarial=True)
    total.backward()
    d_grads = {k: p.grad.clone() for k, p in disc.named_parameters()}
    ae_grads = {k: p.grad.clone() for k, p in ae.named_parameters()}
    disc.zero_grad(), ae.zero_grad()

    rec, _ = ae(x, sample_posterior=False)
    hinge = hinge_discriminator_loss(*disc(torch.cat([x, rec.detach()])).chunk(2))
    hinge.backward()
    for k, p in disc.named_parameters():
        torch.testing.assert_close(d_grads[k], p.grad, msg=k)
    disc.zero_grad(), ae.zero_grad()
    disc.requires_grad_(False)
    rec, _ = ae(x, sample_posterior=False)
    logits, fake_features = disc(rec, features=True)
    _, real_features = disc(x, features=True)
    fm = sum(F.l1_loss(f, r) for f, r in zip(fake_features, real_features)) / len(fake_features)
    own = (F.l1_loss(rec, x) + 0.2 * (1 - ssim(rec, x).mean()) + 0.5 * focal_frequency_loss(rec, x)
           + 0.5 * parts["adv_lambda"] * -logits.mean() + fm)
    own.backward()
    for k, p in ae.named_parameters():
        torch.testing.assert_close(ae_grads[k], p.grad, msg=k)
    assert parts["adv_lambda"] > 0 and torch.isfinite(total)


def test_no_adversarial_term_unless_asked():
    ae = randomize_(Autoencoder(AUTOENCODERS["tiny"]))
    disc = PatchDiscriminator(DiscriminatorConfig(channels=8))
    objective = AutoencoderObjective(recon_loss="l2", kl_weight=0.0, ssim_weight=0.0, fft_weight=0.0, adv_weight=0.5,
                                     fm_weight=0.0, discriminator=disc, last_layer=ae.decoder.conv_out.weight)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, posterior = ae(x, sample_posterior=False)
    total, parts = objective.loss(x, rec, posterior, adversarial=False)
    assert set(parts) == {"rec"} and torch.equal(total, F.mse_loss(rec, x))
    assert "d_loss" in objective.loss(x, rec, posterior, adversarial=True)[1]


def test_the_alpha_weight_counts_the_alpha_channel_that_many_times_a_colour_channel_and_needs_alpha(tmp_path):
    def objective(alpha_weight, channels=4, recon_loss="l1", ssim_weight=0.0):
        return AutoencoderObjective(recon_loss=recon_loss, kl_weight=0.0, ssim_weight=ssim_weight, fft_weight=0.0,
                                    adv_weight=0.0, fm_weight=0.0, discriminator=None, last_layer=torch.zeros(1),
                                    alpha_weight=alpha_weight, channels=channels)

    g = torch.Generator().manual_seed(0)
    x, rec = (torch.rand(2, 4, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    colour, alpha = F.l1_loss(rec[:, :3], x[:, :3]), F.l1_loss(rec[:, 3:], x[:, 3:])
    # weight 1 is the plain mean over four channels, computed as before (bit for bit)
    assert torch.equal(objective(1.0).loss(x, rec, None, adversarial=False)[1]["rec"], F.l1_loss(rec, x))
    _, parts = objective(5.0).loss(x, rec, None, adversarial=False)
    torch.testing.assert_close(parts["rec"], (3 * colour + 5 * alpha) / 4)
    torch.testing.assert_close(parts["alpha_rec"], alpha)
    _, parts = objective(5.0, recon_loss="l2", ssim_weight=1.0).loss(x, rec, None, adversarial=False)
    per_channel = ssim(rec, x, per_channel=True).mean(0)
    mse = F.mse_loss(rec[:, :3], x[:, :3]), F.mse_loss(rec[:, 3:], x[:, 3:])
    torch.testing.assert_close(parts["rec"], (3 * mse[0] + 5 * mse[1]) / 4)
    torch.testing.assert_close(parts["ssim"], 1 - (per_channel[:3].sum() + 5 * per_channel[3]) / 4)
    torch.testing.assert_close(ssim(rec, x, per_channel=True).mean(1), ssim(rec, x))
    # a run without alpha refuses it, naming the field, before any data is read (a dry run too)
    with pytest.raises(EncdiffError, match="alpha_weight 3.0: the images have 3 channels, no alpha"):
        objective(3.0, channels=3)
    from encdiff.cli import main

    assert main(["train-autoencoder", str(tmp_path), "--model", "tiny", "--alpha-weight", "3", "--dry-run",
                 "--run-dir", str(tmp_path / "run")]) == 2


def test_alpha_edges_are_the_pixels_next_to_a_change_of_alpha_never_a_flat_region():
    alpha = torch.full((1, 1, 10, 10), -1.0)
    alpha[..., 1:8, 2:9] = 1.0  # an opaque rectangle on transparency, touching no border but the right-hand one's
    alpha[..., 4, 4] = 0.2  # a partial pixel inside it
    edges = alpha_edges(alpha)[0, 0]
    # the definition, pixel by pixel: more than one alpha value within the 3x3 neighbourhood (clipped at borders)
    for i in range(10):
        for j in range(10):
            window = alpha[0, 0, max(0, i - 1):i + 2, max(0, j - 1):j + 2]
            assert bool(edges[i, j]) == bool(window.max() > window.min()), (i, j)
    assert edges[0, 1] and edges[4, 4] and edges[3, 5] and not edges[2, 6] and not edges[9, 0]
    assert not alpha_edges(torch.full((2, 1, 5, 5), 0.3)).any()  # flat: no edges, borders included


def test_the_alpha_edge_weight_weighs_every_channel_at_alpha_edges_and_needs_alpha(tmp_path):
    def objective(alpha_edge_weight, alpha_weight=1.0, channels=4, recon_loss="l1"):
        return AutoencoderObjective(recon_loss=recon_loss, kl_weight=0.0, ssim_weight=0.2, fft_weight=0.0,
                                    adv_weight=0.0, fm_weight=0.0, discriminator=None, last_layer=torch.zeros(1),
                                    alpha_weight=alpha_weight, alpha_edge_weight=alpha_edge_weight, channels=channels)

    g = torch.Generator().manual_seed(0)
    x = torch.full((2, 4, 16, 16), -1.0)
    x[:, :3] = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x[:, 3, 4:12, 5:11] = 1.0  # opaque squares on transparency: edges on their outlines only
    rec = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mask = alpha_edges(x[:, 3:])
    assert 0 < mask.float().mean() < 0.5
    # weight 1 is the loss as before, bit for bit
    assert torch.equal(objective(1.0).loss(x, rec, None, adversarial=False)[1]["rec"], F.l1_loss(rec, x))
    for recon_loss, distance in (("l1", (rec - x).abs()), ("l2", (rec - x).square())):
        _, parts = objective(6.0, recon_loss=recon_loss).loss(x, rec, None, adversarial=False)
        torch.testing.assert_close(parts["rec"], (distance * (1 + 5 * mask)).mean())
        # only the L1/L2 term: SSIM stays the plain mean
        torch.testing.assert_close(parts["ssim"], 1 - ssim(rec, x).mean())
    # with an alpha weight as well: edges weighted in every channel, then alpha's channel weighed
    _, parts = objective(6.0, alpha_weight=3.0).loss(x, rec, None, adversarial=False)
    per_channel = ((rec - x).abs() * (1 + 5 * mask)).mean(dim=(0, 2, 3))
    torch.testing.assert_close(parts["rec"], (per_channel[:3].sum() + 3 * per_channel[3]) / 4)
    # an error at an edge costs more than the same error on a flat region
    at_edge, flat = x.clone(), x.clone()
    at_edge[0, 0, 4, 5] += 0.5
    flat[0, 0, 8, 8] += 0.5
    assert objective(6.0).loss(x, at_edge, None, adversarial=False)[1]["rec"] > \
        objective(6.0).loss(x, flat, None, adversarial=False)[1]["rec"]
    # a run without alpha refuses it, naming the field, before any data is read (a dry run too)
    with pytest.raises(EncdiffError, match="alpha_edge_weight 4.0: the images have 3 channels, no alpha"):
        objective(4.0, channels=3)
    from encdiff.cli import main

    assert main(["train-autoencoder", str(tmp_path), "--model", "tiny", "--alpha-edge-weight", "4", "--dry-run",
                 "--run-dir", str(tmp_path / "run")]) == 2


def test_autoencoder_training_never_uses_the_evaluation_feature_net(image_folder, tmp_path, monkeypatch):
    """Training against the network that measures FID would make every FID meaningless: every way into the
    feature net raises during a stage-1 run with every term of the objective switched on."""
    import encdiff.featurenet as featurenet
    import encdiff.inception as inception

    def refuse(*args, **kwargs):
        raise AssertionError("the autoencoder's training path used the evaluation feature net")

    monkeypatch.setattr(featurenet.FeatureNet, "forward", refuse)
    monkeypatch.setattr(featurenet.FeatureNet, "__init__", refuse)
    monkeypatch.setattr(featurenet.FeatureNet, "load", refuse)
    monkeypatch.setattr(inception, "load_inception", refuse)
    monkeypatch.setattr(inception.FIDInceptionV3, "__init__", refuse)
    monkeypatch.setattr(inception.FIDInceptionV3, "forward", refuse)
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "run"), model="tiny", steps=3,
                         checkpoint_every=3, **{**COMMON, **GAN, "sample_every": 3})
    train_autoencoder(config)
    source = (Path(SRC) / "encdiff" / "autoencoder_loss.py").read_text()
    code = source.replace("feature net", "").split('"""', 2)[2]
    assert "featurenet" not in code and "inception" not in code.lower()


def test_decoder_only_fine_tune_keeps_the_latent_space_bit_for_bit(image_folder, base_autoencoder, tmp_path):
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "dec"), init=str(base_autoencoder),
                         decoder_only=True, steps=4, checkpoint_every=4, lr=1e-2, **{**COMMON, **GAN})
    tuned = Autoencoder.from_pretrained(train_autoencoder(config))
    base = Autoencoder.from_pretrained(base_autoencoder)
    assert tuned.config == base.config  # scaling and shift factors included
    changed = []
    for key, value in base.state_dict().items():
        same = torch.equal(tuned.state_dict()[key], value)
        if key.startswith(("encoder.", "quant_conv.")):
            assert same, key
        elif not same:
            changed.append(key)
    assert any(k.startswith("decoder.") for k in changed) and "post_quant_conv.weight" in changed
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tuned.encode(x), base.encode(x))


def test_latent_noise_is_added_in_the_unets_units_before_decoding(base_autoencoder):
    ae = Autoencoder.from_pretrained(base_autoencoder)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    side = 16 // ae.config.downsample_factor
    noise = 0.3 * torch.randn(2, ae.config.latent_channels, side, side)
    with torch.no_grad():
        noisy, _ = ae(x, sample_posterior=False, latent_noise=noise)
        clean, _ = ae(x, sample_posterior=False)
        torch.testing.assert_close(noisy, ae.decode(ae.encode(x) + noise))
        assert not torch.allclose(noisy, clean)


def test_decoder_only_fine_tune_with_latent_noise_resumes_bit_for_bit_and_learns_otherwise(
        image_folder, base_autoencoder, tmp_path):
    """The noise is drawn from the run's checkpointed stream (2 + 2 steps equal 4); it changes what the decoder
    learns, never the encoder."""
    base = dict(data=str(image_folder), init=str(base_autoencoder), decoder_only=True, checkpoint_every=2,
                keep_last=5, lr=1e-2, **COMMON)
    noisy = train_autoencoder(TrainConfig(run_dir=str(tmp_path / "whole"), steps=4, latent_noise=0.5, **base))
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "parts"), steps=2, latent_noise=0.5, **base))
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "parts"), steps=4, latent_noise=0.5, **base))
    plain = train_autoencoder(TrainConfig(run_dir=str(tmp_path / "plain"), steps=4, **base))
    whole = load_file(str(latest_training_state(tmp_path / "whole") / "state.safetensors"))
    parts = load_file(str(latest_training_state(tmp_path / "parts") / "state.safetensors"))
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    noisy, plain, init = (Autoencoder.from_pretrained(p) for p in (noisy, plain, base_autoencoder))
    assert not torch.equal(noisy.decoder.conv_out.weight, plain.decoder.conv_out.weight)
    for key, value in init.encoder.state_dict().items():
        assert torch.equal(noisy.encoder.state_dict()[key], value), key


def test_decoder_only_needs_init_and_init_excludes_model():
    with pytest.raises(EncdiffError, match="'decoder_only'.*--init"):
        TrainConfig(decoder_only=True)
    with pytest.raises(EncdiffError, match="'init'.*'model'"):
        TrainConfig(init="ae", model="tiny")
    with pytest.raises(EncdiffError, match="'adv_weight' = -1"):
        TrainConfig(adv_weight=-1)
    # latent noise is measured in a fixed latent space: a decoder-only fine-tune's
    with pytest.raises(EncdiffError, match="'latent_noise' = 0.5: needs decoder_only"):
        TrainConfig(latent_noise=0.5)
    with pytest.raises(EncdiffError, match="latent_noise"):
        TrainConfig(latent_noise=-0.1, init="ae", decoder_only=True)


def test_gan_run_resumes_bit_for_bit(image_folder, tmp_path):
    """The discriminator and its optimizer are training state: 3 + 3 steps equal 6 steps, GAN and all."""
    base = dict(data=str(image_folder), model="tiny", checkpoint_every=3, keep_last=5, adv_start=2,
                **{**COMMON, **GAN})
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "whole"), steps=6, **base))
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "parts"), steps=3, **base))
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "parts"), steps=6, **base))
    whole = load_file(str(latest_training_state(tmp_path / "whole") / "state.safetensors"))
    parts = load_file(str(latest_training_state(tmp_path / "parts") / "state.safetensors"))
    assert any(k.startswith("disc.") for k in whole) and any(k.startswith("disc_optimizer.") for k in whole)
    assert sorted(whole) == sorted(parts)
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key


@pytest.mark.slow  # two torchrun processes
def test_gan_run_with_two_gloo_processes_equals_one_process(image_folder, tmp_path):
    args = ["train-autoencoder", str(image_folder), "--model", "tiny", "--resolution", "16", "--batch-size", "8",
            "--steps", "4", "--checkpoint-every", "4", "--log-every", "2", "--sample-every", "0", "--workers", "0",
            "--adv-weight", "0.5", "--fm-weight", "1", "--ssim-weight", "0.2", "--disc-channels", "8"]
    run_encdiff([*args, "--run-dir", str(tmp_path / "ddp")], processes=2, port=30500)
    run_encdiff([*args, "--run-dir", str(tmp_path / "one")])
    a = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000004" / "state.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000004" / "state.safetensors"))
    keys = [k for k in b if k.startswith(("model.", "ema.", "disc."))]
    assert any(k.startswith("disc.") for k in keys)
    for key in keys:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_diverging_discriminator_stops_the_run_naming_the_last_good_checkpoint(image_folder, tmp_path):
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "run"), model="tiny", steps=30,
                         checkpoint_every=1, disc_lr=1e30, adv_start=1, **{**COMMON, **GAN})
    with pytest.raises(EncdiffError, match="training diverged at step") as info:
        train_autoencoder(config)
    last = latest_training_state(tmp_path / "run")
    assert last is not None and str(last) in str(info.value)
    tensors = load_file(str(last / "state.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith(("model.", "disc.")))


def test_set_autoencoder_puts_a_fine_tuned_decoder_into_a_generator_and_refuses_another_latent_space(
        image_folder, base_autoencoder, tmp_path):
    from encdiff.pipeline import Generator
    from encdiff.training import train_diffusion

    generator_dir = train_diffusion(TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "ldm"), model="tiny",
                                                autoencoder=str(base_autoencoder), steps=2, checkpoint_every=2,
                                                **COMMON))
    tuned = train_autoencoder(TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "dec"), decoder_only=True,
                                          init=str(base_autoencoder), steps=2, checkpoint_every=2, lr=1e-2,
                                          **{**COMMON, **GAN}))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cli = lambda *a: subprocess.run([sys.executable, "-m", "encdiff", *a], env=env, capture_output=True, text=True)
    result = cli("set-autoencoder", str(generator_dir), str(tuned), "--out", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    old, new = Generator.from_pretrained(generator_dir), Generator.from_pretrained(tmp_path / "new")
    for key, value in old.unet.state_dict().items():
        assert torch.equal(new.unet.state_dict()[key], value), key
    assert torch.equal(new.autoencoder.decoder.conv_out.weight, Autoencoder.from_pretrained(tuned).decoder.conv_out.weight)
    # Another encoder (a fresh stage-1 run) is another latent space: refused, naming what differs.
    other = train_autoencoder(TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "other"), model="tiny",
                                          steps=2, checkpoint_every=2, seed=5, **COMMON))
    result = cli("set-autoencoder", str(generator_dir), str(other), "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "scaling_factor" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
