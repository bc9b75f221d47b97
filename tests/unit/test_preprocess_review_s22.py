"""Review s22 of the preprocessing numerics.

* a record whose every lead is missing (NaN) at its start or end was cut there by the array API but filled (the
  nearest value held) by the file API and the cache: one record, two model inputs (up to 2.4 z apart);
* short NaN runs inside a lead were filled by interpolation without a trace (a warning only above 10 % of the lead):
  the samples filled are now counted per lead in the record's header (and so in a cache's index) and logged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import wfdb

import ecgfm
from ecgfm.artifacts import save_encoder
from ecgfm.backbones import create_backbone
from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec, preprocess_record, recorded_extent, trim_unrecorded_edges
from ecgfm.data.readers import read_wfdb
from ecgfm.data.record import CANONICAL_LEADS, ECGRecord


def _raw(n: int = 2500, fs: float = 500.0) -> ECGRecord:
    rng = np.random.default_rng(0)
    t = np.arange(n) / fs
    sig = (np.sin(2 * np.pi * 1.2 * t)[None] * rng.uniform(0.5, 1.5, (12, 1)) + 0.05 * rng.standard_normal((12, n)))
    return ECGRecord(signal=sig.astype(np.float32), fs=fs, lead_mask=np.ones(12, bool), record_id="r1",
                     source="mine", annotations={"sample": np.array([10, 400, 1200, 2450]),
                                                 "symbol": np.array(["N", "N", "V", "N"])})


class _Folder:
    """A one-record source of an in-memory record (for prepare_corpus)."""

    name = "mine"

    def __init__(self, rec: ECGRecord):
        self.rec = rec

    def record_ids(self) -> list[str]:
        return [self.rec.record_id]

    def load(self, rid: str) -> ECGRecord:
        return self.rec


def test_recorded_span():
    x = np.ones((2, 10))
    x[:, :3] = np.nan
    x[0, 8:] = np.nan   # one lead still recorded at the end
    assert recorded_extent(x) == (3, 10)
    x[1, 9] = np.inf
    assert recorded_extent(x) == (3, 9)
    assert recorded_extent(np.full((2, 4), np.nan)) == (0, 4) and recorded_extent(np.ones((1, 5))) == (0, 5)


def test_unrecorded_edges_are_cut_alike_on_every_input_path(tmp_path):
    rec = _raw()
    sig = rec.signal.copy()
    sig[:, :300] = np.nan            # every lead missing for the first 0.6 s ...
    sig[:, -150:] = np.nan           # ... and the last 0.3 s
    sig[3, 300:320] = np.nan         # a lead missing a little longer at the start: filled, not cut
    rec = rec.replace(signal=sig)
    cut = trim_unrecorded_edges(rec)
    assert cut.n_samples == 2500 - 450 and cut.header["trimmed_edge_samples"] == [300, 150]
    # the beats at samples 10 and 2450 lay in the cut-off parts: left out with their symbols, not moved to the edges
    assert cut.annotations["sample"].tolist() == [100, 900] and cut.annotations["symbol"].tolist() == ["N", "V"]
    peaks = rec.replace(annotations={"r_peaks": np.array([5, 350, 2400]), "af_episodes": [[100, 500], [2300, 2490]],
                                     "note": "x"})
    got = trim_unrecorded_edges(peaks).annotations
    assert got["r_peaks"].tolist() == [50] and got["af_episodes"] == [[0, 200], [2000, 2049]] and got["note"] == "x"
    whole = _raw()
    assert trim_unrecorded_edges(whole) is whole   # nothing to cut: the record itself

    spec = PreprocessSpec(fs=100.0)
    pre = preprocess_record(rec, spec)
    assert pre.n_samples == 410 and pre.header["trimmed_edge_samples"] == [300, 150]
    prepare_corpus(_Folder(rec), tmp_path / "c", spec, workers=0, progress=False)
    cached = CorpusCache(tmp_path / "c").record(0)
    np.testing.assert_array_equal(cached.signal, pre.signal)

    wfdb.wrsamp("r1", fs=500, units=["mV"] * 12, sig_name=list(CANONICAL_LEADS), p_signal=sig.T.astype(float),
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    torch.manual_seed(0)
    save_encoder(tmp_path / "enc", create_backbone("vit1d_test").eval(), spec, fs=100.0, window_samples=250)
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    from_cache = enc.embed(cached)
    from_array = enc.embed(sig, fs=500)
    from_record = enc.embed(rec)
    from_file = enc.embed(str(tmp_path / "r1"))
    np.testing.assert_allclose(from_array, from_cache, atol=1e-5)
    np.testing.assert_allclose(from_record, from_cache, atol=1e-5)
    np.testing.assert_allclose(from_file, from_cache, atol=1e-3)   # the file holds 1 uV steps


def test_filled_samples_are_counted_and_logged(tmp_path, caplog):
    rec = _raw()
    sig = rec.signal.copy()
    sig[7, 1000:1045] = np.nan       # 0.09 s of V2: under the 10 % warning
    sig[0, 5] = np.inf
    rec = rec.replace(signal=sig)
    with caplog.at_level(logging.INFO, logger="ecgfm.data.preprocess"):
        pre = preprocess_record(rec, PreprocessSpec(fs=100.0))
    assert pre.header["filled_samples"] == {"I": 1, "V2": 45}
    assert any("46 missing sample(s)" in r.getMessage() and "V2 45" in r.getMessage() for r in caplog.records)
    assert "filled_samples" not in preprocess_record(_raw(), PreprocessSpec(fs=100.0)).header
    spec = PreprocessSpec(fs=100.0, leads=("I", "II"))   # a lead the model does not read is not counted
    assert preprocess_record(rec, spec).header["filled_samples"] == {"I": 1}
    prepare_corpus(_Folder(rec), tmp_path / "c", PreprocessSpec(fs=100.0), workers=0, progress=False)
    assert CorpusCache(tmp_path / "c").record(0).header["filled_samples"] == {"I": 1, "V2": 45}
