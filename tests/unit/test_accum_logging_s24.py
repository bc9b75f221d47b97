"""With ``trainer.accumulate_grad_batches = k`` each logged ``train/<term>`` of an optimiser step is the mean of the
step's ``k`` micro-batch values (the loss ``LossHistory`` and ``summary.json`` record), not the last micro-batch's.

48 records, 39 for training, batch 7: 5 micro-batches per epoch. With k = 2 the windows are (0, 1), (2, 3), (4) in
every epoch (the last one shorter); 4 optimiser steps: 3 in epoch 0 and the window (0, 1) of epoch 1.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.pipelines import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
STEPS = 4
COMMON = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=48", "data.params.duration=5.0",
          "data.val_fraction=0.15", "data.batch_size=7", "method.decoder_dim=16", "method.decoder_heads=2",
          "method.decoder_depth=1", "method.warmup_steps=1", f"method.max_steps={STEPS}", f"trainer.max_steps={STEPS}",
          "checkpoint.every_n_train_steps=100", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "trainer.deterministic=true", "trainer.log_every_n_steps=1",
          "torch_threads=1", "logger=csv", "trainer.limit_val_batches=0"]
NOT_TERMS = {"train/lr", "train/samples_per_s"}


class TermSpy(L.Callback):
    """Records ``(epoch, batch_idx, {term: value})`` of every training micro-batch (the loss under ``loss``)."""

    records: list[tuple[int, int, dict[str, float]]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        TermSpy.records = []
        shared = pl_module.shared_step
        spy = self

        def wrapped(batch):
            loss, terms = shared(batch)
            if pl_module.training:
                spy._last = {"loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()}}
            return loss, terms

        pl_module.shared_step = wrapped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        TermSpy.records.append((int(trainer.current_epoch), int(batch_idx), dict(self._last)))


def _run(tmp_path: Path, accumulate: int) -> tuple[list[dict[str, float]], list[float], list]:
    run = tmp_path / f"run{accumulate}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *COMMON, f"trainer.accumulate_grad_batches={accumulate}", f"out_dir={run}",
            f"paths.cache_root={tmp_path / 'cache'}",
            f"+trainer.callbacks=[{{_target_: {__name__}.TermSpy}}]"])
    assert train(cfg)["steps"] == STEPS
    rows = [r for r in csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")) if r.get("train/loss")]
    logged = [{k: float(v) for k, v in r.items() if k.startswith("train/") and k not in NOT_TERMS and v}
              for r in rows]
    hist = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["LossHistory"]
    return logged, hist["losses"], list(TermSpy.records)


def _windows(records: list, k: int, per_epoch: int = 5) -> list[list[dict[str, float]]]:
    """Group the micro-batches as LossHistory does: every k-th batch of an epoch and the epoch's last end a window."""
    out, cur = [], []
    for _, b, terms in records:
        cur.append(terms)
        if (b + 1) % k == 0 or b + 1 >= per_epoch:
            out.append(cur)
            cur = []
    assert not cur
    return out


def test_accumulated_step_logs_the_mean_of_its_micro_batches(tmp_path):
    logged, losses, records = _run(tmp_path, 2)
    assert [b for _, b, _ in records] == [0, 1, 2, 3, 4, 0, 1]
    windows = _windows(records, 2)
    assert [len(w) for w in windows] == [2, 2, 1, 2] and len(logged) == len(losses) == STEPS
    for step, (row, window, loss) in enumerate(zip(logged, windows, losses)):
        assert row["train/loss"] == pytest.approx(loss, abs=1e-6), f"step {step}: CSV != LossHistory's mean"
        assert set(row) == {f"train/{k}" for k in window[0]}
        for name in window[0]:
            mean = sum(t[name] for t in window) / len(window)
            assert row[f"train/{name}"] == pytest.approx(mean, abs=1e-6), f"step {step}: train/{name}"
    # the steps of two micro-batches differ from their last micro-batch (what was logged before)
    assert all(abs(row["train/loss"] - w[-1]["loss"]) > 1e-5 for row, w in zip(logged, windows) if len(w) == 2)


def test_without_accumulation_each_step_logs_its_batch(tmp_path):
    logged, losses, records = _run(tmp_path, 1)
    assert len(logged) == len(losses) == len(records) == STEPS
    for row, loss, (_, _, terms) in zip(logged, losses, records):
        assert row["train/loss"] == pytest.approx(loss, abs=1e-6)
        for name, value in terms.items():
            assert row[f"train/{name}"] == pytest.approx(value, abs=1e-6)
