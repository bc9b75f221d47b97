"""Strict WFDB / challenge-format header validation (issue 9, item 4).

Each fault is built in tmp_path from a real record (the shared fixture) or one written with ``wfdb.wrsamp``,
read with the reader, and converted through the public ``prepare_corpus`` path, where it must become a line of
``skipped.csv`` naming the file and the reason, while the good records are converted.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm.data.cache import prepare_corpus
from ecgfm.data.readers import (
    FS_RANGE,
    Challenge2021Source,
    CinC2017Source,
    FolderSource,
    check_fs_range,
    read_challenge,
    read_wfdb,
)
from ecgfm.data.record import ECGDataError

PTBXL_REC = Path("ptbxl") / "records100" / "00000"


def _copy_ptbxl(fixture_dir: Path, dest: Path, name: str = "00001_lr") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for ext in ("hea", "dat"):
        shutil.copy(fixture_dir / PTBXL_REC / f"{name}.{ext}", dest)
    return dest / f"{name}.hea"


def _copy_challenge(fixture_dir: Path, dest: Path, name: str = "HR06000") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for ext in ("hea", "mat"):
        shutil.copy(fixture_dir / "cinc2021" / f"{name}.{ext}", dest)
    return dest / f"{name}.hea"


def _edit(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text, (old, text[:300])
    path.write_text(text.replace(old, new, count))


def _raises(path: str | Path, problem: str, fn, *args, **kwargs) -> ECGDataError:
    with pytest.raises(ECGDataError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert str(path) in err.path, (err.path, path)
    assert re.search(problem, err.problem), err.problem
    return err


def _wrsamp(out: Path, name: str, fmt: str, n_sig: int = 2, n: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(n) / 250.0
    sig = np.stack([0.8 * np.sin(2 * np.pi * (1.1 + k) * t) + 0.05 * rng.standard_normal(n)
                    for k in range(n_sig)], axis=1)
    names = ["II", "V1", "V2", "V3"][:n_sig]
    wfdb.wrsamp(name, fs=250, units=["mV"] * n_sig, sig_name=names, p_signal=sig, fmt=[fmt] * n_sig,
                adc_gain=[100.0] * n_sig, baseline=[0] * n_sig, write_dir=str(out))
    return out / f"{name}.hea"


def _flip_first_sample(dat: Path) -> None:
    raw = bytearray(dat.read_bytes())
    raw[0] ^= 0x01  # low bit of the first sample, in every format
    dat.write_bytes(bytes(raw))


def _skipped(out: Path) -> list[dict[str, str]]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------- size vs the header


def test_signal_count_disagreeing_with_dat_size(fixture_dir, tmp_path):
    """Six signals announced, twelve stored: reading would interleave the leads wrongly."""
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    lines = hea.read_text().splitlines()
    hea.write_text("\n".join(["00001_lr 6 100 1000"] + lines[1:7]) + "\n")
    _raises(tmp_path / "00001_lr.dat", r"signal file size disagrees with the header: 24000 bytes, but the header "
                                       r"00001_lr.hea accounts for 12000 \(format 16, 6 signals", read_wfdb, hea)


def test_length_disagreeing_with_dat_size(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "00001_lr 12 100 1000", "00001_lr 12 100 500")
    _raises(tmp_path / "00001_lr.dat", "signal file size disagrees with the header: 24000 bytes", read_wfdb, hea)


def test_signal_count_disagreeing_without_length(fixture_dir, tmp_path):
    """No length in the header: the size must still be a whole number of frames."""
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    lines = hea.read_text().splitlines()
    hea.write_text("\n".join(["00001_lr 7 100"] + lines[1:8]) + "\n")
    _raises(tmp_path / "00001_lr.dat", r"signal file size disagrees with the header: 24000 bytes is not a whole "
                                       r"number of 14-byte frames", read_wfdb, hea)


def test_signal_count_disagreeing_in_format_212(tmp_path):
    """Formats decoded by wfdb are checked the same way, before wfdb reads anything."""
    hea = _wrsamp(tmp_path, "r212", "212", n_sig=2)
    text = hea.read_text().splitlines()
    hea.write_text("\n".join([text[0].replace("r212 2 ", "r212 1 "), text[1]]) + "\n")
    _raises(tmp_path / "r212.dat", r"signal file size disagrees with the header: 3000 bytes, but the header "
                                   r"r212.hea accounts for 1500", read_wfdb, hea)


def test_extra_bytes_after_the_samples(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    dat = tmp_path / "00001_lr.dat"
    dat.write_bytes(dat.read_bytes() + b"\x00\x00")
    _raises(dat, "signal file size disagrees with the header: 24002 bytes", read_wfdb, hea)


@pytest.mark.parametrize("fmt", ["16", "212", "24", "32", "80"])
def test_exact_size_of_every_format_is_accepted(tmp_path, fmt):
    for n in (999, 1000):  # odd lengths end packed formats with a partly filled group
        rec = read_wfdb(_wrsamp(tmp_path, f"r{fmt}_{n}", fmt, n_sig=1 if fmt == "212" else 2, n=n))
        assert rec.n_samples == n and rec.header["checksum"] == "verified"


# --------------------------------------------------------------------------------------------- checksums


def test_checksums_verified_on_real_records(fixture_dir):
    rec = read_wfdb(fixture_dir / PTBXL_REC / "00001_lr")  # checksums written unsigned (64758 = -778)
    assert rec.header["checksum"] == "verified"
    assert read_challenge(fixture_dir / "cinc2021" / "HR06000").header["checksum"] == "verified"
    assert read_wfdb(fixture_dir / "ptbdb" / "s0010_re").header["checksum"] == "verified"  # two signal files


def test_checksum_mismatch_format_16(fixture_dir, tmp_path):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _flip_first_sample(tmp_path / "00001_lr.dat")
    _raises(tmp_path / "00001_lr.dat", r"header checksum mismatch: 1 of 12 signals \(I header 1508, samples "
                                       r"(1507|1509)\)", read_wfdb, hea)


def test_swapped_signal_lines_are_caught_by_the_checksums(fixture_dir, tmp_path):
    """A header whose lines are in another order than the file's signals: each lead would get another's data."""
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    lines = hea.read_text().splitlines()
    lines[7], lines[8] = lines[8], lines[7]  # V1 <-> V2
    hea.write_text("\n".join(lines) + "\n")
    _raises(tmp_path / "00001_lr.dat", r"header checksum mismatch: 2 of 12 signals \(V2 header 6999, samples "
                                       r"-1709; V1 header 63827", read_wfdb, hea)


@pytest.mark.parametrize("fmt", ["16", "212", "24", "32", "80"])
def test_checksum_mismatch_every_format(tmp_path, fmt):
    hea = _wrsamp(tmp_path, f"r{fmt}", fmt)
    assert read_wfdb(hea).header["checksum"] == "verified"
    _flip_first_sample(tmp_path / f"r{fmt}.dat")
    _raises(tmp_path, r"header checksum mismatch: 1 of 2 signals \(II header", read_wfdb, hea)


def test_checksum_mismatch_challenge_mat(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    mat = tmp_path / "HR06000.mat"
    val = scipy.io.loadmat(mat)["val"]
    val[3, 100] += 7
    scipy.io.savemat(mat, {"val": val}, format="4")
    _raises(mat, r"header checksum mismatch: 1 of 12 signals \(aVR header 26793, samples 26800\)", read_challenge, hea)


def test_challenge_mat_with_non_integer_values(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    mat = tmp_path / "HR06000.mat"
    val = scipy.io.loadmat(mat)["val"].astype(np.float64) / 1000.0  # millivolts saved where ADC units belong
    scipy.io.savemat(mat, {"val": val}, format="4")
    _raises(mat, r"'val' holds non-integer values", read_challenge, hea)


def test_zero_checksums_are_a_placeholder_not_a_mismatch(shared_data):
    """CinC 2017 headers write 0 for every checksum: nothing to verify, and the record says so."""
    rec = read_challenge(shared_data / "cinc2017" / "A00002", rename_leads={"ECG": "I"})
    assert rec.header["checksum"] == "not verified: all 0 (placeholder)"


# --------------------------------------------------------------------------------------------- sampling rate


@pytest.mark.parametrize("fs", ["1", "49.9", "10001", "20000"])
def test_implausible_sampling_rate(fixture_dir, tmp_path, fs):
    hea = _copy_ptbxl(fixture_dir, tmp_path)
    _edit(hea, "00001_lr 12 100 1000", f"00001_lr 12 {fs} 1000")
    _raises(hea, rf"implausible sampling rate for an ECG: '{re.escape(fs)}' Hz .*\(allowed 50-10000 Hz", read_wfdb, hea)


def test_implausible_sampling_rate_in_challenge_header(fixture_dir, tmp_path):
    hea = _copy_challenge(fixture_dir, tmp_path)
    _edit(hea, "HR06000 12 500 5000", "HR06000 12 1 5000")
    _raises(hea, "implausible sampling rate for an ECG: '1' Hz", read_challenge, hea)


def test_sampling_rate_range_is_configurable(fixture_dir, tmp_path):
    assert FS_RANGE == (50.0, 10_000.0)
    hea = _copy_ptbxl(fixture_dir, tmp_path / "f")
    _edit(hea, "00001_lr 12 100 1000", "00001_lr 12 20 1000")
    assert read_wfdb(hea, fs_range=(10, 1000)).fs == 20.0
    _raises(hea, r"allowed 50-10000 Hz", FolderSource(tmp_path / "f").load, "00001_lr")
    assert FolderSource(tmp_path / "f", fs_range=[10, 1000]).load("00001_lr").fs == 20.0
    _raises(hea, r"implausible sampling rate for an ECG: '20' Hz .*\(allowed 100-200 Hz", read_wfdb, hea,
            fs_range=(100, 200))
    with pytest.raises(ValueError, match="fs_range"):
        check_fs_range((0, 100))
    with pytest.raises(ValueError, match="fs_range"):
        FolderSource(tmp_path / "f", fs_range=(500, 100))


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_signal_file_outside_the_dataset_root(fixture_dir, tmp_path, kind):
    outside = tmp_path / "outside"
    _copy_ptbxl(fixture_dir, outside)
    root = tmp_path / "root"
    hea = _copy_ptbxl(fixture_dir, root)
    (root / "00001_lr.dat").unlink()
    target = "../outside/00001_lr.dat" if kind == "dotdot" else str(outside / "00001_lr.dat")
    _edit(hea, "00001_lr.dat ", f"{target} ")
    _raises(hea, "signal file outside the dataset root", read_wfdb, hea)
    _raises(hea, "signal file outside the dataset root", FolderSource(root).load, "00001_lr")


def test_signal_file_outside_the_root_format_212(tmp_path):
    """wfdb would follow the name itself: the path is refused before wfdb is called."""
    out = tmp_path / "outside"
    out.mkdir()
    hea = _wrsamp(out, "r212", "212")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(hea, root)
    _edit(root / "r212.hea", "r212.dat ", "../outside/r212.dat ")
    _raises(root / "r212.hea", "signal file outside the dataset root", read_wfdb, root / "r212.hea")


def test_mat_file_outside_the_dataset_root(fixture_dir, tmp_path):
    _copy_challenge(fixture_dir, tmp_path / "outside")
    root = tmp_path / "root"
    hea = _copy_challenge(fixture_dir, root)
    (root / "HR06000.mat").unlink()
    _edit(hea, "HR06000.mat ", "../outside/HR06000.mat ")
    _raises(hea, "signal file outside the dataset root", read_challenge, hea)
    _raises(hea, "signal file outside the dataset root", Challenge2021Source(root).load, "HR06000")
    _edit(hea, "../outside/HR06000.mat ", f"{tmp_path / 'outside' / 'HR06000.mat'} ")
    _raises(hea, "signal file outside the dataset root", read_challenge, hea)


def test_signal_file_in_another_folder_inside_the_root(fixture_dir, tmp_path):
    """Inside the dataset root is fine when the source gives the root; a bare read is bounded by the folder."""
    root = tmp_path / "root"
    hea = _copy_ptbxl(fixture_dir, root / "a")
    (root / "b").mkdir()
    shutil.move(root / "a" / "00001_lr.dat", root / "b" / "00001_lr.dat")
    _edit(hea, "00001_lr.dat ", "../b/00001_lr.dat ")
    assert FolderSource(root).load("a/00001_lr").signal.shape == (12, 1000)
    assert read_wfdb(hea, root=root).header["checksum"] == "verified"
    _raises(hea, "signal file outside the dataset root", read_wfdb, hea)


# -------------------------------------------------------------------------------------- undecodable names


def _bad_name(folder: Path, src: Path, ext: str) -> None:
    """Copy ``src`` to a file whose name (``0000\\xff_lr.<ext>``) is not valid UTF-8."""
    target = os.path.join(os.fsencode(folder), b"0000\xff_lr." + ext.encode())
    with open(target, "wb") as fh:
        fh.write(src.read_bytes())


def test_undecodable_file_name_is_skipped_and_reported(fixture_dir, tmp_path):
    root = tmp_path / "f"
    _copy_ptbxl(fixture_dir, root, "00001_lr")
    _copy_ptbxl(fixture_dir, root, "00002_lr")
    _bad_name(root, root / "00002_lr.hea", "hea")  # its header names 00002_lr.dat, which exists
    src = FolderSource(root)
    assert src.record_ids() == ["00001_lr", "00002_lr", "0000\\xff_lr"]
    _raises("0000\\xff_lr.hea", "file name is not valid UTF-8", src.load, "0000\\xff_lr")
    rep = prepare_corpus(src, tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (2, 1)
    (row,) = _skipped(tmp_path / "cache")
    assert row["record_id"] == "0000\\xff_lr" and row["path"].endswith("0000\\xff_lr.hea")
    assert "file name is not valid UTF-8" in row["reason"]
    assert "file name is not valid UTF-" in rep.summary()


def test_undecodable_file_name_in_challenge_sources(fixture_dir, shared_data, tmp_path):
    root = tmp_path / "c"
    _copy_challenge(fixture_dir, root)
    _bad_name(root, root / "HR06000.hea", "hea")
    src = Challenge2021Source(root)
    assert "0000\\xff_lr" in src.record_ids()
    _raises("0000\\xff_lr.hea", "file name is not valid UTF-8", src.load, "0000\\xff_lr")
    cinc = tmp_path / "cinc"
    cinc.mkdir()
    for ext in ("hea", "mat"):
        shutil.copy(shared_data / "cinc2017" / f"A00002.{ext}", cinc)
    (cinc / "REFERENCE.csv").write_text("A00002,N\n")
    _bad_name(cinc, cinc / "A00002.hea", "hea")
    rep = prepare_corpus(CinC2017Source(cinc), tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (1, 1)
    assert "file name is not valid UTF-8" in _skipped(tmp_path / "cache")[0]["reason"]


# ------------------------------------------------------------------------------------ the conversion report


def test_prepare_reports_every_fault_with_its_reason(fixture_dir, tmp_path):
    """One folder, one record per fault: each is a skip line naming its file; the good records are kept."""
    root = tmp_path / "f"
    names = [f"{i:05d}_lr" for i in range(1, 9)]
    for n in names:
        _copy_ptbxl(fixture_dir, root, n)
    # 00001, 00002: good. 00003: signal count. 00004: checksum. 00005: fs. 00006: outside the root.
    # 00007: length. 00008: absolute path.
    lines = (root / "00003_lr.hea").read_text().splitlines()
    (root / "00003_lr.hea").write_text("\n".join(["00003_lr 6 100 1000"] + lines[1:7]) + "\n")
    _flip_first_sample(root / "00004_lr.dat")
    _edit(root / "00005_lr.hea", "00005_lr 12 100 1000", "00005_lr 12 1 1000")
    _copy_ptbxl(fixture_dir, tmp_path / "outside", "00006_lr")
    (root / "00006_lr.dat").unlink()
    _edit(root / "00006_lr.hea", "00006_lr.dat ", "../outside/00006_lr.dat ")
    _edit(root / "00007_lr.hea", "00007_lr 12 100 1000", "00007_lr 12 100 999")
    _edit(root / "00008_lr.hea", "00008_lr.dat ", f"{tmp_path / 'outside' / '00006_lr.dat'} ")
    rep = prepare_corpus(FolderSource(root), tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (2, 6)
    rows = {r["record_id"]: r for r in _skipped(tmp_path / "cache")}
    expected = {
        "00003_lr": ("00003_lr.dat", "signal file size disagrees with the header"),
        "00004_lr": ("00004_lr.dat", "header checksum mismatch"),
        "00005_lr": ("00005_lr.hea", "implausible sampling rate for an ECG: '1' Hz"),
        "00006_lr": ("00006_lr.hea", "signal file outside the dataset root"),
        "00007_lr": ("00007_lr.dat", "signal file size disagrees with the header"),
        "00008_lr": ("00008_lr.hea", "signal file outside the dataset root"),
    }
    assert set(rows) == set(expected)
    for rid, (path, reason) in expected.items():
        assert rows[rid]["path"].endswith(path) and reason in rows[rid]["reason"], rows[rid]
    summary = rep.summary()  # counts per reason: each category appears (its text before the first ': ')
    for _, reason in expected.values():
        assert reason.split(":")[0] in summary


def test_undecodable_table_name_beside_the_records_does_not_abort_prepare(fixture_dir, tmp_path):
    """Sources name the tables they read (``label_files``), so a stray non-UTF-8 CSV name is never hashed."""
    root = tmp_path / "f"
    _copy_ptbxl(fixture_dir, root, "00001_lr")
    with open(os.path.join(os.fsencode(root), b"notes\xff.csv"), "wb") as fh:
        fh.write(b"a,b\n")
    assert FolderSource(root).label_files() == []
    rep = prepare_corpus(FolderSource(root), tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (1, 0)


def test_undecodable_sibling_name_does_not_abort_prepare(fixture_dir, tmp_path):
    root = tmp_path / "f"
    _copy_ptbxl(fixture_dir, root, "00001_lr")
    _copy_ptbxl(fixture_dir, root, "00002_lr")
    with open(os.path.join(os.fsencode(root), b"00001_lr.n\xffte"), "wb") as fh:  # same stem as a record
        fh.write(b"x")
    rep = prepare_corpus(FolderSource(root), tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert rep.n_converted == 2


def test_undecodable_folder_name_in_ptbxl_layout(fixture_dir, tmp_path):
    root = tmp_path / "ptbxl"
    sub = os.path.join(os.fsencode(root), b"records100", b"0000\xff")
    os.makedirs(sub)
    _copy_ptbxl(fixture_dir, root / "records100" / "00000", "00001_lr")
    for ext in ("hea", "dat"):
        shutil.copy(fixture_dir / PTBXL_REC / f"00002_lr.{ext}", os.fsdecode(sub))
    from ecgfm.data.readers import PTBXLSource

    src = PTBXLSource(root)
    assert src.record_ids() == ["00001", "00002"]
    _raises("0000\\xff", "file name is not valid UTF-8", src.load, "00002")
    rep = prepare_corpus(src, tmp_path / "cache", {"fs": 100}, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (1, 1)
    assert _skipped(tmp_path / "cache")[0]["record_id"] == "00002"


def test_several_samples_per_frame_checksum_and_values(tmp_path):
    """Checksums cover every sample of every frame; values agree with wfdb (which truncates the frame mean to
    an integer: within one ADC step); a frame holding the invalid-sample value is NaN, not a wild mean."""
    rng = np.random.default_rng(0)
    n = 500
    e = [rng.integers(-500, 500, n * 2).astype(np.int64), rng.integers(-500, 500, n).astype(np.int64)]
    e[0][7] = -32768
    rec = wfdb.Record(record_name="spf", n_sig=2, fs=250, sig_len=n, file_name=["spf.dat"] * 2, fmt=["16"] * 2,
                      samps_per_frame=[2, 1], adc_gain=[100.0] * 2, baseline=[0] * 2, units=["mV"] * 2,
                      sig_name=["II", "V1"], e_d_signal=e, adc_res=[16] * 2, adc_zero=[0] * 2,
                      init_value=[int(x[0]) for x in e], checksum=[int(x.sum()) % 65536 for x in e],
                      block_size=[0] * 2)
    rec.wrsamp(expanded=True, write_dir=str(tmp_path))
    mine = read_wfdb(tmp_path / "spf")
    assert mine.header["checksum"] == "verified"
    ref = wfdb.rdrecord(str(tmp_path / "spf"), physical=True, return_res=32).p_signal.T
    got = mine.signal[[1, 6]]
    assert np.isnan(got[0, 3]) and np.isnan(got).sum() == 1
    ok = ~np.isnan(got)
    np.testing.assert_allclose(got[ok], ref[ok], atol=0.01 + 1e-6)
    raw = bytearray((tmp_path / "spf.dat").read_bytes())
    raw[2] ^= 0x01  # the second sample of the first frame of II
    (tmp_path / "spf.dat").write_bytes(bytes(raw))
    _raises(tmp_path / "spf.hea", r"header checksum mismatch: 1 of 2 signals \(II header", read_wfdb, tmp_path / "spf")


def test_parsed_checksums_agree_with_wfdb(fixture_dir):
    from ecgfm.data.readers import read_header

    for hea in sorted(fixture_dir.glob("**/*.hea")):
        mine, ref = read_header(hea), wfdb.rdheader(str(hea)[:-4])
        assert mine.checksum == list(ref.checksum) and mine.init_value == list(ref.init_value), hea
