"""Command-line review (2026-12, s22): an absolute ``labels_csv`` of a folder task / external set, the documented
``task.split={kind: column, key: split}`` override, a split column without validation rows, and explain.py on a
folder classifier (membership of its training records, a record given by its bare file name)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import ecgfm.config  # noqa: F401 - registers the ecgfm.* resolvers the composed configs use
from ecgfm.config import ConfigError
from ecgfm.data.preprocess import PreprocessSpec

CONF = Path(__file__).resolve().parents[2] / "ecgfm" / "conf"


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _folder(tmp_path: Path, fixture_dir: Path, n: int = 4) -> Path:
    """``n`` fixture PTB-XL records (100 Hz) under ``<root>/site_a`` with ``<root>/labels.csv`` naming them by their
    bare file names (which the labels CSV accepts)."""
    root = tmp_path / "mydata"
    (root / "site_a").mkdir(parents=True)
    heads = sorted((fixture_dir / "ptbxl" / "records100" / "00000").glob("*_lr.hea"))[:n]
    for hea in heads:
        for f in (hea, hea.with_suffix(".dat")):
            shutil.copy(f, root / "site_a" / f.name)
    rows = [f"{hea.stem},P{i},{'NORM' if i % 2 else 'MI'}" for i, hea in enumerate(heads)]
    (root / "labels.csv").write_text("\n".join(["record_id,patient_id,diagnosis", *rows]) + "\n")
    return root


# ------------------------------------------------------------------------------------ 1. an absolute labels_csv
def test_an_absolute_labels_csv_stays_as_given_and_a_relative_one_is_under_the_root(tmp_path):
    """``task.params.labels_csv=/abs/labels.csv`` was looked up as ``<root>/abs/labels.csv`` (data path does not
    exist), although ``data.params.labels_csv`` takes an absolute path."""
    root, elsewhere = tmp_path / "mydata", tmp_path / "tables" / "labels.csv"
    task = _compose("probe", "task=folder", f"task.root={root}", f"task.params.labels_csv={elsewhere}")
    assert task.task.sources[0].labels_csv == str(elsewhere)
    task = _compose("probe", "task=folder", f"task.root={root}", "task.params.labels_csv=sub/labels.csv")
    assert task.task.sources[0].labels_csv == str(root / "sub" / "labels.csv")
    assert _compose("probe", "task=folder", f"task.root={root}").task.sources[0].labels_csv == \
        str(root / "labels.csv")
    ext = ["task=synthetic", "eval_data=folder", f"eval_data.root={root}"]
    assert _compose("probe", *ext, f"eval_data.params.labels_csv={elsewhere}").eval_data.sources[0].labels_csv == \
        str(elsewhere)
    assert _compose("probe", *ext).eval_data.sources[0].labels_csv == str(root / "labels.csv")


def test_the_task_reads_a_labels_csv_outside_its_root(tmp_path, fixture_dir):
    from hydra.utils import instantiate

    root = _folder(tmp_path, fixture_dir)
    outside = tmp_path / "tables" / "labels.csv"
    outside.parent.mkdir()
    shutil.move(root / "labels.csv", outside)
    cfg = _compose("probe", "task=folder", f"task.root={root}", f"task.params.labels_csv={outside}",
                   "task.params.label_columns=[diagnosis]")
    source = instantiate(cfg.task.sources[0])
    assert Path(source.labels_csv) == outside and len(source.record_ids()) == 4


# ------------------------------------------------------------------------------------------ 2. the split column
@pytest.mark.parametrize("override", [["task.split={kind: column, key: split}"],
                                      ["+task.split={kind: column, key: split}"],
                                      ["~task.split", "+task.split={kind: column, key: split}"]])
def test_the_documented_split_column_override_works(override, tmp_path):
    """``task.split={kind: column, key: split}`` (the form folder.yaml and BENCHMARK.md document) was refused by
    Hydra ("not in struct"), and ``+task.split=...`` merged into the default, refused for its ``fractions``."""
    from ecgfm.evaluate.tasks import TaskSpec

    cfg = _compose("probe", "task=folder", f"task.root={tmp_path}", *override)
    ecgfm.config.check_params_used(cfg)
    assert TaskSpec.from_config(cfg.task).split == {"kind": "column", "key": "split"}


def test_the_folder_tasks_default_split_is_unchanged(tmp_path):
    from ecgfm.evaluate.tasks import TaskSpec

    cfg = _compose("probe", "task=folder", f"task.root={tmp_path}")
    assert TaskSpec.from_config(cfg.task).split == {"kind": "stratified", "fractions": [0.7, 0.15, 0.15], "seed": 0}
    cfg = _compose("probe", "task=folder", f"task.root={tmp_path}",
                   "task.split={kind: stratified, fractions: [0.8, 0.1, 0.1], seed: 1}")
    assert TaskSpec.from_config(cfg.task).split == {"kind": "stratified", "fractions": [0.8, 0.1, 0.1], "seed": 1}


def test_a_split_without_validation_records_is_a_config_error_saying_what_to_add():
    """A split column without val rows ended in a traceback (``ValueError: the task has no 'val' records``)."""
    from ecgfm.evaluate.features import FeatureSet
    from ecgfm.evaluate.probe import ProbeData, run_probe_grid

    n = 12
    labels = np.zeros((n, 2), np.float32)
    labels[np.arange(n), np.arange(n) % 2] = 1
    data = ProbeData(features=FeatureSet(features=np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32),
                                         record=np.arange(n), n_records=n),
                     labels=labels, splits={"train": np.arange(8), "val": np.zeros(0, np.int64),
                                            "test": np.arange(8, 12)},
                     multilabel=False, class_names=["A", "B"])
    with pytest.raises(ConfigError, match=r"task\.split.*no 'val' records") as err:
        run_probe_grid(data, fractions=[1.0], seeds=[0], Cs=[1.0], n_boot=10)
    assert "split column" in str(err.value) and "val / dev / valid / validation" in str(err.value)
    data.name = "my_folder"   # the sweep names its task
    with pytest.raises(ConfigError, match=r"task my_folder has no 'val' records"):
        run_probe_grid(data, fractions=[1.0], seeds=[0], Cs=[1.0], n_boot=10)


# --------------------------------------------------------------------------------------- 3. explain on a folder
def _folder_classifier(tmp_path: Path, root: Path, train_keys: list[str]) -> Path:
    """A tiny classifier artifact described as a folder task's cell: trained on ``train_keys`` of the task's source
    (labelled records only, an absolute labels CSV, the label column named)."""
    from ecgfm.backbones import create_backbone
    from ecgfm.data.cache import describe_source
    from ecgfm.data.readers import FolderSource
    from ecgfm.explain.classifier import save_classifier

    task_source = FolderSource(root, labels_csv=str(root / "labels.csv"), label_columns=["diagnosis"],
                               include_unlabelled=False)
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    return save_classifier(tmp_path / "clf", bb, torch.nn.Linear(bb.num_features, 2), PreprocessSpec(fs=100.0),
                           ["MI", "NORM"], multilabel=False, n_samples=250,
                           extra={"training_records": train_keys, "validation_records": [],
                                  "training_sources": [describe_source(task_source)]})


def test_a_data_folder_source_is_the_corpus_of_a_folder_task_over_the_same_root(tmp_path, fixture_dir):
    """The task's source lists labelled records only (include_unlabelled false), ``data=folder`` every record:
    never matched, so a training record was never flagged."""
    from ecgfm.data.cache import describe_source
    from ecgfm.data.readers import FolderSource
    from ecgfm.explain.report import same_corpus

    root = _folder(tmp_path, fixture_dir)
    task = [describe_source(FolderSource(root, labels_csv=str(root / "labels.csv"), label_columns=["diagnosis"],
                                         include_unlabelled=False))]
    assert same_corpus(FolderSource(root, labels_csv="labels.csv"), task)
    assert same_corpus(FolderSource(root), task)                     # data=folder without a labels CSV
    other = tmp_path / "copy"
    shutil.copytree(root, other)
    assert not same_corpus(FolderSource(other, labels_csv="labels.csv"), task)   # another root: other ECGs
    assert not same_corpus(FolderSource(root, name="site"), task)                # other keys


def _explain_cfg(tmp_path: Path, root: Path, ckpt: Path, record: str):
    return _compose("explain", f"checkpoint={ckpt}", "data=folder", f"data.params.root={root}",
                    "data.params.labels_csv=labels.csv", f"record={record}", "methods=[occlusion]", "formats=[png]",
                    "faithfulness.enabled=false", f"out_dir={tmp_path / 'explain'}")


def test_explain_flags_a_record_of_a_folder_classifiers_training_data(tmp_path, fixture_dir, capsys):
    from ecgfm.explain.report import explain_main

    root = _folder(tmp_path, fixture_dir)
    ckpt = _folder_classifier(tmp_path, root, ["folder/site_a/00001_lr", "folder/site_a/00002_lr"])
    report = explain_main(_explain_cfg(tmp_path, root, ckpt, "site_a/00001_lr"))
    assert report["records"][0]["training_membership"] == "training"
    assert "IN THE CLASSIFIER'S TRAINING DATA" in capsys.readouterr().out
    report = explain_main(_explain_cfg(tmp_path, root, ckpt, "site_a/00003_lr"))
    assert report["records"][0]["training_membership"] == "held out"


def test_explain_suggests_the_record_id_for_a_bare_file_name(tmp_path, fixture_dir):
    from ecgfm.explain.report import explain_main

    root = _folder(tmp_path, fixture_dir)
    ckpt = _folder_classifier(tmp_path, root, [])
    with pytest.raises(ConfigError, match=r"record.*no record '00001_lr'.*did you mean 'site_a/00001_lr'\?"):
        explain_main(_explain_cfg(tmp_path, root, ckpt, "00001_lr"))


def test_explain_names_the_config_key_of_a_missing_data_folder(tmp_path, fixture_dir):
    """explain.py with a data folder that does not exist said only '<path>: ... not found' (no config key, no
    paths.data_root), unlike train / probe / finetune (review s26): now the same check_data_paths line."""
    from ecgfm.data.record import ECGDataError
    from ecgfm.explain.report import explain_main

    cfg = _compose("explain", f"checkpoint={tmp_path / 'clf'}", "data=ptbxl", f"paths.data_root={tmp_path / 'nope'}",
                   "record=1", f"out_dir={tmp_path / 'explain'}")
    with pytest.raises(ECGDataError, match=r"nope.*data path does not exist \(config key 'data[^']+'.*data_root"):
        explain_main(cfg)
    # only the source explain reads is checked: a pool whose other corpora are missing (no cinc2017 in the fixture)
    with pytest.raises(ConfigError, match=r"checkpoint= is required for real data"):
        explain_main(_compose("explain", "data=pretrain_pool", f"paths.data_root={fixture_dir}", "record=1",
                              f"out_dir={tmp_path / 'explain'}"))
    with pytest.raises(ConfigError, match=r"checkpoint= is required for real data.*finetune\.py"):
        explain_main(_compose("explain", "data=ptbxl", f"paths.data_root={fixture_dir}", "record=1",
                              f"out_dir={tmp_path / 'explain'}"))
