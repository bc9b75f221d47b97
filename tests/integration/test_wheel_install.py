"""A non-editable wheel installs into a fresh venv and ``ecgfm-train`` trains and exports from a folder outside the
checkout (configs found inside the package): runs scripts/check_wheel.sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("python3") is None, reason="python3 is needed to create the fresh venv")
def test_wheel_installs_and_trains_from_anywhere():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_wheel.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "ecgfm-train from a wheel: 5 steps" in proc.stdout
