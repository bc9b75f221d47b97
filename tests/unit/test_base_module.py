"""PretrainModule: optimiser groups and schedule, hyper-parameters, checkpoints, online linear probe."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.accel import adamw_kwargs
from ecgfm.methods.base import PretrainModule, fit_probe_auroc




class TinyBackbone(nn.Module):
    """Contract-following backbone with a norm layer, an embedding table and a pos_embed parameter."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.name = "tiny"
        self.init_args = {"width": 8}
        self.conv = nn.Conv1d(12, 8, 5, padding=2)
        self.norm = nn.LayerNorm(8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, 1))
        self.lead_table = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 8)

    def embed(self, x):
        h = self.conv(x) + self.pos_embed + self.lead_table.weight.mean(0)[None, :, None]
        return self.proj(self.norm(h.mean(-1)))

    forward = embed


class Recon(PretrainModule):
    """Trivial method: a linear decoder reconstructs the lead means from the embedding."""

    def __init__(self, backbone, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.dec = nn.Linear(backbone.num_features, 12)

    def shared_step(self, batch):
        target = batch["x"].mean(-1)
        loss = ((self.dec(self.backbone.embed(batch["x"])) - target) ** 2).mean()
        return loss, {"target_var": target.var()}


def test_configure_optimizers_adamw_groups_and_step_schedule():
    module = Recon(TinyBackbone(), lr=2e-3, weight_decay=0.1, warmup_steps=4, max_steps=20, betas=(0.9, 0.99))
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")  # CPU: fused where PyTorch has it
    assert bool(opt.defaults.get("fused")) == adamw_kwargs(list(module.parameters())).get("fused", False)
    assert opt.defaults["betas"] == (0.9, 0.99)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]   # decayed first (checkpoint order)
    no_decay = {n for n, p in module.named_parameters() if any(p is q for q in opt.param_groups[1]["params"])}
    assert no_decay == {"backbone.conv.bias", "backbone.norm.weight", "backbone.norm.bias", "backbone.pos_embed",
                        "backbone.lead_table.weight", "backbone.proj.bias", "dec.bias"}
    assert sched["interval"] == "step"
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len([p for p in module.parameters() if p.requires_grad])
    lrs = []
    for _ in range(22):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    assert lrs[0] == pytest.approx(2e-3 / 5) and lrs[3] == pytest.approx(2e-3 * 4 / 5)
    assert lrs[4] == pytest.approx(2e-3)                   # peak right after warm-up
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))   # cosine decay is monotone
    assert lrs[20] == pytest.approx(0.0, abs=1e-12) and lrs[21] == pytest.approx(0.0, abs=1e-12)


def test_hparams_are_plain_and_backbone_is_recorded():
    module = Recon(TinyBackbone(), lr=5e-4)
    hp = dict(module.hparams)
    assert "backbone" not in hp
    assert hp["lr"] == 5e-4 and hp["backbone_name"] == "tiny" and hp["backbone_args"] == {"width": 8}
    with pytest.raises(ValueError, match="lr"):
        Recon(TinyBackbone(), lr=0)
    with pytest.raises(ValueError, match="contract"):
        Recon(nn.Linear(2, 2))


def test_base_shared_step_is_abstract():
    with pytest.raises(NotImplementedError, match="shared_step"):
        PretrainModule(TinyBackbone()).shared_step({"x": torch.zeros(1, 12, 10)})


def test_probe_fit():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 6))
    labels = (emb[:, 0] + 0.5 * emb[:, 1] > 0).astype(int) + (emb[:, 2] > 1).astype(int)  # 3 classes
    auc, k = fit_probe_auroc(emb, labels, multilabel=False, num_classes=3)
    assert k == 3 and auc > 0.9
    multi = np.stack([emb[:, 0] > 0, emb[:, 3] > 0.5, np.zeros(400, bool)], 1).astype(np.float32)
    auc, k = fit_probe_auroc(emb, multi, multilabel=True, num_classes=3)
    assert k == 2 and auc > 0.9
    noise = rng.normal(size=(400, 6))
    auc_rand, _ = fit_probe_auroc(noise, labels, multilabel=False, num_classes=3)
    assert 0.35 < auc_rand < 0.65                  # uninformative embeddings give chance level


def test_probe_refuses_multi_hot_targets_as_single_label():
    """The pretraining datamodule's probe labels are a multi-hot (N, C) matrix: a record without any probe class
    (or with several) must not become class 0 (its first class) through an argmax; the shipped method configs take
    the multilabel path, which scores the same OvR AUROC for one-hot rows."""
    from hydra import compose, initialize_config_dir

    from ecgfm.conf import config_dir

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 4))
    onehot = np.eye(3)[rng.integers(0, 3, 200)]
    assert fit_probe_auroc(emb, onehot, False, 3) == fit_probe_auroc(emb, onehot, True, 3)
    none = onehot.copy()
    none[:5] = 0
    with pytest.raises(ValueError, match="5 rows have no class.*probe_multilabel=true"):
        fit_probe_auroc(emb, none, multilabel=False, num_classes=3)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        for method in ("mae", "simclr", "clocs", "crema"):
            assert compose("train", overrides=[f"method={method}"]).method.probe_multilabel is True


def _val_batches(n_batches: int, informative: bool):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n_batches):
        x = torch.randn(16, 12, 40, generator=g)
        y = (x[:, 0].mean(-1) > 0).long() if informative else torch.randint(0, 2, (16,), generator=g)
        x[:, 0] += 3 * (2 * y[:, None].float() - 1) * (1 if informative else 0)
        out.append({"x": x, "y": y, "lead_mask": torch.ones(16, 12, dtype=torch.bool),
                    "patient": torch.full((16,), -1), "index": torch.arange(16) + 16 * i})
    return out


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)


@pytest.mark.parametrize("informative", [True, False])
def test_online_probe_logs_auroc_in_validation(informative, tmp_path):
    torch.manual_seed(0)
    module = Recon(TinyBackbone(), probe_num_classes=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, _loader(_val_batches(6, informative)), verbose=False)
    assert metrics["val/probe_n"] == 96
    if informative:
        assert metrics["val/probe_auroc"] > 0.9
    else:
        assert 0.2 < metrics["val/probe_auroc"] < 0.8
    assert np.isfinite(metrics["val/loss"]) and "val/target_var" in metrics


def test_probe_disabled_or_unlabelled_logs_nothing(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    batches = _val_batches(2, True)
    (m1,) = trainer.validate(Recon(TinyBackbone()), _loader(batches), verbose=False)
    assert "val/probe_auroc" not in m1
    for b in batches:
        del b["y"]
    (m2,) = trainer.validate(Recon(TinyBackbone(), probe_num_classes=2), _loader(batches), verbose=False)
    assert "val/probe_auroc" not in m2


def test_fit_checkpoint_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    module = Recon(TinyBackbone(), lr=1e-2, warmup_steps=2, max_steps=8, probe_num_classes=2)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, check_val_every_n_epoch=1)
    batches = _val_batches(4, True)
    trainer.fit(module, _loader(batches), _loader(batches[:2]))
    assert trainer.global_step == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["backbone_name"] == "tiny"
    restored = Recon(TinyBackbone(), **{k: v for k, v in ckpt["hyper_parameters"].items()
                                       if not k.startswith("backbone")})
    restored.load_state_dict(ckpt["state_dict"])
    x = batches[0]["x"]
    module.eval(), restored.eval()
    assert torch.allclose(module.backbone.embed(x), restored.backbone.embed(x))


def test_omegaconf_arguments_are_stored_as_plain_data(tmp_path):
    from omegaconf import OmegaConf

    module = Recon(TinyBackbone(), betas=OmegaConf.create([0.9, 0.98]))
    assert module.hparams["betas"] == [0.9, 0.98] and type(module.hparams["betas"]) is list
    assert type(module.hparams_initial["betas"]) is list
    torch.save(dict(module.hparams), tmp_path / "hp.pt")
    assert torch.load(tmp_path / "hp.pt", weights_only=True)["betas"] == [0.9, 0.98]
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["betas"] == (0.9, 0.98)


def test_probe_subsample_and_label_errors():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 4))
    labels = (emb[:, 0] > 0).astype(int)
    auc_all, _ = fit_probe_auroc(emb, labels, multilabel=False, num_classes=2)
    auc_sub, _ = fit_probe_auroc(emb, labels, multilabel=False, num_classes=2, max_samples=60)
    assert auc_all > 0.95 and auc_sub > 0.9
    assert fit_probe_auroc(emb[:3], labels[:3], multilabel=False, num_classes=2)[1] == 0   # too few to split
    with pytest.raises(ValueError, match="probe labels"):
        fit_probe_auroc(emb, labels + 1, multilabel=False, num_classes=2)


class _Labelled(torch.utils.data.Dataset):
    """47 labelled samples; y is readable from lead 0, so a working probe scores ~1."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(47, 12, 40, generator=g)
        self.y = (torch.arange(47) % 2).long()
        self.x[:, 0] += 3 * (2 * self.y[:, None].float() - 1)

    def __len__(self) -> int:
        return 47

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "lead_mask": torch.ones(12, dtype=torch.bool),
                "patient": torch.tensor(-1), "index": torch.tensor(i)}


@pytest.mark.slow
def test_online_probe_gathers_across_ddp_ranks(tmp_path):
    """2 CPU ranks (gloo): the probe sees every validation sample once, whatever the sharding."""
    module = Recon(TinyBackbone(), probe_num_classes=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    # 47 -> 24 per rank: the DistributedSampler repeats one sample, which the probe must drop again
    loader = torch.utils.data.DataLoader(_Labelled(), batch_size=10)
    (metrics,) = trainer.validate(module, loader, verbose=False)
    assert metrics["val/probe_n"] == 47
    assert metrics["val/probe_auroc"] > 0.9


def test_a_schedule_without_length_names_method_max_steps():
    """trainer.max_steps=-1 (epochs instead) leaves the schedule without a length: the message says which key."""
    from ecgfm.methods.mae import MAEModule

    with pytest.raises(ValueError, match=r"set method\.max_steps when trainer\.max_steps is -1"):
        MAEModule(backbone=None, max_steps=-1)
