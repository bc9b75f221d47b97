"""Where sweep cells are filed (:func:`ecgfm.evaluate.sweep._cell_target` / ``_cell_files``) and when a filed cell is
reused: cells that share a file name but not a (checkpoint identity, recipe) are all kept, stale ones are replaced,
a rerun finds every one; the handcrafted side features' version is part of a cell's recipe; a cell is reused only
for its own label fraction."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from ecgfm.evaluate import sweep as S
from ecgfm.evaluate.identity import recipe_identity, short_hash
from ecgfm.evaluate.report import load_cells

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, results: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={results}", "prepare_workers=0", "task=synthetic",
            "task.params.n_records=120", "bootstrap.n=20", "plot=false", "torch_threads=1", "report=never",
            "fraction=1.0", "probe.Cs=[1.0]"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("probe", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One task cache and feature folder for the module (each test has its own results folder)."""
    return tmp_path_factory.mktemp("cell_files")


@pytest.fixture
def multirun(monkeypatch):
    """Run ``probe_main`` as a job of a Hydra multirun whose id the test sets (``multirun("sweep-1")``)."""
    monkeypatch.setattr(S, "_in_multirun", lambda: True)
    return lambda sweep: monkeypatch.setenv(S.SWEEP_ENV, sweep)


def _cells(results: Path) -> dict[str, dict]:
    """``{file name: cell}`` of every cell file under ``results``."""
    return {p.name: json.loads(p.read_text()) for p in (results / "cells").rglob("*.json")}


def _numbers(cells: dict[str, dict]) -> dict[str, dict]:
    """The cells without ``sweep`` (a reused cell takes the running sweep's id)."""
    return {name: {k: v for k, v in c.items() if k != "sweep"} for name, c in cells.items()}


def test_cell_path_tags():
    plain = S.cell_path("r", "linear", "t", "random:x", 1.0, 0)
    legacy = S.cell_path("r", "linear", "t", "random:x", 1.0, 0, recipe_id="abcdef0123456789")
    assert plain.name == "f1_s0.json" and legacy.name == "f1_s0.rabcdef012345.json"   # as older versions named them
    a = S.cell_path("r", "linear", "t", "random:x", 1.0, 0, recipe_id="abcdef0123456789", checkpoint_id="1" * 16)
    b = S.cell_path("r", "linear", "t", "random:x", 1.0, 0, recipe_id="abcdef0123456789", checkpoint_id="2" * 16)
    assert len({plain, legacy, a, b}) == 4 and a.parent == plain.parent
    assert a.name == f"f1_s0.r{short_hash({'checkpoint_id': '1' * 16, 'recipe_id': 'abcdef0123456789'}, 12)}.json"
    with pytest.raises(ValueError, match="recipe_id"):
        S.cell_path("r", "linear", "t", "random:x", 1.0, 0, checkpoint_id="1" * 16)


def test_multirun_over_init_seed_keeps_one_cell_per_seed(work, tmp_path, multirun):
    """``probe.py -m checkpoint=random:<enc> init_seed=0,1``: two checkpoints under one cell path. The second job
    once replaced the first one's cell (one row instead of two) and every rerun recomputed both."""
    res = tmp_path / "r"
    multirun("sweep-1")
    jobs = [_cfg(work, res, "checkpoint=random:resnet1d_test", "seed=0", f"init_seed={i}") for i in (0, 1)]
    written = [S.probe_main(cfg)["cells_written"] for cfg in jobs]
    assert [len(w) for w in written] == [1, 1]
    assert Path(written[0][0]).name == "f1_s0.json" and Path(written[1][0]).name.startswith("f1_s0.r")
    cells = _cells(res)
    assert len(cells) == 2 and len({c["checkpoint_id"] for c in cells.values()}) == 2
    assert sorted(c["checkpoint_identity"]["basis"]["init_seed"] for c in cells.values()) == [0, 1]
    assert len({c["label"] for c in load_cells(res)}) == 2              # one row per init seed
    multirun("sweep-2")                                                  # the identical multirun again
    for cfg in jobs:
        again = S.probe_main(cfg)
        assert again["cells_written"] == [] and again["cells_skipped"] == 1
    assert _numbers(_cells(res)) == _numbers(cells)   # reused: only the sweep id a reused cell takes changes


def test_another_init_seed_outside_a_multirun_is_kept_too(work, tmp_path, monkeypatch):
    """A single run with another ``init_seed`` is another checkpoint, not a changed recipe: both cells stay."""
    res = tmp_path / "r"
    monkeypatch.setattr(S, "_in_multirun", lambda: False)
    for i in (0, 1):
        assert len(S.probe_main(_cfg(work, res, "checkpoint=random:resnet1d_test", "seed=0",
                                     f"init_seed={i}"))["cells_written"]) == 1
    assert len(_cells(res)) == 2
    for i in (0, 1):
        assert S.probe_main(_cfg(work, res, "checkpoint=random:resnet1d_test", "seed=0",
                                 f"init_seed={i}"))["cells_skipped"] == 1


def test_resumed_recipe_multirun_keeps_the_finished_cell(work, tmp_path, multirun):
    """An interrupted ``-m probe.max_iter=100,200 seed=0,1`` (only max_iter=100 / seed 0 finished), resumed under a
    new sweep id: the max_iter=200 job replaced the finished max_iter=100 cell (written under the old id), so that
    row lost seed 0 and the next resume recomputed it. A reused cell now takes the running sweep's id."""
    res = tmp_path / "r"
    ck = "checkpoint=random:resnet1d_test"
    multirun("sweep-1")
    assert len(S.probe_main(_cfg(work, res, ck, "probe.max_iter=100", "seed=0"))["cells_written"]) == 1
    multirun("sweep-2")
    jobs = [_cfg(work, res, ck, f"probe.max_iter={m}", f"seed={s}") for m in (100, 200) for s in (0, 1)]
    assert [len(S.probe_main(cfg)["cells_written"]) for cfg in jobs] == [0, 1, 1, 1]
    cells = _cells(res)
    assert sorted((c["recipe"]["head"]["max_iter"], c["seed"]) for c in cells.values()) == \
        [(100, 0), (100, 1), (200, 0), (200, 1)]
    multirun("sweep-3")
    for cfg in jobs:
        assert S.probe_main(cfg)["cells_written"] == []


def test_a_changed_recipe_takes_over_and_a_recipe_multirun_settles(work, tmp_path, multirun):
    """A rerun whose recipe changed replaces the old recipe's cell of the same checkpoint (the old row must not
    stay beside the new one for the acceptance block to choose among), while the jobs of one recipe multirun keep
    each other's cells; resuming an older multirun recomputes what it filed otherwise once, then every rerun
    reuses every cell."""
    res = tmp_path / "r"
    ck = "checkpoint=random:resnet1d_test"
    multirun("sweep-1")
    assert len(S.probe_main(_cfg(work, res, ck, "probe.max_iter=100", "seed=0"))["cells_written"]) == 1
    multirun("sweep-1b")   # a later run with another recipe: takes the file over
    S.probe_main(_cfg(work, res, ck, "probe.max_iter=300", "seed=0"))
    assert [c["recipe"]["head"]["max_iter"] for c in _cells(res).values()] == [300]
    jobs = [_cfg(work, res, ck, f"probe.max_iter={m}", f"seed={s}") for m in (100, 200) for s in (0, 1)]
    for sweep in ("sweep-2", "sweep-3"):
        multirun(sweep)
        for cfg in jobs:
            S.probe_main(cfg)
    cells = _cells(res)
    assert sorted((c["recipe"]["head"]["max_iter"], c["seed"]) for c in cells.values()) == \
        [(100, 0), (100, 1), (200, 0), (200, 1)]
    multirun("sweep-4")
    for cfg in jobs:
        assert S.probe_main(cfg)["cells_written"] == []
    assert _numbers(_cells(res)) == _numbers(cells)   # reused: only the sweep id a reused cell takes changes


def test_stale_plain_cell_is_still_replaced(work, tmp_path, multirun):
    """An encoder retrained into the same folder: its old cell is stale for the same recipe and is replaced (in a
    multirun too), not kept beside the new one."""
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    res = tmp_path / "r"
    enc = tmp_path / "enc" / "encoder"

    def export(seed: int) -> None:
        torch.manual_seed(seed)
        export_encoder(create_backbone("resnet1d_test"), enc, PreprocessSpec(), extra={"method": "ToyModule"})

    export(0)
    multirun("sweep-1")
    cfg = _cfg(work, res, f"checkpoint={enc}", "seed=0")
    first = S.probe_main(cfg)["cells_written"]
    export(1)
    multirun("sweep-2")
    second = S.probe_main(cfg)["cells_written"]
    assert first == second and Path(first[0]).name == "f1_s0.json" and len(_cells(res)) == 1


def test_a_reused_cell_records_where_its_checkpoint_is(work, tmp_path, multirun):
    """Cells written before checkpoint_path existed (all of an older benchmark) could not be judged by the
    report's superseded check; a rerun that reuses one records where its checkpoint string points."""
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    res, enc = tmp_path / "r", tmp_path / "enc" / "encoder"
    torch.manual_seed(0)
    export_encoder(create_backbone("resnet1d_test"), enc, PreprocessSpec(), extra={"method": "ToyModule"})
    multirun("sweep-1")
    cfg = _cfg(work, res, f"checkpoint={enc}", "seed=0")
    (p,) = S.probe_main(cfg)["cells_written"]
    cell = json.loads(Path(p).read_text())
    assert cell["checkpoint_path"] == str(enc)
    del cell["checkpoint_path"]
    Path(p).write_text(json.dumps(cell))
    assert S.probe_main(cfg)["cells_written"] == []
    assert json.loads(Path(p).read_text())["checkpoint_path"] == str(enc)


def test_legacy_recipe_tagged_file_is_still_found(work, tmp_path, multirun):
    """A cell in the recipe-only tagged file of older versions (``f1_s0.r<recipe id[:12]>.json``) is reused."""
    res = tmp_path / "r"
    multirun("sweep-1")
    ck = "checkpoint=random:resnet1d_test"
    (p,) = S.probe_main(_cfg(work, res, ck, "seed=0", "probe.max_iter=200"))["cells_written"]
    cell = json.loads(Path(p).read_text())
    legacy = Path(p).with_name(f"f1_s0.r{cell['recipe_id'][:12]}.json")
    Path(p).rename(legacy)
    S.probe_main(_cfg(work, res, ck, "seed=0", "probe.max_iter=100"))    # another recipe takes the plain file
    assert S.probe_main(_cfg(work, res, ck, "seed=0", "probe.max_iter=200"))["cells_written"] == []
    assert sorted(_cells(res)) == sorted(["f1_s0.json", legacy.name])


def test_fractions_sharing_a_file_name_are_not_reused_for_each_other(work, tmp_path, caplog):
    """``f<fraction:g>`` keeps 6 significant digits: a cell of another fraction in that file is not this cell."""
    a, b = 0.5000001, 0.5000002
    assert S.cell_path("r", "linear", "t", "c", a, 0) == S.cell_path("r", "linear", "t", "c", b, 0)
    res = tmp_path / "r"
    ck = "checkpoint=random:resnet1d_test"
    assert len(S.probe_main(_cfg(work, res, ck, "seed=0", f"fraction={a}"))["cells_written"]) == 1
    caplog.set_level("WARNING", logger="ecgfm.evaluate.sweep")
    out = S.probe_main(_cfg(work, res, ck, "seed=0", f"fraction={b}"))
    assert len(out["cells_written"]) == 1
    assert json.loads(Path(out["cells_written"][0]).read_text())["fraction"] == b
    assert any("label fraction" in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert S.probe_main(_cfg(work, res, ck, "seed=0", f"fraction={b}"))["cells_skipped"] == 1


def test_other_cell_reasons():
    assert S._other_cell({"fraction": 0.1, "seed": 2}, 0.1, 2) is None
    assert "label fraction" in S._other_cell({"fraction": 0.1000001, "seed": 2}, 0.1, 2)
    assert S._other_cell({"fraction": 0.1, "seed": 1}, 0.1, 2) is not None
    assert S._other_cell({}, 0.1, 2) is not None                        # no fraction stored: not known to be it


# ------------------------------------------------------------------------- the side features' version in the recipe
_LINEAR = {"mode": "linear", "aggregate": "mean_embedding", "Cs": [0.1, 1.0], "max_iter": 1000, "lrs": [0.001],
           "mlp": {"hidden_dim": 64}, "attention": {"heads": 4}, "side_features": None, "layers": "last"}


def test_recipe_without_side_features_is_unchanged(monkeypatch):
    """The versions enter only recipes with side features: every other cell keeps its recipe id byte for byte
    (these hashes were computed before the versions were added)."""
    assert short_hash(S._probe_recipe(_LINEAR)) == "b11fcf6a9588e40b"
    # an MLP cell's id changed once on purpose (2026-12-07: its AdamW no longer decays biases / norms; it was
    # aa01ab8259f1277e), not through the side features
    assert short_hash(S._probe_recipe(dict(_LINEAR, mode="mlp"))) == "9f574b00c171c3ee"
    import ecgfm.evaluate.handcrafted as H

    monkeypatch.setattr(H, "FEATURE_VERSION", "hc-999")
    assert short_hash(S._probe_recipe(_LINEAR)) == "b11fcf6a9588e40b"


@pytest.mark.parametrize("bump", ["FEATURE_VERSION", "neurokit_version"])
def test_side_feature_version_is_part_of_the_recipe(monkeypatch, bump):
    """``probe.side_features=handcrafted`` cells were reused (and averaged with new seeds) after a feature-version
    bump or a neurokit2 upgrade: the recipe held only the string "handcrafted"."""
    import ecgfm.evaluate.handcrafted as H

    side = dict(_LINEAR, side_features="handcrafted")
    before = S._probe_recipe(side)
    assert before == S._probe_recipe(side)                              # one installation: one recipe

    def upgrade() -> None:
        if bump == "FEATURE_VERSION":
            monkeypatch.setattr(H, "FEATURE_VERSION", H.FEATURE_VERSION + "-bumped")
        else:
            monkeypatch.setattr(H, "neurokit_version", lambda: "99.0")

    upgrade()
    after = S._probe_recipe(side)
    assert recipe_identity({"head": after}) != recipe_identity({"head": before})
    monkeypatch.undo()
    assert before[S.SIDE_FEATURE_VERSIONS] == {"feature_version": H.FEATURE_VERSION,
                                               "neurokit2": H.neurokit_version(),
                                               "missing": S.HANDCRAFTED_MISSING_RULE}
    # after the upgrade, a kept cell of the old version is outdated (replaced, not kept as a row beside the new one)
    upgrade()
    stored = {"checkpoint": "random:resnet1d_test", "checkpoint_identity": {"basis": {"init_seed": 0}},
              "recipe": {"mode": "linear+handcrafted", "head": before}}
    stored["checkpoint_id"] = S.checkpoint_identity("random:resnet1d_test")["id"]
    stored["recipe_id"] = recipe_identity(stored["recipe"])
    ctx = SimpleNamespace(recipe={"mode": "linear+handcrafted", "head": after})
    assert "side features changed" in S._outdated(stored, ctx)
    stored["recipe"]["head"] = after
    stored["recipe_id"] = recipe_identity(stored["recipe"])
    assert S._outdated(stored, ctx) is None


# ------------------------------------------------------------------------------------------- what is outdated
def _stored(recipe: dict, checkpoint: str = "random:resnet1d_test", init_seed: int = 0,
            backbone_args: dict | None = None) -> dict:
    ident = S.checkpoint_identity(checkpoint, init_seed, backbone_args)
    return {"checkpoint": checkpoint, "checkpoint_id": ident["id"], "checkpoint_identity": ident,
            "recipe": recipe, "recipe_id": recipe_identity(recipe)}


def test_outdated_reasons():
    recipe = {"mode": "linear", "head": S._probe_recipe(_LINEAR), "task": {"name": "t"}, "eval_data": None,
              "preprocess": {"fs": 100.0}, "data": {"task": "aaa"}}
    ctx = SimpleNamespace(recipe=dict(recipe, head={"other": 1}))
    assert S._outdated(_stored(recipe), ctx) is None
    assert S._outdated(_stored(recipe, init_seed=3), ctx) is None        # another init seed is still that seed's
    assert S._outdated(_stored(recipe, backbone_args={"width": 8}), ctx) is None     # likewise other arguments
    # the same task and preprocessing on other data: the records or labels changed since
    assert "records, labels" in S._outdated(_stored(recipe), SimpleNamespace(recipe=dict(recipe, data={"task": "b"})))
    # other preprocessing: other data by design, not outdated
    assert S._outdated(_stored(recipe), SimpleNamespace(recipe=dict(recipe, preprocess={"fs": 250.0},
                                                                     data={"task": "b"}))) is None
    old_schema = dict(_stored(recipe), recipe_id="0" * 16)
    assert "cell schema" in S._outdated(old_schema, ctx)
    changed = dict(_stored(recipe), checkpoint_id="0" * 16)
    assert "another identity" in S._outdated(changed, ctx)
    gone = dict(_stored(recipe), checkpoint="/nonexistent/encoder")
    assert "cannot be identified" in S._outdated(gone, ctx)


def test_outdated_finetune_code_recipe():
    """A fine-tune cell from before a fix of the code-fixed fine-tuning settings is outdated."""
    head = {"head_init": "random", "layer_decay": 0.75}
    now = {"mode": "finetune", "head": head, **S._finetune_code_recipe("finetune", "random", 0.75)}
    ctx = SimpleNamespace(recipe=now)
    assert S._outdated(_stored(now, "supervised:resnet1d_test"), ctx) is None
    before_fix = {k: v for k, v in now.items() if k != "fit_mode"}
    assert "fit_mode" in S._outdated(_stored(before_fix, "supervised:resnet1d_test"), ctx)
