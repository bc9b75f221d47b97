"""ST-MEM's ViT encoder, as published: a native ecgfm backbone that loads the authors' weights.

Na et al. 2024, "Guiding masked representation learning to capture spatio-temporal relationship of
electrocardiogram" (ST-MEM, ICLR 2024; code bakqui/ST-MEM, CC BY-NC 4.0). Every lead is cut into non-overlapping
1-D patches; one patch embedding (LayerNorm -> Linear -> LayerNorm) is shared by all leads; a *learnable* position
table of ``N + 2`` rows gives the patches positions ``1..N`` and the two separator (SEP) tokens that frame each lead
positions ``0`` and ``N + 1``; a learnable embedding per lead is added to every token of that lead, SEPs included.
All ``L * (N + 2)`` tokens attend to each other in pre-norm transformer blocks (LayerNorm eps 1e-5, GELU MLP).
The embedding is the mean over the patch tokens of all leads (SEPs removed) followed by the final LayerNorm.

This differs from :class:`~ecgfm.backbones.vit1d.ViT1D` (ecgfm's own ST-MEM-style ViT) in exactly the ways needed
to reproduce the published weights: a learned rather than a fixed sin-cos position table (the right SEP always takes
the table's *last* row, also for inputs shorter than ``seq_len``, as the authors' code does), LayerNorm eps 1e-5,
a free head width ``dim_head`` (``heads * dim_head`` need not equal ``width``) and the final norm applied after
pooling rather than to every token. :mod:`ecgfm.zoo` maps a checkpoint onto it.

Token layout of :meth:`StMemViT.forward_features` (as ``ViT1D``, so explain's ``tokens_to_grid`` and attention
rollout apply): ``(B, L*N + 2L, D)``, the ``L*N`` patch tokens first (lead-major), then the ``L`` left SEPs and
the ``L`` right SEPs. Self-attention without a mask is permutation-equivariant, so this order gives the same
numbers as the authors' interleaved ``[SEP, patches, SEP]`` per lead.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from ecgfm.backbones.registry import Backbone, register_backbone
from ecgfm.data.record import CANONICAL_LEADS

__all__ = ["StMemViT", "STMEM_SIZES", "lead_indices"]


def lead_indices(input_leads: Sequence[str] | None) -> list[int] | None:
    """Rows of a canonical 12-lead input (:data:`~ecgfm.data.record.CANONICAL_LEADS`) that feed a model's input
    channels, in the model's order; None when the input is passed through as it is.

    Raises:
        ValueError: ``input_leads`` is a string or not a sequence, is empty, names a non-canonical lead, or names a
            lead twice.
    """
    if input_leads is None:
        return None
    if isinstance(input_leads, (str, bytes)) or not isinstance(input_leads, Sequence):
        raise ValueError(f"input_leads must be a list of canonical lead names, got {type(input_leads).__name__} "
                         f"{input_leads!r}" + (" (a string is not split: pass a list, e.g. ['II'])"
                                               if isinstance(input_leads, str) else ""))
    unknown = [lead for lead in input_leads if lead not in CANONICAL_LEADS]
    if unknown or not input_leads:
        raise ValueError(f"input_leads must be canonical lead names {CANONICAL_LEADS}, got {list(input_leads)}")
    twice = sorted({lead for lead in input_leads if list(input_leads).count(lead) > 1})
    if twice:
        raise ValueError(f"input_leads names lead(s) {twice} more than once ({list(input_leads)}): every input "
                         f"channel is a different lead")
    return [CANONICAL_LEADS.index(lead) for lead in input_leads]


def select_leads(x: torch.Tensor, idx: list[int] | None, owner: str) -> torch.Tensor:
    """``(B, 12, T)`` canonical input -> ``(B, len(idx), T)`` model channels (identity when ``idx`` is None)."""
    if x.ndim != 3:
        raise ValueError(f"{owner} expects input (batch, leads, samples), got shape {tuple(x.shape)}")
    if idx is None:
        return x
    if x.shape[1] != len(CANONICAL_LEADS):
        raise ValueError(f"{owner} reads leads {[CANONICAL_LEADS[i] for i in idx]} from a canonical "
                         f"{len(CANONICAL_LEADS)}-lead input {CANONICAL_LEADS}, got {x.shape[1]} leads")
    if idx == list(range(len(CANONICAL_LEADS))):
        return x
    return x[:, idx]


class StMemViT(Backbone):
    """ST-MEM ViT encoder over ``(B, leads, samples)`` ECGs (argument names as in the authors' ``ST_MEM_ViT``).

    Args:
        seq_len: longest input in samples (a multiple of ``patch_size``); the position table has
            ``seq_len / patch_size + 2`` rows.
        patch_size: samples per patch ``P``.
        num_leads: number of lead embeddings. With 12 they are the canonical leads I, II, III, aVR, aVL, aVF,
            V1-V6 (ST-MEM's order), and a lead read through ``input_leads`` takes its own lead's embedding (lead II
            takes row 1 whichever leads are read, and in whatever order: a checkpoint trained on another channel
            order has its rows put into the canonical order by :mod:`ecgfm.zoo.stmem`); otherwise, and without
            ``input_leads``, input row ``i`` takes embedding ``i`` (the authors stack all embeddings onto all
            leads, so their inputs have every lead).
        width: token width ``D``.
        depth: number of transformer blocks.
        mlp_dim: hidden width of the block MLP.
        heads: attention heads.
        dim_head: width of one head (``heads * dim_head`` is the attention width).
        qkv_bias: bias in the q, k, v projection.
        drop_out_rate: dropout on the tokens and inside the blocks (training only).
        attn_drop_out_rate: dropout on the attention probabilities (training only).
        drop_path_rate: stochastic depth of the last block, increasing linearly from 0 (training only).
        input_leads: canonical lead names the model reads, in its channel order, from a canonical 12-lead input
            (None: the input's rows are the model's leads).
    """

    def __init__(self, seq_len: int = 2250, patch_size: int = 75, num_leads: int = 12, width: int = 768,
                 depth: int = 12, mlp_dim: int = 3072, heads: int = 12, dim_head: int = 64, qkv_bias: bool = True,
                 drop_out_rate: float = 0.0, attn_drop_out_rate: float = 0.0, drop_path_rate: float = 0.0,
                 input_leads: Sequence[str] | None = None):
        super().__init__()
        if patch_size <= 0 or seq_len <= 0 or seq_len % patch_size:
            raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of patch_size ({patch_size})")
        if min(num_leads, width, mlp_dim, heads, dim_head) <= 0 or depth < 0:
            raise ValueError("num_leads, width, mlp_dim, heads and dim_head must be positive and depth "
                             f"non-negative, got {num_leads}, {width}, {mlp_dim}, {heads}, {dim_head}, {depth}")
        self._lead_idx = lead_indices(input_leads)
        if self._lead_idx is not None and len(self._lead_idx) > num_leads:
            raise ValueError(f"input_leads has {len(self._lead_idx)} leads but the model has {num_leads} lead "
                             f"embeddings")
        if self._lead_idx is not None and num_leads != len(CANONICAL_LEADS) and len(self._lead_idx) != num_leads:
            raise ValueError(f"input_leads names {len(self._lead_idx)} leads but the model has {num_leads} lead "
                             f"embeddings, not the canonical 12: name the lead of every embedding, in order")
        # rows of lead_embed the model's leads take: by lead identity when the 12 rows are the canonical leads
        self._embed_idx = (self._lead_idx if self._lead_idx is not None and num_leads == len(CANONICAL_LEADS)
                           else None)
        self.seq_len, self.patch_size, self.num_leads = seq_len, patch_size, num_leads
        self.num_patches = seq_len // patch_size
        self.width = self.num_features = width
        self.depth, self.heads, self.dim_head = depth, heads, dim_head

        norm = partial(nn.LayerNorm, eps=1e-5)
        # patch embedding shared by all leads: LayerNorm(P) -> Linear(P, D) -> LayerNorm(D)
        self.patch_embed = nn.Sequential(norm(patch_size), nn.Linear(patch_size, width), norm(width))
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches + 2, width) * 0.02)  # rows 0, N+1: SEPs
        self.sep_embed = nn.Parameter(torch.randn(width) * 0.02)
        self.lead_embed = nn.Parameter(torch.randn(num_leads, width) * 0.02)
        self.dropout = nn.Dropout(drop_out_rate)
        # (on the CPU: also when the model is built under a meta device)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        from timm.layers import Attention        # here, not at the top: see ecgfm.backbones.vit1d (start-up time)
        from timm.models.vision_transformer import Block

        # timm's pre-norm Block is the authors' TransformerBlock (PreNorm attention and MLP, residuals). Its MLP
        # width is int(width * mlp_ratio): the ratio is nudged by half a unit so that this is exactly mlp_dim. Its
        # attention is replaced by one with a free head width (timm's Block has no argument for attn_head_dim).
        self.blocks = nn.ModuleList(
            Block(width, 1, mlp_ratio=(mlp_dim + 0.5) / width, qkv_bias=qkv_bias, proj_drop=drop_out_rate,
                  attn_drop=attn_drop_out_rate, drop_path=dpr[i], norm_layer=norm)
            for i in range(depth))
        for blk in self.blocks:
            blk.attn = Attention(width, heads, attn_head_dim=dim_head, qkv_bias=qkv_bias,
                                 attn_drop=attn_drop_out_rate, proj_drop=drop_out_rate)
            if heads == 1 and dim_head == width:  # the authors' Attention has no output projection in this case
                blk.attn.proj = nn.Identity()
            assert blk.mlp.fc1.out_features == mlp_dim
        self.norm = norm(width)

    # ------------------------------------------------------------------ tokens
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Model channels ``(B, L, T) -> (B, L, N, P)`` patches (checks ``L`` and ``T``: without ``input_leads``
        the input has one row per lead embedding, as the token helpers :meth:`pool` / :meth:`tokens_to_grid`
        assume)."""
        b, n_leads, t = x.shape
        if self._lead_idx is None and n_leads != self.num_leads:
            raise ValueError(f"StMemViT has {self.num_leads} lead embeddings, got an input with {n_leads} leads (set "
                             f"input_leads to read a subset of a canonical 12-lead input)")
        if t == 0 or t % self.patch_size or t > self.seq_len:
            raise ValueError(f"input length {t} must be a positive multiple of patch_size={self.patch_size} and at "
                             f"most seq_len={self.seq_len}")
        return x.unflatten(-1, (t // self.patch_size, self.patch_size))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input tokens before the blocks: ``(B, L_in, T) -> (B, L*N + 2L, D)`` (layout in the module docstring)."""
        patches = self.patchify(select_leads(x, self._lead_idx, "StMemViT"))      # (B, L, N, P)
        b, n_leads, n, _ = patches.shape
        table = self.lead_embed if self._embed_idx is None else self.lead_embed[self._embed_idx]
        lead = table[:n_leads, None, :]                                            # (L, 1, D)
        tokens = self.patch_embed(patches) + self.pos_embed[1:n + 1]              # (B, L, N, D)
        tokens = (tokens + lead).reshape(b, n_leads * n, self.width)              # (B, L*N, D)
        left = (self.sep_embed + self.pos_embed[0]) + lead[:, 0]                  # (L, D)
        right = (self.sep_embed + self.pos_embed[-1]) + lead[:, 0]                # (L, D): the table's last row
        seps = torch.cat([left, right], dim=0).to(tokens.dtype).expand(b, -1, -1)  # (B, 2L, D)
        return self.dropout(torch.cat([tokens, seps], dim=1))

    # ------------------------------------------------------------------ contract
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, ``(B, L*N + 2L, D)`` (not normed: ST-MEM norms the pooled vector)."""
        tokens = self.embed_tokens(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens

    def _input_leads(self, x: torch.Tensor | None = None) -> int:
        """Leads the model sees: ``len(input_leads)``, else ``num_leads`` (:meth:`patchify` checks the input)."""
        return len(self._lead_idx) if self._lead_idx is not None else self.num_leads

    def num_patch_tokens(self, tokens: torch.Tensor, num_leads: int | None = None) -> int:
        """Number of patch tokens ``L*N`` at the front of a ``(B, L*N + 2L, D)`` token tensor (``L`` defaults to
        the model's leads)."""
        return tokens.shape[1] - 2 * (num_leads or self._input_leads())

    def pool(self, tokens: torch.Tensor, num_leads: int | None = None) -> torch.Tensor:
        """Mean over the patch tokens (SEPs removed), then the final LayerNorm: ``(B, N_tok, D) -> (B, D)``."""
        return self.norm(tokens[:, : self.num_patch_tokens(tokens, num_leads)].mean(dim=1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """ST-MEM's ``forward_encoding``: ``(B, L_in, T) -> (B, D)``."""
        return self.pool(self.forward_features(x), self._input_leads(x))

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a feature map ``(B, D, L, N)`` (for Grad-CAM style attributions)."""
        n_leads = self._input_leads()
        k = self.num_patch_tokens(tokens)
        if tokens.ndim != 3 or k <= 0 or k % n_leads:
            raise ValueError(f"tokens_to_grid expects (B, L*N + 2L, D) tokens with L={n_leads}, got "
                             f"{tuple(tokens.shape)}")
        return tokens[:, :k].reshape(tokens.shape[0], n_leads, k // n_leads, -1).permute(0, 3, 1, 2)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every block ``(B, heads, N_tok, N_tok)``, recomputed from each block's qkv
        projection (the fused kernel never materialises them); token layout as :meth:`forward_features`."""
        tokens = self.embed_tokens(x)
        maps = []
        for blk in self.blocks:
            attn = blk.attn
            h = blk.norm1(tokens)
            b, n, _ = h.shape
            qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            tokens = blk(tokens)
        return maps

    def extra_repr(self) -> str:
        return (f"seq_len={self.seq_len}, patch_size={self.patch_size}, num_leads={self.num_leads}, "
                f"width={self.width}, depth={self.depth}, heads={self.heads}, dim_head={self.dim_head}")


# The authors' published sizes (models/encoder/st_mem_vit.py), as arguments for ``create_backbone("stmem_vit", ...)``.
STMEM_SIZES: dict[str, dict[str, Any]] = {
    "small": dict(width=384, depth=12, heads=6, dim_head=64, mlp_dim=1536),
    "base": dict(width=768, depth=12, heads=12, dim_head=64, mlp_dim=3072),
}

# Registered name "stmem_vit". Its factory defaults are a few-thousand-parameter model on 250-sample inputs (for the
# registry-wide tests); an imported encoder stores every constructor argument, so these defaults never reach it.
_TEST_DEFAULTS: dict[str, Any] = dict(seq_len=250, patch_size=25, width=32, depth=1, mlp_dim=64, heads=2, dim_head=16)


@register_backbone("stmem_vit")
def stmem_vit(**kwargs: Any) -> StMemViT:
    """ST-MEM ViT; give every size argument (``STMEM_SIZES``), the defaults are a tiny test model."""
    return StMemViT(**{**_TEST_DEFAULTS, **kwargs})
