"""DataModules: batch contract, mixture weights, adjacent views, determinism, DDP slicing, workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.datamodules import (
    DownstreamDataModule,
    EpochShuffleSampler,
    MixtureSampler,
    PretrainDataModule,
    patient_holdout,
)
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGRecord
from ecgfm.data.splits import patient_stratified_split
from ecgfm.data.synthetic import SyntheticSource

SPEC = PreprocessSpec(fs=100)


class ShortSource:
    """Records of 0.8-1.6 s (shorter than two crops) with 1 or 12 leads and known patients."""

    name = "short"

    def __init__(self, n=6):
        self.n = n

    def record_ids(self):
        return [f"s{i}" for i in range(self.n)]

    def load(self, rid):
        i = int(rid[1:])
        t = 80 + 20 * i
        sig = np.tile(np.sin(np.arange(t) / 3.0, dtype=np.float32), (12, 1)) * np.arange(1, 13)[:, None]
        mask = np.ones(12, bool) if i % 2 else np.eye(12, dtype=bool)[1]
        sig = (sig * mask[:, None]).astype(np.float32)
        return ECGRecord(signal=sig, fs=100.0, lead_mask=mask, record_id=rid, source="short",
                         patient_id=f"q{i // 2}", labels=("AF" if i % 3 == 0 else "N",))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    prepare_corpus(SyntheticSource(40, seed=0, fs=100.0, duration=6.0), root / "a", SPEC, workers=0,
                   progress=False)
    prepare_corpus(ShortSource(6), root / "b", SPEC, workers=0, progress=False)
    return str(root / "a"), str(root / "b")


def _find_start(full, window):
    for s in range(full.shape[1] - window.shape[1] + 1):
        if np.array_equal(full[:, s:s + window.shape[1]], window):
            return s
    return None


def test_pretrain_batch_contract_and_adjacent_views(caches):
    dm = PretrainDataModule(caches[0], crop_samples=100, views="adjacent", batch_size=8, val_fraction=0.1, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "x2", "lead_mask", "patient", "index", "recorded"}
    assert batch["x"].shape == batch["x2"].shape == (8, 12, 100) and batch["x"].dtype == torch.float32
    assert batch["lead_mask"].shape == (8, 12) and batch["lead_mask"].dtype == torch.bool
    assert batch["patient"].dtype == batch["index"].dtype == torch.int64 and (batch["patient"] >= 0).all()
    cache = CorpusCache(caches[0])
    for b in range(8):
        full = cache.signal(int(batch["index"][b]))
        s = _find_start(full, batch["x"][b].numpy())
        assert s is not None, "x is not a crop of its record"
        np.testing.assert_array_equal(batch["x2"][b].numpy(), full[:, s + 100:s + 200])   # the next 100 samples
        assert cache.records["patient"][int(batch["index"][b])] == batch["patient"][b]
    # validation holds out whole patients, fixed (centred) crops
    val = list(dm.val_dataloader())
    val_idx = torch.cat([v["index"] for v in val]).numpy()
    assert len(val_idx) >= 4 and not set(val_idx) & set(np.concatenate(dm.train_pools).tolist())
    assert not set(cache.patients[val_idx]) & set(cache.patients[np.concatenate(dm.train_pools)])
    again = list(dm.val_dataloader())
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(val, again))


def test_segment_views_are_two_independent_crops_of_one_record(caches):
    """views="segments": x2 is another crop of x's record at its own offset (not tied to x's), reproducible;
    records no longer than a crop give the same segment twice; validation (centred) repeats x."""
    dm = PretrainDataModule(caches[0], crop_samples=100, views="segments", batch_size=16, val_fraction=0.1, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "x2", "lead_mask", "patient", "index", "recorded"}
    cache = CorpusCache(caches[0])
    gaps = []
    for b in range(16):
        full = cache.signal(int(batch["index"][b]))
        s1, s2 = _find_start(full, batch["x"][b].numpy()), _find_start(full, batch["x2"][b].numpy())
        assert s1 is not None and s2 is not None, "x / x2 are not crops of their record"
        gaps.append(s2 - s1)
    assert len(set(gaps)) > 8 and min(gaps) < 0 < max(gaps)       # placed independently, either side of x
    again = next(iter(PretrainDataModule(caches[0], crop_samples=100, views="segments", batch_size=16,
                                         val_fraction=0.1, seed=0).train_dataloader()))
    assert torch.equal(batch["x2"], again["x2"])                     # a pure function of the sampler's draws
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["x"], val["x2"])
    short = PretrainDataModule(caches[1], crop_samples=200, views="segments", batch_size=6, val_fraction=0.0,
                               drop_last=False)
    sb = next(iter(short.train_dataloader()))
    assert torch.equal(sb["x"], sb["x2"])                            # shorter than a crop: one zero-padded segment


def test_short_records_are_zero_padded(caches):
    dm = PretrainDataModule(caches[1], crop_samples=100, views="adjacent", batch_size=6, val_fraction=0.0,
                            drop_last=False)
    batch = next(iter(dm.train_dataloader()))
    cache = CorpusCache(caches[1])
    for b in range(len(batch["index"])):
        i = int(batch["index"][b])
        full, t = cache.signal(i), int(cache.n_samples[i])
        both = np.concatenate([batch["x"][b].numpy(), batch["x2"][b].numpy()], axis=1)
        np.testing.assert_array_equal(both[:, :t], full)        # starts at 0, then zeros
        assert not both[:, t:].any()
        assert batch["lead_mask"][b].sum() in (1, 12)
        assert not batch["x"][b][~batch["lead_mask"][b]].any()   # absent leads stay zero


def test_mixture_weights_and_determinism():
    s = MixtureSampler([30, 10], weights=[0.8, 0.2], num_samples=4000, seed=1)
    pos, u = s.global_order()
    frac0 = (pos < 30).mean()
    assert abs(frac0 - 0.8) < 0.03 and pos.max() < 40 and ((u >= 0) & (u < 1)).all()
    assert set(pos[pos >= 30].tolist()) == set(range(30, 40))     # every record of the small pool drawn
    assert list(s) == list(MixtureSampler([30, 10], [0.8, 0.2], 4000, seed=1))   # pure function of seed
    s.set_epoch(1)
    assert list(s) != list(MixtureSampler([30, 10], [0.8, 0.2], 4000, seed=1))   # ... and epoch
    default = MixtureSampler([30, 10], None, 4000, seed=2).global_order()[0]
    assert abs((default < 30).mean() - 0.75) < 0.03                # default: proportional to size
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler([3, 4], weights=[1.0])


def test_ddp_slices_are_disjoint_and_cover_the_epoch():
    whole = list(MixtureSampler([7, 5], [0.5, 0.5], num_samples=101, seed=3, rank=0, world_size=1))
    r0 = list(MixtureSampler([7, 5], [0.5, 0.5], num_samples=101, seed=3, rank=0, world_size=2))
    r1 = list(MixtureSampler([7, 5], [0.5, 0.5], num_samples=101, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1) == 51
    # the 101 draws do not depend on the world size; the last slot is padded by wrapping around
    padded = whole + whole[:1]
    assert r0 == padded[0::2] and r1 == padded[1::2]
    # the draws themselves, computed from the sampler's contract: rng([seed, epoch]) picks a pool per draw with
    # the weights, then a record of it uniformly, then the crop fraction u (not from another sampler: that would
    # hold for any implementation)
    rng = np.random.default_rng([3, 0])
    pool = rng.choice(2, size=101, p=[0.5, 0.5])
    pos = np.array([0, 7])[pool] + np.floor(rng.random(101) * np.array([7, 5])[pool]).astype(np.int64)
    assert whole == list(zip(pos.tolist(), rng.random(101).tolist()))
    e0 = [k for k, _ in EpochShuffleSampler(10, seed=5, rank=0, world_size=2)]
    e1 = [k for k, _ in EpochShuffleSampler(10, seed=5, rank=1, world_size=2)]
    assert not set(e0) & set(e1) and sorted(e0 + e1) == list(range(10))
    with pytest.raises(ValueError, match="rank"):
        EpochShuffleSampler(10, rank=2, world_size=2)


def test_two_caches_mixture_through_datamodule(caches):
    dm = PretrainDataModule(list(caches), weights=[0.5, 0.5], crop_samples=50, batch_size=16, val_fraction=0.0,
                            samples_per_epoch=320, seed=4)
    idx = torch.cat([b["index"] for b in dm.train_dataloader()]).numpy()
    assert len(idx) == 320 and 0.35 < (idx >= 40).mean() < 0.65 and idx.max() < 46
    dm2 = PretrainDataModule(list(caches), weights=[0.5, 0.5], crop_samples=50, batch_size=16, val_fraction=0.0,
                             samples_per_epoch=320, seed=4, rank=1, world_size=2)
    assert len(dm2.train_dataloader()) == 10                    # 160 per rank


def test_probe_labels_and_workers_match_in_process(caches):
    kw = dict(crop_samples=50, batch_size=8, val_fraction=0.1, seed=7, samples_per_epoch=48)
    classes = CorpusCache(caches[0]).label_space()
    dm0 = PretrainDataModule(caches[0], probe_labels=classes, **kw)
    dm2 = PretrainDataModule(caches[0], probe_labels=classes, num_workers=2, **kw)
    b0, b2 = list(dm0.train_dataloader()), list(dm2.train_dataloader())
    assert len(b0) == len(b2) == 6
    for a, b in zip(b0, b2):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b0[0]["y"].shape == (8, len(classes)) and b0[0]["y"].dtype == torch.float32
    assert (b0[0]["y"].sum(1) == 1).all()                       # one synthetic class per record
    v = next(iter(dm2.val_dataloader()))
    assert "y" in v
    ds = dm0.train_dataset()
    assert len(pickle.dumps(ds)) < 20_000                      # no signal data travels to workers


def test_lightning_fit_sets_epochs(caches):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12 * 50, 1)
            self.seen = []

        def training_step(self, batch, _):
            self.seen.append(batch["index"].clone())
            return self.lin(batch["x"].flatten(1)).pow(2).mean()

        def validation_step(self, batch, _):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = PretrainDataModule(caches[0], crop_samples=50, batch_size=8, samples_per_epoch=16, val_fraction=0.1)
    model = Tiny()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 4
    sampler = dm.train_sampler()
    expect = [sampler.global_order(e)[0] for e in (0, 1)]
    got = [torch.cat(model.seen[:2]).numpy(), torch.cat(model.seen[2:]).numpy()]
    flat_train = np.concatenate(dm.train_pools)
    for e in (0, 1):
        np.testing.assert_array_equal(got[e], flat_train[expect[e]])   # epoch e used the (seed, e) order


def test_downstream_datamodule(caches):
    cache = CorpusCache(caches[0])
    classes = cache.label_space()
    y = cache.labels_matrix(classes)
    splits = patient_stratified_split(cache.index["patient_id"].tolist(), y, seed=0)
    dm = DownstreamDataModule(caches[0], y, splits, crop_samples=250, batch_size=4, test_stride=125)
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"x", "y", "lead_mask", "index", "recorded"} and b["x"].shape == (4, 12, 250)
    assert b["y"].shape == (4, len(classes)) and b["y"].dtype == torch.float32
    assert set(b["index"].tolist()) <= set(splits["train"].tolist())
    test = list(dm.test_dataloader())
    idx = torch.cat([t["index"] for t in test])
    # 600-sample records, 250-sample windows every 125 -> starts 0,125,250,350: 4 windows per record
    assert sorted(set(idx.tolist())) == splits["test"].tolist()
    assert (torch.bincount(idx)[splits["test"]] == 4).all()
    np.testing.assert_array_equal(test[0]["x"][1].numpy(), cache.window(int(idx[1]), 125, 250))
    single = DownstreamDataModule(caches[0], y.argmax(1), splits, crop_samples=250, batch_size=4, multilabel=False)
    v = next(iter(single.val_dataloader()))
    assert v["y"].dtype == torch.int64 and v["y"].shape == (min(4, len(splits["val"])),)
    with pytest.raises(ValueError, match="rows"):
        DownstreamDataModule(caches[0], y[:3], splits)
    with pytest.raises(ValueError, match="outside"):
        DownstreamDataModule(caches[0], y, {"train": [0], "val": [1], "test": [999]})


def test_patient_holdout():
    pats = np.array([5, 5, 5, 7, 7, -1, -1, 9, 9, 9])
    keep, held = patient_holdout(pats, 0.3, seed=0)
    assert sorted(keep.tolist() + held.tolist()) == list(range(10)) and len(held) >= 1
    assert not set(pats[keep][pats[keep] >= 0]) & set(pats[held][pats[held] >= 0])
    assert len(patient_holdout(pats, 0.0)[1]) == 0


def test_mixed_rates_refused(tmp_path, caches):
    prepare_corpus(ShortSource(2), tmp_path, PreprocessSpec(fs=50), workers=0, progress=False)
    dm = PretrainDataModule([caches[0], str(tmp_path)])
    with pytest.raises(ValueError, match="sampling rate"):
        dm.setup()


def test_mixed_specs_refused(tmp_path, caches):
    prepare_corpus(ShortSource(2), tmp_path, PreprocessSpec(fs=100, normalize="robust"), workers=0, progress=False)
    with pytest.raises(ValueError, match="preprocessing spec"):
        PretrainDataModule([caches[0], str(tmp_path)]).setup()


def test_samplers_read_torch_distributed(tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s = MixtureSampler([5, 5], num_samples=9, seed=0)
        assert (s.rank, s.num_replicas, len(s)) == (0, 1, 9)
        s2 = MixtureSampler([5, 5], num_samples=9, seed=0, rank=1, world_size=2)   # explicit values win
        assert (s2.rank, s2.num_replicas, len(s2)) == (1, 2, 5)
    finally:
        dist.destroy_process_group()


def test_batched_crops_equal_per_record_windows(caches):
    """The batched reader (CropDataset / WindowDataset over a two-cache pool) gives exactly the crops of the slow
    reference: one ``CorpusCache.window`` call per item, start = floor(u * (free + 1)) or centred."""
    from ecgfm.data.datamodules import CachePool, CropDataset, WindowDataset

    pool = CachePool(list(caches))
    crop = 150
    rng = np.random.default_rng(3)
    keys = [(int(k), float(u)) for k, u in zip(rng.integers(0, len(pool), 40), rng.random(40))] + [0, 41, 45]
    for views in ("single", "adjacent", "segments"):
        ds = CropDataset(pool, np.arange(len(pool)), crop, views)
        batch = ds.__getitems__(keys)
        for b, key in enumerate(keys):
            k, u = key if isinstance(key, tuple) else (key, None)
            cache, i = pool.locate(k)
            need = crop * (2 if views == "adjacent" else 1)
            free = max(int(cache.n_samples[i]) - need, 0)
            start = free // 2 if u is None else min(int(u * (free + 1)), free)
            np.testing.assert_array_equal(batch["x"][b].numpy(), cache.window(i, start, crop))
            if views == "adjacent":
                np.testing.assert_array_equal(batch["x2"][b].numpy(), cache.window(i, start + crop, crop))
            if views == "segments":   # second draw: the fractional part of u * 7919; centred crops repeat x
                start2 = start if u is None else min(int(((u * 7919.0) % 1.0) * (free + 1)), free)
                np.testing.assert_array_equal(batch["x2"][b].numpy(), cache.window(i, start2, crop))
            assert torch.equal(batch["lead_mask"][b], torch.from_numpy(cache.lead_mask(i)))
            assert int(batch["patient"][b]) == int(cache.patients[i]) and int(batch["index"][b]) == k
    wins = WindowDataset(pool, np.array([1, 40, 43]), crop, stride=70)
    got = wins.__getitems__(list(range(len(wins))))
    for b in range(len(wins)):
        cache, i = pool.locate(int(wins.flats[b]))
        np.testing.assert_array_equal(got["x"][b].numpy(), cache.window(i, int(wins.starts[b]), crop))


def test_batch_buffers_share_one_zeroed_storage():
    """One storage per batch (one shared-memory segment and one file descriptor per batch in a worker)."""
    from ecgfm.data.datamodules import batch_buffers

    bufs = batch_buffers({"x": ((3, 12, 5), torch.float32), "lead_mask": ((3, 12), torch.bool),
                          "index": ((3,), torch.int64), "y": ((3, 2), torch.float32)})
    assert list(bufs) == ["x", "lead_mask", "index", "y"]
    ptrs = {t.untyped_storage().data_ptr() for t in bufs.values()}
    assert len(ptrs) == 1
    for name, (shape, dtype) in {"x": ((3, 12, 5), torch.float32), "lead_mask": ((3, 12), torch.bool),
                                 "index": ((3,), torch.int64), "y": ((3, 2), torch.float32)}.items():
        t = bufs[name]
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and not t.any()
        assert t.data_ptr() % t.element_size() == 0
    bufs["index"][:] = -1                            # views do not overlap
    assert not bufs["x"].any() and not bufs["lead_mask"].any() and not bufs["y"].any()


def test_pretraining_holdout_keeps_a_patient_of_two_caches_on_one_side(tmp_path):
    """Two caches of one hospital share patients: each cache held out its own patients (seed + k), so a patient
    validated in one cache was trained on in the other (4 of 5 validation patients). A patient held out anywhere is
    now held out everywhere; caches of distinct patients keep their own hold-outs."""
    import csv

    from ecgfm.data.datamodules import PretrainDataModule, patient_holdout
    from ecgfm.data.readers.folder import FolderSource
    from ecgfm.data.synthetic import write_wfdb

    dirs = []
    for part, seed in (("2019", 1), ("2020", 2)):
        d = tmp_path / part
        write_wfdb(d, 20, seed=seed, fs=100.0, duration=5.0)
        rows = list(csv.reader(open(d / "labels.csv")))
        col = rows[0].index("patient_id")
        for i, r in enumerate(rows[1:]):
            r[col] = f"pat{i % 10}"                    # 10 patients, 2 records each, in both exports
        with open(d / "labels.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        src = FolderSource(d, labels_csv="labels.csv", label_columns=["label"], name="hospital")
        prepare_corpus(src, tmp_path / f"cache{part}", PreprocessSpec(fs=100.0), workers=0, progress=False)
        dirs.append(str(tmp_path / f"cache{part}"))
    dm = PretrainDataModule(dirs, crop_samples=250, val_fraction=0.3, seed=0)
    dm.setup()
    pat = np.concatenate([c.patients for c in dm.pool.caches])
    train, val = set(pat[np.concatenate(dm.train_pools)].tolist()), set(pat[dm.val_indices].tolist())
    assert val and train and not (train & val)
    assert len(dm.val_indices) + sum(map(len, dm.train_pools)) == 40
    # one cache alone: exactly patient_holdout's split, as before
    one = PretrainDataModule(dirs[:1], crop_samples=250, val_fraction=0.3, seed=0)
    one.setup()
    keep, held = patient_holdout(one.pool.caches[0].patients, 0.3, 0)
    np.testing.assert_array_equal(one.val_indices, held)
    np.testing.assert_array_equal(one.train_pools[0], keep)


def test_mixture_order_does_not_depend_on_the_world_size():
    """A run resumed mid-epoch on another number of processes continues the same epoch order (the draws used to
    be total_size = ceil(n / world) * world long, which shifted every later draw of the generator)."""
    one = MixtureSampler([600, 425], None, seed=0, world_size=1, rank=0).global_order(3)
    for world in (2, 3, 8):
        pos, u = MixtureSampler([600, 425], None, seed=0, world_size=world, rank=0).global_order(3)
        assert len(pos) % world == 0
        np.testing.assert_array_equal(pos[:1025], one[0])
        np.testing.assert_array_equal(u[:1025], one[1])


def test_mixture_single_process_order_unchanged():
    """One process draws exactly what it drew before (pool, then record, then offset; numpy generator)."""
    s = MixtureSampler([7, 5], [0.5, 0.5], num_samples=50, seed=3, rank=0, world_size=1)
    rng = np.random.default_rng([3, 0])
    pool = rng.choice(2, size=50, p=[0.5, 0.5])
    within = np.floor(rng.random(50) * np.array([7, 5])[pool]).astype(np.int64)
    pos, u = s.global_order()
    np.testing.assert_array_equal(pos, np.array([0, 7])[pool] + within)
    np.testing.assert_array_equal(u, rng.random(50))


def test_epoch_shuffle_sampler_epoch_size_repeats_in_fresh_orders():
    n = 10
    plain = [k for k, _ in EpochShuffleSampler(n, seed=5)]
    long = [k for k, _ in EpochShuffleSampler(n, seed=5, epoch_size=25)]
    assert len(long) == 25 and long[:n] == plain                       # the first pass is the one-pass epoch
    assert sorted(long[n:2 * n]) == list(range(n)) and long[n:2 * n] != plain   # a second pass, in a new order
    assert set(long[2 * n:]) <= set(range(n)) and len(set(long[2 * n:])) == 5
    assert [k for k, _ in EpochShuffleSampler(n, seed=5, epoch_size=4)] == plain   # never fewer than one pass
    r = [[k for k, _ in EpochShuffleSampler(n, seed=5, rank=i, world_size=2, epoch_size=25)] for i in (0, 1)]
    assert len(r[0]) == len(r[1]) == 13


def test_downstream_epoch_samples_sets_the_batches_per_epoch(tmp_path):
    root = tmp_path / "syn"
    prepare_corpus(SyntheticSource(12, seed=0, fs=100.0, duration=4.0), root, PreprocessSpec(fs=100), workers=0,
                   progress=False)
    y = np.zeros(12, dtype=np.int64)
    y[::2] = 1
    splits = {"train": np.arange(6), "val": np.arange(6, 9), "test": np.arange(9, 12)}
    one = DownstreamDataModule(root, y, splits, crop_samples=100, batch_size=4, multilabel=False)
    more = DownstreamDataModule(root, y, splits, crop_samples=100, batch_size=4, multilabel=False, epoch_samples=20)
    assert len(one.train_dataloader()) == 2 and len(more.train_dataloader()) == 5
    idx = torch.cat([b["index"] for b in more.train_dataloader()]).numpy()
    assert len(idx) == 20 and set(idx.tolist()) == set(range(6))
    with pytest.raises(ValueError, match="epoch_samples"):
        DownstreamDataModule(root, y, splits, crop_samples=100, batch_size=4, multilabel=False, epoch_samples=0)
