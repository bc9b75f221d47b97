"""Review s25 of ``prepare``: a skipped record's own header is watched, resource failures stop the run instead of
skipping records, two different sources of one name are refused, a failing shard / index write ends with one
error line and no temporary file, and the printed report never drops reason categories silently."""

from __future__ import annotations

import csv
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

wfdb = pytest.importorskip("wfdb")

from ecgfm.data import cache as cache_mod  # noqa: E402
from ecgfm.data.cache import CorpusCache, PrepareReport, prepare_corpus  # noqa: E402
from ecgfm.data.readers.folder import FolderSource  # noqa: E402
from ecgfm.data.record import ECGDataError  # noqa: E402
from ecgfm.data.synthetic import SyntheticSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _write(root: Path, name: str, n: int = 1000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    wfdb.wrsamp(name, fs=500, units=["mV"] * 2, sig_name=["I", "II"], p_signal=rng.standard_normal((n, 2)),
                fmt=["16"] * 2, write_dir=str(root))


def _skipped(out: Path) -> list[dict[str, str]]:
    with open(out / "skipped.csv", newline="") as f:
        return list(csv.DictReader(f))


def _temporaries(out: Path) -> list[str]:
    return sorted(p.name for d in (out, out / "shards") if d.is_dir() for p in d.iterdir() if ".tmp" in p.name)


# ----------------------------------------------------------------------------------------------- 1. skip inputs


def test_a_skipped_record_whose_reason_names_another_file_is_read_again_once_its_header_is_fixed(tmp_path):
    root, out = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    _write(root, "good")
    _write(root, "sig", seed=1)                      # rec.hea reads sig.dat (a signal file of another name)
    text = (root / "sig.hea").read_text()
    (root / "sig.hea").unlink()
    good = text.replace("sig 2 500 1000", "rec 2 500 1000")
    (root / "rec.hea").write_text(good.replace("rec 2 500 1000", "rec 2 500 9000"))   # wrong length
    rep = prepare_corpus(FolderSource(root), out, workers=0, progress=False)
    rows = _skipped(out)
    assert rep.n_skipped == 1 and rows[0]["record_id"] == "rec" and rows[0]["path"].endswith("sig.dat")
    with open(root / "rec.hea", "r+") as f:           # fixed in place (same inode), as the skip reason suggests
        f.seek(0)
        f.write(good)
        f.truncate()
    st = os.stat(root / "rec.hea")
    os.utime(root / "rec.hea", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))   # coarse clocks: a later mtime
    rep = prepare_corpus(FolderSource(root), out, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (2, 0), rep.summary()
    assert any("rec.hea" in c for c in rep.changes)
    assert sorted(CorpusCache(out).keys) == ["folder/good", "folder/rec"]


# ----------------------------------------------------------------------------------------------- 2. resources


class FlakySource(SyntheticSource):
    """Synthetic records; ``syn000003`` fails while the file ``flag`` exists, with the failure it names."""

    def __init__(self, flag: str, wrap: bool = False):
        super().__init__(n_records=6, seed=0, fs=100.0, duration=3.0)
        self.flag, self.wrap = flag, wrap

    def load(self, record_id):
        if record_id.endswith("3") and os.path.exists(self.flag):
            kind = Path(self.flag).read_text()
            try:
                if kind == "memory":
                    raise MemoryError()
                raise OSError(getattr(errno, kind), os.strerror(getattr(errno, kind)))
            except (MemoryError, OSError) as exc:
                if self.wrap:   # as a reader that wraps what went wrong in an ECGDataError
                    raise ECGDataError(f"/data/{record_id}.hea", f"cannot read: {exc}") from exc
                raise
        return super().load(record_id)


@pytest.mark.parametrize("kind, wrap, workers", [("memory", False, 0), ("ENOSPC", False, 0), ("EMFILE", True, 0),
                                                 ("ENOSPC", False, 1)])
def test_a_resource_failure_stops_the_run_instead_of_skipping_the_record(tmp_path, kind, wrap, workers):
    flag, out = tmp_path / "flag", tmp_path / "cache"
    flag.write_text(kind)
    src = FlakySource(str(flag), wrap=wrap)
    with pytest.raises(RuntimeError) as err:
        prepare_corpus(src, out, shard_records=2, workers=workers, progress=False)
    text = str(err.value)
    assert "syn000003" in text and str(out) in text and "rerun" in text and "finished shards are kept" in text
    assert ("MemoryError" in text) if kind == "memory" else (os.strerror(getattr(errno, kind)) in text)
    assert not (out / "skipped.csv").exists() and _temporaries(out) == []
    assert (out / "shards" / "shard-00000.json").exists()       # finished before the failure: kept
    flag.unlink()                                               # the resource is back
    rep = prepare_corpus(src, out, shard_records=2, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (6, 0) and rep.n_shards_reused >= 1


def test_an_allocation_beyond_the_machine_is_still_the_records_problem(tmp_path):
    class Huge(SyntheticSource):
        def load(self, record_id):
            if record_id.endswith("1"):
                np.empty((10 ** 9, 10 ** 9), dtype=np.float64)   # a damaged header asking for exabytes
            return super().load(record_id)

    rep = prepare_corpus(Huge(n_records=3, seed=0, fs=100.0, duration=3.0), tmp_path, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (2, 1) and "Unable to allocate" in _skipped(tmp_path)[0]["reason"]


# ----------------------------------------------------------------------------------------------- 3. same name


def test_two_different_sources_with_one_name_are_refused(tmp_path):
    for site in ("a", "b"):
        (tmp_path / site).mkdir()
        _write(tmp_path / site, "rec1", seed=ord(site))
    srcs = [FolderSource(tmp_path / "a"), FolderSource(tmp_path / "b")]
    with pytest.raises(ValueError) as err:
        prepare_corpus(srcs, tmp_path / "cache", workers=0, progress=False)
    text = str(err.value)
    assert str(tmp_path / "a") in text and str(tmp_path / "b") in text and "'folder'" in text and "name" in text
    assert not (tmp_path / "cache" / "manifest.json").exists()
    # named apart: both kept, each under its own name
    rep = prepare_corpus([FolderSource(tmp_path / "a", name="site_a"), FolderSource(tmp_path / "b", name="site_b")],
                         tmp_path / "ok", workers=0, progress=False, allow_duplicate_ids=True)
    assert rep.n_converted == 2 and sorted(CorpusCache(tmp_path / "ok").keys) == ["site_a/rec1", "site_b/rec1"]
    # the same dataset listed twice (same reader, same root) keeps its documented rule: same keys skipped
    rep = prepare_corpus([FolderSource(tmp_path / "a"), FolderSource(tmp_path / "a")], tmp_path / "twice",
                         workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (1, 1)


# ----------------------------------------------------------------------------------------------- 4. disk full


def test_a_failing_shard_write_is_one_error_no_temporary_and_a_rerun_resumes(tmp_path, monkeypatch):
    out = tmp_path / "cache"
    src = SyntheticSource(n_records=6, seed=0, fs=100.0, duration=3.0)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if ".shard-00001.bin.tmp" in str(path) else f

    monkeypatch.setattr(cache_mod, "open", fake_open, raising=False)
    with pytest.raises(RuntimeError) as err:
        prepare_corpus(src, out, shard_records=2, workers=0, progress=False)
    text = str(err.value)
    assert str(out) in text and "No space left on device" in text and "rerun" in text
    assert "finished shards are kept" in text and "Traceback" not in text
    assert _temporaries(out) == [] and (out / "shards" / "shard-00000.json").exists()
    monkeypatch.undo()
    rep = prepare_corpus(src, out, shard_records=2, workers=0, progress=False)
    assert rep.n_converted == 6 and rep.n_shards_reused == 1


def test_a_failing_index_write_at_the_end_is_one_error_and_a_rerun_resumes(tmp_path, monkeypatch):
    out = tmp_path / "cache"
    src = SyntheticSource(n_records=4, seed=0, fs=100.0, duration=3.0)

    def full(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(cache_mod, "_merge_shards", full)
    with pytest.raises(RuntimeError, match="rerun") as err:
        prepare_corpus(src, out, shard_records=2, workers=0, progress=False)
    assert str(out) in str(err.value) and os.strerror(errno.EDQUOT) in str(err.value)
    monkeypatch.undo()
    rep = prepare_corpus(src, out, shard_records=2, workers=0, progress=False)
    assert rep.n_converted == 4 and rep.n_shards_reused == 2


def test_prepare_cli_on_a_full_disk_prints_one_error_line(tmp_path):
    root, out = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    for i in range(6):
        _write(root, f"r{i}", n=20000, seed=i)   # 40 s: 32 KB a record at 100 Hz

    def small_files():   # write() of a file beyond 60 KiB fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cmd = [sys.executable, "prepare.py", "sources=[folder]", f"folder.root={root}", f"out={out}", "progress=false",
           "workers=0", "shard_records=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, preexec_fn=small_files,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(errors) == 1 and str(out) in errors[0] and "File too large" in errors[0] and "rerun" in errors[0]
    assert _temporaries(out) == []


# ----------------------------------------------------------------------------------------------- 5. summary


def test_the_summary_counts_the_reasons_it_does_not_list_and_categories_fold_names():
    cat = cache_mod._reason_category
    a = cat("unknown lead name 'leadAx' (known: I, II, III) if it is a standard lead, rename_leads={...}")
    b = cat("unknown lead name 'leadBx' (known: I, II, III) if it is a standard lead, rename_leads={...}")
    assert a == b and "leadAx" not in a
    assert cat("the header rec.hea accounts for 16000 bytes") == cat("the header other_7.hea accounts for 2 bytes")
    assert cat("PermissionError: [Errno 13] Permission denied: '/data/x/a.dat'") == \
        cat("PermissionError: [Errno 13] Permission denied: '/data/y/b.dat'")
    assert "Input/output error" in cat("OSError: [Errno 5] Input/output error")   # not taken for a path
    reasons = {f"reason {chr(97 + k)}": 20 - k for k in range(18)}
    text = PrepareReport(out_dir="c", n_planned=1, n_converted=1, n_skipped=sum(reasons.values()), n_shards=1,
                         n_shards_reused=0, n_converted_now=1, skipped_reasons=reasons).summary()
    assert "reason o" in text and "reason p" not in text
    assert "... and 3 more reasons (" + str(5 + 4 + 3) + " records" in text
