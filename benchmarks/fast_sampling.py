"""The fast path on a CPU against diffusers, measured in interleaved pairs in one process (issue 22).

    PYTHONPATH=src python benchmarks/fast_sampling.py [--pairs 5] [--batch 100] [--precision auto]
    PYTHONPATH=src python benchmarks/fast_sampling.py --student DIR --teacher DIR --skip-cli
    PYTHONPATH=src python benchmarks/fast_sampling.py --compile    # also the compiled rows (minutes to compile)
    PYTHONPATH=src python benchmarks/fast_sampling.py --device cuda --precision bf16   # the GPU row (issue 22)

Rows, each noise (or latents) to the same output on both sides, batch 100 unless told:
- the consistency student at its own defaults (2 evaluations, its default decoder) against diffusers'
  DPM-Solver++(2M) loop (EDM's; the flow-sigma one for a flow teacher) over the teacher's weights at the teacher's
  steps and guidance scale (20 steps, every step guided: 40 evaluations), float32 as diffusers runs on a CPU;
- the same student through the full decoder, and through the light one where it has one;
- one teacher U-Net evaluation of the batch: encdiff's Denoiser in encdiff's precision against diffusers' float32
  (its UNet2DModel holding the same weights; for a magnitude-preserving teacher, which diffusers has no class for, its
  loop calls encdiff's network in float32 as diffusers would call any model);
- the full decoder against the light one (encdiff, both in encdiff's precision);
- with --compile, the student's default row and the teacher's evaluation again through torch.compile'd networks
  (`Generator(compile=True)`, as `encdiff --compile` samples), with the seconds the first call spent compiling;
- `encdiff sample --fast` as a user runs it (a new process: start-up, loading, 100 images, PNG), wall seconds.

On a GPU (`--device cuda`) both sides run there, and with `--precision bf16` diffusers' networks run under bf16 autocast
too (GPU users run diffusers in half precision); timings wait for the GPU to finish; the CLI row, which runs on the
CPU, is left out.

A shared machine moves these numbers by 2-3x between runs, so each row is timed in pairs, the order swapped every
pair; the ratio of each pair is printed with the median and range, with the load average before and after. A row
whose ratios spread by more than SPREAD is marked as too wide to trust.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from encdiff.backbones import backbone_name
from encdiff.pipeline import Generator, bundled_path
from encdiff.precision import autocast, cpu_info, inference_precision, native_bf16

from networks import diffusers_loop, diffusers_unet, diffusers_vae, peer_scheduler

SPREAD = 1.3  # max / min of a row's pair ratios above which the row is not to be trusted


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def pairs(ours: Callable[[], object], theirs: Callable[[], object], n: int) -> tuple[list[float], list[float]]:
    """Seconds of `ours` and `theirs` in n interleaved pairs, the order swapped every pair (after one warm-up each);
    on a GPU each call is timed to the end of its kernels."""
    ours(), theirs()
    mine, other = [], []
    for i in range(n):
        for f, out in ((ours, mine), (theirs, other)) if i % 2 == 0 else ((theirs, other), (ours, mine)):
            synchronize()
            start = time.perf_counter()
            f()
            synchronize()
            out.append(time.perf_counter() - start)
    return mine, other


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def report(name: str, mine: list[float], other: list[float], peer: str, batch: int) -> None:
    ratios = [b / a for a, b in zip(mine, other)]
    spread = max(ratios) / min(ratios)
    flag = f"  SPREAD {spread:.2f}x: too wide to trust" if spread > SPREAD else ""
    print(f"| {name} | {batch / statistics.median(mine):.1f} | {peer} {batch / statistics.median(other):.1f} | "
          f"**{statistics.median(ratios):.2f}x** | {min(ratios):.2f}-{max(ratios):.2f}x |{flag}", flush=True)


def their_network(teacher: Generator, device: torch.device):
    """The teacher's U-Net as diffusers calls a model: (scaled x, timestep, labels) -> .sample, in float32."""
    if backbone_name(teacher.unet) == "unet":
        return diffusers_unet(teacher.unet).to(device), "diffusers UNet2DModel"
    net = teacher.unet.float().to(device).eval()
    null = net.config.num_classes

    def call(x, t, labels):
        return SimpleNamespace(sample=net(x, torch.as_tensor(t, dtype=x.dtype).expand(len(x)), labels))

    call.config = SimpleNamespace(in_channels=net.config.in_channels, sample_size=net.config.sample_size,
                                  num_class_embeds=null + 1)
    return call, "encdiff's MP U-Net called by diffusers' loop (diffusers has no such class)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="consistency student folder (default: the bundled student)")
    parser.add_argument("--teacher", help="its teacher's folder (default: the bundled generator)")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs per row (at least 5 to trust a ratio)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--precision", choices=("float32", "bf16", "auto"),
                        help="encdiff's inference precision (default: ENCDIFF_PRECISION, else encdiff's default)")
    parser.add_argument("--compile", action="store_true", help="add the compiled rows (each new shape compiles "
                        "once: minutes cold, seconds from TorchInductor's on-disk cache)")
    parser.add_argument("--skip-cli", action="store_true", help="do not time `encdiff sample --fast`")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: both sides on the GPU (the CLI row is left out)")
    args = parser.parse_args()
    if args.precision:
        os.environ["ENCDIFF_PRECISION"] = args.precision
    device = torch.device(args.device)
    student = Generator.from_pretrained(args.student or bundled_path(student=True), device=device)
    teacher = Generator.from_pretrained(args.teacher or bundled_path(), device=device)
    import diffusers

    precision = inference_precision(device.type)
    # diffusers on a GPU runs in half precision when encdiff does: the comparison a GPU user would make
    their_precision = "bf16" if device.type == "cuda" and precision == "bf16" else "float32"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}"
    else:
        model, flags = cpu_info()
        # An instruction-set limit emulates an older CPU on this one (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2:
        # no usable bf16): said, since the flags still read as this CPU's.
        limits = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                  if os.environ.get(k)]
        where = (f"{model}, {os.cpu_count()} CPUs, native bf16: {'yes' if native_bf16(flags) else 'no'}; "
                 f"{torch.get_num_threads()} threads; ATen vector ISA {torch.backends.cpu.get_cpu_capability()}"
                 + (f", limited by {' '.join(limits)}" if limits else ""))
    print(f"{where}; torch {torch.__version__}, diffusers {diffusers.__version__}; encdiff runs its networks in "
          f"{precision}, diffusers in {their_precision}; load average before: {load()}\n")
    batch = args.batch
    labels = (torch.arange(batch) % max(teacher.num_classes, 1)).to(device) if teacher.num_classes else None
    seeds = list(range(batch))
    their_unet, their_name = their_network(teacher, device)
    their_vae = diffusers_vae(teacher.autoencoder).to(device)
    scheduler = peer_scheduler(teacher.spec)
    w = teacher.sampling.guidance_scale

    def their_precision_context():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=their_precision == "bf16")

    def diffusers_teacher():
        with their_precision_context():
            diffusers_loop(their_unet, their_vae, teacher.autoencoder.config, scheduler, labels,
                           teacher.sampling.steps, w)

    steps = student.sampling.steps
    print(f"| noise to uint8, batch {batch} | encdiff img/s | peer img/s | ratio (median) | range |")
    print("|---|---|---|---|---|")
    peer = (f"diffusers DPM++(2M) {teacher.sampling.steps} steps, guidance {w or 'none'} "
            f"({teacher.sampling.steps * (2 if w else 1)} NFE, {their_precision}):")
    decoders = ["full"] + (["light"] if student.light_decoder is not None else [])
    for decoder in [student.sampling.decoder] + [d for d in decoders if d != student.sampling.decoder]:
        mine, other = pairs(lambda: student.images(seeds, labels, steps=steps, decoder=decoder), diffusers_teacher,
                            args.pairs)
        report(f"student, {steps} NFE, {decoder} decoder{' (its default)' if decoder == student.sampling.decoder else ''}",
               mine, other, peer, batch)

    g = torch.Generator().manual_seed(0)
    c = teacher.unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g).to(device)
    sigma = torch.ones(batch, device=device)
    scaled = x / (1 + teacher.spec.sigma_data ** 2) ** 0.5
    t = sigma.log() / 4

    def ours_nfe():
        with torch.inference_mode(), autocast(device):
            teacher.denoiser(x, sigma, labels)

    def theirs_nfe():
        with torch.inference_mode(), their_precision_context():
            their_unet(scaled, t[0], labels)

    mine, other = pairs(ours_nfe, theirs_nfe, args.pairs)
    report(f"teacher, one network evaluation ({precision})", mine, other, f"{their_name}, {their_precision}:", batch)

    if args.compile:
        fast_student, fast_teacher = student.with_compile(), teacher.with_compile()
        decoder = student.sampling.decoder

        def student_compiled():
            fast_student.images(seeds, labels, steps=steps, decoder=decoder)

        def nfe_compiled():
            with torch.inference_mode(), autocast(device):
                fast_teacher.denoiser(x, sigma, labels)

        for name, f, peer_f, peer_name in (
                (f"student, {steps} NFE, {decoder} decoder, compiled", student_compiled, diffusers_teacher, peer),
                (f"teacher, one network evaluation ({precision}, compiled)", nfe_compiled, theirs_nfe,
                 f"{their_name}, {their_precision}:")):
            start = time.perf_counter()
            f()  # compiles every graph this row runs
            compiling = time.perf_counter() - start
            mine, other = pairs(f, peer_f, args.pairs)
            report(name + f" (first call {compiling:.0f} s)", mine, other, peer_name, batch)

    if student.light_decoder is not None:
        latents = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g).to(device)
        mine, other = pairs(lambda: student.decode(latents, "light"), lambda: student.decode(latents, "full"),
                            args.pairs)
        report(f"light decoder ({precision})", mine, other, "encdiff's full decoder:", batch)
    print(f"\nload average after: {load()}")

    if not args.skip_cli and device.type == "cpu":
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        walls = []
        with tempfile.TemporaryDirectory() as tmp:
            # the bundled student is what --fast samples; another student samples at its own (few-step) defaults
            what = [args.student] if args.student else ["--fast"]
            command = [sys.executable, "-m", "encdiff", "sample", *what, "--out", f"{tmp}/fast.png"]
            for _ in range(args.pairs):
                start = time.perf_counter()
                subprocess.run(command, env=env, check=True, capture_output=True)
                walls.append(time.perf_counter() - start)
        print(f"`encdiff sample {what[0]}`: {statistics.median(walls):.2f} s wall (median of {len(walls)}, range "
              f"{min(walls):.2f}-{max(walls):.2f}; load average {load()})")


if __name__ == "__main__":
    main()
