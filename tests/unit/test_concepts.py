"""TCAV: a concept aligned with a learned class scores significantly against random concepts on the synthetic
corpus; caches are keyed by weights and data, so changing either is a cache miss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.synthetic import class_subset, SYNTHETIC_CLASSES, SyntheticSource, generate_arrays
from ecgfm.explain.classifier import train_classifier
from ecgfm.explain.concepts import (TCAV, ConceptSet, TCAVCache, concept_from_arrays, concept_from_source,
                                    data_fingerprint, model_fingerprint, random_sets)
from ecgfm.explain.wrapper import ECGWrapper

KEEP = ("normal_sinus", "atrial_fibrillation", "st_elevation")
LAYER = "encoder.stages"




def _data(n: int, seed: int):
    return class_subset(n, seed, KEEP)


@pytest.fixture(scope="module")
def setup():
    x, y = _data(720, 11)
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    head, _ = train_classifier(bb, x[:150], y[:150], epochs=20, batch_size=32, lr=1e-2)
    wrapper = ECGWrapper.from_encoder_and_head(bb, head, None, fs=100.0, class_names=KEEP, n_samples=250)
    xc, yc = _data(900, 12)                          # concept examples: other records than the training ones
    labels = [KEEP[k] for k in yc]
    concepts = {c: concept_from_arrays(xc, labels, c, n=30) for c in ("st_elevation", "atrial_fibrillation")}
    randoms = random_sets(xc, 8, 30, seed=1)
    explained = torch.as_tensor(x[150:][y[150:] == KEEP.index("st_elevation")][:30])
    return wrapper, concepts, randoms, explained


def test_aligned_concept_is_significant(setup, tmp_path):
    wrapper, concepts, randoms, explained = setup
    tcav = TCAV(wrapper, [LAYER])
    res = tcav.run(explained, "st_elevation", [concepts["st_elevation"], concepts["atrial_fibrillation"]], randoms)
    ste = res.row("st_elevation", LAYER)
    assert ste["significant"] and ste["p_adjusted"] < 0.05
    assert ste["score_mean"] > ste["random_mean"] + 0.3
    assert ste["cav_accuracy"] > 0.7                               # the concept is linearly separable there
    assert res.n_tests == 2 and ste["p_adjusted"] == pytest.approx(min(1.0, 2 * ste["p"]))
    assert len(ste["scores"]) == len(randoms) == len(ste["random_scores"])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["correction"] == "bonferroni" and d["target_name"] == "st_elevation"
    from ecgfm.explain.visualize import plot_tcav, save_figure

    assert save_figure(plot_tcav(res), tmp_path / "tcav", formats=["png"])[0].exists()


def test_cache_hits_and_invalidation(setup, tmp_path):
    wrapper, concepts, randoms, _ = setup
    wrapper = ECGWrapper(__import__("copy").deepcopy(wrapper.model), fs=100.0, class_names=KEEP, n_samples=250)
    cache = TCAVCache(tmp_path / "cache")
    tcav = TCAV(wrapper, [LAYER], cache=cache)
    c, r = concepts["st_elevation"], randoms[0]
    a1 = tcav.activations(c, LAYER)
    assert (cache.hits, cache.misses) == (0, 1)
    a2 = tcav.activations(c, LAYER)
    assert cache.hits == 1 and torch.equal(a1, a2)
    v1, _ = tcav.cav(c, r, LAYER)
    # persisted as safetensors + JSON: a new cache on the same folder hits
    files = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert set(files) == {".json", ".safetensors"}
    fresh = TCAVCache(tmp_path / "cache")
    TCAV(wrapper, [LAYER], cache=fresh).cav(c, r, LAYER)
    assert fresh.hits == 1 and fresh.misses == 0
    # change one weight: every lookup misses and the activations differ
    misses = cache.misses
    with torch.no_grad():
        wrapper.model.encoder.stem[0][0].weight.mul_(1.5)
    a3 = tcav.activations(c, LAYER)
    assert cache.misses == misses + 1 and not torch.allclose(a1, a3)
    v3, _ = tcav.cav(c, r, LAYER)
    assert not torch.allclose(v1, v3)
    # change the concept's examples (same name): miss
    misses = cache.misses
    c2 = ConceptSet(c.name, c.inputs.flip(-1))
    tcav.activations(c2, LAYER)
    assert cache.misses == misses + 1


def test_fingerprints():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    f1 = model_fingerprint(m)
    assert f1 == model_fingerprint(m)
    with torch.no_grad():
        m[0].bias[0] += 1e-6
    assert model_fingerprint(m) != f1
    x = np.zeros((2, 3), np.float32)
    assert data_fingerprint(x) != data_fingerprint(x.astype(np.float64))
    assert data_fingerprint(x) != data_fingerprint(np.zeros((3, 2), np.float32))


def test_concept_from_source(setup):
    wrapper, _, _, _ = setup
    src = SyntheticSource(18, seed=5, fs=500.0, duration=2.5)
    cs = concept_from_source(src, wrapper, "st_elevation", n=2)
    assert cs.inputs.shape == (2, 12, 250) and cs.name == "st_elevation" and cs.source == "synthetic"
    with pytest.raises(ValueError, match="found 0"):
        concept_from_source(src, wrapper, "no_such_label", n=2)


def test_bad_input(setup):
    wrapper, concepts, randoms, explained = setup
    with pytest.raises(ValueError, match="no layer named"):
        TCAV(wrapper, ["encoder.nope"])
    with pytest.raises(ValueError, match="pool"):
        TCAV(wrapper, [LAYER], pool="max")
    with pytest.raises(ValueError, match="at least 3 random"):
        TCAV(wrapper, [LAYER]).run(explained, 2, [concepts["st_elevation"]], randoms[:2])
    with pytest.raises(ValueError, match="one target class"):
        TCAV(wrapper, [LAYER]).run(explained[:2], [0, 1], [concepts["st_elevation"]], randoms)
    with pytest.raises(ValueError, match="outside"):
        TCAV(wrapper, [LAYER]).run(explained, 5, [concepts["st_elevation"]], randoms)
    with pytest.raises(ValueError, match="matching"):
        concept_from_arrays(np.zeros((3, 12, 250)), ["a", "b", "c"], "a")
    with pytest.raises(ValueError, match="need at least"):
        random_sets(np.zeros((3, 12, 250)), 2, 5)


def test_concept_sets_outside_the_inputs_space_are_refused(setup):
    """A concept of the same ECGs at 500 Hz for a 100 Hz, 250-sample model was scored as a significant concept (its
    CAV learnt the rate); now refused, as are sets of another length for a model of free length."""
    from ecgfm.explain.concepts import ConceptSet

    wrapper, concepts, randoms, explained = setup
    fast = ConceptSet("fast", torch.repeat_interleave(concepts["st_elevation"].inputs, 5, dim=-1))
    with pytest.raises(ValueError, match="concept 'fast'.*1250 samples"):
        TCAV(wrapper, [LAYER]).run(explained, "st_elevation", [fast], randoms)
    with pytest.raises(ValueError, match="concept 'fast'"):
        TCAV(wrapper, [LAYER]).activations(fast, LAYER)
    free = ECGWrapper(wrapper.model, fs=100.0, class_names=KEEP, postprocess="softmax")
    assert free.n_samples is None
    with pytest.raises(ValueError, match="concept 'fast': examples of shape"):
        TCAV(free, [LAYER]).run(explained, "st_elevation", [fast], randoms)


def test_more_inputs_than_a_batch_and_a_model_left_in_train_mode(setup):
    """Inputs beyond one batch get their own targets (no shape error), and a model left in train mode is run in eval
    mode for concept activations and gradients: same scores as in eval mode, BatchNorm statistics untouched, the
    mode restored."""
    wrapper, concepts, randoms, explained = setup
    small = TCAV(wrapper, [LAYER], batch_size=7)                   # 30 inputs: 5 batches
    want = small.run(explained, "st_elevation", [concepts["st_elevation"]], randoms[:3]).row("st_elevation", LAYER)
    bn = next(m for m in wrapper.model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    stats = bn.running_mean.clone()
    wrapper.model.train()
    try:
        got = TCAV(wrapper, [LAYER], batch_size=7).run(explained, "st_elevation", [concepts["st_elevation"]],
                                                        randoms[:3]).row("st_elevation", LAYER)
        assert wrapper.model.training                              # the mode found is given back
    finally:
        wrapper.model.eval()
    assert torch.equal(bn.running_mean, stats)
    assert got["scores"] == pytest.approx(want["scores"]) and got["cav_accuracy"] == pytest.approx(want["cav_accuracy"])


def test_constant_scores_in_both_groups_are_not_significant(setup, monkeypatch):
    """Concept scores all 1.0 against random-vs-random scores all 0.5: Welch's t is infinite and p = 0 without any
    evidence of spread; the row must be undetermined (t NaN, p 1), not significant."""
    wrapper, concepts, randoms, explained = setup
    calls = []

    def score(grads, cav):
        calls.append(1)
        return (0.5, 0.0) if len(calls) <= len(randoms[:3]) else (1.0, 0.1)   # the null pairs come first

    monkeypatch.setattr(TCAV, "score", staticmethod(score))
    row = TCAV(wrapper, [LAYER]).run(explained, "st_elevation", [concepts["st_elevation"]],
                                     randoms[:3]).row("st_elevation", LAYER)
    assert row["score_mean"] == 1.0 and row["random_mean"] == 0.5
    assert row["p"] == 1.0 and not row["significant"] and math.isnan(row["t"])
