"""Building a run from its config: the data rate and crop, the backbone checks, callbacks, logger.

Everything here takes explicit values or config nodes and returns objects; :func:`ecgfm.train.run.train` wires
them together.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ecgfm.config import ConfigError, literal_differs
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.train.loop import (
    AccumulationWindowCheckpoint,
    InterruptCheckpoint,
    LossHistory,
    RankSeedCallback,
    StepSeedCallback,
    ThroughputCallback,
)
from ecgfm.train.safety import NonFiniteGuard

log = logging.getLogger(__name__)

__all__ = ["compile_backbone", "data_rate", "adopt_cache_preprocess", "method_fs", "check_backbone_fits_crop",
           "build_callbacks", "build_logger", "log_dir", "pretext_targets_for", "crop_targets_for"]


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
    rates = {d: CorpusCache(d).fs for d in cache_dirs}
    if None in rates.values() or len(set(rates.values())) != 1:
        raise ConfigError(key_hint, "the caches must share one sampling rate (prepare them with one spec.fs); got "
                                    + ", ".join(f"{d}: {fs}" for d, fs in rates.items()))
    return first, float(rates[cache_dirs[0]])


def data_rate(cache_dirs: Sequence[str], cfg: DictConfig) -> tuple[PreprocessSpec, float]:
    """Preprocessing spec and sampling rate of the training data: those of the caches (from their manifests) when
    the data node has caches, else ``cfg.preprocess``."""
    if cache_dirs:
        return _cache_spec(cache_dirs)
    spec = PreprocessSpec.from_dict(OmegaConf.to_container(cfg.preprocess, resolve=True))
    if not spec.fs:
        raise ConfigError("preprocess.fs", "is needed to convert crop_seconds to samples when the data node has no "
                                           "caches")
    return spec, float(spec.fs)


def adopt_cache_preprocess(cfg: DictConfig, spec: PreprocessSpec, cache_dirs: Sequence[str]) -> DictConfig | None:
    """Make ``cfg.preprocess`` the preprocessing the training caches were prepared with (what the run trains on).

    A cache's preprocessing is fixed when it is prepared, and the run trains on the cache (:func:`data_rate`), so
    with ``data=cached`` every ``preprocess.*`` value was ignored while ``config.yaml`` recorded it. The config's
    ``preprocess`` node always holds values (``train.yaml``'s defaults), and a cache prepared with another spec (a
    250 Hz cache for a run that never mentions ``preprocess``) is ordinary ``data=cached`` use, so the rule is:

    * a field at its default (``conf/train.yaml`` = :class:`~ecgfm.data.preprocess.PreprocessSpec`'s) that differs
      from the caches' takes the caches' value, logged at INFO naming each field and both values;
    * a field set to another value than its default (``preprocess.highpass=3``) that differs from the caches' is
      refused: the user asked for preprocessing the run would not apply.

    ``config.yaml`` then records the caches' spec, the one exported with the encoder. Data nodes that prepare their
    caches from ``${preprocess}`` (synthetic, ptbxl, pools) have nothing to adopt.

    Args:
        cfg: the validated training config (``cfg.preprocess`` is changed in place).
        spec: the caches' spec (:func:`data_rate`).
        cache_dirs: the training caches (nothing is done without caches: ``cfg.preprocess`` is then the spec).

    Returns:
        A copy of the config's own ``preprocess`` node when fields were adopted (to compare with the
        ``config.yaml`` of a run recorded before this rule), else None.

    Raises:
        ConfigError: naming each ``preprocess.<field>`` set to a value other than the caches', with the caches'
            values.
    """
    if not cache_dirs:
        return None
    from dataclasses import fields

    asked = PreprocessSpec.from_dict(OmegaConf.to_container(cfg.preprocess, resolve=True))
    default = PreprocessSpec()
    differ = [f.name for f in fields(PreprocessSpec) if getattr(asked, f.name) != getattr(spec, f.name)]
    if not differ:
        return None
    chosen = [n for n in differ if getattr(asked, n) != getattr(default, n)]
    if chosen:
        where = ", ".join(str(d) for d in cache_dirs)
        raise ConfigError(f"preprocess.{chosen[0]}",
                          "the training caches were prepared with other preprocessing, and the run trains on the "
                          "caches as they are: " + "; ".join(f"preprocess.{n}={getattr(asked, n)!r} (the caches': "
                                                            f"{getattr(spec, n)!r})" for n in chosen)
                          + f" [{where}]. Remove these overrides (the run then records the caches' spec), or "
                            "prepare caches with this preprocessing (or use a data node that prepares them, e.g. "
                            "data=synthetic / data=ptbxl)")
    before = OmegaConf.create(OmegaConf.to_container(cfg.preprocess, resolve=True))
    plain = {f.name: getattr(spec, f.name) for f in fields(PreprocessSpec)}
    if plain.get("leads") is not None:
        plain["leads"] = list(plain["leads"])
    for name in differ:
        cfg.preprocess[name] = plain[name]
    log.info("preprocess: the training caches were prepared with %s; recorded in config.yaml (the config's "
             "defaults there were not used)", ", ".join(f"{n}={plain[n]!r} (default {getattr(asked, n)!r})"
                                                         for n in differ))
    return before


def method_fs(cfg: DictConfig, fs: float) -> float | None:
    """The rate a method's augmentations in seconds / Hz run at (``method.fs``, SimCLR): the training caches'.

    ``method.fs`` follows ``${preprocess.fs}``; the pipeline sets it to the caches' rate, at which the crops are cut.
    A literal ``method.fs`` that differs was replaced without a word (``method.fs=37`` trained at 100 Hz).

    Returns:
        ``fs`` (None when the method has no ``fs``).

    Raises:
        ConfigError: a literal ``method.fs`` other than the caches' rate, naming both.
    """
    if "fs" not in cfg.method:
        return None
    def same_rate(value: Any, want: float) -> bool:
        try:
            return value is not None and math.isclose(float(value), float(want))
        except (TypeError, ValueError):
            return False

    if literal_differs(cfg.method, "fs", fs, same=same_rate):   # any interpolation follows the caches' rate
        raise ConfigError("method.fs", f"is {cfg.method.fs!r}, but the training crops are cut at the caches' "
                                       f"{float(fs):g} Hz, where the augmentations in seconds / Hz must run: remove "
                                       f"the override (method.fs follows the caches' rate)")
    return float(fs)


def pretext_targets_for(cfg: DictConfig, cache_dirs: Sequence[str]) -> Path | np.ndarray:
    """The record-level pretext targets that ``method.aux_targets`` names, over the training caches.

    ``"handcrafted"``: :func:`ecgfm.evaluate.handcrafted.pretext_targets_file` of the data node's caches (features
    cached under ``<paths.cache_root>/features``, where probe.py keeps them, so the probe's handcrafted baseline
    and the pretext reuse one extraction per cache; the targets file beside them, computed once for all DDP
    ranks).

    Returns:
        Path of an ``(N_total, F)`` float32 ``.npy`` file (NaN where unknown), for
        ``PretrainDataModule(record_targets=...)`` to memory-map; the array itself, with a warning, when that file
        cannot be written (a read-only ``paths.cache_root`` that holds the features already).

    Raises:
        ConfigError: the data node has no caches (the targets are computed per cached record).
    """
    caches, feature_dir = _pretext_caches(cfg, cache_dirs)
    from ecgfm.evaluate.handcrafted import pretext_targets, pretext_targets_file

    try:
        return pretext_targets_file(caches, feature_dir, nonfinite=str(cfg.nonfinite))
    except OSError as exc:
        log.warning("pretext targets: cannot write their file under %s (%s); computing them in memory (each "
                    "process holds its own copy)", feature_dir, exc)
        return pretext_targets(caches, feature_dir, nonfinite=str(cfg.nonfinite))


def crop_targets_for(cfg: DictConfig, cache_dirs: Sequence[str]) -> Any | None:
    """The crop-level targets of ``method.aux_targets=handcrafted_crop`` (None for any other value):
    :class:`ecgfm.evaluate.handcrafted.CropRhythmTargets` over the training caches, for
    ``PretrainDataModule(crop_targets=...)`` beside :func:`pretext_targets_for`'s record-level targets.

    Raises:
        ConfigError: the data node has no caches.
        OSError: their file cannot be written (no in-memory fallback: it holds every record's R-peaks).
    """
    if str(cfg.method.get("aux_targets")) != "handcrafted_crop":
        return None
    caches, feature_dir = _pretext_caches(cfg, cache_dirs)
    from ecgfm.evaluate.handcrafted import CropRhythmTargets, crop_pretext_file

    return CropRhythmTargets(crop_pretext_file(caches, feature_dir, nonfinite=str(cfg.nonfinite)))


def _pretext_caches(cfg: DictConfig, cache_dirs: Sequence[str]) -> tuple[list, Path]:
    """The training caches and the feature folder of the pretext targets (see :func:`pretext_targets_for`)."""
    kind = str(cfg.method.aux_targets)
    if not cache_dirs:
        raise ConfigError("method.aux_targets", f"{kind!r} targets are computed per record of the data node's "
                                                "caches; this data node has none (use a cached corpus or pool)")
    from ecgfm.data.cache import CorpusCache

    return [CorpusCache(d) for d in cache_dirs], Path(str(cfg.paths.cache_root)) / "features"


def check_backbone_fits_crop(cfg: DictConfig, fs: float, backbone: torch.nn.Module | None = None) -> None:
    """The backbone's crop-dependent arguments agree with the crop: ``seq_len`` (ViT position table) at least the
    crop, the crop a multiple of ``patch_size``. Checked on the config node, and on the built ``backbone``.

    Raises:
        ConfigError: naming ``crop_seconds`` or ``backbone.seq_len``.
    """
    crop = int(cfg.crop_samples)
    node = cfg.backbone
    patch = getattr(backbone, "patch_size", None) if backbone is not None else node.get("patch_size")
    seq_len = getattr(backbone, "seq_len", None) if backbone is not None else node.get("seq_len")
    if isinstance(patch, int) and patch > 0 and crop % patch:
        raise ConfigError("crop_seconds", f"{float(cfg.crop_seconds):g} s at the cache's {fs:g} Hz is {crop} samples, "
                                          f"not a multiple of backbone.patch_size={patch}: choose crop_seconds so that "
                                          f"crop_seconds x {fs:g} is a multiple of {patch}")
    if isinstance(seq_len, int) and seq_len < crop:
        raise ConfigError("backbone.seq_len", f"is {seq_len}, shorter than the {crop}-sample crop (crop_seconds="
                                              f"{float(cfg.crop_seconds):g} at the cache's {fs:g} Hz); leave "
                                              "backbone.seq_len=${crop_samples}")


def build_callbacks(cfg: DictConfig, out_dir: Path) -> tuple[list[L.Callback], LossHistory]:
    """Non-finite guard, checkpointing, progress bar, throughput, per-step (or per-rank) seeding and loss history."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    history = LossHistory()
    # AccumulationWindowCheckpoint: a checkpoint written inside a gradient-accumulation window resumes at its start
    callbacks: list[L.Callback] = [NonFiniteGuard(str(cfg.get("nonfinite", "error"))), history, ThroughputCallback(),
                                   AccumulationWindowCheckpoint()]
    # one stream per DDP rank: reseeded before every step, or (deterministic_steps=false) once per rank at setup
    callbacks.insert(0, StepSeedCallback(cfg.seed) if cfg.deterministic_steps else RankSeedCallback(cfg.seed))
    ck = cfg.checkpoint
    # save_top_k > 1 keeps the k newest periodic checkpoints: rank them by "step", which ModelCheckpoint always
    # offers as a monitor candidate (monitor=None only allows -1, 0 or 1).
    monitor = "step" if ck.save_top_k > 1 else None
    callbacks.append(ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), filename="step{step:07d}",
                                     auto_insert_metric_name=False, every_n_train_steps=ck.every_n_train_steps,
                                     save_top_k=ck.save_top_k, save_last=ck.save_last, monitor=monitor,
                                     mode="max", enable_version_counter=False))
    # enable_version_counter=False: a resumed leg with other checkpoint settings (Lightning restores the callback's
    # state only for the same ones) wrote last-v1.ckpt beside the previous leg's last.ckpt, which the next resume
    # then took (a stale step); now last.ckpt (and a periodic file of the same step) is overwritten
    if ck.save_last:   # Ctrl-C / SIGTERM: last.ckpt at the step reached, not the last periodic checkpoint
        callbacks.append(InterruptCheckpoint(out_dir / "checkpoints" / "last.ckpt"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh))
    return callbacks, history


def build_logger(cfg: DictConfig, out_dir: Path) -> Any:
    """Instantiate ``cfg.logger`` (``False`` when it is null). A W&B logger stays offline unless the user asked for
    online mode (``WANDB_MODE=online`` or ``logger.offline=false``); ``WANDB_MODE=disabled`` turns it off (an
    offline Lightning logger sets ``WANDB_MODE=dryrun`` itself, which overrode it)."""
    node = cfg.get("logger")
    if node is None:
        return False
    kwargs: dict[str, Any] = {}
    if str(node.get("_target_", "")).endswith("WandbLogger"):
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode == "online":
            kwargs["offline"] = False
        elif mode == "disabled":
            kwargs.update(offline=False, mode="disabled")
        Path(str(node.get("save_dir") or out_dir)).mkdir(parents=True, exist_ok=True)
    return instantiate(node, **kwargs, _convert_="all")


def log_dir(logger: Any) -> str | None:
    """Folder a Lightning logger writes to (``log_dir``, else ``save_dir``), absolute; ``None`` without one."""
    if not logger:
        return None
    for attr in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:  # some loggers compute these lazily and may fail offline
            value = None
        if value:
            return str(Path(str(value)).resolve())
    return None
