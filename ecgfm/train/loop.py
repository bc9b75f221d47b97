"""The training loop's own pieces: per-step reseeding, throughput, loss history and a resumable training loader.

Resume reproduces the uninterrupted run: Lightning restores weights, optimiser, scheduler and loop position;
:class:`StepSeedCallback` makes every step's random draws (masks, augmentations, dropout) a function of
``(seed, rank, global_step)`` instead of the history of the global RNG (without it, :class:`RankSeedCallback` still
gives every DDP rank its own stream); the DataModule's sampler order is a
function of ``(seed, epoch)`` and its train loader is made resumable (:func:`make_resumable`: Lightning saves its
``state_dict``); a checkpoint written inside a gradient-accumulation window resumes at the window's start
(:class:`AccumulationWindowCheckpoint`). Callback states are plain data, keyed by class name (checkpoints load with
``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.throughput import Throughput
from torch.utils.data import BatchSampler, DataLoader

log = logging.getLogger(__name__)

__all__ = ["reseed", "StepSeedCallback", "RankSeedCallback", "ThroughputCallback", "LossHistory",
           "ResumableBatchSampler", "ResumableDataLoader", "make_resumable", "stepped_batches",
           "AccumulationWindowCheckpoint", "window_rewind", "save_final_checkpoint", "FitClock"]


# ---------------------------------------------------------------------------------------------------- callbacks
def reseed(seed: int, *parts: int) -> None:
    """Seed ``torch``, ``numpy`` and ``random`` from a hash of ``(seed, *parts)``: the one seeding rule of the loop.

    Args:
        seed: the run's ``seed``.
        *parts: integers that tell the streams apart (rank, step, ...); different tuples give unrelated streams.
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    s = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class StepSeedCallback(L.Callback):
    """Reseed ``torch``, ``numpy`` and ``random`` from ``(seed, rank, global_step)`` before every training step.

    Lightning checkpoints do not hold the global RNG states, so after a resume the masks / augmentations drawn by
    the method would differ from an uninterrupted run. Seeding per step makes them a pure function of the step
    (and different on every DDP rank). Validation batches are seeded from ``(seed, rank, step, batch_idx)`` so
    validation never changes what training draws.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def _reseed(self, *parts: int) -> None:
        reseed(self.seed, *parts)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        acc = int(trainer.accumulate_grad_batches)
        # with gradient accumulation the micro-batches of one optimiser step share global_step: their position
        # joins the seed, or they would all draw the same masks / augmentations (unchanged streams without it)
        self._reseed(trainer.global_rank, trainer.global_step, 0, *((batch_idx % acc,) if acc > 1 else ()))

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._reseed(trainer.global_rank, trainer.global_step, 1, batch_idx)


class RankSeedCallback(L.Callback):
    """Give every DDP rank its own random stream once, when the rank is known (``deterministic_steps=false``).

    ``train()`` seeds every process with the same ``seed`` (so the weights start identical), and without per-step
    reseeding nothing else tells the ranks apart: all would draw the same masks and augmentations, a ``world``-fold
    smaller effective batch of views. At ``setup`` (after the process group exists, before the first batch) every
    rank but 0 reseeds ``torch`` / ``numpy`` / ``random`` from ``(seed, global_rank, -1)`` with :func:`reseed` (the
    rule of :class:`StepSeedCallback`; step seeds never use ``-1``). Rank 0 keeps the stream of
    ``seed_everything(seed)``, so a one-process run draws exactly what it drew without this callback.

    Args:
        seed: the run's ``seed``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._done:   # once per run: a later validate()/test() on the same trainer keeps the stream going
            return
        self._done = True
        rank = int(trainer.global_rank)
        if rank != 0:
            reseed(self.seed, rank, -1)


class ThroughputCallback(L.Callback):
    """Log training throughput (``train/samples_per_s``, all ranks together) to the progress bar and loggers.

    Uses Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput` rolling window over training time:
    the time spent in validation loops during fit is left out (as Lightning's ``ThroughputMonitor`` does), so a
    window spanning an end-of-epoch validation does not show a collapsed rate.

    A training batch left with no rows (every record dropped by ``nonfinite=skip``'s
    :class:`~ecgfm.train.safety.NonFiniteGuard`, for a DataModule without the loaders' own non-finite check) is left
    out of the rate: ``Throughput`` refuses a sample count that did not grow. The method skips such a batch (no loss,
    no weight change), but Lightning still counts it as an optimiser step: it advances ``global_step`` (the run
    summary's ``steps``) and the learning-rate schedule.
    """

    def __init__(self, window_size: int = 5) -> None:
        self.window_size = window_size
        self._throughput: Throughput | None = None
        self._t0 = 0.0
        self._samples = 0
        self._batches = 0
        self._paused = 0.0               # seconds of validation inside fit, left out of the training time
        self._val_t0: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput = Throughput(window_size=self.window_size, world_size=trainer.world_size)
        self._t0 = time.perf_counter()
        self._samples = self._batches = 0
        self._paused = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_t0 is not None:
            self._paused += time.perf_counter() - self._val_t0
            self._val_t0 = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._throughput is None:
            return
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        if int(x.shape[0]) == 0:   # emptied by nonfinite=skip: no samples, nothing to time (see the docstring)
            return
        self._batches += 1
        self._samples += int(x.shape[0])
        self._throughput.update(time=time.perf_counter() - self._t0 - self._paused, batches=self._batches,
                                samples=self._samples)
        metrics = self._throughput.compute()
        rate = metrics.get("device/samples_per_sec")
        if rate is not None:
            pl_module.log("train/samples_per_s", float(rate) * trainer.world_size, prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=int(x.shape[0]))


class LossHistory(L.Callback):
    """Record ``(global_step, loss)`` of every optimiser step on this rank; kept in checkpoints so a resumed run
    still knows its first loss. Plain lists of numbers: loadable with ``weights_only=True``.

    With ``accumulate_grad_batches = k`` Lightning hands the hook each micro-batch's loss divided by ``k``: the
    recorded loss is the mean of the ``k`` unscaled micro-batch losses, one entry per optimiser step (the value
    ``train/loss`` logs).

    ``empty_batches`` counts the training batches that reached the method with no rows (every record dropped by
    ``nonfinite=skip``'s :class:`~ecgfm.train.safety.NonFiniteGuard`): the method skips them (no loss, nothing
    recorded here), but Lightning still counts such a batch as an optimiser step (``global_step`` and the
    learning-rate schedule advance; without gradient accumulation the weights do not change), so the run summary's
    ``steps`` includes them and ``empty_batches_skipped`` says how many there were.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._micro: list[float] = []
        self.val_step: int | None = None   # global step of the run's last validation (also before a resume)
        self.val_metrics: dict[str, float] = {}   # its val/* values (Lightning does not restore callback_metrics)
        self.empty_batches = 0             # training batches left with no rows by nonfinite=skip (class docstring)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_step = int(trainer.global_step)
            self.val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # a batch emptied by nonfinite=skip returns no loss (Lightning passes {}): nothing to record for it
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            x = batch.get("x") if isinstance(batch, dict) else None
            if torch.is_tensor(x) and x.ndim >= 1 and int(x.shape[0]) == 0:
                self.empty_batches += 1
            return
        acc = int(trainer.accumulate_grad_batches)
        self._micro.append(float(loss.detach().float().cpu()) * acc)
        n = trainer.num_training_batches
        if (batch_idx + 1) % acc == 0 or (isinstance(n, int) and batch_idx + 1 >= n):   # an optimiser step ended
            self.steps.append(int(trainer.global_step))
            self.losses.append(float(np.mean(self._micro)))
            self._micro = []

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses), "val_step": self.val_step,
                "val_metrics": dict(self.val_metrics), "empty_batches": int(self.empty_batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self.losses = [float(v) for v in state_dict.get("losses", [])]
        val_step = state_dict.get("val_step")
        self.val_step = None if val_step is None else int(val_step)
        self.val_metrics = {str(k): float(v) for k, v in dict(state_dict.get("val_metrics") or {}).items()}
        self.empty_batches = int(state_dict.get("empty_batches", 0))   # 0 in checkpoints from before the count

    def summary(self, n: int = 10) -> dict[str, Any]:
        """First/last loss and the means of the first/last ``n`` steps (less noisy), ``None`` when empty."""
        if not self.losses:
            return {"first_loss": None, "last_loss": None, f"first{n}_mean_loss": None, f"last{n}_mean_loss": None}
        return {"first_loss": self.losses[0], "last_loss": self.losses[-1],
                f"first{n}_mean_loss": float(np.mean(self.losses[:n])),
                f"last{n}_mean_loss": float(np.mean(self.losses[-n:]))}


class FitClock(L.Callback):
    """The run's time across resumes, kept in checkpoints (plain numbers, as :class:`LossHistory` keeps losses).

    Each process (a *leg*: the first run, and every resume) times its own ``trainer.fit`` (from :meth:`start`,
    called just before it) and its whole ``train()`` call (from ``t_start``). A checkpoint stores the times of the
    legs before it plus this leg's up to the save, so the leg that resumes from it knows what the steps it
    continues cost: :meth:`totals` adds this leg's times to them. Time a leg spent after its last checkpoint (steps
    that the next leg trains again) is not counted: the totals are the cost of the steps the run kept.

    ``known`` is False once a leg resumed from a checkpoint written without this state (before it existed): the
    earlier legs' time is unknown, the totals cover only the legs since, and the mark is kept in this leg's
    checkpoints, so that a later resume does not read the totals as complete.
    """

    def __init__(self, t_start: float | None = None) -> None:
        self.t_start = time.perf_counter() if t_start is None else float(t_start)   # this leg's train() start
        self.t_fit: float | None = None           # this leg's trainer.fit start (start())
        self.prior_fit_s = 0.0                    # the legs before the checkpoint this leg resumed from
        self.prior_wall_s = 0.0
        self.prior_legs = 0
        self.restored = False                     # load_state_dict ran (this leg resumed from a checkpoint with it)
        self.known = True                         # every earlier leg's time is in prior_* (see the class docstring)

    def start(self) -> None:
        """Mark the start of this leg's ``trainer.fit``."""
        self.t_fit = time.perf_counter()

    def leg(self) -> tuple[float, float]:
        """This leg's ``(fit, wall)`` seconds so far."""
        now = time.perf_counter()
        return (0.0 if self.t_fit is None else now - self.t_fit), now - self.t_start

    def totals(self) -> dict[str, float | int]:
        """``fit_s`` / ``wall_s``: the legs before this one (as of the checkpoint it resumed from) + this leg so
        far; ``legs``: how many legs those are."""
        fit, wall = self.leg()
        return {"fit_s": self.prior_fit_s + fit, "wall_s": self.prior_wall_s + wall, "legs": self.prior_legs + 1}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resume has restored callback state before this hook (whatever the strategy): a checkpoint without ours
        # predates it (the earlier legs' time is unknown)
        if getattr(trainer, "ckpt_path", None) and not self.restored:
            self.known = False

    def state_dict(self) -> dict[str, Any]:
        return {**{k: (int(v) if k == "legs" else float(v)) for k, v in self.totals().items()}, "known": self.known}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prior_fit_s = float(state_dict.get("fit_s", 0.0))
        self.prior_wall_s = float(state_dict.get("wall_s", 0.0))
        self.prior_legs = int(state_dict.get("legs", 0))
        self.known = bool(state_dict.get("known", True))
        self.restored = True


# ----------------------------------------------------------------------------------------- resumable data order
class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` that can start an epoch ``skip`` batches in (indices only: no data is read to skip)."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[Any]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position is saved in checkpoints (Lightning's ``state_dict`` protocol).

    Lightning restores weights, optimiser, scheduler and loop counters, but a plain DataLoader restarts an
    interrupted epoch from its first batch. The DataModule's sampler already makes the order of every epoch a pure
    function of ``(seed, epoch)``; this loader adds the missing piece: ``state_dict()`` records ``(epoch, batches
    the trainer has processed in it)`` (as :func:`make_resumable` reads it from the trainer) and
    ``load_state_dict`` (called by Lightning before the first ``iter()`` of a resumed fit) sets the sampler's epoch
    and skips those batches at the index level.

    The position comes from the trainer (``progress`` callable) rather than from counting yielded batches, because
    Lightning's fetcher pre-fetches one batch ahead of the one being trained on. The epoch's length saved beside it
    (``epoch_batches``) is the trainer's too (``epoch_length`` callable): with ``limit_train_batches`` an epoch ends
    before the loader does, and a position saved at such an epoch's end must resume at the next epoch's first batch
    (not skip that many batches of it).

    ``sampler`` reads through to the batch sampler's sampler so Lightning sees the DataModule's DDP-aware
    ``DistributedSampler`` and neither replaces it nor wraps it again; ``set_epoch`` reaches it as usual.
    (Written here because neither Lightning nor torch offers a resumable map-style loader without extra packages.)
    """

    def __init__(self, dataset: Any, batch_sampler: ResumableBatchSampler, progress: Any = None,
                 epoch_length: Any = None, **kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.progress = progress            # () -> (epoch, batches of it done)
        self.epoch_length = epoch_length    # () -> the trainer's batches per epoch (None: unknown / unlimited)

    @property  # type: ignore[override]
    def sampler(self) -> Any:
        return self.batch_sampler.sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:  # DataLoader.__init__ assigns its default sampler: keep ours
        pass

    @classmethod
    def wrap(cls, loader: DataLoader, progress: Any, epoch_length: Any = None) -> DataLoader:
        """The same loader made resumable; returned unchanged when it has no plain sampler + batch size.

        Args:
            loader: the DataModule's training loader.
            progress: callable returning ``(epoch, batches of it done)``, the position saved in checkpoints.
            epoch_length: callable returning the batches the trainer takes per epoch (``None`` when unknown or not
                limited); the saved ``epoch_batches`` is the smaller of it and the loader's length.
        """
        if not isinstance(loader, DataLoader) or loader.batch_size is None or \
                type(loader.batch_sampler) is not BatchSampler:
            log.warning("train loader %r is not a plain DataLoader with a sampler: mid-epoch resume replays the "
                        "interrupted epoch from its start", type(loader).__name__)
            return loader
        kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        batch_sampler = ResumableBatchSampler(loader.batch_sampler.sampler, loader.batch_size, loader.drop_last)
        return cls(loader.dataset, batch_sampler, progress=progress, epoch_length=epoch_length, **kwargs)

    def _world(self) -> int:
        return int(getattr(self.sampler, "num_replicas", 1) or 1)

    def _epoch_batches(self) -> int:
        """The batches of an epoch as the trainer takes them: this loader's length, or fewer with the trainer's
        ``limit_train_batches``."""
        n = len(self)
        limit = self.epoch_length() if self.epoch_length is not None else None
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < n:
            n = limit
        return n

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches), "world": self._world(),
                "batch_size": int(self.batch_sampler.batch_size), "epoch_batches": self._epoch_batches()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        # the epoch's length in the checkpoint's own units, as the trainer took it (older checkpoints: this loader's)
        if batches >= int(state.get("epoch_batches", len(self))):   # saved on its last batch: next epoch afresh
            epoch, batches = epoch + 1, 0
        old = (int(state.get("world", self._world())), int(state.get("batch_size", self.batch_sampler.batch_size)))
        new = (self._world(), int(self.batch_sampler.batch_size))
        if batches and old != new:
            # Lightning restores its own count of the epoch's batches in the checkpoint's units and ends the epoch
            # when that count reaches this loader's length: with another rank count or batch size some of the
            # epoch's draws would be skipped (or repeated) whatever this loader skips, so the resume is refused
            from ecgfm.config import ConfigError

            raise ConfigError("resume", f"the checkpoint stopped {batches} batches into epoch {epoch} on {old[0]} "
                                        f"process(es) with batch size {old[1]}; resuming on {new[0]} process(es) "
                                        f"with batch size {new[1]} cannot continue that epoch without skipping or "
                                        f"repeating draws: resume with {old[0]} process(es) and "
                                        f"data.batch_size={old[1]}, or from a checkpoint saved at an epoch end")
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self.batch_sampler.skip = batches


class _ResumableTrainLoader:
    """Replacement for a DataModule's ``train_dataloader`` method (a picklable object, so ``ddp_spawn`` works)."""

    def __init__(self, datamodule: L.LightningDataModule, original: Any) -> None:
        self.datamodule = datamodule
        self.original = original

    def progress(self) -> tuple[int, int]:
        trainer = self.datamodule.trainer
        if _window_callback(trainer) is not None:
            # the batches up to the last optimiser step, where AccumulationWindowCheckpoint sets Lightning's count
            return trainer.current_epoch, stepped_batches(trainer)
        # without it Lightning resumes after the last batch it processed: the loader must too (else the epoch's
        # last batches were never trained)
        return trainer.current_epoch, int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def epoch_length(self) -> int | None:
        """The batches per epoch the trainer takes (``num_training_batches``: fewer than the loader's with
        ``limit_train_batches``); None when not attached or not a finite count."""
        trainer = getattr(self.datamodule, "trainer", None)
        n = getattr(trainer, "num_training_batches", None)
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    def train_dataloader(self) -> DataLoader:
        # bound methods (not closures): see make_resumable
        return ResumableDataLoader.wrap(self.original(), self.progress, self.epoch_length)


def make_resumable(datamodule: L.LightningDataModule) -> None:
    """Make ``datamodule.train_dataloader()`` return a :class:`ResumableDataLoader` (instance-level override).

    The position saved in checkpoints is read from the trainer the DataModule is attached to, the same one
    Lightning saves: the batches of the epoch it processed, or, when the trainer has
    :class:`AccumulationWindowCheckpoint` among its callbacks (``ecgfm.train.build.build_callbacks`` adds it), those
    up to the last optimiser step (:func:`stepped_batches`), where that callback sets Lightning's count back to.
    Without it, a checkpoint written inside a gradient-accumulation window resumes after its last micro-batch (the
    window's earlier gradients are lost, as in plain Lightning). The epoch's length saved beside the position is the
    trainer's too (``num_training_batches``, which ``limit_train_batches`` shortens).
    """
    # a bound method (not a closure): Lightning inspects its ``__code__`` and ``ddp_spawn`` pickles it
    datamodule.train_dataloader = _ResumableTrainLoader(datamodule, datamodule.train_dataloader).train_dataloader


def stepped_batches(trainer: L.Trainer) -> int:
    """The batches of the current epoch whose gradients have reached the weights: those Lightning processed, less
    the micro-batches of a gradient-accumulation window that has not stepped the optimiser yet.

    Lightning's accumulation windows start at every epoch's first batch; each steps the optimiser on its
    ``accumulate_grad_batches``-th batch, the epoch's last one on the epoch's last batch.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done = int(progress.current.processed)
    acc = int(trainer.accumulate_grad_batches)
    n = trainer.num_training_batches
    if acc > 1 and not progress.is_last_batch and not (isinstance(n, int) and done >= n):
        done -= done % acc
    return done


def _window_callback(trainer: L.Trainer) -> "AccumulationWindowCheckpoint | None":
    return next((c for c in getattr(trainer, "callbacks", None) or () if isinstance(c, AccumulationWindowCheckpoint)),
                None)


def window_rewind(trainer: L.Trainer) -> int:
    """The micro-batches a checkpoint written now is set back by (:class:`AccumulationWindowCheckpoint`): those of
    the current gradient-accumulation window processed so far, which the resumed run replays; 0 at an optimiser
    step or when the trainer lacks that callback."""
    if _window_callback(trainer) is None:
        return 0
    return max(int(trainer.fit_loop.epoch_loop.batch_progress.current.processed) - stepped_batches(trainer), 0)


class AccumulationWindowCheckpoint(L.Callback):
    """Checkpoints written inside a gradient-accumulation window resume at the window's start.

    With ``accumulate_grad_batches = k`` the gradients of a window's micro-batches add up in ``.grad`` until its k-th
    batch steps the optimiser, and a checkpoint holds no gradients. One written inside a window (the final save after
    ``trainer.max_time`` or a callback's ``should_stop``, Ctrl-C / SIGTERM's :class:`InterruptCheckpoint`, a periodic
    save on the first batch of a resumed run, a time- or validation-triggered save) recorded its last micro-batch as
    done: the resumed run started with the next micro-batch, and its first optimiser step summed the gradients of
    only the rest of the window (other weights than an uninterrupted run). This sets the epoch's batch counters of
    the saved fit loop (``epoch_loop.batch_progress``) back to the window's start, where :class:`ResumableDataLoader`
    records its position too (:func:`stepped_batches`): the resumed run replays the window's micro-batches and
    recomputes the gradients the checkpoint did not keep. Checkpoints at an optimiser step are left as they are.

    The window's micro-batches changed more than ``.grad``: every training forward pass moves the module's buffers
    (BatchNorm's ``running_mean`` / ``running_var`` / ``num_batches_tracked``), and the replay would count them
    twice. So, with ``accumulate_grad_batches > 1``, this callback clones the module's buffers that are in its
    ``state_dict`` at every window's first micro-batch (buffers only: BatchNorm statistics are small) and writes
    them into a set-back checkpoint's ``state_dict``: its weights and buffers are those of the window's start.
    A module that keeps other state of its own that the window's micro-batches advance (a random generator:
    :class:`~ecgfm.methods.simclr.SimCLRModule` with ``aug_seed``) is told by a call to its
    ``on_checkpoint_set_back(checkpoint, window_start)`` method, when it has one, just before Lightning calls its
    ``on_save_checkpoint`` for the same checkpoint (Lightning calls the callbacks' hook first):
    ``window_start`` is the fit's count of processed batches (``batch_progress.total.processed``) at the window's
    first micro-batch, so that the module saves the state it kept there.

    Lightning's logger step (``_batches_that_stepped``) is kept exact too: see :meth:`on_train_batch_start`.
    """

    #: the LightningModule method told of a set-back checkpoint (see the class docstring)
    MODULE_HOOK = "on_checkpoint_set_back"

    def __init__(self) -> None:
        self._restored_steps: int | None = None   # the logger step of a set-back checkpoint this fit resumed from
        self._buffer_keys: set[str] | None = None  # the module's buffers that are in its state_dict (once per fit)
        # (batch_progress.total.processed at the current window's first micro-batch, its buffers there)
        self._window: tuple[int, dict[str, torch.Tensor]] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("rewound", 0)) > 0 and "batches_that_stepped" in state_dict:
            self._restored_steps = int(state_dict["batches_that_stepped"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._buffer_keys = None
        self._window = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the window's buffers stay: the final checkpoint is written after fit returns (save_final_checkpoint)
        self._restored_steps = None

    def _snapshot_buffers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clone the module's ``state_dict`` buffers at a window's first micro-batch (before its forward pass)."""
        if self._buffer_keys is None:
            self._buffer_keys = set(pl_module.state_dict().keys())
        keys = self._buffer_keys
        buffers = {name: buf.detach().clone() for name, buf in pl_module.named_buffers() if name in keys}
        self._window = (int(trainer.fit_loop.epoch_loop.batch_progress.total.processed), buffers)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """At a window's first micro-batch (``accumulate_grad_batches > 1``), clone the module's buffers (see the
        class docstring). Then undo the logger step Lightning adds before the first batch of a run resumed from a
        set-back checkpoint.

        Its counters all agree ("restarted on last" in ``TrainingEpochLoop``: the state Lightning itself saves
        during a validation inside ``on_advance_end``, before that batch's ``_batches_that_stepped += 1``). When the
        restored position is a validation-check one (``_should_check_val_fx`` true for the window start's previous
        batch, or for batch index -1 at an epoch's first window), Lightning's first ``advance`` returns without
        training (``_skip_next_val``) and that ``on_advance_end`` adds 1 for the restored batch, which had stepped
        the optimiser (the window start is an accumulation boundary) and was already counted when the checkpoint was
        saved: the logger step ended one higher than in an uninterrupted run. Nothing else moves the count before
        the first batch of a set-back checkpoint (``reset``'s +1 is for "restarted on train batch end", counters
        these checkpoints never have), so exactly one more than the saved count is that step, and is undone here.
        """
        acc = int(trainer.accumulate_grad_batches)
        if acc > 1 and batch_idx % acc == 0:       # Lightning's windows start at every multiple of acc in an epoch
            self._snapshot_buffers(trainer, pl_module)
        restored, self._restored_steps = self._restored_steps, None
        if restored is None:
            return
        loop = trainer.fit_loop.epoch_loop
        if int(loop._batches_that_stepped) == restored + 1:
            loop._batches_that_stepped = restored

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        back = int(progress.current.processed) - stepped_batches(trainer)
        if back <= 0 or "loops" not in checkpoint:      # at an optimiser step, or a weights-only save
            return
        # this callback's state (plain data; restored by load_state_dict): the logger step at the window's start
        checkpoint.setdefault("callbacks", {})[self.state_key] = {
            "rewound": int(back), "batches_that_stepped": int(trainer.fit_loop.epoch_loop._batches_that_stepped)}
        saved = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if not isinstance(saved, dict):
            log.warning("checkpoint at step %d, %d micro-batch(es) into a gradient-accumulation window: no fit-loop "
                        "batch counters found to set back to the window's start (another Lightning version?); a "
                        "resume from it does not continue the epoch exactly", trainer.global_step, back)
            return
        # every counter at the window's start, as after a finished batch: on restart Lightning then counts no further
        # batch or optimiser step (Lightning's own saves inside on_train_batch_end leave `completed` one behind)
        for part in ("current", "total"):
            at = int(getattr(progress, part).processed) - back
            saved[part].update(ready=at, started=at, processed=at, completed=at)
        saved["is_last_batch"] = False
        # the module's buffers as at the window's start (the resumed run's replay moves them again)
        start = int(progress.total.processed) - back
        window = self._window
        state = checkpoint.get("state_dict")
        if window is not None and window[0] == start:
            if isinstance(state, dict):
                for name, buf in window[1].items():   # the clones are never written to: shared by every such save
                    if name in state:
                        state[name] = buf
        elif any(True for _ in pl_module.buffers()):
            # this process did not see the window's first micro-batch (it resumed inside the window from a checkpoint
            # that was not set back): the buffers keep the window's micro-batches, which the resumed run replays
            log.warning("checkpoint at step %d set back %d micro-batch(es) to a gradient-accumulation window's start "
                        "that this process did not train: the module's buffers (BatchNorm statistics) are saved as "
                        "after those micro-batches, which a resume replays", trainer.global_step, back)
        hook = getattr(pl_module, self.MODULE_HOOK, None)
        if callable(hook):
            hook(checkpoint, start)


def _counted_stop(trainer: L.Trainer) -> str | None:
    """Where ``trainer.fit`` returned in an epoch that its epoch counter already counts as finished: ``"mid"``
    (inside it), ``"end"`` (right after its last batch, the batch count still that epoch's), or None."""
    fl = trainer.fit_loop
    done = int(fl.epoch_loop.batch_progress.current.completed)
    n = trainer.num_training_batches
    counted = all(c.completed == c.started and c.completed > 0
                  for c in (fl.epoch_progress.current, fl.epoch_progress.total))
    if not (isinstance(n, int) and counted and done > 0):
        return None
    return "mid" if done < n else "end" if done == n else None


def stopped_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether ``trainer.fit`` returned inside an epoch that its epoch counter already counts as finished (see
    :func:`save_final_checkpoint`): then ``trainer.current_epoch`` is one more than the epochs completed."""
    return _counted_stop(trainer) == "mid"


def save_final_checkpoint(trainer: L.Trainer, path: str | Any, validated: bool = False) -> None:
    """Save the state ``trainer.fit`` ended in, as a checkpoint a rerun resumes exactly.

    When fit stops inside an epoch (``trainer.max_time``, ``max_steps`` reached mid-epoch, ``should_stop``),
    Lightning's fit loop has counted that epoch as finished by the time fit returns: a checkpoint saved then says
    "epoch e + 1, k batches done" for "epoch e, k batches done", and the resumed run would skip the rest of epoch e
    and the first k batches of epoch e + 1. Lightning has no call for this, so the epoch counters are set back for
    the save (only when the stop was mid-epoch and the counter did move) and restored after it.

    A fit that ends right after an epoch's last batch (``max_steps`` reached there) is counted the same way, read on
    resume as "epoch e + 1, all its batches done" (the resumed run skipped or replayed batches). Measured with
    Lightning 2.6: after an epoch-end validation it is saved as "epoch e, all its batches done" (as mid-epoch stops
    are); without one, as the start of epoch e + 1 (no batch of it done). A stop inside a gradient-accumulation
    window is saved at the window's start (:class:`AccumulationWindowCheckpoint`, a callback of every run).

    Args:
        trainer: the trainer ``fit`` returned from.
        path: the checkpoint file.
        validated: a validation ran at the step fit ended at (decides how a stop at an epoch's end is saved).
    """
    fl = trainer.fit_loop
    counters = (fl.epoch_progress.current, fl.epoch_progress.total)
    batches = fl.epoch_loop.batch_progress.current
    stop = _counted_stop(trainer)
    rewind = stop == "mid" or (stop == "end" and validated)     # "epoch e, k (or all) batches done"
    restart = stop == "end" and not validated                   # "epoch e + 1, no batch done"
    if rewind:
        for c in counters:
            c.processed -= 1
            c.completed -= 1
    kept = (batches.ready, batches.started, batches.processed, batches.completed)
    if restart:
        batches.ready = batches.started = batches.processed = batches.completed = 0
    try:
        # weights_only=False: the whole training state (optimiser, schedulers, loops, callbacks) is what a resume
        # needs; left unset, Lightning logs "`weights_only` was not set, defaulting to `False`" on every run, which
        # reads like an unsafe load (loads here are always weights_only=True: ecgfm.train.checkpoints)
        trainer.save_checkpoint(str(path), weights_only=False)
    finally:
        if rewind:
            for c in counters:
                c.processed += 1
                c.completed += 1
        if restart:
            batches.ready, batches.started, batches.processed, batches.completed = kept


class InterruptCheckpoint(L.Callback):
    """Write ``last.ckpt`` when a fit is interrupted (Ctrl-C, ``SIGTERM`` from a scheduler), so a rerun resumes
    from the step it stopped at, not from the last periodic checkpoint (up to ``every_n_train_steps`` back).

    Lightning calls ``on_exception`` before it exits (``sys.exit(1)`` after Ctrl-C, a code-less ``SystemExit``
    after ``SIGTERM``: status 0, which a scheduler reads as success); :attr:`signal` says which it was, so the entry
    point can end with a message and the conventional status (130 / 143). Other exceptions (a divergence, a data
    error) are left alone: their state is not worth resuming from. One process only: under DDP a save is a
    collective that would wait for ranks the interrupt may not have reached (DDP runs resume from the periodic
    checkpoints; under SLURM, Lightning's own requeue checkpoint).

    Args:
        path: the ``last.ckpt`` to write.
    """

    def __init__(self, path: Any) -> None:
        self.path = path
        self.signal: str | None = None
        self.saved = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self.signal = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"
        else:
            return
        if trainer.global_step == 0 or trainer.world_size > 1:
            return
        try:   # a failed save must not hide the interrupt; the periodic checkpoints are still there
            save_final_checkpoint(trainer, self.path)
            self.saved = True
        except Exception as exc:  # noqa: BLE001
            log.warning("interrupted at step %d: last.ckpt could not be written (%s)", trainer.global_step, exc)

