#!/usr/bin/env bash
# The acceptance benchmark on the shared real data (PTB-XL superdiagnostic ids 1-500, CinC 2017 dev set), one
# command, CPU only, about 30-40 min on 2 cores with the defaults:
#   bash scripts/benchmark_real.sh                      # everything (resumes where it stopped)
#   bash scripts/benchmark_real.sh --steps 1000 --seeds 0 1 2 3 4     # longer pretraining, more seeds
#   bash scripts/benchmark_real.sh --stages report      # rebuild the table / plot only
# Stages: pool (held-out-free pretraining caches) -> pretrain (MAE, SimCLR, CLOCS, hybrid) -> probe -> finetune
# -> report (runs/benchmark_real/results/ and docs/benchmark/real_*). See scripts/benchmark_real.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" scripts/benchmark_real.py "$@"
