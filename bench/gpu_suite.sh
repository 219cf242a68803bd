#!/usr/bin/env bash
# The GPU measurements in one command, for a GPU machine without network access, writing everything under OUT:
# the side-by-side training benchmark (Unsloth first, then tunedeck's trainer with the qlora-7b recipe's own
# 5,120-token packs and with the automatic 4,096, the plain-forward baseline and the seeds' recipe) and the GPU
# tests, each under its own time limit so the whole stays below ten minutes.
#
#   bench/gpu_suite.sh OUT             # BENCH_ARGS="--profile --arms unsloth,engine" GPU_TESTS=0: profiles only
#
# Python packages the machine lacks come from `.gpubundle/site.tgz` (bitsandbytes, liger-kernel, Unsloth and
# its pinned dependencies, unpacked into one folder put on PYTHONPATH) and, for the tests, wheels in `.testwhl/`.
set -u
OUT=${1:?usage: bench/gpu_suite.sh OUT_DIR}
SITE=${SITE:-/tmp/tunedeck-site}
mkdir -p "$OUT" "$SITE"
tar xzf .gpubundle/site.tgz -C "$SITE"
if [ -d .testwhl ]; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .testwhl/*.whl
fi
export PYTHONPATH="$SITE" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
timeout "${BENCH_TIMEOUT:-450}" python3 bench/train_throughput.py --out "$OUT/bench" \
  --arms unsloth,engine,engine-baseline,seeds --engine-tokens 5120,0 --deadline-s "${BENCH_DEADLINE:-430}" \
  ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "benchmark exit status $?" >> "$OUT/bench.log"
if [ "${GPU_TESTS:-1}" = 1 ]; then
  timeout "${TESTS_TIMEOUT:-110}" python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider \
    > "$OUT/test_gpu.log" 2>&1
  echo "tests exit status $?" >> "$OUT/test_gpu.log"
fi
tail -n 40 "$OUT"/*.log
