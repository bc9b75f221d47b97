"""DDP review fixes: per-rank random streams without ``deterministic_steps``; contrastive losses over unequal
per-rank batches (``nonfinite=skip`` leaves rows out); an empty batch under DDP stops with a clear error."""

from __future__ import annotations

import os
import random
import sys
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ecgfm.losses.contrastive import clocs_loss, nt_xent


# ------------------------------------------------------------------------------- A: per-rank seeding
def _draws() -> tuple[torch.Tensor, np.ndarray, float]:
    return torch.rand(16), np.random.rand(4), random.random()


def test_rank_seed_callback_keeps_rank_zero_and_separates_other_ranks():
    """deterministic_steps=false: every process is seeded with `seed`; rank 0 keeps that stream bit for bit (a
    one-process run is unchanged), other ranks draw their own, reproducibly."""
    from ecgfm.train.loop import RankSeedCallback

    L.seed_everything(7, verbose=False)
    before = _draws()
    streams = {}
    for rank in (0, 1, 2, 1):
        L.seed_everything(7, verbose=False)
        RankSeedCallback(7).setup(SimpleNamespace(global_rank=rank), None, "fit")
        streams.setdefault(rank, []).append(_draws())
    r0, r1, r2 = streams[0][0], streams[1][0], streams[2][0]
    assert torch.equal(r0[0], before[0]) and np.array_equal(r0[1], before[1]) and r0[2] == before[2]
    assert not torch.equal(r0[0], r1[0]) and not torch.equal(r1[0], r2[0]) and not torch.equal(r0[0], r2[0])
    assert not np.array_equal(r0[1], r1[1]) and r0[2] != r1[2]
    again = streams[1][1]
    assert torch.equal(again[0], r1[0]) and np.array_equal(again[1], r1[1]) and again[2] == r1[2]


def test_rank_seed_callback_reseeds_once_per_run():
    from ecgfm.train.loop import RankSeedCallback

    cb = RankSeedCallback(3)
    cb.setup(SimpleNamespace(global_rank=1), None, "fit")
    a = torch.rand(4)
    cb.setup(SimpleNamespace(global_rank=1), None, "validate")   # a later stage does not restart the stream
    assert not torch.equal(torch.rand(4), a)


def test_rank_seed_uses_the_step_seed_rule_with_its_own_parts():
    """One seeding rule: StepSeedCallback's hashing (unchanged streams), rank streams on parts no step uses."""
    from ecgfm.train.loop import StepSeedCallback, reseed

    StepSeedCallback(5)._reseed(1, 0, 0)
    a = torch.rand(3)
    reseed(5, 1, 0, 0)
    assert torch.equal(torch.rand(3), a)
    import hashlib
    digest = hashlib.sha256(repr((5, 1, 0, 0)).encode()).digest()        # the rule as it was before the refactor
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(torch.rand(3), a)


def _callback_cfg(deterministic_steps: bool):
    return OmegaConf.create({"nonfinite": "error", "deterministic_steps": deterministic_steps, "seed": 11,
                             "checkpoint": {"every_n_train_steps": 10, "save_top_k": 1, "save_last": True},
                             "trainer": {"enable_progress_bar": False}, "progress_refresh": 1})


@pytest.mark.parametrize("deterministic_steps", [True, False])
def test_build_callbacks_seeds_every_rank_in_both_modes(tmp_path, deterministic_steps):
    from ecgfm.train.build import build_callbacks
    from ecgfm.train.loop import RankSeedCallback, StepSeedCallback

    callbacks, _ = build_callbacks(_callback_cfg(deterministic_steps), tmp_path)
    kinds = [type(c) for c in callbacks]
    want, other = (StepSeedCallback, RankSeedCallback) if deterministic_steps else (RankSeedCallback, StepSeedCallback)
    assert kinds.count(want) == 1 and other not in kinds
    assert callbacks[kinds.index(want)].seed == 11


# ------------------------------------------------------------- B: unequal local batches in the contrastive losses
#: rows of the global batch held by each of the 2 ranks, per case (the last: rank 1's batch is empty)
_SPLITS = {"5+3": (5, 3), "2+6": (2, 6), "8+0": (8, 0)}


def _inputs():
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    xv = torch.randn(3, 8, 6, generator=g)
    patient = torch.tensor([3, -1, 5, 9, 3, 5, -1, 9])
    mask = torch.rand(3, 8, generator=g) > 0.2
    w = torch.randn(4, 6, generator=g)
    record = torch.tensor([0, 1, 2, 3, 0, 5, 6, 2])   # recordings 0 and 2 drawn twice
    return x1, x2, xv, patient, mask, w, record


def _loss(name: str, lin: torch.nn.Module, rows: slice) -> torch.Tensor:
    x1, x2, xv, patient, mask, _, record = _inputs()
    if name == "nt_xent":
        return nt_xent(lin(x1[rows]), lin(x2[rows]), temperature=0.2, record=record[rows])
    return clocs_loss(lin(xv[:, rows]), patient[rows], temperature=0.2, view_mask=mask[:, rows], record=record[rows])


def _linear() -> torch.nn.Module:
    lin = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_inputs()[5])
    return lin


def _unequal_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for case, sizes in _SPLITS.items():
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            for name in ("nt_xent", "clocs"):
                lin = _linear()
                loss = _loss(name, lin, rows)
                assert torch.isfinite(loss) and loss.requires_grad, (case, name, rank)
                loss.backward()
                grad = lin.weight.grad.clone()
                dist.all_reduce(grad)              # DDP: the mean of the ranks' gradients
                grad /= world
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                mean_loss /= world
                results[f"{case}/{name}"] = [mean_loss, grad]
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "unequal.pt"))
    finally:
        dist.destroy_process_group()


#: start method of this file's gloo worker processes: fork on Linux (the children inherit torch and the modules already
#: imported, where spawn re-imported them: seconds per process); spawn elsewhere (no safe fork)
START = "fork" if sys.platform.startswith("linux") else "spawn"


def test_unequal_rank_batches_give_the_single_process_loss(tmp_path):
    """2 gloo processes holding 5+3, 2+6 and 8+0 rows (records left out by nonfinite=skip): the gather no longer
    aborts, and the mean over ranks of loss and gradient is one process's on the union of the rows. Before the
    fix all_gather needed equal sizes (gloo SIGABRT)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_unequal_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=START)
    ddp = torch.load(tmp_path / "unequal.pt", weights_only=True)
    for name in ("nt_xent", "clocs"):
        lin = _linear()
        loss = _loss(name, lin, slice(0, 8))
        loss.backward()
        for case in _SPLITS:
            ddp_loss, ddp_grad = ddp[f"{case}/{name}"]
            torch.testing.assert_close(ddp_loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=f"{case} {name} loss")
            torch.testing.assert_close(ddp_grad, lin.weight.grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name} grad")


def test_single_process_losses_are_unchanged_by_the_padded_gather():
    """Without a process group nothing is gathered: the one-process NT-Xent is still the plain cross-entropy mean."""
    import torch.nn.functional as F

    x1, x2, *_ = _inputs()
    z1, z2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    u = torch.cat([z1, z2])
    logits = (u @ u.T / 0.2).masked_fill(torch.eye(16, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(8, 16), torch.arange(8)])
    assert torch.equal(nt_xent(x1, x2, temperature=0.2), F.cross_entropy(logits, target))


# -------------------------------------------------------------------- B: an empty batch under DDP
def _module():
    from ecgfm.backbones import create_backbone
    from ecgfm.methods.clocs import CLOCSModule

    return CLOCSModule(create_backbone("vit1d_test", seq_len=250, patch_size=25), mode="cmsc", proj_dim=8,
                       proj_layers=1)


def _empty_batch():
    return {"x": torch.zeros(0, 12, 250), "patient": torch.zeros(0, dtype=torch.long),
            "index": torch.zeros(0, dtype=torch.long)}


@pytest.mark.parametrize("step", ["training_step", "validation_step"])
def test_empty_batch_is_skipped_in_one_process_and_refused_under_ddp(step):
    """An empty batch (every record non-finite, nonfinite=skip) is skipped by one process; under DDP the rank used to
    return None while the others waited in the loss's all_gather (hang / gloo abort): now it names the cause."""
    from ecgfm.data.cache import NonFiniteDataError

    model = _module()
    model._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=4)
    assert getattr(model, step)(_empty_batch(), 0) is None
    model._trainer = SimpleNamespace(world_size=2, global_rank=1, global_step=4)
    with pytest.raises(NonFiniteDataError, match=r"rank 1 \(step 4\).*world_size=2.*one process"):
        getattr(model, step)(_empty_batch(), 0)


class _DrawsPerRank(L.LightningModule):
    """All-gathers one ``torch.rand`` draw per training step (as MAE's masks / SimCLR's augmentations are drawn);
    rank 0 saves them."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        draws = self.all_gather(torch.rand(4))              # (world, 4)
        if self.global_rank == 0:
            torch.save(draws, os.path.join(self.out_dir, f"draws{batch_idx}.pt"))
        return self.lin(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_ranks_draw_different_streams_without_deterministic_steps(tmp_path):
    """A real 2-process Lightning DDP run (gloo, spawn) with deterministic_steps=false's callback: the ranks'
    draws differ (before the fix both processes drew the stream of seed_everything(seed))."""
    from torch.utils.data import DataLoader, TensorDataset

    from ecgfm.train.loop import RankSeedCallback

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RankSeedCallback(0)])
    trainer.fit(_DrawsPerRank(str(tmp_path)), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2))
    for i in range(2):
        draws = torch.load(tmp_path / f"draws{i}.pt", weights_only=True)
        assert not torch.equal(draws[0], draws[1])
