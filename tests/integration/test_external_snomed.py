"""External validation across label vocabularies: a PTB-XL-trained head scored on the CinC 2021 records (SNOMED CT
codes translated through ecgfm/data/scp_snomed.csv), the task's own records excluded, CPSC 2018 refused without
labels. Real data: the PTB-XL fixture (ids 1-100) for the task, ../shared/data/cinc2021 (49 records) external."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ecgfm.evaluate.sweep import finetune_main, probe_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cfg(tmp: Path, cache: Path, fixture: Path, *overrides: str, name: str = "probe"):
    base = [f"paths.cache_root={cache}", f"paths.data_root={fixture}", f"results_dir={tmp / 'results'}",
            "prepare_workers=0", "task=ptbxl_super", "bootstrap.n=50", "plot=false", "torch_threads=1",
            "checkpoint=random:resnet1d_test", "fraction=1.0", "seed=0"]
    base += ["probe.Cs=[1.0]"] if name == "probe" else ["finetune.epochs=1", "finetune.batch_size=32"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose(name, overrides=base + list(overrides))


def test_ptbxl_head_scored_on_cinc2021(tmp_path, cache_root, fixture_dir, shared_data):
    cfg = _cfg(tmp_path, cache_root, fixture_dir, "eval_data=cinc2021", f"eval_data.root={shared_data / 'cinc2021'}")
    out = probe_main(cfg)
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    ext = cell["results"]["external:cinc2021"]
    rep = cell["external_label_map"]
    assert rep["vocabulary"] == "SNOMED CT -> PTB-XL superdiagnostic"
    # 49 records: 10 HR* (PTB-XL records) excluded, 13 with no superdiagnostic label left out, 2 CD records with a
    # T-wave code (STTC unknown) left out, 24 scored
    assert rep["records"]["total"] == 49 and rep["records"]["evaluated"] == 24 == ext["n"]
    assert rep["records"]["no_mapped_label"] == 13 and rep["records"]["uncertain"] == 2
    assert sum(rep["records"]["excluded"].values()) == 10
    assert {c: v["positives"] for c, v in rep["classes"].items()} == {"CD": 8, "HYP": 8, "MI": 0, "NORM": 5,
                                                                       "STTC": 7}
    assert ext["not_evaluable_classes"] == ["MI"]  # no code of the set reaches MI: out of every metric, listed
    assert 0.0 <= ext["macro_auroc"]["value"] <= 1.0
    assert ext["macro_auroc"]["ci_low"] <= ext["macro_auroc"]["ci_high"]
    assert "55827005" in rep["codes"]["unknown"] and "164889003" not in rep["codes"]["mapped"]
    assert any("SNOMED CT -> PTB-XL" in n for n in cell["external_notes"])


def test_finetuned_ptbxl_head_scored_on_cinc2021(tmp_path, cache_root, fixture_dir, shared_data):
    cfg = _cfg(tmp_path, cache_root, fixture_dir, "eval_data=cinc2021", f"eval_data.root={shared_data / 'cinc2021'}",
               name="finetune")
    cell = json.loads(Path(finetune_main(cfg)["cells_written"][0]).read_text())
    assert cell["results"]["external:cinc2021"]["n"] == 24
    assert cell["external_label_map"]["records"]["evaluated"] == 24


def test_task_records_in_the_external_set_are_excluded(tmp_path, cache_root, fixture_dir):
    """A challenge-format copy of a PTB-XL record of the task's splits (HR00001 = ecg_id 1) is not external."""
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.evaluate.tasks import TaskSpec, build_external, build_task, load_task_spec

    folder = tmp_path / "challenge"
    folder.mkdir()
    for name in ("HR06001", "HR06002"):
        for ext in (".hea", ".mat"):
            shutil.copy(fixture_dir / "cinc2021" / f"{name}{ext}", folder / f"{name}{ext}")
    # the same signal filed as HR00001 (header's record name and file name rewritten): PTB-XL ecg_id 1
    shutil.copy(fixture_dir / "cinc2021" / "HR06001.mat", folder / "HR00001.mat")
    header = (fixture_dir / "cinc2021" / "HR06001.hea").read_text().replace("HR06001", "HR00001")
    (folder / "HR00001.hea").write_text(header)

    pre = PreprocessSpec(fs=100.0)
    task = build_task(load_task_spec("ptbxl_super", data_root=str(fixture_dir), cache_root=str(cache_root)),
                      str(cache_root), pre)
    assert "ptbxl/00001" in task.record_keys(task.splits["train"])
    node = OmegaConf.create({"task": OmegaConf.load(ROOT / "ecgfm/conf/task/ptbxl_super.yaml"),
                             "paths": {"data_root": str(fixture_dir), "cache_root": str(cache_root)},
                             "eval_data": OmegaConf.load(ROOT / "ecgfm/conf/eval_data/cinc2021.yaml")})
    node.eval_data.root = str(folder)
    node.eval_data.params.exclude_task_corpus = False  # keep HR06001/2 (PTB-XL records outside the fixture)
    ext = build_external(TaskSpec.from_config(node.eval_data), task, str(cache_root), pre)
    kept = ext.record_keys(ext.splits["test"])
    assert kept == ["challenge2021/HR06001", "challenge2021/HR06002"]
    excluded = ext.label_report["records"]["excluded_examples"]
    assert ["challenge2021/HR00001"] in excluded.values()
    assert any("HR00001" in n and "train/val/test" in n for n in ext.notes)

    node.eval_data.params.exclude_task_corpus = True  # default: PTB-XL-derived records are not external at all
    with pytest.raises(ValueError, match="no labelled record is left"):
        build_external(TaskSpec.from_config(node.eval_data), task, str(cache_root), pre)


def test_cpsc2018_without_labels_is_refused(tmp_path, cache_root, fixture_dir, shared_data):
    cfg = _cfg(tmp_path, cache_root, fixture_dir, "eval_data=cpsc2018", f"eval_data.root={shared_data / 'cpsc2018'}")
    with pytest.raises(ValueError, match="CPSC 2018 records carry no labels"):
        probe_main(cfg)


def test_classes_no_code_reaches_are_not_scored_as_negatives():
    """A task class that no SNOMED CT code maps to has an unknown label on the external set, not a negative one:
    it is left out of every external metric (Fmax and macro F1 included) and listed, so a head that predicts it is
    not charged false positives."""
    from types import SimpleNamespace

    import numpy as np

    from ecgfm.evaluate.metrics import evaluate_scores
    from ecgfm.evaluate.sweep import score_external

    rng = np.random.default_rng(0)
    y = np.zeros((40, 3), np.float32)
    y[:20, 0] = 1
    y[20:, 1] = 1                                              # class "C" (column 2): no code, label unknown
    p = np.clip(y + rng.uniform(0, 0.2, y.shape), 0, 1)
    p[:, 2] = 1.0                                              # the head says "C" everywhere, surely
    task = SimpleNamespace(multilabel=True, class_names=["A", "B", "C"])
    ext = SimpleNamespace(labels=y, label_report={"classes_without_code": ["C"]})
    rows = np.arange(40)
    got = score_external(task, ext, rows, p, np.full(3, 0.5), n_boot=20, seed=0)
    assert got["not_evaluable_classes"] == ["C"] and "C" not in got["per_class_auroc"]
    assert got["fmax"]["value"] == pytest.approx(1.0) and got["macro_f1"]["value"] == pytest.approx(1.0)
    charged = evaluate_scores(y, p, True, ["A", "B", "C"], np.full(3, 0.5), n_boot=20, seed=0)
    assert charged["fmax"]["value"] < 0.9                      # scored as negatives, "C" costs precision
    plain = score_external(task, SimpleNamespace(labels=y, label_report=None), rows, p, None, n_boot=20, seed=0)
    assert "not_evaluable_classes" not in plain and plain["fmax"]["value"] == charged["fmax"]["value"]
