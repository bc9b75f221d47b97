"""Review s28 (r3), TCAV: the content-keyed cache can no longer serve stale data (a concept set holds its own copy of
its examples and its fingerprint always hashes the examples it holds; the cache hands out copies), a corrupt cache
entry is a miss with a warning naming the file, ``test_fraction`` must be a share and ``concept_from_arrays`` needs
one label per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.explain.concepts import TCAV, ConceptSet, TCAVCache, concept_from_arrays, data_fingerprint
from ecgfm.explain.wrapper import ECGWrapper

LAYER = "encoder.stages"


@pytest.fixture(scope="module")
def tiny():
    """An untrained resnet1d_test classifier (2 classes, 100 Hz, 250 samples) and 40 random inputs."""
    from tests.unit.explain_helpers import tiny_tcav_wrapper

    return tiny_tcav_wrapper()


def _fresh_activations(wrapper, x):
    return TCAV(wrapper, [LAYER]).activations(ConceptSet("fresh", x), LAYER)


def test_a_concept_set_keeps_its_examples_when_the_array_it_came_from_changes(tiny):
    """``ConceptSet(name, pool[a:b])`` shared the pool's memory: a later edit of the pool changed the set's examples
    but not its (kept) fingerprint, and the cache returned the old examples' activations."""
    wrapper, x = tiny
    pool = x[:10].numpy().copy()
    c = ConceptSet("c", pool[:6])
    fp = c.fingerprint
    before = c.inputs.clone()
    pool[:6] *= -1.0                                          # the caller reuses its array
    assert torch.equal(c.inputs, before) and c.fingerprint == fp
    held = x[:10].clone()
    c2 = ConceptSet("c2", held)
    held.mul_(0)
    assert torch.equal(c2.inputs, x[:10]) and c2.fingerprint == data_fingerprint(x[:10])


def test_reassigned_or_edited_examples_get_their_own_cache_entries(tiny):
    """``c.inputs = other`` or an in-place edit of ``c.inputs`` kept the old fingerprint: the cache served the old
    examples' activations (and CAVs) for the new ones, and a reassignment skipped the shape check."""
    wrapper, x = tiny
    tcav = TCAV(wrapper, [LAYER])
    c = ConceptSet("c", x[:8])
    a_old = tcav.activations(c, LAYER)
    c.inputs = x[20:26]                                       # reassigned: converted, copied and checked again
    assert c.fingerprint == data_fingerprint(x[20:26])
    a_new = tcav.activations(c, LAYER)
    assert a_new.shape == (6, a_old.shape[1]) and torch.allclose(a_new, _fresh_activations(wrapper, x[20:26]))
    with pytest.raises(ValueError, match=r"concept 'c': need \(N >= 2"):
        c.inputs = x[:1]
    c.inputs.mul_(-1.0)                                       # edited in place
    assert c.fingerprint == data_fingerprint(-x[20:26])
    assert torch.allclose(tcav.activations(c, LAYER), _fresh_activations(wrapper, -x[20:26]))
    r = ConceptSet("r", x[30:36])
    v1, _ = tcav.cav(c, r, LAYER)
    c.inputs.add_(3.0)
    v2, _ = tcav.cav(c, r, LAYER)
    v_ref, _ = TCAV(wrapper, [LAYER]).cav(ConceptSet("ref", -x[20:26] + 3.0), r, LAYER)
    assert not torch.equal(v1, v2) and torch.allclose(v2, v_ref)


def test_activations_and_cavs_handed_out_are_copies(tiny):
    """``TCAV.activations`` / ``cav`` returned the cache's own tensors: a caller's in-place edit (centring activations
    for a plot...) rewrote the cache, and every later CAV of that concept was fitted on the edited values."""
    wrapper, x = tiny
    c, r = ConceptSet("c", x[:8]), ConceptSet("r", x[10:18])
    ref_act = _fresh_activations(wrapper, x[:8])
    ref_v, ref_acc = TCAV(wrapper, [LAYER]).cav(c, r, LAYER)
    tcav = TCAV(wrapper, [LAYER])
    tcav.activations(c, LAYER).mul_(0)                        # a miss: computed, stored, handed out
    tcav.activations(c, LAYER).mul_(0)                        # a hit
    assert torch.equal(tcav.activations(c, LAYER), ref_act)
    v, acc = tcav.cav(c, r, LAYER)
    assert torch.equal(v, ref_v) and acc == ref_acc
    v.mul_(0)
    tcav.cav(c, r, LAYER)[0].mul_(0)
    assert torch.equal(tcav.cav(c, r, LAYER)[0], ref_v)
    cache = TCAVCache()
    value = torch.ones(3)
    cache.put("k", {"t": value}, {})
    value.mul_(0)
    cache.get("k")["t"].mul_(0)
    assert torch.equal(cache.get("k")["t"], torch.ones(3))


def test_a_corrupt_cache_entry_is_recomputed_with_a_warning_naming_the_file(tiny, tmp_path):
    """A truncated ``<key>.safetensors`` raised safetensors' ``invalid header length`` without naming the file; the
    entry can always be recomputed (its key is its content), so it is a miss, said in a warning, and rewritten."""
    wrapper, x = tiny
    c = ConceptSet("c", x[:8])
    ref = TCAV(wrapper, [LAYER], cache=TCAVCache(tmp_path)).activations(c, LAYER)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    cache = TCAVCache(tmp_path)
    with pytest.warns(UserWarning, match=rf"TCAV cache entry .*{entry.name} cannot be read.*recomputed"):
        again = TCAV(wrapper, [LAYER], cache=cache).activations(c, LAYER)
    assert torch.equal(again, ref) and (cache.hits, cache.misses) == (0, 1)
    later = TCAVCache(tmp_path)                               # rewritten: the next run hits
    assert torch.equal(TCAV(wrapper, [LAYER], cache=later).activations(c, LAYER), ref) and later.hits == 1


@pytest.mark.parametrize("fraction", [0.0, -0.2, 1.0, 1.5, float("nan")])
def test_test_fraction_must_be_a_share(tiny, fraction):
    """0 and -0.2 silently switched every CAV to leave-one-out; 1.5 failed inside scikit-learn."""
    wrapper, _ = tiny
    with pytest.raises(ValueError, match="test_fraction must be strictly between 0 and 1"):
        TCAV(wrapper, [LAYER], test_fraction=fraction)


def test_test_fraction_inside_the_range_is_accepted(tiny):
    wrapper, _ = tiny
    assert TCAV(wrapper, [LAYER], test_fraction=0.5).test_fraction == 0.5


@pytest.mark.parametrize("n_labels", [80, 120])
def test_concept_from_arrays_needs_one_label_per_row(n_labels):
    """80 labels for 100 rows silently picked rows by the wrong labels; 120 failed with a bare IndexError."""
    x = torch.randn(100, 12, 250)
    labels = (["af"] * 10 + ["normal"] * 200)[:n_labels]
    with pytest.raises(ValueError, match=rf"concept 'af': {n_labels} labels for 100 rows of x"):
        concept_from_arrays(x, labels, "af")
    assert concept_from_arrays(x, (["af"] * 10 + ["normal"] * 90), "af").inputs.shape == (10, 12, 250)
