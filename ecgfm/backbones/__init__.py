"""Backbones behind one contract; see :mod:`ecgfm.backbones.registry`."""

from ecgfm.backbones.registry import Backbone, create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "create_backbone", "list_backbones", "register_backbone"]
