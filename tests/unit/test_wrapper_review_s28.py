"""Review s28 of the explain wrapper, the attribution options and the API: a one-logit model under softmax, the
train / eval mode of sub-modules, a channels-last model's encoder, lead-subset normalisation, class names against
the outputs, method options out of range, NumPy baselines, float64 / bfloat16 models, ``batch_size`` and
DeepLift's message for a model without an input gradient."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ecgfm
from ecgfm.artifacts import ArtifactError, save_classifier
from ecgfm.backbones import create_backbone
from ecgfm.config import ConfigError
from ecgfm.data.preprocess import PreprocessSpec, preprocess_signal
from ecgfm.data.record import CANONICAL_LEADS, map_leads
from ecgfm.explain.attribution import Explainer
from ecgfm.explain.wrapper import ECGWrapper

FS = 100.0
T = 256


class TinyCNN(nn.Module):
    def __init__(self, leads: int = 12, classes: int = 3, drop: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(leads, 8, 7, padding=3), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Conv1d(8, 8, 7, padding=3, stride=2), nn.ReLU())
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean(-1)))


def _x(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((b, 12, T)).astype(np.float32))


# ------------------------------------------------------------------ 1. one output under softmax
class _OneLogit(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyCNN(classes=1)

    def forward(self, x):
        return self.net(x)[:, 0]          # (B,): one logit


def test_one_logit_model_with_softmax_is_refused_and_sigmoid_works():
    torch.manual_seed(0)
    w = ECGWrapper(_OneLogit().eval(), fs=FS)            # postprocess defaults to softmax: always 1 before
    with pytest.raises(ValueError, match=r"one output .*postprocess='softmax'.*postprocess='sigmoid'"):
        w.predict_proba(_x())
    with pytest.raises(ValueError, match="postprocess='sigmoid'"):
        Explainer(w).explain(_x(), method="saliency", output="proba")
    with pytest.raises(ValueError, match=r"one output \('AF'\).*postprocess='sigmoid'"):
        ECGWrapper(_OneLogit(), fs=FS, class_names=["AF"])                     # known at construction
    ok = ECGWrapper(_OneLogit().eval(), fs=FS, postprocess="sigmoid", class_names=["AF"])
    p = ok.predict_proba(_x(3))
    assert p.shape == (3, 1) and torch.allclose(p, ok(_x(3)).sigmoid())
    assert Explainer(ok).explain(_x(), method="saliency", output="proba").values.abs().max() > 0


def test_single_class_softmax_artifact_is_refused_by_saver_and_loader(tmp_path):
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test").eval()
    head = nn.Linear(bb.num_features, 1)
    with pytest.raises(ArtifactError, match=r"one class \('AF'\) with multilabel false.*multilabel=True"):
        save_classifier(tmp_path / "soft", bb, head, PreprocessSpec(fs=FS), ["AF"], False, window_samples=250)
    # a binary classifier saved as multi-label (one sigmoid output) is fine, and one edited to softmax is refused
    out = save_classifier(tmp_path / "sig", bb, head, PreprocessSpec(fs=FS), ["AF"], True, window_samples=250)
    p = ecgfm.Classifier.load(out).predict_proba(_x(1)[0].numpy(), fs=FS)
    assert p.shape == (1, 1) and 0.0 < float(p.iloc[0, 0]) < 1.0
    meta = json.loads((out / "classifier.json").read_text())
    (out / "classifier.json").write_text(json.dumps({**meta, "multilabel": False}))
    with pytest.raises(ArtifactError, match="one class"):
        ecgfm.Classifier.load(out)


# ------------------------------------------------------------------ 2. modes
def test_wrapper_keeps_the_callers_mode_of_every_sub_module_and_runs_in_eval():
    torch.manual_seed(0)
    m = TinyCNN(drop=0.5)
    m.train()
    w = ECGWrapper(m, fs=FS, encoder=m.features)
    assert m.training and all(mod.training for mod in m.modules())     # left as the caller had it
    seen = []
    m.register_forward_pre_hook(lambda mod, inp: seen.append(any(s.training for s in mod.modules())))
    m.features.eval()                                                  # a linear probe's frozen backbone
    stats = m.features[1].running_mean.clone()
    x = _x()
    w.predict_proba(x)
    assert m.training and m.head.training and not m.features.training and not m.features[1].training
    Explainer(w).explain(x, method="saliency")
    w(x)                                                               # a direct call too
    w.embed(x)
    assert m.training and m.head.training and not m.features.training and not m.features[1].training
    assert torch.equal(m.features[1].running_mean, stats)
    assert seen and not any(seen)                                      # every forward pass in eval mode


# ------------------------------------------------------------------ 3. channels-last encoder
class _ChannelsLastEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 16)

    def forward(self, x):                 # (B, T, L)
        return torch.tanh(self.proj(x)).mean(1)


class _ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _ChannelsLastEncoder()
        self.head = nn.Linear(16, 3)

    def forward(self, x):                 # (B, T, L)
        return self.head(self.encoder(x))


def test_btl_model_encoder_gets_the_models_layout():
    torch.manual_seed(0)
    m = _ChannelsLast().eval()
    w = ECGWrapper(m, fs=FS, input_layout="BTL")
    x = _x()
    assert torch.allclose(w.embed(x), m.encoder(x.transpose(1, 2)), atol=1e-6)
    square = torch.randn(2, 12, 12)                                    # T == L ran silently on (B, L, T)
    assert torch.allclose(w.embed(square), m.encoder(square.transpose(1, 2)), atol=1e-6)
    assert Explainer(w).explain_embedding(x, method="saliency").values.shape == x.shape


# ------------------------------------------------------------------ 4. lead-subset record-scope normalisation
def test_lead_subset_classifier_is_normalised_over_its_own_leads_in_api_and_wrapper(tmp_path):
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test", num_leads=3).eval()
    spec = PreprocessSpec(fs=FS, normalize_scope="record")
    leads = ("I", "II", "V1")
    save_classifier(tmp_path / "clf", bb, nn.Linear(bb.num_features, 3), spec, ["a", "b", "c"], False,
                    window_samples=250, leads=leads)
    x = np.random.default_rng(0).standard_normal((12, 250)).astype(np.float32)
    x[6:] *= 8.0                                                       # large V2..V6, which the model never reads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_api = ecgfm.Classifier.load(tmp_path / "clf").predict_proba(x, fs=FS).to_numpy()[0]
        w = ECGWrapper.from_checkpoint(tmp_path / "clf")
        xin = w.prepare(x, fs=FS, lead_names=CANONICAL_LEADS)
    p_wrap = w.predict_proba(xin).numpy()[0]
    np.testing.assert_allclose(p_api, p_wrap, atol=1e-5)
    # the reference: the record on the model's leads only, as the training pipeline prepares a lead subset
    x12, mask, _ = map_leads(x, list(CANONICAL_LEADS))
    only = mask & np.isin(CANONICAL_LEADS, leads)
    ref, _, _ = preprocess_signal(np.where(only[:, None], x12, 0.0), FS, only, spec)
    np.testing.assert_allclose(xin[0].numpy(), ref[[CANONICAL_LEADS.index(lead) for lead in leads]], atol=1e-5)


# ------------------------------------------------------------------ 5. class names against the outputs
def test_class_names_num_classes_and_thresholds_are_checked_against_the_outputs():
    torch.manual_seed(0)
    x = _x()
    bad = ECGWrapper(TinyCNN(classes=3).eval(), fs=FS, class_names=("NORM", "AF"))
    with pytest.raises(ValueError, match=r"2 class_names \['NORM', 'AF'\] but the model has 3 outputs"):
        Explainer(bad).explain(x, method="saliency")
    with pytest.raises(ValueError, match="num_classes=4 but the model has 3 outputs"):
        ECGWrapper(TinyCNN(classes=3).eval(), fs=FS, num_classes=4).predict_proba(x)
    with pytest.raises(ValueError, match="2 thresholds but the model has 3 outputs"):
        ECGWrapper(TinyCNN(classes=3).eval(), fs=FS, postprocess="sigmoid", thresholds=[0.5, 0.5]).predict_proba(x)
    good = ECGWrapper(TinyCNN(classes=3).eval(), fs=FS, class_names=("a", "b", "c"))
    assert good.predict_proba(x).shape == (2, 3)


# ------------------------------------------------------------------ 6. method options
@pytest.mark.parametrize("method, options, name", [
    ("occlusion", {"lead_window": 0}, "occlusion.lead_window"),
    ("occlusion", {"lead_window": 13}, "occlusion.lead_window"),
    ("occlusion", {"window_s": -0.2}, "occlusion.window_s"),
    ("occlusion", {"window_s": 0}, "occlusion.window_s"),
    ("occlusion", {"stride_s": -0.1}, "occlusion.stride_s"),
    ("occlusion", {"perturbations_per_eval": 0}, "occlusion.perturbations_per_eval"),
    ("smoothgrad", {"n_samples": 0}, "smoothgrad.n_samples"),
    ("smoothgrad", {"n_samples": 4, "noise_level": -0.1}, "smoothgrad.noise_level"),
    ("gradient_shap", {"n_samples": 0}, "gradient_shap.n_samples"),
    ("gradient_shap", {"n_samples": 3, "stdevs": -1.0}, "gradient_shap.stdevs"),
    ("ig", {"n_steps": 0}, "integrated_gradients.n_steps"),
    ("ig", {"n_steps": 2.5}, "integrated_gradients.n_steps"),
    ("lead_ablation", {"perturbations_per_eval": 0}, "lead_ablation.perturbations_per_eval"),
])
def test_method_options_out_of_range_are_refused_naming_the_option(method, options, name):
    torch.manual_seed(0)
    w = ECGWrapper(TinyCNN().eval(), fs=FS)
    with pytest.raises(ConfigError, match=rf"method_options\.{name}'"):
        Explainer(w).explain(_x(), method=method, target=0, **options)


def test_valid_occlusion_options_still_run():
    torch.manual_seed(0)
    w = ECGWrapper(TinyCNN().eval(), fs=FS)
    a = Explainer(w).explain(_x(), method="occlusion", target=0, window_s=0.3, stride_s=0.1, lead_window=12)
    assert torch.isfinite(a.values).all() and a.options["window"] == 30 and a.options["stride"] == 10


# ------------------------------------------------------------------ 7. NumPy baselines
@pytest.mark.parametrize("method", ["ig", "occlusion", "deeplift", "gradient_shap"])
def test_numpy_baseline_is_read_as_the_same_tensor(method):
    torch.manual_seed(0)
    w = ECGWrapper(TinyCNN().eval(), fs=FS)
    x = _x()
    base = np.random.default_rng(1).standard_normal((12, T)).astype(np.float32) * 0.1
    opts = {"n_samples": 3} if method == "gradient_shap" else {}
    by_array = Explainer(w).explain(x, method=method, target=0, baselines=base, **opts).values
    by_tensor = Explainer(w).explain(x, method=method, target=0, baselines=torch.from_numpy(base), **opts).values
    assert torch.allclose(by_array, by_tensor, atol=1e-6)


# ------------------------------------------------------------------ 8. float64 / bfloat16 models
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-4), (torch.bfloat16, None)])
def test_float64_and_bfloat16_models_are_explained(dtype, rtol):
    torch.manual_seed(0)
    ref_model = TinyCNN().eval()
    model = TinyCNN().eval()
    model.load_state_dict(ref_model.state_dict())
    model.to(dtype)
    x = _x()
    w, ref = ECGWrapper(model, fs=FS), ECGWrapper(ref_model, fs=FS)
    assert w.num_classes == 3 and w(x).dtype == torch.float32
    for method in ("saliency", "ig", "occlusion"):
        a = Explainer(w).explain(x, method=method, target=0).values
        r = Explainer(ref).explain(x, method=method, target=0).values
        assert a.dtype == torch.float32 and torch.isfinite(a).all() and a.abs().max() > 0
        if rtol is not None:   # bfloat16 keeps 8 bits: its maps are the same model's, at that precision
            assert float((a - r).abs().max() / r.abs().max()) < rtol, method


# ------------------------------------------------------------------ 9. batch_size, DeepLift's message
@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_api_batch_size_must_be_a_positive_int(tmp_path, bad):
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test").eval()
    out = save_classifier(tmp_path / "clf", bb, nn.Linear(bb.num_features, 2), PreprocessSpec(fs=FS), ["a", "b"],
                          False, window_samples=250)
    x = np.random.default_rng(0).standard_normal((12, 500)).astype(np.float32)
    clf = ecgfm.Classifier.load(out)
    with pytest.raises(ValueError, match=f"batch_size must be a positive whole number .*got {bad!r}"):
        clf.predict_proba(x, fs=FS, batch_size=bad)
    enc = ecgfm.Encoder.load(ecgfm.artifacts.save_encoder(tmp_path / "enc", bb, None, fs=FS, window_samples=250))
    with pytest.raises(ValueError, match=f"batch_size must be a positive whole number .*got {bad!r}"):
        enc.embed(x, fs=FS, batch_size=bad)
    assert clf.predict_proba(x, fs=FS, batch_size=1).shape == (1, 2)


class _FrozenBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyCNN().features
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            z = self.backbone(x).mean(-1)
        return self.head(z)


class _ReusedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(12, 8, 7, padding=3), nn.Conv1d(8, 8, 7, padding=3)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.c2(self.act(self.c1(x)))).mean(-1))


def test_deeplift_names_the_true_cause():
    torch.manual_seed(0)
    x = _x()
    with pytest.raises(ValueError, match="no gradient with respect to its input") as info:
        Explainer(ECGWrapper(_FrozenBackbone().eval(), fs=FS)).explain(x, method="deeplift", target=0)
    assert "used more than once" not in str(info.value).split("(")[0]
    with pytest.raises(ValueError, match="non-linearity module is used more than once"):
        Explainer(ECGWrapper(_ReusedReLU().eval(), fs=FS)).explain(x, method="deeplift", target=0)
