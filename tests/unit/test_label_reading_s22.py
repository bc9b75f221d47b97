"""Label reading defects found in review s22: default label columns of a folder labels CSV, ``# Dx:`` code parsing,
flag / patient / multi-label cells of a folder labels CSV, and the decoding of CPSC 2018's ``REFERENCE.csv``.

Every file is synthetic and written to ``tmp_path`` (no shared data needed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from ecgfm.data.readers.folder import FolderSource
from ecgfm.data.readers.physionet import Challenge2021Source
from ecgfm.data.record import ECGDataError

wfdb = pytest.importorskip("wfdb")


def _folder(tmp_path: Path, ids=("a1", "a2", "a3")) -> Path:
    """A folder of tiny 2-lead WFDB records (500 Hz, 1 s)."""
    root = tmp_path / "folder"
    root.mkdir()
    t = np.arange(500) / 500.0
    sig = np.stack([np.sin(2 * np.pi * t), 0.5 * np.cos(2 * np.pi * t)], axis=1)
    for rid in ids:
        wfdb.wrsamp(rid, fs=500, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                    adc_gain=[1000.0, 1000.0], baseline=[0, 0], write_dir=str(root))
    return root


def _challenge_record(root: Path, rid: str, dx_lines: str) -> Path:
    """A challenge-style record (``.hea`` + ``.mat`` with ``val``) whose header carries ``dx_lines``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    val = rng.integers(-300, 300, size=(2, 500)).astype(np.int16)
    scipy.io.savemat(root / f"{rid}.mat", {"val": val})
    lines = [f"{rid} 2 500 500"]
    for i, lead in enumerate(("I", "II")):
        checksum = int(val[i].astype(np.int64).sum()) % 65536
        lines.append(f"{rid}.mat 16+24 1000/mV 16 0 {int(val[i, 0])} {checksum} 0 {lead}")
    lines += ["# Age: 50", "# Sex: Male", dx_lines, "# Rx: Unknown"]
    hea = root / f"{rid}.hea"
    hea.write_text("\n".join(lines) + "\n")
    return hea


# --- 1. default label columns -----------------------------------------------------------------------------------


def test_several_default_text_columns_are_refused_naming_the_file_and_columns(tmp_path):
    """``diagnosis,site,device,set`` with label_columns unset gave labels ('AF', 'Boston', 'GE MAC', 'train')."""
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("record_id,diagnosis,site,device,set\na1,AF,Boston,GE MAC,train\n"
                                     "a2,Normal,Berlin,Philips,test\na3,AF,Boston,GE MAC,val\n")
    with pytest.raises(ECGDataError, match=r"labels\.csv: 4 columns hold text .*'diagnosis', 'site', 'device', "
                                           r"'set'.*label_columns") as err:
        FolderSource(root, labels_csv="labels.csv")
    assert "label_columns=['diagnosis']" in str(err.value)
    src = FolderSource(root, labels_csv="labels.csv", label_columns=["diagnosis"])   # named: accepted
    assert src.load("a1").labels == ("AF",) and src.load("a2").labels == ("Normal",)


def test_flags_and_one_default_text_column_are_still_taken_and_logged(tmp_path, caplog):
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("record_id,age,AF,MI,note\na1,40,1,0,x\na2,50,0,1,\na3,,0,0,y\n")
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root, labels_csv="labels.csv")
    assert src.label_columns == ["AF", "MI", "note"]
    assert src.load("a1").labels == ("AF", "x") and src.load("a2").labels == ("MI",)
    assert any("label columns ['AF', 'MI', 'note']" in r.getMessage() for r in caplog.records), caplog.text


# --- 2. challenge '# Dx:' codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["# Dx: 164889003,426783006", "# Dx: 164889003 426783006",
                                  "# Dx: 164889003;426783006", "# Dx: 164889003, 426783006",
                                  "# Dx: 164889003.0,426783006"])
def test_dx_codes_are_split_on_comma_semicolon_and_space_and_floats_are_integers(tmp_path, line):
    _challenge_record(tmp_path / "c", "E00001", line)
    rec = Challenge2021Source(tmp_path / "c").load("E00001")
    assert rec.labels == ("164889003", "426783006")
    assert rec.meta["dx_raw"] == ["164889003", "426783006"]


def test_a_float_spelling_of_a_code_is_the_same_class_as_the_integer(tmp_path):
    _challenge_record(tmp_path / "c", "E00001", "# Dx: 67741000119109.0")
    _challenge_record(tmp_path / "c", "E00002", "# Dx: 67741000119109")
    src = Challenge2021Source(tmp_path / "c")
    assert src.load("E00001").labels == src.load("E00002").labels == ("67741000119109",)


def test_a_dx_code_that_is_not_a_number_is_refused_naming_the_header_and_code(tmp_path):
    hea = _challenge_record(tmp_path / "c", "E00001", "# Dx: sinus bradycardia")
    src = Challenge2021Source(tmp_path / "c")
    with pytest.raises(ECGDataError, match=r"E00001\.hea: '# Dx:' code 'sinus' .*not a SNOMED CT code") as err:
        src.load("E00001")
    assert str(hea) in str(err.value)


# --- 3. folder labels CSV cells ---------------------------------------------------------------------------------


def test_yes_no_flags_are_one_and_zero(tmp_path):
    """A yes/no column was read as class names: 'no' became a positive class."""
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("record_id,af\na1,yes\na2,No\na3,\n")
    src = FolderSource(root, labels_csv="labels.csv")
    assert [src.load(r).labels for r in ("a1", "a2", "a3")] == [("af",), (), ()]
    assert [src.load(r).meta["labels_known"] for r in ("a1", "a2", "a3")] == [True, True, False]


def test_number_like_patient_ids_are_one_patient(tmp_path):
    """Patient '12' and '12.0' were two patients, so a patient-level split could put one patient on both sides."""
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("record_id,patient_id,af\na1,12,1\na2,12.0,0\na3,P013,1\n")
    src = FolderSource(root, labels_csv="labels.csv")
    assert [src.load(r).patient_id for r in ("a1", "a2", "a3")] == ["12", "12", "P013"]


def test_a_comma_in_a_class_name_cell_is_warned_about(tmp_path, caplog):
    """A quoted "AF,RBBB" became one class without a word; ';' separates classes."""
    root = _folder(tmp_path)
    (root / "labels.csv").write_text('record_id,dx\na1,"AF,RBBB"\na2,Normal\na3,AF;RBBB\n')
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root, labels_csv="labels.csv")
    assert src.load("a1").labels == ("AF,RBBB",) and src.load("a3").labels == ("AF", "RBBB")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("labels.csv" in m and "'dx'" in m and "line 2" in m and "';'" in m for m in warned), warned


def test_flag_cells_written_as_decimals_are_flags(tmp_path):
    """'1.00' was refused as a number other than 0/1."""
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("record_id,af\na1,1.00\na2,0.00\n")
    src = FolderSource(root, labels_csv="labels.csv")
    assert src.load("a1").labels == ("af",) and src.load("a2").labels == ()


@pytest.mark.parametrize("label_columns", [None, ["af"]])
def test_a_nan_flag_cell_is_a_missing_value_naming_line_and_column(tmp_path, label_columns):
    """'NaN' among 0/1 flags was called a number other than 0/1 (or, with the column named, made 'NaN' a class)."""
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("record_id,af\na1,1\na2,NaN\na3,0\n")
    with pytest.raises(ECGDataError, match=r"labels\.csv: line 3, column 'af': missing value 'NaN'.*leave the cell "
                                           r"empty"):
        FolderSource(root, labels_csv="labels.csv", label_columns=label_columns)


# --- 4. CPSC 2018 REFERENCE.csv --------------------------------------------------------------------------------


def test_cpsc2018_reference_with_a_bom_and_no_header_keeps_the_first_record(tmp_path):
    from ecgfm.evaluate.tasks import _cpsc2018_codes

    ref = tmp_path / "REFERENCE.csv"
    ref.write_bytes(b"\xef\xbb\xbfA0001,1,,\nA0002,2,3,\n")
    assert _cpsc2018_codes(str(ref)) == {"A0001": ["426783006"], "A0002": ["164889003", "270492004"]}
    ref.write_bytes("Recording,First_label,Second_label,Third_label\nA0001,1,,\n".encode("utf-16"))
    assert _cpsc2018_codes(str(ref)) == {"A0001": ["426783006"]}


def test_cpsc2018_reference_in_another_encoding_is_an_error_naming_the_file(tmp_path):
    from ecgfm.evaluate.tasks import _cpsc2018_codes

    ref = tmp_path / "REFERENCE.csv"
    ref.write_bytes("Recording,First_label,Second_label,Third_label\nA0001,1,,\nA0002,r\xe9sum\xe9,,\n"
                    .encode("latin-1"))
    with pytest.raises(ECGDataError, match=r"REFERENCE\.csv: line 3: .*not valid utf-8"):
        _cpsc2018_codes(str(ref))
