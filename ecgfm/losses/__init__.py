"""Losses as plain functions of tensors (each tested against a slow reference in ``tests/unit``).

* :func:`masked_patch_mse`: MAE reconstruction loss (:mod:`ecgfm.losses.mae`);
* :func:`nt_xent`, :func:`clocs_loss`: contrastive losses (:mod:`ecgfm.losses.contrastive`);
* :func:`masked_target_mse`: regression of auxiliary pretext targets (:mod:`ecgfm.losses.regression`).
"""

from ecgfm.losses.contrastive import clocs_loss, ddp_mean, ddp_mean_count, gather_with_grad, nt_xent, world_info
from ecgfm.losses.mae import masked_patch_mse
from ecgfm.losses.regression import masked_target_mse

__all__ = ["masked_patch_mse", "masked_target_mse", "nt_xent", "clocs_loss", "gather_with_grad", "world_info",
           "ddp_mean", "ddp_mean_count"]
