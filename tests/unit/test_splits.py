"""Splits: published folds, patient-disjoint stratified splits, leak detection."""

import numpy as np
import pytest

from ecgfm.data.splits import assert_disjoint_patients, fold_split, patient_groups, patient_stratified_split


def test_fold_split_ptbxl_protocol():
    folds = [1, 2, 9, 10, 8, None, 10, float("nan"), 3]
    s = fold_split(folds)
    assert s["train"].tolist() == [0, 1, 4, 8] and s["val"].tolist() == [2] and s["test"].tolist() == [3, 6]
    assert all(v.dtype == np.int64 for v in s.values())
    with pytest.raises(ValueError, match="both train and val"):
        fold_split(folds, train=range(1, 10), val=(9,))


def test_patient_groups_unknown_are_singletons():
    g = patient_groups(["a", None, "a", float("nan"), "", -1, "b"])
    assert g[0] == g[2] and len(set(g.tolist())) == 6


def _multilabel_corpus(n_patients=300, seed=0):
    rng = np.random.default_rng(seed)
    pids, rows = [], []
    priors = np.array([0.5, 0.2, 0.05, 0.02])
    for p in range(n_patients):
        k = rng.integers(1, 5)                                # 1-4 records per patient
        base = rng.random(4) < priors
        for _ in range(k):
            pids.append(f"p{p}")
            rows.append(base | (rng.random(4) < 0.01))
    for _ in range(40):                                       # unknown patients
        pids.append(None)
        rows.append(rng.random(4) < priors)
    return pids, np.array(rows, dtype=np.float32)


def test_patient_stratified_split_is_disjoint_complete_and_stratified():
    pids, y = _multilabel_corpus()
    s = patient_stratified_split(pids, y, fractions=(0.8, 0.1, 0.1), seed=0)
    allidx = np.concatenate(list(s.values()))
    assert sorted(allidx.tolist()) == list(range(len(pids)))                   # every record exactly once
    assert_disjoint_patients(s, pids)
    n = len(pids)
    for name, f in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        assert abs(len(s[name]) / n - f) < 0.03, (name, len(s[name]) / n)
        # every label, even the rarest, is represented in proportion (within a few records)
        got = y[s[name]].sum(0)
        want = f * y.sum(0)
        assert np.all(np.abs(got - want) <= np.maximum(3, 0.15 * want)), (name, got, want)
    # a pure function of (inputs, seed)
    s2 = patient_stratified_split(pids, y, seed=0)
    assert all(np.array_equal(s[k], s2[k]) for k in s)
    s3 = patient_stratified_split(pids, y, seed=1)
    assert not all(np.array_equal(s[k], s3[k]) for k in s)


def test_patient_stratified_split_single_label_and_no_labels():
    pids = [f"p{i // 2}" for i in range(200)]
    labels = ["N" if i % 10 else "AF" for i in range(0, 200, 2) for _ in range(2)]
    s = patient_stratified_split(pids, labels, fractions=(0.5, 0.5), seed=3)
    assert set(s) == {"train", "test"}
    assert_disjoint_patients(s, pids)
    lab = np.array(labels)
    assert (lab[s["train"]] == "AF").sum() == (lab[s["test"]] == "AF").sum() == 20   # 20 AF patients x 2
    s0 = patient_stratified_split(pids, None, fractions={"train": 0.9, "val": 0.0, "test": 0.1})
    assert len(s0["val"]) == 0 and len(s0["test"]) == 20


def test_assert_disjoint_patients_detects_leaks():
    pids = ["a", "a", "b", None, None]
    assert_disjoint_patients({"train": [0, 1, 3], "test": [2, 4]}, pids)
    with pytest.raises(ValueError, match="patient 'a' is in both 'train' and 'test'"):
        assert_disjoint_patients({"train": [0], "test": [1]}, pids)
    with pytest.raises(ValueError, match="record 3 is in both"):
        assert_disjoint_patients({"train": [3], "test": [3]}, pids)
    with pytest.raises(ValueError, match="out of range"):
        assert_disjoint_patients({"train": [7]}, pids)


def test_bad_fractions():
    with pytest.raises(ValueError, match="2 or 3 entries"):
        patient_stratified_split(["a"], None, fractions=(1.0,))
    with pytest.raises(ValueError, match="rows"):
        patient_stratified_split(["a", "b"], np.zeros((3, 2)))
