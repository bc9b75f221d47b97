"""SimCLR for ECGs (Chen et al. 2020; applied to 12-lead ECGs by Mehari & Strodthoff 2022).

Two augmented views of every crop are encoded by the backbone, projected by an MLP head and pulled together with
NT-Xent against the other ``2N - 2`` embeddings of the (DDP-global) batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecgfm.augment import make_generator, simclr_augment
from ecgfm.heads import ProjectionHead
from ecgfm.losses.contrastive import nt_xent
from ecgfm.methods.base import PretrainModule

__all__ = ["SimCLRModule"]


class SimCLRModule(PretrainModule):
    """SimCLR pretraining of ``backbone`` on :class:`~ecgfm.data.datamodules.PretrainDataModule` batches.

    Args:
        backbone: encoder (``embed(x) -> (B, D)``, ``num_features``).
        proj_dim: projection (loss) dimension.
        proj_hidden: hidden width of the projection head.
        proj_layers: linear layers in the projection head.
        temperature: NT-Xent temperature.
        fs: sampling rate of the batches (Hz), for the augmentations.
        crop_scale: resized-crop window fraction range.
        p_crop: probability of the resized crop.
        noise_snr_db: Gaussian-noise SNR range (dB).
        p_noise: probability of Gaussian noise.
        p_amplitude: probability of the amplitude scale.
        p_wander: probability of baseline wander.
        p_powerline: probability of powerline noise.
        p_time_mask: probability of the time mask.
        p_lead_mask: probability of masking some present leads.
        p_lowpass: probability of the random low-pass filter.
        aug_seed: seed of the augmentation generator (rank ``r`` uses ``aug_seed + 1000 r``; validation always
            restarts from ``aug_seed``, so validation losses are comparable between epochs); ``None`` draws from
            torch's global generator.
        lr, weight_decay, warmup_steps, max_steps, betas, probe_num_classes, probe_multilabel: see
            :class:`~ecgfm.methods.base.PretrainModule`.
    """

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, proj_hidden: int = 512, proj_layers: int = 2,
                 temperature: float = 0.1, fs: float = 100.0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 p_crop: float = 0.8, noise_snr_db: tuple[float, float] = (10.0, 30.0), p_noise: float = 0.8,
                 p_amplitude: float = 0.5, p_wander: float = 0.5, p_powerline: float = 0.3,
                 p_time_mask: float = 0.5, p_lead_mask: float = 0.5, p_lowpass: float = 0.3,
                 aug_seed: int | None = 0, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 max_steps: int = 10000, betas: tuple[float, float] = (0.9, 0.95),
                 probe_num_classes: int | None = None, probe_multilabel: bool = False) -> None:
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         max_steps=max_steps, betas=betas, probe_num_classes=probe_num_classes,
                         probe_multilabel=probe_multilabel)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.projector = ProjectionHead(int(backbone.num_features), proj_hidden, proj_dim, num_layers=proj_layers)
        self.augment = simclr_augment(fs=fs, crop_scale=tuple(crop_scale), p_crop=p_crop,
                                      noise_snr_db=tuple(noise_snr_db), p_noise=p_noise, p_amplitude=p_amplitude,
                                      p_wander=p_wander, p_powerline=p_powerline, p_time_mask=p_time_mask,
                                      p_lead_mask=p_lead_mask, p_lowpass=p_lowpass)
        self.aug_seed = aug_seed
        self._gens: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.aug_seed is None:
            return None
        key = "train" if self.training else "val"
        gen = self._gens.get(key)
        if gen is None or gen.device != device:
            rank = self.global_rank if self._trainer is not None else 0
            seed = self.aug_seed + 1000 * rank + (0 if key == "train" else 999_983)
            gen = self._gens[key] = make_generator(seed, device)
        return gen

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._gens.pop("val", None)  # same validation views every epoch

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views ``(B, L, T)`` of ``batch["x"]`` (absent leads stay zero)."""
        x = batch["x"]
        lead_mask = batch.get("lead_mask")
        gen = self._generator(x.device)
        with torch.no_grad():
            return self.augment(x, lead_mask, gen), self.augment(x, lead_mask, gen)

    def shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """NT-Xent of the projections of two augmented views.

        Returns:
            ``(loss, {"pos_sim": mean cosine of positive pairs, "acc": top-1 positive retrieval in the local
            batch})``.
        """
        v1, v2 = self.views(batch)
        n = v1.shape[0]
        z = self.projector(self.backbone.embed(torch.cat([v1, v2])))  # one pass over both views: (2B, proj_dim)
        z1, z2 = z[:n], z[n:]
        loss = nt_xent(z1, z2, temperature=self.temperature)
        with torch.no_grad():
            u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            sim = u1 @ u2.T
            acc = (sim.argmax(1) == torch.arange(n, device=sim.device)).float().mean()
            terms = {"pos_sim": sim.diagonal().mean(), "acc": acc}
        return loss, terms
