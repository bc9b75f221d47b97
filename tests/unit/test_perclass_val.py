"""scripts/perclass_val.py: per-record means of cached window features and per-class validation AUROC."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "perclass_val", Path(__file__).resolve().parents[2] / "scripts" / "perclass_val.py")
P = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(P)


def test_record_means_average_each_records_windows(tmp_path):
    x = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]], np.float32)
    np.savez(tmp_path / "f.npz", features=x, record=np.array([0, 0, 2]), n_records=np.array(3),
             skipped=np.array([1]))
    m = P.record_means(tmp_path / "f.npz")
    np.testing.assert_allclose(m[[0, 2]], [[2.0, 1.0], [5.0, 5.0]])
    assert np.isnan(m[1]).all()                   # a record skipped at extraction: NaN, never a zero row


def test_per_class_val_scores_each_class_on_validation_only():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 5))
    x[np.arange(120), y] += 4.0                    # class k lights up feature k: separable
    train, val = np.arange(0, 120, 2), np.arange(1, 120, 2)
    c, per = P.per_class_val(x, y, train, val, 3)
    assert c in P.CS and len(per) == 3 and min(per) > 0.95
    noise = rng.normal(size=(120, 5))             # no signal: near chance
    _, per = P.per_class_val(noise, y, train, val, 3)
    assert 0.2 < np.mean(per) < 0.8


def test_a_class_without_training_records_is_refused_not_scored_on_another_class_column():
    """predict_proba's columns are the classes seen in training: with class 1 absent from train, column 1 was
    class 2's probability and class 1 was scored on it."""
    import pytest

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 5))
    x[np.arange(120), y] += 4.0
    train = np.flatnonzero((np.arange(120) % 2 == 0) & (y != 1))
    val = np.arange(1, 120, 2)
    with pytest.raises(ValueError, match=r"classes \[1\] have no training record"):
        P.per_class_val(x, y, train, val, 3)


def test_a_cell_of_another_cache_is_refused(tmp_path, monkeypatch, capsys):
    """The script rebuilt the task from --task / --data-root and only compared task names: features of a cell
    computed on another corpus (a full download, another seed) were scored against this cache's labels by row."""
    import json
    from types import SimpleNamespace

    import pytest

    import ecgfm.evaluate.tasks as T

    (tmp_path / "features").mkdir()
    np.savez(tmp_path / "features" / "k.npz", features=np.zeros((3, 2), np.float32), record=np.arange(3),
             n_records=np.array(3), skipped=np.zeros(0, np.int64))
    cell = {"task": "synthetic", "preprocess": {"fs": 100.0}, "feature_key": "k", "cache_dir": "/data/other-cache"}
    (tmp_path / "c.json").write_text(json.dumps(cell))
    fake = SimpleNamespace(cache_dir=str(tmp_path / "this-cache"), cache=[0, 1, 2], multilabel=False)
    monkeypatch.setattr(T, "load_task_spec", lambda *a, **k: None)
    monkeypatch.setattr(T, "build_task", lambda *a, **k: fake)
    with pytest.raises(SystemExit):
        P.main(["--task", "synthetic", "--cell", f"a={tmp_path / 'c.json'}", "--cache-root", str(tmp_path)])
    assert "its features come from /data/other-cache" in capsys.readouterr().err
