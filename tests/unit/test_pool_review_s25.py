"""Review s25: a pretraining pool of caches holding the same records, and CinC 2017 records without a reference row.

1. CachePool refused one cache folder listed twice, but not two folders holding the same records (the same corpus
   prepared with another shard_records, a copied cache, a corpus pooled with a cache that contains it): every such
   record got two flat indices, and for records without patient id the per-cache hold-out validated on records that
   training saw from the other copy. Distinct records under the same keys (two exports of one source, ids
   restarting at 1) stay poolable.
2. CinC 2017 records with no row in REFERENCE.csv loaded unlabelled without a word (the opposite case warned).
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import scipy.io

from ecgfm.data.cache import prepare_corpus
from ecgfm.data.datamodules import CachePool, PretrainDataModule
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.readers import CinC2017Source
from ecgfm.data.readers.folder import FolderSource
from ecgfm.data.synthetic import write_wfdb

SPEC = PreprocessSpec(fs=100.0)


def _prepare(sources, out, shard_records=None, **kw) -> str:
    prepare_corpus(sources, out, SPEC, workers=0, progress=False, shard_records=shard_records, **kw)
    return str(out)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two WFDB folders of 12 records each, without patient ids, under the same ids (syn000000 ...) and source name
    ("folder") but with different signals (seeds 1 and 2): two exports of one site."""
    root = tmp_path_factory.mktemp("s25pool")
    for part, seed in (("x1", 1), ("x2", 2)):
        write_wfdb(root / part, 12, seed=seed, fs=100.0, duration=5.0)
    return root


def test_pool_refuses_the_same_corpus_prepared_twice(exports, tmp_path):
    """The reviewer's case: one corpus prepared with shard_records 5 and 7; before, 24 flat indices over 12 records
    and validation records that training also saw."""
    a = _prepare([FolderSource(exports / "x1")], tmp_path / "a", shard_records=5)
    b = _prepare([FolderSource(exports / "x1")], tmp_path / "b", shard_records=7)
    dm = PretrainDataModule([a, b], crop_samples=250, val_fraction=0.3, batch_size=4)
    with pytest.raises(ValueError, match=r"hold the same records: 12 of its 12 records") as err:
        dm.setup()
    msg = str(err.value)
    assert a in msg and b in msg and "folder/syn000000" in msg and "entries 0 and 1" in msg
    with pytest.raises(ValueError, match="hold the same records"):
        CachePool([a, b])


def test_pool_refuses_a_copied_cache_but_keeps_distinct_records_under_the_same_keys(exports, tmp_path):
    a = _prepare([FolderSource(exports / "x1")], tmp_path / "a")
    shutil.copytree(a, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"hold the same records: 12 of its 12 records"):
        CachePool([a, str(tmp_path / "copy")])
    # two exports: the same keys, other signals; accepted, and validation shares no record (signal) with training
    b = _prepare([FolderSource(exports / "x2")], tmp_path / "b")
    dm = PretrainDataModule([a, b], crop_samples=250, val_fraction=0.3, batch_size=4)
    dm.setup()
    assert len(dm.pool) == 24 and len(dm.val_indices) + sum(map(len, dm.train_pools)) == 24
    assert not set(dm.val_indices.tolist()) & set(np.concatenate(dm.train_pools).tolist())


def test_pool_refuses_a_corpus_with_a_cache_that_contains_it(exports, tmp_path):
    """cache/ptbxl pooled with a ptbxl+cinc2017 cache: the first cache's records are all in the second."""
    one = _prepare([FolderSource(exports / "x1")], tmp_path / "one")
    other = _prepare([FolderSource(exports / "x2", name="other")], tmp_path / "other")
    both = _prepare([FolderSource(exports / "x1"), FolderSource(exports / "x2", name="other")], tmp_path / "both",
                    allow_duplicate_ids=True)                    # the same ids under two source names: 24 records
    # caches of different sources are not read for the check (their keys cannot meet)
    pool = CachePool([one, other])
    assert len(pool) == 24 and all(c._index is None for c in pool.caches)
    with pytest.raises(ValueError, match=r"hold the same records: 12 of its 24 records") as err:
        CachePool([one, other, both])
    assert "entries 0 and 2" in str(err.value) and "folder/syn000000" in str(err.value)
    with pytest.raises(ValueError, match=r"entries 0 and 1\) hold the same records: 12 of its 24 records") as err:
        PretrainDataModule([other, both], crop_samples=250).setup()
    assert "other/syn000000" in str(err.value) and "prepare.py folder.name=" in str(err.value)


def test_pool_refuses_one_folder_read_twice_even_when_the_signals_differ(exports, tmp_path):
    """The same source folder behind one source name in two caches is the same corpus, also when the stored
    signals differ (PTB-XL's 100 Hz and 500 Hz files are read from one root: the same recordings); here the
    folder's files change between the two preparations. Distinct records sharing ids need another source name."""
    folder = tmp_path / "site"
    shutil.copytree(exports / "x1", folder)
    a = _prepare([FolderSource(folder)], tmp_path / "a")
    shutil.rmtree(folder)
    write_wfdb(folder, 10, seed=3, fs=100.0, duration=5.0)
    b = _prepare([FolderSource(folder)], tmp_path / "b")
    with pytest.raises(ValueError, match=r"hold the same records: 10 of its 10 records") as err:
        PretrainDataModule([a, b], crop_samples=250).setup()
    assert "same source folder" in str(err.value) and "prepare.py folder.name=" in str(err.value)
    renamed = _prepare([FolderSource(folder, name="site_2020")], tmp_path / "renamed")
    assert len(CachePool([a, renamed])) == 22


# ------------------------------------------------------------------------------------------------ CinC 2017


def _write_challenge_1lead(folder, name, val):
    scipy.io.savemat(folder / f"{name}.mat", {"val": val.astype(np.int16)[None, :]}, format="4")
    (folder / f"{name}.hea").write_text(
        f"{name} 1 300 {val.size} 11:05:25 1/05/2000 \n{name}.mat 16+24 1000/mV 16 0 0 0 0 ECG \n")


def test_cinc2017_records_without_a_reference_row_are_warned_once(tmp_path, caplog):
    rng = np.random.default_rng(0)
    ids = [f"A{i:05d}" for i in range(1, 10)]
    for rid in ids:
        _write_challenge_1lead(tmp_path, rid, rng.integers(-900, 900, 900))
    (tmp_path / "REFERENCE.csv").write_text("A00001,N\nA00002,A\n")          # a truncated file: 7 rows missing
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers.physionet"):
        src = CinC2017Source(tmp_path)
        labels = {r: src.load(r).labels for r in src.record_ids()}
    assert labels["A00002"] == ("A",) and labels["A00009"] == ()
    hits = [r.getMessage() for r in caplog.records if "no row in REFERENCE.csv" in r.getMessage()]
    assert len(hits) == 1, hits
    assert "7 record(s)" in hits[0] and "A00003, A00004, A00005, A00006, A00007 ..." in hits[0]
    assert "A00008" not in hits[0]
    caplog.clear()
    (tmp_path / "REFERENCE.csv").write_text("".join(f"{r},N\n" for r in ids))   # complete: nothing to say
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers.physionet"):
        CinC2017Source(tmp_path)
    assert not [r for r in caplog.records if "REFERENCE" in r.getMessage()]
