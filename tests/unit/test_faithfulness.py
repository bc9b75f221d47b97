"""Faithfulness metrics on models where the right answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from ecgfm.explain.attribution import Explainer, random_attribution
from ecgfm.explain.faithfulness import (compare_with_random, faithfulness_report, localisation, mean_ci,
                                        parametrised_layers, perturbation_curve, randomisation_check,
                                        segment_scores, spearman)
from ecgfm.explain.wrapper import ECGWrapper

FS = 100.0
T = 200


class WindowEnergy(nn.Module):
    """Two logits: class 1 = energy of lead 2 in samples 50-100 (the 'evidence'), class 0 = its negative."""

    def forward(self, x):
        e = (x[:, 2, 50:100] ** 2).mean(-1)
        return torch.stack([-e, e], 1)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(12, 8, 7, padding=3), nn.ReLU(), nn.Conv1d(8, 8, 7, padding=3),
                                      nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


def _inputs(b: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 12, T, generator=g)


def _perfect(x: torch.Tensor) -> torch.Tensor:
    v = torch.zeros_like(x)
    v[:, 2, 50:100] = x[:, 2, 50:100] ** 2
    return v


def test_segment_scores():
    v = torch.arange(10.0).reshape(1, 1, 10)
    np.testing.assert_allclose(segment_scores(v, 4)[0, 0].numpy(), [6, 22, 17])
    np.testing.assert_allclose(segment_scores(-v, 5, order="signed")[0, 0].numpy(), [-10, -35])
    with pytest.raises(ValueError, match="order"):
        segment_scores(v, 2, order="max")


def test_deletion_and_insertion_rank_a_perfect_attribution_first():
    w = ECGWrapper(WindowEnergy(), fs=FS, postprocess=None)
    x = _inputs()
    perfect = _perfect(x)
    target = torch.ones(4, dtype=torch.long)
    good = perturbation_curve(w, x, perfect, target, mode="deletion", steps=24, baseline="zeros", segment_s=0.1)
    assert good["curve"].shape == (4, 25) and good["fractions"][-1] == 1
    # The evidence is 5 of 240 (lead, 0.1 s) segments: all gone at the first step (10 segments), score 0.
    assert (good["curve"][:, 0] > 0).all()
    assert torch.allclose(good["curve"][:, 1:], torch.zeros(4, 24), atol=1e-6)
    bad = perturbation_curve(w, x, random_attribution(x, 1), target, steps=24, baseline="zeros")
    assert (good["aopc"] > bad["aopc"]).all()
    ins = perturbation_curve(w, x, perfect, target, mode="insertion", steps=24, baseline="zeros")
    ins_bad = perturbation_curve(w, x, random_attribution(x, 1), target, mode="insertion", steps=24,
                                 baseline="zeros")
    assert (ins["auc"] > ins_bad["auc"]).all()
    # The AOPC formula: mean over the K+1 points of f(x^(0)) - f(x^(k)).
    c = good["curve"]
    assert torch.allclose(good["aopc"], (c[:, :1] - c).mean(1))
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(w, x, perfect, target, mode="both")


def test_smoothed_baseline_is_used():
    w = ECGWrapper(WindowEnergy(), fs=FS, postprocess=None)
    x = torch.ones(1, 12, T) * 3.0   # a constant record is its own smoothed baseline: deletion changes nothing
    res = perturbation_curve(w, x, _perfect(x), torch.ones(1, dtype=torch.long), steps=4)
    assert torch.allclose(res["curve"], res["curve"][:, :1].expand(1, 5), atol=1e-4)


def test_compare_with_random_reports_intervals():
    w = ECGWrapper(WindowEnergy(), fs=FS, postprocess=None)
    x = _inputs(6)
    res = compare_with_random(w, x, _perfect(x), torch.ones(6, dtype=torch.long), n_random=2, steps=10,
                              baseline="zeros")
    gain = res["deletion_aopc_gain"]
    assert gain["lo"] > 0 and gain["lo"] <= gain["mean"] <= gain["hi"] and gain["n"] == 6
    assert res["insertion_auc_gain"]["mean"] > 0
    assert set(res["curves"]) == {"deletion", "insertion"}


def test_mean_ci():
    r = mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert r["mean"] == 2.0 and r["n"] == 3 and r["lo"] < 2.0 < r["hi"]
    assert mean_ci([5.0]) == {"mean": 5.0, "lo": None, "hi": None, "n": 1}   # one record: no interval
    assert mean_ci([])["n"] == 0


def test_spearman_ties_and_constant_maps_as_scipy():
    """Mostly-zero (ReLU'd) maps are full of ties: average ranks, as scipy; a constant map has no correlation."""
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(4, 12, 50, generator=g) - 0.5)        # ~70 % exact zeros, independent maps
    b = torch.relu(torch.randn(4, 12, 50, generator=g) - 0.5)
    ours = spearman(a, b)
    for i in range(4):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel()).statistic, abs=1e-6)
    assert torch.isnan(spearman(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))).all()


def test_random_orderings_are_per_record_and_batch_free():
    """The random attributions faithfulness is compared with: each record its own, the same in any batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 40, generator=g)
    alone = [random_attribution(x[i:i + 1], 5) for i in range(3)]
    together = random_attribution(x, 5)
    assert not torch.equal(alone[0], alone[1])
    assert all(torch.equal(alone[i][0], together[i]) for i in range(3))
    assert not torch.equal(together, random_attribution(x, 6))


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 50, generator=g), torch.randn(3, 4, 50, generator=g)
    b[0] = a[0] * 2 + 0.1 * b[0]
    ours = spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel()).statistic, abs=1e-6)
    assert spearman(a, a).sub(1).abs().max() < 1e-6


def test_localisation_scores():
    x = _inputs(2)
    mask = torch.zeros(2, 12, T, dtype=torch.bool)
    mask[:, 2, 50:100] = True
    perfect = localisation(_perfect(x), mask)
    for k in ("mass_positive", "mass_abs", "rank_accuracy", "pointing_game", "auroc"):
        assert torch.allclose(perfect[k], torch.ones(2)), k
    assert torch.allclose(perfect["mask_fraction"], torch.full((2,), 50 / (12 * T)))
    inverted = localisation(-_perfect(x) + 0.0, mask)
    # no positive attribution anywhere: no positive mass to place (NaN, as for an all-zero map), not a score of 0
    assert inverted["mass_positive"].isnan().all() and inverted["mass_abs"].eq(1).all()
    rnd = localisation(random_attribution(x, 0), mask)
    assert (rnd["auroc"] - 0.5).abs().max() < 0.1 and rnd["mass_abs"].max() < 0.05
    # A (B, T) mask is broadcast over the leads; an empty mask gives a NaN AUROC.
    tmask = torch.zeros(2, T, dtype=torch.bool)
    assert torch.isnan(localisation(_perfect(x), tmask)["auroc"]).all()
    with pytest.raises(ValueError, match="does not match"):
        localisation(_perfect(x), torch.zeros(2, 12, 10, dtype=torch.bool))


def test_randomisation_check_detects_model_dependence():
    torch.manual_seed(0)
    model = TinyCNN()
    w = ECGWrapper(model, fs=FS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = Explainer(w)
    x = _inputs(3)
    assert parametrised_layers(model) == ["head", "features.2", "features.0"]
    res = randomisation_check(ex, x, "input_x_gradient", mode="cascading")
    assert res["spearman_abs"].shape == (3, 3)
    assert res["spearman_signed"][-1].mean() < 0.5        # fully randomised: unrelated maps
    assert [s["layer"] for s in res["summary"]] == ["head", "features.2", "features.0"]
    for k, v in model.state_dict().items():                # the explained model is untouched
        assert torch.equal(v, before[k]), k
    ind = randomisation_check(ex, x, "saliency", mode="independent", layers=["features.0"])
    assert ind["spearman_abs"].shape == (1, 3) and ind["spearman_abs"].mean() < 0.9
    with pytest.raises(ValueError, match="mode"):
        randomisation_check(ex, x, "saliency", mode="random")


def test_faithfulness_report_attaches_scores():
    torch.manual_seed(0)
    ex = Explainer(ECGWrapper(TinyCNN(), fs=FS))
    x = _inputs(3)
    att = ex.explain(x, method="input_x_gradient")
    mask = torch.zeros(3, 12, T, dtype=torch.bool)
    mask[:, :, 20:60] = True
    rep = faithfulness_report(ex, att, mask=mask, randomisation=True, randomisation_layers=1, n_random=1, steps=5)
    assert {"deletion_aopc", "random_deletion_aopc", "insertion_auc", "localisation", "randomisation"} <= set(rep)
    assert att.scores["localisation"]["mass_abs"]["n"] == 3
    import json

    json.dumps(att.to_dict())


def test_faithfulness_report_refuses_embedding_explanations():
    torch.manual_seed(0)
    model = TinyCNN()
    ex = Explainer(ECGWrapper(model, fs=FS, encoder=model.features))
    att = ex.explain_embedding(_inputs(2), method="saliency")
    with pytest.raises(ValueError, match="encoder embedding"):
        faithfulness_report(ex, att)


def test_randomisation_re_explains_with_the_options_passed(monkeypatch):
    """faithfulness_report's sanity check explains again with the attribution's own options: integrated gradients
    (whose ``method`` option clashed with the check's argument) runs, and a tensor baseline reaches the re-explained
    attributions as the tensor (it was dropped, so the check scored the default baseline's maps)."""
    import ecgfm.explain.faithfulness as Fa

    w = ECGWrapper(TinyCNN(), fs=FS)
    ex = Explainer(w)
    x = _inputs(1)
    att = ex.explain(x, target=1, method="ig", n_steps=4)
    faithfulness_report(ex, att, randomisation=True, randomisation_layers=1, n_random=1, steps=2)
    seen = {}
    real = Fa.randomisation_check
    monkeypatch.setattr(Fa, "randomisation_check", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    base = torch.full((1, 12, T), 0.5)
    att = ex.explain(x, target=1, method="deeplift", baselines=base)
    faithfulness_report(ex, att, randomisation=True, randomisation_layers=1, n_random=1, steps=2)
    assert torch.equal(seen["method_options"]["baselines"], base)


def test_absent_leads_are_no_budget_no_evidence_and_no_chance_level():
    """Zero-filled absent leads: deleting them changes nothing, so a budget share spent there made any map that
    avoids them look better than random; and a map's values there were ranked and charted as evidence."""
    from ecgfm.explain.attribution import Attribution

    torch.manual_seed(0)
    w = ECGWrapper(TinyCNN(), fs=FS, postprocess="softmax")
    x = _inputs(3)
    x[:, 6:] = 0.0                                             # V1-V6 absent
    rnd = random_attribution(x, 1)
    loud = rnd.clone()
    loud[:, 6:] = 100.0                                        # the same map, shouting on the absent leads
    for mode in ("deletion", "insertion"):
        a = perturbation_curve(w, x, rnd, mode=mode, segment_s=0.25, steps=8)["curve"]
        b = perturbation_curve(w, x, loud, mode=mode, segment_s=0.25, steps=8)["curve"]
        assert torch.allclose(a, b), mode                      # absent segments are never in the budget
    # the explainer clears what a method puts on absent leads and says so
    att = Explainer(w).explain(x, method="saliency")
    assert att.values[:, 6:].eq(0).all() and att.values[:, :6].abs().sum() > 0
    assert att.options["absent_leads_zeroed"] == 3 * 6
    assert all(set(top) <= set(att.lead_names[:6]) for top in att.top_leads())
    # localisation: chance level and candidates over the present leads only
    mask = torch.zeros(3, 12, T, dtype=torch.bool)
    mask[:, 2, 50:100] = True
    v = _perfect(x)
    loc = localisation(Attribution(values=v, method="m", options={}, target=None, inputs=x, fs=FS,
                                   lead_names=tuple(f"l{i}" for i in range(12)), elapsed_s=0.0), mask)
    assert torch.allclose(loc["mask_fraction"], torch.full((3,), 50 / (6 * T)))


def test_localisation_shares_ties_instead_of_breaking_them_by_position():
    """An all-zero map scored a pointing-game hit when the mask covered the record's start, and a map equal on every
    lead (Grad-CAM) hit or missed depending only on which lead holds the evidence."""
    mask = torch.zeros(1, 12, T, dtype=torch.bool)
    mask[:, 0, :20] = True
    zero = localisation(torch.zeros(1, 12, T), mask)
    assert torch.isnan(zero["pointing_game"]).all() and torch.isnan(zero["rank_accuracy"]).all()
    bump = torch.zeros(1, 12, T)
    bump[:, :, 60] = 1.0                                       # one column, the same on every lead
    for lead in (0, 11):
        m = torch.zeros(1, 12, T, dtype=torch.bool)
        m[:, lead, 55:65] = True
        loc = localisation(bump, m)
        assert loc["pointing_game"].item() == pytest.approx(1 / 12)
        # the 10 top samples: 12 tied at the top (1 inside the mask) share the 10 places
        assert loc["rank_accuracy"].item() == pytest.approx((1 * 10 / 12) / 10)


def test_absent_leads_do_not_fake_agreement_completeness_or_curve_ends():
    """Follow-ups of clearing absent leads: (1) the randomisation check's Spearman over all samples saw the shared
    zero rows as agreement (0.998 for a one-lead record, against 0.22 before the clearing); (2) the convergence
    delta must describe the map returned; (3) an insertion curve must end at f(x) whatever the baseline on absent
    leads; (4) a record with nothing to find has no localisation score, not 0."""
    torch.manual_seed(0)
    model = TinyCNN()
    w = ECGWrapper(model, fs=FS, postprocess=None)
    x = _inputs(2)
    x[:, 1:] = 0.0                                                 # one lead present
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 12, T, generator=g), torch.randn(2, 12, T, generator=g)
    a[:, 1:], b[:, 1:] = 0.0, 0.0
    keep = (x.abs().amax(-1) > 0)[:, :, None].expand_as(a)
    assert spearman(a.abs(), b.abs()).min() > 0.8                  # the shared zeros, lowest in |map|
    assert spearman(a.abs(), b.abs(), keep).abs().max() < 0.15     # the present lead only
    ex = Explainer(w)
    check = randomisation_check(ex, x, "saliency", target=1, mode="cascading", layers=parametrised_layers(model)[:1])
    assert check["spearman_abs"].abs().max() < 0.9
    ig = ex.explain(x, target=1, method="integrated_gradients", baselines=0.5, n_steps=64)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(torch.full_like(x, 0.5))[:, 1]
    torch.testing.assert_close(ig.delta.float(), ig.values.flatten(1).sum(1) - gap, atol=1e-4, rtol=1e-4)
    curve = perturbation_curve(w, x, ig, target=torch.tensor([1, 1]), mode="insertion", baseline=0.5, steps=4,
                               output="logit")["curve"]
    with torch.no_grad():
        torch.testing.assert_close(curve[:, -1], model(x)[:, 1], atol=1e-5, rtol=1e-5)
    empty = localisation(ig, torch.zeros(2, 12, T, dtype=torch.bool))
    assert torch.isnan(empty["mass_abs"]).all() and torch.isnan(empty["rank_accuracy"]).all()
