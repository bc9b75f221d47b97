"""Write the HuBERT reference outputs that tests/unit/test_zoo_hubert.py compares ecgfm's native HubertECG with.

``transformers.HubertModel`` is the reference implementation of HuBERT-ECG, but importing ``transformers`` costs
every process that imports Lightning a few seconds (torchmetrics imports it eagerly when it is installed), so it is
not a test dependency: this script, run once where ``transformers`` is installed (``pip install transformers``),
stores small random models and what ``HubertModel`` computes on a fixed input, and the test compares with those.

    python scripts/make_hubert_reference.py                 # writes tests/data/hubert_ecg/<config>/
    python scripts/make_hubert_reference.py --check         # recompute with the installed transformers, compare

Each folder: ``config.json`` (what ``HubertConfig.save_pretrained`` writes: ``to_json_string(use_diff=True)``, the
keys that differ from the base ``PretrainedConfig``, which is every HuBERT key), ``model.safetensors`` (the model's weights, LayerNorm /
GroupNorm affine moved away from 1 / 0 so a missing or misplaced norm shows) and ``reference.safetensors``
(``x (2, 12, 250)`` and ``x1 (1, 12, 100)`` inputs, ``last_hidden_state`` of each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "hubert_ecg"

#: the two small configurations: GroupNorm feature encoder, post-norm, even position kernel, no conv bias; and
#: LayerNorm feature encoder, pre-norm ("stable layer norm"), odd position kernel, conv bias
CONFIGS = {
    "group_postnorm": dict(conv_dim=[16, 24, 24], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], conv_bias=False,
                           feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=16),
    "layer_prenorm": dict(conv_dim=[16, 16], conv_kernel=[7, 3], conv_stride=[3, 2], conv_bias=True,
                          feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=9),
}
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              num_conv_pos_embedding_groups=4)


def build(name: str, seed: int = 0):
    """``(HubertConfig, HubertModel)`` of configuration ``name`` with seeded random weights (norms perturbed)."""
    import transformers

    config = transformers.HubertConfig(**COMMON, **CONFIGS[name])
    torch.manual_seed(seed)
    model = transformers.HubertModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return config, model


def inputs() -> dict[str, torch.Tensor]:
    """The fixed inputs: ``x (2, 12, 250)``, ``x1 (1, 12, 100)``."""
    g = torch.Generator().manual_seed(1234)
    return {"x": torch.randn(2, 12, 250, generator=g), "x1": torch.randn(1, 12, 100, generator=g)}


def outputs(model, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``last_hidden_state`` of each input (leads concatenated in time, as HuBERT-ECG reads a 12-lead record)."""
    with torch.no_grad():
        return {f"{k}_out": model(v.reshape(v.shape[0], -1)).last_hidden_state.contiguous() for k, v in xs.items()}


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare the stored references with the installed "
                                                         "transformers instead of writing them")
    args = ap.parse_args(argv)
    bad = 0
    for name in CONFIGS:
        config, model = build(name)
        folder = OUT / name
        if args.check:
            import transformers

            stored = load_file(str(folder / "reference.safetensors"))
            model = transformers.HubertModel(transformers.HubertConfig.from_json_file(str(folder / "config.json")))
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            got = outputs(model.eval(), {k: stored[k] for k in ("x", "x1")})
            for k, v in got.items():
                diff = float((v - stored[k]).abs().max())
                print(f"{name}: {k} max |diff| {diff:.2e}")
                bad += diff > 1e-5
            continue
        folder.mkdir(parents=True, exist_ok=True)
        # what HubertConfig.save_pretrained writes (use_diff: the keys that differ from PretrainedConfig's defaults,
        # i.e. every HuBERT key)
        (folder / "config.json").write_text(config.to_json_string(use_diff=True))
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
        xs = inputs()
        save_file({**xs, **outputs(model, xs)}, str(folder / "reference.safetensors"),
                  metadata={"transformers": __import__("transformers").__version__, "torch": torch.__version__})
        print(f"wrote {folder}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
