"""Leakage guard, review s22: identities that do not depend on a source's name (the file a record was read from and
its content), and an external set checked against the task's own training data.

An encoder pretrained with ``data=folder`` on a folder, then evaluated with ``eval_data=folder`` on that same folder,
passed the guard: identities were ``<source>/<record_id>`` and the external set's source is ``external_folder``. And
the task's own folder as its external set was scored as "external" data the head was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from ecgfm.evaluate import leakage
from ecgfm.evaluate.leakage import LeakageError, check_leakage, index_identities, record_identities

ROOT = Path(__file__).resolve().parents[2]


def _files(folder: Path, names, payload: str = "") -> list[Path]:
    """``<name>.hea`` + ``<name>.dat`` for each name (the .dat's bytes differ by name unless ``payload`` is set)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        (folder / f"{n}.hea").write_text(f"{n} 12 500 5000\n")
        (folder / f"{n}.dat").write_bytes((payload or f"signal of {n}").encode())
        out.append(folder / f"{n}.hea")
    return out


def _index(source: str, paths, patients=None) -> pd.DataFrame:
    rows = [(p.stem if isinstance(p, Path) else f"r{i}", source, (patients or {}).get(i), {},
             {"path": str(p)} if p is not None else {})
            for i, p in enumerate(paths)]
    return pd.DataFrame(rows, columns=["record_id", "source", "patient_id", "meta", "header"])


def _inputs_json(cache_dir: Path, folders, unreadable=(), no_digest=()) -> Path:
    """An ``inputs.json`` as the cache writes it: ``{"records": {abs file: [size, mtime_ns, digest]}}``."""
    import hashlib

    cache_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for folder in folders:
        for f in sorted(Path(folder).iterdir()):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            entry = [f.stat().st_size, f.stat().st_mtime_ns, digest]
            if f.name in unreadable:
                entry[2] = "unreadable"
            if f.name in no_digest:
                entry = entry[:2]
            records[os.path.abspath(f)] = entry
    (cache_dir / "inputs.json").write_text(json.dumps({"records": records, "labels": {}, "dirs": {}}))
    return cache_dir


# ------------------------------------------------------------------------------------------------- identities
def test_the_same_file_read_under_two_source_names_is_one_record(tmp_path):
    paths = _files(tmp_path / "mydata", ["a", "b", "c"])
    pre = index_identities(_index("folder", paths))
    ext = index_identities(_index("external_folder", paths[:2]))
    with pytest.raises(LeakageError, match="2 record"):
        check_leakage(pre, ext, what="external set")
    rep = check_leakage(pre, ext, allow=True)
    assert rep.shared_records == ["external_folder/a", "external_folder/b"]
    assert rep.to_dict()["matched_by"] == ["file"]
    assert ("external_folder/a", "folder/a") in rep.examples
    # another folder with the same file names is not the same records (named apart, different files and bytes)
    other = _files(tmp_path / "hospital_b", ["a", "b"], payload="another recording")
    assert not check_leakage(pre, index_identities(_index("external_folder", other))).leaked


def test_file_identity_resolves_linked_folders_and_ignores_relative_paths(tmp_path):
    paths = _files(tmp_path / "real", ["a"])
    os.symlink(tmp_path / "real", tmp_path / "alias")              # a linked folder (/data -> /mnt/disk/data)
    want = f"file:{os.path.realpath(paths[0])}"
    assert want in record_identities("folder", "a", path=str(tmp_path / "alias" / "a.hea"))
    assert want in record_identities("folder", "a", path=str(tmp_path / "real" / "sub" / ".." / "a.hea"))
    # relative to a working directory the index does not record (the synthetic corpus' "synthetic/syn000001")
    assert record_identities("synthetic", "syn000001", None, {"seed": 0}, path="synthetic/syn000001") == \
        {"rec:synthetic@seed0/syn000001"}
    assert record_identities("cinc2017", "A00001", None, {}) == {"rec:cinc2017/A00001"}   # no path: as before


def test_a_file_holding_several_records_identifies_none_of_them(tmp_path):
    """A source reading several records from one file: the path is not one record's identity (else every
    record of that file would be 'the same' as any other)."""
    big = _files(tmp_path / "d", ["all"])[0]
    single = _files(tmp_path / "d", ["one"])[0]
    index = _index("multi", [big, big, single])
    ids = index_identities(index, rows=[0])
    assert not any(i.startswith("file:") for i in ids)
    assert f"file:{os.path.realpath(single)}" in index_identities(index, rows=[2])


def test_content_identity_matches_a_copy_in_another_folder(tmp_path):
    src = _files(tmp_path / "mydata", ["a", "b", "c"])
    shutil.copytree(tmp_path / "mydata", tmp_path / "scratch_copy")
    copy = [tmp_path / "scratch_copy" / p.name for p in src[:2]]
    pre_cache = SimpleNamespace(index=_index("folder", src),
                                path=_inputs_json(tmp_path / "c_pre", [tmp_path / "mydata"]))
    ext_cache = SimpleNamespace(index=_index("external_folder", copy),
                                path=_inputs_json(tmp_path / "c_ext", [tmp_path / "scratch_copy"]))
    rep = check_leakage(leakage.cache_identities(pre_cache), leakage.cache_identities(ext_cache), allow=True)
    assert rep.shared_records == ["external_folder/a", "external_folder/b"] and rep.matched_by == ["content"]
    with pytest.raises(LeakageError, match="2 record"):
        check_leakage(leakage.cache_identities(pre_cache), leakage.cache_identities(ext_cache))
    # the index alone (no fingerprints) sees different files
    assert not check_leakage(index_identities(pre_cache.index), index_identities(ext_cache.index)).leaked


def test_content_identity_needs_every_file_of_the_record_fingerprinted(tmp_path):
    _files(tmp_path / "d", ["a", "b", "c"])
    (tmp_path / "d" / "lonely.hea").write_text("lonely 12 500 5000\nother_name.dat 16\n")
    fps = leakage.content_fingerprints(_inputs_json(tmp_path / "cache", [tmp_path / "d"], unreadable={"b.dat"},
                                            no_digest={"c.hea"}))
    d = os.path.abspath(tmp_path / "d")
    assert fps[os.path.join(d, "a.hea")] == fps[os.path.join(d, "a.dat")]
    assert os.path.join(d, "b.hea") not in fps and os.path.join(d, "c.hea") not in fps
    assert os.path.join(d, "lonely.hea") not in fps   # a header alone: two minimal headers may be byte-identical
    assert leakage.content_fingerprints(tmp_path / "no_cache_here") == {}
    # records whose headers are equal but whose signals differ are different recordings
    _files(tmp_path / "e", ["a"], payload="another recording")
    other = leakage.content_fingerprints(_inputs_json(tmp_path / "cache_e", [tmp_path / "e"]))
    assert other[os.path.abspath(tmp_path / "e" / "a.hea")] != fps[os.path.join(d, "a.hea")]


def test_same_files_overlap_gets_no_hint_to_rename_the_sources(tmp_path):
    """The generic-name hint (two different folders with equal file names) is wrong when the very files match."""
    paths = _files(tmp_path / "mydata", ["rec1"])
    with pytest.raises(LeakageError) as exc:
        check_leakage(index_identities(_index("folder", paths)), index_identities(_index("folder", paths)))
    assert "+task.sources.0.name=" not in str(exc.value)
    names_only = _index("folder", [None])
    names_only["record_id"] = ["rec1"]
    with pytest.raises(LeakageError, match=r"\+task\.sources\.0\.name="):
        check_leakage(index_identities(names_only), index_identities(names_only))


def test_against_names_what_the_evaluated_records_overlap(tmp_path):
    paths = _files(tmp_path / "mydata", ["a", "b"])
    with pytest.raises(LeakageError) as exc:
        check_leakage(index_identities(_index("folder", paths)), index_identities(_index("external_folder", paths)),
                      what="external set folder (external_folder)",
                      against="the folder training and validation splits (folder)")
    msg = str(exc.value)
    assert "2 record(s) and 0 patient(s) of the external set folder (external_folder) are also in the folder " \
           "training and validation splits" in msg and "allow_leakage=true" in msg and "pretraining" not in msg


# ------------------------------------------------------------------------------------------- sweep plumbing
def _data(name: str, dataset: str, index: pd.DataFrame, cache_dir: Path, splits: dict) -> SimpleNamespace:
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
    return SimpleNamespace(name=name, dataset=dataset, cache=SimpleNamespace(index=index, path=cache_dir),
                           splits=splits)


def test_sweep_refuses_an_external_set_holding_the_tasks_training_records(tmp_path):
    """Whatever the encoder (a random one here: no pretraining data at all), the external set is checked against
    the task's train and val splits; allowed, the overlap is recorded in the cell's leakage entry."""
    from ecgfm.evaluate.sweep import leakage_check

    paths = _files(tmp_path / "mydata", [f"r{i}" for i in range(6)])
    task = _data("folder", "folder", _index("folder", paths), tmp_path / "c1",
                 {"train": [0, 1, 2], "val": [3], "test": [4, 5]})
    ext = _data("folder", "external_folder", _index("external_folder", paths), tmp_path / "c2",
                {"test": [1, 3, 4, 5]})
    enc = SimpleNamespace(kind="random", method="random", checkpoint="random:resnet1d_test", info={},
                          export_dir=None)
    with pytest.raises(LeakageError, match=r"2 record\(s\) .* of the external set folder \(external_folder\)"):
        leakage_check(enc, task, ext, allow=False, pretrain_caches=[])
    out = leakage_check(enc, task, ext, allow=True, pretrain_caches=[])
    entry = out["external:external_folder/task_train_val"]
    assert out["leaked"] is True and entry["leaked"] and entry["n_shared_records"] == 2
    assert "no pretraining data" in out["note"]
    clean = _data("folder", "external_folder", _index("external_folder", paths), tmp_path / "c2", {"test": [4, 5]})
    out = leakage_check(enc, task, clean, allow=False, pretrain_caches=[])
    assert out["leaked"] is False and out["external:external_folder/task_train_val"]["checked"]


# ------------------------------------------------------------------------------------ end to end (small caches)
@pytest.fixture(scope="module")
def mydata(tmp_path_factory) -> Path:
    from ecgfm.data.synthetic import write_wfdb

    out = tmp_path_factory.mktemp("mydata")
    write_wfdb(out, 45, seed=3, fs=100.0, duration=10.0)
    return out


def _folder_source(root: Path, name: str | None = None) -> dict:
    src = {"_target_": "ecgfm.data.readers.FolderSource", "root": str(root), "labels_csv": str(root / "labels.csv"),
           "id_column": "record_id", "label_columns": ["label"], "patient_column": "patient_id",
           "include_unlabelled": False}
    return {**src, "name": name} if name else src


def _probe_cfg(tmp: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "bootstrap.n=20", "plot=false", "torch_threads=1", "checkpoint=random:resnet1d_test", "fraction=1.0",
            "seed=0", "probe.Cs=[1.0]"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("probe", overrides=base + list(overrides))


def _eval_folder(root: Path) -> list[str]:
    return ["eval_data=folder", f"eval_data.root={root}", "eval_data.params.label_columns=[label]",
            "eval_data.params.patient_column=patient_id"]


def test_probe_refuses_the_pretraining_folder_as_external_set(tmp_path, mydata):
    """``data=folder`` pretraining cache of a folder, ``eval_data=folder`` on the same folder: refused before any
    head is trained (the repro of the review, with a random encoder naming its pretraining cache)."""
    from ecgfm.data.prepare import prepare_cache
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.evaluate.sweep import probe_main

    pre = prepare_cache([_folder_source(mydata)], str(tmp_path / "cache"), PreprocessSpec(fs=100.0), name="folder",
                        workers=0)
    cfg = _probe_cfg(tmp_path, "task=synthetic", "task.params.n_records=120", *_eval_folder(mydata),
                     f"pretrain_caches=[{pre}]")
    with pytest.raises(LeakageError, match=r"45 record\(s\) and 0 patient\(s\) with the folder "
                                           r"external:external_folder split"):
        probe_main(cfg)


def test_the_tasks_own_folder_is_no_external_set(tmp_path, mydata):
    """``task=folder`` and ``eval_data=folder`` on the same folder: every external record is a task record (by its
    file, whatever the source names), so none is left to score."""
    from ecgfm.evaluate.sweep import probe_main

    cfg = _probe_cfg(tmp_path, "task=folder", f"task.root={mydata}", "task.params.label_columns=[label]",
                     "task.params.patient_column=patient_id", "task.multilabel=false", *_eval_folder(mydata))
    with pytest.raises(ValueError, match=r"no labelled record is left after excluding the task's own records") as exc:
        probe_main(cfg)
    assert "45 record(s) excluded (45 labelled): also a record or patient of folder's train/val/test" in str(exc.value)


def test_copied_task_records_are_removed_from_an_external_folder(tmp_path, mydata):
    """An external folder holding copies of 5 task records beside 20 records of its own: the copies (same bytes,
    another folder, another source name) are removed from it and counted; the others are scored."""
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import write_wfdb
    from ecgfm.evaluate.tasks import TaskSpec, build_external, build_task

    ext_root = tmp_path / "hospital_c"
    write_wfdb(ext_root, 20, seed=4, fs=100.0, duration=10.0)          # syn000000 ... syn000019
    rows = (ext_root / "labels.csv").read_text().splitlines()
    mine = (mydata / "labels.csv").read_text().splitlines()[31:36]      # syn000030 ... syn000034 of the task
    for line in mine:
        rid = line.split(",")[0]
        for suffix in (".hea", ".dat"):
            shutil.copy(mydata / f"{rid}{suffix}", ext_root / f"{rid}{suffix}")
    (ext_root / "labels.csv").write_text("\n".join(rows + mine) + "\n")
    spec = PreprocessSpec(fs=100.0)
    task = build_task(TaskSpec.from_config({
        "name": "folder", "dataset": "folder", "labels": "record", "multilabel": False,
        "sources": [_folder_source(mydata)], "split": {"kind": "stratified", "fractions": [0.7, 0.15, 0.15],
                                                       "seed": 0}}), str(tmp_path / "cache"), spec)
    assert {f"folder/{line.split(',')[0]}" for line in mine} <= set(
        task.record_keys(np.concatenate(list(task.splits.values()))))
    ext_spec = TaskSpec.from_config({"name": "folder", "dataset": "external_folder", "labels": "record",
                                     "multilabel": False, "sources": [_folder_source(ext_root, "external_folder")],
                                     "split": {"kind": "all"}})
    ext = build_external(ext_spec, task, str(tmp_path / "cache"), spec)
    kept = ext.record_keys(ext.splits["test"])
    assert len(kept) == 20 and not any(k.split("/")[1] in {m.split(",")[0] for m in mine} for k in kept)
    assert any("5 record(s) excluded" in n and "train/val/test" in n for n in ext.notes)
