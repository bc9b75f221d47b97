"""Review s28 of :mod:`ecgfm.data.preprocess`: values the spec used to accept and then misapply (clip <= 0 / NaN,
booleans read as 1.0, NaN / inf cut-offs and thresholds), a Fourier resampling of a very short record failing with a
bare ZeroDivisionError, and docstrings / a warning that contradicted the code."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ecgfm.data import preprocess as pre
from ecgfm.data.preprocess import PreprocessSpec, preprocess_record, preprocess_signal, resample
from ecgfm.data.record import ECGDataError, ECGRecord

NUMBER_FIELDS = ("fs", "highpass", "lowpass", "notch", "flat_threshold", "clip", "notch_q", "median_baseline",
                 "filter_order")


def _record(t: int = 1000, fs: float = 100.0) -> ECGRecord:
    rng = np.random.default_rng(0)
    sig = (0.5 + 0.1 * rng.standard_normal((12, t))).astype(np.float32)
    return ECGRecord(signal=sig, fs=fs, lead_mask=np.ones(12, bool), record_id="r1", source="test",
                     header={"path": "/data/r1.hea"})


# ------------------------------------------------------------------------------------------------ 1. clip
@pytest.mark.parametrize("clip", [0, 0.0, -1.0, float("nan"), float("-inf"), float("inf")])
def test_clip_must_be_a_positive_finite_number_or_null(clip):
    """clip=0 zeroed every sample, clip=-1 set every sample to -1, clip=NaN handed NaN to the network."""
    with pytest.raises(ValueError, match="PreprocessSpec.clip must be"):
        PreprocessSpec(clip=clip)
    with pytest.raises(ValueError, match="PreprocessSpec.clip must be"):
        PreprocessSpec.from_dict({"clip": clip})


def test_clip_zero_is_refused_by_the_prepare_config_check():
    from ecgfm.config import ConfigError, validate_prepare_config

    cfg = {"out": "/nonexistent/never_written", "sources": ["p"], "p": {"_target_": "x"}, "spec": {"clip": 0.0}}
    with pytest.raises(ConfigError, match="clip"):
        validate_prepare_config(cfg)


def test_valid_clips_still_clip():
    assert PreprocessSpec(clip=None).clip is None and PreprocessSpec(clip=20).clip == 20.0
    x = np.random.default_rng(1).standard_normal((12, 500)).astype(np.float32) * 5
    y, _, _ = preprocess_signal(x, 100.0, np.ones(12, bool), PreprocessSpec(fs=None, highpass=None, clip=0.5))
    assert np.abs(y).max() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ 2. booleans
@pytest.mark.parametrize("name", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_booleans_are_refused_for_every_number(name, value):
    """clip=True clipped every sample to +-1, fs=True resampled to 1 Hz, notch=True made a 1 Hz notch."""
    with pytest.raises(ValueError, match=f"PreprocessSpec.{name} must be"):
        PreprocessSpec(**{name: value})
    with pytest.raises(ValueError, match=f"PreprocessSpec.{name} must be"):
        PreprocessSpec.from_dict({name: value})


def test_the_switches_still_take_booleans():
    spec = PreprocessSpec(notch=50.0, fs=500.0, notch_first=np.True_)
    assert spec.notch_first is True
    assert PreprocessSpec(fs=100.0, notch=50.0, notch_at_source=True).notch_at_source is True
    assert PreprocessSpec(notch_first=False) == PreprocessSpec()


# ------------------------------------------------------------------------------------------------ 3. NaN / inf
@pytest.mark.parametrize("name", ("fs", "highpass", "lowpass", "notch", "flat_threshold", "clip", "notch_q",
                                  "median_baseline", "filter_order"))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", 10 ** 400],
                         ids=["nan", "inf", "-inf", "nan-str", "1e400-int"])
def test_non_finite_numbers_are_refused_by_name(name, value):
    """highpass / lowpass NaN skipped the filter while the stored spec said it ran, flat_threshold NaN dropped
    every lead, median_baseline inf raised OverflowError on every record."""
    kwargs = {name: value}
    if name in ("highpass", "lowpass", "notch"):
        kwargs["fs"] = None   # no Nyquist check to stop an inf
    with pytest.raises(ValueError, match=f"PreprocessSpec.{name} must be"):
        PreprocessSpec(**kwargs)


@pytest.mark.parametrize("value", [-1e-4, -1.0, None])
def test_flat_threshold_must_be_zero_or_more(value):
    with pytest.raises(ValueError, match="PreprocessSpec.flat_threshold must be"):
        PreprocessSpec(flat_threshold=value)
    assert PreprocessSpec(flat_threshold=0).flat_threshold == 0.0


def test_specs_valid_before_keep_their_fingerprints():
    """The checks refuse only values that misbehaved: the default, raw and zoo specs, whole numbers, and options
    that cannot act (documented, not refused) are accepted with the fingerprints they had."""
    from ecgfm.zoo import ecgfounder, hubert_ecg, stmem

    assert PreprocessSpec().fingerprint() == "15af357ac92c9c3a"
    assert PreprocessSpec.raw().fingerprint() == "f1eba395795bed1b"
    assert stmem.preprocess({}).fingerprint() == "db787876bcaeec12"
    assert hubert_ecg.preprocess({}).fingerprint() == "aea1da85b593b964"
    assert ecgfounder.preprocess({}).fingerprint() == "d5afd6baeedf1a95"
    assert PreprocessSpec.from_dict({"fs": 100, "highpass": 0.5, "filter_order": 3, "clip": 20,
                                     "flat_threshold": 0}).to_dict()["fs"] == 100.0
    for kw in ({"notch_first": True}, {"notch_q": 5.0}, {"resample_padtype": "line", "fs": None},
               {"filter_design": "ba", "highpass": None}, {"leads": ("II", "I")}):
        assert PreprocessSpec(**kw).fingerprint() != PreprocessSpec().fingerprint()


# ------------------------------------------------------------------------------------------------ 4. Fourier
def test_fourier_resampling_of_a_very_short_record_is_an_ecg_data_error_naming_it():
    rec = _record(t=4, fs=500.0)
    for method in ("polyphase", "fourier"):
        with pytest.raises(ECGDataError, match=r"/data/r1\.hea.*record too short to preprocess"):
            preprocess_record(rec, PreprocessSpec(resample_method=method))


def test_fourier_resample_to_no_sample_is_a_value_error():
    with pytest.raises(ValueError, match="give no sample at 100 Hz"):
        resample(np.ones((1, 4), np.float32), 500.0, 100.0, method="fourier")
    assert resample(np.ones((1, 5), np.float32), 500.0, 100.0, method="fourier").shape == (1, 1)


# ------------------------------------------------------------------------------------------------ 6. docs
def test_resample_docstring_states_the_edge_step_measured():
    y = resample(np.full((1, 5000), 0.5, np.float32), 500, 100)
    assert float(y[0, 0]) == pytest.approx(0.3, abs=1e-3)   # 0.2 mV short of 0.5 mV
    doc = " ".join(resample.__doc__.split())
    assert "is 0.3 mV, 0.2 mV short of it" in doc and "about 0.3 mV short" not in doc


def test_a_notch_at_nyquist_of_spec_fs_is_reported_with_a_remedy_that_applies(caplog, monkeypatch):
    """PreprocessSpec(notch=50.0) at the default fs=100 (accepted in Python; only config checks refuse it): the
    warning told the user to set PreprocessSpec.fs, which was set already."""
    monkeypatch.setattr(pre, "_WARNED_NOT_ACTING", set())
    spec = PreprocessSpec(notch=50.0)
    assert pre.filters_not_acting(spec, 100.0)
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.preprocess"):
        out = preprocess_record(_record(), spec)
    assert out.header["filters_not_applied"] == pre.filters_not_acting(spec, 100.0)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "notch=50 Hz" in text and "notch_at_source=true" in text and "notch=null" in text
    assert "set PreprocessSpec.fs" not in text
    doc = " ".join(pre.filters_not_acting.__doc__.split())
    assert "Only a spec without ``fs``" not in doc and "PreprocessSpec(notch=50.0)" in doc


def test_a_spec_without_fs_still_gets_the_set_fs_remedy(caplog, monkeypatch):
    monkeypatch.setattr(pre, "_WARNED_NOT_ACTING", set())
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.preprocess"):
        out = preprocess_record(_record(t=200, fs=20.0), PreprocessSpec(fs=None, highpass=None, lowpass=15.0))
    assert out.header["filters_not_applied"]
    assert "set PreprocessSpec.fs" in " ".join(r.getMessage() for r in caplog.records)


def test_fs_null_is_described_as_keeping_each_records_rate_and_notch_q_null_is_named():
    import pytest as _pytest

    from ecgfm.data.preprocess import PreprocessSpec as _Spec

    with _pytest.raises(ValueError, match=r"PreprocessSpec\.fs .*keep each record's own rate"):
        _Spec(fs="fast")
    with _pytest.raises(ValueError, match=r"PreprocessSpec\.notch_q must be a number"):
        _Spec(notch_q=None)
