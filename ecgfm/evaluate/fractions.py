"""Label-fraction subsets for low-label regimes: stratified, at patient level, nested across fractions.

For one ``seed`` the training patients are put in a single order, and the subset for a fraction ``f`` is the
shortest prefix of that order holding at least ``f`` of the training records. Hence

* **nested**: the 1 % subset is inside the 10 % subset, which is inside 100 %, for the same seed;
* **patient level**: a patient's records are all in or all out;
* **identical across methods**: the subset depends only on (training indices, labels, patients, seed), never on
  the model, so every method of a table sees the same labelled records;
* **stratified**: patients are grouped by a stratum (single-label: their class; multi-label: their rarest
  positive class, or "none"), shuffled within the stratum, and the strata are interleaved in proportion
  (patient ``r`` of a stratum of size ``m`` gets the sort key ``(r + u) / m`` with ``u`` uniform), so every
  prefix holds each stratum in about its overall proportion.
* With ``min_per_class=k`` (default 1), when a prefix holds fewer than ``k`` patients of a class, the first
  ``k`` patients of that class (in the same order) are added, so a tiny fraction still sees every class. This
  keeps nesting: a larger prefix either adds the same patients or already contains them. A class no training
  patient holds at all cannot be topped up: :func:`fraction_subsets` logs a warning naming its index.

scikit-learn's stratified splitters draw independent subsets per size (not nested) and know nothing of
patients, hence this small hand-written sampler.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ecgfm.data.splits import is_unknown_patient

log = logging.getLogger(__name__)


def _patient_groups(patient_ids: Sequence[object] | None, indices: np.ndarray) -> tuple[list, np.ndarray]:
    """Unique patients (first-seen order) and the patient number of each index (None: one patient each)."""
    if patient_ids is None:
        return [int(i) for i in indices], np.arange(len(indices))
    keys: dict = {}
    inverse = np.empty(len(indices), dtype=np.int64)
    for k, i in enumerate(indices):
        pid = patient_ids[int(i)]
        if is_unknown_patient(pid):  # the markers the splits take as unknown (None, NaN, "", -1, "-1", ...)
            pid = ("__record__", int(i))  # unknown patient: the record is its own patient
        inverse[k] = keys.setdefault(pid, len(keys))
    return list(keys), inverse


def patient_order(indices: Sequence[int], labels: np.ndarray, patient_ids: Sequence[object] | None,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random order of the patients behind ``indices``.

    Args:
        indices: ``(n,)`` record indices (into ``labels`` / ``patient_ids``) of the training split.
        labels: ``(N, C)`` binary indicators or ``(N,)`` class indices for all records.
        patient_ids: length-``N`` patient id per record (None / NaN: the record is its own patient), or None.
        seed: random seed.

    Returns:
        ``(order, patient_of)``: ``order`` is a permutation of patient numbers; ``patient_of (n,)`` maps each
        position in ``indices`` to its patient number.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels)
    onehot = labels[indices] if labels.ndim == 2 else np.eye(int(labels.max()) + 1)[labels[indices]]
    _, patient_of = _patient_groups(patient_ids, indices)
    n_pat = int(patient_of.max()) + 1 if len(indices) else 0
    pat_labels = np.zeros((n_pat, onehot.shape[1]), dtype=bool)
    np.logical_or.at(pat_labels, patient_of, onehot > 0.5)
    freq = onehot.sum(axis=0)
    # stratum of a patient: its rarest positive class (ties: lowest index); C for none
    masked = np.where(pat_labels, freq[None, :], np.inf)
    stratum = np.where(pat_labels.any(axis=1), np.argmin(masked, axis=1), onehot.shape[1])
    rng = np.random.default_rng(seed)
    key = np.empty(n_pat)
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        perm = rng.permutation(members)
        key[perm] = (np.arange(len(perm)) + rng.uniform(size=len(perm))) / len(perm)
    order = np.argsort(key, kind="mergesort")
    return order, patient_of


def fraction_subsets(indices: Sequence[int], labels: np.ndarray, patient_ids: Sequence[object] | None,
                     fractions: Sequence[float], seed: int, min_per_class: int = 1) -> dict[float, np.ndarray]:
    """Nested, stratified, patient-level subsets of the training records for several fractions at once.

    Args:
        indices: training record indices.
        labels: ``(N, C)`` indicators or ``(N,)`` class indices for all records.
        patient_ids: patient id per record (length ``N``) or None (each record its own patient).
        fractions: fractions in ``(0, 1]``.
        seed: random seed; the same seed gives the same subsets.
        min_per_class: if > 0, a subset with fewer patients of a class gets the first ``min_per_class``
            patients of that class (in the seed's order) added; a class without any training patient is logged
            as a warning (there is nothing to add).

    Returns:
        ``{fraction: sorted record indices}``; ``subset(f1) <= subset(f2)`` whenever ``f1 <= f2``. The subsets
        depend on which records ``indices`` holds, not on their order.
    """
    # sorted: the patients' first-seen order (and so the seed's shuffle) followed the order of the indices, so the
    # same training records given in another order drew another subset
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    for f in fractions:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"label fraction must be in (0, 1], got {f}")
    if len(indices) == 0:
        raise ValueError("no training records to subsample")
    order, patient_of = patient_order(indices, labels, patient_ids, seed)
    counts = np.bincount(patient_of, minlength=len(order))
    cum = np.cumsum(counts[order])
    labels = np.asarray(labels)
    onehot = labels[indices] if labels.ndim == 2 else np.eye(int(labels.max()) + 1)[labels[indices]]
    pat_has = np.zeros((len(order), onehot.shape[1]), dtype=bool)
    np.logical_or.at(pat_has, patient_of, onehot > 0.5)
    if min_per_class > 0:
        absent = np.flatnonzero(~pat_has.any(axis=0))
        if absent.size:
            log.warning("label fractions: the training split holds no patient of class(es) %s (class index), so "
                        "min_per_class=%d cannot add any: no training subset has a positive of them",
                        absent.tolist(), int(min_per_class))
    out: dict[float, np.ndarray] = {}
    for f in fractions:
        target = int(np.ceil(float(f) * len(indices)))
        n_take = int(np.searchsorted(cum, target) + 1)
        chosen = set(order[:n_take].tolist())
        if min_per_class > 0:
            present = pat_has[list(chosen)].sum(axis=0)
            for c in np.flatnonzero(present < min_per_class):
                holders = order[pat_has[order, c]]  # patients with class c, in the seed's order
                chosen.update(holders[:min_per_class].tolist())
        keep = np.isin(patient_of, np.fromiter(chosen, dtype=np.int64))
        out[float(f)] = np.sort(indices[keep])
    return out


def fraction_subset(indices: Sequence[int], labels: np.ndarray, patient_ids: Sequence[object] | None,
                    fraction: float, seed: int, min_per_class: int = 1) -> np.ndarray:
    """One subset of :func:`fraction_subsets` (identical to the one computed together with other fractions)."""
    return fraction_subsets(indices, labels, patient_ids, [fraction], seed, min_per_class)[float(fraction)]
