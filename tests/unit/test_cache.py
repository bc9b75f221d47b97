"""Corpus cache: round trip, manifest, determinism, bad records, duplicates, incomplete caches, workers."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.cache import CorpusCache, auto_shard_records, natural_key, patient_hash, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec, preprocess_record, preprocess_signal, resample
from ecgfm.data.record import ECGDataError, ECGRecord

SPEC = PreprocessSpec(fs=100)


class SineSource:
    """Tiny picklable source of sinusoid records with varying length, lead sets and planted bad records.

    ``bad`` ids raise ECGDataError, ``crash`` ids raise RuntimeError, ``nan`` ids are all-NaN.
    """

    def __init__(self, n=10, name="sine", fs=250.0, prefix="r", bad=(), crash=(), nan=(), patients=3):
        self.name, self.n, self.fs, self.prefix = name, n, fs, prefix
        self.bad, self.crash, self.nan, self.patients = tuple(bad), tuple(crash), tuple(nan), patients

    def record_ids(self):
        return [f"{self.prefix}{i}" for i in range(self.n)]

    def load(self, rid):
        if rid in self.bad:
            raise ECGDataError(f"/data/{self.name}/{rid}.hea", "header names 3 signals but the file holds 2")
        if rid in self.crash:
            raise RuntimeError("decoder exploded")
        i = int(rid[len(self.prefix):])
        t = int(self.fs * (2 + i % 4))                     # 2-5 s
        tt = np.arange(t) / self.fs
        sig = np.stack([np.sin(2 * np.pi * (1 + 0.1 * k + 0.05 * i) * tt) * (1 + k) for k in range(12)])
        mask = np.ones(12, bool)
        if i % 3 == 1:                                     # a 2-lead record (II, V5)
            mask[:] = False
            mask[[1, 10]] = True
            sig[~mask] = 0
        if rid in self.nan:
            sig[:] = np.nan
        patient = None if i % 5 == 4 else f"p{i % self.patients}"
        return ECGRecord(signal=sig.astype(np.float32), fs=self.fs, lead_mask=mask, record_id=rid,
                         source=self.name, patient_id=patient, labels=(f"c{i % 2}",),
                         meta={"i": i, "fold": 1 + i % 10}, header={"path": f"/data/{rid}.hea"})


def _files(path):
    """The cache's content files (not its lock or its record of file stats, which name inodes and times)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in (".lock", ".verified.json")}


def test_round_trip_and_manifest(tmp_path):
    src = SineSource(n=11)
    rep = prepare_corpus(src, tmp_path / "c", SPEC, shard_records=4, workers=0, progress=False)
    assert (rep.n_converted, rep.n_skipped, rep.n_shards) == (11, 0, 3)
    cache = CorpusCache(tmp_path / "c")
    assert len(cache) == 11 and cache.fs == 100.0 and cache.spec == SPEC
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["spec"] == SPEC.to_dict() and manifest["counts"]["converted"] == 11
    assert [s["name"] for s in manifest["sources"]] == ["sine"] and len(manifest["shards"]) == 3
    assert cache.keys[:3] == ["sine/r0", "sine/r1", "sine/r2"] and cache.keys[-1] == "sine/r10"   # natural order
    for i, rid in enumerate(src.record_ids()):
        ref = preprocess_record(src.load(rid), SPEC)
        np.testing.assert_array_equal(cache.signal(i), ref.signal)
        np.testing.assert_array_equal(cache.lead_mask(i), ref.lead_mask)
        rec = cache.record(i)
        assert rec.record_id == rid and rec.labels == ref.labels and rec.meta == ref.meta
        assert rec.patient_id == ref.patient_id and rec.fs == 100.0
        assert cache.records["patient"][i] == patient_hash("sine", ref.patient_id)
        # windows: inside, crossing the end (zero-padded), before the start
        t = ref.n_samples
        np.testing.assert_array_equal(cache.window(i, 17, 50), ref.signal[:, 17:67])
        w = cache.window(i, t - 10, 30)
        np.testing.assert_array_equal(w[:, :10], ref.signal[:, t - 10:])
        assert not w[:, 10:].any()
        np.testing.assert_array_equal(cache.window(i, -5, 10)[:, 5:], ref.signal[:, :5])
    # only present leads are stored: 2-lead records use 2/12 of the bytes
    stored = sum(s["bin_bytes"] for s in manifest["shards"])
    expected = sum(int(m.sum()) * n * 4 for m, n in zip(cache.lead_masks, cache.n_samples))
    assert stored == expected
    assert cache.index.loc[1, "lead_mask"].sum() == 2
    cache.verify()


def test_labels_matrix_and_label_space(tmp_path):
    prepare_corpus(SineSource(n=6), tmp_path, SPEC, workers=0, progress=False)
    cache = CorpusCache(tmp_path)
    assert cache.label_space() == ["c0", "c1"]
    y = cache.labels_matrix(["c1", "c0"])
    assert y.dtype == np.float32 and y.shape == (6, 2)
    np.testing.assert_array_equal(y[:, 0], [0, 1, 0, 1, 0, 1])
    y2 = cache.labels_matrix(["even", "big"], label_fn=lambda labels, meta: (
        ["even"] if meta["i"] % 2 == 0 else []) + (["big"] if meta["i"] > 3 else []))
    np.testing.assert_array_equal(y2, [[1, 0], [0, 0], [1, 0], [0, 0], [1, 1], [0, 1]])
    with pytest.raises(ValueError, match="duplicates"):
        cache.labels_matrix(["a", "a"])


def test_conversion_is_deterministic_bytes(tmp_path):
    for name in ("a", "b"):
        prepare_corpus([SineSource(n=9, bad=("r3",))], tmp_path / name, SPEC, shard_records=4, workers=0,
                       progress=False)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and "manifest.json" in fa and "shards/shard-00002.bin" in fa
    for key in fa:
        assert fa[key] == fb[key], key


def test_bad_records_are_skipped_with_reasons_and_good_kept(tmp_path):
    srcs = [SineSource(n=8, bad=("r2",), crash=("r5",), nan=("r6",)),
            SineSource(n=3, name="sine", prefix="r"),                 # same dataset twice: same keys
            SineSource(n=4, name="other", prefix="r"),                # other dataset, overlapping record ids
            SineSource(n=2, name="third", prefix="x")]
    rep = prepare_corpus(srcs, tmp_path, SPEC, shard_records=3, workers=0, progress=False)
    cache = CorpusCache(tmp_path)
    assert cache.keys == ["sine/r0", "sine/r1", "sine/r3", "sine/r4", "sine/r7", "third/x0", "third/x1"]
    with open(tmp_path / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["source"], r["record_id"], r["reason"][:9]): r for r in rows}
    assert len(rows) == 3 + 3 + 4 == rep.n_skipped
    bad = [r for r in rows if r["record_id"] == "r2" and not r["reason"].startswith("duplicate")]
    assert len(bad) == 1 and bad[0]["path"] == "/data/sine/r2.hea" and "holds 2" in bad[0]["reason"]
    assert "RuntimeError: decoder exploded" in next(r for r in rows if r["record_id"] == "r5")["reason"]
    assert "NaN" in next(r for r in rows if r["record_id"] == "r6")["reason"]
    dup = [r for r in rows if r["reason"].startswith("duplicate key")]
    assert sorted(r["record_id"] for r in dup) == ["r0", "r1", "r2"]
    cross = [r for r in rows if r["reason"].startswith("duplicate record_id")]
    assert {r["source"] for r in cross} == {"other"} and len(cross) == 4
    assert len(by_key) == len(rows)
    assert "duplicate key #" in rep.summary() or "duplicate key" in rep.summary()
    # allow_duplicate_ids keeps other/r* under their own keys, never the same key twice
    rep2 = prepare_corpus(srcs, tmp_path / "allow", SPEC, shard_records=3, workers=0, progress=False,
                          allow_duplicate_ids=True)
    keys = CorpusCache(tmp_path / "allow").keys
    assert len(keys) == len(set(keys)) == 7 + 4 and "other/r0" in keys and rep2.n_skipped == 6


def test_incomplete_or_damaged_cache_is_refused(tmp_path):
    with pytest.raises(ECGDataError, match="not an ecgfm corpus cache"):
        CorpusCache(tmp_path)
    prepare_corpus(SineSource(n=8), tmp_path / "c", SPEC, shard_records=3, workers=0, progress=False)
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(ECGDataError, match=r"incomplete cache.*3 of 3 shards done.*resume"):
        CorpusCache(tmp_path / "c")
    # resuming only finalises again (no shard redone) and gives the same manifest as before
    rep = prepare_corpus(SineSource(n=8), tmp_path / "c", SPEC, shard_records=3, workers=0, progress=False)
    assert rep.n_shards_reused == 3 and rep.n_converted_now == 0 and len(CorpusCache(tmp_path / "c")) == 8
    # a truncated shard is detected on open
    shard = tmp_path / "c" / "shards" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ECGDataError, match="wrong size"):
        CorpusCache(tmp_path / "c")


def test_different_preparation_in_same_dir_is_refused(tmp_path):
    prepare_corpus(SineSource(n=4), tmp_path, SPEC, workers=0, progress=False)
    with pytest.raises(ValueError, match="different preparation"):
        prepare_corpus(SineSource(n=4), tmp_path, PreprocessSpec(fs=50), workers=0, progress=False)


def test_cache_pickles_without_memmaps(tmp_path):
    prepare_corpus(SineSource(n=4), tmp_path, SPEC, workers=0, progress=False)
    cache = CorpusCache(tmp_path)
    ref = cache.signal(2)
    _ = cache.index
    blob = pickle.dumps(cache)
    assert len(blob) < 5000
    np.testing.assert_array_equal(pickle.loads(blob).signal(2), ref)


def test_worker_processes_give_the_same_bytes(tmp_path):
    src = SineSource(n=10, bad=("r4",))
    rep = prepare_corpus(src, tmp_path / "w", SPEC, shard_records=3, workers=2, progress=False)
    prepare_corpus(src, tmp_path / "s", SPEC, shard_records=3, workers=0, progress=False)
    assert rep.n_converted == 9 and rep.workers == 2 and rep.peak_rss_mb > 0
    assert _files(tmp_path / "w") == _files(tmp_path / "s")


def test_bad_arguments():
    with pytest.raises(ValueError, match="RecordSource"):
        prepare_corpus([object()], "/tmp/never", SPEC)
    with pytest.raises(ValueError, match="shard_records"):
        prepare_corpus(SineSource(), "/tmp/never", SPEC, shard_records=0)


def test_helpers():
    assert sorted(["r10", "r2", "r1"], key=natural_key) == ["r1", "r2", "r10"]
    # texts equal but for leading zeros: one order whatever order they come in (a set's order changes per process)
    for order in (["1", "01", "A01", "A1", "2"], ["01", "1", "A1", "A01", "2"]):
        assert sorted(order, key=natural_key) == ["01", "1", "2", "A01", "A1"]
    assert patient_hash("a", None) == -1 and patient_hash("a", "") == -1
    # the splits' unknown markers: every "-1" record was one "patient" to CLOCS's patient-aware positives
    assert patient_hash("a", "-1") == patient_hash("a", -1) == patient_hash("a", "nan") == -1
    assert patient_hash("a", -1.0) == patient_hash("a", "-1.0") == -1   # an int column with gaps, read by pandas
    assert patient_hash("a", "7") == patient_hash("a", 7) >= 0 and patient_hash("a", "7") != patient_hash("b", "7")


def test_prepare_config_composes_and_runs(tmp_path, capsys):
    """conf/prepare.yaml + overrides, as scripts/prepare.py receives it, drives prepare_from_config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ecgfm.data.cache import prepare_from_config, project_root

    with initialize_config_dir(str(project_root() / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=["sources=[synthetic]", "synthetic.n_records=5", "synthetic.fs=100",
                                            "synthetic.duration=2.5", f"out={tmp_path / 'syn'}", "workers=0",
                                            "progress=false", "spec.fs=50"])
        for name in ("ptbxl", "cinc2017", "folder"):
            assert name in cfg                                       # presets exist
        assert cfg.ptbxl.root == "../shared/data/ptbxl"
    rep = prepare_from_config(OmegaConf.to_container(cfg, resolve=True))
    assert rep.n_converted == 5 and "5 records converted" in capsys.readouterr().out
    cache = CorpusCache(tmp_path / "syn")
    assert cache.fs == 50.0 and cache.manifest["sources"][0]["n_records"] == 5
    with pytest.raises(ValueError, match="unknown source"):
        prepare_from_config({"sources": ["nope"], "out": str(tmp_path / "x"), "spec": {}})
    rep = prepare_from_config(OmegaConf.to_container(cfg, resolve=True))      # again: nothing converted now
    assert rep.n_converted_now == 0 and "nan" not in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "r1.hea").write_text("not a header\n")
    (bad / "r2.hea").write_text("r2 12 five hundred\n")
    with pytest.raises(ECGDataError, match="no record could be converted.*2 skipped"):    # not exit 0
        prepare_from_config({"sources": ["folder"], "out": str(tmp_path / "empty"), "spec": {}, "workers": 0,
                             "progress": False, "folder": {"root": str(bad)}})


def test_build_sources_resolves_relative_roots(fixture_dir, tmp_path):
    from ecgfm.data.cache import build_sources, project_root

    rel = Path("..") / "shared" / "data" / "fixture" / "ptbxl"        # as written in conf/prepare.yaml
    assert (project_root() / rel).resolve() == (fixture_dir / "ptbxl").resolve()
    (src,) = build_sources(["ptbxl"], {"ptbxl": {"root": str(rel), "fs": 100}})
    assert Path(src.root).resolve() == (fixture_dir / "ptbxl").resolve() and len(src.record_ids()) == 100
    (folder,) = build_sources(["mine"], {"mine": {"type": "folder", "root": str(fixture_dir / "ptbxl"),
                                                  "name": "mine"}})
    assert folder.name == "mine"


def test_unpicklable_source_is_refused_before_work(tmp_path):
    src = SineSource(n=2)
    src.handle = lambda: None                                  # lambdas do not pickle
    with pytest.raises(ValueError, match="cannot be pickled"):
        prepare_corpus(src, tmp_path, SPEC, workers=2, progress=False)
    assert prepare_corpus(src, tmp_path, SPEC, workers=0, progress=False).n_converted == 2


@pytest.mark.realdata
def test_real_fixture_records_round_trip(fixture_dir, tmp_path):
    """PTB-XL (12 leads, 100 Hz) and challenge-format records (500 Hz -> 100 Hz) from the shared fixture."""
    from ecgfm.data.readers import Challenge2021Source, PTBXLSource

    ptb = PTBXLSource(fixture_dir / "ptbxl", fs=100)
    chal = Challenge2021Source(fixture_dir / "cinc2021")
    rep = prepare_corpus([ptb, chal], tmp_path, SPEC, shard_records=64, workers=0, progress=False)
    n_chal = len(chal.record_ids())
    assert rep.n_converted == 100 + n_chal and rep.n_skipped == 0
    cache = CorpusCache(tmp_path)
    i = cache.keys.index("ptbxl/00001")
    ref = preprocess_record(ptb.load("00001"), SPEC)
    np.testing.assert_array_equal(cache.signal(i), ref.signal)
    assert cache.index.loc[i, "meta"]["strat_fold"] == ref.meta["strat_fold"]
    assert cache.index.loc[i, "patient_id"] == ref.patient_id is not None
    j = len(cache) - 1
    assert cache.keys[j].startswith(chal.name + "/") and cache.n_samples[j] == 1000    # 10 s at 100 Hz


def test_automatic_shard_size_and_cpu_accounting(tmp_path):
    """shard_records=None: about 32 shards of 64-1024 records, a function of the record count only."""
    assert auto_shard_records(10) == 64 and auto_shard_records(4557) == 143 and auto_shard_records(10**6) == 1024
    rep = prepare_corpus(SineSource(n=70), tmp_path / "a", SPEC, workers=0, progress=False)
    assert rep.n_shards == 2 and CorpusCache(tmp_path / "a").manifest["shard_records"] == 64
    assert rep.cpu_s > 0 and 0 < rep.cpu_ms_per_record < 1000 and rep.cpu_s_workers >= 0
    assert "ms per record" in rep.summary()
    same = prepare_corpus(SineSource(n=70), tmp_path / "b", SPEC, shard_records=64, workers=0, progress=False)
    assert same.n_shards == 2 and _files(tmp_path / "a") == _files(tmp_path / "b")


def test_fast_preprocessing_matches_plain_scipy_bit_for_bit():
    """The conversion's shortcuts (present leads only, cached filter designs) change no bit of the output:
    reference = the plain scipy calls on all 12 rows, absent rows zeroed afterwards."""
    from scipy import signal as sps

    rng = np.random.default_rng(5)
    sig = np.cumsum(rng.standard_normal((12, 3000)), axis=1).astype(np.float32)
    mask = np.zeros(12, bool)
    mask[[0, 7, 9]] = True
    sig[~mask] = 0.0
    spec = PreprocessSpec(fs=100, highpass=0.5, lowpass=40.0, clip=3.0)
    out, fs, out_mask = preprocess_signal(sig, 300.0, mask, spec)
    ref = sps.resample_poly(sig, 1, 3, axis=-1).astype(np.float32)
    sos = sps.butter(3, [0.5, 40.0], btype="bandpass", fs=100.0, output="sos")
    ref = sps.sosfiltfilt(sos, ref, axis=-1, padlen=21).astype(np.float32)
    x = ref[mask]
    ref[mask] = np.clip((x - x.mean(axis=1, keepdims=True)) / np.maximum(x.std(axis=1, keepdims=True), 1e-6), -3, 3)
    ref[~mask] = 0.0
    assert fs == 100.0 and (out_mask == mask).all() and out.tobytes() == ref.tobytes()
    for fs_in, fs_out in ((300, 100), (500, 100), (360, 100), (100, 250)):
        y = sig[:2, :1800]
        assert resample(y, fs_in, fs_out).tobytes() == sps.resample_poly(
            y, *_ratio(fs_out, fs_in), axis=-1).astype(np.float32).tobytes()


def _ratio(num: float, den: float) -> tuple[int, int]:
    from fractions import Fraction

    r = Fraction(num / den).limit_denominator(1000)
    return r.numerator, r.denominator
