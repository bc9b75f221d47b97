"""Backbone registry and contract.

Every backbone takes ``(batch, leads, samples)`` and provides:

* ``forward_features(x)`` -> tokens ``(B, N, D)`` (transformers) or feature maps ``(B, C, T')`` (CNNs);
* ``embed(x)`` -> pooled embedding ``(B, num_features)``; ``forward(x)`` is ``embed(x)``;
* ``num_features`` (int), ``name`` (registry name) and ``init_args`` (JSON-able constructor arguments),
  so that an exported encoder is rebuilt with ``create_backbone(name, **init_args)`` and no pickling.

Only names registered here can be instantiated from a checkpoint or an exported JSON.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class Backbone(nn.Module):
    """Base class for ecgfm backbones (see module docstring for the contract)."""

    name: str = ""
    num_features: int = 0
    init_args: dict[str, Any]

    def forward_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        return self.embed(x)


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``f(**kwargs) -> Backbone`` under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _ensure_builtin() -> None:
    # Import the built-in families so their @register_backbone decorators run.
    from ecgfm.backbones import resnet1d, vit1d  # noqa: F401


def list_backbones() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; the result records ``name`` and its ``init_args``."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**kwargs)
    model.name = name
    model.init_args = dict(kwargs)
    return model
