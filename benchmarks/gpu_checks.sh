#!/usr/bin/env bash
# One call on a lent GPU (the device tool): the CUDA paths that no CI run reaches (training, distillation, guides and
# light decoders pick CUDA by themselves where it exists; two CUDA-only defects were found by a real run in session
# 13), then issue 22's GPU row. Every output goes to $OUT, so a cut-off call still returns what it finished.
#
# The device image has torch, pytest and safetensors but not diffusers (the benchmark's peer). Before the call:
#   pip download --no-deps -d wheels diffusers==0.42.1      # wheels/ is git-ignored: pass carry=["wheels"]
# then: run(command="bash benchmarks/gpu_checks.sh", carry=["wheels"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if compgen -G "wheels/*.whl" > /dev/null; then
  python3 -m pip install --quiet --no-index --no-deps wheels/*.whl > "$OUT/pip.txt" 2>&1
fi
timeout "${TEST_S:-300}" python3 -m pytest -q -m "not slow" -p no:cacheprovider tests/test_train.py \
  tests/test_consistency.py tests/test_guidance.py tests/test_light_decoder.py > "$OUT/cuda-tests.txt" 2>&1
echo "CUDA tests: exit $? ($(tail -1 "$OUT/cuda-tests.txt"))"
timeout "${BENCH_S:-180}" python3 benchmarks/fast_sampling.py --device cuda --precision bf16 --skip-cli \
  > "$OUT/gpu-speed.txt" 2>&1
echo "GPU speed: exit $?"
cat "$OUT/gpu-speed.txt"
