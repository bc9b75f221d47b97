"""scripts/bench_data.py --generated: the generated-corpus table (build cost, size on disk, loader throughput,
1 M extrapolation) is printed by a script, computed from a cache it builds. The children run in this process
(a fake ``run_measured``) so the test pays no interpreter start-ups."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("deepfakeecg", reason="deepfake-ecg is not installed (scripts/setup.sh installs it)")


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_data_generated", Path(__file__).resolve().parents[2] / "scripts" / "bench_data.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    return bd


def test_generated_cache_table_measures_the_cache_it_builds(tmp_path, monkeypatch, capsys):
    bd = _load_script()
    children = {"convert": bd._child_convert, "cached_loader": bd._child_cached_loader}
    calls: list[str] = []

    def in_process(args):
        assert args[0] == "--_child"
        calls.append(args[1])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            children[args[1]](args[2])
        return json.loads(buf.getvalue().strip().splitlines()[-1]), 2.0, 512.0, 1.5

    monkeypatch.setattr(bd, "run_measured", in_process)
    res = bd.bench_generated(5, workers=0, loader_workers=0, work=tmp_path, quick=True)
    out = capsys.readouterr().out

    assert calls == ["convert", "cached_loader", "cached_loader"]            # build, then 2.5 s and 10 s crops
    cache = tmp_path / "deepfake5"
    assert (cache / "manifest.json").is_file()
    signal = sum(f.stat().st_size for f in (cache / "shards").glob("*.bin"))
    assert res["bytes"]["signal"] == signal == 5 * 12 * 1000 * 4             # 10 s at 100 Hz, 12 leads, float32
    assert res["bytes"]["total"] > signal and res["bytes"]["index_jsonl"] > 0
    for crop in ("2.5", "10.0"):
        rate, lo, hi = res["loaders"][crop]["samples_per_s"]
        assert rate > 0 and res["loaders"][crop]["samples"] > 0
    # the table: measured column from the figures, the 1 M column extrapolated linearly
    assert "| | 5 records (measured) | 1,000,000 (extrapolated) |" in out
    per_record = res["bytes"]["total"] / 5
    assert f"size on disk | {bd._fmt_bytes(res['bytes']['total'])} | ~{bd._fmt_bytes(per_record * 1e6)} |" in out
    assert "CPU time" in out and "~83.3 CPU-hours" in out                    # 1.5 s / 5 records x 1 M
    assert "upper bound" in out                                               # small N: start-up dominates
    assert "10 s crops" in out and "pandas index" in out


def test_generated_refuses_a_negative_count(monkeypatch, capsys):
    bd = _load_script()
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--generated", "-3"])
    with pytest.raises(SystemExit):
        bd.main()
    assert "--generated must be >= 1" in capsys.readouterr().err
