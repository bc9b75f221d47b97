"""Regressions a self-review of 2026-12-06's changes found, each pinned:

* the open-shard-map bound (4,096) exceeded the open-file limit (each map holds a descriptor): EMFILE;
* a rerun that only relabels rewrote ``records.npy`` byte for byte under a new inode, and open readers (their
  pickled DataLoader copies) refused it as changed;
* a record skipped for a missing file was 'transient' (ENOENT is an OSError), so every ``verify=True`` converted
  its shard again;
* BatchNorm recalibration of never-estimated layers also moved the estimated (pretrained) layers' statistics;
* ``finetune.lp_features`` at its default entered every fine-tune cell's identity (needless recomputation).
"""

from __future__ import annotations

import errno
import pickle
import resource

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.data import cache as C
from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SyntheticSource

from test_cache_review_s16 import FileSource, _make   # noqa: E402  (the review's small file-backed source)


def test_default_shard_map_bound_follows_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1024, 4096))
    assert C.default_max_open_shards() == 256
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1 << 20, 1 << 20))
    assert C.default_max_open_shards() == C.MAX_OPEN_SHARDS
    monkeypatch.setattr(resource, "getrlimit", lambda what: (20, 20))
    assert C.default_max_open_shards() == 16


def test_running_out_of_descriptors_closes_older_maps_and_retries(tmp_path, monkeypatch):
    out = tmp_path / "c"
    prepare_corpus(SyntheticSource(6, seed=0, fs=100.0, duration=2.5), out, PreprocessSpec(), shard_records=1,
                   workers=0, progress=False)
    cache = CorpusCache(out, max_open_shards=100)
    real = CorpusCache._open_map
    calls = {"n": 0}

    def flaky(self, rel):
        calls["n"] += 1
        if len(self._maps) >= 4 and calls["n"] % 2:   # the limit: a fifth map fails once
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, rel)

    monkeypatch.setattr(CorpusCache, "_open_map", flaky)
    expected = [CorpusCache(out).signal(i) for i in range(6)]
    got = [cache.signal(i) for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got)) and len(cache._maps) <= 4

    def always(self, rel):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(CorpusCache, "_open_map", always)
    fresh = CorpusCache(out, max_open_shards=100)
    fresh._maps[99] = np.zeros(1, np.float32)                    # one map open: evicted, then the retry fails
    with pytest.raises(C.ECGDataError, match="max_open_shards"):
        fresh.signal(0)


def test_a_labels_only_rerun_leaves_open_readers_working(tmp_path):
    root, out = _make(tmp_path / "src", 8), tmp_path / "c"

    def prep():
        return prepare_corpus(FileSource(root), out, PreprocessSpec(fs=100.0), shard_records=4, workers=0,
                              progress=False)

    prep()
    reader = CorpusCache(out)
    x0 = reader.signal(5).copy()
    (root / "labels.csv").write_text("".join(f"r{i:03d},c{(i + 1) % 2}\n" for i in range(8)))   # labels only
    assert prep().n_relabelled == 8
    worker = pickle.loads(pickle.dumps(reader))          # a DataLoader worker of the next epoch
    assert np.array_equal(worker.signal(5), x0)
    with pytest.raises(C.ECGDataError, match="changed since this reader opened"):
        worker.index                                     # the labels did change: the index is refused


def test_a_missing_file_is_not_a_transient_skip():
    assert not C._os_error_in(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert C._os_error_in(PermissionError(errno.EACCES, "Permission denied"))
    assert not C._transient_skip({"reason": "unreadable: [Errno 2] No such file or directory: 'x'"})
    assert C._transient_skip({"reason": "unreadable: [Errno 13] Permission denied: 'x'"})


def test_recalibration_leaves_estimated_layers_alone():
    from ecgfm.evaluate.finetune import recalibrate_batchnorm

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x, lead_mask=None):
            return self.b(self.a(x))

    model = Two()
    model.a.running_mean.fill_(0.5)
    model.a.running_var.fill_(2.0)
    model.a.num_batches_tracked.fill_(1000)                # estimated ("pretrained")
    loader = [{"x": torch.randn(8, 3, 5) * 3 + 2, "lead_mask": torch.ones(8, 12, dtype=torch.bool)}] * 3
    assert recalibrate_batchnorm(model, loader) == 1
    assert torch.all(model.a.running_mean == 0.5) and torch.all(model.a.running_var == 2.0)
    assert int(model.a.num_batches_tracked) == 1000 and int(model.b.num_batches_tracked) == 3


def test_lp_features_joins_the_identity_only_when_it_changes_something():
    from ecgfm.evaluate.sweep import _head_identity

    base = {"head_init": "lp", "lr": 3e-4, "num_workers": 2, "min_epoch_samples": 0}
    assert _head_identity({**base, "lp_features": "records"}) == {"head_init": "lp", "lr": 3e-4}
    assert _head_identity({**base, "lp_features": "windows"})["lp_features"] == "windows"
    assert "lp_features" not in _head_identity({**base, "head_init": "random", "lp_features": "windows"})
