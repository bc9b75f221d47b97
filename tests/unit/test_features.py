"""Feature extraction never lets non-finite values through, and the feature cache repairs itself (issue 9)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from torch import nn

from ecgfm.data.cache import CorpusCache, NonFiniteDataError, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGRecord
from ecgfm.evaluate import features as F
from ecgfm.evaluate.features import cached_features, extract_features

SPEC = PreprocessSpec(fs=100)


class _Src:
    name = "src"

    def record_ids(self):
        return [f"r{i}" for i in range(5)]

    def load(self, rid):
        i = int(rid[1:])
        sig = np.cos(np.arange(400, dtype=np.float32)[None] / (3 + i) + np.arange(12)[:, None]).astype(np.float32)
        return ECGRecord(signal=sig, fs=100.0, lead_mask=np.ones(12, bool), record_id=rid, source="src",
                         labels=("a",))


class _Enc(nn.Module):
    name = "enc"
    init_args: dict = {}

    def __init__(self, nan_rows: tuple[int, ...] = ()):
        super().__init__()
        self.lin = nn.Linear(12, 3)
        self.nan_rows = nan_rows

    def embed(self, x):
        z = self.lin(x.mean(-1))
        for r in self.nan_rows:          # an encoder that blows up on some inputs
            if r < len(z):
                z[r] = float("nan")
        return z


@pytest.fixture
def cache(tmp_path):
    prepare_corpus(_Src(), tmp_path / "c", SPEC, workers=0, progress=False)
    return CorpusCache(tmp_path / "c")


def _poison(cache: CorpusCache, record: int) -> None:
    from ecgfm.data import cache as cache_mod

    c = cache.columns()
    shard = cache.path / cache.manifest["shards"][int(c["shard"][record])]["bin"]
    with open(shard, "r+b") as f:
        f.seek(int(c["offset"][record]) + 100)
        f.write(np.full(3, np.inf, np.float32).tobytes())
    cache_mod._record_verified(cache.path, {str(shard.relative_to(cache.path)): shard})


def test_nonfinite_input_is_an_error_naming_the_record_and_nothing_is_cached(cache, tmp_path):
    _poison(cache, 2)
    cache = CorpusCache(cache.path)
    with pytest.raises(NonFiniteDataError, match=r"src/r2"):
        extract_features(_Enc(), cache, window=100, stride=100)
    with pytest.raises(NonFiniteDataError, match=r"src/r2"):
        cached_features(_Enc(), cache, window=100, stride=100, feature_dir=tmp_path / "f")
    assert not list((tmp_path / "f").glob("*.npz")) if (tmp_path / "f").exists() else True


def test_nonfinite_input_skipped_on_request(cache, tmp_path):
    _poison(cache, 2)
    cache = CorpusCache(cache.path)
    fs = cached_features(_Enc(), cache, window=100, stride=100, feature_dir=tmp_path / "f", nonfinite="skip")
    assert fs.skipped.tolist() == [2] and 2 not in fs.record and np.isfinite(fs.features).all()
    assert np.isnan(fs.record_means()[2]).all() and np.isfinite(np.delete(fs.record_means(), 2, 0)).all()
    assert fs.valid_rows(np.arange(5)).tolist() == [0, 1, 3, 4]
    again = cached_features(_Enc(), cache, window=100, stride=100, feature_dir=tmp_path / "f", nonfinite="skip")
    assert again.skipped.tolist() == [2]
    with pytest.raises(NonFiniteDataError, match="src/r2"):   # a strict caller is not handed the partial set
        cached_features(_Enc(), cache, window=100, stride=100, feature_dir=tmp_path / "f")


def test_nonfinite_embedding_is_an_error_or_skipped(cache, tmp_path):
    enc = _Enc(nan_rows=(5,))      # 4 windows per record, one batch: row 5 is window 1 of record 1
    bad = 1
    with pytest.raises(NonFiniteDataError, match=rf"src/r{bad}.*embedding"):
        cached_features(enc, cache, window=100, stride=100, feature_dir=tmp_path / "f")
    fs = extract_features(enc, cache, window=100, stride=100, nonfinite="skip")
    assert fs.skipped.tolist() == [bad] and np.isfinite(fs.features).all()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong_arrays", "nan_features",
                                    "rows_out_of_range"])
def test_damaged_feature_file_is_recomputed_with_a_log_line(cache, tmp_path, caplog, damage):
    enc = _Enc()
    a = cached_features(enc, cache, window=100, stride=100, feature_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_arrays":
        np.savez(path, features=np.zeros((2, 2), np.float32))    # a valid zip without the other arrays
    else:
        with np.load(path) as z:
            arrays = dict(z)
        if damage == "nan_features":
            arrays["features"][3, 1] = np.nan
        else:
            arrays["record"][0] = 99
        np.savez(path, **arrays)
    before = F.STATS["extractions"]
    with caplog.at_level(logging.WARNING):
        b = cached_features(enc, cache, window=100, stride=100, feature_dir=tmp_path)
    assert F.STATS["extractions"] == before + 1 and path.name in caplog.text
    np.testing.assert_allclose(a.features, b.features)
    c = cached_features(enc, cache, window=100, stride=100, feature_dir=tmp_path)   # repaired on disk
    assert F.STATS["extractions"] == before + 1 and np.allclose(c.features, a.features)


def test_feature_key_follows_cache_content(cache, tmp_path):
    """A shard rebuilt with other samples (same plan) must not reuse the old features."""
    fp = F.cache_fingerprint(cache)
    m = dict(cache.manifest)
    m["shards"] = [dict(s, bin_sha256="0" * 64) for s in m["shards"]]

    class _Other:
        manifest = m

        def __len__(self):
            return len(cache)

    assert F.cache_fingerprint(_Other()) != fp

    class _OtherMasks:                      # the same signal bytes, other lead masks: other lead-aware features
        manifest = cache.manifest
        lead_masks = ~np.asarray(cache.lead_masks, dtype=bool)

        def __len__(self):
            return len(cache)

    assert F.cache_fingerprint(_OtherMasks()) != fp


# ---------------------------------------------------------------------- lead-aware extraction (issue 12, item 1)
class _MixedSrc(_Src):
    """Records 0, 2, 4 have lead I only (zero-padded by the cache), 1 and 3 all twelve leads."""

    def load(self, rid):
        rec = super().load(rid)
        if int(rid[1:]) % 2:
            return rec
        mask = np.zeros(12, bool)
        mask[0] = True
        return ECGRecord(signal=rec.signal * mask[:, None], fs=100.0, lead_mask=mask, record_id=rid, source="src",
                         labels=("a",))


def _vit():
    import torch

    from ecgfm.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit1d_test", seq_len=100, patch_size=25)


def test_lead_aware_extraction_passes_record_masks_and_keys_apart(tmp_path):
    import torch

    prepare_corpus(_MixedSrc(), tmp_path / "m", SPEC, workers=0, progress=False)
    mixed = CorpusCache(tmp_path / "m")
    assert mixed.lead_masks.sum(1).tolist() == [1, 12, 1, 12, 1]
    vit = _vit()
    assert F.accepts_lead_mask(vit) and not F.accepts_lead_mask(_Enc())
    assert F.uses_lead_masks(vit, mixed) and not F.uses_lead_masks(vit, mixed, lead_aware=False)
    aware = extract_features(vit, mixed, 100, 100, batch_size=3)
    padded = extract_features(vit, mixed, 100, 100, batch_size=3, lead_aware=False)
    assert np.array_equal(aware.record, padded.record)
    from ecgfm.data.preprocess import sliding_windows

    with torch.no_grad():
        for j, (r, z) in enumerate(zip(aware.record, aware.features)):
            w = int(np.sum(aware.record[:j] == r))
            x = torch.from_numpy(np.ascontiguousarray(sliding_windows(mixed.signal(int(r)), 100, 100)[w]))[None]
            m = torch.from_numpy(mixed.lead_mask(int(r)))[None]
            np.testing.assert_allclose(z, vit.embed(x, lead_mask=m)[0].numpy(), atol=1e-5)
            np.testing.assert_allclose(padded.features[j], vit.embed(x)[0].numpy(), atol=1e-5)
    one = np.isin(aware.record, [0, 2, 4])
    np.testing.assert_array_equal(aware.features[~one], padded.features[~one])    # 12-lead windows: same numbers
    assert not np.allclose(aware.features[one], padded.features[one], atol=1e-3)
    # the feature-cache key tells the two apart; zero-padded files are not reused for lead-aware extraction
    fa = cached_features(vit, mixed, 100, 100, tmp_path / "f")
    fp = cached_features(vit, mixed, 100, 100, tmp_path / "f", lead_aware=False)
    assert fa.key != fp.key and len(list((tmp_path / "f").glob("*.npz"))) == 2
    np.testing.assert_allclose(fa.features, aware.features, atol=1e-6)


def test_lead_aware_extraction_of_a_twelve_lead_cache_keeps_its_key(cache, tmp_path):
    vit = _vit()
    assert not F.uses_lead_masks(vit, cache)
    a = cached_features(vit, cache, 100, 100, tmp_path / "f")
    hits = F.STATS["cache_hits"]               # a process-wide counter: this test's own hit is the difference
    b = cached_features(vit, cache, 100, 100, tmp_path / "f", lead_aware=False)
    assert a.key == b.key and F.STATS["cache_hits"] == hits + 1
    np.testing.assert_array_equal(a.features, extract_features(vit, cache, 100, 100, lead_aware=False).features)


def test_record_features_are_appended_per_record_and_skips_are_joined():
    from ecgfm.evaluate.features import FeatureSet, with_record_features

    fs = FeatureSet(features=np.arange(12, dtype=np.float32).reshape(6, 2), record=np.array([0, 0, 1, 1, 3, 3]),
                    n_records=4, key="enc", skipped=np.array([2]))
    side = FeatureSet(features=np.array([[10.0], [11.0], [13.0]], np.float32), record=np.array([0, 1, 3]),
                      n_records=4, key="hc", skipped=np.zeros(0, np.int64))
    out = with_record_features(fs, side)
    assert out.record.tolist() == [0, 1, 3] and out.skipped.tolist() == [2] and out.key == "enc+hc"
    np.testing.assert_allclose(out.features, [[1, 2, 10], [5, 6, 11], [9, 10, 13]])
    stats = with_record_features(fs, side, "mean_std")
    np.testing.assert_allclose(stats.features[0], [1, 2, 1, 1, 10])           # mean, std, side
    side.skipped = np.array([1])                                               # skipped by the side features
    side.record = np.array([0, 3])
    side.features = side.features[[0, 2]]
    assert with_record_features(fs, side).record.tolist() == [0, 3]
    with pytest.raises(ValueError, match="another corpus"):
        with_record_features(fs, FeatureSet(features=side.features, record=side.record, n_records=5))
    with pytest.raises(ValueError, match="mean_embedding or mean_std"):
        with_record_features(fs, side, "mean_prediction")


class _MemCache:
    """An in-memory corpus (len + signal(i)), as extract_features accepts."""

    def __init__(self, seed: int):
        self.x = np.random.default_rng(seed).standard_normal((4, 12, 500)).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def signal(self, i):
        return self.x[i]


def test_feature_cache_keys_tell_corpora_and_constructor_settings_apart(tmp_path):
    """Two in-memory corpora of one size had one key (no manifest: the record count alone), and a backbone built
    without the registry hashed no constructor settings (pool='avg' and 'concat', same weights): the second call
    was handed the first one's features."""
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.backbones.resnet1d import XResNet1d

    torch.manual_seed(0)
    vit = create_backbone("vit1d_test")
    a = cached_features(vit, _MemCache(0), 250, 250, tmp_path / "a")
    b = cached_features(vit, _MemCache(1), 250, 250, tmp_path / "a")
    assert a.key != b.key
    np.testing.assert_array_equal(b.features, extract_features(vit, _MemCache(1), 250, 250).features)
    assert cached_features(vit, _MemCache(0), 250, 250, tmp_path / "a").key == a.key     # same content: reused
    kw = dict(layers=(1, 1), expansion=1, widths=(8, 16), stem_widths=(8, 8, 8))
    torch.manual_seed(0)
    r_avg = XResNet1d(pool="avg", **kw)
    torch.manual_seed(0)
    r_cat = XResNet1d(pool="concat", **kw)
    assert F.encoder_fingerprint(r_avg) != F.encoder_fingerprint(r_cat)
    fc = cached_features(r_cat, _MemCache(0), 250, 250, tmp_path / "b")
    cached_features(r_avg, _MemCache(0), 250, 250, tmp_path / "b")
    assert cached_features(r_cat, _MemCache(0), 250, 250, tmp_path / "b").dim == fc.dim == r_cat.num_features
    # a registry-built backbone keeps its key (its init_args): another instance built the same way, with the same
    # weights, has the same key (the benchmark's feature caches stay valid), one weight changed does not
    torch.manual_seed(0)
    twin = create_backbone("vit1d_test")
    assert twin is not vit and F.encoder_fingerprint(twin) == F.encoder_fingerprint(vit)
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-3
    assert F.encoder_fingerprint(twin) != F.encoder_fingerprint(vit)


def test_rows_listed_twice_are_refused():
    """rows=[0, 1, 0] gave record 0 a token range that held record 1's tokens too (record_offsets assumes a
    record's windows are consecutive)."""
    import torch

    from ecgfm.backbones import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("vit1d_test")
    for fn in (F.extract_features, F.extract_tokens):
        with pytest.raises(ValueError, match=r"record\(s\) \[0\] more than once"):
            fn(vit, _MemCache(0), 250, 250, rows=np.array([0, 1, 0]))


def test_progress_line_counts_the_records_asked_for(cache, caplog):
    """With ``rows=`` the progress line counts the records of ``rows`` done (review s25: it printed the last record's
    cache row + 1 over the cache's size, e.g. "5/5 records" after two of the records [4, 1, 2])."""
    with caplog.at_level(logging.INFO, logger=F.log.name):
        extract_features(_Enc(), cache, window=10, stride=10, batch_size=1, rows=np.array([4, 1, 2]))
    lines = [r.getMessage() for r in caplog.records if "windows of" in r.getMessage()]
    assert lines and all(l.split(" records")[0].split()[-1].split("/")[1] == "3" for l in lines)
    assert lines[0].split(" records")[0].split()[-1] == "1/3"      # 20 windows of 40: record 4, the first of rows
