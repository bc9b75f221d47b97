"""Typed recipes and config schemas of probe.py / finetune.py / explain.py (ecgfm.recipes): every composed entry
config validates, a typo or a bad type fails naming the key, and the YAML spells out the dataclass defaults."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import ecgfm.conf
from ecgfm.config import ConfigError, check_params_used
from ecgfm.recipes import (
    SUPERVISED_OVERRIDES,
    FinetuneRecipe,
    ProbeRecipe,
    as_finetune_recipe,
    finetune_recipe,
    validate_explain_config,
    validate_finetune_config,
    validate_probe_config,
)

VALIDATE = {"probe": validate_probe_config, "finetune": validate_finetune_config, "explain": validate_explain_config}


def _compose(name: str, *overrides: str):
    with initialize_config_dir(str(ecgfm.conf.config_dir()), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(VALIDATE))
def test_every_entry_config_validates_as_composed(name):
    merged = VALIDATE[name](_compose(name))
    assert "hydra" not in merged


@pytest.mark.parametrize("name,override,key", [
    ("finetune", "+finetune.lrr=1", "finetune.lrr"),
    ("finetune", "finetune.epochs=abc", "finetune.epochs"),
    ("finetune", "finetune.val_sliding=maybe", "finetune.val_sliding"),
    ("finetune", "finetune.window_aggregate=mean", "finetune.window_aggregate"),
    ("finetune", "finetune.head=mlp", "finetune.head_init"),          # LP-FT needs a linear head
    ("finetune", "+supervised.lrr=1", "supervised.lrr"),
    ("finetune", "supervised.lr=abc", "supervised.lr"),
    ("finetune", "+finetun.lr=1", "finetun"),
    ("finetune", "fraction=2", "fraction"),
    ("finetune", "report=sometimes", "report"),
    ("probe", "probe.Cs=x", "probe.Cs"),
    ("probe", "+probe.foo=1", "probe.foo"),
    ("probe", "probe.mode=svm", "probe.mode"),
    ("probe", "probe.mlp.epochs=ten", "probe.mlp.epochs"),
    ("probe", "seed=abc", "seed"),
    ("probe", "bootstrap.n=abc", "bootstrap.n"),
    ("probe", "eval_data=folder", "eval_data.root"),                   # mandatory ??? not given
    ("probe", "preprocess={fs:abc}", "preprocess"),
    ("probe", "+task.params.n_record=100", "task.params.n_record"),       # read by nothing: silently the default
    ("finetune", "+task.params.seeed=3", "task.params.seeed"),
    ("explain", "+data.params.n_record=4", "data.params.n_record"),
    ("probe", "fraction=[]", "fraction"),
    ("finetune", "seed=[]", "seed"),
    ("explain", "record=[]", "record"),
    ("probe", "device=cud", "device"),
    ("finetune", "accelerator=tpuu", "accelerator"),
    ("explain", "+faithfulness.stepz=3", "faithfulness.stepz"),
    ("explain", "threads=abc", "threads"),
    ("explain", "overlay=bnad", "overlay"),
    ("explain", "counterfactual.max_steps=0", "counterfactual.max_steps"),
])
def test_bad_override_names_the_key(name, override, key):
    cfg = _compose(name, override)
    with pytest.raises(ConfigError) as info:
        VALIDATE[name](cfg)
    assert info.value.key == key, str(info.value)
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("group,name", [(g, p.stem) for g in ("task", "eval_data")
                                        for p in sorted((ecgfm.conf.config_dir() / g).glob("*.yaml"))])
def test_every_shipped_option_reads_all_its_params(group, name):
    """Every ``params`` knob of the shipped task / eval_data options is read (by an interpolation or by code), so
    the unused-knob check never refuses a shipped config."""
    over = [f"{group}={name}"] + (["task=ptbxl_super", "eval_data.root=/x"] if name == "folder" and group == "eval_data"
                                  else ["task=ptbxl_super"] if group == "eval_data" else [])
    check_params_used(_compose("probe", *over))


def test_typo_suggests_the_setting():
    with pytest.raises(ConfigError, match=r"did you mean 'lr'"):
        validate_finetune_config(_compose("finetune", "+finetune.lrr=1"))


def test_plain_typo_is_refused_by_hydra_itself():
    """Without ``+`` Hydra refuses a key the YAML does not have (so the schema check sees the ``+`` form)."""
    with pytest.raises(ConfigCompositionException, match="lrr"):
        _compose("finetune", "finetune.lrr=1")


def test_target_nodes_stay_free_form():
    """The task's ``_target_`` record sources are not typed by the schema (TaskSpec checks them)."""
    cfg = _compose("probe", "+task.sources.0.extra_knob=1")
    validate_probe_config(cfg)
    cfg = _compose("explain", "source={_target_: ecgfm.data.synthetic.SyntheticSource, n_records: 4}")
    validate_explain_config(cfg)


def test_yaml_spells_out_the_dataclass_defaults():
    """One default per setting: conf/finetune.yaml and conf/probe.yaml hold exactly the dataclass values."""
    ft = validate_finetune_config(_compose("finetune"))
    assert OmegaConf.to_container(ft.finetune) == asdict(FinetuneRecipe())
    assert OmegaConf.to_container(ft.supervised) == SUPERVISED_OVERRIDES
    pr = validate_probe_config(_compose("probe"))
    assert OmegaConf.to_container(pr.probe) == asdict(ProbeRecipe())
    # the probe's L2 grid and the LP-FT head's grid are the same default
    assert list(pr.probe.Cs) == list(ft.finetune.lp_Cs)


def test_finetune_recipe_applies_the_supervised_block():
    cfg = validate_finetune_config(_compose("finetune", "checkpoint=supervised:resnet1d_test", "finetune.head=mlp"))
    sup = finetune_recipe(cfg, supervised=True)
    # validation and aggregation stay the fine-tunes' (whole records, mean logit): the rows pair like for like
    assert (sup.lr, sup.layer_decay, sup.warmup_epochs, sup.head_init, sup.val_sliding, sup.window_aggregate,
            sup.head, sup.min_epoch_samples) == (1e-3, 1.0, 0.0, "random", True, "logit", "mlp", 2048)
    base = finetune_recipe(cfg)
    assert base == FinetuneRecipe(head="mlp")
    assert isinstance(base.warmup_epochs, float) and isinstance(base.epochs, int)


def test_as_finetune_recipe_checks_keys_types_and_values():
    assert as_finetune_recipe() == FinetuneRecipe()
    assert as_finetune_recipe({"lr": 0.1}, epochs=3) == FinetuneRecipe(lr=0.1, epochs=3)
    with pytest.raises(ConfigError, match=r"'finetune\.lrr'.*did you mean 'lr'"):
        as_finetune_recipe(lrr=0.1)
    with pytest.raises(ConfigError, match=r"'finetune\.batch_size'"):
        as_finetune_recipe(batch_size=0)


def test_a_cuda_device_on_a_machine_without_one_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, override, key in (("probe", "device=cuda", "device"), ("finetune", "accelerator=gpu", "accelerator"),
                                ("explain", "device=cuda:0", "device")):
        with pytest.raises(ConfigError, match="no CUDA device") as info:
            VALIDATE[name](_compose(name, override))
        assert info.value.key == key
