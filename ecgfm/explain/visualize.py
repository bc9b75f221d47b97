"""Figures for ECG explanations (matplotlib, headless, object-oriented: no pyplot state).

* :func:`plot_ecg_chart`: the clinical 12-lead chart: a 3 x 4 layout of 2.5 s segments (I/II/III,
  aVR/aVL/aVF, V1-V3, V4-V6) and a 10 s rhythm strip (lead II), at true paper scale (25 mm/s; gain 10, 5 or
  2.5 mm/mV, chosen from the amplitude for the limb and the chest leads separately so tall V1-V3 complexes do not
  run into the next row: :func:`choose_gain`) on a 1 mm / 5 mm grid in ECG-paper colours, with lead labels, a
  1 mV calibration pulse per row at the row's gain and a header (record id, sampling rate, gain, paper speed);
  optionally a
  signed attribution overlay (diverging colormap, symmetric normalisation: red drives the explained score up,
  blue down) as coloured trace segments (``overlay="line"``) or a translucent band (``overlay="band"``).
  Records without all 12 leads get one full-length row per lead. A zero-padded record (shorter than the model's
  window) gets its four columns over the recorded span, or one row per lead when that span is under
  4 x :data:`MIN_COLUMN_S`; amplitudes implausible for mV (microvolts, ADC counts) are warned, not rescaled.
* :func:`plot_method_comparison`: one row per attribution method, one column per lead, on the same record.
* :func:`plot_lead_importance`: per-lead importance bars (share of |attribution| per lead, grouped by method).
* :func:`plot_counterfactual`: original vs counterfactual traces and their difference, with wave windows.
* :func:`plot_tcav`: TCAV scores with error bars, the random-concept reference and significance stars.
* :func:`save_figure`: PNG / SVG / PDF.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so no GUI backend and no global
figure registry is involved). Colormaps come from :data:`matplotlib.colormaps` (``cm.get_cmap`` was removed in
matplotlib 3.9).

Conventions: ``signal`` is ``(L, T)`` (numpy or torch), in mV for the chart (pass ``units`` otherwise), sampled
at ``fs``; an attribution is ``(L, T')`` at ``attribution_fs`` (default: the signal's rate, so ``T' = T``; an
:class:`~ecgfm.explain.attribution.Attribution` brings its own rate); it is interpolated onto the signal's time axis
when the rates differ, and refused when it covers another duration than the signal or has another length and no
rate.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ecgfm.data.record import CANONICAL_LEADS, canonical_lead

# ECG paper: 25 mm/s, 10 mm/mV; 1 mm minor and 5 mm major squares. The chart's y axis is in "paper mV" (10 mm);
# a trace drawn at gain g mm/mV is scaled by g / MM_PER_MV.
MM_PER_S = 25.0
MM_PER_MV = 10.0
#: standard gains (mm/mV) of electrocardiographs, the largest first: :func:`choose_gain` picks among them.
GAINS_MM_PER_MV = (10.0, 5.0, 2.5)
LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")
MINOR_S, MAJOR_S = 1.0 / MM_PER_S, 5.0 / MM_PER_S            # 0.04 s, 0.2 s
MINOR_MV, MAJOR_MV = 1.0 / MM_PER_MV, 5.0 / MM_PER_MV        # 0.1 mV, 0.5 mV
PAPER_BG = "#fffafa"
GRID_MINOR = "#f4c7c7"
GRID_MAJOR = "#e38d8d"
TRACE = "#111111"
CMAP = "RdBu_r"
# The standard layout: 4 columns of 3 leads, each column 2.5 s of a 10 s recording.
LAYOUT_3X4: tuple[tuple[str, ...], ...] = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"),
                                           ("III", "aVF", "V3", "V6"))
#: narrowest 3 x 4 column (s) laid over the recorded span of a zero-padded record (about one beat at 40 bpm): a
#: shorter recording (under 6 s) is drawn one full-length row per lead instead
MIN_COLUMN_S = 1.5
#: a chart "in mV" whose typical (median) present lead swings more than this peak to peak is not in mV (an ECG
#: swings about 0.5-5 mV; microvolts or ADC counts swing hundreds to thousands): the API's threshold
#: (:data:`ecgfm.api.UNNORMALISED_MAX_PTP_MV`)
MAX_TYPICAL_PTP_MV = 50.0
FORMATS = ("png", "svg", "pdf")
_MM = 1.0 / 25.4  # inches per mm


def _np(a: Any) -> np.ndarray:
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _attribution_and_rate(a: Any, fs: float | None) -> tuple[Any, float | None]:
    """``(L, T')`` values and their rate from an :class:`~ecgfm.explain.attribution.Attribution` of one record
    (its own ``fs``) or from an array (rate ``fs``, None = the signal's)."""
    if hasattr(a, "values") and hasattr(a, "fs") and not callable(a.values):
        values = a.values
        if values.ndim == 3:
            if values.shape[0] != 1:
                raise ValueError(f"an Attribution of {values.shape[0]} records: draw one (Attribution.values[i] with "
                                 f"attribution_fs=Attribution.fs)")
            values = values[0]
        if fs is not None and float(fs) != float(a.fs):
            raise ValueError(f"attribution_fs={fs:g} but the Attribution was computed at {a.fs:g} Hz")
        return values, float(a.fs)
    return a, fs


def _lead_index(lead_names: Sequence[str]) -> dict[str, int]:
    """Row of each lead, by canonical name where it has one. A lead named twice is refused: one of its rows would
    not be drawn (the chart showed one of two ``II`` rows without a word)."""
    out: dict[str, int] = {}
    for i, name in enumerate(lead_names):
        try:
            lead = canonical_lead(name)
        except KeyError:
            lead = str(name)
        key = lead or str(name)
        if key in out:
            raise ValueError(f"lead {key!r} is named twice in {list(lead_names)}: one row would not be drawn")
        out[key] = i
    return out


def symmetric_norm(values: np.ndarray, percentile: float = 99.0) -> Normalize:
    """Symmetric colour normalisation ``[-v, v]`` with ``v`` the ``percentile`` of ``|values|`` (robust to a
    few extreme samples; zero maps to the colormap's centre)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    vmax = float(np.percentile(v, percentile)) if v.size else 0.0
    if not vmax > 0:
        vmax = float(v.max()) if v.size and v.max() > 0 else 1.0
    return Normalize(vmin=-vmax, vmax=vmax)


def _scale_samples(att: np.ndarray, here: np.ndarray, n_real: int) -> np.ndarray:
    """The attribution samples a colour scale is drawn from: the present leads' (``here``) recorded samples (the
    first ``n_real``); absent rows and zero padding are zeros that would pull the scale down. All of ``att`` when
    nothing is recorded."""
    return att[here][:, :n_real] if here.any() and n_real else att


def _cmap(name: str = CMAP):
    return matplotlib.colormaps[name]


def _resample_to(att: np.ndarray, att_fs: float | None, n: int, fs: float) -> np.ndarray:
    """Attribution ``(L, T')`` at ``att_fs`` onto ``n`` samples at ``fs`` (linear interpolation). ``att_fs=None``:
    only an attribution of the signal's own length (``T' = n``, the signal's rate). An attribution covering another
    duration than the signal is refused: stretched or edge-held it would colour beats it never saw.

    Raises:
        ValueError: the two durations differ by more than one sample of the coarser rate, or ``T' != n`` without
            ``att_fs`` (the rate, hence the duration, is unknown: inferring it made any map "fit" the signal).
    """
    if att_fs is None:
        if att.shape[-1] != n:   # a 1000-sample map of a 5000-sample record: 100 Hz over 10 s, or 2 s at 500 Hz?
            raise ValueError(f"the attribution has {att.shape[-1]} samples and the signal {n}: give attribution_fs "
                             f"(the rate the attribution was computed at, e.g. Attribution.fs) so that its duration "
                             f"can be checked, or pass the Attribution itself")
        att_fs = fs
    if att.shape[-1] == n and float(att_fs) == float(fs):
        return att
    dur_att, dur_sig = att.shape[-1] / float(att_fs), n / float(fs)
    if abs(dur_att - dur_sig) > 1.0 / min(float(att_fs), float(fs)) + 1e-9:
        raise ValueError(f"the attribution covers {dur_att:.3f} s ({att.shape[-1]} samples at {att_fs:g} Hz) but "
                         f"the signal {dur_sig:.3f} s ({n} samples at {fs:g} Hz): draw the signal the attribution "
                         f"was computed on (the model's window), or give attribution_fs")
    t_sig = np.arange(n) / fs
    t_att = np.arange(att.shape[-1]) / att_fs
    return np.stack([np.interp(t_sig, t_att, row) for row in att])


def paper_grid(ax, xlim: tuple[float, float], ylim: tuple[float, float], minor: bool = True,
               background: str = PAPER_BG) -> None:
    """ECG-paper grid on ``ax`` (x in seconds, y in mV): 1 mm (0.04 s x 0.1 mV) minor and 5 mm (0.2 s x 0.5 mV)
    major lines in data coordinates, so they stay exact at any figure size. Each set is one
    :class:`~matplotlib.collections.LineCollection` (``gid="grid_minor"`` / ``"grid_major"``): drawing hundreds
    of tick grid lines instead is several times slower to render, especially to SVG / PDF. Ticks are hidden."""
    x0, x1 = xlim
    y0, y1 = ylim
    ax.set_facecolor(background)

    def ticks(lo: float, hi: float, step: float) -> np.ndarray:
        return np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1) * step

    def lines(step_x: float, step_y: float) -> np.ndarray:
        vx = [[(x, y0), (x, y1)] for x in ticks(x0, x1, step_x)]
        hy = [[(x0, y), (x1, y)] for y in ticks(y0, y1, step_y)]
        return np.asarray(vx + hy, dtype=float)

    if minor:
        lc = LineCollection(lines(MINOR_S, MINOR_MV), colors=GRID_MINOR, linewidths=0.3, zorder=0)
        lc.set_gid("grid_minor")
        ax.add_collection(lc)
    lc = LineCollection(lines(MAJOR_S, MAJOR_MV), colors=GRID_MAJOR, linewidths=0.6, zorder=0.5)
    lc.set_gid("grid_major")
    ax.add_collection(lc)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def calibration_pulse(ax, x: float, baseline: float, height: float = 1.0, width: float = 0.2,
                      color: str = TRACE, gid: str = "calibration") -> Any:
    """Draw a standard calibration pulse (``height`` mV for ``width`` s) starting at ``x`` on ``baseline``."""
    xs = [x, x + 0.05, x + 0.05, x + 0.05 + width, x + 0.05 + width, x + 0.1 + width]
    ys = [baseline, baseline, baseline + height, baseline + height, baseline, baseline]
    (line,) = ax.plot(xs, ys, color=color, linewidth=1.0, solid_joinstyle="miter")
    line.set_gid(gid)
    return line


def choose_gain(excursion: float, room: float, gains: Sequence[float] = GAINS_MM_PER_MV) -> float:
    """The largest standard gain at which a trace fits its row.

    Args:
        excursion: the largest ``|amplitude|`` of the trace (signal units, mV) about its baseline.
        room: the half-height of its row in paper units (mV at 10 mm/mV): the trace may reach that far up or down.
        gains: candidate gains in mm per unit, the largest first.

    Returns:
        the first gain ``g`` with ``excursion * g / 10 <= room``, else the smallest gain.
    """
    for g in gains:
        if float(excursion) * float(g) / MM_PER_MV <= float(room) + 1e-9:
            return float(g)
    return float(gains[-1])


def _gain_text(g: float, units: str) -> str:
    return f"{g:g} mm/{units}"


def _chars_per_line(width_in: float, fontsize: float) -> int:
    """About how many characters of ``fontsize`` points fit in ``width_in`` inches (0.55 em per character)."""
    return max(20, int(width_in / (0.55 * fontsize / 72)))


def _wrap_parts(parts: Sequence[str], sep: str, width: int) -> list[str]:
    """Join ``parts`` with ``sep`` into lines of at most ``width`` characters, breaking between parts; a part longer
    than a line (a unit warning) is wrapped on its own lines (it ran off the figure's edge)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        elif len(part) > width:
            lines += textwrap.wrap(part, width)
        else:
            lines.append(part)
    return lines


def unit_problem(signal: Any, units: str = "mV", present: Any = None, n_real: int | None = None) -> str | None:
    """Why ``signal`` cannot be in ``units`` when they are millivolts, or None (plausible, or other units).

    The typical lead, not the largest, decides: the median peak-to-peak amplitude of the present leads' recorded
    samples (NaN and all-zero leads left out). An ECG in mV swings about 0.5-5 mV; above
    :data:`MAX_TYPICAL_PTP_MV` it looks like microvolts (1000x) or ADC counts. Nothing is rescaled: the chart draws
    what it is given, and says so.

    Args:
        signal: ``(L, T)``.
        units: the units the chart is told (only ``"mV"`` is checked).
        present: optional ``(L,)`` bool, the leads the record has (default: all).
        n_real: recorded samples (the rest is zero padding; default: all).

    Returns:
        a sentence naming the typical amplitude and the likely unit problem, or None.
    """
    if units != "mV":
        return None
    from ecgfm.api import lead_peak_to_peak

    sig = _np(signal)
    ptp = lead_peak_to_peak(sig[:, :sig.shape[1] if n_real is None else n_real],
                            None if present is None else _np(present))
    if not ptp or float(np.median(ptp)) <= MAX_TYPICAL_PTP_MV:
        return None
    return (f"amplitudes implausible for mV: the typical lead swings {float(np.median(ptp)):.0f} \"mV\" peak to peak "
            f"(an ECG swings about 0.5-5 mV); the record looks like microvolts (1000x) or ADC counts, drawn as given, "
            f"not rescaled: give it in mV (divide microvolts by 1000)")


def _trace(ax, t: np.ndarray, y: np.ndarray, att: np.ndarray | None, norm: Normalize | None, overlay: str,
           offset: float, band_height: float, cmap_name: str, linewidth: float = 0.8,
           band_center: float | None = None) -> None:
    """One trace at vertical ``offset`` with an optional attribution overlay (a band of ``band_height`` centred
    on ``band_center``, default ``offset``)."""
    if att is None:
        ax.plot(t, y + offset, color=TRACE, linewidth=linewidth)
        return
    cmap = _cmap(cmap_name)
    if overlay == "band":
        centre = offset if band_center is None else band_center
        rgba = cmap(norm(att))                                            # (T, 4)
        alpha = np.clip(np.abs(att) / max(norm.vmax, 1e-12), 0, 1) * 0.85
        rgba[:, 3] = alpha
        # one cell per sample, centred on the sample's time (as the trace draws it): [t_i - dt/2, t_i + dt/2]
        half = (t[1] - t[0]) / 2 if len(t) > 1 else 0
        img = ax.imshow(rgba[None], aspect="auto", interpolation="nearest",
                        extent=(t[0] - half, t[-1] + half, centre - band_height / 2, centre + band_height / 2),
                        zorder=1)
        img.set_gid("attribution")
        ax.plot(t, y + offset, color=TRACE, linewidth=linewidth, zorder=3)
    elif overlay == "line":
        ax.plot(t, y + offset, color=TRACE, linewidth=linewidth, zorder=2)
        pts = np.stack([t, y + offset], 1)
        segs = np.stack([pts[:-1], pts[1:]], 1)
        seg_att = 0.5 * (att[:-1] + att[1:])
        # Colour by sign and size, opacity by size: unimportant samples leave the black trace readable.
        rgba = cmap(norm(seg_att))
        rgba[:, 3] = np.clip(np.abs(seg_att) / max(norm.vmax, 1e-12), 0, 1) ** 0.7
        keep = rgba[:, 3] > 0.05          # invisible segments are not drawn (much smaller, faster SVG / PDF)
        lc = LineCollection(segs[keep], colors=rgba[keep], linewidths=linewidth * 3.0, zorder=3, capstyle="round")
        lc.set_gid("attribution")
        ax.add_collection(lc)
    else:
        raise ValueError(f"overlay must be 'line' or 'band', got {overlay!r}")


def plot_ecg_chart(signal: Any, fs: float, lead_names: Sequence[str] = CANONICAL_LEADS,
                   attribution: Any = None, attribution_fs: float | None = None, overlay: str = "line",
                   title: str | None = None, rhythm_lead: str = "II", units: str = "mV",
                   row_spacing_mv: float = 3.0, percentile: float = 99.0, cmap: str = CMAP,
                   colorbar_label: str = "attribution (signed; red raises the score)", gain: float | str = "auto",
                   chest_gain: float | str | None = "auto", record_id: str | None = None,
                   window_start_s: float | None = None, layout: str = "3x4", present: Any = None,
                   padded_from_s: float | None = None, derived: Sequence[str] | None = None,
                   read: Any = None) -> Figure:
    """The clinical 12-lead chart, optionally with a signed attribution overlay.

    Gain: a trace drawn at ``g`` mm/mV is ``g / 10`` of its amplitude in paper units (the grid stays 1 mm =
    0.1 paper mV). ``"auto"`` chooses 10, 5 or 2.5 mm/mV (:func:`choose_gain`) so that the plotted samples stay
    within half a row (``row_spacing_mv / 2``) of their baseline: the limb leads and the rhythm strip take
    ``gain``, the chest leads V1-V6 ``chest_gain`` (their QRS complexes are often two or three times taller), as
    electrocardiographs print "10 / 5 mm/mV". The calibration pulse of a row is 1 mV at the gain of the row's
    first lead; a lead drawn at another gain carries its gain under its label (``gid="lead_gain"``). The
    header (``gid="chart_header"``) gives the record id, the sampling rate, the gains and the paper speed
    (wrapped, as the title, to the width of a short record's chart).

    Args:
        signal: ``(L, T)`` ECG (mV) at ``fs``; 12 canonical leads give the 3 x 4 + rhythm layout, anything else
            one row per lead over the whole record.
        fs: sampling rate in Hz.
        lead_names: name of each row of ``signal``.
        attribution: optional ``(L, T')`` signed attribution, rows in the same lead order.
        attribution_fs: its rate (default: the signal's, for an attribution of ``T`` samples; an
            :class:`~ecgfm.explain.attribution.Attribution` brings its own); another duration is refused.
        overlay: ``"line"`` (coloured trace segments) or ``"band"`` (translucent band behind the trace).
        title: figure title.
        rhythm_lead: lead of the rhythm strip.
        units: signal units (the calibration pulse is 1 unit at the row's gain; gains are in mm per unit). With
            ``"mV"``, a typical lead swinging more than :data:`MAX_TYPICAL_PTP_MV` peak to peak is named in the header
            as microvolts or ADC counts (:func:`unit_problem`) and warned (``UserWarning``); nothing is rescaled.
        window_start_s: where ``signal`` starts in its record, when it is a window of it (the header then says
            which seconds of the record the chart's 0 s is).
        row_spacing_mv: vertical distance between rows (in units).
        percentile: symmetric colour scale up to this percentile of ``|attribution|`` over all leads.
        cmap: diverging colormap name (``matplotlib.colormaps``).
        colorbar_label: label of the colour bar.
        gain: mm per unit of the limb leads, the rhythm strip and any non-chest lead; ``"auto"``: from the
            amplitude (10, 5 or 2.5).
        chest_gain: mm per unit of V1-V6; ``"auto"``: from their amplitude; None: ``gain``.
        record_id: shown in the header.
        layout: ``"3x4"`` (12 canonical leads: the standard 3 x 4 + rhythm strip, each lead a quarter of the
            window, 2.5 s of 10 s; for another window length the header states the column width, e.g. "3 x 4
            columns 0.625 s each" for 2.5 s; with an attribution the header says what share of ``|attribution|``
            the chart draws; a zero-padded record, see ``padded_from_s``) or ``"rows"`` (one
            full-length row per lead: the whole attribution).
        present: optional ``(L,)`` bool, the leads the record has: an absent lead is labelled "not recorded" and
            not drawn (a zero-filled row would read as a flat recorded trace); default: all present.
        padded_from_s: where zero padding (a record shorter than the model's window) starts: shaded and named in
            the header, so that it does not read as a flat recorded stretch. The 3 x 4 columns then split the
            recorded span, not the window (quarters of the window drew V1-V6 of a 4 s record over padding only),
            said in the header ("3 x 4 columns 1.5 s each over the recorded 6.00 s"); a recorded span too short
            for columns of :data:`MIN_COLUMN_S` (under 6 s) is drawn one full-length row per lead, also said
            ("one row per lead: the recorded 4.00 s is too short ..."). The time axis stays the window's, at
            25 mm/s; the rhythm strip spans it.
        derived: leads computed from I and II rather than recorded (a classifier trained on 12 leads reads III /
            aVR / aVL / aVF derived when a record lacks them): named in the header ("derived: III, aVR, ..."),
            so that a computed trace does not read as a recorded one.
        read: optional ``(L,)`` bool, the leads the model reads (default: all). A present lead it does not read (a
            model of ``input_leads``: ST-MEM with ``--leads``, a one-lead ECGFounder) is drawn as a plain trace, with
            no attribution and out of the colour scale, labelled "not read by the model" in its panel
            (``gid="unread_lead"``) and in the header: it is recorded, and "not recorded" would say otherwise.

    Traces taller than their row are clipped at its edge (red ticks) and named under the chart
    (``gid="clipped_note"``), with "a lower gain shows them whole" only for leads that a lower standard gain would
    show whole; the others are "too tall for a row even at the lowest standard gain".

    Returns:
        the figure; its chart axes has ``gid="ecg_chart"``, the calibration pulses ``gid="calibration"``,
        the lead labels ``gid="lead_label"``, per-lead gain notes ``gid="lead_gain"`` and the overlays
        ``gid="attribution"``; the figure's header text ``gid="chart_header"``. ``fig.ecg_gains`` maps each
        plotted lead to its gain (mm per unit).

    Raises:
        ValueError: shapes that do not match, an unknown overlay or rhythm lead, a gain that is not positive.
    """
    sig = _np(signal)
    if sig.ndim != 2 or sig.shape[0] != len(lead_names):
        raise ValueError(f"signal must be (leads, samples) with {len(lead_names)} rows, got {sig.shape}")
    n_t = sig.shape[1]
    att = None
    if attribution is not None:
        attribution, attribution_fs = _attribution_and_rate(attribution, attribution_fs)
        att = _np(attribution)
        if att.shape[0] != sig.shape[0]:
            raise ValueError(f"attribution has {att.shape[0]} rows but the signal has {sig.shape[0]}")
        att = _resample_to(att, attribution_fs, n_t, fs)
    if layout not in ("3x4", "rows"):
        raise ValueError(f"layout must be '3x4' or 'rows', got {layout!r}")
    here = np.ones(sig.shape[0], dtype=bool) if present is None else np.asarray(_np(present), dtype=bool).reshape(-1)
    if here.shape[0] != sig.shape[0]:
        raise ValueError(f"present has {here.shape[0]} entries for {sig.shape[0]} leads")
    rd = _read_mask(read, sig.shape[0])
    n_real = n_t if padded_from_s is None else min(n_t, max(0, int(round(padded_from_s * fs))))
    # the colour scale from the recorded samples of the leads the model reads only (absent rows, leads it does not
    # read and padding are zeros that pull it down)
    norm = symmetric_norm(_scale_samples(att, here & rd, n_real), percentile) if att is not None else None
    idx = _lead_index(lead_names)
    duration = n_t / fs
    full = layout == "3x4" and all(lead in idx for lead in CANONICAL_LEADS)
    if full and rhythm_lead not in idx:
        raise ValueError(f"rhythm lead {rhythm_lead!r} not among {list(lead_names)}")
    # A zero-padded record (shorter than the model's window): the four columns split its recorded span, not the
    # window. Quarters of the window put V1-V6 of a 4 s record in a 10 s window over the padding only (flat traces
    # labelled V1..V6, none of their recorded signal drawn). A recorded span too short for columns of MIN_COLUMN_S
    # is drawn one full-length row per lead instead. Either way the header says what was done, and the time axis
    # stays the window's at 25 mm/s (the rhythm strip and the shaded padding still span it).
    padded = n_real < n_t
    span = n_real / fs if padded else duration                            # what the four columns split
    too_short = full and padded and span / 4.0 < MIN_COLUMN_S - 1e-9
    grid = full and not too_short                                         # the 3 x 4 + rhythm layout is drawn
    if grid:
        rows: list[list[tuple[str, float, float]]] = []
        seg = span / 4.0
        for r in LAYOUT_3X4:
            rows.append([(lead, c * seg, (c + 1) * seg) for c, lead in enumerate(r)])
        rows.append([(rhythm_lead, 0.0, duration)])
        # leads beyond the standard 12 (V3R, V4R, V7, ...): a full-length row each, not left off the chart
        rows += [[(name, 0.0, duration)] for name in idx if name not in CANONICAL_LEADS]
    else:
        rows = [[(name, 0.0, duration)] for name in idx]

    def plotted(lead: str, a: float, b: float) -> slice:
        return slice(int(round(a * fs)), min(n_t, int(round(b * fs)) + 1))

    chest = {lead for row in rows for lead, _, _ in row if lead in CANONICAL_LEADS[6:]}
    room = row_spacing_mv / 2.0
    gains: dict[str, float] = {}
    for group, setting in (("limb", gain), ("chest", gain if chest_gain is None else chest_gain)):
        members = [(lead, a, b) for row in rows for lead, a, b in row if (lead in chest) == (group == "chest")]
        if not members:
            continue
        if setting == "auto":
            # nanmax: one missing (NaN) sample must not make the excursion NaN (no gain would then "fit")
            exc = max(float(np.nanmax(np.abs(sig[idx[lead], plotted(lead, a, b)]), initial=0.0))
                      for lead, a, b in members)
            g = choose_gain(exc, room)
        else:
            g = float(setting)
            if not g > 0:
                raise ValueError(f"{'chest_' if group == 'chest' else ''}gain must be positive or 'auto', "
                                 f"got {setting!r}")
        gains.update({lead: g for lead, _, _ in members})
    n_rows = len(rows)
    cal_w = 0.4                                                            # room for the calibration pulse
    x0, x1 = -cal_w - 0.04, duration + 0.04
    # the room above the first row and below the last is at least the room a trace has in its row (the gain choice
    # and the clip marks use ``room``): a deep wave on the last row reached past the axes, cut without a clip mark
    margin = max(row_spacing_mv * 0.55, room + 0.05 * row_spacing_mv)
    y1 = margin
    y0 = -(n_rows - 1) * row_spacing_mv - margin
    # True paper scale: the axes is (x1 - x0) * 25 mm wide and (y1 - y0) * 10 mm high.
    ax_w, ax_h = (x1 - x0) * MM_PER_S * _MM, (y1 - y0) * MM_PER_MV * _MM
    left, right, bottom = 0.25, (1.3 if att is not None else 0.25), 0.3
    width = ax_w + left + right
    limb_g = sorted({g for lead, g in gains.items() if lead not in chest})
    chest_g = sorted({g for lead, g in gains.items() if lead in chest})
    if chest_g and limb_g and chest_g != limb_g:
        gain_txt = (f"gain {', '.join(_gain_text(g, units) for g in limb_g)} (limb), "
                    f"{', '.join(_gain_text(g, units) for g in chest_g)} (chest)")
    else:
        gain_txt = f"gain {', '.join(_gain_text(g, units) for g in sorted(set(gains.values())))}"
    header_parts = ([f"record {record_id}"] if record_id is not None else []) + (
        [f"window {window_start_s:.2f}-{window_start_s + duration:.2f} s of the record"]
        if window_start_s is not None else []) + [f"{fs:g} Hz", gain_txt, f"paper speed {MM_PER_S:g} mm/s"]
    # a record in microvolts (or ADC counts) told to be mV: 1000x too tall, every trace clipped; the model's
    # normalisation cancels the scale, the chart does not. Said in the header and warned, never rescaled.
    unit_note = unit_problem(sig, units, here, n_real)
    if unit_note:
        header_parts.append(unit_note)
        warnings.warn(f"{'record ' + str(record_id) if record_id is not None else 'ECG chart'}: {unit_note}",
                      UserWarning, stacklevel=2)
    if grid and padded:   # the columns split the recorded span: say so, and how wide they are
        header_parts.append(f"3 x 4 columns {seg:.3g} s each over the recorded {span:.2f} s (the padding is in no "
                            f"column; the standard 10 s chart has 2.5 s)")
    elif grid and abs(duration / 4.0 - 2.5) > 1e-6:   # the 3 x 4 columns are a quarter of the window, not 2.5 s
        header_parts.append(f"3 x 4 columns {duration / 4.0:.3g} s each (a quarter of the {duration:.3g} s window; "
                            f"the standard 10 s chart has 2.5 s)")
    if too_short:
        header_parts.append(f"one row per lead: the recorded {span:.2f} s is too short for 3 x 4 columns of "
                            f"{MIN_COLUMN_S:g} s or more")
    if padded_from_s is not None and n_real < n_t:
        header_parts.append(f"zero-padded from {n_real / fs:.2f} s (shaded)")
    absent = [name for name, h in zip(lead_names, here) if not h]
    if absent:
        header_parts.append(f"not recorded: {', '.join(map(str, absent))}")
    unread = [name for name, h, r in zip(lead_names, here, rd) if h and not r]
    if unread:   # recorded, drawn, but the model never sees them: no attribution there
        header_parts.append(f"not read by the model (no attribution): {', '.join(map(str, unread))}")
    # missing (NaN) samples of a drawn lead are gaps in its trace: say so, not leave a gap to read as a lead change
    with_nan = [lead for lead in dict.fromkeys(lead for row in rows for lead, _, _ in row)
                if here[idx[lead]] and np.isnan(sig[idx[lead]]).any()]
    if with_nan:
        header_parts.append(f"missing (NaN) samples drawn as gaps: {', '.join(map(str, with_nan))}")
    shown_derived = [str(d) for d in (derived or ()) if d in idx]
    if shown_derived:
        header_parts.append(f"derived: {', '.join(shown_derived)} (computed from I and II, not recorded)")
    # the colour bar's label runs along the chart's height: on a short chart (few rows) a long label was cut off
    # at the figure's edge, losing the "scale clipped" note; the label is wrapped to the bar's height and the note
    # goes into the header when it does not fit beside the bar
    scale_over = bool(att.size and float(np.nanmax(np.abs(att))) > norm.vmax * (1 + 1e-9)) if att is not None \
        else False
    clip_note = f"scale clipped at the {percentile:g}th percentile"
    cb_chars = max(12, int(ax_h / (0.55 * 8 / 72)))
    cb_label = colorbar_label
    if scale_over:
        if len(colorbar_label) + len(clip_note) + 3 <= 2 * cb_chars:
            cb_label = f"{colorbar_label} ({clip_note})"
        else:
            header_parts.append(f"colour {clip_note}")
    cb_lines = textwrap.wrap(cb_label, cb_chars) or [""]
    if len(cb_lines) > 3:   # wider than the right margin holds: the label goes into the header as well
        header_parts.append(f"colour: {cb_label}")
        cb_lines = textwrap.wrap("attribution", cb_chars)
    if att is not None and grid:
        on_chart = np.zeros(att.shape, dtype=bool)                       # (L, T) samples some row draws
        for row in rows:
            for lead, a, b in row:
                on_chart[idx[lead], plotted(lead, a, b)] = True
        # over the recorded samples: the padding's attribution is no finding (left out of the colour scale too)
        total = float(np.abs(att[:, :n_real]).sum())
        drawn = float(np.abs(att[:, :n_real])[on_chart[:, :n_real]].sum())
        if total > 0 and drawn < 0.995 * total:   # each lead shows 2.5 s: the rest of its map is not on the chart
            of = "the recorded samples' " if padded else ""
            header_parts.append(f"3 x 4 layout: {100 * drawn / total:.0f} % of {of}|attribution| drawn "
                                f"(layout='rows' draws all)")
    # traces beyond their row are clipped at its edge (marked while drawing); found here, before the layout, so that
    # the note under the chart gets the lines it needs
    clip_exc: dict[str, float] = {}                                       # a clipped lead's largest |amplitude|
    for row in rows:
        for lead, a, b in row:
            if here[idx[lead]]:
                e = float(np.nanmax(np.abs(sig[idx[lead], plotted(lead, a, b)]), initial=0.0))
                if e * gains[lead] / MM_PER_MV > room:
                    clip_exc[lead] = max(clip_exc.get(lead, 0.0), e)
    clip_lines = textwrap.wrap(_clip_text(list(clip_exc), clip_exc, gains, room, units, unit_note),
                               _chars_per_line(width - left, 7)) if clip_exc else []
    bottom += max(0, len(clip_lines) - 1) * 7 * 1.35 / 72
    # a short window makes a narrow chart: wrap the title and the header to its width (about 0.55 em per character)
    header_lines = _wrap_parts(header_parts, " | ", _chars_per_line(width - left, 8))
    title_lines = textwrap.wrap(title, _chars_per_line(width - left, 10)) if title else []
    title_h, header_h = 10 * 1.35 / 72, 8 * 1.35 / 72                      # line heights in inches
    top_margin = 0.12 + len(title_lines) * title_h + 0.04 + len(header_lines) * header_h + 0.12
    fig = Figure(figsize=(width, ax_h + bottom + top_margin))
    fig.ecg_gains = dict(gains)
    W, H = fig.get_size_inches()
    ax = fig.add_axes((left / W, bottom / H, ax_w / W, ax_h / H))
    ax.set_gid("ecg_chart")
    paper_grid(ax, (x0, x1), (y0, y1))
    t_all = np.arange(n_t) / fs
    for r, row in enumerate(rows):
        base = -r * row_spacing_mv
        row_gain = gains[row[0][0]]
        calibration_pulse(ax, -cal_w, base, height=row_gain / MM_PER_MV)
        for lead, a, b in row:
            i = idx[lead]
            sl = plotted(lead, a, b)
            scale = gains[lead] / MM_PER_MV
            if here[i]:
                y = sig[i, sl] * scale
                over = np.abs(y) > room                                    # beyond its row: into the next one
                if over.any():   # clipped at the row's edge and marked, not drawn over the neighbouring row
                    y = np.clip(y, -room, room)
                    ax.plot(t_all[sl][over], y[over] + base, linestyle="none", marker="|", markersize=4,
                            color="#d62728", zorder=5, gid="clipped")
                _trace(ax, t_all[sl], y, None if att is None or not rd[i] else att[i, sl], norm, overlay, base,
                       row_spacing_mv * 0.9, cmap)
                if not rd[i]:
                    ax.text(a + 0.45, base + row_spacing_mv * 0.3, "not read by the model", fontsize=7,
                            color="#555555", zorder=4, va="baseline",
                            bbox={"facecolor": PAPER_BG, "edgecolor": "none", "alpha": 0.8, "pad": 0.5}
                            ).set_gid("unread_lead")
            else:   # no trace: a zero-filled row would read as a flat recorded lead
                ax.text((a + b) / 2, base, "not recorded", ha="center", va="center", fontsize=8,
                        color="#777777", zorder=4).set_gid("absent_lead")
            txt = ax.text(a + 0.05, base + row_spacing_mv * 0.3, lead, fontsize=9, fontweight="bold",
                          color=TRACE, zorder=4)
            txt.set_gid("lead_label")
            if gains[lead] != row_gain:  # drawn at another gain than the row's calibration pulse: say so
                note = ax.text(a + 0.05, base + row_spacing_mv * 0.3 - 0.08, _gain_text(gains[lead], units),
                               fontsize=6.5, color="#555555", va="top", zorder=4)
                note.set_gid("lead_gain")
            if a > 0:  # lead-change marker as on printed ECGs
                ax.plot([a, a], [base - 0.25, base + 0.25], color=TRACE, linewidth=0.8)
    if n_real < n_t:
        ax.axvspan(n_real / fs, duration, color="#bbbbbb", alpha=0.35, zorder=0.5, lw=0).set_gid("padding")
    if clip_lines:   # the note goes under the chart (its bottom margin was made room for it)
        fig.text(left / W, 0.05 / H, "\n".join(clip_lines), ha="left", va="bottom", fontsize=7, color="#d62728",
                 gid="clipped_note", linespacing=1.2)
    head = fig.text(left / W, 1 - (0.12 + len(title_lines) * title_h + 0.04) / H, "\n".join(header_lines),
                    ha="left", va="top", fontsize=8, color="#333333", linespacing=1.2)
    head.set_gid("chart_header")
    if title:
        fig.suptitle("\n".join(title_lines), x=left / W, ha="left", va="top", fontsize=10, y=1 - 0.12 / H,
                     linespacing=1.2)
    if att is not None:
        cax = fig.add_axes(((left + ax_w + 0.25) / W, bottom / H, 0.15 / W, ax_h / H))
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=_cmap(cmap))
        # values beyond the scale (it ends at a percentile) share its end colour: say so with the bar's arrows
        cb = fig.colorbar(sm, cax=cax, extend="both" if scale_over else "neither")
        cb.set_label("\n".join(cb_lines), fontsize=8, linespacing=1.1)
        cb.ax.yaxis.label.set_gid("colorbar_label")
        cb.ax.tick_params(labelsize=7)
    return fig


def _clip_text(clipped: Sequence[str], excursion: Mapping[str, float], gains: Mapping[str, float], room: float,
               units: str, unit_note: str | None) -> str:
    """The note under a chart with clipped traces: which leads, and whether a lower gain would show them whole.

    A lead is advised a lower gain only when one exists (its gain is above the smallest standard gain,
    :data:`GAINS_MM_PER_MV`) and its largest excursion fits its row at that smallest gain; a lead too tall even
    there is said to be so (the automatic gain already chose the smallest: "a lower gain shows them whole" was
    wrong advice for a record in microvolts).

    Args:
        clipped: the clipped leads, in drawing order.
        excursion: each clipped lead's largest ``|amplitude|`` (units) over what its row draws.
        gains: each lead's gain (mm per unit).
        room: half a row's height (paper units).
        units: the signal's units.
        unit_note: :func:`unit_problem`'s sentence, or None.
    """
    lowest = float(min(GAINS_MM_PER_MV))
    lower = [lead for lead in clipped if gains[lead] > lowest + 1e-9
             and excursion.get(lead, np.inf) * lowest / MM_PER_MV <= room + 1e-9]
    tall = [lead for lead in clipped if lead not in lower]
    parts = [f"clipped at the row's edge (red ticks): {', '.join(clipped)}"]
    if lower:
        parts.append(f"a lower gain shows {'them' if not tall else ', '.join(lower)} whole")
    if tall:
        parts.append(f"{'' if not lower else ', '.join(tall) + ' '}too tall for a row even at the lowest standard "
                     f"gain, {_gain_text(lowest, units)}" + (" (not mV? see the header)" if unit_note else ""))
    return "; ".join(parts)


def _read_mask(read: Any, n_leads: int) -> np.ndarray:
    """``(L,)`` bool: the leads the model reads (``read``; None: all)."""
    rd = np.ones(n_leads, dtype=bool) if read is None else np.asarray(_np(read), dtype=bool).reshape(-1)
    if rd.shape[0] != n_leads:
        raise ValueError(f"read has {rd.shape[0]} entries for {n_leads} leads")
    return rd


def _recorded_shares(att: np.ndarray, sig: np.ndarray, here: np.ndarray, n_real: int) -> np.ndarray:
    """``(L,)`` each lead's share of ``|att|`` summed over the recorded samples: the present leads' (``here``) first
    ``n_real`` (:func:`ecgfm.explain.attribution.recorded_samples`, as ``Attribution.per_lead(recorded=...)``);
    0 for absent leads; all 0 when nothing recorded carries attribution."""
    import torch

    from ecgfm.explain.attribution import recorded_samples

    mask = here[:, None] & (np.arange(sig.shape[1]) < n_real)[None, :]
    # present_rows reads a lead as absent when its row is all zero; NaN samples must not hide a present lead
    keep = recorded_samples(torch.as_tensor(np.nan_to_num(sig, nan=1.0))[None], mask[None])[0].numpy()
    per = np.where(keep, np.nan_to_num(np.abs(att)), 0.0).sum(1)
    total = per.sum()
    return per / total if total > 0 else np.zeros_like(per)


def _select_leads(lead_names: Sequence[str], leads: Sequence[str] | None, scores: np.ndarray | None,
                  k: int) -> list[int]:
    idx = _lead_index(lead_names)
    if leads is not None:
        missing = [lead for lead in leads if lead not in idx]
        if missing:
            raise ValueError(f"leads {missing} not among {list(lead_names)}")
        return [idx[lead] for lead in leads]
    if scores is None:
        return list(range(min(k, len(lead_names))))
    return sorted(np.argsort(-scores)[:k].tolist())


def plot_method_comparison(signal: Any, fs: float, attributions: Mapping[str, Any],
                           lead_names: Sequence[str] = CANONICAL_LEADS, leads: Sequence[str] | None = None,
                           n_leads: int = 3, overlay: str = "line", title: str | None = None, cmap: str = CMAP,
                           units: str = "mV", percentile: float = 99.0, attribution_fs: float | None = None,
                           present: Any = None, padded_from_s: float | None = None, read: Any = None) -> Figure:
    """Several attributions of one record side by side: one row per method, one column per lead.

    Each method is normalised on its own (symmetric, over the recorded samples of all the record's leads, as
    :func:`plot_ecg_chart` scales its overlay), so the figure compares *where* the methods put relevance, not their
    scales (which differ by orders of magnitude between methods). The figure says so: a colour bar
    (``gid="colorbar"``, ticks "-max", "0", "+max") reads "red raises the explained score, blue lowers it; each
    method (row) scaled to its own 99th percentile of |attribution|", and the note under the panels repeats it.

    Args:
        signal: ``(L, T)`` at ``fs``.
        fs: sampling rate.
        attributions: ``{method: (L, T') values}`` (numpy / torch, or one record's
            :class:`~ecgfm.explain.attribution.Attribution`; interpolated onto the signal's time axis).
        lead_names: rows of ``signal``.
        leads: leads to show (default: the ``n_leads`` present leads with the largest summed share of
            |attribution| over the methods; shares over the present leads' recorded samples, as
            ``Attribution.per_lead(recorded=...)``). An absent lead's panel says "not recorded" and draws no trace.
        n_leads: number of leads when ``leads`` is None.
        overlay, cmap, percentile: see :func:`plot_ecg_chart`.
        title: figure title.
        units: signal units (the amplitude grid note under the panels).
        attribution_fs: rate of the arrays in ``attributions`` (default: the signal's, for ``T`` samples; see
            :func:`plot_ecg_chart`).
        present: optional ``(L,)`` bool, the leads the record has; default: the rows of ``signal`` that are not all
            zero (ecgfm's absent leads are zero rows). Absent leads are left out of the colour scale.
        padded_from_s: where zero padding (a record shorter than the model's window) starts: left out of the
            colour scale and the shares, and shaded.
        read: optional ``(L,)`` bool, the leads the model reads (default: all): a present lead it does not read is
            drawn without attribution, out of the colour scale, labelled "not read by the model"
            (``gid="unread_lead"``); the default ``leads`` are among those it reads (the others carry no attribution
            to compare).

    Returns:
        the figure (axes ``gid="method:<name>|lead:<lead>"``; per method row, the shares text
        ``gid="lead_share"``; absent-lead notes ``gid="absent_lead"``; padding ``gid="padding"``; the time /
        amplitude / colour note ``gid="amplitude_label"``; the colour bar's axes ``gid="colorbar"``).
    """
    sig = _np(signal)
    if not attributions:
        raise ValueError("no attributions to compare")
    n_t = sig.shape[1]
    here = np.abs(sig).max(axis=1) > 0 if present is None else np.asarray(_np(present), dtype=bool).reshape(-1)
    if here.shape[0] != sig.shape[0]:
        raise ValueError(f"present has {here.shape[0]} entries for {sig.shape[0]} leads")
    rd = _read_mask(read, sig.shape[0])
    n_real = n_t if padded_from_s is None else min(n_t, max(0, int(round(padded_from_s * fs))))
    atts = {}
    for name, a in attributions.items():
        a, a_fs = _attribution_and_rate(a, attribution_fs)
        a = _np(a)
        if a.shape[0] != sig.shape[0]:
            raise ValueError(f"attribution {name!r} has {a.shape[0]} rows, signal {sig.shape[0]}")
        atts[name] = _resample_to(a, a_fs, n_t, fs)
    shares = {name: _recorded_shares(a, sig, here & rd, n_real) for name, a in atts.items()}
    # only present leads are picked (an absent lead's zero row, or its map's mass on nothing, is not a finding),
    # those the model reads first
    score = np.where(here & rd, sum(shares.values()), np.where(here, -1.0, -np.inf))
    picked = here & rd if (here & rd).any() else here   # leads with no attribution to compare only when asked
    cols = _select_leads(lead_names, leads, score, min(n_leads, int(picked.sum())) if picked.any() else n_leads)
    t = np.arange(n_t) / fs
    shown = [li for li in cols if here[li]]
    vals = sig[shown][:, :n_real] if shown and n_real else np.zeros((1, 1))
    lo = (float(np.nanmin(vals)) if np.isfinite(vals).any() else 0.0) - 0.2
    hi = (float(np.nanmax(vals)) if np.isfinite(vals).any() else 0.0) + 0.2
    n_r, n_c = len(atts), len(cols)
    fig = Figure(figsize=(3.6 * n_c + 1.4, 1.5 * n_r + (0.6 if title else 0.3) + 0.45), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_r, n_c, squeeze=False, sharex=True, sharey=True))
    for r, (name, a) in enumerate(atts.items()):
        norm = symmetric_norm(_scale_samples(a, here & rd, n_real), percentile)   # as plot_ecg_chart's scale
        for c, li in enumerate(cols):
            ax = axes[r, c]
            ax.set_gid(f"method:{name}|lead:{lead_names[li]}")
            paper_grid(ax, (0, t[-1]), (lo, hi), minor=False)
            if here[li]:
                _trace(ax, t, sig[li], a[li] if rd[li] else None, norm, overlay, 0.0, hi - lo, cmap, linewidth=0.7,
                       band_center=(lo + hi) / 2)   # the band covers the panel [lo, hi]
                if not rd[li]:   # recorded, but the model never sees it: no attribution, not "not recorded"
                    ax.text(t[-1] / 2, hi, "not read by the model", ha="center", va="top", fontsize=7,
                            color="#555555", zorder=4).set_gid("unread_lead")
            else:   # no trace: a zero-filled row would read as a flat recorded lead (as plot_ecg_chart)
                ax.text(t[-1] / 2, (lo + hi) / 2, "not recorded", ha="center", va="center", fontsize=8,
                        color="#777777", zorder=4).set_gid("absent_lead")
            if n_real < n_t:
                ax.axvspan(n_real / fs, t[-1], color="#bbbbbb", alpha=0.35, zorder=0.5, lw=0).set_gid("padding")
            if r == 0:
                ax.set_title(str(lead_names[li]), fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
        # each lead's share of the method's |attribution| over the present leads' recorded samples (as
        # Attribution.per_lead(recorded=...) and report.json's per_lead)
        share_txt = ", ".join(f"{lead_names[i]} {100 * shares[name][i]:.0f}%" if here[i] and rd[i]
                              else f"{lead_names[i]} not read" if here[i]
                              else f"{lead_names[i]} not recorded" for i in cols)
        axes[r, -1].text(1.0, 1.02, share_txt, transform=axes[r, -1].transAxes, ha="right", va="bottom",
                         fontsize=6.5, color="#444444").set_gid("lead_share")
    notes = [f"time (s); grid 0.2 s x 0.5 {units}"]
    unit_note = unit_problem(sig, units, here, n_real)   # said here; plot_ecg_chart of the record warns as well
    if unit_note:
        notes.append(unit_note)
    if n_real < n_t:
        notes.append(f"zero-padded from {n_real / fs:.2f} s (shaded)")
    # what the colours mean: the sign, and that each row has its own scale (not comparable across rows)
    scale_txt = (f"each method (row) scaled to its own {percentile:g}th percentile of |attribution| (max), so "
                 f"intensities do not compare across rows")
    notes.append(f"red raises the explained score, blue lowers it; {scale_txt}")
    sm = matplotlib.cm.ScalarMappable(norm=Normalize(vmin=-1.0, vmax=1.0), cmap=_cmap(cmap))
    cb = fig.colorbar(sm, ax=axes.ravel().tolist(), location="right", shrink=0.9 if n_r > 1 else 1.0,
                      aspect=max(8, 10 * n_r), pad=0.01)
    cb.set_ticks([-1.0, 0.0, 1.0], labels=["-max\n(lowers)", "0", "+max\n(raises)"])
    cb.ax.tick_params(labelsize=6.5)
    cb.set_label("attribution / own max", fontsize=7)
    cb.ax.set_gid("colorbar")
    fig.supxlabel("\n".join(_wrap_parts(notes, "; ", _chars_per_line(fig.get_size_inches()[0], 7.5))),
                  fontsize=7.5, color="#333333").set_gid("amplitude_label")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_lead_importance(importance: Mapping[str, Any] | Any, lead_names: Sequence[str] = CANONICAL_LEADS,
                         normalize: bool = True, title: str | None = None, counted: Any = None) -> Figure:
    """Per-lead importance bars, grouped by method.

    Args:
        importance: ``{method: (L,)}`` or one ``(L,)`` array (e.g. ``Attribution.per_lead()[i]``).
        lead_names: the ``L`` leads.
        normalize: show each method's share (sum 1) instead of raw values.
        title: figure title.
        counted: ``(L,)`` bool, the leads that can hold attribution (the record's leads the model reads; None:
            all): the "uniform" line is ``1 / counted.sum()`` (a 3-lead record's equal shares are 1/3, not 1/12) and
            a method ranks the leads over those only.

    Returns:
        the figure (one bar container per method, labelled with the method name; ``"(no lead ranking)"`` is
        appended for a method whose values do not rank the leads, e.g. equal shares from a map broadcast to every
        lead, :func:`ecgfm.explain.attribution.ranked_leads` over the ``counted`` leads).
    """
    from ecgfm.explain.attribution import ranked_leads

    if not isinstance(importance, Mapping):
        importance = {"importance": importance}
    vals = {k: _np(v).ravel() for k, v in importance.items()}
    for k, v in vals.items():
        if v.shape[0] != len(lead_names):
            raise ValueError(f"importance {k!r} has {v.shape[0]} values for {len(lead_names)} leads")
        if normalize:
            vals[k] = v / max(float(np.abs(v).sum()), 1e-12)
    on = np.ones(len(lead_names), bool) if counted is None else np.asarray(counted, dtype=bool).reshape(-1)
    if on.shape[0] != len(lead_names) or not on.any():
        raise ValueError(f"counted must mark at least one of the {len(lead_names)} leads, got {counted!r}")
    n_m = len(vals)
    x = np.arange(len(lead_names))
    width = 0.8 / n_m
    fig = Figure(figsize=(max(6.0, 0.55 * len(lead_names) * max(1, n_m ** 0.5)), 3.2), layout="constrained")
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab10"]
    for j, (k, v) in enumerate(vals.items()):
        label = k if ranked_leads(v, on) is not None else f"{k} (no lead ranking)"
        ax.bar(x - 0.4 + width * (j + 0.5), v, width, label=label, color=colors(j % 10))
    ax.set_xticks(x, [str(n) for n in lead_names])
    ax.set_ylabel("share of |attribution|" if normalize else "importance")
    ax.axhline(0, color="#333333", linewidth=0.6)
    if normalize:
        ax.axhline(1.0 / int(on.sum()), color="#999999", linewidth=0.8, linestyle="--",
                   label="uniform" if on.all() else f"uniform over {int(on.sum())} leads")
    ax.legend(fontsize=7, ncols=min(4, n_m + 1))
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_counterfactual(original: Any, counterfactual: Any, fs: float, lead_names: Sequence[str] = CANONICAL_LEADS,
                        leads: Sequence[str] | None = None, n_leads: int = 4,
                        windows: Mapping[str, np.ndarray] | None = None, title: str | None = None,
                        units: str = "model units") -> Figure:
    """Original vs counterfactual (left) and their difference (right) for the most-changed leads.

    Args:
        original: ``(L, T)``.
        counterfactual: ``(L, T)``.
        fs: sampling rate.
        lead_names: rows.
        leads: leads to show (default the ``n_leads`` with the largest L1 change).
        n_leads: number of leads when ``leads`` is None.
        windows: optional wave windows (:func:`ecgfm.explain.waves.wave_windows`) shaded on the difference.
        title: figure title.
        units: y-axis units.

    Returns:
        the figure (axes ``gid="overlay:<lead>"`` and ``"difference:<lead>"``).
    """
    x0, x1 = _np(original), _np(counterfactual)
    if x0.shape != x1.shape or x0.ndim != 2:
        raise ValueError(f"original {x0.shape} and counterfactual {x1.shape} must both be (leads, samples)")
    diff = x1 - x0
    rows = _select_leads(lead_names, leads, np.abs(diff).sum(1), n_leads)
    t = np.arange(x0.shape[1]) / fs
    fig = Figure(figsize=(11, 1.6 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False, sharex=True, gridspec_kw={"width_ratios": [3, 2]})
    dmax = float(np.abs(diff[rows]).max()) or 1.0
    wave_colors = {"P": "#7fc97f", "QRS": "#beaed4", "T": "#fdc086"}
    for r, li in enumerate(rows):
        ax, axd = axes[r]
        ax.set_gid(f"overlay:{lead_names[li]}")
        axd.set_gid(f"difference:{lead_names[li]}")
        ax.plot(t, x0[li], color=TRACE, linewidth=0.8, label="original")
        ax.plot(t, x1[li], color="#d62728", linewidth=0.8, alpha=0.85, label="counterfactual")
        ax.set_ylabel(str(lead_names[li]), rotation=0, ha="right", va="center", fontsize=9)
        axd.plot(t, diff[li], color="#d62728", linewidth=0.8)
        axd.axhline(0, color="#888888", linewidth=0.5)
        axd.set_ylim(-1.1 * dmax, 1.1 * dmax)
        if windows is not None:
            for wave, win in windows.items():
                for a, b in np.asarray(win):
                    if b > a:
                        axd.axvspan(a / fs, b / fs, color=wave_colors.get(wave, "#dddddd"), alpha=0.35, lw=0)
        for a_ in (ax, axd):
            a_.tick_params(labelsize=7)
            a_.grid(True, color="#eeeeee", linewidth=0.5)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title(f"original vs counterfactual ({units})", fontsize=9)
    axes[0, 1].set_title("difference (counterfactual - original)"
                         + ("; shaded: P / QRS / T windows" if windows is not None else ""), fontsize=9)
    axes[-1, 0].set_xlabel("time (s)")
    axes[-1, 1].set_xlabel("time (s)")
    if title:   # wrapped to the figure's width (a title naming the window and both probabilities ran off it)
        fig.suptitle("\n".join(textwrap.wrap(title, _chars_per_line(fig.get_size_inches()[0] - 0.3, 10))),
                     fontsize=10)
    return fig


def significance_stars(p: float) -> str:
    """``***`` p < 0.001, ``**`` p < 0.01, ``*`` p < 0.05, else ``n.s.`` (apply to corrected p-values)."""
    if not np.isfinite(p):
        return "n/a"
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "n.s."


def plot_tcav(results: Sequence[Mapping[str, Any]] | Any, title: str | None = None) -> Figure:
    """TCAV scores: one bar per (concept, layer) with its spread over random counterparts, the random-vs-random
    reference next to it, and significance stars from the (Bonferroni-corrected) p-values.

    Args:
        results: a :class:`~ecgfm.explain.concepts.TCAVResult` or its ``rows``: dicts with ``concept``,
            ``layer``, ``score_mean``, ``score_std``, ``random_mean``, ``random_std``, ``p_adjusted``.
        title: figure title (the target class is a good one).

    Returns:
        the figure (bar containers labelled ``"concept"`` and ``"random"``, star texts ``gid="significance"``).
    """
    rows = list(getattr(results, "rows", results))
    if not rows:
        raise ValueError("no TCAV results to plot")
    labels = [f"{r['concept']}\n@{r['layer']}" for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(4.5, 1.4 * len(rows) + 1.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [r["score_mean"] for r in rows], 0.4, yerr=[r["score_std"] for r in rows], capsize=3,
           color="#1f77b4", label="concept")
    ax.bar(x + 0.2, [r["random_mean"] for r in rows], 0.4, yerr=[r["random_std"] for r in rows], capsize=3,
           color="#bbbbbb", label="random")
    for xi, r in zip(x, rows):
        top = max(r["score_mean"] + r["score_std"], r["random_mean"] + r["random_std"])
        txt = ax.text(xi, min(top + 0.04, 1.08), significance_stars(float(r["p_adjusted"])), ha="center",
                      va="bottom", fontsize=9)
        txt.set_gid("significance")
    ax.axhline(0.5, color="#888888", linewidth=0.7, linestyle="--")
    ax.set_ylim(0, 1.18)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("TCAV score")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or "TCAV (stars: two-sided t-test vs random, Bonferroni-corrected)", fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, formats: Sequence[str] = FORMATS, dpi: int = 150
                ) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix of ``formats`` (``path``'s own suffix is replaced).

    Returns:
        the written files.

    Raises:
        ValueError: an unsupported format.
    """
    base = Path(path)
    if base.suffix.lstrip(".") in FORMATS:
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ValueError(f"unsupported figure format {fmt!r}; use {FORMATS}")
        p = base.with_name(base.name + "." + fmt)
        fig.savefig(p, format=fmt, dpi=dpi, facecolor="white")
        out.append(p)
    return out
