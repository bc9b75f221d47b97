"""Review s16 of the explain stage: derived limb leads are drawn derived (and named so), the zero padding of a
short record is no recorded signal for faithfulness, localisation and counterfactuals, a lead without attribution
is never a top lead, records of different lengths fail clearly, the colour-bar label of a short chart keeps its
"scale clipped" note, and the explain run names the classifier's training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord

FS = 100.0


class _TinyCNN(nn.Module):
    def __init__(self, n_leads: int = 12):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(n_leads, 8, 7, padding=3), nn.ReLU(),
                                      nn.Conv1d(8, 8, 7, padding=3), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


def _beats(t: int, seed: int = 0) -> np.ndarray:
    """``(12, t)`` mV: a spike every second on every lead plus noise (for the wave windows)."""
    rng = np.random.default_rng(seed)
    sig = 0.05 * rng.standard_normal((12, t)).astype(np.float32)
    for k in range(t // 100 + 1):
        c = int((k + 0.3) * FS)
        sig[:, max(0, c - 3):c + 3] += np.linspace(0.5, 1.5, 12, dtype=np.float32)[:, None]
    return sig


def _record(t: int = 1000, absent: tuple[str, ...] = (), rid: str = "r1", seed: int = 0) -> ECGRecord:
    sig = _beats(t, seed)
    mask = np.ones(12, dtype=bool)
    for lead in absent:
        i = CANONICAL_LEADS.index(lead)
        sig[i], mask[i] = 0.0, False
    return ECGRecord(signal=sig, fs=FS, lead_mask=mask, record_id=rid, source="test")


def _wrapper(n_samples: int | None = 1000, trained_leads=None, window: str = "center"):
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    return ECGWrapper(_TinyCNN().eval(), fs=FS, preprocess=PreprocessSpec(fs=FS), class_names=("A", "B", "C"),
                      n_samples=n_samples, window=window if n_samples else "error", trained_leads=trained_leads)


# ------------------------------------------------------------------------------------------------ 1. derived leads
LIMB = ("III", "aVR", "aVL", "aVF")


def test_derived_limb_leads_are_drawn_derived_and_named_on_the_chart(monkeypatch, tmp_path):
    """A 12-lead classifier recording its training leads reads III / aVR / aVL / aVF derived from I and II when
    an 8-lead record lacks them; the chart drew zero rows there while counting them present."""
    from ecgfm.explain import report as report_mod
    from ecgfm.explain import visualize as viz
    from ecgfm.explain.report import display_signal

    w = _wrapper(trained_leads=CANONICAL_LEADS)
    rec8 = _record(absent=LIMB)
    full = _record()                      # the same record with the four leads recorded as the identities give
    i, ii = full.signal[0], full.signal[1]
    full.signal[2], full.signal[3] = ii - i, -(i + ii) / 2
    full.signal[4], full.signal[5] = i - ii / 2, ii - i / 2
    shown, units = display_signal(rec8, w)
    want, _ = display_signal(full, w)
    for lead in LIMB:
        j = w.lead_names.index(lead)
        assert np.abs(shown[j]).max() > 0.1, lead                  # drawn, not a flat zero row
        np.testing.assert_allclose(shown[j], want[j], atol=1e-5)
    from ecgfm.explain.report import display_signal_and_derived

    assert display_signal_and_derived(rec8, w)[2] == list(LIMB)
    assert display_signal_and_derived(full, w)[2] == []
    # a classifier without trained_leads derives nothing: the rows stay absent (zero) and nothing is named
    plain = _wrapper()
    rows, _, derived = display_signal_and_derived(rec8, plain)
    assert derived == [] and np.abs(rows[plain.lead_names.index("III")]).max() == 0
    # the chart header says which leads are computed, not recorded
    fig = viz.plot_ecg_chart(shown, FS, w.lead_names, derived=list(LIMB))
    head = next(t.get_text() for t in fig.texts if t.get_gid() == "chart_header").replace("\n", " ")
    assert "derived: III, aVR, aVL, aVF" in head and "not recorded:" not in head
    # and explain_records passes them to the chart
    seen = {}
    real = viz.plot_ecg_chart

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(report_mod.viz, "plot_ecg_chart", spy)
    report_mod.explain_records(w, [rec8], tmp_path, methods=["saliency"], formats=["png"], faithfulness=False)
    assert seen["derived"] == list(LIMB)


# ------------------------------------------------------------------------------------------------ 2. zero padding
def _short_input(w, n_real: int = 400):
    with pytest.warns(UserWarning, match="zero-padded"):
        return w.prepare(_record(t=n_real))


def test_padding_is_no_perturbation_budget():
    """Deletion on a 4 s record in a 10 s window: the budget is the recorded segments only, padding segments are
    ranked last and never replaced (old: random deletions were spent on padding, diluting the reference)."""
    from ecgfm.explain.attribution import random_attribution
    from ecgfm.explain.faithfulness import perturbation_curve

    w = _wrapper()
    x = _short_input(w)
    rec = torch.arange(1000) < 400
    seen = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            seen.append(z.detach().clone())
            return self.inner(z)

    w.model = Spy(w.model)
    rnd = random_attribution(x, 0)
    loud = rnd.clone()
    loud[..., 400:] = 100.0                                   # a map shouting on the padding: ranked last anyway
    a = perturbation_curve(w, x, rnd, target=torch.tensor([0]), mode="deletion", steps=4, recorded=rec)
    n = len(seen)
    b = perturbation_curve(w, x, loud, target=torch.tensor([0]), mode="deletion", steps=4, recorded=rec)
    torch.testing.assert_close(a["curve"], b["curve"])
    steps = seen[:n]
    changed = [(s != x).any(1)[0] for s in steps]             # (T,) samples changed at each point
    assert all(not c[400:].any() for c in changed)           # padding never replaced
    # the budget is the 12 x 40 recorded 0.1 s segments: a quarter of them per step (old: a quarter of all 1200)
    counts = [int((s != x)[0].reshape(12, 100, 10).any(-1).sum()) for s in steps[-5:]]
    assert counts == [0, 120, 240, 360, 480]
    assert changed[-1][:400].float().mean() > 0.9             # the whole recording at the end of the curve


def test_padding_budget_is_bit_identical_at_full_window():
    from ecgfm.explain.attribution import random_attribution
    from ecgfm.explain.faithfulness import perturbation_curve

    w = _wrapper()
    x = w.prepare(_record(t=1000))
    rnd = random_attribution(x, 3)
    for mode in ("deletion", "insertion"):
        old = perturbation_curve(w, x, rnd, mode=mode, steps=5)
        new = perturbation_curve(w, x, rnd, mode=mode, steps=5, recorded=torch.ones(1000, dtype=torch.bool))
        assert torch.equal(old["curve"], new["curve"]) and torch.equal(old["aopc"], new["aopc"])


def test_localisation_scores_only_recorded_samples():
    """A noise map, 0 on the padding: AUROC 0.83 with the padding as free correct negatives, ~0.5 without."""
    from ecgfm.explain.faithfulness import localisation

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 12, 1000, generator=g)
    noise[..., 400:] = 0
    mask = torch.zeros(1, 12, 1000, dtype=torch.bool)
    mask[..., 100:140] = True
    mask[..., 250:290] = True
    rec = torch.arange(1000) < 400
    loc = localisation(noise, mask, recorded=rec)
    ref = localisation(noise[..., :400], mask[..., :400])
    for k in ("auroc", "mask_fraction", "mass_abs", "rank_accuracy"):
        torch.testing.assert_close(loc[k], ref[k])
    assert abs(float(loc["auroc"][0]) - 0.5) < 0.05 and float(loc["mask_fraction"][0]) == pytest.approx(0.2)
    full = localisation(noise, mask, recorded=torch.ones(1000, dtype=torch.bool))
    same = localisation(noise, mask)
    for k in full:
        torch.testing.assert_close(full[k], same[k], equal_nan=True)
    with pytest.raises(ValueError, match="recorded mask"):
        localisation(noise, mask, recorded=torch.ones(999, dtype=torch.bool))


def test_counterfactual_never_writes_into_padding():
    from ecgfm.explain.counterfactual import counterfactual

    w = _wrapper()
    x = _short_input(w)
    cf = counterfactual(w, x, 1, max_steps=40, early_stop=False, recorded=torch.arange(1000) < 400)
    d = cf.delta[0].abs()
    assert d[:, 400:].max() == 0 and d[:, :400].sum() > 0
    # the untouched end margin (0.3 s) sits at the recording's end
    assert d[:, 370:400].max() == 0 and d[:, :30].max() == 0
    # at the full window, a mask of ones changes nothing
    x_full = w.prepare(_record(t=1000))
    a = counterfactual(w, x_full, 1, max_steps=15, early_stop=False)
    b = counterfactual(w, x_full, 1, max_steps=15, early_stop=False, recorded=torch.ones(1000, dtype=torch.bool))
    assert torch.equal(a.counterfactual, b.counterfactual)


def test_explain_records_leaves_padding_out_and_is_unchanged_at_full_window(tmp_path, monkeypatch):
    from ecgfm.explain import faithfulness as faith_mod
    from ecgfm.explain.report import explain_records

    w = _wrapper()
    with pytest.warns(UserWarning, match="zero-padded"):
        rep = explain_records(w, [_record(t=400)], tmp_path / "short", methods=["saliency"], formats=["png"],
                              faithfulness_options={"n_random": 1, "steps": 4}, counterfactual={"max_steps": 10})
    assert rep["records"][0]["padded_fraction"] == pytest.approx(0.6)
    # the faithfulness report and the counterfactual got the recorded mask: t < 400
    seen = {}
    real = faith_mod.faithfulness_report

    def spy(*a, **k):
        seen["recorded"] = k.get("recorded")
        return real(*a, **k)

    monkeypatch.setattr(faith_mod, "faithfulness_report", spy)
    with pytest.warns(UserWarning, match="zero-padded"):
        explain_records(w, [_record(t=400)], tmp_path / "short2", methods=["saliency"], formats=["png"],
                        faithfulness_options={"n_random": 1, "steps": 4})
    r = torch.as_tensor(seen["recorded"]).reshape(-1)
    assert r[:400].all() and not r[400:].any()
    # full window: the scores are those of the code without the mask
    monkeypatch.setattr(faith_mod, "faithfulness_report", real)
    rec = _record(t=1000)
    full = explain_records(w, [rec], tmp_path / "full", methods=["saliency"], formats=["png"],
                           faithfulness_options={"n_random": 1, "steps": 4}, counterfactual={"max_steps": 10})
    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.counterfactual import counterfactual

    x = w.prepare(rec)
    att = Explainer(w).explain(x, method="saliency", target=full["records"][0]["target"]["index"])
    ref = real(Explainer(w), att, n_random=1, steps=4, order="signed")
    got = full["records"][0]["methods"]["saliency"]["faithfulness"]
    assert got["deletion_aopc"]["mean"] == float(ref["deletion_aopc"]["mean"])
    assert got["insertion_auc"]["mean"] == float(ref["insertion_auc"]["mean"])
    cf_t = full["records"][0]["counterfactual"]["records"][0]["target"]
    cf = counterfactual(w, x, cf_t, max_steps=10)
    assert full["records"][0]["counterfactual"]["records"][0]["l1"] == float(cf.l1[0])


# ------------------------------------------------------------------------------------------------ 3. top leads
def test_a_lead_without_attribution_is_never_a_top_lead():
    from ecgfm.explain.attribution import lead_ranking

    assert lead_ranking([1.0, 0.0], k=3) == [0]
    assert lead_ranking([0.7, 0.3, 0.0], k=3) == [0, 1]
    assert lead_ranking([0.7, 0.3, 0.0], k=2) == [0, 1]
    assert lead_ranking([0.5, -0.2, 0.0], k=3) == [0]          # signed totals: a negative lead is no top lead
    assert lead_ranking([1.0] + [0.0] * 11, k=3) == [0]
    assert lead_ranking([0.0, 0.0], k=3) is None
    assert lead_ranking([0.6, 0.4], k=3) == [0, 1]


# ------------------------------------------------------------------------------------------------ 4. mixed lengths
def test_records_of_different_lengths_fail_with_both_named():
    from ecgfm.explain.attribution import Explainer

    w = _wrapper(n_samples=None)
    a, b = _record(t=1000, rid="a"), _record(t=800, rid="b")
    with pytest.raises(ECGDataError, match=r"test/b.*800 samples.*test/a has 1000.*separate calls"):
        w.prepare([a, b])
    with pytest.raises(ECGDataError, match="crop or pad"):
        Explainer(w).explain([a, b], method="saliency")
    assert tuple(w.prepare([a, _record(t=1000, rid="c")]).shape) == (2, 12, 1000)


# ------------------------------------------------------------------------------------------------ 5. colour bar
def _inside_figure(fig, artist) -> bool:
    fig.canvas.draw()
    bb = artist.get_window_extent(fig.canvas.get_renderer())
    w, h = fig.canvas.get_width_height()
    return bb.x0 >= -1 and bb.x1 <= w + 1 and bb.y0 >= -1 and bb.y1 <= h + 1


def test_colour_bar_label_of_a_short_chart_fits_and_keeps_the_clipping_note():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ecgfm.explain.visualize import plot_ecg_chart

    sig = _beats(1000)[1:2]
    att = np.zeros_like(sig)
    att[0, ::50] = 1.0
    att[0, 500] = 50.0                                        # one value beyond the 99th percentile: scale clipped
    fig = plot_ecg_chart(sig, FS, ["II"], attribution=att)
    FigureCanvasAgg(fig)
    label = fig.axes[-1].yaxis.label                          # the colour bar's axes is added last
    assert _inside_figure(fig, label)
    head = next(t.get_text() for t in fig.texts if t.get_gid() == "chart_header").replace("\n", " ")
    text = label.get_text().replace("\n", " ") + " " + head
    assert "scale clipped at the 99th percentile" in text
    # a tall chart keeps the note beside the bar
    fig12 = plot_ecg_chart(_beats(1000), FS, CANONICAL_LEADS, attribution=np.tile(att, (12, 1)))
    FigureCanvasAgg(fig12)
    label12 = fig12.axes[-1].yaxis.label
    assert "scale clipped" in label12.get_text().replace("\n", " ") and _inside_figure(fig12, label12)


# ------------------------------------------------------------------------------------------------ 6. training data
PTBXL_DEMO = "PTB-XL superdiagnostic, ecg_id <= 500, 100 Hz; strat_fold 1-8 train (352 records), 9 validation (72)"


def _ptbxl(rid: str, fold: int) -> ECGRecord:
    return ECGRecord(signal=np.zeros((12, 10), np.float32), fs=FS, lead_mask=np.ones(12, bool), record_id=rid,
                     source="ptbxl", meta={"strat_fold": fold})


def test_explain_names_the_training_data_and_flags_training_records(tmp_path):
    """``python explain.py checkpoint=outputs/explain_demo/ptbxl_super data=ptbxl`` explained 00001 (strat_fold 3,
    a training fold) without a word."""
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.explain.classifier import save_classifier
    from ecgfm.explain.report import training_data, training_membership

    # records without their labels: the demo trained only on records with a label of its task, so membership of
    # the folds is all that can be said (labelled records: test_explain_review_s26_chart.py)
    assert training_membership(PTBXL_DEMO, _ptbxl("00001", 3)) == "training folds"
    assert training_membership(PTBXL_DEMO, _ptbxl("00017", 9)) == "validation fold"
    assert training_membership(PTBXL_DEMO, _ptbxl("00180", 10)) == "held out"
    assert training_membership(PTBXL_DEMO, _ptbxl("00600", 3)) == "held out"          # beyond ecg_id <= 500
    syn = "synthetic seed 0: records 0-287 train, 288-359 validation"
    rec = lambda i: ECGRecord(signal=np.zeros((12, 10), np.float32), fs=FS, lead_mask=np.ones(12, bool),  # noqa
                              record_id=f"syn{i:06d}", source="synthetic")
    from ecgfm.data.synthetic import SyntheticSource

    same = SyntheticSource(1024, seed=0, fs=500.0, duration=10.0)
    assert [training_membership(syn, rec(i), source=same) for i in (0, 288, 400)] == \
        ["training", "validation", "held out"]
    # another seed's syn000000 is another ECG (the README's chain explains data=synthetic of another corpus);
    # a source that does not say cannot be matched
    assert training_membership(syn, rec(0), source=SyntheticSource(1024, seed=1, fs=500.0, duration=10.0)) is None
    assert training_membership(syn, rec(0)) is None
    syn_d = "synthetic seed 0 (500 Hz, 5 s records): records 0-287 train, 288-359 validation"
    assert training_membership(syn_d, rec(0), source=same) is None                   # 10 s records are others
    assert training_membership(syn_d, rec(0), source=SyntheticSource(10, seed=0, fs=500.0, duration=5.0)) == \
        "training"
    # a description that names no records (a sweep cell's) cannot tell
    assert training_membership("task ptbxl_super (ptbxl), train split fraction 1 (17000 records)",
                               _ptbxl("00001", 3)) is None
    assert training_membership(None, _ptbxl("00001", 3)) is None
    bb = create_backbone("resnet1d_test")
    save_classifier(tmp_path / "clf", bb, nn.Linear(bb.num_features, 3), PreprocessSpec(fs=FS), ["A", "B", "C"],
                    multilabel=False, n_samples=1000, extra={"data": PTBXL_DEMO})
    assert training_data(tmp_path / "clf") == PTBXL_DEMO
    save_classifier(tmp_path / "bare", bb, nn.Linear(bb.num_features, 3), PreprocessSpec(fs=FS), ["A", "B", "C"],
                    multilabel=False, n_samples=1000)
    assert training_data(tmp_path / "bare") is None and training_data(tmp_path / "missing") is None
