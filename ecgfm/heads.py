"""Heads put on top of a backbone embedding ``(B, D)``: projection heads for contrastive pretraining and probe /
classification heads for downstream evaluation."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ProjectionHead", "LinearProbeHead", "MLPHead"]


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
