"""LightningDataModules over corpus caches: mixtures of caches for pretraining, labelled splits downstream.

Both modules read :class:`~ecgfm.data.cache.CorpusCache` directories (memory-mapped, opened lazily in every
DataLoader worker, so datasets pickle to a few hundred bytes) and return batches as dicts:

* :class:`PretrainDataModule`: ``x (B, 12, T)`` float32, ``x2 (B, 12, T)`` (``views="adjacent"``: the
  segment right after ``x`` in the same record, CLOCS CMSC; ``views="segments"``: a second, independently placed
  crop of the same record, the same as ``x`` when the record is no longer than a crop), ``lead_mask (B, 12)``
  bool, ``patient (B,)`` int64 (stable hash, -1 unknown), ``index (B,)`` int64 (position in the concatenation of
  the caches, in the order of ``cache_dirs``), ``recorded (B,)`` int64 (the samples of ``x`` that come from the
  record: ``x[:, :, recorded:]`` is zero padding; MAE and CREMA leave patches without a recorded sample out of the
  loss) and ``y (B, C)`` float32 when ``probe_labels`` is given.
* :class:`DownstreamDataModule`: ``x``, ``y`` (``(B, C)`` float32 multi-label, ``(B,)`` int64 otherwise),
  ``lead_mask``, ``recorded`` (crops, not sliding windows), ``index`` (record index in the cache; with
  ``test_stride`` one item per sliding window, so aggregate predictions by ``index``).

Training crops are random; evaluation crops are centred (or sliding windows), so validation is the same every
epoch. Records shorter than a crop (or than two crops for adjacent views) are zero-padded at the end; setup() warns
with the share of training draws that are (the padding is signal to SimCLR's and CLOCS's views and to a pooled
embedding; only the MAE losses read ``recorded``).

Sampling and resume: the order of an epoch is a pure function of ``(seed, epoch)`` (see :class:`MixtureSampler`
and :class:`EpochShuffleSampler`); Lightning calls ``set_epoch`` before every epoch, so a run resumed from a
checkpoint at epoch ``e`` sees exactly the batches an uninterrupted run sees from epoch ``e`` on (an epoch that
was interrupted half-way is replayed from its start, in the same order). The samplers subclass
``torch.utils.data.DistributedSampler`` and read rank / world size from ``torch.distributed`` when it is
initialised: each rank gets its own slice ``[rank::world_size]`` of the global sequence, and Lightning does not
wrap them again.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate, get_worker_info

from ecgfm.data.cache import CorpusCache, NonFiniteDataError, die_with_parent
from ecgfm.data.record import N_LEADS, ECGDataError
from ecgfm.data.splits import assert_disjoint_patients, check_single_label  # noqa: F401  (re-exported)

VIEWS = ("single", "adjacent", "segments")
#: multiplier whose fractional product turns a crop's offset draw ``u`` into the second segment's draw (``segments``)
_SEGMENT_MIX = 7919.0


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else ``torch.distributed`` when initialised; else ``(0, 1)``."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return int(rank), int(world_size)


def _pairs(pos: np.ndarray, u: np.ndarray, chunk: int = 8192) -> Iterator[tuple[int, float]]:
    """Yield ``(int, float)`` pairs, converting to Python objects a chunk at a time (an epoch of millions of
    draws stays a few numpy arrays)."""
    for a in range(0, len(pos), chunk):
        yield from zip(pos[a:a + chunk].tolist(), u[a:a + chunk].tolist())


class MixtureSampler(DistributedSampler):
    """Weighted mixture of record pools, drawn with replacement; deterministic by ``(seed, epoch)``; DDP-aware.

    Each draw picks a pool with probability ``weights[k]`` and then a record of that pool uniformly, like
    ``WeightedRandomSampler`` with per-record weight ``weights[k] / len(pool_k)``. It yields
    ``(position, u)`` tuples: ``position`` in ``[0, sum(pool_sizes))`` (pools laid out one after another) and
    ``u`` in ``[0, 1)``, the crop offset as a fraction of the free length, so crops are reproducible too.

    Args:
        pool_sizes: records in each pool.
        weights: sampling probability of each pool (normalised; None: proportional to ``pool_sizes``); finite and
            non-negative, with a positive sum (else ``ValueError`` naming ``data.weights``).
        num_samples: draws per epoch over all ranks (rounded up to a multiple of the world size).
        seed: base seed.
        rank, world_size: override ``torch.distributed``.
    """

    def __init__(self, pool_sizes: Sequence[int], weights: Sequence[float] | None = None,
                 num_samples: int | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        sizes = np.asarray([int(s) for s in pool_sizes], dtype=np.int64)
        if len(sizes) == 0 or sizes.sum() == 0:
            raise ValueError("MixtureSampler needs at least one non-empty pool")
        w = sizes.astype(np.float64) if weights is None else np.asarray([float(x) for x in weights])
        if w.shape != sizes.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights (data.weights) must be {len(sizes)} finite non-negative numbers with a positive "
                             f"sum, got {weights}")
        if ((w > 0) & (sizes == 0)).any():
            raise ValueError(f"a pool with positive weight is empty: sizes {sizes.tolist()}, weights {w.tolist()}")
        rank, world = _dist_rank_world(rank, world_size)
        n = int(num_samples) if num_samples is not None else int(sizes.sum())
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self.sizes, self.probs = sizes, w / w.sum()
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.total_size = int(math.ceil(n / world)) * world
        self.num_samples = self.total_size // world

    def global_order(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The whole epoch over all ranks: ``(positions (total,), u (total,))``. Pure function of (seed, epoch).

        The ``num_samples`` draws do not depend on the world size (padded to a multiple of it by wrapping around,
        as ``DistributedSampler`` pads), so a run resumed mid-epoch on another number of processes continues the
        same order: drawing ``total_size`` values instead would shift every later draw of the generator.
        """
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        n = len(self.dataset)
        pool = rng.choice(len(self.sizes), size=n, p=self.probs)
        within = np.floor(rng.random(n) * self.sizes[pool]).astype(np.int64)
        pos, u = self.offsets[pool] + within, rng.random(n)
        if self.total_size > n:
            pos, u = np.resize(pos, self.total_size), np.resize(u, self.total_size)
        return pos, u

    def __iter__(self) -> Iterator[tuple[int, float]]:
        pos, u = self.global_order()
        sl = slice(self.rank, self.total_size, self.num_replicas)
        return _pairs(pos[sl], u[sl])

    def __len__(self) -> int:
        return self.num_samples


class EpochShuffleSampler(DistributedSampler):
    """Permutation of ``range(n)`` per epoch (deterministic by ``(seed, epoch)``), sliced per rank; yields
    ``(position, u)`` like :class:`MixtureSampler`. The permutation is padded by wrapping around so every rank
    gets the same number of items.

    Args:
        n: items.
        seed: base seed.
        rank, world_size: override ``torch.distributed``.
        epoch_size: items per epoch over all ranks (None: ``n``, one pass). Larger: further passes, each in a
            fresh order, make up the epoch (a small labelled subset then gets as many optimiser steps per epoch,
            and so per validation and per patience epoch, as a large one). The first pass is the ``n``-item
            epoch's permutation. Smaller: one pass (a minimum: an epoch is never shorter than one pass;
            :class:`DownstreamDataModule` refuses such an ``epoch_samples``).
    """

    def __init__(self, n: int, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 epoch_size: int | None = None):
        if int(n) < 1:
            raise ValueError("EpochShuffleSampler needs at least one item (empty train split?)")
        rank, world = _dist_rank_world(rank, world_size)
        super().__init__(range(int(n)), num_replicas=world, rank=rank, shuffle=True, seed=int(seed),
                         drop_last=False)
        self.passes = 1
        if epoch_size is not None and int(epoch_size) > int(n):
            self.passes = int(math.ceil(int(epoch_size) / int(n)))
            self.num_samples = int(math.ceil(int(epoch_size) / world))
            self.total_size = self.num_samples * world

    def __iter__(self) -> Iterator[tuple[int, float]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.dataset))
        if self.passes > 1:
            perm = np.concatenate([perm] + [rng.permutation(len(self.dataset)) for _ in range(self.passes - 1)])
        if self.total_size > len(perm):
            perm = np.resize(perm, self.total_size)
        perm = perm[:self.total_size]
        u = rng.random(self.total_size)
        sl = slice(self.rank, self.total_size, self.num_replicas)
        return _pairs(perm[sl], u[sl])


class CachePool:
    """Several caches seen as one flat index (cache order, then record order). Picklable (paths only).

    Raises:
        ValueError: no cache; one cache folder listed twice (its records would get two flat indices each, and a
            record drawn under both would be a contrastive negative of itself: raise its ``data.weights`` entry
            to sample it more often); caches of different rates or preprocessing; two caches holding the same
            records (:meth:`_check_shared_records`: the same corpus prepared twice, e.g. with another
            ``shard_records``, a copied cache, or a corpus pooled with a cache that contains it), which, besides
            the self-negatives, put a record without patient id in validation from one copy and in training from
            the other.
    """

    def __init__(self, cache_dirs: Sequence[str | os.PathLike]):
        self.caches = [c if isinstance(c, CorpusCache) else CorpusCache(c) for c in cache_dirs]
        sizes = [len(c) for c in self.caches]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if not self.caches:
            raise ValueError("no cache given")
        seen: dict[str, int] = {}
        for k, c in enumerate(self.caches):
            folder = str(Path(c.path).resolve())
            if folder in seen:
                raise ValueError(f"cache {folder} is listed twice (data.cache_dirs entries {seen[folder]} and {k}): "
                                 "its records would get two indices each and be contrastive negatives of "
                                 "themselves; list it once and raise its data.weights entry to sample it more often")
            seen[folder] = k
        rates = {c.fs for c in self.caches}
        if None in rates or len(rates) != 1:
            raise ValueError("caches must share one sampling rate (prepare them with the same spec.fs); got "
                             + ", ".join(f"{c.path}: {c.fs}" for c in self.caches))
        specs = {c.spec for c in self.caches}
        if len(specs) != 1:
            raise ValueError("caches must share one preprocessing spec (a model must see one kind of signal); "
                             "got " + "; ".join(f"{c.path}: {c.spec}" for c in self.caches))
        self.fs = float(rates.pop())
        self.spec = specs.pop()
        self._finite: np.ndarray | None = None    # per record: 0 not checked yet, 1 finite, 2 NaN / Inf
        self._check_shared_records()

    #: candidate records whose signals are compared per chunk; a refusal stops after the first chunk with a copy
    _SHARED_CHUNK = 65536

    def _check_shared_records(self) -> None:
        """Refuse two caches that hold the same records (the hold-out must not validate on a record training sees).

        Records of two caches are matched by key (``source/record_id``, :attr:`CorpusCache.keys`). A matched
        record is the same record, and the pool is refused, when

        * the source of that name reads the same folder in both caches (a ``root`` of the source's description in
          the manifests, wrapped sources included): the same corpus prepared twice (another ``shard_records``,
          ``fs`` or ``include_unlabelled``: PTB-XL's 100 Hz and 500 Hz files are the same recordings), a copied
          cache, a corpus pooled with a cache that contains it; or
        * its stored signal is the same in both (same length, leads and lead mask, and bit-identical values at
          the start, middle and end of the stored block; the caches share one preprocessing spec): a copy of the
          raw corpus prepared from another folder, generated corpora of one seed.

        Other records under the same key are distinct records and are kept: two exports of one hospital read
        from two folders (one source name, ids restarting at 1) and caches of sources without a folder
        (synthetic / generated records) whose signals differ (their shared patients are held out across caches
        by :meth:`PretrainDataModule.setup`).

        Cheap for large pools: caches whose source names (in the manifest) differ share no key and are not read
        at all (every shipped pool); otherwise the keys are matched with a hash join (pandas), and only matched
        records of sources without a shared folder are read, a few pages each, shard by shard.
        """
        if len(self.caches) < 2:
            return
        roots = [_source_roots(c) for c in self.caches]
        keys: dict[int, Any] = {}
        sources: dict[int, np.ndarray] = {}
        for b in range(1, len(self.caches)):
            for a in range(b):
                if roots[a] is not None and roots[b] is not None and not roots[a].keys() & roots[b].keys():
                    continue
                import pandas as pd   # only when two caches share a source name

                for k in (a, b):
                    if k not in keys:
                        keys[k] = pd.Index(self.caches[k].index["key"])
                        sources[k] = self.caches[k].index["source"].to_numpy(dtype=object)
                ka = keys[a]
                pos_a = np.arange(len(ka))
                if not ka.is_unique:
                    first = ~ka.duplicated()
                    ka, pos_a = ka[first], pos_a[first]
                hit = ka.get_indexer(keys[b])
                rows_b = np.flatnonzero(hit >= 0)
                if not len(rows_b):
                    continue
                rows_a = pos_a[hit[rows_b]]
                folder = [] if roots[a] is None or roots[b] is None else \
                    [n for n in roots[a].keys() & roots[b].keys() if roots[a][n] & roots[b][n]]
                by_folder = np.isin(sources[b][rows_b], np.asarray(folder, dtype=object)) if folder else \
                    np.zeros(len(rows_b), dtype=bool)
                found = [rows_b[by_folder]]
                checked = int(by_folder.sum())
                if not by_folder.all():
                    same, n = self._same_signals(self.caches[a], rows_a[~by_folder], self.caches[b],
                                                 rows_b[~by_folder])
                    found.append(same)
                    checked += n
                dup = np.sort(np.concatenate(found))
                if not len(dup):
                    continue
                shown = ", ".join(str(keys[b][int(i)]) for i in dup[:5])
                count = (f"{len(dup)} of its {len(self.caches[b])} records" if checked == len(rows_b) else
                         f"at least {len(dup)} of its {len(self.caches[b])} records (stopped after comparing "
                         f"{checked} of the {len(rows_b)} under a key of both)")
                raise ValueError(
                    f"caches {self.caches[a].path} and {self.caches[b].path} (data.cache_dirs entries {a} and {b}) "
                    f"hold the same records: {count} are records of the first (same source/record_id, read from "
                    f"the same source folder or stored with the same signal; e.g. {shown}"
                    f"{', ...' if len(dup) > 5 else ''}). Each would get two indices (a contrastive negative of "
                    f"itself) and a record without patient id could be validated from one copy and trained on from "
                    f"the other. Pool caches of distinct records: the same corpus prepared twice (another "
                    f"shard_records or fs) or a copied cache is one cache (list it once and raise its data.weights "
                    f"entry to sample it more often); to add records, prepare a cache of the new records only; "
                    f"distinct records that share ids need distinct source names (prepare one of them again with "
                    f"its source named apart, e.g. prepare.py folder.name=site_b)")

    @classmethod
    def _same_signals(cls, ca: CorpusCache, rows_a: np.ndarray, cb: CorpusCache, rows_b: np.ndarray
                      ) -> tuple[np.ndarray, int]:
        """Of the record pairs ``(rows_a[i] of ca, rows_b[i] of cb)``, the ``rows_b`` of those stored identically
        (:func:`_signal_probe`), and how many pairs were compared: all, or up to the first chunk of
        :attr:`_SHARED_CHUNK` pairs holding a copy (enough to refuse)."""
        a_cols, b_cols = ca.columns(), cb.columns()
        shape_same = ((a_cols["n_samples"][rows_a] == b_cols["n_samples"][rows_b])
                      & (a_cols["n_leads"][rows_a] == b_cols["n_leads"][rows_b])
                      & (a_cols["lead_mask"][rows_a] == b_cols["lead_mask"][rows_b]).all(axis=1))
        ra, rb = rows_a[shape_same], rows_b[shape_same]
        checked = len(rows_a) - len(ra)
        for start in range(0, len(ra), cls._SHARED_CHUNK):
            sa, sb = ra[start:start + cls._SHARED_CHUNK], rb[start:start + cls._SHARED_CHUNK]
            eq = (_signal_probe(ca, sa) == _signal_probe(cb, sb)).all(axis=1)
            checked += len(sa)
            if eq.any():
                return sb[eq], checked
        return np.zeros(0, dtype=np.int64), checked

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_finite": None}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def nonfinite_mask(self, flats: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which of the records ``flats`` hold a NaN / Inf anywhere (a damaged shard).

        Each record is checked whole, once per process, the first time it is asked for (about 5-15 us for 10 s
        of 12 leads at 100 Hz: it reads the record); later calls cost one array look-up. The answer is a property
        of the stored record, the same in every process, whatever was read before. Used with ``nonfinite="skip"``
        for every crop and window (a record is used with all its samples or not at all) and to pick replacement
        records; with ``nonfinite="error"`` training batches use the cheaper check of the crops themselves."""
        if self._finite is None:
            self._finite = np.zeros(len(self), dtype=np.int8)
        flats = np.asarray(flats, dtype=np.int64)
        state = self._finite[flats]
        if (state == 0).any():
            todo = np.unique(flats[state == 0])
            for cache, rows, local in self.group(todo):
                c = cache.columns()
                first = (c["offset"][local] // 4).tolist()
                size = (c["n_leads"][local].astype(np.int64) * c["n_samples"][local]).tolist()
                flags = np.empty(len(local), dtype=np.int8)
                for j, (sh, a, k) in enumerate(zip(c["shard"][local].tolist(), first, size)):
                    flags[j] = 1 if np.isfinite(cache._shard_map(sh)[a:a + k]).all() else 2
                self._finite[todo[rows]] = flags
            state = self._finite[flats]
        return state == 2

    def locate(self, flat: int) -> tuple[CorpusCache, int]:
        k = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        return self.caches[k], int(flat - self.offsets[k])

    def group(self, flats: np.ndarray) -> list[tuple[CorpusCache, np.ndarray, np.ndarray]]:
        """Split flat indices by cache: ``[(cache, positions in flats, record indices in that cache), ...]``."""
        flats = np.asarray(flats, dtype=np.int64)
        if len(self.caches) == 1:
            return [(self.caches[0], np.arange(len(flats)), flats)]
        which = np.searchsorted(self.offsets, flats, side="right") - 1
        out = []
        for k in np.unique(which).tolist():
            rows = np.flatnonzero(which == k)
            out.append((self.caches[k], rows, flats[rows] - self.offsets[k]))
        return out

    def n_samples(self, flat: int) -> int:
        cache, i = self.locate(flat)
        return int(cache.columns()["n_samples"][i])

    def keys(self, flats: Sequence[int]) -> list[str]:
        """``source/record_id`` of flat indices."""
        out = []
        for flat in flats:
            cache, i = self.locate(int(flat))
            out.append(cache.keys[i])
        return out

    def nonfinite_error(self, flats: Sequence[int], what: str = "input windows") -> NonFiniteDataError:
        """:class:`NonFiniteDataError` naming the cache folder(s), shard file(s) and keys of records ``flats``."""
        groups = self.group(np.unique(np.asarray(flats, dtype=np.int64)))
        first = groups[0][0].nonfinite_error(groups[0][2], what)
        if len(groups) == 1:
            return first
        more = "; ".join(cache.describe_records(local) for cache, _, local in groups[1:])
        return NonFiniteDataError(first.path, f"{first.problem} Also {more}")


def _source_roots(cache: CorpusCache) -> dict[str, set[str]] | None:
    """Source name -> the folders (``root`` settings, wrapped sources' included) it read, from the cache's
    manifest; None when the manifest does not name every source."""
    srcs = cache.manifest.get("sources")
    if not isinstance(srcs, list) or not srcs:
        return None
    out: dict[str, set[str]] = {}

    def walk(desc: Any, into: set[str]) -> None:
        if isinstance(desc, Mapping):
            for key, value in desc.items():
                if key == "root" and isinstance(value, str) and value:
                    into.add(os.path.normpath(os.path.abspath(value)))
                else:
                    walk(value, into)
        elif isinstance(desc, list):
            for value in desc:
                walk(value, into)

    for desc in srcs:
        if not isinstance(desc, Mapping) or desc.get("name") is None:
            return None
        walk(desc, out.setdefault(str(desc["name"]), set()))
    return out


#: samples read per probe window by :func:`_signal_probe` (three windows: start, middle, end of a record)
_PROBE = 32


def _signal_probe(cache: CorpusCache, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), 3 * _PROBE)`` uint32: the bits of the first, middle and last :data:`_PROBE` stored values of
    records ``rows`` (all leads, as stored; fewer values repeat the record's last one), read shard by shard
    (vectorised: a few pages a record, never the whole record). Bits, so NaN equals NaN."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), 3 * _PROBE), dtype=np.uint32)
    if not len(rows):
        return out
    c = cache.columns()
    first = c["offset"][rows].astype(np.int64) // 4
    size = c["n_leads"][rows].astype(np.int64) * c["n_samples"][rows].astype(np.int64)
    step = np.arange(_PROBE, dtype=np.int64)
    rel = np.concatenate([step[None, :] + 0 * size[:, None], (size // 2)[:, None] + step[None, :],
                          (size - _PROBE)[:, None] + step[None, :]], axis=1)
    rel = np.clip(rel, 0, np.maximum(size - 1, 0)[:, None])
    shard = c["shard"][rows]
    for sh in np.unique(shard).tolist():
        sel = np.flatnonzero(shard == sh)
        mm = cache._shard_map(int(sh))
        out[sel] = mm[np.minimum(first[sel, None] + rel[sel], max(len(mm) - 1, 0))].view(np.uint32)
    return out


def batch_buffers(fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Zero tensors for one batch, all views of ONE storage; inside a DataLoader worker that storage is one
    shared-memory segment (as ``default_collate`` would allocate, so handing the batch over costs no copy).

    One storage per batch instead of one per tensor: the worker creates one segment, and the main process
    receives one file descriptor (each costs a socket round trip, ~0.5 ms) instead of one per tensor (``x``,
    ``lead_mask``, ``index``, ``patient``, ...), which had made the main process the bottleneck of the loader.

    Args:
        fields: name -> ``(shape, dtype)``.

    Returns:
        name -> zero tensor of that shape and dtype (contiguous views of the shared storage).
    """
    layout, offset = [], 0
    # widest element types first, so every view starts at a multiple of its element size
    for name, (shape, dtype) in sorted(fields.items(), key=lambda kv: -kv[1][1].itemsize):
        size = dtype.itemsize
        offset = -(-offset // size) * size
        layout.append((name, tuple(int(d) for d in shape), dtype, offset))
        offset += math.prod(shape) * size
    nbytes = max(offset, 1)
    if get_worker_info() is None:
        storage = torch.UntypedStorage(nbytes)
    else:
        storage = torch.UntypedStorage._new_shared(nbytes)
    storage.fill_(0)
    views = {name: torch.empty(0, dtype=dtype).set_(storage, off // dtype.itemsize, shape)
             for name, shape, dtype, off in layout}
    return {name: views[name] for name in fields}


# ------------------------------------------------------------------------------------------ non-finite windows

#: what a dataset does with a window holding NaN / Inf: raise :class:`~ecgfm.data.cache.NonFiniteDataError`
#: naming the cache, shard and records (``"error"``), or leave the record out and count it (``"skip"``).
NONFINITE_MODES = ("error", "skip")


def _check_nonfinite_mode(mode: str) -> str:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
    return mode


class NonFiniteCounter:
    """Records skipped for non-finite values, counted across a loader's worker processes.

    Two small tensors in shared memory (inherited or passed to the workers with the dataset), one row per
    process (the main process and each worker write only their own row, so no lock is needed): the number of
    windows skipped and the first ``keep`` distinct flat record indices.

    Args:
        slots: processes that may write (``num_workers + 1``); extra workers share the last row.
        keep: distinct records remembered per process.
    """

    def __init__(self, slots: int, keep: int = 256):
        self.counts = torch.zeros(max(int(slots), 1), dtype=torch.int64).share_memory_()
        self.flats = torch.full((max(int(slots), 1), int(keep)), -1, dtype=torch.int64).share_memory_()

    def add(self, flats: Sequence[int]) -> None:
        """Count ``flats`` (one per skipped window) in this process's row."""
        info = get_worker_info()
        slot = min(0 if info is None else 1 + int(info.id), len(self.counts) - 1)
        row = self.flats[slot]
        for f in flats:
            self.counts[slot] += 1
            known = row.numpy()
            if int(f) not in known:
                free = np.flatnonzero(known < 0)
                if len(free):
                    row[int(free[0])] = int(f)

    @property
    def skipped(self) -> int:
        """Windows skipped so far (all processes)."""
        return int(self.counts.sum())

    def records(self) -> np.ndarray:
        """Sorted distinct flat indices of the skipped records (up to ``keep`` per process)."""
        f = self.flats.numpy().ravel()
        return np.unique(f[f >= 0])


def _nonfinite_rows(batch: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray | None:
    """Rows of ``batch`` whose signal views hold a NaN / Inf, or None when all are finite.

    One ``sum`` over the batch first (NaN and Inf propagate; finite crops of clipped / normalised signals cannot
    overflow it): a clean batch costs one pass at memory speed (about 0.5 us per 12-lead 2.5 s crop), and the
    per-row check runs only when it fails.
    """
    bad = None
    for name in names:
        x = batch[name]
        if x.numel() == 0 or bool(torch.isfinite(x.sum())):
            continue
        rows = (~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).numpy()
        bad = rows if bad is None else bad | rows
    return bad if bad is not None and bad.any() else None


def loader_worker_init(worker_id: int, parent_pid: int | None = None) -> None:
    """DataLoader ``worker_init_fn`` of every loader built here: the worker exits when the process that started
    it dies (:func:`ecgfm.data.cache.die_with_parent`), so a SIGKILLed run leaves no worker behind. Usable by
    other loaders: ``functools.partial(loader_worker_init, parent_pid=os.getpid())``."""
    die_with_parent(parent_pid)


def collate_batch(batch: Any) -> Any:
    """DataLoader ``collate_fn``: batches built by ``__getitems__`` are already dicts of tensors."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def open_pretext_targets(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a record-level pretext targets file (``.npy``, ``(N, F)`` float32, NaN where unknown: e.g.
    :func:`ecgfm.evaluate.handcrafted.pretext_targets_file`); the pages are shared by every process reading it.

    Raises:
        ECGDataError: naming the file: missing, unreadable, not float32 or not 2-D.
    """
    try:
        t = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty file
        raise ECGDataError(path, f"pretext targets unreadable ({type(exc).__name__}: {exc})") from None
    if t.dtype != np.float32 or t.ndim != 2:
        raise ECGDataError(path, f"pretext targets must be a 2-D float32 array, got {t.dtype} {t.shape}")
    return t


def _targets_of(targets: np.ndarray | str | os.PathLike | None) -> np.ndarray | None:
    if targets is None:
        return None
    if isinstance(targets, (str, os.PathLike)):
        return open_pretext_targets(targets)
    return np.asarray(targets, dtype=np.float32)


class CropDataset(Dataset):
    """Crops of records of a :class:`CachePool`.

    An item key is either ``k`` (int: the centred crop of record ``indices[k]``) or ``(k, u)`` (the crop
    starting at ``floor(u * (T - need + 1))``, as yielded by the samplers). ``__getitems__`` builds a whole
    batch into preallocated arrays (DataLoader uses it, with :func:`collate_batch`), which is several times
    faster than collating per-item dicts.

    Args:
        pool: the caches.
        indices: flat record indices this dataset covers.
        crop_samples: crop length ``T`` in samples.
        views: ``"single"``, ``"adjacent"`` (also return ``x2``, the next ``T`` samples) or ``"segments"``
            (``x2``: another crop of the same record, placed independently; centred crops repeat ``x``).
        labels: optional ``(len(pool), C)`` float32 or ``(len(pool),)`` int64, returned as ``y``.
        with_patient: include ``patient``.
        nonfinite: a crop holding NaN / Inf raises :class:`~ecgfm.data.cache.NonFiniteDataError` naming the
            cache, shard and record (``"error"``), or a record holding NaN / Inf anywhere is skipped and counted in
            ``counter`` (``"skip"``; see below).
        on_skip: what replaces the crop of a skipped record: ``"replace"`` (the next record of ``indices`` with
            finite values, same crop position: the batch keeps its size, for training) or ``"drop"`` (the batch
            gets smaller: evaluation never scores a record on another record's signal).
        targets: optional ``(len(pool), F)`` float32 record-level pretext targets (NaN where unknown), returned
            as ``t (B, F)``; or the path of a ``.npy`` file holding them (:func:`open_pretext_targets`), which
            is memory-mapped and, when the dataset is pickled for a spawned loader worker, sent as its path.
        crop_targets: optional crop-level targets (needs ``targets``): an object with ``len() == len(pool)`` and
            ``fill(t (n, F), flats (n,), starts (n,), stops (n,))`` that overwrites some columns of each crop's
            record-level row with values of the crop's own samples ``[start, stop)`` (e.g.
            :class:`ecgfm.evaluate.handcrafted.CropRhythmTargets`); with two views the batch then carries ``t``
            (of ``x``) and ``t2`` (of ``x2``).

        counter: where skipped records are counted (a new one when None).

    With ``nonfinite="error"`` every batch is checked (:func:`_nonfinite_rows`: one sum, the per-row check only when
    it is not finite) and a crop holding NaN / Inf raises. With ``"skip"`` a record is skipped when it holds NaN /
    Inf anywhere (:meth:`CachePool.nonfinite_mask`, the whole record checked once per process), also for crops
    that miss its damaged samples: whether a draw is skipped, and what replaces it, is a function of the record
    alone, so batches do not depend on the number of loader workers or on where a run was resumed.
    """

    def __init__(self, pool: CachePool, indices: np.ndarray, crop_samples: int, views: str = "single",
                 labels: np.ndarray | None = None, with_patient: bool = True, nonfinite: str = "error",
                 on_skip: str = "replace", counter: NonFiniteCounter | None = None,
                 targets: np.ndarray | str | os.PathLike | None = None, crop_targets: Any | None = None):
        if on_skip not in ("replace", "drop"):
            raise ValueError(f"on_skip must be 'replace' or 'drop', got {on_skip!r}")
        self.nonfinite, self.on_skip = _check_nonfinite_mode(nonfinite), on_skip
        self.counter = counter if counter is not None else NonFiniteCounter(1)
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        if int(crop_samples) < 1:
            raise ValueError(f"crop_samples must be >= 1, got {crop_samples}")
        self.pool, self.indices = pool, np.asarray(indices, dtype=np.int64)
        self.crop, self.views, self.labels, self.with_patient = int(crop_samples), views, labels, with_patient
        self._targets_path = str(targets) if isinstance(targets, (str, os.PathLike)) else None
        self._targets = _targets_of(targets)
        if self._targets is not None and (self._targets.ndim != 2 or len(self._targets) != len(pool)):
            raise ValueError(f"targets{' ' + self._targets_path if self._targets_path else ''} must be "
                             f"(len(pool)={len(pool)}, F), got {self._targets.shape}")
        if crop_targets is not None and (self._targets is None or len(crop_targets) != len(pool)):
            raise ValueError(f"crop_targets {crop_targets!r} need the record-level targets and len(pool)="
                             f"{len(pool)} rows, got targets={'none' if self._targets is None else 'given'}, "
                             f"{len(crop_targets)} rows")
        self.crop_targets = crop_targets

    @property
    def targets(self) -> np.ndarray | None:
        """``(len(pool), F)`` pretext targets (memory-mapped when given as a file), or None."""
        if self._targets is None and self._targets_path is not None:
            self._targets = open_pretext_targets(self._targets_path)
        return self._targets

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._targets_path is not None:
            state["_targets"] = None          # a spawned worker maps the file itself: no copy of the array
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, float]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def __getitems__(self, keys: Sequence[int | tuple[int, float]]) -> dict[str, torch.Tensor]:
        n = len(keys)
        ks = np.empty(n, dtype=np.int64)
        us = np.full(n, np.nan)             # NaN: centred crop
        for b, key in enumerate(keys):
            if isinstance(key, (tuple, list)):
                ks[b], us[b] = int(key[0]), float(key[1])
            else:
                ks[b] = int(key)
        if self.nonfinite == "skip":
            # decided from the whole record, not from this crop: the same in every process (see the class docstring)
            bad = self.pool.nonfinite_mask(self.indices[ks])
            if bad.any():
                ks, us = self._skip_nonfinite(ks, us, bad)
            return self._build(ks, us)
        batch = self._build(ks, us)
        bad = _nonfinite_rows(batch, ["x"] if self.views == "single" else ["x", "x2"])
        if bad is not None:
            raise self.pool.nonfinite_error(self.indices[ks][bad])
        return batch

    def _skip_nonfinite(self, ks: np.ndarray, us: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count the records ``bad`` (``nonfinite="skip"``) and drop / replace their keys."""
        flats = self.indices[ks]
        self.counter.add(flats[bad])
        if self.on_skip == "drop":
            return ks[~bad], us[~bad]
        ks = ks.copy()
        for b in np.flatnonzero(bad).tolist():
            for step in range(1, len(self.indices) + 1):
                k2 = (int(ks[b]) + step) % len(self.indices)
                if not self.pool.nonfinite_mask(self.indices[k2:k2 + 1])[0]:
                    ks[b] = k2
                    break
            else:
                raise self.pool.nonfinite_error(np.unique(self.indices), "every record (nothing left to train on)")
        return ks, us

    def _build(self, ks: np.ndarray, us: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of crops ``(indices[ks[b]], u[b])`` (``u`` NaN: centred)."""
        n, views = len(ks), 1 if self.views == "single" else 2
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "x": ((n, N_LEADS, self.crop), torch.float32), "lead_mask": ((n, N_LEADS), torch.bool),
            "index": ((n,), torch.int64), "recorded": ((n,), torch.int64)}
        if views == 2:
            fields["x2"] = ((n, N_LEADS, self.crop), torch.float32)
        if self.with_patient:
            fields["patient"] = ((n,), torch.int64)
        if self.labels is not None:
            fields["y"] = (tuple((n,) + self.labels.shape[1:]), torch.from_numpy(self.labels[:0]).dtype)
        if self.targets is not None:
            fields["t"] = ((n, self.targets.shape[1]), torch.float32)
            if self.crop_targets is not None and views == 2:
                fields["t2"] = fields["t"]
        batch = batch_buffers(fields)
        out = {k: t.numpy() for k, t in batch.items()}
        flats = self.indices[ks]
        out["index"][:] = flats
        need = self.crop * (2 if self.views == "adjacent" else 1)
        xnames = ["x", "x2"][:views]
        starts = np.zeros((views, n), dtype=np.int64)     # each view's first sample, and its record's length
        lengths = np.zeros(n, dtype=np.int64)
        # Whole-batch look-ups, one group per cache; per crop only the slice copy is left in Python.
        for cache, rows, local in self.pool.group(flats):
            fields_c = cache.columns()
            free = np.maximum(fields_c["n_samples"][local] - need, 0)
            u = us[rows]
            # floor(u * (free + 1)) as in the samplers' contract (u >= 0), capped at free; NaN -> centred
            start = np.where(np.isnan(u), free // 2, np.minimum(np.nan_to_num(u * (free + 1)).astype(np.int64),
                                                                  free))
            whole = len(rows) == n
            parts = [out[k] if whole else np.zeros((len(rows),) + out[k].shape[1:], np.float32) for k in xnames]
            out["lead_mask"][rows] = cache.read_windows_into(local, start, parts[0])
            starts[0, rows], lengths[rows] = start, fields_c["n_samples"][local]
            if self.views == "adjacent":
                starts[1, rows] = start + self.crop
                cache.read_windows_into(local, start + self.crop, parts[1])
            elif self.views == "segments":
                # the second segment's draw: the fractional part of u * _SEGMENT_MIX is uniform and (for a
                # continuous u) unrelated to u itself, so both segments follow from the sampler's one draw and stay
                # reproducible; a centred crop (u NaN) and a record no longer than the crop give the same segment
                u2 = np.modf(u * _SEGMENT_MIX)[0]
                start2 = np.where(np.isnan(u), start, np.minimum(np.nan_to_num(u2 * (free + 1)).astype(np.int64),
                                                                   free))
                starts[1, rows] = start2
                cache.read_windows_into(local, start2, parts[1])
            if not whole:
                for k, part in zip(xnames, parts):
                    out[k][rows] = part
            if self.with_patient:
                out["patient"][rows] = fields_c["patient"][local]
        out["recorded"][:] = np.clip(lengths - starts[0], 0, self.crop)   # x's samples before its zero padding
        if self.labels is not None:
            out["y"][:] = self.labels[flats]
        if self.targets is not None:
            out["t"][:] = self.targets[flats]
            if self.crop_targets is not None:
                if views == 2:
                    out["t2"][:] = out["t"]            # the record-level row; the crop's columns follow
                for k, tname in enumerate(["t", "t2"][:views]):
                    start = np.minimum(starts[k], lengths)
                    self.crop_targets.fill(out[tname], flats, start, np.minimum(start + self.crop, lengths))
        return batch


class WindowDataset(Dataset):
    """Every sliding window (``crop_samples`` long, every ``stride`` samples, the last one aligned to the end,
    like :func:`ecgfm.data.preprocess.sliding_windows`) of the given records; ``index`` is the record.

    A record holding any NaN / Inf (checked whole, :meth:`CachePool.nonfinite_mask`) raises
    :class:`~ecgfm.data.cache.NonFiniteDataError` (``nonfinite="error"``) or loses *all* its windows
    (``"skip"``: no record is scored on part of its signal; batches may then be smaller than ``batch_size``).
    """

    def __init__(self, pool: CachePool, indices: np.ndarray, crop_samples: int, stride: int,
                 labels: np.ndarray | None = None, nonfinite: str = "error",
                 counter: NonFiniteCounter | None = None):
        if int(stride) < 1 or int(crop_samples) < 1:
            raise ValueError(f"crop_samples and stride must be >= 1, got {crop_samples}, {stride}")
        self.nonfinite = _check_nonfinite_mode(nonfinite)
        self.counter = counter if counter is not None else NonFiniteCounter(1)
        self.pool, self.crop, self.labels = pool, int(crop_samples), labels
        flats, starts = [], []
        for flat in np.asarray(indices, dtype=np.int64):
            t = pool.n_samples(int(flat))
            s = list(range(0, t - self.crop + 1, int(stride))) if t > self.crop else [0]
            if t > self.crop and s[-1] != t - self.crop:
                s.append(t - self.crop)
            flats.extend([int(flat)] * len(s))
            starts.extend(s)
        self.flats, self.starts = np.asarray(flats, dtype=np.int64), np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.flats)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {key: v[0] for key, v in self.__getitems__([k]).items()}

    def __getitems__(self, keys: Sequence[int]) -> dict[str, torch.Tensor]:
        ks = np.asarray([int(k) for k in keys], dtype=np.int64)
        bad = self.pool.nonfinite_mask(self.flats[ks])
        if bad.any():
            if self.nonfinite == "error":
                raise self.pool.nonfinite_error(self.flats[ks][bad])
            self.counter.add(self.flats[ks][bad])
            ks = ks[~bad]
        n = len(ks)
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "x": ((n, N_LEADS, self.crop), torch.float32), "lead_mask": ((n, N_LEADS), torch.bool),
            "index": ((n,), torch.int64)}
        if self.labels is not None:
            fields["y"] = (tuple((n,) + self.labels.shape[1:]), torch.from_numpy(self.labels[:0]).dtype)
        batch = batch_buffers(fields)
        x, mask = batch["x"].numpy(), batch["lead_mask"].numpy()
        flats, starts = self.flats[ks], self.starts[ks]
        batch["index"].numpy()[:] = flats
        for cache, rows, local in self.pool.group(flats):
            if len(rows) == n:
                mask[:] = cache.read_windows_into(local, starts, x)
            else:
                part = np.zeros((len(rows),) + x.shape[1:], dtype=x.dtype)
                mask[rows] = cache.read_windows_into(local, starts[rows], part)
                x[rows] = part
        if self.labels is not None:
            batch["y"].numpy()[:] = self.labels[flats]
        return batch


def patient_holdout(patients: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of the records, whole patients at a time (unknown patient: own group).

    Args:
        patients: ``(N,)`` int64 patient hashes (-1 unknown).
        fraction: share of records to hold out (at least one record when > 0 and N > 1).
        seed: which patients (pure function of the inputs and seed).

    Returns:
        ``(keep, held_out)`` sorted int64 indices.
    """
    n = len(patients)
    target = int(round(fraction * n))
    if fraction > 0 and n > 1:
        target = max(target, 1)
    if target <= 0 or n == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    groups = np.where(patients >= 0, patients, -2 - np.arange(n, dtype=np.int64))
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(uniq))
    taken = order[:int(np.searchsorted(np.cumsum(counts[order]), target) + 1)]
    held = np.isin(inverse, taken)
    if held.all() and n > 1:   # one patient owns everything: keep it for training
        held[:] = False
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, persistent: bool, pin_memory: bool,
            sampler: Any = None, drop_last: bool = False) -> DataLoader:
    init = functools.partial(loader_worker_init, parent_pid=os.getpid()) if num_workers > 0 else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      persistent_workers=bool(persistent and num_workers > 0), pin_memory=pin_memory,
                      drop_last=drop_last, collate_fn=collate_batch, worker_init_fn=init)


def _nonfinite_report(mode: str, pool: CachePool | None, counters: Mapping[str, NonFiniteCounter]
                      ) -> dict[str, Any]:
    flats = np.unique(np.concatenate([c.records() for c in counters.values()] + [np.zeros(0, np.int64)]))
    return {"mode": mode, "skipped": int(sum(c.skipped for c in counters.values())),
            "by_split": {k: c.skipped for k, c in counters.items()},
            "records": pool.keys(flats) if pool is not None and len(flats) else []}


class PretrainDataModule(LightningDataModule):
    """Random crops from a weighted mixture of caches for self-supervised pretraining.

    Args:
        cache_dirs: one cache directory or several (mixed).
        weights: sampling probability of each cache (None: proportional to its training records).
        crop_samples: crop length in samples (at the caches' common rate).
        views: ``"single"``, ``"adjacent"`` (``x2``: the next ``crop_samples`` of the same record) or
            ``"segments"`` (``x2``: a second crop of the same record at its own random offset; SimCLR then
            contrasts two segments of one recording, as CLOCS CMSC does, with its augmentations on top). A record
            no longer than a crop has no second view (``adjacent``: ``x2`` is zero padding; ``segments``: ``x2``
            equals ``x``): :meth:`setup` warns with the share of such training draws, and refuses ``adjacent``
            when it is every draw. An ``adjacent`` pair needs two crops: a record shorter than that gives a pair
            starting at the record's start whose ``x2`` ends in zero padding; :meth:`setup` warns with the share of
            those draws too (SimCLR and CLOCS leave a pair whose ``x2`` is all zero out of the loss).
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes (persistent when > 0).
        val_fraction: share of each cache's records held out for validation, whole patients at a time.
        seed: seed of the hold-out, of the epoch orders and of the crops.
        probe_labels: optional labels for an online probe: ``(N_total, C)`` array over the concatenated caches,
            or a list of class names (looked up with :meth:`CorpusCache.labels_matrix` in every cache). Batches
            then carry ``y (B, C)`` float32.
        samples_per_epoch: draws per epoch over all ranks (None: the number of training records).
        record_targets: optional ``(N_total, F)`` float32 record-level pretext targets over the concatenated
            caches, NaN where unknown (e.g. :func:`ecgfm.evaluate.handcrafted.pretext_targets`), or the path of a
            ``.npy`` file holding them (:func:`ecgfm.evaluate.handcrafted.pretext_targets_file`; memory-mapped,
            what train.py passes); batches then carry ``t (B, F)``, the targets of each crop's record.
        crop_targets: optional crop-level targets on top of ``record_targets`` (see :class:`CropDataset`; train.py
            passes :class:`ecgfm.evaluate.handcrafted.CropRhythmTargets` for ``method.aux_targets=handcrafted_crop``):
            ``t`` then holds the targets of ``x`` and, with two views, ``t2`` those of ``x2``.
        pin_memory, persistent_workers, drop_last: DataLoader options (drop_last for training only).
        rank, world_size: override ``torch.distributed`` (tests).
        nonfinite: a crop holding NaN / Inf (a damaged cache) raises
            :class:`~ecgfm.data.cache.NonFiniteDataError` naming the cache, shard file and record keys
            (``"error"``, default), or (``"skip"``) every crop of a record holding NaN / Inf anywhere is skipped,
            also crops that miss the damaged samples (decided from the whole record, so every loader worker and a
            resumed run skip the same draws): in training replaced by the next finite record (batches keep their
            size), in validation left out; counted, see :meth:`nonfinite_report`.
    """

    def __init__(self, cache_dirs: str | os.PathLike | Sequence[str | os.PathLike],
                 weights: Sequence[float] | None = None, crop_samples: int = 250, views: str = "single",
                 batch_size: int = 32, num_workers: int = 0, val_fraction: float = 0.05, seed: int = 0,
                 probe_labels: np.ndarray | Sequence[str] | None = None, samples_per_epoch: int | None = None,
                 pin_memory: bool = False, persistent_workers: bool = True, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None, nonfinite: str = "error",
                 record_targets: np.ndarray | str | os.PathLike | None = None, crop_targets: Any | None = None):
        super().__init__()
        self.nonfinite = _check_nonfinite_mode(nonfinite)
        self._counters = {k: NonFiniteCounter(int(num_workers) + 1) for k in ("train", "val")}
        self.record_targets, self.crop_targets = record_targets, crop_targets
        if isinstance(cache_dirs, (str, os.PathLike)):
            cache_dirs = [cache_dirs]
        self.cache_dirs = [str(c) for c in cache_dirs]
        if not self.cache_dirs:
            raise ValueError("PretrainDataModule needs at least one cache directory")
        if weights is not None and len(weights) != len(self.cache_dirs):
            raise ValueError(f"{len(weights)} weights for {len(self.cache_dirs)} caches")
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        if not 0 <= float(val_fraction) < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if int(batch_size) < 1 or int(crop_samples) < 1 or int(num_workers) < 0:
            raise ValueError("batch_size and crop_samples must be >= 1 and num_workers >= 0")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.crop_samples, self.views, self.batch_size = int(crop_samples), views, int(batch_size)
        self.num_workers, self.val_fraction, self.seed = int(num_workers), float(val_fraction), int(seed)
        self.probe_labels, self.samples_per_epoch = probe_labels, samples_per_epoch
        self.pin_memory, self.persistent_workers, self.drop_last = pin_memory, persistent_workers, drop_last
        self.rank, self.world_size = rank, world_size
        self.pool: CachePool | None = None
        self.train_pools: list[np.ndarray] = []
        self.val_indices = np.zeros(0, dtype=np.int64)
        self.labels: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the caches and hold out the validation patients (idempotent)."""
        if self.pool is not None:
            return
        pool = CachePool(self.cache_dirs)
        self.train_pools, val = [], []
        helds = [patient_holdout(cache.patients, self.val_fraction, self.seed + k)[1] for k, cache in
                 enumerate(pool.caches)]
        # a patient held out in one cache is held out in every cache: two caches sharing patients (two exports of
        # one hospital) would otherwise validate on patients the other cache trains on. Caches of distinct patients
        # (every pool of the shipped configs) keep their own hold-outs unchanged. A PTB-XL patient is one hash in
        # every cache, whichever source read the record (cache.record_patient_hash).
        held_patients = np.unique(np.concatenate([c.patients[h] for c, h in zip(pool.caches, helds)]))
        held_patients = held_patients[held_patients >= 0]
        for k, cache in enumerate(pool.caches):
            held = np.zeros(len(cache), dtype=bool)
            held[helds[k]] = True
            held |= (cache.patients >= 0) & np.isin(cache.patients, held_patients)
            self.train_pools.append(np.flatnonzero(~held).astype(np.int64) + pool.offsets[k])
            val.append(np.flatnonzero(held).astype(np.int64) + pool.offsets[k])
        self.val_indices = np.concatenate(val).astype(np.int64)
        if self.probe_labels is not None:
            pl = self.probe_labels
            if len(pl) and all(isinstance(c, str) for c in pl):
                self.labels = np.concatenate([c.labels_matrix(list(pl)) for c in pool.caches]).astype(np.float32)
            else:
                self.labels = np.asarray(pl, dtype=np.float32)
            if self.labels.ndim != 2 or len(self.labels) != len(pool):
                raise ValueError(f"probe_labels must be (N_total={len(pool)}, C), got {self.labels.shape}")
        if self.record_targets is not None:
            t = _targets_of(self.record_targets)
            if t.ndim != 2 or len(t) != len(pool):
                where = f" ({self.record_targets})" if isinstance(self.record_targets, (str, os.PathLike)) else ""
                raise ValueError(f"record_targets{where} must be (N_total={len(pool)}, F), got {t.shape}")
            if not isinstance(self.record_targets, (str, os.PathLike)):
                self.record_targets = t
        self.pool = pool
        try:
            self._check_second_views()     # may refuse views="adjacent" outright: before the padding warning
            self._check_padding()
        except ValueError:
            self.pool = None   # setup() runs the checks again, and raises again, when called again
            raise

    def _draw_share(self, samples: int, strict: bool) -> tuple[list[float], np.ndarray, float]:
        """Per cache, the share of its training records no longer (``strict``: shorter) than ``samples``; the
        mixture's draw probabilities of the caches; the share of the training draws from such records (read from
        the cache index, no record opened)."""
        short = []
        for k, (cache, p) in enumerate(zip(self.pool.caches, self.train_pools)):
            n = cache.columns()["n_samples"][p - self.pool.offsets[k]]
            short.append(float(np.mean(n < samples if strict else n <= samples)) if len(p) else 0.0)
        probs = self.train_sampler().probs                            # the share of the draws: the mixture's weights
        return short, probs, float(np.dot(probs, short))

    def _check_padding(self) -> None:
        """Warn, naming the share of training draws, when some training records are shorter than what a draw reads:
        one crop, or with ``views="adjacent"`` the pair ``x``, ``x2`` (two crops). Their crops end in zero padding
        (left out of the MAE losses through ``recorded``; signal to the other methods' views and to pooled
        embeddings); an adjacent pair of a record shorter than two crops starts at the record's start and its
        ``x2`` ends in padding (all of it for a record no longer than a crop: :meth:`_check_second_views`)."""
        adjacent = self.views == "adjacent"
        need = self.crop_samples * (2 if adjacent else 1)
        share = self._draw_share(need, strict=True)[2]
        if share == 0:
            return
        crop = (f"crop_samples={self.crop_samples} (crop_seconds={self.crop_samples / self.pool.fs:g} at "
                f"{self.pool.fs:g} Hz)")
        if adjacent:
            warnings.warn(f"data.views='adjacent' with {crop}: the adjacent pair x, x2 ({need} samples, "
                          f"{need / self.pool.fs:g} s) is longer than the training records of {share:.1%} of the "
                          f"draws: their pair starts at the record's start and x2 ends in zero padding (partly for a "
                          f"record between one and two crops long: SimCLR / CLOCS views include it; wholly for one "
                          f"no longer than a crop: SimCLR and CLOCS leave the pair out of the loss; x too ends in "
                          f"padding for one shorter than a crop); a crop_seconds of at most half the records' "
                          f"length gives whole pairs",
                          UserWarning, stacklevel=3)
            return
        warnings.warn(f"{crop} is longer than the training records of {share:.1%} of the draws: "
                      f"their crops end in zero padding (MAE / CREMA leave patches without a recorded sample out "
                      f"of the loss; SimCLR / CLOCS views and pooled embeddings include the padding)",
                      UserWarning, stacklevel=3)

    def _check_second_views(self) -> None:
        """Refuse ``views="adjacent"`` when no training record is longer than a crop (every ``x2`` would be zero
        padding); warn, naming the share of training draws, when some records give a degenerate second view
        (``adjacent``: all zero padding; ``segments``: ``x2`` equal to ``x``)."""
        if self.views == "single":
            return
        short, probs, share = self._draw_share(self.crop_samples, strict=False)
        if share == 0:
            return
        crop = (f"data.views={self.views!r} with crop_samples={self.crop_samples} (crop_seconds="
                f"{self.crop_samples / self.pool.fs:g} at {self.pool.fs:g} Hz)")
        what = ("the adjacent segment x2 is all zero padding" if self.views == "adjacent" else
                "the second segment x2 is the same crop as x")
        if self.views == "adjacent" and all(s == 1.0 for s, p in zip(short, probs) if p > 0):
            raise ValueError(f"{crop}: no training record is longer than a crop, so {what} for every record (SimCLR "
                             "and CLOCS would mask every pair and train on nothing): "
                             "lower crop_seconds below the record length (at most half of it for a whole adjacent "
                             "segment) or use data.views=segments / single")
        why = ("SimCLR and CLOCS leave those pairs out of the loss" if self.views == "adjacent" else
               "their two views are augmentations of one crop")
        warnings.warn(f"{crop}: {what} for {share:.1%} of the training draws (records no longer than a crop: {why})",
                      UserWarning, stacklevel=3)

    @property
    def fs(self) -> float:
        """Sampling rate of the caches."""
        self.setup()
        return self.pool.fs

    def train_dataset(self) -> CropDataset:
        self.setup()
        return CropDataset(self.pool, np.concatenate(self.train_pools), self.crop_samples, self.views,
                           self.labels, nonfinite=self.nonfinite, on_skip="replace", counter=self._counters["train"],
                           targets=self.record_targets, crop_targets=self.crop_targets)

    def nonfinite_report(self) -> dict[str, Any]:
        """Non-finite crops skipped so far (``nonfinite="skip"``), over all loader workers of this process:
        ``{"mode", "skipped" (crops), "by_split": {"train", "val"}, "records": sorted record keys}`` (up to 256
        distinct records per process). Each DDP rank counts its own."""
        return _nonfinite_report(self.nonfinite, self.pool, self._counters)

    def train_sampler(self) -> MixtureSampler:
        self.setup()
        sizes = [len(p) for p in self.train_pools]
        weights = self.weights
        if weights is not None:   # a cache whose records all went to validation cannot be drawn
            weights = [w if s > 0 else 0.0 for w, s in zip(weights, sizes)]
        return MixtureSampler(sizes, weights, self.samples_per_epoch, self.seed, self.rank, self.world_size)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_dataset(), self.batch_size, self.num_workers, self.persistent_workers,
                       self.pin_memory, sampler=self.train_sampler(), drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if len(self.val_indices) == 0:
            return []
        ds = CropDataset(self.pool, self.val_indices, self.crop_samples, self.views, self.labels,
                         nonfinite=self.nonfinite, on_skip="drop", counter=self._counters["val"],
                         targets=self.record_targets, crop_targets=self.crop_targets)
        return _loader(ds, self.batch_size, self.num_workers, self.persistent_workers, self.pin_memory)


class DownstreamDataModule(LightningDataModule):
    """Labelled crops of one cache with fixed train / val / test splits.

    Args:
        cache_dir: the cache.
        labels: ``(N, C)`` float32 multi-hot for every cache record (multi-label), or ``(N,)`` class indices /
            ``(N, C)`` one-hot with ``multilabel=False`` (every row of the train / val / test splits must then have
            exactly one positive; rows outside the splits are not used and not checked).
        splits: ``{"train", "val", "test"}`` -> record indices (e.g. from :mod:`ecgfm.data.splits`).
        crop_samples: crop length in samples.
        batch_size, num_workers: DataLoader options.
        multilabel: ``y`` is ``(B, C)`` float32 (True) or ``(B,)`` int64 class indices (False).
        test_stride: if set, val/test loaders yield every sliding window (stride in samples) of each record,
            to be aggregated by ``index``; otherwise one centred crop per record.
        seed: seed of the training order and crops.
        pin_memory, persistent_workers, drop_last: DataLoader options (drop_last for training only).
        rank, world_size: override ``torch.distributed`` (tests).
        nonfinite: ``"error"`` (default) or ``"skip"``, as in :class:`PretrainDataModule`; skipped records are
            left out of validation / test entirely (every window), see :meth:`nonfinite_report`.
        epoch_samples: training crops per epoch (None: one per training record); more than the training records
            repeats them, each pass in a fresh order (:class:`EpochShuffleSampler`'s ``epoch_size``); fewer is
            refused (an epoch is at least one pass).

    Raises:
        ValueError: labels or splits that do not fit the cache, a record in two splits, ``epoch_samples`` below the
            number of training records, or a non-one-hot row with ``multilabel=False``.
    """

    def __init__(self, cache_dir: str | os.PathLike | CorpusCache, labels: np.ndarray,
                 splits: Mapping[str, Sequence[int]], crop_samples: int = 250, batch_size: int = 32,
                 num_workers: int = 0, multilabel: bool = True, test_stride: int | None = None, seed: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = True, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, nonfinite: str = "error",
                 epoch_samples: int | None = None):
        super().__init__()
        self.nonfinite = _check_nonfinite_mode(nonfinite)
        self._counters = {k: NonFiniteCounter(int(num_workers) + 1) for k in ("train", "val", "test")}
        if epoch_samples is not None and int(epoch_samples) < 1:
            raise ValueError(f"epoch_samples must be >= 1 or None, got {epoch_samples}")
        self.epoch_samples = None if epoch_samples is None else int(epoch_samples)
        self.pool = CachePool([cache_dir])
        n = len(self.pool)
        y = np.asarray(labels)
        if len(y) != n:
            raise ValueError(f"labels have {len(y)} rows but the cache {self.pool.caches[0].path} has {n} records")
        if multilabel:
            if y.ndim != 2:
                raise ValueError(f"multilabel=True needs labels (N, C), got shape {y.shape}")
            y = y.astype(np.float32)
            self.num_classes = int(y.shape[1])
        missing = [k for k in ("train", "val", "test") if k not in splits]
        if missing:
            raise ValueError(f"splits lacks {missing} (needs train, val, test)")
        self.splits = {}
        for k, idx in splits.items():
            idx = np.asarray(idx, dtype=np.int64).ravel()
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"split {k!r} has indices outside [0, {n})")
            self.splits[k] = idx
        try:   # record-level only: patients are the task's business (ecgfm.evaluate.tasks checks them)
            assert_disjoint_patients(self.splits, [None] * n)
        except ValueError as exc:
            raise ValueError(f"DownstreamDataModule splits overlap: {exc} (train / val / test must not share "
                             "records)") from None
        if self.epoch_samples is not None and self.epoch_samples < len(self.splits["train"]):
            raise ValueError(f"epoch_samples={self.epoch_samples} is below one pass over the "
                             f"{len(self.splits['train'])} training records: an epoch is at least one pass (None: "
                             "exactly one)")
        if not multilabel:
            if y.ndim == 2:
                for k in ("train", "val", "test"):   # the rows used must be one-hot: no silent argmax
                    check_single_label(y, self.splits[k], where=f"split {k!r}")
                y = y.argmax(axis=1)
            y = y.astype(np.int64)
            self.num_classes = int(y.max()) + 1 if len(y) else 0
        self.labels = y
        if test_stride is not None and int(test_stride) < 1:
            raise ValueError(f"test_stride must be >= 1, got {test_stride}")
        self.crop_samples, self.batch_size, self.num_workers = int(crop_samples), int(batch_size), int(num_workers)
        self.multilabel, self.test_stride, self.seed = multilabel, test_stride, int(seed)
        self.pin_memory, self.persistent_workers, self.drop_last = pin_memory, persistent_workers, drop_last
        self.rank, self.world_size = rank, world_size

    @property
    def fs(self) -> float:
        return self.pool.fs

    @property
    def cache(self) -> CorpusCache:
        return self.pool.caches[0]

    def train_dataloader(self) -> DataLoader:
        ds = CropDataset(self.pool, self.splits["train"], self.crop_samples, "single", self.labels,
                         with_patient=False, nonfinite=self.nonfinite, on_skip="replace",
                         counter=self._counters["train"])
        sampler = EpochShuffleSampler(len(ds), self.seed, self.rank, self.world_size, epoch_size=self.epoch_samples)
        return _loader(ds, self.batch_size, self.num_workers, self.persistent_workers, self.pin_memory,
                       sampler=sampler, drop_last=self.drop_last)

    def _eval_loader(self, split: str) -> DataLoader:
        idx = self.splits[split]
        if self.test_stride is not None:
            ds: Dataset = WindowDataset(self.pool, idx, self.crop_samples, int(self.test_stride), self.labels,
                                        nonfinite=self.nonfinite, counter=self._counters[split])
        else:
            ds = CropDataset(self.pool, idx, self.crop_samples, "single", self.labels, with_patient=False,
                             nonfinite=self.nonfinite, on_skip="drop", counter=self._counters[split])
        return _loader(ds, self.batch_size, self.num_workers, self.persistent_workers, self.pin_memory)

    def nonfinite_report(self) -> dict[str, Any]:
        """Non-finite windows skipped so far (``nonfinite="skip"``): ``{"mode", "skipped", "by_split",
        "records"}`` as :meth:`PretrainDataModule.nonfinite_report`."""
        return _nonfinite_report(self.nonfinite, self.pool, self._counters)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
