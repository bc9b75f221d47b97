"""Explain review s20.

1. explain.py had no config key for the score the faithfulness curves track: the Python API took
   ``faithfulness_options={"output": "proba"}``, the entry point could not (``faithfulness.output``, now in
   ``conf/explain.yaml``: ``logit`` | ``proba`` | null, the output each attribution explains).
2. ``Attribution.per_beat``'s last beat ran to the end of the window: for a record shorter than the model's window
   it counted the zero padding (``recorded=`` now clips each beat to the recorded span, as ``per_lead`` /
   ``per_wave`` leave the padding out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from ecgfm.data.preprocess import PreprocessSpec

ROOT = Path(__file__).resolve().parents[2]
FS = 100.0


# ------------------------------------------------------------------------------------ 1. faithfulness.output
class _Energy(nn.Module):
    """``e`` = energy of lead 0 in samples 100-200; logits ``(3e, e)``: the window raises logit 1 but lowers its
    softmax probability (logit 0 rises faster), so logit and probability curves disagree in sign."""

    def forward(self, x):
        e = (x[:, 0, 100:200] ** 2).mean(-1)
        return torch.stack([3 * e, e], 1)


def _energy_wrapper():
    from ecgfm.explain.wrapper import ECGWrapper

    return ECGWrapper(_Energy(), fs=FS, preprocess=PreprocessSpec(fs=FS), class_names=("a", "b"), n_samples=1000,
                      postprocess="softmax")


def _cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("explain", overrides=[
            f"out_dir={tmp}", f"checkpoint={tmp / 'energy_classifier'}", "methods=[input_x_gradient]", "target=b",
            "formats=[png]", "faithfulness.n_random=1", "faithfulness.steps=4",
            "source={_target_: ecgfm.data.synthetic.SyntheticSource, n_records: 2, fs: 100.0}", *overrides])


def test_the_explain_config_has_a_faithfulness_output_key():
    """``faithfulness.output`` composes (default null) and passes the schema check with each allowed value."""
    from ecgfm.recipes import validate_explain_config

    for value, want in (("null", None), ("logit", "logit"), ("proba", "proba")):
        cfg = _cfg(Path("/tmp/unused"), f"faithfulness.output={value}")
        assert cfg.faithfulness.output == want
        assert validate_explain_config(cfg).faithfulness.output == want


def test_explain_py_scores_the_configured_output(tmp_path, monkeypatch):
    """``python explain.py faithfulness.output=...`` (explain_main in-process): report.json names the scored output
    and its numbers are those of that output (logit and probability curves of this model disagree in sign);
    null scores the output the attribution explains (the logit)."""
    import json

    from ecgfm.explain import report as report_mod
    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.faithfulness import faithfulness_report

    w = _energy_wrapper()
    monkeypatch.setattr(report_mod, "load_model", lambda *a, **k: w)
    got = {}
    for value in ("null", "logit", "proba"):
        out = tmp_path / value
        report_mod.explain_main(_cfg(out, f"faithfulness.output={value}"))
        saved = json.loads((out / "report.json").read_text())
        got[value] = saved["records"][0]["methods"]["input_x_gradient"]["faithfulness"]
        assert saved["records"][0]["target"]["class"] == "b"
        scored = "logit" if value == "null" else value
        assert got[value]["output"] == scored
        assert scored in saved["notes"]["faithfulness"]
    assert "faithfulness_options output='proba'" in json.loads((tmp_path / "proba" / "report.json").read_text())[
        "notes"]["faithfulness"]
    # the numbers are those of the chosen output (the same record, the same attribution, scored directly)
    from ecgfm.data.synthetic import SyntheticSource

    x = w.prepare(SyntheticSource(n_records=2, fs=100.0).load("syn000000"))
    att = Explainer(w).explain(x, target=1, method="input_x_gradient")
    for value, scored in (("logit", "logit"), ("proba", "proba")):
        want = faithfulness_report(Explainer(w), att, n_random=1, steps=4, segment_s=0.1, order="signed",
                                   output=scored, attach=False, recorded=torch.ones(1, x.shape[-1], dtype=bool))
        for key in ("deletion_aopc", "deletion_aopc_gain", "insertion_auc"):
            assert got[value][key]["mean"] == pytest.approx(want[key]["mean"], rel=1e-5, abs=1e-7), (value, key)
    assert got["null"]["deletion_aopc"] == got["logit"]["deletion_aopc"]
    # logit: deleting the window lowers the explained logit (beats random); probability: it raises it
    assert got["logit"]["deletion_aopc_gain"]["mean"] > 0 > got["proba"]["deletion_aopc_gain"]["mean"]


@pytest.mark.parametrize("value", ["probability", "prob", "1"])
def test_a_bad_faithfulness_output_is_refused_naming_the_key(tmp_path, monkeypatch, value):
    """A value the curves cannot score fails before anything runs, naming the key and the allowed values (it was no
    key at all; through the API an unknown output failed after the first attribution had been computed)."""
    from ecgfm.errors import ConfigError
    from ecgfm.explain import report as report_mod

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(report_mod, "load_model", no_model)
    with pytest.raises(ConfigError, match="faithfulness.output") as info:
        report_mod.explain_main(_cfg(tmp_path, f"faithfulness.output={value}"))
    assert info.value.key == "faithfulness.output"
    assert "logit" in info.value.problem and "proba" in info.value.problem and value in info.value.problem
    assert not (tmp_path / "report.json").exists()


def test_the_api_refuses_a_bad_faithfulness_output_before_explaining(tmp_path, monkeypatch):
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.explain import report as report_mod
    from ecgfm.explain.attribution import Explainer

    def no_explain(*a, **k):
        raise AssertionError("an attribution was computed before the options were checked")

    monkeypatch.setattr(Explainer, "explain", no_explain)
    rec = SyntheticSource(n_records=1, fs=100.0).load("syn000000")
    with pytest.raises(ValueError, match=r"faithfulness_options\['output'\] must be one of logit, proba"):
        report_mod.explain_records(_energy_wrapper(), [rec], tmp_path, methods=["saliency"], formats=["png"],
                                   faithfulness_options={"output": "probability"})
    # faithfulness off: the option is not used, not checked
    monkeypatch.undo()
    report_mod.explain_records(_energy_wrapper(), [rec], tmp_path, methods=["saliency"], formats=["png"], dpi=30,
                               faithfulness=False, faithfulness_options={"output": "probability"})


# ------------------------------------------------------------------------------------------- 2. per-beat padding
def _padded(n_real: int, n: int = 1000):
    """``(x (1, 12, n), recorded (n,) bool)``: a 10 s synthetic ECG whose samples from ``n_real`` on are zero
    padding."""
    from ecgfm.data.synthetic import generate_record

    sig = generate_record(0, seed=0, fs=FS, duration=n / FS).signal.astype(np.float32)
    x = np.zeros_like(sig)
    x[:, :n_real] = sig[:, :n_real]
    return torch.as_tensor(x)[None], torch.arange(n) < n_real


def _att(x: torch.Tensor, values: torch.Tensor):
    from ecgfm.explain.attribution import Attribution

    return Attribution(values=values, method="saliency", options={}, target=torch.zeros(1, dtype=torch.long),
                       inputs=x, fs=FS, lead_names=tuple(str(i) for i in range(12)), elapsed_s=0.0)


def test_beat_bounds_end_at_the_recorded_span():
    from ecgfm.explain import waves

    np.testing.assert_array_equal(waves.beat_bounds([50, 150], 1000), [[0, 100], [100, 1000]])   # unchanged
    rec = np.arange(1000) < 300
    np.testing.assert_array_equal(waves.beat_bounds([50, 150], 1000, recorded=rec), [[0, 100], [100, 300]])
    np.testing.assert_array_equal(waves.beat_bounds([50, 150], 1000, recorded=torch.as_tensor(rec)),
                                  [[0, 100], [100, 300]])
    # a span that starts later clips the first beat; a peak past the span is an empty beat, not a negative one
    late = (np.arange(1000) >= 20) & (np.arange(1000) < 120)
    np.testing.assert_array_equal(waves.beat_bounds([50, 150], 1000, recorded=late), [[20, 100], [100, 120]])
    np.testing.assert_array_equal(waves.beat_bounds([50, 400], 1000, recorded=rec), [[0, 225], [225, 300]])
    np.testing.assert_array_equal(waves.beat_bounds([50, 700], 1000, recorded=rec), [[0, 300], [300, 300]])
    assert waves.beat_bounds([], 1000, recorded=rec).shape == (0, 2)
    with pytest.raises(ValueError, match="recorded mask"):
        waves.beat_bounds([50], 1000, recorded=np.ones(999, bool))


def test_per_beat_leaves_the_padding_out_of_the_last_beat():
    """A 4 s record in a 10 s window with all its attribution mass on the padding: the last beat held all of it
    (its span ran to sample 1000); with ``recorded=`` the beats hold exactly the recorded samples' mass."""
    from ecgfm.explain import waves

    n_real = 400
    x, rec = _padded(n_real)
    v = torch.zeros_like(x)
    v[..., n_real:] = 1.0                                          # mass on the padding only
    v[..., :n_real] = 0.01
    att = _att(x, v)
    peaks = waves.detect_r_peaks(x[0, :, :n_real], FS)
    assert len(peaks) >= 3
    old = att.per_beat([peaks])[0]
    assert float(old[-1].sum()) > 12 * (1000 - n_real) * 0.99    # the old behaviour, still the unmasked default
    for mask in (rec, rec[None], rec[None, None].expand(1, 12, -1)):
        got = att.per_beat([peaks], recorded=mask)[0]
        assert got.shape == (len(peaks), 12)
        torch.testing.assert_close(got.sum(0), v[0, :, :n_real].sum(-1))         # every recorded sample, once
        bounds = waves.beat_bounds(peaks, n_real)
        torch.testing.assert_close(got[-1], v[0, :, bounds[-1, 0]:n_real].sum(-1))
    # detected beats (r_peaks=None) are those of the recorded span
    auto = att.per_beat(recorded=rec)[0]
    torch.testing.assert_close(auto, att.per_beat([peaks], recorded=rec)[0])


def test_per_beat_sums_recorded_samples_of_each_lead():
    """A ``(B, L, T)`` mask: a lead recorded for less time contributes only its recorded samples."""
    from ecgfm.explain import waves

    x, rec = _padded(600)
    v = torch.ones_like(x)
    att = _att(x, v)
    keep = rec[None, None].repeat(1, 12, 1)
    keep[0, 3, 500:] = False
    peaks = waves.detect_r_peaks(x[0, :, :600], FS)
    got = att.per_beat([peaks], recorded=keep)[0]
    assert float(got[:, 3].sum()) == pytest.approx(500)
    assert float(got[:, 0].sum()) == pytest.approx(600)


def test_per_beat_unpadded_is_unchanged():
    """Every sample recorded: the same numbers as without a mask, bit for bit."""
    x, _ = _padded(1000)
    torch.manual_seed(0)
    att = _att(x, torch.randn_like(x))
    every = torch.ones(1000, dtype=torch.bool)
    for reduce in ("abs", "signed"):
        a, b = att.per_beat(reduce=reduce), att.per_beat(reduce=reduce, recorded=every)
        assert len(a) == len(b) == 1 and torch.equal(a[0], b[0])
