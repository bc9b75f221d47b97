"""Shared test helpers for the explain stage's concept (TCAV) tests."""
from __future__ import annotations

import numpy as np
import torch


def tiny_tcav_wrapper():
    """An untrained resnet1d_test classifier wrapper (2 classes "a" / "b", 100 Hz, 250 samples) and ``(40, 12,
    250)`` float32 random inputs (seeded)."""
    from ecgfm.backbones import create_backbone
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test").eval()
    d = bb.embed(torch.zeros(1, 12, 250)).shape[-1]
    wrapper = ECGWrapper.from_encoder_and_head(bb, torch.nn.Linear(d, 2), None, fs=100.0, class_names=("a", "b"),
                                               n_samples=250)
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(40, 12, 250)), dtype=torch.float32)
    return wrapper, x
