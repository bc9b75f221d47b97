"""Import a published checkpoint as an ecgfm encoder (or classifier) artifact.

Steps, the same for every kind: read the file without unpickling code (:func:`~ecgfm.zoo.base.read_checkpoint`),
check it is a state dict of the requested kind, infer the architecture from tensor shapes (plus the options a state
dict cannot tell), check every key and shape against that architecture, load the weights strictly into the native
ecgfm backbone, write the artifact with the peer's preprocessing, input rate, window, lead order, licence and
citation into a temporary folder beside ``out_dir``, reload it and check it embeds exactly as the model in memory,
and only then rename it to ``out_dir``. Nothing partial is ever left at ``out_dir``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ecgfm.backbones import create_backbone
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.zoo import ecgfounder, hubert_ecg, stmem
from ecgfm.zoo.base import ImportedWeights, ZooImportError, ZooKind, read_checkpoint, sha256_of, state_dict_of

#: Importable kinds (``ecg_fm``: see :data:`NOT_IMPORTABLE` and docs/ZOO.md).
KINDS: dict[str, ZooKind] = {k.name: k for k in (stmem.SPEC, ecgfounder.SPEC, hubert_ecg.SPEC)}


#: Kinds that cannot be imported, with the reason (docs/ZOO.md has the details and the exact error).
NOT_IMPORTABLE = {
    "ecg_fm": "ECG-FM (fairseq-signals wav2vec2 / CMSC) checkpoints are fairseq training checkpoints: besides the "
              "tensors they pickle Python objects (the fairseq / omegaconf configuration, meters, argparse "
              "Namespace), which torch.load(weights_only=True) refuses ('WeightsUnpickler error: Unsupported global: "
              "GLOBAL omegaconf.dictconfig.DictConfig was not an allowed global by default', or argparse.Namespace "
              "for older ones). ecgfm does not unpickle arbitrary objects; see docs/ZOO.md",
}


def _kind(kind: str) -> ZooKind:
    if kind in NOT_IMPORTABLE and kind not in KINDS:
        raise ValueError(f"{kind}: cannot be imported: {NOT_IMPORTABLE[kind]}")
    if kind not in KINDS:
        raise ValueError(f"unknown zoo kind {kind!r}; importable: {', '.join(KINDS)} (see docs/ZOO.md)")
    return KINDS[kind]


def load_peer(kind: str, checkpoint: str | os.PathLike, **options: Any) -> tuple[nn.Module, ImportedWeights]:
    """Read a peer checkpoint and return the native backbone (eval mode, weights loaded) and the import record.

    Args:
        kind: one of :data:`KINDS`.
        checkpoint: a local ``.pth`` / ``.pt`` / ``.bin`` (read with ``weights_only=True``) or ``.safetensors``.
        **options: what the state dict cannot tell (see ``KINDS[kind].options``).

    Warns:
        UserWarning: for every architecture argument that was assumed (``ImportedWeights.assumed``: neither read
            from the weights nor given as an option), naming the option that overrides it.

    Raises:
        FileNotFoundError: no such file.
        ZooImportError: unreadable or truncated file, a checkpoint of another kind, missing / unexpected keys or
            shapes that do not fit; the message names the kind and the first offending keys.
    """
    spec = _kind(kind)
    unknown = sorted(k for k, v in options.items() if v is not None and k not in spec.options)
    if unknown:
        raise ValueError(f"{kind}: unknown options {unknown}; known: {sorted(spec.options)}")
    if "config" in spec.options and options.get("config") is None:  # a Hugging Face folder: config.json beside
        beside = Path(checkpoint).parent / "config.json"
        if beside.is_file():
            options = {**options, "config": str(beside)}
    obj = read_checkpoint(kind, checkpoint)
    state = state_dict_of(spec, obj, str(checkpoint), KINDS)
    weights = spec.convert(state, options)
    for name, what in weights.assumed.items():   # guesses, not read from the weights: said aloud, and recorded
        warnings.warn(f"{kind}: {checkpoint}: {name} {what}", UserWarning, stacklevel=2)
    try:
        backbone = create_backbone(weights.backbone, **weights.init_args)
        backbone.load_state_dict(weights.state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ZooImportError(kind, f"the weights do not load into {weights.backbone} {weights.init_args}: {exc}"
                             ) from exc
    return backbone.eval(), weights


def _extra(spec: ZooKind, checkpoint: Path, weights: ImportedWeights, options: Mapping[str, Any],
           window: int) -> dict[str, Any]:
    pre = spec.preprocess(options)
    return {
        "method": f"zoo:{spec.name}",
        "fs": pre.fs,
        "crop_samples": int(window),
        "provenance": {
            **spec.provenance,
            "source_checkpoint": {"file": checkpoint.name, "sha256": sha256_of(checkpoint),
                                  "bytes": checkpoint.stat().st_size},
            "imported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "zoo": {
            "kind": spec.name, "model": spec.title, "fs": pre.fs, "window_samples": int(window),
            "window_seconds": int(window) / float(pre.fs), "lead_order": spec.lead_order(weights.init_args),
            "input_rows": list(CANONICAL_LEADS),
            "options": {k: v for k, v in options.items() if v is not None},
            "inferred": weights.inferred, "assumed": weights.assumed, "ignored_keys": sorted(weights.ignored),
            "head": None if weights.head is None else {"num_classes": int(weights.head["weight"].shape[0])},
        },
    }


def _publish(out_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(folder)`` on a fresh folder beside ``out_dir`` and rename it to ``out_dir`` when it returns."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.zoo-", suffix=".tmp"))
    try:
        folder = staging / "artifact"
        write(folder)
        previous = staging / "previous"
        if out.exists():
            os.replace(out, previous)
        try:
            os.replace(folder, out)
        except OSError:
            if previous.exists():  # put the old folder back before the staging folder is removed
                os.replace(previous, out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _retitle_card(out)
    return out


def _retitle_card(out: Path) -> None:
    """The model card was generated in the staging folder: regenerate it so that it names ``out``."""
    try:
        from ecgfm.artifacts import model_card, read_meta
        from ecgfm.io import atomic_write_text
    except ImportError:  # an ecgfm without model cards
        return
    _, meta = read_meta(out)
    atomic_write_text(out / "README.md", model_card(meta, str(out)))


def _check_same(kind: str, reference: nn.Module, loaded: nn.Module, window: int) -> None:
    """The reloaded artifact must embed exactly as the imported model (guards every step in between)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, len(CANONICAL_LEADS), window, generator=g)
    with torch.no_grad():
        a, b = reference.embed(x), loaded.embed(x)
    if not torch.equal(a, b):
        raise ZooImportError(kind, f"the written artifact does not reproduce the imported model (max abs "
                                   f"difference {(a - b).abs().max().item():.3g})")


def import_encoder(kind: str, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                   overwrite: bool = False, **options: Any) -> Path:
    """Import a peer checkpoint as an ecgfm encoder artifact folder.

    Args:
        kind: one of :data:`KINDS` (``stmem``, ``ecgfounder``).
        checkpoint: the local weights file (never downloaded).
        out_dir: the encoder folder to create.
        overwrite: replace an existing non-empty ``out_dir``.
        **options: what the state dict cannot tell, e.g. ``num_heads`` for ``stmem`` (``KINDS[kind].options``).

    Returns:
        ``out_dir``; it loads with :func:`ecgfm.export.load_encoder` and works wherever an ecgfm encoder does.

    Raises:
        FileNotFoundError, FileExistsError, ZooImportError: see :func:`load_peer`; nothing is left at ``out_dir``.
    """
    from ecgfm.export import export_encoder, load_encoder

    spec = _kind(kind)
    backbone, weights = load_peer(kind, checkpoint, **options)
    window = spec.window(weights.init_args, options)
    extra = _extra(spec, Path(checkpoint), weights, options, window)

    def write(folder: Path) -> None:
        export_encoder(backbone, folder, spec.preprocess(options), extra=extra)
        _check_same(kind, backbone, load_encoder(folder)[0], window)

    return _publish(out_dir, overwrite, write)


def import_classifier(kind: str, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      class_names: Sequence[str] | None = None, multilabel: bool = True, overwrite: bool = False,
                      **options: Any) -> Path:
    """Import a peer checkpoint with its classification layer as an ecgfm classifier artifact folder.

    Args:
        kind: a kind whose checkpoint holds a head (``ecgfounder``: ``dense``; a fine-tuned ``stmem``: ``head``).
        checkpoint: the local weights file.
        out_dir: the classifier folder to create.
        class_names: the ``C`` output names in order (default ``class_0 .. class_{C-1}``).
        multilabel: sigmoid outputs (ECGFounder: 150 independent labels); False: softmax.
        overwrite: replace an existing non-empty ``out_dir``.
        **options: as :func:`import_encoder`.

    Returns:
        ``out_dir`` (loads with :func:`ecgfm.explain.classifier.load_classifier`).
    """
    from ecgfm.explain.classifier import save_classifier

    spec = _kind(kind)
    backbone, weights = load_peer(kind, checkpoint, **options)
    if weights.head is None:
        raise ZooImportError(kind, f"{checkpoint} holds no classification layer to import as a classifier "
                                   f"(import it as an encoder instead)")
    w = weights.head["weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in weights.head)
    head.load_state_dict(weights.head, strict=True)
    names = [str(c) for c in class_names] if class_names is not None else [f"class_{i}" for i in range(w.shape[0])]
    if len(names) != w.shape[0]:
        raise ZooImportError(kind, f"{len(names)} class names given for a head with {w.shape[0]} outputs")
    window = spec.window(weights.init_args, options)
    pre = spec.preprocess(options)
    extra = _extra(spec, Path(checkpoint), weights, options, window)

    def write(folder: Path) -> None:
        save_classifier(folder, backbone, head.eval(), pre, names, multilabel, fs=pre.fs, n_samples=window,
                        lead_names=CANONICAL_LEADS,
                        head_spec={"name": "linear", "args": {"in_dim": int(w.shape[1]),
                                                              "num_classes": int(w.shape[0]),
                                                              "bias": "bias" in weights.head}},
                        extra=extra)

    return _publish(out_dir, overwrite, write)
