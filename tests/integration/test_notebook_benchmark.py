"""notebooks/benchmark.ipynb runs on a small synthetic results table (built with ecgfm.evaluate.report)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient

from ecgfm.evaluate.metrics import evaluate_scores
from ecgfm.evaluate.report import build_report

ROOT = Path(__file__).resolve().parents[2]


def _fake_cells(results: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 3))
    for mode, method, strength in (("linear", "mae", 1.0), ("linear", "random-init", 0.3),
                                   ("finetune", "mae", 1.5)):
        for frac in (0.1, 1.0):
            for seed in (0, 1):
                s = np.clip(y * strength * frac ** 0.2 + rng.random((60, 3)), 0, None)
                s = s / s.max()
                cell = {"mode": mode, "task": "toy", "dataset": "synthetic", "method": method,
                        "checkpoint": f"runs/{method}", "backbone": "vit1d_test", "fraction": frac, "seed": seed,
                        "n_train": int(100 * frac),
                        "results": {"test": evaluate_scores(y, s, True, ["a", "b", "c"], n_boot=50)}}
                p = results / "cells" / mode / "toy" / method / f"f{frac:g}_s{seed}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(cell))


def test_benchmark_notebook_executes(tmp_path):
    results = tmp_path / "results"
    _fake_cells(results)
    report = build_report(results, plot=False)
    assert report["n_cells"] == 12
    nb = nbformat.read(ROOT / "notebooks" / "benchmark.ipynb", as_version=4)
    env_before = os.environ.get("ECGFM_RESULTS")
    os.environ["ECGFM_RESULTS"] = report["csv"]
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("ECGFM_RESULTS", None)
        else:
            os.environ["ECGFM_RESULTS"] = env_before
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the fraction plot and a per-class plot
    text = "".join(o.get("text", "") for o in outputs)
    assert "12 cells" in text
