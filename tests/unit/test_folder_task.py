"""A folder task from a labels CSV of 0/1 flag columns: negatives (a row of zeros) are kept in every split, records
without a row stay out, and a one-class task without negatives (or positives) is refused instead of being trained
and tested on positives only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.evaluate.tasks import TaskSpec, build_task


def _folder(tmp_path: Path, fixture_dir: Path, header: str, rows: list[str], n_without_row: int = 0) -> Path:
    """Fixture PTB-XL records (100 Hz) in a folder with ``labels.csv`` = ``record_id,<header>`` + one row per entry
    of ``rows``; ``n_without_row`` more records get no row."""
    src = sorted((fixture_dir / "ptbxl" / "records100" / "00000").glob("*_lr.hea"))[:len(rows) + n_without_row]
    root = tmp_path / "folder"
    root.mkdir()
    for hea in src:
        for f in (hea, hea.with_suffix(".dat")):
            shutil.copy(f, root / f.name)
    lines = [f"record_id,{header}"] + [f"{hea.stem},{row}" for hea, row in zip(src, rows)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _task(root: Path, tmp_path: Path, multilabel: bool = True, include_unlabelled: bool = False,
          fractions=(0.5, 0.0, 0.5)):
    spec = TaskSpec(name="af", dataset="af", sources=[{
        "_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
        "include_unlabelled": include_unlabelled}], labels="record", multilabel=multilabel,
        split={"kind": "stratified", "fractions": list(fractions), "seed": 0})
    return build_task(spec, str(tmp_path / "cache"), PreprocessSpec(fs=100))


def test_flag_column_negatives_are_in_every_split(tmp_path, fixture_dir):
    # 12 records with a row (4 positives, 8 zeros), one row with an empty flag (unknown), two records without a row
    rows = [f"P{i},{1 if i % 3 == 0 else 0}" for i in range(12)] + ["P12,"]
    task = _task(_folder(tmp_path, fixture_dir, "patient_id,af", rows, n_without_row=2), tmp_path,
                 include_unlabelled=True)
    assert task.class_names == ["af"] and len(task.cache.keys) == 15
    in_split = np.concatenate([task.splits[k] for k in ("train", "val", "test")])
    assert len(in_split) == 12                                   # every record with a 0/1 flag, no other
    assert sorted(set(task.cache.keys) - set(task.record_keys(in_split))) == [
        "folder/00013_lr", "folder/00014_lr", "folder/00015_lr"]   # the empty flag and the records without a row
    for part in ("train", "test"):
        y = task.labels[task.splits[part], 0]
        assert 0 < y.sum() < len(y), (part, y)                   # positives and negatives on both sides
    assert task.labels[in_split, 0].sum() == 4
    assert any("8 record(s) whose flags are known but none of ['af'] are negatives" in n for n in task.notes)
    assert any("3 record(s) without a label of the class space are in no split" in n for n in task.notes)


def test_labels_outside_the_class_space_are_not_negatives(tmp_path, fixture_dir):
    """Records labelled in another vocabulary ("Normal", "Infarct" for a task of NORM / MI) are not known to be
    negatives: a task imposing those classes still finds no positive and says so (they were all turned into
    negatives: an external set with no positive, or real positives scored as negatives)."""
    root = _folder(tmp_path, fixture_dir, "patient_id,dx", [f"P{i},{'Normal' if i % 2 else 'Infarct'}"
                                                            for i in range(8)])
    spec = TaskSpec(name="ext", dataset="ext", sources=[{
        "_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
        "include_unlabelled": False}], labels="record", multilabel=True, split={"kind": "all"})
    with pytest.raises(ValueError, match=r"no record of .* has a label among \['NORM', 'MI'\]"):
        build_task(spec, str(tmp_path / "cache"), PreprocessSpec(fs=100), classes=["NORM", "MI"])


def test_flags_outside_the_class_space_still_make_negatives(tmp_path, fixture_dir):
    """A record with rbbb=1, af=0 is known to be negative for af: a task of af alone keeps it (it had left every
    split, so the task became "AF vs all-zero records" and its AUROC rose)."""
    rows = [f"P{i},{1 if i < 4 else 0},{1 if 4 <= i < 8 else 0}" for i in range(12)]
    root = _folder(tmp_path, fixture_dir, "patient_id,af,rbbb", rows)
    spec = TaskSpec(name="af", dataset="af", sources=[{
        "_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
        "include_unlabelled": False}], labels="record", multilabel=True, classes=["af"],
        split={"kind": "stratified", "fractions": [0.5, 0.0, 0.5], "seed": 0})
    task = build_task(spec, str(tmp_path / "cache"), PreprocessSpec(fs=100))
    in_split = np.concatenate([task.splits[k] for k in ("train", "val", "test")])
    assert len(in_split) == 12 and task.labels[in_split, 0].sum() == 4


def test_one_class_task_without_negatives_is_refused(tmp_path, fixture_dir):
    root = _folder(tmp_path, fixture_dir, "patient_id,af", [f"P{i},1" for i in range(6)])
    with pytest.raises(ValueError, match=r"only class 'af' has 3 positive and 0 negative record\(s\) in the train "
                                         r"split: it can be neither trained nor scored. A one-class task needs "
                                         r"negatives"):
        _task(root, tmp_path)


def test_single_label_flag_task_is_refused(tmp_path, fixture_dir):
    """A softmax task over one 0/1 column would drop the negatives and learn one class: refused."""
    root = _folder(tmp_path, fixture_dir, "patient_id,af", [f"P{i},{i % 2}" for i in range(8)])
    with pytest.raises(ValueError, match=r"only class 'af' has \d+ positive and 0 negative.*needs at least two "
                                         r"classes; for one 0/1 flag column use multilabel: true"):
        _task(root, tmp_path, multilabel=False)


def test_class_without_negatives_in_a_split_is_noted(tmp_path, fixture_dir):
    rows = [f"P{i},{1 if i % 2 else 0},1" for i in range(8)]          # 'paced' is positive everywhere
    task = _task(_folder(tmp_path, fixture_dir, "patient_id,af,paced", rows), tmp_path)
    assert task.class_names == ["af", "paced"]
    assert any("test split: 1 class(es) without a negative record: ['paced']" in n for n in task.notes)


@pytest.mark.parametrize("key,value", [("stride_seconds", 0), ("stride_seconds", -1.25), ("crop_seconds", 0.0),
                                       ("stride_seconds", float("nan")), ("crop_seconds", "10")])
def test_task_window_and_stride_must_be_positive_seconds(key, value):
    """stride_seconds <= 0 was clamped to a one-sample stride without a word (and a NaN crashed later)."""
    from ecgfm.evaluate.tasks import TaskSpec

    cfg = {"name": "t", "dataset": "d", "sources": [{"_target_": "x"}], key: value}
    with pytest.raises(ValueError, match=f"{key} must be a positive number of seconds"):   # a ConfigError
        TaskSpec.from_config(cfg)
    assert TaskSpec.from_config({**cfg, key: 2.5}).__dict__[key] == 2.5


def test_classes_without_a_training_positive_leave_the_task():
    """PTB-XL rhythm on the shared subset had AFLT and SVTAC with no training positive: probes scored them at 0.5
    and fine-tunes at seed-dependent noise (0.28 / 0.81), inside the macro AUROC. They leave the task, with a note;
    records keep their other labels, and records labelled only with such a class leave every split."""
    from ecgfm.evaluate.tasks import _drop_untrainable_classes

    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.float32)
    splits = {"train": np.array([0, 1, 2]), "val": np.array([3, 4]), "test": np.array([5])}
    multi = TaskSpec(name="t", dataset="d", sources=[{}], multilabel=True)
    notes: list[str] = []
    y2, names, sp = _drop_untrainable_classes(multi, y, ["a", "b", "c"], splits, notes)
    assert names == ["a", "b"] and y2.shape == (6, 2)
    # record 3 was labelled 'c' only: in no split now (it was a negative of every class); 5 keeps 'a'
    assert {k: v.tolist() for k, v in sp.items()} == {"train": [0, 1, 2], "val": [4], "test": [5]}
    assert "['c'] have no positive record in the train split" in notes[0]
    single = TaskSpec(name="t", dataset="d", sources=[{}], multilabel=False)
    ys = np.eye(3, dtype=np.float32)[[0, 1, 0, 2, 1, 2]]
    y3, names, sp = _drop_untrainable_classes(single, ys, ["a", "b", "c"], splits, [])
    assert names == ["a", "b"] and sp["val"].tolist() == [4] and sp["test"].tolist() == []
    same = _drop_untrainable_classes(multi, y[:, :2], ["a", "b"], splits, [])
    assert same[1] == ["a", "b"] and same[0] is not None
