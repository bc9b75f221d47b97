"""The preprocessing options added for imported models (resampling method, band-pass design, notch order and Q,
median baseline, normalisation scope): old specs keep their dict and fingerprint, each option equals the plain
scipy call, and each peer's documented pipeline is reproduced on a real PTB-XL record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import signal as sps

from ecgfm.data.preprocess import PreprocessSpec, butterworth, median_baseline, preprocess_signal, resample
from ecgfm.zoo import ecgfounder as zoo_ecgfounder
from ecgfm.zoo import stmem as zoo_stmem

ALL = np.ones(12, bool)
OFF = dict(highpass=None, lowpass=None, notch=None, normalize="none", clip=None)


def _ecg_like(seed: int = 0, n: int = 5000, fs: float = 500.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    x = np.sin(2 * np.pi * 1.2 * t) + 0.4 * np.sin(2 * np.pi * 0.2 * t) + 0.1 * np.sin(2 * np.pi * 50 * t)
    return (x[None] * rng.uniform(0.5, 2.0, (12, 1)) + 0.05 * rng.standard_normal((12, n))).astype(np.float32)


def test_old_specs_keep_their_dict_and_fingerprint():
    # the dict and fingerprint of the default spec, as written before the new fields existed
    old = {"fs": 100.0, "highpass": 0.5, "lowpass": None, "notch": None, "filter_order": 3, "normalize": "zscore",
           "flat_threshold": 1e-4, "clip": 20.0}
    spec = PreprocessSpec()
    assert spec.to_dict() == old
    assert spec.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert PreprocessSpec.from_dict(old) == spec
    new = PreprocessSpec(normalize_scope="record", median_baseline=0.4, notch=50.0, notch_q=25.0, notch_first=True,
                         filter_design="ba", bandpass_mode="cascade", resample_method="fourier")
    d = new.to_dict()
    assert {"normalize_scope", "median_baseline", "notch_q", "notch_first", "filter_design", "bandpass_mode",
            "resample_method"} <= set(d)
    assert PreprocessSpec.from_dict(json.loads(json.dumps(d))) == new and new.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize("bad", [dict(normalize_scope="global"), dict(filter_design="fir"), dict(notch_q=0),
                                 dict(median_baseline=-1.0), dict(resample_method="linear"),
                                 dict(bandpass_mode="x")])
def test_bad_new_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PreprocessSpec(**bad)


def test_default_path_is_unchanged_by_the_new_code():
    x = _ecg_like()
    spec = PreprocessSpec(fs=250.0, highpass=0.5, lowpass=40.0, notch=50.0)
    y, fs, _ = preprocess_signal(x, 500.0, ALL, spec)
    # the same as the explicit default values of every new field
    z, _, _ = preprocess_signal(x, 500.0, ALL, PreprocessSpec(**{**spec.to_dict(), "notch_q": 30.0,
                                                                   "normalize_scope": "lead"}))
    np.testing.assert_array_equal(y, z)
    assert fs == 250.0


def test_fourier_resampling_is_scipy_resample():
    x = _ecg_like(n=4500)
    np.testing.assert_allclose(resample(x, 500, 250, "fourier"),
                               sps.resample(x.astype(np.float64), 2250, axis=-1), atol=1e-5)


@pytest.mark.parametrize("design", ["sos", "ba"])
def test_butterworth_designs_equal_the_scipy_calls(design):
    x = _ecg_like().astype(np.float64)
    if design == "sos":   # cascade: high-pass then low-pass (ST-MEM)
        ref = sps.sosfiltfilt(sps.butter(5, 40, "lowpass", fs=250, output="sos"),
                              sps.sosfiltfilt(sps.butter(5, 0.67, "highpass", fs=250, output="sos"), x))
        got = butterworth(x, 250.0, 0.67, 40.0, 5, mode="cascade", design="sos")
    else:                 # one band-pass on (b, a) with filtfilt (ECGFounder)
        b, a = sps.butter(4, [0.67, 40], btype="bandpass", fs=500)
        ref = sps.filtfilt(b, a, x)
        got = butterworth(x, 500.0, 0.67, 40.0, 4, mode="bandpass", design="ba")
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_median_baseline_equals_medfilt():
    x = _ecg_like(n=1500)
    k = int(0.4 * 500) + 1
    k += 1 - k % 2
    ref = x - np.stack([sps.medfilt(row, k) for row in x])
    np.testing.assert_array_equal(median_baseline(x, 500.0, 0.4), ref.astype(np.float32))


def test_range_normalisation_is_hubert_ecgs_scaling():
    x = _ecg_like()
    y, _, _ = preprocess_signal(x, 500.0, ALL, PreprocessSpec(fs=None, **{**OFF, "normalize": "range"}))
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    np.testing.assert_allclose(y, 2 * (x - lo) / (hi - lo + 1e-8) - 1, atol=1e-5)   # HuBERT-ECG utils.scaling
    assert PreprocessSpec(normalize="range").to_dict()["normalize"] == "range"


def test_record_scope_normalisation():
    x = _ecg_like()
    mask = ALL.copy()
    mask[3] = False
    y, _, m = preprocess_signal(x, 500.0, mask, PreprocessSpec(fs=None, **{**OFF, "normalize": "zscore"},
                                                                normalize_scope="record"))
    assert abs(y[m].mean()) < 1e-5 and abs(y[m].std() - 1) < 1e-4 and (y[3] == 0).all()
    assert np.ptp(y[m].std(axis=1)) > 0.1    # leads keep their relative amplitudes


# ------------------------------------------------------------------ the peers' pipelines on a real record
#: Bound on |ecgfm - the peer's pipeline written with scipy calls| on z-scored outputs (unit scale). Not float32
#: rounding alone: ecgfm filters in its own code (float32 output, its own resampling and median filter) while the
#: reference runs scipy in float64, so the difference grows with the filters' transients. Measured 1.5e-6 (ST-MEM)
#: and 4.4e-6 (ECGFounder); a wrong filter order, cutoff or normalisation scope is orders of magnitude larger.
PIPELINE_TOL = 2e-5
@pytest.fixture(scope="module")
def ptbxl_500(shared_data):
    """PTB-XL record 1 at 500 Hz, 10 s, 12 leads: ecgfm's reader output and the raw samples as wfdb reads them."""
    wfdb = pytest.importorskip("wfdb")
    from ecgfm.data.readers.formats import read_wfdb

    path = shared_data / "ptbxl" / "records500" / "00000" / "00001_hr"
    if not Path(str(path) + ".hea").is_file():
        pytest.skip(f"{path}.hea not found")
    record = read_wfdb(str(path) + ".hea")
    raw, meta = wfdb.rdsamp(str(path))
    names = [s.upper() for s in meta["sig_name"]]
    order = [names.index(n.upper()) for n in ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")]
    return record, raw.T[order].astype(np.float64), float(meta["fs"])


@pytest.mark.realdata
def test_stmem_pipeline_on_a_real_record(ptbxl_500):
    """ST-MEM (configs/downstream/st_mem.yaml): Fourier resampling to 250 Hz, 5th-order high-pass 0.67 Hz then
    low-pass 40 Hz (sosfiltfilt), one standardisation over leads and time. Input: one 9 s window."""
    record, raw, fs = ptbxl_500
    n = int(9 * fs)
    x = sps.resample(raw[:, :n], 2250, axis=1)
    x = sps.sosfiltfilt(sps.butter(5, 0.67, btype="highpass", fs=250, output="sos"), x)
    x = sps.sosfiltfilt(sps.butter(5, 40, btype="lowpass", fs=250, output="sos"), x)
    ref = (x - x.mean()) / x.std()
    ours, out_fs, _ = preprocess_signal(record.signal[:, :n], record.fs, record.lead_mask, zoo_stmem.preprocess({}))
    assert out_fs == 250.0 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= PIPELINE_TOL


@pytest.mark.realdata
def test_ecgfounder_pipeline_on_a_real_record(ptbxl_500):
    """ECGFounder (util.py filter_bandpass + z-score): 50 Hz notch Q 30, 4th-order band-pass 0.67-40 Hz (filtfilt
    on b, a), minus a 0.4 s running median, one z-score over all leads and time. Input: the 10 s record."""
    record, raw, fs = ptbxl_500
    b, a = sps.iirnotch(50, 30, fs)
    x = sps.filtfilt(b, a, raw, axis=-1)
    b, a = sps.butter(N=4, Wn=[0.67, 40], btype="bandpass", fs=fs)
    x = sps.filtfilt(b, a, x, axis=-1)
    k = int(0.4 * fs) + 1
    k += 1 - k % 2
    x = x - np.stack([sps.medfilt(row, kernel_size=k) for row in x])
    ref = (x - np.mean(x)) / (np.std(x) + 1e-8)
    ours, out_fs, _ = preprocess_signal(record.signal, record.fs, record.lead_mask, zoo_ecgfounder.preprocess({}))
    assert out_fs == 500.0 and ours.shape == ref.shape == (12, 5000)
    assert np.abs(ours - ref).max() <= PIPELINE_TOL
