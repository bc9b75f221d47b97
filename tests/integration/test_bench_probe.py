"""scripts/bench_probe.py: one encoder pass per checkpoint, corpus and lead mode over the timed cells, with the
untimed warm-up run first (so the first-timed lead mode is not charged process start-up) in folders of its own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_probe_warms_up_then_times_one_pass_per_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_probe", ROOT / "scripts" / "bench_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--checkpoints", "random:resnet1d_test", "--tasks", "synthetic", "--leads", "I", "--lead-modes",
              "aware", "padded", "--fractions", "1", "--seeds", "0", "--synthetic-records", "60", "--bootstrap", "10",
              "--work", str(tmp_path), "--threads", "1", "probe.Cs=[1.0]"])
    out = capsys.readouterr().out
    assert "warm-up excluded" in out and "ONE PASS PER CHECKPOINT AND CORPUS: yes" in out
    assert "torch threads: 1;" in out
    # the cell's own footprint beside the process's peak (which includes every library loaded before)
    assert out.count("MiB above the ") == 2 and "MiB the process held when the cell started" in out
    assert "lead-aware vs zero-padded 12-lead grid" in out
    assert len(list((tmp_path / "warmup" / "features").rglob("*.npz"))) == 2          # the warm-up's own files
    assert len(list((tmp_path / "cache" / "features").rglob("*.npz"))) == 2           # the timed cells' files


def test_bench_probe_repeats_give_an_interval_and_per_round_speedups(tmp_path, capsys):
    """--repeats 2: each checkpoint / lead mode extracted twice (the second into its own folders, outside the
    one-pass count), windows/s with a 95 % interval, the speed-up per round."""
    spec = importlib.util.spec_from_file_location("bench_probe_r", ROOT / "scripts" / "bench_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--checkpoints", "random:resnet1d_test", "--tasks", "synthetic", "--leads", "I", "--lead-modes",
                    "aware", "padded", "--fractions", "1", "--seeds", "0", "--synthetic-records", "40", "--bootstrap",
                    "10", "--work", str(tmp_path), "--threads", "1", "--no-warmup", "--repeats", "2",
                    "probe.Cs=[1.0]"])
    out = capsys.readouterr().out
    assert out.count("over 2 passes)") == 2 and "ONE PASS PER CHECKPOINT AND CORPUS: yes" in out
    assert "(median of 2 rounds, min-max " in out
    aware = res["passes"]["random:resnet1d_test|synthetic|aware"]
    assert len(aware["speedup_rounds"]) == 2 and aware["speedup_vs_padded"] > 0
    lo, hi = aware["windows_per_s"][1], aware["windows_per_s"][2]
    assert lo <= aware["windows_per_s"][0] <= hi
    assert len(list((tmp_path / "repeats" / "1" / "features").rglob("*.npz"))) == 2   # the second round's files
    assert len(list((tmp_path / "cache" / "features").rglob("*.npz"))) == 2


def test_rise_is_signed_and_freed_memory_is_released_before_a_cell(monkeypatch):
    """A cell's rise is its peak less its starting RSS, printed with its own sign (a slightly negative one read
    "+-0 MiB"); memory freed by earlier cells is handed back (malloc_trim) before the peak is reset, else the next
    cell reused it and its rise read near zero (a 2026-12-07 review)."""
    spec = importlib.util.spec_from_file_location("bench_probe_m", ROOT / "scripts" / "bench_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = {"peak_reset": True, "peak_memory": "RSS 100 MiB (process, this cell)", "rss_start": 100.4}
    assert mod._rise(p) == "-0 MiB" and mod._footprint(p).startswith("-0 MiB above the 100 MiB")
    assert mod._rise(dict(p, rss_start=40.0)) == "+60 MiB"
    calls = []
    monkeypatch.setattr(mod, "_release_freed_memory", lambda: calls.append("release"))
    monkeypatch.setattr(mod, "reset_peak_rss", lambda: calls.append("reset") or True)
    mod._reset_peak_memory()
    assert calls == ["release", "reset"]
