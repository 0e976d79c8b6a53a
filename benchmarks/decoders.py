"""Decoding speed: the light decoder against the full decoder it stands in for, in one process, interleaved.

Both decode the same normalised latents (batch 100) of a generator's autoencoder: its own full decoder, and a light
decoder shaped for it (`LightDecoder.for_autoencoder`; a trained one from a generator folder with --generator).
Each round times one full and one light decode, alternating which goes first, so load on a shared machine hits both;
the ratio full / light is printed per round, with its median and range, the load average, the CPU, the precision and
each network's multiply-adds. A spread wider than 1.5x between rounds is flagged: the machine was too busy to trust.

    python benchmarks/decoders.py                       # the bundled generator's autoencoder, an untrained light decoder
    python benchmarks/decoders.py --generator GEN       # GEN's autoencoder and its light decoder
    python benchmarks/decoders.py --channels-last       # both in channels_last memory format
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from encdiff.light_decoder import LightDecoder
from encdiff.pipeline import Generator
from encdiff.precision import autocast, cpu_info, inference_precision


def multiply_adds(module: torch.nn.Module, call, x: torch.Tensor) -> int:
    total = [0]

    def count(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    with torch.inference_mode():
        call(x[:1])
    for h in hooks:
        h.remove()
    return total[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", help="generator folder (default: the bundled one)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    generator = Generator.from_pretrained(args.generator) if args.generator else Generator.bundled()
    autoencoder = generator.autoencoder
    light = generator.light_decoder or LightDecoder.for_autoencoder(autoencoder).eval()
    c = generator.unet.config
    latents = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size,
                          generator=torch.Generator().manual_seed(0))
    if args.channels_last:
        autoencoder, light = (m.to(memory_format=torch.channels_last) for m in (autoencoder, light))
        latents = latents.contiguous(memory_format=torch.channels_last)
    calls = {"full": autoencoder.decode, "light": light.decode}
    macs = {name: multiply_adds(net, calls[name], latents) for name, net in (("full", autoencoder), ("light", light))}
    ratios = []
    with torch.inference_mode(), autocast("cpu"):
        for call in calls.values():
            call(latents)  # warm-up
        for r in range(args.rounds):
            times = {}
            for name in (("full", "light") if r % 2 == 0 else ("light", "full")):
                start = time.perf_counter()
                calls[name](latents)
                times[name] = time.perf_counter() - start
            ratios.append(times["full"] / times["light"])
            print(f"round {r + 1}: full {times['full'] * 1e3:.0f} ms, light {times['light'] * 1e3:.0f} ms, "
                  f"{ratios[-1]:.2f}x")
    model, flags = cpu_info()
    print(f"\n{model} ({os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}), "
          f"torch {torch.__version__}, {platform.python_version()}, precision {inference_precision('cpu')}"
          f"{', channels_last' if args.channels_last else ''}, batch {args.batch}")
    print(f"multiply-adds per image: full {macs['full'] / 1e6:.1f} M, light {macs['light'] / 1e6:.1f} M "
          f"({macs['full'] / macs['light']:.2f}x fewer)")
    spread = max(ratios) / min(ratios)
    print(f"light decoder speed-up: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x"
          + ("  (spread over 1.5x: the machine was too busy to trust this)" if spread > 1.5 else ""))


if __name__ == "__main__":
    main()
