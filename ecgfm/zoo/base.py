"""Plumbing shared by the importers: reading a checkpoint without unpickling code, the error type, the kind
description, and key bookkeeping (missing / unexpected keys)."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS


class ZooImportError(ValueError):
    """A checkpoint cannot be imported as the requested kind; the message names the kind and what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ImportedWeights:
    """What an importer makes of a peer state dict.

    Attributes:
        backbone: registered backbone name.
        init_args: its constructor arguments (complete for the architecture; the registry fills the rest).
        state: the backbone's state dict in ecgfm's key layout.
        head: ``{"weight", "bias"}`` of the peer's classification layer, when the checkpoint has one.
        inferred: how each architecture argument was obtained (``"shape of <key>"``, ``"option"``, ...).
        ignored: peer keys that are read but not used (with the reason), e.g. BatchNorm buffers of a model built
            with ``use_bn=False``, which its forward never touches.
        assumed: the arguments that were neither read from the weights nor given (a guess, e.g. the published
            configuration's number of attention heads), with what was assumed and how to override it. The importer
            warns about each and writes them to the artifact (``extra.zoo.assumed``).
    """

    backbone: str
    init_args: dict[str, Any]
    state: StateDict
    head: StateDict | None = None
    inferred: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    assumed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ZooKind:
    """One importable family of published models.

    Attributes:
        name: the ``KIND`` on the command line.
        title: human name of the model.
        container: key of the state dict in the checkpoint dict (None: the file is the state dict).
        signature: a key every checkpoint of this kind has (used to recognise a checkpoint of another kind).
        convert: ``(state, options) -> ImportedWeights``; raises :class:`ZooImportError`.
        preprocess: ``options -> PreprocessSpec`` of the peer's downstream pipeline.
        window: ``(init_args, options) -> samples`` of one model input at ``preprocess.fs``.
        lead_order: ``init_args -> lead names`` of the model's input channels.
        provenance: licence, citation, code and weights URLs (plain data).
        options: option name -> help text (what the state dict cannot tell).
        head_multilabel: the output activation of the kind's classification heads where the peer's own code fixes
            it (True: sigmoid, independent labels; False: softmax), or None where it is the fine-tuner's choice and
            :func:`~ecgfm.zoo.import_classifier` must be told (``multilabel=``, ``--multilabel`` /
            ``--multiclass``): the weights do not say, and a wrong guess gives wrong probabilities without an error.
        head_multilabel_source: where ``head_multilabel`` is read from in the peer's code (written to the
            classifier's ``extra.zoo.head.activation_from``).
    """

    name: str
    title: str
    container: str | None
    signature: str
    convert: Callable[[StateDict, Mapping[str, Any]], ImportedWeights]
    preprocess: Callable[[Mapping[str, Any]], PreprocessSpec]
    window: Callable[[Mapping[str, Any], Mapping[str, Any]], int]
    lead_order: Callable[[Mapping[str, Any]], list[str]]
    provenance: dict[str, Any]
    options: dict[str, str]
    head_multilabel: bool | None = None
    head_multilabel_source: str = ""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(kind: str, path: str | os.PathLike) -> Any:
    """Read a ``.safetensors`` file, or a torch file with ``torch.load(weights_only=True)`` (plain data and tensors
    only: no code from the file is run). Raises :class:`ZooImportError` for unreadable or truncated files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind}: checkpoint {p} " + ("is a folder: pass the checkpoint file in it"
                                                             if p.is_dir() else "not found"))
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ZooImportError(kind, f"cannot read {p} as safetensors (truncated or not safetensors?): {exc}"
                                 ) from exc
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... variants
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch's weights-only refusal is a paragraph; its informative line names the refused global
        first = next((ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln),
                     lines[0] if lines else type(exc).__name__)
        raise ZooImportError(kind, f"cannot read {p} with torch.load(weights_only=True) (a truncated file, or one "
                                   f"that holds pickled objects other than tensors and plain data): "
                                   f"{type(exc).__name__}: {first}") from exc


def state_dict_of(kind: ZooKind, obj: Any, where: str, others: Mapping[str, ZooKind]) -> StateDict:
    """The peer state dict inside a loaded checkpoint, checked to be of ``kind``.

    Accepts the published container (``{kind.container: state_dict}``) or a bare state dict; strips a
    ``module.`` prefix (DataParallel). A checkpoint whose keys match another kind's signature gets an error saying so.
    """
    state = obj
    if isinstance(obj, Mapping) and kind.container is not None and kind.container in obj:
        state = obj[kind.container]
    elif isinstance(obj, Mapping):  # another kind's container?
        for other in others.values():
            inner = obj.get(other.container) if other.container is not None else None
            if other.name != kind.name and isinstance(inner, Mapping) and other.signature in inner:
                raise ZooImportError(kind.name, f"{where} looks like a {other.name!r} checkpoint ({other.title}: "
                                                f"{{{other.container!r}: state_dict}} with {other.signature!r}), "
                                                f"not {kind.title}")
    if not isinstance(state, Mapping) or not state:
        raise ZooImportError(kind.name, f"{where}: expected a state dict (or {{{kind.container!r}: state_dict}}), got "
                                        f"{type(obj).__name__}"
                                        + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping)
                                           else ""))
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise ZooImportError(kind.name, f"{where}: expected a state dict of tensors; these entries are not tensors: "
                                        f"{sorted(map(str, non_tensor))[:8]} (is {kind.container!r} the right "
                                        f"container?)")
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not any(k == kind.signature or k.endswith("." + kind.signature) for k in state):  # (a wrapper may prefix)
        for other in others.values():
            if other.name != kind.name and other.signature in state:
                raise ZooImportError(kind.name, f"{where} looks like a {other.name!r} checkpoint ({other.title}: it "
                                                f"has {other.signature!r}), not {kind.title}; first keys: "
                                                f"{list(state)[:5]}")
        raise ZooImportError(kind.name, f"{where}: not a {kind.title} state dict: key {kind.signature!r} is missing; "
                                        f"first keys: {list(state)[:5]}")
    return state


def leads_option(kind: str, options: Mapping[str, Any], key: str = "leads") -> list[str] | None:
    """The ``leads`` option (or another lead-list option ``key``), checked: a list (or tuple) of distinct canonical
    lead names, or None when not given.

    Args:
        kind: for the message.
        options: the import options.
        key: the option's name.

    Raises:
        ZooImportError: ``leads`` is a string (it would be read character by character: ``"II"`` as I, I) or not a
            sequence, is empty, holds something other than a canonical lead name, or names a lead twice.
    """
    leads = options.get(key)
    if leads is None:
        return None
    if isinstance(leads, (str, bytes)) or not isinstance(leads, Sequence):
        raise ZooImportError(kind, f"option {key} must be a list of canonical lead names, one per input channel "
                                   f"(e.g. ['II'] or ['I', 'II', 'V1']), got {type(leads).__name__} {leads!r}"
                                   + (" (a string is not split: pass a list)" if isinstance(leads, str) else ""))
    leads = list(leads)
    bad = [x for x in leads if not isinstance(x, str) or x not in CANONICAL_LEADS]
    if not leads or bad:
        raise ZooImportError(kind, f"option {key} must name canonical leads {list(CANONICAL_LEADS)}, got {leads}"
                                   + (f" (not canonical: {bad})" if bad else " (empty)"))
    twice = [x for x, n in Counter(leads).items() if n > 1]
    if twice:
        raise ZooImportError(kind, f"option {key} names lead(s) {twice} more than once ({leads}): every input "
                                   f"channel is a different lead")
    return leads


def positive_number(kind: str, value: Any, what: str, integer: bool = False) -> int | float:
    """``value`` checked as a positive finite number (a whole one with ``integer``).

    Args:
        kind: for the message.
        value: the value (an option or a ``config.json`` entry).
        what: what it is, for the message (e.g. ``"option stride (--stride)"`` or ``"config.json conv_stride"``).
        integer: a whole number is needed (``4.0`` is read as 4; ``True`` is not a number).

    Returns:
        ``int(value)`` with ``integer``, else ``float(value)``.

    Raises:
        ZooImportError: not a number, not finite, zero or negative, or (``integer``) not whole.
    """
    import math
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) \
        and float(value) > 0 and (not integer or float(value).is_integer())
    if not ok:
        raise ZooImportError(kind, f"{what} must be a positive {'whole number' if integer else 'number'}, got "
                                   f"{type(value).__name__} {value!r}")
    return int(value) if integer else float(value)


def positive_option(kind: str, options: Mapping[str, Any], key: str, default: int | float,
                    integer: bool = False) -> int | float:
    """The option ``key`` checked by :func:`positive_number`, or ``default`` when it is not given (None).

    ``options.get(key) or default`` turned a given 0 into the default, while the artifact recorded 0 among its
    options.

    Raises:
        ZooImportError: a given value that is not a positive number (a whole one with ``integer``).
    """
    value = options.get(key)
    if value is None:
        return default
    return positive_number(kind, value, f"option {key} (--{key.replace('_', '-')})", integer)


def window_samples(kind: str, options: Mapping[str, Any], default_seconds: float, fs: float) -> int:
    """The model's input window in samples at ``fs``: the option ``window_seconds`` (checked by
    :func:`positive_option`) or ``default_seconds``.

    Raises:
        ZooImportError: ``window_seconds`` not a positive number, or shorter than one sample at ``fs``.
    """
    seconds = positive_option(kind, options, "window_seconds", default_seconds)
    n = int(round(float(seconds) * float(fs)))
    if n < 1:
        raise ZooImportError(kind, f"option window_seconds (--window-seconds) = {seconds} s is less than one "
                                   f"sample at {fs:g} Hz")
    return n


def indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over the keys of ``state``."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def need(kind: str, state: Mapping[str, torch.Tensor], key: str, ndim: int | None = None) -> torch.Tensor:
    """``state[key]``, or a :class:`ZooImportError` naming the key the architecture is read from."""
    if key not in state:
        raise ZooImportError(kind, f"missing key {key!r}, needed to infer the architecture; first keys: "
                                   f"{list(state)[:5]}")
    t = state[key]
    if ndim is not None and t.ndim != ndim:
        raise ZooImportError(kind, f"{key!r} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def head_of(kind: str, state: Mapping[str, torch.Tensor], prefix: str, in_dim: int) -> StateDict | None:
    """The checkpoint's classification layer ``{prefix}weight`` / ``{prefix}bias`` (None when it has none), checked
    to be a linear layer on the ``in_dim``-wide embedding.

    Checked here, at conversion, because nothing later catches a misfit cleanly: a head of the wrong width used to
    import and then fail at predict time (a matrix-product error, or a bare IndexError for a 1-D weight), and a bias
    of the wrong length escaped the command line as a raw ``size mismatch`` traceback.

    Args:
        kind: for the message.
        state: the checkpoint's state dict (peer key layout).
        prefix: the head's key prefix, e.g. ``"dense."`` or ``"head."``.
        in_dim: the backbone's embedding width (the head's input).

    Raises:
        ZooImportError: naming the key, its shape and the expected shape: a weight that is not
            ``(num_classes, in_dim)`` with ``num_classes >= 1``, a bias that is not ``(num_classes,)``, or a bias
            without a weight.
    """
    wkey, bkey = prefix + "weight", prefix + "bias"
    if wkey not in state:
        if bkey in state:
            raise ZooImportError(kind, f"{bkey!r} (shape {tuple(state[bkey].shape)}) is present but {wkey!r} is "
                                       f"missing: not a complete classification layer")
        return None
    w = state[wkey]
    if w.ndim != 2 or w.shape[1] != in_dim or w.shape[0] < 1:
        raise ZooImportError(kind, f"{wkey!r} has shape {tuple(w.shape)}, expected (num_classes, {in_dim}): a linear "
                                   f"layer on the model's {in_dim}-wide embedding")
    head = {"weight": w}
    if bkey in state:
        b = state[bkey]
        if tuple(b.shape) != (int(w.shape[0]),):
            raise ZooImportError(kind, f"{bkey!r} has shape {tuple(b.shape)}, expected ({int(w.shape[0])},): one "
                                       f"value per output of {wkey!r} {tuple(w.shape)}")
        head["bias"] = b
    return head


def check_keys(kind: str, expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
               ignored: Mapping[str, str]) -> None:
    """Compare a checkpoint's keys with those the inferred architecture has in the peer's layout.

    Args:
        kind: for the message.
        expected: the inferred model's state dict written in the peer's key layout.
        given: the checkpoint's state dict.
        ignored: checkpoint keys that are allowed without a counterpart (with the reason).

    Raises:
        ZooImportError: listing the first missing, unexpected and mis-shaped keys (peer names), if any.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected and k not in ignored]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs inferred {tuple(v.shape)}"
              for k, v in expected.items() if k in given and tuple(given[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)} in all)")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise ZooImportError(kind, "the state dict does not fit the architecture inferred from it: "
                             + "; ".join(parts))
