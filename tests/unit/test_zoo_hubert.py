"""HuBERT-ECG import: ecgfm's native HubertECG equals ``transformers.HubertModel`` on small random configs.

The reference outputs were computed by ``transformers.HubertModel`` (``scripts/make_hubert_reference.py``, which
records the transformers version in each reference file) and are stored with the models' weights under
``tests/data/hubert_ecg/``: transformers is not a test dependency (with it installed, every process importing
Lightning imports it through torchmetrics, seconds per process). Where it is installed, the last test also
recomputes the references with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecgfm.export import load_encoder
from ecgfm.zoo import ZooImportError, import_encoder
from tests.unit.test_zoo import assert_matches

DATA = Path(__file__).resolve().parents[1] / "data" / "hubert_ecg"
#: the stored configurations (scripts/make_hubert_reference.py): GroupNorm feature encoder, post-norm, even position
#: kernel, no conv bias, strides 5-2-2; LayerNorm feature encoder, pre-norm, odd kernel, conv bias, strides 3-2
CONFIGS = {"group_postnorm": [5, 2, 2], "layer_prenorm": [3, 2]}


def _reference(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(config.json as a dict, HubertModel state dict, stored inputs and outputs)`` of configuration ``name``."""
    folder = DATA / name
    return (json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors")),
            load_file(str(folder / "reference.safetensors")))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["safetensors", "bin_weight_g"])
def test_native_hubert_equals_transformers(name, layout, tmp_path):
    _, state, ref = _reference(name)
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(DATA / name / "config.json", folder / "config.json")
    if layout == "safetensors":
        path = folder / "model.safetensors"
        shutil.copy(DATA / name / "model.safetensors", path)
    else:   # older checkpoints: weight-norm factors as weight_g / weight_v, a pytorch_model.bin of tensors
        renamed = {k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
                    .replace("conv.parametrizations.weight.original1", "conv.weight_v"): v for k, v in state.items()}
        assert renamed.keys() != state.keys()   # the stored model has a weight-normed position conv to rename
        path = folder / "pytorch_model.bin"
        torch.save(renamed, path)
    out = import_encoder("hubert_ecg", path, tmp_path / "enc")
    backbone, spec, info = load_encoder(out)
    assert info["init_args"]["conv_stride"] == CONFIGS[name]
    assert info["extra"]["zoo"]["ignored_keys"] == ["masked_spec_embed"]
    with torch.no_grad():
        ours = backbone.forward_features(ref["x"])
        assert_matches(ours, ref["x_out"])
        assert_matches(backbone.embed(ref["x"]), ref["x_out"].mean(1))


def test_what_the_weights_cannot_tell_comes_from_config_or_options(tmp_path):
    config, state, ref = _reference("group_postnorm")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(ZooImportError, match=r"hubert_ecg: conv_stride cannot be read from the weights.*config\.json"):
        import_encoder("hubert_ecg", path, tmp_path / "enc")
    out = import_encoder("hubert_ecg", path, tmp_path / "enc", conv_stride=[5, 2, 2], num_heads=4,
                         stable_layer_norm=False)
    backbone, _, _ = load_encoder(out)
    with torch.no_grad():
        assert_matches(backbone.embed(ref["x1"]), ref["x1_out"].mean(1))
    # a classification wrapper: the HubertModel under a prefix, the head outside it is not imported
    wrapped = {f"hubert_ecg.{k}": v for k, v in state.items()}
    wrapped["classifier.weight"] = torch.zeros(3, 32)
    torch.save(wrapped, tmp_path / "clf.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    out2 = import_encoder("hubert_ecg", tmp_path / "clf.bin", tmp_path / "enc2")
    assert "classifier.weight" in json.loads((out2 / "encoder.json").read_text())["extra"]["zoo"]["ignored_keys"]
    backbone2, _, _ = load_encoder(out2)
    with torch.no_grad():
        assert_matches(backbone2.embed(ref["x1"]), ref["x1_out"].mean(1))


def test_stored_references_are_what_transformers_computes():
    """The stored references are HubertModel's outputs on the stored weights (recomputed where transformers is
    installed; the stored files name the version that wrote them)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: the stored "
                                                              "references are used as they are")
    for name in CONFIGS:
        _, state, ref = _reference(name)
        model = transformers.HubertModel(transformers.HubertConfig.from_json_file(str(DATA / name / "config.json")))
        model.load_state_dict(state)
        with torch.no_grad():
            for k in ("x", "x1"):
                assert_matches(model.eval()(ref[k].reshape(ref[k].shape[0], -1)).last_hidden_state, ref[f"{k}_out"])
