"""Speed of encdiff's networks against diffusers' at identical configs and weights, in one process.

For each network: inference (forward under inference_mode; for the autoencoder, encode then decode)
and a full training step (forward, loss, backward, AdamW step). Runs alternate ours / diffusers so
machine noise hits both; the median of the repeats is reported, with the throughput ratio
ours / diffusers (> 1: encdiff is faster).

    python benchmarks/networks.py                    # the full table (about 10 minutes on 2 cores)
    python benchmarks/networks.py --only latent_8x8 --repeats 3
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

try:
    from diffusers import AutoencoderKL, UNet2DModel
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per library (median reported)")
    parser.add_argument("--only", nargs="*", help="preset names to run (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
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


if __name__ == "__main__":
    main()
