"""A run stopped inside a gradient-accumulation window resumes with exactly the weights of an uninterrupted run.

With ``trainer.accumulate_grad_batches=2`` a stop after a window's first micro-batch (``trainer.max_time`` or a
callback's ``should_stop`` at ``on_train_batch_end``, Ctrl-C) wrote a checkpoint that counted that micro-batch as
done, while its gradient (never stepped, not in the checkpoint) was lost: the resumed run's first optimiser step
summed one micro-batch instead of two. The same for a periodic checkpoint written on the first micro-batch of a
resumed run. Checkpoints now resume at the window's start (``ecgfm.train.loop.AccumulationWindowCheckpoint``).

48 records, 39 for training, batch 7: 5 micro-batches per epoch, windows (1, 2), (3, 4), (5); 3 optimiser steps per
epoch, so micro-batch 6 is the first of epoch 1.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.pipelines import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
TOTAL = 5             # optimiser steps of the full run: 9 micro-batches over 2 epochs
STEPS_AFTER = {2: 1, 3: 1, 4: 2, 6: 3}   # optimiser steps done after n micro-batches: (1, 2) (3, 4) (5) | (6, 7)
COMMON = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=48", "data.params.duration=5.0",
          "data.val_fraction=0.15", "data.batch_size=7", "method.decoder_dim=16", "method.decoder_heads=2",
          "method.decoder_depth=1", "method.warmup_steps=1", f"method.max_steps={TOTAL}",
          "trainer.accumulate_grad_batches=2", "checkpoint.every_n_train_steps=100", "checkpoint.save_top_k=-1",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.deterministic=true",
          "trainer.log_every_n_steps=1", "torch_threads=1", "logger=csv"]


class StopAfter(L.Callback):
    """After ``n`` training micro-batches of this process: ``should_stop`` where Lightning's Timer (max_time) sets it,
    or a Ctrl-C (``KeyboardInterrupt``) at the same point."""

    def __init__(self, n: int, kind: str = "should_stop") -> None:
        self.n, self.kind, self.seen = int(n), kind, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.n:
            if self.kind == "SIGINT":
                raise KeyboardInterrupt()
            trainer.should_stop = True


def _cfg(run: Path, cache_root: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*COMMON, f"trainer.max_steps={TOTAL}", f"out_dir={run}",
                                                       f"paths.cache_root={cache_root}", *extra])


def _stop(n: int, kind: str = "should_stop") -> str:
    return f"+trainer.callbacks=[{{_target_: {__name__}.StopAfter, n: {n}, kind: {kind}}}]"


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == TOTAL
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"weights differ at {key}"
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for pid in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[pid][name], opt_b[pid][name]), f"optimiser {name} differs for param {pid}"
    # one loss per optimiser step, each the mean of the same two micro-batches
    assert a["callbacks"]["LossHistory"]["losses"] == b["callbacks"]["LossHistory"]["losses"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """The final state of an uninterrupted run of TOTAL steps (and the cache root it used)."""
    base = tmp_path_factory.mktemp("accum")
    run = base / "reference"
    assert train(_cfg(run, base / "cache"))["steps"] == TOTAL
    return _state(run), base / "cache"


@pytest.mark.parametrize("micro, kind", [(3, "should_stop"), (4, "should_stop"), (6, "should_stop"),
                                         (3, "SIGINT")],
                         ids=["inside-window", "window-boundary", "first-of-epoch-1", "ctrl-c-inside-window"])
def test_stop_then_resume_matches_uninterrupted_run(reference, tmp_path, micro, kind):
    ref, cache_root = reference
    run = tmp_path / "run"
    if kind == "SIGINT":
        with pytest.raises(SystemExit) as info:
            train(_cfg(run, cache_root, _stop(micro, kind)))
        assert info.value.code == 130
    else:
        assert train(_cfg(run, cache_root, _stop(micro, kind)))["steps"] == STEPS_AFTER[micro]
    saved = _state(run)["loops"]["fit_loop"]
    second = train(_cfg(run, cache_root))
    assert second["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and second["steps"] == TOTAL
    _assert_same_training_state(_state(run), ref)
    # the loader and Lightning's count of the epoch's batches agree, at the last optimiser step (the window's start)
    start = {3: 2, 4: 4, 6: 0}[micro]
    loader = saved["state_dict"]["combined_loader"][0]
    assert (loader["epoch_batches"], loader["epoch"], loader["batches"]) == (5, int(micro > 5), start)
    assert saved["epoch_loop.batch_progress"]["current"]["completed"] == start


def test_a_periodic_checkpoint_inside_a_window_resumes_at_its_start(reference, tmp_path):
    """A resumed process saves a periodic checkpoint on its first micro-batch when the step it resumed at is a
    multiple of every_n_train_steps (ModelCheckpoint's "already saved at this step" does not survive the restart):
    after a stop at a window boundary that first micro-batch opens a window. Resuming from that file matches too."""
    ref, cache_root = reference
    run = tmp_path / "run"
    assert train(_cfg(run, cache_root, _stop(2)))["steps"] == 1                # at a window boundary (step 1)
    train(_cfg(run, cache_root, "checkpoint.every_n_train_steps=1", _stop(1)))  # saves step 1 on micro-batch 3
    periodic = run / "checkpoints" / "step0000001.ckpt"
    loader = torch.load(periodic, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    cfg = _cfg(run, cache_root)
    cfg.resume = str(periodic)
    assert train(cfg)["steps"] == TOTAL
    _assert_same_training_state(_state(run), ref)
    assert loader["batches"] == 2            # micro-batch 3 opened the window: saved at its start
