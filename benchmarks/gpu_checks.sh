#!/usr/bin/env bash
# The checks only a GPU can make, as one script for a borrowed GPU machine (run from the repository
# root; results go to $OUT, default benchmarks/results, named with the commit):
#   1. pytest tests/gpu tests/cuda (the GPU tests must not skip on a GPU);
#   2. benchmarks/cuda_speedup.py run on runs/cuda_bench (made on the CPU by
#      `python benchmarks/cuda_speedup.py prepare --out runs/cuda_bench`; carry runs/cuda_bench).
# COMMIT overrides the commit name where the copy has no git metadata.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
python3 -m pytest tests/gpu tests/cuda -q -p no:cacheprovider -rs --junitxml="$OUT/gpu_tests_$COMMIT.xml" \
    2>&1 | tee "$OUT/gpu_tests_$COMMIT.txt"
tests_rc=${PIPESTATUS[0]}
if [ -d runs/cuda_bench/model.jei ]; then
    python3 benchmarks/cuda_speedup.py run --bundle runs/cuda_bench/model.jei \
        --offsets runs/cuda_bench/offsets.json --out "$OUT/cuda_speedup_$COMMIT.json" 2>&1 | tee "$OUT/cuda_speedup_$COMMIT.txt"
else
    echo "runs/cuda_bench/model.jei is missing: run 'python benchmarks/cuda_speedup.py prepare' on the CPU and carry it"
fi
exit "$tests_rc"
