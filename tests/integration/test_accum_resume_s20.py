"""A run stopped inside a gradient-accumulation window resumes with exactly the weights of an uninterrupted run.

With ``trainer.accumulate_grad_batches=2`` a stop after a window's first micro-batch (``trainer.max_time`` or a
callback's ``should_stop`` at ``on_train_batch_end``, Ctrl-C) wrote a checkpoint that counted that micro-batch as
done, while its gradient (never stepped, not in the checkpoint) was lost: the resumed run's first optimiser step
summed one micro-batch instead of two. The same for a periodic checkpoint written on the first micro-batch of a
resumed run. Checkpoints now resume at the window's start (``ecgfm.train.loop.AccumulationWindowCheckpoint``).

48 records, 39 for training, batch 7: 5 micro-batches per epoch, windows (1, 2), (3, 4), (5); 3 optimiser steps per
epoch, so micro-batch 6 is the first of epoch 1.

Also: Lightning's own counters (the logger step ``_batches_that_stepped`` was one too high after a resume at a window
start right after a validation check, or at an epoch's first window), ``make_resumable`` with a plain Trainer
(without the callback the loader must resume where Lightning does) and ``NonFiniteGuard``'s crop count (the replayed
window's skips were counted twice).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset

from ecgfm.pipelines import NonFiniteGuard, make_resumable, train
from ecgfm.train.loop import AccumulationWindowCheckpoint
from tests.unit.resume_helpers import SaveAndStop

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
    # Lightning's counters: the logger step (`_batches_that_stepped`), the epoch's batches, the optimiser and LR
    # scheduler steps, the epochs. Not compared: the zero_grad counts (the replayed window zeroes its gradients once
    # more) and the validation loop's (a should_stop stop validates at once, as Lightning does for early stopping)
    loops_a, loops_b = a["loops"]["fit_loop"], b["loops"]["fit_loop"]
    for key in ("epoch_loop.state_dict", "epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                "epoch_progress"):
        assert loops_a[key] == loops_b[key], f"{key}: {loops_a[key]} != {loops_b[key]}"
    assert loops_a["epoch_loop.state_dict"]["_batches_that_stepped"] == TOTAL

    def steps(loops: dict) -> dict:
        return loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]

    assert steps(loops_a) == steps(loops_b)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == TOTAL


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """The final state of an uninterrupted run of TOTAL steps (and the cache root it used)."""
    base = tmp_path_factory.mktemp("accum")
    run = base / "reference"
    assert train(_cfg(run, base / "cache"))["steps"] == TOTAL
    return _state(run), base / "cache"


@pytest.mark.parametrize("micro, kind, extra", [(3, "should_stop", ()), (4, "should_stop", ()),
                                                (6, "should_stop", ()), (3, "SIGINT", ()),
                                                (3, "should_stop", ("trainer.val_check_interval=2",))],
                         ids=["inside-window", "window-boundary", "first-of-epoch-1", "ctrl-c-inside-window",
                              "validation-before-window-start"])
def test_stop_then_resume_matches_uninterrupted_run(reference, tmp_path, micro, kind, extra):
    """first-of-epoch-1 and validation-before-window-start (a validation after micro-batch 2, the window (3, 4)
    resumed at its start) take Lightning's "restarted on last" path, which added 1 to the logger step."""
    ref, cache_root = reference
    run = tmp_path / "run"
    if kind == "SIGINT":
        with pytest.raises(SystemExit) as info:
            train(_cfg(run, cache_root, *extra, _stop(micro, kind)))
        assert info.value.code == 130
    else:
        assert train(_cfg(run, cache_root, *extra, _stop(micro, kind)))["steps"] == STEPS_AFTER[micro]
    saved = _state(run)["loops"]["fit_loop"]
    second = train(_cfg(run, cache_root, *extra))
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


# ------------------------------------------------------------------------ a plain Lightning Trainer (library use)
class _Rows(Dataset):
    """Row i is ``[i, i, i]`` (``nan`` first where i is in ``bad``), with its ``index``."""

    def __init__(self, n: int, bad: tuple[int, ...] = ()) -> None:
        self.n, self.bad = n, set(bad)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        x = torch.full((3,), float(i))
        if i in self.bad:
            x[0] = float("nan")
        return {"x": x, "index": i}


class _Rows10(L.LightningDataModule):
    """10 rows, batch 2, in order: 5 micro-batches, windows (0, 1), (2, 3), (4) with accumulation 2."""

    def __init__(self, bad: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.rows = _Rows(10, bad)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=2, shuffle=False)


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen: list[int] = []        # the rows trained on, in order

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["index"].tolist())
        return self.lin(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _plain_fit(root: Path, callbacks: list, ckpt: Path | None = None, bad: tuple[int, ...] = ()) -> list[int]:
    datamodule, net = _Rows10(bad), _Net()
    make_resumable(datamodule)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(net, datamodule=datamodule, ckpt_path=None if ckpt is None else str(ckpt), weights_only=True)
    return net.seen


@pytest.mark.parametrize("window_callback", [False, True], ids=["plain-trainer", "with-AccumulationWindowCheckpoint"])
def test_make_resumable_resumes_where_lightning_does(tmp_path, window_callback):
    """make_resumable with the user's own Trainer and accumulation 2, a checkpoint after micro-batch 3 (inside the
    window (2, 3)): the loader's position is Lightning's count of the epoch's batches (the batches processed
    without AccumulationWindowCheckpoint, the window's start with it), so the resumed run trains every batch of the
    epoch after that position (before the fix, without the callback: loader 2, Lightning 3, the last batch lost)."""
    ckpt = tmp_path / "mid.ckpt"

    def callbacks() -> list:
        return [AccumulationWindowCheckpoint()] if window_callback else []

    first = _plain_fit(tmp_path, [*callbacks(), SaveAndStop(3, ckpt)])
    saved = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]
    loader = saved["state_dict"]["combined_loader"][0]
    processed = saved["epoch_loop.batch_progress"]["current"]["processed"]
    assert loader["batches"] == processed == (2 if window_callback else 3)
    second = _plain_fit(tmp_path, callbacks(), ckpt=ckpt)
    assert first == list(range(6))
    assert second == list(range(2 * processed, 10))


def test_nonfinite_skips_of_a_replayed_window_are_counted_once(tmp_path):
    """nonfinite=skip: NonFiniteGuard's count saved in a checkpoint set back to the window's start is that of the
    start (the resumed run screens the window's micro-batches again): row 5 (micro-batch 3, inside the window) and
    row 7 are each counted once, as in an uninterrupted run (before: row 5 twice, 3 crops)."""
    bad = (5, 7)
    reference = NonFiniteGuard("skip")
    _plain_fit(tmp_path / "reference", [AccumulationWindowCheckpoint(), reference], bad=bad)
    assert reference.summary()["nonfinite_crops_skipped"] == 2
    ckpt = tmp_path / "mid.ckpt"
    _plain_fit(tmp_path, [AccumulationWindowCheckpoint(), NonFiniteGuard("skip"), SaveAndStop(3, ckpt)], bad=bad)
    assert torch.load(ckpt, weights_only=True)["callbacks"]["NonFiniteGuard"]["crops"] == 0
    resumed = NonFiniteGuard("skip")
    _plain_fit(tmp_path, [AccumulationWindowCheckpoint(), resumed], ckpt=ckpt, bad=bad)
    summary = resumed.summary()
    assert (summary["nonfinite_crops_skipped"], summary["nonfinite_records_skipped"]) == (2, 2)
