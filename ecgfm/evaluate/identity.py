"""What a results cell *is*: the identity of its checkpoint and the hash of its full recipe.

A sweep cell (:mod:`ecgfm.evaluate.sweep`) is filed under a path made of the ``checkpoint`` *string*, the task,
the label fraction and the seed. The string says nothing about the numbers: the same folder can hold a retrained
encoder, two folders can hold two different checkpoints of the same method, and the same cell can be asked for
again with another probe grid, learning rate, window or bootstrap. So every cell also stores

* ``checkpoint_id``: the content hash of the checkpoint (:func:`checkpoint_identity`): the sha256 of the
  exported weights file(s) (``encoder.safetensors``) plus the architecture, for an exported encoder; the backbone
  name, its arguments and the initialisation seed for the ``random:`` / ``supervised:`` pseudo-checkpoints (their
  weights are a function of those);
* ``recipe_id``: the hash of everything else that changes the numbers (:func:`recipe_identity`): the probe or
  fine-tuning recipe (head, grid, learning rate, epochs, window aggregation...), the window / stride settings,
  the task and external-set specs, the preprocessing, the bootstrap settings and the cell schema version.

A rerun reuses a finished cell only when both match (:func:`stale_reason` says why not), and the results table
groups cells by ``checkpoint_id`` (:mod:`ecgfm.evaluate.report`), so two checkpoints of one method are never
averaged as if they were seeds. Hashing a weights file is cached by (path, size, mtime, ctime, inode), so skip checks
stay cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ecgfm.io import cached_safetensors_sha256, dumps, sha256_bytes

__all__ = ["CELL_SCHEMA", "weights_sha256", "checkpoint_identity", "recipe_identity", "short_hash", "diff_keys",
           "stale_reason"]

# Bump when the meaning of a cell's numbers changes (old cells are then recomputed, and never averaged as seeds
# with new ones: the recipe id includes it). 3 (2026-12-06): since 2 (2026-12-05) macro F1 counts only classes with
# a positive record, the MLP probe early-stops on record-level validation AUROC, external metrics leave out classes
# no SNOMED code reaches, and classes without a training positive leave their task. 4 (2026-12-07): multi-label
# macro F1 leaves out classes without a validation positive (their 0.5 threshold was not chosen).
CELL_SCHEMA = 4
ID_LEN = 16      # hex characters kept in checkpoint_id / recipe_id

def short_hash(obj: Any, n: int = ID_LEN) -> str:
    """First ``n`` hex characters of the sha256 of the deterministic JSON of ``obj`` (:func:`ecgfm.io.dumps`)."""
    return sha256_bytes(dumps(obj).encode("utf-8"))[:n]


def weights_sha256(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: sha256}`` of the weights of an exported model folder.

    The weights are the folder's ``*.safetensors`` files (an encoder export has ``encoder.safetensors``). Each
    hash is cached by (path, size, modification and change time, inode), so asking again for an unchanged file
    reads nothing.

    Raises:
        FileNotFoundError: the folder holds no ``.safetensors`` file.
    """
    d = Path(folder)
    files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{d}: no weights file (*.safetensors) to identify the checkpoint by")
    return {p.name: cached_safetensors_sha256(p) for p in files}


def _architecture(folder: Path) -> dict[str, Any]:
    """``{"backbone", "init_args"}`` of an artifact folder's description (format 1 or 2)."""
    from ecgfm.artifacts import read_meta

    _, meta = read_meta(folder)
    arch = meta.get("architecture") or {}
    return {"backbone": arch.get("name", meta.get("name")), "init_args": arch.get("init_args", meta.get("init_args"))
            or {}}


def checkpoint_identity(checkpoint: str, init_seed: int = 0, backbone_args: Mapping[str, Any] | None = None,
                        conf_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The content identity of a ``checkpoint`` value of ``probe.py`` / ``finetune.py``.

    Args:
        checkpoint: an exported encoder folder (or one of its files), ``random:<name | folder>``,
            ``supervised:<name | folder>`` or ``handcrafted`` (identity: feature version + neurokit2 version).
        init_seed: seed of the random initialisation (pseudo-checkpoints only).
        backbone_args: constructor overrides of a registry name (pseudo-checkpoints only).
        conf_dir: the backbone config folder (``ecgfm/conf/backbone``) whose YAML builds a registry name; its text
            is part of the identity (default: the package's).

    Returns:
        ``{"id": <16 hex>, "label": <7 hex>, "basis": {...}}``; ``basis`` is what was hashed (JSON-able).

    Raises:
        FileNotFoundError: an exported folder without weights.
    """
    text = str(checkpoint).strip()
    kind, _, target = text.partition(":")
    if text == "handcrafted":  # no weights: the feature definitions (and the peak detector's version) are its identity
        from ecgfm.evaluate.handcrafted import FEATURE_VERSION, neurokit_version

        basis: dict[str, Any] = {"kind": "handcrafted", "feature_version": FEATURE_VERSION,
                                 "neurokit2": neurokit_version()}
    elif kind in ("random", "supervised") and target:
        basis = {"kind": kind, "init_seed": int(init_seed), "backbone_args": dict(backbone_args or {})}
        if kind == "random":   # since 2026-12-06 (frozen features: batchnorm.random_init_batchnorm_statistics)
            basis["batchnorm"] = "never-estimated statistics computed on the task's training windows"
        p = Path(target)
        if p.is_dir():
            basis.update(_architecture(p))
            basis.pop("backbone_args")  # an export's architecture is fixed by its description
        else:
            if conf_dir is None:
                from ecgfm.conf import config_dir

                conf_dir = config_dir() / "backbone"
            conf = Path(conf_dir) / f"{target}.yaml"
            basis.update(backbone=target, conf=conf.read_text(encoding="utf-8") if conf.is_file() else None)
    else:
        p = Path(text)
        folder = p if p.is_dir() else p.parent
        basis = {"kind": "pretrained", "weights_sha256": weights_sha256(folder), **_architecture(folder)}
    ident = short_hash(basis)
    return {"id": ident, "label": ident[:7], "basis": basis}


def recipe_identity(recipe: Mapping[str, Any]) -> str:
    """Hash of a cell's full recipe (a JSON-able mapping; the schema version is added here)."""
    return short_hash({"cell_schema": CELL_SCHEMA, **dict(recipe)})


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like mappings (for the "recomputing" log line)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if json.loads(dumps(old)) == json.loads(dumps(new)) else [prefix.rstrip(".") or "<value>"]


def stale_reason(stored: Mapping[str, Any], checkpoint: Mapping[str, Any], recipe_id: str,
                 recipe: Mapping[str, Any]) -> str | None:
    """Why a stored cell may not be reused for this checkpoint identity and recipe (None: reuse it).

    Args:
        stored: the cell JSON.
        checkpoint: :func:`checkpoint_identity` of the checkpoint now.
        recipe_id: :func:`recipe_identity` of the recipe now.
        recipe: that recipe (to name what changed).
    """
    if stored.get("checkpoint_id") is None or stored.get("recipe_id") is None:
        return "it has no checkpoint / recipe identity (written by an older ecgfm)"
    if stored["checkpoint_id"] != checkpoint["id"]:
        was = (stored.get("checkpoint_identity") or {}).get("basis") or {}
        changed = diff_keys(was, checkpoint["basis"]) if was else []
        return (f"the checkpoint changed (identity {str(stored['checkpoint_id'])[:7]} -> {checkpoint['label']}"
                f"{'; ' + ', '.join(changed) if changed else ''})")
    if stored["recipe_id"] != recipe_id:
        changed = diff_keys(stored.get("recipe") or {}, recipe)
        return (f"the recipe changed ({', '.join(changed) if changed else 'cell schema'}; recipe "
                f"{str(stored['recipe_id'])[:7]} -> {recipe_id[:7]})")
    return None
