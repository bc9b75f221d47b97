"""Kill a conversion with SIGKILL in the middle of a shard, resume it, and get the uninterrupted result.

The child process is this file run as a script; the environment hook ``ECGFM_PREPARE_RECORD_DELAY`` slows its
worker down so that the kill lands while a shard is being written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecgfm.data.cache import DELAY_ENV, CorpusCache, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError
from ecgfm.data.synthetic import SyntheticSource

ROOT = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec(fs=100)


def _source() -> SyntheticSource:
    return SyntheticSource(24, seed=3, fs=250.0, duration=3.0)


def _prepare(out: Path, workers: int) -> object:
    return prepare_corpus(_source(), out, SPEC, shard_records=4, workers=workers, progress=False)


def _files(path: Path) -> dict[str, bytes]:
    """Content files (not the lock, nor the record of verified file stats, which names inodes and times)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in (".lock", ".verified.json")}


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _wait_for(cond, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"child exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("child made no progress")
        time.sleep(0.02)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_mid_shard_then_resume(tmp_path, workers):
    """workers=0: the kill hits the converting process itself (fast); workers=2: the parent and its spawned
    workers (slow: every spawned worker imports scipy)."""
    out = tmp_path / "killed"
    env = dict(os.environ, **{DELAY_ENV: "0.3"})   # a shard of 4 records takes >= 1.2 s: room for a slow parent
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, __file__, str(out), str(workers)], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = out / "shards"
    # kill (parent and its workers: the whole session) once a shard is done while another is half written
    _wait_for(lambda: (shards / "shard-00000.json").exists() and list(shards.glob(".shard-*.bin.tmp-*")),
              120, proc)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stderr.close()

    assert not (out / "manifest.json").exists()
    with pytest.raises(ECGDataError, match="incomplete cache"):
        CorpusCache(out)                                      # a partial cache is never readable
    done = sorted(p.stem for p in shards.glob("shard-*.json"))
    assert done and "shard-00005" not in done
    before = {name: (_stat(shards / f"{name}.bin"), _stat(shards / f"{name}.json")) for name in done}
    assert list(shards.glob(".*.tmp-*")), "the kill should have left a half-written shard behind"

    report = _prepare(out, workers=0)                         # resume
    assert report.n_shards_reused == len(done) and report.n_shards == 6
    assert report.n_converted_now == 24 - 4 * len(done)
    for name, stats in before.items():                        # finished shards untouched
        assert (_stat(shards / f"{name}.bin"), _stat(shards / f"{name}.json")) == stats
    assert not list(out.rglob(".*.tmp-*"))

    _prepare(tmp_path / "clean", workers=0)                   # uninterrupted reference
    assert _files(out) == _files(tmp_path / "clean")
    cache = CorpusCache(out)
    cache.verify()
    assert len(cache) == 24


def test_shard_without_commit_marker_is_redone(tmp_path):
    """A kill between renaming a shard's data and its index leaves a .bin without .json: it is redone."""
    out = tmp_path / "c"
    _prepare(out, workers=0)
    reference = _files(out)
    (out / "manifest.json").unlink()
    (out / "shards" / "shard-00002.json").unlink()
    (out / "shards" / "shard-00003.bin").write_bytes(b"garbage")    # size no longer matches its index
    report = _prepare(out, workers=0)
    assert report.n_shards_reused == 4 and report.n_converted_now == 8
    assert _files(out) == reference


if __name__ == "__main__":   # the child of test_sigkill_mid_shard_then_resume
    _prepare(Path(sys.argv[1]), workers=int(sys.argv[2]))
