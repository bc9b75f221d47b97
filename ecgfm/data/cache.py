"""Sharded on-disk corpus cache: convert record sources once, read crops fast from every loader worker.

Conversion (:func:`prepare_corpus`) runs ``load -> preprocess_record(spec) -> store`` for every record of the given
:class:`~ecgfm.data.record.RecordSource` objects in parallel worker processes; reading (:class:`CorpusCache`)
memory-maps the shards so every DDP rank and DataLoader worker reads only the records it needs.

On-disk format (``format_version`` 1)::

    out_dir/
      plan.json               what is being prepared (spec, sources, shard size, plan fingerprint); written first
      shards/
        shard-00000.bin       raw little-endian float32; the records of the shard one after another, each
                              stored as (n_leads, n_samples) in C order with ONLY its present leads (canonical order)
        shard-00000.json      the shard's index and commit marker: {"shard", "bin_bytes", "bin_sha256",
                              "records": [{key, record_id, source, patient_id, labels, fs, n_samples, n_leads,
                              lead_mask, offset (bytes into .bin), meta, header}], "skipped": [...]}
      index.jsonl             one JSON object per record in cache order (the shard records concatenated):
                              record_id, source, patient_id, labels, fs, n_samples, lead_mask, meta, header
      records.npy             numpy structured array (N,), the hot path of the loaders, memory-mapped:
                              shard <i4, offset <i8 (bytes), n_samples <i8, n_leads u1, lead_mask (12,) bool,
                              fs <f8, patient <i8 (stable hash of source/patient_id, -1 unknown)
      skipped.csv             source, record_id, path, reason for every record that was not converted
      manifest.json           written LAST: format version, spec, sources, shard list with sha256, counts

Guarantees:

* **Atomic and resumable.** Every file is written under a temporary name, fsync'ed and ``os.replace``'d. A shard
  is done when both its ``.bin`` and its ``.json`` exist (the ``.json`` is renamed last and records the ``.bin``
  size). After a SIGKILL at any moment a rerun with the same arguments converts only the missing shards.
  :class:`CorpusCache` opens a directory only when ``manifest.json`` exists, so a partial cache is never readable.
* **Deterministic.** The plan is a pure function of the sources (ids sorted in natural order per source, sources in
  the given order) and ``shard_records`` (when left to ``None``, a function of the number of planned records
  only, never of the worker count: see :func:`auto_shard_records`); outputs carry no timestamps; two conversions
  of the same inputs give byte-identical files (sha256 of each is in the manifest), whatever ``workers`` is.
* **Bounded memory.** Workers hold one record at a time (records are streamed to the shard file); the parent holds
  the list of record ids and a few shard results. Peak memory does not grow with the corpus.
* **Bad records are skipped, never fatal.** Any exception while loading or preprocessing a record (normally
  :class:`~ecgfm.data.record.ECGDataError`) skips that record with a line in ``skipped.csv``; every good record is
  kept. The key of a record is ``source/record_id``; a key seen twice is skipped as a duplicate (never
  overwritten), and, unless ``allow_duplicate_ids=True``, so is a ``record_id`` already provided by another source
  (the usual cause is the same dataset added twice under two names).

Not stored: ``evidence`` masks and ``annotations`` (sample positions would need rescaling to ``spec.fs``); read
them from the source when needed. ``header`` and ``meta`` are stored as JSON (numpy values converted, non-finite
floats as null).

Scale: ``records.npy`` costs 49 bytes per record (49 MB for 1 M records, memory-mapped); ``index.jsonl`` is read
only when the pandas ``index`` is asked for (labels, meta). The conversion parent holds the planned record ids
(on the order of 100-200 bytes per record).

Speed: converting the shared PTB-XL (100 Hz) + CinC 2017 sets costs about 2.5 ms of CPU per record with 2
workers, start-up and imports of the whole process tree included (``scripts/bench_data.py`` prints it with the
wall time; ``PrepareReport.cpu_s``). Workers import numpy, scipy, pandas and wfdb, never torch; preprocessing
touches only the present leads and reuses its filter designs (:mod:`ecgfm.data.preprocess`). Records are
streamed to the shard file one ``write`` each, so a worker never holds a whole shard of signals.

Testing hook: the environment variable ``ECGFM_PREPARE_RECORD_DELAY`` (seconds) makes every conversion worker
sleep after each record, so tests can kill a conversion in the middle of a shard.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import hashlib
import importlib
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ecgfm.data.preprocess import PreprocessSpec, preprocess_record
from ecgfm.data.record import CANONICAL_LEADS, N_LEADS, ECGDataError, ECGRecord, RecordSource

FORMAT = "ecgfm-corpus-cache"
FORMAT_VERSION = 1
DTYPE = "<f4"
RECORDS_DTYPE = np.dtype([
    ("shard", "<i4"), ("offset", "<i8"), ("n_samples", "<i8"), ("n_leads", "u1"),
    ("lead_mask", "?", (N_LEADS,)), ("fs", "<f8"), ("patient", "<i8"),
])
DELAY_ENV = "ECGFM_PREPARE_RECORD_DELAY"
_SHARD_FMT = "shard-{:05d}"
_SKIPPED_FIELDS = ("source", "record_id", "path", "reason")


# ----------------------------------------------------------------------------------------------- helpers


def patient_hash(source: str, patient_id: Any) -> int:
    """Stable non-negative int64 hash of ``source/patient_id``; ``-1`` when the patient is unknown.

    Unlike Python's ``hash`` it is the same in every process and run (blake2b of the UTF-8 key).
    """
    if patient_id is None or (isinstance(patient_id, float) and math.isnan(patient_id)) or str(patient_id) == "":
        return -1
    digest = hashlib.blake2b(f"{source}/{patient_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def natural_key(text: str) -> tuple:
    """Sort key ordering embedded numbers numerically (``"2" < "10"``, ``"A2" < "A10"``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text)) if t)


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and paths to JSON types (for record meta and header)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _atomic_write_bytes(final: Path, data: bytes) -> str:
    """Write ``data`` to ``final`` atomically (temp file, fsync, rename); returns its sha256."""
    tmp = _tmp_name(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_source(source: RecordSource) -> dict[str, Any]:
    """JSON description of a source for the manifest: name, type and its scalar public attributes."""
    desc: dict[str, Any] = {"name": str(source.name),
                            "type": f"{type(source).__module__}.{type(source).__qualname__}"}
    for key, value in sorted(getattr(source, "__dict__", {}).items()):
        if key.startswith("_") or key == "name":
            continue
        if isinstance(value, (str, int, float, bool, Path)) or value is None:
            desc[key] = _jsonable(value)
    return desc


def rss_tree_bytes(pid: int | None = None) -> int:
    """Resident memory of process ``pid`` (default: this one) plus all its children, in bytes (0 if gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def _rss_tree_mb() -> float:
    """Resident memory of this process plus all its children, in MiB."""
    return rss_tree_bytes() / 2**20


# ----------------------------------------------------------------------------------------------- report


@dataclass
class PrepareReport:
    """What :func:`prepare_corpus` did.

    Attributes:
        out_dir: the cache directory.
        n_planned: records planned (after removing duplicate keys).
        n_converted: records stored in the finished cache.
        n_skipped: records not stored (bad input, duplicates); details in ``out_dir/skipped.csv``.
        n_shards: shards in the cache.
        n_shards_reused: shards found finished from an earlier (interrupted) run and not redone.
        n_converted_now: records processed (converted or skipped) by this call (0 when everything was reused).
        skipped_reasons: reason -> count (reasons with numbers stripped, for the summary).
        wall_s: wall-clock seconds of this call.
        peak_rss_mb: peak resident memory of this process and its workers during this call (sampled, MiB).
        workers: worker processes used (0: in-process).
        cpu_s: CPU seconds (user + system) spent by this call: this process (all its threads) plus its
            worker processes, start-up and imports included (``resource.getrusage``; NaN where unavailable).
        cpu_s_workers: the part of ``cpu_s`` spent in the worker processes.
    """

    out_dir: str
    n_planned: int
    n_converted: int
    n_skipped: int
    n_shards: int
    n_shards_reused: int
    n_converted_now: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    peak_rss_mb: float = float("nan")
    workers: int = 0
    cpu_s: float = float("nan")
    cpu_s_workers: float = float("nan")

    @property
    def records_per_s(self) -> float:
        """Records processed (converted or skipped) per second by this call, worker start-up included."""
        return self.n_converted_now / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_record(self) -> float:
        """CPU milliseconds per record processed by this call (``cpu_s / n_converted_now``; NaN if none).

        Unlike ``wall_s`` it does not depend on what else the machine is running."""
        return 1000.0 * self.cpu_s / self.n_converted_now if self.n_converted_now else float("nan")

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"cache {self.out_dir}: {self.n_converted} records converted, {self.n_skipped} skipped, "
            f"{self.n_shards} shards ({self.n_shards_reused} reused from an earlier run)",
            f"this run: {self.n_converted_now} records in {self.wall_s:.1f} s "
            f"({self.records_per_s:.1f} records/s, {self.workers} workers), peak RSS {self.peak_rss_mb:.0f} MiB "
            f"(parent + workers, sampled), CPU {self.cpu_s:.1f} s ({self.cpu_ms_per_record:.2f} ms per record, "
            f"{self.cpu_s_workers:.1f} s in workers)",
        ]
        if self.skipped_reasons:
            lines.append("skipped (see skipped.csv):")
            for reason, count in sorted(self.skipped_reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:15]:
                lines.append(f"  {count:6d}  {reason}")
        return "\n".join(lines)


def _cpu_times() -> tuple[float, float]:
    """``(user + system CPU seconds of this process, of its reaped child processes)``; NaN without ``resource``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan"), float("nan")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _reason_category(reason: str) -> str:
    """Collapse a skip reason into a summary category (numbers and file names removed)."""
    text = re.sub(r"\d+(\.\d+)?", "#", reason)
    return text[:120]


# ----------------------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    shards: list[list[tuple[int, str]]]   # per shard: (source index, record id)
    skipped: list[dict[str, str]]         # plan-level skips (duplicates, failing record_ids())
    fingerprint: str
    header: dict[str, Any]


#: Bounds of the automatic shard size (records per shard) and the number of shards it aims for.
AUTO_SHARD_MIN, AUTO_SHARD_MAX, AUTO_SHARD_TARGET = 64, 1024, 32


def auto_shard_records(n_records: int) -> int:
    """Records per shard when ``prepare_corpus(shard_records=None)``: about :data:`AUTO_SHARD_TARGET` shards,
    each of :data:`AUTO_SHARD_MIN` to :data:`AUTO_SHARD_MAX` records.

    A shard is the unit of parallel work, so with many shards every worker stays busy until the end (the last
    shard of a 5-shard plan on 2 workers would leave one worker idle for a fifth of the run); the upper bound
    keeps a worker's shard index small and resume granular on big corpora; the lower bound avoids a swarm of
    tiny files. Depends on the number of records only, so the bytes do not depend on ``workers``.
    """
    return int(min(AUTO_SHARD_MAX, max(AUTO_SHARD_MIN, math.ceil(max(int(n_records), 1) / AUTO_SHARD_TARGET))))


def _make_plan(sources: Sequence[RecordSource], spec: PreprocessSpec, shard_records: int | None,
               allow_duplicate_ids: bool) -> _Plan:
    keys_seen: dict[str, int] = {}        # "source/record_id" -> source index
    ids_seen: dict[str, int] = {}         # record_id -> source index
    items: list[tuple[int, str]] = []
    skipped: list[dict[str, str]] = []
    for si, src in enumerate(sources):
        try:
            ids = [str(r) for r in src.record_ids()]
        except Exception as exc:  # the whole source is unreadable: report it, keep the others
            skipped.append({"source": str(src.name), "record_id": "*", "path": str(getattr(src, "root", "")),
                            "reason": f"record_ids() failed: {type(exc).__name__}: {exc}"})
            continue
        for rid in sorted(ids, key=natural_key):
            key = f"{src.name}/{rid}"
            if key in keys_seen:
                skipped.append({"source": str(src.name), "record_id": rid, "path": "",
                                "reason": f"duplicate key {key} (already provided by source #{keys_seen[key]} "
                                          f"{sources[keys_seen[key]].name!r}); not overwritten"})
                continue
            if not allow_duplicate_ids and rid in ids_seen:
                other = sources[ids_seen[rid]].name
                skipped.append({"source": str(src.name), "record_id": rid, "path": "",
                                "reason": f"duplicate record_id {rid!r} also in source #{ids_seen[rid]} "
                                          f"{other!r} (pass allow_duplicate_ids=True to keep both)"})
                keys_seen[key] = si
                continue
            keys_seen[key] = si
            ids_seen.setdefault(rid, si)
            items.append((si, rid))
    if shard_records is None:
        shard_records = auto_shard_records(len(items))
    shards = [items[i:i + shard_records] for i in range(0, len(items), shard_records)]
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": DTYPE,
        "spec": spec.to_dict(), "spec_fingerprint": spec.fingerprint(),
        "sources": [describe_source(s) for s in sources], "shard_records": int(shard_records),
        "allow_duplicate_ids": bool(allow_duplicate_ids), "n_planned": len(items), "n_shards": len(shards),
    }
    h = hashlib.sha256(_dumps(header).encode())
    for si, rid in items:
        h.update(f"{si}\x00{rid}\x01".encode())
    for row in skipped:
        h.update(_dumps(row).encode())
    return _Plan(shards=shards, skipped=skipped, fingerprint=h.hexdigest(), header=header)


# ----------------------------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _worker_init(sources: Sequence[RecordSource], spec: PreprocessSpec, shards_dir: str, progress_queue: Any) -> None:
    _WORKER.update(sources=list(sources), spec=spec, shards_dir=Path(shards_dir), queue=progress_queue)


def _error_path(exc: BaseException, src: RecordSource, rid: str) -> str:
    if isinstance(exc, ECGDataError):
        return exc.path
    return str(getattr(src, "root", ""))


def _convert_shard(shard_index: int, items: Sequence[tuple[int, str]]) -> dict[str, Any]:
    """Convert one shard (runs in a worker, or in-process with ``workers=0``); returns its small summary."""
    sources, spec, shards_dir, queue = (_WORKER["sources"], _WORKER["spec"], _WORKER["shards_dir"],
                                        _WORKER.get("queue"))
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    name = _SHARD_FMT.format(shard_index)
    final_bin, final_json = shards_dir / f"{name}.bin", shards_dir / f"{name}.json"
    tmp_bin = _tmp_name(final_bin)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    h = hashlib.sha256()
    offset = 0
    pending = 0
    with open(tmp_bin, "wb") as f:
        for si, rid in items:
            src = sources[si]
            try:
                rec = src.load(rid)
                if not isinstance(rec, ECGRecord):
                    raise TypeError(f"load() returned {type(rec).__name__}, not ECGRecord")
                rec.validate()
                rec = preprocess_record(rec, spec)
                rec.validate()
                meta, header = _jsonable(rec.meta), _jsonable(rec.header)
                _dumps(meta), _dumps(header)  # fail here (skip the record), not at finalisation
            except Exception as exc:  # any failure of one record skips that record only
                kind = "" if isinstance(exc, ECGDataError) else f"{type(exc).__name__}: "
                problem = exc.problem if isinstance(exc, ECGDataError) else str(exc)
                skipped.append({"source": str(src.name), "record_id": rid, "path": _error_path(exc, src, rid),
                                "reason": f"{kind}{problem}".replace("\n", " ")})
            else:
                data = np.ascontiguousarray(rec.signal[rec.lead_mask], dtype=DTYPE)
                buf = memoryview(data).cast("B")
                f.write(buf)
                h.update(buf)
                records.append({
                    "key": f"{src.name}/{rid}", "record_id": rid, "source": str(src.name),
                    "patient_id": None if rec.patient_id is None else str(rec.patient_id),
                    "labels": [str(x) for x in rec.labels], "fs": float(rec.fs),
                    "n_samples": int(rec.n_samples), "n_leads": int(data.shape[0]),
                    "lead_mask": [bool(m) for m in rec.lead_mask], "offset": offset,
                    "meta": meta, "header": header,
                })
                offset += buf.nbytes
            pending += 1
            if queue is not None and pending >= 8:
                queue.put(pending)
                pending = 0
            if delay > 0:
                time.sleep(delay)
        f.flush()
        os.fsync(f.fileno())
    if queue is not None and pending:
        queue.put(pending)
    index = {"shard": name, "bin_bytes": offset, "bin_sha256": h.hexdigest(), "records": records,
             "skipped": skipped}
    os.replace(tmp_bin, final_bin)          # 1. the data ...
    _fsync_dir(shards_dir)
    _atomic_write_bytes(final_json, _dumps(index).encode())   # 2. ... then the commit marker
    return {"shard": shard_index, "n_records": len(records), "n_skipped": len(skipped)}


# ----------------------------------------------------------------------------------------------- prepare


def _shard_done(shards_dir: Path, shard_index: int) -> bool:
    name = _SHARD_FMT.format(shard_index)
    final_bin, final_json = shards_dir / f"{name}.bin", shards_dir / f"{name}.json"
    if not (final_bin.exists() and final_json.exists()):
        return False
    try:
        info = json.loads(final_json.read_text())
    except (OSError, ValueError):
        return False
    return final_bin.stat().st_size == int(info.get("bin_bytes", -1))


def _clean_temporaries(out_dir: Path) -> None:
    for folder in (out_dir, out_dir / "shards"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)


class _Lock:
    """Exclusive advisory lock on ``out_dir/.lock`` so two preparations never write the same directory."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX: no locking
            pass
        except OSError:
            os.close(self.fd)
            raise RuntimeError(f"{self.path.parent}: another preparation is writing this cache") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing releases the flock


def prepare_corpus(sources: RecordSource | Sequence[RecordSource], out_dir: str | os.PathLike,
                   spec: PreprocessSpec | dict | None = None, shard_records: int | None = None, workers: int = 2,
                   progress: bool = True, allow_duplicate_ids: bool = False) -> PrepareReport:
    """Convert record sources into a sharded cache (resumable, atomic, deterministic; see the module docstring).

    Args:
        sources: one or more picklable :class:`~ecgfm.data.record.RecordSource` objects.
        out_dir: cache directory (created). Rerunning with the same arguments resumes an interrupted run, or
            returns at once when the cache is complete.
        spec: preprocessing applied to every record (:class:`PreprocessSpec` or its dict; None: defaults).
        shard_records: records per shard (the unit of work, of resume and of one worker's memory); None:
            :func:`auto_shard_records` of the number of planned records (about 32 shards of 64-1024 records).
        workers: conversion worker processes (spawned); 0 converts in this process.
        progress: show a tqdm progress bar (records).
        allow_duplicate_ids: keep a ``record_id`` that another source already provided (as a distinct
            ``source/record_id`` key). Same-key duplicates are always skipped.

    Returns:
        A :class:`PrepareReport`.

    Raises:
        ValueError: bad arguments, or ``out_dir`` holds a different preparation (other spec/sources/shard size).
        RuntimeError: a worker process died (finished shards are kept: rerun to resume).
    """
    t0 = time.perf_counter()
    cpu0 = _cpu_times()
    if isinstance(sources, RecordSource) or not isinstance(sources, (list, tuple)):
        sources = [sources]  # type: ignore[list-item]
    sources = list(sources)
    if not sources:
        raise ValueError("prepare_corpus needs at least one source")
    for s in sources:
        if not isinstance(s, RecordSource):
            raise ValueError(f"{s!r} is not a RecordSource (needs name, record_ids(), load())")
    if spec is None:
        spec = PreprocessSpec()
    elif isinstance(spec, dict):
        spec = PreprocessSpec.from_dict(spec)
    if shard_records is not None and int(shard_records) < 1:
        raise ValueError(f"shard_records must be >= 1 (or None: automatic), got {shard_records}")
    if int(workers) < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    shard_records = None if shard_records is None else int(shard_records)
    workers = int(workers)
    if workers > 0:
        for s in sources:
            try:
                pickle.dumps(s)
            except Exception as exc:
                raise ValueError(f"source {getattr(s, 'name', s)!r} cannot be pickled for the worker processes "
                                 f"({type(exc).__name__}: {exc}); keep only plain attributes, or use workers=0"
                                 ) from None
    out = Path(out_dir)
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    peak = [_rss_tree_mb()]

    with _Lock(out):
        plan = _make_plan(sources, spec, shard_records, allow_duplicate_ids)
        plan_doc = dict(plan.header, plan_fingerprint=plan.fingerprint)
        plan_path = out / "plan.json"
        if plan_path.exists():
            try:
                old = json.loads(plan_path.read_text())
            except ValueError:
                old = {}
            if old.get("plan_fingerprint") != plan.fingerprint:
                raise ValueError(
                    f"{out}: holds a different preparation (spec, sources, record ids or shard size differ: "
                    f"plan {old.get('plan_fingerprint', '?')[:12]} vs {plan.fingerprint[:12]}); "
                    f"use a new directory or delete this one")
        else:
            _atomic_write_bytes(plan_path, (json.dumps(plan_doc, indent=1, sort_keys=True) + "\n").encode())
        _clean_temporaries(out)

        n_shards = len(plan.shards)
        todo = [i for i in range(n_shards) if not _shard_done(shards_dir, i)]
        reused = n_shards - len(todo)
        complete = (out / "manifest.json").exists() and not todo
        n_todo_records = sum(len(plan.shards[i]) for i in todo)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_todo_records, unit="rec", desc=f"prepare {out.name}", dynamic_ncols=True)
        try:
            if todo:
                _run_shards(plan, todo, sources, spec, shards_dir, workers, bar, peak)
        finally:
            if bar is not None:
                bar.close()
        peak.append(_rss_tree_mb())
        if not complete:
            _finalize(out, plan, plan_doc)
        manifest = json.loads((out / "manifest.json").read_text())

    cpu1 = _cpu_times()   # the worker pool has been joined (reaped) by now, so RUSAGE_CHILDREN holds its CPU
    counts = manifest["counts"]
    reasons: collections.Counter[str] = collections.Counter()
    with open(out / "skipped.csv", newline="") as f:
        for row in csv.DictReader(f):
            reasons[_reason_category(row["reason"])] += 1
    return PrepareReport(
        out_dir=str(out), n_planned=int(plan.header["n_planned"]),
        n_converted=int(counts["converted"]), n_skipped=int(counts["skipped"]), n_shards=n_shards,
        n_shards_reused=reused, n_converted_now=n_todo_records, skipped_reasons=dict(reasons),
        wall_s=time.perf_counter() - t0, peak_rss_mb=max((p for p in peak if p == p), default=float("nan")),
        workers=workers, cpu_s=(cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]), cpu_s_workers=cpu1[1] - cpu0[1])


def _run_shards(plan: _Plan, todo: list[int], sources: list[RecordSource], spec: PreprocessSpec,
                shards_dir: Path, workers: int, bar: Any, peak: list[float]) -> None:
    if workers == 0:
        _worker_init(sources, spec, str(shards_dir), None)
        try:
            for i in todo:
                _convert_shard(i, plan.shards[i])
                if bar is not None:
                    bar.update(len(plan.shards[i]))
                peak.append(_rss_tree_mb())
        finally:
            _WORKER.clear()
        return
    ctx = mp.get_context("spawn")   # spawn: safe with threads/torch in the parent, same on every OS
    queue = ctx.Queue()
    n_workers = min(workers, len(todo))
    pending_items = list(todo)
    running: dict[cf.Future, int] = {}
    last_sample = 0.0
    with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(sources, spec, str(shards_dir), queue)) as pool:
        try:
            while pending_items or running:
                # Keep at most 2 shards per worker queued: the parent never holds the whole plan in flight.
                while pending_items and len(running) < 2 * n_workers:
                    i = pending_items.pop(0)
                    running[pool.submit(_convert_shard, i, plan.shards[i])] = i
                done, _ = cf.wait(list(running), timeout=0.25, return_when=cf.FIRST_COMPLETED)
                _drain(queue, bar)
                now = time.perf_counter()
                if now - last_sample > 0.25:
                    peak.append(_rss_tree_mb())
                    last_sample = now
                for fut in done:
                    i = running.pop(fut)
                    try:
                        fut.result()
                    except cf.process.BrokenProcessPool as exc:
                        raise RuntimeError(
                            f"{shards_dir.parent}: a conversion worker died while converting shard {i} ({exc}); "
                            f"finished shards are kept, rerun the same command to resume") from exc
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
        finally:
            _drain(queue, bar)
    queue.close()


def _drain(queue: Any, bar: Any) -> None:
    import queue as queue_mod

    while True:
        try:
            n = queue.get_nowait()
        except (queue_mod.Empty, OSError, ValueError):
            return
        if bar is not None:
            bar.update(n)


def _finalize(out: Path, plan: _Plan, plan_doc: dict[str, Any]) -> None:
    """Merge the shard indexes into index.jsonl + records.npy, write skipped.csv and (last) manifest.json."""
    shards_dir = out / "shards"
    n_total = 0
    shard_infos = []
    for i in range(len(plan.shards)):
        info = json.loads((shards_dir / f"{_SHARD_FMT.format(i)}.json").read_text())
        n_total += len(info["records"])
    records_path = out / "records.npy"
    tmp_records = _tmp_name(records_path)
    arr = np.lib.format.open_memmap(tmp_records, mode="w+", dtype=RECORDS_DTYPE, shape=(n_total,))
    index_path = out / "index.jsonl"
    tmp_index = _tmp_name(index_path)
    skipped_rows = list(plan.skipped)
    by_source: dict[str, dict[str, int]] = {}
    fs_values: set[float] = set()
    pos = 0
    h_index = hashlib.sha256()
    with open(tmp_index, "w", encoding="utf-8", newline="\n") as fidx:
        for i in range(len(plan.shards)):
            name = _SHARD_FMT.format(i)
            json_bytes = (shards_dir / f"{name}.json").read_bytes()
            info = json.loads(json_bytes)
            for r in info["records"]:
                row = {k: r[k] for k in ("record_id", "source", "patient_id", "labels", "fs", "n_samples",
                                         "lead_mask", "meta", "header")}
                line = _dumps(row) + "\n"
                fidx.write(line)
                h_index.update(line.encode())
                arr[pos] = (i, r["offset"], r["n_samples"], r["n_leads"], np.array(r["lead_mask"], dtype=bool),
                            r["fs"], patient_hash(r["source"], r["patient_id"]))
                fs_values.add(float(r["fs"]))
                by_source.setdefault(r["source"], {"converted": 0, "skipped": 0})["converted"] += 1
                pos += 1
            skipped_rows.extend(info["skipped"])
            shard_infos.append({"name": name, "bin": f"shards/{name}.bin", "index": f"shards/{name}.json",
                                "n_records": len(info["records"]), "n_skipped": len(info["skipped"]),
                                "bin_bytes": int(info["bin_bytes"]), "bin_sha256": info["bin_sha256"],
                                "index_sha256": hashlib.sha256(json_bytes).hexdigest()})
        fidx.flush()
        os.fsync(fidx.fileno())
    arr.flush()
    del arr
    with open(tmp_records, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_records, records_path)
    os.replace(tmp_index, index_path)
    for row in skipped_rows:
        by_source.setdefault(row["source"], {"converted": 0, "skipped": 0})["skipped"] += 1
    skipped_rows.sort(key=lambda r: (r["source"], natural_key(r["record_id"]), r["reason"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_SKIPPED_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in skipped_rows:
        writer.writerow({k: row.get(k, "") for k in _SKIPPED_FIELDS})
    skipped_sha = _atomic_write_bytes(out / "skipped.csv", buf.getvalue().encode())
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": DTYPE, "leads": list(CANONICAL_LEADS),
        "spec": plan.header["spec"], "spec_fingerprint": plan.header["spec_fingerprint"],
        "fs": fs_values.pop() if len(fs_values) == 1 else None,
        "sources": plan.header["sources"], "shard_records": plan.header["shard_records"],
        "allow_duplicate_ids": plan.header["allow_duplicate_ids"], "plan_fingerprint": plan.fingerprint,
        "shards": shard_infos,
        "files": {"index.jsonl": h_index.hexdigest(), "records.npy": _sha256_file(records_path),
                  "skipped.csv": skipped_sha},
        "counts": {"planned": plan.header["n_planned"], "converted": n_total,
                   "skipped": len(skipped_rows), "by_source": by_source},
    }
    _atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------------------------- reading


def _incomplete_message(path: Path) -> str:
    plan = path / "plan.json"
    if plan.exists():
        try:
            n = int(json.loads(plan.read_text())["n_shards"])
            done = sum(_shard_done(path / "shards", i) for i in range(n))
            progress = f" ({done} of {n} shards done)"
        except (ValueError, KeyError, OSError):
            progress = ""
        return (f"incomplete cache: preparation did not finish{progress}; rerun prepare_corpus / "
                f"scripts/prepare.py with the same arguments to resume")
    return "not an ecgfm corpus cache (no manifest.json); create one with scripts/prepare.py"


class CorpusCache:
    """Read-only view of a cache written by :func:`prepare_corpus`.

    Opening reads ``manifest.json`` and memory-maps ``records.npy``; signals are read through per-shard
    ``np.memmap`` opened on first use (at most ``max_open_shards`` at a time). The pandas ``index`` (labels,
    meta) is loaded only when asked for. Pickling keeps only the path, so a cache can be sent to DataLoader
    workers, which reopen the memory maps lazily.

    Args:
        path: cache directory.
        max_open_shards: memory maps kept open (least recently used are closed).

    Raises:
        ECGDataError: the directory is not a cache, is incomplete (interrupted preparation) or is damaged
            (missing shard or wrong size).
    """

    def __init__(self, path: str | os.PathLike, max_open_shards: int = 64):
        self.path = Path(path)
        self.max_open_shards = int(max_open_shards)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            raise ECGDataError(self.path, _incomplete_message(self.path))
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise ECGDataError(manifest_path, f"unreadable manifest ({exc})") from None
        if self.manifest.get("format") != FORMAT or int(self.manifest.get("format_version", -1)) > FORMAT_VERSION:
            raise ECGDataError(manifest_path, f"unsupported cache format {self.manifest.get('format')!r} "
                                              f"version {self.manifest.get('format_version')!r}")
        for sh in self.manifest["shards"]:
            p = self.path / sh["bin"]
            if not p.exists() or p.stat().st_size != int(sh["bin_bytes"]):
                raise ECGDataError(p, f"shard missing or of the wrong size (expected {sh['bin_bytes']} bytes); "
                                      f"the cache is damaged: prepare it again")
        self.spec = PreprocessSpec.from_dict(self.manifest["spec"])
        self._records: np.ndarray | None = None
        self._cols: dict[str, np.ndarray] | None = None
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._index = None
        self._n = int(self.manifest["counts"]["converted"])

    # -- pickling: path only ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_records=None, _cols=None, _maps=collections.OrderedDict(), _index=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"CorpusCache({str(self.path)!r}, records={len(self)}, fs={self.fs})"

    @property
    def fs(self) -> float | None:
        """Sampling rate of every record (None if the cache mixes rates, i.e. ``spec.fs`` was None)."""
        fs = self.manifest.get("fs")
        return None if fs is None else float(fs)

    @property
    def records(self) -> np.ndarray:
        """The memory-mapped numeric table (structured array, see :data:`RECORDS_DTYPE`)."""
        if self._records is None:
            self._records = np.load(self.path / "records.npy", mmap_mode="r", allow_pickle=False)
            if len(self._records) != self._n:
                raise ECGDataError(self.path / "records.npy", f"{len(self._records)} rows, manifest says {self._n}")
        return self._records

    @property
    def n_samples(self) -> np.ndarray:
        """``(N,)`` int64 record lengths (samples)."""
        return np.asarray(self.records["n_samples"], dtype=np.int64)

    @property
    def lead_masks(self) -> np.ndarray:
        """``(N, 12)`` bool presence masks."""
        return np.asarray(self.records["lead_mask"], dtype=bool)

    @property
    def patients(self) -> np.ndarray:
        """``(N,)`` int64 stable patient hashes (-1 unknown), see :func:`patient_hash`."""
        return np.asarray(self.records["patient"], dtype=np.int64)

    @property
    def index(self):
        """pandas DataFrame, one row per record: record_id, source, patient_id, labels (list[str]), fs,
        n_samples, lead_mask, meta (dict), header (dict), key."""
        if self._index is None:
            import pandas as pd

            rows = []
            with open(self.path / "index.jsonl", encoding="utf-8") as f:
                for line in f:
                    rows.append(json.loads(line))
            cols = ["record_id", "source", "patient_id", "labels", "fs", "n_samples", "lead_mask", "meta",
                    "header"]
            data: dict[str, Any] = {c: pd.Series([r[c] for r in rows], dtype=object) for c in cols}
            data["fs"] = pd.Series([r["fs"] for r in rows], dtype=np.float64)
            data["n_samples"] = pd.Series([r["n_samples"] for r in rows], dtype=np.int64)
            data["lead_mask"] = pd.Series([np.asarray(r["lead_mask"], dtype=bool) for r in rows], dtype=object)
            data["key"] = pd.Series([f"{r['source']}/{r['record_id']}" for r in rows], dtype=object)
            self._index = pd.DataFrame(data)
        return self._index

    @property
    def keys(self) -> list[str]:
        """``source/record_id`` of every record, in cache order."""
        return self.index["key"].tolist()

    def _check(self, i: int) -> int:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"record {i} out of range for {self.path} ({self._n} records)")
        return i % self._n

    def columns(self) -> dict[str, np.ndarray]:
        """Columns of the record table (:data:`RECORDS_DTYPE` names -> ``(N, ...)`` arrays): plain-ndarray views
        of the memory map, no copy, faster to index per record than the memmap itself."""
        if self._cols is None:
            table = self.records.view(np.ndarray)
            self._cols = {name: table[name] for name in RECORDS_DTYPE.names}
        return self._cols

    def _shard_map(self, shard: int) -> np.ndarray:
        mm = self._maps.get(shard)
        if mm is None:
            path = self.path / self.manifest["shards"][shard]["bin"]
            # a plain ndarray view of the memmap (keeps the map alive; slicing skips np.memmap's overhead)
            mm = np.memmap(path, dtype=DTYPE, mode="r").view(np.ndarray)
            self._maps[shard] = mm
            while len(self._maps) > self.max_open_shards:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return mm

    def _stored(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(present-lead view (n_leads, T) of the shard map, lead mask (12,))`` of record ``i`` (checked)."""
        c = self.columns()
        n_leads, t = int(c["n_leads"][i]), int(c["n_samples"][i])
        start = int(c["offset"][i]) // 4
        data = self._shard_map(int(c["shard"][i]))[start:start + n_leads * t].reshape(n_leads, t)
        return data, c["lead_mask"][i]

    def lead_mask(self, i: int) -> np.ndarray:
        """``(12,)`` bool presence mask of record ``i``."""
        return np.array(self.columns()["lead_mask"][self._check(i)], dtype=bool)

    def signal(self, i: int) -> np.ndarray:
        """Whole preprocessed record ``i`` as ``(12, T)`` float32 (absent leads zero)."""
        data, mask = self._stored(self._check(i))
        out = np.zeros((N_LEADS, data.shape[1]), dtype=np.float32)
        out[mask] = data
        return out

    def window(self, i: int, start: int, length: int) -> np.ndarray:
        """Samples ``[start, start + length)`` of record ``i`` as ``(12, length)`` float32; the part beyond
        the end of the record (or before 0) is zero. Reads only those samples from disk."""
        out = np.zeros((N_LEADS, int(length)), dtype=np.float32)
        self.read_window_into(i, start, out)
        return out

    def read_window_into(self, i: int, start: int, out: np.ndarray) -> np.ndarray:
        """Like :meth:`window`, writing into ``out`` ``(12, length)`` (which must be zero where nothing is
        read: absent leads and the part outside the record). Returns the ``(12,)`` lead mask (a view)."""
        data, mask = self._stored(self._check(i))
        length = out.shape[-1]
        lo, hi = max(int(start), 0), min(int(start) + length, data.shape[1])
        if hi > lo:
            out[mask, lo - int(start):hi - int(start)] = data[:, lo:hi]
        return mask

    def read_windows_into(self, indices: np.ndarray, starts: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Batched :meth:`read_window_into`: window ``b`` of record ``indices[b]`` from ``starts[b]`` into
        ``out[b]`` ``(n, 12, length)`` (zero where nothing is read). The record table is looked up for the whole
        batch at once, so a crop costs one slice copy (the loaders' hot path). Returns the ``(n, 12)`` masks."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f"record index out of range for {self.path} ({self._n} records)")
        idx = idx % max(self._n, 1)
        c = self.columns()
        length = out.shape[-1]
        n_samples, n_leads = c["n_samples"][idx], c["n_leads"][idx].astype(np.int64)
        first, shards, masks = c["offset"][idx] // 4, c["shard"][idx], c["lead_mask"][idx]
        starts = np.asarray(starts, dtype=np.int64)
        lo, hi = np.maximum(starts, 0), np.minimum(starts + length, n_samples)
        for b, (f, nl, t, s, a, z, sh) in enumerate(zip(first.tolist(), n_leads.tolist(), n_samples.tolist(),
                                                        starts.tolist(), lo.tolist(), hi.tolist(),
                                                        shards.tolist())):
            if z <= a:
                continue
            data = self._shard_map(sh)[f:f + nl * t].reshape(nl, t)
            if nl == N_LEADS:
                out[b, :, a - s:z - s] = data[:, a:z]
            else:
                out[b, masks[b], a - s:z - s] = data[:, a:z]
        return masks

    def record(self, i: int) -> ECGRecord:
        """Record ``i`` as an :class:`ECGRecord` (preprocessed signal, ids, labels, meta, header)."""
        i = self._check(i)
        row = self.index.iloc[i]
        return ECGRecord(signal=self.signal(i), fs=float(row["fs"]), lead_mask=self.lead_mask(i),
                         record_id=row["record_id"], source=row["source"], patient_id=row["patient_id"],
                         labels=tuple(row["labels"]), meta=dict(row["meta"]), header=dict(row["header"]))

    def label_space(self, label_fn: Callable[[tuple[str, ...], dict], Iterable[str]] | None = None) -> list[str]:
        """Sorted set of every label in the cache (after ``label_fn(labels, meta)`` when given)."""
        seen: set[str] = set()
        for labels, meta in zip(self.index["labels"], self.index["meta"]):
            seen.update(str(x) for x in (label_fn(tuple(labels), meta) if label_fn else labels))
        return sorted(seen, key=natural_key)

    def labels_matrix(self, classes: Sequence[str],
                      label_fn: Callable[[tuple[str, ...], dict], Iterable[str]] | None = None) -> np.ndarray:
        """Multi-hot label matrix.

        Args:
            classes: the C class names (columns, in this order).
            label_fn: optional ``label_fn(labels, meta) -> iterable of class names`` deriving a record's
                classes (e.g. a PTB-XL task from ``meta["scp_codes"]``); default: the stored ``labels``.
                Names not in ``classes`` are ignored.

        Returns:
            ``(N, C)`` float32 with 1 where the record has the class.
        """
        col = {str(c): j for j, c in enumerate(classes)}
        if len(col) != len(classes):
            raise ValueError(f"classes contain duplicates: {list(classes)}")
        out = np.zeros((len(self), len(col)), dtype=np.float32)
        for i, (labels, meta) in enumerate(zip(self.index["labels"], self.index["meta"])):
            for name in (label_fn(tuple(labels), meta) if label_fn else labels):
                j = col.get(str(name))
                if j is not None:
                    out[i, j] = 1.0
        return out

    def verify(self) -> None:
        """Recompute the sha256 of every file listed in the manifest; raise :class:`ECGDataError` on mismatch."""
        for sh in self.manifest["shards"]:
            for key, rel in (("bin_sha256", sh["bin"]), ("index_sha256", sh["index"])):
                if _sha256_file(self.path / rel) != sh[key]:
                    raise ECGDataError(self.path / rel, "checksum mismatch: the cache is damaged")
        for rel, digest in self.manifest["files"].items():
            if _sha256_file(self.path / rel) != digest:
                raise ECGDataError(self.path / rel, "checksum mismatch: the cache is damaged")


# ----------------------------------------------------------------------------------------------- config entry


def project_root() -> Path:
    """Base of relative paths in ``prepare.yaml`` and the data configs: the directory the command runs from
    (the same rule as every other entry point; Hydra does not change it). An installed ecgfm has no checkout to
    walk up to, so relative paths never depend on where the package lives."""
    return Path.cwd()


_PATH_KEYS = ("root", "labels_csv", "path")


def build_sources(names: Sequence[str], presets: dict[str, dict[str, Any]],
                  base_dir: str | os.PathLike | None = None) -> list[RecordSource]:
    """Instantiate sources by name with :func:`ecgfm.data.readers.get_source`.

    Args:
        names: preset names, e.g. ``["ptbxl", "cinc2017"]``.
        presets: name -> keyword arguments (``root``, ...); an optional ``type`` entry names the registered
            source when it differs from the preset name (e.g. preset ``ptbxl500`` of type ``ptbxl``).
            Relative ``root``/``labels_csv``/``path`` values are resolved against ``base_dir``.
        base_dir: base of relative paths (default: the project root).
    """
    from ecgfm.data.readers import SOURCES, get_source

    base = Path(base_dir) if base_dir is not None else project_root()
    out = []
    for name in names:
        kwargs = dict(presets.get(name) or {})
        for key in _PATH_KEYS:
            if kwargs.get(key) not in (None, "") and not Path(str(kwargs[key])).is_absolute():
                kwargs[key] = str((base / str(kwargs[key])).resolve())
        kind = kwargs.pop("type", name)
        if "name" in kwargs:
            # get_source(name, **kwargs) cannot pass a `name` keyword on to the source (FolderSource's): resolve
            # the registered class the same way get_source does.
            target = SOURCES.get(kind)
            if target is None:
                raise ValueError(f"unknown record source {kind!r}; known: {sorted(SOURCES)}")
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                target = getattr(importlib.import_module(module), attr)
            out.append(target(**kwargs))
        else:
            out.append(get_source(kind, **kwargs))
    return out


def _shard_setting(value: Any) -> int | None:
    """``shard_records`` of a config: an int, or null / ``"auto"`` for :func:`auto_shard_records`."""
    return None if value is None or str(value).lower() == "auto" else int(value)


#: Settings of ``conf/prepare.yaml``; every other top-level key is a source preset.
PREPARE_SETTINGS = ("sources", "out", "spec", "shard_records", "workers", "progress", "allow_duplicate_ids")


def prepare_from_config(cfg: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> PrepareReport:
    """What ``scripts/prepare.py`` runs: build the sources named by ``cfg["sources"]`` from their presets, convert
    them into ``cfg["out"]`` and print the report summary.

    Args:
        cfg: the composed ``conf/prepare.yaml`` as a plain dict: :data:`PREPARE_SETTINGS` plus one preset
            (source keyword arguments) per source name.
        base_dir: base of relative paths (default: the project root).
    """
    base = Path(base_dir) if base_dir is not None else project_root()
    cfg = dict(cfg)
    names = [cfg["sources"]] if isinstance(cfg["sources"], str) else list(cfg["sources"])
    presets = {k: dict(v or {}) for k, v in cfg.items() if k not in PREPARE_SETTINGS and k != "hydra"}
    unknown = [s for s in names if s not in presets]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; presets in conf/prepare.yaml: {sorted(presets)}")
    out = Path(str(cfg["out"]))
    out_path = out if out.is_absolute() else base / out
    report = prepare_corpus(build_sources(names, presets, base), out_path,
                            PreprocessSpec.from_dict(dict(cfg.get("spec") or {})),
                            shard_records=_shard_setting(cfg.get("shard_records")),
                            workers=int(cfg.get("workers", 2)),
                            progress=bool(cfg.get("progress", True)),
                            allow_duplicate_ids=bool(cfg.get("allow_duplicate_ids", False)))
    print(report.summary(), file=sys.stdout, flush=True)
    return report
