"""A seeded per-class split of a labelled image folder into DST/train and DST/test, as symbolic links (nothing is
copied): the held-out part measures a feature net trained on the rest (`encdiff train-feature-net DST`), e.g. the
emoji64 net of BENCHMARKS.md ("Classes drawn equally often": 85/15, seed 0).

    python benchmarks/split_folder.py /tmp/emoji64/emoji64 /tmp/emoji64-split --test 0.15 --seed 0

Each class's files, sorted by name, are shuffled by one random.Random(seed) taken through the classes in sorted
order; round(test x count) of them go to test. The same folder, fraction and seed give the same split."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from encdiff.data import IMAGE_EXTENSIONS


def split(src: Path, dst: Path, test: float, seed: int) -> dict[str, tuple[int, int]]:
    """Link every image of each class folder of `src` into dst/train/CLASS or dst/test/CLASS; returns, per class,
    (train count, test count)."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{src}: no class folders (the split is per class)")
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst}: exists and is not empty; choose a new folder (a split is never merged into another)")
    rng = random.Random(seed)
    counts = {}
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        rng.shuffle(files)
        n_test = round(test * len(files))
        for part, chosen in (("test", files[:n_test]), ("train", files[n_test:])):
            (dst / part / folder.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (dst / part / folder.name / f.name).symlink_to(f.resolve())
        counts[folder.name] = (len(files) - n_test, n_test)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a folder of class subfolders")
    parser.add_argument("dst", type=Path, help="a new folder for train/ and test/")
    parser.add_argument("--test", type=float, default=0.15, help="the fraction of each class held out (default 0.15)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.test < 1:
        raise SystemExit(f"--test {args.test}: expected a fraction between 0 and 1")
    if not args.src.is_dir():
        raise SystemExit(f"{args.src}: not a folder")
    for name, (n_train, n_test) in split(args.src, args.dst, args.test, args.seed).items():
        print(f"{name}: {n_train} train, {n_test} test", file=sys.stderr)


if __name__ == "__main__":
    main()
