"""Self-supervised pretext targets from the signal (handcrafted rhythm / morphology statistics per record): the
masked regression loss, the pool's standardised targets, their path through the pretraining batches, and SimCLR's
auxiliary head (``method.aux_targets=handcrafted``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.config import ConfigError
from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.datamodules import PretrainDataModule
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGRecord
from ecgfm.evaluate import handcrafted as H
from ecgfm.export import load_encoder
from ecgfm.losses import masked_target_mse
from ecgfm.methods.simclr import SimCLRModule
from ecgfm.pipelines import train
from ecgfm.train.build import pretext_targets_for
from tests.unit.test_simclr_clocs import TinyBackbone, synthetic_batch

CONF = Path(__file__).resolve().parents[2] / "ecgfm" / "conf"
NAMES = list(H.FEATURE_NAMES)
RR_COLS = [NAMES.index(n) for n in H.RR_FEATURES]


def test_masked_target_mse_matches_reference_and_ignores_unknown_entries():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(5, 4, generator=g, requires_grad=True)
    target = torch.randn(5, 4, generator=g)
    target[0, 1] = float("nan")
    target[3] = float("nan")
    loss = masked_target_mse(pred, target)
    known = torch.isfinite(target)
    ref = ((pred.detach() - target)[known] ** 2).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert torch.all(pred.grad[~known] == 0) and torch.all(pred.grad[known] != 0)
    assert torch.isfinite(pred.grad).all()
    nothing = masked_target_mse(pred, torch.full((5, 4), float("nan")))
    assert nothing.item() == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="same shape"):
        masked_target_mse(pred, target[:, :3])


def test_ddp_mean_logs_the_global_mean_and_gives_the_global_gradient(monkeypatch):
    """What SimCLR's pretext regression does under DDP with ``ddp_mean``: two ranks with unevenly many known targets
    each return the whole batch's mean as the value (what is logged, the same on both), and the mean of their
    gradients (DDP's average) is the whole batch's gradient; dividing each by its own count (the old per-rank mean)
    gives another gradient, and the rank's own mean (the old logged value) another value."""
    import ecgfm.losses.contrastive as C

    g = torch.Generator().manual_seed(1)
    pred = torch.randn(6, 4, generator=g, requires_grad=True)
    target = torch.randn(6, 4, generator=g)
    target[:3, 1:] = float("nan")                      # the first half knows 3 entries, the second 12
    whole = masked_target_mse(pred, target)
    (grad_whole,) = torch.autograd.grad(whole, pred)
    halves = [(slice(0, 3)), (slice(3, 6))]
    known = [torch.isfinite(target[h]).sum() for h in halves]
    assert torch.equal(C.ddp_mean_count(known[0]), known[0])          # no process group: the local count
    own = [masked_target_mse(pred[h], target[h]) for h in halves]
    assert torch.allclose(C.ddp_mean(own[0] * known[0], known[0]), own[0])   # one process: its own mean
    pairs = [torch.stack([(o * k).detach(), k.float()]) for o, k in zip(own, known)]
    monkeypatch.setattr(C, "world_info", lambda: (0, 2))
    monkeypatch.setattr(C, "ddp_mean_count", lambda c: (pairs[0] + pairs[1]) / 2)   # all_reduce / world
    values = [C.ddp_mean(o * k, k) for o, k in zip(own, known)]
    for v, o in zip(values, own):
        assert torch.allclose(v, whole)                               # logged: the global mean, on every rank
        assert not torch.allclose(v, o)                               # not the rank's own
    grads = [torch.autograd.grad(v, pred, retain_graph=True)[0] for v in values]
    assert torch.allclose((grads[0] + grads[1]) / 2, grad_whole)      # DDP's average: the global mean's gradient
    old = [torch.autograd.grad(o, pred)[0] for o in own]
    assert not torch.allclose((old[0] + old[1]) / 2, grad_whole)


class BeatSource:
    """Records with known beat trains on lead II (20 s, one of them 90 s)."""

    name = "beats"
    fs = 100.0

    def __init__(self) -> None:
        from tests.unit.test_handcrafted import beat_train, irregular, regular

        trains = [regular(60, 20), regular(90, 20), irregular(20, seed=1), irregular(20, seed=2), regular(75, 20)]
        self.signals = [beat_train(t, 20.0, self.fs, seed=k) for k, t in enumerate(trains)]
        self.signals.append(beat_train(regular(120, 20), 20.0, self.fs, seed=9))
        self.signals.append(beat_train(regular(70, 90), 90.0, self.fs))     # longer than max_seconds

    def record_ids(self) -> list[str]:
        return [f"b{i}" for i in range(len(self.signals))]

    def load(self, rid: str) -> ECGRecord:
        x = self.signals[int(rid[1:])]
        sig = np.zeros((12, len(x)), np.float32)
        sig[1] = x
        mask = np.zeros(12, bool)
        mask[1] = True
        return ECGRecord(signal=sig, fs=self.fs, lead_mask=mask, record_id=rid, source=self.name,
                         patient_id=f"p{rid}", labels=("N",))

    def __repr__(self) -> str:
        return "BeatSource(v1)"


@pytest.fixture(scope="module")
def beat_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("beats")
    prepare_corpus(BeatSource(), root / "c", PreprocessSpec(fs=100.0), workers=0, progress=False)
    return CorpusCache(root / "c")


def test_pretext_targets_are_standardised_and_mask_what_is_unknown(beat_cache, tmp_path):
    t = H.pretext_targets([beat_cache], tmp_path / "features", max_seconds=60.0, clip=3.0)
    assert t.shape == (7, len(NAMES)) and t.dtype == np.float32
    known = np.isfinite(t)
    assert known[:6].all()                                    # six 20 s beat trains: every feature known
    assert not known[6].any()                                 # 90 s > max_seconds: no target at all
    assert np.all(np.abs(t[known]) <= 3.0)
    for j in range(t.shape[1]):                               # robust centring of every column
        col = t[known[:, j], j]
        assert abs(np.median(col)) < 1e-5, NAMES[j]
    hr = NAMES.index("hr_mean")
    assert t[1, hr] > t[4, hr] > t[0, hr]                     # 90 > 75 > 60 bpm survives the standardisation
    hits = H.STATS["cache_hits"]
    again = H.pretext_targets([beat_cache], tmp_path / "features", max_seconds=60.0, clip=3.0)
    assert H.STATS["cache_hits"] == hits + 1                  # the features come from the disk cache
    np.testing.assert_array_equal(again, t)
    with pytest.raises(ValueError, match="max_seconds"):
        H.pretext_targets([beat_cache], tmp_path / "features", max_seconds=0)


def test_a_missing_feature_group_is_unknown_not_its_fill_value(beat_cache, tmp_path, monkeypatch):
    real = H.cached_handcrafted(beat_cache, tmp_path / "features")
    feats = real.features.copy()
    feats[2, RR_COLS] = 0.0                                    # what fill_missing writes for a missing group
    feats[2, NAMES.index("missing_rr")] = 1.0
    monkeypatch.setattr(H, "cached_handcrafted", lambda cache, d, nonfinite="error": H.FeatureSet(
        features=feats, record=real.record, n_records=real.n_records))
    t = H.pretext_targets([beat_cache], tmp_path / "features")
    assert not np.isfinite(t[2, RR_COLS]).any()               # the RR group is unknown ...
    assert np.isfinite(t[2, NAMES.index("missing_rr")])       # ... and says so through its indicator
    drr = [NAMES.index(n) for n in H.DRR_FEATURES]
    assert np.isfinite(t[2, drr]).all()                       # other groups keep their values


def test_pretraining_batches_carry_each_records_targets(beat_cache):
    targets = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    targets[2, 1] = np.nan
    dm = PretrainDataModule(str(beat_cache.path), crop_samples=500, views="segments", batch_size=4,
                            val_fraction=0.0, samples_per_epoch=16, seed=0, record_targets=targets)
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["t"].shape == (4, 3) and batch["t"].dtype == torch.float32
        np.testing.assert_array_equal(batch["t"].numpy(), targets[batch["index"].numpy()])
        seen.update(batch["index"].tolist())
    assert len(seen) > 1
    with pytest.raises(ValueError, match="record_targets"):
        PretrainDataModule(str(beat_cache.path), crop_samples=500, record_targets=targets[:5]).setup()


def test_pretext_targets_file_is_computed_once_and_memory_mapped(beat_cache, tmp_path, caplog):
    import logging

    feats = tmp_path / "features"
    path = H.pretext_targets_file([beat_cache], feats, clip=3.0)
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    expected = H.pretext_targets([beat_cache], feats, clip=3.0)
    np.testing.assert_array_equal(mapped, expected)
    del mapped
    hits = H.STATS["pretext_hits"]
    assert H.pretext_targets_file([beat_cache], feats, clip=3.0) == path and H.STATS["pretext_hits"] == hits + 1
    assert H.pretext_targets_file([beat_cache], feats, clip=2.0) != path          # the recipe is in the key
    path.write_bytes(b"not an npy file")                                         # damaged: computed again
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.handcrafted"):
        assert H.pretext_targets_file([beat_cache], feats, clip=3.0) == path
    assert "computing them again" in caplog.text
    np.testing.assert_array_equal(np.load(path), expected)
    path.write_bytes(b"")                                                     # empty: computed again too
    assert H.pretext_targets_file([beat_cache], feats, clip=3.0) == path
    np.testing.assert_array_equal(np.load(path), expected)
    with pytest.raises(ValueError, match="max_seconds"):
        H.pretext_targets_file([beat_cache], feats, max_seconds=0)


def test_targets_in_memory_when_their_file_cannot_be_written(beat_cache, tmp_path, monkeypatch, caplog):
    """A read-only paths.cache_root (features there already): training still gets its targets, as an array."""
    import logging

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(H, "pretext_targets_file", read_only)
    cfg = _cfg(tmp_path, beat_cache.path)
    with caplog.at_level(logging.WARNING, logger="ecgfm.train.build"):
        t = pretext_targets_for(cfg, [str(beat_cache.path)])
    assert isinstance(t, np.ndarray) and t.shape == (7, len(NAMES)) and "in memory" in caplog.text


def test_concurrent_processes_extract_the_features_once(beat_cache, tmp_path):
    """DDP ranks asking for the same handcrafted features at once: one extracts, the others read its file."""
    import threading

    before = H.STATS["extractions"]
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(H.cached_handcrafted(beat_cache, tmp_path / "f")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert H.STATS["extractions"] == before + 1 and len(out) == 3
    for fs in out[1:]:
        np.testing.assert_array_equal(fs.features, out[0].features)


def test_batches_read_targets_from_a_memory_mapped_file(beat_cache, tmp_path):
    import pickle

    from ecgfm.data.datamodules import CropDataset, open_pretext_targets
    from ecgfm.data.record import ECGDataError

    targets = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    targets[2, 1] = np.nan
    path = tmp_path / "t.npy"
    np.save(path, targets)
    dm = PretrainDataModule(str(beat_cache.path), crop_samples=500, batch_size=4, val_fraction=0.0,
                            samples_per_epoch=8, seed=0, record_targets=str(path))
    for batch in dm.train_dataloader():
        np.testing.assert_array_equal(batch["t"].numpy(), targets[batch["index"].numpy()])
    ds = dm.train_dataset()
    assert isinstance(ds.targets, np.memmap)
    big = np.zeros((7, 4000), np.float32)                  # pickled for a spawned worker: the path, not the array
    np.save(tmp_path / "big.npy", big)
    by_path = CropDataset(dm.pool, np.arange(7), 500, targets=str(tmp_path / "big.npy"))
    by_array = CropDataset(dm.pool, np.arange(7), 500, targets=big)
    assert len(pickle.dumps(by_array)) - len(pickle.dumps(by_path)) > big.nbytes // 2
    clone = pickle.loads(pickle.dumps(by_path))
    np.testing.assert_array_equal(clone[(3, 0.5)]["t"].numpy(), big[3])
    np.save(tmp_path / "short.npy", targets[:5])
    with pytest.raises(ValueError, match="short.npy.*N_total=7"):
        PretrainDataModule(str(beat_cache.path), crop_samples=500, record_targets=str(tmp_path / "short.npy")).setup()
    with pytest.raises(ECGDataError, match="missing.npy.*unreadable"):
        open_pretext_targets(tmp_path / "missing.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ECGDataError, match="empty.npy.*unreadable"):
        open_pretext_targets(tmp_path / "empty.npy")
    np.save(tmp_path / "f64.npy", targets.astype(np.float64))
    with pytest.raises(ECGDataError, match="f64.npy.*float32"):
        open_pretext_targets(tmp_path / "f64.npy")


IDENTITY = dict(p_crop=0, p_noise=0, p_amplitude=0, p_wander=0, p_powerline=0, p_time_mask=0, p_lead_mask=0,
                p_lowpass=0)


def test_simclr_aux_head_regresses_the_targets():
    batch = synthetic_batch(b=12)
    amp = batch["x"].abs().mean(-1)[:, :5]                           # a record statistic the signal shows
    batch["t"] = (amp - amp.mean(0)) / amp.std(0)
    batch["t"][0, :2] = float("nan")
    torch.manual_seed(0)
    m = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, aug_seed=0, aux_targets="handcrafted", aux_dim=5,
                     aux_weight=2.0, **IDENTITY)
    loss, terms = m.shared_step(batch)
    assert set(terms) == {"pos_sim", "acc", "nt_xent", "aux_mse"}
    assert torch.allclose(loss.detach(), terms["nt_xent"] + 2.0 * terms["aux_mse"])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(terms["aux_mse"])
    for _ in range(80):
        loss, terms = m.shared_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(terms["aux_mse"]) < 0.3 * first    # the head and the backbone learn the statistic
    plain = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, aug_seed=0)
    assert plain.aux_head is None and "aux_mse" not in plain.shared_step(batch)[1]


def test_pretext_alone_ablation():
    """contrastive_weight=0 trains on the regression only (NT-Xent still logged); refused without aux_targets."""
    batch = synthetic_batch(b=8)
    batch["t"] = torch.randn(8, 3)
    torch.manual_seed(0)
    m = SimCLRModule(TinyBackbone(), aug_seed=0, aux_targets="handcrafted", aux_dim=3, aux_weight=2.0,
                     contrastive_weight=0.0)
    loss, terms = m.shared_step(batch)
    assert torch.allclose(loss.detach(), 2.0 * terms["aux_mse"]) and float(terms["nt_xent"]) > 0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.projector.parameters())   # NT-Xent trains nothing
    with pytest.raises(ValueError, match="contrastive_weight"):
        SimCLRModule(TinyBackbone(), contrastive_weight=0.0)
    half = SimCLRModule(TinyBackbone(), aug_seed=0, contrastive_weight=0.5)
    full = SimCLRModule(TinyBackbone(), aug_seed=0)
    full.load_state_dict(half.state_dict())
    assert torch.allclose(half.shared_step(batch)[0], 0.5 * full.shared_step(batch)[0])


def test_simclr_aux_errors():
    with pytest.raises(ValueError, match="aux_targets must be"):
        SimCLRModule(TinyBackbone(), aux_targets="rr", aux_dim=3)
    with pytest.raises(ValueError, match="aux_dim"):
        SimCLRModule(TinyBackbone(), aux_targets="handcrafted")
    m = SimCLRModule(TinyBackbone(), aux_targets="handcrafted", aux_dim=3)
    with pytest.raises(ValueError, match="no pretext targets 't'"):
        m.shared_step(synthetic_batch())


def _cfg(tmp_path, cache, *extra):
    overrides = ["+experiment=simclr_cnn_hc_cpu30", "data=cached", f"data.cache_dirs=[{cache}]",
                 "data.num_workers=0", "data.batch_size=4", "data.val_fraction=0.3", f"out_dir={tmp_path / 'run'}",
                 f"paths.cache_root={tmp_path / 'cache_root'}", "backbone=vit1d_test", "crop_seconds=5",
                 "trainer.max_steps=2", "checkpoint.every_n_train_steps=1", "trainer.enable_model_summary=false",
                 "torch_threads=1", "trainer.log_every_n_steps=1", "method.proj_dim=8", "method.proj_hidden=16",
                 "method.warmup_steps=1", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_training_with_handcrafted_targets_end_to_end(beat_cache, tmp_path):
    """train.py +experiment=simclr_cnn_hc_cpu30 on a cache: targets computed (and cached), head trained, the
    exported encoder is the backbone alone, and the loss parts are logged."""
    summary = train(_cfg(tmp_path, beat_cache.path))
    assert summary["steps"] == 2
    assert list((tmp_path / "cache_root" / "features").glob("hc-*.npz"))
    assert len(list((tmp_path / "cache_root" / "features").glob("pretext-*.npy"))) == 1
    state = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert state["aux_head.weight"].shape[0] == len(NAMES)
    from ecgfm.evaluate.sweep import _method_of
    info = load_encoder(summary["encoder_dir"])[2]
    assert _method_of(info, summary["encoder_dir"]) == "simclr+handcrafted-pretext"   # never "simclr" in tables
    rows = list(csv.DictReader(open(Path(summary["log_dir"]) / "metrics.csv")))
    assert any(r.get("train/aux_mse") for r in rows) and any(r.get("train/nt_xent") for r in rows)
    # a rerun into the same folder resumes: the targets are recomputed from the feature cache, the head reloaded
    resumed = train(_cfg(tmp_path, beat_cache.path, "trainer.max_steps=3"))
    assert resumed["steps"] == 3 and resumed["resumed_from"]


def test_handcrafted_targets_need_caches(tmp_path):
    cfg = _cfg(tmp_path, "unused")
    with pytest.raises(ConfigError, match="method.aux_targets"):
        pretext_targets_for(cfg, [])
