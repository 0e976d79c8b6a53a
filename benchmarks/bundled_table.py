"""Markdown tables from the `encdiff eval` reports that `benchmarks/bundled.sh` writes (eval/*/metrics.json).

    python benchmarks/bundled_table.py eval
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sampler_accuracy import nfe_of  # the one definition of a sampler's model evaluations per run


def nfe(settings: dict) -> int:
    return nfe_of(settings["sampler"], settings["steps"])


def main(folder: str) -> None:
    reports = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/metrics.json"))}
    generators = [(name, r) for name, r in reports.items() if "fid" in r and "class_accuracy_mean" in r]
    generators.sort(key=lambda item: (item[0].startswith("sweep"), nfe(item[1]["settings"]),
                                      item[1]["settings"]["guidance_scale"] or 0, item[0]))
    print("| run | samples | sampler | steps | NFE | guidance | FID | KID | precision | recall | class acc. "
          "| sampling s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in generators:
        s = r["settings"]
        w = s["guidance_scale"]
        print(f"| {name} | {s['num_samples']} | {s['sampler']} | {s['steps']} | {nfe(s)}{' x 2' if w else ''} | "
              f"{w or 'none'} | {r['fid']:.2f} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy_mean']:.3f} | {s['sample_seconds']} |")
    for name, r in reports.items():
        if "psnr" in r:
            print(f"\n{name}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, rFID {r['rfid']:.2f} "
                  f"({r['settings']['num_images']} images)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "eval")
