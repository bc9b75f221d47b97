"""Backbone registry and contract.

Every backbone takes ``(batch, leads, samples)`` and provides:

* ``forward_features(x)`` -> tokens ``(B, N, D)`` (transformers) or feature maps ``(B, C, T')`` (CNNs);
* ``embed(x)`` -> pooled embedding ``(B, num_features)``; ``forward(x)`` is ``embed(x)``;
* optionally ``embed(x, lead_mask=None)`` with ``lead_mask (B, 12)`` bool (false = absent lead) and the class
  attribute ``accepts_lead_mask = True`` (:class:`~ecgfm.backbones.vit1d.ViT1D`): absent leads then cost nothing
  and do not enter the pooled embedding; without a mask (or with every lead present) the result is the plain one.
  Frozen-feature extraction passes each record's mask to such backbones (:mod:`ecgfm.evaluate.features`);
* ``num_features`` (int), ``name`` (registry name) and ``init_args`` (JSON-able constructor arguments),
  so that an exported encoder is rebuilt with ``create_backbone(name, **init_args)`` and no pickling.

``init_args`` holds *every* constructor argument, resolved: the size defaults of the registered factory and the
constructor's own defaults merged with the keyword arguments given to :func:`create_backbone`. An exported encoder
or a checkpoint therefore describes its architecture completely and does not depend on the registry's defaults
staying the same (a description holding only some arguments, as written by older versions, still works: the
missing ones come from the registry's current defaults).

Only names registered here can be instantiated from a checkpoint or an exported JSON.

Registration (timm's pattern): each model module calls :func:`register_backbone` (or :func:`register_sizes` for a
table of named sizes) when it is imported, and the package ``ecgfm/backbones/__init__.py`` imports the built-in
model modules. Python always runs a package's ``__init__`` before any of its submodules, so importing this module
(by any path) registers every built-in family, while this module imports nothing from the models it lists (no
import circle). A new built-in family is one line in ``ecgfm/backbones/__init__.py``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], skip_first: bool = False
          ) -> dict[str, Any] | None:
    """Keyword arguments of the call ``fn(*args, **kwargs)`` with ``fn``'s defaults filled in.

    ``skip_first`` drops the first parameter (``self`` of an unbound ``__init__``). Returns ``None`` when the call
    cannot be written as keyword arguments only (it does not bind, or extra positional arguments go to ``*args``).
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    params = list(sig.parameters.values())
    if skip_first:
        params = params[1:]
    sig = sig.replace(parameters=params)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY:
            return None
        else:
            out[name] = value
    return out


class Backbone(nn.Module):
    """Base class for ecgfm backbones (see module docstring for the contract)."""

    name: str = ""
    num_features: int = 0
    init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Backbone":
        # Record the complete constructor call (every argument, defaults filled in) before __init__ runs, so that
        # create_backbone can store it as ``init_args`` whatever defaults a registry factory added. Done here
        # rather than in each subclass's __init__ so every family gets it without code of its own.
        obj = super().__new__(cls)
        object.__setattr__(obj, "_constructor_args", _bind(cls.__init__, args, kwargs, skip_first=True))
        return obj

    def forward_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        return self.embed(x)

    # ------------------------------------------------------------------ layer ids (layer-wise lr decay)
    # Two layouts are recognised by attribute, so every family gets layer ids without code of its own (override
    # both members for another layout). The rule is MAE's / BEiT's (``param_groups_lrd``: ``num_layers =
    # len(blocks) + 1``). Transformer: ``blocks`` (nn.ModuleList): embeddings and tokens are layer 0, block i is
    # layer i + 1, the final ``norm*`` is layer ``len(blocks) + 1`` = ``num_layer_ids``: the head's level (lr scale
    # 1), so the last block is one decay step below the head. CNN: ``stages`` (nn.Sequential): the stem and anything
    # else before the stages is layer 0, stage i is layer i + 1, anything after the stages is the head's level
    # ``len(stages) + 1`` ("per-stage" decay). Otherwise the backbone is a single layer 0.
    @property
    def num_layer_ids(self) -> int:
        """The layer id of the head (:func:`ecgfm.optim.layer_of`), MAE's ``num_layers``: ``len(blocks) + 1`` /
        ``len(stages) + 1``, 1 for a single-layer backbone. ``layer_id`` is in ``[0, num_layer_ids]``: block /
        stage ``i`` is ``i + 1``, so the last block / stage is one decay step below the head, and what runs after
        them (a ViT's final norm) shares the head's level, as in MAE / BEiT fine-tuning."""
        blocks, stages = getattr(self, "blocks", None), getattr(self, "stages", None)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks) + 1
        if isinstance(stages, nn.Sequential):
            return len(stages) + 1
        return 1

    def layer_id(self, name: str) -> int:
        """Layer id of the parameter called ``name`` (as in ``self.named_parameters()``), 0 on the input side, at
        most :attr:`num_layer_ids` (the head's level, which a final norm shares).

        Used by :func:`ecgfm.optim.param_groups` for layer-wise learning-rate decay (BEiT / MAE fine-tuning).
        """
        blocks, stages = getattr(self, "blocks", None), getattr(self, "stages", None)
        if isinstance(blocks, nn.ModuleList):
            m = re.match(r"blocks\.(\d+)\.", name)
            return int(m.group(1)) + 1 if m else (len(blocks) + 1 if name.startswith("norm") else 0)
        if isinstance(stages, nn.Sequential):
            m = re.match(r"stages\.(\d+)\.", name)
            return int(m.group(1)) + 1 if m else (0 if name.startswith("stem") else len(stages) + 1)
        return 0


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``f(**kwargs) -> Backbone`` under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def register_sizes(cls: type[nn.Module], sizes: dict[str, dict[str, Any]]) -> None:
    """Register one factory per named size of a family: ``name -> cls(**{**sizes[name], **kwargs})``.

    The factories read ``sizes[name]`` when called (a later change of the table reaches new models; exported ones
    keep their recorded ``init_args``), and their return annotation is ``cls`` (config checks read the constructor
    from it).

    Args:
        cls: the backbone class.
        sizes: registered name -> constructor defaults of that size.
    """
    for name, defaults in sizes.items():
        register_backbone(name)(_size_factory(cls, name, defaults))


def _size_factory(cls: type[nn.Module], name: str, defaults: dict[str, Any]) -> Callable[..., nn.Module]:
    def factory(**kwargs: Any) -> nn.Module:
        return cls(**{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name}: {cls.__name__} with defaults {defaults or 'of the class'}."
    factory.__annotations__ = {"kwargs": Any, "return": cls}
    return factory


def list_backbones() -> list[str]:
    """Registered names (the built-in families register when :mod:`ecgfm.backbones` is imported)."""
    return sorted(_REGISTRY)


def resolved_init_args(name: str, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Complete keyword arguments that rebuild ``model`` (made by ``factory(**kwargs)``) through the registry.

    The constructor call recorded by :class:`Backbone` is used when the factory passed the given ``kwargs``
    through unchanged (the built-in factories do: ``Class(**{**size_defaults, **kwargs})``); otherwise (or for a
    model that is not a :class:`Backbone`) the factory's own signature with its defaults; failing both, ``kwargs``.
    """
    ctor = getattr(model, "_constructor_args", None)
    if ctor is not None and all(k in ctor and ctor[k] is v for k, v in kwargs.items()):
        return dict(ctor)
    bound = _bind(_REGISTRY[name], (), kwargs)
    return dict(kwargs) if bound is None else bound


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; the result records ``name`` and its complete ``init_args``.

    Args:
        name: a registered name (:func:`list_backbones`).
        **kwargs: constructor arguments overriding the registered size's defaults.

    Returns:
        The backbone, with ``name`` and ``init_args`` (every constructor argument, resolved; see the module
        docstring) set.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**kwargs)
    model.name = name
    model.init_args = resolved_init_args(name, model, kwargs)
    return model
