"""Contrastive losses: SimCLR's NT-Xent and CLOCS's patient-aware multi-view InfoNCE.

Both are plain functions of embeddings, DDP-aware: with ``gather=True`` and an initialised process group, the
embeddings of every rank are gathered *with gradients* (:func:`gather_with_grad`, whose backward sums the
incoming gradients over ranks), each rank uses its local samples as anchors against the global
set of candidates, and the loss is normalised so that the mean over ranks (what DDP's gradient averaging
optimises) equals the single-process loss on the concatenated global batch; the *value* each rank returns (and
logs) is that global loss itself (:func:`_ddp_global_value`), the gradient staying that of the rank's
normalised share. The local batch sizes may differ
between ranks (``nonfinite=skip`` leaves records out, a last validation batch is short, a rank's batch may even be
empty): the row counts are gathered first, every rank's rows are padded to the largest count for ``all_gather``
and the padding is dropped from the candidates (:func:`gather_counts`, :func:`gather_with_grad`). Without a process
group, gathering is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["nt_xent", "clocs_loss", "gather_with_grad", "gather_counts", "world_info", "ddp_mean_count",
           "ddp_mean"]

_NEG = -1e9  # logit of an absent candidate (exp underflows to 0 in float32)


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ddp_mean_count(count: torch.Tensor) -> torch.Tensor:
    """The denominator that makes a rank-local sum a global mean under DDP: ``all_reduce(count) / world``.

    DDP averages gradients over ranks, so ``local_sum / ddp_mean_count(local_count)`` on every rank gives the
    gradient of ``global_sum / global_count``, whatever the split of the counted items between ranks (dividing by
    the local count instead weighs an item of a rank with few items more). Identity without a process group.

    Args:
        count: scalar or ``(k,)`` local count(s); not differentiated.

    Returns:
        ``count``'s shape: the global count(s) divided by the world size.
    """
    _, world = world_info()
    if world == 1:
        return count
    total = count.detach().clone()
    dist.all_reduce(total)
    return total / world


def ddp_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """A per-item mean whose *value* is the global per-item mean (``global_sum / global_count``: what is logged and
    recorded, the same on every rank) and whose *gradient* is that of ``local_sum / ddp_mean_count(local_count)``,
    which DDP's average over ranks turns into the gradient of the global per-item mean. Without a process group:
    ``local_sum / local_count``. Under DDP one ``all_reduce`` of two scalars per call; every rank must call it.

    (Returning the rescaled sum itself would log each rank's loss multiplied by its share of the items, e.g. x0.48
    and x1.52 for a rank of one-lead records and a rank of 12-lead ones; returning the rank's own mean logged a
    number that was neither rank's share nor the loss being optimised, and the mean of two ranks' own means is not
    the global mean when their counts differ.)

    Args:
        local_sum: scalar sum over this rank's items (differentiable).
        local_count: scalar count of this rank's items.

    Returns:
        Scalar.
    """
    count = local_count.to(local_sum.dtype)
    _, world = world_info()
    if world == 1:
        return local_sum / count.clamp_min(1e-6)
    # (global sum, global count) / world in one all_reduce
    mean_sum, mean_count = ddp_mean_count(torch.stack([local_sum.detach(), count.detach()])).unbind()
    scaled = local_sum / mean_count.clamp_min(1e-6)
    value = mean_sum / mean_count.clamp_min(1e-6)
    return scaled + (value - scaled).detach()


def _ddp_global_value(scaled: torch.Tensor) -> torch.Tensor:
    """``scaled`` with the *value* of its mean over ranks and the *gradient* of ``scaled`` itself.

    The contrastive losses return, per rank, a share normalised so that DDP's average over ranks of the gradients
    is the gradient of the global loss (the loss of one process on the union of the batches); the mean of those
    shares over ranks is that global loss, but a single rank's share is neither its own mean nor the global one
    (it is weighted by the rank's share of the items). What a method logs as ``train/loss`` is the returned value,
    so it is made the global loss (one scalar ``all_reduce``), as :func:`ddp_mean` does for the value of MAE's
    loss and SimCLR's pretext term, while the graph, hence the gradient, stays ``scaled``'s. Identity without a process group.

    Args:
        scaled: scalar, this rank's normalised share (differentiable); every rank must call this.

    Returns:
        Scalar.
    """
    _, world = world_info()
    if world == 1:
        return scaled
    total = scaled.detach().clone()
    dist.all_reduce(total)
    total = total / world
    return scaled + (total - scaled).detach()


def gather_counts(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The local row count of every rank (one small ``all_gather``); ``[n]`` without a process group.

    Args:
        n: this rank's number of rows.
        device: where the count tensor lives (the backend's device: CUDA for NCCL).

    Returns:
        ``world`` counts, rank 0's first.
    """
    _, world = world_info()
    if world == 1:
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [int(c) for c in torch.cat(out).tolist()]


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` rows (contiguous, as ``all_gather`` needs)."""
    if x.shape[0] < rows:
        x = torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
    return x.contiguous()


def gather_with_grad(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the autograd graph; identity without DDP.

    The ranks may hold different numbers of rows (even none): each is padded to the largest count, gathered, and
    the padding dropped, so the result is exactly the concatenation of the ranks' rows.

    Args:
        x: ``(n, ...)`` local tensor; the same trailing shape on every rank, ``n`` may differ.
        counts: every rank's ``n`` (:func:`gather_counts`), when the caller already has them; ``None``: gathered.

    Returns:
        ``(sum(counts), ...)``: rank 0's rows first.
    """
    _, world = world_info()
    if world == 1:
        return x
    if counts is None:
        counts = gather_counts(x.shape[0], x.device)
    top = max(counts)
    if min(counts) == top > 0:    # equal local batches: a plain gather, as before
        return torch.cat(_GatherWithGrad.apply(x.contiguous()), dim=0)
    parts = _GatherWithGrad.apply(_padded(x, max(top, 1)))
    return torch.cat([part[:c] for part, c in zip(parts, counts)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gradients and keeps this rank's slice.

    Written here (as in lightly's ``GatherLayer``) because ``torch.distributed.nn.functional.all_gather`` is
    deprecated in recent torch and, on gloo, gave wrong gradients for CLOCS's transposed ``(n, V, D)`` layout
    (likely non-contiguous incoming gradients). The equivalence is checked by
    ``tests/unit/test_contrastive_losses.py::test_ddp_gather_equals_single_process``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        all_grads = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def _gather_no_grad(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """:func:`gather_with_grad` without autograd (ids and masks), for the ranks' row ``counts``."""
    _, world = world_info()
    if world == 1:
        return x
    top = max(max(counts), 1)
    xp = _padded(x, top)
    out = [torch.empty_like(xp) for _ in range(world)]
    dist.all_gather(out, xp)
    return torch.cat([part[:c] for part, c in zip(out, counts)], dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True,
            record: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy), SimCLR (Chen et al. 2020, eq. 1).

    For the ``2N`` L2-normalised embeddings ``u = [z1; z2]`` of a (global) batch of ``N`` pairs, anchor ``a``'s
    positive is its other view and its ``2N - 2`` negatives are all remaining embeddings:
    ``loss = mean_a -log( exp(u_a.u_p(a)/t) / sum_{k != a} exp(u_a.u_k/t) )`` over all ``2N`` anchors.
    With ``record``, views of the anchor's own recording drawn a second time in the batch (a sampler drawing with
    replacement does so in ~40 % of 64-record batches from a pool of 4,000) are left out of its negatives: SimCLR's
    negatives are other samples, not another crop of the same one.

    Args:
        z1: ``(n, D)`` projections of the first views (local batch).
        z2: ``(n, D)`` projections of the second views, row ``i`` pairs with ``z1[i]``.
        temperature: softmax temperature ``t > 0``.
        gather: use the embeddings of all DDP ranks as candidates (see module docstring).
        record: ``(n,)`` int64 id of the recording of each row (e.g. the batch's cache ``index``); ``None``: all
            rows are distinct recordings.

    Returns:
        Scalar loss. Gathered under DDP, its value on every rank is the loss of one process on the union of the
        batches, and its gradient that of this rank's anchors' sum over the mean anchor count of the ranks (with
        an empty local batch, 0 still attached to the graph), so that DDP's average of the gradients over ranks is
        the gradient of that global loss.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (n, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if record is not None and tuple(record.shape) != (z1.shape[0],):
        raise ValueError(f"record must be ({z1.shape[0]},), got {tuple(record.shape)}")
    with _fp32(z1):
        return _nt_xent(z1, z2, temperature, gather, record)


def _fp32(t: torch.Tensor) -> torch.autocast:
    """Disable autocast: logits / temperature need float32 (bf16 keeps ~3 significant digits)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool,
             record: torch.Tensor | None = None) -> torch.Tensor:
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    rank, world = world_info() if gather else (0, 1)
    counts = gather_counts(n, z1.device) if world > 1 else [n]
    g1 = gather_with_grad(z1, counts) if world > 1 else z1  # (N, D), N = sum of the ranks' n
    g2 = gather_with_grad(z2, counts) if world > 1 else z2
    big_n = g1.shape[0]
    anchors = torch.cat([z1, z2])                   # (2n, D) local anchors
    cands = torch.cat([g1, g2])                     # (2N, D) global candidates
    logits = anchors @ cands.T / temperature        # (2n, 2N)
    local = torch.arange(n, device=z1.device) + sum(counts[:rank])
    self_idx = torch.cat([local, local + big_n])    # column of each anchor itself
    pos_idx = torch.cat([local + big_n, local])     # column of its positive
    drop = F.one_hot(self_idx, 2 * big_n).bool()
    if record is not None:   # the same recording's other draws are neither negatives nor positives
        rec = record.to(z1.device).long()
        rec_g = _gather_no_grad(rec, counts) if world > 1 else rec
        same = torch.cat([rec, rec])[:, None] == torch.cat([rec_g, rec_g])[None, :]     # (2n, 2N)
        drop = drop | (same & ~F.one_hot(pos_idx, 2 * big_n).bool())
    logits = logits.masked_fill(drop, float("-inf"))
    if world == 1:
        return F.cross_entropy(logits, pos_idx)
    # the sum over this rank's 2n anchors over the mean anchor count of the ranks: DDP's mean over ranks is the
    # mean over all 2N anchors whatever the split (equal n: this rank's mean); an empty rank gives 0, attached;
    # its value is made the global loss (the mean of the shares over ranks), the gradient kept (see _ddp_global_value)
    total = F.cross_entropy(logits, pos_idx, reduction="sum")
    return _ddp_global_value(total / (2.0 * max(big_n, 1) / world))


def clocs_loss(z_views: torch.Tensor, patient: torch.Tensor | None = None, temperature: float = 0.1,
               patient_aware: bool = True, gather: bool = True,
               view_mask: torch.Tensor | None = None, record: torch.Tensor | None = None) -> torch.Tensor:
    """CLOCS contrastive loss over views of the same recording (Kiyasseh, Zhu & Clifton, ICML 2021).

    Views are temporal segments (CMSC), leads (CMLC) or both (CMSMLC). For every unordered pair of views
    ``(a, b)`` the similarities ``s_ij = cos(z_a[i], z_b[j]) / t`` are formed; the positives are the pairs ``(i, j)``
    of the same recording (``i == j``, and with ``record`` any ``i``, ``j`` of one recording drawn twice in the
    batch) and, with ``patient_aware``, of different recordings of the same known patient
    (``patient[i] == patient[j] >= 0``). Following the paper's loss (expectation over positive pairs of
    both directions),

    ``L_ab = 1/2 [ mean_{(i,j) in P} -log softmax_j(s_i.)  +  mean_{(i,j) in P} -log softmax_i(s_.j) ]``

    and ``L`` is the mean of ``L_ab`` over view pairs (a pair with no valid positive is skipped). Unlike the
    authors' code, which averages the diagonal and the off-diagonal positives as separate terms and only
    half-symmetrises the latter, every positive pair has the same weight in both directions.

    Args:
        z_views: ``(V, n, D)`` embeddings of ``V >= 2`` views of ``n`` recordings (local batch).
        patient: ``(n,)`` int64 patient ids, ``-1`` unknown; ``None`` = all unknown.
        temperature: softmax temperature ``t > 0``.
        patient_aware: also treat other recordings of the same patient as positives.
        gather: use the embeddings of all DDP ranks as candidates (see module docstring).
        view_mask: ``(V, n)`` bool, ``False`` where a view does not exist (e.g. an absent lead); such views are
            neither anchors, positives nor negatives. ``None`` = all views exist.
        record: ``(n,)`` int64 id of the recording of each row (the batch's cache ``index``): rows of one
            recording are positives of each other, never negatives; ``None``: all rows are distinct recordings.

    Returns:
        Scalar loss (0, still attached to the graph, if the batch holds no valid positive pair at all). Gathered
        under DDP, its value on every rank is the loss of one process on the union of the batches, and its gradient
        that of this rank's positives' sums over the mean positive counts of the ranks, so that DDP's average of
        the gradients over ranks is the gradient of that global loss.
    """
    if z_views.ndim != 3 or z_views.shape[0] < 2:
        raise ValueError(f"z_views must be (V>=2, n, D), got {tuple(z_views.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with _fp32(z_views):
        return _clocs_loss(z_views, patient, temperature, patient_aware, gather, view_mask, record)


def _clocs_loss(z_views: torch.Tensor, patient: torch.Tensor | None, temperature: float, patient_aware: bool,
                gather: bool, view_mask: torch.Tensor | None, record: torch.Tensor | None = None) -> torch.Tensor:
    v, n, _ = z_views.shape
    device = z_views.device
    if patient is None:
        patient = torch.full((n,), -1, dtype=torch.long, device=device)
    if patient.shape != (n,):
        raise ValueError(f"patient must be ({n},), got {tuple(patient.shape)}")
    if view_mask is None:
        view_mask = torch.ones(v, n, dtype=torch.bool, device=device)
    if view_mask.shape != (v, n):
        raise ValueError(f"view_mask must be ({v}, {n}), got {tuple(view_mask.shape)}")
    z = F.normalize(z_views.float(), dim=-1)
    rank, world = world_info() if gather else (0, 1)
    patient = patient.to(device).long()
    view_mask = view_mask.to(device).bool()
    counts = gather_counts(n, device) if world > 1 else [n]
    if world > 1:
        zg = gather_with_grad(z.transpose(0, 1).contiguous(), counts).transpose(0, 1)  # (V, N, D)
        pg = _gather_no_grad(patient, counts)
        mg = _gather_no_grad(view_mask.t().contiguous(), counts).t()                    # (V, N)
    else:
        zg, pg, mg = z, patient, view_mask
    big_n = zg.shape[1]
    local = torch.arange(n, device=device) + sum(counts[:rank])
    same = local[:, None] == torch.arange(big_n, device=device)[None, :]      # (n, N) same recording
    if record is not None:                                                     # ... also drawn twice
        if tuple(record.shape) != (n,):
            raise ValueError(f"record must be ({n},), got {tuple(record.shape)}")
        rec = record.to(device).long()
        same = same | (rec[:, None] == (_gather_no_grad(rec, counts) if world > 1 else rec)[None, :])
    if patient_aware:
        same = same | ((patient[:, None] == pg[None, :]) & (patient[:, None] >= 0))

    # For every ordered view pair (src, dst): the sum of -log p over the positives of the local anchors of view src
    # among the global candidates of view dst, and their count. One (n, V, N) block per anchor view keeps memory
    # at V * n * N while vectorising over the candidate views.
    not_self = ~torch.eye(v, dtype=torch.bool, device=device)
    row_sums, row_counts = [], []
    for src in range(v):
        logits = torch.einsum("nd,wmd->nwm", z[src], zg) / temperature         # (n, V, N)
        # Finite fill: a row whose candidates are all absent stays finite (and has no positive).
        logits = logits.masked_fill(~mg[None], _NEG)
        logp = torch.log_softmax(logits, dim=-1)
        pos = same[:, None, :] & view_mask[src][:, None, None] & mg[None] & not_self[src][None, :, None]
        row_sums.append(-torch.where(pos, logp, torch.zeros_like(logp)).sum(dim=(0, 2)))   # (V,)
        row_counts.append(pos.sum(dim=(0, 2)))
    ordered_sums = torch.stack(row_sums)                                       # (V, V) [src, dst]
    ordered_counts = torch.stack(row_counts).to(z.dtype)
    iu = torch.triu_indices(v, v, offset=1, device=device)                     # unordered pairs a < b
    sums = ordered_sums[iu[0], iu[1]] + ordered_sums[iu[1], iu[0]]             # (P,) both directions
    counts = ordered_counts[iu[0], iu[1]] + ordered_counts[iu[1], iu[0]]       # (P,) local counts
    # so that the per-pair sum over the global count, averaged over ranks (DDP), equals the full-batch mean
    counts_mean = ddp_mean_count(counts) if world > 1 else counts
    valid = (counts_mean > 0).float()        # no host sync: pairs without positives get weight 0
    per_pair = sums / counts_mean.clamp_min(1.0 / world)
    loss = (per_pair * valid).sum() / valid.sum().clamp_min(1.0)
    # under DDP: the value is the global loss (the mean of the shares over ranks), the gradient kept
    return _ddp_global_value(loss) if world > 1 else loss
