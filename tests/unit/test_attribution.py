"""Explainer / Attribution: every method, agreement with captum, aggregations, errors, encoder explanations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.explain.attribution import (METHODS, Attribution, Explainer, canonical_method, make_baseline,
                                       smoothed_copy)
from ecgfm.explain.waves import wave_windows
from ecgfm.explain.wrapper import ECGWrapper

FS = 100.0
T = 250


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(12, 8, 7, padding=3), nn.ReLU(),
                                      nn.Conv1d(8, 8, 7, padding=3, stride=2), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


def _ecg_like(b: int, seed: int = 0) -> torch.Tensor:
    """Spiky periodic signals (QRS-like bumps every 0.8 s) plus noise: something for R-peak detection."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / FS
    beats = sum(torch.exp(-((t - c) ** 2) / (2 * 0.015 ** 2)) for c in np.arange(0.3, T / FS, 0.8))
    amp = torch.randn(b, 12, 1, generator=g)
    return (amp * beats + 0.05 * torch.randn(b, 12, T, generator=g)).float()


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    torch.manual_seed(0)
    return Explainer(ECGWrapper(TinyCNN(), fs=FS, class_names=("a", "b", "c")))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "attention_rollout"])
def test_every_method_returns_input_shaped_values(explainer, method):
    x = _ecg_like(2)
    opts = {"n_samples": 4} if method in ("smoothgrad", "gradient_shap") else {}
    att = explainer.explain(x, target=[0, 2], method=method, **opts)
    assert isinstance(att, Attribution)
    assert att.values.shape == x.shape and torch.isfinite(att.values).all()
    assert att.method == method and att.target.tolist() == [0, 2]
    assert att.elapsed_s > 0 and att.fs == FS and len(att.lead_names) == 12
    assert att.values.abs().sum() > 0
    json.dumps(att.to_dict())


def test_vit_methods_including_rollout():
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec

    torch.manual_seed(0)
    vit = create_backbone("vit1d_test")
    ex = Explainer(ECGWrapper.from_encoder_and_head(vit, nn.Linear(vit.num_features, 2), PreprocessSpec(fs=100)))
    x = _ecg_like(2)
    for method in ("gradcam", "gradcam++", "attention_rollout", "integrated_gradients"):
        att = ex.explain(x, method=method)
        assert att.values.shape == x.shape and torch.isfinite(att.values).all()
    # Rollout of a token grid varies by lead and patch, constant within a patch up to linear interpolation.
    roll = ex.explain(x, method="attention_rollout").values
    assert roll.min() >= 0 and roll[:, :, 0].std() > 0
    cam = ex.explain(x, method="gradcam", layer="encoder.blocks.0")
    assert cam.options["impl"] == "tokens_to_grid" and cam.values.min() >= 0


def test_aliases_and_errors(explainer):
    assert canonical_method("IG") == "integrated_gradients" and canonical_method("Grad-CAM++") == "gradcam++"
    x = _ecg_like(1)
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        explainer.explain(x, method="lime")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_step'\]"):
        explainer.explain(x, method="ig", n_step=5)
    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        explainer.explain(x, target=7, method="saliency")
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        explainer.explain(x, method="gradcam", layer="conv9")
    with pytest.raises(ValueError, match="5 leads but the model expects 12"):
        explainer.explain(torch.zeros(1, 5, T), method="saliency")
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        explainer.explain(bad, method="saliency")
    with pytest.raises(ValueError, match="attention_maps"):
        explainer.explain(x, method="attention_rollout")
    with pytest.raises(ValueError, match="baseline tensor"):
        explainer.explain(x, method="ig", baselines=torch.zeros(1, 12, 10))


def test_ig_matches_captum_and_is_complete(explainer):
    from captum.attr import IntegratedGradients

    x = _ecg_like(3, seed=1)
    base = smoothed_copy(x, FS)
    att = explainer.explain(x, target=1, method="ig", n_steps=32)
    ref = IntegratedGradients(explainer.wrapper.model).attribute(x, baselines=base, target=1, n_steps=32,
                                                                method="gausslegendre")
    assert torch.allclose(att.values, ref, atol=1e-6)
    with torch.no_grad():
        f = explainer.wrapper(x)[:, 1] - explainer.wrapper(base)[:, 1]
    err = (att.values.sum((1, 2)) - f).abs()
    assert torch.allclose(err, att.delta.abs(), atol=1e-5)
    assert err.max() < 1e-3 * max(1.0, f.abs().max().item())


def test_gradient_shap_smoothed_equals_captum_per_record(explainer):
    """The batched shift trick equals captum's GradientShap with the record's own baseline (same random draws:
    torch and numpy, where captum draws the path coefficients and baseline choices, seeded by the record)."""
    from captum.attr import GradientShap

    from ecgfm.explain.attribution import record_seed

    x = _ecg_like(1, seed=2)
    seed = record_seed(x[0])
    att = explainer.explain(x, target=0, method="gradient_shap", baselines="smoothed", n_samples=8)
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    ref = GradientShap(explainer.wrapper.model).attribute(x, baselines=smoothed_copy(x, FS), target=0, n_samples=8)
    assert torch.allclose(att.values, ref, atol=1e-7)
    bank = _ecg_like(5, seed=3)
    att = explainer.explain(x, method="gradient_shap", bank=bank, n_samples=6)
    assert att.values.shape == x.shape and att.options["bank"] == "tensor(5, 12, 250)"
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    ref = GradientShap(explainer.wrapper.model).attribute(x, baselines=bank, target=att.target, n_samples=6)
    assert torch.allclose(att.values, ref, atol=1e-7)


def test_gradcam_matches_hand_computation(explainer):
    x = _ecg_like(2, seed=4)
    w = explainer.wrapper
    att = explainer.explain(x, target=2, method="gradcam", layer="features.3")
    acts, grads, _ = w.activations_and_gradients(x, "features.3", target=2)
    cam = (grads.mean(-1, keepdim=True) * acts).sum(1).clamp_min(0)                 # (B, T')
    # two "same"-padded k=7 convolutions, the second of stride 2: column k reads input 2k - 6 .. 2k + 6, so it is
    # drawn near sample 2k (measured by a wave sweep: -0.3, within the stride, as random kernels are not symmetric)
    cc = att.options["column_centres"]
    assert cc.startswith("measured by a wave sweep") and cc.endswith(" + k*s)")
    offset = float(cc.rsplit("(", 1)[1].split(" ")[0])
    assert abs(offset) <= 2.0
    up = torch.stack([torch.as_tensor(np.interp(np.arange(T), offset + 2.0 * np.arange(cam.shape[1]), c.numpy()))
                      for c in cam]).float()
    assert torch.allclose(att.values[:, 0], up, atol=1e-6)
    assert torch.allclose(att.values[:, 5], att.values[:, 0])                      # broadcast to every lead
    pp = explainer.explain(x, target=2, method="gradcam++", layer="features.3")
    assert pp.values.min() >= 0 and pp.values.shape == x.shape


def test_ablation_values_sum_to_effects(explainer):
    x = _ecg_like(2, seed=6)
    w = explainer.wrapper
    att = explainer.explain(x, target=0, method="lead_ablation")
    with torch.no_grad():
        full = w(x)[:, 0]
        for lead in (0, 7):
            xa = x.clone()
            xa[:, lead] = 0
            assert torch.allclose(att.per_lead("signed")[:, lead], full - w(xa)[:, 0], atol=1e-5)
    wave = explainer.explain(x, target=0, method="wave_ablation", baselines="zeros")
    assert wave.options["n_beats"] == [3, 3]
    per_wave = wave.per_wave(reduce="signed")
    r = [np.array([30, 110, 190])] * 2
    win = wave_windows(r[0], FS, T)
    with torch.no_grad():
        xa = x.clone()
        for a, b in win["QRS"]:
            xa[:, :, a:b] = 0
        effect = full - w(xa)[:, 0]
    assert torch.allclose(per_wave["QRS"], effect, atol=1e-4)


def test_occlusion_matches_manual_window(explainer):
    x = _ecg_like(1, seed=7)
    w = explainer.wrapper
    att = explainer.explain(x, target=1, method="occlusion", window_s=0.2, stride_s=0.2, baselines="zeros")
    with torch.no_grad():
        xa = x.clone()
        xa[:, 4, 20:40] = 0
        effect = (w(x) - w(xa))[0, 1]
    assert torch.allclose(att.values[0, 4, 25], effect, atol=1e-5)
    assert att.options["window"] == 20


def test_aggregations(explainer):
    x = _ecg_like(2, seed=8)
    att = explainer.explain(x, method="input_x_gradient")
    assert torch.allclose(att.per_lead().sum(1), att.values.abs().sum((1, 2)))
    beats = att.per_beat()
    assert [b.shape[0] for b in beats] == [3, 3]
    assert torch.allclose(torch.stack([b.sum() for b in beats]), att.values.abs().sum((1, 2)), atol=1e-4)
    waves = att.per_wave()
    total = sum(waves[k] for k in ("P", "QRS", "T", "other"))
    assert torch.allclose(total, att.values.abs().sum((1, 2)), atol=1e-4)
    assert waves["QRS"].shape == (2,) and att.per_wave(by_lead=True)["T"].shape == (2, 12)
    d = att.to_dict()
    assert d["method"] == "input_x_gradient" and len(d["per_lead"]) == 2 and d["shape"] == [2, 12, T]


def test_baselines():
    x = _ecg_like(2)
    assert make_baseline("zeros", x, FS).abs().sum() == 0
    sm = make_baseline("smoothed", x, FS)
    assert sm.shape == x.shape and sm.abs().max() < 0.5 * x.abs().max()   # the QRS-like spikes are gone
    assert make_baseline("median", x, FS).shape == x.shape
    assert make_baseline(torch.ones(12, T), x, FS).shape == (1, 12, T)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("noise", x, FS)


@pytest.mark.parametrize("backbone", ["resnet1d_test", "vit1d_test"])
def test_explain_embedding(backbone):
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec

    torch.manual_seed(0)
    enc = create_backbone(backbone).eval()
    ex = Explainer(ECGWrapper.from_encoder_and_head(enc, None, PreprocessSpec(fs=100)))
    x = _ecg_like(2, seed=9)
    att = ex.explain_embedding(x, method="ig", n_steps=64)
    assert att.target is None and "own" in att.options["objective"]
    with torch.no_grad():
        e = enc.embed(x)
        u = e / e.norm(dim=1, keepdim=True)
        f = (e * u).sum(1) - (enc.embed(smoothed_copy(x, FS)) * u).sum(1)
    assert torch.allclose(att.values.sum((1, 2)) - f, att.delta, atol=1e-4)
    ref = ex.explain_embedding(x, reference=x[:1], method="saliency")
    assert ref.values.shape == x.shape and "reference" in ref.options["objective"]
    # Input 0 compared with itself: cosine is maximal, so its gradient vanishes; input 1's does not.
    assert ref.values[0].abs().max() < 1e-3 * ref.values[1].abs().max()
    d = torch.randn(enc.num_features)
    att = ex.explain_embedding(x, direction=d, method="gradcam")
    assert att.values.shape == x.shape
    with pytest.raises(ValueError, match="direction has 3 values"):
        ex.explain_embedding(x, direction=torch.ones(3))
    with pytest.raises(ValueError, match="either reference= or direction="):
        ex.explain_embedding(x, reference=x, direction=d)


def test_baseline_bank_from_normal_records(explainer):
    from ecgfm.data.synthetic import generate_record

    from ecgfm.explain.attribution import baseline_bank

    recs = [generate_record(i, seed=0, fs=500.0, duration=3.0, cls="normal_sinus") for i in range(3)]
    bank = baseline_bank(explainer.wrapper, recs, n_samples=T, max_records=2)
    assert bank.shape == (2, 12, T) and torch.isfinite(bank).all()
    att = explainer.explain(_ecg_like(2), method="gradient_shap", bank=bank, n_samples=4)
    assert att.values.shape == (2, 12, T)
    # a bank of as many ECGs as records is a bank (bank=), not one baseline per record: record 0's map is the
    # same in a batch of 2 and of 3 (as baselines= the 2-ECG tensor paired one reference per record)
    three = explainer.explain(torch.cat([_ecg_like(2), _ecg_like(1, seed=9)]), method="gradient_shap", bank=bank,
                              n_samples=4)
    assert torch.allclose(att.values[0], three.values[0], atol=1e-7)
    with pytest.raises(ValueError, match="bank="):
        explainer.explain(_ecg_like(3), method="gradient_shap", baselines=bank, n_samples=4)
    with pytest.raises(ValueError, match="at least one record"):
        baseline_bank(explainer.wrapper, [])


# ------------------------------------------------------------------------ issue 9: a method that cannot rank leads
def test_lead_ranking_withholds_ties_and_degenerate_shares():
    from ecgfm.explain.attribution import lead_ranking

    assert lead_ranking(torch.tensor([0.1, 0.5, 0.3, 0.2]), 2) == [1, 2]
    assert lead_ranking(torch.full((12,), 1 / 12), 3) is None              # equal shares: no ranking
    assert lead_ranking(torch.full((12,), 1 / 12) + 1e-9 * torch.arange(12), 3) is None   # float noise only
    assert lead_ranking(torch.zeros(12), 3) is None
    assert lead_ranking(torch.tensor([0.5, 0.5, 0.0, 0.0]), 3) == [0, 1]  # a tie at the cut is not broken
    assert lead_ranking(torch.tensor([0.4, 0.2, 0.2, 0.2]), 2) == [0]
    assert lead_ranking(torch.tensor([float("nan"), 0.1, 0.2]), 2) is None


def test_cnn_gradcam_cannot_rank_leads(explainer):
    """A CNN's last feature map has no lead axis: Grad-CAM's map is the same in every lead, so its per-lead
    shares are exactly 1/12 and it must say it cannot rank leads rather than list "top leads"."""
    att = explainer.explain(_ecg_like(2), target=[0, 1], method="gradcam", relu=False)
    shares = att.per_lead() / att.per_lead().sum(1, keepdim=True)
    assert torch.allclose(shares, torch.full_like(shares, 1 / 12))
    assert att.lead_resolution == "none" and att.ranks_leads is False
    assert att.top_leads() == [None, None]
    d = json.loads(json.dumps(att.to_dict()))
    assert d["ranks_leads"] is False and d["top_leads"] == [None, None] and d["lead_resolution"] == "none"


def test_equal_shares_are_detected_whatever_the_method(explainer):
    x = _ecg_like(1)
    att = explainer.explain(x, target=0, method="saliency")
    assert att.ranks_leads and att.top_leads()[0] is not None and len(att.top_leads()[0]) == 3
    flat = Attribution(values=att.values[:, :1].expand_as(att.values).clone(), method="saliency", options={},
                       target=att.target, inputs=x, fs=FS, lead_names=att.lead_names, elapsed_s=0.0)
    assert flat.lead_resolution == "per-lead" and flat.ranks_leads is False and flat.top_leads() == [None]


def test_vit_token_gradcam_ranks_leads():
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec

    torch.manual_seed(0)
    vit = create_backbone("vit1d_test")
    ex = Explainer(ECGWrapper.from_encoder_and_head(vit, nn.Linear(vit.num_features, 2), PreprocessSpec(fs=100)))
    att = ex.explain(_ecg_like(1), method="gradcam")
    assert att.lead_resolution == "per-lead" and att.ranks_leads


def test_explain_report_prints_no_top_leads_for_a_lead_agnostic_method(explainer):
    from ecgfm.explain.report import _lead_summary

    att = explainer.explain(_ecg_like(1), target=0, method="gradcam", relu=False)
    summary = _lead_summary(att, att.lead_names)
    assert summary["top"] is None and summary["ranks_leads"] is False and "no lead ranking" in summary["note"]
    ok = _lead_summary(explainer.explain(_ecg_like(1), target=0, method="saliency"), att.lead_names)
    assert ok["ranks_leads"] is True and len(ok["top"]) == 3


def test_lead_importance_figure_flags_a_method_without_lead_ranking():
    from ecgfm.explain.visualize import plot_lead_importance

    fig = plot_lead_importance({"gradcam": np.full(12, 2.0), "ig": np.arange(12.0)})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "gradcam (no lead ranking)" in labels and "ig" in labels


def test_a_model_left_in_train_mode_is_explained_as_it_predicts():
    """Dropout and BatchNorm: with the model left in train mode, the predicted target, the embedding reference and
    the faithfulness curves are computed in eval mode (the targets are the eval predictions, BatchNorm statistics
    are not overwritten by the explained batch), and the mode found is restored."""
    from ecgfm.explain.faithfulness import perturbation_curve

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12 * T, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(64, 5))
    w = ECGWrapper(model, fs=FS, postprocess="softmax", encoder=model[:5])
    x = _ecg_like(16)
    model.train()                                   # warm the running statistics away from their initial values
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        pred = w(x).argmax(1)
    stats = model[2].running_mean.clone()
    model.train()
    ex = Explainer(w)
    att = ex.explain(x, target=None, method="saliency")
    assert torch.equal(att.target, pred) and torch.equal(model[2].running_mean, stats) and model.training
    emb = ex.explain_embedding(x, method="saliency")
    assert torch.equal(model[2].running_mean, stats) and model.training and emb.values.shape == x.shape
    curve = perturbation_curve(w, x, att, steps=4)["curve"]
    assert torch.equal(model[2].running_mean, stats) and model.training
    model.eval()
    np.testing.assert_allclose(curve.numpy(), perturbation_curve(w, x, att, steps=4)["curve"].numpy(), atol=1e-6)


@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_noise_is_scaled_to_each_record_not_to_the_batch(squared):
    """f(x) = sum(x^2): SmoothGrad's map is 2x (its mean is exact), SmoothGrad^2's has expectation 4(x^2 + sigma^2),
    so its mean over a record shows the noise scale it got: sigma = noise_level * std(x_i) of that record alone,
    whether it is explained alone or beside a record 50 times larger."""
    class Square(nn.Module):
        def forward(self, x):
            return (x ** 2).flatten(1).sum(1, keepdim=True).repeat(1, 2)

    w = ECGWrapper(Square(), fs=FS, encoder=nn.Identity())
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 12, T, generator=g)
    both = torch.cat([a, 50 * torch.randn(1, 12, T, generator=g)])
    ex = Explainer(w)
    alone = ex.explain(a, target=0, method="smoothgrad", n_samples=64, squared=squared)
    batched = ex.explain(both, target=0, method="smoothgrad", n_samples=64, squared=squared)
    sigma = 0.15 * float(a.std())
    assert batched.options["stdev"][0] == pytest.approx(sigma) == alone.options["stdev"][0]
    for att in (alone, batched):
        got = att.values[0]
        if squared:   # mean over 3,000 samples of an estimate of 4(x^2 + sigma^2)
            want = 4 * (a[0] ** 2 + sigma ** 2)
            assert float(got.mean()) == pytest.approx(float(want.mean()), rel=0.05)
        else:
            torch.testing.assert_close(got, 2 * a[0], rtol=0.05, atol=0.05 * float(a.abs().max()))


def test_gradcam_of_a_strided_resnet_peaks_where_its_column_reads_the_input():
    """ecgfm's ResNets downsample with "same"-padded strided convolutions (total stride 32), so a column's receptive
    field is symmetric about k*32; but the AvgPool(2) shortcut of each strided block reads samples 2j, 2j + 1, so
    the column answers for the input to the right of k*32. Drawn at the field's midpoint k*32 (2026-12-06 until
    review s23), every map was ~13-18 samples early here; the offset is now measured by a wave sweep (see
    tests/unit/test_gradcam_placement_s23.py for the sweep at every sample), a Grad-CAM call reports it, and a
    ViT's token grid keeps its exact patch centres."""
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.explain.attribution import _Job, _measured_column_offset, _upsample_grid

    torch.manual_seed(0)
    bb = create_backbone("resnet1d_tiny")
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm1d):
            nn.init.uniform_(m.weight, 0.5, 1.5)          # trained-like scales, not the zero-initialised residuals
    w = ECGWrapper.from_encoder_and_head(bb, nn.Linear(bb.num_features, 2), None, fs=100.0)
    t = np.arange(1000)
    feats = {}
    hook = bb.stages.register_forward_hook(lambda _m, _i, o: feats.__setitem__("a", o.detach()))
    try:
        with torch.no_grad():
            w(torch.zeros(1, 12, 1000))
        a0 = feats["a"]
        for t0 in (320, 480, 640):
            x = torch.tensor(np.exp(-((t - t0) ** 2) / (2 * 2.0 ** 2)), dtype=torch.float32).expand(1, 12, 1000)
            x = x.contiguous()
            job = _Job(wrapper=w, fn=w.model, x=x, target=torch.zeros(1, dtype=torch.long), args=None, fs=100.0)
            offset = _measured_column_offset(job, "encoder.stages", None)
            assert offset is not None and 8.0 <= offset <= 24.0          # measured 13.5
            with torch.no_grad():
                w(x)
            resp = (feats["a"] - a0).abs().sum(1)[:, None, None]            # (1, 1, 1, W): the columns that moved
            col = int(resp.argmax())
            assert abs(col * 32 - t0) <= 32                                  # a column whose field holds the bump
            drawn = _upsample_grid(resp, 12, 1000, offset)[0, 0]
            assert abs(int(drawn.argmax()) - (offset + col * 32)) <= 1       # drawn at that column's centre
        # a bump at each of 64 positions on the zero line: drawn - bump is -5 on average with the measured
        # placement (13.5: the sweep runs on noise; this untrained model answers for 32k + 18.5 on a zero line,
        # for 32k + 11.5 .. 15 on noisy records), -18.5 with the support midpoint
        pos = torch.arange(448, 512)
        with torch.no_grad():
            w(torch.exp(-0.5 * ((torch.arange(1000.0) - pos[:, None]) / 2.0) ** 2)[:, None].expand(-1, 12, -1))
        resp = (feats["a"] - a0).abs().sum(1)[:, None, None]
        drawn = _upsample_grid(resp, 12, 1000, offset)[:, 0].argmax(-1)
        assert abs(float((drawn - pos).float().mean())) <= 8.0
        # the receptive field is symmetric about k*32 (gradient support on a noise input): its midpoint is not
        # where the column answers
        xn = torch.randn(1, 12, 1000, requires_grad=True)
        bb.eval()
        (g,) = torch.autograd.grad(bb.forward_features(xn)[..., 16].sum(), xn)
        nz = torch.nonzero(g.abs().sum((0, 1)) > 0).flatten()
        assert abs((int(nz[0]) + int(nz[-1])) / 2 - 16 * 32) <= 1
    finally:
        hook.remove()
    att = Explainer(w).explain(x, target=0, method="gradcam", layer="encoder.stages")
    assert att.options["column_centres"] == f"measured by a wave sweep: the centre of the wave positions each " \
                                            f"column responds to most ({offset:g} + k*s)"
    vit = create_backbone("vit1d_test")
    wv = ECGWrapper.from_encoder_and_head(vit, nn.Linear(vit.num_features, 2), None, fs=100.0, n_samples=250)
    att = Explainer(wv).explain(torch.randn(1, 12, 250), target=0, method="gradcam")
    assert att.options["column_centres"].startswith("patch centres")


def test_grid_columns_sit_on_their_stride_not_stretched_over_the_record():
    """A CNN with total stride 32 gives ceil(1000 / 32) = 32 columns for 1000 samples: column k covers samples
    32k .. 32k + 31, so a map that is one column must peak there (stretching 32 columns over 1000 samples drew
    column 30 at ~953 instead of ~975, 0.2 s early at 100 Hz); a ViT's exact tiling is unchanged."""
    import torch

    from ecgfm.explain.attribution import _upsample_grid

    cam = torch.zeros(1, 1, 1, 32)
    cam[..., 30] = 1.0
    up = _upsample_grid(cam, 12, 1000)
    assert up.shape == (1, 12, 1000)
    assert up[0, 0].argmax().item() in (30 * 32 + 15, 30 * 32 + 16)   # the column's centre
    cam = torch.zeros(1, 1, 1, 994)                     # an unpadded k=7 convolution: T - 6 columns, not strided
    cam[..., 497] = 1.0
    cam[..., 993] = 1.0
    up = _upsample_grid(cam, 1, 1000)[0, 0]
    assert abs(up[:750].argmax().item() - 500) <= 1 and up[990:].max() > 0.5     # stretched, the end kept
    grid = torch.zeros(1, 1, 12, 40)                    # per-lead grid, 40 patches of 25 samples: exact tiling
    grid[0, 0, 3, 7] = 1.0
    up = _upsample_grid(grid, 12, 1000)
    assert up[0, 3].argmax().item() in (7 * 25 + 12, 7 * 25 + 13) and up[0].sum(1).argmax().item() == 3


def test_gradcam_on_a_channels_last_model_needs_its_layer_layout():
    """``input_layout="BTL"``: a ``(B, T, C)`` hidden layer was read as ``(B, C, T')`` (16 channels stretched over
    the record as if they were time). Without ``layer_layout`` it is refused; with ``"BTC"`` the map is Grad-CAM
    over the time axis: ``sum_c mean_t(dS/dA[t, c]) * A[t, c]`` at each of the 500 samples."""
    import pytest
    import torch
    from torch import nn

    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.wrapper import ECGWrapper

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.act, self.head = nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2)

        def forward(self, x):                       # (B, T, 12)
            return self.head(self.act(self.proj(x))[:, 200:220].mean(1))

    torch.manual_seed(0)
    model = ChannelsLast()
    w = ECGWrapper(model, fs=100.0, input_layout="BTL", class_names=("a", "b"))
    x = torch.randn(1, 12, 500)
    ex = Explainer(w)
    for method in ("gradcam", "gradcam_pp"):
        with pytest.raises(ValueError, match="layer_layout"):
            ex.explain(x, target=0, method=method, layer="act")
    att = ex.explain(x, target=0, method="gradcam", layer="act", relu=False, layer_layout="BTC")
    assert att.options["layer_layout"] == "BTC"
    xt = x.transpose(1, 2).requires_grad_(False)
    a = model.act(model.proj(xt)).detach().requires_grad_(True)
    score = model.head(a[:, 200:220].mean(1))[0, 0]
    (g,) = torch.autograd.grad(score, a)
    ref = (g.mean(1, keepdim=True) * a).sum(-1)[0].detach()      # (500,)
    torch.testing.assert_close(att.values[0, 0], ref, atol=1e-5, rtol=1e-4)


def test_per_wave_density_is_per_lead_and_sample():
    """normalize=True: the mean |attribution| per lead and sample (an all-ones map gives 1 for every wave, with
    or without by_lead; it gave the number of leads without)."""
    import torch

    from ecgfm.data.synthetic import generate_record
    from ecgfm.explain.attribution import Attribution

    rec = generate_record(0, seed=0, fs=100.0, duration=10.0)
    x = torch.as_tensor(rec.signal)[None]
    from ecgfm.data.record import CANONICAL_LEADS

    att = Attribution(values=torch.ones_like(x), method="saliency", options={}, target=torch.tensor([0]), inputs=x,
                      fs=100.0, lead_names=tuple(CANONICAL_LEADS), elapsed_s=0.0)
    for by_lead in (False, True):
        dens = att.per_wave(normalize=True, by_lead=by_lead)
        for w, v in dens.items():
            torch.testing.assert_close(v, torch.ones_like(v), msg=w)


@pytest.mark.parametrize("method,options", [("smoothgrad", {}), ("gradient_shap", {}),
                                            ("gradient_shap", {"baselines": "zeros"})])
def test_stochastic_maps_of_a_record_are_the_same_alone_or_in_a_batch(method, options):
    """NoiseTunnel drew the noise of the whole batch from the global RNG: a record's SmoothGrad map changed with
    the records batched beside it (0.5 relative at 4 samples); GradientSHAP's interpolation points and baseline
    picks (numpy and torch, whole batch) changed it by ~0.09 and with the global seeds. The global RNGs are left as
    they were."""
    torch.manual_seed(0)
    w = ECGWrapper(TinyCNN(), fs=FS, postprocess="softmax")
    x = _ecg_like(3)
    ex = Explainer(w)
    torch.manual_seed(5)
    np.random.seed(5)
    batch = ex.explain(x, target=1, method=method, n_samples=4, **options).values
    after = (torch.rand(1), np.random.rand())
    torch.manual_seed(5)
    np.random.seed(5)
    assert (torch.rand(1), np.random.rand()) == after       # the global streams were not advanced or reseeded
    torch.manual_seed(9)
    np.random.seed(9)
    alone = ex.explain(x[1:2], target=1, method=method, n_samples=4, **options).values
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)
