"""Frozen-encoder features, extracted once per (encoder weights, corpus cache, window settings) and cached on disk.

Every record of a cache is cut into sliding windows of ``window`` samples every ``stride`` samples
(:func:`ecgfm.data.preprocess.sliding_windows`: the last window is aligned to the end so the whole record is
covered; records shorter than a window are zero-padded; a ``stride`` longer than the ``window`` leaves gaps that
are never embedded, which is allowed with a warning); each window goes through ``backbone.embed`` once. The
result, a :class:`FeatureSet` (window embeddings and the record each belongs to), is written atomically to
``<feature_dir>/<key>.npz`` (plain arrays, loaded with ``allow_pickle=False``). The key hashes

* the extraction code: :data:`FEATURE_SCHEMA`, bumped with any change to how features are extracted (``embed``,
  ``embed_stages``, ``window_tokens``, ``sliding_windows``, the lead-mask handling...), so features written by
  older code are never reused;
* the encoder: registry name, constructor arguments, the bytes of every weight tensor (so a path, a random
  initialisation with a given seed, or a re-export of the same weights all map to the right entry) and the
  backbone's ``embed_version`` attribute when it defines one (a backbone class bumps it when its own embedding
  code changes);
* the cache: its ``plan_fingerprint`` (sources + preprocessing spec + shard layout) and record count;
* ``window`` and ``stride``;
* ``tokens`` for a token cache (:func:`cached_tokens`) and ``stages`` for stage-wise embeddings;
* a ``leads`` flag when the extraction is lead-aware and the cache holds records with absent leads (below).

Lead-aware extraction (default): a backbone whose ``embed`` takes ``lead_mask`` (:func:`accepts_lead_mask`,
e.g. :class:`~ecgfm.backbones.vit1d.ViT1D`) gets each window's record mask from the cache, so absent
(zero-padded) leads make no tokens and do not dilute the pooled embedding; a one-lead corpus then costs about 1/12
of the zero-padded 12-lead grid. With every lead present the embeddings are bit-identical to the zero-padded path,
so a cache whose records all have 12 leads shares the zero-padded extraction's key (and feature files); a cache
with partial lead sets gets a key of its own, so zero-padded features are never reused for it.
``lead_aware=False`` restores the zero-padded extraction (the fine-tuning LP-FT head uses it, to match the
fine-tuned model's forward pass).

Hence a sweep over many heads, label fractions and seeds (and every PTB-XL task, which share one cache) runs the
encoder once per checkpoint and corpus. :data:`STATS` counts real extractions (encoder passes over a corpus) so
``scripts/bench_probe.py`` and the tests can prove it.

Aggregation that keeps beat-to-beat variability: :meth:`FeatureSet.record_stats` is the concatenation of the mean
and the (population) standard deviation of a record's window embeddings, ``(N, 2D)`` (``probe.aggregate=mean_std``;
a one-window record has std 0).

Windows longer than the encoder's pretraining crop (``window_seconds=10`` for an encoder pretrained on 2.5 s):
:func:`fit_window` gives the backbone that embeds them. A :class:`~ecgfm.backbones.vit1d.ViT1D` has fixed sin-cos
positions (a non-persistent buffer) and no learned position weights, so it is rebuilt with a longer ``seq_len``
and the same weights (checked tensor by tensor); its embedding of a window within the old ``seq_len`` is unchanged.
A backbone with learned positions or another hard length limit (``seq_len`` attribute, e.g. ST-MEM's
:class:`~ecgfm.backbones.stmem.StMemViT`) is refused with an error naming its limit; CNNs and HuBERT-ECG (no
``seq_len``) take any length as they are. The window is part of every cache key.

Token cache (``probe.mode=attention``, :func:`cached_tokens`): the frozen *tokens* of every window, float16, in the
same folder under a distinct key (:func:`feature_key` with ``kind="tokens"``): a :class:`TokenSet` with per-window and
per-record offsets. Tokens are what the pooled embedding averages: a ViT's patch tokens (the lead-aware ViT: the
present leads' patch tokens only; SEP tokens excluded), HuBERT-ECG's frames, a CNN's final feature-map positions
(``(B, C, T') -> T'`` tokens of width ``C``). Cost on disk: records x windows x tokens per window x dim x 2 bytes
(CinC 2017 with a 1-lead ViT of width 192, 2.5 s windows of 10 patches: 33,262 windows x 10 x 192 x 2 B = 128 MB; a
12-lead record multiplies the tokens per window by 12; the 1-D ResNet at 5 s strides: 233 MB = 222 MiB). The tokens are not
held in memory: :func:`cached_tokens` streams them batch by batch into a raw float16 file
``<key>.<nonce>.tokens`` and hands back a read-only ``np.memmap`` of it, so extraction needs memory for one batch
and the attention probe pages in the records of its current minibatch, whatever the corpus size. ``<key>.npz`` holds
the small arrays (offsets, records) and names its token file; it is written last and is the commit point: a
token file without it, or of the wrong size, is never read (an older token file of the key is removed once a new
``.npz`` names another; ``.npz`` files of the single-file format written before hold the tokens themselves and are
still read).

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
from typing import Any, Iterator, Sequence

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


class _SkippedRecords:
    """What :class:`FeatureSet` and :class:`TokenSet` share about their ``skipped`` cache rows."""

    def valid_rows(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` without the :attr:`skipped` records (order kept)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows[~np.isin(rows, np.asarray(self.skipped, dtype=np.int64))]


@dataclass
class FeatureSet(_SkippedRecords):
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
        """``(n_records, D)`` mean window embedding of each record (NaN rows for records without windows: the
        :attr:`skipped` ones and those not extracted (``extract_features(rows=...)``), so a caller that forgets
        :meth:`valid_rows` fails loudly instead of fitting on zeros)."""
        sums = np.zeros((self.n_records, self.dim), dtype=np.float64)
        np.add.at(sums, self.record, self.features)
        counts = np.bincount(self.record, minlength=self.n_records)[:, None]
        means = (sums / np.maximum(counts, 1)).astype(np.float32)
        means[counts[:, 0] == 0] = np.nan
        return means

    def record_stats(self) -> np.ndarray:
        """``(n_records, 2D)`` record features that keep window-to-window variability: ``[mean, std]`` of each
        record's window embeddings (population std, ddof 0: a one-window record has std 0). Records without
        windows (:attr:`skipped`, not extracted) are NaN rows, as in :meth:`record_means`."""
        counts = np.bincount(self.record, minlength=self.n_records)[:, None].astype(np.float64)
        sums = np.zeros((self.n_records, self.dim), dtype=np.float64)
        np.add.at(sums, self.record, self.features)
        mean = sums / np.maximum(counts, 1)
        sq = np.zeros_like(sums)
        np.add.at(sq, self.record, (self.features.astype(np.float64) - mean[self.record]) ** 2)
        std = np.sqrt(sq / np.maximum(counts, 1))
        out = np.concatenate([mean, std], axis=1).astype(np.float32)
        out[counts[:, 0] == 0] = np.nan
        return out

    def windows_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of the given records: ``(features (w, D), position of each window's record in rows (w,))``."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.full(self.n_records, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        sel = pos[self.record] >= 0
        return self.features[sel], pos[self.record[sel]]


def with_record_features(fs: FeatureSet, side: FeatureSet, aggregate: str = "mean_embedding") -> FeatureSet:
    """One row per record: the encoder's aggregated record features (``aggregate``: ``mean_embedding`` -> mean,
    ``mean_std`` -> mean and std of its window embeddings) followed by ``side``'s record means (e.g. the handcrafted
    baseline's whole-record features, :func:`ecgfm.evaluate.handcrafted.cached_handcrafted`), ``(N, D + D_side)``.
    A record skipped by either is skipped (and has no row).

    Args:
        fs: window embeddings of the corpus.
        side: record features of the same corpus (same cache rows).
        aggregate: ``mean_embedding`` or ``mean_std``.

    Returns:
        A :class:`FeatureSet` with one window per kept record; its key joins both keys.
    """
    if fs.n_records != side.n_records:
        raise ValueError(f"record features of another corpus: {fs.n_records} records here, {side.n_records} in the "
                         f"side features")
    if aggregate not in ("mean_embedding", "mean_std"):
        raise ValueError(f"aggregate must be mean_embedding or mean_std to append record features, got {aggregate!r}")
    own = fs.record_means() if aggregate == "mean_embedding" else fs.record_stats()
    skipped = np.union1d(np.asarray(fs.skipped, np.int64), np.asarray(side.skipped, np.int64))
    has = np.zeros(fs.n_records, bool)
    has[np.intersect1d(fs.record, side.record)] = True
    has[skipped] = False
    rows = np.flatnonzero(has)
    feats = np.concatenate([own[rows], side.record_means()[rows]], axis=1).astype(np.float32)
    return FeatureSet(features=feats, record=rows.astype(np.int64), n_records=fs.n_records,
                      key=f"{fs.key}+{side.key}", seconds=fs.seconds + side.seconds, skipped=skipped)


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


#: version of the feature extraction code, part of every :func:`feature_key`. Bump it with ANY change to how
#: features are extracted (a backbone's ``embed`` / ``embed_stages`` / ``window_tokens``,
#: :func:`~ecgfm.data.preprocess.sliding_windows`, the lead-mask handling, the token layout...): the feature caches
#: written before are then recomputed on the next run instead of being reused silently (stale features).
FEATURE_SCHEMA = 1


def encoder_fingerprint(backbone: nn.Module) -> str:
    """Stable hash of a backbone's identity: name, ``init_args`` (else its recorded constructor arguments), every
    tensor of its ``state_dict`` and, when the backbone defines it (not None), its ``embed_version`` attribute (an
    int or str a backbone class bumps when its embedding code changes; backbones without it keep their
    fingerprint)."""
    h = hashlib.sha256()
    h.update(str(getattr(backbone, "name", type(backbone).__name__)).encode())
    version = getattr(backbone, "embed_version", None)
    if version is not None:
        h.update(f"|embed_version={version!r}|".encode())
    # a backbone built without the registry has no init_args: its recorded constructor call stands in (settings
    # such as pool="avg" / "concat" change the features, not the weights)
    args = getattr(backbone, "init_args", None) or getattr(backbone, "_constructor_args", None) or {}
    h.update(json.dumps(args, sort_keys=True, default=str).encode())
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cache_fingerprint(cache: Any) -> str:
    """Identity of a prepared corpus: its plan fingerprint (sources, spec, layout), record count, the sha256 of
    every shard's signals (a shard converted again after its input changed gives new features) and the records'
    lead masks (lead-aware features depend on them: equal signal bytes with other masks are other features). A
    corpus without a manifest (in memory) is identified by the sha256 of its signals."""
    manifest = getattr(cache, "manifest", {}) or {}
    fp = manifest.get("plan_fingerprint") or manifest.get("spec_fingerprint")
    shards = ",".join(str(sh.get("bin_sha256", "")) for sh in manifest.get("shards", []) or [])
    if not fp and not shards.strip(","):
        # no manifest (an in-memory corpus with len() and signal(i)): a path or a record count does not tell two
        # corpora apart, so the signals themselves are hashed (such corpora are small)
        h = hashlib.sha256(str(getattr(cache, "fs", "")).encode())
        for i in range(len(cache)):
            h.update(np.ascontiguousarray(np.asarray(cache.signal(i)), dtype=np.float32).tobytes())
            h.update(b"|")
        fp = f"content:{h.hexdigest()}"
    masks = getattr(cache, "lead_masks", None)
    lm = hashlib.sha256(np.ascontiguousarray(masks, dtype=bool).tobytes()).hexdigest()[:16] if masks is not None \
        else ""
    return hashlib.sha256(f"{fp}|{len(cache)}|{shards}|{lm}".encode()).hexdigest()[:20]


FEATURE_KINDS = ("embeddings", "tokens", "stages")
#: which embedding a probe reads: ``last`` (``embed``: the pooled last layer) or ``stages`` (``embed_stages``: every
#: stage pooled and concatenated, a backbone that has it)
FEATURE_LAYERS = ("last", "stages")


def feature_key(encoder_fp: str, cache_fp: str, window: int, stride: int, lead_aware: bool = False,
                kind: str = "embeddings") -> str:
    """Feature-cache key.

    It hashes :data:`FEATURE_SCHEMA` (so features written by older extraction code are never reused), the encoder
    and cache fingerprints, ``window`` and ``stride``. ``lead_aware`` (only when it changes the features, see
    :func:`uses_lead_masks`) adds a flag, so zero-padded features are never reused for a lead-aware extraction;
    ``kind="tokens"`` (a :func:`cached_tokens` file) adds another, so a token file and an embedding file never
    share a key; ``kind="stages"`` (every stage pooled, ``layers="stages"``) likewise.

    Args:
        encoder_fp: :func:`encoder_fingerprint` of the backbone.
        cache_fp: :func:`cache_fingerprint` of the corpus.
        window: window length in samples.
        stride: hop in samples.
        lead_aware: the extraction passes lead masks that change the features.
        kind: one of :data:`FEATURE_KINDS`.

    Returns:
        24 hex digits.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    leads = "|leads" if lead_aware else ""
    tokens = f"|{kind}" if kind != "embeddings" else ""
    return hashlib.sha256(f"schema{FEATURE_SCHEMA}|{encoder_fp}|{cache_fp}|w{int(window)}|s{int(stride)}{leads}"
                          f"{tokens}".encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ long windows
def window_limit(backbone: nn.Module) -> int | None:
    """Longest window in samples ``backbone`` embeds as it is (its ``seq_len``), None when it has no limit (CNNs,
    HuBERT-ECG: any length)."""
    seq_len = getattr(backbone, "seq_len", None)
    return None if seq_len is None else int(seq_len)


def check_window(backbone: nn.Module, window: int) -> None:
    """Raise ``ValueError`` naming the encoder's limit when :func:`fit_window` cannot give ``backbone`` windows of
    ``window`` samples: a backbone with a ``seq_len`` limit that is not a :class:`~ecgfm.backbones.vit1d.ViT1D`
    (learned positions, e.g. ST-MEM's published ViT), or a ViT1D window that is not a multiple of its patch."""
    from ecgfm.backbones.vit1d import ViT1D

    limit = window_limit(backbone)
    if limit is None:
        return
    name = getattr(backbone, "name", type(backbone).__name__)
    if isinstance(backbone, ViT1D):
        if int(window) % backbone.patch_size:
            raise ValueError(f"encoder {name}: a window of {int(window)} samples is not a multiple of its "
                             f"patch_size={backbone.patch_size}; choose window_seconds so that it is")
        return
    if int(window) > limit:
        raise ValueError(f"encoder {name} ({type(backbone).__name__}) embeds windows of at most seq_len={limit} "
                         f"samples (learned positions or a fixed input length: it cannot be rebuilt for longer "
                         f"windows); got a window of {int(window)} samples: set window_seconds to at most "
                         f"{limit} samples' worth")


def fit_window(backbone: nn.Module, window: int) -> nn.Module:
    """A backbone that embeds windows of ``window`` samples: ``backbone`` itself when they fit (or it has no
    length limit), else a :class:`~ecgfm.backbones.vit1d.ViT1D` rebuilt with ``seq_len=window`` and the same
    weights.

    The ViT-1D position table is a fixed sin-cos buffer (not saved, not learned), so the rebuilt model has exactly
    the same parameters; every ``state_dict`` tensor is checked equal after loading (``strict=True``), and its
    embedding of a window of at most the old ``seq_len`` equals the original's (the table's first rows are the
    same). The rebuilt model keeps the original's train / eval mode, device and dtype; it is built under
    :func:`torch.random.fork_rng`, so the global RNG is untouched.

    Raises:
        ValueError: see :func:`check_window`.
    """
    check_window(backbone, window)
    limit = window_limit(backbone)
    if limit is None or int(window) <= limit:
        return backbone
    from ecgfm.backbones import create_backbone

    args = dict(getattr(backbone, "init_args", None) or {})
    name = getattr(backbone, "name", "")
    if not args or not name:
        raise ValueError(f"encoder {type(backbone).__name__}: no registry name / init_args to rebuild it for "
                         f"{int(window)}-sample windows (its seq_len is {limit})")
    args["seq_len"] = int(window)
    state = backbone.state_dict()
    with torch.random.fork_rng(devices=[]):
        longer = create_backbone(name, **args)
    longer.load_state_dict(state, strict=True)
    first = next(iter(state.values()), None)
    if first is not None:
        longer.to(device=first.device, dtype=first.dtype if first.is_floating_point() else None)
    new_state = longer.state_dict()
    assert new_state.keys() == state.keys() and all(torch.equal(new_state[k], state[k]) for k in state), \
        f"rebuilding {name} with seq_len={int(window)} changed its weights"
    longer.train(backbone.training)
    log.info("features: %s rebuilt with seq_len=%d (was %d) for %d-sample windows; same weights (fixed sin-cos "
             "positions)", name, int(window), limit, int(window))
    return longer


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


def _window_batches(cache: Any, rows: np.ndarray, window: int, stride: int, batch_size: int, nonfinite: str,
                    bad_input: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sliding windows of ``rows`` in batches: ``(windows (b, 12, window) float32, cache row of each (b,))``, in
    record order (a record's windows are consecutive). A record whose signal is non-finite raises
    (``nonfinite="error"``) or is appended to ``bad_input`` and left out (``"skip"``)."""
    buf: list[np.ndarray] = []
    owner: list[int] = []
    short: list[int] = []
    for i in rows:
        signal = cache.signal(int(i))
        if not np.isfinite(signal).all():
            if nonfinite == "error":
                raise _nonfinite_error(cache, [int(i)], "the input signal")
            bad_input.append(int(i))
            continue
        if signal.shape[-1] < window:
            short.append(int(signal.shape[-1]))
        for w in sliding_windows(signal, int(window), int(stride)):  # (n, 12, window)
            buf.append(np.ascontiguousarray(w, dtype=np.float32))
            owner.append(int(i))
            if len(buf) >= batch_size:
                yield np.stack(buf), np.asarray(owner, dtype=np.int64)
                buf, owner = [], []
    if buf:
        yield np.stack(buf), np.asarray(owner, dtype=np.int64)
    if short:   # their one window is zero-padded at the end, and the pooling averages the padding in
        log.info("%s: %d of %d record(s) are shorter than the %d-sample window (shortest %d samples): zero-padded "
                 "at the end, and the padding is part of their pooled embedding", getattr(cache, "path", "<cache>"),
                 len(short), len(rows), int(window), min(short))


def _rows(cache: Any, rows: np.ndarray | None) -> np.ndarray:
    """The records to extract (all when None), each once: a record listed twice would not have its windows in one
    run, and :func:`record_offsets` would give its token range another record's tokens too."""
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    if len(np.unique(rows)) != len(rows):
        vals, counts = np.unique(rows, return_counts=True)
        raise ValueError(f"rows lists record(s) {vals[counts > 1][:5].tolist()} more than once; each record once")
    return rows


def _check_args(window: int, stride: int, nonfinite: str) -> None:
    """Validate the extraction arguments (once per extraction call).

    A ``stride`` longer than the ``window`` is allowed (a cheap, sparse extraction) but logged as a warning: the
    ``stride - window`` samples between consecutive windows are never embedded.

    Raises:
        ValueError: a non-positive window or stride, or an unknown ``nonfinite``.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if stride > window:
        log.warning("stride %d samples is longer than the window %d samples: the %d samples between consecutive "
                    "windows are never embedded (gaps in every record longer than one window)", int(stride),
                    int(window), int(stride) - int(window))


def _embedding_error(cache: Any, rows_bad: list[int], what: str = "embeddings") -> NonFiniteDataError:
    return NonFiniteDataError(str(getattr(cache, "path", "<cache>")),
                              f"{_describe(cache, rows_bad)}: the encoder returned non-finite {what} (NaN/Inf) "
                              f"for finite input windows of {len(rows_bad)} record(s); the encoder is broken "
                              f"(non-finite weights?) or unstable on them; pass nonfinite='skip' to leave such "
                              f"records out")


def embed_fn(backbone: nn.Module, layers: str = "last") -> Any:
    """The backbone's embedding for ``layers`` (:data:`FEATURE_LAYERS`): ``embed`` or ``embed_stages``.

    Raises:
        ValueError: an unknown ``layers``, or ``"stages"`` for a backbone without ``embed_stages``.
    """
    if layers not in FEATURE_LAYERS:
        raise ValueError(f"layers must be one of {FEATURE_LAYERS}, got {layers!r}")
    if layers == "last":
        return backbone.embed
    fn = getattr(backbone, "embed_stages", None)
    if not callable(fn):
        raise ValueError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)} has no stage-wise "
                         f"embedding (embed_stages): layers='stages' needs a CNN such as xresnet1d / resnet1d_*")
    return fn


@torch.no_grad()
def extract_features(backbone: nn.Module, cache: Any, window: int, stride: int, batch_size: int = 256,
                     device: str | torch.device = "cpu", rows: np.ndarray | None = None,
                     nonfinite: str = "error", lead_aware: bool = True, layers: str = "last") -> FeatureSet:
    """Embed every sliding window of every record (or ``rows``) of ``cache``; no disk cache.

    Args:
        backbone: encoder with ``embed((B, 12, window)) -> (B, D)``; put in eval mode here. A window longer than
            its ``seq_len`` goes through :func:`fit_window` (a ViT-1D rebuilt with the same weights; other
            length-limited backbones are refused).
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
        layers: ``"last"`` (``embed``) or ``"stages"`` (``embed_stages``, see :func:`embed_fn`).

    Returns:
        :class:`FeatureSet` with ``n_records = len(cache)``; every feature finite.
    """
    _check_args(window, stride, nonfinite)
    t0 = time.perf_counter()
    model = fit_window(backbone, int(window))
    embed = embed_fn(model, layers)
    was_training = model.training
    model.eval().to(device)
    rows = _rows(cache, rows)
    feats: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    masks = _lead_masks(cache) if uses_lead_masks(model, cache, lead_aware) else None
    bad_input: list[int] = []
    bad_embedding: set[int] = set()
    done = 0
    try:
        for xb, owner in _window_batches(cache, rows, window, stride, batch_size, nonfinite, bad_input):
            x = torch.from_numpy(xb).to(device)
            if masks is None:
                z = embed(x).float().cpu().numpy()
            else:
                z = embed(x, lead_mask=torch.from_numpy(masks[owner]).to(device)).float().cpu().numpy()
            bad = ~np.isfinite(z).all(axis=1)
            if bad.any():
                if nonfinite == "error":
                    raise _embedding_error(cache, sorted(set(owner[bad].tolist())))
                bad_embedding.update(owner[bad].tolist())
            feats.append(z)
            owners.append(owner)
            done += len(xb)
            if len(feats) % 20 == 0:
                dt = time.perf_counter() - t0
                # records in the order of ``rows`` (not the cache row of the last one: wrong with ``rows=``)
                n_done = int(np.flatnonzero(np.asarray(rows) == owners[-1][-1])[0]) + 1
                log.info("features: %d windows of %d/%d records in %.0f s (%.0f windows/s)", done, n_done,
                         len(rows), dt, done / max(dt, 1e-9))
    finally:
        model.train(was_training)
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


# ------------------------------------------------------------------------------------------------ token cache
@dataclass
class TokenSet(_SkippedRecords):
    """Frozen tokens of every window of every record of a cache (the attention probe's input).

    Memory: ``tokens`` holds records x windows per record x tokens per window x ``D`` x 2 bytes (float16).

    Attributes:
        tokens: ``(T, D)`` float16 tokens of all windows, window after window (a record's windows consecutive):
            in memory, or a read-only ``np.memmap`` of the token cache's file (:func:`cached_tokens`).
        window_offsets: ``(W + 1,)`` int64: window ``w``'s tokens are ``tokens[window_offsets[w]:window_offsets[w+1]]``.
        record: ``(W,)`` int64 cache row of each window.
        n_records: number of records in the cache.
        key: the cache key.
        seconds: extraction time (0 when loaded).
        skipped: ``(S,)`` int64 cache rows left out for non-finite input or tokens; they have no windows.
    """

    tokens: np.ndarray
    window_offsets: np.ndarray
    record: np.ndarray
    n_records: int
    key: str = ""
    seconds: float = 0.0
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the token array (records x windows x tokens x dim x 2)."""
        return int(self.tokens.nbytes)

    def record_offsets(self) -> np.ndarray:
        """``(n_records, 2)`` int64 ``[start, end)`` token range of each record (``start == end``: no windows)."""
        out = np.zeros((self.n_records, 2), dtype=np.int64)
        if len(self.record):
            w = np.arange(len(self.record))
            first = np.full(self.n_records, len(self.record), dtype=np.int64)
            last = np.full(self.n_records, -1, dtype=np.int64)
            np.minimum.at(first, self.record, w)
            np.maximum.at(last, self.record, w)
            has = last >= 0
            out[has, 0] = self.window_offsets[first[has]]
            out[has, 1] = self.window_offsets[last[has] + 1]
        return out

    def record_tokens(self, row: int) -> np.ndarray:
        """``(K_row, D)`` float16 tokens of every window of cache row ``row`` (a view)."""
        start, end = self.record_offsets()[int(row)]
        return self.tokens[start:end]

    def window_means(self) -> np.ndarray:
        """``(W, D)`` float32 mean token of each window (for a ViT-1D: its pooled embedding, up to float16)."""
        sums = np.add.reduceat(self.tokens.astype(np.float32), self.window_offsets[:-1], axis=0) \
            if len(self.record) else np.zeros((0, self.dim), np.float32)
        return sums / np.diff(self.window_offsets)[:, None]


_TRANSFORMER_NAMES = ("ViT1D", "StMemViT", "HubertECG")


def window_tokens(backbone: nn.Module, x: torch.Tensor, lead_mask: torch.Tensor | None = None
                  ) -> list[torch.Tensor]:
    """Frozen tokens of each window, the ones ``backbone.embed`` pools.

    * patch-token transformers (``num_patch_tokens``: :class:`~ecgfm.backbones.vit1d.ViT1D`, ST-MEM): the patch
      tokens of ``forward_features`` (SEP tokens excluded); with ``lead_mask`` (a ViT1D) only the present leads'
      patch tokens, lead-major (a row without any present lead counts as all present, as in ``embed``);
    * HuBERT-ECG: its frames ``(B, N, D)``;
    * any other backbone (CNNs): the final feature map ``(B, C, T')`` read as ``T'`` tokens of width ``C``.

    Args:
        backbone: the frozen encoder (eval mode, no grad: the caller's business).
        x: ``(B, L, T)`` windows.
        lead_mask: optional ``(B, L)`` bool for backbones taking ``lead_mask``.

    Returns:
        ``B`` tensors ``(K_b, D)`` (``K_b`` differs only between lead sets).
    """
    if hasattr(backbone, "num_patch_tokens"):
        if lead_mask is None:
            tok = backbone.forward_features(x)
            return list(tok[:, : backbone.num_patch_tokens(tok)])
        tok = backbone.forward_features(x, lead_mask=lead_mask)
        k = backbone.num_patch_tokens(tok)
        n_leads = int(backbone.num_leads)
        grid = tok[:, :k].reshape(tok.shape[0], n_leads, k // n_leads, tok.shape[-1])
        present = lead_mask.to(torch.bool)
        present = present | ~present.any(dim=1, keepdim=True)
        return [grid[b, present[b]].reshape(-1, tok.shape[-1]) for b in range(tok.shape[0])]
    out = backbone.forward_features(x)
    if type(backbone).__name__ in _TRANSFORMER_NAMES:
        return list(out)
    if out.ndim != 3:
        raise ValueError(f"{type(backbone).__name__}.forward_features returned shape {tuple(out.shape)}; token "
                         f"extraction expects a (B, C, T') feature map or (B, N, D) tokens")
    return list(out.transpose(1, 2))


class _TokenSink:
    """Where :func:`extract_tokens` puts each batch's ``(n, D)`` float16 tokens: a list in memory, or (``path``) a
    raw float16 file appended batch by batch, so that memory stays at one batch whatever the corpus size. Written
    by hand: ``np.lib.format.open_memmap`` needs the final shape up front, which a lead-aware extraction only knows
    at the end."""

    def __init__(self, path: Path | None):
        self.path = path
        self.chunks: list[np.ndarray] = []
        self.rows = 0
        self.dim = 0
        self.file = open(path, "wb") if path is not None else None

    def append(self, flat: np.ndarray) -> None:
        self.dim = int(flat.shape[1])
        self.rows += len(flat)
        if self.file is None:
            self.chunks.append(flat)
        else:
            self.file.write(np.ascontiguousarray(flat, dtype=np.float16).tobytes())

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()

    def tokens(self, keep: np.ndarray | None = None, chunk: int = 1 << 20) -> np.ndarray:
        """The ``(T, D)`` tokens, only the rows where ``keep`` (bool ``(T,)``) is True when given: an array in
        memory, or a read-only memmap of the file (rewritten without the dropped rows, ``chunk`` rows at a
        time)."""
        if self.file is None:
            tok = np.concatenate(self.chunks) if self.chunks else np.zeros((0, self.dim), np.float16)
            return tok if keep is None else tok[keep]
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close()
        assert self.path is not None
        if keep is not None:
            src = _open_tokens(self.path, (self.rows, self.dim))
            tmp = self.path.with_name(self.path.name + ".keep")
            with open(tmp, "wb") as f:
                for i in range(0, self.rows, chunk):
                    f.write(np.ascontiguousarray(src[i:i + chunk][keep[i:i + chunk]]).tobytes())
                f.flush()
                os.fsync(f.fileno())
            del src
            os.replace(tmp, self.path)
            self.rows = int(keep.sum())
        if self.rows * self.dim == 0:                 # nothing to map: an in-memory empty array, no file
            self.path.unlink(missing_ok=True)
        return _open_tokens(self.path, (self.rows, self.dim))


def _open_tokens(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read-only memmap ``shape`` float16 of a raw token file (an empty array for zero tokens: mmap refuses empty
    files)."""
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, np.float16)
    return np.memmap(path, dtype=np.float16, mode="r", shape=shape)


@torch.no_grad()
def extract_tokens(backbone: nn.Module, cache: Any, window: int, stride: int, batch_size: int = 256,
                   device: str | torch.device = "cpu", rows: np.ndarray | None = None, nonfinite: str = "error",
                   lead_aware: bool = True, tokens_path: str | os.PathLike | None = None) -> TokenSet:
    """The frozen tokens (:func:`window_tokens`) of every sliding window of every record (or ``rows``), float16;
    no disk cache. Windows, batching, lead masks, long windows and ``nonfinite`` as :func:`extract_features`
    (a token that overflows float16 counts as non-finite).

    Args:
        tokens_path: None: the tokens are collected in memory. A file path: they are streamed into it as raw
            float16 (memory of one batch), and :attr:`TokenSet.tokens` is a read-only memmap of it; the file is
            removed when the extraction fails. :func:`cached_tokens` uses this.

    Returns:
        :class:`TokenSet` with ``n_records = len(cache)``; every token finite.
    """
    _check_args(window, stride, nonfinite)
    t0 = time.perf_counter()
    model = fit_window(backbone, int(window))
    was_training = model.training
    model.eval().to(device)
    rows = _rows(cache, rows)
    masks = _lead_masks(cache) if uses_lead_masks(model, cache, lead_aware) else None
    sink = _TokenSink(None if tokens_path is None else Path(tokens_path))
    counts: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    bad_input: list[int] = []
    bad_tokens: set[int] = set()
    try:
        for xb, owner in _window_batches(cache, rows, window, stride, batch_size, nonfinite, bad_input):
            x = torch.from_numpy(xb).to(device)
            m = None if masks is None else torch.from_numpy(masks[owner]).to(device)
            per_window = window_tokens(model, x, m)
            flat = torch.cat(per_window).to(torch.float16).cpu().numpy()
            n_tok = np.asarray([len(t) for t in per_window], dtype=np.int64)
            finite = np.isfinite(flat).all(axis=1)
            if not finite.all():
                bad = np.unique(np.repeat(owner, n_tok)[~finite])
                if nonfinite == "error":
                    raise _embedding_error(cache, bad.tolist(), "tokens (or tokens beyond float16's range)")
                bad_tokens.update(bad.tolist())
            sink.append(flat)
            counts.append(n_tok)
            owners.append(owner)
        n_tok = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        record = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        skipped = np.asarray(sorted(set(bad_input) | bad_tokens), dtype=np.int64)
        keep = None
        if len(skipped):
            keep = ~np.isin(record, skipped)
            n_tok, record, keep = n_tok[keep], record[keep], np.repeat(keep, np.concatenate(counts))
            log.warning("tokens: left out %d record(s) with non-finite input or tokens (nonfinite='skip'): %s",
                        len(skipped), _describe(cache, skipped))
        tokens = sink.tokens(keep)
    except BaseException:
        sink.close()
        if tokens_path is not None:
            for left in (Path(tokens_path), Path(f"{tokens_path}.keep")):   # the stream and its rewrite
                left.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    d = int(tokens.shape[1])
    offsets = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64)
    out = TokenSet(tokens=tokens, window_offsets=offsets, record=record, n_records=len(cache), seconds=seconds,
                   skipped=skipped)
    STATS["token_extractions"] += 1
    STATS["windows"] += int(len(record))
    STATS["seconds"] += seconds
    log.info("tokens: %d windows (%d samples, stride %d) of %d records -> %d tokens x %d = %.1f MiB float16 in "
             "%.1f s%s", len(record), window, stride, len(rows), len(tokens), d, out.nbytes / 2**20, seconds,
             " (lead-aware)" if masks is not None else "")
    return out


def _save_tokens(path: Path, ts: TokenSet, window: int, stride: int) -> None:
    """Write a token set: its tokens as the raw float16 file ``<key>.<nonce>.tokens`` (a streamed extraction's
    file is renamed into place, an in-memory array written atomically), then ``<key>.npz`` (the small arrays and the
    token file's name and shape) atomically, then older token files of the key are removed. The ``.npz`` is the
    commit point: until it names the new file, readers see the previous state."""
    nonce = os.urandom(6).hex()
    name = f"{path.stem}.{nonce}.tokens"
    final = path.with_name(name)
    src = getattr(ts.tokens, "filename", None)
    if src is not None and Path(src).parent.resolve() == path.parent.resolve():
        os.replace(src, final)                     # the streamed file (fsync'ed by the sink): same inode, no copy
    else:
        atomic_write(final, lambda tmp: np.ascontiguousarray(ts.tokens, dtype=np.float16).tofile(tmp))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, tokens_file=np.asarray(name), tokens_shape=np.asarray(ts.tokens.shape, dtype=np.int64),
                     window_offsets=ts.window_offsets, record=ts.record, n_records=np.asarray(ts.n_records),
                     window=np.asarray(window), stride=np.asarray(stride), skipped=ts.skipped)

    atomic_write(path, write)
    for old in path.parent.glob(f"{path.stem}.*.tokens"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _all_finite(a: np.ndarray, chunk: int = 1 << 20) -> bool:
    """``np.isfinite(a).all()`` ``chunk`` rows at a time (a memmap is read once, never held whole)."""
    return all(bool(np.isfinite(a[i:i + chunk]).all()) for i in range(0, len(a), chunk))


def _load_tokens(path: Path, key: str, n_records: int, window: int, stride: int) -> TokenSet:
    """Read and validate a token cache entry (``<key>.npz`` and the token file it names, memory-mapped);
    ``ValueError`` saying what is wrong with it."""
    names = ("window_offsets", "record", "n_records", "window", "stride", "skipped")
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in names}
            legacy = "tokens" in z.files                  # the single-file format: tokens inside the .npz
            tok = z["tokens"] if legacy else None
            name = "" if legacy else str(z["tokens_file"])
            shape = None if legacy else tuple(int(v) for v in z["tokens_shape"])
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, KeyError, OSError...
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if int(a["n_records"]) != n_records or int(a["window"]) != window or int(a["stride"]) != stride:
        raise ValueError("written for another cache or window (record count / window / stride differ)")
    if tok is None:
        file = path.with_name(name)
        if Path(name).name != name or not name.startswith(f"{path.stem}.") or not name.endswith(".tokens"):
            raise ValueError(f"names a token file outside its key: {name!r}")
        if shape is None or len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"wrong token shape {shape}")
        if not file.is_file():
            raise ValueError(f"its token file {name} is missing")
        if file.stat().st_size != shape[0] * shape[1] * 2:
            raise ValueError(f"its token file {name} holds {file.stat().st_size} bytes, not {shape[0]} x "
                             f"{shape[1]} float16")
        tok = _open_tokens(file, (shape[0], shape[1]))
    off, rec = a["window_offsets"], a["record"]
    if tok.ndim != 2 or tok.dtype != np.float16 or off.ndim != 1 or rec.ndim != 1 or len(off) != len(rec) + 1 \
            or off.dtype.kind not in "iu" or rec.dtype.kind not in "iu":
        raise ValueError(f"wrong arrays (tokens {tok.shape} {tok.dtype}, offsets {off.shape}, record {rec.shape})")
    if off[0] != 0 or off[-1] != len(tok) or (np.diff(off) <= 0).any():
        raise ValueError("window offsets do not partition the tokens")
    if len(rec) and (rec.min() < 0 or rec.max() >= n_records):
        raise ValueError("record rows out of range")
    if not _all_finite(tok):
        raise ValueError("holds non-finite tokens")
    return TokenSet(tokens=tok, window_offsets=off.astype(np.int64), record=rec.astype(np.int64),
                    n_records=n_records, key=key, skipped=np.asarray(a["skipped"], dtype=np.int64))


def cached_tokens(backbone: nn.Module, cache: Any, window: int, stride: int, feature_dir: str | os.PathLike,
                  batch_size: int = 256, device: str | torch.device = "cpu", encoder_fp: str | None = None,
                  nonfinite: str = "error", lead_aware: bool = True) -> TokenSet:
    """:func:`extract_tokens` behind the on-disk feature cache: ``<feature_dir>/<key>.npz`` with the key of
    :func:`feature_key` (``kind="tokens"``: never an embedding file's key) and the raw float16 token file it names
    (module docstring); the tokens come back memory-mapped, read-only. Extracted once per (encoder, corpus,
    window, stride, lead handling), streamed to disk batch by batch; a damaged entry (either file) is recomputed
    with a log line; ``nonfinite`` as :func:`cached_features`. Arguments as :func:`cached_features`."""
    def compute() -> TokenSet:
        Path(feature_dir).mkdir(parents=True, exist_ok=True)
        _remove_orphan_token_files(Path(feature_dir))
        tmp = Path(feature_dir) / f".tokens.{os.getpid()}.{os.urandom(6).hex()}.tmp"
        return extract_tokens(backbone, cache, window, stride, batch_size=batch_size, device=device,
                              nonfinite=nonfinite, lead_aware=lead_aware, tokens_path=tmp)

    return _through_cache(
        backbone, cache, window, stride, feature_dir, encoder_fp, lead_aware, nonfinite, kind="tokens",
        load=_load_tokens, save=_save_tokens, what="token", items="tokens", stat="token_cache_hits",
        compute=compute)


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def _remove_orphan_token_files(feature_dir: Path) -> None:
    """Delete the temporary token files (``.tokens.<pid>.<nonce>.tmp`` and its ``.keep`` rewrite) of extractions
    whose process is gone (killed before its cleanup ran); those of running processes are left alone. A feature
    folder shared between machines should not be: a pid names a process of this machine only."""
    for f in feature_dir.glob(".tokens.*.tmp*"):
        parts = f.name.split(".")              # ["", "tokens", pid, nonce, "tmp"(, "keep")]
        if len(parts) >= 5 and parts[2].isdigit() and not _process_alive(int(parts[2])):
            log.info("removing %s: temporary token file of a process that no longer runs", f)
            f.unlink(missing_ok=True)


def _through_cache(backbone: nn.Module, cache: Any, window: int, stride: int, feature_dir: str | os.PathLike,
                   encoder_fp: str | None, lead_aware: bool, nonfinite: str, *, kind: str | None, load: Any,
                   save: Any, compute: Any, what: str, items: str, stat: str) -> Any:
    """The on-disk cache shared by :func:`cached_features` and :func:`cached_tokens`: the key of
    :func:`feature_key`, a valid file reused (its records skipped for non-finite values refused under
    ``nonfinite="error"``), a damaged one recomputed with a log line, a new one computed and written atomically."""
    encoder_fp = encoder_fp or encoder_fingerprint(backbone)
    check_window(backbone, int(window))  # before a cached file is trusted: an encoder that cannot take the window
    key = feature_key(encoder_fp, cache_fingerprint(cache), window, stride,
                      uses_lead_masks(backbone, cache, lead_aware), **({"kind": kind} if kind else {}))
    path = Path(feature_dir) / f"{key}.npz"
    if path.exists():
        try:
            out = load(path, key, len(cache), int(window), int(stride))
        except ValueError as exc:
            log.warning("%s cache %s: %s; recomputing it", what, path, exc)
        else:
            if len(out.skipped) and nonfinite == "error":
                raise _nonfinite_error(cache, out.skipped, f"the input or {items} ({what} cache written with "
                                                           f"nonfinite='skip')")
            STATS[stat] += 1
            return out
    out = compute()
    out.key = key
    save(path, out, int(window), int(stride))
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
    # every record of the cache has a window (a short record is padded to one) unless it was skipped: a file
    # missing some records' windows gave them all-zero features
    empty = np.setdiff1d(np.flatnonzero(np.bincount(record, minlength=n_records) == 0), skipped)
    if len(empty):
        raise ValueError(f"{len(empty)} record(s) have no windows and are not listed as skipped (rows "
                         f"{empty[:10].tolist()}{' ...' if len(empty) > 10 else ''})")
    return FeatureSet(features=feats, record=record.astype(np.int64), n_records=n_records, key=key,
                      skipped=np.asarray(skipped, dtype=np.int64))


def cached_features(backbone: nn.Module, cache: Any, window: int, stride: int, feature_dir: str | os.PathLike,
                    batch_size: int = 256, device: str | torch.device = "cpu",
                    encoder_fp: str | None = None, nonfinite: str = "error", lead_aware: bool = True,
                    layers: str = "last") -> FeatureSet:
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
        layers: see :func:`extract_features`; ``"stages"`` files have a key of their own.
    """
    embed_fn(backbone, layers)     # refused before a cached file is looked for
    return _through_cache(
        backbone, cache, window, stride, feature_dir, encoder_fp, lead_aware, nonfinite,
        kind=None if layers == "last" else "stages",
        load=_load_features, save=_save_features, what="feature", items="embeddings", stat="cache_hits",
        compute=lambda: extract_features(backbone, cache, window, stride, batch_size=batch_size, device=device,
                                         nonfinite=nonfinite, lead_aware=lead_aware, layers=layers))
