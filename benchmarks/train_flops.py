"""The model FLOPs utilisation (MFU) of a diffusion run's training step (issue 22's GPU row; session 13 did this by hand).

    PYTHONPATH=src python benchmarks/train_flops.py --generator GEN --metrics RUN/metrics.jsonl [--peak-tflops P]

The FLOPs of one training step per image are counted, not estimated: `torch.utils.flop_counter` over encdiff's own
`training_loss` of the generator's U-Net (its config, freshly initialised, in train mode), forward and backward, on a
batch of latents of the generator's shape. The step's speed is what the run itself logged (the median of
`images_per_s` in its metrics.jsonl, skipping the first rows, which include start-up), so the figure is the real
trainer's, host overheads included. MFU = FLOPs per image x images/s / the device's peak; the peak is --peak-tflops,
else looked up for a few GPUs by name (dense bf16), else not given.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from encdiff.backbones import backbone_class, backbone_name
from encdiff.denoiser import training_loss
from encdiff.pipeline import Generator

# Dense bf16 peaks in TFLOP/s from the vendors' data sheets (SXM parts); a name not listed needs --peak-tflops.
PEAKS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def flops_per_image(generator: Generator, batch: int) -> float:
    """Forward and backward FLOPs of one image's training loss (counted over a batch of `batch`)."""
    net = backbone_class(backbone_name(generator.unet))(generator.unet.config).train()
    denoiser = generator.spec.build(net)
    c = net.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    labels = torch.randint(0, c.num_classes, (batch,), generator=g) if c.num_classes else None
    counter = FlopCounterMode(display=False)
    with counter:
        # the trainer's noise levels and weighting for the kind (the FLOPs do not depend on them)
        kind = generator.spec.kind
        options = {} if kind == "vp" else {"noise_level": "lognormal", "weighting": "flow" if kind == "flow" else "edm"}
        training_loss(denoiser, x, g, class_labels=labels, **options).backward()
    return counter.get_total_flops() / batch


def logged_speed(metrics: str, skip: int) -> float:
    """The median images/s of a run's logged windows, the first `skip` rows left out."""
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    speeds = [r["images_per_s"] for r in rows[skip:] if "images_per_s" in r]
    if not speeds:
        raise SystemExit(f"{metrics}: no images_per_s after the first {skip} rows")
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", required=True, help="the run's generator folder (its U-Net's config)")
    parser.add_argument("--metrics", help="the run's metrics.jsonl (its logged images/s)")
    parser.add_argument("--images-per-s", type=float, help="the step's speed, instead of --metrics")
    parser.add_argument("--skip", type=int, default=2, help="logged rows left out at the start (start-up)")
    parser.add_argument("--batch", type=int, default=64, help="batch the FLOPs are counted over")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by GPU name)")
    parser.add_argument("--device-name", help="GPU name for the peak (default: this machine's GPU, if any)")
    args = parser.parse_args()
    generator = Generator.from_pretrained(args.generator)
    per_image = flops_per_image(generator, args.batch)
    print(f"U-Net training step: {per_image / 1e9:.3f} GFLOP per image (forward + backward, counted)")
    if args.images_per_s is None and args.metrics is None:
        return
    speed = args.images_per_s if args.images_per_s is not None else logged_speed(args.metrics, args.skip)
    achieved = per_image * speed / 1e12
    name = args.device_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    peak = args.peak_tflops or next((p for key, p in PEAKS.items() if key in name), None)
    print(f"at {speed:,.0f} images/s: {achieved:.2f} TFLOP/s" +
          (f", MFU {100 * achieved / peak:.2f} % of {peak:g} TFLOP/s ({name or 'given'})" if peak else
           " (no peak known: pass --peak-tflops for the MFU)"))


if __name__ == "__main__":
    main()
