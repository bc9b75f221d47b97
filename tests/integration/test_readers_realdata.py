"""Every reader on the full ../shared/data corpora: counts, shapes, rates, leads, labels.

The default run loads a deterministic sample of each corpus (a few seconds); ``-m "slow"`` loads every record
(about 2,500 + 2,500 + 100 files, ~10-30 s depending on the machine).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.readers import (
    Challenge2021Source,
    CinC2017Source,
    CPSC2018Source,
    CPSC2021Source,
    FolderSource,
    MITBIHSource,
    PTBXLSource,
    load_ptbxl_table,
    ptbxl_label_space,
)
from ecgfm.data.record import CANONICAL_LEADS, ECGRecord

pytestmark = pytest.mark.realdata

ALL12 = CANONICAL_LEADS


def _check(rec: ECGRecord, fs: float, leads: tuple[str, ...], n_samples: int | tuple[int, int]) -> None:
    assert rec.fs == fs, rec.key
    assert rec.present_leads == leads, rec.key
    assert rec.signal.dtype == np.float32 and rec.signal.shape[0] == 12
    if isinstance(n_samples, tuple):
        assert n_samples[0] <= rec.n_samples <= n_samples[1], (rec.key, rec.n_samples)
    else:
        assert rec.n_samples == n_samples, (rec.key, rec.n_samples)
    present = rec.signal[rec.lead_mask]
    assert np.isfinite(present).all(), rec.key
    # physiological amplitude in mV: not ADC units, not volts
    peak = float(np.abs(present).max())
    assert 0.05 < peak < 40, (rec.key, peak)
    assert not rec.signal[~rec.lead_mask].any()


def _sample(ids: list[str], every: int) -> list[str]:
    """Every ``every``-th id plus the last; small corpora (<= 100 records, fast) are read whole."""
    return ids if every <= 1 or len(ids) <= 100 else ids[::every] + [ids[-1]]


def _corpus_checks(data: Path, every: int) -> dict[str, collections.Counter]:
    """Load (a sample of) every corpus, check each record, return label counters for the caller."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    p100 = PTBXLSource(data / "ptbxl", fs=100)
    ids = p100.record_ids()
    assert len(ids) == 1999 and ids[0] == "00001" and ids[-1] == "01999"
    for rid in _sample(ids, every):
        rec = p100.load(rid)
        _check(rec, 100.0, ALL12, 1000)
        labelled = int(rid) <= 500
        assert bool(rec.labels) == labelled and bool(rec.meta) == labelled and (rec.patient_id is not None) == labelled
        counts["ptbxl100"]["labelled" if labelled else "unlabelled"] += 1

    p500 = PTBXLSource(data / "ptbxl", fs=500)
    ids = p500.record_ids()
    assert ids == [f"{i:05d}" for i in range(1, 501)]
    for rid in _sample(ids, every):
        rec = p500.load(rid)
        _check(rec, 500.0, ALL12, 5000)
        low = p100.load(rid)
        assert rec.labels == low.labels and rec.meta == low.meta and rec.patient_id == low.patient_id
        # the 100 Hz file is the 500 Hz one decimated by 5: same scale and timing (max over 500 records: 0.039)
        assert np.abs(rec.signal.reshape(12, -1, 5).mean(-1) - low.signal).mean() < 0.06

    cinc = CinC2017Source(data / "cinc2017")
    ids = cinc.record_ids()
    assert len(ids) == 2558
    for rid in _sample(ids, every):
        rec = cinc.load(rid)
        _check(rec, 300.0, ("I",), (9 * 300, 61 * 300))
        assert rec.labels == (rec.meta["label"],) and rec.header["lead_renamed"] == {"ECG": "I"}
        counts["cinc2017"][rec.labels[0]] += 1

    ch = Challenge2021Source(data / "cinc2021")
    ids = ch.record_ids()
    assert len(ids) == 49 and "E07510" not in ids
    for rid in _sample(ids, every):
        rec = ch.load(rid)
        _check(rec, 500.0, ALL12, 5000)
        assert rec.labels and list(rec.labels) == rec.meta["dx"] and all(c.isdigit() for c in rec.labels)
        counts["challenge_subset"][rec.meta["subset"]] += 1
        counts["challenge_dx_raw"].update(rec.meta["dx_raw"])
        if rid.startswith("HR"):
            assert rec.meta["ptbxl_ecg_id"] == int(rid[2:])

    cp21 = CPSC2021Source(data / "cpsc2021")
    ids = cp21.record_ids()
    assert len(ids) == 18
    for rid in _sample(ids, every):
        rec = cp21.load(rid)
        _check(rec, 200.0, ("I", "II"), (41 * 200, 520 * 200))
        cls = rec.labels[0]
        counts["cpsc2021"][cls] += 1
        eps = rec.annotations["af_episodes"]
        peaks = rec.annotations["r_peaks"]
        assert len(peaks) > 0.3 * rec.duration and np.all(np.diff(peaks) > 0)
        assert all(0 <= s < e < rec.n_samples for s, e in eps)
        if cls == "non_af":
            assert eps == []
        elif cls == "persistent_af":
            assert eps == [[0, rec.n_samples - 1]]
        else:
            assert eps and sum(e - s for s, e in eps) < rec.n_samples - 1

    cp18 = CPSC2018Source(data / "cpsc2018")
    assert cp18.record_ids() == [f"A{i}" for i in range(1980, 1990)]
    for rid in _sample(cp18.record_ids(), every):
        rec = cp18.load(rid)
        _check(rec, 500.0, ALL12, (6 * 500, 60 * 500))
        assert rec.meta["sex"] in ("M", "F") and 0 < rec.meta["age"] < 120

    mit = MITBIHSource(data / "physionet-samples")
    assert mit.record_ids() == ["100"]
    rec = mit.load("100")
    _check(rec, 360.0, ("II", "V5"), 650000)
    counts["mitbih"].update(rec.annotations["symbol"].tolist())
    assert rec.meta == {"age": 69.0, "sex": "M"}

    ptbdb = FolderSource(data / "physionet-samples", name="ptbdb")
    assert ptbdb.record_ids() == ["100", "s0010_re"]
    rec = ptbdb.load("s0010_re")
    _check(rec, 1000.0, ALL12, 38400)
    assert rec.header["dropped_leads"] == ["vx", "vy", "vz"]
    return counts


def test_ptbxl_superclass_counts_acceptance(shared_data):
    """PROVENANCE-1-500.md: NORM 297, STTC 96, CD 78, MI 73, HYP 40; 12 records without a diagnostic code."""
    src = PTBXLSource(shared_data / "ptbxl", fs=100)
    sup = src.labels("superdiagnostic")
    assert len(sup) == 500
    counts = collections.Counter(c for labels in sup.values() for c in labels)
    assert counts == {"NORM": 297, "STTC": 96, "CD": 78, "MI": 73, "HYP": 40}
    assert sum(1 for labels in sup.values() if not labels) == 12
    rhythm = collections.Counter(c for labels in src.labels("rhythm").values() for c in labels)
    assert {k: rhythm[k] for k in ("SR", "SARRH", "AFIB", "SBRAD", "AFLT", "PACE", "STACH")} == {
        "SR": 407, "SARRH": 26, "AFIB": 13, "SBRAD": 9, "AFLT": 8, "PACE": 6, "STACH": 5}
    folds = collections.Counter(src.folds().values())
    assert [folds[i] for i in range(1, 11)] == [58, 51, 34, 42, 47, 33, 44, 44, 81, 66]
    table = load_ptbxl_table(shared_data / "ptbxl")
    assert table.patient_id.nunique() == 466
    assert set(ptbxl_label_space(shared_data / "ptbxl", "superdiagnostic")) == set(counts)


def test_every_corpus_sampled(shared_data):
    counts = _corpus_checks(shared_data, every=25)
    assert counts["ptbxl100"]["labelled"] > 0 and counts["ptbxl100"]["unlabelled"] > 0
    assert set(counts["cinc2017"]) <= {"N", "A", "O", "~"}
    assert set(counts["cpsc2021"]) == {"non_af", "paroxysmal_af", "persistent_af"}


@pytest.mark.slow
def test_every_record_of_every_corpus(shared_data):
    counts = _corpus_checks(shared_data, every=1)
    assert counts["ptbxl100"] == {"labelled": 500, "unlabelled": 1499}
    assert counts["cinc2017"] == {"N": 1531, "O": 732, "A": 221, "~": 74}
    assert counts["challenge_subset"] == {"georgia": 19, "ptbxl": 10, "ningbo": 20}
    assert len(counts["challenge_dx_raw"]) == 25 and counts["challenge_dx_raw"]["427084000"] == 23
    assert counts["cpsc2021"] == {"non_af": 6, "paroxysmal_af": 6, "persistent_af": 6}
    assert {k: counts["mitbih"][k] for k in "NAV"} == {"N": 2239, "A": 33, "V": 1}


def test_mitbih_records_of_one_subject_share_a_patient(shared_data, tmp_path):
    """MIT-BIH records 201 and 202 come from one subject: one patient id, so patient-level splits keep them
    together (record 100 copied under those names; any other record keeps its own name)."""
    src = shared_data / "physionet-samples"
    for name in ("201", "202", "203"):
        header = (src / "100.hea").read_text().replace("100 2 360", f"{name} 2 360").replace("100.dat", f"{name}.dat")
        (tmp_path / f"{name}.hea").write_text(header)
        for ext in ("dat", "atr"):
            (tmp_path / f"{name}.{ext}").write_bytes((src / f"100.{ext}").read_bytes())
    mit = MITBIHSource(tmp_path)
    assert {r: mit.load(r).patient_id for r in mit.record_ids()} == {"201": "201", "202": "201", "203": "203"}
