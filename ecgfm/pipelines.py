"""The training pipeline behind ``train.py``: config in, checkpoints + exported encoder + summary out.

:func:`train` is what the root ``train.py`` (Hydra) and the tests call. It

1. validates the composed config (:func:`ecgfm.config.validate_train_config`: typos and wrong types fail early,
   naming the key);
2. prepares or reuses every corpus cache the data node asks for (:func:`prepare_cache`: keyed by the source
   arguments and the preprocessing fingerprint, file-locked so DDP ranks do not prepare twice);
3. builds the DataModule, the backbone (``ecgfm.backbones.create_backbone`` + name) and the method from their
   ``_target_`` nodes with explicit arguments;
4. fits with a Lightning ``Trainer`` (periodic + last checkpoints, auto-resume from
   ``<out_dir>/checkpoints/last.ckpt`` or ``resume=<path>``, checkpoints loaded with ``weights_only=True``);
5. exports the encoder (:func:`ecgfm.export.export_encoder`) with the cache's preprocessing spec and the crop
   length to ``<out_dir>/encoder/`` and writes ``<out_dir>/summary.json``.

Resume reproduces the uninterrupted run: Lightning restores weights, optimiser, scheduler and loop position;
:class:`StepSeedCallback` makes every step's random draws (masks, augmentations, dropout) a function of
``(seed, rank, global_step)`` instead of the history of the global RNG; the DataModule's sampler order is a
function of ``(seed, epoch)`` and its train loader is resumable (Lightning saves its ``state_dict``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import Throughput
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader

from ecgfm.accel import use_onednn_linears
from ecgfm.config import ConfigError, strip_params, validate_train_config
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError

log = logging.getLogger(__name__)

PREPARED_MARKER = ".ecgfm_prepared.json"
# Source-constructor arguments that name files or folders: checked before anything is built.
_PATH_KEYS = ("root", "path", "labels_csv", "cache_dir")


# ------------------------------------------------------------------------------------------------------ caches
def _container(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_data_paths(node: Any, key: str = "data") -> None:
    """Raise :class:`ECGDataError` for a path argument (``root``, ``labels_csv``...) that does not exist.

    Walks nested ``_target_`` nodes so a wrong ``data.root`` is reported with the path and the key to change,
    before any reader or cache is built.
    """
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_data_paths(item, f"{key}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    for k in node:
        child = node._get_node(k)
        sub = f"{key}.{k}"
        if isinstance(child, (DictConfig, ListConfig)):
            check_data_paths(child, sub)
        elif k in _PATH_KEYS and "_target_" in node:
            value = node[k]
            if value is None:
                continue
            path = Path(str(value))
            if k == "labels_csv" and not path.is_absolute() and node.get("root") is not None and \
                    (Path(str(node["root"])) / path).exists():   # readers accept a CSV path relative to root
                continue
            if not path.exists():
                raise ECGDataError(Path(str(value)).resolve(), f"data path does not exist (config key '{sub}'; point "
                                   "it to the data, e.g. paths.data_root=/folder/holding/datasets or "
                                   "data.params.root=/path)")


def cache_key(sources: Any, spec: PreprocessSpec) -> str:
    """Stable 12-hex-digit key of a list of source configs (``_target_`` + arguments) and a preprocessing spec."""
    payload = json.dumps({"sources": _container(sources), "spec": spec.fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # fcntl.flock (stdlib) so that concurrent DDP ranks / sweep jobs prepare a cache once; the others wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_cache(sources: Sequence[Any], cache_root: str, preprocess: Any, name: str = "corpus",
                  workers: int = 0, shard_records: int | None = None, progress: bool = True) -> str:
    """Return the folder of a prepared cache of ``sources``, preparing it on first use.

    The folder is ``<cache_root>/<name>-<key>`` with ``key = cache_key(sources, spec)``: changing a source
    argument (number of synthetic records, root...) or the preprocessing gives a new cache; the same config reuses
    the existing one. Preparation is resumable (``prepare_corpus``), marked complete by a small JSON file, and
    guarded by a file lock.

    Args:
        sources: ``_target_`` configs of :class:`~ecgfm.data.record.RecordSource` objects (instantiated here, only
            when the cache is missing), or already-built sources.
        cache_root: folder holding caches.
        preprocess: :class:`PreprocessSpec` or a dict of its fields.
        name: readable prefix of the folder name.
        workers: conversion worker processes (0: in-process).
        shard_records: records per shard (None: ``prepare_corpus``'s default).
        progress: show a progress bar while preparing.

    Returns:
        The cache folder (str).

    Raises:
        ECGDataError: a source path does not exist, or the source data is unreadable.
    """
    from ecgfm.data.cache import prepare_corpus

    spec = preprocess if isinstance(preprocess, PreprocessSpec) else PreprocessSpec.from_dict(_container(preprocess))
    configs = [s for s in sources if isinstance(s, (DictConfig, dict))]
    described = [_container(s) if isinstance(s, (DictConfig, dict)) else repr(s) for s in sources]
    out = Path(cache_root) / f"{name}-{cache_key(described, spec)}"
    marker = out / PREPARED_MARKER
    if marker.exists():
        return str(out)
    for i, cfg in enumerate(configs):
        check_data_paths(OmegaConf.create(_container(cfg)), f"{name}.sources[{i}]")
    with _file_lock(Path(cache_root) / f".{out.name}.lock"):
        if marker.exists():  # another process finished while we waited
            return str(out)
        built = [instantiate(s, _convert_="all") if isinstance(s, (DictConfig, dict)) else s for s in sources]
        log.info("preparing cache %s from %d source(s)", out, len(built))
        kwargs: dict[str, Any] = {"workers": workers, "progress": progress}
        if shard_records is not None:
            kwargs["shard_records"] = shard_records
        report = prepare_corpus(built, out, spec, **kwargs)
        info = {"sources": described, "spec": spec.to_dict()}
        for attr in ("n_planned", "n_converted", "n_skipped", "wall_s"):
            if hasattr(report, attr):
                info[attr] = _jsonable(getattr(report, attr))
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, marker)
    return str(out)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def build_cache_dirs(data_cfg: DictConfig) -> list[str]:
    """Resolve ``data.cache_dirs``: plain paths are checked, ``_target_`` entries (e.g. :func:`prepare_cache`)
    are called. Returns the list of cache folders."""
    if "cache_dirs" not in data_cfg:
        return []
    dirs: list[str] = []
    for i, entry in enumerate(data_cfg._get_node("cache_dirs")):
        key = f"data.cache_dirs[{i}]"
        if isinstance(entry, DictConfig) and "_target_" in entry:
            dirs.append(str(instantiate(entry)))
        else:
            path = Path(str(entry._value() if hasattr(entry, "_value") else entry))
            if not path.exists():
                raise ECGDataError(path.resolve(), f"cache folder does not exist (config key '{key}'; prepare it "
                                   "with scripts/prepare.py or use data=synthetic / data=ptbxl)")
            dirs.append(str(path))
    return dirs


# ---------------------------------------------------------------------------------------------------- callbacks
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
        digest = hashlib.sha256(repr((self.seed,) + parts).encode()).digest()
        s = int.from_bytes(digest[:8], "little") & (2**63 - 1)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._reseed(trainer.global_rank, trainer.global_step, 0)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._reseed(trainer.global_rank, trainer.global_step, 1, batch_idx)


class ThroughputCallback(L.Callback):
    """Log training throughput (``train/samples_per_s``, all ranks together) to the progress bar and loggers.

    Uses Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput` rolling window.
    """

    def __init__(self, window_size: int = 5) -> None:
        self.window_size = window_size
        self._throughput: Throughput | None = None
        self._t0 = 0.0
        self._samples = 0
        self._batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput = Throughput(window_size=self.window_size, world_size=trainer.world_size)
        self._t0 = time.perf_counter()
        self._samples = self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._throughput is None:
            return
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        self._batches += 1
        self._samples += int(x.shape[0])
        self._throughput.update(time=time.perf_counter() - self._t0, batches=self._batches, samples=self._samples)
        metrics = self._throughput.compute()
        rate = metrics.get("device/samples_per_sec")
        if rate is not None:
            pl_module.log("train/samples_per_s", float(rate) * trainer.world_size, prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=int(x.shape[0]))


class LossHistory(L.Callback):
    """Record ``(global_step, loss)`` of every training step on this rank; kept in checkpoints so a resumed run
    still knows its first loss. Plain lists of numbers: loadable with ``weights_only=True``."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.steps.append(int(trainer.global_step))
            self.losses.append(float(loss.detach().float().cpu()))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self.losses = [float(v) for v in state_dict.get("losses", [])]

    def summary(self, n: int = 10) -> dict[str, Any]:
        """First/last loss and the means of the first/last ``n`` steps (less noisy), ``None`` when empty."""
        if not self.losses:
            return {"first_loss": None, "last_loss": None, f"first{n}_mean_loss": None, f"last{n}_mean_loss": None}
        return {"first_loss": self.losses[0], "last_loss": self.losses[-1],
                f"first{n}_mean_loss": float(np.mean(self.losses[:n])),
                f"last{n}_mean_loss": float(np.mean(self.losses[-n:]))}


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
    the trainer has processed in it)`` and ``load_state_dict`` (called by Lightning before the first ``iter()`` of
    a resumed fit) sets the sampler's epoch and skips those batches at the index level.

    The position comes from the trainer (``progress`` callable) rather than from counting yielded batches, because
    Lightning's fetcher pre-fetches one batch ahead of the one being trained on.

    ``sampler`` reads through to the batch sampler's sampler so Lightning sees the DataModule's DDP-aware
    ``DistributedSampler`` and neither replaces it nor wraps it again; ``set_epoch`` reaches it as usual.
    (Written here because neither Lightning nor torch offers a resumable map-style loader without extra packages.)
    """

    def __init__(self, dataset: Any, batch_sampler: ResumableBatchSampler, progress: Any = None, **kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.progress = progress

    @property  # type: ignore[override]
    def sampler(self) -> Any:
        return self.batch_sampler.sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:  # DataLoader.__init__ assigns its default sampler: keep ours
        pass

    @classmethod
    def wrap(cls, loader: DataLoader, progress: Any) -> DataLoader:
        """The same loader made resumable; returned unchanged when it has no plain sampler + batch size."""
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
        return cls(loader.dataset, batch_sampler, progress=progress, **kwargs)

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if batches >= len(self):  # saved on the last batch of an epoch: the next epoch starts afresh
            epoch, batches = epoch + 1, 0
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
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader.wrap(self.original(), self.progress)


def make_resumable(datamodule: L.LightningDataModule) -> None:
    """Make ``datamodule.train_dataloader()`` return a :class:`ResumableDataLoader` (instance-level override).

    The position saved in checkpoints is read from the trainer the DataModule is attached to.
    """
    # a bound method (not a closure): Lightning inspects its ``__code__`` and ``ddp_spawn`` pickles it
    datamodule.train_dataloader = _ResumableTrainLoader(datamodule, datamodule.train_dataloader).train_dataloader


# ------------------------------------------------------------------------------------------------------ helpers
def find_resume_checkpoint(out_dir: Path, resume: str | None) -> str | None:
    """Checkpoint to resume from: ``resume`` if given (must exist), else the newest of
    ``<out_dir>/checkpoints/last.ckpt`` and Lightning's SLURM pre-emption checkpoints ``<out_dir>/hpc_ckpt_*.ckpt``
    (written on SIGUSR1 when Lightning requeues a SLURM job), else ``None``."""
    if resume:
        path = Path(resume)
        if not path.is_file():
            raise ConfigError("resume", f"checkpoint not found: {path.resolve()}")
        return str(path)
    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return str(max(candidates, key=lambda p: p.stat().st_mtime_ns)) if candidates else None


def compile_backbone(backbone: torch.nn.Module) -> torch.nn.Module:
    """Compile the backbone's hot path in place with ``torch.compile``.

    ``forward_features`` (used by ``embed``/``forward`` and by the methods) is replaced by its compiled version on
    the instance, so parameter names, checkpoints and the exported encoder are unchanged.
    """
    backbone.forward_features = torch.compile(backbone.forward_features)  # type: ignore[method-assign]
    return backbone


def _cache_spec(cache_dirs: Sequence[str], key_hint: str = "data.cache_dirs") -> tuple[PreprocessSpec, float]:
    """The preprocessing spec and rate shared by every cache (an error if they differ)."""
    from ecgfm.data.cache import CorpusCache

    specs = [(d, CorpusCache(d).spec) for d in cache_dirs]
    first = specs[0][1]
    for d, spec in specs[1:]:
        if spec != first:
            raise ConfigError(key_hint, f"caches were prepared with different preprocessing: {specs[0][0]} has "
                                        f"{first.to_dict()}, {d} has {spec.to_dict()}")
    fs = float(CorpusCache(cache_dirs[0]).fs)
    return first, fs


def build_callbacks(cfg: DictConfig, out_dir: Path) -> tuple[list[L.Callback], LossHistory]:
    """Checkpointing, progress bar, throughput, per-step seeding and loss history."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    history = LossHistory()
    callbacks: list[L.Callback] = [history, ThroughputCallback()]
    if cfg.deterministic_steps:
        callbacks.insert(0, StepSeedCallback(cfg.seed))
    ck = cfg.checkpoint
    # save_top_k > 1 keeps the k newest periodic checkpoints: rank them by "step", which ModelCheckpoint always
    # offers as a monitor candidate (monitor=None only allows -1, 0 or 1).
    monitor = "step" if ck.save_top_k > 1 else None
    callbacks.append(ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), filename="step{step:07d}",
                                     auto_insert_metric_name=False, every_n_train_steps=ck.every_n_train_steps,
                                     save_top_k=ck.save_top_k, save_last=ck.save_last, monitor=monitor,
                                     mode="max"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh))
    return callbacks, history


def build_logger(cfg: DictConfig, out_dir: Path) -> Any:
    """Instantiate ``cfg.logger`` (``False`` when it is null). A W&B logger stays offline unless the user asked for
    online mode (``WANDB_MODE=online`` or ``logger.offline=false``)."""
    node = cfg.get("logger")
    if node is None:
        return False
    kwargs: dict[str, Any] = {}
    if str(node.get("_target_", "")).endswith("WandbLogger"):
        if os.environ.get("WANDB_MODE", "").lower() == "online":
            kwargs["offline"] = False
        Path(str(node.get("save_dir") or out_dir)).mkdir(parents=True, exist_ok=True)
    return instantiate(node, **kwargs, _convert_="all")


# --------------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain a backbone with a self-supervised method as described by ``cfg`` (``conf/train.yaml``).

    Args:
        cfg: composed config (from ``train.py`` or ``hydra.compose``).

    Returns:
        The summary written to ``<out_dir>/summary.json``: ``method``, ``backbone``, ``steps``, ``epochs``,
        ``first_loss``/``last_loss`` (train split, this rank) and means of the first/last 10 steps,
        ``wall_time_s``, ``resumed_from``, ``out_dir``, ``last_checkpoint``, ``encoder_dir``, ``cache_dirs``.

    Raises:
        ConfigError: a wrong key, type or value in the config.
        ECGDataError: a data path that does not exist or unreadable data.
    """
    t_start = time.perf_counter()
    cfg = validate_train_config(cfg)
    out_dir = Path(str(cfg.out_dir)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.torch_threads is not None:
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data_cfg = strip_params(cfg.data)
    check_data_paths(data_cfg)
    cache_dirs = build_cache_dirs(data_cfg)
    data_kwargs: dict[str, Any] = {"cache_dirs": cache_dirs} if "cache_dirs" in data_cfg else {}
    datamodule = instantiate(data_cfg, **data_kwargs, _convert_="all")
    make_resumable(datamodule)

    backbone = instantiate(cfg.backbone, _convert_="all")
    model = instantiate(cfg.method, backbone=backbone, _convert_="all")
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu" or not torch.cuda.is_available():
        try:  # float32 CPU linears on oneDNN: same mathematics, faster GEMMs on non-Intel CPUs (ecgfm/accel.py)
            n_linear = use_onednn_linears(model, str(cfg.cpu_linear))
        except ValueError as err:
            raise ConfigError("cpu_linear", str(err)) from None
        log.info("cpu_linear=%s: %d linear layers on oneDNN", cfg.cpu_linear, n_linear)
    if cfg.compile:
        compile_backbone(model.backbone)

    callbacks, history = build_callbacks(cfg, out_dir)
    logger = build_logger(cfg, out_dir)
    trainer = instantiate(cfg.trainer, default_root_dir=str(out_dir), callbacks=callbacks, logger=logger,
                          _convert_="all")
    ckpt_path = find_resume_checkpoint(out_dir, cfg.resume)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_s = time.perf_counter() - t_fit
    last = out_dir / "checkpoints" / "last.ckpt"
    ck = trainer.checkpoint_callback
    if cfg.checkpoint.save_last and ck is not None and not trainer.fast_dev_run and \
            getattr(ck, "_last_global_step_saved", -1) != trainer.global_step:
        # ModelCheckpoint saves every N steps; make last.ckpt the final state so a rerun does not repeat steps.
        trainer.save_checkpoint(str(last))

    summary: dict[str, Any] = {
        "method": str(cfg.method._target_).rsplit(".", 1)[-1],
        "backbone": getattr(model.backbone, "name", type(model.backbone).__name__),
        "n_parameters": int(sum(p.numel() for p in model.backbone.parameters())),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "split": "train",
        **history.summary(),
        "loss_history_steps": len(history.losses),
        "fit_time_s": fit_s,
        "resumed_from": ckpt_path,
        "out_dir": str(out_dir),
        "cache_dirs": cache_dirs,
        "crop_samples": int(cfg.crop_samples),
        # last validation-epoch values (validation split): val/loss, val/<terms>, val/probe_auroc when enabled
        "val_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    summary["last_checkpoint"] = str(last) if last.is_file() else None
    if cfg.export and trainer.is_global_zero:
        from ecgfm.export import export_encoder

        if cache_dirs:
            spec, fs = _cache_spec(cache_dirs)
        else:
            spec = PreprocessSpec.from_dict(OmegaConf.to_container(cfg.preprocess, resolve=True))
            fs = float(spec.fs or 0.0)
        enc_dir = out_dir / "encoder"
        export_encoder(model.backbone, enc_dir, spec, extra={
            "fs": fs, "crop_samples": int(cfg.crop_samples), "crop_seconds": int(cfg.crop_samples) / fs if fs else None,
            "method": summary["method"], "steps": summary["steps"], "seed": int(cfg.seed),
            "method_hparams": _jsonable(OmegaConf.to_container(cfg.method, resolve=True)),
            # what the encoder saw: the benchmarking leakage guard compares these caches with test splits
            "pretrain_caches": [str(Path(c).resolve()) for c in cache_dirs or []],
        })
        summary["encoder_dir"] = str(enc_dir)
    else:
        summary["encoder_dir"] = None
    summary["wall_time_s"] = time.perf_counter() - t_start
    if trainer.is_global_zero:
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out_dir / "summary.json")
    return summary
