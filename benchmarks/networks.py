"""Speed of encdiff's networks against diffusers' at identical configs and weights, in one process.

For each network: inference (forward under inference_mode; for the autoencoder, encode then decode)
and a full training step (forward, loss, backward, AdamW step). Runs alternate ours / diffusers so
machine noise hits both; the median of the repeats is reported, with the throughput ratio
ours / diffusers (> 1: encdiff is faster).

    python benchmarks/networks.py                    # the full table (about 10 minutes on 2 cores)
    python benchmarks/networks.py --only latent_8x8 --repeats 3
    python benchmarks/networks.py --only sampling     # the bundled generator's shape, 20 DPM++(2M) steps

Sampling: a whole generation, noise -> 20 steps of DPM-Solver++(2M) on EDM's Karras grid
-> decoded pixels, with the bundled CIFAR-10 generator's networks (`cifar10_latent` U-Net, `cifar10_small`
autoencoder, same random weights): encdiff's `Generator.images` against diffusers' own
EDMDPMSolverMultistepScheduler loop, with and without classifier-free guidance (cond and uncond in one batch,
as diffusers' pipelines do).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from encdiff import Autoencoder, UNet, presets

from encdiff.pipeline import DenoiserSpec, Generator

try:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler, UNet2DModel
except ImportError as e:  # a benchmark dependency, not a runtime one
    raise SystemExit(f"this benchmark compares against diffusers: pip install 'encdiff[test]' ({e})")


@dataclass
class Case:
    name: str  # preset name
    kind: str  # "unet" or "autoencoder"
    infer_batch: int
    train_batch: int


CASES = [
    Case("cifar10_f4", "autoencoder", 32, 16),
    Case("pixel_small", "unet", 32, 16),
    Case("ddpm_cifar10", "unet", 16, 8),
    Case("latent_8x8", "unet", 64, 32),
]


def build_pair(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our network and diffusers' with the same config and the same (random) weights."""
    torch.manual_seed(0)
    if case.kind == "unet":
        ours = UNet(presets.UNETS[case.name])
        config = {k: v for k, v in UNet.config_to_diffusers(ours.config).items() if not k.startswith("_")}
        theirs = UNet2DModel(**config)
    else:
        ours = Autoencoder(presets.AUTOENCODERS[case.name])
        theirs = AutoencoderKL(**Autoencoder.config_to_diffusers(ours.config))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_steps(case: Case, ours, theirs, mode: str) -> dict[str, Callable[[], None]]:
    """One callable per library performing one inference pass or one training step."""
    g = torch.Generator().manual_seed(0)
    batch = case.infer_batch if mode == "inference" else case.train_batch
    size = ours.config.sample_size
    x = torch.randn(batch, ours.config.in_channels, size, size, generator=g)
    if case.kind == "unet":
        t = torch.rand(batch, generator=g) * 999
        labels = torch.randint(0, ours.config.num_classes, (batch,), generator=g) if ours.config.num_classes else None
        target = torch.randn(x.shape, generator=g)
        run = {"encdiff": lambda: ours(x, t, labels), "diffusers": lambda: theirs(x, t, labels).sample}
        loss_fn = {k: (lambda f: lambda: F.mse_loss(f(), target))(f) for k, f in run.items()}
    else:
        x = x.clamp(-1, 1)
        run = {"encdiff": lambda: ours.decode(ours.encode(x)),
               "diffusers": lambda: theirs.decode(theirs.encode(x).latent_dist.mean).sample}

        def ours_loss():
            reconstruction, posterior = ours(x, generator=torch.Generator().manual_seed(1))
            return F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()

        def theirs_loss():
            posterior = theirs.encode(x).latent_dist
            reconstruction = theirs.decode(posterior.sample(torch.Generator().manual_seed(1))).sample
            return F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()

        loss_fn = {"encdiff": ours_loss, "diffusers": theirs_loss}

    if mode == "inference":
        ours.eval(), theirs.eval()

        def infer(f):
            def step():
                with torch.inference_mode():
                    f()
            return step

        return {k: infer(f) for k, f in run.items()}

    ours.train(), theirs.train()
    optimizers = {"encdiff": torch.optim.AdamW(ours.parameters(), lr=1e-4),
                  "diffusers": torch.optim.AdamW(theirs.parameters(), lr=1e-4)}

    def train(name):
        def step():
            loss_fn[name]().backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return step

    return {k: train(k) for k in run}


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call, alternating the libraries every repeat."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def sampling_steps(batch: int, guidance: float | None, steps: int = 20) -> dict[str, Callable[[], None]]:
    """One image batch from noise to pixels per call, for each library, with the same networks and NFE."""
    torch.manual_seed(0)
    unet, autoencoder = UNet(presets.UNETS["cifar10_latent"]), Autoencoder(presets.AUTOENCODERS["cifar10_small"])
    for module in (unet, autoencoder):  # our init zeroes output layers: random weights make the work real
        for p in module.parameters():
            p.data.normal_(0, 0.02)
    sigma_data = 1.0
    ours = Generator(unet, DenoiserSpec(kind="edm", sigma_data=sigma_data), autoencoder, [str(i) for i in range(10)])
    their_unet, their_vae = diffusers_pair(unet, autoencoder)
    scheduler = EDMDPMSolverMultistepScheduler(sigma_data=sigma_data, solver_order=2, final_sigmas_type="zero")
    labels = torch.arange(batch) % 10

    def encdiff_run():
        ours.images(list(range(batch)), labels, sampler="dpmpp_2m", steps=steps, guidance_scale=guidance)

    def diffusers_run():
        diffusers_loop(their_unet, their_vae, autoencoder.config, scheduler, labels, steps, guidance)

    return {"encdiff": encdiff_run, "diffusers": diffusers_run}


def peer_scheduler(spec: DenoiserSpec):
    """The DPM-Solver++(2M) a diffusers user would sample this denoiser with: the EDM one on Karras' grid, and for a
    flow-matching model (version 0.6's teacher) the flow-sigma one over the velocity. The same steps and network
    evaluations either way; the peer's loop is there for its cost (its timestep is diffusers' convention, not the
    conditioning encdiff's network was trained on, so its images are not the teacher's)."""
    if spec.kind == "flow":
        return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
                                           solver_order=2, final_sigmas_type="zero")
    return EDMDPMSolverMultistepScheduler(sigma_data=spec.sigma_data, solver_order=2, final_sigmas_type="zero")


def diffusers_pair(unet: UNet, autoencoder: Autoencoder) -> tuple[UNet2DModel, AutoencoderKL]:
    """diffusers' U-Net and VAE holding our networks' weights."""
    return diffusers_unet(unet), diffusers_vae(autoencoder)


def diffusers_unet(unet: UNet) -> UNet2DModel:
    """diffusers' U-Net holding our U-Net's weights."""
    config = {k: v for k, v in UNet.config_to_diffusers(unet.config).items() if not k.startswith("_")}
    their_unet = UNet2DModel(**config).eval()
    their_unet.load_state_dict(unet.state_dict())
    return their_unet


def diffusers_vae(autoencoder: Autoencoder) -> AutoencoderKL:
    """diffusers' VAE holding our autoencoder's weights."""
    their_vae = AutoencoderKL(**Autoencoder.config_to_diffusers(autoencoder.config)).eval()
    their_vae.load_state_dict(autoencoder.state_dict())
    return their_vae


@torch.inference_mode()
def diffusers_loop(their_unet, their_vae, ae_config, scheduler, labels, steps: int, guidance: float | None) -> None:
    """A batch from noise to uint8 pixels as a diffusers user writes it: the scheduler's loop, classifier-free
    guidance by batching the null class, the VAE decoding the unscaled latents; on the labels' device."""
    c = their_unet.config
    device = labels.device
    shift = torch.as_tensor(ae_config.shift_factor or 0.0, dtype=torch.float32, device=device)
    shift = shift.view(1, -1, 1, 1) if shift.ndim else shift
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(labels), c.in_channels, c.sample_size, c.sample_size, generator=g).to(device)
    latents = latents * scheduler.init_noise_sigma
    both = torch.cat([labels, torch.full_like(labels, c.num_class_embeds - 1)])
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guidance else latents
        out = their_unet(scheduler.scale_model_input(x, t), t, both if guidance else labels).sample
        if guidance:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    pixels = their_vae.decode(latents / ae_config.scaling_factor + shift).sample
    ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def student_steps(student_folder: str, batch: int, steps: int = 2) -> dict[str, Callable[[], None]]:
    """The distilled student's `steps`-evaluation sampling (encdiff) against the teacher it came from, sampled as
    diffusers does it: its DPM-Solver++(2M) loop at the teacher's steps and scale, every step guided (40 NFE)."""
    student = Generator.from_pretrained(student_folder)
    teacher = Generator.bundled()
    their_unet, their_vae = diffusers_pair(teacher.unet, teacher.autoencoder)
    scheduler = peer_scheduler(teacher.spec)
    labels = torch.arange(batch) % 10

    def encdiff_run():
        student.images(list(range(batch)), labels, steps=steps)

    def diffusers_run():
        diffusers_loop(their_unet, their_vae, teacher.autoencoder.config, scheduler, labels, teacher.sampling.steps,
                       teacher.sampling.guidance_scale)

    return {"encdiff": encdiff_run, "diffusers": diffusers_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per library (median reported)")
    parser.add_argument("--only", nargs="*", help="preset names to run (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--student", help="a consistency student of the bundled generator: time its 1- and "
                        "2-step sampling against diffusers' loop over the teacher (run with --only student)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, float32, CPU\n")
    print("| network | params | mode | batch | encdiff img/s | diffusers img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        for mode in ("inference", "training"):
            ours, theirs = build_pair(case)
            seconds = measure(make_steps(case, ours, theirs, mode), args.repeats)
            batch = case.infer_batch if mode == "inference" else case.train_batch
            params = sum(p.numel() for p in ours.parameters()) / 1e6
            ours_ips, theirs_ips = batch / seconds["encdiff"], batch / seconds["diffusers"]
            print(f"| {case.kind} {case.name} | {params:.1f}M | {mode} | {batch} | {ours_ips:.1f} | "
                  f"{theirs_ips:.1f} | {ours_ips / theirs_ips:.2f} |", flush=True)
    if args.student:
        print("\n| sampling, same teacher weights | NFE | batch | encdiff student img/s | diffusers teacher loop img/s "
              "(DPM++(2M), 20 steps, guidance 3, NFE 40) | ratio |")
        print("|---|---|---|---|---|---|")
        batch = 100
        for steps in (1, 2):
            seconds = measure(student_steps(args.student, batch, steps), max(3, args.repeats // 2), warmup=1)
            ours_ips, theirs_ips = batch / seconds["encdiff"], batch / seconds["diffusers"]
            print(f"| consistency student, {steps} step{'s' if steps > 1 else ''} | {steps} | {batch} | "
                  f"{ours_ips:.1f} | {theirs_ips:.1f} | {ours_ips / theirs_ips:.1f} |", flush=True)
    if args.only and "sampling" not in args.only:
        return
    print("\n| sampling (bundled generator's networks, 20 steps DPM++(2M)) | guidance | batch | encdiff img/s | "
          "diffusers img/s | ratio |")
    print("|---|---|---|---|---|---|")
    batch = 100
    for guidance in (None, 2.0):
        seconds = measure(sampling_steps(batch, guidance), max(3, args.repeats // 2), warmup=1)
        ours_ips, theirs_ips = batch / seconds["encdiff"], batch / seconds["diffusers"]
        nfe = "40 (20 x 2)" if guidance else "20"
        print(f"| U-Net cifar10_latent + decoder cifar10_small, NFE {nfe} | {guidance or 'none'} | {batch} | "
              f"{ours_ips:.1f} | {theirs_ips:.1f} | {ours_ips / theirs_ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
