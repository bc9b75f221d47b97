"""Review s27 (training path): three ways a resumed run differed from the uninterrupted one.

* D1: with ``trainer.limit_train_batches`` the epoch is shorter than the train loader; ``ResumableDataLoader`` saved the
  loader's length as the epoch's, so a checkpoint at a limited epoch's end resumed by skipping as many batches of the
  next epoch.
* D2: a checkpoint set back to a gradient-accumulation window's start (``AccumulationWindowCheckpoint``) kept the
  BatchNorm buffers as after the window's micro-batches, which the resumed run replays (counted twice).
* D3: SimCLR with an integer ``aug_seed`` saved its augmentation generator state from inside the window, so the replay
  drew other views.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset

from ecgfm.methods.simclr import AUG_STATE_KEY
from ecgfm.train import train
from ecgfm.train.loop import AccumulationWindowCheckpoint, make_resumable
from tests.unit.resume_helpers import SaveAndStop
from tests.unit.test_train_safety import _make_cache

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"


# ------------------------------------------------------------------------ a plain Lightning Trainer (library use)
class _Rows(Dataset):
    """Row i is ``[i, i + 1, 2 i]`` (floats), with its ``index``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor([float(i), float(i + 1), 2.0 * i]), "index": i}


class _Rows10(L.LightningDataModule):
    """10 rows, batch 2, in order: 5 batches per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = _Rows(10)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=2, shuffle=False)


class _Net(L.LightningModule):
    """A BatchNorm (training statistics in its buffers) and a linear layer; records the rows it trained on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn = torch.nn.BatchNorm1d(3)
        self.lin = torch.nn.Linear(3, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["index"].tolist())
        return self.lin(self.bn(batch["x"])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _BuffersAt(L.Callback):
    """The module's buffers at the start of training micro-batch ``n`` (0-based, counted over the fit)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.buffers = n, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.n:
            self.buffers = {k: v.clone() for k, v in pl_module.named_buffers()}
        self.seen += 1


def _plain_fit(root: Path, callbacks: list, ckpt: Path | None = None, **trainer_kw) -> _Net:
    datamodule, net = _Rows10(), _Net()
    make_resumable(datamodule)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[AccumulationWindowCheckpoint(), *callbacks], **trainer_kw)
    trainer.fit(net, datamodule=datamodule, ckpt_path=None if ckpt is None else str(ckpt), weights_only=True)
    return net


def test_a_checkpoint_at_a_limited_epochs_end_resumes_at_the_next_epochs_first_batch(tmp_path):
    """D1: limit_train_batches=2 of a 5-batch loader, a checkpoint after the second batch (epoch 0's end): the
    loader records the trainer's epoch length (2), so the resumed run starts epoch 1 at its first batch (before: the
    loader's length, 5, was saved, and epoch 1 skipped its first 2 batches: rows 4-7 instead of 0-3)."""
    kw = dict(max_epochs=3, limit_train_batches=2)
    reference = _plain_fit(tmp_path / "reference", [], **kw).seen
    assert reference == [0, 1, 2, 3] * 3
    ckpt = tmp_path / "end.ckpt"
    first = _plain_fit(tmp_path, [SaveAndStop(2, ckpt)], **kw).seen
    second = _plain_fit(tmp_path, [], ckpt=ckpt, **kw).seen
    assert first + second == reference
    loader = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader["epoch"], loader["batches"], loader["epoch_batches"]) == (0, 2, 2)


def test_a_checkpoint_set_back_to_a_window_start_holds_the_buffers_of_that_start(tmp_path):
    """D2: accumulation 2 (windows (0, 1), (2, 3), (4)), a checkpoint after micro-batch 2, inside the window (2, 3):
    it is set back to the window's start, and its BatchNorm buffers are those before micro-batch 2 (before: after
    it, so the replay counted micro-batch 2 twice: num_batches_tracked 6 instead of 5 at the end, other running
    statistics). The resumed run ends with the uninterrupted run's state_dict, buffers included."""
    kw = dict(max_epochs=1, accumulate_grad_batches=2)
    at_start = _BuffersAt(2)
    reference = _plain_fit(tmp_path / "reference", [at_start], **kw)
    ckpt = tmp_path / "mid.ckpt"
    _plain_fit(tmp_path, [SaveAndStop(3, ckpt)], **kw)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2   # set back
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(saved["state_dict"][name], at_start.buffers[name]), name
    resumed = _plain_fit(tmp_path, [], ckpt=ckpt, **kw)
    assert resumed.seen == list(range(4, 10))
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    assert int(res_state["bn.num_batches_tracked"]) == 5
    for name, value in ref_state.items():
        assert torch.equal(res_state[name], value), name


# -------------------------------------------------------------------------------------- the training pipeline
SIMCLR = ["+experiment=simclr", "data=cached", "data.num_workers=0", "backbone=vit1d_test", "data.batch_size=4",
          "data.val_fraction=0.2", "checkpoint.every_n_train_steps=100", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "torch_threads=1", "trainer.log_every_n_steps=1",
          "method.warmup_steps=1", "method.proj_dim=8", "method.proj_hidden=16",
          "trainer.accumulate_grad_batches=2", "trainer.max_steps=4", "method.max_steps=4", "method.aug_seed=5"]


class StopAfter(L.Callback):
    """``should_stop`` after ``n`` training micro-batches of this process (where Lightning's Timer sets it)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = int(n), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.n:
            trainer.should_stop = True


class AugStateAt(L.Callback):
    """Records (in :data:`AUG_STATES`) the SimCLR training generator's state at the start of micro-batch ``n``."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = int(n), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.n:
            AUG_STATES.append(pl_module._generator_for("train", pl_module.device).get_state())
        self.seen += 1


AUG_STATES: list[torch.Tensor] = []


def _simclr_cfg(out: Path, cache: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*SIMCLR, f"data.cache_dirs=[{cache}]", f"out_dir={out}",
                                                       f"paths.cache_root={out.parent / 'cache_root'}", *extra])


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _make_cache(tmp_path_factory.mktemp("s27") / "syn")


def test_simclr_aug_seed_stop_inside_a_window_resumes_as_the_uninterrupted_run(tmp_path, cache):
    """D2 + D3: SimCLR with aug_seed=5 (its own augmentation generator) and accumulation 2, stopped after micro-batch
    3 (inside the second window), then resumed to 4 steps: the last checkpoint equals the uninterrupted run's,
    weights and the projector's BatchNorm buffers alike. Before, the set-back checkpoint held the generator state
    after the window's first micro-batch (the replay drew other views: every weight differed) and the BatchNorm
    statistics of that micro-batch (num_batches_tracked one too high)."""
    ref_run, run = tmp_path / "reference", tmp_path / "run"
    AUG_STATES.clear()
    record = f"+trainer.callbacks=[{{_target_: {__name__}.AugStateAt, n: 2}}]"
    assert train(_simclr_cfg(ref_run, cache, record))["steps"] == 4
    assert len(AUG_STATES) == 1                       # the generator at the start of the window (2, 3)
    stop = f"+trainer.callbacks=[{{_target_: {__name__}.StopAfter, n: 3}}]"
    assert train(_simclr_cfg(run, cache, stop))["steps"] == 1
    saved = _last(run)
    assert saved["callbacks"]["AccumulationWindowCheckpoint"]["rewound"] == 1       # set back to the window start
    assert torch.equal(saved[AUG_STATE_KEY]["states"][0], AUG_STATES[0])
    second = train(_simclr_cfg(run, cache))
    assert second["steps"] == 4 and second["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    ref, res = _last(ref_run), _last(run)
    differ = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], res["state_dict"][k])]
    assert differ == []
    assert ref["callbacks"]["LossHistory"]["losses"] == res["callbacks"]["LossHistory"]["losses"]
