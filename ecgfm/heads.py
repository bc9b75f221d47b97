"""Heads put on top of a backbone embedding ``(B, D)``: projection heads for contrastive pretraining and probe /
classification heads for downstream evaluation; :class:`AttentionPoolingHead` pools a record's frozen tokens
``(B, T, D)`` itself (the attentive probe)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ProjectionHead", "LinearProbeHead", "MLPHead", "AttentionPoolingHead"]


class ProjectionHead(nn.Module):
    """SimCLR-style projection MLP ``in_dim -> hidden_dim (-> hidden_dim ...) -> out_dim``.

    Hidden layers are ``Linear -> BatchNorm1d -> ReLU`` (``batch_norm=True``, as in SimCLR v2 / lightly) or
    ``Linear -> ReLU``; the last layer is a ``Linear``, followed by a non-affine BatchNorm when ``batch_norm`` and
    ``final_batch_norm`` (as MoCo v3's projector). A ``Linear`` directly followed by a BatchNorm has no bias (the
    BatchNorm subtracts it again, so it would only be a parameter without gradient); the last ``Linear`` has a
    bias when no BatchNorm follows it.

    Args:
        in_dim: embedding size ``D`` of the backbone.
        hidden_dim: width of the hidden layers.
        out_dim: projection size.
        num_layers: number of linear layers (``>= 1``; 1 = a single linear map).
        batch_norm: use BatchNorm in the head.
        final_batch_norm: with ``batch_norm``, also normalise the output (non-affine BatchNorm after the last
            ``Linear``); ``False`` gives SimCLR v1's ``Linear -> BN -> ReLU -> Linear``. Ignored without
            ``batch_norm``.

    Shapes:
        ``(B, in_dim) -> (B, out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, final_batch_norm: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"dimensions must be positive, got {in_dim}, {hidden_dim}, {out_dim}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        final_bn = batch_norm and final_batch_norm
        layers.append(nn.Linear(dim, out_dim, bias=not final_bn))
        if final_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x (B, in_dim) -> (B, out_dim)``."""
        return self.net(x)


class LinearProbeHead(nn.Module):
    """Linear classifier for linear evaluation: ``BatchNorm1d(affine=False) -> Linear``.

    The non-affine BatchNorm standardises the frozen features, which makes one learning rate work across
    backbones (MAE's ``main_linprobe.py``); at inference it is a fixed affine map, so the head stays linear.

    Args:
        in_dim: embedding size ``D``.
        num_classes: number of outputs ``C`` (logits).
        batch_norm: put the non-affine BatchNorm in front.

    Shapes:
        ``(B, in_dim) -> (B, num_classes)``.
    """

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"in_dim and num_classes must be positive, got {in_dim}, {num_classes}")
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)  # as MAE's linear probe
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


class MLPHead(nn.Module):
    """Small MLP classifier ``in_dim -> hidden_dim x (num_layers - 1) -> num_classes`` with dropout.

    Hidden layers are ``Linear -> BatchNorm1d (optional) -> ReLU -> Dropout``.

    Args:
        in_dim: embedding size ``D``.
        num_classes: number of outputs (logits).
        hidden_dim: width of the hidden layers.
        num_layers: number of linear layers (``>= 1``).
        dropout: dropout probability after each hidden layer.
        batch_norm: BatchNorm in the hidden layers.

    Shapes:
        ``(B, in_dim) -> (B, num_classes)``.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, num_layers: int = 2,
                 dropout: float = 0.1, batch_norm: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AttentionPoolingHead(nn.Module):
    """Attentive probe: learnable queries cross-attend to all frozen tokens of a record, then LayerNorm + linear.

    ``tokens -> LayerNorm(D) -> MultiheadAttention(queries, tokens, tokens, key_padding_mask) -> LayerNorm(D) per
    query -> flatten -> Linear(Q * D, C)``. The tokens of a record are those of *all* its windows (concatenated),
    so the head can weigh windows and patches differently and see across-window variability, which a mean
    embedding discards. As in the linear / attentive probing protocols of frozen-encoder benchmarks (V-JEPA's
    attentive probe; Psomas et al. 2025, "Attention, please! Revisiting attentive probing"), the encoder stays
    frozen and only this head trains. Records of different length share a batch through padding and
    ``key_padding_mask``.

    Memory of the frozen input (:func:`ecgfm.evaluate.features.cached_tokens`, float16): records x windows per
    record x tokens per window x ``D`` x 2 bytes; a batch in the head is ``B x T_max x D`` float32.

    Args:
        in_dim: token width ``D``.
        num_classes: number of outputs ``C`` (logits).
        num_queries: learnable queries ``Q`` (their outputs are concatenated).
        num_heads: attention heads (must divide ``in_dim``).
        dropout: dropout on the attention probabilities.

    Shapes:
        ``tokens (B, T, D)``, ``key_padding_mask (B, T)`` bool (True = padding, ignored) ``-> (B, num_classes)``.
    """

    def __init__(self, in_dim: int, num_classes: int, num_queries: int = 1, num_heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1 or num_queries < 1 or num_heads < 1:
            raise ValueError(f"in_dim, num_classes, num_queries and num_heads must be positive, got {in_dim}, "
                             f"{num_classes}, {num_queries}, {num_heads}")
        if in_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the token width {in_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_queries = num_queries
        self.norm_in = nn.LayerNorm(in_dim)
        self.query = nn.Parameter(torch.zeros(1, num_queries, in_dim))
        self.attn = nn.MultiheadAttention(in_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(num_queries * in_dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay beyond norms / biases (timm convention, read by
        :func:`ecgfm.optim.param_groups`): the learnable queries, a token like ViT's ``cls_token``."""
        return {"query"}

    def pool(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attention-pooled, normed record representation ``(B, T, D) -> (B, Q, D)``."""
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be (batch, tokens, dim), got shape {tuple(tokens.shape)}")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(tokens.shape[:2]):
                # a float / int mask is *added* to the attention scores by nn.MultiheadAttention: a 0/1 mask would
                # give padding more weight instead of none
                raise ValueError(f"key_padding_mask must be bool (True = padding) of shape {tuple(tokens.shape[:2])}"
                                 f", got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            if bool(key_padding_mask.all(dim=1).any()):
                raise ValueError("a row of key_padding_mask masks every token: each record needs at least one token")
        kv = self.norm_in(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        return self.norm(out)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes)`` of records given as ``tokens (B, T, D)`` (+ ``key_padding_mask (B, T)``)."""
        return self.linear(self.pool(tokens, key_padding_mask).flatten(1))
