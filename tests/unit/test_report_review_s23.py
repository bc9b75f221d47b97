"""Protocol review of the twenty-third session: criterion 4 decided on the paired comparison over shared seeds,
results.md names each row's seeds, a two-level (seeds + records) bootstrap for the seed-mean paired CI, macro F1
without classes that had no validation positive, and the PTB-XL task comments on window aggregation."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgfm.evaluate import report as R
from ecgfm.evaluate.metrics import choose_thresholds, evaluate_scores, macro_f1, paired_bootstrap_delta

N = 200
CLASSES = ["N", "A", "O", "~"]
ROOT = Path(__file__).resolve().parents[2]


def _y() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4, size=N)


def _finetune_cell(res: Path, task: str, method: str, kind: str, backbone: str, ck: str, seed: int,
                   strength: float) -> None:
    """A single-label fine-tune cell at 10 % whose scores have ``strength`` signal (noise drawn per seed and row)."""
    y = _y()
    onehot = np.eye(4)[y]
    rng = np.random.default_rng(1000 + seed + (0 if kind == "pretrained" else 50))
    z = rng.normal(size=(N, 4)) + strength * onehot
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cell = {"mode": "finetune", "task": task, "dataset": task, "method": method, "checkpoint": ck,
            "checkpoint_kind": kind, "backbone": backbone, "architecture": backbone, "checkpoint_id": ck + "-id",
            "recipe_id": "r-" + ck, "fraction": 0.1, "seed": seed, "n_train": 30, "train_records": f"subset-{seed}",
            "classes": CLASSES, "multilabel": False, "val_macro_auroc": 0.9,
            "results": {"test": evaluate_scores(y, p, False, CLASSES, n_boot=20, seed=0)},
            "leakage": {"checked": True, "leaked": False},
            "predictions": {"test": {"keys": [f"{task}/r{i}" for i in range(N)], "y": onehot.astype(int).tolist(),
                                     "scores": p.tolist()}}}
    d = res / "cells" / "finetune" / task / ck.replace(":", "_")
    d.mkdir(parents=True, exist_ok=True)
    (d / f"f0.1_s{seed}.json").write_text(json.dumps(cell))


def _ssl_and_cnn(res: Path, ssl_seeds, cnn_seeds, cnn_strength) -> None:
    for task in R.ACCEPTANCE_TASKS:
        for s in ssl_seeds:
            _finetune_cell(res, task, "mae", "pretrained", "vit1d_tiny", "mae_enc", s, 1.2)
        for s in cnn_seeds:
            _finetune_cell(res, task, "supervised", "supervised", "resnet1d_tiny", "supervised:resnet1d_tiny", s,
                           cnn_strength(s))


def test_criterion_4_is_decided_on_the_shared_seeds_not_on_unpaired_means(tmp_path):
    """The CNN is better on every seed both rows have (0-2) and bad on two extra seeds (3-4): its table mean is
    below the SSL row's, but the paired comparison says SSL is worse, so criterion 4 is MISSED (it read MET); the
    evidence names the paired seeds and each row's seeds, and results.md names every row's seeds."""
    res = tmp_path / "results"
    _ssl_and_cnn(res, (0, 1, 2), (0, 1, 2, 3, 4), lambda s: 1.6 if s < 3 else 0.5)
    out = R.build_report(res, plot=False, n_boot=30)
    summ = R.summarize(R.tidy_rows(R.load_cells(res)))
    cnn = summ[summ["label"] == "supervised"].iloc[0]
    ssl = summ[summ["label"] == "mae"].iloc[0]
    assert ssl["mean"] > cnn["mean"]                                   # the unpaired means favour SSL ...
    crit = out["acceptance"][3]
    assert crit["status"] == "MISSED"                                  # ... the shared seeds do not
    assert cnn["seeds"] == "0 1 2 3 4" and ssl["seeds"] == "0 1 2"
    ev = crit["evidence"]
    assert "paired (decides) over seeds 0-2" in ev and "SSL row: seeds 0-2; CNN row: seeds 0-4" in ev
    assert "(3 seeds, n = 200)" in ev
    md = Path(out["markdown"]).read_text()
    rows = [line for line in md.split("## macro_auroc")[1].splitlines() if line.startswith("| supervised")]
    assert rows and all(" s0-4 (5) |" in r for r in rows)
    rows = [line for line in md.split("## macro_auroc")[1].splitlines() if line.startswith("| mae")]
    assert rows and all(" s0-2 (3) |" in r for r in rows)


def test_criterion_4_without_a_shared_seed_is_not_measured(tmp_path):
    """SSL seeds 0-1 and CNN seeds 2-3 were trained on different label subsets: nothing to pair, so nothing is
    decided (the unpaired means said MET)."""
    res = tmp_path / "results"
    _ssl_and_cnn(res, (0, 1), (2, 3), lambda s: 0.3)
    crit = R.build_report(res, plot=False, n_boot=20)["acceptance"][3]
    assert crit["status"] == R.NOT_MEASURED
    assert "no paired comparison" in crit["evidence"] and "supervised s2,3" in crit["evidence"]


def _binary(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.4).astype(int)[:, None]
    return y, rng.normal(size=(n, 1))


def test_seed_mean_ci_covers_the_spread_over_seeds():
    """Two seeds that disagree (+0.2 and about -0.04): the record-only CI of their mean excluded 0, although one
    seed says the opposite; the two-level CI (seeds drawn with replacement) contains 0. Reproducible."""
    y, noise = _binary()
    a1, b1 = y * 1.5 + noise, y * 0.5 + noise[::-1]
    a2, b2 = y * 0.6 + noise[::-1], y * 0.8 + noise
    mean, each = R.seed_mean_paired_delta(y, [(a1, b1), (a2, b2)], n_boot=200, seed=0, per_seed=True)
    assert each[0]["ci_low"] > 0 and each[1]["delta"] < 0
    assert mean["delta"] == pytest.approx((each[0]["delta"] + each[1]["delta"]) / 2)
    assert mean["ci_low"] < 0 < mean["ci_high"]
    assert mean["ci_low"] <= each[1]["delta"] + 0.02 and mean["ci_high"] >= each[0]["delta"] - 0.02
    assert mean["n_results"] == 2
    again = R.seed_mean_paired_delta(y, [(a1, b1), (a2, b2)], n_boot=200, seed=0)
    assert again == mean                                              # a seeded generator: the same report twice
    # one seed: still exactly the paired bootstrap
    one = R.seed_mean_paired_delta(y, [(a1, b1)], n_boot=200, seed=0)
    ref = paired_bootstrap_delta(y, a1, b1, n_boot=200, seed=0)
    assert {k: one[k] for k in ref} == pytest.approx(ref)


def test_identical_seeds_count_once():
    """Seeds with identical predictions (a deterministic probe at 100 %) are one result: the mean and the CI are
    over distinct results, and three identical seeds are the one seed's paired bootstrap."""
    y, noise = _binary(seed=1)
    a, b = y * 1.2 + noise, y * 0.4 + noise[::-1]
    c, d = y * 0.4 + noise, y * 0.9 + noise[::-1]
    mixed, each = R.seed_mean_paired_delta(y, [(a, b), (a, b), (c, d)], n_boot=100, seed=2, per_seed=True)
    assert mixed["delta"] == pytest.approx((each[0]["delta"] + each[2]["delta"]) / 2)   # not 2:1 weighted
    assert len(each) == 3 and mixed["n_results"] == 2                  # per-seed rows kept as they are
    ref = paired_bootstrap_delta(y, a, b, n_boot=100, seed=2)
    three = R.seed_mean_paired_delta(y, [(a, b), (a.copy(), b.copy()), (a, b)], n_boot=100, seed=2)
    assert three["n_results"] == 1 and {k: three[k] for k in ref} == pytest.approx(ref)
    # the comparison table says so
    base = dict(reference=R.TWIN.name, mode="linear", task="t", dataset="t", split="test", method="m", label="m",
                baseline="random-init", baseline_mode="linear", fraction=1.0, p_not_positive=0.0, n=300,
                n_degenerate=0, excludes_zero="+")
    per = pd.DataFrame([dict(base, seed=s, delta=0.1, ci_low=0.05, ci_high=0.15) for s in (0, 1, 2)],
                       columns=R.COMPARISON_COLUMNS)
    mean = pd.DataFrame([dict(base, seeds="0 1 2", n_seeds=3, n_results=1, delta=0.1, ci_low=0.05, ci_high=0.15)],
                        columns=R.COMPARISON_MEAN_COLUMNS)
    md = R.comparison_markdown(per, means=mean)
    assert "(3 seeds, identical, n = 300)" in md and "two-level" in md


def test_twin_note_does_not_claim_the_label_subsets_for_a_record_only_ci():
    assert "and the label subsets, not the spread" not in R.TWIN_INIT_NOTE
    assert "resamples the split's records and the seeds" in R.TWIN_INIT_NOTE
    assert "one random initialisation (`init_seed`) for every seed" in R.TWIN_INIT_NOTE


def _multilabel(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=(n, 3)) < 0.35).astype(int)
    return y, 1 / (1 + np.exp(-(2.0 * y + rng.normal(size=y.shape))))


def test_macro_f1_leaves_out_classes_without_a_validation_positive():
    yv, pv = _multilabel(80, 0)
    yv[:, 2] = 0                                                       # class c: no validation positive
    th = choose_thresholds(yv, pv)
    yt, pt = _multilabel(150, 1)
    pt[:, 2] = np.where(yt[:, 2] == 1, 0.3, 0.2)                       # class c at 0.5: F1 0, pure placeholder
    got = evaluate_scores(yt, pt, True, ["a", "b", "c"], th, n_boot=50, seed=0)
    two = evaluate_scores(yt[:, :2], pt[:, :2], True, ["a", "b"], np.asarray(th)[:2], n_boot=50, seed=0)
    for k in ("value", "ci_low", "ci_high"):                           # point estimate and bootstrap
        assert got["macro_f1"][k] == pytest.approx(two["macro_f1"][k])
    from ecgfm.evaluate.metrics import Thresholds

    assert isinstance(th, Thresholds) and th.no_val_positive.tolist() == [False, False, True]
    assert th[2] == 0.5 and np.isfinite(th).all()                      # still a usable (artifact) threshold
    assert got["f1_no_threshold_classes"] == ["c"] and got["f1_excluded_classes"] == ["c"]
    assert got["excluded_classes"] == []                               # macro AUROC keeps the class
    assert macro_f1(yt, pt, True, th) == pytest.approx(got["macro_f1"]["value"])
    assert macro_f1(yt, pt, True, np.asarray(th)) < got["macro_f1"]["value"]   # plain floats: counted at 0.5
    kept = pickle.loads(pickle.dumps(th))
    assert kept.no_val_positive.tolist() == [False, False, True]
    assert th[[1, 2]].no_val_positive.tolist() == [False, True]
    # the report names them
    cell = {"label": "mae", "mode": "linear", "task": "ptbxl_subdiag", "fraction": 1.0, "seed": 0,
            "results": {"test": got}}
    md = R.f1_no_threshold_markdown([cell])
    assert "without a validation positive" in md
    assert "| mae | linear probe | ptbxl_subdiag | test | 100 % | 0 | c |" in md
    assert R.f1_no_threshold_markdown([{"results": {"test": two}}]) == ""


def test_ptbxl_task_comments_describe_the_aggregation_the_code_runs():
    for path in sorted((ROOT / "ecgfm" / "conf" / "task").glob("ptbxl_*.yaml")):
        text = path.read_text()
        assert "probabilities averaged" not in text, path
        assert "mean window embedding" in text and "mean window" in text and "logit" in text, path


def test_an_external_set_keeps_the_mark_of_classes_without_a_validation_positive():
    """score_external dropped choose_thresholds' mark (np.asarray(thresholds)[keep]) when an external set's
    labels left a task class out: the class without a validation positive was scored at its placeholder 0.5 in the
    external macro F1 again."""
    from types import SimpleNamespace

    from ecgfm.evaluate.metrics import Thresholds
    from ecgfm.evaluate.sweep import score_external

    y = np.zeros((40, 3), np.float32)
    y[:20, 0] = 1
    y[20:, 1] = 1
    y[::4, 2] = 1                                               # "C": no code in the external set
    p = np.clip(y * 0.9 + 0.05, 0, 1)
    p[:, 1] = 0.01                                              # "B": never above the placeholder 0.5: F1 0
    th = Thresholds([0.5, 0.5, 0.5], [False, True, False])      # "B" had no validation positive
    task = SimpleNamespace(multilabel=True, class_names=["A", "B", "C"])
    ext = SimpleNamespace(labels=y, label_report={"not_evaluable_classes": ["C"]})
    got = score_external(task, ext, np.arange(40), p, th, n_boot=20, seed=0)
    assert got["not_evaluable_classes"] == ["C"]
    assert got["f1_no_threshold_classes"] == ["B"] and got["macro_f1"]["value"] == pytest.approx(1.0)
