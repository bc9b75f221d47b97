"""Exported encoders: weights in safetensors, everything else in a small JSON file. No pickles.

An export directory holds

* ``encoder.safetensors``: the backbone ``state_dict`` (:func:`safetensors.torch.save_file`);
* ``encoder.json``: ``{"format": "ecgfm-encoder", "format_version": 1, "name", "init_args", "num_features",
  "preprocess" (a :class:`~ecgfm.data.preprocess.PreprocessSpec` as a dict), "tensors" (name -> shape),
  "extra" (JSON-able: method, crop_samples, fs, ...)}``.

``init_args`` lists every constructor argument of the backbone (the registered size's defaults included, see
:mod:`ecgfm.backbones.registry`), so the JSON describes the architecture on its own. Exports written before that
hold only the arguments given to ``create_backbone``; they still load, the others taking the registry's current
defaults.

:func:`load_encoder` rebuilds the backbone only through :func:`ecgfm.backbones.create_backbone` (so only registered
names can be instantiated, never an arbitrary class) and loads the weights strictly, so downstream code gets the
same network and the same preprocessing that pretraining used.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ecgfm.backbones.registry import create_backbone, list_backbones
from ecgfm.data.preprocess import PreprocessSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "META_FILE", "export_encoder", "load_encoder",
           "backbone_from_lightning_checkpoint", "backbone_spec_from_hparams"]

FORMAT = "ecgfm-encoder"
FORMAT_VERSION = 1
WEIGHTS_FILE = "encoder.safetensors"
META_FILE = "encoder.json"


def _json_check(value: Any, what: str) -> Any:
    """Round-trip ``value`` through JSON (tuples become lists); a clear error when it is not JSON-able."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable plain data: {exc}") from exc


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_encoder(backbone: nn.Module, out_dir: str | os.PathLike, preprocess: PreprocessSpec | Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` for a registered backbone.

    Args:
        backbone: a backbone built by :func:`ecgfm.backbones.create_backbone` (has ``name`` and ``init_args``).
        out_dir: directory to write into (created; existing export files are replaced atomically).
        preprocess: the preprocessing the encoder was trained with (spec or its dict).
        extra: JSON-able extra information (e.g. ``method``, ``crop_samples``, ``fs``, ``step``).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unregistered backbone name, non-JSON-able arguments or extra, or a bad preprocessing spec.
    """
    backbone = getattr(backbone, "_orig_mod", backbone)  # a torch.compile wrapper: export the wrapped module
    name = getattr(backbone, "name", "")
    if name not in list_backbones():
        raise ValueError(f"cannot export a backbone with unregistered name {name!r}: build it with "
                         f"ecgfm.backbones.create_backbone (registered: {', '.join(list_backbones())})")
    init_args = getattr(backbone, "init_args", None)
    if init_args is None:  # a registered class built directly (not by create_backbone): its recorded constructor call
        init_args = getattr(backbone, "_constructor_args", None) or {}
    init_args = _json_check(dict(init_args), f"init_args of backbone {name!r}")
    spec = preprocess if isinstance(preprocess, PreprocessSpec) else PreprocessSpec.from_dict(dict(preprocess))
    state = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "init_args": init_args,
        "num_features": int(getattr(backbone, "num_features", 0)),
        "preprocess": spec.to_dict(),
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "extra": _json_check(dict(extra or {}), "extra"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": FORMAT, "name": name}))
    _atomic_write(out / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return out


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        d = p
    elif p.name in (WEIGHTS_FILE, META_FILE):
        d = p.parent
    else:
        raise FileNotFoundError(f"{p}: not an exported encoder directory (expected a folder holding "
                                f"{META_FILE} and {WEIGHTS_FILE})")
    meta_path, weights_path = d / META_FILE, d / WEIGHTS_FILE
    for f in (meta_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; an exported encoder needs {META_FILE} and {WEIGHTS_FILE}")
    return meta_path, weights_path


def _build_and_load(name: Any, init_args: Any, state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """Rebuild a registered backbone and load ``state`` strictly, with clear errors."""
    if not isinstance(name, str) or name not in list_backbones():
        raise ValueError(f"{where}: unknown backbone name {name!r}; only registered backbones can be loaded "
                         f"({', '.join(list_backbones())})")
    if not isinstance(init_args, dict):
        raise ValueError(f"{where}: init_args must be a dict, got {type(init_args).__name__}")
    try:
        model = create_backbone(name, **init_args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build backbone {name!r} with init_args {init_args}: {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{where}: weights do not match backbone {name!r} {init_args}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                         f"shape mismatch {mismatched[:5]}{'...' if len(mismatched) > 5 else ''}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, PreprocessSpec, dict[str, Any]]:
    """Load an exported encoder.

    Args:
        path: the export directory (or either of its two files).
        map_location: device for the weights.

    Returns:
        ``(backbone in eval mode, PreprocessSpec, info)`` where ``info`` is the parsed ``encoder.json``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: malformed JSON, wrong format or version, unknown backbone name, or weights that do not fit.
    """
    meta_path, weights_path = _resolve(path)
    try:
        info = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path}: not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not an ecgfm encoder description (format must be {FORMAT!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{meta_path}: unsupported format_version {version!r} (this ecgfm reads 1..{FORMAT_VERSION})")
    try:
        spec = PreprocessSpec.from_dict(info.get("preprocess"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: bad preprocess entry: {exc}") from exc
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: cannot read safetensors weights: {exc}") from exc
    model = _build_and_load(info.get("name"), info.get("init_args", {}), state, str(meta_path))
    return model, spec, info


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
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError variants
        raise ValueError(f"{path}: cannot read the checkpoint with weights_only=True (it must hold plain data "
                         f"and tensors only): {exc}") from exc
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
    return _build_and_load(name, init_args, state, str(path)), hparams
