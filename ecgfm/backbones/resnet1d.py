"""xresnet1d: the 1-D XResNet of the PTB-XL benchmark (Strodthoff et al. 2020).

Strodthoff, Wagner, Schaeffter, Samek 2020, "Deep learning for ECG analysis: benchmarks and insights from PTB-XL"
(IEEE JBHI): fastai's XResNet (He et al. 2019, "Bag of tricks") with every 2-D operation made 1-D and kernel size 5.
Structure (as fastai ``XResNet``):

* stem: three ``conv-BN-ReLU`` layers (widths ``stem_widths``, the first with stride 2), then max-pool (3, stride 2);
* four (or more) stages of residual blocks; the first block of every stage but the first has stride 2;
  block = bottleneck ``1 -> k -> 1`` convs (``expansion=4``) or basic ``k -> k`` convs (``expansion=1``);
  the last BatchNorm of each residual branch starts at zero; the shortcut is ``AvgPool(2)`` when strided and a
  ``1x1 conv-BN`` when the width changes (the "ResNet-D" shortcut);
* pooled embedding: ``concat(adaptive average, adaptive max)`` over time (fastai ``AdaptiveConcatPool1d``, the
  pooling of the PTB-XL baseline head), so ``num_features = 2 * channels``; ``pool="avg"`` gives average pooling
  only (``num_features = channels``).

torchvision and timm only provide 2-D ResNets, so the 1-D network is written here (about 100 lines).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ecgfm.backbones.registry import Backbone, register_sizes

__all__ = ["XResNet1d", "RESNET_SIZES"]


def _conv_bn(c_in: int, c_out: int, ks: int, stride: int = 1, act: bool = True, zero_bn: bool = False) -> nn.Sequential:
    """``Conv1d(padding=ks//2, no bias) -> BatchNorm1d [-> ReLU]``; ``zero_bn`` starts the BN scale at 0."""
    bn = nn.BatchNorm1d(c_out)
    nn.init.constant_(bn.weight, 0.0 if zero_bn else 1.0)
    layers: list[nn.Module] = [nn.Conv1d(c_in, c_out, ks, stride=stride, padding=ks // 2, bias=False), bn]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock1d(nn.Module):
    """XResNet residual block (bottleneck when ``expansion > 1``).

    Args:
        expansion: 1 (basic block) or 4 (bottleneck).
        c_in: input width / expansion (as fastai ``ni``).
        width: hidden width (``nf``); output channels ``width * expansion``.
        stride: temporal stride of the block.
        ks: kernel size of the ``k``-convs.
    """

    def __init__(self, expansion: int, c_in: int, width: int, stride: int = 1, ks: int = 5):
        super().__init__()
        n_in, n_out = c_in * expansion, width * expansion
        if expansion == 1:
            self.convs = nn.Sequential(_conv_bn(n_in, width, ks, stride=stride),
                                       _conv_bn(width, n_out, ks, act=False, zero_bn=True))
        else:
            self.convs = nn.Sequential(_conv_bn(n_in, width, 1),
                                       _conv_bn(width, width, ks, stride=stride),
                                       _conv_bn(width, n_out, 1, act=False, zero_bn=True))
        self.idpool = nn.AvgPool1d(2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.idconv = _conv_bn(n_in, n_out, 1, act=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c_in * expansion, T) -> (B, width * expansion, ceil(T / stride))``."""
        return self.act(self.convs(x) + self.idconv(self.idpool(x)))


class XResNet1d(Backbone):
    """1-D XResNet over ``(B, leads, samples)``.

    Args:
        layers: residual blocks per stage, e.g. ``(3, 4, 6, 3)`` for xresnet1d50.
        expansion: 4 for bottleneck blocks (50 / 101), 1 for basic blocks.
        widths: hidden width of each stage (length ``len(layers)``); outputs ``widths[-1] * expansion`` channels.
            The PTB-XL benchmark code uses 64 in every stage (not fastai's 64-128-256-512), which is the default.
        stem_widths: widths of the three stem convolutions.
        kernel_size: kernel size in the residual blocks (5 in the 1-D version).
        kernel_size_stem: kernel size in the stem.
        num_leads: input leads (input must have exactly this many).
        pool: ``"concat"`` (average and max pooling concatenated, the PTB-XL baseline) or ``"avg"``.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), expansion: int = 4,
                 widths: Sequence[int] = (64, 64, 64, 64), stem_widths: Sequence[int] = (32, 32, 64),
                 kernel_size: int = 5, kernel_size_stem: int = 5, num_leads: int = 12, pool: str = "concat"):
        super().__init__()
        layers, widths, stem_widths = list(layers), list(widths), list(stem_widths)
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {layers} and widths {widths} must be non-empty and of the same length")
        if pool not in ("concat", "avg"):
            raise ValueError(f"pool must be 'concat' or 'avg', got {pool!r}")
        if expansion not in (1, 4):
            raise ValueError(f"expansion must be 1 or 4, got {expansion}")
        if stem_widths[-1] % expansion:
            raise ValueError(f"stem_widths[-1]={stem_widths[-1]} must be divisible by expansion={expansion}")
        if len(stem_widths) != 3:
            raise ValueError(f"stem_widths must have 3 entries, got {stem_widths}")
        self.num_leads = num_leads
        self.pool_mode = pool
        chans = [num_leads] + stem_widths
        self.stem = nn.Sequential(
            *[_conv_bn(chans[i], chans[i + 1], kernel_size_stem, stride=2 if i == 0 else 1) for i in range(3)],
            nn.MaxPool1d(kernel_size=3, stride=2, padding=1),
        )
        # fastai: the first stage takes stem_widths[-1] channels = (64 // expansion) * expansion
        c_in = stem_widths[-1] // expansion
        stages = []
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResBlock1d(expansion, c_in if j == 0 else width, width, stride=stride, ks=kernel_size))
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.num_channels = widths[-1] * expansion
        self.num_features = self.num_channels * (2 if pool == "concat" else 1)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3:
            raise ValueError(f"XResNet1d expects input (batch, leads, samples), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_leads:
            raise ValueError(f"XResNet1d was built for {self.num_leads} leads, got input with {x.shape[1]} leads "
                             f"(shape {tuple(x.shape)})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(B, L, T) -> (B, C, T')`` with ``T' ~ T / 32`` and ``C = widths[-1] * expansion``."""
        self._check_input(x)
        return self.stages(self.stem(x))

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, T') -> (B, num_features)``: concat(avg, max) or avg over time."""
        avg = feats.mean(dim=-1)
        if self.pool_mode == "avg":
            return avg
        return torch.cat([avg, feats.amax(dim=-1)], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, num_features)``."""
        return self.pool(self.forward_features(x))

    def embed_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Every stage's feature map pooled as :meth:`pool` pools the last, concatenated (earliest first):
        ``(B, L, T) -> (B, sum_i widths[i] * expansion * (2 if pool == "concat" else 1))``; its last block is
        :meth:`embed`. Earlier stages keep finer time and wave-shape detail that the last stage's pooling averages
        away: the multi-scale features of a frozen-encoder probe (``probe.layers=stages``)."""
        self._check_input(x)
        h = self.stem(x)
        pooled = []
        for stage in self.stages:
            h = stage(h)
            pooled.append(self.pool(h))
        return torch.cat(pooled, dim=1)


RESNET_SIZES: dict[str, dict[str, Any]] = {
    # a few thousand parameters: for tests only
    "resnet1d_test": dict(layers=(1, 1), expansion=1, widths=(8, 16), stem_widths=(8, 8, 8)),
    "resnet1d_tiny": dict(layers=(1, 1, 1, 1), expansion=1, widths=(32, 64, 128, 256), stem_widths=(32, 32, 32)),
    "xresnet1d50": dict(layers=(3, 4, 6, 3), expansion=4),
    "xresnet1d101": dict(layers=(3, 4, 23, 3), expansion=4),
}


register_sizes(XResNet1d, RESNET_SIZES)
