"""Real-data floor of encdiff's metrics on CIFAR-10: the test split against the training split, and how FID
grows as the test images are blurred or noised. Writes benchmarks/metrics_floor.md.

    mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    PYTHONPATH=src python benchmarks/metrics_floor.py /tmp/cifar10 --n 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from encdiff.data import ImageDataset
from encdiff.evaluate import add_noise, evaluate_images, gaussian_blur, reference_stats
from encdiff.featurenet import FeatureNet, accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", help="folder with train/ and test/")
    parser.add_argument("--n", type=int, default=10000, help="images per set (seeded random subsets)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("metrics_floor.md")))
    args = parser.parse_args()
    net = FeatureNet.load()
    train = ImageDataset(Path(args.data) / "train", 32, cache_dir="/tmp/cifar10-cache", progress=False)
    test = ImageDataset(Path(args.data) / "test", 32, cache_dir="/tmp/cifar10-cache", progress=False)
    g = torch.Generator().manual_seed(0)
    tr = train.images[torch.randperm(len(train), generator=g)[:args.n]]
    te_idx = torch.randperm(len(test), generator=g)[:args.n]
    te = test.images[te_idx]
    started = time.perf_counter()
    ref = reference_stats(tr, net, source=f"CIFAR-10 train, {len(tr)} random")
    rows = []
    cases = [("test split (the floor)", te), ("train subset itself", tr)]
    cases += [(f"test, Gaussian blur sigma {s}", gaussian_blur(te, s)) for s in (0.5, 1.0, 1.5)]
    cases += [(f"test, Gaussian noise std {s}/255", add_noise(te, s)) for s in (8, 16, 32)]
    for name, images in cases:
        r = evaluate_images(images, ref, net=net, kid_subsets=100, kid_subset_size=1000)
        rows.append(f"| {name} | {len(images)} | {r['fid']:.3f} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | "
                    f"{r['precision']:.3f} | {r['recall']:.3f} |")
        print(rows[-1], flush=True)
    acc = accuracy(net, test.images, test.labels)
    lines = ["# Metric floor on real data (CIFAR-10, shipped feature net)", "",
             f"Command: `PYTHONPATH=src python benchmarks/metrics_floor.py {args.data} --n {args.n}` "
             f"({time.perf_counter() - started:.0f} s on 2 shared CPU cores). Reference: {len(tr)} seeded-random "
             f"training images; sets: {len(te)} seeded-random test images, degraded as named. KID: 100 subsets of "
             "1000; precision/recall: k = 3. Feature net: the shipped encdiff-featurenet "
             f"(test accuracy {acc:.4f} on all 10,000 test images).", "",
             "These are encdiff feature-net figures, **not comparable to Inception FID**: compare models side by side.",
             "", "| set vs reference | N | FID | KID | precision | recall |", "|---|---|---|---|---|---|", *rows, ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
