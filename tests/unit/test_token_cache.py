"""Frozen tokens for the attention probe and windows longer than a ViT-1D's pretraining crop (issue 12)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.backbones import create_backbone
from ecgfm.data.cache import CorpusCache, NonFiniteDataError, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec, sliding_windows
from ecgfm.data.record import ECGRecord
from ecgfm.evaluate import features as F
from ecgfm.evaluate.features import (cached_features, cached_tokens, check_window, extract_features,
                                     extract_tokens, fit_window, window_tokens)


class _Src:
    """Five records of 3-6 s at 100 Hz; records 0, 2, 4 have lead I only, 1 and 3 all twelve leads."""

    name = "src"

    def record_ids(self):
        return [f"r{i}" for i in range(5)]

    def load(self, rid):
        i = int(rid[1:])
        t = np.arange(300 + 75 * i, dtype=np.float32)
        sig = np.cos(t[None] / (3 + i) + np.arange(12)[:, None]).astype(np.float32)
        mask = np.ones(12, bool) if i % 2 else np.eye(12, dtype=bool)[0]
        return ECGRecord(signal=sig * mask[:, None], fs=100.0, lead_mask=mask, record_id=rid, source="src",
                         labels=("a",))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    prepare_corpus(_Src(), root / "c", PreprocessSpec(fs=100), workers=0, progress=False)
    return CorpusCache(root / "c")


def _vit(seq_len=100):
    torch.manual_seed(0)
    return create_backbone("vit1d_test", seq_len=seq_len, patch_size=25).eval()


def test_long_window_vit_keeps_weights_and_short_window_embeddings():
    vit = _vit(100)
    assert fit_window(vit, 100) is vit and fit_window(vit, 50) is vit
    rng_before = torch.get_rng_state()
    longer = fit_window(vit, 300)
    assert torch.equal(torch.get_rng_state(), rng_before)                    # the global RNG is untouched
    assert longer is not vit and longer.seq_len == 300 and vit.seq_len == 100 and not longer.training
    assert longer.init_args["seq_len"] == 300 and F.encoder_fingerprint(vit) != F.encoder_fingerprint(longer)
    for k, v in vit.state_dict().items():
        assert torch.equal(longer.state_dict()[k], v)
    x = torch.randn(3, 12, 100)
    with torch.no_grad():
        torch.testing.assert_close(longer.embed(x), vit.embed(x), rtol=0, atol=0)    # within seq_len: the same
        long_x = torch.randn(2, 12, 300)
        fresh = create_backbone("vit1d_test", seq_len=300, patch_size=25).eval()
        fresh.load_state_dict(vit.state_dict())
        torch.testing.assert_close(longer.embed(long_x), fresh.embed(long_x))
    with pytest.raises(ValueError, match="vit1d_test: a window of 310 samples is not a multiple of its patch_size=25"):
        fit_window(vit, 310)


def test_learned_positions_are_refused_and_cnns_take_any_length(cache, tmp_path):
    stmem = create_backbone("stmem_vit", seq_len=100, patch_size=25)
    check_window(stmem, 100)
    with pytest.raises(ValueError, match=r"stmem_vit \(StMemViT\) embeds windows of at most seq_len=100 samples"):
        fit_window(stmem, 200)
    with pytest.raises(ValueError, match="seq_len=100"):
        cached_features(stmem, cache, 200, 200, tmp_path)
    cnn = create_backbone("resnet1d_test")
    assert F.window_limit(cnn) is None and fit_window(cnn, 1000) is cnn
    fs = extract_features(cnn, cache, 600, 600)
    assert fs.features.shape == (5, cnn.num_features)                          # one 6 s window per record


def test_feature_keys_follow_the_window_and_long_windows_embed(cache, tmp_path):
    vit = _vit(100)
    short = cached_features(vit, cache, 100, 100, tmp_path)
    long = cached_features(vit, cache, 300, 300, tmp_path)
    assert short.key != long.key and len(list(tmp_path.glob("*.npz"))) == 2
    assert vit.seq_len == 100                                                  # the caller's model is unchanged
    r = 1                                                                      # a 12-lead record
    x = torch.from_numpy(np.ascontiguousarray(sliding_windows(cache.signal(r), 300, 300)[0]))[None]
    with torch.no_grad():
        want = fit_window(vit, 300).embed(x)[0].numpy()
    np.testing.assert_allclose(long.features[long.record == r][0], want, atol=1e-5)


def test_tokens_are_what_the_embedding_pools_and_only_present_leads(cache):
    vit = _vit(100)
    ts = extract_tokens(vit, cache, 100, 100, batch_size=4)
    fs = extract_features(vit, cache, 100, 100, batch_size=4)
    assert ts.tokens.dtype == np.float16 and ts.dim == 16 and np.array_equal(ts.record, fs.record)
    per_window = np.diff(ts.window_offsets)
    one_lead = np.isin(ts.record, [0, 2, 4])
    assert (per_window[one_lead] == 4).all() and (per_window[~one_lead] == 48).all()   # 4 patches x leads
    np.testing.assert_allclose(ts.window_means(), fs.features, atol=2e-3)      # mean token = embedding (fp16)
    bounds = ts.record_offsets()
    assert bounds[0, 0] == 0 and bounds[-1, 1] == len(ts.tokens) and (bounds[1:, 0] == bounds[:-1, 1]).all()
    assert ts.nbytes == len(ts.tokens) * ts.dim * 2 and len(ts.record_tokens(1)) == 48 * int((ts.record == 1).sum())
    padded = extract_tokens(vit, cache, 100, 100, lead_aware=False)
    assert (np.diff(padded.window_offsets) == 48).all()                        # zero-padded: every lead


@pytest.mark.parametrize("name", ["resnet1d_test", "net1d_test"])
def test_cnn_tokens_are_feature_map_positions(name):
    cnn = create_backbone(name).eval()
    x = torch.randn(2, 12, 400)
    with torch.no_grad():
        toks = window_tokens(cnn, x)
        fmap = cnn.forward_features(x)
    assert len(toks) == 2 and toks[0].shape == (fmap.shape[2], fmap.shape[1])
    torch.testing.assert_close(toks[1].mean(0), fmap[1].mean(-1))


def test_hubert_tokens_are_its_frames():
    torch.manual_seed(0)
    hub = create_backbone("hubert_ecg").eval()
    assert F.window_limit(hub) is None
    x = torch.randn(2, 12, 100)
    with torch.no_grad():
        toks = window_tokens(hub, x)
        torch.testing.assert_close(torch.stack([t.mean(0) for t in toks]), hub.embed(x))


def test_token_cache_is_reused_keyed_apart_and_repaired(cache, tmp_path, caplog):
    vit = _vit(100)
    before = F.STATS["token_extractions"]
    a = cached_tokens(vit, cache, 100, 100, tmp_path)
    b = cached_tokens(vit, cache, 100, 100, tmp_path)
    assert F.STATS["token_extractions"] == before + 1 and a.key == b.key
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.record, b.record)
    emb = cached_features(vit, cache, 100, 100, tmp_path)
    assert emb.key != a.key and len(list(tmp_path.glob("*.npz"))) == 2        # one folder, distinct keys
    assert cached_tokens(vit, cache, 300, 300, tmp_path).key != a.key          # the window is in the key
    path = tmp_path / f"{a.key}.npz"
    path.write_bytes(path.read_bytes()[:100])                                  # truncated
    with caplog.at_level(logging.WARNING):
        c = cached_tokens(vit, cache, 100, 100, tmp_path)
    assert path.name in caplog.text and F.STATS["token_extractions"] == before + 3
    np.testing.assert_array_equal(c.tokens, a.tokens)


def test_token_cache_is_streamed_memory_mapped_and_committed_by_its_npz(cache, tmp_path, caplog):
    vit = _vit(100)
    mem = extract_tokens(vit, cache, 100, 100)                                  # in memory: the reference
    a = cached_tokens(vit, cache, 100, 100, tmp_path)
    assert isinstance(a.tokens, np.memmap) and not a.tokens.flags.writeable
    np.testing.assert_array_equal(np.asarray(a.tokens), mem.tokens)
    np.testing.assert_array_equal(a.window_offsets, mem.window_offsets)
    files = list(tmp_path.glob(f"{a.key}.*.tokens"))
    assert len(files) == 1 and files[0].stat().st_size == mem.tokens.nbytes
    with np.load(tmp_path / f"{a.key}.npz") as z:                              # small arrays + the file's name
        assert "tokens" not in z.files and str(z["tokens_file"]) == files[0].name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporary left behind
    b = cached_tokens(vit, cache, 100, 100, tmp_path)
    assert isinstance(b.tokens, np.memmap) and np.array_equal(np.asarray(b.tokens), mem.tokens)
    del a, b                                                                   # no map of the file survives
    before = F.STATS["token_extractions"]
    files[0].write_bytes(files[0].read_bytes()[:10])                           # truncated token file
    with caplog.at_level(logging.WARNING):
        c = cached_tokens(vit, cache, 100, 100, tmp_path)
    assert files[0].name in caplog.text and "bytes" in caplog.text and F.STATS["token_extractions"] == before + 1
    left = list(tmp_path.glob(f"{c.key}.*.tokens"))
    assert not files[0].exists() and len(left) == 1                            # the stale file went with the commit
    np.testing.assert_array_equal(np.asarray(c.tokens), mem.tokens)
    del c
    left[0].unlink()                                                           # token file gone, .npz kept
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        d = cached_tokens(vit, cache, 100, 100, tmp_path)
    assert "missing" in caplog.text and np.array_equal(np.asarray(d.tokens), mem.tokens)
    legacy = tmp_path / "legacy"                                               # the single-file format still reads
    legacy.mkdir()
    np.savez(legacy / f"{d.key}.npz", tokens=mem.tokens, window_offsets=mem.window_offsets, record=mem.record,
             n_records=np.asarray(mem.n_records), window=np.asarray(100), stride=np.asarray(100),
             skipped=mem.skipped)
    before = F.STATS["token_extractions"]
    e = cached_tokens(vit, cache, 100, 100, legacy)
    assert F.STATS["token_extractions"] == before and np.array_equal(e.tokens, mem.tokens)


class _BlowsUpOnTwelveLeads(nn.Module):
    """A CNN-like encoder whose feature map is NaN for windows with all twelve leads (records 1 and 3)."""

    name = "blows_up"
    init_args: dict = {}

    def __init__(self, everywhere: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(12, 4, 5, stride=5)
        self.everywhere = everywhere
        self.init_args = {"everywhere": everywhere}

    def forward_features(self, x):
        out = self.conv(x)
        out[(x.abs().sum(-1) > 0).all(dim=1) | self.everywhere] = float("nan")
        return out

    def embed(self, x):
        return self.forward_features(x).mean(-1)


def test_streamed_tokens_leave_out_nonfinite_records_and_a_failed_extraction_leaves_nothing(cache, tmp_path):
    enc, out = _BlowsUpOnTwelveLeads(), tmp_path / "f"
    with pytest.raises(NonFiniteDataError, match="src/r1"):
        cached_tokens(enc, cache, 100, 100, out)
    assert not list(out.iterdir())                                             # no token file, no temporary
    ts = cached_tokens(enc, cache, 100, 100, out, nonfinite="skip")
    mem = extract_tokens(enc, cache, 100, 100, nonfinite="skip")
    assert ts.skipped.tolist() == mem.skipped.tolist() == [1, 3] and set(ts.record.tolist()) == {0, 2, 4}
    assert isinstance(ts.tokens, np.memmap) and np.array_equal(np.asarray(ts.tokens), mem.tokens)
    assert [p.stat().st_size for p in out.glob("*.tokens")] == [mem.tokens.nbytes]   # rewritten without them
    assert ts.window_offsets[-1] == len(ts.tokens) and np.isfinite(np.asarray(ts.tokens)).all()
    none = cached_tokens(_BlowsUpOnTwelveLeads(everywhere=True), cache, 100, 100, out, nonfinite="skip")
    assert none.tokens.shape == (0, 4) and none.skipped.tolist() == [0, 1, 2, 3, 4]
    again = cached_tokens(_BlowsUpOnTwelveLeads(everywhere=True), cache, 100, 100, out, nonfinite="skip")
    assert again.tokens.shape == (0, 4) and again.key == none.key
    assert not [p for p in out.iterdir() if p.name.startswith(".")]            # no temporary left behind


def test_temporary_token_files_of_killed_extractions_are_removed(cache, tmp_path):
    """A SIGKILLed extraction cannot clean up after itself: the next extraction in the folder deletes the temporary
    files of processes that no longer run, and leaves those of running ones alone."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(gone.stdout)                                  # a pid that has exited
    orphans = [tmp_path / f".tokens.{dead}.abc123.tmp", tmp_path / f".tokens.{dead}.abc123.tmp.keep"]
    live = tmp_path / f".tokens.{os.getpid()}.def456.tmp"    # this process: still running
    other = tmp_path / ".tokens.notapid.tmp"                 # not ours to judge
    for f in [*orphans, live, other]:
        f.write_bytes(b"\0" * 64)
    cached_tokens(_vit(100), cache, 100, 100, tmp_path)
    assert not any(f.exists() for f in orphans)
    assert live.exists() and other.exists()
