"""Held-out-free pretraining pools: ``heldout_free_source`` and ``data=pretrain_pool_heldout_free``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SyntheticSource
from ecgfm.evaluate.leakage import LeakageError, check_leakage, index_identities, pretrain_identities
from ecgfm.evaluate.tasks import (
    ExcludingSource,
    TaskSpec,
    build_task,
    heldout_free_source,
    load_task_spec,
    tasks_holdout_record_ids,
)
from ecgfm.data.prepare import build_cache_dirs, cache_key, prepare_cache, source_description

ROOT = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec()
N_SYN = 30


def _syn_source() -> SyntheticSource:
    return SyntheticSource(N_SYN, seed=1, fs=100.0, duration=3.0)


def _syn_task(split_seed: int = 0, name: str = "syn") -> dict:
    """A task over the same 30 synthetic records as ``_syn_source`` (a stratified 60/20/20 split)."""
    return {"name": name, "dataset": "syn", "labels": "record", "multilabel": False, "crop_seconds": 1.0,
            "sources": [{"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": N_SYN, "seed": 1,
                         "fs": 100.0, "duration": 3.0}],
            "split": {"kind": "stratified", "fractions": [0.6, 0.2, 0.2], "seed": split_seed}}


def _split_ids(task_cfg: dict, cache_root: Path, parts=("val", "test")) -> set[str]:
    """The task's split record ids read straight from its cache index (the reference)."""
    task = build_task(TaskSpec.from_config(task_cfg), str(cache_root), SPEC)
    ids = task.cache.index["record_id"]
    return {str(ids.iat[int(i)]) for p in parts for i in task.splits[p]}


def test_excludes_exactly_the_val_and_test_records_of_the_tasks(tmp_path):
    src = _syn_source()
    pool = heldout_free_source(src, [_syn_task()], cache_root=str(tmp_path))
    expected = _split_ids(_syn_task(), tmp_path)
    assert isinstance(pool, ExcludingSource) and pool.name == "synthetic"
    assert set(pool.exclude) == expected and 0 < len(expected) < N_SYN
    assert set(pool.record_ids()) == set(src.record_ids()) - expected
    train = _split_ids(_syn_task(), tmp_path, parts=("train",))
    assert train <= set(pool.record_ids())  # training records stay in the pool
    # two tasks: the union of their held-out records
    both = heldout_free_source(src, [_syn_task(0), _syn_task(1, "syn_b")], cache_root=str(tmp_path))
    assert set(both.exclude) == expected | _split_ids(_syn_task(1, "syn_b"), tmp_path)
    # parts=("test",) holds out the test side only
    assert set(heldout_free_source(src, [_syn_task()], parts=["test"], cache_root=str(tmp_path)).exclude) == \
        _split_ids(_syn_task(), tmp_path, parts=("test",))


def test_records_of_other_sources_are_untouched(tmp_path):
    other = SyntheticSource(5, seed=1, fs=100.0, duration=3.0)
    other.name = "other"  # same record ids, another source name: nothing of it is held out
    pool = heldout_free_source(other, [_syn_task()], cache_root=str(tmp_path))
    assert pool.exclude == frozenset() and pool.record_ids() == other.record_ids()


def test_cache_key_follows_the_excluded_set(tmp_path):
    src = _syn_source()
    a = heldout_free_source(src, [_syn_task(0)], cache_root=str(tmp_path))
    a_again = heldout_free_source(_syn_source(), [_syn_task(0)], cache_root=str(tmp_path))
    b = heldout_free_source(src, [_syn_task(0), _syn_task(1, "syn_b")], cache_root=str(tmp_path))
    c = heldout_free_source(src, [_syn_task(1, "syn_b")], cache_root=str(tmp_path))  # same size, other records
    assert len(a.exclude) == len(c.exclude) and a.exclude != c.exclude
    keys = {n: cache_key([source_description(s)], SPEC) for n, s in (("a", a), ("a2", a_again), ("b", b),
                                                                         ("c", c))}
    assert keys["a"] == keys["a2"] and len({keys["a"], keys["b"], keys["c"]}) == 3
    # prepare_cache keys a built source by its description: the folder name changes with the excluded set
    pool_dir = prepare_cache([a], str(tmp_path), SPEC, name="pool", progress=False)
    assert Path(pool_dir).name == f"pool-{keys['a']}"
    from ecgfm.data.cache import CorpusCache

    assert sorted(CorpusCache(pool_dir).index["record_id"]) == a.record_ids()


def test_bad_task_name_and_parts_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'ptbxl_supr'.*did you mean 'ptbxl_super'"):
        heldout_free_source(_syn_source(), ["ptbxl_supr"], cache_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*cinc2017"):  # lists the available tasks
        tasks_holdout_record_ids(["nope"], cache_root=str(tmp_path))
    with pytest.raises(ValueError, match="parts"):
        tasks_holdout_record_ids([_syn_task()], parts=["tset"], cache_root=str(tmp_path))
    with pytest.raises(ValueError, match="at least one task"):
        tasks_holdout_record_ids([], cache_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"task 'folder'.*root"):  # a task file with a '???' value
        load_task_spec("folder")


def test_task_names_resolve_like_probe_py(tmp_path):
    spec = load_task_spec("ptbxl_super", data_root="/data", cache_root=str(tmp_path))
    assert spec.sources[0]["root"] == "/data/ptbxl" and spec.label_root == "/data/ptbxl"
    assert spec.split == {"kind": "folds", "key": "strat_fold", "train": [1, 2, 3, 4, 5, 6, 7, 8], "val": [9],
                          "test": [10]}
    assert load_task_spec(str(ROOT / "ecgfm" / "conf" / "task" / "cinc2017.yaml"), data_root="/d").sources[0]["root"] == \
        "/d/cinc2017"


# ------------------------------------------------------------------------------ real readers (PTB-XL fixture)
def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _fixture_folds(ptbxl: Path) -> dict[str, int]:
    df = pd.read_csv(ptbxl / "ptbxl_database.csv", usecols=["ecg_id", "strat_fold"])
    return {f"{int(e):05d}": int(f) for e, f in zip(df["ecg_id"], df["strat_fold"])}


@pytest.mark.realdata
def test_config_option_builds_a_pool_the_leakage_guard_accepts(fixture_dir, tmp_path):
    """data=pretrain_pool_heldout_free through Hydra on the PTB-XL fixture (ids 1-100): the pool lacks every
    record of strat_fold 9 / 10, the guard accepts it for ptbxl_super's test split and rejects the full pool."""
    from ecgfm.config import strip_params, validate_train_config
    from ecgfm.data.cache import CorpusCache

    cfg = validate_train_config(_compose([
        "data=pretrain_pool_heldout_free", f"out_dir={tmp_path / 'run'}", f"paths.data_root={fixture_dir}",
        f"paths.cache_root={tmp_path / 'cache'}", "data.params.exclude_tasks=[ptbxl_super]"]))
    data = strip_params(cfg.data)
    data.cache_dirs = [data.cache_dirs[0]]  # the PTB-XL half (the fixture has no CinC 2017 folder)
    data.cache_dirs[0].workers = 0
    data.cache_dirs[0].sources[0].workers = 0
    (pool_dir,) = build_cache_dirs(data)
    assert Path(pool_dir).name.startswith("pool_ptbxl-")
    folds = _fixture_folds(fixture_dir / "ptbxl")
    held = {r for r, f in folds.items() if f in (9, 10)}
    pooled = set(CorpusCache(pool_dir).index["record_id"])
    assert held and pooled == set(folds) - held  # every fixture record has a row: the rest is folds 1-8

    # the task the evaluation builds (same files, same preprocessing) and the leakage guard on its test split
    task = build_task(load_task_spec("ptbxl_super", str(fixture_dir), str(tmp_path / "cache")),
                      str(tmp_path / "cache"), SPEC)
    test_ids = index_identities(task.cache.index, task.splits["test"])
    assert len(task.splits["test"]) > 0
    pre, provenance = pretrain_identities({"extra": {"pretrain_caches": [pool_dir]}})
    assert provenance and not check_leakage(pre, test_ids, what="ptbxl_super test split").leaked
    full = prepare_cache([OmegaConf.create({"_target_": "ecgfm.data.readers.PTBXLSource",
                                            "root": str(fixture_dir / "ptbxl"), "fs": 100})],
                         str(tmp_path / "cache"), SPEC, name="ptbxl", progress=False)
    pre_full, _ = pretrain_identities({"extra": {"pretrain_caches": [full]}})
    with pytest.raises(LeakageError, match="record"):
        check_leakage(pre_full, test_ids, what="ptbxl_super test split")

    # the task's own val/test records alone (no fold rule) are a subset of folds 9/10, and another set of
    # exclusions is another cache
    from ecgfm.data.readers import PTBXLSource

    only_tasks = heldout_free_source(PTBXLSource(fixture_dir / "ptbxl", fs=100), ["ptbxl_super"],
                                     data_root=str(fixture_dir), cache_root=str(tmp_path / "cache"),
                                     exclude_ptbxl_folds=())
    keys = task.record_keys(list(task.splits["val"]) + list(task.splits["test"]))
    assert set(only_tasks.exclude) == {k.split("/", 1)[1] for k in keys} and set(only_tasks.exclude) <= held
    assert cache_key([repr(only_tasks)], SPEC) not in Path(pool_dir).name


def test_option_composes_and_validates_without_data(tmp_path):
    from ecgfm.config import ConfigError, strip_params, validate_train_config

    base = ["data=pretrain_pool_heldout_free", f"out_dir={tmp_path / 'run'}", f"paths.data_root={tmp_path / 'no'}",
            f"paths.cache_root={tmp_path / 'cache'}"]
    data = strip_params(validate_train_config(_compose(base)).data)
    assert [c.name for c in data.cache_dirs] == ["pool_ptbxl", "pool_cinc2017", "pool_other"]
    assert [s._target_.rsplit(".", 1)[1] for s in data.cache_dirs[2].sources] == [
        "CPSC2018Source", "CPSC2021Source", "MITBIHSource"]
    node = data.cache_dirs[1].sources[0]
    assert node._target_ == "ecgfm.evaluate.tasks.heldout_free_source"
    assert list(node.tasks) == ["ptbxl_super", "cinc2017"] and list(node.parts) == ["val", "test"]
    assert node.source.root == f"{tmp_path / 'no'}/cinc2017" and node.cache_root == str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="did you mean 'tasks'"):
        validate_train_config(_compose([*base, "+data.cache_dirs.0.sources.0.taks=[x]"]))
