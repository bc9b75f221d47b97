"""Task splits from a user's split column or published folds: a patient on two sides is refused (not only in the
stratified splitter), and a split value other than train / val / test is never silently dropped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.evaluate.tasks import TaskSpec, build_task


def _folder(tmp_path: Path, fixture_dir: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A folder task of fixture PTB-XL records with a labels CSV (record, patient, split value, class)."""
    src = sorted((fixture_dir / "ptbxl" / "records100" / "00000").glob("*_lr.hea"))[:len(rows)]
    root = tmp_path / "folder"
    root.mkdir()
    lines = ["record_id,patient_id,split,diagnosis"]
    for hea, (patient, split, label) in zip(src, rows):
        for f in (hea, hea.with_suffix(".dat")):
            shutil.copy(f, root / f.name)
        lines.append(f"{hea.stem},{patient},{split},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _task(root: Path, tmp_path: Path):
    spec = TaskSpec(name="mine", dataset="mine", sources=[{
        "_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
        "id_column": "record_id", "patient_column": "patient_id", "label_columns": ["diagnosis"],
        "include_unlabelled": False}], labels="record", multilabel=False, split={"kind": "column", "key": "split"})
    return build_task(spec, str(tmp_path / "cache"), PreprocessSpec(fs=100))


def test_split_column_putting_a_patient_on_two_sides_is_refused(tmp_path, fixture_dir):
    root = _folder(tmp_path, fixture_dir, [("P1", "train", "A"), ("P1", "test", "A"), ("P2", "train", "B"),
                                           ("P3", "val", "B"), ("P4", "test", "B")])
    with pytest.raises(ValueError, match="patient 'P1' is in both 'train' and 'test'.*leaks patients"):
        _task(root, tmp_path)


def test_split_column_spellings_and_unknown_values(tmp_path, fixture_dir):
    rows = [("P1", "train", "A"), ("P2", "Validation ", "A"), ("P3", "dev", "B"), ("P4", "TEST", "B"),
            ("P5", "", "A"), ("P6", "training", "B")]
    task = _task(_folder(tmp_path, fixture_dir, rows), tmp_path)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 2, "val": 2, "test": 1}
    assert any("1 labelled record(s) have no value in split column 'split'" in n for n in task.notes)
    odd = tmp_path / "odd"
    odd.mkdir()
    root = _folder(odd, fixture_dir, rows[:4] + [("P7", "holdout", "A")])
    with pytest.raises(ValueError, match=r"split column 'split' holds \['holdout'\]"):
        _task(root, odd)


def test_a_folds_split_over_a_column_of_names_is_refused_naming_the_record(tmp_path, fixture_dir):
    """split.kind folds over a column of names failed with float()'s bare "could not convert string to float"
    (neither record nor setting named)."""
    from ecgfm.data.splits import fold_split
    from ecgfm.evaluate.tasks import TaskError

    with pytest.raises(ValueError, match=r"fold of record 1 is 'train'.*split.kind: column"):
        fold_split([1, "train", 10])
    root = _folder(tmp_path, fixture_dir, [("P1", "train", "A"), ("P2", "test", "B"), ("P3", "val", "A")])
    spec = TaskSpec(name="mine", dataset="mine", sources=[{
        "_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
        "id_column": "record_id", "patient_column": "patient_id", "label_columns": ["diagnosis"],
        "include_unlabelled": False}], labels="record", multilabel=False, split={"kind": "folds", "key": "split"})
    with pytest.raises(TaskError, match=r"task mine: record \S+00001_lr of .* has split 'train', not a fold number "
                                        r".*split.kind: column"):
        build_task(spec, str(tmp_path / "cache"), PreprocessSpec(fs=100))
