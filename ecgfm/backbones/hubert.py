"""HuBERT over ECGs (HuBERT-ECG), as a native ecgfm backbone that loads Hugging Face ``HubertModel`` weights.

Hsu et al. 2021, "HuBERT: Self-Supervised Speech Representation Learning by Masked Prediction of Hidden Units";
Coppola et al. 2024, "HuBERT-ECG as a self-supervised foundation model for broad and scalable cardiac
applications" (code Edoar-do/HuBERT-ECG, weights Edoardo-BS/hubert-ecg-* on Hugging Face, CC BY-NC 4.0).
HuBERT-ECG feeds the 12 leads of a 5 s, 100 Hz window one after the other as a single 1-D sequence (12 x 500
samples) into the speech model unchanged:

1. feature encoder: a stack of 1-D convolutions (GELU) from 1 channel to ``conv_dim[-1]`` with total stride
   ``prod(conv_stride)``; the first layer has a GroupNorm with one group per channel (``feat_extract_norm="group"``)
   or every layer a LayerNorm over channels (``"layer"``);
2. feature projection: (LayerNorm) -> Linear to ``hidden_size``;
3. convolutional relative position embedding: a grouped convolution of width ``num_conv_pos_embeddings`` (its
   weight stored weight-normalised over the kernel axis), "same" length, GELU, added to the frames;
4. transformer: post-norm layers (LayerNorm after the encoder's input and after each residual) or, with
   ``do_stable_layer_norm``, pre-norm layers and one LayerNorm at the end.

The embedding is the mean over the frames of the last layer (HuBERT-ECG's classification pooling). The
convolution weight of the position embedding is kept as its two weight-norm factors (``pos_conv_g``,
``pos_conv_v``) and recombined in the forward pass, as Hugging Face does, so fine-tuning trains the same
parameters. Masked-frame embedding and the pretraining heads are not part of the encoder.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ecgfm.backbones.registry import Backbone, register_backbone
from ecgfm.backbones.stmem import lead_indices, select_leads

__all__ = ["HubertECG"]

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
         "swish": nn.SiLU}


class ConvFeatureLayer(nn.Module):
    """Conv1d -> (GroupNorm | LayerNorm over channels | nothing) -> activation: ``(B, C_in, T) -> (B, C, T')``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str, act: str):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.norm_kind = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(c_out, c_out, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out)
        self.act = _ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_kind == "group":
            x = self.layer_norm(x)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.act(x)


class HubertLayer(nn.Module):
    """One transformer layer: self-attention and a GELU MLP, post-norm (BERT) or pre-norm (``stable``)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float, stable: bool, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_attention_heads ({heads})")
        self.heads, self.stable = heads, stable
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.act = _ACTS[act]()
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout.p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:
            x = x + self.dropout(self.attention(self.layer_norm(x)))
            return x + self.mlp(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x)))
        return self.final_layer_norm(x + self.mlp(x))


class HubertECG(Backbone):
    """HuBERT encoder over ``(B, leads, samples)`` ECGs, the leads concatenated into one sequence (HuBERT-ECG).

    Argument names follow Hugging Face's ``HubertConfig``.

    Args:
        conv_dim, conv_kernel, conv_stride: channels, widths and strides of the feature-encoder convolutions.
        conv_bias: bias in those convolutions.
        feat_extract_norm: ``group`` (GroupNorm in the first layer) or ``layer`` (LayerNorm in every layer).
        feat_extract_activation: activation of the feature encoder and the position convolution.
        feat_proj_layer_norm: LayerNorm before the feature projection.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer sizes.
        hidden_act: MLP activation.
        num_conv_pos_embeddings, num_conv_pos_embedding_groups: width and groups of the position convolution.
        do_stable_layer_norm: pre-norm layers with a final LayerNorm (else post-norm with an input LayerNorm).
        layer_norm_eps: LayerNorm epsilon of the transformer and the feature projection.
        dropout: dropout in the transformer (training only).
        input_leads: canonical lead names read, in this order, from a canonical 12-lead input (None: all rows).
    """

    def __init__(self, conv_dim: Sequence[int] = (512,) * 7, conv_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2),
                 conv_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2), conv_bias: bool = False,
                 feat_extract_norm: str = "group", feat_extract_activation: str = "gelu",
                 feat_proj_layer_norm: bool = True, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, hidden_act: str = "gelu",
                 num_conv_pos_embeddings: int = 128, num_conv_pos_embedding_groups: int = 16,
                 do_stable_layer_norm: bool = False, layer_norm_eps: float = 1e-5, dropout: float = 0.0,
                 input_leads: Sequence[str] | None = None):
        super().__init__()
        conv_dim, conv_kernel, conv_stride = list(conv_dim), list(conv_kernel), list(conv_stride)
        if not conv_dim or not len(conv_dim) == len(conv_kernel) == len(conv_stride):
            raise ValueError(f"conv_dim, conv_kernel and conv_stride must have the same non-zero length, got "
                             f"{conv_dim}, {conv_kernel}, {conv_stride}")
        if feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {feat_extract_norm!r}")
        for act in (feat_extract_activation, hidden_act):
            if act not in _ACTS:
                raise ValueError(f"unsupported activation {act!r}; supported: {sorted(_ACTS)}")
        self._lead_idx = lead_indices(input_leads)
        self.num_features = hidden_size
        self.conv_kernel, self.conv_stride = conv_kernel, conv_stride
        norms = ["group" if i == 0 else "none" for i in range(len(conv_dim))] if feat_extract_norm == "group" \
            else ["layer"] * len(conv_dim)
        self.feature_extractor = nn.ModuleList(
            ConvFeatureLayer(1 if i == 0 else conv_dim[i - 1], conv_dim[i], conv_kernel[i], conv_stride[i], conv_bias,
                             norms[i], feat_extract_activation) for i in range(len(conv_dim)))
        self.feat_proj_norm = nn.LayerNorm(conv_dim[-1], eps=layer_norm_eps) if feat_proj_layer_norm else None
        self.feat_proj = nn.Linear(conv_dim[-1], hidden_size)
        k, g = num_conv_pos_embeddings, num_conv_pos_embedding_groups
        if hidden_size % g:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_conv_pos_embedding_groups ({g})")
        self.pos_conv_groups = g
        self.pos_conv_v = nn.Parameter(torch.randn(hidden_size, hidden_size // g, k) * 0.02)
        self.pos_conv_g = nn.Parameter(torch.ones(1, 1, k))
        self.pos_conv_bias = nn.Parameter(torch.zeros(hidden_size))
        self.pos_act = _ACTS[feat_extract_activation]()
        self.stable = do_stable_layer_norm
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            HubertLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
                        do_stable_layer_norm, dropout) for _ in range(num_hidden_layers))

    def layer_id(self, name: str) -> int:
        """Layer id for layer-wise lr decay (:meth:`Backbone.layer_id`): the feature encoder and position
        embedding 0, block ``i`` ``i + 1``; the shared ``layer_norm`` is where it runs: on the input (0) post-norm,
        after the last block with ``do_stable_layer_norm``: ``depth + 1`` = :attr:`num_layer_ids`, the head's level,
        as a ViT's final norm (MAE / BEiT)."""
        if self.stable and name.startswith("layer_norm."):
            return len(self.blocks) + 1
        return super().layer_id(name)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay beyond norms / biases / 1-D ones (timm convention, read by
        :func:`ecgfm.optim.param_groups`): the weight-norm gain ``pos_conv_g`` is ``(1, 1, k)``, so the 1-D rule
        misses it, and decaying a weight-norm gain shrinks the effective position kernel rather than regularising
        its direction."""
        return {"pos_conv_g"}

    def num_frames(self, samples: int) -> int:
        """Frames the feature encoder makes of ``samples`` input samples."""
        for k, s in zip(self.conv_kernel, self.conv_stride):
            samples = (samples - k) // s + 1
        return samples

    def position_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional relative position embedding of frames ``(B, N, D) -> (B, N, D)``."""
        weight = torch._weight_norm(self.pos_conv_v, self.pos_conv_g, 2)  # g * v / ||v|| per kernel position
        k = weight.shape[-1]
        out = F.conv1d(x.transpose(1, 2), weight, self.pos_conv_bias, padding=k // 2, groups=self.pos_conv_groups)
        if k % 2 == 0:  # an even kernel with padding k // 2 makes one frame too many: drop the last
            out = out[..., :-1]
        return self.pos_act(out).transpose(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Frames of the last layer: ``(B, L, T) -> (B, N, D)`` with the ``L`` leads concatenated (``L * T``
        samples) before the feature encoder."""
        x = select_leads(x, self._lead_idx, "HubertECG")
        if self.num_frames(x.shape[1] * x.shape[2]) < 1:
            raise ValueError(f"input of {x.shape[1]} x {x.shape[2]} samples is shorter than the feature encoder's "
                             f"receptive field")
        h = x.reshape(x.shape[0], 1, -1)                                  # (B, 1, L*T)
        for layer in self.feature_extractor:
            h = layer(h)                                                  # (B, C, N)
        h = h.transpose(1, 2)                                             # (B, N, C)
        if self.feat_proj_norm is not None:
            h = self.feat_proj_norm(h)
        h = self.feat_proj(h)                                             # (B, N, D)
        h = h + self.position_embedding(h)
        if not self.stable:
            h = self.layer_norm(h)
        h = self.dropout(h)
        for blk in self.blocks:
            h = blk(h)
        return self.layer_norm(h) if self.stable else h

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over frames of the last layer: ``(B, L, T) -> (B, hidden_size)``."""
        return self.forward_features(x).mean(dim=1)


# Registered name "hubert_ecg". Its factory defaults are a tiny model (for the registry-wide tests); an imported
# encoder stores every constructor argument.
_TEST_DEFAULTS: dict[str, Any] = dict(conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), hidden_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


@register_backbone("hubert_ecg")
def hubert_ecg(**kwargs: Any) -> HubertECG:
    """HuBERT-ECG; give every size argument, the defaults are a tiny test model."""
    return HubertECG(**{**_TEST_DEFAULTS, **kwargs})
