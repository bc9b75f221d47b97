"""Data review (s18): second views that cannot exist, synthetic lead and patient ids, reproducible non-finite
skipping, overlapping downstream splits and short epochs, non-finite mixture weights, a cache listed twice."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.datamodules import (
    CachePool,
    CropDataset,
    DownstreamDataModule,
    MixtureSampler,
    PretrainDataModule,
)
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.data.synthetic import SyntheticSource, generate_record


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Six synthetic records of 3 s at 100 Hz (300 samples)."""
    out = tmp_path_factory.mktemp("s18") / "syn"
    prepare_corpus(SyntheticSource(6, seed=0, fs=100.0, duration=3.0), out, PreprocessSpec(fs=100), workers=0,
                   progress=False)
    return str(out)


def test_adjacent_views_that_are_all_padding_are_refused(cache):
    """views='adjacent' with a crop as long as every record: every x2 is zero padding (CLOCS trained on nothing,
    loss exactly 0; SimCLR contrasted all-zero views)."""
    with pytest.raises(ValueError, match=r"data.views='adjacent' with crop_samples=300 \(crop_seconds=3 .*zero "
                                         r"padding for every record"):
        PretrainDataModule(cache, crop_samples=300, views="adjacent", val_fraction=0.0).setup()


def test_degenerate_second_views_are_warned_with_their_share(cache):
    """segments with a crop as long as every record repeat x in every pair: a warning names the share; records
    longer than the crop give no warning."""
    with pytest.warns(UserWarning, match=r"data.views='segments'.*same crop as x for 100.0% of the training draws"):
        PretrainDataModule(cache, crop_samples=300, views="segments", val_fraction=0.0).setup()
    with warnings.catch_warnings():   # every record holds the adjacent pair (2 x 150): a second view, silent
        warnings.simplefilter("error")
        dm = PretrainDataModule(cache, crop_samples=150, views="adjacent", val_fraction=0.0, batch_size=6)
        assert next(iter(dm.train_dataloader()))["x2"].flatten(1).ne(0).any(1).all()


def test_synthetic_leads_given_as_a_string_is_one_lead_and_duplicates_are_refused():
    src = SyntheticSource(3, seed=0, fs=50.0, duration=2.5, leads="II")
    mask = src.load(src.record_ids()[0]).lead_mask
    assert [CANONICAL_LEADS[i] for i in np.flatnonzero(mask)] == ["II"] and src.leads == ["II"]
    with pytest.raises(ValueError, match="twice"):
        SyntheticSource(3, leads=["II", "V1", "II"])


def _poison_tail(folder, record, n):
    """NaN in the last ``n`` samples of ``record`` (every lead), with the shard checksum updated."""
    c = CorpusCache(folder)
    cols = c.columns()
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][int(cols["shard"][record])]
    mm = np.memmap(folder / entry["bin"], dtype=np.float32, mode="r+")
    start, nl, t = int(cols["offset"][record]) // 4, int(cols["n_leads"][record]), int(cols["n_samples"][record])
    mm[start:start + nl * t].reshape(nl, t)[:, t - n:] = np.nan
    mm.flush()
    del mm
    entry["bin_sha256"] = hashlib.sha256((folder / entry["bin"]).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_nonfinite_skip_depends_on_the_record_not_on_what_the_process_read_before(cache, tmp_path):
    """A crop of a damaged record that misses its NaN samples is skipped (replaced) in a fresh process too, so a
    loader worker or a resumed run that has not seen the damaged crop builds the same batch."""
    folder = tmp_path / "nan"
    shutil.copytree(cache, folder)
    _poison_tail(folder, 0, 50)                                     # samples 250..299 of record 0

    def crops(keys_seen_before):
        ds = CropDataset(CachePool([folder]), np.arange(6), 100, nonfinite="skip")
        for keys in keys_seen_before:
            ds.__getitems__(keys)
        return ds.__getitems__([(0, 0.0), (2, 0.5)])                 # record 0's crop [0, 100): finite samples

    fresh, after = crops([]), crops([[(0, 0.999)]])                 # ... after its damaged crop [200, 300)
    assert torch.equal(fresh["index"], after["index"]) and torch.equal(fresh["x"], after["x"])
    assert fresh["index"].tolist() == [1, 2] and torch.isfinite(fresh["x"]).all()


def test_synthetic_patient_ids_name_the_seed():
    """Corpora of different seeds are different patients (morphology drawn from the seed): their ids, and so the
    caches' patient hashes, must differ; seed 0 keeps its ids."""
    a, b = generate_record(4, seed=0, fs=50.0, duration=2.5), generate_record(4, seed=1, fs=50.0, duration=2.5)
    assert a.patient_id == "synp000001" and b.patient_id == "synp000001-s1"
    assert SyntheticSource(6, seed=1, fs=50.0, duration=2.5).load("syn000004").patient_id == b.patient_id


def test_downstream_refuses_overlapping_splits(cache):
    y = np.eye(3, dtype=np.float32)[np.arange(6) % 3]
    with pytest.raises(ValueError, match=r"record 1 is in both 'train' and 'test'"):
        DownstreamDataModule(cache, y, {"train": [0, 1], "val": [2], "test": [1, 3]})


def test_downstream_refuses_epochs_shorter_than_one_pass(cache):
    """epoch_samples is documented as the training crops per epoch: below one pass it was silently ignored (the
    sampler's epoch_size is a minimum, tests/unit/test_datamodules.py; the fine-tune recipe's min_epoch_samples
    passes only larger values)."""
    y = np.eye(3, dtype=np.float32)[np.arange(6) % 3]
    with pytest.raises(ValueError, match=r"epoch_samples=2 is below one pass over the 3 training records"):
        DownstreamDataModule(cache, y, {"train": [0, 1, 2], "val": [3], "test": [4]}, epoch_samples=2)
    dm = DownstreamDataModule(cache, y, {"train": [0, 1, 2], "val": [3], "test": [4]}, crop_samples=100,
                              batch_size=2, epoch_samples=3)
    assert sum(len(b["index"]) for b in dm.train_dataloader()) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mixture_weights_must_be_finite(bad):
    with pytest.raises(ValueError, match=r"data\.weights.*finite"):
        MixtureSampler([10, 10], weights=[bad, 1.0], num_samples=8)


def test_a_cache_listed_twice_is_refused(cache):
    """Its records would get two flat indices each: a record drawn under both is a negative of itself."""
    with pytest.raises(ValueError, match=r"listed twice.*data\.weights"):
        PretrainDataModule([cache, cache + "/."], crop_samples=100, val_fraction=0.0).setup()
