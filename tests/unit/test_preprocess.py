"""Tests of the shared preprocessing: resampling, filters, NaN and flat-lead handling, normalisation, windows,
the serialisable spec and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ecgfm.data.preprocess import (
    PreprocessSpec,
    bandpass,
    crop_or_pad,
    notch,
    preprocess_record,
    preprocess_signal,
    resample,
    sliding_windows,
)
from ecgfm.data.record import ECGDataError, ECGRecord

NONE = dict(highpass=None, lowpass=None, notch=None, normalize="none", clip=None)


def _sine(freq: float, fs: float, seconds: float, amp: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(fs * seconds))) / fs
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def _amplitude_at(x: np.ndarray, fs: float, freq: float) -> float:
    """Amplitude of the ``freq`` component (least-squares fit of a sine and a cosine)."""
    t = np.arange(x.shape[-1]) / fs
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x.astype(np.float64), rcond=None)
    return float(np.hypot(*coef))


def _record(sig: np.ndarray, fs: float, **kw) -> ECGRecord:
    return ECGRecord(signal=np.asarray(sig, dtype=np.float32), fs=fs, lead_mask=np.ones(12, bool),
                     record_id="r1", source="test", **kw)


# ---- resampling --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fs_in,fs_out,n_in,n_out", [(500, 100, 5000, 1000), (360, 100, 3600, 1000),
                                                     (257, 100, 2570, 1000), (100, 250, 1000, 2500),
                                                     (100, 100, 1000, 1000)])
def test_resample_length_and_rate(fs_in, fs_out, n_in, n_out):
    x = np.random.default_rng(0).standard_normal((12, n_in)).astype(np.float32)
    y = resample(x, fs_in, fs_out)
    assert y.shape == (12, n_out) and y.dtype == np.float32
    sig, fs, mask = preprocess_signal(x, fs_in, np.ones(12, bool), PreprocessSpec(fs=fs_out, **NONE))
    assert fs == float(fs_out) and sig.shape == (12, n_out) and mask.all()


@pytest.mark.parametrize("fs_in,fs_out", [(500, 100), (360, 100), (100, 500)])
def test_resampled_sine_keeps_its_frequency_and_amplitude(fs_in, fs_out):
    x = _sine(7.0, fs_in, 10.0, amp=1.3)
    y = resample(x, fs_in, fs_out)
    spectrum = np.abs(np.fft.rfft(y[fs_out:-fs_out]))      # away from the edge transients
    freqs = np.fft.rfftfreq(len(y) - 2 * fs_out, 1 / fs_out)
    assert abs(freqs[np.argmax(spectrum)] - 7.0) < 0.15
    assert abs(_amplitude_at(y[fs_out:-fs_out], fs_out, 7.0) - 1.3) < 0.03


def test_resampling_is_antialiased():
    """A 70 Hz tone is above the 50 Hz Nyquist of 100 Hz: it must be removed, not folded to 30 Hz."""
    x = _sine(70.0, 500, 10.0)
    y = resample(x, 500, 100)
    assert _amplitude_at(y, 100, 30.0) < 0.05


# ---- filters -----------------------------------------------------------------------------------------------

def test_highpass_removes_baseline_wander_and_keeps_the_signal():
    fs = 250.0
    ecg_like = _sine(10.0, fs, 20.0, amp=0.5)
    wander = _sine(0.15, fs, 20.0, amp=1.0, phase=0.4) + 0.8      # respiration + offset
    x = np.tile(ecg_like + wander, (12, 1))
    y, _, _ = preprocess_signal(x, fs, np.ones(12, bool), PreprocessSpec(fs=None, **{**NONE, "highpass": 0.5}))
    core = slice(int(2 * fs), int(18 * fs))
    assert _amplitude_at(y[0, core], fs, 0.15) < 0.08            # wander: 1.0 -> < 0.08
    assert abs(y[0, core].mean()) < 0.02                          # offset removed
    assert abs(_amplitude_at(y[0, core], fs, 10.0) - 0.5) < 0.02  # 10 Hz content kept
    np.testing.assert_allclose(y[0, core], ecg_like[core], atol=0.1)


def test_lowpass_removes_high_frequency_noise():
    fs = 500.0
    x = np.tile(_sine(5.0, fs, 4.0) + _sine(120.0, fs, 4.0, amp=0.5), (12, 1))
    y = bandpass(x, fs, None, 40.0, order=4)
    assert _amplitude_at(y[0], fs, 120.0) < 0.01 and abs(_amplitude_at(y[0], fs, 5.0) - 1) < 0.02


@pytest.mark.parametrize("line", [50.0, 60.0])
def test_notch_removes_powerline(line):
    fs = 500.0
    x = np.tile(_sine(5.0, fs, 10.0) + _sine(line, fs, 10.0, amp=0.5), (12, 1))
    y, _, _ = preprocess_signal(x, fs, np.ones(12, bool), PreprocessSpec(fs=None, **{**NONE, "notch": line}))
    core = slice(int(fs), int(9 * fs))
    assert _amplitude_at(y[0, core], fs, line) < 0.02
    assert abs(_amplitude_at(y[0, core], fs, 5.0) - 1.0) < 0.02
    # at or above Nyquist the notch function skips (a rate-keeping spec may meet such a record) ...
    z = notch(x[:, ::5], 100.0, 50.0)
    np.testing.assert_array_equal(z, x[:, ::5])
    # ... a spec with its own rate that asks for it still loads (artifacts written before keep working) but says
    # why it does nothing, and a new training / preparation config asking for it is refused
    spec = PreprocessSpec(fs=100.0, notch=50.0)
    assert "at or above fs/2=50.0" in spec.notch_problem() and PreprocessSpec(fs=500.0, notch=50.0).notch_problem() \
        is None
    from hydra import compose, initialize_config_dir

    from ecgfm.conf import config_dir
    from ecgfm.config import ConfigError, validate_train_config

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=mae", "preprocess.notch=60", "out_dir=/tmp/x"])
    with pytest.raises(ConfigError, match="preprocess.notch.*at or above fs/2"):
        validate_train_config(cfg)
    from ecgfm.recipes import validate_probe_config

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        pcfg = compose(config_name="probe", overrides=["checkpoint=random:resnet1d_test", "preprocess={fs:100,notch:60}"])
    with pytest.raises(ConfigError, match="preprocess.notch.*at or above fs/2"):
        validate_probe_config(pcfg)


def test_integer_rates_resample_by_their_exact_ratio():
    """limit_denominator(1000) turned 4096 -> 100 Hz into 24/983 (10 min -> 60,003 samples, 30 ms drift) and
    2001 -> 100 into 1/20 (300 ms); integer rates now use their exact ratio, common rates are unchanged."""
    from ecgfm.data.preprocess import resample

    for fs_in in (4096, 2001, 500, 360, 300):
        n = fs_in * 60
        y = resample(np.zeros((1, n), dtype=np.float32), fs_in, 100)
        assert y.shape[-1] == 6000, fs_in



def test_a_non_integer_rate_without_a_small_ratio_is_approximated_with_a_warning(caplog):
    from ecgfm.data.preprocess import resample

    with caplog.at_level("WARNING"):
        y = resample(np.zeros((1, 1000), dtype=np.float32), 99.95, 100)
    assert y.shape == (1, 1001) and "time runs off by" in caplog.text


# ---- NaN, flat leads, normalisation ----------------------------------------------------------------------

def test_nan_runs_are_interpolated_linearly():
    x = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (12, 1))
    x[3, 50:60] = np.nan
    x[4, :5] = np.nan                # edge: nearest valid value
    x[5, 100] = np.inf               # +-inf counts as missing too
    y, _, mask = preprocess_signal(x, 100.0, np.ones(12, bool), PreprocessSpec(fs=None, **NONE))
    assert mask.all() and np.isfinite(y).all()
    np.testing.assert_allclose(y[3], x[0], atol=1e-6)
    np.testing.assert_allclose(y[4, :5], x[0, 5], atol=1e-6)
    np.testing.assert_allclose(y[5, 100], x[0, 100], atol=1e-6)


def test_much_missing_signal_is_filled_with_a_warning(caplog):
    """Half a lead NaN (a record padded to length, a dropped-out electrode) was filled and scored as if recorded,
    without a word; a few missing samples stay quiet."""
    x = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (12, 1))
    x[3, 100:] = np.nan
    x[4, 10:15] = np.nan
    with caplog.at_level("WARNING", logger="ecgfm.data.preprocess"):
        preprocess_signal(x, 100.0, np.ones(12, bool), PreprocessSpec(fs=None, **NONE), where="rec.hea")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("rec.hea" in m and "lead aVR" in m and "50%" in m for m in msgs), msgs
    assert not any("lead aVL" in m for m in msgs)


def test_all_nan_and_flat_leads_are_masked_out():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 1000)).astype(np.float32)
    x[2] = np.nan                    # missing lead
    x[7] = 0.3                       # flat (disconnected electrode, constant offset)
    x[8] = 0.3 + 1e-6 * rng.standard_normal(1000)   # below flat_threshold
    mask_in = np.ones(12, bool)
    mask_in[11] = False              # absent in the input: stays absent and zero
    x[11] = 5.0
    y, _, mask = preprocess_signal(x, 100.0, mask_in, PreprocessSpec(fs=None))
    assert mask.tolist() == [i not in (2, 7, 8, 11) for i in range(12)]
    assert (y[~mask] == 0).all() and np.isfinite(y).all()
    assert mask_in[2]                # the caller's mask is not modified


def test_zscore_and_robust_normalisation_per_lead():
    rng = np.random.default_rng(2)
    scale = np.arange(1, 13, dtype=np.float32)[:, None]
    x = (rng.standard_normal((12, 3000)) * scale + 3 * scale).astype(np.float32)
    mask = np.ones(12, bool)
    mask[5] = False
    y, _, m = preprocess_signal(x, 100.0, mask, PreprocessSpec(fs=None, highpass=None, clip=None))
    np.testing.assert_allclose(y[m].mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(y[m].std(1), 1, atol=1e-3)
    assert (y[5] == 0).all()
    r, _, _ = preprocess_signal(x, 100.0, mask, PreprocessSpec(fs=None, highpass=None, clip=None,
                                                                normalize="robust"))
    np.testing.assert_allclose(np.median(r[m], axis=1), 0, atol=1e-4)
    q75, q25 = np.percentile(r[m], [75, 25], axis=1)
    np.testing.assert_allclose((q75 - q25) / 1.349, 1, atol=1e-3)
    c, _, _ = preprocess_signal(x, 100.0, mask, PreprocessSpec(fs=None, highpass=None, clip=0.5))
    assert np.abs(c).max() <= 0.5


def test_output_is_float32_contiguous_for_float64_input():
    x = np.random.default_rng(3).standard_normal((12, 500))          # float64
    y, _, _ = preprocess_signal(x, 100.0, np.ones(12, bool), PreprocessSpec())
    assert y.dtype == np.float32 and y.flags.c_contiguous


def test_preprocess_record_keeps_metadata_and_resamples_evidence():
    evidence = np.zeros((12, 5000), bool)
    evidence[1, 1000:1500] = True
    sig = np.random.default_rng(4).standard_normal((12, 5000))
    rec = _record(sig, 500.0, evidence=evidence, header={"path": "/data/r1.hea"}, labels=("AF",))
    out = preprocess_record(rec, PreprocessSpec(fs=100.0))
    assert out.fs == 100.0 and out.signal.shape == (12, 1000) and out.labels == ("AF",)
    assert out.header["fs_original"] == 500.0 and out.header["path"] == "/data/r1.hea"
    assert out.evidence.shape == (12, 1000)
    assert np.flatnonzero(out.evidence[1]).tolist() == list(range(200, 300))
    assert not out.evidence[[0, *range(2, 12)]].any()


# ---- windows -----------------------------------------------------------------------------------------------

def test_crop_or_pad():
    x = np.arange(2 * 100, dtype=np.float32).reshape(2, 100)
    w, s = crop_or_pad(x, 40)
    assert w.shape == (2, 40) and s == 30 and (w == x[:, 30:70]).all()          # centred
    w, s = crop_or_pad(x, 40, start=90)
    assert s == 60 and (w == x[:, 60:]).all()                                   # clipped into range
    rng = np.random.default_rng(0)
    starts = {crop_or_pad(x, 40, rng=rng)[1] for _ in range(200)}
    assert min(starts) >= 0 and max(starts) <= 60 and len(starts) > 30         # random, in bounds
    w, s = crop_or_pad(x, 130)
    assert w.shape == (2, 130) and s == 0 and (w[:, :100] == x).all() and (w[:, 100:] == 0).all()
    with pytest.raises(ValueError, match="length"):
        crop_or_pad(x, 0)


@pytest.mark.parametrize("t,length,stride", [(1000, 250, 250), (1000, 250, 100), (1003, 250, 250),
                                             (250, 250, 50), (100, 250, 250)])
def test_sliding_windows_cover_the_record(t, length, stride):
    x = np.arange(12 * t, dtype=np.float32).reshape(12, t) + 1.0   # no zeros in the signal
    w = sliding_windows(x, length, stride)
    assert w.shape[1:] == (12, length)
    if t <= length:
        assert w.shape[0] == 1 and (w[0, :, :t] == x).all() and (w[0, :, t:] == 0).all()
        return
    assert w.shape[0] == int(np.ceil((t - length) / stride)) + 1
    covered = np.zeros(t, bool)
    for k, win in enumerate(w):
        start = int(win[0, 0] - 1)                 # recover the start from the values
        assert (win == x[:, start:start + length]).all()
        assert start == (k * stride if k < w.shape[0] - 1 else t - length)
        covered[start:start + length] = True
    assert covered.all()
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(x, length, 0)


# ---- spec --------------------------------------------------------------------------------------------------

def test_spec_round_trip_fingerprint_and_unknown_keys():
    spec = PreprocessSpec(fs=250.0, highpass=0.67, lowpass=40.0, notch=60.0, filter_order=4,
                          normalize="robust", flat_threshold=1e-3, clip=None)
    data = json.loads(json.dumps(spec.to_dict()))
    assert PreprocessSpec.from_dict(data) == spec
    assert PreprocessSpec.from_dict(None) == PreprocessSpec()
    assert spec.fingerprint() == PreprocessSpec.from_dict(data).fingerprint()
    assert spec.fingerprint() != PreprocessSpec().fingerprint() and len(spec.fingerprint()) == 16
    with pytest.raises(ValueError, match="unknown PreprocessSpec keys \\['sampling_rate'\\]"):
        PreprocessSpec.from_dict({**data, "sampling_rate": 100})


@pytest.mark.parametrize("kwargs,match", [
    (dict(normalize="minmax"), "normalize"),
    (dict(fs=0), "fs"),
    (dict(fs=100, lowpass=60), "lowpass"),
    (dict(fs=100, highpass=60, lowpass=None), "highpass=60.0 must be below fs/2=50.0"),   # was skipped silently
    (dict(highpass=-1.0), "highpass"),
    (dict(highpass=5.0, lowpass=4.0), "below lowpass"),
    (dict(notch=0.0), "notch"),
    (dict(filter_order=0), "filter_order"),
])
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessSpec(**kwargs)


# ---- errors ------------------------------------------------------------------------------------------------

def test_errors_name_the_record_and_the_problem():
    with pytest.raises(ECGDataError, match="zero-length"):
        preprocess_signal(np.zeros((12, 0), np.float32), 100.0, np.ones(12, bool), PreprocessSpec())
    with pytest.raises(ECGDataError, match="r1.hea: no usable lead"):
        preprocess_record(_record(np.full((12, 500), np.nan), 100.0, header={"path": "r1.hea"}),
                          PreprocessSpec())
    with pytest.raises(ECGDataError, match="too short"):
        preprocess_signal(np.random.default_rng(0).standard_normal((12, 20)), 500.0, np.ones(12, bool),
                          PreprocessSpec(fs=100.0))
    with pytest.raises(ECGDataError, match="test/r1"):      # no path in the header: the record key
        preprocess_record(_record(np.zeros((12, 500)), 100.0), PreprocessSpec())


def test_annotations_follow_the_resampling():
    """R peaks, beat samples and AF episode bounds are sample positions: at 200 -> 100 Hz they halve (they kept
    the 200 Hz positions, so RR intervals doubled and half the peaks lay past the end); symbols stay as they are."""
    sig = np.tile(_sine(1.0, 200, 10.0), (12, 1))
    ann = {"r_peaks": np.array([10, 1001, 1999], dtype=np.int64), "symbol": np.array(["N", "V", "N"]),
           "af_episodes": [[400, 1999]], "sample": np.array([-1, 600], dtype=np.int64)}
    out = preprocess_record(_record(sig, 200.0, annotations=ann), PreprocessSpec(fs=100, **NONE))
    assert out.fs == 100.0 and out.n_samples == 1000
    assert out.annotations["r_peaks"].tolist() == [5, 500, 999] and out.annotations["r_peaks"].dtype == np.int64
    assert out.annotations["symbol"].tolist() == ["N", "V", "N"]
    assert out.annotations["af_episodes"] == [[200, 999]]
    assert out.annotations["sample"].tolist() == [-1, 300]                   # a sentinel is not a position
    same = preprocess_record(_record(sig, 200.0, annotations=ann), PreprocessSpec(fs=200, **NONE))
    assert same.annotations["r_peaks"].tolist() == [10, 1001, 1999]


def test_spec_leads_keep_only_those_leads_and_old_fingerprints_stay():
    """PreprocessSpec.leads: the other leads are absent before any step (a record-scope z-score over the kept leads
    only); a spec without it keeps the dict and fingerprint it had (cache keys unchanged)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 500)).astype(np.float32) * np.arange(1, 13, dtype=np.float32)[:, None]
    base = dict(fs=None, highpass=None, lowpass=None, notch=None, normalize="zscore", normalize_scope="record",
                clip=None)
    out, _, mask = preprocess_signal(x, 100.0, np.ones(12, bool), PreprocessSpec(**base, leads=["II", "I"]))
    assert mask.tolist() == [True, True] + [False] * 10 and (out[2:] == 0).all()
    both = out[:2]
    assert abs(float(both.mean())) < 1e-5 and abs(float(both.std()) - 1.0) < 1e-4      # stats over I and II only
    spec = PreprocessSpec(**base, leads=("I", "II"))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["leads"] == ["I", "II"]
    assert "leads" not in PreprocessSpec().to_dict()
    assert PreprocessSpec().fingerprint() == PreprocessSpec(leads=None).fingerprint()
    with pytest.raises(ValueError, match="canonical lead names"):
        PreprocessSpec(leads=["I", "X"])
    with pytest.raises(ECGDataError, match="none of the leads"):
        preprocess_signal(x, 100.0, np.eye(12, dtype=bool)[5], PreprocessSpec(**base, leads=["I"]))


def test_a_filter_that_cannot_act_at_a_records_own_rate_is_named_in_its_header(caplog):
    """fs=None keeps each record's rate: a 50 Hz notch (or a 60 Hz low-pass) cannot act on a 100 Hz record and was
    skipped while header['preprocessed'] said it ran. Now the record says which did not, and a warning says so."""
    from ecgfm.data.preprocess import filters_not_acting, preprocess_record

    rng = np.random.default_rng(0)
    spec = PreprocessSpec(fs=None, highpass=0.5, lowpass=60.0, notch=50.0, normalize="none")
    slow = preprocess_record(_record(rng.standard_normal((12, 1000)), 100.0), spec)
    fast = preprocess_record(_record(rng.standard_normal((12, 5000)), 500.0), spec)
    assert slow.header["filters_not_applied"] == [
        "lowpass=60 Hz (at or above the Nyquist frequency 50 Hz of a 100 Hz record)",
        "notch=50 Hz (at or above the Nyquist frequency 50 Hz of a 100 Hz record)"]
    assert "filters_not_applied" not in fast.header
    assert "cannot act and was not applied" in caplog.text
    assert filters_not_acting(PreprocessSpec(fs=100.0, highpass=0.5, lowpass=40.0), 100.0) == []
