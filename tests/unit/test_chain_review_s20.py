"""Review s20 of the one-chain artifact path (train -> artifact -> API / explain).

1. An artifact whose preprocessing does not normalise (``preprocess=None`` -> ``PreprocessSpec.raw``, or
   ``normalize: none``) scored a record in microvolts / ADC counts as a confident wrong class without a word: the unit
   check looked for volts only. Both the API and the explain wrapper now warn through one function
   (``ecgfm.api.warn_if_not_millivolts``) when such an artifact gets a record whose largest lead swings > 50.
2. For a multi-label classifier the explain report called the arg-max class "predicted" and explained it by
   default, ignoring the stored thresholds ``Classifier.predict`` uses; now the predicted set is decided as
   ``predict`` decides (``ecgfm.api.decisions``), the default target is the most probable predicted class, and a
   record with none predicted says "none predicted; explaining the most probable".
3. ``"lead_aware": null`` (or an absent key with ``provenance.method_hparams.lead_aware``) was read differently by
   the API and the explain stage; both now read it with ``ecgfm.artifacts.artifact_lead_aware``.
4. ``ECGWrapper.prepare`` read an array without ``fs=`` at the model's rate when its length equalled the window,
   silently (the API refuses the call); it now warns, asking for ``fs=``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ecgfm
from ecgfm.artifacts import save_classifier
from ecgfm.backbones.registry import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.data.synthetic import SyntheticSource, generate_arrays


def _user_warnings(fn, *args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _classifier(path: Path, spec: PreprocessSpec | None, multilabel: bool = False, window: int = 250,
                backbone: str = "resnet1d_test", **kwargs) -> Path:
    torch.manual_seed(0)
    bb = create_backbone(backbone, **({"seq_len": window} if backbone.startswith("vit") else {}))
    save_classifier(path, bb, torch.nn.Linear(bb.num_features, 3), spec, ["a", "b", "c"], multilabel=multilabel,
                    fs=100.0, window_samples=window, **kwargs)
    return path


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "classifier.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            meta.pop(key, None)
        else:
            meta[key] = value
    (path / "classifier.json").write_text(json.dumps(meta))


_DROP = object()
UV = "looks like microvolts or ADC counts"


# ------------------------------------------------------------------------------------------- 1. microvolts
@pytest.mark.parametrize("spec", [None, PreprocessSpec(fs=100.0, normalize="none", clip=None)],
                         ids=["preprocess=None", "normalize=none"])
def test_microvolts_to_an_artifact_that_does_not_normalise_are_flagged_by_the_api(tmp_path, spec):
    clf = ecgfm.Classifier.load(_classifier(tmp_path / "c", spec))
    x, _, _ = generate_arrays(1, seed=0, fs=500.0, duration=5.0)                       # mV
    assert not any(UV in m for m in _user_warnings(clf.predict_proba, x[0], fs=500))  # mV: nothing to say
    msgs = [m for m in _user_warnings(clf.predict_proba, x[0] * 1000, fs=500) if UV in m]
    assert len(msgs) == 1 and msgs[0].startswith("record 0:") and "does not normalise" in msgs[0]
    # volts are still volts
    assert any("looks like volts" in m for m in _user_warnings(clf.predict_proba, x[0] / 1000, fs=500))


def test_microvolts_to_a_normalising_artifact_stay_silent(tmp_path):
    clf = ecgfm.Classifier.load(_classifier(tmp_path / "c", PreprocessSpec(fs=100.0)))
    x, _, _ = generate_arrays(1, seed=0, fs=500.0, duration=5.0)
    p_mv = clf.predict_proba(x[0], fs=500).to_numpy()
    msgs = _user_warnings(clf.predict_proba, x[0] * 1000, fs=500)
    assert not any(UV in m or "looks like volts" in m for m in msgs)
    np.testing.assert_allclose(clf.predict_proba(x[0] * 1000, fs=500).to_numpy(), p_mv, atol=1e-5)  # scale-free


def test_the_explain_wrapper_flags_microvolts_with_the_apis_function(tmp_path):
    import ecgfm.api
    import ecgfm.explain.wrapper as wrapper_mod
    from ecgfm.explain.report import load_model
    from ecgfm.explain.wrapper import ECGWrapper

    assert wrapper_mod.warn_if_not_millivolts is ecgfm.api.warn_if_not_millivolts   # one function, not a copy
    w = load_model(_classifier(tmp_path / "c", None))            # saved with preprocess=None: the raw spec
    rec = SyntheticSource(n_records=1, seed=1, fs=500.0, duration=2.5).load("syn000000")
    assert not any(UV in m for m in _user_warnings(w.prepare, rec))
    rec_uv = dataclasses.replace(rec, signal=rec.signal * 1000)
    msgs = [m for m in _user_warnings(w.prepare, rec_uv) if UV in m]
    assert len(msgs) == 1 and rec.key in msgs[0] and "does not normalise" in msgs[0]
    # a wrapper without a spec only resamples: the scale reaches the model too
    bare = ECGWrapper(w.model, fs=100.0, postprocess="softmax", n_samples=250)
    assert any(UV in m for m in _user_warnings(bare.prepare, rec_uv))
    # a normalising one cancels it
    zs = ECGWrapper(w.model, fs=100.0, preprocess=PreprocessSpec(fs=100.0), postprocess="softmax", n_samples=250)
    assert not any(UV in m for m in _user_warnings(zs.prepare, rec_uv))


# ------------------------------------------------------------------------------ 2. multi-label "predicted"
def _multilabel(tmp_path: Path):
    """A multi-label classifier whose window is the whole 10 s record (explain's centre window is
    predict_proba's one window), a record, and its probabilities."""
    path = _classifier(tmp_path / "c", PreprocessSpec(fs=100.0), multilabel=True, window=1000)
    rec = SyntheticSource(n_records=2, seed=1, fs=500.0, duration=10.0).load("syn000000")
    p = ecgfm.Classifier.load(path).predict_proba(rec).to_numpy()[0]
    return path, rec, p


def _explain(path: Path, rec, out: Path) -> dict:
    from ecgfm.explain.report import explain_records, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain_records(load_model(path), [rec], out, methods=["saliency"], faithfulness=False,
                               formats=[])["records"][0]


def test_explain_predicts_and_explains_at_the_classifiers_thresholds(tmp_path):
    from ecgfm.explain.report import _prediction_text

    path, rec, p = _multilabel(tmp_path)
    top = int(p.argmax())
    thresholds = [0.0] * 3
    thresholds[top] = 1.0          # the most probable class misses its threshold; the others are predicted
    _edit_meta(path, thresholds=thresholds)
    clf = ecgfm.Classifier.load(path)
    decided = clf.predict(rec).to_numpy()[0]
    assert decided[top] == 0 and decided.sum() == 2
    r = _explain(path, rec, tmp_path / "explain")
    others = sorted((i for i in range(3) if i != top), key=lambda i: -p[i])
    assert r["predicted"] == [clf.classes[i] for i in others]                      # as Classifier.predict says
    assert r["target"]["index"] == others[0] and r["target"]["chosen"] == "predicted"
    flags = {q["class"]: q["predicted"] for q in r["predictions"]}
    assert flags == {c: bool(d) for c, d in zip(clf.classes, decided)}
    assert {q["class"]: q["threshold"] for q in r["predictions"]} == dict(zip(clf.classes, thresholds))
    saved = json.loads((tmp_path / "explain" / "report.json").read_text())["records"][0]
    assert saved["predicted"] == r["predicted"] and saved["target"] == r["target"]
    line = _prediction_text(r)
    assert line.startswith(f"predicted {clf.classes[others[0]]} p=") and f"explained {clf.classes[others[0]]}" in line
    assert f"predicted {clf.classes[top]}" not in line


def test_explain_says_none_predicted_and_explains_the_most_probable(tmp_path):
    from ecgfm.explain.report import NONE_PREDICTED, _prediction_text

    path, rec, p = _multilabel(tmp_path)
    _edit_meta(path, thresholds=[1.0, 1.0, 1.0])
    assert ecgfm.Classifier.load(path).predict(rec).to_numpy().sum() == 0
    r = _explain(path, rec, tmp_path / "explain")
    assert r["predicted"] == [] and not any(q["predicted"] for q in r["predictions"])
    assert r["target"]["index"] == int(p.argmax()) and r["target"]["chosen"] == NONE_PREDICTED
    assert "none predicted; explaining the most probable" in _prediction_text(r)


def test_without_stored_thresholds_multilabel_uses_half_as_predict_does(tmp_path):
    path, rec, p = _multilabel(tmp_path)
    decided = ecgfm.Classifier.load(path).predict(rec).to_numpy()[0]
    np.testing.assert_array_equal(decided, (p >= 0.5).astype(int))
    r = _explain(path, rec, tmp_path / "explain")
    assert [q["predicted"] for q in sorted(r["predictions"], key=lambda q: q["index"])] == decided.astype(bool).tolist()
    assert all(q["threshold"] == 0.5 for q in r["predictions"])


def test_single_label_reports_the_arg_max_as_before(tmp_path):
    from ecgfm.explain.report import _prediction_text

    path = _classifier(tmp_path / "c", PreprocessSpec(fs=100.0), window=1000)
    rec = SyntheticSource(n_records=2, seed=1, fs=500.0, duration=10.0).load("syn000000")
    p = ecgfm.Classifier.load(path).predict_proba(rec).to_numpy()[0]
    r = _explain(path, rec, tmp_path / "explain")
    top = int(p.argmax())
    assert r["target"]["index"] == top and r["predicted"] == [r["predictions"][0]["class"]]
    assert r["predictions"][0]["index"] == top and "threshold" not in r["predictions"][0]
    assert _prediction_text(r) == (f"predicted {r['predictions'][0]['class']} "
                                   f"p={r['predictions'][0]['probability']:.3f}; explained {r['target']['class']}")


def test_predict_and_decisions_agree():
    from ecgfm.api import decisions

    p = np.array([[0.6, 0.4, 0.2], [0.1, 0.5, 0.95]])
    np.testing.assert_array_equal(decisions(p, True, [0.99, 0.01, 0.5]), [[0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(decisions(p, True, None), [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(decisions(p, False), [[1, 0, 0], [0, 0, 1]])


# ------------------------------------------------------------------------------------------- 3. lead_aware
def _one_lead_record():
    rec = SyntheticSource(n_records=1, seed=1, fs=500.0, duration=10.0).load("syn000000")
    m = np.array([lead == "II" for lead in CANONICAL_LEADS])
    return dataclasses.replace(rec, signal=np.where(m[:, None], rec.signal, 0).astype(np.float32), lead_mask=m)


@pytest.mark.parametrize("meta, want", [
    ({"lead_aware": None}, True),
    ({}, True),
    ({"lead_aware": False}, False),
    ({"lead_aware": None, "provenance": {"method_hparams": {"lead_aware": False}}}, False),
    ({"extra": {"method_hparams": {"lead_aware": False}}}, False),
    ({"lead_aware": True, "provenance": {"method_hparams": {"lead_aware": False}}}, True),
])
def test_artifact_lead_aware(meta, want):
    from ecgfm.artifacts import artifact_lead_aware

    assert artifact_lead_aware(meta) is want


@pytest.mark.parametrize("case", ["null", "absent_with_pretraining_false"])
def test_api_and_explain_read_lead_aware_alike(tmp_path, case):
    from ecgfm.explain.classifier import load_classifier as explain_load
    from ecgfm.explain.report import load_model
    from ecgfm.explain.wrapper import ECGWrapper

    path = _classifier(tmp_path / "c", PreprocessSpec(fs=100.0), multilabel=True, window=1000,
                       backbone="vit1d_test", lead_aware=True)
    if case == "null":
        _edit_meta(path, lead_aware=None)
        want = True
    else:
        meta = json.loads((path / "classifier.json").read_text())
        meta.pop("lead_aware")
        meta["provenance"]["method_hparams"] = {"lead_aware": False}
        (path / "classifier.json").write_text(json.dumps(meta))
        want = False
    clf = ecgfm.Classifier.load(path)
    wrappers = [load_model(path), explain_load(path), ECGWrapper.from_checkpoint(path)]
    assert clf.lead_aware is want and all(w.lead_aware is want for w in wrappers)
    rec = _one_lead_record()
    p_api = clf.predict_proba(rec).to_numpy()[0]
    w = wrappers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = w.prepare(rec, missing_leads="zero")
    with w.present_leads((x[0] != 0).any(dim=-1).numpy()), torch.no_grad():
        p_exp = w.postprocess_fn(w(x))[0].numpy()
    np.testing.assert_allclose(p_exp, p_api, atol=1e-5)


# ------------------------------------------------------------------------------------ 4. prepare without fs
def test_prepare_without_fs_warns_where_the_api_refuses(tmp_path):
    from ecgfm.explain.report import load_model

    path = _classifier(tmp_path / "c", PreprocessSpec(fs=100.0), window=1250)
    x, _, _ = generate_arrays(1, seed=0, fs=500.0, duration=2.5)          # (1, 12, 1250) at 500 Hz
    with pytest.raises(ValueError, match=r"pass fs="):
        ecgfm.Classifier.load(path).predict_proba(x[0])
    w = load_model(path)
    with pytest.warns(UserWarning, match=r"no fs= given.*read at the model's rate \(100 Hz.*pass fs="):
        w.prepare(x[0])
    # with fs=: read as 2.5 s at 500 Hz (zero-padded to the 12.5 s window, which is said), no fs= warning
    assert not any("no fs=" in m for m in _user_warnings(w.prepare, x[0], fs=500.0))


def test_thresholds_of_another_length_are_refused_and_the_counterfactual_decides_as_predict():
    """Review of the s20 diff: a multi-label decision with thresholds of another length than the classes was a
    numpy broadcast error (2 for 3 classes) or one class's threshold applied to all (1 value); a probability equal
    to its threshold is predicted by Classifier.predict (>=) and was "not predicted" for the counterfactual (>)."""
    from ecgfm.api import decision_thresholds, decisions
    from ecgfm.explain.counterfactual import _is_valid, default_target

    p = np.array([[0.2, 0.6, 0.9]])
    for bad in ([0.5], [0.5, 0.5]):
        with pytest.raises(ValueError, match="one per class"):
            decisions(p, True, bad)
    assert decision_thresholds(None, 3).tolist() == [0.5, 0.5, 0.5]
    at = torch.tensor([0.5, 0.7, 0.2])
    assert decisions(at.numpy(), True, [0.5, 0.8, 0.8]).tolist() == [1, 0, 0]
    assert bool(_is_valid(at[None], torch.tensor([0]), True, torch.tensor([0.5, 0.8, 0.8]))[0])
    assert default_target(at, True, [0.5, 0.8, 0.8]) == 1      # class 0 at its threshold is predicted already


@pytest.mark.parametrize("pretrained_lead_aware", [None, False])
def test_an_encoder_is_explained_with_the_lead_layout_it_embeds_with(tmp_path, pretrained_lead_aware):
    """ECGWrapper.from_checkpoint of an exported encoder wrapped it with lead_aware=False whatever the encoder:
    ecgfm.Encoder gives a lead-aware ViT the record's lead mask (unless pretrained without one)."""
    from ecgfm.artifacts import save_encoder
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.explain.wrapper import ECGWrapper

    prov = None if pretrained_lead_aware is None else {"method_hparams": {"lead_aware": pretrained_lead_aware}}
    path = save_encoder(tmp_path / "enc", create_backbone("vit1d_test").eval(), PreprocessSpec(fs=100.0),
                        fs=100.0, window_samples=250, provenance=prov)
    enc = ecgfm.Encoder.load(path)
    w = ECGWrapper.from_checkpoint(path)
    assert w.lead_aware is enc.lead_aware is (pretrained_lead_aware is None)
