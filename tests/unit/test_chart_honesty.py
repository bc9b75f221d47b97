"""The 12-lead chart says what it does not show: the share of the attribution a 3 x 4 layout leaves off (each lead
2.5 s of 10 s), leads the record does not have (not flat recorded traces), zero padding, and values beyond the
colour scale."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.explain.visualize import plot_ecg_chart

FS, T = 100.0, 1000


def _header(fig) -> str:
    return next(t.get_text() for t in fig.texts if t.get_gid() == "chart_header").replace("\n", " ")


def _signal() -> np.ndarray:
    return (0.3 * np.random.default_rng(0).standard_normal((12, T))).astype(np.float32)


def test_a_3x4_chart_says_how_much_of_the_attribution_it_draws():
    """A map equal to 1 on V1 at 1.0-1.5 s is not on a 3 x 4 chart (V1 shows 5.0-7.5 s): nothing said so."""
    att = np.zeros((12, T), np.float32)
    att[CANONICAL_LEADS.index("V1"), 100:150] = 1.0
    assert "0 % of |attribution| drawn" in _header(plot_ecg_chart(_signal(), FS, attribution=att))
    rows = plot_ecg_chart(_signal(), FS, attribution=att, layout="rows")
    assert "attribution| drawn" not in _header(rows)
    uniform = np.abs(np.random.default_rng(1).standard_normal((12, T))).astype(np.float32)
    assert "% of |attribution| drawn" in _header(plot_ecg_chart(_signal(), FS, attribution=uniform))
    with pytest.raises(ValueError, match="layout"):
        plot_ecg_chart(_signal(), FS, layout="4x3")


def test_absent_leads_padding_and_clipped_colours_are_shown_as_such():
    sig = _signal()
    sig[2:6] = 0.0                                      # III, aVR, aVL, aVF not recorded
    present = np.ones(12, bool)
    present[2:6] = False
    att = np.random.default_rng(2).standard_normal((12, T)).astype(np.float32)
    att[1, 500] = 50.0                                  # far beyond the 99th percentile
    fig = plot_ecg_chart(sig, FS, attribution=att, present=present, padded_from_s=8.0)
    head = _header(fig)
    assert "not recorded: III, aVR, aVL, aVF" in head and "zero-padded from 8.00 s" in head
    chart = next(a for a in fig.axes if a.get_gid() == "ecg_chart")
    assert sum(t.get_gid() == "absent_lead" for t in chart.texts) == 4
    assert any(p.get_gid() == "padding" for p in chart.patches)
    bar = [a for a in fig.axes if a is not chart][0]
    assert "clipped" in bar.get_ylabel()


def test_traces_beyond_their_row_are_clipped_and_marked_and_no_lead_is_dropped():
    """A 5 mV peak at a fixed 10 mm/mV ran off the chart (or into the row above) unmarked; leads beyond the
    standard 12 were left off the 3 x 4 chart, and a lead named twice lost one of its rows."""
    sig = _signal()
    sig[0, 100:105] = 5.0                              # lead I, inside its 0-2.5 s column
    fig = plot_ecg_chart(sig, FS, gain=10)
    chart = next(a for a in fig.axes if a.get_gid() == "ecg_chart")
    assert any(line.get_gid() == "clipped" for line in chart.lines)
    assert any(t.get_gid() == "clipped_note" and "I" in t.get_text() for t in fig.texts)
    extra = np.vstack([_signal(), _signal()[:1]])
    fig = plot_ecg_chart(extra, FS, lead_names=list(CANONICAL_LEADS) + ["V4R"])
    chart = next(a for a in fig.axes if a.get_gid() == "ecg_chart")
    assert "V4R" in [t.get_text() for t in chart.texts if t.get_gid() == "lead_label"]
    with pytest.raises(ValueError, match="named twice"):
        plot_ecg_chart(extra, FS, lead_names=list(CANONICAL_LEADS) + ["II"])
