"""ecgfm: self-supervised ECG foundation models (data, pretraining, benchmarking, explanation).

The public face::

    import ecgfm
    enc = ecgfm.Encoder.load("outputs/train/mae/<run>/encoder")      # an encoder artifact folder
    z = enc.embed(signal, fs=500, leads=[...])                         # (D,) embedding
    clf = ecgfm.Classifier.load("<cell>/classifier")                   # a classifier artifact folder
    p = clf.predict_proba(signal, fs=500, leads=[...])                 # DataFrame (records x classes)

Names are imported on first use, so ``import ecgfm`` stays light (worker processes import sub-modules only).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "ecgfm.api", "Classifier": "ecgfm.api", "load_record": "ecgfm.api",
    "load_encoder": "ecgfm.artifacts", "load_classifier": "ecgfm.artifacts", "save_encoder": "ecgfm.artifacts",
    "save_classifier": "ecgfm.artifacts", "ArtifactError": "ecgfm.artifacts",
    "create_backbone": "ecgfm.backbones.registry", "list_backbones": "ecgfm.backbones.registry",
    "PreprocessSpec": "ecgfm.data.preprocess",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ecgfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
