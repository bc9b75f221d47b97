"""Label-fraction sampling: stratified, patient-level, nested, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm.evaluate.fractions import fraction_subset, fraction_subsets


def _data(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=[0.6, 0.25, 0.1, 0.05])
    patients = rng.integers(0, n // 3, size=n)  # ~3 records per patient
    return y, patients


def test_nested_across_fractions_and_identical_across_calls():
    y, pat = _data()
    train = np.arange(800)
    subs = fraction_subsets(train, y, pat, [0.01, 0.1, 0.5, 1.0], seed=3)
    assert set(subs[0.01]) <= set(subs[0.1]) <= set(subs[0.5]) <= set(subs[1.0])
    assert set(subs[1.0]) == set(train)
    # computed alone, each fraction gives the very same subset (identical for every method)
    for f, idx in subs.items():
        np.testing.assert_array_equal(fraction_subset(train, y, pat, f, seed=3), idx)
    other = fraction_subset(train, y, pat, 0.1, seed=4)
    assert set(other) != set(subs[0.1])


def test_size_and_patient_level():
    y, pat = _data()
    train = np.arange(1000)
    sub = fraction_subset(train, y, pat, 0.1, seed=0)
    assert 100 <= len(sub) <= 130  # at least 10 %, a patient's records come together
    chosen_patients = set(pat[sub])
    outside = np.setdiff1d(train, sub)
    assert not chosen_patients & set(pat[outside])


def test_stratified_class_proportions():
    y, pat = _data(n=3000)
    train = np.arange(3000)
    overall = np.bincount(y, minlength=4) / len(y)
    for seed in range(3):
        sub = fraction_subset(train, y, pat, 0.1, seed=seed)
        frac = np.bincount(y[sub], minlength=4) / len(sub)
        assert np.abs(frac - overall).max() < 0.05, (frac, overall)


def test_every_class_present_at_tiny_fraction_and_multilabel():
    rng = np.random.default_rng(1)
    y = (rng.random((500, 5)) < np.array([0.5, 0.2, 0.1, 0.03, 0.01])).astype(float)
    y[3, 4] = 1  # make sure the rarest class exists
    subs = fraction_subsets(np.arange(500), y, None, [0.01, 0.1], seed=0)
    for idx in subs.values():
        assert (y[idx].sum(axis=0) > 0).all()
    assert set(subs[0.01]) <= set(subs[0.1])


def test_nested_with_min_per_class_two():
    y, pat = _data(n=600, seed=5)
    subs = fraction_subsets(np.arange(600), y, pat, [0.01, 0.02, 0.05, 0.2], seed=1, min_per_class=2)
    fr = sorted(subs)
    for a, b in zip(fr, fr[1:]):
        assert set(subs[a]) <= set(subs[b])


def test_bad_fraction():
    y, pat = _data(n=50)
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(np.arange(50), y, pat, 0.0, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(np.arange(50), y, pat, 1.5, seed=0)
