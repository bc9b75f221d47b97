"""What tests/unit/test_zoo_hubert.py and scripts/make_hubert_reference.py share: the seeded weights and inputs
of the HuBERT reference models and how an output is summarised (no transformers needed here)."""

from __future__ import annotations

import math

import torch


def random_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights for a HubertModel state dict of these key -> shape (keys in sorted order, one generator).

    Normal values scaled by ``1 / sqrt(fan_in)`` for weights, 0.1 for biases and embeddings; LayerNorm / GroupNorm
    weights ``1 + 0.2 N(0, 1)`` (away from 1 / 0, so a missing or misplaced norm shows).

    Args:
        shapes: ``{key: shape}``.
        seed: generator seed.

    Returns:
        ``{key: float32 tensor}``.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = list(shapes[key])
        z = torch.randn(shape, generator=g)
        if "norm" in key and key.endswith("weight"):
            out[key] = 1.0 + 0.2 * z
        elif key.endswith("bias") or len(shape) < 2:
            out[key] = 0.1 * z
        else:
            out[key] = z / math.sqrt(max(1, math.prod(shape[1:])))
    return out


def inputs() -> dict[str, torch.Tensor]:
    """The fixed inputs: ``x (2, 12, 250)``, ``x1 (1, 12, 100)`` (12 leads; HuBERT-ECG reads them concatenated)."""
    g = torch.Generator().manual_seed(1234)
    return {"x": torch.randn(2, 12, 250, generator=g), "x1": torch.randn(1, 12, 100, generator=g)}


def summarize(out: torch.Tensor, n: int = 32) -> dict:
    """``{"shape", "abs_sum", "samples": [(flat index, value), ...]}`` of an output: ``n`` values at positions drawn
    by a fixed generator, and the sum of absolute values (float64)."""
    flat = out.detach().reshape(-1).double()
    idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(7))[:n].sort().values
    return {"shape": list(out.shape), "abs_sum": float(flat.abs().sum()),
            "samples": [(int(i), float(flat[i])) for i in idx]}
