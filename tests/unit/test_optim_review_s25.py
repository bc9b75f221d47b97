"""Review s25 of the training recipe's wiring: an epoch-limited run longer than its learning-rate schedule is
refused (its last steps trained at lr 0 while the run said "training finished"), and a rerun into a run folder
with another gradient accumulation or clipping is refused like any other recipe change."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ecgfm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
COMMON = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=24", "data.params.duration=6.0",
          "data.val_fraction=0.2", "data.batch_size=8", "data.num_workers=0", "method.decoder_dim=16",
          "method.decoder_heads=2", "method.decoder_depth=1", "method.warmup_steps=1",
          "checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "torch_threads=1", "logger=csv"]


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*COMMON, f"out_dir={tmp_path / 'run'}",
                                                       f"paths.cache_root={tmp_path / 'cache'}", *overrides])


def test_an_epoch_limited_run_past_its_schedule_is_refused(tmp_path):
    """3 epochs of 2 batches (19 training records, batch 8) = 6 optimiser steps against a 2-step schedule: steps
    3-6 ran at learning rate 0 (reviewer: 4 of 6)."""
    from ecgfm.train.run import train

    with pytest.raises(ConfigError, match=r"method\.max_steps.*6 optimiser steps.*last 4 steps"):
        train(_cfg(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=3", "method.max_steps=2"))


def test_an_epoch_limited_run_within_its_schedule_trains(tmp_path):
    from ecgfm.train.run import train

    s = train(_cfg(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=2", "method.max_steps=4"))
    assert s["steps"] == 4 and s["schedule_steps"] == 4


def _tree(tmp_path: Path, *overrides: str):
    """The composed config less the parts that resolve only inside a Hydra run (as a run writes config.yaml)."""
    tree = OmegaConf.to_container(_cfg(tmp_path, *overrides))
    tree.pop("logger", None)
    return OmegaConf.create(tree)


def _check(tmp_path: Path, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    from ecgfm.train.checkpoints import check_resume_config

    written = OmegaConf.create(OmegaConf.to_container(_tree(tmp_path, *old), resolve=True))   # as a run writes it
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(written))
    check_resume_config(tmp_path, _tree(tmp_path, *new))


@pytest.mark.parametrize("change, key", [("trainer.accumulate_grad_batches=2", "accumulate_grad_batches"),
                                         ("trainer.gradient_clip_val=0.5", "gradient_clip_val"),
                                         ("+trainer.gradient_clip_algorithm=value", "gradient_clip_algorithm")])
def test_a_rerun_with_other_accumulation_or_clipping_is_refused(tmp_path, change, key):
    with pytest.raises(ConfigError) as err:
        _check(tmp_path, (), (change,))
    diffs = str(err.value).split("other settings (")[1].split("); continuing")[0]
    assert diffs.startswith(f"trainer.{key}: ") and ";" not in diffs, diffs      # that key, and only it


def test_null_trainer_settings_read_as_lightnings_defaults(tmp_path):
    """An old config.yaml with the keys null against Lightning's defaults written out: not a change; nor is the
    precision (the hardware's choice, not the recipe's)."""
    _check(tmp_path, ("trainer.accumulate_grad_batches=null", "trainer.gradient_clip_val=null"),
           ("trainer.accumulate_grad_batches=1", "trainer.gradient_clip_val=0.0"))
    _check(tmp_path, (), ("trainer.precision=bf16-mixed",))


def test_a_mid_epoch_resume_with_max_epochs_restores_the_loader_position(tmp_path, monkeypatch):
    """The schedule check asks the trainer for its step count only once training starts: asked while the optimiser
    was configured, Lightning loaded the training data before the checkpoint's restore and the loader's position
    was never restored (the interrupted epoch replayed from its first batch; review of the first version)."""
    import ecgfm.train.loop as loop
    from ecgfm.train.run import train

    calls = []
    original = loop.ResumableDataLoader.load_state_dict
    monkeypatch.setattr(loop.ResumableDataLoader, "load_state_dict",
                        lambda self, sd: calls.append(sd) or original(self, sd))
    common = ("method.max_steps=6", "checkpoint.every_n_train_steps=1", "trainer.max_epochs=3")
    train(_cfg(tmp_path, "trainer.max_steps=3", *common))          # epochs of 2 batches: stops inside epoch 2
    second = train(_cfg(tmp_path, "trainer.max_steps=5", *common))
    assert second["steps"] == 5 and second["resumed_from"]
    assert calls and calls[-1]["batches"] == 1, calls
