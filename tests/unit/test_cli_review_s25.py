"""Review s25 of what the commands print: a macro AUROC over fewer classes says so on the console (and an external
set's classes without a SNOMED code are listed in results.md), a rerun of a moved finished run prints where the
run is now, and the online probe logs how many classes its AUROC is over."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _result(n_classes=5, excluded=(), not_evaluable=(), n_degenerate=0, n_boot=200):
    names = [f"c{i}" for i in range(n_classes)]
    kept = [c for c in names if c not in not_evaluable]
    return {"macro_auroc": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}, "n": 24,
            "per_class_auroc": {c: {"value": float("nan") if c in excluded else 0.7} for c in kept},
            "excluded_classes": list(excluded), **({"not_evaluable_classes": list(not_evaluable)}
                                                   if not_evaluable else {}),
            "n_degenerate": n_degenerate, "n_boot": n_boot}


def _cell(**results):
    return {"mode": "linear", "task": "ptbxl_super", "dataset": "ptbxl", "method": "mae", "fraction": 1.0,
            "n_train": 100, "seed": 0, "results": results}


def test_the_cell_line_names_the_classes_a_macro_auroc_leaves_out(caplog):
    from ecgfm.evaluate.sweep import _log_cell

    with caplog.at_level(logging.INFO, logger="ecgfm.evaluate.sweep"):
        _log_cell(_cell(test=_result(excluded=("c1",), n_degenerate=87),
                        **{"external:cinc2021": _result(not_evaluable=("c2",))}, val=_result()))
    lines = {r.getMessage().split(" (n=")[0].rsplit(" | ", 1)[1]: r for r in caplog.records}
    test, ext, val = lines["test"], lines["external:cinc2021"], lines["val"]
    assert test.levelno == logging.WARNING and "over 4 of 5 classes (left out: c1)" in test.getMessage()
    assert "87 of 200 resamples over fewer classes" in test.getMessage()
    assert ext.levelno == logging.WARNING and "over 4 of 5 classes (left out: c2)" in ext.getMessage()
    assert val.levelno == logging.INFO and "left out" not in val.getMessage()


def test_results_md_lists_an_external_class_without_a_code():
    from ecgfm.evaluate.report import excluded_classes_markdown

    cell = _cell(**{"external:cinc2021": _result(not_evaluable=("MI",))})
    md = excluded_classes_markdown([cell])
    assert "MI (not evaluable: no code of the set maps to it)" in md, md


def test_a_moved_finished_run_prints_its_new_paths(tmp_path, caplog):
    from hydra import compose, initialize_config_dir

    from ecgfm.train.report import final_block
    from ecgfm.train.run import train

    common = ["+experiment=mae", "backbone=vit1d_test", "data.params.n_records=24", "data.params.duration=6.0",
              "data.val_fraction=0.2", "data.batch_size=8", "data.num_workers=0", "method.decoder_dim=16",
              "method.decoder_heads=2", "method.decoder_depth=1", "method.warmup_steps=1", "trainer.max_steps=2",
              "checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "torch_threads=1", "logger=csv",
              f"paths.cache_root={tmp_path / 'cache'}"]

    def cfg(run):
        with initialize_config_dir(config_dir=str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=[*common, f"out_dir={run}"])

    train(cfg(tmp_path / "a"))
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    with caplog.at_level(logging.WARNING):
        again = train(cfg(tmp_path / "b"))
    assert again["nothing_trained"]
    block = final_block(again)
    assert str(tmp_path / "a") not in block and str(tmp_path / "b" / "encoder") in block, block
    assert Path(again["encoder_dir"]).is_dir()
    assert any("was " in r.getMessage() and "is " in r.getMessage() for r in caplog.records)


def test_the_online_probe_logs_its_class_count(caplog):
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.methods.mae import MAEModule

    torch.manual_seed(0)
    m = MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                  probe_num_classes=3, probe_multilabel=True)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    rng = np.random.default_rng(0)
    y = np.zeros((40, 3), dtype=np.float32)
    y[:, 0] = rng.random(40) < 0.5
    y[:, 1] = rng.random(40) < 0.5                     # class 2 has no positive: the AUROC is over 2 classes
    m._probe_emb, m._probe_y = [torch.randn(40, 8)], [torch.from_numpy(y)]
    m._probe_idx = [torch.arange(40)]
    with caplog.at_level(logging.WARNING, logger="ecgfm.methods.base"):
        m.on_validation_epoch_end()
    assert logged["val/probe_n_classes"] == 2.0 and "val/probe_auroc" in logged
    assert any("2 of the 3 probe classes" in r.getMessage() for r in caplog.records)
