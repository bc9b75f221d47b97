"""NT-Xent and CLOCS losses against slow loop references; DDP gathering equals the single-process loss."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from ecgfm.losses.contrastive import clocs_loss, gather_with_grad, nt_xent




# ----------------------------------------------------------------------------- slow, obviously-correct references
def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    u = [F.normalize(r, dim=0) for r in torch.cat([z1, z2])]
    n2 = len(u)
    n = n2 // 2
    total = 0.0
    for a in range(n2):
        p = (a + n) % n2
        denom = sum(torch.exp(u[a] @ u[k] / t) for k in range(n2) if k != a)
        total = total - torch.log(torch.exp(u[a] @ u[p] / t) / denom)
    return total / n2


def ref_clocs(zv: torch.Tensor, patient: list[int], t: float, patient_aware: bool, mask=None) -> torch.Tensor:
    v, n, _ = zv.shape
    mask = torch.ones(v, n, dtype=torch.bool) if mask is None else mask
    u = F.normalize(zv, dim=-1)
    pair_losses = []
    for a in range(v):
        for b in range(a + 1, v):
            terms = []
            for s, d in ((a, b), (b, a)):
                for i in range(n):
                    if not mask[s, i]:
                        continue
                    denom = sum(torch.exp(u[s, i] @ u[d, j] / t) for j in range(n) if mask[d, j])
                    for j in range(n):
                        if not mask[d, j]:
                            continue
                        if i == j or (patient_aware and patient[i] >= 0 and patient[i] == patient[j]):
                            terms.append(-torch.log(torch.exp(u[s, i] @ u[d, j] / t) / denom))
            if terms:
                pair_losses.append(sum(terms) / len(terms))
    return sum(pair_losses) / len(pair_losses)


# ----------------------------------------------------------------------------- NT-Xent
@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference_value_and_gradient(t):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(z1, z2, temperature=t)
    ref = ref_nt_xent(z1, z2, t)
    # nt_xent computes in float32
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(ours, (z1, z2))
    g_ref = torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)


def test_nt_xent_limits():
    # near-orthogonal embeddings (64-D, seeded), identical views and a tiny temperature: every positive
    # dominates -> loss ~ 0 (in 4-D two random rows can be too similar, which made this flaky)
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    assert nt_xent(z * 3, z, temperature=0.01) < 1e-3
    # all embeddings identical: uniform over 2N-1 candidates -> log(2N - 1)
    same = torch.ones(8, 4)
    assert math.isclose(nt_xent(same, same).item(), math.log(15), rel_tol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="z1 and z2"):
        nt_xent(z, z[:4])


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(nt_xent(x, x + 1, gather=True), nt_xent(x, x + 1, gather=False))


# ----------------------------------------------------------------------------- CLOCS
@pytest.mark.parametrize("patient_aware", [True, False])
@pytest.mark.parametrize("t", [0.1, 0.7])
def test_clocs_matches_reference_with_patients(patient_aware, t):
    g = torch.Generator().manual_seed(1)
    zv = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    patient = [4, 4, -1, 7, 7, -1]  # two patients with two recordings each; unknown ids never match
    ours = clocs_loss(zv, torch.tensor(patient), temperature=t, patient_aware=patient_aware)
    ref = ref_clocs(zv, patient, t, patient_aware)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, zv)
    (g_ref,) = torch.autograd.grad(ref, zv)
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_clocs_patient_awareness_changes_the_loss():
    zv = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(2))
    p = torch.tensor([0, 0, 1, 1, 2, 2])
    assert not torch.isclose(clocs_loss(zv, p, patient_aware=True), clocs_loss(zv, p, patient_aware=False))
    # unknown patients (-1) are never positives of each other
    unknown = torch.full((6,), -1)
    assert torch.isclose(clocs_loss(zv, unknown, patient_aware=True), clocs_loss(zv, unknown, patient_aware=False))


def test_clocs_view_mask_matches_reference():
    g = torch.Generator().manual_seed(3)
    zv = torch.randn(4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5, generator=g) > 0.3
    mask[:, 0] = True
    patient = [1, -1, 1, 2, 2]
    ours = clocs_loss(zv, torch.tensor(patient), temperature=0.2, view_mask=mask)
    ref = ref_clocs(zv, patient, 0.2, True, mask)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, zv)
    (g_ref,) = torch.autograd.grad(ref, zv)
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)
    # absent views receive no gradient
    assert torch.all(g_ours[~mask] == 0)


def test_clocs_two_views_no_patients_is_symmetric_infonce():
    zv = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(4))
    u = F.normalize(zv, dim=-1)
    s = u[0] @ u[1].T / 0.1
    target = torch.arange(8)
    expected = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    assert torch.allclose(clocs_loss(zv, None, temperature=0.1), expected, atol=1e-6)


def test_clocs_bad_input_and_no_positives():
    with pytest.raises(ValueError, match="V>=2"):
        clocs_loss(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="patient"):
        clocs_loss(torch.randn(2, 4, 3), torch.zeros(3, dtype=torch.long))
    zv = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    loss = clocs_loss(zv, None, view_mask=mask)
    assert loss.item() == 0.0 and loss.requires_grad


def test_a_recording_drawn_twice_is_not_its_own_negative():
    """The pretraining sampler draws with replacement: one recording can fill two rows of a batch. Its other
    crops must not be pushed away as negatives (NT-Xent: left out; CLOCS: positives, views of one recording)."""
    e = torch.eye(4)[[0, 1, 0, 2]] * 10                    # rows 0 and 2: the same recording, same embedding
    record = torch.tensor([7, 8, 7, 9])
    assert nt_xent(e, e, temperature=0.1) > 0.5             # without record ids: its twin is a hard negative
    assert nt_xent(e, e, temperature=0.1, record=record) < 1e-3
    together = torch.stack([e, e])
    apart = torch.stack([torch.eye(4)[[0, 1, 3, 2]] * 10] * 2)   # the twin's crops embedded away from the first's
    # without record ids CLOCS rewards moving the twin's crops apart; with them, bringing them together
    assert clocs_loss(apart, None, temperature=0.1) < clocs_loss(together, None, temperature=0.1)
    assert clocs_loss(together, None, temperature=0.1, record=record) < clocs_loss(apart, None, temperature=0.1,
                                                                                   record=record)
    with pytest.raises(ValueError, match="record must be"):
        nt_xent(e, e, record=record[:3])


# ----------------------------------------------------------------------------- DDP (2 gloo processes on CPU)
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x1, x2, xv, patient, mask, w, record = torch.load(os.path.join(out_dir, "inputs.pt"), weights_only=True)
        n = x1.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        results = {}
        for name in ("nt_xent", "clocs"):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            if name == "nt_xent":
                loss = nt_xent(lin(x1[sl]), lin(x2[sl]), temperature=0.2, gather=True, record=record[sl])
            else:
                loss = clocs_loss(lin(xv[:, sl]), patient[sl], temperature=0.2, gather=True, view_mask=mask[:, sl],
                                  record=record[sl])
            loss.backward()
            grad = lin.weight.grad.clone()
            dist.all_reduce(grad)          # what DDP does: average the parameter gradients over ranks
            grad /= world
            avg_loss = loss.detach().clone()
            dist.all_reduce(avg_loss)
            avg_loss /= world
            results[name] = (avg_loss, grad)
        if rank == 0:
            torch.save({k: list(v) for k, v in results.items()}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


#: start method of this file's gloo worker processes: fork on Linux (the children inherit torch and the modules already
#: imported, where spawn re-imported them: seconds per process); spawn elsewhere (no safe fork)
START = "fork" if sys.platform.startswith("linux") else "spawn"


def test_ddp_gather_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    xv = torch.randn(3, 8, 6, generator=g)
    patient = torch.tensor([3, -1, 5, 9, 3, 5, -1, 9])  # patients 3, 5, 9 span both ranks' halves
    mask = torch.rand(3, 8, generator=g) > 0.2
    w = torch.randn(4, 6, generator=g)
    record = torch.tensor([0, 1, 2, 3, 0, 5, 6, 2])     # recordings 0 and 2 drawn twice, on both ranks
    torch.save((x1, x2, xv, patient, mask, w, record), tmp_path / "inputs.pt")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=START)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name in ("nt_xent", "clocs"):
        lin = torch.nn.Linear(6, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        if name == "nt_xent":
            loss = nt_xent(lin(x1), lin(x2), temperature=0.2, record=record)
        else:
            loss = clocs_loss(lin(xv), patient, temperature=0.2, view_mask=mask, record=record)
        loss.backward()
        assert torch.allclose(ddp[name][0], loss.detach(), atol=1e-5), name
        assert torch.allclose(ddp[name][1], lin.weight.grad, atol=1e-5), name


def test_losses_run_in_float32_under_autocast():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    zv = torch.randn(3, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = nt_xent(z1.bfloat16(), z2.bfloat16())
        b = clocs_loss(zv.bfloat16(), None)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert torch.allclose(a, nt_xent(z1.bfloat16().float(), z2.bfloat16().float()), atol=1e-6)
    assert torch.allclose(b, clocs_loss(zv.bfloat16().float(), None), atol=1e-6)
