"""Corpus cache under interruption and tampering (review s27, r11): a record restored before the resume of an
interrupted preparation is read again (D2); a format-version-1 cache is converted again, not relabelled version 2
without input fingerprints, and its refusal names the format version (D5); a hand-edited manifest is refused on
open and written again by a rerun (D3); a manifest with a wrong derived-file checksum is repaired by preparing
again (D4)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import ecgfm.data.cache as C
from ecgfm.data.cache import CorpusCache, input_changes, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError, ECGRecord
from ecgfm.data.synthetic import SyntheticSource
from ecgfm.io import dumps

SPEC = PreprocessSpec(fs=100.0)


class NpySource:
    """One ``.npy`` file (12, T) per record in ``root``."""

    name = "npy"

    def __init__(self, root):
        self.root = str(root)

    def record_ids(self):
        return sorted(f[:-4] for f in os.listdir(self.root) if f.endswith(".npy"))

    def load(self, rid):
        p = os.path.join(self.root, rid + ".npy")
        try:
            sig = np.load(p).astype(np.float32)
        except OSError as exc:
            raise ECGDataError(p, f"unreadable: {exc}") from exc
        return ECGRecord(signal=sig, fs=100.0, lead_mask=np.ones(12, bool), record_id=rid, source=self.name,
                         patient_id=rid, labels=("x",), header={"path": p})


def _npy_records(root, n=6, t=1000):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(root / f"r{i:02d}.npy", rng.standard_normal((12, t)).astype(np.float32) * 0.1)


def _edit_manifest(out, fn):
    manifest = json.loads((out / "manifest.json").read_text())
    fn(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------------------------------- D2


def test_a_record_restored_before_the_resume_of_an_interrupted_run_is_read_again(tmp_path, fixture_dir,
                                                                                   monkeypatch):
    """A record skipped for a missing file in a run interrupted later, its file restored before the resume: the
    resume reads it again (as an uninterrupted run would) and says so. It stayed skipped for good: the folder
    times recorded were the resume's, taken after the restore."""
    from ecgfm.data.readers.folder import FolderSource

    data = tmp_path / "data"
    data.mkdir()
    for hea in sorted((fixture_dir / "cinc2021").glob("*.hea"))[:3]:
        for f in hea.parent.glob(hea.stem + ".*"):
            shutil.copy(f, data / f.name)
    ids = sorted(p.stem for p in data.glob("*.hea"))
    mat = data / f"{ids[0]}.mat"
    kept = mat.read_bytes()
    mat.unlink()
    out = tmp_path / "cache"
    real = C._convert_shard

    def interrupted(i, items):
        if i == 2:
            raise KeyboardInterrupt("Ctrl-C during shard 2")
        return real(i, items)

    monkeypatch.setattr(C, "_convert_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(FolderSource(data), out, SPEC, shard_records=1, workers=0, progress=False)
    monkeypatch.setattr(C, "_convert_shard", real)
    pending = out / "inputs.pending.json"   # the first run's folder times, kept for the resume
    had_pending = pending.exists()
    mat.write_bytes(kept)                   # restored before the resume: only its folder's time tells
    resumed = prepare_corpus(FolderSource(data), out, SPEC, shard_records=1, workers=0, progress=False)
    assert (resumed.n_converted, resumed.n_skipped) == (3, 0)
    assert any("its folder changed" in line for line in resumed.changes)
    assert had_pending and not pending.exists()   # removed once inputs.json is written
    again = prepare_corpus(FolderSource(data), out, SPEC, shard_records=1, workers=0, progress=False)
    assert (again.n_converted, again.n_skipped, again.n_converted_now, again.changes) == (3, 0, 0, [])
    assert len(CorpusCache(out)) == 3


# ------------------------------------------------------------------------------------------------------- D5


def _v1_cache(root, out, monkeypatch):
    """A cache as format version 1 wrote it (written with FORMAT_VERSION=1, then stripped of what v1 lacked:
    input and content fingerprints, inputs.json, file sizes, plan skips)."""
    monkeypatch.setattr(C, "FORMAT_VERSION", 1)
    prepare_corpus(NpySource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    monkeypatch.setattr(C, "FORMAT_VERSION", 2)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("file_bytes", None)
    for sh in manifest["shards"]:
        p = out / sh["index"]
        info = json.loads(p.read_text())
        for k in ("labels_fp", "content_fp"):
            info.pop(k, None)
        for r in info["records"] + info["skipped"]:
            r.pop("inputs", None)
        b = dumps(info, convert=False).encode()
        p.write_bytes(b)
        sh.pop("index_bytes", None)
        sh["index_sha256"] = hashlib.sha256(b).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "inputs.json").unlink()
    (out / ".verified.json").unlink()
    plan = json.loads((out / "plan.json").read_text())
    plan.pop("skipped", None)
    (out / "plan.json").write_text(json.dumps(plan))


def test_a_format_version_1_cache_is_converted_again_and_its_refusal_names_the_format(tmp_path, monkeypatch):
    """A v1 cache: prepare_corpus refuses it naming the format version (it claimed the spec / sources / ids /
    shard size differ); input_changes says its inputs cannot be checked (so prepare_cache does not take it as
    fresh); the prepare_cache path converts every shard again (it reused them, relabelled the cache version 2
    with no input fingerprints, and a record file replaced later was never seen)."""
    root, out = tmp_path / "data", tmp_path / "cache"
    _npy_records(root)
    _v1_cache(root, out, monkeypatch)
    assert len(CorpusCache(out)) == 6   # v1 caches are read
    with pytest.raises(ValueError, match="format version 1") as err:
        prepare_corpus(NpySource(root), out, SPEC, shard_records=2, workers=0, progress=False)
    assert "spec, sources, record ids or shard size differ" not in str(err.value)
    assert any("format version 1" in line for line in input_changes(out))
    with C.file_lock(out / C.LOCK_FILE):
        report = C._prepare_locked(*C._check_prepare_args(NpySource(root), SPEC, 2, 0), out, progress=False,
                                   rebuild_on_plan_change=True)
    assert (report.n_converted, report.n_shards_reused) == (6, 0)
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 2
    assert len(json.loads((out / "inputs.json").read_text())["records"]) == 6
    assert input_changes(out) == []
    np.save(root / "r00.npy", np.ones((12, 1000), np.float32) * 0.5)   # a record file replaced afterwards
    assert any("r00.npy" in line for line in input_changes(out))


# ------------------------------------------------------------------------------------------------------- D3


def test_a_hand_edited_manifest_spec_is_refused_on_open_and_written_again_by_a_rerun(tmp_path):
    """manifest.json's spec / fs edited (100 Hz data labelled 250 Hz): opening names manifest.json; the same
    prepare command writes it again from plan.json (it kept the edit)."""
    out = tmp_path / "c"
    src = lambda: SyntheticSource(12, fs=100.0, duration=5.0)   # noqa: E731
    prepare_corpus(src(), out, SPEC, shard_records=4, workers=0, progress=False)
    _edit_manifest(out, lambda m: (m["spec"].__setitem__("fs", 250.0), m.__setitem__("fs", 250.0)))
    with pytest.raises(ECGDataError, match="manifest.json.*spec differs from plan.json"):
        CorpusCache(out)
    prepare_corpus(src(), out, SPEC, shard_records=4, workers=0, progress=False)
    cache = CorpusCache(out)
    assert (cache.spec.fs, cache.fs, len(cache)) == (100.0, 100.0, 12)


def test_a_shard_entry_removed_from_the_manifest_is_named_not_an_index_error(tmp_path):
    """The last shard entry removed from manifest.json: opening names manifest.json; with check='none', reading a
    record of that shard names manifest.json too (it was a bare IndexError)."""
    out = tmp_path / "c"
    prepare_corpus(SyntheticSource(12, fs=100.0, duration=5.0), out, SPEC, shard_records=4, workers=0,
                   progress=False)
    _edit_manifest(out, lambda m: m["shards"].pop())
    with pytest.raises(ECGDataError, match="manifest.json"):
        CorpusCache(out)
    cache = CorpusCache(out, check="none")
    with pytest.raises(ECGDataError, match="manifest.json.*shard 2"):
        cache.signal(11)


# ------------------------------------------------------------------------------------------------------- D4


def test_a_wrong_derived_checksum_in_the_manifest_is_repaired_by_preparing_again(tmp_path):
    """manifest.json's records.npy checksum wrong: opening says 'prepare it again', and now the same prepare
    command does repair it (it rebuilt records.npy and raised the same error again, verify or not)."""
    out = tmp_path / "c"
    src = lambda: SyntheticSource(12, fs=100.0, duration=5.0)   # noqa: E731
    prepare_corpus(src(), out, SPEC, shard_records=4, workers=0, progress=False)
    good = json.loads((out / "manifest.json").read_text())["files"]["records.npy"]
    _edit_manifest(out, lambda m: m["files"].__setitem__("records.npy", "0" * 64))
    with pytest.raises(ECGDataError, match="prepare it again"):
        CorpusCache(out)
    report = prepare_corpus(src(), out, SPEC, shard_records=4, workers=0, progress=False)
    assert report.n_converted == 12
    assert json.loads((out / "manifest.json").read_text())["files"]["records.npy"] == good
    assert len(CorpusCache(out, check="full")) == 12


def test_prepare_cache_repairs_a_manifest_the_open_refuses(tmp_path):
    """prepare_cache (training configs, tasks) took the cache for fresh and returned it untouched, so the open's
    'prepare it again with the same command' looped."""
    from pathlib import Path

    from ecgfm.data.prepare import prepare_cache

    src = [SyntheticSource(8, fs=100.0, duration=5.0)]
    spec = PreprocessSpec(fs=100.0)
    out = prepare_cache(src, str(tmp_path), spec, name="t", shard_records=4, progress=False)
    _edit_manifest(Path(out), lambda m: (m["spec"].__setitem__("fs", 250.0), m.__setitem__("fs", 250.0)))
    with pytest.raises(ECGDataError, match="manifest.json"):
        CorpusCache(out)
    assert prepare_cache(src, str(tmp_path), spec, name="t", shard_records=4, progress=False) == out
    assert CorpusCache(out).fs == 100.0


def test_a_manifest_is_not_rewritten_over_a_shard_index_damaged_without_a_stat_change(tmp_path):
    """The derived-checksum repair wrote the manifest from a bit-rotted shard index (same size, stat marked as
    verified), so even check='full' then vouched for the damage."""
    from pathlib import Path

    out = Path(tmp_path) / "c"
    prepare_corpus(SyntheticSource(8, fs=100.0, duration=5.0), out, PreprocessSpec(fs=100.0), shard_records=4,
                   workers=0, progress=False)
    sj = out / "shards" / "shard-00001.json"
    text = sj.read_text()
    k = [i for i in range(len(text)) if text.startswith('"offset":', i)][1] + len('"offset":')
    text = text[:k] + str((int(text[k]) + 1) % 10) + text[k + 1:]          # one digit: same size
    sj.write_text(text)
    verified = json.loads((out / ".verified.json").read_text())           # bit rot: the stat looks verified
    verified["shards/shard-00001.json"] = [*C._stat_key(sj), verified["shards/shard-00001.json"][-1]]
    (out / ".verified.json").write_text(json.dumps(verified))
    (out / "index.jsonl").unlink()                                           # and a derived file lost
    with pytest.raises(ECGDataError, match=r"shard-00001\.json: differs from its checksum .*verify=true"):
        prepare_corpus(SyntheticSource(8, fs=100.0, duration=5.0), out, PreprocessSpec(fs=100.0), shard_records=4,
                       workers=0, progress=False)
