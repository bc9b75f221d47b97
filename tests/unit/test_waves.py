"""R-peak detection against the synthetic corpus's fiducials; wave windows and feature masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgfm.data.synthetic import generate_record
from ecgfm.explain import waves


def _hits(peaks: np.ndarray, on: np.ndarray, off: np.ndarray, margin: int) -> tuple[int, int]:
    """(beats with a detection inside their QRS +- margin, detections inside no QRS)."""
    hit = sum(bool(np.any((peaks >= a - margin) & (peaks <= b + margin))) for a, b in zip(on, off))
    extra = sum(not np.any((q >= on - margin) & (q <= off + margin)) for q in peaks)
    return hit, extra


@pytest.mark.parametrize("fs", [100.0, 500.0])
def test_detector_finds_synthetic_beats(fs):
    total = hit = extra = 0
    for i in range(18):  # two of each of the nine classes
        rec = generate_record(i, seed=3, fs=fs, duration=10.0)
        ann = rec.annotations
        peaks = waves.detect_r_peaks(rec.signal, fs)
        assert peaks.dtype == np.int64 and np.all(np.diff(peaks) > 0)
        h, e = _hits(peaks, np.asarray(ann["qrs_onset"]), np.asarray(ann["qrs_offset"]), int(0.02 * fs))
        total += len(ann["qrs_onset"])
        hit += h
        extra += e
    assert hit / total >= 0.97, (hit, total)
    assert extra / total <= 0.03, (extra, total)


def test_detector_accepts_torch_single_lead_and_rejects_short():
    rec = generate_record(0, seed=0, fs=250.0, duration=5.0)
    a = waves.detect_r_peaks(torch.from_numpy(rec.signal), 250.0)
    b = waves.detect_r_peaks(rec.signal[1], 250.0)       # lead II only
    assert len(a) > 2 and abs(len(a) - len(b)) <= 1
    assert waves.detect_r_peaks(np.zeros((12, 500)), 100.0).size == 0
    with pytest.raises(ValueError, match="too short"):
        waves.detect_r_peaks(np.zeros((12, 20)), 100.0)
    with pytest.raises(ValueError, match="unknown R-peak method"):
        waves.detect_r_peaks(rec.signal, 250.0, method="magic")
    assert len(waves.detect_r_peaks(rec.signal, 250.0, method="gqrs")) > 2
    assert len(waves.detect_r_peaks_batch(np.stack([rec.signal] * 2), 250.0)) == 2


@pytest.mark.realdata
def test_detector_on_real_ptbxl(fixture_dir):
    wfdb = pytest.importorskip("wfdb")
    files = sorted((fixture_dir / "ptbxl" / "records100").rglob("*.hea"))[:8]
    if not files:
        pytest.skip("no PTB-XL records in the fixture")
    for f in files:
        rec = wfdb.rdrecord(str(f.with_suffix("")))
        sig = np.nan_to_num(rec.p_signal.T.astype(np.float32))
        peaks = waves.detect_r_peaks(sig, rec.fs)
        rate = 60 * len(peaks) / (sig.shape[1] / rec.fs)
        assert 30 <= rate <= 200, (f.name, rate)
        rr = np.diff(peaks) / rec.fs
        assert rr.min() >= 0.25


def test_wave_windows_offsets_and_clipping():
    fs = 500.0
    r = np.array([100, 600, 1100])               # 1 s RR
    win = waves.wave_windows(r, fs, 1200)
    np.testing.assert_array_equal(win["QRS"][1], [600 - 30, 600 + 30])
    np.testing.assert_array_equal(win["P"][1], [600 - 120, 600 - 30])
    np.testing.assert_array_equal(win["T"][1], [600 + 50, 600 + 210])
    assert win["P"][0][0] == 0                                   # clipped at the record start
    assert win["T"][2][1] <= 1200
    for name in waves.WAVES:
        assert np.all(win[name][:, 1] >= win[name][:, 0])
    # A fast rhythm: T shortens (sqrt(RR)) and never reaches past 70 % of the RR; P starts after the previous T.
    r = np.arange(50, 1000, 200)                                  # 0.4 s RR at 500 Hz
    win = waves.wave_windows(r, fs, 1000)
    assert np.all(win["T"][:-1, 1] <= r[:-1] + 0.7 * 200)
    assert np.all(win["P"][1:, 0] >= win["T"][:-1, 1])
    assert waves.wave_windows([], fs, 100)["QRS"].shape == (0, 2)


def test_windows_cover_synthetic_fiducials():
    """The standard offsets put most of each annotated QRS inside the QRS window."""
    rec = generate_record(0, seed=0, fs=500.0, duration=10.0)   # class 0 of seed 0's first block
    ann = rec.annotations
    win = waves.wave_windows(ann["sample"], rec.fs, rec.n_samples)
    masks = waves.wave_mask(win, rec.n_samples)
    qrs = np.zeros(rec.n_samples, bool)
    for a, b in zip(ann["qrs_onset"], ann["qrs_offset"]):
        qrs[max(a, 0):b] = True
    assert (masks["QRS"] & qrs).sum() / qrs.sum() > 0.9


def test_feature_mask_and_beat_bounds():
    win = waves.wave_windows(np.array([50, 150]), 100.0, 200)
    mask, names = waves.wave_feature_mask(win, 3, 200)
    assert mask.shape == (3, 200) and names[0] == "other"
    assert set(mask.unique().tolist()) == set(range(len(names)))
    assert names[mask[0, 50]] == "QRS#0" and names[mask[0, 150]] == "QRS#1"
    mask, names = waves.wave_feature_mask(win, 3, 200, per_beat=False)
    assert names == ["other", "P", "QRS", "T"]
    mask, names = waves.wave_feature_mask(win, 3, 200, per_beat=False, by_lead=True)
    assert len(names) == 12 and mask[2, 50] == 2 * 4 + 2
    np.testing.assert_array_equal(waves.beat_bounds([50, 150], 200), [[0, 100], [100, 200]])


def test_annotation_mask_matches_windows():
    rec = generate_record(0, seed=0, fs=500.0, duration=10.0)
    m = waves.annotation_mask(rec.annotations, "QRS", rec.n_samples)
    assert m.shape == (12, rec.n_samples) and m[0].any() and (m == m[0]).all()
    win = waves.wave_mask(waves.wave_windows(rec.annotations["sample"], rec.fs, rec.n_samples), rec.n_samples)
    assert (m[0] & win["QRS"]).sum() / m[0].sum() > 0.9
    assert not (m[0] & waves.annotation_mask(rec.annotations, "T", rec.n_samples)[0]).any()
    with pytest.raises(ValueError, match="unknown wave"):
        waves.annotation_mask(rec.annotations, "U", rec.n_samples)
    with pytest.raises(ValueError, match="no p_onset"):
        waves.annotation_mask({"sample": [1]}, "P", 10)


def test_annotation_mask_keeps_a_wave_cut_by_the_record_start():
    """A first QRS from -3 to 6 is visible on samples 0-6 (it was dropped with the -1 'no P wave' marker); a
    missing P (-1 / -1) and a wave ending before the record stay out."""
    ann = {"sample": [1, 40], "qrs_onset": [-3, 35], "qrs_offset": [6, 45], "p_onset": [-1, 20], "p_offset": [-1, 28]}
    qrs = waves.annotation_mask(ann, "QRS", 60, n_leads=1)[0]
    assert qrs[:7].all() and not qrs[7:35].any() and qrs[35:46].all()
    p = waves.annotation_mask(ann, "P", 60, n_leads=1)[0]
    assert np.flatnonzero(p).tolist() == list(range(20, 29))
    assert not waves.annotation_mask({"qrs_onset": [-9], "qrs_offset": [-2]}, "QRS", 10, n_leads=1).any()
