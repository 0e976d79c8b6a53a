#!/usr/bin/env bash
# Every step behind version 0.3 of the bundled CIFAR-10 generator (shipped until session 14) and its BENCHMARKS.md
# rows, in order; version 0.5 (shipped now) is made by configs/cifar10-v0.5/train.sh on one GPU, its student by
# `encdiff distill` with configs/cifar10/distill.toml, the commands in BENCHMARKS.md's first section. Run from the
# repository root with the CIFAR-10 JPEG folders at $DATA (default /tmp/cifar10, from ../shared/data/cifar10-jpeg.tar.gz).
# On two CPU cores the whole script takes about 2.5 hours; each stage can also be run on its own:
#   bash benchmarks/bundled.sh train | decoder | sweep | eval | speed | student | peer
set -euo pipefail
DATA=${DATA:-/tmp/cifar10}
CACHE=${CACHE:-/tmp/evalcache}
EVAL=${EVAL:-eval}
# Version 0.3 is written to, and measured in, $OUT (never into src/encdiff/weights: that is version 0.5, which this
# script does not make); the stages after `train` read what it exported there.
OUT=${OUT:-out/v0.3}
BUNDLED=$OUT/cifar10
export PYTHONPATH=src OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
encdiff() { python -m encdiff "$@"; }
stage=${1:-all}

if [[ $stage == train || $stage == all ]]; then
  # Stage 1 (about 15 min) and stage 2 (about 55 min); each resumes where it stopped if interrupted.
  encdiff train-autoencoder "$DATA/train" --config configs/cifar10/autoencoder.toml
  encdiff train "$DATA/train" --autoencoder runs/cifar10-ae/model --config configs/cifar10/diffusion.toml
  # The EMA weights in float16, with the sampling defaults chosen from the sweep below.
  encdiff export runs/cifar10-ldm "$BUNDLED" --half --sampler dpmpp_2m --steps 20 --guidance "${GUIDANCE:-3}"
fi

if [[ $stage == decoder || $stage == all ]]; then
  # The sharper decoder (issue 10): a decoder-only fine-tune of the shipped autoencoder (about 55 min), which keeps
  # the latent space, so the U-Net is unchanged; then it replaces the generator's decoder.
  encdiff train-autoencoder "$DATA/train" --config configs/cifar10/decoder.toml
  encdiff set-autoencoder "$BUNDLED" runs/cifar10-decoder/model --half
fi

if [[ $stage == sweep || $stage == all ]]; then
  # --guidance 1 is "no guidance": without it, eval uses the generator's stored sampling defaults (guidance 3)
  # Choosing the samplers and the guidance scale: 2,000 samples each (a cheap, noisier FID; same seeds).
  for spec in "dpmpp_2m 10" "dpmpp_3m 10" "heun 5" "dpmpp_2m 20" "dpmpp_3m 20" "heun 10"; do
    set -- $spec
    encdiff eval "$BUNDLED" --reference "$DATA/test" --num 2000 --sampler "$1" --steps "$2" --guidance 1 \
      --cache-dir "$CACHE" --out "$EVAL/sweep-$1-$2"
  done
  for w in 1.5 2 3; do
    encdiff eval "$BUNDLED" --reference "$DATA/test" --num 2000 --steps 20 --guidance "$w" \
      --cache-dir "$CACHE" --out "$EVAL/sweep-guidance-$w"
  done
fi

if [[ $stage == eval || $stage == all ]]; then
  # The published numbers: 10,000 samples against the 10,000 test images.
  encdiff eval "$BUNDLED/autoencoder" --reference "$DATA/test" --num 10000 --cache-dir "$CACHE" --out "$EVAL/autoencoder"
  python benchmarks/metrics_floor.py "$DATA" --n 10000   # the real-data floor, in benchmarks/metrics_floor.md
  # "sampler steps" at about 10, 20 and 50 model evaluations (Heun: 2 x steps - 1), the sweep's winners
  for spec in "${AT10:-dpmpp_2m 10}" "${AT20:-dpmpp_2m 20}" "${AT50:-dpmpp_2m 50}"; do
    set -- $spec
    encdiff eval "$BUNDLED" --reference "$DATA/test" --num 10000 --sampler "$1" --steps "$2" --guidance 1 \
      --cache-dir "$CACHE" --out "$EVAL/generator-$1-$2"
    encdiff eval "$BUNDLED" --reference "$DATA/test" --num 10000 --sampler "$1" --steps "$2" \
      --guidance "${GUIDANCE:-3}" --cache-dir "$CACHE" --out "$EVAL/generator-$1-$2-guided"
  done
fi

if [[ $stage == speed || $stage == all ]]; then
  python benchmarks/networks.py --only sampling
  # `encdiff sample` as a new user runs it: one row of ten per class, 20 steps, guided.
  /usr/bin/time -f "encdiff sample: %e s wall" python -m encdiff sample --out "$EVAL/samples.png"
fi

if [[ $stage == student || $stage == all ]]; then
  # The consistency student (issue 11): 800 steps x 128 images of distillation from the bundled generator at its
  # guidance 3 (10 % of the images its U-Net was trained on), then the 2-step noise level chosen on 2,000 samples.
  encdiff distill "$BUNDLED" "$DATA/train" --config configs/cifar10/distill.toml --guidance 4
  for mid in ${MIDS:-0.8 1.6 3.2}; do
    encdiff eval runs/cifar10-student/model --reference "$DATA/test" --num 2000 --sampler consistency --steps 2 \
      --sigmas 80 "$mid" --cache-dir "$CACHE" --out "$EVAL/student-mid-$mid"
  done
  encdiff export runs/cifar10-student "$BUNDLED-student" --half --sigmas 80 "${MID:-3.2}"
  for steps in 2 1; do
    encdiff eval "$BUNDLED-student" --reference "$DATA/test" --num 10000 --steps "$steps" --cache-dir "$CACHE" \
      --out "$EVAL/student-$steps"
  done
  python benchmarks/networks.py --only student --student "$BUNDLED-student"
  /usr/bin/time -f "encdiff sample --fast: %e s wall" python -m encdiff sample --fast --out "$EVAL/samples-fast.png"
fi

if [[ $stage == peer || $stage == all ]]; then
  # Side by side with diffusers' train_unconditional recipe at the bundled model's training budget (issue 16): about
  # 1.5 hours of both cores on a quiet machine (the budget is measured first; a busy machine then only runs longer).
  # Every row is scored on 1,000 samples: the peer's DDIM sampling (50 steps of a pixel-space U-Net) costs 20-40 min.
  PEER=${PEER:-runs/peer}
  N=${PEER_SAMPLES:-1000}
  python benchmarks/peer_quality.py budget --out "$PEER"
  python benchmarks/peer_quality.py train --out "$PEER" --data "$DATA/train"
  python benchmarks/peer_quality.py sample --out "$PEER" --num "$N"
  encdiff eval "$PEER/samples" --reference "$DATA/test" --cache-dir "$CACHE" --out "$EVAL/peer"
  # encdiff on the same footing: its defaults (guided), unguided, its student, and with the version 0.1 (L1) decoder
  # it had at exactly the peer's budget (the sharper decoder cost 75 more minutes)
  encdiff eval "$BUNDLED" --reference "$DATA/test" --num "$N" --cache-dir "$CACHE" --out "$EVAL/peer-encdiff-guided"
  encdiff eval "$BUNDLED" --reference "$DATA/test" --num "$N" --guidance 1 --cache-dir "$CACHE" \
    --out "$EVAL/peer-encdiff-unguided"
  encdiff eval "$BUNDLED-student" --reference "$DATA/test" --num "$N" --cache-dir "$CACHE" --out "$EVAL/peer-encdiff-student"
  V01=$(mktemp -d)
  git show f0f5836^:src/encdiff/weights/cifar10/autoencoder/model.safetensors > "$V01/model.safetensors"
  git show f0f5836^:src/encdiff/weights/cifar10/autoencoder/config.json > "$V01/config.json"
  encdiff set-autoencoder "$BUNDLED" "$V01" --out "$V01/generator"
  for w in 1 3; do
    encdiff eval "$V01/generator" --reference "$DATA/test" --num "$N" --guidance $w --cache-dir "$CACHE" \
      --out "$EVAL/peer-encdiff-v01-guidance-$w"
  done
  encdiff sample --num 50 --guidance 1 --out-dir "$EVAL/peer-encdiff-samples"
  python benchmarks/peer_quality.py grid --out "$PEER" --encdiff "$EVAL/peer-encdiff-samples"
fi
