"""ECGWrapper: forward / probabilities, layouts, safe input conversion, layers, embeddings, token grids, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.data.preprocess import PreprocessSpec, preprocess_signal, resample
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord
from ecgfm.explain.wrapper import ECGWrapper, EncoderClassifier

FS = 100.0
T = 250


class TinyCNN(nn.Module):
    def __init__(self, leads: int = 12, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(leads, 8, 7, padding=3), nn.ReLU(),
                                      nn.Conv1d(8, 8, 7, padding=3, stride=2), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


class _NotAllowed:
    """An arbitrary Python object: loading it needs unpickling, which weights_only=True refuses."""


@pytest.fixture
def wrapper() -> ECGWrapper:
    torch.manual_seed(0)
    return ECGWrapper(TinyCNN(), fs=FS, class_names=("a", "b", "c"))


def test_forward_and_proba(wrapper):
    x = torch.randn(4, 12, T)
    logits = wrapper(x)
    assert logits.shape == (4, 3)
    p = wrapper.predict_proba(x)
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-5)
    assert torch.allclose(p, logits.softmax(1), atol=1e-6)
    sig = ECGWrapper(TinyCNN(), fs=FS, postprocess="sigmoid")
    assert torch.allclose(sig.predict_proba(x), sig(x).sigmoid())
    assert wrapper.num_classes == 3 and ECGWrapper(TinyCNN(classes=5), fs=FS).num_classes == 5


def test_btl_layout_transposes():
    torch.manual_seed(0)
    model = TinyCNN()

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):  # (B, T, L)
            assert x.shape[-1] == 12
            return self.inner(x.transpose(1, 2))

    x = torch.randn(2, 12, T)
    w = ECGWrapper(ChannelsLast(), fs=FS, input_layout="BTL")
    assert torch.allclose(w(x), model(x))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="postprocess"):
        ECGWrapper(TinyCNN(), fs=FS, postprocess="relu")
    with pytest.raises(ValueError, match="input_layout"):
        ECGWrapper(TinyCNN(), fs=FS, input_layout="LBT")
    with pytest.raises(ValueError, match="lead name"):
        ECGWrapper(TinyCNN(), fs=FS, lead_names=("I", "foo"))
    with pytest.raises(ValueError, match="disagrees"):
        ECGWrapper(TinyCNN(), fs=FS, preprocess=PreprocessSpec(fs=500))


def test_check_rejects_bad_batches(wrapper):
    with pytest.raises(ValueError, match="8 leads but the model expects 12"):
        wrapper.check(torch.randn(2, 8, T))
    x = torch.randn(2, 12, T)
    x[1, 3, 17] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*batch 1, lead aVR, sample 17"):
        wrapper.check(x)
    with pytest.raises(ValueError, match="batch, leads, samples"):
        wrapper.check(torch.randn(12, T, 1, 1))
    fixed = ECGWrapper(TinyCNN(), fs=FS, n_samples=T)
    with pytest.raises(ValueError, match="500 samples but the model expects 250"):
        fixed.check(torch.randn(1, 12, 500))


def test_prepare_resamples_and_reorders(wrapper):
    rng = np.random.default_rng(0)
    sig500 = rng.standard_normal((12, 1250)).astype(np.float32)
    out = wrapper.prepare(sig500, fs=500)
    assert out.shape == (1, 12, 250)
    np.testing.assert_allclose(out[0].numpy(), resample(sig500, 500, 100), atol=1e-5)
    # Rows given in another order are put back in the model's order.
    order = [11, 0, 5, 3, 1, 2, 4, 6, 7, 8, 9, 10]
    names = [CANONICAL_LEADS[i] for i in order]
    sig = rng.standard_normal((12, T)).astype(np.float32)
    out = wrapper.prepare(sig[order], fs=FS, lead_names=names)
    np.testing.assert_allclose(out[0].numpy(), sig, atol=1e-6)
    # Aliases ("MLII") and a subset model.
    sub = ECGWrapper(TinyCNN(leads=2), fs=FS, lead_names=("II", "V1"))
    out = sub.prepare(sig[[6, 1]], fs=FS, lead_names=["V1", "MLII"])
    np.testing.assert_allclose(out[0].numpy(), sig[[1, 6]], atol=1e-6)


def test_prepare_errors(wrapper):
    sig = np.zeros((12, T), dtype=np.float32)
    with pytest.raises(ECGDataError, match="3 leads given but the model expects 12"):
        wrapper.prepare(np.zeros((3, T)), fs=FS)
    with pytest.raises(ECGDataError, match="sampling rate unknown: pass fs="):
        wrapper.prepare(sig)
    bad = sig.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ECGDataError, match="NaN sample"):
        wrapper.prepare(bad, fs=FS)
    with pytest.raises(ECGDataError, match=r"leads \['V1'"):
        ECGWrapper(TinyCNN(leads=2), fs=FS, lead_names=("II", "V1")).prepare(np.zeros((1, T)), fs=FS,
                                                                             lead_names=["II"])
    with pytest.raises(ECGDataError, match="unknown lead name"):
        wrapper.prepare(np.zeros((12, T)), fs=FS, lead_names=["X%d" % i for i in range(12)])
    # A model with a fixed input length: the rate can be assumed only when the length matches.
    fixed = ECGWrapper(TinyCNN(), fs=FS, n_samples=T)
    with pytest.warns(UserWarning, match="no fs= given"):   # said since s20: the API refuses the same call
        assert fixed.prepare(sig).shape == (1, 12, T)
    with pytest.raises(ECGDataError, match="sampling rate unknown"):
        fixed.prepare(np.zeros((12, 5 * T), dtype=np.float32))


def test_prepare_missing_leads_zero_and_record(wrapper):
    sig = np.ones((2, T), dtype=np.float32)
    out = wrapper.prepare(sig, fs=FS, lead_names=["I", "II"], missing_leads="zero")
    assert out[0, :2].eq(1).all() and out[0, 2:].eq(0).all()
    mask = np.zeros(12, dtype=bool)
    mask[[0, 1]] = True
    sig12 = np.zeros((12, 2 * T), dtype=np.float32)
    sig12[:2] = 1.0
    rec = ECGRecord(signal=sig12, fs=200.0, lead_mask=mask, record_id="r1", source="test")
    with pytest.raises(ECGDataError, match="test/r1"):
        wrapper.prepare(rec)
    out = wrapper.prepare(rec, missing_leads="zero")
    assert out.shape == (1, 12, T)


def test_prepare_applies_the_preprocessing_spec():
    spec = PreprocessSpec(fs=100, highpass=0.5, normalize="zscore")
    w = ECGWrapper(TinyCNN(), fs=100, preprocess=spec)
    rng = np.random.default_rng(1)
    sig = rng.standard_normal((12, 2500)).astype(np.float32) + 3.0
    expected, fs, _ = preprocess_signal(sig, 500, np.ones(12, bool), spec)
    out = w.prepare(sig, fs=500)
    assert fs == 100
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_layers_and_activations(wrapper):
    assert "features.2" in wrapper.layer_names()
    with pytest.raises(ValueError, match=r"no layer named 'nope'; available layers: features, features.0"):
        wrapper.layer("nope")
    x = torch.randn(3, 12, T)
    acts, grads, scores = wrapper.activations_and_gradients(x, "features.3", target=1)
    assert acts.shape == grads.shape == (3, 8, (T + 1) // 2)
    assert torch.allclose(scores, wrapper(x)[:, 1].detach(), atol=1e-6)
    # The last ReLU's output feeds mean-pool + linear: its gradient is W[target] / T' everywhere.
    w = wrapper.model.head.weight[1].detach()
    expected = (w[None, :, None] / acts.shape[-1]).expand_as(grads)
    assert torch.allclose(grads, expected, atol=1e-6)


def test_resolve_target(wrapper):
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert wrapper.resolve_target(None, logits).tolist() == [1, 0]
    assert wrapper.resolve_target(2, logits).tolist() == [2, 2]
    assert wrapper.resolve_target("c", logits).tolist() == [2, 2]
    assert wrapper.resolve_target(["a", 1], logits).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"outside the model's 3 classes"):
        wrapper.resolve_target(3, logits)
    with pytest.raises(ValueError, match=r"outside"):
        wrapper.resolve_target(-1, logits)
    with pytest.raises(ValueError, match="unknown class name"):
        wrapper.resolve_target("zz", logits)
    with pytest.raises(ValueError, match="one class per input"):
        wrapper.resolve_target([0, 1, 2], logits)
    # integer-valued numbers of any type are indices; fractions and bools are refused (1.7 was read as class 1)
    assert wrapper.resolve_target(np.int64(2), logits).tolist() == [2, 2]
    assert wrapper.resolve_target(2.0, logits).tolist() == [2, 2]
    assert wrapper.resolve_target(torch.tensor([1, 0]), logits).tolist() == [1, 0]
    for bad in (1.7, True, np.float64(0.5), [0.9, 1.2], float("nan")):
        with pytest.raises(ValueError, match="must be a class index"):
            wrapper.resolve_target(bad, logits)


def test_embed_and_grid_for_ecgfm_backbones():
    from ecgfm.backbones.registry import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("vit1d_test")
    w = ECGWrapper.from_encoder_and_head(vit, nn.Linear(vit.num_features, 4), PreprocessSpec(fs=100), n_samples=250)
    x = torch.randn(2, 12, 250)
    assert isinstance(w.model, EncoderClassifier)
    assert torch.allclose(w.embed(x), vit.embed(x))
    assert torch.allclose(w(x), w.model.head(vit.embed(x)))
    tokens = vit.forward_features(x)
    grid = w.grid_reshape(tokens)
    assert grid.shape == (2, vit.embed_dim, 12, 250 // vit.patch_size)
    # token (lead 3, patch 4) lands at grid[:, :, 3, 4]
    assert torch.allclose(grid[:, :, 3, 4], tokens[:, 3 * (250 // vit.patch_size) + 4])
    acts, grads, _ = w.activations_and_gradients(x, "encoder.blocks.0", target=0)
    assert w.grid_reshape(grads).shape == grid.shape
    res = create_backbone("resnet1d_test").eval()
    wr = ECGWrapper.from_encoder_and_head(res, nn.Linear(res.num_features, 4), PreprocessSpec(fs=100))
    feats = res.forward_features(x)
    assert wr.grid_reshape(feats).shape == (2, feats.shape[1], 1, feats.shape[2])
    bare = ECGWrapper.from_encoder_and_head(res, None, PreprocessSpec(fs=100))
    assert bare.postprocess is None and torch.allclose(bare(x), res.embed(x))
    with pytest.raises(ValueError, match="no encoder"):
        ECGWrapper(nn.Conv1d(12, 2, 3), fs=FS).embed(x)


def test_from_checkpoint_roundtrip(tmp_path):
    from ecgfm.backbones.registry import create_backbone

    torch.manual_seed(0)
    res = create_backbone("resnet1d_test").eval()
    head = nn.Linear(res.num_features, 3)
    model = EncoderClassifier(res, head).eval()
    path = tmp_path / "clf.pt"
    torch.save({"backbone": {"name": res.name, "init_args": res.init_args}, "state_dict": model.state_dict(),
                "preprocess": PreprocessSpec(fs=100).to_dict(), "class_names": ["x", "y", "z"],
                "postprocess": "softmax", "n_samples": 250}, path)
    w = ECGWrapper.from_checkpoint(path)
    x = torch.randn(2, 12, 250)
    assert torch.allclose(w(x), model(x), atol=1e-6)
    assert w.class_names == ("x", "y", "z") and w.fs == 100 and w.n_samples == 250
    with pytest.raises(ECGDataError, match="checkpoint not found"):
        ECGWrapper.from_checkpoint(tmp_path / "missing.pt")
    # a checkpoint that does not say softmax or sigmoid is refused (it was read as multi-label), unless told
    state = torch.load(path, weights_only=True)
    del state["postprocess"]
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(ECGDataError, match="postprocess='softmax'"):
        ECGWrapper.from_checkpoint(tmp_path / "bare.pt")
    told = ECGWrapper.from_checkpoint(tmp_path / "bare.pt", postprocess="softmax")
    assert torch.allclose(told.predict_proba(x).sum(1), torch.ones(2))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ECGDataError, match="not an ecgfm classifier checkpoint"):
        ECGWrapper.from_checkpoint(tmp_path / "other.pt")

    torch.save({"backbone": _NotAllowed(), "state_dict": {}}, tmp_path / "pickle.pt")
    with pytest.raises(ECGDataError, match="weights_only=True"):
        ECGWrapper.from_checkpoint(tmp_path / "pickle.pt")


def test_from_checkpoint_reads_classifier_directories(tmp_path):
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.explain.classifier import save_classifier

    torch.manual_seed(0)
    res = create_backbone("resnet1d_test").eval()
    head = nn.Linear(res.num_features, 2)
    save_classifier(tmp_path / "clf", res, head, PreprocessSpec(fs=100), class_names=["n", "pvc"], multilabel=False,
                    n_samples=250)
    w = ECGWrapper.from_checkpoint(tmp_path / "clf")
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        assert torch.allclose(w(x), head(res.eval().embed(x)), atol=1e-6)
    assert w.class_names == ("n", "pvc") and w.postprocess == "softmax"
    w2 = ECGWrapper.from_checkpoint(tmp_path / "clf", postprocess="sigmoid")
    assert w2.postprocess == "sigmoid" and w2.n_samples == 250 and w2.encoder is w2.model.encoder


@pytest.mark.parametrize("leads", [["II"], ["V1", "I"]])
def test_prepare_with_a_spec_for_a_model_of_fewer_or_reordered_leads(leads):
    """A model of other leads than the canonical 12, with a preprocessing spec: the rows are preprocessed in the
    canonical layout (only the model's leads present) and handed over in the model's order (this raised
    "12 leads but the model expects 1")."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 1000)).astype(np.float32)
    spec = PreprocessSpec(fs=100)
    w = ECGWrapper(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), fs=100, lead_names=leads, preprocess=spec)
    got = w.prepare(x, fs=100, lead_names=list(CANONICAL_LEADS))
    idx = [CANONICAL_LEADS.index(lead) for lead in leads]
    only = np.zeros_like(x)
    only[idx] = x[idx]
    ref, _, _ = preprocess_signal(only, 100.0, np.isin(np.arange(12), idx), spec, "ref")
    assert got.shape == (1, len(leads), 1000)
    np.testing.assert_allclose(got[0].numpy(), ref[idx], atol=1e-6)


def test_token_maps_of_a_lead_aware_vit_on_a_lead_subset_sit_on_their_leads():
    """A lead-aware ViT explained on a record with leads I, II, V1 encodes 3 x N patch tokens, not 12 x N: Grad-CAM,
    Grad-CAM++ and attention rollout must put each token on its own lead (they reshaped the 3-lead sequence as 12
    leads of fewer patches, most of the map on absent leads)."""
    from ecgfm.artifacts import EncoderClassifier
    from ecgfm.backbones import create_backbone
    from ecgfm.explain.attribution import Explainer, _upsample_grid

    torch.manual_seed(0)
    bb = create_backbone("vit1d_test")                        # 250 samples, 10 patches per lead
    w = ECGWrapper(EncoderClassifier(bb, nn.Linear(bb.embed_dim, 3)), fs=100.0, n_samples=250, lead_aware=True)
    x = torch.randn(1, 12, 250, generator=torch.Generator().manual_seed(0))
    present = torch.zeros(12, dtype=torch.bool)
    present[[0, 1, 6]] = True
    x[:, ~present] = 0
    ex = Explainer(w)
    with w.present_leads(present.numpy()):
        maps = {m: ex.explain(x, target=0, method=m).values[0] for m in ("gradcam", "gradcam++", "attention_rollout")}
        acts, grads, _ = w.activations_and_gradients(x, "encoder.norm", target=0)
    for m, v in maps.items():
        assert v[~present].abs().sum() == 0 and v[present].abs().sum() > 0, m
    assert acts.shape[1] == 3 * (10 + 2)                      # what the model ran: the present leads' tokens
    tok_a, tok_g = acts[:, :30].reshape(1, 3, 10, -1), grads[:, :30].reshape(1, 3, 10, -1)
    cam = (tok_g.mean(dim=(1, 2), keepdim=True) * tok_a).sum(-1).clamp_min(0)          # (1, 3, 10)
    full = torch.zeros(1, 1, 12, 10)
    full[0, 0, present] = cam[0]
    torch.testing.assert_close(maps["gradcam"], _upsample_grid(full, 12, 250)[0], atol=1e-6, rtol=1e-5)


def test_evidence_on_absent_leads_is_not_evidence():
    """Localisation compares attributions with the record's evidence mask: evidence drawn on leads the record does
    not have (a synthetic record with leads= keeps the 12-lead mask) cannot be pointed at and must not count."""
    from ecgfm.explain.report import _evidence

    ev = np.zeros((12, 500), bool)
    ev[:, 100:150] = True
    mask = np.zeros(12, bool)
    mask[[0, 1, 6]] = True
    rec = ECGRecord(signal=np.zeros((12, 500), np.float32), fs=100.0, lead_mask=mask, record_id="r", source="t",
                    evidence=ev)
    w = ECGWrapper(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), fs=100.0)
    out = _evidence(rec, w, 500)
    assert out[mask].all(axis=0)[100:150].all() and not out[~mask].any()


def test_classifier_artifacts_explain_as_the_api_scores_them(tmp_path):
    """Three ways the explain stage read a classifier artifact unlike ecgfm.api: it dropped a multi-label model's
    validation thresholds (a counterfactual then targeted a class already predicted at its threshold 0.04), it
    ignored extra.trained_leads (a lead-II model explained a lead-I record), and an artifact saved with
    preprocess=None was only resampled (a flat, disconnected lead fed as 0.5 mV; the API masks it)."""
    from ecgfm.artifacts import save_classifier
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.data.record import ECGDataError
    from ecgfm.explain.counterfactual import class_thresholds, default_target

    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    save_classifier(tmp_path / "ml", bb, nn.Linear(bb.num_features, 3), None, ["a", "b", "c"], multilabel=True,
                    fs=100.0, window_samples=250, thresholds=[0.04, 0.5, 0.5], extra={"trained_leads": ["II"]})
    w = ECGWrapper.from_checkpoint(tmp_path / "ml")
    assert w.thresholds == (0.04, 0.5, 0.5) and w.trained_leads == ("II",)
    proba = torch.tensor([0.47, 0.30, 0.10])
    assert default_target(proba, True, 0.5) == 0                                   # 0.47 <= 0.5: "not predicted"
    assert default_target(proba, True, class_thresholds(None, w, 3)) == 1         # 0.47 > 0.04: predicted
    t = np.arange(250) / 100.0
    ecg = np.sin(2 * np.pi * t).astype(np.float32)
    with pytest.raises(ECGDataError, match="trained on records with leads II; this record has I"):
        w.prepare(ecg[None], fs=100.0, lead_names=["I"], missing_leads="zero")
    sig = np.stack([ecg, ecg, np.full_like(ecg, 0.5)])                              # V6 disconnected: flat 0.5 mV
    x = w.prepare(sig, fs=100.0, lead_names=["I", "II", "V6"], missing_leads="zero")
    assert w.spec is not None and float(x[0, w.lead_names.index("V6")].abs().max()) == 0.0
    with pytest.raises(ValueError, match="2 thresholds for 3 classes"):
        ECGWrapper(w.model, fs=100.0, class_names=["a", "b", "c"], thresholds=[0.1, 0.2])
