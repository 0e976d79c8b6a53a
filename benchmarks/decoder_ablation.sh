#!/usr/bin/env bash
# Issue 10's ablation: the terms of the autoencoder objective added one at a time, each a decoder-only fine-tune of
# the bundled autoencoder for the same budget (400 steps x 64 images, float32, 2 CPU cores), then PSNR/SSIM/rFID on
# 2,000 CIFAR-10 test images (a seeded random subset). Results: BENCHMARKS.md.
#   DATA=/tmp/cifar10 RUNS=~/runs bash benchmarks/decoder_ablation.sh
set -euo pipefail
DATA=${DATA:-/tmp/cifar10}
RUNS=${RUNS:-runs}
CACHE=${CACHE:-/tmp/evalcache}
EVAL=${EVAL:-eval}
export PYTHONPATH=src OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
encdiff() { python -m encdiff "$@"; }
STEPS=${STEPS:-400}
common=(--config configs/cifar10/decoder.toml --steps "$STEPS" --sample-every 0 --checkpoint-every "$STEPS")
declare -A variants=(
  [l1]="--ssim-weight 0 --adv-weight 0 --fm-weight 0"
  [l1-ssim]="--ssim-weight 0.2 --adv-weight 0 --fm-weight 0"
  [l1-ssim-fft]="--ssim-weight 0.2 --fft-weight 1 --adv-weight 0 --fm-weight 0"
  [l1-ssim-gan]="--ssim-weight 0.2 --adv-weight 0.5 --fm-weight 0"
  [l1-ssim-gan-fm]="--ssim-weight 0.2 --adv-weight 0.5 --fm-weight 1"
)
encdiff eval src/encdiff/weights/cifar10/autoencoder --reference "$DATA/test" --num 2000 --cache-dir "$CACHE" \
  --out "$EVAL/ablation-bundled"
for name in ${ONLY:-l1 l1-ssim l1-ssim-fft l1-ssim-gan l1-ssim-gan-fm}; do
  # shellcheck disable=SC2086
  encdiff train-autoencoder "$DATA/train" "${common[@]}" ${variants[$name]} --run-dir "$RUNS/ablation-$name"
  encdiff eval "$RUNS/ablation-$name/model" --reference "$DATA/test" --num 2000 --cache-dir "$CACHE" \
    --out "$EVAL/ablation-$name"
done
