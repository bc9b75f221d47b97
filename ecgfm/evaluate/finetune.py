"""Full fine-tuning (and supervised training from scratch) with Lightning.

:class:`FinetuneModule` = backbone + a linear (or MLP) head, trained on random crops with

* :mod:`ecgfm.optim`'s AdamW, linear warm-up then cosine decay (per step);
* layer-wise learning-rate decay (BEiT / MAE fine-tuning): a parameter of layer ``l`` gets
  ``lr * layer_decay ** (top - l)``, layers from the backbone (``Backbone.layer_id``). ViT-1D: patch / lead / SEP
  embeddings are layer 0, block ``i`` is layer ``i + 1``, the final norm and the head share the top, ``depth + 1``
  (MAE's ``param_groups_lrd``: the last block is one decay step below the head).
  XResNet1d: the stem is layer 0, stage ``i`` is layer ``i + 1``, the head is the top ("per-stage" decay).
  Biases, 1-D parameters, norm / embedding layers and token / embedding parameters (ViT-1D's ``lead_embed``,
  :data:`FINETUNE_NO_DECAY_NAMES` = :data:`ecgfm.optim.NO_DECAY_NAMES`) get no weight decay;
* absent leads (``lead_aware``, default): a backbone whose ``embed`` takes ``lead_mask`` (ViT-1D) gets each batch's
  record lead mask in training, validation and test, as frozen-feature extraction does with
  ``features.lead_aware=true`` (absent leads become no tokens instead of zero-signal tokens); other backbones
  (the CNNs) see the zero-padded 12-lead input;
* validation after every epoch (one centred crop per record, or whole records with ``val_sliding=True``), early
  stopping on validation macro AUROC (Lightning ``EarlyStopping``), and the best epoch's weights restored
  (kept in memory: no pickled checkpoint is written or read);
* final validation (for the F1 thresholds) and test predictions on whole records: sliding windows, the window
  outputs aggregated per record as ``window_aggregate`` says: by default (``"logit"``) the mean window logit,
  then the sigmoid / softmax; with ``"prob"`` the mean window probability (the PTB-XL benchmark's test-time
  aggregation).
* bad labels are refused before any work: a single-label task needs exactly one positive in every label row it
  uses (train / val / test), and validation must hold at least one class with both positive and negative records
  (otherwise the validation macro AUROC, which early stopping, the best-weights restore and the LP-FT probe's
  ``C`` are chosen on, is undefined).

**Frozen backbone** (``FinetuneModule(freeze_backbone=True)``): the backbone's parameters get no gradient and
the backbone stays in eval mode whatever ``train()`` is called with, so BatchNorm running statistics do not
change and dropout is off: the head trains on the same features the frozen encoder gives at evaluation.

**Head initialisation** (``head_init``): ``"lp"`` is LP-FT (Kumar et al. 2022, "Fine-tuning can distort
pretrained features and underperform out-of-distribution"): the linear head starts as a linear probe fitted on the
frozen encoder's features of the training split (:func:`fit_probe_head`: record mean embeddings or every window,
``lp_features``, after a random-init network's never-estimated BatchNorm running statistics were computed on the
training crops, :func:`recalibrate_batchnorm`, so that the probe sees the features fine-tuning's train-mode
forward computes), and
those initial weights are a
candidate of the best-weights restore (validated before the first step, ``best_epoch == -1``), so fine-tuning
keeps the probe when no epoch beats it on validation. ``"random"`` is the usual randomly initialised head (the
supervised-from-scratch recipe). With a random head on a small labelled set the first steps back-propagate the
gradients of an arbitrary head into the pretrained features and distort them (measured on this project's real
benchmark: ViT-1D fine-tunes below its own linear probe).

Multi-label: ``BCEWithLogits``, sigmoid probabilities; single-label: cross-entropy, softmax.
:func:`run_finetune` trains one model with a :class:`ecgfm.recipes.FinetuneRecipe` (the one place the recipe's
defaults live) and returns record-level validation and test probabilities; thresholds and metrics are computed by
the caller (:mod:`ecgfm.evaluate.sweep`). It logs one line per epoch (:class:`EpochProgress`) and keeps Lightning's
own start-up chatter out of the console (:func:`quiet_lightning`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from ecgfm.data.datamodules import DownstreamDataModule
from ecgfm.evaluate.batchnorm import (never_estimated, random_init_batchnorm_statistics,  # noqa: F401
                                      recalibrate_batchnorm)  # (re-exported: their home before 2026-12-07)
from ecgfm.evaluate.features import accepts_lead_mask, cached_features, extract_features
from ecgfm.evaluate.metrics import macro_auroc
from ecgfm.evaluate.probe import LinearProbe, check_single_label, check_validation_defined
from ecgfm.heads import MLPHead
from ecgfm.optim import NO_DECAY_NAMES, lightning_optimizers, param_groups
from ecgfm.recipes import (HEAD_INITS, LP_CS, LP_FEATURES, WINDOW_AGGREGATES, FeaturesConfig, FinetuneRecipe,
                           as_finetune_recipe)

log = logging.getLogger(__name__)
VAL_METRIC = "val/macro_auroc"
# HEAD_INITS, WINDOW_AGGREGATES (accepted values of finetune.head_init / window_aggregate) and LP_CS (the L2 grid of
# the head-initialising linear probe) live in ecgfm.recipes, re-exported here.
#: logit given to a class the probe can never predict (absent from a single-label training subset, or a
#: multi-label class constant on it): exp(-1e4) underflows to exactly 0 in float32, as the probe's 0 / 1.
_NEVER = 1.0e4
#: Parameter names (last component) fine-tuning exempts from weight decay beyond biases, 1-D parameters and norm /
#: embedding layers: those of pretraining (:data:`ecgfm.optim.NO_DECAY_NAMES`), so ViT-1D's learned ``lead_embed``
#: (and any ``pos_embed`` / token) is not decayed, as MAE fine-tuning exempts ``pos_embed``. (Fine-tuning results
#: before 2026-12-05 decayed ``lead_embed``: ``FINETUNE_NO_DECAY_NAMES`` was empty.)
FINETUNE_NO_DECAY_NAMES: tuple[str, ...] = NO_DECAY_NAMES


class FinetuneModule(L.LightningModule):
    """Backbone + classification head for fine-tuning.

    The recipe arguments default to :class:`ecgfm.recipes.FinetuneRecipe`'s values (one default per setting);
    :meth:`from_recipe` builds the module from a recipe.

    Args:
        backbone: encoder (``embed (B, 12, T) -> (B, D)``), pretrained or randomly initialised.
        num_classes: ``C``.
        multilabel: sigmoid/BCE (else softmax/CE).
        lr: peak learning rate of the head (top layer).
        weight_decay: AdamW weight decay (not on 1-D parameters).
        layer_decay: layer-wise lr decay factor (1.0: none).
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        max_epochs: schedule length (cosine decay to 0 at the end).
        head: ``"linear"`` or ``"mlp"`` (:class:`ecgfm.heads.MLPHead`).
        freeze_backbone: train the head only (a linear probe trained end-to-end on crops): the backbone's
            parameters get no gradient and it stays in eval mode (see :meth:`train`), so its BatchNorm running
            statistics and weights are those it came with.
        window_aggregate: how window outputs make a record's prediction: ``"prob"`` (mean window probability,
            the PTB-XL benchmark's test-time aggregation) or ``"logit"`` (mean window logit, then the
            sigmoid / softmax: with a linear head this is the head applied to the record's mean window
            embedding, i.e. the linear probe's ``mean_embedding`` aggregation).
        lead_aware: pass each batch's ``lead_mask (B, 12)`` to a backbone whose ``embed`` accepts it
            (:func:`ecgfm.evaluate.features.accepts_lead_mask`), as lead-aware frozen features do; False (or a
            backbone without it): zero-padded 12-lead input.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, multilabel: bool, lr: float = FinetuneRecipe.lr,
                 weight_decay: float = FinetuneRecipe.weight_decay, layer_decay: float = FinetuneRecipe.layer_decay,
                 warmup_epochs: float = FinetuneRecipe.warmup_epochs, max_epochs: int = FinetuneRecipe.epochs,
                 head: str = FinetuneRecipe.head, freeze_backbone: bool = False,
                 window_aggregate: str = FinetuneRecipe.window_aggregate, lead_aware: bool = True):
        super().__init__()
        if window_aggregate not in WINDOW_AGGREGATES:
            raise ValueError(f"finetune.window_aggregate must be one of {WINDOW_AGGREGATES}, got {window_aggregate!r}")
        self.window_aggregate = window_aggregate
        self.backbone = backbone
        self.lead_aware = bool(lead_aware) and accepts_lead_mask(backbone)
        d = int(backbone.num_features)
        if head == "linear":
            self.head: nn.Module = nn.Linear(d, num_classes)
        elif head == "mlp":
            self.head = MLPHead(d, num_classes)
        else:
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
        self.multilabel = multilabel
        self.lr, self.weight_decay, self.layer_decay = float(lr), float(weight_decay), float(layer_decay)
        self.warmup_epochs, self.max_epochs = float(warmup_epochs), int(max_epochs)
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
        self._val_probs: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self._val_y: list[torch.Tensor] = []

    @classmethod
    def from_recipe(cls, backbone: nn.Module, num_classes: int, multilabel: bool, recipe: FinetuneRecipe,
                    freeze_backbone: bool = False, lead_aware: bool = True) -> "FinetuneModule":
        """The module of a :class:`~ecgfm.recipes.FinetuneRecipe` (its lr, weight decay, layer decay, warm-up,
        epochs, head and window aggregation)."""
        return cls(backbone, num_classes, multilabel, lr=recipe.lr, weight_decay=recipe.weight_decay,
                   layer_decay=recipe.layer_decay, warmup_epochs=recipe.warmup_epochs, max_epochs=recipe.epochs,
                   head=recipe.head, freeze_backbone=freeze_backbone, window_aggregate=recipe.window_aggregate,
                   lead_aware=lead_aware)

    def train(self, mode: bool = True) -> "FinetuneModule":
        """Set the training mode; a frozen backbone (``freeze_backbone=True``) stays in eval mode.

        Turning ``requires_grad`` off is not enough to freeze an encoder: in train mode its BatchNorm layers would
        still update their running statistics from the training batches, and dropout would be active. (Lightning
        then warns that modules are in eval mode at the start of training: intended here.)

        Args:
            mode: training mode of the head (and of the backbone when it is not frozen).

        Returns:
            ``self``.
        """
        super().train(mode)
        if getattr(self, "freeze_backbone", False):
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 12, T)`` (and the records' ``lead_mask (B, 12)`` bool, used when :attr:`lead_aware`) ->
        ``(B, C)`` logits."""
        if self.lead_aware and lead_mask is not None:
            return self.head(self.backbone.embed(x, lead_mask=lead_mask.to(x.device)))
        return self.head(self.backbone.embed(x))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def window_outputs(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 12, T)`` (and ``lead_mask (B, 12)``) ``-> (B, C)``: what is averaged over a record's windows
        (probabilities or logits)."""
        logits = self(x, lead_mask)
        return logits if self.window_aggregate == "logit" else self.probs(logits)

    def record_probs(self, mean_outputs: np.ndarray) -> np.ndarray:
        """``(R, C)`` mean window outputs -> ``(R, C)`` record probabilities."""
        if self.window_aggregate == "prob":
            return mean_outputs
        return self.probs(torch.from_numpy(np.asarray(mean_outputs, dtype=np.float64))).numpy()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits, y.float())
        return nn.functional.cross_entropy(logits, y.long())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["x"], batch.get("lead_mask")), batch["y"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_probs, self._val_index, self._val_y = [], [], []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val_probs.append(self.window_outputs(batch["x"], batch.get("lead_mask")).detach().cpu())
        self._val_index.append(batch["index"].cpu())
        self._val_y.append(batch["y"].cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        p, y = aggregate_windows(torch.cat(self._val_probs).double().numpy(), torch.cat(self._val_index).numpy(),
                                 torch.cat(self._val_y).numpy())[1:]
        p = self.record_probs(p)
        auc = macro_auroc(y, p)
        self.log(VAL_METRIC, float(auc) if np.isfinite(auc) else 0.0, prog_bar=True)

    def configure_optimizers(self) -> Any:
        """AdamW with layer-wise lr decay and the per-step warm-up cosine schedule of :mod:`ecgfm.optim`
        (warm-up ``warmup_epochs``, cosine to 0 at the trainer's estimated number of optimiser steps)."""
        groups = param_groups(self, self.weight_decay, lr=self.lr, layer_decay=self.layer_decay,
                              no_decay_names=FINETUNE_NO_DECAY_NAMES)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or self.max_epochs))
        warm = int(round(self.warmup_epochs * per_epoch))
        return lightning_optimizers(groups, self.lr, warm, total, trainer=self.trainer)


class BestWeights(L.Callback):
    """Keep (in memory) the weights of the epoch with the best validation metric; restore them at the end.

    A ``trainer.validate`` call before ``trainer.fit`` makes the initial weights a candidate (``best_epoch == -1``).
    """

    def __init__(self, monitor: str = VAL_METRIC):
        self.monitor = monitor
        self.best = -math.inf
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            # a validation run before fit (trainer.validate) scores the initial weights: epoch -1
            self.best_epoch = int(trainer.current_epoch) if trainer.state.fn == "fit" else -1
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.state_dict().items()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


def _epoch_name(epoch: int) -> str:
    """A :class:`BestWeights` epoch (0-based; -1 the LP-FT initial weights) as printed (1-based)."""
    return "the LP init" if epoch < 0 else f"epoch {epoch + 1}"


class EpochProgress(L.Callback):
    """One log line per fine-tuning epoch, e.g.
    ``epoch 3/30: train loss 0.412, val macro AUROC 0.812 (best 0.820 @ epoch 2)``.

    The train loss is the mean over the epoch's steps; the validation metric and the best so far are those of
    ``best`` (the :class:`BestWeights` that restores them, listed before this callback).

    Args:
        best: the run's :class:`BestWeights`.
        val_name: how the validation split is named (e.g. ``"val (30 records, whole-record windows)"``).
        logger: where the lines go.
    """

    def __init__(self, best: BestWeights, val_name: str = "val", logger: logging.Logger | None = None):
        self.best = best
        self.val_name = val_name
        self._logger = logger or log
        self._losses: list[float] = []
        self.lines: list[str] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._losses = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            self._losses.append(float(loss))

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        self._logger.info("%s", line)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(VAL_METRIC)
        metric = "n/a" if value is None else f"{float(value):.3f}"
        if trainer.state.fn != "fit":  # trainer.validate before fit: the LP-FT initial weights
            self._emit(f"LP init: {self.val_name} macro AUROC {metric} (the weights to beat)")
            return
        loss = f"{sum(self._losses) / len(self._losses):.3f}" if self._losses else "n/a"
        self._emit(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: train loss {loss}, {self.val_name} "
                   f"macro AUROC {metric} (best {self.best.best:.3f} @ {_epoch_name(self.best.best_epoch)})")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's INFO chatter ("GPU available", tips, "Trainer.fit stopped": printed twice under Hydra,
    by Lightning's own handler and the root logger's) and its pytree deprecation warning, restoring the logger
    levels afterwards. Lightning's warnings (``UserWarning``) still show."""
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def aggregate_windows(probs: np.ndarray, index: np.ndarray, y: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean window output per record.

    The outputs are whatever the caller averages: window logits with ``window_aggregate="logit"`` (the default;
    :meth:`FinetuneModule.record_probs` then applies the sigmoid / softmax to the mean logit) or window
    probabilities with ``"prob"`` (the mean is then the record probability).

    Args:
        probs: ``(W, C)`` window outputs (logits or probabilities).
        index: ``(W,)`` record of each window.
        y: ``(W, ...)`` window labels (a record's windows share them).

    Returns:
        ``(records (R,) sorted, mean outputs (R, C), labels (R, ...) or None)``.
    """
    records, inverse = np.unique(index, return_inverse=True)
    out = np.zeros((len(records), probs.shape[1]))
    np.add.at(out, inverse, probs)
    out /= np.bincount(inverse, minlength=len(records))[:, None]
    labels = None
    if y is not None:
        first = np.zeros(len(records), dtype=np.int64)
        first[inverse[::-1]] = np.arange(len(index))[::-1]
        labels = y[first]
    return records, out, labels


@torch.no_grad()
def predict_records(model: FinetuneModule, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Record-level probabilities over a sliding-window loader: ``(records (R,), probs (R, C))`` (window outputs
    averaged as ``model.window_aggregate`` says)."""
    model.eval()
    probs, index = [], []
    for batch in loader:
        mask = batch.get("lead_mask")
        probs.append(model.window_outputs(batch["x"].to(model.device), None if mask is None else mask.to(model.device))
                     .double().cpu().numpy())
        index.append(batch["index"].numpy())
    recs, p, _ = aggregate_windows(np.concatenate(probs), np.concatenate(index))
    return recs, model.record_probs(p)


def check_head_init(head_init: str, head: str = "linear") -> str:
    """Validate ``finetune.head_init`` (and that ``"lp"`` has a linear head to initialise).

    Raises:
        ValueError: naming the ``finetune.head_init`` key.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"finetune.head_init must be one of {HEAD_INITS}, got {head_init!r}")
    if head_init == "lp" and head != "linear":
        raise ValueError(f"finetune.head_init='lp' initialises a linear head from a linear probe; finetune.head is "
                         f"{head!r}: use head=linear or head_init=random")
    return head_init


@torch.no_grad()
def init_head_from_probe(head: nn.Linear, probe: Any) -> nn.Linear:
    """Copy a fitted :class:`ecgfm.evaluate.probe.LinearProbe` into ``head`` so that it gives the same predictions.

    The probe is ``StandardScaler`` + logistic regression; the scaler is folded into the weights
    (``W' = W / scale``, ``b' = b - W' @ mean``), so ``probs(head(x))`` (softmax, or per-class sigmoids) equals
    ``probe.predict_proba(x)`` for raw features ``x (n, D)``, up to float32 rounding.

    * single-label, ``K > 2`` classes seen in training: one softmax row per class (scikit-learn's multinomial
      ``coef_ (K, D)``); ``K == 2``: scikit-learn's single binary logit ``s`` becomes the symmetric pair
      ``(-s/2, s/2)`` (same softmax, balanced gradients); classes absent from training: a constant logit of
      ``-1e4`` (probability exactly 0, as the probe);
    * multi-label: one sigmoid per class from the ``OneVsRestClassifier`` estimators; a class constant on the
      training subset (scikit-learn's constant predictor) gets weight 0 and bias ``+-1e4`` (probability 1 / 0).

    Args:
        head: ``nn.Linear(D, C)``, overwritten in place.
        probe: a fitted ``LinearProbe`` (``_model`` = scaler + classifier pipeline).

    Returns:
        ``head``.
    """
    model = getattr(probe, "_model", None)
    if model is None:
        raise RuntimeError("init_head_from_probe: the probe is not fitted")
    scaler, clf = model.steps[0][1], model.steps[-1][1]
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    n_out, dim = head.weight.shape
    if len(mean) != dim:
        raise ValueError(f"the probe was fitted on {len(mean)} features, the head takes {dim}")
    w = np.zeros((n_out, dim))   # on standardised features
    b = np.zeros(n_out)
    if probe.multilabel:
        if len(clf.estimators_) != n_out:
            raise ValueError(f"the probe has {len(clf.estimators_)} classes, the head {n_out}")
        for c, est in enumerate(clf.estimators_):
            if hasattr(est, "coef_"):
                w[c], b[c] = est.coef_.ravel(), float(est.intercept_.ravel()[0])
            else:   # sklearn.multiclass._ConstantPredictor: the class was constant (0 or 1) in training
                b[c] = _NEVER if float(np.ravel(est.y_)[0]) > 0.5 else -_NEVER
    else:
        classes = np.asarray(clf.classes_, dtype=np.int64)
        if classes.max() >= n_out:
            raise ValueError(f"the probe saw class {classes.max()}, the head has {n_out} classes")
        b[:] = -_NEVER
        coef, icpt = np.asarray(clf.coef_, dtype=np.float64), np.asarray(clf.intercept_, dtype=np.float64)
        if len(classes) == 2:   # binary: one logit s = P(classes[1]) in log-odds
            w[classes[0]], b[classes[0]] = -coef[0] / 2, -icpt[0] / 2
            w[classes[1]], b[classes[1]] = coef[0] / 2, icpt[0] / 2
        else:
            w[classes], b[classes] = coef, icpt
    w_raw = w / scale[None, :]
    b_raw = b - w_raw @ mean
    head.weight.copy_(torch.from_numpy(w_raw).to(head.weight))
    head.bias.copy_(torch.from_numpy(b_raw).to(head.bias))
    return head


def aggregate_window_probabilities(p: np.ndarray, pos: np.ndarray, n_records: int, multilabel: bool,
                                   aggregate: str) -> np.ndarray:
    """Record probabilities from window probabilities of a linear model, as the fine-tuned model aggregates.

    ``"prob"``: the mean window probability. ``"logit"``: the sigmoid / softmax of the mean window logit,
    recovered from the probabilities (multi-label: ``logit(p)`` is the logit; single-label: ``log p`` is the logit
    minus a per-window constant, which the softmax of the mean removes).

    Args:
        p: ``(W, C)`` window probabilities.
        pos: ``(W,)`` record position of each window in ``[0, n_records)``.
        n_records: number of records.
        multilabel: sigmoid per class (else softmax).
        aggregate: ``"logit"`` or ``"prob"``.

    Returns:
        ``(n_records, C)`` record probabilities (a record without windows: zeros).
    """
    counts = np.maximum(np.bincount(pos, minlength=n_records), 1)[:, None]
    p = np.asarray(p, dtype=np.float64)
    if aggregate == "prob":
        out = np.zeros((n_records, p.shape[1]))
        np.add.at(out, pos, p)
        return out / counts
    q = np.clip(p, 1e-12, 1 - 1e-12)
    z = np.log(q) - np.log1p(-q) if multilabel else np.log(q)
    mean = np.zeros((n_records, p.shape[1]))
    np.add.at(mean, pos, z)
    mean /= counts
    if multilabel:
        return 1.0 / (1.0 + np.exp(-mean))
    mean -= mean.max(axis=1, keepdims=True)
    e = np.exp(mean)
    return e / e.sum(axis=1, keepdims=True)


def fit_probe_head(backbone: nn.Module, cache: Any, labels: np.ndarray, splits: dict[str, np.ndarray],
                   multilabel: bool, window: int, stride: int, Cs: Sequence[float] = LP_CS, seed: int = 0,
                   batch_size: int = 256, feature_dir: str | None = None,
                   aggregate: str = FinetuneRecipe.window_aggregate, lead_aware: bool = True,
                   features: str = FinetuneRecipe.lp_features) -> tuple[Any, dict[str, Any]]:
    """The linear probe that initialises the LP-FT head, on the frozen encoder's features.

    Choice (closed form rather than head-only epochs): the project's probe
    (:class:`ecgfm.evaluate.probe.LinearProbe`: standardise + L2 logistic regression, L-BFGS) is convex, so it
    reaches the optimum of the head-only problem with no learning-rate / epoch / batch-size grid, in seconds on
    these sizes, and it is the same model as the benchmark's linear-probe rows. It matches the fine-tuning
    evaluation's aggregation of window outputs, so that the initialised model *is* the probe at record level:

    ``features="records"`` with ``aggregate="logit"``: the probe is fitted on each record's mean window
    embedding (the benchmark probe's ``mean_embedding``; a linear head's mean window logit equals its logit of the
    mean embedding). Otherwise on every sliding window of the training records, each labelled with its record's
    labels (fine-tuning's loss is per training crop, so the initialised model starts from the probe's own loss),
    with ``C`` chosen on the record predictions aggregated as ``aggregate`` says
    (:func:`aggregate_window_probabilities`: ``"logit"`` the mean window logit, ``"prob"`` the mean probability).

    ``C`` is chosen on validation macro AUROC of the record-level predictions.

    Args:
        backbone: the encoder (put in eval mode for the extraction, its mode restored afterwards).
        cache: the task's :class:`~ecgfm.data.cache.CorpusCache`.
        labels: ``(N, C)`` indicators for every cache row.
        splits: ``train`` and ``val`` cache rows.
        multilabel: one-vs-rest sigmoids (else softmax).
        window, stride: window length and hop in samples.
        Cs: L2 grid.
        seed: probe ``random_state``.
        batch_size: windows per forward pass.
        aggregate: ``"logit"`` or ``"prob"``, the fine-tuning model's ``window_aggregate`` (see above).
        feature_dir: on-disk feature cache (:func:`ecgfm.evaluate.features.cached_features`, shared with
            probe.py: a pretrained encoder already probed costs no encoder pass); None: embed the train and val
            records now, no cache.
        lead_aware: lead-aware features (the record lead masks passed to a backbone that accepts them), as the
            :class:`FinetuneModule` it initialises sees its input (its ``lead_aware``); False: zero-padded.
        features: ``"records"`` or ``"windows"`` (``finetune.lp_features``, see above).

    Returns:
        ``(probe, info)`` with ``info = {"C", "val_macro_auroc", "grid", "windows", "seconds"}``.

    Raises:
        ValueError: before any encoder pass, a single-label train / val row that is not one-hot, or a validation
            split without a class holding both positive and negative records (its macro AUROC, on which ``C`` is
            chosen, would be undefined).
    """
    t0 = time.perf_counter()
    train, val = (np.asarray(splits[k], dtype=np.int64) for k in ("train", "val"))
    labels = np.asarray(labels, dtype=np.float32)
    _check_labels(labels, {"train": train, "val": val}, multilabel, "the LP-FT probe's C is chosen on it")
    device = next(backbone.parameters()).device
    # the features the fine-tuned model's forward pass computes: lead-aware as FinetuneModule(lead_aware=...)
    if feature_dir:
        fs = cached_features(backbone, cache, int(window), int(stride), feature_dir, batch_size=batch_size,
                             device=device, lead_aware=lead_aware)
    else:
        fs = extract_features(backbone, cache, int(window), int(stride), batch_size=batch_size, device=device,
                              rows=np.concatenate([train, val]), lead_aware=lead_aware)
    if aggregate not in WINDOW_AGGREGATES:
        raise ValueError(f"finetune.window_aggregate must be one of {WINDOW_AGGREGATES}, got {aggregate!r}")
    if features not in LP_FEATURES:
        raise ValueError(f"finetune.lp_features must be one of {LP_FEATURES}, got {features!r}")
    if aggregate == "logit" and features == "records":
        # a linear head's mean window logit is its logit of the mean embedding: the benchmark's linear probe
        means = fs.record_means()
        x_tr, y_tr = means[train], labels[train]
        x_val, pos_val = means[val], np.arange(len(val))
        fitted_on = "records"
    else:
        # every window with its record's labels: fine-tuning's loss is per training crop, and a head fitted on
        # record means starts it with window logits larger than the probe's record logits (a review measured a
        # 21x larger first loss on CinC 2017 for a ViT). Validation aggregates as the fine-tuned model does.
        x_tr, pos = fs.windows_of(train)
        y_tr = labels[train][pos]
        x_val, pos_val = fs.windows_of(val)
        fitted_on = "windows"
    grid: dict[str, float] = {}
    best: tuple[float, Any, float] | None = None
    with threadpool_limits(limits=1):  # small convex problems: one BLAS thread is as fast, no oversubscription
        for C in Cs:
            probe = LinearProbe(multilabel, C=float(C), seed=int(seed)).fit(x_tr, y_tr)
            p_rec = aggregate_window_probabilities(probe.predict_proba(x_val), pos_val, len(val), multilabel,
                                                   aggregate)
            auc = macro_auroc(labels[val], p_rec)
            grid[f"{C:g}"] = float(auc)
            score = auc if np.isfinite(auc) else -np.inf
            if best is None or score > best[0]:
                best = (score, probe, float(C))
    assert best is not None
    info = {"C": best[2], "val_macro_auroc": float(best[0]), "grid": grid, "aggregate": aggregate,
            "features": fitted_on,
            "windows": int(len(x_tr)), "lead_aware": bool(lead_aware and accepts_lead_mask(backbone)),
            "seconds": time.perf_counter() - t0}
    return best[1], info



def _check_labels(labels: np.ndarray, splits: Mapping[str, np.ndarray], multilabel: bool, purpose: str) -> None:
    """Refuse labels that would make training or validation silently wrong, before any work.

    Args:
        labels: ``(N, C)`` indicators for every cache row.
        splits: split name -> cache rows used (``val`` among them).
        multilabel: multi-label task (else every row used must be one-hot).
        purpose: what the validation macro AUROC decides (for the error message).

    Raises:
        ValueError: ``labels`` not ``(N, C)``; a single-label row used with no or several positives
            (:func:`ecgfm.evaluate.probe.check_single_label`); no class with both label values on ``val``
            (:func:`ecgfm.evaluate.probe.check_validation_defined`).
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, C) indicators for every cache row, got shape {labels.shape}")
    if not multilabel:
        for name, rows in splits.items():
            check_single_label(labels, rows, where=f"split {name!r}")
    check_validation_defined(labels[np.asarray(splits["val"], dtype=np.int64)], where="split 'val'",
                             purpose=purpose)


def run_finetune(backbone: nn.Module, cache_dir: str, labels: np.ndarray, splits: dict[str, np.ndarray],
                 multilabel: bool, crop_samples: int, stride_samples: int,
                 recipe: FinetuneRecipe | Mapping[str, Any] | None = None, *, seed: int = 0, accelerator: str = "cpu",
                 external: dict[str, tuple[str, np.ndarray, np.ndarray]] | None = None,
                 feature_dir: str | None = None, feature_batch_size: int = FeaturesConfig.batch_size,
                 predict_val: bool = True, lead_aware: bool = True) -> dict[str, Any]:
    """Fine-tune ``backbone`` on the ``train`` rows; early-stop on ``val``; predict val / test (and externals).

    Args:
        backbone: the encoder (modified in place: pass a fresh copy).
        cache_dir: corpus cache of the task.
        labels: ``(N, C)`` indicators for every cache row.
        splits: ``train`` (already the label-fraction subset), ``val``, ``test`` cache rows.
        multilabel: multi-label task.
        crop_samples: training crop and evaluation window in samples.
        stride_samples: evaluation sliding-window hop.
        recipe: the training recipe (:class:`ecgfm.recipes.FinetuneRecipe`, or a mapping of its fields; None: its
            defaults, those of ``conf/finetune.yaml``): epochs, batch size, lr, weight decay, layer decay, warm-up,
            patience, min_epochs, min_epoch_samples (training crops an epoch at least), head, ``head_init``
            (``"lp"``: LP-FT, the head starts as the linear probe of :func:`fit_probe_head` on ``lp_Cs`` and the
            initial weights are a best-weights candidate; or ``"random"``), ``window_aggregate`` (record
            prediction = the sigmoid / softmax of the mean window logit, or the mean window probability; used for
            validation, the returned predictions and the LP-FT probe),
            ``val_sliding`` (early-stop on whole-record sliding-window validation, else one centred crop per record;
            the final validation and test predictions always use whole records) and DataLoader ``num_workers``.
        seed: seed of initialisation of the head, crop positions and order.
        accelerator: Lightning accelerator.
        external: ``{name: (cache_dir, labels (M, C), rows)}`` evaluated without retraining.
        feature_dir: frozen-feature cache of the LP-FT probe (see :func:`fit_probe_head`).
        feature_batch_size: windows per forward pass of the LP-FT probe's frozen features (``features.batch_size``;
            eval mode, so speed and memory only).
        predict_val: return whole-record validation predictions (needed for multi-label F1 thresholds only).
        lead_aware: pass the records' lead masks to a backbone that accepts them (:class:`FinetuneModule`), in
            training, validation, test and the LP-FT probe's features; False: zero-padded 12-lead input.

    Returns:
        ``{"val": (rows, probs) or None, "test": (rows, probs), "external": {name: (rows, probs)}, "best_epoch"
        (0-based; -1: the initial LP-FT weights were never beaten on validation), "best_val_macro_auroc",
        "epochs_run", "seconds", "lp" (probe info of :func:`fit_probe_head`, or None), "progress" (the per-epoch
        lines of :class:`EpochProgress`), "model" (the trained :class:`FinetuneModule` with its best weights, in
        eval mode: ``backbone`` + ``head``)}``; ``rows`` are cache rows (sorted).

    Raises:
        ecgfm.config.ConfigError: a bad recipe value (a ``ValueError`` naming ``finetune.<key>``), before any work.
        ValueError: before any work, single-label (``multilabel=False``) rows of train / val / test (or of an
            external set) without exactly one positive, or a validation split without a class holding both
            positive and negative records: its macro AUROC, on which early stopping, the best-weights restore and
            the LP-FT probe are decided, would be undefined.
    """
    r = as_finetune_recipe(recipe)
    missing = [k for k in ("train", "val", "test") if k not in splits]
    if missing:
        raise ValueError(f"splits lacks {missing} (needs train, val, test)")
    labels = np.asarray(labels)
    _check_labels(labels, {k: splits[k] for k in ("train", "val", "test")}, multilabel,
                  "early stopping and the best-weights restore are decided on it")
    if not multilabel:
        for name, (_, ext_labels, rows) in (external or {}).items():
            check_single_label(ext_labels, rows, where=f"external set {name!r}")
    t0 = time.perf_counter()
    L.seed_everything(int(seed), workers=True, verbose=False)
    target = labels if multilabel else labels.argmax(axis=1)
    epoch_n = max(len(splits["train"]), int(r.min_epoch_samples))
    dm = DownstreamDataModule(cache_dir, target, splits, crop_samples=crop_samples, batch_size=r.batch_size,
                              num_workers=r.num_workers, multilabel=multilabel,
                              test_stride=stride_samples if r.val_sliding else None, seed=int(seed),
                              drop_last=epoch_n > r.batch_size,
                              epoch_samples=epoch_n if epoch_n > len(splits["train"]) else None)
    windows = DownstreamDataModule(cache_dir, target, splits, crop_samples=crop_samples, batch_size=r.batch_size,
                                   num_workers=r.num_workers, multilabel=multilabel, test_stride=stride_samples)
    model = FinetuneModule.from_recipe(backbone, labels.shape[1], multilabel, r, lead_aware=lead_aware)
    val_name = (f"val ({len(splits['val'])} records, "
                f"{'whole-record windows' if r.val_sliding else 'centred crops'})")
    log.info("fine-tuning: %d train records (%d crops an epoch), %s; up to %d epochs (patience %d), lr %g, %s head "
             "(%s init)", len(splits["train"]), epoch_n, val_name, r.epochs, r.patience, r.lr, r.head, r.head_init)
    lp_info = None
    if r.head_init == "lp":
        # never-estimated (random-init) BatchNorm statistics from the task's training crops first, so that the
        # probe's (eval-mode) features are the ones fine-tuning's train-mode forward computes (see
        # recalibrate_batchnorm); none for a frozen backbone
        recal = 0 if model.freeze_backbone else recalibrate_batchnorm(model, windows.train_dataloader())
        if recal:
            log.info("LP head: BatchNorm running statistics of %d never-estimated (random-init) layer(s) computed on "
                     "the training crops", recal)
        probe, lp_info = fit_probe_head(backbone, windows.cache, labels, splits, multilabel, crop_samples,
                                        stride_samples, Cs=r.lp_Cs, seed=int(seed), batch_size=int(feature_batch_size),
                                        feature_dir=feature_dir, aggregate=r.window_aggregate,
                                        lead_aware=model.lead_aware, features=r.lp_features)
        init_head_from_probe(model.head, probe)
        log.info("LP head: linear probe C=%g fitted on the frozen features (%.1f s)", lp_info["C"],
                 lp_info["seconds"])
    best = BestWeights()
    early = L.pytorch.callbacks.EarlyStopping(monitor=VAL_METRIC, mode="max", patience=int(r.patience))
    progress = EpochProgress(best, val_name)
    with quiet_lightning():
        trainer = L.Trainer(max_epochs=int(r.epochs), min_epochs=int(r.min_epochs), accelerator=accelerator,
                            devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[best, early, progress], num_sanity_val_steps=0,
                            deterministic=False)
        if r.head_init == "lp":  # score the LP-initialised weights: fine-tuning must beat them on validation
            trainer.validate(model, datamodule=dm, verbose=False)
        # Lightning's fit keeps the train / eval mode it finds, and both an exported encoder (load_encoder) and
        # validate() leave the modules in eval mode: without this, BatchNorm would train on its frozen running
        # statistics and dropout would be off, whatever head_init is
        model.train()
        trainer.fit(model, datamodule=dm)
    epochs_run = int(trainer.current_epoch)
    why = "max epochs" if epochs_run >= r.epochs else f"early stopping, patience {r.patience}"
    log.info("fine-tuning done: %d/%d epochs (%s), best val (%d records) macro AUROC %.3f @ %s (weights restored; "
             "the model-selection value, optimistic, no CI: the test line reports the estimate), %.1f s",
             epochs_run, r.epochs, why, len(splits["val"]), best.best, _epoch_name(best.best_epoch),
             time.perf_counter() - t0)
    out: dict[str, Any] = {"val": predict_records(model, windows.val_dataloader()) if predict_val else None,
                           "test": predict_records(model, windows.test_dataloader()), "external": {}}
    for name, (ext_dir, ext_labels, rows) in (external or {}).items():
        ext_target = ext_labels if multilabel else ext_labels.argmax(axis=1)
        edm = DownstreamDataModule(ext_dir, ext_target, {"train": rows[:0], "val": rows[:0], "test": rows},
                                   crop_samples=crop_samples, batch_size=r.batch_size, num_workers=r.num_workers,
                                   multilabel=multilabel, test_stride=stride_samples)
        out["external"][name] = predict_records(model, edm.test_dataloader())
    out.update(best_epoch=best.best_epoch, best_val_macro_auroc=best.best, epochs_run=epochs_run,
               seconds=time.perf_counter() - t0, lp=lp_info, progress=list(progress.lines), model=model.eval())
    return out


def count_trainable(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


__all__: Sequence[str] = ("FinetuneModule", "BestWeights", "EpochProgress", "FINETUNE_NO_DECAY_NAMES",
                          "aggregate_windows", "predict_records", "run_finetune", "count_trainable",
                          "check_head_init", "init_head_from_probe", "fit_probe_head", "quiet_lightning",
                          "FinetuneRecipe", "HEAD_INITS", "LP_CS", "WINDOW_AGGREGATES")
