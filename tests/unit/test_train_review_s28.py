"""Review s28 (optimisation and the training loop): F1 layer-wise lr decay of the transformer backbones follows the
MAE / BEiT rule (the final norm shares the head's level, the last block is one decay step below the head); F2 a
training batch emptied by ``nonfinite=skip`` is not a crash in the throughput callback; F3 a ``trainer=debug``
(fast_dev_run) run reports ``fast_dev_run`` as its stop reason, without the schedule warning and the "raise
trainer.max_epochs" advice."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.backbones import create_backbone
from ecgfm.evaluate.finetune import FINETUNE_NO_DECAY_NAMES, FinetuneModule
from ecgfm.optim import param_groups

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"


# ------------------------------------------------------------------------------------------------------ F1
def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE ``util/lr_decay.py`` ``get_layer_id_for_vit`` (with ``num_layers = len(blocks) + 1``), on ecgfm names:
    embeddings / tokens 0, ``blocks.i`` i + 1, everything else (the final norm, the head) ``num_layers``."""
    if not name.startswith("backbone."):
        return num_layers
    name = name[len("backbone."):]
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(("patch_embed", "lead_embed", "sep_token", "sep_embed", "pos_embed", "cls_token")):
        return 0
    return num_layers


@pytest.mark.parametrize("name,kw", [("vit1d_test", {"depth": 3}), ("stmem_vit", {"seq_len": 100, "patch_size": 25,
                                                                                   "depth": 2})])
def test_vit_lr_scales_follow_the_mae_rule(name, kw):
    torch.manual_seed(0)
    backbone = create_backbone(name, **kw)
    depth, ld = len(backbone.blocks), 0.75
    module = FinetuneModule(backbone, 3, True, lr=1.0, weight_decay=0.05, layer_decay=ld)
    groups = param_groups(module, 0.05, lr=1.0, layer_decay=ld, no_decay_names=FINETUNE_NO_DECAY_NAMES)
    got = {n: g["lr_scale"] for g in groups for n in g["names"]}
    want = {n: ld ** (depth + 1 - _mae_layer_id(n, depth + 1)) for n in got}
    assert got == pytest.approx(want)
    assert got["backbone.norm.weight"] == 1.0 == got["head.weight"]          # the final norm: the head's level
    assert got[f"backbone.blocks.{depth - 1}.mlp.fc2.weight"] == pytest.approx(ld)   # last block: one step below
    assert min(got.values()) == pytest.approx(ld ** (depth + 1))             # embeddings


def test_hubert_stable_final_norm_shares_the_heads_level():
    hub = create_backbone("hubert_ecg", num_hidden_layers=3, do_stable_layer_norm=True)
    module = FinetuneModule(hub, 3, True, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    got = {n: g["lr_scale"] for g in param_groups(module, 0.05, lr=1.0, layer_decay=0.5) for n in g["names"]}
    assert got["backbone.layer_norm.weight"] == 1.0 == got["head.weight"]
    assert got["backbone.blocks.2.fc2.weight"] == pytest.approx(0.5)
    assert got["backbone.pos_conv_g"] == pytest.approx(0.5 ** 4)


@pytest.mark.parametrize("name", ["resnet1d_test", "net1d_test", "resnet1d_tiny", "xresnet1d50"])
def test_cnn_layer_ids_are_unchanged(name):
    # the CNNs were already on the MAE rule (2026-12-06): the head is one step above the last stage
    cnn = create_backbone(name)
    assert cnn.num_layer_ids == 1 + max(cnn.layer_id(n) for n, _ in cnn.named_parameters()) == len(cnn.stages) + 1


@pytest.mark.parametrize("name", ["vit1d_test", "stmem_vit", "hubert_ecg", "resnet1d_test", "net1d_test"])
def test_layer_id_contract(name):
    # layer ids are in [0, num_layer_ids] (num_layer_ids: the head's level); the last block / stage is one decay
    # step below the head; only what runs after the blocks (a final norm) shares the head's level
    kw = {"do_stable_layer_norm": True, "num_hidden_layers": 2} if name == "hubert_ecg" else {}
    bb = create_backbone(name, **kw)
    ids = {n: bb.layer_id(n) for n, _ in bb.named_parameters()}
    top = bb.num_layer_ids
    assert min(ids.values()) == 0 and max(ids.values()) <= top
    stack = "blocks" if hasattr(bb, "blocks") else "stages"
    assert max(v for n, v in ids.items() if n.startswith(stack + ".")) == top - 1 == len(getattr(bb, stack))
    assert all(n.startswith(("norm", "layer_norm")) for n, v in ids.items() if v == top)


# ------------------------------------------------------------------------------------------------------ F2
def test_throughput_callback_skips_a_batch_the_guard_emptied():
    from ecgfm.train.loop import ThroughputCallback
    from ecgfm.train.safety import NonFiniteGuard

    trainer = SimpleNamespace(world_size=1, sanity_checking=False, accumulate_grad_batches=1, global_step=1,
                              datamodule=None)
    module = SimpleNamespace(log=lambda *a, **k: None)
    guard, tp = NonFiniteGuard("skip"), ThroughputCallback()
    tp.on_train_start(trainer, module)
    good = {"x": torch.randn(8, 12, 250), "index": torch.arange(8)}
    guard.on_train_batch_start(trainer, module, good, 0)
    tp.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, good, 0)
    bad = {"x": torch.full((8, 12, 250), float("nan")), "index": torch.arange(8, 16)}
    guard.on_train_batch_start(trainer, module, bad, 1)
    assert bad["x"].shape[0] == 0
    tp.on_train_batch_end(trainer, module, {}, bad, 1)          # was: ValueError "Expected the value to increase"
    assert tp._samples == 8 and tp._batches == 1
    again = {"x": torch.randn(8, 12, 250), "index": torch.arange(16, 24)}
    tp.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, again, 2)
    assert tp._samples == 16 and tp._batches == 2


COMMON = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=48", "data.params.duration=5.0",
          "data.val_fraction=0.15", "data.batch_size=8", "data.num_workers=0", "method.decoder_dim=16",
          "method.decoder_heads=2", "method.decoder_depth=1", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "torch_threads=1", "logger=csv"]


def _cfg(out_dir: Path, cache_root: Path, extra=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*COMMON, f"out_dir={out_dir}",
                                                       f"paths.cache_root={cache_root}", *extra])


class _NaNBatch(L.Callback):
    """Turn every row of the training batch ``at`` into NaN, ahead of the NonFiniteGuard (as a DataModule without
    the loaders' own non-finite check would hand it over)."""

    def __init__(self, at: int) -> None:
        self.at, self.n = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.n == self.at:
            batch["x"] = torch.full_like(batch["x"], float("nan"))
        self.n += 1


def test_a_fit_with_a_batch_emptied_by_nonfinite_skip_finishes(tmp_path, monkeypatch):
    import ecgfm.train.run as run_mod

    build = run_mod.build_callbacks

    def with_nan(cfg, out_dir):
        callbacks, history = build(cfg, out_dir)
        return [_NaNBatch(1), *callbacks], history

    monkeypatch.setattr(run_mod, "build_callbacks", with_nan)
    cfg = _cfg(tmp_path / "run", tmp_path / "cache",
               ["trainer.max_steps=4", "method.warmup_steps=1", "method.max_steps=4", "nonfinite=skip",
                "checkpoint.every_n_train_steps=100", "method.probe_num_classes=null", "export=false"])
    summary = run_mod.train(cfg)
    # the emptied batch is skipped by the method but counts as an optimiser step (documented, and counted)
    assert summary["steps"] == 4 and summary["loss_history_steps"] == 3 and summary["empty_batches_skipped"] == 1
    assert summary["nonfinite_crops_skipped"] == 8 and summary["stop_reason"] == "max_steps"


def test_loss_history_counts_empty_batches_across_a_resume():
    from ecgfm.train.loop import LossHistory

    trainer = SimpleNamespace(accumulate_grad_batches=1, num_training_batches=10, global_step=1)
    history = LossHistory()
    history.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0)}, {"x": torch.randn(4, 12, 250)}, 0)
    history.on_train_batch_end(trainer, None, {}, {"x": torch.randn(0, 12, 250)}, 1)      # emptied by the guard
    assert history.losses == [2.0] and history.empty_batches == 1
    restored = LossHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.empty_batches == 1
    old = {k: v for k, v in history.state_dict().items() if k != "empty_batches"}   # a checkpoint from before
    restored.load_state_dict(old)
    assert restored.empty_batches == 0


# ------------------------------------------------------------------------------------------------------ F3
def test_stop_reason_of_a_fast_dev_run():
    from ecgfm.train.run import _stop_reason

    trainer = SimpleNamespace(interrupted=False, fast_dev_run=1, global_step=1, callbacks=[], max_epochs=1,
                              current_epoch=1)
    assert _stop_reason(trainer, 150) == "fast_dev_run"
    assert _stop_reason(SimpleNamespace(**{**vars(trainer), "fast_dev_run": False}), 150) == "max_epochs"


def test_a_debug_run_reports_fast_dev_run_without_schedule_advice(tmp_path, caplog):
    from ecgfm.train.run import train

    caplog.set_level(logging.WARNING)
    run, cache = tmp_path / "run", tmp_path / "cache"
    first = train(_cfg(run, cache, ["trainer=debug"]))
    assert first["steps"] == 1 and first["stop_reason"] == "fast_dev_run"
    assert "did not finish its decay" not in caplog.text
    caplog.clear()
    second = train(_cfg(run, cache, ["trainer=debug"]))
    assert second["nothing_trained"] and second["stop_reason"] == "fast_dev_run"
    assert "trainer.max_epochs" not in caplog.text and "leave out trainer=debug" in caplog.text, caplog.text


def test_the_final_block_of_a_debug_rerun_says_to_leave_out_trainer_debug():
    """The end-of-run block took the first word of the limit: "raise trainer.fast_dev_run to train on" (a debug run
    trains one batch whatever it is raised to), against the log line's advice."""
    from ecgfm.train.report import final_block

    summary = {"method": "mae", "backbone": "vit1d_test", "steps": 1, "stop_reason": "fast_dev_run",
               "nothing_trained": True,
               "nothing_trained_limit": "trainer.fast_dev_run (trainer=debug runs that many batches whatever the "
                                        "step limits say; leave out trainer=debug to train on)"}
    text = final_block(summary)
    assert "leave out trainer=debug to train on" in text and "raise trainer.fast_dev_run" not in text
    summary.update(stop_reason="max_steps", nothing_trained_limit="trainer.max_steps")
    assert "raise trainer.max_steps to train on" in final_block(summary)
