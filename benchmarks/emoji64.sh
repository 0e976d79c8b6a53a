#!/usr/bin/env bash
# The README's emoji64 figures and grid (BENCHMARKS.md, "The two commands alone under the 8-channel rule"), in
# order: the two commands with nothing but the folder, the emoji feature net that measures recognisability, the
# evaluations. Run from the repository root with emoji64 unpacked at $DATA (default /tmp/emoji64/emoji64, from
# ../shared/data/emoji64.tar.gz). On two CPU cores: train 2 h 15 min (90 + 40 minutes of budget, latents and probes),
# featurenet 10 min, eval 15 min; each stage can be run on its own and each training command resumes if interrupted:
#   bash benchmarks/emoji64.sh train | featurenet | eval
set -euo pipefail
DATA=${DATA:-/tmp/emoji64/emoji64}
SPLIT=${SPLIT:-/tmp/emoji64-split}
CACHE=${CACHE:-/tmp/evalcache}
EVAL=${EVAL:-eval}
RUNS=${RUNS:-runs}
export PYTHONPATH=src OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
encdiff() { python -m encdiff "$@"; }
stage=${1:-all}

if [[ $stage == train || $stage == all ]]; then
  # The budgets fit the steps to this machine's speed, measured at the start: keep the machine quiet meanwhile.
  encdiff train-autoencoder "$DATA" --run-dir "$RUNS/emoji-ae" --time 90m
  encdiff train "$DATA" --autoencoder "$RUNS/emoji-ae/model" --run-dir "$RUNS/emoji-ldm" --time 40m
  encdiff sample "$RUNS/emoji-ldm/model" --out docs/emoji64-samples.png
fi

if [[ $stage == featurenet || $stage == all ]]; then
  # encdiff's shipped feature net is a CIFAR-10 classifier: emoji FIDs in its space are relative figures. A net
  # trained on 85 % of emoji64 (a seeded split per class) measures in the data's own space and, on the 15 % it
  # did not see, gives the rate at which real emoji are recognised as their class.
  [[ -d $SPLIT ]] || python benchmarks/split_folder.py "$DATA" "$SPLIT" --test 0.15 --seed 0
  encdiff train-feature-net "$SPLIT" --epochs 40 --batch-size 256 --out "$RUNS/featurenet-emoji64.safetensors" \
    --cache-dir "$CACHE"
  # the held-out real emoji: their class accuracy is the rate the samples' is read against (their FID means little:
  # they are part of the reference)
  encdiff eval "$SPLIT/test" --reference "$DATA" --cache-dir "$CACHE" \
    --feature-net "$RUNS/featurenet-emoji64.safetensors" --out "$EVAL/emoji-heldout"
fi

if [[ $stage == eval || $stage == all ]]; then
  encdiff eval "$RUNS/emoji-ae/model" --reference "$DATA" --num 2000 --out "$EVAL/emoji-ae"
  FN=(--reference "$DATA" --num 2000 --cache-dir "$CACHE" --feature-net "$RUNS/featurenet-emoji64.safetensors")
  # classes in the data's proportions (the default: FID compares like with like), then drawn equally often (per
  # class accuracy on every class); last, the CIFAR-10 net's relative figures
  encdiff eval "$RUNS/emoji-ldm/model" "${FN[@]}" --out "$EVAL/emoji-ldm"
  encdiff eval "$RUNS/emoji-ldm/model" "${FN[@]}" --class-mix even --out "$EVAL/emoji-ldm-even"
  encdiff eval "$RUNS/emoji-ldm/model" --reference "$DATA" --num 2000 --cache-dir "$CACHE" --out "$EVAL/emoji-ldm-cifar-net"
fi
