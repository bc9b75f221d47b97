"""Metrics against hand-computed cases and scikit-learn; bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from ecgfm.evaluate import metrics as M


def test_auroc_hand_computed():
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    y = np.array([[1], [1], [0], [0]])
    s = np.array([[0.8], [0.4], [0.6], [0.2]])
    assert M.per_class_auroc(y, s)[0] == pytest.approx(0.75)
    # a tie counts one half: pos 0.5 vs neg 0.5 -> 0.5
    assert M.per_class_auroc(np.array([[1], [0]]), np.array([[0.5], [0.5]]))[0] == pytest.approx(0.5)


def test_macro_auroc_excludes_undefined_class():
    y = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]])  # class 1 never positive
    s = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.7, 0.2, 0.6], [0.1, 0.9, 0.7]])
    per = M.per_class_auroc(y, s)
    assert np.isnan(per[1])
    assert per[0] == pytest.approx(1.0)
    assert per[2] == pytest.approx(0.75)  # pos 0.8, 0.6 vs neg 0.2, 0.7 -> (1+1+1+0)/4
    assert M.macro_auroc(y, s) == pytest.approx((1.0 + 0.75) / 2)
    res = M.evaluate_scores(y, s, multilabel=True, class_names=["a", "b", "c"], n_boot=50)
    assert res["excluded_classes"] == ["b"]


def test_multiclass_auroc_matches_sklearn_ovr():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    assert M.macro_auroc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_f1_accuracy_fmax_hand_computed():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    s = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.1]])
    # thresholds 0.5: preds [[1,0],[1,0],[0,1],[0,0]] -> class0 F1 1, class1 TP1 FN1 -> 2/3
    assert M.macro_f1(y, s, multilabel=True, thresholds=np.array([0.5, 0.5])) == pytest.approx((1 + 2 / 3) / 2)
    # thresholds 0.35 for class 1 -> class1 perfect
    assert M.macro_f1(y, s, multilabel=True, thresholds=np.array([0.5, 0.35])) == pytest.approx(1.0)
    # Fmax: at t in (0.2, 0.4] every prediction is correct -> 1
    assert M.fmax(y, s) == pytest.approx(1.0)
    yc = np.array([0, 1, 2, 1])
    pc = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3], [0.2, 0.5, 0.3]])
    assert M.accuracy(yc, pc) == pytest.approx(0.75)


def test_fmax_partial_hand_computed():
    # one record, labels {0}; scores 0.6, 0.4. t<=0.4: P=1/2, R=1 -> F=2/3; 0.4<t<=0.6: P=1, R=1 -> 1
    assert M.fmax(np.array([[1, 0]]), np.array([[0.6, 0.4]])) == pytest.approx(1.0)
    # labels {0,1}; scores 0.6, 0.1 -> at t=0.6: P=1, R=1/2 -> 2/3; at t<=0.1: P=1, R=1 -> 1
    assert M.fmax(np.array([[1, 1]]), np.array([[0.6, 0.1]])) == pytest.approx(1.0)
    # labels {1}; scores 0.9 (wrong), 0.5: t<=0.5: P=1/2, R=1 -> 2/3; t in (0.5,0.9]: P=0 -> 0
    assert M.fmax(np.array([[0, 1]]), np.array([[0.9, 0.5]])) == pytest.approx(2 / 3)


def test_thresholds_maximise_validation_f1():
    y = np.array([[1], [1], [0], [0], [0]])
    p = np.array([[0.3], [0.35], [0.2], [0.1], [0.05]])
    th = M.choose_thresholds(y, p)
    assert th[0] == pytest.approx(0.3)
    assert M.macro_f1(y, p, True, th) == pytest.approx(1.0)


def test_weighted_formulas_match_sklearn_with_weights():
    rng = np.random.default_rng(1)
    n = 40
    y = rng.integers(0, 2, (n, 3)).astype(float)
    s = np.round(rng.random((n, 3)), 1)  # rounding makes ties
    w = M.bootstrap_weights(n, 5, rng)
    pred = (s >= 0.5).astype(float)
    for b in range(5):
        for c in range(3):
            ref = roc_auc_score(y[:, c], s[:, c], sample_weight=w[b])
            assert M._weighted_auroc(y[:, c], s[:, c], w[b:b + 1])[0] == pytest.approx(ref)
        ref_f1 = f1_score(y, pred, average="macro", sample_weight=w[b], zero_division=0)
        assert M._weighted_f1(y, pred, w[b:b + 1])[0] == pytest.approx(ref_f1)
    yc = rng.integers(0, 3, n)
    pc = rng.dirichlet(np.ones(3), n)
    yo = np.eye(3)[yc]
    predc = np.eye(3)[pc.argmax(1)]
    ref = accuracy_score(yc, pc.argmax(1), sample_weight=w[0])
    assert M._weighted_accuracy(yo, predc, w[:1])[0] == pytest.approx(ref)
    # Fmax with integer weights equals Fmax on the explicitly repeated records
    rep = np.repeat(np.arange(n), w[0].astype(int))
    assert M._weighted_fmax(y, s, w[:1])[0] == pytest.approx(M.fmax(y[rep], s[rep]))


def _noisy_problem(n, rng):
    y = rng.integers(0, 2, (n, 2))
    s = np.clip(y * 0.3 + rng.random((n, 2)) * 0.7, 0, 1)
    return y, s


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (60, 2000):
        y, s = _noisy_problem(n, rng)
        res = M.evaluate_scores(y, s, multilabel=True, n_boot=300, seed=0)
        for key in ("macro_auroc", "macro_f1", "fmax"):
            r = res[key]
            assert r["ci_low"] <= r["value"] <= r["ci_high"], (key, r)
        widths.append(res["macro_auroc"]["ci_high"] - res["macro_auroc"]["ci_low"])
    assert widths[1] < widths[0] / 2
    assert 0 < widths[1]


def test_bootstrap_redraws_degenerate_resamples():
    # one positive among 30: most resamples lose it; redraws keep the class defined
    y = np.zeros((30, 1))
    y[0] = 1
    s = np.linspace(0, 1, 30)[:, None]
    res = M.evaluate_scores(y, s, multilabel=True, n_boot=200, seed=0)
    assert res["macro_auroc"]["value"] == pytest.approx(M.per_class_auroc(y, s)[0])
    assert res["n_degenerate"] < 200
    assert np.isfinite(res["macro_auroc"]["ci_low"])


def test_single_label_report_has_accuracy_and_names():
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.eye(3)[y] * 0.8 + 0.2 / 3
    res = M.evaluate_scores(y, p, multilabel=False, class_names=["N", "A", "O"], n_boot=100)
    assert res["accuracy"]["value"] == pytest.approx(1.0)
    assert res["macro_auroc"]["value"] == pytest.approx(1.0)
    assert set(res["per_class_auroc"]) == {"N", "A", "O"}


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="class index"):
        M.per_class_auroc(np.array([0, 3]), np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.per_class_auroc(np.array([[0], [1]]), np.array([[np.nan], [1.0]]))


def test_paired_bootstrap_delta():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (300, 2))
    good = y + rng.normal(0, 0.6, (300, 2))
    bad = y + rng.normal(0, 2.0, (300, 2))
    d = M.paired_bootstrap_delta(y, good, bad, n_boot=300)
    assert d["delta"] == pytest.approx(M.macro_auroc(y, good) - M.macro_auroc(y, bad))
    assert 0 < d["ci_low"] <= d["delta"] <= d["ci_high"] and d["p_not_positive"] == 0.0
    same = M.paired_bootstrap_delta(y, good, good, n_boot=50)
    assert same["delta"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0


def _golden_problem():
    rng = np.random.default_rng(7)
    n, c = 40, 4
    y = (rng.random((n, c)) < 0.3).astype(float)
    y[:, 0] = 0                          # undefined class
    y[:2, 1], y[2:, 1] = 1, 0            # two positives: resamples without them are redrawn
    return y, rng.random((n, c)) + 0.5 * y, rng.random((n, c))


def test_bootstrap_numbers_are_unchanged():
    # values of the implementation before the shared resampling routine (_resampled_aurocs): same draws, same CIs
    y, s, s2 = _golden_problem()
    r = M.evaluate_scores(y, s, True, n_boot=200, seed=1)
    for key, (v, lo, hi) in {"macro_auroc": (0.9429059829059829, 0.8996575981489774, 0.9781757115088595),
                             # macro F1 averages the 3 classes with a positive record since issue 12 (class 0 has
                             # none): exactly 4/3 of the old 4-class numbers, same draws
                             "macro_f1": tuple(x * 4 / 3 for x in (0.3530020703933747, 0.2834618048282363,
                                                                    0.4286385769422154)),
                             "fmax": (0.7647058823529412, 0.6229508196721312, 0.898550724637681)}.items():
        assert (r[key]["value"], r[key]["ci_low"], r[key]["ci_high"]) == pytest.approx((v, lo, hi), rel=1e-12)
    d = M.paired_bootstrap_delta(y, s, s2, n_boot=200, seed=2)
    assert (d["delta"], d["ci_low"], d["ci_high"]) == pytest.approx(
        (0.615036237316939, 0.4882084578722753, 0.753122768568171), rel=1e-12)


@pytest.mark.parametrize("max_redraws", [0, 50])
def test_macro_auroc_ci_is_the_evaluate_scores_bootstrap(max_redraws):
    y, s, _ = _golden_problem()
    full = M.evaluate_scores(y, s, True, n_boot=150, seed=4, max_redraws=max_redraws)
    only = M.macro_auroc_ci(y, s, n_boot=150, seed=4, max_redraws=max_redraws)
    assert {k: only[k] for k in ("value", "ci_low", "ci_high")} == full["macro_auroc"]
    assert only["n_degenerate"] == full["n_degenerate"] and only["n"] == 40
    assert (max_redraws == 0) == (only["n_degenerate"] > 0)
    none = M.macro_auroc_ci(np.zeros((5, 2)), np.ones((5, 2)))
    assert np.isnan(none["value"]) and np.isnan(none["ci_low"])


def test_bootstrap_mean():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(1.0, 1.0, 200), np.nan]
    r = M.bootstrap_mean(v, n_boot=500, seed=3)
    assert r["n"] == 200 and r["value"] == pytest.approx(np.nanmean(v))
    assert r["ci_low"] < r["value"] < r["ci_high"] and r["ci_high"] - r["ci_low"] < 4 * 1.96 / np.sqrt(200)
    # each resample's mean, written out record by record
    w = M.bootstrap_weights(200, 500, np.random.default_rng(3))
    ref = [np.repeat(v[:200], row.astype(int)).mean() for row in w]
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])))
    assert M.bootstrap_mean([2.0]) == {"value": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 1}
    assert M.bootstrap_mean([np.nan])["n"] == 0


def test_macro_f1_leaves_out_classes_without_a_positive_record():
    """A class with no positive in the evaluated set has no F1: it is listed, not averaged in as 0."""
    from ecgfm.evaluate.metrics import evaluate_scores

    rng = np.random.default_rng(0)
    y = np.zeros((40, 3), dtype=int)
    y[:20, 0] = 1
    y[20:, 1] = 1                                     # class 2: no positive record
    scores = np.clip(y + rng.normal(0, 0.2, y.shape), 0, 1)
    out = evaluate_scores(y, scores, multilabel=True, class_names=["a", "b", "c"], n_boot=50)
    from sklearn.metrics import f1_score
    want = f1_score(y[:, :2], (scores[:, :2] >= 0.5).astype(int), average="macro", zero_division=0)
    assert out["macro_f1"]["value"] == pytest.approx(want)
    assert out["f1_excluded_classes"] == ["c"] and out["excluded_classes"] == ["c"]
    assert out["macro_f1"]["ci_low"] <= want <= out["macro_f1"]["ci_high"]


@pytest.mark.parametrize("case", ["one_class_task", "second_class_without_positive", "single_label_one_class"])
def test_macro_f1_of_a_single_scored_class_is_that_class_f1(case):
    """scikit-learn's macro F1 of one kept column takes it as a binary problem and averages the F1 of the
    positives with the F1 of the negatives (0.626 for a class whose own F1 is 0.542): the reported value and its
    bootstrap CI (the class's own F1) then disagreed."""
    from ecgfm.evaluate.metrics import evaluate_scores, macro_f1

    rng = np.random.default_rng(0)
    n = 200
    y = (rng.random((n, 1)) < 0.3).astype(int)
    s = np.clip(0.3 * y + rng.random((n, 1)) * 0.8, 0, 1)
    if case == "one_class_task":
        yy, ss, ml, th, col = y, s, True, np.array([0.5]), 0
    elif case == "second_class_without_positive":
        yy, ss, ml, th, col = np.c_[y, np.zeros((n, 1), int)], np.c_[s, rng.random((n, 1))], True, \
            np.array([0.5, 0.5]), 0
    else:
        yy, ss, ml, th, col = np.zeros(n, int), rng.random((n, 3)), False, None, 0
    yo = yy if yy.ndim == 2 else np.eye(3, dtype=int)[yy]
    pred = (ss >= th).astype(int) if ml else np.eye(3, dtype=int)[ss.argmax(axis=1)]
    want = f1_score(yo[:, col], pred[:, col], zero_division=0)       # the one scored class's own F1
    assert macro_f1(yy, ss, ml, th) == pytest.approx(want)
    out = evaluate_scores(yy, ss, ml, thresholds=th, n_boot=300, seed=0)
    assert out["macro_f1"]["value"] == pytest.approx(want)
    assert out["macro_f1"]["ci_low"] < want < out["macro_f1"]["ci_high"]
