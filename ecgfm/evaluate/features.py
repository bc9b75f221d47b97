"""Frozen-encoder features, extracted once per (encoder weights, corpus cache, window settings) and cached on disk.

Every record of a cache is cut into sliding windows of ``window`` samples every ``stride`` samples
(:func:`ecgfm.data.preprocess.sliding_windows`: the last window is aligned to the end so the whole record is
covered; records shorter than a window are zero-padded); each window goes through ``backbone.embed`` once. The
result, a :class:`FeatureSet` (window embeddings and the record each belongs to), is written atomically to
``<feature_dir>/<key>.npz`` (plain arrays, loaded with ``allow_pickle=False``). The key hashes

* the encoder: registry name, constructor arguments and the bytes of every weight tensor (so a path, a random
  initialisation with a given seed, or a re-export of the same weights all map to the right entry);
* the cache: its ``plan_fingerprint`` (sources + preprocessing spec + shard layout) and record count;
* ``window`` and ``stride``.

Hence a sweep over many heads, label fractions and seeds (and every PTB-XL task, which share one cache) runs the
encoder once per checkpoint and corpus. :data:`STATS` counts real extractions (encoder passes over a corpus) so
``scripts/bench_probe.py`` and the tests can prove it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgfm.data.preprocess import sliding_windows

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
    """

    features: np.ndarray
    record: np.ndarray
    n_records: int
    key: str = ""
    seconds: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def record_means(self) -> np.ndarray:
        """``(n_records, D)`` mean window embedding of each record."""
        sums = np.zeros((self.n_records, self.dim), dtype=np.float64)
        np.add.at(sums, self.record, self.features)
        counts = np.bincount(self.record, minlength=self.n_records)[:, None]
        return (sums / np.maximum(counts, 1)).astype(np.float32)

    def windows_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of the given records: ``(features (w, D), position of each window's record in rows (w,))``."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.full(self.n_records, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        sel = pos[self.record] >= 0
        return self.features[sel], pos[self.record[sel]]


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
    """Identity of a prepared corpus: its plan fingerprint (sources, spec, layout) and record count."""
    manifest = getattr(cache, "manifest", {}) or {}
    fp = manifest.get("plan_fingerprint") or manifest.get("spec_fingerprint") or str(getattr(cache, "path", ""))
    return hashlib.sha256(f"{fp}|{len(cache)}".encode()).hexdigest()[:20]


def feature_key(encoder_fp: str, cache_fp: str, window: int, stride: int) -> str:
    return hashlib.sha256(f"{encoder_fp}|{cache_fp}|w{int(window)}|s{int(stride)}".encode()).hexdigest()[:24]


@torch.no_grad()
def extract_features(backbone: nn.Module, cache: Any, window: int, stride: int, batch_size: int = 256,
                     device: str | torch.device = "cpu", rows: np.ndarray | None = None) -> FeatureSet:
    """Embed every sliding window of every record (or ``rows``) of ``cache``; no disk cache.

    Args:
        backbone: encoder with ``embed((B, 12, window)) -> (B, D)``; put in eval mode here.
        cache: a :class:`~ecgfm.data.cache.CorpusCache` (or any object with ``len`` and ``signal(i)``).
        window: window length in samples.
        stride: hop between windows in samples.
        batch_size: windows per forward pass.
        device: torch device.
        rows: records to embed (default all); the result's ``record`` refers to cache rows either way.

    Returns:
        :class:`FeatureSet` with ``n_records = len(cache)``.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    t0 = time.perf_counter()
    was_training = backbone.training
    backbone.eval().to(device)
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)
    feats: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    buf_owner: list[int] = []

    done = [0]

    def flush() -> None:
        x = torch.from_numpy(np.stack(buf)).to(device)
        feats.append(backbone.embed(x).float().cpu().numpy())
        owners.append(np.asarray(buf_owner, dtype=np.int64))
        done[0] += len(buf)
        buf.clear()
        buf_owner.clear()
        if len(feats) % 20 == 0:
            dt = time.perf_counter() - t0
            log.info("features: %d windows of %d/%d records in %.0f s (%.0f windows/s)", done[0],
                     int(owners[-1][-1]) + 1, len(cache), dt, done[0] / max(dt, 1e-9))

    for i in rows:
        wins = sliding_windows(cache.signal(int(i)), int(window), int(stride))  # (n, 12, window)
        for w in wins:
            buf.append(np.ascontiguousarray(w, dtype=np.float32))
            buf_owner.append(int(i))
            if len(buf) >= batch_size:
                flush()
    if buf:
        flush()
    backbone.train(was_training)
    seconds = time.perf_counter() - t0
    out = FeatureSet(features=np.concatenate(feats) if feats else np.zeros((0, 0), np.float32),
                     record=np.concatenate(owners) if owners else np.zeros(0, np.int64),
                     n_records=len(cache), seconds=seconds)
    STATS["extractions"] += 1
    STATS["windows"] += int(out.features.shape[0])
    STATS["seconds"] += seconds
    log.info("features: %d windows (%d samples, stride %d) of %d records in %.1f s = %.0f windows/s",
             out.features.shape[0], window, stride, len(rows), seconds, out.features.shape[0] / max(seconds, 1e-9))
    return out


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_features(backbone: nn.Module, cache: Any, window: int, stride: int, feature_dir: str | os.PathLike,
                    batch_size: int = 256, device: str | torch.device = "cpu",
                    encoder_fp: str | None = None) -> FeatureSet:
    """:func:`extract_features` behind an on-disk cache (see the module docstring for the key).

    Args:
        backbone: the frozen encoder.
        cache: the corpus cache.
        window: window length in samples.
        stride: hop in samples.
        feature_dir: folder of ``<key>.npz`` files.
        batch_size: windows per forward pass.
        device: torch device.
        encoder_fp: precomputed :func:`encoder_fingerprint` (computed when None).
    """
    encoder_fp = encoder_fp or encoder_fingerprint(backbone)
    key = feature_key(encoder_fp, cache_fingerprint(cache), window, stride)
    path = Path(feature_dir) / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                fs = FeatureSet(features=z["features"], record=z["record"], n_records=int(z["n_records"]),
                                key=key)
            if fs.n_records == len(cache):
                STATS["cache_hits"] += 1
                return fs
        except (OSError, ValueError, KeyError):
            pass  # damaged or foreign file: recompute and overwrite atomically
    fs = extract_features(backbone, cache, window, stride, batch_size=batch_size, device=device)
    fs.key = key
    _atomic_savez(path, features=fs.features, record=fs.record, n_records=np.asarray(fs.n_records),
                  window=np.asarray(window), stride=np.asarray(stride))
    return fs
