"""Report: one paired-comparison mechanism for every baseline (random-init twin, handcrafted probe, supervised
CNN), seed-mean CIs from jointly resampled records, and the acceptance block computed from the cells."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgfm.evaluate import report as R
from ecgfm.evaluate.metrics import evaluate_scores, paired_bootstrap_delta

N = 160
CLASSES = ["a", "b", "c"]


def _labels(task: str, multilabel: bool) -> np.ndarray:
    """The test labels of ``task`` (the same records for every seed and method)."""
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    if multilabel:
        y = (rng.random((N, 3)) < 0.4).astype(int)
        y[:3] = np.eye(3, dtype=int)   # every class has positives
        return y
    return np.eye(3, dtype=int)[rng.integers(0, 3, N)]


def _scores(y: np.ndarray, strength: float, noise_seed: int) -> np.ndarray:
    return y * strength + np.random.default_rng(noise_seed).normal(size=y.shape)


def _cell(res: Path, *, task: str, method: str, mode: str, seed: int, fraction: float, strength: float,
          kind: str = "pretrained", backbone: str = "vit1d_tiny", arch: str = "vit-A", recipe: str = "r1",
          ckpt: str | None = None, noise: int | None = None, scores: np.ndarray | None = None) -> dict:
    multilabel = task == "ptbxl_super"
    y = _labels(task, multilabel)
    if noise is None:
        noise = zlib.crc32(f"{method}|{mode}|{seed}|{fraction}".encode())
    s = _scores(y, strength, noise) if scores is None else scores
    target = y if multilabel else y.argmax(axis=1)
    p = 1 / (1 + np.exp(-s))
    cell = {"mode": mode, "task": task, "dataset": task, "method": method, "checkpoint": ckpt or f"runs/{method}",
            "checkpoint_kind": kind, "backbone": backbone, "architecture": arch, "fraction": fraction, "seed": seed,
            "n_train": 10, "multilabel": multilabel, "checkpoint_id": (ckpt or method).ljust(12, "0"),
            "recipe_id": recipe,
            "results": {"test": evaluate_scores(target, p, multilabel, CLASSES, n_boot=20)},
            "predictions": {"test": {"keys": [f"r{i}" for i in range(N)], "y": y.tolist(), "scores": p.tolist()}}}
    # the validation score (here: its test score) that picks "the best SSL probe / fine-tune"
    cell["val_macro_auroc"] = cell["results"]["test"]["macro_auroc"]["value"]
    path = res / "cells" / mode / task / (ckpt or method).replace("/", "_") / f"f{fraction:g}_s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell))
    return cell


def test_one_mechanism_for_every_baseline(tmp_path):
    res = tmp_path / "results"
    for seed in (0, 1):
        kw = dict(task="cinc2017", seed=seed, fraction=1.0)
        twin = _cell(res, method="random-init", mode="linear", strength=0.0, kind="random", ckpt="random:enc", **kw)
        _cell(res, method="mae", mode="linear", strength=2.5, **kw)                       # clearly better
        _cell(res, method="copy", mode="linear", strength=0.0, ckpt="copy", kind="pretrained",
              scores=np.log(np.array(twin["predictions"]["test"]["scores"]) /
                            (1 - np.array(twin["predictions"]["test"]["scores"]))), **kw)   # the twin's scores
        _cell(res, method=R.HANDCRAFTED_METHOD, mode="linear", strength=0.3, kind="handcrafted",
              backbone="handcrafted", arch=None, recipe="rh", ckpt="handcrafted", **kw)
        _cell(res, method="mae", mode="finetune", strength=2.5, recipe="rf", **kw)
        _cell(res, method="supervised", mode="finetune", strength=0.5, kind="supervised", backbone="resnet1d_tiny",
              arch="cnn", recipe="rs", ckpt="supervised:resnet1d_tiny", **kw)
        _cell(res, method="supervised", mode="finetune", strength=0.2, kind="supervised", backbone="vit1d_tiny",
              recipe="rs", ckpt="supervised:enc", **kw)   # the ViT from scratch: a row, not the CNN baseline
    cells = R.load_cells(res)

    twin_seed, twin_mean = R.compare_with_baseline(cells, R.TWIN, n_boot=200)
    assert set(twin_seed["label"]) == {"mae", "copy"}   # other architectures / recipes have no twin
    good = twin_mean[twin_mean["label"] == "mae"].iloc[0]
    assert good["delta"] > 0.2 and good["ci_low"] > 0 and good["excludes_zero"] == "+" and good["n_seeds"] == 2
    same = twin_mean[twin_mean["label"] == "copy"].iloc[0]
    assert abs(same["delta"]) < 1e-6 and same["ci_low"] <= 0 <= same["ci_high"] and same["excludes_zero"] == ""
    assert (twin_seed[twin_seed["label"] == "mae"]["excludes_zero"] == "+").all()

    hand_seed, hand_mean = R.compare_with_baseline(cells, R.HANDCRAFTED, n_boot=200)
    ft = hand_mean[(hand_mean["label"] == "mae") & (hand_mean["mode"] == "finetune")].iloc[0]
    assert ft["baseline_mode"] == "linear" and ft["ci_low"] > 0    # fine-tune rows against the handcrafted probe
    assert R.HANDCRAFTED_METHOD not in set(hand_seed["method"])

    cnn_seed, cnn_mean = R.compare_with_baseline(cells, R.SUPERVISED_CNN, n_boot=200)
    cnn_label = {c["label"] for c in cells if c["backbone"] == "resnet1d_tiny"}
    assert set(cnn_mean["baseline"]) == cnn_label and set(cnn_mean["baseline_mode"]) == {"finetune"}
    assert {"linear", "finetune"} <= set(cnn_mean["mode"])             # probe and fine-tune rows both
    vit = cnn_mean[cnn_mean["method"] == "supervised"]                 # the ViT from scratch is a compared row
    assert len(vit) == 1 and vit["label"].iloc[0] not in cnn_label and vit["ci_high"].iloc[0] < 0
    assert all(R.SUPERVISED_CNN.is_baseline(c) == (c["backbone"] == "resnet1d_tiny" and c["method"] == "supervised")
               for c in cells)

    # per-seed rows (from the joint resamples) equal each pair's own paired bootstrap
    for c, b in R.matched_pairs(cells, R.TWIN):
        own = R._paired_rows(c, b, 200, 0)[0]
        row = twin_seed[(twin_seed["label"] == c["label"]) & (twin_seed["seed"] == c["seed"])].iloc[0]
        assert (row["delta"], row["ci_low"], row["ci_high"]) == pytest.approx((own["delta"], own["ci_low"],
                                                                                own["ci_high"]))

    # the old entry points are the per-seed rows of the same mechanism
    pd.testing.assert_frame_equal(R.paired_comparisons(cells, n_boot=200), twin_seed)
    pd.testing.assert_frame_equal(R.baseline_comparisons(cells, n_boot=200), hand_seed)

    out = R.build_report(res, plot=False, n_boot=100)
    md = Path(out["markdown"]).read_text()
    for spec in R.BASELINES:
        assert spec.title in md
    assert "yes (> 0)" in md and "CI excludes 0" in md
    assert set(pd.read_csv(out["comparisons"])["reference"]) == {s.name for s in R.BASELINES}
    assert set(pd.read_csv(res / "comparisons_mean.csv")["n_seeds"]) == {2}


def test_seed_mean_with_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    a, b = rng.random((80, 3)) + np.eye(3)[y], rng.random((80, 3))
    one = R.seed_mean_paired_delta(y, [(a, b)], n_boot=300, seed=3)
    ref = paired_bootstrap_delta(y, a, b, n_boot=300, seed=3)
    for k in ("delta", "ci_low", "ci_high", "p_not_positive", "n"):
        assert one[k] == pytest.approx(ref[k])
    both, each = R.seed_mean_paired_delta(y, [(a, b), (b, b)], n_boot=300, seed=3, per_seed=True)
    assert both["delta"] == pytest.approx(ref["delta"] / 2)
    for k in ("delta", "ci_low", "ci_high", "p_not_positive"):   # each seed: its own paired bootstrap
        assert each[0][k] == pytest.approx(ref[k])
    assert each[1]["delta"] == each[1]["ci_low"] == each[1]["ci_high"] == 0.0


def _acceptance_cells(res: Path, ssl_ptb_probe: float) -> None:
    for task in ("cinc2017", "ptbxl_super"):
        for frac in (0.1, 1.0):
            for seed in (0, 1):
                kw = dict(task=task, seed=seed, fraction=frac)
                ssl = ssl_ptb_probe if task == "ptbxl_super" else 4.0
                _cell(res, method="mae", mode="linear", strength=ssl, ckpt="mae", **kw)
                _cell(res, method="simclr", mode="linear", strength=ssl, ckpt="simclr", **kw)
                _cell(res, method="random-init", mode="linear", strength=0.0, kind="random", ckpt="random:mae", **kw)
                _cell(res, method=R.HANDCRAFTED_METHOD, mode="linear", strength=0.8, kind="handcrafted",
                      backbone="handcrafted", arch=None, recipe="rh", ckpt="handcrafted", **kw)
                _cell(res, method="mae", mode="finetune", strength=4.0, recipe="rf", ckpt="mae", **kw)
                _cell(res, method="supervised", mode="finetune", strength=1.0, kind="supervised",
                      backbone="resnet1d_tiny", arch="cnn", recipe="rs", ckpt="supervised:resnet1d_tiny", **kw)


def test_acceptance_block_met(tmp_path):
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=4.0)
    out = R.build_report(res, plot=False, n_boot=100)
    assert [r["status"] for r in out["acceptance"]] == ["MET"] * 4
    md = Path(out["markdown"]).read_text()
    assert md.index("## Acceptance") < md.index("## macro_auroc")
    assert md.count("**MET**") == 4 and "test 0.9" in md


def test_acceptance_block_missed_with_numbers(tmp_path):
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=0.0)   # PTB-XL probes no better than the twin (~0.5 macro AUROC)
    acc = R.build_report(res, plot=False, n_boot=100)["acceptance"]
    status = [r["status"] for r in acc]
    assert status[0] == "MET" and status[2] == "MISSED" and status[3] == "MET"
    assert status[1] == "MISSED" and "does not clear its twin at ptbxl_super" in acc[1]["evidence"]
    assert "MAE: no: mae (chosen on validation" in acc[1]["evidence"] and "contrastive: no: simclr (" in acc[1][
        "evidence"]
    best = acc[2]["evidence"]
    assert best.startswith("best on validation: ") and "(linear probe)" in best
    assert float(best.split(" test ")[1].split()[0]) < 0.85


def test_acceptance_without_cells_is_not_measured():
    acc = R.acceptance([], R.summarize(pd.DataFrame(columns=R.TIDY_COLUMNS)), {})
    assert [r["status"] for r in acc] == ["NOT MEASURED"] * 4
    assert all("not measured" in r["evidence"] for r in acc)


def test_acceptance_part_without_cells_is_not_measured_but_a_measured_miss_wins(tmp_path):
    """Without handcrafted and supervised-CNN cells, criteria that need them are NOT MEASURED (not MISSED) when
    everything measured passes; a measured miss (PTB-XL probe < 0.85) stays MISSED."""
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=4.0)
    for path in (res / "cells").rglob("*.json"):
        cell = json.loads(path.read_text())
        if cell["checkpoint"] in ("handcrafted", "supervised:resnet1d_tiny") or (
                cell["task"] == "ptbxl_super" and cell["method"] == "simclr"):
            path.unlink()
    acc = R.build_report(res, plot=False, n_boot=100)["acceptance"]
    assert [r["status"] for r in acc] == ["NOT MEASURED", "NOT MEASURED", "MET", "NOT MEASURED"]
    assert "MAE: yes: mae (chosen on validation" in acc[1]["evidence"]
    assert "clears its twin at all 4 settings" in acc[1]["evidence"]
    assert "contrastive: not measured" in acc[1]["evidence"]
    assert "no paired comparison with the handcrafted baseline" in acc[0]["evidence"]
    assert "NOT MEASURED" in Path(res / "results.md").read_text()

    res2 = tmp_path / "results2"
    _acceptance_cells(res2, ssl_ptb_probe=0.0)
    for path in (res2 / "cells").rglob("*.json"):
        if json.loads(path.read_text())["checkpoint"] == "supervised:resnet1d_tiny":
            path.unlink()
    acc = R.build_report(res2, plot=False, n_boot=100)["acceptance"]
    assert [r["status"] for r in acc] == ["MET", "MISSED", "MISSED", "NOT MEASURED"]


def test_criterion_2_needs_one_encoder_of_a_group_at_every_setting(tmp_path):
    """Two contrastive encoders, one clearing its twin only on CinC 2017 and the other only on PTB-XL: each setting
    was "passed by the group" (the old any-encoder-per-setting rule said MET), but no contrastive method clears its
    twin everywhere."""
    res = tmp_path / "results"
    for task in ("cinc2017", "ptbxl_super"):
        for frac in (0.1, 1.0):
            for seed in (0, 1):
                kw = dict(task=task, seed=seed, fraction=frac)
                _cell(res, method="mae", mode="linear", strength=4.0, ckpt="mae", **kw)
                _cell(res, method="simclr", mode="linear", strength=4.0 if task == "cinc2017" else 0.0,
                      ckpt="simclr_a", **kw)
                _cell(res, method="clocs", mode="linear", strength=4.0 if task == "ptbxl_super" else 0.0,
                      ckpt="clocs_b", **kw)
                _cell(res, method="random-init", mode="linear", strength=0.0, kind="random", ckpt="random:mae", **kw)
    acc = R.build_report(res, plot=False, n_boot=100)["acceptance"]
    assert acc[1]["status"] == "MISSED"
    ev = acc[1]["evidence"]
    assert "contrastive: no: " in ev and ("simclr (chosen on validation" in ev) != ("clocs (chosen on validation" in ev)
    assert ("does not clear its twin at ptbxl_super 10 %, ptbxl_super 100 %" in ev
            or "does not clear its twin at cinc2017 10 %, cinc2017 100 %" in ev)


def test_best_probe_is_chosen_on_validation_not_test(tmp_path):
    """Criterion 1 reads on test the probe that is best on *validation*, even when another one is better on test."""
    res = tmp_path / "results"
    for seed in (0, 1):
        kw = dict(task="cinc2017", seed=seed, fraction=1.0)
        _cell(res, method=R.HANDCRAFTED_METHOD, mode="linear", strength=0.8, kind="handcrafted",
              backbone="handcrafted", arch=None, recipe="rh", ckpt="handcrafted", **kw)
        a = _cell(res, method="mae", mode="linear", strength=4.0, ckpt="mae", **kw)            # best on test
        b = _cell(res, method="simclr", mode="attention", strength=2.0, ckpt="simclr", **kw)
        for cell, val in ((a, 0.70), (b, 0.90)):                                              # b best on validation
            cell["val_macro_auroc"] = val
            path = res / "cells" / cell["mode"] / "cinc2017" / cell["checkpoint"] / f"f1_s{seed}.json"
            path.write_text(json.dumps(cell))
    acc = R.build_report(res, plot=False, n_boot=50)["acceptance"]
    assert "simclr (attention probe)" in acc[0]["evidence"] and "validation 0.900" in acc[0]["evidence"]


def test_best_fine_tune_is_chosen_on_validation_not_test(tmp_path):
    """Criterion 4 compares with the supervised CNN the SSL fine-tune that is best on *validation*: here it is
    below the CNN on test, so the criterion is missed although another SSL fine-tune (worst on validation) would
    pass on test."""
    res = tmp_path / "results"
    for task in ("cinc2017", "ptbxl_super"):
        for seed in (0, 1):
            kw = dict(task=task, seed=seed, fraction=0.1)
            _cell(res, method="supervised", mode="finetune", strength=2.0, kind="supervised",
                  backbone="resnet1d_tiny", arch="cnn", recipe="rs", ckpt="supervised:resnet1d_tiny", **kw)
            a = _cell(res, method="mae", mode="finetune", strength=0.5, recipe="rf", ckpt="mae", **kw)
            b = _cell(res, method="simclr", mode="finetune", strength=4.0, recipe="rf", ckpt="simclr", **kw)
            for cell, val in ((a, 0.95), (b, 0.55)):                             # a best on validation
                cell["val_macro_auroc"] = val
                path = res / "cells" / "finetune" / task / cell["checkpoint"] / f"f0.1_s{seed}.json"
                path.write_text(json.dumps(cell))
    acc = R.build_report(res, plot=False, n_boot=50)["acceptance"]
    assert acc[3]["status"] == "MISSED" and "chosen on validation" in acc[3]["criterion"]
    for part in acc[3]["evidence"].split(" <br> "):
        assert ": no: SSL mae " in part and "best on validation: 0.950" in part, part


def test_one_checkpoint_as_the_reference_of_others_of_its_method(tmp_path):
    """BaselineSpec(checkpoints=...): the real-data-only MAE is the baseline of the MAEs pretrained with generated
    records (the pool-size study); the other MAEs are rows, the reference itself is not."""
    res = tmp_path / "results"
    for seed in (0, 1):
        kw = dict(task="cinc2017", seed=seed, fraction=1.0, method="mae", mode="linear")
        _cell(res, strength=1.0, ckpt="real/encoder", **kw)
        _cell(res, strength=3.0, ckpt="df100k/encoder", **kw)
        _cell(res, strength=1.0, ckpt="df20k/encoder", noise=seed, **kw)
        _cell(res, method="mae", mode="linear", strength=1.0, ckpt="real/encoder", task="cinc2017", seed=seed,
              fraction=0.1)
    cells = R.load_cells(res)
    spec = R.BaselineSpec("real-only pool", "Paired comparison with the real-only pool", ("mae",),
                          same_architecture=True, checkpoints=("real/encoder",))
    assert [spec.is_baseline(c) for c in cells] == [c["checkpoint"] == "real/encoder" for c in cells]
    per_seed, mean = R.compare_with_baseline(cells, spec, n_boot=200)
    labels = {c["checkpoint"]: c["label"] for c in cells}
    assert set(mean["label"]) == {labels["df100k/encoder"], labels["df20k/encoder"]}
    assert set(mean["baseline"]) == {labels["real/encoder"]} and set(mean["fraction"]) == {1.0}
    big = mean[mean["label"] == labels["df100k/encoder"]].iloc[0]
    assert big["ci_low"] > 0 and big["n_seeds"] == 2 and len(per_seed) == 4


def test_probes_with_handcrafted_side_features_never_count_as_the_encoders_probe(tmp_path):
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=0.0)   # PTB-XL probes of the encoders alone: ~0.5, criterion 3 missed
    for seed in (0, 1):                         # ... the same encoder with the handcrafted features: far better
        _cell(res, method="mae", mode="linear+handcrafted", strength=4.0, recipe="rhc", ckpt="mae",
              task="ptbxl_super", seed=seed, fraction=1.0)
    assert not R._is_probe_mode("linear+handcrafted") and not R._is_probe_mode("mlp+mean_std+handcrafted")
    assert R._is_probe_mode("linear+mean_std") and not R._is_probe_mode("finetune")
    out = R.build_report(res, plot=False, n_boot=100)
    assert out["acceptance"][2]["status"] == "MISSED" and "+ handcrafted" not in out["acceptance"][2]["evidence"]
    md = Path(out["markdown"]).read_text()
    assert "linear probe + handcrafted features" in md        # still its own row of the table


def test_comparison_files_of_an_older_run_do_not_outlive_it(tmp_path):
    """A results folder whose baselines are gone (here: only encoder rows left) keeps no comparisons*.csv from the
    run before, which the benchmark would otherwise copy into the docs as current."""
    res = tmp_path / "results"
    for seed in (0, 1):
        kw = dict(task="cinc2017", seed=seed, fraction=1.0)
        _cell(res, method="random-init", mode="linear", strength=0.0, kind="random", ckpt="random:enc", **kw)
        _cell(res, method="mae", mode="linear", strength=2.5, **kw)
    out = R.build_report(res, plot=False, n_boot=50)
    assert out["comparisons"] and (res / "comparisons.csv").exists() and (res / "comparisons_mean.csv").exists()
    import shutil

    shutil.rmtree(res / "cells" / "linear" / "cinc2017" / "random:enc")
    out = R.build_report(res, plot=False, n_boot=50)
    assert out["comparisons"] is None
    assert not (res / "comparisons.csv").exists() and not (res / "comparisons_mean.csv").exists()


def test_cells_with_other_class_columns_or_labels_are_not_paired(tmp_path):
    """Paired differences need the same score columns and the same labels on the same records: otherwise the
    report refuses, naming both cells, instead of subtracting mismatched columns."""
    res = tmp_path / "results"
    kw = dict(task="cinc2017", seed=0, fraction=1.0)
    twin = _cell(res, method="random-init", mode="linear", strength=0.0, kind="random", ckpt="random:enc", **kw)
    enc = _cell(res, method="mae", mode="linear", strength=2.5, **kw)
    assert R._aligned(enc, twin, "test") is not None
    swapped = dict(enc, classes=list(reversed(CLASSES)))
    with pytest.raises(ValueError, match="class columns"):
        R._aligned(dict(twin, classes=list(CLASSES)), swapped, "test")
    relabelled = json.loads(json.dumps(enc))
    relabelled["predictions"]["test"]["y"] = relabelled["predictions"]["test"]["y"][::-1]
    with pytest.raises(ValueError, match="different labels"):
        R._aligned(relabelled, twin, "test")


def test_a_table_of_rows_scored_on_different_record_sets_says_so(tmp_path):
    res = tmp_path / "results"
    for seed in (0, 1):
        _cell(res, method="mae", mode="linear", strength=2.0, task="cinc2017", seed=seed, fraction=1.0)
        _cell(res, method="simclr", mode="linear", strength=2.0, task="cinc2017", seed=seed, fraction=1.0)
    df = R.tidy_rows(R.load_cells(res))
    assert f"(n = {N} records)" in R.markdown_table(df)
    df.loc[df["method"] == "simclr", "n_test"] = N - 10          # as if scored on a smaller task
    assert f"(n = {N - 10}, {N} records: rows differ, not comparable)" in R.markdown_table(df)


def _rewrite(res: Path, mode: str, task: str, ckpt: str, fraction: float, seed: int, fn) -> None:
    path = res / "cells" / mode / task / ckpt.replace("/", "_") / f"f{fraction:g}_s{seed}.json"
    cell = json.loads(path.read_text())
    fn(cell)
    path.write_text(json.dumps(cell))


def _mae_and_twin(res: Path) -> None:
    """MAE (clearly better) and its random-init twin, seeds 0 and 1, on CinC 2017 at 100 %."""
    for seed in (0, 1):
        kw = dict(task="cinc2017", seed=seed, fraction=1.0)
        _cell(res, method="random-init", mode="linear", strength=0.0, kind="random", ckpt="random:enc", **kw)
        _cell(res, method="mae", mode="linear", strength=2.5, **kw)


def test_seed_mean_refuses_seeds_with_different_labels(tmp_path):
    """Two seeds whose cells carry different labels for the same record keys (another label table): the joint
    seed mean resampled every seed against the first seed's labels, and gave seed 1 that number too. Now: no seed
    mean, each seed its own paired bootstrap."""
    res = tmp_path / "results"
    _mae_and_twin(res)

    def roll(c):
        c["predictions"]["test"]["y"] = np.roll(np.asarray(c["predictions"]["test"]["y"]), 37, axis=0).tolist()

    for ckpt in ("random:enc", "mae"):
        _rewrite(res, "linear", "cinc2017", ckpt, 1.0, 1, roll)
    cells = R.load_cells(res)
    per_seed, mean = R.compare_with_baseline(cells, R.TWIN, n_boot=50)
    assert mean.empty
    own = {c["seed"]: R._paired_rows(c, b, 50, 0)[0] for c, b in R.matched_pairs(cells, R.TWIN)}
    for _, r in per_seed.iterrows():
        assert r["delta"] == pytest.approx(own[r["seed"]]["delta"])


def test_a_row_whose_seeds_saw_different_record_counts_is_marked(tmp_path):
    res = tmp_path / "results"
    for seed in (0, 1):
        _cell(res, task="cinc2017", method="mae", mode="linear", seed=seed, fraction=1.0, strength=2.0)
    _rewrite(res, "linear", "cinc2017", "mae", 1.0, 1, lambda c: c["results"]["test"].update(n=40))
    md = R.markdown_table(R.tidy_rows(R.load_cells(res)))
    assert "(seeds on n = 40-" in md


def test_comparison_markdown_says_on_how_many_records(tmp_path):
    """Pairs use the records both rows predicted: the markdown says how many (it only said "same test records")."""
    res = tmp_path / "results"
    _mae_and_twin(res)

    def half(c):
        p = c["predictions"]["test"]
        p.update({k: v[: N // 2] for k, v in p.items()})

    for seed in (0, 1):
        _rewrite(res, "linear", "cinc2017", "random:enc", 1.0, seed, half)
    per_seed, mean = R.compare_with_baseline(R.load_cells(res), R.TWIN, n_boot=50)
    md = R.comparison_markdown(per_seed, means=mean)
    assert f"(2 seeds, n = {N // 2})" in md


def test_one_seed_has_no_spread_and_no_bootstrap_no_ci(tmp_path):
    res = tmp_path / "results"
    _cell(res, task="cinc2017", method="mae", mode="linear", seed=0, fraction=1.0, strength=2.0)

    def no_ci(c):
        c["results"]["test"]["macro_auroc"].update(ci_low=float("nan"), ci_high=float("nan"))

    _rewrite(res, "linear", "cinc2017", "mae", 1.0, 0, no_ci)
    md = R.markdown_table(R.tidy_rows(R.load_cells(res)))
    row = next(line for line in md.splitlines() if line.startswith("| mae "))
    assert "+- n/a [no CI] s0 (1)" in row   # seed ids before the count (2026-12-07)


def test_report_command_refuses_a_folder_without_cells(tmp_path, capsys):
    """A mistyped results_dir got a new, empty table with four MISSED criteria and exit 0."""
    with pytest.raises(SystemExit) as info:
        R.main([str(tmp_path / "nope")])
    assert info.value.code == 2 and "no results folder" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_tables_say_how_many_training_records_each_fraction_is(tmp_path):
    res = tmp_path / "results"
    for f in (0.1, 1.0):
        _cell(res, task="cinc2017", method="mae", mode="linear", seed=0, fraction=f, strength=2.0)
    _rewrite(res, "linear", "cinc2017", "mae", 0.1, 0, lambda c: c.update(n_train=15))
    _rewrite(res, "linear", "cinc2017", "mae", 1.0, 0, lambda c: c.update(n_train=72))
    md = R.markdown_table(R.tidy_rows(R.load_cells(res)))
    assert "Training records per label fraction: 10 %: 15; 100 %: 72." in md


def test_no_bootstrap_report_has_no_cis_and_no_ci_verdicts(tmp_path):
    """bootstrap 0 ("no CIs") crashed the report (percentile of no resamples); and a CI that is not there must not
    read as "excludes 0"."""
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=4.0)
    out = R.build_report(res, plot=False, n_boot=0)
    means = pd.read_csv(Path(res) / "comparisons_mean.csv")
    assert len(means) and means["ci_low"].isna().all()
    acc = out["acceptance"]
    assert acc[0]["status"] == "NOT MEASURED" and acc[1]["status"] == "NOT MEASURED"
    y = np.array([0, 1, 0, 1, 1, 0])
    d = paired_bootstrap_delta(y, np.eye(2)[y], np.full((6, 2), 0.5), n_boot=0)
    assert d["delta"] == pytest.approx(0.5) and np.isnan(d["ci_low"]) and np.isnan(d["ci_high"])


def test_identical_seeds_and_seeds_without_a_value_are_said(tmp_path):
    """At 100 % of the labels a deterministic probe gives every seed the same result: one result, not three
    replicates with a spread of 0; a seed with no value (NaN) is not counted as one."""
    res = tmp_path / "results"
    for seed in (0, 1, 2):
        _cell(res, task="cinc2017", method="mae", mode="linear", seed=seed, fraction=1.0, strength=2.0, noise=7)
        _cell(res, task="cinc2017", method="mae", mode="linear", seed=seed, fraction=0.1, strength=2.0)

    def nan(c):
        c["results"]["test"]["macro_auroc"].update(value=float("nan"))

    _cell(res, task="cinc2017", method="simclr", mode="linear", seed=0, fraction=1.0, strength=2.0)
    _cell(res, task="cinc2017", method="simclr", mode="linear", seed=1, fraction=1.0, strength=2.5)
    _cell(res, task="cinc2017", method="simclr", mode="linear", seed=2, fraction=1.0, strength=2.0)
    _rewrite(res, "linear", "cinc2017", "simclr", 1.0, 2, nan)
    md = R.markdown_table(R.tidy_rows(R.load_cells(res)))
    mae = next(line for line in md.splitlines() if line.startswith("| mae "))
    simclr = next(line for line in md.splitlines() if line.startswith("| simclr "))
    assert "+- n/a" in mae.split("|")[5] and "(3, identical)" in mae.split("|")[5]
    assert "identical" not in mae.split("|")[4]                       # 10 %: seeds draw different subsets
    assert "(2 of 3 with a value)" in simclr and "nan" not in simclr.split("|")[5]


def test_a_class_left_out_of_a_macro_average_is_named(tmp_path):
    res = tmp_path / "results"
    _cell(res, task="cinc2017", method="mae", mode="linear", seed=0, fraction=1.0, strength=2.0)

    def left_out(c):
        c["results"]["test"]["excluded_classes"] = ["c"]

    _rewrite(res, "linear", "cinc2017", "mae", 1.0, 0, left_out)
    md = Path(R.build_report(res, plot=False, n_boot=20)["markdown"]).read_text()
    assert "## macro_auroc: classes left out of a cell's macro average" in md
    assert "| mae | linear probe | cinc2017 | test | 100 % | 0 | c |" in md
    res2 = tmp_path / "clean"
    _cell(res2, task="cinc2017", method="mae", mode="linear", seed=0, fraction=1.0, strength=2.0)
    assert "classes left out" not in Path(R.build_report(res2, plot=False, n_boot=20)["markdown"]).read_text()


def test_cells_written_without_cis_by_the_sweep_report(tmp_path):
    """A sweep with bootstrap.n=0 writes its cells through ecgfm.io (no CI -> JSON null); summarize formatted
    None and the sweep's own report crashed."""
    from ecgfm.io import dumps

    res = tmp_path / "results"
    for seed in (0, 1):
        _cell(res, task="cinc2017", method="mae", mode="linear", seed=seed, fraction=0.1, strength=2.0)

        def no_ci(c):
            c["results"]["test"]["macro_auroc"].update(ci_low=float("nan"), ci_high=float("nan"))

        path = res / "cells" / "linear" / "cinc2017" / "mae" / f"f0.1_s{seed}.json"
        cell = json.loads(path.read_text())
        no_ci(cell)
        path.write_text(dumps(cell))
    assert '"ci_low":null' in path.read_text()
    md = Path(R.build_report(res, plot=False, n_boot=0)["markdown"]).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mae "))
    assert "[no CI] s0,1 (2)" in row   # seed ids before the count (2026-12-07)


def test_cells_trained_on_different_records_are_not_paired(tmp_path, caplog):
    """Same (task, fraction, seed) is not enough: a twin whose training records differ (its cache orders the records
    otherwise, so the seed's subset is other records) is left out with a warning; cells without the digest (written
    before it existed) and cells with equal digests pair as before."""
    res = tmp_path / "results"
    kw = dict(task="cinc2017", fraction=0.1, mode="linear")
    cells = [_cell(res, method="random-init", strength=0.0, kind="random", ckpt="random:enc", seed=0, **kw),
             _cell(res, method="mae", strength=2.0, seed=0, **kw),
             _cell(res, method="random-init", strength=0.0, kind="random", ckpt="random:enc", seed=1, **kw),
             _cell(res, method="mae", strength=2.0, seed=1, **kw),
             _cell(res, method="random-init", strength=0.0, kind="random", ckpt="random:enc", seed=2, **kw),
             _cell(res, method="mae", strength=2.0, seed=2, **kw)]
    digests = {(0, "random-init"): "aaaa", (0, "mae"): "bbbb", (1, "random-init"): "cccc", (1, "mae"): "cccc"}
    for c in cells:                                   # seed 2: no digest on either side (older cells)
        if (c["seed"], c["method"]) in digests:
            c["train_records"] = digests[c["seed"], c["method"]]
    with caplog.at_level("WARNING", logger=R.__name__):
        pairs = R.matched_pairs(cells, R.TWIN)
    assert sorted(c["seed"] for c, _ in pairs) == [1, 2]
    assert "trained on different records" in caplog.text and "aaaa vs" not in caplog.text
    assert "bbbb vs aaaa" in caplog.text


def test_imported_models_are_not_ssl_rows_of_the_acceptance_block(tmp_path):
    """A zoo import (zoo:ecgfounder was trained with 150 labels) is checkpoint_kind "pretrained" too: it met criterion
    3 for a project whose own SSL encoders missed it."""
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=0.0)
    for frac in (0.1, 1.0):
        for seed in (0, 1):
            _cell(res, method="zoo:ecgfounder", mode="linear", strength=6.0, ckpt="zoo_ecgfounder", task="ptbxl_super",
                  seed=seed, fraction=frac)
    acc = R.build_report(res, plot=False, n_boot=100)["acceptance"]
    assert acc[2]["status"] == "MISSED" and "zoo:" not in acc[2]["evidence"]


def test_no_ci_is_written_as_no_ci_not_nan(tmp_path):
    """bootstrap.n=0 cells: the acceptance block and the comparison tables printed [nan, nan] as intervals."""
    assert R._ci_text(float("nan"), 0.2) == "[no CI]" and R._ci_text(None, None) == "[no CI]"
    assert R._ci_text(0.1, 0.2) == "[0.100, 0.200]" and R._ci_text(-0.1, 0.2, signed=True) == "[-0.100, +0.200]"
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=4.0)
    out = R.build_report(res, plot=False, n_boot=0)
    md = Path(out["markdown"]).read_text()
    assert "nan" not in md.lower().replace("nan-", "") and "[no CI]" in md


def test_a_delta_without_a_seed_mean_row_says_it_has_no_ci():
    """A comparison group without a seed-mean row (the seeds' cells disagree on a record's labels) printed a bare
    mean delta, as if it were an estimate with nothing to qualify it."""
    from ecgfm.evaluate.report import COMPARISON_COLUMNS, COMPARISON_MEAN_COLUMNS, comparison_markdown

    rows = [dict(reference="random-init twin", mode="linear", task="t", dataset="d", split="test", method="mae",
                 label="mae", baseline="random-init", baseline_mode="linear", fraction=1.0, seed=s, delta=d,
                 ci_low=d - .05, ci_high=d + .05, p_not_positive=0., n=50, excludes_zero="+")
            for s, d in ((0, .1), (1, .2))]
    md = comparison_markdown(pd.DataFrame(rows, columns=COMPARISON_COLUMNS),
                             means=pd.DataFrame(columns=COMPARISON_MEAN_COLUMNS))
    row = [line for line in md.splitlines() if "| mae |" in line or "| t |" in line][-1]
    assert "+0.150 [no CI] (mean of the seeds, not jointly resampled)" in row


def test_a_pair_labelled_two_ways_is_left_out_not_a_failed_report(tmp_path, caplog):
    """A baseline cell left from an older label table (same records, one test record labelled otherwise) made
    build_report raise a ValueError, so no table at all; now that pair is left out with a warning."""
    res = tmp_path / "results"
    _mae_and_twin(res)

    def relabel(c):
        y = np.asarray(c["predictions"]["test"]["y"])
        y[0] = np.roll(y[0], 1)
        c["predictions"]["test"]["y"] = y.tolist()

    _rewrite(res, "linear", "cinc2017", "random:enc", 1.0, 0, relabel)
    cells = R.load_cells(res)
    with caplog.at_level("WARNING"):
        per_seed, _ = R.compare_with_baseline(cells, R.TWIN, n_boot=20)
    assert any("different labels" in r.getMessage() for r in caplog.records)
    assert 0 not in set(per_seed["seed"]) if len(per_seed) else True


def test_cells_of_weights_overwritten_in_place_are_never_chosen(tmp_path):
    """An encoder folder overwritten with new weights: its old cells stayed eligible for the acceptance block (the
    table's mae@<old> row was chosen on validation although those weights exist nowhere any more)."""
    import torch

    from ecgfm.artifacts import save_encoder
    from ecgfm.backbones import create_backbone
    from ecgfm.evaluate.identity import checkpoint_identity

    enc = tmp_path / "enc"
    torch.manual_seed(0)
    save_encoder(enc, create_backbone("vit1d_test"), None, fs=100.0, window_samples=250)
    old = checkpoint_identity(str(enc))["id"]
    cells = [{"checkpoint": str(enc), "checkpoint_id": old, "mode": "linear"},
             {"checkpoint": "random:vit1d_test", "checkpoint_id": "x", "mode": "linear"}]
    assert R.superseded_cells(cells) == set()
    torch.manual_seed(1)
    save_encoder(enc, create_backbone("vit1d_test"), None, fs=100.0, window_samples=250)   # overwritten in place
    assert R.superseded_cells(cells) == {(str(enc), old)}
    # a relative checkpoint string is judged at the folder the cell recorded, not from the report's folder
    rel = [{"checkpoint": "enc", "checkpoint_id": old, "mode": "linear", "checkpoint_path": str(enc)},
           {"checkpoint": "enc", "checkpoint_id": old, "mode": "linear"}]
    assert R.superseded_cells(rel) == {("enc", old)}
    assert R.superseded_cells(rel[1:]) == set()


def test_results_of_other_tasks_get_no_acceptance_block(tmp_path):
    """A user's sweep on another task (here cells named 'mytask', CinC-shaped) has no issue-12 block of four NOT
    MEASURED criteria about tasks it never ran; the block comes back with a cell of one of its tasks."""
    res = tmp_path / "results"
    for seed in (0, 1):
        for method, kind in (("mae", "pretrained"), ("mae", "random")):
            cell = _cell(res, task="cinc2017", method=method, mode="linear", seed=seed, fraction=1.0, strength=2.0,
                         kind=kind, ckpt=f"{kind}/mae")
            path = res / "cells" / "linear" / "cinc2017" / f"{kind}_mae" / f"f1_s{seed}.json"
            cell["task"] = cell["dataset"] = "mytask"
            moved = res / "cells" / "linear" / "mytask" / f"{kind}_mae" / f"f1_s{seed}.json"
            moved.parent.mkdir(parents=True, exist_ok=True)
            moved.write_text(json.dumps(cell))
            path.unlink()
    out = R.build_report(res, plot=False, n_boot=50)
    assert out["acceptance"] == [] and "Acceptance (issue 12)" not in (res / "results.md").read_text()
    _cell(res, task="cinc2017", method="mae", mode="linear", seed=0, fraction=1.0, strength=2.0)
    out = R.build_report(res, plot=False, n_boot=50)
    assert len(out["acceptance"]) == 4 and "Acceptance (issue 12)" in (res / "results.md").read_text()


def test_criterion_4_counts_a_random_init_cnn_fine_tune_as_supervised_from_scratch(tmp_path):
    """A random-init CNN fine-tuned with the fine-tunes' recipe is trained from scratch on the same labels: when it
    beats the supervised: rows it is the baseline criterion 4 must clear (on PTB-XL at 10 % it did, once the twins'
    BatchNorm statistics were computed); a ViT twin's fine-tune is not a CNN and does not count."""
    res = tmp_path / "results"
    _acceptance_cells(res, ssl_ptb_probe=4.0)
    for task in ("cinc2017", "ptbxl_super"):
        for seed in (0, 1):
            _cell(res, method="random-init", mode="finetune", strength=6.0, kind="random", ckpt="random:vit",
                  recipe="rf", task=task, seed=seed, fraction=0.1)                         # a ViT twin: ignored
    acc = R.build_report(res, plot=False, n_boot=100)["acceptance"]
    assert acc[3]["status"] == "MET"
    for task in ("cinc2017", "ptbxl_super"):
        for seed in (0, 1):
            _cell(res, method="random-init", mode="finetune", strength=6.0, kind="random", backbone="resnet1d_tiny",
                  arch="cnn", ckpt="random:cnn", recipe="rf", task=task, seed=seed, fraction=0.1)
    acc = R.build_report(res, plot=False, n_boot=100)["acceptance"]
    assert acc[3]["status"] == "MISSED"
    assert "random-init CNN, fine-tune recipe" in acc[3]["evidence"]
