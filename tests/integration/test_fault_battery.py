"""The fault battery of issue 9 (scripts/fault_battery.py): every fault injected through the public commands is
refused, skipped or recovered from as docs/RELIABILITY.md says. One test runs the whole battery (a few minutes on
a small CPU), so CI runs it; the others check its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "fault_battery.py"
FIXTURE = ROOT.parent / "shared" / "data" / "fixture"


def _run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_battery", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_battery"] = mod     # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_list_names_every_row_with_its_item_and_expectation():
    proc = _run("--list", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) >= 30
    assert all(r[1] == "item" and set(r[3].split("/")) <= {"error", "skip", "recover", "correct"} for r in rows)
    assert {int(r[2]) for r in rows} == set(range(1, 14))     # every item of the issue has a row


def test_unknown_row_is_refused():
    proc = _run("--only", "no_such_fault", timeout=120)
    assert proc.returncode == 2 and "unknown fault" in proc.stderr


def test_documented_table_lists_every_row():
    """docs/RELIABILITY.md's fault table names every row of the battery (regenerate it with --markdown)."""
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    for fault in _load().FAULTS:
        assert f"`{fault.name}`" in doc, fault.name


def test_classification_of_what_a_command_did():
    """A refusal passes only as one 'error: ...' line with the expected words; a traceback, a wrong message or a
    zero exit fail the row."""
    fb = _load()
    tb = "Traceback (most recent call last):\n  File ...\nValueError: x.csv: duplicate id 'a'\n"

    def proc(rc, err, out=""):
        return fb.Proc(["cmd"], rc, out, err, 0.1)

    assert fb.expect_error(proc(2, "error: x.csv: duplicate id 'a'\n"), "duplicate id").observed == "error"
    assert fb.expect_error(proc(2, "error: x.csv: duplicate id 'a'\n"), "duplicate id").ok
    assert fb.expect_error(proc(1, tb), "duplicate id").observed == "error+traceback"
    assert fb.expect_error(proc(2, "error: something else\n"), "duplicate id").observed == "wrong message"
    assert fb.expect_error(proc(1, "x.csv: duplicate id 'a'\n"), "duplicate id").observed == "wrong message"
    assert fb.expect_error(proc(0, ""), "duplicate id").observed == "exit 0"
    assert fb.expect_error(proc(2, "error: weights_only=False\n"), "error", forbid=("weights_only",)).ok is False
    c = fb.Check()
    c.that(False, "the cache still holds the old label")
    assert c.result("recover", proc(0, "")).ok is False
    assert fb.Check().result("recover", proc(0, tb)).ok is False          # exit 0 with a traceback
    assert fb.Check().result("recover", proc(1, "")).observed == "exit 1"


@pytest.mark.realdata
@pytest.mark.long
def test_fault_battery_all_rows_pass(tmp_path):
    if not FIXTURE.exists():
        pytest.skip(f"fixture records missing: {FIXTURE}")
    out = tmp_path / "battery.json"
    proc = _run("--json", str(out), "--jobs", "2")
    report = json.loads(out.read_text()) if out.exists() else None
    failed = [f"{r['fault']}: {r['observed']} ({r['detail']})" for r in (report or {}).get("table", [])
              if not r["passed"]]
    assert proc.returncode == 0 and report is not None, "\n".join(failed) or proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["passed"] == report["rows"] >= 30
