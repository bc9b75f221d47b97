"""Explanation figures: the clinical chart (paper scale, grid, calibration, labels, overlay), method comparison,
lead bars, counterfactual and TCAV plots, saved as PNG / SVG / PDF with the current matplotlib."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.image import AxesImage

from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.data.synthetic import generate_record
from ecgfm.explain import visualize as viz

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<svg"}


@pytest.fixture(scope="module")
def record():
    return generate_record(6, seed=0, fs=100.0, duration=10.0)


@pytest.fixture(scope="module")
def attribution(record):
    rng = np.random.default_rng(0)
    return rng.normal(size=record.signal.shape) * record.evidence + 0.01 * rng.normal(size=record.signal.shape)


def _chart_axes(fig):
    return next(ax for ax in fig.axes if ax.get_gid() == "ecg_chart")


def _by_gid(ax, gid):
    arts = list(ax.lines) + list(ax.collections) + list(ax.images) + list(ax.texts)
    return [a for a in arts if a.get_gid() == gid]


def test_chart_grid_scale_calibration_labels(record, attribution):
    with warnings.catch_warnings():
        warnings.simplefilter("error", matplotlib.MatplotlibDeprecationWarning)
        fig = viz.plot_ecg_chart(record.signal, record.fs, CANONICAL_LEADS, attribution=attribution, title="t")
    ax = _chart_axes(fig)
    # 1 mm (0.04 s, 0.1 mV) minor and 5 mm (0.2 s, 0.5 mV) major grid lines over the whole chart
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    for gid, sx, sy in (("grid_minor", viz.MINOR_S, viz.MINOR_MV), ("grid_major", viz.MAJOR_S, viz.MAJOR_MV)):
        (grid,) = _by_gid(ax, gid)
        segs = grid.get_segments()
        xs = np.sort([s[0, 0] for s in segs if s[0, 0] == s[1, 0]])
        ys = np.sort([s[0, 1] for s in segs if s[0, 1] == s[1, 1]])
        np.testing.assert_allclose(np.diff(xs), sx, atol=1e-9)
        np.testing.assert_allclose(np.diff(ys), sy, atol=1e-9)
        assert xs[0] - x0 < sx and x1 - xs[-1] < sx and ys[0] - y0 < sy and y1 - ys[-1] < sy
    # true paper scale: 25 mm per second and 10 mm per mV
    bbox = ax.get_position().transformed(fig.transFigure).transformed(fig.dpi_scale_trans.inverted())
    assert x0 < -0.2 and x1 == pytest.approx(10.04)   # room for the calibration pulse, the whole record
    assert bbox.width * 25.4 == pytest.approx((x1 - x0) * 25.0, rel=1e-6)
    assert bbox.height * 25.4 == pytest.approx((y1 - y0) * 10.0, rel=1e-6)
    # 3 x 4 + rhythm strip: 4 rows with a 1 mV calibration pulse each, 13 lead labels
    cal = _by_gid(ax, "calibration")
    assert len(cal) == 4
    for line in cal:
        ys = line.get_ydata()
        assert max(ys) - min(ys) == pytest.approx(1.0)
    labels = [t.get_text() for t in _by_gid(ax, "lead_label")]
    assert sorted(labels) == sorted(list(CANONICAL_LEADS) + ["II"])
    overlays = _by_gid(ax, "attribution")
    assert len(overlays) == 13 and all(isinstance(o, LineCollection) for o in overlays)
    # symmetric, diverging colour scale in a colour bar
    cbar_axes = [a for a in fig.axes if a is not ax]
    assert len(cbar_axes) == 1


def test_chart_gain_keeps_tall_chest_leads_in_their_row(record):
    """V1-V3 three times taller than the limb leads: the chest leads are drawn at a lower gain (one of 10 / 5 /
    2.5 mm/mV), every trace stays within half a row of its baseline, the gains are printed in the header and beside
    the chest leads, and the limb leads keep 10 mm/mV (their calibration pulse is 1 mV = 10 mm)."""
    sig = np.array(record.signal, dtype=np.float64)
    sig[:6] *= 1.2 / np.abs(sig[:6]).max()          # limb leads peak at 1.2 mV
    sig[6:9] *= 3.3 / np.abs(sig[6:9]).max()        # V1-V3 at 3.3 mV: 33 mm at 10 mm/mV, beyond their 15 mm half-row
    fig = viz.plot_ecg_chart(sig, record.fs, record_id="ptbxl/00008")
    gains = fig.ecg_gains
    assert all(gains[lead] == 10.0 for lead in CANONICAL_LEADS[:6])
    assert all(gains[lead] == 2.5 for lead in CANONICAL_LEADS[6:])    # 3.3 mV x 0.5 = 16.5 mm > 15 mm at 5 mm/mV
    ax = _chart_axes(fig)
    traces = [line for line in ax.lines if line.get_gid() is None and len(line.get_ydata()) > 10]
    assert len(traces) == 13
    for r, row_lines in enumerate([traces[i * 4:(i + 1) * 4] for i in range(3)] + [traces[12:]]):
        base = -r * 3.0
        for line in row_lines:
            assert np.abs(np.asarray(line.get_ydata()) - base).max() <= 1.5 + 1e-9
    cal = _by_gid(ax, "calibration")
    assert [max(c.get_ydata()) - min(c.get_ydata()) for c in cal] == pytest.approx([1.0] * 4)
    assert sorted(t.get_text() for t in _by_gid(ax, "lead_gain")) == ["2.5 mm/mV"] * 6
    (header,) = [t for t in fig.texts if t.get_gid() == "chart_header"]
    assert header.get_text() == ("record ptbxl/00008 | 100 Hz | gain 10 mm/mV (limb), 2.5 mm/mV (chest) | "
                                 "paper speed 25 mm/s")
    # a fixed gain for the whole chart; the calibration pulse follows it
    fig = viz.plot_ecg_chart(sig, record.fs, gain=5, chest_gain=None)
    assert set(fig.ecg_gains.values()) == {5.0} and not _by_gid(_chart_axes(fig), "lead_gain")
    assert all(max(c.get_ydata()) - min(c.get_ydata()) == pytest.approx(0.5)
               for c in _by_gid(_chart_axes(fig), "calibration"))
    (header,) = [t for t in fig.texts if t.get_gid() == "chart_header"]
    assert header.get_text() == "100 Hz | gain 5 mm/mV | paper speed 25 mm/s"
    with pytest.raises(ValueError, match="gain"):
        viz.plot_ecg_chart(sig, record.fs, gain=0)


def test_choose_gain():
    assert viz.choose_gain(1.4, 1.5) == 10.0
    assert viz.choose_gain(2.9, 1.5) == 5.0
    assert viz.choose_gain(3.1, 1.5) == 2.5
    assert viz.choose_gain(9.0, 1.5) == 2.5          # nothing fits: the smallest standard gain


def test_chart_saved_in_all_formats(tmp_path, record, attribution):
    fig = viz.plot_ecg_chart(record.signal, record.fs, attribution=attribution, overlay="band")
    assert all(isinstance(o, AxesImage) for o in _by_gid(_chart_axes(fig), "attribution"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", matplotlib.MatplotlibDeprecationWarning)
        paths = viz.save_figure(fig, tmp_path / "chart.png", dpi=60)
    assert [p.suffix for p in paths] == [".png", ".svg", ".pdf"]
    for p in paths:
        head = p.read_bytes()[:400]
        assert p.stat().st_size > 1000
        assert MAGIC[p.suffix[1:]] in head


def test_symmetric_norm_and_interpolation(record, attribution):
    norm = viz.symmetric_norm(attribution)
    assert norm.vmin == -norm.vmax > -np.inf and norm.vmax > 0
    assert viz.symmetric_norm(np.zeros(5)).vmax == 1.0
    # attribution at half the rate is interpolated onto the signal's time axis
    fig = viz.plot_ecg_chart(record.signal, record.fs, attribution=attribution[:, ::2], attribution_fs=50.0)
    assert len(_by_gid(_chart_axes(fig), "attribution")) == 13


def test_chart_without_all_leads_uses_rows(record):
    sig = record.signal[[1, 6]]
    fig = viz.plot_ecg_chart(torch.as_tensor(sig), record.fs, ["II", "V1"], attribution=sig)
    ax = _chart_axes(fig)
    assert [t.get_text() for t in _by_gid(ax, "lead_label")] == ["II", "V1"]
    assert len(_by_gid(ax, "calibration")) == 2


def test_chart_bad_input(record):
    with pytest.raises(ValueError, match="rows"):
        viz.plot_ecg_chart(record.signal, record.fs, attribution=record.signal[:3])
    with pytest.raises(ValueError, match="overlay"):
        viz.plot_ecg_chart(record.signal, record.fs, attribution=record.signal, overlay="heat")
    with pytest.raises(ValueError, match="leads, samples"):
        viz.plot_ecg_chart(record.signal[0], record.fs)
    with pytest.raises(ValueError, match="format"):
        viz.save_figure(viz.plot_lead_importance(np.ones(12)), "/tmp/x", formats=["bmp"])


def test_method_comparison_rows_and_columns(tmp_path, record, attribution):
    atts = {"ig": attribution, "occlusion": -attribution, "gradcam": np.abs(attribution)}
    fig = viz.plot_method_comparison(record.signal, record.fs, atts, n_leads=2)
    gids = [a.get_gid() for a in fig.axes if (a.get_gid() or "").startswith("method:")]   # not the colour bar
    assert len(gids) == 6
    assert sum(g.startswith("method:occlusion|") for g in gids) == 2
    fig = viz.plot_method_comparison(record.signal, record.fs, atts, leads=["V1", "V5", "II"])
    assert {g.split("lead:")[1] for g in (a.get_gid() for a in fig.axes) if g.startswith("method:")} == \
        {"V1", "V5", "II"}
    assert viz.save_figure(fig, tmp_path / "cmp", formats=["svg"])[0].stat().st_size > 1000
    with pytest.raises(ValueError, match="not among"):
        viz.plot_method_comparison(record.signal, record.fs, atts, leads=["V7"])


def test_lead_importance_bars():
    imp = {"a": np.arange(12.0), "b": torch.ones(12)}
    fig = viz.plot_lead_importance(imp)
    ax = fig.axes[0]
    assert len(ax.containers) == 2
    heights = [r.get_height() for r in ax.containers[1]]
    np.testing.assert_allclose(heights, 1 / 12)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CANONICAL_LEADS)
    with pytest.raises(ValueError, match="12 leads"):
        viz.plot_lead_importance(np.ones(3))


def test_counterfactual_plot(record):
    cf = record.signal.copy()
    cf[7, 300:340] += 0.5
    windows = {"QRS": np.array([[290, 310]]), "T": np.array([[320, 350]])}
    fig = viz.plot_counterfactual(record.signal, cf, record.fs, windows=windows, n_leads=2)
    gids = {a.get_gid() for a in fig.axes}
    assert "overlay:V2" in gids and "difference:V2" in gids
    with pytest.raises(ValueError, match="must both be"):
        viz.plot_counterfactual(record.signal, cf[:3], record.fs)


def test_tcav_plot_stars():
    rows = [dict(concept="st_elevation", layer="stages", score_mean=0.95, score_std=0.05, random_mean=0.5,
                 random_std=0.3, p_adjusted=0.004),
            dict(concept="af", layer="stages", score_mean=0.4, score_std=0.2, random_mean=0.5, random_std=0.3,
                 p_adjusted=0.8)]
    fig = viz.plot_tcav(rows)
    ax = fig.axes[0]
    stars = [t.get_text() for t in ax.texts if t.get_gid() == "significance"]
    assert stars == ["**", "n.s."]
    assert len(ax.containers) >= 2
    assert viz.significance_stars(0.0005) == "***" and viz.significance_stars(float("nan")) == "n/a"
    with pytest.raises(ValueError):
        viz.plot_tcav([])


def test_a_model_rate_map_lands_on_its_time_and_another_duration_is_refused():
    """A 100 Hz map (1000 samples) over a 500 Hz, 10 s record is drawn where it belongs given its rate (it was drawn
    at 1/5 of its time); a map covering 2 s of a 10 s record is refused (its last value was held over the remaining
    8 s); a map of another length without its rate is refused (its rate used to be inferred, so a 2.5 s window's map
    was stretched over a 10 s record), in the comparison figure too; an Attribution brings its own rate."""
    import pytest
    import torch

    from ecgfm.explain.attribution import Attribution
    from ecgfm.explain.visualize import _resample_to, plot_ecg_chart, plot_method_comparison

    att = np.zeros((12, 1000))
    att[:, 495:505] = 1.0                                 # 4.95-5.05 s at 100 Hz
    up = _resample_to(att, 100.0, 5000, 500.0)
    hot = np.nonzero(up[0] > 0.5)[0] / 500.0
    assert 4.94 <= hot.min() and hot.max() <= 5.06
    with pytest.raises(ValueError, match="covers 2.000 s"):
        _resample_to(att[:, :200], 100.0, 5000, 500.0)
    sig = np.zeros((12, 5000), dtype=np.float32)
    with pytest.raises(ValueError, match="attribution covers"):
        plot_ecg_chart(sig, 500.0, attribution=att[:, :200], attribution_fs=100.0)
    for bad in (att, att[:, :250]):                       # no rate: refused, whatever the length
        with pytest.raises(ValueError, match="give attribution_fs"):
            plot_ecg_chart(sig, 500.0, attribution=bad)
        with pytest.raises(ValueError, match="give attribution_fs"):
            plot_method_comparison(sig, 500.0, {"m": bad})
    plot_ecg_chart(sig, 500.0, attribution=att, attribution_fs=100.0)
    plot_method_comparison(sig, 500.0, {"m": att}, attribution_fs=100.0)
    one = Attribution(values=torch.as_tensor(att[None]), method="saliency", options={}, target=None,
                      inputs=torch.zeros(1, 12, 1000), fs=100.0, lead_names=tuple(f"L{i}" for i in range(12)),
                      elapsed_s=0.0)
    plot_ecg_chart(sig, 500.0, attribution=one)
    plot_method_comparison(sig, 500.0, {"m": one})
    with pytest.raises(ValueError, match="computed at 100 Hz"):
        plot_ecg_chart(sig, 500.0, attribution=one, attribution_fs=500.0)


def test_method_comparison_band_covers_the_panel():
    from ecgfm.explain.visualize import plot_method_comparison

    t = np.arange(1000) / 100.0
    sig = np.tile(0.4 + 0.8 * np.sin(2 * np.pi * t), (12, 1)).astype(np.float32)   # -0.4 .. 1.2 mV, off-centre
    fig = plot_method_comparison(sig, 100.0, {"m": np.ones((12, 1000))}, overlay="band", leads=["II"])
    ax = [a for a in fig.axes if a.get_gid() and a.get_gid().startswith("method:")][0]
    band = [im for im in ax.images if im.get_gid() == "attribution"][0]
    lo, hi = band.get_extent()[2:]
    assert lo <= sig.min() and hi >= sig.max()
