"""A classifier artifact names the classes whose decision threshold is a placeholder (2026-12-07).

A multi-label class without a positive validation record gets no threshold chosen on validation: the cell's macro
F1 leaves it out (``f1_no_threshold_classes``), but its saved classifier stored a bare 0.5 among the chosen
thresholds, and ``Classifier.predict`` decided it there without a word. The mark now travels explicitly:
``thresholds_not_chosen`` in classifier.json, :attr:`ecgfm.api.Classifier.thresholds_not_chosen`, a warning from
``predict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]


def test_probe_classifier_names_classes_without_a_validation_positive(tmp_path):
    import ecgfm
    from ecgfm.evaluate.sweep import probe_main

    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("probe", overrides=[
            f"paths.cache_root={tmp_path / 'cache'}", f"results_dir={tmp_path / 'res'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=30", "task.multilabel=true", "bootstrap.n=20", "plot=false",
            "torch_threads=1", "checkpoint=random:resnet1d_test", "fraction=1.0", "seed=0", "probe.Cs=[1.0]",
            "save_classifier=true"])
    cell = json.loads(Path(probe_main(cfg)["cells_written"][0]).read_text())
    left = cell["results"]["test"]["f1_no_threshold_classes"]
    assert left, "the setting must leave a class without a validation positive"
    (meta_path,) = (tmp_path / "res").rglob("classifier.json")
    assert json.loads(meta_path.read_text())["thresholds_not_chosen"] == left
    clf = ecgfm.Classifier.load(meta_path.parent)
    assert clf.thresholds_not_chosen == left
    x = np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32) * 0.1
    with pytest.warns(UserWarning, match="0.5 placeholder") as got:
        clf.predict(x, fs=100.0)
    assert all(c in str(got[0].message) for c in left)


def test_the_loader_refuses_a_mark_naming_an_unknown_class(tmp_path):
    import torch

    from ecgfm.artifacts import ArtifactError, load_classifier, save_classifier
    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec

    bb = create_backbone("resnet1d_test")
    head = torch.nn.Linear(bb.num_features, 2)
    with pytest.raises(ValueError, match="without thresholds"):
        save_classifier(tmp_path / "a", bb, head, PreprocessSpec(fs=100.0), ["A", "B"], True, window_samples=250,
                        thresholds_not_chosen=["B"])
    out = save_classifier(tmp_path / "b", bb, head, PreprocessSpec(fs=100.0), ["A", "B"], True, window_samples=250,
                          thresholds=[0.3, 0.5], thresholds_not_chosen=["B"])
    assert load_classifier(out)[2]["thresholds_not_chosen"] == ["B"]
    meta = json.loads((out / "classifier.json").read_text())
    meta["thresholds_not_chosen"] = ["Z"]
    (out / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="thresholds_not_chosen"):
        load_classifier(out)
