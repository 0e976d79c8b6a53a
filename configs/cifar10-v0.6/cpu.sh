#!/usr/bin/env bash
# The version 0.6 CIFAR-10 generator as it was made on two CPU cores (issue 20, sessions 7-28; no GPU was lent): each
# stage one encdiff command, run folders under RUNS, the results under OUT. Every training command resumes exactly
# where it stopped when re-run unchanged (a killed session loses at most its checkpoint interval), and its step count
# does not change what it trains up to that step (constant rate after the warm-up), so the U-Net run that was continued
# in several sessions to larger --steps is the single command below.
#   configs/cifar10-v0.6/cpu.sh DATA RUNS OUT [stage]      stage: ae | unet | light | student | all (default)
# DATA: the CIFAR-10 JPEG folder (train/ and test/, from ../shared/data/cifar10-jpeg.tar.gz). On two cores: autoencoder
# ~1 h, U-Net ~3.3 h (2.7 s per step of 512), light decoder ~50 min (8 of them the latents and decodings cache),
# student ~1 h. configs/cifar10-v0.6/train.sh is the same recipe on one GPU, each stage under a time budget.
set -euo pipefail
DATA=$1 RUNS=$2 OUT=$3 STAGE=${4:-all}
CFG=$(dirname "$0")
encdiff() { python -m encdiff "$@"; }
mkdir -p "$RUNS" "$OUT"

if [[ $STAGE == ae || $STAGE == all ]]; then
  # 8x8x16 latents at 32/64/64 (chosen among four at equal cost), L1 + SSIM, PatchGAN from step 1,200; shipped in the
  # repository as src/encdiff/weights/cifar10/autoencoder since version 0.6 ships (rFID 1.99 on the 10k test images).
  encdiff train-autoencoder "$DATA/train" --config configs/cifar10-v0.4/autoencoder.toml --run-dir "$RUNS/ae"
fi
AE=${AE:-$RUNS/ae/model}

if [[ $STAGE == unet || $STAGE == all ]]; then
  # The flow-matching ADM U-Net at 96/128/128; the GPU config's batch and rate scaled down for the CPU (512 at 1e-3,
  # version 0.5's) for version 0.5's 2.23 M images; float32 (this CPU has no native bf16); no post-hoc EMA snapshots
  # (the run's EMA of 400,000 images is the one exported).
  encdiff train "$DATA/train" --autoencoder "$AE" --config "$CFG/diffusion.toml" --run-dir "$RUNS/unet" \
    --no-bf16 --batch-size 512 --lr 1e-3 --warmup-steps 100 --steps 4360 --phema-every 0 --sample-every 0 \
    --log-every 100 --checkpoint-every 40 --keep-last 2
  encdiff export "$RUNS/unet" "$OUT/gen" --at-step 4360 --half
fi

if [[ $STAGE == light || $STAGE == all ]]; then
  # Version 0.5's light-decoder recipe at the 687,360 images its GPU run fitted (2,685 x 256).
  encdiff train-light-decoder "$DATA/train" --autoencoder "$AE" --config configs/cifar10/light-decoder.toml \
    --run-dir "$RUNS/light" --batch-size 256 --steps 2685 --no-bf16 --checkpoint-every 250 --keep-last 2 \
    --sample-every 0
  encdiff set-light-decoder "$OUT/gen" "$RUNS/light/model"
  # The measured defaults (BENCHMARKS.md, "The flow run at version 0.5's budget"): 2k FID 3.36 at these.
  encdiff set-sampling "$OUT/gen" --guidance 5 --guidance-interval 0.5 10 --decoder light
fi

if [[ $STAGE == student || $STAGE == all ]]; then
  # Version 0.5's student recipe (2,400 x 128, guidance built in everywhere) at the teacher's best guidance scale (5:
  # the best 2k FID of 4, 5 and 6 with either decoder).
  encdiff distill "$OUT/gen" "$DATA/train" --config configs/cifar10/distill.toml --run-dir "$RUNS/student" \
    --guidance "${STUDENT_GUIDANCE:-5}" --no-bf16
  encdiff export "$RUNS/student" "$OUT/student" --half --sigmas 80 3.2
  encdiff set-light-decoder "$OUT/student" "$RUNS/light/model" --default
fi
