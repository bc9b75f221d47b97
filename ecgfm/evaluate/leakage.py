"""Leakage guard: pretraining corpora versus downstream test splits.

Self-supervised pretraining never sees labels, but an encoder pretrained on the very records (or patients) it is
later tested on has seen the test distribution record by record; published ECG numbers have been inflated that
way (PhysioNet/CinC 2021 contains PTB-XL, so pretraining on it leaks PTB-XL test records). Before a head is
evaluated, :func:`check_leakage` compares identities and raises :class:`LeakageError` on any overlap unless
``allow=True`` (then the overlap is reported in the results cell).

Identities are canonical strings so that the same recording is recognised across datasets:

* ``rec:<source>/<record_id>`` for every record;
* ``rec:ptbxl/<ecg_id>`` for PTB-XL records (``record_id`` normalised to the integer ecg_id) and for records of
  other corpora that carry ``meta["ptbxl_ecg_id"]`` (the PhysioNet 2021 ``HR*`` records, set by
  ``Challenge2021Source``), and ``pat:ptbxl/<patient_id>`` for those that carry ``meta["ptbxl_patient_id"]``
  (``Challenge2021Source(ptbxl_root=...)``);
* synthetic records are namespaced by their corpus seed (``meta["seed"]``): ids repeat across seeds;
* ``pat:<source>/<patient_id>`` for records with a patient id (PTB-XL ``patient_id``; CinC 2017 has none, each
  record is then its own patient and only record identity is checked);
* identities that do not depend on the source's name, for records of a cache index (:func:`index_identities`,
  :func:`cache_identities`): ``file:<real path>`` of the file the record was read from (its ``header["path"]``,
  its folder's symbolic links resolved; absolute paths only), so the same folder read under two source names (``folder`` when
  pretraining or as the task, ``external_folder`` as an external set) is recognised; and ``content:<digest>``, a
  digest of the content fingerprints the cache recorded for the record's files (``inputs.json``: the files sharing
  the stem of ``header["path"]``), so a copy of those files in another folder is recognised too. Both are left out
  for a record whose file is also another record's in the same index (a file holding several records is no
  identity of one of them), and ``content:`` for a record whose files were not all fingerprinted (caches of format
  version 1 or before digests, unreadable files) or whose only fingerprinted file is a WFDB header (two minimal
  headers of different recordings can be byte-identical).

Where the pretraining identities come from (first found wins, all are merged):
``encoder.json`` ``extra.pretrain_record_keys`` (a list of ``source/record_id`` strings written by the
pretraining pipeline), ``extra.pretrain_caches`` (cache directories; their whole index is used), or the
``pretrain_caches`` passed explicitly by the caller. Record keys carry no file, so only caches give ``file:`` and
``content:`` identities.

:func:`check_leakage` also compares an external evaluation set with the task's training and validation splits
(``against=``): :func:`ecgfm.evaluate.tasks.build_external` removes the task's own records from an external set by
these identities, and the sweep checks what is left before scoring.

Identities do not see a recording filed twice under other ids and patients (PTB-XL ecg 140 / 1370): when the
pretraining caches are known, :func:`signal_copies` compares the preprocessed signals themselves (the sweep records
its near-copies in the cell's leakage report and warns; see :func:`ecgfm.evaluate.sweep.leakage_check`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class LeakageError(ValueError):
    """Pretraining and downstream test data share records or patients."""


def _norm_patient(pid: Any) -> str | None:
    from ecgfm.data.splits import is_unknown_patient

    if is_unknown_patient(pid):   # the markers the splits read as unknown
        return None
    if isinstance(pid, float):
        if np.isnan(pid):
            return None
        if pid.is_integer():
            return None if pid == -1 else str(int(pid))
    s = str(pid).strip()
    if not s or s.lower() in ("nan", "none") or s in ("-1", "-1.0"):   # unknown, as the splits read it
        return None
    if re.fullmatch(r"\d+\.0+", s):
        s = s.split(".")[0]
    return s


def _ptbxl_int(record_id: Any) -> str | None:
    """``"00001_lr"`` / ``"records100/00000/00001_lr"`` / ``"1"`` / ``1.0`` -> ``"1"``; None if no number."""
    if isinstance(record_id, (int, np.integer)):
        return str(int(record_id))
    if isinstance(record_id, float) and record_id == record_id:
        return str(int(record_id))
    m = re.findall(r"(\d+)(?:_[lh]r)?$", str(record_id).strip())
    return str(int(m[-1])) if m else None


@functools.lru_cache(maxsize=65536)
def _real_dir(folder: str) -> str:
    """``os.path.realpath`` of a folder, once per folder (a per-file realpath costs a ``stat`` per path component:
    seconds for 100k records)."""
    return os.path.realpath(folder)


def _real_path(path: Any) -> str | None:
    """The real path of a record's file, its folder resolved; None for no path or a relative one (relative to a
    working directory the index does not record).

    The file itself is not resolved: that would cost a ``stat`` per record (minutes for 100k records on a network
    file system); a linked file is matched by its ``content:`` identity instead."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = os.fspath(path)
    if not path or not os.path.isabs(path):
        return None
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(_real_dir(folder), name)


def record_identities(source: str, record_id: Any, patient_id: Any = None,
                      meta: Mapping[str, Any] | None = None, path: Any = None,
                      content: str | None = None) -> set[str]:
    """Canonical identity strings of one record (see module docstring).

    Args:
        source: the record's source name.
        record_id: its id within the source.
        patient_id: its patient id (None: unknown).
        meta: its metadata (``seed`` of a synthetic corpus, ``ecg_id``, ``ptbxl_ecg_id``, ``ptbxl_patient_id``).
        path: the file it was read from (``header["path"]``): adds ``file:<real path>`` when absolute.
        content: the digest of its files' contents (:func:`content_fingerprints`): adds ``content:<digest>``.
    """
    source = str(source)
    meta = meta or {}
    if source == "synthetic" and meta.get("seed") is not None:
        source = f"synthetic@seed{int(meta['seed'])}"  # synthetic ids repeat across corpus seeds
    ids = {f"rec:{source}/{record_id}"}
    if source.lower().startswith("ptbxl"):
        ecg = _ptbxl_int(meta.get("ecg_id", record_id))
        if ecg is not None:
            ids.add(f"rec:ptbxl/{ecg}")
    if meta.get("ptbxl_ecg_id") not in (None, ""):
        ecg = _ptbxl_int(meta["ptbxl_ecg_id"])
        if ecg is not None:
            ids.add(f"rec:ptbxl/{ecg}")
    # the PhysioNet 2020/21 challenge ships other corpora under their own ids, read off the id itself (so that a
    # bare "source/id" key without meta is covered too): HR<n> = PTB-XL record n, A<nnnn> = CPSC 2018 record
    name = str(record_id).replace("\\", "/").rsplit("/", 1)[-1]
    if source.lower().startswith("challenge"):
        m = re.fullmatch(r"HR(\d+)", name, flags=re.IGNORECASE)
        if m:
            ids.add(f"rec:ptbxl/{int(m.group(1))}")
    if (source.lower().startswith("challenge") or source.lower().startswith("cpsc2018")) and \
            re.fullmatch(r"A\d{4}", name):
        ids.add(f"rec:cpsc2018/{name}")
    ptbxl_pid = _norm_patient(meta.get("ptbxl_patient_id"))   # a PTB-XL record under another corpus' name
    if ptbxl_pid is not None:
        ids.add(f"pat:ptbxl/{ptbxl_pid}")
    pid = _norm_patient(patient_id)
    if pid is not None:
        src = "ptbxl" if source.lower().startswith("ptbxl") else source
        ids.add(f"pat:{src}/{pid}")
    real = _real_path(path)
    if real is not None:
        ids.add(f"file:{real}")
    if content:
        ids.add(f"content:{content}")
    return ids


def _header_path(header: Any) -> str | None:
    path = header.get("path") if isinstance(header, Mapping) else None
    return path if isinstance(path, str) and path else None


@functools.lru_cache(maxsize=4)
def _content_map(inputs_file: str, stamp: tuple[int, int]) -> dict[str, str]:
    """:func:`content_fingerprints` of one ``inputs.json`` (``stamp``: its size and mtime, so an update is read)."""
    del stamp   # part of the memo key only
    try:
        records = json.loads(Path(inputs_file).read_text(encoding="utf-8")).get("records") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    groups: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for f, entry in records.items():
        folder, name = os.path.split(f)
        digest = entry[2] if isinstance(entry, list) and len(entry) > 2 else None
        groups.setdefault((folder, name.rsplit(".", 1)[0]), []).append((f, digest))
    from ecgfm.data.cache import UNREADABLE

    out: dict[str, str] = {}
    for files in groups.values():
        digests = [d for _, d in files]
        if not all(isinstance(d, str) and d and d != UNREADABLE for d in digests):
            continue   # a file without its fingerprint: the record's content is not known
        if all(f.lower().endswith(".hea") for f, _ in files):
            continue   # a WFDB header whose signal file has another stem: the header alone may be another's twin
        fp = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]
        for f, _ in files:
            out[f] = fp
    return out


def content_fingerprints(cache_dir: str | os.PathLike) -> dict[str, str]:
    """Content digests of a cache's records, from the fingerprints of its ``inputs.json``.

    A record's files are those sharing the stem of its ``header["path"]`` (the cache's own rule for sources without
    ``input_files``); their digest is a sha256 of their sorted content fingerprints, the same for a copy of those
    files anywhere. Read once per ``inputs.json`` version (about a second for 100k records).

    Args:
        cache_dir: a :class:`~ecgfm.data.cache.CorpusCache` folder.

    Returns:
        ``{absolute file path: digest}`` for every file of a fully fingerprinted record (empty for a cache without
        ``inputs.json``, e.g. of format version 1, or a synthetic corpus).
    """
    f = Path(cache_dir) / "inputs.json"
    try:
        st = f.stat()
    except OSError:
        return {}
    return _content_map(str(f), (st.st_size, st.st_mtime_ns))


def index_identities(index: pd.DataFrame, rows: Sequence[int] | np.ndarray | None = None,
                     content: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Identities of (some rows of) a cache index -> the ``source/record_id`` keys that carry each one.

    Args:
        index: a :class:`~ecgfm.data.cache.CorpusCache` index (columns ``record_id``, ``source``, ``patient_id``,
            ``meta``, and ``header`` for the ``file:`` / ``content:`` identities).
        rows: positional rows to use (default all).
        content: ``{absolute file path: digest}`` (:func:`content_fingerprints` of the index's cache) for the
            ``content:`` identities; :func:`cache_identities` passes it.
    """
    sub = index if rows is None else index.iloc[np.asarray(rows, dtype=np.int64)]
    out: dict[str, list[str]] = {}
    metas = sub["meta"] if "meta" in sub.columns else [None] * len(sub)
    pids = sub["patient_id"] if "patient_id" in sub.columns else [None] * len(sub)
    if "header" in sub.columns:
        paths = [_header_path(h) for h in sub["header"]]
        # a file several records of the index were read from identifies none of them
        shared = {p for p, n in Counter(_header_path(h) for h in index["header"]).items() if p and n > 1}
        paths = [None if p in shared else p for p in paths]
    else:
        paths = [None] * len(sub)
    content = content or {}
    if content and any(p and not os.path.isabs(p) for p in paths):
        # a source given a relative root (Python, not the command line, which makes config paths absolute) wrote
        # relative header paths; the cache fingerprinted the same files under their absolute paths: found there
        by_name: dict[str, list[str]] = {}
        for f in content:
            by_name.setdefault(os.path.basename(f), []).append(f)
        paths = [_absolute_from(p, by_name) for p in paths]
    for src, rid, pid, meta, path in zip(sub["source"], sub["record_id"], pids, metas, paths):
        digest = content.get(os.path.abspath(path)) if path and content and os.path.isabs(path) else None
        for ident in record_identities(src, rid, pid, meta if isinstance(meta, Mapping) else None, path, digest):
            out.setdefault(ident, []).append(f"{src}/{rid}")
    return out


def _absolute_from(path: str | None, by_name: Mapping[str, list[str]]) -> str | None:
    """A relative record path made absolute by the one fingerprinted file (``by_name``: base name -> absolute
    paths) that ends with it; the path unchanged when it is absolute, None, or matches no file or several."""
    if not path or os.path.isabs(path):
        return path
    tail = os.sep + os.path.normpath(path).lstrip(os.sep)
    found = [f for f in by_name.get(os.path.basename(path), []) if f.endswith(tail)]
    return found[0] if len(found) == 1 else path


def cache_identities(cache: Any, rows: Sequence[int] | np.ndarray | None = None) -> dict[str, list[str]]:
    """:func:`index_identities` of (some rows of) a :class:`~ecgfm.data.cache.CorpusCache`, with the content
    digests of its recorded input fingerprints (:func:`content_fingerprints`).

    Args:
        cache: the cache (its ``index``, and ``path`` for the content digests: an object without one gets none).
        rows: positional rows to use (default all).
    """
    path = getattr(cache, "path", None)
    return index_identities(cache.index, rows, content=content_fingerprints(path) if path is not None else None)


def keys_identities(keys: Iterable[str]) -> dict[str, list[str]]:
    """Identities of ``source/record_id`` strings (record identity only; no patient information)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        src, _, rid = str(key).partition("/")
        if not rid:
            raise ValueError(f"pretraining record key {key!r} is not of the form 'source/record_id'")
        if src == "synthetic":   # its ids repeat across corpus seeds: a bare key would match none of them
            raise ValueError(f"pretraining record key {key!r}: synthetic record ids repeat across corpus seeds; "
                             f"write 'synthetic@seed<N>/{rid}'")
        for ident in record_identities(src, rid):
            out.setdefault(ident, []).append(str(key))
    return out


@dataclass
class LeakageReport:
    """Overlap between pretraining and test identities."""

    shared_records: list[str] = field(default_factory=list)  # test record keys source/record_id
    shared_patients: list[str] = field(default_factory=list)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (test record, pretraining record)
    checked: bool = True
    n_pretrain: int = 0
    n_test: int = 0
    # records whose patient is unknown, on each side: the patient check cannot see them (a PTB-XL record without
    # its database row, a corpus without patient ids); a shared patient among them goes unnoticed
    n_pretrain_records_without_patient: int = 0
    n_test_records_without_patient: int = 0
    # kinds of the shared identities ("rec", "pat", "file", "content"): how the overlap was seen
    matched_by: list[str] = field(default_factory=list)

    @property
    def leaked(self) -> bool:
        return bool(self.shared_records or self.shared_patients)

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "leaked": self.leaked, "n_shared_records": len(self.shared_records),
                "n_shared_patients": len(self.shared_patients), "examples": [list(e) for e in self.examples[:10]],
                "n_pretrain_identities": self.n_pretrain, "n_test_identities": self.n_test,
                "matched_by": list(self.matched_by),
                "patient_check_blind_to": {"pretraining_records": self.n_pretrain_records_without_patient,
                                           "test_records": self.n_test_records_without_patient}}


def _without_patient(idents: Mapping[str, list[str]]) -> int:
    """Records (``source/record_id`` keys) of an identity map that carry no patient identity."""
    keys = {k for ident, ks in idents.items() if ident.startswith("rec:") for k in ks}
    with_patient = {k for ident, ks in idents.items() if ident.startswith("pat:") for k in ks}
    return len(keys - with_patient)


def find_overlap(pretrain: Mapping[str, list[str]], test: Mapping[str, list[str]]) -> LeakageReport:
    """Shared identities between two identity maps (from :func:`index_identities` / :func:`keys_identities`)."""
    shared = sorted(set(pretrain) & set(test))
    report = LeakageReport(n_pretrain=len(pretrain), n_test=len(test),
                           n_pretrain_records_without_patient=_without_patient(pretrain),
                           n_test_records_without_patient=_without_patient(test))
    records: set[str] = set()
    seen_examples: set[tuple[str, str]] = set()
    for ident in shared:
        if ident.startswith("pat:"):
            report.shared_patients.append(ident)
        else:
            records.update(test[ident])  # count test records, not identities (a record has several)
        ex = (test[ident][0], pretrain[ident][0])
        if len(report.examples) < 10 and ex not in seen_examples:
            seen_examples.add(ex)
            report.examples.append(ex)
    report.shared_records = sorted(records)
    report.matched_by = sorted({ident.split(":", 1)[0] for ident in shared})
    return report


def pretrain_identities(encoder_info: Mapping[str, Any] | None, pretrain_caches: Sequence[str] = ()
                        ) -> tuple[dict[str, list[str]], list[str]]:
    """Collect pretraining identities from an encoder description and explicit cache directories.

    Returns:
        ``(identities, provenance)`` where provenance lists what was read (for the results cell).
    """
    from ecgfm.data.cache import CorpusCache  # local import: keeps this module usable without the cache layer

    idents: dict[str, list[str]] = {}
    provenance: list[str] = []
    extra = dict((encoder_info or {}).get("extra") or {})
    keys = extra.get("pretrain_record_keys")
    if keys:
        for k, v in keys_identities(keys).items():
            idents.setdefault(k, []).extend(v)
        provenance.append(f"encoder.json extra.pretrain_record_keys ({len(keys)} records)")
    caches = list(extra.get("pretrain_caches") or []) + [str(c) for c in pretrain_caches or ()]
    recorded = dict(extra.get("pretrain_cache_digests") or {})
    for path in caches:
        try:
            cache = CorpusCache(path)
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise LeakageError(f"{path}: pretraining cache listed for the leakage check cannot be opened ({exc}); "
                               f"pass allow_leakage=true to skip the check knowingly") from exc
        for k, v in cache_identities(cache).items():
            idents.setdefault(k, []).extend(v)
        note = ""
        if recorded.get(path) is not None:
            from ecgfm.data.cache import digest_matches

            if digest_matches(path, recorded[path]) is False:
                # prepared again in place since the export (a file repaired, added or removed): the check reads the
                # records it holds now, so a record removed since is not compared with the test split
                note = "; CHANGED since pretraining: records removed since are not checked"
                log.warning("leakage check: pretraining cache %s holds other records than when the encoder was "
                            "trained (prepared again since): records removed from it since are not compared with "
                            "the test split; keep the pretraining data, or check those records yourself", path)
        provenance.append(f"cache {path} ({len(cache)} records{note})")
    return idents, provenance


# reader names that several corpora share unless the user names them (FolderSource's defaults): identities are
# source/record_id, so two different folders with the same file names would look like the same records
GENERIC_SOURCE_NAMES = ("folder", "external_folder")


def _generic_name_hint(report: LeakageReport) -> str:
    """A hint for an overlap seen only under a generic reader name (possibly two folders with equal file names)."""
    if {"file", "content"} & set(report.matched_by):   # the same files: one corpus, whatever the names
        return ""
    shared = list(report.shared_records) + list(report.shared_patients)
    sources = {k.split(":", 1)[-1].partition("/")[0] for k in shared}
    if not sources or not sources <= set(GENERIC_SOURCE_NAMES):
        return ""
    return (f" Every shared identity is under the generic source name {', '.join(sorted(sources))!r}: if the "
            f"pretraining folder and this one are different corpora whose file names coincide, give each its own "
            f"source name (e.g. +data.cache_dirs.0.sources.0.name=hospital_a when pretraining, "
            f"+task.sources.0.name=hospital_b, eval_data.sources.0.name=hospital_c) and prepare again.")


def check_leakage(pretrain: Mapping[str, list[str]], test: Mapping[str, list[str]], allow: bool = False,
                  what: str = "test split", against: str | None = None) -> LeakageReport:
    """Raise :class:`LeakageError` when pretraining and test identities overlap (unless ``allow``).

    Args:
        pretrain: identities of the pretraining corpora, or of the data named by ``against``.
        test: identities of the downstream test records.
        allow: report the overlap instead of raising.
        what: name of the test data for the message (e.g. ``"ptbxl_super test split (fold 10)"``).
        against: what ``pretrain`` holds when it is not pretraining data (e.g. ``"the ptbxl_super training and
            validation splits"`` for an external set): the message names it.
    """
    report = find_overlap(pretrain, test)
    if report.leaked and not allow:
        ex = ", ".join(f"{t} ~ {p}" for t, p in report.examples[:5])
        if against is not None:
            raise LeakageError(
                f"leakage: {len(report.shared_records)} record(s) and {len(report.shared_patients)} patient(s) of "
                f"the {what} are also in {against}, which trained or selected the head: scored, they are no "
                f"evidence (e.g. evaluated ~ trained-on: {ex}). Evaluate on data without them, or pass "
                f"allow_leakage=true to report the overlap and continue." + _generic_name_hint(report))
        raise LeakageError(
            f"leakage: the encoder's pretraining data shares {len(report.shared_records)} record(s) and "
            f"{len(report.shared_patients)} patient(s) with the {what} (e.g. test ~ pretraining: {ex}). Exclude "
            f"those records from pretraining, or pass allow_leakage=true to report the overlap and continue."
            + _generic_name_hint(report))
    return report


# ------------------------------------------------------------------------------------------- signal near-copies
# Hand-written on purpose: identities (ids, patients, paths, byte digests) miss a recording filed twice under other
# ids (PTB-XL ecg 140 / 1370: different files, different patient ids, correlation 0.99998). No library matches
# near-duplicate ECGs across two corpora of preprocessed, memory-mapped caches; generic near-duplicate tools hash
# images or text, and a pairwise loop would cost minutes. Same preprocessing => the copies are sample-aligned from
# sample 0, so a z-normalised dot product (a matrix product per chunk of the pool) finds them.

@dataclass
class SignalCopyReport:
    """Result of :func:`signal_copies`; iterates (and ``len``) over its ``pairs``."""

    pairs: list[tuple[str, str, float]] = field(default_factory=list)   # (eval key, pool key, correlation)
    n_eval: int = 0
    n_compared: int = 0        # pool records compared (read once)
    n_skipped: int = 0         # pool records not compared (another sampling rate, or the pool over the limit)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False      # the whole check was skipped (pool larger than ``max_pool_records``)

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"n_eval": self.n_eval, "n_pool_compared": self.n_compared, "n_pool_skipped": self.n_skipped,
                "seconds": round(self.seconds, 3), "skipped": self.skipped, "notes": list(self.notes),
                "n_copies": len(self.pairs)}


def _znorm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead z-normalisation of ``(n, 12, S)`` float32 along time; flat leads become zero.

    Returns ``(z (n, 12, S) float32, live (n, 12) float32: 1 where the lead is present and not flat)``."""
    mu = x.mean(axis=2, keepdims=True, dtype=np.float64).astype(np.float32)
    z = x - mu
    sd = np.sqrt(np.square(z).mean(axis=2, keepdims=True, dtype=np.float64)).astype(np.float32)
    live = sd[..., 0] > 1e-6
    z /= np.where(sd > 1e-6, sd, np.float32(1.0))
    z[~live] = 0.0
    return z, live.astype(np.float32)


def _pair_corr(a: np.ndarray, b: np.ndarray, ma: np.ndarray, mb: np.ndarray) -> float:
    """Correlation of two ``(12, T)`` records over the leads both hold and their common length from sample 0."""
    n = min(a.shape[1], b.shape[1])
    shared = np.asarray(ma, bool) & np.asarray(mb, bool)
    if n < 2 or not shared.any():
        return 0.0
    za, la = _znorm(a[None, :, :n].astype(np.float32))
    zb, lb = _znorm(b[None, :, :n].astype(np.float32))
    sh = shared.astype(np.float32)
    den = n * np.sqrt(float((la[0] * sh).sum()) * float((lb[0] * sh).sum()))
    return float((za[0][shared] * zb[0][shared]).sum(dtype=np.float64) / den) if den > 0 else 0.0


def _screen(ef: np.ndarray, elive: np.ndarray, emask: np.ndarray, pz: np.ndarray, plive: np.ndarray,
            pmask: np.ndarray, cut: float) -> zip:
    """Candidate (evaluation, pool) index pairs whose screened correlation is at least ``cut``.

    Args:
        ef: ``(n_eval, 12 * L)`` z-normalised evaluation windows (:func:`_znorm`, flattened).
        elive: ``(n_eval, 12)`` non-flat evaluation leads; emask: ``(n_eval, 12)`` present evaluation leads.
        pz: ``(n_pool, 12, L)`` z-normalised pool windows; plive / pmask: ``(n_pool, 12)`` as for the evaluation.
        cut: screening threshold.
    """
    L = pz.shape[-1]
    pm = np.asarray(pmask, dtype=np.float32)
    num = ef @ pz.reshape(len(pz), -1).T                                                  # (n_eval, n_pool)
    den = L * np.sqrt((elive @ pm.T) * (np.asarray(emask, np.float32) @ plive.T))       # shared, non-flat energy
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    return zip(*np.nonzero(corr >= cut))


def source_signal_copies(source: Any, eval_ids: Sequence[str], pool_ids: Sequence[str], threshold: float = 0.99,
                         *, screen_margin: float = 0.05, max_screen_seconds: float = 30.0,
                         chunk_records: int = 256) -> list[tuple[str, str, float]]:
    """Records of one source, as it loads them, that are near-copies of some of its other records.

    The check :func:`signal_copies` makes on two prepared caches, made before a pool cache exists: on the records
    ``source.load`` returns (canonical ``(12, T)`` millivolts at the source's rate, no preprocessing), so a pool
    that must not hold copies of evaluation records (:func:`ecgfm.evaluate.tasks.heldout_free_source`) can leave
    them out. Same source, so copies are sample-aligned from sample 0; the score and the screen are
    :func:`signal_copies`' (per-lead z-normalised correlation over the leads both hold and their common length;
    a gain or offset per lead scores 1). Pool records at a rate no evaluation record has are not compared.

    Args:
        source: a :class:`~ecgfm.data.record.RecordSource`.
        eval_ids: record ids of the records to protect (e.g. validation / test records).
        pool_ids: record ids to check against them.
        threshold: correlation at or above which a pair is a copy.
        screen_margin: the screen keeps pairs at ``threshold - screen_margin`` or above for the exact score.
        max_screen_seconds: cap of the screened window (bounds memory for long records).
        chunk_records: pool records loaded and screened at once.

    Returns:
        ``[(eval id, pool id, correlation)]`` sorted by evaluation id, then pool id. Records the source cannot
        read (:class:`~ecgfm.data.record.ECGDataError`, logged) or shorter than 2 samples are not compared.

    Raises:
        ValueError: a threshold outside ``(0, 1]``.

    Cost: one read of every record of the source each time it runs (``heldout_free_source`` runs it whenever the
    pool's config is instantiated, since the pool cache's key is the excluded set): ~2 s for each shared corpus.
    """
    if not 0.0 < float(threshold) <= 1.0:   # 0 made every pair a candidate, > 1 found nothing
        raise ValueError(f"signal copy threshold must be a correlation in (0, 1], got {threshold!r}")

    def readable(ids: Sequence[str]) -> list:
        # a record the source cannot read is not compared (the cache's preparation skips and reports it), nor is
        # one shorter than 2 samples (no correlation: it would shrink the screened window to nothing); NaN / inf
        # samples count as 0 (a NaN zeroed the whole lead's score)
        from ecgfm.data.record import ECGDataError

        out = []
        for rid in ids:
            try:
                rec = source.load(str(rid))
            except ECGDataError as exc:
                log.info("signal copy check: %s not compared (%s)", rid, str(exc).splitlines()[0])
                continue
            if rec.signal.shape[1] >= 2:
                out.append((str(rid), rec, np.nan_to_num(np.asarray(rec.signal, np.float32), nan=0.0,
                                                         posinf=0.0, neginf=0.0)))
        return out

    evals = readable(eval_ids)
    if not evals or not len(pool_ids):
        return []
    efs = np.array([float(r.fs) for _, r, _ in evals])
    found: dict[tuple[int, str], float] = {}
    groups = {}
    for fs in np.unique(efs):
        esel = np.flatnonzero(efs == fs)
        S = int(min(min(evals[i][2].shape[1] for i in esel), max(2, round(max_screen_seconds * fs))))
        ez, elive = _znorm(np.stack([evals[i][2][:, :S] for i in esel]))
        emask = np.stack([evals[i][1].lead_mask for i in esel]).astype(np.float32)
        groups[float(fs)] = (esel, S, ez.reshape(len(esel), -1), elive, emask)
    pool_ids = [str(r) for r in pool_ids]
    for lo in range(0, len(pool_ids), chunk_records):
        recs = readable(pool_ids[lo:lo + chunk_records])
        for fs, (esel, S, ef, elive, emask) in groups.items():
            same = [(pid, r, x) for pid, r, x in recs if np.isclose(float(r.fs), fs)]
            long_ = [(pid, r, x) for pid, r, x in same if x.shape[1] >= S]
            cands = []
            if long_:
                pz, plive = _znorm(np.stack([x[:, :S] for _, _, x in long_]))
                pm = np.stack([r.lead_mask for _, r, _ in long_])
                cands += [(int(esel[i]), long_[j]) for i, j in _screen(ef, elive, emask, pz, plive, pm,
                                                                        threshold - screen_margin)]
            # a pool record shorter than the screened window: scored exactly against each evaluation record
            cands += [(int(e), one) for one in same if one[2].shape[1] < S for e in esel]
            for e, (pid, r, x) in cands:
                c = _pair_corr(evals[e][2], x, evals[e][1].lead_mask, r.lead_mask)
                if c >= threshold:
                    found[(e, pid)] = c
    return sorted((evals[e][0], pid, round(c, 5)) for (e, pid), c in found.items())


def signal_copies(pretrain_caches: Sequence[Any], cache: Any, rows: Sequence[int] | np.ndarray | None = None,
                  threshold: float = 0.99, *, screen_margin: float = 0.05, max_screen_seconds: float = 30.0,
                  max_pool_records: int | None = 200_000, chunk_bytes: int = 128 << 20) -> SignalCopyReport:
    """Pretraining records whose preprocessed signal is a near-copy of an evaluation record.

    Two records are compared over the leads both hold (lead masks) and their common length from sample 0: each
    such lead is z-normalised over that span, and the correlation is ``sum_l <z_a,l, z_b,l> / sqrt(E_a E_b)``
    (``E``: energy of the non-flat shared leads), so a copy rescaled per lead (gain, offset) scores 1. Same
    preprocessing means the copies are aligned; a copy cropped at another start, or resampled, is not seen.

    The pool is read once, in chunks of ``(chunk, 12, S)`` windows from sample 0 (``S``: the shortest evaluation
    record, at most ``max_screen_seconds``; a shorter pool record is compared on its own length): one matrix
    product of normalised vectors per chunk screens every (evaluation, pool) pair at ``threshold -
    screen_margin``, and the few candidates are then scored exactly over their whole common length.

    Args:
        pretrain_caches: pretraining caches (:class:`~ecgfm.data.cache.CorpusCache` or their folders).
        cache: the evaluation cache.
        rows: positional rows of ``cache`` to check (default all), e.g. a split's ``(n_eval,)`` rows.
        threshold: correlation at or above which a pair is a copy.
        screen_margin: the screen keeps pairs at ``threshold - screen_margin`` or above for the exact score.
        max_screen_seconds: cap of the screened window ``S`` (bounds memory for long records).
        max_pool_records: skip the check (``skipped=True``, a note and a log line) when the pools hold more
            records; None: no limit.
        chunk_bytes: memory of one pool chunk ``(chunk, 12, S)`` float32.

    Returns:
        :class:`SignalCopyReport`: ``pairs`` ``[(eval key, pool key, correlation)]`` sorted by evaluation key,
        pool records compared / skipped, notes (pool records at another sampling rate than the evaluation
        records are skipped, not resampled) and the time taken.
    """
    import time

    from ecgfm.data.cache import N_LEADS, CorpusCache

    t0 = time.perf_counter()
    rep = SignalCopyReport()
    pools = [c if isinstance(c, CorpusCache) else CorpusCache(c) for c in pretrain_caches]
    erows = np.arange(len(cache), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    rep.n_eval = len(erows)
    n_pool = sum(len(p) for p in pools)
    if max_pool_records is not None and n_pool > max_pool_records:
        rep.skipped, rep.n_skipped = True, n_pool
        rep.notes.append(f"signal check skipped: the pretraining caches hold {n_pool} records, over the limit "
                         f"{max_pool_records} (pass max_pool_records=None to check anyway)")
        log.info("leakage signal check: %s", rep.notes[-1])
        rep.seconds = time.perf_counter() - t0
        return rep
    if not len(erows) or not n_pool:
        rep.seconds = time.perf_counter() - t0
        return rep
    ecols = cache.records
    efs = np.asarray(ecols["fs"], dtype=np.float64)[erows]
    elen = np.asarray(ecols["n_samples"], dtype=np.int64)[erows]
    emask = np.asarray(ecols["lead_mask"], dtype=bool)[erows]
    found: dict[tuple[int, int, int], float] = {}   # (eval position, pool cache, pool row) -> correlation
    ekeys = cache.index["key"].to_numpy()[erows]
    for pool in pools:   # records at a rate no evaluation record has: skipped with a note, never resampled
        pfs = np.asarray(pool.records["fs"], dtype=np.float64)
        off = ~np.isclose(pfs[:, None], np.unique(efs)[None, :]).any(axis=1)
        if off.any():
            rep.n_skipped += int(off.sum())
            rep.notes.append(f"{int(off.sum())} record(s) of {pool.path} at "
                             f"{', '.join(f'{r:g}' for r in sorted(set(pfs[off].tolist())))} Hz not compared "
                             f"(evaluation records at {', '.join(f'{f:g}' for f in np.unique(efs))} Hz; "
                             f"not resampled)")
    for fs in np.unique(efs):
        esel = np.flatnonzero(efs == fs)
        S = int(min(elen[esel].min(), max(2, round(max_screen_seconds * fs))))
        ez, elive = _znorm(_prefix(cache, erows[esel], S))
        emask_f = emask[esel].astype(np.float32)
        for pi, pool in enumerate(pools):
            pcols = pool.records
            pfs = np.asarray(pcols["fs"], dtype=np.float64)
            plen = np.asarray(pcols["n_samples"], dtype=np.int64)
            pmask_all = np.asarray(pcols["lead_mask"], dtype=bool)
            same = np.flatnonzero(np.isclose(pfs, fs))
            rep.n_compared += len(same)
            # pool records at least S long: screened on [0, S); shorter ones on their own length
            groups: list[tuple[int, np.ndarray]] = [(S, same[plen[same] >= S])]
            short = same[plen[same] < S]
            groups += [(int(L), short[plen[short] == L]) for L in np.unique(plen[short]) if L >= 2]
            for L, prow in groups:
                if not len(prow):
                    continue
                ezL, eliveL = (ez, elive) if L == S else _znorm(_prefix(cache, erows[esel], L))
                ef = ezL.reshape(len(esel), -1)
                chunk = max(1, int(chunk_bytes // (N_LEADS * L * 4)))
                for lo in range(0, len(prow), chunk):
                    rr = prow[lo:lo + chunk]
                    pz, plive = _znorm(_prefix(pool, rr, L))
                    for i, j in _screen(ef, eliveL, emask_f, pz, plive, pmask_all[rr], threshold - screen_margin):
                        e, p = int(erows[esel[i]]), int(rr[j])
                        c = _pair_corr(cache.signal(e), pool.signal(p), emask[esel[i]], pmask_all[p])
                        if c >= threshold:
                            found[(int(esel[i]), pi, p)] = c
    pkeys = {pi: pools[pi].index["key"].to_numpy() for pi in {k[1] for k in found}}
    rep.pairs = sorted((str(ekeys[e]), str(pkeys[pi][p]), round(c, 5)) for (e, pi, p), c in found.items())
    rep.seconds = time.perf_counter() - t0
    return rep


def _prefix(cache: Any, rows: np.ndarray, length: int) -> np.ndarray:
    """``(n, 12, length)`` float32 windows of ``rows`` from sample 0."""
    from ecgfm.data.cache import N_LEADS

    out = np.zeros((len(rows), N_LEADS, length), dtype=np.float32)
    cache.read_windows_into(rows, np.zeros(len(rows), np.int64), out)
    return out


_SIGNAL_MEMO: dict[tuple, SignalCopyReport] = {}


def _cache_fingerprint(c: Any) -> tuple[str, str | None]:
    from ecgfm.data.cache import cache_digest

    path = str(getattr(c, "path", c))
    return os.path.realpath(path), cache_digest(path)


def signal_copies_memo(pretrain_caches: Sequence[Any], cache: Any, rows: Sequence[int] | np.ndarray | None = None,
                       threshold: float = 0.99, **kwargs: Any) -> SignalCopyReport:
    """:func:`signal_copies`, memoised in this process per (pretraining cache folders and digests, evaluation
    cache folder and digest, rows, threshold, options): a sweep of many cells over the same data pays once. A
    cache prepared again in place gets another digest (:func:`~ecgfm.data.cache.cache_digest`), so it is read
    again."""
    r = np.arange(len(cache), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    key = (tuple(_cache_fingerprint(c) for c in pretrain_caches), _cache_fingerprint(cache),
           hashlib.sha256(r.tobytes()).hexdigest(), float(threshold), tuple(sorted(kwargs.items())))
    if key not in _SIGNAL_MEMO:
        _SIGNAL_MEMO[key] = signal_copies(pretrain_caches, cache, r, threshold, **kwargs)
    return _SIGNAL_MEMO[key]
