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
