"""Tests of the synthetic 12-lead corpus: determinism, lead identities, measurable class features, evidence
masks, separability, the RecordSource and the WFDB export."""

from __future__ import annotations

import csv
import pickle
import time

import numpy as np
import pytest
from scipy import signal as sps

from ecgfm.data.preprocess import PreprocessSpec, preprocess_record
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord, RecordSource
from ecgfm.data.synthetic import (
    SYNTHETIC_CLASSES,
    TERRITORIES,
    SyntheticSource,
    class_of_index,
    generate_arrays,
    generate_record,
    write_wfdb,
)

L = {name: i for i, name in enumerate(CANONICAL_LEADS)}
TERRITORY_LEADS = {
    "inferior": ["II", "III", "aVF"],
    "anterior": ["V1", "V2", "V3", "V4"],
    "lateral": ["I", "aVL", "V5", "V6"],
}
FS = 500.0


def _clean(cls: str, index: int, fs: float = FS, duration: float = 10.0) -> ECGRecord:
    return generate_record(index, seed=0, fs=fs, duration=duration, cls=cls, noise=False)


def _full_beats(rec: ECGRecord) -> np.ndarray:
    """Beats whose P wave region and T wave lie inside the record."""
    a = rec.annotations
    return (a["qrs_onset"] - int(0.4 * rec.fs) >= 0) & (a["t_offset"] < rec.n_samples)


def _rr(rec: ECGRecord) -> np.ndarray:
    return np.diff(rec.annotations["sample"]) / rec.fs


# ---- determinism, shapes, identities ---------------------------------------------------------------------

def test_same_seed_same_bytes_and_different_index_differs():
    a = generate_record(7, seed=3, fs=250.0, duration=4.0)
    b = generate_record(7, seed=3, fs=250.0, duration=4.0)
    assert a.signal.tobytes() == b.signal.tobytes()
    assert a.evidence.tobytes() == b.evidence.tobytes()
    assert a.labels == b.labels and a.meta == b.meta
    c = generate_record(8, seed=3, fs=250.0, duration=4.0)
    d = generate_record(7, seed=4, fs=250.0, duration=4.0)
    assert not np.array_equal(a.signal, c.signal)
    assert not np.array_equal(a.signal, d.signal)


def test_arrays_match_records_and_do_not_depend_on_batch():
    X, y, ev = generate_arrays(12, seed=1, fs=100.0, duration=5.0)
    X2, y2, ev2 = generate_arrays(5, seed=1, fs=100.0, duration=5.0, start=7)
    np.testing.assert_allclose(X2, X[7:], atol=1e-5)
    np.testing.assert_array_equal(y2, y[7:])
    np.testing.assert_array_equal(ev2, ev[7:])
    for i in (0, 4, 11):
        rec = generate_record(i, seed=1, fs=100.0, duration=5.0)
        np.testing.assert_allclose(rec.signal, X[i], atol=1e-5)
        np.testing.assert_array_equal(rec.evidence, ev[i])
        assert rec.labels == (SYNTHETIC_CLASSES[y[i]],)


def test_shapes_dtypes_and_record_fields():
    X, y, ev = generate_arrays(10, seed=0, fs=100.0, duration=5.0)
    assert X.shape == (10, 12, 500) and X.dtype == np.float32
    assert y.shape == (10,) and y.dtype == np.int64 and y.min() >= 0 and y.max() < len(SYNTHETIC_CLASSES)
    assert ev.shape == X.shape and ev.dtype == bool
    assert np.isfinite(X).all()
    rec = generate_record(5, fs=250.0, duration=7.3)
    assert rec.signal.shape == (12, round(250 * 7.3)) and rec.signal.dtype == np.float32
    assert rec.evidence.shape == rec.signal.shape and rec.evidence.dtype == bool
    assert rec.lead_mask.all() and rec.fs == 250.0
    assert rec.record_id == "syn000005" and rec.source == "synthetic" and rec.patient_id == "synp000001"
    assert rec.labels == (SYNTHETIC_CLASSES[class_of_index(5)],)
    assert rec.header["units"] == "mV" and rec.header["lead_names"] == list(CANONICAL_LEADS)
    import json
    json.dumps(rec.meta), json.dumps(rec.header)  # JSON-able


def test_einthoven_goldberger_identities_hold_exactly():
    X, _, _ = generate_arrays(18, seed=2, fs=100.0, duration=3.0)   # noise included
    i, ii = X[:, L["I"]], X[:, L["II"]]
    np.testing.assert_array_equal(X[:, L["III"]], ii - i)
    np.testing.assert_array_equal(X[:, L["aVR"]], -(i + ii) / 2)
    np.testing.assert_array_equal(X[:, L["aVL"]], i - ii / 2)
    np.testing.assert_array_equal(X[:, L["aVF"]], ii - i / 2)


def test_classes_are_balanced_and_patients_hold_three_records():
    _, y, _ = generate_arrays(90, seed=5, fs=50.0, duration=2.5, noise=False)
    assert np.bincount(y, minlength=9).tolist() == [10] * 9
    assert [class_of_index(i, seed=5) for i in range(90)] == y.tolist()
    pids = [generate_record(i, fs=50.0, duration=2.5).patient_id for i in range(7)]
    assert pids == ["synp000000"] * 3 + ["synp000001"] * 3 + ["synp000002"]


def test_patient_morphology_is_shared_within_a_patient():
    def qrs_amplitudes(index):
        """Median over beats of each lead's QRS peak-to-peak amplitude (respiration modulates single beats)."""
        rec = _clean("normal_sinus", index)
        a = rec.annotations
        p2p = [np.ptp(rec.signal[:, on:off + 1], axis=1)
               for on, off in zip(a["qrs_onset"][_full_beats(rec)], a["qrs_offset"][_full_beats(rec)])]
        return np.median(p2p, axis=0)

    ref = qrs_amplitudes(0)
    same = np.abs(qrs_amplitudes(1) / ref - 1).max()
    other = np.abs(qrs_amplitudes(3) / ref - 1).max()
    assert same < 0.08 and other > 0.2, (same, other)


def test_normal_morphology_r_wave_progression_and_amplitudes():
    for index in (0, 3, 6, 9):
        rec = _clean("normal_sinus", index)
        a = rec.annotations
        k = int(np.flatnonzero(_full_beats(rec))[0])
        qrs = rec.signal[:, a["qrs_onset"][k]:a["qrs_offset"][k] + 1]
        r, s = qrs.max(1), -qrs.min(1)
        assert r[L["V1"]] < s[L["V1"]]                     # rS in V1
        assert r[L["V6"]] > s[L["V6"]]                     # qR in V6
        assert r[L["V5"]] > r[L["V1"]] and r[L["V4"]] > r[L["V2"]]
        assert 0.5 < r[L["II"]] < 2.5 and 0.8 < max(r[L["V4"]], r[L["V5"]]) < 3.0
        assert qrs[L["aVR"]].sum() < 0                      # aVR mostly negative
        # biphasic P in V1, upright P and T in II
        assert rec.signal[L["II"], a["t_peak"][k]] > 0.05


# ---- class features ---------------------------------------------------------------------------------------

def test_heart_rate_classes():
    for index in range(8):
        hr = {c: 60.0 / _rr(_clean(c, index)).mean() for c in ("normal_sinus", "sinus_bradycardia",
                                                                "sinus_tachycardia")}
        assert hr["sinus_bradycardia"] < 60 <= hr["normal_sinus"] <= 100 < hr["sinus_tachycardia"]


def test_atrial_fibrillation_rr_irregular_no_p_and_f_waves():
    def irregularity(rr):
        return np.std(np.diff(rr)) / rr.mean()

    for index in range(6):
        af, nsr = _clean("atrial_fibrillation", index), _clean("normal_sinus", index)
        assert irregularity(_rr(af)) > 0.12 > irregularity(_rr(nsr))
        assert (af.annotations["p_onset"] == -1).all() and (nsr.annotations["p_onset"] >= 0).any()
        assert af.meta["pr_ms"] is None
        # f-waves on the baseline: the clean AF record's TP segments (its evidence) oscillate at 4-9 Hz with
        # >= 0.012 mV RMS in V1; the sinus record's T-P baselines are flat
        af_rms, af_freq = _baseline_activity(af, af.annotations["qrs_onset"])
        ns_rms, _ = _baseline_activity(nsr, nsr.annotations["p_onset"])
        assert af_rms > 0.012 and ns_rms < 0.002
        assert 3.5 < af_freq < 10.5
        assert af.evidence[L["V1"]].mean() > 0.1 and af.evidence.all(0).sum() == af.evidence.any(0).sum()


def _baseline_activity(rec: ECGRecord, next_onsets: np.ndarray) -> tuple[float, float]:
    """RMS (mV) and zero-crossing frequency (Hz) of V1 from 50 ms after each T offset to 20 ms before the next
    onset (away from the Gaussian tails of the waves)."""
    a, x = rec.annotations, rec.signal[L["V1"]]
    segs = []
    for k in range(len(a["sample"]) - 1):
        lo, hi = a["t_offset"][k] + int(0.05 * rec.fs), next_onsets[k + 1] - int(0.02 * rec.fs)
        if lo >= 0 and hi < rec.n_samples and hi - lo > 0.06 * rec.fs:
            segs.append(sps.detrend(x[lo:hi]))          # a T wave's tail is a slow trend, f-waves are not
    assert segs, "no T-P segment"
    rms = float(np.sqrt(np.mean(np.concatenate(segs) ** 2)))
    crossings = sum(int(np.sum(np.diff(np.sign(s)) != 0)) for s in segs)
    freq = crossings / 2 / (sum(len(s) for s in segs) / rec.fs)
    return rms, freq


def test_first_degree_av_block_pr_interval():
    for index in range(6):
        for cls, lo, hi in (("first_degree_av_block", 0.2, 0.4), ("normal_sinus", 0.11, 0.2)):
            rec = _clean(cls, index)
            a = rec.annotations
            ok = a["p_onset"] >= 0
            pr = (a["qrs_onset"][ok] - a["p_onset"][ok]) / rec.fs
            assert len(pr) >= 3 and lo < pr.min() and pr.max() < hi, (cls, index, pr)
            if cls == "first_degree_av_block":
                # evidence = the PR intervals, all leads
                k = int(np.flatnonzero(ok & _full_beats(rec))[0])
                assert rec.evidence[:, a["p_onset"][k] + 1:a["qrs_onset"][k] - 1].all()
                assert not rec.evidence[:, a["qrs_offset"][k] + 1:a["t_offset"][k]].any()


def test_bundle_branch_block_qrs_width_and_subtype_morphology():
    seen = set()
    for index in range(12):
        rec = _clean("bundle_branch_block", index)
        a = rec.annotations
        width = (a["qrs_offset"] - a["qrs_onset"]) / rec.fs
        assert width.min() >= 0.12
        bbb = rec.meta["bbb_type"]
        seen.add(bbb)
        k = int(np.flatnonzero(_full_beats(rec))[0])
        on, off = a["qrs_onset"][k], a["qrs_offset"][k]
        v1 = rec.signal[L["V1"], on:off + 1]
        third = (off - on) // 3
        if bbb == "RBBB":      # terminal R' in V1, terminal (wide) S in I and V6
            assert v1[-third:].max() > 0.3
            assert rec.signal[L["I"], on:off + 1][-third:].min() < -0.1
            assert rec.signal[L["V6"], on:off + 1][-third:].min() < -0.1
        else:                  # QS in V1, broad positive QRS in V6 without septal q
            assert v1.min() < -0.6 and v1.max() < 0.15
            v6 = rec.signal[L["V6"], on:off + 1]
            assert v6.max() > 0.4 and v6[:third].min() > -0.05
        leads = [CANONICAL_LEADS[i] for i in np.flatnonzero(rec.evidence.any(1))]
        assert leads == rec.meta["evidence_leads"] and "V1" in leads and "V6" in leads
        assert rec.evidence[L["V1"], on + 1:off - 1].all()
    assert seen == {"RBBB", "LBBB"}
    normal = _clean("normal_sinus", 0).annotations
    assert ((normal["qrs_offset"] - normal["qrs_onset"]) / FS).max() < 0.11


def test_st_elevation_in_territory_with_reciprocal_depression():
    territories = set()
    for index in range(12):
        rec = _clean("st_elevation", index)
        terr = rec.meta["territory"]
        territories.add(terr)
        a = rec.annotations
        full = _full_beats(rec)
        mid = ((a["qrs_offset"] + a["t_onset"]) // 2)[full]
        st = np.median(rec.signal[:, mid], axis=1)
        core = [L[n] for n in TERRITORY_LEADS[terr]]
        assert st[core].min() >= 0.1, (terr, st[core])
        assert st.min() < -0.05                                  # reciprocal depression somewhere
        ev_leads = set(np.flatnonzero(rec.evidence.any(1)))
        assert set(core) <= ev_leads and np.argmin(st) in ev_leads
        k = int(np.flatnonzero(full)[0])
        assert rec.evidence[core[0], a["qrs_offset"][k] + 1:a["t_onset"][k] - 1].all()
        assert not rec.evidence[:, a["qrs_onset"][k]:a["qrs_offset"][k] - 1].any()
    assert territories == set(TERRITORIES)
    nsr = _clean("normal_sinus", 0)
    a = nsr.annotations
    mid = ((a["qrs_offset"] + a["t_onset"]) // 2)[_full_beats(nsr)]
    assert np.abs(nsr.signal[:, mid]).max() < 0.05


def test_t_wave_inversion_in_territory():
    for index in range(9):
        rec = _clean("t_wave_inversion", index)
        terr = rec.meta["territory"]
        a = rec.annotations
        full = _full_beats(rec)
        t_amp = np.median(rec.signal[:, a["t_peak"][full]], axis=1)
        core = [L[n] for n in TERRITORY_LEADS[terr]]
        assert t_amp[core].max() <= -0.1, (terr, t_amp[core])
        k = int(np.flatnonzero(full)[0])
        for lead in core:
            assert rec.evidence[lead, a["t_onset"][k] + 1:a["t_offset"][k] - 1].all()
        assert not rec.evidence[:, a["qrs_onset"][k]:a["qrs_offset"][k]].any()
    nsr = _clean("normal_sinus", 0)
    t_amp = np.median(nsr.signal[:, nsr.annotations["t_peak"][_full_beats(nsr)]], axis=1)
    assert t_amp[L["II"]] > 0.05 and t_amp[L["V5"]] > 0.1 and t_amp[L["aVR"]] < 0


def test_premature_ventricular_beats():
    for index in range(9):
        rec = _clean("premature_ventricular_beats", index)
        a = rec.annotations
        v = np.flatnonzero(a["symbol"] == "V")
        assert 1 <= len(v) <= 3 and rec.meta["n_pvc"] == len(v)
        assert (a["p_onset"][v] == -1).all()                       # no P wave
        assert ((a["qrs_offset"] - a["qrs_onset"])[v] / rec.fs).min() >= 0.12   # wide
        rr = _rr(rec)
        normal = (a["symbol"][1:] == "N") & (a["symbol"][:-1] == "N")
        sinus_rr = np.median(rr[normal])
        for k in v[(v > 0) & (v < len(a["sample"]) - 1)]:
            assert rr[k - 1] < 0.8 * sinus_rr                       # premature
            assert abs((rr[k - 1] + rr[k]) / (2 * sinus_rr) - 1) < 0.12   # compensatory pause
            # discordant T: T peak opposite to the dominant QRS deflection in most leads
            qrs = rec.signal[:, a["qrs_onset"][k]:a["qrs_offset"][k] + 1]
            dom = np.where(qrs.max(1) > -qrs.min(1), qrs.max(1), qrs.min(1))
            t = rec.signal[:, a["t_peak"][k]]
            big = np.abs(dom) > 0.5
            assert np.mean(np.sign(dom[big]) != np.sign(t[big])) >= 0.75
            # evidence: the whole ectopic beat in all leads, nothing on the sinus beats
            assert rec.evidence[:, a["qrs_onset"][k] + 1:a["t_offset"][k] - 1].all()
        sinus = np.flatnonzero((a["symbol"] == "N") & (a["sample"] < rec.n_samples))
        assert not rec.evidence[:, a["sample"][sinus]].any()


def test_evidence_masks_per_class():
    X, y, ev = generate_arrays(45, seed=0, fs=100.0, duration=10.0)
    for c, name in enumerate(SYNTHETIC_CLASSES):
        masks = ev[y == c]
        if name == "normal_sinus":
            assert not masks.any()
        else:
            assert all(m.any() for m in masks), name
            assert all(m.mean() < 0.7 for m in masks), name
    for c in ("sinus_bradycardia", "sinus_tachycardia"):
        rec = _clean(c, 2)
        a = rec.annotations
        inside = (a["qrs_onset"] >= 0) & (a["qrs_offset"] < rec.n_samples)
        assert rec.evidence[:, a["sample"][inside]].all()                       # every QRS, all leads
        assert not rec.evidence[:, a["t_peak"][inside & (a["t_peak"] < rec.n_samples)]].any()


def test_noise_is_present_and_realistic():
    noisy, clean = generate_record(4, fs=FS), generate_record(4, fs=FS, noise=False)
    diff = noisy.signal - clean.signal
    assert 0.001 < diff.std() < 0.5
    f, p = sps.welch(diff[L["V2"]], fs=FS, nperseg=4096)
    assert p[f < 0.7].mean() > p[(f > 10) & (f < 40)].mean()        # baseline wander dominates
    recs = [generate_record(i, fs=FS) for i in range(24)]
    hz = [r.meta["noise"]["powerline_hz"] for r in recs]
    assert {50.0, 60.0} <= set(hz) and None in hz
    # powerline: a line at the mains frequency in the noise of the independent leads (I, II, V1-V6)
    rec = max(recs, key=lambda r: r.meta["noise"]["powerline_mv"])
    assert rec.meta["noise"]["powerline_mv"] > 0.01
    d = rec.signal - generate_record(rec.meta["index"], fs=FS, noise=False).signal
    line = rec.meta["noise"]["powerline_hz"]
    indep = [L[n] for n in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
    power = {f: sum(_amplitude(d[i], FS, f) ** 2 for i in indep) for f in (line, line + 3.7, line - 6.1)}
    assert power[line] > 20 * max(power[line + 3.7], power[line - 6.1])
    # at 100 Hz there is no mains component (anti-aliased acquisition)
    assert all(generate_record(i, fs=100.0).meta["noise"]["powerline_hz"] is None for i in range(12))


def _amplitude(x: np.ndarray, fs: float, freq: float) -> float:
    t = np.arange(x.shape[-1]) / fs
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x.astype(np.float64), rcond=None)
    return float(np.hypot(*coef))


def test_simple_features_separate_the_classes():
    """A logistic regression on simple signal features (no fiducials) separates the nine classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fs = 100.0
    t0 = time.perf_counter()
    X, y, _ = generate_arrays(270, seed=11, fs=fs, duration=10.0)
    print(f"generate_arrays: {270 / (time.perf_counter() - t0):.0f} records/s at 100 Hz x 10 s "
          "(one measurement on a shared machine; speed is not asserted)")
    sos = sps.butter(2, [0.7, 35], btype="bandpass", fs=fs, output="sos")
    Xf = sps.sosfiltfilt(sos, X, axis=-1)

    def features(x):
        energy = np.abs(np.diff(x[[L["II"], L["V2"], L["V5"]]], axis=-1)).sum(0)
        peaks, _ = sps.find_peaks(energy, distance=int(0.25 * fs), height=0.4 * np.percentile(energy, 99))
        rr = np.diff(peaks) / fs
        rr = rr if len(rr) > 1 else np.array([1.0, 1.0])
        # median beat per lead (peaks aligned), sampled every 40 ms from -300 ms to +500 ms
        offs = np.arange(-30, 50, 4)
        ok = peaks[(peaks + offs[0] >= 0) & (peaks + offs[-1] < x.shape[-1])]
        beat = np.median(x[:, ok[:, None] + offs[None, :]], axis=1) if len(ok) else np.zeros((12, len(offs)))
        width = (np.abs(np.diff(beat, axis=1)) > 0.05).sum(1)
        return np.concatenate([[60 / rr.mean(), np.std(np.diff(rr)) / rr.mean(), rr.std() / rr.mean(),
                                rr.min() / np.median(rr)], beat.ravel(), width])

    F = np.stack([features(x) for x in Xf])
    n_train = 180
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    clf.fit(F[:n_train], y[:n_train])
    n_test = len(y) - n_train
    acc = (clf.predict(F[n_train:]) == y[n_train:]).mean()
    # Wilson 95 % interval of the held-out accuracy
    z = 1.96
    centre = (acc + z * z / (2 * n_test)) / (1 + z * z / n_test)
    half = z * np.sqrt(acc * (1 - acc) / n_test + z * z / (4 * n_test ** 2)) / (1 + z * z / n_test)
    print(f"synthetic 9-class logistic regression, held-out test records (n={n_test}): accuracy {acc:.3f} "
          f"(95% Wilson CI {centre - half:.3f}-{centre + half:.3f})")
    assert acc >= 0.8


def test_preprocess_resamples_evidence_with_the_signal():
    rec = generate_record(6, fs=FS, duration=5.0)
    out = preprocess_record(rec, PreprocessSpec(fs=100.0))
    assert out.signal.shape == (12, 500) and out.evidence.shape == (12, 500)
    assert out.evidence.any() == rec.evidence.any()
    assert abs(out.evidence.mean() - rec.evidence.mean()) < 0.02


# ---- source, errors, WFDB -----------------------------------------------------------------------------------

def test_synthetic_source_is_a_picklable_record_source():
    src = SyntheticSource(12, seed=2, fs=100.0, duration=3.0)
    assert isinstance(src, RecordSource) and src.name == "synthetic" and len(src) == 12
    ids = src.record_ids()
    assert ids == sorted(ids) and ids[0] == "syn000000" and ids[-1] == "syn000011"
    a = src.load("syn000010")
    blob = pickle.dumps(src)                  # the generated block is not pickled
    assert len(blob) < 10_000
    b = pickle.loads(blob).load("syn000010")
    assert a.signal.tobytes() == b.signal.tobytes()
    single = generate_record(10, seed=2, fs=100.0, duration=3.0)
    np.testing.assert_allclose(a.signal, single.signal, atol=1e-6)
    np.testing.assert_array_equal(a.evidence, single.evidence)
    assert a.meta == single.meta and a.labels == single.labels and a.patient_id == single.patient_id
    for key in single.annotations:
        np.testing.assert_array_equal(a.annotations[key], single.annotations[key])
    # the same bytes whatever the reading order (blocks of records are generated together)
    backwards = SyntheticSource(12, seed=2, fs=100.0, duration=3.0)
    for rid in reversed(ids):
        assert backwards.load(rid).signal.tobytes() == src.load(rid).signal.tobytes()
    with pytest.raises(ECGDataError, match="syn000012"):
        src.load("syn000012")
    with pytest.raises(ECGDataError, match="not a synthetic record id"):
        src.load("rec1")
    big = SyntheticSource(1_000_001, fs=100.0, duration=3.0)     # ids widen beyond 10^6 records
    assert big.load("syn1000000").record_id == "syn1000000"
    with pytest.raises(ECGDataError, match="not a synthetic record id"):
        big.load("syn000001")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="duration"):
        generate_record(0, duration=1.0)
    with pytest.raises(ValueError, match="sampling rate"):
        generate_arrays(2, fs=0.0)
    with pytest.raises(ValueError, match="unknown synthetic class"):
        generate_record(0, cls="sinus_rhythm")
    with pytest.raises(ValueError, match="non-negative"):
        generate_record(-1)
    with pytest.raises(ValueError, match="n_records"):
        SyntheticSource(0)


def test_write_wfdb_round_trip(tmp_path):
    import wfdb

    from ecgfm.data.readers.folder import FolderSource

    paths = write_wfdb(tmp_path, 4, seed=1, fs=100.0, duration=3.0)
    assert [p.name for p in paths] == [f"syn00000{i}.hea" for i in range(4)]
    src = SyntheticSource(4, seed=1, fs=100.0, duration=3.0)
    for path, rid in zip(paths, src.record_ids()):
        w = wfdb.rdrecord(str(path.with_suffix("")))
        assert w.sig_name == list(CANONICAL_LEADS) and w.fs == 100.0 and w.units == ["mV"] * 12
        assert w.fmt == ["16"] * 12
        np.testing.assert_allclose(w.p_signal.T, src.load(rid).signal, atol=6e-4)
    with open(tmp_path / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["record_id"] for r in rows] == src.record_ids()
    assert [r["label"] for r in rows] == [src.load(i).labels[0] for i in src.record_ids()]
    folder = FolderSource(tmp_path, labels_csv="labels.csv", id_column="record_id", label_columns=["label"],
                          patient_column="patient_id")
    rec = folder.load("syn000002")
    assert rec.labels == src.load("syn000002").labels and rec.patient_id == "synp000000-s1"   # seed 1's patient
    np.testing.assert_allclose(rec.signal, src.load("syn000002").signal, atol=6e-4)


def test_synthetic_source_lead_subset():
    """``leads=["I"]``: a one-lead corpus (others zeroed and absent); repr (the plan fingerprint) unchanged without it."""
    from ecgfm.data.synthetic import SyntheticSource

    full, one = SyntheticSource(4, seed=3), SyntheticSource(4, seed=3, leads=["I"])
    a, b = full.load("syn000002"), one.load("syn000002")
    assert b.lead_mask.tolist() == [True] + [False] * 11
    np.testing.assert_array_equal(b.signal[0], a.signal[0])
    assert not b.signal[1:].any()
    assert "leads" not in repr(full) and "leads=['I']" in repr(one)
    with pytest.raises(ValueError, match="leads"):
        SyntheticSource(4, leads=["X9"])


def test_derived_limb_leads_are_marked():
    """III, aVR, aVL and aVF are computed from I and II: every record says so (``derived_leads``), a lead subset
    marks only the derived leads it keeps, and the cache key (repr) names the marking."""
    from ecgfm.data.synthetic import SyntheticSource

    full, some = SyntheticSource(4, seed=3), SyntheticSource(4, seed=3, leads=["I", "II", "aVF"])
    assert full.load("syn000001").derived_leads == ("III", "aVR", "aVL", "aVF")
    assert some.load("syn000001").derived_leads == ("aVF",)
    assert SyntheticSource(4, seed=3, leads=["I"]).load("syn000000").derived_leads == ()
    assert "derived=III,aVR,aVL,aVF" in repr(full)


def test_a_lead_subset_keeps_evidence_on_its_leads_only():
    """SyntheticSource(leads=[...]) zeroed the other leads but kept their evidence: ground truth on flat leads."""
    src = SyntheticSource(6, seed=0, leads=["I"])
    for rid in src.record_ids():
        rec = src.load(rid)
        if rec.evidence is not None:
            assert not rec.evidence[1:].any()
        assert set(rec.meta.get("evidence_leads", [])) <= {"I"}
