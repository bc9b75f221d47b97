"""Review s15 of the record readers (ecgfm.data.readers.formats, ptbxl, record, api.load_record).

* a record several hours long took ~13-15x its file size in memory (int -> int64 -> float64 -> float32 copies of the
  whole record), and nothing refused a record too long to convert;
* ``load_record`` took any ``<name>.mat`` beside a header for a challenge record, refusing a valid WFDB record;
* the hint for an unknown lead name suggested mapping it to 'II' (pasted as is: ECG1 / I-ref read as lead II);
* a signal line without a description gave "unknown lead name ''";
* units written as words (volts, millivolts) were "not a voltage";
* a challenge ``.mat`` without ``val`` did not say what it holds, nor that a struct ``ECG`` is CPSC 2018; a transposed
  ``val`` was not called transposed;
* PTB-XL with include_unlabelled=false left out signal files without a metadata row without a word.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm.data.readers import FolderSource, PTBXLSource, WFDBFolderSource, read_challenge, read_wfdb
from ecgfm.data.readers import formats
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, map_leads

from tests.unit.test_reader_bad_input import _raises

FS = 250
L12 = list(CANONICAL_LEADS)


def _digital(n: int, n_sig: int, seed: int = 0, scale: float = 300.0) -> np.ndarray:
    """``(n, n_sig)`` int64 samples (wfdb's d_signal layout)."""
    return np.round(np.random.default_rng(seed).standard_normal((n, n_sig)) * scale).astype(np.int64)


def _write(folder: Path, name: str, d: np.ndarray, fmt: str = "16", gain: float = 200.0, baseline: int = 0,
           names: list[str] | None = None, units: str = "mV", spf: int = 1) -> Path:
    n_sig = d.shape[1]
    names = names or L12[:n_sig]
    kwargs = {"samps_per_frame": [spf] * n_sig} if spf > 1 else {}
    if fmt == "61":   # wfdb writes no format 61 (big-endian 16-bit): format 16 rewritten
        hea = _write(folder, name, d, "16", gain, baseline, names, units)
        d.astype(">i2").tofile(folder / f"{name}.dat")
        hea.write_text("\n".join(line.replace(f"{name}.dat 16 ", f"{name}.dat 61 ")
                                 for line in hea.read_text().splitlines()) + "\n")
        return hea
    if spf > 1:
        wfdb.wrsamp(name, fs=FS, units=[units] * n_sig, sig_name=names, e_d_signal=[d[:, i] for i in range(n_sig)],
                    fmt=[fmt] * n_sig, adc_gain=[gain] * n_sig, baseline=[baseline] * n_sig,
                    write_dir=str(folder), **kwargs)
    else:
        wfdb.wrsamp(name, fs=FS, units=[units] * n_sig, sig_name=names, d_signal=d, fmt=[fmt] * n_sig,
                    adc_gain=[gain] * n_sig, baseline=[baseline] * n_sig, write_dir=str(folder))
    return folder / f"{name}.hea"


def _skipped(out: Path) -> list[dict[str, str]]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------- 1. long records: memory
@pytest.mark.parametrize("fmt,gain,baseline,spf", [
    ("16", 200.0, 0, 1), ("16", 1000.0, -37, 1), ("61", 200.0, 5, 1), ("32", 123.4, 1000, 1), ("80", 20.0, 0, 1),
    ("212", 200.0, 12, 1), ("24", 200.0, 0, 1), ("16", 200.0, 0, 2),
])
def test_decoding_in_blocks_gives_the_values_of_the_whole_record_conversion(tmp_path, monkeypatch, fmt, gain,
                                                                            baseline, spf):
    """Samples are converted in blocks now; values agree with (digital - baseline) / gain computed in float64 over
    the whole record and rounded to float32 (the old path), and with wfdb's physical reading."""
    d = _digital(1001 * spf, 3, seed=1, scale=30.0 if fmt == "80" else 300.0)
    d = np.clip(d, -127, 127) if fmt == "80" else d
    d[17 * spf, 0] = formats._INVALID[fmt]                        # an invalid sample: NaN
    hea = _write(tmp_path, f"b{fmt}_{spf}", d, fmt=fmt, gain=gain, baseline=baseline, spf=spf)
    monkeypatch.setattr(formats, "_DECODE_BLOCK", 7)                # many blocks, the last one partial
    got = read_wfdb(hea).signal[:3]
    monkeypatch.setattr(formats, "_DECODE_BLOCK", 1 << 30)          # one block: the whole record at once
    whole = read_wfdb(hea).signal[:3]
    np.testing.assert_array_equal(got, whole)
    old = ((d.T.astype(np.int64) - float(baseline)) / gain)        # the old path: int64 -> float64 -> float32
    old[d.T == formats._INVALID[fmt]] = np.nan
    old = old.reshape(3, -1, spf).mean(axis=2).astype(np.float32)
    np.testing.assert_allclose(got, old, rtol=1e-6, atol=0, equal_nan=True)
    ref = wfdb.rdrecord(str(hea.with_suffix("")), physical=True, return_res=64).p_signal.T
    finite = np.isfinite(old)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-6 if spf == 1 else 1 / gain)


def test_a_long_record_takes_a_few_times_its_file_size_to_read(tmp_path):
    """Format 16 took ~15x its file size at peak (int64 and float64 copies of the whole record); now the float32
    arrays (decoded signals, 12-lead layout) and the file's samples: ~4.5x."""
    d = _digital(400_000, 12, seed=2)
    hea = _write(tmp_path, "long", d)
    size = (tmp_path / "long.dat").stat().st_size
    read_wfdb(hea)                                                  # imports and caches out of the measure
    tracemalloc.start()
    try:
        rec = read_wfdb(hea)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rec.signal.shape == (12, 400_000)
    assert peak < 6 * size, f"peak {peak / size:.1f}x the file size"


def test_a_record_too_long_is_refused_before_its_samples_are_read(tmp_path, monkeypatch):
    hea = _write(tmp_path, "rec", _digital(3000, 2))
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * 2999)
    decode, calls = formats._decode_simple, []
    monkeypatch.setattr(formats, "_decode_simple", lambda *a: calls.append(a))
    err = _raises(hea, r"record of 0\.0 h \(3000 samples x 2 signals, ~0\.0 GB as float32 in the 12-lead layout\): "
                       r"too long to convert in one piece .*split it \(e\.g\. wfdb\.rdrecord sampfrom/sampto\)",
                  read_wfdb, hea)
    assert "MAX_RECORD_SAMPLES" in err.problem and not calls
    # a header that leaves the length to the file size: estimated from the file
    hea.write_text(hea.read_text().replace(f"rec 2 {FS} 3000", f"rec 2 {FS}"))
    _raises(hea, r"3000 samples x 2 signals", read_wfdb, hea)
    monkeypatch.setattr(formats, "_decode_simple", decode)
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * 3000)   # at the limit: read
    assert read_wfdb(hea).signal.shape == (12, 3000)


def test_the_size_guard_counts_every_sample_of_a_frame(tmp_path, monkeypatch):
    """With 4 samples per frame the decoder holds 4x the frames of every signal: a limit of 12 x frames let a
    record through that decoded 48 x frames values."""
    frames, k = 3000, 4
    wfdb.wrsamp("r", fs=250, units=["mV"] * 12, sig_name=L12, fmt=["16"] * 12, adc_gain=[200.0] * 12,
                baseline=[0] * 12, samps_per_frame=[k] * 12, write_dir=str(tmp_path),
                e_d_signal=[np.zeros(frames * k, np.int64) for _ in range(12)])
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * frames)
    _raises(tmp_path / "r.hea", r"3000 samples x 12 signals.*too long", read_wfdb, tmp_path / "r.hea")
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * k * frames)
    assert read_wfdb(tmp_path / "r.hea").signal.shape[0] == 12


def test_a_challenge_record_too_long_is_refused_before_its_mat_is_loaded(tmp_path, monkeypatch):
    val = _digital(3000, 12).T.astype(np.int16)
    scipy.io.savemat(tmp_path / "c.mat", {"val": val})
    lines = ["c 12 500 3000"] + [f"c.mat 16+24 1000/mV 16 0 0 0 0 {n}" for n in L12]
    (tmp_path / "c.hea").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * 2000)
    monkeypatch.setattr(formats.scipy.io, "loadmat", lambda *a, **k: pytest.fail("loadmat called"))
    _raises(tmp_path / "c.hea", r"3000 samples x 12 signals, ~0\.0 GB as float32\): too long", read_challenge,
            tmp_path / "c.hea")


def test_a_multi_segment_record_too_long_is_refused_by_its_master(tmp_path, monkeypatch):
    from tests.unit.test_reader_multisegment import _fixed

    hea, _expected = _fixed(tmp_path)                                   # 2000 samples over 3 segments
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * 1999)
    _raises(hea, r"record of 0\.0 h \(2000 samples x 3 signals.*too long to convert in one piece", read_wfdb, hea)


def test_conversion_skips_a_record_too_long_and_reports_it(tmp_path, monkeypatch):
    from ecgfm.data.cache import prepare_corpus

    src = tmp_path / "src"
    src.mkdir()
    _write(src, "short", _digital(1000, 12, seed=3))
    _write(src, "long", _digital(4000, 12, seed=4))
    monkeypatch.setattr(formats, "MAX_RECORD_SAMPLES", 12 * 2000)
    rep = prepare_corpus(FolderSource(src), tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (1, 1)
    (row,) = _skipped(tmp_path / "cache")
    assert row["record_id"] == "long" and row["path"] == str(src / "long.hea")
    assert "record of 0.0 h (4000 samples x 12 signals" in row["reason"] and "split it" in row["reason"]


# -------------------------------------------------------------------------- 2. load_record: the reader choice
def test_load_record_reads_a_wfdb_record_beside_an_unrelated_mat_file(tmp_path):
    from ecgfm.api import load_record

    d = _digital(1000, 12, seed=5)
    hea = _write(tmp_path, "r", d)
    scipy.io.savemat(tmp_path / "r.mat", {"ecg": np.zeros((2, 2))})   # not the record's: the header names r.dat
    sig, fs, leads = load_record(tmp_path / "r")
    assert fs == FS and leads == L12
    np.testing.assert_array_equal(sig, read_wfdb(hea).signal)
    # a challenge record (its header names the .mat) is still read from the .mat
    val = d.T.astype(np.int16)
    scipy.io.savemat(tmp_path / "c.mat", {"val": val})
    (tmp_path / "c.hea").write_text("\n".join([f"c 12 {FS} 1000"] + [f"c.mat 16+24 200/mV 16 0 0 0 0 {n}"
                                                                     for n in L12]) + "\n")
    sig, _fs, _leads = load_record(tmp_path / "c")
    np.testing.assert_array_equal(sig, read_challenge(tmp_path / "c").signal)


# -------------------------------------------------------------------------------- 3. unknown lead name: hint
def test_the_unknown_lead_hint_gives_a_placeholder_not_lead_ii(tmp_path):
    hea = _write(tmp_path, "e", _digital(500, 2), names=["ECG1", "ECG2"])
    err = _raises(hea, r"unknown lead name 'ECG1'", read_wfdb, hea)
    assert "rename_leads={'ECG1': '<standard lead, e.g. I, II, V1>'}" in err.problem
    assert "'II'}" not in err.problem and ":II}" not in err.problem
    assert "'+<preset>.rename_leads={ECG1:<lead>}' for prepare (<preset>: the sources=[...] entry that read it, " \
        "e.g. wfdb)" in err.problem   # read_wfdb's source: wfdb
    err = _raises(hea, r"unknown lead name 'ECG1'", FolderSource(tmp_path).load, "e")
    assert "e.g. folder)" in err.problem
    # the reader's own type is the example, not an instruction to switch to the folder preset
    err = _raises(hea, r"unknown lead name 'ECG1'", WFDBFolderSource(tmp_path).load, "e")
    assert "e.g. wfdb)" in err.problem and "e.g. folder" not in err.problem
    # a source that takes no rename_leads (PTB-XL, the challenges) gets no prepare hint it could not follow
    err = _raises(hea, r"unknown lead name 'ECG1'", read_wfdb, hea, source="ptbxl")
    assert "rename_leads={'ECG1': '<standard lead" in err.problem and "+folder" not in err.problem
    # an array names its rows itself: no rename_leads there
    with pytest.raises(ECGDataError, match=r"unknown lead name 'I-ref'.*name the row by that standard lead") as info:
        map_leads(np.zeros((1, 10), np.float32), ["I-ref"], "record 0")
    assert "rename_leads" not in str(info.value)


# ---------------------------------------------------------------------------------- 4. a signal with no name
def test_a_signal_without_a_name_is_named_by_its_position(tmp_path):
    hea = _write(tmp_path, "nn", _digital(500, 2))
    lines = hea.read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:8])                        # drop the description field of signal 1
    hea.write_text("\n".join(lines) + "\n")
    err = _raises(hea, r"signal 1 \(signal line 2 of 2\) has no name in the header", read_wfdb, hea)
    assert "unknown lead name" not in err.problem


# ------------------------------------------------------------------------------------------------- 5. units
@pytest.mark.parametrize("unit,factor", [("volts", 1e3), ("Volt", 1e3), ("millivolts", 1.0), ("mvolts", 1.0),
                                         ("microvolts", 1e-3), ("uvolt", 1e-3), ("nanovolts", 1e-6)])
def test_units_written_as_words_are_read(tmp_path, unit, factor):
    d = _digital(500, 2, seed=6)
    hea = _write(tmp_path, "w", d, gain=200.0, units=unit)
    got = read_wfdb(hea).signal[:2]
    np.testing.assert_allclose(got, (d.T / 200.0 * factor).astype(np.float32), rtol=1e-6)


def test_unknown_units_on_a_lead_are_unrecognised_not_a_non_voltage(tmp_path):
    hea = _write(tmp_path, "u", _digital(500, 2), units="mVx")
    err = _raises(hea, r"lead 'I' has unrecognised units 'mVx' \(voltage units read: mV, uV, V", read_wfdb, hea)
    assert "not a voltage;" not in err.problem
    hea = _write(tmp_path, "p", _digital(500, 2), units="mmHg")
    _raises(hea, r"lead 'I' has units 'mmHg', which are not a voltage", read_wfdb, hea)


# --------------------------------------------------------------------------------------------- 6. .mat files
def _challenge(folder: Path, name: str, content: dict, n_sig: int = 2, n: int = 1000) -> Path:
    scipy.io.savemat(folder / f"{name}.mat", content)
    lines = [f"{name} {n_sig} 500 {n}"] + [f"{name}.mat 16+24 1000/mV 16 0 0 0 0 {lead}" for lead in L12[:n_sig]]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.hea"


def test_a_mat_file_without_val_says_what_it_holds(tmp_path):
    hea = _challenge(tmp_path, "k", {"data": np.zeros((2, 1000), np.int16), "fs": 500})
    err = _raises(tmp_path / "k.mat", r"holds no 'val' array .* it holds 'data' \(int16 2x1000\), 'fs'",
                  read_challenge, hea)
    assert "cpsc2018" not in err.problem
    ecg = {"ECG": {"data": np.zeros((12, 1000)), "age": 50, "sex": "Male"}}
    hea = _challenge(tmp_path, "A0001", ecg, n_sig=12)
    _raises(tmp_path / "A0001.mat", r"holds no 'val' array .*'ECG' \(struct 1x1\).*original CPSC 2018 release.*"
                                    r"sources=\[cpsc2018\]", read_wfdb, hea)


def test_a_transposed_val_is_called_transposed(tmp_path):
    val = _digital(1000, 2).astype(np.int16)                            # samples x signals
    hea = _challenge(tmp_path, "t", {"val": val})
    _raises(tmp_path / "t.mat", r"'val' has 1000 rows but the header t\.hea lists 2 signals; it looks transposed",
            read_challenge, hea)
    hea = _challenge(tmp_path, "s", {"val": _digital(1000, 3).T.astype(np.int16)})   # 3 rows, not transposed
    err = _raises(tmp_path / "s.mat", r"'val' has 3 rows", read_challenge, hea)
    assert "transposed" not in err.problem


# -------------------------------------------------------------------------------- 7. PTB-XL: unlisted signals
def test_ptbxl_signal_files_without_a_row_are_warned_when_left_out(fixture_dir, tmp_path, caplog):
    root = tmp_path / "ptbxl"
    shutil.copytree(fixture_dir / "ptbxl", root)
    lines = (root / "ptbxl_database.csv").read_text().splitlines(keepends=True)
    full = PTBXLSource(root, fs=100, include_unlabelled=False)
    (root / "ptbxl_database.csv").write_text("".join(lines[:1] + lines[3:]))   # rows of the first 2 ids gone
    gone = full.record_ids()[:2]
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers"):
        src = PTBXLSource(root, fs=100, include_unlabelled=False)
    assert len(src) == len(full) - 2                                     # behaviour kept: left out
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "2 100 Hz signal file(s)" in msg and "have no row in ptbxl_database.csv" in msg
    assert ", ".join(gone) in msg and "include_unlabelled" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers"):
        PTBXLSource(root, fs=100, include_unlabelled=True)               # read as unlabelled: nothing left out
    assert not caplog.records
