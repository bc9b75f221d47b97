"""HuBERT-ECG import: ecgfm's native HubertECG equals ``transformers.HubertModel`` built from small random configs
(transformers is a test-only dependency; the framework never imports it)."""

from __future__ import annotations

import json

import pytest
import torch

from ecgfm.export import load_encoder
from ecgfm.zoo import ZooImportError, import_encoder
from tests.unit.test_zoo import assert_matches

transformers = pytest.importorskip("transformers", reason="transformers (test-only dependency, extra 'dev') is "
                                                          "needed to compare against HubertModel")

CONFIGS = [
    dict(conv_dim=[16, 24, 24], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], conv_bias=False,
         feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=16),
    dict(conv_dim=[16, 16], conv_kernel=[7, 3], conv_stride=[3, 2], conv_bias=True, feat_extract_norm="layer",
         do_stable_layer_norm=True, num_conv_pos_embeddings=9),
]


def _hf_model(cfg: dict, seed: int):
    config = transformers.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, num_conv_pos_embedding_groups=4, **cfg)
    torch.manual_seed(seed)
    model = transformers.HubertModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # LayerNorm / GroupNorm affine away from 1 / 0: a missing or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return config, model


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("layout", ["safetensors", "bin_weight_g"])
def test_native_hubert_equals_transformers(cfg, layout, tmp_path):
    from safetensors.torch import save_file

    config, model = _hf_model(cfg, 0)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    if layout == "safetensors":
        path = folder / "model.safetensors"
        save_file(state, str(path))
    else:   # older checkpoints: weight-norm factors as weight_g / weight_v, a pytorch_model.bin of tensors
        renamed = {k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
                    .replace("conv.parametrizations.weight.original1", "conv.weight_v"): v for k, v in state.items()}
        path = folder / "pytorch_model.bin"
        torch.save(renamed, path)
    out = import_encoder("hubert_ecg", path, tmp_path / "enc")
    backbone, spec, info = load_encoder(out)
    assert info["init_args"]["conv_stride"] == cfg["conv_stride"]
    assert info["extra"]["zoo"]["ignored_keys"] == ["masked_spec_embed"]
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        ref = model(x.reshape(2, -1)).last_hidden_state
        ours = backbone.forward_features(x)
        assert_matches(ours, ref)
        assert_matches(backbone.embed(x), ref.mean(1))


def test_what_the_weights_cannot_tell_comes_from_config_or_options(tmp_path):
    from safetensors.torch import save_file

    config, model = _hf_model(CONFIGS[0], 1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ZooImportError, match=r"hubert_ecg: conv_stride cannot be read from the weights.*config\.json"):
        import_encoder("hubert_ecg", path, tmp_path / "enc")
    out = import_encoder("hubert_ecg", path, tmp_path / "enc", conv_stride=[5, 2, 2], num_heads=4,
                         stable_layer_norm=False)
    backbone, _, _ = load_encoder(out)
    x = torch.randn(1, 12, 100)
    with torch.no_grad():
        assert_matches(backbone.embed(x), model(x.reshape(1, -1)).last_hidden_state.mean(1))
    # a classification wrapper: the HubertModel under a prefix, the head outside it is not imported
    wrapped = {f"hubert_ecg.{k}": v for k, v in model.state_dict().items()}
    wrapped["classifier.weight"] = torch.zeros(3, 32)
    torch.save(wrapped, tmp_path / "clf.bin")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    out2 = import_encoder("hubert_ecg", tmp_path / "clf.bin", tmp_path / "enc2")
    assert "classifier.weight" in json.loads((out2 / "encoder.json").read_text())["extra"]["zoo"]["ignored_keys"]
