"""Review findings of the twentieth session on the pretraining views and augmentations (each test fails on the code
before the fix): an adjacent pair longer than its record (x2 partly zero padding) went unreported; SimCLR contrasted
the all-zero x2 of records no longer than a crop; ``SimCLRModule(fs=...)`` was not compared with the data's rate from
Python; the augmentation preset's docstring misattributed Mehari & Strodthoff's recipe; the docs lacked the measured
effect of augmentations that ignore ``recorded``."""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

import ecgfm.augment as augment_mod
from ecgfm.augment import make_generator, simclr_augment
from ecgfm.data.cache import prepare_corpus
from ecgfm.data.datamodules import PretrainDataModule
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SyntheticSource
from ecgfm.losses.regression import masked_target_mse
from ecgfm.methods.clocs import CLOCSModule
from ecgfm.methods.simclr import SimCLRModule
from tests.unit.test_simclr_clocs import TinyBackbone   # the methods tests' tiny backbone

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = dict(p_crop=0, p_noise=0, p_amplitude=0, p_wander=0, p_powerline=0, p_time_mask=0, p_lead_mask=0,
                p_lowpass=0)


def _cache(root: Path, n: int, seconds: float, fs: float = 100.0) -> str:
    prepare_corpus(SyntheticSource(n, seed=0, fs=fs, duration=seconds), root, PreprocessSpec(fs=fs), workers=0,
                   progress=False)
    return str(root)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Records of 4.5 s (between one and two 3 s crops), 10 s and 3 s (exactly one crop) at 100 Hz."""
    root = tmp_path_factory.mktemp("s20views")
    return {"mid": _cache(root / "mid", 8, 4.5), "long": _cache(root / "long", 8, 10.0),
            "one": _cache(root / "one", 8, 3.0)}


def _setup(dirs, **kw) -> tuple[PretrainDataModule, list[str]]:
    dm = PretrainDataModule(dirs, crop_samples=300, batch_size=8, val_fraction=0.0, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    return dm, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------------- R1 (a) warnings
def test_adjacent_pair_longer_than_the_record_is_warned_with_its_share(caches):
    """4.5 s records under 3 s crops: every x2 holds 150 samples of zero padding and x is pinned to the start; setup
    said nothing (both checks compared the record with one crop)."""
    dm, caught = _setup(caches["mid"], views="adjacent")
    pad = [m for m in caught if "adjacent pair x, x2 (600 samples, 6 s)" in m]
    assert len(pad) == 1 and "training records of 100.0% of the draws" in pad[0] and "zero padding" in pad[0], caught
    batch = next(iter(dm.train_dataloader()))
    assert (batch["x2"][:, :, 150:] == 0).all() and batch["x2"][:, :, :150].ne(0).flatten(1).any(1).all()
    assert not any("all zero padding" in m for m in caught)   # no x2 is wholly padding: no degenerate-view warning
    # the share is that of the draws: a mixture drawing the 4.5 s cache 30 % of the time
    _, caught = _setup([caches["mid"], caches["long"]], views="adjacent", weights=[0.3, 0.7])
    assert any("adjacent pair" in m and "of 30.0% of the draws" in m for m in caught), caught
    # records as long as a whole pair, and one crop of the same records: silent, as before
    _, caught = _setup(caches["long"], views="adjacent")
    assert not any("zero padding" in m for m in caught), caught
    for views in ("single", "segments"):
        _, caught = _setup(caches["mid"], views=views)
        assert not any("zero padding" in m for m in caught), (views, caught)


def test_all_padding_second_views_name_simclr_masking_too(caches):
    """The degenerate-view warning said "CLOCS masks those pairs"; SimCLR now does as well."""
    _, caught = _setup([caches["one"], caches["long"]], views="adjacent", weights=[0.5, 0.5])
    zero = [m for m in caught if "x2 is all zero padding for 50.0% of the training draws" in m]
    assert len(zero) == 1 and "SimCLR and CLOCS leave those pairs out of the loss" in zero[0], caught
    assert any("adjacent pair" in m and "of 50.0% of the draws" in m for m in caught), caught
    with pytest.raises(ValueError, match="SimCLR and CLOCS would mask every pair"):
        PretrainDataModule(caches["one"], crop_samples=300, views="adjacent", val_fraction=0.0).setup()


# ------------------------------------------------------------------------------------------ R1 (b) SimCLR masking
def _batch(b: int = 6, t: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tt = torch.arange(2 * t) / 100.0
    rate = 0.8 + 1.5 * torch.rand(b, 1, 1, generator=g)
    sig = torch.randn(b, 12, 1, generator=g) * torch.sin(2 * torch.pi * rate * tt)
    sig = sig + 0.05 * torch.randn(b, 12, 2 * t, generator=g)
    return {"x": sig[..., :t].contiguous(), "x2": sig[..., t:].contiguous(),
            "lead_mask": torch.ones(b, 12, dtype=torch.bool), "index": torch.arange(b),
            "patient": torch.arange(b)}


def _rows(batch: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def test_simclr_leaves_pairs_with_an_all_zero_view_out_of_nt_xent():
    """Rows 0 and 1: the x2 of a record no longer than a crop (all zero padding). Their views were contrasted: two
    identical embeddings of different records. Now the loss is that of the other rows alone (eval mode: per-row
    embeddings; identity augmentations: the same views)."""
    torch.manual_seed(0)
    m = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, **IDENTITY).eval()
    batch = _batch()
    batch["x2"][:2] = 0.0
    loss, terms = m.shared_step(batch)
    ref, ref_terms = m.shared_step(_rows(batch, slice(2, None)))
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(terms["acc"], ref_terms["acc"])
    assert torch.allclose(terms["pos_sim"], ref_terms["pos_sim"], atol=1e-6)
    # an all-zero first view is no view either
    batch2 = _batch()
    batch2["x"][3] = 0.0
    keep = [0, 1, 2, 4, 5]
    assert torch.allclose(m.shared_step(batch2)[0], m.shared_step(_rows(batch2, keep))[0], atol=1e-6)


def test_simclr_batch_without_any_pair_gives_zero_like_clocs():
    """Every x2 all zero: NT-Xent over nothing. As CLOCS, the loss is 0 attached to the graph (a step that changes
    nothing), not NaN, and the logged terms are finite."""
    torch.manual_seed(0)
    batch = _batch()
    batch["x2"][:] = 0.0
    m = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32)
    loss, terms = m.shared_step(batch)
    c_loss, _ = CLOCSModule(TinyBackbone()).shared_step(batch)
    assert loss.item() == 0.0 == c_loss.item() and loss.requires_grad and c_loss.requires_grad
    assert float(terms["pos_sim"]) == 0.0 and float(terms["acc"]) == 0.0
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_simclr_aux_targets_skip_all_zero_views():
    """An all-zero x2 regresses no pretext target (its record's targets describe a signal it does not hold)."""
    torch.manual_seed(0)
    m = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, aux_targets="handcrafted", aux_dim=3,
                     **IDENTITY).eval()
    batch = _batch()
    batch["x2"][1] = 0.0
    batch["t"] = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    _, terms = m.shared_step(batch)
    with torch.no_grad():
        h = m.backbone.embed(torch.cat([batch["x"], batch["x2"]]))
        target = torch.cat([batch["t"], batch["t"]])
        target[6 + 1] = float("nan")
        expected = masked_target_mse(m.aux_head(h), target)
    assert torch.allclose(terms["aux_mse"], expected, atol=1e-6)


def test_simclr_trains_on_adjacent_views_of_short_records_without_nan(caches):
    """The reviewer's pool: half the records no longer than a crop. A SimCLR step's loss is finite and equals the
    loss over the records with a second view."""
    dm, _ = _setup([caches["one"], caches["long"]], views="adjacent", weights=[0.5, 0.5])
    batch = next(iter(dm.train_dataloader()))
    has_x2 = batch["x2"].flatten(1).ne(0).any(1)
    assert 0 < int(has_x2.sum()) < len(has_x2)
    torch.manual_seed(0)
    m = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, **IDENTITY).eval()
    loss, _ = m.shared_step(batch)
    ref, _ = m.shared_step(_rows(batch, has_x2))
    assert torch.isfinite(loss) and torch.allclose(loss, ref, atol=1e-6)


def _ddp_batch(case: str) -> dict[str, torch.Tensor]:
    batch = _batch(b=8)
    batch["x2"][[0, 1, 2, 3, 6] if case == "some" else slice(None)] = 0.0   # "some": rank 0 keeps no pair
    return batch


def _ddp_module() -> SimCLRModule:
    torch.manual_seed(0)
    return SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, **IDENTITY).eval()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for case in ("some", "none"):
            m = _ddp_module()
            loss, _ = m.shared_step(_rows(_ddp_batch(case), slice(4 * rank, 4 * rank + 4)))
            assert torch.isfinite(loss) and loss.requires_grad
            loss.backward()
            grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.projector.parameters()]
            for g in grads:
                dist.all_reduce(g)              # DDP: the mean of the ranks' gradients
                g /= world
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            results[case] = [mean / world, *grads]
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


#: start method of this file's gloo worker processes: fork on Linux (the children inherit torch and the modules already
#: imported, where spawn re-imported them: seconds per process); spawn elsewhere (no safe fork)
START = "fork" if sys.platform.startswith("linux") else "spawn"


def test_simclr_masking_under_ddp_matches_one_process(tmp_path):
    """2 gloo ranks, rank 0 without any pair left (it still takes part in the gather, so rank 1 does not wait
    forever) and rank 1 with 3 of 4: the mean over ranks of loss and gradient is one process's over the 8 rows;
    with no pair on any rank the loss is 0 on both."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=START)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for case in ("some", "none"):
        m = _ddp_module()
        loss, _ = m.shared_step(_ddp_batch(case))
        loss.backward()
        torch.testing.assert_close(ddp[case][0], loss.detach(), rtol=1e-5, atol=1e-6, msg=case)
        for got, p in zip(ddp[case][1:], m.projector.parameters()):
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=case)
    assert float(ddp["none"][0]) == 0.0


# -------------------------------------------------------------------------------------------- R3 fs from Python
def _fit(module: L.LightningModule, dm: PretrainDataModule) -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)


def test_simclr_fs_is_checked_against_the_datamodule(tmp_path):
    """A 500 Hz cache with the module's default fs=100: the time masks, wander and low-pass ran at 100 Hz without a
    word. The fit now refuses it, naming both rates; the matching rate trains."""
    cache = _cache(tmp_path / "c500", 6, 2.5, fs=500.0)
    dm = PretrainDataModule(cache, crop_samples=250, batch_size=4, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"SimCLRModule\(fs=100\).*at 500 Hz.*fs=500"):
        _fit(SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32), dm)
    m = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, fs=500.0 + 1e-9)   # float noise: the same rate
    _fit(m, PretrainDataModule(cache, crop_samples=250, batch_size=4, val_fraction=0.0))
    assert m.trainer.global_step == 1


# ---------------------------------------------------------------------------------------------- R4 / R2 documents
def test_augment_docstring_names_mehari_recipe_and_the_preset_is_unchanged():
    doc = augment_mod.__doc__
    assert "Gaussian noise strongest" not in doc
    assert "TimeOut" in doc and "0-50 %" in doc and "(0.5, 1.0)" in doc and "6 %" in doc and "20 %" in doc
    aug = simclr_augment(fs=100.0)
    crop = [t for t in aug.transforms if type(t).__name__ == "RandomResizedCropSameLength"][0]
    tm = [t for t in aug.transforms if isinstance(t, augment_mod.TimeMask)][0]
    assert tuple(crop.scale) == (0.5, 1.0) and crop.p == 0.8 and tm.p == 0.5
    for seconds, mean, top in ((2.5, 0.06, 0.20), (10.0, 0.015, 0.05)):   # the docstring's figures
        y = tm(torch.ones(4000, 1, int(seconds * 100)), generator=make_generator(0))
        frac = (y == 0).float().mean(-1).flatten()
        assert math.isclose(float(frac.mean()), mean, rel_tol=0.1) and float(frac.max()) <= top + 1e-6


def test_training_doc_states_that_augmentations_fill_the_padding():
    """The figures TRAINING.md gives: Gaussian noise alone at a nominal 20 dB fills every padded sample, and its level
    follows the padded crop (22.2 dB on the recorded 1.5 s of a 2.5 s crop)."""
    text = " ".join((ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8").split())
    assert "augmentations do not read `recorded`" in text and "4,800 of the 4,800 padded samples" in text
    assert "22.2 dB on the recorded part" in text
    t, rec = 250, 150
    x = (torch.sin(2 * torch.pi * 1.2 * torch.arange(t) / 100.0) * (torch.arange(t) < rec))[None, None]
    x = x.repeat(4, 12, 1)
    aug = simclr_augment(fs=100.0, **{**IDENTITY, "p_noise": 1.0}, noise_snr_db=(20.0, 20.0))
    v = aug(x, torch.ones(4, 12, dtype=torch.bool), make_generator(0))
    assert int((v[:, :, rec:] != 0).sum()) == 4800
    snr = [10 * math.log10(x[b, c, :rec].var() / (v[b, c, :rec] - x[b, c, :rec]).var())
           for b in range(4) for c in range(12)]
    assert abs(sum(snr) / len(snr) - 22.2) < 0.1
