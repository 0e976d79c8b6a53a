"""Consistency distillation: the boundary condition, the Gaussian case where the ODE map is known, multistep
consistency sampling, and `encdiff distill` as a run of the common trainer (resume, DDP, student folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import colour_classes, randomize_
from encdiff import EncdiffError, UNet
from encdiff.consistency import distillation_grid, distillation_loss, interval_probabilities, pseudo_huber
from encdiff.denoiser import ConsistencyDenoiser, EDMDenoiser, FlowConsistencyDenoiser, FlowDenoiser, GaussianDenoiser
from encdiff.pipeline import DenoiserSpec, Generator, Sampling
from encdiff.samplers import ode_step, sample_consistency
from encdiff.schedules import get_sigmas
from encdiff.training import TrainConfig, stage_fields, train_consistency
from encdiff.unet import UNetConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = UNetConfig(block_out_channels=(8, 16), attention_levels=(False, True), layers_per_block=1, norm_num_groups=4,
                  sample_size=16, num_classes=3, null_class=True)


def test_the_boundary_condition_holds_exactly_and_large_sigma_matches_edm():
    net = randomize_(UNet(TINY))
    student, edm = ConsistencyDenoiser(net, sigma_data=0.5), EDMDenoiser(net, sigma_data=0.5)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        assert torch.equal(student(x, 0.002, torch.tensor([0, 1, 2, 3])), x)  # f(x; sigma_min) = x, bit for bit
    sigma = torch.tensor([80.0], dtype=torch.float64)
    for ours, theirs in zip(student.scalings(sigma), edm.scalings(sigma)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-9)  # the teacher's D where the noise is large


def test_a_flow_students_boundary_holds_exactly_and_it_keeps_the_flow_teachers_input_and_label():
    net = randomize_(UNet(TINY))
    student, flow = FlowConsistencyDenoiser(net), FlowDenoiser(net)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        assert torch.equal(student(x, 0.002, torch.tensor([0, 1, 2, 3])), x)  # f(x; sigma_min) = x, bit for bit
    for sigma in (0.5, 80.0):
        sigma = torch.tensor([sigma], dtype=torch.float64)
        ours, theirs = student.scalings(sigma), flow.scalings(sigma)
        assert torch.equal(ours[2], theirs[2]) and torch.equal(student.c_noise(sigma), flow.c_noise(sigma))
        for a, b in zip(ours[:2], theirs[:2]):  # the teacher's D, but for the boundary's shift of sigma_min
            torch.testing.assert_close(a, b, rtol=5e-3, atol=1e-9)
    spec = DenoiserSpec(kind="consistency", sigma_data=1.0, preconditioning="flow")
    assert type(spec.build(net)) is FlowConsistencyDenoiser
    assert type(DenoiserSpec(kind="consistency").build(net)) is ConsistencyDenoiser  # students before the field
    for kind, preconditioning in (("flow", "flow"), ("edm", "edm"), ("consistency", "vp")):
        with pytest.raises(EncdiffError, match="denoiser.preconditioning"):
            DenoiserSpec(kind=kind, preconditioning=preconditioning)


class ScaleNet(torch.nn.Module):
    """F(u; c_noise) = a(c_noise) u: enough to represent the Gaussian case's exact consistency function."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, u, c_noise, class_labels=None):
        return u * self.mlp(c_noise.float().view(-1, 1)).view(-1, 1, 1, 1)


def test_a_distilled_student_approaches_the_probability_flow_map_of_gaussian_data():
    """For x0 ~ N(0, s^2) the ODE maps x at sigma to x sqrt((s^2 + sigma_min^2) / (s^2 + sigma^2)) at sigma_min:
    that is the consistency function the loss must find, from a student that starts far from it."""
    torch.manual_seed(0)
    teacher = GaussianDenoiser(s=0.5)
    student = ConsistencyDenoiser(ScaleNet(), sigma_data=0.5)
    grid = distillation_grid(18, teacher)
    probabilities = torch.full((18,), 1 / 18, dtype=torch.float64)  # CD's uniform intervals: all get trained
    g = torch.Generator().manual_seed(0)
    x_test = torch.randn(64, 1, 4, 4, generator=g)
    sigmas = grid[1:]

    def error() -> float:
        with torch.no_grad():
            worst = 0.0
            for sigma in sigmas.tolist():
                x = x_test * (0.25 + sigma**2) ** 0.5
                exact = teacher.ode_solution(x, sigma, teacher.sigma_min)
                worst = max(worst, ((student(x, sigma) - exact).norm() / exact.norm()).item())
            return worst

    before = error()
    steps = 1500
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    for _ in range(steps):
        x0 = torch.randn(256, 1, 4, 4, generator=g) * 0.5
        loss = distillation_loss(student, teacher, x0, g, grid, probabilities, solver="heun")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    after = error()
    assert before > 0.9, before  # c_skip x alone is far from the map at every large sigma
    assert after < 0.1, (before, after)  # measured 0.056: the small network's fit, not the loss, limits it


def test_the_teacher_steps_have_their_order_local_error_h2_euler_h3_heun():
    teacher = GaussianDenoiser(s=0.5)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def local_error(solver: str, h: float) -> float:
        sigma, sigma_next = torch.full((8,), 2.0, dtype=torch.float64), torch.full((8,), 2.0 - h, dtype=torch.float64)
        exact = teacher.ode_solution(x, 2.0, 2.0 - h)
        return (ode_step(teacher, x, sigma, sigma_next, None, solver)[0] - exact).abs().max().item()

    for solver, order in (("euler", 2), ("heun", 3)):
        ratio = local_error(solver, 0.2) / local_error(solver, 0.1)
        assert abs(ratio - 2**order) < 0.25 * 2**order, (solver, ratio)


def test_pseudo_huber_is_l2_like_near_zero_and_zero_at_equality():
    a = torch.randn(3, 2, 4, 4)
    assert torch.equal(pseudo_huber(a, a, 0.01), torch.zeros(3))
    small = a * 1e-4
    torch.testing.assert_close(pseudo_huber(small, torch.zeros_like(a), 1.0),
                               small.square().flatten(1).sum(1) / 2, rtol=1e-3, atol=1e-12)


def test_the_intervals_are_drawn_from_the_discretised_log_normal():
    import math

    grid = distillation_grid(18, GaussianDenoiser(s=0.5))
    assert grid.dtype == torch.float64 and (grid[1:] > grid[:-1]).all()
    assert math.isclose(grid[0], 0.002, rel_tol=1e-12) and math.isclose(grid[-1], 80, rel_tol=1e-12)
    p = interval_probabilities(grid, -1.1, 2.0)
    cdf = [math.erf((math.log(s) + 1.1) / (2 * math.sqrt(2))) for s in grid.tolist()]
    expected = torch.tensor([b - a for a, b in zip(cdf, cdf[1:])], dtype=torch.float64)
    torch.testing.assert_close(p, expected / expected.sum())


class ExactConsistency:
    """The exact consistency function of N(0, s^2) data, as a denoiser the sampler can call."""

    sigma_min, sigma_max, num_classes, null_class = 0.002, 80.0, 0, False

    def __init__(self, s: float):
        self.teacher = GaussianDenoiser(s=s)

    def __call__(self, x, sigma, class_labels=None):
        return self.teacher.ode_solution(x, float(sigma), self.sigma_min)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_of_the_exact_function_draws_the_data_distribution(steps):
    f = ExactConsistency(s=0.7)
    sigmas = get_sigmas("consistency", steps, f)
    assert sigmas[0] == 80 and sigmas[-1] == 0 and len(sigmas) == steps + 1 and (sigmas[:-1] > f.sigma_min).all()
    x = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    out = sample_consistency(f, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert abs(out.std().item() - 0.7) < 0.02 and abs(out.mean().item()) < 0.02


def test_sampling_stores_explicit_levels_and_drops_them_when_the_step_count_changes():
    s = Sampling(sampler="consistency", steps=2, schedule="consistency", sigmas=[80, 1.5])
    assert s.sigmas == (80.0, 1.5)
    assert s.grid(None).tolist() == [80.0, 1.5, 0.0]
    assert s.but(steps=2).sigmas == (80.0, 1.5) and s.but(steps=1).sigmas is None
    for bad in ([80], [1.5, 80], [80, -1], [80, float("nan")]):
        with pytest.raises(EncdiffError, match="sampling.sigmas"):
            Sampling(steps=2, sigmas=bad)


def test_stage_fields_keep_each_stage_to_its_own_options():
    consistency, diffusion = set(stage_fields("consistency")), set(stage_fields("diffusion"))
    assert {"teacher", "guidance", "guidance_interval", "intervals", "label_dropout", "steps"} <= consistency
    assert not {"model", "autoencoder", "kl_weight", "sigma_data"} & consistency
    assert not {"teacher", "guidance", "intervals"} & diffusion and "model" in diffusion


# -- encdiff distill: the common trainer ------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return colour_classes(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    generator = Generator(randomize_(UNet(TINY)), DenoiserSpec(kind="edm", sigma_data=0.5), None,
                          ["class0", "class1", "class2"], Sampling(steps=4, guidance_scale=2.0))
    return generator.save_pretrained(tmp_path_factory.mktemp("teacher") / "gen")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "encdiff", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def distill_args(teacher: Path, data: Path, run_dir: Path, steps: int) -> list[str]:
    return ["distill", str(teacher), str(data), "--resolution", "16", "--batch-size", "8", "--steps", str(steps),
            "--checkpoint-every", "2", "--keep-last", "10", "--log-every", "2", "--sample-every", "0",
            "--workers", "0", "--warmup-steps", "1", "--intervals", "6", "--run-dir", str(run_dir)]


def state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "state.safetensors"))


def test_distill_makes_a_student_folder_that_samples_in_two_steps_with_guidance_built_in(teacher, image_folder,
                                                                                         tmp_path):
    run_dir = tmp_path / "student"
    result = cli(*distill_args(teacher, image_folder, run_dir, 4), "--sample-every", "4")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "samples-00000004.png").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    info = json.loads((run_dir / "model" / "generator.json").read_text())
    assert info["denoiser"]["kind"] == "consistency"
    assert info["sampling"] == {"sampler": "consistency", "steps": 2, "schedule": "consistency",
                                "guidance_scale": None, "sigmas": None,
                                "guidance_interval": None, "guidance_kind": "classifier-free", "decoder": "full"}
    assert info["distillation"]["guidance_scale"] == 2.0 and info["distillation"]["images"] == 32
    student = Generator.from_pretrained(run_dir / "model")
    calls = []
    original = student.unet.forward
    student.unet.forward = lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    images = student.images([0, 1, 2], torch.tensor([0, 1, 2]))
    assert images.shape == (3, 3, 16, 16) and calls == [3, 3]  # two evaluations, one batch each: no guidance pass
    with pytest.raises(EncdiffError, match="built in .scale 2.0."):
        student.images([0], torch.tensor([0]), guidance_scale=3.0)
    # The library and the CLI give the same pixels; export keeps the student's sampling and record.
    sample = cli("sample", str(run_dir / "model"), "--num", "3", "--class", "1", "--out", str(tmp_path / "s.png"),
                 "--out-dir", str(tmp_path / "s"))
    assert sample.returncode == 0, sample.stderr
    first = np.asarray(Image.open(tmp_path / "s" / "000000.png"))
    student.unet.forward = original
    assert np.array_equal(first, student.images([0], torch.tensor([1]))[0].permute(1, 2, 0).numpy())
    exported = cli("export", str(run_dir), str(tmp_path / "exported"), "--sigmas", "80", "0.5")
    assert exported.returncode == 0, exported.stderr
    info = json.loads((tmp_path / "exported" / "generator.json").read_text())
    assert info["sampling"]["sigmas"] == [80.0, 0.5] and info["distillation"]["images"] == 32


def test_distill_resumes_exactly(teacher, image_folder, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli(*distill_args(teacher, image_folder, whole, 4)).returncode == 0
    assert cli(*distill_args(teacher, image_folder, split, 2)).returncode == 0
    resumed = cli(*distill_args(teacher, image_folder, split, 4))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    a, b = state(whole, 4), state(split, 4)
    keys = [k for k in a if k.startswith(("model.", "ema.", "optimizer."))]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    # Another teacher under the same path is refused, naming both hashes.
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    assert cli(*distill_args(copy, image_folder, tmp_path / "third", 2)).returncode == 0
    generator = Generator.from_pretrained(copy)
    randomize_(generator.unet, seed=5)
    generator.save_pretrained(copy)
    changed = cli(*distill_args(copy, image_folder, tmp_path / "third", 4))
    assert changed.returncode == 2 and "not the teacher this run was distilling" in changed.stderr, changed.stderr


@pytest.mark.slow  # two torchrun processes
def test_two_gloo_processes_distil_like_one(teacher, image_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
                             str(29600 + os.getpid() % 1000), "-m", "encdiff",
                             *distill_args(teacher, image_folder, tmp_path / "ddp", 2)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli(*distill_args(teacher, image_folder, tmp_path / "one", 2)).returncode == 0
    ddp, one = state(tmp_path / "ddp", 2), state(tmp_path / "one", 2)
    for key in (k for k in one if k.startswith(("model.", "ema."))):
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_distill_refuses_what_it_cannot_do_with_one_line(teacher, image_folder, tmp_path):
    unconditional = Generator(randomize_(UNet(UNetConfig(**{**TINY.__dict__, "num_classes": 0, "null_class": False}))),
                              DenoiserSpec(kind="edm"), None).save_pretrained(tmp_path / "uncond")
    cases = [
        ([str(unconditional), str(image_folder), "--guidance", "2"], "unconditional"),
        ([str(teacher), str(image_folder), "--resolution", "32"], "makes 16x16 images"),
        ([str(tmp_path / "missing"), str(image_folder)], "missing"),
        ([str(teacher), str(image_folder), "--solver", "rk4"], "solver"),
    ]
    for args, message in cases:
        result = cli("distill", *args, "--run-dir", str(tmp_path / "r"), "--workers", "0")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(flat / f"{i}.png")
    result = cli("distill", str(teacher), str(flat), "--resolution", "16", "--run-dir", str(tmp_path / "r2"),
                 "--workers", "0")
    assert result.returncode == 2 and "conditional on 3 classes" in result.stderr


def test_the_bundled_teacher_distils_on_latents(tmp_path):
    """The shipped generator as teacher: latents cached as in stage 2, the student keeps the teacher's decoder."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]:
        (root / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / "0.png")
    from encdiff.pipeline import bundled_path

    config = TrainConfig(data=str(root), run_dir=str(tmp_path / "run"), teacher=str(bundled_path()), steps=1,
                         batch_size=4, log_every=1, sample_every=0, workers=0, warmup_steps=1)
    out = train_consistency(config)
    assert len(list((tmp_path / "run" / "cache").glob("latents-*.safetensors"))) == 1
    student = Generator.from_pretrained(out)
    teacher = Generator.bundled()
    assert student.distillation["guidance_scale"] == teacher.sampling.guidance_scale  # the teacher's own default
    for key, value in teacher.autoencoder.state_dict().items():
        assert torch.equal(student.autoencoder.state_dict()[key], value)
    assert student.images([0, 1], torch.tensor([3, 5])).shape == (2, 3, 32, 32)


def test_distillation_guides_the_teacher_only_inside_its_interval(teacher):
    # The teacher's ODE step guided in (lo, hi] only: an interval holding every sigma is plain guidance bit for bit,
    # an empty one the unguided teacher; one in between guides exactly the images whose levels lie inside.
    generator = Generator.from_pretrained(teacher)
    denoiser = generator.spec.build(generator.unet)
    student = ConsistencyDenoiser(generator.unet, sigma_data=0.5)
    grid = distillation_grid(6, denoiser)
    probabilities = interval_probabilities(grid, -1.1, 2.0)
    x0 = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss(**guidance):
        return distillation_loss(student, denoiser, x0, torch.Generator().manual_seed(2), grid, probabilities,
                                 class_labels=labels, **guidance)

    plain = loss(guidance_scale=3.0)
    assert torch.equal(loss(guidance_scale=3.0, guidance_interval=(0.0, 1e9)), plain)
    unguided = loss()
    assert torch.equal(loss(guidance_scale=3.0, guidance_interval=(5.0, 5.0)), unguided)
    assert not torch.equal(plain, unguided)
    middle = loss(guidance_scale=3.0, guidance_interval=(float(grid[2]), float(grid[4])))
    assert not torch.equal(middle, plain) and not torch.equal(middle, unguided)


def test_an_autoguided_unconditional_teacher_distils_its_autoguidance_into_the_student(tmp_path):
    """A teacher that samples with autoguidance (its guide, e.g. from `train --guide-at`) is distilled along the
    autoguided ODE: guided by the teacher itself it is the unguided loss, by another guide not; the student records
    the kind and `info` says it."""
    uncond = UNetConfig(**{**TINY.__dict__, "num_classes": 0, "null_class": False})
    main, other = randomize_(UNet(uncond)), randomize_(UNet(uncond), seed=1)
    spec = DenoiserSpec(kind="edm", sigma_data=0.5)
    denoiser, guide = spec.build(main), spec.build(other)
    student = ConsistencyDenoiser(main, sigma_data=0.5)
    grid = distillation_grid(6, denoiser)
    probabilities = interval_probabilities(grid, -1.1, 2.0)
    x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss(**guidance):
        return distillation_loss(student, denoiser, x0, torch.Generator().manual_seed(2), grid, probabilities,
                                 **guidance)

    assert torch.equal(loss(guidance_scale=3.0, guide=denoiser), loss())
    assert not torch.equal(loss(guidance_scale=3.0, guide=guide), loss())

    teacher = Generator(main, spec, None, sampling=Sampling(steps=4, guidance_scale=2.0, guidance_kind="auto"),
                        guide=other).save_pretrained(tmp_path / "teacher")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(flat / f"{i}.png")
    result = cli(*distill_args(teacher, flat, tmp_path / "student", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with autoguidance 2 at every sigma" in result.stderr
    distilled = Generator.from_pretrained(tmp_path / "student" / "model").distillation
    assert (distilled["guidance_kind"], distilled["guidance_scale"]) == ("auto", 2.0)
    described = cli("info", str(tmp_path / "student" / "model"))
    assert "distilled: autoguidance 2 at every sigma built in" in described.stdout, described.stdout


def test_a_flow_teacher_distils_into_a_flow_consistency_student(image_folder, tmp_path):
    """distill takes a flow-matching teacher: the student keeps its preconditioning (recorded in generator.json),
    starts as the teacher's D, and samples in two evaluations with the guidance built in."""
    net = randomize_(UNet(TINY))
    teacher = Generator(net, DenoiserSpec(kind="flow", sigma_data=1.0), None, ["class0", "class1", "class2"],
                        Sampling(steps=4, guidance_scale=2.0)).save_pretrained(tmp_path / "teacher")
    result = cli(*distill_args(teacher, image_folder, tmp_path / "student", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "student" / "model" / "generator.json").read_text())
    assert (info["denoiser"]["kind"], info["denoiser"]["preconditioning"]) == ("consistency", "flow")
    student = Generator.from_pretrained(tmp_path / "student" / "model")
    assert type(student.denoiser) is FlowConsistencyDenoiser
    assert student.images([0, 1], torch.tensor([0, 2])).shape == (2, 3, 16, 16)
    assert "denoiser consistency (of a flow teacher)" in cli("info", str(tmp_path / "student" / "model")).stdout
    # Before a step the student is its teacher's D wherever sigma >> sigma_min.
    fresh = FlowConsistencyDenoiser(net)
    x, labels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 5, torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 5.0, labels), FlowDenoiser(net)(x, 5.0, labels), rtol=1e-3, atol=1e-3)
    vp = Generator(randomize_(UNet(TINY)), DenoiserSpec(kind="vp"), None, ["class0", "class1", "class2"],
                   Sampling(steps=4)).save_pretrained(tmp_path / "vp")
    refused = cli(*distill_args(vp, image_folder, tmp_path / "vp-student", 2))
    assert refused.returncode == 2 and "'vp' generator" in refused.stderr and "Traceback" not in refused.stderr


def test_distill_follows_the_teachers_interval_and_resumes_only_with_the_same_guidance(teacher, image_folder,
                                                                                        tmp_path):
    with_interval = tmp_path / "teacher"
    shutil.copytree(teacher, with_interval)
    assert cli("set-sampling", str(with_interval), "--guidance-interval", "0.5", "10").returncode == 0
    run_dir = tmp_path / "student"
    first = cli(*distill_args(with_interval, image_folder, run_dir, 2))
    assert first.returncode == 0, first.stderr
    assert ("the student learns the teacher's ODE with guidance 2 in sigma (0.5, 10] (scale: the teacher's, interval: "
            "the teacher's)") in first.stderr
    info = json.loads((run_dir / "model" / "generator.json").read_text())
    assert info["distillation"]["guidance_scale"] == 2.0 and info["distillation"]["guidance_interval"] == [0.5, 10]
    described = cli("info", str(run_dir / "model"))
    assert "distilled: guidance 2 in sigma (0.5, 10] built in" in described.stdout, described.stdout
    # The teacher's stored sampling changed since (its weights did not): the resume is refused with the flags that
    # continue the run as it started, and continues with them.
    assert cli("set-sampling", str(with_interval), "--no-guidance-interval").returncode == 0
    other = cli(*distill_args(with_interval, image_folder, run_dir, 4))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert ("distilling with guidance 2 in sigma (0.5, 10], now with guidance 2 at every sigma; resume with "
            "--guidance 2.0 --guidance-interval 0.5 10") in other.stderr, other.stderr
    assert cli("set-sampling", str(with_interval), "--guidance-interval", "0.5", "10").returncode == 0
    resumed = cli(*distill_args(with_interval, image_folder, run_dir, 4))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    # --no-guidance-interval guides at every sigma; an interval without guidance, or with its opposite, is refused.
    everywhere = tmp_path / "everywhere"
    assert cli(*distill_args(with_interval, image_folder, everywhere, 2), "--no-guidance-interval").returncode == 0
    assert json.loads((everywhere / "model" / "generator.json").read_text())["distillation"]["guidance_interval"] is None
    for flags, message in ((["--guidance", "1", "--guidance-interval", "0.5", "10"], "distilled without guidance"),
                           (["--guidance-interval", "10", "0.5"], "0 <= lo <= hi"),
                           (["--guidance-interval", "1", "2", "--no-guidance-interval"], "not allowed with")):
        result = cli(*distill_args(with_interval, image_folder, tmp_path / "refused", 2), *flags)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_shipped_distillation_recipe_costs_under_a_sixth_of_the_teachers_images():
    from encdiff.training import load_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "cifar10"
    student = load_config(str(configs / "distill.toml"), None, "consistency", {})
    # The shipped teacher's U-Net saw 4,365 x 512 images: the steps its time budget fitted on the H200
    # (configs/cifar10-v0.5/diffusion.toml plans 20,000; BENCHMARKS.md, the shipped model's stage table).
    teacher_images = 4_365 * 512
    assert student.guidance == 5.0 and student.guidance_interval == () and student.student_steps == 2
    assert student.steps * student.batch_size <= teacher_images / 6
