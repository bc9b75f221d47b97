"""Typed configuration schemas and validation for the Hydra entry points.

Two layers catch configuration mistakes before anything is built, each with a message naming the key:

1. :class:`TrainConfig` (a dataclass schema) covers the fixed, top-level part of ``conf/train.yaml``: seed,
   paths, crop, preprocessing, checkpointing, resume. :func:`validate_train_config` merges the composed config
   into ``OmegaConf.structured(TrainConfig)``, so ``+foo=1`` or ``preprocess.fs=abc`` fail with
   ``ConfigError("preprocess.fs: ...")``.
2. The ``_target_`` nodes (``data``, ``backbone``, ``method``, ``trainer``, ``logger`` and anything nested in them)
   are checked against the *signature of the callable they name* (:func:`check_target_node`): an unknown key
   (``method.mask_ratoi``, ``trainer.max_step``), a missing required argument, or a value whose type does not
   match a simple annotation (``trainer.max_steps=abc``) is reported with the key, the target and the closest
   valid name. The constructor signatures are the single source of truth, so these checks cannot drift from the
   code the way a duplicated dataclass per method would. Backbones built through
   ``ecgfm.backbones.create_backbone`` are checked against the factory registered under ``name``.

Resolvers registered on import (so configs can use them once :mod:`ecgfm.config` is imported):
``${ecgfm.samples:seconds,fs}`` -> ``int(round(seconds * fs))``; ``${ecgfm.len:list}`` -> its length (None stays
None; used for ``method.probe_num_classes: ${ecgfm.len:${data.probe_labels}}``); ``${ecgfm.path:root,path}`` ->
``path`` when it is absolute, else ``root/path`` (``os.path.join``; None stays None; used for a task's
``labels_csv: ${ecgfm.path:${task.root},${task.params.labels_csv}}``).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.errors import ConfigError, bad_arguments  # noqa: F401 - defined there (every layer raises it)


def _seconds_to_samples(seconds: Any, fs: Any) -> int:
    return int(round(float(seconds) * float(fs)))


def _length(value: Any) -> int | None:
    return None if value is None else len(value)


def _path_under(root: Any, path: Any) -> str | None:
    """``path`` as given when absolute, else ``root/path`` (``os.path.join``); None when ``path`` is None."""
    return None if path is None else os.path.join(str(root), str(path))


OmegaConf.register_new_resolver("ecgfm.samples", _seconds_to_samples, replace=True)
OmegaConf.register_new_resolver("ecgfm.len", _length, replace=True)
OmegaConf.register_new_resolver("ecgfm.path", _path_under, replace=True)


# --------------------------------------------------------------------------------------------- dataclass schemas
@dataclass
class PreprocessConfig:
    """Mirror of :class:`ecgfm.data.preprocess.PreprocessSpec` (a test keeps the two identical)."""

    fs: Optional[float] = 100.0
    highpass: Optional[float] = 0.5
    lowpass: Optional[float] = None
    notch: Optional[float] = None
    filter_order: int = 3
    normalize: str = "zscore"
    flat_threshold: float = 1e-4
    clip: Optional[float] = 20.0
    resample_method: str = "polyphase"
    bandpass_mode: str = "bandpass"
    filter_design: str = "sos"
    notch_q: float = 30.0
    notch_first: bool = False
    median_baseline: Optional[float] = None
    normalize_scope: str = "lead"
    leads: Optional[list] = None
    notch_at_source: bool = False
    resample_padtype: str = "constant"


@dataclass
class PathsConfig:
    """Where things live. Relative paths are relative to the working directory (run from the project root).

    Attributes:
        cache_root: folder holding prepared corpus caches (one sub-folder per corpus + spec fingerprint).
        data_root: folder holding the original datasets (``ptbxl/``, ``cinc2017/``...).
        output_root: folder under which runs are written when ``hydra.run.dir`` is not given.
    """

    cache_root: str = "cache"
    data_root: str = "../shared/data"
    output_root: str = "outputs"


@dataclass
class CheckpointConfig:
    """Arguments of Lightning's ``ModelCheckpoint`` used by :func:`ecgfm.train.run.train`.

    Attributes:
        every_n_train_steps: save a periodic checkpoint every this many optimiser steps (and ``last.ckpt``).
        save_top_k: how many periodic checkpoints to keep: the ``k`` newest (-1 keeps all, 0 none).
        save_last: also keep ``checkpoints/last.ckpt`` (needed for auto-resume).
    """

    every_n_train_steps: int = 100
    save_top_k: int = 3
    save_last: bool = True


@dataclass
class TrainConfig:
    """Schema of ``conf/train.yaml`` after composition (the ``hydra`` node excluded).

    Attributes:
        seed: global seed (weights, sampler order, masks, augmentations).
        out_dir: run folder (checkpoints, logs, exported encoder, summary). Defaults to Hydra's run dir.
        resume: checkpoint to resume from; ``None`` auto-resumes from the newest checkpoint of ``<out_dir>`` that
            loads (``checkpoints/last.ckpt``, then the periodic ones), logging any it skips.
        overwrite: allow a fresh start (step 0) in a folder that already holds a trained run (``encoder/`` or
            ``summary.json``) and no checkpoint to resume from; the earlier run's files are removed.
        crop_seconds: length of the training crops in seconds (converted with the sampling rate of the cache
            actually used, read from its manifest).
        crop_samples: the same in samples. The config's value (``crop_seconds`` x ``preprocess.fs``) is provisional:
            the run replaces it with ``crop_seconds`` x the cache's rate; a literal value must agree with it.
        nonfinite: what a batch with non-finite values (NaN/Inf, a damaged cache) does: ``"error"`` stops the run
            naming the shard and records; ``"skip"`` leaves those records out, counted in ``summary.json``.
        compile: wrap the backbone's ``forward_features`` with ``torch.compile``.
        cpu_linear: how float32 linear layers run when training on CPU: ``"auto"`` (oneDNN where it is present and
            the CPU is not an Intel one, whose MKL path is the tuned one), ``"onednn"`` or ``"aten"`` (PyTorch's
            MKL ``sgemm``); same mathematics, see :mod:`ecgfm.accel`.
        torch_threads: ``torch.set_num_threads`` for CPU ops (None: torch's default). On a shared machine with
            few cores, 1 thread avoids OpenMP oversubscription (measured 4-5x faster for the small CPU demos).
        deterministic_steps: reseed torch/numpy/random from ``(seed, rank, global_step)`` before every step so
            a resumed run draws the same masks/augmentations as an uninterrupted one; false: every rank but 0 is
            reseeded once from ``(seed, rank)`` (``RankSeedCallback``), so DDP ranks still draw different ones.
        progress_refresh: TQDM progress bar refresh rate in steps.
        export: export the encoder to ``<out_dir>/encoder`` at the end.
        data, backbone, method, trainer, logger: ``_target_`` nodes, checked by :func:`check_target_node`.
    """

    seed: int = 0
    out_dir: str = "outputs/train"
    resume: Optional[str] = None
    overwrite: bool = False
    crop_seconds: float = 2.5
    crop_samples: int = 250
    nonfinite: str = "error"
    compile: bool = False
    cpu_linear: str = "auto"
    torch_threads: Optional[int] = None
    deterministic_steps: bool = True
    progress_refresh: int = 10
    export: bool = True
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: Any = None
    backbone: Any = None
    method: Any = None
    trainer: Any = None
    logger: Any = None


#: values of ``TrainConfig.nonfinite`` (used by :class:`ecgfm.train.safety.NonFiniteGuard`)
NONFINITE_MODES = ("error", "skip")


def literal_differs(node: DictConfig, key: str, expected: Any, follows: str | None = None,
                    same: Callable[[Any, Any], bool] | None = None) -> bool:
    """Whether ``node.<key>`` was given a value other than ``expected`` (the value the run actually uses), as
    opposed to following it by interpolation: the shared test of the checks that refuse an override the run would
    silently replace or not record (:func:`crop_samples_for`, :func:`check_data_mirrors`,
    ``ecgfm.train.build.method_fs``).

    An interpolation is accepted unresolved when ``follows`` is None, or when its text is ``follows`` exactly (e.g.
    ``"${seed}"``); any other value (a literal, or an interpolation other than ``follows``) is resolved and
    compared with ``same(value, expected)`` (default ``==``).

    Returns:
        True when the value differs (the caller raises its own :class:`ConfigError`).
    """
    if OmegaConf.is_interpolation(node, key) and (
            follows is None or str(node._get_node(key)._value()).strip() == follows):
        return False
    value = node[key]
    return not (same(value, expected) if same is not None else value == expected)


def crop_samples_for(cfg: DictConfig, fs: float) -> int:
    """Training crop in samples: ``crop_seconds`` converted with ``fs``, the rate of the cache actually used.

    The composed ``crop_samples`` (``${ecgfm.samples:${crop_seconds},${preprocess.fs}}``) only stands in until the
    cache is known; a literal ``crop_samples`` given by the user must agree with ``crop_seconds`` at ``fs``.

    Args:
        cfg: a validated training config (:func:`validate_train_config`).
        fs: sampling rate of the training cache(s) in Hz.

    Returns:
        ``round(crop_seconds * fs)``.

    Raises:
        ConfigError: a literal ``crop_samples`` that disagrees, or a crop shorter than one sample.
    """
    seconds = float(cfg.crop_seconds)
    samples = _seconds_to_samples(seconds, fs)
    if samples < 1:
        raise ConfigError("crop_seconds", f"{seconds:g} s at the cache's {fs:g} Hz is less than one sample")
    if literal_differs(cfg, "crop_samples", samples, same=lambda value, want: int(value) == want):
        raise ConfigError("crop_samples", f"is {cfg.crop_samples}, but crop_seconds={seconds:g} at the cache's "
                                          f"{fs:g} Hz is {samples} samples: crops are set in seconds, so give "
                                          f"crop_seconds={int(cfg.crop_samples) / fs:g} instead of crop_samples")
    return samples


#: data-node keys that mirror a top-level key (``data.crop_samples: ${crop_samples}``): the run records the
#: top-level value (config.yaml, summary.json, the exported encoder's ``extra``) while the data module uses its own
DATA_MIRRORS = ("crop_samples", "seed", "nonfinite")


def check_data_mirrors(cfg: DictConfig, fs: float | None = None) -> None:
    """Refuse a ``data.crop_samples`` / ``data.seed`` / ``data.nonfinite`` that differs from its top-level key.

    The shipped data nodes interpolate them (``seed: ${seed}``). A literal ``data.crop_samples=500`` trained
    500-sample crops while ``config.yaml``, ``summary.json`` and the exported encoder's ``extra.crop_samples``
    said the top-level ``crop_samples`` (250): the record of the run was not what ran. A value equal to the
    top-level one (an interpolation, or the same literal) is accepted. Called by :func:`validate_train_config`
    and again by the training pipeline once ``crop_samples`` is converted at the cache's rate.

    Args:
        cfg: a validated training config.
        fs: the training caches' sampling rate, when known (names the ``crop_seconds`` to give instead).

    Raises:
        ConfigError: naming ``data.<key>`` and the top-level key to set instead.
    """
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    for key in DATA_MIRRORS:
        if key not in data or key not in cfg:
            continue
        if not literal_differs(data, key, cfg[key], follows=f"${{{key}}}"):
            continue
        mine, top = data[key], cfg[key]
        if key == "crop_samples":
            rate = float(fs) if fs else float(cfg.preprocess.fs or 0) or None
            how = (f"crops are set in seconds: give crop_seconds={float(mine) / rate:g} (at {rate:g} Hz) and leave "
                   f"data.crop_samples=${{crop_samples}}" if rate and isinstance(mine, (int, float))
                   else "crops are set in seconds: give crop_seconds and leave data.crop_samples=${crop_samples}")
        else:
            how = f"set {key}={mine} instead and leave data.{key}=${{{key}}}"
        raise ConfigError(f"data.{key}", f"is {mine!r}, but the run records the top-level {key}={top!r} (config.yaml, "
                                         f"summary.json, the exported encoder) while the data module would use "
                                         f"{mine!r}: {how}")


def check_views(cfg: DictConfig) -> None:
    """Refuse ``data.views`` that give a second view (``adjacent`` / ``segments``: ``batch["x2"]``) to a method
    that reads one.

    MAE and CREMA (a subclass of MAE: its two masked views are of ``x``) never read ``x2``, nor does CLOCS in
    ``mode=cmlc`` (its views are the leads of ``x``), so the second crop was cut and loaded for nothing, and
    ``adjacent`` also moved ``x`` (a record must hold two crops after its start), changing which crops the method
    saw while ``config.yaml`` said ``views=adjacent`` as if it were used. A method says so itself
    (``PretrainModule.one_view_reason``, read from the ``_target_`` class without building it). SimCLR takes either
    (one crop augmented twice, or ``x`` and ``x2``). A method that needs one kind of second view says so
    (``PretrainModule.views_needed``): CLOCS cmsc / cmsmlc contrast *temporally adjacent* segments, so they need
    ``adjacent``; ``segments`` places the second crop independently, so it overlaps the first in most draws and is
    the same crop in validation (centred crops) and on records no longer than a crop: positives that match
    trivially (``val/pos_sim`` 1.0), which nothing reported before 2026-12-07. ``single`` gave them no ``x2`` at all
    (refused at the first batch).

    Raises:
        ConfigError: naming ``data.views``.
    """
    data, method = cfg.get("data"), cfg.get("method")
    if not isinstance(data, DictConfig) or not isinstance(method, DictConfig) or "views" not in data:
        return
    views = data.get("views")
    if "_target_" not in method:
        return
    from hydra.utils import get_object

    try:
        cls = get_object(str(method._target_))
    except Exception:  # noqa: BLE001 - an unimportable target is reported by check_target_node
        return
    needed = getattr(cls, "views_needed", None)
    need = needed(method) if inspect.isclass(cls) and callable(needed) else None
    if need is not None and views != need[0]:
        raise ConfigError("data.views", f"is {views!r}, but {need[1]}: use data.views={need[0]}")
    if views in (None, "single"):
        return
    reason = getattr(cls, "one_view_reason", None)
    one_view = reason(method) if inspect.isclass(cls) and callable(reason) else None
    if one_view:
        moved = " (and 'adjacent' also moves x: a record must hold two crops after its start)" \
            if views == "adjacent" else ""
        raise ConfigError("data.views", f"is {views!r}, which loads a second crop (x2) per record, but {one_view} "
                                        f"and never reads it{moved}: use data.views=single")


# ----------------------------------------------------------------------------------------- target-node checking
def _close(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _resolve_target(target: str, key: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as err:  # ImportError, AttributeError, ValueError depending on what is missing
        raise ConfigError(f"{key}._target_" if key else "_target_",
                          f"cannot import {target!r}: {err}") from None


def _backbone_factory(node: DictConfig, key: str) -> Any | None:
    """The registered factory behind ``create_backbone(name=...)`` (so its arguments can be checked)."""
    from ecgfm.backbones import registry

    name = node.get("name")
    names = registry.list_backbones()
    if name not in names:
        raise ConfigError(f"{key}.name", f"unknown backbone {name!r}{_close(str(name), names)} "
                                         f"(registered: {', '.join(names)})")
    factory = registry._REGISTRY[name]
    # Registry factories are often ``f(**kwargs) -> ViT1D``: check the keys against the class they build.
    try:
        built = typing.get_type_hints(factory).get("return")
    except Exception:
        built = None
    return built if inspect.isclass(built) else factory


def _parameters(obj: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Named parameters, type hints and whether arbitrary keywords are accepted, following ``**kwargs`` up the MRO.

    A class whose ``__init__`` forwards ``**kwargs`` to its base accepts the base's parameters too; we collect
    them so that a typo is still caught.
    """
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    funcs = [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    open_kwargs = False
    for depth, func in enumerate(funcs):
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return params, hints, True
        try:
            func_hints = typing.get_type_hints(func)
        except Exception:  # unresolvable forward references: skip type checks, keep key checks
            func_hints = {}
        var_kw = False
        for p in sig.parameters.values():
            if p.name == "self" or p.kind == p.VAR_POSITIONAL:
                continue
            if p.kind == p.VAR_KEYWORD:
                var_kw = True
                continue
            if depth > 0 and p.default is inspect.Parameter.empty:
                # reached through **kwargs: the subclass may supply it, so it is not required from the config
                p = p.replace(default=None)
            params.setdefault(p.name, p)
            if p.name in func_hints:
                hints.setdefault(p.name, func_hints[p.name])
        if not var_kw:
            return params, hints, False
        open_kwargs = True
        if not inspect.isclass(obj):
            break
    return params, hints, open_kwargs


def _type_ok(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits a simple annotation; ``None`` when the annotation is too complex to judge."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_type_ok(value, h) for h in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if origin is dict or hint is dict:
        return isinstance(value, (dict, DictConfig))
    return None


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_target_node(node: Any, key: str, provided: tuple[str, ...] = ()) -> None:
    """Check a ``_target_`` node (and every ``_target_`` node inside it) against the named callable.

    Args:
        node: a DictConfig with ``_target_`` (or a container holding such nodes).
        key: dotted path of ``node`` in the full config, used in error messages.
        provided: argument names that the caller passes at instantiation time (``backbone`` for a method), so
            they are not reported as missing.

    Raises:
        ConfigError: unknown key, missing required argument, wrong simple type, or an unimportable target.
    """
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_target_node(item, f"{key}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" not in node:
        for k in node:
            check_target_node(node._get_node(k), f"{key}.{k}" if key else str(k))
        return
    target = node["_target_"]
    obj = _resolve_target(target, key)
    if target in ("ecgfm.backbones.create_backbone", "ecgfm.backbones.registry.create_backbone"):
        factory = _backbone_factory(node, key)
        params, hints, open_kwargs = _parameters(factory)
        params = {"name": inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY), **params}
        hints = {"name": str, **hints}
    else:
        params, hints, open_kwargs = _parameters(obj)
    partial = bool(node.get("_partial_", False))
    for k in node:
        if str(k).startswith("_"):
            continue
        sub = f"{key}.{k}" if key else str(k)
        if k not in params and not open_kwargs:
            raise ConfigError(sub, f"unknown key for {target}{_close(str(k), list(params))} "
                                   f"(accepted: {', '.join(sorted(params))})")
        child = node._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)):
            check_target_node(child, sub)
        if k in hints and not OmegaConf.is_missing(node, k):
            try:
                value = node[k]
            except OmegaConfBaseException as err:
                raise ConfigError(sub, f"cannot resolve value: {err}") from None
            if isinstance(value, DictConfig) and "_target_" in value:
                continue
            if _type_ok(value, hints[k]) is False:
                origin = f" (from {child._value()})" if OmegaConf.is_interpolation(node, k) else ""
                raise ConfigError(sub, f"expected {_describe(hints[k])} for {target}, got {value!r} "
                                       f"({type(value).__name__}){origin}")
    if not partial:
        missing = [n for n, p in params.items()
                   if p.default is inspect.Parameter.empty and n not in node and n not in provided]
        if missing:
            raise ConfigError(f"{key}.{missing[0]}" if key else missing[0],
                              f"required argument of {target} is not set")
    for k in node:
        if not str(k).startswith("_") and OmegaConf.is_missing(node, k):
            raise ConfigError(f"{key}.{k}" if key else str(k), "mandatory value '???' is not set")


def strip_params(node: DictConfig) -> DictConfig:
    """A resolved copy of a ``_target_`` node without its ``params`` sub-node.

    ``params`` holds user-facing knobs of a config option (``data.params.root``, ``data.params.n_records``) that
    the node's own arguments refer to by interpolation; it is not an argument of the target.
    """
    if "params" not in node:
        return node
    plain = OmegaConf.to_container(node, resolve=True)
    plain.pop("params")
    return OmegaConf.create(plain)


#: ``params`` keys that code reads itself instead of through an interpolation (``ecgfm.evaluate.tasks``: external
#: sets' label vocabulary and exclusions)
CODE_READ_PARAMS = frozenset({"label_map", "cpsc2018_reference", "label_root", "exclude_task_corpus"})
_PARAMS_REF = re.compile(r"(?:(\w+)\.)?params\.(\w+)")


def check_params_used(cfg: Any, groups: tuple[str, ...] = ("data", "task", "eval_data")) -> None:
    """Refuse a key under ``<group>.params`` that no setting reads.

    ``params`` knobs reach their readers through interpolations (``n_records: ${task.params.n_records}``), so a
    misspelt knob (``+task.params.n_record=100``, or a typo in one's own ``conf/task/*.yaml``) would otherwise be
    accepted and silently do nothing: the run would use the default it meant to change.

    Args:
        cfg: the composed config (interpolations unresolved).
        groups: the top-level nodes whose ``params`` are checked.

    Raises:
        ConfigError: naming ``<group>.params.<key>``, with the closest key that is read.
    """
    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    plain.pop("hydra", None)
    refs: set[tuple[str | None, str]] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "${" in value:
            refs.update((m.group(1), m.group(2)) for m in _PARAMS_REF.finditer(value))

    walk(plain)
    for group in groups:
        node = plain.get(group)
        params = node.get("params") if isinstance(node, dict) else None
        if not isinstance(params, dict):
            continue
        read = {k for g, k in refs if g in (None, group)} | CODE_READ_PARAMS
        for key in params:
            if key not in read:
                known = sorted(k for k in read if k in params or k not in CODE_READ_PARAMS)
                raise ConfigError(f"{group}.params.{key}",
                                  f"no setting of this {group} config reads it (nothing refers to "
                                  f"${{{group}.params.{key}}}), so it would silently do nothing"
                                  f"{_close(str(key), known)}")


# --------------------------------------------------------------------------------------------------- entry point
def _reformat(err: OmegaConfBaseException, schema_cls: type) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).split("\n")[0]
    if "not in" in msg and key:
        parent_names: list[str] = []
        node_cls: Any = schema_cls
        for part in key.split(".")[:-1]:
            sub = {f.name: f for f in fields(node_cls)}.get(part) if hasattr(node_cls, "__dataclass_fields__") \
                else None
            node_cls = sub.default_factory if sub is not None and callable(sub.default_factory) else None
        if node_cls is not None and hasattr(node_cls, "__dataclass_fields__"):
            parent_names = [f.name for f in fields(node_cls)]
        return ConfigError(key, f"unknown key{_close(key.split('.')[-1], parent_names)}"
                                + (f" (accepted: {', '.join(parent_names)})" if parent_names else ""))
    return ConfigError(key, msg)


def _missing_keys(node: Any, key: str = "") -> list[str]:
    """Keys whose literal value is ``???`` (not following interpolations, unlike ``OmegaConf.missing_keys``)."""
    out: list[str] = []
    if isinstance(node, DictConfig):
        items = [(str(k), node._get_node(k)) for k in node]
        sep = "."
    elif isinstance(node, ListConfig):
        items = [(f"[{i}]", node._get_node(i)) for i in range(len(node))]
        sep = ""
    else:
        return out
    for name, child in items:
        sub = f"{key}{sep}{name}" if key else name
        if isinstance(child, (DictConfig, ListConfig)):
            out += _missing_keys(child, sub)
        elif child is not None and not child._is_interpolation() and child._is_missing():
            out.append(sub)
    return out


#: Lightning loggers whose package is an optional extra of ecgfm: class name -> (modules any of which serves, extra)
OPTIONAL_LOGGERS = {"WandbLogger": (("wandb",), "wandb"),
                    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard")}


def check_logger_installed(node: Any) -> None:
    """Refuse a logger whose optional package is not installed, before any data is prepared (Lightning failed only
    when the logger was built, after the cache was prepared, as a raw instantiation error)."""
    import importlib.util

    target = str(node.get("_target_", "")) if isinstance(node, (DictConfig, dict)) else ""
    need = OPTIONAL_LOGGERS.get(target.rsplit(".", 1)[-1])
    if need and not any(importlib.util.find_spec(m) is not None for m in need[0]):
        raise ConfigError("logger", f"{target} needs the {' or '.join(need[0])} package, which is not installed: "
                                    f"pip install 'ecgfm[{need[1]}]' (in a checkout: pip install -e '.[{need[1]}]'), "
                                    f"or choose logger=csv")


def validate_train_config(cfg: DictConfig, provided: dict[str, tuple[str, ...]] | None = None) -> DictConfig:
    """Validate a composed training config and return it merged into the :class:`TrainConfig` schema.

    Args:
        cfg: the composed config (``hydra`` node absent or ignored).
        provided: per top-level node, argument names supplied at instantiation time
            (default: ``{"method": ("backbone",)}``).

    Returns:
        A new DictConfig typed by :class:`TrainConfig` (interpolations kept; everything resolvable).

    Raises:
        ConfigError: naming the first wrong key.
    """
    provided = {"method": ("backbone",), "trainer": (), "logger": (), "data": ()} if provided is None else provided
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if "hydra" in plain:
        del plain["hydra"]
    missing = _missing_keys(plain)
    if missing:
        raise ConfigError(missing[0], "mandatory value '???' is not set (give it on the command line)")
    check_params_used(plain)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
        OmegaConf.to_container(merged, resolve=True)  # every interpolation resolves, every value converts
    except OmegaConfBaseException as err:
        raise _reformat(err, TrainConfig) from None
    # trainer/logger first: method and data refer to them by interpolation (max_steps: ${trainer.max_steps}), and a
    # wrong value should be reported where the user wrote it.
    for name in ("trainer", "logger", "backbone", "method", "data"):
        node = merged._get_node(name)
        if name in ("data", "backbone", "method", "trainer") and (node is None or node._is_none()):
            raise ConfigError(name, "is not set (choose one of the conf/" + name + "/ options)")
        if isinstance(node, DictConfig):
            check_target_node(strip_params(node), name, provided.get(name, ()))
    check_logger_installed(merged.get("logger"))
    trainer_node = merged._get_node("trainer")
    for key, how in (("logger", "choose it with the logger group (logger=csv, logger=wandb, ...) or ~logger"),
                     ("default_root_dir", "the run folder is hydra.run.dir (out_dir)")):
        if isinstance(trainer_node, DictConfig) and trainer_node.get(key) is not None:
            raise ConfigError(f"trainer.{key}", f"is set by the training pipeline, which would replace this value "
                                                f"silently: {how}")
    try:
        spec = PreprocessSpec.from_dict(OmegaConf.to_container(merged.preprocess, resolve=True))  # value checks
    except ValueError as err:
        raise ConfigError("preprocess", str(err)) from None
    if spec.notch_problem():
        raise ConfigError("preprocess.notch", spec.notch_problem())
    if not merged.crop_seconds > 0:
        raise ConfigError("crop_seconds", f"must be positive, got {merged.crop_seconds}")
    if merged.crop_samples <= 0:
        raise ConfigError("crop_samples", f"must be positive, got {merged.crop_samples}")
    if merged.nonfinite not in NONFINITE_MODES:
        raise ConfigError("nonfinite", f"must be one of {', '.join(NONFINITE_MODES)}, got {merged.nonfinite!r}"
                                       f"{_close(str(merged.nonfinite), list(NONFINITE_MODES))}")
    check_data_mirrors(merged)
    check_views(merged)
    from ecgfm.accel import CPU_LINEAR_MODES  # torch import: deferred, like the target checks

    if merged.cpu_linear not in CPU_LINEAR_MODES:
        raise ConfigError("cpu_linear", f"must be one of {', '.join(CPU_LINEAR_MODES)}, got {merged.cpu_linear!r}"
                                        f"{_close(str(merged.cpu_linear), list(CPU_LINEAR_MODES))}")
    return merged


# ------------------------------------------------------------------------------------------------- prepare.yaml
@dataclass
class PrepareConfig:
    """Schema of the settings of ``conf/prepare.yaml`` (``ecgfm-prepare``); every other top-level key is a source
    preset (a mapping of reader keyword arguments, see :func:`ecgfm.data.cache.prepare_from_config`).

    Attributes:
        sources: preset names to convert (a list, or one name).
        out: cache folder to write.
        spec: the preprocessing (:class:`ecgfm.data.preprocess.PreprocessSpec` fields).
        shard_records: records per shard; ``None`` or ``"auto"``: automatic.
        workers: conversion processes (0: in this process).
        progress: show a progress bar.
        allow_duplicate_ids: keep records whose ids repeat (else an error).
        verify: hash every file of an existing cache and convert damaged shards again.
    """

    sources: Any = field(default_factory=lambda: ["ptbxl"])
    out: str = MISSING
    spec: PreprocessConfig = field(default_factory=PreprocessConfig)
    shard_records: Any = None
    workers: int = 2
    progress: bool = True
    allow_duplicate_ids: bool = False
    verify: bool = False


def validate_prepare_config(cfg: Any) -> dict[str, Any]:
    """Validate a composed ``prepare.yaml`` and return it as a plain, resolved dict.

    Args:
        cfg: the composed config (DictConfig or dict; a ``hydra`` node is ignored).

    Returns:
        Settings (typed by :class:`PrepareConfig`) and the source presets, for
        :func:`ecgfm.data.cache.prepare_from_config`.

    Raises:
        ConfigError: naming the first wrong key (``spec.fs=abc``, ``+worker=3``, an unknown source name, a
            missing ``out`` or a missing argument of a selected preset).
    """
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig))
                             else dict(cfg))
    if "hydra" in plain:
        del plain["hydra"]
    names = [f.name for f in fields(PrepareConfig)]
    settings = OmegaConf.create({k: plain._get_node(k) for k in plain if k in names})
    presets = [str(k) for k in plain if k not in names]
    for k in presets:
        node = plain._get_node(k)
        if not isinstance(node, DictConfig) and not node._is_none():
            raise ConfigError(k, f"unknown setting{_close(k, names)} (settings: {', '.join(names)}; any other key "
                                 "must be a source preset: a mapping of reader arguments)")
    missing = _missing_keys(settings)
    if missing:
        raise ConfigError(missing[0], "mandatory value '???' is not set (give it on the command line)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), settings)
        out = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise _reformat(err, PrepareConfig) from None
    sources = [out["sources"]] if isinstance(out["sources"], str) else out["sources"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise ConfigError("sources", f"must be a non-empty list of preset names, got {out['sources']!r}")
    for name in sources:
        if name not in presets:
            raise ConfigError("sources", f"unknown source {name!r}{_close(name, presets)} (presets: "
                                         f"{', '.join(presets)})")
        miss = _missing_keys(plain._get_node(name), name)
        if miss:
            raise ConfigError(miss[0], f"mandatory value '???' is not set for source {name!r} (give it on the "
                                       "command line)")
    shard = out["shard_records"]
    if not (shard is None or str(shard).lower() == "auto" or (isinstance(shard, int) and not isinstance(shard, bool)
                                                              and shard >= 1)):
        raise ConfigError("shard_records", f"must be a positive integer, null or 'auto', got {shard!r}")
    if out["workers"] < 0:
        raise ConfigError("workers", f"must be >= 0, got {out['workers']}")
    try:
        spec = PreprocessSpec.from_dict(out["spec"])
    except ValueError as err:
        raise ConfigError("spec", str(err)) from None
    if spec.notch_problem():
        raise ConfigError("spec.notch", spec.notch_problem())
    try:
        presets_plain = {k: OmegaConf.to_container(plain._get_node(k), resolve=True)
                         if isinstance(plain._get_node(k), DictConfig) else None for k in presets}
    except OmegaConfBaseException as err:
        raise ConfigError(getattr(err, "full_key", "") or "", str(err).split("\n")[0]) from None
    return {**presets_plain, **out}
