"""The entry points behind ``probe.py`` and ``finetune.py``: one results cell per (mode, task, checkpoint,
label fraction, seed), resumable, filed as JSON and gathered into one table.

A Hydra multirun such as::

    python probe.py -m checkpoint=runs/mae/encoder,random:runs/mae/encoder task=ptbxl_super,cinc2017 \\
        fraction=0.01,0.1,1 seed=0,1,2

runs one job per combination. Each job

1. skips a cell whose file exists *and* was computed from the same checkpoint content and the same recipe
   (:mod:`ecgfm.evaluate.identity`: the weights' sha256, or backbone + arguments + init seed for ``random:`` /
   ``supervised:``; the probe / fine-tuning recipe, window, stride, task, preprocessing and bootstrap); any
   other existing cell (retrained encoder, changed recipe, a cell without identity) is recomputed, with a log
   line saying why; ``overwrite=true`` recomputes everything. Cells that share a cell path but not a checkpoint
   identity or recipe are all kept (:func:`_cell_target`): a multirun over a recipe setting
   (``probe.py -m probe.aggregate=mean_embedding,mean_std`` is a new mode, but ``finetune.lr=1e-3,1e-4`` or
   ``window_seconds=2.5,5`` are one cell path per recipe), over ``init_seed`` or ``backbone_args`` of a ``random:``
   / ``supervised:`` checkpoint, or resuming such a multirun: a job that finds the plain file holding a cell still
   valid for *its* checkpoint and recipe files its own as ``f<fraction>_s<seed>.r<hash>.json`` beside it (the hash
   of its checkpoint identity and recipe), and the table shows one row per checkpoint identity and recipe. A stale
   cell (an encoder retrained in place, an older cell schema) is replaced, and so is, outside a multirun, a cell
   of the same checkpoint with another recipe (the run's recipe is the current one);
2. resolves ``checkpoint``: a path to an exported encoder (:func:`ecgfm.export.load_encoder`), or
   ``random:<backbone name | export path>`` (same architecture, random weights from ``init_seed``: the
   random-init twin), or ``supervised:<backbone name | export path>`` (fine-tuning only: supervised training
   from scratch with the ``supervised`` recipe);
3. builds the task (:mod:`ecgfm.evaluate.tasks`) on a cache prepared with the *encoder's* preprocessing, at the
   rate the encoder was trained at (records are resampled; a ``preprocess`` override at another rate, or a cache
   mixing rates, is refused: :func:`rate_checked_spec`); windows in seconds are converted with the cache's own
   rate from its manifest;
4. runs the leakage guard (:mod:`ecgfm.evaluate.leakage`) on the test split (and the external set);
5. probe: loads / extracts the frozen features (:mod:`ecgfm.evaluate.features`; one encoder pass per
   checkpoint and corpus for the whole sweep) and trains the heads (:func:`ecgfm.evaluate.probe.run_probe_grid`);
   fine-tune: trains the whole network (:func:`ecgfm.evaluate.finetune.run_finetune`);
6. writes the cell atomically and rebuilds ``results.csv`` / ``results.md`` / ``results.png``
   (:mod:`ecgfm.evaluate.report`) in ``results_dir``.

``fraction`` and ``seed`` may also be lists in a single run (``'fraction=[0.1,1]' 'seed=[0,1,2]'``): the probe
then trains every head of the grid in one process on one feature extraction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ecgfm.artifacts import pretraining_lead_aware
from ecgfm.conf import config_dir
from ecgfm.config import ConfigError
from ecgfm.data.preprocess import PreprocessSpec, with_input_leads
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.evaluate.features import (cached_features, cached_tokens, check_window, embed_fn, encoder_fingerprint,
                                     fit_window)
from ecgfm.evaluate.identity import checkpoint_identity, diff_keys, recipe_identity, short_hash, stale_reason
from ecgfm.evaluate.leakage import cache_identities, check_leakage, pretrain_identities, signal_copies_memo
from ecgfm.evaluate.metrics import choose_thresholds, evaluate_scores, no_threshold_mask
from ecgfm.evaluate.report import build_report, classes_left_out, degenerate_ci
from ecgfm.evaluate.tasks import TaskData, TaskSpec, build_external, build_task
from ecgfm.errors import EXIT_USER_ERROR, run_command  # noqa: F401  (EXIT_USER_ERROR re-exported)
from ecgfm.io import atomic_write_json, file_key, jsonable

log = logging.getLogger(__name__)
KEYWORDS = ("random", "supervised")
HANDCRAFTED = "handcrafted"  # checkpoint=handcrafted: the RR/HRV + morphology baseline (ecgfm.evaluate.handcrafted)


class EvaluationError(ValueError):
    """A probe / fine-tuning run refused for a reason the user can fix (the message says how): an encoder fed
    at the wrong rate, a cache mixing rates, a fine-tuning baseline asked of the probe, an unknown keyword."""


class CheckpointNotFound(EvaluationError, FileNotFoundError):
    """The ``checkpoint`` names no exported encoder folder."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from ecgfm.data.record import ECGDataError
    from ecgfm.evaluate.leakage import LeakageError

    from ecgfm.config import ConfigError
    from ecgfm.evaluate.tasks import TaskError

    errors: list[type[BaseException]] = [EvaluationError, LeakageError, ECGDataError, ConfigError, TaskError]
    try:
        from ecgfm.artifacts import ArtifactError

        errors.append(ArtifactError)
    except ImportError:  # pragma: no cover - older trees without the artifact module
        pass
    return tuple(errors)


def run_cli(main: Any, cfg: DictConfig) -> dict[str, Any]:
    """Run :func:`probe_main` / :func:`finetune_main` for a command line: a user error (:class:`EvaluationError`,
    a leakage refusal, unreadable data, a bad artifact) ends with one ``error: ...`` line on stderr (also logged)
    and exit status :data:`EXIT_USER_ERROR`, not a traceback.

    Args:
        main: :func:`probe_main` or :func:`finetune_main`.
        cfg: the composed config.
    """
    return run_command(main, cfg, _user_errors())


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclass
class Encoder:
    """A resolved ``checkpoint`` value."""

    checkpoint: str
    kind: str  # "pretrained" | "random" | "supervised" | "handcrafted"
    method: str
    backbone: torch.nn.Module | None
    preprocess: PreprocessSpec
    info: dict[str, Any] = field(default_factory=dict)
    crop_samples: int | None = None
    export_dir: str | None = None

    @property
    def backbone_name(self) -> str:
        return str(getattr(self.backbone, "name", self.info.get("name", "?")))

    @property
    def trained_fs(self) -> float | None:
        """Sampling rate (Hz) of the data the weights were trained on (see :func:`trained_fs`)."""
        return trained_fs(self.info)

    @property
    def architecture(self) -> str:
        """Short hash of the backbone name and constructor arguments: a random-init twin shares it."""
        args = getattr(self.backbone, "init_args", None)
        return short_hash({"name": self.backbone_name,
                           "init_args": self.info.get("init_args") if args is None else args})


def encoder_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """An encoder artifact's description without its weights (:func:`ecgfm.artifacts.read_meta`, format 1 or 2),
    with the version-1 keys ``name`` / ``init_args`` this module reads.

    Raises:
        FileNotFoundError / ValueError: not an encoder folder (the message names the file and the problem).
    """
    from ecgfm.artifacts import read_meta

    _, meta = read_meta(folder, "encoder")
    arch = meta.get("architecture") or {}
    return dict(meta, name=meta.get("name", arch.get("name")),
                init_args=meta.get("init_args", arch.get("init_args")) or {})


def _crop_of(info: dict[str, Any]) -> int | None:
    """The encoder's training window in samples (``input.window_samples``, else ``extra.crop_samples``)."""
    crop = (info.get("input") or {}).get("window_samples") or (info.get("extra") or {}).get("crop_samples")
    return None if crop is None else int(crop)


def trained_fs(info: dict[str, Any]) -> float | None:
    """The rate an exported encoder was trained at: ``input.fs`` of its description, else ``extra.fs``, else its
    ``preprocess.fs``; None when none says (a registry name's random weights, a rate-keeping export)."""
    for value in ((info.get("input") or {}).get("fs"), (info.get("extra") or {}).get("fs"),
                  (info.get("preprocess") or {}).get("fs")):
        try:
            fs = float(value)
        except (TypeError, ValueError):
            continue
        if fs > 0:
            return fs
    return None


def resolve_lead_aware(setting: bool | None, desc: Encoder) -> bool:
    """The ``features.lead_aware`` a job runs with: the user's setting, or the encoder's pretraining setting.

    A lead-aware encoder given another token layout than the one it was pretrained on embeds differently (an encoder
    pretrained on zero-filled absent leads, 144 tokens per one-lead record, probed lead-aware on 12 tokens gave
    embeddings at cosine 0.68-0.93 to its own), so the default (None) follows the pretraining.

    Args:
        setting: ``features.lead_aware``: True / False, or None for "as pretrained".
        desc: the resolved checkpoint. Only a ``pretrained`` encoder has a pretraining setting
            (:func:`pretraining_lead_aware`); random initialisations, supervised baselines and encoders that do not
            record it resolve None to True.

    Returns:
        Whether absent leads reach a backbone taking ``lead_mask`` as a lead mask (True) or as zero-filled leads
        (False). This value, not the raw setting, is part of a cell's recipe identity.
    """
    trained = pretraining_lead_aware(desc.info) if desc.kind == "pretrained" else None
    if setting is None:
        return True if trained is None else trained
    chosen = bool(setting)
    if trained is not None and chosen != trained:
        log.warning("features.lead_aware=%s but checkpoint %s was pretrained with method.lead_aware=%s: absent leads "
                    "reach it in a token layout it was not trained on (%s); drop features.lead_aware (default null: "
                    "as pretrained) unless this is intended", str(chosen).lower(), desc.checkpoint,
                    str(trained).lower(), "present-lead tokens only, pretrained on zero-filled leads" if chosen else
                    "zero-filled leads, pretrained on present-lead tokens only")
    return chosen


def rate_checked_spec(checkpoint: str, spec: PreprocessSpec, fs: float | None, override: bool = True
                      ) -> PreprocessSpec:
    """The task-cache preprocessing for an encoder trained at ``fs`` Hz: ``spec`` itself, or ``spec`` at ``fs``
    when it keeps the record rate (``spec.fs`` None: the cache is then resampled to the encoder's rate).

    Args:
        checkpoint: the checkpoint value (for messages).
        spec: the preprocessing asked for (the ``preprocess`` override, or the encoder's own).
        fs: the encoder's training rate (:func:`trained_fs`), None when unknown (no check).
        override: ``spec`` is the user's ``preprocess`` override (else the encoder's own description).

    Raises:
        ValueError: ``spec`` asks for another rate than the encoder's (its windows would span another duration
            than in pretraining, and a fixed-length ViT would see a different signal per patch).
    """
    if fs is None:
        return spec
    if spec.fs is None:
        log.info("checkpoint %s: the preprocessing keeps the record rate; task records are resampled to the "
                 "encoder's %g Hz", checkpoint, fs)
        return replace(spec, fs=float(fs))
    if abs(float(spec.fs) - float(fs)) > 1e-6:
        fix = (f"drop the preprocess override or set preprocess.fs={fs:g}" if override else
               "its description contradicts itself (input.fs / extra.fs vs preprocess.fs): re-export it")
        raise EvaluationError(f"checkpoint {checkpoint!r} was trained at {fs:g} Hz but the preprocessing asks for "
                              f"{float(spec.fs):g} Hz (preprocess.fs): the encoder would be fed windows at another "
                              f"rate; {fix}")
    return spec


def checkpoint_slug(checkpoint: str) -> str:
    """Readable, file-system safe cell folder name of a checkpoint value (+ a short hash against collisions).

    A path (alone or after a ``random:`` / ``supervised:``-style prefix) is normalised first, so ``./runs/x/``,
    ``runs//x`` and ``runs/x`` name one folder (before, each spelling computed its cells again, and a spelling
    starting with ``.`` made a hidden folder); a plain spelling keeps the name it always had. An absolute and a
    relative spelling of one folder still name two (the cells are found by the string, not the file system)."""
    text = str(checkpoint).strip()
    prefix, sep, rest = text.partition(":")
    if not sep or "/" in prefix or "\\" in prefix or len(prefix) == 1:   # no prefix (or a drive letter)
        prefix, sep, rest = "", "", text
    if rest and ("/" in rest or rest.startswith(".")):
        rest = os.path.normpath(rest)
    text = f"{prefix}{sep}{rest}"
    # (the leading dots / underscores of the whole text are dropped; a 60-character tail is kept as before, so a
    # long plain path keeps its folder name even where the tail starts with a dot)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._").rstrip("_")[-60:]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _method_of(info: dict[str, Any], path: str) -> str:
    method = str((info.get("extra") or {}).get("method") or (info.get("provenance") or {}).get("method")
                 or "").strip()
    if method:
        return re.sub(r"module$", "", method, flags=re.IGNORECASE).lower() or method
    return Path(path).resolve().name


def _backbone_from_conf(name: str, crop_samples: int, overrides: dict[str, Any]) -> torch.nn.Module:
    """Build ``name`` the way pretraining does: ``conf/backbone/<name>.yaml`` (with ``crop_samples``) when it
    exists, else :func:`ecgfm.backbones.create_backbone` with ``overrides``."""
    from hydra.utils import instantiate

    from ecgfm.backbones import create_backbone

    from hydra.errors import InstantiationException

    from ecgfm.config import ConfigError, bad_arguments

    conf = config_dir() / "backbone" / f"{name}.yaml"
    try:
        if conf.is_file():
            node = OmegaConf.create({"crop_samples": int(crop_samples), "b": OmegaConf.load(conf)})
            cfg = OmegaConf.to_container(node, resolve=True)["b"]
            cfg.update(overrides)
            return instantiate(cfg, _convert_="all")
        return create_backbone(name, **overrides)
    except (TypeError, ValueError, InstantiationException) as exc:   # e.g. +backbone_args.embed_dimm=8: one line
        cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ else exc
        # a wrong argument, or a value the constructor refuses (patch_size not dividing seq_len): the user's
        if isinstance(cause, ValueError) or (isinstance(cause, TypeError) and bad_arguments(cause)):
            raise ConfigError("backbone_args", f"{name}: {str(cause).splitlines()[0]}") from None
        raise


def resolve_checkpoint(checkpoint: str, crop_samples: int, init_seed: int = 0,
                       backbone_args: dict[str, Any] | None = None, preprocess: PreprocessSpec | None = None,
                       load_weights: bool = True) -> Encoder:
    """Turn a ``checkpoint`` value into an :class:`Encoder` (see the module docstring).

    Args:
        checkpoint: export path, ``random:<name|path>`` or ``supervised:<name|path>``.
        crop_samples: window length used when a registry name must be built (ViT ``seq_len``).
        init_seed: torch seed of random initialisations.
        backbone_args: constructor overrides for registry names.
        preprocess: preprocessing override (default: the export's, or ``PreprocessSpec()`` for registry names).
        load_weights: build the network (False: only the description, for cheap skip checks).
    """
    from ecgfm.export import load_encoder

    text = str(checkpoint).strip()
    if text == HANDCRAFTED:
        return handcrafted_encoder(preprocess)
    kind, _, target = text.partition(":")
    if backbone_args and not (kind in KEYWORDS and target and not Path(target).is_dir()):
        # only a registry name is built from arguments; an export (or its random twin) has its own architecture
        raise EvaluationError(f"checkpoint {text!r}: backbone_args={dict(backbone_args)} only apply to "
                              f"random:<backbone name> / supervised:<backbone name>; this checkpoint's architecture "
                              f"is fixed by its encoder.json (drop backbone_args)")
    if kind in KEYWORDS and target:
        info: dict[str, Any] = {}
        export_dir = None
        if Path(target).is_dir():
            export_dir = target
            meta = Path(target) / "encoder.json"
            if not meta.is_file():
                raise CheckpointNotFound(f"checkpoint {text!r}: {meta} missing (a random twin copies the architecture "
                                         f"of an exported encoder folder)")
            info = encoder_meta(target)
            spec = own_spec(text, info)
            crop = _crop_of(info)
            backbone = None
            if load_weights:
                from ecgfm.backbones import create_backbone

                torch.manual_seed(int(init_seed))
                backbone = create_backbone(info["name"], **dict(info.get("init_args") or {}))
        else:
            from ecgfm.backbones.registry import list_backbones

            if not (config_dir() / "backbone" / f"{target}.yaml").is_file() and target not in list_backbones():
                raise EvaluationError(f"checkpoint {text!r}: {target!r} is neither an exported encoder folder nor a "
                                      f"backbone (registered: {', '.join(list_backbones())}; conf/backbone: "
                                      f"{', '.join(sorted(p.stem for p in (config_dir() / 'backbone').glob('*.yaml')))})")
            spec = PreprocessSpec()
            crop = None
            backbone = None
            if load_weights:
                torch.manual_seed(int(init_seed))
                backbone = _backbone_from_conf(target, crop_samples, dict(backbone_args or {}))
        method = "random-init" if kind == "random" else "supervised"
        spec = rate_checked_spec(text, preprocess or spec, trained_fs(info), override=preprocess is not None)
        spec = with_input_leads(spec, (info.get("init_args") or {}).get("input_leads"))
        return Encoder(text, kind, method, backbone, spec, info, crop, export_dir)
    if ":" in text and not Path(text).exists() and kind not in KEYWORDS and len(kind) > 1:
        raise EvaluationError(f"checkpoint {text!r}: unknown keyword {kind!r}; use a path to an exported encoder, "
                              f"random:<backbone|path> or supervised:<backbone|path>")
    path = Path(text)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {text!r}: no such exported encoder folder (expected encoder.json + "
                                 f"encoder.safetensors, written by train.py / ecgfm.export.export_encoder), or "
                                 f"{HANDCRAFTED!r} for the handcrafted-feature baseline")
    if load_weights:
        backbone, _, info = load_encoder(path)
    else:
        info, backbone = encoder_meta(path), None
    spec = own_spec(text, info)
    export_dir = str(path if path.is_dir() else path.parent)
    spec = rate_checked_spec(text, preprocess or spec, trained_fs(info), override=preprocess is not None)
    # a model reading a lead subset (ECGFounder's 1-lead model): its task cache keeps only those leads
    spec = with_input_leads(spec, (info.get("init_args") or {}).get("input_leads"))
    return Encoder(text, "pretrained", _method_of(info, export_dir), backbone, spec, info, _crop_of(info),
                   export_dir)


def own_spec(checkpoint: str, info: dict[str, Any]) -> PreprocessSpec:
    """The task-cache preprocessing an exported encoder describes: its spec, or, for one saved with
    ``preprocess=None`` (``"preprocess": null``: it expects unprocessed signals), :meth:`PreprocessSpec.raw` (no
    filter, no normalisation; resampled to its rate by :func:`rate_checked_spec`), never the default spec."""
    if info.get("preprocess") is not None:
        return PreprocessSpec.from_dict(info["preprocess"])
    log.info("checkpoint %s: saved without preprocessing (preprocess: null): task records are only resampled and "
             "lead-mapped, not filtered or normalised", checkpoint)
    return PreprocessSpec.raw()


def handcrafted_encoder(preprocess: PreprocessSpec | None = None) -> Encoder:
    """The ``checkpoint=handcrafted`` pseudo-encoder: no network, features from
    :mod:`ecgfm.evaluate.handcrafted` on the task cache. Its preprocessing is the ``preprocess`` override, else
    the default :class:`PreprocessSpec` (100 Hz, high-pass 0.5 Hz, z-score: the encoders' default, so the task
    cache and its splits are the ones the encoder rows use)."""
    from ecgfm.evaluate.handcrafted import FEATURE_NAMES, FEATURE_VERSION, METHOD

    info = {"name": HANDCRAFTED, "init_args": {"feature_version": FEATURE_VERSION},
            "feature_version": FEATURE_VERSION, "features": list(FEATURE_NAMES)}
    return Encoder(HANDCRAFTED, HANDCRAFTED, METHOD, None, preprocess or PreprocessSpec(), info)


# ------------------------------------------------------------------------------------------------ helpers
def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return list(value)
    return [value]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) \
        else node


def probe_variant(mode: str, aggregate: str, side_features: str | None = None, layers: str = "last") -> str:
    """The ``mode`` of a probe cell (its folder under ``cells/`` and its row in the tables): the head, plus the record
    aggregation when it is not the default mean window embedding (``linear``, ``mlp``, ``attention``,
    ``linear+mean_std``, ``mlp+mean_prediction``, ...), plus ``+handcrafted`` when the handcrafted features are
    appended (``probe.side_features``), and ``+stages`` on every stage's pooled features (``probe.layers``), so
    that variants in one ``results_dir`` are rows of their own instead of overwriting each other's cells. The
    attention probe pools by itself."""
    base = mode if mode == "attention" or aggregate == "mean_embedding" else f"{mode}+{aggregate}"
    base = base if layers == "last" else f"{base}+{layers}"
    return base if not side_features else f"{base}+{side_features}"


def cell_path(results_dir: str | os.PathLike, mode: str, task: str, checkpoint: str, fraction: float, seed: int,
              eval_name: str | None = None, recipe_id: str | None = None, checkpoint_id: str | None = None) -> Path:
    """Where one cell's JSON lives (named after the ``checkpoint`` string; what the cell was computed from is
    its stored ``checkpoint_id`` / ``recipe_id``, checked before a rerun skips it).

    Args:
        results_dir, mode, task, checkpoint, fraction, seed, eval_name: the cell (``f<fraction:g>_s<seed>.json``
            under ``cells/<mode>/<task>[@<eval_name>]/<checkpoint slug>/``).
        recipe_id: with ``checkpoint_id``: the tagged file of that (checkpoint identity, recipe) beside the plain
            one, ``f1_s0.r<12 hex of the hash of both>.json``, used when the plain file holds a cell of another
            checkpoint identity or recipe that is kept (:func:`_cell_target`). Alone: the file tagged with the
            recipe only, ``f1_s0.r<first 12 hex of recipe_id>.json``, which older versions wrote for a multirun over
            a recipe setting (still read, so those cells are found).
        checkpoint_id: see ``recipe_id``.

    Raises:
        ValueError: ``checkpoint_id`` without ``recipe_id``.
    """
    if checkpoint_id and not recipe_id:
        raise ValueError("cell_path: checkpoint_id tags a cell file only together with its recipe_id")
    task_dir = task if not eval_name else f"{task}@{eval_name}"
    if recipe_id and checkpoint_id:   # one file per (checkpoint identity, recipe): init seeds and recipes coexist
        tag = f".r{short_hash({'checkpoint_id': checkpoint_id, 'recipe_id': recipe_id}, 12)}"
    else:
        tag = f".r{recipe_id[:12]}" if recipe_id else ""
    return (Path(results_dir) / "cells" / mode / task_dir / checkpoint_slug(checkpoint)
            / f"f{float(fraction):g}_s{int(seed)}{tag}.json")


def _window(cfg: DictConfig, task_crop_seconds: float, fs: float, encoder_crop: int | None) -> int:
    """The window (samples) a job embeds / fine-tunes with: ``window_seconds``, else the encoder's pretraining crop,
    else ``task.crop_seconds``. A ``task.crop_seconds`` the user set that another of these overrides is warned
    about (logging.WARNING, naming ``window_seconds``): it was silently not used."""
    if cfg.get("window_seconds") is not None:
        window, by = int(round(float(cfg.window_seconds) * fs)), f"window_seconds={float(cfg.window_seconds):g}"
    elif encoder_crop:
        window, by = int(encoder_crop), f"the encoder's pretraining crop ({int(encoder_crop)} samples)"
    else:
        return int(round(task_crop_seconds * fs))
    asked = int(round(task_crop_seconds * fs))
    if asked != window and _task_crop_set(cfg, task_crop_seconds) is not False:
        log.warning("task.crop_seconds=%g (%d samples at %g Hz) is not used: the window is %s, %d samples = %g s. "
                    "window_seconds sets the window (window_seconds=%g for this one); task.crop_seconds is only the "
                    "window of an encoder without a recorded crop", task_crop_seconds, asked, fs, by, window,
                    window / fs, task_crop_seconds)
    return window


def _task_crop_set(cfg: DictConfig, value: float) -> bool | None:
    """Whether ``task.crop_seconds`` was set by the user rather than left at the task file's value: from the
    command line's overrides inside a Hydra run; else by comparing with ``conf/task/<task.name>.yaml``; None when
    neither can tell (a task file elsewhere)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return any(str(o).lstrip("+~").split("=", 1)[0] == "task.crop_seconds"
                       for o in HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - no Hydra run: compare with the task file
        pass
    task = cfg.get("task")
    path = config_dir() / "task" / f"{task.get('name') if task is not None else None}.yaml"
    if not path.is_file():
        return None
    try:
        shipped = OmegaConf.load(path).get("crop_seconds")
        return shipped is None or float(shipped) != float(value)
    except Exception:  # noqa: BLE001 - an unreadable task file: cannot tell
        return None


def _summary_caches(enc: Encoder) -> list[str]:
    """The cache folders of the training run's summary.json beside an exported encoder, when its encoder.json names
    neither ``extra.pretrain_record_keys`` nor ``extra.pretrain_caches`` (older exports); else empty."""
    if enc.export_dir is None or enc.kind != "pretrained":
        return []
    summary = Path(enc.export_dir).parent / "summary.json"
    extra = enc.info.get("extra") or {}
    if extra.get("pretrain_record_keys") or extra.get("pretrain_caches") or not summary.is_file():
        return []
    caches = []
    for c in json.loads(summary.read_text()).get("cache_dirs") or []:
        # older train.py runs recorded the cache folders as given, relative to where they ran
        p = Path(str(c))
        if not p.is_absolute() and not p.exists():
            p = Path.cwd() / p
        caches.append(str(p))
    return caches


def _pretraining_identities(enc: Encoder, extra_caches: Sequence[str]) -> tuple[dict, list[str]]:
    """Identities of the encoder's pretraining data: encoder.json, the run's summary.json, explicit caches."""
    return pretrain_identities(enc.info if enc.kind == "pretrained" else {},
                               [str(c) for c in extra_caches] + _summary_caches(enc))


def external_task_check(task: TaskData, external: TaskData, allow: bool) -> dict[str, dict[str, Any]]:
    """The external set's scored records against the task's training and validation splits (the head was trained
    or selected on those); ``{"external:<dataset>/task_train_val": report}`` for the cell.

    :func:`~ecgfm.evaluate.tasks.build_external` already removes the task's own records by the same identities, so
    this finds nothing unless an external set was built otherwise; it is checked, and its verdict kept, anyway.

    Args:
        task: the task (its train and val rows are compared).
        external: the external set (its scored, ``test``, rows).
        allow: report an overlap instead of raising.

    Returns:
        ``{"external:<dataset>/task_train_val": LeakageReport.to_dict()}``.

    Raises:
        LeakageError: an overlap and ``allow`` is false.
    """
    rows = np.concatenate([np.asarray(task.splits[k], dtype=np.int64) for k in ("train", "val")])
    rep = check_leakage(cache_identities(task.cache, rows), cache_identities(external.cache, external.splits["test"]),
                        allow=allow, what=f"external set {external.name} ({external.dataset})",
                        against=f"the {task.name} training and validation splits ({task.dataset})")
    return {f"external:{external.dataset}/task_train_val": rep.to_dict()}


def _pretraining_cache_paths(enc: Encoder, extra_caches: Sequence[str]) -> list[str]:
    """The pretraining cache folders :func:`_pretraining_identities` reads (encoder.json ``extra.pretrain_caches``,
    the run's summary.json, explicit ones): what the signal check compares; empty when only record keys are known."""
    recorded = (enc.info.get("extra") or {}).get("pretrain_caches") or [] if enc.kind == "pretrained" else []
    return list(dict.fromkeys([str(c) for c in recorded] + [str(c) for c in extra_caches] + _summary_caches(enc)))


def leakage_check(enc: Encoder, task: TaskData, external: TaskData | None, allow: bool,
                  pretrain_caches: Sequence[str], signal_check: bool = True,
                  max_pool_records: int | None = 200_000) -> dict[str, Any]:
    """Run the leakage guard for the test and validation splits (and the external set); returns a JSON-able report.

    Validation counts as much as test: it chooses the probe's C, the thresholds, early stopping and, in the
    benchmark, which encoder and probe are read on test. An external set is also checked against the task's
    training and validation splits (:func:`external_task_check`), whatever the encoder.

    Besides identities (ids, patients, files, byte digests: :func:`~ecgfm.evaluate.leakage.check_leakage`), each
    evaluated part is compared by signal with the pretraining caches when they are known
    (:func:`~ecgfm.evaluate.leakage.signal_copies`, memoised in-process: a sweep of many cells reads the pool once;
    skipped with a log line when the pools hold more than ``max_pool_records`` records). A near-copy (the same
    recording filed under another id and patient, e.g. PTB-XL ecg 140 / 1370) is recorded in the part's report
    (``"signal_copies": [[eval key, pool key, correlation], ...]``) and in the cell's ``"signal_copies"`` count,
    and logs one WARNING; it does not set ``"leaked"`` and never raises, even without ``allow``: a correlation
    threshold is evidence, not identity, the copies are usually a few validation records among many (the pool the
    committed encoders were pretrained on held one: PTB-XL 1370, a copy of validation record 140, which
    ``heldout_free_source`` now leaves out; docs/BENCHMARK.md "Leakage guard"), and marking
    the cell leaked would drop it from the acceptance criteria for that. Identity overlaps keep raising unless
    ``allow``. ``signal_check=False`` skips the comparison."""
    own = external_task_check(task, external, allow) if external is not None else {}
    own_leaked = any(v.get("leaked") for v in own.values())
    if enc.kind == HANDCRAFTED:  # nothing is learned outside the task's own training split
        return {"checked": True, "leaked": own_leaked,
                "note": f"{enc.method}: no pretraining data (fixed feature definitions; the probe sees only the "
                        f"training split), no leakage check needed", **own}
    if enc.kind != "pretrained" and not pretrain_caches:
        return {"checked": True, "leaked": own_leaked, "note": f"{enc.method}: no pretraining data", **own}
    pre, provenance = _pretraining_identities(enc, pretrain_caches)
    if not provenance:
        log.warning("leakage not checked for %s: its pretraining data is unknown (encoder.json has no "
                    "extra.pretrain_caches / pretrain_record_keys and no summary.json beside it; pass "
                    "pretrain_caches=[...])", enc.checkpoint)
        return {"checked": False, "leaked": own_leaked, "note": "pretraining data unknown", **own}
    out: dict[str, Any] = {"provenance": provenance, **own}
    parts = [("test", task, task.splits["test"]), ("val", task, task.splits["val"])]
    if external is not None:
        parts.append((f"external:{external.dataset}", external, external.splits["test"]))
    cache_paths = _pretraining_cache_paths(enc, pretrain_caches) if signal_check else []
    for name, t, rows in parts:
        rep = check_leakage(pre, cache_identities(t.cache, rows), allow=allow,
                            what=f"{t.name} {name} split ({t.dataset})")
        out[name] = rep.to_dict()
        if not cache_paths:
            continue
        sig = signal_copies_memo(cache_paths, t.cache, rows, max_pool_records=max_pool_records)
        out[name]["signal_check"] = sig.to_dict()
        log.info("leakage signal check, %s %s split: %d evaluation record(s) x %d pretraining record(s) compared "
                 "in %.2f s (%d not compared)%s", t.name, name, sig.n_eval, sig.n_compared, sig.seconds,
                 sig.n_skipped, "".join(f"; {n}" for n in sig.notes))
        if sig.pairs:
            out[name]["signal_copies"] = [list(p) for p in sig.pairs]
            log.warning("leakage: the pretraining data holds %d near-copy(ies) (signal correlation >= 0.99, same "
                        "recording under another id) of records of the %s %s split (%s), e.g. evaluated ~ "
                        "pretraining: %s; recorded in the cell's leakage report (not refused: remove them from the "
                        "pretraining pool)", len(sig.pairs), t.name, name, t.dataset,
                        ", ".join(f"{e} ~ {p} ({c:.4f})" for e, p, c in sig.pairs[:5]))
    out["checked"] = True
    out["leaked"] = any(v.get("leaked") for k, v in out.items() if isinstance(v, dict))
    out["signal_copies"] = sum(len(v.get("signal_copies") or []) for v in out.values() if isinstance(v, dict))
    return out


@dataclass
class _Context:
    cfg: DictConfig
    mode: str
    task_spec: TaskSpec
    eval_spec: TaskSpec | None
    fractions: list[float]
    seeds: list[int]
    results_dir: Path
    identity: dict[str, Any] | None = None   # checkpoint_identity() of this job's checkpoint
    recipe: dict[str, Any] | None = None     # _recipe() of this job


def _context(cfg: DictConfig, mode: str) -> _Context:
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    from ecgfm.data.prepare import check_data_paths

    for group in ("task", "eval_data"):     # before anything runs, naming the key the user sets
        if cfg.get(group) and cfg[group].get("sources") is not None:
            check_data_paths(cfg[group].sources, f"{group}.sources")
    task_spec = TaskSpec.from_config(cfg.task)
    eval_node = cfg.get("eval_data")
    eval_spec = external_spec(eval_node, task_spec) if eval_node else None
    fractions = [float(f) for f in _as_list(cfg.fraction)]
    seeds = [int(s) for s in _as_list(cfg.seed)]
    return _Context(cfg, mode, task_spec, eval_spec, fractions, seeds, Path(str(cfg.results_dir)))


#: task settings an external set does not read (it is scored with the task's window, stride and classes); refused
#: in ``eval_data`` when they differ from the task's, and left out of a cell's recipe identity
EXTERNAL_IGNORED = ("crop_seconds", "stride_seconds", "min_count")


def external_spec(node: Any, task_spec: TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` of an external set (``cfg.eval_data``), checked against what is used of it.

    An external set is embedded with the task's windows and stride (``window_seconds`` / the encoder's pretraining
    crop / ``task.crop_seconds``, and ``stride_seconds`` / ``task.stride_seconds``) and scored on the task's
    classes, every record as test data. So ``eval_data.crop_seconds`` / ``stride_seconds`` / ``min_count`` were
    ignored and a split other than ``{kind: all}`` was replaced by it, each without a word; now a value that differs
    from what is used is refused (the same value, e.g. ``${task.crop_seconds}`` in an older copy of a shipped file,
    is accepted), and a missing ``split`` is ``{kind: all}``.

    Raises:
        ConfigError: naming ``eval_data.<key>``.
    """
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    used = {"crop_seconds": task_spec.crop_seconds, "stride_seconds": task_spec.stride_seconds, "min_count": 1}
    why = {"crop_seconds": "it is embedded with the task's window (window_seconds, else the encoder's pretraining "
                           "crop, else task.crop_seconds)",
           "stride_seconds": "it is embedded with the task's stride (stride_seconds, else task.stride_seconds)",
           "min_count": "its classes are the task's (a class it lacks is listed as not evaluable, none is dropped)"}
    for key in EXTERNAL_IGNORED:
        # min_count is read nowhere for an external set: 1 (none) or a copy of the task's (${task.min_count}) is fine
        if key in raw and raw[key] != used[key] and not (key == "min_count" and
                                                          raw[key] == getattr(task_spec, "min_count", None)):
            raise ConfigError(f"eval_data.{key}", f"is {raw[key]!r}, but an external set is scored with the task's "
                                                  f"window, stride and classes: {why[key]}, so it would silently do "
                                                  f"nothing; remove eval_data.{key}")
    if "split" not in raw:   # an external set is test data only
        raw["split"] = {"kind": "all"}
    split = raw.get("split")
    if isinstance(split, Mapping) and split.get("kind") != "all":
        raise ConfigError("eval_data.split", f"is {split!r}, but an external set is test data only: every labelled "
                                             f"record is scored (the head is trained and selected on the task's own "
                                             f"splits); use split: {{kind: all}} or leave it out")
    for key in EXTERNAL_IGNORED[:2]:   # its TaskData's window fields say what is used: the task's
        raw[key] = getattr(task_spec, key)
    raw.pop("min_count", None)
    return TaskSpec.from_config(raw, key="eval_data")


def _external_identity(spec: TaskSpec | None) -> dict[str, Any] | None:
    """An external set's part of a cell's recipe identity: its spec without the settings it does not read
    (:data:`EXTERNAL_IGNORED`; the task's window and stride are in the identity through the task). Since
    2026-12-07: cells with an external set computed before hold them, so they are recomputed once."""
    if spec is None:
        return None
    return {k: v for k, v in asdict(spec).items() if k not in EXTERNAL_IGNORED}


def _recipe(ctx: _Context, desc: Encoder, head: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the checkpoint that changes a cell's numbers (hashed into its ``recipe_id``): the
    probe / fine-tuning recipe, window and stride settings, the encoder's crop, the preprocessing, the task and
    external-set specs and the bootstrap settings. Settings that only change speed are left out."""
    cfg = ctx.cfg
    return {"mode": ctx.mode, "head": _head_identity(head),
            "window_seconds": cfg.get("window_seconds"), "stride_seconds": cfg.get("stride_seconds"),
            "encoder_crop_samples": desc.crop_samples, "preprocess": desc.preprocess.to_dict(),
            "task": asdict(ctx.task_spec), "eval_data": _external_identity(ctx.eval_spec),
            "bootstrap": {"n": int(cfg.bootstrap.n), "seed": int(cfg.bootstrap.seed)},
            # resolved (null: as pretrained): a lead-aware-pretrained encoder's cells keep their identity
            "lead_aware": resolve_lead_aware(cfg.features.get("lead_aware"), desc),
            **_feature_code_recipe(ctx.mode),
            **_finetune_code_recipe(ctx.mode, str(head.get("head_init", "")), float(head.get("layer_decay", 1.0)))}


def _feature_code_recipe(mode: str) -> dict[str, Any]:
    """The frozen-feature extraction code's version (:data:`ecgfm.evaluate.features.FEATURE_SCHEMA`) in a probe
    cell's recipe identity once it is bumped past 1, so cells computed from features of older extraction code are
    recomputed, not reused (at 1, the version of every cell written before it existed, it is left out)."""
    from ecgfm.evaluate.features import FEATURE_SCHEMA

    return {"feature_schema": FEATURE_SCHEMA} if mode != "finetune" and FEATURE_SCHEMA > 1 else {}


def _head_identity(head: dict[str, Any]) -> dict[str, Any]:
    """The probe / fine-tuning settings that join a cell's recipe identity: all but ``num_workers`` (speed only);
    ``min_epoch_samples`` only when set (0 is the behaviour from before the key existed, so those cells keep their
    identity and are reused); ``lp_features`` only when it changes something (an LP head fitted on windows: the
    default ``records`` is the behaviour from before the key, and a random head has no probe)."""
    def counts(k: str, v: Any) -> bool:
        if k == "num_workers" or (k == "min_epoch_samples" and not v):
            return False
        return not (k == "lp_features" and (v == "records" or head.get("head_init") != "lp"))

    return {k: v for k, v in head.items() if counts(k, v)}


def _record_keys(cache: Any, rows: Any) -> list[str]:
    """Sorted ``source/record_id`` keys of cache ``rows``."""
    keys = cache.keys
    return sorted(keys[int(i)] for i in np.asarray(rows, dtype=np.int64))


def _finetune_code_recipe(mode: str, head_init: str = "", layer_decay: float = 1.0) -> dict[str, Any]:
    """Fine-tuning settings fixed in code that change its numbers (part of a fine-tune cell's recipe identity):
    the parameter names exempt from weight decay (:data:`ecgfm.evaluate.finetune.FINETUNE_NO_DECAY_NAMES`); with
    layer-wise lr decay, how layer ids are counted (``Backbone.num_layer_ids``: CNN cells from before the fix had an
    empty level under the head, one extra decay factor on every layer; ViT cells before 2026-12-08 had the final
    norm on a level of its own under the head, the same extra factor); and, with a randomly initialised head, that
    the model is trained in train mode (before that fix an exported encoder's cells trained BatchNorm on frozen
    statistics with dropout off; the key is set for every kind, so a row and its random-init twin keep one recipe
    and stay paired); with an LP-initialised head, that the probe is fitted after never-estimated (random-init)
    BatchNorm statistics are computed on the training crops (since 2026-12-06:
    :func:`ecgfm.evaluate.batchnorm.recalibrate_batchnorm`).
    Cells from before a fix are recomputed, not reused."""
    if mode != "finetune":
        return {}
    from ecgfm.evaluate.finetune import FINETUNE_NO_DECAY_NAMES

    out: dict[str, Any] = {"finetune_no_decay_names": list(FINETUNE_NO_DECAY_NAMES)}
    if layer_decay != 1.0:   # the head is one decay step above the highest backbone layer (was two for CNNs);
        # since 2026-12-08 a transformer's final norm shares the head's level (MAE's param_groups_lrd; it had a level
        # of its own, one more decay step on every ViT / ST-MEM / stable-HuBERT layer). Set for every backbone, so
        # CNN cells (same numbers) are recomputed once rather than a key that needs the backbone here
        out["layer_ids"] = "top = highest backbone layer + 1; final norm at the head's level"
    if head_init == "random":   # every kind, so an encoder's cells still share their random-init twin's recipe
        out["fit_mode"] = "train"
    if head_init == "lp":   # since 2026-12-06: BatchNorm statistics of the training crops before the probe
        out["lp_init"] = "never-estimated bn statistics computed on training crops"
    return out


#: probe settings a head does not read (left out of its cells' recipe identity, so that adding a setting for another
#: head keeps the identity of existing cells).
_PROBE_UNUSED = {"linear": ("lrs", "mlp", "attention"), "mlp": ("Cs", "max_iter", "attention"),
                 "attention": ("Cs", "max_iter", "lrs", "mlp", "aggregate")}


def _probe_recipe(probe: dict[str, Any]) -> dict[str, Any]:
    """The probe settings that change a probe cell's numbers: a linear probe's ``Cs`` / ``max_iter``, an MLP
    probe's ``lrs`` / ``mlp``, the attention probe's ``attention`` block (the other heads' settings do not touch
    it), and the aggregation (``mean_embedding`` / ``mean_std`` / ``mean_prediction``; the attention probe pools
    by itself). With ``side_features``, also the version of those features (:func:`_side_feature_versions`): the
    cells were computed on them, as a ``checkpoint=handcrafted`` cell is (its checkpoint identity). An MLP or
    attention probe's recipe also names which parameters its AdamW decays (:data:`TORCH_PROBE_DECAY`)."""
    unused = _PROBE_UNUSED.get(str(probe.get("mode", "linear")), ())
    if probe.get("side_features") is None:      # the default leaves the identity of cells written before it
        unused = (*unused, "side_features")
    if probe.get("layers", "last") == "last":   # likewise
        unused = (*unused, "layers")
    out = {k: v for k, v in probe.items() if k not in unused}
    if probe.get("side_features") is not None:  # only then: every other cell keeps its recipe id byte for byte
        out[SIDE_FEATURE_VERSIONS] = _side_feature_versions()
    if str(probe.get("mode", "linear")) in TORCH_PROBES:   # since 2026-12-07 (cells from before are recomputed)
        out["weight_decay_on"] = TORCH_PROBE_DECAY
    return out


#: the trained (torch) probes, and which of their parameters AdamW decays (:func:`ecgfm.optim.param_groups`; before
#: 2026-12-07 every parameter, biases, norms and the attention probe's queries included)
TORCH_PROBES = ("mlp", "attention")
TORCH_PROBE_DECAY = "weights only: no biases, norm layers or queries"


#: key of a probe recipe (``recipe.head``) holding the handcrafted side features' versions
SIDE_FEATURE_VERSIONS = "side_feature_versions"


def _side_feature_versions() -> dict[str, str]:
    """What the handcrafted side features (``probe.side_features=handcrafted``) are, as the identity of
    ``checkpoint=handcrafted`` has it: the feature definitions' version and the installed neurokit2 (its peak
    detector). A bump of either makes older cells stale instead of averaging them with new seeds."""
    from ecgfm.evaluate.handcrafted import FEATURE_VERSION, neurokit_version

    return {"feature_version": FEATURE_VERSION, "neurokit2": neurokit_version(), "missing": HANDCRAFTED_MISSING_RULE}


#: how a probe scores a handcrafted feature group flagged missing (:class:`ecgfm.evaluate.probe.GroupMedianImputer`,
#: since 2026-12-08; before, the 0 fill itself): in the recipe of every cell reading handcrafted features, so cells
#: of the old rule are recomputed, never averaged with new ones
HANDCRAFTED_MISSING_RULE = "imputed with the training subset's medians"


def _identify(ctx: _Context, desc: Encoder, head: dict[str, Any]) -> None:
    """Fill ``ctx.identity`` (the checkpoint's content identity) and ``ctx.recipe`` for this job."""
    cfg = ctx.cfg
    ctx.identity = checkpoint_identity(desc.checkpoint, int(cfg.get("init_seed", 0)),
                                       _container(cfg.get("backbone_args")) or {})
    ctx.recipe = _recipe(ctx, desc, head)


def data_identity(task: TaskData, ext: TaskData | None) -> dict[str, str]:
    """What a cell's numbers were computed on, by content: each cache's records (:func:`cache_fingerprint`: plan,
    count, shard checksums), its labels, splits and classes. Part of the recipe identity, so a cell computed before
    a label table was edited or records were added is recomputed, not reused."""
    from ecgfm.evaluate.features import cache_fingerprint

    def one(t: TaskData) -> str:
        h = hashlib.sha256(cache_fingerprint(t.cache).encode())
        h.update(np.ascontiguousarray(t.labels, dtype=np.float32).tobytes())
        for part in sorted(t.splits):
            h.update(f"|{part}:".encode() + np.asarray(t.splits[part], dtype=np.int64).tobytes())
        h.update("|".join(map(str, t.class_names)).encode())
        return h.hexdigest()[:20]

    out = {"task": one(task)}
    if ext is not None:
        out["external"] = one(ext)
    return out


def _todo(ctx: _Context, checkpoint: str, leakage: dict[str, Any] | None = None) -> list[tuple[float, int]]:
    """Cells of this job still to compute: missing ones, and those whose stored checkpoint identity or recipe
    differs from this job's (:func:`ecgfm.evaluate.identity.stale_reason`, logged): a retrained encoder, a
    changed probe grid / learning rate / window / preprocessing, a cell without identity (older ecgfm), or one
    of another label fraction that shares its file name (``f<fraction:g>`` keeps 6 significant digits) is
    recomputed, never silently reused. Every file this cell may be in is looked at (:func:`_cell_files`). A
    reused cell gets this run's leakage verdict (``leakage``: the pretraining
    data may be known now, or allowed now), and one asked to carry a classifier artifact is reused only with the
    artifact of its own checkpoint and recipe. Needs :func:`_identify` first."""
    assert ctx.identity is not None and ctx.recipe is not None, "call _identify(ctx, ...) first"
    rid = recipe_identity(ctx.recipe)
    out = []
    for s in ctx.seeds:
        for f in ctx.fractions:
            base, legacy, own = _cell_files(ctx, ctx.task_spec.name, checkpoint, f, s)
            found = next((p for p in (own, legacy, base) if p.exists() and _reusable(p, ctx, rid, f, s)), None)
            # a cell asked to carry its classifier artifact (fine-tunes always do; probes with save_classifier)
            want_clf = ctx.mode == "finetune" or bool(ctx.cfg.get("save_classifier", False))
            if found is not None and want_clf:
                why = _classifier_mismatch(found, ctx.identity["id"], rid)
                if why:
                    log.info("%s: %s: recomputing the cell", found, why)
                    found = None
            if ctx.cfg.get("overwrite") or found is None:
                out.append((f, s))
            else:
                _refresh_reused(found, checkpoint, leakage)
    return out


def _classifier_mismatch(cell_file: Path, checkpoint_id: str, rid: str) -> str | None:
    """Why the classifier artifact beside a cell cannot be reused with it (None: it can): missing, or written for
    another checkpoint or recipe (a cell recomputed without save_classifier left an older one behind)."""
    d = classifier_dir(cell_file)
    if not d.is_dir():
        return "its classifier artifact is missing"
    try:
        from ecgfm.artifacts import read_meta

        _, meta = read_meta(d, "classifier")
    except Exception as exc:  # noqa: BLE001 - any unreadable artifact is recomputed
        return f"its classifier artifact is unreadable ({exc})"
    extra = meta.get("extra") or {}
    if extra.get("cell_recipe_id") != rid or extra.get("checkpoint_id") != checkpoint_id:
        return "its classifier artifact was written for another checkpoint or recipe (or before artifacts named them)"
    return None


def _refresh_reused(cell_file: Path, checkpoint: str, leakage: dict[str, Any] | None) -> None:
    """Bring a reused cell up to this run, without touching its numbers:

    * this run's leakage verdict (``leakage``): a cell written before its encoder's pretraining data was named (or
      under allow_leakage=true with other data) kept "ok" / "unchecked" and could be read as clean; only a changed
      verdict (``checked`` / ``leaked``) counts (a path spelt otherwise does not);
    * in a multirun, this sweep's id: a resumed recipe multirun must see the cells it reuses as its own, or a job
      of another recipe would take over the file of a finished one (:func:`_replaceable`);
    * ``checkpoint_path`` where the cell has none (cells before 2026-12-06): where its relative checkpoint string
      points from the folder the sweep runs in, for the report's superseded check.

    The file is rewritten only when something changed, and only if no other job rewrote it since it was read."""
    try:
        before = file_key(cell_file)
        cell = json.loads(cell_file.read_text())
    except (OSError, ValueError):
        return
    changed = False
    if leakage is not None:
        leakage = json.loads(json.dumps(jsonable(leakage)))   # as a cell stores it
        old = cell.get("leakage") or {}
        if not all(old.get(k) == leakage.get(k) for k in ("checked", "leaked")):
            log.warning("%s: reused with this run's leakage check (%s), not the one it was written with (%s)",
                        cell_file, leakage, old)
            cell["leakage"], changed = leakage, True
    sweep = _sweep_id()
    if _in_multirun() and sweep is not None and cell.get("sweep") != sweep:
        cell["sweep"], changed = sweep, True
    if not cell.get("checkpoint_path") and os.path.exists(str(checkpoint)):
        cell["checkpoint_path"], changed = os.path.abspath(str(checkpoint)), True
    if not changed:
        return
    try:
        if file_key(cell_file) == before:
            atomic_write_json(cell_file, cell)
    except OSError:
        pass


def _cell_files(ctx: _Context, task: str, checkpoint: str, fraction: float, seed: int) -> tuple[Path, Path, Path]:
    """The files a cell of this job may be in (:func:`cell_path`): the plain one, the one tagged with its recipe
    only (written by older versions for a multirun over a recipe setting: read, so those cells are still found),
    and the one tagged with its (checkpoint identity, recipe), where it goes when the plain file holds another
    cell that is kept (:func:`_cell_target`). Needs :func:`_identify` first."""
    assert ctx.identity is not None and ctx.recipe is not None, "call _identify(ctx, ...) first"
    eval_name = ctx.eval_spec.name if ctx.eval_spec else None
    rid = recipe_identity(ctx.recipe)
    return (cell_path(ctx.results_dir, ctx.mode, task, checkpoint, fraction, seed, eval_name),
            cell_path(ctx.results_dir, ctx.mode, task, checkpoint, fraction, seed, eval_name, rid),
            cell_path(ctx.results_dir, ctx.mode, task, checkpoint, fraction, seed, eval_name, rid,
                      ctx.identity["id"]))


def _reusable(p: Path, ctx: _Context, rid: str, fraction: float, seed: int) -> bool:
    """Whether the existing cell ``p`` was computed from this job's checkpoint and recipe, for this label fraction
    and seed (else logs why not)."""
    try:
        stored = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable cell (%s): recomputing", p, exc)
        return False
    why = stale_reason(stored, ctx.identity, rid, ctx.recipe) or _other_cell(stored, fraction, seed)
    if why is not None:
        log.warning("%s: %s since this cell was computed: recomputing", p, why)
    return why is None


def _other_cell(stored: dict[str, Any], fraction: float, seed: int) -> str | None:
    """Why a stored cell is not the (fraction, seed) cell asked for, though in its file (None: it is): the file name
    keeps 6 significant digits of the fraction (``f0.123457``), so two fractions can share one file."""
    try:
        same = float(stored["fraction"]) == float(fraction) and int(stored["seed"]) == int(seed)
    except (KeyError, TypeError, ValueError):
        same = False
    if same:
        return None
    return (f"the label fraction / seed changed (the file holds fraction {stored.get('fraction')!r}, seed "
            f"{stored.get('seed')!r}; asked: fraction {float(fraction)!r}, seed {int(seed)})")


def _outdated(stored: dict[str, Any], ctx: _Context) -> str | None:
    """Why an existing cell can no longer be had from *its own* checkpoint string and recipe (None: it can, so it
    stays a valid row of the table even where it is not this job's cell).

    Outdated: its checkpoint string now has another identity (an encoder retrained in place, a changed
    ``conf/backbone`` file; init seed and ``backbone_args`` are its own, from its stored identity) or none; its
    recipe hash is of an older cell schema; the parts of its recipe fixed in code (fine-tuning's
    :func:`_finetune_code_recipe`, the side features' :func:`_side_feature_versions`) are not what this code
    writes; or it was computed on the same task, external set and preprocessing as this job but on other data
    (records, labels or splits changed since)."""
    basis = (stored.get("checkpoint_identity") or {}).get("basis") or {}
    try:
        now = checkpoint_identity(str(stored["checkpoint"]), int(basis.get("init_seed", 0)),
                                  dict(basis.get("backbone_args") or {}))
    except Exception as exc:  # noqa: BLE001 - any checkpoint that cannot be identified now cannot give the cell again
        return f"its checkpoint cannot be identified now ({str(exc).splitlines()[0] if str(exc) else exc!r})"
    if now["id"] != stored.get("checkpoint_id"):
        return (f"its checkpoint {stored['checkpoint']!r} has another identity now "
                f"({str(stored.get('checkpoint_id'))[:7]} -> {now['label']})")
    recipe = stored.get("recipe")
    if not isinstance(recipe, dict) or recipe_identity(recipe) != stored.get("recipe_id"):
        return "its recipe id is not the hash of its recipe under this cell schema (an older ecgfm)"
    head = recipe.get("head") or {}
    if recipe.get("mode") == "finetune":
        code = _finetune_code_recipe("finetune", str(head.get("head_init", "")),
                                     float(head.get("layer_decay", 1.0)))
        every = {**_finetune_code_recipe("finetune", "random", 0.5),   # every key the function can set
                 **_finetune_code_recipe("finetune", "lp", 0.5)}
        changed = [k for k in every if diff_keys(recipe.get(k), code.get(k))]
        if changed:
            return f"the fine-tuning settings fixed in code changed ({', '.join(changed)})"
    if head.get("side_features") is not None and diff_keys(head.get(SIDE_FEATURE_VERSIONS),
                                                           _side_feature_versions()):
        return (f"the handcrafted side features changed ({head.get(SIDE_FEATURE_VERSIONS)} -> "
                f"{_side_feature_versions()})")
    mine = ctx.recipe or {}
    if ("data" in mine and not any(diff_keys(recipe.get(k), mine.get(k)) for k in ("task", "eval_data", "preprocess"))
            and diff_keys(recipe.get("data"), mine["data"])):
        return "the task's records, labels or splits changed"
    return None


def _replaceable(p: Path, ctx: _Context, rid: str) -> bool:
    """Whether this job's new cell may replace the existing file ``p``: it is unreadable, has no identity, is
    this very cell (``overwrite=true``, a classifier artifact to redo), is outdated (:func:`_outdated`, logged), or
    is this checkpoint's cell with another recipe not written by this same multirun (the run's recipe is the
    current one: a rerun with a changed setting replaces the old recipe's cells; resuming a recipe multirun
    recomputes a cell the older sweep filed under another recipe, once). A cell of another checkpoint identity
    still valid for its own is kept (another ``init_seed`` / ``backbone_args`` of a ``random:`` checkpoint), and
    so is another recipe's cell of this multirun."""
    try:
        stored = json.loads(p.read_text())
    except (OSError, ValueError):
        return True
    ck, rc = stored.get("checkpoint_id"), stored.get("recipe_id")
    if ck is None or rc is None or (ck, rc) == ((ctx.identity or {}).get("id"), rid):
        return True
    why = _outdated(stored, ctx)
    if why is not None:
        log.info("%s: replaced: %s", p, why)
        return True
    # this checkpoint's cell of another recipe: the run's recipe is the current one, so it takes over (a rerun
    # with a changed setting must not leave the old recipe's rows beside the new, for the acceptance block to
    # choose among), except a cell written by another job of this same multirun (a recipe sweep keeps each recipe)
    return ck == (ctx.identity or {}).get("id") and not (_in_multirun() and stored.get("sweep") == _sweep_id())


def _cell_target(ctx: _Context, task: str, checkpoint: str, fraction: float, seed: int) -> Path:
    """The file a newly computed cell goes to, decided when it is written (not when the job starts), so that the
    jobs of one multirun see each other's cells.

    Its (checkpoint identity, recipe)'s tagged file when that exists; else the recipe-tagged file of an older
    version, or else the plain ``f<fraction>_s<seed>.json``, when the cell there may be replaced
    (:func:`_replaceable`: no other valid cell is lost); else the tagged file, so that a multirun over a recipe
    setting, over ``init_seed`` / ``backbone_args``, or resuming one, keeps every (checkpoint, recipe)'s cell
    and a rerun finds each in its own file. (Jobs of a parallel launcher that finish within the same instant can
    still both take the plain file.)"""
    rid = recipe_identity(ctx.recipe)
    base, legacy, own = _cell_files(ctx, task, checkpoint, fraction, seed)
    if own.exists():
        return own
    if legacy.exists() and _replaceable(legacy, ctx, rid):
        return legacy
    if not base.exists() or _replaceable(base, ctx, rid):
        return base
    log.info("%s holds a cell of another checkpoint identity or recipe, still valid for its own (kept); this "
             "job's cell (checkpoint %s, recipe %s) goes to %s", base, (ctx.identity or {}).get("label"), rid[:7],
             own.name)
    return own


def _prepare(ctx: _Context, enc: Encoder) -> tuple[TaskData, TaskData | None]:
    cfg = ctx.cfg
    cache_root = str(cfg.paths.cache_root)
    workers = int(cfg.get("prepare_workers", 0))
    task = build_task(ctx.task_spec, cache_root, enc.preprocess, workers=workers)
    _check_cache_rate(task, enc)
    ext = None
    if ctx.eval_spec is not None:
        ext = build_external(ctx.eval_spec, task, cache_root, enc.preprocess, workers=workers)
        _check_cache_rate(ext, enc)
    return task, ext


def _check_cache_rate(task: TaskData, enc: Encoder) -> float:
    """The task cache's own rate (its manifest), checked against the encoder's preprocessing.

    Raises:
        ValueError: the cache mixes rates (windows in seconds have no fixed length in samples) or is not at the
            rate the encoder takes.
    """
    fs = task.cache.fs
    if fs is None:
        raise EvaluationError(f"task {task.name}: its cache {task.cache_dir} mixes sampling rates (preprocess.fs is "
                              f"null), so a window in seconds has no fixed length in samples; set preprocess.fs")
    want = enc.preprocess.fs if enc.preprocess.fs is not None else enc.trained_fs
    if want is not None and abs(float(fs) - float(want)) > 1e-6:
        raise EvaluationError(f"task {task.name}: its cache {task.cache_dir} is at {float(fs):g} Hz but checkpoint "
                              f"{enc.checkpoint!r} takes {float(want):g} Hz; refusing to feed it at the wrong rate")
    return float(fs)


def _cell_common(ctx: _Context, enc: Encoder, task: TaskData, ext: TaskData | None, window: int, stride: int,
                 leakage: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": ctx.mode, "task": task.name, "dataset": task.dataset, "method": enc.method,
        "checkpoint": enc.checkpoint, "checkpoint_kind": enc.kind, "backbone": enc.backbone_name,
        # where a relative checkpoint string pointed when the cell was computed (the report, run from another
        # folder, judges the weights there: ecgfm.evaluate.report.superseded_cells)
        "checkpoint_path": (os.path.abspath(str(enc.checkpoint)) if os.path.exists(str(enc.checkpoint)) else None),
        "encoder_fingerprint": encoder_fingerprint(enc.backbone) if enc.backbone is not None else None,
        "checkpoint_id": (ctx.identity or {}).get("id"), "checkpoint_identity": ctx.identity,
        "recipe_id": recipe_identity(ctx.recipe) if ctx.recipe is not None else None, "recipe": ctx.recipe,
        "architecture": enc.architecture,
        "preprocess": enc.preprocess.to_dict(), "window_samples": int(window), "stride_samples": int(stride),
        "fs": float(task.cache.fs or 0.0), "classes": task.class_names, "multilabel": task.multilabel,
        "splits": {k: int(len(v)) for k, v in task.splits.items()}, "task_notes": task.notes,
        "external_dataset": ext.dataset if ext is not None else None,
        "external_notes": ext.notes if ext is not None else None,
        "external_label_map": ext.label_report if ext is not None else None, "leakage": leakage,
        "cache_dir": task.cache_dir, "sweep": _sweep_id(),
    }


#: environment variable holding the id of the running multirun (set by :class:`ReportCallback`)
SWEEP_ENV = "ECGFM_SWEEP_ID"


def _sweep_id() -> str | None:
    """The id of the multirun this job belongs to (one per ``-m`` invocation: set by
    :meth:`ReportCallback.on_multirun_start`, else the sweep folder); None outside a multirun."""
    if not _in_multirun():
        return None
    if os.environ.get(SWEEP_ENV):
        return os.environ[SWEEP_ENV]
    from hydra.core.hydra_config import HydraConfig

    return f"dir:{Path(str(HydraConfig.get().sweep.dir)).resolve()}"


def _in_multirun() -> bool:
    """True inside a job of a Hydra multirun (the sweep's ReportCallback then builds the table once at the end)."""
    from ecgfm.errors import in_multirun

    return in_multirun()


def _report_n_boot(cfg: Any) -> int:
    """The paired-comparison resamples of the report: the sweep's own ``bootstrap.n`` (0: no CIs)."""
    return int((cfg.get("bootstrap") or {}).get("n", 1000))


def _finish(ctx: _Context, written: list[str], skipped: int, t0: float) -> dict[str, Any]:
    when = str(ctx.cfg.get("report", "auto"))
    report = None
    if when == "always" or (when == "auto" and not _in_multirun()):
        report = build_report(ctx.results_dir, plot=bool(ctx.cfg.get("plot", True)), n_boot=_report_n_boot(ctx.cfg))
    out = {"cells_written": written, "cells_skipped": skipped, "report": report,
           "seconds": time.perf_counter() - t0}
    log.info("%s: %d cell(s) written, %d skipped in %s%s", ctx.mode, len(written), skipped, ctx.results_dir,
             f"; table {report['markdown']}" if report else "")
    return out


try:  # Hydra >= 1.1
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class ReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (``hydra.callbacks.report`` in conf/probe.yaml and conf/finetune.yaml): after a multirun,
    rebuild the results table and plot once from every cell (also after a SLURM sweep via submitit). At its start it
    gives the multirun an id (:data:`SWEEP_ENV`, inherited by the jobs) that its cells record (``sweep``: which
    cells one multirun wrote; where a cell is filed does not depend on it, :func:`_cell_target`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import uuid

        os.environ[SWEEP_ENV] = uuid.uuid4().hex

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.get("report", "auto")) == "never":
            return
        out = build_report(str(config.results_dir), plot=bool(config.get("plot", True)),
                           n_boot=_report_n_boot(config))
        log.info("sweep finished: %d cells; table %s", out["n_cells"], out["markdown"])


# ------------------------------------------------------------------------------------------------ probe
def probe_main(cfg: DictConfig) -> dict[str, Any]:
    """Linear / MLP / attention probe cells (``conf/probe.yaml``). Returns a summary (cells written / skipped,
    report paths). ``probe.mode=attention`` trains on the frozen tokens (:func:`ecgfm.evaluate.features.cached_tokens`,
    one extraction per checkpoint, corpus and window); the other heads on window embeddings.

    Raises:
        ValueError: ``supervised:`` checkpoints (a fine-tuning baseline), bad task or probe settings, a window the
            encoder cannot embed (learned positions: :func:`ecgfm.evaluate.features.check_window`), the attention
            probe or an aggregate other than ``mean_embedding`` asked of the handcrafted baseline.
        LeakageError: pretraining and test data overlap and ``allow_leakage`` is false.
    """
    from ecgfm.recipes import validate_probe_config

    t0 = time.perf_counter()
    validate_probe_config(cfg)  # ConfigError naming the key (probe.Cs=x, +probe.foo=1)
    mode = str(cfg.probe.mode)
    side = cfg.probe.get("side_features")
    layers = str(cfg.probe.get("layers", "last"))
    ctx = _context(cfg, probe_variant(mode, str(cfg.probe.aggregate), side, layers))
    checkpoint = str(cfg.checkpoint)
    if checkpoint.startswith("supervised:"):
        raise EvaluationError(f"checkpoint {checkpoint!r}: 'supervised:' is a fine-tuning baseline (supervised "
                              f"training from scratch); run it with finetune.py. For frozen random features use "
                              f"'random:'.")
    override = _spec_override(cfg)
    desc = resolve_checkpoint(checkpoint, 0, load_weights=False, preprocess=override)
    if desc.kind == HANDCRAFTED and bool(cfg.get("save_classifier", False)):
        raise EvaluationError(f"checkpoint {checkpoint!r}: save_classifier=true needs an encoder; the handcrafted "
                              f"baseline has no network to save (run it with save_classifier=false)")
    if desc.kind == HANDCRAFTED and side:
        raise EvaluationError(f"checkpoint {checkpoint!r}: probe.side_features={side} appends the handcrafted "
                              f"features to an encoder's; the handcrafted baseline already is them")
    if desc.kind == HANDCRAFTED and layers != "last":
        raise EvaluationError(f"checkpoint {checkpoint!r}: probe.layers={layers} pools an encoder's stages; the "
                              f"handcrafted baseline has none (use probe.layers=last)")
    if desc.kind == HANDCRAFTED and mode == "attention":
        raise EvaluationError(f"checkpoint {checkpoint!r}: probe.mode=attention pools an encoder's frozen tokens; the "
                              f"handcrafted baseline has one feature row per record (use probe.mode=linear or mlp)")
    if desc.kind == HANDCRAFTED and str(cfg.probe.aggregate) != "mean_embedding":
        # one row per record: mean_std appended an all-zero std block and mean_prediction trained on the same rows,
        # each a duplicate of the linear row under another name in results.md
        raise EvaluationError(f"checkpoint {checkpoint!r}: probe.aggregate={cfg.probe.aggregate} aggregates an "
                              f"encoder's window embeddings; the handcrafted baseline has one feature row per record "
                              f"(use probe.aggregate=mean_embedding)")
    _identify(ctx, desc, _probe_recipe(_container(cfg.probe)))
    task, ext = _prepare(ctx, desc)
    ctx.recipe["data"] = data_identity(task, ext)   # a changed label table or record set: the cells are stale
    if desc.kind == HANDCRAFTED:   # the side-feature cells carry it in SIDE_FEATURE_VERSIONS
        ctx.recipe["handcrafted_missing"] = HANDCRAFTED_MISSING_RULE
    # the guard before any cell is reused: a cell kept from a run with allow_leakage=true, or from before the
    # pretraining data was known, must not pass silently now
    leakage = leakage_check(desc, task, ext, bool(cfg.allow_leakage), _container(cfg.pretrain_caches) or [])
    todo = _todo(ctx, checkpoint, leakage)
    n_all = len(ctx.fractions) * len(ctx.seeds)
    if not todo:
        log.info("every cell of %s / %s / %s exists: nothing to do", mode, ctx.task_spec.name, checkpoint)
        return _finish(ctx, [], n_all, t0)
    probe_cfg = cfg.probe
    fs = float(task.cache.fs)  # checked against the encoder's rate by _prepare
    window = _window(cfg, ctx.task_spec.crop_seconds, fs, desc.crop_samples)
    enc = resolve_checkpoint(checkpoint, window, int(cfg.init_seed), _container(cfg.get("backbone_args")) or {},
                             override)
    stride = int(round(float(cfg.stride_seconds) * fs)) if cfg.get("stride_seconds") is not None \
        else task.stride_samples
    feat_dir = str(cfg.features.dir)
    external = {}
    hc_missing: dict[str, Any] = {}   # records whose handcrafted feature groups were filled (too few beats)
    # the handcrafted columns of such groups: the probe imputes them with each training subset's medians
    groups: tuple[tuple[tuple[int, ...], int], ...] = ()
    if enc.kind == HANDCRAFTED:  # one feature row per whole record; window / stride unused
        from ecgfm.evaluate.handcrafted import cached_handcrafted, missing_groups

        feats = cached_handcrafted(task.cache, feat_dir)
        groups = missing_groups(0)
        efeats = cached_handcrafted(ext.cache, feat_dir) if ext is not None else None
        hc_missing = _handcrafted_missing(task, ext, feats, efeats)
        if ext is not None:
            external[f"external:{ext.dataset}"] = (efeats, ext.labels, ext.splits["test"])
    else:
        assert enc.backbone is not None
        try:
            check_window(enc.backbone, window)  # a ViT-1D is rebuilt for longer windows; learned positions: refused
        except ValueError as exc:
            raise EvaluationError(f"checkpoint {checkpoint!r}: {exc}") from None
        lead_aware = bool(ctx.recipe["lead_aware"])   # features.lead_aware resolved by _identify
        if enc.kind == "random":   # a random twin's BatchNorm statistics from the training windows (no labels)
            from ecgfm.evaluate.batchnorm import random_init_batchnorm_statistics

            # at the function's fixed batch size, not features.batch_size: the statistics average per-batch ones,
            # so a batch size would change the features while the cell's recipe (speed settings left out) stays
            n_bn = random_init_batchnorm_statistics(enc.backbone, task.cache, task.splits["train"], window,
                                                    lead_aware)
            if n_bn:
                log.info("random-init twin: BatchNorm statistics of %d layer(s) computed on the %d training "
                         "records' windows (no labels)", n_bn, len(task.splits["train"]))
        efp = encoder_fingerprint(enc.backbone)
        try:
            embed_fn(enc.backbone, layers)     # a backbone without embed_stages: refused before any work
        except ValueError as exc:
            raise EvaluationError(f"checkpoint {checkpoint!r}: {exc}") from None
        extract = cached_tokens if mode == "attention" else partial(cached_features, layers=layers)
        feats = extract(enc.backbone, task.cache, window, stride, feat_dir, batch_size=int(cfg.features.batch_size),
                        device=str(cfg.device), encoder_fp=efp, lead_aware=lead_aware)
        if ext is not None:
            efeats = extract(enc.backbone, ext.cache, window, stride, feat_dir,
                             batch_size=int(cfg.features.batch_size), device=str(cfg.device), encoder_fp=efp,
                             lead_aware=lead_aware)
            external[f"external:{ext.dataset}"] = (efeats, ext.labels, ext.splits["test"])
    aggregate = str(probe_cfg.aggregate)
    if side:                       # encoder record features + the handcrafted ones: one row per record
        from ecgfm.evaluate.features import with_record_features
        from ecgfm.evaluate.handcrafted import cached_handcrafted, missing_groups

        hc = cached_handcrafted(task.cache, feat_dir)
        ehc = cached_handcrafted(ext.cache, feat_dir) if ext is not None else None
        hc_missing = _handcrafted_missing(task, ext, hc, ehc)
        feats = with_record_features(feats, hc, aggregate)
        groups = missing_groups(feats.dim - hc.dim)   # the handcrafted block comes last
        if ext is not None:
            external = {k: (with_record_features(f, ehc, aggregate), y, rows) for k, (f, y, rows) in external.items()}
        aggregate = "mean_embedding"
    from ecgfm.evaluate.probe import ProbeData, run_probe_grid

    data = ProbeData(features=feats, labels=task.labels, splits=task.splits, multilabel=task.multilabel,
                     class_names=task.class_names, patient_ids=list(task.patient_ids), external=external,
                     name=task.name, missing_groups=groups)
    common = _cell_common(ctx, enc, task, ext, window, stride, leakage)
    common["feature_key"] = feats.key
    common["feature_seconds"] = feats.seconds
    if hc_missing:   # per split: records whose RR / successive-difference / morphology group was filled (imputed)
        common["handcrafted_missing"] = hc_missing
    if mode == "attention":
        common["token_cache"] = {"key": feats.key, "tokens": int(feats.tokens.shape[0]), "dim": feats.dim,
                                 "windows": int(len(feats.record)), "bytes": feats.nbytes, "dtype": "float16"}
    if enc.kind == HANDCRAFTED:
        from ecgfm.evaluate.handcrafted import neurokit_version

        common["handcrafted"] = {"feature_version": enc.info["feature_version"], "features": enc.info["features"],
                                 "neurokit2": neurokit_version(), "unit": "whole record"}
    written = []
    for seed in sorted({s for _, s in todo}):
        fracs = [f for f, s in todo if s == seed]
        results = run_probe_grid(
            data, fractions=fracs, seeds=[seed], mode=mode, Cs=[float(c) for c in probe_cfg.Cs],
            lrs=[float(x) for x in probe_cfg.lrs], aggregate=aggregate,
            n_boot=int(cfg.bootstrap.n), bootstrap_seed=int(cfg.bootstrap.seed), max_iter=int(probe_cfg.max_iter),
            mlp_kwargs=_container(probe_cfg.mlp) or {},
            attention_kwargs=dict(_container(probe_cfg.get("attention")) or {}, device=str(cfg.device)))
        for r in results:
            cell = dict(common, fraction=r["fraction"], seed=r["seed"], n_train=r["n_train"],
                        train_records=train_records_digest(task, r["train_rows"]),
                        hparam=r["hparam"], grid=r["grid"], not_converged=r.get("not_converged", []),
                        val_macro_auroc=r["val_macro_auroc"],
                        results={"test": r["test"], **{
                            name: score_external(task, ext, *r["predictions"][name], r["thresholds"],
                                                 int(cfg.bootstrap.n), int(cfg.bootstrap.seed))
                            if ext is not None and ext.label_report else m for name, m in r["external"].items()}},
                        seconds=r["seconds"],
                        probe={"aggregate": "attention" if mode == "attention" else str(probe_cfg.aggregate),
                               "head": mode, **({"side_features": side} if side else {}),
                               **({"layers": layers} if layers != "last" else {})},
                        predictions=_predictions(r["predictions"], task, ext))
            p = _cell_target(ctx, task.name, checkpoint, r["fraction"], r["seed"])
            if bool(cfg.get("save_classifier", False)):
                head = probe_head(r["model"], fit_window(enc.backbone, window), task,
                                  bool(ctx.recipe["lead_aware"]))
                agg = "logit" if str(probe_cfg.aggregate) == "mean_embedding" else "prob"
                cell["classifier"] = str(_save_cell_classifier(p, head, task, enc, dict(_container(probe_cfg)),
                                                               window, stride, r["thresholds"], cell, agg,
                                                               train_rows=r["train_rows"]))
            elif classifier_dir(p).is_dir():   # an artifact of the cell this one replaces: not this cell's model
                shutil.rmtree(classifier_dir(p))
            atomic_write_json(p, cell)
            written.append(str(p))
            if cell.get("classifier"):
                _announce_classifier(cell["classifier"])
            _log_cell(cell)
    return _finish(ctx, written, n_all - len(todo), t0)


def train_records_digest(task: TaskData, rows: Sequence[int]) -> str:
    """Which records a cell was trained on, by identity: sha256 (first 16 hex digits) of their sorted record keys.

    The label-fraction subsets are drawn over cache rows, so two caches of one dataset that order (or hold) records
    differently give one seed different subsets; paired comparisons check this digest
    (:func:`ecgfm.evaluate.report.matched_pairs`) instead of trusting (fraction, seed) alone.
    """
    return hashlib.sha256("\n".join(sorted(task.record_keys(rows))).encode()).hexdigest()[:16]


def _predictions(preds: dict[str, tuple[np.ndarray, np.ndarray]], task: TaskData, ext: TaskData | None
                 ) -> dict[str, Any]:
    """Record-level test (and external) predictions for paired comparisons between methods: record keys,
    targets (indicator rows) and scores at full float64 precision (rounding ties near-one-hot fine-tuned
    probabilities and destroys their ranking: a stored-score AUROC of 0.547 against 0.721 was seen)."""
    out = {}
    for split, (rows, p) in preds.items():
        t = task if split == "test" else ext
        assert t is not None
        rows = np.asarray(rows, dtype=np.int64)
        out[split] = {"keys": t.record_keys(rows), "y": t.labels[rows].astype(np.int8).tolist(),
                      "scores": np.asarray(p, dtype=np.float64).tolist()}
    return out


def _spec_override(cfg: DictConfig) -> PreprocessSpec | None:
    node = cfg.get("preprocess")
    return None if node is None else PreprocessSpec.from_dict(_container(node))


def _log_cell(cell: dict[str, Any]) -> None:
    """One console line per split of a cell: its macro AUROC with CI, and (at WARNING) what the number leaves out:
    classes without positives / negatives in the split or without a code on an external set, and a CI over
    fewer classes in most resamples (before 2026-12-07 only results.md said so, and not with ``report=never``)."""
    for split, m in cell["results"].items():
        a = m["macro_auroc"]
        ci = f"[95% CI {a['ci_low']:.3f}, {a['ci_high']:.3f}]" if np.isfinite(a["ci_low"]) and \
            np.isfinite(a["ci_high"]) else "(no CI: bootstrap.n=0 or too few records)"
        left, n_classes = classes_left_out(m)
        caveats = ([f"over {n_classes - len(left)} of {n_classes} classes (left out: {', '.join(map(str, left))})"]
                   if left else []) + \
            ([f"CI: {int(m['n_degenerate'])} of {m['n_boot']} resamples over fewer classes, not the interval of "
              f"the macro average over all classes"] if degenerate_ci(m) else [])
        log.log(logging.WARNING if caveats else logging.INFO,
                "%s | %s | %s | %s | fraction %g (%s training records) | seed %d | %s (n=%d): macro AUROC %.3f %s%s",
                cell["mode"], cell["task"], cell["dataset"], cell["method"], cell["fraction"],
                cell.get("n_train", "?"), cell["seed"], split, m["n"], a["value"], ci,
                "".join(f"; {c}" for c in caveats))


# ------------------------------------------------------------------------------------------------ fine-tune
def finetune_main(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tuning / supervised-from-scratch cells (``conf/finetune.yaml``); same cell layout as the probe."""
    from ecgfm.recipes import finetune_recipe, validate_finetune_config

    t0 = time.perf_counter()
    checked = validate_finetune_config(cfg)  # ConfigError naming the key (finetune.epochs=abc, +finetune.lrr=1)
    ctx = _context(cfg, "finetune")
    checkpoint = str(cfg.checkpoint)
    desc = resolve_checkpoint(checkpoint, 0, load_weights=False, preprocess=_spec_override(cfg))
    if desc.kind == HANDCRAFTED:
        raise EvaluationError(f"checkpoint {checkpoint!r}: the handcrafted-feature baseline has no network to "
                              f"fine-tune; run it with probe.py checkpoint={HANDCRAFTED}")
    recipe = dict(_container(cfg.finetune))  # as composed: the cell's identity and record
    if desc.kind == "supervised":
        recipe.update(_container(cfg.supervised) or {})
    typed_recipe = finetune_recipe(checked, supervised=desc.kind == "supervised")  # what run_finetune gets
    _identify(ctx, desc, recipe)
    task, ext = _prepare(ctx, desc)
    ctx.recipe["data"] = data_identity(task, ext)   # a changed label table or record set: the cells are stale
    leakage = leakage_check(desc, task, ext, bool(cfg.allow_leakage), _container(cfg.pretrain_caches) or [])
    todo = _todo(ctx, checkpoint, leakage)
    n_all = len(ctx.fractions) * len(ctx.seeds)
    if not todo:
        log.info("every cell of finetune / %s / %s exists: nothing to do", ctx.task_spec.name, checkpoint)
        return _finish(ctx, [], n_all, t0)
    fs = float(task.cache.fs)  # checked against the encoder's rate by _prepare
    window = _window(cfg, ctx.task_spec.crop_seconds, fs, desc.crop_samples)
    stride = int(round(float(cfg.stride_seconds) * fs)) if cfg.get("stride_seconds") is not None \
        else task.stride_samples
    from ecgfm.evaluate.finetune import run_finetune
    from ecgfm.evaluate.fractions import fraction_subsets

    written: list[str] = []
    for seed in sorted({s for _, s in todo}):
        fracs = [f for f, s in todo if s == seed]
        target = task.labels if task.multilabel else task.labels.argmax(axis=1)
        subsets = fraction_subsets(task.splits["train"], target, list(task.patient_ids), fracs, seed=seed)
        for frac in fracs:
            enc = resolve_checkpoint(checkpoint, window, int(cfg.init_seed) + int(seed),
                                     _container(cfg.get("backbone_args")) or {}, _spec_override(cfg))
            try:  # a ViT-1D pretrained on shorter crops is rebuilt (same weights) for longer windows, as the probes do
                backbone = fit_window(enc.backbone, window)
            except ValueError as exc:
                raise EvaluationError(f"checkpoint {checkpoint!r}: {exc}") from None
            common = _cell_common(ctx, enc, task, ext, window, stride, leakage)
            splits = {"train": subsets[frac], "val": task.splits["val"], "test": task.splits["test"]}
            external = None
            if ext is not None:
                external = {f"external:{ext.dataset}": (ext.cache_dir, ext.labels, ext.splits["test"])}
            log.info("fine-tuning %s on %s: fraction %g, seed %d", checkpoint, task.name, frac, seed)
            out = run_finetune(backbone, task.cache_dir, task.labels, splits, task.multilabel, window, stride,
                               typed_recipe, seed=seed, accelerator=str(cfg.accelerator), external=external,
                               feature_dir=str(checked.features.dir),
                               feature_batch_size=int(checked.features.batch_size), predict_val=task.multilabel,
                               lead_aware=bool(ctx.recipe["lead_aware"]))   # resolved by _identify
            results, thresholds = _score(task, out, cfg, ext)
            preds = {"test": out["test"], **out["external"]}
            cell = dict(common, fraction=float(frac), seed=int(seed), n_train=int(len(splits["train"])),
                        train_records=train_records_digest(task, splits["train"]),
                        hparam={k: recipe[k] for k in ("lr", "layer_decay", "warmup_epochs", "epochs")},
                        val_macro_auroc=float(out["best_val_macro_auroc"]), best_epoch=out["best_epoch"],
                        epochs_run=out["epochs_run"], results=results, seconds=out["seconds"], lp=out.get("lp"),
                        finetune=recipe, predictions=_predictions(preds, task, ext))
            p = _cell_target(ctx, task.name, checkpoint, frac, seed)
            cell["classifier"] = str(_save_cell_classifier(p, out["model"], task, enc, recipe, window, stride,
                                                           thresholds, cell, train_rows=splits["train"]))
            atomic_write_json(p, cell)
            written.append(str(p))
            _announce_classifier(cell["classifier"])
            _log_cell(cell)
    return _finish(ctx, written, n_all - len(todo), t0)


def _announce_classifier(folder: str | os.PathLike) -> None:
    """Print where a cell's classifier artifact is and how to explain / use it (fine-tunes, probes with
    ``save_classifier=true``)."""
    print(f"classifier artifact: {folder}\n  explain it:  python explain.py checkpoint={folder}\n"
          f"               (installed: ecgfm-explain checkpoint=...)\n"
          f"  use it:      ecgfm.Classifier.load('{folder}')"
          f".predict_proba(signal, fs=..., leads=[...])", flush=True)


def classifier_dir(cell_file: str | os.PathLike) -> Path:
    """The classifier artifact folder of a cell (``<cell>.classifier/`` beside ``<cell>.json``)."""
    p = Path(cell_file)
    return p.with_name(p.stem + ".classifier")


def probe_head(probe: Any, backbone: torch.nn.Module, task: TaskData, lead_aware: bool = True) -> Any:
    """A fitted linear probe as an ``nn.Linear`` head on the backbone's window embeddings (scaler folded in,
    :func:`ecgfm.evaluate.finetune.init_head_from_probe`), inside an object with ``backbone``, ``head`` and
    ``lead_aware`` (whether the probe's features were lead-aware, ``features.lead_aware``)."""
    from types import SimpleNamespace

    from ecgfm.evaluate.finetune import init_head_from_probe
    from ecgfm.evaluate.probe import LinearProbe

    if not isinstance(probe, LinearProbe):
        raise EvaluationError("save_classifier=true needs probe.mode=linear (an MLP probe is not saved as a classifier "
                         "artifact; fine-tune with finetune.head=mlp instead)")
    head = torch.nn.Linear(int(backbone.num_features), len(task.class_names))
    with torch.no_grad():
        init_head_from_probe(head, probe)
    return SimpleNamespace(backbone=backbone, head=head, kind="linear probe on frozen features",
                           lead_aware=bool(lead_aware))


def _handcrafted_missing(task: TaskData, ext: Any, feats: Any, efeats: Any) -> dict[str, Any]:
    """Per split of the task (and the external set's test records), the records whose handcrafted feature groups
    were filled for too few beats (:func:`ecgfm.evaluate.handcrafted.split_missing_counts`)."""
    from ecgfm.evaluate.handcrafted import split_missing_counts

    out: dict[str, Any] = split_missing_counts(feats, task.splits)
    if ext is not None:
        out[f"external:{ext.dataset}"] = split_missing_counts(efeats, {"test": ext.splits["test"]})["test"]
    return out


def _save_cell_classifier(cell_file: Path, model: Any, task: TaskData, enc: Encoder, recipe: dict[str, Any],
                          window: int, stride: int, thresholds: np.ndarray | None, cell: dict[str, Any],
                          window_aggregate: str | None = None, train_rows: Sequence[int] | None = None) -> Path:
    """Write a cell's classifier artifact (fine-tuned model, or a probe as :func:`probe_head`) and its test
    predictions (``predictions_test.csv``: record key, label columns, score columns) into
    :func:`classifier_dir`; returns the folder. ``train_rows``: the records it was trained on (the fraction's
    subset; default the whole train split), whose leads it names (``extra.trained_leads``). The artifact names the
    cell's checkpoint and recipe (``extra.checkpoint_id``, ``extra.cell_recipe_id``) so that a cell is reused only
    with its own artifact."""
    import pandas as pd

    from ecgfm.artifacts import save_classifier

    test = cell["results"]["test"]["macro_auroc"]
    how = getattr(model, "kind", "fine-tuned")
    # the leads present in any training record: the API refuses a record sharing none of them (a one-lead model
    # trained on lead I given lead II alone scored zeros in lead I's row without a word) and names leads never seen
    train_rows = np.asarray(task.splits.get("train", []) if train_rows is None else train_rows, dtype=np.int64)
    seen = task.cache.lead_masks[train_rows].any(axis=0) if len(train_rows) else np.ones(len(CANONICAL_LEADS), bool)
    out = save_classifier(
        classifier_dir(cell_file), model.backbone, model.head, task.cache.spec, task.class_names, task.multilabel,
        fs=float(task.cache.fs), window_samples=window, stride_samples=stride,
        window_aggregate=window_aggregate or str(recipe.get("window_aggregate", "prob")),
        thresholds=None if thresholds is None else [float(t) for t in thresholds],
        thresholds_not_chosen=[] if thresholds is None else [   # choose_thresholds' mark: no validation positive
            task.class_names[i] for i in np.flatnonzero(no_threshold_mask(thresholds, len(task.class_names)))],
        lead_aware=bool(getattr(model, "lead_aware", True)),   # as trained and validated (FinetuneModule / probe)
        provenance={"data": f"task {task.name} ({task.dataset}), train split fraction {cell['fraction']:g} "
                            f"({cell['n_train']} records), hyper-parameters chosen on val, cache {task.cache_dir}",
                    "method": f"{how} {enc.kind} encoder {enc.method} ({enc.checkpoint})",
                    "recipe": recipe, "seed": cell["seed"], "checkpoint": enc.checkpoint},
        evaluation={f"test macro AUROC (n={cell['results']['test']['n']})":
                    f"{test['value']:.3f} " + (f"[95% CI {test['ci_low']:.3f}, {test['ci_high']:.3f}]"
                                               if test.get("ci_low") is not None and test.get("ci_high") is not None
                                               and np.isfinite(test["ci_low"]) and np.isfinite(test["ci_high"])
                                               else "[no CI]"),
                    f"validation macro AUROC (n={(cell.get('splits') or {}).get('val', '?')}; the model-selection "
                    f"value: early stopping / C chosen on it, so optimistic; no CI)":
                    round(float(cell["val_macro_auroc"]), 4)},
        extra={"trained_leads": [lead for lead, m in zip(CANONICAL_LEADS, seen) if m],
               # records are given to it as this cell scored them (no leads derived from I and II), so that the
               # API reproduces predictions_test.csv (ecgfm.artifacts.derives_limb_leads)
               "derive_limb_leads": False,
               # the records it was trained / selected on ("source/record_id"), so that explain.py can say whether
               # a record it explains was among them (a training record's explanation is not a held-out one's)
               "training_records": _record_keys(task.cache, train_rows),
               "validation_records": _record_keys(task.cache, task.splits.get("val", [])),
               # ... of this corpus (record ids repeat across corpora: synthetic seeds, other roots)
               "training_sources": list(task.cache.manifest.get("sources") or []),
               "checkpoint_id": cell.get("checkpoint_id"),
               "cell_recipe_id": cell.get("recipe_id")})
    pred = cell["predictions"]["test"]
    scores = np.asarray(pred["scores"], dtype=np.float64)
    table = pd.DataFrame(scores, columns=[f"p_{c}" for c in task.class_names])
    table.insert(0, "record", pred["keys"])
    for j, c in enumerate(task.class_names):
        table.insert(1 + j, f"y_{c}", np.asarray(pred["y"])[:, j])
    from ecgfm.io import atomic_write_text

    atomic_write_text(out / "predictions_test.csv", table.to_csv(index=False, float_format="%.17g"))
    return out


def score_external(task: TaskData, ext: TaskData, rows: np.ndarray, p: np.ndarray,
                   thresholds: np.ndarray | None, n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics of a head's predictions on an external set. When its labels were translated from SNOMED CT codes,
    the task classes no code present in the set's records reaches (``label_report["not_evaluable_classes"]``, or
    ``classes_without_code`` in a report written before it: their label is unknown, not negative) are left out of
    every metric, Fmax and macro F1 included, and listed as ``not_evaluable_classes`` (a prediction of such a class
    would otherwise count as a false positive)."""
    y = ext.labels[rows] if task.multilabel else ext.labels[rows].argmax(axis=1)
    names = list(task.class_names)
    report = ext.label_report or {}
    gone = list(report.get("not_evaluable_classes", report.get("classes_without_code")) or []) \
        if task.multilabel else []
    keep = np.array([i for i, c in enumerate(names) if c not in gone], dtype=np.int64)
    if gone and len(keep):
        y, p = y[:, keep], np.asarray(p)[:, keep]
        # indexed as it is (not through np.asarray): choose_thresholds' mark of classes without a validation
        # positive (metrics.Thresholds) follows the kept classes
        thresholds = None if thresholds is None else (thresholds[keep] if isinstance(thresholds, np.ndarray)
                                                      else np.asarray(thresholds)[keep])
        names = [names[i] for i in keep]
    res = evaluate_scores(y, p, task.multilabel, names, thresholds, n_boot=n_boot, seed=seed)
    if gone:
        res["not_evaluable_classes"] = gone
    return res


def _score(task: TaskData, out: dict[str, Any], cfg: DictConfig, ext: TaskData | None
           ) -> tuple[dict[str, Any], np.ndarray | None]:
    """Metrics of fine-tuning predictions: thresholds on validation, bootstrap CIs on test / external.

    Returns:
        ``(results per split, thresholds (C,) chosen on validation or None for single-label tasks)``.
    """
    thresholds = None
    if task.multilabel:  # single-label predictions are the argmax: no threshold to choose
        val_rows, p_val = out["val"]
        thresholds = choose_thresholds(task.labels[val_rows], p_val)

    def score(labels: np.ndarray, rows: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        y = labels[rows] if task.multilabel else labels[rows].argmax(axis=1)
        return evaluate_scores(y, p, task.multilabel, task.class_names, thresholds, n_boot=int(cfg.bootstrap.n),
                               seed=int(cfg.bootstrap.seed))

    test_rows, p_test = out["test"]
    res = {"test": score(task.labels, test_rows, p_test)}
    for name, (rows, p) in out["external"].items():
        assert ext is not None
        res[name] = score_external(task, ext, rows, p, thresholds, int(cfg.bootstrap.n), int(cfg.bootstrap.seed))
    return res, thresholds
