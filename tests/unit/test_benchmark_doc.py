"""scripts/benchmark_real.py's report stage rewrites the generated block of docs/BENCHMARK.md (and nothing else)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_real_doc", ROOT / "scripts" / "benchmark_real.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_block_is_replaced_between_the_markers(tmp_path):
    mod = _script()
    doc = tmp_path / "BENCHMARK.md"
    doc.write_text(f"intro\n{mod.RESULTS_START}\nold numbers\n{mod.RESULTS_END}\nafter\n")
    results = tmp_path / "results.md"
    results.write_text("## Acceptance (issue 12), computed from the cells\n\nMISSED: x\n\n"
                       "## macro_auroc | task t | dataset d | split test (n = 5 records)\n\n| a |\n\n"
                       "## macro_f1 | task t | dataset d | split test (n = 5 records)\n\n| f1 |\n")
    curve = tmp_path / "learning_curve.md"
    curve.write_text("# Learning curve\n\n| step | auroc |\n")
    mod.update_benchmark_doc(doc, results, curve)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old numbers" not in text
    assert "#### Acceptance (issue 12)" in text and "#### macro_auroc | task t" in text and "MISSED: x" in text
    assert "macro_f1" not in text                       # the full tables stay in real_results.md
    assert "| step | auroc |" in text and "\n# Learning curve" not in text
    mod.update_benchmark_doc(doc, results, None)        # idempotent: one block, rewritten
    assert doc.read_text().count(mod.RESULTS_START) == 1 and "| step | auroc |" not in doc.read_text()


def test_a_document_without_markers_is_left_alone(tmp_path):
    mod = _script()
    doc = tmp_path / "BENCHMARK.md"
    doc.write_text("no markers\n")
    (tmp_path / "results.md").write_text("## Acceptance\n")
    mod.update_benchmark_doc(doc, tmp_path / "results.md", None)
    assert doc.read_text() == "no markers\n"


def test_curve_task_headings_results_folder_and_marker_lines(tmp_path):
    """The learning curve keeps one heading per task (its tables were left without task names); the block names
    the results folder it was built from; only marker *lines* delimit the block (a mention of the marker in the
    text is text), and two blocks are refused rather than merged."""
    import pytest

    mod = _script()
    doc = tmp_path / "BENCHMARK.md"
    doc.write_text(f"intro: the block starts at `{mod.RESULTS_START}`.\nkept\n{mod.RESULTS_START}\nold\n"
                   f"{mod.RESULTS_END}\nafter\n")
    res = tmp_path / "out" / "results"
    res.mkdir(parents=True)
    (res / "results.md").write_text("## Acceptance (issue 12), computed from the cells\n\nMET: x\n")
    curve = tmp_path / "learning_curve.md"
    curve.write_text("# Learning curve: linear probe vs pretraining steps\n\ntext\n\n"
                     "## cinc2017 (n = 3 validation, 4 test records)\n\n| a |\n\n## ptbxl_super (n = 1 validation, 2 "
                     "test records)\n\n| b |\n")
    mod.update_benchmark_doc(doc, res / "results.md", curve)
    text = doc.read_text()
    assert text.startswith(f"intro: the block starts at `{mod.RESULTS_START}`.\nkept\n") and "old" not in text
    assert "##### cinc2017 (n = 3 validation" in text and "##### ptbxl_super" in text
    assert "Learning curve: linear probe vs" not in text and f"`{(res).resolve()}`" in text
    doc.write_text(f"{mod.RESULTS_START}\n{mod.RESULTS_END}\n{mod.RESULTS_START}\n{mod.RESULTS_END}\n")
    with pytest.raises(SystemExit, match="must be one"):
        mod.update_benchmark_doc(doc, res / "results.md", None)


def test_recipe_content_hash_follows_the_experiment_chain(tmp_path, monkeypatch):
    """An edited recipe (or the experiment it extends) is another recipe: its finished run is not reused."""
    mod = _script()
    conf = tmp_path / "ecgfm" / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "base_cpu30.yaml").write_text("trainer:\n  max_steps: 100\n")
    (conf / "child_cpu30.yaml").write_text("defaults:\n  - base_cpu30\nmethod:\n  lr: 0.1\n")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    before = mod.experiment_sha256("child_cpu30")
    (conf / "base_cpu30.yaml").write_text("trainer:\n  max_steps: 300\n")
    assert mod.experiment_sha256("child_cpu30") != before


def test_a_seed_override_is_refused_beside_a_second_seed_method():
    import pytest

    mod = _script()
    with pytest.raises(SystemExit) as e:
        mod.main(["--methods", "simclr_cnn_hc", "simclr_cnn_hc_s1", "--stages", "report",
                  "--train-overrides", "seed=7"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:      # the handcrafted job would be refused half-way through the sweep
        mod.main(["--methods", "simclr_cnn", "--stages", "probe", "--probe-overrides", "probe.layers=stages"])
    assert e.value.code == 2


def test_random_twins_one_per_architecture_and_input(tmp_path):
    """Two encoders of one architecture but another training window each get a twin (the report pairs an encoder
    with the twin of its own recipe: the second had none); equal ones share one."""
    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    mod = _script()
    net = create_backbone("resnet1d_test")
    a = export_encoder(net, tmp_path / "a", PreprocessSpec(fs=100), {"fs": 100, "crop_samples": 1000})
    b = export_encoder(net, tmp_path / "b", PreprocessSpec(fs=100), {"fs": 100, "crop_samples": 500})
    c = export_encoder(net, tmp_path / "c", PreprocessSpec(fs=100), {"fs": 100, "crop_samples": 1000})
    assert mod.random_twins([str(a), str(b), str(c)]) == [f"random:{a}", f"random:{b}"]


def test_a_step_folder_without_its_export_is_left_out_of_the_curve(tmp_path, monkeypatch):
    """An export that never finished (the folder exists, no weights): no curve point, not a crash of the report."""
    import types

    mod = _script()
    run = tmp_path / "pretrain" / "mae"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step100.ckpt").write_bytes(b"x")
    (run / "curve" / "step100").mkdir(parents=True)
    (run / "encoder").mkdir()
    (run / "encoder" / "encoder.json").write_text("{}")
    (tmp_path / "curve" / "results" / "cells").mkdir(parents=True)
    monkeypatch.setattr(mod, "curve_sources", lambda d: {100: d / "checkpoints" / "step100.ckpt"})
    assert mod.curve_rows(types.SimpleNamespace(out=str(tmp_path), methods=["mae"], docs=str(tmp_path / "d"))) == []


def test_a_partial_report_does_not_replace_the_committed_tables(tmp_path, monkeypatch):
    # a report run from a checkout holding only one retrained encoder's cells once replaced the full run's
    # generated block of docs/BENCHMARK.md and docs/benchmark/real_* with a one-encoder table
    import ecgfm.evaluate.report as R

    mod = _script()
    cols = ("mode,task,dataset,split,label,method,checkpoint,checkpoint_id,recipe_id,backbone,fraction,seed,metric,"
            "value\n")
    full = cols + ("linear,cinc2017,cinc2017,test,mae,mae,x,a,b,vit1d_tiny,1,0,macro_auroc,0.7\n"
                   "linear,cinc2017,cinc2017,test,hc,handcrafted,handcrafted,c,d,handcrafted,1,0,macro_auroc,0.9\n")
    partial = cols + "linear,cinc2017,cinc2017,test,hc,handcrafted,handcrafted,c,d,handcrafted,1,0,macro_auroc,0.9\n"
    out, docs = tmp_path / "run", tmp_path / "repo" / "docs" / "benchmark"
    docs.mkdir(parents=True)
    (docs / "real_results.csv").write_text(full)
    doc = docs.parent / "BENCHMARK.md"
    doc.write_text(f"intro\n{mod.RESULTS_START}\nthe full run\n{mod.RESULTS_END}\n")
    table = {"csv": partial}

    def fake_build_report(res_dir, n_boot=1000):
        res_dir = Path(res_dir)
        res_dir.mkdir(parents=True, exist_ok=True)
        (res_dir / "results.csv").write_text(table["csv"])
        (res_dir / "results.md").write_text("## Acceptance (issue 12), computed from the cells\n\nnew block\n")
        return {"acceptance": []}

    monkeypatch.setattr(R, "build_report", fake_build_report)
    monkeypatch.setattr(mod, "pretrain_times_markdown", lambda args: "")
    curves = []
    monkeypatch.setattr(mod, "curve_report", lambda args: curves.append(args.docs))
    args = argparse.Namespace(out=str(out), docs=str(docs), bootstrap=10, replace_docs=False)
    mod.report(args)
    assert (docs / "real_results.csv").read_text() == full and "the full run" in doc.read_text()
    assert not (docs / "real_headline.txt").exists() and not curves   # nor the learning curve
    args.replace_docs = True                       # asked for: replaced
    mod.report(args)
    assert (docs / "real_results.csv").read_text().count("\n") == 2 and "new block" in doc.read_text()
    # a run that has every committed row (and more) replaces them without being asked
    table["csv"] = full + "linear,ptbxl_super,ptbxl,test,mae,mae,x,a,b,vit1d_tiny,1,0,macro_auroc,0.8\n"
    (docs / "real_results.csv").write_text(full)
    args.replace_docs = False
    mod.report(args)
    assert (docs / "real_results.csv").read_text().count("\n") == 4
    assert mod.rows_not_in(docs / "real_results.csv", out / "results" / "results.csv") == []


def test_supervised_baselines_aggregate_as_the_overridden_fine_tunes():
    """--finetune-overrides finetune.window_aggregate=prob changed the encoder fine-tunes but the supervised baselines
    kept the YAML's logit: criterion 4 compared two record aggregations."""
    mod = _script()
    assert mod.finetune_aggregate([]) == "logit"
    assert mod.finetune_aggregate(["stride_seconds=5", "finetune.window_aggregate=prob"]) == "prob"
    assert mod.finetune_aggregate(["finetune.window_aggregate=prob", "+finetune.window_aggregate=logit"]) == "logit"
