"""Review s20 of the benchmark scripts: units and labels of the memory figures, intervals (or labelled spreads) beside
the estimates, the figures a line prints covering the passes it names, and the docs saying what the scripts compute.
Each test exercises the small function a script prints through (or the script with its expensive steps stubbed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ecgfm.timing import max_rss_bytes

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str, register: bool = False):
    spec = importlib.util.spec_from_file_location(f"{name}_s20" if not register else name,
                                                  ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake_getrusage(maxrss: int):
    def getrusage(who):
        return types.SimpleNamespace(ru_maxrss=maxrss, ru_utime=0.0, ru_stime=0.0)
    return getrusage


# ------------------------------------------------------------------------------------------------ bench_probe


def test_bench_probe_gives_no_rise_when_the_peak_reset_was_refused():
    """With /proc/self/clear_refs refused, VmHWM is the process-lifetime peak (an earlier cell's): the rise above the
    cell's start was printed as if it were the cell's own footprint (+202 MiB for a +0-1 MiB cell)."""
    bp = _script("bench_probe")
    refused = {"peak_memory": "RSS 1437 MiB (process, since start: reset refused)", "rss_start": 1188.0,
               "peak_reset": False}
    assert bp._rise(refused) == "rise n/a (peak reset refused)"
    assert "above the" not in bp._footprint(refused) and "1188 MiB" in bp._footprint(refused)
    ok = {"peak_memory": "RSS 1437 MiB (process, this cell)", "rss_start": 986.0, "peak_reset": True}
    assert bp._rise(ok) == "+451 MiB"
    assert bp._footprint(ok) == "+451 MiB above the 986 MiB the process held when the cell started"


def test_bench_probe_prints_the_windows_and_time_of_the_passes_its_rate_covers():
    """Round 0's "240 windows in 11.47 s" stood beside a rate over all passes (25 windows/s): each figure now names
    the passes it covers."""
    bp = _script("bench_probe")
    one = bp._speed([(240, 12.0)])
    assert one == "240 windows in 12.00 s = 20 windows/s (one pass, no interval)"
    two = bp._speed([(240, 11.47), (240, 8.0)])
    assert "round 0: 240 windows in 11.47 s" in two
    assert "all 2 passes: 480 windows in 19.47 s = 25 windows/s (95% CI " in two and "over 2 passes)" in two


def _no_proc(monkeypatch) -> None:
    """/proc unreadable (as off Linux): the scripts fall back to getrusage."""
    real_read = Path.read_text

    def no_proc(self, *a, **k):
        if str(self).startswith("/proc/"):
            raise OSError("no /proc")
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", no_proc)


def test_bench_probe_maxrss_fallback_is_bytes_on_macos_and_kib_elsewhere(monkeypatch):
    """ru_maxrss / 1024 was printed as MiB: KiB / 1024 on Linux, but bytes / 1024 (1024x too large) on macOS."""
    bp = _script("bench_probe")
    monkeypatch.setattr(resource, "getrusage", _fake_getrusage(3 * 2**29))     # 1.5 GiB in bytes (macOS)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert max_rss_bytes() == 3 * 2**29
    _no_proc(monkeypatch)
    assert bp._peak_memory().startswith("RSS 1536 MiB (since start)")
    monkeypatch.setattr(resource, "getrusage", _fake_getrusage(3 * 2**19))     # 1.5 GiB in KiB (Linux)
    monkeypatch.setattr(sys, "platform", "linux")
    assert max_rss_bytes() == 3 * 2**29
    assert bp._peak_memory().startswith("RSS 1536 MiB (since start)")


def test_bench_token_cache_maxrss_fallback_is_bytes_on_macos(monkeypatch):
    tc = _script("bench_token_cache")
    _no_proc(monkeypatch)
    monkeypatch.setattr(resource, "getrusage", _fake_getrusage(3 * 2**29))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tc._rss_mib() == pytest.approx(1536.0)
    monkeypatch.setattr(resource, "getrusage", _fake_getrusage(3 * 2**19))
    monkeypatch.setattr(sys, "platform", "linux")
    assert tc._rss_mib() == pytest.approx(1536.0)


def _fake_probe_main(cfg):
    """probe_main without extracting or training: one extraction of 100 windows in 0.5 s, one cell written."""
    from ecgfm.evaluate import features as F

    F.STATS["extractions"] += 1
    F.STATS["windows"] += 100
    F.STATS["seconds"] += 0.5
    p = Path(str(cfg.results_dir)) / "cells" / "cell.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"window_samples": 250, "stride_samples": 250, "backbone": "resnet1d_test"}))
    return {"cells_written": [str(p)]}


def test_bench_probe_output_with_a_refused_reset_one_round_and_a_deleted_work_folder(tmp_path, monkeypatch, capsys):
    """The whole print path (encoder passes stubbed): no rise from a refused reset, the one-round note, and no path
    to a results.md inside the temporary folder the script deletes (printed only when the folder is kept)."""
    import ecgfm.evaluate.sweep as sweep

    bp = _script("bench_probe")
    monkeypatch.setattr(sweep, "probe_main", _fake_probe_main)

    def refused():
        bp._PEAK_RESET["ok"] = False

    monkeypatch.setattr(bp, "_reset_peak_memory", refused)
    argv = ["--checkpoints", "random:resnet1d_test", "--tasks", "synthetic", "--lead-modes", "aware", "padded",
            "--fractions", "1", "--seeds", "0", "--no-warmup", "--threads", "1"]
    res = bp.main(argv)
    out = capsys.readouterr().out
    assert res["one_pass"] and out.count("rise n/a (peak reset refused)") == 2 and "MiB above the" not in out
    assert "one round, so no interval is given" in out
    assert "results.md" not in out and "results table deleted with the temporary work folder" in out
    monkeypatch.setattr(bp, "_reset_peak_memory", lambda: bp._PEAK_RESET.update(ok=True))
    bp.main([*argv, "--work", str(tmp_path), "--repeats", "3"])
    out = capsys.readouterr().out
    assert f"results table: {tmp_path / 'results' / 'results.md'}" in out
    assert "no interval" not in out and "note: --repeats" not in out and out.count("over 3 passes)") == 2
    assert out.count("MiB above the ") == 2


# ------------------------------------------------------------------------------------------------ bench_data


@pytest.fixture()
def bench_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepfakeecg", types.ModuleType("deepfakeecg"))
    return _script("bench_data")


def test_bench_data_generated_peak_memory_is_decimal_gb_like_the_disk_rows(bench_data, tmp_path, monkeypatch,
                                                                           capsys):
    """peak (MiB) / 1024 was printed as "GB": GiB, 7.4 % below the decimal GB of the table's disk rows."""
    bd = bench_data

    def fake_run(args):
        if args[1] == "convert":
            return ({"converted": 1000, "cpu_s_workers": 10.0, "n_shards": 1, "skipped_reasons": {}}, 100.0,
                    2048.0, 20.0)
        return ({"fast": [1000.0, 900.0, 1100.0, 5000]}, 1.0, 500.0, 1.0)

    monkeypatch.setattr(bd, "run_measured", fake_run)
    monkeypatch.setattr(bd, "cache_sizes", lambda d: {"total": 2_147_483_648, "signal": 2_000_000_000,
                                                      "other": 147_483_648, "index_jsonl": 1000})
    monkeypatch.setattr(bd, "open_and_index_costs", lambda d: {"open_ms": 1.0, "index_s": 0.1})
    bd.bench_generated(1000, 2, 2, tmp_path, True)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| peak resident memory"))
    assert "| 2.1 GB |" in row and "2.00 GB" not in row          # 2048 MiB = 2.147e9 bytes
    assert bd._fmt_bytes(2048 * 2**20) == "2.1 GB"


def _fake_shared_data(root: Path) -> None:
    for i in (3, 1, 2, 1001):                                     # PTB-XL: records100/<thousands>/<id>_lr.hea
        d = root / "ptbxl" / "records100" / f"{i // 1000 * 1000:05d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}_lr.hea").write_text("")
        (d / f"{i:05d}_lr.dat").write_text("")
    (root / "cinc2017").mkdir(parents=True)
    for name in ("A00006", "A00002", "A00003"):
        (root / "cinc2017" / f"{name}.hea").write_text("")


def test_bench_data_naive_loader_reads_the_records_quick_converts(bench_data, tmp_path, monkeypatch):
    """--quick converts the first 200 records of each source (sorted ids); the naive loader read all 4,557."""
    bd = bench_data
    _fake_shared_data(tmp_path)
    monkeypatch.setattr(bd, "DATA", tmp_path)
    first2 = bd.naive_record_paths(2)
    assert [Path(p).name for p in first2] == ["00001_lr", "00002_lr", "A00002", "A00003"]
    assert len(bd.naive_record_paths(0)) == 4 + 3


def test_bench_data_quick_loader_job_and_header(bench_data, tmp_path, monkeypatch, capsys):
    """The loader child is told the --quick subset, and the header names both loaders' batch sizes."""
    bd = bench_data
    _fake_shared_data(tmp_path / "data")
    monkeypatch.setattr(bd, "DATA", tmp_path / "data")
    jobs = {}

    def fake_run(args):
        jobs[args[1]] = json.loads(args[2])
        if args[1] == "convert":
            return ({"converted": 400, "skipped": 0, "cpu_s_workers": 1.0, "n_shards": 2, "torch_imported": False,
                     "skipped_reasons": {}}, 10.0, 500.0, 5.0)
        return ({"fast": [1000.0, 900.0, 1100.0, 8000], "naive": [10.0, 9.0, 11.0, 160], "cpu_fast": 1e-5,
                 "cpu_naive": 1e-2}, 5.0, 300.0, 5.0)

    monkeypatch.setattr(bd, "run_measured", fake_run)
    monkeypatch.setattr(bd, "integrity_costs", lambda d: {"shards": 2, "shard_mib": 1.0, "open_stat_ms": 1.0,
                                                          "open_none_ms": 0.5, "open_full_ms": 10.0,
                                                          "input_files": 4, "input_changes_ms": 1.0})
    monkeypatch.setattr(sys, "argv", ["bench_data.py", "--quick", "--skip-synthetic", "--work", str(tmp_path / "w")])
    bd.main()
    out = capsys.readouterr().out
    assert jobs["convert"]["limit"] == 200 and jobs["loaders"]["limit"] == 200
    assert "batch size: cache 256, naive 16" in out and "first 200 records of each" in out


# ------------------------------------------------------------------------------------------------ benchmark_real


def test_benchmark_real_records_the_cpu_time_of_pretraining(tmp_path, monkeypatch):
    """pretrain_time.json had no cpu_s, so the docs' "CPU time" column showed "-" for every row the script made."""
    br = _script("benchmark_real")

    def fake_run(cmd, env):       # a train.py stand-in: a child process that burns ~0.3 CPU-s
        subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                        "while time.process_time() - t < 0.3: pass"], check=True)
        out = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        (out / "encoder").mkdir(parents=True, exist_ok=True)
        (out / "encoder" / "encoder.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps({"steps": 40, "fit_time_s": 1.0}))
        return 1.0

    monkeypatch.setattr(br, "run", fake_run)
    args = argparse.Namespace(out=str(tmp_path / "bench"), methods=["mae"], steps=40, recipe="auto", embed_dim=None,
                              depth=None, heads=None, batch_size=None, train_overrides=[], threads=1,
                              cache_root=str(tmp_path / "cache"))
    br.stage_pretrain(args, ["pool_a"], {})
    info = json.loads((tmp_path / "bench" / "pretrain" / "mae" / "pretrain_time.json").read_text())
    assert 0.3 <= info["cpu_s"] < 60 and "RUSAGE_CHILDREN" in info["cpu_scope"]
    row = next(line for line in br.pretrain_times_markdown(args).splitlines() if line.startswith("| mae |"))
    assert row.split(" | ")[5] == str(info["cpu_s"])            # the CPU time column, no longer "-"


# ------------------------------------------------------------------------------------------------ perclass_val


def _separable(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 5))
    x[np.arange(120), y] += 1.5
    return x, y, np.arange(0, 120, 2), np.arange(1, 120, 2)


def test_perclass_val_gives_a_bootstrap_ci_per_class():
    pv = _script("perclass_val")
    x, y, train, val = _separable()
    c, per = pv.per_class_val(x, y, train, val, 3)
    c2, m = pv.per_class_val_ci(x, y, train, val, ["a", "b", "c"], n_boot=200)
    assert c2 == c
    for k, name in enumerate("abc"):
        s = m["per_class_auroc"][name]
        assert s["value"] == pytest.approx(per[k]) and s["ci_low"] <= s["value"] <= s["ci_high"]
        assert s["ci_high"] - s["ci_low"] > 0
    assert m["macro_auroc"]["value"] == pytest.approx(np.mean(per)) and m["n"] == len(val)


def run_perclass_val(tmp_path: Path, monkeypatch, capsys, x: np.ndarray, y: np.ndarray, train: np.ndarray,
                     val: np.ndarray, bootstrap: int = 100, **cell_extra) -> str:
    """scripts/perclass_val.py on features ``x`` (one row per record) of a 3-class task with labels ``y`` and the
    given train / val rows, through a --cell file (``cell_extra`` added to it); returns what it printed."""
    import ecgfm.evaluate.tasks as T

    pv = _script("perclass_val")
    (tmp_path / "features").mkdir()
    np.savez(tmp_path / "features" / "k.npz", features=x.astype(np.float32), record=np.arange(len(x)),
             n_records=np.array(len(x)), skipped=np.zeros(0, np.int64))
    cell = {"task": "synthetic", "preprocess": {"fs": 100.0}, "feature_key": "k", "cache_dir": str(tmp_path / "c"),
            **cell_extra}
    (tmp_path / "c.json").write_text(json.dumps(cell))
    task = types.SimpleNamespace(cache_dir=str(tmp_path / "c"), cache=list(range(len(x))), multilabel=False,
                                 splits={"train": train, "val": val}, labels=np.eye(3)[y],
                                 class_names=["a", "b", "c"])
    monkeypatch.setattr(T, "load_task_spec", lambda *a, **k: None)
    monkeypatch.setattr(T, "build_task", lambda *a, **k: task)
    pv.main(["--task", "synthetic", "--cell", f"enc={tmp_path / 'c.json'}", "--cache-root", str(tmp_path),
             "--bootstrap", str(bootstrap)])
    return capsys.readouterr().out


def test_perclass_val_prints_cis_and_the_selection_caveat(tmp_path, monkeypatch, capsys):
    """The script printed bare validation AUROCs, with C chosen on the same validation split and no word of it."""
    x, y, train, val = _separable(1)
    out = run_perclass_val(tmp_path, monkeypatch, capsys, x, y, train, val)
    assert "C is chosen on this same validation split" in out and "optimistic" in out
    assert "| features | C | macro [95 % CI] |" in out
    row = next(line for line in out.splitlines() if line.startswith("| enc |"))
    assert row.count("[") == 4                                   # macro + 3 classes, each with its CI


# ------------------------------------------------------------------------------------------------ studies


N = 120


def _cell(res: Path, ckpt: str, strength: float, seed: int, val: float, arch: str = "A") -> None:
    from ecgfm.evaluate.metrics import evaluate_scores

    y = np.eye(3, dtype=int)[np.random.default_rng(0).integers(0, 3, N)]
    s = y * strength + np.random.default_rng(seed * 7 + int(strength * 10)).normal(size=y.shape)
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    cell = {"mode": "linear", "task": "cinc2017", "dataset": "cinc2017", "method": "mae", "checkpoint": ckpt,
            "backbone": "vit1d_tiny", "architecture": arch, "recipe_id": "r", "checkpoint_id": ckpt[-12:].ljust(12),
            "fraction": 1.0, "seed": seed, "multilabel": False, "val_macro_auroc": val,
            "results": {"test": evaluate_scores(y.argmax(1), p, False, ["a", "b", "c"], n_boot=50)},
            "predictions": {"test": {"keys": [f"r{i}" for i in range(N)], "y": y.tolist(), "scores": p.tolist()}}}
    path = res / "cells" / "linear" / "cinc2017" / ckpt.replace("/", "_").replace(":", "_") / f"f1_s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell))


def test_seed_spread_is_labelled_and_not_a_ci():
    ps = _script("pool_size_study", register=True)
    assert ps.seed_spread([0.80, 0.82, 0.81]) == "0.810 (seeds 0.800-0.820)"
    assert ps.seed_spread([0.8]) == "0.800 (one seed)"
    assert ps.seed_spread([None, float("nan")]) == "–"


def test_crop_ablation_validation_spread_and_test_ci(tmp_path):
    _script("pool_size_study", register=True)
    ca = _script("crop_ablation")
    out = tmp_path / "abl"
    ns = argparse.Namespace(out=str(out), docs=str(tmp_path / "docs"), bootstrap=50, encoder_2p5s=None,
                            encoder_10s=None)
    enc = ca.encoders(ns)
    for crop in ("2.5", "10"):
        for window in ("2.5", "10"):
            for seed, val in ((0, 0.70), (1, 0.74)):
                _cell(out / f"results_w{window}", enc[crop], 2.0, seed, val, arch=f"seq{crop}")
    md = ca.report(ns)
    assert "validation, mean (min-max over seeds, not a CI)" in md and "[mean per-seed 95 % CI]" in md
    row = next(line for line in md.splitlines() if line.startswith("| cinc2017") and ca.RECIPE in line)
    cols = row.split(" | ")
    assert cols[3] == "0.720 (seeds 0.700-0.740)"
    cells = [json.loads(p.read_text()) for p in (out / "results_w10").rglob("*.json")
             if "mae_10s" in json.loads(p.read_text())["checkpoint"]]
    lo = np.mean([c["results"]["test"]["macro_auroc"]["ci_low"] for c in cells])
    hi = np.mean([c["results"]["test"]["macro_auroc"]["ci_high"] for c in cells])
    assert f"[{lo:.3f}, {hi:.3f}]" in cols[4]


def test_pool_size_validation_column_is_a_labelled_seed_spread(tmp_path):
    ps = _script("pool_size_study", register=True)
    out = tmp_path / "study"
    ns = argparse.Namespace(out=str(out), docs=str(tmp_path / "docs"), pools=["real", "real+20k"], bootstrap=50)
    for seed, val in ((0, 0.60), (1, 0.66)):
        for pool in ns.pools:
            _cell(out / "results", ps.encoder(ns, pool), 1.0, seed, val)
        _cell(out / "results", "random:" + ps.encoder(ns, "real"), 0.2, seed, val)
    for pool in ns.pools:
        ps.run_dir(ns, pool).mkdir(parents=True)
        (ps.run_dir(ns, pool) / "summary.json").write_text(json.dumps({"steps": 100, "cache_dirs": []}))
    md = ps.report(ns)
    assert "val AUROC, mean (min-max over seeds, not a CI)" in md and "not a CI (no per-record validation" in md
    row = next(line for line in md.splitlines() if line.startswith("| cinc2017") and " real | " in line)
    assert row.split(" | ")[6] == "0.630 (seeds 0.600-0.660)"


# ------------------------------------------------------------------------------------------------ bench_explain


def test_bench_explain_labels_its_timings_as_a_spread():
    be = _script("bench_explain")
    rate, label = be.timing_text(8, [1.0, 4.0, 2.0])
    assert rate == pytest.approx(4.0)
    assert label == ("(timings over 3 runs: median 2.00 s for 8 ECGs, fastest 1.00 s, slowest 4.00 s; a spread, "
                     "not a CI)")
    rate, label = be.timing_text(1, [0.5])
    assert rate == pytest.approx(2.0) and label == "(one timed run: 0.50 s per ECG; no spread)"


# ------------------------------------------------------------------------------------------------ docs


def test_benchmark_docs_state_units_and_the_idle_core_estimate_as_computed():
    doc = (ROOT / "docs" / "BENCHMARK.md").read_text()
    assert "2.20 GB peak" not in doc and "2.20 GiB (2.36 GB)" in doc and "not re-measured" in doc
    assert "CPU time / 2, an estimate" not in doc
    row = next(line for line in doc.splitlines() if line.startswith("| wall time on 2 idle cores"))
    assert "parent CPU + worker CPU / 2" in row
