"""Label-fraction sampling: stratified, patient-level, nested, deterministic."""

from __future__ import annotations

import logging

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


def test_the_subset_depends_on_the_training_records_not_their_order():
    """The same training records in another order draw the same subsets (the patients' first-seen order, and so
    the seed's shuffle, followed the order of the indices)."""
    y, pat = _data()
    train = np.arange(800)
    subs = fraction_subsets(train, y, pat, [0.1, 0.5], seed=3)
    shuffled = np.random.default_rng(7).permutation(train)
    again = fraction_subsets(shuffled, y, pat, [0.1, 0.5], seed=3)
    for f in (0.1, 0.5):
        np.testing.assert_array_equal(again[f], subs[f])


def test_size_and_patient_level():
    y, pat = _data()
    train = np.arange(1000)
    sub = fraction_subset(train, y, pat, 0.1, seed=0)
    assert 100 <= len(sub) <= 130  # at least 10 %, a patient's records come together
    chosen_patients = set(pat[sub])
    outside = np.setdiff1d(train, sub)
    assert not chosen_patients & set(pat[outside])


def test_stratified_class_proportions():
    """Every prefix holds each class in its overall proportion to within 2 records.

    One record per patient, so patient grouping adds no noise: the interleaved strata put each class within a record
    or so of its share (measured: at most 0.9), while a plain shuffle of the patients (no strata) misses by 2.5 to 19
    records on these 30 (seed, fraction) draws, so the test fails without stratification.
    """
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.choice(4, size=n, p=[0.6, 0.25, 0.1, 0.05])
    train = np.arange(n)
    counts = np.bincount(y, minlength=4)
    for seed in range(10):
        for f in (0.05, 0.1, 0.3):
            sub = fraction_subset(train, y, None, f, seed=seed)
            assert len(sub) == int(np.ceil(f * n))   # one record per patient: the prefix is exactly the target
            expected = counts * len(sub) / n
            got = np.bincount(y[sub], minlength=4)
            assert np.abs(got - expected).max() <= 2.0, (seed, f, got, expected)


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


def test_class_without_training_patient_is_warned(caplog):
    """min_per_class cannot top up a class no training patient holds: a warning names its index."""
    y, pat = _data(n=400, seed=2)
    train = np.flatnonzero(y != 2)          # class 2 exists (in other splits) but not in training
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.fractions"):
        sub = fraction_subset(train, y, pat, 0.1, seed=0)
    assert not (y[sub] == 2).any()
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1 and "class(es) [2]" in msgs[0] and "min_per_class=1" in msgs[0], msgs
    # multi-label: an all-zero column of the training rows
    ym = np.zeros((50, 3), dtype=np.float32)
    ym[:, 0] = 1
    ym[::2, 2] = 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.fractions"):
        fraction_subsets(np.arange(50), ym, None, [0.1, 0.5], seed=0)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1 and "class(es) [1]" in msgs[0], msgs


def test_no_warning_when_every_class_is_in_training_or_top_up_is_off(caplog):
    y, pat = _data(n=400, seed=2)
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.fractions"):
        fraction_subset(np.arange(400), y, pat, 0.1, seed=0)
        fraction_subset(np.flatnonzero(y != 2), y, pat, 0.1, seed=0, min_per_class=0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_fraction():
    y, pat = _data(n=50)
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(np.arange(50), y, pat, 0.0, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(np.arange(50), y, pat, 1.5, seed=0)


@pytest.mark.parametrize("unknown", ["-1", -1, "nan", "None", None])
def test_unknown_patient_markers_are_one_patient_per_record(unknown):
    """The splits take "-1" / -1 / "nan" / "None" as an unknown patient (each record its own); the fractions merged
    every such record into one "patient", so a 10 % subset of 80 unknown-patient records took 63-70 of them."""
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    pids = [unknown] * 80 + [f"p{i}" for i in range(20)]
    train = np.arange(100)
    for seed in range(4):
        sub = fraction_subset(train, y, pids, 0.1, seed=seed)
        assert 10 <= len(sub) <= 12, (seed, len(sub))
