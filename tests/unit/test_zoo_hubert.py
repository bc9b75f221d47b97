"""HuBERT-ECG import: ecgfm's native HubertECG equals ``transformers.HubertModel`` on small seeded models.

The reference values (per output: shape, sum of |values|, 32 values at fixed positions) were computed by
``transformers.HubertModel`` and are stored in ``tests/unit/hubert_reference.py`` with the configurations and the
state dict's key / shape table; the weights and inputs are made here (``hubert_reference_tools``), so neither
transformers nor a weight file is needed (``scripts/make_hubert_reference.py`` writes the values; ``--check``
recomputes them). transformers is not a test dependency: installed, every process importing Lightning imports it
through torchmetrics, a second or two each. Where it is installed, the last test recomputes the values with it."""

from __future__ import annotations

import json

import pytest
import torch

from ecgfm.export import load_encoder
from ecgfm.zoo import ZooImportError, import_encoder
from tests.unit.hubert_reference import REFERENCE
from tests.unit.hubert_reference_tools import inputs, random_state, summarize
from tests.unit.test_zoo import ATOL, RTOL


def assert_matches_reference(out: torch.Tensor, ref: dict) -> None:
    """``out`` has the reference's shape, its values at the stored positions and its sum of |values| up to float32
    rounding (:data:`tests.unit.test_zoo.RTOL` / :data:`~tests.unit.test_zoo.ATOL`)."""
    assert list(out.shape) == ref["shape"]
    flat = out.detach().reshape(-1).double()
    for i, v in ref["samples"]:
        assert abs(float(flat[i]) - v) <= ATOL + RTOL * abs(v), (i, float(flat[i]), v)
    assert float(flat.abs().sum()) == pytest.approx(ref["abs_sum"], rel=RTOL)


def _hf_folder(tmp_path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A HuggingFace-style folder's ``config.json`` (the HubertConfig arguments; every other key read as its
    default, as transformers does) and the seeded state dict."""
    ref = REFERENCE[name]
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    config = {"model_type": "hubert", **ref["config"]}
    (folder / "config.json").write_text(json.dumps(config))
    return config, random_state(ref["shapes"], seed=0)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("layout", ["safetensors", "bin_weight_g"])
def test_native_hubert_equals_transformers(name, layout, tmp_path):
    from safetensors.torch import save_file

    _, state = _hf_folder(tmp_path, name)
    if layout == "safetensors":
        path = tmp_path / "hf" / "model.safetensors"
        save_file(state, str(path))
    else:   # older checkpoints: weight-norm factors as weight_g / weight_v, a pytorch_model.bin of tensors
        renamed = {k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
                    .replace("conv.parametrizations.weight.original1", "conv.weight_v"): v for k, v in state.items()}
        assert renamed.keys() != state.keys()   # the model has a weight-normed position conv to rename
        path = tmp_path / "hf" / "pytorch_model.bin"
        torch.save(renamed, path)
    out = import_encoder("hubert_ecg", path, tmp_path / "enc")
    backbone, _, info = load_encoder(out)
    assert info["init_args"]["conv_stride"] == REFERENCE[name]["config"]["conv_stride"]
    assert info["extra"]["zoo"]["ignored_keys"] == ["masked_spec_embed"]
    x = inputs()
    with torch.no_grad():
        for k in ("x", "x1"):
            feats = backbone.forward_features(x[k])
            assert_matches_reference(feats, REFERENCE[name]["outputs"][k])
            torch.testing.assert_close(backbone.embed(x[k]), feats.mean(1))


def test_what_the_weights_cannot_tell_comes_from_config_or_options(tmp_path):
    from safetensors.torch import save_file

    config, state = _hf_folder(tmp_path, "group_postnorm")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(ZooImportError, match=r"hubert_ecg: conv_stride cannot be read from the weights.*config\.json"):
        import_encoder("hubert_ecg", path, tmp_path / "enc")
    out = import_encoder("hubert_ecg", path, tmp_path / "enc", conv_stride=[5, 2, 2], num_heads=4,
                         stable_layer_norm=False)
    backbone, _, _ = load_encoder(out)
    x1 = inputs()["x1"]
    with torch.no_grad():
        assert_matches_reference(backbone.forward_features(x1), REFERENCE["group_postnorm"]["outputs"]["x1"])
    # a classification wrapper: the HubertModel under a prefix, the head outside it is not imported
    wrapped = {f"hubert_ecg.{k}": v for k, v in state.items()}
    wrapped["classifier.weight"] = torch.zeros(3, 32)
    torch.save(wrapped, tmp_path / "clf.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    out2 = import_encoder("hubert_ecg", tmp_path / "clf.bin", tmp_path / "enc2")
    assert "classifier.weight" in json.loads((out2 / "encoder.json").read_text())["extra"]["zoo"]["ignored_keys"]
    backbone2, _, _ = load_encoder(out2)
    with torch.no_grad():
        assert_matches_reference(backbone2.forward_features(x1), REFERENCE["group_postnorm"]["outputs"]["x1"])


def test_a_wrong_weight_is_caught_by_the_stored_values(tmp_path):
    """The stored summary is specific enough: one weight of the last layer changed by 1 % fails the check."""
    from safetensors.torch import save_file

    _, state = _hf_folder(tmp_path, "layer_prenorm")
    key = "encoder.layers.1.feed_forward.output_dense.weight"
    state[key] = state[key] * 1.01
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    backbone, _, _ = load_encoder(import_encoder("hubert_ecg", tmp_path / "hf" / "model.safetensors",
                                                 tmp_path / "enc"))
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_matches_reference(backbone.forward_features(inputs()["x"]), REFERENCE["layer_prenorm"]["outputs"]["x"])


def test_stored_references_are_what_transformers_computes():
    """The stored values are HubertModel's on the seeded weights (recomputed where transformers is installed)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: the stored "
                                                              "reference values are used as they are")
    for name, ref in REFERENCE.items():
        model = transformers.HubertModel(transformers.HubertConfig(**ref["config"])).eval()
        model.load_state_dict(random_state(ref["shapes"], seed=0))
        with torch.no_grad():
            for k, x in inputs().items():
                got = summarize(model(x.reshape(x.shape[0], -1)).last_hidden_state, len(ref["outputs"][k]["samples"]))
                assert got["shape"] == ref["outputs"][k]["shape"]
                assert [i for i, _ in got["samples"]] == [i for i, _ in ref["outputs"][k]["samples"]]
                assert_matches_reference(model(x.reshape(x.shape[0], -1)).last_hidden_state, ref["outputs"][k])
