"""The Hydra config tree composes for every option, and config mistakes fail early with the key named."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ecgfm.config import ConfigError, PreprocessConfig, TrainConfig, check_target_node, validate_train_config
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError
from ecgfm.data.prepare import check_data_paths
from ecgfm.evaluate.handcrafted import FEATURE_NAMES

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
GROUPS = ("data", "backbone", "method", "trainer", "logger")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides: list[str], conf_dir: Path = CONF):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _base(tmp_path: Path) -> list[str]:
    return [f"out_dir={tmp_path / 'run'}", f"paths.cache_root={tmp_path / 'cache'}"]


def test_tree_has_the_documented_options():
    assert set(EXPERIMENTS) >= {"mae", "simclr", "clocs", "crema"}
    assert set(_options("data")) >= {"synthetic", "cached", "pretrain_pool", "pretrain_pool_heldout_free", "ptbxl",
                                        "cinc2017", "folder"}
    assert set(_options("trainer")) >= {"cpu", "gpu", "ddp", "debug"}
    assert set(_options("logger")) >= {"csv", "wandb", "tensorboard"}
    assert (CONF / "hydra" / "launcher" / "submitit_slurm.yaml").is_file()
    defaults = OmegaConf.load(CONF / "train.yaml").defaults
    assert not any("experiment" in str(d) for d in defaults), "experiment in defaults breaks +experiment=..."


def test_preprocess_schema_mirrors_preprocess_spec():
    ours = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}
    spec = {f.name: f.default for f in dataclasses.fields(PreprocessSpec)}
    assert ours == spec
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml").preprocess)
    assert yaml == spec
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= {"seed", "resume", "crop_samples", "preprocess"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_instantiates(experiment, tmp_path):
    cfg = validate_train_config(_compose([f"+experiment={experiment}", *_base(tmp_path)]))
    assert cfg.crop_samples == round(cfg.crop_seconds * cfg.preprocess.fs)
    assert cfg.method.max_steps == cfg.trainer.max_steps
    backbone = instantiate(cfg.backbone, _convert_="all")
    # the pipeline passes aux_dim (the number of pretext targets) when the method regresses them
    aux = {"aux_dim": len(FEATURE_NAMES)} if cfg.method.get("aux_targets") else {}
    model = instantiate(cfg.method, backbone=backbone, **aux, _convert_="all")
    assert model.backbone is backbone
    # hyper-parameters are plain Python (checkpoints load with weights_only=True)
    for value in model.hparams.values():
        assert not OmegaConf.is_config(value)
    if experiment.endswith("_cpu30"):   # the CPU-budget recipes pretrain on the shared real pool
        assert [c.name for c in cfg.data.cache_dirs] == ["pool_ptbxl", "pool_cinc2017", "pool_other"]
        assert cfg.crop_seconds == 10 and cfg.checkpoint.save_top_k == -1 and cfg.method.lead_aware
        return
    source = instantiate(cfg.data.cache_dirs[0].sources[0])
    assert len(source.record_ids()) == cfg.data.params.n_records
    if experiment == "clocs":
        assert cfg.data.views == "adjacent"


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(group, tmp_path):
    for option in _options(group):
        overrides = [f"{group}={option}", *_base(tmp_path)]
        if group == "data" and option == "folder":
            overrides.append(f"data.params.root={tmp_path}")
        if group == "data" and option == "cached":
            overrides.append(f"data.cache_dirs=[{tmp_path}]")
        if group == "method" and option == "clocs":
            overrides.append("data.views=adjacent")   # cmsc contrasts adjacent segments (refused otherwise)
        if group == "backbone" and option.startswith(("resnet", "xresnet")):
            overrides.append("method=simclr")  # MAE needs a ViT; the combination is checked by MAEModule itself
        cfg = validate_train_config(_compose(overrides))
        node = cfg[group]
        if group == "backbone" and option.endswith(("_test", "_tiny", "_cpu")):
            # the large ones are only validated here (their keys are checked against the model class); the
            # backbone registry's own tests build every registered model
            backbone = instantiate(node, _convert_="all")
            assert backbone.name == node.name and backbone.num_features > 0
        elif group == "logger" and option == "csv":
            assert instantiate(node, _convert_="all").save_dir == str(tmp_path / "run")


def test_trainer_and_logger_options_instantiate(tmp_path):
    for option in ("cpu", "debug"):
        cfg = validate_train_config(_compose([f"trainer={option}", *_base(tmp_path)]))
        trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps
    cfg = validate_train_config(_compose(["logger=tensorboard", *_base(tmp_path)]))
    assert instantiate(cfg.logger).save_dir == str(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("override, key, hint", [
    ("+trainer.max_step=10", "trainer.max_step", "max_steps"),
    ("trainer.max_steps=abc", "trainer.max_steps", "int"),
    ("+method.mask_ratoi=0.5", "method.mask_ratoi", "mask_ratio"),
    ("method.mask_ratio=high", "method.mask_ratio", "float"),
    ("+foo=1", "foo", "accepted"),
    ("+preprocess.fz=100", "preprocess.fz", "fs"),
    ("preprocess.fs=abc", "preprocess.fs", "abc"),
    ("preprocess.normalize=minmax", "preprocess", "normalize"),
    ("seed=abc", "seed", "abc"),
    ("cpu_linear=onednnn", "cpu_linear", "did you mean 'onednn'"),
    ("backbone.name=vit1d_tny", "backbone.name", "vit1d_tiny"),
    ("+backbone.depht=2", "backbone.depht", "depth"),
    ("+backbone.depth=two", "backbone.depth", "int"),
    ("data.batch_size=many", "data.batch_size", "int"),
    ("+data.batchsize=8", "data.batchsize", "batch_size"),
    ("+data.params.n_record=8", "data.params.n_record", "n_records"),
    ("logger._target_=lightning.pytorch.loggers.NoSuchLogger", "logger._target_", "NoSuchLogger"),
])
def test_bad_override_names_the_key(override, key, hint, tmp_path):
    cfg = _compose([override, *_base(tmp_path)])
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    assert info.value.key == key
    assert hint in str(info.value)


def test_typo_inside_an_experiment_file_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: mae\nmethod:\n  decoder_dept: 2\n")
    cfg = _compose(["+experiment=typo", *_base(tmp_path)], conf_dir=conf)
    with pytest.raises(ConfigError, match=r"method\.decoder_dept.*did you mean 'decoder_depth'"):
        validate_train_config(cfg)


def test_missing_mandatory_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate_train_config(_compose(["data=folder", *_base(tmp_path)]))
    assert info.value.key == "data.params.root"


def test_missing_data_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = validate_train_config(_compose(["data=ptbxl", f"paths.data_root={missing}", *_base(tmp_path)]))
    with pytest.raises(ECGDataError) as info:
        check_data_paths(cfg.data)
    assert str(missing / "ptbxl") in str(info.value)
    assert "data.cache_dirs[0].sources[0].root" in str(info.value)


def test_missing_required_argument_is_reported():
    node = OmegaConf.create({"_target_": "ecgfm.data.synthetic.SyntheticSource", "seed": 1})
    with pytest.raises(ConfigError, match="n_records"):
        check_target_node(node, "data.source")


def test_synthetic_probe_classes_match_the_generator(tmp_path):
    from ecgfm.data.synthetic import SYNTHETIC_CLASSES

    cfg = validate_train_config(_compose(_base(tmp_path)))
    assert tuple(cfg.data.probe_labels) == SYNTHETIC_CLASSES
    assert cfg.method.probe_num_classes == len(SYNTHETIC_CLASSES)
    cfg = validate_train_config(_compose(["data.params.probe_classes=null", *_base(tmp_path)]))
    assert cfg.method.probe_num_classes is None


def test_submitit_slurm_launcher_config_composes(tmp_path):
    """The launcher file composes (the plugin itself is an optional extra) and only uses the plugin's keys."""
    slurm_keys = {"_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node",
                  "mem_gb", "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint",
                  "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account",
                  "signal_delay_s", "max_num_timeout", "additional_parameters", "array_parallelism", "setup"}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=submitit_slurm", *_base(tmp_path)],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert set(launcher) <= slurm_keys
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node


def _compose_prepare(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="prepare", overrides=overrides)


@pytest.mark.parametrize("override, key", [
    ("spec.fs=abc", "spec.fs"),
    ("+spec.highpas=1", "spec.highpas"),
    ("+worker=3", "worker"),
    ("workers=-1", "workers"),
    ("shard_records=abc", "shard_records"),
    ("sources=[ptbxl,nosuch]", "sources"),
    ("sources=[folder]", "folder.root"),
    ("spec.normalize=nope", "spec"),
])
def test_prepare_config_errors_name_the_key(override, key):
    """ecgfm-prepare's config is typed (issue 9, item 13): a bad value names its key instead of a bare error."""
    from ecgfm.config import validate_prepare_config

    with pytest.raises(ConfigError) as info:
        validate_prepare_config(_compose_prepare(["out=/tmp/x", override]))
    assert info.value.key == key, str(info.value)


def test_prepare_config_is_missing_out_and_valid_otherwise():
    from ecgfm.config import validate_prepare_config

    with pytest.raises(ConfigError, match="'out'"):
        validate_prepare_config(_compose_prepare([]))
    settings = validate_prepare_config(_compose_prepare(["out=cache/x", "sources=[ptbxl500]", "spec.fs=500"]))
    assert settings["spec"]["fs"] == 500.0 and settings["sources"] == ["ptbxl500"]
    assert settings["ptbxl500"]["fs"] == 500 and settings["workers"] == 2


def test_prepare_cli_bad_value_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"out={tmp_path / 'c'}", "spec.fs=abc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.startswith("error: config key 'spec.fs'"), proc.stderr[-2000:]


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_every_trainer_preset_takes_max_time_without_a_plus(trainer):
    """TRAINING.md names trainer.max_time; it was absent from the presets, so Hydra refused it without '+'."""
    cfg = _compose(["+experiment=mae", f"trainer={trainer}", "trainer.max_time=00:00:30:00"])
    assert cfg.trainer.max_time == "00:00:30:00"
