"""Readers on the shared fixture (real records) and on small records written with wfdb / scipy in tmp_path."""

from __future__ import annotations

import collections
import csv
import glob
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import wfdb

from ecgfm.data.readers import (
    PTBXL_TASKS,
    SOURCES,
    Challenge2021Source,
    CinC2017Source,
    CPSC2018Source,
    CPSC2021Source,
    FolderSource,
    MITBIHSource,
    PTBXLSource,
    WFDBFolderSource,
    challenge_subset,
    get_source,
    load_ptbxl_table,
    load_scp_statements,
    merge_equivalent_codes,
    parse_header,
    ptbxl_label_space,
    ptbxl_diagnostic_codes,
    ptbxl_task_labels,
    ptbxl_task_map,
    read_challenge,
    read_cpsc2018,
    read_header,
    read_wfdb,
)
from ecgfm.data.readers.formats import _decode_simple
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord, RecordSource

FS = 250


def _wave(n_sig: int, n: int, seed: int = 0) -> np.ndarray:
    """``(n, n_sig)`` smooth test signal in mV (a few sines plus noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FS
    cols = [0.8 * np.sin(2 * np.pi * (1.1 + k) * t) + 0.05 * rng.standard_normal(n) for k in range(n_sig)]
    return np.stack(cols, axis=1)


def _wrsamp(out: Path, name: str, sig: np.ndarray, names: list[str], fmt: str = "16", units: str = "mV",
            gain: float = 200.0, fs: float = FS) -> Path:
    wfdb.wrsamp(name, fs=fs, units=[units] * sig.shape[1], sig_name=names, p_signal=sig,
                fmt=[fmt] * sig.shape[1], adc_gain=[gain] * sig.shape[1], baseline=[0] * sig.shape[1],
                write_dir=str(out))
    return out / f"{name}.hea"


# --------------------------------------------------------------------------------------------------- WFDB


def test_read_wfdb_ptbxl_record_matches_wfdb(fixture_dir):
    path = fixture_dir / "ptbxl" / "records100" / "00000" / "00001_lr"
    rec = read_wfdb(path, source="x")
    assert isinstance(rec, ECGRecord)
    assert rec.signal.shape == (12, 1000) and rec.signal.dtype == np.float32
    assert rec.fs == 100.0 and rec.lead_mask.all() and rec.source == "x" and rec.record_id == "00001_lr"
    ref = wfdb.rdrecord(str(path))
    np.testing.assert_allclose(rec.signal, ref.p_signal.T, atol=1e-6)
    h = rec.header
    assert h["lead_names"][3:6] == ["AVR", "AVL", "AVF"]  # as published
    assert h["units"] == ["mV"] * 12 and h["gain"] == [1000.0] * 12 and h["fmt"] == ["16"] * 12
    assert h["baseline"] == [0] * 12 and h["dropped_leads"] == [] and h["fs_original"] == 100.0
    assert h["path"].endswith("00001_lr.hea")
    # with and without extension give the same record
    np.testing.assert_array_equal(read_wfdb(str(path) + ".hea").signal, rec.signal)


def test_parse_header_agrees_with_wfdb_on_every_fixture_header(fixture_dir):
    heads = sorted(glob.glob(str(fixture_dir / "**" / "*.hea"), recursive=True))
    assert len(heads) == 105
    for p in heads:
        mine, ref = read_header(p), wfdb.rdheader(p[:-4])
        for attr in ("record_name", "n_sig", "fs", "sig_len", "file_name", "adc_gain", "baseline", "units",
                     "sig_name", "comments"):
            assert list(np.atleast_1d(getattr(mine, attr))) == list(np.atleast_1d(getattr(ref, attr))), (p, attr)
        assert mine.fmt == [str(f) for f in ref.fmt]
        assert mine.byte_offset == [int(b or 0) for b in ref.byte_offset]


def test_fast_decoder_agrees_with_wfdb(fixture_dir):
    paths = [fixture_dir / "ptbxl" / "records100" / "00000" / "00010_lr",
             fixture_dir / "cpsc2021" / "data_21_7", fixture_dir / "ptbdb" / "s0010_re"]
    for p in paths:
        h = read_header(p)
        mine = _decode_simple(h, Path(str(p) + ".hea"))
        assert mine is not None
        np.testing.assert_allclose(mine, wfdb.rdrecord(str(p)).p_signal.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["16", "212", "24", "32", "80", "61"])
def test_read_wfdb_every_storage_format(tmp_path, fmt):
    sig = _wave(2, 1000)
    hea = _wrsamp(tmp_path, f"r{fmt}", sig, ["MLII", "V1"], fmt="16" if fmt == "61" else fmt, gain=100.0)
    if fmt == "61":  # big-endian 16-bit: wfdb cannot write it, so byte-swap a format-16 file
        dat = tmp_path / "r61.dat"
        dat.write_bytes(np.fromfile(dat, dtype="<i2").astype(">i2").tobytes())
        hea.write_text(hea.read_text().replace("r61.dat 16 ", "r61.dat 61 "))
    rec = read_wfdb(hea, source="wfdb")
    assert rec.present_leads == ("II", "V1")
    assert rec.header["fmt"] == [fmt, fmt]
    np.testing.assert_allclose(rec.signal[[1, 6]], sig.T, atol=0.6 / 100)  # within one ADC step
    assert not rec.signal[[0, 2, 3, 4, 5, 7, 8, 9, 10, 11]].any()


@pytest.mark.parametrize("units,factor", [("uV", 1e-3), ("V", 1e3), ("mV", 1.0)])
def test_read_wfdb_converts_units_to_mv(tmp_path, units, factor):
    sig = _wave(1, 500) * 100
    rec = read_wfdb(_wrsamp(tmp_path, "u", sig, ["II"], units=units, gain=20.0))
    np.testing.assert_allclose(rec.signal[1], sig[:, 0] * factor, atol=0.05 * factor, rtol=1e-4)
    assert rec.header["units"] == [units]


def test_read_wfdb_ptb_diagnostic_drops_frank_leads(fixture_dir):
    rec = read_wfdb(fixture_dir / "ptbdb" / "s0010_re", source="ptbdb")
    assert rec.signal.shape == (12, 38400) and rec.fs == 1000.0 and rec.lead_mask.all()
    assert rec.header["dropped_leads"] == ["vx", "vy", "vz"]
    assert len(rec.header["lead_names"]) == 15 and rec.header["lead_names"][:3] == ["i", "ii", "iii"]
    assert rec.meta == {"age": 81.0, "sex": "F"}
    ref = wfdb.rdrecord(str(fixture_dir / "ptbdb" / "s0010_re")).p_signal.T
    np.testing.assert_allclose(rec.signal, ref[:12], atol=1e-6)
    assert any("Myocardial infarction" in c for c in rec.header["comments"])


def test_read_wfdb_length_from_file_size(fixture_dir, tmp_path):
    """A header may leave the length out: WFDB then takes it from the signal file size."""
    for ext in ("hea", "dat"):
        shutil.copy(fixture_dir / "ptbxl" / "records100" / "00000" / f"00003_lr.{ext}", tmp_path)
    hea = tmp_path / "00003_lr.hea"
    hea.write_text(hea.read_text().replace("00003_lr 12 100 1000", "00003_lr 12 100"))
    rec = read_wfdb(hea)
    assert rec.n_samples == 1000
    np.testing.assert_array_equal(rec.signal, read_wfdb(fixture_dir / "ptbxl" / "records100" / "00000" /
                                                        "00003_lr").signal)


def test_read_wfdb_mitbih_format_212_baseline_matches_wfdb(shared_data):
    """MIT-BIH record 100: format 212 (decoded through wfdb) with baseline 1024 and gain 200/mV; ignoring the
    baseline would shift every sample by 5.12 mV."""
    path = shared_data / "physionet-samples" / "100"
    if not path.with_suffix(".hea").is_file():
        pytest.skip(f"MIT-BIH record 100 not found at {path}.hea (../shared/data/physionet-samples)")
    ref = wfdb.rdrecord(str(path))
    assert ref.fmt == ["212", "212"] and ref.baseline == [1024, 1024]
    rec = read_wfdb(path)
    assert rec.header["baseline"] == [1024, 1024] and rec.present_leads == ("II", "V5")   # MLII is lead II
    rows = [CANONICAL_LEADS.index("II"), CANONICAL_LEADS.index("V5")]
    np.testing.assert_allclose(rec.signal[rows], ref.p_signal.T, atol=1e-5)


def test_parse_header_defaults_and_spaces():
    h = parse_header("# comment first\nrec 2 250\nrec.dat 212\n\nrec.dat 212 200(5)/uV 12 3 0 0 0 lead with space\n")
    assert h.fs == 250.0 and h.sig_len is None
    assert h.adc_gain == [200.0, 200.0] and h.baseline == [0, 5] and h.units == ["mV", "uV"]
    assert h.sig_name == ["", "lead with space"] and h.comments == ["comment first"]
    # no sampling rate: WFDB would assume 250 Hz; refused (a 500 Hz record would silently last twice as long)
    with pytest.raises(ECGDataError, match="gives no sampling rate"):
        parse_header("rec 2\nrec.dat 212\nrec.dat 212\n")


# --------------------------------------------------------------------------------------------- challenge


def test_read_challenge_matches_wfdb(fixture_dir):
    path = fixture_dir / "cinc2021" / "HR06000"
    rec = read_challenge(path)
    assert rec.signal.shape == (12, 5000) and rec.fs == 500.0 and rec.lead_mask.all()
    np.testing.assert_allclose(rec.signal, wfdb.rdrecord(str(path)).p_signal.T, atol=1e-6)
    assert rec.meta == {"age": 59.0, "sex": "F", "dx_text": "164934002,426783006"}
    assert rec.header["signal_file"].endswith("HR06000.mat")
    # read_wfdb dispatches .mat records to the same reader
    np.testing.assert_array_equal(read_wfdb(path).signal, rec.signal)


def test_read_challenge_applies_a_nonzero_baseline(tmp_path):
    """(val - baseline) / gain with each signal's baseline, as wfdb.rdrecord reads the same .mat (a reader ignoring
    the baseline is off by baseline / gain: here +0.5 and -0.25 mV)."""
    val = np.random.default_rng(1).integers(-2000, 2000, (2, 1000)).astype(np.int16)
    baselines, gain = (100, -50), 200.0
    scipy.io.savemat(tmp_path / "B1.mat", {"val": val}, format="4")
    sums = [(int(v.astype(np.int64).sum()) + 32768) % 65536 - 32768 for v in val]
    lines = ["B1 2 250 1000"] + [f"B1.mat 16+24 {gain:g}({b})/mV 16 0 {int(v[0])} {c} 0 {lead}"
                                 for v, b, c, lead in zip(val, baselines, sums, ("II", "V1"))]
    (tmp_path / "B1.hea").write_text("\n".join(lines) + "\n")
    expected = (val - np.array(baselines)[:, None]) / gain
    np.testing.assert_allclose(wfdb.rdrecord(str(tmp_path / "B1")).p_signal.T, expected, atol=1e-12)
    rec = read_challenge(tmp_path / "B1")
    rows = [CANONICAL_LEADS.index("II"), CANONICAL_LEADS.index("V1")]
    np.testing.assert_allclose(rec.signal[rows], expected, atol=1e-6)
    assert rec.header["checksum"] == "verified" and rec.header["baseline"] == [100, -50]


def test_challenge2021_source(fixture_dir, tmp_path):
    src = Challenge2021Source(fixture_dir / "cinc2021")
    assert src.record_ids() == ["HR06000", "HR06001", "HR06002"]
    rec = src.load("HR06001")
    assert rec.source == "challenge2021" and rec.labels == ("426783006", "55930002")
    assert rec.meta["dx"] == ["426783006", "55930002"] and rec.meta["dx_raw"] == ["426783006", "55930002"]
    assert rec.meta["subset"] == "ptbxl" and rec.meta["ptbxl_ecg_id"] == 6001
    # equivalent SNOMED codes are merged, the raw ones kept; records are found in sub-folders
    sub = tmp_path / "WFDB_Georgia" / "g1"
    sub.mkdir(parents=True)
    text = (fixture_dir / "cinc2021" / "HR06000.hea").read_text()
    text = text.replace("HR06000", "E00001").replace("# Dx: 164934002,426783006",
                                                     "# Dx: 59118001,713427006,17338001,164909002")
    (sub / "E00001.hea").write_text(text)
    shutil.copy(fixture_dir / "cinc2021" / "HR06000.mat", sub / "E00001.mat")
    rec = Challenge2021Source(tmp_path).load("E00001")
    assert rec.meta["dx_raw"] == ["59118001", "713427006", "17338001", "164909002"]
    assert rec.labels == ("427172004", "713427006", "733534002") and list(rec.labels) == rec.meta["dx"]
    assert rec.meta["subset"] == "georgia" and "ptbxl_ecg_id" not in rec.meta
    # codes on a second "# Dx:" line count too (the challenge's own get_labels reads every Dx line)
    (sub / "E00001.hea").write_text(text.replace("# Dx: 59118001,713427006,17338001,164909002",
                                                 "# Dx: 164889003\n# Dx: 59118001"))
    rec = Challenge2021Source(tmp_path).load("E00001")
    assert rec.meta["dx_raw"] == ["164889003", "59118001"] and rec.labels == ("164889003", "713427006")


def test_challenge_helpers():
    assert merge_equivalent_codes(["63593006", "284470004", "1"]) == ["1", "284470004"]
    assert [challenge_subset(i) for i in ("A0001", "Q0001", "I0001", "S0001", "HR00001", "E00001",
                                           "JS00001", "JS20000", "X1")] == [
        "cpsc2018", "cpsc2018_extra", "incart", "ptb", "ptbxl", "georgia", "chapman_shaoxing", "ningbo",
        "unknown"]


def _write_challenge_1lead(folder: Path, name: str, val: np.ndarray, lead: str = "ECG") -> None:
    scipy.io.savemat(folder / f"{name}.mat", {"val": val.astype(np.int16)[None, :]}, format="4")
    (folder / f"{name}.hea").write_text(
        f"{name} 1 300 {val.size} 11:05:25 1/05/2000 \n{name}.mat 16+24 1000/mV 16 0 0 0 0 {lead} \n")


def test_cinc2017_source(tmp_path):
    rng = np.random.default_rng(0)
    vals = {"A00001": rng.integers(-900, 900, 900), "A00002": rng.integers(-900, 900, 1200),
            "A00003": rng.integers(-900, 900, 600)}
    for name, val in vals.items():
        _write_challenge_1lead(tmp_path, name, val)
    (tmp_path / "REFERENCE.csv").write_text("A00001,N\nA00002,A\n")
    src = CinC2017Source(tmp_path)
    assert src.record_ids() == ["A00001", "A00002", "A00003"]
    rec = src.load("A00002")
    assert rec.present_leads == ("I",) and rec.fs == 300.0 and rec.n_samples == 1200
    np.testing.assert_allclose(rec.signal[0], vals["A00002"] / 1000.0, atol=1e-6)
    assert rec.labels == ("A",) and rec.meta["label"] == "A"
    assert rec.header["lead_names"] == ["ECG"] and rec.header["lead_renamed"] == {"ECG": "I"}
    unl = src.load("A00003")
    assert unl.labels == () and "label" not in unl.meta
    # the same files as a generic folder: the unnamed "ECG" lead needs an explicit mapping
    with pytest.raises(ECGDataError, match="no standard ECG lead among"):
        FolderSource(tmp_path).load("A00002")
    rec2 = FolderSource(tmp_path, rename_leads={"ECG": "I"}).load("A00002")
    np.testing.assert_array_equal(rec2.signal, rec.signal)


# ------------------------------------------------------------------------------------------------ PTB-XL


def _benchmark_labels(df: pd.DataFrame, statements: pd.DataFrame, task: str) -> pd.Series:
    """Reference: compute_label_aggregations of the PTB-XL benchmark (Strodthoff et al., utils.py), verbatim
    in spirit: pandas row-by-row, set of keys / (sub)classes."""
    if task in ("diagnostic", "subdiagnostic", "superdiagnostic"):
        agg = statements[statements.diagnostic == 1.0]

        def f(y_dic):
            tmp = []
            for key in y_dic.keys():
                if key in agg.index:
                    if task == "diagnostic":
                        tmp.append(key)
                    else:
                        col = "diagnostic_subclass" if task == "subdiagnostic" else "diagnostic_class"
                        c = agg.loc[key][col]
                        if str(c) != "nan":
                            tmp.append(c)
            return sorted(set(tmp))
    elif task in ("form", "rhythm"):
        agg = statements[statements[task] == 1.0]

        def f(y_dic):
            return sorted({k for k in y_dic.keys() if k in agg.index})
    else:
        def f(y_dic):
            return sorted(set(y_dic.keys()))
    return df.scp_codes.apply(f)


@pytest.mark.parametrize("task", PTBXL_TASKS)
def test_ptbxl_task_labels_match_benchmark_reference(fixture_dir, task):
    root = fixture_dir / "ptbxl"
    df, st = load_ptbxl_table(root), load_scp_statements(root)
    ref = _benchmark_labels(df, st, task)
    mapping = ptbxl_task_map(st, task)
    for ecg_id, codes in df.scp_codes.items():
        assert ptbxl_task_labels(codes, task, st) == ref[ecg_id]
        assert ptbxl_task_labels(codes, task, mapping) == ref[ecg_id]


def test_ptbxl_task_labels_by_hand():
    st = pd.DataFrame({"diagnostic": [1.0, np.nan, np.nan, 1.0], "form": [np.nan, 1.0, np.nan, 1.0],
                       "rhythm": [np.nan, np.nan, 1.0, np.nan], "diagnostic_class": ["NORM", None, None, "STTC"],
                       "diagnostic_subclass": ["NORM", None, None, "ISC"]},
                      index=["NORM", "LVOLT", "SR", "ISC_"])
    codes = {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert ptbxl_task_labels(codes, "all", st) == ["LVOLT", "NORM", "SR"]
    assert ptbxl_task_labels(codes, "diagnostic", st) == ["NORM"]
    assert ptbxl_task_labels(codes, "form", st) == ["LVOLT"]
    assert ptbxl_task_labels(codes, "rhythm", st) == ["SR"]
    assert ptbxl_task_labels({"ISC_": 50.0, "NORM": 0.0}, "subdiagnostic", st) == ["ISC", "NORM"]
    assert ptbxl_task_labels({"ISC_": 50.0, "NORM": 0.0}, "superdiagnostic", st) == ["NORM", "STTC"]
    assert ptbxl_task_labels({"ISC_": 50.0, "NORM": 0.0}, "superdiagnostic", st, min_likelihood=50) == ["STTC"]
    # a threshold drops diagnostic codes below it ("unknown" 0 included); form / rhythm codes carry no likelihood
    # in PTB-XL (always 0) and are kept (before: min_likelihood=50 emptied the rhythm task)
    assert ptbxl_task_labels(codes, "all", st, min_likelihood=50.0) == ["LVOLT", "NORM", "SR"]
    assert ptbxl_task_labels({"NORM": 0.0, "SR": 0.0}, "all", st, min_likelihood=50.0) == ["SR"]
    assert ptbxl_task_labels({"NORM": 100.0, "SR": 0.0}, "rhythm", st, min_likelihood=50) == ["SR"]
    assert ptbxl_task_labels({"LVOLT": 0.0}, "form", st, min_likelihood=50) == ["LVOLT"]
    assert ptbxl_task_labels({"ISC_": 35.0}, "form", st, min_likelihood=50) == []     # form and diagnostic
    diag = ptbxl_diagnostic_codes(st)
    assert diag == {"NORM", "ISC_"}
    rhythm = ptbxl_task_map(st, "rhythm")
    assert ptbxl_task_labels({"SR": 0.0}, "rhythm", rhythm, min_likelihood=50, diagnostic_codes=diag) == ["SR"]
    with pytest.raises(ValueError, match="needs diagnostic_codes"):
        ptbxl_task_labels({"SR": 0.0}, "rhythm", rhythm, min_likelihood=50)
    sup = ptbxl_task_map(st, "superdiagnostic")
    assert ptbxl_task_labels({"ISC_": 50.0, "NORM": 0.0}, "superdiagnostic", sup, min_likelihood=50) == ["STTC"]
    with pytest.raises(ValueError, match="unknown PTB-XL task"):
        ptbxl_task_labels(codes, "nope", st)


def test_ptbxl_label_space_sizes(fixture_dir):
    sizes = {t: len(ptbxl_label_space(fixture_dir / "ptbxl", t)) for t in PTBXL_TASKS}
    assert sizes == {"all": 71, "diagnostic": 44, "subdiagnostic": 23, "superdiagnostic": 5, "form": 19,
                     "rhythm": 12}
    assert ptbxl_label_space(fixture_dir / "ptbxl", "superdiagnostic") == ["CD", "HYP", "MI", "NORM", "STTC"]


def test_ptbxl_source_fixture(fixture_dir):
    src = PTBXLSource(fixture_dir / "ptbxl", fs=100)
    ids = src.record_ids()
    assert len(ids) == 100 and ids == sorted(ids) and ids[0] == "00001" and ids[-1] == "00100"
    rec = src.load("00001")
    assert rec.source == "ptbxl" and rec.record_id == "00001" and rec.patient_id == "15709"
    assert rec.labels == ("LVOLT", "NORM", "SR")
    assert rec.meta == {"scp_codes": {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}, "strat_fold": 3, "age": 56.0,
                        "sex": "F"}
    assert rec.signal.shape == (12, 1000) and rec.fs == 100.0
    table = load_ptbxl_table(fixture_dir / "ptbxl")
    assert table.index.name == "ecg_id" and isinstance(table.loc[1, "scp_codes"], dict)
    folds = src.folds()
    assert collections.Counter(folds.values()) == collections.Counter(table.strat_fold.tolist())
    sup = src.labels("superdiagnostic")
    ref = _benchmark_labels(table, load_scp_statements(fixture_dir / "ptbxl"), "superdiagnostic")
    assert all(sup[f"{i:05d}"] == ref[i] for i in table.index)
    # a likelihood threshold thins diagnostic labels only: rhythm labels (likelihood 0 = not given) all stay
    assert src.labels("rhythm", min_likelihood=50) == src.labels("rhythm")
    assert sum(map(len, src.labels("diagnostic", min_likelihood=50).values())) < \
        sum(map(len, src.labels("diagnostic").values()))


def test_ptbxl_source_unlabelled_records(fixture_dir, tmp_path):
    """Records without a CSV row load as unlabelled data; include_unlabelled=False leaves them out."""
    root = tmp_path / "ptbxl"
    root.mkdir()
    (root / "records100").symlink_to(fixture_dir / "ptbxl" / "records100", target_is_directory=True)
    shutil.copy(fixture_dir / "ptbxl" / "scp_statements.csv", root)
    lines = (fixture_dir / "ptbxl" / "ptbxl_database.csv").read_text().splitlines(keepends=True)
    (root / "ptbxl_database.csv").write_text("".join(lines[:11]))  # header + ids 1-10
    src = PTBXLSource(root, fs=100)
    assert len(src.record_ids()) == 100
    rec = src.load("00050")
    assert rec.labels == () and rec.meta == {} and rec.patient_id is None and rec.signal.shape == (12, 1000)
    assert src.load("00010").labels
    only = PTBXLSource(root, fs=100, include_unlabelled=False)
    assert only.record_ids() == [f"{i:05d}" for i in range(1, 11)]
    # without any CSV every record is unlabelled
    (root / "ptbxl_database.csv").unlink()
    assert PTBXLSource(root).load("00001").meta == {}
    with pytest.raises(ValueError, match="100 or 500"):
        PTBXLSource(root, fs=250)


# ----------------------------------------------------------------------------------------------- CPSC


def test_cpsc2021_source_fixture(fixture_dir):
    src = CPSC2021Source(fixture_dir / "cpsc2021")
    assert src.record_ids() == ["data_21_7"]
    rec = src.load("data_21_7")
    assert rec.present_leads == ("I", "II") and rec.fs == 200.0 and rec.n_samples == 47201
    assert rec.labels == ("non_af",) and rec.meta["class"] == "non_af" and rec.patient_id == "21"
    ann = wfdb.rdann(str(fixture_dir / "cpsc2021" / "data_21_7"), "atr")
    np.testing.assert_array_equal(rec.annotations["r_peaks"], ann.sample)
    assert rec.annotations["af_episodes"] == []


def test_cpsc2021_af_episodes(fixture_dir, tmp_path):
    """Paroxysmal episodes close at the next rhythm change; an episode open at the end closes at the end."""
    for ext in ("hea", "dat"):
        shutil.copy(fixture_dir / "cpsc2021" / f"data_21_7.{ext}", tmp_path / f"data_3_1.{ext}")
    hea = tmp_path / "data_3_1.hea"
    hea.write_text(hea.read_text().replace("data_21_7", "data_3_1").replace(
        "non atrial fibrillation", "paroxysmal atrial fibrillation"))
    samples = np.array([10, 100, 200, 300, 400, 500, 40000])
    symbols = ["N", "+", "N", "+", "A", "+", "N"]
    notes = ["", "(AFIB", "", "(N", "", "(AFL", ""]
    wfdb.wrann("data_3_1", "atr", samples, symbol=symbols, aux_note=notes, write_dir=str(tmp_path))
    rec = CPSC2021Source(tmp_path).load("data_3_1")
    assert rec.labels == ("paroxysmal_af",) and rec.patient_id == "3"
    assert rec.annotations["af_episodes"] == [[100, 300], [500, 47200]]
    np.testing.assert_array_equal(rec.annotations["r_peaks"], [10, 200, 400, 40000])


def test_cpsc2018_source(tmp_path):
    data = _wave(12, 2500).T
    ecg = {"sex": np.array(["Female"]), "age": np.array([[61]], dtype=np.uint8), "data": data}
    scipy.io.savemat(tmp_path / "A0002.mat", {"ECG": ecg})
    scipy.io.savemat(tmp_path / "A0001.mat", {"ECG": ecg})
    src = CPSC2018Source(tmp_path)
    assert src.record_ids() == ["A0001", "A0002"]
    rec = src.load("A0002")
    assert rec.record_id == "A0002" and rec.fs == 500.0 and rec.lead_mask.all() and rec.labels == ()
    np.testing.assert_allclose(rec.signal, data, rtol=1e-6)
    assert rec.meta == {"age": 61.0, "sex": "F"}
    np.testing.assert_array_equal(read_cpsc2018(tmp_path / "A0002").signal, rec.signal)


def test_mitbih_source(tmp_path):
    sig = _wave(2, 3600)
    _wrsamp(tmp_path, "101", sig, ["MLII", "V1"], fmt="212", gain=200.0, fs=360)
    hea = tmp_path / "101.hea"
    hea.write_text(hea.read_text() + "# 75 F 1011 654 x1\n# Diapres\n")
    wfdb.wrann("101", "atr", np.array([5, 300, 600]), symbol=["+", "N", "V"], aux_note=["(N", "", ""],
               write_dir=str(tmp_path))
    _wrsamp(tmp_path, "noann", sig, ["II", "V5"], fs=360)  # no .atr: not an MIT-BIH record
    src = MITBIHSource(tmp_path)
    assert src.record_ids() == ["101"]
    rec = src.load("101")
    assert rec.present_leads == ("II", "V1") and rec.fs == 360.0 and rec.patient_id == "101"
    assert rec.meta == {"age": 75.0, "sex": "F"}
    np.testing.assert_array_equal(rec.annotations["sample"], [5, 300, 600])
    assert list(rec.annotations["symbol"]) == ["+", "N", "V"] and rec.annotations["aux_note"][0] == "(N"
    np.testing.assert_allclose(rec.signal[1], sig[:, 0], atol=0.5 / 200)


# --------------------------------------------------------------------------------------------- folders


def _folder_with_records(fixture_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i in (1, 2):
        for ext in ("hea", "dat"):
            shutil.copy(fixture_dir / "ptbxl" / "records100" / "00000" / f"0000{i}_lr.{ext}", root)
    for ext in ("hea", "mat"):
        shutil.copy(fixture_dir / "cinc2021" / f"HR06000.{ext}", root / "sub")
    return root


def test_folder_source_binary_and_multi_label_columns(fixture_dir, tmp_path):
    root = _folder_with_records(fixture_dir, tmp_path)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["record_id", "patient", "AF", "MI", "rhythm", "split"])
        w.writerow(["00001_lr", "p1", "1", "0", "SR;PAC", "train"])
        w.writerow(["HR06000", "p2", "0", "1", "", "test"])  # bare file name: unique in the tree, so accepted
    src = FolderSource(root, labels_csv="labels.csv", patient_column="patient", name="mydata")
    assert src.record_ids() == ["00001_lr", "00002_lr", "sub/HR06000"]
    a = src.load("00001_lr")
    assert a.source == "mydata" and a.labels == ("AF", "SR", "PAC") and a.patient_id == "p1"
    # a table that mixes flags and label names: a filled flag cell makes the row's labels known (a 0 flag is an
    # explicit negative; an all-zero row beside an empty class-name cell was dropped from every split before s22)
    assert a.meta == {"AF": 1, "MI": 0, "rhythm": "SR;PAC", "split": "train", "patient": "p1", "labels_known": True}
    assert src.label_columns == ["AF", "MI", "rhythm"]  # id, patient and split columns are not labels
    b = src.load("sub/HR06000")
    assert b.labels == ("MI",) and b.signal.shape == (12, 5000) and b.meta["age"] == 59.0
    assert src.load("00002_lr").labels == () and src.load("00002_lr").meta["labels_known"] is False  # no row
    only = FolderSource(root, labels_csv=root / "labels.csv", label_columns=["rhythm"],
                        include_unlabelled=False)
    assert only.record_ids() == ["00001_lr", "sub/HR06000"] and only.load("00001_lr").labels == ("SR", "PAC")
    assert FolderSource(root).load("00002_lr").labels == ()


def test_folder_source_flag_rows_of_zeros_are_known_negatives(fixture_dir, tmp_path):
    """A row with 0 in every flag column is a record with known labels (a negative), unlike a record without a row
    or a row whose label cells are all empty (unknown): ``meta["labels_known"]`` tells them apart."""
    root = _folder_with_records(fixture_dir, tmp_path)
    (root / "labels.csv").write_text("record_id,AF,MI\n00001_lr,0,0\nHR06000,,\n")
    src = FolderSource(root, labels_csv="labels.csv")
    neg, empty, no_row = (src.load(r) for r in ("00001_lr", "sub/HR06000", "00002_lr"))
    assert neg.labels == empty.labels == no_row.labels == ()
    assert neg.meta["labels_known"] is True
    assert empty.meta["labels_known"] is False and no_row.meta["labels_known"] is False
    assert "labels_known" not in FolderSource(root).load("00001_lr").meta   # no labels CSV: nothing is claimed
    (root / "labels.csv").write_text("record_id,dx\n00001_lr,Normal\n")        # label names: nothing of others
    assert FolderSource(root, labels_csv="labels.csv").load("00001_lr").meta["labels_known"] is False


@pytest.mark.parametrize("patient", ["patient_id", "patient", "subject_id", "subject", "Subject_ID"])
def test_folder_source_default_columns_skip_patients_and_demographics(fixture_dir, tmp_path, patient):
    root = _folder_with_records(fixture_dir, tmp_path)
    (root / "labels.csv").write_text(f"record_id,{patient},Age,sex,gender,height,weight,diagnosis\n"
                                     f"00001_lr,S1,61,M,male,180,80.5,AF\n00002_lr,S1,62,F,female,165,60,NORM\n"
                                     f"HR06000,S2,70,M,male,170,70,AF;MI\n")
    src = FolderSource(root, labels_csv="labels.csv")
    assert src.label_columns == ["diagnosis"]
    a, b, c = (src.load(r) for r in ("00001_lr", "00002_lr", "sub/HR06000"))
    assert (a.labels, b.labels, c.labels) == (("AF",), ("NORM",), ("AF", "MI"))
    assert (a.patient_id, b.patient_id, c.patient_id) == ("S1", "S1", "S2")   # patients grouped, not labels
    # explicit label columns are kept as given, demographic columns included
    assert FolderSource(root, labels_csv="labels.csv", label_columns=["sex"]).load("00001_lr").labels == ("M",)


def test_folder_source_ambiguous_patient_or_numeric_label_columns_are_refused(fixture_dir, tmp_path):
    root = _folder_with_records(fixture_dir, tmp_path)
    (root / "two.csv").write_text("record_id,patient_id,subject,AF\n00001_lr,P1,S1,1\n00002_lr,P2,S2,0\n")
    with pytest.raises(ECGDataError, match=r"two.csv: several patient columns \['patient_id', 'subject'\]"):
        FolderSource(root, labels_csv="two.csv")
    assert FolderSource(root, labels_csv="two.csv", patient_column="subject").load("00001_lr").patient_id == "S1"
    (root / "hr.csv").write_text("record_id,heart_rate,AF\n00001_lr,72,1\n00002_lr,1,0\n")
    with pytest.raises(ECGDataError, match=r"hr.csv: column 'heart_rate' holds numbers other than 0/1 "
                                           r"\(e.g. '72' on line 2\)"):
        FolderSource(root, labels_csv="hr.csv")
    src = FolderSource(root, labels_csv="hr.csv", label_columns=["AF", "heart_rate"])  # named: class names
    assert src.load("00001_lr").labels == ("AF", "72")


def test_folder_source_reads_the_synthetic_wfdb_folder(tmp_path):
    synthetic = pytest.importorskip("ecgfm.data.synthetic")
    synthetic.write_wfdb(tmp_path, 3, seed=0, fs=250.0, duration=3.0)
    src = FolderSource(tmp_path, labels_csv="labels.csv", name="synthetic_wfdb")  # patient_id column found
    gen = synthetic.SyntheticSource(3, seed=0, fs=250.0, duration=3.0)
    assert src.record_ids() == gen.record_ids()
    for rid in src.record_ids():
        a, b = src.load(rid), gen.load(rid)
        assert a.labels == b.labels and a.patient_id == str(b.patient_id) and a.fs == b.fs
        np.testing.assert_allclose(a.signal, b.signal, atol=1e-3)  # 1 uV quantisation
    assert "patient_id" not in src.label_columns
    assert FolderSource(tmp_path, labels_csv="labels.csv", patient_column="").load(rid).patient_id is None


def test_wfdb_folder_source_ptb_diagnostic(fixture_dir):
    src = WFDBFolderSource(fixture_dir / "ptbdb")
    assert src.name == "wfdb" and src.record_ids() == ["s0010_re"]
    assert src.load("s0010_re").header["dropped_leads"] == ["vx", "vy", "vz"]


# ------------------------------------------------------------------------------------ contract, registry


def test_sources_follow_the_record_source_contract(fixture_dir):
    sources = [PTBXLSource(fixture_dir / "ptbxl"), Challenge2021Source(fixture_dir / "cinc2021"),
               CPSC2021Source(fixture_dir / "cpsc2021"), FolderSource(fixture_dir / "ptbdb")]
    for src in sources:
        assert isinstance(src, RecordSource)
        ids = src.record_ids()
        assert ids == sorted(ids) and ids == src.record_ids()
        clone = pickle.loads(pickle.dumps(src))
        a, b = src.load(ids[-1]), clone.load(ids[-1])
        np.testing.assert_array_equal(a.signal, b.signal)
        assert a.record_id == ids[-1] and a.source == src.name
        assert a.signal.dtype == np.float32 and a.signal.shape[0] == len(CANONICAL_LEADS)
        assert a.labels == b.labels and a.meta == b.meta
        with pytest.raises(ECGDataError):
            src.load("no-such-record")


def test_get_source(fixture_dir):
    src = get_source("ptbxl", root=fixture_dir / "ptbxl", fs=100)
    assert isinstance(src, PTBXLSource) and src.fs == 100
    assert isinstance(get_source("cinc2021", root=fixture_dir / "cinc2021"), Challenge2021Source)
    assert {"ptbxl", "cinc2017", "challenge2021", "cpsc2021", "cpsc2018", "mitbih", "folder"} <= set(SOURCES)
    with pytest.raises(ValueError, match="unknown record source 'nope'"):
        get_source("nope")


def test_get_source_synthetic():
    pytest.importorskip("ecgfm.data.synthetic")
    src = get_source("synthetic", n_records=2)
    assert len(src.record_ids()) == 2


def test_folder_source_empty_csv_cells_keep_the_headers_values(fixture_dir, tmp_path):
    """An empty age cell replaced the header's age (59) with None: an empty cell is unknown, not a value."""
    root = _folder_with_records(fixture_dir, tmp_path)
    (root / "labels.csv").write_text("record_id,age,MI,note\nHR06000,,1,\n00001_lr,40,0,x\n")
    src = FolderSource(root, labels_csv="labels.csv")
    b = src.load("sub/HR06000")
    assert b.meta["age"] == 59.0 and b.meta["MI"] == 1 and b.meta["note"] is None   # no header value: None kept
    assert src.load("00001_lr").meta["age"] == 40                                   # a filled cell still wins


def test_a_generic_ecg_channel_dropped_beside_standard_leads_is_warned_about(tmp_path, caplog):
    """A channel named only "ECG" (often a recorded lead) beside a standard one was dropped without a word (only
    header["dropped_leads"] said so), while the same channel alone is refused with the rename_leads hint."""
    sig = np.random.default_rng(0).standard_normal((500, 2))
    wfdb.wrsamp("two", fs=250, units=["mV", "mV"], sig_name=["ECG", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="ecgfm.data.readers.formats"):
        rec = read_wfdb(tmp_path / "two")
    assert rec.present_leads == ("II",) and rec.header["dropped_leads"] == ["ECG"]
    assert any("two" in r.getMessage() and "'ECG'" in r.getMessage() and "rename_leads" in r.getMessage()
               for r in caplog.records), caplog.text
    caplog.clear()
    wfdb.wrsamp("frank", fs=250, units=["mV", "mV"], sig_name=["vx", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="ecgfm.data.readers.formats"):
        read_wfdb(tmp_path / "frank")   # a real lead outside the 12-lead layout: dropped with the header's note only
    assert not caplog.records
