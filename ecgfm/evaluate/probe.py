"""Linear, MLP and attention probes on frozen features: many heads from one feature extraction.

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
early stopping on validation macro AUROC; the learning rate is chosen from a grid on validation. Both torch
probes decay weights only (no decay on biases, norm layers or the attention probe's queries: :func:`ecgfm.optim.param_groups`).

**Attention probe** (``mode="attention"``): :class:`ecgfm.heads.AttentionPoolingHead` (learnable queries,
multi-head cross-attention over *all* frozen tokens of a record, LayerNorm, linear) trained on the token cache
(:class:`~ecgfm.evaluate.features.TokenSet`) with AdamW in shuffled minibatches (records padded, key padding mask),
early stopping on validation macro AUROC (best epoch's weights kept); learning rate and weight decay are chosen on
validation macro AUROC from a grid. Deterministic given the seed on CPU (initialisation and batch order).

**Record-level aggregation** (the PTB-XL benchmark evaluates whole records from sliding windows):
``aggregate="mean_embedding"`` trains and predicts on the mean window embedding of each record;
``aggregate="mean_std"`` on the concatenation of the mean and the standard deviation of its window embeddings
(``2D`` features that keep window-to-window variability: rhythm irregularity such as AF changes the windows'
embeddings from one window to the next, which a mean averages away; a one-window record has std 0);
``aggregate="mean_prediction"`` trains on every window (labelled with its record's labels) and averages the
window probabilities of a record. The attention probe aggregates by attention and takes ``mean_embedding`` only
(the default; other values are refused).

Multi-label heads use per-class sigmoids (binary cross-entropy) and per-class thresholds chosen on validation for
F1; single-label heads use a softmax.

**Feature groups flagged missing** (``ProbeData.missing_groups``, the handcrafted features:
:func:`ecgfm.evaluate.handcrafted.missing_groups`): a group of columns whose values are placeholders where its
indicator column is set (a record with too few beats) is imputed per training subset, before the scaler: its values
become the medians of the training rows where the group is present (:class:`GroupMedianImputer`, fitted on the
fraction's training rows only, applied to every split and external set). The indicator columns stay. Without a
flagged row nothing changes.

**Label checks** (before any training): a single-label task needs exactly one positive in every label row it uses
(:func:`check_single_label`: a multi-hot or all-zero row is refused, not silently turned into its first positive
or class 0 by an argmax), and the validation split must hold a class with both positive and negative records
(:func:`check_validation_defined`): otherwise the validation macro AUROC, on which the hyper-parameter is chosen
and the trained probes early-stop, is undefined and the choice would be arbitrary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ecgfm.data.splits import assert_disjoint_patients, check_single_label
from ecgfm.errors import ConfigError
from ecgfm.evaluate.features import FeatureSet, TokenSet
from ecgfm.evaluate.fractions import fraction_subsets
from ecgfm.evaluate.metrics import choose_thresholds, evaluate_scores, macro_auroc

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean_embedding", "mean_std", "mean_prediction")
#: aggregations that train on one feature row per record (:func:`record_matrix`).
RECORD_AGGREGATIONS = ("mean_embedding", "mean_std")
MODES = ("linear", "mlp", "attention")


def record_matrix(fs: FeatureSet, aggregate: str) -> np.ndarray | None:
    """One feature row per cache row: mean embeddings ``(N, D)`` (``mean_embedding``), mean + std ``(N, 2D)``
    (``mean_std``), or None (``mean_prediction`` trains on windows)."""
    if aggregate == "mean_embedding":
        return fs.record_means()
    if aggregate == "mean_std":
        return fs.record_stats()
    return None


def check_validation_defined(labels_val: np.ndarray, where: str = "validation",
                             class_names: Sequence[str] | None = None, purpose: str = "") -> None:
    """Refuse a validation set on which macro AUROC is undefined (no class with both label values).

    Args:
        labels_val: ``(n, C)`` indicators of the validation records.
        where: how the records are named in the error (e.g. ``"split 'val'"``).
        class_names: ``C`` names for the error message (None: class indices).
        purpose: what the validation AUROC decides (appended to the error).

    Raises:
        ValueError: no class has both positive and negative records (naming the split and the positives per class).
    """
    y = np.asarray(labels_val)
    if y.ndim != 2:
        raise ValueError(f"{where}: validation labels must be (n, C) indicators, got shape {y.shape}")
    pos = (y > 0.5).sum(axis=0)
    n = len(y)
    if ((pos > 0) & (pos < n)).any():
        return
    names = list(class_names) if class_names is not None and len(class_names) == y.shape[1] \
        else [str(c) for c in range(y.shape[1])]
    counts = ", ".join(f"{name}: {int(k)}" for name, k in zip(names, pos))
    why = f" ({purpose})" if purpose else ""
    raise ValueError(f"{where} ({n} records) has no class with both positive and negative records, so its macro "
                     f"AUROC is undefined{why}: positives per class of {n} records {{{counts}}}. Put records of at "
                     f"least two classes (single-label), or records with and without a class (multi-label), in "
                     f"validation")


class _ConstantFlag(BaseEstimator):
    """The probability of a 0/1 flag that was constant on the training subset: always that value.

    Mirrors scikit-learn's private ``sklearn.multiclass._ConstantPredictor`` (``y_`` holds the value, as
    :func:`ecgfm.evaluate.finetune.init_head_from_probe` reads it) without importing a private class.

    Args:
        value: the flag's only training value (0 or 1).
    """

    def __init__(self, value: float = 0.0):
        self.value = value

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_ConstantFlag":
        """Store ``value`` as ``y_`` (the features are not used)."""
        self.y_ = np.array([float(self.value)])
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(n, 2)``: ``[1 - value, value]`` on every row."""
        return np.repeat([[1.0 - self.y_[0], self.y_[0]]], len(x), axis=0)


class _OneFlagOneVsRest(BaseEstimator):
    """``OneVsRestClassifier``'s multi-label behaviour for a target with ONE 0/1 indicator column.

    Why not ``OneVsRestClassifier`` itself: scikit-learn decides the target type from the values, and an
    ``(n, 1)`` indicator is "binary", not "multilabel-indicator"; it then returns two probability columns
    (``[P(0), P(1)]``) instead of one, and a training column of only ones is binarised against the single class it
    saw and predicted as probability 0. This fits the one binary model the multi-label path would fit for that
    column (or a :class:`_ConstantFlag` when the column is constant on the training subset, as scikit-learn's
    constant predictor) and keeps the same ``estimators_`` list, so
    :func:`ecgfm.evaluate.finetune.init_head_from_probe` copies it like any multi-label probe.

    Args:
        estimator: the binary classifier to clone and fit (a ``LogisticRegression``).
    """

    def __init__(self, estimator: Any = None):
        self.estimator = estimator

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_OneFlagOneVsRest":
        """Fit on ``x (n, D)`` and ``y (n, 1)`` 0/1 indicators."""
        flag = np.asarray(y).reshape(len(y), -1)
        if flag.shape[1] != 1:
            raise ValueError(f"_OneFlagOneVsRest takes one indicator column, got shape {np.asarray(y).shape}")
        flag = flag[:, 0]
        values = np.unique(flag)
        est = (_ConstantFlag(float(values[0])) if len(values) == 1 else clone(self.estimator))
        self.estimators_ = [est.fit(x, flag)]
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(n, D) -> (n, 1)``: the probability that the flag is 1."""
        return np.asarray(self.estimators_[0].predict_proba(x), dtype=np.float64)[:, 1:2]


def _max_iterations(est: Any) -> int:
    """The most solver iterations of a fitted ``LogisticRegression``, or of the models of a one-vs-rest classifier
    (``estimators_``; constant predictors, which optimise nothing, count 0)."""
    models = getattr(est, "estimators_", None)
    models = [est] if models is None else list(models)
    its = [int(np.max(m.n_iter_)) for m in models if np.size(getattr(m, "n_iter_", [])) > 0]
    return max(its, default=0)


class LinearProbe:
    """Standardise + L2 logistic regression (softmax, or one-vs-rest for multi-label), see the module docstring.

    A multi-label task with one class (one 0/1 flag column) gets one probability column, as any multi-label task
    (:class:`_OneFlagOneVsRest`; ``OneVsRestClassifier`` would read the column as a binary target).

    Args:
        multilabel: one sigmoid per class through ``OneVsRestClassifier`` (else one softmax).
        C: inverse L2 strength.
        max_iter: L-BFGS iterations.
        seed: ``random_state`` (L-BFGS is deterministic; kept for completeness).

    Attributes:
        converged: after :meth:`fit`, whether every fitted logistic regression (each one-vs-rest model of a
            multi-label task) converged: fewer than ``max_iter`` L-BFGS iterations and no scikit-learn
            ``ConvergenceWarning`` (which also reports an L-BFGS line-search failure). The warnings themselves are
            not shown (a grid of ``C`` would print dozens); :func:`run_probe_grid` lists the ``C`` that did not
            converge and logs a warning when the chosen one did not.
        n_iter: after :meth:`fit`, the most L-BFGS iterations any fitted model took (0 when every one-vs-rest
            column was constant, so nothing was optimised).
    """

    def __init__(self, multilabel: bool, C: float = 1.0, max_iter: int = 1000, seed: int = 0):
        self.multilabel = multilabel
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.n_classes = 0
        self._model: Any = None
        self.converged = True
        self.n_iter = 0

    def fit(self, x: np.ndarray, labels: np.ndarray) -> "LinearProbe":
        """Fit on ``x (n, D)`` and ``labels (n, C)`` indicators.

        Raises:
            ValueError: single-label (``multilabel=False``) rows that are not one-hot (:func:`check_single_label`).
        """
        self.n_classes = labels.shape[1]
        target = None if self.multilabel else check_single_label(labels, where="LinearProbe.fit labels")
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        with warnings.catch_warnings(record=True) as caught:
            # recorded, not shown: every one of them counts as a model that did not converge (self.converged)
            warnings.simplefilter("always", ConvergenceWarning)
            # a class constant in a tiny label subset: OneVsRestClassifier predicts that constant (and warns)
            warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
            if self.multilabel:
                # one flag column: OneVsRestClassifier would read it as a binary target (two output columns)
                ovr = _OneFlagOneVsRest(lr) if self.n_classes == 1 else OneVsRestClassifier(lr)
                self._model = make_pipeline(StandardScaler(), ovr)
                self._model.fit(x, labels.astype(np.int64))
            else:
                self._model = make_pipeline(StandardScaler(), lr).fit(x, target)
        convergence = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        for w in caught:   # any other warning goes on as it would have without the recording
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        self.n_iter = _max_iterations(self._model[-1])
        self.converged = not convergence and self.n_iter < self.max_iter
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


__all__ = ["LinearProbe", "MLPProbe", "AttentionProbe", "ProbeData", "GroupMedianImputer", "run_probe_grid",
           "record_matrix", "check_single_label", "check_validation_defined", "AGGREGATIONS", "MODES"]


class GroupMedianImputer:
    """Replaces the placeholder values of a column group flagged missing by its indicator column with the medians
    of the training rows where the group is present (see the module docstring).

    A bare placeholder (the handcrafted features' 0 for "too few beats") standardises to many SDs outside the
    training data, and the indicator's weight absorbs it only when some training row has the indicator set; the
    medians keep a flagged row inside the data, and the indicator column (left as it is) carries the flag.

    Args:
        groups: ``((value columns, indicator column), ...)``; a row's group is missing where its indicator is
            above 0.5.

    Attributes:
        medians_: after :meth:`fit`, per group the ``(len(value columns),)`` training medians, or None when every
            training row had the group missing (its placeholders are then left as they are: constant in training,
            they get no weight).
    """

    def __init__(self, groups: Sequence[tuple[Sequence[int], int]]):
        self.groups = [(np.asarray(cols, dtype=np.int64).ravel(), int(flag)) for cols, flag in groups]
        self.medians_: list[np.ndarray | None] | None = None

    def check_width(self, dim: int, where: str) -> None:
        """Refuse a feature width that lacks a column of the groups.

        Raises:
            ValueError: a column at or beyond ``dim`` (or negative), naming ``where``.
        """
        cols = [int(c) for v, flag in self.groups for c in (*v.tolist(), flag)]
        if cols and (min(cols) < 0 or max(cols) >= dim):
            raise ValueError(f"{where}: missing_groups name columns {min(cols)}..{max(cols)}, but the features have "
                             f"{dim} columns")

    def fit(self, x: np.ndarray) -> "GroupMedianImputer":
        """Fit on the training rows ``x (n, D)`` only (never validation, test or external rows)."""
        x = np.asarray(x)
        self.medians_ = []
        for cols, flag in self.groups:
            present = ~(x[:, flag] > 0.5)
            self.medians_.append(np.median(x[np.ix_(present, cols)].astype(np.float64), axis=0)
                                 if present.any() else None)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``x (n, D)`` with each flagged group's values replaced by the training medians (a copy); ``x`` itself,
        not a copy, when no row is flagged."""
        if self.medians_ is None:
            raise RuntimeError("GroupMedianImputer.transform called before fit")
        out = x
        for (cols, flag), med in zip(self.groups, self.medians_):
            missing = x[:, flag] > 0.5
            if med is None or not missing.any():
                continue
            if out is x:
                out = np.array(x, copy=True)
            out[np.ix_(missing, cols)] = med.astype(out.dtype)
        return out


class _BestOnValidation:
    """Early stopping on validation macro AUROC for the trained probes: keeps a copy of the best weights, says
    when ``patience`` evaluations in a row did not beat it, and puts the best weights back.

    Args:
        net: the module being trained.
        patience: evaluations without a new best before stopping.
    """

    def __init__(self, net: torch.nn.Module, patience: int) -> None:
        self.net, self.patience = net, int(patience)
        self.best, self.best_epoch, self.bad = -np.inf, 0, 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, auc: float, epoch: int) -> bool:
        """Record one validation score (NaN counts as no score); True when training should stop."""
        auc = -np.inf if not np.isfinite(auc) else float(auc)
        if auc > self.best:
            self.best, self.best_epoch, self.bad = auc, epoch, 0
            self.state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> bool:
        """Load the best weights back; False when no validation score was ever recorded."""
        if self.state is None:
            return False
        self.net.load_state_dict(self.state)
        return True


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's global RNG seeded with ``seed`` and put the caller's random state back after it.

    The CPU generator (and, for a CUDA ``device``, that device's generator) is forked
    (:func:`torch.random.fork_rng`) and seeded inside the fork, so the block draws exactly what it drew after a
    plain ``torch.manual_seed(seed)`` on that device, while the caller's random state, and every other device's,
    is left as it was.

    Args:
        seed: the seed.
        device: the device the block draws on (None or CPU: only the CPU generator).
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    index = (torch.device(device).index if torch.device(device).index is not None
             else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


def _adamw(net: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The project's AdamW (:func:`ecgfm.optim.param_groups`): no weight decay on biases, norm layers' parameters
    and learnable queries, as in pretraining and fine-tuning (decaying a LayerNorm's gain or the attention probe's
    query pulls them towards 0, which no probe protocol intends)."""
    from ecgfm.optim import adamw, param_groups

    return adamw(param_groups(net, weight_decay), lr=lr)


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
        seed: torch seed for the initialisation and the dropout (on a fork of the global RNG: the caller's random
            state is left as it was).
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
            labels_val: np.ndarray | None = None, val_score: Any = None) -> "MLPProbe":
        """Fit on ``x (n, D)``, ``labels (n, C)``; early-stop on the validation macro AUROC: ``val_score(probe)``
        when given (e.g. the record-level AUROC of window predictions averaged per record, the number the
        probe is chosen and reported on), else the AUROC of the rows ``(x_val, labels_val)``."""
        from ecgfm.heads import MLPHead

        # Full-batch steps on a few thousand x a few hundred numbers: one thread is faster than several and
        # immune to OpenMP oversubscription on a shared machine (measured: 0.9 s vs 53 s on a loaded 2-core box).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(x, labels, x_val, labels_val, MLPHead, val_score)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, x: np.ndarray, labels: np.ndarray, x_val: np.ndarray | None, labels_val: np.ndarray | None,
             MLPHead: Any, val_score: Any = None) -> "MLPProbe":
        # seeded on a fork of the global RNG: the caller's torch random state is left as it was
        with _seeded_rng(self.seed):
            return self._train(x, labels, x_val, labels_val, MLPHead, val_score)

    def _train(self, x: np.ndarray, labels: np.ndarray, x_val: np.ndarray | None, labels_val: np.ndarray | None,
               MLPHead: Any, val_score: Any = None) -> "MLPProbe":
        self.scaler.fit(x)
        xt = torch.from_numpy(self.scaler.transform(x).astype(np.float32))
        n_classes = labels.shape[1]
        self.net = MLPHead(x.shape[1], n_classes, hidden_dim=self.hidden_dim, num_layers=2, dropout=self.dropout,
                           batch_norm=len(x) > 1)
        if self.multilabel:
            yt = torch.from_numpy(labels.astype(np.float32))
            loss_fn = torch.nn.BCEWithLogitsLoss()
        else:
            yt = torch.from_numpy(check_single_label(labels, where="MLPProbe.fit labels"))
            loss_fn = torch.nn.CrossEntropyLoss()
        opt = _adamw(self.net, self.lr, self.weight_decay)
        stop = _BestOnValidation(self.net, self.patience)
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            opt.zero_grad()
            loss = loss_fn(self.net(xt), yt)
            loss.backward()
            opt.step()
            if epoch % self.eval_every == 0 and (val_score is not None or
                                                 (x_val is not None and labels_val is not None)):
                score = val_score(self) if val_score is not None else macro_auroc(labels_val, self._probs(x_val))
                if stop.update(score, epoch):
                    break
        if stop.restore():
            self.best_val = stop.best
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("MLPProbe.predict_proba called before fit")
        return self._probs(x)


class AttentionProbe:
    """:class:`ecgfm.heads.AttentionPoolingHead` on the frozen tokens of whole records (see the module docstring).

    Records are batches of variable length: a batch of ``B`` records is padded to its longest record ``T_max``
    (``B x T_max x D`` float32 in memory) with a key padding mask. AdamW on shuffled minibatches (order from a
    generator seeded with ``seed``); after each epoch the validation macro AUROC decides early stopping and the
    weights kept.

    Args:
        multilabel: BCE with sigmoids (else cross-entropy with softmax).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        num_queries: learnable queries of the head.
        num_heads: attention heads (must divide the token width).
        epochs: maximum epochs.
        batch_size: records per step.
        patience: epochs without validation improvement before stopping.
        dropout: attention dropout.
        seed: torch seed of the initialisation and the batch order (on a fork of the global RNG: the caller's
            random state is left as it was).
        device: torch device of the head.
    """

    def __init__(self, multilabel: bool, lr: float = 1e-3, weight_decay: float = 0.01, num_queries: int = 1,
                 num_heads: int = 4, epochs: int = 30, batch_size: int = 64, patience: int = 5,
                 dropout: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"):
        self.multilabel = multilabel
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.num_queries, self.num_heads, self.dropout = int(num_queries), int(num_heads), float(dropout)
        self.epochs, self.batch_size, self.patience = int(epochs), int(batch_size), int(patience)
        self.seed, self.device = int(seed), torch.device(device)
        self.net: torch.nn.Module | None = None
        self.best_val = float("nan")
        self.best_epoch = 0

    @staticmethod
    def _records(ts: TokenSet, rows: np.ndarray) -> list[np.ndarray]:
        """float16 ``(K_r, D)`` token arrays of ``rows`` (views of the token set, no copy: with the memory-mapped
        token cache nothing is read until a minibatch needs it)."""
        bounds = ts.record_offsets()[np.asarray(rows, dtype=np.int64)]
        empty = bounds[:, 1] <= bounds[:, 0]
        if empty.any():
            raise ValueError(f"records without tokens (skipped for non-finite values?): cache rows "
                             f"{np.asarray(rows)[empty][:10].tolist()}")
        return [ts.tokens[a:b] for a, b in bounds]

    def _batch(self, recs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to ``(B, T_max, D)`` float32 and the ``(B, T_max)`` padding mask (True = padding)."""
        lengths = torch.tensor([len(r) for r in recs])
        x = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(np.array(r)) for r in recs], batch_first=True).float()
        pad = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
        return x.to(self.device), pad.to(self.device)

    def _probs_of(self, recs: list[np.ndarray]) -> np.ndarray:
        assert self.net is not None
        self.net.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(recs), self.batch_size):
                logits = self.net(*self._batch(recs[i:i + self.batch_size]))
                out.append(torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1))
        return torch.cat(out).double().cpu().numpy()

    def fit(self, ts: TokenSet, rows: np.ndarray, labels: np.ndarray, val_rows: np.ndarray | None = None,
            labels_val: np.ndarray | None = None) -> "AttentionProbe":
        """Train on the records ``rows`` (cache rows of ``ts``) with ``labels (len(rows), C)``; early-stop on
        ``(val_rows, labels_val)`` macro AUROC when given (else train ``epochs`` epochs)."""
        from ecgfm.heads import AttentionPoolingHead

        if self.num_heads < 1 or ts.dim % self.num_heads:
            raise ValueError(f"probe.attention.num_heads={self.num_heads} must divide the token width {ts.dim} of "
                             f"this encoder")
        # seeded on a fork of the global RNG: the caller's torch random state is left as it was
        with _seeded_rng(self.seed, self.device):
            return self._train(ts, rows, labels, val_rows, labels_val, AttentionPoolingHead)

    def _train(self, ts: TokenSet, rows: np.ndarray, labels: np.ndarray, val_rows: np.ndarray | None,
               labels_val: np.ndarray | None, AttentionPoolingHead: Any) -> "AttentionProbe":
        gen = torch.Generator().manual_seed(self.seed)
        recs = self._records(ts, rows)
        val = self._records(ts, val_rows) if val_rows is not None and labels_val is not None else None
        n_classes = labels.shape[1]
        self.net = AttentionPoolingHead(ts.dim, n_classes, num_queries=self.num_queries, num_heads=self.num_heads,
                                        dropout=self.dropout).to(self.device)
        if self.multilabel:
            y = torch.from_numpy(labels.astype(np.float32))
            loss_fn: torch.nn.Module = torch.nn.BCEWithLogitsLoss()
        else:
            y = torch.from_numpy(check_single_label(labels, where="AttentionProbe.fit labels"))
            loss_fn = torch.nn.CrossEntropyLoss()
        opt = _adamw(self.net, self.lr, self.weight_decay)
        stop = _BestOnValidation(self.net, self.patience)
        t0 = time.perf_counter()
        epoch = 0
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            for idx in torch.randperm(len(recs), generator=gen).split(self.batch_size):
                x, pad = self._batch([recs[i] for i in idx.tolist()])
                opt.zero_grad()
                loss = loss_fn(self.net(x, pad), y[idx].to(self.device))
                loss.backward()
                opt.step()
            if val is not None and stop.update(macro_auroc(labels_val, self._probs_of(val)), epoch):
                break
        if stop.restore():
            self.best_val, self.best_epoch = stop.best, stop.best_epoch
        log.info("attention probe lr %g, weight decay %g: %d epoch(s) in %.1f s, best validation macro AUROC %.4f "
                 "(epoch %d)", self.lr, self.weight_decay, epoch, time.perf_counter() - t0, self.best_val,
                 self.best_epoch)
        return self

    def predict_proba(self, ts: TokenSet, rows: np.ndarray) -> np.ndarray:
        """Record probabilities ``(len(rows), C)`` of cache rows ``rows`` of ``ts``."""
        if self.net is None:
            raise RuntimeError("AttentionProbe.predict_proba called before fit")
        return self._probs_of(self._records(ts, rows))


@dataclass
class ProbeData:
    """What a probe needs from a task: features, labels, splits.

    Attributes:
        features: the frozen window features of the task's corpus (a :class:`TokenSet` for the attention probe).
        labels: ``(N, C)`` float indicators for every cache row (rows outside the splits are ignored).
        splits: ``{"train", "val", "test"}`` -> cache rows.
        multilabel: multi-label task.
        class_names: ``C`` names.
        patient_ids: length-``N`` patient ids (None: each record is its own patient).
        external: optional ``{name: (FeatureSet or TokenSet, labels (M, C), rows)}`` evaluated without retraining.
        name: the task's name, for messages (None: "the task").
        missing_groups: ``((value columns, indicator column), ...)`` of the feature columns whose values are
            placeholders where the indicator is set (the handcrafted features:
            :func:`ecgfm.evaluate.handcrafted.missing_groups`); imputed per training subset with the training
            medians (:class:`GroupMedianImputer`). Empty: no imputation.
    """

    features: FeatureSet | TokenSet
    labels: np.ndarray
    splits: dict[str, np.ndarray]
    multilabel: bool
    class_names: list[str]
    patient_ids: Sequence[Any] | None = None
    external: dict[str, tuple[FeatureSet | TokenSet, np.ndarray, np.ndarray]] = field(default_factory=dict)
    name: str | None = None
    missing_groups: Sequence[tuple[Sequence[int], int]] = ()


def check_probe_splits(data: ProbeData) -> None:
    """The splits a probe is given, checked before anything is fitted: the task builders make them right
    (:mod:`ecgfm.evaluate.tasks`), but :func:`run_probe_grid` is public, and a test split inside the training one
    scored 1.0 on noise, a test record listed twice narrowed its CI, and a record without windows (skipped for
    non-finite input, or not extracted) was fitted and scored as an all-zero embedding.

    Args:
        data: the probe's inputs (``splits`` train / val / test).

    Raises:
        ValueError: a split listing a record twice, a record or a (known) patient in two splits
            (:func:`ecgfm.data.splits.assert_disjoint_patients`), or a split record without windows (use
            :meth:`FeatureSet.valid_rows`), naming the rows.
    """
    n = len(data.labels)
    parts = {k: np.asarray(data.splits[k], dtype=np.int64).ravel() for k in ("train", "val", "test")}
    for part, rows in parts.items():
        values, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"split {part!r} lists record(s) {values[counts > 1][:10].tolist()} more than once")
    assert_disjoint_patients(parts, data.patient_ids if data.patient_ids is not None else [None] * n)
    if isinstance(data.features, FeatureSet):
        has = np.bincount(data.features.record, minlength=data.features.n_records) > 0
        for part, rows in parts.items():
            empty = rows[~has[rows]]
            if len(empty):
                raise ValueError(f"split {part!r}: record(s) {empty[:10].tolist()} have no windows in the features "
                                 f"(skipped for non-finite input, or not extracted): leave them out of the split "
                                 f"(FeatureSet.valid_rows)")


def _design(fs: FeatureSet, labels: np.ndarray, rows: np.ndarray, aggregate: str, means: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Training matrix: record rows of :func:`record_matrix` (``(len(rows), D)`` or ``2D``) or every window
    ``(w, D)`` with its record's labels."""
    if aggregate in RECORD_AGGREGATIONS:
        assert means is not None
        return means[rows], labels[rows]
    x, pos = fs.windows_of(rows)
    return x, labels[rows][pos]


def _predict_records(model: Any, fs: FeatureSet | TokenSet, rows: np.ndarray, aggregate: str,
                     means: np.ndarray | None) -> np.ndarray:
    """Record-level probabilities ``(len(rows), C)``: on the record features, the mean of window predictions, or
    the attention probe on the record's tokens."""
    if isinstance(model, AttentionProbe):
        assert isinstance(fs, TokenSet)
        return model.predict_proba(fs, rows)
    if aggregate in RECORD_AGGREGATIONS:
        assert means is not None
        return model.predict_proba(means[rows])
    x, pos = fs.windows_of(rows)
    counts = np.bincount(pos, minlength=len(rows))
    if (counts == 0).any():   # a record skipped for non-finite input: no windows, no prediction (not 0 for all)
        raise ValueError(f"records {np.asarray(rows)[counts == 0][:5].tolist()} (cache rows) have no windows in the "
                         f"feature set (skipped for non-finite input?); predict on FeatureSet.valid_rows only")
    p = model.predict_proba(x)
    out = np.zeros((len(rows), p.shape[1]))
    np.add.at(out, pos, p)
    return out / counts[:, None]


def _imputed(fs: FeatureSet, imputer: GroupMedianImputer, aggregate: str, means: np.ndarray | None
             ) -> tuple[FeatureSet, np.ndarray | None]:
    """``fs`` with its flagged groups imputed (:class:`GroupMedianImputer`) and its :func:`record_matrix`; the
    inputs themselves (no copy, the same numbers) when no row of ``fs`` is flagged."""
    x = imputer.transform(fs.features)
    if x is fs.features:
        return fs, means
    out = dataclasses.replace(fs, features=x)
    return out, record_matrix(out, aggregate)


def _hp_name(hp: Any) -> str:
    """Key of a head in the ``grid`` of a result: ``"0.01"`` (C or lr), ``"lr=0.001,wd=0.01"`` (attention)."""
    return f"lr={hp[0]:g},wd={hp[1]:g}" if isinstance(hp, tuple) else f"{hp:g}"


def run_probe_grid(data: ProbeData, fractions: Sequence[float], seeds: Sequence[int], mode: str = "linear",
                   Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0), lrs: Sequence[float] = (1e-3,),
                   aggregate: str = "mean_embedding", n_boot: int = 1000, bootstrap_seed: int = 0,
                   max_iter: int = 1000, mlp_kwargs: dict[str, Any] | None = None, min_per_class: int = 1,
                   blas_threads: int | None = 1, attention_kwargs: dict[str, Any] | None = None
                   ) -> list[dict[str, Any]]:
    """Train heads for every (fraction, seed) on one feature set; choose the hyper-parameter on validation.

    For each (fraction, seed): the training subset is drawn with
    :func:`~ecgfm.evaluate.fractions.fraction_subsets` (stratified, patient-level, nested, the same for every
    method); one head per ``C`` (linear), learning rate (MLP) or (learning rate, weight decay) pair (attention)
    is trained; the one with the best validation macro AUROC is kept; thresholds for F1 are chosen on
    validation; test (and every external set) is scored with bootstrap CIs.

    ``mode="attention"`` needs ``data.features`` (and every external set) as a
    :class:`~ecgfm.evaluate.features.TokenSet`; ``attention_kwargs`` holds ``lrs`` and ``weight_decays`` (the
    grid) and the other :class:`AttentionProbe` arguments (``num_queries``, ``num_heads``, ``epochs``,
    ``batch_size``, ``patience``, ``dropout``, ``device``); ``aggregate`` must stay ``"mean_embedding"``.

    ``blas_threads`` caps the BLAS / OpenMP threads while the heads train (threadpoolctl): these problems are
    small (records x features), so one thread is as fast and immune to oversubscription; None leaves them.

    ``data.missing_groups`` (the handcrafted features): per (fraction, seed), a :class:`GroupMedianImputer` is
    fitted on that training subset's rows and applied to the training, validation, test and external features
    before any head sees them.

    Returns:
        One dict per (fraction, seed) with ``fraction``, ``seed``, ``n_train``, ``hparam``, ``val_macro_auroc``,
        ``grid`` (validation AUROC of every head), ``not_converged`` (the ``C`` values of the grid whose linear
        probe did not converge, see :attr:`LinearProbe.converged`; always empty for the trained probes), ``test``
        (metrics, see
        :func:`~ecgfm.evaluate.metrics.evaluate_scores`), ``external`` (name -> metrics), ``predictions``
        (split -> (cache rows, record probabilities)), ``seconds``, the chosen ``model`` and its ``thresholds``,
        and ``imputer`` (the fitted :class:`GroupMedianImputer` the model's inputs went through, None without
        ``data.missing_groups``).

    Raises:
        ValueError: bad settings or data (the aggregation, the mode, the splits, the labels; ``missing_groups``
            with the attention probe or naming a column the features lack).
    """
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=int(blas_threads)):
            return run_probe_grid(data, fractions, seeds, mode, Cs, lrs, aggregate, n_boot, bootstrap_seed,
                                  max_iter, mlp_kwargs, min_per_class, blas_threads=None,
                                  attention_kwargs=attention_kwargs)
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if mode not in MODES:
        raise ValueError(f"probe mode must be one of {MODES}, got {mode!r}")
    att = dict(attention_kwargs or {})
    grid_hps: list[Any] = list(Cs) if mode == "linear" else list(lrs)
    if mode == "attention":
        if aggregate != "mean_embedding":
            raise ValueError(f"the attention probe pools a record's tokens itself; aggregate must stay "
                             f"'mean_embedding', got {aggregate!r}")
        sets = [("the task", data.features)] + [(k, v[0]) for k, v in data.external.items()]
        for name, s in sets:
            if not isinstance(s, TokenSet):
                raise ValueError(f"mode='attention' needs frozen tokens (a TokenSet from cached_tokens) for "
                                 f"{name}, got {type(s).__name__}")
        att_lrs, att_wds = list(att.pop("lrs", [1e-3])), list(att.pop("weight_decays", [0.01]))
        if not att_lrs or not att_wds:
            raise ValueError("the attention probe needs at least one learning rate and one weight decay")
        grid_hps = [(float(lr), float(wd)) for lr in att_lrs for wd in att_wds]
    elif not isinstance(data.features, FeatureSet):
        raise ValueError(f"mode={mode!r} needs window embeddings (a FeatureSet), got {type(data.features).__name__}")
    for part in ("train", "val", "test"):
        if part not in data.splits or len(data.splits[part]) == 0:
            from ecgfm.evaluate.tasks import SPLIT_NAMES

            spelt = " / ".join([part, *sorted(k for k, v in SPLIT_NAMES.items() if v == part)])
            why = " (the probe chooses its hyper-parameter and F1 thresholds on them)" if part == "val" else ""
            task = f"task {data.name}" if data.name else "the task"
            raise ConfigError("task.split", f"{task} has no {part!r} records{why}: give the split one (a split "
                                            f"column needs labelled rows marked {spelt}; folds need {part} folds "
                                            f"holding labelled records; a stratified split draws all three)")
    check_probe_splits(data)
    fs, labels = data.features, np.asarray(data.labels, dtype=np.float32)
    if not data.multilabel:   # every row used must be one-hot (rows outside the splits are ignored)
        for part in ("train", "val", "test"):
            check_single_label(labels, data.splits[part], where=f"split {part!r}")
        for name, (_, elabels, erows) in data.external.items():
            check_single_label(elabels, erows, where=f"external set {name!r}")
    check_validation_defined(labels[np.asarray(data.splits["val"], dtype=np.int64)], where="split 'val'",
                             class_names=data.class_names,
                             purpose=f"the probe's {'C' if mode == 'linear' else 'hyper-parameter'} is chosen on it")
    tokens = mode == "attention"
    means = None if tokens else record_matrix(fs, aggregate)
    ext_means = {k: (None if tokens else record_matrix(v[0], aggregate)) for k, v in data.external.items()}
    groups = list(data.missing_groups or ())
    if groups:
        if tokens:
            raise ValueError("missing_groups imputes columns of feature rows; mode='attention' reads frozen tokens: "
                             "give the attention probe no missing_groups")
        widths = [("the task's features", fs.dim)] + [(f"external set {k!r}", v[0].dim)
                                                       for k, v in data.external.items()]
        for name, dim in widths:
            GroupMedianImputer(groups).check_width(dim, name)
    train, val, test = (np.asarray(data.splits[k], dtype=np.int64) for k in ("train", "val", "test"))
    y_val = labels[val]
    results = []
    for seed in seeds:
        subsets = fraction_subsets(train, labels if data.multilabel else labels.argmax(axis=1),
                                   data.patient_ids, fractions, seed=int(seed), min_per_class=min_per_class)
        for frac in fractions:
            t0 = time.perf_counter()
            rows = subsets[float(frac)]
            # flagged feature groups: imputed with this training subset's medians (training rows only)
            imputer = GroupMedianImputer(groups).fit(fs.windows_of(rows)[0]) if groups else None
            fs_f, means_f = _imputed(fs, imputer, aggregate, means) if imputer is not None else (fs, means)
            ext_f = {k: (_imputed(v[0], imputer, aggregate, ext_means[k]) if imputer is not None
                         else (v[0], ext_means[k])) for k, v in data.external.items()}
            x_tr, y_tr = (None, labels[rows]) if tokens else _design(fs_f, labels, rows, aggregate, means_f)
            grid: dict[str, float] = {}
            not_converged: list[float] = []
            best: tuple[float, Any, Any] | None = None
            for hp in grid_hps:
                if mode == "linear":
                    model = LinearProbe(data.multilabel, C=hp, max_iter=max_iter, seed=int(seed)).fit(x_tr, y_tr)
                    if not model.converged:
                        not_converged.append(float(hp))
                elif mode == "mlp":
                    model = MLPProbe(data.multilabel, lr=hp, seed=int(seed), **(mlp_kwargs or {}))
                    # early stopping on the record-level validation AUROC, the number the lr is chosen on (with
                    # mean_prediction, the validation windows' AUROC would weigh records by their window count)
                    model.fit(x_tr, y_tr, val_score=lambda m: macro_auroc(
                        labels[val], _predict_records(m, fs_f, val, aggregate, means_f)))
                else:
                    model = AttentionProbe(data.multilabel, lr=hp[0], weight_decay=hp[1], seed=int(seed), **att)
                    assert isinstance(fs, TokenSet)
                    model.fit(fs, rows, y_tr, val, y_val)
                p_val = _predict_records(model, fs_f, val, aggregate, means_f)
                auc = macro_auroc(labels[val], p_val)
                grid[_hp_name(hp)] = float(auc)
                score = auc if np.isfinite(auc) else -np.inf
                if best is None or score > best[0]:
                    best = (score, model, hp)
            assert best is not None
            _, model, hp = best
            if isinstance(model, LinearProbe) and not model.converged:
                log.warning("linear probe: the chosen C=%g (fraction %g, seed %d) did not converge (L-BFGS stopped "
                            "after %d of max_iter=%d iterations, or failed its line search); its validation AUROC "
                            "%.4f may understate it: raise probe.max_iter", float(hp), float(frac), int(seed),
                            model.n_iter, model.max_iter, float(grid[_hp_name(hp)]))
            p_val = _predict_records(model, fs_f, val, aggregate, means_f)
            thresholds = choose_thresholds(labels[val], p_val) if data.multilabel else None
            y_test = labels[test] if data.multilabel else labels[test].argmax(axis=1)
            p_test = _predict_records(model, fs_f, test, aggregate, means_f)
            metrics = evaluate_scores(y_test, p_test, data.multilabel, data.class_names, thresholds,
                                      n_boot=n_boot, seed=bootstrap_seed)
            external = {}
            predictions = {"test": (test, p_test)}
            for name, (_, elabels, erows) in data.external.items():
                erows = np.asarray(erows, dtype=np.int64)
                efs, emeans = ext_f[name]
                p_ext = _predict_records(model, efs, erows, aggregate, emeans)
                y_ext = elabels[erows] if data.multilabel else elabels[erows].argmax(axis=1)
                external[name] = evaluate_scores(y_ext, p_ext, data.multilabel, data.class_names, thresholds,
                                                 n_boot=n_boot, seed=bootstrap_seed)
                predictions[name] = (erows, p_ext)
            results.append({
                "fraction": float(frac), "seed": int(seed), "n_train": int(len(rows)), "train_rows": rows,
                "n_val": int(len(val)), "n_test": int(len(test)),
                "hparam": ({"lr": hp[0], "weight_decay": hp[1]} if mode == "attention"
                           else {"C" if mode == "linear" else "lr": float(hp)}),
                "val_macro_auroc": float(grid[_hp_name(hp)]), "grid": grid, "not_converged": not_converged,
                "test": metrics, "external": external,
                "predictions": predictions, "seconds": time.perf_counter() - t0,
                "model": model, "thresholds": thresholds,   # the chosen probe (a classifier artifact on request)
                "imputer": imputer,                         # its inputs' imputation (None: none)
            })
    return results
