"""Defaults from the data (training/sizing.py): the survey of a folder, the rules per resolution, and the two commands
with no preset on a folder of transparent images, to RGBA samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_encdiff
from encdiff.autoencoder import Autoencoder, AutoencoderConfig
from encdiff.mp_unet import MPUNetConfig
from encdiff.training.config import load_config
from encdiff.training.sizing import (FolderSurvey, autoencoder_model, default_channels, default_resolution,
                                     downsampling, plan_for_folder, survey_folder, unet_model)


def icons(root, n=12, size=(40, 40), classes=("a", "b"), mode="RGBA"):
    """Coloured discs on transparent backgrounds, n per class."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = size[1], size[0]
            yy, xx = np.mgrid[:h, :w]
            disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
            pixels = np.zeros((h, w, 4), dtype=np.uint8)
            pixels[disc] = (*rng.integers(0, 256, 3), 255)
            Image.fromarray(pixels, "RGBA").convert(mode).save(root / c / f"{i}.png")
    return root


def survey(**changes) -> FolderSurvey:
    base = dict(images=1000, class_counts={}, sampled=1000, short_side=64, aspect=1.0, alpha=0.0, grayscale=0.0,
                unreadable=0)
    return FolderSurvey(**{**base, **changes})


@pytest.mark.parametrize("short_side, resolution, f", [(32, 32, 4), (64, 64, 4), (70, 64, 4), (128, 128, 8),
                                                       (300, 256, 8), (4000, 256, 8), (20, 32, 4)])
def test_resolution_and_downsampling_rules(short_side, resolution, f):
    assert default_resolution(short_side) == resolution and downsampling(resolution) == f


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_every_resolution_gets_models_that_build_with_latents_of_at_most_32_cells(resolution):
    model = autoencoder_model(resolution)
    ae = AutoencoderConfig(**{**model["model_overrides"], "sample_size": resolution, "in_channels": 4,
                              "out_channels": 4, "norm_num_groups": 16})
    side = resolution // ae.downsample_factor
    assert 8 <= side <= 32 and ae.latent_channels == (8 if ae.downsample_factor == 4 else 16)
    unet = unet_model(side)
    config = MPUNetConfig(**{**unet["model_overrides"], "sample_size": side, "in_channels": ae.latent_channels,
                             "out_channels": ae.latent_channels})
    assert side >> (len(config.block_out_channels) - 1) == 2  # down to 2x2 cells
    assert [side >> i <= 4 for i in range(len(config.attention_levels))] == list(config.attention_levels)


@pytest.mark.parametrize("short_side, adversarial", [(32, False), (64, False), (128, True), (256, True)])
def test_the_gan_trains_at_f8_only_and_the_plan_says_how_to_add_it_at_f4(short_side, adversarial):
    """At f = 4 the PatchGAN held the reconstruction back (emoji64): the plan leaves it out and says so; the rest
    of its recipe stays in the plan, so --adv-weight 0.5 alone gives f = 8's GAN."""
    plan = plan_for_folder(survey(short_side=short_side), "autoencoder")
    steps, said = plan.values["steps"], "\n".join(plan.lines)
    assert plan.values["adv_weight"] == (0.5 if adversarial else 0.0)
    assert (plan.values["adv_start"], plan.values["fm_weight"], plan.values["disc_channels"]) == (steps // 4, 1.0, 32)
    if adversarial:
        assert f"PatchGAN and feature matching from step {steps // 4}" in said
    else:
        assert "no GAN at f = 4" in said and f"--adv-weight 0.5 adds it from step {steps // 4}" in said
        with_gan = load_config(None, None, "autoencoder", {"adv_weight": 0.5}, base=plan.values)
        assert (with_gan.adv_weight, with_gan.adv_start, with_gan.fm_weight) == (0.5, steps // 4, 1.0)


def test_the_bundled_shapes_come_out_at_32_pixels():
    """At CIFAR-10's size the rules give the bundled model's shapes (configs/cifar10-v0.4)."""
    assert autoencoder_model(32)["model_overrides"]["block_out_channels"] == [32, 64, 64]
    assert unet_model(8)["model_overrides"] == {"block_out_channels": [64, 128, 128],
                                                "attention_levels": [False, True, True]}


def test_channels_follow_transparency_and_grayscale():
    assert default_channels(survey(alpha=0.9)) == 4
    assert default_channels(survey(alpha=0.2)) == 3
    assert default_channels(survey(grayscale=1.0)) == 1
    assert default_channels(survey(grayscale=0.99)) == 3


def test_the_survey_counts_classes_sizes_and_transparency(tmp_path):
    icons(tmp_path / "data", n=5, size=(48, 40))
    (tmp_path / "data" / "b" / "extra.png").write_bytes(b"not an image")
    found = survey_folder(tmp_path / "data")
    assert found.images == 11 and found.class_counts == {"a": 5, "b": 6} and found.unreadable == 1
    assert found.short_side == 40 and found.aspect == pytest.approx(1.2) and found.alpha == 1.0
    plan = plan_for_folder(found, "autoencoder")
    assert plan.values["channels"] == 4 and plan.values["resolution"] == 32
    assert "2 classes, from 5 to 6 per class" in "\n".join(plan.lines)
    # 48x40 is off square by 20 %: the folder trains in aspect-ratio buckets, named on the plan's screen
    assert found.non_square == 1.0 and plan.values["buckets"] == ["auto"]
    assert "aspect-ratio buckets 24x40, 32x32, 40x24" in "\n".join(plan.lines)
    assert "buckets" not in plan_for_folder(survey(non_square=0.2), "autoencoder").values
    given = plan_for_folder(found, "autoencoder", resolution=64, channels=3)
    assert given.values["resolution"] == 64 and given.values["channels"] == 3


def test_flags_and_config_files_override_the_data_defaults(tmp_path):
    plan = plan_for_folder(survey(), "autoencoder")
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 7\n")
    config = load_config(str(toml), None, "autoencoder", {"lr": 1e-3}, base=plan.values)
    assert (config.steps, config.lr, config.resolution, config.ssim_weight) == (7, 1e-3, 64, 0.2)


def test_a_config_files_model_overrides_add_to_the_data_defaults_and_another_model_drops_them(tmp_path):
    # A TOML that changes one model field keeps the widths the data chose (it replaced the whole dict: a guide's
    # half widths, a sized run's widths, were lost without a word); a file that names another model starts afresh.
    plan = plan_for_folder(survey(), "autoencoder")
    chosen = plan.values["model_overrides"]
    toml = tmp_path / "run.toml"
    toml.write_text("model_overrides = { dropout = 0.1 }\n")
    config = load_config(str(toml), None, "autoencoder", {}, base=plan.values)
    assert config.model_overrides == {**chosen, "dropout": 0.1}
    same = load_config(str(toml), None, "autoencoder", {"model": plan.values["model"]}, base=plan.values)
    assert same.model_overrides == {**chosen, "dropout": 0.1}  # naming the same model keeps them
    toml.write_text('model = "tiny"\n')
    assert load_config(str(toml), None, "autoencoder", {}, base=plan.values).model_overrides == {}


def test_bf16_autocast_only_where_the_cpu_computes_it_natively(monkeypatch):
    import encdiff.training.sizing as sizing

    monkeypatch.setattr(sizing, "cpu_info", lambda: ("New CPU", frozenset({"amx_bf16"})))
    plan = plan_for_folder(survey(), "autoencoder")
    assert plan.values["bf16"] is True and any("bf16 autocast" in line for line in plan.lines)
    ae = Autoencoder(AutoencoderConfig(**{**autoencoder_model(64)["model_overrides"], "sample_size": 64,
                                          "norm_num_groups": 16}))
    assert plan_for_folder(survey(), "diffusion", ae).values["bf16"] is True
    monkeypatch.setattr(sizing, "cpu_info", lambda: ("Old CPU", frozenset({"avx2"})))
    for plan in (plan_for_folder(survey(), "autoencoder"), plan_for_folder(survey(), "diffusion", ae)):
        assert "bf16" not in plan.values and not any("bf16" in line for line in plan.lines)  # float32 (CUDA: bf16)


def test_the_diffusion_plan_takes_its_shape_from_the_autoencoder(tmp_path):
    ae = Autoencoder(AutoencoderConfig(**{**autoencoder_model(128)["model_overrides"], "sample_size": 128,
                                          "norm_num_groups": 16}))
    plan = plan_for_folder(survey(short_side=999), "diffusion", ae)
    assert plan.values["resolution"] == 128 and plan.values["backbone"] == "edm2"
    assert len(plan.values["model_overrides"]["block_out_channels"]) == 4  # 16x16 latents: 16, 8, 4, 2


def test_an_autoencoder_run_from_init_keeps_its_models_shape_and_takes_the_rest_from_the_rules():
    """A fine-tune (`--init`, e.g. decoder-only) has its model: the plan takes resolution and channels from it and
    names no model, so the run is sized like a fresh one (lr, SSIM, bf16) without a preset the init would refuse."""
    init = Autoencoder(AutoencoderConfig(**{**autoencoder_model(64)["model_overrides"], "sample_size": 64,
                                            "in_channels": 4, "out_channels": 4, "latent_channels": 12,
                                            "norm_num_groups": 16}))
    plan = plan_for_folder(survey(short_side=128, alpha=0.0), "autoencoder", init)
    assert plan.values["resolution"] == 64 and plan.values["channels"] == 4
    assert "model" not in plan.values and "model_overrides" not in plan.values
    assert plan.values["ssim_weight"] == 0.2 and plan.values["adv_weight"] == 0.0  # f = 4: no GAN
    assert any("the init autoencoder's" in line for line in plan.lines)
    assert any("16x16x12 latents" in line for line in plan.lines)  # the init's, not the rule's 8
    config = load_config(None, None, "autoencoder", {"init": "some/folder", "decoder_only": True}, base=plan.values)
    assert (config.resolution, config.channels, config.model) == (64, 4, "")


def test_the_unet_draws_strongly_unbalanced_classes_equally_often_and_a_flag_keeps_the_proportions():
    ae = Autoencoder(AutoencoderConfig(**{**autoencoder_model(64)["model_overrides"], "sample_size": 64,
                                          "norm_num_groups": 16}))
    emoji = survey(class_counts={"activities": 170, "people": 4522, "smileys": 338})
    plan = plan_for_folder(emoji, "diffusion", ae)
    assert plan.values["balance_classes"] is True and any("27x" in line for line in plan.lines)
    assert load_config(None, None, "diffusion", {}, base=plan.values).balance_classes is True
    assert load_config(None, None, "diffusion", {"balance_classes": False}, base=plan.values).balance_classes is False
    # below the ratio, a flat folder, and the autoencoder stage: the data's proportions
    for counts in ({"a": 100, "b": 399}, {}):
        plan = plan_for_folder(survey(class_counts=counts), "diffusion", ae)
        assert "balance_classes" not in plan.values and not any("equally" in line for line in plan.lines)
    assert "balance_classes" not in plan_for_folder(emoji, "autoencoder").values


def test_a_flat_folder_s_plan_names_the_run_s_own_early_state_as_its_guide():
    """An unconditional model has no classifier-free guidance: the plan says how to give it autoguidance, and the
    flag it names trains with the plan's snapshots as it stands."""
    ae = Autoencoder(AutoencoderConfig(**{**autoencoder_model(64)["model_overrides"], "sample_size": 64,
                                          "norm_num_groups": 16}))
    flat = plan_for_folder(survey(), "diffusion", ae)
    assert any("--guide-at 0.375" in line for line in flat.lines)
    assert load_config(None, None, "diffusion", {"guide_at": 0.375}, base=flat.values).guide_at == 0.375
    labelled = plan_for_folder(survey(class_counts={"a": 10, "b": 12}), "diffusion", ae)
    assert not any("--guide-at" in line for line in labelled.lines)


def test_two_commands_with_no_preset_train_on_transparent_icons_and_sample_rgba(tmp_path):
    data = icons(tmp_path / "icons", n=4, size=(32, 32))
    ae = run_encdiff(["train-autoencoder", str(data), "--run-dir", str(tmp_path / "ae"), "--steps", "2",
                      "--batch-size", "4", "--sample-every", "0", "--checkpoint-every", "2"])
    assert "channels 4 (most images are transparent)" in ae.stderr
    # the flags' values are said beside the data's choices they replace
    assert "given instead: steps 2 (the data's: 1000), batch_size 4 (the data's: 64)" in ae.stderr
    assert json.loads((tmp_path / "ae" / "model" / "config.json").read_text())["config"]["in_channels"] == 4
    run_encdiff(["train", str(data), "--autoencoder", str(tmp_path / "ae" / "model"), "--run-dir",
                 str(tmp_path / "ldm"), "--steps", "2", "--batch-size", "4", "--sample-every", "2",
                 "--checkpoint-every", "2", "--sample-steps", "2"])
    assert (tmp_path / "ldm" / "samples-00000002.png").is_file()
    with Image.open(tmp_path / "ldm" / "samples-00000002.png") as grid:
        assert grid.mode == "RGB"  # shown on a checkerboard
    run_encdiff(["sample", str(tmp_path / "ldm" / "model"), "--num", "2", "--class", "a", "--steps", "2",
                 "--out", str(tmp_path / "out.png")])
    with Image.open(tmp_path / "out.png") as image:
        assert image.mode == "RGBA"
