"""Reader review (2026-12-07): four ways a reader returned wrong labels or positions with exit status 0."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecgfm.data.readers import FolderSource, get_source, read_label_table
from ecgfm.data.record import ECGDataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_a_quoted_cell_after_comma_space_loses_its_quotes(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('record_id, patient, diagnosis\nr1, "P1", "AF"\nr2, P1, AF\nr3, "P2", "AF;RBBB"\n')
    rows = read_label_table(path, id_column="record_id").rows
    assert [rows[r]["diagnosis"] for r in ("r1", "r2", "r3")] == ["AF", "AF", "AF;RBBB"]   # was '"AF"', ...
    assert rows["r1"]["patient"] == rows["r2"]["patient"] == "P1"                          # one patient, not two


def test_spaces_around_closing_quotes_read_as_before(tmp_path):
    """The quote check must not refuse what the lenient reader always read (a final review: strict parsing refused
    a space after a closing quote)."""
    path = tmp_path / "labels.csv"
    path.write_text('record_id,diagnosis,note\n"r1" ,AF,"a, b"\nr2,"NORM" \t,"say ""hi"""\n')
    rows = read_label_table(path, id_column="record_id").rows
    assert rows["r1"]["diagnosis"] == "AF" and rows["r2"]["diagnosis"] == "NORM"
    assert rows["r1"]["note"] == "a, b" and rows["r2"]["note"] == 'say "hi"'


def test_an_unclosed_quote_is_an_error_not_one_cell_swallowing_the_rest(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('record_id,diagnosis\nr1,"AF\nr2,NORM\nr3,RBBB\n')
    with pytest.raises(ECGDataError, match=r"labels.csv.*malformed CSV.*quote opened on line 2 is never closed"):
        read_label_table(path, id_column="record_id")


def test_rename_leads_keys_match_names_whatever_their_case(tmp_path):
    sig = np.random.default_rng(0).standard_normal((3000, 2)) * 0.5
    wfdb.wrsamp("rec", fs=300, units=["mV", "mV"], sig_name=["ecg", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    rec = FolderSource(tmp_path, rename_leads={"ECG": "I"}).load("rec")
    assert rec.present_leads == ("I", "II") and rec.header["lead_renamed"] == {"ecg": "I"}   # 'ecg' was dropped
    with pytest.raises(ECGDataError, match="different leads"):
        FolderSource(tmp_path, rename_leads={"ECG": "I", "ecg": "V1"}).load("rec")


@pytest.mark.realdata
def test_annotations_stored_at_another_rate_are_rescaled_to_the_record(tmp_path):
    src = SHARED / "cpsc2021"
    if not (src / "data_21_7.atr").exists():
        pytest.skip(f"shared CPSC 2021 record missing: {src}")
    for ext in ("hea", "dat"):
        shutil.copy(src / f"data_21_7.{ext}", tmp_path)
    ref = wfdb.rdann(str(src / "data_21_7"), "atr")
    # the same beats at a 100 Hz time resolution (the record is 200 Hz), as WFDB allows
    wfdb.wrann("data_21_7", "atr", sample=np.asarray(ref.sample) // 2, symbol=list(ref.symbol), fs=100,
               aux_note=list(ref.aux_note), write_dir=str(tmp_path))
    theirs = get_source("cpsc2021", root=tmp_path).load("data_21_7").annotations["r_peaks"]
    ours = get_source("cpsc2021", root=src).load("data_21_7").annotations["r_peaks"]
    assert len(theirs) == len(ours) and np.abs(theirs - ours).max() <= 1     # was half of each position


def test_cpsc2018_reference_with_an_unclosed_quote_is_refused(tmp_path):
    from ecgfm.evaluate.tasks import _cpsc2018_codes

    path = tmp_path / "REFERENCE.csv"
    path.write_text('Recording,First_label,Second_label,Third_label\nA0001,"1,,\nA0002,2,,\nA0003,3,,\n')
    with pytest.raises(ECGDataError, match="malformed CSV"):
        _cpsc2018_codes(str(path))
    path.write_text('Recording,First_label,Second_label,Third_label\nA0001,1,,\nA0002, "2",,\n')
    codes = _cpsc2018_codes(str(path))
    assert len(codes["A0002"]) == 1 and codes["A0002"] != codes["A0001"]      # '"2"' was refused as a class


def test_mitbih_records_without_annotations_are_named_when_left_out(tmp_path, caplog):
    sig = np.random.default_rng(0).standard_normal((3600, 2)) * 0.5
    for name in ("100", "101"):
        wfdb.wrsamp(name, fs=360, units=["mV", "mV"], sig_name=["MLII", "V1"], p_signal=sig, fmt=["212", "212"],
                    write_dir=str(tmp_path))
    wfdb.wrann("100", "atr", sample=np.arange(100, 3500, 300), symbol=["N"] * 12, write_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        src = get_source("mitbih", root=tmp_path)
    assert src.record_ids() == ["100"]
    assert any("without an .atr" in r.getMessage() and "101" in r.getMessage() for r in caplog.records)
