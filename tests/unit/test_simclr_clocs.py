"""SimCLR and CLOCS modules: finite losses, learning on a tiny synthetic batch, views, lead masks, Lightning fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from ecgfm.methods.clocs import CLOCSModule
from ecgfm.methods.simclr import SimCLRModule




class TinyBackbone(nn.Module):
    """Minimal backbone following the contract (``embed``, ``num_features``), independent of ecgfm.backbones."""

    name = ""
    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(12, 16, 7, padding=3), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Conv1d(16, 16, 5, padding=2))
        self.init_args = {}

    def forward_features(self, x):
        return self.conv(x)

    def embed(self, x):
        return self.forward_features(x).mean(-1)

    forward = embed


def synthetic_batch(b: int = 12, t: int = 100, seed: int = 0, absent: bool = True) -> dict[str, torch.Tensor]:
    """Each record: per-lead sinusoid mixture with a record-specific rate; x2 is the adjacent segment."""
    g = torch.Generator().manual_seed(seed)
    tt = torch.arange(2 * t) / 100.0
    rate = 0.8 + 1.5 * torch.rand(b, 1, 1, generator=g)
    gain = torch.randn(b, 12, 1, generator=g)
    sig = gain * torch.sin(2 * torch.pi * rate * tt) + 0.5 * torch.sin(2 * torch.pi * 3 * rate * tt + gain)
    sig = sig + 0.05 * torch.randn(b, 12, 2 * t, generator=g)
    mask = torch.ones(b, 12, dtype=torch.bool)
    if absent:
        mask[0, 6:] = False
        mask[1, :] = False
        mask[1, 1] = True  # lead II only
    sig = sig * mask[:, :, None]
    patient = torch.arange(b)
    patient[2:4] = 100        # two recordings of one patient
    patient[b - 1] = -1       # unknown patient
    return {"x": sig[..., :t].float().contiguous(), "x2": sig[..., t:].float().contiguous(), "lead_mask": mask,
            "patient": patient.long(), "index": torch.arange(b)}


def _learns(module: L.LightningModule, steps: int = 16, lr: float = 3e-3) -> tuple[float, float]:
    torch.manual_seed(0)
    batch = synthetic_batch()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    losses = []
    for _ in range(steps):
        loss, terms = module.shared_step(batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:4]) / 4, sum(losses[-4:]) / 4


def test_simclr_learns_on_tiny_batch():
    torch.manual_seed(0)
    first, last = _learns(SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=32, aug_seed=0))
    assert last < first - 0.05, (first, last)


@pytest.mark.parametrize("mode", ["cmsc", "cmlc", "cmsmlc"])
def test_clocs_learns_on_tiny_batch(mode):
    torch.manual_seed(0)
    first, last = _learns(CLOCSModule(TinyBackbone(), mode=mode, proj_dim=8))
    assert last < first - 0.05, (mode, first, last)


def test_simclr_views_respect_lead_mask_and_seed():
    batch = synthetic_batch()
    m1 = SimCLRModule(TinyBackbone(), aug_seed=3)
    m2 = SimCLRModule(TinyBackbone(), aug_seed=3)
    a1, b1 = m1.views(batch)
    a2, b2 = m2.views(batch)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.allclose(a1, b1)
    absent = ~batch["lead_mask"]
    assert torch.all(a1[absent] == 0) and torch.all(b1[absent] == 0)
    # validation views are the same each validation epoch
    m1.eval()
    m1.on_validation_epoch_start()
    v1 = m1.views(batch)[0]
    m1.on_validation_epoch_start()
    assert torch.equal(v1, m1.views(batch)[0])


def test_simclr_second_view_comes_from_x2_when_the_batch_has_one():
    """PretrainDataModule(views="segments"): the second view augments batch["x2"] (another moment of the record)."""
    batch = {k: v for k, v in synthetic_batch().items() if k != "x2"}
    m = SimCLRModule(TinyBackbone(), aug_seed=3, p_crop=0, p_noise=0, p_amplitude=0, p_wander=0, p_powerline=0,
                     p_time_mask=0, p_lead_mask=0, p_lowpass=0)   # identity augmentations
    v1, v2 = m.views(batch)
    assert torch.equal(v1, batch["x"]) and torch.equal(v2, batch["x"])
    x2 = batch["x"].flip(-1).contiguous()
    v1, v2 = m.views({**batch, "x2": x2})
    assert torch.equal(v1, batch["x"]) and torch.equal(v2, x2)
    loss, terms = SimCLRModule(TinyBackbone(), aug_seed=0).shared_step({**batch, "x2": x2})
    assert torch.isfinite(loss) and 0.0 <= float(terms["acc"]) <= 1.0


def test_clocs_views_and_absent_leads():
    batch = synthetic_batch(b=4)
    m = CLOCSModule(TinyBackbone(), mode="cmsmlc", view_leads=("II", "V2", "avl"))
    xv, mask = m.views(batch)
    assert xv.shape == (6, 4, 12, 100) and mask.shape == (6, 4)
    # view k keeps only its lead: II (1), V2 (7), aVL (4)
    for k, lead in enumerate([1, 7, 4, 1, 7, 4]):
        others = [i for i in range(12) if i != lead]
        assert torch.all(xv[k][:, others] == 0)
        seg = batch["x"] if k < 3 else batch["x2"]
        assert torch.equal(xv[k][:, lead], seg[:, lead])
    # record 0 has limb leads only -> its V2 views do not exist; record 1 has lead II only
    assert mask[:, 0].tolist() == [True, False, True, True, False, True]
    assert mask[:, 1].tolist() == [True, False, False, True, False, False]
    cmsc = CLOCSModule(TinyBackbone(), mode="cmsc")
    xv, mask = cmsc.views(batch)
    assert xv.shape == (2, 4, 12, 100) and mask.all()
    assert torch.all(xv[:, 0, 6:] == 0)


def test_clocs_errors():
    with pytest.raises(ValueError, match="mode"):
        CLOCSModule(TinyBackbone(), mode="cmx")
    with pytest.raises(ValueError, match="unknown lead"):
        CLOCSModule(TinyBackbone(), mode="cmlc", view_leads=("II", "V9x"))
    with pytest.raises(ValueError, match="at least 2"):
        CLOCSModule(TinyBackbone(), mode="cmlc", view_leads=("II",))
    batch = synthetic_batch(b=4)
    del batch["x2"]
    with pytest.raises(ValueError, match="adjacent"):
        CLOCSModule(TinyBackbone(), mode="cmsc").shared_step(batch)


def test_patient_awareness_reaches_the_loss():
    torch.manual_seed(0)
    batch = synthetic_batch()
    bb = TinyBackbone()
    a = CLOCSModule(bb, mode="cmsc", patient_aware=True).eval()
    b = CLOCSModule(bb, mode="cmsc", patient_aware=False).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        la, lb = a.shared_step(batch)[0], b.shared_step(batch)[0]
    assert not torch.isclose(la, lb)


class _Loader(torch.utils.data.IterableDataset):
    def __init__(self, n: int, labelled: bool = False) -> None:
        self.n, self.labelled = n, labelled

    def __iter__(self):
        for i in range(self.n):
            b = synthetic_batch(b=8, seed=i)
            b["index"] = b["index"] + 8 * i
            if self.labelled:
                b["y"] = (b["x"][:, 0].std(-1) > 0.8).long()
            yield b


@pytest.mark.parametrize("kind", ["simclr", "clocs", "simclr_vit1d_test", "clocs_resnet1d_test"])
def test_fit_with_lightning_trainer(kind, tmp_path):
    if kind == "simclr":
        module = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=16, warmup_steps=1, max_steps=4)
    elif kind == "clocs":
        module = CLOCSModule(TinyBackbone(), mode="cmsmlc", warmup_steps=1, max_steps=4)
    else:  # registered backbones through the same path
        from ecgfm.backbones import create_backbone

        method, name = kind.split("_", 1)
        cls = SimCLRModule if method == "simclr" else CLOCSModule
        module = cls(create_backbone(name), warmup_steps=1, max_steps=4)
    trainer = L.Trainer(max_steps=4, limit_val_batches=2, val_check_interval=4, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(_Loader(4), batch_size=None)
    trainer.fit(module, loader, torch.utils.data.DataLoader(_Loader(2), batch_size=None))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert "train/pos_sim" in metrics


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    root = tmp_path_factory.mktemp("ssl_cache")
    prepare_corpus(SyntheticSource(40, seed=0, fs=100.0, duration=4.0), root / "syn", PreprocessSpec(fs=100),
                   workers=0, progress=False)
    return str(root / "syn")


@pytest.mark.parametrize("method", ["simclr", "cmsmlc"])
def test_fit_on_pretrain_datamodule_with_online_probe(method, synthetic_cache, tmp_path):
    """The real PretrainDataModule batch contract (adjacent views, lead_mask, patient, y) end to end."""
    from ecgfm.data.cache import CorpusCache
    from ecgfm.data.datamodules import PretrainDataModule

    classes = CorpusCache(synthetic_cache).label_space()
    dm = PretrainDataModule(synthetic_cache, crop_samples=100, views="adjacent" if method != "simclr" else "single",
                            batch_size=8, val_fraction=0.5, seed=0, probe_labels=classes, samples_per_epoch=16)
    kw = dict(warmup_steps=1, max_steps=2, probe_num_classes=len(classes), probe_multilabel=True)
    if method == "simclr":
        module = SimCLRModule(TinyBackbone(), proj_dim=8, proj_hidden=16, **kw)
    else:
        module = CLOCSModule(TinyBackbone(), mode=method, **kw)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and torch.isfinite(m["val/loss"])
    assert 0.0 <= float(m["val/probe_auroc"]) <= 1.0 and float(m["val/probe_n"]) >= 10


def test_heads_shapes_and_linear_probe_is_linear():
    from ecgfm.heads import LinearProbeHead, MLPHead, ProjectionHead

    x = torch.randn(10, 16)
    assert ProjectionHead(16, 32, 8)(x).shape == (10, 8)
    assert ProjectionHead(16, 32, 8, num_layers=3, batch_norm=False)(x).shape == (10, 8)
    assert ProjectionHead(16, 32, 8, num_layers=1, batch_norm=False)(x).shape == (10, 8)
    assert MLPHead(16, 5)(x).shape == (10, 5)
    probe = LinearProbeHead(16, 5)
    assert probe(x).shape == (10, 5)
    assert probe.norm.weight is None and probe.norm.bias is None        # BatchNorm without affine (MAE linprobe)
    trainable = {n for n, p in probe.named_parameters()}
    assert trainable == {"linear.weight", "linear.bias"}
    probe.eval()                                                         # at inference: an affine map
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    assert torch.allclose(probe(a + b) - probe(b), probe(a) - probe(torch.zeros(3, 16)), atol=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(16, 32, 8, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        MLPHead(16, 5, dropout=1.0)


class _SpyViT(nn.Module):
    """A lead-aware stand-in: records the lead masks it is given (one token per present lead)."""

    name = ""
    num_features = 16
    accepts_lead_mask = True

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 16)
        self.init_args = {}
        self.masks: list[torch.Tensor] = []

    def embed(self, x, lead_mask=None):
        self.masks.append(lead_mask)
        m = torch.ones(x.shape[:2], dtype=torch.bool) if lead_mask is None else lead_mask
        tok = self.proj(x.abs().mean(-1, keepdim=True))                      # (B, L, 16)
        return (tok * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)

    forward = embed


def test_simclr_views_reach_a_lead_aware_encoder_with_the_leads_they_kept():
    """KeepOneLead / PresentLeadMask zero leads inside a view: that view's lead mask drops them, so a lead-aware
    encoder makes no tokens for them (as for a one-lead record downstream)."""
    torch.manual_seed(0)
    spy = _SpyViT()
    m = SimCLRModule(spy, fs=100.0, p_one_lead=1.0, p_lead_mask=0.0, p_crop=0.0, proj_dim=8, proj_hidden=16)
    batch = synthetic_batch(b=4)
    m.shared_step(batch)
    masks = spy.masks[-1]
    assert masks is not None and masks.shape == (8, 12)
    assert masks.sum(1).tolist() == [1] * 8                                   # one lead per view
    assert not (masks & ~torch.cat([batch["lead_mask"]] * 2)).any()          # never a lead the record lacks


@pytest.mark.parametrize("mode", ["cmsc", "cmlc", "cmsmlc"])
def test_clocs_views_reach_a_lead_aware_encoder_with_their_leads(mode):
    """A CMLC view is one lead: a lead-aware encoder gets that lead alone as its mask (it made 12 lead tokens, 11 of
    them zero, while the online probe and downstream features encode present leads only); a CMSC view gets its
    record's leads; lead_aware=False keeps the zero-padded input."""
    spy = _SpyViT()
    m = CLOCSModule(spy, mode=mode, view_leads=("II", "V2"))
    batch = synthetic_batch(b=4)
    loss, _ = m.shared_step(batch)
    assert torch.isfinite(loss)
    _, valid = m.views(batch)
    rows = spy.masks[-1]                      # the views the loss reads (rows_only: the others skip the encoder)
    assert rows.shape[0] == int(valid.sum())
    masks = torch.zeros(valid.numel(), 12, dtype=torch.bool)
    masks[valid.flatten()] = rows
    masks = masks.reshape(-1, 4, 12)
    lead_mask = batch["lead_mask"]
    for v in range(masks.shape[0]):
        for b in range(4):
            if not valid[v, b]:
                continue
            if mode == "cmsc":
                assert torch.equal(masks[v, b], lead_mask[b])
            else:
                assert masks[v, b].sum() == 1 and lead_mask[b][masks[v, b]].all()
    spy.masks.clear()
    CLOCSModule(spy, mode=mode, view_leads=("II", "V2"), lead_aware=False).shared_step(batch)
    assert spy.masks[-1] is None


def test_pretext_recipes_do_not_stretch_views_in_time():
    """Pretext rhythm targets describe unstretched beats: the pretext experiments (synthetic ones too) set
    p_crop=0, and a module built with both is warned."""
    from hydra import compose, initialize_config_dir

    from ecgfm.conf import config_dir

    for exp in ("simclr_cnn_hc", "simclr_cnn_hcc", "simclr_cnn_hc1l", "simclr_cnn_hc_cpu30"):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[f"+experiment={exp}"])
        assert cfg.method.aux_targets and float(cfg.method.p_crop) == 0.0, exp
    with pytest.warns(UserWarning, match="p_crop"):
        SimCLRModule(TinyBackbone(), aux_targets="handcrafted", aux_dim=3, p_crop=0.8)


@pytest.mark.parametrize("method", ["simclr", "clocs", "crema"])
def test_methods_hand_the_batch_recordings_to_the_loss(method, monkeypatch):
    """Each contrastive method passes the batch's recording ids (``index``) to its loss, so a recording drawn
    twice in one batch (the sampler draws with replacement) is not its own negative."""
    import ecgfm.methods.clocs as clocs_mod
    import ecgfm.methods.crema as crema_mod
    import ecgfm.methods.simclr as simclr_mod
    from ecgfm.backbones import create_backbone

    seen = []
    mod, name = {"simclr": (simclr_mod, "nt_xent"), "clocs": (clocs_mod, "clocs_loss"),
                 "crema": (crema_mod, "nt_xent")}[method]
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **kw: seen.append(kw.get("record")) or real(*a, **kw))
    batch = synthetic_batch(b=6)
    batch["index"] = torch.tensor([4, 9, 4, 1, 2, 3])
    if method == "crema":
        m = crema_mod.CREMAModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                                  contrastive_weight=1.0)
        batch = {"x": torch.randn(6, 12, 250), "lead_mask": torch.ones(6, 12, dtype=torch.bool),
                 "index": batch["index"]}
    else:
        m = SimCLRModule(TinyBackbone()) if method == "simclr" else CLOCSModule(TinyBackbone())
    m.shared_step(batch)
    assert len(seen) == 1 and torch.equal(seen[0], batch["index"])


@pytest.mark.parametrize("mode", ["cmsc", "cmsmlc"])
def test_clocs_zero_padding_segment_is_not_a_view(mode):
    """The adjacent segment of a record shorter than two crops is zero padding: not a view (all-zero segments of
    different recordings would otherwise be perfect positives / negatives of each other)."""
    batch = synthetic_batch(b=4, absent=False)
    batch["x2"][0] = 0.0
    m = CLOCSModule(TinyBackbone(), mode=mode)
    xv, mask = m.views(batch)
    v = mask.shape[0] // 2
    assert not mask[v:, 0].any() and mask[:v, 0].all() and mask[:, 1:].all()


def test_simclr_validation_views_are_fixed_without_an_aug_seed():
    """With aug_seed=None (the config default) validation views came from the global RNG, which the pipeline
    reseeds from the step: every epoch validated on other views, so val/loss did not compare between epochs."""
    from ecgfm.backbones import create_backbone
    from ecgfm.methods.simclr import SimCLRModule

    m = SimCLRModule(create_backbone("resnet1d_test"), aug_seed=None).eval()
    batch = {"x": torch.randn(3, 12, 250)}
    m.on_validation_epoch_start()
    a = m.views(batch)
    torch.manual_seed(123)                     # another step's reseed
    m.on_validation_epoch_start()
    b = m.views(batch)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    m.train()
    torch.manual_seed(1)
    c = m.views(batch)
    torch.manual_seed(2)
    assert not torch.equal(c[0], m.views(batch)[0])   # training views: the global RNG, as before
