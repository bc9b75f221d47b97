"""Masked-autoencoder reconstruction loss (He et al. 2022, "Masked autoencoders are scalable vision learners")."""

from __future__ import annotations

import torch

__all__ = ["masked_patch_mse"]


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over the masked patches only (MAE ``forward_loss``).

    With ``norm_pix`` each target patch is standardised by its own mean and (unbiased) variance first, as in MAE's
    ``norm_pix_loss`` (``(t - mean) / sqrt(var + eps)``). The per-patch MSE (mean over the ``P`` samples) is
    averaged over the patches where ``mask`` is true; patches of absent leads are excluded by leaving them out of
    ``mask``.

    Args:
        pred: ``(..., P)`` predicted patches, e.g. ``(B, L, N, P)``.
        target: ``(..., P)`` true patches, same shape as ``pred``.
        mask: ``(...)`` bool or 0/1 weights, true where the patch counts (masked and present).
        norm_pix: standardise every target patch.
        eps: variance floor of the standardisation.

    Returns:
        Scalar loss (float32); ``0`` (attached to ``pred``'s graph) if ``mask`` selects nothing.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if mask.shape != pred.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(pred.shape[:-1])} (pred without its last axis), "
                         f"got {tuple(mask.shape)}")
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)          # (...)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
