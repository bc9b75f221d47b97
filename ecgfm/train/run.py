"""The training pipeline behind ``train.py``: config in, checkpoints + exported encoder + summary out.

:func:`train` is what ``ecgfm-train`` / ``python train.py`` (Hydra, through :func:`ecgfm.train.report.run_cli`)
and the tests call. It

1. validates the composed config (:func:`ecgfm.config.validate_train_config`: typos and wrong types fail early,
   naming the key);
2. decides between resuming (last.ckpt, else the furthest periodic checkpoint of the run folder that loads, or
   ``resume=<path>``) and a fresh start, which is refused in a folder holding a trained run unless
   ``overwrite=true`` (:mod:`ecgfm.train.checkpoints`);
3. prepares or reuses every corpus cache the data node asks for (:func:`ecgfm.data.prepare.prepare_cache`), reads
   their preprocessing (recorded as ``preprocess``: :func:`~ecgfm.train.build.adopt_cache_preprocess`, which refuses
   a ``preprocess.*`` set to another value) and sampling rate and converts ``crop_seconds`` to samples at that rate
   (``${crop_samples}`` in the data and backbone nodes follows; a ``data.crop_samples`` or literal ``method.fs``
   that differs is refused);
4. builds the DataModule, the backbone (``ecgfm.backbones.create_backbone`` + name) and the method from their
   ``_target_`` nodes with explicit arguments;
5. fits with a Lightning ``Trainer`` (atomic periodic + last checkpoints, :class:`~ecgfm.train.safety.NonFiniteGuard`,
   checkpoints loaded with ``weights_only=True``);
6. exports the encoder (:func:`ecgfm.export.export_encoder`) with the cache's preprocessing spec, rate and crop to
   ``<out_dir>/encoder/`` (after checking its weights are finite) and writes ``<out_dir>/summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ecgfm.accel import use_onednn_linears
from ecgfm.config import ConfigError, check_data_mirrors, crop_samples_for, strip_params, validate_train_config
from ecgfm.data.cache import cache_digest
from ecgfm.data.datamodules import open_pretext_targets
from ecgfm.data.prepare import build_cache_dirs, check_data_paths
from ecgfm.io import atomic_write_json, atomic_write_text, jsonable
from ecgfm.train.build import (adopt_cache_preprocess, build_callbacks, build_logger, check_backbone_fits_crop,
                               compile_backbone, crop_targets_for, data_rate, log_dir, method_fs,
                               pretext_targets_for)
from ecgfm.train.checkpoints import (AtomicCheckpointIO, DataFacts, check_resume_config, find_resume_checkpoint,
                                     guard_fresh_start, remove_stale_temporaries)
from ecgfm.train.loop import FitClock, make_resumable, save_final_checkpoint, stepped_batches, stopped_mid_epoch
from ecgfm.train.report import train_on_advice
from ecgfm.train.safety import NonFiniteGuard, check_finite_state

log = logging.getLogger(__name__)

__all__ = ["train"]


def exported_method_name(method_class: str, aux_targets: str | None) -> str:
    """The method an exported encoder names (its rows' method in benchmark tables): the module class
    (``SimCLRModule``), or with pretext targets ``SimCLR+handcrafted-pretext``, so that an encoder trained to keep
    the handcrafted statistics is never read as plain SimCLR."""
    if not aux_targets:
        return method_class
    return f"{method_class.removesuffix('Module')}+{aux_targets}-pretext"


def _built(key: str, node: Any, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; a value its constructor refuses (``ValueError``: ``method.mask_ratio=1.5``,
    ``data.batch_size=0``) is a :class:`ConfigError` naming the config node, not Hydra's traceback."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(key, str(cause)) from None
        raise


def _rebased_summary(summary: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """A finished run's stored summary with its paths under ``out_dir``, where the run now is.

    The summary names its folder, encoder, logs and checkpoint by absolute path; a run folder moved or copied since
    then and rerun (nothing to train) printed the old folder's paths: missing after a move, another run's after a
    copy. Paths under the stored ``out_dir`` are rewritten to the same place under ``out_dir``, with a warning.
    """
    old = summary.get("out_dir")
    new = str(out_dir)
    if not isinstance(old, str) or os.path.abspath(old) == os.path.abspath(new):
        return summary
    log.warning("the run folder was %s when it finished and is %s now: its paths are given under the new folder "
                "(summary.json keeps the old ones)", old, new)
    prefix = old.rstrip(os.sep) + os.sep

    def rebase(v: Any) -> Any:
        if isinstance(v, str) and (v == old or v.startswith(prefix)):
            return new + v[len(old.rstrip(os.sep)):]
        if isinstance(v, list):
            return [rebase(x) for x in v]
        if isinstance(v, dict):
            return {k: rebase(x) for k, x in v.items()}
        return v

    return {k: rebase(v) for k, v in summary.items()}


def _check_schedule(cfg: DictConfig) -> None:
    """The learning-rate schedule (``method.max_steps``, warm-up ``method.warmup_steps``) against the run's length.

    Raises:
        ConfigError: ``trainer.max_steps`` beyond ``method.max_steps``: the steps after the schedule's end would
            train at learning rate 0 while the export counts them. (Fewer steps than the schedule is allowed: a
            budgeted stop, warned about after the fit and recorded as ``stop_reason``.)
    """
    sched = int(cfg.method.get("max_steps") or 0)
    steps = int(cfg.trainer.get("max_steps", -1) or -1)
    if sched > 0 and steps > sched:
        raise ConfigError("method.max_steps", f"trainer.max_steps={steps} runs past the learning-rate schedule's "
                                              f"method.max_steps={sched}: its last {steps - sched} steps would "
                                              f"train at learning rate 0; set method.max_steps={steps} (its "
                                              f"default follows trainer.max_steps)")
    warm = cfg.method.get("warmup_steps")
    if sched > 0 and warm is not None and int(warm) >= sched:
        log.warning("method.warmup_steps=%d >= the schedule's %d steps: the whole run is warm-up and never reaches "
                    "the peak learning rate (method.lr)", int(warm), sched)


def _exit_interrupted(callbacks: list[Any], trainer: Any, out_dir: Path) -> None:
    """After an interrupted fit: one ``error:`` line (where the run stands, how to resume) and the conventional
    status, 130 after Ctrl-C, 143 after SIGTERM. Returns (the caller re-raises) when the exit was not an
    interrupt."""
    from ecgfm.train.loop import InterruptCheckpoint

    stop = next((c for c in callbacks if isinstance(c, InterruptCheckpoint)), None)
    if stop is None or stop.signal is None:
        return
    saved = (f"{stop.path} written at step {trainer.global_step}: rerun the same command to resume" if stop.saved
             else "no checkpoint written at this step: a rerun resumes from the newest periodic checkpoint, if any")
    msg = f"interrupted ({stop.signal}) in {out_dir}; {saved}"
    log.error(msg)
    if trainer.is_global_zero:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(130 if stop.signal == "SIGINT" else 143)


def _stop_reason(trainer: Any, max_steps: int) -> str:
    """What ended a fit: ``max_steps``, ``max_time`` (Lightning's Timer), ``max_epochs``, ``interrupted``,
    ``fast_dev_run`` (``trainer=debug``: Lightning runs that many batches whatever the step / epoch limits say) or
    ``early_stop`` (a callback's ``should_stop``)."""
    if trainer.interrupted:
        return "interrupted"
    if getattr(trainer, "fast_dev_run", False):
        return "fast_dev_run"
    if max_steps > 0 and trainer.global_step >= max_steps:
        return "max_steps"
    timer = next((c for c in trainer.callbacks if type(c).__name__ == "Timer"), None)
    if timer is not None and getattr(timer, "_duration", None) is not None and \
            timer.time_elapsed("train") >= timer._duration:
        return "max_time"
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs:
        return "max_epochs"
    return "early_stop"


def _nonfinite_summary(guard: NonFiniteGuard, limit: int = 20) -> dict[str, Any]:
    """:meth:`NonFiniteGuard.summary <ecgfm.train.safety.NonFiniteGuard.summary>` over every DDP rank: each rank's
    guard and loaders count only what that rank drew, so the ranks' skipped record keys are joined (distinct, rank
    0's first) and their crops summed. The counts restored from the checkpoint a run resumed from are the same on
    every rank (one checkpoint): they are counted once. One process: the guard's own summary. Every rank must call
    it (a collective)."""
    import torch.distributed as dist

    own = guard.summary(limit=limit)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return own
    keys, crops = guard._totals()
    restored = int(getattr(guard, "_restored_crops", 0))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (list(keys), int(crops) - restored, restored))
    all_keys = list(dict.fromkeys(k for rank_keys, _, _ in gathered for k in rank_keys))
    total = gathered[0][2] + sum(int(new) for _, new, _ in gathered)
    return {**own, "nonfinite_records_skipped": len(all_keys), "nonfinite_crops_skipped": int(total),
            "nonfinite_skipped_keys": all_keys[:limit]}


def _check_resume(out_dir: Path, cfg: DictConfig, asked_preprocess: DictConfig | None) -> None:
    """:func:`~ecgfm.train.checkpoints.check_resume_config`, also accepting a run folder whose ``config.yaml`` was
    written before the caches' preprocessing was recorded (it holds the config's own ``preprocess`` values, which
    the caches overrode: ``asked_preprocess``, from :func:`~ecgfm.train.build.adopt_cache_preprocess`)."""
    try:
        check_resume_config(out_dir, cfg)
    except ConfigError:
        if asked_preprocess is None:
            raise
        older = cfg.copy()
        older.preprocess = asked_preprocess
        check_resume_config(out_dir, older)   # still differing: that error
        log.info("resume: %s/config.yaml records the config's preprocess values, which the caches' preprocessing "
                 "replaced (a run recorded before config.yaml held the caches' spec): continuing it", out_dir)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain a backbone with a self-supervised method as described by ``cfg`` (``conf/train.yaml``).

    Args:
        cfg: composed config (from ``train.py`` or ``hydra.compose``).

    Returns:
        The summary written to ``<out_dir>/summary.json``: ``method``, ``backbone``, ``steps``, ``epochs``,
        ``first_loss``/``last_loss`` (train split, this rank) and means of the first/last 10 steps,
        ``fs``/``crop_seconds``/``crop_samples`` (the crop at the cache's rate), ``nonfinite`` and
        ``nonfinite_records_skipped`` (all DDP ranks), ``empty_batches_skipped`` (training batches ``nonfinite=skip``
        left with no rows: skipped by the method but counted in ``steps``), ``stop_reason`` (``fast_dev_run`` for
        ``trainer=debug``), ``fit_time_s`` / ``wall_time_s`` (this process: the last leg
        of a resumed run), ``fit_time_total_s`` / ``wall_time_total_s`` (every leg, None when a leg before the
        checkpoint resumed from did not record its time), ``time_legs``, ``resumed_from``, ``out_dir``, ``log_dir``,
        ``last_checkpoint``, ``encoder_dir``, ``cache_dirs``.

    Raises:
        ConfigError: a wrong key, type or value in the config; ``resume`` is not a checkpoint; a fresh start would
            overwrite a trained run (``overwrite=false``).
        ECGDataError: a data path that does not exist, unreadable data, or non-finite values in a cache
            (:class:`~ecgfm.train.safety.NonFiniteDataError`, with ``nonfinite=error``).
        NonFiniteLossError, NonFiniteWeightsError: the run diverged (nothing is exported).
        ConfigError: another training run is using the run folder (``hydra.run.dir``; a lock held for the run).
    """
    from lightning.pytorch.utilities import rank_zero_only

    from ecgfm.io import LockBusy, file_lock

    cfg = validate_train_config(cfg)
    if rank_zero_only.rank != 0:   # the DDP ranks of one run share its folder: rank 0 holds the lock
        return _train(cfg)
    out_dir = Path(str(cfg.out_dir)).resolve()
    # two runs started in the same second got one Hydra folder (its name has seconds) and wrote over each other:
    # the second now stops at once
    lock = file_lock(out_dir / ".train.lock", blocking=False)
    try:
        lock.__enter__()
    except LockBusy:
        raise ConfigError("hydra.run.dir", f"{out_dir} is in use by another training run (two runs started in the "
                                           f"same second share Hydra's default run folder): give this one its own "
                                           f"hydra.run.dir=...") from None
    try:
        return _train(cfg)
    finally:
        lock.__exit__(None, None, None)


def record_counts(datamodule: Any, cache_dirs: Sequence[str] | None) -> dict[str, int | None]:
    """What a run trained on: ``{"train", "val"}`` records of the datamodule's split (None where it does not say)
    and ``"skipped_while_preparing"``, the records its caches left out (unreadable, no standard lead: each cache's
    ``skipped.csv``), from their manifests (None without one).

    Args:
        datamodule: the fitted datamodule (:class:`~ecgfm.data.datamodules.PretrainDataModule` holds
            ``train_pools`` / ``val_indices``).
        cache_dirs: its cache folders.
    """
    pools = getattr(datamodule, "train_pools", None)
    val = getattr(datamodule, "val_indices", None)
    skipped: int | None = 0
    for c in cache_dirs or []:
        try:
            n = json.loads((Path(c) / "manifest.json").read_text(encoding="utf-8"))["counts"]["skipped"]
        except (OSError, ValueError, KeyError, TypeError):
            skipped = None
            break
        skipped += int(n)
    return {"train": None if pools is None else int(sum(len(p) for p in pools)),
            "val": None if val is None else int(len(val)),
            "skipped_while_preparing": skipped if cache_dirs else None}


def _train(cfg: DictConfig) -> dict[str, Any]:
    """:func:`train`'s work, in its run folder (locked by rank 0)."""
    from lightning.pytorch.utilities import rank_zero_only

    t_start = time.perf_counter()
    cfg = validate_train_config(cfg)
    _check_schedule(cfg)
    out_dir = Path(str(cfg.out_dir)).resolve()
    is_zero = rank_zero_only.rank == 0
    # Decide resume vs fresh start before anything is prepared or written: a damaged last.ckpt falls back to the
    # furthest periodic checkpoint that loads; a finished run is not restarted from step 0 unless overwrite=true.
    if cfg.overwrite and not cfg.resume:
        guard_fresh_start(out_dir, overwrite=True, is_global_zero=is_zero)
        ckpt_path = None
    else:
        ckpt_path = find_resume_checkpoint(out_dir, cfg.resume)
        if ckpt_path is None:
            guard_fresh_start(out_dir, overwrite=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_zero:
        remove_stale_temporaries(out_dir)
    if cfg.torch_threads is not None:
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data_node = strip_params(cfg.data)
    check_data_paths(data_node)
    cache_dirs = build_cache_dirs(data_node)
    spec, fs = data_rate(cache_dirs, cfg)
    # config.yaml records the caches' preprocessing (a conflicting preprocess.* the user set is refused)
    asked_preprocess = adopt_cache_preprocess(cfg, spec, cache_dirs)
    cfg.crop_samples = crop_samples_for(cfg, fs)   # crop_seconds at the cache's own rate; ${crop_samples} follows
    check_data_mirrors(cfg, fs)                    # a literal data.crop_samples must be that crop
    method_rate = method_fs(cfg, fs)   # a literal method.fs other than the cache's rate is refused
    if method_rate is not None:   # augmentations in seconds / Hz (SimCLR) run at the cache's rate: config.yaml says so
        cfg.method.fs = method_rate
    if ckpt_path is not None and not cfg.resume:   # found in the run folder: only its own recipe continues there
        _check_resume(out_dir, cfg, asked_preprocess)
    check_backbone_fits_crop(cfg, fs)
    data_cfg = strip_params(cfg.data)
    data_kwargs: dict[str, Any] = {"cache_dirs": cache_dirs} if "cache_dirs" in data_cfg else {}
    method_kwargs: dict[str, Any] = {}
    if method_rate is not None:   # augmentations in seconds / Hz (SimCLR) run at the cache's rate, as the crops do
        method_kwargs["fs"] = method_rate
    if cfg.method.get("aux_targets"):
        targets = pretext_targets_for(cfg, cache_dirs)      # a .npy file: every loader memory-maps it
        if isinstance(targets, Path):
            method_kwargs["aux_dim"] = int(open_pretext_targets(targets).shape[1])
            data_kwargs["record_targets"] = str(targets)
        else:                                              # the file could not be written: the array
            method_kwargs["aux_dim"] = int(targets.shape[1])
            data_kwargs["record_targets"] = targets
        crop = crop_targets_for(cfg, cache_dirs)           # aux_targets=handcrafted_crop: each view's own rhythm
        if crop is not None:
            data_kwargs["crop_targets"] = crop
    datamodule = _built("data", data_cfg, **data_kwargs)
    make_resumable(datamodule)

    backbone = _built("backbone", cfg.backbone)
    check_backbone_fits_crop(cfg, fs, backbone)
    model = _built("method", cfg.method, backbone=backbone, **method_kwargs)
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu" or not torch.cuda.is_available():
        try:  # float32 CPU linears on oneDNN: same mathematics, faster GEMMs on non-Intel CPUs (ecgfm/accel.py)
            n_linear = use_onednn_linears(model, str(cfg.cpu_linear))
        except ValueError as err:
            raise ConfigError("cpu_linear", str(err)) from None
        log.info("cpu_linear=%s: %d linear layers on oneDNN", cfg.cpu_linear, n_linear)
    if cfg.compile:
        compile_backbone(model.backbone)

    callbacks, history = build_callbacks(cfg, out_dir)
    facts = DataFacts(fs, float(cfg.crop_seconds), int(cfg.crop_samples), caches=cache_dirs or [],
                      mixture={k: jsonable(OmegaConf.to_container(v, resolve=True)) if OmegaConf.is_config(v) else v
                               for k in ("weights", "val_fraction", "views") if (v := cfg.data.get(k)) is not None},
                      deliberate=bool(cfg.resume))
    callbacks.append(facts)
    clock = FitClock(t_start)   # the run's time across resumes, kept in checkpoints
    callbacks.append(clock)
    guard = next(c for c in callbacks if isinstance(c, NonFiniteGuard))
    logger = build_logger(cfg, out_dir)
    # AtomicCheckpointIO: every checkpoint is written to a temporary file, fsync'ed and renamed
    # the config's own trainer.callbacks / plugins join ecgfm's (instantiate's keyword arguments would replace them)
    node = OmegaConf.masked_copy(cfg.trainer, [k for k in cfg.trainer if k not in ("callbacks", "plugins")])
    extra = {k: list(instantiate(cfg.trainer[k], _convert_="all") or []) for k in ("callbacks", "plugins")
             if cfg.trainer.get(k) is not None}
    trainer = instantiate(node, default_root_dir=str(out_dir), callbacks=[*callbacks, *extra.get("callbacks", [])],
                          logger=logger, plugins=[AtomicCheckpointIO(), *extra.get("plugins", [])], _convert_="all")
    if trainer.is_global_zero:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        log.info("training crops: %g s = %d samples at the cache's %g Hz", float(cfg.crop_seconds),
                 int(cfg.crop_samples), fs)
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
    clock.start()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:   # Lightning exits after Ctrl-C (1) and SIGTERM (0: "success" to a scheduler)
        _exit_interrupted(callbacks, trainer, out_dir)
        raise
    fit_s = clock.leg()[0]
    sched_steps = int(cfg.method.get("max_steps") or 0)
    stop_reason = _stop_reason(trainer, int(cfg.trainer.get("max_steps", -1) or -1))
    # (a fast_dev_run debug run stops after its batch(es) by design: no warning about the schedule)
    if 0 < trainer.global_step < sched_steps and not trainer.interrupted and stop_reason != "fast_dev_run":
        log.warning("training stopped at step %d of the %d its learning-rate schedule runs to (%s came first): the "
                    "schedule did not finish its decay", trainer.global_step, sched_steps, stop_reason)
    done = out_dir / "summary.json"
    # (a fit with nothing to do never starts its train loop: no start step recorded)
    if ckpt_path and facts.start_step in (None, trainer.global_step) and done.is_file():
        # a rerun into a finished run (same max_steps): fit had nothing to do. Its summary and encoder are the
        # finished run's; overwriting the summary would drop its validation metrics and partial-epoch count
        limit = {"max_time": "trainer.max_time (its elapsed time is restored on resume)",
                 "max_epochs": "trainer.max_epochs",
                 "fast_dev_run": "trainer.fast_dev_run (trainer=debug runs that many batches whatever the step "
                                 "limits say; leave out trainer=debug to train on)"}.get(stop_reason,
                                                                                          "trainer.max_steps")
        advice = train_on_advice(limit)
        log.warning("the run in %s is already complete at step %d (%s): nothing trained; its summary.json and "
                    "encoder are kept (%s)", out_dir, trainer.global_step, stop_reason, advice)
        return {**_rebased_summary(json.loads(done.read_text()), out_dir), "nothing_trained": True,
                "nothing_trained_limit": limit}
    if trainer.global_step == 0 and int(cfg.trainer.get("max_steps", -1) or -1) != 0:
        n_train = sum(len(p) for p in getattr(datamodule, "train_pools", [])) or "too few"
        raise ConfigError("data.batch_size", f"the run trained 0 steps: the training loader gave no batch "
                                             f"({n_train} training records, batch size {cfg.data.get('batch_size')}, "
                                             "incomplete batches dropped); lower data.batch_size or add records. "
                                             "Nothing was exported")
    last = out_dir / "checkpoints" / "last.ckpt"
    ck = trainer.checkpoint_callback
    if cfg.checkpoint.save_last and ck is not None and not trainer.fast_dev_run:
        # ModelCheckpoint saves every N steps; make last.ckpt the final state so a rerun does not repeat steps.
        # Also when something saved at this step: an epoch-end validation after that save belongs in it, and
        # Lightning's own end-of-fit save of last.ckpt (before this process's first periodic checkpoint) records a
        # mid-epoch stop as the next epoch, so the resumed run trained on other batches
        save_final_checkpoint(trainer, last, validated=history.val_step == trainer.global_step)

    mid_epoch = stopped_mid_epoch(trainer)
    summary: dict[str, Any] = {
        "method": str(cfg.method._target_).rsplit(".", 1)[-1],
        "backbone": getattr(model.backbone, "name", type(model.backbone).__name__),
        "n_parameters": int(sum(p.numel() for p in model.backbone.parameters())),
        "steps": int(trainer.global_step),
        # samples per optimiser step = data.batch_size x these two (pool_size_study's draws per record)
        "world_size": int(trainer.world_size),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        # what ended the fit (max_steps, or max_time / max_epochs / an early stop before it) and the step the
        # learning-rate schedule runs to: steps < schedule_steps is a run stopped before its decay finished
        "stop_reason": stop_reason,
        "schedule_steps": sched_steps or None,
        # whole epochs run (fit counts an epoch stopped part-way by max_steps / max_time as finished), and the
        # batches of the unfinished one up to its last optimiser step (where last.ckpt resumes it)
        "epochs": int(trainer.current_epoch) - int(mid_epoch),
        "partial_epoch_batches": stepped_batches(trainer) if mid_epoch else 0,
        "split": "train",
        **history.summary(),
        "loss_history_steps": len(history.losses),
        # training batches nonfinite=skip left with no rows: skipped by the method, yet each counted as an optimiser
        # step by Lightning (in steps; the schedule advanced)
        "empty_batches_skipped": int(history.empty_batches),
        # fit_time_s / wall_time_s: this process (a resumed run's last leg); *_total_s: every leg of the run (the
        # time of the steps it kept, from the checkpoints), None when a leg before this one did not record its time
        "fit_time_s": fit_s,
        "fit_time_total_s": None,
        "time_legs": None,
        "resumed_from": ckpt_path,
        "out_dir": str(out_dir),
        "log_dir": log_dir(trainer.logger),
        "cache_dirs": cache_dirs,
        "records": record_counts(datamodule, cache_dirs),
        "fs": fs,
        "crop_seconds": float(cfg.crop_seconds),
        "crop_samples": int(cfg.crop_samples),
        **_nonfinite_summary(guard),   # every DDP rank's skipped records and crops
        # last validation-epoch values (validation split): val/loss, val/<terms>, val/probe_auroc when enabled;
        # kept in checkpoints, so a resumed segment that ends before its first validation still reports them
        "val_metrics": dict(history.val_metrics),
        # the step those metrics were computed at (the last validation can come before the final step)
        "val_metrics_step": history.val_step,
    }
    summary["last_checkpoint"] = str(last) if last.is_file() else None
    if summary["nonfinite_records_skipped"] and trainer.is_global_zero:
        log.warning("nonfinite=skip: %d record(s) with non-finite values were left out (%d crops): %s%s",
                    summary["nonfinite_records_skipped"], summary["nonfinite_crops_skipped"],
                    ", ".join(summary["nonfinite_skipped_keys"]),
                    " ..." if summary["nonfinite_records_skipped"] > len(summary["nonfinite_skipped_keys"]) else "")
    if cfg.export and trainer.is_global_zero:
        from ecgfm.export import export_encoder

        check_finite_state(model.backbone.state_dict(), f"encoder at step {trainer.global_step}")
        enc_dir = out_dir / "encoder"
        export_encoder(model.backbone, enc_dir, spec, extra={
            "fs": fs, "crop_samples": int(cfg.crop_samples), "crop_seconds": float(cfg.crop_seconds),
            "method": exported_method_name(summary["method"], cfg.method.get("aux_targets")),
            "steps": summary["steps"], "seed": int(cfg.seed), "stop_reason": stop_reason,
            "schedule_steps": sched_steps or None,
            "method_hparams": jsonable(OmegaConf.to_container(cfg.method, resolve=True)),
            # what the encoder saw: the benchmarking leakage guard compares these caches with test splits
            # every cache the weights were trained on, those of the runs this one continued included
            "pretrain_caches": list(facts.seen_caches),
            # what each held when the export was written: the leakage guard says when a cache has other records now
            # (prepared again in place: records removed since would go unchecked)
            "pretrain_cache_digests": {c: cache_digest(c) for c in facts.seen_caches},
            "nonfinite_records_skipped": summary["nonfinite_records_skipped"],
        })
        summary["encoder_dir"] = str(enc_dir)
    else:
        summary["encoder_dir"] = None
    totals = clock.totals()
    # resumed from a checkpoint without FitClock's state, now or in an earlier leg: the earlier time is unknown
    times_known = (ckpt_path is None or clock.restored) and clock.known
    summary["fit_time_total_s"] = fit_s + clock.prior_fit_s if times_known else None
    summary["time_legs"] = int(totals["legs"]) if times_known else None
    summary["wall_time_s"] = time.perf_counter() - t_start
    summary["wall_time_total_s"] = summary["wall_time_s"] + clock.prior_wall_s if times_known else None
    if trainer.is_global_zero:
        atomic_write_json(out_dir / "summary.json", summary, indent=2)
    return summary
