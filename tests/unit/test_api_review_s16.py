"""Review s16 of the Python API's user journey: a signal in volts is flagged (it lost leads to the flat-lead threshold
without a word), leads marked absent as flat are named, the demo classifiers record their training leads and an
artifact without them names a record's absent input leads, ``leads=`` given as a string is refused, encoder
messages speak of the encoder, a transposed array is told to pass ``signal.T``, and the demo script says its
validation value is the model-selection value."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ecgfm
from ecgfm.api import Classifier, Encoder
from ecgfm.artifacts import EncoderClassifier, check_trained_leads
from ecgfm.backbones import create_backbone
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError

ROOT = Path(__file__).resolve().parents[2]


def _models(extra: dict | None = None) -> tuple[Encoder, Classifier]:
    """A 12-lead encoder and classifier at 100 Hz, 250-sample windows, without preprocessing (the raw spec)."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet1d_test").eval()
    meta = {"input": {"fs": 100.0, "leads": list(CANONICAL_LEADS), "window_samples": 250, "stride_samples": 250},
            "classes": ["a", "b"], "multilabel": False, "extra": dict(extra or {})}
    head = nn.Linear(backbone.num_features, 2)
    return (Encoder(backbone, None, dict(meta), "cpu"),
            Classifier(EncoderClassifier(backbone, head), None, dict(meta), "cpu"))


def _ecg_mv(seed: int = 0) -> np.ndarray:
    """``(12, 250)`` in mV: limb leads small (0.05 mV standard deviation), chest leads 0.5 mV."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, 250)).astype(np.float32)
    x[:6] *= 0.05
    x[6:] *= 0.5
    return x


def _user_warnings(fn, *args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------------------------------------ 1. volts
def test_a_signal_in_volts_is_flagged_and_its_flat_marked_leads_named():
    _, clf = _models()
    x = _ecg_mv()
    assert _user_warnings(clf.predict_proba, x, fs=100) == []                        # mV: nothing to say
    # uV: this classifier does not normalise (raw spec), so the scale reaches the model: flagged since s20
    uv = _user_warnings(clf.predict_proba, x * 1000, fs=100)
    assert len(uv) == 1 and "looks like microvolts or ADC counts" in uv[0]
    msgs = _user_warnings(clf.predict_proba, x / 1000, fs=100)                       # volts
    volts = [m for m in msgs if "looks like volts" in m]
    assert len(volts) == 1 and volts[0].startswith("record 0:") and "multiply it by 1000" in volts[0]
    flat = [m for m in msgs if "flat-lead threshold" in m and "marked absent as flat" in m]
    assert len(flat) == 1 and "I, II, III, aVR, aVL, aVF vary" in flat[0] and "V1" not in flat[0]
    # a batch names the record that looks so
    batch = np.stack([x, x / 1000])
    msgs = _user_warnings(clf.predict_proba, batch, fs=100)
    assert [m.split(":")[0] for m in msgs if "looks like volts" in m] == ["record 1"]


def test_absent_and_genuinely_flat_leads_raise_no_units_or_flat_warning():
    _, clf = _models()
    x = _ecg_mv()
    x[3] = 0.0                  # disconnected
    x[4] = np.nan               # not recorded
    x[5] = 0.7                  # constant offset
    assert _user_warnings(clf.predict_proba, x, fs=100) == []
    one = x[7:8]                # one normal chest lead
    assert _user_warnings(clf.predict_proba, one, fs=100, leads=["V2"]) == []


def test_a_varying_lead_under_the_flat_threshold_in_a_mv_record_is_named():
    enc, _ = _models()
    x = _ecg_mv()
    x[9] = np.random.default_rng(3).standard_normal(250).astype(np.float32) * 1e-5
    msgs = _user_warnings(enc.embed, x, fs=100)
    assert not any("looks like volts" in m for m in msgs)
    assert len(msgs) == 1 and msgs[0].startswith("record 0: lead(s) V4 vary") and "embedded without them" in msgs[0]


# ------------------------------------------------------------------------------------------------ 2. trained leads
def test_an_artifact_without_trained_leads_names_a_records_absent_input_leads(caplog):
    enc, clf = _models()
    two = _ecg_mv()[[1, 10]]                                   # MIT-BIH 100's layout: II and V5
    with caplog.at_level(logging.WARNING, logger="ecgfm.api"):
        clf.predict_proba(two, fs=100, leads=["II", "V5"])
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "record 0: lead(s) I, III, aVR, aVL, aVF, V1, V2, V3, V4, V6 of the classifier's input" in msg
    assert "scored without them" in msg and "trained_leads" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ecgfm.api"):
        enc.embed(_ecg_mv(), fs=100)                           # all 12 present: nothing to say
    assert not caplog.records


def _fake_ptbxl(root, spec, max_id=500):
    """Preprocessed-looking PTB-XL arrays: V1 absent (zero) in every record, folds 1-9."""
    rng = np.random.default_rng(0)
    n = 36
    x = rng.standard_normal((n, 12, 250)).astype(np.float32)
    x[:, 6] = 0.0
    y = np.zeros((n, 2), np.float32)
    y[::2, 0] = 1
    y[1::2, 1] = 1
    folds = np.array([1 + i % 9 for i in range(n)])
    return x, y, folds, [str(i + 1) for i in range(n)], ["MI", "NORM"]


def test_the_demo_classifiers_record_their_training_leads(tmp_path, monkeypatch, caplog):
    from ecgfm.explain import classifier as demo

    monkeypatch.setattr(demo, "load_ptbxl_superdiagnostic", _fake_ptbxl)
    tiny = {"name": "resnet1d_test", "init_args": {}}
    _, info = demo.train_ptbxl_demo("unused", tmp_path / "ptbxl", epochs=1, backbone=tiny)
    want = [lead for lead in CANONICAL_LEADS if lead != "V1"]
    assert info["trained_leads"] == want
    clf = ecgfm.Classifier.load(tmp_path / "ptbxl")
    assert clf.meta["extra"]["trained_leads"] == want
    lead_ii = _ecg_mv()[1:2] * 20
    with caplog.at_level(logging.WARNING, logger="ecgfm.api"):
        clf.predict_proba(np.repeat(lead_ii, 4, axis=1), fs=100, leads=["II"])
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "lead(s) I, III, aVR, aVL, aVF, V2, V3, V4, V5, V6 of the classifier's training records are absent" in msg

    _, info = demo.train_synthetic_demo(tmp_path / "syn", n_records=20, epochs=1, duration=2.5, backbone=tiny)
    assert info["trained_leads"] == list(CANONICAL_LEADS)
    assert ecgfm.Classifier.load(tmp_path / "syn").meta["extra"]["trained_leads"] == list(CANONICAL_LEADS)


# ------------------------------------------------------------------------------------------------ 3. leads as str
@pytest.mark.parametrize("leads", ["II", "V1"])
def test_leads_given_as_a_string_are_refused(leads):
    enc, clf = _models()
    one = _ecg_mv()[7:8]
    for call in (lambda: clf.predict_proba(one, fs=100, leads=leads), lambda: enc.embed(one, fs=100, leads=leads)):
        with pytest.raises(ValueError, match=r"leads must be a list of names, e\.g\. \['II'\]"):
            call()


# ------------------------------------------------------------------------------------------------ 4. encoder wording
def test_encoder_messages_speak_of_the_encoder(caplog):
    enc, clf = _models({"trained_leads": ["I", "II"]})
    x = _ecg_mv()[[0, 7]]                                      # I and V2: II absent, V2 never seen
    with caplog.at_level(logging.WARNING, logger="ecgfm.api"):
        enc.embed(x, fs=100, leads=["I", "V2"])
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "classifier" not in msg and "scored" not in msg
    assert "lead(s) II of the encoder's training records are absent from this record: embedded without them" in msg
    assert "lead(s) V2 were never present in the encoder's training records" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ecgfm.api"):
        clf.predict_proba(x, fs=100, leads=["I", "V2"])
    assert "of the classifier's training records are absent from this record: scored without them" in caplog.text
    with pytest.raises(ECGDataError, match="the encoder was trained on records with leads I; .* would be embedded"):
        check_trained_leads(["I"], ["V1"], "rec", kind="encoder")
    with pytest.raises(ECGDataError, match="the classifier was trained on records with leads I; .* would be scored"):
        check_trained_leads(["I"], ["V1"], "rec")


# ------------------------------------------------------------------------------------------------ 5. transposed
def test_a_transposed_array_is_told_to_pass_its_transpose():
    enc, _ = _models()
    x = _ecg_mv()
    with pytest.raises(ValueError, match=r"250 rows and 12 columns: rows must be leads .*pass signal\.T"):
        enc.embed(x.T, fs=100)
    with pytest.raises(ValueError, match=r"12 lead names for 250 signal rows; .*pass signal\.T"):
        enc.embed(x.T, fs=100, leads=list(CANONICAL_LEADS))
    with pytest.raises(ValueError, match=r"pass signal\.transpose\(0, 2, 1\)"):
        enc.embed(np.stack([x.T, x.T]), fs=100)
    with pytest.raises(ValueError, match=r"pass \[s\.T for s in signal\]"):
        enc.embed([x.T, x.T[:200]], fs=100)
    # a (leads, samples) array of another lead count keeps the leads= advice
    with pytest.raises(ValueError, match=r"the signal has 3 leads: pass leads="):
        enc.embed(x[:3], fs=100)
    assert enc.embed(x.T.T, fs=100).shape == (enc.num_features,)


# ------------------------------------------------------------------------------------------------ 6. demo script
def test_the_demo_script_says_its_validation_value_is_the_model_selection_value(monkeypatch, capsys):
    from ecgfm.explain import classifier as demo

    def fake_train(root, out, epochs=30, seed=0, lr=3e-3):
        return None, {"val_macro_auroc": {"value": 0.878, "ci_low": 0.8, "ci_high": 0.95, "n": 72},
                      "data": "PTB-XL ...", "classes": ["CD", "NORM"], "best_epoch": 3, "epochs_run": 30,
                      "trained_leads": list(CANONICAL_LEADS)}

    monkeypatch.setattr(demo, "train_ptbxl_demo", fake_train)
    spec = importlib.util.spec_from_file_location("train_explain_demo", ROOT / "scripts" / "train_explain_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["train_explain_demo.py", "--out", "unused", "--threads", "0"])
    script.main()
    out = capsys.readouterr().out
    assert "macro AUROC 0.878" in out
    assert "the model-selection value: the epoch was chosen on this fold, so optimistic" in out
    assert "best epoch 4 of 30" in out
