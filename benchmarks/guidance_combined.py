"""Classifier-free guidance and autoguidance at once, for a class-conditional generator with a guide (BENCHMARKS.md,
"Autoguidance for the class-conditional version 0.5"). An experiment, not a guidance kind of the library: measured,
it did not pay for its cost.

The guide that `GuidedDenoiser` extrapolates away from becomes a blend of the main model's and the guide's
unconditional outputs,

    G(x; sigma) = D(x; sigma, null) + beta * (D_guide(x; sigma, null) - D(x; sigma, null)),
    D_w = G + w * (D(x; sigma, c) - G)
        = D(c) + (w - 1) * [(D(c) - D(null))  +  beta * (D(null) - D_guide(null))],

classifier-free guidance (Ho & Salimans 2022, eq. 6) plus autoguidance (Karras et al. 2024, eq. 2) on the
unconditional branch at beta times its scale: beta = 0 is classifier-free guidance, beta = 1 guides away from the
guide's unconditional output alone (two evaluations per guided step); in between, three.

    PYTHONPATH=src python benchmarks/guidance_combined.py GENERATOR_WITH_GUIDE --reference /tmp/evalcache/reference-*.safetensors \
        --beta 0.25 --guidance 5 --guidance-interval 0.5 10 --num 2000 --out report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from encdiff.evaluate import ReferenceStats, evaluate_generator
from encdiff.pipeline import Generator


class BlendedGuide:
    """G(x; sigma) above, as a denoiser: the class it is given is ignored (both outputs are unconditional)."""

    def __init__(self, main, guide, beta: float):
        self.main, self.guide, self.beta = main, guide, beta
        self.evaluations = 0  # the networks' own counters count the evaluations

    def __getattr__(self, name):
        return getattr(self.__dict__["guide"], name)

    def __call__(self, x, sigma, class_labels=None):
        null = torch.full((x.shape[0],), self.main.num_classes, dtype=torch.long, device=x.device)
        guide = self.guide(x, sigma, null)
        if self.beta == 1:
            return guide
        main = self.main(x, sigma, null)
        return main + self.beta * (guide - main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generator", help="a class-conditional generator folder with a guide (encdiff set-guide)")
    parser.add_argument("--reference", required=True, help="a reference-*.safetensors file (encdiff eval --cache-dir)")
    parser.add_argument("--beta", type=float, required=True, help="the guide's share of the unconditional branch")
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--out", required=True, help="the report (JSON)")
    args = parser.parse_args()
    generator = Generator.from_pretrained(args.generator)
    if generator.guide is None or not generator.num_classes:
        parser.error(f"{args.generator}: needs a class-conditional generator with a guide")
    main_denoiser, guide_denoiser = generator.denoiser, generator.guide_denoiser
    generator.guide_denoiser = BlendedGuide(main_denoiser, guide_denoiser, args.beta)
    main_denoiser.evaluations = guide_denoiser.evaluations = 0
    result = evaluate_generator(generator, ReferenceStats.load(args.reference), args.num, guidance_kind="auto",
                                guidance_scale=args.guidance, guidance_interval=args.guidance_interval)
    evaluations = main_denoiser.evaluations + guide_denoiser.evaluations
    result["settings"].update(blend_beta=args.beta, network_evaluations_per_image=round(evaluations / args.num, 3),
                              guidance_kind="classifier-free + auto (blended guide)")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("fid", "precision", "recall", "class_accuracy_mean")}),
          f"NFE {evaluations / args.num:.1f}")


if __name__ == "__main__":
    main()
