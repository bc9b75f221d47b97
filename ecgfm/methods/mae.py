"""Masked autoencoder pretraining on ECG patches (MAE, He et al. 2022; ST-MEM, Na et al. 2024).

The structure follows facebookresearch/mae ``models_mae.py``: :meth:`MAEModule.patchify`,
:meth:`MAEModule.random_masking`, :meth:`MAEModule.forward_encoder`, :meth:`MAEModule.forward_decoder`,
:meth:`MAEModule.forward_loss`. The encoder is an ST-MEM-style :class:`~ecgfm.backbones.vit1d.ViT1D`; masking is
spatio-temporal (random over the ``leads x patches`` grid, independently per sample) and the encoder only ever sees
the visible patches (+ the SEP tokens). The lightweight decoder sees only the ``L * N`` patch positions (visible
tokens and mask tokens, no SEP tokens), with its own lead embeddings and fixed sin-cos positions, and predicts every
patch; the loss (:func:`ecgfm.losses.masked_patch_mse`) counts only masked patches of present leads. In training
(:meth:`MAEModule.reconstruction_loss`) the decoder's last block runs its MLP, and the head predicts, only for those
patches: the other outputs would be discarded, so the loss and gradients are unchanged.

Choices, and how they differ from the ST-MEM code:

* ``mask_mode="global"`` (default) draws the visible set uniformly over all ``L * N`` patches;
  ``mask_mode="per_lead"`` keeps the same number of patches in every lead (ST-MEM's ``random_masking``).
* ``decoder_layout="joint"`` (default) lets all ``L * N`` decoder tokens attend to each other;
  ``decoder_layout="per_lead"`` decodes every lead on its own (ST-MEM's lead-wise decoding), batched as
  ``(B * L, N, D)`` instead of a Python loop over leads, and without the SEP tokens ST-MEM carries through it; it
  needs ``mask_mode="per_lead"`` and no lead subsets (a lead with no visible patch would be decoded from nothing).
* Absent leads (``lead_mask`` false, zero-filled by the data layer): with ``lead_aware=True`` (default) a batch is
  split by lead set and each group is masked and encoded over its present leads only (as the lead-aware
  :meth:`~ecgfm.backbones.vit1d.ViT1D.embed` sees it downstream), so a one-lead record costs ~1/12 of a 12-lead
  one in the encoder and its visible patches are never empty-lead patches; the group losses are combined weighted by
  their counted patches, which equals the loss over the whole batch. ``lead_aware=False``: absent leads are encoded
  as zero leads (the model learns that a lead is missing). Either way they are never counted in the loss. A batch
  whose rows all have every lead takes the same path (and random draws) either way. The public full pass
  :meth:`MAEModule.forward` masks and encodes through the same grouping (:meth:`MAEModule.encode_lead_sets`) as the
  training step.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ecgfm.backbones.vit1d import sincos_1d
from ecgfm.losses.contrastive import ddp_mean
from ecgfm.losses.mae import masked_patch_mse
from ecgfm.methods.base import PretrainModule

__all__ = ["MAEDecoder", "MAEModule", "random_masking"]

MASK_MODES = ("global", "per_lead")
DECODER_LAYOUTS = ("joint", "per_lead")



def _visible(n: int, mask_ratio: float) -> int:
    """Patches left visible of ``n`` at ``mask_ratio``: ``floor(n * (1 - ratio))`` in exact arithmetic. In floats
    ``1 - 0.9`` is 0.0999..98 and ``1 - 0.8`` is 0.1999..96, so a plain ``int()`` dropped a whole patch: 10 patches
    of a one-lead crop at 0.9 kept none (the step failed), 12 x 10 at 0.8 kept 23 instead of 24 (ST-MEM's
    reference code has the same expression)."""
    return int(math.floor(n * (1 - mask_ratio) + 1e-9))

def random_masking(batch: int, num_leads: int, num_patches: int, mask_ratio: float, mode: str = "global",
                   device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                   leads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking of the ``leads x patches`` grid by sorting uniform noise (MAE / ST-MEM).

    Args:
        batch: ``B``.
        num_leads: ``L``.
        num_patches: ``N`` patches per lead.
        mask_ratio: fraction of patches hidden from the encoder, in ``[0, 1)``.
        mode: ``"global"`` (keep ``floor(L*N*(1-r))`` patches anywhere, in exact arithmetic) or ``"per_lead"``
            (keep ``floor(N*(1-r))`` patches in every lead).
        device: device of the outputs.
        generator: optional RNG (validation uses a fixed one); the global RNG otherwise.
        leads: optional ``(l,)`` int64 lead indices (a random lead subset): visible patches are drawn from these
            leads only (``floor(l*N*(1-r))`` of them, or ``floor(N*(1-r))`` per lead), every patch of the other leads
            is hidden. None: all leads (the default draws, unchanged).

    Returns:
        ``ids_keep (B, K)`` int64 visible positions into the lead-major ``L*N`` grid (in shuffled order),
        ``ids_restore (B, L*N)`` int64 such that gathering ``[visible tokens, mask tokens]`` with it restores grid
        order, ``mask (B, L, N)`` bool, true where the patch is hidden (to be reconstructed).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    total = num_leads * num_patches
    if leads is not None:
        leads = torch.as_tensor(leads, dtype=torch.long, device=device)
        out_lead = torch.ones(num_leads, dtype=torch.bool, device=device)
        out_lead[leads] = False
    if mode == "global":
        n_in = total if leads is None else len(leads) * num_patches
        keep = _visible(n_in, mask_ratio)
        noise = torch.rand(batch, total, device=device, generator=generator)
        if leads is not None:   # patches of the other leads sort last: never visible
            noise = noise + 2.0 * out_lead.repeat_interleave(num_patches)[None].to(noise.dtype)
        ids_shuffle = torch.argsort(noise, dim=1)                                   # ascending: small noise kept
    else:
        k_lead = _visible(num_patches, mask_ratio)
        keep = k_lead * num_leads
        noise = torch.rand(batch, num_leads, num_patches, device=device, generator=generator)
        offset = torch.arange(num_leads, device=device)[None, :, None] * num_patches
        per_lead = torch.argsort(noise, dim=2) + offset                             # (B, L, N) grid positions
        if leads is None:
            ids_shuffle = torch.cat([per_lead[:, :, :k_lead].reshape(batch, -1),
                                     per_lead[:, :, k_lead:].reshape(batch, -1)], dim=1)
        else:
            keep = k_lead * len(leads)
            ids_shuffle = torch.cat([per_lead[:, leads, :k_lead].reshape(batch, -1),
                                     per_lead[:, leads, k_lead:].reshape(batch, -1),
                                     per_lead[:, out_lead].reshape(batch, -1)], dim=1)
    if keep < 1:
        n_masked = num_leads if leads is None else len(leads)
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch of {n_masked} lead(s) x {num_patches} "
                         f"patches (mode {mode!r})")
    ids_restore = torch.argsort(ids_shuffle, dim=1)                                 # (B, L*N)
    ids_keep = ids_shuffle[:, :keep]                                                # (B, K)
    mask = (ids_restore >= keep).reshape(batch, num_leads, num_patches)             # rank >= K: hidden
    return ids_keep, ids_restore, mask


class MAEDecoder(nn.Module):
    """Lightweight MAE decoder over the ``L * N`` patch positions (no SEP tokens, no wasted tokens).

    Args:
        num_leads: ``L``.
        patch_size: ``P`` (output samples per patch).
        max_patches: largest ``N``.
        encoder_dim: width of the encoder tokens.
        dim: decoder width.
        depth: decoder blocks.
        num_heads: decoder attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        layout: ``"joint"`` or ``"per_lead"`` attention (see module docstring).
    """

    def __init__(self, num_leads: int, patch_size: int, max_patches: int, encoder_dim: int, dim: int = 256,
                 depth: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0, layout: str = "joint"):
        super().__init__()
        if layout not in DECODER_LAYOUTS:
            raise ValueError(f"decoder layout must be one of {DECODER_LAYOUTS}, got {layout!r}")
        if dim % num_heads:
            raise ValueError(f"decoder dim ({dim}) must be divisible by decoder heads ({num_heads})")
        self.num_leads, self.patch_size, self.dim, self.layout = num_leads, patch_size, dim, layout
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.lead_embed = nn.Parameter(torch.zeros(num_leads, dim))
        self.register_buffer("pos_embed", sincos_1d(max_patches + 2, dim), persistent=False)  # as the encoder
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.lead_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor, num_patches: int,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Predict every patch, or only the patches at ``rows``.

        Args:
            visible: ``(B, K, D_enc)`` encoder outputs of the visible patch tokens (in ``ids_keep`` order).
            ids_restore: ``(B, L*N)`` from :func:`random_masking`.
            num_patches: ``N``.
            rows: optional ``(R,)`` int64 positions in the flattened ``(B, L, N)`` grid whose predictions are
                needed (training: the masked patches the loss counts). Every token still goes through every block
                (they are the keys and values of the attention), but the last block's projection residual, MLP,
                final norm and prediction head run on these rows only: the outputs of the other tokens would be
                thrown away, so the loss and all gradients are the same as with the full prediction.

        Returns:
            ``(B, L, N, P)`` predicted patches, or ``(R, P)`` with ``rows``.
        """
        b, k, _ = visible.shape
        total = ids_restore.shape[1]
        z = self.embed(visible)                                                      # (B, K, Dd)
        z = torch.cat([z, self.mask_token.to(z.dtype).expand(b, total - k, -1)], dim=1)  # (B, L*N, Dd) shuffled
        z = torch.gather(z, 1, ids_restore[..., None].expand(-1, -1, self.dim))      # (B, L*N, Dd) grid order
        pos = self.pos_embed[1:num_patches + 1]                                      # (N, Dd)
        z = z + (self.lead_embed[:, None, :] + pos[None]).reshape(total, self.dim)
        if self.layout == "per_lead":
            z = z.reshape(b * self.num_leads, num_patches, self.dim)                 # (B*L, N, Dd)
        if rows is None or not self.blocks or not _rows_ok(self.blocks[-1]):
            for blk in self.blocks:
                z = blk(z)
            z = self.pred(self.norm(z))                                              # (B*L, N, P) or (B, L*N, P)
            z = z.reshape(b, self.num_leads, num_patches, self.patch_size)
            return z if rows is None else z.reshape(-1, self.patch_size)[rows]
        for blk in self.blocks[:-1]:
            z = blk(z)
        return self.pred(self.norm(_block_at_rows(self.blocks[-1], z, rows)))       # (R, P)


def _rows_ok(blk: nn.Module) -> bool:
    """Row selection keeps the block's mathematics only without stochastic depth (it drops whole samples)."""
    return isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.drop_path2, nn.Identity)


def _block_at_rows(blk: Block, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A timm pre-norm :class:`~timm.models.vision_transformer.Block` evaluated at some token rows only.

    Args:
        blk: the block (no stochastic depth).
        z: ``(B', S, D)`` block input; all tokens are attended to.
        rows: ``(R,)`` int64 positions in the flattened ``(B' * S)`` tokens.

    Returns:
        ``(R, D)``: ``blk(z).flatten(0, 1)[rows]``, with the MLP computed on the ``R`` rows only.
    """
    h = (z + blk.ls1(blk.attn(blk.norm1(z)))).flatten(0, 1)[rows]                   # (R, D)
    return h + blk.ls2(blk.mlp(blk.norm2(h)))


class MAEModule(PretrainModule):
    """Masked-autoencoder pretraining (MAE / ST-MEM) as a LightningModule.

    Args:
        backbone: a :class:`~ecgfm.backbones.vit1d.ViT1D` (the exported encoder).
        mask_ratio: fraction of patches hidden from the encoder (ST-MEM: 0.75).
        decoder_dim: decoder width (ST-MEM: 256).
        decoder_depth: decoder blocks (ST-MEM: 4).
        decoder_heads: decoder attention heads.
        decoder_mlp_ratio: decoder MLP ratio.
        norm_pix_loss: standardise every target patch (MAE ``norm_pix_loss``).
        mask_mode: ``"global"`` or ``"per_lead"`` (see module docstring).
        decoder_layout: ``"joint"`` or ``"per_lead"`` (see module docstring).
        lead_subset_prob: probability, per training batch (per lead-set group with ``lead_aware``), of a random
            lead subset (issue 12): ``l`` of the present leads drawn uniformly (``l`` uniform in ``1..present``),
            shared by the batch (group); only their visible patches and SEP tokens
            enter the encoder (as the lead-aware :meth:`~ecgfm.backbones.vit1d.ViT1D.embed` sees a record with
            those leads), and the decoder reconstructs the hidden patches of every present lead, the dropped
            leads included. 0 (default): off, numbers unchanged. Never in evaluation.
        lead_aware: encode every lead-set group of a batch over its present leads only (see the module docstring).
        lr, weight_decay, warmup_steps, max_steps, betas, probe_num_classes, probe_multilabel: see
            :class:`~ecgfm.methods.base.PretrainModule`.
    """

    @classmethod
    def one_view_reason(cls, hparams: Any) -> str | None:
        """MAE (and CREMA, whose two masked views are of ``x``) masks and reconstructs one crop."""
        return f"{cls.__name__} masks and reconstructs one crop"

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 256, decoder_depth: int = 4,
                 decoder_heads: int = 8, decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = True,
                 mask_mode: str = "global", decoder_layout: str = "joint", lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 100, max_steps: int = 10000,
                 betas: tuple[float, float] = (0.9, 0.95), probe_num_classes: int | None = None,
                 probe_multilabel: bool = False, lead_subset_prob: float = 0.0, lead_aware: bool = True) -> None:
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, max_steps=max_steps,
                         betas=betas, probe_num_classes=probe_num_classes, probe_multilabel=probe_multilabel)
        needed = ("patchify", "embed_tokens", "num_patch_tokens", "num_leads", "patch_size", "num_patches")
        # the attributes alone admit ST-MEM's ViT (it patchifies too) but its forward_features has no masked path:
        # it would fail at the first step with a TypeError about ``ids_keep``
        masked_path = "ids_keep" in inspect.signature(getattr(backbone, "forward_features", lambda: None)).parameters
        if not all(hasattr(backbone, a) for a in needed) or not masked_path:
            raise ValueError(f"MAEModule needs a patch-token backbone (ViT1D: {', '.join(needed)} and a "
                             f"forward_features(x, ids_keep=...) for the visible patches); got "
                             f"{type(backbone).__name__} ({getattr(backbone, 'name', '?')})")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        one_lead_grids = mask_mode == "per_lead" or bool(lead_aware) or lead_subset_prob > 0
        if one_lead_grids and _visible(int(backbone.num_patches), mask_ratio) < 1:
            # a lead masked on its own (per-lead mode), a one-lead record (lead-aware grouping) or a one-lead subset
            # keeps floor(N * (1 - r)) patches: with none visible the run would stop at a random step, not here
            # (crops shorter than the backbone's seq_len have fewer patches: the step's error names them)
            raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch of a one-lead record "
                             f"({backbone.num_patches} patches per lead); use mask_ratio <= "
                             f"{1 - 1 / int(backbone.num_patches):.4f}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if not 0.0 <= lead_subset_prob <= 1.0:
            raise ValueError(f"lead_subset_prob must be in [0, 1], got {lead_subset_prob}")
        if decoder_layout == "per_lead" and (mask_mode != "per_lead" or lead_subset_prob > 0):
            # a lead-wise decoder sees only its lead's visible tokens: a lead with none (the global mask hides a
            # whole lead in ~5 % of leads at r = 0.75 on 12 x 10 patches; a lead_subset drop hides it always) would
            # be "reconstructed" from mask tokens and positions alone, an input-independent guess scored in the loss
            raise ValueError(f"decoder_layout='per_lead' decodes each lead from its own visible patches: it needs "
                             f"mask_mode='per_lead' (every lead keeps some) and lead_subset_prob=0, got "
                             f"mask_mode={mask_mode!r}, lead_subset_prob={lead_subset_prob}")
        self.lead_subset_prob = float(lead_subset_prob)
        self.lead_aware = bool(lead_aware)
        self.mask_ratio = float(mask_ratio)
        self.mask_mode = mask_mode
        self.norm_pix_loss = bool(norm_pix_loss)
        self.decoder = MAEDecoder(backbone.num_leads, backbone.patch_size, backbone.num_patches,
                                  backbone.num_features, dim=decoder_dim, depth=decoder_depth,
                                  num_heads=decoder_heads, mlp_ratio=decoder_mlp_ratio, layout=decoder_layout)

    # ------------------------------------------------------------------ MAE steps
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, T) -> (B, L, N, P)``."""
        return self.backbone.patchify(x)

    def random_masking(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       leads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for ``x (B, L, T)``: ``ids_keep (B, K)``, ``ids_restore (B, L*N)``, ``mask (B, L, N)`` bool."""
        b, n_leads, t = x.shape
        return random_masking(b, n_leads, t // self.backbone.patch_size, self.mask_ratio, self.mask_mode,
                              device=x.device, generator=generator, leads=leads)

    def draw_lead_subset(self, num_leads: int, present: torch.Tensor | None = None) -> torch.Tensor | None:
        """A random lead subset for this training batch (``lead_subset_prob``), or None (no subset drawn).

        Args:
            num_leads: ``L``.
            present: optional ``(l,)`` int64 present leads to draw from (all ``L`` when None).

        Returns:
            ``(k,)`` int64 sorted lead indices, or None.
        """
        if not self.training or self.lead_subset_prob <= 0 or float(torch.rand(())) >= self.lead_subset_prob:
            return None
        if present is None:
            k = int(torch.randint(1, num_leads + 1, ()))
            return torch.randperm(num_leads)[:k].sort().values
        present = present.cpu()
        k = int(torch.randint(1, len(present) + 1, ()))
        return present[torch.randperm(len(present))[:k]].sort().values

    def forward_encoder(self, x: torch.Tensor, generator: torch.Generator | None = None,
                        present: torch.Tensor | None = None, subset_from: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask and encode.

        Args:
            x: ``(B, L, T)``.
            generator: optional RNG for the masks.
            present: optional ``(l,)`` int64 leads present in every row of ``x`` (a lead-set group): visible
                patches are drawn from these leads only and only they are encoded. None: all leads.
            subset_from: optional ``(l,)`` int64 leads a ``lead_subset_prob`` subset is drawn from when
                ``present`` is None (``lead_aware=False``: the leads present in every row, so that the subset is
                not made of zero-filled absent leads); empty: no subset. None: ``present`` (all leads).

        Returns:
            ``latent (B, K + 2L, D)`` (visible patch tokens, then SEP tokens; zero SEP tokens at leads not
            encoded), ``mask (B, L, N)`` bool, ``ids_restore (B, L*N)``.
        """
        self.backbone.patchify(x)  # validates the input shape with a clear error
        if present is not None and len(present) == x.shape[1]:
            present = None
        pool = present if subset_from is None or present is not None else subset_from
        leads = self.draw_lead_subset(x.shape[1], pool) if generator is None and (pool is None or len(pool)) \
            else None
        if leads is None:
            leads = present
        ids_keep, ids_restore, mask = self.random_masking(x, generator, leads)
        if leads is None:
            latent = self.backbone.forward_features(x, ids_keep=ids_keep)             # (B, K + 2L, D)
        else:   # only the subset's visible patches and SEP tokens are encoded; zero SEP slots for the others
            subset = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            subset[:, leads.to(x.device)] = True
            latent = self.backbone.forward_features(x, ids_keep=ids_keep, lead_mask=subset)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, num_patches: int) -> torch.Tensor:
        """``latent (B, K + 2L, D) -> pred (B, L, N, P)`` (the SEP tokens are dropped before decoding)."""
        k = self.backbone.num_patch_tokens(latent)                                   # visible patch tokens
        return self.decoder(latent[:, :k], ids_restore, num_patches)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-patch MSE over hidden patches of present leads.

        Args:
            x: ``(B, L, T)`` signal.
            pred: ``(B, L, N, P)``.
            mask: ``(B, L, N)`` bool, true = hidden.
            lead_mask: ``(B, L)`` bool, false = absent lead (excluded); ``None`` = all present.
        """
        target = self.patchify(x)                                                     # (B, L, N, P)
        if lead_mask is not None:
            mask = mask & lead_mask.to(torch.bool)[:, :, None]
        return masked_patch_mse(pred, target, mask, norm_pix=self.norm_pix_loss)

    def reconstruction_loss(self, x: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor,
                            ids_restore: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The MAE loss of an encoded batch, decoding only what the loss counts (the training path).

        Equal to ``forward_loss(x, forward_decoder(latent, ids_restore, N), mask, lead_mask)`` (tested), without
        the last decoder block's work on visible patches and absent leads (see :meth:`MAEDecoder.forward`).

        Args:
            x: ``(B, L, T)`` signal.
            latent: ``(B, K + 2L, D)`` from :meth:`forward_encoder`.
            mask: ``(B, L, N)`` bool, true = hidden.
            ids_restore: ``(B, L*N)``.
            lead_mask: ``(B, L)`` bool, false = absent lead; ``None`` = all present.
        """
        if lead_mask is not None:
            mask = mask & lead_mask.to(torch.bool)[:, :, None]
        rows = mask.reshape(-1).nonzero().squeeze(1)                                 # (R,) counted patches
        k = self.backbone.num_patch_tokens(latent)
        pred = self.decoder(latent[:, :k], ids_restore, mask.shape[2], rows=rows)    # (R, P)
        target = self.patchify(x).reshape(-1, pred.shape[-1])[rows]                  # (R, P)
        return masked_patch_mse(pred, target, torch.ones(rows.shape, dtype=torch.bool, device=rows.device),
                                norm_pix=self.norm_pix_loss)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, recorded: torch.Tensor | None = None) -> dict[str, Any]:
        """Full MAE pass (every patch predicted), masked and encoded as :meth:`shared_step` does.

        With ``lead_aware`` a batch whose rows lack leads is split by lead set (:meth:`encode_lead_sets`) and each
        group is masked and encoded over its present leads only, so no visible patch lies on an absent lead and
        the loss is the training step's (the same value for the same random draws).

        Args:
            x: ``(B, L, T)`` signal (absent leads zero-filled).
            lead_mask: optional ``(B, L)`` bool, false = absent lead (never counted; not encoded with
                ``lead_aware``). None: every lead present.
            generator: optional RNG for the masks, shared by the lead-set groups in turn. None: the training
                step's (the global RNG in training, a fixed seed per group in evaluation).
            recorded: optional ``(B,)`` int64 samples of each input before its zero padding (the batch's
                ``recorded``): patches without one are not counted (:meth:`counted_patches`), as in the training
                step. None: every sample recorded.

        Returns:
            ``{"loss": scalar, "pred": (B, L, N, P), "mask": (B, L, N) bool (true = hidden), "latent", "groups"}``:
            ``latent`` is the encoder output ``(B, K + 2L, D)`` when the batch is one group, else a tuple with one
            ``(b_g, K_g + 2L, D)`` per group (groups keep different numbers of visible tokens); ``groups`` lists
            ``(rows (b_g,) int64, present leads (l_g,) int64 or None = all)`` in that order.
        """
        parts = self.encode_lead_sets(x, lead_mask, generator)
        preds, masks, latents, losses, counts = [], [], [], [], []
        for rows, _, xg, mg, latent, mask, ids_restore in parts:
            pred = self.forward_decoder(latent, ids_restore, mask.shape[2])           # (b_g, L, N, P)
            preds.append(pred)
            masks.append(mask)
            latents.append(latent)
            counted = self.counted_patches(mask, mg, None if recorded is None else recorded.index_select(0, rows))
            losses.append(self.forward_loss(xg, pred, counted))
            counts.append(counted.sum())
        groups = [(rows, leads) for rows, leads, *_ in parts]
        if len(parts) == 1:   # the whole batch (every lead present, or lead_aware=False): as before
            return {"loss": losses[0], "pred": preds[0], "mask": masks[0], "latent": latents[0], "groups": groups}
        inverse = torch.argsort(torch.cat([rows for rows, _ in groups]))               # back to batch order
        return {"loss": self.pooled_recon(losses, counts), "pred": torch.cat(preds)[inverse],   # (B, L, N, P)
                "mask": torch.cat(masks)[inverse], "latent": tuple(latents), "groups": groups}  # (B, L, N)

    def encode_lead_sets(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> list[tuple[Any, ...]]:
        """Mask and encode a batch by lead set, as the training step does (one group unless ``lead_aware`` and some
        row lacks a lead; see :meth:`lead_set_groups`).

        Args:
            x: ``(B, L, T)``.
            lead_mask: optional ``(B, L)`` bool, false = absent lead.
            generator: optional RNG for the masks, used by every group in turn; None: :meth:`_val_generator` of each
                group (a fixed seed in evaluation, the global RNG in training).

        Returns:
            One ``(rows (b,) int64, present leads (l,) int64 or None = all, x (b, L, T), lead_mask (b, L) bool or
            None, latent (b, K + 2L, D), mask (b, L, N) bool, ids_restore (b, L*N))`` per group; a group with
            absent leads is masked and encoded over its present leads only. One group: ``rows`` is ``arange(B)``
            and ``x`` the batch itself (``lead_aware=False`` draws a lead subset from the leads every row has,
            :meth:`subset_pool`).
        """
        groups = self.lead_set_groups({"x": x, "lead_mask": lead_mask})
        if len(groups) == 1 and groups[0][1] is None:
            gen = generator if generator is not None else self._val_generator(x)
            latent, mask, ids_restore = self.forward_encoder(x, gen, subset_from=self.subset_pool(lead_mask))
            mg = None if lead_mask is None else lead_mask.to(torch.bool)
            return [(groups[0][0], None, x, mg, latent, mask, ids_restore)]
        assert lead_mask is not None
        out = []
        for rows, leads in groups:   # each lead set masked and encoded over its present leads
            xg, mg = x.index_select(0, rows), lead_mask.index_select(0, rows).to(torch.bool)
            gen = generator if generator is not None else self._val_generator(xg)
            latent, mask, ids_restore = self.forward_encoder(xg, gen, present=leads)
            out.append((rows, leads, xg, mg, latent, mask, ids_restore))
        return out

    def _val_generator(self, x: torch.Tensor) -> torch.Generator | None:
        """Fixed masks in evaluation mode, so validation losses are comparable between epochs."""
        if self.training:
            return None
        return torch.Generator(device=x.device).manual_seed(0)

    @staticmethod
    def subset_pool(lead_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The leads a ``lead_subset_prob`` subset of a batch encoded whole (``lead_aware=False``) is drawn from:
        those present in every row (possibly none); None when every lead is present (all 12)."""
        if lead_mask is None or bool(lead_mask.all()):
            return None
        return lead_mask.to(torch.bool).all(0).nonzero().flatten()

    def lead_set_groups(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Rows of a batch by lead set: ``[(rows (b,), present leads (l,) or None = all), ...]``.

        One group ``(all rows, None)`` unless ``lead_aware`` and some row lacks a lead.
        """
        x, lead_mask = batch["x"], batch.get("lead_mask")
        if not self.lead_aware or lead_mask is None or bool(lead_mask.all()):
            return [(torch.arange(x.shape[0], device=x.device), None)]
        return self.backbone.lead_groups(lead_mask.to(x.device))

    def shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean reconstruction error per counted patch (hidden patch of a present lead holding recorded samples,
        :meth:`counted_patches`) of the batch.

        Under DDP a training step's gradient is that of its sum over the mean count over ranks (:func:`ddp_mean`),
        so that DDP's gradient average is the global per-patch mean's even when the ranks hold different numbers of
        counted patches (one-lead and 12-lead records split unevenly); its value (logged) is the global per-patch mean.
        """
        losses, counts = [], []
        recorded = batch.get("recorded")
        for rows, _, xg, mg, latent, mask, ids_restore in self.encode_lead_sets(batch["x"], batch.get("lead_mask")):
            counted = self.counted_patches(mask, mg, None if recorded is None else recorded.index_select(0, rows))
            losses.append(self.reconstruction_loss(xg, latent, counted, ids_restore))
            counts.append(counted.sum())
        loss = self.pooled_recon(losses, counts)
        return loss, {"recon": loss.detach()}

    def counted_patches(self, mask: torch.Tensor, lead_mask: torch.Tensor | None = None,
                        recorded: torch.Tensor | None = None) -> torch.Tensor:
        """The patches the loss counts: hidden, of a present lead, and holding at least one recorded sample.

        A crop of a record shorter than the crop ends in zero padding (``PretrainDataModule``'s ``recorded``); a
        padded patch's target is exactly 0 (also after ``norm_pix``), an easy target that would dilute the loss.

        Args:
            mask: ``(b, L, N)`` bool, true = hidden.
            lead_mask: optional ``(b, L)`` bool, false = absent lead.
            recorded: optional ``(b,)`` int64, samples of each crop before its padding (None: no padding).

        Returns:
            ``(b, L, N)`` bool.
        """
        if lead_mask is not None:
            mask = mask & lead_mask.to(torch.bool)[:, :, None]
        if recorded is not None:
            first = torch.arange(mask.shape[2], device=mask.device) * int(self.backbone.patch_size)   # (N,)
            mask = mask & (first[None, :] < recorded.to(mask.device)[:, None])[:, None, :]
        return mask

    def pooled_recon(self, losses: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
        """The per-patch mean of lead-set groups' mean errors ``losses`` over ``counts`` counted patches each.

        In training under DDP its gradient is that of the sum over the mean count over ranks (:func:`ddp_mean`), so
        that DDP's gradient average is the global per-patch mean's; its value is that global mean (the same on every
        rank), so ``train/loss`` logs the loss being optimised.
        """
        counts_t = torch.stack(counts).to(losses[0].dtype)
        total = (torch.stack(losses) * counts_t).sum()
        if self.training:
            return ddp_mean(total, counts_t.sum())
        return total / counts_t.sum().clamp_min(1e-6)
