"""PreprocessSpec numbers in one type: a spec written with whole numbers (``fs: 100`` in conf/prepare.yaml) and the
same spec written with floats (``fs: 100.0`` in conf/train.yaml) are one spec: one fingerprint, one cache key, and
a cache record preprocessed with one is accepted by a model that preprocesses with the other."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm.data.preprocess import PreprocessSpec, preprocessed_spec
from ecgfm.data.record import ECGRecord


def test_whole_numbers_and_floats_give_one_fingerprint():
    ints = PreprocessSpec(fs=500, highpass=1, lowpass=40, notch=50, filter_order=4.0, clip=20, flat_threshold=0,
                          notch_q=30, median_baseline=1)
    floats = PreprocessSpec(fs=500.0, highpass=1.0, lowpass=40.0, notch=50.0, filter_order=4, clip=20.0,
                            flat_threshold=0.0, notch_q=30.0, median_baseline=1.0)
    assert ints == floats and ints.to_dict() == floats.to_dict()
    assert ints.fingerprint() == floats.fingerprint()
    assert type(ints.fs) is float and type(ints.filter_order) is int
    assert PreprocessSpec.from_dict(ints.to_dict()).fingerprint() == floats.fingerprint()


def test_prepare_and_train_configs_share_one_cache_key():
    from ecgfm.data.prepare import cache_key

    sources = [{"_target_": "ecgfm.data.readers.PTBXLSource", "root": "x", "fs": 100}]
    prepare_yaml = PreprocessSpec.from_dict({"fs": 100, "highpass": 0.5, "lowpass": None, "notch": None,
                                             "filter_order": 3, "normalize": "zscore", "flat_threshold": 1.0e-4,
                                             "clip": 20.0})
    assert cache_key(sources, prepare_yaml) == cache_key(sources, PreprocessSpec())
    assert prepare_yaml.fingerprint() == "15af357ac92c9c3a"        # the default's, unchanged


def test_record_preprocessed_with_the_whole_number_form_is_accepted():
    rec = ECGRecord(signal=np.zeros((12, 100), np.float32), fs=100.0, lead_mask=np.ones(12, bool),
                    record_id="r1", source="test",
                    header={"preprocessed": {"fs": 100, "highpass": 0.5, "filter_order": 3, "clip": 20}})
    assert preprocessed_spec(rec, PreprocessSpec()) == PreprocessSpec()


@pytest.mark.parametrize("kwargs, match", [({"filter_order": 2.5}, "filter_order must be a whole number"),
                                           ({"fs": "fast"}, "fs must be a number or null"),
                                           ({"filter_order": True}, "filter_order must be a whole number")])
def test_non_numbers_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessSpec(**kwargs)


def test_a_cache_written_with_whole_numbers_is_explained_when_its_plan_no_longer_matches(tmp_path):
    """A cache prepared before the numbers were unified, with ``fs: 100`` (conf/prepare.yaml), holds a plan whose
    fingerprint the equal spec no longer reproduces: the refusal says why instead of 'spec differ' alone."""
    import json

    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.synthetic import SyntheticSource

    out = tmp_path / "c"
    prepare_corpus(SyntheticSource(4, seed=0, fs=100.0, duration=2.5), out, PreprocessSpec(), workers=0,
                   progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["spec"]["fs"] = 100                       # as the old code stored a whole-number spec
    manifest["plan_fingerprint"] = "0" * 64            # ... whose plan fingerprint differed
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "plan.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="written with whole numbers"):
        prepare_corpus(SyntheticSource(4, seed=0, fs=100.0, duration=2.5), out, PreprocessSpec(), workers=0,
                       progress=False)
