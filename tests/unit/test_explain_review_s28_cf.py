"""Explain review s28 (r3), the counterfactual's part: what explain.py checks before it starts, and what
:func:`ecgfm.explain.counterfactual.counterfactual` accepts and reports.

1. ``counterfactual.target`` / ``counterfactual.threshold`` were first resolved after the first record had been fully
   explained (attributions, faithfulness curves, charts), as a bare ValueError, and report.json was never written.
   They are now checked up front (explain.py next to ``target=``, and ``explain_records`` before the record loop) as
   ConfigErrors naming the key.
3. ``leads=[]`` ran a search that could change nothing and reported ``options["leads"]`` None ("all leads").
4. With ``early_stop=False``, ``steps`` was the index of the last valid iterate, not the steps behind the returned
   counterfactual (the last iterate).
5. The search ended with ``wrapper.model.train(was_training)``, which set every sub-module to the top level's mode (a
   backbone kept in eval inside a model in train mode was switched to train).

Every model here is tiny and untrained; records are synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.backbones import create_backbone
from ecgfm.config import ConfigError
from ecgfm.data.record import ECGRecord
from ecgfm.explain import report as rep
from ecgfm.explain.counterfactual import counterfactual
from ecgfm.explain.wrapper import ECGWrapper

FS = 100.0
CLASSES = ("a", "b", "c")


def _wrapper(postprocess: str = "softmax") -> ECGWrapper:
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    return ECGWrapper.from_encoder_and_head(bb, nn.Linear(bb.num_features, 3), None, fs=FS, class_names=CLASSES,
                                            n_samples=250, postprocess=postprocess)


def _record() -> ECGRecord:
    sig = (0.3 * np.random.default_rng(0).standard_normal((12, 250))).astype(np.float32)
    return ECGRecord(signal=sig, fs=FS, lead_mask=np.ones(12, bool), record_id="r", source="demo")


def _inputs(n: int = 2) -> torch.Tensor:
    return torch.as_tensor((0.3 * np.random.default_rng(1).standard_normal((n, 12, 250))).astype(np.float32))


# --------------------------------------------------------------------------------------------------- finding 1


@pytest.mark.parametrize("postprocess, options, key", [
    ("softmax", {"target": "bb", "max_steps": 2}, "counterfactual.target"),
    ("softmax", {"target": 7, "max_steps": 2}, "counterfactual.target"),
    ("sigmoid", {"threshold": [0.3, 0.4], "max_steps": 2}, "counterfactual.threshold"),
])
def test_explain_records_checks_the_counterfactual_target_and_threshold_first(tmp_path, postprocess, options, key):
    """A misspelt class or a threshold list of the wrong length is a ConfigError naming the key, raised before the
    first record is explained (nothing is written)."""
    with pytest.raises(ConfigError) as err:
        rep.explain_records(_wrapper(postprocess), [_record()], tmp_path, methods=["saliency"], faithfulness=False,
                            counterfactual=options, formats=["png"])
    assert err.value.key == key
    assert list(tmp_path.iterdir()) == []


def test_explain_records_keeps_accepting_a_good_counterfactual(tmp_path):
    out = rep.explain_records(_wrapper("sigmoid"), [_record()], tmp_path, methods=["saliency"], faithfulness=False,
                              counterfactual={"target": "c", "threshold": [0.3, 0.4, 0.5], "max_steps": 2},
                              formats=[])
    assert out["records"][0]["counterfactual"]["records"][0]["target"] == "c"


@pytest.mark.parametrize("multilabel, bad, key", [
    (False, "counterfactual.target=bb", "counterfactual.target"),
    (True, "counterfactual.threshold=[0.3,0.4]", "counterfactual.threshold"),
])
def test_explain_main_checks_the_counterfactual_before_any_record(tmp_path, multilabel, bad, key):
    """explain.py refused ``target=`` up front but not the counterfactual's own class / thresholds: the first record's
    charts were written, then a bare ValueError (a traceback) and no report.json."""
    from hydra import compose, initialize_config_dir

    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.explain.classifier import save_classifier

    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    ckpt = save_classifier(tmp_path / "clf", bb, nn.Linear(bb.num_features, 3), PreprocessSpec(fs=FS),
                           list(CLASSES), multilabel=multilabel, n_samples=1000)
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(str(root / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("explain", overrides=[f"out_dir={tmp_path / 'out'}", f"checkpoint={ckpt}", "record=syn000001",
                                            "data=synthetic", "data.params.n_records=4", "methods=[saliency]",
                                            "faithfulness.enabled=false", "formats=[png]",
                                            "counterfactual.enabled=true", "counterfactual.max_steps=2", bad])
    with pytest.raises(ConfigError) as err:
        rep.explain_main(cfg)
    assert err.value.key == key
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


# --------------------------------------------------------------------------------------------------- finding 3


def test_an_empty_lead_list_is_refused():
    with pytest.raises(ValueError, match="leads is empty"):
        counterfactual(_wrapper(), _inputs(1), "b", leads=[], max_steps=2)


# --------------------------------------------------------------------------------------------------- finding 4


def test_steps_without_early_stop_are_the_steps_behind_the_returned_counterfactual():
    """Target = each input's own class: valid at every iterate. The returned counterfactual is the last iterate (after
    all max_steps steps); ``steps`` read max_steps - 1, the index of the last valid iterate."""
    w = _wrapper()
    x = _inputs(2)
    own = w.predict_proba(x).argmax(1)
    cf = counterfactual(w, x, own, max_steps=5, early_stop=False)
    assert cf.steps.tolist() == [5, 5]
    assert cf.delta.abs().sum() > 0                      # the last iterate, not the input itself
    early = counterfactual(w, x, own, max_steps=5)       # early stopping: the input itself, step 0
    assert early.steps.tolist() == [0, 0] and early.delta.abs().sum() == 0


# --------------------------------------------------------------------------------------------------- finding 5


def test_each_sub_modules_mode_is_restored():
    """A backbone kept in eval inside a model in train mode stays in eval (``model.train(True)`` switched it)."""
    w = _wrapper()
    w.model.train()
    frozen = [m for m in w.model.modules() if m is not w.model and any(True for _ in m.parameters())][0]
    frozen.eval()
    before = {id(m): m.training for m in w.model.modules()}
    counterfactual(w, _inputs(1), "b", max_steps=2)
    assert {id(m): m.training for m in w.model.modules()} == before
    assert w.model.training and not frozen.training
