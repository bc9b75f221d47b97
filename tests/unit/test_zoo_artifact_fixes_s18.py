"""Model zoo and artifact review fixes (s18): the zoo CLI's one-line errors for bad HuBERT options / config.json,
zero-valued zoo options refused (not replaced by the defaults), encoders saved without a rate, lead lists that do
not fit the backbone, repeated class names, and classifier descriptions without ``classes`` / ``multilabel``."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.api import Encoder
from ecgfm.artifacts import ArtifactError, load_classifier, load_encoder, save_classifier, save_encoder
from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.zoo import ZooImportError, import_classifier, import_encoder
from ecgfm.zoo import hubert_ecg as zoo_hubert
from ecgfm.zoo.__main__ import main as zoo_main
from tests.unit.test_zoo import NET1D_SIZES, PEERS

SPEC = PreprocessSpec(fs=100.0)


@pytest.fixture(scope="module")
def peers():
    if not PEERS.is_dir():
        pytest.skip(f"peer fixtures not found at {PEERS} (expected ../shared/fixtures/peers beside the project root)")
    return PEERS


def _hubert_folder(tmp_path, **config):
    """A Hugging Face-style HuBERT folder (``model.safetensors`` + ``config.json``) of a tiny native model."""
    from safetensors.torch import save_file

    native = create_backbone("hubert_ecg", conv_dim=[16, 24], conv_kernel=[10, 3], conv_stride=[5, 2],
                             hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    folder = tmp_path / "hf"
    folder.mkdir(parents=True)
    save_file({k: v.detach().clone().contiguous() for k, v in zoo_hubert.to_peer(native.state_dict()).items()},
              str(folder / "model.safetensors"))
    cfg = {"conv_stride": [5, 2], "num_attention_heads": 4, "do_stable_layer_norm": False}
    cfg.update(config)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "model.safetensors"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _classifier(tmp_path, name="clf", classes=("x", "y", "z"), **kw):
    bb = create_backbone("resnet1d_test")
    return save_classifier(tmp_path / name, bb, nn.Linear(bb.num_features, len(classes)), SPEC, list(classes),
                           False, window_samples=250, **kw)


def _edit(path, **changes):
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            meta.pop(key)
        elif key == "leads":
            meta["input"]["leads"] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


# ------------------------------------------------------------------ 1. HuBERT options / config.json: one error line
def test_hubert_cli_zero_heads_and_a_scalar_config_conv_stride_give_one_error_line(tmp_path, capsys):
    """--num-heads 0 raised ZeroDivisionError and a config.json with "conv_stride": 3 a TypeError (tracebacks)."""
    ckpt = _hubert_folder(tmp_path)
    assert zoo_main(["hubert_ecg", str(ckpt), str(tmp_path / "a"), "--num-heads", "0"]) == 1
    assert "option num_heads (--num-heads) must be a positive whole number, got int 0" in _one_error_line(capsys)
    bad = _hubert_folder(tmp_path / "b", conv_stride=3)
    assert zoo_main(["hubert_ecg", str(bad), str(tmp_path / "b" / "out")]) == 1
    err = _one_error_line(capsys)
    assert "config.json: conv_stride must be a list of positive whole numbers" in err and "got int 3" in err
    assert zoo_main(["hubert_ecg", str(ckpt), str(tmp_path / "c"), "--conv-stride", "5,x"]) == 2
    assert "--conv-stride must be comma-separated whole numbers" in _one_error_line(capsys)
    for cfg, what in (({"conv_stride": [5, 0]}, "conv_stride (each entry) must be a positive whole number"),
                      ({"num_attention_heads": 0}, "num_attention_heads must be a positive whole number"),
                      ({"do_stable_layer_norm": "false"}, "do_stable_layer_norm must be true or false"),
                      ({"layer_norm_eps": None}, "layer_norm_eps must be a positive number"),
                      ({"hidden_act": ["gelu"]}, "hidden_act must be an activation name")):
        path = _hubert_folder(tmp_path / what.split()[0], **cfg)
        with pytest.raises(ZooImportError, match=re.escape("config.json: " + what)):
            import_encoder("hubert_ecg", path, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert zoo_main(["hubert_ecg", str(ckpt), str(tmp_path / "ok")]) == 0   # the valid folder still imports
    capsys.readouterr()


# ------------------------------------------------------------------ 2. zero-valued options are refused
def test_zero_valued_zoo_options_are_refused_not_replaced_by_the_defaults(peers, tmp_path):
    """ecgfounder window_seconds=0 / stride=0 were silently 10 s / 2 (the artifact recorded 0), hubert 5 s."""
    ckpt = peers / "ecgfounder_net1d_tiny.pth"
    for opts, what in (({"stride": 0}, "option stride (--stride) must be a positive whole number"),
                       ({"window_seconds": 0}, "option window_seconds (--window-seconds) must be a positive number"),
                       ({"window_seconds": -1.0}, "window_seconds"), ({"stride": 1.5}, "stride"),
                       ({"window_seconds": 1e-4}, "less than one sample at 500 Hz")):
        with pytest.raises(ZooImportError, match=re.escape(what)):
            import_encoder("ecgfounder", ckpt, tmp_path / "e", **opts)
    with pytest.raises(ZooImportError, match="option window_seconds"):
        import_encoder("hubert_ecg", _hubert_folder(tmp_path), tmp_path / "h", window_seconds=0)
    assert not (tmp_path / "e").exists() and not (tmp_path / "h").exists()
    out = import_encoder("ecgfounder", ckpt, tmp_path / "ok", window_seconds=2.0)   # a given value is used
    assert load_encoder(out)[2]["input"]["window_samples"] == 1000


# ------------------------------------------------------------------ 3. an encoder needs a rate with a spec / window
def test_save_encoder_requires_a_rate_with_a_window_or_a_spec_and_the_api_warns_about_old_ones(tmp_path):
    """fs=None was accepted: the API then ignored embed(x, fs=...) (no resampling, windows cut at the caller's
    rate), so the embeddings at 100 Hz and 500 Hz were the same array."""
    bb = create_backbone("resnet1d_test")
    with pytest.raises(ValueError, match="pass fs=.*window_samples=250"):
        save_encoder(tmp_path / "a", bb, None, window_samples=250)
    with pytest.raises(ValueError, match="pass fs=.*spec does not fix the sampling rate"):
        save_encoder(tmp_path / "b", bb, PreprocessSpec(fs=None))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    save_encoder(tmp_path / "c", bb, PreprocessSpec(fs=None), fs=100.0, window_samples=250)   # rate given: fine
    save_encoder(tmp_path / "d", bb, None)   # no spec, no window: whole records as given (no rate needed)
    # one written before the check: loads, with a warning that it has a window but no rate
    _edit(tmp_path / "c" / "encoder.json", preprocess=None,
          input={"fs": None, "leads": list(CANONICAL_LEADS), "window_samples": 250, "window_seconds": None,
                 "stride_samples": None})
    with pytest.warns(UserWarning, match="window of 250 samples but no input rate"):
        Encoder.load(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Encoder.load(tmp_path / "d")


# ------------------------------------------------------------------ 4. leads that do not fit the backbone
def test_a_lead_list_that_does_not_fit_the_backbone_is_refused_at_save_and_load(tmp_path):
    """leads=["I", "II"] on a 12-channel backbone was saved and loaded; every record then failed in the network."""
    bb = create_backbone("resnet1d_test")
    with pytest.raises(ArtifactError, match=r"input\.leads names 2 lead\(s\).*reads 12 input channels \(num_leads"):
        save_classifier(tmp_path / "a", bb, nn.Linear(bb.num_features, 2), SPEC, ["x", "y"], False,
                        window_samples=250, leads=["I", "II"])
    with pytest.raises(ArtifactError, match="reads 12 input channels"):
        save_encoder(tmp_path / "b", create_backbone("vit1d_test"), SPEC, window_samples=250, leads=["II", "V1"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a backbone reading input_leads from a canonical 12-lead input needs the 12 canonical leads in their order
    one = create_backbone("net1d", **dict(NET1D_SIZES[2], input_leads=["II"]))
    with pytest.raises(ArtifactError, match="reads input_leads \\['II'\\] from a canonical 12-lead input"):
        save_encoder(tmp_path / "c", one, SPEC, window_samples=250, leads=["II"])
    save_encoder(tmp_path / "c", one, SPEC, window_samples=250)
    # ... and at load (a hand-edited description), naming the file
    out = _classifier(tmp_path)
    _edit(out / "classifier.json", leads=["I", "II"])
    with pytest.raises(ArtifactError, match=r"classifier\.json: input\.leads names 2 lead\(s\)"):
        load_classifier(out)
    save_encoder(tmp_path / "e", bb, SPEC, window_samples=250)
    _edit(tmp_path / "e" / "encoder.json", leads=CANONICAL_LEADS[::-1][:11])
    with pytest.raises(ArtifactError, match=r"encoder\.json: input\.leads names 11 lead\(s\)"):
        load_encoder(tmp_path / "e")


# ------------------------------------------------------------------ 5. repeated class names
def test_repeated_class_names_are_refused_at_save_load_and_import(peers, tmp_path, capsys):
    """["x", "x", "z"] was saved, and predict_proba returned duplicate DataFrame columns."""
    with pytest.raises(ArtifactError, match=r"classes lists \['x'\] more than once"):
        _classifier(tmp_path, "a", classes=("x", "x", "z"))
    out = _classifier(tmp_path, "b")
    _edit(out / "classifier.json", classes=["x", "z", "z"])
    with pytest.raises(ArtifactError, match=r"classifier\.json: classes lists \['z'\] more than once"):
        load_classifier(out)
    names = tmp_path / "names.txt"
    names.write_text("a\na\nb\nc\nd\n")   # the fixture's head has 5 outputs
    assert zoo_main(["ecgfounder", str(peers / "ecgfounder_net1d_tiny.pth"), str(tmp_path / "c"), "--classifier",
                     "--class-names", str(names)]) == 1
    assert "class names ['a'] are given more than once" in _one_error_line(capsys)
    with pytest.raises(ZooImportError, match="more than once"):
        import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "d",
                          class_names=["a", "b", "a", "c", "d"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# ------------------------------------------------------------------ 6. messages and required classifier fields
def test_class_names_file_errors_name_the_file(peers, tmp_path, capsys):
    """An invalid JSON --class-names file printed only json's message (no file name)."""
    ckpt = str(peers / "ecgfounder_net1d_tiny.pth")
    bad = tmp_path / "bad_names.json"
    bad.write_text('["a","b",')
    assert zoo_main(["ecgfounder", ckpt, str(tmp_path / "a"), "--classifier", "--class-names", str(bad)]) == 1
    err = _one_error_line(capsys)
    assert str(bad) in err and "not valid JSON" in err
    bad.write_text('{"labels": ["a"]}')
    assert zoo_main(["ecgfounder", ckpt, str(tmp_path / "b"), "--classifier", "--class-names", str(bad)]) == 1
    err = _one_error_line(capsys)
    assert str(bad) in err and "expected a JSON list of class names" in err
    good = tmp_path / "names.json"
    good.write_text(json.dumps({"classes": list("abcde")}))
    assert zoo_main(["ecgfounder", ckpt, str(tmp_path / "c"), "--classifier", "--class-names", str(good)]) == 0
    assert load_classifier(tmp_path / "c")[2]["classes"] == list("abcde")


def test_a_classifier_description_without_classes_or_multilabel_is_refused(tmp_path):
    """Without classes it loaded with classes == [] (predict_proba failed in pandas); without multilabel it loaded
    as softmax."""
    for i, (change, what) in enumerate(((dict(classes=...), r"classes must be a non-empty list.*\(missing\)"),
                                        (dict(classes=[]), "classes must be a non-empty list"),
                                        (dict(classes=["x", 2, "z"]), "classes must be a non-empty list"),
                                        (dict(multilabel=...), r"multilabel must be true or false.*\(missing\)"))):
        out = _classifier(tmp_path, f"c{i}")
        _edit(out / "classifier.json", **change)
        with pytest.raises(ArtifactError, match=r"classifier\.json: " + what):
            load_classifier(out)
    # what the project writes still loads: save_classifier, and a version-1 folder upgraded in memory
    model, _, meta = load_classifier(_classifier(tmp_path, "ok"))
    assert meta["classes"] == ["x", "y", "z"] and meta["multilabel"] is False
    v1 = tmp_path / "v1"
    v1.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(v1 / "classifier.safetensors"))
    (v1 / "classifier.json").write_text(json.dumps({
        "format": "ecgfm-classifier", "format_version": 1,
        "backbone": {"name": "resnet1d_test", "init_args": meta["architecture"]["init_args"]},
        "head": meta["head"], "preprocess": SPEC.to_dict(), "fs": 100.0, "n_samples": 250,
        "class_names": ["x", "y", "z"], "postprocess": "sigmoid", "extra": {}}))
    meta1 = load_classifier(v1)[2]
    assert meta1["classes"] == ["x", "y", "z"] and meta1["multilabel"] is True
    x = torch.randn(1, 12, 250)
    with torch.no_grad():
        assert np.allclose(load_classifier(v1)[0](x).numpy(), model(x).numpy())
