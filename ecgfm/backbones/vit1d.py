"""ViT-1D in the ST-MEM style: per-lead patches, lead embeddings and separator tokens.

Na et al. 2024, "Guiding masked representation learning to capture spatio-temporal relationship of
electrocardiogram" (ST-MEM, ICLR 2024). Every lead is cut into non-overlapping 1-D patches of ``patch_size``
samples; one linear projection (shared by all leads) embeds every patch; a learnable embedding per lead and a fixed
1-D sin-cos embedding of the patch position (shared by all leads) are added; each lead is framed by two SEP tokens.
All ``leads x patches`` tokens attend to each other (spatio-temporal attention), in timm
:class:`~timm.models.vision_transformer.Block` layers (pre-norm, fused scaled-dot-product attention).

Token layout (fixed, relied on by :mod:`ecgfm.methods.mae` and :mod:`ecgfm.explain`): the output of
:meth:`ViT1D.forward_features` is ``(B, K + 2L, D)`` where the first ``K`` tokens are patch tokens (``K = L * N``
in lead-major order when every patch is visible, or the ``ids_keep`` patches in that order) and the last ``2L`` are
the SEP tokens (``L`` left SEPs, then ``L`` right SEPs). There is no class token: :meth:`ViT1D.embed` is the mean
of the (final-normed) patch tokens, as in ST-MEM.

Differences from the ST-MEM code, on purpose: the sin-cos table gives the two SEP tokens of a lead positions ``0``
and ``N + 1`` (ST-MEM gives both a zero vector, which makes them identical inputs); masked patches are dropped
*before* the patch projection (no work on tokens that are thrown away).

Lead sets: :meth:`ViT1D.embed` and :meth:`ViT1D.forward_features` take an optional ``lead_mask (B, L)``; absent
leads then get no tokens at all (a one-lead record is ``N + 2`` tokens, not ``L * N + 2L`` of mostly zero-padded
leads), rows sharing a lead set are encoded together (one batch may mix 12-lead and 1-lead records), and the
embedding is the mean over the present leads' patch tokens. Without a mask, or with every lead present, the
computation is today's, bit for bit.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ecgfm.backbones.registry import Backbone, register_sizes

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block

__all__ = ["ViT1D", "sincos_1d", "block_attention_maps", "VIT_SIZES"]


def sincos_1d(num_positions: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 1-D sin-cos position table (MAE / ST-MEM ``get_1d_sincos_pos_embed``).

    Args:
        num_positions: number of positions ``P``.
        dim: embedding width (even).
        temperature: frequency base.

    Returns:
        ``(P, dim)`` float32 table: ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = temperature ** (-k / (dim / 2))``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    grid = torch.arange(num_positions, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([grid.sin(), grid.cos()], dim=1).float()


def block_attention_maps(blocks: Iterable[Block], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every timm :class:`~timm.models.vision_transformer.Block`, computed explicitly.

    The fused attention kernel never materialises the probabilities, so they are recomputed from each block's
    ``qkv`` projection of its (pre-normed) input while ``tokens`` run through the blocks unchanged. The maps stay in
    the autograd graph; call under ``torch.no_grad()`` when that is not needed.

    Args:
        blocks: the transformer blocks, in order.
        tokens: ``(B, N_tok, D)`` input of the first block.

    Returns:
        one ``(B, heads, N_tok, N_tok)`` tensor per block, rows summing to 1.
    """
    maps = []
    for blk in blocks:
        attn = blk.attn
        h = blk.norm1(tokens)
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        tokens = blk(tokens)
    return maps


class ViT1D(Backbone):
    """ST-MEM-style 1-D vision transformer over ``(B, leads, samples)`` ECGs.

    Args:
        seq_len: maximum input length in samples (a multiple of ``patch_size``); shorter inputs that are a multiple
            of ``patch_size`` are accepted (the position table is sliced).
        patch_size: samples per patch ``P``.
        num_leads: number of leads ``L`` the model is built for (input must have exactly this many).
        embed_dim: token width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias: bias in the q, k, v projections (ST-MEM: True).
        drop_path: stochastic-depth rate of the last block (linearly increasing from 0).
        drop_rate: dropout on the token embeddings and inside the blocks.
    """

    def __init__(self, seq_len: int = 2250, patch_size: int = 75, num_leads: int = 12, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, drop_rate: float = 0.0):
        super().__init__()
        if patch_size <= 0 or seq_len <= 0 or seq_len % patch_size:
            raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_leads <= 0 or depth < 0:
            raise ValueError(f"num_leads must be positive and depth non-negative, got {num_leads}, {depth}")
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.num_leads = num_leads
        self.num_patches = seq_len // patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_features = embed_dim
        self.depth = depth

        norm = partial(nn.LayerNorm, eps=1e-6)
        # ST-MEM patch embedding: LayerNorm(P) -> Linear(P, D) -> LayerNorm(D), shared by all leads.
        self.patch_embed = nn.Sequential(norm(patch_size), nn.Linear(patch_size, embed_dim), norm(embed_dim))
        self.lead_embed = nn.Parameter(torch.zeros(num_leads, embed_dim))
        self.sep_token = nn.Parameter(torch.zeros(embed_dim))
        # positions 0 and N+1 belong to the SEP tokens, 1..N to the patches; fixed, so not saved.
        self.register_buffer("pos_embed", sincos_1d(self.num_patches + 2, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth else []  # cpu: also under a meta device
        # timm is imported here, not at the top: it pulls in torchvision and torch._dynamo (~3 s of start-up), which
        # every ecgfm command would pay, since the package registers every backbone family on import.
        from timm.models.vision_transformer import Block

        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  drop_path=dpr[i], norm_layer=norm)
            for i in range(depth)
        )
        self.norm = norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE / ST-MEM initialisation: xavier-uniform linears, N(0, 0.02) for the learned embeddings.
        nn.init.normal_(self.lead_embed, std=0.02)
        nn.init.normal_(self.sep_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ input handling
    def _check_input(self, x: torch.Tensor) -> int:
        """Validate ``x (B, L, T)`` and return the number of patches ``N``."""
        if x.ndim != 3:
            raise ValueError(f"{type(self).__name__} expects input (batch, leads, samples), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_leads:
            raise ValueError(f"{type(self).__name__} was built for {self.num_leads} leads, got input with "
                             f"{x.shape[1]} leads (shape {tuple(x.shape)})")
        t = x.shape[2]
        if t % self.patch_size or t == 0 or t > self.seq_len:
            raise ValueError(f"input length {t} must be a positive multiple of patch_size={self.patch_size} and at "
                             f"most seq_len={self.seq_len}")
        return t // self.patch_size

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Cut each lead into patches: ``(B, L, T) -> (B, L, N, P)`` (a view, no copy)."""
        n = self._check_input(x)
        return x.unflatten(-1, (n, self.patch_size))

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``(B, L, N, P) -> (B, L, N * P)``."""
        return patches.flatten(-2)

    def patch_pos_lead(self, num_patches: int) -> torch.Tensor:
        """Position + lead embedding of every patch token: ``(L * N, D)`` in lead-major order."""
        pos = self.pos_embed[1:num_patches + 1]                       # (N, D)
        return (self.lead_embed[:, None, :] + pos[None, :, :]).reshape(-1, self.embed_dim)

    def sep_tokens(self, num_patches: int) -> torch.Tensor:
        """The ``2L`` SEP tokens (left SEPs at position 0, then right SEPs at position N+1): ``(2L, D)``."""
        left = self.sep_token + self.lead_embed + self.pos_embed[0]
        right = self.sep_token + self.lead_embed + self.pos_embed[num_patches + 1]
        return torch.cat([left, right], dim=0)

    def embed_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Input tokens before the transformer blocks.

        Args:
            x: ``(B, L, T)`` signal.
            ids_keep: optional ``(B, K)`` int64 indices into the ``L * N`` lead-major patch positions; only these
                patches are embedded (masked patches cost nothing).

        Returns:
            ``(B, K + 2L, D)`` tokens (``K = L * N`` without ``ids_keep``), layout as in the module docstring.
        """
        patches = self.patchify(x)                                    # (B, L, N, P)
        b, n_leads, n, p = patches.shape
        patches = patches.reshape(b, n_leads * n, p)                  # (B, L*N, P)
        pos_lead = self.patch_pos_lead(n)                             # (L*N, D)
        if ids_keep is None:
            tokens = self.patch_embed(patches) + pos_lead             # (B, L*N, D)
        else:
            if ids_keep.ndim != 2 or ids_keep.shape[0] != b:
                raise ValueError(f"ids_keep must be (batch, kept) = ({b}, K), got {tuple(ids_keep.shape)}")
            patches = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, p))        # (B, K, P)
            tokens = self.patch_embed(patches) + pos_lead[ids_keep]                          # (B, K, D)
        seps = self.sep_tokens(n).to(tokens.dtype).expand(b, -1, -1)  # (B, 2L, D)
        return self.pos_drop(torch.cat([tokens, seps], dim=1))

    # ------------------------------------------------------------------ lead sets
    def lead_groups(self, lead_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rows of a batch grouped by lead set: ``[(rows (b,), present leads (l,)), ...]`` (int64, sorted).

        A row with no present lead counts as all present (its zero leads are encoded as today), so every row gets
        an embedding. Rows of one group share one token sequence length and go through the blocks together.
        """
        lead_mask = self._check_mask(lead_mask)
        lead_mask = lead_mask | ~lead_mask.any(dim=1, keepdim=True)
        sets, inverse = torch.unique(lead_mask.to(torch.uint8), dim=0, return_inverse=True)  # uint8: any device
        return [((inverse == g).nonzero().flatten(), sets[g].nonzero().flatten()) for g in range(len(sets))]

    def _check_mask(self, lead_mask: torch.Tensor) -> torch.Tensor:
        if lead_mask.ndim != 2 or lead_mask.shape[1] != self.num_leads:
            raise ValueError(f"lead_mask must be (batch, {self.num_leads}), got {tuple(lead_mask.shape)}")
        return lead_mask.to(torch.bool)

    def _all_present(self, x: torch.Tensor, lead_mask: torch.Tensor | None) -> bool:
        if lead_mask is None:
            return True
        lead_mask = self._check_mask(lead_mask)
        if lead_mask.shape[0] != x.shape[0]:
            raise ValueError(f"lead_mask has {lead_mask.shape[0]} rows for a batch of {x.shape[0]}")
        return bool(lead_mask.all())

    def embed_lead_tokens(self, x: torch.Tensor, leads: torch.Tensor) -> torch.Tensor:
        """Input tokens of the present ``leads`` only (every row of ``x`` has this lead set).

        Each present lead keeps its own lead embedding and the usual patch positions; absent leads get no token
        (their samples in ``x`` are never read).

        Args:
            x: ``(B, L, T)`` signal, ``L == num_leads``.
            leads: ``(l,)`` int64 indices of the present leads, ascending.

        Returns:
            ``(B, l * N + 2l, D)``: ``l * N`` patch tokens (lead-major, present leads in order), ``l`` left SEPs,
            ``l`` right SEPs.
        """
        n = self._check_input(x)
        leads = leads.to(device=x.device, dtype=torch.long)
        patches = x.index_select(1, leads).unflatten(-1, (n, self.patch_size))      # (B, l, N, P)
        b, n_leads = patches.shape[:2]
        pos_lead = self.patch_pos_lead(n).view(self.num_leads, n, self.embed_dim).index_select(0, leads)
        tokens = self.patch_embed(patches.reshape(b, n_leads * n, self.patch_size)) \
            + pos_lead.reshape(n_leads * n, self.embed_dim)
        seps = self.sep_tokens(n).view(2, self.num_leads, self.embed_dim).index_select(1, leads)
        seps = seps.reshape(2 * n_leads, self.embed_dim).to(tokens.dtype).expand(b, -1, -1)
        return self.pos_drop(torch.cat([tokens, seps], dim=1))

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    # ------------------------------------------------------------------ contract
    #: ``embed`` / ``forward_features`` take ``lead_mask``: only present leads become tokens.
    accepts_lead_mask = True

    def forward_features(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                         lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x (B, L, T)`` to final-normed tokens ``(B, K + 2L, D)`` (patch tokens first, then SEPs).

        Args:
            x: ``(B, L, T)`` signal, ``L == num_leads`` and ``T`` a multiple of ``patch_size``.
            ids_keep: optional ``(B, K)`` visible patch positions (MAE): only those patches enter the encoder.
            lead_mask: optional ``(B, L)`` bool, false = absent lead. Only present leads become tokens (rows
                sharing a lead set are encoded together), so absent leads cost nothing and their content does not
                matter; the result keeps the full layout ``(B, L*N + 2L, D)`` with zero tokens at absent leads
                (use :meth:`embed` with the same mask to pool over present leads only). ``None`` or all true:
                today's computation, bit for bit. With ``ids_keep`` (every kept patch of a row in one of its
                present leads): the kept patches and the SEP tokens of the present leads are encoded, the output
                is ``(B, K + 2L, D)`` with zero SEP tokens at absent leads (MAE's random lead subsets).
        """
        if self._all_present(x, lead_mask):
            return self._encode(self.embed_tokens(x, ids_keep))
        n = self._check_input(x)
        if ids_keep is not None:
            return self._forward_kept(x, ids_keep, lead_mask.to(x.device), n)
        out = x.new_zeros(x.shape[0], self.num_leads * (n + 2), self.embed_dim)
        for rows, leads in self.lead_groups(lead_mask.to(x.device)):
            tok = self._encode(self.embed_lead_tokens(x.index_select(0, rows), leads))
            l, r = len(leads), rows[:, None]
            grid = out[:, : self.num_leads * n].view(-1, self.num_leads, n, self.embed_dim)
            grid[r, leads] = tok[:, : l * n].reshape(len(rows), l, n, self.embed_dim).to(out.dtype)
            seps = out[:, self.num_leads * n:].view(-1, 2, self.num_leads, self.embed_dim)
            seps[r, :, leads] = tok[:, l * n:].reshape(len(rows), 2, l, self.embed_dim).transpose(1, 2) \
                .to(out.dtype)
        return out

    def _forward_kept(self, x: torch.Tensor, ids_keep: torch.Tensor, lead_mask: torch.Tensor, n: int
                      ) -> torch.Tensor:
        """:meth:`forward_features` with ``ids_keep`` and a partial ``lead_mask`` (rows bucketed by lead set)."""
        tokens = self.embed_tokens(x, ids_keep)                                       # (B, K + 2L, D)
        k = ids_keep.shape[1]
        present = self._check_mask(lead_mask)
        if not torch.gather(present, 1, ids_keep // n).all():
            raise ValueError("forward_features: ids_keep holds patches of leads that lead_mask marks absent")
        out = torch.zeros_like(tokens)
        for rows, leads in self.lead_groups(present):
            sel = torch.cat([torch.arange(k, device=x.device), k + leads, k + self.num_leads + leads])
            out[rows[:, None], sel] = self._encode(tokens[rows][:, sel]).to(out.dtype)
        return out

    def num_patch_tokens(self, tokens: torch.Tensor) -> int:
        """Number of patch tokens ``K`` at the front of a ``(B, K + 2L, D)`` token tensor."""
        return tokens.shape[1] - 2 * self.num_leads

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over the patch tokens (SEP tokens excluded): ``(B, K + 2L, D) -> (B, D)``."""
        return tokens[:, : self.num_patch_tokens(tokens)].mean(dim=1)

    def embed(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embedding ``(B, D)``: mean of the patch tokens of :meth:`forward_features`.

        Args:
            x: ``(B, L, T)`` signal.
            lead_mask: optional ``(B, L)`` bool, false = absent lead: only present leads become tokens and the
                mean runs over their patch tokens only; rows sharing a lead set are encoded together, so a batch
                of one-lead windows costs about 1/12 of a 12-lead one (and less in attention). ``None`` or all
                true: today's computation, bit for bit.
        """
        if self._all_present(x, lead_mask):
            return self.pool(self.forward_features(x))
        out = x.new_empty(x.shape[0], self.embed_dim)
        for rows, leads in self.lead_groups(lead_mask.to(x.device)):
            tok = self._encode(self.embed_lead_tokens(x.index_select(0, rows), leads))
            out[rows] = tok[:, : tok.shape[1] - 2 * len(leads)].mean(dim=1).to(out.dtype)
        return out

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a CNN-like feature map: ``(B, L*N + 2L, D) -> (B, D, L, N)``.

        Only valid for full (unmasked) token sequences from :meth:`forward_features`.
        """
        k = self.num_patch_tokens(tokens)
        if tokens.ndim != 3 or k <= 0 or k % self.num_leads:
            raise ValueError(f"tokens_to_grid expects the full token sequence (B, L*N + 2L, D) with "
                             f"L={self.num_leads}, got shape {tuple(tokens.shape)}")
        b, _, d = tokens.shape
        return tokens[:, :k].reshape(b, self.num_leads, k // self.num_leads, d).permute(0, 3, 1, 2)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every block, computed explicitly (for attention rollout).

        The fused attention kernel never materialises the probabilities, so they are recomputed here from each
        block's ``qkv`` projection on the block input; the forward pass itself is unchanged. The maps stay in the
        autograd graph (for gradient-weighted rollout); call under ``torch.no_grad()`` when that is not needed.

        Args:
            x: ``(B, L, T)`` signal.

        Returns:
            ``depth`` tensors ``(B, heads, N_tok, N_tok)``, rows summing to 1, token layout as
            :meth:`forward_features`.
        """
        return block_attention_maps(self.blocks, self.embed_tokens(x))

    def extra_repr(self) -> str:
        return (f"seq_len={self.seq_len}, patch_size={self.patch_size}, num_leads={self.num_leads}, "
                f"embed_dim={self.embed_dim}, depth={self.depth}, num_heads={self.num_heads}")


# name -> (embed_dim, depth, num_heads); every other argument may be overridden when creating the backbone.
VIT_SIZES: dict[str, dict[str, Any]] = {
    # a few thousand parameters: for tests only
    "vit1d_test": dict(seq_len=250, patch_size=25, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0),
    "vit1d_tiny": dict(embed_dim=192, depth=6, num_heads=3),
    "vit1d_small": dict(embed_dim=384, depth=12, num_heads=6),   # ST-MEM ViT-S
    "vit1d_base": dict(embed_dim=768, depth=12, num_heads=12),   # ST-MEM ViT-B
}


register_sizes(ViT1D, VIT_SIZES)
