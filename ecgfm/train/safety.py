"""Non-finite guards for training: a damaged cache or a diverging run stops with an error that names the shard, the
records and the step, instead of exporting a NaN encoder with exit code 0.

:class:`NonFiniteGuard` (a Lightning ``Callback``) checks

* every training and validation batch's signals (``x``, ``x2``) before the step: a NaN/Inf raises the data
  layer's :class:`~ecgfm.data.cache.NonFiniteDataError` naming the cache, the shard file and the record keys
  (:meth:`~ecgfm.data.cache.CorpusCache.nonfinite_error`), or, with ``nonfinite=skip``,
  drops those records from the batch (each skipped record is logged once and counted in ``summary.json``);
* the training loss before ``backward`` (Lightning's ``on_before_backward`` hook), so a non-finite loss never
  reaches the optimiser: :class:`NonFiniteLossError` names the step and the batch's record keys;
* the weights in every checkpoint it is about to write (``on_save_checkpoint``): :class:`NonFiniteWeightsError`.

:func:`check_finite_state` is also run on the backbone just before it is exported. Batches identify their records
by ``index`` (the flat index of :class:`ecgfm.data.datamodules.CachePool`), which :func:`locate_records` turns
into ``(cache folder, shard file, source/record_id)``. This is a safety net behind the loaders' own non-finite
check: it also covers DataModules without one.

A skipped or failing record is a data problem: with DDP, every rank screens its own batches (counts in the summary
are rank 0's); an error on one rank ends the job (the others stop at their next collective).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import torch

from ecgfm.config import NONFINITE_MODES
from ecgfm.data.cache import NonFiniteDataError
from ecgfm.train.loop import window_rewind

log = logging.getLogger(__name__)

#: How a rerun after a divergence goes: it resumes only where a checkpoint was written before the divergence (a
#: divergence at step 1 leaves none), and a changed recipe is refused until the user says which way to go.
RERUN_HINT = ("a rerun into the run folder resumes from its newest checkpoint, if one was written (with a changed "
              "method.lr: resume=<checkpoint> to continue on purpose, or overwrite=true to start again)")

__all__ = ["NONFINITE_MODES", "NonFiniteDataError", "NonFiniteLossError", "NonFiniteWeightsError", "NonFiniteGuard",
           "nonfinite_rows", "locate_records", "describe_records", "check_finite_state"]
#: record keys named per shard in a message (the rest are counted)
_SHOW = 8


class NonFiniteLossError(RuntimeError):
    """The training loss became non-finite. The message names the step and the batch's record keys."""


class NonFiniteWeightsError(RuntimeError):
    """Weights became non-finite; raised before such weights are checkpointed or exported."""


def nonfinite_rows(batch: Mapping[str, Any]) -> torch.Tensor:
    """Rows of a batch whose signal views hold a NaN or an Inf.

    Args:
        batch: dict with ``x (B, L, T)`` and optionally ``x2 (B, L, T)``.

    Returns:
        ``(B,)`` bool, True where ``x`` (or ``x2``) of that row is not all finite.
    """
    x = batch["x"]
    bad = ~torch.isfinite(x).reshape(len(x), -1).all(dim=1)
    x2 = batch.get("x2")
    if torch.is_tensor(x2):
        bad |= ~torch.isfinite(x2).reshape(len(x2), -1).all(dim=1)
    return bad


def locate_records(datamodule: Any, flats: Sequence[int]) -> list[tuple[str, str, str]]:
    """Where records of a training batch come from.

    Args:
        datamodule: a DataModule with a :class:`~ecgfm.data.datamodules.CachePool` as ``pool``
            (:class:`~ecgfm.data.datamodules.PretrainDataModule`); anything else gives ``"index N"`` keys.
        flats: flat record indices (a batch's ``index``).

    Returns:
        ``(cache folder, shard file, "source/record_id")`` per index.
    """
    pool = getattr(datamodule, "pool", None)
    out = []
    for flat in flats:
        try:
            cache, i = pool.locate(int(flat))
            shard = int(cache.columns()["shard"][i])
            out.append((str(cache.path), str(cache.path / cache.manifest["shards"][shard]["bin"]),
                        str(cache.keys[i])))
        except Exception:  # no cache pool (a custom DataModule): the index is all there is
            out.append(("<unknown cache>", "<unknown shard>", f"index {int(flat)}"))
    return out


def describe_records(datamodule: Any, flats: Sequence[int], limit: int = 32) -> str:
    """The records behind flat indices, for messages: ``"cache <folder>: key, key, ..."`` per cache (at most
    ``limit`` keys in all, then a count); ``"index i, j, ..."`` for a DataModule without a cache pool."""
    pool = getattr(datamodule, "pool", None)
    flats = [int(f) for f in flats]
    try:
        groups = pool.group(flats)
        keys = [(cache, [cache.keys[int(i)] for i in local]) for cache, _, local in groups]
    except Exception:  # no cache pool (a custom DataModule): the index is all there is
        shown = ", ".join(str(f) for f in flats[:limit])
        return f"index {shown}" + (f", ... ({len(flats)} in all)" if len(flats) > limit else "")
    parts, left = [], limit
    for cache, names in keys:
        shown = names[:max(left, 0)]
        left -= len(shown)
        if shown:
            parts.append(f"cache {cache.path}: {', '.join(shown)}")
    more = f", ... ({len(flats)} in all)" if len(flats) > limit else ""
    return "; ".join(parts) + more


def _nonfinite_error(datamodule: Any, flats: Sequence[int], what: str) -> NonFiniteDataError:
    """The data layer's error for non-finite records (:meth:`ecgfm.data.datamodules.CachePool.nonfinite_error`:
    cache folders, shard files, record keys); a generic one for a DataModule without a cache pool."""
    pool = getattr(datamodule, "pool", None)
    if callable(getattr(pool, "nonfinite_error", None)):
        return pool.nonfinite_error(list(flats), what)
    return NonFiniteDataError("<loader>", f"non-finite values (NaN/Inf) in {what}: "
                                          f"{describe_records(datamodule, flats)}; pass nonfinite=skip to skip such "
                                          "records (counted in the run summary)")


def check_finite_state(state: Mapping[str, Any], where: str) -> None:
    """Raise :class:`NonFiniteWeightsError` if a floating-point tensor of ``state`` holds a NaN or an Inf.

    Args:
        state: a ``state_dict``.
        where: what is being checked, for the message (``"checkpoint at step 40"``).
    """
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteWeightsError(f"non-finite weights ({name}) in the {where}: the run diverged; nothing "
                                        "was saved or exported. Lower method.lr (or raise method.warmup_steps) and "
                                        f"rerun: {RERUN_HINT}")


class NonFiniteGuard(L.Callback):
    """Stop (or skip records) on non-finite inputs, stop on a non-finite loss or weights (see the module docstring).

    Args:
        mode: ``"error"`` (default): a batch with non-finite values raises :class:`NonFiniteDataError`;
            ``"skip"``: those records are dropped from the batch (a batch left empty is skipped by the method).
            A non-finite loss or non-finite weights always raise.

    The skipped records (the loaders' and this guard's) are kept in checkpoints (plain data), so a resumed run
    reports them all. A checkpoint that resumes at the start of a gradient-accumulation window
    (:class:`~ecgfm.train.loop.AccumulationWindowCheckpoint`) keeps this guard's crop count as of that start: the
    resumed run screens the window's micro-batches again. (The loaders count the crops of every batch they read,
    also those read ahead of training: see docs/TRAINING.md, Resume.)
    """

    def __init__(self, mode: str = "error") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"mode must be one of {NONFINITE_MODES}, got {mode!r}")
        self.mode = mode
        self.skipped: dict[str, str] = {}       # record key -> shard file, skipped here, in the order first seen
        self.skipped_draws = 0                  # crops dropped here (a record drawn twice counts twice)
        self._restored_keys: list[str] = []     # everything counted before the checkpoint this run resumed from
        self._restored_crops = 0
        self._window_draws = 0                  # skipped_draws when the current accumulation window started
        self._trainer: L.Trainer | None = None
        self._datamodule: Any = None
        self._index: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._datamodule = trainer.datamodule  # its loaders count the crops they skip (nonfinite_report)
        self._trainer = trainer

    # ------------------------------------------------------------------------------------------------- inputs
    def _screen(self, trainer: L.Trainer, batch: Any, stage: str) -> None:
        if not isinstance(batch, dict) or not torch.is_tensor(batch.get("x")):
            return
        bad = nonfinite_rows(batch)
        if not bool(bad.any()):
            return
        idx = batch.get("index")
        flats = (idx[bad] if torch.is_tensor(idx) else torch.nonzero(bad).flatten()).tolist()
        if self.mode == "error":
            raise _nonfinite_error(trainer.datamodule, flats, f"the crops ({stage} step {trainer.global_step})")
        located = locate_records(trainer.datamodule, flats)
        keep, n_rows = ~bad, len(bad)
        for name in list(batch):
            value = batch[name]
            if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n_rows:
                batch[name] = value[keep]        # the same dict object reaches training/validation_step
        for _, shard, key in located:
            if key not in self.skipped:
                self.skipped[key] = shard
                log.warning("nonfinite=skip: leaving out record %s (%s): non-finite values", key, shard)
        self.skipped_draws += len(located)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % max(int(getattr(trainer, "accumulate_grad_batches", 1)), 1) == 0:   # a window's first
            self._window_draws = self.skipped_draws
        self._screen(trainer, batch, "training")
        index = batch.get("index") if isinstance(batch, dict) else None
        self._index = index if torch.is_tensor(index) else None

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._screen(trainer, batch, "validation")

    # --------------------------------------------------------------------------------------------------- loss
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        flats = self._index.tolist() if self._index is not None else []
        where = describe_records(trainer.datamodule, flats) if flats else "(records unknown)"
        if len(flats) > 32:  # the message names the first 32; the log gets them all
            log.error("non-finite loss at step %d: every record of the batch: %s", trainer.global_step,
                      describe_records(trainer.datamodule, flats, limit=len(flats)))
        raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach().float().reshape(-1)[0])}) at step "
                                 f"{trainer.global_step} (epoch {trainer.current_epoch}); the batch held "
                                 f"{len(flats)} record(s): {where}. Nothing was exported; lower method.lr (or raise "
                                 f"method.warmup_steps) or check those records, then rerun: {RERUN_HINT}")

    # ------------------------------------------------------------------------------------------------ weights
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint.get("state_dict", {}), f"checkpoint at step {trainer.global_step}")

    # ---------------------------------------------------------------------------------------------- state
    def _loader_report(self) -> dict[str, Any]:
        report = getattr(self._datamodule, "nonfinite_report", None)
        return report() if callable(report) else {}

    def _totals(self) -> tuple[list[str], int]:
        """Distinct skipped record keys and skipped crops: before the resume + this guard + the loaders."""
        report = self._loader_report()
        keys = list(dict.fromkeys([*self._restored_keys, *self.skipped, *map(str, report.get("records", []))]))
        return keys, self._restored_crops + self.skipped_draws + int(report.get("skipped", 0))

    def state_dict(self) -> dict[str, Any]:
        keys, crops = self._totals()
        if self._trainer is not None and window_rewind(self._trainer) > 0:
            # saved at the window's start, whose micro-batches (and validations) the resumed run screens again
            crops -= self.skipped_draws - self._window_draws
        return {"keys": keys, "crops": int(crops)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_keys = [str(k) for k in state_dict.get("keys", [])]
        self._restored_crops = int(state_dict.get("crops", 0))

    def summary(self, limit: int = 20) -> dict[str, Any]:
        """``nonfinite`` (the mode), ``nonfinite_records_skipped`` (distinct records), ``nonfinite_crops_skipped``
        and the first ``limit`` skipped record keys (``nonfinite_skipped_keys``): those the loaders skipped
        (``PretrainDataModule.nonfinite_report``), those this guard dropped and those of the run before a resume."""
        keys, crops = self._totals()
        return {"nonfinite": self.mode, "nonfinite_records_skipped": len(keys), "nonfinite_crops_skipped": int(crops),
                "nonfinite_skipped_keys": keys[:limit]}
