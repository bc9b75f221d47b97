"""SimCLR with a fixed ``aug_seed``: the augmentation generator travels in checkpoints, so a resumed run draws the
same views as an uninterrupted one (manual loop and Lightning ``fit(ckpt_path=...)``), and checkpoints load with
``weights_only=True``."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.methods.simclr import AUG_STATE_KEY, SimCLRModule

K = 3  # steps before the checkpoint


def _module(aug_seed: int | None = 5) -> SimCLRModule:
    torch.manual_seed(0)
    return SimCLRModule(create_backbone("vit1d_test"), proj_dim=8, proj_hidden=16, aug_seed=aug_seed,
                        warmup_steps=1, max_steps=10)


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[0, 6:] = False
    x = torch.randn(4, 12, 250, generator=g) * mask[:, :, None]
    return {"x": x, "lead_mask": mask, "patient": torch.arange(4), "index": torch.arange(4)}


def _step(module: SimCLRModule, opt: torch.optim.Optimizer, step: int) -> float:
    loss, _ = module.shared_step(_batch(step))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _checkpoint(module: SimCLRModule, opt: torch.optim.Optimizer, path) -> dict:
    ckpt = {"state_dict": module.state_dict(), "optimizer": opt.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return torch.load(path, weights_only=True)  # plain data and tensors only


def _resume(ckpt: dict, restore: bool = True) -> tuple[SimCLRModule, torch.optim.Optimizer]:
    fresh = _module()
    fresh.load_state_dict(ckpt["state_dict"])
    if restore:
        fresh.on_load_checkpoint(ckpt)
    fresh.train()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.05)
    opt.load_state_dict(ckpt["optimizer"])
    return fresh, opt


def test_resumed_module_draws_the_views_of_the_uninterrupted_one(tmp_path):
    ref = _module().train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(K):
        _step(ref, opt, step)
    ckpt = _checkpoint(ref, opt, tmp_path / "k.ckpt")
    entry = ckpt[AUG_STATE_KEY]
    assert entry["aug_seed"] == 5 and entry["device_type"] == "cpu" and len(entry["states"]) == 1
    assert entry["states"][0].dtype == torch.uint8

    resumed, opt2 = _resume(ckpt)
    restarted, _ = _resume(ckpt, restore=False)           # the old behaviour: generator restarts from aug_seed
    batch = _batch(K)
    v_ref, v_res, v_restart = ref.views(batch), resumed.views(batch), restarted.views(batch)
    assert torch.equal(v_res[0], v_ref[0]) and torch.equal(v_res[1], v_ref[1])
    assert not torch.equal(v_restart[0], v_ref[0])        # so the comparison above can fail
    # and training continues identically (same views -> same loss, same weights)
    for step in range(K + 1, K + 3):
        assert _step(resumed, opt2, step) == _step(ref, opt, step)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_before_any_step_and_save_after_load(tmp_path):
    """A checkpoint taken before the first step holds the seed's state; one saved right after a load (no step in
    between) holds the loaded state, not a restart."""
    ref = _module().train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ckpt0 = _checkpoint(ref, opt, tmp_path / "0.ckpt")
    assert torch.equal(ckpt0[AUG_STATE_KEY]["states"][0], torch.Generator().manual_seed(5).get_state())
    for step in range(K):
        _step(ref, opt, step)
    ckpt = _checkpoint(ref, opt, tmp_path / "k.ckpt")
    resumed, opt2 = _resume(ckpt)
    again = _checkpoint(resumed, opt2, tmp_path / "again.ckpt")
    assert torch.equal(again[AUG_STATE_KEY]["states"][0], ckpt[AUG_STATE_KEY]["states"][0])


def test_validation_generator_is_not_affected(tmp_path):
    ref = _module().train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    _step(ref, opt, 0)
    resumed, _ = _resume(_checkpoint(ref, opt, tmp_path / "k.ckpt"))
    for m in (ref, resumed):
        m.eval()
        m.on_validation_epoch_start()
    assert torch.equal(ref.views(_batch(9))[0], resumed.views(_batch(9))[0])


def test_mismatches_and_bad_entries(tmp_path):
    ref = _module().train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    _step(ref, opt, 0)
    ckpt = _checkpoint(ref, opt, tmp_path / "k.ckpt")
    # no generator without aug_seed: nothing saved
    none = _module(aug_seed=None)
    plain = {}
    none.on_save_checkpoint(plain)
    assert AUG_STATE_KEY not in plain
    # another aug_seed: not restored, with a warning, and the new seed is used
    other = SimCLRModule(create_backbone("vit1d_test"), proj_dim=8, proj_hidden=16, aug_seed=6).train()
    other.on_load_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="aug_seed=5.*aug_seed=6"):
        v = other.views(_batch(1))[0]
    assert torch.equal(v, SimCLRModule(create_backbone("vit1d_test"), aug_seed=6).train().views(_batch(1))[0])
    # a checkpoint of an older version (no entry): a warning
    with pytest.warns(UserWarning, match="no SimCLR augmentation generator state"):
        _module().on_load_checkpoint({"state_dict": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _module(aug_seed=None).on_load_checkpoint({"state_dict": {}})  # nothing expected: no warning
    bad = dict(ckpt)
    bad[AUG_STATE_KEY] = {"aug_seed": 5, "device_type": "cpu", "states": [torch.zeros(3)]}
    with pytest.raises(ValueError, match="malformed"):
        _module().on_load_checkpoint(bad)


class _Recording(SimCLRModule):
    """Records the first view of every training step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def views(self, batch):
        v = super().views(batch)
        if self.training:
            self.seen.append(v[0].detach().clone())
        return v


def _fit(steps: int, root, ckpt_path=None) -> _Recording:
    torch.manual_seed(0)
    module = _Recording(create_backbone("vit1d_test"), proj_dim=8, proj_hidden=16, aug_seed=5, warmup_steps=1,
                        max_steps=10)
    same = [_batch(0)] * 8  # the same batch every step: the views differ only through the generator
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(same, batch_size=None), ckpt_path=ckpt_path, weights_only=True)
    return module, trainer


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_lightning_resume_draws_the_same_views(tmp_path):
    full, _ = _fit(5, tmp_path / "full")
    _, first = _fit(K, tmp_path / "a")
    first.save_checkpoint(tmp_path / "k.ckpt")
    assert AUG_STATE_KEY in torch.load(tmp_path / "k.ckpt", weights_only=True)
    resumed, _ = _fit(5, tmp_path / "b", ckpt_path=str(tmp_path / "k.ckpt"))
    assert len(full.seen) == 5 and len(resumed.seen) == 5 - K
    for a, b in zip(full.seen[K:], resumed.seen):
        assert torch.equal(a, b)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _fit_ddp(steps: int, root, ckpt_path=None) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = SimCLRModule(create_backbone("vit1d_test"), proj_dim=8, proj_hidden=16, aug_seed=5, warmup_steps=1,
                          max_steps=10)
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader([_batch(0)] * 8, batch_size=None), ckpt_path=ckpt_path,
                weights_only=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_checkpoint_holds_every_rank_and_resume_continues_each(tmp_path):
    """Two gloo processes: the checkpoint (written by rank 0) holds both ranks' generator states, and a resumed
    run ends with the states and weights of the uninterrupted one."""
    _fit_ddp(4, tmp_path / "full")                    # checkpoints at steps 2 and 4
    _fit_ddp(4, tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "step=2.ckpt"))
    full = torch.load(tmp_path / "full" / "step=4.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "step=4.ckpt", weights_only=True)
    states = full[AUG_STATE_KEY]["states"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])   # one stream per rank
    for a, b in zip(states, resumed[AUG_STATE_KEY]["states"]):
        assert torch.equal(a, b)
    for name, a in full["state_dict"].items():
        assert torch.equal(a, resumed["state_dict"][name]), name
