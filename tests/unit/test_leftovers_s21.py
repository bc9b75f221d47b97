"""Leftovers of review s20 (s21): one /proc peak-memory reader for the benchmark scripts (ecgfm.timing), attribution
band cells centred on their samples, and the TCAV rows naming the estimate their CAV accuracy is."""

from __future__ import annotations

import importlib.util
import resource
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

STATUS = """Name:\tpython
VmPeak:\t 9000000 kB
VmHWM:\t 2097152 kB
VmRSS:\t 1048576 kB
Threads:\t4
"""


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_s21", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_proc(monkeypatch, status: str | None = STATUS, clear_refs: bool = True) -> list[str]:
    """/proc/self/status reads ``status`` (unreadable when None, as off Linux); writes to /proc/self/clear_refs are
    recorded (refused when ``clear_refs`` is false). As ``_no_proc`` of test_scripts_review_s20, at Path level."""
    real_read, real_write = Path.read_text, Path.write_text
    written: list[str] = []

    def read_text(self, *a, **k):
        if str(self).startswith("/proc/"):
            if status is None or str(self) != "/proc/self/status":
                raise OSError("no /proc")
            return status
        return real_read(self, *a, **k)

    def write_text(self, data, *a, **k):
        if str(self).startswith("/proc/"):
            if not clear_refs or str(self) != "/proc/self/clear_refs":
                raise OSError("refused")
            written.append(data)
            return len(data)
        return real_write(self, data, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "write_text", write_text)
    return written


def _fake_getrusage(maxrss: int):
    def getrusage(who):
        return types.SimpleNamespace(ru_maxrss=maxrss, ru_utime=0.0, ru_stime=0.0)
    return getrusage


# ------------------------------------------------------------------------------ 1. one /proc reader in ecgfm.timing
def test_peak_rss_from_proc_status_else_getrusage(monkeypatch):
    from ecgfm.timing import peak_rss_bytes, proc_status_bytes

    _fake_proc(monkeypatch)
    assert proc_status_bytes("VmHWM") == 2 * 2**30                  # kB in the file, bytes out
    assert proc_status_bytes("VmRSS") == 2**30
    assert proc_status_bytes("VmSwap") is None                      # no such field
    assert peak_rss_bytes() == 2 * 2**30
    monkeypatch.setattr(resource, "getrusage", _fake_getrusage(3 * 2**19))   # KiB on Linux
    monkeypatch.setattr(sys, "platform", "linux")
    _fake_proc(monkeypatch, status=None)
    assert proc_status_bytes("VmHWM") is None
    assert peak_rss_bytes() == 3 * 2**29                            # getrusage where /proc is not readable


def test_reset_peak_rss_writes_clear_refs_and_says_whether_it_was_accepted(monkeypatch):
    from ecgfm.timing import reset_peak_rss

    written = _fake_proc(monkeypatch)
    assert reset_peak_rss() is True and written == ["5"]
    _fake_proc(monkeypatch, clear_refs=False)
    assert reset_peak_rss() is False


def test_bench_scripts_read_memory_through_ecgfm_timing(monkeypatch):
    """bench_probe and bench_token_cache each parsed /proc/self/status by hand; they now use ecgfm.timing, with the
    same figures and labels."""
    for name in ("bench_probe", "bench_token_cache"):
        assert "/proc/self" not in (ROOT / "scripts" / f"{name}.py").read_text(), name
    bp, tc = _script("bench_probe"), _script("bench_token_cache")
    written = _fake_proc(monkeypatch)
    bp._reset_peak_memory()
    assert written == ["5"] and bp._PEAK_RESET["ok"] is True
    assert bp._rss_mib() == pytest.approx(1024.0)
    assert bp._peak_memory().startswith("RSS 2048 MiB (process, this cell)")
    assert tc._rss_mib() == pytest.approx(2048.0)
    _fake_proc(monkeypatch, clear_refs=False)
    bp._reset_peak_memory()
    assert bp._PEAK_RESET["ok"] is False
    assert bp._peak_memory().startswith("RSS 2048 MiB (process, since start: reset refused)")
    _fake_proc(monkeypatch, status=None)
    assert np.isnan(bp._rss_mib())


# ------------------------------------------------------------------------------ 2. band cells centred on samples
def _band_images(ax):
    return [im for im in ax.images if im.get_gid() == "attribution"]


def _cell_centre(im, k: int) -> float:
    x0, x1 = im.get_extent()[:2]
    n = im.get_array().shape[1]
    return x0 + (k + 0.5) * (x1 - x0) / n


def test_method_comparison_band_cell_is_centred_on_its_sample():
    from ecgfm.explain.visualize import plot_method_comparison

    fs, n, k = 100.0, 1000, 437
    t = np.arange(n) / fs
    sig = np.tile(np.sin(2 * np.pi * t), (12, 1)).astype(np.float32)
    att = np.zeros((12, n))
    att[:, k] = 1.0                                                  # one sample carries all the attribution
    fig = plot_method_comparison(sig, fs, {"m": att}, overlay="band", leads=["II"])
    ax = [a for a in fig.axes if a.get_gid() and a.get_gid().startswith("method:")][0]
    im = _band_images(ax)[0]
    assert im.get_extent()[:2] == pytest.approx((-0.5 / fs, (n - 0.5) / fs))
    alpha = np.asarray(im.get_array())[0, :, 3]
    assert int(np.argmax(alpha)) == k
    assert _cell_centre(im, k) == pytest.approx(k / fs)              # the trace draws sample k at k / fs


def test_chart_band_cells_are_centred_on_their_samples():
    from ecgfm.explain.visualize import plot_ecg_chart

    fs, n, k = 100.0, 1000, 123                                      # lead I shows samples 0..249 (2.5 s)
    t = np.arange(n) / fs
    sig = np.tile(0.5 * np.sin(2 * np.pi * t), (12, 1)).astype(np.float32)
    att = np.zeros((12, n))
    att[0, k] = 1.0
    fig = plot_ecg_chart(sig, fs, attribution=att, overlay="band")
    ax = next(a for a in fig.axes if a.get_gid() == "ecg_chart")
    ims = _band_images(ax)
    first = min(ims, key=lambda im: (im.get_extent()[0], -im.get_extent()[2]))
    seg = first.get_array().shape[1]
    assert first.get_extent()[:2] == pytest.approx((-0.5 / fs, (seg - 0.5) / fs))
    hot = max(ims, key=lambda im: float(np.asarray(im.get_array())[0, :, 3].max()))
    kk = int(np.argmax(np.asarray(hot.get_array())[0, :, 3]))
    assert _cell_centre(hot, kk) == pytest.approx(k / fs)
    # the four leads of the first row start at 0, 2.5, 5 and 7.5 s (each drawn up to and including the next's first
    # sample): the first cell of each is centred there, and a segment's last cell is the next one's first
    row = sorted((im for im in ims if im.get_extent()[2] == first.get_extent()[2]), key=lambda im: im.get_extent()[0])
    assert [_cell_centre(im, 0) for im in row] == pytest.approx([0.0, 2.5, 5.0, 7.5])
    for a, b in zip(row, row[1:]):
        assert _cell_centre(a, a.get_array().shape[1] - 1) == pytest.approx(_cell_centre(b, 0))


# ------------------------------------------------------------------------------ 3. which estimate cav_accuracy is
def test_cav_accuracy_estimate_follows_the_classifier_paths():
    from ecgfm.explain.concepts import _estimate_of_mean, cav_accuracy_estimate

    assert cav_accuracy_estimate(30, 30, 0.3) == "held-out split"
    assert cav_accuracy_estimate(3, 3, 0.3) == "held-out split"     # split of round(1.8) = 2
    assert cav_accuracy_estimate(3, 3, 0.1) == "leave-one-out"      # split of 1: too small
    assert cav_accuracy_estimate(2, 10, 0.3) == "leave-one-out"
    assert cav_accuracy_estimate(1, 10, 0.3) == "none"
    assert _estimate_of_mean(["leave-one-out", "held-out split"]) == "mixed: held-out split and leave-one-out"
    assert _estimate_of_mean(["held-out split", "none"]) == "none"
    assert _estimate_of_mean(["leave-one-out"] * 3) == "leave-one-out"


@pytest.fixture(scope="module")
def tiny_tcav():
    from tests.unit.explain_helpers import tiny_tcav_wrapper

    return tiny_tcav_wrapper()


def test_tcav_rows_say_which_estimate_cav_accuracy_is(tiny_tcav):
    from ecgfm.explain.concepts import TCAV, ConceptSet

    wrapper, x = tiny_tcav
    layer = "encoder.stages"
    big, pair, three = ConceptSet("big", x[:10]), ConceptSet("pair", x[10:12]), ConceptSet("three", x[12:15])
    randoms = [ConceptSet(f"r{i}", x[15 + 6 * i:21 + 6 * i]) for i in range(3)]     # 6 examples each
    mixed_randoms = [ConceptSet("r2a", x[33:35]), ConceptSet("r3a", x[35:38]), ConceptSet("r3b", x[37:40])]
    tcav = TCAV(wrapper, [layer])
    res = tcav.run(x[:4], "a", [big, pair, three], randoms)
    assert res.row("big")["cav_accuracy_estimate"] == "held-out split"
    assert res.row("pair")["cav_accuracy_estimate"] == "leave-one-out"
    assert res.row("three")["cav_accuracy_estimate"] == "held-out split"           # 3 + 6: split of 3
    assert res.to_dict()["rows"][1]["cav_accuracy_estimate"] == "leave-one-out"
    again = tcav.run(x[:4], "a", [pair], randoms)                                     # the CAVs from the cache
    assert tcav.cache.hits > 0 and again.row("pair")["cav_accuracy_estimate"] == "leave-one-out"
    assert again.row("pair")["cav_accuracy"] == pytest.approx(res.row("pair")["cav_accuracy"])
    mixed = tcav.run(x[:4], "a", [three], mixed_randoms).row("three")
    assert mixed["cav_accuracy_estimate"] == "mixed: held-out split and leave-one-out"
