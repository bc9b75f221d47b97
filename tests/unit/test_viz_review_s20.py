"""Review s20 of the explain figures: the last row's room (F1), the method comparison's absent leads, padding and
shares (F2), the CAV accuracy held out for small sets (F3), the 3 x 4 column width of short windows (F4) and NaN
samples in the gain choice (F5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.data.synthetic import generate_record
from ecgfm.explain import visualize as viz


def _chart_axes(fig):
    return next(ax for ax in fig.axes if ax.get_gid() == "ecg_chart")


def _header(fig):
    return next(t.get_text() for t in fig.texts if t.get_gid() == "chart_header")


@pytest.fixture(scope="module")
def record():
    return generate_record(6, seed=0, fs=100.0, duration=10.0)


# ---------------------------------------------------------------- F1: the last row has the room of the others
@pytest.mark.parametrize("layout,names", [("3x4", CANONICAL_LEADS), ("rows", ["II"])])
def test_last_row_deep_wave_inside_axes(layout, names):
    fs, n = 500.0, 5000
    t = np.arange(n) / fs
    sig = np.zeros((len(names), n))
    row = list(names).index("II")
    for k in range(10):   # -1.45 mV S waves: fit a row's 1.5 mV room at 10 mm/mV, so not clipped
        sig[row, (t >= k + 0.30) & (t < k + 0.34)] = 0.5
        sig[row, (t >= k + 0.34) & (t < k + 0.38)] = -1.45
    fig = viz.plot_ecg_chart(sig, fs, names, layout=layout)
    ax = _chart_axes(fig)
    assert set(fig.ecg_gains.values()) == {10.0}
    assert not [ln for ln in ax.lines if ln.get_gid() == "clipped"]
    y0, y1 = ax.get_ylim()
    lowest = min(np.nanmin(ln.get_ydata()) for ln in ax.lines if len(ln.get_ydata()))
    assert lowest >= y0                                              # the whole trace is inside the axes
    room = 3.0 / 2
    n_rows = 4 if layout == "3x4" else 1
    assert y0 <= -(n_rows - 1) * 3.0 - room and y1 >= room          # axes margins >= the row's room both ways


# ---------------------------------------------------------------- F5: NaN samples
def test_nan_sample_does_not_force_smallest_gain(record):
    sig = np.array(record.signal, dtype=float)
    clean = viz.plot_ecg_chart(sig, 100.0, CANONICAL_LEADS).ecg_gains
    sig[0, 10] = np.nan
    fig = viz.plot_ecg_chart(sig, 100.0, CANONICAL_LEADS)
    assert fig.ecg_gains == clean and set(clean.values()) == {10.0}
    assert "missing (NaN) samples drawn as gaps: I" in _header(fig).replace("\n", " ")


# ---------------------------------------------------------------- F2: method comparison
def _two_lead_padded(record):
    sig = np.array(record.signal, dtype=float)
    present = np.zeros(12, bool)
    present[[1, 10]] = True                                          # II and V5 only
    sig[~present] = 0
    n_real = 400                                                     # 4 s recorded of a 10 s window
    sig[:, n_real:] = 0
    rng = np.random.default_rng(0)
    att = rng.normal(size=sig.shape) * present[:, None]
    att[:, n_real:] = 0.3 * rng.normal(size=(12, 1000 - n_real))   # gradient mass on padding and absent rows
    return sig, present, n_real, att


def test_method_comparison_present_leads_and_recorded_shares(record):
    from ecgfm.explain.attribution import Attribution

    sig, present, n_real, att = _two_lead_padded(record)
    fig = viz.plot_method_comparison(sig, 100.0, {"ig": att, "saliency": np.abs(att)}, CANONICAL_LEADS,
                                     present=present, padded_from_s=4.0, units="uV")
    panels = [ax for ax in fig.axes if (ax.get_gid() or "").startswith("method:")]   # not the colour bar
    leads = sorted({ax.get_gid().split("lead:")[1] for ax in panels})
    assert leads == ["II", "V5"]                                     # n_leads=3, but only 2 are present
    # the shares equal Attribution.per_lead(recorded=...) over the present leads' recorded samples
    a = Attribution(values=torch.as_tensor(att)[None], method="ig", options={}, target=None,
                    inputs=torch.as_tensor(sig)[None], fs=100.0, lead_names=tuple(CANONICAL_LEADS), elapsed_s=0.0)
    per = a.per_lead(recorded=torch.arange(1000) < n_real)[0].numpy()
    want = per / per.sum()
    got = viz._recorded_shares(att, sig, present, n_real)
    np.testing.assert_allclose(got, want)
    texts = [t.get_text() for ax in panels for t in ax.texts if t.get_gid() == "lead_share"]
    assert texts[0] == f"II {100 * want[1]:.0f}%, V5 {100 * want[10]:.0f}%"
    assert all(len([p for p in ax.patches if p.get_gid() == "padding"]) == 1 for ax in panels)
    label = next(t for t in fig.texts if t.get_gid() == "amplitude_label").get_text()
    assert "uV" in label and "zero-padded from 4.00 s" in label


def test_method_comparison_named_absent_lead_not_drawn(record):
    sig, present, _, att = _two_lead_padded(record)
    fig = viz.plot_method_comparison(sig, 100.0, {"ig": att}, CANONICAL_LEADS, leads=["II", "aVL"],
                                     present=present, padded_from_s=4.0)
    ax = next(ax for ax in fig.axes if ax.get_gid() == "method:ig|lead:aVL")
    assert [t.get_text() for t in ax.texts if t.get_gid() == "absent_lead"] == ["not recorded"]
    assert not ax.lines and not ax.images                           # no flat trace, no overlay
    panels = [ax for ax in fig.axes if (ax.get_gid() or "").startswith("method:")]   # not the colour bar
    share = [t.get_text() for t in panels[-1].texts if t.get_gid() == "lead_share"][0]
    assert "aVL not recorded" in share


# ---------------------------------------------------------------- F4: 3 x 4 column width of short windows
def test_short_window_header_states_column_width(record):
    sig = np.array(record.signal, dtype=float)[:, :250]              # 2.5 s model window
    head = _header(viz.plot_ecg_chart(sig, 100.0, CANONICAL_LEADS)).replace("\n", " ")
    assert "3 x 4 columns 0.625 s each" in head
    assert "3 x 4 columns" not in _header(viz.plot_ecg_chart(np.array(record.signal, float), 100.0,
                                                             CANONICAL_LEADS))


# ---------------------------------------------------------------- F3: held-out CAV accuracy
def test_cav_accuracy_small_sets_is_held_out():
    from sklearn.linear_model import LogisticRegression

    from ecgfm.explain.concepts import _fit_cav_classifier

    rng = np.random.default_rng(0)
    # 2 concept examples vs 10 random: separable on training data by any fit (12 features), not in general
    z = rng.normal(size=(12, 40))
    y = np.r_[np.ones(2), np.zeros(10)]
    train_acc = LogisticRegression(max_iter=2000).fit(z, y).score(z, y)
    assert train_acc == 1.0
    _, acc = _fit_cav_classifier(z, y, 1.0, 0.3, 0)
    assert acc < 1.0                                                 # leave-one-out, not the training accuracy
    _, acc1 = _fit_cav_classifier(z[1:], y[1:], 1.0, 0.3, 0)        # a set of 1: no held-out estimate
    assert np.isnan(acc1)
    zz = np.r_[rng.normal(size=(10, 5)) + 3.0, rng.normal(size=(10, 5))]
    clf, acc2 = _fit_cav_classifier(zz, np.r_[np.ones(10), np.zeros(10)], 1.0, 0.3, 0)
    assert acc2 == 1.0 and clf.coef_.shape == (1, 5)                # the split path is unchanged
