"""Encoder export from training and Lightning checkpoints, on top of the one artifact format
(:mod:`ecgfm.artifacts`).

:func:`export_encoder` keeps the signature older code and scripts use (``extra`` carries ``fs``, ``crop_samples``,
``method``, ``steps``, ``seed``...) and writes an ``encoder`` artifact; :func:`load_encoder` reads encoder artifacts
of every format version. :func:`backbone_from_lightning_checkpoint` rebuilds the encoder of a pretraining ``.ckpt``
without unpickling code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ecgfm.artifacts import ArtifactError, build_backbone, load_encoder, meta_file, save_encoder, weights_file
from ecgfm.data.preprocess import PreprocessSpec

__all__ = ["WEIGHTS_FILE", "META_FILE", "export_encoder", "load_encoder", "backbone_from_lightning_checkpoint",
           "backbone_spec_from_hparams"]

WEIGHTS_FILE = weights_file("encoder")
META_FILE = meta_file("encoder")
#: ``extra`` keys that are training provenance (also shown on the model card).
_PROVENANCE_KEYS = ("method", "steps", "seed", "data", "pretrain_caches", "method_hparams")


def export_encoder(backbone: nn.Module, out_dir: str | os.PathLike, preprocess: PreprocessSpec | Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write an encoder artifact for a registered backbone.

    Args:
        backbone: a backbone built by :func:`ecgfm.backbones.create_backbone` (has ``name`` and ``init_args``).
        out_dir: the artifact folder (created; an existing export is replaced atomically).
        preprocess: the preprocessing the encoder was trained with (spec or its dict).
        extra: JSON-able information; ``fs`` and ``crop_samples`` set the artifact's input rate and window,
            ``method`` / ``steps`` / ``seed`` / ``data`` / ``pretrain_caches`` go to its provenance too.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unregistered backbone name, non-JSON-able arguments or extra, or a bad preprocessing spec.
    """
    extra = dict(extra or {})
    try:
        import json

        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serialisable plain data: {exc}") from exc
    spec = preprocess if isinstance(preprocess, PreprocessSpec) else PreprocessSpec.from_dict(dict(preprocess))
    fs = extra.get("fs") or spec.fs
    provenance = {k: extra[k] for k in _PROVENANCE_KEYS if k in extra}
    if isinstance(extra.get("provenance"), dict):   # e.g. the model zoo's licence, citation, source checksum
        provenance.update(extra["provenance"])
    return save_encoder(out_dir, backbone, spec, fs=fs, window_samples=extra.get("crop_samples"),
                        provenance=provenance, extra=extra)


def backbone_spec_from_hparams(hparams: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Find the backbone ``(name, init_args)`` in a LightningModule's saved hyper-parameters.

    Accepted layouts (plain data only): ``{"backbone": {"name": ..., "init_args": {...}}}``,
    ``{"backbone_name": ..., "backbone_init_args" | "backbone_args": {...}}``.
    """
    bb = hparams.get("backbone")
    if isinstance(bb, Mapping) and "name" in bb:
        return bb["name"], dict(bb.get("init_args") or {})
    if "backbone_name" in hparams:
        args = hparams.get("backbone_init_args", hparams.get("backbone_args")) or {}
        return hparams["backbone_name"], dict(args)
    raise ValueError("checkpoint hyper-parameters hold no backbone description: expected 'backbone' "
                     "{'name', 'init_args'} or 'backbone_name' / 'backbone_init_args' as plain data; "
                     f"found keys {sorted(hparams)}")


def backbone_from_lightning_checkpoint(ckpt_path: str | os.PathLike, prefix: str = "backbone."
                                       ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder of a pretraining checkpoint (``.ckpt`` from Lightning) without unpickling code.

    The file is read with ``torch.load(weights_only=True)``; the backbone name and arguments come from the stored
    hyper-parameters (plain data, see :func:`backbone_spec_from_hparams`) and the weights from the ``state_dict``
    entries under ``prefix``.

    Returns:
        ``(backbone in eval mode, hyper_parameters)``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError variants
        raise ValueError(f"{path}: not a checkpoint ecgfm can read safely (it must be a torch checkpoint of plain "
                         f"data and tensors; loaded with weights_only=True): {str(exc).splitlines()[0]}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    try:
        name, init_args = backbone_spec_from_hparams(hparams)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    state = {k[len(prefix):].replace("_orig_mod.", ""): v  # (a torch.compile'd backbone adds _orig_mod.)
             for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no weights under {prefix!r} in the state_dict")
    backbone = build_backbone(name, init_args, path, {k: tuple(v.shape) for k, v in state.items()})
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(path, f"weights do not fit backbone {name!r}: {exc}") from exc
    return backbone.eval(), hparams
