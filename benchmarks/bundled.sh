#!/usr/bin/env bash
# Every step behind the bundled CIFAR-10 generator and BENCHMARKS.md, in order. Run from the repository root with
# the CIFAR-10 JPEG folders at $DATA (default /tmp/cifar10, unpacked from ../shared/data/cifar10-jpeg.tar.gz).
# On two CPU cores the whole script takes about 2.5 hours; each stage can also be run on its own:
#   bash benchmarks/bundled.sh train | decoder | sweep | eval | speed
set -euo pipefail
DATA=${DATA:-/tmp/cifar10}
CACHE=${CACHE:-/tmp/evalcache}
EVAL=${EVAL:-eval}
BUNDLED=src/encdiff/weights/cifar10
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
