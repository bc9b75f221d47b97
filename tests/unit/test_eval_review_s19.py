"""Review findings of the nineteenth session on the report's acceptance block and the sweep's cells (each test
fails on the code before the fix)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from ecgfm.evaluate import report as R
from ecgfm.evaluate import sweep as S
from ecgfm.evaluate.identity import recipe_identity
from tests.unit.test_report_baselines import _cell

CONF = Path(__file__).resolve().parents[2] / "ecgfm" / "conf"


def test_criterion_4_pairs_the_ssl_fine_tune_with_the_cnn_it_names(tmp_path):
    """Criterion 4 compares the SSL fine-tune with the best CNN from scratch; its paired number is that comparison,
    not the SSL row against another baseline of the same table (its own ViT random-init twin). The twin table pairs
    within one architecture only, so since 2026-12-07 (criterion 4 decided on the paired delta) the report pairs the
    two rows itself, across architectures, instead of saying "no paired comparison"."""
    res = tmp_path / "results"
    for task in ("cinc2017", "ptbxl_super"):
        for seed in (0, 1):
            kw = dict(task=task, seed=seed, fraction=0.1, recipe="rf", mode="finetune")
            _cell(res, method="mae", strength=3.0, ckpt="mae", **kw)                                   # SSL ViT
            _cell(res, method="random-init", strength=0.0, kind="random", ckpt="random:mae", **kw)     # ViT twin
            _cell(res, method="random-init", strength=2.9, kind="random", backbone="resnet1d_tiny", arch="cnn",
                  ckpt="random:cnn", **kw)                                                            # CNN
    out = R.build_report(res, plot=False, n_boot=100)
    evidence = out["acceptance"][3]["evidence"]
    assert "random-init CNN, fine-tune recipe" in evidence
    # the only paired comparison of the SSL row in the twin table is with its ViT twin: not the CNN's
    assert "vs random-init (vit1d_tiny)" not in evidence
    assert evidence.count("vs random-init (resnet1d_tiny) (2 seeds, n = ") == 2
    assert "no paired comparison" not in evidence


def test_criterion_4_paired_number_is_against_the_supervised_cnn_compared(tmp_path):
    """With two supervised CNNs the paired number is the comparison with the one the criterion compares with (the
    best on test), whichever has the lower CI bound."""
    res = tmp_path / "results"
    for task in ("cinc2017", "ptbxl_super"):
        for seed in (0, 1):
            kw = dict(task=task, seed=seed, fraction=0.1, mode="finetune")
            _cell(res, method="mae", strength=3.0, ckpt="mae", recipe="rf", **kw)
            _cell(res, method="supervised", strength=2.8, kind="supervised", backbone="resnet1d_tiny", arch="cnn",
                  recipe="rs", ckpt="supervised:resnet1d_tiny", **kw)                                 # the best
            _cell(res, method="supervised", strength=0.2, kind="supervised", backbone="xresnet1d50", arch="cnn",
                  recipe="rs", ckpt="supervised:xresnet1d50", **kw)
    out = R.build_report(res, plot=False, n_boot=100)
    evidence = out["acceptance"][3]["evidence"]
    for part in evidence.split(" <br> "):
        compared = part.split("vs CNN from scratch (supervised recipe) ")[1].split(" ")[0:2]
        assert " ".join(compared) == "supervised (resnet1d_tiny)", part
        assert part.split("; paired ")[1].split(" vs ")[1].startswith("supervised (resnet1d_tiny)"), part


def test_chosen_on_validation_counts_a_seed_reached_twice_once():
    """A seed reached through two checkpoint paths counts once in the validation score that picks the best row, as
    in the test summary: seed 0 twice would turn A (seeds 0.80, 0.90: 0.85) into 0.833 and pick B (0.84)."""
    def c(label, seed, val, path):
        return {"task": "cinc2017", "fraction": 1.0, "label": label, "mode": "linear", "seed": seed,
                "val_macro_auroc": val, "checkpoint": path}

    cells = [c("A", 0, 0.80, "runs/a"), c("A", 1, 0.90, "runs/a"), c("A", 0, 0.80, "/abs/runs/a"),
             c("B", 0, 0.84, "runs/b"), c("B", 1, 0.84, "runs/b")]
    v = R._val_means(cells, "cinc2017", 1.0, {"A", "B"})
    assert v[("A", "linear")] == pytest.approx(0.85) and v[("B", "linear")] == pytest.approx(0.84)
    assert len(R._row_cells(cells, "A", "cinc2017", "linear", 1.0)) == 2


def test_lp_ft_cell_from_before_the_batchnorm_fix_is_outdated():
    """An LP-FT cell whose recipe lacks the 2026-12-06 ``lp_init`` key (probe fitted before BatchNorm statistics
    were computed) is outdated like a random-head cell lacking ``fit_mode``."""
    ident = S.checkpoint_identity("random:resnet1d_test", 0, {})
    now = {"mode": "finetune", "head": {"head_init": "lp", "layer_decay": 0.75},
           **S._finetune_code_recipe("finetune", "lp", 0.75)}
    before = {k: v for k, v in now.items() if k != "lp_init"}
    stored = {"checkpoint": "random:resnet1d_test", "checkpoint_id": ident["id"], "checkpoint_identity": ident,
              "recipe": before, "recipe_id": recipe_identity(before)}
    reason = S._outdated(stored, SimpleNamespace(recipe=now))
    assert reason is not None and "lp_init" in reason
    current = dict(stored, recipe=now, recipe_id=recipe_identity(now))
    assert S._outdated(current, SimpleNamespace(recipe=now)) is None


def _probe_cfg(cache: Path, res: Path, *overrides: str):
    base = [f"paths.cache_root={cache}", f"results_dir={res}", "prepare_workers=0", "task=synthetic",
            "task.params.n_records=60", "bootstrap.n=0", "plot=false", "report=never", "torch_threads=1",
            "fraction=1.0", "seed=0", "probe.Cs=[1.0]", "checkpoint=random:resnet1d_test"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("probe", overrides=base + list(overrides))


def test_random_twin_features_do_not_depend_on_the_feature_batch_size(tmp_path):
    """``features.batch_size`` is a speed setting (left out of the cell's recipe): the random-init twin's BatchNorm
    statistics, hence its features and numbers, are the same at 4 and 256 windows a batch (they averaged per-batch
    statistics of batches of that size, so a rerun at another batch size added seeds from other features to the
    row)."""
    cells = {}
    for bs in (256, 4):
        res = tmp_path / f"res{bs}"
        out = S.probe_main(_probe_cfg(tmp_path / f"cache{bs}", res, f"features.batch_size={bs}"))
        cells[bs] = json.loads(Path(out["cells_written"][0]).read_text())
    assert cells[4]["recipe_id"] == cells[256]["recipe_id"]
    assert cells[4]["encoder_fingerprint"] == cells[256]["encoder_fingerprint"]
    assert cells[4]["results"]["test"]["macro_auroc"]["value"] == pytest.approx(
        cells[256]["results"]["test"]["macro_auroc"]["value"], abs=1e-6)


def test_finetune_features_batch_size_is_checked_and_used(monkeypatch, tmp_path):
    """finetune.py's ``features.batch_size`` is the LP-FT probe's feature batch size (it was accepted and never
    read); below 1 it is refused like probe.py's."""
    from ecgfm.backbones import create_backbone
    from ecgfm.evaluate import finetune as F
    from ecgfm.recipes import ConfigError, validate_finetune_config
    from tests.unit.synthetic_tasks import synthetic_task

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("finetune", overrides=["features.batch_size=0"])
    with pytest.raises(ConfigError, match="features.batch_size"):
        validate_finetune_config(cfg)

    class Stop(Exception):
        pass

    seen = {}

    def spy(*args, **kwargs):
        seen["batch_size"] = kwargs["batch_size"]
        raise Stop

    monkeypatch.setattr(F, "fit_probe_head", spy)
    cache_dir, _, labels, splits = synthetic_task(tmp_path / "syn", 30, seed=0, duration=4.0)
    with pytest.raises(Stop):
        F.run_finetune(create_backbone("vit1d_test"), cache_dir, labels, splits, False, 250, 250,
                       dict(epochs=1, batch_size=512, head_init="lp"), feature_batch_size=8)
    assert seen["batch_size"] == 8


def test_a_fine_tune_that_is_all_warm_up_is_warned_about():
    """warmup_epochs >= epochs: the head lr climbed to 48 % of its peak and never decayed, silently."""
    from ecgfm.recipes import FinetuneRecipe, check_finetune_recipe

    with pytest.warns(UserWarning, match=r"warmup_epochs=3 >= finetune.epochs=3: the whole run is warm-up"):
        check_finetune_recipe(FinetuneRecipe(epochs=3, warmup_epochs=3), "finetune")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_finetune_recipe(FinetuneRecipe(epochs=3, warmup_epochs=2), "finetune")
