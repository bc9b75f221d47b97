"""probe.py / finetune.py cells: resumable sweep, one frozen pass per checkpoint and corpus, leakage guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ecgfm.evaluate import features as F
from ecgfm.evaluate.leakage import LeakageError
from ecgfm.evaluate.sweep import cell_path, finetune_main, probe_main

ROOT = Path(__file__).resolve().parents[2]


def _cfg(name: str, tmp: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=180", "bootstrap.n=50", "plot=true", "torch_threads=1"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose(name, overrides=base + list(overrides))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


def test_probe_sweep_resumes_and_extracts_once(work):
    before = dict(F.STATS)
    cfg = _cfg("probe", work, "checkpoint=random:resnet1d_test", "fraction=[0.3,1.0]", "seed=[0,1]",
               "probe.Cs=[0.1,1.0]")
    out = probe_main(cfg)
    assert len(out["cells_written"]) == 4 and out["cells_skipped"] == 0
    cell = json.loads(Path(out["cells_written"][-1]).read_text())
    assert cell["mode"] == "linear" and cell["method"] == "random-init" and cell["dataset"] == "synthetic"
    assert cell["results"]["test"]["macro_auroc"]["value"] > 0.8  # separable synthetic classes
    assert cell["task_notes"] == [] or all("patient" not in n for n in cell["task_notes"])
    assert F.STATS["extractions"] == before.get("extractions", 0) + 1

    # rerun: every cell exists -> nothing recomputed, no encoder pass
    again = probe_main(cfg)
    assert again["cells_written"] == [] and again["cells_skipped"] == 4
    assert F.STATS["extractions"] == before.get("extractions", 0) + 1

    # new cells of the same checkpoint and corpus: heads retrained on the cached features, no new pass
    more = probe_main(_cfg("probe", work, "checkpoint=random:resnet1d_test", "fraction=0.1", "seed=2",
                           "probe.Cs=[1.0]"))
    assert len(more["cells_written"]) == 1
    assert F.STATS["extractions"] == before.get("extractions", 0) + 1
    assert F.STATS["cache_hits"] >= before.get("cache_hits", 0) + 1

    # the 10 % subset of seed 2 is the one any method gets (cell records n_train)
    c = json.loads(Path(more["cells_written"][0]).read_text())
    assert 0 < c["n_train"] < cell["n_train"]
    # ... and names its training records by identity: every 100 % cell the same records, the 10 % subset others
    full = [json.loads(Path(p).read_text()) for p in out["cells_written"]]
    digests = {x["fraction"]: set() for x in full}
    for x in full:
        digests[x["fraction"]].add(x["train_records"])
    assert len(digests[1.0]) == 1 and len(next(iter(digests[1.0]))) == 16
    assert len(digests[0.3]) == 2                  # seeds 0 and 1 draw different 30 % subsets
    assert c["train_records"] not in digests[1.0] | digests[0.3]

    # report: tidy CSV, Markdown, plot
    res = work / "results"
    import pandas as pd

    df = pd.read_csv(res / "results.csv")
    assert {"mode", "task", "dataset", "split", "method", "fraction", "seed", "metric", "value", "ci_low",
            "ci_high"} <= set(df.columns)
    assert set(df["fraction"]) == {0.1, 0.3, 1.0} and set(df["seed"]) == {0, 1, 2}
    assert (res / "results.png").stat().st_size > 0
    assert "random-init" in (res / "results.md").read_text()


def test_finetune_cell_and_supervised_baseline(work):
    cfg = _cfg("finetune", work, "checkpoint=supervised:resnet1d_test", "fraction=0.3", "seed=1",
               "finetune.epochs=2", "finetune.batch_size=32", "finetune.patience=2")
    out = finetune_main(cfg)
    assert len(out["cells_written"]) == 1
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["mode"] == "finetune" and cell["method"] == "supervised"
    assert cell["finetune"]["layer_decay"] == 1.0  # the supervised recipe
    assert 0.0 <= cell["results"]["test"]["macro_auroc"]["value"] <= 1.0
    assert cell["epochs_run"] >= 1
    assert finetune_main(cfg)["cells_skipped"] == 1
    # its training records are those of a probe cell of the same fraction and seed (same split, same subset rule;
    # below 100 % of the labels, where a different rule would draw another subset)
    probe = probe_main(_cfg("probe", work, "checkpoint=random:resnet1d_test", "fraction=0.3", "seed=1"))
    pcell = json.loads(Path((probe["cells_written"] or [None])[0] or next(
        (work / "results" / "cells" / "linear").rglob("f0.3_s1.json"))).read_text())
    assert pcell["train_records"] == cell["train_records"]
    assert pcell["n_train"] == cell["n_train"] and cell["fraction"] == pcell["fraction"] == 0.3
    md = (work / "results" / "results.md").read_text()
    assert "fine-tune" in md


def test_supervised_checkpoint_is_not_a_probe(work):
    with pytest.raises(ValueError, match="fine-tuning baseline"):
        probe_main(_cfg("probe", work, "checkpoint=supervised:resnet1d_test"))


def test_leakage_guard_in_the_pipeline(work, tmp_path):
    # an "encoder pretrained on" the downstream cache itself: the test split is in it
    probe_main(_cfg("probe", work, "checkpoint=random:resnet1d_test", "fraction=1.0", "seed=0"))
    cache_dir = next(p for p in (work / "cache").iterdir() if p.name.startswith("synthetic-"))
    cfg = _cfg("probe", work, "checkpoint=random:resnet1d_test", f"pretrain_caches=[{cache_dir}]",
               f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0")
    with pytest.raises(LeakageError, match="shares"):
        probe_main(cfg)
    cfg = _cfg("probe", work, "checkpoint=random:resnet1d_test", f"pretrain_caches=[{cache_dir}]",
               f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0", "allow_leakage=true")
    out = probe_main(cfg)
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["leakage"]["leaked"] and cell["leakage"]["test"]["n_shared_records"] > 0
    # the leaked cell exists now: a rerun without allow_leakage must still stop (it skipped the finished cell
    # before the guard ran), the probe's and the fine-tune's
    cfg = _cfg("probe", work, "checkpoint=random:resnet1d_test", f"pretrain_caches=[{cache_dir}]",
               f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0")
    with pytest.raises(LeakageError, match="shares"):
        probe_main(cfg)
    assert "[LEAKED" in (tmp_path / "r" / "results.md").read_text()   # and the table says what the row is


def test_cell_paths_are_distinct():
    a = cell_path("r", "linear", "t", "runs/a/encoder", 0.1, 0)
    b = cell_path("r", "linear", "t", "runs/b/encoder", 0.1, 0)
    c = cell_path("r", "linear", "t", "runs/a/encoder", 0.1, 0, eval_name="folder")
    assert len({a, b, c}) == 3 and np.all([p.suffix == ".json" for p in (a, b, c)])


def test_exported_encoder_probe_and_paired_comparison(work):
    """A checkpoint path (ecgfm.export format) next to its random-init twin: method names, leakage note, and
    the paired comparison table in the report."""
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    torch.manual_seed(123)
    enc_dir = export_encoder(create_backbone("resnet1d_test"), work / "runs" / "toy" / "encoder", PreprocessSpec(),
                             extra={"method": "ToyModule", "crop_samples": 250})
    res = work / "results_pair"
    outs = [probe_main(_cfg("probe", work, f"checkpoint={ck}", f"results_dir={res}", "fraction=1.0", "seed=0",
                            "probe.Cs=[1.0]"))
            for ck in (str(enc_dir), f"random:{enc_dir}")]
    cells = [json.loads(Path(o["cells_written"][0]).read_text()) for o in outs]
    assert [c["method"] for c in cells] == ["toy", "random-init"]
    assert cells[0]["backbone"] == cells[1]["backbone"] == "resnet1d_test"
    assert cells[0]["encoder_fingerprint"] != cells[1]["encoder_fingerprint"]
    assert cells[0]["leakage"]["checked"] is False  # no record of its pretraining data: said, not hidden
    assert len(cells[0]["predictions"]["test"]["keys"]) == cells[0]["splits"]["test"]
    import pandas as pd

    comp = pd.read_csv(res / "comparisons.csv")
    assert list(comp["method"]) == ["toy"] and comp["ci_low"].iloc[0] <= comp["delta"].iloc[0]
    assert "Paired comparison" in (res / "results.md").read_text()

    # a rerun skips the cell; an encoder retrained into the same folder gets its cell recomputed
    again = _cfg("probe", work, f"checkpoint={enc_dir}", f"results_dir={res}", "fraction=1.0", "seed=0",
                 "probe.Cs=[1.0]")
    assert probe_main(again)["cells_skipped"] == 1
    torch.manual_seed(7)
    export_encoder(create_backbone("resnet1d_test"), enc_dir, PreprocessSpec(),
                   extra={"method": "ToyModule", "crop_samples": 250})
    assert len(probe_main(again)["cells_written"]) == 1


def test_mlp_probe_mode_uses_the_same_features(work):
    mlp = ["checkpoint=random:resnet1d_test", "probe.mode=mlp", "probe.lrs=[0.01]", "probe.mlp.epochs=60",
           "probe.mlp.hidden_dim=32", "fraction=1.0"]
    out = probe_main(_cfg("probe", work, *mlp, "seed=0"))
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["mode"] == "mlp" and "/mlp/" in out["cells_written"][0]
    assert cell["results"]["test"]["macro_auroc"]["value"] > 0.7
    before = F.STATS["extractions"]
    probe_main(_cfg("probe", work, *mlp, "seed=1"))
    assert F.STATS["extractions"] == before  # the features of this encoder and corpus are on disk


def test_report_callback_builds_the_table_at_multirun_end(work, tmp_path):
    """The fast path of the CLI multirun: jobs skip the report (report=never here), the callback builds it."""
    from ecgfm.evaluate.sweep import ReportCallback

    res = tmp_path / "r"
    cfg = _cfg("probe", work, "checkpoint=random:resnet1d_test", f"results_dir={res}", "fraction=1.0", "seed=0",
               "report=never")
    out = probe_main(cfg)
    assert out["report"] is None and not (res / "results.csv").exists()
    ReportCallback().on_multirun_end(_cfg("probe", work, f"results_dir={res}"))
    assert (res / "results.csv").exists() and (res / "results.md").exists()


def test_multirun_over_a_recipe_setting_keeps_every_recipe(work, tmp_path, monkeypatch):
    """``probe.py -m probe.Cs=[0.1],[10.0]``: both jobs have one cell path; the second job must not replace the
    first one's cell (the table would silently hold the last recipe only). Each recipe keeps its file; a rerun of
    the multirun skips both; a later run (another multirun, or none) replaces a stale plain cell as before."""
    from ecgfm.evaluate import sweep as S
    from ecgfm.evaluate.report import load_cells

    res = tmp_path / "r"
    monkeypatch.setattr(S, "_in_multirun", lambda: True)
    monkeypatch.setenv(S.SWEEP_ENV, "sweep-1")
    job = ["checkpoint=random:resnet1d_test", f"results_dir={res}", "fraction=1.0", "seed=0", "report=never"]
    a = probe_main(_cfg("probe", work, *job, "probe.Cs=[0.1]"))
    b = probe_main(_cfg("probe", work, *job, "probe.Cs=[10.0]"))
    assert len(a["cells_written"]) == len(b["cells_written"]) == 1
    pa, pb = Path(a["cells_written"][0]), Path(b["cells_written"][0])
    assert pa.name == "f1_s0.json" and pb.name.startswith("f1_s0.r") and pb.parent == pa.parent
    ca, cb = json.loads(pa.read_text()), json.loads(pb.read_text())
    assert ca["sweep"] == cb["sweep"] == "sweep-1" and ca["recipe_id"] != cb["recipe_id"]
    assert ca["hparam"] != cb["hparam"]
    assert ca["not_converged"] == cb["not_converged"] == []     # every C of both grids converged (recorded)
    cells = load_cells(res)
    assert len(cells) == 2 and len({c["label"] for c in cells}) == 2       # two rows, "[recipe <hash>]"
    # the same multirun again (another id): every cell is found, nothing recomputed
    monkeypatch.setenv(S.SWEEP_ENV, "sweep-2")
    for cs in ("[0.1]", "[10.0]"):
        again = probe_main(_cfg("probe", work, *job, f"probe.Cs={cs}"))
        assert again["cells_written"] == [] and again["cells_skipped"] == 1
    # outside a multirun, a new recipe replaces the stale plain cell (the documented rerun behaviour)
    monkeypatch.setattr(S, "_in_multirun", lambda: False)
    c = probe_main(_cfg("probe", work, *job, "probe.Cs=[1.0]"))
    assert c["cells_written"] == [str(pa)] and json.loads(pa.read_text())["sweep"] is None
    assert len(load_cells(res)) == 2


@pytest.mark.slow
def test_cli_multirun_builds_one_table(work, tmp_path):
    """`python probe.py -m ...`: one job per cell, the table built once by the sweep's Hydra callback."""
    import os
    import subprocess
    import sys

    res = tmp_path / "multirun_results"
    cmd = [sys.executable, "probe.py", "-m", "checkpoint=random:resnet1d_test,random:vit1d_test", "task=synthetic",
           "fraction=0.5,1", "seed=0", "task.params.n_records=180", f"paths.cache_root={work / 'cache'}",
           f"results_dir={res}", "bootstrap.n=20", "prepare_workers=0", "torch_threads=1", "plot=false",
           f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Launching 4 jobs" in proc.stdout + proc.stderr
    cells = sorted((res / "cells").rglob("*.json"))
    assert len(cells) == 4
    import pandas as pd

    df = pd.read_csv(res / "results.csv")  # written once, by ReportCallback.on_multirun_end
    assert df["cell"].nunique() == 4 and set(df["method"]) == {"random-init"}
    assert set(df["backbone"]) == {"resnet1d_test", "vit1d_test"}


# ------------------------------------------------------------------------------ issue 9: cell identity, crop rate
def _toy_encoder(path: Path, seed: int, fs: float | None = 100.0, extra_fs: float | None = None):
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    torch.manual_seed(seed)
    extra = {"method": "ToyModule", "crop_samples": 250}
    if extra_fs is not None:
        extra["fs"] = extra_fs
    return export_encoder(create_backbone("resnet1d_test"), path, PreprocessSpec(fs=fs), extra=extra)


@pytest.mark.parametrize("change", ["probe.Cs=[0.1]", "window_seconds=2.0",
                                    "stride_seconds=1.0", "bootstrap.n=30", "task.params.n_records=200",
                                    "preprocess={fs:100.0,highpass:1.0}"])
def test_changed_recipe_recomputes_the_cell(work, tmp_path, caplog, change):
    """A finished cell is reused only for the same recipe: a changed probe grid, aggregation, window, stride,
    bootstrap, task or preprocessing recomputes it, and the log says what changed."""
    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "probe.Cs=[1.0]", "plot=false"]
    first = probe_main(_cfg("probe", work, *base))
    assert len(first["cells_written"]) == 1
    assert probe_main(_cfg("probe", work, *base))["cells_skipped"] == 1
    caplog.set_level("INFO", logger="ecgfm.evaluate.sweep")
    again = probe_main(_cfg("probe", work, *base, change))
    assert len(again["cells_written"]) == 1, change
    key = change.split("=")[0].split(".")[-1].strip("{")
    assert any("recipe changed" in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert any(key in r.getMessage() for r in caplog.records if "recipe changed" in r.getMessage()), key


def test_probe_variants_are_rows_of_their_own(work, tmp_path):
    """Another record aggregation is another probe variant: its cells live beside the default ones (mode folder
    ``linear+mean_prediction``) instead of overwriting them, and the table gets a row for each."""
    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "probe.Cs=[1.0]", "plot=false"]
    first = probe_main(_cfg("probe", work, *base))
    other = probe_main(_cfg("probe", work, *base, "probe.aggregate=mean_prediction"))
    assert len(first["cells_written"]) == len(other["cells_written"]) == 1
    assert Path(first["cells_written"][0]).parts[-4] == "linear"
    assert Path(other["cells_written"][0]).parts[-4] == "linear+mean_prediction"
    assert probe_main(_cfg("probe", work, *base))["cells_skipped"] == 1          # the default cell is still there
    import pandas as pd

    df = pd.read_csv(tmp_path / "r" / "results.csv")
    assert set(df["mode"]) == {"linear", "linear+mean_prediction"}


def test_changed_finetune_recipe_recomputes(work, tmp_path, caplog):
    base = ["checkpoint=supervised:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "finetune.epochs=1", "finetune.batch_size=32", "finetune.patience=1", "plot=false"]
    assert len(finetune_main(_cfg("finetune", work, *base))["cells_written"]) == 1
    assert finetune_main(_cfg("finetune", work, *base))["cells_skipped"] == 1
    caplog.set_level("INFO", logger="ecgfm.evaluate.sweep")
    for change in ("supervised.lr=0.003", "supervised.window_aggregate=prob", "finetune.head=mlp"):
        out = finetune_main(_cfg("finetune", work, *base, change))
        assert len(out["cells_written"]) == 1, change
    msgs = " ".join(r.getMessage() for r in caplog.records if "recipe changed" in r.getMessage())
    assert "lr" in msgs and "window_aggregate" in msgs and "head" in msgs


def test_cell_without_identity_is_not_reused(work, tmp_path, caplog):
    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "probe.Cs=[1.0]", "plot=false"]
    p = Path(probe_main(_cfg("probe", work, *base))["cells_written"][0])
    cell = json.loads(p.read_text())
    for k in ("checkpoint_id", "recipe_id", "recipe", "checkpoint_identity"):
        cell.pop(k, None)
    p.write_text(json.dumps(cell))                       # as written by an older ecgfm
    caplog.set_level("INFO", logger="ecgfm.evaluate.sweep")
    assert len(probe_main(_cfg("probe", work, *base))["cells_written"]) == 1
    assert any("no checkpoint / recipe identity" in r.getMessage() for r in caplog.records)
    assert json.loads(p.read_text())["checkpoint_id"]
    p.write_text('{"mode": "linear", "trunc')            # a torn / corrupted cell: recomputed, not a crash
    assert len(probe_main(_cfg("probe", work, *base))["cells_written"]) == 1
    assert any("unreadable cell" in r.getMessage() for r in caplog.records)


def test_random_init_seed_is_part_of_the_identity(work, tmp_path):
    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "probe.Cs=[1.0]", "plot=false"]
    a = json.loads(Path(probe_main(_cfg("probe", work, *base))["cells_written"][0]).read_text())
    out = probe_main(_cfg("probe", work, *base, "init_seed=5"))
    assert len(out["cells_written"]) == 1
    b = json.loads(Path(out["cells_written"][0]).read_text())
    assert a["checkpoint_id"] != b["checkpoint_id"] and a["recipe_id"] == b["recipe_id"]


def test_two_checkpoints_of_one_method_are_not_averaged_as_seeds(work, tmp_path):
    """Two different encoders of the same method: two rows in the table (method + short hash), each with its
    own seed count; the same weights copied to another folder keep their identity."""
    import shutil

    import pandas as pd

    a = _toy_encoder(tmp_path / "a" / "encoder", seed=1)
    b = _toy_encoder(tmp_path / "b" / "encoder", seed=2)
    c = tmp_path / "c" / "encoder"
    shutil.copytree(a, c)
    res = tmp_path / "r"
    cells = []
    for ck in (a, b, c):
        out = probe_main(_cfg("probe", work, f"checkpoint={ck}", f"results_dir={res}", "fraction=1.0", "seed=0",
                              "probe.Cs=[1.0]", "plot=false"))
        cells.append(json.loads(Path(out["cells_written"][0]).read_text()))
    assert cells[0]["checkpoint_id"] != cells[1]["checkpoint_id"]
    assert cells[0]["checkpoint_id"] == cells[2]["checkpoint_id"]      # content, not path
    assert cells[0]["recipe_id"] == cells[1]["recipe_id"]
    md = (res / "results.md").read_text()
    auroc = md.split("## macro_auroc")[1].split("## ")[0]
    rows = [line for line in auroc.splitlines() if line.startswith("| toy")]
    assert len(rows) == 2, md
    assert {cells[0]["checkpoint_id"][:7], cells[1]["checkpoint_id"][:7]} == \
        {r.split("|")[1].strip().split("@")[1].split(" [")[0] for r in rows}
    assert all("[leakage not checked]" in r for r in rows)     # toy exports: no pretraining provenance, said
    assert all(r.rstrip(" |").endswith("(1)") for r in rows)          # one seed each, a and c not double counted
    df = pd.read_csv(res / "results.csv")
    assert df["checkpoint_id"].nunique() == 2


def test_encoder_rate_mismatch_is_refused(work, tmp_path):
    """A 100 Hz encoder: the synthetic task's records (500 Hz) are resampled into a 100 Hz cache; a preprocessing
    override at another rate is refused with one clear line instead of feeding 250 Hz windows to it."""
    enc = _toy_encoder(tmp_path / "e100" / "encoder", seed=3, fs=100.0, extra_fs=100.0)
    base = [f"checkpoint={enc}", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0", "probe.Cs=[1.0]",
            "plot=false"]
    cell = json.loads(Path(probe_main(_cfg("probe", work, *base))["cells_written"][0]).read_text())
    assert cell["fs"] == 100.0 and cell["window_samples"] == 250
    with pytest.raises(ValueError, match=r"trained at 100 Hz.*250"):
        probe_main(_cfg("probe", work, *base, "preprocess={fs:250.0}"))
    with pytest.raises(ValueError, match=r"trained at 100 Hz.*250"):
        finetune_main(_cfg("finetune", work, *base[:-2], "preprocess={fs:250.0}", "finetune.epochs=1"))


def test_encoder_without_a_spec_rate_gets_a_cache_at_its_rate(work, tmp_path):
    """encoder.json keeps the record rate (preprocess.fs null) but says it was trained at 100 Hz: the task
    cache is built at 100 Hz (the synthetic records are 500 Hz), never fed at 500 Hz."""
    enc = _toy_encoder(tmp_path / "enone" / "encoder", seed=4, fs=None, extra_fs=100.0)
    out = probe_main(_cfg("probe", work, f"checkpoint={enc}", f"results_dir={tmp_path / 'r'}", "fraction=1.0",
                          "seed=0", "probe.Cs=[1.0]", "plot=false"))
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["fs"] == 100.0 and cell["window_samples"] == 250 and cell["preprocess"]["fs"] == 100.0


def test_cli_user_errors_are_one_line(work, tmp_path, capsys):
    """probe.py / finetune.py through run_cli: a refused run ends with one 'error: ...' line and exit 2."""
    from ecgfm.evaluate.sweep import EXIT_USER_ERROR, run_cli

    enc = _toy_encoder(tmp_path / "e100" / "encoder", seed=3, fs=100.0, extra_fs=100.0)
    cases = [(probe_main, _cfg("probe", work, f"checkpoint={enc}", "preprocess={fs:250.0}")),
             (probe_main, _cfg("probe", work, "checkpoint=supervised:resnet1d_test")),
             (probe_main, _cfg("probe", work, f"checkpoint={tmp_path / 'nothing'}")),
             (finetune_main, _cfg("finetune", work, f"checkpoint={enc}", "preprocess={fs:250.0}")),
             # a misspelt backbone argument and task key: ConfigErrors (a TypeError / ValueError trace before)
             (probe_main, _cfg("probe", work, "checkpoint=random:vit1d_test", "+backbone_args.embed_dimm=8")),
             (probe_main, _cfg("probe", work, "checkpoint=random:vit1d_test", "+backbone_args.patch_size=7")),
             (probe_main, _cfg("probe", work, "checkpoint=random:resnet1d_test", "+task.crop_secondz=5")),
             (probe_main, _cfg("probe", work, "checkpoint=random:resnet1d_test", "task.stride_seconds=0"))]
    for main, cfg in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, cfg)
        assert exit_info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_leakage_guard_checks_the_validation_split_too(work, tmp_path):
    """A pool without the test records but with the validation ones: validation chooses C, thresholds and, in
    the benchmark, the encoder read on test, so the guard refuses it as it refuses test records."""
    from ecgfm.data.cache import CorpusCache
    from ecgfm.data.prepare import prepare_cache
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.evaluate.tasks import ExcludingSource, build_task, load_task_spec

    probe_main(_cfg("probe", work, "checkpoint=random:resnet1d_test", "fraction=1.0", "seed=0"))
    cache_dir = next(p for p in (work / "cache").iterdir() if p.name.startswith("synthetic-"))

    spec = CorpusCache(cache_dir).spec
    task = build_task(load_task_spec(_cfg("probe", work).task), str(work / "cache"), spec)   # the probe's task
    test_patients = {task.patient_ids[int(i)] for i in task.splits["test"]}
    test_ids = [str(task.cache.index["record_id"].iat[i]) for i in range(len(task.cache))
                if task.patient_ids[i] in test_patients]                   # test records and their patients
    pool = prepare_cache([ExcludingSource(SyntheticSource(180, seed=1, fs=500.0, duration=10.0), test_ids)],
                         str(tmp_path / "pool"), spec, name="pool", progress=False)
    cfg = _cfg("probe", work, "checkpoint=random:resnet1d_test", f"pretrain_caches=[{pool}]",
               f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0")
    with pytest.raises(LeakageError, match="val split"):
        probe_main(cfg)


def test_cells_of_edited_task_labels_are_recomputed(tmp_path, fixture_dir, caplog):
    """A folder task whose label table is edited after its cells were computed: the cache is relabelled and the
    cells, computed on the old labels, are recomputed instead of reported as done."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for hea in sorted((fixture_dir / "ptbxl" / "records100").rglob("*_lr.hea"))[:40]:
        for f in hea.parent.glob(hea.stem + ".*"):
            shutil.copy(f, data / f.name)
    ids = sorted(p.stem for p in data.glob("*.hea"))
    table = data / "labels.csv"
    table.write_text("record_id,label\n" + "".join(f"{r},{'a' if i % 2 else 'b'}\n" for i, r in enumerate(ids)))
    over = [f"paths.cache_root={tmp_path / 'cache'}", "prepare_workers=0", "bootstrap.n=20", "plot=false",
            "torch_threads=1", "checkpoint=random:resnet1d_test", "task=folder", f"task.root={data}",
            "task.multilabel=false", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0", "probe.Cs=[1.0]"]

    def cfg():
        with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            return compose("probe", overrides=over)

    assert len(probe_main(cfg())["cells_written"]) == 1
    assert probe_main(cfg())["cells_written"] == []                               # unchanged: reused
    table.write_text("record_id,label\n" + "".join(f"{r},{'a' if i % 3 else 'b'}\n" for i, r in enumerate(ids)))
    caplog.set_level("WARNING", logger="ecgfm.evaluate.sweep")
    assert len(probe_main(cfg())["cells_written"]) == 1
    assert any("data" in r.getMessage() for r in caplog.records)


def test_backbone_args_for_an_exported_architecture_are_refused(tmp_path):
    """backbone_args build a registry name; on an export (or its random twin) they were silently ignored."""
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.evaluate.sweep import EvaluationError, resolve_checkpoint
    from ecgfm.export import export_encoder

    torch.manual_seed(0)
    enc = export_encoder(create_backbone("resnet1d_test"), tmp_path / "enc", PreprocessSpec(),
                         extra={"method": "ToyModule", "crop_samples": 250})
    for ckpt in (str(enc), f"random:{enc}"):
        with pytest.raises(EvaluationError, match="backbone_args.*only apply to random:<backbone name>"):
            resolve_checkpoint(ckpt, 250, backbone_args={"pool": "avg"})
    assert resolve_checkpoint("random:resnet1d_test", 250, backbone_args={"pool": "avg"}).backbone is not None


def test_save_classifier_on_a_finished_cell_writes_the_artifact(work, tmp_path):
    """save_classifier=true on a cell computed without it: the cell is recomputed with its classifier (it said
    'nothing to do' and wrote none)."""
    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "probe.Cs=[1.0]", "plot=false"]
    first = probe_main(_cfg("probe", work, *base))
    again = probe_main(_cfg("probe", work, *base, "save_classifier=true"))
    assert len(again["cells_written"]) == 1
    cell = json.loads(Path(again["cells_written"][0]).read_text())
    assert Path(cell["classifier"]).is_dir() and first["cells_written"] == again["cells_written"]
    assert probe_main(_cfg("probe", work, *base, "save_classifier=true"))["cells_skipped"] == 1
    # the model card's validation number says what it is: the model-selection value, with its n
    evaluation = json.loads((Path(cell["classifier"]) / "classifier.json").read_text())["evaluation"]
    val_key = next(k for k in evaluation if k.startswith("validation macro AUROC"))
    assert f"n={cell['splits']['val']}" in val_key and "model-selection value" in val_key
    # ... and it lists the records it was trained and validated on, which explain.py checks a record against
    from ecgfm.data.record import ECGRecord
    from ecgfm.explain.report import training_membership, training_records

    known = training_records(cell["classifier"])
    assert known is not None and len(known[0]) == cell["n_train"] and len(known[1]) == cell["splits"]["val"]
    # ... of its own corpus only: record ids repeat across synthetic seeds (and copies of a corpus)
    from ecgfm.data.synthetic import SyntheticSource

    meta = json.loads((Path(cell["classifier"]) / "classifier.json").read_text())
    trained_on = meta["extra"]["training_sources"][0]
    same = SyntheticSource(trained_on["n_records"], seed=trained_on["seed"], fs=trained_on["fs"],
                           duration=trained_on["duration"])
    assert training_records(cell["classifier"], same) == known
    other = SyntheticSource(trained_on["n_records"], seed=trained_on["seed"] + 1, fs=trained_on["fs"],
                            duration=trained_on["duration"])
    assert training_records(cell["classifier"], other) is None
    source, rid = sorted(known[0])[0].split("/", 1)
    rec = ECGRecord(signal=np.zeros((12, 10), np.float32), fs=100.0, lead_mask=np.ones(12, bool), record_id=rid,
                    source=source)
    assert training_membership(None, rec, known) == "training"
    assert training_membership("task x", ECGRecord(signal=np.zeros((12, 10), np.float32), fs=100.0,
                                                   lead_mask=np.ones(12, bool), record_id="nope",
                                                   source=source), known) == "held out"


def test_a_reused_cell_keeps_only_its_own_classifier_artifact(work, tmp_path):
    """A cell recomputed with another recipe and save_classifier=false left the old recipe's artifact beside it, and a
    later save_classifier=true reused that artifact (a model and numbers of another recipe); now the stale artifact
    goes with the cell it belonged to, and an artifact is reused only if it names the cell's checkpoint and recipe."""
    import pandas as pd

    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0", "plot=false"]
    one = probe_main(_cfg("probe", work, *base, "probe.Cs=[0.001]", "save_classifier=true"))
    clf = Path(json.loads(Path(one["cells_written"][0]).read_text())["classifier"])
    assert clf.is_dir()
    two = probe_main(_cfg("probe", work, *base, "probe.Cs=[100.0]"))        # another recipe, no artifact asked
    assert len(two["cells_written"]) == 1 and not clf.exists()
    three = probe_main(_cfg("probe", work, *base, "probe.Cs=[100.0]", "save_classifier=true"))
    assert len(three["cells_written"]) == 1
    cell = json.loads(Path(three["cells_written"][0]).read_text())
    from ecgfm.artifacts import read_meta

    _, meta = read_meta(cell["classifier"], "classifier")
    assert meta["extra"]["cell_recipe_id"] == cell["recipe_id"] and meta["extra"]["checkpoint_id"] == \
        cell["checkpoint_id"]
    pred = pd.read_csv(Path(cell["classifier"]) / "predictions_test.csv")
    assert len(pred) == len(cell["predictions"]["test"]["keys"])
    assert probe_main(_cfg("probe", work, *base, "probe.Cs=[100.0]", "save_classifier=true"))["cells_skipped"] == 1


def test_a_reused_cell_carries_this_runs_leakage_verdict(work, tmp_path):
    """A cell written before the encoder's pretraining data was named kept leakage "ok" when a later run named data
    overlapping the test split under allow_leakage=true: the report could read the row as clean."""
    base = ["checkpoint=random:resnet1d_test", f"results_dir={tmp_path / 'r'}", "fraction=1.0", "seed=0",
            "probe.Cs=[1.0]", "plot=false"]
    first = probe_main(_cfg("probe", work, *base))
    path = Path(first["cells_written"][0])
    cell = json.loads(path.read_text())
    assert not cell["leakage"].get("leaked")
    again = probe_main(_cfg("probe", work, *base, f"pretrain_caches=[{cell['cache_dir']}]", "allow_leakage=true"))
    assert again["cells_skipped"] == 1 and again["cells_written"] == []
    assert json.loads(path.read_text())["leakage"]["leaked"] is True


def test_an_unknown_backbone_name_is_one_clear_error(work):
    from ecgfm.evaluate.sweep import EvaluationError

    with pytest.raises(EvaluationError, match="'nosuch' is neither an exported encoder folder nor a backbone"):
        probe_main(_cfg("probe", work, "checkpoint=random:nosuch", "fraction=1.0", "seed=0"))
