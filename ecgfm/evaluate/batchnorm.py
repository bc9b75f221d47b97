"""BatchNorm running statistics of networks whose statistics were never estimated (a random-init encoder).

Used by fine-tuning (:mod:`ecgfm.evaluate.finetune`, before its first epoch) and by the frozen probe of a random-init
twin (:mod:`ecgfm.evaluate.sweep`). Plain torch: kept apart from the Lightning fine-tuning module so that a probe
does not import Lightning (about 2 s of every ``probe.py`` start-up).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ecgfm.evaluate.features import accepts_lead_mask

__all__ = ["never_estimated", "recalibrate_batchnorm", "random_init_batchnorm_statistics"]


def never_estimated(norm: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a BatchNorm layer's running statistics are still its initial ones (no batch ever counted, mean 0,
    variance 1): a randomly initialised network's, not statistics of any data."""
    if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
        return False
    counted = norm.num_batches_tracked is not None and int(norm.num_batches_tracked) > 0
    return (not counted and bool(torch.all(norm.running_mean == 0)) and bool(torch.all(norm.running_var == 1)))


def recalibrate_batchnorm(model: nn.Module, loader: Any, only_never_estimated: bool = True) -> int:
    """Recompute BatchNorm running statistics of ``model`` on one pass of ``loader`` (no gradient).

    LP-FT fits its probe on features computed in eval mode (running statistics) and then fine-tunes in train mode
    (batch statistics). A randomly initialised CNN's running statistics are the initial 0 / 1, not its activations'
    (a review measured feature standard deviations of 1e-5 in eval mode, probe weights up to 6,000 after
    standardisation, and a first fine-tuning loss 1,000x the probe's in train mode: the first epoch wrecked the
    network and the best-weights restore handed back the probe). After this pass the running statistics are the
    cumulative mean / variance over the task's training crops, which a batch's statistics estimate. Forward passes
    in train mode (as fine-tuning runs); each layer's momentum and the module's mode are restored.

    By default only layers whose statistics were never estimated (:func:`never_estimated`: a random-init network)
    are recomputed: a pretrained encoder's statistics come from its pretraining pool, and re-estimating them on a
    small labelled subset was worse on validation (CinC 2017 at 10 % of the labels, the pretext encoder: LP-FT
    validation macro AUROC 0.888 -> 0.859 over seeds 0-2; docs/BENCHMARK.md).

    Args:
        model: a :class:`FinetuneModule` (or any module called as ``model(x, lead_mask)``; it uses the mask as
            its own forward does).
        loader: batches with ``x`` ``(B, 12, T)`` and ``lead_mask`` ``(B, 12)``.
        only_never_estimated: recompute only never-estimated layers (False: every BatchNorm layer).

    Returns:
        The number of BatchNorm layers recalibrated (0: none, and no pass is made).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and (never_estimated(m) or not only_never_estimated)]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the pass, not an exponential one
    device = next(model.parameters()).device
    model.train()
    for m in model.modules():   # the other BatchNorm layers keep their statistics: eval mode during the pass
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and all(m is not n for n in norms):
            m.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                model(batch["x"].to(device), batch["lead_mask"].to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


class _Embedder(nn.Module):
    """``backbone.embed`` as a module called ``(x, lead_mask)`` (for :func:`recalibrate_batchnorm`)."""

    def __init__(self, backbone: nn.Module, lead_aware: bool):
        super().__init__()
        self.backbone, self.lead_aware = backbone, bool(lead_aware and accepts_lead_mask(backbone))

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.lead_aware and lead_mask is not None:
            return self.backbone.embed(x, lead_mask=lead_mask)
        return self.backbone.embed(x)


def random_init_batchnorm_statistics(backbone: nn.Module, cache: Any, rows: np.ndarray, window: int,
                                     lead_aware: bool = True, batch_size: int = 256,
                                     max_windows: int = 50_000) -> int:
    """Compute a random-init backbone's never-estimated BatchNorm statistics on the task's training windows, before
    its frozen features are extracted (the random-init twin of a probe).

    A freshly initialised network's running statistics are 0 / 1, not its activations': in eval mode its features
    are barely normalised (standard deviations of 1e-5 measured), and a linear probe on them understated what random
    features give. No label is used: non-overlapping windows of the training records (the records an SSL encoder of
    the benchmark also saw, unlabelled, in its pretraining pool), the first ``max_windows`` of them in row order.
    Measured (validation, linear probe of the pretext CNN's random twin): CinC 2017 0.755 -> 0.783, PTB-XL super
    0.818 -> 0.856.

    Args:
        backbone: the random-init backbone (modified in place; returned to eval mode).
        cache: the task's :class:`~ecgfm.data.cache.CorpusCache`.
        rows: the training split's cache rows.
        window: window length in samples (the probe's).
        lead_aware: pass the records' lead masks to a backbone that takes them (as the extraction does).
        batch_size: windows per forward pass (records are joined until a batch holds at least this many). Part of
            the result, not only of the speed: the running statistics are the mean of per-batch statistics
            (``momentum=None``), so the sweep keeps the default whatever ``features.batch_size`` is.
        max_windows: at most this many windows.

    Returns:
        The number of BatchNorm layers computed (0: none never estimated, and no pass is made).
    """
    from ecgfm.data.preprocess import sliding_windows

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        xs: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        seen = pending = 0
        for i in np.asarray(rows, dtype=np.int64):
            w = sliding_windows(cache.signal(int(i)), int(window), int(window))[: max_windows - seen]
            xs.append(w)
            masks.append(np.repeat(cache.lead_mask(int(i))[None], len(w), axis=0))
            seen, pending = seen + len(w), pending + len(w)
            if pending >= batch_size or seen >= max_windows:
                yield {"x": torch.from_numpy(np.concatenate(xs).astype(np.float32)),
                       "lead_mask": torch.from_numpy(np.concatenate(masks))}
                xs, masks, pending = [], [], 0
            if seen >= max_windows:
                return
        if xs:
            yield {"x": torch.from_numpy(np.concatenate(xs).astype(np.float32)),
                   "lead_mask": torch.from_numpy(np.concatenate(masks))}

    n = recalibrate_batchnorm(_Embedder(backbone, lead_aware), batches())
    backbone.eval()
    return n
