"""One label-table reader for every source (issue 9, item 3).

Each fault class (UTF-8 BOM, duplicate id, padded header names / cells, undecodable bytes, ragged rows) is tried
on every source that reads a table: CinC 2017 ``REFERENCE.csv``, PTB-XL ``ptbxl_database.csv`` /
``scp_statements.csv``, and the labels CSV of a folder of WFDB records, plus the reader itself.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ecgfm.data.cache import prepare_from_config
from ecgfm.data.readers import CinC2017Source, FolderSource, PTBXLSource, load_scp_statements
from ecgfm.data.readers.tables import read_label_table
from ecgfm.data.record import ECGDataError

BOM = "\ufeff"


def _raises(path: Path, problem: str, fn, *args, **kwargs) -> ECGDataError:
    with pytest.raises(ECGDataError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.path == str(path), (err.path, path)
    assert re.search(problem, err.problem), err.problem
    return err


# ---------------------------------------------------------------------------------------- the reader itself


def test_reader_strips_bom_header_names_and_cells(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(f"{BOM} record_id , label \n r1 , AF \nr2,N\n\n", encoding="utf-8")
    t = read_label_table(p, id_column="record_id")
    assert t.columns == ["record_id", "label"]
    assert t.rows == {"r1": {"record_id": "r1", "label": "AF"}, "r2": {"record_id": "r2", "label": "N"}}
    assert t.lines == {"r1": 2, "r2": 3}


def test_reader_duplicate_id_names_file_id_and_both_lines(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("record_id,label\nr1,AF\nr2,N\n\nr1,N\n")
    err = _raises(p, r"duplicate id 'r1' in column 'record_id': lines 2 and 5", read_label_table, p,
                  id_column="record_id")
    assert str(err).startswith(str(p))


def test_reader_duplicate_after_normalisation(tmp_path):
    """Two spellings of one id ('1' and '1.0') are the same record: a duplicate, not a silent overwrite."""
    p = tmp_path / "t.csv"
    p.write_text("id,x\n1,a\n2,b\n1.0,c\n")
    _raises(p, r"duplicate id '00001' in column 'id': lines 2 and 4", read_label_table, p, id_column="id",
            normalise_id=lambda s: f"{int(float(s)):05d}")


def test_reader_quoted_multiline_cell_keeps_line_numbers(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('id,note\na,"two\nlines"\nb,x\na,y\n')
    _raises(p, r"duplicate id 'a' in column 'id': lines 2 and 5", read_label_table, p, id_column="id")


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_reader_undecodable_names_file_line_and_encoding(tmp_path, encoding):
    p = tmp_path / "t.csv"
    p.write_bytes("record_id,label\nr1,N\nr2,Störung\n".encode(encoding))
    err = _raises(p, r"line 3: .*not valid utf-8 \(encoding tried: utf-8\)", read_label_table, p,
                  id_column="record_id")
    assert "encoding=" in err.problem  # says how to read it
    assert read_label_table(p, id_column="record_id", encoding=encoding).rows["r2"]["label"] == "Störung"


def test_reader_utf16_with_bom(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes("record_id,label\nr1,N\n".encode("utf-16"))
    assert read_label_table(p, id_column="record_id").rows == {"r1": {"record_id": "r1", "label": "N"}}


@pytest.mark.parametrize("body,problem", [
    ("id,label\nr1,N,extra\n", r"line 2: 3 cells, but the header has 2 columns"),
    ("id,label\nr1\n", r"line 2: 1 cell, but the header has 2 columns"),
    ("id,label\n,N\n", r"line 2: empty id in column 'id'"),
    ("id,label,label\nr1,N,A\n", r"column 'label' appears twice in the header"),
    ("", r"empty table"),
    ("name,label\nr1,N\n", r"id column 'id' not found; columns are \['name', 'label'\]"),
])
def test_reader_malformed_tables(tmp_path, body, problem):
    p = tmp_path / "t.csv"
    p.write_text(body)
    _raises(p, problem, read_label_table, p, id_column="id")


def test_reader_trailing_empty_cells_are_tolerated(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("id,label\nr1,N,\nr2,A,,\n")
    assert read_label_table(p, id_column="id").rows["r2"] == {"id": "r2", "label": "A"}


def test_reader_without_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(f"{BOM}A1,N\nA2 , A\n")
    t = read_label_table(p, header=False, columns=["record", "label"], id_column="record")
    assert t.rows == {"A1": {"record": "A1", "label": "N"}, "A2": {"record": "A2", "label": "A"}}
    assert t.lines == {"A1": 1, "A2": 2}


def test_reader_missing_file(tmp_path):
    _raises(tmp_path / "nope.csv", "not found", read_label_table, tmp_path / "nope.csv", id_column="id")


# ---------------------------------------------------------------------------------------------- CinC 2017


@pytest.fixture
def cinc(shared_data, tmp_path) -> Path:
    root = tmp_path / "cinc2017"
    root.mkdir()
    for name in ("A00002", "A00003", "A00006"):
        for ext in ("hea", "mat"):
            shutil.copy(shared_data / "cinc2017" / f"{name}.{ext}", root)
    return root


def test_cinc2017_reference_with_bom_labels_the_first_record(cinc):
    (cinc / "REFERENCE.csv").write_bytes(b"\xef\xbb\xbfA00002,N\r\nA00003,A\r\n")
    src = CinC2017Source(cinc)
    assert src.load("A00002").labels == ("N",)
    assert src.load("A00003").labels == ("A",)


def test_cinc2017_reference_cells_are_stripped(cinc):
    (cinc / "REFERENCE.csv").write_text("A00002 , N \n A00003,A\n")
    src = CinC2017Source(cinc)
    assert src.load("A00002").labels == ("N",) and src.load("A00003").labels == ("A",)


def test_cinc2017_duplicate_record_is_an_error(cinc):
    ref = cinc / "REFERENCE.csv"
    ref.write_text("A00002,N\nA00003,A\nA00002,O\n")
    _raises(ref, r"duplicate id 'A00002' in column 'record': lines 1 and 3", CinC2017Source, cinc)


def test_cinc2017_undecodable_reference(cinc):
    ref = cinc / "REFERENCE.csv"
    ref.write_bytes(b"A00002,N\nA00003\xe9,A\n")
    _raises(ref, r"line 2: .*encoding tried: utf-8", CinC2017Source, cinc)


def test_cinc2017_bad_label_names_the_line(cinc):
    ref = cinc / "REFERENCE.csv"
    ref.write_text("A00002,N\nA00003,X\n")
    _raises(ref, r"line 2: expected 'record,label' with label in .*, got label 'X'", CinC2017Source, cinc)


# ------------------------------------------------------------------------------------------------- PTB-XL


@pytest.fixture
def ptbxl(fixture_dir, tmp_path) -> Path:
    root = tmp_path / "ptbxl"
    root.mkdir()
    (root / "records100").symlink_to(fixture_dir / "ptbxl" / "records100", target_is_directory=True)
    shutil.copy(fixture_dir / "ptbxl" / "scp_statements.csv", root)
    return root


def _db_lines(fixture_dir: Path) -> list[str]:
    return (fixture_dir / "ptbxl" / "ptbxl_database.csv").read_text().splitlines(keepends=True)


def test_ptbxl_duplicate_ecg_id_is_an_error(fixture_dir, ptbxl):
    lines = _db_lines(fixture_dir)
    dup = lines[3].replace("3,", "1,", 1)  # a second row for ecg_id 1 (the CSV line 4)
    assert dup.startswith("1,")
    (ptbxl / "ptbxl_database.csv").write_text("".join(lines[:3] + [dup] + lines[4:]))
    err = _raises(ptbxl / "ptbxl_database.csv", r"duplicate id '00001' in column 'ecg_id': lines 2 and 4",
                  PTBXLSource, ptbxl)
    assert "ptbxl_database.csv" in str(err)


def test_ptbxl_duplicate_ecg_id_in_another_spelling(fixture_dir, ptbxl):
    lines = _db_lines(fixture_dir)
    dup = "1.0" + lines[3][1:]
    (ptbxl / "ptbxl_database.csv").write_text("".join(lines[:3] + [dup] + lines[4:]))
    _raises(ptbxl / "ptbxl_database.csv", r"duplicate id '00001' in column 'ecg_id': lines 2 and 4", PTBXLSource,
            ptbxl)


def test_ptbxl_database_with_bom_and_padded_header(fixture_dir, ptbxl):
    lines = _db_lines(fixture_dir)
    lines[0] = BOM + lines[0].replace("ecg_id,patient_id", " ecg_id , patient_id ")
    (ptbxl / "ptbxl_database.csv").write_text("".join(lines), encoding="utf-8")
    src = PTBXLSource(ptbxl)
    rec = src.load("00001")
    assert rec.patient_id == "15709" and rec.labels == ("LVOLT", "NORM", "SR") and rec.meta["strat_fold"] == 3


def test_ptbxl_undecodable_database(fixture_dir, ptbxl):
    lines = _db_lines(fixture_dir)
    (ptbxl / "ptbxl_database.csv").write_bytes("".join(lines[:5]).encode() + "x,\xe9\n".encode("latin-1"))
    _raises(ptbxl / "ptbxl_database.csv", r"line 6: .*encoding tried: utf-8", PTBXLSource, ptbxl)


def test_ptbxl_non_integer_ecg_id(fixture_dir, ptbxl):
    lines = _db_lines(fixture_dir)
    lines[2] = "2.5" + lines[2][1:]
    (ptbxl / "ptbxl_database.csv").write_text("".join(lines))
    _raises(ptbxl / "ptbxl_database.csv", r"line 3: id '2.5' in column 'ecg_id' is not", PTBXLSource, ptbxl)


def test_ptbxl_duplicate_scp_statement(fixture_dir, ptbxl):
    st = ptbxl / "scp_statements.csv"
    lines = st.read_text().splitlines(keepends=True)
    st.write_text("".join(lines + [lines[1]]))
    _raises(st, rf"duplicate id 'NDT' in column '': lines 2 and {len(lines) + 1}", load_scp_statements, ptbxl)


# ------------------------------------------------------------------------------------------ folder + CSV


@pytest.fixture
def folder(fixture_dir, tmp_path) -> Path:
    root = tmp_path / "f"
    root.mkdir()
    for i in (1, 2, 3):
        for ext in ("hea", "dat"):
            shutil.copy(fixture_dir / "ptbxl" / "records100" / "00000" / f"0000{i}_lr.{ext}", root)
    return root


def test_folder_csv_header_with_spaces_maps_the_right_columns(folder):
    (folder / "labels.csv").write_text("record_id, label\n00001_lr, AF\n00002_lr , N\n")
    src = FolderSource(folder, labels_csv="labels.csv", label_columns=["label"])
    assert src.load("00001_lr").labels == ("AF",) and src.load("00002_lr").labels == ("N",)
    assert src.load("00001_lr").meta["label"] == "AF"


def test_folder_csv_default_id_column_with_bom_and_spaces(folder):
    (folder / "labels.csv").write_bytes(b"\xef\xbb\xbf record_id ,AF\n00001_lr,1\n")
    assert FolderSource(folder, labels_csv="labels.csv").load("00001_lr").labels == ("AF",)


def test_folder_csv_duplicate_names_both_lines(folder):
    (folder / "labels.csv").write_text("record_id,AF\n00001_lr,1\n00002_lr,0\n00001_lr,0\n")
    _raises(folder / "labels.csv", r"duplicate id '00001_lr' in column 'record_id': lines 2 and 4", FolderSource,
            folder, labels_csv="labels.csv")


def test_folder_csv_latin1_is_a_clear_error_and_readable_with_encoding(folder):
    (folder / "labels.csv").write_bytes("record_id,rhythm\n00001_lr,Vorhofflimmern\n00002_lr,Sinusrhythmus ä\n"
                                        .encode("latin-1"))
    _raises(folder / "labels.csv", r"line 3: .*encoding tried: utf-8", FolderSource, folder,
            labels_csv="labels.csv")
    src = FolderSource(folder, labels_csv="labels.csv", labels_encoding="latin-1")
    assert src.load("00002_lr").labels == ("Sinusrhythmus ä",)


def test_prepare_path_reports_a_duplicate_label_row(folder, tmp_path):
    """The public prepare entry point fails before converting anything, naming the file, id and lines."""
    (folder / "labels.csv").write_text("record_id,AF\n00001_lr,1\n00001_lr,0\n")
    cfg = {"sources": ["folder"], "out": str(tmp_path / "cache"), "workers": 0, "progress": False,
           "spec": {"fs": 100},
           "folder": {"root": str(folder), "labels_csv": str(folder / "labels.csv"), "id_column": "record_id"}}
    _raises(folder / "labels.csv", r"duplicate id '00001_lr' in column 'record_id': lines 2 and 3",
            prepare_from_config, cfg)
    assert not (tmp_path / "cache" / "manifest.json").exists()
