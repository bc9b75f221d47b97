"""``scripts/prepare.py`` without ``out=`` (issue 9, item 8): a default folder, never one named ``???``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    from ecgfm.cli import prepare

    return prepare


def test_default_out_from_the_source_names(script):
    assert script.default_out(["ptbxl"]) == "cache/ptbxl"
    assert script.default_out(["ptbxl", "cinc2017"], "/data/caches/") == "/data/caches/ptbxl+cinc2017"
    assert script.default_out("synthetic") == "cache/synthetic"
    with pytest.raises(ValueError, match="give out="):
        script.default_out([])


def test_missing_out_is_replaced_not_written_as_question_marks(script):
    cfg = OmegaConf.create({"sources": ["ptbxl"], "out": "???", "workers": 0})
    assert OmegaConf.is_missing(cfg, "out")
    assert script.resolve_out(cfg).out == "cache/ptbxl"
    assert OmegaConf.is_missing(cfg, "out")  # the caller's config is left as it was
    cfg = OmegaConf.create({"sources": ["ptbxl", "cinc2017"], "out": None, "cache_root": "/c"})
    resolved = script.resolve_out(cfg)
    assert resolved.out == "/c/ptbxl+cinc2017" and "cache_root" not in resolved
    assert script.resolve_out(OmegaConf.create({"sources": ["x"], "out": "mine"})).out == "mine"


def test_prepare_script_without_out_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare.py"), "sources=[synthetic]", "synthetic.n_records=3",
         "synthetic.duration=2.5", "workers=0", "progress=false", f"+cache_root={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "synthetic"
    assert f"writing the cache to {out}" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())
    assert not (tmp_path / "???").exists() and not (ROOT / "???").exists()


def test_prepare_script_bad_setting_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare.py"), "sources=[nope]", f"+cache_root={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: " in proc.stderr and "nope" in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, word", [("+synthetic.n_recordz=5", "n_recordz"),
                                            ("synthetic.n_records=[1,2]", "synthetic")])
def test_prepare_misspelt_source_argument_is_one_error_line(tmp_path, override, word):
    """+synthetic.n_recordz=5 (or a list for a number) raised a TypeError trace with exit status 1; now one error
    line naming the preset, and exit 2."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "prepare.py"), "sources=[synthetic]", override,
         f"out={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'h'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and word in proc.stderr
    assert "Traceback" not in proc.stderr
