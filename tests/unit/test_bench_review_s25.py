"""Review s25 of scripts/benchmark_real.py: relative paths mean one place (the folder the command was started in),
for the script's own files and for the train.py / probe.py it runs in the project root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_train_review_s24 import _bench   # scripts/benchmark_real.py as a module

ROOT = Path(__file__).resolve().parents[2]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("via_sh", [False, True])
def test_relative_paths_are_taken_from_where_the_command_started(tmp_path, monkeypatch, via_sh):
    mod = _bench()
    seen = {}

    def stage_pool(args):
        seen.update(vars(args))
        raise _Stop

    monkeypatch.setattr(mod, "stage_pool", stage_pool)
    started = tmp_path / "here"
    started.mkdir()
    if via_sh:   # benchmark_real.sh changes into the project root and says where it was started
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv(mod.CALLER_DIR_ENV, str(started))
    else:
        monkeypatch.chdir(started)
        monkeypatch.delenv(mod.CALLER_DIR_ENV, raising=False)
    with pytest.raises(_Stop):
        mod.main(["--stages", "pool", "--out", "rel/out", "--cache-root", "c", "--docs", "d"])
    assert seen["out"] == str(started / "rel" / "out")
    assert seen["cache_root"] == str(started / "c") and seen["docs"] == str(started / "d")
    monkeypatch.setenv(mod.CALLER_DIR_ENV, str(ROOT / "docs"))     # inside the project: named relative to it
    with pytest.raises(_Stop):
        mod.main(["--stages", "pool", "--out", "../runs/x"])
    assert seen["out"] == "runs/x"


def test_the_defaults_stay_in_the_project(tmp_path, monkeypatch):
    mod = _bench()
    seen = {}
    monkeypatch.setattr(mod, "stage_pool", lambda args: seen.update(vars(args)) or (_ for _ in ()).throw(_Stop()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(mod.CALLER_DIR_ENV, raising=False)
    with pytest.raises(_Stop):
        mod.main(["--stages", "pool"])
    # named relative to the project, as before (cell folders are named from these strings: an existing run's
    # cells are found again), and the script works from the project root
    assert seen["out"] == "runs/benchmark_real" and seen["cache_root"] == "cache"
    assert Path.cwd() == ROOT


@pytest.mark.parametrize("cnn_epochs, warmup", [(None, 1), ("40", 2)])
def test_the_cnn_baseline_takes_its_own_epochs_patience_and_warmup(tmp_path, monkeypatch, cnn_epochs, warmup):
    """--cnn-epochs gives the supervised CNN its own budget: patience and warmup follow its epochs, not
    --ft-epochs (before: 40 CNN epochs kept the 1-epoch warmup of 5 fine-tuning epochs)."""
    mod = _bench()
    calls = []
    monkeypatch.setattr(mod, "run", lambda cmd, env: calls.append(cmd) or 1.0)
    monkeypatch.setattr(mod, "random_twins", lambda ckpts: [])
    monkeypatch.setattr(mod, "encoder_window_seconds", lambda enc: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(mod.CALLER_DIR_ENV, raising=False)
    argv = ["--stages", "finetune", "--out", "o", "--methods", "mae", "--ft-epochs", "5"]
    mod.main([*argv, *(["--cnn-epochs", cnn_epochs] if cnn_epochs else [])])
    ssl, cnn = calls
    assert {"finetune.epochs=5", "finetune.patience=2", "finetune.warmup_epochs=1"} <= set(ssl)
    epochs = int(cnn_epochs or 5)
    budget = [o for o in cnn if o.startswith(("finetune.epochs=", "finetune.patience=", "finetune.warmup_epochs="))]
    assert budget == [f"finetune.epochs={epochs}", f"finetune.patience={max(2, epochs // 2)}",
                      f"finetune.warmup_epochs={warmup}"]
    assert [o for o in cnn if not o.startswith(("finetune.", "checkpoint="))] == \
        [o for o in ssl if not o.startswith(("finetune.", "checkpoint="))]
