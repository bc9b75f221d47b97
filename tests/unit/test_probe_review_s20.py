"""Review s20 of the torch probes: the MLP and attention probes decay weights only, as pretraining and fine-tuning do
(:func:`ecgfm.optim.param_groups`): no weight decay on biases, norm layers or the attention probe's learnable
queries (they used ``torch.optim.AdamW(net.parameters())``: one decayed group holding everything)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgfm.evaluate.features import TokenSet
from ecgfm.evaluate.probe import AttentionProbe, MLPProbe


class _SpyAdamW(torch.optim.AdamW):
    """AdamW that records the weight decay of every parameter it was built with."""

    built: list[dict[int, float]] = []

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        _SpyAdamW.built.append({id(p): g["weight_decay"] for g in self.param_groups for p in g["params"]})


def _decay_by_name(monkeypatch, fit) -> dict[str, float]:
    _SpyAdamW.built = []
    monkeypatch.setattr(torch.optim, "AdamW", _SpyAdamW)
    probe = fit()
    named = dict(probe.net.named_parameters())
    # (a one-parameter AdamW may be built once to test whether fused AdamW runs here: ecgfm.accel)
    built = [b for b in _SpyAdamW.built if set(b) == {id(p) for p in named.values()}]
    assert len(built) == 1, "one optimiser over every trainable parameter of the probe"
    decay = built[0]
    return {name: decay[id(p)] for name, p in named.items()}


def _mlp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(x[:, 0] > 0).astype(int)]
    return MLPProbe(False, lr=1e-2, epochs=3, hidden_dim=8, weight_decay=0.1, seed=0).fit(x, y)


def _attention():
    rng = np.random.default_rng(0)
    n, k, d = 12, 3, 8
    ts = TokenSet(tokens=rng.normal(size=(n * k, d)).astype(np.float16),
                  window_offsets=np.arange(0, n * k + 1, k, dtype=np.int64), record=np.arange(n, dtype=np.int64),
                  n_records=n)
    y = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
    return AttentionProbe(False, lr=1e-2, weight_decay=0.1, epochs=1, batch_size=4, num_heads=2, seed=0).fit(
        ts, np.arange(n), y)


@pytest.mark.parametrize("fit", [_mlp, _attention], ids=["mlp", "attention"])
def test_probes_decay_weights_only(monkeypatch, fit):
    decay = _decay_by_name(monkeypatch, fit)
    exempt = {n for n, p in fit().net.named_parameters() if p.ndim <= 1 or n == "query"}
    assert exempt and any(n.endswith(".bias") for n in exempt)
    for name, wd in decay.items():
        if name in exempt:
            assert wd == 0.0, f"{name} is decayed ({wd})"
        else:
            assert wd == pytest.approx(0.1), f"{name} has weight decay {wd}, expected the probe's 0.1"
    if fit is _attention:
        assert decay["query"] == 0.0 and decay["attn.in_proj_weight"] == pytest.approx(0.1)


def test_cells_of_the_torch_probes_from_before_the_fix_are_recomputed():
    """The MLP / attention probes' numbers changed with their weight decay: their cells' recipe identity names it
    (an old cell is recomputed, not reused); the linear probe's identity is unchanged."""
    from ecgfm.evaluate import sweep as S
    from ecgfm.evaluate.identity import short_hash

    probe = {"mode": "mlp", "aggregate": "mean_embedding", "Cs": [0.1, 1.0], "max_iter": 1000, "lrs": [0.001],
             "mlp": {"hidden_dim": 64}, "attention": {"heads": 4}, "side_features": None, "layers": "last"}
    assert short_hash(S._probe_recipe(probe)) != "aa01ab8259f1277e"      # the id of this recipe before the fix
    for mode in ("mlp", "attention"):
        assert S._probe_recipe(dict(probe, mode=mode))["weight_decay_on"] == S.TORCH_PROBE_DECAY
    assert "weight_decay_on" not in S._probe_recipe(dict(probe, mode="linear"))
