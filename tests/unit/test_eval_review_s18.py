"""Review s18 of how frozen-encoder numbers are produced: records without windows read as all-zero embeddings,
splits that overlap or repeat records were probed, and a NaN label dropped its class from the macro AUROC."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm.evaluate.features import FeatureSet, _load_features, _save_features
from ecgfm.evaluate.metrics import macro_auroc, paired_bootstrap_delta
from ecgfm.evaluate.probe import ProbeData, run_probe_grid


def _noise(n: int = 60, d: int = 6, seed: int = 0) -> tuple[FeatureSet, np.ndarray]:
    rng = np.random.default_rng(seed)
    fs = FeatureSet(features=rng.standard_normal((n, d)).astype(np.float32), record=np.arange(n), n_records=n)
    y = np.eye(2, dtype=np.float32)[np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)][rng.permutation(n)]]
    return fs, y


def test_records_without_windows_are_nan_rows_not_zeros():
    """Records not extracted (extract_features(rows=...)) have no windows: they were all-zero embeddings."""
    fs = FeatureSet(features=np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), record=np.array([0, 2]), n_records=4)
    means, stats = fs.record_means(), fs.record_stats()
    np.testing.assert_allclose(means[[0, 2]], [[1, 2], [3, 4]])
    assert np.isnan(means[[1, 3]]).all() and np.isnan(stats[[1, 3]]).all()
    assert np.isfinite(stats[[0, 2]]).all()


def test_a_feature_file_missing_some_records_windows_is_refused(tmp_path):
    fs = FeatureSet(features=np.ones((3, 2), np.float32), record=np.array([0, 1, 3]), n_records=4)
    _save_features(tmp_path / "f.npz", fs, 10, 10)
    with pytest.raises(ValueError, match=r"1 record\(s\) have no windows .*\[2\]"):
        _load_features(tmp_path / "f.npz", "k", 4, 10, 10)
    ok = FeatureSet(features=np.ones((3, 2), np.float32), record=np.array([0, 1, 3]), n_records=4,
                    skipped=np.array([2]))
    _save_features(tmp_path / "g.npz", ok, 10, 10)
    assert _load_features(tmp_path / "g.npz", "k", 4, 10, 10).skipped.tolist() == [2]   # skipped: no windows


@pytest.mark.parametrize("splits, match", [
    ({"train": np.arange(30), "val": np.arange(30, 45), "test": np.arange(0, 15)}, "record 0 is in both"),
    ({"train": np.arange(30), "val": np.arange(30, 45), "test": np.r_[np.arange(45, 60), 45]},
     r"split 'test' lists record\(s\) \[45\] more than once"),
])
def test_probe_refuses_overlapping_or_repeated_split_rows(splits, match):
    fs, y = _noise()
    with pytest.raises(ValueError, match=match):
        run_probe_grid(ProbeData(fs, y, splits, False, ["a", "b"]), [1.0], [0], Cs=[1.0], n_boot=0)


def test_probe_refuses_a_patient_in_two_splits():
    fs, y = _noise()
    pids = [f"p{i}" for i in range(60)]
    pids[50] = "p3"                                      # a test record of a training patient
    splits = {"train": np.arange(30), "val": np.arange(30, 45), "test": np.arange(45, 60)}
    with pytest.raises(ValueError, match="patient 'p3' is in both"):
        run_probe_grid(ProbeData(fs, y, splits, False, ["a", "b"], patient_ids=pids), [1.0], [0], Cs=[1.0], n_boot=0)


def test_probe_refuses_split_records_without_windows():
    fs, y = _noise()
    sub = FeatureSet(features=fs.features[:50], record=fs.record[:50], n_records=60)   # rows 50-59 not extracted
    splits = {"train": np.arange(30), "val": np.arange(30, 45), "test": np.arange(45, 60)}
    with pytest.raises(ValueError, match=r"split 'test': record\(s\) \[50, 51.*have no windows"):
        run_probe_grid(ProbeData(sub, y, splits, False, ["a", "b"]), [1.0], [0], Cs=[1.0], n_boot=0)
    out = run_probe_grid(ProbeData(fs, y, splits, False, ["a", "b"]), [1.0], [0], Cs=[1.0], n_boot=0)
    assert out[0]["n_test"] == 15


def test_non_finite_or_fractional_targets_are_refused():
    rng = np.random.default_rng(1)
    y = (rng.random((40, 3)) < 0.5).astype(np.float64)
    s = rng.random((40, 3))
    assert np.isfinite(macro_auroc(y, s))
    bad = y.copy()
    bad[0, 2] = np.nan                                   # made class 2's positive count NaN: "undefined", dropped
    with pytest.raises(ValueError, match="not 0 / 1 indicators"):
        macro_auroc(bad, s)
    with pytest.raises(ValueError, match="not 0 / 1 indicators"):
        paired_bootstrap_delta(bad, s, s[::-1].copy(), n_boot=10)
    with pytest.raises(ValueError, match="not class indices"):
        macro_auroc(np.r_[np.zeros(20), np.ones(19), 1.5], s)
    assert np.isfinite(macro_auroc(np.r_[np.zeros(20), np.ones(10), np.full(10, 2.0)], s))   # whole floats: indices
