"""Regression loss of auxiliary pretext targets (e.g. signal-derived rhythm statistics of each record)."""

from __future__ import annotations

import torch

__all__ = ["masked_target_mse"]


def masked_target_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite entries of ``target`` only.

    A target entry that could not be computed (NaN, e.g. a rhythm statistic of a record with too few beats) adds
    nothing to the loss and no gradient; the mean is taken over the finite entries of the whole batch.

    Args:
        pred: ``(B, F)`` predictions.
        target: ``(B, F)`` targets, NaN where unknown.

    Returns:
        Scalar loss (float32); ``0`` (attached to ``pred``'s graph) when no target entry is finite.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    known = torch.isfinite(target)
    diff = torch.where(known, pred.float() - torch.nan_to_num(target.float()), pred.new_zeros(()).float())
    return diff.pow(2).sum() / known.sum().clamp_min(1).to(diff.dtype)
