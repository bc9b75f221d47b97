"""Review s22 of the API against the sweep: a sweep's classifier reproduces its cell's scores of records without
III / aVR / aVL / aVF (the API derived them from I and II, the cell had scored them absent: up to 0.97 apart),
and a list of record files is a batch (it failed with "could not convert string to float")."""

from __future__ import annotations

import numpy as np
import torch
import wfdb
from torch import nn

from ecgfm.api import Classifier
from ecgfm.artifacts import derives_limb_leads, save_classifier
from ecgfm.backbones import create_backbone
from ecgfm.data.record import CANONICAL_LEADS

EIGHT = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]


def _classifier(tmp_path, extra) -> Classifier:
    torch.manual_seed(0)
    backbone = create_backbone("vit1d_test").eval()
    save_classifier(tmp_path / "clf", backbone, nn.Linear(backbone.num_features, 3), None, ["a", "b", "c"], False,
                    fs=100.0, window_samples=250, extra=extra)
    return Classifier.load(tmp_path / "clf")


def test_who_derives_limb_leads():
    assert derives_limb_leads({"trained_leads": list(CANONICAL_LEADS)})                 # imports, older ones
    assert derives_limb_leads({"derive_limb_leads": True, "cell_recipe_id": "r"})
    assert not derives_limb_leads({"derive_limb_leads": False})
    assert not derives_limb_leads({"trained_leads": ["I"], "cell_recipe_id": "r"})      # a sweep's, before today
    assert derives_limb_leads(None)


def test_a_sweep_classifier_scores_an_eight_lead_record_as_its_cell_did(tmp_path):
    x8 = np.random.default_rng(1).normal(size=(8, 250)).astype(np.float32)
    zero12 = np.stack([x8[EIGHT.index(lead)] if lead in EIGHT else np.zeros(250, np.float32)
                       for lead in CANONICAL_LEADS])
    mask = np.array([lead in EIGHT for lead in CANONICAL_LEADS])
    sweep = _classifier(tmp_path, {"trained_leads": list(CANONICAL_LEADS), "derive_limb_leads": False,
                                   "cell_recipe_id": "r"})
    # the cell scores the cache's record: those leads absent (lead mask), as the artifact now does
    with torch.no_grad():
        cell = torch.softmax(sweep.network(torch.from_numpy(zero12[None]), torch.from_numpy(mask[None])), -1).numpy()
    np.testing.assert_allclose(sweep.predict_proba(x8, fs=100, leads=EIGHT).to_numpy(), cell, atol=1e-5)
    from ecgfm.explain.wrapper import ECGWrapper

    w = ECGWrapper.from_checkpoint(tmp_path / "clf")
    assert not w.derive_limb_leads
    imported = _classifier(tmp_path / "imp", {"trained_leads": list(CANONICAL_LEADS), "derive_limb_leads": True})
    assert np.abs(imported.predict_proba(x8, fs=100, leads=EIGHT).to_numpy() - cell).max() > 1e-4   # derived


def test_a_list_of_record_files_is_a_batch(tmp_path):
    clf = _classifier(tmp_path, {})
    rng = np.random.default_rng(0)
    paths = []
    for name in ("r1", "r2"):
        wfdb.wrsamp(name, fs=100, units=["mV"] * 12, sig_name=list(CANONICAL_LEADS),
                    p_signal=rng.normal(size=(300, 12)), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                    baseline=[0] * 12, write_dir=str(tmp_path))
        paths.append(str(tmp_path / name))
    both = clf.predict_proba(paths)
    assert list(both.index) == paths
    for p in paths:
        np.testing.assert_allclose(both.loc[[p]].to_numpy(), clf.predict_proba(p).to_numpy(), atol=1e-6)
    from ecgfm.data.readers import read_wfdb

    records = [read_wfdb(p) for p in paths]
    np.testing.assert_allclose(clf.predict_proba(records).to_numpy(), both.to_numpy(), atol=1e-6)
    renamed = clf.predict_proba(paths, rename_leads={"V7": "V6"})   # a list of files takes rename_leads too
    np.testing.assert_allclose(renamed.to_numpy(), both.to_numpy(), atol=1e-6)


def test_explain_py_loads_a_sweep_classifier_without_deriving(tmp_path):
    """explain.py's loader (wrapper_from_artifact) built its wrapper without the derivation rule: a sweep's
    classifier was explained on III / aVR / aVL / aVF made from I and II (STTC 0.987 explained where the API gave
    NORM 1.000)."""
    from ecgfm.explain.report import load_model

    _classifier(tmp_path, {"trained_leads": list(CANONICAL_LEADS), "derive_limb_leads": False,
                           "cell_recipe_id": "r"})
    assert load_model(str(tmp_path / "clf")).derive_limb_leads is False
    _classifier(tmp_path / "imp", {"trained_leads": list(CANONICAL_LEADS), "derive_limb_leads": True})
    assert load_model(str(tmp_path / "imp" / "clf")).derive_limb_leads is True
