"""Net1D, the CNN of ECGFounder, as a native ecgfm backbone that loads the authors' weights.

Li et al. 2025, "An electrocardiogram foundation model built on over 10 million recordings with external
evaluation across multiple domains" (ECGFounder; code PKUDigitalHealth/ECGFounder, MIT licence); the network is
Hong et al.'s Net1D (2020): a stem convolution (stride 2), then stages of pre-activation bottleneck blocks with
grouped convolutions and squeeze-and-excitation, all convolutions "same"-padded. The first block of every stage
downsamples by ``stride`` (a max-pooled identity) and widens the channels (a zero-padded identity). The embedding is
the mean over time of the last stage, the input of ECGFounder's ``dense`` classification layer (kept apart: see
:mod:`ecgfm.zoo`).

One block (``BN`` only when ``use_bn``; the very first block of the network skips its first BN + activation)::

    x -> BN, Swish -> conv 1x1 (C_in -> C_mid) -> BN, Swish -> conv k, stride s, groups g (C_mid -> C_mid)
      -> BN, Swish -> conv 1x1 (C_mid -> C_out) -> squeeze-excite (r = 2) -> + identity(x)

with ``C_mid = int(C_out * ratio)`` and ``g = C_out // groups_width``. Swish is :class:`torch.nn.SiLU`.
:mod:`ecgfm.zoo` maps a checkpoint onto it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ecgfm.backbones.registry import Backbone, register_backbone
from ecgfm.backbones.stmem import lead_indices, select_leads

__all__ = ["Net1D", "NET1D_SIZES", "Conv1dSame"]


class Conv1dSame(nn.Conv1d):
    """Conv1d with TensorFlow-style "same" padding: ``T -> ceil(T / stride)``, the extra sample on the right.

    Written here because torch's ``padding="same"`` refuses strides above 1 and timm's ``pad_same`` is 2-D only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, s, k = x.shape[-1], self.stride[0], self.kernel_size[0]
        pad = max(0, (-(-t // s) - 1) * s + k - t)
        return super().forward(F.pad(x, (pad // 2, pad - pad // 2)))


class MaxPool1dSame(nn.MaxPool1d):
    """Max pool of ``kernel_size`` (stride = kernel), zero-padded by ``kernel_size - 1`` (right-heavy) first, as
    the identity path of Net1D's downsampling blocks does (zeros, not -inf: the authors' choice, kept exactly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size - 1
        return super().forward(F.pad(x, (p // 2, p - p // 2)))


class SqueezeExcite(nn.Module):
    """Channel gating: mean over time -> Linear(C, C/r) -> Swish -> Linear(C/r, C) -> sigmoid, scaling ``x``.

    Linear layers on the time-mean (not timm's 1x1 convolutions) hold the weights in the authors' layout.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean(-1)))))   # (B, C)
        return x * gate[..., None]


class Net1DBlock(nn.Module):
    """Pre-activation bottleneck block with grouped convolution and squeeze-excite (see module docstring).

    Args:
        in_channels, out_channels: ``C_in``, ``C_out``.
        ratio: bottleneck width ``C_mid = int(C_out * ratio)``.
        kernel_size: width of the grouped convolution.
        stride: its stride (``> 1`` only in the first block of a stage, which also max-pools the identity).
        groups: groups of the grouped convolution.
        first: the network's first block (no BN + activation before its first convolution).
        use_bn: BatchNorm before each activation.
        use_do: dropout (p = 0.5) after each activation.
    """

    def __init__(self, in_channels: int, out_channels: int, ratio: float, kernel_size: int, stride: int,
                 groups: int, downsample: bool, first: bool, use_bn: bool, use_do: bool):
        super().__init__()
        mid = int(out_channels * ratio)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.first, self.downsample = first, downsample
        bn = (lambda c: nn.BatchNorm1d(c)) if use_bn else (lambda c: nn.Identity())
        drop = (lambda: nn.Dropout(0.5)) if use_do else nn.Identity
        self.bn1, self.do1 = bn(in_channels), drop()
        self.conv1 = Conv1dSame(in_channels, mid, 1)
        self.bn2, self.do2 = bn(mid), drop()
        self.conv2 = Conv1dSame(mid, mid, kernel_size, stride=stride if downsample else 1, groups=groups)
        self.bn3, self.do3 = bn(mid), drop()
        self.conv3 = Conv1dSame(mid, out_channels, 1)
        self.se = SqueezeExcite(out_channels)
        self.pool = MaxPool1dSame(stride) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, T) -> (B, C_out, ceil(T / stride))``."""
        out = x if self.first else self.do1(F.silu(self.bn1(x)))
        out = self.conv1(out)
        out = self.conv2(self.do2(F.silu(self.bn2(out))))
        out = self.conv3(self.do3(F.silu(self.bn3(out))))
        out = self.se(out)
        identity = self.pool(x)
        if self.out_channels != self.in_channels:  # widen the identity with zero channels, split evenly
            extra = self.out_channels - self.in_channels
            identity = F.pad(identity, (0, 0, extra // 2, extra - extra // 2))
        return out + identity


class Net1D(Backbone):
    """ECGFounder's Net1D over ``(B, leads, samples)`` ECGs (argument names as in the authors' ``Net1D``).

    Args:
        in_channels: input leads.
        base_filters: channels of the stem convolution.
        ratio: bottleneck ratio of every block.
        filter_list: output channels of each stage.
        m_blocks_list: blocks in each stage.
        kernel_size: kernel width of the stem and of the grouped convolutions.
        stride: downsampling of the first block of every stage (the stem always has stride 2).
        groups_width: channels per group: a stage with ``C`` channels uses ``C // groups_width`` groups.
        use_bn: BatchNorm in the blocks and stem (ECGFounder: False).
        use_do: dropout p = 0.5 in the blocks (ECGFounder: False; training only).
        input_leads: canonical lead names the model reads, in its channel order, from a canonical 12-lead input
            (None: the input's rows are the model's channels).
    """

    def __init__(self, in_channels: int = 12, base_filters: int = 64, ratio: float = 1.0,
                 filter_list: Sequence[int] = (64, 160, 160, 400, 400, 1024, 1024),
                 m_blocks_list: Sequence[int] = (2, 2, 2, 3, 3, 4, 4), kernel_size: int = 16, stride: int = 2,
                 groups_width: int = 16, use_bn: bool = False, use_do: bool = False,
                 input_leads: Sequence[str] | None = None):
        super().__init__()
        filter_list, m_blocks_list = [int(c) for c in filter_list], [int(m) for m in m_blocks_list]
        if not filter_list or len(filter_list) != len(m_blocks_list) or min(m_blocks_list) < 1:
            raise ValueError(f"filter_list and m_blocks_list must be non-empty, of equal length, with at least one "
                             f"block per stage; got {filter_list}, {m_blocks_list}")
        if min(filter_list) < groups_width or groups_width < 1:
            raise ValueError(f"groups_width ({groups_width}) must be positive and at most every stage's width "
                             f"{filter_list}")
        self._lead_idx = lead_indices(input_leads)
        if self._lead_idx is not None and len(self._lead_idx) != in_channels:
            raise ValueError(f"input_leads names {len(self._lead_idx)} leads but in_channels={in_channels}")
        self.in_channels = in_channels
        self.num_features = filter_list[-1]
        self.stem = nn.Sequential(OrderedDict(
            conv=Conv1dSame(in_channels, base_filters, kernel_size, stride=2),
            bn=nn.BatchNorm1d(base_filters) if use_bn else nn.Identity(),
            act=nn.SiLU()))
        stages, c_in = [], base_filters
        for i, (c_out, m) in enumerate(zip(filter_list, m_blocks_list)):
            stages.append(nn.Sequential(*[
                Net1DBlock(c_in if j == 0 else c_out, c_out, ratio, kernel_size, stride, c_out // groups_width,
                           downsample=j == 0, first=i == 0 and j == 0, use_bn=use_bn, use_do=use_do)
                for j in range(m)]))
            c_in = c_out
        self.stages = nn.Sequential(*stages)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of the last stage: ``(B, L_in, T) -> (B, filter_list[-1], T')``."""
        x = select_leads(x, self._lead_idx, "Net1D")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Net1D was built for {self.in_channels} input channels, got input with {x.shape[1]} "
                             f"leads (shape {tuple(x.shape)})")
        return self.stages(self.stem(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over time of the last stage (ECGFounder's features before ``dense``): ``(B, L_in, T) -> (B, C)``."""
        return self.forward_features(x).mean(-1)


# The published ECGFounder configuration (12-lead; the 1-lead model has in_channels=1) and a tiny one for tests.
NET1D_SIZES: dict[str, dict[str, Any]] = {
    "net1d": {},
    "net1d_test": dict(base_filters=8, filter_list=(8, 16), m_blocks_list=(1, 1), kernel_size=5, groups_width=4),
}


def _make_factory(name: str, defaults: dict[str, Any]):
    def factory(**kwargs: Any) -> Net1D:
        return Net1D(**{**defaults, **kwargs})

    factory.__name__ = name
    factory.__doc__ = f"{name}: Net1D with defaults {defaults or 'of the class (ECGFounder)'}."
    return factory


for _name, _defaults in NET1D_SIZES.items():
    register_backbone(_name)(_make_factory(_name, _defaults))
