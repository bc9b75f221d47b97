"""Gradient counterfactuals: a tiny model's class flips on synthetic ECGs, the change is localised, smooth and
reported by lead and wave; the MAE plausibility prior plugs in; bad input fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.synthetic import class_subset, SYNTHETIC_CLASSES, generate_arrays
from ecgfm.explain.classifier import train_classifier
from ecgfm.explain.counterfactual import MAEPrior, change_summary, counterfactual, total_variation
from ecgfm.explain.wrapper import ECGWrapper

KEEP = ("normal_sinus", "atrial_fibrillation", "st_elevation")




def _data(n: int, seed: int):
    return class_subset(n, seed, KEEP)


@pytest.fixture(scope="module")
def model():
    x, y = _data(540, 11)
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    head, _ = train_classifier(bb, x[:150], y[:150], epochs=20, batch_size=32, lr=1e-2)
    wrapper = ECGWrapper.from_encoder_and_head(bb, head, None, fs=100.0, class_names=KEEP, n_samples=250)
    x_test, y_test = torch.as_tensor(x[150:]), torch.as_tensor(y[150:])
    pred = wrapper.predict_proba(x_test).argmax(1)
    normal = x_test[(y_test == 0) & (pred == 0)][:4]
    assert len(normal) >= 2, "the tiny model should recognise some normal records"
    return wrapper, normal


def test_counterfactual_flips_class_and_reports_where(model):
    wrapper, normal = model
    cf = counterfactual(wrapper, normal, "st_elevation", max_steps=400)
    assert cf.valid.all()
    assert (cf.counterfactual_proba.argmax(1) == KEEP.index("st_elevation")).all()
    assert (cf.original_proba.argmax(1) == 0).all()
    assert (cf.l1 > 0).all() and (cf.l2 >= cf.l1 * 0).all()
    assert (cf.steps > 0).all() and (cf.steps < 400).all()
    # shares sum to one over leads and over waves
    np.testing.assert_allclose(cf.per_lead.sum(1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sum(v for v in cf.per_wave.values()).numpy(), 1.0, rtol=1e-5)
    top = cf.top_leads(3)
    assert len(top) == len(normal) and all(len(t) == 3 and set(t) <= set(wrapper.lead_names) for t in top)
    seg = cf.segments[0]
    assert seg[0]["share"] >= seg[1]["share"] >= seg[-1]["share"]
    assert {s["wave"] for s in seg} == {"P", "QRS", "T", "other"}
    d = json.loads(json.dumps(cf.to_dict()))
    rec = d["records"][0]
    assert rec["valid"] and rec["target"] == "st_elevation" and rec["original_prediction"] == "normal_sinus"
    assert rec["counterfactual_target_proba"] > rec["original_target_proba"]


def test_change_is_piecewise_linear_between_knots(model):
    wrapper, normal = model
    cf = counterfactual(wrapper, normal[:1], "atrial_fibrillation", max_steps=30, early_stop=False, knot_s=0.04,
                        edge_s=0.0, ramp_s=0.0)                   # no end taper: the knots alone
    d = cf.delta[0].numpy()
    second = np.abs(np.diff(d, 2, axis=-1))                      # zero except at knots (every 4 samples)
    off_knot = np.ones(second.shape[-1], bool)
    off_knot[3::4] = False                                       # second difference centred on a knot
    assert second[:, off_knot].max() < 1e-5 < second[:, ~off_knot].max()


def test_leads_restriction_and_early_stop(model):
    wrapper, normal = model
    cf = counterfactual(wrapper, normal[:2], "st_elevation", leads=["V2", "V3"], max_steps=100)
    changed = cf.delta.abs().sum(-1)                              # (B, L)
    keep = [wrapper.lead_names.index("V2"), wrapper.lead_names.index("V3")]
    others = [i for i in range(12) if i not in keep]
    assert changed[:, others].max() == 0 and changed[:, keep].sum() > 0
    # the already-predicted class: valid at step 0, no change at all
    same = counterfactual(wrapper, normal[:2], "normal_sinus")
    assert same.valid.all() and (same.steps == 0).all() and same.delta.abs().max() == 0


def test_absent_leads_of_a_record_are_never_changed(model):
    """A two-lead record (the other rows zero-filled, ecgfm's absent leads): the change stays in its two leads, and
    the leads it reports as changed are among them (the search used to put most of the change into absent rows)."""
    wrapper, normal = model
    rec = torch.zeros_like(normal[:2])
    keep = [wrapper.lead_names.index("I"), wrapper.lead_names.index("II")]
    rec[:, keep] = normal[:2, keep]
    cf = counterfactual(wrapper, rec, "st_elevation", max_steps=100)
    changed = cf.delta.abs().sum(-1)                              # (B, L)
    others = [i for i in range(12) if i not in keep]
    assert changed[:, others].max() == 0 and changed[:, keep].sum() > 0
    tops = cf.top_leads(2)       # None for a record the model already gave the target (nothing changed)
    assert all((t is None) == (float(changed[i].sum()) == 0) for i, t in enumerate(tops))
    assert all(set(t) <= {"I", "II"} for t in tops if t is not None) and any(t is not None for t in tops)


def test_proximity_weight_shrinks_the_change(model):
    wrapper, normal = model
    loose = counterfactual(wrapper, normal[:2], "st_elevation", lambda_prox=0.0, lambda_smooth=0.0, max_steps=60,
                           early_stop=False)
    tight = counterfactual(wrapper, normal[:2], "st_elevation", lambda_prox=1.0, lambda_smooth=0.0, max_steps=60,
                           early_stop=False)
    assert (tight.l1 < loose.l1).all()


def test_total_variation_matches_loop():
    d = torch.randn(2, 3, 17)
    ref = torch.tensor([sum(abs(float(d[b, l, t + 1] - d[b, l, t])) for l in range(3) for t in range(16))
                        for b in range(2)])
    torch.testing.assert_close(total_variation(d), ref, rtol=1e-5, atol=1e-5)


def test_change_summary_localises_a_known_change():
    fs = 100.0
    x, _, _ = generate_arrays(1, seed=2, fs=fs, duration=2.5)
    x = torch.as_tensor(x)
    from ecgfm.explain import waves

    r = waves.detect_r_peaks(x[0], fs)
    win = waves.wave_windows(r, fs, x.shape[-1])
    a, b = win["QRS"][len(r) // 2]
    delta = torch.zeros_like(x)
    delta[0, 8, a:b] = 0.3                                        # V3, one QRS
    per_lead, per_wave, segments = change_summary(delta, x, fs, ECGWrapper(torch.nn.Identity(), 100.0).lead_names)
    assert segments[0][0]["lead"] == "V3" and segments[0][0]["wave"] == "QRS"
    assert per_lead[0, 8] == pytest.approx(1.0) and per_wave["QRS"][0] == pytest.approx(1.0)


def test_mae_plausibility_prior(model):
    from ecgfm.methods.mae import MAEModule

    wrapper, normal = model
    torch.manual_seed(0)
    mae = MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    prior = MAEPrior(mae, n_masks=2)
    r1, r2 = prior(normal[:2]), prior(normal[:2])
    assert r1.shape == (2,) and (r1 > 0).all()
    torch.testing.assert_close(r1, r2)                              # fixed masks: deterministic
    cf = counterfactual(wrapper, normal[:2], "st_elevation", prior=prior, lambda_plaus=0.1, max_steps=100)
    assert set(cf.plausibility) == {"original", "counterfactual"}
    assert cf.options["prior"] == "MAEPrior"
    assert "mae_reconstruction_error" in cf.to_dict()["records"][0]
    with pytest.raises(ValueError, match="MAEModule"):
        MAEPrior(torch.nn.Linear(2, 2))


def test_bad_input(model):
    wrapper, normal = model
    with pytest.raises(ValueError, match="outside"):
        counterfactual(wrapper, normal, 7)
    with pytest.raises(ValueError, match="unknown class"):
        counterfactual(wrapper, normal, "no_such_class")
    bad = normal.clone()
    bad[0, 3, 10] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        counterfactual(wrapper, bad, 1)
    with pytest.raises(ValueError, match="leads"):
        counterfactual(wrapper, normal[:, :11], 1)
    with pytest.raises(ValueError, match="proximity"):
        counterfactual(wrapper, normal, 1, proximity="l3")
    with pytest.raises(ValueError, match="unknown leads"):
        counterfactual(wrapper, normal, 1, leads=["V9"])


def _edge_share(cf, seconds: float) -> np.ndarray:
    m = cf.delta.abs().sum(1)                                          # (B, T)
    n = int(round(seconds * cf.fs))
    return ((m[:, :n].sum(1) + m[:, -n:].sum(1)) / m.sum(1).clamp_min(1e-12)).numpy()


@pytest.mark.parametrize("target", ["st_elevation", "atrial_fibrillation"])
def test_change_is_not_concentrated_at_the_record_ends(model, target):
    """Issue 9: the change must not pile up in the first / last 0.3 s (where padding makes the model cheapest to
    fool): by default the search leaves the record's ends untouched and ramps in smoothly."""
    wrapper, normal = model
    cf = counterfactual(wrapper, normal, target, max_steps=400)
    assert cf.valid.all()
    assert cf.options["edge_s"] == pytest.approx(0.3)
    assert _edge_share(cf, 0.3).max() == 0.0                         # the ends are excluded
    # the outer 0.5 s on each side (40 % of a 2.5 s record) hold less than their share of time
    assert _edge_share(cf, 0.5).max() < 0.4
    # the change lives where the ECG is, not at the boundary: its peak is inside
    peak = cf.delta.abs().sum(1).argmax(1).numpy() / cf.fs
    assert ((peak > 0.3) & (peak < 2.2)).all()


def test_edge_margin_can_be_turned_off_and_still_pads(model):
    wrapper, normal = model
    cf = counterfactual(wrapper, normal[:2], "st_elevation", max_steps=200, edge_s=0.0)
    assert cf.options["edge_s"] == 0.0 and cf.valid.all()
    with pytest.raises(ValueError, match="edge_s"):
        counterfactual(wrapper, normal[:1], "st_elevation", edge_s=-1.0)


def test_counterfactual_lead_ranking_is_withheld_when_every_lead_changes_alike(model):
    """A change spread equally over the leads ranks no lead: top_leads says so instead of listing three."""
    wrapper, normal = model
    cf = counterfactual(wrapper, normal[:1], "st_elevation", max_steps=200)
    cf.per_lead = torch.full_like(cf.per_lead, 1.0 / cf.per_lead.shape[1])
    assert cf.top_leads() == [None]
    rec = json.loads(json.dumps(cf.to_dict()))["records"][0]
    assert rec["top_leads"] is None and rec["ranks_leads"] is False


def test_top_segments_rank_only_waves_when_leads_cannot_be_ranked(model):
    wrapper, normal = model
    cf = counterfactual(wrapper, normal[:1], "st_elevation", max_steps=200)
    cf.per_lead = torch.full_like(cf.per_lead, 1.0 / cf.per_lead.shape[1])
    segs = cf.to_dict()["records"][0]["top_segments"]
    assert {s["lead"] for s in segs} == {"all"} and segs[0]["share"] >= segs[-1]["share"]


def test_mae_prior_does_not_depend_on_the_batch_position():
    """The prior is a fixed function of each input: a record scores the same alone, first or second in a batch
    (the masks were drawn per batch, so a record's mask depended on its position)."""
    from ecgfm.data.synthetic import generate_arrays

    x, _, _ = generate_arrays(3, seed=1, fs=100.0, duration=2.5)
    x = torch.as_tensor(x)
    torch.manual_seed(0)
    from ecgfm.methods.mae import MAEModule

    prior = MAEPrior(MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2),
                     n_masks=2)
    with torch.no_grad():
        alone, first = prior(x[:1])[0], prior(x)[0]
        second = prior(torch.stack([x[1], x[0], x[2]]))[1]
    torch.testing.assert_close(first, alone)
    torch.testing.assert_close(second, alone)


def test_default_target_is_a_class_not_already_predicted():
    """Multi-label: the second most probable class may be a predicted label too (its 'counterfactual' is the record
    itself, reported valid after 0 steps); the default is the most probable class below the threshold."""
    from ecgfm.explain.counterfactual import default_target

    p = torch.tensor([0.95, 0.88, 0.05, 0.30])
    assert default_target(p, multilabel=True) == 3 and default_target(p, multilabel=False) == 1
    assert default_target(torch.tensor([0.9, 0.8]), multilabel=True) is None
    assert default_target(torch.tensor([0.9, 0.8]), multilabel=True, threshold=0.85) == 1
