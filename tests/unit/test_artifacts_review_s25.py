"""Artifact review fixes (s25): a window a fixed-input backbone cannot take.

ViT-1D and ST-MEM read inputs whose length is a positive multiple of ``patch_size`` and at most ``seq_len``. A
classifier saved with another window (or with none, so that whole records reached the network) was written and
loaded, and every ``predict_proba`` then failed inside the network with a bare ``ValueError`` naming neither the
artifact nor the record. Such windows are now refused at save (naming the folder) and at load (a hand-edited
JSON, naming the file); backbones without that limit (the CNNs) keep taking any window or none.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.api import Classifier, Encoder
from ecgfm.artifacts import ArtifactError, load_classifier, load_encoder, save_classifier, save_encoder
from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec

SPEC = PreprocessSpec(fs=100.0)


def _save_clf(folder, name="vit1d_test", **kw):
    torch.manual_seed(0)
    bb = create_backbone(name).eval()
    return save_classifier(folder, bb, nn.Linear(bb.num_features, 2), SPEC, ["a", "b"], False, **kw)


def _edit_window(path, window):
    meta = json.loads(path.read_text())
    meta["input"]["window_samples"] = window
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["vit1d_test", "stmem_vit"])
@pytest.mark.parametrize("window, why", [(300, "longer than seq_len=250"), (240, "not a multiple of patch_size=25"),
                                         (None, "no input.window_samples")])
def test_a_classifier_window_the_backbone_cannot_take_is_refused_at_save(tmp_path, name, window, why):
    folder = tmp_path / f"clf_{window}"
    with pytest.raises(ArtifactError) as err:
        _save_clf(folder, name, window_samples=window)
    msg = str(err.value)
    assert str(folder) in msg and "patch_size=25" in msg and "seq_len=250" in msg and why in msg, msg
    assert repr(name) in msg, msg
    assert not folder.exists()   # nothing written


@pytest.mark.parametrize("window, why", [(300, "longer than seq_len=250"), (240, "not a multiple of patch_size=25")])
def test_an_encoder_window_the_backbone_cannot_take_is_refused_at_save(tmp_path, window, why):
    folder = tmp_path / f"enc_{window}"
    with pytest.raises(ArtifactError) as err:
        save_encoder(folder, create_backbone("vit1d_test"), SPEC, window_samples=window)
    msg = str(err.value)
    assert str(folder) in msg and "patch_size=25" in msg and "seq_len=250" in msg and why in msg, msg
    assert not folder.exists()
    # ecgfm.export.export_encoder (train.py, the zoo) goes through save_encoder: its crop is checked the same way
    from ecgfm.export import export_encoder

    with pytest.raises(ArtifactError, match="seq_len=250"):
        export_encoder(create_backbone("vit1d_test"), tmp_path / "exp", SPEC, extra={"crop_samples": window})


def test_an_encoder_without_a_window_still_saves(tmp_path):
    """An encoder without a recorded crop is a documented case (the fine-tuning sweep then uses the task's crop;
    export_encoder without ``crop_samples``): not refused."""
    out = save_encoder(tmp_path / "enc", create_backbone("vit1d_test"), SPEC)
    assert load_encoder(out)[2]["input"]["window_samples"] is None


@pytest.mark.parametrize("kind, window, why", [
    ("classifier", 300, "longer than seq_len=250"), ("classifier", 240, "not a multiple of patch_size=25"),
    ("classifier", None, "no input.window_samples"),
    ("encoder", 300, "longer than seq_len=250"), ("encoder", 240, "not a multiple of patch_size=25")])
def test_a_hand_edited_window_is_refused_at_load(tmp_path, kind, window, why):
    if kind == "classifier":
        out, loaders = _save_clf(tmp_path / "clf", window_samples=250), (load_classifier, Classifier.load)
    else:
        out = save_encoder(tmp_path / "enc", create_backbone("vit1d_test"), SPEC, window_samples=250)
        loaders = (load_encoder, Encoder.load)
    _edit_window(out / f"{kind}.json", window)
    for load in loaders:
        with pytest.raises(ArtifactError) as err:
            load(out)
        msg = str(err.value)
        assert re.search(rf"{kind}\.json: ", msg) and "patch_size=25" in msg and "seq_len=250" in msg, msg
        assert why in msg, msg


@pytest.mark.parametrize("window", [250, 125, 25])
def test_a_window_the_backbone_takes_saves_loads_and_scores(tmp_path, window):
    out = _save_clf(tmp_path / "clf", window_samples=window)
    clf = Classifier.load(out)
    assert clf.window_samples == window
    x = np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32)
    p = clf.predict_proba(x, fs=100.0).to_numpy()
    assert p.shape == (1, 2) and np.allclose(p.sum(), 1.0)
    enc = save_encoder(tmp_path / "enc", create_backbone("vit1d_test"), SPEC, window_samples=window)
    assert Encoder.load(enc).embed(x, fs=100.0).shape[-1] == create_backbone("vit1d_test").num_features


def test_a_longer_seq_len_takes_a_longer_window(tmp_path):
    bb = create_backbone("vit1d_test", seq_len=500)
    out = save_classifier(tmp_path / "clf", bb, nn.Linear(bb.num_features, 2), SPEC, ["a", "b"], False,
                          window_samples=500)
    assert load_classifier(out)[2]["input"]["window_samples"] == 500


def test_a_cnn_takes_any_window_or_none(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 1200)).astype(np.float32)
    for window in (None, 240, 300, 1000):
        out = _save_clf(tmp_path / f"clf_{window}", "resnet1d_test", window_samples=window)
        p = Classifier.load(out).predict_proba(x, fs=100.0).to_numpy()
        assert p.shape == (1, 2) and np.all(np.isfinite(p))
        enc = save_encoder(tmp_path / f"enc_{window}", create_backbone("resnet1d_test"), SPEC, window_samples=window)
        assert load_encoder(enc)[2]["input"]["window_samples"] == window
    # a hand-edited window on a CNN is still read as given
    out = _save_clf(tmp_path / "edit", "resnet1d_test", window_samples=250)
    _edit_window(out / "classifier.json", 240)
    assert load_classifier(out)[2]["input"]["window_samples"] == 240
