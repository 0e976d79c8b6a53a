#!/usr/bin/env bash
# The version 0.5 bundled CIFAR-10 generator (issue 20) on one GPU in about eight minutes: autoencoder, U-Net, light
# decoder, consistency student, autoguidance guide and post-hoc EMA profiles, each stage under a time budget
# (`--time`: the first steps measure the machine, the step count and schedule are fitted to end on time).
#   configs/cifar10-v0.5/train.sh DATA RUNS OUT [SCALE]
# DATA: the CIFAR-10 training folder (class subfolders); RUNS: run folders; OUT: what to keep, packed as tar files
# (a watchdog packs what exists shortly before the end, so a cut-off run still returns weights); SCALE multiplies
# every time budget (1: the published run on an H200; a small one checks the script on a CPU).
set -u
DATA=$1 RUNS=$2 OUT=$3 SCALE=${4:-1}
CFG=configs/cifar10-v0.5
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
    for s in 0.05 0.1; do
        [ -d "$RUNS/phema/sigma-rel-$s" ] && tar -C "$RUNS/phema" -cf "$tmp/phema-$s.tar" \
            "sigma-rel-$s/unet" "sigma-rel-$s/generator.json"
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
    run ae $ENCDIFF train-autoencoder "$DATA" --config $CFG/autoencoder.toml --run-dir "$RUNS/ae" \
        --time "$(budget 140)" || finish 1
fi
# Stage 2 alone, so that its time budget measures the machine as the run will find it.
run ldm $ENCDIFF train "$DATA" --autoencoder "$RUNS/ae/model" --config $CFG/diffusion.toml --run-dir "$RUNS/ldm" \
    --time "$(budget "${LDM_SECONDS:-250}")" || finish 1
run export $ENCDIFF export "$RUNS/ldm" "$RUNS/gen" --half || finish 1
# The same weights with classifier-free guidance 4 in (0.5, 10] as the stored default (session 9's best on this
# latent): only its generator.json is kept, to be chosen by measurement against the run's own default.
run export-interval $ENCDIFF export "$RUNS/ldm" "$RUNS/gen-interval" --half --guidance 4 --guidance-interval 0.5 10
# Stage 3, side by side (each small enough to leave the GPU idle between its kernels): the light decoder (it needs
# only the frozen autoencoder), the consistency student of the teacher, the guide, the post-hoc EMA profiles.
run light $ENCDIFF train-light-decoder "$DATA" --autoencoder "$RUNS/ae/model" \
    --config configs/cifar10/light-decoder.toml --run-dir "$RUNS/light" --batch-size 256 --checkpoint-every 1000 \
    --time "$(budget 75)" &
LIGHT=$!
run student $ENCDIFF distill "$RUNS/gen" "$DATA" --config configs/cifar10/distill.toml --run-dir "$RUNS/student" \
    --checkpoint-every 1000 --time "$(budget 75)" &
STUDENT=$!
run guide $ENCDIFF train-guide "$RUNS/gen" "$DATA" --run-dir "$RUNS/guide" --checkpoint-every 2000 \
    --time "$(budget 45)" &
GUIDE=$!
run phema $ENCDIFF posthoc-ema "$RUNS/ldm" --sigma-rel 0.05 0.1 --out "$RUNS/phema" --half &
PHEMA=$!
wait $STUDENT && run export-student $ENCDIFF export "$RUNS/student" "$RUNS/student-gen" --half
wait $LIGHT $GUIDE $PHEMA
finish 0
