"""Crop-level rhythm pretext targets (``method.aux_targets=handcrafted_crop``): each view regresses the RR statistics
of its own beats, found once per record; morphology stays record-level."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.datamodules import CropDataset, PretrainDataModule
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.evaluate import handcrafted as H
from ecgfm.methods.simclr import SimCLRModule
from ecgfm.pipelines import train
from ecgfm.train.build import crop_targets_for
from tests.unit.test_handcrafted import beat_train, irregular, regular
from tests.unit.test_pretext_targets import BeatSource, _cfg
from tests.unit.test_simclr_clocs import TinyBackbone, synthetic_batch

NAMES = list(H.FEATURE_NAMES)
HR, BPM = NAMES.index("hr_mean"), NAMES.index("beats_per_min_count")
MORPH = [NAMES.index(n) for n in H.MORPH_FEATURES]
FS = 100.0


class TwoRhythmSource(BeatSource):
    """BeatSource plus record b7: 20 s regular at 60 bpm, then 20 s AF-like (irregular), then 20 s at 120 bpm."""

    def __init__(self) -> None:
        super().__init__()
        times = np.concatenate([regular(60, 20), 20 + irregular(20, seed=5), 40 + regular(120, 20)])
        self.signals.append(beat_train(times, 60.0, FS, seed=3))

    def __repr__(self) -> str:
        return "TwoRhythmSource(v1)"


@pytest.fixture(scope="module")
def rhythm_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("rhythm")
    prepare_corpus(TwoRhythmSource(), root / "c", PreprocessSpec(fs=FS), workers=0, progress=False)
    return CorpusCache(root / "c")


@pytest.fixture(scope="module")
def crop_file(rhythm_cache, tmp_path_factory):
    return H.crop_pretext_file([rhythm_cache], tmp_path_factory.mktemp("features"), clip=5.0)


def _unstandardise(crop: H.CropRhythmTargets, t: np.ndarray, name: str) -> np.ndarray:
    d = crop.data
    k = list(H.RHYTHM_FEATURES).index(name)
    return t[:, NAMES.index(name)] * d["scale"][k] + d["center"][k]


def test_record_rpeaks_find_the_beats_once_and_are_cached(rhythm_cache, tmp_path):
    offsets, positions, known, skipped = H.cached_rpeaks(rhythm_cache, tmp_path)
    assert known.all() and not skipped.any() and offsets.shape == (9,) and offsets[-1] == len(positions)
    b0 = positions[offsets[0]:offsets[1]]
    np.testing.assert_allclose(b0 / FS, regular(60, 20), atol=0.02)       # the true R times, sub-sample refined
    assert all((np.diff(positions[offsets[i]:offsets[i + 1]]) > 0).all() for i in range(8))
    path = tmp_path / f"{H.rpeaks_key(rhythm_cache)}.npz"
    assert path.exists()
    path.write_bytes(b"garbage")                                            # damaged: computed again
    again = H.cached_rpeaks(rhythm_cache, tmp_path)
    np.testing.assert_array_equal(again[1], positions)


def test_each_crop_gets_the_rhythm_of_its_own_beats(rhythm_cache, crop_file):
    crop = H.CropRhythmTargets(crop_file)
    assert len(crop) == 8 and [NAMES[c] for c in crop.columns] == list(H.RHYTHM_FEATURES)
    t = np.zeros((3, len(NAMES)), np.float32)
    flats = np.array([7, 7, 7])
    crop.fill(t, flats, np.array([200, 2200, 4200]), np.array([1200, 3200, 5200]))   # 10 s in each stretch
    hr = _unstandardise(crop, t, "hr_mean")
    assert abs(hr[0] - 60) < 2 and abs(hr[2] - 120) < 3                    # each view's own heart rate
    rmssd = _unstandardise(crop, t, "rmssd_rel")
    assert rmssd[1] > 0.15 and rmssd[0] < 0.05 and rmssd[2] < 0.05         # only the middle view is irregular
    assert np.isfinite(t[:, crop.columns]).all()
    assert (t[:, MORPH] == 0).all()                                        # columns it does not own: untouched


def test_crop_targets_match_the_record_targets_on_a_whole_record(rhythm_cache, crop_file, tmp_path):
    """A crop spanning a whole record reproduces its record-level rhythm targets (same peaks, same scale)."""
    crop = H.CropRhythmTargets(crop_file)
    record = H.pretext_targets([rhythm_cache], crop_file.parent, clip=5.0)
    n = rhythm_cache.columns()["n_samples"]
    rows = np.arange(6)                                                     # the 20 s records
    t = record[rows].copy()
    crop.fill(t, rows, np.zeros(6, np.int64), n[rows])
    np.testing.assert_allclose(t, record[rows], atol=1e-5)


def test_records_beyond_max_seconds_get_rhythm_targets_and_short_views_none(rhythm_cache, crop_file):
    crop = H.CropRhythmTargets(crop_file)
    record = H.pretext_targets([rhythm_cache], crop_file.parent, clip=5.0)
    assert not np.isfinite(record[6]).any()                                 # 90 s: no record-level target
    t = record[[6, 0]].copy()
    crop.fill(t, np.array([6, 0]), np.array([0, 1900]), np.array([1000, 2000]))   # record 0: 1 s left
    assert np.isfinite(t[0, crop.columns]).all() and not np.isfinite(t[0, MORPH]).any()
    assert abs(_unstandardise(crop, t[:1], "hr_mean")[0] - 70) < 2
    assert not np.isfinite(t[1, crop.columns]).any()                       # under 2 s of signal: unknown
    assert np.isfinite(t[1, MORPH]).all()                                   # its record's morphology stays


def test_a_view_without_enough_beats_says_so_through_its_indicators(rhythm_cache, crop_file):
    crop = H.CropRhythmTargets(crop_file)
    t = np.zeros((1, len(NAMES)), np.float32)
    crop.fill(t, np.array([0]), np.array([0]), np.array([300]))            # 3 s at 60 bpm: 2-3 beats
    d = crop.data
    k = list(H.RHYTHM_FEATURES).index("missing_drr")
    assert t[0, NAMES.index("missing_drr")] == pytest.approx(
        np.clip((1.0 - d["center"][k]) / d["scale"][k], -5, 5))
    assert not np.isfinite(t[0, NAMES.index("rmssd")])


def test_batches_carry_each_views_targets(rhythm_cache, crop_file):
    record = H.pretext_targets([rhythm_cache], crop_file.parent, clip=5.0)
    crop = H.CropRhythmTargets(crop_file)
    dm = PretrainDataModule(str(rhythm_cache.path), crop_samples=1000, views="segments", batch_size=8,
                            val_fraction=0.0, samples_per_epoch=64, seed=0, record_targets=record,
                            crop_targets=crop)
    differ = 0
    for batch in dm.train_dataloader():
        t, t2, idx = batch["t"].numpy(), batch["t2"].numpy(), batch["index"].numpy()
        np.testing.assert_array_equal(t[:, MORPH], record[idx][:, MORPH])
        np.testing.assert_array_equal(t2[:, MORPH], record[idx][:, MORPH])
        differ += int((np.abs(np.nan_to_num(t[idx == 7, HR] - t2[idx == 7, HR])) > 0.5).sum())
        # the first view's heart rate, found again in the batch's own crop (regular records: an irregular one may
        # lose an edge beat to the detector when it is cut out, which whole-record peaks avoid)
        x = batch["x"].numpy()[:, 1]
        for b in np.flatnonzero(np.isin(idx, [0, 1, 4, 5])):
            est = H.fill_missing(H.raw_features(x[b], FS))[0][HR]
            assert abs(_unstandardise(crop, t[b:b + 1], "hr_mean")[0] - est) < 0.02 * est
    assert differ > 0                                                       # views of b7 see different rhythms
    ds = dm.train_dataset()                      # what a spawned loader worker gets: the pickled dataset
    keys = [(7, 0.1), (7, 0.9), (3, 0.5)]
    clone, here = pickle.loads(pickle.dumps(ds)).__getitems__(keys), ds.__getitems__(keys)
    for k in ("t", "t2"):
        np.testing.assert_array_equal(clone[k].numpy(), here[k].numpy())
    single = CropDataset(dm.pool, np.arange(8), 1000, targets=record, crop_targets=crop)
    assert "t2" not in single[(7, 0.0)]
    with pytest.raises(ValueError, match="crop_targets"):
        CropDataset(dm.pool, np.arange(8), 1000, crop_targets=crop)        # needs the record-level targets


def test_crop_targets_pickle_as_their_path_and_refuse_a_damaged_file(crop_file, tmp_path):
    crop = H.CropRhythmTargets(crop_file)
    _ = crop.data
    blob = pickle.dumps(crop)
    assert len(blob) < 1000 and pickle.loads(blob)._data is None
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.npz: not a crop pretext file.*unreadable"):
        len(H.CropRhythmTargets(bad))
    np.savez(bad, offsets=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="bad.npz: .*'positions': missing"):
        len(H.CropRhythmTargets(bad))


def test_simclr_regresses_each_view_on_its_own_targets():
    batch = synthetic_batch(b=6)
    batch["t"], batch["t2"] = torch.zeros(6, 3), torch.ones(6, 3)
    m = SimCLRModule(TinyBackbone(), aug_seed=0, aux_targets="handcrafted_crop", aux_dim=3)
    with torch.no_grad():
        m.aux_head.weight.zero_()
        m.aux_head.bias.zero_()                                            # predicts 0 for every view
    assert float(m.shared_step(batch)[1]["aux_mse"]) == pytest.approx(0.5)   # half the views miss by 1
    del batch["t2"]
    assert float(m.shared_step(batch)[1]["aux_mse"]) == 0.0


def test_training_with_crop_targets_end_to_end(rhythm_cache, tmp_path):
    summary = train(_cfg(tmp_path, rhythm_cache.path, "method.aux_targets=handcrafted_crop"))
    assert summary["steps"] == 2
    feats = tmp_path / "cache_root" / "features"
    assert len(list(feats.glob("croppretext-*.npz"))) == 1 and len(list(feats.glob("rp-*.npz"))) == 1
    cfg = _cfg(tmp_path, rhythm_cache.path)
    assert crop_targets_for(cfg, [str(rhythm_cache.path)]) is None         # record-level recipe: none


def test_a_record_with_nonfinite_samples_is_named_or_unknown(tmp_path):
    from ecgfm.data.cache import NonFiniteDataError
    from tests.unit.test_features import _poison

    prepare_corpus(BeatSource(), tmp_path / "c", PreprocessSpec(fs=FS), workers=0, progress=False)
    _poison(CorpusCache(tmp_path / "c"), 2)
    cache = CorpusCache(tmp_path / "c")
    with pytest.raises(NonFiniteDataError, match="beats/b2"):
        H.record_rpeaks(cache)
    offsets, _, known, skipped = H.cached_rpeaks(cache, tmp_path / "f", nonfinite="skip")
    assert known.tolist() == [True, True, False, True, True, True, True] and offsets[3] == offsets[2]
    assert np.flatnonzero(skipped).tolist() == [2]
    with pytest.raises(NonFiniteDataError, match="beats/b2"):     # a file written with "skip" does not hide it
        H.cached_rpeaks(cache, tmp_path / "f")
    record = np.zeros((7, len(NAMES)), np.float32)
    path = H.crop_pretext_file([cache], tmp_path / "f", nonfinite="skip")
    t = record[[2]].copy()
    H.CropRhythmTargets(path).fill(t, np.array([2]), np.array([0]), np.array([1000]))
    assert not np.isfinite(t[0, H.CropRhythmTargets(path).columns]).any()      # unknown, not "no beats"
