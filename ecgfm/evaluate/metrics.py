"""Classification metrics with bootstrap confidence intervals over test records.

Point estimates come from scikit-learn (``roc_auc_score``, ``accuracy_score``,
``precision_recall_curve``; F1 per class from its counts, as the bootstrap computes it). Two pieces are written
here because no library provides them:

* **Fmax** (the sample-centric maximum F-measure of CAFA, used by Strodthoff et al. 2020 for PTB-XL);
* **vectorised bootstrap**: a percentile bootstrap needs the metrics on ~1000 resamples; calling
  ``roc_auc_score`` 1000 times per class costs seconds per results cell, which dominates a sweep of hundreds of
  cells on a CPU. A resample is represented by its multiplicity weights ``W (B, n)`` (multinomial counts), and
  AUROC (Mann-Whitney with mid-rank ties), F1, accuracy and Fmax are computed for all resamples at once with
  matrix products. Tests check every weighted formula against scikit-learn called with ``sample_weight``.

This is ecgfm's one place for AUROC and bootstrap CIs: :func:`evaluate_scores` (all metrics),
:func:`macro_auroc_ci` (macro AUROC only), :func:`paired_bootstrap_delta` (two models on the same resamples) and
:func:`bootstrap_mean` (per-record values) share :func:`bootstrap_weights`, and the AUROC ones share one resampling
routine with its redraw policy. torchmetrics is not used: every metric here is computed once, on record-level
predictions aggregated over windows (no per-step metric state to accumulate), with a bootstrap torchmetrics
does not provide.

Degenerate resamples (explicit policy): a class that has only one label value on the whole test set has no
AUROC; it is excluded from the macro averages and listed in ``excluded_classes``. A resample in which a class
that *is* defined on the test set loses all its positives or all its negatives is redrawn, as in the PTB-XL
benchmark code (up to ``max_redraws`` rounds); resamples still degenerate after that (only possible for classes
with one or two positives) average over the classes defined in that resample, and their number is reported as
``n_degenerate``.

Shapes: ``n`` test records, ``C`` classes. Multi-label targets are ``(n, C)`` in {0, 1} with scores ``(n, C)``
(sigmoid probabilities); single-label targets are ``(n,)`` integer classes with scores ``(n, C)`` (softmax).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_curve, roc_auc_score

FMAX_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def _as_onehot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n,)`` int -> ``(n, C)`` float one-hot; ``(n, C)`` passes through as float."""
    y = np.asarray(y)
    if y.ndim == 1:
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"class index out of range [0, {n_classes}): min {y.min()}, max {y.max()}")
        out = np.zeros((y.shape[0], n_classes), dtype=np.float64)
        out[np.arange(y.shape[0]), y.astype(np.int64)] = 1.0
        return out
    if y.ndim != 2 or y.shape[1] != n_classes:
        raise ValueError(f"targets must be (n,) class indices or (n, {n_classes}) indicators, got {y.shape}")
    return y.astype(np.float64)


def _check(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n, C), got {scores.shape}")
    y = np.asarray(y)
    if y.shape[0] != scores.shape[0]:
        raise ValueError(f"{y.shape[0]} targets but {scores.shape[0]} score rows")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    # a NaN label made its class's positive count NaN, so the class was left out of the macro AUROC as "undefined"
    if y.dtype.kind not in "biu":
        values = y.astype(np.float64)
        bad = ~np.isfinite(values) | ((values != 0) & (values != 1) if y.ndim == 2 else values != np.round(values))
        if bad.any():
            raise ValueError(f"targets hold {int(bad.sum())} value(s) that are not "
                             + ("0 / 1 indicators" if y.ndim == 2 else "class indices") + " (NaN, inf or "
                             f"fractional), e.g. {values[bad][:3].tolist()}")
    return y, scores


def defined_classes(y_onehot: np.ndarray) -> np.ndarray:
    """``(C,)`` bool: classes with at least one positive and one negative (AUROC is defined)."""
    pos = y_onehot.sum(axis=0)
    return (pos > 0) & (pos < y_onehot.shape[0])


def per_class_auroc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of each class (scikit-learn); NaN for a class without both label values.

    Args:
        y: ``(n,)`` class indices or ``(n, C)`` binary indicators.
        scores: ``(n, C)`` scores.

    Returns:
        ``(C,)`` float array.
    """
    y, scores = _check(y, scores)
    yo = _as_onehot(y, scores.shape[1])
    out = np.full(scores.shape[1], np.nan)
    for c in np.flatnonzero(defined_classes(yo)):
        out[c] = roc_auc_score(yo[:, c], scores[:, c])
    return out


def macro_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean of the defined per-class AUROCs (equals scikit-learn's ``average="macro"``,
    ``multi_class="ovr"`` when every class is defined). NaN when no class is defined."""
    per = per_class_auroc(y, scores)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


class Thresholds(np.ndarray):
    """``(C,)`` decision thresholds chosen on validation (what :func:`choose_thresholds` returns): a float array,
    plus ``no_val_positive`` ``(C,)`` bool, the classes without a positive on validation, whose threshold (0.5) was
    not chosen but is a placeholder. :func:`evaluate_scores` and :func:`macro_f1` leave those classes out of the
    macro F1 (their F1 at an arbitrary threshold is noise, usually 0) and name them (``f1_no_threshold_classes``).

    Hard predictions still use the 0.5 (a classifier artifact needs finite thresholds). The mark travels with the
    array and its copies; ``np.asarray`` of it, a slice, or a list of its floats (e.g. a cell's JSON) is a plain
    array without it, which counts every class as thresholded (the behaviour before 2026-12-07)."""

    no_val_positive: np.ndarray | None

    def __new__(cls, values: Any, no_val_positive: Any = None) -> "Thresholds":
        obj = np.asarray(values, dtype=np.float64).view(cls)
        obj.no_val_positive = None if no_val_positive is None else np.asarray(no_val_positive, dtype=bool)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        mask = getattr(obj, "no_val_positive", None)
        # a view or copy of the same shape keeps the mark; anything else (a slice, a reshape) drops it
        self.no_val_positive = mask if mask is not None and getattr(obj, "shape", None) == self.shape else None

    def __getitem__(self, key: Any) -> Any:
        out = super().__getitem__(key)
        if isinstance(out, Thresholds):   # th[keep]: the mark of the kept classes
            try:
                out.no_val_positive = (None if self.no_val_positive is None
                                       else np.asarray(self.no_val_positive[key], dtype=bool))
            except (IndexError, TypeError, ValueError):
                out.no_val_positive = None
            if out.no_val_positive is not None and out.no_val_positive.shape != out.shape:
                out.no_val_positive = None
        return out

    def __reduce__(self) -> Any:   # pickling keeps the mark
        return Thresholds, (np.asarray(self), self.no_val_positive)


def no_threshold_mask(thresholds: Any, n_classes: int) -> np.ndarray:
    """``(n_classes,)`` bool: the classes whose threshold was not chosen on validation (no validation positive), as
    marked by :func:`choose_thresholds` (:class:`Thresholds`); all False for plain thresholds or None."""
    mask = getattr(thresholds, "no_val_positive", None)
    if mask is None or np.shape(mask) != (n_classes,):
        return np.zeros(n_classes, dtype=bool)
    return np.asarray(mask, dtype=bool)


def choose_thresholds(y_val: np.ndarray, p_val: np.ndarray) -> Thresholds:
    """Per-class decision thresholds maximising F1 on the validation set.

    Args:
        y_val: ``(n, C)`` binary indicators (or ``(n,)`` class indices).
        p_val: ``(n, C)`` probabilities.

    Returns:
        ``(C,)`` thresholds (:class:`Thresholds`); 0.5 for a class without positives on validation, where nothing
        can be chosen: those are marked (``no_val_positive``) and left out of the macro F1 of
        :func:`evaluate_scores` / :func:`macro_f1`.
    """
    y_val, p_val = _check(y_val, p_val)
    yo = _as_onehot(y_val, p_val.shape[1])
    th = np.full(p_val.shape[1], 0.5)
    none = yo.sum(axis=0) == 0
    for c in range(p_val.shape[1]):
        if none[c]:
            continue
        prec, rec, cut = precision_recall_curve(yo[:, c], p_val[:, c])
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
        th[c] = float(cut[int(np.argmax(f1))])
    return Thresholds(th, none)


def predict_labels(scores: np.ndarray, multilabel: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Hard predictions ``(n, C)`` in {0, 1}: per-class thresholds (multi-label) or the argmax (single-label)."""
    scores = np.asarray(scores, dtype=np.float64)
    if multilabel:
        th = np.full(scores.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        return (scores >= th[None, :]).astype(np.float64)
    return _as_onehot(scores.argmax(axis=1), scores.shape[1])


def macro_f1(y: np.ndarray, scores: np.ndarray, multilabel: bool, thresholds: np.ndarray | None = None) -> float:
    """Macro F1 (``zero_division=0``) of the thresholded (multi-label) or argmax predictions, over the classes with
    a positive record and (multi-label) a threshold chosen on validation (:class:`Thresholds`; NaN when no class is
    left), as :func:`evaluate_scores` reports it."""
    y, scores = _check(y, scores)
    yo = _as_onehot(y, scores.shape[1])
    skip = no_threshold_mask(thresholds, scores.shape[1]) if multilabel else None
    return _macro_f1_over_positives(yo, predict_labels(scores, multilabel, thresholds), skip)


def _macro_f1_over_positives(yo: np.ndarray, pred: np.ndarray, skip: np.ndarray | None = None) -> float:
    """Mean per-class F1 over the classes with a positive record (and not in ``skip``, ``(C,)`` bool: classes
    without a chosen threshold); ``yo, pred (n, C)`` in {0, 1}.

    Per class, not scikit-learn's ``f1_score(average="macro")`` on the kept columns: with one column left that
    takes the input as binary and averages the F1 of the positives with the F1 of the negatives."""
    keep = yo.any(axis=0) if skip is None else yo.any(axis=0) & ~np.asarray(skip, dtype=bool)
    if not keep.any():
        return float("nan")
    return float(_weighted_f1(yo[:, keep], pred[:, keep], np.ones((1, len(yo))))[0])


def accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    """Single-label accuracy of the argmax (scikit-learn)."""
    y, scores = _check(y, scores)
    return float(accuracy_score(np.asarray(y).astype(np.int64), scores.argmax(axis=1)))


def fmax(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray = FMAX_THRESHOLDS) -> float:
    """Sample-centric maximum F-measure (CAFA; Strodthoff et al. 2020).

    For a threshold ``t``: precision is averaged over records with at least one predicted label, recall over
    records with at least one true label; ``F(t) = 2 P R / (P + R)``; Fmax is the maximum over ``thresholds``.
    Written by hand: no maintained library implements it.
    """
    y, scores = _check(y, scores)
    yo = _as_onehot(y, scores.shape[1])
    return float(_weighted_fmax(yo, scores, np.ones((1, yo.shape[0])), thresholds)[0])


# ----------------------------------------------------------------------------------------------------------------
# Weighted (bootstrap) versions: W is (B, n) multiplicity weights, one row per resample.


def _weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of one class for every weight row (Mann-Whitney statistic with mid-rank ties).

    Args:
        y: ``(n,)`` binary targets.
        s: ``(n,)`` scores.
        w: ``(B, n)`` non-negative weights.

    Returns:
        ``(B,)``; NaN where a row has no weighted positive or no weighted negative.
    """
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # first index of each tie group
    ws = w[:, order]
    pos = y[order] > 0.5
    pos_g = np.add.reduceat(ws * pos, starts, axis=1)  # (B, G) weighted positives per tie group
    neg_g = np.add.reduceat(ws * ~pos, starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g  # weighted negatives with a strictly lower score
    n_pos = pos_g.sum(axis=1)
    n_neg = neg_g.sum(axis=1)
    u = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos <= 0) | (n_neg <= 0)] = np.nan
    return auc


def _weighted_f1(yo: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Macro F1 for every weight row, over the classes with a positive record in that row's resample (the rule of
    the point estimate, :func:`_macro_f1_over_positives`, and of macro AUROC: a class whose positives a resample
    lost has no F1 there; counting it as 0, as before 2026-12-07, pulled the CI of tasks with rare classes below
    the point estimate, e.g. [0.181, 0.407] around 0.367 for a ptbxl_all-like set). ``yo, pred (n, C)``,
    ``w (B, n)`` -> ``(B,)``; NaN for a row in which no class has a positive."""
    tp = w @ (yo * pred)
    fp = w @ ((1 - yo) * pred)
    fn = w @ (yo * (1 - pred))
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    f1 = np.where(tp + fn > 0, f1, np.nan)          # no positive in this resample: no F1
    with np.errstate(invalid="ignore"):
        counted = np.isfinite(f1).sum(axis=1)
        return np.where(counted > 0, np.nansum(f1, axis=1) / np.maximum(counted, 1), np.nan)


def _weighted_accuracy(yo: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    correct = (yo * pred).sum(axis=1)  # (n,) 1 where the argmax is the true class
    return (w @ correct) / w.sum(axis=1)


def _weighted_fmax(yo: np.ndarray, scores: np.ndarray, w: np.ndarray,
                   thresholds: np.ndarray = FMAX_THRESHOLDS) -> np.ndarray:
    """Sample-centric Fmax for every weight row. ``yo, scores (n, C)``, ``w (B, n)`` -> ``(B,)``."""
    n_true = yo.sum(axis=1)  # (n,)
    has_true = (n_true > 0).astype(np.float64)
    best = np.zeros(w.shape[0])
    for t in thresholds:
        pred = scores >= t
        n_pred = pred.sum(axis=1)
        tp = (pred * yo).sum(axis=1)
        has_pred = (n_pred > 0).astype(np.float64)
        prec_i = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
        rec_i = np.where(n_true > 0, tp / np.maximum(n_true, 1), 0.0)
        wp = w @ has_pred
        wt = w @ has_true
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(wp > 0, (w @ prec_i) / np.maximum(wp, 1e-12), 0.0)
            r = np.where(wt > 0, (w @ rec_i) / np.maximum(wt, 1e-12), 0.0)
            f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
        best = np.maximum(best, f)
    return best


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` multinomial counts: each row is one resample of ``n`` records with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _resampled_aurocs(yo: np.ndarray, score_sets: Sequence[np.ndarray], classes: np.ndarray, n_boot: int,
                      rng: np.random.Generator, max_redraws: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The bootstrap of this module: resamples and the per-class AUROCs of every score set on them.

    Resamples in which a class of ``classes`` loses all its positives or all its negatives are redrawn (up to
    ``max_redraws`` rounds; see the module docstring). Every score set is scored on the same resamples (paired).

    Args:
        yo: ``(n, C)`` indicators.
        score_sets: ``(n, C)`` score arrays.
        classes: indices of the classes to score (those defined on the whole set).
        n_boot: resamples ``B``.
        rng: generator (consumed in a fixed order: the initial draw, then one draw per redraw round).
        max_redraws: redraw rounds.

    Returns:
        ``(w (B, n) multiplicity weights, [(B, len(classes)) AUROCs per score set])``; NaN in a resample still
        degenerate after the redraws.
    """
    n = yo.shape[0]
    w = bootstrap_weights(n, n_boot, rng)

    def aurocs(weights: np.ndarray, s: np.ndarray) -> np.ndarray:
        cols = [_weighted_auroc(yo[:, c], s[:, c], weights) for c in classes]
        return np.stack(cols, axis=1) if cols else np.empty((len(weights), 0))

    out = [aurocs(w, s) for s in score_sets]
    for _ in range(max_redraws):
        bad = np.isnan(out[0]).any(axis=1)   # degeneracy depends on the labels and weights only, not the scores
        if not bad.any():
            break
        w[bad] = bootstrap_weights(n, int(bad.sum()), rng)
        for a, s in zip(out, score_sets):
            a[bad] = aurocs(w[bad], s)
    return w, out


def _summary(value: float, samples: np.ndarray, ci: float) -> dict[str, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0 or not np.isfinite(value):
        return {"value": float(value), "ci_low": float("nan"), "ci_high": float("nan")}
    a = (1.0 - ci) / 2.0
    lo, hi = np.percentile(samples, [100 * a, 100 * (1 - a)])
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi)}


def evaluate_scores(y: np.ndarray, scores: np.ndarray, multilabel: bool,
                    class_names: Sequence[str] | None = None, thresholds: np.ndarray | None = None,
                    n_boot: int = 1000, seed: int = 0, ci: float = 0.95, max_redraws: int = 50,
                    ) -> dict[str, Any]:
    """All metrics of one prediction set with percentile bootstrap confidence intervals over records.

    Args:
        y: ``(n, C)`` binary indicators (multi-label) or ``(n,)`` class indices (single-label).
        scores: ``(n, C)`` probabilities.
        multilabel: multi-label (thresholded sigmoid) or single-label (argmax of softmax).
        class_names: ``C`` names (default ``"0".."C-1"``).
        thresholds: ``(C,)`` decision thresholds chosen on validation (multi-label F1); default 0.5. Classes
            :func:`choose_thresholds` marked as without a validation positive (:class:`Thresholds`) are left out
            of the macro F1 (point estimate and bootstrap).
        n_boot: bootstrap resamples (0: no CIs).
        seed: bootstrap seed.
        ci: confidence level.
        max_redraws: rounds of redrawing resamples in which a test-defined class is degenerate.

    Returns:
        ``{"macro_auroc": {"value", "ci_low", "ci_high"}, "macro_f1": ..., "fmax": ..., "accuracy": ...
        (single-label only), "per_class_auroc": {name: {...}}, "excluded_classes": [...] (not in the macro AUROC),
        "f1_excluded_classes": [...] (not in the macro F1: no positive record in the set, or no threshold chosen on
        validation), "f1_no_threshold_classes": [...] (multi-label: no validation positive, threshold 0.5 not
        chosen; not in the macro F1), "n": n,
        "n_boot": B, "n_degenerate": k, "thresholds": [...]}``.
    """
    y, scores = _check(y, scores)
    n, n_classes = scores.shape
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} score columns")
    yo = _as_onehot(y, n_classes)
    if not multilabel and (yo.sum(axis=1) != 1).any():
        raise ValueError("single-label targets must have exactly one class per record")
    defined = defined_classes(yo)
    pred = predict_labels(scores, multilabel, thresholds)
    has_pos = yo.any(axis=0)                                              # (C,) classes with a positive record
    # multi-label classes without a validation positive have no chosen threshold (a placeholder 0.5): their F1 is
    # not a measurement of the model, so the macro F1 leaves them out, as it leaves out classes without a positive
    no_thr = no_threshold_mask(thresholds, n_classes) if multilabel else np.zeros(n_classes, dtype=bool)
    f1_cols = has_pos & ~no_thr

    per = per_class_auroc(yo, scores)
    point = {
        "macro_auroc": float(np.nanmean(per)) if defined.any() else float("nan"),
        # macro F1 over the classes with a positive record in the set (as macro AUROC leaves out classes it cannot
        # score): a class without positives has no F1, and counting it as 0 would drag the mean for no reason
        "macro_f1": _macro_f1_over_positives(yo, pred, no_thr),
        "fmax": fmax(yo, scores),
    }
    if not multilabel:
        point["accuracy"] = float(accuracy_score(yo.argmax(axis=1), scores.argmax(axis=1)))

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    n_degenerate = 0
    if n_boot > 0 and n > 1:
        w, (aucs_defined,) = _resampled_aurocs(yo, [scores], np.flatnonzero(defined), n_boot, rng, max_redraws)
        aucs = np.full((n_boot, n_classes), np.nan)  # (B, C), NaN for the classes not defined on the whole set
        aucs[:, defined] = aucs_defined
        n_degenerate = int(np.isnan(aucs[:, defined]).any(axis=1).sum()) if defined.any() else 0
        with np.errstate(invalid="ignore"):
            macro_samples = (np.nanmean(aucs[:, defined], axis=1) if defined.any()
                             else np.full(n_boot, np.nan))
        samples = {
            "macro_auroc": macro_samples,
            "macro_f1": (_weighted_f1(yo[:, f1_cols], pred[:, f1_cols], w) if f1_cols.any()
                         else np.full(n_boot, np.nan)),
            "fmax": _weighted_fmax(yo, scores, w),
        }
        if not multilabel:
            samples["accuracy"] = _weighted_accuracy(yo, pred, w)
        for key, value in point.items():
            out[key] = _summary(value, samples[key], ci)
        out["per_class_auroc"] = {names[c]: _summary(per[c], aucs[:, c], ci) for c in range(n_classes)}
    else:
        nan = float("nan")
        for key, value in point.items():
            out[key] = {"value": value, "ci_low": nan, "ci_high": nan}
        out["per_class_auroc"] = {names[c]: {"value": float(per[c]), "ci_low": nan, "ci_high": nan}
                                  for c in range(n_classes)}
    out["excluded_classes"] = [names[c] for c in range(n_classes) if not defined[c]]
    out["f1_excluded_classes"] = [names[c] for c in range(n_classes) if not f1_cols[c]]
    out["f1_no_threshold_classes"] = [names[c] for c in range(n_classes) if no_thr[c]]
    out["n"] = int(n)
    out["n_boot"] = int(n_boot)
    out["n_degenerate"] = n_degenerate
    out["ci_level"] = float(ci)
    out["thresholds"] = None if thresholds is None else [float(t) for t in thresholds]
    return out


def macro_auroc_ci(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                   max_redraws: int = 50) -> dict[str, float]:
    """Macro AUROC with its percentile bootstrap CI over records: :func:`evaluate_scores`'s ``"macro_auroc"``
    (same resamples, same numbers) without the other metrics.

    Args:
        y: ``(n, C)`` indicators or ``(n,)`` class indices.
        scores: ``(n, C)`` scores.
        n_boot: resamples (0: no CI).
        seed: bootstrap seed.
        ci: confidence level.
        max_redraws: rounds of redrawing resamples in which a defined class is degenerate.

    Returns:
        ``{"value", "ci_low", "ci_high", "n", "n_boot", "n_degenerate"}`` (NaN value and CI when no class has both
        label values).
    """
    y, scores = _check(y, scores)
    n, n_classes = scores.shape
    yo = _as_onehot(y, n_classes)
    defined = np.flatnonzero(defined_classes(yo))
    samples, n_degenerate = np.empty(0), 0
    if n_boot > 0 and n > 1 and defined.size:
        _, (aucs,) = _resampled_aurocs(yo, [scores], defined, n_boot, np.random.default_rng(seed), max_redraws)
        n_degenerate = int(np.isnan(aucs).any(axis=1).sum())
        with warnings.catch_warnings():   # a resample degenerate in every class has no mean: NaN, dropped
            warnings.simplefilter("ignore", RuntimeWarning)
            samples = np.nanmean(aucs, axis=1)
    return {**_summary(macro_auroc(yo, scores), samples, ci), "n": int(n), "n_boot": int(n_boot),
            "n_degenerate": n_degenerate}


def bootstrap_mean(values: Any, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """Mean of per-record values with a percentile bootstrap CI over records (the resampling of this module).

    Args:
        values: per-record values (array-like; NaN / inf are dropped).
        n_boot: resamples.
        seed: bootstrap seed.
        ci: confidence level.

    Returns:
        ``{"value", "ci_low", "ci_high", "n"}``; a single value is its own CI; no finite value gives NaNs, ``n = 0``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size <= 1:
        value = float(v[0]) if v.size else float("nan")
        return {"value": value, "ci_low": value, "ci_high": value, "n": int(v.size)}
    w = bootstrap_weights(v.size, n_boot, np.random.default_rng(seed))
    return {**_summary(float(v.mean()), w @ v / v.size, ci), "n": int(v.size)}


def paired_bootstrap_delta(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_boot: int = 1000,
                           seed: int = 0, ci: float = 0.95, max_redraws: int = 50) -> dict[str, float]:
    """Macro AUROC difference ``A - B`` of two models scored on the same records, with a paired percentile
    bootstrap (the same resample for both models, so the record-to-record variation cancels).

    Args:
        y: ``(n, C)`` indicators or ``(n,)`` class indices.
        scores_a, scores_b: ``(n, C)`` scores of the two models on the same records, in the same order.
        n_boot: resamples.
        seed: bootstrap seed.
        ci: confidence level.
        max_redraws: rounds of redrawing resamples in which a defined class is degenerate.

    Returns:
        ``{"delta", "ci_low", "ci_high", "p_not_positive" (share of resamples with delta <= 0), "n",
        "n_degenerate"}``: ``n_degenerate`` counts the resamples still degenerate after the redraws, whose delta
        averages over fewer classes (as :func:`evaluate_scores`'s).
    """
    y, scores_a = _check(y, scores_a)
    _, scores_b = _check(y, scores_b)
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"score shapes differ: {scores_a.shape} vs {scores_b.shape}")
    n, n_classes = scores_a.shape
    yo = _as_onehot(y, n_classes)
    defined = np.flatnonzero(defined_classes(yo))
    if len(defined) == 0:
        raise ValueError("no class has both label values: AUROC is undefined")
    delta = float(np.mean(per_class_auroc(yo, scores_a)[defined] - per_class_auroc(yo, scores_b)[defined]))
    _, (a, b) = _resampled_aurocs(yo, [scores_a, scores_b], defined, n_boot, np.random.default_rng(seed),
                                  max_redraws)
    n_degenerate = int(np.isnan(a).any(axis=1).sum())
    with np.errstate(invalid="ignore"):
        d = np.nanmean(a - b, axis=1)
    d = d[np.isfinite(d)]
    if d.size == 0:   # n_boot = 0 (no CIs asked for) or no resample with a defined class: no CI, not a crash
        return {"delta": delta, "ci_low": float("nan"), "ci_high": float("nan"), "p_not_positive": float("nan"),
                "n": int(n), "n_degenerate": n_degenerate}
    lo, hi = np.percentile(d, [50 * (1 - ci), 100 - 50 * (1 - ci)])
    return {"delta": delta, "ci_low": float(lo), "ci_high": float(hi), "p_not_positive": float(np.mean(d <= 0)),
            "n": int(n), "n_degenerate": n_degenerate}
