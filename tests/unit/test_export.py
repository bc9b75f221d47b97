"""Encoder export: safetensors + JSON round trip, and refusals (unknown names, tampered JSON, missing files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.export import (META_FILE, WEIGHTS_FILE, backbone_from_lightning_checkpoint, export_encoder,
                          load_encoder)




@pytest.mark.parametrize("name,kwargs", [("vit1d_test", {}), ("resnet1d_test", {"pool": "avg"}),
                                         ("vit1d_test", {"seq_len": 500, "embed_dim": 8, "num_heads": 2})])
def test_round_trip_gives_the_same_outputs(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs)
    if name.startswith("resnet"):  # non-trivial BatchNorm statistics must travel too
        model.train()
        model(torch.randn(8, 12, 250))
    model.eval()
    spec = PreprocessSpec(fs=250.0, lowpass=40.0)
    out = export_encoder(model, tmp_path / "enc", spec, extra={"method": "mae", "crop_samples": 250, "fs": 250.0})
    assert (out / WEIGHTS_FILE).is_file() and (out / META_FILE).is_file()
    loaded, spec2, info = load_encoder(out)
    assert spec2 == spec
    assert info["name"] == name and info["init_args"] == json.loads(json.dumps(model.init_args))
    assert {k: info["init_args"][k] for k in kwargs} == kwargs and info["extra"]["method"] == "mae"
    assert info["num_features"] == model.num_features
    assert not loaded.training
    x = torch.randn(3, 12, 250)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)
    # either file path works too
    assert load_encoder(out / META_FILE)[0].name == name


def test_preprocess_as_dict_and_json_only_content(tmp_path):
    model = create_backbone("vit1d_test")
    export_encoder(model, tmp_path, PreprocessSpec().to_dict())
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["format"] == "ecgfm-artifact" and meta["format_version"] == 2 and meta["kind"] == "encoder"
    assert meta["tensors"]["lead_embed"] == [12, 16]
    assert (tmp_path / "README.md").read_text().startswith("# ecgfm encoder: vit1d_test")
    # the weights file is safetensors (8-byte header length + JSON header), not a pickle
    raw = (tmp_path / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])["lead_embed"]["shape"] == [12, 16]


def test_export_refuses_unregistered_models_and_bad_extra(tmp_path):
    model = create_backbone("vit1d_test")
    with pytest.raises(ValueError, match="JSON"):
        export_encoder(model, tmp_path, PreprocessSpec(), extra={"f": object()})
    model.name = "my_private_net"
    with pytest.raises(ValueError, match="unregistered"):
        export_encoder(model, tmp_path, PreprocessSpec())


def _tamper(path, **changes):
    """Edit an encoder description: ``name`` / ``init_args`` are architecture entries, the rest top-level."""
    meta = json.loads((path / META_FILE).read_text())
    for key in ("name", "init_args"):
        if key in changes:
            meta["architecture"][key] = changes.pop(key)
    meta.update(changes)
    (path / META_FILE).write_text(json.dumps(meta))


@pytest.fixture
def exported(tmp_path):
    export_encoder(create_backbone("vit1d_test"), tmp_path, PreprocessSpec())
    return tmp_path


def test_unknown_name_is_refused(exported):
    _tamper(exported, name="os.system")
    with pytest.raises(ValueError, match="unknown backbone name 'os.system'"):
        load_encoder(exported)


def test_shape_mismatch_is_refused(exported):
    _tamper(exported, init_args={"embed_dim": 32})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder(exported)


def test_other_architecture_is_refused(exported):
    _tamper(exported, name="resnet1d_test")  # the complete ViT arguments do not even fit the ResNet constructor
    with pytest.raises(ValueError, match="cannot build backbone 'resnet1d_test'.*unexpected keyword"):
        load_encoder(exported)
    _tamper(exported, init_args={})          # builds, but the ViT weights do not fit
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder(exported)


def test_bad_init_args_bad_version_bad_spec_bad_json(exported):
    _tamper(exported, init_args={"no_such_argument": 1})
    with pytest.raises(ValueError, match="cannot build"):
        load_encoder(exported)
    _tamper(exported, init_args={}, format_version=99)
    with pytest.raises(ValueError, match="format_version"):
        load_encoder(exported)
    _tamper(exported, format_version=2, preprocess={"fs": 100, "colour": "red"})
    with pytest.raises(ValueError, match="preprocess"):
        load_encoder(exported)
    (exported / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_encoder(exported)


def test_missing_files(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(tmp_path / "nothing.pt")
    (exported / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        load_encoder(exported)


def test_corrupt_weights(exported):
    (exported / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_encoder(exported)


def test_backbone_from_lightning_checkpoint(tmp_path):
    """A real Lightning checkpoint of a pretraining module rebuilds its backbone with weights_only loading."""
    import lightning as L

    from ecgfm.methods.mae import MAEModule

    torch.manual_seed(0)
    module = MAEModule(create_backbone("vit1d_test", drop_path=0.0), decoder_dim=16, decoder_depth=1,
                       decoder_heads=2, warmup_steps=0, max_steps=2)
    x = torch.randn(4, 12, 250)
    loader = torch.utils.data.DataLoader([{"x": xi, "lead_mask": torch.ones(12, dtype=torch.bool)} for xi in x],
                                         batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, loader)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    backbone, hparams = backbone_from_lightning_checkpoint(ckpt)
    assert hparams["backbone_name"] == "vit1d_test" and hparams["mask_ratio"] == 0.75
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone.embed(x), module.backbone.embed(x))
    with pytest.raises(FileNotFoundError):
        backbone_from_lightning_checkpoint(tmp_path / "absent.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="no backbone description"):
        backbone_from_lightning_checkpoint(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("name,kwargs", [("vit1d_test", {"depth": 2}), ("resnet1d_test", {})])
def test_export_json_lists_every_constructor_argument(tmp_path, name, kwargs):
    import inspect

    model = create_backbone(name, **kwargs)
    export_encoder(model, tmp_path, PreprocessSpec())
    meta = json.loads((tmp_path / META_FILE).read_text())
    ctor = set(inspect.signature(type(model).__init__).parameters) - {"self"}
    init_args = meta["architecture"]["init_args"]
    assert set(init_args) == ctor
    assert init_args == json.loads(json.dumps(model.init_args))
    # the JSON alone rebuilds the architecture, directly through the class (no registry defaults involved)
    rebuilt = type(model)(**init_args)
    assert {k: list(v.shape) for k, v in rebuilt.state_dict().items()} == meta["tensors"]


def test_old_style_export_with_only_the_given_arguments_still_loads(tmp_path, monkeypatch):
    from ecgfm.backbones.vit1d import VIT_SIZES

    torch.manual_seed(0)
    model = create_backbone("vit1d_test", depth=2).eval()
    export_encoder(model, tmp_path / "new", PreprocessSpec())
    export_encoder(model, tmp_path / "old", PreprocessSpec())
    _tamper(tmp_path / "old", init_args={"depth": 2})        # what older versions wrote: the given kwargs only
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        ref = model.embed(x)
        for folder in ("new", "old"):
            loaded, _, _ = load_encoder(tmp_path / folder)
            assert loaded.init_args == model.init_args       # rebuilt with the (unchanged) registry defaults
            torch.testing.assert_close(loaded.embed(x), ref, rtol=0, atol=0)
    # if the registry's defaults change later, only the self-describing export still loads
    monkeypatch.setitem(VIT_SIZES["vit1d_test"], "embed_dim", 32)
    loaded, _, _ = load_encoder(tmp_path / "new")
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder(tmp_path / "old")


def test_registered_class_built_directly_exports_its_constructor_call(tmp_path):
    from ecgfm.backbones.vit1d import ViT1D

    torch.manual_seed(0)
    model = ViT1D(seq_len=250, patch_size=25, embed_dim=8, depth=1, num_heads=2).eval()
    model.name = "vit1d_test"                                # no create_backbone, so no init_args
    export_encoder(model, tmp_path, PreprocessSpec())
    loaded, _, info = load_encoder(tmp_path)
    assert info["init_args"]["embed_dim"] == 8 and info["init_args"]["mlp_ratio"] == 4.0
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)


def _write_v1(folder, model, spec, extra):
    """An encoder folder as format version 1 wrote it (``encoder.json`` with top-level name / init_args)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / META_FILE).write_text(json.dumps({
        "format": "ecgfm-encoder", "format_version": 1, "name": model.name, "init_args": model.init_args,
        "num_features": model.num_features, "preprocess": spec.to_dict(),
        "tensors": {k: list(v.shape) for k, v in state.items()}, "extra": extra}))


def test_version_1_encoder_folders_still_load(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit1d_test").eval()
    spec = PreprocessSpec(fs=100.0)
    _write_v1(tmp_path / "v1", model, spec, {"fs": 100.0, "crop_samples": 250, "method": "MAE"})
    loaded, spec2, info = load_encoder(tmp_path / "v1")
    assert spec2 == spec and info["format_version"] == 1 and info["input"]["window_samples"] == 250
    assert info["extra"]["crop_samples"] == 250 and info["name"] == "vit1d_test"
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)


def test_huge_constructor_arguments_are_refused_before_allocating(exported):
    """A description asking for a ~13 GB model is compared with the weights' header on the meta device."""
    import resource

    _tamper(exported, init_args={**json.loads((exported / META_FILE).read_text())["architecture"]["init_args"],
                                 "embed_dim": 32768, "depth": 12, "num_heads": 8})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="do not fit backbone 'vit1d_test'.*shape mismatch"):
        load_encoder(exported)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB while refusing"


def test_new_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import ecgfm.artifacts as art

    model = create_backbone("vit1d_test")

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(art, "atomic_write_json", broken)
    with pytest.raises(OSError, match="No space"):
        export_encoder(model, tmp_path / "enc", PreprocessSpec())
    assert not (tmp_path / "enc").exists() and [p.name for p in tmp_path.iterdir()] == [".enc.lock"]


def test_an_existing_folder_is_replaced_whole_and_keeps_its_other_files(tmp_path, monkeypatch):
    """An existing artifact folder had its files replaced one by one: a kill between them left new weights under the
    old description. Now a new folder is swapped in by rename (a failure leaves the old artifact whole), other files
    of the folder (a cell's predictions) move along."""
    import ecgfm.artifacts as art

    torch.manual_seed(0)
    a, b = create_backbone("vit1d_test"), create_backbone("vit1d_test")
    export_encoder(a, tmp_path / "enc", PreprocessSpec(fs=100.0))
    (tmp_path / "enc" / "predictions_test.csv").write_text("key,score\n")
    real = art.atomic_write_json

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(art, "atomic_write_json", broken)
    with pytest.raises(OSError, match="No space"):
        export_encoder(b, tmp_path / "enc", PreprocessSpec(fs=500.0))
    monkeypatch.setattr(art, "atomic_write_json", real)
    loaded, spec, _ = load_encoder(tmp_path / "enc")           # the old artifact, whole
    assert spec.fs == 100.0 and all(torch.equal(loaded.state_dict()[k], v) for k, v in a.state_dict().items())
    export_encoder(b, tmp_path / "enc", PreprocessSpec(fs=500.0))
    loaded, spec, _ = load_encoder(tmp_path / "enc")
    assert spec.fs == 500.0 and all(torch.equal(loaded.state_dict()[k], v) for k, v in b.state_dict().items())
    assert (tmp_path / "enc" / "predictions_test.csv").read_text() == "key,score\n"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["enc"]   # no temporary folder


def test_a_failed_swap_restores_the_old_artifact_and_links_and_modes_are_kept(tmp_path, monkeypatch):
    """The second rename of the swap failing deleted both the old and the new artifact (and the moved predictions);
    a symlinked folder was replaced by a real one; the folder's mode became mkdtemp's 0700."""
    import os

    import ecgfm.artifacts as art

    torch.manual_seed(0)
    a, b = create_backbone("vit1d_test"), create_backbone("vit1d_test")
    export_encoder(a, tmp_path / "v1", PreprocessSpec(fs=100.0))
    (tmp_path / "v1" / "predictions_test.csv").write_text("k\n")
    os.chmod(tmp_path / "v1", 0o2775)
    real = os.replace
    moved_aside = []

    def install_fails(src, dst):
        if Path(src).parent == tmp_path and Path(dst) == tmp_path / "v1" and str(src).endswith(".tmp"):
            raise OSError(39, "Directory not empty")          # the new folder's rename into place
        if Path(src) == tmp_path / "v1":
            moved_aside.append(dst)                           # the old folder moved aside first
        return real(src, dst)

    monkeypatch.setattr(art.os, "replace", install_fails)
    with pytest.raises(OSError, match="not empty"):
        export_encoder(b, tmp_path / "v1", PreprocessSpec(fs=500.0))
    monkeypatch.setattr(art.os, "replace", real)
    assert moved_aside                                        # the swap was reached, and undone
    assert load_encoder(tmp_path / "v1")[1].fs == 100.0 and (tmp_path / "v1" / "predictions_test.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".old", ".tmp"))]
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    export_encoder(b, tmp_path / "current", PreprocessSpec(fs=500.0))
    assert (tmp_path / "current").is_symlink() and load_encoder(tmp_path / "v1")[1].fs == 500.0
    assert (tmp_path / "v1" / "predictions_test.csv").exists()
    assert (os.stat(tmp_path / "v1").st_mode & 0o7777) == 0o2775


def test_concurrent_writers_and_a_reader_see_whole_artifacts(tmp_path):
    """Two processes rewriting one artifact (two sweep jobs on one cell) raced in the swap (FileNotFoundError,
    lost files); a reader paired one description with the other's weights. Writers now take the folder's lock and
    readers read again when the folder was swapped under them."""
    import multiprocessing as mp
    import sys

    # fork on Linux: the writers start writing at once (spawned ones re-imported torch and ecgfm first, seconds the
    # reader spent polling an artifact nobody wrote); spawn elsewhere
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))
    (tmp_path / "enc" / "predictions_test.csv").write_text("k\n")
    procs = [ctx.Process(target=_rewrite_many, args=(str(tmp_path / "enc"), fs, 12)) for fs in (100.0, 500.0)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        backbone, spec, info = load_encoder(tmp_path / "enc")
        seen.add(spec.fs)
        # the weights are the ones this description names (each writer's weights differ: seeded by its fs)
        assert info["weights_sha256"] == safetensors_sha256_of(tmp_path / "enc", backbone)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen, "the reader never read while the writers ran"
    assert (tmp_path / "enc" / "predictions_test.csv").exists()


def _rewrite_many(path: str, fs: float, n: int) -> None:
    torch.manual_seed(int(fs))
    model = create_backbone("vit1d_test")
    for _ in range(n):
        export_encoder(model, path, PreprocessSpec(fs=fs))


def safetensors_sha256_of(folder, backbone) -> str:
    """sha256 of the weights the loaded backbone holds, as ecgfm writes them."""
    import tempfile

    from ecgfm.artifacts import save_encoder
    from ecgfm.io import read_json

    with tempfile.TemporaryDirectory() as d:
        save_encoder(d, backbone, None)
        return read_json(f"{d}/encoder.json")["weights_sha256"]


def test_weights_swapped_under_their_description_are_refused(tmp_path):
    """Nothing tied a description to its weights: another model's weights of the same shapes loaded under the first
    one's description (and model card numbers). The JSON now names the weights' sha256."""
    from ecgfm.artifacts import ArtifactError, load_classifier, read_meta, save_classifier

    torch.manual_seed(0)
    a, b = create_backbone("vit1d_test"), create_backbone("vit1d_test")
    export_encoder(a, tmp_path / "a", PreprocessSpec(fs=100.0))
    export_encoder(b, tmp_path / "b", PreprocessSpec(fs=100.0))
    assert read_meta(tmp_path / "a", "encoder")[1]["weights_sha256"]
    shutil.copy2(tmp_path / "b" / "encoder.safetensors", tmp_path / "a" / "encoder.safetensors")
    with pytest.raises(ArtifactError, match="not the ones its description was written with"):
        load_encoder(tmp_path / "a")
    for name, m in (("c1", a), ("c2", b)):
        save_classifier(tmp_path / name, m, torch.nn.Linear(m.num_features, 2), PreprocessSpec(fs=100.0), ["x", "y"],
                        multilabel=False, window_samples=250)
    shutil.copy2(tmp_path / "c2" / "classifier.safetensors", tmp_path / "c1" / "classifier.safetensors")
    with pytest.raises(ArtifactError, match="not the ones its description was written with"):
        load_classifier(tmp_path / "c1")


def test_encoder_and_classifier_folders_are_told_apart(tmp_path):
    from ecgfm.artifacts import ArtifactError, artifact_kind, load_classifier, save_classifier

    model = create_backbone("vit1d_test")
    export_encoder(model, tmp_path / "enc", PreprocessSpec(fs=100.0))
    save_classifier(tmp_path / "clf", model, torch.nn.Linear(model.num_features, 3), PreprocessSpec(fs=100.0),
                    ["a", "b", "c"], multilabel=False, window_samples=250)
    assert artifact_kind(tmp_path / "enc") == "encoder" and artifact_kind(tmp_path / "clf") == "classifier"
    with pytest.raises(ArtifactError, match="this is an encoder.*finetune.py checkpoint="):
        load_classifier(tmp_path / "enc")
    with pytest.raises(ArtifactError, match="this is a classifier artifact, not an encoder"):
        load_encoder(tmp_path / "clf")
    clf, _, meta = load_classifier(tmp_path / "clf")
    assert meta["classes"] == ["a", "b", "c"] and meta["input"]["window_samples"] == 250
    assert "Classifier.load" in (tmp_path / "clf" / "README.md").read_text()


def test_every_registered_backbone_builds_on_the_meta_device():
    """Loading checks descriptions against the weights on the meta device; a backbone whose constructor cannot
    run there would fall back to a real build (and lose the cheap refusal of absurd descriptions)."""
    from ecgfm.backbones import list_backbones

    for name in list_backbones():
        with torch.device("meta"):
            model = create_backbone(name)
        assert all(p.is_meta for p in model.parameters()), name


def test_encoder_saved_without_preprocessing_is_not_given_the_default_spec(tmp_path):
    """``save_encoder(preprocess=None)`` means none: the API embeds the unprocessed signal (not high-passed,
    z-scored and clipped by the default spec), and the sweep builds its task cache without filter or normalisation
    at the encoder's rate."""
    import numpy as np

    import ecgfm
    from ecgfm.artifacts import save_encoder
    from ecgfm.evaluate.sweep import resolve_checkpoint

    torch.manual_seed(0)
    model = create_backbone("vit1d_test").eval()
    out = save_encoder(tmp_path / "raw", model, None, fs=100.0, window_samples=250)
    assert json.loads((out / "encoder.json").read_text())["preprocess"] is None
    assert load_encoder(out)[1] is None
    x = (np.random.default_rng(0).standard_normal((12, 250)) * 0.5 + 1.0).astype(np.float32)   # offset: a high-pass
    with torch.no_grad():                                                                       # would remove it
        want = model.embed(torch.from_numpy(x)[None]).numpy()[0]
    np.testing.assert_allclose(ecgfm.Encoder.load(out).embed(x, fs=100), want, rtol=1e-5, atol=1e-6)
    enc = resolve_checkpoint(str(out), 250)
    assert enc.preprocess == PreprocessSpec.raw(fs=100.0)
    assert enc.preprocess.highpass is None and enc.preprocess.normalize == "none" and enc.preprocess.clip is None
    from ecgfm.explain.wrapper import ECGWrapper

    wrapped = ECGWrapper.from_checkpoint(out, head=torch.nn.Linear(model.num_features, 2))   # the rate it describes
    assert wrapped.fs == 100.0 and wrapped.spec is None


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(window_aggregate="logits"), "window_aggregate must be one of"),
    (lambda m: m["input"].update(leads=["II", "II", "III"]), "input.leads must be distinct canonical"),
    (lambda m: m["input"].update(stride_samples=0), "input.stride_samples must be a positive integer"),
    (lambda m: m.update(thresholds=[0.5]), "thresholds must be 2 finite numbers"),
    (lambda m: m.update(classes=["a", "b", "c"]), "3 classes for a head of 2 outputs"),
    (lambda m: m.update(multilabel="yes"), "multilabel must be true or false"),
    (lambda m: m.update(lead_aware="false"), "lead_aware must be true, false or null"),
    (lambda m: m["input"].update(fs=250.0), r"input.fs \(250.0 Hz\) and preprocess.fs \(100.0 Hz\) disagree"),
])
def test_classifier_description_fields_are_checked_at_load(tmp_path, edit, match):
    """A hand-edited or foreign classifier.json was read silently ("logits" as prob, a lead fed twice, stride 0 as
    the window); load_classifier now checks what save_classifier writes."""
    from ecgfm.artifacts import ArtifactError, load_classifier, save_classifier

    model = create_backbone("vit1d_test")
    save_classifier(tmp_path / "c", model, torch.nn.Linear(model.num_features, 2), PreprocessSpec(fs=100.0),
                    ["a", "b"], multilabel=True, window_samples=250, leads=["I", "II", "III"] + [
                        "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"])
    load_classifier(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "classifier.json").read_text())
    edit(meta)
    (tmp_path / "c" / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match):
        load_classifier(tmp_path / "c")


def test_writers_refuse_what_the_loader_refuses(tmp_path):
    from ecgfm.artifacts import ArtifactError, save_classifier, save_encoder

    model = create_backbone("vit1d_test")
    with pytest.raises(ArtifactError, match="disagree"):
        save_encoder(tmp_path / "e", model, PreprocessSpec(fs=250.0), fs=500.0, window_samples=250)
    with pytest.raises(ArtifactError, match="disagree"):
        save_classifier(tmp_path / "c", model, torch.nn.Linear(model.num_features, 2), PreprocessSpec(fs=250.0),
                        ["a", "b"], multilabel=True, fs=500.0, window_samples=250)
    assert not (tmp_path / "e").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["input"].update(leads=["I"] * 12), "input.leads must be distinct canonical"),
    (lambda m: m["input"].update(leads=["X"] + m["input"]["leads"][1:]), "input.leads must be distinct canonical"),
    (lambda m: m["input"].update(window_samples=0), "input.window_samples must be a positive integer"),
    (lambda m: m["input"].update(window_samples="2250"), "input.window_samples must be a positive integer"),
    (lambda m: m["input"].update(stride_samples=-3), "input.stride_samples must be a positive integer"),
    (lambda m: m["input"].update(fs=250.0), "disagree"),
])
def test_encoder_description_fields_are_checked_at_load(tmp_path, edit, match):
    """An encoder.json edited by hand was not checked: lead I listed 12 times fed lead I 12 times, a window of 0
    meant the whole record, an unknown lead failed at the first call with "tuple.index(x)"."""
    from ecgfm.artifacts import ArtifactError, load_encoder, save_encoder

    save_encoder(tmp_path / "e", create_backbone("vit1d_test"), PreprocessSpec(fs=100.0), window_samples=250)
    load_encoder(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "encoder.json").read_text())
    edit(meta)
    (tmp_path / "e" / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match):
        load_encoder(tmp_path / "e")


def test_a_load_during_a_swap_reads_again(tmp_path, monkeypatch):
    """The folder gone for an instant between a writer's two renames, after the description was read: the load
    failed with "cannot read safetensors weights"; it now reads again."""
    import os

    import ecgfm.artifacts as art

    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))
    real = art.read_meta
    state = {"n": 0}

    def read_then_vanish(*a, **k):
        state["n"] += 1
        if state["n"] > 1 and (tmp_path / "away").exists():   # the swap's second rename, before the read again
            os.rename(tmp_path / "away", tmp_path / "enc")
        out = real(*a, **k)
        if state["n"] == 1:          # the first read: the folder leaves just after it (a swap in progress)
            os.rename(tmp_path / "enc", tmp_path / "away")
        return out

    monkeypatch.setattr(art, "read_meta", read_then_vanish)
    backbone, spec, _ = load_encoder(tmp_path / "enc")
    assert spec.fs == 100.0 and state["n"] >= 2


@pytest.mark.parametrize("where", ["description", "weights", "tensors"])
def test_a_file_gone_between_the_existence_check_and_its_read_is_read_again(tmp_path, monkeypatch, where):
    """CI failed once with a raw FileNotFoundError from load_encoder beside writers: the folder was swapped out
    between read_meta's checks and its read of encoder.json (or between the checks and the weights' header read).
    That is a writer's swap, read again, not an error; outside the retry loop it is a clear ArtifactNotFound."""
    import ecgfm.artifacts as artifacts

    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))
    name = {"description": "read_json", "weights": "safe_open", "tensors": "load_file"}[where]
    real = getattr(artifacts, name)
    calls = {"n": 0}

    def gone_once(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(artifacts, name, gone_once)
    backbone, spec, info = load_encoder(tmp_path / "enc")
    assert calls["n"] >= 2 and spec.fs == 100.0 and info["name"] == "vit1d_test"
    if where == "description":
        calls["n"] = 0
        with pytest.raises(artifacts.ArtifactError, match="disappeared while it was read"):
            artifacts.read_meta(tmp_path / "enc", "encoder")


def test_an_a_b_a_swap_while_the_weights_are_hashed_reads_again(tmp_path, monkeypatch):
    """Two writers rewriting equal artifacts: the description read (A), the weights hashed while B was in place, A
    back before the description was read again. That was taken for weights tampered under their description (a
    non-retried ArtifactError); the folder, read again unchanged, pairs its description with its weights."""
    import ecgfm.artifacts as artifacts

    torch.manual_seed(0)
    a, b = create_backbone("vit1d_test"), create_backbone("vit1d_test")
    export_encoder(b, tmp_path / "b", PreprocessSpec(fs=500.0))
    export_encoder(a, tmp_path / "enc", PreprocessSpec(fs=100.0))
    real, calls = artifacts.cached_safetensors_sha256, {"n": 0}

    def b_was_in_place_while_hashed(path):
        calls["n"] += 1
        return real(tmp_path / "b" / "encoder.safetensors") if calls["n"] == 1 else real(path)

    monkeypatch.setattr(artifacts, "cached_safetensors_sha256", b_was_in_place_while_hashed)
    _, spec, _ = load_encoder(tmp_path / "enc")
    assert spec.fs == 100.0 and calls["n"] >= 2


def test_a_miss_after_swaps_is_read_again_only_three_misses_in_a_row_are_not_found(tmp_path, monkeypatch):
    """The retry counted every attempt: two swaps then one read in the instant between a swap's two renames raised
    ArtifactNotFound. Only misses in a row count now; a folder that is really missing is still refused."""
    import ecgfm.artifacts as artifacts

    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))
    real, calls = artifacts.read_meta, {"n": 0}
    p = tmp_path / "enc"

    def swaps_then_a_miss(*a, **k):
        calls["n"] += 1
        if calls["n"] in (1, 3, 5):
            raise artifacts.ArtifactNotFound(p, "not found")
        if calls["n"] in (2, 4):
            raise artifacts._Vanished(p, "disappeared while it was read")
        return real(*a, **k)

    monkeypatch.setattr(artifacts, "read_meta", swaps_then_a_miss)
    monkeypatch.setattr(artifacts.time, "sleep", lambda s: None)
    _, spec, _ = load_encoder(p)
    assert spec.fs == 100.0 and calls["n"] == 6
    with pytest.raises(artifacts.ArtifactNotFound):
        load_encoder(tmp_path / "missing")


def test_a_read_waits_while_a_writer_holds_the_folder_lock(tmp_path):
    """Readers hold the writers' lock shared for each read, so a read never overlaps a swap; a read-only folder
    with no lock file (or a writer holding the lock past the timeout) is still read."""
    import threading
    import time

    import ecgfm.artifacts as artifacts
    from ecgfm.io import file_lock

    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))
    assert (tmp_path / ".enc.lock").exists()
    done = []
    with file_lock(tmp_path / ".enc.lock"):
        t = threading.Thread(target=lambda: done.append(load_encoder(tmp_path / "enc" / "encoder.json")[1].fs))
        t.start()
        time.sleep(0.5)
        assert not done, "the read did not wait for the writer's lock"
    t.join(30)
    assert done == [100.0]
    with file_lock(tmp_path / ".enc.lock"):   # held past the timeout: read without the lock
        t0 = time.monotonic()
        with artifacts._read_lock(tmp_path / "enc", timeout=0.2):
            assert time.monotonic() - t0 < 5
    (tmp_path / ".enc.lock").unlink()
    assert load_encoder(tmp_path / "enc")[1].fs == 100.0


def test_a_writer_swaps_the_folder_only_while_it_holds_the_folder_lock(tmp_path, monkeypatch):
    """Deterministic companion of the concurrency test above, which cannot see a missing writer lock (two writers
    rarely interleave on a small machine): every rename that installs or replaces the artifact folder happens while
    the writer holds ``.<folder>.lock``."""
    import contextlib

    import ecgfm.artifacts as artifacts

    held, renames = [], []
    real_lock, real_replace = artifacts.file_lock, artifacts.os.replace

    @contextlib.contextmanager
    def lock(path, *a, **k):
        with real_lock(path, *a, **k):
            held.append(Path(path).name)
            try:
                yield
            finally:
                held.pop()

    def replace(src, dst):
        renames.append((Path(dst).name, list(held)))
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts, "file_lock", lock)
    monkeypatch.setattr(artifacts.os, "replace", replace)
    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))   # install
    export_encoder(create_backbone("vit1d_test"), tmp_path / "enc", PreprocessSpec(fs=500.0))   # replace
    swaps = [r for r in renames if r[0] in ("enc", "artifact")]
    assert len(swaps) >= 2 and all(".enc.lock" in h for _, h in swaps), renames
