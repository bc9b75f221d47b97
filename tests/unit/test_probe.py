"""Linear / MLP probes on cached features; features cache; one encoder pass per corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.evaluate import features as F
from ecgfm.evaluate.features import FeatureSet, cached_features, encoder_fingerprint
from ecgfm.evaluate.probe import LinearProbe, MLPProbe, ProbeData, run_probe_grid




def _blobs(n=300, d=16, c=3, seed=0, multilabel=False, windows=1):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (c, d))
    if multilabel:
        y = (rng.random((n, c)) < 0.4).astype(np.float32)
        x = y @ centers + rng.normal(0, 1, (n, d))
    else:
        k = rng.integers(0, c, n)
        y = np.eye(c, dtype=np.float32)[k]
        x = centers[k] + rng.normal(0, 1, (n, d))
    feats = np.repeat(x, windows, axis=0) + rng.normal(0, 0.3, (n * windows, d))
    fs = FeatureSet(features=feats.astype(np.float32), record=np.repeat(np.arange(n), windows), n_records=n)
    idx = rng.permutation(n)
    splits = {"train": idx[: n // 2], "val": idx[n // 2: 3 * n // 4], "test": idx[3 * n // 4:]}
    return fs, y, splits


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("aggregate", ["mean_embedding", "mean_prediction"])
def test_linear_probe_grid_separable(multilabel, aggregate):
    fs, y, splits = _blobs(multilabel=multilabel, windows=3)
    data = ProbeData(features=fs, labels=y, splits=splits, multilabel=multilabel,
                     class_names=["a", "b", "c"], patient_ids=None)
    res = run_probe_grid(data, fractions=[0.1, 1.0], seeds=[0, 1], Cs=[0.01, 1.0], aggregate=aggregate,
                         n_boot=100)
    assert len(res) == 4
    for r in res:
        assert r["test"]["macro_auroc"]["value"] > 0.9, r["test"]["macro_auroc"]
        assert set(r["grid"]) == {"0.01", "1"}
        lo, hi = r["test"]["macro_auroc"]["ci_low"], r["test"]["macro_auroc"]["ci_high"]
        assert lo <= r["test"]["macro_auroc"]["value"] <= hi
    full = [r for r in res if r["fraction"] == 1.0]
    assert all(r["n_train"] == len(splits["train"]) for r in full)
    if not multilabel:
        assert "accuracy" in res[0]["test"]
    else:
        assert res[0]["test"]["thresholds"] is not None


def test_random_features_give_chance_auroc():
    rng = np.random.default_rng(0)
    n = 400
    fs = FeatureSet(features=rng.normal(size=(n, 8)).astype(np.float32), record=np.arange(n), n_records=n)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    splits = {"train": np.arange(200), "val": np.arange(200, 300), "test": np.arange(300, 400)}
    res = run_probe_grid(ProbeData(fs, y, splits, False, ["x", "y"]), [1.0], [0], Cs=[1.0], n_boot=200)
    m = res[0]["test"]["macro_auroc"]
    assert 0.35 < m["value"] < 0.65 and m["ci_low"] < 0.5 < m["ci_high"]


def test_mlp_probe_learns_nonlinear_xor():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (600, 2))
    y = np.eye(2, dtype=np.float32)[((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)]
    lin = LinearProbe(False).fit(x[:400], y[:400])
    mlp = MLPProbe(False, lr=1e-2, epochs=200, hidden_dim=32, dropout=0.0, seed=0).fit(x[:400], y[:400], x[400:500],
                                                                                       y[400:500])
    from ecgfm.evaluate.metrics import macro_auroc

    assert macro_auroc(y[500:], lin.predict_proba(x[500:])) < 0.7
    assert macro_auroc(y[500:], mlp.predict_proba(x[500:])) > 0.9


def test_mlp_mean_prediction_early_stops_on_the_record_level_auroc():
    """With ``mean_prediction`` the MLP sees windows, but the learning rate is chosen and reported on the
    record-level validation AUROC (window predictions averaged per record); early stopping must use that number
    too, not the window-level AUROC (records with more windows would weigh more): the epoch kept scores exactly
    the reported validation AUROC."""
    rng = np.random.default_rng(0)
    n = 240
    y = (rng.random((n, 2)) < 0.4).astype(np.float32)
    nwin = rng.integers(1, 13, n)                               # unequal window counts
    rec = np.repeat(np.arange(n), nwin)
    feats = (y @ rng.normal(size=(2, 8)) * 0.6)[rec] + rng.normal(size=(len(rec), 8)) * 2.0
    fs = FeatureSet(features=feats.astype(np.float32), record=rec, n_records=n)
    splits = {"train": np.arange(120), "val": np.arange(120, 180), "test": np.arange(180, 240)}
    res = run_probe_grid(ProbeData(fs, y, splits, True, ["a", "b"]), [1.0], [0], mode="mlp", lrs=[1e-3],
                         aggregate="mean_prediction", n_boot=0,
                         mlp_kwargs=dict(epochs=200, eval_every=5, patience=1000, hidden_dim=32))
    assert res[0]["model"].best_val == pytest.approx(res[0]["val_macro_auroc"], abs=1e-12)


def test_mean_prediction_refuses_records_without_windows():
    """A record skipped for non-finite input has no windows: it must not be scored as probability 0."""
    fs, y, splits = _blobs(n=60, windows=2)
    keep = fs.record != splits["test"][0]
    holey = FeatureSet(features=fs.features[keep], record=fs.record[keep], n_records=fs.n_records)
    with pytest.raises(ValueError, match="no windows"):
        run_probe_grid(ProbeData(holey, y, splits, False, ["a", "b", "c"]), [1.0], [0], Cs=[1.0],
                       aggregate="mean_prediction", n_boot=0)


class _Cache:
    """Minimal stand-in for CorpusCache: len, signal(i), manifest."""

    def __init__(self, n=6, t=300):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 12, t)).astype(np.float32)
        self.manifest = {"plan_fingerprint": "test-cache"}

    def __len__(self):
        return len(self.x)

    def signal(self, i):
        return self.x[i]


class _Enc(nn.Module):
    name = "toy"
    init_args: dict = {}

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 4)
        self.calls = 0

    def embed(self, x):
        self.calls += 1
        return self.lin(x.mean(-1))


def test_feature_cache_one_pass_and_key(tmp_path):
    enc, cache = _Enc(), _Cache()
    before = F.STATS["extractions"]
    a = cached_features(enc, cache, window=100, stride=100, feature_dir=tmp_path, batch_size=4)
    assert a.features.shape == (18, 4) and a.n_records == 6
    np.testing.assert_array_equal(np.bincount(a.record), [3] * 6)
    calls = enc.calls
    b = cached_features(enc, cache, window=100, stride=100, feature_dir=tmp_path)
    assert enc.calls == calls and F.STATS["extractions"] == before + 1  # loaded from disk
    np.testing.assert_allclose(a.features, b.features)
    cached_features(enc, cache, window=100, stride=50, feature_dir=tmp_path)  # other stride: new entry
    assert F.STATS["extractions"] == before + 2
    fp = encoder_fingerprint(enc)
    with torch.no_grad():
        enc.lin.weight.add_(1.0)
    assert encoder_fingerprint(enc) != fp  # other weights, other key
    means = a.record_means()
    np.testing.assert_allclose(means[0], a.features[:3].mean(0), rtol=1e-5)


class _Spectral(nn.Module):
    """Simple fixed features: per-lead spread and a 25-band log power spectrum (no training)."""

    name = "spectral"
    init_args: dict = {}

    def embed(self, x):
        bands = torch.nn.functional.adaptive_avg_pool1d(torch.fft.rfft(x, dim=-1).abs(), 25).log1p().flatten(1)
        return torch.cat([x.std(-1), x.amax(-1) - x.amin(-1), x.diff(dim=-1).abs().amax(-1), bands], 1)


def test_probe_on_synthetic_corpus_reaches_high_auroc(tmp_path):
    """The synthetic classes are separable: a linear probe on simple features gets macro AUROC > 0.9 in seconds."""
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SYNTHETIC_CLASSES
    from ecgfm.evaluate.tasks import TaskSpec, build_task

    spec = TaskSpec.from_config({
        "name": "synthetic", "dataset": "synthetic", "multilabel": False,
        "sources": [{"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": 240, "seed": 3,
                     "fs": 250.0, "duration": 10.0}],
        "split": {"kind": "stratified", "fractions": [0.6, 0.2, 0.2], "seed": 0}})
    task = build_task(spec, str(tmp_path), PreprocessSpec())
    assert set(task.class_names) <= set(SYNTHETIC_CLASSES) and not task.multilabel
    feats = cached_features(_Spectral(), task.cache, task.crop_samples, task.stride_samples, tmp_path / "f")
    res = run_probe_grid(ProbeData(feats, task.labels, task.splits, False, task.class_names,
                                   list(task.patient_ids)), [1.0], [0], Cs=[0.1, 1.0], n_boot=100)
    m = res[0]["test"]["macro_auroc"]
    assert m["value"] > 0.9, m
    assert res[0]["n_test"] == len(task.splits["test"]) > 30


def test_aggregate_windows():
    from ecgfm.evaluate.finetune import aggregate_windows

    probs = np.array([[0.2, 0.8], [0.4, 0.6], [1.0, 0.0]])
    recs, p, y = aggregate_windows(probs, np.array([7, 7, 3]), np.array([1, 1, 0]))
    np.testing.assert_array_equal(recs, [3, 7])
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.3, 0.7]])
    np.testing.assert_array_equal(y, [0, 1])
