"""Train / validation / test splits that never put one patient on two sides.

* :func:`fold_split`: published folds (PTB-XL ``strat_fold``: 1-8 train, 9 validation, 10 test, as in
  Strodthoff et al. 2020; the folds are patient-disjoint by construction).
* :func:`patient_stratified_split`: for corpora without folds: groups the records by patient and stratifies the
  label distribution across the sides (multi-label iterative stratification at patient level).
* :func:`assert_disjoint_patients`: the check every split goes through.

Records whose patient is unknown (None, NaN, empty, ``-1``) form a group of their own.
All functions return ``{"train": idx, "val": idx, "test": idx}`` with sorted int64 record indices.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def is_unknown_patient(p: Any) -> bool:
    """True for the markers of an unknown patient: None, NaN, pandas' NA, ``-1`` (int or float) and the strings
    ``""``, ``"nan"``, ``"none"``, ``"null"``, ``"<NA>"``, ``"-1"``, ``"-1.0"`` (any case; a CSV column or a cache
    index may carry any of them)."""
    if p is None:
        return True
    if isinstance(p, (float, np.floating)) and math.isnan(p):
        return True
    if isinstance(p, (int, np.integer)) and int(p) == -1:
        return True
    if isinstance(p, (float, np.floating)) and float(p) == -1.0:   # pandas reads an int column with gaps as float
        return True
    return str(p).strip().lower() in ("", "nan", "none", "null", "<na>", "-1", "-1.0")


def patient_groups(patient_ids: Sequence[Any]) -> np.ndarray:
    """Group id per record: equal for records of the same known patient, unique for unknown patients.

    Returns:
        ``(N,)`` int64 group ids in ``[0, n_groups)``.
    """
    ids = list(patient_ids)
    table: dict[str, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for i, p in enumerate(ids):
        key = f"u{i}" if is_unknown_patient(p) else f"p{p}"
        out[i] = table.setdefault(key, len(table))
    return out


def fold_split(folds: Sequence[Any], train: Iterable[int] = range(1, 9), val: Iterable[int] = (9,),
               test: Iterable[int] = (10,)) -> dict[str, np.ndarray]:
    """Split by published fold numbers.

    Args:
        folds: ``(N,)`` fold of each record (NaN / None: the record is in no split).
        train, val, test: fold numbers of each side (must not overlap).

    Returns:
        ``{"train", "val", "test"}`` -> sorted int64 indices.

    Raises:
        ValueError: overlapping fold sets.
    """
    sets = {"train": {int(f) for f in train}, "val": {int(f) for f in val}, "test": {int(f) for f in test}}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = sets[a] & sets[b]
        if common:
            raise ValueError(f"fold_split: folds {sorted(common)} are in both {a} and {b}")
    values = np.array([np.nan if is_unknown_patient(f) else _fold_number(i, f) for i, f in enumerate(folds)],
                      dtype=np.float64)
    return {name: np.flatnonzero(np.isin(values, sorted(s))).astype(np.int64) for name, s in sets.items()}


def _fold_number(index: int, fold: Any) -> float:
    """A fold value as a number, or a ``ValueError`` naming the record's position and the value."""
    try:
        return float(fold)
    except (TypeError, ValueError):
        raise ValueError(f"fold_split: the fold of record {index} is {fold!r}, not a fold number; a split column of "
                         f"names (train / val / test) is read with split.kind: column") from None


def _label_matrix(labels: Any, n: int) -> np.ndarray:
    """``(N, C)`` multi-hot from ``(N, C)`` or single labels ``(N,)`` (negative / None: no label)."""
    arr = np.asarray(labels, dtype=object if not isinstance(labels, np.ndarray) else None)
    if arr.ndim == 2:
        if arr.shape[0] != n:
            raise ValueError(f"labels have {arr.shape[0]} rows for {n} records")
        return (np.asarray(arr, dtype=np.float64) > 0).astype(np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be (N,) or (N, C) with N={n}, got shape {arr.shape}")
    keys = [None if is_unknown_patient(v) or (isinstance(v, (int, np.integer)) and v < 0) else str(v) for v in arr]
    classes = sorted({k for k in keys if k is not None})
    col = {c: j for j, c in enumerate(classes)}
    out = np.zeros((n, len(classes)), dtype=np.float64)
    for i, k in enumerate(keys):
        if k is not None:
            out[i, col[k]] = 1.0
    return out


def patient_stratified_split(patient_ids: Sequence[Any], labels: Any = None,
                             fractions: Sequence[float] | Mapping[str, float] = (0.8, 0.1, 0.1),
                             seed: int = 0) -> dict[str, np.ndarray]:
    """Patient-disjoint split whose sides have about the same label distribution.

    Algorithm: iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML-PKDD 2011) applied to patient
    groups: a group carries the summed label counts of its records; labels are handled rarest first and each
    group having the current label goes (largest groups first) to the side that still needs most of that label
    (ties: the side needing most records, then random by ``seed``). Groups without labels then fill the sides
    by remaining size. Hand-written because scikit-learn's ``StratifiedGroupKFold`` handles one label per
    record only and gives folds rather than arbitrary fractions, and no multi-label group stratifier is among
    the project's dependencies.

    Args:
        patient_ids: ``(N,)`` patient of each record (unknown: None / NaN / "" / -1, each its own group).
        labels: ``(N, C)`` multi-hot, ``(N,)`` class labels, or None (group split by size only).
        fractions: sizes of ``(train, val, test)`` (or ``(train, test)``, or a name -> fraction mapping);
            they are normalised to sum to 1; a zero fraction gives an empty side.
        seed: tie-breaking seed (the result is a pure function of the inputs and seed).

    Returns:
        name -> sorted int64 record indices; every record is in exactly one side.
    """
    if isinstance(fractions, Mapping):
        names, fr = list(fractions), np.array([float(v) for v in fractions.values()])
    else:
        fr = np.array([float(v) for v in fractions])
        if len(fr) == 3:
            names = list(SPLIT_NAMES)
        elif len(fr) == 2:
            names = ["train", "test"]
        else:
            raise ValueError(f"fractions must have 2 or 3 entries (train, [val,] test), got {list(fractions)}")
    if (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fr.tolist()}")
    fr = fr / fr.sum()
    n = len(patient_ids)
    groups = patient_groups(patient_ids)
    n_groups = int(groups.max()) + 1 if n else 0
    y = _label_matrix(labels, n) if labels is not None else np.zeros((n, 0))
    g_labels = np.zeros((n_groups, y.shape[1]))
    np.add.at(g_labels, groups, y)
    g_size = np.bincount(groups, minlength=n_groups).astype(np.float64)

    rng = np.random.default_rng(seed)
    open_sides = fr > 0
    need_label = fr[:, None] * g_labels.sum(axis=0)[None, :]      # (S, C) still wanted per side and label
    need_size = fr * n                                            # (S,) still wanted records per side
    side_of = np.full(n_groups, -1, dtype=np.int64)
    order = rng.permutation(n_groups)                             # random tie-break order of groups
    rank = np.empty(n_groups, dtype=np.int64)
    rank[order] = np.arange(n_groups)

    def best_side(scores: list[np.ndarray]) -> int:
        cand = np.flatnonzero(open_sides)
        for s in scores:
            vals = s[cand]
            cand = cand[vals == vals.max()]
            if len(cand) == 1:
                return int(cand[0])
        return int(rng.choice(cand))

    remaining = g_labels > 0
    while True:
        unassigned = side_of < 0
        counts = (g_labels * unassigned[:, None]).sum(axis=0)
        live = np.flatnonzero(counts > 0)
        if len(live) == 0:
            break
        c = live[np.argmin(counts[live])]                         # rarest remaining label
        members = np.flatnonzero(unassigned & remaining[:, c])
        members = members[np.lexsort((rank[members], -g_size[members]))]   # big groups first, then random
        for g in members:
            s = best_side([need_label[:, c], need_size])
            side_of[g] = s
            need_label[s] -= g_labels[g]
            need_size[s] -= g_size[g]
    for g in np.flatnonzero(side_of < 0)[np.lexsort((rank[side_of < 0], -g_size[side_of < 0]))]:
        s = best_side([need_size])
        side_of[g] = s
        need_size[s] -= g_size[g]
    rec_side = side_of[groups] if n else np.zeros(0, dtype=np.int64)
    out = {name: np.flatnonzero(rec_side == k).astype(np.int64) for k, name in enumerate(names)}
    assert_disjoint_patients(out, patient_ids)
    return out


def assert_disjoint_patients(splits: Mapping[str, Sequence[int]], patient_ids: Sequence[Any]) -> None:
    """Raise ``ValueError`` if a record or a (known) patient appears in two sides of ``splits``.

    Args:
        splits: name -> record indices.
        patient_ids: ``(N,)`` patient of each record (unknown patients never conflict).
    """
    pids = list(patient_ids)
    owner_rec: dict[int, str] = {}
    owner_pat: dict[str, str] = {}
    for name, idx in splits.items():
        for i in np.asarray(idx, dtype=np.int64).ravel():
            i = int(i)
            if not 0 <= i < len(pids):
                raise ValueError(f"split {name!r}: index {i} out of range for {len(pids)} records")
            if i in owner_rec and owner_rec[i] != name:
                raise ValueError(f"record {i} is in both {owner_rec[i]!r} and {name!r}")
            owner_rec[i] = name
            p = pids[i]
            if is_unknown_patient(p):
                continue
            key = str(p)
            if owner_pat.setdefault(key, name) != name:
                raise ValueError(f"patient {key!r} is in both {owner_pat[key]!r} and {name!r} "
                                 f"(e.g. record {i}): the split leaks patients")


def check_single_label(labels: np.ndarray, rows: Sequence[int] | np.ndarray | None = None,
                       where: str = "labels") -> np.ndarray:
    """Refuse single-label indicator rows that are not one-hot; return their class indices.

    Args:
        labels: ``(N, C)`` indicators.
        rows: the rows used (e.g. a split's cache rows; None: every row). Rows outside are not checked.
        where: how the rows are named in the error (e.g. ``"split 'train'"``).

    Returns:
        ``(len(rows),)`` int64 class index of each row used (its one positive).

    Raises:
        ValueError: ``labels`` is not 2-D, or a row used has no positive or several (naming how many rows and the
            first of them, with their positive counts).
    """
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"{where}: single-label indicator rows must be (n, C), got shape {y.shape}")
    idx = np.arange(len(y)) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    sub = y[idx]
    n_pos = (sub != 0).sum(axis=1)
    bad = np.flatnonzero(n_pos != 1)
    if bad.size:
        first = ", ".join(f"row {int(idx[b])} ({int(n_pos[b])} positives)" for b in bad[:5])
        raise ValueError(f"{where}: a single-label task (multilabel=False) needs exactly one positive per record, "
                         f"but {bad.size} of its {len(idx)} rows have none or several (e.g. {first}); an argmax would "
                         f"silently take the first positive or class 0. Use multilabel=True for multi-label data, "
                         f"or leave unlabelled / multi-class records out of the splits")
    return sub.argmax(axis=1).astype(np.int64)
