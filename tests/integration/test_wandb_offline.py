"""logger=wandb writes an offline run under the run folder and never needs the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ecgfm.config import validate_train_config
from ecgfm.pipelines import build_logger, train

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
TINY = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=16", "data.params.duration=3.0",
        "data.batch_size=4", "data.val_fraction=0.25", "trainer.max_steps=2", "checkpoint.every_n_train_steps=2",
        "method.decoder_dim=16", "method.decoder_heads=2", "method.decoder_depth=1", "method.warmup_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "torch_threads=1", "logger=wandb"]


def _cfg(tmp_path: Path, extra: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, f"out_dir={tmp_path / 'run'}",
                                                       f"paths.cache_root={tmp_path / 'cache'}", *(extra or [])])


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")   # nothing listens there: any upload would fail
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_is_written_under_the_run_folder(tmp_path, no_network):
    summary = train(_cfg(tmp_path))
    assert summary["steps"] == 2
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))[:20]
    assert any(runs[0].rglob("*.wandb")), "the offline run has no event file"


def test_wandb_logger_is_offline_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = validate_train_config(_cfg(tmp_path))
    assert build_logger(cfg, tmp_path)._offline is True
    cfg = validate_train_config(_cfg(tmp_path, ["logger.offline=false"]))
    assert build_logger(cfg, tmp_path)._offline is False
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = validate_train_config(_cfg(tmp_path))
    assert build_logger(cfg, tmp_path)._offline is False


def test_wandb_mode_disabled_writes_no_run(tmp_path, no_network, monkeypatch):
    """WANDB_MODE=disabled was overridden: the offline logger sets WANDB_MODE=dryrun itself and wrote a run."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = train(_cfg(tmp_path))
    assert summary["steps"] == 2
    assert not list((tmp_path / "run").rglob("offline-run-*"))
