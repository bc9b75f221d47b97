"""Review of the handcrafted baseline (2026-12-07): a neurokit2 that fails on every signal must stop the extraction,
not give every record the "no R-peaks" fill (constant features: a chance-level handcrafted row with exit status 0,
as neurokit2 0.2.0 / 0.2.1 did, which lack ``ecg_invert``); records filled for too few beats are counted."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ecgfm.evaluate import handcrafted as H

nk = pytest.importorskip("neurokit2")


class _Cache:
    """An in-memory cache: ``n`` one-lead records of ``seconds`` at 100 Hz, regular beats at 72 per minute."""

    def __init__(self, n: int = 8, seconds: float = 12.0, short: int = 0) -> None:
        from tests.unit.test_handcrafted import beat_train, regular

        self.fs, self.path, self.keys = 100.0, "mem-cache", [f"rec{i}" for i in range(n)]
        x = beat_train(regular(72.0, seconds), seconds, self.fs)
        self._sig = [np.zeros((12, len(x)), np.float32) for _ in range(n)]
        for i, s in enumerate(self._sig):
            s[0] = x if i >= short else np.r_[x[:150], np.zeros(len(x) - 150)]   # `short`: about 2 beats, then 0
        self._mask = np.eye(12, dtype=bool)[0]

    def __len__(self) -> int:
        return len(self._sig)

    def signal(self, i: int) -> np.ndarray:
        return self._sig[i]

    def lead_mask(self, i: int) -> np.ndarray:
        return self._mask


@pytest.fixture(autouse=True)
def _fresh_self_test():
    H.check_neurokit.cache_clear()
    yield
    H.check_neurokit.cache_clear()


def test_a_neurokit_without_a_function_it_needs_is_an_error_not_no_beats(monkeypatch):
    monkeypatch.delattr(nk, "ecg_invert")        # as neurokit2 0.2.0 / 0.2.1
    x = np.asarray(nk.ecg_simulate(duration=10, sampling_rate=100, heart_rate=72, random_state=0))
    with pytest.raises(AttributeError):
        H.detect_rpeaks(x, 100.0)                # before: caught, logged at DEBUG, "no R-peaks"
    with pytest.raises(RuntimeError, match=r"neurokit2 .*simulated ECG.*AttributeError"):
        H.extract_handcrafted(_Cache())


def test_neurokit_failing_on_most_records_stops_the_extraction(monkeypatch):
    H.check_neurokit(100)                        # the installation passes its self-test ...

    def broken(*args, **kwargs):
        raise ValueError("cannot find peaks")    # ... but detection raises on every record (a data-type error)

    monkeypatch.setattr(nk, "ecg_peaks", broken)
    with pytest.raises(RuntimeError, match=r"failed on 8 of 8 records.*cannot find peaks"):
        H.extract_handcrafted(_Cache())


def test_a_detection_that_finds_too_few_beats_fails_the_self_test(monkeypatch):
    real = nk.ecg_peaks
    monkeypatch.setattr(nk, "ecg_peaks", lambda clean, sampling_rate: (None, {
        "ECG_R_Peaks": np.asarray(real(clean, sampling_rate=sampling_rate)[1]["ECG_R_Peaks"])[:3]}))
    with pytest.raises(RuntimeError, match="finds 3 peaks"):
        H.check_neurokit(100)


def test_records_filled_for_too_few_beats_are_counted_and_logged(caplog):
    cache = _Cache(n=8, short=2)
    with caplog.at_level(logging.INFO, logger=H.log.name):
        fs = H.extract_handcrafted(cache)
    counts = H.missing_counts(fs.features)
    assert counts["records"] == 8 and counts["missing_rr"] == 2 and counts["missing_morph"] == 2
    line = next(r for r in caplog.records if "filled with 0 + indicator" in r.getMessage())
    assert line.levelno == logging.WARNING       # 2 of 8 records: above the 5 % share
    assert "2 (RR)" in line.getMessage() and "rec0, rec1" in line.getMessage()
    per_split = H.split_missing_counts(fs, {"train": np.arange(6), "test": np.array([0, 7])})
    assert per_split["train"]["missing_rr"] == 2 and per_split["test"] == {
        "records": 2, "missing_rr": 1, "missing_drr": 1, "missing_morph": 1}


#: raw_features of the AF-like synthetic record below at 100 Hz, feature version hc-1, neurokit2 0.3.0
GOLDEN_HC1 = [62, 0.882593, 0.904901, 67.9815, 0.401774, 0.455219, 0.460774, 0.68771, 1.1632, 1.31721, 0.475489,
              0.211785, 0.44414, 2.83274, 0.90785, 0.463236, 0.524858, 0.458346, 0.366612, 0.896552, 0.827586,
              0.758621, 0.324099, 0.466694, 0.694457, 0.678571, 0.766392, 0.1812, 0.883938, 0.682831, 0.0126147,
              0.193548, 0.0827932, 0.819615, 0.0624573, 0.03, 0.328357, 0, 0, 0]


def test_feature_definitions_match_their_version():
    """Cached features and cells are keyed by FEATURE_VERSION (and the neurokit2 version), not by the code: a
    changed definition without a version bump would reuse stale features. This pins hc-1's values."""
    from tests.unit.test_handcrafted import beat_train, irregular

    if H.neurokit_version() != "0.3.0":
        pytest.skip(f"golden values recorded with neurokit2 0.3.0, installed {H.neurokit_version()} (its version "
                    f"is part of the feature key)")
    got = H.fill_missing(H.raw_features(beat_train(irregular(seed=0), 30.0, 100.0), 100.0))[0]
    assert H.FEATURE_VERSION == "hc-1", "FEATURE_VERSION bumped: record the new version's values here"
    np.testing.assert_allclose(got, GOLDEN_HC1, rtol=1e-4, atol=1e-5, err_msg=(
        "a handcrafted feature changed: bump FEATURE_VERSION in ecgfm/evaluate/handcrafted.py (stale cached "
        "features and cells are keyed by it) and record the new values here"))
