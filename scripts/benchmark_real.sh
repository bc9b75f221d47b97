#!/usr/bin/env bash
# The acceptance benchmark on the shared real data (PTB-XL superdiagnostic ids 1-500, CinC 2017 dev set), one
# command, CPU only; it regenerates every table and plot:
#   bash scripts/benchmark_real.sh                      # everything (resumes where it stopped)
#   bash scripts/benchmark_real.sh --steps 1000 --seeds 0 1 2 3 4     # longer pretraining, more seeds
#   bash scripts/benchmark_real.sh --stages report      # rebuild the tables / plots only
# Pretraining recipe: conf/experiment/<method>_cpu30.yaml when it exists and --steps is not given, else
# +experiment=<method> for --steps (default 300) steps.
# Stages: pool (held-out-free pretraining caches) -> pretrain (--methods, default all nine: MAE, SimCLR, CLOCS,
# hybrid and the five SimCLR-on-1-D-ResNet ones, simclr_cnn, simclr_cnn_hc, simclr_cnn_hc_s1, simclr_cnn_hcc,
# simclr_cnn_hc1l; wall time recorded) -> curve (every saved checkpoint linear-probed:
# runs/benchmark_real/curve/learning_curve.{md,png}) -> probe (encoders, random-init twins, handcrafted baseline)
# -> finetune (encoders, twins, supervised ViT, supervised CNN on every task) -> report (runs/benchmark_real/results/
# and docs/benchmark/real_*: acceptance block, paired comparisons with every baseline, the learning curve). A run
# over some methods leaves docs/ alone when it would drop rows they show (--replace-docs to replace them anyway).
# See scripts/benchmark_real.py.
set -euo pipefail
# relative --out / --docs / --cache-root / --data-root are taken from the folder this was started in
export ECGFM_BENCHMARK_CALLER_DIR="$PWD"
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" scripts/benchmark_real.py "$@"
