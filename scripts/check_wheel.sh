#!/usr/bin/env bash
# Build a (non-editable) wheel of ecgfm, install it into a fresh virtual environment and run the console scripts
# from a folder outside the checkout: configs must come from inside the package, nothing from the source tree.
#
#   bash scripts/check_wheel.sh                  # prints the installed location and the train summary; exit 0 = pass
#   bash scripts/check_wheel.sh --contents-only  # build the wheel and check its file list only (seconds)
#
# The fresh venv reuses the dependencies (torch, lightning, ...) of the project's .venv through a .pth line, as
# "torch preinstalled"; ecgfm itself comes only from the wheel (the .venv's editable-install hook is not loaded
# that way, and the check below fails if ecgfm is imported from the checkout).
#
# The wheel is built from a clean copy of the working tree's files that git knows of (tracked, plus untracked
# ones that .gitignore does not exclude; uncommitted edits included), never in the checkout itself: a stale
# build/lib cannot leak into the wheel and no build/ or *.egg-info is written into the checkout. The wheel's
# ecgfm/ files must then be exactly those files under ecgfm/ (a stray or a missing file fails the check), with
# the licence in its .dist-info and nothing else at the top level.
set -euo pipefail
CONTENTS_ONLY=0
case "${1:-}" in
  "") ;;
  --contents-only) CONTENTS_ONLY=1;;
  *) echo "usage: bash scripts/check_wheel.sh [--contents-only]" >&2; exit 2;;
esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ecgfm-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src"
# the files git knows of that exist in the working tree (a deleted, not yet committed file is left out)
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done > "$WORK/files")
(cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src" < "$WORK/files")
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >/dev/null
WHEEL="$(ls "$WORK"/dist/ecgfm-*.whl)"
"$PY" - "$WHEEL" "$WORK/files" <<'PYEOF' || exit 1
import sys, zipfile
wheel, listing = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
want = {f for f in open(listing, encoding="utf-8").read().split("\0") if f.startswith("ecgfm/")}
have = {n for n in names if n.startswith("ecgfm/")}
dist = [n for n in names if n.split("/")[0].endswith(".dist-info")]
other = sorted(set(names) - have - set(dist))
problems = [f"in the wheel but not a file of the checkout: {n}" for n in sorted(have - want)]
problems += [f"a file of the checkout missing from the wheel: {n}" for n in sorted(want - have)]
problems += [f"unexpected top-level entry in the wheel: {n}" for n in other]
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in dist):
    problems.append("no .dist-info/licenses/LICENSE in the wheel")
if problems:
    print("FAIL: the wheel's files differ from the checkout's ecgfm/ files:\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"wheel contents: the {len(have)} files of ecgfm/ (git ls-files ecgfm) + {len(dist)} metadata files")
PYEOF
if [ "$CONTENTS_ONLY" = 1 ]; then echo "PASS (contents only)"; exit 0; fi
# the fresh venv gets no pip of its own (ensurepip took ~6 s): the project's pip installs into it (pip --python)
python3 -m venv --without-pip "$WORK/venv"
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS" > "$SITE/_ecgfm_check_deps.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps --no-index "$WHEEL"
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
# 256 of the recipe's 1024 synthetic records: 5 steps of batch 32 use 160 (preparing the other 768 took ~5 s)
"$WORK/venv/bin/ecgfm-train" +experiment=mae trainer.max_steps=5 torch_threads=1 hydra.run.dir=run \
  data.params.n_records=256 trainer.enable_progress_bar=false > train.log 2>&1 || { tail -30 train.log; exit 1; }
test -f run/encoder/encoder.json && test -f run/encoder/encoder.safetensors && test -f run/summary.json
"$WORK/venv/bin/python" -c "
import json, numpy as np, ecgfm
s = json.load(open('run/summary.json')); assert s['steps'] == 5, s['steps']
z = ecgfm.Encoder.load('run/encoder').embed(np.random.default_rng(0).normal(size=(12, 5000)), fs=500)
assert np.isfinite(z).all()
print('ecgfm-train from a wheel: %d steps, encoder %s, embedding dim %d' % (s['steps'], 'run/encoder', z.shape[0]))
"
echo "PASS"
