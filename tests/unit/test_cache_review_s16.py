"""Corpus cache review s16: readers of a cache updated in place, inputs changed during a build, the shard-map
bound, a streamed merge (memory, byte-identical outputs) and records skipped for an OS error."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data import cache as cache_mod
from ecgfm.data.cache import RECORDS_DTYPE, CorpusCache, input_changes, patient_hash, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError, ECGRecord
from ecgfm.io import atomic_write, dumps, sha256_file

SPEC = PreprocessSpec(fs=100)

#: record ids whose load() fails with a wrapped PermissionError (no file involved): see test 5b
LOAD_DENIED: set[str] = set()


class FileSource:
    """Records are ``.npy`` files (12 x T float32) in ``root``; labels in ``root/labels.csv`` (``id,label``)."""

    def __init__(self, root, name="files", fs=250.0, on_load=None, on_list=None):
        self.root, self.name, self.fs = str(root), name, float(fs)
        self.on_load, self.on_list = on_load, on_list   # test hooks (module-level functions of a path)

    def record_ids(self):
        ids = sorted(f[:-4] for f in os.listdir(self.root) if f.endswith(".npy"))
        if self.on_list is not None:
            globals()[self.on_list](self.root)
        return ids

    def label_files(self):
        return [os.path.join(self.root, "labels.csv")]

    def load(self, rid):
        if self.on_load is not None:
            globals()[self.on_load](self.root, rid)
        p = os.path.join(self.root, rid + ".npy")
        if rid in LOAD_DENIED:
            try:
                raise PermissionError(13, "Permission denied", p)
            except PermissionError as exc:
                raise ECGDataError(p, f"unreadable: {exc}") from exc
        try:
            sig = np.load(p)
        except OSError as exc:
            raise ECGDataError(p, f"unreadable: {exc}") from exc
        labels = ()
        lp = os.path.join(self.root, "labels.csv")
        if os.path.exists(lp):
            for line in open(lp):
                a = line.strip().split(",")
                if a[0] == rid:
                    labels = (a[1],)
        return ECGRecord(signal=sig.astype(np.float32), fs=self.fs, lead_mask=np.ones(12, bool), record_id=rid,
                         source=self.name, patient_id=rid[-1], labels=labels, meta={}, header={"path": p})


def _make(root: Path, n: int, t: int = 1000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(root / f"r{i:03d}.npy", (rng.standard_normal((12, t)) + i).astype(np.float32))
    (root / "labels.csv").write_text("".join(f"r{i:03d},c{i % 2}\n" for i in range(n)))
    return root


def _prepare(root: Path, out: Path, **kw):
    kw.setdefault("shard_records", 4)
    return prepare_corpus(FileSource(root, **kw.pop("src", {})), out, SPEC, workers=0, progress=False, **kw)


# ------------------------------------------------------------------------ 1. readers of a cache updated in place


def test_a_reader_refuses_a_shard_replaced_since_it_opened_the_cache(tmp_path):
    root, out = _make(tmp_path / "src", 8), tmp_path / "c"
    _prepare(root, out)
    lazy = CorpusCache(out)                 # opened, nothing read yet (records.npy not mapped)
    evicted = CorpusCache(out)              # shard 0 read, then its map closed (LRU bound)
    before = evicted.signal(2).copy()
    other = evicted.signal(5).copy()        # shard 1
    evicted._maps.clear()
    mapped = CorpusCache(out)               # shard 0 mapped and kept: reads the old file, consistently
    mapped.signal(2)
    pickled = pickle.dumps(evicted)         # what a DataLoader worker receives

    s = np.load(root / "r001.npy")          # r001 re-exported longer: shard 0 is converted again in place
    np.save(root / "r001.npy", np.concatenate([s, s], axis=1))
    rep = _prepare(root, out)
    assert rep.n_converted_now == 4 and any("r001.npy" in c for c in rep.changes)

    with pytest.raises(ECGDataError, match=r"shard-00000\.bin.*changed since this reader opened the cache.*reopen"):
        evicted.signal(2)
    with pytest.raises(ECGDataError, match="changed since this reader opened"):
        pickle.loads(pickled).signal(2)
    with pytest.raises(ECGDataError, match=r"records\.npy.*changed since this reader opened"):
        lazy.signal(2)
    np.testing.assert_array_equal(evicted.signal(5), other)    # an unchanged shard still reads
    np.testing.assert_array_equal(mapped.signal(2), before)    # an open map keeps the old inode
    np.testing.assert_array_equal(CorpusCache(out).signal(2), before)   # a new reader sees the update
    np.testing.assert_array_equal(CorpusCache(out, check="none").signal(2), before)


def test_a_reader_opened_without_checks_still_refuses_a_replaced_shard(tmp_path):
    root, out = _make(tmp_path / "src", 8), tmp_path / "c"
    _prepare(root, out)
    reader = CorpusCache(out, check="none")
    reader.columns()
    s = np.load(root / "r005.npy")
    np.save(root / "r005.npy", np.concatenate([s, s], axis=1))
    _prepare(root, out)
    reader.signal(0)                                            # shard 0 untouched
    with pytest.raises(ECGDataError, match=r"shard-00001\.bin.*changed since"):
        reader.signal(5)


# ------------------------------------------------------------------------ 2. inputs changed while a build runs


def _add_record_once(root, rid):
    """on_load hook: a new record file arrives while the cache is being converted (after the listing)."""
    extra = os.path.join(root, "r999.npy")
    if rid == "r000" and not os.path.exists(extra):
        np.save(extra, np.ones((12, 1000), np.float32))


def _edit_labels(root):
    """on_list hook: the label table is edited right after the record ids were listed."""
    with open(os.path.join(root, "labels.csv"), "a") as f:
        f.write("r000,c9\n")


def test_a_record_added_during_the_build_is_seen_as_a_change(tmp_path):
    root, out = _make(tmp_path / "src", 6), tmp_path / "c"
    rep = _prepare(root, out, src={"on_load": "_add_record_once"})
    assert rep.n_planned == 6 and (root / "r999.npy").exists()
    changes = input_changes(out)
    assert any(f"folder {root}" in c for c in changes), changes


def test_a_label_table_edited_after_the_listing_is_seen_as_a_change(tmp_path):
    root, out = _make(tmp_path / "src", 4), tmp_path / "c"
    _prepare(root, out, src={"on_list": "_edit_labels"})
    changes = input_changes(out)
    assert any("labels.csv" in c for c in changes), changes


# ------------------------------------------------------------------------ 3. shard-map bound


def test_default_shard_map_bound_keeps_a_large_corpus_mapped(tmp_path):
    root, out = _make(tmp_path / "src", 70, t=300), tmp_path / "c"
    _prepare(root, out, shard_records=1)                        # 70 shards: more than the old bound (64)
    cache = CorpusCache(out)
    assert cache.max_open_shards == getattr(cache_mod, "MAX_OPEN_SHARDS", None) >= 4096
    for i in range(len(cache)):
        cache.signal(i)
    assert len(cache._maps) == 70                               # no map closed and reopened
    small = CorpusCache(out, max_open_shards=8)
    for i in range(len(small)):
        small.signal(i)
    assert len(small._maps) == 8
    with pytest.raises(ValueError, match="max_open_shards"):
        CorpusCache(out, max_open_shards=0)


# ------------------------------------------------------------------------ 4. streamed merge


def _old_merge_shards(out: Path, shard_names):
    """The merge as it was before review s16 (every shard index held at once): the reference bytes."""
    shards_dir = out / "shards"
    jsons = []
    n_total = 0
    for name in shard_names:
        json_bytes = (shards_dir / f"{name}.json").read_bytes()
        info = json.loads(json_bytes)
        jsons.append((name, json_bytes, info))
        n_total += len(info["records"])
    records_path, index_path = out / "records.npy", out / "index.jsonl"
    skipped_rows, by_source, fs_values, shard_infos = [], {}, set(), []
    h_index = hashlib.sha256()

    def write_records(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=RECORDS_DTYPE, shape=(n_total,))
        pos = 0
        for i, (_, _, info) in enumerate(jsons):
            for r in info["records"]:
                arr[pos] = (i, r["offset"], r["n_samples"], r["n_leads"], np.array(r["lead_mask"], dtype=bool),
                            r["fs"], patient_hash(r["source"], r["patient_id"]))
                pos += 1
        arr.flush()
        del arr

    def write_index(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as fidx:
            for _, _, info in jsons:
                for r in info["records"]:
                    row = {k: r[k] for k in ("record_id", "source", "patient_id", "labels", "fs", "n_samples",
                                             "lead_mask", "meta", "header")}
                    line = dumps(row, convert=False) + "\n"
                    fidx.write(line)
                    h_index.update(line.encode())

    atomic_write(records_path, write_records)
    atomic_write(index_path, write_index)
    for name, json_bytes, info in jsons:
        for r in info["records"]:
            fs_values.add(float(r["fs"]))
            by_source.setdefault(r["source"], {"converted": 0, "skipped": 0})["converted"] += 1
        skipped_rows.extend(info["skipped"])
        shard_infos.append({"name": name, "bin": f"shards/{name}.bin", "index": f"shards/{name}.json",
                            "n_records": len(info["records"]), "n_skipped": len(info["skipped"]),
                            "bin_bytes": int(info["bin_bytes"]), "bin_sha256": info["bin_sha256"],
                            "index_bytes": len(json_bytes), "index_sha256": hashlib.sha256(json_bytes).hexdigest()})
    return {"n_total": n_total, "shards": shard_infos, "skipped": skipped_rows, "by_source": by_source,
            "fs_values": fs_values, "index_sha256": h_index.hexdigest(), "records_sha256": sha256_file(records_path)}


def test_streamed_merge_writes_the_old_bytes(tmp_path):
    root = _make(tmp_path / "src", 11)
    np.save(root / "r004.npy", np.zeros((12, 1000), np.float32))    # flat: skipped
    (root / "r007.npy").write_bytes(b"not a npy file")                # unreadable: skipped
    out = tmp_path / "c"
    prepare_corpus([FileSource(root), FileSource(root, name="again")], out, SPEC, shard_records=3, workers=0,
                   progress=False, allow_duplicate_ids=True)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [sh["name"] for sh in manifest["shards"]]
    ref = tmp_path / "ref"
    shutil.copytree(out, ref)
    (ref / "records.npy").unlink()
    (ref / "index.jsonl").unlink()
    old = _old_merge_shards(ref, names)
    new = cache_mod._merge_shards(out, names)
    for rel in ("records.npy", "index.jsonl"):
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel
        assert sha256_file(out / rel) == manifest["files"][rel]       # the manifest of the build still verifies
    assert new["records_sha256"] == old["records_sha256"] and new["index_sha256"] == old["index_sha256"]
    assert new["shards"] == old["shards"] and new["by_source"] == old["by_source"]
    assert new["fs_values"] == old["fs_values"] and new["n_total"] == old["n_total"] == 18
    assert cache_mod._skipped_csv(new["skipped"]) == cache_mod._skipped_csv(old["skipped"])
    assert len(new["skipped"]) == 4
    CorpusCache(out, check="full")
    empty = tmp_path / "e"                                          # no record at all: a header-only table
    (empty / "shards").mkdir(parents=True)
    (empty / "shards" / "shard-00000.json").write_text(json.dumps(
        {"shard": "shard-00000", "bin_bytes": 0, "bin_sha256": "x", "records": [], "skipped": []}))
    shutil.copytree(empty, tmp_path / "e2")
    cache_mod._merge_shards(empty, ["shard-00000"])
    _old_merge_shards(tmp_path / "e2", ["shard-00000"])
    assert (empty / "records.npy").read_bytes() == (tmp_path / "e2" / "records.npy").read_bytes()


def test_merge_memory_does_not_grow_with_the_corpus(tmp_path):
    out = tmp_path / "m"
    (out / "shards").mkdir(parents=True)
    n_shards, per = 24, 40
    for s in range(n_shards):
        recs = [{"key": f"x/{s}-{j}", "record_id": f"{s}-{j}", "source": "x", "patient_id": str(j),
                 "labels": ["a"], "fs": 100.0, "n_samples": 1000, "n_leads": 12, "lead_mask": [True] * 12,
                 "offset": 0, "meta": {"note": f"{s}-{j}-" + "m" * 4000}, "header": {"path": f"/d/{s}-{j}.hea"}}
                for j in range(per)]
        (out / "shards" / f"shard-{s:05d}.json").write_text(json.dumps(
            {"shard": f"shard-{s:05d}", "bin_bytes": 0, "bin_sha256": "x", "records": recs, "skipped": []}))
    one_shard = (out / "shards" / "shard-00000.json").stat().st_size

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            cache_mod._merge_shards(out, [f"shard-{s:05d}" for s in range(n)])
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # (a constant part: the 4 MiB read block of sha256_file.) Every index held at once: the peak grows by about
    # one parsed index per shard (> 18 * one_shard from 6 to 24 shards); streamed: it does not grow
    growth = peak(n_shards) - peak(6)
    assert growth < 2 * one_shard, (growth, one_shard)


# ------------------------------------------------------------------------ 5. records skipped for an OS error


@pytest.fixture
def deny(monkeypatch):
    """``deny(path)``: opening ``path`` raises PermissionError (also for root, whom chmod does not stop)."""
    denied: set[str] = set()
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return denied


def test_a_record_unreadable_at_conversion_is_converted_once_readable(tmp_path, deny):
    root, out = _make(tmp_path / "src", 8), tmp_path / "c"
    locked = str((root / "r001.npy").resolve())
    deny.add(locked)
    rep = _prepare(root, out)
    assert (rep.n_converted, rep.n_skipped) == (7, 1)
    info = json.loads((out / "shards" / "shard-00000.json").read_text())
    row = info["skipped"][0]
    assert row["transient"] is True
    assert [locked, *cache_mod._file_stat(locked), getattr(cache_mod, "UNREADABLE", "unreadable")] in row["inputs"]
    assert _prepare(root, out).n_skipped == 1 and input_changes(out) == []      # still unreadable: unchanged

    deny.clear()                          # permission fixed: neither size nor mtime changed
    assert any("can be read now" in c and "r001.npy" in c for c in input_changes(out))
    rep = _prepare(root, out)
    assert (rep.n_converted, rep.n_skipped, rep.n_converted_now) == (8, 0, 4)
    assert any("can be read now" in c for c in rep.changes)
    assert _prepare(root, out).n_converted_now == 0 and input_changes(out) == []


def test_verify_retries_records_skipped_for_an_os_error(tmp_path):
    root, out = _make(tmp_path / "src", 8), tmp_path / "c"
    LOAD_DENIED.add("r006")
    try:
        rep = _prepare(root, out)
        assert (rep.n_converted, rep.n_skipped) == (7, 1)
        assert json.loads((out / "shards" / "shard-00001.json").read_text())["skipped"][0]["transient"] is True
    finally:
        LOAD_DENIED.clear()
    assert _prepare(root, out).n_skipped == 1          # nothing of the record changed: a plain rerun keeps it
    rep = _prepare(root, out, verify=True)
    assert (rep.n_converted, rep.n_skipped, rep.n_converted_now) == (8, 0, 4)
    assert any("r006" in c and "OS error" in c for c in rep.changes)


def test_a_skip_for_bad_data_is_not_retried_by_verify(tmp_path):
    root, out = _make(tmp_path / "src", 4), tmp_path / "c"
    (root / "r002.npy").write_bytes(b"garbage")
    _prepare(root, out)
    info = json.loads((out / "shards" / "shard-00000.json").read_text())
    assert "transient" not in info["skipped"][0]
    rep = _prepare(root, out, verify=True)
    assert rep.n_converted_now == 0 and rep.n_skipped == 1
