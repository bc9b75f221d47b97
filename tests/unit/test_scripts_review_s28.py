"""Review s28 of the study / benchmark scripts.

* pool_size_study.py / crop_ablation.py: a relative ``--out`` (the default one included) named two folders when the
  script was not started from the project root: train.py / probe.py (run in the project root) wrote under the
  project, the script read under its own working directory (pool_size_study died with FileNotFoundError on
  summary.json after the pretraining; crop_ablation never saw its finished runs and trained again on every call).
* bench_probe.py: ``checkpoint=handcrafted`` among ``--checkpoints`` gave "ONE PASS ...: NO" and exit 1 (its
  feature passes are counted in ``handcrafted.STATS``, not ``features.STATS``).
* benchmark_real.py: a failed train.py attempt followed by a fresh (not resumed) run had both attempts' wall / CPU
  time summed, and the report said "2 legs (resumed)".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str, register: bool = False):
    """Load ``scripts/<name>.py`` (registered under its own name when ``register``, as its siblings import it)."""
    spec = importlib.util.spec_from_file_location(name if register else f"{name}_s28",
                                                  ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return mod


def _fake_children(monkeypatch, mod, calls: list):
    """Stand-in for the train.py / probe.py processes of a study script: a train.py run writes ``encoder/`` and
    ``summary.json`` under ``hydra.run.dir`` taken from its working directory (``cwd``), as Hydra does."""

    def fake_run(cmd, cwd=None, env=None, check=False, **kw):
        calls.append((cmd, cwd))
        if cmd[1] == "train.py":
            run = Path(cwd) / next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir="))
            (run / "encoder").mkdir(parents=True, exist_ok=True)
            (run / "encoder" / "encoder.json").write_text("{}")
            (run / "summary.json").write_text(json.dumps({"steps": 1800, "fit_time_s": 1.0}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(mod.subprocess, "run", fake_run)


def _places(tmp_path, monkeypatch, *mods):
    """A stand-in project root (where the children run: nothing is written into the checkout) and the folder the
    command is started in, made the working directory."""
    fake_root, caller = tmp_path / "project", tmp_path / "elsewhere"
    fake_root.mkdir()
    caller.mkdir()
    for mod in mods:
        monkeypatch.setattr(mod, "ROOT", fake_root)
    monkeypatch.chdir(caller)
    return fake_root, caller


# ----------------------------------------------------------------------------------------------- finding 2
@pytest.mark.parametrize("out", ["study", None])
def test_pool_size_study_reads_the_run_its_train_py_wrote_when_started_elsewhere(tmp_path, monkeypatch, out):
    """Started outside the project root with a relative --out (or the default), the pretraining stage reads the
    summary.json that train.py wrote and records the time beside it (it died with FileNotFoundError)."""
    S = _script("pool_size_study")
    fake_root, caller = _places(tmp_path, monkeypatch, S)
    calls: list = []
    _fake_children(monkeypatch, S, calls)
    S.main(["--stages", "pretrain", "--pools", "real", "--docs", "docs", "--cache-root", "c",
            *(["--out", out] if out else [])])
    run = caller / "study" / "real" if out else fake_root / "runs" / "pool_size" / "real"
    assert (run / "summary.json").is_file() and (run / "pretrain_time.json").is_file()
    cmd = calls[0][0]
    assert f"hydra.run.dir={run}" in cmd and f"paths.cache_root={caller / 'c'}" in cmd


def test_crop_ablation_sees_its_finished_runs_when_started_elsewhere(tmp_path, monkeypatch, capsys):
    """A second call from the same folder skips the runs the first one trained (it trained them again)."""
    _script("pool_size_study", register=True)   # crop_ablation imports it
    A = _script("crop_ablation")
    _places(tmp_path, monkeypatch, A)
    calls: list = []
    _fake_children(monkeypatch, A, calls)
    A.main(["--stages", "pretrain", "--out", "abl", "--docs", "docs"])
    assert len(calls) == 2
    monkeypatch.chdir(tmp_path / "elsewhere")    # the same command again, from the same folder
    A.main(["--stages", "pretrain", "--out", "abl", "--docs", "docs"])
    assert len(calls) == 2 and capsys.readouterr().out.count("pretrained already") == 2
    assert (tmp_path / "elsewhere" / "abl" / "mae_10s" / "encoder" / "encoder.json").is_file()


def test_study_paths_inside_the_project_keep_their_names(monkeypatch):
    """Paths inside the project stay named relative to it (probe cells record the encoder path as given: an
    existing study's cells are found again), from whichever folder inside it the command starts; the defaults
    are the project's folders."""
    B = _script("benchmark_real")
    args = argparse.Namespace(out="../runs/pool_size", cache_root=None, encoder_10s="../runs/pool_size/real/encoder",
                              encoder_2p5s=None, docs="d", data_root="/abs/data")
    B.resolve_from_caller(args, ROOT / "scripts", in_project=("out", "cache_root", "encoder_10s", "encoder_2p5s"),
                          absolute=("docs", "data_root"), defaults={"cache_root": ROOT / "cache"})
    assert (args.out, args.cache_root, args.encoder_10s) == ("runs/pool_size", "cache",
                                                             "runs/pool_size/real/encoder")
    assert args.encoder_2p5s is None and args.docs == str(ROOT / "scripts" / "d") and args.data_root == "/abs/data"


# ----------------------------------------------------------------------------------------------- finding 3
def test_bench_probe_counts_the_handcrafted_baselines_feature_pass(tmp_path, capsys):
    """checkpoint=handcrafted: one feature pass for the corpus (handcrafted.STATS), the one-pass check holds and its
    second cell is the only one listed as heads on cached features (it said NO and exited 1)."""
    P = _script("bench_probe")
    res = P.main(["--checkpoints", "handcrafted", "--tasks", "synthetic", "--fractions", "1", "--seeds", "0", "1",
                  "--synthetic-records", "30", "--bootstrap", "5", "--threads", "1", "--no-warmup",
                  "--work", str(tmp_path), f"paths.output_root={tmp_path / 'out'}", "probe.Cs=[1.0]"])
    out = capsys.readouterr().out
    assert res["one_pass"] and res["encoder_passes"] == 1 and res["cells"] == 2
    assert "ONE PASS PER CHECKPOINT AND CORPUS: yes" in out and "checkpoint=handcrafted: its feature passes" in out
    assert "whole-record features, one row per record: 30 records in" in out
    assert res["passes"]["handcrafted|synthetic|aware"]["records"] == 30


# ----------------------------------------------------------------------------------------------- finding 4
def _bench_args(tmp_path):
    return argparse.Namespace(out=str(tmp_path / "bench"), methods=["mae"], steps=40, recipe="auto", embed_dim=None,
                              depth=None, heads=None, batch_size=None, train_overrides=[], threads=1,
                              cache_root=str(tmp_path / "cache"))


def test_a_fresh_run_after_a_failed_attempt_is_timed_alone(tmp_path, monkeypatch):
    """Attempt 1 fails before any checkpoint; the rerun starts afresh and finishes (resumed_from None): its own
    wall / CPU time, the failed attempt given apart, and no "(resumed)" in the table."""
    B = _script("benchmark_real")
    attempts = []

    def fake_run(cmd, env):
        out = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        attempts.append(1)
        if len(attempts) == 1:
            raise subprocess.CalledProcessError(1, cmd)
        (out / "encoder").mkdir(parents=True)
        (out / "encoder" / "encoder.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps({"steps": 40, "fit_time_s": 5.0, "fit_time_total_s": 5.0,
                                                      "resumed_from": None}))
        return 20.0

    monkeypatch.setattr(B, "run", fake_run)
    args = _bench_args(tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        B.stage_pretrain(args, ["pool_a"], {})
    B.stage_pretrain(args, ["pool_a"], {})
    folder = tmp_path / "bench" / "pretrain" / "mae"
    recorded = json.loads((folder / B.LEGS_FILE).read_text())["legs"]
    info = json.loads((folder / "pretrain_time.json").read_text())
    assert info["wall_s"] == 20.0 and info["legs"] == 1 and not info["resumed"]
    row = B.pretrain_times_markdown(args).splitlines()[-1]
    assert "resumed" not in row and "1 earlier attempt(s) not continued by this run left out" in row
    assert info["discarded_legs"] == 1 and info["discarded_wall_s"] == recorded[0]["wall_s"]
    assert [leg["checkpoint_at_start"] for leg in recorded] == [False, False]


def test_a_resumed_run_sums_its_own_legs_only():
    """Attempt 1 fails before a checkpoint, attempt 2 starts afresh and is interrupted after one, attempt 3
    resumes it: attempts 2 and 3 are summed, attempt 1 is given apart. The reproducer's case (a fresh run after a
    failed one) gives the last leg alone."""
    B = _script("benchmark_real")
    legs = [{"wall_s": 600.0, "cpu_s": 1100.0, "checkpoint_at_start": False},
            {"wall_s": 300.0, "cpu_s": 500.0, "checkpoint_at_start": False},
            {"wall_s": 1000.0, "cpu_s": 1900.0, "checkpoint_at_start": True}]
    info = B.pretrain_leg_times({"steps": 1800, "resumed_from": "last.ckpt", "fit_time_total_s": 1200.0}, legs)
    assert (info["wall_s"], info["cpu_s"], info["legs"], info["time_scope"]) == (1300.0, 2400.0, 2, "all legs")
    assert (info["discarded_legs"], info["discarded_wall_s"], info["discarded_cpu_s"]) == (1, 600.0, 1100.0)
    fresh = B.pretrain_leg_times({"steps": 1800, "resumed_from": None, "fit_time_s": 1500.0,
                                  "fit_time_total_s": 1500.0},
                                 [{"wall_s": 600.0, "cpu_s": 1100.0, "status": "exit status 1"},
                                  {"wall_s": 1560.0, "cpu_s": 2900.0, "status": "finished"}])
    assert (fresh["wall_s"], fresh["cpu_s"], fresh["fit_time_s"], fresh["legs"]) == (1560.0, 2900.0, 1500.0, 1)
    assert (fresh["discarded_legs"], fresh["discarded_wall_s"]) == (1, 600.0)


def test_an_older_record_of_a_fresh_run_is_not_called_resumed(tmp_path):
    """A pretrain_time.json written before discarded attempts were left out (2 legs summed, resumed false): the
    table no longer says "(resumed)"."""
    B = _script("benchmark_real")
    folder = tmp_path / "bench" / "pretrain" / "mae"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"steps": 1800, "resumed_from": None}))
    (folder / "pretrain_time.json").write_text(json.dumps({
        "experiment": "mae_cpu30", "steps": 1800, "wall_s": 2160.0, "cpu_s": 4000.0, "fit_time_s": 1500.0,
        "legs": 2, "resumed": False, "time_scope": "all legs", "threads": 2}))
    row = B.pretrain_times_markdown(_bench_args(tmp_path)).splitlines()[-1]
    assert "(resumed)" not in row and "2 train.py runs summed, the last not resumed" in row
