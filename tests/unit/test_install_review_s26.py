"""Review s26 of ecgfm as an installed library: declared dependency floors that the code needs, cell folders that do
not depend on how a checkpoint path is spelled, and optional loggers refused in one line when not installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ecgfm.evaluate.sweep import checkpoint_slug

ROOT = Path(__file__).resolve().parents[2]


def _floor(requirement: str) -> tuple[int, ...]:
    version = re.search(r">=\s*([0-9.]+)", requirement).group(1)
    return tuple(int(p) for p in version.split("."))


def test_lightning_floor_has_fit_weights_only():
    """train/run.py calls Trainer.fit(..., weights_only=True), which Lightning has from 2.6.0 on: with the declared
    lightning>=2.2 pip kept a 2.2-2.5 install and every training run failed after preparing its cache."""
    (lightning,) = re.findall(r'(?m)^\s*"(lightning\b[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert _floor(lightning) >= (2, 6), lightning
    assert "weights_only=True" in (ROOT / "ecgfm" / "train" / "run.py").read_text()


@pytest.mark.parametrize("spellings", [
    ["runs/mae/encoder", "./runs/mae/encoder", "runs/mae/encoder/", "runs//mae/encoder", "runs/x/../mae/encoder"],
    ["random:runs/mae/encoder", "random:./runs/mae/encoder/"],
])
def test_a_checkpoint_path_names_one_cell_folder_however_it_is_spelled(spellings):
    slugs = {checkpoint_slug(s) for s in spellings}
    assert len(slugs) == 1, slugs


@pytest.mark.parametrize("checkpoint", ["./runs/mae/encoder", "../x", ".hidden/enc", "random:../y"])
def test_a_cell_folder_is_never_hidden(checkpoint):
    slug = checkpoint_slug(checkpoint)
    assert not slug.startswith((".", "_", "-")) and "/" not in slug, slug


def test_plain_spellings_keep_their_cell_folder_names():
    """Cells written before keep being found: the names of plain spellings are unchanged (values from the old code)."""
    assert checkpoint_slug("runs/mae/encoder") == "runs_mae_encoder-4979b0"
    assert checkpoint_slug("handcrafted") == "handcrafted-2db522"
    assert checkpoint_slug("supervised:resnet1d_tiny") == "supervised_resnet1d_tiny-635522"
    assert checkpoint_slug("random:runs/mae/encoder") == "random_runs_mae_encoder-650356"


@pytest.mark.parametrize("logger, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_logger_whose_package_is_missing_is_refused_at_config(logger, module, monkeypatch, tmp_path):
    """logger=wandb / tensorboard without the extra installed failed after the cache was prepared, as a raw Hydra
    instantiation error; now one ConfigError naming the extra to install."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    from ecgfm.config import ConfigError, validate_train_config

    with initialize_config_dir(config_dir=str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"logger={logger}", f"out_dir={tmp_path / 'run'}",
                                          f"paths.cache_root={tmp_path / 'cache'}"])
    validate_train_config(cfg)   # installed here (the dev extra): accepted
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in (module, "tensorboardX") else real(name, *a, **k))
    with pytest.raises(ConfigError, match=rf"logger.*{module}.*not installed.*ecgfm\[{logger}\]"):
        validate_train_config(cfg)


def test_cache_messages_name_commands_an_installed_ecgfm_has(tmp_path):
    """An installed ecgfm has no scripts/ folder: the messages of a folder that is not (yet) a cache name the
    console script (ecgfm-prepare) instead of scripts/prepare.py."""
    from ecgfm.data.cache import _incomplete_message

    assert "ecgfm-prepare" in _incomplete_message(tmp_path) and "scripts/" not in _incomplete_message(tmp_path)
    (tmp_path / "plan.json").write_text('{"n_shards": 1}')
    assert "ecgfm-prepare" in _incomplete_message(tmp_path) and "scripts/" not in _incomplete_message(tmp_path)


@pytest.mark.parametrize("cli", ["train", "probe", "finetune", "explain", "prepare"])
def test_a_launcher_whose_plugin_is_missing_is_one_error_line(cli, monkeypatch, capsys):
    """hydra/launcher=submitit_slurm without the slurm extra failed inside Hydra with a traceback ("Unknown plugin
    class"); every entry point now ends with one error line and exit 2 before Hydra starts."""
    import importlib
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k:
                        None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a, **k))
    main = importlib.import_module(f"ecgfm.cli.{cli}").main
    monkeypatch.setattr(sys, "argv", [cli, "-m", "hydra/launcher=submitit_slurm", "x=1"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: hydra/launcher=submitit_slurm") and "ecgfm[slurm]" in err
    from ecgfm.cli import missing_launcher   # the check itself; a single run (no -m) ignores the launcher

    assert missing_launcher(["hydra/launcher=basic"]) is None
    ran = []
    monkeypatch.setattr(sys, "argv", [cli, "hydra/launcher=submitit_slurm"])
    wrapped = importlib.import_module("ecgfm.cli").launcher_checked(lambda *a, **k: ran.append(1))
    wrapped()
    assert ran == [1]
