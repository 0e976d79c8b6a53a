"""Training end to end on a small generated image folder: both stages, exact resume after kill -9 and
SIGTERM, divergence handling, DDP equivalence and configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import colour_classes, extract_cifar_subset, needs_cifar
from encdiff import Autoencoder, EncdiffError
from encdiff.training.state import latest_training_state
from encdiff.data import ImageDataset
from encdiff.pipeline import Generator, Sampling
from encdiff.training import TrainConfig, export_run, load_config, train_autoencoder, train_diffusion
from encdiff.training.diffusion import DEFAULT_GUIDANCE

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = dict(model="tiny", resolution=16, batch_size=8, log_every=2, sample_every=0, workers=0, warmup_steps=2)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 12 images of 20x20 with class-specific colours (resized to 16 by the loader)."""
    return colour_classes(tmp_path_factory.mktemp("images"), per_class=12, size=20)


@pytest.fixture(scope="module")
def autoencoder_run(image_folder, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ae")
    config = TrainConfig(data=str(image_folder), run_dir=str(run_dir), steps=6, checkpoint_every=3,
                         **{**COMMON, "sample_every": 3})
    return train_autoencoder(config)


def test_autoencoder_run_writes_model_logs_and_grids(autoencoder_run, image_folder):
    run_dir = autoencoder_run.parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    assert (run_dir / "reconstructions-00000003.png").is_file() and (run_dir / "loss.png").is_file()
    assert json.loads((run_dir / "config.json").read_text())["stage"] == "autoencoder"
    # The measured scale/shift make the data's latents zero-mean, unit-variance.
    autoencoder = Autoencoder.from_pretrained(autoencoder_run)
    x, _ = ImageDataset(image_folder, 16, workers=0, progress=False).batch(torch.arange(36))
    with torch.no_grad():
        latents = autoencoder.encode(x).double()
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert abs(latents.var(dim=(0, 2, 3), unbiased=False).mean().item() - 1) < 1e-4


def test_latent_diffusion_run_makes_a_class_conditional_generator(autoencoder_run, image_folder, tmp_path):
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "ldm"), steps=4, checkpoint_every=2,
                         autoencoder=str(autoencoder_run), **{**COMMON, "sample_every": 4, "sample_steps": 3})
    out = train_diffusion(config)
    assert (tmp_path / "ldm" / "samples-00000004.png").is_file()
    assert len(list((tmp_path / "ldm" / "cache").glob("latents-*.safetensors"))) == 1  # encoded once
    generator = Generator.from_pretrained(out)
    assert generator.class_names == ["class0", "class1", "class2"] and generator.unet.config.null_class
    # Trained with label dropout, it samples guided unless told otherwise (unguided is its worst setting).
    assert generator.sampling.guidance_scale == DEFAULT_GUIDANCE
    images = generator.images([0, 1], torch.tensor([0, 2]), steps=3)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    # Image i depends on its seed only: a batch equals its images made one by one.
    assert torch.equal(generator.images([1], torch.tensor([2]), steps=3)[0], images[1])


def test_a_flow_matching_run_makes_a_generator_that_samples_and_distils(autoencoder_run, image_folder, tmp_path):
    from encdiff.training import train_consistency

    # `denoiser="flow"` alone is the flow-matching objective: its loss and SD3's logit-normal t
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "flow"), steps=4, checkpoint_every=2,
                         autoencoder=str(autoencoder_run), denoiser="flow", **COMMON)
    assert (config.weighting, config.loss_options) == ("flow", {"p_mean": 0.0, "p_std": 1.0})
    out = train_diffusion(config)
    stored = json.loads((tmp_path / "flow" / "config.json").read_text())
    assert (stored["weighting"], stored["loss_options"]) == ("flow", {"p_mean": 0.0, "p_std": 1.0})
    # a guide for it trains with the same objective (before, EDM's weighting, whatever the generator's kind)
    from encdiff.training.guide import guide_defaults

    guide = load_config(None, None, "diffusion", {}, base=guide_defaults(out))
    assert (guide.denoiser, guide.weighting, guide.loss_options) == ("flow", "flow", {"p_mean": 0.0, "p_std": 1.0})
    denoiser = json.loads((out / "generator.json").read_text())["denoiser"]
    assert (denoiser["kind"], denoiser["preconditioning"]) == ("flow", None)  # a student's field only
    generator = Generator.from_pretrained(out)
    assert type(generator.denoiser).__name__ == "FlowDenoiser"
    images = generator.images([0, 1], torch.tensor([0, 2]), steps=3, guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    log = [json.loads(line) for line in (tmp_path / "flow" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    # its consistency student keeps the flow preconditioning and the teacher's latent space
    student = Generator.from_pretrained(train_consistency(TrainConfig(
        data=str(image_folder), run_dir=str(tmp_path / "student"), teacher=str(out), steps=2, **COMMON)))
    assert (student.spec.kind, student.spec.preconditioning) == ("consistency", "flow")
    assert type(student.denoiser).__name__ == "FlowConsistencyDenoiser"
    assert student.images([0, 1], torch.tensor([0, 2])).shape == (2, 3, 16, 16)


def test_the_objective_follows_the_denoiser_unless_a_field_says_otherwise():
    """EDM's weighting and levels by default; flow matching's for `denoiser = "flow"`; a given option wins; a layer
    naming another denoiser leaves the objective an earlier layer (a folder's plan) set for EDM behind."""
    assert (TrainConfig().weighting, TrainConfig().loss_options) == ("edm", {})
    assert TrainConfig(denoiser="flow", loss_options={"p_std": 1.4}).loss_options == {"p_mean": 0.0, "p_std": 1.4}
    assert TrainConfig(denoiser="flow", weighting="edm").weighting == "edm"
    plan = {"sigma_data": 1.0, "loss_options": {"p_mean": -0.5, "p_std": 1.2}}
    assert load_config(None, None, "diffusion", {}, base=plan).loss_options == {"p_mean": -0.5, "p_std": 1.2}
    flow = load_config(None, None, "diffusion", {"denoiser": "flow"}, base=plan)
    assert (flow.weighting, flow.loss_options) == ("flow", {"p_mean": 0.0, "p_std": 1.0})
    told = load_config(None, None, "diffusion", {"denoiser": "flow", "loss_options": {"p_mean": 0.5}}, base=plan)
    assert told.loss_options == {"p_mean": 0.5, "p_std": 1.0}
    with pytest.raises(EncdiffError, match="config field 'loss_options' = 3"):
        TrainConfig(loss_options=3)


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "encdiff", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def pixel_args(image_folder: Path, run_dir: Path, steps: int, every: int) -> list[str]:
    return ["train", str(image_folder), "--pixel", "--model", "tiny", "--resolution", "16", "--batch-size", "8",
            "--steps", str(steps), "--checkpoint-every", str(every), "--log-every", "2", "--sample-every", "0",
            "--workers", "0", "--keep-last", "100", "--run-dir", str(run_dir)]


def final_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "state.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    keys = [k for k in a if k.startswith(("model.", "ema.", "optimizer."))]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(("model.", "ema.", "optimizer.")))
    different = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole")
    result = cli(*pixel_args(image_folder, run_dir, steps=60, every=5))
    assert result.returncode == 0, result.stderr
    return run_dir


def start_and_wait_for_first_checkpoint(image_folder: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "encdiff", *pixel_args(image_folder, run_dir, 60, 5)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "checkpoints" / "step-00000005" / "COMPLETE"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    return process


def test_kill_9_then_resume_equals_an_uninterrupted_run(image_folder, uninterrupted, tmp_path):
    """2N steps in one go == N steps, kill -9 at a random point after the N-step checkpoint, resume, the rest."""
    run_dir = tmp_path / "killed"
    process = start_and_wait_for_first_checkpoint(image_folder, run_dir)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.8))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed_from = latest_training_state(run_dir)
    result = cli(*pixel_args(image_folder, run_dir, steps=60, every=5))
    assert result.returncode == 0, result.stderr
    assert f"resumed from {resumed_from}" in result.stderr
    assert_bitwise_equal(final_tensors(run_dir, 60), final_tensors(uninterrupted, 60))
    # The log is continuous: every logged step once, in order.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 61, 2))
    # and the logged losses too: a log window cut by the checkpoint (step 5 of the window 5-6) is carried over
    whole = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole]


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(image_folder, uninterrupted, tmp_path):
    run_dir = tmp_path / "terminated"
    process = start_and_wait_for_first_checkpoint(image_folder, run_dir)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    # exit 128 + SIGTERM after the checkpoint, so `train-autoencoder && train` does not carry on
    stderr = process.stderr.read()
    assert process.returncode == 143 and "run the same command again to resume" in stderr, stderr
    latest = latest_training_state(run_dir)
    step = int(latest.name.split("-")[1])
    assert 5 <= step < 60 and not (run_dir / "model").exists()
    result = cli(*pixel_args(image_folder, run_dir, steps=60, every=5), "--resume")
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(final_tensors(run_dir, 60), final_tensors(uninterrupted, 60))


@pytest.mark.slow  # two torchrun processes
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(image_folder, uninterrupted, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    args = pixel_args(image_folder, run_dir, steps=10, every=10)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             "--master-port", str(29500 + os.getpid() % 1000), "-m", "encdiff", *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = final_tensors(run_dir, 10)
    single_dir = tmp_path / "single"
    assert cli(*pixel_args(image_folder, single_dir, steps=10, every=10)).returncode == 0
    single = final_tensors(single_dir, 10)
    for prefix in ("model.", "ema."):
        for key in (k for k in single if k.startswith(prefix)):
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert ddp["rng.noise.rank1"].shape == ddp["rng.noise.rank0"].shape  # every rank's RNG state is kept


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "nan"), steps=50, checkpoint_every=1,
                         lr=1e30, grad_clip=0.0, **{**COMMON, "warmup_steps": 1})
    with pytest.raises(EncdiffError, match="training diverged at step") as info:
        train_diffusion(config)
    last = latest_training_state(tmp_path / "nan")
    assert last is not None and str(last) in str(info.value)
    tensors = load_file(str(last / "state.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))


def test_config_layers_defaults_preset_toml_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 7\nlr = 0.001\nmodel = "pixel_small"\n')
    config = load_config(str(toml), "cifar10", "diffusion", {"data": "d", "lr": 0.5, "batch_size": None})
    assert (config.steps, config.lr, config.model, config.batch_size) == (7, 0.5, "pixel_small", 128)
    toml.write_text("stepz = 7\n")
    with pytest.raises(EncdiffError, match="stepz"):
        load_config(str(toml), None, "diffusion", {})
    toml.write_text("steps = [\n")
    with pytest.raises(EncdiffError, match="not valid TOML"):
        load_config(str(toml), None, "diffusion", {})
    with pytest.raises(EncdiffError, match="unknown training preset 'nope'; valid: cifar10, folder64"):
        load_config(None, "nope", "diffusion", {})
    with pytest.raises(EncdiffError, match="'lr_schedule'"):
        TrainConfig(lr_schedule="linear")


def test_resume_refuses_a_changed_config(image_folder, tmp_path):
    base = dict(data=str(image_folder), run_dir=str(tmp_path / "r"), checkpoint_every=2, **COMMON)
    train_diffusion(TrainConfig(steps=2, **base))
    with pytest.raises(EncdiffError, match="different config.*lr"):
        train_diffusion(TrainConfig(steps=2, **{**base, "lr": 1e-3}))
    # More steps (and other bookkeeping) may change: the run continues from step 2 to 4.
    train_diffusion(TrainConfig(steps=4, **{**base, "log_every": 1}))
    assert latest_training_state(tmp_path / "r").name == "step-00000004"


def test_the_class_counts_read_as_a_range_only_when_they_differ():
    """A balanced folder printed "5000 (airplane) to 5000 (airplane) per class": one class named as both ends."""
    from encdiff.training.loop import describe_classes

    class Folder(list):  # what describe_classes reads of an ImageDataset: its length, labels and class names
        def __init__(self, labels, names):
            super().__init__(labels)
            self.labels, self.num_classes, self.class_names = torch.tensor(labels), len(names), names

    assert describe_classes(Folder([0, 1, 0, 1], ["cat", "dog"])) == "4 images in 2 classes, 2 each"
    assert describe_classes(Folder([0, 1, 1, 1], ["cat", "dog"])) == \
        "4 images in 2 classes, 1 (cat) to 3 (dog) per class"


def test_balanced_classes_train_and_a_flat_folder_refuses_them(image_folder, tmp_path, capsys):
    (tmp_path / "data" / "rare").mkdir(parents=True)
    for path in sorted((image_folder / "class0").iterdir())[:2]:
        (tmp_path / "data" / "rare" / path.name).write_bytes(path.read_bytes())
    for path in (image_folder / "class1").iterdir():
        (tmp_path / "data" / "common").mkdir(exist_ok=True)
        (tmp_path / "data" / "common" / path.name).write_bytes(path.read_bytes())
    config = TrainConfig(data=str(tmp_path / "data"), run_dir=str(tmp_path / "run"), steps=2, checkpoint_every=2,
                         balance_classes=True, **{**COMMON, "batch_size": 4})
    train_autoencoder(config)
    assert "14 images in 2 classes, 2 (rare) to 12 (common) per class; classes drawn equally often" in \
        capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (image_folder / "class1").iterdir():
        (flat / path.name).write_bytes(path.read_bytes())
    with pytest.raises(EncdiffError, match="'balance_classes' = true: .* no class subfolders"):
        train_autoencoder(dataclasses.replace(config, data=str(flat), run_dir=str(tmp_path / "flat-run")))


def test_durations_parse():
    from encdiff.training.budget import parse_duration

    assert [parse_duration(t) for t in ("45m", "1h30m", "90s", "2h", "10", "1.5h")] == [2700, 5400, 90, 7200, 600, 5400]
    with pytest.raises(EncdiffError, match="time budget '4x'"):
        parse_duration("4x")


def test_a_time_budget_plans_the_steps_and_trains_what_that_step_count_trains(image_folder, tmp_path, capsys):
    """The probe that times the steps (before and after the GAN starts) leaves no trace: the budgeted run equals a
    run given the planned step count; resumed, it keeps that count."""
    gan = dict(adv_weight=0.5, adv_start=10, disc_channels=8, fm_weight=1.0, checkpoint_every=1000)
    planned = 40
    budgeted = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "budget"), time_budget=4.0, steps=planned,
                           **{**COMMON, **gan})
    train_autoencoder(budgeted)
    said = capsys.readouterr().err
    fitted = json.loads((tmp_path / "budget" / "config.json").read_text())
    steps, adv_start = fitted["steps"], fitted["adv_start"]
    # the GAN starts at the share of the steps it was planned at (a quarter), whatever the step count became
    assert steps > 4 and adv_start == round(10 * steps / planned) and 0 < adv_start < steps
    assert "time budget 4s:" in said and f"-> {steps} steps" in said and "from step 10" in said
    assert f"adv_start 10 -> {adv_start}" in said
    plain = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "plain"), steps=steps,
                        **{**COMMON, **gan, "adv_start": adv_start})
    train_autoencoder(plain)
    assert_bitwise_equal(final_tensors(tmp_path / "budget", steps), final_tensors(tmp_path / "plain", steps))
    train_autoencoder(budgeted)  # the same command again: resumed with the fitted plan at its end, nothing more to do
    again = json.loads((tmp_path / "budget" / "config.json").read_text())
    assert (again["steps"], again["adv_start"]) == (steps, adv_start)


def test_a_time_budget_run_resumed_mid_way_follows_its_fitted_learning_rate_schedule(image_folder, tmp_path,
                                                                                      monkeypatch):
    """A budgeted run cut after its first checkpoint and resumed ends bit for bit where the uninterrupted one does:
    the resumed schedule decays at the fitted `lr_decay_steps`, not at the planned one."""
    import encdiff.training.budget as budget

    # The probe is stubbed: what is tested is the resume of a fitted plan, and a measured probe on a busy machine
    # fitted a single step (the probe itself is tested by the budget tests above).
    monkeypatch.setattr(budget, "probe_step_seconds", lambda run, recipe, at_step: 0.1)
    planned = 10_000  # far more than fit in the budget, so the fitted plan differs from it
    budgeted = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "budget"), time_budget=5.0, steps=planned,
                           lr_schedule="inv_sqrt", lr_decay_steps=planned // 4, checkpoint_every=3, keep_last=1000,
                           **COMMON)
    train_autoencoder(budgeted)
    fitted = json.loads((tmp_path / "budget" / "config.json").read_text())
    steps = fitted["steps"]
    assert steps >= 8 and fitted["lr_decay_steps"] == round(planned // 4 * steps / planned) < steps
    whole = final_tensors(tmp_path / "budget", steps)
    # cut after the first checkpoint: later checkpoints and the model gone, as if killed at step 4
    shutil.rmtree(tmp_path / "budget" / "model")
    for later in sorted((tmp_path / "budget" / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    train_autoencoder(budgeted)
    assert_bitwise_equal(final_tensors(tmp_path / "budget", steps), whole)
    # a dry run of the same command shows the config the resume trains, the fitted plan included
    dry = cli("train-autoencoder", str(image_folder), "--model", "tiny", "--resolution", "16", "--batch-size", "8",
              "--warmup-steps", "2", "--time", "5s", "--steps", str(planned), "--lr-schedule", "inv_sqrt",
              "--lr-decay-steps", str(planned // 4), "--run-dir", str(tmp_path / "budget"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert (shown["steps"], shown["lr_decay_steps"]) == (steps, fitted["lr_decay_steps"])
    assert f"checkpoint at step {steps}: the run resumes from it, with its time budget's steps {steps}" in dry.stderr
    # and the run itself says so too, after the screen of planned sizes (here: resumed at its end, nothing to train)
    run = cli(*dry.args[3:-1])
    assert run.returncode == 0, run.stderr
    assert f"checkpoint at step {steps}: the run resumes from it, with its time budget's steps {steps}" in run.stderr


def test_dry_run_prints_the_resolved_config(image_folder):
    result = cli("train", str(image_folder), "--pixel", "--preset", "cifar10", "--steps", "3", "--dry-run")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["stage"] == "diffusion" and config["steps"] == 3 and config["model"] == "latent_8x8"


@pytest.mark.parametrize("args, message", [
    (["train", "nowhere", "--pixel", "--model", "tiny"], "nowhere"),
    (["train", ".", "--model", "tiny"], "exactly one of --autoencoder"),
    (["train", ".", "--pixel"], "no model"),
    (["train", ".", "--pixel", "--model", "huge"], "unknown preset 'huge'"),
    (["train-autoencoder", ".", "--preset", "nope"], "unknown training preset"),
    (["sample", "--num", "0"], "--num 0"),
    (["sample", "nowhere"], "not a generator folder"),
    (["info", "nowhere"], "neither a model folder"),
    (["export", "nowhere", "out"], "no complete checkpoint"),
])
def test_user_mistakes_print_one_line_and_exit_2(args, message, tmp_path):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encdiff: error:") and message in lines[0], result.stderr


def test_help_shows_real_example_command_lines():
    result = cli("--help")
    assert result.returncode == 0 and "encdiff train-autoencoder data/cifar10/train --preset cifar10" in result.stdout
    assert "torchrun --nproc-per-node=4 -m encdiff train" in result.stdout


def test_cli_sample_reconstruct_export_info_on_trained_models(autoencoder_run, image_folder, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    run_dir = tmp_path / "ldm"
    result = cli("train", str(image_folder), "--autoencoder", str(autoencoder_run), "--model", "tiny",
                 "--resolution", "16", "--steps", "2", "--batch-size", "8", "--sample-every", "0", "--workers", "0",
                 "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    model = run_dir / "model"
    # One row per class when the images cycle through the classes: 3 rows x 2 columns of 16 px.
    assert cli("sample", str(model), "--num", "6", "--steps", "3", "--out", str(tmp_path / "grid.png")).returncode == 0
    assert Image.open(tmp_path / "grid.png").size == (32, 48)
    result = cli("sample", str(model), "--num", "3", "--steps", "3", "--class", "class1", "--guidance", "2",
                 "--out-dir", str(tmp_path / "each"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    # Reconstruction: original | reconstruction side by side, and a PSNR per image.
    result = cli("reconstruct", str(autoencoder_run), str(image_folder / "class0"), "--out", str(tmp_path / "rec"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "rec").glob("*.png"))) == 12 and "mean PSNR over 12 images" in result.stdout
    assert Image.open(next((tmp_path / "rec").glob("*.png"))).size == (32, 16)
    # Export the EMA weights: ours loads as a generator, diffusers' with diffusers itself.
    assert cli("export", str(run_dir), str(tmp_path / "ours")).returncode == 0
    full = Generator.from_pretrained(tmp_path / "ours")
    # --half: float16 files (about half the bytes) that load back as float32 weights equal to the rounded EMA;
    # the sampling defaults travel in generator.json and `sample` uses them unless told otherwise.
    assert cli("export", str(run_dir), str(tmp_path / "half"), "--half", "--steps", "4", "--guidance", "2").returncode == 0
    half = Generator.from_pretrained(tmp_path / "half")
    assert half.sampling == Sampling(steps=4, guidance_scale=2.0)
    size = lambda folder: sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "ours")
    for key, value in full.unet.state_dict().items():
        assert half.unet.state_dict()[key].dtype == torch.float32
        assert torch.equal(half.unet.state_dict()[key], value.half().float()), key
    defaults = cli("sample", str(tmp_path / "half"), "--num", "3", "--out-dir", str(tmp_path / "d"), "--out", str(tmp_path / "d.png"))
    explicit = cli("sample", str(tmp_path / "half"), "--num", "3", "--steps", "4", "--guidance", "2",
                   "--out-dir", str(tmp_path / "e"))
    assert defaults.returncode == 0 and explicit.returncode == 0, defaults.stderr + explicit.stderr
    assert all((tmp_path / "d" / f.name).read_bytes() == f.read_bytes() for f in (tmp_path / "e").iterdir())
    bad = cli("export", str(run_dir), str(tmp_path / "bad"), "--sampler", "nope")
    assert bad.returncode == 2 and "'sampling.sampler' = 'nope'" in bad.stderr, bad.stderr
    assert cli("export", str(run_dir), str(tmp_path / "theirs"), "--diffusers").returncode == 0
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "theirs" / "unet")
    assert theirs.config.num_class_embeds == 4  # 3 classes + the null class
    diffusers.AutoencoderKL.from_pretrained(tmp_path / "theirs" / "vae")
    info = cli("info", str(model))
    assert info.returncode == 0 and "generator (latent diffusion)" in info.stdout and "class1" in info.stdout
    info = cli("info", str(run_dir))
    assert info.returncode == 0 and "diffusion run, step 2 of 2" in info.stdout


@needs_cifar
def test_autoencoder_learns_on_real_cifar_images(tmp_path):
    """A few hundred real CIFAR-10 images: the reconstruction loss falls within 40 steps."""
    extract_cifar_subset(tmp_path / "cifar", 300, seed=1)
    config = TrainConfig(data=str(tmp_path / "cifar"), run_dir=str(tmp_path / "run"), steps=40, checkpoint_every=40,
                         lr=2e-3, **{**COMMON, "resolution": 32, "batch_size": 16, "log_every": 10})
    train_autoencoder(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses


def test_export_works_from_any_checkpoint_without_the_finished_model(autoencoder_run, image_folder, tmp_path):
    import shutil

    ae_run = tmp_path / "ae"
    shutil.copytree(autoencoder_run.parent, ae_run)
    shutil.rmtree(ae_run / "model")
    exported = Autoencoder.from_pretrained(export_run(ae_run, tmp_path / "ae-out"))
    finished = Autoencoder.from_pretrained(autoencoder_run)
    # Same EMA weights and the same measured latent statistics as the end of training wrote.
    assert exported.config == finished.config
    for key, value in finished.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    config = TrainConfig(data=str(image_folder), run_dir=str(tmp_path / "ldm"), steps=2, checkpoint_every=2,
                         autoencoder=str(autoencoder_run), **COMMON)
    shutil.rmtree(train_diffusion(config))
    generator = Generator.from_pretrained(export_run(tmp_path / "ldm", tmp_path / "ldm-out"))
    assert generator.class_names == ["class0", "class1", "class2"]
    assert generator.sampling.guidance_scale == DEFAULT_GUIDANCE  # the default travels in the checkpoint
    assert generator.images([0], torch.tensor([1]), steps=2).shape == (1, 3, 16, 16)
    # Without label dropout there is no unconditional model to guide against: no default guidance.
    config = dataclasses.replace(config, run_dir=str(tmp_path / "ldm-nodrop"), label_dropout=0.0)
    shutil.rmtree(train_diffusion(config))
    assert Generator.from_pretrained(export_run(tmp_path / "ldm-nodrop", tmp_path / "nodrop-out")).sampling == Sampling()


def test_periodic_evaluation_logs_fid_and_keeps_the_best_generator(tmp_path):
    """eval_every: FID/KID/P&R of the EMA weights in metrics.jsonl; the best generator is kept in best/."""
    rng = np.random.default_rng(3)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(100):  # the statistics need at least 257 images
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    config = TrainConfig(data=str(tmp_path / "data"), run_dir=str(tmp_path / "run"), steps=4, checkpoint_every=4,
                         eval_every=2, eval_samples=260, **{**COMMON, "sample_steps": 2})
    train_diffusion(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # (class accuracy is reported only for classes the feature net knows by name: CIFAR-10 ones)
    assert all(np.isfinite(r["fid"]) and np.isfinite(r["kid_mean"]) and 0 <= r["precision"] <= 1 for r in evals)
    best = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert best["fid"] == min(r["fid"] for r in evals)
    # the reference knows its classes, so the samples are drawn in its proportions (here: even)
    assert best["settings"]["class_mix"] == "reference"
    from encdiff.evaluate import ReferenceStats
    stats, = (ReferenceStats.load(f) for f in (tmp_path / "run" / "cache").glob("reference-*.safetensors"))
    assert stats.class_counts == {"c0": 100, "c1": 100, "c2": 100}
    Generator.from_pretrained(tmp_path / "run" / "best")


def test_a_resumed_run_takes_its_time_budget_plan_back():
    from encdiff.training.budget import resumed_plan

    plan = {"planned": {"steps": 40, "adv_start": 10}, "fitted": {"steps": 80, "adv_start": 20}}
    meta = {"config": {"steps": 80, "adv_start": 20, "time_budget": 4.0}, "budget": plan}
    assert resumed_plan(meta, {"steps": 40, "adv_start": 10, "time_budget": 4.0}) == (plan["fitted"], plan)
    # `--steps 200` without the budget, to extend it: the steps as given, the GAN's start where the plan put it
    assert resumed_plan(meta, {"steps": 200, "adv_start": 10, "time_budget": None})[0] == {"adv_start": 20}
    # a checkpoint written before plans were stored: only its step count was fitted
    old = {"config": {"steps": 619, "adv_start": 886, "time_budget": 2700.0}}
    adopted, _ = resumed_plan(old, {"steps": 3545, "adv_start": 886, "time_budget": 2700.0})
    assert adopted == {"steps": 619}
    assert resumed_plan({"config": {"steps": 5, "time_budget": None}}, {"steps": 9, "time_budget": None}) == ({}, None)


RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_in_configs_resolves_to_a_buildable_model(path):
    # A typo in a recipe (a field, a width no norm group divides) would otherwise surface minutes into a lent GPU's
    # one call, after the stages before it.
    from encdiff.autoencoder import AutoencoderConfig
    from encdiff.backbones import CONFIGS
    from encdiff.presets import AUTOENCODERS
    from encdiff.training.config import backbone_presets, model_config

    stage = {"autoencoder": "autoencoder", "decoder": "autoencoder", "distill": "distill",
             "light-decoder": "light_decoder"}.get(path.stem, "diffusion")
    config = load_config(str(path), None, stage, {})
    assert config.steps > 0 and config.batch_size > 0
    if stage == "autoencoder" and not config.model:  # a fine-tune: the model is the one it starts from
        assert (Path(__file__).resolve().parents[1] / config.init).is_dir(), config.init
    elif stage == "autoencoder":
        model_config(AUTOENCODERS, config, AutoencoderConfig)
    elif stage == "diffusion":
        model_config(backbone_presets(config.backbone), config, CONFIGS[config.backbone])


def test_a_recipe_with_a_width_no_norm_group_divides_is_refused(tmp_path):
    from encdiff.backbones import CONFIGS
    from encdiff.training.config import backbone_presets, model_config

    bad = tmp_path / "diffusion.toml"
    bad.write_text('model = "cifar10_latent"\nmodel_overrides = { block_out_channels = [80, 160, 160] }\n')
    config = load_config(str(bad), None, "diffusion", {})
    with pytest.raises(EncdiffError, match="norm_num_groups"):
        model_config(backbone_presets(config.backbone), config, CONFIGS[config.backbone])
