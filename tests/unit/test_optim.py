"""ecgfm.optim: parameter groups, layer-wise lr decay from the backbone, warm-up cosine schedule, AdamW.

The references below are the two implementations ecgfm.optim replaced (pretraining's ``param_groups_no_decay`` /
``warmup_cosine`` in methods/base.py and fine-tuning's ``layer_ids`` / ``param_groups`` / schedule in
evaluate/finetune.py), kept verbatim so that the groups, the learning rate at every step and the parameters after
AdamW steps are checked to be exactly what they were.
"""

from __future__ import annotations

import math
import re
import types

import pytest
import torch
from torch import nn

from ecgfm.backbones import create_backbone, list_backbones
from ecgfm.evaluate.finetune import FINETUNE_NO_DECAY_NAMES, FinetuneModule
from ecgfm.methods.mae import MAEModule
from ecgfm.optim import NO_DECAY_NAMES, adamw, layer_of, lightning_optimizers, param_groups, warmup_cosine

TEST_BACKBONES = [n for n in list_backbones() if n.endswith("_test")]


# ------------------------------------------------------------------------------------------ references (old code)
def _ref_param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    skip: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, norm_types + (nn.Embedding,)):
            skip.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(name)
        else:
            decay.append(name)
    return [{"names": decay, "weight_decay": weight_decay}, {"names": no_decay, "weight_decay": 0.0}]


def _ref_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    names = [n for n, _ in backbone.named_parameters()]
    if hasattr(backbone, "blocks") and isinstance(getattr(backbone, "blocks"), nn.ModuleList):
        depth = len(backbone.blocks)
        ids = {}
        for n in names:
            m = re.match(r"blocks\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (depth + 1 if n.startswith("norm") else 0)
        # MAE's param_groups_lrd: num_layers = depth + 1, the final norm and the head share it (scale 1)
        return ids, depth + 1
    if hasattr(backbone, "stages") and isinstance(getattr(backbone, "stages"), nn.Sequential):
        n_stages = len(backbone.stages)
        ids = {}
        for n in names:
            m = re.match(r"stages\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (0 if n.startswith("stem") else n_stages + 1)
        # the head is one decay step above the last stage: nothing of an XResNet / Net1D follows its stages
        assert max(ids.values()) == n_stages
        return ids, n_stages + 1
    return {n: 0 for n in names}, 1


def _ref_finetune_groups(backbone, head, lr, weight_decay, layer_decay) -> list[dict]:
    ids, top = _ref_layer_ids(backbone)
    groups: dict = {}

    def add(name, p, layer):
        if not p.requires_grad:
            return
        decay = p.ndim > 1 and name.rsplit(".", 1)[-1] not in FINETUNE_NO_DECAY_NAMES   # lead_embed: no decay
        g = groups.setdefault((layer, decay), {"params": [], "names": [], "weight_decay": weight_decay if decay
                                               else 0.0, "lr_scale": layer_decay ** (top - layer)})
        g["params"].append(p)
        g["names"].append(name)

    for n, p in backbone.named_parameters():
        add(f"backbone.{n}", p, ids[n])
    for n, p in head.named_parameters():
        add(f"head.{n}", p, top)
    out = []
    for (layer, _), g in sorted(groups.items()):
        g["lr"] = lr * g["lr_scale"]
        g["layer"] = layer
        out.append(g)
    return out


def _ref_finetune_schedule(step: int, warm: int, total: int) -> float:
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _key(groups: list[dict]) -> list[tuple]:
    return sorted((tuple(sorted(g["names"])), g["weight_decay"], g.get("lr"), g.get("lr_scale"), g.get("layer"))
                  for g in groups)


def _finetune_module(name: str, head: str = "linear", layer_decay: float = 0.75, **kw) -> FinetuneModule:
    torch.manual_seed(0)
    extra = {"depth": 2} if name.startswith("vit1d") else {}
    return FinetuneModule(create_backbone(name, **extra), 3, True, lr=3e-4, weight_decay=0.05,
                          layer_decay=layer_decay, head=head, **kw)


def _attach_trainer(module: FinetuneModule, total: int, epochs: int) -> None:
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=total, max_epochs=epochs)


# ----------------------------------------------------------------------------------------------- parameter groups
class _TinyBackbone(nn.Module):
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 8, 5, padding=2)
        self.norm = nn.LayerNorm(8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, 1))
        self.lead_table = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 8)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _TinyBackbone()
        self.dec = nn.Linear(8, 12)


def test_param_groups_exclude_norms_biases_embeddings():
    model = _Model()
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]   # decayed first: old optimiser checkpoints load
    assert set(groups[0]["names"]) == {"backbone.conv.weight", "backbone.proj.weight", "dec.weight"}
    assert set(groups[1]["names"]) == {"backbone.conv.bias", "backbone.norm.weight", "backbone.norm.bias",
                                       "backbone.pos_embed", "backbone.lead_table.weight", "backbone.proj.bias",
                                       "dec.bias"}
    assert all("lr" not in g and "layer" not in g for g in groups)
    model.backbone.conv.weight.requires_grad_(False)
    assert "backbone.conv.weight" not in {n for g in param_groups(model, 0.05) for n in g["names"]}


def test_param_groups_honour_no_weight_decay_and_shared_parameters():
    model = _Model()
    model.backbone.no_weight_decay = lambda: {"proj.weight"}
    model.tied = model.dec   # the same parameters under a second name are grouped once
    names = [n for g in param_groups(model, 0.1) for n in g["names"]]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert "backbone.proj.weight" in param_groups(model, 0.1)[1]["names"]


@pytest.mark.parametrize("model", ["mae_vit1d_test", "tiny_with_embedding_table"])
def test_pretraining_groups_equal_the_old_rule(model):
    module = MAEModule(create_backbone("vit1d_test")) if model == "mae_vit1d_test" else _Model()
    new = param_groups(module, 0.05)
    old = [g for g in _ref_param_groups_no_decay(module, 0.05) if g["names"]]
    assert [(g["names"], g["weight_decay"]) for g in new] == [(g["names"], g["weight_decay"]) for g in old]


def test_layer_ids_come_from_the_backbone():
    vit = create_backbone("vit1d_test", depth=2)
    assert vit.num_layer_ids == 3   # the head's level, which the final norm shares (MAE / BEiT)
    assert vit.layer_id("patch_embed.1.weight") == 0 and vit.layer_id("lead_embed") == 0
    assert vit.layer_id("blocks.1.attn.qkv.weight") == 2 and vit.layer_id("norm.weight") == 3
    cnn = create_backbone("resnet1d_test")
    assert cnn.num_layer_ids == 3 and cnn.layer_id("stem.0.0.weight") == 0
    assert max(cnn.layer_id(n) for n, _ in cnn.named_parameters()) == 2   # per-stage decay
    module = FinetuneModule(cnn, 3, True, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lrs = {g["layer"]: g["lr"] for g in param_groups(module, 0.1, lr=1.0, layer_decay=0.5,
                                                     no_decay_names=FINETUNE_NO_DECAY_NAMES)}
    assert lrs == pytest.approx({3: 1.0, 2: 0.5, 1: 0.25, 0: 0.125})   # the last stage: one decay step below the head

    layer, top = layer_of(types.SimpleNamespace(backbone=_TinyBackbone()))   # no layer ids: one layer
    assert top == 1 and layer("backbone.conv.weight") == 0 and layer("head.weight") == 1


@pytest.mark.parametrize("stable", [False, True])
def test_hubert_final_layer_norm_sits_where_it_runs(stable):
    """HuBERT's shared ``layer_norm`` runs on the input (post-norm: layer 0) or after the last block (pre-norm,
    ``do_stable_layer_norm``: the head's level, as a ViT's final norm in MAE / BEiT)."""
    hub = create_backbone("hubert_ecg", num_hidden_layers=3, do_stable_layer_norm=stable)
    assert hub.layer_id("blocks.2.fc2.weight") == 3 and hub.layer_id("pos_conv_g") == 0
    assert hub.layer_id("layer_norm.weight") == (4 if stable else 0)
    assert hub.num_layer_ids == 4


def test_layer_wise_decay_groups():
    module = _finetune_module("vit1d_test", layer_decay=0.5)
    groups = param_groups(module, 0.1, lr=1.0, layer_decay=0.5, no_decay_names=FINETUNE_NO_DECAY_NAMES)
    by_layer = {(g["layer"], g["weight_decay"] > 0): g for g in groups}
    assert by_layer[(3, True)]["lr"] == pytest.approx(1.0)   # the head
    assert by_layer[(3, False)]["names"][:2] == ["backbone.norm.weight", "backbone.norm.bias"]   # its level
    assert by_layer[(2, True)]["lr"] == pytest.approx(0.5)    # the last block: one decay step below the head
    assert by_layer[(0, True)]["lr"] == pytest.approx(0.5 ** 3)
    assert all(p.ndim == 1 or n.rsplit(".", 1)[-1] in FINETUNE_NO_DECAY_NAMES
               for g in groups if g["weight_decay"] == 0 for n, p in zip(g["names"], g["params"]))
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in module.parameters())
    with pytest.raises(ValueError, match="lr"):
        param_groups(module, 0.1, layer_decay=0.5)


@pytest.mark.parametrize("name", TEST_BACKBONES)
@pytest.mark.parametrize("head,layer_decay,freeze", [("linear", 0.75, False), ("mlp", 1.0, False),
                                                     ("linear", 0.5, True)])
def test_finetune_groups_equal_the_old_rule(name, head, layer_decay, freeze):
    module = _finetune_module(name, head=head, layer_decay=layer_decay, freeze_backbone=freeze)
    _attach_trainer(module, 20, 4)
    opt = module.configure_optimizers()["optimizer"]
    name_of = {id(p): n for n, p in module.named_parameters()}
    new = [dict(g, names=[name_of[id(p)] for p in g["params"]], lr=g["initial_lr"]) for g in opt.param_groups]
    old = _ref_finetune_groups(module.backbone, module.head, 3e-4, 0.05, layer_decay)
    assert _key(new) == _key(old)


# ----------------------------------------------------------------------------------------------------- schedules
def test_warmup_cosine_values():
    assert warmup_cosine(0, 0, 10) == 1.0
    assert warmup_cosine(5, 0, 10) == pytest.approx(0.5)
    assert warmup_cosine(3, 10, 10) == pytest.approx(4 / 11)
    assert warmup_cosine(100, 0, 10) == 0.0
    assert warmup_cosine(12, 10, 10) == 1.0   # no room for a decay: stays at the peak


@pytest.mark.parametrize("warm,total", [(0, 1), (0, 10), (3, 10), (9, 10), (10, 10), (12, 10), (37, 400)])
def test_schedule_equals_the_old_finetune_schedule_on_every_step(warm, total):
    # every step a run takes (0 .. total - 1) has exactly the old multiplier
    assert [warmup_cosine(s, warm, total) for s in range(total)] == \
        [_ref_finetune_schedule(s, warm, total) for s in range(total)]


@pytest.mark.parametrize("warmup_epochs,epochs,per_epoch", [(1.0, 5, 7), (0.5, 3, 4), (2.0, 4, 5), (1.0, 1, 5)])
def test_finetune_lr_at_every_step_and_parameters_after_adamw_equal_the_old_code(warmup_epochs, epochs, per_epoch):
    new = _finetune_module("vit1d_test", warmup_epochs=warmup_epochs, max_epochs=epochs)
    old = _finetune_module("vit1d_test", warmup_epochs=warmup_epochs, max_epochs=epochs)
    total = epochs * per_epoch
    _attach_trainer(new, total, epochs)
    conf = new.configure_optimizers()
    opt_new, sched_new = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in _ref_finetune_groups(old.backbone, old.head, old.lr, old.weight_decay, old.layer_decay)]
    opt_old = torch.optim.AdamW(groups, lr=old.lr, **({"fused": True} if opt_new.defaults.get("fused")
                                                     else {"foreach": True}))
    warm = int(round(warmup_epochs * max(1, total // epochs)))
    sched_old = torch.optim.lr_scheduler.LambdaLR(opt_old, lambda s: _ref_finetune_schedule(s, warm, total))
    g = torch.Generator().manual_seed(0)
    for _ in range(total):
        lr_new = {n: grp["lr"] for grp in opt_new.param_groups for n in _names(new, grp)}
        lr_old = {n: grp["lr"] for grp in opt_old.param_groups for n in _names(old, grp)}
        assert lr_new == lr_old
        for p_new, p_old in zip(new.parameters(), old.parameters()):
            p_new.grad = torch.randn(p_new.shape, generator=g)
            p_old.grad = p_new.grad.clone()
        opt_new.step(), sched_new.step()
        opt_old.step(), sched_old.step()
    for (n, p_new), p_old in zip(new.named_parameters(), old.parameters()):
        assert torch.equal(p_new, p_old), n


def _names(module: nn.Module, group: dict) -> list[str]:
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for p in group["params"]]


def test_lightning_optimizers_pretraining_schedule():
    model = _Model()
    conf = lightning_optimizers(param_groups(model, 0.1), 2e-3, 4, 20, betas=(0.9, 0.99))
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.99)
    assert sched == {"scheduler": sched["scheduler"], "interval": "step", "frequency": 1}
    assert all("names" not in g for g in opt.param_groups)
    lrs = []
    for _ in range(22):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    assert lrs[:5] == pytest.approx([2e-3 * k / 5 for k in range(1, 5)] + [2e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[20] == lrs[21] == pytest.approx(0.0, abs=1e-12)


def test_adamw_keeps_group_lrs():
    model = _Model()
    groups = param_groups(model, 0.1, lr=1.0, layer_decay=0.5)
    opt = adamw(groups, lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    assert {g["layer"] for g in opt.param_groups} == {0, 1}   # backbone (one layer), then the decoder on top


def test_hubert_weight_norm_gain_gets_no_weight_decay():
    """HuBERT's positional-conv gain is (1, 1, k): the 1-D rule missed it and decay shrank the position kernel."""
    from ecgfm.backbones import create_backbone

    m = nn.Module()
    m.backbone = create_backbone("hubert_ecg")
    m.head = nn.Linear(m.backbone.num_features, 3)
    decayed = {n for g in param_groups(m, 0.05, lr=1e-3, layer_decay=0.75) if g["weight_decay"] > 0
               for n in g["names"]}
    assert "backbone.pos_conv_v" in decayed and "backbone.pos_conv_g" not in decayed
