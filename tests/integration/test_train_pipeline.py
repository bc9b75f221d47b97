"""End-to-end pretraining runs of every experiment on a tiny synthetic corpus (ecgfm.pipelines.train)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.config import ConfigError
from ecgfm.data.record import ECGDataError
from ecgfm.export import load_encoder
from ecgfm.pipelines import PREPARED_MARKER, prepare_cache, train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"

# A corpus, model and run small enough for seconds per run on a busy 2-core machine.
TINY = ["backbone=vit1d_test", "data.params.n_records=24", "data.params.duration=6.0", "data.batch_size=8",
        "data.val_fraction=0.2", "trainer.max_steps=3", "checkpoint.every_n_train_steps=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "torch_threads=1",
        "trainer.log_every_n_steps=1", "trainer.deterministic=true", "method.warmup_steps=1"]
METHOD_TINY = {
    "mae": ["method.decoder_dim=16", "method.decoder_heads=2", "method.decoder_depth=1"],
    "crema": ["method.decoder_dim=16", "method.decoder_heads=2", "method.decoder_depth=1", "method.proj_dim=16"],
    "simclr": ["method.proj_dim=16", "method.proj_hidden=32"],
    "clocs": ["method.proj_dim=16"],
}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_cfg(out_dir: Path, cache_root: Path, experiment: str = "mae", extra: list[str] | None = None):
    extra = extra or []
    tiny = [o for o in TINY if not (o.startswith("data.params.") and any(e.startswith("data=") for e in extra))]
    overrides = [f"+experiment={experiment}", f"out_dir={out_dir}", f"paths.cache_root={cache_root}", *tiny,
                 *METHOD_TINY[experiment], *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("experiment", ["mae", "simclr", "clocs", "crema"])
def test_experiment_runs_end_to_end(experiment, tmp_path, cache_root):
    out = tmp_path / "run"
    summary = train(tiny_cfg(out, cache_root, experiment))

    assert summary["steps"] == 3
    assert summary["method"].lower().startswith(experiment)
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    assert summary["loss_history_steps"] == 3
    # 2 batches per epoch (19 training records, batch 8, last one dropped): 3 steps = 1 whole epoch + 1 batch
    assert (summary["epochs"], summary["partial_epoch_batches"]) == (1, 1)
    assert summary["val_metrics_step"] == 2 and summary["val_metrics"]   # the epoch-end validation, before step 3
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000002.ckpt"]
    # checkpoints hold plain data only: loadable without unpickling arbitrary objects
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 3
    assert any(k.startswith("backbone.") for k in state["state_dict"])
    # the exported encoder reloads without Hydra and embeds a crop of the trained length
    backbone, spec, info = load_encoder(out / "encoder")
    assert spec.fs == 100.0
    assert info["extra"]["crop_samples"] == 250
    emb = backbone.embed(torch.randn(2, 12, 250))
    assert emb.shape == (2, backbone.num_features)
    assert (out / "config.yaml").is_file()
    assert (out / "csv").is_dir()


def test_rerun_into_same_folder_resumes(tmp_path, cache_root):
    out = tmp_path / "run"
    first = train(tiny_cfg(out, cache_root))
    assert first["resumed_from"] is None
    second = train(tiny_cfg(out, cache_root, extra=["trainer.max_steps=5"]))
    assert second["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert second["steps"] == 5
    # the loss history survives the resume (kept in the checkpoint)
    assert second["first_loss"] == pytest.approx(first["first_loss"])
    assert second["loss_history_steps"] == 5


def test_resume_from_explicit_checkpoint(tmp_path, cache_root):
    first = tmp_path / "first"
    train(tiny_cfg(first, cache_root, extra=["trainer.max_steps=2"]))
    ckpt = first / "checkpoints" / "step0000002.ckpt"
    summary = train(tiny_cfg(tmp_path / "second", cache_root, extra=[f"resume={ckpt}"]))
    assert summary["resumed_from"] == str(ckpt)
    assert summary["steps"] == 3



def test_a_resumed_segment_without_validation_still_reports_the_last_one(tmp_path, cache_root):
    """Step 3 has no validation of its own: the summary names the last one (step 2, before the resume); it read
    {} / None (Lightning does not restore callback_metrics)."""
    out = tmp_path / "run"
    first = train(tiny_cfg(out, cache_root, extra=["trainer.max_steps=2"]))
    assert first["val_metrics_step"] == 2 and first["val_metrics"]
    second = train(tiny_cfg(out, cache_root, extra=["trainer.max_steps=3"]))
    assert second["resumed_from"] and second["steps"] == 3
    assert second["val_metrics_step"] == 2 and second["val_metrics"] == first["val_metrics"]


def test_resume_from_missing_checkpoint_is_a_clear_error(tmp_path, cache_root):
    with pytest.raises(ConfigError, match="resume.*not found"):
        train(tiny_cfg(tmp_path / "run", cache_root, extra=[f"resume={tmp_path / 'nope.ckpt'}"]))


def test_missing_data_path_is_a_clear_error(tmp_path, cache_root):
    cfg = tiny_cfg(tmp_path / "run", cache_root, extra=["data=ptbxl", f"paths.data_root={tmp_path / 'absent'}"])
    with pytest.raises(ECGDataError, match=str(tmp_path / "absent" / "ptbxl")):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_fails_before_any_work(tmp_path, cache_root):
    with pytest.raises(ConfigError, match="trainer.max_step"):
        train(tiny_cfg(tmp_path / "run", cache_root, extra=["+trainer.max_step=3"]))
    assert not (tmp_path / "run").exists()


def test_prepare_cache_is_keyed_and_reused(tmp_path):
    src = {"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": 4, "seed": 0, "fs": 500.0,
           "duration": 3.0}
    pre = {"fs": 100.0}
    a = prepare_cache([src], str(tmp_path), pre, name="syn", progress=False)
    stamp = (Path(a) / PREPARED_MARKER).stat().st_mtime_ns
    assert prepare_cache([dict(src)], str(tmp_path), pre, name="syn", progress=False) == a
    assert (Path(a) / PREPARED_MARKER).stat().st_mtime_ns == stamp
    b = prepare_cache([{**src, "n_records": 5}], str(tmp_path), pre, name="syn", progress=False)
    c = prepare_cache([src], str(tmp_path), {"fs": 50.0}, name="syn", progress=False)
    assert len({a, b, c}) == 3


def test_debug_trainer_runs_one_batch_and_exports(tmp_path, cache_root):
    summary = train(tiny_cfg(tmp_path / "run", cache_root, extra=["trainer=debug"]))
    assert summary["steps"] == 1
    assert (tmp_path / "run" / "encoder" / "encoder.safetensors").is_file()


def test_pretrain_on_prepared_cache_then_load_encoder(tmp_path):
    """The quickstart notebook's path: prepare a cache, train with data=cached, reload the encoder and embed."""
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    cache = tmp_path / "cache" / "syn"
    prepare_corpus(SyntheticSource(24, seed=3, duration=5.0), cache, PreprocessSpec(fs=100.0), workers=0,
                   progress=False)
    tiny = [o for o in TINY if not o.startswith("data.params.")]
    overrides = ["+experiment=mae", "data=cached", f"data.cache_dirs=[{cache}]", "data.num_workers=0",
                 f"out_dir={tmp_path / 'run'}", *tiny, *METHOD_TINY["mae"]]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    summary = train(cfg)
    assert summary["cache_dirs"] == [str(cache)]
    backbone, spec, info = load_encoder(summary["encoder_dir"])
    assert spec == PreprocessSpec(fs=100.0)
    assert backbone.embed(torch.zeros(3, 12, info["extra"]["crop_samples"])).shape == (3, backbone.num_features)


def test_missing_cache_folder_is_a_clear_error(tmp_path):
    tiny = [o for o in TINY if not o.startswith("data.params.")]
    overrides = ["+experiment=mae", "data=cached", f"data.cache_dirs=[{tmp_path / 'gone'}]",
                 f"out_dir={tmp_path / 'run'}", *tiny]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.raises(ECGDataError, match=r"gone.*data\.cache_dirs\[0\]"):
        train(cfg)


def test_compile_keeps_parameter_names():
    """compile=true swaps in a compiled forward_features on the instance; checkpoints and exports are unchanged."""
    from ecgfm.backbones import create_backbone
    from ecgfm.pipelines import compile_backbone

    backbone = create_backbone("vit1d_test")
    keys = list(backbone.state_dict())
    compile_backbone(backbone)
    assert list(backbone.state_dict()) == keys
    assert "forward_features" in vars(backbone)        # instance attribute: the compiled callable


@pytest.mark.slow
def test_compiled_backbone_trains_and_exports(tmp_path, cache_root):
    summary = train(tiny_cfg(tmp_path / "run", cache_root, extra=["compile=true", "trainer.max_steps=2"]))
    assert summary["steps"] == 2
    backbone, _, _ = load_encoder(tmp_path / "run" / "encoder")
    assert backbone.embed(torch.zeros(1, 12, 250)).shape == (1, backbone.num_features)


@pytest.mark.realdata
def test_pretrain_on_ptbxl_fixture(tmp_path, fixture_dir):
    """data=ptbxl prepares the PTB-XL cache from paths.data_root on first use (the 100-record fixture here)."""
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache",
                   extra=["data=ptbxl", f"paths.data_root={fixture_dir}", "data.num_workers=0",
                          "data.cache_dirs.0.workers=0", "trainer.max_steps=2"])
    summary = train(cfg)
    assert summary["steps"] == 2
    assert Path(summary["cache_dirs"][0]).name.startswith("ptbxl-")
    from ecgfm.data.cache import CorpusCache

    assert len(CorpusCache(summary["cache_dirs"][0])) == 100


def test_no_logger_trains(tmp_path, cache_root):
    summary = train(tiny_cfg(tmp_path / "run", cache_root, extra=["~logger", "trainer.max_steps=1"]))
    assert summary["steps"] == 1
    assert not (tmp_path / "run" / "csv").exists()


def test_find_resume_checkpoint_prefers_the_furthest_step(tmp_path):
    import os

    from ecgfm.pipelines import find_resume_checkpoint

    def ckpt(path: Path, step: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "global_step": step}, path)
        return path

    assert find_resume_checkpoint(tmp_path, None) is None
    last = ckpt(tmp_path / "checkpoints" / "last.ckpt", 4)
    assert find_resume_checkpoint(tmp_path, None) == str(last)
    hpc = ckpt(tmp_path / "hpc_ckpt_1.ckpt", 5)          # Lightning's SLURM pre-emption checkpoint
    os.utime(last, ns=(1, 1))
    assert find_resume_checkpoint(tmp_path, None) == str(hpc)
    assert find_resume_checkpoint(tmp_path, str(last)) == str(last)
    periodic = ckpt(tmp_path / "checkpoints" / "step0000002.ckpt", 2)
    os.utime(periodic, ns=(2, 2))
    hpc.write_bytes(b"x")                                 # damaged: skipped
    # a run folder copied without its times: the periodic checkpoint of step 2 is the newer file, but last.ckpt
    # holds the run's state when it stopped (resuming from the "newest" file recomputed two steps)
    assert find_resume_checkpoint(tmp_path, None) == str(last)
    # no loadable last.ckpt: the periodic checkpoint of the furthest step, whatever the file times say
    later = ckpt(tmp_path / "checkpoints" / "step0000003.ckpt", 3)
    os.utime(later, ns=(1, 1))
    last.write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path, None) == str(later)


def test_cli_prints_where_everything_is(tmp_path, cache_root):
    """python train.py ends with one block naming the encoder, run folder, logs, summary and the next command."""
    import subprocess
    import sys

    out = tmp_path / "run"
    overrides = [o for o in TINY if o != "trainer.max_steps=3"]
    cmd = [sys.executable, str(ROOT / "train.py"), "+experiment=mae", *overrides, *METHOD_TINY["mae"],
           "trainer.max_steps=1", f"paths.cache_root={cache_root}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the final checkpoint is saved as the whole training state on purpose: no "weights_only ... defaulting" line
    assert "was not set, defaulting" not in proc.stdout + proc.stderr + (out / "train.log").read_text()
    block = proc.stdout[proc.stdout.index("== training finished"):]
    summary = json.loads((out / "summary.json").read_text())
    # the backbone's size beside its registry name (a config builds a registry backbone with other arguments)
    assert f"({summary['n_parameters'] / 1e6:.2g} M parameters)" in block.splitlines()[0]
    assert f"encoder     {out / 'encoder'}" in block
    assert "fs 100 Hz, crop 2.5 s = 250 samples" in block
    assert str(out) in block and str(out / "summary.json") in block
    assert summary["log_dir"] in block and Path(summary["log_dir"]).is_dir()
    assert f"python probe.py checkpoint={out / 'encoder'} task=synthetic" in block
    assert f"python finetune.py checkpoint={out / 'encoder'} task=synthetic" in block
    # what it trained on: the split's record counts (the summary gave only the cache folders)
    counts = summary["records"]
    assert counts["train"] > 0 and counts["val"] > 0 and counts["skipped_while_preparing"] == 0
    assert f"records     {counts['train']} training, {counts['val']} validation" in block
    # out_dir= another folder than hydra.run.dir: refused in one line (train.log and .hydra/ went to the other)
    bad = subprocess.run([*cmd[:-1], f"hydra.run.dir={tmp_path / 'hydra'}", f"out_dir={tmp_path / 'other'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: config key 'out_dir'")
    assert not (tmp_path / "other").exists()


def test_folder_of_wfdb_records(tmp_path, cache_root):
    """data=folder: a WFDB folder with a labels CSV (relative to the folder) is cached and trained on."""
    from ecgfm.data.synthetic import write_wfdb

    folder = tmp_path / "wfdb"
    write_wfdb(folder, 12, seed=5, duration=5.0)
    cfg = tiny_cfg(tmp_path / "run", cache_root,
                   extra=["data=folder", f"data.params.root={folder}", "data.params.labels_csv=labels.csv",
                          "data.params.label_columns=[label]", "data.params.patient_column=patient_id",
                          "data.num_workers=0", "data.cache_dirs.0.workers=0", "trainer=debug"])
    summary = train(cfg)
    assert summary["steps"] == 1
    from ecgfm.data.cache import CorpusCache

    assert len(CorpusCache(summary["cache_dirs"][0])) == 12
    assert summary["records"]["train"] + summary["records"]["val"] == 12


def test_only_the_newest_periodic_checkpoints_are_kept(tmp_path, cache_root):
    out = tmp_path / "run"
    train(tiny_cfg(out, cache_root, extra=["trainer.max_steps=8", "checkpoint.every_n_train_steps=2",
                                           "checkpoint.save_top_k=2"]))
    names = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step0000006.ckpt", "step0000008.ckpt"]


def test_cpu_linear_backends_train_the_same_model(tmp_path, cache_root):
    """cpu_linear=onednn changes the GEMM library, not the mathematics: same losses and weights as ATen/MKL."""
    from ecgfm.accel import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    runs = {}
    for mode in ("aten", "onednn"):
        out = tmp_path / mode
        runs[mode] = train(tiny_cfg(out, cache_root, extra=[f"cpu_linear={mode}"]))
        runs[mode]["state"] = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    a, b = runs["aten"], runs["onednn"]
    assert a["steps"] == b["steps"] == 3
    assert math.isclose(a["first_loss"], b["first_loss"], rel_tol=1e-5)
    assert math.isclose(a["last_loss"], b["last_loss"], rel_tol=1e-4)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        # atol: the key part of a qkv bias has a true gradient of 0 (softmax ignores it), so Adam scales
        # rounding noise of either library up to ~lr-sized steps there (3e-5 after 3 steps at lr 1e-3)
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=1e-4, atol=1e-4, msg=k)


def test_simclr_augments_at_the_cache_rate(tmp_path):
    """A cache prepared at 250 Hz (preprocess.fs says 100): SimCLR's augmentations in seconds and Hz (time masks,
    baseline wander, low-pass) run at 250 Hz, the rate its crops are cut at, not at preprocess.fs."""
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    cache = tmp_path / "cache" / "syn250"
    prepare_corpus(SyntheticSource(24, seed=3, duration=6.0), cache, PreprocessSpec(fs=250.0), workers=0,
                   progress=False)
    tiny = [o for o in TINY if not o.startswith(("data.params.", "backbone="))]
    overrides = ["+experiment=simclr", "backbone=resnet1d_test", "data=cached", f"data.cache_dirs=[{cache}]",
                 "data.num_workers=0", f"out_dir={tmp_path / 'run'}", *tiny, *METHOD_TINY["simclr"]]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    summary = train(cfg)
    assert summary["fs"] == 250.0
    hp = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["fs"] == 250.0


def test_resumed_runs_step_on_their_own_schedule_and_settings(tmp_path, cache_root, monkeypatch):
    """An extended run (same folder, larger trainer.max_steps) took its first step at the old schedule's end value
    (0), and resume=<ckpt> with a new method.lr kept the checkpoint's: every step now uses this run's lr and
    schedule at the restored step."""
    import lightning as L

    import ecgfm.train.run as run_mod
    from ecgfm.optim import warmup_cosine

    seen: dict[int, float] = {}

    class LR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    real = run_mod.build_callbacks

    def with_lr(*a, **kw):
        cbs, hist = real(*a, **kw)
        return [*cbs, LR()], hist

    monkeypatch.setattr(run_mod, "build_callbacks", with_lr)
    out = tmp_path / "run"
    train(tiny_cfg(out, cache_root))                                          # 3 steps, the schedule ends at 0
    cfg = tiny_cfg(out, cache_root, extra=["trainer.max_steps=6"])
    train(cfg)
    lr, warm = float(cfg.method.lr), int(cfg.method.warmup_steps)
    assert seen[3] == pytest.approx(lr * warmup_cosine(3, warm, 6)) and seen[3] > 0
    seen.clear()
    cfg = tiny_cfg(tmp_path / "again", cache_root, extra=[f"resume={out / 'checkpoints' / 'step0000002.ckpt'}",
                                                          "method.lr=0.01"])
    train(cfg)
    assert seen[2] == pytest.approx(0.01 * warmup_cosine(2, warm, 3))


def test_rerun_on_other_data_is_refused_and_a_deliberate_one_records_every_cache(tmp_path, cache_root):
    """A rerun into a run folder with another corpus (or mixture settings) resumed silently and exported only the
    new cache as the encoder's pretraining data; the leakage guard never heard of the first one."""
    out = tmp_path / "run"
    first = train(tiny_cfg(out, cache_root))
    with pytest.raises(ConfigError, match=r"trained on other data \(caches .*data.val_fraction: 0.2 -> 0.5"):
        train(tiny_cfg(out, cache_root, extra=["data.params.n_records=30", "data.val_fraction=0.5",
                                               "trainer.max_steps=5"]))
    again = train(tiny_cfg(tmp_path / "more", cache_root, extra=[
        f"resume={out / 'checkpoints' / 'last.ckpt'}", "data.params.n_records=30", "trainer.max_steps=5"]))
    _, _, info = load_encoder(again["encoder_dir"])
    assert info["extra"]["pretrain_caches"] == [str(Path(c).resolve()) for c in
                                               first["cache_dirs"] + again["cache_dirs"]]
    from ecgfm.data.cache import cache_digest   # what each held, so the leakage guard can tell a changed cache

    assert info["extra"]["pretrain_cache_digests"] == {c: cache_digest(c) for c in info["extra"]["pretrain_caches"]}


def test_trainer_callbacks_from_the_config_join_the_pipelines(tmp_path, cache_root):
    """+trainer.callbacks=[...] was silently replaced by the pipeline's callbacks; logger / default_root_dir, which
    the pipeline sets, are refused with the way to set them."""
    out = tmp_path / "run"
    train(tiny_cfg(out, cache_root, extra=[
        "logger=csv", "+trainer.callbacks=[{_target_: lightning.pytorch.callbacks.LearningRateMonitor}]"]))
    header = next((out / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "lr-AdamW" in header                      # LearningRateMonitor ran
    assert "train/lr" in header                      # logged by every method (docs/TRAINING.md), monitor or not
    with pytest.raises(ConfigError, match="trainer.default_root_dir.*hydra.run.dir"):
        train(tiny_cfg(tmp_path / "x", cache_root, extra=[f"+trainer.default_root_dir={tmp_path}"]))


def test_a_run_stopped_before_its_schedule_ends_says_so(tmp_path, cache_root, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ecgfm.train.run"):
        s = train(tiny_cfg(tmp_path / "run", cache_root, extra=["trainer.max_steps=10", "+trainer.max_epochs=1"]))
    assert s["steps"] == 2 and "stopped at step 2 of the 10" in caplog.text


def test_a_rerun_into_a_finished_run_trains_nothing_and_keeps_its_summary(tmp_path, cache_root):
    """Same folder, same max_steps: fit has nothing to do; the finished run's summary.json (validation metrics,
    partial-epoch count) must not be overwritten by an empty one, and the report says nothing was trained."""
    from ecgfm.train.report import final_block

    out = tmp_path / "run"
    first = train(tiny_cfg(out, cache_root))
    before = (out / "summary.json").read_text()
    again = train(tiny_cfg(out, cache_root))
    assert again["nothing_trained"] and again["steps"] == first["steps"]
    assert (out / "summary.json").read_text() == before
    assert "already complete" in final_block(again)


@pytest.mark.parametrize("override, key", [("method.mask_ratio=1.5", "method"), ("data.batch_size=0", "data")])
def test_a_value_a_constructor_refuses_is_a_config_error(tmp_path, cache_root, override, key):
    with pytest.raises(ConfigError) as info:
        train(tiny_cfg(tmp_path / "run", cache_root, extra=[override]))
    assert info.value.key == key


def test_gpu_trainer_preset_with_mixed_precision_and_clipping_trains(tmp_path, cache_root):
    """trainer=gpu / ddp (bf16-mixed + gradient_clip_val 1.0) stopped at the first step: the fused AdamW unscales
    its gradients itself and Lightning refuses to clip them. Run here on the CPU with the preset's precision and
    clipping (a GPU has the same optimiser path)."""
    summary = train(tiny_cfg(tmp_path / "run", cache_root,
                             extra=["trainer=gpu", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=2",
                                    "trainer.log_every_n_steps=1"]))
    assert summary["steps"] == 2


def test_fused_adamw_only_where_lightning_can_clip():
    from types import SimpleNamespace

    from ecgfm.optim import fused_allowed

    assert fused_allowed(None) and fused_allowed(SimpleNamespace(precision="32-true", gradient_clip_val=1.0))
    assert fused_allowed(SimpleNamespace(precision="bf16-mixed", gradient_clip_val=None))
    assert not fused_allowed(SimpleNamespace(precision="bf16-mixed", gradient_clip_val=1.0))
    assert not fused_allowed(SimpleNamespace(precision="16-mixed", gradient_clip_val=0.5))


class InterruptAt(L.Callback):
    """Raise an interrupt (as Lightning raises them on Ctrl-C / SIGTERM) after ``step`` optimiser steps."""

    def __init__(self, step: int, kind: str) -> None:
        self.step, self.kind = int(step), kind

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException() if self.kind == "SIGTERM" else KeyboardInterrupt()


@pytest.mark.parametrize("kind,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_run_writes_last_ckpt_and_exits_with_the_signal_status(tmp_path, cache_root, capsys, kind,
                                                                                status):
    """Ctrl-C ended with status 1 and SIGTERM with 0 (success, to a scheduler), both without last.ckpt: the steps
    since the last periodic checkpoint were lost. Now last.ckpt holds the step reached, one error line says so, and
    a rerun resumes there."""
    target = f"{__name__}.InterruptAt"
    run = tmp_path / "run"
    extra = ["trainer.max_steps=8", "checkpoint.every_n_train_steps=100",
             f"+trainer.callbacks=[{{_target_: {target}, step: 3, kind: {kind}}}]"]
    with pytest.raises(SystemExit) as info:
        train(tiny_cfg(run, cache_root, extra=extra))
    assert info.value.code == status
    err = capsys.readouterr().err
    assert f"error: interrupted ({kind})" in err and "written at step 3: rerun the same command to resume" in err
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    summary = train(tiny_cfg(run, cache_root, extra=["trainer.max_steps=8", "checkpoint.every_n_train_steps=100"]))
    assert summary["steps"] == 8


def test_a_run_folder_in_use_is_refused(tmp_path, cache_root):
    """Two runs started in the same second got one Hydra run folder and wrote over each other (the first run's
    config, encoder and summary were lost). The folder is locked for the run: the second stops at once."""
    from ecgfm.io import file_lock

    run = tmp_path / "run"
    with file_lock(run / ".train.lock"):           # another run holds the folder
        with pytest.raises(ConfigError, match=r"in use by another training run.*hydra\.run\.dir"):
            train(tiny_cfg(run, cache_root))
    assert not (run / "checkpoints").exists()
    assert train(tiny_cfg(run, cache_root))["steps"] > 0        # free again: runs


def test_a_failing_point_of_a_multirun_does_not_stop_the_others(tmp_path, cache_root):
    """A user error in one job (here a schedule shorter than the warm-up) ended the whole sweep at that job (the
    error's SystemExit went past Hydra's launcher); now that job fails with its error line, the next job runs, and
    the sweep ends non-zero."""
    import subprocess
    import sys

    overrides = [o for o in TINY if o not in ("trainer.max_steps=3", "method.warmup_steps=1")]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=mae", *overrides, *METHOD_TINY["mae"],
           "trainer.max_steps=1", "method.warmup_steps=1", "method.max_steps=-1,20", f"paths.cache_root={cache_root}",
           f"hydra.sweep.dir={tmp_path / 'mr'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "error: config key 'method'" in proc.stderr
    assert (tmp_path / "mr" / "1" / "summary.json").is_file(), proc.stderr[-2000:]   # the second job ran
