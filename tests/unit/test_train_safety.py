"""Training stops on non-finite data or loss with an error naming the shard / step and the records (issue 9,
item 1), or skips such records when asked (``nonfinite=skip``, counted in the summary); a NaN encoder is never
exported; the crop is configured in seconds and converted with the cache's own sampling rate (item 6)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.config import ConfigError
from ecgfm.data.record import ECGDataError
from ecgfm.export import load_encoder
from ecgfm.train import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
TINY = ["+experiment=mae", "data=cached", "data.num_workers=0", "backbone=vit1d_test", "data.batch_size=8",
        "data.val_fraction=0.2", "trainer.max_steps=3", "checkpoint.every_n_train_steps=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "torch_threads=1",
        "trainer.log_every_n_steps=1", "method.warmup_steps=1", "method.decoder_dim=16", "method.decoder_heads=2",
        "method.decoder_depth=1"]


def _cfg(out: Path, cache: Path, extra: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, f"data.cache_dirs=[{cache}]", f"out_dir={out}",
                                                       *(extra or [])])


def _make_cache(path: Path, fs: float = 100.0, n: int = 24) -> Path:
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    prepare_corpus(SyntheticSource(n, seed=3, duration=6.0), path, PreprocessSpec(fs=fs), shard_records=8,
                   workers=0, progress=False)
    return path


def _poison(cache_dir: Path, records: list[int]) -> list[str]:
    """Write NaN over the whole signal of ``records`` in their shard files and make the manifest vouch for the
    new bytes (as if the NaNs had been written at preparation time, so the open-time checksum check passes and
    only the loaders can catch them); returns the records' keys."""
    import hashlib
    import json

    from ecgfm.data.cache import CorpusCache

    cache = CorpusCache(cache_dir)
    cols = cache.columns()
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    for i in records:
        entry = manifest["shards"][int(cols["shard"][i])]
        mm = np.memmap(cache_dir / entry["bin"], dtype=np.float32, mode="r+")
        start = int(cols["offset"][i]) // 4
        mm[start:start + int(cols["n_leads"][i]) * int(cols["n_samples"][i])] = np.nan
        mm.flush()
        del mm
        entry["bin_sha256"] = hashlib.sha256((cache_dir / entry["bin"]).read_bytes()).hexdigest()
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    return [cache.keys[i] for i in records]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory) -> Path:
    return _make_cache(tmp_path_factory.mktemp("clean") / "syn")


@pytest.fixture(scope="module")
def poisoned_cache(tmp_path_factory) -> tuple[Path, list[str]]:
    cache = _make_cache(tmp_path_factory.mktemp("poisoned") / "syn")
    keys = _poison(cache, list(range(8)))            # every record of shard-00000
    return cache, keys


def test_nonfinite_input_stops_the_run_naming_shard_and_records(tmp_path, poisoned_cache):
    cache, keys = poisoned_cache
    out = tmp_path / "run"
    with pytest.raises(ECGDataError) as info:
        train(_cfg(out, cache))
    msg = str(info.value)
    assert "non-finite" in msg and "shard-00000.bin" in msg and str(cache) in msg
    assert any(k in msg for k in keys)
    assert re.search(r"nonfinite=.?skip", msg)       # says how to skip instead
    assert not (out / "encoder").exists() and not (out / "summary.json").exists()


def test_guard_backstop_names_or_skips_records_and_stops_on_a_nonfinite_loss(clean_cache):
    """The training-side guard behind the loaders' own check (for any DataModule): a NaN crop raises naming shard,
    record and step, or is dropped from the batch and counted (kept in checkpoints); a NaN loss raises at once."""
    from types import SimpleNamespace

    from ecgfm.data.cache import CorpusCache
    from ecgfm.data.datamodules import PretrainDataModule
    from ecgfm.train.safety import NonFiniteGuard, NonFiniteLossError

    dm = PretrainDataModule([str(clean_cache)], crop_samples=250, batch_size=4, val_fraction=0.0)
    dm.setup()
    trainer = SimpleNamespace(global_step=5, current_epoch=0, datamodule=dm)
    batch = {"x": torch.zeros(3, 12, 250), "index": torch.tensor([0, 9, 17]),
             "lead_mask": torch.ones(3, 12, dtype=torch.bool)}
    batch["x"][1, 0, 7] = float("nan")
    key = CorpusCache(clean_cache).keys[9]
    with pytest.raises(ECGDataError, match="shard-00001.bin") as info:
        NonFiniteGuard("error").on_train_batch_start(trainer, None, dict(batch), 0)
    assert key in str(info.value) and "step 5" in str(info.value)

    guard = NonFiniteGuard("skip")
    guard.setup(trainer, None, "fit")
    skipped = dict(batch)
    guard.on_train_batch_start(trainer, None, skipped, 0)
    assert skipped["x"].shape[0] == 2 and skipped["index"].tolist() == [0, 17]
    assert guard.summary()["nonfinite_records_skipped"] == 1
    assert guard.summary()["nonfinite_skipped_keys"] == [key]
    resumed = NonFiniteGuard("skip")
    resumed.load_state_dict(guard.state_dict())
    assert resumed.summary()["nonfinite_records_skipped"] == 1

    guard.on_train_batch_start(trainer, None, {k: v[[0, 2]] for k, v in batch.items()}, 1)
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        guard.on_before_backward(trainer, None, torch.tensor(float("nan")))
    assert CorpusCache(clean_cache).keys[17] in str(info.value)


def test_nonfinite_records_can_be_skipped_and_are_counted(tmp_path, tmp_path_factory, caplog):
    import logging

    cache = _make_cache(tmp_path_factory.mktemp("fewbad") / "syn")
    keys = _poison(cache, [0, 9, 17])
    with caplog.at_level(logging.WARNING):
        summary = train(_cfg(tmp_path / "run", cache, ["nonfinite=skip", "trainer.max_steps=6"]))
    assert summary["steps"] == 6
    assert summary["nonfinite"] == "skip"
    assert summary["nonfinite_records_skipped"] > 0
    assert set(summary["nonfinite_skipped_keys"]) <= set(keys)
    assert any("nonfinite=skip" in r.getMessage() and summary["nonfinite_skipped_keys"][0] in r.getMessage()
               for r in caplog.records)
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    backbone, _, _ = load_encoder(tmp_path / "run" / "encoder")
    assert all(torch.isfinite(p).all() for p in backbone.state_dict().values())


def test_nonfinite_loss_stops_at_once_naming_step_and_records(tmp_path, clean_cache, monkeypatch):
    from ecgfm.methods.mae import MAEModule

    original = MAEModule.shared_step

    def diverging(self, batch):
        loss, terms = original(self, batch)
        return (loss * float("nan") if self.trainer.global_step == 1 else loss), terms

    monkeypatch.setattr(MAEModule, "shared_step", diverging)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"non-finite training loss.*step 1") as info:
        train(_cfg(out, clean_cache, ["trainer.max_steps=4"]))
    assert "synthetic/" in str(info.value)           # the batch's record keys
    # no checkpoint before step 1: the message does not promise a resume from one (it said "it resumes from the
    # last checkpoint"), and says how a changed method.lr continues
    assert "if one was written" in str(info.value) and "resume=<checkpoint>" in str(info.value)
    assert not (out / "encoder").exists() and not (out / "summary.json").exists()
    for ckpt in (out / "checkpoints").glob("*.ckpt"):  # nothing non-finite was checkpointed either
        state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt.name


@pytest.mark.parametrize("save_last", [True, False])
def test_nonfinite_weights_are_never_exported(tmp_path, clean_cache, monkeypatch, save_last):
    """Weights that turn non-finite without a non-finite loss (e.g. an inf gradient) stop the run before they are
    checkpointed or exported. Poisoned after the last optimiser step, so no later loss can be what stops the run
    (poisoned at step 2 of 3, the NaN loss of step 3 raised first and the weight checks were never reached)."""
    from ecgfm.methods.base import PretrainModule
    from ecgfm.train.safety import NonFiniteWeightsError

    def poison(self, *args, **kwargs):
        if self.trainer.global_step == 3:
            with torch.no_grad():
                next(self.backbone.parameters()).fill_(float("inf"))

    monkeypatch.setattr(PretrainModule, "on_train_batch_end", poison, raising=False)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        train(_cfg(out, clean_cache, ["trainer.max_steps=3", "checkpoint.every_n_train_steps=5",
                                      f"checkpoint.save_last={str(save_last).lower()}"]))
    assert not (out / "encoder").exists()
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt.name


def test_crop_follows_the_cache_sampling_rate(tmp_path, tmp_path_factory):
    """A 500 Hz cache with crop_seconds=1.0 trains 500-sample crops (not 100 from preprocess.fs); the ViT's
    seq_len, the summary and the exported encoder all state it."""
    cache = _make_cache(tmp_path_factory.mktemp("fs500") / "syn", fs=500.0, n=16)
    summary = train(_cfg(tmp_path / "run", cache, ["crop_seconds=1.0", "trainer.max_steps=1"]))
    assert summary["fs"] == 500.0
    assert summary["crop_samples"] == 500 and summary["crop_seconds"] == 1.0
    backbone, spec, info = load_encoder(tmp_path / "run" / "encoder")
    assert spec.fs == 500.0
    assert info["extra"]["fs"] == 500.0
    assert info["extra"]["crop_samples"] == 500 and info["extra"]["crop_seconds"] == 1.0
    assert backbone.seq_len == 500


def test_crop_not_a_multiple_of_the_patch_names_crop_seconds(tmp_path, clean_cache):
    with pytest.raises(ConfigError, match="crop_seconds.*patch_size"):
        train(_cfg(tmp_path / "run", clean_cache, ["crop_seconds=1.1"]))


def test_explicit_crop_samples_disagreeing_with_crop_seconds_is_refused(tmp_path, clean_cache):
    with pytest.raises(ConfigError, match="crop_samples"):
        train(_cfg(tmp_path / "run", clean_cache, ["crop_samples=500"]))


def test_cli_nonfinite_input_is_one_clear_line_and_nonzero_exit(tmp_path, poisoned_cache):
    cache, keys = poisoned_cache
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"data.cache_dirs=[{cache}]", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "shard-00000.bin" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "encoder").exists()


def test_a_run_without_a_single_batch_is_an_error_not_a_random_encoder(tmp_path, clean_cache):
    """24 records and batch 32 (incomplete batches dropped): 0 steps used to export an untrained encoder, rc 0."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="data.batch_size.*0 steps"):
        train(_cfg(out, clean_cache, ["data.batch_size=32"]))
    assert not (out / "encoder").exists() and not (out / "summary.json").exists()


def test_evaluation_and_explanation_do_not_import_the_training_pipeline():
    """Stages talk through artifacts: nothing in ecgfm/evaluate or ecgfm/explain imports ecgfm.train or the
    ecgfm.pipelines compatibility module (static check of every import statement)."""
    import ast

    offenders = []
    for folder in ("evaluate", "explain"):
        for path in sorted((ROOT / "ecgfm" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.name}: {n}" for n in names
                              if n in ("ecgfm.pipelines", "ecgfm.train") or n.startswith("ecgfm.train.")]
    assert not offenders


def test_pipelines_is_a_thin_reexport_of_ecgfm_train():
    import ecgfm.pipelines as pipelines
    import ecgfm.train.loop as loop
    import ecgfm.train.run as run

    assert pipelines.train is run.train
    assert pipelines.ResumableDataLoader is loop.ResumableDataLoader
    assert len((ROOT / "ecgfm" / "pipelines.py").read_text().splitlines()) < 40


def test_overwrite_removes_slurm_requeue_checkpoints(tmp_path, clean_cache):
    """overwrite=true left <out>/hpc_ckpt_*.ckpt behind; under SLURM Lightning's fit(ckpt_path=None) restores it by
    itself, so the "fresh" run continued the old one (its weights, steps and losses) and said resumed_from None."""
    from ecgfm.train.checkpoints import guard_fresh_start

    out = tmp_path / "run"
    train(_cfg(out, clean_cache, ["trainer.max_steps=2"]))
    import shutil

    shutil.copy2(out / "checkpoints" / "last.ckpt", out / "hpc_ckpt_1.ckpt")
    guard_fresh_start(out, overwrite=True)
    assert not list(out.glob("hpc_ckpt_*.ckpt")) and not (out / "checkpoints").exists()


def test_schedule_shorter_than_the_run_is_refused(tmp_path, clean_cache):
    """trainer.max_steps=12 with method.max_steps=6 trained its last 6 steps at learning rate 0 while the export
    counted 12; a run shorter than the schedule (a budgeted stop) is still allowed."""
    from ecgfm.config import ConfigError

    with pytest.raises(ConfigError, match="last 6 steps would train at learning rate 0"):
        train(_cfg(tmp_path / "a", clean_cache, ["trainer.max_steps=12", "method.max_steps=6"]))
    summary = train(_cfg(tmp_path / "b", clean_cache, ["trainer.max_steps=2", "method.max_steps=6"]))
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps" and summary["schedule_steps"] == 6
    assert summary["world_size"] == 1 and summary["accumulate_grad_batches"] == 1   # records per step: x batch


def test_a_time_limited_run_says_so(tmp_path, clean_cache):
    """A run stopped by trainer.max_time was reported as "training finished" with no stop reason in summary.json,
    and a rerun advised raising trainer.max_steps (the elapsed time is restored, so only max_time helps)."""
    from ecgfm.train.report import final_block

    out = tmp_path / "run"
    s = train(_cfg(out, clean_cache, ["trainer.max_steps=100000", "trainer.max_time=00:00:00:01"]))
    assert s["stop_reason"] == "max_time" and s["steps"] < s["schedule_steps"] == 100000
    assert "stopped early (max_time)" in final_block(s)
    _, _, info = load_encoder(out / "encoder")
    assert info["extra"]["stop_reason"] == "max_time"
    again = train(_cfg(out, clean_cache, ["trainer.max_steps=100000", "trainer.max_time=00:00:00:01"]))
    if again.get("nothing_trained"):
        assert "raise trainer.max_time" in final_block(again)


def test_a_batch_emptied_by_nonfinite_skip_is_not_a_crash():
    """training_step returns None for a batch whose every record was non-finite (nonfinite=skip); Lightning then
    passes {} to on_train_batch_end and the loss history raised KeyError('loss')."""
    from types import SimpleNamespace

    from ecgfm.train.loop import LossHistory

    hist = LossHistory()
    trainer = SimpleNamespace(accumulate_grad_batches=1, num_training_batches=4, global_step=1)
    hist.on_train_batch_end(trainer, None, {}, None, 0)
    hist.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0)}, None, 1)
    assert hist.losses == [2.0]
