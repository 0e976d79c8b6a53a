"""What a careless or hostile user does: link loops in the data, absurd numbers, a run inside its own data, data
that changed under a run, damaged caches and configs, two runs in one folder, NaN weights. Each case gets a clear
one-line refusal (or a warning and the right result), never a traceback, a hang or a silently wrong result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encdiff import Autoencoder, EncdiffError
from encdiff.data import ImageDataset, scan_folder
from encdiff.pipeline import Generator
from encdiff.training import TrainConfig, train_autoencoder, train_diffusion
from encdiff.training.loop import RunLock

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = dict(model="tiny", resolution=16, batch_size=8, log_every=2, sample_every=0, workers=0, warmup_steps=2)


def make_folder(root: Path, classes: int = 2, per_class: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "encdiff", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "error" in lines[0] and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_symlink_loop_is_read_once_and_said(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "c0" / "loop").symlink_to(data / "c0", target_is_directory=True)
    (data / "c1" / "up").symlink_to(data, target_is_directory=True)
    (data / "alias").symlink_to(data / "c1", target_is_directory=True)  # the same class twice
    (data / "c0" / "gone.png").symlink_to(data / "c0" / "nowhere.png")  # dangling
    (data / "c1" / "self.png").symlink_to(data / "c1" / "self.png")  # a link to itself
    with pytest.warns(UserWarning, match="not read as data") as record:
        files, labels, names = scan_folder(data)
    assert len(files) == 12 and names == ["c0", "c1"]
    assert "gone.png" in str(record[0].message) and "self.png" in str(record[0].message)


@pytest.mark.parametrize("field, value", [
    ("grad_clip", -1.0), ("grad_clip", float("nan")), ("lr", float("inf")), ("kl_weight", -1e-6),
    ("warmup_steps", -5), ("sample_every", -1), ("sample_steps", 0), ("eval_samples", 100), ("seed", 2**64),
    ("ema_halflife_images", 0.0), ("label_dropout", 1.0), ("betas", (0.9, 1.5)), ("resolution", 10**6),
    ("denoiser", "ddpm"), ("noise_level", "uniform?"), ("workers", -1), ("steps", True), ("noise_candidates", 0),
    ("noise_candidates", 65), ("guide_at", 1.0),
])
def test_every_numeric_option_is_range_checked_up_front(field, value):
    with pytest.raises(EncdiffError, match=f"'{field}'"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("args, message", [
    (["train", ".", "--pixel", "--model", "tiny", "--grad-clip", "-1"], "'grad_clip' = -1"),
    (["train", ".", "--pixel", "--model", "tiny", "--grad-clip", "nan"], "not a finite number"),
    (["train", ".", "--pixel", "--model", "tiny", "--sample-steps", "0"], "'sample_steps' = 0"),
    (["sample", "--guidance", "nan"], "not a finite number"),
    (["sample", "--guidance", "-2"], "sampling.guidance_scale"),
    (["sample", "--seed", str(2**70)], "--seed"),
    (["sample", "--num", "20000"], "--out-dir"),
    (["sample", "--out", "dir/"], "ending in .png"),
    (["sample", "--out", "grid.jpg"], "ending in .png"),
    (["eval", "x", "--num", "0"], "--num 0"),
    (["eval", "x", "--kid-subsets", "0"], "--kid-subsets 0"),
    (["reconstruct", "x", "y", "--resolution", "100000"], "--resolution 100000"),
])
def test_bad_values_exit_2_with_one_line_before_any_work(tmp_path, args, message):
    (tmp_path / "dir").mkdir()
    one_line_error(cli(*args, cwd=tmp_path), message)


def test_an_output_path_under_a_regular_file_is_refused_before_sampling(tmp_path):
    (tmp_path / "file").write_text("x")
    started = time.monotonic()
    one_line_error(cli("sample", "--out", "file/grid.png", cwd=tmp_path), "is not a folder")
    one_line_error(cli("sample", "--out-dir", "file", cwd=tmp_path), "is a file")
    assert time.monotonic() - started < 60


def test_sample_in_batches_equals_one_batch_and_streams_out_dir(tmp_path):
    one = cli("sample", "--num", "7", "--steps", "3", "--out-dir", "one", "--batch-size", "7", cwd=tmp_path)
    small = cli("sample", "--num", "7", "--steps", "3", "--out-dir", "small", "--batch-size", "3", cwd=tmp_path)
    assert one.returncode == 0 and small.returncode == 0, one.stderr + small.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 7 and not (tmp_path / "samples.png").exists()  # --out-dir alone: no grid
    # Each image depends on its own seed only; the batch size changes only float rounding inside the convolutions
    # (oneDNN picks other kernels for other batch sizes), so a pixel may move by one level, rarely.
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for d in ("one", "small"))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.002, name


def test_a_run_folder_inside_the_data_is_never_read_as_data(tmp_path):
    data = make_folder(tmp_path / "data")
    config = TrainConfig(data=str(data), run_dir=str(data / "run"), steps=2, checkpoint_every=1,
                         **{**COMMON, "sample_every": 1})
    train_autoencoder(config)
    assert list((data / "run").glob("reconstructions-*.png"))  # PNGs now lie inside the data folder
    with pytest.warns(UserWarning, match="not read as data"):
        dataset = ImageDataset(data, 16, workers=0, progress=False, exclude=(data / "run",))
    assert len(dataset) == 12 and dataset.class_names == ["c0", "c1"]
    train_autoencoder(TrainConfig(**{**config.__dict__, "steps": 4}))  # resumes: same data, same fingerprint


def test_resume_refuses_changed_data_showing_both_and_continues_only_when_asked(tmp_path):
    data = make_folder(tmp_path / "data")
    base = dict(data=str(data), run_dir=str(tmp_path / "run"), checkpoint_every=2, **COMMON)
    train_autoencoder(TrainConfig(steps=2, **base))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "c0" / "0.png")  # one image replaced
    with pytest.raises(EncdiffError, match=r"not what the run trained on \(checkpoint: 12 images, fingerprint \w+; "
                                           r"now: 12 images, fingerprint \w+\)"):
        train_autoencoder(TrainConfig(steps=4, **base))
    train_autoencoder(TrainConfig(steps=4, accept_data_change=True, **base))


def test_resume_compares_folders_not_their_spelling(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    base = dict(run_dir=str(tmp_path / "run"), checkpoint_every=2, **COMMON)
    train_autoencoder(TrainConfig(data="data/", steps=2, **base))
    train_autoencoder(TrainConfig(data=str(data.resolve()), steps=4, **base))  # same folder, other spelling
    with pytest.raises(EncdiffError, match=r"lr: checkpoint 0\.0002, now 0\.001"):
        train_autoencoder(TrainConfig(data="data", steps=6, **{**base, "lr": 1e-3}))
    # a refused resume leaves the run's own config.json as it was
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 2e-4


def test_the_latent_cache_follows_the_images_and_a_damaged_one_is_rebuilt(tmp_path):
    data = make_folder(tmp_path / "data")
    ae = train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "ae"), steps=2, checkpoint_every=2,
                                       **COMMON))
    base = dict(data=str(data), autoencoder=str(ae), checkpoint_every=2, **COMMON)
    train_diffusion(TrainConfig(run_dir=str(tmp_path / "ldm"), steps=2, **base))
    cache = tmp_path / "ldm" / "cache"
    first = sorted(cache.glob("latents-*"))
    assert len(first) == 1
    first[0].write_bytes(first[0].read_bytes()[:100])  # damaged
    with pytest.warns(UserWarning, match="damaged latent cache"):
        train_diffusion(TrainConfig(run_dir=str(tmp_path / "ldm"), steps=4, **base))
    # the same number of images, one replaced: other latents (a count-keyed cache would reuse the stale ones)
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(data / "c1" / "3.png")
    train_diffusion(TrainConfig(run_dir=str(tmp_path / "ldm2"), steps=2, **base))
    assert (sorted(p.name for p in (tmp_path / "ldm2" / "cache").glob("latents-*"))
            != sorted(p.name for p in cache.glob("latents-*")))


def test_a_run_folder_in_use_is_refused_naming_the_process(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(EncdiffError, match=f"in use by process {os.getpid()}"):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released
        pass


def test_written_files_respect_the_umask(tmp_path):
    from encdiff.checkpoint import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        Autoencoder(__import__("encdiff.presets", fromlist=["AUTOENCODERS"]).AUTOENCODERS["tiny"]).save_pretrained(
            tmp_path / "model")
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "model" / "config.json", tmp_path / "model" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_nan_autoencoder_weights_are_an_error_not_grey_images(tmp_path):
    from encdiff.presets import AUTOENCODERS

    ae = Autoencoder(AUTOENCODERS["tiny"])
    with torch.no_grad():
        ae.decoder.conv_out.weight.fill_(float("nan"))
    with pytest.raises(EncdiffError, match="decoder output contains NaN"):
        with torch.no_grad():
            ae.decode(torch.zeros(1, 4, 8, 8))


def test_generator_json_is_validated_like_the_model_configs(tmp_path):
    import shutil

    from encdiff.pipeline import bundled_path

    folder = tmp_path / "gen"
    shutil.copytree(bundled_path(), folder)
    info = json.loads((folder / "generator.json").read_text())
    cases = [({k: v for k, v in info.items() if k != "denoiser"}, "entry 'denoiser'"),
             ({**info, "format_version": 7}, "format_version 7"),
             ({**info, "latent": "yes"}, "entry 'latent'"),
             ({**info, "class_names": [1, 2]}, "class_names"),
             ({**info, "denoiser": {**info["denoiser"], "sigma_data": "one"}}, "denoiser.sigma_data"),
             ({**info, "sampling": {"steps": 0}}, "sampling.steps"),
             ({**info, "surprise": 1}, "unknown entry 'surprise'")]
    for bad, message in cases:
        (folder / "generator.json").write_text(json.dumps(bad))
        with pytest.raises(EncdiffError, match=message):
            Generator.from_pretrained(folder)
    (folder / "generator.json").write_text(json.dumps(info))
    config = json.loads((folder / "autoencoder" / "config.json").read_text())
    del config["config"]["scaling_factor"]
    (folder / "autoencoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncdiffError, match="'scaling_factor' is missing"):
        Generator.from_pretrained(folder)
    config["config"]["scaling_factor"] = 1.0
    config["config"]["block_out_channels"] = [32, 64, 10**9]
    (folder / "autoencoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncdiffError, match="block_out_channels"):
        Generator.from_pretrained(folder)


def test_reconstruct_skips_an_unreadable_file_in_a_folder_and_says_so(tmp_path):
    from encdiff.pipeline import bundled_path

    make_folder(tmp_path / "data", classes=1, per_class=2)
    (tmp_path / "data" / "c0" / "broken.png").write_bytes(b"not a png")
    result = cli("reconstruct", str(bundled_path() / "autoencoder"), str(tmp_path / "data"), "--out",
                 str(tmp_path / "out"), "--resolution", "32")
    assert result.returncode == 0, result.stderr
    assert "mean PSNR over 2 images" in result.stdout
    warning = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert len(warning) == 1 and warning[0].startswith("encdiff: warning:")


def test_info_does_not_vouch_for_truncated_missing_or_pickled_weights(tmp_path):
    import shutil

    from encdiff.pipeline import bundled_path

    folder = tmp_path / "gen"
    shutil.copytree(bundled_path(), folder)
    assert cli("info", str(folder)).returncode == 0
    weights = folder / "unet" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(cli("info", str(folder)), "sha256 differs")
    weights.write_bytes(b"\x80\x04\x95 a pickle")
    one_line_error(cli("info", str(folder)), "sha256 differs")
    weights.unlink()
    one_line_error(cli("info", str(folder)), "weights file not found")


def test_eval_skips_a_decompression_bomb_in_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    Image.new("L", (20000, 20000)).save(tmp_path / "imgs" / "bomb.png", optimize=True)
    result = cli("eval", str(tmp_path / "imgs"), "--reference", str(tmp_path / "imgs"))
    # three readable images are too few for FID: the clear refusal, not a DecompressionBombError traceback
    one_line_error_or_warning = [line for line in result.stderr.splitlines() if line.startswith("encdiff:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert any("bomb.png" in line for line in one_line_error_or_warning) and "too few" in result.stderr


def test_a_pickled_inception_file_is_refused_without_relaying_torchs_allowlist_advice(tmp_path):
    import functools

    from encdiff.inception import load_inception

    path = tmp_path / "pt_inception.pth"
    torch.save({"weights": functools.partial(print, "ran")}, path)  # a pickled callable, not a tensor
    with pytest.raises(EncdiffError, match="pickled Python objects") as info:
        load_inception(path)
    assert "safe_globals" not in str(info.value) and "weights_only" not in str(info.value)


class Trap:
    """Unpickling this creates a file: the proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_malicious_pickles_under_every_accepted_file_name_never_run(tmp_path):
    import hashlib
    import shutil

    from encdiff.evaluate import ReferenceStats
    from encdiff.featurenet import FeatureNet
    from encdiff.pipeline import bundled_path
    from encdiff.training.state import load_training_state

    marker = tmp_path / "pwned"

    def plant(path: Path) -> None:
        torch.save({"weights": Trap(marker)}, path)  # torch's own zip+pickle format, named like our files

    # a model folder whose recorded sha256 matches the planted file: the safetensors parser must refuse it
    folder = tmp_path / "ae"
    shutil.copytree(bundled_path() / "autoencoder", folder)
    plant(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncdiffError, match="safetensors"):
        Autoencoder.from_pretrained(folder)
    # a diffusers folder (no hash to check)
    from encdiff.diffusers_format import autoencoder_config_to_diffusers

    (tmp_path / "vae").mkdir()
    plant(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKL", **autoencoder_config_to_diffusers(Autoencoder.from_pretrained(
            bundled_path() / "autoencoder").config)}))
    with pytest.raises(EncdiffError):
        Autoencoder.from_pretrained(tmp_path / "vae")
    # a feature net, reference statistics, a training checkpoint
    plant(tmp_path / "featurenet.safetensors")
    with pytest.raises(EncdiffError):
        FeatureNet.load(tmp_path / "featurenet.safetensors")
    plant(tmp_path / "reference.safetensors")
    with pytest.raises(EncdiffError):
        ReferenceStats.load(tmp_path / "reference.safetensors")
    data = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    train_autoencoder(TrainConfig(data=str(data), run_dir=str(run), steps=1, checkpoint_every=1, **COMMON))
    state = next((run / "checkpoints").iterdir())
    plant(state / "state.safetensors")
    with pytest.raises(EncdiffError):
        load_training_state(state)
    # the image cache: refused with a warning, the images decoded again
    cache = next((run / "cache").glob("*.safetensors"))
    plant(cache)
    with pytest.warns(UserWarning, match="ignoring an unreadable image cache"):
        assert len(ImageDataset(data, 16, workers=0, progress=False, cache_dir=run / "cache")) == 12
    assert not marker.exists()


def test_messages_count_in_english():
    from encdiff.errors import count

    assert count(1, "image") == "1 image" and count(2, "image") == "2 images" and count(0, "image") == "0 images"
    assert count(1, "class", "classes") == "1 class" and count(3, "process", "processes") == "3 processes"


def test_a_reader_that_goes_away_is_not_a_traceback():
    """`encdiff info MODEL | head -1`: the pipe closes before encdiff writes; exit like SIGPIPE, silently."""
    import subprocess
    import sys

    from encdiff.pipeline import bundled_path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "encdiff", "info", str(bundled_path())], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the interpreter has even imported encdiff
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141 and "Traceback" not in stderr, stderr


# -- issue 25: the defects found by trying and by reading ----------------------------------------------------------
def run_main(*args: str, capsys) -> tuple[int, str, str]:
    """The CLI in this process (the same code path as the `encdiff` command, without a subprocess's start-up)."""
    from encdiff.cli import main

    code = main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code: int, err: str, message: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def generator_copy(tmp_path_factory) -> Path:
    import shutil

    from encdiff.pipeline import bundled_path

    folder = tmp_path_factory.mktemp("gen") / "gen"
    shutil.copytree(bundled_path(), folder)
    return folder


MALFORMED = [  # (change to generator.json, words of the refusal)
    (lambda i: {k: v for k, v in i.items() if k != "denoiser"}, "entry 'denoiser'"),
    (lambda i: {**i, "denoiser": [1]}, "entry 'denoiser'"),
    (lambda i: {**i, "class_names": 3}, "entry 'class_names'"),
    (lambda i: {**i, "class_names": i["class_names"][:9]}, "one per class of the U-Net"),
    (lambda i: {**i, "latent": False}, "entry 'latent' = false"),
    (lambda i: {**i, "latent": "yes"}, "entry 'latent'"),
    (lambda i: {**i, "sampling": [1, 2]}, "entry 'sampling'"),
    (lambda i: {**i, "sampling": {**i["sampling"], "steps": 0}}, "sampling.steps"),
    (lambda i: {**i, "sampling": {**i["sampling"], "steps": "ten"}}, "sampling.steps"),
    (lambda i: {**i, "sampling": {**i["sampling"], "guidance_scale": float("nan")}}, "sampling.guidance_scale"),
    (lambda i: {**i, "sampling": {**i["sampling"], "sampler": "consistency"}}, "does not fit"),
    (lambda i: {**i, "denoiser": {**i["denoiser"], "sigma_data": "one"}}, "denoiser.sigma_data"),
    (lambda i: {**i, "denoiser": {**i["denoiser"], "sigma_data": -1}}, "denoiser.sigma_data"),
    (lambda i: {**i, "denoiser": {**i["denoiser"], "sigma_max": 0}}, "denoiser.sigma_max"),
    (lambda i: {**i, "denoiser": {**i["denoiser"], "kind": "score"}}, "denoiser.kind"),
    (lambda i: {**i, "denoiser": {**i["denoiser"], "colour": 1}}, "unknown field 'colour'"),
    (lambda i: {**i, "denoiser": {**i["denoiser"], "preconditioning": "flow"}}, "denoiser.preconditioning"),
    (lambda i: {**i, "format_version": 99}, "format_version 99"),
]


@pytest.mark.parametrize("change, message", MALFORMED)
def test_info_validates_a_generator_exactly_as_loading_does(generator_copy, capsys, change, message):
    """Defects 8 and 9: every malformed generator.json is refused by loading, `info`, `sample` and `eval` alike,
    in one line naming the entry, never a traceback, and never vouched for by `info`."""
    path = generator_copy / "generator.json"
    original = path.read_text()
    try:
        path.write_text(json.dumps(change(json.loads(original))))
        with pytest.raises(EncdiffError, match=message) as refused:
            Generator.from_pretrained(generator_copy)
        for command in (["info", str(generator_copy)], ["sample", str(generator_copy), "--num", "1"],
                        ["eval", str(generator_copy), "--num", "1"]):
            code, out, err = run_main(*command, capsys=capsys)
            one_line(code, err, str(refused.value))
            assert not out
    finally:
        path.write_text(original)


def test_info_refuses_a_generator_without_its_unet(generator_copy, capsys):
    (generator_copy / "unet").rename(generator_copy / "unet-gone")
    try:
        code, out, err = run_main("info", str(generator_copy), capsys=capsys)
        one_line(code, err, "unet")
    finally:
        (generator_copy / "unet-gone").rename(generator_copy / "unet")


def test_info_of_a_run_whose_last_row_is_an_evaluation(tmp_path, capsys):
    """Defect 6: the last logged row of a run with evaluations has metrics and no loss."""
    from encdiff.training.state import latest_training_state, load_training_state, save_training_state

    data = make_folder(tmp_path / "data")
    train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "run"), steps=2, checkpoint_every=2,
                                  **COMMON))
    tensors, meta = load_training_state(latest_training_state(tmp_path / "run"))
    meta["history"].append({"step": 2, "fid": 12.5, "kid": 0.01})
    save_training_state(tmp_path / "run", 2, tensors, meta)
    code, out, err = run_main("info", str(tmp_path / "run"), capsys=capsys)
    assert code == 0, err
    assert "last logged loss" in out and "last evaluation: FID 12.50 (step 2)" in out


def test_info_with_no_path_describes_the_bundled_generator(capsys):
    code, out, err = run_main("info", capsys=capsys)
    assert code == 0 and "generator (latent diffusion)" in out and "dpmpp_2m, 20 steps" in out, err


def test_export_never_reads_the_run_folder_as_data(tmp_path):
    """Defect 7: export measures the latent statistics on the training data alone, as training did, even when the
    run folder (with its PNGs) lies inside the data folder."""
    from encdiff.training import export_run

    data = make_folder(tmp_path / "data")
    trained = train_autoencoder(TrainConfig(data=str(data), run_dir=str(data / "run"), steps=2, checkpoint_every=1,
                                            **{**COMMON, "sample_every": 1}))
    assert list((data / "run").glob("reconstructions-*.png"))
    exported = export_run(data / "run", tmp_path / "exported")
    a, b = Autoencoder.from_pretrained(trained).config, Autoencoder.from_pretrained(exported).config
    assert (a.scaling_factor, a.shift_factor) == (b.scaling_factor, b.shift_factor)


@pytest.mark.parametrize("args, message", [
    (["sample", "--out", "/proc/encdiff-x.png"], "cannot write in /proc"),
    (["sample", "--out-dir", "file/sub"], "file is not a folder"),
    (["train-autoencoder", "data", "--model", "tiny", "--run-dir", "file/run"], "--run-dir file/run"),
    (["train", "data", "--pixel", "--model", "tiny", "--run-dir", "file"], "--run-dir file"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    """Defect 10: refused in one line before the model is loaded or any data read; nothing is left behind."""
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    (tmp_path / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_main(*args, capsys=capsys)
    one_line(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_cached_latent_follows_an_image_replaced_with_its_size_and_time(tmp_path):
    """Defect 11: an image replaced by another of the same size and modification time (as `cp -p` leaves it) is
    decoded again, and its latent encoded again, in a rerun of the same run folder."""
    data = make_folder(tmp_path / "data")
    ae = train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "ae"), steps=2, checkpoint_every=2,
                                       **COMMON))
    base = dict(data=str(data), autoencoder=str(ae), run_dir=str(tmp_path / "ldm"), checkpoint_every=2, **COMMON)
    train_diffusion(TrainConfig(steps=2, **base))
    target = data / "c1" / "3.png"
    stat = target.stat()
    replacement = np.random.default_rng(99).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(replacement).save(target)
    assert target.stat().st_size == stat.st_size  # random pixels do not compress: the same PNG size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train_diffusion(TrainConfig(steps=4, **base))
    from safetensors.torch import load_file

    dataset = ImageDataset(data, 16, workers=0, progress=False)
    index = [i for i, f in enumerate(sorted((data / "c1").iterdir()))].index(3) + 6
    assert np.array_equal(dataset.images[index].permute(1, 2, 0).numpy(), replacement)
    newest = max((tmp_path / "ldm" / "cache").glob("latents-*"), key=lambda p: p.stat().st_mtime_ns)
    latents = load_file(str(newest))["latents"]
    fresh = Autoencoder.from_pretrained(ae).encode(dataset.images[index:index + 1].float() / 127.5 - 1)
    assert torch.allclose(latents[index, 0], fresh[0], atol=1e-4)


def test_a_sampler_that_does_not_fit_the_model_is_refused(capsys):
    """Defect 13: the student refuses ODE solvers and the teacher consistency sampling, naming what fits, in the
    library and the CLI alike (the server and page: tests/test_server.py)."""
    with pytest.raises(EncdiffError, match="'dpmpp_2m' does not fit a 'consistency' generator.*use consistency"):
        Generator.bundled(student=True).images([0], torch.tensor([0]), sampler="dpmpp_2m")
    with pytest.raises(EncdiffError, match="'consistency' does not fit a 'flow' generator: use one of euler"):
        Generator.bundled().images([0], torch.tensor([0]), sampler="consistency")
    code, out, err = run_main("sample", "--fast", "--sampler", "dpmpp_2m", "--num", "1", capsys=capsys)
    one_line(code, err, "does not fit a 'consistency' generator")
    code, out, err = run_main("sample", "--sampler", "consistency", "--num", "1", capsys=capsys)
    one_line(code, err, "does not fit a 'flow' generator")


@pytest.mark.parametrize("args, message", [
    (["train", "/nonexistent/images", "--steps", "2"], "/nonexistent/images: no such folder"),
    (["train-autoencoder", "data", "--model", "unicorn", "--dry-run"], "unknown preset 'unicorn'"),
    (["train", "data", "--pixel", "--model", "unicorn", "--dry-run"], "unknown preset 'unicorn'"),
    (["train", "data", "--model", "tiny", "--autoencoder", "aerun"], "a training run folder, not a model folder: use its model"),
    (["edit", "invert", "data/c0/0.png", "--class", "cat", "--to-class", "unicorn"], "unknown class 'unicorn'"),
])
def test_the_clis_small_inconsistencies(tmp_path, monkeypatch, capsys, args, message):
    """Defects 5 and 14: the missing folder before the flags; a dry run of an unknown model; a run folder given as
    a model; an unknown --to-class before the inversion runs."""
    from encdiff import editing

    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    (tmp_path / "aerun" / "checkpoints").mkdir(parents=True)
    (tmp_path / "aerun" / "model").mkdir()
    monkeypatch.setattr(editing, "invert", lambda *a, **k: pytest.fail("the inversion ran before the check"))
    code, out, err = run_main(*args, capsys=capsys)
    one_line(code, err, message)


def test_sample_and_edit_take_the_model_and_fast_alike(tmp_path, monkeypatch, capsys):
    """Defect 14 and 5: --model works for sample as for edit, edit has --fast, and an output that is replaced is
    said."""
    from encdiff.pipeline import bundled_path

    monkeypatch.chdir(tmp_path)
    for args in (["sample", str(bundled_path()), "--num", "2", "--steps", "2", "--out", "a.png"],
                 ["sample", "--model", str(bundled_path()), "--num", "2", "--steps", "2", "--out", "b.png"]):
        code, out, err = run_main(*args, capsys=capsys)
        assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    for _ in range(2):
        code, out, err = run_main("edit", "img2img", "image.png", "--fast", "--class", "cat", "--strength", "1",
                                  "--out", "fast.png", capsys=capsys)
        assert code == 0, err
    assert "replacing fast.png" in err
    code, out, err = run_main("sample", "--fast", "--class", "cat", "--num", "1", "--out", "student.png", capsys=capsys)
    strip = np.asarray(Image.open(tmp_path / "fast.png"))
    assert np.array_equal(strip[:, 32:], np.asarray(Image.open(tmp_path / "student.png")))


def test_a_missing_plotting_extra_is_said_on_its_own_line(tmp_path, monkeypatch, capsys):
    """Defect 14: the note about loss.png is a line of its own before the progress bar, not glued onto it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    data = make_folder(tmp_path / "data")
    train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "run"), steps=2, checkpoint_every=2,
                                  **COMMON))
    err = capsys.readouterr().err
    assert err.count("needs matplotlib") == 1
    assert any(line.startswith("encdiff: no loss.png") for line in err.replace("\r", "\n").splitlines())


def test_a_diffusion_stage_at_another_resolution_than_its_autoencoder_is_refused(tmp_path):
    """Issue 24, item 7: a 16-px autoencoder with a 32-px diffusion run is refused before any data is read."""
    data = make_folder(tmp_path / "data")
    ae = train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "ae"), steps=2, checkpoint_every=2,
                                       **COMMON))
    with pytest.raises(EncdiffError, match=r"trained on 16x16 images.*--resolution 16"):
        train_diffusion(TrainConfig(data=str(data), autoencoder=str(ae), run_dir=str(tmp_path / "ldm"), steps=2,
                                    **{**COMMON, "resolution": 32}))
    assert not (tmp_path / "ldm" / "cache").exists()


def test_flips_are_a_choice(tmp_path, monkeypatch):
    """Issue 24, item 6: with flips off no batch is ever mirrored (they mirror flags, text and arrows)."""
    seen = []
    real = ImageDataset.batch

    def batch(self, indices, flips=None):
        if flips is not None:  # the training batches (previews and statistics are never flipped)
            seen.append(flips.clone())
        return real(self, indices, flips)

    monkeypatch.setattr(ImageDataset, "batch", batch)
    data = make_folder(tmp_path / "data")
    train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "on"), steps=4, **COMMON))
    assert any(f.any() for f in seen)
    seen.clear()
    train_autoencoder(TrainConfig(data=str(data), run_dir=str(tmp_path / "off"), steps=4, flips=False, **COMMON))
    assert len(seen) == 4 and not any(f.any() for f in seen)
