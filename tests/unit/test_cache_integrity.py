"""Issue 9: no silent-wrong path through the corpus cache.

Shard checksums checked on open (stat, then sha256 of what changed), a full check with ``verify=True``,
non-finite windows stopped (or skipped and counted) by the loaders, stale inputs (label tables, record files,
added records) detected and rebuilt, derived files repaired, workers that die with their parent.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data import cache as cache_mod
from ecgfm.data.cache import CorpusCache, NonFiniteDataError, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError, ECGRecord

SPEC = PreprocessSpec(fs=100)
ROOT = Path(__file__).resolve().parents[2]


class RampSource:
    """Picklable source of finite 12-lead records (no files on disk)."""

    name = "ramp"

    def __init__(self, n=9):
        self.n = n

    def __repr__(self):   # prepare_cache keys built sources by their repr
        return f"RampSource(n={self.n})"

    def record_ids(self):
        return [f"r{i}" for i in range(self.n)]

    def load(self, rid):
        i = int(rid[1:])
        t = 300 + 10 * i
        sig = np.sin(np.arange(t, dtype=np.float32)[None, :] / (5.0 + i) + np.arange(12)[:, None]).astype(np.float32)
        return ECGRecord(signal=sig, fs=100.0, lead_mask=np.ones(12, bool), record_id=rid, source="ramp",
                         patient_id=f"p{i}", labels=(f"c{i % 2}",))


def _cache(tmp_path, n=9, shard_records=3) -> Path:
    out = tmp_path / "c"
    prepare_corpus(RampSource(n), out, SPEC, shard_records=shard_records, workers=0, progress=False)
    return out


def _poison(out: Path, record: int, keep_stat: bool) -> Path:
    """Write NaN into the stored samples of ``record``; with ``keep_stat`` the cache's record of the file's
    metadata is updated too, as if the disk had flipped bits behind the file system's back."""
    cache = CorpusCache(out)
    c = cache.columns()
    shard = cache.path / cache.manifest["shards"][int(c["shard"][record])]["bin"]
    with open(shard, "r+b") as f:
        f.seek(int(c["offset"][record]) + 40)
        f.write(np.full(5, np.nan, np.float32).tobytes())
    if keep_stat:
        cache_mod._record_verified(out, {str(shard.relative_to(out)): shard})
    return shard


# ---------------------------------------------------------------------------------------------- checksums


def test_corrupt_shard_is_refused_on_open_naming_it(tmp_path):
    out = _cache(tmp_path)
    shard = _poison(out, 4, keep_stat=False)
    with pytest.raises(ECGDataError, match=r"shard-00001\.bin.*checksum.*verify=true"):
        CorpusCache(out)


def test_open_check_hashes_only_what_changed(tmp_path, monkeypatch):
    out = _cache(tmp_path)
    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    CorpusCache(out)
    assert calls == []                                   # fresh cache: stat only
    shard = out / "shards" / "shard-00002.bin"
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))   # touched, same bytes
    CorpusCache(out)
    assert calls == ["shard-00002.bin"]                  # hashed once, found intact ...
    CorpusCache(out)
    assert calls == ["shard-00002.bin"]                  # ... and remembered


def test_prepare_verify_repairs_a_silently_damaged_shard(tmp_path, caplog):
    out = _cache(tmp_path)
    _poison(out, 4, keep_stat=True)
    CorpusCache(out)                                     # the stat check cannot see it ...
    with pytest.raises(ECGDataError, match="checksum"):
        CorpusCache(out).verify()                        # ... a full check can
    with caplog.at_level(logging.WARNING):
        rep = prepare_corpus(RampSource(9), out, SPEC, shard_records=3, workers=0, progress=False, verify=True)
    assert rep.n_shards_repaired == 1 and "shard-00001" in caplog.text
    cache = CorpusCache(out)
    cache.verify()
    assert np.isfinite(cache.signal(4)).all()


def test_prepare_rerun_repairs_a_shard_whose_stat_changed(tmp_path):
    """A rerun (or the training pipeline's prepare_cache) hashes files whose stat changed and repairs them."""
    from ecgfm.data.prepare import prepare_cache

    out = _cache(tmp_path)
    _poison(out, 4, keep_stat=False)
    rep = prepare_corpus(RampSource(9), out, SPEC, shard_records=3, workers=0, progress=False)
    assert rep.n_shards_repaired == 1
    CorpusCache(out).verify()
    d = Path(prepare_cache([RampSource(9)], str(tmp_path / "auto"), SPEC, name="r", progress=False))
    shard = _poison(d, 1, keep_stat=False)
    with pytest.raises(ECGDataError, match=shard.name):
        CorpusCache(d)
    assert prepare_cache([RampSource(9)], str(tmp_path / "auto"), SPEC, name="r", progress=False) == str(d)
    CorpusCache(d).verify()


def test_cli_prepare_verify_true_repairs(tmp_path):
    from hydra import compose, initialize_config_dir

    from ecgfm.cli.prepare import resolve_out
    from ecgfm.config import validate_prepare_config
    from ecgfm.data.cache import prepare_from_config

    out = tmp_path / "s"
    overrides = ["sources=[synthetic]", "synthetic.n_records=4", "synthetic.fs=100", "synthetic.duration=2.5",
                 f"out={out}", "workers=0", "progress=false", "spec.fs=50"]
    args = [sys.executable, "-m", "ecgfm.cli.prepare", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the cache to damage, prepared in this process as the command would (its config, then prepare_from_config):
    # the command checked is the verify=true run below
    with initialize_config_dir(config_dir=str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=overrides)
    prepare_from_config(validate_prepare_config(resolve_out(cfg)))
    _poison(out, 1, keep_stat=True)
    run = subprocess.run(args + ["verify=true"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "repaired 1 damaged shard" in run.stdout and "Traceback" not in run.stderr
    CorpusCache(out).verify()


def test_prepare_from_config_verify_flag(tmp_path, capsys):
    from ecgfm.data.cache import prepare_from_config

    cfg = {"sources": ["synthetic"], "out": str(tmp_path / "s"), "spec": {"fs": 50}, "workers": 0,
           "progress": False, "synthetic": {"n_records": 4, "fs": 100.0, "duration": 2.5}}
    prepare_from_config(cfg)
    _poison(tmp_path / "s", 1, keep_stat=True)
    rep = prepare_from_config({**cfg, "verify": True})
    assert rep.n_shards_repaired == 1 and "repaired" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- derived files


@pytest.mark.parametrize("name", ["records.npy", "index.jsonl"])
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_derived_files_are_rebuilt_with_a_log_line(tmp_path, caplog, name, damage):
    out = _cache(tmp_path)
    before = CorpusCache(out)
    ref_keys, ref_sig = before.keys, before.signal(5)
    p = out / name
    if damage == "missing":
        p.unlink()
    else:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING):
        cache = CorpusCache(out)
    assert name in caplog.text and "rebuilt" in caplog.text
    assert cache.keys == ref_keys and np.array_equal(cache.signal(5), ref_sig)
    cache.verify()


@pytest.mark.parametrize("name", ["plan.json", "manifest.json", "inputs.json", ".verified.json", "skipped.csv",
                                  "shards/shard-00001.json"])
def test_damaged_bookkeeping_is_repaired_by_a_rerun(tmp_path, name):
    out = _cache(tmp_path)
    ref = CorpusCache(out)
    keys, sig = ref.keys, ref.signal(4)
    p = out / name
    p.write_bytes(p.read_bytes()[:7])
    if name in ("manifest.json", "shards/shard-00001.json"):
        with pytest.raises(ECGDataError, match=Path(name).name):
            CorpusCache(out)
    rep = prepare_corpus(RampSource(9), out, SPEC, shard_records=3, workers=0, progress=False)
    assert rep.n_converted_now == (3 if name.startswith("shards/") else 0)
    cache = CorpusCache(out)
    cache.verify()
    assert cache.keys == keys and np.array_equal(cache.signal(4), sig)


def test_a_shard_from_another_plan_is_not_reused(tmp_path):
    out = _cache(tmp_path)
    other = tmp_path / "o"
    prepare_corpus(RampSource(12), other, SPEC, shard_records=3, workers=0, progress=False)
    for ext in ("bin", "json"):        # a stray shard copied over (e.g. by hand, from another cache)
        shutil.copy2(other / "shards" / f"shard-00003.{ext}", out / "shards" / f"shard-00001.{ext}")
    (out / "plan.json").write_text("{}")
    rep = prepare_corpus(RampSource(9), out, SPEC, shard_records=3, workers=0, progress=False)
    assert rep.n_converted_now == 3
    assert CorpusCache(out).keys == [f"ramp/r{i}" for i in range(9)]


@pytest.mark.parametrize("lost", [("plan.json",), ("plan.json", "manifest.json")])
def test_lost_bookkeeping_never_passes_old_shards_off_as_another_spec(tmp_path, lost):
    """plan.json lost (and maybe manifest.json): a rerun with another preprocessing is refused (the manifest still
    names the old spec), or, with neither file left, converts every shard again; the same spec keeps them."""
    out = _cache(tmp_path)
    other = PreprocessSpec.raw(fs=100)
    for name in lost:
        (out / name).unlink()
    if lost == ("plan.json",):
        with pytest.raises(ValueError, match="spec differ"):
            prepare_corpus(RampSource(9), out, other, shard_records=3, workers=0, progress=False)
        assert prepare_corpus(RampSource(9), out, SPEC, shard_records=3, workers=0,
                              progress=False).n_converted_now == 0
        return
    rep = prepare_corpus(RampSource(9), out, other, shard_records=3, workers=2, progress=False)
    assert rep.n_converted_now == 9
    ref = tmp_path / "ref"
    prepare_corpus(RampSource(9), ref, other, shard_records=3, workers=0, progress=False)
    assert np.array_equal(CorpusCache(out).signal(4), CorpusCache(ref).signal(4))
    for name in lost:                 # shards written since record their preparation: kept on the next loss
        (out / name).unlink()
    assert prepare_corpus(RampSource(9), out, other, shard_records=3, workers=0,
                          progress=False).n_converted_now == 0


# ---------------------------------------------------------------------------------------------- loaders


def test_nonfinite_window_stops_the_loader_naming_shard_and_record(tmp_path):
    from ecgfm.data.datamodules import PretrainDataModule

    out = _cache(tmp_path)
    shard = _poison(out, 4, keep_stat=True)
    dm = PretrainDataModule([str(out)], crop_samples=300, batch_size=9, val_fraction=0.0,
                            samples_per_epoch=90, drop_last=False)
    with pytest.raises(NonFiniteDataError) as err:
        for _ in dm.train_dataloader():
            pass
    msg = str(err.value)
    assert str(out) in msg and shard.name in msg and "ramp/r4" in msg and "nonfinite='skip'" in msg


def test_nonfinite_skip_counts_and_never_yields_nan(tmp_path):
    from ecgfm.data.datamodules import DownstreamDataModule, PretrainDataModule

    out = _cache(tmp_path)
    _poison(out, 4, keep_stat=True)
    dm = PretrainDataModule([str(out)], crop_samples=300, batch_size=9, val_fraction=0.0,
                            samples_per_epoch=90, drop_last=False, nonfinite="skip")
    seen = 0
    for batch in dm.train_dataloader():   # r4 holds NaN: none of its crops is used, also those missing them
        assert np.isfinite(batch["x"].numpy()).all() and len(batch["x"]) == 9
        assert 4 not in batch["index"].tolist()
        seen += 1
    report = dm.nonfinite_report()
    assert seen == 10 and report["skipped"] >= 1 and report["records"] == ["ramp/r4"]
    # evaluation drops the record's windows (a record is never scored on NaN input)
    y = np.zeros((9, 2), np.float32)
    down = DownstreamDataModule(str(out), y, {"train": [0, 1], "val": [3, 4, 5], "test": [6]},
                                crop_samples=100, batch_size=4, test_stride=50, nonfinite="skip")
    idx = np.concatenate([b["index"].numpy() for b in down.val_dataloader()])
    assert 4 not in idx and set(idx) == {3, 5}
    assert down.nonfinite_report()["records"] == ["ramp/r4"]
    strict = DownstreamDataModule(str(out), y, {"train": [0, 1], "val": [3, 5], "test": [4]},
                                  crop_samples=100, batch_size=4, test_stride=50)
    with pytest.raises(NonFiniteDataError, match="ramp/r4"):
        list(strict.test_dataloader())
    with pytest.raises(ValueError, match="nonfinite"):
        PretrainDataModule([str(out)], nonfinite="ignore")


def test_nonfinite_error_crosses_worker_processes_as_a_clear_error(tmp_path):
    from ecgfm.data.datamodules import PretrainDataModule

    out = _cache(tmp_path)
    _poison(out, 4, keep_stat=True)
    dm = PretrainDataModule([str(out)], crop_samples=300, batch_size=9, val_fraction=0.0, num_workers=1,
                            samples_per_epoch=90, drop_last=False, persistent_workers=False)
    with pytest.raises(NonFiniteDataError) as err:
        list(dm.train_dataloader())
    assert "ramp/r4" in str(err.value) and "shard-00001.bin" in str(err.value)


# ---------------------------------------------------------------------------------------------- stale inputs


def _ptbxl_copy(fixture_dir: Path, dest: Path, n: int = 6) -> Path:
    """A small PTB-XL folder: the first ``n`` records of the fixture and the two CSVs."""
    from ecgfm.data.readers import PTBXLSource

    src = PTBXLSource(fixture_dir / "ptbxl", fs=100)
    for rid in src.record_ids()[:n]:
        rel = src._files[rid]
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copy2(fixture_dir / "ptbxl" / f"{rel}{ext}", dest / f"{rel}{ext}")
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy2(fixture_dir / "ptbxl" / name, dest / name)
    return dest


def _edit_label(root: Path, ecg_id: int, codes: str) -> None:
    path = root / "ptbxl_database.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = rows[0]
    for row in rows[1:]:
        if int(float(row[head.index("ecg_id")])) == ecg_id:
            row[head.index("scp_codes")] = codes
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "shards").glob("*.bin"))}


def test_label_edit_relabels_without_rebuilding_signals(fixture_dir, tmp_path, caplog):
    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl")
    out = tmp_path / "c"
    prepare_corpus(PTBXLSource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    first = CorpusCache(out)
    rid = first.index["record_id"][2]
    bins = _stats(out)
    _edit_label(root, int(rid), "{'MI': 100.0}")
    assert cache_mod.input_changes(out) and "ptbxl_database.csv" in " ".join(cache_mod.input_changes(out))
    with caplog.at_level(logging.WARNING):
        rep = prepare_corpus(PTBXLSource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    assert "ptbxl_database.csv" in caplog.text and rep.n_relabelled == 6 and rep.n_converted_now == 0
    cache = CorpusCache(out)
    assert tuple(cache.record(2).labels) == ("MI",) and cache.record(2).meta["scp_codes"] == {"MI": 100.0}
    assert _stats(out) == bins                               # no signal rewritten
    assert cache_mod.input_changes(out) == []


def test_replaced_record_file_rebuilds_its_shard(fixture_dir, tmp_path, caplog):
    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl")
    out = tmp_path / "c"
    prepare_corpus(PTBXLSource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    before = CorpusCache(out)
    sig0, sig1 = before.signal(0), before.signal(1)
    src = PTBXLSource(root)
    a, b = (root / src._files[r] for r in src.record_ids()[:2])
    shutil.copy(f"{b}.dat", f"{a}.dat")                        # record 0's signal file replaced by record 1's
    changes = cache_mod.input_changes(out)
    assert any(Path(f"{a}.dat").name in c for c in changes)
    with caplog.at_level(logging.WARNING):
        rep = prepare_corpus(PTBXLSource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    assert rep.n_converted_now == 2 and Path(f"{a}.dat").name in caplog.text
    after = CorpusCache(out)
    assert np.array_equal(after.signal(0), sig1) and not np.array_equal(after.signal(0), sig0)


def _retime(files, when_ns: int) -> None:
    for f in files:
        os.utime(f, ns=(when_ns, when_ns))


def test_new_times_with_the_same_bytes_keep_the_cache(fixture_dir, tmp_path, caplog):
    """A corpus copied without its times, touched or re-mounted is not converted again: each file with new times
    is hashed once against the digest recorded at conversion, and its new times are remembered."""
    from ecgfm.data.prepare import prepare_cache
    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl")
    cfg = {"_target_": "ecgfm.data.readers.PTBXLSource", "root": str(root), "fs": 100}
    out = Path(prepare_cache([cfg], str(tmp_path / "auto"), SPEC, name="p", progress=False, shard_records=2))
    bins = _stats(out)
    records = sorted(p for p in root.rglob("*") if p.suffix in (".dat", ".hea"))
    entry = next(iter(cache_mod._recorded_inputs(out).values()))
    assert len(entry) == 3 and len(entry[2]) == cache_mod._INPUT_DIGEST_CHARS
    _retime(records, time.time_ns() + 10**10)
    restamped: dict = {}
    assert cache_mod.input_changes(out) == []                       # new times, same bytes: no change
    assert cache_mod.input_changes(out, restamped=restamped) == [] and set(restamped) == {str(f) for f in records}
    with caplog.at_level(logging.INFO, logger="ecgfm.data.cache"):
        assert prepare_cache([cfg], str(tmp_path / "auto"), SPEC, name="p", progress=False,
                             shard_records=2) == str(out)
    assert f"{len(records)} record file(s) have new times" in caplog.text
    assert _stats(out) == bins and len(CorpusCache(out)) == 6     # nothing converted again
    restamped.clear()                                                # the new times were recorded: no hash now
    assert cache_mod.input_changes(out, restamped=restamped) == [] and restamped == {}
    # a later run that checks every shard (a folder changed) keeps the verified times too
    (records[0].parent / "new_note.txt").write_text("x")
    rep = prepare_corpus(PTBXLSource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    assert rep.n_converted_now == 0 and _stats(out) == bins
    assert cache_mod.input_changes(out, restamped=restamped) == [] and restamped == {}
    # new bytes are still a change, whatever the times say
    dat = next(f for f in records if f.suffix == ".dat")
    raw = bytearray(dat.read_bytes())
    raw[100] ^= 1
    dat.write_bytes(bytes(raw))
    assert any(dat.name in c for c in cache_mod.input_changes(out))
    rep = prepare_corpus(PTBXLSource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    assert rep.n_converted_now == 2


def test_inputs_without_digests_count_new_times_as_changes(fixture_dir, tmp_path):
    """Caches written before content digests: a file with new times is a change (converted again), as before."""
    import json

    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl", n=2)
    out = tmp_path / "c"
    prepare_corpus(PTBXLSource(root), out, SPEC, workers=0, progress=False)
    doc = json.loads((out / "inputs.json").read_text())
    doc["records"] = {f: v[:2] for f, v in doc["records"].items()}
    (out / "inputs.json").write_text(json.dumps(doc))
    dat = sorted(root.rglob("*.dat"))[0]
    _retime([dat], time.time_ns() + 10**10)
    assert any(dat.name in c for c in cache_mod.input_changes(out))
    assert cache_mod._content_unchanged(str(dat), None) is False
    assert cache_mod._content_unchanged(str(tmp_path / "gone.dat"), "0" * 16) is False


def test_a_file_rewritten_while_hashed_keeps_no_digest(tmp_path, monkeypatch):
    """The digest must describe the bytes of the recorded times: a file that changes between the stat and the hash
    gets no digest, so a later change of its times is a change (not taken for a copy of the same bytes)."""
    f = tmp_path / "r.dat"
    f.write_bytes(b"old bytes")

    class Src:
        def input_files(self, rid):
            return [str(f)]

    real = cache_mod._input_digest
    assert len(cache_mod._record_inputs(Src(), "r", None)[0]) == 4        # a quiet file: [file, size, mtime, digest]

    def racing(path):
        d = real(path)
        Path(path).write_bytes(b"new bytes, rewritten during the hash")
        return d

    monkeypatch.setattr(cache_mod, "_input_digest", racing)
    entry = cache_mod._record_inputs(Src(), "r", None)[0]
    assert len(entry) == 3 and entry[1] == f.stat().st_size               # the times after it, no digest


def test_a_file_of_another_size_is_a_change_without_a_hash(tmp_path, monkeypatch):
    f = tmp_path / "r.dat"
    f.write_bytes(b"0123456789")
    digest = cache_mod._input_digest(f)
    calls = []
    real = cache_mod._input_digest
    monkeypatch.setattr(cache_mod, "_input_digest", lambda p: calls.append(p) or real(p))
    f.write_bytes(b"01234567890123")
    assert cache_mod._content_unchanged(str(f), digest, {}, size=10) is False and calls == []
    f.write_bytes(b"0123456789")                                            # same bytes back: hashed, unchanged
    assert cache_mod._content_unchanged(str(f), digest, {}, size=10) is True and len(calls) == 1


def test_many_changed_inputs_are_summarised_in_the_log(fixture_dir, tmp_path, caplog):
    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl", n=12)
    out = tmp_path / "c"
    prepare_corpus(PTBXLSource(root), out, SPEC, workers=0, progress=False)
    heads = sorted(root.rglob("*.hea"))
    for h in heads:                                                  # new bytes (a comment line), still readable
        h.write_text(h.read_text() + "# edited\n")
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.cache"):
        rep = prepare_corpus(PTBXLSource(root), out, SPEC, workers=0, progress=False)
    assert len(rep.changes) == 12 and rep.n_converted_now == 12
    named = [r for r in caplog.records if "changed or removed" in r.getMessage()]
    assert len(named) == cache_mod._LOGGED_CHANGES
    assert "... and 2 more changed inputs (12 in all)" in caplog.text


def test_added_record_is_named_or_rebuilt_by_prepare_cache(fixture_dir, tmp_path):
    from ecgfm.data.prepare import prepare_cache
    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl", n=4)
    out = tmp_path / "c"
    prepare_corpus(PTBXLSource(root), out, SPEC, workers=0, progress=False)
    full = PTBXLSource(fixture_dir / "ptbxl")
    new = full.record_ids()[4]
    for ext in (".hea", ".dat"):
        shutil.copy2(fixture_dir / "ptbxl" / f"{full._files[new]}{ext}", root / f"{full._files[new]}{ext}")
    assert cache_mod.input_changes(out)
    with pytest.raises(ValueError, match=rf"different preparation.*added.*{new}"):
        prepare_corpus(PTBXLSource(root), out, SPEC, workers=0, progress=False)
    # the keyed caches of the training / evaluation pipelines are rebuilt
    cfg = {"_target_": "ecgfm.data.readers.PTBXLSource", "root": str(root), "fs": 100}
    d = prepare_cache([cfg], str(tmp_path / "auto"), SPEC, name="p", progress=False)
    assert len(CorpusCache(d)) == 5
    # a record added at the end: the shards before it are kept, not converted again
    (root / f"{full._files[new]}.dat").unlink()
    (root / f"{full._files[new]}.hea").unlink()
    small = prepare_cache([cfg], str(tmp_path / "auto2"), SPEC, name="p", progress=False, shard_records=2)
    kept = _stats(Path(small))
    for ext in (".hea", ".dat"):
        shutil.copy2(fixture_dir / "ptbxl" / f"{full._files[new]}{ext}", root / f"{full._files[new]}{ext}")
    assert prepare_cache([cfg], str(tmp_path / "auto2"), SPEC, name="p", progress=False, shard_records=2) == small
    assert len(CorpusCache(small)) == 5 and _stats(Path(small)).items() >= kept.items()
    (root / f"{full._files[new]}.hea").unlink()
    (root / f"{full._files[new]}.dat").unlink()
    _edit_label(root, int(full.record_ids()[0]), "{'LVH': 50.0}")
    assert prepare_cache([cfg], str(tmp_path / "auto"), SPEC, name="p", progress=False) == d
    cache = CorpusCache(d)
    assert len(cache) == 4 and cache.record(0).labels == ("LVH",)


def test_records_in_a_new_sub_folder_are_not_missed_by_prepare_cache(fixture_dir, tmp_path):
    """A record added in a new sub-folder (records100/01000/, the next PTB-XL block) changes only the mtime of
    records100/, which held no record and was not the root: the cache was returned as current, without it."""
    from ecgfm.data.prepare import prepare_cache
    from ecgfm.data.readers import PTBXLSource

    root = _ptbxl_copy(fixture_dir, tmp_path / "ptbxl", n=4)
    cfg = {"_target_": "ecgfm.data.readers.PTBXLSource", "root": str(root), "fs": 100}
    d = prepare_cache([cfg], str(tmp_path / "auto"), SPEC, name="p", progress=False)
    assert len(CorpusCache(d)) == 4
    full = PTBXLSource(fixture_dir / "ptbxl")
    rel = full._files[full.record_ids()[0]]
    new = root / "records100" / "01000"
    new.mkdir()
    hea = (fixture_dir / "ptbxl" / f"{rel}.hea").read_text().replace(Path(rel).name, "01001_lr")
    (new / "01001_lr.hea").write_text(hea)
    shutil.copy2(fixture_dir / "ptbxl" / f"{rel}.dat", new / "01001_lr.dat")
    assert cache_mod.input_changes(d)
    d2 = prepare_cache([cfg], str(tmp_path / "auto"), SPEC, name="p", progress=False)
    assert len(CorpusCache(d2)) == len(PTBXLSource(root, fs=100).record_ids()) == 5


def test_prepare_cache_fast_path_costs_no_source_build(tmp_path, monkeypatch):
    from ecgfm.data import prepare as prep

    cfg = {"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": 3, "fs": 100.0, "duration": 2.5}
    d = prep.prepare_cache([cfg], str(tmp_path), SPEC, name="s", progress=False)
    monkeypatch.setattr(prep, "instantiate", lambda *a, **k: pytest.fail("sources built for a fresh cache"))
    assert prep.prepare_cache([cfg], str(tmp_path), SPEC, name="s", progress=False) == d


def test_concurrent_prepare_is_refused_with_its_message(tmp_path):
    from ecgfm.io import file_lock

    out = tmp_path / "c"
    out.mkdir()
    with file_lock(out / ".lock"):
        with pytest.raises(RuntimeError, match="another preparation is writing this cache"):
            prepare_corpus(RampSource(3), out, SPEC, workers=0, progress=False)


def test_pipelines_and_tasks_use_the_data_layer():
    import ecgfm.data.prepare as prep
    import ecgfm.pipelines as pipelines

    for name in ("prepare_cache", "check_data_paths", "cache_key", "build_cache_dirs", "PREPARED_MARKER"):
        assert getattr(pipelines, name) is getattr(prep, name)
    assert not hasattr(pipelines, "_file_lock")
    text = (ROOT / "ecgfm" / "evaluate" / "tasks.py").read_text()
    assert "ecgfm.pipelines" not in text.replace("ecgfm.pipelines.prepare_cache", "")


# ---------------------------------------------------------------------------------------------- workers


def _loader_child(cache: str, ready) -> None:
    """The loader's parent process: a loader with two workers, one batch drawn, then asleep until killed."""
    from ecgfm.data.datamodules import PretrainDataModule

    dm = PretrainDataModule([cache], crop_samples=100, batch_size=3, num_workers=2, val_fraction=0.0,
                            samples_per_epoch=10_000)
    it = iter(dm.train_dataloader())
    next(it)
    ready()
    time.sleep(120)


def _prepare_child(cache: str, ready) -> None:
    """The conversion's parent process: two conversion workers, each slowed to 0.5 s per record."""
    from ecgfm.data.synthetic import SyntheticSource

    os.environ["ECGFM_PREPARE_RECORD_DELAY"] = "0.5"
    ready()
    prepare_corpus(SyntheticSource(64, seed=0, fs=100.0, duration=2.5), cache, {"fs": 100}, shard_records=4,
                   workers=2, progress=False)


_CHILD_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.unit.test_cache_integrity import {fn}
    {fn}({cache!r}, lambda: print("READY", flush=True))
""")


class _Parent:
    """The process whose workers must exit when it is killed: forked from this one on Linux (a second interpreter
    importing torch and ecgfm first took seconds), ``python -c`` elsewhere (no safe fork)."""

    def __init__(self, kind: str, cache: str) -> None:
        fn = _loader_child if kind == "loader" else _prepare_child
        if sys.platform.startswith("linux"):
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            ready = ctx.Event()
            self.proc = ctx.Process(target=fn, args=(cache, ready.set))
            self.proc.start()
            self.ready = ready.wait(120)
        else:
            script = _CHILD_SCRIPT.format(root=str(ROOT), fn=fn.__name__, cache=cache)
            self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
            self.ready = self.proc.stdout.readline().strip() == "READY"
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.is_alive() if hasattr(self.proc, "is_alive") else self.proc.poll() is None

    def kill_and_wait(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join() if hasattr(self.proc, "join") else self.proc.wait()


def _cmdline(proc) -> str:
    """A child's command line; "" for one that exited between the listing and this call."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.parametrize("kind", ["loader", "prepare"])
def test_workers_exit_when_their_parent_is_killed(tmp_path, kind):
    psutil = pytest.importorskip("psutil")
    kids: list = []
    proc = _Parent(kind, str(_cache(tmp_path) if kind == "loader" else tmp_path / "p"))
    try:
        assert proc.ready
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 60
        while time.time() < deadline:
            kids = [k for k in parent.children(recursive=True) if "resource_tracker" not in _cmdline(k)]
            if len(kids) >= 2:
                break
            time.sleep(0.2)
        assert len(kids) >= 2, "workers did not start"
        time.sleep(1.0)
        proc.kill_and_wait()
        # the watchdog checks every 0.25 s; 15 s leaves room for a loaded 2-core machine (CI, a training run
        # beside the suite), where 4 s was seen to flake, and still fails workers that never exit
        gone, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive, f"workers still running 15 s after their parent was killed: {alive}"
    finally:
        if proc.running():
            proc.kill_and_wait()
        for k in kids:   # only the workers this test started
            if k.is_running():
                k.kill()


_UNGUARDED_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.synthetic import SyntheticSource


    class BigIndexSource(SyntheticSource):
        \"\"\"A source whose pickled state (a long record index) is larger than a pipe's 64 KiB buffer.\"\"\"

        def __init__(self):
            super().__init__(8, seed=0, fs=100.0, duration=2.5)
            self.index = ["record-%06d" % i for i in range(20_000)]


    # no `if __name__ == "__main__":` guard: each spawned worker runs this line again and dies
    prepare_corpus(BigIndexSource(), {cache!r}, {{"fs": 100}}, shard_records=2, workers=2, progress=False)
""")


def test_a_script_without_a_main_guard_fails_with_a_message_not_a_hang(tmp_path):
    """Spawned workers import the calling script again; one that calls prepare_corpus unguarded kills them at
    start. The parent must not block on the start-up pipe (large sources used to hang it forever) and must say
    what to do."""
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT.format(root=str(ROOT), cache=str(tmp_path / "c")))
    try:
        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("prepare_corpus hung when its spawned workers died at start")
    assert p.returncode != 0
    assert "a conversion worker died" in p.stderr and "if __name__ == '__main__':" in p.stderr
    assert not list((tmp_path / "c").glob(".workers.*"))       # the workers' argument file is removed


def test_a_swapped_worker_argument_file_is_refused_not_unpickled(tmp_path):
    import hashlib
    import pickle

    f = tmp_path / ".workers.1.tmp"
    f.write_bytes(pickle.dumps(([], SPEC, str(tmp_path), [])))
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_bytes(pickle.dumps(([], SPEC, str(tmp_path / "elsewhere"), [])))    # swapped after the parent wrote it
    with pytest.raises(RuntimeError, match="changed after it was written"):
        cache_mod._worker_init_from_file(str(f), good, None)


def test_undecodable_record_id_is_skipped_not_fatal(tmp_path):
    class Src(RampSource):
        def record_ids(self):
            return ["r0", "r1", os.fsdecode(b"r\xff2")]

        def load(self, rid):
            if rid.startswith("r\udcff"):
                raise ECGDataError(os.fsdecode(b"/data/r\xff2.hea"), "file name is not valid UTF-8")
            return super().load(rid)

    rep = prepare_corpus(Src(), tmp_path / "c", SPEC, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped) == (2, 1) and "not valid UTF" in next(iter(rep.skipped_reasons))
