"""Review s22 of the record readers (ecgfm.data.readers.formats, _scan).

* a header announcing fewer signals than it has signal lines was read from its first lines only: a lead silently
  lost (one file per signal) or every lead scrambled (signals interleaved in one file, length left out);
* a UTF-8 byte order mark became part of the record name ('\\ufeffrec'), and before a leading comment line made
  that comment the record line;
* a MATLAB v7.3 (HDF5) .mat file was "unreadable or corrupt" with scipy's "Please use HDF reader";
* the folder scan did not follow symlinked folders and missed ``REC.HEA`` (upper-case extension), and read_wfdb did
  not find such a header;
* the unknown-lead hint offered rename_leads={'-aVR': ...} for an inverted lead (renaming does not flip the sign),
  and a record whose only lead is 'ECG' got no rename_leads hint at all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm.data.readers import FolderSource, read_challenge, read_cpsc2018, read_wfdb
from ecgfm.data.readers._scan import scan_records
from ecgfm.data.readers.formats import header_path, parse_header
from ecgfm.data.record import ECGDataError

FS = 250


def _digital(n: int, n_sig: int, seed: int = 0) -> np.ndarray:
    """``(n, n_sig)`` int64 samples (wfdb's d_signal layout)."""
    return np.round(np.random.default_rng(seed).standard_normal((n, n_sig)) * 300).astype(np.int64)


def _write(folder: Path, name: str, d: np.ndarray, names: list[str], fmt: str = "16") -> Path:
    n_sig = d.shape[1]
    wfdb.wrsamp(name, fs=FS, units=["mV"] * n_sig, sig_name=names, d_signal=d, fmt=[fmt] * n_sig,
                adc_gain=[200.0] * n_sig, baseline=[0] * n_sig, write_dir=str(folder))
    return folder / f"{name}.hea"


def _raises(path: Path, pattern: str, fn, *args, **kwargs) -> ECGDataError:
    """Call ``fn`` and check the ECGDataError names ``path`` and matches ``pattern``."""
    with pytest.raises(ECGDataError, match=pattern) as info:
        fn(*args, **kwargs)
    assert info.value.path == str(path)
    return info.value


# ---------------------------------------------------------------- 1. more signal lines than the record line says
def test_extra_signal_lines_with_one_file_per_lead_are_refused(tmp_path):
    d = _digital(500, 3)
    lines = ["rec 2 250 500"]   # three signal lines, two announced: the third lead was silently lost
    for i, lead in enumerate(["I", "II", "V1"]):
        lines.append(_write(tmp_path, f"part{i}", d[:, i:i + 1], [lead]).read_text().splitlines()[1])
    hea = tmp_path / "rec.hea"
    hea.write_text("\n".join(lines) + "\n# Age: 50\n")
    err = _raises(hea, r"header announces 2 signals but has 3 signal lines", read_wfdb, hea)
    assert "only comment lines starting with '#'" in err.problem and "'rec 2 250 500'" in err.problem
    with pytest.raises(ECGDataError, match="announces 2 signals but has 3 signal lines"):
        parse_header(hea.read_text(), hea)


def test_extra_signal_lines_in_one_interleaved_file_are_refused(tmp_path):
    hea = _write(tmp_path, "rec", _digital(500, 3), ["I", "II", "V1"])
    lines = hea.read_text().splitlines()
    lines[0] = "rec 2 250"   # length left out: a file of 3 interleaved signals read as 2, every lead scrambled
    lines[1:4] = [" ".join(line.split()[:5] + ["0", "0", "0"] + line.split()[8:]) for line in lines[1:4]]
    hea.write_text("\n".join(lines) + "\n")
    _raises(hea, r"header announces 2 signals but has 3 signal lines", read_wfdb, hea)


def test_comment_lines_after_the_signal_lines_are_still_read(tmp_path):
    hea = _write(tmp_path, "rec", _digital(500, 2), ["I", "II"])
    hea.write_text(hea.read_text() + "# Age: 50\n\n#Sex: F\n")
    rec = read_wfdb(hea)
    assert rec.present_leads == ("I", "II") and rec.meta == {"age": 50.0, "sex": "F"}


# --------------------------------------------------------------------------------------- 2. UTF-8 byte order mark
@pytest.mark.parametrize("fmt", ["16", "212"])   # the numpy decoder and wfdb's
@pytest.mark.parametrize("prefix,newline,tail", [
    (b"", "\n", b""), (b"", "\r\n", b""),
    (b"# exported by CardioSoft\n", "\n", b""),            # a leading comment line: it is not the record line
    (b"", "\n", "# Ort: M\xfcnchen\n".encode("latin-1")),   # not valid UTF-8: the Latin-1 fallback
])
def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path, fmt, prefix, newline, tail):
    d = _digital(500, 2)
    hea = _write(tmp_path, "rec", d, ["I", "II"], fmt=fmt)
    ref = read_wfdb(hea)
    text = hea.read_text().replace("\n", newline).encode()
    hea.write_bytes(b"\xef\xbb\xbf" + prefix + text + tail)
    rec = read_wfdb(hea)
    assert rec.record_id == "rec"
    np.testing.assert_array_equal(rec.signal, ref.signal)
    assert parse_header((b"\xef\xbb\xbf" + prefix + text).decode("utf-8"), hea).record_name == "rec"


# ------------------------------------------------------------------------------------------------ 3. MATLAB v7.3
def _mat_v73(path: Path) -> None:
    """A file with the 128-byte header MATLAB v7.3 writes (text, subsystem offset, version 0x0200, 'IM') and the
    HDF5 signature after it (h5py is not a dependency: the body is a placeholder)."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    head = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    path.write_bytes(head.ljust(512, b"\x00") + b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)


def test_a_matlab_v73_file_is_named_as_such(tmp_path):
    hea = tmp_path / "c.hea"
    hea.write_text("c 2 500 1000\nc.mat 16+24 1000/mV 16 0 0 0 0 I\nc.mat 16+24 1000/mV 16 0 0 0 0 II\n")
    _mat_v73(tmp_path / "c.mat")
    err = _raises(tmp_path / "c.mat", r"MATLAB v7\.3 \(HDF5-based\) \.mat file, which is not supported",
                  read_challenge, tmp_path / "c")
    assert "-v7" in err.problem and "corrupt" not in err.problem and "HDF reader" not in err.problem
    _mat_v73(tmp_path / "A0001.mat")
    _raises(tmp_path / "A0001.mat", r"MATLAB v7\.3 .*'-v7'", read_cpsc2018, tmp_path / "A0001.mat")
    # a corrupt file stays "unreadable or corrupt"
    (tmp_path / "c.mat").write_bytes(b"not a mat file" * 20)
    _raises(tmp_path / "c.mat", "unreadable or corrupt .mat file", read_challenge, tmp_path / "c")


def test_a_v7_mat_file_is_still_read(tmp_path):
    val = _digital(1000, 2).T.astype(np.int16)
    sums = [int(s) for s in val.astype(np.int64).sum(axis=1) % 65536]
    (tmp_path / "c.hea").write_text("c 2 500 1000\n" + "".join(
        f"c.mat 16+24 1000/mV 16 0 {val[i, 0]} {sums[i]} 0 {lead}\n" for i, lead in enumerate(["I", "II"])))
    scipy.io.savemat(tmp_path / "c.mat", {"val": val})
    np.testing.assert_allclose(read_challenge(tmp_path / "c").signal[:2], val / 1000.0, atol=1e-6)


# -------------------------------------------------------------------- 4. symlinked folders, upper-case extensions
def test_the_scan_follows_symlinked_folders_and_upper_case_extensions(tmp_path):
    d = _digital(500, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    _write(outside, "linked_rec", d, ["I", "II"])
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "upper").mkdir()
    _write(root, "rec1", d, ["I", "II"])
    _write(root / "sub", "rec2", d, ["I", "II"])
    _write(root / "upper", "REC3", d, ["I", "II"])
    os.rename(root / "upper" / "REC3.hea", root / "upper" / "REC3.HEA")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root, root / "sub" / "loop")         # a link to a folder above: followed once, not forever
    os.symlink(root / "sub", root / "a_link_to_sub")   # sorted before sub: sub keeps its own path
    expected = {"linked_dir/linked_rec": "linked_dir/linked_rec", "rec1": "rec1", "sub/rec2": "sub/rec2",
                "upper/REC3": "upper/REC3"}
    files = scan_records(root, ".hea", recursive=True, ids="relative")
    assert files == expected and list(files) == sorted(files)
    assert scan_records(root, ".hea") == {"rec1": "rec1"}   # not recursive: the root's own files only
    src = FolderSource(root)
    assert src.record_ids() == sorted(expected)
    for rid in expected:
        assert src.load(rid).present_leads == ("I", "II")


def test_a_duplicate_under_two_extension_spellings_is_refused(tmp_path):
    _write(tmp_path, "rec", _digital(500, 2), ["I", "II"])
    (tmp_path / "rec.HEA").write_bytes((tmp_path / "rec.hea").read_bytes())
    with pytest.raises(ECGDataError, match=r"record id 'rec' appears twice \(also rec\.HEA\)"):
        scan_records(tmp_path, ".hea", recursive=True, ids="relative")


@pytest.mark.parametrize("fmt", ["16", "212"])   # 212 is decoded by wfdb, which only opens <name>.hea
def test_read_wfdb_finds_an_upper_case_header(tmp_path, fmt):
    d = _digital(500, 2)
    ref = read_wfdb(_write(tmp_path, "REC", d, ["I", "II"], fmt=fmt))
    os.rename(tmp_path / "REC.hea", tmp_path / "REC.HEA")
    for given in ("REC", "REC.HEA", "REC.hea", "REC.dat"):
        rec = read_wfdb(tmp_path / given)
        assert rec.record_id == "REC" and rec.header["path"] == str(tmp_path / "REC.HEA")
        np.testing.assert_array_equal(rec.signal, ref.signal)
    assert header_path(tmp_path / "rec") == tmp_path / "rec.hea"   # the name itself must match exactly
    (tmp_path / "REC.Hea").write_bytes((tmp_path / "REC.HEA").read_bytes())   # two spellings: ambiguous
    _raises(tmp_path / "REC.hea", "header file not found", read_wfdb, tmp_path / "REC")


# ------------------------------------------------------------------------------------------- 5. lead-name hints
def test_an_inverted_lead_gets_no_rename_hint(tmp_path):
    hea = _write(tmp_path, "rec", _digital(500, 2), ["-aVR", "II"])
    err = _raises(hea, r"unknown lead name '-aVR'", read_wfdb, hea)
    assert "inverted lead (its negation is aVR)" in err.problem
    assert "would not flip its sign" in err.problem and "Negate its samples" in err.problem
    assert "<standard lead" not in err.problem   # no placeholder to fill in: renaming is not the fix


def test_a_record_whose_only_lead_is_ecg_gets_the_rename_hint(tmp_path):
    hea = _write(tmp_path, "rec", _digital(500, 1), ["ECG"])
    err = _raises(hea, re.escape("no standard ECG lead among ['ECG']"), read_wfdb, hea)
    assert "rename_leads={'ECG': '<standard lead, e.g. I, II, V1>'}" in err.problem
    assert FolderSource(tmp_path, rename_leads={"ECG": "I"}).load("rec").present_leads == ("I",)
    # real leads with no place in the 12-lead layout (V7, V8) are not renamed: no hint
    hea = _write(tmp_path, "v78", _digital(500, 2), ["V7", "V8"])
    err = _raises(hea, re.escape("no standard ECG lead among ['V7', 'V8']"), read_wfdb, hea)
    assert "rename_leads" not in err.problem


def test_an_upper_case_annotation_file_is_read(tmp_path):
    """The scan lists a MIT-BIH record whose annotation file is ``X.ATR``; its load looked for ``X.atr`` only."""
    from ecgfm.data.readers import MITBIHSource

    sig = np.sin(np.linspace(0, 60, 3600))[:, None].repeat(2, 1)
    wfdb.wrsamp("200", fs=360, units=["mV", "mV"], sig_name=["MLII", "V1"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    wfdb.wrann("200", "atr", np.arange(100, 3500, 300), symbol=["N"] * 12, write_dir=str(tmp_path))
    os.rename(tmp_path / "200.atr", tmp_path / "200.ATR")
    rec = MITBIHSource(tmp_path).load("200")
    assert rec.annotations["sample"].tolist() == list(range(100, 3500, 300))


def test_upper_case_headers_are_found_without_listing_the_folder_per_record(tmp_path, monkeypatch):
    """Each load of an ``X.HEA`` record listed its whole folder (quadratic in the folder's size)."""
    from ecgfm.data.readers import formats

    d = _digital(200, 1)
    for i in range(5):
        _write(tmp_path, f"r{i}", d, ["II"])
        os.rename(tmp_path / f"r{i}.hea", tmp_path / f"r{i}.HEA")
    calls = []
    real = os.scandir
    monkeypatch.setattr(formats.os, "scandir", lambda p: calls.append(p) or real(p))
    for i in range(5):
        assert header_path(tmp_path / f"r{i}").name == f"r{i}.HEA"
    assert len(calls) == 1
    _write(tmp_path, "late", d, ["II"])            # a file added afterwards is found (the folder changed)
    os.rename(tmp_path / "late.hea", tmp_path / "late.HEA")
    assert header_path(tmp_path / "late").name == "late.HEA"
