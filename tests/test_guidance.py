"""Guidance in a limited interval (Kynkaenniemi et al. 2024): a full interval is plain classifier-free guidance bit for
bit, an empty one is no guidance, and outside it every step costs one network evaluation, as counted."""

from __future__ import annotations

import json

import pytest
import torch

from encdiff import EncdiffError
from encdiff.pipeline import Sampling

from test_editing import images, tiny_generator


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_ancestral"])
def test_an_interval_covering_every_level_is_plain_guidance_and_an_empty_one_none(sampler):
    generator = tiny_generator()
    labels = torch.tensor([0, 1, 2])
    plain = generator.images([3, 4, 5], labels, sampler=sampler, steps=6, guidance_scale=2.5)
    full = generator.images([3, 4, 5], labels, sampler=sampler, steps=6, guidance_scale=2.5,
                            guidance_interval=(0.0, 1e9))
    assert torch.equal(plain, full)
    unguided = generator.images([3, 4, 5], labels, sampler=sampler, steps=6, guidance_scale=1.0)
    for empty in ((0.0, 0.0), (200.0, 300.0)):
        assert torch.equal(generator.images([3, 4, 5], labels, sampler=sampler, steps=6, guidance_scale=2.5,
                                            guidance_interval=empty), unguided)
    partial = generator.images([3, 4, 5], labels, sampler=sampler, steps=6, guidance_scale=2.5,
                               guidance_interval=(0.5, 10.0))
    assert not torch.equal(partial, plain) and not torch.equal(partial, unguided)


def test_steps_outside_the_interval_cost_one_evaluation():
    generator = tiny_generator()
    settings = generator.sampling.but(steps=10, guidance_scale=2.0)
    grid = settings.grid(generator.denoiser)[:-1]
    lo, hi = 0.3, 5.0
    inside = int(((grid > lo) & (grid <= hi)).sum())
    assert 0 < inside < 10
    generator.denoiser.evaluations = 0
    generator.images([0, 1], torch.tensor([0, 1]), settings.but(guidance_interval=(lo, hi)))
    assert generator.denoiser.evaluations == 2 * (2 * inside + (10 - inside))
    generator.denoiser.evaluations = 0
    generator.images([0, 1], torch.tensor([0, 1]), settings)
    assert generator.denoiser.evaluations == 2 * 20


def test_the_interval_is_stored_validated_and_applied_by_editing(tmp_path):
    generator = tiny_generator()
    generator.sampling = generator.sampling.but(steps=6, guidance_scale=2.0, guidance_interval=(0.5, 10.0))
    folder = generator.save_pretrained(tmp_path / "gen")
    assert json.loads((folder / "generator.json").read_text())["sampling"]["guidance_interval"] == [0.5, 10.0]
    from encdiff.pipeline import Generator
    from encdiff import editing

    loaded = Generator.from_pretrained(folder)
    assert loaded.sampling.guidance_interval == (0.5, 10.0)
    labels = torch.tensor([1, 2])
    assert torch.equal(editing.img2img(loaded, images(2), [7, 8], labels, strength=1.0), loaded.images([7, 8], labels))
    for bad in ((1.0,), (3.0, 1.0), (-1.0, 2.0), (0.0, float("nan"))):
        with pytest.raises(EncdiffError, match="sampling.guidance_interval"):
            Sampling(guidance_interval=bad)


def test_the_cli_and_the_server_take_the_interval(tmp_path, capsys):
    from encdiff.cli import main

    generator = tiny_generator()
    generator.sampling = generator.sampling.but(steps=4, guidance_scale=2.0)
    folder = generator.save_pretrained(tmp_path / "gen")
    assert main(["sample", str(folder), "--class", "b", "--num", "2", "--guidance-interval", "0.5", "10",
                 "--out", str(tmp_path / "a.png")]) == 0
    from PIL import Image
    import numpy as np

    made = np.asarray(Image.open(tmp_path / "a.png"))
    expected = generator.images([0, 1], torch.tensor([1, 1]), guidance_interval=(0.5, 10.0))
    from encdiff.images import image_grid

    assert np.array_equal(made, image_grid(expected, rows=1).permute(1, 2, 0).numpy())
    capsys.readouterr()
    assert main(["sample", str(folder), "--guidance-interval", "5", "1", "--out", str(tmp_path / "b.png")]) == 2
    assert "sampling.guidance_interval" in capsys.readouterr().err


def test_set_sampling_changes_the_stored_defaults_only_and_refuses_what_the_model_cannot_do(tmp_path, capsys):
    from encdiff.cli import main
    from encdiff.pipeline import Generator

    generator = tiny_generator()
    generator.sampling = generator.sampling.but(steps=4, guidance_scale=2.0)
    folder = generator.save_pretrained(tmp_path / "gen", dtype=torch.float16)
    weights = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.safetensors")}
    assert main(["set-sampling", str(folder), "--guidance", "3", "--guidance-interval", "0.5", "10"]) == 0
    assert "guidance_scale 2.0 -> 3.0" in capsys.readouterr().out
    # the weights are untouched (still float16, byte for byte); the images are those of the same flags
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.safetensors")} == weights
    stored, original = Generator.from_pretrained(folder), Generator.from_pretrained(tmp_path / "gen")
    assert stored.sampling == Sampling(steps=4, guidance_scale=3.0, guidance_interval=(0.5, 10.0))
    labels = torch.tensor([0, 2])
    assert torch.equal(stored.images([3, 4], labels),
                       original.images([3, 4], labels, sampling=Sampling(steps=4, guidance_scale=2.0),
                                       guidance_scale=3.0, guidance_interval=(0.5, 10.0)))
    assert main(["set-sampling", str(folder), "--no-guidance-interval", "--out", str(tmp_path / "everywhere")]) == 0
    assert Generator.from_pretrained(tmp_path / "everywhere").sampling.guidance_interval is None
    # what the generator cannot do is refused, naming the folder, and the folder keeps its settings
    before = (folder / "generator.json").read_bytes()
    for flags, message in ((["--guidance-kind", "auto"], "no guide model"),
                           (["--decoder", "light"], "no light decoder"),
                           (["--sigmas", "2", "3"], "strictly decreasing"), (["--steps", "0"], "sampling.steps"),
                           (["--guidance-interval", "1", "2", "--no-guidance-interval"], "give one of them")):
        capsys.readouterr()
        assert main(["set-sampling", str(folder), *flags]) == 2
        assert message in capsys.readouterr().err
        assert (folder / "generator.json").read_bytes() == before
    # an unconditional model refuses a classifier-free scale it would otherwise drop at every call
    unconditional = guided_pair(conditional=False)[0].save_pretrained(tmp_path / "unconditional")
    capsys.readouterr()
    assert main(["set-sampling", str(unconditional), "--guidance", "2"]) == 2
    assert "unconditional model has no classifier-free guidance" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- autoguidance
def guided_pair(conditional: bool = True):
    """A generator with a guide: a second tiny U-Net of the same shape and labels, other random weights."""
    import dataclasses

    from encdiff.unet import UNet
    from conftest import randomize_

    generator = tiny_generator()
    if not conditional:
        from encdiff.pipeline import Generator

        unet = UNet(dataclasses.replace(generator.unet.config, num_classes=0, null_class=False))
        randomize_(unet, seed=1)
        generator = Generator(unet, generator.spec, generator.autoencoder)
    guide = randomize_(UNet(generator.unet.config), seed=5)
    return generator, generator.with_guide(guide, {"images": 1000})


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_autoguidance_with_the_model_as_its_own_guide_is_no_guidance(sampler):
    generator, _ = guided_pair()
    itself = generator.with_guide(generator.unet)
    labels = torch.tensor([0, 2])
    unguided = generator.images([3, 4], labels, sampler=sampler, steps=5, guidance_scale=1.0)
    assert torch.equal(itself.images([3, 4], labels, sampler=sampler, steps=5, guidance_scale=2.5,
                                     guidance_kind="auto"), unguided)


def test_autoguidance_guides_an_unconditional_model_counts_both_networks_and_takes_the_interval():
    generator, guided = guided_pair(conditional=False)
    plain = guided.images([1, 2], None, steps=6, guidance_scale=1.0)
    auto = guided.images([1, 2], None, steps=6, guidance_scale=2.0, guidance_kind="auto")
    assert not torch.equal(auto, plain)
    assert torch.equal(guided.images([1, 2], None, steps=6, guidance_scale=2.0, guidance_kind="auto",
                                     guidance_interval=(0.0, 0.0)), plain)
    guided.reset_evaluations()
    guided.images([1, 2], None, steps=6, guidance_scale=2.0, guidance_kind="auto")
    assert guided.denoiser.evaluations == 12 and guided.guide_denoiser.evaluations == 12 and guided.evaluations == 24
    with pytest.raises(EncdiffError, match="unconditional model has no classifier-free guidance; its guide"):
        guided.images([1], None, steps=2, guidance_scale=2.0)
    with pytest.raises(EncdiffError, match="no guide model .*encdiff train-guide"):
        generator.images([1], None, steps=2, guidance_scale=2.0, guidance_kind="auto")


def test_a_guide_is_stored_in_the_generator_folder_validated_and_used_by_the_cli_and_editing(tmp_path, capsys):
    from encdiff import editing
    from encdiff.cli import main
    from encdiff.pipeline import Generator

    _, guided = guided_pair()
    guided.sampling = guided.sampling.but(steps=4, guidance_scale=2.0, guidance_kind="auto")
    folder = guided.save_pretrained(tmp_path / "gen")
    info = json.loads((folder / "generator.json").read_text())
    assert info["guide"] == {"images": 1000} and info["sampling"]["guidance_kind"] == "auto"
    loaded = Generator.from_pretrained(folder)
    labels = torch.tensor([1, 1])
    expected = guided.images([0, 1], labels)
    assert torch.equal(loaded.images([0, 1], labels), expected)
    assert torch.equal(editing.img2img(loaded, images(2), [0, 1], labels, strength=1.0), expected)
    assert main(["sample", str(folder), "--class", "b", "--num", "2", "--out", str(tmp_path / "a.png")]) == 0
    from PIL import Image
    import numpy as np
    from encdiff.images import image_grid

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")),
                          image_grid(expected, rows=1).permute(1, 2, 0).numpy())
    cfg = guided.images([0, 1], labels, guidance_kind="classifier-free")
    assert main(["sample", str(folder), "--class", "b", "--num", "2", "--guidance-kind", "classifier-free",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), image_grid(cfg, rows=1).permute(1, 2, 0).numpy())
    import shutil

    shutil.rmtree(folder / "guide")
    with pytest.raises(EncdiffError, match="entry 'guide' without a guide/ folder"):
        Generator.from_pretrained(folder)


def test_a_guide_of_other_labels_or_shape_is_refused():
    import dataclasses

    from encdiff.unet import UNet

    generator, _ = guided_pair()
    other = UNet(dataclasses.replace(generator.unet.config, num_classes=5))
    with pytest.raises(EncdiffError, match="guide's num_classes = 5 differs"):
        generator.with_guide(other)


def test_train_guide_trains_a_smaller_model_of_the_generators_data_into_its_folder(tmp_path):
    from conftest import colour_classes, run_encdiff
    from encdiff.pipeline import Generator

    data = colour_classes(tmp_path / "data", per_class=4, size=16)
    common = ["--model", "tiny", "--steps", "2", "--batch-size", "4", "--sample-every", "0", "--checkpoint-every", "2",
              "--resolution", "16"]
    run_encdiff(["train-autoencoder", str(data), "--run-dir", str(tmp_path / "ae"), *common])
    run_encdiff(["train", str(data), "--autoencoder", str(tmp_path / "ae" / "model"), "--run-dir",
                 str(tmp_path / "ldm"), *common])
    folder = tmp_path / "ldm" / "model"
    dry = run_encdiff(["train-guide", str(folder), str(data), "--dry-run"])
    planned = json.loads(dry.stdout)
    assert planned["steps"] == 2000 and planned["autoencoder"] == str(folder / "autoencoder")
    run_encdiff(["train-guide", str(folder), str(data), "--run-dir", str(tmp_path / "guide"), "--steps", "2",
                 "--batch-size", "4", "--sample-every", "0", "--checkpoint-every", "2"])
    generator = Generator.from_pretrained(folder)
    assert generator.guide is not None and generator.guide_info["steps"] == 2 and generator.guide_info["images"] == 8
    labels = torch.tensor([0, 1])

    def final_latents(**guidance):
        # the latents, not the pixels: after two training steps the two nets differ by less than one uint8 level
        seen = []
        generator.images([0, 1], labels, steps=3, callback=lambda i, sigma, x, denoised: seen.append(x), **guidance)
        return seen[-1]

    auto = final_latents(guidance_scale=2.0, guidance_kind="auto")
    assert not torch.equal(auto, final_latents(guidance_scale=1.0))
    run_encdiff(["sample", str(folder), "--guidance-kind", "auto", "--guidance", "2", "--num", "2", "--steps", "3",
                 "--class", "class0", "--out", str(tmp_path / "auto.png")])


def test_a_guide_from_the_runs_own_early_step_is_exported_and_set_and_a_foreign_one_refused(tmp_path, capsys):
    """Autoguidance's shorter-trained degradation without a second run: `export --at-step` gives the run as it stood at
    an earlier step (a kept checkpoint's EMA, or a post-hoc EMA from the snapshots up to then) and `set-guide` puts its
    U-Net into the generator; a generator of another latent space is refused, naming the folder."""
    from conftest import colour_classes
    from encdiff.cli import main
    from encdiff.phema import reconstruct
    from encdiff.pipeline import Generator

    data = colour_classes(tmp_path / "data", per_class=4, size=16)
    common = ["--model", "tiny", "--batch-size", "4", "--sample-every", "0", "--resolution", "16"]
    for run in ("ae", "ae2"):
        assert main(["train-autoencoder", str(data), "--run-dir", str(tmp_path / run), "--steps", "2",
                     "--seed", str(len(run)), *common]) == 0
    assert main(["train", str(data), "--autoencoder", str(tmp_path / "ae" / "model"), "--run-dir", str(tmp_path / "ldm"),
                 "--steps", "4", "--checkpoint-every", "2", "--keep-last", "1", "--phema-every", "1",
                 "--phema-sigma-rels", "0.05", "0.1", *common]) == 0
    run, main_folder = tmp_path / "ldm", tmp_path / "ldm" / "model"
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "x"), "--at-step", "2"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 2 (kept: 4)" in err and "--sigma-rel" in err and not (tmp_path / "x").exists()
    assert main(["export", str(run), str(tmp_path / "x"), "--at-step", "7", "--sigma-rel", "0.1"]) == 2
    assert "no post-hoc EMA snapshot at it (the nearest: 4, 3, 2)" in capsys.readouterr().err

    assert main(["export", str(run), str(tmp_path / "x"), "--at-fraction", "0.5"]) == 2
    assert "give --sigma-rel too" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", str(run), str(tmp_path / "x"), "--at-fraction", "2", "--sigma-rel", "0.1"]) == 2
    assert "snapshot fraction '2': expected a number in (0, 1]" in capsys.readouterr().err
    # snapshots at steps 1-4 (4 images each): half the run is step 2, the same export as --at-step 2 below
    assert main(["export", str(run), str(tmp_path / "half"), "--at-fraction", "0.5", "--sigma-rel", "0.1"]) == 0
    assert "at step 2 to" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "early"), "--at-step", "2", "--sigma-rel", "0.1"]) == 0
    assert ((tmp_path / "half" / "unet" / "model.safetensors").read_bytes()
            == (tmp_path / "early" / "unet" / "model.safetensors").read_bytes())
    state, record = reconstruct(run, 0.1, images=8)  # step 2 of 4 images
    early = Generator.from_pretrained(tmp_path / "early")
    assert record["images"] == 8 and all(torch.equal(early.unet.state_dict()[k], v) for k, v in state.items())
    final = Generator.from_pretrained(main_folder)
    assert not torch.equal(early.unet.state_dict()["conv_in.weight"], final.unet.state_dict()["conv_in.weight"])

    assert main(["set-guide", str(main_folder), str(tmp_path / "early"), "--out", str(tmp_path / "guided")]) == 0
    guided = Generator.from_pretrained(tmp_path / "guided")
    assert guided.guide_info["from"] == str((tmp_path / "early").resolve())
    assert all(torch.equal(guided.guide.state_dict()[k], v) for k, v in early.unet.state_dict().items())
    labels = torch.tensor([0, 1])

    def final_latents(generator, **guidance):
        # the latents, not the pixels: after a few training steps the two nets differ by less than one uint8 level
        seen = []
        generator.images([0, 1], labels, steps=3, callback=lambda i, sigma, x, denoised: seen.append(x), **guidance)
        return seen[-1]

    # guided by the early model itself, the early model's sampling is unchanged; guided away from it, the main one moves
    assert torch.equal(final_latents(early.with_guide(early.unet), guidance_scale=2.0, guidance_kind="auto"),
                       final_latents(early, guidance_scale=1.0))
    assert not torch.equal(final_latents(guided, guidance_scale=2.0, guidance_kind="auto"),
                           final_latents(guided, guidance_scale=1.0))

    # --guide-float16: the guide alone at half the bytes, kept so when the folder is rewritten
    from encdiff.pipeline import stored_dtype
    from safetensors import safe_open

    def guide_dtype(folder):
        with safe_open(str(next((folder / "guide").glob("*.safetensors"))), framework="pt") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype

    assert main(["set-guide", str(main_folder), str(tmp_path / "early"), "--out", str(tmp_path / "half"),
                 "--guide-float16"]) == 0
    assert guide_dtype(tmp_path / "half") == torch.float16 and stored_dtype(tmp_path / "half") is None
    assert main(["set-sampling", str(tmp_path / "half"), "--steps", "5"]) == 0
    assert guide_dtype(tmp_path / "half") == torch.float16 and guide_dtype(tmp_path / "guided") == torch.float32
    half = Generator.from_pretrained(tmp_path / "half")
    assert all(torch.equal(half.guide.state_dict()[k], v.half().float()) for k, v in early.unet.state_dict().items())

    assert main(["train", str(data), "--autoencoder", str(tmp_path / "ae2" / "model"), "--run-dir",
                 str(tmp_path / "other"), "--steps", "1", *common]) == 0
    capsys.readouterr()
    assert main(["set-guide", str(main_folder), str(tmp_path / "other" / "model")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "other" / "model") in err and "encodes otherwise" in err
    assert Generator.from_pretrained(main_folder).guide is None  # nothing written


def test_guide_at_gives_a_run_its_own_early_state_as_guide_in_one_command(tmp_path, capsys):
    """`train --guide-at F` (with post-hoc EMA snapshots): the model folder holds the run's own post-hoc EMA (sigma_rel
    0.05) at F of the way as its guide, in float16, exactly what `export --at-fraction F --sigma-rel 0.05` and
    `set-guide --guide-float16` give; an unconditional model then samples with autoguidance 5 in (0.5, 10] x
    sigma_data, a class-conditional one keeps classifier-free guidance and offers the guide."""
    import shutil

    from conftest import colour_classes
    from encdiff.cli import main
    from encdiff.pipeline import Generator

    labelled = colour_classes(tmp_path / "data", per_class=4, size=16)
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in labelled.rglob("*.png"):
        shutil.copy(image, flat / f"{image.parent.name}-{image.name}")
    common = ["--model", "tiny", "--batch-size", "4", "--sample-every", "0", "--resolution", "16"]
    assert main(["train-autoencoder", str(labelled), "--run-dir", str(tmp_path / "ae"), "--steps", "2", *common]) == 0
    ae = str(tmp_path / "ae" / "model")
    capsys.readouterr()
    assert main(["train", str(flat), "--autoencoder", ae, "--run-dir", str(tmp_path / "x"), "--guide-at", "0.5",
                 *common]) == 2
    assert "'guide_at' = 0.5" in capsys.readouterr().err and not (tmp_path / "x").exists()
    run = ["--steps", "4", "--phema-every", "1", "--guide-at", "0.5", *common]
    assert main(["train", str(flat), "--autoencoder", ae, "--run-dir", str(tmp_path / "u"), *run]) == 0
    model = Generator.from_pretrained(tmp_path / "u" / "model")
    assert (model.sampling.guidance_kind, model.sampling.guidance_scale) == ("auto", 5.0)
    # the interval measured on unit-variance latents, in units of the model's sigma_data (here the default 0.5)
    assert model.spec.sigma_data == 0.5 and tuple(model.sampling.guidance_interval) == (0.25, 5.0)
    assert model.guide_info["weights"] == "float16" and "at step 2 (0.5 of the run)" in model.guide_info["from"]
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "early"), "--at-fraction", "0.5", "--sigma-rel",
                 "0.05"]) == 0
    early = Generator.from_pretrained(tmp_path / "early")
    assert all(torch.equal(model.guide.state_dict()[k], v.half().float()) for k, v in early.unet.state_dict().items())
    assert model.images([0], steps=3).shape == (1, 3, 16, 16)  # samples with its guide by default

    assert main(["train", str(labelled), "--autoencoder", ae, "--run-dir", str(tmp_path / "c"), *run]) == 0
    conditional = Generator.from_pretrained(tmp_path / "c" / "model")
    assert conditional.guide is not None and conditional.sampling.guidance_kind == "classifier-free"
    assert "auto" in conditional.guidance_kinds


def test_set_guide_refuses_a_model_of_another_space_or_denoiser():
    """A pixel-space model cannot guide a latent one (nor the reverse), nor one that denoises otherwise."""
    import dataclasses

    from encdiff.cli.model_commands import check_same_latents

    latent, pixel = tiny_generator(), tiny_generator(latent=False)
    check_same_latents(latent, tiny_generator())  # the same autoencoder: accepted
    check_same_latents(pixel, tiny_generator(latent=False))
    for a, b in ((latent, pixel), (pixel, latent)):
        with pytest.raises(EncdiffError, match="one is a pixel-space model"):
            check_same_latents(a, b)
    other = tiny_generator()
    other.spec = dataclasses.replace(other.spec, sigma_data=0.5)
    with pytest.raises(EncdiffError, match="a guide must denoise the same way"):
        check_same_latents(latent, other)


def test_each_guidance_kind_is_offered_where_the_model_can_give_it():
    generator, guided = guided_pair()
    _, unconditional = guided_pair(conditional=False)
    assert guided.guidance_kinds == ["classifier-free", "auto"]
    assert generator.guidance_kinds == ["classifier-free"] and unconditional.guidance_kinds == ["auto"]
