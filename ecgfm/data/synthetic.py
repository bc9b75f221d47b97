"""Synthetic 12-lead ECG corpus with known classes and ground-truth evidence masks.

The corpus is ecgfm's built-in data set: pretraining smoke runs, benchmarks and the explanation tests use it,
the latter because every record carries an ``evidence`` mask saying exactly where its class-defining feature
is. Generation is deterministic (a record depends only on ``(index, seed, fs, duration)``) and vectorised over
records, beats and waves, so tens of thousands of records take seconds.

Model
-----
*Morphology* follows the sum-of-Gaussians beat model of McSharry et al. (2003, "A dynamical model for
generating synthetic electrocardiogram signals", IEEE TBME 50:289) in its vectorcardiographic form (Sayadi,
Shamsollahi & Clifford 2010, "Synthetic ECG generation and Bayesian filtering using a Gaussian wave-based
dynamical model"): each beat is a sum of Gaussian waves in time, and each wave carries a 3-D cardiac dipole
vector (Frank X left, Y inferior/feet, Z posterior/back). The leads I, II and V1-V6 are projections of the dipole
through the inverse Dower matrix (Dower et al. 1980) with a per-patient perturbation of the precordial lead
vectors (electrode placement); III, aVR, aVL and aVF are then *computed* from I and II with Einthoven's and
Goldberger's laws, so ``III == II - I``, ``aVR == -(I + II) / 2``, ``aVL == I - II / 2`` and
``aVF == II - I / 2`` hold exactly (in float32, noise included). Because every lead sees the same dipole, the
12 leads are mutually consistent: the septal (Q) vector points right/anterior (small r in V1, small q in I, aVL,
V5, V6), the main ventricular forces left/inferior then posterior (rS in V1, RS transition at V3/V4, qR in
V5/V6). Waves per beat: two P components (right then left atrium: biphasic P in V1), Q (septal), R1, R2, S, an
extra late component (R' in RBBB), three ST components (zero unless the ST segment is shifted) and an asymmetric
T made of two Gaussians. Amplitudes are in mV (R about 1-1.5 mV in II, 1.5-2.5 mV in V4/V5).

*Rhythm*: RR series with respiratory sinus arrhythmia (0.15-0.4 Hz) and a Mayer-wave LF component (~0.1 Hz)
plus white jitter; respiration also modulates the QRS amplitude by 2-8 % beat to beat; QT follows the
preceding RR with Fridericia's law (``QT = QTc * RR**(1/3)``, QTc 380-440 ms) and the T wave width scales with
it; the PR interval shortens slightly with heart rate.

*Noise* (random realistic levels per record, applied to I, II and V1-V6 before the limb leads are derived):
baseline wander (a respiratory component at the breathing rate, 0.01-0.12 mV, plus two slow drifts at
0.02-0.15 Hz, 0.02-0.3 mV), EMG-like broadband muscle noise (white Gaussian, 0.002-0.04 mV RMS per lead,
amplitude-modulated at 0.1-0.5 Hz; windows of a per-seed bank of 2**20 normals, see :func:`_noise_bank`), and
powerline interference at 50 or 60 Hz (0.003-0.03 mV) in about 60 % of records. Powerline is only added when
the mains frequency is below 0.45 ``fs``: a 100 Hz ECG is the output of an anti-aliased acquisition, which
contains no mains component.

Classes and evidence masks
--------------------------
``evidence`` is a ``(12, T)`` bool mask of where the class-defining feature is (the ground truth for
attribution tests). Fiducials use the model's own waves: a wave's onset/offset is its Gaussian centre -/+ 2
sigma (13.5 % of its peak); the QRS spans its earliest Q/R/S component onset to its latest offset; J point is
the QRS offset; the T wave spans its rising component's onset to its falling component's offset.

- ``normal_sinus``: 62-95 bpm, PR 120-200 ms, QRS 80-100 ms. Evidence: empty (no abnormal feature).
- ``sinus_bradycardia`` (40-55 bpm) / ``sinus_tachycardia`` (105-140 bpm): the feature is the beat timing, so
  the evidence is every QRS complex (onset to offset), all 12 leads.
- ``atrial_fibrillation``: ventricular rate 75-130 bpm with independent log-normal RR intervals (coefficient
  of variation 0.18-0.32: irregularly irregular), no P waves, fibrillatory f-waves (two frequency-modulated
  components at 4-9 Hz, 0.05-0.15 mV, largest in V1 and II). The whole record is abnormal; the evidence marks
  the f-wave baseline where P waves would be, i.e. every TP segment (T offset to the next QRS onset, including
  the record edges), in all 12 leads.
- ``first_degree_av_block``: PR 220-320 ms. Evidence: every PR interval (P onset to QRS onset), all leads.
- ``bundle_branch_block``: QRS >= 120 ms (about 140-150 ms); subtype per record in ``meta["bbb_type"]``:
  ``RBBB`` (rSR' in V1-V2, wide S in I and V5-V6, secondary T inversion in V1-V2) or ``LBBB`` (no septal q,
  broad notched R in I, aVL, V5-V6, deep QS in V1, discordant ST-T). Evidence: every QRS complex in the
  characteristic leads (RBBB: I, V1, V2, V5, V6; LBBB: I, aVL, V1, V5, V6).
- ``st_elevation``: an injury current vector for one territory (``meta["territory"]``: ``inferior`` II/III/aVF,
  ``anterior`` V1-V4, ``lateral`` I/aVL/V5-V6) scaled so that every core lead of the territory is elevated by
  at least 0.12-0.3 mV, with the reciprocal depression that the projection implies (aVL/I for inferior,
  III/aVF for anterior and lateral) and a hyper-acute T. Evidence: the ST segments (J point to T onset) of
  every beat in the leads with a clinically significant deviation: elevation >= 0.1 mV or reciprocal
  depression >= 0.05 mV.
- ``t_wave_inversion``: the T vector is turned away from one territory so that each of its core leads has a T
  of at most -0.1 to -0.3 mV. Evidence: the T waves (onset to offset) of every beat in the territory's core leads and
  any other lead whose T became inverted (<= -0.05 mV from an upright T).
- ``premature_ventricular_beats``: 1-3 isolated ectopic beats per record at 55-70 % of the RR, wide (about
  165 ms) bizarre QRS with a random ectopic vector, no P wave, discordant ST-T, fully compensatory pause.
  Evidence: each ectopic beat from QRS onset to T offset, all 12 leads.

``record.annotations`` holds per-beat fiducials in samples (beats whose QRS centre lies in the record):
``sample`` (QRS centre), ``symbol`` (``"N"`` or ``"V"``), ``p_onset``, ``p_offset`` (-1: no P wave),
``qrs_onset``, ``qrs_offset``, ``t_onset``, ``t_peak``, ``t_offset`` (those of the first and last beats may
fall outside ``[0, T)``); ``record.meta`` the ground-truth parameters (heart rate, PR, QRS, QTc, subtype,
territory, per-lead ST shift or T amplitude, noise levels...).

Determinism and patients
------------------------
Record ``index`` draws all its random numbers from ``np.random.default_rng([seed, index])``; its class is a
balanced permutation of :data:`SYNTHETIC_CLASSES` per block of nine indices (``default_rng([seed, block, 2])``)
and its patient is ``index // 3``, whose morphology (heart axis rotation, amplitudes, QRS width, QTc, PR,
electrode placement) comes from ``default_rng([seed, patient, 1])``, so the three records of a patient look
alike and patient-level splits matter. The muscle-noise bank of a seed has a stream of its own
(``SeedSequence(seed, spawn_key=(3,))``, whose entropy no record, patient or class key can take). Until
:data:`GENERATOR_VERSION` 2 it was ``default_rng([seed, 3])``, record 3's own stream: record 3's random parameters
were the bank's first numbers (correlation 0.43 between its uniform draws and the magnitudes of the bank's odd
samples, 0.00 for other records). The patient id names the seed too (:func:`synthetic_patient_id`), so two
corpora of different seeds share no patient (a patient-level hold-out over both, CLOCS's patient positives).
:func:`generate_arrays`, :func:`generate_record` and :class:`SyntheticSource` run the same vectorised code on
batches of records; nothing a record computes depends on the other records of its batch, so a record is the same
whichever way it is produced (bit for bit on the machines tested; the tests allow float rounding).

Sampling: each Gaussian wave is widened by an anti-aliasing kernel (-3 dB at 0.4 ``fs``), so a 100 Hz record
looks like a band-limited acquisition rather than a point-sampled 500 Hz one.

Why hand-written: no maintained Python library generates multi-lead ECGs with labelled pathologies and
evidence masks (``neurokit2.ecg_simulate`` is single-lead, normal sinus only, and a Python loop per sample);
this module is the vectorised model described above.
"""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse

from ecgfm.data.record import CANONICAL_LEADS, N_LEADS, ECGDataError, ECGRecord

__all__ = [
    "GENERATOR_VERSION",
    "SYNTHETIC_CLASSES",
    "SyntheticSource",
    "class_of_index",
    "generate_arrays",
    "generate_record",
    "synthetic_patient_id",
    "write_wfdb",
]

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "normal_sinus",
    "sinus_bradycardia",
    "sinus_tachycardia",
    "atrial_fibrillation",
    "first_degree_av_block",
    "bundle_branch_block",
    "st_elevation",
    "t_wave_inversion",
    "premature_ventricular_beats",
)
_N_CLASSES = len(SYNTHETIC_CLASSES)
(_NSR, _BRADY, _TACHY, _AF, _AVB, _BBB, _STE, _TWI, _PVC) = range(_N_CLASSES)

TERRITORIES: tuple[str, ...] = ("inferior", "anterior", "lateral")
# seconds: shorter records could miss a PVC. Not enough for every record to show two beats: at 40-55 bpm a 2.5 s
# record can hold one (20 of 200 sinus_bradycardia records at 2.5 s / 100 Hz, seed 0), whose rate label the signal
# cannot show; every shipped config uses 10 s, where all rate bands were checked on 900 records
MIN_DURATION = 2.5

# Canonical lead indices.
_L = {name: i for i, name in enumerate(CANONICAL_LEADS)}
#: leads computed from I and II (Einthoven / Goldberger), marked in every record's ``header["derived_leads"]``
DERIVED_LIMB_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")
# The 8 independent leads (I, II, V1-V6): rows of the projection, where the noise is added.
_INDEP = np.array([_L["I"], _L["II"], _L["V1"], _L["V2"], _L["V3"], _L["V4"], _L["V5"], _L["V6"]])

# Inverse Dower matrix (Dower, Machado & Osborne 1980): Frank (X, Y, Z) -> I, II, V1..V6, mV per mV.
_DOWER = np.array([
    [0.632, -0.235, 0.059],   # I
    [0.235, 1.066, -0.132],   # II
    [-0.515, 0.157, -0.917],  # V1
    [0.044, 0.164, -1.387],   # V2
    [0.882, 0.098, -1.277],   # V3
    [1.213, 0.127, -0.601],   # V4
    [1.125, 0.127, -0.086],   # V5
    [0.831, 0.076, 0.230],    # V6
])

# Wave slots of one beat.
_SLOTS = ("P1", "P2", "Q", "R1", "R2", "S", "R3", "ST1", "ST2", "ST3", "Ta", "Tb")
_S = {name: i for i, name in enumerate(_SLOTS)}
_N_SLOTS = len(_SLOTS)
_QRS_SLOTS = np.array([_S["Q"], _S["R1"], _S["R2"], _S["S"], _S["R3"]])
_ST_SLOTS = np.array([_S["ST1"], _S["ST2"], _S["ST3"]])

# Normal template (un-rotated dipole vectors in mV; QRS times in s relative to the R1 peak).
_V_P1 = np.array([0.04, 0.10, -0.05])
_V_P2 = np.array([0.09, 0.06, 0.07])
_QRS_NORMAL = {  # slot: (offset s, sigma s, vector)
    "Q": (-0.022, 0.008, (-0.12, 0.05, -0.22)),
    "R1": (0.0, 0.0105, (1.05, 0.85, -0.25)),
    "R2": (0.016, 0.010, (0.55, 0.15, 0.85)),
    "S": (0.033, 0.009, (-0.30, -0.30, 0.45)),
}
_QRS_RBBB = {
    "Q": (-0.022, 0.008, (-0.12, 0.05, -0.22)),
    "R1": (0.0, 0.0105, (1.05, 0.85, -0.25)),
    "R2": (0.016, 0.010, (0.55, 0.15, 0.85)),
    "S": (0.040, 0.014, (-0.25, -0.20, 0.20)),
    "R3": (0.078, 0.017, (-0.55, -0.10, -0.75)),
}
_QRS_LBBB = {
    "Q": (-0.030, 0.012, (0.25, 0.05, 0.15)),
    "R1": (0.0, 0.019, (0.85, 0.25, 0.75)),
    "R2": (0.050, 0.019, (0.95, 0.05, 0.85)),
}
_V_T = np.array([0.42, 0.20, -0.12])
_T_RBBB_ADD = np.array([0.12, 0.02, 0.22])   # secondary T change of RBBB (inverted T in V1-V2)
_LBBB_DIR = np.array([0.90, 0.15, 0.80]) / np.linalg.norm([0.90, 0.15, 0.80])
# Injury-current (ST) and T-inversion directions per territory. A territory is defined by its leads, so these
# are fixed in the torso frame (not turned with the patient's heart axis).
_STE_DIR = np.array([[-0.10, 1.00, 0.10], [0.10, -0.45, -1.00], [1.00, -0.45, 0.25]])
_TWI_DIR = np.array([[-0.10, 1.00, 0.10], [0.45, -0.10, -1.00], [1.00, -0.10, 0.25]])
_TERR_CORE = (
    np.array([_L["II"], _L["III"], _L["aVF"]]),
    np.array([_L["V1"], _L["V2"], _L["V3"], _L["V4"]]),
    np.array([_L["I"], _L["aVL"], _L["V5"], _L["V6"]]),
)
_BBB_LEADS = (  # RBBB, LBBB
    np.array([_L["I"], _L["V1"], _L["V2"], _L["V5"], _L["V6"]]),
    np.array([_L["I"], _L["aVL"], _L["V1"], _L["V5"], _L["V6"]]),
)
# Atrial fibrillation f-wave dipole directions (largest in V1 and II).
_F_DIR1 = np.array([-0.15, 0.45, -0.75]) / np.linalg.norm([-0.15, 0.45, -0.75])
_F_DIR2 = np.array([0.40, 0.50, -0.30]) / np.linalg.norm([0.40, 0.50, -0.30])

# T wave: two Gaussians around the T peak (offsets and sigmas in units of sigma_T, weights).
_TA = (-0.6, 1.25, 0.55)
_TB = (0.35, 0.80, 0.60)
_T_ON = _TA[0] - 2 * _TA[1]   # T onset relative to the peak, in sigma_T
_T_OFF = _TB[0] + 2 * _TB[1]  # T offset relative to the peak, in sigma_T

_RR_MIN, _RR_MAX = 0.27, 2.2
_FIRST_BEAT = -0.7  # s: the first beat lies in [-0.7 - RR, -0.7] so the record starts mid-rhythm


def _layout(spec: tuple[tuple[str, int], ...]) -> dict[str, slice]:
    out, start = {}, 0
    for name, width in spec:
        out[name] = slice(start, start + width)
        start += width
    return out


# Columns of the per-record uniform block (rng([seed, index]).random(_N_U)).
_U = _layout((
    ("hr", 1), ("start", 1), ("rsa_amp", 1), ("resp_f", 1), ("rsa_phase", 1), ("lf_amp", 1), ("lf_f", 1),
    ("lf_phase", 1), ("rr_jitter", 1), ("resp_mod", 1), ("af_cv", 1), ("f_freq", 2), ("f_amp", 1), ("f_mix", 1),
    ("f_phase", 2), ("f_fm", 2), ("f_fm_phase", 2), ("pr_avb", 1), ("bbb_type", 1), ("territory", 1),
    ("ste_amp", 1), ("twi_depth", 1), ("n_pvc", 1), ("pvc_coupling", 1), ("pvc_dir", 3), ("pvc_mag", 1),
    ("pvc_dir2", 3), ("pvc_t", 1), ("wander_amp", 1), ("drift_amp", 2), ("drift_f", 2), ("drift_phase", 2),
    ("wander_gain", 24), ("emg_amp", 1), ("emg_gain", 8), ("emg_env_f", 1), ("emg_env_phase", 1),
    ("emg_env_depth", 1), ("pl_on", 1), ("pl_f", 1), ("pl_amp", 1), ("pl_gain", 8), ("pl_phase", 8),
))
_N_U = max(s.stop for s in _U.values())
# Columns of the per-patient uniform block (rng([seed, patient, 1]).random(_N_UP)).
_UP = _layout((
    ("rot", 3), ("a_qrs", 1), ("a_p", 1), ("a_t", 1), ("t_scale", 1), ("qtc", 1), ("pr", 1),
    ("lead_jitter", 18), ("t_jitter", 3), ("r_jitter", 6), ("sigma_t", 1),
))
_N_UP = max(s.stop for s in _UP.values())
_RECORDS_PER_PATIENT = 3


def _n_beats(duration: float) -> int:
    """Fixed number of beat slots per record (depends on the duration only, so results do not depend on n)."""
    return int(np.ceil((duration - _FIRST_BEAT + _RR_MAX + 0.5) / _RR_MIN)) + 1


def _check_args(fs: float, duration: float) -> tuple[float, float, int]:
    fs, duration = float(fs), float(duration)
    if not np.isfinite(fs) or not 50.0 <= fs <= 10_000.0:
        raise ValueError(f"synthetic ECG sampling rate must be in [50, 10000] Hz, got {fs}")
    if not np.isfinite(duration) or not MIN_DURATION <= duration <= 3600.0:
        raise ValueError(f"synthetic ECG duration must be in [{MIN_DURATION}, 3600] s, got {duration}")
    n_samples = int(round(fs * duration))
    return fs, duration, n_samples


def class_of_index(index: int, seed: int = 0) -> int:
    """Class id of record ``index``: a balanced permutation of the classes per block of nine indices."""
    block, pos = divmod(int(index), _N_CLASSES)
    perm = np.random.default_rng([int(seed), block, 2]).permutation(_N_CLASSES)
    return int(perm[pos])


def _lin(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def _log(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) * u)


def _rotations(angles: np.ndarray) -> np.ndarray:
    """``(n, 3)`` angles in rad (frontal XY, horizontal XZ, sagittal YZ) -> ``(n, 3, 3)`` rotation matrices."""
    n = angles.shape[0]
    out = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
        c, s = np.cos(angles[:, k]), np.sin(angles[:, k])
        r = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
        r[:, a, a], r[:, a, b], r[:, b, a], r[:, b, b] = c, -s, s, c
        out = r @ out
    return out


def _lead_matrix12(l8: np.ndarray) -> np.ndarray:
    """``(n, 8, 3)`` projection rows of I, II, V1-V6 -> ``(n, 12, 3)`` rows of the canonical leads."""
    i, ii = l8[:, 0], l8[:, 1]
    out = np.empty((l8.shape[0], N_LEADS, 3))
    out[:, _INDEP] = l8
    out[:, _L["III"]] = ii - i
    out[:, _L["aVR"]] = -(i + ii) / 2
    out[:, _L["aVL"]] = i - ii / 2
    out[:, _L["aVF"]] = ii - i / 2
    return out


def _render(rec: np.ndarray, center: np.ndarray, sigma: np.ndarray, vec: np.ndarray, n: int, n_samples: int,
            fs: float) -> np.ndarray:
    """Sum of Gaussian waves into a dipole signal.

    Each wave is evaluated on its own window of at least +-3.5 sigma (the window size depends only on the
    wave's sigma, in steps of 25 %, so a record does not depend on the other records of the batch). The
    windows are the columns of a sparse ``(n * padded T, K)`` matrix that multiplies the ``(K, 3)`` wave
    vectors: one scatter-add in compiled code.

    Args:
        rec: ``(K,)`` record index of each wave (0..n-1).
        center, sigma: ``(K,)`` centre and width in seconds.
        vec: ``(K, 3)`` dipole vector (mV).

    Returns:
        ``(n, 3, T)`` float32 dipole signal (a strided view).
    """
    if len(center) == 0:
        return np.zeros((n, 3, n_samples), dtype=np.float32)
    # acquisition anti-aliasing: each wave is convolved with a Gaussian kernel whose -3 dB point is 0.4 fs
    # (sigma_k = 0.47 / fs; area kept), so a 100 Hz record looks like a 500 Hz one decimated
    sigma_k = 0.47 / fs
    wide = np.sqrt(sigma * sigma + sigma_k * sigma_k)
    vec = vec * (sigma / wide)[:, None]
    sigma = wide
    half = np.maximum(np.ceil(3.5 * sigma * fs), 1.0)
    bucket = np.ceil(np.log(half) / np.log(1.25) - 1e-9).astype(np.int64)
    h_max = int(np.ceil(1.25 ** int(bucket.max())))
    width = n_samples + 4 * h_max   # padded rows: waves overhanging the record edges fall in the pad
    i0_all = np.rint(center * fs).astype(np.int64)
    keep_all = (i0_all + h_max >= 0) & (i0_all - h_max < n_samples)
    groups = []
    for b in np.unique(bucket[keep_all]):
        sel = np.flatnonzero((bucket == b) & keep_all)
        groups.append((sel, int(np.ceil(1.25 ** int(b)))))
    sizes = [len(sel) * (2 * h + 1) for sel, h in groups]
    idx_dtype = np.int32 if n * width < 2**31 - 1 else np.int64
    data = np.empty(sum(sizes), dtype=np.float32)
    rows = np.empty(sum(sizes), dtype=idx_dtype)
    counts = np.empty(sum(len(sel) for sel, _ in groups), dtype=idx_dtype)
    pos = col = 0
    for (sel, h), size in zip(groups, sizes):
        k, w = len(sel), 2 * h + 1
        inv = 1.0 / (sigma[sel] * fs)
        z = data[pos:pos + size].reshape(k, w)
        np.multiply(np.arange(-h, h + 1, dtype=np.float32)[None, :], inv.astype(np.float32)[:, None], out=z)
        z += ((i0_all[sel] - center[sel] * fs) * inv).astype(np.float32)[:, None]
        z *= z
        z *= -0.5
        np.exp(z, out=z)
        np.add((rec[sel] * width + 2 * h_max + i0_all[sel]).astype(idx_dtype)[:, None],
               np.arange(-h, h + 1, dtype=idx_dtype)[None, :], out=rows[pos:pos + size].reshape(k, w))
        counts[col:col + k] = w
        pos, col = pos + size, col + k
    cols_all = np.concatenate([sel for sel, _ in groups])
    indptr = np.zeros(len(cols_all) + 1, dtype=idx_dtype)
    np.cumsum(counts, out=indptr[1:])
    mat = scipy.sparse.csc_array((data, rows, indptr), shape=(n * width, len(cols_all)))
    out = mat @ vec[cols_all].astype(np.float32)                      # (n * width, 3)
    return out.reshape(n, width, 3)[:, 2 * h_max:2 * h_max + n_samples].transpose(0, 2, 1)


#: Version of what the generator outputs for given arguments. Part of :class:`SyntheticSource`'s description
#: (``repr`` and the public ``generator_version``: a cache's plan and content fingerprints, the key of a cache
#: prepared from a built source), so that records generated by an earlier version are not taken for the current
#: ones. 2: the muscle-noise bank draws from a stream of its own (it was record 3's), so every record with noise has
#: other muscle noise (same classes, patients, parameters, evidence and annotations; records without noise are
#: unchanged).
GENERATOR_VERSION = 2

_BANK_SIZE = 1 << 20
_BANK_STREAM = 3   # spawn key of the noise bank's stream
_CHUNK_SAMPLES = 256_000  # samples per lead per batch: small enough that temporaries are reused from the heap


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int, n_samples: int) -> np.ndarray:
    """Standard-normal float32 samples shared by the records of a seed (length 2**20 + T, wrapping around).

    Muscle noise of each record and lead is a window of this bank at a random offset. Drawing 8 x T fresh
    normals per record would cost more than the rest of the generator; windows of a 10^6-sample bank are as
    good for an ECG (two windows overlap with probability about 2 T / 10^6).

    The bank's stream is ``SeedSequence(seed, spawn_key=(3,))``: its entropy ``[seed, 0, 0, 0, 3]`` is no record's
    (``[seed, index]``), patient's (``[seed, patient, 1]``) or class block's (``[seed, block, 2]``). Before
    :data:`GENERATOR_VERSION` 2 it was ``default_rng([seed, 3])``, the stream of record 3.
    """
    stream = np.random.SeedSequence(int(seed), spawn_key=(_BANK_STREAM,))
    bank = np.random.default_rng(stream).standard_normal(_BANK_SIZE, dtype=np.float32)
    reps = int(np.ceil((_BANK_SIZE + n_samples) / _BANK_SIZE))
    out = np.tile(bank, reps)[:_BANK_SIZE + n_samples]
    out.setflags(write=False)
    return out


def _sin32(freq: np.ndarray, t: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``sin(2 pi freq t + phase)`` as float32 ``(n, T)``: cycles reduced in float64, sine in float32 (fast)."""
    cyc = freq[:, None] * t[None, :]
    cyc -= np.floor(cyc)
    arg = (2 * np.pi * cyc + phase[:, None]).astype(np.float32)
    return np.sin(arg, out=arg)


def _sin32_low(freq: np.ndarray, t32: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Like :func:`_sin32` in float32 throughout: for frequencies below 1 Hz (phase error < 1e-3 rad/hour)."""
    arg = (2 * np.pi * freq).astype(np.float32)[:, None] * t32[None, :]
    arg += phase.astype(np.float32)[:, None]
    return np.sin(arg, out=arg)


def _interval_mask(rec: np.ndarray, start: np.ndarray, end: np.ndarray, n: int, n_samples: int,
                   fs: float) -> np.ndarray:
    """Union of half-open time intervals ``[start, end)`` (s) per record -> ``(n, T)`` bool."""
    i0 = np.clip(np.ceil(start * fs), 0, n_samples).astype(np.int64)
    i1 = np.clip(np.ceil(end * fs), 0, n_samples).astype(np.int64)
    ok = i1 > i0
    width = n_samples + 1
    diff = np.zeros(n * width, dtype=np.int32)
    np.add.at(diff, rec[ok] * width + i0[ok], 1)
    np.add.at(diff, rec[ok] * width + i1[ok], -1)
    return np.cumsum(diff.reshape(n, width)[:, :n_samples], axis=1, dtype=np.int32) > 0


def _synthesize(cls: np.ndarray, u: np.ndarray, up: np.ndarray, z_rr: np.ndarray, u_beat: np.ndarray,
                bank: np.ndarray, emg_offsets: np.ndarray, fs: float, duration: float, n_samples: int, noise: bool,
                out: tuple[np.ndarray, np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Vectorised generator for a batch of records.

    Args:
        cls: ``(n,)`` class ids. u: ``(n, _N_U)`` record uniforms. up: ``(n, _N_UP)`` patient uniforms.
        z_rr: ``(n, B)`` standard normals (RR jitter). u_beat: ``(n, B)`` uniforms (PVC placement).
        bank: float32 standard normals (see :func:`_noise_bank`); emg_offsets: ``(n, 8)`` int window offsets
            into it (muscle noise of each lead).
        out: optional ``(X, evidence)`` arrays to write into.

    Returns:
        ``(X (n, 12, T) float32, evidence (n, 12, T) bool, info)`` where ``info`` holds per-record and per-beat
        ground truth (seconds) used for annotations and meta.
    """
    n = cls.shape[0]
    n_beats = z_rr.shape[1]
    U = {k: u[:, s] for k, s in _U.items()}
    P = {k: up[:, s] for k, s in _UP.items()}
    col = lambda a: a[:, 0]  # noqa: E731  (one-column views -> (n,))
    is_ = {c: cls == c for c in range(_N_CLASSES)}

    # ---- patient morphology -------------------------------------------------------------------------
    rot = _rotations(np.deg2rad(_lin(P["rot"], -1.0, 1.0) * np.array([22.0, 18.0, 12.0])))   # (n, 3, 3)
    l8 = np.broadcast_to(_DOWER, (n, 8, 3)).copy()
    l8[:, 2:] += _lin(P["lead_jitter"], -0.08, 0.08).reshape(n, 6, 3)
    l12 = _lead_matrix12(l8)
    a_qrs, a_p, a_t = _lin(col(P["a_qrs"]), 0.85, 1.25), _lin(col(P["a_p"]), 0.7, 1.3), _lin(col(P["a_t"]), 0.75, 1.3)
    t_scale = _lin(col(P["t_scale"]), 0.92, 1.08)
    qtc = _lin(col(P["qtc"]), 0.38, 0.44)
    sigma_t0 = _lin(col(P["sigma_t"]), 0.034, 0.042)
    rotate = lambda v: np.einsum("nij,nj->ni", rot, np.broadcast_to(v, (n, 3)))  # noqa: E731

    # ---- record-level QRS template per slot: offset, sigma, vector ----------------------------------
    off = np.zeros((n, _N_SLOTS))
    sig = np.full((n, _N_SLOTS), 0.01)
    vec = np.zeros((n, _N_SLOTS, 3))
    r_jit = _lin(P["r_jitter"], -0.12, 0.12).reshape(n, 2, 3)
    bbb_lbbb = is_[_BBB] & (col(U["bbb_type"]) >= 0.5)
    bbb_rbbb = is_[_BBB] & ~bbb_lbbb
    for table, mask in ((_QRS_NORMAL, ~is_[_BBB]), (_QRS_RBBB, bbb_rbbb), (_QRS_LBBB, bbb_lbbb)):
        for name, (o, s_, v) in table.items():
            k = _S[name]
            off[mask, k] = o
            sig[mask, k] = s_
            vv = np.broadcast_to(np.asarray(v, float), (n, 3)).copy()
            if name in ("R1", "R2"):
                vv = vv + r_jit[:, 0 if name == "R1" else 1]
            vec[mask, k] = vv[mask]
    off[:, _QRS_SLOTS] *= t_scale[:, None]
    sig[:, _QRS_SLOTS] *= t_scale[:, None]
    vec[:, _QRS_SLOTS] *= a_qrs[:, None, None]
    vec[:, _S["P1"]] = _V_P1 * a_p[:, None]
    vec[:, _S["P2"]] = _V_P2 * a_p[:, None]
    v_t = (_V_T + _lin(P["t_jitter"], -0.07, 0.07)) * a_t[:, None]
    v_t[bbb_rbbb] += _T_RBBB_ADD
    v_t[bbb_lbbb] = -_lin(col(U["pvc_t"])[bbb_lbbb], 0.35, 0.5)[:, None] * _LBBB_DIR
    v_st = np.zeros((n, 3))
    v_st[bbb_lbbb] = -_lin(col(U["ste_amp"])[bbb_lbbb], 0.15, 0.25)[:, None] * _LBBB_DIR
    # everything anatomical turns with the heart
    vec = np.einsum("nij,nkj->nki", rot, vec)
    v_t = rotate(v_t)
    v_st = rotate(v_st)

    # ---- ST elevation / T inversion in lead space ---------------------------------------------------
    territory = np.minimum((col(U["territory"]) * 3).astype(np.int64), 2)
    t_old = np.einsum("nlj,nj->nl", l12, v_t)
    twi_leads = np.zeros((n, N_LEADS), dtype=bool)
    for t_id, core in enumerate(_TERR_CORE):
        m = is_[_STE] & (territory == t_id)
        if m.any():
            d = np.broadcast_to(_STE_DIR[t_id], (int(m.sum()), 3))
            proj = np.einsum("nlj,nj->nl", l12[m], d)
            core_p = proj[:, core]
            scale = _lin(col(U["ste_amp"])[m], 0.12, 0.30) / np.maximum(core_p.min(1), core_p.max(1) / 3)
            v_st[m] = d * scale[:, None]
            v_t[m] += 0.5 * v_st[m]
        m = is_[_TWI] & (territory == t_id)
        if m.any():
            d = np.broadcast_to(_TWI_DIR[t_id], (int(m.sum()), 3))
            proj = np.einsum("nlj,nj->nl", l12[m], d)[:, core]
            depth = _lin(col(U["twi_depth"])[m], 0.10, 0.30)
            c = ((t_old[m][:, core] + depth[:, None]) / np.maximum(proj, 0.2)).max(1)
            v_t[m] -= c[:, None] * d
            tw = np.zeros((int(m.sum()), N_LEADS), dtype=bool)
            tw[:, core] = True
            twi_leads[m] = tw
    t_new = np.einsum("nlj,nj->nl", l12, v_t)
    twi_leads |= is_[_TWI][:, None] & (t_new <= -0.05) & (t_old > 0.0)
    ste_proj = np.einsum("nlj,nj->nl", l12, v_st)

    # ---- rhythm -------------------------------------------------------------------------------------
    hr = np.select(
        [is_[_BRADY], is_[_TACHY], is_[_AF], is_[_AVB], is_[_NSR]],
        [_lin(col(U["hr"]), 40, 55), _lin(col(U["hr"]), 105, 140), _lin(col(U["hr"]), 75, 130),
         _lin(col(U["hr"]), 55, 85), _lin(col(U["hr"]), 62, 95)],
        default=_lin(col(U["hr"]), 60, 95))
    rr_mean = 60.0 / hr
    resp_f = _lin(col(U["resp_f"]), 0.15, 0.4)
    resp_phase = 2 * np.pi * col(U["rsa_phase"])
    beat_no = np.arange(n_beats)[None, :]
    t_approx = beat_no * rr_mean[:, None]
    hrv_scale = np.clip(rr_mean / 0.85, 0.3, 1.5)[:, None]   # less variability at fast rates
    rr_sinus = rr_mean[:, None] * (
        1.0
        + hrv_scale * _lin(U["rsa_amp"], 0.01, 0.05) * np.sin(2 * np.pi * resp_f[:, None] * t_approx
                                                               + resp_phase[:, None])
        + hrv_scale * _lin(U["lf_amp"], 0.005, 0.03) * np.sin(2 * np.pi * _lin(U["lf_f"], 0.07, 0.13) * t_approx
                                                              + 2 * np.pi * U["lf_phase"])
    ) + hrv_scale * _lin(U["rr_jitter"], 0.003, 0.012) * z_rr
    s_af = _lin(U["af_cv"], 0.18, 0.32)
    rr_af = rr_mean[:, None] * np.exp(s_af * z_rr - s_af ** 2 / 2)
    rr = np.clip(np.where(is_[_AF][:, None], rr_af, rr_sinus), _RR_MIN, _RR_MAX)
    c0 = _FIRST_BEAT - col(U["start"]) * rr_mean
    centers = c0[:, None] + np.concatenate([np.zeros((n, 1)), np.cumsum(rr[:, :-1], axis=1)], axis=1)

    # ---- premature ventricular beats: 1-3 isolated beats, fully compensatory -----------------------
    is_pvc = np.zeros((n, n_beats), dtype=bool)
    if is_[_PVC].any():
        cand = is_[_PVC][:, None] & (beat_no >= 1) & (centers > 0.4) & (centers < duration - 0.7)
        score = np.where(cand, u_beat, -1.0)
        order = np.argsort(-score, axis=1, kind="stable")[:, :3]
        top = np.take_along_axis(score, order, axis=1) >= 0
        n_pvc = 1 + np.minimum((col(U["n_pvc"]) * 3).astype(np.int64), 2)
        take = top.copy()
        take[:, 1] &= (n_pvc >= 2) & (np.abs(order[:, 1] - order[:, 0]) > 1)
        take[:, 2] &= (n_pvc >= 3) & (np.abs(order[:, 2] - order[:, 0]) > 1) & (
            ~take[:, 1] | (np.abs(order[:, 2] - order[:, 1]) > 1))
        rows = np.repeat(np.arange(n)[:, None], 3, axis=1)
        is_pvc[rows[take], order[take]] = True
        coupling = _lin(col(U["pvc_coupling"]), 0.55, 0.70)
        prev = np.concatenate([centers[:, :1] - rr_mean[:, None], centers[:, :-1]], axis=1)
        centers = np.where(is_pvc, prev + coupling[:, None] * (centers - prev), centers)
    rr_prev = np.concatenate([rr_mean[:, None], np.diff(centers, axis=1)], axis=1)
    valid = (centers > -1.2) & (centers < duration + 0.45)
    # drop the beat slots that no record of the batch uses (results do not depend on the batch)
    n_beats = int(np.flatnonzero(valid.any(axis=0)).max()) + 1
    centers, rr_prev, valid, is_pvc = (a[:, :n_beats] for a in (centers, rr_prev, valid, is_pvc))

    # ---- per-beat slot tables -----------------------------------------------------------------------
    B = (n, n_beats, _N_SLOTS)
    b_off = np.broadcast_to(off[:, None, :], B).copy()
    b_sig = np.broadcast_to(sig[:, None, :], B).copy()
    b_vec = np.broadcast_to(vec[:, None, :, :], B + (3,)).copy()
    if is_pvc.any():
        e1 = np.stack([np.sqrt(1 - (2 * U["pvc_dir"][:, 1] - 1) ** 2) * np.cos(2 * np.pi * U["pvc_dir"][:, 0]),
                       np.sqrt(1 - (2 * U["pvc_dir"][:, 1] - 1) ** 2) * np.sin(2 * np.pi * U["pvc_dir"][:, 0]),
                       2 * U["pvc_dir"][:, 1] - 1], axis=1)
        e2 = e1 + _lin(U["pvc_dir2"], -0.5, 0.5)
        e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
        mag = _lin(col(U["pvc_mag"]), 1.6, 2.5)[:, None]
        pv = np.zeros((n, _N_SLOTS, 3))
        pv[:, _S["R1"]] = mag * e1
        pv[:, _S["R2"]] = 0.8 * mag * e2
        pv_dir = (e1 + 0.8 * e2) / np.linalg.norm(e1 + 0.8 * e2, axis=1, keepdims=True)
        pv[:, _ST_SLOTS] = (-0.1 * pv_dir)[:, None, :]
        pv[:, _S["Ta"]] = pv[:, _S["Tb"]] = -_lin(col(U["pvc_t"]), 0.35, 0.6)[:, None] * pv_dir
        p_off = np.zeros((n, _N_SLOTS))
        p_sig = np.full((n, _N_SLOTS), 0.01)
        p_off[:, _S["R1"]], p_sig[:, _S["R1"]] = -0.030, 0.024
        p_off[:, _S["R2"]], p_sig[:, _S["R2"]] = 0.035, 0.026
        rows, beats = np.nonzero(is_pvc)
        b_vec[rows, beats] = pv[rows]
        b_off[rows, beats] = p_off[rows]
        b_sig[rows, beats] = p_sig[rows]

    # respiration modulates the QRS amplitude beat to beat (the heart moves with the diaphragm)
    resp_mod = 1.0 + _lin(U["resp_mod"], 0.02, 0.08) * np.sin(2 * np.pi * resp_f[:, None] * centers
                                                              + resp_phase[:, None])
    b_vec[:, :, _QRS_SLOTS] *= resp_mod[:, :, None, None]

    # QRS fiducials per beat
    qrs_active = np.abs(b_vec[:, :, _QRS_SLOTS]).sum(-1) > 0
    q_on = np.where(qrs_active, b_off[:, :, _QRS_SLOTS] - 2 * b_sig[:, :, _QRS_SLOTS], np.inf).min(-1)
    q_off = np.where(qrs_active, b_off[:, :, _QRS_SLOTS] + 2 * b_sig[:, :, _QRS_SLOTS], -np.inf).max(-1)
    qrs_on, qrs_off = centers + q_on, centers + q_off

    # P waves (sinus beats, not AF, not PVC)
    pr = np.where(is_[_AVB], _lin(col(U["pr_avb"]), 0.22, 0.32),
                  _lin(col(P["pr"]), 0.13, 0.18) * (rr_mean / 0.8) ** 0.15)
    sig_p = 0.020 * t_scale
    has_p = ~is_[_AF][:, None] & ~is_pvc & valid
    p_on = qrs_on - pr[:, None]
    p1 = p_on + 2 * sig_p[:, None]
    b_off[:, :, _S["P1"]] = p1 - centers
    b_off[:, :, _S["P2"]] = p1 + 1.25 * sig_p[:, None] - centers
    b_sig[:, :, _S["P1"]] = b_sig[:, :, _S["P2"]] = sig_p[:, None]
    b_vec[:, :, _S["P1"]] *= has_p[..., None]
    b_vec[:, :, _S["P2"]] *= has_p[..., None]
    p_off_t = p1 + 3.25 * sig_p[:, None]

    # T waves: QT from the preceding RR (Fridericia), T width scales with it
    rr_q = np.clip(rr_prev, 0.3, 2.0)
    fr = rr_q ** (1.0 / 3.0)
    sig_t = sigma_t0[:, None] * fr * np.where(is_pvc, 1.3, 1.0)
    qt = np.where(is_pvc, qtc[:, None] * rr_mean[:, None] ** (1 / 3) + 0.04, qtc[:, None] * fr)
    t_off = qrs_on + qt
    t_pk = np.maximum(t_off - _T_OFF * sig_t, qrs_off + 0.02 - _T_ON * sig_t)
    t_on, t_off = t_pk + _T_ON * sig_t, t_pk + _T_OFF * sig_t
    for slot, (o, s_, w) in (("Ta", _TA), ("Tb", _TB)):
        k = _S[slot]
        b_off[:, :, k] = t_pk + o * sig_t - centers
        b_sig[:, :, k] = s_ * sig_t
        b_vec[:, :, k] = np.where(is_pvc[..., None], b_vec[:, :, k], v_t[:, None, :]) * w
    # ST segment components (zero vectors unless the ST is shifted)
    st_len = t_on - qrs_off
    for j, k in enumerate(_ST_SLOTS):
        b_off[:, :, k] = qrs_off + 0.5 * j * st_len - centers
        b_sig[:, :, k] = np.maximum(0.3 * st_len, 0.008)
        b_vec[:, :, k] = np.where(is_pvc[..., None], b_vec[:, :, k], v_st[:, None, :] / 1.5)

    # ---- render the dipole --------------------------------------------------------------------------
    live = valid[..., None] & (np.abs(b_vec).sum(-1) > 0)
    rec_idx = np.broadcast_to(np.arange(n)[:, None, None], B)[live]
    dip = _render(rec_idx, (centers[..., None] + b_off)[live], b_sig[live], b_vec[live], n, n_samples, fs)
    t = np.arange(n_samples) / fs
    if is_[_AF].any():
        rows = np.flatnonzero(is_[_AF])
        fq = _lin(U["f_freq"][rows], 4.0, 9.0)
        fm = _lin(U["f_fm"][rows], 0.05, 0.3)
        amp = _lin(col(U["f_amp"])[rows], 0.05, 0.15)
        mix = _lin(col(U["f_mix"])[rows], 0.2, 0.6)
        dirs = (np.einsum("nij,j->ni", rot[rows], _F_DIR1) * (amp * (1 - mix))[:, None],
                np.einsum("nij,j->ni", rot[rows], _F_DIR2) * (amp * mix)[:, None])
        for m in range(2):
            # frequency-modulated f-wave: phase 2 pi f t + phi + 3 sin(2 pi f_m t + psi)
            cyc = fq[:, m, None] * t[None, :]
            cyc -= np.floor(cyc)
            mod = _sin32(fm[:, m], t, 2 * np.pi * U["f_fm_phase"][rows, m])
            arg = (2 * np.pi * cyc + 2 * np.pi * U["f_phase"][rows, m, None]).astype(np.float32) + 3.0 * mod
            wave = np.sin(arg, out=arg)
            dip[rows] += dirs[m][:, :, None] * wave[:, None, :]

    # ---- project to I, II, V1-V6 with the noise sources as extra rows, add muscle noise ------------
    # x8 (n, 8, T) = M (n, 8, 8) @ S (n, 8, T), S rows: dipole X, Y, Z, respiration wander, two drifts,
    # powerline cos, powerline sin; M: lead vectors | wander gains | powerline phasors.
    pl_f = np.where(col(U["pl_f"]) < 0.5, 50.0, 60.0)
    pl_on = (col(U["pl_on"]) < 0.6) & (pl_f < 0.45 * fs)
    wander = _log(col(U["wander_amp"]), 0.01, 0.12)
    drift = _log(U["drift_amp"], 0.02, 0.3)
    emg = _log(col(U["emg_amp"]), 0.002, 0.04)
    pl_amp = np.where(pl_on, _log(col(U["pl_amp"]), 0.003, 0.03), 0.0)
    n_src = 8 if noise else 3
    S = np.empty((n, n_src, n_samples), dtype=np.float32)
    S[:, :3] = dip
    M = np.zeros((n, 8, n_src), dtype=np.float32)
    M[:, :, :3] = l8
    if noise:
        t32 = t.astype(np.float32)
        S[:, 3] = _sin32_low(resp_f, t32, resp_phase)
        for m in range(2):
            S[:, 4 + m] = _sin32_low(_lin(U["drift_f"][:, m], 0.02, 0.15), t32, 2 * np.pi * U["drift_phase"][:, m])
        gains = _lin(U["wander_gain"], -1.0, 1.0).reshape(n, 3, 8)
        M[:, :, 3] = gains[:, 0] * wander[:, None]
        M[:, :, 4] = gains[:, 1] * drift[:, 0, None]
        M[:, :, 5] = gains[:, 2] * drift[:, 1, None]
        S[:, 6:] = 0.0
        for f in (50.0, 60.0):
            rows = np.flatnonzero(pl_on & (pl_f == f))
            if len(rows):
                S[rows, 6] = np.cos(2 * np.pi * f * t)
                S[rows, 7] = np.sin(2 * np.pi * f * t)
        ph = 2 * np.pi * U["pl_phase"]
        a = pl_amp[:, None] * _lin(U["pl_gain"], 0.3, 1.0)
        M[:, :, 6] = a * np.cos(ph)
        M[:, :, 7] = -a * np.sin(ph)
    x8 = np.matmul(M, S)
    if noise:
        env = _sin32_low(_lin(col(U["emg_env_f"]), 0.1, 0.5), t32, 2 * np.pi * col(U["emg_env_phase"]))
        env *= _lin(col(U["emg_env_depth"]), 0.0, 0.8)[:, None].astype(np.float32)
        env += 1.0
        muscle = np.lib.stride_tricks.sliding_window_view(bank, n_samples)[emg_offsets]   # (n, 8, T) copy
        muscle *= (emg[:, None] * _lin(U["emg_gain"], 0.5, 1.5)).astype(np.float32)[:, :, None]
        muscle *= env[:, None, :]
        x8 += muscle
    X = np.empty((n, N_LEADS, n_samples), dtype=np.float32) if out is None else out[0]
    # I, II, V1-V6 are contiguous row blocks of the canonical order; the limb leads are derived exactly
    # (x * 0.5 == x / 2 bit for bit, so these equal the textbook formulas evaluated in float32)
    X[:, 0:2] = x8[:, 0:2]
    X[:, 6:12] = x8[:, 2:8]
    lead_i, lead_ii = X[:, 0], X[:, 1]
    np.subtract(lead_ii, lead_i, out=X[:, 2])                       # III = II - I
    np.add(lead_i, lead_ii, out=X[:, 3])
    X[:, 3] *= -0.5                                                 # aVR = -(I + II) / 2
    np.multiply(lead_ii, 0.5, out=X[:, 4])
    np.subtract(lead_i, X[:, 4], out=X[:, 4])                       # aVL = I - II / 2
    np.multiply(lead_i, 0.5, out=X[:, 5])
    np.subtract(lead_ii, X[:, 5], out=X[:, 5])                      # aVF = II - I / 2

    # ---- evidence -----------------------------------------------------------------------------------
    rec_b = np.broadcast_to(np.arange(n)[:, None], (n, n_beats))
    lead_sel = np.zeros((n, N_LEADS), dtype=bool)
    starts = np.full((n, n_beats), np.nan)
    ends = np.full((n, n_beats), np.nan)
    qrs_ev = is_[_BRADY] | is_[_TACHY] | is_[_BBB]
    lead_sel[is_[_BRADY] | is_[_TACHY] | is_[_AF] | is_[_AVB] | is_[_PVC]] = True
    lead_sel[bbb_rbbb[:, None] & np.isin(np.arange(N_LEADS), _BBB_LEADS[0])[None]] = True
    lead_sel[bbb_lbbb[:, None] & np.isin(np.arange(N_LEADS), _BBB_LEADS[1])[None]] = True
    lead_sel |= is_[_STE][:, None] & ((ste_proj >= 0.1) | (ste_proj <= -0.05))
    lead_sel |= twi_leads
    sel = np.broadcast_to(qrs_ev[:, None], (n, n_beats))
    starts, ends = np.where(sel, qrs_on, starts), np.where(sel, qrs_off, ends)
    sel = np.broadcast_to(is_[_AVB][:, None], (n, n_beats))
    starts, ends = np.where(sel, p_on, starts), np.where(sel, qrs_on, ends)
    sel = np.broadcast_to(is_[_STE][:, None], (n, n_beats))
    starts, ends = np.where(sel, qrs_off, starts), np.where(sel, t_on, ends)
    sel = np.broadcast_to(is_[_TWI][:, None], (n, n_beats))
    starts, ends = np.where(sel, t_on, starts), np.where(sel, t_off, ends)
    sel = is_[_PVC][:, None] & is_pvc
    starts, ends = np.where(sel, qrs_on, starts), np.where(sel, t_off, ends)
    sel = np.broadcast_to(is_[_AF][:, None], (n, n_beats))
    next_on = np.concatenate([qrs_on[:, 1:], np.full((n, 1), np.inf)], axis=1)
    starts, ends = np.where(sel, t_off, starts), np.where(sel, next_on, ends)
    # AF: the first beat slot lies before the record start (see _FIRST_BEAT), so the TP segments from the
    # first beat on cover the whole record; beats outside the record give empty (clipped) intervals.
    ok = np.isfinite(starts)
    ends = np.where(np.isinf(ends), duration + 1.0, ends)
    tmask = _interval_mask(rec_b[ok], starts[ok], ends[ok], n, n_samples, fs)
    evidence = np.empty((n, N_LEADS, n_samples), dtype=bool) if out is None else out[1]
    np.logical_and(tmask[:, None, :], lead_sel[:, :, None], out=evidence)

    info = {
        "centers": centers, "valid": valid, "is_pvc": is_pvc, "has_p": has_p, "p_on": p_on, "p_off": p_off_t,
        "qrs_on": qrs_on, "qrs_off": qrs_off, "t_on": t_on, "t_pk": t_pk, "t_off": t_off, "hr": hr, "pr": pr,
        "qtc": qtc, "territory": territory, "bbb_lbbb": bbb_lbbb, "ste_proj": ste_proj, "t_lead": t_new,
        "wander": wander, "drift": drift, "emg": emg, "pl_amp": pl_amp, "pl_f": np.where(pl_on, pl_f, 0.0),
        "rr_mean": rr_mean, "lead_sel": lead_sel,
    }
    return X, evidence, info


def _draw(indices: np.ndarray, seed: int, n_beats: int):
    """The random inputs of the given records: one ``default_rng([seed, index])`` per record (two draws), one
    ``default_rng([seed, patient, 1])`` per patient."""
    n = len(indices)
    u = np.empty((n, _N_U + n_beats + 8))
    up = np.empty((n, _N_UP))
    z = np.empty((n, n_beats))
    patients: dict[int, np.ndarray] = {}
    for k, index in enumerate(indices):
        rng = np.random.default_rng([seed, int(index)])
        u[k] = rng.random(_N_U + n_beats + 8)
        z[k] = rng.standard_normal(n_beats)
        pid = int(index) // _RECORDS_PER_PATIENT
        if pid not in patients:
            patients[pid] = np.random.default_rng([seed, pid, 1]).random(_N_UP)
        up[k] = patients[pid]
    emg_offsets = (u[:, _N_U + n_beats:] * _BANK_SIZE).astype(np.int64)
    return u[:, :_N_U], up, z, u[:, _N_U:_N_U + n_beats], emg_offsets


def _classes(indices: np.ndarray, seed: int) -> np.ndarray:
    blocks: dict[int, np.ndarray] = {}
    out = np.empty(len(indices), dtype=np.int64)
    for k, index in enumerate(indices):
        block, pos = divmod(int(index), _N_CLASSES)
        if block not in blocks:
            blocks[block] = np.random.default_rng([int(seed), block, 2]).permutation(_N_CLASSES)
        out[k] = blocks[block][pos]
    return out


def _batch(indices: np.ndarray, seed: int, fs: float, duration: float, n_samples: int, noise: bool,
           cls: np.ndarray | None = None, out: tuple[np.ndarray, np.ndarray] | None = None):
    n_beats = _n_beats(duration)
    if cls is None:
        cls = _classes(indices, seed)
    u, up, z, ub, emg_offsets = _draw(indices, seed, n_beats)
    bank = _noise_bank(int(seed), n_samples)
    X, ev, info = _synthesize(cls, u, up, z, ub, bank, emg_offsets, fs, duration, n_samples, noise, out)
    return X, cls, ev, info


def _check_seed_index(seed: int, index: int | None = None) -> None:
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if index is not None and int(index) < 0:
        raise ValueError(f"record index must be non-negative, got {index}")


def generate_arrays(n: int, seed: int = 0, fs: float = 500.0, duration: float = 10.0, *, start: int = 0,
                    noise: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate records ``start .. start + n - 1`` as arrays (vectorised; chunks of about 10^6 samples).

    Args:
        n: number of records.
        seed: corpus seed.
        fs: sampling rate in Hz.
        duration: record length in seconds (at least 2.5).
        start: index of the first record.
        noise: add baseline wander, muscle and powerline noise (False: clean signals, same morphology).

    Returns:
        ``(X, y, evidence)``: ``X (n, 12, T)`` float32 mV, ``y (n,)`` int64 index into
        :data:`SYNTHETIC_CLASSES`, ``evidence (n, 12, T)`` bool ground-truth masks, with ``T = round(fs *
        duration)``.
    """
    fs, duration, n_samples = _check_args(fs, duration)
    _check_seed_index(seed, start)
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    X = np.empty((n, N_LEADS, n_samples), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    ev = np.empty((n, N_LEADS, n_samples), dtype=bool)
    chunk = max(8, _CHUNK_SAMPLES // n_samples)
    for lo in range(0, n, chunk):
        idx = np.arange(start + lo, start + min(n, lo + chunk))
        sl = slice(lo, lo + len(idx))
        _, y[sl], _, _ = _batch(idx, int(seed), fs, duration, n_samples, noise, out=(X[sl], ev[sl]))
    return X, y, ev


def _to_samples(t: np.ndarray, fs: float) -> np.ndarray:
    return np.rint(t * fs).astype(np.int64)


def synthetic_patient_id(index: int, seed: int = 0) -> str:
    """Patient id of record ``index`` of the corpus of ``seed``.

    Args:
        index: record index (its patient is ``index // 3``).
        seed: corpus seed (patients of different seeds are different people: their morphology is drawn from it).

    Returns:
        ``"synp000001"`` for seed 0 (unchanged from before the seed was part of the id, so existing seed-0 caches
        stay valid), ``"synp000001-s7"`` for seed 7.
    """
    base = f"synp{int(index) // _RECORDS_PER_PATIENT:06d}"
    return base if int(seed) == 0 else f"{base}-s{int(seed)}"


def generate_record(index: int, seed: int = 0, fs: float = 500.0, duration: float = 10.0,
                    cls: str | None = None, *, noise: bool = True) -> ECGRecord:
    """Generate one record.

    Args:
        index: record index (``record_id = f"syn{index:06d}"``).
        seed: corpus seed.
        fs: sampling rate in Hz.
        duration: length in seconds (at least 2.5).
        cls: force a class from :data:`SYNTHETIC_CLASSES` (default: the balanced class of ``index``); the
            random draws (patient, rhythm, noise) are the same whatever the class.
        noise: add baseline wander, muscle and powerline noise.

    Returns:
        An :class:`ECGRecord` with ``signal (12, T)`` float32 mV, ``labels=(cls,)``, ``evidence (12, T)``
        bool, per-beat fiducial ``annotations`` (samples) and the ground-truth parameters in ``meta``.
    """
    fs, duration, n_samples = _check_args(fs, duration)
    _check_seed_index(seed, index)
    if cls is not None and cls not in SYNTHETIC_CLASSES:
        raise ValueError(f"unknown synthetic class {cls!r}; choose from {SYNTHETIC_CLASSES}")
    cls_ids = None if cls is None else np.array([SYNTHETIC_CLASSES.index(cls)])
    batch = _batch(np.array([int(index)]), int(seed), fs, duration, n_samples, noise, cls_ids)
    return _make_record(batch, 0, int(index), int(seed), fs, noise)


def _make_record(batch: tuple, k: int, index: int, seed: int, fs: float, noise: bool) -> ECGRecord:
    """Record ``k`` of a :func:`_batch` result as an :class:`ECGRecord` (annotations in samples, meta)."""
    X, y, ev, info = batch
    n_samples = X.shape[-1]
    c = int(y[k])
    centers = info["centers"][k]
    sample = _to_samples(centers, fs)
    inside = info["valid"][k] & (sample >= 0) & (sample < n_samples)
    pvc = info["is_pvc"][k][inside]
    has_p = info["has_p"][k][inside]
    ann: dict[str, Any] = {
        "sample": sample[inside],
        "symbol": np.where(pvc, "V", "N"),
        "p_onset": np.where(has_p, _to_samples(info["p_on"][k][inside], fs), -1),
        "p_offset": np.where(has_p, _to_samples(info["p_off"][k][inside], fs), -1),
    }
    for key, name in (("qrs_on", "qrs_onset"), ("qrs_off", "qrs_offset"), ("t_on", "t_onset"),
                      ("t_pk", "t_peak"), ("t_off", "t_offset")):
        ann[name] = _to_samples(info[key][k][inside], fs)
    sinus = inside & ~info["is_pvc"][k]
    qrs_ms = 1000 * float(np.median((info["qrs_off"][k] - info["qrs_on"][k])[sinus])) if sinus.any() else None
    meta: dict[str, Any] = {
        "class": SYNTHETIC_CLASSES[c],
        "hr_bpm": float(info["hr"][k]),
        "pr_ms": None if c == _AF else 1000 * float(info["pr"][k]),
        "qrs_ms": qrs_ms,
        "qtc_ms": 1000 * float(info["qtc"][k]),
        "n_pvc": int(pvc.sum()),
        "evidence_leads": [CANONICAL_LEADS[i] for i in np.flatnonzero(info["lead_sel"][k])],
        "noise": {"wander_mv": float(info["wander"][k]), "drift_mv": [float(v) for v in info["drift"][k]],
                  "emg_mv": float(info["emg"][k]), "powerline_mv": float(info["pl_amp"][k]),
                  "powerline_hz": float(info["pl_f"][k]) or None, "enabled": bool(noise)},
        "seed": seed,
        "index": index,
    }
    if c == _BBB:
        meta["bbb_type"] = "LBBB" if info["bbb_lbbb"][k] else "RBBB"
    if c in (_STE, _TWI):
        meta["territory"] = TERRITORIES[int(info["territory"][k])]
    if c == _STE:
        meta["st_shift_mv"] = {CANONICAL_LEADS[i]: round(float(v), 4) for i, v in enumerate(info["ste_proj"][k])}
    if c == _TWI:
        meta["t_amplitude_mv"] = {CANONICAL_LEADS[i]: round(float(v), 4) for i, v in enumerate(info["t_lead"][k])}
    header = {"units": "mV", "lead_names": list(CANONICAL_LEADS), "fs_original": fs,
              "generator": "ecgfm.data.synthetic", "path": f"synthetic/syn{index:06d}",
              "derived_leads": list(DERIVED_LIMB_LEADS)}
    return ECGRecord(
        signal=X[k].copy(), fs=fs, lead_mask=np.ones(N_LEADS, dtype=bool), record_id=f"syn{index:06d}",
        source="synthetic", patient_id=synthetic_patient_id(index, seed),
        labels=(SYNTHETIC_CLASSES[c],), meta=meta, header=header, evidence=ev[k].copy(), annotations=ann,
    ).validate()


_SOURCE_BLOCK = 32  # records generated together by SyntheticSource.load (amortises the per-call overhead)


class SyntheticSource:
    """The synthetic corpus as a :class:`~ecgfm.data.record.RecordSource` (picklable: plain attributes).

    Record ids are ``"syn000000"``, ``"syn000001"``, ... (wider when ``n_records`` exceeds 10^6). ``load``
    generates the block of 32 consecutive records holding the requested one and keeps the last block (not
    pickled), so reading the records in order costs about as much as :func:`generate_arrays`; a record is
    the same whichever order the records are read in.

    Args:
        n_records: number of records.
        seed: corpus seed.
        fs: sampling rate in Hz.
        duration: record length in seconds.
        noise: add noise (see :func:`generate_record`).
        leads: keep only these leads (canonical names, e.g. ``["I"]``; a string is one lead name, ``"II"``): the
            others are zeroed and marked absent in ``lead_mask`` (a one-lead corpus for lead-set tests and
            benchmarks); None: all twelve. Unknown or repeated names are refused.
    """

    name = "synthetic"

    def __init__(self, n_records: int, seed: int = 0, fs: float = 500.0, duration: float = 10.0,
                 noise: bool = True, leads: Sequence[str] | None = None):
        if leads is not None:
            leads = [leads] if isinstance(leads, str) else [str(v) for v in leads]
            unknown = [v for v in leads if v not in CANONICAL_LEADS]
            if unknown or not leads:
                raise ValueError(f"leads must be a non-empty list of {list(CANONICAL_LEADS)}, got {leads}")
            if len(set(leads)) != len(leads):
                raise ValueError(f"leads lists a lead twice: {leads}")
        self.leads = leads
        self.fs, self.duration, self._n_samples = _check_args(fs, duration)
        _check_seed_index(seed)
        if int(n_records) <= 0:
            raise ValueError(f"n_records must be positive, got {n_records}")
        self.n_records, self.seed, self.noise = int(n_records), int(seed), bool(noise)
        self.generator_version = GENERATOR_VERSION   # public: part of the description (cache fingerprints)
        self._width = max(6, len(str(self.n_records - 1)))
        self._block: tuple[int, tuple] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_block"] = None
        return state

    def __repr__(self) -> str:
        leads = f", leads={self.leads}" if self.leads is not None else ""
        # "derived=...": records carry header["derived_leads"] (a cache written before they did has another key);
        # "generator=...": GENERATOR_VERSION (a cache of records generated before has another key)
        return (f"SyntheticSource(n_records={self.n_records}, seed={self.seed}, fs={self.fs}, "
                f"duration={self.duration}{leads}, derived={','.join(DERIVED_LIMB_LEADS)}, "
                f"generator={getattr(self, 'generator_version', GENERATOR_VERSION)})")

    def __len__(self) -> int:
        return self.n_records

    def record_ids(self) -> list[str]:
        return [f"syn{i:0{self._width}d}" for i in range(self.n_records)]

    def load(self, record_id: str) -> ECGRecord:
        rid = str(record_id)
        if not (rid.startswith("syn") and rid[3:].isdigit() and len(rid) == 3 + self._width):
            raise ECGDataError(f"synthetic/{rid}", "not a synthetic record id (expected e.g. 'syn000000')")
        index = int(rid[3:])
        if index >= self.n_records:
            raise ECGDataError(f"synthetic/{rid}", f"index {index} is outside this source (n_records="
                                                   f"{self.n_records})")
        block = index // _SOURCE_BLOCK
        if self._block is None or self._block[0] != block:
            lo, hi = block * _SOURCE_BLOCK, min(self.n_records, (block + 1) * _SOURCE_BLOCK)
            self._block = (block, _batch(np.arange(lo, hi), self.seed, self.fs, self.duration, self._n_samples,
                                         self.noise))
        record = _make_record(self._block[1], index - block * _SOURCE_BLOCK, index, self.seed, self.fs,
                              self.noise)
        if self.leads is not None:
            mask = np.isin(np.asarray(CANONICAL_LEADS), self.leads)
            header = dict(record.header, derived_leads=[v for v in DERIVED_LIMB_LEADS if v in self.leads])
            # the evidence too: a class-defining feature on a lead this corpus does not have is no ground truth
            meta = dict(record.meta)
            if "evidence_leads" in meta:
                meta["evidence_leads"] = [lead for lead in meta["evidence_leads"] if lead in self.leads]
            evidence = None if record.evidence is None else record.evidence & mask[:, None]
            record = record.replace(signal=(record.signal * mask[:, None]).astype(record.signal.dtype),
                                    lead_mask=mask, header=header, evidence=evidence, meta=meta)
        return record.replace(record_id=rid)


def write_wfdb(out_dir: str | os.PathLike, n: int, seed: int = 0, fs: float = 500.0, duration: float = 10.0,
               ) -> list[Path]:
    """Write ``n`` synthetic records as a WFDB folder plus ``labels.csv``.

    Each record is ``syn000000.hea`` + ``.dat`` (format 16, gain 1000 adu/mV i.e. 1 uV resolution, units mV,
    the 12 canonical lead names). ``labels.csv`` has columns ``record_id, label, patient_id`` and is read by
    ``FolderSource(out_dir, labels_csv="labels.csv", id_column="record_id", label_columns=["label"],
    patient_column="patient_id")``.

    Returns:
        The ``.hea`` paths written, in record order.
    """
    import wfdb  # local import: only this function needs it

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = SyntheticSource(n, seed=seed, fs=fs, duration=duration)
    paths: list[Path] = []
    rows: list[tuple[str, str, str]] = []
    for rid in source.record_ids():
        rec = source.load(rid)
        sig = rec.signal.astype(np.float64).T
        if np.abs(sig).max() * 1000 >= 32767:
            raise ECGDataError(out / rid, "signal exceeds the 16-bit range at 1 uV resolution")
        wfdb.wrsamp(rid, fs=rec.fs, units=["mV"] * N_LEADS, sig_name=list(CANONICAL_LEADS), p_signal=sig,
                    fmt=["16"] * N_LEADS, adc_gain=[1000.0] * N_LEADS, baseline=[0] * N_LEADS,
                    comments=[f"label: {rec.labels[0]}", f"patient: {rec.patient_id}"], write_dir=str(out))
        paths.append(out / f"{rid}.hea")
        rows.append((rid, rec.labels[0], str(rec.patient_id)))
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["record_id", "label", "patient_id"])
        writer.writerows(rows)
    return paths


def class_subset(n: int, seed: int, classes: tuple[str, ...] | list[str], fs: float = 100.0,
                 duration: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Records of a few classes, z-scored per lead, with labels re-indexed into ``classes``.

    Generates ``n`` records (all classes, balanced) and keeps those whose class is in ``classes``; handy for
    small classifiers in tests, examples and explanation demos.

    Returns:
        ``(X, y)``: ``X (m, 12, T)`` float32 per-lead z-scored, ``y (m,)`` int64 index into ``classes``.
    """
    unknown = [c for c in classes if c not in SYNTHETIC_CLASSES]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; known: {list(SYNTHETIC_CLASSES)}")
    x, y, _ = generate_arrays(n, seed=seed, fs=fs, duration=duration)
    keep = np.isin(y, [SYNTHETIC_CLASSES.index(c) for c in classes])
    x = x[keep]
    x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
    y = np.array([list(classes).index(SYNTHETIC_CLASSES[i]) for i in y[keep]], dtype=np.int64)
    return x.astype(np.float32), y
