"""HuBERT-ECG (Hugging Face ``HubertModel`` layout) -> :class:`~ecgfm.backbones.hubert.HubertECG`.

The published models (Edoardo-BS/hubert-ecg-{small,base,large}) are Hugging Face folders: ``config.json`` beside
``model.safetensors`` or ``pytorch_model.bin``. Sizes are read from tensor shapes; what the weights cannot tell
(the convolution strides, the attention heads, pre- or post-norm layers, activations, LayerNorm eps) comes from
``config.json`` beside the checkpoint (plain JSON, read as data; the ``auto_map`` remote code it names is never run)
or from options (``num_heads``, ``conv_stride``, ``stable_layer_norm``, ``feat_extract_norm``), and an import without
either fails naming what is missing. ``feat_extract_norm`` is read from the weights when the feature encoder has
two or more convolutions (a LayerNorm in every layer, or a GroupNorm in the first only); with a single convolution
the two leave tensors of the same shapes, so it comes from ``config.json`` or the option.

Key layout (Hugging Face -> ecgfm)::

    feature_extractor.conv_layers.{i}.{conv,layer_norm}.*   -> feature_extractor.{i}.{conv,layer_norm}.*
    feature_projection.layer_norm.* / .projection.*         -> feat_proj_norm.* / feat_proj.*
    encoder.pos_conv_embed.conv.{weight_g,weight_v,bias}    -> pos_conv_g, pos_conv_v, pos_conv_bias
      (or .conv.parametrizations.weight.original{0,1})
    encoder.layer_norm.*                                    -> layer_norm.*
    encoder.layers.{i}.attention.{q,k,v,out}_proj.*         -> blocks.{i}.{q,k,v,out}_proj.*
    encoder.layers.{i}.layer_norm.* / .final_layer_norm.*   -> blocks.{i}.layer_norm.* / .final_layer_norm.*
    encoder.layers.{i}.feed_forward.{intermediate,output}_dense.* -> blocks.{i}.fc{1,2}.*
    masked_spec_embed, final_proj*, label_embedding(s)*     -> not imported (pretraining only; HuBERT-ECG's own
                                                               HuBERTECG class has final_proj.{i}, label_embedding.{i})
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.zoo.base import (ImportedWeights, StateDict, ZooImportError, ZooKind, check_keys, indices, need,
                            positive_number, window_samples)

KIND = "hubert_ecg"
BACKBONE = "hubert_ecg"
_POS_NEW = ("encoder.pos_conv_embed.conv.parametrizations.weight.original0",
            "encoder.pos_conv_embed.conv.parametrizations.weight.original1")
_POS_OLD = ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v")
# HubertForPreTraining-style models name it label_embeddings, HuBERT-ECG's HuBERTECG class label_embedding.{i}
_PRETRAINING = re.compile(r"^(masked_spec_embed|final_proj|label_embeddings?)")
_LAYER_RULES = [("attention.q_proj.", "q_proj."), ("attention.k_proj.", "k_proj."), ("attention.v_proj.", "v_proj."),
                ("attention.out_proj.", "out_proj."), ("layer_norm.", "layer_norm."),
                ("final_layer_norm.", "final_layer_norm."), ("feed_forward.intermediate_dense.", "fc1."),
                ("feed_forward.output_dense.", "fc2.")]


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, str]]:
    """Keys of the ``HubertModel`` inside a wrapper (e.g. ``hubert_ecg.`` of a classification model); the keys
    outside it are returned as ignored."""
    anchor = "feature_projection.projection.weight"
    prefix = next((k[: -len(anchor)] for k in state if k.endswith(anchor)), "")
    if not prefix:
        return dict(state), {}
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = {k: f"outside the HubertModel (prefix {prefix!r}): a task head" for k in state
               if not k.startswith(prefix)}
    return inner, outside


def _config(options: Mapping[str, Any]) -> dict[str, Any]:
    path = options.get("config")
    if path is None:
        return {}
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZooImportError(KIND, f"cannot read the model configuration {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ZooImportError(KIND, f"{path}: expected a JSON object")
    return cfg


def _feat_extract_norm(options: Mapping[str, Any], cfg: Mapping[str, Any], n_conv: int, has_layer_ln: bool,
                       inferred: dict[str, str]) -> str:
    """``group`` or ``layer``: from the weights when they tell (two or more convolutions: a LayerNorm in the second
    layer or not), else from the option ``feat_extract_norm`` or ``config.json`` (one without the key: Hugging
    Face's default ``group``).

    Raises:
        ZooImportError: a value other than ``group`` / ``layer``, a stated value the weights contradict, or a
            single convolution with neither the option nor a config.json (a GroupNorm with one group per channel
            and a LayerNorm over channels have weights of the same shapes).
    """
    from_weights = ("layer" if has_layer_ln else "group") if n_conv > 1 else None
    stated, where = None, None
    for value, source in ((options.get("feat_extract_norm"), "option feat_extract_norm"),
                          (cfg.get("feat_extract_norm"), "config.json")):
        if value is not None:
            stated, where = value, source
            break
    if stated is not None and stated not in ("group", "layer"):
        raise ZooImportError(KIND, f"{where}: feat_extract_norm must be 'group' or 'layer', got {stated!r}")
    if from_weights is not None:
        if stated is not None and stated != from_weights:
            raise ZooImportError(KIND, f"{where} says feat_extract_norm={stated!r} but the weights have "
                                       f"{'a LayerNorm in every' if has_layer_ln else 'no LayerNorm after the first'}"
                                       f" feature-encoder layer, i.e. {from_weights!r}")
        inferred["feat_extract_norm"] = "feature_extractor.conv_layers.1.layer_norm present or not"
        return from_weights
    if stated is None and cfg:   # a config.json without the key: HubertConfig's default, as transformers reads it
        inferred["feat_extract_norm"] = "config.json without feat_extract_norm: HubertConfig's default ('group')"
        return "group"
    if stated is None:
        raise ZooImportError(KIND, "feat_extract_norm cannot be read from the weights of a single-convolution "
                                   "feature encoder (a GroupNorm with one group per channel and a LayerNorm over "
                                   "channels have weights of the same shape): put the model's config.json beside the "
                                   "checkpoint (or pass config=) or pass feat_extract_norm='group' or 'layer' "
                                   "(--feat-extract-norm)")
    inferred["feat_extract_norm"] = where
    return str(stated)


def infer_args(state: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Constructor arguments of :class:`~ecgfm.backbones.hubert.HubertECG` from a ``HubertModel`` state dict,
    ``config.json`` (``options["config"]``) and the options.

    Raises:
        ZooImportError: what the weights cannot tell is neither in ``config.json`` nor an option, or a value of
            the wrong type, naming the option or the config.json entry: ``conv_stride`` not a list of positive
            whole numbers (one per convolution), ``num_attention_heads`` not a positive whole number dividing the
            hidden size, ``do_stable_layer_norm`` not a bool, ``layer_norm_eps`` not a positive number, an
            activation that is not a name.
    """
    cfg = _config(options)
    n_conv = len(indices(state, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight"))
    if n_conv == 0:
        raise ZooImportError(KIND, f"no feature_extractor.conv_layers.*.conv.weight: not a HubertModel state dict; "
                                   f"first keys: {list(state)[:5]}")
    convs = [need(KIND, state, f"feature_extractor.conv_layers.{i}.conv.weight", 3) for i in range(n_conv)]
    proj = need(KIND, state, "feature_projection.projection.weight", 2)
    pos_keys = _POS_NEW if _POS_NEW[1] in state else _POS_OLD
    pos_v = need(KIND, state, pos_keys[1], 3)
    hidden = int(proj.shape[0])
    n_layers = len(indices(state, r"encoder\.layers\.(\d+)\."))
    inner = int(need(KIND, state, "encoder.layers.0.feed_forward.intermediate_dense.weight", 2).shape[0])
    has_layer_ln = "feature_extractor.conv_layers.1.layer_norm.weight" in state
    inferred = {"conv_dim / conv_kernel": "feature_extractor conv weights", "hidden_size": "feature_projection",
                "num_hidden_layers": "count of encoder.layers.*", "intermediate_size": "intermediate_dense",
                "num_conv_pos_embeddings / groups": "pos_conv_embed weight_v"}

    sources: dict[str, str] = {}   # where each picked value came from, for the messages

    def pick(name: str, option: str | None, cfg_key: str, default: Any = None, required: bool = False) -> Any:
        if option is not None and options.get(option) is not None:
            inferred[name] = f"option {option}"
            sources[name] = f"option {option} (--{option.replace('_', '-')})"
            return options[option]
        if cfg_key in cfg:
            inferred[name] = "config.json"
            sources[name] = f"{options.get('config')}: {cfg_key}"
            return cfg[cfg_key]
        if required:
            raise ZooImportError(KIND, f"{name} cannot be read from the weights: put the model's config.json beside "
                                       f"the checkpoint (or pass config=) or pass {option}= "
                                       f"(--{option.replace('_', '-')})")
        inferred[name] = f"Hugging Face default ({default})"
        sources[name] = name
        return default

    def positive_ints(name: str, value: Any) -> list[int]:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
            raise ZooImportError(KIND, f"{sources[name]} must be a list of positive whole numbers (one per "
                                       f"feature-encoder convolution), got {type(value).__name__} {value!r}")
        return [positive_number(KIND, v, f"{sources[name]} (each entry)", integer=True) for v in value]

    def checked(name: str, value: Any, kind: type, what: str) -> Any:
        if not isinstance(value, kind):
            raise ZooImportError(KIND, f"{sources[name]} must be {what}, got {type(value).__name__} {value!r}")
        return value

    norm = _feat_extract_norm(options, cfg, n_conv, has_layer_ln, inferred)
    stride = positive_ints("conv_stride", pick("conv_stride", "conv_stride", "conv_stride", required=True))
    if len(stride) != n_conv:
        raise ZooImportError(KIND, f"{sources['conv_stride']} has {len(stride)} entries but the checkpoint has "
                                   f"{n_conv} feature-encoder convolutions")
    heads = pick("num_attention_heads", "num_heads", "num_attention_heads", required=True)
    heads = positive_number(KIND, heads, sources["num_attention_heads"], integer=True)
    stable = checked("do_stable_layer_norm", pick("do_stable_layer_norm", "stable_layer_norm",
                                                  "do_stable_layer_norm", required=True), bool, "true or false")
    eps = pick("layer_norm_eps", None, "layer_norm_eps", 1e-5)
    eps = positive_number(KIND, eps, sources["layer_norm_eps"])
    acts = {name: checked(name, pick(name, None, name, "gelu"), str, "an activation name")
            for name in ("feat_extract_activation", "hidden_act")}
    args = dict(conv_dim=[int(c.shape[0]) for c in convs], conv_kernel=[int(c.shape[-1]) for c in convs],
                conv_stride=stride, conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
                feat_extract_norm=norm, feat_extract_activation=acts["feat_extract_activation"],
                feat_proj_layer_norm="feature_projection.layer_norm.weight" in state, hidden_size=hidden,
                num_hidden_layers=n_layers, num_attention_heads=heads,
                intermediate_size=inner, hidden_act=acts["hidden_act"],
                num_conv_pos_embeddings=int(pos_v.shape[-1]),
                num_conv_pos_embedding_groups=hidden // int(pos_v.shape[1]),
                do_stable_layer_norm=stable, layer_norm_eps=eps, input_leads=None)
    if cfg.get("conv_pos_batch_norm"):
        raise ZooImportError(KIND, "conv_pos_batch_norm=True (a BatchNorm before the position convolution) is not "
                                   "supported")
    if hidden % heads:
        raise ZooImportError(KIND, f"{sources['num_attention_heads']}: num_attention_heads={heads} does not divide "
                                   f"hidden_size {hidden}")
    return args, inferred


def to_peer(native: Mapping[str, torch.Tensor], new_style: bool = True) -> StateDict:
    """A :class:`~ecgfm.backbones.hubert.HubertECG` state dict in Hugging Face's key layout (``new_style``: the
    weight-norm factors as ``parametrizations.weight.original{0,1}``, else ``weight_g`` / ``weight_v``)."""
    g_key, v_key = _POS_NEW if new_style else _POS_OLD
    out: StateDict = {}
    for k, v in native.items():
        if k.startswith("feature_extractor."):
            out["feature_extractor.conv_layers." + k[len("feature_extractor."):]] = v
        elif k.startswith("feat_proj_norm."):
            out["feature_projection.layer_norm." + k[len("feat_proj_norm."):]] = v
        elif k.startswith("feat_proj."):
            out["feature_projection.projection." + k[len("feat_proj."):]] = v
        elif k == "pos_conv_g":
            out[g_key] = v
        elif k == "pos_conv_v":
            out[v_key] = v
        elif k == "pos_conv_bias":
            out["encoder.pos_conv_embed.conv.bias"] = v
        elif k.startswith("layer_norm."):
            out["encoder." + k] = v
        else:
            i, rest = re.match(r"blocks\.(\d+)\.(.*)$", k).groups()
            out[f"encoder.layers.{i}." + next(a + rest[len(b):] for a, b in _LAYER_RULES if rest.startswith(b))] = v
    return out


def from_peer(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A ``HubertModel`` state dict in ecgfm's key layout (pretraining-only keys left out)."""
    g_key, v_key = _POS_NEW if _POS_NEW[1] in state else _POS_OLD
    out: StateDict = {}
    for k, v in state.items():
        if k in (g_key, v_key, "encoder.pos_conv_embed.conv.bias"):
            out[{g_key: "pos_conv_g", v_key: "pos_conv_v"}.get(k, "pos_conv_bias")] = v
        elif m := re.match(r"feature_extractor\.conv_layers\.(.*)$", k):
            out["feature_extractor." + m.group(1)] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)$", k):
            rule = [b + m.group(2)[len(a):] for a, b in _LAYER_RULES if m.group(2).startswith(a)]
            if rule:
                out[f"blocks.{m.group(1)}.{rule[0]}"] = v
        elif k.startswith("feature_projection.layer_norm."):
            out["feat_proj_norm." + k[len("feature_projection.layer_norm."):]] = v
        elif k.startswith("feature_projection.projection."):
            out["feat_proj." + k[len("feature_projection.projection."):]] = v
        elif k.startswith("encoder.layer_norm."):
            out[k[len("encoder."):]] = v
    return out


def convert(state: StateDict, options: Mapping[str, Any]) -> ImportedWeights:
    state, ignored = _strip_prefix(state)
    ignored.update({k: "pretraining only (masked-frame embedding / cluster prediction heads)"
                    for k in state if _PRETRAINING.match(k)})
    args, inferred = infer_args(state, options)
    model = create_backbone(BACKBONE, **args)
    check_keys(KIND, to_peer(model.state_dict(), new_style=_POS_NEW[1] in state), state, ignored)
    return ImportedWeights(BACKBONE, args, from_peer(state), None, inferred, ignored)


def preprocess(options: Mapping[str, Any]) -> PreprocessSpec:
    """The closest ecgfm pipeline to HuBERT-ECG's (see docs/ZOO.md for what differs): 100 Hz, zero-phase
    band-pass 0.05-47 Hz, every lead rescaled to [-1, 1]."""
    return PreprocessSpec(fs=100.0, highpass=0.05, lowpass=47.0, notch=None, filter_order=4, normalize="range",
                          clip=None)


def window(init_args: Mapping[str, Any], options: Mapping[str, Any]) -> int:
    return window_samples(KIND, options, 5.0, 100.0)


def lead_order(init_args: Mapping[str, Any]) -> list[str]:
    return list(CANONICAL_LEADS)


SPEC = ZooKind(
    name=KIND, title="HuBERT-ECG (Hugging Face HubertModel)", container=None,
    signature="feature_projection.projection.weight", convert=convert, preprocess=preprocess, window=window,
    lead_order=lead_order,
    provenance={
        "model": "HuBERT-ECG (HuBERT pretrained on 9.1 M 12-lead ECGs), encoder",
        "licence": "CC BY-NC 4.0 (weights on Hugging Face, Edoardo-BS)",
        "code": "https://github.com/Edoar-do/HuBERT-ECG",
        "weights": "https://huggingface.co/Edoardo-BS (hubert-ecg-small / -base / -large)",
        "citation": "Coppola, E., Savardi, M., Massussi, M., et al. HuBERT-ECG as a self-supervised foundation "
                    "model for broad and scalable cardiac applications. medRxiv 2024.11.14.24317328.",
        "notes": "preprocessing is approximated (docs/ZOO.md): HuBERT-ECG filters with a FIR band-pass at the "
                 "source rate, rescales every lead to [-1, 1] and downsamples to 100 Hz.",
    },
    options={"config": "path of the model's config.json (default: config.json beside the checkpoint)",
             "num_heads": "attention heads (else from config.json)",
             "conv_stride": "feature-encoder strides (else from config.json)",
             "stable_layer_norm": "pre-norm transformer layers (else from config.json)",
             "feat_extract_norm": "'group' or 'layer' normalisation in the feature encoder (read from the weights "
                                  "unless it has a single convolution; else from config.json)",
             "window_seconds": "input window in seconds at 100 Hz (HuBERT-ECG: 5)"},
)
