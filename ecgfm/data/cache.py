"""Sharded on-disk corpus cache: convert record sources once, read crops fast from every loader worker.

Conversion (:func:`prepare_corpus`) runs ``load -> preprocess_record(spec) -> store`` for every record of the given
:class:`~ecgfm.data.record.RecordSource` objects in parallel worker processes; reading (:class:`CorpusCache`)
memory-maps the shards so every DDP rank and DataLoader worker reads only the records it needs.

On-disk format (``format_version`` 2; version 1 caches are read, without input fingerprints; preparing one again
converts it in full: :func:`ecgfm.data.prepare.prepare_cache` does, :func:`prepare_corpus` refuses it naming the
format version)::

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
      inputs.json             what the cache was built from: record files (size, mtime_ns, content digest),
                              label tables (size, mtime_ns, sha256), folders (mtime_ns); see :func:`input_changes`
      inputs.pending.json     while shards are being converted (removed once inputs.json is written): the folders'
                              mtime_ns when the first unfinished call started, kept across resumes
      manifest.json           written LAST: format version, spec, sources, shard list with sizes and sha256,
                              derived files with sizes and sha256, counts
      .verified.json          stats of the files whose sha256 was last checked (open-time integrity check)
      .lock                   the preparation lock (:func:`ecgfm.io.file_lock`)

Each shard index also records, per record, the files it was read from (``inputs``: path, size, mtime_ns and the
first 16 hex characters of the file's sha256; indexes written before digests lack the last) and the fingerprint
of its sources' label tables (``labels_fp``).

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
  the list of record ids and a few shard results, and reads the shard indexes one at a time (the final merge into
  ``records.npy`` / ``index.jsonl`` is streamed shard by shard). Beyond the record ids and the input fingerprints
  of ``inputs.json`` (a few hundred bytes per record), peak memory does not grow with the corpus.
* **Bad records are skipped, never fatal.** Any exception while loading or preprocessing a record (normally
  :class:`~ecgfm.data.record.ECGDataError`) skips that record with a line in ``skipped.csv``; every good record is
  kept. The key of a record is ``source/record_id``; a key seen twice is skipped as a duplicate (never
  overwritten), and, unless ``allow_duplicate_ids=True``, so is a ``record_id`` already provided by another source
  (the usual cause is the same dataset added twice under two names). Two different sources sharing a ``name``
  (another reader type or another ``root``) are refused (ValueError naming both): their records would be merged
  and their patient ids mixed. A failure of the machine rather than of the record (``MemoryError``; ``OSError``
  ``ENOSPC`` / ``EDQUOT`` / ``EMFILE`` / ``ENFILE`` / ``ENOMEM``: :data:`RESOURCE_ERRNOS`) is not a skip: it stops
  the run (:class:`PrepareStopped`, naming the record and the cause), and so does a cache file that cannot be
  written (no temporary left); finished shards are kept and a rerun resumes.

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

Integrity and freshness (format version 2):

* **Opening** compares each shard / derived file's stat with the one recorded when its sha256 was last checked
  and hashes only what changed (:class:`CorpusCache`); a damaged shard is an error naming it, a damaged
  ``index.jsonl`` / ``records.npy`` is rebuilt from the shard indexes (byte-identical, checked against the
  manifest) with a log line. ``prepare_corpus(..., verify=True)`` (``prepare ... verify=true``) hashes everything
  and converts damaged shards again.
* **Stale inputs.** A rerun checks the inputs (:func:`input_changes`): a record whose files changed gets its
  shard converted again; a changed label table relabels the records (labels, patient ids and metadata re-read,
  shard indexes rewritten atomically, signals untouched); records added or removed change the plan and are
  refused, naming them (:func:`ecgfm.data.prepare.prepare_cache` rebuilds its keyed caches instead). A source
  may define ``input_files(record_id)`` and ``label_files()``; otherwise the files sharing the stem of the
  record's ``header["path"]`` (for a WFDB header also the files it names: a ``.dat`` of another name, a
  multi-segment record's segments) and the ``*.csv`` tables of its ``root`` (and table-valued attributes such as
  ``labels_csv``) are used. Record files are compared by size + mtime, and a file whose size or mtime changed
  by its content: when its bytes are those it was converted from (a corpus copied without its times, touched,
  checked out or re-mounted), nothing is converted again and its new times are recorded (one hash per such file,
  once). A replacement with the same size and mtime is not seen, and ``verify=true`` does not see it either: it
  hashes the cache's own files, not the source records; rebuild into a new ``out=`` after replacing records with
  preserved times. Label tables are compared by sha256. The log names the first 10 changes
  (``PrepareReport.changes`` holds them all). The folders' mtimes and the label tables' fingerprints are taken
  before the record ids are listed, so a file added or a table edited while a preparation runs is a change for
  the next one. A record file that exists but could not be read at conversion (permission denied, I/O error) is
  recorded as ``unreadable`` and counts as changed once it can be read; ``verify=true`` also reads again every
  record skipped for an OS error. A skipped record also lists its own header (and what that header reads) when
  the file its reason names is another one, so a header fixed in place is seen.
* **Readers of a cache updated in place** (:class:`CorpusCache`): a shard converted again replaces its file under
  the same name; a reader opened before refuses, naming the file, to map the new file with its old offsets
  (reopen the cache to read the update).
* **Workers die with their parent** (:func:`die_with_parent`): a killed conversion leaves no process behind.
* **A worker that dies at start fails the run, never hangs it**: workers are spawned and read their arguments from
  a file (:func:`_worker_init_from_file`), so a script that calls :func:`prepare_corpus` with ``workers > 0``
  outside an ``if __name__ == "__main__":`` guard gets an error saying so.

Testing hook: the environment variable ``ECGFM_PREPARE_RECORD_DELAY`` (seconds) makes every conversion worker
sleep after each record, so tests can kill a conversion in the middle of a shard.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import csv
import errno
import functools
import hashlib
import importlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ecgfm.data.preprocess import PreprocessSpec, preprocess_record
from ecgfm.data.readers._scan import is_decodable
from ecgfm.data.record import CANONICAL_LEADS, N_LEADS, ECGDataError, ECGRecord, RecordSource, printable
from ecgfm.io import LockBusy, atomic_write, atomic_write_bytes, atomic_write_json, dumps, file_lock, fsync_dir, \
    jsonable, sha256_file

log = logging.getLogger(__name__)

FORMAT = "ecgfm-corpus-cache"
FORMAT_VERSION = 2               # 2: shard/file sizes, input fingerprints (inputs.json), plan skips in plan.json
VERIFIED_FILE = ".verified.json"
INPUTS_FILE = "inputs.json"
#: the folder snapshot (:func:`_dir_snapshot`) of the first call that converted shards since ``inputs.json`` was
#: last written; kept across interruptions so a resume compares the folders with the state the earlier shards saw
PENDING_DIRS_FILE = "inputs.pending.json"
LOCK_FILE = ".lock"
DTYPE = "<f4"
RECORDS_DTYPE = np.dtype([
    ("shard", "<i4"), ("offset", "<i8"), ("n_samples", "<i8"), ("n_leads", "u1"),
    ("lead_mask", "?", (N_LEADS,)), ("fs", "<f8"), ("patient", "<i8"),
])
DELAY_ENV = "ECGFM_PREPARE_RECORD_DELAY"
#: Upper bound on the shard memory maps a :class:`CorpusCache` keeps open by default (see its ``max_open_shards``);
#: the default is also at most a quarter of the process's open-file limit (:func:`default_max_open_shards`).
MAX_OPEN_SHARDS = 4096


def _recorded_sha256(manifest: Mapping[str, Any], rel: str) -> str | None:
    """The sha256 ``manifest`` records for cache file ``rel`` (a derived file or a shard's ``.bin``), or None."""
    files = manifest.get("files") or {}
    if rel in files:
        return str(files[rel])
    for entry in manifest.get("shards") or []:
        if entry.get("bin") == rel:
            return str(entry.get("bin_sha256"))
    return None


def default_max_open_shards() -> int:
    """:data:`MAX_OPEN_SHARDS`, or a quarter of this process's soft open-file limit when that is lower (at least
    16): each open shard map holds a file descriptor (Python's ``mmap`` keeps a duplicate), and DataLoader workers
    and torch's shared memory draw on the same limit (1,024 on many Linux hosts)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):   # pragma: no cover -- not POSIX
        return MAX_OPEN_SHARDS
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_OPEN_SHARDS
    return max(16, min(MAX_OPEN_SHARDS, int(soft) // 4))
_SHARD_FMT = "shard-{:05d}"
_SKIPPED_FIELDS = ("source", "record_id", "path", "reason")


# ----------------------------------------------------------------------------------------------- helpers


def patient_hash(source: str, patient_id: Any) -> int:
    """Stable non-negative int64 hash of ``source/patient_id``; ``-1`` when the patient is unknown.

    Unlike Python's ``hash`` it is the same in every process and run (blake2b of the UTF-8 key). Unknown: the
    markers the splits take as unknown (:func:`ecgfm.data.splits.is_unknown_patient`: None, NaN, ``""``, ``-1``,
    ``"-1"``, ``"nan"``, ``"None"``), so that CLOCS's patient-aware positives never pool every record of an
    unknown patient as one patient.
    """
    from ecgfm.data.splits import is_unknown_patient

    if is_unknown_patient(patient_id):
        return -1
    digest = hashlib.blake2b(f"{source}/{patient_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def record_patient_hash(source: str, patient_id: Any, meta: Mapping[str, Any] | None = None) -> int:
    """The patient hash of one cached record, one PTB-XL patient being one patient whichever corpus ships it.

    A PTB-XL record read by a source of another name (a PhysioNet 2021 ``HR`` record read with ``ptbxl_root``,
    which records ``meta["ptbxl_patient_id"]``) and a PTB-XL source of any ``ptbxl*`` name hash as
    ``ptbxl/<patient>``, the identity the leakage guard uses (:func:`ecgfm.evaluate.leakage.record_identities`);
    so the pretraining hold-out and CLOCS's patient-aware positives see a patient across such caches. Every other
    record: :func:`patient_hash` of its own source.
    """
    from ecgfm.data.splits import is_unknown_patient

    ptbxl_pid = (meta or {}).get("ptbxl_patient_id")
    if not is_unknown_patient(ptbxl_pid):
        return patient_hash("ptbxl", ptbxl_pid)
    return patient_hash("ptbxl" if str(source).lower().startswith("ptbxl") else source, patient_id)


def natural_key(text: str) -> tuple:
    """Sort key ordering embedded numbers numerically (``"2" < "10"``, ``"A2" < "A10"``); texts that differ only
    in leading zeros (``"1"`` / ``"01"``) are ordered by the text itself, so that sorting a set of them does not keep
    the set's iteration order (which changes from process to process with the string hash seed)."""
    text = str(text)
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t), text


def _tmp_name(final: Path) -> Path:
    """Temporary name of a file streamed by a worker (removed by :func:`_clean_temporaries` after a crash)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _stat_key(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns, ctime_ns, inode]``: changes whenever the file is rewritten, copied or touched (ctime
    cannot be set back by ``os.utime``), so an equal key means the bytes checked before are still there."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """``(inode, size, mtime_ns)`` of a stat: what tells a reader that a cache file it opened was replaced (a
    rerun of the preparation writes a re-converted shard under a new inode with the same name)."""
    return int(st.st_ino), int(st.st_size), int(st.st_mtime_ns)


def _file_stat(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns]`` of an input file (what the freshness check of record and label files compares)."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


#: hex characters kept of a record file's sha256 in the cache's input fingerprints (64 bits: enough to tell a
#: changed file from a copied or touched one; the fingerprints are read on every open, so they are kept short)
_INPUT_DIGEST_CHARS = 16


#: the digest recorded for a record file that could not be read when its record was converted (permission
#: denied, I/O error): such a file counts as changed as soon as it can be read (see :func:`_unreadable_fixed`)
UNREADABLE = "unreadable"


def _readable(path: str | os.PathLike) -> bool:
    """Whether ``path`` can be opened and read now (its first byte)."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except OSError:
        return False


def _unreadable_fixed(digest: Sequence[Any], path: str) -> bool:
    """Whether a record file recorded as :data:`UNREADABLE` (``digest``: what follows ``[size, mtime_ns]`` in its
    fingerprint) can be read now: a permission or I/O problem was fixed, which changes neither its size nor its
    mtime, so the stat comparison alone would never see it."""
    return list(digest[:1]) == [UNREADABLE] and _readable(path)


#: errno values of a read failure that may go away without the file changing (permissions fixed, a disk or a
#: network mount back): a record skipped for one is read again by ``verify=True``. A missing file is not among
#: them (it is a change of its folder when it comes back).
TRANSIENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                              errno.ESTALE, errno.ENXIO, errno.EHOSTDOWN, errno.ENOTCONN})


def _os_error_in(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from or while handling, an :class:`OSError` whose errno is in
    :data:`TRANSIENT_ERRNOS` (a reader's ``ECGDataError`` usually wraps the ``PermissionError`` / I/O error that
    made a record unreadable)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


_ERRNO_RE = re.compile(r"\[Errno (?:%s)\]|Permission denied|Input/output error"
                       % "|".join(str(n) for n in sorted(TRANSIENT_ERRNOS)))


#: errno values of a failure of the machine rather than of a record (no space left or a disk quota reached, too many
#: open files, out of memory): met while a record is read or converted, it stops the preparation
#: (:class:`PrepareStopped`) instead of skipping that record for good, as nothing about the record is wrong.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})
#: what a failed write of the cache's own files raises: resources, a file over the size limit, a read-only or
#: failing disk (:func:`_writing`)
WRITE_ERRNOS = RESOURCE_ERRNOS | frozenset({errno.EFBIG, errno.EROFS, errno.EIO})


class PrepareStopped(RuntimeError):
    """The preparation stopped for a reason of the machine, not of its inputs: memory, disk space or file handles
    ran out while a record was read or converted, or a cache file could not be written. The message names the
    cache folder (and the record), the cause and that a rerun of the same command resumes: finished shards are
    kept, nothing is recorded as skipped."""


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def _resource_error_in(exc: BaseException) -> BaseException | None:
    """The :class:`MemoryError` or :class:`OSError` with an errno of :data:`RESOURCE_ERRNOS` that ``exc`` is, or was
    raised from or while handling (a reader may wrap it in an ``ECGDataError``); None when there is none.

    A numpy allocation larger than this machine's physical memory (a damaged header announcing 10^12 samples) is
    the record's problem, not the machine's: not counted (the record is skipped with numpy's message)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, MemoryError):
            size, total = getattr(e, "_total_size", None), _physical_memory()
            if not (isinstance(size, int) and total and size > total):
                return e
        elif isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _describe_os_error(exc: BaseException) -> str:
    """``MemoryError (out of memory)`` / ``OSError: [Errno 28] No space left on device: 'file'``."""
    if isinstance(exc, MemoryError):
        text = str(exc)
        return f"MemoryError ({text})" if text else "MemoryError (out of memory)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _write_failure(out: Path, what: str, exc: BaseException) -> PrepareStopped:
    """The error of a cache file that could not be written (disk full, quota, a file too large, an I/O error)."""
    return PrepareStopped(f"{out}: could not write {what}: {_describe_os_error(exc)}; free space (or fix the "
                          f"folder) and rerun the same command to resume (finished shards are kept)")


@contextlib.contextmanager
def _writing(out: Path, what: str) -> Iterator[None]:
    """Turn an ``OSError`` (disk full, quota, file too large, I/O error) or ``MemoryError`` while the cache's own
    files are written into :func:`_write_failure` (one line, no traceback; atomic writes leave no temporary)."""
    try:
        yield
    except MemoryError as exc:
        raise _write_failure(out, what, exc) from None
    except OSError as exc:
        # only the failures of writing (a missing shard file read on the way is another problem, reported as is)
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise _write_failure(out, what, exc) from None


def _transient_skip(row: Mapping[str, Any]) -> bool:
    """Whether a skipped record failed with an OS error (permission denied, I/O error...) rather than bad data:
    flagged ``"transient"`` in its shard index, or (indexes written before the flag) its reason names one.
    ``verify=True`` reads such records again."""
    return bool(row.get("transient")) or bool(_ERRNO_RE.search(str(row.get("reason", ""))))


def _input_digest(path: str | os.PathLike) -> str:
    """Content fingerprint of a record file (the first :data:`_INPUT_DIGEST_CHARS` hex characters of its sha256)."""
    return sha256_file(path)[:_INPUT_DIGEST_CHARS]


def _content_unchanged(path: str, digest: str | None, restamped: dict[str, list[int]] | None = None,
                       size: int | None = None) -> bool:
    """Whether a record file whose size or mtime changed still holds the bytes it was converted from (a copy of
    the corpus, a ``touch``, a checkout or a re-mount with new times). ``False`` when no digest was recorded
    (caches written before digests) or the file is gone. A file found unchanged is added to ``restamped`` with
    its current ``[size, mtime_ns]``, so the cache can remember the new times and skip the hash next time."""
    if not digest or digest == UNREADABLE:
        return False
    try:
        now = _file_stat(path)
        same = (size is None or now[0] == size) and _input_digest(path) == digest   # a new size: changed, no hash
    except OSError:
        return False
    if same and restamped is not None:
        restamped[path] = now
    return same


class NonFiniteDataError(ECGDataError):
    """NaN or infinite values where a finite signal (or embedding) is required: a damaged cache shard, or an
    encoder that diverged. The message names the cache folder, the shard file and the record keys.

    Re-raised across a DataLoader worker, the exception is rebuilt from its formatted message (one argument);
    the original ``path: problem`` text is recovered from it so the error reads the same in the main process.
    """

    def __init__(self, path: Any, problem: str | None = None):
        if problem is None:
            text = str(path)
            tail = text.rsplit("NonFiniteDataError: ", 1)[-1].strip()
            path, _, problem = tail.partition(": ")
            if not problem:
                path, problem = "<loader>", tail
            problem = f"{problem} (raised in a DataLoader worker)" if "worker" in text else problem
        super().__init__(path, problem)


def _is_setting(value: Any) -> bool:
    """A plain setting: a scalar, a path, None, or a list / tuple / dict of them (no objects, whose ``str`` could
    hold a memory address and change the fingerprint on every run)."""
    if value is None or isinstance(value, (str, int, float, bool, Path)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_setting(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_setting(v) for k, v in value.items())
    return False


def describe_source(source: RecordSource) -> dict[str, Any]:
    """JSON description of a source for the manifest (and the plan fingerprint): name, type and its public
    settings, lists and dicts included (a changed ``leads`` / ``label_columns`` / ``fs_range`` changes the plan, so
    the cache is converted again instead of being returned as current); a wrapped source is described in turn, and
    a set of ids (a pool's excluded records) by its size and digest."""
    desc: dict[str, Any] = {"name": str(source.name),
                            "type": f"{type(source).__module__}.{type(source).__qualname__}"}
    for key, value in sorted(getattr(source, "__dict__", {}).items()):
        if key.startswith("_") or key == "name":
            continue
        if callable(getattr(value, "record_ids", None)) and callable(getattr(value, "load", None)):
            desc[key] = describe_source(value)
        elif isinstance(value, (set, frozenset)) and all(_is_setting(v) for v in value):
            ids = sorted(str(v) for v in value)
            desc[key] = {"n": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}
        elif _is_setting(value):
            desc[key] = jsonable(value)
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
        n_shards_repaired: shards whose bytes no longer matched their checksum (``verify=True``), re-converted.
        n_relabelled: records whose labels / metadata were re-read after a label table changed (their signals
            were kept).
        changes: what changed in the inputs since the cache was built (one line each), as logged.
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
    n_shards_repaired: int = 0
    n_relabelled: int = 0
    changes: list[str] = field(default_factory=list)

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
            f"(parent + workers, sampled), CPU {self.cpu_s:.1f} s ("
            + (f"{self.cpu_ms_per_record:.2f} ms per record, " if self.n_converted_now else "nothing converted now, ")
            + f"{self.cpu_s_workers:.1f} s in workers)",
        ]
        if self.n_shards_repaired:
            lines.append(f"repaired {self.n_shards_repaired} damaged shard(s) (checksum mismatch): re-converted")
        if self.changes:
            lines.append(f"inputs changed since the cache was built ({len(self.changes)}): "
                         f"{self.n_relabelled} records relabelled, changed shards re-converted")
            lines.extend(f"  {c}" for c in self.changes[:10])
        if self.skipped_reasons:
            lines.append("skipped (see skipped.csv):")
            ranked = sorted(self.skipped_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
            for reason, count in ranked[:_SUMMARY_REASONS]:
                lines.append(f"  {count:6d}  {reason}")
            rest = ranked[_SUMMARY_REASONS:]
            if rest:   # never dropped silently: the count of what is not listed (all of it is in skipped.csv)
                lines.append(f"  ... and {len(rest)} more reasons ({sum(c for _, c in rest)} records; see "
                             f"skipped.csv)")
        return "\n".join(lines)


#: reason categories listed one by one in :meth:`PrepareReport.summary` (the others are counted in one line)
_SUMMARY_REASONS = 15


def _cpu_times() -> tuple[float, float]:
    """``(user + system CPU seconds of this process, of its reaped child processes)``; NaN without ``resource``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan"), float("nan")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


#: a quoted name in a skip reason ('leadAx', "rec1"): an opening quote not preceded by a letter (so that the
#: apostrophe of "header's" is not one) up to the closing quote not followed by one
_QUOTED_RE = re.compile(r"""(?<![\w'"])'[^'\n]*'(?![\w'])|(?<![\w'"])"[^"\n]*"(?![\w"])""")
#: a path or file name in a skip reason: an absolute / ./ / ~/ path, or a name with a record or table suffix
#: (``rec.hea``, ``records100/00001_lr.dat``); "I/O error" and "e.g." are not
_FILE_SUFFIXES = "hea|dat|mat|atr|qrs|ecg|csv|tsv|json|xml|edf|bdf|npy|npz|txt|bin|h5|hdf5|zip|gz|xyz"
_PATH_RE = re.compile(r"(?<![\w/.~-])(?:/|~/|\.\.?/)[^\s'\",;:()\[\]]+"
                      r"|(?<![\w/.~-])(?:[\w.+~-]+/)*[\w+~-][\w.+~-]*\.(?:%s)\b" % _FILE_SUFFIXES, re.IGNORECASE)


def _reason_category(reason: str) -> str:
    """Collapse a skip reason into a summary category: quoted names become ``'*'``, paths and file names
    ``<file>`` and numbers ``#``, so that the same problem in many records (an unknown lead ``'leadAx'``, a header
    ``rec.hea`` of another length) counts as one category."""
    text = _QUOTED_RE.sub("'*'", str(reason))
    text = _PATH_RE.sub("<file>", text)
    text = re.sub(r"\d+(\.\d+)?", "#", text)
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
            if not is_decodable(key):
                skipped.append({"source": str(src.name), "record_id": printable(rid), "path": "",
                                "reason": "record id is not valid UTF-8 (undecodable bytes in a file name)"})
                continue
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
    h = hashlib.sha256(dumps(header).encode())
    for si, rid in items:
        h.update(f"{si}\x00{rid}\x01".encode())
    for row in skipped:
        h.update(dumps(row).encode())
    return _Plan(shards=shards, skipped=skipped, fingerprint=h.hexdigest(), header=header)


# ----------------------------------------------------------------------------------------------- inputs


def die_with_parent(parent_pid: int | None = None, interval: float = 0.25) -> None:
    """Make this (worker) process exit when its parent dies.

    Started in every conversion worker and every DataLoader worker (``worker_init_fn``): a daemon thread
    compares ``os.getppid()`` with the parent's pid every ``interval`` seconds and calls ``os._exit`` once the
    parent is gone (re-parented to init or a sub-reaper), so a SIGKILLed training or conversion never leaves
    workers behind. A watchdog thread rather than ``prctl(PR_SET_PDEATHSIG)``: the latter fires when the
    *thread* that started the worker exits, which would kill the workers of a loader iterated from a
    short-lived thread; the thread also works on every POSIX system. Costs one wake-up per ``interval``.

    Args:
        parent_pid: the pid to watch (default: the current parent).
        interval: seconds between checks.
    """
    expected = int(parent_pid) if parent_pid is not None else os.getppid()
    if os.getppid() != expected:      # the parent died before we got here
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != expected:
                os._exit(1)

    threading.Thread(target=watch, name="ecgfm-parent-watchdog", daemon=True).start()


_DIR_LISTINGS: dict[str, dict[str, list[str]]] = {}


def _siblings(path: str) -> list[str]:
    """Every file beside ``path`` that shares its stem (``x.hea`` -> ``x.atr``, ``x.dat``, ``x.hea``): the
    files one record was read from. One listing per folder and process (folders of 10k+ records)."""
    folder, name = os.path.split(path)
    listing = _DIR_LISTINGS.get(folder)
    if listing is None:
        listing = {}
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        listing.setdefault(entry.name.rsplit(".", 1)[0], []).append(entry.name)
        except OSError:
            pass
        for names in listing.values():
            names.sort()
        _DIR_LISTINGS[folder] = listing
    return [os.path.join(folder, n) for n in listing.get(name.rsplit(".", 1)[0], ())]


def _own_record_file(src: RecordSource, rid: str) -> str | None:
    """The file record ``rid`` of ``src`` is read from, as the source's index of its folder says: the sources
    reading a folder (:class:`~ecgfm.data.readers.folder.FolderSource`, the PhysioNet readers, PTB-XL) keep
    ``_files`` (record id -> path relative to ``root`` without its suffix) and ``_suffix`` (``.hea`` when absent).
    The suffix is matched case-insensitively (``REC.HEA``). None for other sources, or when the file is gone."""
    files, root = getattr(src, "_files", None), getattr(src, "root", None)
    if not isinstance(files, Mapping) or not isinstance(root, (str, os.PathLike)):
        return None
    rel = files.get(rid)
    if not isinstance(rel, str) or not rel:
        return None
    suffix = str(getattr(src, "_suffix", ".hea") or ".hea")
    base = os.path.abspath(os.path.join(str(root), rel))
    if os.path.isfile(base + suffix):
        return base + suffix
    for f in _siblings(base + suffix):
        if f.lower().endswith(suffix.lower()) and os.path.basename(f)[:-len(suffix)] == os.path.basename(base):
            return f
    return None


def _record_inputs(src: RecordSource, rid: str, path: Any, skipped: bool = False) -> list[list[Any]]:
    """``[[file, size, mtime_ns, digest], ...]`` of the files record ``rid`` is read from (``digest``:
    :func:`_input_digest`): ``src.input_files(rid)`` when the source defines it, else the files sharing the stem
    of ``path`` (the record's ``header["path"]``, or the file a skip reason names). Empty for sources without
    files (synthetic). About 10 us per record plus the hash (the file was just read, so it is in the page cache).
    Shard indexes written before digests hold ``[file, size, mtime_ns]``; a file that exists but cannot be read
    holds the digest :data:`UNREADABLE`.

    A ``skipped`` record also lists its own files (:func:`_own_record_file`: its header, and what the header
    reads): the file a skip reason names may be another one (a ``.dat`` of another name, a segment of a
    multi-segment record), and a header fixed in place must still show as a change, so that the record is read
    again."""
    files: list[str] | None = None
    fn = getattr(src, "input_files", None)
    if callable(fn):
        try:
            files = [os.path.abspath(f) for f in fn(rid)]
        except Exception:  # noqa: BLE001 - fall back to the generic rule
            files = None
    if files is None:
        paths = [str(path)] if path else []
        own = _own_record_file(src, rid) if skipped else None
        if own is not None and os.path.abspath(own) not in [os.path.abspath(p) for p in paths]:
            paths.append(own)
        files = []
        for p in paths:
            for f in _siblings(os.path.abspath(p)):
                if f not in files:
                    files.append(f)
            if p.lower().endswith(".hea"):   # and what the header reads that does not share its stem (segments)
                from ecgfm.data.readers.formats import header_input_files

                files += [f for f in header_input_files(p) if f not in files and os.path.isfile(f)]
    out = []
    for f in files:
        if not is_decodable(f):   # a name the UTF-8 index cannot hold (undecodable bytes): not fingerprinted
            continue
        try:
            before = _file_stat(f)
        except OSError:   # gone: a file that appears again shows as a change of its folder
            continue
        try:
            digest = _input_digest(f)
        except OSError:
            # there but unreadable (permission denied, I/O error): recorded as such, so that the record (skipped
            # now, or converted from the other files) is read again once the file can be read
            out.append([f, *before, UNREADABLE])
            continue
        try:
            after = _file_stat(f)
        except OSError:
            continue
        # a file rewritten while it was hashed: its digest may not match these times, so none is kept (a later
        # change of its times then counts as a change, as without digests)
        out.append([f, *after, digest] if after == before else [f, *after])
    return out


def _label_files(src: RecordSource) -> list[Path]:
    """The label / metadata tables of a source: ``src.label_files()`` when defined; else the files named by its
    public attributes with a table suffix (``labels_csv``) and the ``*.csv`` / ``*.tsv`` files directly in its
    ``root`` folder (``ptbxl_database.csv``, ``scp_statements.csv``, ``REFERENCE.csv``...)."""
    fn = getattr(src, "label_files", None)
    if callable(fn):
        return sorted({Path(p) for p in fn() if is_decodable(str(p))})
    found: set[Path] = set()
    for key, value in sorted(getattr(src, "__dict__", {}).items()):
        if key.startswith("_") or not isinstance(value, (str, os.PathLike)):
            continue
        p = Path(value)
        if p.suffix.lower() in (".csv", ".tsv", ".json") and p.is_file():
            found.add(p.resolve())
    root = getattr(src, "root", None)
    if isinstance(root, (str, os.PathLike)) and Path(root).is_dir():
        for entry in os.scandir(root):
            if entry.is_file() and Path(entry.name).suffix.lower() in (".csv", ".tsv"):
                found.add(Path(entry.path).resolve())
    return sorted(p for p in found if is_decodable(str(p)))


def _label_fingerprint(src: RecordSource) -> dict[str, Any]:
    """``{"files": {path: [size, mtime_ns, sha256]}, "fp": sha256 of the contents}`` of a source's label tables."""
    files = {}
    for p in _label_files(src):
        files[str(p)] = [*_file_stat(p), sha256_file(p)]
    fp = hashlib.sha256(dumps({k: v[2] for k, v in files.items()}).encode()).hexdigest()
    return {"files": files, "fp": fp}


def _source_dirs(src: RecordSource) -> list[str]:
    root = getattr(src, "root", None)
    if isinstance(root, (str, os.PathLike)) and Path(root).is_dir() and is_decodable(str(Path(root).resolve())):
        return [str(Path(root).resolve())]
    return []


def input_changes(out_dir: str | os.PathLike, limit: int | None = None,
                  restamped: dict[str, list[int]] | None = None) -> list[str]:
    """What changed in the inputs of a finished cache since it was built (stat first; a file is hashed only when
    its size or time changed). Empty when nothing did, or when the cache records no inputs (caches of synthetic
    sources); a cache written before format version 2 (no ``inputs.json``, so its inputs cannot be checked) gives
    one line saying so, so that :func:`ecgfm.data.prepare.prepare_cache` converts it again in the current format.

    Checks every record file (size + mtime; when they differ, its content against the digest recorded at
    conversion, so a corpus that was copied, touched or re-mounted with new times is not converted again),
    every label table (sha256) and the folders that held records, with every folder between them and their
    source's root (their mtime changes when a file or sub-folder is added, removed or renamed). Cost: one ``stat`` per input file plus reading ``inputs.json``: 0.1 s for the 9,114
    files of the shared PTB-XL + CinC 2017 cache (2 busy cores), plus one hash per file with new times.

    Args:
        out_dir: the cache folder.
        limit: stop after this many changes, counting the files found ``restamped`` too when that is given
            (None: all). With ``restamped`` and ``limit``, an empty list means "nothing changed among the files
            checked": a caller must also look at ``restamped`` (as :func:`ecgfm.data.prepare.prepare_cache` does).
        restamped: when given, receives ``{file: [size, mtime_ns]}`` of the record files with new times and
            unchanged content (not changes; :func:`prepare_corpus` records their new times in ``inputs.json``).
            This function only reads: until a preparation records the new times, every call hashes those files
            again.

    Returns:
        One line per change, naming the file or folder.
    """
    path = Path(out_dir) / INPUTS_FILE
    if not path.exists():
        try:
            version = int(_read_manifest(Path(out_dir)).get("format_version", FORMAT_VERSION))
        except (OSError, ECGDataError, TypeError, ValueError):
            return []
        if version < FORMAT_VERSION:
            return [f"{Path(out_dir)}: written in cache format version {version}, which records no input "
                    f"fingerprints (a changed record file cannot be seen): prepare it again to convert it in format "
                    f"version {FORMAT_VERSION}"]
        return []
    try:
        inputs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"{path}: unreadable, checking every shard"]
    changes: list[str] = []
    same: dict[str, list[int]] = {} if restamped is None else restamped

    def full() -> bool:   # restamped files count toward the limit only for a caller that asked for them
        return limit is not None and len(changes) + (len(same) if restamped is not None else 0) >= limit

    def add(line: str) -> bool:
        changes.append(line)
        return full()

    for f, (size, mtime, *digest) in inputs.get("records", {}).items():
        try:
            now = _file_stat(f)
        except OSError:
            if add(f"record file {f} was removed"):
                return changes
            continue
        if _unreadable_fixed(digest, f):
            if add(f"record file {f} could not be read when the cache was built and can be read now"):
                return changes
            continue
        if now != [size, mtime]:
            if _content_unchanged(f, digest[0] if digest else None, same, size):
                if full():
                    return changes
                continue
            if add(f"record file {f} changed (size {size} -> {now[0]}, modified {_when(now[1])})"):
                return changes
    for f, (size, mtime, digest) in inputs.get("labels", {}).items():
        try:
            now = _file_stat(f)
        except OSError:
            if add(f"label table {f} was removed"):
                return changes
            continue
        if sha256_file(f) != digest:   # always hashed (tables are small): an edit may keep its size and time
            if add(f"label table {f} changed (modified {_when(now[1])})"):
                return changes
    for d in _moved_dirs(inputs.get("dirs", {})):
        if add(f"folder {d} changed (a file was added, removed or renamed)"):
            return changes
    return changes


def _when(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime_ns / 1e9))


# ----------------------------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _worker_init(sources: Sequence[RecordSource], spec: PreprocessSpec, shards_dir: str, progress_queue: Any,
                 label_fps: Sequence[str] = (), parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        die_with_parent(parent_pid)
    _DIR_LISTINGS.clear()
    _WORKER.update(sources=list(sources), spec=spec, shards_dir=Path(shards_dir), queue=progress_queue,
                   label_fps=list(label_fps),
                   content_fp=_content_fingerprint(spec.to_dict(), [describe_source(s) for s in sources]))


def _worker_init_from_file(path: str, sha256: str, progress_queue: Any, parent_pid: int | None = None) -> None:
    """Pool initializer: :func:`_worker_init` with its arguments (sources, spec, shard folder, label
    fingerprints) read from the file the parent wrote for this pool, not sent through the spawn pipe.

    Why: CPython's spawn writes a new worker's start-up data into a pipe while the parent still holds that
    pipe's read end, so when the worker dies before reading it (a script that calls prepare_corpus outside an
    ``if __name__ == "__main__":`` guard is imported again by the worker and fails there) a payload larger than
    the pipe buffer (64 KiB: the record index of a few thousand records) blocks the parent forever. A small
    payload lets the pool see the dead worker and fail with a message instead.

    The file was written by this pool's parent a moment ago; its sha256 comes through the pipe and is checked
    before anything is unpickled, so a file swapped in the meantime is refused, never executed."""
    blob = Path(path).read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise RuntimeError(f"{path}: the conversion workers' argument file changed after it was written; refusing it")
    sources, spec, shards_dir, label_fps = pickle.loads(blob)
    _worker_init(sources, spec, shards_dir, progress_queue, label_fps, parent_pid)


def _error_path(exc: BaseException, src: RecordSource, rid: str) -> str:
    if isinstance(exc, ECGDataError):
        return exc.path
    return str(getattr(src, "root", ""))


def _shard_label_fps(items: Sequence[tuple[int, str]]) -> dict[str, str]:
    fps = _WORKER.get("label_fps") or []
    return {str(si): fps[si] for si in sorted({si for si, _ in items}) if si < len(fps)}


def _shard_job(shard_index: int, items: Sequence[tuple[int, str]], relabel: bool = False) -> dict[str, Any]:
    """One unit of pool work: convert a shard, or (``relabel``) re-read its labels only."""
    if relabel:
        done = _relabel_shard(shard_index, items)
        if done is not None:
            return done
    return _convert_shard(shard_index, items)


def _convert_shard(shard_index: int, items: Sequence[tuple[int, str]]) -> dict[str, Any]:
    """Convert one shard (runs in a worker, or in-process with ``workers=0``); returns its small summary.

    Raises:
        PrepareStopped: memory, disk space or file handles ran out while a record was read (the record is not
            skipped: nothing about it is wrong), or the shard could not be written; its temporary file is removed.
    """
    sources, spec, shards_dir = _WORKER["sources"], _WORKER["spec"], _WORKER["shards_dir"]
    name = _SHARD_FMT.format(shard_index)
    final_bin, final_json = shards_dir / f"{name}.bin", shards_dir / f"{name}.json"
    tmp_bin = _tmp_name(final_bin)
    try:
        records, skipped, digest, offset = _write_shard_records(tmp_bin, name, items)
        index = {"shard": name, "bin_bytes": offset, "bin_sha256": digest, "records": records,
                 "skipped": jsonable(skipped), "labels_fp": _shard_label_fps(items),
                 "content_fp": _WORKER["content_fp"]}
        os.replace(tmp_bin, final_bin)          # 1. the data ...
        fsync_dir(shards_dir)
        atomic_write_bytes(final_json, dumps(index, convert=False).encode())   # 2. ... then the commit marker
    except (OSError, MemoryError) as exc:
        # the shard's own files (not a record's: those failures are handled per record): no traceback, no
        # temporary file left behind; the finished shards stay
        tmp_bin.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno not in WRITE_ERRNOS:
            raise
        raise _write_failure(shards_dir.parent, f"shard {name}", exc) from None
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        raise
    return {"shard": shard_index, "n_records": len(records), "n_skipped": len(skipped), "relabelled": 0}


def _write_shard_records(tmp_bin: Path, name: str, items: Sequence[tuple[int, str]]
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, int]:
    """Read, convert and append the records of one shard to ``tmp_bin``; returns ``(records, skipped, sha256 of
    the bytes, number of bytes)``."""
    sources, spec, shards_dir, queue = (_WORKER["sources"], _WORKER["spec"], _WORKER["shards_dir"],
                                        _WORKER.get("queue"))
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
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
                inputs = _record_inputs(src, rid, rec.header.get("path"))
                rec = preprocess_record(rec, spec)
                rec.validate()
                meta, header = jsonable(rec.meta), jsonable(rec.header)
                header.pop("preprocessed", None)   # the cache's own spec, added back on read (CorpusCache.record)
                dumps(meta, convert=False), dumps(header, convert=False)  # fail here (skip the record)
                data = np.ascontiguousarray(rec.signal[rec.lead_mask], dtype=DTYPE)
            except Exception as exc:  # any failure of one record skips that record only ...
                cause = _resource_error_in(exc)
                if cause is not None:   # ... unless the machine ran out of memory, disk or file handles
                    raise PrepareStopped(
                        f"{shards_dir.parent}: stopped at record {src.name}/{rid} (shard {name}): "
                        f"{_describe_os_error(cause)}; this is a lack of memory, disk space or file handles, not "
                        f"a problem of the record, so it is not skipped: free the resource (or use fewer workers) "
                        f"and rerun the same command to resume (finished shards are kept)") from None
                kind = "" if isinstance(exc, ECGDataError) else f"{type(exc).__name__}: "
                problem = exc.problem if isinstance(exc, ECGDataError) else str(exc)
                path = _error_path(exc, src, rid)
                if not isinstance(exc, ECGDataError) and isinstance(exc, OSError) and exc.filename:
                    path = exc.filename   # the file that could not be read (not the source's root)
                row = {"source": str(src.name), "record_id": rid, "path": printable(str(path)),
                       "reason": printable(f"{kind}{problem}".replace("\n", " ")),
                       "inputs": _record_inputs(src, rid, path, skipped=True)}
                if _os_error_in(exc):   # permission denied, I/O error: may go away; verify=True retries it
                    row["transient"] = True
                skipped.append(row)
            else:
                buf = memoryview(data).cast("B")
                f.write(buf)
                h.update(buf)
                records.append({
                    "key": f"{src.name}/{rid}", "record_id": rid, "source": str(src.name),
                    "patient_id": None if rec.patient_id is None else str(rec.patient_id),
                    "labels": [str(x) for x in rec.labels], "fs": float(rec.fs),
                    "n_samples": int(rec.n_samples), "n_leads": int(data.shape[0]),
                    "lead_mask": [bool(m) for m in rec.lead_mask], "offset": offset,
                    "meta": meta, "header": header, "inputs": inputs,
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
    return records, skipped, h.hexdigest(), offset


def _relabel_shard(shard_index: int, items: Sequence[tuple[int, str]]) -> dict[str, Any] | None:
    """Re-read labels, patient ids and metadata of a finished shard whose label tables changed, keeping its
    signal file. Returns None when the shard must be converted again instead (it has skipped records, which the
    new labels may admit, or a record no longer loads)."""
    sources, shards_dir, queue = _WORKER["sources"], _WORKER["shards_dir"], _WORKER.get("queue")
    final_json = shards_dir / f"{_SHARD_FMT.format(shard_index)}.json"
    try:
        info = json.loads(final_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    records = info.get("records", [])
    if info.get("skipped") or len(records) != len(items):
        return None
    for (si, rid), r in zip(items, records):
        src = sources[si]
        if r.get("record_id") != rid or r.get("source") != str(src.name):
            return None
        try:
            rec = src.load(rid)
            meta = jsonable(rec.meta)
            dumps(meta, convert=False)
        except Exception:  # noqa: BLE001 - the record changed status: convert the shard again
            return None
        r.update(patient_id=None if rec.patient_id is None else str(rec.patient_id),
                 labels=[str(x) for x in rec.labels], meta=meta)
    info["labels_fp"] = _shard_label_fps(items)
    with _writing(shards_dir.parent, f"shard {final_json.stem}'s index"):
        atomic_write_bytes(final_json, dumps(info, convert=False).encode())
    if queue is not None:
        queue.put(len(items))
    return {"shard": shard_index, "n_records": len(records), "n_skipped": 0, "relabelled": len(records)}


# ----------------------------------------------------------------------------------------------- prepare


def _shard_info(shards_dir: Path, shard_index: int) -> dict[str, Any] | None:
    """The shard's index (commit marker) when the shard is finished (its ``.bin`` has the recorded size)."""
    name = _SHARD_FMT.format(shard_index)
    final_bin, final_json = shards_dir / f"{name}.bin", shards_dir / f"{name}.json"
    try:
        info = json.loads(final_json.read_text(encoding="utf-8"))
        size = final_bin.stat().st_size
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and size == int(info.get("bin_bytes", -1)) else None


def _shard_done(shards_dir: Path, shard_index: int) -> bool:
    return _shard_info(shards_dir, shard_index) is not None


def _clean_temporaries(out_dir: Path) -> None:
    for folder in (out_dir, out_dir / "shards"):
        if folder.is_dir():
            for pattern in (".*.tmp-*", ".*.tmp"):
                for p in folder.glob(pattern):
                    p.unlink(missing_ok=True)


def _content_fingerprint(spec: Mapping[str, Any], sources: Sequence[Mapping[str, Any]]) -> str:
    """What a shard's bytes depend on besides which records it holds: the format, the preprocessing and the
    sources' settings (``spec.to_dict()``, :func:`describe_source` of each). Written into each shard's index, so a
    shard is recognised as this preparation's even when plan.json and manifest.json are both lost."""
    doc = {"format_version": FORMAT_VERSION, "dtype": DTYPE, "spec": spec, "sources": list(sources)}
    return hashlib.sha256(dumps(jsonable(doc)).encode()).hexdigest()


def _manifest_plan(out: Path) -> dict[str, Any] | None:
    """The plan fields of a readable ``manifest.json`` (fingerprint, format version, spec, sources, shard size,
    duplicate rule, number of shards), or None: what the folder was prepared with when plan.json is lost."""
    try:
        manifest = _read_manifest(out)
    except (OSError, ECGDataError):
        return None
    if "plan_fingerprint" not in manifest:
        return None
    keys = ("plan_fingerprint", "format_version", "spec", "sources", "shard_records", "allow_duplicate_ids")
    return {**{k: manifest[k] for k in keys if k in manifest}, "n_shards": len(manifest["shards"])}


def _same_spec(a: Any, b: Any) -> bool:
    """Whether two stored spec dicts are one preprocessing (numbers compared by value: ``100 == 100.0``)."""
    try:
        return PreprocessSpec.from_dict(dict(a)) == PreprocessSpec.from_dict(dict(b))
    except (TypeError, ValueError):
        return False


def _old_format(old: Mapping[str, Any]) -> bool:
    """Whether a stored plan (plan.json, or :func:`_manifest_plan`) is of another cache format version than
    :data:`FORMAT_VERSION` (its shards lack what this version records, e.g. input fingerprints)."""
    if "format_version" not in old:   # not recorded (every plan.json and manifest.json ecgfm wrote records it)
        return False
    try:
        return int(old["format_version"]) != FORMAT_VERSION
    except (TypeError, ValueError):
        return True


def _plan_change_message(out: Path, old: dict[str, Any], plan: _Plan) -> str:
    """Why ``out`` cannot be resumed or reused with ``plan``: what differs, record ids added / removed."""
    what = [k for k in ("spec", "sources", "shard_records", "allow_duplicate_ids")
            if k in old and dumps(old[k]) != dumps(plan.header[k])]
    old_keys: set[str] = set()
    shards_dir = out / "shards"
    for i in range(int(old.get("n_shards", 0) or 0)):
        info = _shard_info(shards_dir, i)
        for r in (info or {}).get("records", []) + (info or {}).get("skipped", []):
            old_keys.add(f"{r['source']}/{r['record_id']}")
    names = {si: s.get("name") for si, s in enumerate(plan.header["sources"])}
    new_keys = {f"{names[si]}/{rid}" for shard in plan.shards for si, rid in shard}
    new_keys |= {f"{r['source']}/{r['record_id']}" for r in plan.skipped if r.get("record_id") != "*"}
    parts = []
    if _old_format(old):
        parts.append(f"it was written in cache format version {old.get('format_version', '?')}, this ecgfm "
                     f"writes version {FORMAT_VERSION} (with input fingerprints): it must be converted again")
    if what:
        parts.append(" and ".join(what) + " differ")
    if "spec" in what and _same_spec(old.get("spec"), plan.header["spec"]):
        parts.append("the two specs are equal but the cache's was written with whole numbers (e.g. fs 100, not "
                     "100.0) by ecgfm before 2026-12-06, which fingerprinted the two forms apart: its plan cannot "
                     "be matched")
    if old_keys:
        added, removed = sorted(new_keys - old_keys, key=natural_key), sorted(old_keys - new_keys, key=natural_key)
        if added:
            parts.append(f"{len(added)} record(s) added: {', '.join(added[:5])}{' ...' if len(added) > 5 else ''}")
        if removed:
            parts.append(f"{len(removed)} record(s) removed: {', '.join(removed[:5])}"
                         f"{' ...' if len(removed) > 5 else ''}")
    detail = "; ".join(parts) or "spec, sources, record ids or shard size differ"
    return (f"{out}: holds a different preparation ({detail}; plan {str(old.get('plan_fingerprint', '?'))[:12]} "
            f"vs {plan.fingerprint[:12]}); use a new directory or delete this one")


def _clear_cache_dir(out: Path) -> None:
    """Remove a cache's files (not its lock), manifest first so it is never readable half-deleted."""
    (out / "manifest.json").unlink(missing_ok=True)
    for p in sorted(out.iterdir()):
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    (out / "shards").mkdir(parents=True, exist_ok=True)


def prepare_corpus(sources: RecordSource | Sequence[RecordSource], out_dir: str | os.PathLike,
                   spec: PreprocessSpec | dict | None = None, shard_records: int | None = None, workers: int = 2,
                   progress: bool = True, allow_duplicate_ids: bool = False, verify: bool = False) -> PrepareReport:
    """Convert record sources into a sharded cache (resumable, atomic, deterministic; see the module docstring).

    A rerun on a finished cache checks its inputs (:func:`input_changes`): shards holding a record whose files
    changed are converted again, records whose label tables changed are relabelled (signals kept), each with
    a log line naming what changed; a changed set of record ids is refused (see Raises). It also hashes the
    cache files whose stat changed since they were last verified (:func:`stat_changes`) and converts damaged
    shards again / rebuilds damaged derived files; unreadable ``plan.json`` / ``manifest.json`` /
    ``inputs.json`` are written again (a finished shard is reused only if it holds exactly its planned records),
    and so is a ``manifest.json`` that disagrees with plan.json (a hand edit) or whose derived-file checksums
    the files rebuilt from the shard indexes do not match. A resume of an interrupted run compares the folders
    with their state when the interrupted run started (``inputs.pending.json``), so a record skipped for a
    missing file that was restored meanwhile is read again.

    Args:
        sources: one or more picklable :class:`~ecgfm.data.record.RecordSource` objects.
        out_dir: cache directory (created). Rerunning with the same arguments resumes an interrupted run, or
            returns at once when the cache is complete and its inputs unchanged.
        spec: preprocessing applied to every record (:class:`PreprocessSpec` or its dict; None: defaults).
        shard_records: records per shard (the unit of work, of resume and of one worker's memory); None:
            :func:`auto_shard_records` of the number of planned records (about 32 shards of 64-1024 records).
        workers: conversion worker processes (spawned); 0 converts in this process.
        progress: show a tqdm progress bar (records).
        allow_duplicate_ids: keep a ``record_id`` that another source already provided (as a distinct
            ``source/record_id`` key). Same-key duplicates are always skipped.
        verify: recompute the sha256 of every shard and derived file (reads every byte); damaged shards are
            converted again and damaged derived files rebuilt, each with a log line.

    Returns:
        A :class:`PrepareReport`.

    Raises:
        ValueError: bad arguments, or ``out_dir`` holds a different preparation (other spec / sources / shard
            size, records added to or removed from the sources, or another cache format version: the message
            names them).
        RuntimeError: another process is preparing ``out_dir`` (``another preparation is writing this
            cache``), or a worker process died (finished shards are kept: rerun to resume).
    """
    out = Path(out_dir)
    args = _check_prepare_args(sources, spec, shard_records, workers)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    with file_lock(out / LOCK_FILE, blocking=False, what=f"{out}: another preparation is writing this cache"):
        return _prepare_locked(*args, out, progress=progress, allow_duplicate_ids=allow_duplicate_ids,
                               verify=verify)


def _check_prepare_args(sources: Any, spec: Any, shard_records: Any, workers: Any
                        ) -> tuple[list[RecordSource], PreprocessSpec, int | None, int]:
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
    _check_source_names(sources)
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
    return sources, spec, shard_records, workers


def _source_place(src: RecordSource) -> str | None:
    """The folder a source reads (its ``root``, resolved), or None for a source without one (synthetic)."""
    root = getattr(src, "root", None)
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        return None
    return os.path.realpath(str(root))


def _source_where(src: RecordSource) -> str:
    """``FolderSource of /data/site_a``: a source's type and folder, for messages."""
    place = _source_place(src)
    return type(src).__name__ + (f" of {place}" if place else "")


def _check_source_names(sources: Sequence[RecordSource]) -> None:
    """Refuse two sources that share a ``name`` but are different datasets (another reader type, or another
    ``root`` folder): their records would be merged under one name (``name/record_id`` keys: a record id present
    in both skipped as a "duplicate key" although the recordings differ) and their patient ids hashed into one
    patient space (patient 1 of site A = patient 1 of site B, a leak across train/validation splits). The same
    dataset listed twice (same type and root) keeps its same-key duplicates skipped.

    Raises:
        ValueError: naming both sources and how to name them apart.
    """
    first: dict[str, int] = {}
    for i, src in enumerate(sources):
        name = str(src.name)
        j = first.setdefault(name, i)
        if j == i:
            continue
        other = sources[j]
        if type(other) is type(src) and _source_place(other) == _source_place(src):
            continue
        raise ValueError(
            f"sources #{j} ({_source_where(other)}) and #{i} ({_source_where(src)}) are both named {name!r}: their "
            f"records would be merged under one name (a record id in both skipped as a duplicate) and their "
            f"patient ids mixed into one patient space; give each source its own name: in Python "
            f"FolderSource(root, name='site_b'), "
            f"in a prepare config the preset's name key (folder.name=site_a, and a second preset such as "
            f"'+site_b={{type: folder, root: ..., name: site_b}}' with sources=[folder,site_b])")


def _prepare_locked(sources: list[RecordSource], spec: PreprocessSpec, shard_records: int | None, workers: int,
                    out: Path, progress: bool = True, allow_duplicate_ids: bool = False, verify: bool = False,
                    rebuild_on_plan_change: bool = False) -> PrepareReport:
    """:func:`prepare_corpus` once the caller holds ``out/.lock`` (``rebuild_on_plan_change``: start again
    instead of refusing when the record ids changed; what :func:`ecgfm.data.prepare.prepare_cache` does)."""
    t0 = time.perf_counter()
    cpu0 = _cpu_times()
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    peak = [_rss_tree_mb()]
    # the state of the inputs BEFORE the record ids are listed: a record file added (or a label table edited)
    # while this call runs then shows as a change on the next check, never as the state the cache was built from
    dirs_before = _dir_snapshot(out, sources)
    label_info = [_label_fingerprint(s) for s in sources]
    label_fps = [li["fp"] for li in label_info]
    plan = _make_plan(sources, spec, shard_records, allow_duplicate_ids)
    plan_doc = dict(plan.header, plan_fingerprint=plan.fingerprint, skipped=plan.skipped)
    plan_path = out / "plan.json"
    changes: list[str] = []
    old: dict[str, Any] | None = None     # the preparation the folder's files were made by, where it is known
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
            if not isinstance(old, dict) or "plan_fingerprint" not in old:
                raise ValueError("no plan fingerprint")
        except (OSError, ValueError) as exc:
            # derived from the arguments: rewritten; what the shards were made by is then read from the manifest
            log.warning("%s: unreadable (%s): written again", plan_path, exc)
            plan_path.unlink()
            old = None
    if old is None:
        old = _manifest_plan(out)   # plan.json lost: the manifest names the same spec, sources and fingerprint
        if old is None and any(shards_dir.glob("shard-*.json")):
            # neither says what the finished shards were made by: only shards that name this plan's spec and
            # sources (their content fingerprint) are kept below
            log.warning("%s: no plan.json or manifest.json: finished shards are kept only where they record this "
                        "preparation's spec and sources", out)
    if old is not None:
        if old.get("plan_fingerprint") != plan.fingerprint:
            message = _plan_change_message(out, old, plan)
            if not rebuild_on_plan_change:
                raise ValueError(message)
            changes.append(message.split("; use a new directory")[0])
            # a cache of another format version is converted again in full: its shards lack the input
            # fingerprints (and content fingerprint) this version checks, so reused they would never be seen stale
            if not _old_format(old) and all(dumps(old.get(k)) == dumps(plan.header[k])
                                            for k in ("spec", "sources", "allow_duplicate_ids")):
                # only the record ids changed: finished shards that still hold exactly their planned records
                # are kept (checked below), the others converted again
                log.warning("%s: updating it (shards whose records did not change are kept)", changes[-1])
                (out / "manifest.json").unlink(missing_ok=True)
                plan_path.unlink(missing_ok=True)
                for extra in shards_dir.glob("shard-*.*"):
                    if int(extra.name[6:11]) >= len(plan.shards):
                        extra.unlink()
            else:
                log.warning("%s: rebuilding it", changes[-1])
                _clear_cache_dir(out)
    if not plan_path.exists():
        with _writing(out, "plan.json"):
            atomic_write_json(plan_path, plan_doc)
    _clean_temporaries(out)

    n_shards = len(plan.shards)
    manifest_path = out / "manifest.json"
    names = [str(src.name) for src in sources]
    content = _content_fingerprint(plan.header["spec"], plan.header["sources"])
    # per finished shard only what the checks below need (not its index: ~8 KB a record, all of them held at
    # once would grow with the corpus); a shard's index is read again, one at a time, when its inputs are checked
    infos: dict[int, dict[str, Any] | None] = {}
    for i in range(n_shards):   # a finished shard must hold exactly the records the plan gives it
        info = _shard_info(shards_dir, i)
        held = {(r.get("source"), r.get("record_id")) for r in info.get("records", []) + info.get("skipped", [])} \
            if info is not None else None
        infos[i] = None if info is None else {k: info.get(k) for k in ("bin_sha256", "labels_fp")}
        if held is not None and held != {(names[si], rid) for si, rid in plan.shards[i]}:
            log.warning("%s: shard %s holds other records than planned: converting it again", out,
                        _SHARD_FMT.format(i))
            infos[i] = None
        elif info is not None and old is None and info.get("content_fp") != content:
            log.warning("%s: shard %s does not record this preparation's spec and sources: converting it again",
                        out, _SHARD_FMT.format(i))
            infos[i] = None
        del info, held
    todo = [i for i in range(n_shards) if infos[i] is None]
    relabel: list[int] = []
    repaired = 0
    manifest: dict[str, Any] = {}
    if manifest_path.exists():
        try:
            manifest = _read_manifest(out)
        except ECGDataError as exc:
            log.warning("%s; writing it again", exc)
            manifest_path.unlink()
        else:
            # no checksum covers the manifest: one that disagrees with this plan (a hand edit) is written again
            problem = _manifest_mismatch(manifest, plan_doc)
            if problem:
                log.warning("%s: %s: writing it again from plan.json and the shard indexes", manifest_path, problem)
                manifest_path.unlink()
                manifest = {}
    # files whose stat changed since their checksum was last verified (a copy, a touch, an in-place write)
    suspect = set(stat_changes(out, manifest)) if manifest else set()
    hashed_ok: set[str] = set()
    restamped: dict[str, list[int]] = {}    # record files with new times and the bytes they were converted from
    quick = input_changes(out, restamped=restamped) if manifest and not todo else ["(no manifest)"]
    if quick or verify or suspect:
        known = _recorded_inputs(out)
        # folders with a file added, removed or renamed since inputs.json was written, or since the first call of
        # an interrupted preparation started (its shards saw the folders as they were then: a file restored
        # before the resume must be read again, as an uninterrupted run would have)
        moved = _changed_dirs(out) | _changed_dirs(out, PENDING_DIRS_FILE)
        index_shas = {sh["index"]: sh.get("index_sha256") for sh in manifest.get("shards", [])}
        for i in range(n_shards):
            if infos[i] is None:
                continue
            info = _shard_info(shards_dir, i)   # read again, one shard at a time (see above)
            if info is None:   # gone since (not expected: this call holds the lock)
                infos[i] = None
                todo.append(i)
                continue
            name = _SHARD_FMT.format(i)
            stale = [f for r in info.get("records", []) + info.get("skipped", []) for f in r.get("inputs", [])
                     if not _input_unchanged(f, known, restamped)]
            # a record skipped for a missing file lists only the files it had: one restored since shows as a
            # changed folder, and that record is read again (else it would stay skipped, the change then forgotten)
            retry = [r for r in info.get("skipped", []) if moved and
                     any(str(Path(f[0]).parent) in moved for f in r.get("inputs", []))]
            # verify=True also reads again the records skipped for an OS error (permission denied, I/O error):
            # the problem may be gone without any file of the record changing
            transient = [r for r in info.get("skipped", []) if verify and r not in retry and _transient_skip(r)]
            if stale or retry or transient:
                changes.extend(f"record file {f[0]} could not be read when converted and can be read now (shard "
                               f"{name})" if list(f[3:4]) == [UNREADABLE] else
                               f"record file {f[0]} changed or removed (shard {name})" for f in stale)
                changes.extend(f"skipped record {r.get('source')}/{r.get('record_id')}: its folder changed, "
                               f"reading it again (shard {name})" for r in retry)
                changes.extend(f"skipped record {r.get('source')}/{r.get('record_id')} failed with an OS error "
                               f"({str(r.get('reason', ''))[:120]}): reading it again (verify, shard {name})"
                               for r in transient)
                todo.append(i)
                continue
            rel_bin, rel_json = f"shards/{name}.bin", f"shards/{name}.json"
            if verify or {rel_bin, rel_json} & suspect:
                bad_json = rel_json in index_shas and sha256_file(out / rel_json) != index_shas[rel_json]
                if bad_json or sha256_file(out / rel_bin) != info.get("bin_sha256"):
                    log.warning("%s: shard %s is damaged (checksum mismatch): converting it again", out, name)
                    repaired += 1
                    todo.append(i)
                    continue
                hashed_ok.update((rel_bin, rel_json))
            old_fps = info.get("labels_fp")
            if old_fps is not None and old_fps != {str(si): label_fps[si] for si in map(int, old_fps)}:
                relabel.append(i)
        if relabel:
            now = {f for li in label_info for f in li["files"]}
            changed = [f for f in sorted(now) if not _label_unchanged(out, f)]
            changes.extend(f"label table {f} changed" for f in (changed or ["(label tables)"]))
    todo = sorted(set(todo))
    relabel = [i for i in relabel if i not in todo]
    lines = list(dict.fromkeys(changes))
    for line in lines[:_LOGGED_CHANGES]:
        log.warning("%s: %s", out, line)
    if len(lines) > _LOGGED_CHANGES:
        log.warning("%s: ... and %d more changed inputs (%d in all)", out, len(lines) - _LOGGED_CHANGES, len(lines))
    if restamped:
        log.info("%s: %d record file(s) have new times but the bytes they were converted from (a copy, a touch or "
                 "a re-mount): kept, their times recorded", out, len(restamped))
    if (todo or relabel) and manifest_path.exists():
        manifest_path.unlink()        # unreadable until consistent again: nobody trains on a half-updated cache
    for i in todo:
        (shards_dir / f"{_SHARD_FMT.format(i)}.json").unlink(missing_ok=True)

    n_todo_records = sum(len(plan.shards[i]) for i in todo + relabel)
    bar = None
    if progress and (todo or relabel):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo_records, unit="rec", desc=f"prepare {out.name}", dynamic_ncols=True)
    results: list[dict[str, Any]] = []
    try:
        jobs = [(i, False) for i in todo] + [(i, True) for i in relabel]
        if jobs and not (out / PENDING_DIRS_FILE).exists():
            # the folders as this call found them, kept until inputs.json is written: an interrupted run's shards
            # were converted against this state, which a resume compares the folders with (the oldest one wins);
            # a folder whose name is not valid UTF-8 holds no planned record (and cannot be written as JSON)
            with _writing(out, PENDING_DIRS_FILE):
                atomic_write_json(out / PENDING_DIRS_FILE, {"dirs": {d: m for d, m in dirs_before.items()
                                                                     if is_decodable(d)}}, indent=None)
        if jobs:
            results = _run_shards(plan, jobs, sources, spec, shards_dir, workers, bar, peak, label_fps)
    finally:
        if bar is not None:
            bar.close()
    peak.append(_rss_tree_mb())
    # files whose bytes this call wrote or hashed: their stats are recorded so opening the cache costs stats only
    fresh = {f"shards/{_SHARD_FMT.format(int(r['shard']))}.{ext}" for r in results for ext in ("bin", "json")}
    fresh |= hashed_ok
    with _writing(out, "the cache's index files (index.jsonl, records.npy, skipped.csv, inputs.json, "
                       "manifest.json)"):
        if not manifest_path.exists():
            _finalize(out, plan, plan_doc, label_info, sources, restamped, dirs_before)
            fresh.update(("index.jsonl", "records.npy", "skipped.csv"))
        else:
            derived = None if verify else suspect & {"index.jsonl", "records.npy", "skipped.csv"}
            if derived is None or derived:
                try:
                    _verify_derived(out, derived)
                except ECGDataError as exc:
                    # rebuilt from the shard indexes, a derived file still differs from the manifest's checksum:
                    # the manifest is what is wrong, unless a shard index itself is damaged with an unchanged stat
                    # (bit rot): then a manifest written from it would vouch for the damage, so it is refused
                    damaged = [rel for rel, (digest, _, kind) in _expected_files(manifest).items()
                               if kind == "shard" and (not (out / rel).is_file() or sha256_file(out / rel) != digest)]
                    if damaged:
                        raise ECGDataError(out / damaged[0], f"differs from its checksum in manifest.json ({exc}); "
                                                             f"repair the shards with verify=true (the same "
                                                             f"command), or prepare the cache again") from None
                    log.warning("%s; writing manifest.json again from plan.json and the shard indexes", exc)
                    manifest_path.unlink()
                    _finalize(out, plan, plan_doc, label_info, sources, restamped, dirs_before)
                    derived = None
                fresh.update(derived or ("index.jsonl", "records.npy", "skipped.csv"))
            if quick or restamped or not (out / INPUTS_FILE).exists():
                # nothing to redo (e.g. a folder's mtime changed, or files got new times but kept their bytes), or
                # a cache from before input fingerprints: remember the inputs as they are now
                _write_inputs(out, plan, label_info, sources, restamped, dirs_before)
        manifest = _read_manifest(out)
        if fresh:
            _record_verified(out, {rel: out / rel for rel in sorted(fresh)})

    cpu1 = _cpu_times()   # the worker pool has been joined (reaped) by now, so RUSAGE_CHILDREN holds its CPU
    counts = manifest["counts"]
    reasons: collections.Counter[str] = collections.Counter()
    with open(out / "skipped.csv", newline="") as f:
        for row in csv.DictReader(f):
            reasons[_reason_category(row["reason"])] += 1
    relabelled = sum(int(r.get("relabelled", 0)) for r in results)
    converted_now = sum(len(plan.shards[int(r["shard"])]) for r in results if not r.get("relabelled"))
    return PrepareReport(
        out_dir=str(out), n_planned=int(plan.header["n_planned"]),
        n_converted=int(counts["converted"]), n_skipped=int(counts["skipped"]), n_shards=n_shards,
        n_shards_reused=n_shards - len(todo), n_converted_now=converted_now, skipped_reasons=dict(reasons),
        wall_s=time.perf_counter() - t0, peak_rss_mb=max((p for p in peak if p == p), default=float("nan")),
        workers=workers, cpu_s=(cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]), cpu_s_workers=cpu1[1] - cpu0[1],
        n_shards_repaired=repaired, n_relabelled=relabelled, changes=list(dict.fromkeys(changes)))


#: changed inputs named one by one in the log (all of them are in the report's ``changes``)
_LOGGED_CHANGES = 10


def _moved_dirs(dirs: Mapping[str, int]) -> list[str]:
    """The folders of ``{folder: mtime_ns}`` (``inputs.json``'s ``dirs``) whose modification time changed (a file
    added, removed or renamed), or that are gone."""
    out = []
    for d, mtime in dirs.items():
        try:
            now = os.stat(d).st_mtime_ns
        except OSError:
            now = None
        if now != mtime:
            out.append(d)
    return out


def _changed_dirs(out: Path, name: str = INPUTS_FILE) -> set[str]:
    """:func:`_moved_dirs` of the cache's ``inputs.json`` (or of ``name``: :data:`PENDING_DIRS_FILE`; empty when
    missing or unreadable)."""
    try:
        dirs = dict(json.loads((out / name).read_text(encoding="utf-8")).get("dirs", {}))
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(Path(d)) for d in _moved_dirs(dirs)}


def _recorded_inputs(out: Path) -> dict[str, list[Any]]:
    """The record files of ``inputs.json`` (``{file: [size, mtime_ns(, digest)]}``); empty when unreadable."""
    try:
        return dict(json.loads((out / INPUTS_FILE).read_text(encoding="utf-8")).get("records", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _input_unchanged(entry: Sequence[Any], known: Mapping[str, Sequence[Any]],
                     restamped: dict[str, list[int]]) -> bool:
    """Whether a shard index's input ``[file, size, mtime_ns(, digest)]`` still holds what was converted: same
    stat; or the times ``inputs.json`` (``known``) or this run (``restamped``) recorded after verifying the same
    digest; or, hashed now, the same content (then added to ``restamped``)."""
    f, size, mtime, *digest = entry
    now = _stat_or_none(f)
    if now is None:
        return False
    if _unreadable_fixed(digest, f):   # a permission / I/O problem fixed: its stat may not have changed
        return False
    if now == [size, mtime]:
        return True
    d = digest[0] if digest else None
    if d == UNREADABLE:
        return False
    old = known.get(f)
    if d and (restamped.get(f) == now or (old is not None and list(old[:2]) == now and old[2:3] == [d])):
        return True
    return _content_unchanged(f, d, restamped, size)


def _stat_or_none(path: str) -> list[int] | None:
    try:
        return _file_stat(path)
    except OSError:
        return None


def _label_unchanged(out: Path, path: str) -> bool:
    try:
        old = json.loads((out / INPUTS_FILE).read_text(encoding="utf-8"))["labels"].get(path)
    except (OSError, ValueError, KeyError):
        return False
    return old is not None and sha256_file(path) == old[2]


def _run_shards(plan: _Plan, jobs: list[tuple[int, bool]], sources: list[RecordSource], spec: PreprocessSpec,
                shards_dir: Path, workers: int, bar: Any, peak: list[float],
                label_fps: Sequence[str]) -> list[dict[str, Any]]:
    """Run ``(shard, relabel)`` jobs in-process or in a spawned worker pool; returns the job summaries."""
    results: list[dict[str, Any]] = []
    if workers == 0:
        _worker_init(sources, spec, str(shards_dir), None, label_fps)
        try:
            for i, relabel in jobs:
                results.append(_shard_job(i, plan.shards[i], relabel))
                if bar is not None:
                    bar.update(len(plan.shards[i]))
                peak.append(_rss_tree_mb())
        finally:
            _WORKER.clear()
        return results
    ctx = mp.get_context("spawn")   # spawn: safe with threads/torch in the parent, same on every OS
    queue = ctx.Queue()
    n_workers = min(workers, len(jobs))
    pending_items = list(jobs)
    running: dict[cf.Future, int] = {}
    last_sample = 0.0
    # the workers' arguments go through a file (see _worker_init_from_file); ".*.tmp": _clean_temporaries
    # removes it if this process is killed
    init_file = shards_dir.parent / f".workers.{os.getpid()}.tmp"
    init_sha = atomic_write_bytes(init_file, pickle.dumps((list(sources), spec, str(shards_dir), list(label_fps)),
                                                          protocol=pickle.HIGHEST_PROTOCOL))
    try:
        with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_worker_init_from_file,
                                    initargs=(str(init_file), init_sha, queue, os.getpid())) as pool:
            try:
                while pending_items or running:
                    # Keep at most 2 shards per worker queued: the parent never holds the whole plan in flight.
                    while pending_items and len(running) < 2 * n_workers:
                        i, relabel = pending_items.pop(0)
                        running[pool.submit(_shard_job, i, plan.shards[i], relabel)] = i
                    done, _ = cf.wait(list(running), timeout=0.25, return_when=cf.FIRST_COMPLETED)
                    _drain(queue, bar)
                    now = time.perf_counter()
                    if now - last_sample > 0.25:
                        peak.append(_rss_tree_mb())
                        last_sample = now
                    for fut in done:
                        i = running.pop(fut)
                        try:
                            results.append(fut.result())
                        except cf.process.BrokenProcessPool as exc:
                            hint = "" if results else (
                                " (No shard finished: workers may have died at start. Workers are spawned and "
                                "import the calling script again, so a script must call prepare_corpus with "
                                "workers > 0 under `if __name__ == '__main__':`, or use workers=0.)")
                            raise RuntimeError(
                                f"{shards_dir.parent}: a conversion worker died while converting shard {i} ({exc}); "
                                f"finished shards are kept, rerun the same command to resume.{hint}") from exc
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
            finally:
                _drain(queue, bar)
    finally:   # after the pool has joined its workers: a late one may still be reading it
        init_file.unlink(missing_ok=True)
    queue.close()
    return results


def _drain(queue: Any, bar: Any) -> None:
    import queue as queue_mod

    while True:
        try:
            n = queue.get_nowait()
        except (queue_mod.Empty, OSError, ValueError):
            return
        if bar is not None:
            bar.update(n)


def _merge_shards(out: Path, shard_names: Sequence[str]) -> dict[str, Any]:
    """Merge the shard indexes into ``index.jsonl`` + ``records.npy`` (atomically); returns what the manifest
    needs: shard entries, the shard-level skips, per-source counts, rates and the two files' sha256. A pure
    function of the shard indexes, so a rebuilt file has the checksum the manifest recorded.

    Streamed: one shard index is parsed at a time; its rows of ``records.npy`` (49 bytes a record) and its lines
    of ``index.jsonl`` go to temporary files at once, and only small facts are kept per shard (its manifest entry,
    the ``source``/``record_id``/``path``/``reason`` of its skipped records), so peak memory is one shard index,
    whatever the size of the corpus. ``records.npy`` is then its ``.npy`` header (for the final row count)
    followed by the rows: the same bytes as a table filled in memory.
    """
    shards_dir = out / "shards"
    records_path = out / "records.npy"
    index_path = out / "index.jsonl"
    rows_tmp, lines_tmp = _tmp_name(out / "records.npy.rows"), _tmp_name(out / "index.jsonl.lines")
    skipped_rows: list[dict[str, Any]] = []
    by_source: dict[str, dict[str, int]] = {}
    fs_values: set[float] = set()
    shard_infos = []
    h_index = hashlib.sha256()
    n_total = 0
    index_keys = ("record_id", "source", "patient_id", "labels", "fs", "n_samples", "lead_mask", "meta", "header")
    try:
        with open(rows_tmp, "wb") as frows, open(lines_tmp, "w", encoding="utf-8", newline="\n") as fidx:
            for i, name in enumerate(shard_names):
                json_bytes = (shards_dir / f"{name}.json").read_bytes()
                info = json.loads(json_bytes)
                records = info["records"]
                table = np.zeros(len(records), dtype=RECORDS_DTYPE)
                for k, r in enumerate(records):
                    table[k] = (i, r["offset"], r["n_samples"], r["n_leads"], np.array(r["lead_mask"], dtype=bool),
                                r["fs"], record_patient_hash(r["source"], r["patient_id"], r.get("meta")))
                    line = dumps({key: r[key] for key in index_keys}, convert=False) + "\n"
                    fidx.write(line)
                    h_index.update(line.encode())
                    fs_values.add(float(r["fs"]))
                    by_source.setdefault(r["source"], {"converted": 0, "skipped": 0})["converted"] += 1
                frows.write(table.tobytes())
                n_total += len(records)
                # only what skipped.csv and the counts read (a skipped record's input fingerprints are not kept)
                skipped_rows.extend({key: row[key] for key in _SKIPPED_FIELDS if key in row}
                                    for row in info["skipped"])
                shard_infos.append({"name": name, "bin": f"shards/{name}.bin", "index": f"shards/{name}.json",
                                    "n_records": len(records), "n_skipped": len(info["skipped"]),
                                    "bin_bytes": int(info["bin_bytes"]), "bin_sha256": info["bin_sha256"],
                                    "index_bytes": len(json_bytes),
                                    "index_sha256": hashlib.sha256(json_bytes).hexdigest()})
                del info, records, table, json_bytes

        def write_records(tmp: str) -> None:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=RECORDS_DTYPE, shape=(n_total,))
            del arr   # the header for n_total rows (the data part is left as a hole, filled below)
            header = os.path.getsize(tmp) - n_total * RECORDS_DTYPE.itemsize
            with open(tmp, "r+b") as fout, open(rows_tmp, "rb") as fin:
                fout.seek(header)
                shutil.copyfileobj(fin, fout, 1 << 20)

        atomic_write(records_path, write_records)
        atomic_write(index_path, lambda tmp: os.replace(lines_tmp, tmp))
    finally:
        for p in (rows_tmp, lines_tmp):
            p.unlink(missing_ok=True)
    return {"n_total": n_total, "shards": shard_infos, "skipped": skipped_rows, "by_source": by_source,
            "fs_values": fs_values, "index_sha256": h_index.hexdigest(), "records_sha256": sha256_file(records_path)}


def _skipped_csv(rows: Sequence[Mapping[str, Any]]) -> bytes:
    rows = sorted(rows, key=lambda r: (r["source"], natural_key(r["record_id"]), r["reason"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_SKIPPED_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in _SKIPPED_FIELDS})
    return buf.getvalue().encode()


def _dir_snapshot(out: Path, sources: Sequence[RecordSource]) -> dict[str, int | None]:
    """``{folder: mtime_ns or None (missing)}`` of the folders that may hold records, taken before the record ids
    are listed: every folder under each source's ``root`` (directories only, one ``scandir`` per folder, no
    ``stat`` per file) and the folders the previous ``inputs.json`` recorded. :func:`_write_inputs` stores these
    values, so a file added to, removed from or renamed in one of them while the cache is being built changes its
    mtime after the recorded one, and the next check (:func:`input_changes`) sees it. Cost: 0.2 s (warm) to 1.0 s
    (first walk) for 400k files in 421 folders on the 2-core development machine, i.e. ~1-5 s per 1 M records."""
    snap: dict[str, int | None] = {}

    def add(d: str) -> None:
        if d not in snap:
            try:
                snap[d] = os.stat(d).st_mtime_ns
            except OSError:
                snap[d] = None

    try:
        previous = dict(json.loads((out / INPUTS_FILE).read_text(encoding="utf-8")).get("dirs", {}))
    except (OSError, ValueError, AttributeError):
        previous = {}
    for d in previous:
        add(str(d))
    for src in sources:
        root = getattr(src, "root", None)
        if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
            continue
        tops = dict.fromkeys((os.path.abspath(root), str(Path(root).resolve())))   # symlinked roots: both spellings
        for top in tops:
            add(top)
            for folder, subdirs, _ in os.walk(top):
                for sub in subdirs:
                    add(os.path.join(folder, sub))
    return snap


def _write_inputs(out: Path, plan: _Plan, label_info: Sequence[Mapping[str, Any]],
                  sources: Sequence[RecordSource], restamped: Mapping[str, list[int]] | None = None,
                  dirs_before: Mapping[str, int | None] | None = None) -> None:
    """``inputs.json``: the record files, label tables and folders the cache was built from (what
    :func:`input_changes` compares against). A record file's ``[size, mtime_ns, digest]`` comes from its
    shard index, unless its content was verified under newer times: ``restamped`` (this run) or the previous
    ``inputs.json`` (an earlier run; same digest). ``label_info`` is the label tables' fingerprint taken before
    the record ids were listed; a folder's mtime is the one of ``dirs_before`` (:func:`_dir_snapshot`, also taken
    before) where it has one, else its mtime now (a folder outside every source root)."""
    previous = _recorded_inputs(out)
    records: dict[str, list[Any]] = {}
    dirs: set[str] = set()
    for i in range(len(plan.shards)):
        info = _shard_info(out / "shards", i) or {}
        for r in info.get("records", []) + info.get("skipped", []):
            for f, size, mtime, *digest in r.get("inputs", []):
                d = digest[0] if digest else None
                old = previous.get(f)
                if restamped and f in restamped:
                    size, mtime = restamped[f]
                elif d and old is not None and old[2:3] == [d] and list(old[:2]) != [size, mtime] \
                        and _stat_or_none(f) == list(old[:2]):
                    size, mtime = old[0], old[1]
                records[f] = [size, mtime, d] if d else [size, mtime]
                dirs.add(str(Path(f).parent))
    roots = [Path(d) for s in sources for d in _source_dirs(s)]
    for d in list(dirs):   # and every folder between a source root and a record folder: a new sub-folder of
        p = Path(d)        # records (PTB-XL's records100/01000/) changes only its parent's mtime
        for root in roots:
            if root in p.parents:
                q = p.parent
                while q != root:
                    dirs.add(str(q))
                    q = q.parent
    dirs.update(str(r) for r in roots)
    labels = {f: v for li in label_info for f, v in li["files"].items()}
    dir_m = {}
    before = dirs_before or {}
    for d in sorted(dirs):
        if d in before:
            if before[d] is not None:
                dir_m[d] = before[d]
            else:   # created while this call ran: its files may postdate the plan; recorded as changed
                dir_m[d] = -1
            continue
        try:
            dir_m[d] = os.stat(d).st_mtime_ns
        except OSError:
            continue
    atomic_write_json(out / INPUTS_FILE, {"records": records, "labels": labels, "dirs": dir_m}, indent=None)
    # every shard has now been checked against (or converted after) the folders' state of this call's start
    (out / PENDING_DIRS_FILE).unlink(missing_ok=True)


def _finalize(out: Path, plan: _Plan, plan_doc: dict[str, Any], label_info: Sequence[Mapping[str, Any]] = (),
              sources: Sequence[RecordSource] = (), restamped: Mapping[str, list[int]] | None = None,
              dirs_before: Mapping[str, int | None] | None = None) -> None:
    """Merge the shard indexes into index.jsonl + records.npy, write skipped.csv, inputs.json (``restamped``,
    ``dirs_before``: see :func:`_write_inputs`) and (last) manifest.json."""
    merged = _merge_shards(out, [_SHARD_FMT.format(i) for i in range(len(plan.shards))])
    skipped_rows = list(plan.skipped) + merged["skipped"]
    by_source = merged["by_source"]
    for row in skipped_rows:
        by_source.setdefault(row["source"], {"converted": 0, "skipped": 0})["skipped"] += 1
    skipped_bytes = _skipped_csv(skipped_rows)
    skipped_sha = atomic_write_bytes(out / "skipped.csv", skipped_bytes)
    _write_inputs(out, plan, label_info, sources, restamped, dirs_before)
    fs_values = merged["fs_values"]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": DTYPE, "leads": list(CANONICAL_LEADS),
        "spec": plan.header["spec"], "spec_fingerprint": plan.header["spec_fingerprint"],
        "fs": fs_values.pop() if len(fs_values) == 1 else None,
        "sources": plan.header["sources"], "shard_records": plan.header["shard_records"],
        "allow_duplicate_ids": plan.header["allow_duplicate_ids"], "plan_fingerprint": plan.fingerprint,
        "shards": merged["shards"],
        "files": {"index.jsonl": merged["index_sha256"], "records.npy": merged["records_sha256"],
                  "skipped.csv": skipped_sha},
        "file_bytes": {"index.jsonl": (out / "index.jsonl").stat().st_size,
                       "records.npy": (out / "records.npy").stat().st_size, "skipped.csv": len(skipped_bytes)},
        "counts": {"planned": plan.header["n_planned"], "converted": merged["n_total"],
                   "skipped": len(skipped_rows), "by_source": by_source},
    }
    atomic_write_json(out / "manifest.json", manifest, indent=1)


# ----------------------------------------------------------------------------------------------- integrity


#: prefix of a :func:`cache_digest` that covers the samples (the shards' checksums); digests without it (written
#: before 2026-12-08) cover the index and records table only and are compared in that form (:func:`digest_matches`)
DIGEST_V2 = "v2:"


def cache_digest(cache_dir: str | os.PathLike, legacy: bool = False) -> str | None:
    """A short digest of what a corpus cache holds now: its manifest's ``index.jsonl``, ``records.npy`` and
    shard checksums (the records, their labels and their samples); None for a folder without a readable manifest.

    A cache's folder name hashes its sources and preprocessing, not its records: prepared again in place after a
    file was repaired, added or removed, it keeps its name with other records (every record's position moved); a
    record whose file was replaced by another recording of the same length keeps the index and records table but
    not the shard's checksum (the digest before 2026-12-08, ``legacy=True``, missed that).

    Args:
        cache_dir: a :class:`~ecgfm.data.cache.CorpusCache` folder.
        legacy: the older form, without the shards (to compare with a digest recorded before, no prefix).

    Returns:
        ``"v2:<16 hex>"`` (``"<16 hex>"`` with ``legacy``), or None.
    """
    try:
        manifest = json.loads((Path(cache_dir) / "manifest.json").read_text(encoding="utf-8"))
        files = manifest.get("files") or {}
        shards = [str(sh.get("bin_sha256")) for sh in manifest.get("shards") or []]
    except (OSError, ValueError, AttributeError):
        return None
    if not files.get("index.jsonl") or not files.get("records.npy"):
        return None
    base = f"{files['index.jsonl']}:{files['records.npy']}"
    if legacy:
        return hashlib.sha256(base.encode()).hexdigest()[:16]
    return DIGEST_V2 + hashlib.sha256(f"{base}:{','.join(shards)}".encode()).hexdigest()[:16]


def digest_matches(cache_dir: str | os.PathLike, recorded: str | None) -> bool | None:
    """Whether ``cache_dir`` holds what a recorded :func:`cache_digest` says, in the recorded digest's own form
    (a digest without the ``v2:`` prefix, from before 2026-12-08, is compared without the shards); None when
    either is unknown."""
    if recorded is None:
        return None
    now = cache_digest(cache_dir, legacy=not str(recorded).startswith(DIGEST_V2))
    return None if now is None else now == recorded


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ECGDataError(path, f"unreadable manifest ({exc}); prepare the cache again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ECGDataError(path, "not a corpus-cache manifest (no shard list); prepare the cache again")
    return manifest


#: the fields manifest.json repeats from plan.json (what the cache was prepared with)
_PLAN_FIELDS = ("format_version", "spec", "sources", "shard_records", "allow_duplicate_ids", "plan_fingerprint")


def _read_plan(out: Path) -> dict[str, Any] | None:
    """``plan.json`` of a cache, or None when missing or unreadable."""
    try:
        plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and "plan_fingerprint" in plan else None


def _manifest_mismatch(manifest: Mapping[str, Any], plan: Mapping[str, Any] | None) -> str | None:
    """Why ``manifest`` cannot be what :func:`_finalize` wrote from ``plan`` (plan.json's fields; None: only the
    manifest's own consistency is checked), or None. Catches a hand-edited manifest (no checksum covers it): its
    spec, sources or fs changed, or a shard entry removed. Cheap: no other file is read."""
    if plan is not None:
        keys = [k for k in _PLAN_FIELDS if k in plan and dumps(manifest.get(k)) != dumps(plan[k])]
        if keys:
            return f"its {', '.join(keys)} differ{'s' if len(keys) == 1 else ''} from plan.json's"
        n_shards = plan.get("n_shards")
        if n_shards is not None and len(manifest.get("shards") or []) != int(n_shards):
            return f"it lists {len(manifest.get('shards') or [])} shards, plan.json plans {n_shards}"
    try:
        converted = int(manifest["counts"]["converted"])
        held = sum(int(sh["n_records"]) for sh in manifest["shards"])
    except (KeyError, TypeError, ValueError):
        return "its counts or shard entries are incomplete"
    if converted != held:
        return f"its counts say {converted} records but its shard entries hold {held}"
    spec_fs = (manifest.get("spec") or {}).get("fs") if isinstance(manifest.get("spec"), dict) else None
    fs = manifest.get("fs")
    try:
        if spec_fs is not None and fs is not None and float(fs) != float(spec_fs):
            return f"its fs {fs} is not its spec's fs {spec_fs}"
    except (TypeError, ValueError):
        return f"its fs {fs!r} or its spec's fs {spec_fs!r} is not a number"
    return None


def _expected_files(manifest: Mapping[str, Any]) -> dict[str, tuple[str, int | None, str]]:
    """``rel path -> (sha256, size or None, kind)`` of every file the manifest vouches for; kind ``shard``
    (signals and their index: damage is fatal), ``derived`` (rebuilt from the shard indexes) or ``report``."""
    out: dict[str, tuple[str, int | None, str]] = {}
    for sh in manifest["shards"]:
        out[sh["bin"]] = (sh["bin_sha256"], int(sh["bin_bytes"]), "shard")
        out[sh["index"]] = (sh["index_sha256"], sh.get("index_bytes"), "shard")
    sizes = manifest.get("file_bytes", {})
    for rel, digest in manifest.get("files", {}).items():
        out[rel] = (digest, sizes.get(rel), "derived" if rel in ("index.jsonl", "records.npy") else "report")
    return out


def _verified_fallback(out: Path) -> Path:
    """Where the verified stats of a read-only cache are kept: the user's cache folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ecgfm" / "verified" / f"{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:20]}.json"


def _read_verified(out: Path) -> dict[str, list]:
    state: dict[str, list] = {}
    for p in (_verified_fallback(out), out / VERIFIED_FILE):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            state.update(data)
    return state


def _record_verified(out: str | os.PathLike, files: Mapping[str, str | os.PathLike]) -> None:
    """Remember that ``files`` (rel path -> path) hold the bytes the manifest's sha256 vouches for, as of their
    current :func:`_stat_key`, so the next open only compares stats. Best effort (read-only caches: no-op)."""
    out = Path(out)
    try:
        expected = _expected_files(_read_manifest(out))
        _store_verified(out, {rel: [*_stat_key(p), expected[rel][0]] for rel, p in files.items() if rel in expected})
    except (OSError, ECGDataError):
        return


def _store_verified(out: Path, entries: Mapping[str, list]) -> None:
    """Merge ``rel -> [*stat key, sha256]`` entries into the verified state (best effort)."""
    state = _read_verified(out)
    state.update(entries)
    for target in (out / VERIFIED_FILE, _verified_fallback(out)):   # a read-only cache: the user's cache folder
        try:
            atomic_write_json(target, state, indent=None)
            return
        except OSError:
            continue


def _verify_derived(out: Path, names: set[str] | None = None) -> list[str]:
    """sha256 check of the derived files (all, or ``names``); rebuild the damaged ones (``skipped.csv``: from
    ``plan.json`` and the shard indexes). Returns the damaged names."""
    manifest = _read_manifest(out)
    bad = [rel for rel, (digest, _, kind) in _expected_files(manifest).items()
           if kind != "shard" and (names is None or rel in names)
           and (not (out / rel).exists() or sha256_file(out / rel) != digest)]
    if set(bad) & {"index.jsonl", "records.npy"}:
        _rebuild_derived(out, manifest, [b for b in bad if b != "skipped.csv"])
    if "skipped.csv" in bad:
        _rebuild_skipped(out, manifest)
    return bad


def _rebuild_skipped(out: Path, manifest: Mapping[str, Any]) -> None:
    log.warning("%s: skipped.csv missing or damaged: rebuilt from plan.json and the shard indexes", out)
    try:
        rows = list(json.loads((out / "plan.json").read_text(encoding="utf-8")).get("skipped", []))
    except (OSError, ValueError):
        rows = []
    for sh in manifest["shards"]:
        rows.extend(json.loads((out / sh["index"]).read_text(encoding="utf-8")).get("skipped", []))
    if atomic_write_bytes(out / "skipped.csv", _skipped_csv(rows)) != manifest["files"].get("skipped.csv"):
        log.warning("%s: the rebuilt skipped.csv differs from the original (a cache written before format "
                    "version 2 keeps no plan-level skips); signals and labels are not affected", out)


def stat_changes(out_dir: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Cache files (relative paths) whose stat changed since their sha256 was last verified (stat only: a few
    microseconds per file). Such files are hashed again on the next open / preparation."""
    out = Path(out_dir)
    manifest = manifest if manifest is not None else _read_manifest(out)
    verified = _read_verified(out)
    changed = []
    for rel, (digest, _, _) in _expected_files(manifest).items():
        try:
            key = _stat_key(out / rel)
        except OSError:
            changed.append(rel)
            continue
        if verified.get(rel) != [*key, digest]:
            changed.append(rel)
    return changed


def _rebuild_derived(out: Path, manifest: Mapping[str, Any], names: Sequence[str]) -> None:
    """Rebuild ``index.jsonl`` / ``records.npy`` from the shard indexes and check them against the manifest."""
    log.warning("%s: %s missing or damaged: rebuilt from the shard indexes", out, ", ".join(names))
    merged = _merge_shards(out, [sh["name"] for sh in manifest["shards"]])
    for rel, digest in (("index.jsonl", merged["index_sha256"]), ("records.npy", merged["records_sha256"])):
        if digest != manifest["files"].get(rel):
            raise ECGDataError(out / rel, "rebuilt from the shard indexes but its checksum differs from the "
                                          "manifest's: the cache is inconsistent; prepare it again with the "
                                          "same command (it writes manifest.json again from plan.json and the "
                                          "shard indexes)")


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
                f"ecgfm-prepare (python prepare.py in a checkout) with the same arguments to resume")
    return ("not an ecgfm corpus cache (no manifest.json); create one with ecgfm-prepare (python prepare.py in a "
            "checkout) or ecgfm.data.cache.prepare_corpus")


class CorpusCache:
    """Read-only view of a cache written by :func:`prepare_corpus`.

    Opening reads ``manifest.json`` and memory-maps ``records.npy``; signals are read through per-shard
    ``np.memmap`` opened on first use (at most ``max_open_shards`` at a time). The pandas ``index`` (labels,
    meta) is loaded only when asked for. Pickling keeps only the path, so a cache can be sent to DataLoader
    workers, which reopen the memory maps lazily.

    Opening checks the cache's integrity at the cost of a few ``stat`` calls: every shard and derived file is
    compared with the size, mtime, ctime and inode recorded when its sha256 was last computed (``.verified.json``,
    written by the preparation and by the open that last hashed it). Only a file whose stat changed (a copy, a
    touch, an in-place write) is hashed again, once: a damaged shard raises :class:`ECGDataError` naming it, a
    damaged or missing ``index.jsonl`` / ``records.npy`` is rebuilt from the shard indexes with a log line.
    ``manifest.json`` itself (covered by no checksum) must repeat ``plan.json``'s spec, sources, shard size and
    plan fingerprint, and count the records its shard entries hold (one read of plan.json, whose size grows with
    the records it lists as skipped). Damage that leaves the stat unchanged (bit rot) is found by :meth:`verify` /
    ``prepare ... verify=true`` and
    by the loaders' non-finite checks. Measured on the shared PTB-XL + CinC 2017 cache (4,557 records, 32 shards,
    123 MiB; 2 busy cores): opening costs 4.2 ms with the stat check vs 1.1 ms without (``check="none"``) and
    640 ms with ``check="full"``; the first open after one 6.5 MiB shard was touched costs 51 ms (that shard
    hashed once).

    A reader stays consistent with the cache as it was when it was opened. A rerun of the preparation may update
    the cache in place (a record whose files changed: its shard is converted again under the same file name, with
    new offsets in ``records.npy``). A shard map already open keeps reading the old file (the old inode stays
    alive while it is mapped), but a shard mapped later (first use, or again after being closed by the LRU bound)
    would be the new file read with the old offsets: another record's samples. So the identity (inode, size,
    mtime) of every shard file and of ``records.npy`` / ``index.jsonl`` is recorded at open (it travels with a
    pickled cache to the DataLoader workers) and compared each time one of them is (re)opened (never per crop):
    a changed file raises :class:`ECGDataError` naming the cache and the file; open the cache again.

    Args:
        path: cache directory.
        max_open_shards: shard memory maps kept open at a time (least recently used are closed). Each open
            map costs one entry of the process's ``vm.max_map_count`` (65,530 by default on Linux, shared by
            everything the process maps: libraries, the allocator's arenas, CUDA) and a little kernel memory, in
            every DataLoader worker, and one file descriptor; that is why there is a bound at all. The default
            (:func:`default_max_open_shards`: :data:`MAX_OPEN_SHARDS`, 4,096, or a quarter of the open-file limit
            when lower, 256 under the common 1,024) keeps every shard of a 1 M-record cache (~1,000 shards) open
            where the limit allows: a random crop from a shard that is not mapped costs a new ``mmap`` (~18x a
            crop from a mapped one). Running out of file descriptors closes the older half of the maps and
            retries; a second failure is an error naming this setting.
        check: ``"stat"`` (default, as above), ``"full"`` (hash every file on open) or ``"none"``.

    Raises:
        ECGDataError: the directory is not a cache, is incomplete (interrupted preparation) or is damaged
            (missing shard, wrong size or checksum, a manifest that disagrees with plan.json or its own shard
            list), naming the file. Also raised later, when a cache file
            is (re)opened, if it was replaced since this reader opened the cache (see above).
    """

    def __init__(self, path: str | os.PathLike, max_open_shards: int | None = None, check: str = "stat"):
        if check not in ("stat", "full", "none"):
            raise ValueError(f"check must be 'stat', 'full' or 'none', got {check!r}")
        self.path = Path(path)
        self.max_open_shards = default_max_open_shards() if max_open_shards is None else int(max_open_shards)
        if self.max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            raise ECGDataError(self.path, _incomplete_message(self.path))
        self.manifest: dict[str, Any] = _read_manifest(self.path)
        if self.manifest.get("format") != FORMAT or int(self.manifest.get("format_version", -1)) > FORMAT_VERSION:
            raise ECGDataError(manifest_path, f"unsupported cache format {self.manifest.get('format')!r} "
                                              f"version {self.manifest.get('format_version')!r}")
        seen: dict[str, tuple[int, int, int]] = {}
        if check != "none":
            # no checksum covers the manifest: its plan fields must be plan.json's, its counts its shards'
            problem = _manifest_mismatch(self.manifest, _read_plan(self.path))
            if problem:
                raise ECGDataError(manifest_path, f"{problem}: manifest.json was edited or damaged; prepare the "
                                                  f"cache again with the same command (it writes manifest.json "
                                                  f"again from plan.json and the shard indexes)")
            seen = self._check_integrity(full=check == "full")
        # what this reader reads: the files as they are now (see the class docstring); stats the integrity check
        # took are reused, so opening costs no extra stat with check="stat" / "full"
        self._ids: dict[str, tuple[int, int, int] | None] = {}
        for rel in [sh["bin"] for sh in self.manifest["shards"]] + ["records.npy", "index.jsonl"]:
            if rel not in seen:
                try:
                    seen[rel] = _identity(os.stat(self.path / rel))
                except OSError:
                    seen[rel] = None   # missing: reading it fails then, naming it
            self._ids[rel] = seen[rel]
        self.spec = PreprocessSpec.from_dict(self.manifest["spec"])
        self._records: np.ndarray | None = None
        self._cols: dict[str, np.ndarray] | None = None
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._index = None
        self._n = int(self.manifest["counts"]["converted"])

    def _check_integrity(self, full: bool = False) -> dict[str, tuple[int, int, int]]:
        """The open-time check (see the class docstring). Returns the :func:`_identity` of the shard files it
        stat'ed and found intact (what this reader then reads)."""
        verified = {} if full else _read_verified(self.path)
        hashed: dict[str, list] = {}
        damaged: list[str] = []
        ids: dict[str, tuple[int, int, int]] = {}
        for rel, (digest, size, kind) in _expected_files(self.manifest).items():
            p = self.path / rel
            try:
                key = _stat_key(p)
            except OSError:
                key = None
            if key is not None and kind == "shard":
                ids[rel] = (key[3], key[0], key[1])
            if key is None or (size is not None and key[0] != int(size)):
                if kind == "shard":
                    raise ECGDataError(p, f"shard missing or of the wrong size (expected {size} bytes); the cache "
                                          f"is damaged: repair it with `ecgfm-prepare ... verify=true` (the same "
                                          f"command that built it) or prepare it again")
                damaged.append(rel)
                continue
            if verified.get(rel) == [*key, digest]:
                continue
            if sha256_file(p) != digest:
                if kind == "shard":
                    raise ECGDataError(p, "checksum mismatch (sha256 differs from the manifest): the shard is "
                                          "damaged (torn copy, bad disk?); repair it with `ecgfm-prepare ... "
                                          "verify=true` (prepare_corpus(..., verify=True)) or prepare it again")
                damaged.append(rel)
                continue
            hashed[rel] = [*key, digest]   # the stat from before hashing: a file replaced meanwhile is hashed again
        derived = [rel for rel in damaged if rel in ("index.jsonl", "records.npy")]
        if derived:
            try:
                with file_lock(self.path / LOCK_FILE, blocking=False,
                               what=f"{self.path}: being prepared by another process; retry when it is done"):
                    _rebuild_derived(self.path, self.manifest, derived)
            except LockBusy as exc:
                raise ECGDataError(self.path, str(exc)) from None
            except OSError as exc:
                raise ECGDataError(self.path / derived[0], f"missing or damaged and cannot be rebuilt here "
                                                           f"({exc}); prepare the cache again") from None
            expected = _expected_files(self.manifest)
            hashed.update({rel: [*_stat_key(self.path / rel), expected[rel][0]] for rel in derived})
        for rel in damaged:
            if rel not in derived:
                log.warning("%s: %s is missing or damaged (a report only; signals and labels are intact)",
                            self.path, rel)
        if hashed:
            _store_verified(self.path, hashed)
        return ids

    def _changed_error(self, rel: str) -> ECGDataError:
        """The error for a cache file replaced since this reader opened the cache."""
        return ECGDataError(self.path / rel, f"changed since this reader opened the cache {self.path} (a rerun of "
                                             f"prepare updated it); reopen the cache (CorpusCache({str(self.path)!r})"
                                             f", or restart the run) to read the updated records")

    def _check_same(self, rel: str, st: os.stat_result) -> None:
        """Raise :meth:`_changed_error` unless ``st`` is the stat of the file this reader saw at open, or the file
        was replaced by one of the same content: the cache's current manifest records for it the sha256 this
        reader's manifest recorded (a rerun that only relabels writes ``records.npy`` and unchanged shards anew,
        byte for byte; open readers, pretraining jobs among them, go on)."""
        ids = getattr(self, "_ids", None)   # a cache pickled before identities were recorded: not checked
        if ids is None or rel not in ids or _identity(st) == ids[rel]:
            return
        seen = _recorded_sha256(self.manifest, rel)
        try:
            now = _recorded_sha256(_read_manifest(self.path), rel)
        except (OSError, ValueError, ECGDataError):   # mid-update (the manifest goes first) or unreadable
            now = None
        if seen is None or now != seen:
            raise self._changed_error(rel)
        ids[rel] = _identity(st)

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
            path = self.path / "records.npy"
            records = np.load(path, mmap_mode="r", allow_pickle=False)
            # stat after mapping: a file replaced before (or while) it was mapped shows a new identity
            self._check_same("records.npy", os.stat(path))
            self._records = records
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
        """``(N,)`` int64 stable patient hashes (-1 unknown), see :func:`record_patient_hash` (caches built before
        2026-12-06 hashed a PTB-XL record read by another source under that source's name)."""
        return np.asarray(self.records["patient"], dtype=np.int64)

    @property
    def index(self):
        """pandas DataFrame, one row per record: record_id, source, patient_id, labels (list[str]), fs,
        n_samples, lead_mask, meta (dict), header (dict), key."""
        if self._index is None:
            import pandas as pd

            rows = []
            with open(self.path / "index.jsonl", encoding="utf-8") as f:
                self._check_same("index.jsonl", os.fstat(f.fileno()))
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
        """The memory map of shard ``shard`` (opened on first use and again after the LRU bound closed it; the
        file's identity is then checked against the one seen at open, see the class docstring)."""
        mm = self._maps.get(shard)
        if mm is None:
            if not 0 <= shard < len(self.manifest["shards"]):
                raise ECGDataError(self.path / "manifest.json",
                                   f"records.npy names shard {shard} but the manifest lists "
                                   f"{len(self.manifest['shards'])} shards: manifest.json was edited or damaged; "
                                   f"prepare the cache again with the same command")
            rel = self.manifest["shards"][shard]["bin"]
            try:
                mm = self._open_map(rel)
            except OSError as exc:
                if exc.errno != errno.EMFILE or not self._maps:
                    raise
                # out of file descriptors: close the older half of the maps (each holds one) and try again
                for _ in range(max(1, len(self._maps) // 2)):
                    self._maps.popitem(last=False)
                try:
                    mm = self._open_map(rel)
                except OSError as again:
                    if again.errno != errno.EMFILE:
                        raise
                    raise ECGDataError(self.path / rel, f"too many open files while mapping a shard of {self.path} "
                                                        f"({len(self._maps)} shard maps open): pass a smaller "
                                                        f"max_open_shards (now {self.max_open_shards}) or raise "
                                                        f"the open-file limit (ulimit -n)") from again
            self._maps[shard] = mm
            while len(self._maps) > self.max_open_shards:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return mm

    def _open_map(self, rel: str) -> np.ndarray:
        """The ``float32`` map of shard file ``rel``, its identity checked (see :meth:`_shard_map`)."""
        with open(self.path / rel, "rb") as f:   # fstat + map of the same open file: no race with a rename
            self._check_same(rel, os.fstat(f.fileno()))
            # a plain ndarray view of the memmap (keeps the map alive; slicing skips np.memmap's overhead)
            return np.memmap(f, dtype=DTYPE, mode="r").view(np.ndarray)

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
        """Record ``i`` as an :class:`ECGRecord` (preprocessed signal, ids, labels, meta, header). Its header says
        so (``header["preprocessed"]``: the cache's spec), so that a model does not preprocess it again
        (:func:`preprocessed_spec`)."""
        i = self._check(i)
        row = self.index.iloc[i]
        return ECGRecord(signal=self.signal(i), fs=float(row["fs"]), lead_mask=self.lead_mask(i),
                         record_id=row["record_id"], source=row["source"], patient_id=row["patient_id"],
                         labels=tuple(row["labels"]), meta=dict(row["meta"]),
                         header={**dict(row["header"]), "preprocessed": self.spec.to_dict()})

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
        """Recompute the sha256 of every file listed in the manifest (reads every byte); raise
        :class:`ECGDataError` naming the first damaged file. ``prepare ... verify=true`` repairs them."""
        for rel, (digest, _, _) in _expected_files(self.manifest).items():
            p = self.path / rel
            if not p.exists() or sha256_file(p) != digest:
                raise ECGDataError(p, "checksum mismatch: the cache is damaged; repair it with `ecgfm-prepare ... "
                                      "verify=true` (prepare_corpus(..., verify=True))")

    # -- non-finite values -------------------------------------------------------------------------------
    def describe_records(self, indices: Sequence[int]) -> str:
        """``cache <dir>: shard <file>: <keys>`` for error messages (one clause per shard)."""
        idx = sorted({int(i) % max(self._n, 1) for i in indices})
        c = self.columns()
        try:
            keys = self.keys
        except Exception:  # noqa: BLE001 - the index itself is unreadable: name rows
            keys = [f"row {i}" for i in range(self._n)]
        by_shard: dict[int, list[str]] = {}
        for i in idx:
            by_shard.setdefault(int(c["shard"][i]), []).append(
                f"{keys[i]} (row {i}, byte offset {int(c['offset'][i])})")
        parts = [f"shard {self.path / self.manifest['shards'][sh]['bin']}: {', '.join(rows[:10])}"
                 f"{' ...' if len(rows) > 10 else ''}" for sh, rows in sorted(by_shard.items())]
        return f"cache {self.path}: " + "; ".join(parts)

    def nonfinite_error(self, indices: Sequence[int], what: str = "input windows") -> NonFiniteDataError:
        """The error a loader raises for non-finite values in records ``indices`` (names shard and records)."""
        idx = sorted({int(i) % max(self._n, 1) for i in indices})
        c = self.columns()
        shard = self.path / self.manifest["shards"][int(c["shard"][idx[0]])]["bin"] if idx else self.path
        return NonFiniteDataError(shard, f"non-finite values (NaN/Inf) in {what} of {len(idx)} record(s): "
                                         f"{self.describe_records(idx)}. The cache is damaged: check it with "
                                         f"`ecgfm-prepare ... verify=true`, or pass nonfinite='skip' to skip such "
                                         f"records (counted in the run summary)")


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
            build = functools.partial(target, **kwargs)
        else:
            build = functools.partial(get_source, kind, **kwargs)
        try:
            out.append(build())
        except TypeError as exc:   # an argument the source does not take, or of the wrong type: the preset's
            from ecgfm.errors import ConfigError

            raise ConfigError(name, f"source {kind!r}: {str(exc).splitlines()[0]}") from None
    return out


def _shard_setting(value: Any) -> int | None:
    """``shard_records`` of a config: an int, or null / ``"auto"`` for :func:`auto_shard_records`."""
    return None if value is None or str(value).lower() == "auto" else int(value)


#: Settings of ``conf/prepare.yaml``; every other top-level key is a source preset.
PREPARE_SETTINGS = ("sources", "out", "spec", "shard_records", "workers", "progress", "allow_duplicate_ids",
                    "verify")


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
                            allow_duplicate_ids=bool(cfg.get("allow_duplicate_ids", False)),
                            verify=bool(cfg.get("verify", False)))
    print(report.summary(), file=sys.stdout, flush=True)
    if report.n_converted == 0:   # an empty cache is no cache: training on it failed later with a rate error
        raise ECGDataError(out_path, f"no record could be converted ({report.n_skipped} skipped; the reasons are "
                                     f"in {out_path / 'skipped.csv'})")
    return report
