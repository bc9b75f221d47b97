"""A run that is interrupted mid-epoch and resumed ends with exactly the weights of an uninterrupted run.

Fast variant: in-process, the first run stops at ``trainer.max_steps=K`` (mid-epoch) and a rerun into the same
folder continues to ``N`` (the LR schedule length is pinned with ``method.max_steps``).
Subprocess variant: ``python train.py`` is held at a mid-epoch step once its checkpoints are written, SIGKILLed
there (no clean-up runs), then rerun into the same folder (in-process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.pipelines import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
TOTAL = 10            # steps of the full run
EPOCH = 5             # batches per epoch: 48 records, 8 held out, batch 8 -> 5 (so steps 4 and 6 are mid-epoch)
COMMON = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=48", "data.params.duration=5.0",
          "data.val_fraction=0.15", "data.batch_size=8", "method.decoder_dim=16", "method.decoder_heads=2",
          "method.decoder_depth=1", "method.warmup_steps=2", f"method.max_steps={TOTAL}",
          "checkpoint.every_n_train_steps=2", "checkpoint.save_top_k=-1", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "trainer.deterministic=true", "trainer.log_every_n_steps=1",
          "torch_threads=1", "logger=csv"]


def _cfg(out_dir: Path, cache_root: Path, steps: int):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*COMMON, f"trainer.max_steps={steps}", f"out_dir={out_dir}",
                                                       f"paths.cache_root={cache_root}"])


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == TOTAL
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"weights differ at {key}"
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for pid in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[pid][name], opt_b[pid][name]), f"optimiser {name} differs for param {pid}"
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run of TOTAL steps (and the cache root it used)."""
    base = tmp_path_factory.mktemp("resume")
    cache_root = base / "cache"
    run = base / "reference"
    summary = train(_cfg(run, cache_root, TOTAL))
    assert summary["steps"] == TOTAL and summary["resumed_from"] is None
    return run, cache_root


def test_stop_mid_epoch_then_resume_matches_uninterrupted_run(reference, tmp_path):
    ref_run, cache_root = reference
    run = tmp_path / "interrupted"
    first = train(_cfg(run, cache_root, 6))
    assert first["steps"] == 6 and 6 % EPOCH != 0          # stopped inside the second epoch
    second = train(_cfg(run, cache_root, TOTAL))
    assert second["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    _assert_same_training_state(_final_state(run), _final_state(ref_run))
    # the per-step losses of the resumed run continue those of the reference exactly
    ref_losses = _final_state(ref_run)["callbacks"]["LossHistory"]["losses"]
    assert _final_state(run)["callbacks"]["LossHistory"]["losses"] == ref_losses


@pytest.mark.parametrize("stop", [3, 7])
def test_stop_between_periodic_checkpoints_then_resume_matches(reference, tmp_path, stop):
    """The run stops mid-epoch at a step no periodic checkpoint saved (as a trainer.max_time stop does), so
    last.ckpt is written after fit: it must still hold that epoch's position, not the next epoch's."""
    ref_run, cache_root = reference
    run = tmp_path / f"stop{stop}"
    assert train(_cfg(run, cache_root, stop))["steps"] == stop and stop % 2 and stop % EPOCH
    second = train(_cfg(run, cache_root, TOTAL))
    assert second["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    _assert_same_training_state(_final_state(run), _final_state(ref_run))
    ref_losses = _final_state(ref_run)["callbacks"]["LossHistory"]["losses"]
    assert _final_state(run)["callbacks"]["LossHistory"]["losses"] == ref_losses
    assert second["epochs"] == json.loads((ref_run / "summary.json").read_text())["epochs"]


@pytest.mark.parametrize("stop, every, validate", [(3, 100, True), (EPOCH, 2, True), (EPOCH, 100, True),
                                                   (EPOCH, 2, False)])
def test_stop_before_any_periodic_checkpoint_or_at_an_epoch_end_then_resume_matches(reference, tmp_path, stop,
                                                                                   every, validate):
    """Stops the test above does not make: before the process's first periodic checkpoint (Lightning's own
    end-of-fit save of last.ckpt then held the next epoch, and the corrective save was skipped as "already saved at
    this step"), and exactly at an epoch's end, with and without an epoch-end validation (the checkpoint read
    "epoch e + 1, all batches done": the resumed run skipped or replayed batches). All resumed on other batches than
    an uninterrupted run, exit 0. (Validation does not change the training state: the reference run validates.)"""
    ref_run, cache_root = reference
    run = tmp_path / f"stop{stop}_every{every}_val{validate}"
    cfg = _cfg(run, cache_root, stop)
    cfg.checkpoint.every_n_train_steps = every
    if not validate:
        cfg.trainer.limit_val_batches = 0
    assert train(cfg)["steps"] == stop
    cfg2 = _cfg(run, cache_root, TOTAL)
    if not validate:
        cfg2.trainer.limit_val_batches = 0
    second = train(cfg2)
    assert second["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    _assert_same_training_state(_final_state(run), _final_state(ref_run))
    ref_losses = _final_state(ref_run)["callbacks"]["LossHistory"]["losses"]
    assert _final_state(run)["callbacks"]["LossHistory"]["losses"] == ref_losses
    # the second leg's other checkpoint settings: last.ckpt overwritten, no last-v1.ckpt beside a stale last.ckpt
    assert not list((run / "checkpoints").glob("*-v*.ckpt"))


def test_resume_from_periodic_mid_epoch_checkpoint(reference, tmp_path):
    """Resume from a periodic checkpoint written during the first epoch (step 4 of 5) by an explicit path."""
    ref_run, cache_root = reference
    ckpt = ref_run / "checkpoints" / "step0000004.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    run = tmp_path / "from_step4"
    cfg = _cfg(run, cache_root, TOTAL)
    cfg.resume = str(ckpt)
    train(cfg)
    _assert_same_training_state(_final_state(run), _final_state(ref_run))


HELD_AT = 6           # the killed run is held after this step's checkpoints (mid-epoch: 6 % EPOCH != 0)


def test_sigkill_mid_epoch_then_rerun_matches_uninterrupted_run(reference, tmp_path):
    ref_run, cache_root = reference
    run = tmp_path / "killed"
    args = [*COMMON, f"trainer.max_steps={TOTAL}", f"paths.cache_root={cache_root}", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    # train.py, held (asleep) once step HELD_AT's checkpoints are written (this file's __main__ below): the SIGKILL
    # from here lands at that step however busy the machine is. Unheld, the steps from 6 to the end took ~0.2 s,
    # and a poll delayed by a loaded machine (a parallel test run) killed a finished run
    err = tmp_path / "killed_run.stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    target, last = run / "checkpoints" / f"step{HELD_AT:07d}.ckpt", run / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 300
        while not (run / "held").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (run / "held").exists(), \
            f"the training subprocess was never held (exit {proc.poll()}): {err.read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert target.exists(), "the training subprocess never wrote a mid-epoch checkpoint"
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at == HELD_AT and killed_at % EPOCH != 0      # a mid-epoch state

    # the rerun into the killed run's folder (in this process: what is tested is the state the SIGKILL left, which
    # the pipeline resumes from whatever starts it; a second train.py paid ~10 s of start-up for nothing more)
    rerun = train(_cfg(run, cache_root, TOTAL))
    assert rerun["resumed_from"] == str(last)
    _assert_same_training_state(_final_state(run), _final_state(ref_run))


def test_resumable_loader_skips_the_batches_already_trained(reference):
    """Unit check of the mechanism: after load_state_dict((epoch e, k batches)) the loader yields exactly the
    batches an uninterrupted epoch e yields after its first k; a position at the end of an epoch starts the next."""
    from ecgfm.data.datamodules import PretrainDataModule
    from ecgfm.pipelines import ResumableDataLoader

    cache = next((reference[1]).glob("synthetic-*"))
    dm = PretrainDataModule([str(cache)], batch_size=8, val_fraction=0.15, seed=0)
    plain = dm.train_dataloader()
    resumable = ResumableDataLoader.wrap(dm.train_dataloader(), progress=lambda: (1, 3))
    assert type(resumable.sampler) is type(plain.sampler)   # Lightning sees the DDP-aware sampler, not a default
    assert resumable.state_dict() == {"epoch": 1, "batches": 3, "world": 1, "batch_size": 8,
                                      "epoch_batches": len(plain)}

    plain.sampler.set_epoch(1)
    expected = [b["index"] for b in plain][3:]
    resumable.load_state_dict({"epoch": 1, "batches": 3})
    got = [b["index"] for b in resumable]
    assert len(got) == len(expected) == len(plain) - 3
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # the skip applies once: the next pass is a whole epoch
    assert len(list(resumable)) == len(plain)

    resumable.load_state_dict({"epoch": 1, "batches": len(plain)})   # saved on the last batch of epoch 1
    assert resumable.sampler.epoch == 2
    plain.sampler.set_epoch(2)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(resumable, plain))


def test_gradient_accumulation_draws_per_micro_batch_and_records_step_losses(tmp_path, monkeypatch):
    """accumulate_grad_batches=2: the two micro-batches of one optimiser step draw different random numbers (MAE
    masks, augmentations), and the loss history has one entry per optimiser step, the mean of its micro-batches'
    unscaled losses (Lightning hands the hooks loss / 2)."""
    from ecgfm.methods.base import PretrainModule

    draws: list[tuple[int, float]] = []
    losses: list[tuple[int, float]] = []
    real = PretrainModule.training_step

    def spy(self, batch, batch_idx):
        draws.append((self.trainer.global_step, float(torch.rand(()))))    # right after the step's reseed
        loss = real(self, batch, batch_idx)
        losses.append((self.trainer.global_step, float(loss.detach())))
        return loss

    monkeypatch.setattr(PretrainModule, "training_step", spy)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*COMMON, "trainer.max_steps=2",
                                                      "trainer.accumulate_grad_batches=2",
                                                      f"out_dir={tmp_path / 'acc'}",
                                                      f"paths.cache_root={tmp_path / 'cache'}"])
    summary = train(cfg)
    assert summary["steps"] == 2 and len(draws) == 4
    assert draws[0][1] != draws[1][1] and draws[2][1] != draws[3][1]       # micro-batches of one step differ
    assert summary["loss_history_steps"] == 2
    assert summary["first_loss"] == pytest.approx((losses[0][1] + losses[1][1]) / 2, rel=1e-6)
    assert summary["last_loss"] == pytest.approx((losses[2][1] + losses[3][1]) / 2, rel=1e-6)


def test_a_rerun_with_other_settings_does_not_continue_the_run(reference, tmp_path):
    """A rerun into a run folder continues its checkpoint only with the recipe it was trained with: another
    method.mask_ratio is refused naming it (steps of two recipes, config.yaml naming one); resume=<checkpoint>
    continues on purpose; a longer schedule (trainer.max_steps) is how a run is extended, not a new recipe."""
    from ecgfm.config import ConfigError

    _, cache_root = reference
    run = tmp_path / "run"
    train(_cfg(run, cache_root, 4))
    cfg = _cfg(run, cache_root, 6)
    cfg.method.mask_ratio = 0.3
    with pytest.raises(ConfigError, match=r"other settings \(method\.mask_ratio: 0\.75 -> 0\.3"):
        train(cfg)
    cfg.resume = str(run / "checkpoints" / "last.ckpt")
    assert train(cfg)["steps"] == 6


if __name__ == "__main__":   # the killed run of test_sigkill_mid_epoch_then_rerun_matches_uninterrupted_run
    import runpy

    from lightning.pytorch.callbacks import ModelCheckpoint

    _save = ModelCheckpoint.on_train_batch_end

    def _save_then_hold(self, trainer, *args, **kwargs):
        """ModelCheckpoint's save (the periodic file, then last.ckpt), then asleep at step HELD_AT until killed."""
        _save(self, trainer, *args, **kwargs)
        if trainer.global_step == HELD_AT:
            (Path(self.dirpath).parent / "held").touch()
            parent, until = os.getppid(), time.time() + 600
            while os.getppid() == parent and time.time() < until:   # the test kills it; an orphan ends itself
                time.sleep(0.5)
            os._exit(3)

    ModelCheckpoint.on_train_batch_end = _save_then_hold
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
