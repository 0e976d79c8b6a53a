"""The metrics mean something: closed forms, torchmetrics cross-checks, constructed point clouds and images,
and on real CIFAR-10 subsets the data floor is low and FID grows with every added blur or noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import extract_cifar_subset, needs_cifar

from encdiff.errors import EncdiffError
from encdiff.evaluate import ReferenceStats, add_noise, compare_features, gaussian_blur, reference_stats, write_report
from encdiff.metrics import (bits_per_dim, discretized_gaussian_log_likelihood, frechet_distance, gaussian_stats, kid,
                             precision_recall, psnr_ssim)


# --- FID / KID on constructed features ----------------------------------------------------------------
def test_frechet_distance_closed_form_and_torchmetrics():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-12)
    # full covariances against torchmetrics' implementation
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 16, generator=g), torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g) * 0.3
    (m1, s1), (m2, s2) = gaussian_stats(x), gaussian_stats(y + 0.5)
    ours = frechet_distance(m1, s1, m2, s2)
    theirs = float(fid_module._compute_fid(m1, s1, m2, s2))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fid_and_kid_of_a_set_against_itself_are_zero():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(600, 32, generator=g)
    mu, sigma = gaussian_stats(features)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9
    # KID's estimator is unbiased for independent sets: two draws of one distribution score 0 within noise
    other = torch.randn(600, 32, generator=g)
    mean, std = kid(features, other, subsets=20, subset_size=200)
    assert abs(mean) < 2 * std
    # a set against itself: its random subsets overlap (a shared point adds k(x, x) to the cross term
    # only), so the estimate sits slightly below 0, far below any real difference
    shifted = kid(features, other + 0.3, subsets=20, subset_size=200)[0]
    assert abs(kid(features, features, subsets=20, subset_size=200)[0]) < 0.1 * shifted


def test_kid_matches_torchmetrics_unbiased_estimate():
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(150, 8, generator=g), torch.randn(150, 8, generator=g) + 0.3
    mean, std = kid(x, y, subsets=1, subset_size=150)
    assert std == 0.0
    assert mean == pytest.approx(float(kid_module.poly_mmd(x.double(), y.double())), rel=1e-9)
    assert mean > 0


# --- precision / recall on point clouds --------------------------------------------------------------
def test_precision_recall_point_clouds():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(800, 4, generator=g)
    subset = real[torch.randperm(800, generator=g)[:200]]
    precision, recall = precision_recall(real, subset)
    assert precision == 1.0  # every sample is a real point
    assert recall > 0.8  # a random quarter still spans the manifold (its k-NN balls are wider)
    half = real[real[:, 0] < 0]  # a model that misses half the data
    precision, recall = precision_recall(real, half)
    assert precision == 1.0 and 0.4 < recall < 0.75
    fresh = torch.randn(800, 4, generator=g)
    precision, recall = precision_recall(real, fresh)
    assert precision > 0.8 and recall > 0.8  # same distribution
    far = fresh + 10.0
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(50, 1) + 1e-3 * torch.randn(50, 4, generator=g)  # mode collapse
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05
    with pytest.raises(EncdiffError, match="needs more than 3 images per set"):
        precision_recall(real, real[:3])


def test_too_few_images_names_the_minimum():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(100, 64, generator=g)
    mu, sigma = gaussian_stats(features)
    reference = ReferenceStats(features, mu, sigma, "key", "ref-folder", 32)
    with pytest.raises(EncdiffError, match=r"my-samples: 50 images, too few for FID .* at least 65"):
        compare_features(reference, features[:50], where="my-samples")


# --- PSNR / SSIM on constructed images ----------------------------------------------------------------
def test_psnr_ssim_hand_computed():
    pytest.importorskip("torchmetrics")
    target = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    shifted = target + 10
    psnr, ssim = psnr_ssim(shifted, target)
    assert psnr == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-12)  # MSE 100
    c1 = (0.01 * 255) ** 2  # constant images: zero variance, SSIM is its luminance term only
    assert ssim == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-9)
    g = torch.Generator().manual_seed(5)
    noisy_target = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    assert psnr_ssim(noisy_target, noisy_target)[1] == pytest.approx(1.0)
    # a perfect image counts as one value one level off (3,072 values: 83.0 dB), so a mean over images stays finite
    assert psnr_ssim(noisy_target, noisy_target)[0] == pytest.approx(10 * math.log10(255**2 * 3072))
    one_off = noisy_target.clone()
    one_off[0, 0, 0, 0] ^= 1
    assert psnr_ssim(one_off[:1], noisy_target[:1])[0] == pytest.approx(10 * math.log10(255**2 * 3072))
    assert psnr_ssim(torch.cat([one_off[:1], shifted[1:]]), torch.cat([noisy_target[:1], target[1:]]))[0] == \
        pytest.approx((10 * math.log10(255**2 * 3072) + 10 * math.log10(255**2 / 100)) / 2)
    peak = pytest.importorskip("torchmetrics.functional.image").peak_signal_noise_ratio
    flipped = 255 - noisy_target
    mse = ((flipped.double() - noisy_target.double()) ** 2).flatten(1).mean(1)
    assert psnr_ssim(flipped, noisy_target)[0] == pytest.approx(float((10 * torch.log10(255**2 / mse)).mean()))
    # any imperfect image: torchmetrics' PSNR
    assert psnr_ssim(flipped, noisy_target)[0] == pytest.approx(float(peak(
        flipped.double(), noisy_target.double(), data_range=255.0, reduction="none", dim=(1, 2, 3)).mean()))
    # chunked (so 10k images fit in memory) is the same per-image mean as all at once
    many = torch.randint(0, 256, (7, 3, 32, 32), generator=g, dtype=torch.uint8)
    others = torch.randint(0, 256, (7, 3, 32, 32), generator=g, dtype=torch.uint8)
    whole, chunked = psnr_ssim(many, others, chunk=7), psnr_ssim(many, others, chunk=3)
    assert chunked == pytest.approx(whole, rel=1e-12)


# --- likelihood: the variational bound on Gaussian data against its exact value -----------------------
class GaussianEps(torch.nn.Module):
    """The exact eps-prediction E[eps | x_t] for data x0 ~ N(0, s^2 I)."""

    def __init__(self, alpha_bars: torch.Tensor, s: float):
        super().__init__()
        self.ab, self.s2 = alpha_bars.double(), s * s
        self.config = None

    def forward(self, xt, t, class_labels=None):
        ab = self.ab[t.round().long()].view(-1, *[1] * (xt.ndim - 1))
        return (1 - ab).sqrt() * xt / (ab * self.s2 + 1 - ab)


def test_bits_per_dim_gaussian_matches_exact_value():
    from encdiff.denoiser import VPDenoiser
    from encdiff.schedules import get_alpha_bars

    s, T = 0.25, 200
    ab = torch.as_tensor(get_alpha_bars("linear", num_train_timesteps=T), dtype=torch.float64)
    denoiser = VPDenoiser(GaussianEps(ab, s), ab)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(1500, 1, 2, 2, generator=g, dtype=torch.float64) * s
    got = bits_per_dim(denoiser, x0, clip_denoised=False)

    # exact expectations, per dimension, in nats (Gaussian KLs; x0 - E[x0 | x_t] has variance v_t)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta = 1 - ab / ab_prev
    post = beta * (1 - ab_prev) / (1 - ab)
    v = s * s * (1 - ab) / (ab * s * s + 1 - ab)
    coef = beta * ab_prev.sqrt() / (1 - ab)
    model_var = torch.cat([post[1:2], post[1:]])
    kl = 0.5 * (-1 + model_var.log() - post.log() + post / model_var + coef**2 * v / model_var)
    prior = 0.5 * (-1 - (1 - ab[-1]).log() + (1 - ab[-1]) + ab[-1] * s * s)
    # L_0: x0 - mean ~ N(0, v_0); expectation of the discretised likelihood by Gauss-Hermite quadrature
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    u = torch.tensor(nodes) * v[0].sqrt()
    log_p = discretized_gaussian_log_likelihood(torch.zeros_like(u), -u, 0.5 * model_var[0].log().expand_as(u))
    decoder = -(torch.tensor(weights) * log_p).sum() / math.sqrt(2 * math.pi)
    ln2 = math.log(2)
    assert got["prior_bpd"] == pytest.approx(float(prior / ln2), rel=0.02)
    assert got["diffusion_bpd"] == pytest.approx(float(kl[1:].sum() / ln2), rel=0.02)
    assert got["decoder_bpd"] == pytest.approx(float(decoder / ln2), abs=0.02)
    exact = float((prior + kl[1:].sum() + decoder) / ln2)
    assert abs(got["bits_per_dim"] - exact) < 4 * got["bits_per_dim_std_err"]
    # a Monte Carlo subset of timesteps estimates the same bound
    sampled = bits_per_dim(denoiser, x0[:500], timesteps=60, clip_denoised=False)
    assert sampled["diffusion_bpd"] == pytest.approx(float(kl[1:].sum() / ln2), rel=0.1)


# --- reports ------------------------------------------------------------------------------------------
def test_report_has_metrics_and_settings(tmp_path):
    result = {"fid": 1.5, "class_accuracy": {"cat": 0.5}, "settings": {"sampler": "ddim", "steps": 10}}
    json_path, md_path = write_report(result, tmp_path, "eval")
    assert json.loads(json_path.read_text()) == result
    text = md_path.read_text()
    assert "| fid | 1.5000 |" in text and "| class_accuracy: cat | 0.5000 |" in text and "| sampler | ddim |" in text


def test_cached_reference_statistics_follow_the_feature_nets_config(tmp_path):
    from dataclasses import replace

    from encdiff.featurenet import FeatureNet, FeatureNetConfig

    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(widths=(4, 8, 8, 16))).eval()
    mirrorless = FeatureNet(replace(net.config, flip_average=False)).eval()
    mirrorless.load_state_dict(net.state_dict())  # same weights, different features
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    first = reference_stats(images, net, cache_dir=tmp_path)
    second = reference_stats(images, mirrorless, cache_dir=tmp_path)
    assert first.key != second.key and len(list(tmp_path.glob("reference-*.safetensors"))) == 2
    assert not torch.allclose(first.features, second.features)


# --- real data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from encdiff.data import ImageDataset

    root = tmp_path_factory.mktemp("cifar")
    extract_cifar_subset(root / "train", 600, "train", seed=0)
    extract_cifar_subset(root / "test", 600, "test", seed=1)
    return (ImageDataset(root / "train", 32, workers=0, progress=False),
            ImageDataset(root / "test", 32, workers=0, progress=False), root)


@needs_cifar
def test_cifar_floor_and_monotone_degradation(cifar, tmp_path):
    from encdiff.evaluate import evaluate_images

    train, test, _ = cifar
    reference = reference_stats(train.images, cache_dir=tmp_path, source="cifar train subset")
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 1
    assert reference_stats(train.images, cache_dir=tmp_path).key == reference.key  # read back from the cache
    metrics = lambda images: evaluate_images(images, reference, kid_subsets=10, kid_subset_size=300)  # noqa: E731
    floor, itself = metrics(test.images), metrics(train.images)
    blurred = [metrics(gaussian_blur(test.images, s)) for s in (0.5, 1.0, 1.5)]
    noised = [metrics(add_noise(test.images, s)) for s in (8, 16, 32)]
    fids = [floor["fid"]] + [r["fid"] for r in blurred], [floor["fid"]] + [r["fid"] for r in noised]
    # more degradation, higher FID; the real-data floor (biased upwards at this small N) lies below the mildest
    # degradation and well below the next
    assert fids[0] == sorted(fids[0]) and fids[1] == sorted(fids[1]), fids
    assert floor["fid"] < 0.5 * min(blurred[1]["fid"], noised[1]["fid"]), fids
    assert floor["precision"] > 0.6 and floor["recall"] > 0.6
    # a set against itself: FID 0, every point on the manifold, KID ~0 (only the overlap of its random
    # subsets moves it, far less than any real difference)
    assert itself["fid"] < 1e-6 and itself["precision"] == itself["recall"] == 1.0
    assert abs(itself["kid_mean"]) < 0.1 * blurred[1]["kid_mean"]


@needs_cifar
def test_feature_net_classifies_the_cifar_test_subset(cifar):
    from encdiff.featurenet import FeatureNet, accuracy

    _, test, _ = cifar
    assert accuracy(FeatureNet.load(), test.images, test.labels) > 0.85


# --- encdiff eval -------------------------------------------------------------------------------------
CLASSES = ["airplane", "cat", "ship"]


def write_folder(folder, n, size=32, seed=0, classes=None):
    from encdiff.images import save_png

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        save_png(images[i], sub / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("ref") / "ref", 270, classes=CLASSES)


def test_eval_generator_writes_every_metric_and_setting(tmp_path, reference_folder):
    from encdiff import UNet, UNetConfig, cli
    from encdiff.pipeline import DenoiserSpec, Generator

    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), attention_levels=(False, False), layers_per_block=1,
                           norm_num_groups=4, sample_size=32, num_classes=3))
    Generator(unet, DenoiserSpec(kind="vp"), class_names=CLASSES).save_pretrained(tmp_path / "gen")
    out = tmp_path / "eval"
    assert cli.main(["eval", str(tmp_path / "gen"), "--reference", str(reference_folder), "--workers", "0", "--num", "260",
                     "--steps", "2", "--sampler", "ddim", "--batch-size", "130", "--kid-subsets", "5",
                     "--bpd", "--bpd-images", "4", "--bpd-timesteps", "3", "--classes", "cat,ship",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "bits_per_dim"):
        assert isinstance(result[key], float), key
    assert set(result["class_accuracy"]) == {"cat", "ship"}
    settings = result["settings"]
    assert (settings["num_samples"], settings["sampler"], settings["steps"], settings["seed"]) == (260, "ddim", 2, 0)
    assert settings["classes"] == ["cat", "ship"] and settings["reference_images"] == 270
    # the reference holds 90 images of each class: drawn in its proportions, the two requested classes come out even
    assert settings["class_mix"] == "reference" and settings["samples_per_class"] == {"cat": 130, "ship": 130}
    assert list((tmp_path / "cache").glob("reference-*.safetensors"))
    assert "| sampler | ddim |" in (out / "metrics.md").read_text()


def test_eval_of_an_rgba_pixel_generator_reads_the_reference_with_its_alpha(tmp_path):
    # FID's reference is read as RGB (transparency on white); bits/dim scores the images the model was trained on,
    # so an RGBA model reads them with their alpha (it stopped on a 3-channel batch before), and the alpha coverage
    # of the samples is set beside the reference's.
    from PIL import Image

    from encdiff import UNet, UNetConfig, cli
    from encdiff.pipeline import DenoiserSpec, Generator

    rng = np.random.default_rng(0)
    reference = tmp_path / "rgba"
    reference.mkdir()
    alphas = []
    for i in range(260):
        pixels = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
        pixels[:, :8, 3] = 0 if i % 2 else 255  # flat halves, so every share is far from the others
        alphas.append(pixels[..., 3])
        Image.fromarray(pixels, "RGBA").save(reference / f"{i:04d}.png")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, block_out_channels=(8, 16), attention_levels=(False, False),
                           layers_per_block=1, norm_num_groups=4, sample_size=16))
    Generator(unet, DenoiserSpec(kind="vp")).save_pretrained(tmp_path / "gen")
    out = tmp_path / "eval"
    assert cli.main(["eval", str(tmp_path / "gen"), "--reference", str(reference), "--workers", "0", "--num", "260",
                     "--steps", "2", "--sampler", "ddim", "--batch-size", "130", "--kid-subsets", "5", "--bpd",
                     "--bpd-images", "4", "--bpd-timesteps", "3", "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(result["fid"]) and result["bits_per_dim"] > 0
    alpha = np.stack(alphas)
    assert result["reference_alpha_coverage"] == pytest.approx(
        {"transparent": (alpha == 0).mean(), "partial": ((alpha > 0) & (alpha < 255)).mean(),
         "opaque": (alpha == 255).mean()})
    assert sum(result["alpha_coverage"].values()) == pytest.approx(1.0)
    assert "| alpha_coverage: partial |" in (out / "metrics.md").read_text()


def test_alpha_coverage_counts_transparent_partial_and_opaque_pixels():
    from encdiff.evaluate import alpha_coverage

    alpha = torch.tensor([[0, 0, 1, 128], [254, 255, 255, 255]], dtype=torch.uint8)
    assert alpha_coverage(alpha) == {"transparent": 0.25, "partial": 0.375, "opaque": 0.375}


def test_eval_image_folder_and_its_mistakes(tmp_path, reference_folder, capsys):
    from encdiff import cli

    samples = write_folder(tmp_path / "samples", 260, seed=1)
    assert cli.main(["eval", str(samples), "--reference", str(reference_folder), "--workers", "0", "--kid-subsets", "3",
                     "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["num_samples"] == 260
    capsys.readouterr()

    few = write_folder(tmp_path / "few", 40, seed=2)
    assert cli.main(["eval", str(few), "--reference", str(reference_folder), "--workers", "0"]) == 2
    assert "40 images, too few for FID" in capsys.readouterr().err

    big = write_folder(tmp_path / "big", 260, size=64, seed=3)
    assert cli.main(["eval", str(big), "--reference", str(reference_folder), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "mismatched image sizes" in err and "32x32" in err and "--resolution 64" in err

    mixed = write_folder(tmp_path / "mixed", 5, size=48, seed=4)
    write_folder(mixed, 3, size=32, seed=5)  # overwrites 3 of the 48x48 files with 32x32 ones
    assert cli.main(["eval", str(mixed), "--reference", str(reference_folder), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "samples of 32x32 (3 files" in err and "48x48 (2 files" in err and "one aspect ratio at two sizes" in err


def test_eval_refuses_models_that_are_not_generators(tmp_path, reference_folder, capsys):
    from encdiff import UNet, UNetConfig, cli

    UNet(UNetConfig(block_out_channels=(8, 16), attention_levels=(False, False), layers_per_block=1,
                    norm_num_groups=4, sample_size=32)).save_pretrained(tmp_path / "unet")
    assert cli.main(["eval", str(tmp_path / "unet"), "--reference", str(reference_folder), "--workers", "0"]) == 2
    assert "a UNet model folder is not a generator" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cli.main(["eval", str(tmp_path / "run"), "--reference", str(reference_folder), "--workers", "0"]) == 2
    assert "a training run folder, not a generator" in capsys.readouterr().err


def test_eval_autoencoder(tmp_path, reference_folder):
    pytest.importorskip("torchmetrics")
    from conftest import TINY_AE

    from encdiff import Autoencoder, cli

    torch.manual_seed(0)
    Autoencoder(TINY_AE).save_pretrained(tmp_path / "ae")
    assert cli.main(["eval", str(tmp_path / "ae"), "--reference", str(reference_folder), "--workers", "0", "--num", "260",
                     "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["psnr"] > 0 and -1 <= result["ssim"] <= 1 and result["rfid"] > 0
    assert result["settings"]["num_images"] == 260


def test_an_rgba_autoencoder_reports_colour_and_alpha_apart():
    import dataclasses

    from encdiff.autoencoder import Autoencoder
    from encdiff.evaluate import evaluate_autoencoder
    from encdiff.presets import AUTOENCODERS

    ae = Autoencoder(dataclasses.replace(AUTOENCODERS["tiny"], in_channels=4, out_channels=4))
    images = torch.randint(0, 256, (6, 4, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    result = evaluate_autoencoder(ae, images)
    assert {"psnr_colour", "ssim_colour", "psnr_alpha", "ssim_alpha"} <= set(result) and result["rfid"] is None
    assert result["psnr_alpha"] != result["psnr_colour"]


def test_the_alpha_error_is_split_between_edges_and_flat_regions():
    from encdiff.evaluate import alpha_edges

    alpha = torch.tensor([[[0, 255, 128, 64]]], dtype=torch.uint8)  # two flat pixels, two edge pixels
    got = torch.tensor([[[0, 255, 118, 64]]], dtype=torch.uint8)  # all the error on one edge pixel
    split = alpha_edges(got, alpha)
    assert split["alpha_edge_pixels"] == 0.5 and split["alpha_edge_error_share"] == 1.0
    assert split["psnr_alpha_edges_pooled"] == pytest.approx(10 * math.log10(255 ** 2 / 50))
    assert split["psnr_alpha_flat_pooled"] == pytest.approx(10 * math.log10(255 ** 2 * 2))  # perfect: finite
    flat = alpha_edges(torch.full((1, 2, 2), 3, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.uint8))
    assert flat["psnr_alpha_edges_pooled"] is None and flat["alpha_edge_error_share"] == 0.0


def test_eval_of_an_rgba_autoencoder_reads_the_folder_with_its_alpha(tmp_path):
    """`encdiff eval AUTOENCODER --reference FOLDER` on transparent PNGs: the images are read with the
    autoencoder's 4 channels (they were read as RGB, and the autoencoder refused them)."""
    import dataclasses

    from PIL import Image

    from encdiff import cli
    from encdiff.autoencoder import Autoencoder
    from encdiff.presets import AUTOENCODERS

    folder = tmp_path / "icons"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
        pixels[:8, :, 3] = 0  # a transparent half
        Image.fromarray(pixels, "RGBA").save(folder / f"{i}.png")
    Autoencoder(dataclasses.replace(AUTOENCODERS["tiny"], in_channels=4, out_channels=4)).save_pretrained(tmp_path / "ae")
    assert cli.main(["eval", str(tmp_path / "ae"), "--reference", str(folder), "--workers", "0",
                     "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"psnr_colour", "psnr_alpha"} <= set(result) and result["settings"]["num_images"] == 5
    assert 0 < result["alpha_edge_pixels"] < 1 and result["psnr_alpha_edges_pooled"] > 0


# --- which classes a class-conditional generator is evaluated with --------------------------------------
def test_class_labels_cycle_when_even_and_interleave_in_proportion():
    from encdiff.evaluate import class_labels

    # equal weights: the plain cycle, so a balanced reference (CIFAR-10's test split) keeps every published number
    assert class_labels(7, [2, 0, 1]).tolist() == [2, 0, 1, 2, 0, 1, 2]
    assert class_labels(6, [0, 1, 2], [5, 5, 5]).tolist() == [0, 1, 2, 0, 1, 2]
    labels = class_labels(100, [0, 1, 2], [60, 30, 10])
    assert torch.bincount(labels).tolist() == [60, 30, 10]
    for i in range(1, 101):  # every prefix is within one image per class of its share: no class waits for the end
        counts = torch.bincount(labels[:i], minlength=3).double()
        assert (counts - i * torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)).abs().max() < 1
    assert class_labels(9, [0, 1], [0, 4]).tolist() == [1] * 9  # a class the reference lacks is never drawn


def _stats(class_counts=None):
    from encdiff.evaluate import ReferenceStats

    return ReferenceStats(torch.zeros(4, 2), torch.zeros(2, dtype=torch.float64),
                          torch.eye(2, dtype=torch.float64), "k", "ref/", 32, class_counts)


def test_class_mix_follows_the_reference_where_it_knows_the_classes():
    from encdiff.errors import EncdiffError
    from encdiff.evaluate import class_weights

    names = ["cat", "dog", "fox"]
    counts = {"cat": 10, "dog": 30, "fox": 0, "owl": 5}
    assert class_weights(None, names, [0, 1], _stats(counts)) == ("reference", [10, 30])
    assert class_weights("even", names, [0, 1], _stats(counts)) == ("even", None)
    assert class_weights(None, names, [0, 1], _stats()) == ("even", None)  # a flat folder or an old statistics file
    assert class_weights(None, names, [0, 1], _stats({"owl": 5})) == ("even", None)  # other classes: no proportions
    with pytest.raises(EncdiffError, match=r"--class-mix reference: the reference ref/ has no images of class dog"):
        class_weights("reference", names, [0, 1], _stats({"cat": 3}))
    with pytest.raises(EncdiffError, match=r"no images of the requested classes fox"):
        class_weights("reference", names, [2], _stats(counts))
    with pytest.raises(EncdiffError, match=r"--class-mix 'most'"):
        class_weights("most", names, [0], _stats(counts))


def test_reference_statistics_keep_their_class_counts(tmp_path):
    from encdiff.evaluate import ReferenceStats, reference_stats

    stats = _stats({"cat": 3, "dog": 1})
    assert ReferenceStats.load(stats.save(tmp_path / "r.safetensors")).class_counts == {"cat": 3, "dog": 1}
    assert ReferenceStats.load(_stats().save(tmp_path / "n.safetensors")).class_counts is None
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = reference_stats(images, cache_dir=tmp_path)
    assert first.class_counts is None
    again = reference_stats(images, cache_dir=tmp_path, class_counts={"a": 12})  # the cached features, labelled now
    assert again.key == first.key and again.class_counts == {"a": 12}
    assert reference_stats(images, cache_dir=tmp_path).class_counts == {"a": 12}


def test_reference_statistics_of_several_shapes_record_them_and_one_shape_keeps_its_cache_key(tmp_path):
    import hashlib

    from encdiff.evaluate import default_feature_net, feature_net_identity, images_identity

    g = torch.Generator().manual_seed(1)
    square, tall = (torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
                    for n, h, w in ((6, 32, 32), (4, 40, 24)))
    net = default_feature_net()
    # one tensor hashes as before parts existed: reference caches written by earlier versions are found again
    one = reference_stats(square, net)
    assert one.key == hashlib.sha256((feature_net_identity(net) + images_identity(square)).encode()).hexdigest()
    assert one.shape_counts is None and one.resolution == 32
    assert reference_stats([square], net).key == one.key
    both = reference_stats([square, tall], net, cache_dir=tmp_path, resolution=32)
    assert both.shape_counts == {"32x32": 6, "24x40": 4} and both.resolution == 32 and len(both.features) == 10
    torch.testing.assert_close(both.features[6:], net.features(tall.float() / 127.5 - 1).float())
    loaded, = (ReferenceStats.load(f) for f in tmp_path.glob("reference-*.safetensors"))
    assert loaded.shape_counts == both.shape_counts and loaded.key == both.key != one.key
    with pytest.raises(ValueError, match="several shapes need the square `resolution`"):
        reference_stats([square, tall], net)
    # a folder all in one non-square bucket is sampled at that shape; a list of squares is the tensor it always was
    assert reference_stats([tall], net, resolution=32).shape_counts == {"24x40": 4}
    assert reference_stats([square], net, resolution=32).shape_counts is None


def test_interleave_draws_shapes_and_classes_in_proportion_with_every_prefix_close():
    from encdiff.evaluate import interleave

    picks = interleave(260, [150, 60, 60])
    assert torch.bincount(picks).tolist() == [144, 58, 58]
    assert interleave(5, [1, 1]).tolist() == [0, 1, 0, 1, 0] and interleave(3, [0, 2]).tolist() == [1, 1, 1]


def test_eval_of_a_labelled_image_folder_reports_its_class_accuracy(tmp_path, reference_folder):
    # real images the feature net did not train on give the rate a generator's class accuracy is read against
    from encdiff import cli
    from encdiff.data import ImageDataset
    from encdiff.evaluate import class_accuracy
    from encdiff.featurenet import FeatureNet

    labelled = tmp_path / "labelled"
    for name, n in (("airplane", 200), ("ship", 60), ("rock", 20)):  # rock: a class the CIFAR-10 net lacks
        write_folder(labelled / name, n, seed=len(name))
    common = ["--reference", str(reference_folder), "--workers", "0", "--kid-subsets", "2"]
    assert cli.main(["eval", str(labelled), *common, "--out", str(tmp_path / "unknown")]) == 0
    result = json.loads((tmp_path / "unknown" / "metrics.json").read_text())
    assert "class_accuracy" not in result  # the net cannot say what a rock is: no figure rather than a wrong one
    assert result["settings"]["images_per_class"] == {"airplane": 200, "rock": 20, "ship": 60}

    for f in (labelled / "rock").iterdir():
        f.rename(labelled / "ship" / f"rock-{f.name}")
    (labelled / "rock").rmdir()
    assert cli.main(["eval", str(labelled), *common, "--out", str(tmp_path / "known")]) == 0
    result = json.loads((tmp_path / "known" / "metrics.json").read_text())
    data = ImageDataset(labelled, 32, workers=0, progress=False)
    net = FeatureNet.load()
    expected = class_accuracy(net, data.images, torch.tensor([net.config.class_names.index(data.class_names[c])
                                                              for c in data.labels.tolist()]), net.config.class_names)
    assert result["class_accuracy"] == {"airplane": expected["airplane"], "ship": expected["ship"]}
    assert result["class_accuracy_mean"] == pytest.approx((expected["airplane"] + expected["ship"]) / 2)
    assert result["settings"]["images_per_class"] == {"airplane": 200, "ship": 80}

    flat = write_folder(tmp_path / "flat", 260, seed=9)
    assert cli.main(["eval", str(flat), *common, "--out", str(tmp_path / "flat-eval")]) == 0
    result = json.loads((tmp_path / "flat-eval" / "metrics.json").read_text())
    assert "class_accuracy" not in result and result["settings"]["images_per_class"] is None


@needs_cifar
def test_held_out_real_images_are_recognised_per_class(cifar, tmp_path):
    # the folder's class indices are not the net's (bird/cat/dog/ship/truck are 0-4 in the folder, 2/3/5/8/9 in the
    # net): matched by name, real test images score the net's accuracy, where a mix-up would score about chance
    from encdiff import cli

    _, _, root = cifar
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("bird", "cat", "dog", "ship", "truck"):
        (subset / name).symlink_to(root / "test" / name)
    assert cli.main(["eval", str(subset), "--reference", str(root / "train"), "--workers", "0", "--kid-subsets", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    accuracy = json.loads((tmp_path / "eval" / "metrics.json").read_text())["class_accuracy"]
    assert set(accuracy) == {"bird", "cat", "dog", "ship", "truck"} and min(accuracy.values()) > 0.6, accuracy


def test_eval_draws_an_unbalanced_reference_in_its_proportions(tmp_path, capsys):
    from encdiff import UNet, UNetConfig, cli
    from encdiff.autoencoder import Autoencoder
    from encdiff.pipeline import DenoiserSpec, Generator
    from encdiff.presets import AUTOENCODERS

    ref = tmp_path / "ref"
    for name, n in (("airplane", 60), ("cat", 240), ("ship", 30)):  # FID needs 257 images or more
        write_folder(ref / name, n, seed=len(name))
    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), attention_levels=(False, False), layers_per_block=1,
                           norm_num_groups=4, sample_size=32, num_classes=3))
    Generator(unet, DenoiserSpec(kind="vp"), class_names=CLASSES).save_pretrained(tmp_path / "gen")
    common = ["eval", str(tmp_path / "gen"), "--reference", str(ref), "--workers", "0", "--num", "330", "--steps", "1",
              "--sampler", "ddim", "--batch-size", "110", "--kid-subsets", "2"]
    assert cli.main([*common, "--out", str(tmp_path / "data")]) == 0
    settings = json.loads((tmp_path / "data" / "metrics.json").read_text())["settings"]
    assert settings["class_mix"] == "reference"
    assert settings["samples_per_class"] == {"airplane": 60, "cat": 240, "ship": 30}
    assert "| samples_per_class | airplane 60, cat 240, ship 30 |" in (tmp_path / "data" / "metrics.md").read_text()
    assert cli.main([*common, "--class-mix", "even", "--out", str(tmp_path / "even")]) == 0
    settings = json.loads((tmp_path / "even" / "metrics.json").read_text())["settings"]
    assert settings["class_mix"] == "even" and set(settings["samples_per_class"].values()) == {110}
    # the flag means nothing for an autoencoder: said, not ignored
    Autoencoder(AUTOENCODERS["tiny"]).save_pretrained(tmp_path / "ae")
    assert cli.main(["eval", str(tmp_path / "ae"), "--reference", str(ref), "--class-mix", "even",
                     "--out", str(tmp_path / "ae-eval")]) == 2
    assert "--class-mix: " in capsys.readouterr().err and not (tmp_path / "ae-eval").exists()
