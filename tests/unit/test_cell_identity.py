"""Results-cell identity (issue 9, item 5): checkpoint content hash, recipe hash, stale-cell reasons, and a table
that groups by checkpoint identity instead of averaging different checkpoints of one method as seeds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.evaluate import identity as I
from ecgfm.evaluate.metrics import evaluate_scores
from ecgfm.evaluate.report import build_report, load_cells, paired_comparisons, summarize, tidy_rows
from ecgfm.export import export_encoder
from ecgfm.io import safetensors_sha256, sha256_file


def _export(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return export_encoder(create_backbone("resnet1d_test"), path, PreprocessSpec(), extra={"method": "MAEModule"})


def test_checkpoint_identity_is_the_weights_content(tmp_path):
    a = _export(tmp_path / "a", 0)
    b = _export(tmp_path / "b", 1)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    ia, ib, ic = (I.checkpoint_identity(str(p)) for p in (a, b, c))
    assert ia["id"] != ib["id"] and ia["id"] == ic["id"]
    assert I.checkpoint_identity(str(a / "encoder.safetensors"))["id"] == ia["id"]  # a file of the folder
    assert ia["basis"]["weights_sha256"]["encoder.safetensors"] == sha256_file(a / "encoder.safetensors")
    _export(a, 2)                                                          # retrained into the same folder
    assert I.checkpoint_identity(str(a))["id"] not in (ia["id"], ib["id"])


def _metadata_reversed(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys in reverse order (what safetensors itself
    writes in about half of all processes: its metadata map has no fixed order)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    doc = json.loads(raw[8:8 + n])
    doc["__metadata__"] = dict(reversed(list(doc["__metadata__"].items())))
    head = json.dumps(doc, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + head + b" " * (n - len(head)) + raw[8 + n:])


def test_identity_does_not_depend_on_the_metadata_order_safetensors_happened_to_write(tmp_path):
    # the same weights exported twice once gave two identities (a learning-curve cell of unchanged weights was
    # then left out as "computed from other weights"), because the metadata order of the file changed
    a = _export(tmp_path / "a", 0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    _metadata_reversed(b / "encoder.safetensors")
    assert (a / "encoder.safetensors").read_bytes() != (b / "encoder.safetensors").read_bytes()
    assert I.checkpoint_identity(str(a))["id"] == I.checkpoint_identity(str(b))["id"]
    # ecgfm writes the canonical form: exporting the reversed file's weights again restores a's bytes
    from ecgfm.export import load_encoder

    backbone, spec, info = load_encoder(b)
    export_encoder(backbone, tmp_path / "c", spec, extra=info.get("extra") or {})
    assert (tmp_path / "c" / "encoder.safetensors").read_bytes() == (a / "encoder.safetensors").read_bytes()
    # a file that is not in safetensors' compact form is hashed as it is
    d = tmp_path / "d.safetensors"
    raw = (a / "encoder.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.dumps(json.loads(raw[8:8 + n]), indent=1).encode()
    d.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
    assert safetensors_sha256(d) == sha256_file(d)


def test_weights_hash_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import ecgfm.io as io

    a = _export(tmp_path / "a", 0)
    calls = []
    real = io._safetensors_sha256_of   # hashes the opened file (the cache key is that file's stat)
    # the cached hash calls it with the file alone; export's uncached hash (with its chunk size) is not counted
    monkeypatch.setattr(io, "_safetensors_sha256_of", lambda f, *chunk: (None if chunk else calls.append(f))
                        or real(f, *chunk))
    io._SHA_CACHE.clear()
    for _ in range(3):
        I.weights_sha256(a)
    assert len(calls) == 1
    _export(a, 5)
    I.weights_sha256(a)
    assert len(calls) == 2
    # a rewrite with the same size and modification time (a coarse-timestamp kernel, one tick): hashed again
    import os

    f = a / "encoder.safetensors"
    st = f.stat()
    _export(a, 6)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    I.weights_sha256(a)
    assert len(calls) == 3


def test_pseudo_checkpoint_identity(tmp_path):
    a = _export(tmp_path / "a", 0)
    base = I.checkpoint_identity("random:resnet1d_test", init_seed=0)
    assert base["id"] == I.checkpoint_identity("random:resnet1d_test", init_seed=0)["id"]
    assert base["id"] != I.checkpoint_identity("random:resnet1d_test", init_seed=1)["id"]
    assert base["id"] != I.checkpoint_identity("random:resnet1d_test", 0, {"width": 8})["id"]
    assert base["id"] != I.checkpoint_identity("supervised:resnet1d_test", init_seed=0)["id"]
    assert base["id"] != I.checkpoint_identity("random:vit1d_test", init_seed=0)["id"]
    twin = I.checkpoint_identity(f"random:{a}")
    assert twin["basis"]["backbone"] == "resnet1d_test"
    _export(a, 3)                      # the twin takes the architecture only, not the weights
    assert I.checkpoint_identity(f"random:{a}")["id"] == twin["id"]
    with pytest.raises(FileNotFoundError, match="safetensors"):
        I.checkpoint_identity(str(tmp_path / "nothing"))


def test_stale_reason():
    ck = {"id": "a" * 16, "label": "aaaaaaa", "basis": {"kind": "pretrained", "weights_sha256": {"w": "1"}}}
    recipe = {"head": {"Cs": [1.0]}, "window_seconds": None}
    rid = I.recipe_identity(recipe)
    cell = {"checkpoint_id": ck["id"], "checkpoint_identity": ck, "recipe_id": rid, "recipe": recipe}
    assert I.stale_reason(cell, ck, rid, recipe) is None
    assert "no checkpoint / recipe identity" in I.stale_reason({}, ck, rid, recipe)
    new = {"head": {"Cs": [0.1]}, "window_seconds": 2.0}
    why = I.stale_reason(cell, ck, I.recipe_identity(new), new)
    assert "recipe changed" in why and "head.Cs" in why and "window_seconds" in why
    other = {"id": "b" * 16, "label": "bbbbbbb", "basis": {"kind": "pretrained", "weights_sha256": {"w": "2"}}}
    assert "checkpoint changed" in I.stale_reason(cell, other, rid, recipe)
    # JSON round trip (tuples -> lists, numpy scalars) keeps the identity
    assert I.recipe_identity({"head": {"Cs": (np.float64(1.0),)}, "window_seconds": None}) == rid


def _cell(results: Path, method: str, ckpt_id: str | None, seed: int, strength: float, recipe_id: str = "r1",
          backbone: str = "resnet1d_test", name: str | None = None, predictions: bool = False,
          architecture: str | None = "arch", mode: str = "linear") -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (60, 3))
    s = np.clip(y * strength + rng.random((60, 3)), 0, None)
    cell = {"mode": mode, "task": "toy", "dataset": "synthetic", "method": method, "checkpoint": f"runs/{name}",
            "backbone": backbone, "fraction": 1.0, "seed": seed, "n_train": 10, "multilabel": True,
            "results": {"test": evaluate_scores(y, s / s.max(), True, ["a", "b", "c"], n_boot=20)}}
    if ckpt_id is not None:
        cell.update(checkpoint_id=ckpt_id, recipe_id=recipe_id, architecture=architecture)
    if predictions:
        cell["predictions"] = {"test": {"keys": [f"r{i}" for i in range(60)], "y": y.tolist(),
                                        "scores": (s / s.max()).tolist()}}
    p = results / "cells" / mode / "toy" / (name or method) / f"f1_s{seed}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cell))
    return cell


def test_table_groups_by_checkpoint_identity(tmp_path):
    """Two checkpoints of the method "mae", one seed each: two rows of one seed, not one row of "two seeds"."""
    res = tmp_path / "results"
    _cell(res, "mae", "1111111aaaa", 0, 1.0, name="mae_a")
    _cell(res, "mae", "2222222bbbb", 0, 0.1, name="mae_b")
    _cell(res, "random-init", "3333333cccc", 0, 0.0, name="rnd")
    summ = summarize(tidy_rows(load_cells(res)))
    mae = summ[summ["method"] == "mae"]
    assert len(mae) == 2 and set(mae["n_seeds"]) == {1}
    assert set(mae["label"]) == {"mae@1111111", "mae@2222222"}
    assert summ[summ["method"] == "random-init"]["label"].tolist() == ["random-init"]  # alone: no hash needed
    md = Path(build_report(res, plot=False)["markdown"]).read_text()
    assert "| mae@1111111 |" in md and "| mae@2222222 |" in md


def test_legacy_cells_are_labelled_apart_and_duplicates_count_once(tmp_path):
    res = tmp_path / "results"
    _cell(res, "mae", "1111111aaaa", 0, 1.0, name="mae_a")
    _cell(res, "mae", "1111111aaaa", 0, 1.0, name="mae_a_symlink")        # same checkpoint, another path
    _cell(res, "mae", "1111111aaaa", 1, 1.0, name="mae_a")
    _cell(res, "mae", None, 0, 0.1, name="old")                             # written before identities
    summ = summarize(tidy_rows(load_cells(res)))
    labels = sorted(summ["label"])
    assert len(labels) == 2 and labels[0].startswith("mae@1111111") and "legacy-" in labels[1]
    new = summ[summ["label"] == labels[0]].iloc[0]
    assert new["n_seeds"] == 2


def test_classifier_artifact_json_is_not_a_cell(tmp_path):
    """``<cell>.classifier/classifier.json`` (fine-tune cells, ``save_classifier=true``) sits under ``cells/`` too;
    it is an artifact description, not a results cell, and must not be counted or tabled as one."""
    res = tmp_path / "results"
    _cell(res, "mae", "1111111aaaa", 0, 1.0, name="mae", mode="finetune")
    art = res / "cells" / "finetune" / "toy" / "mae" / "f1_s0.classifier"
    art.mkdir()
    (art / "classifier.json").write_text(json.dumps({"format": "ecgfm-classifier", "kind": "classifier"}))
    cells = load_cells(res)
    assert [c["_path"] for c in cells] == ["finetune/toy/mae/f1_s0.json"]
    assert build_report(res, plot=False)["n_cells"] == 1


def test_one_checkpoint_two_recipes_are_two_rows(tmp_path):
    res = tmp_path / "results"
    _cell(res, "mae", "1111111aaaa", 0, 1.0, recipe_id="recipeAAA", name="a")
    _cell(res, "mae", "1111111aaaa", 1, 0.1, recipe_id="recipeBBB", name="b")
    summ = summarize(tidy_rows(load_cells(res)))
    assert len(summ) == 2 and set(summ["n_seeds"]) == {1}
    assert all("[recipe " in lab for lab in summ["label"])


def test_paired_comparison_uses_the_matching_twin(tmp_path):
    """Two random-init cells (another backbone, another recipe) must not stand in for the twin."""
    res = tmp_path / "results"
    _cell(res, "mae", "1111111aaaa", 0, 1.0, name="mae", predictions=True, architecture="A")
    _cell(res, "random-init", "2222222bbbb", 0, 0.0, name="twin", predictions=True, architecture="A")
    _cell(res, "random-init", "3333333cccc", 0, 0.5, name="other_arch", predictions=True, architecture="B",
          backbone="vit1d_test")
    _cell(res, "random-init", "4444444dddd", 0, 0.5, name="other_recipe", predictions=True, architecture="A",
          recipe_id="r2")
    comp = paired_comparisons(load_cells(res), n_boot=20)
    assert len(comp) == 1 and comp["baseline"].iloc[0].startswith("random-init")
    assert comp["label"].iloc[0].startswith("mae")


def test_rate_check_of_the_encoder_description():
    """The preprocessing of a task cache must be at the encoder's training rate (issue 9, item 6)."""
    from ecgfm.evaluate.sweep import rate_checked_spec, trained_fs

    assert trained_fs({"input": {"fs": 100.0}, "preprocess": {"fs": 500.0}}) == 100.0
    assert trained_fs({"extra": {"fs": 0.0}, "preprocess": {"fs": None}}) is None
    assert trained_fs({"extra": {"fs": 250}}) == 250.0
    assert rate_checked_spec("c", PreprocessSpec(fs=None), 100.0).fs == 100.0      # resampled to the encoder's
    assert rate_checked_spec("c", PreprocessSpec(fs=250.0), None).fs == 250.0      # unknown rate: no check
    with pytest.raises(ValueError, match="trained at 100 Hz.*250 Hz.*override"):
        rate_checked_spec("c", PreprocessSpec(fs=250.0), 100.0)
    with pytest.raises(ValueError, match="contradicts itself"):
        rate_checked_spec("c", PreprocessSpec(fs=250.0), 100.0, override=False)


def test_cache_rate_check_refuses_mixed_and_wrong_rates():
    from types import SimpleNamespace

    from ecgfm.evaluate.sweep import Encoder, EvaluationError, _check_cache_rate

    enc = Encoder("runs/x/encoder", "pretrained", "mae", None, PreprocessSpec(fs=100.0), {"input": {"fs": 100.0}})
    task = lambda fs: SimpleNamespace(name="t", cache_dir="cache/t", cache=SimpleNamespace(fs=fs))  # noqa: E731
    assert _check_cache_rate(task(100.0), enc) == 100.0
    with pytest.raises(EvaluationError, match="mixes sampling rates"):
        _check_cache_rate(task(None), enc)
    with pytest.raises(EvaluationError, match="500 Hz but checkpoint .* takes 100 Hz"):
        _check_cache_rate(task(500.0), enc)
    free = Encoder("random:resnet1d_test", "random", "random-init", None, PreprocessSpec(fs=None), {})
    assert _check_cache_rate(task(500.0), free) == 500.0       # rate-free random weights: the cache's own rate


def test_probe_recipe_keeps_only_the_settings_of_its_head():
    from ecgfm.evaluate.sweep import _probe_recipe

    probe = {"mode": "linear", "aggregate": "mean_embedding", "Cs": [1.0], "lrs": [0.01], "max_iter": 1000,
             "mlp": {"epochs": 300}}
    assert set(_probe_recipe(probe)) == {"mode", "aggregate", "Cs", "max_iter"}
    assert set(_probe_recipe(dict(probe, mode="mlp"))) == {"mode", "aggregate", "lrs", "mlp", "weight_decay_on"}


def test_only_cells_of_the_fixed_fine_tune_path_change_identity():
    """Fine-tune cells with a random head (an exported encoder's trained in eval mode before the fix): their recipe
    identity changes, so old cells are recomputed; the key is the same for every kind, so an encoder's row and its
    random-init twin keep one recipe (the twin pairing needs it); LP-FT cells keep theirs."""
    from ecgfm.evaluate.sweep import _finetune_code_recipe

    fixed = _finetune_code_recipe("finetune", "random")       # the same for an encoder and its random-init twin
    assert fixed.get("fit_mode") == "train"
    recipe = _finetune_code_recipe("finetune", "lp")
    assert "fit_mode" not in recipe and recipe["finetune_no_decay_names"]
    assert I.recipe_identity(recipe) != I.recipe_identity(fixed)
    assert _finetune_code_recipe("linear", "random") == {}
    # layer-wise decay cells (LP-FT's 0.75) carry the layer-id count fixed for CNNs; no decay (supervised): unchanged
    assert "layer_ids" in _finetune_code_recipe("finetune", "lp", 0.75)
    assert "layer_ids" not in _finetune_code_recipe("finetune", "random", 1.0)


def test_a_set_becomes_one_json_text_whatever_the_hash_seed():
    """jsonable turned a set into a list in its iteration order, which for strings changes from process to
    process (PYTHONHASHSEED): anything hashed from it would change identity between runs."""
    import os
    import subprocess
    import sys

    code = "from ecgfm.io import dumps; print(dumps({'s': {'V1', 'II', 'aVR', 'I', 'V6', 'III', 'x', 'y', 'z'}}))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2, 3, 4)}
    assert len(outs) == 1


def test_min_epoch_samples_joins_the_recipe_only_when_set():
    """Fine-tune cells written before ``min_epoch_samples`` existed keep their recipe id (reused, not recomputed);
    a recipe that sets it is another recipe."""
    from ecgfm.evaluate.identity import recipe_identity
    from ecgfm.evaluate.sweep import _head_identity

    old = {"epochs": 40, "lr": 1e-3, "num_workers": 2}
    assert _head_identity(dict(old, min_epoch_samples=0)) == {"epochs": 40, "lr": 1e-3}
    assert recipe_identity({"head": _head_identity(dict(old, min_epoch_samples=0))}) == \
        recipe_identity({"head": {"epochs": 40, "lr": 1e-3}})
    assert recipe_identity({"head": _head_identity(dict(old, min_epoch_samples=2048))}) != \
        recipe_identity({"head": _head_identity(old)})


def test_a_bumped_feature_schema_makes_probe_cells_another_recipe(monkeypatch):
    """Bumping FEATURE_SCHEMA recomputes the feature files; the probe cells built on the old ones must be
    recomputed too (their recipe changes), fine-tune cells (no cached features) not; at 1 nothing changes."""
    from ecgfm.evaluate import features
    from ecgfm.evaluate.sweep import _feature_code_recipe

    assert features.FEATURE_SCHEMA == 1 and _feature_code_recipe("linear") == {}
    monkeypatch.setattr(features, "FEATURE_SCHEMA", 2)
    assert _feature_code_recipe("linear") == _feature_code_recipe("mlp") == {"feature_schema": 2}
    assert _feature_code_recipe("finetune") == {}
