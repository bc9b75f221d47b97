"""The Python API passes absent leads as a lead mask to a lead-aware network (as frozen features and fine-tuning
see them), and gives all-lead records the unmasked computation bit for bit."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ecgfm.api import Classifier, Encoder
from ecgfm.artifacts import EncoderClassifier
from ecgfm.backbones import create_backbone
from ecgfm.data.record import CANONICAL_LEADS


def _models() -> tuple[Encoder, Classifier, nn.Module]:
    torch.manual_seed(0)
    backbone = create_backbone("vit1d_test").eval()          # seq_len 250, 12 leads
    head = nn.Linear(backbone.num_features, 3)
    meta = {"input": {"fs": 100.0, "leads": list(CANONICAL_LEADS), "window_samples": 250, "stride_samples": 250},
            "classes": ["a", "b", "c"], "multilabel": False, "window_aggregate": "logit"}
    return (Encoder(backbone, None, dict(meta), "cpu"), Classifier(EncoderClassifier(backbone, head), None, meta, "cpu"),
            backbone)


def test_one_lead_record_is_encoded_over_its_present_lead_only():
    enc, clf, backbone = _models()
    one = np.random.default_rng(0).normal(size=(1, 500)).astype(np.float32)     # lead II only, 2 windows
    z = enc.embed(one, fs=100, leads=["II"])
    x = torch.zeros(2, 12, 250)
    x[:, 1] = torch.from_numpy(one[0].reshape(2, 250))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 1] = True
    with torch.no_grad():
        want = backbone.embed(x, lead_mask=mask).double().mean(0).float().numpy()
        padded = backbone.embed(x).double().mean(0).float().numpy()
        logits = clf.network(x, mask).double().mean(0)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z, padded, atol=1e-4)                    # zero-padded leads would give another vector
    p = clf.predict_proba(one, fs=100, leads=["II"]).to_numpy()[0]
    np.testing.assert_allclose(p, torch.softmax(logits, -1).numpy(), rtol=1e-6, atol=1e-8)


def test_all_lead_records_and_lead_unaware_artifacts_take_the_unmasked_path():
    enc, clf, backbone = _models()
    x = np.random.default_rng(1).normal(size=(12, 250)).astype(np.float32)
    with torch.no_grad():
        want = backbone.embed(torch.from_numpy(x)[None]).numpy()[0]
    assert np.array_equal(enc.embed(x, fs=100), want)
    enc.meta["lead_aware"] = False                                  # an artifact evaluated zero-padded
    assert not enc.lead_aware
    one = x[1:2]
    x0 = np.zeros_like(x)
    x0[1] = one[0]
    with torch.no_grad():
        padded = backbone.embed(torch.from_numpy(x0)[None]).numpy()[0]
    np.testing.assert_allclose(enc.embed(one, fs=100, leads=["II"]), padded, rtol=1e-6, atol=1e-7)


def test_a_record_without_any_of_the_models_leads_is_refused():
    """A lead-I model given lead II only (or a record whose leads are all flat) would embed zeros: refused, naming
    the model's leads and the record's."""
    import pytest

    from ecgfm.data.record import ECGDataError

    torch.manual_seed(0)
    backbone = create_backbone("resnet1d_test", num_leads=1).eval()
    meta = {"input": {"fs": 100.0, "leads": ["I"], "window_samples": 250, "stride_samples": 250}}
    enc = Encoder(backbone, None, meta, "cpu")
    x = np.random.default_rng(0).normal(size=(1, 250)).astype(np.float32)
    assert enc.embed(x, fs=100, leads=["I"]).shape == (backbone.num_features,)
    with pytest.raises(ECGDataError, match=r"none of the model's input leads \(I\).*present after preprocessing: II"):
        enc.embed(x, fs=100, leads=["II"])


def test_leads_and_fs_given_beside_a_record_must_agree_with_it(fixture_dir):
    """A record (or a file) names its own leads and rate: a different leads= or fs= beside it is refused (it was
    silently ignored); the same ones are accepted."""
    import pytest

    from ecgfm.data.readers import get_source

    from ecgfm.data.preprocess import PreprocessSpec

    _, _, backbone = _models()
    meta = {"input": {"fs": 100.0, "leads": list(CANONICAL_LEADS), "window_samples": 250, "stride_samples": 250}}
    enc = Encoder(backbone, PreprocessSpec(fs=100.0), meta, "cpu")
    rec = get_source("challenge2021", root=fixture_dir / "cinc2021").load("HR06000")
    names = [lead for lead, m in zip(CANONICAL_LEADS, rec.lead_mask) if m]
    want = enc.embed(rec)
    np.testing.assert_array_equal(enc.embed(rec, fs=rec.fs, leads=names), want)
    with pytest.raises(ValueError, match="fs=250 given but the record is at"):
        enc.embed(rec, fs=250)
    with pytest.raises(ValueError, match=r"leads=\['II'\] given, but it holds"):
        enc.embed(rec, leads=["II"])
    hea = fixture_dir / "cinc2021" / "HR06000.hea"
    with pytest.raises(ValueError, match=r"leads=\['II'\] given, but it holds"):
        enc.embed(str(hea.with_suffix("")), leads=["II"])


def _limb_from_i_ii(i: np.ndarray, ii: np.ndarray) -> dict[str, np.ndarray]:
    return {"III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2}


def test_an_eight_lead_record_gets_its_limb_leads_derived_for_a_twelve_lead_classifier(caplog):
    """Carts store I, II, V1-V6: a classifier trained on 12-lead records scored such a record with zero rows for
    III / aVR / aVL / aVF (NORM 0.956 against 0.766 with all 12), without a word."""
    _, clf, _ = _models()
    clf.meta["extra"] = {"trained_leads": list(CANONICAL_LEADS)}
    rng = np.random.default_rng(1)
    eight = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    x8 = rng.normal(size=(8, 500)).astype(np.float32)
    limb = _limb_from_i_ii(x8[0], x8[1])
    x12 = np.stack([x8[eight.index(lead)] if lead in eight else limb[lead] for lead in CANONICAL_LEADS])
    zero12 = np.stack([x8[eight.index(lead)] if lead in eight else np.zeros(500, np.float32)
                       for lead in CANONICAL_LEADS])
    with caplog.at_level("INFO"):
        p8 = clf.predict_proba(x8, fs=100, leads=eight).to_numpy()
    assert any("derived from I and II" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(p8, clf.predict_proba(x12, fs=100).to_numpy(), atol=1e-5)
    assert np.abs(p8 - clf.predict_proba(zero12, fs=100).to_numpy()).max() > 1e-3   # what it scored before

    # a classifier whose training records lacked those leads (no trained_leads recorded: not known) sees the
    # record as given
    clf.meta["extra"] = {}
    np.testing.assert_allclose(clf.predict_proba(x8, fs=100, leads=eight).to_numpy(),
                               clf.predict_proba(zero12, fs=100).to_numpy(), atol=1e-6)


def test_absent_training_leads_are_named_and_nan_padding_is_not_scored(caplog):
    """A record lacking leads the classifier was trained with is scored, with a warning naming them; samples NaN
    in every lead at the end of a batch row (records of unequal length stacked) are padding, not 5 s of signal
    held flat."""
    _, clf, _ = _models()
    clf.meta["extra"] = {"trained_leads": list(CANONICAL_LEADS)}
    one = np.random.default_rng(2).normal(size=(1, 500)).astype(np.float32)
    with caplog.at_level("WARNING", logger="ecgfm.api"):
        clf.predict_proba(one, fs=100, leads=["II"])
    assert any("absent from this record" in r.getMessage() and "V6" in r.getMessage() for r in caplog.records)

    rng = np.random.default_rng(3)
    short = rng.normal(size=(12, 500)).astype(np.float32)
    padded = np.full((2, 12, 1000), np.nan, dtype=np.float32)
    padded[0, :, :500] = short
    padded[1] = rng.normal(size=(12, 1000))
    got = clf.predict_proba(padded, fs=100).to_numpy()
    np.testing.assert_allclose(got[0], clf.predict_proba(short, fs=100).to_numpy()[0], atol=1e-6)


def test_the_explain_stage_derives_as_the_api_does_and_never_from_a_flat_lead(tmp_path):
    """explain.py's wrapper scored the 8-lead record with zero rows while the API derived them (0.025 apart);
    and a flat lead I (electrode off) made up III = II, aVR = aVL = -II / 2, then lead I itself was dropped."""
    from ecgfm.artifacts import save_classifier
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    backbone = create_backbone("vit1d_test").eval()
    save_classifier(tmp_path / "clf", backbone, nn.Linear(backbone.num_features, 3), None, ["a", "b", "c"], False,
                    fs=100.0, window_samples=250, extra={"trained_leads": list(CANONICAL_LEADS)})
    clf = Classifier.load(tmp_path / "clf")
    eight = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    x8 = np.random.default_rng(1).normal(size=(8, 250)).astype(np.float32)
    w = ECGWrapper.from_checkpoint(tmp_path / "clf")
    with torch.no_grad():
        p_exp = w.predict_proba(w.prepare(x8, fs=100, lead_names=eight, missing_leads="zero")).numpy()[0]
    np.testing.assert_allclose(p_exp, clf.predict_proba(x8, fs=100, leads=eight).to_numpy()[0], atol=1e-5)

    flat = x8.copy()
    flat[0] = 0.0                                                  # lead I off: nothing to derive from
    zero12 = np.stack([flat[eight.index(lead)] if lead in eight else np.zeros(250, np.float32)
                       for lead in CANONICAL_LEADS])
    np.testing.assert_allclose(clf.predict_proba(flat, fs=100, leads=eight).to_numpy(),
                               clf.predict_proba(zero12, fs=100).to_numpy(), atol=1e-6)
