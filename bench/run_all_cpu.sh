#!/usr/bin/env bash
# The CPU numbers of docs/performance.md, in one go, on a QUIET machine (nothing else running).
# Run from the repository root:  bash bench/run_all_cpu.sh 2>&1 | tee bench/results/run_all_cpu.log
# About 45-60 minutes on 2 cores. Each script prints a Markdown table and writes JSON to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results
uptime  # the load average before the runs: it should be near 0

# 1. Engine vs the tutorial ImageFolder + DataLoader loop, EfficientNetV2B0 (ends with `speedup: X.XX`).
$PY bench/throughput.py --quick --out bench/results/throughput_quick.json
# 2. Where a step's time goes, and the optimizer implementation (per-parameter loop vs the engine's foreach).
$PY bench/profile_step.py --model EfficientNetV2B0 --out bench/results/profile_step.json
# 3. Time to 0.95 / 0.98 test accuracy on the paper split, cold (decoding included) then warm (disk cache).
$PY bench/time_to_accuracy.py --cells linear-probe,cpu-fast --modes cold,warm \
    --out bench/results/time_to_accuracy.json
# 4. One run on 1 vs 2 worker processes, same total threads and effective batch, 3 seeds (issue #25).
$PY bench/workers.py --out bench/results/workers.json
uptime
