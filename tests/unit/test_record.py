"""The record type: canonical lead mapping and validation errors."""

import numpy as np
import pytest

from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord, canonical_lead, map_leads


def _record(**kw):
    base = dict(signal=np.zeros((12, 100), np.float32) + np.arange(100, dtype=np.float32) / 100,
                fs=100.0, lead_mask=np.ones(12, bool), record_id="r1", source="test")
    base.update(kw)
    return ECGRecord(**base)


def test_aliases_map_to_canonical_names():
    assert canonical_lead("MLII") == "II"
    assert canonical_lead("avr") == "aVR"
    assert canonical_lead(" V5 ") == "V5"
    assert canonical_lead("vx") is None
    with pytest.raises(KeyError):
        canonical_lead("FOO")


def test_map_leads_places_two_lead_record_and_drops_frank_leads():
    sig = np.stack([np.full(5, 1.0), np.full(5, 2.0), np.full(5, 3.0)])
    out, mask, dropped = map_leads(sig, ["MLII", "V5", "vx"], "rec.hea")
    assert out.shape == (12, 5) and out.dtype == np.float32
    assert mask.sum() == 2 and mask[CANONICAL_LEADS.index("II")] and mask[CANONICAL_LEADS.index("V5")]
    assert out[CANONICAL_LEADS.index("V5"), 0] == 2.0
    assert dropped == ["vx"]


def test_map_leads_errors_name_file_and_problem():
    with pytest.raises(ECGDataError, match=r"rec\.hea: unknown lead name 'FOO'"):
        map_leads(np.zeros((1, 5)), ["FOO"], "rec.hea")
    with pytest.raises(ECGDataError, match="appears twice"):
        map_leads(np.zeros((2, 5)), ["II", "MLII"], "rec.hea")
    with pytest.raises(ECGDataError, match="no standard ECG lead"):
        map_leads(np.zeros((1, 5)), ["vx"], "rec.hea")


@pytest.mark.parametrize("kw, msg", [
    (dict(fs=0.0), "impossible sampling rate"),
    (dict(fs=float("nan")), "impossible sampling rate"),
    (dict(signal=np.zeros((12, 0), np.float32)), "zero-length"),
    (dict(signal=np.zeros((3, 10), np.float32)), r"must be \(12, samples\)"),
    (dict(signal=np.full((12, 10), np.nan, np.float32)), "NaN"),
    (dict(signal=np.zeros((12, 10), np.float64)), "float32"),
    (dict(lead_mask=np.zeros(12, bool)), "no lead present"),
])
def test_validate_rejects_bad_records(kw, msg):
    with pytest.raises(ECGDataError, match=msg) as err:
        _record(**kw).validate("some/file.hea")
    assert "some/file.hea" in str(err.value)


def test_valid_record_properties():
    rec = _record(lead_mask=np.array([True, True] + [False] * 10)).validate()
    assert rec.n_samples == 100 and rec.duration == 1.0
    assert rec.present_leads == ("I", "II")
    assert rec.key == "test/r1"
