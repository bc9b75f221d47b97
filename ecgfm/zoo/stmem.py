"""ST-MEM (bakqui/ST-MEM) checkpoints -> :class:`~ecgfm.backbones.stmem.StMemViT`.

The published encoder checkpoint is ``{"model": state_dict}`` of the authors' ``ST_MEM_ViT``. Every size argument
is read from tensor shapes except the number of attention heads (the q, k, v projection holds ``heads * dim_head``
rows, and any split fits): give ``num_heads``. Without it, the two published shapes (ViT-S: width 384, ViT-B: width
768, both 12 blocks with ``heads * dim_head == width``) are given the published heads (6 and 12 heads of 64); that
is an assumption, not read from the weights, so the import warns and the artifact records it under
``extra.zoo.assumed``.

Lead embeddings: ``lead_embeddings.{i}`` belongs to the checkpoint's input channel ``i`` (the authors' forward adds
embedding ``i`` to input row ``i``). By default the 12 channels are ST-MEM's order, which is ecgfm's canonical
order. A checkpoint trained on another channel order (HEEDB / MIMIC-IV-ECG store aVF before aVL) says so with
``checkpoint_leads`` (the lead of each row, all 12): the rows are put into the canonical order at import, so every
lead keeps the embedding it was trained with. ``leads`` is what the model reads: those leads of the canonical input,
in that order, each with its own embedding (so a subset or another order reads the same embeddings). ``leads``
naming all 12 in another order without ``checkpoint_leads`` is refused: the two readings give different models. A
checkpoint with another number of embeddings needs ``leads`` naming the lead of every embedding, in order.

Key layout (authors -> ecgfm)::

    pos_embedding (1, N+2, D)            -> pos_embed (N+2, D)
    sep_embedding (D)                    -> sep_embed (D)
    lead_embeddings.{l} (D)              -> lead_embed (L, D)             (stacked)
    to_patch_embedding.{1,2,3}.*         -> patch_embed.{0,1,2}.*         (LayerNorm, Linear, LayerNorm)
    block{i}.attn.norm.*                 -> blocks.{i}.norm1.*
    block{i}.attn.fn.to_qkv.*            -> blocks.{i}.attn.qkv.*
    block{i}.attn.fn.to_out.0.*          -> blocks.{i}.attn.proj.*        (absent when heads == 1, dim_head == D)
    block{i}.ff.norm.*                   -> blocks.{i}.norm2.*
    block{i}.ff.fn.net.{0,3}.*           -> blocks.{i}.mlp.fc{1,2}.*
    norm.*                               -> norm.*
    head.*  (fine-tuned models only)     -> the classifier head

A whole pretraining model (``encoder.*`` beside ``decoder*`` / ``mask_token``) imports its encoder part.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.zoo.base import (ImportedWeights, StateDict, ZooImportError, ZooKind, check_keys, head_of, indices,
                             leads_option, need)

KIND = "stmem"
BACKBONE = "stmem_vit"
#: How an ``inferred`` entry that is a guess (neither read from the weights nor given) begins.
ASSUMED = "assumed:"
# (width, attention width, depth) -> heads of the published sizes (models/encoder/st_mem_vit.py).
PUBLISHED_HEADS = {(384, 384, 12): (6, "ST-MEM ViT-S"), (768, 768, 12): (12, "ST-MEM ViT-B")}

_BLOCK_RULES = [  # (authors' suffix in block{i}., ecgfm suffix in blocks.{i}.)
    ("attn.norm.", "norm1."), ("attn.fn.to_qkv.", "attn.qkv."), ("attn.fn.to_out.0.", "attn.proj."),
    ("ff.norm.", "norm2."), ("ff.fn.net.0.", "mlp.fc1."), ("ff.fn.net.3.", "mlp.fc2."),
]
_PATCH_RULES = [("to_patch_embedding.1.", "patch_embed.0."), ("to_patch_embedding.2.", "patch_embed.1."),
                ("to_patch_embedding.3.", "patch_embed.2.")]


def _leads_option(options: Mapping[str, Any], num_leads: int) -> tuple[list[str] | None, str]:
    """The checked ``leads`` option and how the input leads were obtained (see the module docstring)."""
    leads = leads_option(KIND, options)
    if leads is None:
        if num_leads == len(CANONICAL_LEADS):
            return None, "12 lead embeddings: the canonical order I, II, III, aVR, aVL, aVF, V1-V6 (ST-MEM's)"
        raise ZooImportError(KIND, f"the checkpoint has {num_leads} lead embeddings: pass leads= (--leads) with the "
                                   f"{num_leads} canonical lead names it was trained on, in order")
    if len(leads) > num_leads:
        raise ZooImportError(KIND, f"leads= names {len(leads)} leads but the checkpoint has {num_leads} lead "
                                   f"embeddings")
    if num_leads != len(CANONICAL_LEADS):
        return leads, "option leads: the lead of every lead embedding, in order"
    if (len(leads) == num_leads and leads != list(CANONICAL_LEADS) and options.get("checkpoint_leads") is None):
        # two readings: the checkpoint's own channel order (embedding i is lead leads[i]), or merely the order to
        # read canonical leads in (each with its canonical embedding); they give different models
        raise ZooImportError(KIND, f"leads= names all 12 leads in another order ({leads}): if the checkpoint was "
                                   f"trained on that channel order (its lead_embeddings.i belongs to leads[i]), say "
                                   f"so with checkpoint_leads= (--checkpoint-leads) the same list; if not, leave "
                                   f"leads out (each lead takes its own embedding whatever the order)")
    return leads, "option leads: the leads read, in order, each with its own lead embedding"


def _checkpoint_rows(options: Mapping[str, Any], num_leads: int) -> tuple[list[int] | None, list[str] | None]:
    """``checkpoint_leads`` (the lead of each of a 12-embedding checkpoint's ``lead_embeddings`` rows, i.e. the
    channel order it was trained on): the canonical row of each checkpoint row, or None when canonical / not given.

    Raises:
        ZooImportError: not 12 distinct canonical names, or a checkpoint without 12 lead embeddings.
    """
    order = leads_option(KIND, options, key="checkpoint_leads")
    if order is None:
        return None, None
    if num_leads != len(CANONICAL_LEADS) or len(order) != num_leads:
        raise ZooImportError(KIND, f"checkpoint_leads names the lead of each of the checkpoint's 12 lead embeddings "
                                   f"(all 12, in the checkpoint's channel order); got {len(order)} for a checkpoint "
                                   f"with {num_leads}")
    if order == list(CANONICAL_LEADS):
        return None, order
    return [CANONICAL_LEADS.index(lead) for lead in order], order


def infer_args(state: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Constructor arguments of :class:`~ecgfm.backbones.stmem.StMemViT` from the authors' state dict."""
    pos = need(KIND, state, "pos_embedding", 3)
    n_pos, width = int(pos.shape[1]), int(pos.shape[2])
    patch_w = need(KIND, state, "to_patch_embedding.2.weight", 2)
    patch_size = int(patch_w.shape[1])
    num_leads = len(indices(state, r"lead_embeddings\.(\d+)$"))
    depth = len(indices(state, r"block(\d+)\."))
    if num_leads == 0 or depth == 0 or n_pos < 3:
        raise ZooImportError(KIND, f"found {num_leads} lead embeddings, {depth} blocks and a position table of "
                                   f"{n_pos} rows: not an ST-MEM encoder")
    qkv = need(KIND, state, "block0.attn.fn.to_qkv.weight", 2)
    inner = int(qkv.shape[0]) // 3
    mlp_dim = int(need(KIND, state, "block0.ff.fn.net.0.weight", 2).shape[0])
    inferred = {"seq_len": "rows of pos_embedding - 2, times patch_size", "patch_size": "to_patch_embedding.2",
                "num_leads": "count of lead_embeddings.*", "width": "pos_embedding", "depth": "count of block*",
                "mlp_dim": "block0.ff.fn.net.0", "qkv_bias": "presence of block0.attn.fn.to_qkv.bias"}
    heads = options.get("num_heads")
    if heads is None:
        published = PUBLISHED_HEADS.get((width, inner, depth))
        if published is None:
            raise ZooImportError(KIND, f"the number of attention heads cannot be read from the weights (to_qkv "
                                       f"holds heads * dim_head = {inner} rows per q, k, v): pass num_heads= "
                                       f"(--num-heads); the published sizes are ViT-S 6 heads, ViT-B 12 heads")
        heads = published[0]
        inferred["heads"] = (f"{ASSUMED} the published {published[1]} configuration ({heads} heads of "
                             f"{inner // heads}), not readable from the weights (any split of the attention width "
                             f"{inner} fits them); pass num_heads= (--num-heads) to override")
    else:
        heads, inferred["heads"] = int(heads), "option num_heads"
    if heads <= 0 or inner % heads:
        raise ZooImportError(KIND, f"num_heads={heads} does not divide the attention width {inner}")
    leads, inferred["input_leads"] = _leads_option(options, num_leads)
    args = dict(seq_len=(n_pos - 2) * patch_size, patch_size=patch_size, num_leads=num_leads, width=width,
                depth=depth, mlp_dim=mlp_dim, heads=heads, dim_head=inner // heads,
                qkv_bias="block0.attn.fn.to_qkv.bias" in state, input_leads=leads)
    inferred["dim_head"] = "attention width / heads"
    return args, inferred


def to_peer(native: Mapping[str, torch.Tensor]) -> StateDict:
    """An :class:`~ecgfm.backbones.stmem.StMemViT` state dict in the authors' key layout (inverse of
    :func:`from_peer`): used to check a checkpoint's keys and shapes, and by the tests."""
    out: StateDict = {}
    for k, v in native.items():
        if k == "pos_embed":
            out["pos_embedding"] = v[None]
        elif k == "sep_embed":
            out["sep_embedding"] = v
        elif k == "lead_embed":
            out.update({f"lead_embeddings.{i}": row for i, row in enumerate(v)})
        elif k.startswith("patch_embed."):
            out[next(a + k[len(b):] for a, b in _PATCH_RULES if k.startswith(b))] = v
        elif k.startswith("blocks."):
            i, rest = re.match(r"blocks\.(\d+)\.(.*)$", k).groups()
            out[f"block{i}." + next(a + rest[len(b):] for a, b in _BLOCK_RULES if rest.startswith(b))] = v
        else:  # norm.*
            out[k] = v
    return out


def from_peer(state: Mapping[str, torch.Tensor], num_leads: int) -> StateDict:
    """The authors' state dict in ecgfm's key layout (keys it does not know are left out)."""
    out: StateDict = {"pos_embed": state["pos_embedding"][0], "sep_embed": state["sep_embedding"],
                      "lead_embed": torch.stack([state[f"lead_embeddings.{i}"] for i in range(num_leads)])}
    for k, v in state.items():
        m = re.match(r"block(\d+)\.(.*)$", k)
        if m:
            rule = [b + m.group(2)[len(a):] for a, b in _BLOCK_RULES if m.group(2).startswith(a)]
            if rule:
                out[f"blocks.{m.group(1)}.{rule[0]}"] = v
        elif k.startswith("to_patch_embedding."):
            rule = [b + k[len(a):] for a, b in _PATCH_RULES if k.startswith(a)]
            if rule:
                out[rule[0]] = v
        elif k.startswith("norm."):
            out[k] = v
    return out


def _encoder_part(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """The encoder of a whole ST-MEM pretraining model (``encoder.*`` beside the decoder's keys), else ``state``."""
    if "sep_embedding" in state or "encoder.sep_embedding" not in state:
        return state, {}
    inner = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return inner, {k: "ST-MEM pretraining model outside the encoder (decoder, mask token)"
                   for k in state if not k.startswith("encoder.")}


def convert(state: StateDict, options: Mapping[str, Any]) -> ImportedWeights:
    """The authors' state dict (or a whole pretraining model) -> :class:`~ecgfm.zoo.base.ImportedWeights`.

    Guesses (the published heads) are listed in ``assumed`` (:func:`~ecgfm.zoo.load_peer` warns about each); a
    12-lead channel order given by ``leads`` has the lead embedding rows put into the canonical order (recorded in
    ``inferred["lead_embed"]``).

    Raises:
        ZooImportError: options or keys that do not fit the checkpoint.
    """
    state, outside = _encoder_part(state)
    args, inferred = infer_args(state, options)
    assumed = {k: v for k, v in inferred.items() if v.startswith(ASSUMED)}   # load_peer warns about each
    model = create_backbone(BACKBONE, **args)
    head = head_of(KIND, state, "head.", args["width"])  # a fine-tuned model: its head becomes the classifier head
    ignored = {f"head.{n}": "classification head (importable as a classifier)" for n in (head or {})}
    check_keys(KIND, to_peer(model.state_dict()), state, ignored)
    ignored.update(outside)
    native = from_peer(state, args["num_leads"])
    rows, order = _checkpoint_rows(options, args["num_leads"])
    if rows is not None:
        # lead_embeddings.i is the embedding of the checkpoint's channel i = lead order[i]: row
        # CANONICAL_LEADS.index(order[i]) of the native table, which StMemViT gives to that lead wherever it is read
        table = torch.empty_like(native["lead_embed"])
        table[rows] = native["lead_embed"]
        native["lead_embed"] = table
        inferred["lead_embed"] = (f"lead_embeddings.0-11 in the checkpoint's channel order {order} (option "
                                  f"checkpoint_leads), put into the canonical order {list(CANONICAL_LEADS)} at "
                                  f"import")
    return ImportedWeights(BACKBONE, args, native, head, inferred, ignored, assumed)


def preprocess(options: Mapping[str, Any]) -> PreprocessSpec:
    """ST-MEM's downstream pipeline (configs/downstream/st_mem.yaml, util/transforms.py): 250 Hz (Fourier
    resampling), 5th-order Butterworth high-pass 0.67 Hz then low-pass 40 Hz (``sosfiltfilt``), one standardisation
    over leads and time together, no clipping. ecgfm's record-scope standardisation pools the record's present leads
    only; ST-MEM's ``Standardize(axis=(-1, -2))`` takes the whole (12, T) array, zero rows of absent leads included
    (identical for complete 12-lead records; see the ``notes`` of :data:`SPEC`)."""
    return PreprocessSpec(fs=250.0, highpass=0.67, lowpass=40.0, notch=None, filter_order=5, normalize="zscore",
                          clip=None, resample_method="fourier", bandpass_mode="cascade", filter_design="sos",
                          normalize_scope="record")


def window(init_args: Mapping[str, Any], options: Mapping[str, Any]) -> int:
    return int(init_args["seq_len"])


def lead_order(init_args: Mapping[str, Any]) -> list[str]:
    leads = init_args.get("input_leads")
    return list(leads) if leads is not None else list(CANONICAL_LEADS[: int(init_args["num_leads"])])


SPEC = ZooKind(
    name=KIND, title="ST-MEM ViT encoder", container="model", signature="sep_embedding", convert=convert,
    preprocess=preprocess, window=window, lead_order=lead_order,
    provenance={
        "model": "ST-MEM (spatio-temporal masked electrocardiogram modeling), ViT encoder",
        "licence": "CC BY-NC 4.0 (code and weights; non-commercial use only)",
        "code": "https://github.com/bakqui/ST-MEM",
        "weights": "https://github.com/bakqui/ST-MEM (README: st_mem_vit_base encoder checkpoint)",
        "citation": "Na, Y., Park, M., Tae, Y., Joo, S. Guiding Masked Representation Learning to Capture "
                    "Spatio-Temporal Relationship of Electrocardiogram. ICLR 2024.",
        "notes": "ST-MEM filters and standardises each 9 s crop; ecgfm filters and standardises the whole record "
                 "and then cuts windows, which differs only near crop edges (identical on a record one window "
                 "long). ST-MEM's evaluation averages 3 crops; the probe averages sliding windows. ST-MEM's "
                 "standardisation (Standardize(axis=(-1, -2))) takes the whole (12, T) array, zero rows of absent "
                 "leads included; ecgfm's record-scope z-score uses the present leads only (identical for complete "
                 "12-lead records).",
    },
    options={"num_heads": "attention heads (not stored in the weights; without it the ViT-S / ViT-B shapes are "
                          "assumed to have the published 6 / 12 heads, with a warning)",
             "leads": "canonical lead names of the model's input channels, in order, each with its own lead "
                      "embedding (needed when the checkpoint has other than 12 embeddings: the lead of each)",
             "checkpoint_leads": "a 12-embedding checkpoint trained on another channel order: the lead of each "
                                 "lead_embeddings row, in order (e.g. HEEDB's I, II, III, aVR, aVF, aVL, V1-V6)"},
    # no default activation: the authors publish no head, and a fine-tuned one's loss is a config choice
    # (configs/downstream/st_mem.yaml: loss cross_entropy, i.e. softmax, by default; BCE is one line away)
    head_multilabel=None,
    head_multilabel_source="ST-MEM's downstream recipe (configs/downstream/st_mem.yaml) trains heads with "
                           "loss.name: cross_entropy (softmax) by default, but the loss is the fine-tuner's choice",
)
