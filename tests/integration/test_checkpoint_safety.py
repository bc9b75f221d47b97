"""Checkpoints are written atomically; resume takes the newest checkpoint that loads (logging the ones it skips);
a finished run is not overwritten by a fresh start unless ``overwrite=true``; ``resume=`` pointing at something
that is not a checkpoint says so (issue 9, items 9 and 13)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.config import ConfigError
from ecgfm.train import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
TINY = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=24", "data.params.duration=6.0",
        "data.batch_size=8", "data.val_fraction=0.2", "trainer.max_steps=4", "checkpoint.every_n_train_steps=2",
        "checkpoint.save_top_k=-1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "torch_threads=1", "trainer.log_every_n_steps=1", "method.warmup_steps=1", "method.max_steps=8",
        "method.decoder_dim=16", "method.decoder_heads=2", "method.decoder_depth=1"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cfg(out: Path, cache_root: Path, extra: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, f"out_dir={out}", f"paths.cache_root={cache_root}",
                                                       *(extra or [])])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_last_ckpt_resumes_from_the_newest_loadable_one(tmp_path, cache_root, caplog):
    out = tmp_path / "run"
    train(_cfg(out, cache_root))
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])        # torn write / truncated copy
    with caplog.at_level(logging.WARNING):
        summary = train(_cfg(out, cache_root, ["trainer.max_steps=6"]))
    assert summary["resumed_from"] == str(out / "checkpoints" / "step0000004.ckpt")
    assert summary["steps"] == 6
    assert summary["loss_history_steps"] == 6                               # steps 1-4 were not redone
    assert any("last.ckpt" in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)


def test_deleted_last_ckpt_resumes_from_a_periodic_checkpoint(tmp_path, cache_root):
    out = tmp_path / "run"
    train(_cfg(out, cache_root))
    (out / "checkpoints" / "last.ckpt").unlink()
    summary = train(_cfg(out, cache_root, ["trainer.max_steps=6"]))
    assert summary["resumed_from"] == str(out / "checkpoints" / "step0000004.ckpt")
    assert summary["steps"] == 6


def test_finished_run_is_not_overwritten_by_a_fresh_start(tmp_path, cache_root):
    out = tmp_path / "run"
    train(_cfg(out, cache_root))
    enc = out / "encoder" / "encoder.safetensors"
    before = (_digest(enc), _digest(out / "summary.json"))
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    with pytest.raises(ConfigError, match="overwrite=true"):
        train(_cfg(out, cache_root))
    assert (_digest(enc), _digest(out / "summary.json")) == before
    summary = train(_cfg(out, cache_root, ["overwrite=true", "trainer.max_steps=2"]))
    assert summary["resumed_from"] is None and summary["steps"] == 2


def test_only_unloadable_checkpoints_and_an_encoder_refuse_a_fresh_start(tmp_path, cache_root):
    out = tmp_path / "run"
    train(_cfg(out, cache_root))
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match=r"overwrite.*3 damaged checkpoint"):
        train(_cfg(out, cache_root))


def test_resume_pointing_at_a_text_file_says_not_a_checkpoint(tmp_path, cache_root):
    note = tmp_path / "notes.txt"
    note.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError, match="resume.*not a checkpoint") as info:
        train(_cfg(tmp_path / "run", cache_root, [f"resume={note}"]))
    assert "weights_only" not in str(info.value)


def test_checkpoint_io_is_atomic_and_fsynced(tmp_path, monkeypatch):
    """A failing write (full disk) leaves the previous checkpoint intact under the final name and no temporary
    file; a successful one is fsync'ed before the rename."""
    from ecgfm.train.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:                  # half of the file made it to disk, then ENOSPC
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.zeros(3)}}, path)
    assert synced, "the checkpoint was not fsync'ed"
    assert io.load_checkpoint(path)["global_step"] == 3


def test_training_writes_checkpoints_through_the_atomic_io(tmp_path, cache_root, monkeypatch):
    """Every checkpoint of a run (periodic, last.ckpt, the final save) goes through temp + fsync + rename."""
    renames: list[str] = []
    real_replace = os.replace

    def spy(src, dst, *a, **k):
        renames.append(os.path.basename(str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "run"
    train(_cfg(out, cache_root, ["trainer.max_steps=3"]))
    assert {"step0000002.ckpt", "last.ckpt"} <= set(renames)


def test_cli_resume_from_text_file_is_one_line(tmp_path, cache_root):
    note = tmp_path / "notes.txt"
    note.write_text("hello\n")
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"paths.cache_root={cache_root}", f"resume={note}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config key 'resume'")


def test_resume_on_data_of_another_rate_is_refused(tmp_path, cache_root):
    """A checkpoint of a 100 Hz run resumed on a 250 Hz cache with the same crop length in samples (1.0 s = 250)
    has matching tensor shapes: it is refused, naming both rates, instead of silently training on another
    time scale."""
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    out = tmp_path / "run"
    train(_cfg(out, cache_root, ["trainer.max_steps=2"]))
    cache = tmp_path / "c250"
    prepare_corpus(SyntheticSource(24, seed=3, duration=6.0), cache, PreprocessSpec(fs=250.0), workers=0,
                   progress=False)
    extra = ["data=cached", f"data.cache_dirs=[{cache}]", "data.num_workers=0", "crop_seconds=1.0",
             f"resume={out / 'checkpoints' / 'last.ckpt'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*[o for o in TINY if not o.startswith("data.params")],
                                                      f"out_dir={tmp_path / 'other'}", *extra])
    with pytest.raises(ConfigError, match=r"resume.*100 Hz.*250 Hz"):
        train(cfg)


def test_cli_reports_a_full_disk_as_one_line(capsys):
    from ecgfm.train.report import EXIT_USER_ERROR, run_cli

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "/run/checkpoints/.last.ckpt.x.tmp")

    with pytest.raises(SystemExit) as info:
        run_cli(full, None)
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: /run/checkpoints/.last.ckpt.x.tmp: disk full")


@pytest.mark.parametrize("kind", ["text", "empty", "folder", "bare_state_dict", "truncated"])
def test_explicit_resume_of_anything_but_a_checkpoint_says_why(tmp_path, kind):
    from ecgfm.train.checkpoints import find_resume_checkpoint

    target = tmp_path / "thing"
    if kind == "text":
        target.write_text("hello\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "folder":
        target.mkdir()
        (target / "encoder.json").write_text("{}")
    else:
        torch.save({"w": torch.ones(2)} if kind == "bare_state_dict" else
                   {"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, target)
        if kind == "truncated":
            target.write_bytes(target.read_bytes()[:-200])
    with pytest.raises(ConfigError, match=r"config key 'resume': .*is not a checkpoint \(") as info:
        find_resume_checkpoint(tmp_path / "run", str(target))
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
