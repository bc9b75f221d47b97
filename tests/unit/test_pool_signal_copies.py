"""Held-out-free pools leave out near-copies of held-out records (``source_signal_copies``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SyntheticSource
from ecgfm.evaluate.leakage import source_signal_copies
from ecgfm.evaluate.tasks import TaskSpec, build_task, heldout_free_source

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
N_SYN = 30


class _WithCopies:
    """A synthetic source plus records that are rescaled copies of some of its records (other ids)."""

    def __init__(self, copies: dict[str, str], gain: float = 2.5, offset: float = 0.3):
        self.inner = SyntheticSource(N_SYN, seed=1, fs=100.0, duration=3.0)
        self.name = self.inner.name
        self.copies, self.gain, self.offset = dict(copies), gain, offset

    def record_ids(self) -> list[str]:
        return list(self.inner.record_ids()) + sorted(self.copies)

    def load(self, record_id: str):
        if record_id not in self.copies:
            return self.inner.load(record_id)
        rec = self.inner.load(self.copies[record_id])
        sig = np.where(rec.lead_mask[:, None], rec.signal * self.gain + self.offset, 0.0).astype(np.float32)
        return dataclasses.replace(rec, signal=sig, record_id=record_id)


def _syn_task() -> dict:
    return {"name": "syn", "dataset": "syn", "labels": "record", "multilabel": False, "crop_seconds": 1.0,
            "sources": [{"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": N_SYN, "seed": 1,
                         "fs": 100.0, "duration": 3.0}],
            "split": {"kind": "stratified", "fractions": [0.6, 0.2, 0.2], "seed": 0}}


def _held_ids(cache_root: Path) -> tuple[list[str], list[str]]:
    task = build_task(TaskSpec.from_config(_syn_task()), str(cache_root), PreprocessSpec())
    ids = task.cache.index["record_id"]
    held = sorted(str(ids.iat[int(i)]) for p in ("val", "test") for i in task.splits[p])
    train = sorted(str(ids.iat[int(i)]) for i in task.splits["train"])
    return held, train


def test_pool_leaves_out_a_rescaled_copy_of_a_held_out_record(tmp_path, caplog):
    held, train = _held_ids(tmp_path)
    src = _WithCopies({"copy_of_held": held[0], "copy_of_train": train[0]})
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.tasks"):
        pool = heldout_free_source(src, [_syn_task()], cache_root=str(tmp_path))
    # the copy of a held-out record goes; a copy of a training record stays (both originals are not evaluated)
    assert set(pool.exclude) == set(held) | {"copy_of_held"}
    assert "copy_of_train" in pool.record_ids() and train[0] in pool.record_ids()
    assert [(e, p) for e, p, _ in pool.copies] == [(held[0], "copy_of_held")] and pool.copies[0][2] >= 0.9999
    assert "copy_of_held ~ " + held[0] in caplog.text
    # the pool's cache key names the larger excluded set; without the check the copy stays in the pool
    plain = heldout_free_source(src, [_syn_task()], cache_root=str(tmp_path), signal_copy_threshold=None)
    assert set(plain.exclude) == set(held) and "copy_of_held" in plain.record_ids() and plain.copies == ()
    assert repr(plain) != repr(pool)


def test_no_false_copies_among_distinct_synthetic_records(tmp_path):
    src = SyntheticSource(N_SYN, seed=1, fs=100.0, duration=3.0)
    ids = src.record_ids()
    assert source_signal_copies(src, ids[:10], ids[10:]) == []


def test_short_records_other_rates_and_lead_subsets(tmp_path):
    held, _ = _held_ids(tmp_path)
    inner = SyntheticSource(N_SYN, seed=1, fs=100.0, duration=3.0)
    original = inner.load(held[0])

    class Source:
        name = "synthetic"

        def record_ids(self):
            return [*inner.record_ids(), "short", "one_lead", "other_rate"]

        def load(self, rid):
            if rid == "short":      # the first second only: shorter than the screened window, scored exactly
                return dataclasses.replace(original, signal=original.signal[:, :100].copy(), record_id=rid)
            if rid == "one_lead":   # lead II alone: a copy over the one lead both hold
                mask = np.zeros(12, bool)
                mask[1] = True
                return dataclasses.replace(original, signal=np.where(mask[:, None], original.signal, 0.0),
                                           lead_mask=mask, record_id=rid)
            if rid == "other_rate":   # same samples, another rate: not compared (not resampled)
                return dataclasses.replace(original, fs=250.0, record_id=rid)
            return inner.load(rid)

    pairs = source_signal_copies(Source(), [held[0], held[1]], ["short", "one_lead", "other_rate", held[2]],
                                 chunk_records=2)
    assert [(e, p) for e, p, _ in pairs] == [(held[0], "one_lead"), (held[0], "short")]
    assert all(c >= 0.9999 for _, _, c in pairs)


@pytest.mark.skipif(not (SHARED / "ptbxl").is_dir(), reason="needs ../shared/data/ptbxl (the shared PTB-XL copy)")
def test_shared_ptbxl_copy_of_validation_record_140_is_found():
    from ecgfm.data.readers import PTBXLSource

    src = PTBXLSource(SHARED / "ptbxl", fs=100, include_unlabelled=True)
    ids = src.record_ids()
    pairs = source_signal_copies(src, ["00140"], [r for r in ids if r != "00140"])
    assert [(e, p) for e, p, _ in pairs] == [("00140", "01370")] and pairs[0][2] > 0.999


def test_unreadable_short_and_nan_records_do_not_break_or_hide_the_check(tmp_path, caplog):
    """One unreadable record ended the whole pool's preparation; a 1-sample held-out record switched the check off
    for its rate; a NaN sample zeroed its lead's score (a copy scored 0.957)."""
    from ecgfm.data.record import ECGDataError

    inner = SyntheticSource(N_SYN, seed=1, fs=100.0, duration=3.0)
    ids = inner.record_ids()
    original = inner.load(ids[0])

    class Source:
        name = "synthetic"

        def record_ids(self):
            return [*ids, "broken", "tiny", "nan_copy"]

        def load(self, rid):
            if rid == "broken":
                raise ECGDataError(f"/data/{rid}.hea", "unreadable header")
            if rid == "tiny":
                return dataclasses.replace(original, signal=original.signal[:, :1].copy(), record_id=rid)
            if rid == "nan_copy":
                sig = original.signal.copy()
                sig[1, 40] = np.nan
                return dataclasses.replace(original, signal=sig, record_id=rid)
            return inner.load(rid)

    with caplog.at_level(logging.INFO, logger="ecgfm.evaluate.leakage"):
        pairs = source_signal_copies(Source(), [ids[0], "tiny", "broken"], ["broken", "nan_copy", ids[1]])
    assert [(e, p) for e, p, _ in pairs] == [(ids[0], "nan_copy")] and pairs[0][2] > 0.999
    assert "broken not compared (/data/broken.hea" in caplog.text
    with pytest.raises(ValueError, match=r"threshold must be a correlation in \(0, 1\], got 0"):
        source_signal_copies(Source(), [ids[0]], [ids[1]], threshold=0)
