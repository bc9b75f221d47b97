#!/usr/bin/env bash
# Build a (non-editable) wheel of ecgfm, install it into a fresh virtual environment and run the console scripts
# from a folder outside the checkout: configs must come from inside the package, nothing from the source tree.
#
#   bash scripts/check_wheel.sh            # prints the installed location and the train summary; exit 0 = pass
#
# The fresh venv reuses the dependencies (torch, lightning, ...) of the project's .venv through a .pth line, as
# "torch preinstalled"; ecgfm itself comes only from the wheel (the .venv's editable-install hook is not loaded
# that way, and the check below fails if ecgfm is imported from the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ecgfm-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT" >/dev/null
python3 -m venv "$WORK/venv"
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS" > "$SITE/_ecgfm_check_deps.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WORK"/dist/ecgfm-*.whl
mkdir -p "$WORK/elsewhere"
cd "$WORK/elsewhere"
LOC="$("$WORK/venv/bin/python" -c 'import ecgfm, os; print(os.path.dirname(ecgfm.__file__))')"
case "$LOC" in
  "$ROOT"*) echo "FAIL: ecgfm imported from the checkout ($LOC)"; exit 1;;
esac
echo "ecgfm installed at $LOC"
for cmd in ecgfm-train ecgfm-prepare ecgfm-probe ecgfm-finetune ecgfm-explain; do
  "$WORK/venv/bin/$cmd" --help >/dev/null
done
"$WORK/venv/bin/ecgfm-train" +experiment=mae trainer.max_steps=5 torch_threads=1 hydra.run.dir=run \
  trainer.enable_progress_bar=false > train.log 2>&1 || { tail -30 train.log; exit 1; }
test -f run/encoder/encoder.json && test -f run/encoder/encoder.safetensors && test -f run/summary.json
"$WORK/venv/bin/python" -c "
import json, numpy as np, ecgfm
s = json.load(open('run/summary.json')); assert s['steps'] == 5, s['steps']
z = ecgfm.Encoder.load('run/encoder').embed(np.random.default_rng(0).normal(size=(12, 5000)), fs=500)
assert np.isfinite(z).all()
print('ecgfm-train from a wheel: %d steps, encoder %s, embedding dim %d' % (s['steps'], 'run/encoder', z.shape[0]))
"
echo "PASS"
