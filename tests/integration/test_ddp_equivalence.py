"""Two DDP processes (gloo, CPU) on halves of a batch give the loss and gradients of one process on the whole.

What is compared: one process computes ``loss`` and parameter gradients on the global batch; two processes each
compute their local loss on half of it, backpropagate, and average gradients over ranks with ``all_reduce`` (what
``DistributedDataParallel`` does), and the mean of the local losses is taken. For

* MAE: the random masks are drawn for the *global* batch from one fixed-seed generator and each rank takes its
  rows ("fixed masking seed"), so both set-ups mask every sample identically;
* MAE on a batch mixing one-lead and 12-lead records split unevenly between the ranks (``mae_mixed``; rank 0 holds
  three one-lead rows, so far fewer counted patches than rank 1): each row's mask is drawn from a generator seeded
  by the row's content, so it is the same in whichever batch or lead-set group the row is encoded; each rank's loss
  has the gradient of its error sum over the mean count over ranks (``ecgfm.losses.ddp_mean``), without which a
  one-lead patch of rank 0 weighs several times more than in one process, and the value of the global mean on
  every rank (what each rank logs: compared rank by rank);
* CLOCS (CMSC, patient-aware, a linear head without BatchNorm): the contrastive candidates of every rank are
  gathered *with gradients* (``ecgfm.losses.contrastive.gather_with_grad``); patients repeat across the two
  halves so cross-rank positives are exercised.

BatchNorm layers (SimCLR / CREMA heads) would need SyncBatchNorm for exact equality, which torch supports on
GPUs only, so those methods are not part of this CPU test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ecgfm.backbones import create_backbone

GLOBAL_BATCH = 8
WORLD = 2


def _global_batch(method: str = "mae") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(GLOBAL_BATCH, 12, 250, generator=g)
    lead_mask = torch.ones(GLOBAL_BATCH, 12, dtype=torch.bool)
    if method == "mae_mixed":   # rows 0-2 (rank 0) are one-lead records: lead I, the other leads zero-filled
        lead_mask[:3, 1:] = False
        x[:3, 1:] = 0
    return {"x": x, "x2": torch.randn(GLOBAL_BATCH, 12, 250, generator=g), "lead_mask": lead_mask,
            # rows 1 and 5 (one on each rank) share a patient; -1 is unknown
            "patient": torch.tensor([10, 11, -1, 12, 13, 11, -1, 14]),
            "index": torch.arange(GLOBAL_BATCH)}


def _build(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = create_backbone("vit1d_test", seq_len=250, patch_size=25)
    if method in ("mae", "mae_mixed"):
        from ecgfm.methods.mae import MAEModule

        model = MAEModule(backbone, decoder_dim=16, decoder_depth=1, decoder_heads=2, lead_aware=True)
    else:
        from ecgfm.methods.clocs import CLOCSModule

        model = CLOCSModule(backbone, mode="cmsc", proj_dim=16, proj_layers=1, patient_aware=True)
    model.train()
    return model


def _fix_masks(model: torch.nn.Module, rank: int, world: int) -> None:
    """Masks of the global batch from a fixed seed; this rank keeps its rows."""
    from ecgfm.methods.mae import random_masking

    def masking(x: torch.Tensor, generator: torch.Generator | None = None, lead_subset: torch.Tensor | None = None):
        assert lead_subset is None  # lead-subset augmentation is off in this test
        b, leads, t = x.shape
        gen = torch.Generator().manual_seed(99)
        ids_keep, ids_restore, mask = random_masking(b * world, leads, t // model.backbone.patch_size,
                                                     model.mask_ratio, model.mask_mode, generator=gen)
        rows = slice(rank * b, (rank + 1) * b)
        return ids_keep[rows], ids_restore[rows], mask[rows]

    model.random_masking = masking


def _row_keyed_masks(model: torch.nn.Module) -> None:
    """Each row's mask from a generator seeded by the row's content: the same whatever batch or lead-set group
    the row is encoded in (the visible patches drawn from the group's present leads, as the module does)."""
    from ecgfm.methods.mae import random_masking

    def masking(x: torch.Tensor, generator: torch.Generator | None = None, leads: torch.Tensor | None = None):
        n = x.shape[2] // model.backbone.patch_size
        rows = [random_masking(1, x.shape[1], n, model.mask_ratio, model.mask_mode, leads=leads,
                               generator=torch.Generator().manual_seed(int(x[i].abs().sum() * 1000) % 2**31))
                for i in range(x.shape[0])]
        return tuple(torch.cat(parts) for parts in zip(*rows))

    model.random_masking = masking


def _fix(model: torch.nn.Module, method: str, rank: int, world: int) -> None:
    if method == "mae":
        _fix_masks(model, rank, world)
    elif method == "mae_mixed":
        _row_keyed_masks(model)


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = model.shared_step(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _worker(rank: int, world: int, methods: list[str], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for method in methods:
            model = _build(method)
            _fix(model, method, rank, world)
            n = GLOBAL_BATCH // world
            local = {k: v[rank * n:(rank + 1) * n] for k, v in _global_batch(method).items()}
            loss, grads = _loss_and_grads(model, local)
            for g in grads.values():  # DistributedDataParallel's gradient averaging
                dist.all_reduce(g)
                g /= world
            # every rank's own value (what it logs) and the averaged gradients
            torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"{method}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_equal(ddp_loss: float | None, ddp_grads: dict, loss_1: float, grads_1: dict) -> None:
    if ddp_loss is not None:
        assert ddp_loss == pytest.approx(loss_1, rel=1e-5, abs=1e-6)
    assert ddp_grads.keys() == grads_1.keys()
    assert len(grads_1) > 5
    for name, g in grads_1.items():
        torch.testing.assert_close(ddp_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_two_processes_equal_one_process(tmp_path):
    """Real process group (2 processes, gloo): MAE (one lead set, and one- and 12-lead records split unevenly
    between the ranks) and CLOCS."""
    torch.set_num_threads(1)
    methods = ["mae", "mae_mixed", "clocs"]
    single = {}
    for method in methods:
        model = _build(method)
        _fix(model, method, 0, 1)
        single[method] = _loss_and_grads(model, _global_batch(method))

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork on Linux: the ranks inherit torch, Lightning and the modules imported here (spawn re-imported them in
    # every rank, most of this test's time); spawn elsewhere
    mp.start_processes(_worker, args=(WORLD, methods, str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="fork" if sys.platform.startswith("linux") else "spawn")
    for method in methods:
        for rank in range(WORLD):   # each rank logs the global loss, also with unequal counted patches (mae_mixed)
            ddp = torch.load(tmp_path / f"{method}_rank{rank}.pt", weights_only=True)
            _assert_equal(ddp["loss"], ddp["grads"], *single[method])


def test_mae_half_batches_average_to_the_global_batch():
    """Fast variant of the MAE case without processes: MAE has no cross-sample term, so the rank-local losses and
    gradients (each rank with its rows of the fixed global masks) must average to the single-process ones."""
    torch.set_num_threads(1)
    model = _build("mae")
    _fix_masks(model, 0, 1)
    loss_1, grads_1 = _loss_and_grads(model, _global_batch())
    n = GLOBAL_BATCH // WORLD
    losses, grads = [], {}
    for r in range(WORLD):
        _fix_masks(model, r, WORLD)
        loss, g = _loss_and_grads(model, {k: v[r * n:(r + 1) * n] for k, v in _global_batch().items()})
        losses.append(loss)
        for k, v in g.items():
            grads[k] = grads.get(k, 0) + v / WORLD
    _assert_equal(sum(losses) / WORLD, grads, loss_1, grads_1)


@pytest.mark.parametrize("global_count", [True, False])
def test_mae_mixed_lead_halves_average_to_the_global_batch(monkeypatch, global_count):
    """Fast variant for one- and 12-lead rows split unevenly between two ranks, without processes (the all_reduce of
    ``ddp_mean_count`` replaced by the mean of both ranks' ``(error sum, count)``): each rank's loss has the value of
    the one-process loss (the global per-patch mean) and gradients that average to the one-process gradients; over
    its own count (the old per-rank mean) neither holds, so the comparison can fail."""
    import ecgfm.losses.contrastive as C

    torch.set_num_threads(1)
    model = _build("mae_mixed")
    _row_keyed_masks(model)
    loss_1, grads_1 = _loss_and_grads(model, _global_batch("mae_mixed"))
    n = GLOBAL_BATCH // WORLD
    halves = [{k: v[r * n:(r + 1) * n] for k, v in _global_batch("mae_mixed").items()} for r in range(WORLD)]
    seen = []
    monkeypatch.setattr(C, "ddp_mean_count", lambda c: seen.append(c.detach().clone()) or c)
    monkeypatch.setattr(C, "world_info", lambda: (0, WORLD))
    for half in halves:
        model.shared_step(half)
    assert seen[0][1] < seen[1][1] / 2                             # rank 0 holds far fewer counted patches
    mean = (seen[0] + seen[1]) / WORLD                             # what all_reduce / world gives every rank
    if global_count:
        monkeypatch.setattr(C, "ddp_mean_count", lambda c: mean)
    else:
        monkeypatch.setattr(C, "world_info", lambda: (0, 1))
    losses, grads = [], {}
    for half in halves:
        loss, g = _loss_and_grads(model, half)
        losses.append(loss)
        for k, v in g.items():
            grads[k] = grads.get(k, 0) + v / WORLD
    if global_count:
        for loss in losses:                                        # every rank logs the global per-patch mean
            _assert_equal(loss, grads, loss_1, grads_1)
    else:
        assert losses[0] != pytest.approx(loss_1, rel=1e-3)
        with pytest.raises(AssertionError):
            _assert_equal(None, grads, loss_1, grads_1)


def test_without_gathering_the_contrastive_gradients_differ(tmp_path):
    """Sanity check that the comparison can fail: a rank-local CLOCS loss (no gather) is not the global one."""
    import ecgfm.losses.contrastive as C

    model = _build("clocs")
    loss_1, _ = _loss_and_grads(model, _global_batch())
    halves = []
    for r in range(WORLD):
        n = GLOBAL_BATCH // WORLD
        local = {k: v[r * n:(r + 1) * n] for k, v in _global_batch().items()}
        halves.append(_loss_and_grads(model, local)[0])
    assert C.world_info() == (0, 1)
    assert abs(sum(halves) / WORLD - loss_1) > 1e-3


@pytest.mark.slow
def test_train_py_with_ddp_on_two_cpu_processes(tmp_path):
    """`python train.py trainer=ddp` with 2 CPU processes (Lightning launches the second one): it trains and writes
    one checkpoint folder, one export and one summary."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    cmd = [sys.executable, str(root / "train.py"), "+experiment=mae", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "trainer.sync_batchnorm=false", "trainer.benchmark=false",
           "trainer.max_steps=3", "trainer.enable_progress_bar=false", "backbone=vit1d_test",
           "data.params.n_records=32", "data.params.duration=3.0", "data.batch_size=4", "method.decoder_dim=16",
           "method.decoder_heads=2", "method.decoder_depth=1", "checkpoint.every_n_train_steps=2",
           f"paths.cache_root={tmp_path / 'cache'}", f"hydra.run.dir={run}", "torch_threads=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert (run / "encoder" / "encoder.safetensors").is_file()
