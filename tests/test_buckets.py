"""Aspect-ratio buckets: the shape rule, assignment and merging, a folder decoded per bucket (and cached), batches
drawn within one bucket on every rank with exact resume, U-Nets on any latent shape, and both stages trained on a
non-square folder to a generator that draws at every trained size, in the library and the CLI alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from encdiff import EncdiffError
from encdiff.backbones import backbone_class
from encdiff.buckets import assign_buckets, bucket_shapes, format_shape, parse_shape, resolve_buckets
from encdiff.data import BatchSampler, ImageDataset
from encdiff.images import load_image
from encdiff.pipeline import Generator
from encdiff.presets import MP_UNETS, UNETS
from encdiff.training import TrainConfig, train_autoencoder, train_diffusion

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = dict(model="tiny", resolution=16, batch_size=4, log_every=2, sample_every=0, workers=0, warmup_steps=2,
              buckets=("auto",))


def test_the_rule_gives_shapes_of_about_the_square_s_area_within_aspect_two():
    shapes = bucket_shapes(64, 8)
    assert [format_shape(s) for s in shapes] == ["48x80", "56x72", "64x64", "72x56", "80x48"]
    for height, width in shapes:
        assert height * width <= 64 * 64 and height % 8 == 0 and width % 8 == 0 and 0.5 <= width / height <= 2
    assert (256, 256) in bucket_shapes(256, 16) and len(bucket_shapes(32, 8)) == 3
    # "auto" uses twice the autoencoder's factor (latents with even sides); explicit shapes are checked against it
    assert resolve_buckets(("auto",), 64, 4) == shapes and resolve_buckets((), 64, 4) is None
    assert resolve_buckets(("80x48", "64x64"), 64, 4) == [(48, 80), (64, 64)]
    with pytest.raises(EncdiffError, match="bucket 66x64: .*multiples of .* factor 4"):
        resolve_buckets(("66x64",), 64, 4)
    with pytest.raises(EncdiffError, match="--size '64': expected WIDTHxHEIGHT"):
        parse_shape("64", "--size")
    with pytest.raises(EncdiffError, match="'buckets'"):
        TrainConfig(buckets=("auto", "64x64"))


def test_images_go_to_the_nearest_aspect_and_small_buckets_merge_into_neighbours():
    shapes = [(80, 48), (64, 64), (48, 80)]  # tall, square, wide
    sizes = [(300, 500)] + [(200, 200)] * 5 + [(500, 300)] * 3 + [(210, 200)]
    used, chosen = assign_buckets(sizes, shapes)
    assert used == shapes and chosen == [0] + [1] * 5 + [2] * 3 + [1]
    # a bucket of fewer images than a batch would never be drawn: its image joins the nearest bucket left
    used, chosen = assign_buckets(sizes, shapes, min_images=2)
    assert used == [(64, 64), (48, 80)] and chosen == [0] * 6 + [1] * 3 + [0]


def non_square_folder(root: Path) -> Path:
    """Two classes of tall, square and wide noisy colour images (a tiny model can learn them)."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((220, 40, 40), (40, 40, 220))):
        (root / f"class{c}").mkdir(parents=True)
        for i, (width, height) in enumerate([(30, 50)] * 4 + [(24, 24)] * 6 + [(50, 30)] * 4):
            pixels = np.clip(rng.normal(colour, 30, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return non_square_folder(tmp_path_factory.mktemp("non-square"))


def test_a_folder_decodes_into_buckets_each_image_resized_to_cover_its_bucket(folder, tmp_path):
    shapes = [(20, 12), (16, 16), (12, 20)]
    data = ImageDataset(folder, 16, workers=0, progress=False, buckets=shapes, cache_dir=tmp_path)
    assert data.bucketed and data.shapes == shapes and [len(p) for p in data.parts] == [8, 12, 8]
    assert [tuple(p.shape[2:]) for p in data.parts] == shapes and len(data) == 28
    tall = data.bucket_indices(0)
    x, labels = data.batch(tall[:3])
    assert x.shape == (3, 3, 20, 12) and labels.tolist() == [0, 0, 0]
    files = sorted((folder / "class0").iterdir())
    assert torch.equal(data.parts[0][0], torch.from_numpy(load_image(files[0], 16, shape=(20, 12))))
    with pytest.raises(EncdiffError, match="a batch mixes aspect-ratio buckets \\(12x20, 16x16\\)"):
        data.batch(torch.tensor([int(tall[0]), int(data.bucket_indices(1)[0])]))
    with pytest.raises(EncdiffError, match="3 shapes .* read them by bucket"):
        data.images
    # cached per bucket, keyed by its shape: a second read maps the same images; a square set is another cache
    again = ImageDataset(folder, 16, workers=0, progress=False, buckets=shapes, cache_dir=tmp_path)
    assert again.content_key == data.content_key and again.key == data.key
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    square = ImageDataset(folder, 16, workers=0, progress=False, cache_dir=tmp_path)
    assert square.shapes == [(16, 16)] and len(square) == 28 and square.content_key != data.content_key


def test_batches_hold_one_bucket_on_every_rank_and_resume_exactly():
    groups = torch.tensor([0] * 40 + [1] * 25 + [2] * 15)
    ranks = [BatchSampler(80, 4, seed=5, rank=r, world_size=2, groups=groups) for r in range(2)]
    seen = []
    for _ in range(ranks[0].batches_per_epoch):
        a, b = (next(s) for s in ranks)
        assert len(set(groups[torch.cat([a, b])].tolist())) == 1  # the same bucket on both ranks
        seen += a.tolist() + b.tolist()
    assert len(seen) == len(set(seen))  # an epoch draws every index at most once
    assert sorted(set(groups[seen].tolist())) == [0, 1, 2]
    whole = BatchSampler(80, 4, seed=5, groups=groups)
    expected = [next(whole) for _ in range(30)]
    first = BatchSampler(80, 4, seed=5, groups=groups)
    for _ in range(13):
        next(first)
    resumed = BatchSampler(80, 4, seed=5, groups=groups)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(e, next(resumed)) for e in expected[13:])
    with pytest.raises(EncdiffError, match="in any one aspect-ratio bucket"):
        BatchSampler(12, 8, seed=0, groups=torch.tensor([0] * 6 + [1] * 6))


@pytest.mark.parametrize("backbone, table", [("unet", UNETS), ("edm2", MP_UNETS)])
def test_u_nets_take_latents_of_any_shape(backbone, table):
    net = backbone_class(backbone)(table["tiny"]).eval()
    x = torch.randn(2, table["tiny"].in_channels, 5, 7)
    with torch.no_grad():
        out = net(x, torch.tensor([0.3, 0.3]), torch.tensor([0, 1]) if table["tiny"].num_classes else None)
    assert out.shape == x.shape and torch.isfinite(out).all()


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "encdiff", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_both_stages_train_on_buckets_and_the_generator_draws_at_every_trained_size(folder, tmp_path):
    ae = train_autoencoder(TrainConfig(data=str(folder), run_dir=str(tmp_path / "ae"), steps=4,
                                       checkpoint_every=4, **COMMON))
    base = dict(data=str(folder), autoencoder=str(ae), checkpoint_every=2, keep_last=10, **COMMON)
    out = train_diffusion(TrainConfig(run_dir=str(tmp_path / "ldm"), steps=4, **base))
    generator = Generator.from_pretrained(out)
    assert generator.sizes == [(20, 12), (16, 16), (12, 20)]
    assert json.loads((out / "generator.json").read_text())["sizes"] == ["12x20", "16x16", "20x12"]
    wide = generator.images([0, 1], torch.tensor([0, 1]), steps=2, size=(12, 20))
    assert wide.shape == (2, 3, 12, 20) and wide.dtype == torch.uint8
    assert generator.images([0], torch.tensor([0]), steps=2).shape == (1, 3, 16, 16)  # the square by default
    with pytest.raises(EncdiffError, match="size 24x24: this generator was trained at 12x20, 16x16, 20x12"):
        generator.images([0], torch.tensor([0]), steps=2, size=(24, 24))
    # per-bucket latents, encoded once
    cache = list((tmp_path / "ldm" / "cache").glob("latents-*.safetensors"))
    assert len(cache) == 1 and sorted(load_file(str(cache[0]))) == ["latents.12x20", "latents.16x16", "latents.20x12"]
    # resumed from step 2, the run equals the uninterrupted one bit for bit
    train_diffusion(TrainConfig(run_dir=str(tmp_path / "resumed"), steps=2, **base))
    train_diffusion(TrainConfig(run_dir=str(tmp_path / "resumed"), steps=4, **base))
    a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-00000004" / "state.safetensors"))
            for run in ("ldm", "resumed"))
    keys = [k for k in a if k.startswith(("model.", "ema.", "optimizer."))]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    # the CLI draws the library's images at a trained size, and refuses another in one line
    done = cli("sample", str(out), "--num", "2", "--class", "class1", "--steps", "2", "--size", "12x20",
               "--out", str(tmp_path / "wide.png"))
    assert done.returncode == 0, done.stderr
    grid = np.array(Image.open(tmp_path / "wide.png"))
    assert torch.equal(torch.from_numpy(grid[:20, :12]).permute(2, 0, 1),
                       generator.images([0], torch.tensor([1]), steps=2, size=(20, 12))[0])
    refused = cli("sample", str(out), "--size", "30x30", "--out", str(tmp_path / "no.png"))
    assert refused.returncode != 0 and "size 30x30: this generator was trained at" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "no.png").exists()
    info = cli("info", str(out))
    assert "sizes (width x height): 12x20, 16x16, 20x12" in info.stdout
    # a guide for it trains at the same sizes (autoguidance evaluates both at every step)
    from encdiff.training.guide import guide_defaults

    assert guide_defaults(out)["buckets"] == ["12x20", "16x16", "20x12"]
    # so does a student distilled from it, and at the teacher's resolution, unless told otherwise
    planned = cli("distill", str(out), str(folder), "--run-dir", str(tmp_path / "student"), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["buckets"] == ["12x20", "16x16", "20x12"] and plan["resolution"] == 16
    square = json.loads(cli("distill", str(out), str(folder), "--run-dir", str(tmp_path / "student"),
                            "--buckets", "none", "--dry-run").stdout)
    assert square["buckets"] == []


def test_a_generator_trained_on_buckets_is_evaluated_at_every_shape_in_the_data_s_proportions(tmp_path):
    """In training (eval_every) and in `encdiff eval`, a bucketed generator is sampled at each of its shapes, as
    many as the reference holds of each (interleaved), against the reference read in the same buckets; with
    --resolution the reference is read as squares and the generator draws its square."""
    rng = np.random.default_rng(4)
    data = tmp_path / "data"
    for c in range(2):  # 270 images: the statistics need at least 257
        (data / f"c{c}").mkdir(parents=True)
        for i, (width, height) in enumerate([(30, 50)] * 75 + [(24, 24)] * 30 + [(50, 30)] * 30):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / f"c{c}" / f"{i:03d}.png")
    config = TrainConfig(data=str(data), run_dir=str(tmp_path / "run"), steps=2, checkpoint_every=2,
                         eval_every=2, eval_samples=260, **{**COMMON, "sample_steps": 2})
    out = train_diffusion(config)
    shapes = {"12x20": 150, "16x16": 60, "20x12": 60}  # (width x height) tall, square, wide
    assert Generator.from_pretrained(out).sizes == [(20, 12), (16, 16), (12, 20)]
    row, = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "fid" in line]
    assert row["step"] == 2 and np.isfinite(row["fid"]) and 0 <= row["precision"] <= 1
    from encdiff.evaluate import ReferenceStats
    stats, = (ReferenceStats.load(f) for f in (tmp_path / "run" / "cache").glob("reference-*.safetensors"))
    assert stats.shape_counts == shapes and stats.resolution == 16 and len(stats.features) == 270
    best = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert best["settings"]["samples_per_shape"] == {"12x20": 144, "16x16": 58, "20x12": 58}  # 260 in 150:60:60
    # the command: the reference folder read in the generator's buckets, the same shares
    done = cli("eval", str(out), "--reference", str(data), "--num", "260", "--steps", "2",
               "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["settings"]["samples_per_shape"] == best["settings"]["samples_per_shape"]
    assert report["fid"] == pytest.approx(best["fid"], rel=1e-6)  # the same images, seeds and statistics
    square = cli("eval", str(out), "--reference", str(data), "--num", "260", "--steps", "2", "--resolution", "16",
                 "--out", str(tmp_path / "square"))
    assert square.returncode == 0, square.stderr
    assert "samples_per_shape" not in json.loads((tmp_path / "square" / "metrics.json").read_text())["settings"]
    # a reference of a shape the generator never trained at is refused, naming it
    from encdiff.evaluate import evaluate_generator
    odd = ReferenceStats(stats.features, stats.mu, stats.sigma, stats.key, "odd", 16, None, {"24x8": 270})
    with pytest.raises(EncdiffError, match="holds 24x8 images, a shape the generator was not trained at"):
        evaluate_generator(Generator.from_pretrained(out), odd, 260, steps=2)
    # A folder of samples of several shapes is read at its own shapes and the reference in them; here the samples are
    # the reference's own images as training read them, so the two sets are one: FID ~ 0.
    bucketed = ImageDataset(data, 16, workers=0, progress=False, buckets=[(20, 12), (16, 16), (12, 20)])
    samples = tmp_path / "samples"
    for i in range(len(bucketed)):
        image = bucketed.parts[int(bucketed.bucket_of[i])][int(bucketed.row[i])]
        (samples / f"c{int(bucketed.labels[i])}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(samples / f"c{int(bucketed.labels[i])}" / f"{i:03d}.png")
    done = cli("eval", str(samples), "--reference", str(data), "--out", str(tmp_path / "folder"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "folder" / "metrics.json").read_text())
    assert report["settings"]["samples_per_shape"] == shapes and report["settings"]["num_samples"] == 270
    assert report["fid"] < 1e-2 and report["settings"]["images_per_class"] == {"c0": 135, "c1": 135}
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(samples / "c0" / "big.png")  # 16x16 and 32x32: one ratio
    refused = cli("eval", str(samples), "--reference", str(data), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "one aspect ratio at two sizes" in refused.stderr, refused.stderr


def test_an_autoencoder_is_evaluated_on_a_non_square_folder_in_its_buckets(folder, tmp_path):
    """`encdiff eval AE --reference FOLDER` of a folder of several sizes reads it as training does (`--buckets auto` at
    the autoencoder's size) instead of refusing it: PSNR/SSIM are means over every image, the report says the shapes;
    --resolution still reads squares."""
    ae = train_autoencoder(TrainConfig(data=str(folder), run_dir=str(tmp_path / "ae"), steps=2, checkpoint_every=2,
                                       **COMMON))
    done = cli("eval", str(ae), "--reference", str(folder), "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["settings"]["images_per_shape"] == {"12x20": 8, "16x16": 12, "20x12": 8}
    assert report["settings"]["num_images"] == 28 and report["rfid"] is None  # too few images for FID
    from encdiff.autoencoder import Autoencoder
    from encdiff.evaluate import evaluate_autoencoder, reconstruct
    from encdiff.metrics import psnr_ssim

    model = Autoencoder.from_pretrained(ae).eval()
    data = ImageDataset(folder, 16, workers=0, progress=False, buckets=[(20, 12), (16, 16), (12, 20)])
    per_part = [psnr_ssim(reconstruct(model, part), part)[0] for part in data.parts]
    expected = sum(p * len(part) for p, part in zip(per_part, data.parts)) / 28
    assert report["psnr"] == pytest.approx(expected, rel=1e-6)
    assert evaluate_autoencoder(model, data.parts)["psnr"] == pytest.approx(expected, rel=1e-6)
    square = cli("eval", str(ae), "--reference", str(folder), "--resolution", "16", "--out", str(tmp_path / "sq"))
    assert square.returncode == 0, square.stderr
    assert "images_per_shape" not in json.loads((tmp_path / "sq" / "metrics.json").read_text())["settings"]
    # its light decoder trains on the same buckets (and at its size), unless told otherwise
    planned = cli("train-light-decoder", str(folder), "--autoencoder", str(ae), "--run-dir", str(tmp_path / "light"),
                  "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert (json.loads(planned.stdout)["buckets"], json.loads(planned.stdout)["resolution"]) == (["auto"], 16)
    squares = cli("train-light-decoder", str(folder), "--autoencoder", str(ae), "--run-dir", str(tmp_path / "light"),
                  "--dry-run", "--buckets", "none")
    assert json.loads(squares.stdout)["buckets"] == []
