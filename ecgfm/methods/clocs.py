"""CLOCS: contrastive learning of cardiac signals across space, time and patients (Kiyasseh, Zhu & Clifton,
ICML 2021).

Views of one recording are positives of each other (and, patient-aware, views of other recordings of the same
patient); all other recordings in the (DDP-global) batch are negatives. Modes:

* ``"cmsc"`` (contrastive multi-segment coding): the two views are adjacent non-overlapping segments ``x`` and
  ``x2`` of the recording (``PretrainDataModule(views="adjacent")``), each with all its present leads;
* ``"cmlc"`` (multi-lead coding): one view per lead in ``view_leads`` of the segment ``x``;
* ``"cmsmlc"``: both, ``2 * len(view_leads)`` views (each lead of each segment).

A lead view is fed to the backbone as a 12-lead tensor in which only that lead is kept and the others are zero
(rather than a 1-lead input or lead groups), so the same encoder, with its 12-lead input contract, serves
12-lead and reduced-lead downstream inputs unchanged. With ``lead_aware`` (default) each view also carries its lead
mask, so a lead-aware backbone (ViT-1D) encodes only the view's leads, as the online probe and downstream
features encode a record's present leads; a CNN sees the zero leads either way. A lead that is absent from a
recording (``lead_mask``) is never a view: it is masked out of the loss.
All views of a batch are encoded in one backbone pass of size ``V * B``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ecgfm.data.record import CANONICAL_LEADS, canonical_lead
from ecgfm.heads import ProjectionHead
from ecgfm.losses.contrastive import clocs_loss
from ecgfm.methods.base import PretrainModule, rows_only

__all__ = ["CLOCSModule", "CLOCS_LEADS"]

#: Leads CLOCS used as CMLC views on 12-lead data (PhysioNet 2020): II, V2, aVL, aVR.
CLOCS_LEADS: tuple[str, ...] = ("II", "V2", "aVL", "aVR")
_MODES = ("cmsc", "cmlc", "cmsmlc")


class CLOCSModule(PretrainModule):
    """CLOCS pretraining (see the module docstring).

    Args:
        backbone: encoder (``embed(x) -> (B, D)``, ``num_features``).
        mode: ``"cmsc"``, ``"cmlc"`` or ``"cmsmlc"``.
        proj_dim: embedding dimension of the loss (CLOCS: 128).
        proj_hidden: hidden width of the projection head (used when ``proj_layers > 1``).
        proj_layers: linear layers of the head; 1 (default) is a single linear map, as CLOCS's final layer.
        temperature: softmax temperature (CLOCS: 0.1).
        patient_aware: also use other recordings of the same patient (``batch["patient"] >= 0``) as positives.
        view_leads: lead names (canonical or aliases) used as views in the multi-lead modes; ``None`` = all 12.
        lead_aware: pass each view's leads as ``lead_mask`` to a backbone that takes one (see the module docstring);
            False: every view is a zero-padded 12-lead input.
        lr, weight_decay, warmup_steps, max_steps, betas, probe_num_classes, probe_multilabel: see
            :class:`~ecgfm.methods.base.PretrainModule`.
    """

    min_val_batch = 2   # a contrastive loss of one record has no negative (base.PretrainModule)

    @classmethod
    def one_view_reason(cls, hparams: Any) -> str | None:
        """``mode=cmlc`` contrasts the leads of one crop (cmsc / cmsmlc read the second segment)."""
        return "CLOCS mode=cmlc contrasts the leads of one crop" if hparams.get("mode") == "cmlc" else None

    @classmethod
    def views_needed(cls, hparams: Any) -> tuple[str, str] | None:
        """``mode=cmsc`` / ``cmsmlc`` contrast temporally adjacent, non-overlapping segments: ``data.views=adjacent``
        (``segments`` places the second crop independently: overlapping, or the same crop in validation)."""
        if hparams.get("mode", "cmsc") in ("cmsc", "cmsmlc"):
            return "adjacent", (f"CLOCS mode={hparams.get('mode', 'cmsc')} contrasts temporally adjacent, "
                                "non-overlapping segments of a record (the second view must be the next crop; "
                                "'segments' places it independently, so it overlaps the first or, in validation, "
                                "is the same crop)")
        return None

    def __init__(self, backbone: nn.Module, mode: str = "cmsc", proj_dim: int = 128, proj_hidden: int = 512,
                 proj_layers: int = 1, temperature: float = 0.1, patient_aware: bool = True,
                 view_leads: Sequence[str] | None = CLOCS_LEADS, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 100, max_steps: int = 10000, betas: tuple[float, float] = (0.9, 0.95),
                 probe_num_classes: int | None = None, probe_multilabel: bool = False,
                 lead_aware: bool = True) -> None:
        if view_leads is not None:
            view_leads = list(view_leads)  # plain list in the saved hyper-parameters
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         max_steps=max_steps, betas=betas, probe_num_classes=probe_num_classes,
                         probe_multilabel=probe_multilabel)
        if mode not in _MODES:
            raise ValueError(f"CLOCS mode must be one of {_MODES}, got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mode = mode
        self.lead_aware = bool(lead_aware)
        self.temperature = float(temperature)
        self.patient_aware = bool(patient_aware)
        names = CANONICAL_LEADS if view_leads is None else view_leads
        idx = []
        for name in names:
            try:
                lead = canonical_lead(str(name))
            except KeyError:
                lead = None
            if lead is None:
                raise ValueError(f"unknown lead {name!r} in view_leads (known: {', '.join(CANONICAL_LEADS)})")
            idx.append(CANONICAL_LEADS.index(lead))
        if len(set(idx)) != len(idx):
            raise ValueError(f"view_leads has duplicates: {list(names)}")
        if mode != "cmsc" and len(idx) < (2 if mode == "cmlc" else 1):
            raise ValueError(f"mode {mode!r} needs at least {2 if mode == 'cmlc' else 1} view lead(s), got {idx}")
        self.register_buffer("view_lead_idx", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.projector = ProjectionHead(int(backbone.num_features), proj_hidden, proj_dim, num_layers=proj_layers,
                                        batch_norm=proj_layers > 1)

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the views of the batch.

        Returns:
            ``(x_views (V, B, L, T), view_mask (V, B) bool)``: false for a view without a present lead or without
            any signal (zero padding).
        """
        x = batch["x"]
        b, n_leads, _ = x.shape
        lead_mask = batch.get("lead_mask")
        if lead_mask is None:
            lead_mask = torch.ones(b, n_leads, dtype=torch.bool, device=x.device)
        lead_mask = lead_mask.bool()
        segments = [x]
        if self.mode in ("cmsc", "cmsmlc"):
            if "x2" not in batch:
                raise ValueError(f"CLOCS mode {self.mode!r} needs the adjacent segment batch['x2']: use "
                                 "PretrainDataModule(views='adjacent')")
            if batch["x2"].shape != x.shape:
                raise ValueError(f"batch['x2'] {tuple(batch['x2'].shape)} must match batch['x'] {tuple(x.shape)}")
            if b > 1 and torch.equal(batch["x2"], x):
                # every positive pair would be one crop twice (views='segments' in validation, or one-view data)
                raise ValueError(f"CLOCS mode {self.mode!r}: batch['x2'] is batch['x'] for every record, so each "
                                 "positive pair is one crop twice; the second view must be the adjacent segment "
                                 "(PretrainDataModule(views='adjacent'))")
            segments.append(batch["x2"])
        segments = [s * lead_mask.to(s.dtype)[:, :, None] for s in segments]
        if self.mode == "cmsc":
            # a recording with no present lead would be all-zero: not a view
            xv, mask = torch.stack(segments), lead_mask.any(1)[None].expand(2, b)
        else:
            idx = self.view_lead_idx
            onehot = F.one_hot(idx, n_leads).to(x.dtype)                        # (K, L)
            views, masks = [], []
            for seg in segments:
                views.append(seg[None] * onehot[:, None, :, None])                 # (K, B, L, T): lead k alone
                masks.append(lead_mask[:, idx].T)                                  # (K, B)
            xv, mask = torch.cat(views), torch.cat(masks)
        # nor is an all-zero view: the adjacent segment of a record shorter than two crops is zero padding (all-zero
        # views of different recordings would be each other's perfect matches)
        return xv, mask & xv.ne(0).flatten(2).any(-1)

    def view_lead_masks(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(V, B, L)`` bool: the leads of each view of :meth:`views` (a segment view: its record's present leads;
        a lead view: that lead). A view that does not exist (its lead absent) gets its record's mask, or every lead
        for a record without any: it is masked out of the loss, and a lead-aware encoder must still see a token."""
        x = batch["x"]
        b, n_leads, _ = x.shape
        lead_mask = batch.get("lead_mask")
        lead_mask = torch.ones(b, n_leads, dtype=torch.bool, device=x.device) if lead_mask is None \
            else lead_mask.bool()
        n_seg = 2 if self.mode in ("cmsc", "cmsmlc") else 1
        if self.mode == "cmsc":
            masks = lead_mask[None].expand(2, b, n_leads)
        else:
            one = F.one_hot(self.view_lead_idx, n_leads).bool()                     # (K, L)
            masks = (one[:, None, :] & lead_mask[None]).repeat(n_seg, 1, 1)          # (n_seg * K, B, L)
        fallback = torch.where(lead_mask.any(1, keepdim=True), lead_mask, torch.ones_like(lead_mask))
        return torch.where(masks.any(-1, keepdim=True), masks, fallback[None].expand_as(masks))

    def shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """CLOCS loss over all view pairs.

        Returns:
            ``(loss, {"pos_sim": mean cosine between the valid views of the same recording,
            "valid_views": fraction of views that exist})``.
        """
        xv, mask = self.views(batch)
        v, b = mask.shape
        valid = mask.flatten(0, 1)
        # the views the loss leaves out pass neither the encoder nor the projector (their BatchNorm statistics)
        h = rows_only(self.embed_batch, (xv.flatten(0, 1), self.view_lead_masks(batch).flatten(0, 1)), valid)
        z = rows_only(self.projector, (h,), valid).reshape(v, b, -1)                  # (V, B, D)
        patient = batch.get("patient")
        loss = clocs_loss(z, patient, temperature=self.temperature, patient_aware=self.patient_aware,
                          view_mask=mask, record=batch.get("index"))
        with torch.no_grad():
            u = F.normalize(z.float(), dim=-1)
            m = mask.float()
            sims = torch.einsum("vbd,wbd->vwb", u, u)                        # (V, V, B)
            pair = m[:, None] * m[None, :] * (1 - torch.eye(v, device=z.device))[:, :, None]
            pos_sim = (sims * pair).sum() / pair.sum().clamp_min(1.0)
            terms = {"pos_sim": pos_sim, "valid_views": m.mean()}
        return loss, terms
