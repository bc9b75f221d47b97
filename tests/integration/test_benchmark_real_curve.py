"""scripts/benchmark_real.py: the learning-curve stage on a tiny synthetic pretraining run (every saved checkpoint
exported, probed with validation and test numbers, table and plot), and the pretraining recipe choice."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_real", ROOT / "scripts" / "benchmark_real.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_real"] = mod
    spec.loader.exec_module(mod)
    return mod


B = _script()


def _tiny_mae_run(run_dir: Path, cache_root: Path) -> dict:
    """8 MAE steps of vit1d_test on 24 synthetic records, a checkpoint every 2 steps, all kept."""
    from ecgfm.pipelines import train

    overrides = ["+experiment=mae", f"out_dir={run_dir}", f"paths.cache_root={cache_root}", "backbone=vit1d_test",
                 "data.params.n_records=24", "data.params.duration=6.0", "data.batch_size=8",
                 "data.val_fraction=0.2", "trainer.max_steps=8", "checkpoint.every_n_train_steps=2",
                 "checkpoint.save_top_k=-1", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "torch_threads=1", "trainer.log_every_n_steps=1",
                 "method.warmup_steps=1", "method.decoder_dim=16", "method.decoder_heads=2",
                 "method.decoder_depth=1", "~logger"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return train(cfg)


def test_curve_stage_exports_probes_and_draws(tmp_path):
    out = tmp_path / "bench"
    cache_root = tmp_path / "cache"
    run_dir = out / "pretrain" / "mae"
    summary = _tiny_mae_run(run_dir, cache_root)
    assert summary["steps"] == 8
    sources = B.curve_sources(run_dir)
    assert sorted(sources) == [2, 4, 6, 8] and sources[8] == run_dir / "encoder"

    docs = tmp_path / "docs"
    argv = ["--out", str(out), "--docs", str(docs), "--cache-root", str(cache_root), "--methods", "mae",
            "--tasks", "synthetic", "--stages", "curve", "--bootstrap", "20", "--threads", "1", "--workers", "0",
            "--eval-overrides", "task.params.n_records=60", "task.params.duration=6.0", "plot=false",
            "--probe-overrides", "probe.Cs=[1.0]"]
    B.main(argv)
    # probe.py's Hydra logs are kept beside the benchmark's results, not in the project's outputs/ folder
    logs = list((out / "logs" / "multirun" / "probe").glob("*/multirun.yaml"))
    assert len(logs) == 1 and f"checkpoint={run_dir / 'curve' / 'step2' / 'encoder'}" in logs[0].read_text()
    for step in (2, 4, 6, 8):
        enc = run_dir / "curve" / f"step{step}" / "encoder"
        meta = json.loads((enc / "encoder.json").read_text())
        extra = meta.get("extra") or {}
        assert extra["steps"] == step and extra["pretrain_caches"]  # the leakage guard can check it
    args = B_args(argv)
    rows = B.curve_rows(args)
    assert sorted(r["step"] for r in rows) == [2, 4, 6, 8]
    assert all(0.0 <= r["ci_low"] <= r["test"] <= r["ci_high"] <= 1.0 and 0.0 <= r["val"] <= 1.0 for r in rows)
    md = (docs / "learning_curve.md").read_text()
    assert "| mae | 2 |" in md and "validation macro AUROC" in md and "Fewer points" not in md
    assert (docs / "learning_curve.png").stat().st_size > 1000

    # a rerun skips the finished exports (and probe.py skips the finished cells)
    mtime = (run_dir / "curve" / "step2" / "encoder" / "encoder.json").stat().st_mtime
    again = B.curve_encoders(args)
    assert sorted(again["mae"]) == [2, 4, 6, 8]
    assert (run_dir / "curve" / "step2" / "encoder" / "encoder.json").stat().st_mtime == mtime

    # a retrained run (a newer checkpoint file for step 2): that point is exported again, not reused
    ckpt = sources[2]
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    B.curve_encoders(args)
    assert (run_dir / "curve" / "step2" / "encoder" / "encoder.json").stat().st_mtime != mtime
    # Lightning's step<N>-v1.ckpt (a second save of one step) is the newer file: it is the source of that step
    newer = ckpt.with_name(ckpt.stem + "-v1.ckpt")
    shutil.copy(ckpt, newer)
    assert B.curve_sources(run_dir)[2] == newer
    newer.unlink()
    # a step folder left by an older run of the method (not a checkpoint of this run) gives no curve row
    shutil.copytree(run_dir / "curve" / "step2", run_dir / "curve" / "step1000")
    cell_file = next(p for p in (out / "curve" / "results" / "cells").rglob("*.json")
                     if json.loads(p.read_text()).get("checkpoint") == str(run_dir / "curve" / "step2" / "encoder"))
    old = json.loads(cell_file.read_text())
    old["checkpoint"] = str(run_dir / "curve" / "step1000" / "encoder")
    stale = cell_file.parent.with_name(cell_file.parent.name + "_old") / cell_file.name
    stale.parent.mkdir()
    stale.write_text(json.dumps(old))
    assert sorted(r["step"] for r in B.curve_rows(args)) == [2, 4, 6, 8]
    # a cell computed from other weights than its step folder holds now (re-exported after a retrain, the curve
    # probe not rerun): no row, rather than the old run's number at this run's step
    cell = json.loads(cell_file.read_text())
    cell["checkpoint_id"] = "other-weights"
    cell_file.write_text(json.dumps(cell))
    assert sorted(r["step"] for r in B.curve_rows(args)) == [4, 6, 8]
    # no curve rows at all: the run's own learning_curve.md / .png go (an earlier run's must not pass for this
    # one); the docs copies, which show rows this run lacks, stay unless --replace-docs
    shutil.rmtree(out / "curve" / "results")
    assert B.curve_report(args) is None
    assert not (out / "curve" / "learning_curve.md").exists() and not (out / "curve" / "learning_curve.png").exists()
    assert (docs / "learning_curve.md").is_file() and (docs / "learning_curve.png").is_file()
    args.replace_docs = True
    assert B.curve_report(args) is None
    assert not (docs / "learning_curve.md").exists() and not (docs / "learning_curve.png").exists()


def B_args(argv: list[str]):
    """The parsed arguments of ``argv`` (as main parses them)."""
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        captured["ns"] = ns
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            B.main(argv)
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["ns"]


def test_a_missing_cpu_recipe_is_refused_before_the_pools_are_prepared(tmp_path, monkeypatch):
    """--recipe cpu30 --methods hybrid (no crema_cpu30.yaml) prepared five caches (~50 s, into the project's
    cache/) before it was refused."""
    monkeypatch.setattr(B, "stage_pool", lambda args: pytest.fail("the pools were prepared first"))
    with pytest.raises(SystemExit, match="crema_cpu30.yaml does not exist"):
        B.main(["--stages", "pool", "pretrain", "--methods", "hybrid", "--recipe", "cpu30",
                "--out", str(tmp_path / "runs")])


def test_pretrain_recipe_choice(tmp_path, monkeypatch):
    """No --steps: the <method>_cpu30 recipe when it exists (its own steps and sizes), else +experiment=<method>
    for 300 steps with today's sizes; --steps N: +experiment=<method> for N steps, checkpoints every N // 4."""
    conf = tmp_path / "ecgfm" / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mae_cpu30.yaml").write_text("# @package _global_\n")
    monkeypatch.setattr(B, "ROOT", tmp_path)
    base = dict(steps=None, recipe="auto", embed_dim=None, depth=None, heads=None, batch_size=None)
    ns = type("A", (), {})
    a = ns()
    a.__dict__.update(base)
    name, over = B.pretrain_recipe(a, "mae")
    assert name == "mae_cpu30" and over == []
    name, over = B.pretrain_recipe(a, "simclr")   # no simclr_cpu30.yaml here
    assert name == "simclr" and "trainer.max_steps=300" in over and "backbone.embed_dim=64" in over
    a.steps = 40
    name, over = B.pretrain_recipe(a, "mae")
    assert name == "mae" and "trainer.max_steps=40" in over and "checkpoint.every_n_train_steps=10" in over
    a.recipe, a.embed_dim = "cpu30", 32
    name, over = B.pretrain_recipe(a, "mae")
    assert name == "mae_cpu30" and "trainer.max_steps=40" in over and over[-1] == "backbone.embed_dim=32"
    with pytest.raises(SystemExit):
        B.pretrain_recipe(a, "clocs")
    # a CNN recipe takes the batch size but no ViT sizes
    (conf / "simclr_cnn_cpu30.yaml").write_text("# @package _global_\ndefaults:\n  - override /backbone: "
                                                "resnet1d_tiny\n")
    a.embed_dim, a.steps, a.batch_size = None, None, 32
    name, over = B.pretrain_recipe(a, "simclr_cnn")
    assert name == "simclr_cnn_cpu30" and over == ["data.batch_size=32"]
    a.depth = 2
    with pytest.raises(SystemExit, match="--depth.*CNN"):
        B.pretrain_recipe(a, "simclr_cnn")
    # an experiment that extends another one inherits its backbone (simclr_cnn_hc_cpu30 extends simclr_cnn_cpu30)
    (conf / "simclr_cnn_hc_cpu30.yaml").write_text("# @package _global_\ndefaults:\n  - simclr_cnn_cpu30\n")
    with pytest.raises(SystemExit, match="--depth.*CNN"):
        B.pretrain_recipe(a, "simclr_cnn_hc")
    a.depth = None
    assert B.pretrain_recipe(a, "simclr_cnn_hc") == ("simclr_cnn_hc_cpu30", ["data.batch_size=32"])
    # a second pretraining seed of the same recipe
    assert B.pretrain_recipe(a, "simclr_cnn_hc_s1") == ("simclr_cnn_hc_cpu30", ["data.batch_size=32", "seed=1"])


def test_docs_copy_of_the_results_table_is_compact(tmp_path):
    src = tmp_path / "results.csv"
    src.write_text("mode,task,metric,value,ci_low,ci_high,cell\n"
                   "linear,cinc2017,macro_auroc,0.9239639207578123,0.9021,,linear/cinc2017/x/f1_s0.json\n")
    B.docs_results_csv(src, tmp_path / "real_results.csv")
    lines = (tmp_path / "real_results.csv").read_text().splitlines()
    assert lines[0] == "mode,task,metric,value,ci_low,ci_high"                 # the run-folder path is dropped
    assert lines[1] == "linear,cinc2017,macro_auroc,0.923964,0.9021,"          # rounded; a missing CI stays empty


def test_a_finished_run_is_reused_only_for_the_recipe_it_was_trained_with(tmp_path, monkeypatch):
    """stage_pretrain records the recipe it trained; a later run asking for other steps into the same --out is
    refused naming both (it probed the old encoder as if it were the new one), the same recipe is reused, and an
    encoder copied in without a record is reused with a line saying so."""
    calls = []

    def fake_run(cmd, env):
        calls.append(cmd)
        out = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        (out / "encoder").mkdir(parents=True)
        (out / "encoder" / "encoder.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps({"steps": 40, "fit_time_s": 1.0}))
        return 1.0

    monkeypatch.setattr(B, "run", fake_run)
    args = type("A", (), {})()
    args.__dict__.update(out=str(tmp_path / "bench"), methods=["mae"], steps=40, recipe="auto", embed_dim=None,
                         depth=None, heads=None, batch_size=None, train_overrides=[], threads=1,
                         cache_root=str(tmp_path / "cache"))
    B.stage_pretrain(args, ["pool_a"], {})
    B.stage_pretrain(args, ["pool_a"], {})                          # same recipe: reused, not trained again
    assert len(calls) == 1
    args.steps = 80
    with pytest.raises(SystemExit, match=r"pretrain/mae .*trained with .*max_steps=40.*asks for .*max_steps=80"):
        B.stage_pretrain(args, ["pool_a"], {})
    (tmp_path / "bench" / "pretrain" / "mae" / "pretrain_time.json").unlink()   # a copied-in encoder
    B.stage_pretrain(args, ["pool_a"], {})
    assert len(calls) == 1
