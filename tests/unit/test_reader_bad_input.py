"""Broken copies of real records: every reader error is an ECGDataError naming the file and the problem."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm.data.readers import (
    CinC2017Source,
    CPSC2018Source,
    CPSC2021Source,
    FolderSource,
    PTBXLSource,
    read_challenge,
    read_cpsc2018,
    read_wfdb,
)
from ecgfm.data.record import ECGDataError


def _copy_ptbxl(fixture_dir: Path, tmp_path: Path, name: str = "00001_lr") -> Path:
    for ext in ("hea", "dat"):
        shutil.copy(fixture_dir / "ptbxl" / "records100" / "00000" / f"{name}.{ext}", tmp_path)
    return tmp_path / f"{name}.hea"


def _copy_challenge(fixture_dir: Path, tmp_path: Path, name: str = "HR06000") -> Path:
    for ext in ("hea", "mat"):
        shutil.copy(fixture_dir / "cinc2021" / f"{name}.{ext}", tmp_path)
    return tmp_path / f"{name}.hea"


def _edit(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text, (old, text[:200])
    path.write_text(text.replace(old, new, count))


def _raises(path_part: str | Path, problem: str, fn, *args, **kwargs) -> ECGDataError:
    """Call ``fn`` and check the ECGDataError names ``path_part`` and matches ``problem``."""
    with pytest.raises(ECGDataError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert str(path_part) in err.path, (err.path, path_part)
    assert re.search(problem, err.problem), err.problem
    assert str(err).startswith(err.path)
    return err


# ----------------------------------------------------------------------------------------- files


def test_missing_header(tmp_path):
    _raises(tmp_path / "nothing.hea", "header file not found", read_wfdb, tmp_path / "nothing")


def test_header_naming_a_missing_dat(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    (tmp_path / "00001_lr.dat").unlink()
    err = _raises("00001_lr.hea", "signal file '00001_lr.dat' named in the header is missing", read_wfdb, hea)
    assert str(tmp_path / "00001_lr.dat") in err.problem


def test_truncated_dat(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    dat = tmp_path / "00001_lr.dat"
    dat.write_bytes(dat.read_bytes()[:12345])
    _raises(dat, r"truncated signal file: 12345 bytes, but the header 00001_lr.hea needs 24000", read_wfdb, hea)


def test_truncated_second_signal_file(fixture_dir, tmp_path):
    """PTB Diagnostic keeps the Frank leads in a second file (.xyz): its truncation is caught too."""
    for ext in ("hea", "dat", "xyz"):
        shutil.copy(fixture_dir / "ptbdb" / f"s0010_re.{ext}", tmp_path)
    xyz = tmp_path / "s0010_re.xyz"
    xyz.write_bytes(xyz.read_bytes()[:1000])
    _raises(xyz, "truncated signal file", read_wfdb, tmp_path / "s0010_re")


def test_truncated_format_212_is_caught_before_wfdb(tmp_path):
    sig = np.sin(np.linspace(0, 20, 2000))[:, None].repeat(2, axis=1)
    wfdb.wrsamp("m", fs=360, units=["mV", "mV"], sig_name=["MLII", "V1"], p_signal=sig, fmt=["212", "212"],
                adc_gain=[200, 200], baseline=[0, 0], write_dir=str(tmp_path))
    dat = tmp_path / "m.dat"
    dat.write_bytes(dat.read_bytes()[:-30])
    _raises(dat, r"truncated signal file: \d+ bytes, but the header m.hea needs 6000 \(format 212", read_wfdb,
            tmp_path / "m")


# -------------------------------------------------------------------------------------- header values


@pytest.mark.parametrize("fs", ["0", "-100", "nan", "inf", "1e9", "abc"])
def test_impossible_sampling_rate(fixture_dir, tmp_path, fs):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "00001_lr 12 100 1000", f"00001_lr 12 {fs} 1000")
    _raises(hea, f"impossible sampling rate '{re.escape(fs)}' Hz", read_wfdb, hea)


@pytest.mark.parametrize("gain", ["-1000", "nan", "inf", "x"])   # 0 is "uncalibrated" (200 adu/mV): read
def test_impossible_gain(fixture_dir, tmp_path, gain):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "16 1000.0(0)/mV 16 0 -69 63827 0 V1", f"16 {gain}(0)/mV 16 0 -69 63827 0 V1")
    _raises(hea, f"impossible ADC gain '{re.escape(gain)}' for V1", read_wfdb, hea)


def test_impossible_gain_in_challenge_header(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    _edit(hea, "1000.0(0)/mv", "-5(0)/mv", 1)
    _raises(hea, "impossible ADC gain '-5' for I", read_challenge, hea)


def test_zero_length_record_in_header(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "00001_lr 12 100 1000", "00001_lr 12 100 0")
    _raises(hea, "zero-length record", read_wfdb, hea)


def test_zero_length_record_from_empty_file(fixture_dir, tmp_path):
    """No length in the header (allowed: WFDB then uses the file size) and an empty signal file."""
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "00001_lr 12 100 1000", "00001_lr 12 100")
    (tmp_path / "00001_lr.dat").write_bytes(b"")
    _raises(hea, "zero-length record", read_wfdb, hea)


def test_all_nan_record(tmp_path):
    sig = np.full((500, 2), np.nan)
    wfdb.wrsamp("nan", fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                adc_gain=[200, 200], baseline=[0, 0], write_dir=str(tmp_path))
    assert np.isnan(wfdb.rdrecord(str(tmp_path / "nan")).p_signal).all()  # wfdb reads it back as NaN
    _raises(tmp_path / "nan.hea", "every sample of every signal is NaN", read_wfdb, tmp_path / "nan")


def test_partly_nan_record_is_kept(tmp_path):
    sig = np.sin(np.linspace(0, 20, 500))[:, None].repeat(2, axis=1)
    sig[100:200, 1] = np.nan
    wfdb.wrsamp("part", fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                adc_gain=[200, 200], baseline=[0, 0], write_dir=str(tmp_path))
    rec = read_wfdb(tmp_path / "part")
    assert np.isnan(rec.signal[1, 100:200]).all() and not np.isnan(rec.signal[0]).any()


def test_unknown_lead_name(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, " 0 V6", " 0 FOO")
    _raises(hea, "unknown lead name 'FOO'", read_wfdb, hea)


def test_duplicated_lead(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, " 0 V6", " 0 V5")
    _raises(hea, "lead V5 appears twice", read_wfdb, hea)


def test_units_that_are_not_a_voltage(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "/mV 16 0 -119 1508 0 I", "/mmHg 16 0 -119 1508 0 I")
    _raises(hea, "lead 'I' has units 'mmHg', which are not a voltage", read_wfdb, hea)


@pytest.mark.parametrize("old,new,problem", [
    ("00001_lr 12 100 1000", "00001_lr 13 100 1000", "announces 13 signals but has 12 signal lines"),
    ("00001_lr 12 100 1000", "00001_lr/2 12 100 1000", "multi-segment"),
    ("00001_lr 12 100 1000", "00001_lr twelve 100 1000", "number of signals 'twelve'"),
    ("00001_lr 12 100 1000", "00001_lr 12 100 1e3x", "number of samples '1e3x'"),
    ("00001_lr.dat 16 1000.0(0)/mV 16 0 -119", "00001_lr.dat 16q 1000.0(0)/mV 16 0 -119", "storage format '16q'"),
    ("00001_lr.dat 16 1000.0(0)/mV 16 0 -119", "00001_lr.dat 99 1000.0(0)/mV 16 0 -119", "unsupported WFDB storage"),
])
def test_malformed_header_lines(fixture_dir, tmp_path, old, new, problem):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, old, new, 1)
    _raises(tmp_path / "00001_lr", re.escape(problem), read_wfdb, hea)


# ------------------------------------------------------------------------------------------ .mat


def test_unreadable_mat(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    mat = tmp_path / "HR06000.mat"
    mat.write_bytes(b"this is not a MATLAB file at all" * 10)
    _raises(mat, "unreadable or corrupt .mat file", read_challenge, hea)


def test_truncated_mat(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    mat = tmp_path / "HR06000.mat"
    mat.write_bytes(mat.read_bytes()[:5000])
    _raises(mat, "unreadable or corrupt .mat file", read_challenge, hea)


def test_missing_mat(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    (tmp_path / "HR06000.mat").unlink()
    _raises(hea, "signal file 'HR06000.mat' named in the header is missing", read_challenge, hea)


def test_mat_shape_disagrees_with_header(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    _edit(hea, "HR06000 12 500 5000", "HR06000 12 500 6000")
    _raises(tmp_path / "HR06000.mat", "'val' has 5000 samples but the header HR06000.hea announces 6000",
            read_challenge, hea)
    scipy.io.savemat(tmp_path / "HR06000.mat", {"val": np.zeros((3, 6000), np.int16)}, format="4")
    _raises(tmp_path / "HR06000.mat", "'val' has 3 rows but the header HR06000.hea lists 12 signals",
            read_challenge, hea)
    scipy.io.savemat(tmp_path / "HR06000.mat", {"other": np.zeros((12, 6000), np.int16)}, format="4")
    _raises(tmp_path / "HR06000.mat", "holds no 'val' array", read_challenge, hea)


def test_mat_val_unsigned_or_outside_int16_is_refused(fixture_dir, tmp_path):
    """Format 16 is signed: a uint16 ``val`` (negative samples read as ~+65 mV) or a wider array holding a value
    outside -32768..32767 is refused even though the 16-bit header checksums still match."""
    hea = _copy_challenge(fixture_dir, tmp_path)
    mat = tmp_path / "HR06000.mat"
    val = scipy.io.loadmat(mat)["val"]
    assert val.dtype == np.int16 and val.min() < 0
    scipy.io.savemat(mat, {"val": val.astype(np.uint16)}, format="4")
    _raises(mat, r"'val' is unsigned \(uint16\), but the header HR06000.hea declares format 16", read_challenge, hea)
    wide = val.astype(np.int32)
    r, c = np.unravel_index(np.argmin(wide), wide.shape)
    wide[r, c] += 65536                                  # same sum modulo 2**16: the checksum alone cannot see it
    scipy.io.savemat(mat, {"val": wide}, format="4")
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]   # the header's order
    _raises(mat, rf"1 value\(s\) outside the signed 16-bit range .* e.g. {wide[r, c]} in {leads[r]} at sample {c}",
            read_challenge, hea)
    scipy.io.savemat(mat, {"val": val}, format="4")      # the original reads
    assert read_challenge(hea).header["checksum"] == "verified"


def test_cpsc2018_integer_data_or_text_age_is_refused(tmp_path):
    data = np.random.default_rng(0).normal(size=(12, 500))
    scipy.io.savemat(tmp_path / "A1.mat", {"ECG": {"sex": "Male", "age": 61, "data": (data * 1000).astype(np.int16)}})
    _raises(tmp_path / "A1.mat", "ECG.data is int16: CPSC 2018 stores millivolts as floating-point", read_cpsc2018,
            tmp_path / "A1.mat")
    scipy.io.savemat(tmp_path / "A2.mat", {"ECG": {"sex": "Male", "age": "61", "data": data}})
    _raises(tmp_path / "A2.mat", r"ECG.age must be a number, got '61'", read_cpsc2018, tmp_path / "A2.mat")
    scipy.io.savemat(tmp_path / "A3.mat", {"ECG": {"sex": "Male", "age": 61, "data": data}})
    assert read_cpsc2018(tmp_path / "A3.mat").meta == {"age": 61.0, "sex": "M"}


@pytest.mark.parametrize("likelihood", ["'high'", "None", "'100'"])
def test_ptbxl_scp_likelihood_not_a_number(fixture_dir, tmp_path, likelihood):
    from ecgfm.data.readers import load_ptbxl_table

    text = (fixture_dir / "ptbxl" / "ptbxl_database.csv").read_text()
    assert "{'NORM': 100.0" in text.splitlines()[1]
    (tmp_path / "ptbxl_database.csv").write_text(text.replace("{'NORM': 100.0", f"{{'NORM': {likelihood}", 1))
    _raises(tmp_path / "ptbxl_database.csv", rf"ecg_id 1: scp_codes likelihood of 'NORM' is {likelihood}, not a "
                                             rf"finite number", load_ptbxl_table, tmp_path)


def test_cpsc2018_bad_files(tmp_path):
    (tmp_path / "A1.mat").write_bytes(b"garbage" * 50)
    _raises(tmp_path / "A1.mat", "unreadable or corrupt .mat file", read_cpsc2018, tmp_path / "A1.mat")
    scipy.io.savemat(tmp_path / "A2.mat", {"data": np.zeros((12, 10))})
    _raises(tmp_path / "A2.mat", "expected a MATLAB struct 'ECG'", read_cpsc2018, tmp_path / "A2.mat")
    scipy.io.savemat(tmp_path / "A3.mat", {"ECG": {"data": np.zeros((8, 10)), "age": 3, "sex": "M"}})
    _raises(tmp_path / "A3.mat", r"12 x N array, got float64 \(8, 10\)", read_cpsc2018, tmp_path / "A3.mat")
    scipy.io.savemat(tmp_path / "A4.mat", {"ECG": {"data": np.full((12, 10), np.nan), "age": 3, "sex": "M"}})
    _raises(tmp_path / "A4.mat", "NaN", CPSC2018Source(tmp_path).load, "A4")
    _raises(tmp_path / "A9.mat", "file not found", read_cpsc2018, tmp_path / "A9")


# ------------------------------------------------------------------------------------- sources


def test_cinc2017_bad_reference(tmp_path):
    scipy.io.savemat(tmp_path / "A00001.mat", {"val": np.zeros((1, 300), np.int16)}, format="4")
    (tmp_path / "A00001.hea").write_text("A00001 1 300 300\nA00001.mat 16+24 1000/mV 16 0 0 0 0 ECG\n")
    _raises(tmp_path / "REFERENCE.csv", "REFERENCE.csv not found", CinC2017Source, tmp_path)
    (tmp_path / "REFERENCE.csv").write_text("A00001,N\nA00002,X\n")
    _raises(tmp_path / "REFERENCE.csv", r"line 2: expected 'record,label'", CinC2017Source, tmp_path)


def test_cinc2017_reference_rows_without_a_record_are_warned(tmp_path, caplog):
    for name in ("A00001", "A00002"):
        scipy.io.savemat(tmp_path / f"{name}.mat", {"val": np.zeros((1, 300), np.int16)}, format="4")
        (tmp_path / f"{name}.hea").write_text(f"{name} 1 300 300\n{name}.mat 16+24 1000/mV 16 0 0 0 0 ECG\n")
    (tmp_path / "REFERENCE.csv").write_text("A00001,N\nA00002,A\n")
    with caplog.at_level("WARNING", logger="ecgfm.data.readers"):
        CinC2017Source(tmp_path)
    assert not caplog.records                                            # complete: no word
    (tmp_path / "REFERENCE.csv").write_text("A00001,N\nA00002,A\nA00007,O\nA00009,N\n")
    with caplog.at_level("WARNING", logger="ecgfm.data.readers"):
        src = CinC2017Source(tmp_path)
    assert src.record_ids() == ["A00001", "A00002"]                     # behaviour kept: listed as before
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "2 labelled row(s) of REFERENCE.csv have no record" in msg and "A00007, A00009" in msg
    assert str(tmp_path) in msg


def test_ptbxl_rows_without_a_signal_file_are_warned(fixture_dir, tmp_path, caplog):
    root = tmp_path / "ptbxl"
    shutil.copytree(fixture_dir / "ptbxl", root)
    with caplog.at_level("WARNING", logger="ecgfm.data.readers"):
        full = PTBXLSource(root, fs=100, include_unlabelled=False)
    assert not caplog.records
    test_ids = sorted(r for r, f in full.folds().items() if f == 10)[:3]
    for rid in test_ids:                                                 # a partial download
        for ext in ("hea", "dat"):
            (root / "records100" / "00000" / f"{rid}_lr.{ext}").unlink()
    with caplog.at_level("WARNING", logger="ecgfm.data.readers"):
        src = PTBXLSource(root, fs=100, include_unlabelled=False)
    assert len(src) == len(full) - 3                                    # behaviour kept: left out
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "3 labelled row(s) of ptbxl_database.csv have no 100 Hz signal file" in msg
    assert ", ".join(test_ids) in msg and str(root / "records100") in msg


def test_ptbxl_bad_metadata(fixture_dir, tmp_path):
    root = tmp_path / "ptbxl"
    root.mkdir()
    (root / "records100").symlink_to(fixture_dir / "ptbxl" / "records100", target_is_directory=True)
    lines = (fixture_dir / "ptbxl" / "ptbxl_database.csv").read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("{'NORM': 100.0", "{'NORM': 100.0 oops")
    (root / "ptbxl_database.csv").write_text("".join(lines))
    _raises(root / "ptbxl_database.csv", "ecg_id 3: scp_codes", PTBXLSource, root)
    _raises(tmp_path / "empty" / "records100", "record folder for 100 Hz not found", PTBXLSource,
            tmp_path / "empty")
    (root / "ptbxl_database.csv").unlink()
    _raises(root / "ptbxl_database.csv", "needed with include_unlabelled=False", PTBXLSource, root,
            include_unlabelled=False)


def test_cpsc2021_missing_class(fixture_dir, tmp_path):
    for ext in ("hea", "dat", "atr"):
        shutil.copy(fixture_dir / "cpsc2021" / f"data_21_7.{ext}", tmp_path)
    _edit(tmp_path / "data_21_7.hea", "# non atrial fibrillation", "# something else")
    _raises("data_21_7.hea", "no CPSC 2021 record class", CPSC2021Source(tmp_path).load, "data_21_7")


@pytest.fixture
def folder(fixture_dir, tmp_path) -> Path:
    root = tmp_path / "f"
    root.mkdir()
    for i in (1, 2):
        for ext in ("hea", "dat"):
            shutil.copy(fixture_dir / "ptbxl" / "records100" / "00000" / f"0000{i}_lr.{ext}", root)
    return root


def test_folder_labels_csv_missing(folder):
    _raises("nope.csv", "labels CSV not found", FolderSource, folder, labels_csv="nope.csv")


def test_folder_id_column_missing(folder):
    (folder / "l.csv").write_text("name,AF\n00001_lr,1\n")
    _raises("l.csv", r"id column 'record_id' not found; columns are \['name', 'AF'\]", FolderSource, folder,
            labels_csv=folder / "l.csv")


def test_folder_label_column_missing(folder):
    (folder / "l.csv").write_text("record_id,AF\n00001_lr,1\n")
    _raises("l.csv", r"label column\(s\) \['MI'\] not found", FolderSource, folder, labels_csv=folder / "l.csv",
            label_columns=["MI"])
    _raises("l.csv", "patient column 'pid' not found", FolderSource, folder, labels_csv=folder / "l.csv",
            patient_column="pid")


def test_folder_csv_ids_not_found(folder):
    (folder / "l.csv").write_text("record_id,AF\n00001_lr,1\nghost,0\n00009_lr,1\n")
    err = _raises("l.csv", r"2 id\(s\) in the CSV match no record", FolderSource, folder,
                  labels_csv=folder / "l.csv")
    assert "'ghost'" in err.problem and "'00009_lr'" in err.problem


def test_folder_duplicated_ids(folder):
    (folder / "l.csv").write_text("record_id,AF\n00001_lr,1\n00002_lr,0\n00001_lr,0\n")
    _raises("l.csv", r"duplicate id '00001_lr' in column 'record_id': lines 2 and 4", FolderSource, folder,
            labels_csv=folder / "l.csv")


def test_folder_without_records(tmp_path):
    _raises(tmp_path, "no WFDB records", FolderSource, tmp_path)
    _raises(tmp_path / "missing", "record folder not found", FolderSource, tmp_path / "missing")


def test_folder_source_reports_the_broken_record(folder):
    (folder / "00002_lr.dat").write_bytes(b"\x00" * 10)
    src = FolderSource(folder)
    assert src.load("00001_lr").signal.shape == (12, 1000)
    _raises("00002_lr.dat", "truncated", src.load, "00002_lr")


def _cpsc2021_like(root, rid: str, cls: str, samples, symbols, aux=None):
    """A 2-lead 200 Hz, 2,000-sample CPSC 2021-style record with the given annotations (written by wfdb)."""
    root.mkdir(exist_ok=True)
    sig = np.sin(np.linspace(0, 60, 2000))[:, None].repeat(2, 1)
    wfdb.wrsamp(rid, fs=200, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(root), comments=[cls])
    wfdb.wrann(rid, "atr", np.asarray(samples), symbol=list(symbols), aux_note=aux, write_dir=str(root))


def test_cut_off_or_foreign_annotation_files_are_refused(tmp_path):
    """``wfdb.rdann`` reads a cut-off .atr until its bytes run out (lost beats, an AF episode left open to the end
    of the record); annotations beyond the record (another record's file) were clipped into it; AF episodes that
    contradict the header class were taken as they came."""
    from ecgfm.data.readers import CPSC2021Source

    root = tmp_path / "c21"
    beats = list(range(100, 1900, 150))
    _cpsc2021_like(root, "data_1_1", "non atrial fibrillation", beats, "N" * len(beats))
    assert len(CPSC2021Source(root).load("data_1_1").annotations["r_peaks"]) == len(beats)
    atr = root / "data_1_1.atr"
    atr.write_bytes(atr.read_bytes()[:-3])                                   # cut off: no end-of-file marker
    with pytest.raises(ECGDataError, match="end-of-file marker"):
        CPSC2021Source(root).load("data_1_1")
    _cpsc2021_like(root, "data_1_1", "non atrial fibrillation", beats + [5000], "N" * (len(beats) + 1))
    with pytest.raises(ECGDataError, match="annotations at samples 100..5000 but the record has 2000"):
        CPSC2021Source(root).load("data_1_1")
    _cpsc2021_like(root, "data_1_1", "non atrial fibrillation", [100, 400, 900], "+N+",
                   aux=["(AFIB", "", "(N"])
    with pytest.raises(ECGDataError, match="1 AF episode.*header says 'non_af'"):
        CPSC2021Source(root).load("data_1_1")
    _cpsc2021_like(root, "data_1_1", "paroxysmal atrial fibrillation", beats, "N" * len(beats))
    with pytest.raises(ECGDataError, match="0 AF episode.*'paroxysmal_af'"):
        CPSC2021Source(root).load("data_1_1")

def test_ptbxl_ecg_id_in_two_folders_is_refused(fixture_dir, tmp_path):
    from ecgfm.data.readers import PTBXLSource

    root = tmp_path / "ptbxl"
    shutil.copytree(fixture_dir / "ptbxl", root)
    (root / "records100" / "99999").mkdir()
    for ext in ("hea", "dat"):
        shutil.copy(root / "records100" / "00000" / f"00001_lr.{ext}", root / "records100" / "99999")
    with pytest.raises(ECGDataError, match="ecg_id 1 appears twice"):
        PTBXLSource(root, fs=100)


@pytest.mark.parametrize("column, value, problem", [
    ("strat_fold", "3.7", "strat_fold 3.7 is not a whole number 1-10"),       # was read as fold 3
    ("strat_fold", "11", "strat_fold 11 is not a whole number 1-10"),         # was kept: a fold no split reads
    ("strat_fold", "0", "strat_fold 0 is not a whole number 1-10"),
    ("strat_fold", "x", "strat_fold x is not a whole number 1-10"),           # was no fold: no split at all
    ("age", "-5", "age -5(.0)? is not a non-negative number"),                   # the header path refuses it
    ("age", "old", "age old is not a non-negative number"),
    ("sex", "2", "sex 2 is not 0 \\(male\\) / 1 \\(female\\)"),                # was read as unknown
])
def test_ptbxl_cells_that_would_be_changed_silently_are_refused(fixture_dir, tmp_path, column, value, problem):
    """A damaged or hand-edited ptbxl_database.csv moved records between splits (or out of them) without a word."""
    import csv

    from ecgfm.data.readers import load_ptbxl_table

    with open(fixture_dir / "ptbxl" / "ptbxl_database.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[1][rows[0].index(column)] = value
    with open(tmp_path / "ptbxl_database.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    _raises(tmp_path / "ptbxl_database.csv", f"ecg_id 1: {problem}", load_ptbxl_table, tmp_path)
    for ok in ("", "300" if column == "age" else "1"):      # empty = unknown; PTB-XL writes age 300 above 89
        rows[1][rows[0].index(column)] = ok
        with open(tmp_path / "ptbxl_database.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        assert len(load_ptbxl_table(tmp_path)) == 100
