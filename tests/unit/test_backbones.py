"""Backbone contract over every registered backbone, and ViT-1D specifics (ids_keep, grid, attention maps)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ecgfm.backbones import create_backbone, list_backbones
from ecgfm.backbones.resnet1d import XResNet1d
from ecgfm.backbones.vit1d import ViT1D, sincos_1d



# Big sizes run on a short input and a batch of one; the big ViTs with depth 1 (their width, heads and default
# depth are checked in test_vit_size_table without building 85 M parameters twice).
BIG = {"vit1d_small", "vit1d_base", "xresnet1d101"}


def _kwargs(name: str) -> dict:
    if name == "vit1d_test" or not name.startswith("vit"):
        return {}
    return dict(seq_len=100, patch_size=25, **({"depth": 1} if name in BIG else {}))


def test_registry_lists_the_documented_names():
    names = set(list_backbones())
    assert {"vit1d_test", "vit1d_tiny", "vit1d_small", "vit1d_base", "resnet1d_test", "resnet1d_tiny",
            "xresnet1d50", "xresnet1d101"} <= names
    with pytest.raises(KeyError, match="unknown backbone"):
        create_backbone("no_such_backbone")


@pytest.mark.parametrize("name", [n for n in list_backbones() if n.endswith("_test")])
def test_layer_ids_cover_every_parameter(name):
    # layer-wise lr decay (MAE / BEiT rule): ids in [0, num_layer_ids], the head is num_layer_ids, the last block /
    # stage is one decay step below it (never two), only what runs after them (a ViT's final norm) shares its level
    model = create_backbone(name)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert set(ids.values()) <= set(range(model.num_layer_ids + 1))
    assert min(ids.values()) == 0 and model.num_layer_ids - 1 in ids.values()
    assert all(not n.startswith(("blocks.", "stages.")) for n, i in ids.items() if i == model.num_layer_ids)


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_follows_the_contract(name):
    torch.manual_seed(0)
    kwargs = _kwargs(name)
    model = create_backbone(name, **kwargs).eval()
    assert model.name == name
    # init_args: every constructor argument, resolved (the given kwargs win over the size defaults)
    ctor = inspect.signature(type(model).__init__).parameters
    assert set(model.init_args) == set(ctor) - {"self"}
    assert {k: model.init_args[k] for k in kwargs} == kwargs
    json.dumps(model.init_args)  # JSON-able
    t = 100 if name.startswith("vit") and name != "vit1d_test" else 250
    x = torch.randn(1 if name in BIG else 2, 12, t)
    with torch.no_grad():
        feats = model.forward_features(x)
        emb = model.embed(x)
        out = model(x)
    assert emb.shape == (x.shape[0], model.num_features)
    assert torch.equal(emb, out)
    assert torch.isfinite(emb).all()
    assert feats.ndim == 3 and feats.shape[0] == x.shape[0]
    # rebuilt from name + init_args: same architecture (same parameter shapes)
    clone = create_backbone(model.name, **model.init_args)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["vit1d_test", "resnet1d_test"])
def test_wrong_number_of_leads_is_a_clear_error(name):
    model = create_backbone(name)
    with pytest.raises(ValueError, match="12 leads"):
        model.embed(torch.randn(2, 8, 250))
    with pytest.raises(ValueError, match="batch, leads, samples"):
        model.embed(torch.randn(12, 250))


def test_vit_rejects_bad_lengths():
    model = create_backbone("vit1d_test")  # seq_len 250, patch 25
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.embed(torch.randn(1, 12, 240 + 7))
    with pytest.raises(ValueError, match="at most seq_len"):
        model.embed(torch.randn(1, 12, 275))
    assert model.embed(torch.randn(1, 12, 100)).shape == (1, 16)  # shorter multiple: fine


def test_vit_size_table():
    from ecgfm.backbones.vit1d import VIT_SIZES

    assert VIT_SIZES["vit1d_small"] == dict(embed_dim=384, depth=12, num_heads=6)   # ST-MEM ViT-S
    assert VIT_SIZES["vit1d_base"] == dict(embed_dim=768, depth=12, num_heads=12)   # ST-MEM ViT-B
    m = create_backbone("vit1d_small", depth=1)
    assert (m.seq_len, m.patch_size, m.num_leads, m.num_features) == (2250, 75, 12, 384)


def test_test_sizes_are_tiny():
    for name in ("vit1d_test", "resnet1d_test"):
        n = sum(p.numel() for p in create_backbone(name).parameters())
        assert n < 10_000, (name, n)


def test_xresnet_sizes_match_the_ptbxl_baseline():
    # Strodthoff et al. 2020 report about 0.9 M (xresnet1d50) and 1.8 M (xresnet1d101) parameters.
    n50 = sum(p.numel() for p in create_backbone("xresnet1d50").parameters())
    n101 = sum(p.numel() for p in create_backbone("xresnet1d101").parameters())
    assert 0.8e6 < n50 < 1.0e6 and 1.7e6 < n101 < 1.9e6
    m = create_backbone("xresnet1d50")
    assert isinstance(m, XResNet1d) and m.num_features == 2 * 256  # concat pooling
    assert create_backbone("resnet1d_test", pool="avg").num_features == 16


def test_resnet_concat_pooling_is_avg_and_max():
    model = create_backbone("resnet1d_test").eval()
    x = torch.randn(3, 12, 250)
    with torch.no_grad():
        f = model.forward_features(x)
        e = model.embed(x)
    c = f.shape[1]
    torch.testing.assert_close(e[:, :c], f.mean(-1))
    torch.testing.assert_close(e[:, c:], f.amax(-1))


def test_sincos_table():
    table = sincos_1d(5, 8)
    assert table.shape == (5, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(table[3, 0], torch.sin(torch.tensor(3.0)))
    with pytest.raises(ValueError):
        sincos_1d(5, 7)


@pytest.fixture
def vit() -> ViT1D:
    torch.manual_seed(0)
    return create_backbone("vit1d_test").eval()


def test_vit_token_layout_and_grid(vit):
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    n = 250 // 25
    assert tokens.shape == (2, 12 * n + 24, 16)
    grid = vit.tokens_to_grid(tokens)
    assert grid.shape == (2, 16, 12, n)
    # grid[b, :, lead, patch] is token lead * n + patch
    torch.testing.assert_close(grid[1, :, 3, 4], tokens[1, 3 * n + 4])
    torch.testing.assert_close(vit.embed(x), tokens[:, : 12 * n].mean(1))
    with pytest.raises(ValueError, match="full token sequence"):
        vit.tokens_to_grid(tokens[:, 5:])


def test_vit_patchify_is_per_lead(vit):
    x = torch.arange(2 * 12 * 250, dtype=torch.float32).reshape(2, 12, 250)
    p = vit.patchify(x)
    assert p.shape == (2, 12, 10, 25)
    torch.testing.assert_close(p[1, 7, 3], x[1, 7, 75:100])
    torch.testing.assert_close(vit.unpatchify(p), x)


def test_ids_keep_equals_gathering_the_full_token_sequence(vit):
    """Encoding only the kept patches == gathering those tokens from the full input sequence first."""
    torch.manual_seed(1)
    x = torch.randn(3, 12, 250)
    n_tok = 12 * 10
    ids_keep = torch.stack([torch.randperm(n_tok)[:30] for _ in range(3)])
    with torch.no_grad():
        fast = vit.forward_features(x, ids_keep=ids_keep)
        full_in = vit.embed_tokens(x)                                            # (B, L*N + 2L, D)
        gathered = torch.cat([torch.gather(full_in[:, :n_tok], 1, ids_keep[..., None].expand(-1, -1, 16)),
                              full_in[:, n_tok:]], dim=1)
        ref = gathered
        for blk in vit.blocks:
            ref = blk(ref)
        ref = vit.norm(ref)
    assert fast.shape == (3, 30 + 24, 16)
    torch.testing.assert_close(fast, ref)
    # keeping everything (in a permuted order) permutes the patch tokens of the plain forward pass
    perm = torch.stack([torch.randperm(n_tok) for _ in range(3)])
    with torch.no_grad():
        all_kept = vit.forward_features(x, ids_keep=perm)
        plain = vit.forward_features(x)
    torch.testing.assert_close(all_kept[:, :n_tok], torch.gather(plain[:, :n_tok], 1, perm[..., None].expand(-1, -1, 16)),
                               atol=1e-5, rtol=1e-5)


def test_attention_maps_shape_rows_and_consistency(vit):
    x = torch.randn(2, 12, 250)
    maps = vit.attention_maps(x)
    n_tok = 12 * 10 + 24
    assert len(maps) == len(vit.blocks)
    for a in maps:
        assert a.shape == (2, 2, n_tok, n_tok)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, n_tok))
        assert (a >= 0).all()
    # the explicit probabilities reproduce the fused attention output of the first block
    blk = vit.blocks[0]
    with torch.no_grad():
        h = blk.norm1(vit.embed_tokens(x))
        v = blk.attn.qkv(h).reshape(2, n_tok, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
        manual = blk.attn.proj((maps[0] @ v).transpose(1, 2).reshape(2, n_tok, 16))
        torch.testing.assert_close(manual, blk.attn(h), atol=1e-5, rtol=1e-4)


def test_vit_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = create_backbone("vit1d_test", drop_path=0.1).train()
    model.embed(torch.randn(2, 12, 250)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_attention_maps_keep_gradients(vit):
    x = torch.randn(1, 12, 250, requires_grad=True)
    maps = vit.attention_maps(x)
    maps[-1][0, :, 0, 5].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not vit.attention_maps(x)[0].requires_grad


# ---------------------------------------------------------------------- lead-set-agnostic ViT (issue 12, item 1)
def _today(vit: ViT1D, x: torch.Tensor) -> torch.Tensor:
    """Today's code path, written out: every lead a token, mean of all patch tokens."""
    tokens = vit.embed_tokens(x)
    for blk in vit.blocks:
        tokens = blk(tokens)
    tokens = vit.norm(tokens)
    return tokens[:, : tokens.shape[1] - 2 * vit.num_leads].mean(1)


def test_vit_full_lead_mask_is_bit_identical_to_no_mask(vit):
    torch.manual_seed(2)
    x = torch.randn(4, 12, 250)
    ones = torch.ones(4, 12, dtype=torch.bool)
    with torch.no_grad():
        ref = _today(vit, x)
        assert torch.equal(vit.embed(x), ref)
        assert torch.equal(vit.embed(x, lead_mask=ones), ref)
        assert torch.equal(vit(x), ref)
        assert torch.equal(vit.forward_features(x, lead_mask=ones), vit.forward_features(x))
    assert ViT1D.accepts_lead_mask is True
    assert "lead_mask" in inspect.signature(vit.embed).parameters


def test_vit_one_lead_embedding_ignores_absent_leads(vit):
    torch.manual_seed(3)
    x = torch.randn(2, 12, 250)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 0] = True
    other = x.clone()
    other[:, 1:] = torch.randn(2, 11, 250) * 5
    padded = x.clone()
    padded[:, 1:] = 0
    with torch.no_grad():
        a = vit.embed(x, lead_mask=mask)
        assert torch.equal(a, vit.embed(other, lead_mask=mask))
        assert torch.equal(a, vit.embed(padded, lead_mask=mask))
        # zero-padded without the mask is a different (diluted) embedding
        assert not torch.allclose(a, vit.embed(padded), atol=1e-3)
        # == the present lead's tokens (own lead embedding, usual positions, its two SEPs) through the blocks alone
        n = 10
        full = vit.embed_tokens(x)
        sel = torch.cat([torch.arange(n), torch.tensor([12 * n, 12 * n + 12])])
        ref = full[:, sel]
        for blk in vit.blocks:
            ref = blk(ref)
        ref = vit.norm(ref)[:, :n].mean(1)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_vit_mixed_batch_equals_per_record_results(vit):
    torch.manual_seed(4)
    x = torch.randn(6, 12, 250)
    mask = torch.ones(6, 12, dtype=torch.bool)
    mask[1, 1:] = False              # lead I only
    mask[3, :] = False
    mask[3, 1] = True                # lead II only
    mask[4, 6:] = False              # limb leads only
    mask[5, 1:] = False              # lead I only (same set as row 1)
    x = x * mask[:, :, None]
    with torch.no_grad():
        mixed = vit.embed(x, lead_mask=mask)
        single = torch.cat([vit.embed(x[i:i + 1], lead_mask=mask[i:i + 1]) for i in range(6)])
        tokens = vit.forward_features(x, lead_mask=mask)
        single_tok = torch.cat([vit.forward_features(x[i:i + 1], lead_mask=mask[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(mixed, single, atol=1e-5, rtol=1e-5)
    # 12-lead rows of a mixed batch are today's numbers
    torch.testing.assert_close(mixed[[0, 2]], _today(vit, x[[0, 2]]), atol=1e-5, rtol=1e-5)
    # full layout kept: zero tokens at absent leads, pooling the present patch tokens gives embed
    assert tokens.shape == (6, 12 * 10 + 24, 16)
    torch.testing.assert_close(tokens, single_tok, atol=1e-5, rtol=1e-5)
    grid = vit.tokens_to_grid(tokens)                                   # (B, D, L, N)
    assert (grid[1, :, 1:] == 0).all() and (grid[1, :, 0] != 0).any()
    assert (tokens[3, 12 * 10:].abs().sum(-1) != 0).tolist() == [i in (1, 13) for i in range(24)]
    torch.testing.assert_close(grid[4, :, :6].mean((1, 2)), mixed[4], atol=1e-5, rtol=1e-5)


def test_vit_lead_mask_edge_cases(vit):
    x = torch.randn(2, 12, 250)
    none_present = torch.zeros(2, 12, dtype=torch.bool)
    with torch.no_grad():   # a row with no present lead is encoded as today (zeros everywhere), never NaN
        torch.testing.assert_close(vit.embed(x, lead_mask=none_present), vit.embed(x))
    with pytest.raises(ValueError, match="lead_mask"):
        vit.embed(x, lead_mask=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        vit.embed(x, lead_mask=torch.ones(3, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="absent"):   # kept patches of a lead the mask marks absent
        vit.forward_features(x, ids_keep=torch.zeros(2, 3, dtype=torch.long), lead_mask=none_present | (torch.arange(12) == 1))
    # gradients reach the encoder through the lead-aware path
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :2] = True
    vit.embed(x, lead_mask=mask).sum().backward()
    assert vit.patch_embed[1].weight.grad is not None and vit.lead_embed.grad[:2].abs().sum() > 0
    assert vit.lead_embed.grad[2:].abs().sum() == 0
