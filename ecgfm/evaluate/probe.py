"""Linear and MLP probes on frozen features: many heads from one feature extraction.

**Choice of the linear probe** (documented and tested): scikit-learn ``LogisticRegression`` (L-BFGS, softmax
over classes for single-label tasks; one binary model per class through ``OneVsRestClassifier`` for multi-label
tasks) after a ``StandardScaler`` fitted on the training subset. The scaler is the BatchNorm-without-affine of
MAE's ``main_linprobe.py`` in closed form, and the problem is convex, so the only hyper-parameter is the L2
strength ``C``, chosen on the validation split by macro AUROC; a seed changes only the label subset. On the small
labelled sets of this project (hundreds to a few thousand records x a few hundred features) a full grid of ``C``
x label fractions x seeds takes seconds on a CPU, which is the dinov2 "grid of heads on one forward pass" without
the GPU-shaped machinery. The torch alternative (``LinearProbeHead`` trained with SGD) would add a learning-rate,
epoch and batch-size grid to reach the same convex optimum.

**MLP probe**: :class:`ecgfm.heads.MLPHead` trained full-batch with AdamW on the standardised features, with
early stopping on validation macro AUROC; the learning rate is chosen from a grid on validation.

**Record-level aggregation** (the PTB-XL benchmark evaluates whole records from sliding windows):
``aggregate="mean_embedding"`` trains and predicts on the mean window embedding of each record;
``aggregate="mean_prediction"`` trains on every window (labelled with its record's labels) and averages the
window probabilities of a record.

Multi-label heads use per-class sigmoids (binary cross-entropy) and per-class thresholds chosen on validation for
F1; single-label heads use a softmax.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ecgfm.evaluate.features import FeatureSet
from ecgfm.evaluate.fractions import fraction_subsets
from ecgfm.evaluate.metrics import choose_thresholds, evaluate_scores, macro_auroc

AGGREGATIONS = ("mean_embedding", "mean_prediction")


class LinearProbe:
    """Standardise + L2 logistic regression (softmax, or one-vs-rest for multi-label), see the module docstring.

    Args:
        multilabel: one sigmoid per class through ``OneVsRestClassifier`` (else one softmax).
        C: inverse L2 strength.
        max_iter: L-BFGS iterations.
        seed: ``random_state`` (L-BFGS is deterministic; kept for completeness).
    """

    def __init__(self, multilabel: bool, C: float = 1.0, max_iter: int = 1000, seed: int = 0):
        self.multilabel = multilabel
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.n_classes = 0
        self._model: Any = None

    def fit(self, x: np.ndarray, labels: np.ndarray) -> "LinearProbe":
        """Fit on ``x (n, D)`` and ``labels (n, C)`` indicators."""
        self.n_classes = labels.shape[1]
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # a class constant in a tiny label subset: OneVsRestClassifier predicts that constant (and warns)
            warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
            if self.multilabel:
                self._model = make_pipeline(StandardScaler(), OneVsRestClassifier(lr))
                self._model.fit(x, labels.astype(np.int64))
            else:
                self._model = make_pipeline(StandardScaler(), lr).fit(x, labels.argmax(axis=1))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(n, D) -> (n, C)`` probabilities (sigmoids, or a softmax; classes absent from training get 0)."""
        if self._model is None:
            raise RuntimeError("LinearProbe.predict_proba called before fit")
        p = self._model.predict_proba(x)
        if self.multilabel:
            return np.asarray(p, dtype=np.float64)
        out = np.zeros((len(x), self.n_classes))
        out[:, self._model.classes_] = p
        return out


__all__ = ["LinearProbe", "MLPProbe", "ProbeData", "run_probe_grid", "AGGREGATIONS"]


class MLPProbe:
    """:class:`ecgfm.heads.MLPHead` on standardised features, full-batch AdamW, early stopping on validation.

    Args:
        multilabel: BCE with sigmoids (else cross-entropy with softmax).
        lr: learning rate.
        hidden_dim: hidden width.
        epochs: maximum full-batch epochs.
        weight_decay: AdamW weight decay.
        dropout: dropout of the hidden layer.
        patience: evaluations without validation improvement before stopping.
        eval_every: epochs between validation evaluations.
        seed: torch seed for the initialisation.
    """

    def __init__(self, multilabel: bool, lr: float = 1e-3, hidden_dim: int = 256, epochs: int = 300,
                 weight_decay: float = 1e-4, dropout: float = 0.2, patience: int = 5, eval_every: int = 10,
                 seed: int = 0):
        self.multilabel = multilabel
        self.lr, self.hidden_dim, self.epochs = float(lr), int(hidden_dim), int(epochs)
        self.weight_decay, self.dropout = float(weight_decay), float(dropout)
        self.patience, self.eval_every, self.seed = int(patience), int(eval_every), int(seed)
        self.scaler = StandardScaler()
        self.net: torch.nn.Module | None = None
        self.best_val = float("nan")

    def _probs(self, x: np.ndarray) -> np.ndarray:
        assert self.net is not None
        self.net.eval()
        with torch.no_grad():
            logits = self.net(torch.from_numpy(self.scaler.transform(x).astype(np.float32)))
            p = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
        return p.double().numpy()

    def fit(self, x: np.ndarray, labels: np.ndarray, x_val: np.ndarray | None = None,
            labels_val: np.ndarray | None = None) -> "MLPProbe":
        """Fit on ``x (n, D)``, ``labels (n, C)``; early-stop on ``(x_val, labels_val)`` macro AUROC if given."""
        from ecgfm.heads import MLPHead

        # Full-batch steps on a few thousand x a few hundred numbers: one thread is faster than several and
        # immune to OpenMP oversubscription on a shared machine (measured: 0.9 s vs 53 s on a loaded 2-core box).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(x, labels, x_val, labels_val, MLPHead)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, x: np.ndarray, labels: np.ndarray, x_val: np.ndarray | None, labels_val: np.ndarray | None,
             MLPHead: Any) -> "MLPProbe":
        torch.manual_seed(self.seed)
        self.scaler.fit(x)
        xt = torch.from_numpy(self.scaler.transform(x).astype(np.float32))
        n_classes = labels.shape[1]
        self.net = MLPHead(x.shape[1], n_classes, hidden_dim=self.hidden_dim, num_layers=2, dropout=self.dropout,
                           batch_norm=len(x) > 1)
        if self.multilabel:
            yt = torch.from_numpy(labels.astype(np.float32))
            loss_fn = torch.nn.BCEWithLogitsLoss()
        else:
            yt = torch.from_numpy(labels.argmax(axis=1).astype(np.int64))
            loss_fn = torch.nn.CrossEntropyLoss()
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_state, best, bad = None, -np.inf, 0
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            opt.zero_grad()
            loss = loss_fn(self.net(xt), yt)
            loss.backward()
            opt.step()
            if x_val is not None and labels_val is not None and epoch % self.eval_every == 0:
                auc = macro_auroc(labels_val, self._probs(x_val))
                auc = -np.inf if not np.isfinite(auc) else auc
                if auc > best:
                    best, bad = auc, 0
                    best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
        if best_state is not None:
            self.net.load_state_dict(best_state)
            self.best_val = float(best)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("MLPProbe.predict_proba called before fit")
        return self._probs(x)


@dataclass
class ProbeData:
    """What a probe needs from a task: features, labels, splits.

    Attributes:
        features: the frozen window features of the task's corpus.
        labels: ``(N, C)`` float indicators for every cache row (rows outside the splits are ignored).
        splits: ``{"train", "val", "test"}`` -> cache rows.
        multilabel: multi-label task.
        class_names: ``C`` names.
        patient_ids: length-``N`` patient ids (None: each record is its own patient).
        external: optional ``{name: (FeatureSet, labels (M, C), rows)}`` evaluated without retraining.
    """

    features: FeatureSet
    labels: np.ndarray
    splits: dict[str, np.ndarray]
    multilabel: bool
    class_names: list[str]
    patient_ids: Sequence[Any] | None = None
    external: dict[str, tuple[FeatureSet, np.ndarray, np.ndarray]] = field(default_factory=dict)


def _design(fs: FeatureSet, labels: np.ndarray, rows: np.ndarray, aggregate: str, means: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Training matrix: record means ``(len(rows), D)`` or every window ``(w, D)`` with its record's labels."""
    if aggregate == "mean_embedding":
        assert means is not None
        return means[rows], labels[rows]
    x, pos = fs.windows_of(rows)
    return x, labels[rows][pos]


def _predict_records(model: Any, fs: FeatureSet, rows: np.ndarray, aggregate: str, means: np.ndarray | None
                     ) -> np.ndarray:
    """Record-level probabilities ``(len(rows), C)``: on the mean embedding, or the mean of window predictions."""
    if aggregate == "mean_embedding":
        assert means is not None
        return model.predict_proba(means[rows])
    x, pos = fs.windows_of(rows)
    p = model.predict_proba(x)
    out = np.zeros((len(rows), p.shape[1]))
    np.add.at(out, pos, p)
    return out / np.maximum(np.bincount(pos, minlength=len(rows)), 1)[:, None]


def run_probe_grid(data: ProbeData, fractions: Sequence[float], seeds: Sequence[int], mode: str = "linear",
                   Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0), lrs: Sequence[float] = (1e-3,),
                   aggregate: str = "mean_embedding", n_boot: int = 1000, bootstrap_seed: int = 0,
                   max_iter: int = 1000, mlp_kwargs: dict[str, Any] | None = None, min_per_class: int = 1,
                   blas_threads: int | None = 1) -> list[dict[str, Any]]:
    """Train heads for every (fraction, seed) on one feature set; choose the hyper-parameter on validation.

    For each (fraction, seed): the training subset is drawn with
    :func:`~ecgfm.evaluate.fractions.fraction_subsets` (stratified, patient-level, nested, the same for every
    method); one head per ``C`` (linear) or learning rate (MLP) is trained; the one with the best validation
    macro AUROC is kept; thresholds for F1 are chosen on validation; test (and every external set) is scored with
    bootstrap CIs.

    ``blas_threads`` caps the BLAS / OpenMP threads while the heads train (threadpoolctl): these problems are
    small (records x features), so one thread is as fast and immune to oversubscription; None leaves them.

    Returns:
        One dict per (fraction, seed) with ``fraction``, ``seed``, ``n_train``, ``hparam``, ``val_macro_auroc``,
        ``grid`` (validation AUROC of every head), ``test`` (metrics, see
        :func:`~ecgfm.evaluate.metrics.evaluate_scores`), ``external`` (name -> metrics), ``predictions``
        (split -> (cache rows, record probabilities)) and ``seconds``.
    """
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=int(blas_threads)):
            return run_probe_grid(data, fractions, seeds, mode, Cs, lrs, aggregate, n_boot, bootstrap_seed,
                                  max_iter, mlp_kwargs, min_per_class, blas_threads=None)
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if mode not in ("linear", "mlp"):
        raise ValueError(f"probe mode must be 'linear' or 'mlp', got {mode!r}")
    for part in ("train", "val", "test"):
        if part not in data.splits or len(data.splits[part]) == 0:
            raise ValueError(f"the task has no {part!r} records")
    fs, labels = data.features, np.asarray(data.labels, dtype=np.float32)
    means = fs.record_means() if aggregate == "mean_embedding" else None
    ext_means = {k: (v[0].record_means() if aggregate == "mean_embedding" else None)
                 for k, v in data.external.items()}
    train, val, test = (np.asarray(data.splits[k], dtype=np.int64) for k in ("train", "val", "test"))
    x_val, y_val = _design(fs, labels, val, aggregate, means)
    results = []
    for seed in seeds:
        subsets = fraction_subsets(train, labels if data.multilabel else labels.argmax(axis=1),
                                   data.patient_ids, fractions, seed=int(seed), min_per_class=min_per_class)
        for frac in fractions:
            t0 = time.perf_counter()
            rows = subsets[float(frac)]
            x_tr, y_tr = _design(fs, labels, rows, aggregate, means)
            grid: dict[str, float] = {}
            best: tuple[float, Any, float] | None = None
            for hp in (Cs if mode == "linear" else lrs):
                if mode == "linear":
                    model = LinearProbe(data.multilabel, C=hp, max_iter=max_iter, seed=int(seed)).fit(x_tr, y_tr)
                else:
                    model = MLPProbe(data.multilabel, lr=hp, seed=int(seed), **(mlp_kwargs or {}))
                    model.fit(x_tr, y_tr, x_val, y_val)
                p_val = _predict_records(model, fs, val, aggregate, means)
                auc = macro_auroc(labels[val], p_val)
                grid[f"{hp:g}"] = float(auc)
                score = auc if np.isfinite(auc) else -np.inf
                if best is None or score > best[0]:
                    best = (score, model, hp)
            assert best is not None
            _, model, hp = best
            p_val = _predict_records(model, fs, val, aggregate, means)
            thresholds = choose_thresholds(labels[val], p_val) if data.multilabel else None
            y_test = labels[test] if data.multilabel else labels[test].argmax(axis=1)
            p_test = _predict_records(model, fs, test, aggregate, means)
            metrics = evaluate_scores(y_test, p_test, data.multilabel, data.class_names, thresholds,
                                      n_boot=n_boot, seed=bootstrap_seed)
            external = {}
            predictions = {"test": (test, p_test)}
            for name, (efs, elabels, erows) in data.external.items():
                erows = np.asarray(erows, dtype=np.int64)
                p_ext = _predict_records(model, efs, erows, aggregate, ext_means[name])
                y_ext = elabels[erows] if data.multilabel else elabels[erows].argmax(axis=1)
                external[name] = evaluate_scores(y_ext, p_ext, data.multilabel, data.class_names, thresholds,
                                                 n_boot=n_boot, seed=bootstrap_seed)
                predictions[name] = (erows, p_ext)
            results.append({
                "fraction": float(frac), "seed": int(seed), "n_train": int(len(rows)),
                "n_val": int(len(val)), "n_test": int(len(test)),
                "hparam": {"C" if mode == "linear" else "lr": float(hp)},
                "val_macro_auroc": float(grid[f"{hp:g}"]), "grid": grid, "test": metrics, "external": external,
                "predictions": predictions, "seconds": time.perf_counter() - t0,
                "model": model, "thresholds": thresholds,   # the chosen probe (a classifier artifact on request)
            })
    return results
