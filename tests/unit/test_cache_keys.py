"""What identifies a cache: every setting of its sources (lists included), relative paths resolved against the
working directory, so a changed setting or another data folder is never answered with an older cache."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.prepare import prepare_cache
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SyntheticSource

SPEC = PreprocessSpec(fs=100)


def test_a_changed_list_setting_is_another_preparation(tmp_path):
    """SyntheticSource(leads=[I]) then leads=[I, II] into the same folder: a list setting is part of the plan, so
    the folder is refused as holding a different preparation (it was returned as current, with lead I only)."""
    out = tmp_path / "syn"
    prepare_corpus(SyntheticSource(6, seed=0, duration=5.0, leads=["I"]), out, SPEC, workers=0, progress=False)
    assert CorpusCache(out).lead_masks[0, :2].tolist() == [True, False]
    with pytest.raises(ValueError, match="holds a different preparation"):
        prepare_corpus(SyntheticSource(6, seed=0, duration=5.0, leads=["I", "II"]), out, SPEC, workers=0,
                       progress=False)


def test_built_sources_with_other_settings_get_their_own_cache(tmp_path, fixture_dir):
    """Two FolderSources over one folder that read other label columns (their repr names neither): two caches,
    each with its own labels (the second was handed the first one's)."""
    from ecgfm.data.readers.folder import FolderSource

    root = fixture_dir / "cinc2021"
    ids = [p.stem for p in sorted(root.glob("*.hea"))]
    table = tmp_path / "labels.csv"
    table.write_text("record_id,a,b\n" + "".join(f"{i},x{k},y{k}\n" for k, i in enumerate(ids)))
    dirs = [prepare_cache([FolderSource(root, labels_csv=table, label_columns=[col])], str(tmp_path / "c"), SPEC,
                          name="f", progress=False) for col in ("a", "b")]
    assert dirs[0] != dirs[1]
    assert [CorpusCache(d).index["labels"].iat[0] for d in dirs] != [CorpusCache(dirs[0]).index["labels"].iat[0]] * 2


def test_the_same_relative_root_in_two_folders_is_two_caches(tmp_path, monkeypatch, fixture_dir):
    """``root: data`` run from two project folders names two corpora: two keys, two caches, each its own records."""
    import shutil

    cache_root = tmp_path / "cache"
    dirs = {}
    for name, n in (("projA", 2), ("projB", 3)):
        data = tmp_path / name / "data"
        data.mkdir(parents=True)
        for src in sorted((fixture_dir / "cinc2021").glob("*.hea"))[:n]:
            for f in src.parent.glob(src.stem + ".*"):
                shutil.copy(f, data / f.name)
        monkeypatch.chdir(tmp_path / name)
        dirs[name] = prepare_cache([{"_target_": "ecgfm.data.readers.Challenge2021Source", "root": "data"}],
                                   str(cache_root), SPEC, name="c", progress=False)
    assert dirs["projA"] != dirs["projB"]
    assert [len(CorpusCache(dirs[k])) for k in ("projA", "projB")] == [2, 3]


def _copy_records(fixture_dir, dest, n):
    import shutil

    dest.mkdir(parents=True)
    for hea in sorted((fixture_dir / "cinc2021").glob("*.hea"))[:n]:
        for f in hea.parent.glob(hea.stem + ".*"):
            shutil.copy(f, dest / f.name)
    return sorted(p.stem for p in dest.glob("*.hea"))


def test_a_record_skipped_for_a_missing_file_is_read_again_once_restored(tmp_path, fixture_dir):
    from ecgfm.data.readers.folder import FolderSource

    data = tmp_path / "data"
    ids = _copy_records(fixture_dir, data, 3)
    mat = data / f"{ids[1]}.mat"
    kept = mat.read_bytes()
    mat.unlink()
    out = tmp_path / "cache"
    first = prepare_corpus(FolderSource(data), out, SPEC, workers=0, progress=False)
    assert (first.n_converted, first.n_skipped) == (2, 1)
    mat.write_bytes(kept)                                    # restored: only its folder's time tells
    again = prepare_corpus(FolderSource(data), out, SPEC, workers=0, progress=False)
    assert (again.n_converted, again.n_skipped) == (3, 0)
    assert any("its folder changed" in line for line in again.changes)
    assert len(CorpusCache(out)) == 3


def test_a_label_table_edited_in_place_with_the_same_size_and_time_is_read_again(tmp_path, fixture_dir):
    import os

    from ecgfm.data.readers.folder import FolderSource

    data = tmp_path / "data"
    ids = _copy_records(fixture_dir, data, 2)
    table = tmp_path / "labels.csv"
    table.write_text("record_id,label\n" + "".join(f"{i},aaaa\n" for i in ids))
    out = tmp_path / "cache"
    prepare_corpus(FolderSource(data, labels_csv=table), out, SPEC, workers=0, progress=False)
    st = table.stat()
    table.write_text("record_id,label\n" + "".join(f"{i},bbbb\n" for i in ids))   # same size
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns))                            # same time
    report = prepare_corpus(FolderSource(data, labels_csv=table), out, SPEC, workers=0, progress=False)
    assert report.n_relabelled == 2
    assert set(CorpusCache(out).labels_matrix(["aaaa", "bbbb"]).argmax(axis=1)) == {1}


def test_a_relative_checkpoint_argument_is_resolved_in_the_cache_key(tmp_path, monkeypatch):
    """``checkpoint: g.pt`` (e.g. a generator's weights) read from two working directories is two files: the key of
    a source config resolves it as it resolves ``root`` (one cache for both would hold the first file's output)."""
    from ecgfm.data.prepare import _absolute_paths, cache_key

    keys = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        monkeypatch.chdir(tmp_path / sub)
        cfg = _absolute_paths({"_target_": "ecgfm.data.synthetic.SyntheticSource", "checkpoint": "g.pt"})
        assert cfg["checkpoint"] == str((tmp_path / sub / "g.pt").resolve())
        keys.append(cache_key([cfg], PreprocessSpec()))
    assert keys[0] != keys[1]


def test_folder_source_caches_of_before_labels_known_are_not_reused(tmp_path, fixture_dir):
    """A FolderSource cache prepared before records carried meta["labels_known"] would be reused (same config) and
    its tasks would still drop the negatives of 0/1 flag columns: the reader's version is part of its caches' key.
    Readers without a version keep their keys (the benchmark's PTB-XL / CinC 2017 caches are not rebuilt)."""
    import hashlib
    import json

    from ecgfm.data.prepare import SOURCE_VERSIONS, cache_key
    from ecgfm.data.readers.folder import FolderSource

    def old_key(sources):   # the key before reader versions existed
        payload = json.dumps({"sources": sources, "spec": SPEC.fingerprint()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    folder = [{"_target_": "ecgfm.data.readers.FolderSource", "root": "/data/x", "labels_csv": "/data/x/l.csv"}]
    ptbxl = [{"_target_": "ecgfm.data.readers.PTBXLSource", "root": "/data/ptbxl", "sampling_rate": 100}]
    assert SOURCE_VERSIONS["FolderSource"] >= 2
    assert cache_key(folder, SPEC) != old_key(folder)
    assert cache_key(ptbxl, SPEC) == old_key(ptbxl)
    built = prepare_cache([FolderSource(fixture_dir / "cinc2021")], str(tmp_path / "c"), SPEC, name="f",
                          progress=False)
    from ecgfm.data.prepare import source_description

    described = [source_description(FolderSource(fixture_dir / "cinc2021"))]
    assert built.endswith(cache_key(described, SPEC)) and cache_key(described, SPEC) != old_key(described)


def test_folder_source_patient_and_id_columns_are_part_of_its_identity(tmp_path):
    """A FolderSource read with another patient_column (or id_column, encoding) describes itself differently, so a
    cache of the old setting is not returned as current (it kept the old cache's patients: every record its own
    patient, after patient ids were asked for)."""
    from ecgfm.data.cache import describe_source
    from ecgfm.data.readers.folder import FolderSource
    from ecgfm.data.synthetic import write_wfdb

    write_wfdb(tmp_path / "data", 6, fs=100.0, duration=5.0)
    kw = dict(labels_csv="labels.csv", id_column="record_id", label_columns=["label"])
    a = FolderSource(tmp_path / "data", patient_column="", **kw)
    b = FolderSource(tmp_path / "data", patient_column="patient_id", **kw)
    assert describe_source(a) != describe_source(b) and describe_source(b)["patient_column"] == "patient_id"
    da = prepare_cache([a], str(tmp_path / "c"), SPEC, name="f", progress=False)
    db = prepare_cache([b], str(tmp_path / "c"), SPEC, name="f", progress=False)
    assert da != db
    assert (CorpusCache(da).patients == -1).all() and (CorpusCache(db).patients != -1).all()
    with pytest.raises(ValueError, match="different preparation"):
        prepare_corpus(b, da, SPEC, workers=0, progress=False)
