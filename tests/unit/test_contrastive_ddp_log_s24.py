"""Under DDP, the value NT-Xent / CLOCS return (what SimCLR / CLOCS / CReMA log as ``train/loss``) is the global loss
on every rank, also when the ranks hold different numbers of rows or of positives, while the gradient stays the one
whose average over ranks (DDP) is the gradient of that global loss. Two gloo processes on CPU."""

from __future__ import annotations

import os
import sys

import torch

from ecgfm.losses.contrastive import clocs_loss, nt_xent

# rows per rank, per case: unequal splits (SimCLR pairs left out by `keep`, nonfinite=skip), and an empty rank
SPLITS = {"uneven": [5, 3], "empty": [8, 0]}


def _loss(name: str, lin: torch.nn.Linear, inputs: tuple, sl: slice, gather: bool) -> torch.Tensor:
    x1, x2, xv, patient, mask, _, record = inputs
    if name == "nt_xent":
        return nt_xent(lin(x1[sl]), lin(x2[sl]), temperature=0.2, gather=gather, record=record[sl])
    return clocs_loss(lin(xv[:, sl]), patient[sl], temperature=0.2, gather=gather, view_mask=mask[:, sl],
                      record=record[sl])


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        inputs = torch.load(os.path.join(out_dir, "inputs.pt"), weights_only=True)
        results = {}
        for split, n in SPLITS.items():
            lo = sum(n[:rank])
            sl = slice(lo, lo + n[rank])
            for name in ("nt_xent", "clocs"):
                lin = _linear(inputs[5])
                loss = _loss(name, lin, inputs, sl, gather=True)
                loss.backward()
                grad = lin.weight.grad.clone()
                dist.all_reduce(grad)      # what DDP does: average the parameter gradients over ranks
                grad /= world
                results[f"{split}/{name}"] = (loss.detach().clone(), grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


#: start method of this file's gloo worker processes: fork on Linux (the children inherit torch and the modules already
#: imported, where spawn re-imported them: seconds per process); spawn elsewhere (no safe fork)
START = "fork" if sys.platform.startswith("linux") else "spawn"


def test_ddp_value_is_global_loss_with_uneven_ranks(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(24)
    x1 = torch.randn(8, 6, generator=g)
    x2 = x1 + 0.8 * torch.randn(8, 6, generator=g)
    xv = torch.randn(3, 8, 6, generator=g)
    xv[1:] = xv[0] + 0.7 * torch.randn(2, 8, 6, generator=g)
    patient = torch.tensor([3, -1, 5, 3, 3, 5, -1, 9])  # patient 3 three times on rank 0 ("uneven"), 5 across
    mask = torch.rand(3, 8, generator=g) > 0.2
    mask[:, :2] = True
    w = torch.randn(4, 6, generator=g)
    record = torch.tensor([0, 0, 0, 1, 2, 3, 4, 2])      # rank 0 drew recording 0 three times; 2 across ranks
    inputs = (x1, x2, xv, patient, mask, w, record)
    torch.save(inputs, tmp_path / "inputs.pt")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=START)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for split in SPLITS:
        for name in ("nt_xent", "clocs"):
            lin = _linear(w)
            single = _loss(name, lin, inputs, slice(0, 8), gather=False)   # one process on the union
            single.backward()
            for r, res in enumerate(ranks):
                value, grad = res[f"{split}/{name}"]
                assert torch.allclose(value, single.detach(), rtol=0, atol=1e-6), \
                    (split, name, r, float(value), float(single))
                assert torch.allclose(grad, lin.weight.grad, rtol=0, atol=1e-6), (split, name, r)
