"""ECGFounder (PKUDigitalHealth/ECGFounder) checkpoints -> :class:`~ecgfm.backbones.net1d.Net1D` (+ its head).

The published checkpoint is ``{"state_dict": state_dict}`` of the authors' ``Net1D`` (``dense`` is the
150-label classification layer). Read from tensor shapes: input channels, stem width and kernel width, the stage
widths and block counts, the bottleneck ratio, the groups of every stage (hence ``groups_width``) and the number of
classes. Not in the weights, so options with the published values as defaults: ``stride`` (2) and ``use_bn``
(default: True only when a BatchNorm layer has tracked batches, i.e. was trained; the published model has
``use_bn=False``, and its BatchNorm tensors are then never used and are not imported; a file with BatchNorm
tensors but no ``num_batches_tracked`` counters is refused until ``use_bn`` is given).

Key layout (authors -> ecgfm)::

    first_conv.conv.*                          -> stem.conv.*
    first_bn.*                                 -> stem.bn.*                 (only with use_bn)
    stage_list.{i}.block_list.{j}.conv{n}.conv.* -> stages.{i}.{j}.conv{n}.*
    stage_list.{i}.block_list.{j}.bn{n}.*      -> stages.{i}.{j}.bn{n}.*    (only with use_bn)
    stage_list.{i}.block_list.{j}.se_fc{n}.*   -> stages.{i}.{j}.se.fc{n}.*
    dense.*                                    -> the classifier head
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.zoo.base import (ImportedWeights, StateDict, ZooImportError, ZooKind, check_keys, head_of, indices,
                             leads_option, need, positive_option, window_samples)

KIND = "ecgfounder"
BACKBONE = "net1d"
_BLOCK = re.compile(r"stage_list\.(\d+)\.block_list\.(\d+)\.(.*)$")


def _groups_width(widths: list[int], groups: list[int]) -> int:
    """The ``groups_width`` for which ``width // groups_width == groups`` in every stage (the largest such)."""
    lo, hi = 0.0, math.inf  # groups_width must lie in (width / (groups + 1), width / groups] for every stage
    for c, g in zip(widths, groups):
        lo, hi = max(lo, c / (g + 1)), min(hi, c / g)
    gw = math.floor(hi)
    if not gw > lo or any(c // gw != g for c, g in zip(widths, groups)):
        raise ZooImportError(KIND, f"no groups_width gives the grouped convolutions' groups {groups} for stage "
                                   f"widths {widths} (groups = width // groups_width in Net1D)")
    return gw


def infer_args(state: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Constructor arguments of :class:`~ecgfm.backbones.net1d.Net1D` from the authors' state dict."""
    stem = need(KIND, state, "first_conv.conv.weight", 3)
    base_filters, in_channels, kernel_size = (int(n) for n in stem.shape)
    stages = indices(state, r"stage_list\.(\d+)\.")
    if not stages or stages != list(range(len(stages))):
        raise ZooImportError(KIND, f"stage indices {stages} are not 0..n-1: not a Net1D state dict")
    widths, blocks, groups, ratios = [], [], [], set()
    for i in stages:
        n = indices(state, rf"stage_list\.{i}\.block_list\.(\d+)\.")
        if n != list(range(len(n))):
            raise ZooImportError(KIND, f"stage {i}: block indices {n} are not 0..m-1")
        pre = f"stage_list.{i}.block_list.0."
        conv1, conv2 = need(KIND, state, pre + "conv1.conv.weight", 3), need(KIND, state, pre + "conv2.conv.weight", 3)
        width = int(need(KIND, state, pre + "conv3.conv.weight", 3).shape[0])
        mid = int(conv1.shape[0])
        widths.append(width)
        blocks.append(len(n))
        groups.append(mid // int(conv2.shape[1]))
        ratios.add(mid / width)
    ratio = ratios.pop() if len(ratios) == 1 else None
    if ratio is None or any(int(w * ratio) != int(need(KIND, state, f"stage_list.{i}.block_list.0.conv1.conv.weight")
                                                   .shape[0]) for i, w in zip(stages, widths)):
        raise ZooImportError(KIND, f"the bottleneck widths do not follow one ratio (found {sorted(ratios)})")
    counters = [int(v) for k, v in state.items() if k.endswith("num_batches_tracked")]
    trained_bn = any(n > 0 for n in counters)
    has_bn = any(".bn" in k or k.startswith("first_bn.") for k in state)
    if options.get("use_bn") is None and has_bn and not counters:
        # a converted file without the counters: whether its BatchNorm ran is not in the weights, and guessing
        # "no" would silently drop trained layers
        raise ZooImportError(KIND, "the checkpoint holds BatchNorm tensors but no num_batches_tracked counters, so "
                                   "whether the model used BatchNorm cannot be read from it: pass use_bn=True or "
                                   "False (--use-bn / --no-bn)")
    use_bn = bool(options["use_bn"]) if options.get("use_bn") is not None else trained_bn
    leads = leads_option(KIND, options)
    if leads is None and in_channels != len(CANONICAL_LEADS):
        if in_channels == 1:
            leads = ["I"]
        else:
            raise ZooImportError(KIND, f"the checkpoint has {in_channels} input channels: pass leads= (--leads) "
                                       f"with their canonical lead names, in order")
    if leads is not None and len(leads) != in_channels:
        raise ZooImportError(KIND, f"leads= names {len(leads)} leads but the checkpoint has {in_channels} input "
                                   f"channels")
    args = dict(in_channels=in_channels, base_filters=base_filters, ratio=float(ratio), filter_list=widths,
                m_blocks_list=blocks, kernel_size=kernel_size, stride=positive_option(KIND, options, "stride", 2, True),
                groups_width=_groups_width(widths, groups), use_bn=use_bn, use_do=bool(options.get("use_do", False)),
                input_leads=leads)
    inferred = {"in_channels": "first_conv.conv.weight", "base_filters": "first_conv.conv.weight",
                "kernel_size": "first_conv.conv.weight", "filter_list": "conv3 of each stage",
                "m_blocks_list": "count of block_list.* per stage", "ratio": "conv1 / conv3 widths",
                "groups_width": "groups of each stage's conv2",
                "stride": "option stride" if options.get("stride") is not None else
                          "ECGFounder's value (2; not in the weights)",
                "use_bn": "option use_bn" if options.get("use_bn") is not None else
                          f"num_batches_tracked {'> 0' if trained_bn else '== 0 (BatchNorm never run)'}",
                "input_leads": "option leads" if options.get("leads") is not None else
                               ("1 input channel: lead I (ECGFounder's single-lead model)" if in_channels == 1 else
                                "12 input channels: I, II, III, aVR, aVL, aVF, V1-V6 (ECGFounder's order)")}
    return args, inferred


def to_peer(native: Mapping[str, torch.Tensor]) -> StateDict:
    """A :class:`~ecgfm.backbones.net1d.Net1D` state dict in the authors' key layout (inverse of
    :func:`from_peer`)."""
    out: StateDict = {}
    for k, v in native.items():
        if k.startswith("stem.conv."):
            out["first_conv.conv." + k[len("stem.conv."):]] = v
        elif k.startswith("stem.bn."):
            out["first_bn." + k[len("stem.bn."):]] = v
        else:
            i, j, rest = re.match(r"stages\.(\d+)\.(\d+)\.(.*)$", k).groups()
            rest = re.sub(r"^(conv\d)\.", r"\1.conv.", rest)
            rest = re.sub(r"^se\.fc(\d)\.", r"se_fc\1.", rest)
            out[f"stage_list.{i}.block_list.{j}.{rest}"] = v
    return out


def from_peer(state: Mapping[str, torch.Tensor], use_bn: bool) -> StateDict:
    """The authors' state dict in ecgfm's key layout (``dense``, unknown keys and, without ``use_bn``, the unused
    BatchNorm tensors are left out)."""
    out: StateDict = {}
    for k, v in state.items():
        if k.startswith("first_conv.conv."):
            out["stem.conv." + k[len("first_conv.conv."):]] = v
        elif k.startswith("first_bn.") and use_bn:
            out["stem.bn." + k[len("first_bn."):]] = v
        elif m := _BLOCK.match(k):
            i, j, rest = m.groups()
            if re.match(r"bn\d\.", rest) and not use_bn:
                continue
            rest = re.sub(r"^(conv\d)\.conv\.", r"\1.", rest)
            rest = re.sub(r"^se_fc(\d)\.", r"se.fc\1.", rest)
            out[f"stages.{i}.{j}.{rest}"] = v
    return out


def convert(state: StateDict, options: Mapping[str, Any]) -> ImportedWeights:
    args, inferred = infer_args(state, options)
    if args["use_bn"]:  # a converted file without the counters (use_bn given): they are bookkeeping, not weights
        state = {**{k[: -len("running_mean")] + "num_batches_tracked": torch.tensor(0) for k in state
                    if k.endswith(".running_mean")}, **state}
    model = create_backbone(BACKBONE, **args)
    ignored: dict[str, str] = {}
    if not args["use_bn"]:
        ignored.update({k: "BatchNorm of a model built with use_bn=False (never used by its forward)"
                        for k in state if k.startswith("first_bn.") or
                        ((m := _BLOCK.match(k)) is not None and re.match(r"bn\d\.", m.group(3)))})
    head = head_of(KIND, state, "dense.", model.num_features)
    ignored.update({f"dense.{n}": "classification layer (importable as a classifier)" for n in (head or {})})
    check_keys(KIND, to_peer(model.state_dict()), state, ignored)
    return ImportedWeights(BACKBONE, args, from_peer(state, args["use_bn"]), head, inferred, ignored)


def preprocess(options: Mapping[str, Any]) -> PreprocessSpec:
    """ECGFounder's pipeline (util.py ``filter_bandpass`` + the datasets' z-score): 500 Hz; 50 Hz notch (Q 30)
    first, then a 4th-order Butterworth band-pass 0.67-40 Hz, both with ``filtfilt`` on ``(b, a)`` coefficients;
    baseline removed with a 0.4 s running median; one z-score over all leads and time; no clipping."""
    return PreprocessSpec(fs=500.0, highpass=0.67, lowpass=40.0, notch=50.0, notch_q=30.0, notch_first=True,
                          filter_order=4, filter_design="ba", bandpass_mode="bandpass", median_baseline=0.4,
                          normalize="zscore", normalize_scope="record", clip=None)


def window(init_args: Mapping[str, Any], options: Mapping[str, Any]) -> int:
    return window_samples(KIND, options, 10.0, 500.0)


def lead_order(init_args: Mapping[str, Any]) -> list[str]:
    leads = init_args.get("input_leads")
    return list(leads) if leads is not None else list(CANONICAL_LEADS)


SPEC = ZooKind(
    name=KIND, title="ECGFounder Net1D", container="state_dict", signature="first_conv.conv.weight",
    convert=convert, preprocess=preprocess, window=window, lead_order=lead_order,
    provenance={
        "model": "ECGFounder (Net1D trained on the Harvard-Emory ECG Database, 150 labels)",
        "licence": "MIT (code and weights)",
        "code": "https://github.com/PKUDigitalHealth/ECGFounder",
        "weights": "https://huggingface.co/PKUDigitalHealth/ECGFounder (12_lead_ECGFounder.pth, "
                   "1_lead_ECGFounder.pth)",
        "citation": "Li, J., Aguirre, A. D., Moura, J., et al., Hong, S. An electrocardiogram foundation model "
                    "built on over 10 million recordings with external evaluation across multiple domains. "
                    "NEJM AI 2025.",
        "notes": "HEEDB stores leads as I, II, III, aVR, aVF, aVL, V1-V6; ECGFounder's code reorders them to I, II, "
                 "III, aVR, aVL, aVF, V1-V6, which is ecgfm's canonical order. The z-score divides by std + 1e-8 "
                 "(ecgfm: max(std, 1e-6)); its whole-record z-score includes absent (zero) leads, ecgfm's only "
                 "the present ones.",
    },
    options={"stride": "downsampling stride of each stage (not in the weights; ECGFounder: 2)",
             "use_bn": "BatchNorm on/off (default: on only when the BatchNorm layers tracked batches)",
             "use_do": "dropout in the blocks when fine-tuning (ECGFounder: off)",
             "leads": "canonical lead names of the input channels (default: 12 canonical leads, or I for 1)",
             "window_seconds": "model input length in seconds at 500 Hz (ECGFounder: 10)"},
    # the peer's code fixes it: every head is trained with BCEWithLogitsLoss and read with torch.sigmoid
    head_multilabel=True,
    head_multilabel_source="ECGFounder's code: heads trained with nn.BCEWithLogitsLoss and read with torch.sigmoid "
                           "(MIMIC_finetune_template.py); the released dense layer scores 150 independent labels",
)
