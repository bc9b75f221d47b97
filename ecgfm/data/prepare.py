"""Corpus caches named by their configuration: the one preparation path of training, evaluation and scripts.

:func:`prepare_cache` is what the Hydra data configs (``_target_: ecgfm.data.prepare.prepare_cache``), the
evaluation tasks and ``scripts/benchmark_real.py`` call: it keys a cache folder by the source configs and the
preprocessing fingerprint, checks the inputs of an existing one (:func:`ecgfm.data.cache.input_changes`: stat
only, no source is built when nothing changed) and otherwise prepares / updates it with
:func:`ecgfm.data.cache.prepare_corpus`'s machinery.

One rule for relative paths: relative to the current working directory (:func:`ecgfm.data.cache.project_root`),
for ``cache_root`` as for the data paths checked by :func:`check_data_paths` and the readers' ``root``.
One lock: :func:`ecgfm.io.file_lock` on ``<cache>/.lock``. :func:`prepare_cache` waits for it (DDP ranks and
sweep jobs preparing one cache: one prepares, the others wait and reuse); a direct ``prepare_corpus`` /
``ecgfm-prepare`` refuses at once with ``another preparation is writing this cache``.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ecgfm.data.cache import (LOCK_FILE, _check_prepare_args, _manifest_mismatch, _prepare_locked, _read_manifest,
                              _read_plan, describe_source, input_changes, project_root, stat_changes)
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.readers._scan import absolute_path
from ecgfm.data.record import ECGDataError
from ecgfm.data.synthetic import GENERATOR_VERSION
from ecgfm.io import atomic_write_json, file_lock, jsonable, to_container

log = logging.getLogger(__name__)

__all__ = ["PREPARED_MARKER", "build_cache_dirs", "cache_key", "check_data_paths", "prepare_cache",
           "source_description"]

PREPARED_MARKER = ".ecgfm_prepared.json"
# Source-constructor arguments that name files or folders: checked before anything is built.
_PATH_KEYS = ("root", "path", "labels_csv", "cache_dir", "ptbxl_root", "checkpoint")   # made absolute in keys


def _resolve(path: str | os.PathLike) -> Path:
    """The one relative-path rule: relative to the current working directory."""
    p = Path(str(path))
    return p if p.is_absolute() else project_root() / p


def check_data_paths(node: Any, key: str = "data") -> None:
    """Raise :class:`ECGDataError` for a path argument (``root``, ``labels_csv``...) that does not exist.

    Walks nested ``_target_`` nodes so a wrong ``data.root`` is reported with the path and the key to change,
    before any reader or cache is built. Relative paths are relative to the current working directory.
    """
    if isinstance(node, dict):
        node = OmegaConf.create(node)
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
            path = _resolve(value)
            if k == "labels_csv" and not Path(str(value)).is_absolute() and node.get("root") is not None and \
                    (_resolve(node["root"]) / str(value)).exists():   # readers accept a CSV path relative to root
                continue
            if not path.exists():
                # the key a user sets: the one this value interpolates (data.params.root, eval_data.root...), not
                # the reader argument inside the group's source list
                raw = child._value()
                m = re.fullmatch(r"\$\{([\w.]+)\}", raw.strip()) if isinstance(raw, str) else None
                hint = (f"set {m.group(1)}=/path" if m else
                        "e.g. paths.data_root=/folder/holding/datasets for the shipped corpora")
                raise ECGDataError(path.resolve(), f"data path does not exist (config key "
                                   f"'{m.group(1) if m else sub}'; point it to the data: {hint}; relative paths "
                                   f"are relative to the working directory {project_root()})")


def _absolute_paths(node: Any) -> Any:
    """A source config (``_target_`` + arguments, nested ones too) as plain data with its relative path arguments
    made absolute by the one rule (:func:`_resolve`: against the working directory; a ``labels_csv`` that exists
    relative to its ``root`` against that, as the readers accept it)."""
    node = to_container(node)
    if isinstance(node, list):
        return [_absolute_paths(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _absolute_paths(v) for k, v in node.items()}
    if "_target_" in out:
        for k in _PATH_KEYS:
            value = os.fspath(out[k]) if isinstance(out.get(k), os.PathLike) else out.get(k)
            if not isinstance(value, str) or not value or Path(value).is_absolute():
                continue
            if k == "labels_csv" and out.get("root") and (_resolve(str(out["root"])) / value).exists():
                out[k] = str((_resolve(str(out["root"])) / value).resolve())
            else:
                out[k] = str(_resolve(value).resolve())
    return out


def source_description(source: Any) -> dict[str, Any]:
    """What keys the cache of an already-built source: its ``repr`` (a pool names its excluded set there) and every
    public setting (:func:`~ecgfm.data.cache.describe_source`: a repr may name only a few, e.g. FolderSource's).

    Paths are absolute in it, as in a config source's key (:func:`_absolute_paths`): the readers keep their
    ``root`` / ``labels_csv`` / ``ptbxl_root`` absolute (:func:`~ecgfm.data.readers._scan.absolute_path`, so their
    repr shows them so), and a relative :data:`_PATH_KEYS` setting of another source (of a wrapped one too) is made
    absolute here against the working directory. Otherwise ``root="data"`` run from two folders (two corpora) would
    share one key, the second served the first one's records, and one corpus named relatively and absolutely would
    be prepared twice. Absolute paths are kept as given (existing keys unchanged).
    """
    return {"repr": repr(source), **_absolute_settings(describe_source(source))}


def _absolute_settings(desc: Any) -> Any:
    """A :func:`~ecgfm.data.cache.describe_source` description with its relative :data:`_PATH_KEYS` settings made
    absolute (:func:`~ecgfm.data.readers._scan.absolute_path`), wrapped sources' descriptions included."""
    if isinstance(desc, list):
        return [_absolute_settings(v) for v in desc]
    if not isinstance(desc, dict):
        return desc
    out = {k: _absolute_settings(v) for k, v in desc.items()}
    if isinstance(out.get("type"), str) and "name" in out:   # a described source (else e.g. a set's digest)
        for k in _PATH_KEYS:
            value = out.get(k)
            if isinstance(value, str) and value and not os.path.isabs(value):
                out[k] = str(absolute_path(value))
    return out


#: Readers whose records gained content that their caches written before lack (2 and 3: FolderSource's
#: ``meta["labels_known"]``, 2026-12-06, without which a task drops the negatives of 0/1 flag columns; 4: its
#: ``meta["sex"]`` as "M" / "F" / None, 2026-12-07, was the CSV's raw value; 5: ``labels_known`` also for a row of
#: flags beside a column of class names, and patient columns named ``PatientID`` / ``Patient ID`` / ``subjectID``
#: read as such, whose caches held no patients and left those negatives out) or whose records changed
#: (SyntheticSource 2: :data:`ecgfm.data.synthetic.GENERATOR_VERSION`, the muscle-noise bank no longer shares record
#: 3's random stream, 2026-12-07). The version is part of their caches' key, so such a cache is prepared again
#: instead of reused; the keys (and caches) of readers not listed are unchanged.
SOURCE_VERSIONS: dict[str, int] = {"FolderSource": 5, "SyntheticSource": GENERATOR_VERSION}


def _source_versions(sources: Any) -> dict[str, int]:
    """``{reader class name: version}`` of the :data:`SOURCE_VERSIONS` readers among ``sources`` (configs with a
    ``_target_``, or built sources described by :func:`source_description`)."""
    out: dict[str, int] = {}
    for s in to_container(sources) or []:
        if not isinstance(s, dict):
            continue
        target = s.get("_target_")
        name = (target.rsplit(".", 1)[-1] if isinstance(target, str)
                else str(s.get("repr", "")).split("(", 1)[0].strip())
        if name in SOURCE_VERSIONS:
            out[name] = SOURCE_VERSIONS[name]
    return out


def cache_key(sources: Any, spec: PreprocessSpec) -> str:
    """Stable 12-hex-digit key of a list of source configs (``_target_`` + arguments) and a preprocessing spec
    (and the :data:`SOURCE_VERSIONS` of the readers among them that have one)."""
    doc: dict[str, Any] = {"sources": to_container(sources), "spec": spec.fingerprint()}
    versions = _source_versions(sources)
    if versions:
        doc["source_versions"] = versions
    payload = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def prepare_cache(sources: Sequence[Any], cache_root: str, preprocess: Any, name: str = "corpus",
                  workers: int = 0, shard_records: int | None = None, progress: bool = True,
                  verify: bool = False) -> str:
    """Return the folder of a prepared cache of ``sources``, preparing or updating it when needed.

    The folder is ``<cache_root>/<name>-<key>`` with ``key = cache_key(sources, spec)``: changing a source
    argument (number of synthetic records, root...) or the preprocessing gives a new cache; the same config reuses
    the existing one once its inputs are checked unchanged (:func:`~ecgfm.data.cache.input_changes`, stat only;
    the sources are not built). When they changed, the sources are built and the cache updated: changed records'
    shards converted again, changed label tables relabelled in place, and a changed set of records (files added
    or removed) rebuilt, each with a log line naming what changed. Guarded by the cache's lock (waits for
    another process preparing the same folder).

    Args:
        sources: ``_target_`` configs of :class:`~ecgfm.data.record.RecordSource` objects (instantiated here, only
            when the cache is missing or stale), or already-built sources.
        cache_root: folder holding caches (relative: to the working directory).
        preprocess: :class:`PreprocessSpec` or a dict of its fields.
        name: readable prefix of the folder name.
        workers: conversion worker processes (0: in-process).
        shard_records: records per shard (None: ``prepare_corpus``'s default).
        progress: show a progress bar while preparing.
        verify: hash every file of an existing cache and repair damaged shards (``prepare_corpus(verify=True)``).

    Returns:
        The cache folder (str).

    Raises:
        ECGDataError: a source path does not exist, or the source data is unreadable.
    """
    spec = preprocess if isinstance(preprocess, PreprocessSpec) else PreprocessSpec.from_dict(to_container(preprocess))
    # the key: every setting of a config source, relative paths resolved against the working directory (the same
    # "root: data" in two folders is two corpora), and every public setting of a built one (its repr may name few),
    # its paths absolute too (source_description)
    resolved = [_absolute_paths(s) if isinstance(s, (DictConfig, dict)) else s for s in sources]
    configs = [s for s in resolved if isinstance(s, dict)]
    described = [s if isinstance(s, dict) else source_description(s) for s in resolved]
    out = _resolve(cache_root) / f"{name}-{cache_key(described, spec)}"
    marker = out / PREPARED_MARKER

    def fresh() -> bool:
        # stat only: inputs unchanged and every cache file as last verified (else: checked, repaired, updated)
        if verify or not marker.exists() or not (out / "manifest.json").exists():
            return False
        try:
            restamped: dict = {}   # files with new times but unchanged bytes: prepared below to record the times
            if input_changes(out, 1, restamped=restamped) or restamped or stat_changes(out):
                return False
            # a manifest that disagrees with plan.json (a hand edit) is refused on open: prepared below, rewritten
            return _manifest_mismatch(_read_manifest(out), _read_plan(out)) is None
        except ECGDataError:
            return False

    if fresh():
        _warn_skipped(out, _marker_skipped(marker))
        return str(out)
    for i, cfg in enumerate(configs):
        check_data_paths(OmegaConf.create(to_container(cfg)), f"{name}.sources[{i}]")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    with file_lock(out / LOCK_FILE, blocking=True):
        if fresh():  # another process finished while we waited
            _warn_skipped(out, _marker_skipped(marker))
            return str(out)
        built = [instantiate(s, _convert_="all") if isinstance(s, dict) else s for s in resolved]
        log.info("preparing cache %s from %d source(s)", out, len(built))
        args = _check_prepare_args(built, spec, shard_records, workers)
        report = _prepare_locked(*args, out, progress=progress, verify=verify, rebuild_on_plan_change=True)
        info = {"sources": described, "spec": spec.to_dict()}
        for attr in ("n_planned", "n_converted", "n_skipped"):
            info[attr] = jsonable(getattr(report, attr))
        atomic_write_json(marker, info, indent=2)
    _warn_skipped(out, report.n_skipped)
    return str(out)


#: Skipped records named (with their reasons) in :func:`prepare_cache`'s warning; skipped.csv lists them all.
_SKIPPED_SHOWN = 3


def _marker_skipped(marker: Path) -> int:
    """``n_skipped`` recorded in a prepared cache's marker (0 when it cannot be read: nothing to warn about)."""
    try:
        return int(json.loads(marker.read_text(encoding="utf-8")).get("n_skipped") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _warn_skipped(out: Path, n_skipped: int) -> None:
    """One WARNING when the cache ``out`` (prepared or reused) lacks skipped records (unreadable, duplicate): the
    count, the first :data:`_SKIPPED_SHOWN` records with their reasons and the path of ``skipped.csv`` (all of them).

    Training and evaluation use the cache without those records, so the loss must be said where they prepare it
    (``prepare.py`` prints the count; :func:`prepare_cache` is what they call).
    """
    if n_skipped <= 0:
        return
    path = out / "skipped.csv"
    shown: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in itertools.islice(csv.DictReader(f), _SKIPPED_SHOWN):
                reason = " ".join(str(row.get("reason") or "?").split())
                reason = reason if len(reason) <= 200 else reason[:197] + "..."
                shown.append(f"{row.get('source')}/{row.get('record_id')}: {reason}")
    except (OSError, UnicodeDecodeError, csv.Error):
        pass   # the count and the path are still worth the warning
    more = f"; and {n_skipped - len(shown)} more" if shown and n_skipped > len(shown) else ""
    log.warning("cache %s: %d record(s) skipped (unreadable or duplicate), so left out of training and evaluation "
                "(%s%s); every one with its reason in %s (fix or remove the files: the cache is updated on the next "
                "run)", out, n_skipped, "; ".join(shown) or "see the file", more, path)


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
            path = _resolve(str(entry._value() if hasattr(entry, "_value") else entry))
            if not path.exists():
                raise ECGDataError(path.resolve(), f"cache folder does not exist (config key '{key}'; prepare it "
                                   "with ecgfm-prepare or use data=synthetic / data=ptbxl)")
            dirs.append(str(path))
    return dirs
