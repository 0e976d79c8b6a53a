"""The light decoder (light_decoder.py): its cost, its stage (the common trainer on the frozen encoder's latents),
and a generator that decodes with it when asked."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from conftest import colour_classes, randomize_, run_encdiff
from encdiff import EncdiffError
from encdiff.autoencoder import Autoencoder
from encdiff.light_decoder import LightDecoder, LightDecoderConfig
from encdiff.pipeline import Generator
from encdiff.presets import AUTOENCODERS


def multiply_adds(module: torch.nn.Module, x: torch.Tensor, call=None) -> int:
    """Multiply-adds of the convolutions a forward pass runs, per image."""
    total = [0]

    def count(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    with torch.no_grad():
        (call or module)(x)
    for h in hooks:
        h.remove()
    return total[0]


def test_the_light_decoder_costs_under_a_third_of_the_bundled_shape_and_decodes_the_same_latents():
    autoencoder = Autoencoder(dataclasses.replace(AUTOENCODERS["cifar10_small"], latent_channels=16))
    light = LightDecoder.for_autoencoder(autoencoder)
    z = torch.randn(2, 16, 8, 8)
    assert light.decode(z).shape == autoencoder.decode(z).shape == (2, 3, 32, 32)
    full = multiply_adds(autoencoder, z, autoencoder.decode)
    assert full / multiply_adds(light, z) >= 3
    assert light.config.block_out_channels == (64, 32, 16) and light.downsample_factor == 4
    with pytest.raises(EncdiffError, match="latents of shape"):
        light.decode(torch.randn(1, 8, 8, 8))
    with pytest.raises(EncdiffError, match="block_out_channels"):
        LightDecoderConfig(block_out_channels=())


def test_the_light_decoder_reads_each_image_with_its_own_latent_and_full_decoding_cached_once(tmp_path):
    """The stage's batches: each (mirrored) image with the posterior mean of that very image and the full decoder's
    pixels of it, from the run's cache (computed once, reused by the next run over the same data and weights)."""
    from encdiff.data import ImageDataset
    from encdiff.images import to_uint8, to_unit
    from encdiff.training.latents import cached_decodings, cached_latents, image_and_latent_batches
    from encdiff.training.loop import Distributed

    data = colour_classes(tmp_path / "data", per_class=4, size=16)
    autoencoder = randomize_(Autoencoder(AUTOENCODERS["tiny"])).eval()
    folder = autoencoder.save_pretrained(tmp_path / "ae")
    dataset = ImageDataset(data, 16, workers=0, progress=False)
    cache = tmp_path / "cache"
    latents = cached_latents(autoencoder, dataset, cache, str(folder), Distributed())
    decoded = cached_decodings(autoencoder, latents, dataset, cache, str(folder), Distributed())
    indices, flips = torch.tensor([5, 0, 9]), torch.tensor([True, False, True])
    (x, z, teacher), labels = image_and_latent_batches(latents, decoded, dataset)(indices, flips)
    expected, expected_labels = dataset.batch(indices, flips)
    with torch.no_grad():
        torch.testing.assert_close(z, autoencoder.encode(expected), rtol=1e-5, atol=1e-5)
        full = to_unit(to_uint8(autoencoder.decode(z)))
    assert torch.equal(x, expected) and torch.equal(labels, expected_labels)
    assert (teacher - full).abs().max() <= 2 / 255 + 1e-6  # the pixels a generator would write, to one level
    files = sorted(path.name for path in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("decoded-") and files[1].startswith("latents-")
    stamps = [path.stat().st_mtime_ns for path in sorted(cache.iterdir())]
    again = cached_decodings(autoencoder, latents, dataset, cache, str(folder), Distributed())
    assert torch.equal(again[0], decoded[0]) and stamps == [p.stat().st_mtime_ns for p in sorted(cache.iterdir())]


def test_train_light_decoder_then_sample_through_it(tmp_path):
    data = colour_classes(tmp_path / "data", per_class=4, size=16)
    common = ["--steps", "2", "--batch-size", "4", "--sample-every", "2", "--checkpoint-every", "2",
              "--resolution", "16"]
    run_encdiff(["train-autoencoder", str(data), "--run-dir", str(tmp_path / "ae"), "--model", "tiny", *common])
    run_encdiff(["train", str(data), "--autoencoder", str(tmp_path / "ae" / "model"), "--run-dir",
                 str(tmp_path / "ldm"), "--model", "tiny", *common])
    run_encdiff(["train-light-decoder", str(data), "--autoencoder", str(tmp_path / "ae" / "model"), "--run-dir",
                 str(tmp_path / "light"), "--adv-weight", "0.5", "--adv-start", "1", "--disc-channels", "8",
                 "--ssim-weight", "0.2", *common])
    assert (tmp_path / "light" / "decoded-00000002.png").is_file()
    # Without --resolution the run takes its autoencoder's size and channels (not the defaults, which it would refuse).
    planned = run_encdiff(["train-light-decoder", str(data), "--autoencoder", str(tmp_path / "ae" / "model"),
                           "--run-dir", str(tmp_path / "planned"), "--dry-run"])
    config = json.loads(planned.stdout)
    assert (config["resolution"], config["channels"], config["buckets"]) == (16, 3, [])
    assert "resolution 16, channels 3 (the autoencoder's)" in planned.stderr
    run_encdiff(["set-light-decoder", str(tmp_path / "ldm" / "model"), str(tmp_path / "light" / "model")])
    generator = Generator.from_pretrained(tmp_path / "ldm" / "model")
    labels = torch.tensor([0, 1])
    light = generator.images([0, 1], labels, steps=3, decoder="light")
    full = generator.images([0, 1], labels, steps=3)
    assert light.shape == full.shape and not torch.equal(light, full)
    out = tmp_path / "light.png"
    run_encdiff(["sample", str(tmp_path / "ldm" / "model"), "--decoder", "light", "--num", "2", "--class",
                 "class1", "--steps", "3", "--out", str(out)])
    assert Image.open(out).size == (32, 16)
    info = run_encdiff(["info", str(tmp_path / "light" / "model")])
    assert "LightDecoder" in info.stdout


def test_a_generator_without_a_light_decoder_says_so():
    from test_editing import tiny_generator

    generator = tiny_generator()
    with pytest.raises(EncdiffError, match="no light decoder .*set-light-decoder"):
        generator.images([0], torch.tensor([0]), steps=2, decoder="light")
    other = LightDecoder(LightDecoderConfig(latent_channels=8, block_out_channels=(16, 16)))
    with pytest.raises(EncdiffError, match="reads 8 latent channels"):
        generator.with_light_decoder(other)


def test_set_light_decoder_keeps_the_bundled_float16_and_can_make_it_the_default(tmp_path):
    """The bundled folders store float16: rewriting one to add a light decoder must not double its size."""
    from safetensors import safe_open

    from encdiff.pipeline import bundled_path

    # The bundled teacher with its full decoder as the default (as set-sampling writes it), made light again.
    teacher = Generator.bundled()
    run_encdiff(["set-sampling", str(bundled_path()), "--decoder", "full", "--out", str(tmp_path / "full")])
    LightDecoder.for_autoencoder(teacher.autoencoder).save_pretrained(tmp_path / "light")
    out = tmp_path / "teacher"
    run_encdiff(["set-light-decoder", str(tmp_path / "full"), str(tmp_path / "light"), "--out", str(out),
                 "--default"])
    for part in ("unet", "autoencoder", "light_decoder"):
        with safe_open(str(out / part / "model.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, part
    written = Generator.from_pretrained(out)
    assert Generator.from_pretrained(tmp_path / "full").sampling.decoder == "full"
    assert written.sampling == teacher.sampling and written.sampling.decoder == "light"
    with safe_open(str(tmp_path / "light" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_the_light_decoder_stage_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    data = colour_classes(tmp_path / "data", per_class=4, size=16)
    folder = randomize_(Autoencoder(AUTOENCODERS["tiny"])).save_pretrained(tmp_path / "ae")

    def light(run_dir, steps):
        run_encdiff(["train-light-decoder", str(data), "--autoencoder", str(folder), "--run-dir", str(run_dir),
                     "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2", "--keep-last", "5",
                     "--sample-every", "0", "--workers", "0", "--adv-weight", "0.5", "--adv-start", "1",
                     "--disc-channels", "8"])
        return load_file(str(run_dir / "checkpoints" / "step-00000004" / "state.safetensors")) if steps == 4 else None

    whole = light(tmp_path / "whole", 4)
    light(tmp_path / "split", 2)
    split = light(tmp_path / "split", 4)
    assert {k.split(".")[0] for k in whole} >= {"model", "ema", "optimizer", "disc", "disc_optimizer"}
    assert all(torch.equal(whole[k], split[k]) for k in whole)
