#!/usr/bin/env bash
# A bundled CIFAR-10 generator on one GPU in about eight minutes, from a config folder CFG (configs/cifar10-v0.5,
# configs/cifar10-v0.6): autoencoder, U-Net, light decoder, consistency student, autoguidance guides and post-hoc EMA
# profiles, each stage under a time budget (`--time`: the first steps measure the machine, the step count and
# schedule are fitted to end on time).
#   configs/train-bundled.sh CFG DATA RUNS OUT [SCALE]        (CFG/train.sh calls it with its own folder)
# DATA: the CIFAR-10 training folder (class subfolders); RUNS: run folders; OUT: what to keep, packed as tar files
# (a watchdog packs what exists shortly before the end, so a cut-off run still returns weights); SCALE multiplies
# every time budget (1: the published run; a small one checks the script on a CPU). CFG/train.env, if there, sets
# the knobs below (its defaults are version 0.5's run); the device tool brings back at most 8 files, 64 MiB.
set -u
CFG=$1 DATA=$2 RUNS=$3 OUT=$4 SCALE=${5:-1}
# The knobs: a variable set in the environment wins, then CFG/train.env's value, then the default here.
# shellcheck source=/dev/null
[ -f "$CFG/train.env" ] && . "$CFG/train.env"
AE_SECONDS=${AE_SECONDS:-140} LDM_SECONDS=${LDM_SECONDS:-250} LIGHT_SECONDS=${LIGHT_SECONDS:-75}
STUDENT_SECONDS=${STUDENT_SECONDS:-75} GUIDE_SECONDS=${GUIDE_SECONDS:-45}
GUIDE=${GUIDE:-1}                         # train-guide: a separate, half-width guide (0: none)
EARLY_GUIDES=${EARLY_GUIDES-}             # fractions of the U-Net run: its post-hoc EMA at the snapshot nearest each
EARLY_SIGMA_REL=${EARLY_SIGMA_REL:-0.05}  # the width of those early EMAs
PHEMA_PACK=${PHEMA_PACK-"0.05 0.1"}       # post-hoc EMA profiles of the whole run to bring back ("": none)
# Flags added to every training command, for a check of this script on a CPU (e.g. "--batch-size 16 --no-bf16").
CHECK_FLAGS=${CHECK_FLAGS:-}
ENCDIFF="python3 -m encdiff"
mkdir -p "$RUNS" "$OUT"
budget() { python3 -c "print(f'{max(1, round($1 * $SCALE))}s')"; }
say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$RUNS/train.log"; }
run() {  # run NAME COMMAND...: a stage's output goes to RUNS/NAME.log; its exit status is said
    local name=$1; shift
    say "start $name: $*"
    "$@" >"$RUNS/$name.log" 2>&1
    local rc=$?
    say "end $name: exit $rc"
    return $rc
}
pack() {  # what exists now, as at most 8 tar files of at most 16 MiB each
    local tmp
    tmp=$(mktemp -d)
    [ -d "$RUNS/gen" ] && tar -C "$RUNS" -cf "$tmp/gen.tar" gen
    [ -d "$RUNS/student-gen" ] && tar -C "$RUNS" -cf "$tmp/student.tar" student-gen
    for s in $PHEMA_PACK; do
        [ -d "$RUNS/phema/sigma-rel-$s" ] && tar -C "$RUNS/phema" -cf "$tmp/phema-$s.tar" \
            "sigma-rel-$s/unet" "sigma-rel-$s/generator.json"
    done
    for f in $EARLY_GUIDES; do
        [ -d "$RUNS/early-$f" ] && tar -C "$RUNS" -cf "$tmp/early-$f.tar" "early-$f/unet" "early-$f/generator.json"
    done
    local extras=()
    for p in ae/model light/model gen-interval/generator.json; do [ -e "$RUNS/$p" ] && extras+=("$p"); done
    [ ${#extras[@]} -gt 0 ] && tar -C "$RUNS" -cf "$tmp/extras.tar" "${extras[@]}"
    (cd "$RUNS" && find . -maxdepth 3 \( -name "*.log" -o -name "*.jsonl" -o -name "*.png" -o -name "meta.json" \
        -o -name "config.json" \) -size -2M -print0 | tar --null -T - -cf "$tmp/logs.tar")
    mv "$tmp"/*.tar "$OUT"/ 2>/dev/null
    rmdir "$tmp" 2>/dev/null
    say "packed: $(cd "$OUT" && ls | tr '\n' ' ')"
}
watchdog() {  # shortly before the call's limit: the newest checkpoints as model folders, then everything
    local waited=0
    while [ "$waited" -lt "$1" ]; do sleep 1; waited=$((waited + 1)); [ -e "$RUNS/.done" ] && return; done
    say "watchdog"
    [ -d "$RUNS/gen" ] || $ENCDIFF export "$RUNS/ldm" "$RUNS/gen" --half >>"$RUNS/watchdog.log" 2>&1
    [ -d "$RUNS/student-gen" ] || $ENCDIFF export "$RUNS/student" "$RUNS/student-gen" --half \
        >>"$RUNS/watchdog.log" 2>&1
    pack
}
finish() {  # stop the watchdog and the monitor, pack, exit with $1
    touch "$RUNS/.done"
    wait "$WATCHDOG_PID" "$MONITOR_PID"
    pack
    say "done: exit $1"
    exit "$1"
}
watchdog "${WATCHDOG:-555}" &
WATCHDOG_PID=$!
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee -a "$RUNS/train.log"
(while [ ! -e "$RUNS/.done" ]; do
    echo "+${SECONDS}s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
    sleep 5
done) >"$RUNS/gpu-utilization.log" 2>&1 &
MONITOR_PID=$!

# Stage 1: the autoencoder (AUTOENCODER=folder: one trained before, by this stage, is used instead).
if [ -n "${AUTOENCODER:-}" ]; then
    mkdir -p "$RUNS/ae" && cp -r "$AUTOENCODER" "$RUNS/ae/model" && say "autoencoder: $AUTOENCODER"
else
    run ae $ENCDIFF train-autoencoder $CHECK_FLAGS "$DATA" --config $CFG/autoencoder.toml --run-dir "$RUNS/ae" \
        --time "$(budget "$AE_SECONDS")" || finish 1
fi
# Stage 2 alone, so that its time budget measures the machine as the run will find it.
run ldm $ENCDIFF train $CHECK_FLAGS "$DATA" --autoencoder "$RUNS/ae/model" --config $CFG/diffusion.toml --run-dir "$RUNS/ldm" \
    --time "$(budget "$LDM_SECONDS")" || say "the U-Net run stopped early: exporting its newest checkpoint, if it has one"
run export $ENCDIFF export "$RUNS/ldm" "$RUNS/gen" --half || finish 1
# The same weights with classifier-free guidance 4 in (0.5, 10] as the stored default (session 9's best on the
# 8-channel latent): only its generator.json is kept, to be chosen by measurement against the run's own default.
run export-interval $ENCDIFF export "$RUNS/ldm" "$RUNS/gen-interval" --half --guidance 4 --guidance-interval 0.5 10
# Stage 3, side by side (each small enough to leave the GPU idle between its kernels): the light decoder (it needs
# only the frozen autoencoder), the consistency student of the teacher, the guide, the post-hoc EMA profiles.
run light $ENCDIFF train-light-decoder $CHECK_FLAGS "$DATA" --autoencoder "$RUNS/ae/model" \
    --config configs/cifar10/light-decoder.toml --run-dir "$RUNS/light" --batch-size 256 --checkpoint-every 1000 \
    --time "$(budget "$LIGHT_SECONDS")" &
LIGHT=$!
run student $ENCDIFF distill $CHECK_FLAGS "$RUNS/gen" "$DATA" --config configs/cifar10/distill.toml --run-dir "$RUNS/student" \
    --checkpoint-every 1000 --time "$(budget "$STUDENT_SECONDS")" &
STUDENT=$!
GUIDE_PID=
if [ "$GUIDE" = 1 ]; then
    run guide $ENCDIFF train-guide $CHECK_FLAGS "$RUNS/gen" "$DATA" --run-dir "$RUNS/guide" --checkpoint-every 2000 \
        --time "$(budget "$GUIDE_SECONDS")" &
    GUIDE_PID=$!
fi
PHEMA_PID=
if [ -n "$PHEMA_PACK" ]; then
    # shellcheck disable=SC2086
    run phema $ENCDIFF posthoc-ema "$RUNS/ldm" --sigma-rel $PHEMA_PACK --out "$RUNS/phema" --half &
    PHEMA_PID=$!
fi
for f in $EARLY_GUIDES; do  # the run's own early state (EDM2's autoguidance guide), from its snapshots
    run "early-$f" $ENCDIFF export "$RUNS/ldm" "$RUNS/early-$f" --half --sigma-rel "$EARLY_SIGMA_REL" --at-fraction "$f"
done
wait $STUDENT && run export-student $ENCDIFF export "$RUNS/student" "$RUNS/student-gen" --half
# shellcheck disable=SC2086
wait $LIGHT $GUIDE_PID $PHEMA_PID
finish 0
