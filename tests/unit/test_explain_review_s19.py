"""Explain review s19: a record shorter than the model's window (zero-padded at the end) and the score faithfulness
tracks.

1. R peaks were searched with the padding in: past 50 % padding the band-passed median was 0 on every lead, no lead
   counted as active and no beat was found (report: ``n_beats_detected`` 0, every P / QRS / T share 0).
2. Per-wave / per-lead summaries counted attribution on the padding ("other" inflated, densities over padded
   samples).
3. ``randomisation_check`` ranked the padding: shared exact zeros inflated the Spearman correlations.
4. Perturbation curves scored the probability by default while the attribution explains the logit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from test_explain_review_s16 import _record, _wrapper
from test_faithfulness import TinyCNN

FS = 100.0


def _synthetic(n_real: int) -> tuple[np.ndarray, np.ndarray]:
    """``(padded (12, 1000), recorded (1000,) bool)``: a 10 s synthetic ECG whose samples from ``n_real`` on are
    zero padding."""
    from ecgfm.data.synthetic import generate_record

    sig = generate_record(0, seed=0, fs=FS, duration=10.0).signal.astype(np.float32)
    x = np.zeros_like(sig)
    x[:, :n_real] = sig[:, :n_real]
    return x, np.arange(sig.shape[1]) < n_real


def _prepare(w, record):
    """``w.prepare(record)`` without its zero-padding warning (the padding is the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return w.prepare(record)


def _explain_short(tmp_path, t: int, **kw):
    from ecgfm.explain.report import explain_records

    w = _wrapper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = explain_records(w, [_record(t=t)], tmp_path / f"r{t}", methods=["saliency"], formats=["png"],
                              chart_methods=[], dpi=30, **kw)
    return w, rep["records"][0], rep


# ----------------------------------------------------------------------------------------- 1. beats on padding
def test_r_peaks_are_found_in_a_record_padded_past_half_the_window():
    """3 s of a 10 s window: 0 beats were found (4 on the 3 s alone); now the recorded span is searched."""
    from ecgfm.explain import waves

    x, rec = _synthetic(300)
    alone = waves.detect_r_peaks(x[:, :300], FS)
    assert len(alone) >= 3
    np.testing.assert_array_equal(waves.detect_r_peaks(x, FS), alone)                   # exact-zero tail left out
    np.testing.assert_array_equal(waves.detect_r_peaks(x, FS, recorded=rec), alone)
    batch = waves.detect_r_peaks_batch(torch.as_tensor(x)[None].repeat(2, 1, 1), FS,
                                       recorded=torch.as_tensor(rec)[None].repeat(2, 1))
    assert all(np.array_equal(p, alone) for p in batch)
    # too little recorded to hold a beat: nothing, not an error
    assert waves.detect_r_peaks(x, FS, recorded=np.arange(1000) < 30).size == 0


def test_unpadded_r_peaks_are_unchanged():
    """A record without padding is searched whole, exactly as before (indices from the pre-fix detector, on the
    synthetic generator 2 record: its muscle noise changed in s20, the second beat's index 89 -> 88)."""
    from ecgfm.data.synthetic import generate_record
    from ecgfm.explain import waves

    sig = generate_record(0, seed=1, fs=FS, duration=10.0).signal
    before = [14, 88, 166, 240, 315, 393, 471, 548, 626, 705, 783, 860, 938]
    assert waves.detect_r_peaks(sig, FS).tolist() == before
    assert waves.detect_r_peaks(sig, FS, recorded=np.ones(sig.shape[1], bool)).tolist() == before


def test_report_detects_the_beats_of_a_short_record(tmp_path):
    """report.json of a 3 s record in a 10 s window: beats and wave shares (was 0 beats, 100 % "other")."""
    from ecgfm.explain import waves

    w, r, _ = _explain_short(tmp_path, 300, faithfulness=False)
    x = _prepare(w, _record(t=300))
    assert r["n_beats_detected"] == len(waves.detect_r_peaks(x[0, :, :300], FS)) >= 3
    pw = r["methods"]["saliency"]["per_wave"]
    assert min(pw[k]["share_abs"] for k in ("P", "QRS", "T")) > 0.05


def test_per_wave_wave_ablation_and_change_summary_find_beats_on_padded_input():
    """The detection callers that get no mask (``per_wave(windows=None)``, wave ablation, the counterfactual's
    ``change_summary``) found no beat on a record padded past half the window."""
    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.counterfactual import change_summary

    x, _ = _synthetic(300)
    x = torch.as_tensor(x)[None]
    w = _wrapper()
    att = Explainer(w).explain(x, target=0, method="saliency")
    assert float(att.per_wave()["QRS"][0]) > 0
    abl = Explainer(w).explain(x, target=0, method="wave_ablation")
    assert abl.options["n_beats"][0] >= 3
    delta = torch.zeros_like(x)
    delta[..., :300] = 1.0
    _, per_wave, _ = change_summary(delta, x, FS, w.lead_names)
    assert float(per_wave["QRS"][0]) > 0.05


# ------------------------------------------------------------------------------ 2. summaries count the padding
def test_report_wave_and_lead_summaries_leave_the_padding_out(tmp_path):
    """A 4 s record in a 10 s window: report.json's per-wave and per-lead numbers are those of the same map on the
    recorded 4 s (the padding held ~47 % of |saliency|, all counted as "other")."""
    from ecgfm.explain import report as report_mod
    from ecgfm.explain import waves
    from ecgfm.explain.attribution import Attribution, Explainer

    w, r, _ = _explain_short(tmp_path, 400, faithfulness=False)
    x = _prepare(w, _record(t=400))
    att = Explainer(w).explain(x, target=r["target"]["index"], method="saliency")
    assert float(att.values[..., 400:].abs().sum()) > 0.2 * float(att.values.abs().sum())   # padding does hold some
    cut = Attribution(values=att.values[..., :400], method="saliency", options={}, target=att.target,
                      inputs=x[..., :400], fs=att.fs, lead_names=att.lead_names, elapsed_s=0.0)
    win = waves.wave_windows(waves.detect_r_peaks(x[0, :, :400], FS), FS, 400)
    want_wave = report_mod._wave_summary(cut, win)
    want_lead = report_mod._lead_summary(cut, w.lead_names)
    got = r["methods"]["saliency"]
    for wave, v in want_wave.items():
        for k in ("share_abs", "density_abs", "sum_signed"):
            assert got["per_wave"][wave][k] == pytest.approx(v[k], rel=1e-5, abs=1e-9), (wave, k)
    for lead, v in want_lead["share_abs"].items():
        assert got["per_lead"]["share_abs"][lead] == pytest.approx(v, rel=1e-5, abs=1e-9)
    assert got["per_lead"]["top"] == want_lead["top"]


def test_attribution_per_wave_and_per_lead_take_the_recorded_mask():
    """``recorded=``: padding is in no wave and not in "other"; densities divide by recorded samples only; an
    all-True mask gives exactly the unmasked numbers (unpadded records are unchanged)."""
    from ecgfm.explain import waves
    from ecgfm.explain.attribution import Attribution

    torch.manual_seed(0)
    n, n_real = 1000, 400
    x, _ = _synthetic(n_real)
    x = torch.as_tensor(x)[None]
    v = torch.randn_like(x)
    att = Attribution(values=v, method="saliency", options={}, target=torch.zeros(1, dtype=torch.long), inputs=x,
                      fs=FS, lead_names=tuple(str(i) for i in range(12)), elapsed_s=0.0)
    rec = torch.arange(n) < n_real
    win = waves.wave_windows(waves.detect_r_peaks(x[0, :, :n_real], FS), FS, n_real)
    masks = waves.wave_mask(win, n)
    other = ~np.any(np.stack([masks[k] for k in waves.WAVES]), 0) & rec.numpy()
    got = att.per_wave(win, recorded=rec)
    assert float(got["other"][0]) == pytest.approx(float(v[0][:, torch.as_tensor(other)].abs().sum()), rel=1e-5)
    dens = att.per_wave(win, recorded=rec, normalize=True)
    assert float(dens["other"][0]) == pytest.approx(float(v[0][:, torch.as_tensor(other)].abs().mean()), rel=1e-5)
    # the windows=None path detects on the recorded span as well
    assert float(att.per_wave(recorded=rec)["QRS"][0]) == pytest.approx(float(got["QRS"][0]), rel=1e-6)
    torch.testing.assert_close(att.per_lead(recorded=rec), v[..., :n_real].abs().sum(-1))
    # unpadded: an all-True mask changes nothing, bit for bit
    every = torch.ones(n, dtype=torch.bool)
    for kw in ({}, {"normalize": True}, {"by_lead": True, "normalize": True}, {"reduce": "signed"}):
        a, b = att.per_wave(win, **kw), att.per_wave(win, recorded=every, **kw)
        assert all(torch.equal(a[k], b[k]) for k in a), kw
    assert torch.equal(att.per_lead(), att.per_lead(recorded=every))


def test_unpadded_report_summaries_are_unchanged(tmp_path):
    """A record filling the window: report.json's per-wave / per-lead numbers are the unmasked ones."""
    from ecgfm.explain import report as report_mod
    from ecgfm.explain import waves
    from ecgfm.explain.attribution import Explainer

    w, r, _ = _explain_short(tmp_path, 1000, faithfulness=False)
    x = _prepare(w, _record(t=1000))
    att = Explainer(w).explain(x, target=r["target"]["index"], method="saliency")
    win = waves.wave_windows(waves.detect_r_peaks(x[0], FS), FS, 1000)
    assert r["methods"]["saliency"]["per_wave"] == report_mod._wave_summary(att, win)
    old = report_mod._lead_summary(att, w.lead_names)
    assert r["methods"]["saliency"]["per_lead"]["share_abs"] == old["share_abs"]
    assert r["n_beats_detected"] == len(waves.detect_r_peaks(x[0], FS))


# ------------------------------------------------------------------------------ 3. randomisation over padding
def _padded_batch(n_real: int = 300):
    torch.manual_seed(0)
    x = torch.zeros(3, 12, 1000)
    x[:, :, :n_real] = torch.randn(3, 12, n_real)
    return x, torch.arange(1000) < n_real


def test_randomisation_check_ranks_recorded_samples_only():
    """Input x gradient is exactly 0 on the padding in every map: those ties read as agreement (0.98 against 0.5
    on the recorded samples). With ``recorded=`` (and from faithfulness_report) only recorded samples are ranked."""
    import copy

    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.faithfulness import _randomise, faithfulness_report, randomisation_check, spearman
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    w = ECGWrapper(TinyCNN(), fs=FS)
    ex = Explainer(w)
    x, rec = _padded_batch()
    rc = randomisation_check(ex, x, "input_x_gradient", target=1, max_layers=2, recorded=rec)
    orig = ex.explain(x, target=1, method="input_x_gradient")
    cw = copy.deepcopy(w)
    for i, name in enumerate(rc["layers"]):
        _randomise(cw.layer(name), 1 + i)
        a = Explainer(cw).explain(x, target=1, method="input_x_gradient")
        want = spearman(orig.values.abs(), a.values.abs(), rec[None, None].expand_as(a.values))
        torch.testing.assert_close(rc["spearman_abs"][i], want)
    assert float(rc["spearman_abs"].mean()) < 0.8
    unmasked = randomisation_check(ex, x, "input_x_gradient", target=1, max_layers=2)
    assert float(unmasked["spearman_abs"].mean()) > float(rc["spearman_abs"].mean()) + 0.2   # the bias it removes
    rep = faithfulness_report(ex, orig, recorded=rec, randomisation=True, randomisation_layers=2, n_random=1, steps=2)
    got = [s["spearman_abs"]["mean"] for s in rep["randomisation"]]
    assert got == pytest.approx(rc["spearman_abs"].mean(1).tolist(), rel=1e-6)


def test_randomisation_check_unpadded_is_unchanged():
    """Every sample recorded: the same correlations as without a mask."""
    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.faithfulness import randomisation_check
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    ex = Explainer(ECGWrapper(TinyCNN(), fs=FS))
    x = torch.randn(2, 12, 200)
    a = randomisation_check(ex, x, "input_x_gradient", target=1, max_layers=2)
    b = randomisation_check(ex, x, "input_x_gradient", target=1, max_layers=2, recorded=torch.ones(200, dtype=bool))
    assert torch.equal(a["spearman_abs"], b["spearman_abs"]) and torch.equal(a["spearman_signed"],
                                                                             b["spearman_signed"])


# ----------------------------------------------------------------------------------- 4. logit vs probability
class _Energy(nn.Module):
    """``e`` = energy of lead 0 in samples 50-100; logits ``(3e, e)``: the window raises logit 1 but lowers its
    softmax probability (logit 0 rises faster)."""

    def forward(self, x):
        e = (x[:, 0, 50:100] ** 2).mean(-1)
        return torch.stack([3 * e, e], 1)


def _energy_case():
    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    x = torch.randn(6, 12, 200)
    w = ECGWrapper(_Energy(), fs=FS, postprocess="softmax")
    return w, x, Explainer(w)


def test_perturbation_curves_score_the_output_the_attribution_explains():
    """A logit map scored on the probability read below random (gain -0.19); by default the curve now tracks the
    output the attribution explains, and an explicit ``output=`` keeps its meaning."""
    from ecgfm.explain.faithfulness import compare_with_random, perturbation_curve

    w, x, ex = _energy_case()
    att = ex.explain(x, target=1, method="input_x_gradient")
    assert att.options["output"] == "logit"
    default = perturbation_curve(w, x, att, steps=4, order="signed")["curve"]
    torch.testing.assert_close(default, perturbation_curve(w, x, att, steps=4, order="signed", output="logit")["curve"])
    proba = perturbation_curve(w, x, att, steps=4, order="signed", output="proba")["curve"]
    torch.testing.assert_close(proba[:, 0], torch.softmax(w(x), 1)[:, 1].detach())
    res = compare_with_random(w, x, att, n_random=2, steps=4, order="signed")
    assert res["output"] == "logit" and res["deletion_aopc_gain"]["mean"] > 0
    res_p = compare_with_random(w, x, att, n_random=2, steps=4, order="signed", output="proba")
    assert res_p["output"] == "proba" and res_p["deletion_aopc_gain"]["mean"] < 0
    # a probability explanation is scored on the probability; bare values keep the old default
    att_p = ex.explain(x, target=1, method="input_x_gradient", output="proba")
    torch.testing.assert_close(perturbation_curve(w, x, att_p, steps=4)["curve"],
                               perturbation_curve(w, x, att_p, steps=4, output="proba")["curve"])
    torch.testing.assert_close(perturbation_curve(w, x, att.values, target=att.target, steps=4)["curve"],
                               perturbation_curve(w, x, att.values, target=att.target, steps=4,
                                                  output="proba")["curve"])


def test_report_names_the_scored_output(tmp_path):
    """report.json says which score the faithfulness curves tracked (the note named the probability whatever the
    attribution explained); an explicit faithfulness output is kept."""
    _, r, rep = _explain_short(tmp_path, 1000, faithfulness_options={"n_random": 1, "steps": 2})
    assert r["methods"]["saliency"]["faithfulness"]["output"] == "logit"
    assert "logit" in rep["notes"]["faithfulness"]
    _, r, rep = _explain_short(tmp_path, 1000, faithfulness_options={"n_random": 1, "steps": 2, "output": "proba"})
    assert r["methods"]["saliency"]["faithfulness"]["output"] == "proba"
    assert "probability (faithfulness_options output='proba')" in rep["notes"]["faithfulness"]
