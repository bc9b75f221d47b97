"""Leftovers of the twenty-second session: paired comparisons count their degenerate bootstrap resamples."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ecgfm.evaluate import report as R
from ecgfm.evaluate.metrics import evaluate_scores, paired_bootstrap_delta


def _rare_classes(n: int = 120, n_classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-label labels where most classes have 1-3 positives (resamples lose them), and two score sets."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, n_classes), dtype=int)
    for c in range(n_classes):
        y[rng.choice(n, size=1 + c % 3, replace=False), c] = 1
    a = y * 1.5 + rng.normal(size=y.shape)
    b = rng.normal(size=y.shape)
    return y, 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))


def test_paired_deltas_count_resamples_over_fewer_classes():
    y, a, b = _rare_classes()
    ref = evaluate_scores(y, a, True, n_boot=300, seed=4, max_redraws=2)
    d = paired_bootstrap_delta(y, a, b, n_boot=300, seed=4, max_redraws=2)
    assert ref["n_degenerate"] > 0                         # the stress case has such resamples
    assert d["n_degenerate"] == ref["n_degenerate"]        # the same resamples as the cell's own CI
    one = R.seed_mean_paired_delta(y, [(a, b)], n_boot=300, seed=4, max_redraws=2)
    both, each = R.seed_mean_paired_delta(y, [(a, b), (b, a)], n_boot=300, seed=4, max_redraws=2, per_seed=True)
    assert one["n_degenerate"] == both["n_degenerate"] == each[1]["n_degenerate"] == ref["n_degenerate"]
    ok = np.zeros_like(y)
    ok[:60, :] = 1                                          # every class half positive: nothing degenerate
    assert paired_bootstrap_delta(ok, a, b, n_boot=100, seed=0)["n_degenerate"] == 0


def test_comparison_tables_carry_and_show_n_degenerate():
    assert "n_degenerate" in R.COMPARISON_COLUMNS and "n_degenerate" in R.COMPARISON_MEAN_COLUMNS
    base = dict(reference=R.TWIN.name, mode="linear", task="t", dataset="t", split="test", method="mae", label="mae",
                baseline="random-init", baseline_mode="linear", fraction=1.0, delta=0.1, ci_low=0.05, ci_high=0.15,
                p_not_positive=0.0, n=50, excludes_zero="+")
    per = pd.DataFrame([dict(base, seed=s, n_degenerate=12) for s in (0, 1)], columns=R.COMPARISON_COLUMNS)
    mean = pd.DataFrame([dict(base, seeds="0 1", n_seeds=2, n_degenerate=12)], columns=R.COMPARISON_MEAN_COLUMNS)
    md = R.comparison_markdown(per, means=mean)
    assert "12 resamples over fewer classes" in md
    md0 = R.comparison_markdown(per, means=mean.assign(n_degenerate=0))
    assert "resamples over fewer classes)" not in md0 and "(2 seeds, n = 50) |" in md0


def test_results_md_names_the_task_notes(tmp_path):
    """A class left out of a task (no training positive) was only in the cell's task_notes and the run's log."""
    import json

    from ecgfm.evaluate.metrics import evaluate_scores as ev

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = np.stack([1 - y * 0.6 - 0.2, y * 0.6 + 0.2], axis=1)
    note = "class(es) ['AFLT'] have no positive record in the train split: left out of the task"
    for seed in (0, 1):
        cell = {"mode": "linear", "task": "ptbxl_rhythm", "dataset": "ptbxl", "method": "mae", "checkpoint": "runs/m",
                "checkpoint_kind": "pretrained", "backbone": "vit1d_tiny", "fraction": 1.0, "seed": seed, "n_train": 9,
                "multilabel": False, "checkpoint_id": "m" * 12, "recipe_id": "r",
                "task_notes": [note] if seed == 0 else [note, "a | second note"],
                "external_dataset": "cinc2021", "external_notes": ["3 record(s) excluded"],
                "results": {"test": ev(y, p, False, ["N", "A"], n_boot=10)},
                "predictions": {"test": {"keys": [f"r{i}" for i in range(40)], "y": y.tolist(),
                                         "scores": p.tolist()}}}
        path = tmp_path / "cells" / "linear" / "ptbxl_rhythm" / "m" / f"f1_s{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))
    md = (tmp_path / "results.md").read_text() if R.build_report(tmp_path, plot=False, compare=False) else ""
    assert "## Task notes" in md
    assert f"| ptbxl_rhythm | ptbxl | {note} | 2 of 2 |" in md
    assert "| ptbxl_rhythm | ptbxl | a / second note | 1 of 2 |" in md      # a pipe cannot break the table
    assert "| ptbxl_rhythm | external:cinc2021 | 3 record(s) excluded | 2 of 2 |" in md
    assert R.task_notes_markdown([{"task": "t", "task_notes": []}]) == ""


def test_a_reader_error_raised_while_hydra_builds_it_is_one_line(capsys):
    """An ECGDataError in a source's constructor reached probe.py as Hydra's 'Error in call to target ...' with a
    HYDRA_FULL_ERROR hint and exit 1, not the one 'error:' line of every other user error."""
    import pytest
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from ecgfm.data.record import ECGDataError
    from ecgfm.errors import EXIT_USER_ERROR, run_command

    def build(_cfg):
        return instantiate({"_target_": "ecgfm.data.readers.FolderSource", "root": "/nonexistent/ecgs"})

    with pytest.raises(SystemExit) as got:
        run_command(build, None, (ECGDataError,))
    assert got.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "record folder not found" in err and "Error in call to target" not in err

    def other(_cfg):
        raise InstantiationException("something else") from KeyError("k")

    with pytest.raises(InstantiationException):   # not a user error: the traceback stays
        run_command(other, None, (ECGDataError,))


def test_class_names_spelled_two_ways_are_warned_about(tmp_path, caplog):
    """'NORM' and 'norm' in one class-name column became two classes without a word."""
    import logging

    import wfdb

    from ecgfm.data.readers import FolderSource

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        wfdb.wrsamp(name, fs=100, units=["mV"], sig_name=["II"], p_signal=rng.normal(size=(300, 1)), fmt=["16"],
                    adc_gain=[1000.0], baseline=[0], write_dir=str(tmp_path))
    (tmp_path / "labels.csv").write_text("record_id,dx\na,NORM\nb,norm;AF\nc, Norm\n")
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers.folder"):
        src = FolderSource(tmp_path, labels_csv=tmp_path / "labels.csv")
    assert {src.load(r).labels for r in ("a", "b")} == {("NORM",), ("norm", "AF")}   # still read as written
    msgs = [r.getMessage() for r in caplog.records if "spells" in r.getMessage()]
    assert len(msgs) == 1 and "'NORM' / 'Norm' / 'norm'" in msgs[0]
    caplog.clear()
    (tmp_path / "labels.csv").write_text("record_id,dx\na,NORM\nb,AF\nc,NORM\n")
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers.folder"):
        FolderSource(tmp_path, labels_csv=tmp_path / "labels.csv")
    assert not [r for r in caplog.records if "spells" in r.getMessage()]


def test_a_task_that_cannot_be_built_is_one_error_line(capsys):
    """build_task / build_external refused with clear ValueErrors that probe.py / finetune.py printed as tracebacks
    (e.g. an external set that is the task's own folder: 'no labelled record is left ...')."""
    import pytest

    from ecgfm.errors import EXIT_USER_ERROR
    from ecgfm.evaluate.sweep import run_cli
    from ecgfm.evaluate.tasks import TaskError, load_task_spec

    def main(_cfg):
        load_task_spec("no_such_task")

    with pytest.raises(TaskError):
        main(None)
    with pytest.raises(SystemExit) as got:
        run_cli(main, None)
    assert got.value.code == EXIT_USER_ERROR and "unknown task 'no_such_task'" in capsys.readouterr().err


def test_rows_name_what_their_leakage_overlapped():
    """An allowed overlap of an external set with the task's own train / val records was labelled 'pretraining
    data overlaps this split'."""
    task_only = {"leakage": {"checked": True, "leaked": True,
                             "external:ext/task_train_val": {"leaked": True}, "test": {"leaked": False}}}
    both = {"leakage": {"checked": True, "leaked": True,
                        "external:ext/task_train_val": {"leaked": True}, "test": {"leaked": True}}}
    assert "task's train / val" in R._leakage_mark(task_only)
    assert "pretraining data" in R._leakage_mark(both)
    assert R._leakage_mark({"leakage": {"checked": True, "leaked": False}}) == ""
    assert R._leakage_mark({"leakage": {"checked": False, "leaked": False}}) == " [leakage not checked]"


def test_patient_cells_and_split_columns_as_a_table_writes_them(tmp_path):
    """Missing-value spellings were one patient shared by every such record; '12E3' / '1_000' were read as numbers;
    a 'StratFold' / 'Split ID' column became a default label column (then refused as numbers other than 0/1)."""
    import wfdb

    from ecgfm.data.readers import FolderSource
    from ecgfm.data.readers.folder import _patient_id

    assert [_patient_id(c) for c in ("12", "12.0", " 007 ", "+3", "P012", "12E3", "1_000", "NaN", "NA", "null", "")] \
        == ["12", "12", "7", "3", "P012", "12E3", "1_000", None, None, None, None]
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        wfdb.wrsamp(name, fs=100, units=["mV"], sig_name=["II"], p_signal=rng.normal(size=(300, 1)), fmt=["16"],
                    adc_gain=[1000.0], baseline=[0], write_dir=str(tmp_path))
    (tmp_path / "labels.csv").write_text("record_id,StratFold,af\na,1,1\nb,2,0\nc,10,1\n")
    src = FolderSource(tmp_path, labels_csv=tmp_path / "labels.csv")
    assert src.label_columns == ["af"] and src.load("c").meta["StratFold"] in ("10", 10)


def test_a_cache_of_a_source_with_a_relative_root_has_file_identities(tmp_path, monkeypatch):
    """A source given a relative root wrote relative header paths, which gave no file: / content: identity (the
    leakage guard then matched by source name only)."""
    import wfdb

    from ecgfm.data.cache import CorpusCache, prepare_corpus
    from ecgfm.data.readers import FolderSource
    from ecgfm.evaluate.leakage import cache_identities

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        wfdb.wrsamp(name, fs=100, units=["mV", "mV"], sig_name=["I", "II"], p_signal=rng.normal(size=(500, 2)),
                    fmt=["16", "16"], write_dir="data")
    prepare_corpus([FolderSource(root="data")], "c", spec=None, workers=0, progress=False)
    cache = CorpusCache("c")
    # the source keeps its root absolute (2026-12-08: a relative root keyed one cache for two folders' data)
    assert cache.index["header"].iloc[0]["path"] == str(tmp_path / "data" / "a.hea")
    ids = {k for k in cache_identities(cache) if k.startswith(("file:", "content:"))}
    assert f"file:{tmp_path.resolve() / 'data' / 'a.hea'}" in ids and sum(k.startswith("content:") for k in ids) == 2


def test_faithfulness_reports_the_curves_ends_and_a_baseline_above_the_record():
    """Insertion AUC was called 'higher = better' also where the baseline scored above the record (the demo's
    smoothed baseline: logit 2.56 against 0.90), where deletion and insertion then ranked methods oppositely."""
    import torch
    from torch import nn

    from ecgfm.explain.faithfulness import compare_with_random
    from ecgfm.explain.wrapper import ECGWrapper

    class Energy(nn.Module):   # logit of class 1 = energy of lead 2 in samples 50-100
        def forward(self, x):
            e = (x[:, 2, 50:100] ** 2).mean(-1)
            return torch.stack([-e, e], 1)

    w = ECGWrapper(Energy(), fs=100.0, postprocess=None)
    x = torch.randn(3, 12, 200, generator=torch.Generator().manual_seed(0))
    values = torch.zeros_like(x)
    values[:, 2, 50:100] = 1.0
    target = torch.ones(3, dtype=torch.long)
    res = compare_with_random(w, x, values, target, n_random=1, steps=5, baseline="zeros")
    energy = (x[:, 2, 50:100] ** 2).mean(-1)
    assert abs(res["score_record"]["mean"] - float(energy.mean())) < 1e-5
    assert abs(res["score_baseline"]["mean"]) < 1e-6 and res["n_baseline_above"] == 0
    # the class whose score rises as the evidence goes (logit 0 = -energy): its baseline scores above the record
    flipped = compare_with_random(w, x, values, torch.zeros(3, dtype=torch.long), n_random=1, steps=5,
                                  baseline="zeros")
    assert flipped["n_baseline_above"] == 3


def test_a_run_does_not_resume_on_a_cache_prepared_again_with_other_records(tmp_path):
    """A cache prepared again in place (a repaired file: 23 -> 24 records) kept its folder name, and a killed run
    resumed on it with exit 0: every record's position had moved, so the sampler drew other records."""
    import json

    import pytest

    from ecgfm.config import ConfigError
    from ecgfm.data.cache import cache_digest
    from ecgfm.train.checkpoints import DataFacts

    cache = tmp_path / "folder-4c45d1e24da5"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"files": {"index.jsonl": "a" * 64, "records.npy": "b" * 64}}))
    first = DataFacts(100.0, 2.5, 250, caches=[cache])
    state = first.state_dict()
    assert cache_digest(cache) and state["cache_digests"] == {cache.name: cache_digest(cache)}
    DataFacts(100.0, 2.5, 250, caches=[cache]).load_state_dict(state)          # the same records: resumes
    (cache / "manifest.json").write_text(json.dumps({"files": {"index.jsonl": "c" * 64, "records.npy": "b" * 64}}))
    with pytest.raises(ConfigError, match="prepared again since"):
        DataFacts(100.0, 2.5, 250, caches=[cache]).load_state_dict(state)
    DataFacts(100.0, 2.5, 250, caches=[cache], deliberate=True).load_state_dict(state)   # resume= on purpose
    del state["cache_digests"]                                                 # a checkpoint written before
    DataFacts(100.0, 2.5, 250, caches=[cache]).load_state_dict(state)


def test_a_contrastive_validation_batch_of_one_record_is_left_out(caplog):
    """A validation split (or last batch) of one record gave SimCLR val/loss 0.0 and val/acc 1.0 (no negative),
    which went into summary.json."""
    import logging

    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.methods.mae import MAEModule
    from ecgfm.methods.simclr import SimCLRModule

    torch.manual_seed(0)
    simclr = SimCLRModule(create_backbone("vit1d_test"), proj_dim=8, proj_hidden=16)
    logged = []
    simclr.log_terms = lambda stage, terms, batch_size: logged.append((stage, batch_size))
    one = {"x": torch.randn(1, 12, 250), "x2": torch.randn(1, 12, 250), "index": torch.tensor([0])}
    with caplog.at_level(logging.WARNING, logger="ecgfm.methods.base"):
        assert simclr.validation_step(one, 0) is None
    assert logged == [] and any("left out of the val/* metrics" in r.getMessage() for r in caplog.records)
    two = {k: torch.cat([v, v + 1]) for k, v in one.items()}
    assert simclr.validation_step(two, 1) is not None and logged == [("val", 2)]
    assert SimCLRModule.min_val_batch == 2 and MAEModule.min_val_batch == 1   # MAE's loss of one record is one


def test_the_leakage_check_says_when_a_pretraining_cache_changed_since(tmp_path, caplog):
    """encoder.json named its pretraining caches by folder only: prepared again after a record was removed, the
    guard read the cache as it is now and the removed record went unchecked, without a word."""
    import logging

    from ecgfm.data.cache import cache_digest, prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.evaluate.leakage import pretrain_identities

    path = str(tmp_path / "c")
    prepare_corpus(SyntheticSource(n_records=3, seed=0, fs=100.0, duration=5.0), path, PreprocessSpec(fs=100.0),
                   workers=0, progress=False)
    same = {"extra": {"pretrain_caches": [path], "pretrain_cache_digests": {path: cache_digest(path)}}}
    _, prov = pretrain_identities(same)
    assert "CHANGED" not in prov[0]
    changed = {"extra": {"pretrain_caches": [path], "pretrain_cache_digests": {path: "0" * 16}}}
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.leakage"):
        _, prov = pretrain_identities(changed)
    assert "CHANGED since pretraining" in prov[0] and any("holds other records" in r.getMessage()
                                                          for r in caplog.records)
