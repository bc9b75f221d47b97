"""The handcrafted baseline: R-peaks, RR / HRV and basic morphology features per record, for a linear probe.

An honest table needs a row that owes nothing to pretraining: ``python probe.py checkpoint=handcrafted task=...``
puts a logistic regression on the features below in the same table, with the same splits, label fractions,
bootstrap CIs and paired comparisons as the encoder rows (:mod:`ecgfm.evaluate.sweep`).

Per record of a task cache (the preprocessed signal at the cache's rate, :meth:`CorpusCache.signal`):

1. the analysed lead is II when present, else the first present lead (CinC 2017: its single lead);
2. neurokit2 (Makowski et al. 2021, "NeuroKit2: A Python toolbox for neurophysiological signal processing")
   corrects an inverted polarity (``nk.ecg_invert``), cleans (``nk.ecg_clean``) and finds the R-peaks
   (``nk.ecg_peaks``, method ``neurokit``); each peak is moved to the local maximum of the cleaned signal within
   50 ms and refined to sub-sample precision by a parabola through its three samples (at 100 Hz a 10 ms grid
   would otherwise dominate RMSSD / pNN50 of regular rhythms);
3. features (:data:`FEATURE_NAMES`), RR intervals in seconds:

   * rate / RR: beats per minute by count, mean / median RR, heart rate, SDNN, CV, RR percentiles 5-95 and IQR / MAD
     relative to the median RR, min / max relative RR, Shannon entropy of the relative-RR histogram;
   * irregularity (successive differences, the classic AF markers): RMSSD (absolute and relative to the mean RR),
     SD of the differences, mean absolute difference relative to the mean RR, pNN20, pNN50, share of successive
     differences above 10 % of the preceding interval, Poincare SD1 / SD2 and their ratio, turning-point ratio.
     Standard deviations are population SDs (ddof 0; neurokit2 / Kubios use ddof 1: SDNN 25.2 vs 26.6 ms on 10
     intervals). SD1 is the Poincare SD1 exactly (SD of successive differences / sqrt 2); SD2 is estimated through
     the identity SD2^2 = 2 SDNN^2 - SD1^2 (clipped at 0), which equals the Poincare SD2 (SD of
     (RR_n + RR_n+1) / sqrt 2) for long series but not on short ones: on the 100 PTB-XL fixture records (10 s,
     a median of 10 intervals) the two differ by a median 5.8 % (90th percentile 22 %), on CinC 2017's 9-61 s
     records less. Kept as defined in feature version hc-1 (review of 2026-12-07): the committed handcrafted rows
     and the handcrafted pretext targets of the SimCLR-CNN encoders were computed with it, and a new definition
     needs a new FEATURE_VERSION (every feature cache, pretext target file and cell recomputed);
   * morphology: beats cut from 0.25 s before to 0.45 s after each R-peak, template = median beat; R amplitude mean
     and CV, beat-to-template correlation (mean, 10th percentile, minimum, share below 0.8), residual RMS relative
     to the R amplitude, P-region (0.25-0.05 s before R) correlation with the template's P region and the
     template's P-region SD relative to R, QRS width at half the R amplitude, T-region (0.1-0.45 s after R) peak
     relative to R.

   Missing values are explicit, never NaN: a group that cannot be computed (fewer than 3 beats for RR, fewer than
   4 for successive differences, fewer than 3 complete beats for morphology) is filled with 0 and flagged by its
   indicator column (``missing_rr``, ``missing_drr``, ``missing_morph``) in the cached features. The probe never
   scores those 0s: per training subset it replaces a flagged group's values by the medians of that subset's
   records where the group is present, fitted on the training rows only, as its scaler is (:func:`missing_groups`,
   :class:`ecgfm.evaluate.probe.GroupMedianImputer`; the handcrafted row and the
   ``probe.side_features=handcrafted`` rows alike), and keeps the indicator columns. A record without beats is
   then scored at typical values plus its indicator's weight. That weight carries the "no beats" signal only when
   some training record had the group missing; where none had (all 2,558 CinC 2017 records and the PTB-XL
   fixture's 100 have every group), the indicator is constant in training, its weight about 0, and the record gets
   the prediction of a typical one. The bare 0 fill standardised to 5-12 SDs below the training means (mean RR
   0 s) and gave such records a confident made-up class (2026-12-08 review). On data without missing groups the
   imputation changes nothing.

The features of a cache are computed once and cached on disk like encoder features (:mod:`ecgfm.evaluate.features`:
a :class:`~ecgfm.evaluate.features.FeatureSet` with one "window" per record, written atomically, validated on
read), keyed by the cache fingerprint, :data:`FEATURE_VERSION` and the neurokit2 version. Cost: 11-16 ms per
record on one busy core (CinC 2017 at 100 Hz, records 9-61 s: 2,558 records in 40.5 s; neurokit2's polarity check,
cleaning and peak detection are ~85 % of it; the features themselves are vectorised over beats).
neurokit2 is imported only when features are computed (``pip install neurokit2``).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ecgfm.evaluate.features import (NONFINITE_MODES, FeatureSet, _load_features, _nonfinite_error, _rows,
                                     _save_features, cache_fingerprint)
from ecgfm.io import atomic_write, atomic_write_bytes, file_lock

log = logging.getLogger(__name__)

#: the ``checkpoint`` keyword of probe.py for this baseline, and the method label of its rows.
KEYWORD = "handcrafted"
METHOD = "handcrafted (RR/HRV + morphology)"
#: bump when a feature's definition changes: cached features and results cells are then recomputed.
FEATURE_VERSION = "hc-1"
#: bump when the pretext targets' standardisation changes (their files are then written again)
PRETEXT_VERSION = "pt-1"

RR_FEATURES = ("mean_rr", "median_rr", "hr_mean", "sdnn", "cv_rr", "rr_p5_rel", "rr_p25_rel", "rr_p75_rel",
               "rr_p95_rel", "rr_iqr_rel", "rr_mad_rel", "rr_min_rel", "rr_max_rel", "rr_entropy")
DRR_FEATURES = ("rmssd", "rmssd_rel", "sd_drr", "mean_abs_drr_rel", "pnn20", "pnn50", "frac_drr_gt10pct", "sd1",
                "sd2", "sd1_sd2", "tpr")
MORPH_FEATURES = ("r_amp_mean", "r_amp_cv", "tmpl_corr_mean", "tmpl_corr_p10", "tmpl_corr_min",
                  "frac_corr_below_0p8", "resid_rms_rel", "p_corr_mean", "p_tmpl_sd_rel", "qrs_width_s",
                  "t_peak_rel")
ALWAYS_FEATURES = ("beats_per_min_count",)
INDICATORS = ("missing_rr", "missing_drr", "missing_morph")
FEATURE_NAMES: tuple[str, ...] = ALWAYS_FEATURES + RR_FEATURES + DRR_FEATURES + MORPH_FEATURES + INDICATORS
#: the columns that a crop-level pretext target (:class:`CropRhythmTargets`) recomputes from the crop's own beats;
#: the morphology columns stay record-level
RHYTHM_FEATURES: tuple[str, ...] = ALWAYS_FEATURES + RR_FEATURES + DRR_FEATURES + ("missing_rr", "missing_drr")
_GROUPS = ((RR_FEATURES, "missing_rr"), (DRR_FEATURES, "missing_drr"), (MORPH_FEATURES, "missing_morph"))

#: counters of real work done in this process: ``extractions`` (feature passes over a cache), ``records``,
#: ``cache_hits`` (feature sets loaded from disk), ``seconds``, ``pretext_hits`` (pretext target files reused).
STATS: collections.Counter = collections.Counter()

_PRE_S, _POST_S = 0.25, 0.45       # beat window around the R-peak
_MIN_CROP_S = 2.0                   # a crop with less signal than this gets no rhythm targets
_P_REGION_S = (0.25, 0.05)          # P region: from 0.25 s to 0.05 s before R
_T_REGION_S = (0.10, 0.45)          # T region: 0.10 s to 0.45 s after R


def neurokit_version() -> str:
    """The installed neurokit2 version (part of the feature key: peak detection may change between versions)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neurokit2")
    except PackageNotFoundError:
        return "missing"


def _neurokit() -> Any:
    try:
        import neurokit2 as nk
    except ImportError as exc:  # pragma: no cover - neurokit2 is a dependency
        raise ImportError("the handcrafted baseline needs neurokit2: pip install 'neurokit2>=0.2.2'") from exc
    return nk


#: neurokit2's errors that say the installation, not the signal, is wrong (a missing function or module): raised,
#: never read as "no R-peaks" (neurokit2 0.2.0 / 0.2.1 lack ``ecg_invert``; catching this made every record
#: featureless and the handcrafted row chance-level, with exit status 0)
_API_ERRORS = (AttributeError, ImportError, NameError)


@functools.lru_cache(maxsize=None)
def check_neurokit(fs: int = 100) -> int:
    """Self-test, once per process and rate: R-peak detection finds the beats of a clean simulated ECG.

    A neurokit2 that fails on every signal (an incompatible version, a broken dependency) would otherwise give every
    record the "no R-peaks" fill: constant features and a chance-level handcrafted row with exit status 0.

    Args:
        fs: the sampling rate the features are computed at.

    Returns:
        The number of R-peaks found in 10 s at 72 beats per minute (11 or 12).

    Raises:
        RuntimeError: detection raised, or found fewer than 10 or more than 14 peaks.
    """
    nk = _neurokit()
    where = f"neurokit2 {neurokit_version()}"
    try:
        x = np.asarray(nk.ecg_simulate(duration=10, sampling_rate=int(fs), heart_rate=72, noise=0.0,
                                       random_state=0), dtype=np.float64)
        n = len(_detect(nk, x, int(fs))[0])
    except Exception as exc:  # noqa: BLE001 - reported with its type: every failure here is the installation's
        raise RuntimeError(f"{where}: R-peak detection fails on a clean simulated ECG at {fs} Hz "
                           f"({type(exc).__name__}: {exc}); the handcrafted features would all be missing. "
                           f"Install a neurokit2 this code supports: pip install 'neurokit2>=0.2.2'") from exc
    if not 10 <= n <= 14:
        raise RuntimeError(f"{where}: R-peak detection finds {n} peaks in a clean simulated 10 s ECG at 72 beats "
                           f"per minute and {fs} Hz (expected 11-12); the handcrafted features would be wrong")
    return n


def _detect(nk: Any, x: np.ndarray, fs: int) -> tuple[np.ndarray, np.ndarray]:
    """neurokit2's polarity correction, cleaning and R-peaks: ``(peaks (n,) int64, cleaned (T,) float64)``."""
    x, _ = nk.ecg_invert(x, sampling_rate=fs)
    clean = np.asarray(nk.ecg_clean(x, sampling_rate=fs), dtype=np.float64)
    _, info = nk.ecg_peaks(clean, sampling_rate=fs)
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64), clean


def analysed_lead(mask: np.ndarray) -> int:
    """Row of the lead to analyse: II (row 1) when present, else the first present lead (-1: none)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[0] > 1 and mask[1]:
        return 1
    present = np.flatnonzero(mask)
    return int(present[0]) if len(present) else -1


def detect_rpeaks(x: np.ndarray, fs: float, failures: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """R-peaks of one lead with neurokit2, refined to sub-sample positions.

    Args:
        x: ``(T,)`` one lead.
        fs: sampling rate in Hz.
        failures: when given, a neurokit2 error on this signal is appended to it (``"<type>: <message>"``), so that
            the caller can count records whose detection failed rather than found no beat.

    Returns:
        ``(positions (n,) float64 sample positions, cleaned signal (T,) float64 with upright polarity)``; no peaks
        (``n = 0``) when neurokit2 finds none or fails on a degenerate signal.

    Raises:
        AttributeError, ImportError, NameError: neurokit2 lacks a function it is called with (an unsupported
            version): an installation error, never read as a record without beats.
    """
    nk = _neurokit()
    x = np.asarray(x, dtype=np.float64)
    if len(x) < int(2 * fs) or not np.isfinite(x).all() or np.std(x) < 1e-8:
        return np.zeros(0), x
    try:
        peaks, clean = _detect(nk, x, int(round(fs)))
    except _API_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - neurokit2 raises many types on flat / tiny / odd signals
        log.debug("neurokit2 found no R-peaks (%s: %s)", type(exc).__name__, exc)
        if failures is not None:
            failures.append(f"{type(exc).__name__}: {exc}")
        return np.zeros(0), np.asarray(x, dtype=np.float64)
    if len(peaks) == 0:
        return np.zeros(0), clean
    # snap each peak to the local maximum within 50 ms (vectorised over peaks)
    half = max(1, int(round(0.05 * fs)))
    offs = np.arange(-half, half + 1)
    idx = np.clip(peaks[:, None] + offs[None, :], 0, len(clean) - 1)
    peaks = idx[np.arange(len(peaks)), np.argmax(clean[idx], axis=1)]
    peaks = np.unique(peaks)
    # parabolic sub-sample refinement
    inner = (peaks > 0) & (peaks < len(clean) - 1)
    pos = peaks.astype(np.float64)
    p = peaks[inner]
    ym, y0, yp = clean[p - 1], clean[p], clean[p + 1]
    den = ym - 2 * y0 + yp
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where(np.abs(den) > 1e-12, 0.5 * (ym - yp) / den, 0.0)
    pos[inner] += np.clip(delta, -0.5, 0.5)
    return pos, clean


def _rr_features(rr: np.ndarray) -> dict[str, float]:
    med = float(np.median(rr))
    mean = float(np.mean(rr))
    p5, p25, p75, p95 = np.percentile(rr, [5, 25, 75, 95])
    rel = rr / med
    hist, _ = np.histogram(np.clip(rel, 0.5, 1.5), bins=16, range=(0.5, 1.5))
    prob = hist[hist > 0] / len(rel)
    return {"mean_rr": mean, "median_rr": med, "hr_mean": 60.0 / mean, "sdnn": float(np.std(rr)),
            "cv_rr": float(np.std(rr)) / mean, "rr_p5_rel": p5 / med, "rr_p25_rel": p25 / med,
            "rr_p75_rel": p75 / med, "rr_p95_rel": p95 / med, "rr_iqr_rel": (p75 - p25) / med,
            "rr_mad_rel": float(np.median(np.abs(rr - med))) / med, "rr_min_rel": float(rr.min()) / med,
            "rr_max_rel": float(rr.max()) / med, "rr_entropy": float(-(prob * np.log2(prob)).sum() / 4.0)}


def _drr_features(rr: np.ndarray) -> dict[str, float]:
    d = np.diff(rr)
    mean = float(np.mean(rr))
    rmssd = float(np.sqrt(np.mean(d ** 2)))
    sd1 = float(np.std(d) / np.sqrt(2.0))
    sd2 = float(np.sqrt(max(2 * np.var(rr) - 0.5 * np.var(d), 0.0)))
    mid = rr[1:-1]
    turning = ((mid > rr[:-2]) & (mid > rr[2:])) | ((mid < rr[:-2]) & (mid < rr[2:]))
    return {"rmssd": rmssd, "rmssd_rel": rmssd / mean, "sd_drr": float(np.std(d)),
            "mean_abs_drr_rel": float(np.mean(np.abs(d))) / mean, "pnn20": float(np.mean(np.abs(d) > 0.02)),
            "pnn50": float(np.mean(np.abs(d) > 0.05)), "frac_drr_gt10pct": float(np.mean(np.abs(d) > 0.1 * rr[:-1])),
            "sd1": sd1, "sd2": sd2, "sd1_sd2": sd1 / max(sd2, 0.005),  # SD2 under 5 ms is timing noise
            # turning-point ratio: 2/3 of the inner points for a random series, fewer for a regular drift
            "tpr": float(np.mean(turning)) if len(mid) else 0.0}


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``a`` ``(n, L)`` with ``b`` ``(L,)`` (0 for a constant row)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean()
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    return np.where(den > 1e-12, a @ b / np.maximum(den, 1e-12), 0.0)


def _morph_features(clean: np.ndarray, peaks: np.ndarray, fs: float) -> dict[str, float] | None:
    pre, post = int(round(_PRE_S * fs)), int(round(_POST_S * fs))
    centre = np.round(peaks).astype(np.int64)
    keep = (centre - pre >= 0) & (centre + post < len(clean))
    centre = centre[keep]
    if len(centre) < 3:
        return None
    beats = clean[centre[:, None] + np.arange(-pre, post + 1)[None, :]]           # (n, L)
    beats = beats - np.median(beats, axis=1, keepdims=True)
    r_amp = beats[:, pre]
    tmpl = np.median(beats, axis=0)
    t_r = float(tmpl[pre])
    scale = max(abs(t_r), 1e-6)
    corr = _corr_rows(beats, tmpl)
    resid = np.sqrt(np.mean((beats - tmpl[None, :]) ** 2, axis=1)) / scale
    p0, p1 = pre - int(round(_P_REGION_S[0] * fs)), pre - int(round(_P_REGION_S[1] * fs))
    p_corr = _corr_rows(beats[:, p0:p1], tmpl[p0:p1]) if p1 - p0 >= 3 else np.zeros(len(beats))
    above = tmpl >= 0.5 * t_r
    lo = pre
    while lo > 0 and above[lo - 1]:
        lo -= 1
    hi = pre
    while hi < len(tmpl) - 1 and above[hi + 1]:
        hi += 1
    t0, t1 = pre + int(round(_T_REGION_S[0] * fs)), min(pre + int(round(_T_REGION_S[1] * fs)), len(tmpl) - 1)
    t_region = tmpl[t0:t1 + 1]
    amp_mean = float(np.mean(r_amp))
    return {"r_amp_mean": amp_mean, "r_amp_cv": float(np.std(r_amp)) / max(abs(amp_mean), 1e-6),
            "tmpl_corr_mean": float(np.mean(corr)), "tmpl_corr_p10": float(np.percentile(corr, 10)),
            "tmpl_corr_min": float(corr.min()), "frac_corr_below_0p8": float(np.mean(corr < 0.8)),
            "resid_rms_rel": float(np.mean(resid)), "p_corr_mean": float(np.mean(p_corr)),
            "p_tmpl_sd_rel": float(np.std(tmpl[p0:p1])) / scale if p1 > p0 else 0.0,
            "qrs_width_s": (hi - lo + 1) / fs,
            "t_peak_rel": float(t_region[np.argmax(np.abs(t_region))]) / scale if len(t_region) else 0.0}


def _rhythm_values(peaks: np.ndarray, fs: float, duration: float) -> dict[str, float]:
    """The beat-count, RR and successive-difference features of the R-peaks ``peaks`` (sample positions) of a
    stretch ``duration`` seconds long; a group that cannot be computed is absent from the dict."""
    out = {"beats_per_min_count": 60.0 * len(peaks) / max(duration, 1e-9)}
    rr = np.diff(peaks) / float(fs)
    if len(rr) >= 2:
        out.update(_rr_features(rr))
    if len(rr) >= 3:
        out.update(_drr_features(rr))
    return out


def raw_features(x: np.ndarray, fs: float, failures: list[str] | None = None) -> np.ndarray:
    """Features of one lead before missing values are filled: ``(len(FEATURE_NAMES),)`` float64 with NaN for
    every feature of a group that cannot be computed (indicator columns are NaN here too; see
    :func:`fill_missing`).

    Args:
        x: ``(T,)`` one lead of a preprocessed record.
        fs: its sampling rate in Hz.
        failures: collects a neurokit2 error on this lead (:func:`detect_rpeaks`).
    """
    out = dict.fromkeys(FEATURE_NAMES, np.nan)
    peaks, clean = detect_rpeaks(x, fs, failures)
    out.update(_rhythm_values(peaks, fs, len(x) / float(fs)))
    morph = _morph_features(clean, peaks, fs) if len(peaks) >= 3 else None
    if morph is not None:
        out.update(morph)
    return np.array([out[k] for k in FEATURE_NAMES], dtype=np.float64)


def fill_missing(raw: np.ndarray) -> np.ndarray:
    """``(N, F)`` raw features -> finite float32 features: each group with any non-finite value is set to 0 and
    its indicator to 1 (else 0). Vectorised over records. The 0s are placeholders for the cache, never scored:
    the probe replaces them by training medians (:func:`missing_groups`)."""
    raw = np.atleast_2d(np.asarray(raw, dtype=np.float64)).copy()
    col = {k: j for j, k in enumerate(FEATURE_NAMES)}
    for names, flag in _GROUPS:
        cols = [col[k] for k in names]
        missing = ~np.isfinite(raw[:, cols]).all(axis=1)
        raw[np.ix_(missing, cols)] = 0.0
        raw[:, col[flag]] = missing.astype(np.float64)
    for k in ALWAYS_FEATURES:
        j = col[k]
        raw[~np.isfinite(raw[:, j]), j] = 0.0
    assert np.isfinite(raw).all()
    return raw.astype(np.float32)


def record_features(signal: np.ndarray, mask: np.ndarray, fs: float, failures: list[str] | None = None
                    ) -> np.ndarray:
    """Filled features ``(len(FEATURE_NAMES),)`` of one record ``(12, T)`` (lead :func:`analysed_lead`);
    ``failures`` collects a neurokit2 error on it (:func:`detect_rpeaks`)."""
    lead = analysed_lead(mask)
    if lead < 0:
        return fill_missing(np.full(len(FEATURE_NAMES), np.nan))[0]
    return fill_missing(raw_features(signal[lead], fs, failures))[0]


def missing_groups(offset: int = 0) -> tuple[tuple[tuple[int, ...], int], ...]:
    """The feature groups that :func:`fill_missing` fills, as columns of a feature matrix whose handcrafted block
    (:data:`FEATURE_NAMES`) starts at column ``offset``: ``((value columns, indicator column), ...)`` for the RR,
    successive-difference and morphology groups. What :class:`ecgfm.evaluate.probe.ProbeData` takes as
    ``missing_groups``, so that the probe imputes a flagged group from its training rows.

    Args:
        offset: the column of the first handcrafted feature (0 for ``checkpoint=handcrafted``; the encoder's
            record-feature width for ``probe.side_features=handcrafted``, whose block comes last).

    Raises:
        ValueError: a negative ``offset``.
    """
    if int(offset) < 0:
        raise ValueError(f"missing_groups: the handcrafted block's first column must be >= 0, got offset={offset}")
    col = {k: int(offset) + j for j, k in enumerate(FEATURE_NAMES)}
    return tuple((tuple(col[k] for k in names), col[flag]) for names, flag in _GROUPS)


def missing_counts(features: np.ndarray) -> dict[str, int]:
    """How many records (rows of ``(N, len(FEATURE_NAMES))`` filled features) had each feature group filled
    (their indicator set): ``{"records": N, "missing_rr": ..., "missing_drr": ..., "missing_morph": ...}``."""
    f = np.atleast_2d(np.asarray(features))
    out = {"records": int(len(f))}
    for flag in INDICATORS:
        out[flag] = int((f[:, FEATURE_NAMES.index(flag)] > 0.5).sum()) if len(f) else 0
    return out


def split_missing_counts(features: FeatureSet, splits: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """:func:`missing_counts` of each split's records (``splits``: name -> cache rows) in a handcrafted
    :class:`~ecgfm.evaluate.features.FeatureSet` (one row per record, ``features.record`` its cache row)."""
    return {name: missing_counts(features.features[np.isin(features.record, np.asarray(rows, dtype=np.int64))])
            for name, rows in splits.items()}


#: a share of records above this without R-peaks / beats is logged as a warning
MISSING_WARN_SHARE = 0.05
#: neurokit2 raising on this share of the records (and at least MIN_FAILED of them) stops the extraction
FAILED_ERROR_SHARE, MIN_FAILED = 0.5, 5


def _report_missing(cache: Any, features: np.ndarray, owners: Sequence[int], failed: dict[int, str]) -> None:
    """Log how many records had feature groups filled and how many neurokit2 failed on; raise when neurokit2
    failed on most of them (the installation, not the records, is then at fault)."""
    where = getattr(cache, "path", "cache")
    keys = getattr(cache, "keys", None)

    def name(row: int) -> str:
        return str(keys[row]) if keys is not None else str(row)

    n = len(owners)
    if n and len(failed) >= MIN_FAILED and len(failed) >= FAILED_ERROR_SHARE * n:
        first = [(name(r), err) for r, err in list(failed.items())[:3]]
        raise RuntimeError(f"{where}: neurokit2 {neurokit_version()} failed on {len(failed)} of {n} records "
                           f"(e.g. record {first[0][0]}: {first[0][1]}); the handcrafted features would be the "
                           f"'no R-peaks' fill for them. Records: {', '.join(r for r, _ in first)}")
    counts = missing_counts(features)
    share = max((counts[k] for k in INDICATORS), default=0) / max(n, 1)
    level = logging.WARNING if share > MISSING_WARN_SHARE or failed else logging.INFO
    names = [name(int(owners[j])) for j in np.flatnonzero(features[:, FEATURE_NAMES.index("missing_rr")] > 0.5)[:5]]
    log.log(level, "handcrafted features of %s: feature groups filled with 0 + indicator (too few beats) for %d "
            "(RR) / %d (successive differences) / %d (morphology) of %d records%s%s", where, counts["missing_rr"],
            counts["missing_drr"], counts["missing_morph"], n,
            f"; neurokit2 raised on {len(failed)} (e.g. {next(iter(failed.values()))})" if failed else "",
            f"; first without RR: {', '.join(names)}" if names else "")


def extract_handcrafted(cache: Any, rows: np.ndarray | None = None, nonfinite: str = "error") -> FeatureSet:
    """Handcrafted features of every record (or ``rows``) of ``cache``; no disk cache.

    Args:
        cache: a :class:`~ecgfm.data.cache.CorpusCache` (``signal(i)``, ``lead_mask(i)``, ``fs``).
        rows: records to featurise (default all).
        nonfinite: a record whose signal holds NaN / Inf raises
            :class:`~ecgfm.data.cache.NonFiniteDataError` naming it (``"error"``), or is left out and listed in
            ``FeatureSet.skipped`` (``"skip"``).

    Returns:
        :class:`FeatureSet` with one row ("window") per record, ``features (n, len(FEATURE_NAMES))``.

    Raises:
        ValueError: the cache mixes sampling rates (``cache.fs`` is None).
    """
    _check_nonfinite(nonfinite)
    fs = getattr(cache, "fs", None)
    if fs is None:
        raise ValueError(f"{getattr(cache, 'path', 'cache')}: mixes sampling rates (preprocess.fs null); the "
                         f"handcrafted features need one rate")
    fs = float(fs)
    t0 = time.perf_counter()
    rows = _rows(cache, rows)
    check_neurokit(int(round(fs)))    # an unsupported neurokit2 fails here, not as "no R-peaks" on every record
    feats, owners, skipped = [], [], []
    failed: dict[int, str] = {}
    for n, i in enumerate(rows):
        signal = cache.signal(int(i))
        if not np.isfinite(signal).all():
            if nonfinite == "error":
                raise _nonfinite_error(cache, [int(i)], "the input signal")
            skipped.append(int(i))
            continue
        mask = cache.lead_mask(int(i)) if hasattr(cache, "lead_mask") else np.abs(signal).sum(axis=1) > 0
        errors: list[str] = []
        feats.append(record_features(signal, mask, fs, errors))
        owners.append(int(i))
        if errors:
            failed[int(i)] = errors[0]
        if (n + 1) % 500 == 0:
            log.info("handcrafted features: %d/%d records in %.0f s", n + 1, len(rows), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    stacked = np.stack(feats) if feats else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    _report_missing(cache, stacked, owners, failed)
    out = FeatureSet(features=stacked,
                     record=np.asarray(owners, dtype=np.int64), n_records=len(cache), seconds=seconds,
                     skipped=np.asarray(skipped, dtype=np.int64))
    STATS["extractions"] += 1
    STATS["records"] += len(owners)
    STATS["seconds"] += seconds
    log.info("handcrafted features (%s, %d features) of %d records at %g Hz in %.1f s = %.1f ms/record",
             FEATURE_VERSION, len(FEATURE_NAMES), len(rows), fs, seconds, 1000 * seconds / max(len(rows), 1))
    return out


def handcrafted_key(cache: Any) -> str:
    """Feature-cache key: cache fingerprint + :data:`FEATURE_VERSION` + neurokit2 version."""
    text = f"{KEYWORD}|{FEATURE_VERSION}|nk{neurokit_version()}|{cache_fingerprint(cache)}"
    return "hc-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _cached_features(cache: Any, path: Path, key: str, nonfinite: str) -> FeatureSet | None:
    """The valid feature file ``path`` of ``cache`` (None: absent, or invalid and to be recomputed)."""
    if not path.exists():
        return None
    try:
        fs = _load_features(path, key, len(cache), 0, 0)
        if fs.dim != len(FEATURE_NAMES):
            raise ValueError(f"{fs.dim} features, expected {len(FEATURE_NAMES)}")
    except ValueError as exc:
        log.warning("handcrafted feature cache %s: %s; recomputing it", path, exc)
        return None
    if len(fs.skipped) and nonfinite == "error":
        raise _nonfinite_error(cache, fs.skipped, "the input (feature cache written with nonfinite='skip')")
    STATS["cache_hits"] += 1
    return fs


def _check_nonfinite(nonfinite: str) -> None:
    """Only ``"error"`` and ``"skip"``: any other spelling ("Error") used to skip damaged records silently."""
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")


def cached_handcrafted(cache: Any, feature_dir: str | os.PathLike, nonfinite: str = "error") -> FeatureSet:
    """:func:`extract_handcrafted` behind the on-disk feature cache (``<feature_dir>/<handcrafted_key>.npz``,
    the encoder features' format with window = stride = 0). An unreadable or invalid file is recomputed.

    Processes that need the same features at once (the DDP ranks of a pretraining run with handcrafted pretext
    targets, parallel probe jobs) extract them once: the first takes a lock per key, the others wait for it and
    read its file."""
    _check_nonfinite(nonfinite)
    key = handcrafted_key(cache)
    path = Path(feature_dir) / f"{key}.npz"
    fs = _cached_features(cache, path, key, nonfinite)
    if fs is not None:
        return fs
    with file_lock(Path(feature_dir) / f".{key}.lock", blocking=True):
        fs = _cached_features(cache, path, key, nonfinite)   # written by another process while this one waited
        if fs is not None:
            return fs
        fs = extract_handcrafted(cache, nonfinite=nonfinite)
        fs.key = key
        _save_features(path, fs, 0, 0)
    return fs


def pretext_targets(caches: Sequence[Any], feature_dir: str | os.PathLike, max_seconds: float = 60.0,
                    clip: float = 5.0, nonfinite: str = "error") -> np.ndarray:
    """Standardised handcrafted features of every record of a pretraining pool, as self-supervised targets.

    A pretraining method may regress these from its crops' embeddings (``SimCLRModule(aux_targets=
    "handcrafted")``): the targets are computed from the signal alone (no label), like MaskFeat's HOG targets
    (Wei et al. 2022, "Masked feature prediction for self-supervised visual pre-training"), and ask the encoder to
    keep the beat-timing and morphology statistics that rhythm classes depend on. Every entry is record-level; a
    crop is shorter than its record, so records longer than ``max_seconds`` (Holter-like recordings whose rhythm
    may change) get no target.

    Per column: robust standardisation over the records that have a value (median, IQR / 1.349; the SD where the
    IQR is 0, e.g. a rarely set indicator; only centred where both are 0), clipped to ``[-clip, clip]`` so that
    a few extreme records do not dominate the squared error. Unknown entries are NaN
    (:func:`ecgfm.losses.masked_target_mse` skips them): a feature
    group flagged missing by its indicator, a record too long, a record skipped for non-finite input.

    Args:
        caches: the pool's caches in :class:`~ecgfm.data.datamodules.CachePool` order.
        feature_dir: on-disk cache of the handcrafted features (:func:`cached_handcrafted`).
        max_seconds: longest record that gets targets.
        clip: bound of the standardised values.
        nonfinite: ``"error"`` or ``"skip"`` (see :func:`extract_handcrafted`).

    Returns:
        ``(N_total, len(FEATURE_NAMES))`` float32.
    """
    _check_nonfinite(nonfinite)
    raw = _pretext_raw(caches, feature_dir, max_seconds, clip, nonfinite)
    center, scale = _robust_scale(raw)
    out = _standardise(raw, center, scale, clip)
    n_rows = int(np.isfinite(out).any(axis=1).sum())
    log.info("handcrafted pretext targets: %d of %d records, %.0f %% of the entries known", n_rows, len(out),
             100.0 * float(np.isfinite(out).mean()) if out.size else 0.0)
    return out


def _pretext_raw(caches: Sequence[Any], feature_dir: str | os.PathLike, max_seconds: float, clip: float,
                 nonfinite: str) -> np.ndarray:
    """``(N_total, F)`` float64 record features of the pool before standardisation, NaN where unknown (a group
    flagged missing, a record longer than ``max_seconds`` or skipped)."""
    if max_seconds <= 0 or clip <= 0:
        raise ValueError(f"max_seconds and clip must be > 0, got {max_seconds}, {clip}")
    blocks = []
    for cache in caches:
        feats = cached_handcrafted(cache, feature_dir, nonfinite=nonfinite)
        block = np.full((len(cache), len(FEATURE_NAMES)), np.nan, dtype=np.float64)
        block[feats.record] = feats.features
        for names, indicator in _GROUPS:
            cols = [FEATURE_NAMES.index(n) for n in names]
            missing = block[:, FEATURE_NAMES.index(indicator)] > 0.5
            block[np.ix_(missing, cols)] = np.nan
        seconds = np.asarray(cache.columns()["n_samples"], dtype=np.float64) / float(cache.fs)
        block[seconds > max_seconds] = np.nan
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.zeros((0, len(FEATURE_NAMES)))


def _robust_scale(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``raw (N, F)``, over its finite entries: ``(median, IQR / 1.349)``; the SD where the IQR is
    0, and 1 where both are 0 (or the column has no finite entry)."""
    center, scale = np.zeros(raw.shape[1]), np.ones(raw.shape[1])
    for j in range(raw.shape[1]):
        col = raw[:, j][np.isfinite(raw[:, j])]
        if not len(col):
            continue
        q25, center[j], q75 = np.percentile(col, [25, 50, 75])
        scale[j] = (q75 - q25) / 1.349
        if not scale[j] > 0:
            scale[j] = float(np.std(col)) or 1.0
    return center, scale


def _standardise(raw: np.ndarray, center: np.ndarray, scale: np.ndarray, clip: float) -> np.ndarray:
    """``clip((raw - center) / scale)`` as float32, NaN staying NaN."""
    with np.errstate(invalid="ignore"):
        return np.clip((raw - center) / scale, -clip, clip).astype(np.float32)


def pretext_targets_file(caches: Sequence[Any], feature_dir: str | os.PathLike, max_seconds: float = 60.0,
                         clip: float = 5.0, nonfinite: str = "error") -> Path:
    """:func:`pretext_targets` computed once and kept as ``<feature_dir>/pretext-<key>.npy``, for loaders that
    memory-map it (``np.load(path, mmap_mode="r")``) instead of each process holding (and each spawned loader
    worker receiving) its own copy: ``4 x len(FEATURE_NAMES)`` bytes per record, 160 MB at a million records.

    The key covers every cache's :func:`handcrafted_key` (cache content, feature version, neurokit2 version), the
    order of the caches, ``max_seconds``, ``clip``, ``nonfinite`` and :data:`PRETEXT_VERSION`. The file is
    written atomically under a lock, so the DDP ranks of one run compute the targets once; an unreadable file or
    one of the wrong shape is computed again.

    Returns:
        The ``.npy`` path: ``(N_total, len(FEATURE_NAMES))`` float32, NaN where unknown.
    """
    text = "|".join([PRETEXT_VERSION, *(handcrafted_key(c) for c in caches), f"{float(max_seconds):g}",
                     f"{float(clip):g}", nonfinite])
    path = Path(feature_dir) / f"pretext-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npy"
    shape = (sum(len(c) for c in caches), len(FEATURE_NAMES))

    def valid() -> bool:
        if not path.exists():
            return False
        try:
            t = np.load(path, mmap_mode="r", allow_pickle=False)
            if t.dtype != np.float32 or t.shape != shape:
                raise ValueError(f"{t.dtype} {t.shape}, expected float32 {shape}")
        except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty file
            log.warning("pretext targets %s: %s; computing them again", path, exc)
            return False
        STATS["pretext_hits"] += 1
        return True

    if valid():
        return path
    with file_lock(Path(feature_dir) / f".{path.stem}.lock", blocking=True):
        if valid():
            return path
        targets = pretext_targets(caches, feature_dir, max_seconds=max_seconds, clip=clip, nonfinite=nonfinite)
        buf = io.BytesIO()
        np.save(buf, targets, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    return path


def rpeaks_key(cache: Any) -> str:
    """R-peak cache key: cache fingerprint + :data:`FEATURE_VERSION` (the detection is the features') + neurokit2."""
    text = f"rpeaks|{FEATURE_VERSION}|nk{neurokit_version()}|{cache_fingerprint(cache)}"
    return "rp-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def record_rpeaks(cache: Any, nonfinite: str = "error") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R-peaks (:func:`detect_rpeaks`) of the analysed lead of every record of ``cache``, ragged.

    Args:
        cache: a :class:`~ecgfm.data.cache.CorpusCache` with one sampling rate.
        nonfinite: ``"error"`` (a record with NaN / Inf raises, naming it) or ``"skip"`` (it is not ``known``).

    Returns:
        ``(offsets (N + 1,) int64, positions (P,) float64, known (N,) bool, skipped (N,) bool)``: record ``i``'s
        peaks, in samples at ``cache.fs`` and increasing, are ``positions[offsets[i]:offsets[i + 1]]``;
        ``known[i]`` is False for a record without a present lead or skipped for a non-finite signal
        (``skipped[i]``): its rhythm is unknown, not "no beats".
    """
    _check_nonfinite(nonfinite)
    fs = getattr(cache, "fs", None)
    if fs is None:
        raise ValueError(f"{getattr(cache, 'path', 'cache')}: mixes sampling rates (preprocess.fs null); R-peaks "
                         f"need one rate")
    check_neurokit(int(round(float(fs))))
    t0 = time.perf_counter()
    offsets = np.zeros(len(cache) + 1, dtype=np.int64)
    known, skipped = np.zeros(len(cache), dtype=bool), np.zeros(len(cache), dtype=bool)
    parts = []
    for i in range(len(cache)):
        signal = cache.signal(i)
        lead = analysed_lead(cache.lead_mask(i))
        if not np.isfinite(signal).all():
            if nonfinite == "error":
                raise _nonfinite_error(cache, [i], "the input signal")
            lead, skipped[i] = -1, True
        pos = detect_rpeaks(signal[lead], float(fs))[0] if lead >= 0 else np.zeros(0)
        known[i] = lead >= 0
        parts.append(pos)
        offsets[i + 1] = offsets[i] + len(pos)
    log.info("R-peaks of %d records at %g Hz in %.1f s", len(cache), fs, time.perf_counter() - t0)
    return offsets, (np.concatenate(parts) if parts else np.zeros(0)), known, skipped


def _read_npz(path: Path, expect: dict[str, int]) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (no pickles).

    Raises:
        ValueError: the file is unreadable, or an array named in ``expect`` is missing or has another length
            (-1: any length); the message says which.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:     # EOFError: an empty file
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None
    for k, n in expect.items():
        if k not in data or (n >= 0 and len(data[k]) != n):
            raise ValueError(f"array {k!r}: {data[k].shape if k in data else 'missing'}, expected length {n}")
    return data


def _load_npz(path: Path, expect: dict[str, int]) -> dict[str, np.ndarray] | None:
    """:func:`_read_npz` for a file that is computed again when it is absent (None) or bad (None, a warning)."""
    if not path.exists():
        return None
    try:
        return _read_npz(path, expect)
    except ValueError as exc:
        log.warning("%s: %s; computing it again", path, exc)
        return None


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as an ``.npz`` atomically, streamed like the feature files (:func:`_save_features`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def cached_rpeaks(cache: Any, feature_dir: str | os.PathLike, nonfinite: str = "error"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`record_rpeaks` behind an on-disk cache (``<feature_dir>/<rpeaks_key>.npz``, written atomically under
    a lock like :func:`cached_handcrafted`); an unreadable or inconsistent file is computed again."""
    _check_nonfinite(nonfinite)
    key = rpeaks_key(cache)
    path = Path(feature_dir) / f"{key}.npz"
    expect = {"offsets": len(cache) + 1, "positions": -1, "known": len(cache), "skipped": len(cache)}

    def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        d = _load_npz(path, expect)
        if d is None:
            return None
        if d["offsets"][-1] != len(d["positions"]) or (np.diff(d["offsets"]) < 0).any():
            log.warning("%s: offsets do not index the positions; computing it again", path)
            return None
        if nonfinite == "error" and d["skipped"].any():
            return None      # written with nonfinite="skip": the damaged records are found (and named) again
        return d["offsets"], d["positions"], d["known"], d["skipped"]

    got = load()
    if got is not None:
        return got
    with file_lock(Path(feature_dir) / f".{key}.lock", blocking=True):
        got = load()
        if got is not None:
            return got
        got = record_rpeaks(cache, nonfinite=nonfinite)
        _save_npz(path, **dict(zip(("offsets", "positions", "known", "skipped"), got)))
    return got


def crop_pretext_file(caches: Sequence[Any], feature_dir: str | os.PathLike, max_seconds: float = 60.0,
                      clip: float = 5.0, nonfinite: str = "error") -> Path:
    """What :class:`CropRhythmTargets` needs to compute each crop's rhythm targets, over a pretraining pool.

    ``<feature_dir>/croppretext-<key>.npz``: the pool's R-peaks (:func:`cached_rpeaks`, ragged over the caches in
    :class:`~ecgfm.data.datamodules.CachePool` order), the sampling rate, and the standardisation of the
    :data:`RHYTHM_FEATURES` columns (median and scale of the *record-level* values, exactly those of
    :func:`pretext_targets`, so a crop's targets and its record's morphology targets share one scale). The key
    covers the R-peak and feature keys of every cache, ``max_seconds``, ``clip``, ``nonfinite`` and
    :data:`PRETEXT_VERSION`.

    Returns:
        The ``.npz`` path.
    """
    text = "|".join(["crop", PRETEXT_VERSION, *(f"{rpeaks_key(c)},{handcrafted_key(c)}" for c in caches),
                     f"{float(max_seconds):g}", f"{float(clip):g}", nonfinite])
    path = Path(feature_dir) / f"croppretext-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz"
    n_total = sum(len(c) for c in caches)
    expect = {"offsets": n_total + 1, "positions": -1, "known": n_total, "columns": len(RHYTHM_FEATURES),
              "center": len(RHYTHM_FEATURES), "scale": len(RHYTHM_FEATURES)}
    if _load_npz(path, expect) is not None:
        STATS["pretext_hits"] += 1
        return path
    fss = {float(c.fs) for c in caches if getattr(c, "fs", None) is not None}
    if len(fss) != 1 or any(getattr(c, "fs", None) is None for c in caches):
        raise ValueError(f"crop-level pretext targets need one sampling rate over the pool, got {sorted(fss)}")
    with file_lock(Path(feature_dir) / f".{path.stem}.lock", blocking=True):
        if _load_npz(path, expect) is not None:
            return path
        offsets, positions, known = [np.zeros(1, np.int64)], [], []
        for cache in caches:
            off, pos, kn, _ = cached_rpeaks(cache, feature_dir, nonfinite=nonfinite)
            offsets.append(off[1:] + offsets[-1][-1])
            positions.append(pos)
            known.append(kn)
        columns = np.array([FEATURE_NAMES.index(n) for n in RHYTHM_FEATURES], dtype=np.int64)
        center, scale = _robust_scale(_pretext_raw(caches, feature_dir, max_seconds, clip, nonfinite)[:, columns])
        _save_npz(path, offsets=np.concatenate(offsets), positions=np.concatenate(positions) if positions else
                  np.zeros(0), known=np.concatenate(known) if known else np.zeros(0, bool), columns=columns,
                  center=center, scale=scale, fs=np.float64(fss.pop()), clip=np.float64(clip))
    return path


class CropRhythmTargets:
    """Rhythm pretext targets of each crop from the crop's own R-peaks (``method.aux_targets=handcrafted_crop``).

    Record-level targets (:func:`pretext_targets`) give a 10 s view of a 30 s record its record's RR statistics,
    which the view may not show (paroxysmal AF, ectopic beats elsewhere in the record) and which hold nothing for
    records over ``max_seconds``. Here each view's :data:`RHYTHM_FEATURES` (beat count, RR and successive-difference
    statistics, their missing-group indicators) are computed from the peaks inside the view: the R-peaks are found
    once per record (:func:`cached_rpeaks`, neurokit2 on the whole record, so no crop edge disturbs the detector),
    and a crop selects its peaks by position. The values are standardised with the record-level columns' median
    and scale (:func:`crop_pretext_file`). The morphology columns keep their record-level targets.

    The file is read on first use in each process; pickling sends only its path (spawned loader workers).

    Args:
        path: a :func:`crop_pretext_file`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._data: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_data": None}

    def __repr__(self) -> str:
        return f"CropRhythmTargets({self.path!r})"

    @property
    def data(self) -> dict[str, np.ndarray]:
        if self._data is None:
            try:
                d = _read_npz(Path(self.path), {"offsets": -1, "positions": -1, "known": -1, "columns": -1,
                                                "center": -1, "scale": -1, "fs": -1, "clip": -1})
            except ValueError as exc:
                raise ValueError(f"{self.path}: not a crop pretext file as crop_pretext_file writes them: {exc}"
                                 ) from None
            if len(d["offsets"]) != len(d["known"]) + 1 or d["offsets"][-1] != len(d["positions"]):
                raise ValueError(f"{self.path}: offsets do not index the peaks of {len(d['known'])} records")
            self._data = d
        return self._data

    def __len__(self) -> int:
        return len(self.data["known"])

    @property
    def columns(self) -> np.ndarray:
        """Indices (into :data:`FEATURE_NAMES`) of the columns :meth:`fill` writes."""
        return self.data["columns"]

    def fill(self, t: np.ndarray, flats: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        """Write the rhythm columns of crops into their targets rows.

        Args:
            t: ``(n, len(FEATURE_NAMES))`` float32 targets of the crops (their record-level rows), changed in place.
            flats: ``(n,)`` flat pool indices of the crops' records.
            starts, stops: ``(n,)`` sample range ``[start, stop)`` of each crop inside its record (the stop at the
                record's end where the crop is zero-padded). A crop with under 2 s of signal gets NaN (unknown).
        """
        d = self.data
        fs = float(d["fs"])
        names = RHYTHM_FEATURES
        raw = np.full((len(flats), len(names)), np.nan)
        for b, (f, a, z) in enumerate(zip(np.asarray(flats).tolist(), np.asarray(starts).tolist(),
                                         np.asarray(stops).tolist())):
            if not d["known"][f] or z - a < _MIN_CROP_S * fs:   # e.g. an adjacent view past the record's end
                continue
            peaks = d["positions"][d["offsets"][f]:d["offsets"][f + 1]]
            lo, hi = np.searchsorted(peaks, [a, z])
            vals = _rhythm_values(peaks[lo:hi], fs, max(z - a, 1) / fs)
            vals["missing_rr"] = float("mean_rr" not in vals)
            vals["missing_drr"] = float("rmssd" not in vals)
            raw[b] = [vals.get(k, np.nan) for k in names]
        t[:, d["columns"]] = _standardise(raw, d["center"], d["scale"], float(d["clip"]))
