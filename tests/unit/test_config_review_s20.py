"""Config review (s20): keys that were accepted but ignored or silently overridden now either take effect in what
the run records or are refused, naming the key.

1. ``data=cached``: ``preprocess.*`` set to another value than the caches' is refused; defaults take the caches'
   values, so ``config.yaml`` records the preprocessing the run trained on (the exported encoder's).
2. ``data.crop_samples`` / ``data.seed`` / ``data.nonfinite`` differing from their top-level key are refused (the
   run recorded the top-level values while the data module used its own).
3. ``eval_data.crop_seconds`` / ``stride_seconds`` / ``min_count`` (not read: the external set is scored with the
   task's window, stride and classes) differing from the task's, and a non-``all`` ``eval_data.split``, are refused;
   the shipped eval_data files no longer carry them and they are out of a cell's recipe identity.
4. ``task.crop_seconds`` set by the user and overridden by an exported encoder's crop is warned about.
5. ``task.split`` / ``eval_data.split`` keys a split kind does not read (``split.fraction``) are refused.
6. A literal ``method.fs`` other than the caches' rate is refused.
7. ``data.views`` other than single for a method that reads one view (MAE, CREMA, CLOCS cmlc) is refused.
8. ``save_classifier=true`` with ``probe.mode=mlp`` is refused by the config check, before the grid runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ecgfm.config import ConfigError, validate_train_config
from tests.unit.test_train_safety import TINY as SAFETY_TINY

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
# the training-safety tests' tiny MAE run, 2 steps
TINY = [o.replace("trainer.max_steps=3", "trainer.max_steps=2") for o in SAFETY_TINY]


def _train_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _probe_cfg(overrides: list[str], name: str = "probe"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _cache(path: Path, **spec) -> Path:
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    prepare_corpus(SyntheticSource(24, seed=3, duration=6.0), path, PreprocessSpec(**spec), workers=0,
                   progress=False)
    return path


@pytest.fixture(scope="module")
def cache100(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("c100") / "syn", fs=100.0)


@pytest.fixture(scope="module")
def cache250(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("c250") / "syn", fs=250.0, highpass=None)


# ------------------------------------------------------------------------------------- 1. data=cached preprocess
def test_cached_run_refuses_preprocess_the_caches_do_not_have(cache100, tmp_path):
    from ecgfm.train import train

    cfg = _train_cfg([*TINY, f"data.cache_dirs=[{cache100}]", f"out_dir={tmp_path / 'run'}",
                      "preprocess.highpass=3.0", "preprocess.normalize=none"])
    with pytest.raises(ConfigError, match=r"preprocess\.highpass") as err:
        train(cfg)
    msg = str(err.value)
    assert "preprocess.highpass=3.0 (the caches': 0.5)" in msg and "preprocess.normalize='none'" in msg
    assert "'zscore'" in msg and str(cache100) in msg
    assert not (tmp_path / "run" / "encoder").exists()


def test_cached_run_records_the_caches_preprocessing(cache250, tmp_path, caplog):
    """A default run on a 250 Hz cache without high-pass: config.yaml says fs=250, highpass=null (was 100 / 0.5,
    the config's defaults the run never applied), as the exported encoder does."""
    from ecgfm.export import load_encoder
    from ecgfm.train import train

    out = tmp_path / "run"
    cfg = _train_cfg([*TINY, f"data.cache_dirs=[{cache250}]", f"out_dir={out}", "crop_seconds=1.0"])
    with caplog.at_level(logging.INFO, logger="ecgfm.train.build"):
        summary = train(cfg)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    _, spec, info = load_encoder(summary["encoder_dir"])
    assert recorded["preprocess"]["fs"] == 250.0 and recorded["preprocess"]["highpass"] is None
    assert spec.to_dict() == {k: recorded["preprocess"][k] for k in spec.to_dict()}
    assert recorded["crop_samples"] == info["extra"]["crop_samples"] == 250
    line = next(r.getMessage() for r in caplog.records if "caches were prepared with" in r.getMessage())
    assert "fs=250.0 (default 100.0)" in line and "highpass=None (default 0.5)" in line


# --------------------------------------------------------------------------------- 2. data mirrors of top-level
@pytest.mark.parametrize("override,key,hint", [
    ("data.crop_samples=500", "data.crop_samples", "crop_seconds=5"),
    ("data.seed=7", "data.seed", "seed=7"),
    ("data.nonfinite=skip", "data.nonfinite", "nonfinite=skip"),
])
def test_data_keys_that_mirror_a_top_level_key_are_refused(override, key, hint, tmp_path):
    cfg = _train_cfg(["+experiment=simclr_cnn", override, f"out_dir={tmp_path / 'run'}",
                      f"paths.cache_root={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate_train_config(cfg)
    assert hint in str(err.value) and "config.yaml" in str(err.value)
    # the same value as the top-level key (or its interpolation) is fine
    same = _train_cfg(["+experiment=simclr_cnn", "data.seed=0", "data.crop_samples=250",
                       f"out_dir={tmp_path / 'run'}", f"paths.cache_root={tmp_path / 'cache'}"])
    validate_train_config(same)


def test_data_crop_samples_is_checked_at_the_caches_rate(cache250, tmp_path):
    """data.crop_samples=100 agrees with crop_seconds=1 at preprocess.fs=100 (the config check passes), but the
    cache is at 250 Hz: training would cut 100-sample crops while every record says 250."""
    from ecgfm.train import train

    cfg = _train_cfg([*TINY, f"data.cache_dirs=[{cache250}]", f"out_dir={tmp_path / 'run'}", "crop_seconds=1.0",
                      "data.crop_samples=100"])
    with pytest.raises(ConfigError, match=r"data\.crop_samples.*crop_seconds=0\.4 \(at 250 Hz\)"):
        train(cfg)


# -------------------------------------------------------------------------------------------- 6. method.fs
def test_literal_method_fs_other_than_the_caches_rate_is_refused(cache100, tmp_path):
    from ecgfm.train import train

    over = [o for o in TINY if not o.startswith(("+experiment", "method.decoder", "backbone="))]
    cfg = _train_cfg(["+experiment=simclr", "backbone=resnet1d_test", *over, "method.proj_dim=16",
                      "method.proj_hidden=32", f"data.cache_dirs=[{cache100}]", f"out_dir={tmp_path / 'run'}",
                      "method.fs=37.0"])
    with pytest.raises(ConfigError, match=r"method\.fs.*37\.0.*100 Hz"):
        train(cfg)


# ------------------------------------------------------------------------------------------------ 7. views
@pytest.mark.parametrize("overrides", [["+experiment=mae", "data.views=segments"],
                                       ["+experiment=crema", "data.views=adjacent"],
                                       ["+experiment=clocs", "method.mode=cmlc"]])
def test_second_view_for_a_one_view_method_is_refused(overrides, tmp_path):
    cfg = _train_cfg([*overrides, f"out_dir={tmp_path / 'run'}", f"paths.cache_root={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=r"data\.views.*never reads it.*data\.views=single"):
        validate_train_config(cfg)


@pytest.mark.parametrize("overrides", [["+experiment=simclr", "data.views=segments"], ["+experiment=clocs"],
                                       ["+experiment=simclr_cnn_cpu30"], ["+experiment=mae"]])
def test_views_a_method_reads_are_accepted(overrides, tmp_path):
    validate_train_config(_train_cfg([*overrides, f"out_dir={tmp_path / 'run'}",
                                      f"paths.cache_root={tmp_path / 'cache'}"]))


# ------------------------------------------------------------------------------------------------ 3. eval_data
def _ext_node(**extra) -> dict:
    node = {"name": "synthetic_ext", "dataset": "synthetic_ext",
            "sources": [{"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": 20, "seed": 1}],
            "labels": "record", "multilabel": False, "split": {"kind": "all"}}
    node.update(extra)
    return {k: v for k, v in node.items() if v is not None}


def _context(tmp_path, ext: dict | None, *overrides: str):
    from ecgfm.evaluate.sweep import _context

    cfg = _probe_cfg([f"results_dir={tmp_path / 'res'}", f"paths.cache_root={tmp_path / 'cache'}", "task=synthetic",
                      *overrides])
    if ext is not None:
        with open_dict(cfg):
            cfg.eval_data = OmegaConf.create(ext)
    return _context(cfg, "linear")


@pytest.mark.parametrize("extra,key", [({"stride_seconds": 0.5}, "eval_data.stride_seconds"),
                                       ({"crop_seconds": 7.5}, "eval_data.crop_seconds"),
                                       ({"min_count": 1000}, "eval_data.min_count"),
                                       ({"split": {"kind": "stratified", "fractions": [0.5, 0.2, 0.3]}},
                                        "eval_data.split")])
def test_external_set_settings_it_does_not_read_are_refused(extra, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        _context(tmp_path, _ext_node(**extra))
    assert "task's" in str(err.value) or "test data only" in str(err.value)


def test_external_set_takes_the_tasks_values_and_all_by_default(tmp_path):
    ctx = _context(tmp_path, _ext_node(crop_seconds=2.5, stride_seconds=2.5, min_count=1, split=None),
                   "task.crop_seconds=2.5")
    assert ctx.eval_spec.split == {"kind": "all"}
    assert (ctx.eval_spec.crop_seconds, ctx.eval_spec.stride_seconds) == (ctx.task_spec.crop_seconds,
                                                                          ctx.task_spec.stride_seconds)
    # a copy of the task's min_count (${task.min_count}) is not a conflict either: nothing reads it
    assert _context(tmp_path, _ext_node(min_count=3), "task.crop_seconds=2.5", "+task.min_count=3").eval_spec


def test_ignored_external_keys_leave_the_yaml_and_the_recipe_identity(tmp_path):
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.evaluate.sweep import _recipe

    for path in (CONF / "eval_data").glob("*.yaml"):
        assert not {"crop_seconds", "stride_seconds", "min_count"} & set(OmegaConf.load(path)), path.name
        assert OmegaConf.load(path).split == {"kind": "all"}
    (tmp_path / "labels.csv").write_text("record_id,label\n")
    ctx = _context(tmp_path, None, "eval_data=folder", f"eval_data.root={tmp_path}")
    desc = SimpleNamespace(crop_samples=250, preprocess=PreprocessSpec(), kind="random", info={})
    recipe = _recipe(ctx, desc, {"mode": "linear"})
    assert recipe["eval_data"]["name"] == "folder" and recipe["eval_data"]["split"] == {"kind": "all"}
    assert not {"crop_seconds", "stride_seconds", "min_count"} & set(recipe["eval_data"])
    assert {"crop_seconds", "stride_seconds", "min_count"} <= set(recipe["task"])


# ------------------------------------------------------------------------------------------------ 5. split keys
@pytest.mark.parametrize("split,key,hint", [
    ({"kind": "stratified", "fraction": [0.2, 0.4, 0.4]}, "task.split.fraction", "did you mean 'fractions'"),
    ({"kind": "folds", "key": "strat_fold", "tests": [10]}, "task.split.tests", "did you mean 'test'"),
    ({"kind": "column", "key": "split", "seed": 1}, "task.split.seed", "kind, key"),
    ({"kind": "all", "fractions": [1, 0, 0]}, "task.split.fractions", "its settings: kind)"),
])
def test_split_keys_the_kind_does_not_read_are_refused(split, key, hint):
    from ecgfm.evaluate.tasks import TaskSpec

    node = {"name": "t", "dataset": "d", "sources": [{"_target_": "x"}], "split": split}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        TaskSpec.from_config(node)
    assert hint in str(err.value)


def test_shipped_task_splits_pass_and_eval_data_split_keys_are_checked(tmp_path):
    from ecgfm.evaluate.tasks import load_task_spec

    for path in (CONF / "task").glob("*.yaml"):
        node = OmegaConf.load(path)
        if node._get_node("root") is not None and OmegaConf.is_missing(node, "root"):
            node.root = str(tmp_path)
        load_task_spec(node, data_root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"eval_data\.split\.seed"):
        _context(tmp_path, _ext_node(split={"kind": "all", "seed": 0}))
    with pytest.raises(ConfigError, match=r"task\.split\.fraction.*'fractions'"):
        _context(tmp_path, None, "+task.split.fraction=[0.2,0.4,0.4]")


# ------------------------------------------------------------------------------------------ 4. task.crop_seconds
def test_task_crop_overridden_by_the_encoders_crop_is_warned_about(caplog):
    from ecgfm.evaluate.sweep import _window

    cfg = _probe_cfg(["task=synthetic", "task.crop_seconds=5.0"])
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.sweep"):
        assert _window(cfg, 5.0, 100.0, 250) == 250
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "task.crop_seconds=5 (500 samples at 100 Hz) is not used" in msg and "window_seconds=5" in msg
    caplog.clear()
    default = _probe_cfg(["task=synthetic"])        # the task file's own crop: the documented behaviour, no warning
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.sweep"):
        assert _window(default, float(default.task.crop_seconds), 100.0, 1000) == 1000
        assert _window(cfg, 5.0, 100.0, None) == 500   # no encoder crop: the task's crop is the window
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------------- minor: save_classifier + mlp
def test_save_classifier_with_an_mlp_probe_is_refused_by_the_config_check():
    from ecgfm.recipes import validate_probe_config

    with pytest.raises(ConfigError, match=r"save_classifier.*probe\.mode='mlp'"):
        validate_probe_config(_probe_cfg(["save_classifier=true", "probe.mode=mlp"]))
    validate_probe_config(_probe_cfg(["save_classifier=true"]))
