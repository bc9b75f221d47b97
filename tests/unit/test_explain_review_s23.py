"""Explain review s23 (2026-12-07): what the report shows for a record longer than the model's window, for a model
that reads a subset of the leads, and what the method comparison's colours mean.

D2. ``explain_records`` took "predicted", the default target and the probability from the centred window only; the
    API (``ecgfm.Classifier.predict_proba``) scores every sliding window and aggregates them per the artifact's
    ``window_aggregate``. Now the report's predictions are the API's, the explained window is the API window that adds
    most to the record's score of the explained class, and the titles give both probabilities.
D3. A model reading a subset of the leads (``input_leads``) had the record's other leads drawn as "not recorded".
D4. The method comparison had no colour / sign legend and did not say each row has its own scale.
Minor: the counterfactual figure's title did not name the window.

Every model here is hand-built and tiny; records are synthetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.api import Classifier
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS, ECGRecord
from ecgfm.explain import report as rep
from ecgfm.explain import visualize as viz
from ecgfm.explain.classifier import wrapper_from_artifact
from ecgfm.explain.wrapper import ECGWrapper

FS = 100.0


class Energy(nn.Module):
    """Logits ``(k (e - 0.5), 0)`` with ``e`` the mean square of lead I: class ``a`` where lead I is large."""

    def __init__(self, k: float = 10.0):
        super().__init__()
        self.k = k
        self.bias = nn.Parameter(torch.zeros(1))   # a parameter, so that the wrapper finds a device

    def forward(self, x):
        e = (x[:, 0] ** 2).mean(-1)
        a = self.k * (e - 0.5) + self.bias
        return torch.stack([a, torch.zeros_like(a)], 1)


def _record(amplitudes, seconds: float = 10.0, rid: str = "long") -> ECGRecord:
    """12 leads at 100 Hz: lead I a 7 Hz sine of ``amplitudes[i]`` mV in its i-th stretch of ``seconds``, the other
    leads low noise (present, not flat)."""
    n = int(seconds * FS)
    rng = np.random.default_rng(0)
    sig = (0.05 * rng.standard_normal((12, n * len(amplitudes)))).astype(np.float32)
    t = np.arange(n) / FS
    for i, a in enumerate(amplitudes):
        sig[0, i * n:(i + 1) * n] = a * np.sin(2 * np.pi * 7 * t) * np.sqrt(2)   # mean square a**2
    return ECGRecord(signal=sig, fs=FS, lead_mask=np.ones(12, bool), record_id=rid, source="demo",
                     labels=("a",))


def _artifact(aggregate: str = "prob", stride: int | None = None) -> tuple[nn.Module, dict]:
    meta = {"input": {"fs": FS, "leads": list(CANONICAL_LEADS), "window_samples": 1000, "stride_samples": stride},
            "multilabel": False, "classes": ["a", "b"], "window_aggregate": aggregate}
    return Energy().eval(), meta


def _spy(monkeypatch) -> dict[str, list]:
    """Record each figure function's keyword arguments and returned figure."""
    seen: dict[str, list] = {"chart": [], "methods": [], "counterfactual": []}
    for key, name in (("chart", "plot_ecg_chart"), ("methods", "plot_method_comparison"),
                      ("counterfactual", "plot_counterfactual")):
        orig = getattr(viz, name)

        def spy(*args, _orig=orig, _key=key, **kw):
            fig = _orig(*args, **kw)
            seen[_key].append(({**kw, "_args": args}, fig))
            return fig

        monkeypatch.setattr(viz, name, spy)
    return seen


def _texts(fig, gid: str) -> list[str]:
    out = [t.get_text() for t in fig.texts if t.get_gid() == gid]
    for ax in fig.axes:
        out += [t.get_text() for t in ax.texts if t.get_gid() == gid]
    return out


# ----------------------------------------------------------------------------------------------- D2: record level


@pytest.mark.parametrize("aggregate, stride, amplitudes", [
    ("prob", None, (1.5, 0.2, 1.5)),        # 30 s, windows 0-10, 10-20, 20-30 s; the centred one is 10-20 s
    # 50 s, 9 windows every 5 s: the mean logit says a, the mean probability would say b; the centred one (20-30 s) b
    ("logit", 500, (0.2, 1.5, 0.2, 0.2, 0.2)),
])
def test_report_predictions_are_the_apis_over_all_windows(tmp_path, aggregate, stride, amplitudes):
    """The report's probabilities, ``predicted`` and default target are ``Classifier.predict_proba`` /
    ``predict``'s for the record (was: the centred window's, which said "b" for the 30 s record the API calls "a")."""
    model, meta = _artifact(aggregate, stride)
    rec = _record(amplitudes)
    api = Classifier(model, PreprocessSpec.raw(FS), meta, "cpu")
    expected = api.predict_proba(rec).iloc[0]
    decided = api.predict(rec).iloc[0]
    wrapper = wrapper_from_artifact(model, PreprocessSpec.raw(FS), meta)
    out = rep.explain_records(wrapper, [rec], tmp_path, methods=["saliency"], faithfulness=False, formats=[])
    entry = out["records"][0]
    got = {p["class"]: p["probability"] for p in entry["predictions"]}
    for c in ("a", "b"):
        assert got[c] == pytest.approx(float(expected[c]), abs=1e-9), c
    assert entry["predicted"] == [c for c in ("a", "b") if decided[c]]
    assert entry["target"]["class"] == entry["predicted"][0]
    assert entry["target"]["probability"] == pytest.approx(float(expected[entry["target"]["class"]]), abs=1e-9)
    assert entry["predicted"] == ["a"]   # the centred window alone says b: the report followed it
    if aggregate == "logit":   # the artifact's aggregate decides: averaging probabilities would say b here
        other = Classifier(model, PreprocessSpec.raw(FS), {**meta, "window_aggregate": "prob"}, "cpu")
        assert bool(other.predict(rec).iloc[0]["b"])
    assert "window_aggregate" in out["notes"]["predictions"]


def test_the_explained_window_is_the_api_window_adding_most_to_the_class(tmp_path, monkeypatch):
    """Of the API's windows (0-10, 10-20, 20-30 s), the one with the largest probability of the explained class: the
    loudest (20-30 s) for ``a``, the quiet one (10-20 s) for ``target="b"``. The window's own probability is kept
    (``target.window_probability``) and every title gives both, the counterfactual's with the window (was: the
    centred window whatever the class, one probability, and a counterfactual title without the window)."""
    model, meta = _artifact()
    rec = _record((1.2, 0.2, 1.6))
    wrapper = wrapper_from_artifact(model, PreprocessSpec.raw(FS), meta)
    seen = _spy(monkeypatch)
    out = rep.explain_records(wrapper, [rec], tmp_path / "a", methods=["saliency"], faithfulness=False, formats=[])
    entry = out["records"][0]
    w, tgt = entry["window"], entry["target"]
    assert tgt["class"] == "a"
    assert w["start_s"] == 20.0
    assert (w["length_s"], w["index"], w["n_windows"]) == (10.0, 2, 3)
    with torch.no_grad():   # the window's own probability, from the model on that stretch
        x = torch.from_numpy(rec.signal[:, 2000:3000])[None]
        p_win = float(model(x).softmax(-1)[0, 0])
    assert tgt["window_probability"] == pytest.approx(p_win, abs=1e-6)
    assert tgt["probability"] < tgt["window_probability"]
    p_text = f"p(record) = {tgt['probability']:.2f}, p(window 20.0-30.0 s) = {tgt['window_probability']:.2f}"
    assert p_text in seen["chart"][0][0]["title"]
    assert p_text in seen["methods"][0][0]["title"]
    # the chart's time axis starts at that window, and the drawn signal is that stretch of the record
    chart_kw = seen["chart"][0][0]
    assert chart_kw["window_start_s"] == 20.0
    out_b = rep.explain_records(wrapper, [rec], tmp_path / "b", methods=["saliency"], target="b",
                                faithfulness=False, formats=[])
    assert out_b["records"][0]["window"]["start_s"] == 10.0


def test_counterfactual_title_names_the_window_and_both_probabilities(tmp_path, monkeypatch):
    """The counterfactual figure's time axis starts at the explained window: its title names it (as the methods
    figure's does) and gives its class's probability for the record and for the window (was: "r: counterfactual
    towards b (valid: ...)")."""
    model, meta = _artifact()
    rec = _record((1.2, 0.2, 1.6))
    wrapper = wrapper_from_artifact(model, PreprocessSpec.raw(FS), meta)
    seen = _spy(monkeypatch)
    out = rep.explain_records(wrapper, [rec], tmp_path, methods=["saliency"], target="a", faithfulness=False,
                              formats=[], counterfactual={"max_steps": 3})
    entry = out["records"][0]
    w = entry["window"]
    cf_title = seen["counterfactual"][0][0]["title"]
    assert f"window {w['start_s']:.2f}-{w['start_s'] + 10:.2f} s of 30.00 s" in cf_title
    assert "p(record) = " in cf_title and f"p(window {w['start_s']:.1f}-{w['start_s'] + 10:.1f} s) = " in cf_title
    # the counterfactual's class (b, the other one) with its probability for the record
    assert entry["counterfactual"]["record_target_proba"] == pytest.approx(
        next(p["probability"] for p in entry["predictions"] if p["class"] == "b"), abs=1e-9)


def test_report_json_says_which_window_was_explained(tmp_path):
    """report.json's ``window`` was the centred window (10-20 s of 30 s, not an API window, here the quiet one)
    and no note said how it was chosen."""
    model, meta = _artifact()
    rec = _record((1.5, 0.2, 1.5))
    wrapper = wrapper_from_artifact(model, PreprocessSpec.raw(FS), meta)
    out = rep.explain_records(wrapper, [rec], tmp_path, methods=["saliency"], faithfulness=False, formats=[])
    w = out["records"][0]["window"]
    assert w["start_s"] in (0.0, 20.0)   # an API window where a is loud, not the centred 10-20 s
    assert out["records"][0]["target"]["class"] == "a"
    note = out["notes"]["window"]
    assert "adding most to the record's score of the explained class" in note


# ---------------------------------------------------------------------------------------- D3: leads not read


class OneLead(nn.Module):
    """Reads lead II only (``init_args["input_leads"]``, as ST-MEM ``--leads`` or a one-lead ECGFounder)."""

    init_args = {"input_leads": ["II"]}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv1d(1, 4, 15, padding=7), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x[:, 1:2])).mean(-1))


def test_leads_the_model_does_not_read_are_drawn_and_labelled_not_read(tmp_path, monkeypatch):
    """A 12-lead record (V1 missing) explained by a lead-II model: the chart drew only II and labelled the ten other
    recorded leads "not recorded". Now they are drawn from the record, labelled "not read by the model" (header and
    panel) with no attribution, and "not recorded" is kept for V1 alone; report.json lists them."""
    rng = np.random.default_rng(1)
    t = np.arange(1000) / FS
    sig = (0.3 * np.sin(2 * np.pi * 1.2 * t)[None] * np.arange(1, 13)[:, None]
           + 0.05 * rng.standard_normal((12, 1000))).astype(np.float32)
    mask = np.ones(12, bool)
    mask[CANONICAL_LEADS.index("V1")] = False
    sig[~mask] = 0.0
    rec = ECGRecord(signal=sig, fs=FS, lead_mask=mask, record_id="r", source="demo")
    w = ECGWrapper(OneLead(), fs=FS, preprocess=PreprocessSpec(fs=FS), class_names=["a", "b"], n_samples=1000,
                   window="center")
    seen = _spy(monkeypatch)
    out = rep.explain_records(w, [rec], tmp_path, methods=["saliency"], faithfulness=False, formats=[])
    entry = out["records"][0]
    unread = [lead for lead in CANONICAL_LEADS if lead not in ("II", "V1")]
    kw, fig = seen["chart"][0]
    header = " ".join(_texts(fig, "chart_header")).replace("\n", " ")
    assert "not recorded: V1 |" in header or header.endswith("not recorded: V1")   # V1 alone
    assert "not read by the model" in header and all(lead in header.split("not read by the model")[1]
                                                     for lead in ("I,", "III", "V6"))
    assert len(_texts(fig, "unread_lead")) >= len(unread)          # a panel label for each (II's rhythm strip: none)
    assert _texts(fig, "absent_lead") == ["not recorded"]          # V1 only
    # the record's own leads are drawn: the chart's rows of the unread leads are the record's signal, not zeros
    assert np.asarray(kw["present"], dtype=bool).tolist() == mask.tolist()
    shown = np.asarray(kw["_args"][0])
    assert ((np.abs(shown).max(axis=1) > 0) == mask).all()
    # no attribution is drawn on them (nor scaled from them): only II's traces carry an overlay
    assert not np.asarray(kw["read"], dtype=bool)[[CANONICAL_LEADS.index(lead) for lead in unread]].any()
    # the method comparison picks leads among those the model reads
    mkw, mfig = seen["methods"][0]
    leads_shown = {ax.get_gid().split("lead:")[1] for ax in mfig.axes if (ax.get_gid() or "").startswith("method:")}
    assert leads_shown == {"II"}
    assert entry["unread_leads"] == unread and entry["absent_leads"] == []
    assert w.read_leads == ("II",)


def test_display_signal_keeps_the_leads_the_model_does_not_read():
    """``display_signal`` of a lead-II model zeroed the record's other leads (the spec kept only the model's)."""
    rng = np.random.default_rng(2)
    sig = (0.5 * rng.standard_normal((12, 1000))).astype(np.float32)
    rec = ECGRecord(signal=sig, fs=FS, lead_mask=np.ones(12, bool), record_id="r", source="demo")
    w = ECGWrapper(OneLead(), fs=FS, preprocess=PreprocessSpec(fs=FS), class_names=["a", "b"], n_samples=1000,
                   window="center")
    rows, units = rep.display_signal(rec, w)
    assert units == "mV"
    assert (np.abs(rows).max(axis=1) > 0).all()
    # the model's input still has zero rows there (it does not read them)
    x = w.prepare(rec)
    assert [bool(v) for v in (x[0] != 0).any(-1)] == [lead == "II" for lead in CANONICAL_LEADS]


# ----------------------------------------------------------------------------- D4: the comparison's colour key


def test_method_comparison_says_what_its_colours_mean():
    """A colour bar with -max / 0 / +max and a note: red raises the explained score, blue lowers it, each method
    scaled to its own 99th percentile of |attribution| (the figure said neither)."""
    rng = np.random.default_rng(3)
    sig = rng.standard_normal((12, 500))
    atts = {"ig": rng.standard_normal((12, 500)), "gradcam": 100 * rng.random((12, 500))}
    fig = viz.plot_method_comparison(sig, FS, atts)
    bars = [ax for ax in fig.axes if ax.get_gid() == "colorbar"]
    assert len(bars) == 1
    ticks = [t.get_text() for t in bars[0].get_yticklabels()]
    assert any("-max" in t for t in ticks) and any("+max" in t for t in ticks) and "0" in ticks
    note = " ".join(t.get_text() for t in [fig._supxlabel] if t is not None).replace("\n", " ")
    assert "red raises the explained score, blue lowers it" in note
    assert "own 99th percentile of |attribution|" in note


def test_method_comparison_labels_a_lead_the_model_does_not_read():
    """With ``read=``, a recorded lead the model does not read is drawn without attribution and labelled so, not
    "not recorded"."""
    rng = np.random.default_rng(4)
    sig = rng.standard_normal((3, 300))
    att = rng.standard_normal((3, 300))
    fig = viz.plot_method_comparison(sig, FS, {"ig": att}, lead_names=["I", "II", "III"], leads=["I", "II"],
                                     read=[False, True, False])
    assert _texts(fig, "unread_lead") == ["not read by the model"]
    assert _texts(fig, "absent_lead") == []
    share = " ".join(_texts(fig, "lead_share"))
    assert "I not read" in share and "II 100%" in share


def test_the_console_line_says_the_prediction_is_the_records(tmp_path, capsys):
    """``python explain.py`` on a 30 s record and a 10 s classifier printed "centre window 10.00-20.00 s (not the
    record's prediction)": the prediction was the centred window's. It names the explained window among the record's
    windows and says the prediction is the record's, over all of them."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from ecgfm.backbones import create_backbone
    from ecgfm.explain.classifier import save_classifier

    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    ckpt = save_classifier(tmp_path / "clf", bb, nn.Linear(bb.num_features, 2), PreprocessSpec(fs=FS), ["a", "b"],
                           multilabel=False, n_samples=1000)
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(str(root / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("explain", overrides=[f"out_dir={tmp_path / 'out'}", f"checkpoint={ckpt}", "record=syn000001",
                                            "data=synthetic", "data.params.n_records=4", "data.params.duration=30",
                                            "methods=[saliency]", "faithfulness.enabled=false", "formats=[]"])
    report = rep.explain_main(cfg)
    w = report["records"][0]["window"]
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("record "))
    assert "the prediction is the record's, over all 3 windows" in line and "centre window" not in line
    assert w["start_s"] in (0.0, 10.0, 20.0) and w["n_windows"] == 3
    assert f"window {w['start_s']:.2f}-{w['start_s'] + 10:.2f} s explained (window {w['index'] + 1} of 3" in line
