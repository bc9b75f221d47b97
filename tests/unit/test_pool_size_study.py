"""scripts/pool_size_study.py and scripts/crop_ablation.py: their reports from probe cells, without pretraining
(pool-size rows with paired differences against the real-only encoder and the random-init twin, CSV and plot; the
crop x window grid with paired differences against the recipe's 10 s / 10 s)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from ecgfm.evaluate.metrics import evaluate_scores

ROOT = Path(__file__).resolve().parents[2]
N = 150


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


S = _script("pool_size_study")
A = _script("crop_ablation")


def _cell(res: Path, ckpt: str, method: str, strength: float, seed: int, arch: str = "A") -> None:
    rng = np.random.default_rng(0)
    y = np.eye(3, dtype=int)[rng.integers(0, 3, N)]
    s = y * strength + np.random.default_rng(seed * 7 + int(strength * 10)).normal(size=y.shape)
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    cell = {"mode": "linear", "task": "cinc2017", "dataset": "cinc2017", "method": method, "checkpoint": ckpt,
            "backbone": "vit1d_tiny", "architecture": arch, "recipe_id": "r", "checkpoint_id": ckpt[-12:].ljust(12),
            "fraction": 1.0, "seed": seed, "multilabel": False, "val_macro_auroc": 0.5 + strength / 10,
            "results": {"test": evaluate_scores(y.argmax(1), p, False, ["a", "b", "c"], n_boot=20)},
            "predictions": {"test": {"keys": [f"r{i}" for i in range(N)], "y": y.tolist(), "scores": p.tolist()}}}
    path = res / "cells" / "linear" / "cinc2017" / ckpt.replace("/", "_").replace(":", "_") / f"f1_s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell))


def test_report_rows_deltas_and_plot(tmp_path):
    out = tmp_path / "study"
    ns = type("A", (), dict(out=str(out), docs=str(tmp_path / "docs"), pools=list(S.POOLS), bootstrap=200))()
    strengths = {"real": 1.0, "real+20k": 1.0, "real+100k": 2.5}
    for seed in (0, 1):
        for pool, st in strengths.items():
            _cell(out / "results", S.encoder(ns, pool), "mae", st, seed)
        _cell(out / "results", "random:" + S.encoder(ns, "real"), "random-init", 0.2, seed)
    for pool in S.POOLS:
        S.run_dir(ns, pool).mkdir(parents=True)
        (S.run_dir(ns, pool) / "summary.json").write_text(json.dumps({"steps": 1800, "cache_dirs": []}))
    md = S.report(ns)
    rows = [line for line in md.splitlines() if line.startswith("| cinc2017")]
    assert [r.split(" | ")[2] for r in rows] == ["real", "real+20k", "real+100k", "random-init twin"]
    assert "reference" in rows[0] and rows[2].split(" | ")[8].startswith("+")      # +100k clearly better
    big = rows[2].split(" | ")[8]
    assert float(big.split("[")[1].split(",")[0]) > 0                               # its CI excludes 0
    assert all(r.split(" | ")[9].startswith("+") for r in rows[:3])                  # every MAE above the twin
    assert (tmp_path / "docs" / "pool_size.png").stat().st_size > 0
    csv = (tmp_path / "docs" / "pool_size.csv").read_text().splitlines()
    assert csv[0].startswith("pool,task,fraction,seed") and len(csv) == 1 + 8


def test_crop_ablation_report_pairs_every_cell_with_the_recipe(tmp_path):
    out = tmp_path / "abl"
    ns = type("A", (), dict(out=str(out), docs=str(tmp_path / "docs"), bootstrap=200, encoder_2p5s=None,
                            encoder_10s=None))()
    enc = A.encoders(ns)
    strength = {("10", "10"): 2.0, ("10", "2.5"): 2.0, ("2.5", "10"): 0.8, ("2.5", "2.5"): 1.0}
    for (crop, window), st in strength.items():
        for seed in (0, 1):   # the 2.5 s encoder is another architecture (seq_len): still paired with the recipe
            _cell(out / f"results_w{window}", enc[crop], "mae", st, seed, arch=f"seq{crop}")
    md = A.report(ns)
    rows = {line.split(" | ")[2]: line for line in md.splitlines() if line.startswith("| cinc2017")}
    assert set(rows) == {f"crop {c} s / window {w} s" for c, w in strength}
    assert rows[A.RECIPE].endswith("| reference |")
    low = rows["crop 2.5 s / window 10 s"].split(" | ")[5]
    assert low.startswith("-") and float(low.split(", ")[1].rstrip("] |")) < 0      # CI below 0
    assert (tmp_path / "docs" / "crop_ablation.md").read_text() == md


def test_report_names_its_reference_and_the_seeds_a_delta_averages(tmp_path):
    """--pools not starting with 'real': the Δ column names the reference; a pool missing a seed: its Δ says which
    seeds it averages (the printed means average others)."""
    out = tmp_path / "study"
    pools = ["real+20k", "real+100k"]
    ns = type("A", (), dict(out=str(out), docs=str(tmp_path / "docs"), pools=pools, bootstrap=100))()
    for seed in (0, 1, 2):
        _cell(out / "results", S.encoder(ns, "real+20k"), "mae", 1.0, seed)
        if seed < 2:
            _cell(out / "results", S.encoder(ns, "real+100k"), "mae", 2.0, seed)
        _cell(out / "results", "random:" + S.encoder(ns, "real+20k"), "random-init", 0.2, seed)
    for pool in pools:
        S.run_dir(ns, pool).mkdir(parents=True)
        (S.run_dir(ns, pool) / "summary.json").write_text(json.dumps({"steps": 900, "cache_dirs": []}))
    md = S.report(ns)
    assert "Δ vs real+20k [paired 95 % CI]" in md and "real-only" not in md
    row = next(line for line in md.splitlines() if line.startswith("| cinc2017") and " real+100k " in line)
    assert "(seeds 0 1)" in row.split(" | ")[8]
