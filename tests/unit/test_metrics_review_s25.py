"""Macro F1's bootstrap leaves out, per resample, the classes that resample holds no positive of, as the point
estimate and macro AUROC do (review s25: they were scored F1 = 0, which pulled the CI of tasks with rare classes
below the point estimate)."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm.evaluate import metrics as M


def test_a_class_without_positives_in_a_resample_has_no_f1():
    yo = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=float)
    pred = np.array([[1, 0], [0, 1], [0, 0], [0, 1]], dtype=float)
    full = np.ones((1, 4))
    lost = np.array([[2.0, 0.0, 1.0, 1.0]])        # the resample drew no copy of class 1's positive
    f1_0 = 2 * 1 / (2 * 1 + 0 + 1)                   # class 0: tp 1, fn 1 (record 2)
    f1_1 = 2 * 1 / (2 * 1 + 1 + 0)                   # class 1: tp 1, fp 1 (record 3)
    assert M._weighted_f1(yo, pred, full)[0] == pytest.approx((f1_0 + f1_1) / 2)
    # class 0 in the resample: tp 2 (record 0 twice), fn 1; class 1 has no positive: left out, not 0
    assert M._weighted_f1(yo, pred, lost)[0] == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert np.isnan(M._weighted_f1(yo, pred, np.array([[0.0, 0.0, 0.0, 4.0]]))[0])   # no positive at all


def test_rare_classes_leave_the_point_estimate_inside_its_ci():
    """A ptbxl_all-like test set (66 records; 13 common classes, 10 with one positive, 6 with two): ~80 % of the
    resamples lose a rare class's positives; scored 0 there, the CI sat below the point (0.367 in [0.181, 0.407])."""
    rng = np.random.default_rng(1)
    n, counts = 66, [15] * 13 + [1] * 10 + [2] * 6
    y = np.zeros((n, len(counts)), int)
    s = rng.normal(size=y.shape)
    for c, k in enumerate(counts):
        pos = rng.choice(n, k, replace=False)
        y[pos, c] = 1
        s[pos, c] += 0.8 if k > 2 else 2.5
    p = 1 / (1 + np.exp(-s))
    out = M.evaluate_scores(y, p, True, thresholds=np.full(y.shape[1], 0.9), n_boot=400, seed=0)
    f1 = out["macro_f1"]
    assert f1["ci_low"] < f1["value"] < f1["ci_high"]
    assert f1["value"] - f1["ci_low"] < 0.16       # old: 0.186 below the point, new: ~0.13


def test_the_report_flags_a_cell_whose_ci_is_mostly_over_fewer_classes():
    from ecgfm.evaluate.report import excluded_classes_markdown

    def cell(deg):
        return {"method": "mae", "mode": "linear", "task": "ptbxl_all", "fraction": 1.0, "seed": 0,
                "results": {"test": {"excluded_classes": [], "n_degenerate": deg, "n_boot": 1000}}}

    md = excluded_classes_markdown([cell(814), cell(30)])
    rows = [line for line in md.splitlines() if line.startswith("| mae")]
    assert "814 of 1000 **(over 10 %" in rows[0]
    assert rows[1].endswith("30 of 1000 |")
