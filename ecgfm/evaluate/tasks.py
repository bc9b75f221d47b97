"""Downstream tasks as configs: a task turns a prepared corpus cache into labels, class names and splits.

A task is a YAML file in ``conf/task/`` (a new task needs no code)::

    name: ptbxl_super                 # results are filed under this name
    dataset: ptbxl                    # readable cache name (the cache folder is <cache_root>/<dataset>-<key>)
    sources:                          # RecordSource _target_ configs, instantiated only to prepare the cache
      - {_target_: ecgfm.data.readers.PTBXLSource, root: ${paths.data_root}/ptbxl, fs: 100,
         include_unlabelled: false}
    labels: ptbxl:superdiagnostic     # "record" (record.labels) or "ptbxl:<PTBXL task>" (from meta.scp_codes)
    label_root: ${paths.data_root}/ptbxl   # where scp_statements.csv lives (ptbxl:* labels only)
    classes: null                     # fixed class list, or null: every label with >= min_count records
    min_count: 1
    multilabel: true                  # false: exactly one class per record, softmax
    split: {kind: folds, key: strat_fold, train: [1, 2, 3, 4, 5, 6, 7, 8], val: [9], test: [10]}
    crop_seconds: 2.5                 # training crop / probe window
    stride_seconds: 1.25              # test-time sliding-window hop

Split kinds: ``folds`` (published folds in ``meta[key]``, :func:`ecgfm.data.splits.fold_split`),
``stratified`` (``fractions: [train, val, test]``, ``seed``; patient-level iterative stratification,
:func:`ecgfm.data.splits.patient_stratified_split`; records without a patient id are their own patient),
``column`` (a per-record split name in ``meta[key]``: train / val / test, or training / valid / validation / dev /
testing; any other value is refused, a labelled record without one is in no split and counted in the notes) and
``all`` (every labelled record is test data: external validation sets). Every split is checked for a patient on
two sides (:func:`ecgfm.data.splits.assert_disjoint_patients`), the published folds and split columns too.

A class without a positive record in the train split leaves the task (a note says so; the class space is
otherwise counted over the whole cache). Records without any label of the class space are left out of every split
(as in the PTB-XL benchmark), except in
a multi-label ``labels: record`` task the records whose labels are known (``meta["labels_known"]``, set by
:class:`~ecgfm.data.readers.FolderSource` for a labels-CSV row): those are negatives, kept as all-zero rows. A
one-class task whose train or test split lacks positives or negatives is refused. The cache
is prepared on first use with :func:`ecgfm.data.prepare.prepare_cache` and the *encoder's* preprocessing, so the
downstream signal matches pretraining unless the caller overrides it.

External validation sets (``conf/eval_data/``) are built with :func:`build_external` against the trained task: the
task's classes, the task's own records excluded, and for a PTB-XL task on SNOMED CT-labelled records
(``eval_data=cinc2021`` / ``cpsc2018``) the codes translated through :mod:`ecgfm.data.labelmaps`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ecgfm.conf import config_dir
from ecgfm.config import ConfigError
from ecgfm.data.preprocess import PreprocessSpec

SPLIT_KINDS = ("folds", "stratified", "column", "all")
#: the settings each split kind reads besides ``kind`` (:func:`build_task`); any other key is refused, so a typo
#: (``split.fraction``) cannot silently leave the default in place
SPLIT_KEYS = {"folds": ("key", "train", "val", "test"), "stratified": ("fractions", "seed"), "column": ("key",),
              "all": ()}


class TaskError(ValueError):
    """A task or an external set that cannot be built from its config and data (no class, no record with a label,
    a bad split column, an unknown task...): the message names the task and what to change. A ``ValueError``, so
    callers catching that keep working; ``probe.py`` / ``finetune.py`` print it as one ``error:`` line."""


@dataclass
class TaskSpec:
    """A downstream task (see the module docstring for every field)."""

    name: str
    dataset: str
    sources: list[Any]
    labels: str = "record"
    label_root: str | None = None
    classes: list[str] | None = None
    min_count: int = 1
    multilabel: bool = True
    split: dict[str, Any] = field(default_factory=lambda: {"kind": "stratified"})
    crop_seconds: float = 2.5
    stride_seconds: float = 1.25
    description: str = ""
    root: str | None = None  # bring-your-own folders: sources refer to it by interpolation (${task.root})
    params: dict[str, Any] = field(default_factory=dict)  # free knobs the sources interpolate (n_records...)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, key: str = "task") -> "TaskSpec":
        """Build from a (resolved) mapping, e.g. ``cfg.task`` of ``conf/probe.yaml``; clear errors for typos.

        Args:
            cfg: the task mapping.
            key: the config node it comes from, named in errors (``task``, or ``eval_data`` for an external set).

        Raises:
            ConfigError: an unknown key (the split's included: each kind's settings are :data:`SPLIT_KEYS`), a
                missing one or a bad value.
        """
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        data = dict(cfg)
        data.pop("_target_", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(key, f"unknown key(s) {unknown}; known: {sorted(known)}")
        for name in ("name", "dataset", "sources"):
            if not data.get(name):
                raise ConfigError(f"{key}.{name}", "is required")
        spec = cls(**data)
        if not isinstance(spec.split, Mapping):
            raise ConfigError(f"{key}.split", f"task {spec.name}: must be a mapping with a kind ({SPLIT_KINDS}), got "
                                              f"{spec.split!r}")
        kind = spec.split.get("kind")
        if kind not in SPLIT_KINDS:
            raise ConfigError(f"{key}.split.kind", f"task {spec.name}: must be one of {SPLIT_KINDS}, got {kind!r}")
        allowed = SPLIT_KEYS[kind]
        for name in spec.split:
            if name != "kind" and name not in allowed:
                import difflib

                close = difflib.get_close_matches(str(name), list(allowed), n=1, cutoff=0.6)
                raise ConfigError(f"{key}.split.{name}",
                                  f"task {spec.name}: a {kind!r} split does not read it"
                                  f"{f'; did you mean {close[0]!r}?' if close else ''} (its settings: "
                                  f"{', '.join(('kind', *allowed))}), so it would silently do nothing")
        fractions = spec.split.get("fractions")
        if isinstance(fractions, Mapping):   # names of the sides: only train / val / test are used as splits
            named: dict[str, Any] = {}
            for side, value in fractions.items():
                part = SPLIT_NAMES.get(str(side).strip().lower(), str(side).strip().lower())
                if part not in SPLIT_PARTS or part in named:
                    raise ConfigError(f"{key}.split.fractions.{side}",
                                      f"task {spec.name}: a side named {side!r} "
                                      + ("twice" if part in named else "is none of train / val / test")
                                      + f" (also accepted: {', '.join(sorted(SPLIT_NAMES))}); its records would be "
                                        f"in no split")
                named[part] = value
            spec.split = {**spec.split, "fractions": named}
        if spec.classes is not None and spec.min_count != 1:   # min_count filters a class space read from the data
            raise ConfigError(f"{key}.min_count", f"task {spec.name}: min_count={spec.min_count} beside a fixed "
                                                  f"classes list would do nothing; drop classes from the list "
                                                  f"instead, or set classes: null")
        if not (spec.labels == "record" or spec.labels.startswith("ptbxl:")):
            raise ConfigError(f"{key}.labels", f"task {spec.name}: must be 'record' or 'ptbxl:<task>', got "
                                               f"{spec.labels!r}")
        for name in ("crop_seconds", "stride_seconds"):   # a stride <= 0 was clamped to one sample without a word
            value = getattr(spec, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ConfigError(f"{key}.{name}", f"task {spec.name}: {name} must be a positive number of seconds, "
                                                   f"got {value!r}")
        return spec


@dataclass
class TaskData:
    """A task bound to its prepared cache.

    Attributes:
        spec: the task.
        cache_dir: the corpus cache folder.
        cache: the opened :class:`~ecgfm.data.cache.CorpusCache`.
        labels: ``(N, C)`` float32 indicators for every cache row (zero rows for records outside the splits).
        class_names: the ``C`` classes.
        multilabel: multi-label task.
        splits: ``{"train", "val", "test"}`` -> sorted cache rows.
        patient_ids: ``(N,)`` object array (None where unknown: the record is its own patient).
        crop_samples: training crop / probe window in samples.
        stride_samples: test-time sliding-window hop in samples.
        notes: facts worth printing with the results (dropped classes, patient-id caveats...).
        label_report: for an external set whose SNOMED CT codes were translated into the task's classes
            (:func:`build_external`), :meth:`ecgfm.data.labelmaps.SnomedTaskMap.report`; else None.
    """

    spec: TaskSpec
    cache_dir: str
    cache: Any
    labels: np.ndarray
    class_names: list[str]
    multilabel: bool
    splits: dict[str, np.ndarray]
    patient_ids: np.ndarray
    crop_samples: int
    stride_samples: int
    notes: list[str] = field(default_factory=list)
    label_report: dict[str, Any] | None = None  # external sets with translated labels: the mapping report

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dataset(self) -> str:
        return self.spec.dataset

    def record_keys(self, rows: Sequence[int]) -> list[str]:
        keys = self.cache.keys
        return [keys[int(i)] for i in rows]


def _label_fn(spec: TaskSpec, mapper: Any = None):
    """``(labels tuple, meta dict) -> list of class names`` for the task's label kind (through ``mapper``, a
    :class:`~ecgfm.data.labelmaps.SnomedTaskMap`, when the records' SNOMED codes are translated)."""
    if mapper is not None:
        return lambda labels, meta: mapper.labels(record_codes(labels, meta))
    if spec.labels == "record":
        return lambda labels, meta: [str(x) for x in labels]
    from ecgfm.data.readers import load_scp_statements, ptbxl_task_map

    task = spec.labels.split(":", 1)[1]
    if spec.label_root is None:
        raise TaskError(f"task {spec.name}: labels {spec.labels!r} need label_root (the PTB-XL folder holding "
                         f"scp_statements.csv)")
    from ecgfm.data.readers import ptbxl_task_labels

    mapping = ptbxl_task_map(load_scp_statements(spec.label_root), task)
    return lambda labels, meta: ptbxl_task_labels((meta or {}).get("scp_codes") or {}, task, mapping)


def prepare_task_cache(spec: TaskSpec, cache_root: str, preprocess: PreprocessSpec, workers: int = 0,
                       progress: bool = False) -> str:
    """The task's corpus cache folder, prepared on first use (shared with pretraining when the source configs
    and the preprocessing are the same)."""
    from ecgfm.data.prepare import prepare_cache

    return prepare_cache(list(spec.sources), cache_root, preprocess, name=spec.dataset, workers=workers,
                         progress=progress)


def build_task(spec: TaskSpec, cache_root: str, preprocess: PreprocessSpec, classes: Sequence[str] | None = None,
               workers: int = 0, progress: bool = False, mapper: Any = None) -> TaskData:
    """Prepare (or open) the cache and derive labels, classes and splits.

    Args:
        spec: the task.
        cache_root: folder of corpus caches.
        preprocess: preprocessing of the cache (normally the encoder's).
        classes: impose this class list (external validation: the training task's classes).
        workers: cache preparation worker processes.
        progress: show a progress bar while preparing.
        mapper: a :class:`~ecgfm.data.labelmaps.SnomedTaskMap` translating the records' SNOMED CT codes into
            ``classes`` (external validation across vocabularies, :func:`build_external`, which also leaves out the
            records with an unknown label); needs ``classes``.

    Raises:
        ValueError: no labelled record, a single-label task with multi-label records, bad split settings, a
            one-class task whose train or test split holds only positives or only negatives.
    """
    from ecgfm.data.cache import CorpusCache
    from ecgfm.data.readers.folder import LABELS_KNOWN
    from ecgfm.data.splits import (assert_disjoint_patients, fold_split, is_unknown_patient,
                                    patient_stratified_split)

    cache_dir = prepare_task_cache(spec, cache_root, preprocess, workers=workers, progress=progress)
    cache = CorpusCache(cache_dir)
    index = cache.index
    notes: list[str] = []
    if mapper is not None and classes is None:
        raise TaskError(f"task {spec.name}: translating SNOMED CT codes needs the training task's classes")
    label_fn = _label_fn(spec, mapper)
    if classes is not None:
        class_names = [str(c) for c in classes]
        if spec.classes is not None and list(map(str, spec.classes)) != class_names:
            raise TaskError(f"task {spec.name}: its classes {list(spec.classes)} differ from the imposed label "
                             f"space {class_names}")
    elif spec.classes is not None:
        class_names = [str(c) for c in spec.classes]
    else:
        space = cache.label_space(label_fn)
        y_all = cache.labels_matrix(space, label_fn)
        counts = y_all.sum(axis=0)
        class_names = [c for c, n in zip(space, counts) if n >= spec.min_count]
        dropped = [c for c, n in zip(space, counts) if n < spec.min_count]
        if dropped:
            notes.append(f"classes with fewer than {spec.min_count} records dropped: {dropped}")
    if not class_names:
        raise TaskError(f"task {spec.name}: no class found in the cache {cache_dir}")
    if mapper is not None:  # the codes may come from a labels table keyed by record (CPSC 2018 REFERENCE.csv)
        codes = external_codes(spec, cache)
        col = {c: j for j, c in enumerate(class_names)}
        y = np.zeros((len(codes), len(class_names)), dtype=np.float32)
        for i, rec in enumerate(codes):
            for c in mapper.labels(rec):
                if c in col:
                    y[i, col[c]] = 1.0
    else:
        y = cache.labels_matrix(class_names, label_fn).astype(np.float32)
    # with a mapper, records whose label of an evaluable class is unknown (SnomedTaskMap.uncertain) are left out by
    # build_external, once the records that are not external are excluded: the evaluable classes depend on them
    labelled = y.sum(axis=1) > 0
    any_positive = bool(labelled.any())
    if spec.multilabel and mapper is None and spec.labels == "record" and any_positive:
        # a record whose flags are known (FolderSource: a labels-CSV row of 0/1 flag columns) but that has none of
        # the task's classes is a negative for them (also with flags outside them, rbbb=1 for a task of af): kept as
        # an all-zero row, not unlabelled. Labels given as names are not known this way ("Normal" says nothing of
        # NORM): such a record stays out of every split
        known = np.array([isinstance(m, dict) and m.get(LABELS_KNOWN) is True for m in index["meta"]], dtype=bool)
        negatives = known & ~labelled
        if negatives.any():
            notes.append(f"{int(negatives.sum())} record(s) whose flags are known but none of {class_names} are "
                         f"negatives for every class")
        labelled |= negatives
    if not any_positive:
        why = ""
        if mapper is not None:
            from ecgfm.data.labelmaps import summary_lines

            why = "\n" + "\n".join(summary_lines(mapper.report(dict(zip(cache.keys, codes)))))
        raise TaskError(f"task {spec.name}: no record of {cache_dir} has a label among {class_names}{why}")
    if not spec.multilabel:
        multi = np.flatnonzero(y.sum(axis=1) > 1)
        if len(multi):
            raise TaskError(f"task {spec.name} is single-label but {len(multi)} record(s) carry several classes "
                             f"(e.g. {cache.keys[int(multi[0])]}); set multilabel: true")
    n_unlabelled = int((~labelled).sum())
    if n_unlabelled:
        notes.append(f"{n_unlabelled} record(s) without a label of the class space are in no split")

    pids = np.array([None if is_unknown_patient(p) else str(p) for p in index["patient_id"]], dtype=object)
    if all(p is None for p in pids[labelled]):
        notes.append(f"{spec.dataset} gives no patient ids: each record is treated as its own patient")

    kind = spec.split.get("kind")
    rows = np.flatnonzero(labelled)
    if kind == "folds":
        key = spec.split.get("key", "strat_fold")
        folds = [(m or {}).get(key) for m in index["meta"]]
        known = np.array([not is_unknown_patient(f) for f in folds], dtype=bool)
        if not (known & labelled).any():
            seen = sorted({str(k) for m in index["meta"] if isinstance(m, Mapping) for k in m})
            raise TaskError(f"task {spec.name}: split.key {key!r} (folds split) is in the metadata of no labelled "
                             f"record of {cache_dir}; the records' metadata keys: {seen[:20]}")
        for i in np.flatnonzero(known & labelled):
            try:
                float(folds[i])
            except (TypeError, ValueError):
                raise TaskError(f"task {spec.name}: record {cache.keys[int(i)]} of {cache_dir} has {key} "
                                f"{folds[i]!r}, not a fold number (split.kind: folds); a split column of names "
                                f"(train / val / test) is read with split.kind: column") from None
        sp = fold_split([folds[i] if labelled[i] else None for i in range(len(folds))],
                        train=spec.split.get("train", range(1, 9)), val=spec.split.get("val", (9,)),
                        test=spec.split.get("test", (10,)))
        placed = np.zeros(len(folds), dtype=bool)
        placed[np.concatenate(list(sp.values()))] = True
        unplaced = labelled & ~placed
        if unplaced.any():
            left = sorted({str(folds[i]) for i in np.flatnonzero(unplaced & known)})
            notes.append(f"{int(unplaced.sum())} labelled record(s) are in no split: "
                         f"{int((unplaced & ~known).sum())} without a {key!r} value, "
                         f"{int((unplaced & known).sum())} in {key} {left[:10]} of none of train / val / test")
    elif kind == "stratified":
        fr = spec.split.get("fractions", [0.7, 0.15, 0.15])
        target = y[rows] if spec.multilabel else y[rows].argmax(axis=1)
        local = patient_stratified_split(list(pids[rows]), target, fractions=fr,
                                         seed=int(spec.split.get("seed", 0)))
        sp = {k: rows[v] for k, v in local.items()}
    elif kind == "column":
        key = spec.split.get("key", "split")
        names = np.array([SPLIT_NAMES.get(v, v) for v in
                          (str((m or {}).get(key, "") or "").strip().lower() for m in index["meta"])])
        odd = sorted({str(v) for v in names[labelled] if v not in ("train", "val", "test", "", "none", "nan")})
        if odd:
            raise TaskError(f"task {spec.name}: split column {key!r} holds {odd[:5]} beside train / val / test "
                             f"(also accepted: {', '.join(sorted(SPLIT_NAMES))}); those labelled records would be "
                             f"in no split")
        missing = int((labelled & ~np.isin(names, ("train", "val", "test"))).sum())
        if missing:
            notes.append(f"{missing} labelled record(s) have no value in split column {key!r}: in no split")
        sp = {k: np.flatnonzero((names == k) & labelled) for k in ("train", "val", "test")}
    else:  # all
        sp = {"train": np.zeros(0, np.int64), "val": np.zeros(0, np.int64), "test": rows}
    splits = {k: np.sort(np.asarray(sp.get(k, []), dtype=np.int64)) for k in ("train", "val", "test")}
    try:   # every kind: published folds or a split column can put one patient on two sides too
        assert_disjoint_patients(splits, pids)
    except ValueError as exc:
        raise TaskError(f"task {spec.name} ({kind} split of {cache_dir}): {exc}") from None
    if classes is None and len(splits["train"]):
        known = np.array([isinstance(m, dict) and m.get(LABELS_KNOWN) is True for m in index["meta"]], dtype=bool)
        y, class_names, splits = _drop_untrainable_classes(spec, y, class_names, splits, notes, known)
    _check_split_classes(spec, y, splits, class_names, notes, cache_dir,
                         has_known=any(isinstance(m, dict) and LABELS_KNOWN in m for m in index["meta"]))
    fs = float(cache.fs or preprocess.fs or 100.0)
    return TaskData(spec=spec, cache_dir=str(cache_dir), cache=cache, labels=y, class_names=class_names,
                    multilabel=bool(spec.multilabel), splits=splits, patient_ids=pids,
                    crop_samples=int(round(spec.crop_seconds * fs)),
                    stride_samples=max(1, int(round(spec.stride_seconds * fs))), notes=notes)


def _drop_untrainable_classes(spec: TaskSpec, y: np.ndarray, class_names: list[str],
                              splits: dict[str, np.ndarray], notes: list[str], known: np.ndarray | None = None
                              ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Leave out the classes without a positive record in the train split (the class space is otherwise counted over
    the whole cache, test records included).

    A head never shown a positive cannot learn the class: a probe scores it at chance (0.5) and a fine-tune with a
    random head at seed-dependent noise (0.28 / 0.81 in two seeds of PTB-XL rhythm's AFLT on the shared subset), and
    either joined the macro AUROC. The column goes, records keep their other labels, and a record with none left
    leaves every split (as a record whose classes ``min_count`` dropped is in no split, and as the PTB-XL benchmark
    has no record without a label of its space; a record that had no label before stays). Except a record whose
    flags are known (``known``: a folder task's labels-CSV row, :data:`~ecgfm.data.readers.folder.LABELS_KNOWN`):
    with none of the classes left it is a negative for every class, as :func:`build_task` keeps such records. A
    note names the classes and counts the records that left.

    Returns:
        ``(labels, class_names, splits)`` without those classes (unchanged when every class has one).
    """
    trained = y[splits["train"]].sum(axis=0) > 0
    if trained.all():
        return y, class_names, splits
    gone = [c for c, t in zip(class_names, trained) if not t]
    keep = np.flatnonzero(trained)
    if not len(keep):
        raise TaskError(f"task {spec.name}: no class has a positive record in the train split")
    notes.append(f"class(es) {gone} have no positive record in the train split: left out of the task (a head "
                 f"cannot learn them; scored, they would put chance-level or seed-dependent AUROCs in the macro "
                 f"average)")
    had = y.sum(axis=1) > 0
    y = np.ascontiguousarray(y[:, keep])
    orphan = had & (y.sum(axis=1) == 0)
    if known is not None:   # known flags: a negative for every class left, not an unlabelled record
        orphan &= ~np.asarray(known, dtype=bool)
    left = {k: int(orphan[v].sum()) for k, v in splits.items() if orphan[v].any()}
    if left:
        notes.append(f"record(s) labelled only with those class(es) are in no split: "
                     f"{', '.join(f'{n} {k}' for k, n in left.items())}")
        splits = {k: v[~orphan[v]] for k, v in splits.items()}
    return y, [class_names[i] for i in keep], splits


def _check_split_classes(spec: TaskSpec, y: np.ndarray, splits: Mapping[str, np.ndarray], class_names: Sequence[str],
                         notes: list[str], cache_dir: Any, has_known: bool = True) -> None:
    """Refuse a one-class task whose train or test split lacks positives or negatives; note other such gaps.

    A task of one class (e.g. one 0/1 flag column) with only positives (or only negatives) in its train or test
    split can be neither trained nor scored (AUROC is undefined): a ValueError says so. In a task of several classes,
    a class without positives or negatives in a split is listed in ``notes`` (the metrics leave it out of the macro
    averages).

    Raises:
        ValueError: a one-class task whose non-empty train or test split holds a single outcome.
    """
    for part in ("train", "val", "test"):
        rows = splits[part]
        if not len(rows):
            continue
        pos = y[rows].sum(axis=0)
        neg = len(rows) - pos
        if len(class_names) == 1:
            if pos[0] and neg[0]:
                continue
            what = (f"task {spec.name}: its only class {class_names[0]!r} has {int(pos[0])} positive and "
                    f"{int(neg[0])} negative record(s) in the {part} split")
            if part == "val":
                notes.append(f"{what} (validation metrics undefined)")
                continue
            if not spec.multilabel:
                hint = (" A single-label (softmax) task needs at least two classes; for one 0/1 flag column use "
                        "multilabel: true (rows of 0 are the negatives).")
            elif not neg[0]:
                hint = (" A one-class task needs negatives: records whose labels are known but carry no class (a "
                        "labels-CSV row with 0 in the flag column); records without a row are unlabelled.")
                if not has_known:
                    hint += (f" No record of the cache says whether its labels are known: if it was prepared before "
                             f"negatives were recorded, delete {cache_dir} to prepare it again.")
            else:
                hint = " Too few positives for the split: add positives or change the split."
            raise TaskError(f"{what}: it can be neither trained nor scored.{hint}")
        for outcome, n in (("positive", pos), ("negative", neg)):
            missing = [c for c, k in zip(class_names, n) if k == 0]
            if missing:
                notes.append(f"{part} split: {len(missing)} class(es) without a {outcome} record: {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}")


#: other spellings of the split names in a ``column`` split
SPLIT_NAMES = {"training": "train", "valid": "val", "validation": "val", "dev": "val", "testing": "test"}


# ------------------------------------------------------------------ external validation across label vocabularies
#: CPSC 2018 REFERENCE.csv class numbers (1-9), in the order of :data:`ecgfm.data.labelmaps.CPSC2018_CLASSES`.
CPSC2018_NUMBERS = {str(i + 1): i for i in range(9)}


def label_map_task(spec: TaskSpec) -> str | None:
    """The PTB-XL task whose classes an external set's SNOMED CT codes are translated into, or None.

    Read from ``spec.params["label_map"]``: ``"ptbxl:<task>"`` (``conf/eval_data/cinc2021.yaml`` sets it to the
    training task's ``labels``), or ``"record"`` / null / absent (the records' own labels are the task's classes).

    Raises:
        ValueError: another value, or an unknown PTB-XL task.
    """
    value = (spec.params or {}).get("label_map")
    if value in (None, "", "record"):
        return None
    value = str(value)
    from ecgfm.data.readers import PTBXL_TASKS

    task = value.split(":", 1)[1] if value.startswith("ptbxl:") else None
    if task not in PTBXL_TASKS:
        raise TaskError(f"external set {spec.name}: params.label_map must be 'record' or 'ptbxl:<task>' with a task "
                         f"of {PTBXL_TASKS}, got {value!r} (only PTB-XL tasks have an SCP <-> SNOMED CT mapping)")
    return task


def record_codes(labels: Sequence[Any], meta: Mapping[str, Any] | None) -> list[str]:
    """A record's SNOMED CT codes as published (``meta["dx_raw"]`` of
    :class:`~ecgfm.data.readers.Challenge2021Source`, before the challenge's equivalent codes are merged), else its
    labels."""
    raw = meta.get("dx_raw") if isinstance(meta, Mapping) else None
    if raw is None or (isinstance(raw, float) and raw != raw):
        raw = labels
    return [str(c).strip() for c in list(raw) if str(c).strip()]


def _cpsc2018_codes(path: str) -> dict[str, list[str]]:
    """``{record id: SNOMED CT codes}`` from a CPSC 2018 ``REFERENCE.csv`` (``Recording,First_label,...``; classes
    as numbers 1-9 or names of :data:`~ecgfm.data.labelmaps.CPSC2018_CLASSES`), through the table's ``cpsc2018``
    column (the codes the challenge gave the CPSC records).

    The bytes are decoded as every label table's (:func:`~ecgfm.data.readers.tables.decode_table_bytes`): UTF-8,
    a UTF-8 or UTF-16 byte-order mark honoured and removed (so the first record keeps its id and labels, with or
    without a header row), an undecodable byte an error naming the file, the line and the encoding.

    Raises:
        ValueError: an empty table, an unknown class, a record listed twice (file and lines named);
            :class:`~ecgfm.data.record.ECGDataError` (a ValueError) for a missing, unreadable or undecodable file.
    """
    import csv
    import io
    from pathlib import Path

    from ecgfm.data.labelmaps import CPSC2018_CLASSES, load_scp_snomed
    from ecgfm.data.readers.tables import check_quotes_closed, decode_table_bytes
    from ecgfm.data.record import ECGDataError

    code_of = {r.cpsc2018: r.snomed_code for r in load_scp_snomed() if r.cpsc2018}
    out: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ECGDataError(path, "CPSC 2018 REFERENCE.csv not found") from None
    except OSError as exc:
        raise ECGDataError(path, f"cannot read the CPSC 2018 REFERENCE.csv: {exc}") from None
    try:
        text = decode_table_bytes(raw, path)
        check_quotes_closed(Path(path), text)   # as ecgfm.data.readers.tables: an unclosed quote is an error
        rows = list(csv.reader(io.StringIO(text, newline=""), skipinitialspace=True))
    except csv.Error as exc:
        raise ECGDataError(path, f"malformed CSV: {exc}") from None
    if not rows:
        raise TaskError(f"{path}: empty CPSC 2018 labels table")
    # the published file opens with a header row (Recording,First_label,...); a file without one starts with data
    first = 1 if rows[0] and not any(v.strip() in CPSC2018_NUMBERS or v.strip() in code_of for v in rows[0][1:]) \
        else 0
    for lineno, row in enumerate(rows[first:], start=first + 1):
        if not row or not row[0].strip():
            continue
        codes = []
        for value in (v.strip() for v in row[1:]):
            if not value:
                continue
            name = CPSC2018_CLASSES[CPSC2018_NUMBERS[value]] if value in CPSC2018_NUMBERS else value
            if name not in code_of:
                raise TaskError(f"{path} line {lineno}: CPSC 2018 class {value!r} is neither 1-9 nor one of "
                                 f"{list(CPSC2018_CLASSES)}")
            codes.append(code_of[name])
        rid = row[0].strip()
        if rid in line_of:
            raise TaskError(f"{path} line {lineno}: record {rid!r} is listed again (first at line {line_of[rid]}); "
                             f"a record has one row")
        line_of[rid] = lineno
        out[rid] = sorted(set(codes))
    return out


def external_codes(spec: TaskSpec, cache: Any) -> list[list[str]]:
    """Every cache row's SNOMED CT codes (row order): from ``params.cpsc2018_reference`` (a CPSC 2018 ``REFERENCE.csv``)
    when set, else :func:`record_codes`."""
    index = cache.index
    table = (spec.params or {}).get("cpsc2018_reference")
    if table:
        import logging

        by_id = _cpsc2018_codes(str(table))
        missing = [str(rid) for rid in index["record_id"] if str(rid) not in by_id]
        if missing:   # not "no mapped label": the table says nothing of them (a partial or another set's table)
            logging.getLogger(__name__).warning(
                "%s has no row for %d of the %d records (e.g. %s): their labels are unknown, so they are left out "
                "with the records without a mapped label; check that the table is the set's whole REFERENCE.csv",
                table, len(missing), len(index["record_id"]), ", ".join(missing[:5]))
        return [by_id.get(str(rid), []) for rid in index["record_id"]]
    return [record_codes(lab, meta) for lab, meta in zip(index["labels"], index["meta"])]


def build_external(spec: TaskSpec, task: TaskData, cache_root: str, preprocess: PreprocessSpec, workers: int = 0,
                   progress: bool = False) -> TaskData:
    """An external validation set for a trained task: the task's classes, every usable record in the test split.

    1. Labels: the records' own labels when they are the task's classes (``eval_data=folder``); or, with
       ``params.label_map: ptbxl:<task>`` (``eval_data=cinc2021`` / ``cpsc2018`` with a PTB-XL task), the records'
       SNOMED CT codes translated through :mod:`ecgfm.data.labelmaps`. Records no code maps into the class space
       are left out (their labels are unknown for this task, not negative), and so are records carrying a form code
       that suggests a superclass, or an ambiguous broader code that spans a class, they are not positive for
       (:meth:`~ecgfm.data.labelmaps.SnomedTaskMap.uncertain`, e.g. RBBB + ST depression for STTC), with the
       evaluable classes of the records left after steps 2-3 (:meth:`~ecgfm.data.labelmaps.SnomedTaskMap.select`);
       the mapping report of that same selection (classes with their codes and positives, classes no code reaches,
       codes unmapped / outside the task, excluded records) is stored in ``label_report`` and summarised in
       ``notes``.
    2. Records that are also records (or patients) of the task's own splits (train, val or test; e.g. a CinC 2021
       ``HR*`` record that is a PTB-XL record of the head's training folds) are removed and counted: a record the
       head was trained or selected on is no external evidence. Records are matched by the leakage guard's
       identities (:func:`~ecgfm.evaluate.leakage.cache_identities`: their files' real paths and contents too, so the
       task's own folder read under the external source name is found).
    3. With ``params.exclude_task_corpus`` (default true), records drawn from the task's own corpus but absent
       from its splits (``HR*`` = PTB-XL records outside the prepared PTB-XL cache) are removed too and counted:
       same hospital, devices and annotators, so not external either.

    Args:
        spec: the external set (``cfg.eval_data``).
        task: the trained task, built with :func:`build_task`.
        cache_root: folder of corpus caches.
        preprocess: preprocessing (normally the encoder's, the same as the task's).
        workers: cache preparation worker processes.
        progress: show a progress bar while preparing.

    Raises:
        ValueError: a CPSC 2018 set without a labels table (the shared copy carries none), a bad ``label_map`` (or
            one naming another PTB-XL task than the task's ``labels``), no usable record left.
    """
    import logging

    from ecgfm.evaluate.leakage import cache_identities

    log = logging.getLogger(__name__)
    params = dict(spec.params or {})
    if spec.dataset == "cpsc2018" and not params.get("cpsc2018_reference"):
        raise TaskError("eval_data=cpsc2018: the CPSC 2018 records carry no labels (the shared copy has no "
                         "REFERENCE.csv; see its PROVENANCE.md), so nothing can be scored. Give the official labels "
                         "table with eval_data.params.cpsc2018_reference=/path/to/REFERENCE.csv (Recording,First_label,"
                         "Second_label,Third_label; classes 1-9), or use eval_data=cinc2021")
    mapped_task = label_map_task(spec)
    task_labels = str(getattr(task.spec, "labels", "") or "")
    if mapped_task is not None and task_labels.startswith("ptbxl:") and task_labels != f"ptbxl:{mapped_task}":
        raise TaskError(f"external set {spec.name}: params.label_map is 'ptbxl:{mapped_task}' but the task "
                         f"{task.name} was trained on labels {task_labels!r}: the codes would be translated into "
                         f"another task's classes and matched to the head's by name; set "
                         f"eval_data.params.label_map={task_labels}")
    if params.get("cpsc2018_reference") and mapped_task is None:
        raise TaskError(f"external set {spec.name}: params.cpsc2018_reference holds CPSC 2018 classes; it needs "
                         f"params.label_map: ptbxl:<task> (a PTB-XL training task)")
    mapper = None
    if mapped_task is not None:
        from ecgfm.data.labelmaps import snomed_task_map

        root = params.get("label_root") or task.spec.label_root
        if not root:
            raise TaskError(f"external set {spec.name}: translating SNOMED CT codes into PTB-XL {mapped_task} "
                             f"classes needs the folder holding scp_statements.csv (params.label_root)")
        mapper = snomed_task_map(mapped_task, str(root), task.class_names)
    ext = build_task(spec, cache_root, preprocess, classes=task.class_names, workers=workers, progress=progress,
                     mapper=mapper)
    index = ext.cache.index
    keys = ext.cache.keys
    task_rows = np.concatenate([task.splits[k] for k in ("train", "val", "test")])
    task_ids = cache_identities(task.cache, task_rows)   # file paths and contents too: any source name
    task_spaces = {i.split("/", 1)[0] for i in task_ids if i.startswith("rec:")}
    exclude_corpus = bool(params.get("exclude_task_corpus", True))
    row_of = {k: i for i, k in enumerate(keys)}
    hit: set[int] = set()
    corpus: set[int] = set()
    for ident, carriers in cache_identities(ext.cache).items():
        space = ident.split("/", 1)[0]
        for key in carriers:
            row = row_of[key]
            if ident in task_ids:
                hit.add(row)
            elif (exclude_corpus and space in task_spaces
                  and space != f"rec:{index['source'].iat[row]}"):
                corpus.add(row)
    overlap = sorted(hit)
    same_corpus = sorted(corpus - hit)
    reasons = {f"also a record or patient of {task.name}'s train/val/test splits": overlap,
               f"drawn from {task.dataset}'s own corpus (not external; params.exclude_task_corpus)": same_corpus}
    drop = np.asarray(sorted(set(overlap) | set(same_corpus)), dtype=np.int64)
    test = ext.splits["test"]
    kept = np.setdiff1d(test, drop)
    for why, rows in reasons.items():
        n_in = int(np.isin(rows, test).sum()) if rows else 0
        if rows:
            ext.notes.append(f"{len(rows)} record(s) excluded ({n_in} labelled): {why}, e.g. "
                             f"{', '.join(keys[i] for i in rows[:3])}")
    if mapper is not None:  # evaluable classes and unknown labels decided on the records left: one selection for
        from ecgfm.data.labelmaps import summary_lines   # the scored records and their report

        codes = dict(zip(keys, external_codes(spec, ext.cache)))
        excluded = {k: [keys[i] for i in v] for k, v in reasons.items()}
        selection = mapper.select(codes, excluded)
        kept = kept[np.isin(kept, [row_of[k] for k in selection.evaluated])]
        ext.label_report = mapper.report(codes, excluded, selection=selection)
        lines = summary_lines(ext.label_report)
        ext.notes.append(" | ".join(x.strip() for x in lines))
        for line in lines:
            log.info("external %s: %s", ext.dataset, line)
    if not len(kept):
        raise TaskError(f"external set {spec.name}: no labelled record is left after excluding the task's own "
                         f"records{' and those with an unknown label' if mapper is not None else ''} "
                         f"({'; '.join(ext.notes)})")
    ext.splits = {**ext.splits, "test": kept}
    return ext


def holdout_record_ids(task: TaskData, parts: Sequence[str] = ("val", "test")) -> dict[str, set[str]]:
    """``{source name: record ids}`` of the task's evaluation records, to exclude from a pretraining pool."""
    out: dict[str, set[str]] = {}
    index = task.cache.index
    for part in parts:
        for i in task.splits[part]:
            out.setdefault(str(index["source"].iat[int(i)]), set()).add(str(index["record_id"].iat[int(i)]))
    return out


class ExcludingSource:
    """A :class:`~ecgfm.data.record.RecordSource` that hides some record ids of another source.

    Used to build a pretraining pool without the downstream validation / test records (the leakage guard
    would otherwise reject the encoder). Picklable when the wrapped source is.

    Args:
        source: the wrapped source.
        exclude: record ids to hide.
        copies: ``[(held-out id, pool id, correlation)]`` of the hidden records that are near-copies of held-out
            records (:func:`heldout_free_source`; provenance, their ids are in ``exclude`` too).
    """

    def __init__(self, source: Any, exclude: Sequence[str], copies: Sequence[tuple[str, str, float]] = ()):
        self.source = source
        self.name = source.name
        self.exclude = frozenset(str(x) for x in exclude)
        # (held-out id, excluded pool id, correlation): the records excluded as near-copies of held-out ones
        self.copies = tuple(tuple(c) for c in copies)

    def __repr__(self) -> str:
        # the repr keys the prepared cache (ecgfm.data.prepare.prepare_cache): it names the excluded set exactly
        digest = hashlib.sha256("\n".join(sorted(self.exclude)).encode()).hexdigest()[:12]
        return f"ExcludingSource({self.source!r}, excluded={len(self.exclude)}:{digest})"

    def record_ids(self) -> list[str]:
        return [r for r in self.source.record_ids() if r not in self.exclude]

    def load(self, record_id: str):
        if record_id in self.exclude:
            from ecgfm.data.record import ECGDataError

            raise ECGDataError(f"{self.name}/{record_id}", "record excluded from this pool (held-out record)")
        return self.source.load(record_id)


# ------------------------------------------------------------------------------- held-out-free pretraining pools
SPLIT_PARTS = ("train", "val", "test")


def task_conf_dir() -> str:
    """The package's task folder, ``ecgfm/conf/task/`` (where task names are looked up)."""
    return str(config_dir() / "task")


def load_task_spec(task: str | Mapping[str, Any], data_root: str = "../shared/data", cache_root: str = "cache",
                   task_dir: str | None = None) -> TaskSpec:
    """A :class:`TaskSpec` from a task name (``conf/task/<name>.yaml``), a YAML file path or a task mapping.

    The task file is resolved the way ``probe.py`` resolves ``cfg.task``: ``${paths.data_root}`` and
    ``${paths.cache_root}`` from the arguments, ``${task.*}`` from the task itself.

    Args:
        task: a task name (``"ptbxl_super"``), a path to a task YAML file, or a task config mapping.
        data_root: folder holding the original datasets (``paths.data_root``).
        cache_root: folder of corpus caches (``paths.cache_root``).
        task_dir: folder of the task YAML files (default :func:`task_conf_dir`).

    Raises:
        ValueError: an unknown task name (the message lists the available ones) or a bad task config.
    """
    from pathlib import Path

    from omegaconf import DictConfig, OmegaConf

    if isinstance(task, (Mapping, DictConfig)):
        cfg = OmegaConf.create(OmegaConf.to_container(task, resolve=False) if isinstance(task, DictConfig)
                               else dict(task))
        where = f"task config {cfg.get('name', '?')!r}"
    else:
        name = str(task)
        folder = Path(task_dir or task_conf_dir())
        path = Path(name) if name.endswith((".yaml", ".yml")) else folder / f"{name}.yaml"
        if not path.is_file():
            import difflib

            known = sorted(p.stem for p in folder.glob("*.yaml"))
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TaskError(f"unknown task {name!r}: no task file {path}{hint} (tasks in {folder}: "
                             f"{', '.join(known) or 'none'})")
        cfg = OmegaConf.load(path)
        where = f"task {name!r} ({path})"
    node = OmegaConf.create({"task": cfg, "paths": {"data_root": str(data_root), "cache_root": str(cache_root)}})
    try:
        return TaskSpec.from_config(node.task)
    except ValueError as err:
        raise TaskError(f"{where}: {err}") from None
    except Exception as err:  # omegaconf: an interpolation that does not resolve, a '???' value...
        raise TaskError(f"{where}: cannot resolve the task config ({type(err).__name__}: {err})") from None


def tasks_holdout_record_ids(tasks: Sequence[str | Mapping[str, Any]], parts: Sequence[str] = ("val", "test"),
                             data_root: str = "../shared/data", cache_root: str = "cache", preprocess: Any = None,
                             task_dir: str | None = None, workers: int = 0, progress: bool = False
                             ) -> dict[str, set[str]]:
    """``{source name: record ids}`` of the ``parts`` splits of every task, merged (see :func:`holdout_record_ids`).

    Each task is built with :func:`build_task` (its cache is prepared on first use with ``preprocess``, which
    should be the pretraining preprocessing: the encoder exports it and the evaluation reuses it, so these are
    exactly the records the evaluation will hold out).

    Args:
        tasks: task names (``conf/task/<name>.yaml``), task YAML paths or task mappings (:func:`load_task_spec`).
        parts: which splits to collect (of ``"train"``, ``"val"``, ``"test"``).
        data_root: ``paths.data_root`` for the task files.
        cache_root: folder of corpus caches (the tasks' caches are prepared or reused there).
        preprocess: :class:`PreprocessSpec`, a mapping of its fields, or None (the default spec).
        task_dir: folder of the task YAML files (default :func:`task_conf_dir`).
        workers: cache preparation worker processes.
        progress: show progress bars while preparing.

    Raises:
        ValueError: an empty task list, an unknown part or task name (named in the message).
    """
    import logging

    log = logging.getLogger(__name__)
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise TaskError("tasks: give at least one task whose evaluation records to exclude")
    bad = [p for p in parts if p not in SPLIT_PARTS]
    if bad or not parts:
        raise TaskError(f"parts: expected a non-empty subset of {SPLIT_PARTS}, got {list(parts)}")
    spec = _preprocess_spec(preprocess)
    specs = [load_task_spec(t, data_root, cache_root, task_dir) for t in tasks]  # every name checked first
    held: dict[str, set[str]] = {}
    for task_spec in specs:
        task = build_task(task_spec, str(cache_root), spec, workers=workers, progress=progress)
        for src, ids in holdout_record_ids(task, parts).items():
            held.setdefault(src, set()).update(ids)
        log.info("%s: splits %s; notes %s", task.name, {k: len(v) for k, v in task.splits.items()}, task.notes)
    return held


def _preprocess_spec(preprocess: Any) -> PreprocessSpec:
    if preprocess is None:
        return PreprocessSpec()
    if isinstance(preprocess, PreprocessSpec):
        return preprocess
    from omegaconf import DictConfig, OmegaConf

    if isinstance(preprocess, DictConfig):
        preprocess = OmegaConf.to_container(preprocess, resolve=True)
    return PreprocessSpec.from_dict(dict(preprocess))


def heldout_free_source(source: Any, tasks: Sequence[str | Mapping[str, Any]],
                        parts: Sequence[str] = ("val", "test"), data_root: str = "../shared/data",
                        cache_root: str = "cache", preprocess: Any = None,
                        exclude_ptbxl_folds: Sequence[int] = (9, 10), task_dir: str | None = None,
                        workers: int = 0, progress: bool = False,
                        signal_copy_threshold: float | None = 0.99) -> ExcludingSource:
    """``source`` without the evaluation records of ``tasks``: a pretraining pool the leakage guard accepts.

    Excluded: every record of ``source`` that is in a ``parts`` split of one of the tasks (matched by source name
    and record id, :func:`tasks_holdout_record_ids`) and, for a PTB-XL source, every record whose ``strat_fold``
    is in ``exclude_ptbxl_folds`` whatever its labels (the validation / test folds of every PTB-XL task, not
    only of the tasks named). Records of other sources are untouched; a task whose records belong to another
    source excludes nothing here. Also excluded, unless ``signal_copy_threshold`` is None: every other record of
    ``source`` whose signal is a near-copy of an excluded one (:func:`ecgfm.evaluate.leakage.source_signal_copies`,
    correlation >= the threshold over the leads both hold): a recording filed twice under other ids and patients
    (PTB-XL ecg 1370 is validation record 140) passes every id check. Logged as a warning and kept in the returned
    source's ``copies``.

    Usable from Python and as a Hydra ``_target_`` inside the ``sources`` of :func:`ecgfm.data.prepare.prepare_cache`
    when that node is instantiated recursively (``conf/data/pretrain_pool_heldout_free.yaml``): the cache is then
    keyed by the returned source's repr, which names the excluded set by digest, so another task list, split or
    task file gives another cache and an unchanged one reuses it.

    Patients: the guard also rejects shared patients. PTB-XL folds are patient-disjoint (all records of a patient
    are in one fold), so excluding the held-out folds suffices where the source knows every record's fold; the
    shared PTB-XL copy lists folds and patients for ecg_id 1-500 only, so its unlabelled records 501-1999 stay in
    the pool whatever their patient (6 of them are other ECGs of test / validation patients: docs/BENCHMARK.md,
    "Leakage guard"; ecg 1370, a copy of validation record 140 under another patient id, goes by signal). CinC
    2017 has no patient ids. For a task with a patient-level split whose patients also have records outside its splits, the
    guard stays the backstop.

    Args:
        source: a :class:`~ecgfm.data.record.RecordSource` (or a ``_target_`` mapping of one).
        tasks: task names (``conf/task/<name>.yaml``), task YAML paths or task mappings.
        parts: which task splits to exclude.
        data_root: ``paths.data_root`` for the task files.
        cache_root: folder of corpus caches (the tasks' caches are prepared or reused there).
        preprocess: preprocessing of the task caches (normally the pool's: the evaluation reuses the encoder's).
        exclude_ptbxl_folds: PTB-XL ``strat_fold`` values excluded outright (empty: none).
        task_dir: folder of the task YAML files (default :func:`task_conf_dir`).
        workers: cache preparation worker processes for the task caches.
        progress: show progress bars while preparing.
        signal_copy_threshold: correlation at or above which a record is a copy of an excluded one and excluded
            too (one read of the source's records, ~2 s for 2,000 records); None: not checked.

    Returns:
        An :class:`ExcludingSource` wrapping ``source``.

    Raises:
        ValueError: an unknown task name (named), an empty task list or a bad ``parts``.
        ECGDataError: a task's data is missing or unreadable.
    """
    from omegaconf import DictConfig

    if isinstance(source, (Mapping, DictConfig)):
        from hydra.utils import instantiate

        source = instantiate(source, _convert_="all")
    held = tasks_holdout_record_ids(tasks, parts, data_root=data_root, cache_root=cache_root, preprocess=preprocess,
                                    task_dir=task_dir, workers=workers, progress=progress)
    name = str(source.name)
    exclude = set(held.get(name, set()))
    folds = {int(f) for f in exclude_ptbxl_folds or ()}
    if folds and name == "ptbxl" and hasattr(source, "folds"):
        # every PTB-XL record of the held-out folds (whatever the task), not only those with the tasks' labels
        exclude |= {r for r, f in source.folds().items() if f in folds}
    listed = set(source.record_ids())
    exclude &= listed
    copies: list[tuple[str, str, float]] = []
    if signal_copy_threshold is not None and exclude:
        import logging

        from ecgfm.evaluate.leakage import source_signal_copies

        copies = source_signal_copies(source, sorted(exclude), sorted(listed - exclude),
                                      threshold=float(signal_copy_threshold))
        if copies:
            logging.getLogger(__name__).warning(
                "%s: %d pool record(s) are near-copies of held-out records (correlation >= %g), excluded too: %s",
                name, len({p for _, p, _ in copies}), signal_copy_threshold,
                ", ".join(f"{p} ~ {e} ({c:.5f})" for e, p, c in copies))
            exclude |= {p for _, p, _ in copies}
    return ExcludingSource(source, sorted(exclude), copies)
