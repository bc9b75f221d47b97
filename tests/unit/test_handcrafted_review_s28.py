"""Review s28 of the handcrafted baseline: a record whose feature group is missing (too few beats) is scored at the
training subset's medians, not at its 0 placeholders (L1), and ``checkpoint=handcrafted`` refuses aggregations it
would silently ignore (L2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ecgfm.evaluate import handcrafted as H
from ecgfm.evaluate import probe as P
from ecgfm.evaluate.features import FeatureSet

ROOT = Path(__file__).resolve().parents[2]
NAMES = list(H.FEATURE_NAMES)
RR_COLS = [NAMES.index(k) for k in H.RR_FEATURES]
MISSING_RR = NAMES.index("missing_rr")


def _features(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, F)`` handcrafted-like features (every group present, values far from 0 as real RR features are)
    and ``(n, 2)`` one-hot labels that the RR columns separate."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0.0, 1.0, (n, len(NAMES)))
    x[:, RR_COLS] = 0.8 + 0.1 * rng.normal(size=(n, len(RR_COLS))) + 0.05 * y[:, None]
    x[:, [NAMES.index(k) for k in H.INDICATORS]] = 0.0
    return x.astype(np.float32), np.eye(2, dtype=np.float32)[y]


def _flag_rr(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The cached features of records with too few beats for the RR group: 0 + indicator 1 (fill_missing)."""
    x = x.copy()
    x[np.ix_(rows, RR_COLS)] = 0.0
    x[rows, MISSING_RR] = 1.0
    return x


def _data(x: np.ndarray, y: np.ndarray, splits: dict[str, np.ndarray], groups=(), external=None) -> P.ProbeData:
    fs = FeatureSet(features=x, record=np.arange(len(x), dtype=np.int64), n_records=len(x), key="hc-test")
    return P.ProbeData(features=fs, labels=y, splits=splits, multilabel=False, class_names=["a", "b"],
                       external=external or {}, missing_groups=groups)


SPLITS = {"train": np.arange(0, 200), "val": np.arange(200, 260), "test": np.arange(260, 320)}


def test_a_test_record_missing_a_group_is_scored_at_the_training_medians_not_its_placeholders():
    x, y = _features(320)
    flagged = np.arange(260, 275)                 # test records without beats; no training record has the flag
    xf = _flag_rr(x, flagged)
    (r,) = P.run_probe_grid(_data(xf, y, SPLITS, H.missing_groups(0)), [1.0], [0], Cs=[1.0], n_boot=10)
    rows, p = r["predictions"]["test"]
    train = r["train_rows"]
    imputed = xf[flagged].copy()
    imputed[:, RR_COLS] = np.median(x[train][:, RR_COLS].astype(np.float64), axis=0).astype(np.float32)
    want = r["model"].predict_proba(imputed)
    got = p[np.isin(rows, flagged)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.max() < 0.99                       # a typical record's prediction, not a confident made-up one
    # what the 0 placeholders themselves give: far outside the training data (the old behaviour)
    assert r["model"].predict_proba(xf[flagged]).max() > 0.999
    # the other test records are untouched
    np.testing.assert_allclose(p[~np.isin(rows, flagged)], r["model"].predict_proba(x[rows[~np.isin(rows, flagged)]]),
                               rtol=0, atol=1e-12)


def test_the_medians_come_from_the_fractions_training_rows_only():
    x, y = _features(320, seed=1)
    x[200:, RR_COLS] += 50.0                      # validation / test values far from the training ones
    x = _flag_rr(x, np.array([3, 7, 265, 300]))   # two training records and two test records without beats
    (r,) = P.run_probe_grid(_data(x, y, SPLITS, H.missing_groups(0)), [0.5], [0], Cs=[1.0], n_boot=10)
    train = np.asarray(r["train_rows"])
    assert 0 < len(train) < len(SPLITS["train"])
    present = train[x[train, MISSING_RR] < 0.5]
    want = np.median(x[np.ix_(present, RR_COLS)].astype(np.float64), axis=0)
    np.testing.assert_allclose(r["imputer"].medians_[0], want, rtol=0, atol=0)
    assert np.all(np.abs(r["imputer"].medians_[0] - 0.8) < 0.2)     # not pulled by the val / test values (~50.8)


def test_the_external_set_and_the_mlp_probe_are_imputed_too():
    x, y = _features(320, seed=2)
    ex, ey = _features(40, seed=3)
    ex = _flag_rr(ex, np.arange(10))
    efs = FeatureSet(features=ex, record=np.arange(40, dtype=np.int64), n_records=40, key="hc-ext")
    data = _data(x, y, SPLITS, H.missing_groups(0), external={"external:x": (efs, ey, np.arange(40))})
    for mode in ("linear", "mlp"):
        (r,) = P.run_probe_grid(data, [1.0], [0], mode=mode, Cs=[1.0], lrs=[1e-2], n_boot=10,
                                mlp_kwargs={"epochs": 20, "eval_every": 5, "hidden_dim": 16})
        rows, p = r["predictions"]["external:x"]
        imputed = ex.copy()
        imputed[:10][:, RR_COLS] = r["imputer"].medians_[0].astype(np.float32)
        np.testing.assert_allclose(p, r["model"].predict_proba(imputed[rows]), rtol=0, atol=1e-6)


def test_without_a_flagged_record_the_numbers_are_those_without_imputation():
    x, y = _features(320, seed=4)
    ex, ey = _features(40, seed=5)
    efs = FeatureSet(features=ex, record=np.arange(40, dtype=np.int64), n_records=40, key="hc-ext")
    ext = {"external:x": (efs, ey, np.arange(40))}
    a = P.run_probe_grid(_data(x, y, SPLITS, (), ext), [0.5, 1.0], [0], Cs=[0.1, 1.0], n_boot=20)
    b = P.run_probe_grid(_data(x, y, SPLITS, H.missing_groups(0), ext), [0.5, 1.0], [0], Cs=[0.1, 1.0], n_boot=20)
    for ra, rb in zip(a, b):
        assert ra["grid"] == rb["grid"] and ra["test"] == rb["test"] and ra["external"] == rb["external"]
        for k in ra["predictions"]:
            np.testing.assert_array_equal(ra["predictions"][k][1], rb["predictions"][k][1])


def test_the_imputer_refuses_columns_the_features_lack_and_the_attention_probe():
    assert H.missing_groups(10)[0] == (tuple(10 + c for c in RR_COLS), 10 + MISSING_RR)
    with pytest.raises(ValueError, match="offset=-1"):
        H.missing_groups(-1)
    x, y = _features(320)
    with pytest.raises(ValueError, match=f"the task's features: missing_groups name columns .* {len(NAMES)} columns"):
        P.run_probe_grid(_data(x, y, SPLITS, H.missing_groups(5)), [1.0], [0], Cs=[1.0], n_boot=10)
    with pytest.raises(RuntimeError, match="before fit"):
        P.GroupMedianImputer(H.missing_groups(0)).transform(x)


# ------------------------------------------------------------------------------------------------ probe.py cells
def _cfg(tmp: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=120", "bootstrap.n=20", "plot=false", "torch_threads=1",
            "report=never", "fraction=1.0", "seed=0", "probe.Cs=[1.0]"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("probe", overrides=base + list(overrides))


def test_probe_py_hands_the_handcrafted_columns_to_the_imputation(tmp_path, monkeypatch):
    from ecgfm.evaluate.sweep import probe_main

    seen = []
    real = P.run_probe_grid

    def spy(data, *args, **kwargs):
        if not seen or seen[-1] is not data:   # run_probe_grid calls itself once inside its thread limit
            seen.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(P, "run_probe_grid", spy)
    probe_main(_cfg(tmp_path, "checkpoint=handcrafted"))
    probe_main(_cfg(tmp_path, "checkpoint=random:resnet1d_test", "probe.side_features=handcrafted"))
    hc, side = seen
    assert tuple(hc.missing_groups) == H.missing_groups(0) and hc.features.dim == len(NAMES)
    offset = side.features.dim - len(NAMES)
    assert offset > 0 and tuple(side.missing_groups) == H.missing_groups(offset)
    # the indicator columns named are the handcrafted ones of the same records
    np.testing.assert_array_equal(side.features.features[:, offset + MISSING_RR],
                                  hc.features.features[side.features.record, MISSING_RR])


@pytest.mark.parametrize("aggregate", ["mean_std", "mean_prediction"])
def test_the_handcrafted_baseline_refuses_an_aggregation_it_would_ignore(tmp_path, aggregate):
    from ecgfm.evaluate.sweep import EvaluationError, probe_main

    with pytest.raises(EvaluationError, match=f"probe.aggregate={aggregate} .*one feature row per record .*"
                                              f"use probe.aggregate=mean_embedding"):
        probe_main(_cfg(tmp_path, "checkpoint=handcrafted", f"probe.aggregate={aggregate}"))
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))


def _cell_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "results").rglob("*.json") if "recipe" in json.loads(p.read_text()))


def test_a_handcrafted_cell_of_the_zero_fill_rule_is_not_reused(tmp_path):
    """The missing-group rule is part of the recipe identity of every cell reading handcrafted features: a cell
    written before the imputation (its recipe without the rule, hence another recipe_id) is never reused or averaged
    as a seed of the new cells."""
    from ecgfm.evaluate.identity import recipe_identity
    from ecgfm.evaluate.sweep import HANDCRAFTED_MISSING_RULE, probe_main

    for overrides, pop in ((["checkpoint=handcrafted"], lambda r: r.pop("handcrafted_missing")),
                           (["checkpoint=random:resnet1d_test", "probe.side_features=handcrafted"],
                            lambda r: r["head"]["side_feature_versions"].pop("missing"))):
        root = tmp_path / overrides[0].split("=")[1].split(":")[0]
        probe_main(_cfg(root, *overrides))
        (cell,) = _cell_files(root)
        data = json.loads(cell.read_text())
        recipe = data["recipe"]
        assert recipe_identity(recipe) == data["recipe_id"]
        assert pop(recipe) == HANDCRAFTED_MISSING_RULE            # the rule is in the cell's recipe ...
        assert recipe_identity(recipe) != data["recipe_id"]       # ... and a recipe without it is another identity
