"""Review s24 (numbers printed and written by pretraining): D1 a resumed run's times cover every leg
(summary.json ``fit_time_total_s`` / ``wall_time_total_s``; benchmark_real's ``pretrain_time.json`` and its
"Pretraining wall time" table); D4 the non-finite skip counts are every DDP rank's; D6 a run that ran all its epochs
and its schedule is reported as finished, not "stopped early"."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"


def _bench():
    spec = importlib.util.spec_from_file_location("benchmark_real_s24", ROOT / "scripts" / "benchmark_real.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return mod


# ------------------------------------------------------------------------------------------------------ D6
def _summary(**kw):
    base = {"method": "MAEModule", "backbone": "vit1d_test", "n_parameters": 3000, "out_dir": "/nonexistent/run",
            "encoder_dir": None, "cache_dirs": []}
    return {**base, **kw}


def test_a_run_that_finished_its_epochs_and_schedule_is_not_stopped_early():
    from ecgfm.train.report import final_block

    first = final_block(_summary(steps=12, schedule_steps=12, stop_reason="max_epochs")).splitlines()[0]
    assert "stopped early" not in first and first.startswith("== training finished"), first
    first = final_block(_summary(steps=30, schedule_steps=None, stop_reason="max_epochs")).splitlines()[0]
    assert "stopped early" not in first, first
    # a limit that cut the schedule short is still called so
    assert "stopped early (max_epochs)" in final_block(_summary(steps=8, schedule_steps=12, stop_reason="max_epochs"))
    assert "stopped early (max_time)" in final_block(_summary(steps=8, schedule_steps=12, stop_reason="max_time"))
    assert "stopped early (early_stop)" in final_block(_summary(steps=8, schedule_steps=None,
                                                                stop_reason="early_stop"))
    assert final_block(_summary(steps=12, schedule_steps=12, stop_reason="max_steps")).startswith(
        "== training finished")


# ------------------------------------------------------------------------------------------------------ D1
COMMON = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=48", "data.params.duration=5.0",
          "data.val_fraction=0.15", "data.batch_size=8", "data.num_workers=0", "method.decoder_dim=16",
          "method.decoder_heads=2", "method.decoder_depth=1", "method.warmup_steps=2", "method.max_steps=8",
          "checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "torch_threads=1", "logger=csv"]


def _cfg(out_dir: Path, cache_root: Path, steps: int):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*COMMON, f"trainer.max_steps={steps}", f"out_dir={out_dir}",
                                                       f"paths.cache_root={cache_root}"])


def test_a_resumed_run_reports_the_time_of_every_leg(tmp_path):
    import torch

    from ecgfm.train.run import train

    run, cache = tmp_path / "run", tmp_path / "cache"
    first = train(_cfg(run, cache, 4))
    assert first["fit_time_total_s"] == pytest.approx(first["fit_time_s"])
    assert first["wall_time_total_s"] == pytest.approx(first["wall_time_s"]) and first["time_legs"] == 1
    clock = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["FitClock"]
    assert clock["legs"] == 1 and clock["fit_s"] >= first["fit_time_s"] * 0.99
    second = train(_cfg(run, cache, 8))
    assert second["steps"] == 8 and second["resumed_from"]
    assert second["time_legs"] == 2
    # this leg alone, and every leg: the first leg's fit time (up to its final checkpoint) is added
    assert second["fit_time_total_s"] >= second["fit_time_s"] + first["fit_time_s"] * 0.99
    assert second["wall_time_total_s"] >= second["wall_time_s"] + first["fit_time_s"]
    assert json.loads((run / "summary.json").read_text())["fit_time_total_s"] == second["fit_time_total_s"]


def test_a_resume_from_a_checkpoint_without_recorded_time_leaves_the_total_unknown(tmp_path):
    import torch

    from ecgfm.train.run import train

    run, cache = tmp_path / "run", tmp_path / "cache"
    train(_cfg(run, cache, 4))
    last = run / "checkpoints" / "last.ckpt"
    ck = torch.load(last, weights_only=True)
    del ck["callbacks"]["FitClock"]                  # written before the clock existed
    torch.save(ck, last)
    second = train(_cfg(run, cache, 8))
    assert second["steps"] == 8 and second["fit_time_total_s"] is None and second["wall_time_total_s"] is None


def _args(tmp_path):
    args = type("A", (), {})()
    args.__dict__.update(out=str(tmp_path / "bench"), methods=["mae"], steps=40, recipe="auto", embed_dim=None,
                         depth=None, heads=None, batch_size=None, train_overrides=[], threads=1,
                         cache_root=str(tmp_path / "cache"))
    return args


def test_benchmark_pretrain_sums_an_interrupted_leg_and_its_resume(tmp_path, monkeypatch):
    """Leg 1 is interrupted (status 130) after 20 of 40 steps; the rerun resumes to 40. pretrain_time.json and
    the table give both legs' wall / CPU time and train.py's fit time of both legs, next to the 40 steps."""
    B = _bench()
    legs = []

    def fake_run(cmd, env):
        out = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        if not legs:
            legs.append(1)
            raise subprocess.CalledProcessError(130, cmd)
        legs.append(2)
        (out / "encoder").mkdir(parents=True)
        (out / "encoder" / "encoder.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps({"steps": 40, "fit_time_s": 5.0, "fit_time_total_s": 12.0,
                                                      "resumed_from": str(out / "checkpoints" / "last.ckpt")}))
        return 20.0

    monkeypatch.setattr(B, "run", fake_run)
    args = _args(tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        B.stage_pretrain(args, ["pool_a"], {})
    folder = tmp_path / "bench" / "pretrain" / "mae"
    leg1 = json.loads((folder / B.LEGS_FILE).read_text())["legs"][0]
    assert leg1["status"] == "exit status 130" and not (folder / "pretrain_time.json").exists()
    B.stage_pretrain(args, ["pool_a"], {})
    info = json.loads((folder / "pretrain_time.json").read_text())
    assert info["steps"] == 40 and info["legs"] == 2 and info["time_scope"] == "all legs"
    assert info["wall_s_last_leg"] == 20.0 and info["wall_s"] == pytest.approx(leg1["wall_s"] + 20.0, abs=0.11)
    assert info["fit_time_s"] == 12.0 and info["fit_time_s_last_leg"] == 5.0
    row = B.pretrain_times_markdown(args).splitlines()[-1]
    assert "| 40 |" in row and "| 12.0 |" in row and "2 legs (resumed), times summed" in row


def test_benchmark_table_labels_an_older_resumed_record_as_last_leg_only(tmp_path):
    """A pretrain_time.json written before legs were recorded, for a resumed run: its times are the last leg's."""
    B = _bench()
    folder = tmp_path / "bench" / "pretrain" / "mae"
    folder.mkdir(parents=True)
    (folder / "pretrain_time.json").write_text(json.dumps({"experiment": "mae", "steps": 40, "wall_s": 12.2,
                                                            "fit_time_s": 0.855, "cpu_s": 11.1, "threads": 1}))
    (folder / "summary.json").write_text(json.dumps({"steps": 40, "resumed_from": "x/last.ckpt"}))
    row = B.pretrain_times_markdown(_args(tmp_path)).splitlines()[-1]
    assert "| 12.2 | 0.9 | 11.1 |" in row and "last leg only" in row
    (folder / "summary.json").write_text(json.dumps({"steps": 40, "resumed_from": None}))
    assert "last leg" not in B.pretrain_times_markdown(_args(tmp_path)).splitlines()[-1]


# ------------------------------------------------------------------------------------------------------ D4
def _guard_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from ecgfm.train.run import _nonfinite_summary
    from ecgfm.train.safety import NonFiniteGuard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        guard = NonFiniteGuard("skip")
        guard._restored_keys, guard._restored_crops = ["old/a"], 3    # the same checkpoint on every rank
        guard.skipped = {"syn/0": "s", "syn/1": "s"} if rank == 0 else {"syn/1": "s", "syn/2": "s", "syn/3": "s"}
        guard.skipped_draws = 5 if rank == 0 else 7
        out = _nonfinite_summary(guard)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


#: start method of this file's gloo worker processes: fork on Linux (the children inherit torch and the modules already
#: imported, where spawn re-imported them: seconds per process); spawn elsewhere (no safe fork)
START = "fork" if sys.platform.startswith("linux") else "spawn"


def test_nonfinite_counts_are_reduced_over_ddp_ranks(tmp_path):
    mp.start_processes(_guard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=START)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["nonfinite_records_skipped"] == 5            # old/a + syn/0..3, distinct
        assert out["nonfinite_crops_skipped"] == 3 + 5 + 7      # the restored crops counted once
        assert out["nonfinite_skipped_keys"] == ["old/a", "syn/0", "syn/1", "syn/2", "syn/3"]


def test_nonfinite_summary_in_one_process_is_the_guards():
    from ecgfm.train.run import _nonfinite_summary
    from ecgfm.train.safety import NonFiniteGuard

    guard = NonFiniteGuard("skip")
    guard.skipped, guard.skipped_draws = {"a": "s"}, 2
    assert _nonfinite_summary(guard) == guard.summary()


def test_fit_clock_keeps_an_unknown_earlier_time_unknown_across_later_resumes():
    """A leg resumed from a checkpoint without the clock's state (written before it existed) has unknown totals,
    and so has every later leg resumed from its checkpoints (a final review: the second resume read them as known,
    time_legs 2, the first leg's time missing)."""
    from types import SimpleNamespace

    from ecgfm.train.loop import FitClock

    leg2 = FitClock(t_start=0.0)
    leg2.start()
    leg2.on_train_start(SimpleNamespace(ckpt_path="/old/last.ckpt"), None)   # nothing restored: old checkpoint
    assert leg2.known is False and leg2.state_dict()["known"] is False
    leg3 = FitClock()
    leg3.load_state_dict(leg2.state_dict())
    leg3.on_train_start(SimpleNamespace(ckpt_path="/run/last.ckpt"), None)
    assert leg3.restored and leg3.known is False
    fresh = FitClock()
    fresh.on_train_start(SimpleNamespace(ckpt_path=None), None)
    assert fresh.known and FitClock().state_dict()["known"] is True
    old_state = {"fit_s": 1.0, "wall_s": 2.0, "legs": 1}            # a state written before "known" existed
    leg = FitClock()
    leg.load_state_dict(old_state)
    assert leg.known and leg.prior_legs == 1
