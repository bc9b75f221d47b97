"""Frozen-encoder features, extracted once per (encoder weights, corpus cache, window settings) and cached on disk.

Every record of a cache is cut into sliding windows of ``window`` samples every ``stride`` samples
(:func:`ecgfm.data.preprocess.sliding_windows`: the last window is aligned to the end so the whole record is
covered; records shorter than a window are zero-padded); each window goes through ``backbone.embed`` once. The
result, a :class:`FeatureSet` (window embeddings and the record each belongs to), is written atomically to
``<feature_dir>/<key>.npz`` (plain arrays, loaded with ``allow_pickle=False``). The key hashes

* the encoder: registry name, constructor arguments and the bytes of every weight tensor (so a path, a random
  initialisation with a given seed, or a re-export of the same weights all map to the right entry);
* the cache: its ``plan_fingerprint`` (sources + preprocessing spec + shard layout) and record count;
* ``window`` and ``stride``;
* a ``leads`` flag when the extraction is lead-aware and the cache holds records with absent leads (below).

Lead-aware extraction (default): a backbone whose ``embed`` takes ``lead_mask`` (:func:`accepts_lead_mask`,
e.g. :class:`~ecgfm.backbones.vit1d.ViT1D`) gets each window's record mask from the cache, so absent
(zero-padded) leads make no tokens and do not dilute the pooled embedding; a one-lead corpus then costs about 1/12
of the zero-padded 12-lead grid. With every lead present the embeddings are bit-identical to the zero-padded path,
so a cache whose records all have 12 leads keeps its old key (and feature files); a cache with partial lead sets
gets a new key, so zero-padded features written before are never reused for it. ``lead_aware=False`` restores the
zero-padded extraction (the fine-tuning LP-FT head uses it, to match the fine-tuned model's forward pass).

Hence a sweep over many heads, label fractions and seeds (and every PTB-XL task, which share one cache) runs the
encoder once per checkpoint and corpus. :data:`STATS` counts real extractions (encoder passes over a corpus) so
``scripts/bench_probe.py`` and the tests can prove it.

Nothing non-finite gets through: a record whose signal holds NaN / Inf, or whose embedding does, raises
:class:`~ecgfm.data.cache.NonFiniteDataError` naming the cache, shard and record keys (``nonfinite="error"``,
default), or is left out with all its windows and listed in :attr:`FeatureSet.skipped` (``nonfinite="skip"``);
such values are never written to the feature cache nor handed to a probe. A feature file that cannot be read
or fails validation (truncated, foreign, wrong shapes, non-finite values) is recomputed with a log line.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ecgfm.data.cache import NonFiniteDataError
from ecgfm.data.preprocess import sliding_windows
from ecgfm.io import atomic_write

log = logging.getLogger(__name__)

#: counters of real work done in this process: ``extractions`` (encoder passes over a corpus), ``windows``
#: (windows embedded), ``cache_hits`` (feature sets loaded from disk), ``seconds`` (time spent embedding).
STATS: collections.Counter = collections.Counter()


@dataclass
class FeatureSet:
    """Window embeddings of every record of a cache.

    Attributes:
        features: ``(W, D)`` float32 window embeddings.
        record: ``(W,)`` int64 cache row of each window.
        n_records: number of records in the cache.
        key: the cache key.
        seconds: extraction time (0 when loaded).
        skipped: ``(S,)`` int64 cache rows left out for non-finite input or embeddings (``nonfinite="skip"``);
            they have no windows. Use :meth:`valid_rows` before handing rows to a probe.
    """

    features: np.ndarray
    record: np.ndarray
    n_records: int
    key: str = ""
    seconds: float = 0.0
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def record_means(self) -> np.ndarray:
        """``(n_records, D)`` mean window embedding of each record (NaN rows for :attr:`skipped` records, so
        a caller that forgets :meth:`valid_rows` fails loudly instead of fitting on zeros)."""
        sums = np.zeros((self.n_records, self.dim), dtype=np.float64)
        np.add.at(sums, self.record, self.features)
        counts = np.bincount(self.record, minlength=self.n_records)[:, None]
        means = (sums / np.maximum(counts, 1)).astype(np.float32)
        means[np.asarray(self.skipped, dtype=np.int64)] = np.nan
        return means

    def valid_rows(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` without the :attr:`skipped` records (order kept)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows[~np.isin(rows, np.asarray(self.skipped, dtype=np.int64))]

    def windows_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of the given records: ``(features (w, D), position of each window's record in rows (w,))``."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.full(self.n_records, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        sel = pos[self.record] >= 0
        return self.features[sel], pos[self.record[sel]]


def accepts_lead_mask(backbone: nn.Module) -> bool:
    """Whether ``backbone.embed`` takes ``lead_mask`` (class attribute ``accepts_lead_mask`` or the signature)."""
    if getattr(backbone, "accepts_lead_mask", False):
        return True
    try:
        return "lead_mask" in inspect.signature(backbone.embed).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _lead_masks(cache: Any) -> np.ndarray | None:
    """``(N, 12)`` bool record lead masks of ``cache``, or None when it cannot say."""
    masks = getattr(cache, "lead_masks", None)
    if masks is None:
        return None
    masks = np.asarray(masks, dtype=bool)
    return masks if masks.ndim == 2 and len(masks) == len(cache) else None


def uses_lead_masks(backbone: nn.Module, cache: Any, lead_aware: bool = True) -> bool:
    """Whether a lead-aware extraction of ``cache`` differs from the zero-padded one: ``lead_aware``, the backbone
    accepts ``lead_mask`` and some record of the cache lacks a lead."""
    if not lead_aware or not accepts_lead_mask(backbone):
        return False
    masks = _lead_masks(cache)
    return masks is not None and not bool(masks.all())


def encoder_fingerprint(backbone: nn.Module) -> str:
    """Stable hash of a backbone's identity: name, ``init_args`` and every tensor of its ``state_dict``."""
    h = hashlib.sha256()
    h.update(str(getattr(backbone, "name", type(backbone).__name__)).encode())
    h.update(json.dumps(getattr(backbone, "init_args", {}), sort_keys=True, default=str).encode())
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cache_fingerprint(cache: Any) -> str:
    """Identity of a prepared corpus: its plan fingerprint (sources, spec, layout), record count and the sha256
    of every shard's signals (a shard converted again after its input changed gives new features)."""
    manifest = getattr(cache, "manifest", {}) or {}
    fp = manifest.get("plan_fingerprint") or manifest.get("spec_fingerprint") or str(getattr(cache, "path", ""))
    shards = ",".join(str(sh.get("bin_sha256", "")) for sh in manifest.get("shards", []) or [])
    return hashlib.sha256(f"{fp}|{len(cache)}|{shards}".encode()).hexdigest()[:20]


def feature_key(encoder_fp: str, cache_fp: str, window: int, stride: int, lead_aware: bool = False) -> str:
    """Feature-cache key; ``lead_aware`` (only when it changes the features, see :func:`uses_lead_masks`) adds a
    flag, so zero-padded features are never reused for a lead-aware extraction."""
    leads = "|leads" if lead_aware else ""
    return hashlib.sha256(f"{encoder_fp}|{cache_fp}|w{int(window)}|s{int(stride)}{leads}".encode()).hexdigest()[:24]


NONFINITE_MODES = ("error", "skip")


def _nonfinite_error(cache: Any, rows: Sequence[int], what: str) -> NonFiniteDataError:
    """The error naming cache, shard and record keys (any cache object: falls back to row numbers)."""
    rows = sorted({int(r) for r in rows})
    make = getattr(cache, "nonfinite_error", None)
    if callable(make):
        return make(rows, what)
    return NonFiniteDataError(str(getattr(cache, "path", "<cache>")),
                              f"non-finite values (NaN/Inf) in {what} of rows {rows[:10]}; pass nonfinite='skip' "
                              f"to leave such records out")


@torch.no_grad()
def extract_features(backbone: nn.Module, cache: Any, window: int, stride: int, batch_size: int = 256,
                     device: str | torch.device = "cpu", rows: np.ndarray | None = None,
                     nonfinite: str = "error", lead_aware: bool = True) -> FeatureSet:
    """Embed every sliding window of every record (or ``rows``) of ``cache``; no disk cache.

    Args:
        backbone: encoder with ``embed((B, 12, window)) -> (B, D)``; put in eval mode here.
        cache: a :class:`~ecgfm.data.cache.CorpusCache` (or any object with ``len`` and ``signal(i)``).
        window: window length in samples.
        stride: hop between windows in samples.
        batch_size: windows per forward pass.
        device: torch device.
        rows: records to embed (default all); the result's ``record`` refers to cache rows either way.
        nonfinite: a record whose signal or any window embedding holds NaN / Inf raises
            :class:`~ecgfm.data.cache.NonFiniteDataError` naming it (``"error"``), or is left out with all its
            windows and listed in ``FeatureSet.skipped`` (``"skip"``).
        lead_aware: pass each window's record lead mask (``cache.lead_masks``) to a backbone that accepts it
            (:func:`uses_lead_masks`); False: every window as a zero-padded 12-lead input.

    Returns:
        :class:`FeatureSet` with ``n_records = len(cache)``; every feature finite.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    t0 = time.perf_counter()
    was_training = backbone.training
    backbone.eval().to(device)
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)
    feats: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    buf_owner: list[int] = []
    masks = _lead_masks(cache) if uses_lead_masks(backbone, cache, lead_aware) else None
    bad_input: list[int] = []
    bad_embedding: set[int] = set()

    done = [0]

    def flush() -> None:
        x = torch.from_numpy(np.stack(buf)).to(device)
        owner = np.asarray(buf_owner, dtype=np.int64)
        if masks is None:
            z = backbone.embed(x).float().cpu().numpy()
        else:
            z = backbone.embed(x, lead_mask=torch.from_numpy(masks[owner]).to(device)).float().cpu().numpy()
        bad = ~np.isfinite(z).all(axis=1)
        if bad.any():
            if nonfinite == "error":
                rows_bad = sorted(set(owner[bad].tolist()))
                raise NonFiniteDataError(str(getattr(cache, "path", "<cache>")),
                                         f"{_describe(cache, rows_bad)}: the encoder returned non-finite embeddings "
                                         f"(NaN/Inf) for finite input windows of {len(rows_bad)} record(s); the "
                                         f"encoder is broken (non-finite weights?) or unstable on them; pass "
                                         f"nonfinite='skip' to leave such records out")
            bad_embedding.update(owner[bad].tolist())
        feats.append(z)
        owners.append(owner)
        done[0] += len(buf)
        buf.clear()
        buf_owner.clear()
        if len(feats) % 20 == 0:
            dt = time.perf_counter() - t0
            log.info("features: %d windows of %d/%d records in %.0f s (%.0f windows/s)", done[0],
                     int(owners[-1][-1]) + 1, len(cache), dt, done[0] / max(dt, 1e-9))

    try:
        for i in rows:
            signal = cache.signal(int(i))
            if not np.isfinite(signal).all():
                if nonfinite == "error":
                    raise _nonfinite_error(cache, [int(i)], "the input signal")
                bad_input.append(int(i))
                continue
            wins = sliding_windows(signal, int(window), int(stride))  # (n, 12, window)
            for w in wins:
                buf.append(np.ascontiguousarray(w, dtype=np.float32))
                buf_owner.append(int(i))
                if len(buf) >= batch_size:
                    flush()
        if buf:
            flush()
    finally:
        backbone.train(was_training)
    seconds = time.perf_counter() - t0
    features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    record = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    skipped = np.asarray(sorted(set(bad_input) | bad_embedding), dtype=np.int64)
    if len(skipped):
        keep = ~np.isin(record, skipped)
        features, record = features[keep], record[keep]
        log.warning("features: left out %d record(s) with non-finite input or embeddings (nonfinite='skip'): %s",
                    len(skipped), _describe(cache, skipped))
    out = FeatureSet(features=features, record=record, n_records=len(cache), seconds=seconds, skipped=skipped)
    STATS["extractions"] += 1
    STATS["windows"] += int(out.features.shape[0])
    STATS["seconds"] += seconds
    log.info("features: %d windows (%d samples, stride %d) of %d records in %.1f s = %.0f windows/s%s",
             out.features.shape[0], window, stride, len(rows), seconds, out.features.shape[0] / max(seconds, 1e-9),
             " (lead-aware)" if masks is not None else "")
    return out


def _describe(cache: Any, rows: Sequence[int]) -> str:
    describe = getattr(cache, "describe_records", None)
    return describe(rows) if callable(describe) else f"rows {list(rows)[:10]}"


def _save_features(path: Path, fs: FeatureSet, window: int, stride: int) -> None:
    """Write a feature set atomically (a temporary file renamed over ``path``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, features=fs.features, record=fs.record, n_records=np.asarray(fs.n_records),
                     window=np.asarray(window), stride=np.asarray(stride), skipped=fs.skipped)

    atomic_write(path, write)


def _load_features(path: Path, key: str, n_records: int, window: int, stride: int) -> FeatureSet:
    """Read and validate a feature file; ``ValueError`` saying what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("features", "record", "n_records", "window", "stride")}
            skipped = z["skipped"] if "skipped" in z.files else np.zeros(0, np.int64)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, KeyError, OSError...
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None
    feats, record = arrays["features"], arrays["record"]
    if int(arrays["n_records"]) != n_records or int(arrays["window"]) != window or int(arrays["stride"]) != stride:
        raise ValueError("written for another cache or window (record count / window / stride differ)")
    if feats.ndim != 2 or record.ndim != 1 or len(feats) != len(record) or feats.dtype.kind != "f" \
            or record.dtype.kind not in "iu":
        raise ValueError(f"wrong arrays (features {feats.shape} {feats.dtype}, record {record.shape})")
    if len(record) and (record.min() < 0 or record.max() >= n_records):
        raise ValueError("record rows out of range")
    if not np.isfinite(feats).all():
        raise ValueError("holds non-finite features")
    return FeatureSet(features=feats, record=record.astype(np.int64), n_records=n_records, key=key,
                      skipped=np.asarray(skipped, dtype=np.int64))


def cached_features(backbone: nn.Module, cache: Any, window: int, stride: int, feature_dir: str | os.PathLike,
                    batch_size: int = 256, device: str | torch.device = "cpu",
                    encoder_fp: str | None = None, nonfinite: str = "error", lead_aware: bool = True) -> FeatureSet:
    """:func:`extract_features` behind an on-disk cache (see the module docstring for the key).

    A feature file that cannot be read or fails validation is recomputed and replaced, with a log line. A file
    holding records left out for non-finite values (written with ``nonfinite="skip"``) raises
    :class:`~ecgfm.data.cache.NonFiniteDataError` naming them when read with ``nonfinite="error"``.

    Args:
        backbone: the frozen encoder.
        cache: the corpus cache.
        window: window length in samples.
        stride: hop in samples.
        feature_dir: folder of ``<key>.npz`` files.
        batch_size: windows per forward pass.
        device: torch device.
        encoder_fp: precomputed :func:`encoder_fingerprint` (computed when None).
        nonfinite: ``"error"`` or ``"skip"``, see :func:`extract_features`.
        lead_aware: see :func:`extract_features`; part of the key when it changes the features.
    """
    encoder_fp = encoder_fp or encoder_fingerprint(backbone)
    key = feature_key(encoder_fp, cache_fingerprint(cache), window, stride,
                      uses_lead_masks(backbone, cache, lead_aware))
    path = Path(feature_dir) / f"{key}.npz"
    if path.exists():
        try:
            fs = _load_features(path, key, len(cache), int(window), int(stride))
        except ValueError as exc:
            log.warning("feature cache %s: %s; recomputing it", path, exc)
        else:
            if len(fs.skipped) and nonfinite == "error":
                raise _nonfinite_error(cache, fs.skipped, "the input or embeddings (feature cache written with "
                                                          "nonfinite='skip')")
            STATS["cache_hits"] += 1
            return fs
    fs = extract_features(backbone, cache, window, stride, batch_size=batch_size, device=device,
                          nonfinite=nonfinite, lead_aware=lead_aware)
    fs.key = key
    _save_features(path, fs, int(window), int(stride))
    return fs
