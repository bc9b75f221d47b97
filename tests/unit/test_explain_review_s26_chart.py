"""Explain review s26 (2026-12-07): the clinical chart of a short record, of a record in microvolts, and the PTB-XL
demo's training membership.

1. The 3 x 4 chart of a record shorter than the model's window split the whole window, padding included, into its
   four columns: V1-V6 of a 4 s record in a 10 s window were drawn over the zero padding only (and the chest gain
   was "chosen" from zeros). The columns now split the recorded span, or the chart falls back to one row per lead
   when that span is too short, and the header says which.
6. A record in microvolts was charted as millivolts without a word, every trace clipped, and the clip note advised
   "a lower gain shows them whole" at the lowest gain already. Now the header and a ``UserWarning`` name the likely
   unit problem (nothing is rescaled), and the note says the traces are too tall even at the lowest gain.
8. ``training_membership`` called PTB-XL 00385 (``PACE`` only, strat_fold 1) a training record of the PTB-XL demo
   classifier, whose loader drops records without a superdiagnostic label. A fold now decides only with the record's
   task labels; without them the record is "in the training folds", never "training".

Every model here is a tiny hand-built CNN; records are synthetic except in the shared-data test (skipped when
``../shared/data`` is absent).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS, ECGRecord
from ecgfm.explain import visualize as viz

FS = 100.0
N_T = 1000                                   # the model's window: 10 s at 100 Hz
PTBXL_DEMO = "PTB-XL superdiagnostic, ecg_id <= 500, 100 Hz; strat_fold 1-8 train (352 records), 9 validation (72)"


def _beats(n: int, amplitude: float = 1.0, seed: int = 0) -> np.ndarray:
    """``(12, n)`` mV: a Gaussian beat every 0.8 s, a random amplitude per lead, plus noise."""
    g = np.random.default_rng(seed)
    s = np.arange(n) / FS
    beats = sum(np.exp(-((s - c) ** 2) / (2 * 0.015 ** 2)) for c in np.arange(0.3, n / FS, 0.8))
    sig = g.uniform(0.5, 1.0, (12, 1)) * beats + 0.03 * g.standard_normal((12, n))
    return (amplitude * sig).astype(np.float32)


def _padded(n_real: int, chest_mv: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A record of ``n_real`` samples zero-padded to the window, its chest leads ``chest_mv`` tall, and a positive
    attribution on its recorded samples."""
    sig = np.zeros((12, N_T), np.float32)
    sig[:, :n_real] = _beats(n_real)
    sig[6:, :n_real] *= chest_mv
    att = np.zeros((12, N_T), np.float32)
    att[:, :n_real] = np.abs(np.random.default_rng(1).standard_normal((12, n_real)))
    return sig, att


def _chart(fig):
    return next(a for a in fig.axes if a.get_gid() == "ecg_chart")


def _header(fig) -> str:
    return next(t.get_text() for t in fig.texts if t.get_gid() == "chart_header").replace("\n", " ")


def _labels(fig) -> list[tuple[str, float, float]]:
    """``(lead, column start s, y)`` of every lead label (a label sits 0.05 s after its column's start)."""
    return [(t.get_text(), t.get_position()[0] - 0.05, t.get_position()[1]) for t in _chart(fig).texts
            if t.get_gid() == "lead_label"]


def _clip_note(fig) -> str | None:
    notes = [t.get_text().replace("\n", " ") for t in fig.texts if t.get_gid() == "clipped_note"]
    return notes[0] if notes else None


# ------------------------------------------------------------------------------- 1. the 3 x 4 chart of a short record
def test_short_record_columns_split_the_recorded_span():
    """6 s recorded in a 10 s window: the four columns are 1.5 s each over 0-6 s (V4-V6 were at 7.5-10 s, all
    padding), and the chest gain is chosen from the recorded chest signal (it was 10 mm/mV from the zeros)."""
    n_real = 600
    sig, att = _padded(n_real, chest_mv=4.0)          # 4 mV chest complexes: 10 mm/mV would overflow their rows
    fig = viz.plot_ecg_chart(sig, FS, CANONICAL_LEADS, attribution=att, padded_from_s=n_real / FS)
    labels = _labels(fig)
    bottom = min(y for _, _, y in labels)             # the rhythm strip's row
    grid = [(lead, a) for lead, a, y in labels if y > bottom]
    assert sorted(lead for lead, _ in grid) == sorted(CANONICAL_LEADS)
    for lead, a in grid:                              # every column starts (and lies) on recorded signal
        assert a + 1.5 <= n_real / FS + 1e-6, (lead, a)
    assert {round(a, 6) for _, a in grid} == {0.0, 1.5, 3.0, 4.5}
    assert all(fig.ecg_gains[lead] < 10.0 for lead in CANONICAL_LEADS[6:])
    head = _header(fig)
    assert "3 x 4 columns 1.5 s each over the recorded 6.00 s" in head
    assert "zero-padded from 6.00 s" in head
    # the padding is still shaded, and the rhythm strip still spans the whole window at 25 mm/s
    assert any(p.get_gid() == "padding" for p in _chart(fig).patches)
    x0, x1 = _chart(fig).get_xlim()
    assert x1 == pytest.approx(N_T / FS + 0.04)


def test_record_too_short_for_columns_gets_one_row_per_lead():
    """4 s recorded in a 10 s window: columns would be 1 s; every lead gets a full-length row over its recorded 4 s
    (V1-V6 were drawn over padding only, V5 holding a third of the attribution and none of it shown)."""
    n_real = 400
    sig, att = _padded(n_real)
    fig = viz.plot_ecg_chart(sig, FS, CANONICAL_LEADS, attribution=att, padded_from_s=n_real / FS)
    labels = _labels(fig)
    assert sorted(lead for lead, _, _ in labels) == sorted(CANONICAL_LEADS)    # 12 rows, no 3 x 4 grid
    assert all(a == pytest.approx(0.0) for _, a, _ in labels)
    head = _header(fig)
    assert "one row per lead: the recorded 4.00 s is too short for 3 x 4 columns" in head
    assert "% of |attribution| drawn" not in head                               # every lead drawn whole


def test_full_and_unpadded_records_keep_the_standard_layout():
    """A 10 s record keeps 2.5 s columns; a 2.5 s window without padding keeps its quarter-window columns."""
    fig = viz.plot_ecg_chart(_beats(N_T), FS, CANONICAL_LEADS)
    starts = {round(a, 6) for lead, a, _ in _labels(fig) if lead != "II"}
    assert starts == {0.0, 2.5, 5.0, 7.5}
    assert "3 x 4 columns" not in _header(fig) and "one row per lead" not in _header(fig)
    assert "3 x 4 columns 0.625 s each (a quarter of the 2.5 s window" in \
        _header(viz.plot_ecg_chart(_beats(250), FS, CANONICAL_LEADS))


# ------------------------------------------------------------------------------- 6. a record in microvolts
def test_microvolt_chart_is_named_and_the_clip_note_is_truthful():
    uv = _beats(N_T, amplitude=1000.0)
    with pytest.warns(UserWarning, match="microvolts"):
        fig = viz.plot_ecg_chart(uv, FS, CANONICAL_LEADS, record_id="r/uv")
    head = _header(fig)
    assert "amplitudes implausible for mV" in head and "not rescaled" in head
    assert "gain 2.5 mm/mV" in head                                   # drawn as given, at the lowest gain
    note = _clip_note(fig)
    assert note is not None and "a lower gain shows" not in note
    assert "too tall for a row even at the lowest standard gain, 2.5 mm/mV" in note
    # the method comparison says it too
    cmp_fig = viz.plot_method_comparison(uv, FS, {"ig": np.ones_like(uv)})
    assert "implausible for mV" in next(t.get_text() for t in cmp_fig.texts
                                        if t.get_gid() == "amplitude_label").replace("\n", " ")


def test_millivolt_chart_is_not_warned_and_a_fixed_gain_still_gets_its_advice():
    sig = _beats(N_T)
    sig[0, 100:105] = 5.0                                             # lead I, inside its 0-2.5 s column
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # no unit warning for a record in mV
        fig = viz.plot_ecg_chart(sig, FS, CANONICAL_LEADS, gain=10)
    assert "implausible" not in _header(fig)
    note = _clip_note(fig)
    assert note.startswith("clipped at the row's edge (red ticks): I") and "a lower gain shows them whole" in note
    assert viz.unit_problem(sig * 1000, "normalised units") is None  # only a chart in mV is checked


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(12, 8, 7, padding=3), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


def test_explain_records_warns_about_a_microvolt_record(tmp_path):
    """A z-scoring model explains a record in microvolts as it does in mV (the scale cancels); its chart did not."""
    from ecgfm.explain.report import explain_records
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)
    wrapper = ECGWrapper(_TinyCNN().eval(), fs=FS, preprocess=PreprocessSpec(fs=FS), n_samples=500,
                         class_names=("a", "b", "c"))
    rec = ECGRecord(signal=_beats(500, amplitude=1000.0), fs=FS, lead_mask=np.ones(12, bool), record_id="uv",
                    source="t")
    with pytest.warns(UserWarning, match="microvolts"):
        explain_records(wrapper, [rec], tmp_path, methods=["saliency"], faithfulness=False, formats=[])


# ------------------------------------------------------------------------------- 8. PTB-XL demo membership
def _ptbxl(rid: str, fold: int, codes: dict[str, float] | None) -> ECGRecord:
    meta = {"strat_fold": fold} if codes is None else {"strat_fold": fold, "scp_codes": codes}
    return ECGRecord(signal=np.zeros((12, 10), np.float32), fs=FS, lead_mask=np.ones(12, bool), record_id=rid,
                     source="ptbxl", meta=meta, labels=tuple(sorted(codes or {})))


def _statements(root: Path) -> SimpleNamespace:
    """A PTB-XL source stand-in whose root holds a small ``scp_statements.csv``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "scp_statements.csv").write_text(
        ",description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass\n"
        "NORM,normal ECG,1.0,,,NORM,NORM\n"
        "IMI,inferior myocardial infarction,1.0,,,MI,IMI\n"
        "PACE,normal functioning artificial pacemaker,,,1.0,,\n"
        "SR,sinus rhythm,,,1.0,,\n")
    return SimpleNamespace(name="ptbxl", root=root)


def test_a_fold_record_without_a_task_label_is_not_called_training(tmp_path):
    from ecgfm.explain.report import _MEMBERSHIP_TEXT, training_membership

    src = _statements(tmp_path / "ptbxl")
    # 00385: PACE only, fold 1: the demo's loader dropped it (no superdiagnostic label)
    assert training_membership(PTBXL_DEMO, _ptbxl("00385", 1, {"PACE": 0.0}), source=src) == "held out"
    assert training_membership(PTBXL_DEMO, _ptbxl("00390", 9, {"PACE": 0.0, "SR": 0.0}), source=src) == "held out"
    # with a label of the task the folds decide, as before
    assert training_membership(PTBXL_DEMO, _ptbxl("00001", 3, {"NORM": 100.0, "SR": 0.0}), source=src) == "training"
    assert training_membership(PTBXL_DEMO, _ptbxl("00017", 9, {"IMI": 50.0}), source=src) == "validation"
    assert training_membership(PTBXL_DEMO, _ptbxl("00180", 10, {"NORM": 100.0}), source=src) == "held out"
    # labels that cannot be read (no source, no scp_codes): in the folds, never "training"
    assert training_membership(PTBXL_DEMO, _ptbxl("00385", 1, {"PACE": 0.0})) == "training folds"
    assert training_membership(PTBXL_DEMO, _ptbxl("00017", 9, None), source=src) == "validation fold"
    assert training_membership(PTBXL_DEMO, _ptbxl("00385", 1, {"PACE": 0.0}),
                               source=SimpleNamespace(name="ptbxl", root=tmp_path / "none")) == "training folds"
    for key in ("training folds", "validation fold"):
        assert "TRAINING DATA" not in _MEMBERSHIP_TEXT[key] and "only if it has a label" in _MEMBERSHIP_TEXT[key]


def test_shared_ptbxl_00385_is_not_a_training_record(shared_data, caplog):
    """The reviewer's case on the shared PTB-XL copy: 00385 was "IN THE CLASSIFIER'S TRAINING DATA"."""
    from ecgfm.data.readers import PTBXLSource
    from ecgfm.explain.report import training_membership

    root = shared_data / "ptbxl"
    if not (root / "scp_statements.csv").is_file():
        pytest.skip(f"no PTB-XL copy at {root}")
    caplog.set_level(logging.ERROR, logger="ecgfm")   # restored after the test (a bare setLevel leaked into others)
    src = PTBXLSource(root, fs=100, include_unlabelled=False)
    assert training_membership(PTBXL_DEMO, src.load("00385"), source=src) == "held out"
    assert training_membership(PTBXL_DEMO, src.load("00001"), source=src) == "training"
