"""Base LightningModule shared by every pretraining method (MAE, SimCLR, CLOCS, CREMA).

A method subclasses :class:`PretrainModule` and implements :meth:`PretrainModule.shared_step`, which maps a
:class:`~ecgfm.data.datamodules.PretrainDataModule` batch (dict: ``x (B, 12, T)``, optionally ``x2 (B, 12, T)``,
``lead_mask (B, 12)`` bool, ``patient (B,)`` int64 with -1 for unknown, ``index (B,)`` int64 and, for labelled
validation data, ``y``) to ``(loss, terms)``. The base class provides

* ``training_step`` / ``validation_step`` that call ``shared_step`` and log ``train/<term>`` / ``val/<term>``;
* ``configure_optimizers``: :mod:`ecgfm.optim`'s AdamW (fused where PyTorch has it) without weight decay on
  biases, norm layers and embeddings (positional embeddings, class/mask tokens, ``nn.Embedding``), with a linear
  warm-up followed by a cosine decay to zero at ``max_steps``, stepped every optimiser step;
* an *online linear probe* (optional, ``probe_num_classes``): see :meth:`PretrainModule.on_validation_epoch_end`.

Online probe, the chosen design: during validation the (frozen, eval-mode) backbone embeds every labelled batch;
at the end of the validation epoch the embeddings of all ranks are gathered, de-duplicated by ``index``, split
50/50 by a fixed-seed random permutation (so a multi-corpus validation set in index order is not split by corpus;
at most ``PretrainModule.probe_max_samples`` embeddings are used), and a linear probe (ridge regression on
standardised embeddings, see :func:`fit_probe_auroc`) is fitted on one half; the macro AUROC over the classes that
have both outcomes in the other half is logged as ``val/probe_auroc`` (plus ``val/probe_n``, the number of
embeddings collected). It never touches training (no extra optimiser, no gradient), so it is an honest monitor of
representation quality; it is not a benchmark number (the halves may share patients: use ``ecgfm.evaluate`` for
results).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ecgfm.evaluate.metrics import per_class_auroc
from ecgfm.optim import lightning_optimizers, param_groups

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """Convert OmegaConf containers (recursively) to plain lists/dicts so checkpoints hold only plain data."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        DictConfig = ListConfig = ()  # type: ignore[assignment]
    if DictConfig and isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def rows_only(fn: Any, inputs: tuple[torch.Tensor | None, ...], valid: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` computed on the rows ``valid (B,)`` only, zeros (attached to the graph) in the other rows.

    Views a loss leaves out (no present lead, no signal) must not reach a BatchNorm layer in training either: there
    they would enter the batch statistics, which change the embeddings of the views the loss does use, and the
    running statistics an exported encoder keeps (review s25: the NT-Xent of four kept pairs read 2.28 alone and
    2.74 beside four left-out pairs). With every row valid, or fewer than two (BatchNorm needs two in training, and
    under DDP every rank must still run the module so that its parameters get a gradient), the old pass on all rows.

    Args:
        fn: the module (or function) applied to ``inputs``.
        inputs: tensors with the rows as their first dimension, or None (passed on as None).
        valid: ``(B,)`` bool.

    Returns:
        ``(B, ...)``: ``fn``'s output on the valid rows, zeros elsewhere.
    """
    n_valid = int(valid.sum())
    if n_valid == valid.shape[0] or n_valid < 2:
        return fn(*inputs)
    idx = valid.nonzero().squeeze(1)
    out = fn(*(None if t is None else t.index_select(0, idx) for t in inputs))
    return out.new_zeros((valid.shape[0], *out.shape[1:])).index_copy(0, idx, out)


def fit_probe_auroc(emb: np.ndarray, y: np.ndarray, multilabel: bool, num_classes: int, seed: int = 0,
                    max_samples: int | None = 10000) -> tuple[float, int]:
    """Fit a linear probe on a random half of ``emb`` and return its macro AUROC on the other half.

    The probe is ridge regression on standardised embeddings onto ``+-1`` targets (one output per class, all
    solved at once), with the regularisation chosen by efficient leave-one-out on the fit half
    (``sklearn.linear_model.RidgeCV``). AUROC only ranks the scores, so no calibration is needed. Chosen over a
    logistic regression because one-vs-rest logistic regression took ~100 s for 71 labels x 5,000 embeddings on
    this project's CPUs (once per validation epoch), ridge well under a second.

    Args:
        emb: ``(N, D)`` embeddings.
        y: ``(N, C)`` multi-hot targets (``multilabel``) or ``(N,)`` class indices / ``(N, C)`` one-hot.
        multilabel: targets are multi-hot (else one class per sample).
        num_classes: number of classes ``C``.
        seed: seed of the 50/50 split (and of the subsample).
        max_samples: use at most this many embeddings (random subsample); ``None`` = all.

    Returns:
        ``(macro AUROC on the held-out half, number of classes scored)``; ``(nan, 0)`` if not computable.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    emb = np.asarray(emb, dtype=np.float64)
    n = len(emb)
    if multilabel:
        Y = np.asarray(y, dtype=np.float64).reshape(n, -1) > 0.5
    else:
        y = np.asarray(y)
        if y.ndim == 2:
            hits = (y > 0.5).sum(1)
            if len(hits) and not (hits == 1).all():
                raise ValueError(f"probe targets are not one class per sample: {int((hits == 0).sum())} rows have "
                                 f"no class and {int((hits > 1).sum())} several (multi-hot labels); an argmax "
                                 f"would count them as class 0 / their first class: set probe_multilabel=true")
        labels = y.argmax(1) if y.ndim == 2 else y.astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"probe labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
        Y = np.zeros((n, num_classes), dtype=bool)
        Y[np.arange(n), labels] = True
    perm = np.random.default_rng(seed).permutation(n)
    if max_samples is not None:
        perm = perm[:max_samples]
    half = len(perm) // 2
    fit_idx, eval_idx = perm[:half], perm[half:]
    if len(fit_idx) < 2 or len(eval_idx) < 2:
        return float("nan"), 0
    Yf = Y[fit_idx]
    usable = (Yf.sum(0) > 0) & (Yf.sum(0) < len(Yf))  # classes with both outcomes in the fit half
    if not usable.any():
        return float("nan"), 0
    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 8)))
    probe.fit(emb[fit_idx], np.where(Yf[:, usable], 1.0, -1.0))
    scores = probe.predict(emb[eval_idx]).reshape(len(eval_idx), -1)
    per = per_class_auroc(Y[eval_idx][:, usable], scores)  # NaN for a class without both outcomes in this half
    per = per[np.isfinite(per)]
    return (float(np.mean(per)), int(per.size)) if per.size else (float("nan"), 0)


class PretrainModule(L.LightningModule):
    """Base class of the pretraining methods (see the module docstring).

    Args:
        backbone: encoder following the :mod:`ecgfm.backbones.registry` contract (``embed``, ``num_features``);
            kept as ``self.backbone`` (what gets exported). Its ``name`` / ``init_args`` are stored in the
            hyper-parameters so a checkpoint can rebuild it with ``create_backbone``.
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        warmup_steps: linear warm-up steps.
        max_steps: step at which the cosine schedule reaches zero (normally the trainer's ``max_steps``).
        betas: AdamW betas.
        probe_num_classes: enable the online linear probe on labelled validation batches (``batch["y"]``)
            with this many classes; ``None`` disables it.
        probe_multilabel: ``y`` is multi-hot ``(B, C)`` instead of class indices ``(B,)`` (or one-hot ``(B, C)``).
    """

    #: at most this many validation embeddings feed the online probe (a monitor, kept cheap)
    probe_max_samples: int = 10000

    def __init__(self, backbone: nn.Module, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 max_steps: int = 10000, betas: tuple[float, float] = (0.9, 0.95),
                 probe_num_classes: int | None = None, probe_multilabel: bool = False) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0 or max_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1 (the learning-rate schedule's length: set "
                             f"method.max_steps when trainer.max_steps is -1), got {warmup_steps}, {max_steps}")
        if probe_num_classes is not None and probe_num_classes < (1 if probe_multilabel else 2):
            raise ValueError(f"probe_num_classes must be >= {1 if probe_multilabel else 2} for a "
                             f"{'multilabel' if probe_multilabel else 'multiclass'} probe, got {probe_num_classes}")
        if not hasattr(backbone, "embed") or not hasattr(backbone, "num_features"):
            raise ValueError(f"backbone {type(backbone).__name__} does not follow the contract (embed, num_features)")
        # Collects the arguments of every __init__ in the subclass chain; the module itself is not plain data.
        self.save_hyperparameters(ignore=["backbone"])
        extra = {"backbone_name": getattr(backbone, "name", None) or None,
                 "backbone_args": dict(getattr(backbone, "init_args", {}) or {})}
        for hp in (self.hparams, getattr(self, "_hparams_initial", None)):
            if hp is None:
                continue
            hp.update(extra)
            for k in list(hp):  # Hydra passes ListConfig/DictConfig: store plain containers (weights_only loads)
                hp[k] = _plain(hp[k])
        self.backbone = backbone
        self._probe_emb: list[torch.Tensor] = []
        self._probe_y: list[torch.Tensor] = []
        self._probe_idx: list[torch.Tensor] = []

    # ------------------------------------------------------------------ steps
    @classmethod
    def one_view_reason(cls, hparams: Any) -> str | None:
        """Why a method built with ``hparams`` (its config node: ``mode``...) never reads a second view ``x2``
        (``PretrainDataModule(views="adjacent" | "segments")``), or None when it may read one. The config check
        (:func:`ecgfm.config.check_views`) refuses such views for it. Default: None (it may)."""
        return None

    @classmethod
    def views_needed(cls, hparams: Any) -> tuple[str, str] | None:
        """``(views, why)`` when a method built with ``hparams`` needs one kind of second view
        (``PretrainDataModule(views=...)``), refused otherwise by :func:`ecgfm.config.check_views`; None (the
        default) when it takes any."""
        return None

    def shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the method's loss on one batch.

        Args:
            batch: PretrainDataModule batch (see module docstring).

        Returns:
            ``(loss, terms)``: scalar loss to minimise and a dict of named scalar terms to log (the loss itself is
            logged as ``loss`` by the caller).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement shared_step(batch) -> (loss, terms)")

    def log_terms(self, prefix: str, terms: dict[str, Any], batch_size: int | None = None) -> None:
        """Log ``{prefix}/{name}`` for every term (per step in training, per epoch with DDP sync otherwise).

        Args:
            prefix: ``"train"`` or ``"val"`` (any string is accepted).
            terms: name -> scalar tensor or number.
            batch_size: batch size used for epoch averaging (avoids Lightning guessing it from a dict batch).
        """
        train = prefix == "train"
        values = {f"{prefix}/{k}": (v.detach().float() if torch.is_tensor(v) else float(v)) for k, v in terms.items()}
        self.log_dict(values, on_step=train, on_epoch=not train, prog_bar=False, sync_dist=not train,
                      batch_size=batch_size)

    @staticmethod
    def _batch_size(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["x"].shape[0])

    def _empty_batch(self, stage: str) -> None:
        """An empty batch (every record left out by ``nonfinite=skip``) is skipped in one process; under DDP it
        raises, since a rank cannot skip a step whose collectives (the contrastive losses' ``all_gather``, the
        ``ddp_mean`` counts, the gradient all-reduce) the other ranks take: they would wait for it (gloo aborts).

        Raises:
            NonFiniteDataError: ``world_size > 1``.
        """
        trainer = getattr(self, "_trainer", None)
        world = int(trainer.world_size) if trainer is not None else 1
        if world > 1:
            from ecgfm.data.cache import NonFiniteDataError

            step = int(trainer.global_step)
            raise NonFiniteDataError("<batch>", f"every record of a {stage} batch of rank {trainer.global_rank} (step "
                                                f"{step}) was left out as non-finite (nonfinite=skip). One process "
                                                f"skips such a batch; under DDP (world_size={world}) a rank cannot "
                                                "skip a step the other ranks take. Repair or rebuild the cache (the "
                                                "skipped records are logged), or train on one process")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self._batch_size(batch) == 0:  # every record dropped (nonfinite=skip): no step (Lightning skips None)
            self._empty_batch("training")
            return None
        loss, terms = self.shared_step(batch)
        trainer = getattr(self, "_trainer", None)
        logged = self._step_terms(trainer, {"loss": loss, **terms}, batch_idx)
        if logged is not None:
            self.log_terms("train", logged, batch_size=self._batch_size(batch))
        if trainer is not None and trainer.optimizers:
            # the schedule's value: the largest group lr (with layer-wise decay the lower layers get less)
            lr = max(float(g["lr"]) for g in trainer.optimizers[0].param_groups)
            self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=self._batch_size(batch))
        return loss

    def _step_terms(self, trainer: Any, terms: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        """The ``train/*`` terms to log for this micro-batch: ``terms`` itself without gradient accumulation;
        with ``accumulate_grad_batches = k > 1`` None inside a window and, on its last micro-batch, each term's
        mean over the window's micro-batches (the unscaled losses, as :class:`ecgfm.train.loop.LossHistory`
        records them). Lightning writes a step's ``on_step`` values once per optimiser step, the last logged: the
        window's last micro-batch alone otherwise.

        The window ends where ``LossHistory`` ends it: on every ``k``-th batch of an epoch and on the epoch's last
        batch (a shorter last window). An empty batch (``nonfinite=skip``) logs nothing and ends no window, as
        there. A term missing from some micro-batches is the mean over those that have it.
        """
        acc = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
        if acc <= 1:
            return terms
        if getattr(self, "_window_trainer", None) != id(trainer):   # another trainer: no window carried over
            self._window_trainer = id(trainer)   # its id, not the trainer (the module is pickled and deep-copied)
            self._window_terms: dict[str, list[torch.Tensor]] = {}
        for k, v in terms.items():
            value = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float32)
            self._window_terms.setdefault(k, []).append(value.reshape(()))
        n = trainer.num_training_batches
        if not ((batch_idx + 1) % acc == 0 or (isinstance(n, int) and batch_idx + 1 >= n)):
            return None
        window, self._window_terms = self._window_terms, {}
        return {k: torch.stack([t.to(vals[0].device) for t in vals]).mean() for k, vals in window.items()}

    #: the fewest records (over every process) a validation batch needs for a meaningful loss: a contrastive loss
    #: of one record has no negative (NT-Xent 0.0, accuracy 1.0), so its methods set 2
    min_val_batch: int = 1

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self._batch_size(batch) == 0:
            self._empty_batch("validation")
            return None
        trainer = getattr(self, "_trainer", None)
        world = int(trainer.world_size) if trainer is not None else 1
        if self._batch_size(batch) * world < self.min_val_batch:
            # a last validation batch of one record (or a validation split of one): left out of val/*, said once
            if not getattr(self, "_warned_small_val", False):
                self._warned_small_val = True
                log.warning("a validation batch of %d record(s) is left out of the val/* metrics: %s needs at least "
                            "%d records per batch for a meaningful loss (one record has no negative); a validation "
                            "split of that size has no val metrics (raise data.val_fraction)",
                            self._batch_size(batch), type(self).__name__, self.min_val_batch)
            if self.hparams.probe_num_classes is not None and "y" in batch:
                self._collect_probe(batch)
            return None
        loss, terms = self.shared_step(batch)
        self.log_terms("val", {"loss": loss, **terms}, batch_size=self._batch_size(batch))
        if self.hparams.probe_num_classes is not None and "y" in batch:
            self._collect_probe(batch)
        return loss

    # ------------------------------------------------------------ online probe
    @torch.no_grad()
    def probe_embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embedding used by the online probe: ``backbone.embed(x)`` ``(B, D)``. Override to change it."""
        x = batch["x"]
        if "lead_mask" in batch:
            x = x * batch["lead_mask"].to(x.dtype)[:, :, None]
        return self.embed_batch(x, batch.get("lead_mask"))

    def embed_batch(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``backbone.embed`` of ``x (B, L, T)`` -> ``(B, D)``, over present leads only when the module is lead-aware
        (attribute ``lead_aware``, default true), the backbone takes ``lead_mask`` and ``lead_mask (B, L)`` is
        given; otherwise absent leads are encoded as zero leads."""
        if (lead_mask is not None and getattr(self, "lead_aware", True)
                and getattr(self.backbone, "accepts_lead_mask", False)):
            return self.backbone.embed(x, lead_mask=lead_mask.to(torch.bool))
        return self.backbone.embed(x)

    def _collect_probe(self, batch: dict[str, torch.Tensor]) -> None:
        emb = self.probe_embed(batch).detach().float()
        self._probe_emb.append(emb)
        self._probe_y.append(batch["y"].detach().float())
        idx = batch.get("index")
        if idx is None:  # no index: make unique ids from the running count
            start = sum(len(e) for e in self._probe_emb[:-1])
            idx = torch.arange(start, start + len(emb), device=emb.device)
        self._probe_idx.append(idx.detach().long())

    def on_validation_epoch_start(self) -> None:
        self._probe_emb, self._probe_y, self._probe_idx = [], [], []

    def _gather_probe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self._probe_emb:
            return None
        emb = torch.cat(self._probe_emb)
        y = torch.cat(self._probe_y)
        idx = torch.cat(self._probe_idx)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # all_gather needs equal shapes: pad to the largest local count, then trim
            n = torch.tensor([len(emb)], device=emb.device)
            counts = self.all_gather(n).reshape(-1)
            m = int(counts.max())
            pad = m - len(emb)
            emb = torch.cat([emb, emb.new_zeros(pad, *emb.shape[1:])])
            y = torch.cat([y, y.new_zeros(pad, *y.shape[1:])])
            idx = torch.cat([idx, idx.new_full((pad,), -1)])
            emb, y, idx = (self.all_gather(t) for t in (emb, y, idx))  # (world, m, ...)
            keep = torch.cat([torch.arange(m, device=emb.device) < c for c in counts])
            emb, y, idx = (t.reshape(-1, *t.shape[2:])[keep] for t in (emb, y, idx))
        idx_np = idx.cpu().numpy()
        _, first = np.unique(idx_np, return_index=True)  # DistributedSampler repeats samples to even out ranks
        first = np.sort(first)
        return emb.cpu().numpy()[first], y.cpu().numpy()[first], idx_np[first]

    def on_validation_epoch_end(self) -> None:
        """Fit the online linear probe on the collected validation embeddings and log ``val/probe_auroc``."""
        if self.hparams.probe_num_classes is None:
            return
        gathered = self._gather_probe()
        self._probe_emb, self._probe_y, self._probe_idx = [], [], []
        if gathered is None:
            return
        emb, y, idx = gathered
        order = np.argsort(idx, kind="stable")  # same order on every rank, whatever the sampler did
        auroc, n_classes = fit_probe_auroc(emb[order], y[order], bool(self.hparams.probe_multilabel),
                                           int(self.hparams.probe_num_classes), max_samples=self.probe_max_samples)
        if n_classes == 0:
            warnings.warn(f"online probe: {len(emb)} labelled validation embeddings have no class with both "
                          "outcomes in each half; val/probe_auroc not logged", stacklevel=1)
            return
        # Every rank computed the same value from the same gathered data: no sync needed.
        self.log("val/probe_auroc", auroc, on_epoch=True, sync_dist=False, rank_zero_only=False)
        self.log("val/probe_n", float(len(emb)), on_epoch=True, sync_dist=False)
        # the classes the macro AUROC is over (those with both outcomes in each half of the validation records):
        # a diagnostic of the run, not a benchmark number, but not one passed off as over every class
        self.log("val/probe_n_classes", float(n_classes), on_epoch=True, sync_dist=False)
        total = int(self.hparams.probe_num_classes)
        if n_classes < total and not getattr(self, "_probe_classes_warned", False):
            self._probe_classes_warned = True
            log.warning("online probe: val/probe_auroc averages over %d of the %d probe classes (the others lack a "
                        "positive or a negative in a half of the %d validation embeddings; val/probe_n_classes "
                        "follows it), a diagnostic on few records without a CI, not a benchmark number",
                        n_classes, total, len(emb))

    # --------------------------------------------------------------- optimiser
    def on_train_start(self) -> None:
        """Apply this run's optimiser settings after a resume.

        Lightning restores the optimiser and scheduler state of the checkpoint, including each group's ``lr``
        (the old schedule's last value: 0 at the end of a finished run), ``initial_lr``, ``weight_decay`` and
        ``betas``: an extended run (same folder, larger ``trainer.max_steps``) took its first step at the old
        schedule's end value, and ``resume=<ckpt>`` with a new ``method.lr`` / ``weight_decay`` / ``betas`` kept
        the old ones. Here each group takes this run's values and the lr of this run's schedule at the restored
        step. A fresh run is unchanged (the same values, already set).

        Also starts the ``train/*`` terms of a gradient-accumulation window afresh (:meth:`_step_terms`), and checks
        the run's step count against the schedule (:meth:`_check_schedule_length`: here, after the checkpoint and
        the loaders' positions are restored; asked earlier, the trainer loaded the training data before the restore
        and a mid-epoch resume replayed its epoch from the first batch)."""
        self._check_schedule_length()
        self._window_terms = {}
        sched_cfgs = getattr(self.trainer, "lr_scheduler_configs", None) or []
        if not sched_cfgs:
            return
        wd_of = {id(p): g["weight_decay"] for g in param_groups(self, self.hparams.weight_decay) for p in g["params"]}
        sched = sched_cfgs[0].scheduler
        lr, betas = float(self.hparams.lr), tuple(self.hparams.betas)
        for i, g in enumerate(sched.optimizer.param_groups):
            g["initial_lr"] = lr
            g["betas"] = betas
            g["weight_decay"] = wd_of.get(id(g["params"][0]), g["weight_decay"])
            sched.base_lrs[i] = lr
            g["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)

    def _check_schedule_length(self) -> None:
        """The run's optimiser steps as the trainer counts them (``estimated_stepping_batches``: ``max_steps``, or
        ``max_epochs`` x batches per epoch / ``accumulate_grad_batches``) against the schedule's
        ``hparams.max_steps``: train.py refuses a ``trainer.max_steps`` beyond it before the fit, but an epoch-limited
        run (``trainer.max_steps=-1``) is only known here; its steps after the schedule's end trained at learning
        rate 0 (weight decay stopped too) while the run reported "training finished".

        Raises:
            ConfigError: naming ``method.max_steps``, the run's step count and how to fit them.
        """
        trainer = getattr(self, "_trainer", None)
        try:
            total = float(trainer.estimated_stepping_batches) if trainer is not None else float("nan")
        except Exception:  # noqa: BLE001 - no estimate (no loader length yet): nothing to compare
            return
        sched = int(self.hparams.get("max_steps") or 0)
        if sched > 0 and np.isfinite(total) and total > sched:
            from ecgfm.errors import ConfigError

            raise ConfigError("method.max_steps", f"the run trains {int(total)} optimiser steps "
                                                  f"(trainer.max_steps={trainer.max_steps}, max_epochs="
                                                  f"{trainer.max_epochs}, accumulate_grad_batches="
                                                  f"{trainer.accumulate_grad_batches}), past the learning-rate "
                                                  f"schedule's method.max_steps={sched}: its last {int(total) - sched} "
                                                  f"steps would train at learning rate 0; set method.max_steps="
                                                  f"{int(total)} or limit the run with trainer.max_steps")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over :func:`ecgfm.optim.param_groups` with the per-step warm-up cosine schedule of
        :mod:`ecgfm.optim`."""
        groups = param_groups(self, self.hparams.weight_decay)
        return lightning_optimizers(groups, self.hparams.lr, int(self.hparams.warmup_steps),
                                    int(self.hparams.max_steps), betas=tuple(self.hparams.betas),
                                    trainer=self._trainer)
