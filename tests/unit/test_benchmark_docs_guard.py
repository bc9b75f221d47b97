"""scripts/benchmark_real.py: a run over some methods leaves the docs' learning curve and pretraining wall-time table
alone (as it leaves the results tables), and the pretraining reuse check covers the composed config, not only the
experiment files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from tests.unit.test_benchmark_doc import _script   # a fresh module of scripts/benchmark_real.py per call

ROOT = Path(__file__).resolve().parents[2]




STEPS = (100, 200)
TASKS = ("cinc2017", "ptbxl_super")


def _fake_curve_rows(args):
    """Two probed steps per method of ``args.methods`` on two tasks (what curve_rows gives for a finished curve
    stage), without training and probing encoders."""
    return [{"method": m, "step": s, "task": t, "val": 0.7, "test": 0.7, "ci_low": 0.6, "ci_high": 0.8,
             "n_test": 10, "n_val": 5} for t in TASKS for m in args.methods for s in STEPS]


def _pretrain_records(out: Path, methods) -> None:
    for m in methods:
        d = out / "pretrain" / m
        d.mkdir(parents=True)
        (d / "pretrain_time.json").write_text(json.dumps({"method": m, "experiment": f"{m}_cpu30", "wall_s": 10.0,
                                                          "steps": 200, "threads": 1, "finished_utc": "now"}))


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    """A run folder with the wall-time records of mae and simclr, a fake report (results tables holding every row,
    so the results check passes) and fake curve rows; docs in ``repo/docs/benchmark`` beside a BENCHMARK.md."""
    import ecgfm.evaluate.report as R

    mod = _script()
    out = tmp_path / "run"
    _pretrain_records(out, ("mae", "simclr"))
    (out / "curve").mkdir()      # as the curve probe leaves it (curve/results)
    docs = tmp_path / "repo" / "docs" / "benchmark"
    docs.mkdir(parents=True)
    doc = docs.parent / "BENCHMARK.md"
    doc.write_text(f"intro\n{mod.RESULTS_START}\nold\n{mod.RESULTS_END}\n")

    def fake_build_report(res_dir, n_boot=1000):
        res_dir = Path(res_dir)
        res_dir.mkdir(parents=True, exist_ok=True)
        (res_dir / "results.csv").write_text("mode,task,label,method,backbone,fraction,seed,metric,value\n"
                                             "linear,cinc2017,mae,mae,vit,1,0,macro_auroc,0.7\n")
        (res_dir / "results.md").write_text("## Acceptance (issue 12), computed from the cells\n\nMET: x\n")
        return {"acceptance": []}

    monkeypatch.setattr(R, "build_report", fake_build_report)
    monkeypatch.setattr(mod, "curve_rows", _fake_curve_rows)
    return mod, out, docs, doc


def _args(out, docs, methods, **kw):
    return argparse.Namespace(out=str(out), docs=str(docs), methods=list(methods), bootstrap=10, replace_docs=False,
                              stages=["report"], **kw)


def test_a_report_over_some_methods_keeps_the_docs_curve_and_wall_times(bench, capsys):
    """--stages report --methods mae after a mae + simclr run rewrote the docs' learning curve and the wall-time
    table (real_results.md and the generated block of BENCHMARK.md) with mae's rows only."""
    mod, out, docs, doc = bench
    mod.report(_args(out, docs, ["mae", "simclr"]))
    full_curve = (docs / "learning_curve.md").read_text()
    full_doc, full_md = doc.read_text(), (docs / "real_results.md").read_text()
    assert "| simclr | 100 |" in full_curve and "| simclr | +experiment=simclr_cpu30 |" in full_doc
    assert "##### ptbxl_super" in full_doc and "| simclr | 200 |" in full_doc and "| simclr |" in full_md
    png = (docs / "learning_curve.png").read_bytes()

    capsys.readouterr()
    mod.report(_args(out, docs, ["mae"]))
    assert (docs / "learning_curve.md").read_text() == full_curve
    assert (docs / "learning_curve.png").read_bytes() == png
    assert doc.read_text() == full_doc and (docs / "real_results.md").read_text() == full_md
    log = capsys.readouterr().out
    assert "pretraining wall time: 1 row(s) (simclr)" in log
    assert "learning curve: 4 row(s)" in log and "ptbxl_super / simclr / 200" in log
    # the run's own copies are written all the same
    own = (out / "curve" / "learning_curve.md").read_text()
    assert "| mae | 100 |" in own and "simclr" not in own
    assert "| mae |" in (out / "results" / "results.md").read_text()

    # only the wall-time table would shrink (the curve docs hold mae's rows only): still kept
    (docs / "learning_curve.md").write_text((out / "curve" / "learning_curve.md").read_text())
    doc.write_text(f"{mod.RESULTS_START}\n{mod.RESULTS_END}\n")
    mod.report(_args(out, docs, ["mae"]))
    assert (docs / "real_results.md").read_text() == full_md
    # the wall-time table shown only in the generated block of BENCHMARK.md counts too
    (docs / "real_results.md").unlink()
    doc.write_text(full_doc)
    mod.report(_args(out, docs, ["mae"]))
    assert doc.read_text() == full_doc and not (docs / "real_results.md").exists()

    # asked for: replaced
    args = _args(out, docs, ["mae"])
    args.replace_docs = True
    mod.report(args)
    assert "simclr" not in (docs / "learning_curve.md").read_text() and "simclr" not in doc.read_text()
    # a run holding every row (and more) replaces them without being asked
    shutil.rmtree(out / "pretrain" / "simclr")
    _pretrain_records(out, ("simclr", "clocs"))
    mod.report(_args(out, docs, ["mae", "simclr", "clocs"]))
    assert "| clocs | 200 |" in (docs / "learning_curve.md").read_text()
    assert "| clocs | +experiment=clocs_cpu30 |" in doc.read_text()


def test_the_curve_stage_alone_keeps_a_fuller_docs_curve(bench, monkeypatch, capsys):
    """--stages curve --methods mae wrote (and, with no probed point, deleted) the docs' learning curve without any
    check; it writes <out>/curve, and --docs only under the report's rule."""
    mod, out, docs, _doc = bench
    monkeypatch.setattr(mod, "curve_encoders", lambda args: {})   # nothing to export / probe here
    args = _args(out, docs, ["mae", "simclr"])
    args.stages = ["curve"]
    mod.stage_curve(args, {})
    full = (docs / "learning_curve.md").read_text()
    assert "| simclr | 200 |" in full

    args.methods = ["mae"]
    capsys.readouterr()
    mod.stage_curve(args, {})
    assert (docs / "learning_curve.md").read_text() == full
    assert "learning curve: 4 row(s)" in capsys.readouterr().out
    assert "simclr" not in (out / "curve" / "learning_curve.md").read_text()
    # no probed point at all: the run's own copy goes, the docs' stays
    monkeypatch.setattr(mod, "curve_rows", lambda args: [])
    mod.stage_curve(args, {})
    assert not (out / "curve" / "learning_curve.md").exists() and not (out / "curve" / "learning_curve.png").exists()
    assert (docs / "learning_curve.md").read_text() == full and (docs / "learning_curve.png").is_file()
    args.replace_docs = True                                       # asked for: removed
    mod.stage_curve(args, {})
    assert not (docs / "learning_curve.md").exists() and not (docs / "learning_curve.png").exists()


def test_the_curve_stage_leaves_the_docs_to_the_report_of_the_same_command(bench, monkeypatch):
    """With the report in the same command, the curve stage does not copy the curve into --docs ahead of the report's
    check (which may keep the docs tables, leaving a new curve beside them)."""
    mod, out, docs, _doc = bench
    monkeypatch.setattr(mod, "curve_encoders", lambda args: {})
    args = _args(out, docs, ["mae"])
    args.stages = ["curve", "probe", "report"]
    mod.stage_curve(args, {})
    assert (out / "curve" / "learning_curve.md").is_file() and not (docs / "learning_curve.md").exists()


def test_docs_rows_are_read_from_both_heading_levels():
    """The curve and wall-time tables are read from their docs copies (## headings) and from the generated block of
    BENCHMARK.md (#### / ##### headings), without taking the results tables for them."""
    mod = _script()
    curve = ("# Learning curve\n\ntext\n\n## cinc2017 (n = 5 validation, 10 test records)\n\n"
             "| method | step | v | t |\n|---|---|---|---|\n| mae | 100 | 0.7 | 0.7 [0.6, 0.8] |\n\n"
             "Fewer points than wanted:\n\n- mae: only 1\n")
    assert mod.curve_table_rows(curve) == {"cinc2017 / mae / 100"}
    block = ("#### macro_auroc | task cinc2017\n\n| mae | 0.7 |\n\n#### Pretraining wall time\n\n| method | recipe |\n"
             "|---|---|\n| mae | x |\n| simclr | y |\n\n#### Learning curve (linear probe, 100 % of the labels, seed 0)"
             "\n\n##### ptbxl_super (n = 1 validation, 2 test records)\n\n| method | step |\n|---|---|\n"
             "| clocs | 300 | 1 |\n")
    assert mod.wall_time_rows(mod.markdown_section(block, "Pretraining wall time")) == {"mae", "simclr"}
    assert mod.curve_table_rows(mod.markdown_section(block, "Learning curve")) == {"ptbxl_super / clocs / 300"}
    assert mod.markdown_section(block, "Nothing") == ""


# ------------------------------------------------------------------------------------------------ reuse check
@pytest.fixture()
def conf_copy(tmp_path, monkeypatch):
    """The script pointed at a copy of ecgfm/conf (so a test may edit its YAML files)."""
    mod = _script()
    root = tmp_path / "root"
    shutil.copytree(ROOT / "ecgfm" / "conf", root / "ecgfm" / "conf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    monkeypatch.setattr(mod, "ROOT", root)
    return mod, root / "ecgfm" / "conf"


def test_the_config_hash_covers_the_files_the_experiment_pulls_in(conf_copy):
    mod, conf = conf_copy
    base = mod.config_sha256("mae")
    method = conf / "method" / "mae.yaml"
    method.write_text(method.read_text() + "\n# a comment only\n")
    assert mod.config_sha256("mae") == base            # the composed config is unchanged: same recipe
    method.write_text(method.read_text() + "extra_knob: 3\n")
    edited = mod.config_sha256("mae")
    assert edited != base
    for f in (conf / "backbone" / "vit1d_cpu.yaml", conf / "train.yaml", conf / "data" / "cached.yaml"):
        f.write_text(f.read_text() + "\nextra_knob_2: 1\n")
        assert mod.config_sha256("mae") != edited, f
        edited = mod.config_sha256("mae")
    simclr = conf / "method" / "simclr.yaml"             # a file the recipe does not read
    simclr.write_text(simclr.read_text() + "extra_knob: 3\n")
    assert mod.config_sha256("mae") == edited
    # a group override of the recipe brings its file's content
    with_simclr = mod.config_sha256("mae", ["method=simclr"])
    simclr.write_text(simclr.read_text() + "extra_knob_2: 4\n")
    assert mod.config_sha256("mae", ["method=simclr"]) != with_simclr


def _pretrain_args(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "bench"), methods=["mae"], steps=40, recipe="auto", embed_dim=None,
                              depth=None, heads=None, batch_size=None, train_overrides=[], threads=1,
                              cache_root=str(tmp_path / "cache"))
    return args


def _fake_train(calls):
    def fake_run(cmd, env):
        calls.append(cmd)
        out = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        (out / "encoder").mkdir(parents=True, exist_ok=True)
        (out / "encoder" / "encoder.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps({"steps": 40, "fit_time_s": 1.0}))
        return 1.0
    return fake_run


def test_an_edited_method_config_is_not_reused(conf_copy, tmp_path, monkeypatch):
    """An edited conf/method/mae.yaml kept reusing the encoder trained before the edit (only the experiment files
    were hashed)."""
    mod, conf = conf_copy
    calls = []
    monkeypatch.setattr(mod, "run", _fake_train(calls))
    args = _pretrain_args(tmp_path)
    mod.stage_pretrain(args, ["pool_a"], {})
    method = conf / "method" / "mae.yaml"
    # a comment, or a value the experiment sets itself (mae.yaml's method.mask_ratio): the same composed config,
    # reused
    method.write_text(method.read_text().replace("mask_ratio: 0.75", "mask_ratio: 0.5") + "\n# a comment\n")
    mod.stage_pretrain(args, ["pool_a"], {})
    assert len(calls) == 1
    method.write_text(method.read_text().replace("norm_pix_loss: true", "norm_pix_loss: false"))
    with pytest.raises(SystemExit, match=r"pretrain/mae .*trained with .*config_sha256.*asks for"):
        mod.stage_pretrain(args, ["pool_a"], {})


def test_an_old_format_record_is_checked_by_its_own_rule(conf_copy, tmp_path, monkeypatch, capsys):
    """Records written before the composed-config hash (recipe_sha256 of the experiment files) are compared by that
    rule with a line saying so, not retrained; their experiment files still count."""
    mod, conf = conf_copy
    calls = []
    monkeypatch.setattr(mod, "run", _fake_train(calls))
    args = _pretrain_args(tmp_path)
    mod.stage_pretrain(args, ["pool_a"], {})
    record = tmp_path / "bench" / "pretrain" / "mae" / "pretrain_time.json"
    info = json.loads(record.read_text())
    new = info["requested"]
    assert set(new) == {"experiment", "overrides", "pool", "config_sha256"}
    old = {k: new[k] for k in ("experiment", "overrides", "pool")}
    info["requested"] = {**old, "recipe_sha256": mod.experiment_sha256("mae")}
    record.write_text(json.dumps(info))
    method = conf / "method" / "mae.yaml"                # not seen by the old rule: reused, and said so
    method.write_text(method.read_text() + "extra_knob: 3\n")
    capsys.readouterr()
    mod.stage_pretrain(args, ["pool_a"], {})
    assert len(calls) == 1 and "older experiment-file hash" in capsys.readouterr().out
    assert json.loads(record.read_text())["requested"] == info["requested"]   # the record is not rewritten
    exp = conf / "experiment" / "mae.yaml"               # seen by the old rule: refused
    exp.write_text(exp.read_text().replace("max_steps: 150", "max_steps: 151"))
    with pytest.raises(SystemExit, match="recipe_sha256"):
        mod.stage_pretrain(args, ["pool_a"], {})
    info["requested"] = old                              # the oldest records: name, overrides and pool
    record.write_text(json.dumps(info))
    mod.stage_pretrain(args, ["pool_a"], {})
    assert len(calls) == 1
