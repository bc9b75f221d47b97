"""FolderSource defects found in review s22: patient columns named ``PatientID`` (a silent record-level split),
rows of 0 flags beside a column of class names (left out of every split), a file name shared by two sub-folders
(reported as matching no record) and records skipped while a task's cache is prepared (not said).

Every file is synthetic and written to ``tmp_path`` (no shared data needed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.readers.folder import FolderSource
from ecgfm.data.record import ECGDataError
from ecgfm.evaluate.tasks import TaskSpec, build_task

wfdb = pytest.importorskip("wfdb")


def _write(root: Path, rid: str, seed: int = 0) -> None:
    """One tiny 2-lead WFDB record ``root/rid`` (100 Hz, 3 s; ``rid`` may name a sub-folder)."""
    path = root / rid
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(300) / 100.0
    sig = np.stack([np.sin(2 * np.pi * (1 + seed % 3) * t), 0.5 * np.cos(2 * np.pi * t)], axis=1)
    wfdb.wrsamp(path.name, fs=100, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                adc_gain=[1000.0, 1000.0], baseline=[0, 0], write_dir=str(path.parent))


def _folder(tmp_path: Path, header: str, rows: list[str]) -> Path:
    """A folder of records ``r00``, ``r01``... with ``labels.csv`` = ``record_id,<header>`` + one row per entry."""
    root = tmp_path / "folder"
    lines = [f"record_id,{header}"]
    for i, row in enumerate(rows):
        _write(root, f"r{i:02d}", seed=i)
        lines.append(f"r{i:02d},{row}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _spec(root: Path, multilabel: bool = True, **params) -> TaskSpec:
    return TaskSpec(name="t", dataset="t", sources=[{
        "_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
        "include_unlabelled": False, **params}], labels="record", multilabel=multilabel,
        split={"kind": "stratified", "fractions": [0.5, 0.0, 0.5], "seed": 0})


# --- 1. patient columns by a normalised name -----------------------------------------------------------------------


@pytest.mark.parametrize("column", ["PatientID", "Patient ID", "patientId", "subjectID", "Subject-Id", "PATIENT"])
def test_patient_column_spelled_like_patientid_is_the_patient_column(tmp_path, column):
    """'PatientID' was not a patient column: with label_columns given the split went by record (30 of 36 test records
    shared a patient with train); without, it was a second text column and the error suggested it as labels."""
    root = _folder(tmp_path, f"{column},diagnosis", [f"P{i // 3},{'AF' if i % 2 else 'NORM'}" for i in range(6)])
    for src in (FolderSource(root, labels_csv="labels.csv"),
                FolderSource(root, labels_csv="labels.csv", label_columns=["diagnosis"])):
        assert src.patient_column == column and src.label_columns == ["diagnosis"]
        assert [src.load(r).patient_id for r in src.record_ids()] == ["P0", "P0", "P0", "P1", "P1", "P1"]
    # not the patient column (none asked for): still never a default label column (each patient would be a class)
    none = FolderSource(root, labels_csv="labels.csv", patient_column="")
    assert none.label_columns == ["diagnosis"] and none.load("r00").patient_id is None
    assert FolderSource(root, labels_csv="labels.csv", label_columns=[column]).load("r00").labels == ("P0",)


def test_several_patient_like_columns_are_still_refused(tmp_path):
    root = _folder(tmp_path, "patient_id,PatientID,AF", ["P1,Q1,1", "P2,Q2,0"])
    with pytest.raises(ECGDataError, match=r"labels\.csv: several patient columns \['patient_id', 'PatientID'\]"):
        FolderSource(root, labels_csv="labels.csv")
    assert FolderSource(root, labels_csv="labels.csv", patient_column="PatientID").load("r00").patient_id == "Q1"


def test_task_split_with_a_patientid_column_keeps_patients_on_one_side(tmp_path):
    """The reviewer's case end to end: ``label_columns=[diagnosis]`` and a ``PatientID`` column (4 records each)."""
    rows = [f"P{i // 4},{'AF' if (i // 4) % 2 else 'NORM'}" for i in range(16)]
    task = build_task(_spec(_folder(tmp_path, "PatientID,diagnosis", rows), multilabel=False,
                            label_columns=["diagnosis"]), str(tmp_path / "cache"), PreprocessSpec(fs=100))
    assert sorted(set(task.patient_ids)) == ["P0", "P1", "P2", "P3"]
    train, test = (set(task.patient_ids[task.splits[k]]) for k in ("train", "test"))
    assert train and test and not train & test


# --- 2. rows of 0 flags beside a column of class names ---------------------------------------------------------------


def test_zero_flag_rows_beside_a_class_name_column_are_known_negatives(tmp_path):
    """Flags + one text column: a row of 0 flags with an empty text cell was 'without a label of the class space'
    (in no split), while the same CSV without the text column kept it as a negative."""
    rows = ["0,0,SR", "0,0,", "1,0,AFIB", "0,1,", ",,SR", ",,"]
    root = _folder(tmp_path, "MI,CD,rhythm", rows)
    src = FolderSource(root, labels_csv="labels.csv")
    assert src.label_columns == ["MI", "CD", "rhythm"]
    known = [src.load(r).meta["labels_known"] for r in src.record_ids()]
    assert known == [True, True, True, True, False, False]   # a filled flag cell; names alone say nothing of others
    assert src.load("r01").labels == ()


def test_zero_flag_rows_beside_a_class_name_column_are_in_every_split(tmp_path):
    rows = [f"P{i},{1 if i % 4 == 0 else 0},{1 if i % 4 == 1 else 0},{'SR' if i % 4 == 2 else ''}" for i in range(16)]
    rows += ["P16,,,", "P17,,,"]   # empty cells: unknown, in no split
    task = build_task(_spec(_folder(tmp_path, "patient_id,MI,CD,rhythm", rows)), str(tmp_path / "cache"),
                      PreprocessSpec(fs=100))
    assert sorted(task.class_names) == ["CD", "MI", "SR"]
    in_split = np.concatenate([task.splits[k] for k in ("train", "val", "test")])
    assert len(in_split) == 16 and int((task.labels[in_split].sum(axis=1) == 0).sum()) == 4   # the 4 zero rows
    assert any("4 record(s) whose flags are known" in n for n in task.notes)
    assert any("2 record(s) without a label of the class space are in no split" in n for n in task.notes)


def test_single_label_task_still_leaves_out_records_without_a_class(tmp_path):
    """``labels_known`` does not make a softmax task's class-less records all-zero rows: they stay out."""
    rows = [f"P{i},{1 if i % 3 == 0 else 0},{'SR' if i % 3 == 1 else ''}" for i in range(12)]
    task = build_task(_spec(_folder(tmp_path, "patient_id,AF,rhythm", rows), multilabel=False),
                      str(tmp_path / "cache"), PreprocessSpec(fs=100))
    in_split = np.concatenate([task.splits[k] for k in ("train", "val", "test")])
    assert len(in_split) == 8 and (task.labels[in_split].sum(axis=1) == 1).all()
    assert any("4 record(s) without a label of the class space are in no split" in n for n in task.notes)


# --- 3. a file name in two sub-folders -------------------------------------------------------------------------------


def test_file_name_shared_by_two_sub_folders_is_ambiguous_naming_both(tmp_path):
    root = tmp_path / "folder"
    for rid in ("site_a/00005_hr", "site_b/00005_hr", "site_a/00001_hr"):
        _write(root, rid)
    (root / "labels.csv").write_text("record_id,dx\n00001_hr,AF\n00005_hr,NORM\n")
    with pytest.raises(ECGDataError, match=r"labels\.csv: line 3: id '00005_hr'.*ambiguous: 2 records under .* "
                                           r"\('site_a/00005_hr', 'site_b/00005_hr'; 1 file name\(s\) occur in "
                                           r"several sub-folders\); record ids are paths relative to the folder "
                                           r"without extension.*e\.g\. 'site_a/00005_hr'") as err:
        FolderSource(root, labels_csv="labels.csv")
    assert "match no record" not in str(err.value)
    (root / "labels.csv").write_text("record_id,dx\n00001_hr,AF\nsite_b/00005_hr,NORM\n")
    src = FolderSource(root, labels_csv="labels.csv", include_unlabelled=False)
    assert src.record_ids() == ["site_a/00001_hr", "site_b/00005_hr"]   # a unique file name is still accepted


# --- 4. records skipped while a cache is prepared -------------------------------------------------------------------


def test_prepare_cache_warns_about_skipped_records_when_prepared_and_reused(tmp_path, caplog):
    """probe / finetune / train prepare a task's cache with prepare_cache: its skipped records were only listed in
    skipped.csv (prepare.py alone printed the count)."""
    from ecgfm.data.prepare import prepare_cache

    root = _folder(tmp_path, "AF", ["1", "0", "1", "0", "1"])
    (root / "r01.dat").unlink()
    (root / "r03.dat").write_bytes((root / "r03.dat").read_bytes()[:100])   # truncated
    sources = [{"_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": "labels.csv"}]

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "record(s) skipped (" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="ecgfm.data.prepare"):
        out = Path(prepare_cache(sources, str(tmp_path / "cache"), PreprocessSpec(fs=100), name="t", progress=False))
        first = warnings()
        caplog.clear()
        assert prepare_cache(sources, str(tmp_path / "cache"), PreprocessSpec(fs=100), name="t",
                             progress=False) == str(out)   # reused
        reused = warnings()
    for found in (first, reused):
        assert len(found) == 1, found
        msg = found[0]
        assert f"cache {out}: 2 record(s) skipped (unreadable or duplicate)" in msg and str(out / "skipped.csv") in msg
        assert "folder/r01: " in msg and "folder/r03: " in msg and "r01.dat" in msg
    caplog.clear()
    _write(root, "r01", seed=1)
    _write(root, "r03", seed=3)
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.prepare"):
        prepare_cache(sources, str(tmp_path / "cache"), PreprocessSpec(fs=100), name="t", progress=False)
    assert not warnings()   # files fixed: read again, nothing skipped any more
