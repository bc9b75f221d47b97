"""Review s15 of the probes and the feature cache: the cache key follows the extraction code's version, L-BFGS
non-convergence is recorded, the trained probes leave the caller's torch RNG alone, and a stride longer than the
window is reported."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.evaluate import features as F
from ecgfm.evaluate import probe as P
from ecgfm.evaluate.features import FeatureSet, TokenSet, cached_features
from ecgfm.evaluate.probe import AttentionProbe, LinearProbe, MLPProbe, ProbeData, run_probe_grid


# ------------------------------------------------------------------------------------------ 1. feature-cache key
class _Cache:
    """An in-memory corpus (no manifest: identified by its signals)."""

    def __init__(self, n: int = 4, t: int = 300):
        self.x = np.random.default_rng(0).normal(size=(n, 12, t)).astype(np.float32)
        self.manifest: dict = {}

    def __len__(self) -> int:
        return len(self.x)

    def signal(self, i: int) -> np.ndarray:
        return self.x[i]


class _Enc(nn.Module):
    name = "toy"
    init_args: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 4)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(48, dtype=torch.float32).reshape(4, 12) / 48)
            self.lin.bias.zero_()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean(-1))


class _EncV2(_Enc):
    embed_version = 2

    def embed(self, x: torch.Tensor) -> torch.Tensor:     # "fixed" embedding code, same name / args / weights
        return self.lin(x.amax(-1))


def test_feature_key_changes_with_the_feature_schema(monkeypatch, tmp_path):
    assert isinstance(F.FEATURE_SCHEMA, int)
    key = F.feature_key("enc", "cache", 100, 100)
    assert F.feature_key("enc", "cache", 100, 100) == key                    # stable
    monkeypatch.setattr(F, "FEATURE_SCHEMA", F.FEATURE_SCHEMA + 1)
    assert F.feature_key("enc", "cache", 100, 100) != key
    for kind in F.FEATURE_KINDS:                                             # every kind of file
        monkeypatch.setattr(F, "FEATURE_SCHEMA", 1)
        k1 = F.feature_key("enc", "cache", 100, 100, kind=kind)
        monkeypatch.setattr(F, "FEATURE_SCHEMA", 2)
        assert F.feature_key("enc", "cache", 100, 100, kind=kind) != k1


def test_bumped_feature_schema_recomputes_instead_of_reusing_stale_features(monkeypatch, tmp_path):
    old = cached_features(_Enc(), _Cache(), 100, 100, tmp_path)
    again = cached_features(_Enc(), _Cache(), 100, 100, tmp_path)
    assert again.key == old.key and again.seconds == 0.0                    # reused while the code is the same
    monkeypatch.setattr(F, "FEATURE_SCHEMA", F.FEATURE_SCHEMA + 1)
    new = cached_features(_Enc(), _Cache(), 100, 100, tmp_path)
    assert new.key != old.key and (tmp_path / f"{new.key}.npz").exists()


def test_embed_version_of_a_backbone_is_part_of_its_fingerprint_and_key(tmp_path):
    plain, v2 = _Enc(), _EncV2()
    assert F.encoder_fingerprint(plain) != F.encoder_fingerprint(v2)
    other = _EncV2()
    other.embed_version = "3"
    assert F.encoder_fingerprint(v2) != F.encoder_fingerprint(other)
    a = cached_features(plain, _Cache(), 100, 100, tmp_path)
    b = cached_features(v2, _Cache(), 100, 100, tmp_path)
    assert a.key != b.key
    fresh = F.extract_features(_EncV2(), _Cache(), 100, 100)
    np.testing.assert_array_equal(b.features, fresh.features)                # not the stale mean-pooled ones
    # a backbone without embed_version (or with None) keeps its fingerprint
    none = _Enc()
    none.embed_version = None
    assert F.encoder_fingerprint(none) == F.encoder_fingerprint(plain)


# ------------------------------------------------------------------------------------- 2. L-BFGS convergence
def _separable(n: int = 120, d: int = 10, multilabel: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    if multilabel:
        labels = np.stack([x[:, 0] + 0.5 * x[:, 1] > 0, x[:, 2] - x[:, 3] > 0, x[:, 4] > 0.3], 1)
    else:
        c = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
        labels = np.eye(3)[c]
    return x, labels.astype(np.float32)


@pytest.mark.parametrize("multilabel", [False, True])
def test_linear_probe_records_convergence(multilabel):
    x, y = _separable(multilabel=multilabel)
    low = LinearProbe(multilabel, C=100.0, max_iter=2).fit(x, y)
    assert not low.converged and low.n_iter == 2
    ok = LinearProbe(multilabel, C=0.1, max_iter=1000).fit(x, y)
    assert ok.converged and 0 < ok.n_iter < 1000


def test_linear_probe_convergence_warnings_are_not_shown(recwarn):
    x, y = _separable()
    LinearProbe(False, C=100.0, max_iter=2).fit(x, y)
    from sklearn.exceptions import ConvergenceWarning

    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


def test_linear_probe_passes_other_warnings_on(monkeypatch):
    """Recording the convergence warnings must not swallow the others."""
    x, y = _separable()
    real_fit = P.StandardScaler.fit

    def noisy_fit(self, *a, **k):
        import warnings

        warnings.warn("an unrelated warning", UserWarning)
        return real_fit(self, *a, **k)

    monkeypatch.setattr(P.StandardScaler, "fit", noisy_fit)
    with pytest.warns(UserWarning, match="an unrelated warning"):
        LinearProbe(False, C=1.0).fit(x, y)


def _grid_data(multilabel: bool):
    x, y = _separable(n=160, multilabel=multilabel)
    fs = FeatureSet(features=x, record=np.arange(len(x)), n_records=len(x))
    rows = np.arange(len(x))
    splits = {"train": rows[:80], "val": rows[80:120], "test": rows[120:]}
    names = [f"c{i}" for i in range(y.shape[1])]
    return ProbeData(features=fs, labels=y, splits=splits, multilabel=multilabel, class_names=names)


@pytest.mark.parametrize("multilabel", [False, True])
def test_probe_grid_lists_the_Cs_that_did_not_converge_and_warns_for_the_chosen_one(multilabel, caplog):
    data = _grid_data(multilabel)
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.probe"):
        r = run_probe_grid(data, [1.0], [0], Cs=[100.0], n_boot=0, max_iter=2)[0]
    assert r["not_converged"] == [100.0]
    assert set(r["grid"]) == {"100"} and isinstance(r["grid"]["100"], float)     # grid format unchanged
    assert any("C=100" in m and "did not converge" in m for m in caplog.messages)


def test_probe_grid_converged_grid_has_no_warning(caplog):
    data = _grid_data(False)
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.probe"):
        r = run_probe_grid(data, [1.0], [0], Cs=[0.01, 0.1], n_boot=0)[0]
    assert r["not_converged"] == []
    assert not any("did not converge" in m for m in caplog.messages)


def test_probe_grid_no_warning_when_only_an_unchosen_C_did_not_converge(caplog, monkeypatch):
    """The chosen C converged while another did not: listed, but no warning."""
    data = _grid_data(False)
    fits = []
    real = LinearProbe.fit

    def fit(self, x, y):
        out = real(self, x, y)
        if self.C == 100.0:                   # pretend the big C failed and give it the worst validation score
            out.converged = False
            fits.append(self)
        return out

    real_predict = LinearProbe.predict_proba
    monkeypatch.setattr(LinearProbe, "fit", fit)
    monkeypatch.setattr(LinearProbe, "predict_proba",
                        lambda self, x: (np.full((len(x), self.n_classes), 1.0 / self.n_classes)
                                         if self.C == 100.0 else real_predict(self, x)))
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.probe"):
        r = run_probe_grid(data, [1.0], [0], Cs=[0.1, 100.0], n_boot=0)[0]
    assert fits and r["hparam"] == {"C": 0.1} and r["not_converged"] == [100.0]
    assert not any("did not converge" in m for m in caplog.messages)


# ------------------------------------------------------------------------------- 3. the caller's torch RNG
def _mlp_fit():
    x, y = _separable(n=80)
    m = MLPProbe(False, lr=1e-2, epochs=20, eval_every=5, seed=3, dropout=0.5)
    m.fit(x[:60], y[:60], x[60:], y[60:])
    return m.predict_proba(x)


def _attention_fit():
    rng = np.random.default_rng(0)
    n, k, d = 40, 3, 8
    tok = rng.normal(size=(n * k, d)).astype(np.float16)
    ts = TokenSet(tokens=tok, window_offsets=np.arange(0, n * k + 1, k, dtype=np.int64),
                  record=np.arange(n, dtype=np.int64), n_records=n)
    y = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
    rows = np.arange(n)
    a = AttentionProbe(False, lr=1e-2, epochs=3, batch_size=8, seed=5, num_heads=2, dropout=0.3)
    a.fit(ts, rows[:30], y[:30], rows[30:], y[30:])
    return a.predict_proba(ts, rows)


@pytest.mark.parametrize("fit", [_mlp_fit, _attention_fit], ids=["mlp", "attention"])
def test_trained_probes_leave_the_global_torch_rng_alone(fit):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    fit()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fit", [_mlp_fit, _attention_fit], ids=["mlp", "attention"])
def test_trained_probes_are_seeded_whatever_the_global_rng(fit):
    torch.manual_seed(1)
    a = fit()
    torch.manual_seed(2)
    torch.rand(100)
    b = fit()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fit", [_mlp_fit, _attention_fit], ids=["mlp", "attention"])
def test_trained_probes_draw_what_a_plain_manual_seed_gave(fit, monkeypatch):
    """Bit-identical to the former ``torch.manual_seed(seed)`` on the global generator: the fork is replaced by
    a plain global seeding (the old behaviour) and the outputs compared."""
    import contextlib

    new = fit()

    @contextlib.contextmanager
    def plain(seed, device=None):
        torch.manual_seed(seed)
        yield

    monkeypatch.setattr(P, "_seeded_rng", plain)
    old = fit()
    np.testing.assert_array_equal(new, old)


# ------------------------------------------------------------------------------ 4. a stride longer than the window
def test_stride_longer_than_the_window_is_allowed_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.features"):
        fs = F.extract_features(_Enc(), _Cache(n=3), 50, 120, batch_size=2)
    assert fs.features.shape[1] == 4 and len(fs.features) > 0
    msgs = [m for m in caplog.messages if "never embedded" in m]
    assert len(msgs) == 1 and "120" in msgs[0] and "50" in msgs[0]


def test_stride_within_the_window_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.features"):
        F.extract_features(_Enc(), _Cache(n=2), 100, 100)
        F.extract_features(_Enc(), _Cache(n=2), 100, 50)
    assert not [m for m in caplog.messages if "never embedded" in m]


def test_stride_longer_than_the_window_warns_for_tokens_too(caplog):
    class _TokEnc(_Enc):
        def forward_features(self, x):          # a CNN-like (B, C, T') feature map
            return self.lin(x.transpose(1, 2)).transpose(1, 2)

    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.features"):
        ts = F.extract_tokens(_TokEnc(), _Cache(n=2), 50, 120, batch_size=2)
    assert ts.dim == 4
    assert len([m for m in caplog.messages if "never embedded" in m]) == 1
