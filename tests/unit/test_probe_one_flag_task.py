"""A one-class multi-label task (ONE 0/1 flag column, ``conf/task/folder.yaml``: "A one-class task ... needs
multilabel: true"): the linear probe returns one probability column, every probe variant runs a whole cell, and the
LP-FT head is initialised from that probe.

scikit-learn's ``OneVsRestClassifier`` reads an ``(n, 1)`` indicator as a *binary* target and returns two
probability columns, which crashed probe.py and finetune.py with "targets must be (n,) class indices or (n, 2)
indicators, got (9, 1)".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from ecgfm.data.synthetic import write_wfdb
from ecgfm.evaluate.features import FeatureSet
from ecgfm.evaluate.finetune import init_head_from_probe
from ecgfm.evaluate.probe import LinearProbe, MLPProbe, ProbeData, run_probe_grid
from ecgfm.evaluate.sweep import finetune_main, probe_main

ROOT = Path(__file__).resolve().parents[2]
#: synthetic classes flagged 1 in the one-class task (about 4 in 9 records): a rate / rhythm flag
FLAGGED = {"sinus_bradycardia", "sinus_tachycardia", "atrial_fibrillation", "premature_ventricular_beats"}


def _one_flag(n: int = 160, d: int = 10, seed: int = 0, windows: int = 1) -> tuple[FeatureSet, np.ndarray, dict]:
    """Separable features of ``n`` records with one 0/1 label column ``(n, 1)`` and train / val / test rows."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 1)) < 0.4).astype(np.float32)
    x = y @ rng.normal(0, 3, (1, d)) + rng.normal(0, 1, (n, d))
    feats = np.repeat(x, windows, axis=0) + rng.normal(0, 0.3, (n * windows, d))
    fs = FeatureSet(features=feats.astype(np.float32), record=np.repeat(np.arange(n), windows), n_records=n)
    idx = rng.permutation(n)
    return fs, y, {"train": idx[: n // 2], "val": idx[n // 2: 3 * n // 4], "test": idx[3 * n // 4:]}


def _head_probs(head: nn.Linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(head(torch.from_numpy(x.astype(np.float32))).double()).numpy()


# ----------------------------------------------------------------------------------------------- the linear probe
def test_linear_probe_gives_one_column_for_one_flag():
    fs, y, _ = _one_flag()
    x = fs.features
    p = LinearProbe(True, C=0.5).fit(x, y).predict_proba(x)
    assert p.shape == (len(x), 1)
    # the probability of the flag being 1: the plain binary logistic regression on the standardised features
    xs = StandardScaler().fit_transform(x)
    ref = LogisticRegression(C=0.5, max_iter=1000).fit(xs, y[:, 0].astype(np.int64)).predict_proba(xs)[:, 1]
    np.testing.assert_allclose(p[:, 0], ref, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_linear_probe_one_flag_constant_on_training(value):
    # a label subset with only negatives (or only positives): the constant is predicted, as for a multi-column task;
    # OneVsRestClassifier binarised an all-ones column against its only class and predicted probability 0
    x = np.random.default_rng(1).normal(size=(20, 4))
    y = np.full((20, 1), value, dtype=np.float32)
    probe = LinearProbe(True).fit(x, y)
    np.testing.assert_array_equal(probe.predict_proba(x), np.full((20, 1), value))
    head = init_head_from_probe(nn.Linear(4, 1), probe)
    np.testing.assert_allclose(_head_probs(head, x), probe.predict_proba(x), atol=1e-6)


def test_head_from_one_flag_probe_equals_predict_proba():
    fs, y, _ = _one_flag(seed=2)
    x = fs.features * np.float32(7.0) + np.float32(30.0)   # an offset and scale for the folded scaler to undo
    probe = LinearProbe(True, C=0.5).fit(x[:120], y[:120])
    head = init_head_from_probe(nn.Linear(x.shape[1], 1), probe)
    np.testing.assert_allclose(_head_probs(head, x[120:]), probe.predict_proba(x[120:]), atol=2e-6, rtol=0)


def test_mlp_probe_gives_one_column_for_one_flag():
    fs, y, s = _one_flag(seed=3)
    x = fs.features
    mlp = MLPProbe(True, lr=1e-2, epochs=30, hidden_dim=16, eval_every=5, seed=0)
    mlp.fit(x[s["train"]], y[s["train"]], x[s["val"]], y[s["val"]])
    assert mlp.predict_proba(x).shape == (len(x), 1)


@pytest.mark.parametrize("mode,aggregate", [("linear", "mean_embedding"), ("linear", "mean_std"),
                                            ("linear", "mean_prediction"), ("mlp", "mean_embedding"),
                                            ("mlp", "mean_prediction")])
def test_probe_grid_on_one_flag_task(mode, aggregate):
    fs, y, splits = _one_flag(windows=3)
    data = ProbeData(features=fs, labels=y, splits=splits, multilabel=True, class_names=["flag"])
    res = run_probe_grid(data, fractions=[0.25, 1.0], seeds=[0], mode=mode, Cs=[0.1, 1.0], lrs=[1e-2],
                         aggregate=aggregate, n_boot=50,
                         mlp_kwargs={"epochs": 40, "hidden_dim": 16, "eval_every": 5})
    assert len(res) == 2
    for r in res:
        rows, p = r["predictions"]["test"]
        assert p.shape == (len(rows), 1)
        assert r["test"]["macro_auroc"]["value"] > 0.9, r["test"]["macro_auroc"]
        assert len(r["thresholds"]) == 1


# ---------------------------------------------------------------------------- probe.py / finetune.py end to end
@pytest.fixture(scope="module")
def flag_folder(tmp_path_factory) -> Path:
    """A folder of 54 synthetic WFDB records (100 Hz, 5 s) with ``labels.csv`` = ``record_id,patient_id,flag``."""
    root = tmp_path_factory.mktemp("onecol") / "folder"
    write_wfdb(root, 54, seed=0, fs=100.0, duration=5.0)
    with open(root / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["record_id", "patient_id", "flag"])
        w.writerows([r["record_id"], r["patient_id"], int(r["label"] in FLAGGED)] for r in rows)
    flags = [r["label"] in FLAGGED for r in rows]
    assert 10 < sum(flags) < len(flags) - 10
    return root


def _cfg(name: str, folder: Path, tmp: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "task=folder", f"task.root={folder}", "bootstrap.n=20", "plot=false", "torch_threads=1"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose(name, overrides=base + list(overrides))


@pytest.mark.parametrize("mode,aggregate", [("linear", "mean_embedding"), ("linear", "mean_std"),
                                            ("linear", "mean_prediction"), ("mlp", "mean_embedding")])
def test_probe_cell_on_one_class_folder_task(flag_folder, tmp_path, mode, aggregate):
    artifact = mode == "linear" and aggregate == "mean_embedding"   # the probe folded into a one-output head
    cfg = _cfg("probe", flag_folder, tmp_path, "checkpoint=random:resnet1d_test", f"probe.mode={mode}",
               f"probe.aggregate={aggregate}", "probe.Cs=[0.1,1.0]", "probe.lrs=[0.01]", "probe.mlp.epochs=20",
               f"save_classifier={str(artifact).lower()}")
    out = probe_main(cfg)
    assert len(out["cells_written"]) == 1
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    auc = cell["results"]["test"]["macro_auroc"]["value"]
    assert 0.0 <= auc <= 1.0
    if artifact:   # init_head_from_probe on the one-flag probe
        assert Path(cell["classifier"]).is_dir()


def test_lpft_cell_on_one_class_folder_task(flag_folder, tmp_path):
    cfg = _cfg("finetune", flag_folder, tmp_path, "checkpoint=random:resnet1d_test", "finetune.epochs=1",
               "finetune.warmup_epochs=0", "finetune.batch_size=32", "finetune.head_init=lp")
    out = finetune_main(cfg)
    assert len(out["cells_written"]) == 1
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["lp"] is not None and 0.0 <= cell["results"]["test"]["macro_auroc"]["value"] <= 1.0
