"""CREMA-style hybrid: masked-autoencoder reconstruction regularised by a contrastive term.

Song et al. 2024, "CREMA: Contrastive Regularized Masked Autoencoder" (arXiv 2407.07110; first titled as an ECG
foundation-model study). No public code exists; this is our reading of the recipe:

``loss = recon(view 1) + contrastive_weight * NT-Xent(g(pool(enc(view 1))), g(pool(enc(view 2))))``

where view 1 and view 2 are two independently masked copies of the same ECG (each encoder pass sees only its own
visible patches), ``pool`` is the mean of the visible patch tokens (the backbone's ``embed`` pooling), ``g`` a small
projection head (:class:`~ecgfm.heads.ProjectionHead` as in SimCLR v1: Linear-BN-ReLU-Linear, no BatchNorm on the
output) and NT-Xent (:func:`ecgfm.losses.nt_xent`) uses the other samples of the (DDP-gathered) batch as negatives. Only view 1 is decoded, so ``contrastive_weight=0`` is *exactly*
:class:`~ecgfm.methods.mae.MAEModule` (the second view is then not even computed): same random masks, same loss,
same gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from ecgfm.heads import ProjectionHead
from ecgfm.losses.contrastive import nt_xent
from ecgfm.methods.mae import MAEModule

__all__ = ["CREMAModule"]


class CREMAModule(MAEModule):
    """MAE + contrastive regularisation between two masked views (see module docstring).

    Args:
        backbone: a :class:`~ecgfm.backbones.vit1d.ViT1D`.
        contrastive_weight: weight of the NT-Xent term (0 gives plain MAE).
        temperature: NT-Xent temperature.
        proj_hidden_dim: hidden width of the projection head (``None``: the encoder width).
        proj_dim: output width of the projection head.
        proj_batch_norm: BatchNorm after the hidden layer of the projection head (``False``: Linear-ReLU-Linear,
            e.g. for very small per-device batches).
        mask_ratio, decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio, norm_pix_loss, mask_mode,
            decoder_layout, lead_aware: see :class:`~ecgfm.methods.mae.MAEModule`.
        lr, weight_decay, warmup_steps, max_steps, betas, probe_num_classes, probe_multilabel: see
            :class:`~ecgfm.methods.base.PretrainModule`.
    """

    min_val_batch = 2   # its NT-Xent term of one record has no negative (base.PretrainModule)

    def __init__(self, backbone: nn.Module, contrastive_weight: float = 0.1, temperature: float = 0.1,
                 proj_hidden_dim: int | None = None, proj_dim: int = 128, proj_batch_norm: bool = True,
                 mask_ratio: float = 0.75,
                 decoder_dim: int = 256, decoder_depth: int = 4, decoder_heads: int = 8,
                 decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = True, mask_mode: str = "global",
                 decoder_layout: str = "joint", lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 100, max_steps: int = 10000, betas: tuple[float, float] = (0.9, 0.95),
                 probe_num_classes: int | None = None, probe_multilabel: bool = False,
                 lead_aware: bool = True) -> None:
        super().__init__(backbone, mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                         decoder_heads=decoder_heads, decoder_mlp_ratio=decoder_mlp_ratio,
                         norm_pix_loss=norm_pix_loss, mask_mode=mask_mode, decoder_layout=decoder_layout, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, max_steps=max_steps, betas=betas,
                         probe_num_classes=probe_num_classes, probe_multilabel=probe_multilabel,
                         lead_aware=lead_aware)
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)
        d = backbone.num_features
        # (B, D) -> (B, proj_dim): Linear -> BN -> ReLU -> Linear (with bias), no BatchNorm on the output
        self.projector = ProjectionHead(d, proj_hidden_dim or d, proj_dim, num_layers=2,
                                        batch_norm=proj_batch_norm, final_batch_norm=False)
        if self.contrastive_weight == 0:
            # the projector takes no part in the loss: frozen, so DDP (find_unused_parameters=False) does not wait
            # for its gradients (the second step failed "Expected to have finished reduction"); kept in the
            # state_dict so that checkpoints of either weight load alike
            self.projector.requires_grad_(False)

    def shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss = recon + w * contrastive``; terms ``recon`` and (when ``w > 0``) ``contrastive``.

        With ``lead_aware`` each lead-set group of the batch is masked and encoded over its present leads (as
        :meth:`MAEModule.shared_step`); the pooled views of all groups meet in one contrastive loss.
        """
        x, lead_mask, recorded = batch["x"], batch.get("lead_mask"), batch.get("recorded")
        recons, counts, pooled1, pooled2 = [], [], [], []
        order = []
        for rows, leads in self.lead_set_groups(batch):
            xg = x.index_select(0, rows)
            mg = None if lead_mask is None else lead_mask.index_select(0, rows).to(torch.bool)
            gen = self._val_generator(xg)
            pool = self.subset_pool(mg) if leads is None else None    # lead_aware=False: leads every row has
            latent1, mask1, ids_restore1 = self.forward_encoder(xg, gen, present=leads,
                                                                subset_from=pool)   # view 1: (b, K + 2L, D)
            counted = self.counted_patches(mask1, mg, None if recorded is None else recorded.index_select(0, rows))
            recons.append(self.reconstruction_loss(xg, latent1, counted, ids_restore1))
            counts.append(counted.sum())
            order.append(rows)
            if self.contrastive_weight != 0:
                latent2, _, _ = self.forward_encoder(xg, gen, present=leads, subset_from=pool)   # view 2: new masks
                pooled1.append(self.backbone.pool(latent1))
                pooled2.append(self.backbone.pool(latent2))
        recon = self.pooled_recon(recons, counts)
        terms = {"recon": recon.detach()}
        if self.contrastive_weight == 0:
            return recon, terms
        inverse = torch.argsort(torch.cat(order))                                      # back to batch order
        z1 = self.projector(torch.cat(pooled1)[inverse])                               # (B, proj_dim)
        z2 = self.projector(torch.cat(pooled2)[inverse])
        contrastive = nt_xent(z1, z2, temperature=self.temperature, record=batch.get("index"))
        terms["contrastive"] = contrastive.detach()
        return recon + self.contrastive_weight * contrastive, terms
