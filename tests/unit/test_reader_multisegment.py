"""Multi-segment WFDB records (PhysioNet long-term and ICU databases) are read whole, as one record.

Every record is written in tmp_path with ``wfdb.wrsamp`` (the segments) plus the master and layout headers as
text, in the WFDB ``header(5)`` format: a master ``name/n_segments n_signals fs n_samples`` followed by one
``segment n_samples`` line per segment, ``~`` for a gap, and for a variable layout a first segment of length 0
whose header (the layout header) names the record's signals.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecgfm.data.cache import prepare_corpus
from ecgfm.data.readers import FolderSource, read_wfdb
from ecgfm.data.record import ECGDataError

FS = 500
# row of each lead in the record's canonical 12-lead layout
ROW = {"I": 0, "II": 1, "V1": 6}


def _segment(folder: Path, name: str, n: int, names: list[str], units: list[str] | None = None,
             seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Write a single-segment record with wfdb; return its physical values as stored, ``(n, n_sig)``."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / FS
    sig = scale * (np.sin(2 * np.pi * (1 + np.arange(len(names))) * t) + 0.1 * rng.standard_normal((n, len(names))))
    wfdb.wrsamp(name, fs=FS, units=units or ["mV"] * len(names), sig_name=names, p_signal=sig,
                fmt=["16"] * len(names), write_dir=str(folder))
    return wfdb.rdrecord(str(folder / name), physical=True).p_signal   # quantised as the file holds it


def _master(folder: Path, name: str, n_sig: int, segments: list[tuple[str, int]]) -> Path:
    total = sum(n for _, n in segments)
    lines = [f"{name}/{len(segments)} {n_sig} {FS} {total}"] + [f"{s} {n}" for s, n in segments]
    hea = folder / f"{name}.hea"
    hea.write_text("\n".join(lines) + "\n")
    return hea


def _layout(folder: Path, name: str, signals: list[tuple[str, str]]) -> None:
    lines = [f"{name} {len(signals)} {FS} 0"] + [f"~ 0 200/{u} 16 0 0 0 0 {s}" for s, u in signals]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")


def _fixed(folder: Path) -> tuple[Path, np.ndarray]:
    """Fixed layout ``ms``: ms_1 (1000), a gap of 300, ms_2 (700); leads I, II, V1. Returns (master, expected)."""
    names = ["I", "II", "V1"]
    a = _segment(folder, "ms_1", 1000, names, seed=1)
    b = _segment(folder, "ms_2", 700, names, seed=2)
    hea = _master(folder, "ms", 3, [("ms_1", 1000), ("~", 300), ("ms_2", 700)])
    return hea, np.concatenate([a, np.full((300, 3), np.nan), b]).T


def _variable(folder: Path) -> tuple[Path, np.ndarray]:
    """Variable layout ``vl``: layout (II, V1, ABP), vl_1 (II, V1; 800), a gap of 200, vl_2 (ABP, II; 600).

    Returns (master, expected ``(3, 1600)`` in the layout's order II, V1, ABP)."""
    _layout(folder, "vl_layout", [("II", "mV"), ("V1", "mV"), ("ABP", "mmHg")])
    a = _segment(folder, "vl_1", 800, ["II", "V1"], seed=3)
    b = _segment(folder, "vl_2", 600, ["ABP", "II"], units=["mmHg", "mV"], seed=4)
    hea = _master(folder, "vl", 3, [("vl_layout", 0), ("vl_1", 800), ("~", 200), ("vl_2", 600)])
    expected = np.full((3, 1600), np.nan)
    expected[:2, :800] = a.T
    expected[1, 1000:] = np.nan   # V1 is not in vl_2
    expected[0, 1000:] = b[:, 1]
    expected[2, 1000:] = b[:, 0]
    return hea, expected


def _skipped(out: Path) -> list[dict[str, str]]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------ reading a record


def test_fixed_layout_reads_as_the_concatenation_of_its_segments(tmp_path):
    hea, expected = _fixed(tmp_path)
    rec = read_wfdb(hea)
    assert rec.record_id == "ms" and rec.fs == FS and rec.signal.shape == (12, 2000)
    got = rec.signal[[ROW["I"], ROW["II"], ROW["V1"]]]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))   # the gap is NaN, nothing else
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert rec.lead_mask.sum() == 3
    assert rec.header["multi_segment"] == {"layout": "fixed", "n_segments": 3, "gap_samples": 300}
    assert rec.header["checksum"] == "verified" and rec.header["path"] == str(hea)
    # agrees with wfdb's own reading of the whole record (wfdb's m2s fails on a gap in a fixed layout: without it)
    _master(tmp_path, "ms0", 3, [("ms_1", 1000), ("ms_2", 700)])
    ref = wfdb.rdrecord(str(tmp_path / "ms0"), m2s=True, physical=True).p_signal.T
    got = read_wfdb(tmp_path / "ms0").signal[[ROW["I"], ROW["II"], ROW["V1"]]]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_variable_layout_gives_absent_signals_as_nan_and_drops_non_voltage_channels(tmp_path):
    hea, expected = _variable(tmp_path)
    rec = read_wfdb(hea)
    assert rec.record_id == "vl" and rec.signal.shape == (12, 1600)
    got = rec.signal[[ROW["II"], ROW["V1"]]]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected[:2]))
    np.testing.assert_allclose(got, expected[:2], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert rec.header["dropped_leads"] == ["ABP"] and rec.header["dropped_units"] == {"ABP": "mmHg"}
    assert rec.header["multi_segment"] == {"layout": "variable", "n_segments": 3, "gap_samples": 200}
    ref = wfdb.rdrecord(str(tmp_path / "vl"), m2s=True, physical=True)
    order = [ref.sig_name.index(s) for s in ("II", "V1")]
    np.testing.assert_allclose(got, ref.p_signal.T[order], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_segment_units_are_converted_to_millivolts(tmp_path):
    # a segment in uV, the layout in mV: the uV segment is divided by 1000 (wfdb's m2s would join them as they are)
    _layout(tmp_path, "u_layout", [("II", "mV")])
    a = _segment(tmp_path, "u_1", 500, ["II"], seed=5)
    b = _segment(tmp_path, "u_2", 500, ["II"], units=["uV"], seed=6, scale=1000.0)
    rec = read_wfdb(_master(tmp_path, "u", 1, [("u_layout", 0), ("u_1", 500), ("u_2", 500)]))
    np.testing.assert_allclose(rec.signal[ROW["II"]], np.concatenate([a[:, 0], b[:, 0] / 1000]), rtol=1e-5,
                               atol=1e-6)
    assert rec.header["units"] == ["mV"]


def test_units_come_from_the_segments_not_the_layout_template(tmp_path):
    # the layout says mmHg (a template: wfdb does not trust its units either), the segment holding II says mV
    _layout(tmp_path, "t_layout", [("II", "mmHg")])
    a = _segment(tmp_path, "t_1", 500, ["II"], seed=7)
    rec = read_wfdb(_master(tmp_path, "t", 1, [("t_layout", 0), ("t_1", 500)]))
    np.testing.assert_allclose(rec.signal[ROW["II"]], a[:, 0], rtol=1e-6, atol=1e-6)
    assert rec.header["units"] == ["mV"] and rec.header["dropped_leads"] == []


def test_segments_disagreeing_on_whether_a_signal_is_a_voltage_are_refused(tmp_path):
    _layout(tmp_path, "w_layout", [("II", "mV")])
    _segment(tmp_path, "w_1", 500, ["II"], seed=7)
    _segment(tmp_path, "w_2", 500, ["II"], units=["mmHg"], seed=8)
    hea = _master(tmp_path, "w", 1, [("w_layout", 0), ("w_1", 500), ("w_2", 500)])
    with pytest.raises(ECGDataError, match=r"signal 'II' has units 'mmHg' in this segment but 'mV' in segment "
                                           r"w_1.hea: a voltage and a non-voltage") as info:
        read_wfdb(hea)
    assert info.value.path == str(tmp_path / "w_2.hea")


# ------------------------------------------------------------------------------------------ bad segments


def _raises(hea: Path, path: Path, problem: str) -> str:
    with pytest.raises(ECGDataError) as info:
        read_wfdb(hea)
    assert info.value.path == str(path), info.value
    assert problem in info.value.problem, info.value.problem
    assert f"of the multi-segment record {hea}" in info.value.problem   # the master is named too
    return info.value.problem


def test_missing_segment_header_names_the_file(tmp_path):
    hea, _ = _fixed(tmp_path)
    (tmp_path / "ms_2.hea").unlink()
    _raises(hea, tmp_path / "ms_2.hea", "segment header not found")


def test_missing_layout_header_names_the_file(tmp_path):
    hea, _ = _variable(tmp_path)
    (tmp_path / "vl_layout.hea").unlink()
    _raises(hea, tmp_path / "vl_layout.hea", "layout header not found")


def test_missing_or_truncated_segment_signal_file_names_the_file(tmp_path):
    hea, _ = _fixed(tmp_path)
    dat = tmp_path / "ms_2.dat"
    dat.write_bytes(dat.read_bytes()[:1000])
    _raises(hea, dat, "truncated signal file")
    dat.unlink()
    _raises(hea, tmp_path / "ms_2.hea", "signal file 'ms_2.dat' named in the header is missing")


@pytest.mark.parametrize("where,old,new,problem", [
    ("ms_2.hea", "ms_2 3 500 700", "ms_2 3 250 700", "sampling rate 250 Hz differs from the multi-segment "
                                                     "record's 500 Hz"),
    ("ms_2.hea", "ms_2 3 500 700", "ms_2 3 500 600", "segment header gives 600 samples, the master 700"),
    ("ms_2.hea", "0 V1", "0 V2", "segment's signals ['I', 'II', 'V2'] differ from the first segment ms_1.hea's"),
    ("ms.hea", "ms_2 700", "ms_2 600", "the record line announces 2000 samples but the segments add up to 1900"),
    ("ms.hea", "ms/3 3", "ms/2 3", "multi-segment header announces 2 segments but has 3 segment lines"),
    ("ms.hea", "~ 300", "~ 0", "segment '~' has 0 samples"),
])
def test_segments_that_disagree_with_the_master_are_refused(tmp_path, where, old, new, problem):
    _fixed(tmp_path)
    target = tmp_path / where
    text = target.read_text()
    assert old in text, (old, text)
    target.write_text(text.replace(old, new))
    with pytest.raises(ECGDataError) as info:
        read_wfdb(tmp_path / "ms.hea")
    assert info.value.path == str(target)
    assert problem in info.value.problem, info.value.problem


def test_segment_outside_the_dataset_root_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _segment(tmp_path, "outside", 500, ["II"])
    hea = _master(root, "m", 1, [("../outside", 500)])
    with pytest.raises(ECGDataError, match="segment header outside the dataset root"):
        read_wfdb(hea)


# ------------------------------------------------------------------------------------------ FolderSource


def _folder(root: Path) -> Path:
    """ms (fixed) and vl (variable) with their segments, plus an ordinary single-segment record ``single``."""
    root.mkdir(parents=True, exist_ok=True)
    _fixed(root)
    _variable(root)
    _segment(root, "single", 1000, ["I", "II"], seed=9)
    return root


def test_folder_source_lists_a_multi_segment_record_once(tmp_path, caplog):
    root = _folder(tmp_path / "f")
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root)
    assert src.record_ids() == ["ms", "single", "vl"]
    assert "2 multi-segment record(s)" in caplog.text and "their 5 segment and layout header(s)" in caplog.text
    rec = src.load("ms")
    assert rec.record_id == "ms" and rec.signal.shape == (12, 2000)
    np.testing.assert_array_equal(rec.signal, read_wfdb(root / "ms").signal)


def test_folder_source_in_a_sub_folder(tmp_path):
    root = tmp_path / "f"
    _folder(root / "sub")
    assert FolderSource(root).record_ids() == ["sub/ms", "sub/single", "sub/vl"]


def test_prepare_reports_a_master_whose_segment_is_missing(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "vl_2.hea").unlink()
    (root / "vl_2.dat").unlink()
    src = FolderSource(root)
    assert src.record_ids() == ["ms", "single", "vl"]
    rep = prepare_corpus(src, tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (2, 1)
    (row,) = _skipped(tmp_path / "cache")
    assert row["record_id"] == "vl" and row["path"] == str(root / "vl_2.hea")
    assert "segment header not found (segment 'vl_2' of the multi-segment record" in row["reason"]


def test_labels_naming_a_segment_point_to_its_master(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "labels.csv").write_text("record_id,AF\nms_1,1\nsingle,0\n")
    with pytest.raises(ECGDataError, match=r"'ms_1' of 'ms'\): label the master"):
        FolderSource(root, labels_csv="labels.csv")


def test_a_rerun_sees_an_edited_segment_and_converts_it_again(tmp_path):
    """The stale-input check watched only the files sharing the master's stem (ms.*): a rewritten ms_2.dat was
    reused silently, and the cache kept serving the old signal."""
    from ecgfm.data.cache import CorpusCache

    src = tmp_path / "src"
    src.mkdir()
    _fixed(src)
    out, fresh = tmp_path / "cache", tmp_path / "fresh"
    prepare_corpus(FolderSource(src), out, {"fs": 100}, workers=0, progress=False)
    _segment(src, "ms_2", 700, ["I", "II", "V1"], seed=7, scale=3.0)           # same size, new samples
    rerun = prepare_corpus(FolderSource(src), out, {"fs": 100}, workers=0, progress=False)
    assert any("ms_2.dat" in c for c in rerun.changes), rerun.changes
    prepare_corpus(FolderSource(src), fresh, {"fs": 100}, workers=0, progress=False)
    np.testing.assert_array_equal(CorpusCache(out).signal(0), CorpusCache(fresh).signal(0))


def test_the_stale_check_survives_masters_that_list_each_other(tmp_path):
    """Two corrupt master headers naming each other sent the input listing into unbounded recursion."""
    from ecgfm.data.readers.formats import header_input_files

    (tmp_path / "a.hea").write_text("a/1 2 200 100\nb 100\n")
    (tmp_path / "b.hea").write_text("b/1 2 200 100\na 100\n")
    assert header_input_files(tmp_path / "a.hea") == [str(tmp_path / "b.hea"), str(tmp_path / "a.hea")]
