"""Backbones behind one contract; see :mod:`ecgfm.backbones.registry`.

The built-in families register themselves on import (``@register_backbone`` / ``register_backbone(name)(...)``);
importing them here, after the registry, is what makes every built-in name available wherever
:mod:`ecgfm.backbones` or any of its submodules is imported. The registry imports none of them.
"""

from ecgfm.backbones.registry import Backbone, create_backbone, list_backbones, register_backbone

# Built-in families (one line per model module; the order does not matter). Heavy optional dependencies of a
# family belong inside its functions, not at the top of its module, since every family is imported here.
from ecgfm.backbones import hubert, net1d, resnet1d, stmem, vit1d  # noqa: E402,F401  (registration side effect)

__all__ = ["Backbone", "create_backbone", "list_backbones", "register_backbone"]
