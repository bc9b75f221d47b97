"""MAE: masking, loss against a slow reference, decoder bookkeeping, absent leads, and learning on sinusoids."""

from __future__ import annotations

import math

import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.losses import masked_patch_mse
from ecgfm.methods.mae import MAEModule, random_masking




def _module(**kwargs) -> MAEModule:
    torch.manual_seed(0)
    defaults = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, warmup_steps=0, max_steps=100)
    return MAEModule(create_backbone("vit1d_test"), **{**defaults, **kwargs})


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("mode", ["global", "per_lead"])
def test_masking_ratio_is_exact_and_per_sample(mode):
    torch.manual_seed(0)
    b, n_leads, n = 6, 12, 10
    ids_keep, ids_restore, mask = random_masking(b, n_leads, n, 0.75, mode)
    keep = int(n_leads * n * 0.25) if mode == "global" else n_leads * int(n * 0.25)
    assert ids_keep.shape == (b, keep) and ids_restore.shape == (b, n_leads * n) and mask.shape == (b, n_leads, n)
    assert (mask.flatten(1).sum(1) == n_leads * n - keep).all()          # exact count in every sample
    assert len({tuple(m.flatten().tolist()) for m in mask}) == b          # different in every sample
    for i in range(b):  # the kept ids are exactly the unmasked positions, without repeats
        assert sorted(ids_keep[i].tolist()) == torch.nonzero(~mask[i].flatten()).flatten().tolist()
        assert sorted(ids_restore[i].tolist()) == list(range(n_leads * n))
    if mode == "per_lead":
        assert (mask.sum(2) == n - int(n * 0.25)).all()                   # same count in every lead


def test_ids_restore_unshuffles():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(3, 4, 5, 0.6)
    grid = torch.arange(20).expand(3, 20)
    kept = torch.gather(grid, 1, ids_keep)
    filler = torch.full((3, 20 - ids_keep.shape[1]), -1)
    restored = torch.gather(torch.cat([kept, filler], 1), 1, ids_restore)
    assert torch.equal(restored == -1, mask.flatten(1))
    assert torch.equal(restored[restored >= 0], grid[restored >= 0])


def test_masking_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 12, 10, 1.0)
    with pytest.raises(ValueError, match="no visible patch"):
        random_masking(2, 1, 3, 0.9)
    with pytest.raises(ValueError, match="mask mode"):
        random_masking(2, 12, 10, 0.5, mode="leads")
    with pytest.raises(ValueError, match="patch-token backbone"):
        MAEModule(create_backbone("resnet1d_test"))


def test_module_refuses_what_would_fail_at_a_random_step():
    """ST-MEM's ViT has every patch attribute but no masked path (a TypeError about ids_keep at the first step);
    a ratio that leaves a one-lead record no visible patch stopped training at the first one-lead subset / record,
    with a message naming the 12-lead grid."""
    from ecgfm.methods.crema import CREMAModule

    for cls in (MAEModule, CREMAModule):
        with pytest.raises(ValueError, match="patch-token backbone"):
            cls(create_backbone("stmem_vit"), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    backbone = create_backbone("vit1d_test")
    n = backbone.num_patches
    with pytest.raises(ValueError, match="one-lead record"):
        MAEModule(backbone, mask_ratio=1 - 0.5 / n, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    MAEModule(backbone, mask_ratio=1 - 1 / n, decoder_dim=16, decoder_depth=1, decoder_heads=2)  # one visible: ok
    # the 12-lead grid of a lead-unaware global mask keeps floor(12 N (1 - r)) >= 1 patches: not refused
    MAEModule(backbone, mask_ratio=1 - 0.5 / n, lead_aware=False, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match=r"of 1 lead\(s\)"):
        random_masking(2, 12, 10, 0.92, leads=torch.tensor([3]))


# ---------------------------------------------------------------- loss
def _reference_loss(pred, target, mask, norm_pix):
    """Slow, obviously-correct loop: mean over masked patches of the per-patch mean squared error."""
    total, count = 0.0, 0
    for idx in torch.nonzero(mask).tolist():
        t = target[tuple(idx)].double()
        if norm_pix:
            m = sum(t.tolist()) / len(t)
            var = sum((v - m) ** 2 for v in t.tolist()) / (len(t) - 1)
            t = (t - m) / math.sqrt(var + 1e-6)
        p = pred[tuple(idx)].double()
        total += sum(((p - t) ** 2).tolist()) / len(t)
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_mse_matches_the_loop(norm_pix):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 4, 5, generator=g)
    target = 3 * torch.randn(2, 3, 4, 5, generator=g) + 1
    mask = torch.rand(2, 3, 4, generator=g) > 0.5
    got = masked_patch_mse(pred, target, mask, norm_pix=norm_pix)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference_loss(pred, target, mask, norm_pix), rel=1e-5)


def test_masked_patch_mse_edge_cases():
    pred = torch.randn(2, 3, 5, requires_grad=True)
    empty = masked_patch_mse(pred, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()  # still attached to the graph
    flat = masked_patch_mse(torch.zeros(1, 1, 4), torch.full((1, 1, 4), 2.0), torch.ones(1, 1, dtype=torch.bool))
    assert flat.item() == 0.0  # a constant patch standardises to zeros, not NaN
    with pytest.raises(ValueError, match="same shape"):
        masked_patch_mse(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_patch_mse(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------- model
def test_forward_shapes_and_no_wasted_tokens():
    m = _module()
    x = torch.randn(2, 12, 250)
    out = m(x)
    n = 10
    keep = int(12 * n * 0.25)
    assert out["pred"].shape == (2, 12, n, 25)
    assert out["mask"].shape == (2, 12, n) and out["mask"].dtype == torch.bool
    assert out["latent"].shape == (2, keep + 24, 16)            # encoder: visible patches + SEP tokens only
    seen = {}

    def record(mod, inp, out):
        seen["shape"] = inp[0].shape

    hook = m.decoder.blocks[0].register_forward_hook(record)
    m(x)
    hook.remove()
    assert seen["shape"] == (2, 12 * n, 16)                      # decoder: patch positions only, no SEP tokens


def test_forward_loss_uses_masked_present_patches_only():
    m = _module()
    x = torch.randn(2, 12, 250)
    pred = torch.randn(2, 12, 10, 25)
    mask = torch.zeros(2, 12, 10, dtype=torch.bool)
    mask[0, 0, 3] = mask[1, 5, 2] = mask[1, 6, 0] = True
    lead_mask = torch.ones(2, 12, dtype=torch.bool)
    lead_mask[1, 6] = False                                      # absent lead: its masked patch does not count
    got = m.forward_loss(x, pred, mask, lead_mask)
    keep = mask & lead_mask[:, :, None]
    assert got.item() == pytest.approx(_reference_loss(pred, m.patchify(x), keep, True), rel=1e-5)


def test_absent_leads_get_no_gradient_through_the_loss():
    m = _module()
    x = torch.randn(2, 12, 250)
    lead_mask = torch.ones(2, 12, dtype=torch.bool)
    lead_mask[:, 4] = False
    out = m(x, lead_mask)
    pred_grad = torch.autograd.grad(out["loss"], out["pred"])[0]
    assert pred_grad[:, 4].abs().sum() == 0 and pred_grad[:, :4].abs().sum() > 0


def test_decoder_per_lead_layout_is_lead_local():
    m = _module(decoder_layout="per_lead", mask_ratio=0.5, mask_mode="per_lead")
    m.eval()
    x = torch.randn(1, 12, 250)
    latent, mask, ids_restore = m.forward_encoder(x, torch.Generator().manual_seed(0))
    visible = latent[:, : m.backbone.num_patch_tokens(latent)].detach().clone().requires_grad_(True)
    pred = m.decoder(visible, ids_restore, 10)
    pred[0, 3].sum().backward()
    # only visible tokens of lead 3 influence lead 3's prediction
    lead_of_kept = torch.gather(torch.arange(120) // 10, 0, ids_restore.argsort(1)[0, : visible.shape[1]])
    touched = visible.grad[0].abs().sum(-1) > 0
    assert torch.equal(touched, lead_of_kept == 3)


@pytest.mark.parametrize("kw", [dict(mask_mode="global"), dict(mask_mode="per_lead", lead_subset_prob=0.5)])
def test_per_lead_decoder_needs_every_lead_to_keep_visible_patches(kw):
    """The lead-wise decoder sees only its lead's visible tokens: the global mask (a whole lead hidden in ~5 % of
    leads at 0.75 on 12 x 10 patches) and lead subsets (dropped leads fully hidden) would leave leads decoded from
    nothing and scored in the loss: refused, naming both settings."""
    with pytest.raises(ValueError, match=r"decoder_layout='per_lead'.*mask_mode='per_lead'.*lead_subset_prob=0"):
        _module(decoder_layout="per_lead", mask_ratio=0.75, **kw)
    _module(decoder_layout="joint", mask_ratio=0.75, **kw)      # the joint decoder reads every lead's tokens


def test_validation_masks_are_fixed_training_masks_are_not():
    m = _module()
    batch = {"x": torch.randn(2, 12, 250), "lead_mask": torch.ones(2, 12, dtype=torch.bool)}
    m.eval()
    with torch.no_grad():
        a, b = m.shared_step(batch)[0], m.shared_step(batch)[0]
    assert a.item() == b.item()
    m.train()
    with torch.no_grad():
        c, d = m.shared_step(batch)[0], m.shared_step(batch)[0]
    assert c.item() != d.item()


def _sinusoids(b: int = 8, t: int = 250, seed: int = 0) -> torch.Tensor:
    """One sinusoid per sample, the same in every lead up to a per-lead gain: masked patches are predictable."""
    g = torch.Generator().manual_seed(seed)
    time = torch.arange(t) / 100.0
    freq = 1.0 + 2.0 * torch.rand(b, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(b, 1, 1, generator=g)
    gain = torch.linspace(0.5, 1.5, 12)[None, :, None]
    return (gain * torch.sin(2 * math.pi * freq * time + phase)).float()


def test_mae_loss_falls_on_sinusoids():
    m = _module(norm_pix_loss=False)
    x = _sinusoids()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        torch.manual_seed(len(losses))
        loss = m(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # (30 steps of a 3 k-parameter model get about as low as predicting zeros, mean(x^2) = 0.55, not below)
    assert last < 0.6 * first, (losses[:3], losses[-3:])


def test_training_step_through_lightning_logs_terms(tmp_path):
    import lightning as L

    m = _module()
    data = [{"x": xi, "lead_mask": torch.ones(12, dtype=torch.bool), "patient": torch.tensor(-1),
             "index": torch.tensor(i)} for i, xi in enumerate(_sinusoids(4))]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                        limit_val_batches=1)
    trainer.fit(m, loader, loader)
    assert {"train/loss", "train/recon", "val/loss", "val/recon"} <= set(trainer.logged_metrics)


def test_bench_train_script_runs_tiny(tmp_path):
    """The training benchmark (scripts/bench_train.py) on a tiny configuration: every method, JSON written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--size", "test", "--seq-len", "250", "--patch-size", "25", "--decoder-dim", "16",
                         "--decoder-depth", "1", "--decoder-heads", "2", "--steps", "2", "--warmup", "1",
                         "--peak-size", "256", "--threads", "1", "--out", str(out),
                         "--methods", "reference,mae_stmem,crema"])
    assert json.loads(out.read_text())["summary"]["speedup_vs_reference"]["ratio"] > 0
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"reference", "mae_stmem", "crema"}
    for r in rows.values():
        assert r["flops_per_step"] > 0 and r["samples_per_s"] > 0 and 0 < r["mfu"]
    # same architecture (ecgfm's decoder adds its own lead embeddings: 12 x decoder width)
    assert abs(rows["reference"]["params"] - rows["mae_stmem"]["params"]) < 0.05 * rows["mae_stmem"]["params"]
    # the ST-MEM-style step does more work (all patches embedded, SEP tokens through the decoder)
    assert rows["reference"]["flops_per_step"] > rows["mae_stmem"]["flops_per_step"]


@pytest.mark.parametrize("layout, mode, depth", [("joint", "global", 2), ("per_lead", "per_lead", 2),
                                                 ("joint", "per_lead", 1)])
def test_training_loss_decodes_only_counted_patches_with_the_same_loss_and_gradients(layout, mode, depth):
    """reconstruction_loss (last decoder block and head on the counted rows only) == the full forward's loss."""
    # lead_aware=False: the whole batch is one group, so forward_encoder(x) below encodes what forward does (with
    # lead_aware the forward pass groups by lead set as shared_step: tests/unit/test_lead_layout_review_s16.py)
    m = _module(decoder_layout=layout, mask_mode=mode, decoder_depth=depth, lead_aware=False).train()
    x = torch.randn(3, 12, 250, generator=torch.Generator().manual_seed(1))
    lead_mask = torch.ones(3, 12, dtype=torch.bool)
    lead_mask[1, 3:] = False                                           # a partly absent record
    gen = lambda: torch.Generator().manual_seed(7)                     # noqa: E731 - same masks both ways
    full = m(x, lead_mask, gen())["loss"]
    g_full = torch.autograd.grad(full, [p for p in m.parameters() if p.requires_grad], allow_unused=True)
    latent, mask, ids_restore = m.forward_encoder(x, gen())
    fast = m.reconstruction_loss(x, latent, mask, ids_restore, lead_mask)
    g_fast = torch.autograd.grad(fast, [p for p in m.parameters() if p.requires_grad], allow_unused=True)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-7)
    for (name, _), a, b in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad], g_fast, g_full):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    # the decoder's row path returns exactly the full prediction at those rows
    rows = (mask & lead_mask[:, :, None]).reshape(-1).nonzero().squeeze(1)
    k = m.backbone.num_patch_tokens(latent)
    pred_full = m.decoder(latent[:, :k], ids_restore, mask.shape[2])
    pred_rows = m.decoder(latent[:, :k], ids_restore, mask.shape[2], rows=rows)
    torch.testing.assert_close(pred_rows, pred_full.reshape(-1, pred_full.shape[-1])[rows], rtol=1e-5, atol=1e-6)
    assert pred_rows.shape[0] < pred_full.shape[0] * 12 * pred_full.shape[2] * 0.8   # hidden and present only
    # shared_step uses this path
    assert torch.isfinite(m.shared_step({"x": x, "lead_mask": lead_mask})[0])


def test_training_loss_with_stochastic_depth_falls_back_to_the_full_decoder():
    m = _module()
    m.decoder.blocks[-1].drop_path2 = torch.nn.Dropout(0.0)            # not Identity: no row shortcut
    x = torch.randn(2, 12, 250)
    latent, mask, ids_restore = m.forward_encoder(x, torch.Generator().manual_seed(3))
    fast = m.reconstruction_loss(x, latent, mask, ids_restore)
    torch.testing.assert_close(fast, m.forward_loss(x, m.forward_decoder(latent, ids_restore, mask.shape[2]), mask))


# ---------------------------------------------------------------------- random lead subsets (issue 12, item 1)
@pytest.mark.parametrize("mode", ["global", "per_lead"])
def test_masking_restricted_to_a_lead_subset(mode):
    leads = torch.tensor([1, 4, 7])
    ids_keep, ids_restore, mask = random_masking(5, 12, 10, 0.6, mode, leads=leads)
    assert ids_keep.shape == (5, 3 * 4)                       # int(3 * 10 * 0.4) = int(10 * 0.4) * 3 = 12
    assert torch.isin(ids_keep // 10, leads).all()
    out = torch.ones(12, dtype=torch.bool)
    out[leads] = False
    assert mask[:, out].all() and (~mask).sum((1, 2)).eq(12).all()
    flat = torch.zeros(5, 120, dtype=torch.bool)
    flat.scatter_(1, ids_keep, True)
    assert torch.equal(flat, ~mask.reshape(5, 120))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(120).expand(5, -1))


def test_vit_ids_keep_with_a_lead_subset_encodes_only_those_leads():
    torch.manual_seed(0)
    vit = create_backbone("vit1d_test").eval()
    x = torch.randn(3, 12, 250)
    leads = torch.tensor([0, 5])
    ids_keep, _, _ = random_masking(3, 12, 10, 0.5, leads=leads)
    subset = torch.zeros(3, 12, dtype=torch.bool)
    subset[:, leads] = True
    with torch.no_grad():
        out = vit.forward_features(x, ids_keep=ids_keep, lead_mask=subset)
        other = x.clone()
        other[:, 1:5] = 7.0
        assert torch.equal(out, vit.forward_features(other, ids_keep=ids_keep, lead_mask=subset))
        full_in = vit.embed_tokens(x, ids_keep)                                   # (B, K + 2L, D)
        k = ids_keep.shape[1]
        sel = torch.cat([torch.arange(k), k + leads, k + 12 + leads])
        ref = full_in[:, sel]
        for blk in vit.blocks:
            ref = blk(ref)
        ref = vit.norm(ref)
    assert out.shape == (3, k + 24, 16)
    torch.testing.assert_close(out[:, sel], ref, atol=1e-5, rtol=1e-5)
    rest = torch.ones(k + 24, dtype=torch.bool)
    rest[sel] = False
    assert (out[:, rest] == 0).all()
    with pytest.raises(ValueError, match="absent"):
        bad = subset.clone()
        bad[:, 5] = False
        vit.forward_features(x, ids_keep=ids_keep, lead_mask=bad)


def test_mae_lead_subset_augmentation_trains_and_is_off_by_default_and_in_eval():
    torch.manual_seed(0)
    m = _module(lead_subset_prob=1.0)
    x = torch.randn(4, 12, 250)
    batch = {"x": x, "lead_mask": torch.ones(4, 12, dtype=torch.bool)}
    m.train()
    seen = set()
    for _ in range(6):
        leads = m.draw_lead_subset(12)
        assert leads is not None and 1 <= len(leads) <= 12
        seen.add(len(leads))
    assert len(seen) > 1
    loss, _ = m.shared_step(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert m.backbone.patch_embed[1].weight.grad is not None
    m.eval()
    assert m.draw_lead_subset(12) is None
    off = _module()
    off.load_state_dict(m.state_dict())
    off.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.shared_step(batch)[0], off.shared_step(batch)[0], atol=0, rtol=0)
    off.train()
    assert off.lead_subset_prob == 0 and off.draw_lead_subset(12) is None
    with pytest.raises(ValueError, match="lead_subset_prob"):
        _module(lead_subset_prob=1.5)


def test_lead_aware_mae_encodes_each_lead_set_over_its_present_leads_only():
    """A batch mixing 12-lead and one-lead rows: every visible patch lies in a present lead, absent leads are not
    encoded, and the loss is the counted-patch-weighted mean of the per-group losses (= the loss of the batch)."""
    from ecgfm.backbones import create_backbone
    from ecgfm.methods.mae import MAEModule

    torch.manual_seed(0)
    m = MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                  warmup_steps=0, max_steps=10)
    m.train()
    x = torch.randn(4, 12, 250)
    lead_mask = torch.ones(4, 12, dtype=torch.bool)
    lead_mask[2:, 1:] = False                                   # rows 2, 3: lead I only (zero-filled elsewhere)
    x = x * lead_mask[:, :, None]
    batch = {"x": x, "lead_mask": lead_mask}
    groups = m.lead_set_groups(batch)
    assert sorted(len(leads) for _, leads in groups) == [1, 12]
    torch.manual_seed(5)
    loss, _ = m.shared_step(batch)
    torch.manual_seed(5)
    losses, counts = [], []
    for rows, leads in groups:
        lat, mask, restore = m.forward_encoder(x[rows], present=leads)
        if len(leads) == 1:                                     # one lead: N/4 visible patches, all in lead I
            assert lat.shape[1] - 24 == int(10 * 0.25)
            assert mask[:, 1:].all()
        losses.append(m.forward_loss(x[rows], m.forward_decoder(lat, restore, 10), mask, lead_mask[rows]))
        counts.append((mask & lead_mask[rows][:, :, None]).sum())
    w = torch.stack(counts).float()
    torch.testing.assert_close(loss, (torch.stack(losses) * w).sum() / w.sum())
    loss.backward()
    # the same batch without lead_aware encodes zero leads: a different (and dearer) computation
    m.lead_aware = False
    assert len(m.lead_set_groups(batch)) == 1


def test_lead_aware_is_bit_identical_when_every_lead_is_present():
    from ecgfm.backbones import create_backbone
    from ecgfm.methods.mae import MAEModule

    batch = {"x": torch.randn(3, 12, 250), "lead_mask": torch.ones(3, 12, dtype=torch.bool)}
    out = []
    for aware in (True, False):
        torch.manual_seed(0)
        m = MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                      warmup_steps=0, max_steps=10, lead_aware=aware, lead_subset_prob=0.5)
        m.train()
        torch.manual_seed(3)
        out.append(m.shared_step(batch)[0])
    assert out[0].item() == out[1].item()


def test_lead_subset_without_lead_awareness_is_drawn_from_leads_every_row_has():
    """``lead_aware=False`` with ``lead_subset_prob``: the subset is "l of the present leads" as documented; drawn
    from all 12, half the batches of one-lead records hid every patch of their only lead from the encoder."""
    from ecgfm.backbones import create_backbone
    from ecgfm.methods.mae import MAEModule

    m = MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                  lead_aware=False, lead_subset_prob=1.0).train()
    x = torch.zeros(4, 12, 250)
    x[:, 0] = torch.randn(4, 250)
    lm = torch.zeros(4, 12, dtype=torch.bool)
    lm[:, 0] = True
    drawn = []
    real = m.draw_lead_subset
    m.draw_lead_subset = lambda n, present=None: drawn.append(real(n, present)) or drawn[-1]
    for _ in range(5):
        assert torch.isfinite(m.shared_step({"x": x, "lead_mask": lm})[0])
    assert drawn and all(d.tolist() == [0] for d in drawn)
    lm[0, 0], lm[0, 1] = False, True                     # no lead present in every row: no subset
    drawn.clear()
    m.shared_step({"x": x, "lead_mask": lm})
    assert drawn == []


def test_mask_ratio_keeps_the_exact_number_of_visible_patches():
    """1 - 0.9 and 1 - 0.8 are a hair below 0.1 / 0.2 in floats: a plain int() dropped a patch, so a one-lead crop
    of 10 patches at mask_ratio=0.9 (the documented sweep's last point) kept none and the step failed."""
    from ecgfm.methods.mae import random_masking

    for ratio, n_leads, n_patches, kept in ((0.9, 1, 10, 1), (0.8, 12, 10, 24), (0.9, 12, 10, 12),
                                            (0.75, 12, 10, 30)):
        ids_keep, _, mask = random_masking(2, n_leads, n_patches, ratio)
        assert ids_keep.shape[1] == kept and int((~mask).sum()) == 2 * kept, (ratio, n_leads)
    ids_keep, _, mask = random_masking(2, 12, 10, 0.8, mode="per_lead")
    assert ids_keep.shape[1] == 24 and (~mask).sum(-1).eq(2).all()
