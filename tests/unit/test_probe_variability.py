"""Probes that keep window-to-window variability (issue 12): ``aggregate="mean_std"`` and the attention probe
over frozen tokens, on a synthetic task whose signal is *only* in the variability across a record's windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgfm.evaluate.features import FeatureSet, TokenSet
from ecgfm.evaluate.probe import AttentionProbe, ProbeData, record_matrix, run_probe_grid
from ecgfm.heads import AttentionPoolingHead


def _variability_task(n: int = 240, windows: int = 6, tokens: int = 3, d: int = 8, seed: int = 0):
    """Class 1: feature 0 of the windows alternates +2 / -2 (an exact zero sum per record); class 0: it is 0.
    Every other feature is the same noise for both classes, so a record's MEAN window embedding holds no signal
    (feature 0 of the mean is 0 in both classes) while its std / its tokens do. Windows have ``tokens`` tokens
    each (the window's value plus token noise); a window embedding is the mean of its tokens."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    tok = rng.normal(size=(n, windows, tokens, d)).astype(np.float32)
    sign = np.where(np.arange(windows) % 2 == 0, 1.0, -1.0)          # balanced: mean exactly 0
    perm = np.stack([rng.permutation(sign) for _ in range(n)])        # (n, windows)
    tok[..., 0] = (2.0 * perm * y[:, None])[:, :, None] + 0.1 * rng.normal(size=(n, windows, tokens))
    record = np.repeat(np.arange(n), windows)
    ts = TokenSet(tokens=tok.reshape(-1, d).astype(np.float16),
                  window_offsets=np.arange(0, n * windows * tokens + 1, tokens, dtype=np.int64),
                  record=record, n_records=n)
    fs = FeatureSet(features=tok.mean(axis=2).reshape(-1, d), record=record, n_records=n)
    labels = np.eye(2, dtype=np.float32)[y]
    rows = np.arange(n)
    splits = {"train": rows[: n // 2], "val": rows[n // 2: 3 * n // 4], "test": rows[3 * n // 4:]}
    return fs, ts, labels, splits


def test_mean_std_has_twice_the_dimension_and_differs_from_mean():
    fs, _, _, _ = _variability_task(n=10)
    means, stats = record_matrix(fs, "mean_embedding"), record_matrix(fs, "mean_std")
    assert means.shape == (10, 8) and stats.shape == (10, 16)
    np.testing.assert_allclose(stats[:, :8], means, atol=1e-6)
    assert not np.allclose(stats[:, 8:], 0) and record_matrix(fs, "mean_prediction") is None
    x = fs.features[fs.record == 3]
    np.testing.assert_allclose(stats[3, 8:], x.std(axis=0), atol=1e-5)               # population std
    one = FeatureSet(features=np.array([[1.0, 2.0], [3.0, 5.0], [7.0, 7.0]], np.float32),
                     record=np.array([0, 0, 1]), n_records=3, skipped=np.array([2]))
    s = one.record_stats()
    np.testing.assert_allclose(s[0], [2.0, 3.5, 1.0, 1.5])
    np.testing.assert_allclose(s[1], [7, 7, 0, 0])
    assert np.isnan(s[2]).all()                  # skipped record: NaN, a caller that forgets valid_rows fails loudly


def test_variability_signal_needs_mean_std_or_attention():
    fs, ts, labels, splits = _variability_task()
    common = dict(fractions=[1.0], seeds=[0], n_boot=0)
    data = ProbeData(features=fs, labels=labels, splits=splits, multilabel=False, class_names=["a", "b"])
    mean = run_probe_grid(data, aggregate="mean_embedding", Cs=[0.1, 1.0], **common)[0]
    mlp = run_probe_grid(data, mode="mlp", aggregate="mean_embedding", lrs=[1e-2], **common)[0]
    std = run_probe_grid(data, aggregate="mean_std", Cs=[0.1, 1.0], **common)[0]
    att_data = ProbeData(features=ts, labels=labels, splits=splits, multilabel=False, class_names=["a", "b"])
    att = run_probe_grid(att_data, mode="attention", attention_kwargs=dict(
        lrs=[3e-3], weight_decays=[0.0], num_heads=2, epochs=40, batch_size=32, patience=10), **common)[0]
    assert mean["val_macro_auroc"] < 0.7 and mean["test"]["macro_auroc"]["value"] < 0.7
    assert mlp["val_macro_auroc"] < 0.7                    # not even a non-linear head on the mean
    assert std["val_macro_auroc"] > 0.95 and std["test"]["macro_auroc"]["value"] > 0.95
    assert att["val_macro_auroc"] > 0.9 and att["test"]["macro_auroc"]["value"] > 0.9
    assert att["hparam"] == {"lr": 3e-3, "weight_decay": 0.0} and list(att["grid"]) == ["lr=0.003,wd=0"]
    p = att["predictions"]["test"][1]
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)                         # softmax


def test_attention_probe_is_deterministic_and_multilabel_uses_sigmoids():
    _, ts, labels, splits = _variability_task(n=80)
    kw = dict(lr=1e-2, num_heads=2, epochs=3, batch_size=16, seed=5)
    a = AttentionProbe(False, **kw).fit(ts, splits["train"], labels[splits["train"]])
    b = AttentionProbe(False, **kw).fit(ts, splits["train"], labels[splits["train"]])
    np.testing.assert_array_equal(a.predict_proba(ts, splits["test"]), b.predict_proba(ts, splits["test"]))
    multi = np.concatenate([labels, labels[:, :1]], axis=1)               # 3 labels, two of them equal
    m = AttentionProbe(True, **kw).fit(ts, splits["train"], multi[splits["train"]], splits["val"],
                                       multi[splits["val"]])
    p = m.predict_proba(ts, splits["test"])
    assert p.shape == (len(splits["test"]), 3) and ((p > 0) & (p < 1)).all() and m.best_epoch >= 1
    assert not np.allclose(p.sum(axis=1), 1.0)


def test_attention_pooling_head_shapes_and_padding():
    torch.manual_seed(0)
    head = AttentionPoolingHead(16, 3, num_queries=2, num_heads=4).eval()
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    out = head(x, pad)
    assert out.shape == (2, 3) and head.pool(x, pad).shape == (2, 2, 16)
    # padded positions are ignored: the second record alone, unpadded, gives the same logits
    torch.testing.assert_close(head(x[1:, :4]), out[1:], atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[1, 4:] = 100.0
    torch.testing.assert_close(head(x2, pad), out)
    with pytest.raises(ValueError, match="masks every token"):
        head(x, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="must divide"):
        AttentionPoolingHead(10, 3, num_heads=4)


def test_attention_mode_needs_tokens_and_the_default_aggregate():
    fs, ts, labels, splits = _variability_task(n=40)
    data = ProbeData(features=fs, labels=labels, splits=splits, multilabel=False, class_names=["a", "b"])
    with pytest.raises(ValueError, match="TokenSet"):
        run_probe_grid(data, [1.0], [0], mode="attention", n_boot=0)
    tok = ProbeData(features=ts, labels=labels, splits=splits, multilabel=False, class_names=["a", "b"])
    with pytest.raises(ValueError, match="aggregate must stay 'mean_embedding'"):
        run_probe_grid(tok, [1.0], [0], mode="attention", aggregate="mean_std", n_boot=0)
    with pytest.raises(ValueError, match="FeatureSet"):
        run_probe_grid(tok, [1.0], [0], mode="linear", n_boot=0)
    with pytest.raises(ValueError, match="probe mode must be one of"):
        run_probe_grid(data, [1.0], [0], mode="knn", n_boot=0)
