#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with the working torch/torchvision pair and
# ecgfm installed in editable mode with its dev extras. Safe to rerun; does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.ecgfm-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # The torch/torchvision pair that installs from local wheels on these machines (x86_64); the project
  # itself declares ranges (torch>=2.4) so any compatible pair works elsewhere.
  if [ "$(uname -m)" = "x86_64" ]; then TORCH="torch==2.14.1 torchvision==0.29.1"; else TORCH="torch==2.9.1 torchvision==0.24.1"; fi
  .venv/bin/python -m pip install -q $TORCH
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$STAMP"
fi
