"""A tiny synthetic single-label task in a corpus cache, for LP-FT / fine-tuning tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SYNTHETIC_CLASSES, SyntheticSource


def synthetic_task(root: Path, n: int, seed: int, duration: float) -> tuple[str, CorpusCache, np.ndarray, dict]:
    """``n`` synthetic records (``duration`` s at 100 Hz, 9 classes) cached in ``root``; a 60 / 20 / 20 split
    by a fixed permutation. Returns ``(cache folder, cache, labels (n, 9), splits)``."""
    prepare_corpus(SyntheticSource(n, seed=seed, fs=100.0, duration=duration), root, PreprocessSpec(fs=100),
                   workers=0, progress=False)
    cache = CorpusCache(root)
    labels = cache.labels_matrix(list(SYNTHETIC_CLASSES))
    idx = np.random.default_rng(0).permutation(len(cache))
    a, b = int(0.6 * n), int(0.8 * n)
    return str(root), cache, labels, {"train": np.sort(idx[:a]), "val": np.sort(idx[a:b]), "test": np.sort(idx[b:])}
