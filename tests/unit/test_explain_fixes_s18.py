"""Review s18 of the explain stage: token maps of an encoder reading ``input_leads`` land on their own leads, the
explain stage warns about absent leads and volts as the API does (and names the absent leads in report.json), the
counterfactual's L1 / L2 are means over the recorded signal, the method comparison's colour scale and SmoothGrad's
noise leave absent leads and padding out, and counterfactual settings that cannot work are refused."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS, ECGRecord

FS = 100.0


class _TinyCNN(nn.Module):
    def __init__(self, n_leads: int = 12):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(n_leads, 8, 7, padding=3), nn.ReLU(),
                                      nn.Conv1d(8, 8, 7, padding=3, stride=2), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


def _ecg(t: int = 500, seed: int = 0) -> torch.Tensor:
    """``(1, 12, t)``: a Gaussian beat every 0.8 s with a random amplitude per lead, plus noise."""
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(t) / FS
    beats = sum(torch.exp(-((s - c) ** 2) / (2 * 0.015 ** 2)) for c in np.arange(0.3, t / FS, 0.8))
    return (torch.randn(1, 12, 1, generator=g) * beats + 0.05 * torch.randn(1, 12, t, generator=g)).float()


def _wrapper(**kwargs):
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    return ECGWrapper(_TinyCNN().eval(), fs=FS, class_names=("a", "b", "c"), **kwargs)


def _one_lead(x: torch.Tensor, lead: int = 0) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[:, lead] = x[:, lead]
    return out


# ------------------------------------------------------------------------- 1. token maps of an input_leads encoder
def _stmem_wrapper(leads):
    from ecgfm.artifacts import EncoderClassifier
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    bb = create_backbone("stmem_vit", input_leads=leads)      # tiny: 250 samples, patches of 25
    w = ECGWrapper(EncoderClassifier(bb, nn.Linear(bb.width, 2)), fs=FS, n_samples=250,
                   preprocess=PreprocessSpec(fs=FS, normalize="none"))
    x = w.prepare(_ecg(250, seed=1)[0].numpy(), fs=FS, lead_names=CANONICAL_LEADS)
    return bb, w, x


@pytest.mark.parametrize("leads", [["V1", "I"], ["II"]])
def test_gradcam_of_an_input_leads_vit_puts_each_token_row_on_its_own_lead(leads):
    """ST-MEM reading V1 then I: the token grid's rows are in that order; the map of V1's tokens is drawn on V1
    (it was interpolated over the 12 canonical rows, so I's map landed near V1 and the reverse)."""
    from ecgfm.explain.attribution import Explainer

    bb, w, x = _stmem_wrapper(leads)
    att = Explainer(w).explain(x, target=0, method="gradcam", relu=False)
    acts, grads, _ = w.activations_and_gradients(x, att.options["layer"], target=0)
    ga, gg = bb.tokens_to_grid(acts), bb.tokens_to_grid(grads)          # rows: the encoder's channels
    cam = (gg.mean(dim=(2, 3), keepdim=True) * ga).sum(1)[0]            # (len(leads), patches)
    assert att.lead_resolution == "per-lead"
    for j, lead in enumerate(leads):   # a patch's centre sample (12 + 25 k) carries its token's value
        torch.testing.assert_close(att.values[0, CANONICAL_LEADS.index(lead), 12::25], cam[j], atol=1e-6, rtol=1e-5)
    others = [i for i, lead in enumerate(CANONICAL_LEADS) if lead not in leads]
    assert bool((att.values[0, others] == 0).all())


def test_attention_rollout_of_an_input_leads_vit_puts_each_token_row_on_its_own_lead():
    from ecgfm.explain.attribution import Explainer

    bb, w, x = _stmem_wrapper(["V1", "I"])
    att = Explainer(w).explain(x, target=0, method="attention_rollout")
    with torch.no_grad():
        maps = bb.attention_maps(x)
    n = maps[0].shape[-1]
    eye, roll = torch.eye(n), torch.eye(n)[None]
    for a in maps:
        a = 0.5 * eye + 0.5 * a.mean(1)
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    rel = roll[:, :n - 4].mean(1)[0, :n - 4].reshape(2, 10)            # rows: V1, I (the encoder's order)
    assert att.lead_resolution == "per-lead"
    for j, lead in enumerate(["V1", "I"]):
        torch.testing.assert_close(att.values[0, CANONICAL_LEADS.index(lead), 12::25], rel[j], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------- 2. absent-lead and volts warnings
def _record(sig: np.ndarray, leads=CANONICAL_LEADS) -> ECGRecord:
    full = np.zeros((12, sig.shape[1]), np.float32)
    mask = np.zeros(12, bool)
    for lead in leads:
        i = CANONICAL_LEADS.index(lead)
        full[i], mask[i] = sig[i], True
    return ECGRecord(signal=full, fs=FS, lead_mask=mask, record_id="r1", source="test")


def test_explain_stage_names_the_absent_leads_in_a_warning_and_in_the_report(tmp_path, caplog):
    """docs/EXPLAIN.md: a lead-II record 'is explained with a warning naming the absent leads' (it was not)."""
    from ecgfm.explain.report import explain_records

    w = _wrapper(preprocess=PreprocessSpec(fs=FS), n_samples=500, trained_leads=CANONICAL_LEADS)
    rec = _record(_ecg(500)[0].numpy(), leads=["II"])
    with caplog.at_level(logging.WARNING):
        rep = explain_records(w, [rec], tmp_path, methods=["saliency"], formats=["png"], faithfulness=False)
    absent = [lead for lead in CANONICAL_LEADS if lead != "II"]
    assert f"lead(s) {', '.join(absent)} of the classifier's training records are absent" in caplog.text
    assert rep["records"][0]["absent_leads"] == absent
    assert json.loads((tmp_path / "report.json").read_text())["records"][0]["absent_leads"] == absent


def test_a_record_in_volts_gets_the_apis_warning():
    w = _wrapper(preprocess=PreprocessSpec(fs=FS), n_samples=500)
    sig = _ecg(500)[0].numpy()
    with pytest.warns(UserWarning, match="looks like volts"):
        w.prepare(_record(sig * 1e-3), missing_leads="zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.prepare(_record(sig), missing_leads="zero")        # in mV: no warning


# ------------------------------------------------------------------------- 3. counterfactual distances
def test_counterfactual_distances_are_means_over_the_recorded_signal():
    """The same change read 12x smaller on a one-lead record (a mean over zero-filled leads) and 2.5x smaller on a
    4 s record in a 10 s window (a mean over the padding)."""
    from ecgfm.explain.counterfactual import counterfactual

    w = _wrapper()
    x = _ecg(1000)
    x1 = _one_lead(x)
    cf = counterfactual(w, x1, 1, max_steps=20, lr=0.05, early_stop=False)
    d = cf.delta[0]
    assert float(d.abs().sum()) > 0 and float(d[1:].abs().sum()) == 0
    torch.testing.assert_close(cf.l1[0], d[0].abs().mean())
    torch.testing.assert_close(cf.l2[0], d[0].pow(2).mean().sqrt())
    xp = x.clone()
    xp[..., 400:] = 0
    cf = counterfactual(w, xp, 1, max_steps=20, lr=0.05, early_stop=False, recorded=torch.arange(1000) < 400)
    d = cf.delta[0]
    torch.testing.assert_close(cf.l1[0], d[:, :400].abs().mean())
    torch.testing.assert_close(cf.l2[0], d[:, :400].pow(2).mean().sqrt())
    assert cf.to_dict()["records"][0]["l1"] == pytest.approx(float(d[:, :400].abs().mean()))


# ------------------------------------------------------------------------- 4. the method comparison's colour scale
def test_method_comparison_scales_colours_over_present_leads_and_recorded_samples(monkeypatch):
    from ecgfm.explain import visualize as viz
    from ecgfm.explain.attribution import Explainer

    seen = []
    real = viz.symmetric_norm

    def spy(values, percentile=99.0):
        norm = real(values, percentile)
        seen.append(norm.vmax)
        return norm

    w = _wrapper()
    x = _one_lead(_ecg(1000))                                   # lead I only
    att = Explainer(w).explain(x, target=0, method="ig").values[0].numpy()
    monkeypatch.setattr(viz, "symmetric_norm", spy)
    viz.plot_method_comparison(x[0].numpy(), FS, {"ig": att}, leads=["I"])
    assert seen[-1] == pytest.approx(real(att[:1]).vmax)       # as plot_ecg_chart: lead I's samples only
    # an explicit lead mask and zero padding (from 4 s): the scale of the recorded samples of the present lead
    viz.plot_method_comparison(x[0].numpy(), FS, {"ig": att}, leads=["I"], present=np.arange(12) == 0,
                               padded_from_s=4.0)
    assert seen[-1] == pytest.approx(real(att[:1, :400]).vmax)


# ------------------------------------------------------------------------- 5. SmoothGrad's noise scale
def test_smoothgrad_noise_is_scaled_to_the_recorded_signal():
    """The noise was noise_level * std over every (lead, sample): lead I alone got ~3.5x less noise."""
    from ecgfm.explain.attribution import Explainer

    w = _wrapper()
    x1 = _one_lead(_ecg(500))
    a = Explainer(w).explain(x1, target=0, method="smoothgrad", n_samples=4, noise_level=0.15)
    assert a.options["stdev"][0] == pytest.approx(0.15 * float(x1[0, 0].std()), rel=1e-5)
    xp = x1.clone()
    xp[..., 300:] = 0
    a = Explainer(w).explain(xp, target=0, method="smoothgrad", n_samples=4, noise_level=0.15,
                             recorded=torch.arange(500) < 300)
    assert a.options["stdev"][0] == pytest.approx(0.15 * float(xp[0, 0, :300].std()), rel=1e-5)


# ------------------------------------------------------------------------- 6. unusable counterfactual settings
BAD_CF = [("threshold", 1.5), ("threshold", -0.2), ("threshold", 0.0), ("threshold", [0.5, 1.0, 0.5]),
          ("lambda_prox", -5.0), ("lambda_smooth", -1.0), ("lambda_plaus", -1.0), ("lr", 0.0), ("lr", -0.01)]


@pytest.mark.parametrize("key,value", BAD_CF)
def test_counterfactual_refuses_settings_that_cannot_work(key, value):
    from ecgfm.explain.counterfactual import counterfactual

    w = _wrapper(postprocess="sigmoid")
    with pytest.raises(ValueError, match=f"'{key}'"):
        counterfactual(w, _ecg(500), 1, max_steps=2, **{key: value})


@pytest.mark.parametrize("key,value", [(k, v) for k, v in BAD_CF if k != "lambda_plaus"])
def test_explain_config_refuses_counterfactual_settings_that_cannot_work(key, value):
    from hydra import compose, initialize_config_dir

    import ecgfm.conf
    from ecgfm.config import ConfigError
    from ecgfm.recipes import validate_explain_config

    with initialize_config_dir(str(ecgfm.conf.config_dir()), version_base="1.3"):
        cfg = compose("explain", overrides=[f"counterfactual.{key}={value}"])
    with pytest.raises(ConfigError, match=f"counterfactual.{key}"):
        validate_explain_config(cfg)
    with initialize_config_dir(str(ecgfm.conf.config_dir()), version_base="1.3"):
        validate_explain_config(compose("explain", overrides=["counterfactual.threshold=[0.3,0.6]"]))
