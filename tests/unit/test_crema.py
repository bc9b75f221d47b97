"""CREMA: weight 0 is exactly MAE; the contrastive term is NT-Xent of the projected pooled masked views."""

from __future__ import annotations

import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.losses import nt_xent
from ecgfm.methods.crema import CREMAModule
from ecgfm.methods.mae import MAEModule




DEC = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, warmup_steps=0, max_steps=10)


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lead_mask = torch.ones(b, 12, dtype=torch.bool)
    lead_mask[0, 7:] = False
    return {"x": torch.randn(b, 12, 250, generator=g), "lead_mask": lead_mask,
            "patient": torch.arange(b), "index": torch.arange(b)}


def _pair(weight: float, lead_aware: bool = True) -> tuple[MAEModule, CREMAModule]:
    torch.manual_seed(0)
    mae = MAEModule(create_backbone("vit1d_test"), lead_aware=lead_aware, **DEC)
    crema = CREMAModule(create_backbone("vit1d_test"), contrastive_weight=weight, lead_aware=lead_aware, **DEC)
    missing, unexpected = crema.load_state_dict(mae.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("projector.") for k in missing)
    return mae, crema


@pytest.mark.parametrize("lead_aware", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_weight_zero_is_exactly_mae(train, lead_aware):
    mae, crema = _pair(0.0, lead_aware)
    mae.train(train)
    crema.train(train)
    batch = _batch()
    torch.manual_seed(123)
    loss_mae, _ = mae.shared_step(batch)
    torch.manual_seed(123)
    loss_crema, terms = crema.shared_step(batch)
    assert loss_crema.item() == loss_mae.item()
    assert set(terms) == {"recon"}
    loss_mae.backward()
    loss_crema.backward()
    crema_params = dict(crema.named_parameters())
    for name, p in mae.named_parameters():
        q = crema_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    assert all(p.grad is None for p in crema.projector.parameters())


def test_positive_weight_adds_the_contrastive_term_of_two_masked_views():
    _, crema = _pair(0.5, lead_aware=False)   # one encoder pass per view over the zero-filled 12-lead grid
    crema.train()
    batch = _batch()
    torch.manual_seed(7)
    loss, terms = crema.shared_step(batch)
    assert set(terms) == {"recon", "contrastive"}
    torch.testing.assert_close(loss.detach(), terms["recon"] + 0.5 * terms["contrastive"])

    # recompute by hand with the same random stream: view 1 (decoded), view 2 (encoded only)
    torch.manual_seed(7)
    lat1, mask1, restore1 = crema.forward_encoder(batch["x"])
    recon = crema.forward_loss(batch["x"], crema.forward_decoder(lat1, restore1, 10), mask1, batch["lead_mask"])
    lat2, mask2, _ = crema.forward_encoder(batch["x"])
    assert not torch.equal(mask1, mask2)                         # independently masked views
    k = crema.backbone.num_patch_tokens(lat1)
    z1 = crema.projector(lat1[:, :k].mean(1))
    z2 = crema.projector(lat2[:, :k].mean(1))
    torch.testing.assert_close(terms["recon"], recon.detach())
    torch.testing.assert_close(terms["contrastive"], nt_xent(z1, z2, temperature=0.1).detach())

    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crema.projector.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="contrastive_weight"):
        CREMAModule(create_backbone("vit1d_test"), contrastive_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        CREMAModule(create_backbone("vit1d_test"), temperature=0.0)


def test_crema_trains_through_lightning(tmp_path):
    import lightning as L

    torch.manual_seed(0)
    module = CREMAModule(create_backbone("vit1d_test"), contrastive_weight=0.1, **DEC)
    data = [{k: v[i] for k, v in _batch(8).items()} for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, loader)
    logged = trainer.logged_metrics
    assert {"train/loss", "train/recon", "train/contrastive"} <= set(logged)
    assert torch.isfinite(logged["train/loss"])
    assert module.hparams["contrastive_weight"] == 0.1 and module.hparams["backbone_name"] == "vit1d_test"


def test_projector_is_the_shared_projection_head():
    from ecgfm.heads import ProjectionHead

    crema = CREMAModule(create_backbone("vit1d_test"), proj_hidden_dim=24, proj_dim=8, **DEC)
    assert isinstance(crema.projector, ProjectionHead)
    # Linear -> BN -> ReLU -> Linear (with bias), no BatchNorm on the output
    kinds = [type(m).__name__ for m in crema.projector.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"] and crema.projector.net[3].bias is not None
    assert crema.projector(torch.randn(5, 16)).shape == (5, 8)
    assert CREMAModule(create_backbone("vit1d_test"), **DEC).projector.net[0].out_features == 16  # default: D


def test_projector_without_batch_norm():
    torch.manual_seed(0)
    crema = CREMAModule(create_backbone("vit1d_test"), contrastive_weight=0.5, proj_batch_norm=False, proj_dim=8,
                        **DEC).train()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in crema.projector.modules())
    loss, terms = crema.shared_step(_batch(b=2))
    assert set(terms) == {"recon", "contrastive"} and torch.isfinite(loss)
    assert crema.hparams["proj_batch_norm"] is False


def test_lead_aware_views_of_a_mixed_batch_meet_in_one_contrastive_loss():
    """Lead-aware CREMA: each lead-set group is masked / encoded over its present leads; the pooled views of all
    groups, back in batch order, form one NT-Xent; the reconstruction is the patch-weighted mean of the groups."""
    _, crema = _pair(0.5)
    crema.train()
    batch = _batch()
    torch.manual_seed(7)
    loss, terms = crema.shared_step(batch)
    torch.testing.assert_close(loss.detach(), terms["recon"] + 0.5 * terms["contrastive"])

    torch.manual_seed(7)
    x, lm = batch["x"], batch["lead_mask"]
    recons, counts, z1, z2 = [], [], torch.zeros(4, 16), torch.zeros(4, 16)
    for rows, leads in crema.backbone.lead_groups(lm):
        xg, mg = x[rows], lm[rows]
        lat1, mask1, restore1 = crema.forward_encoder(xg, present=leads)
        recons.append(crema.forward_loss(xg, crema.forward_decoder(lat1, restore1, 10), mask1, mg))
        counts.append((mask1 & mg[:, :, None]).sum())
        lat2, _, _ = crema.forward_encoder(xg, present=leads)
        k = crema.backbone.num_patch_tokens(lat1)
        z1[rows], z2[rows] = lat1[:, :k].mean(1), lat2[:, :k].mean(1)
    w = torch.stack(counts).float()
    torch.testing.assert_close(terms["recon"], ((torch.stack(recons) * w).sum() / w.sum()).detach())
    want = nt_xent(crema.projector(z1), crema.projector(z2), temperature=0.1)
    torch.testing.assert_close(terms["contrastive"], want.detach())


@pytest.mark.parametrize("weight", [0.0, 0.1])
def test_every_trainable_parameter_gets_a_gradient(weight):
    """DDP with find_unused_parameters=False (Lightning's ``strategy: ddp``) fails on its second step when a
    parameter that requires grad takes no part in the loss: with weight 0 that was the whole projector."""
    _, crema = _pair(weight)
    crema.train()
    loss, _ = crema.shared_step(_batch())
    loss.backward()
    unused = [n for n, p in crema.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert all(p.requires_grad for p in crema.projector.parameters()) == (weight > 0)
