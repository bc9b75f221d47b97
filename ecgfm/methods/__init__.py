"""Pretraining methods: LightningModules combining a backbone, heads and a loss.

``PretrainModule`` (base), ``SimCLRModule``, ``CLOCSModule``, ``MAEModule``, ``CREMAModule``. Attributes are
imported lazily (PEP 562) so that ``import ecgfm.methods`` stays cheap and one method's import problem does not
hide the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PretrainModule": "ecgfm.methods.base",
    "SimCLRModule": "ecgfm.methods.simclr",
    "CLOCSModule": "ecgfm.methods.clocs",
    "MAEModule": "ecgfm.methods.mae",
    "CREMAModule": "ecgfm.methods.crema",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecgfm.methods' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
