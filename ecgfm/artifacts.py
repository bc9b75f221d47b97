"""The one on-disk format for everything a user keeps: encoder and classifier artifacts.

An artifact is a folder::

    <kind>.json          description: kind, version, architecture + constructor arguments, preprocessing spec,
                         input (fs, lead order, window), classes / head / thresholds / window aggregation
                         (classifiers), provenance (data, recipe, seed, code version), evaluation numbers
    <kind>.safetensors   weights (no pickle: loading never executes code)
    README.md            a short generated model card (what it was trained on, how to load it, its numbers)

with ``kind`` one of :data:`KINDS` (``encoder``: a backbone; ``classifier``: backbone + head). This module is the
only reader and writer of the format; everything else (training export, fine-tuning, probing, the model zoo,
explain, :mod:`ecgfm.api`) goes through it.

Guarantees:

* **Atomic.** A folder is written beside its final name and renamed into place, so it exists complete or not at
  all; an existing one is moved aside and replaced by rename (a reader sees the old artifact, the new one or, for
  the instant between the two renames, none; never new weights under an old description).
* **Weights named by their description.** ``weights_sha256`` in the JSON is the sha256 of the weights file
  (:func:`ecgfm.io.safetensors_sha256`); a file that does not match is refused at load (artifacts written before
  2026-12-06 have no such entry and load as before).
* **Safe to load.** Backbones are rebuilt only through :func:`ecgfm.backbones.create_backbone` (registered names)
  and heads only from :data:`HEADS`; the architecture is first built on the ``meta`` device and compared with the
  safetensors header, so a description that does not fit its weights (or asks for a huge model) is refused
  naming the mismatch before any memory is allocated.
* **Backward compatible.** Folders of format version 1 (``encoder.json`` with ``"format": "ecgfm-encoder"`` and
  ``classifier.json`` with ``"format": "ecgfm-classifier"``) still load; :func:`read_meta` returns them in the
  version-2 layout.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import logging
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ecgfm import __version__
from ecgfm.backbones.registry import create_backbone, list_backbones
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.heads import LinearProbeHead, MLPHead
from ecgfm.io import (atomic_write, atomic_write_json, atomic_write_text, cached_safetensors_sha256, file_key,
                      file_lock, fsync_dir, jsonable, read_json, safetensors_sha256, sort_safetensors_metadata)

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "HEADS", "ArtifactError", "ArtifactNotFound", "EncoderClassifier", "meta_file",
           "weights_file", "artifact_kind", "read_meta", "write_artifact", "save_encoder", "load_encoder",
           "save_classifier", "load_classifier", "build_backbone", "head_description", "code_version",
           "model_card"]

FORMAT = "ecgfm-artifact"
FORMAT_VERSION = 2
KINDS = ("encoder", "classifier")
_V1_FORMATS = {"ecgfm-encoder": "encoder", "ecgfm-classifier": "classifier"}
WINDOW_AGGREGATES = ("prob", "logit")


class ArtifactError(ValueError):
    """A folder or file that is not a loadable artifact; the message names the file and the problem."""

    def __init__(self, path: Any, problem: str):
        self.path, self.problem = Path(str(path)), problem
        super().__init__(f"{path}: {problem}")


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    """The folder, or one of its files, does not exist."""


class _Vanished(ArtifactNotFound):
    """A file seen a moment before was gone when it was opened: a writer swapping the folder (read it again)."""


def meta_file(kind: str) -> str:
    return f"{kind}.json"


def weights_file(kind: str) -> str:
    return f"{kind}.safetensors"


# --------------------------------------------------------------------------------------------------- models
class EncoderClassifier(nn.Module):
    """An ecgfm classifier: ``head(encoder.embed(x))``.

    Args:
        encoder: a backbone following the :mod:`ecgfm.backbones.registry` contract (``embed(x) -> (B, D)``) or
            any module mapping ``(B, L, T) -> (B, D)``.
        head: module mapping ``(B, D) -> (B, C)`` logits.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def accepts_lead_mask(self) -> bool:
        """Whether the encoder's ``embed`` takes ``lead_mask`` (ViT-1D: absent leads make no tokens)."""
        return bool(getattr(self.encoder, "accepts_lead_mask", False))

    def embed(self, x: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        """``(B, L, T) -> (B, D)``; ``lead_mask (B, L)`` bool (false = absent lead) reaches an encoder that takes it
        (:attr:`accepts_lead_mask`) and is ignored otherwise (absent leads are zero rows of ``x``)."""
        fn = getattr(self.encoder, "embed", None)
        if not callable(fn):
            return self.encoder(x)
        if lead_mask is not None and self.accepts_lead_mask:
            return fn(x, lead_mask=lead_mask)
        return fn(x)

    def forward(self, x: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        """``(B, L, T) -> (B, C)`` logits (``lead_mask``: see :meth:`embed`)."""
        return self.head(self.embed(x, lead_mask))


def _linear(in_dim: int, num_classes: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_dim, num_classes, bias=bias)


#: Head name -> factory(in_dim, num_classes, **args). Only these can be rebuilt from a classifier description.
HEADS: dict[str, Callable[..., nn.Module]] = {"linear": _linear, "linear_probe": LinearProbeHead, "mlp": MLPHead}


def head_description(head: nn.Module) -> dict[str, Any]:
    """``{"name", "args"}`` rebuilding ``head`` through :data:`HEADS` (``nn.Linear``, :class:`LinearProbeHead` and
    :class:`MLPHead` are recognised from their layers)."""
    if isinstance(head, nn.Linear):
        return {"name": "linear", "args": {"in_dim": head.in_features, "num_classes": head.out_features,
                                           "bias": head.bias is not None}}
    if isinstance(head, LinearProbeHead):
        return {"name": "linear_probe", "args": {"in_dim": head.linear.in_features,
                                                 "num_classes": head.linear.out_features,
                                                 "batch_norm": isinstance(head.norm, nn.BatchNorm1d)}}
    if isinstance(head, MLPHead):
        linears = [m for m in head.net if isinstance(m, nn.Linear)]
        drops = [m.p for m in head.net if isinstance(m, nn.Dropout)]
        return {"name": "mlp", "args": {"in_dim": linears[0].in_features, "num_classes": linears[-1].out_features,
                                        "hidden_dim": linears[0].out_features if len(linears) > 1 else 256,
                                        "num_layers": len(linears), "dropout": drops[0] if drops else 0.1,
                                        "batch_norm": any(isinstance(m, nn.BatchNorm1d) for m in head.net)}}
    raise ValueError(f"cannot describe a head of type {type(head).__name__} automatically: pass head_spec="
                     f"{{'name': one of {sorted(HEADS)}, 'args': {{...}}}}")


# ------------------------------------------------------------------------------------------------ provenance
def _project_name(pyproject: Path) -> str | None:
    """``[project] name`` of a ``pyproject.toml`` (None: no such file, or unreadable)."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10: the [project] table's name line
        import re

        m = re.search(r"(?ms)^\[project\][ \t]*$(?:(?!^\[).)*?^name\s*=\s*[\"']([^\"']+)[\"']", text)
        return m.group(1) if m else None
    try:
        name = tomllib.loads(text).get("project", {}).get("name")
    except tomllib.TOMLDecodeError:
        return None
    return name if isinstance(name, str) else None


def _ecgfm_checkout(package_dir: Path) -> Path | None:
    """The folder holding the ecgfm package when it is a git checkout of ecgfm itself, else None.

    An installed ecgfm (site-packages, possibly in a venv inside the user's own git repository) is not: asking git
    there would report the user's commit as ecgfm's. A checkout is recognised by its git top level being the folder
    that holds the package and having a ``pyproject.toml`` whose project name is ``ecgfm``.
    """
    root = package_dir.parent
    if _project_name(root / "pyproject.toml") != "ecgfm":
        return None
    top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                         timeout=5, check=True).stdout.strip()
    return root if top and Path(top).resolve() == root.resolve() else None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``ecgfm <version>`` plus the git commit when the package runs from a checkout of ecgfm (``+dirty`` if
    modified); an installed package (no ecgfm checkout around it) is the version alone."""
    here = Path(__file__).resolve().parent
    try:
        if _ecgfm_checkout(here) is None:
            return f"ecgfm {__version__}"
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                str(here)], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"ecgfm {__version__} (git {sha}{'+dirty' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        return f"ecgfm {__version__}"


# ------------------------------------------------------------------------------------------------ reading
def _folder_of(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.suffix in (".json", ".safetensors") and p.stem in KINDS:
        return p.parent
    return p


def artifact_kind(path: str | os.PathLike) -> str | None:
    """``"encoder"`` / ``"classifier"`` for an artifact folder (or one of its files), ``None`` otherwise."""
    d = _folder_of(path)
    if not d.is_dir():
        return None
    for kind in ("classifier", "encoder"):  # a classifier folder is never mistaken for its encoder
        if (d / meta_file(kind)).is_file():
            return kind
    return None


def _upgrade_v1(meta: dict[str, Any], kind: str) -> dict[str, Any]:
    """A version-1 ``encoder.json`` / ``classifier.json`` in the version-2 layout (read-only view)."""
    extra = dict(meta.get("extra") or {})
    if kind == "encoder":
        arch = {"name": meta.get("name"), "init_args": meta.get("init_args") or {},
                "num_features": meta.get("num_features")}
        fs = extra.get("fs")
        window = extra.get("crop_samples")
        inp = {"fs": fs, "leads": list(CANONICAL_LEADS), "window_samples": window,
               "window_seconds": (window / fs) if window and fs else None, "stride_samples": None}
        out = {"architecture": arch, "input": inp, "provenance": {k: extra[k] for k in ("method", "steps", "seed")
                                                                  if k in extra}}
    else:
        bb = meta.get("backbone") or {}
        arch = {"name": bb.get("name"), "init_args": bb.get("init_args") or {}, "num_features": None}
        fs, n = meta.get("fs"), meta.get("n_samples")
        inp = {"fs": fs, "leads": list(meta.get("lead_names") or CANONICAL_LEADS), "window_samples": n,
               "window_seconds": (n / fs) if n and fs else None, "stride_samples": None}
        names = meta.get("class_names")   # version 1 kept them as given (a list of ints reads as names)
        out = {"architecture": arch, "input": inp, "head": meta.get("head"),
               "classes": [str(c) for c in names] if isinstance(names, list) else names,
               "multilabel": meta.get("postprocess") == "sigmoid", "thresholds": None, "window_aggregate": "prob",
               "provenance": {}, "lead_aware": False}   # version 1 trained on zero-filled absent leads
    pre = meta.get("preprocess")
    if kind == "encoder" and "preprocess" not in meta:   # version-1 encoders were read with the default spec
        pre = PreprocessSpec().to_dict()
    out.update(format=FORMAT, format_version=1, kind=kind, preprocess=pre,
               tensors=meta.get("tensors") or {}, evaluation={}, extra=extra)
    return out


def read_meta(path: str | os.PathLike, kind: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Find and parse an artifact's description.

    Args:
        path: the artifact folder or one of its files.
        kind: the kind expected (``None``: whichever is there).

    Returns:
        ``(folder, meta)`` with ``meta`` in the version-2 layout (version-1 folders are upgraded in memory).

    Raises:
        ArtifactError: not an artifact folder, the wrong kind, missing files, malformed JSON or a newer version.
    """
    d = _folder_of(path)
    if not d.exists():
        raise ArtifactNotFound(d, "not found")
    found = artifact_kind(d)
    if found is None:
        raise ArtifactNotFound(d, f"not an ecgfm artifact folder (expected {meta_file('encoder')} or "
                               f"{meta_file('classifier')} with its .safetensors weights)")
    if kind is not None and found != kind:
        art = lambda k: f"{'an' if k[0] in 'aeiou' else 'a'} {k}"   # noqa: E731
        raise ArtifactError(d, f"this is {art(found)} artifact, not {art(kind)}")
    mpath, wpath = d / meta_file(found), d / weights_file(found)
    if not wpath.is_file():
        raise ArtifactNotFound(wpath, f"missing: {'an' if found[0] in 'aeiou' else 'a'} {found} artifact needs {meta_file(found)} and {weights_file(found)}")
    try:
        meta = read_json(mpath, f"{found} description")
    except FileNotFoundError:   # there a moment ago (artifact_kind saw it): the folder swapped by a writer
        raise _Vanished(mpath, "disappeared while it was read (another process replacing the artifact?)") from None
    except ValueError as exc:
        raise ArtifactError(mpath, str(exc).split(": ", 1)[-1]) from exc
    if not isinstance(meta, dict):
        raise ArtifactError(mpath, "not a JSON object")
    fmt = meta.get("format")
    if fmt in _V1_FORMATS:
        if _V1_FORMATS[fmt] != found or meta.get("format_version") != 1:
            raise ArtifactError(mpath, f"unsupported format {fmt!r} version {meta.get('format_version')!r}")
        return d, _upgrade_v1(meta, found)
    if fmt != FORMAT or meta.get("kind") != found:
        raise ArtifactError(mpath, f"not an ecgfm {found} description (format must be {FORMAT!r}, kind {found!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(mpath, f"unsupported format_version {version!r} (this ecgfm reads 1..{FORMAT_VERSION}; "
                                   "upgrade ecgfm to read newer artifacts)")
    return d, meta


def _header_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (reads the header only, not the tensors)."""
    try:   # read_meta saw the file a moment ago: gone now is a folder mid-swap (read again)
        with safe_open(str(weights_path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise _Vanished(weights_path, "weights file disappeared while it was read (another process replacing the "
                                      "artifact?)") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(weights_path, f"cannot read safetensors weights: {exc}") from exc


def _mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: weights {found[k]} vs description {expected[k]}" for k in expected
              if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return None

    def first(items: list[str]) -> str:
        return f"{items[:5]}{' ...' if len(items) > 5 else ''} ({len(items)})"

    return (f"missing {first(missing)}, unexpected {first(unexpected)}, shape mismatch {first(shapes)}")


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module | None:
    """Build a module on the meta device (no memory); ``None`` when its constructor cannot run there."""
    try:
        with torch.device("meta"):
            return factory()
    except (NotImplementedError, RuntimeError):
        return None


def build_backbone(name: Any, init_args: Any, where: Any, weights_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   prefix: str = "") -> nn.Module:
    """Rebuild a registered backbone from ``name`` + ``init_args``, after checking it against the weights.

    Args:
        name: registered backbone name.
        init_args: constructor arguments.
        where: file named in errors.
        weights_shapes: ``{key: shape}`` of the stored weights (safetensors header); when given, the architecture
            is first built on the meta device and compared with them, so a mismatch (or a description asking for
            gigabytes) is refused before memory is allocated.
        prefix: key prefix of the backbone's tensors in ``weights_shapes`` (``"encoder."`` in a classifier).

    Raises:
        ArtifactError: unknown name, bad arguments, or a description that does not fit the weights.
    """
    if not isinstance(name, str) or name not in list_backbones():
        raise ArtifactError(where, f"unknown backbone name {name!r}; only registered backbones can be loaded "
                                   f"({', '.join(list_backbones())})")
    if not isinstance(init_args, dict):
        raise ArtifactError(where, f"init_args must be a JSON object, got {type(init_args).__name__}")

    def factory() -> nn.Module:
        return create_backbone(name, **init_args)

    try:
        if weights_shapes is not None:
            shell = _on_meta(factory)
            if shell is not None:
                expected = {prefix + k: tuple(v.shape) for k, v in shell.state_dict().items()}
                found = {k: v for k, v in weights_shapes.items() if k.startswith(prefix)}
                problem = _mismatch(expected, found)
                if problem:
                    raise ArtifactError(where, f"the weights do not fit backbone {name!r} with init_args "
                                               f"{init_args}: {problem}")
        return factory()
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(where, f"cannot build backbone {name!r} with init_args {init_args}: {exc}") from exc


class _Swapped(Exception):
    """The artifact folder was replaced while it was being read (a writer's folder swap): read it again."""


def _load_weights(module: nn.Module, weights_path: Path, map_location: str | torch.device,
                  expected_sha256: str | None = None, meta_path: Path | None = None) -> None:
    try:
        before = file_key(weights_path) if expected_sha256 else None
        actual = cached_safetensors_sha256(weights_path) if expected_sha256 else None
    except FileNotFoundError:
        raise _Swapped() from None    # gone since the description was read: a writer's swap
    if expected_sha256 and actual != expected_sha256 and meta_path is not None:
        # a description read just before a writer swapped the folder is not a tampered file: tampered only when the
        # folder, unchanged while it is read again, still pairs its description with other weights (comparing the
        # description with the one first read is not enough: writers rewriting equal artifacts, A-B-A, fooled it)
        try:
            keys = (file_key(meta_path), file_key(weights_path))
            now_meta = read_json(meta_path).get("weights_sha256")
            now_weights = safetensors_sha256(weights_path)
            stable = keys == (file_key(meta_path), file_key(weights_path))
        except (OSError, ValueError, AttributeError):
            raise _Swapped() from None
        if not stable or now_meta == now_weights:
            raise _Swapped()
    if expected_sha256 and actual != expected_sha256:
        raise ArtifactError(weights_path, "the weights are not the ones its description was written with (sha256 "
                                          "differs from weights_sha256 in the JSON): a weights file swapped or "
                                          "edited under the description")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except FileNotFoundError:
        raise _Swapped() from None    # hashed a moment ago, gone now: a writer's swap
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(weights_path, f"cannot read safetensors weights: {exc}") from exc
    try:
        changed = before is not None and file_key(weights_path) != before
    except FileNotFoundError:
        changed = True
    if changed:   # replaced between the hash and the read
        raise _Swapped()
    problem = _mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()},
                        {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ArtifactError(weights_path, f"weights do not fit the described model: {problem}")
    module.load_state_dict(state, strict=True)


@contextlib.contextmanager
def _read_lock(where: Any, timeout: float = 10.0) -> Any:
    """A shared ``flock`` on the lock file writers hold exclusively (:func:`write_artifact`, the zoo's import) for
    the duration of one read: a read never overlaps a writer's swap. Opened read-only and never created (a
    read-only folder, or one no writer ever locked, is read without it); a writer holding it for longer than
    ``timeout`` seconds (hung, or this very process) is not waited for: the read then relies on the checks and
    retries of :func:`_consistent`."""
    p = Path(where)
    folder = p.parent if p.suffix in (".json", ".safetensors") and p.stem in KINDS else p
    real = Path(os.path.realpath(folder))
    try:
        import fcntl
        fd = os.open(real.parent / f".{real.name}.lock", os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    try:
        deadline = time.monotonic() + timeout
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except OSError:
                break
        yield
    finally:
        if fd is not None:
            os.close(fd)   # closing releases the flock


def _consistent(load: Callable[[], Any], where: Any) -> Any:
    """``load()`` again (up to 10 times, backing off to 1 s: ~5 s in all) when the folder was swapped by a writer
    while it was read (or was missing for the instant between a swap's two renames). Each read holds the writers'
    lock shared (:func:`_read_lock`) where it can; the checks and retries cover readers that cannot take it (no
    lock file, a writer not using the lock, a writer holding it too long): on a busy machine beside writers that
    rewrite the folder in a loop they need more than a few quick tries (3 tries over 0.3 s failed so on 2 loaded
    cores)."""
    tries, missing = 10, 0
    for attempt in range(tries):
        try:
            with _read_lock(where):
                return load()
        except (_Swapped, _Vanished):
            missing = 0
        except ArtifactNotFound:
            missing += 1
            if missing >= 3:   # missing on 3 reads in a row: longer than a swap's two renames take, not a swap
                raise
        time.sleep(min(0.05 * 2 ** attempt, 1.0))
    raise ArtifactError(where, "the artifact kept changing while it was read (another process rewriting it)")


def trained_leads_words(kind: str = "classifier") -> tuple[str, str]:
    """How the lead messages name an artifact and what it does to a record.

    Args:
        kind: the artifact's kind (``"classifier"``, ``"encoder"``; anything else reads as "model").

    Returns:
        ``(noun, past participle)``: ``("classifier", "scored")``, ``("encoder", "embedded")`` or
        ``("model", "processed")``.
    """
    return {"classifier": ("classifier", "scored"), "encoder": ("encoder", "embedded")}.get(
        str(kind), ("model", "processed"))


def check_trained_leads(trained: Sequence[str] | None, present: Sequence[str], where: Any,
                        kind: str = "classifier") -> list[str]:
    """A classifier saved by a sweep names the leads present in its training records (``extra.trained_leads``): a
    record sharing none of them is refused (a one-lead model trained on lead I, given lead II, scored zeros in lead
    I's row), and the leads it never saw are returned (callers warn about them). The API and the explain stage
    both check records with it.

    Args:
        trained: ``extra.trained_leads`` of the artifact (None / empty: not recorded, nothing checked).
        present: the record's present leads (canonical names).
        where: the record, for the message.
        kind: the artifact's kind, for the message's wording (:func:`trained_leads_words`: an encoder's records
            are "embedded", a classifier's "scored").

    Returns:
        The present leads the artifact never saw in training.

    Raises:
        ECGDataError: no present lead among ``trained``.
    """
    from ecgfm.data.record import ECGDataError

    if not trained:
        return []
    noun, done = trained_leads_words(kind)
    have = list(present)
    if not set(have) & set(trained):
        raise ECGDataError(where, f"the {noun} was trained on records with leads {', '.join(trained)}; this "
                                  f"record has {', '.join(have) or 'none'}: it would be {done} on leads the model "
                                  f"never saw (name the record's leads as its reader does, e.g. rename_leads= / "
                                  f"leads=)")
    return [lead for lead in have if lead not in trained]


def warn_record_leads(trained: Sequence[str] | None, present: Sequence[str], model_leads: Sequence[str], where: Any,
                      kind: str = "classifier") -> None:
    """A record's leads against the artifact's training leads, with the warnings the API and the explain stage both
    give: none of ``trained`` present is refused (:func:`check_trained_leads`), leads never seen in training are named,
    and so are the model's input leads the training records had but this record lacks (they are processed as
    absent: zero rows, or left out by a lead-aware model). Without ``trained`` (not recorded) every one of
    ``model_leads`` the record lacks is named.

    Args:
        trained: ``extra.trained_leads`` of the artifact (None / empty: not recorded).
        present: the record's present leads (canonical names).
        model_leads: the leads the model reads.
        where: the record, for the messages.
        kind: the artifact's kind, for the wording (:func:`trained_leads_words`).

    Raises:
        ECGDataError: no present lead among ``trained``.
    """
    noun, done = trained_leads_words(kind)
    have = list(present)
    unseen = check_trained_leads(trained, have, where, kind=kind)
    if unseen:
        log.warning("%s: lead(s) %s were never present in the %s's training records (trained on %s): %s as given",
                    where, ", ".join(unseen), noun, ", ".join(trained), done)
    if trained:
        missing = [lead for lead in trained if lead in model_leads and lead not in have]
        if missing:
            log.warning("%s: lead(s) %s of the %s's training records are absent from this record: %s without them",
                        where, ", ".join(missing), noun, done)
        return
    missing = [lead for lead in model_leads if lead not in have]
    if missing:
        log.warning("%s: lead(s) %s of the %s's input (%d leads) are absent from this record: %s without them (the "
                    "artifact does not record the leads of its training records, extra.trained_leads, so whether "
                    "it was trained on records without them is unknown)", where, ", ".join(missing), noun,
                    len(model_leads), done)


def pretraining_lead_aware(info: dict[str, Any]) -> bool | None:
    """How an exported encoder was pretrained on records with absent leads: its pretraining's ``method.lead_aware``.

    train.py writes the method's settings into ``encoder.json`` as ``method_hparams`` (under ``provenance`` and
    ``extra``). True: a lead-aware backbone (ViT-1D) saw tokens of a record's present leads only; False: absent leads
    were zero-filled leads with tokens of their own (all 12 leads' patches and SEP tokens).

    Args:
        info: the encoder's description (:func:`encoder_meta` / :func:`ecgfm.export.load_encoder`).

    Returns:
        The recorded setting, or None when the encoder does not record one (a zoo import, an export from before
        ``method_hparams``, a method without the setting).
    """
    for part in ("provenance", "extra"):
        hparams = (info.get(part) or {}).get("method_hparams")
        if isinstance(hparams, dict) and isinstance(hparams.get("lead_aware"), bool):
            return bool(hparams["lead_aware"])
    return None


def artifact_lead_aware(meta: Mapping[str, Any]) -> bool:
    """Whether an artifact's model was trained and validated with absent leads as a lead mask (a backbone that takes
    ``lead_mask``, ViT-1D, then gets one; the caller also checks that the network takes one), as
    :class:`ecgfm.api.Classifier` / :class:`ecgfm.api.Encoder` and the explain stage
    (:class:`ecgfm.explain.wrapper.ECGWrapper`) all read it, so both score a record the same way.

    Its ``lead_aware`` when true or false (version-1 classifiers are read as false). Absent or null (the loader
    accepts null: "not said"): as its encoder was pretrained (:func:`pretraining_lead_aware`, a recorded
    ``method_hparams.lead_aware``, the layout probes and fine-tunes follow by default), else true. Before, the
    explain stage read null as false and ignored the pretraining setting, so ``predict_proba`` and ``explain.py``
    ran the same record with and without a lead mask.

    Args:
        meta: the artifact's description (``classifier.json`` / ``encoder.json`` as loaded).
    """
    said = meta.get("lead_aware")
    if said is not None:   # a bool: the loader refuses anything else (_check_input_meta)
        return bool(said)
    pretrained = pretraining_lead_aware(dict(meta))
    return True if pretrained is None else bool(pretrained)


def derives_limb_leads(extra: Mapping[str, Any] | None) -> bool:
    """Whether the API and the explain stage derive a raw record's absent III / aVR / aVL / aVF from I and II for
    the artifact with this ``extra`` block (:func:`derive_trained_limb_leads`).

    ``extra.derive_limb_leads`` says it: ``true`` for imported models (trained on records holding every lead they
    read), ``false`` for a sweep's classifier, whose cell scored its test records as the cache holds them, with
    those leads absent, as it was trained: derived, the artifact's predictions of such records were not the
    cell's (up to 0.97 apart in probability on 3-lead records; its stored test predictions must be reproducible
    from it). Artifacts written before 2026-12-07 do not say: a sweep's (it names its cell's recipe,
    ``cell_recipe_id``) does not derive, any other does, as before.

    Args:
        extra: the artifact's ``extra`` block (None: none).

    Returns:
        True when absent limb leads are derived for this artifact.
    """
    extra = extra or {}
    if extra.get("derive_limb_leads") is not None:
        return bool(extra["derive_limb_leads"])
    return "cell_recipe_id" not in extra


def derive_trained_limb_leads(x12: np.ndarray, mask: np.ndarray, trained: Sequence[str] | None,
                              model_leads: Sequence[str], flat_threshold: float, where: Any
                              ) -> tuple[np.ndarray, np.ndarray]:
    """A raw record without III / aVR / aVL / aVF but with usable I and II (carts that store 8 leads) gets them
    derived (:func:`ecgfm.data.record.derive_limb_leads`) when the classifier's training records had them
    (``extra.trained_leads``) and the model reads them: scored with zero rows instead, the same record gave NORM
    0.956 against 0.766 with all 12. Only for classifiers that record their training leads, so a model trained
    on records without those leads (a folder of 8-lead records) sees what it was trained on, and only where
    :func:`derives_limb_leads` says so (callers pass ``trained=None`` otherwise: a sweep's classifier is given a
    record as its cell scored it). The API and the explain stage both prepare raw records with it, so both score
    the same input.

    Args:
        x12: ``(12, T)`` raw signal in the canonical lead order (mV, not normalised).
        mask: ``(12,)`` bool presence mask.
        trained: ``extra.trained_leads`` of the artifact (None / empty: nothing derived).
        model_leads: the leads the model reads.
        flat_threshold: the preprocessing's flat-lead threshold (I and II must vary at least this much).
        where: the record, for the log line.

    Returns:
        ``(x12, mask)`` with the derived leads filled and marked present.
    """
    from ecgfm.data.record import DERIVABLE_LIMB_LEADS, derive_limb_leads

    if not trained:
        return x12, mask
    want = [lead for lead in DERIVABLE_LIMB_LEADS if lead in trained and lead in model_leads]
    x12, mask, derived = derive_limb_leads(x12, mask, want, flat_threshold)
    if derived:
        log.info("%s: lead(s) %s absent, derived from I and II as a 12-lead cart does (III = II - I, "
                 "aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2)", where, ", ".join(derived))
    return x12, mask


# ------------------------------------------------------------------------------------------------ writing
def model_card(meta: Mapping[str, Any], folder_name: str = "<this folder>") -> str:
    """A short Markdown model card for an artifact description.

    Args:
        meta: the artifact's description (``encoder.json`` / ``classifier.json``).
        folder_name: the folder named in the loading example.

    Returns:
        The card's Markdown. Besides the training provenance it names, when recorded, the source of an imported
        model (:mod:`ecgfm.zoo`): ``provenance.model``, the checkpoint file with its sha256
        (``provenance.source_checkpoint``), and the peer's code and weights URLs (``provenance.code`` /
        ``provenance.weights``), so the card says which published weights it holds.
    """
    kind = meta["kind"]
    arch, inp, prov = meta.get("architecture") or {}, meta.get("input") or {}, meta.get("provenance") or {}
    spec = meta.get("preprocess") or {}
    lines = [f"# ecgfm {kind}: {arch.get('name')}", ""]
    summary = {"encoder": "An ECG encoder: signal (leads x samples) -> one embedding vector per window.",
               "classifier": "An ECG classifier: encoder + head -> class probabilities per record."}[kind]
    lines += [summary, "", "## Input", ""]
    lines.append(f"- sampling rate: {inp.get('fs')} Hz; window: {inp.get('window_samples')} samples "
                 f"({inp.get('window_seconds')} s)")
    lines.append(f"- leads (order): {', '.join(inp.get('leads') or [])}")
    steps = [f"{k}={v}" for k, v in sorted(spec.items()) if v is not None]
    lines.append(f"- preprocessing (applied by `Encoder.embed` / `Classifier.predict_proba`): {'; '.join(steps)}")
    if kind == "classifier":
        lines += ["", "## Outputs", ""]
        lines.append(f"- classes: {', '.join(map(str, meta.get('classes') or []))}")
        lines.append(f"- {'multi-label (sigmoid)' if meta.get('multilabel') else 'single-label (softmax)'}; "
                     f"record prediction = {meta.get('window_aggregate')} mean over windows")
    lines += ["", "## Training", ""]
    for key in ("model", "data", "method", "recipe", "seed", "steps", "source", "source_sha256"):
        if prov.get(key) not in (None, "", {}, []):
            lines.append(f"- {key}: {prov[key]}")
    source = prov.get("source_checkpoint")   # an imported model (ecgfm.zoo): the file its weights were read from
    if isinstance(source, Mapping) and (source.get("file") or source.get("sha256")):
        size = f", {source['bytes']} bytes" if source.get("bytes") is not None else ""
        lines.append(f"- source checkpoint: {source.get('file') or '(file not recorded)'} "
                     f"(sha256 {source.get('sha256') or 'not recorded'}{size})")
    for key in ("code", "weights", "licence", "license", "citation", "code_version", "imported", "created"):
        if prov.get(key) not in (None, "", {}, []):
            lines.append(f"- {key}: {prov[key]}")
    evaluation = meta.get("evaluation") or {}
    if evaluation:
        lines += ["", "## Evaluation", ""]
        for split, value in evaluation.items():
            lines.append(f"- {split}: {value}")
    api = "Encoder" if kind == "encoder" else "Classifier"
    call = "embed(signal, fs=500, leads=leads)" if kind == "encoder" else "predict_proba(signal, fs=500, leads=leads)"
    lines += ["", "## Load", "", "```python", "import ecgfm", "", f"model = ecgfm.{api}.load({folder_name!r})",
              f"out = model.{call}   # signal: (leads, samples) or (batch, leads, samples) NumPy array",
              "```", ""]
    if kind == "classifier":
        lines += ["Explain it: `python explain.py checkpoint=" + folder_name + "` (installed: `ecgfm-explain "
                  "checkpoint=" + folder_name + "`)", ""]
    return "\n".join(lines)


def write_artifact(out_dir: str | os.PathLike, kind: str, state: Mapping[str, Tensor], meta: Mapping[str, Any]
                   ) -> Path:
    """Write ``<kind>.safetensors``, ``<kind>.json`` and ``README.md`` atomically.

    The folder is written under a temporary name beside its final one and renamed into place, so it appears
    complete or not at all; an existing artifact folder is moved aside first (its other files, e.g. a cell's
    predictions, move into the new one) and deleted after the swap. The JSON records the sha256 of the weights
    (``weights_sha256``), checked at load.

    Args:
        out_dir: the artifact folder.
        kind: one of :data:`KINDS`.
        state: tensors to store (moved to CPU, made contiguous).
        meta: the description without ``format`` / ``format_version`` / ``kind`` / ``tensors`` (filled here).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    if kind not in KINDS:
        raise ValueError(f"artifact kind must be one of {KINDS}, got {kind!r}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    doc = jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **meta,
                    "tensors": {k: list(v.shape) for k, v in tensors.items()}})
    out = Path(out_dir)

    def write_into(folder: Path) -> None:
        def save_weights(p: Path) -> None:
            save_file(tensors, p, metadata={"format": FORMAT, "kind": kind})
            sort_safetensors_metadata(p)   # the same weights give the same bytes (see ecgfm.io)

        atomic_write(folder / weights_file(kind), save_weights)
        # the description names its weights: a weights file swapped under it is refused at load
        doc["weights_sha256"] = safetensors_sha256(folder / weights_file(kind))
        atomic_write_text(folder / "README.md", model_card(doc, str(out)))
        atomic_write_json(folder / meta_file(kind), doc, indent=2)

    if out.is_symlink():   # a link to a versioned folder: the folder it names is replaced, the link kept
        out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time per folder (two sweep jobs can write one cell's artifact)
    with file_lock(out.parent / f".{out.name}.lock"):
        replacing = out.is_dir() and any(out.iterdir())
        if replacing:
            other = [k for k in KINDS if k != kind and (out / meta_file(k)).exists()]
            if other:
                raise ArtifactError(out, f"holds an {other[0]} artifact; write the {kind} to another folder")
        # a plain mkdir (mode 0777 less the umask, as any folder the user makes), not mkdtemp's 0700
        tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
        os.mkdir(tmp, 0o777)
        old: Path | None = None
        moved_out = installed = restored = False
        try:
            write_into(tmp)
            if out.is_dir():
                try:   # the old folder's permissions (group-shared result folders stay shared)
                    os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))
                except OSError:
                    pass
            if replacing:
                # a whole new folder swapped in by renames, never files replaced one by one (a kill between them
                # left new weights under the old description)
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
                os.replace(out, old / "artifact")
                moved_out = True
                os.replace(tmp, out)
                installed = True
                own = {weights_file(kind), meta_file(kind), "README.md"}
                for f in (old / "artifact").iterdir():      # other files of the folder (a cell's predictions)
                    if f.name not in own and not (out / f.name).exists():
                        os.replace(f, out / f.name)
            else:
                if out.is_dir():
                    out.rmdir()  # empty
                os.replace(tmp, out)
                installed = True
            fsync_dir(out.parent)
        except BaseException:
            if moved_out and not installed:   # the old artifact back, whole (also on an interrupt)
                try:
                    os.replace(old / "artifact", out)
                    restored = True
                except OSError:
                    log.error("%s: the previous artifact could not be put back; it is kept in %s", out,
                              old / "artifact")
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            # the previous artifact is deleted only once the new one is in place (or it was put back); otherwise it
            # stays in <folder>.*.old/artifact rather than being lost
            if old is not None and (installed or restored or not moved_out):
                shutil.rmtree(old, ignore_errors=True)
    return out


def _spec(preprocess: PreprocessSpec | Mapping[str, Any] | None) -> PreprocessSpec | None:
    if preprocess is None or isinstance(preprocess, PreprocessSpec):
        return preprocess
    return PreprocessSpec.from_dict(dict(preprocess))


def _architecture(backbone: nn.Module) -> dict[str, Any]:
    backbone = getattr(backbone, "_orig_mod", backbone)  # a torch.compile wrapper: describe the wrapped module
    name = getattr(backbone, "name", "")
    if name not in list_backbones():
        raise ValueError(f"cannot save a backbone with unregistered name {name!r}: build it with "
                         f"ecgfm.backbones.create_backbone (registered: {', '.join(list_backbones())})")
    init_args = getattr(backbone, "init_args", None)
    if init_args is None:
        init_args = getattr(backbone, "_constructor_args", None) or {}
    return {"name": name, "init_args": jsonable(dict(init_args)),
            "num_features": int(getattr(backbone, "num_features", 0))}


def _input(fs: float | None, leads: Sequence[str] | None, window_samples: int | None,
           stride_samples: int | None) -> dict[str, Any]:
    fs = None if fs is None else float(fs)
    w = None if window_samples is None else int(window_samples)
    return {"fs": fs, "leads": list(leads or CANONICAL_LEADS), "window_samples": w,
            "window_seconds": (w / fs) if w and fs else None,
            "stride_samples": None if stride_samples is None else int(stride_samples)}


def _provenance(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    prov = dict(provenance or {})
    prov.setdefault("code_version", code_version())
    prov.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return prov


def save_encoder(out_dir: str | os.PathLike, backbone: nn.Module,
                 preprocess: PreprocessSpec | Mapping[str, Any] | None, *, fs: float | None = None,
                 window_samples: int | None = None, leads: Sequence[str] | None = None,
                 provenance: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write an encoder artifact.

    Args:
        out_dir: the folder.
        backbone: a registered backbone (built by :func:`ecgfm.backbones.create_backbone`).
        preprocess: the preprocessing the encoder expects (applied by :meth:`ecgfm.api.Encoder.embed`).
        fs: input sampling rate in Hz (default ``preprocess.fs``); required with a spec or a window (only an
            encoder saved with ``preprocess=None`` and no window, which embeds whole records as given, has none).
        window_samples: the window the encoder was trained on (its crop), in samples at ``fs``; for a backbone with
            a fixed input (ViT-1D, ST-MEM: ``patch_size`` / ``seq_len`` in its ``init_args``) a positive multiple of
            ``patch_size``, at most ``seq_len`` (None leaves the window to the encoder's user, e.g. a task's crop).
        leads: lead order of the input rows (default: the 12 canonical leads); as many as the backbone's input
            channels (``num_leads`` / ``in_channels``), or all 12 in canonical order for a backbone that reads
            ``input_leads`` from a canonical 12-lead input.
        provenance: training data, method, recipe, seed... (``code_version`` and ``created`` are added).
        evaluation: numbers to show on the model card, e.g. ``{"test macro AUROC": "0.81 [0.78, 0.84]"}``.
        extra: other JSON-able information (kept for older readers: ``fs``, ``crop_samples``, ``method``...).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: unregistered backbone, no rate (``fs`` and ``preprocess.fs`` both None) with a spec or a
            window; :class:`ArtifactError` for input fields the loader refuses (``leads`` that do not fit the
            backbone's input channels, a window of 0 or one the backbone cannot take...).
    """
    spec = _spec(preprocess)
    fs = fs if fs is not None else (None if spec is None else spec.fs)
    if fs is None and (window_samples is not None or spec is not None):
        # without a rate the API cut windows and filtered at whatever rate each caller gave: embed(x, fs=100) and
        # embed(x, fs=500) returned the same array
        raise ValueError(f"{out_dir}: pass fs= (the encoder's input rate in Hz): "
                         + ("the preprocessing spec does not fix the sampling rate" if spec is not None else
                            f"window_samples={window_samples} is a number of samples at that rate"))
    meta = {"architecture": _architecture(backbone), "preprocess": None if spec is None else spec.to_dict(),
            "input": _input(fs, leads, window_samples, None), "provenance": _provenance(provenance),
            "evaluation": dict(evaluation or {}), "extra": dict(extra or {})}
    _check_input_meta(meta, Path(out_dir))   # what the loader refuses is not written
    return write_artifact(out_dir, "encoder", getattr(backbone, "_orig_mod", backbone).state_dict(), meta)


def load_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, PreprocessSpec | None, dict[str, Any]]:
    """Load an encoder artifact (format version 1 or 2).

    Returns:
        ``(backbone in eval mode, PreprocessSpec or None, info)``; None when the artifact was saved with
        ``preprocess=None`` (no preprocessing, as :func:`load_classifier`); ``info`` is the version-2 description
        plus the version-1 keys older callers read (``name``, ``init_args``, ``num_features``).

    Raises:
        ArtifactError: not an encoder folder (a classifier folder says so), missing or malformed files, unknown
            backbone, or weights that do not fit the description.
    """
    return _consistent(lambda: _load_encoder(path, map_location), path)


def _load_encoder(path: str | os.PathLike, map_location: str | torch.device
                  ) -> tuple[nn.Module, PreprocessSpec | None, dict[str, Any]]:
    d, meta = read_meta(path, "encoder")
    mpath, wpath = d / meta_file("encoder"), d / weights_file("encoder")
    _check_input_meta(meta, mpath)
    try:  # null: saved with preprocess=None, i.e. none (not the defaults, which would filter and normalise)
        spec = PreprocessSpec.from_dict(meta["preprocess"]) if meta.get("preprocess") is not None else None
    except (TypeError, ValueError) as exc:
        raise ArtifactError(mpath, f"bad preprocess entry: {exc}") from exc
    arch = meta.get("architecture") or {}
    backbone = build_backbone(arch.get("name"), arch.get("init_args") or {}, mpath, _header_shapes(wpath))
    _load_weights(backbone, wpath, map_location, meta.get("weights_sha256"), mpath)
    info = dict(meta, name=arch.get("name"), init_args=arch.get("init_args") or {},
                num_features=arch.get("num_features") or int(getattr(backbone, "num_features", 0)), dir=str(d))
    return backbone.to(map_location).eval(), spec, info


def save_classifier(out_dir: str | os.PathLike, backbone: nn.Module, head: nn.Module,
                    preprocess: PreprocessSpec | Mapping[str, Any] | None, class_names: Sequence[str],
                    multilabel: bool, *, fs: float | None = None, window_samples: int | None = None,
                    stride_samples: int | None = None, window_aggregate: str = "prob",
                    thresholds: Sequence[float] | None = None, leads: Sequence[str] | None = None,
                    head_spec: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
                    evaluation: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                    lead_aware: bool | None = None, thresholds_not_chosen: Sequence[str] = ()) -> Path:
    """Write a classifier artifact (encoder + head + how records are scored).

    Args:
        out_dir: the folder.
        backbone: a registered backbone.
        head: ``(B, D) -> (B, C)`` logits; described by ``head_spec`` or recognised (:func:`head_description`).
        preprocess: the preprocessing the classifier expects.
        class_names: the ``C`` output names (distinct: they are the columns of ``predict_proba``).
        multilabel: sigmoid outputs (else softmax).
        fs: input rate in Hz (default ``preprocess.fs``).
        window_samples: the window each forward pass sees (records are scored over sliding windows); required for a
            backbone with a fixed input (ViT-1D, ST-MEM: a positive multiple of its ``patch_size``, at most its
            ``seq_len``); None (a backbone taking any length): each record whole.
        stride_samples: hop between windows (default: ``window_samples``).
        window_aggregate: ``"prob"`` (mean window probability) or ``"logit"`` (activation of the mean logit).
        thresholds: ``(C,)`` decision thresholds chosen on validation (multi-label), if any.
        thresholds_not_chosen: classes whose threshold is a placeholder (0.5), not chosen on validation (no
            positive validation record: :func:`ecgfm.evaluate.metrics.no_threshold_mask`); written as
            ``thresholds_not_chosen`` when not empty, so that :meth:`ecgfm.api.Classifier.predict` can say so.
        leads: lead order of the input rows (as in :func:`save_encoder`).
        head_spec: ``{"name": key of HEADS, "args": {...}}``.
        provenance, evaluation, extra: as in :func:`save_encoder`.
        lead_aware: how the model was trained and validated on records with absent leads: True, a backbone taking
            ``lead_mask`` got the records' lead masks (absent leads make no tokens); False, zero-padded leads.
            Written as ``lead_aware`` (read by :class:`ecgfm.api.Classifier` and the explain stage with
            :func:`artifact_lead_aware`); None: not written (read as the encoder's pretraining setting where the
            artifact records one, else True).

    Raises:
        ValueError: unregistered backbone, unknown head, class-count mismatch, bad ``window_aggregate``;
            :class:`ArtifactError` for fields the loader refuses (class names repeated, one class with
            ``multilabel=False``, ``leads`` that do not fit the backbone's input channels, a window the backbone
            cannot take or none for a fixed-input one...).
    """
    if window_aggregate not in WINDOW_AGGREGATES:
        raise ValueError(f"window_aggregate must be one of {WINDOW_AGGREGATES}, got {window_aggregate!r}")
    spec = _spec(preprocess)
    fs = fs if fs is not None else (None if spec is None else spec.fs)
    if fs is None:
        raise ValueError("pass fs= (the preprocessing spec does not fix the sampling rate)")
    hs = dict(head_spec) if head_spec is not None else head_description(head)
    if hs.get("name") not in HEADS:
        raise ValueError(f"unknown head name {hs.get('name')!r}; known: {sorted(HEADS)}")
    model = EncoderClassifier(getattr(backbone, "_orig_mod", backbone), head)
    n_out = [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
    if n_out != len(class_names):
        raise ValueError(f"the head has {n_out} outputs but {len(class_names)} class_names were given")
    if thresholds is not None and len(thresholds) != len(class_names):
        raise ValueError(f"{len(thresholds)} thresholds for {len(class_names)} classes")
    unchosen = [str(c) for c in thresholds_not_chosen]
    if unchosen and thresholds is None:
        raise ValueError(f"thresholds_not_chosen {unchosen} without thresholds")
    meta = {"architecture": _architecture(backbone), "head": {"name": hs["name"], "args": dict(hs.get("args", {}))},
            "preprocess": None if spec is None else spec.to_dict(),
            "input": _input(fs, leads, window_samples, stride_samples if stride_samples else window_samples),
            "classes": [str(c) for c in class_names], "multilabel": bool(multilabel),
            "thresholds": None if thresholds is None else [float(t) for t in thresholds],
            "window_aggregate": window_aggregate, "provenance": _provenance(provenance),
            "evaluation": dict(evaluation or {}), "extra": dict(extra or {})}
    if lead_aware is not None:
        meta["lead_aware"] = bool(lead_aware)
    if unchosen:
        meta["thresholds_not_chosen"] = unchosen
    _check_classifier_meta(meta, Path(out_dir))   # what the loader refuses is not written
    return write_artifact(out_dir, "classifier", model.state_dict(), meta)


def _check_input_meta(meta: Mapping[str, Any], where: Path, *, window_required: bool = False) -> None:
    """The input fields of an encoder's or classifier's description, as the writers produce them: a hand-edited
    JSON was read silently otherwise (lead I listed 12 times fed lead I 12 times; a window of 0 meant "the whole
    record"; ``lead_aware: "false"`` read as true; an ``input.fs`` other than the preprocessing's rate failed each
    call with a message about a missing rate; a window a fixed-input backbone cannot take failed every call inside
    the network, see :func:`_check_window_fits_backbone`).

    Args:
        meta: the description.
        where: the folder (when saving) or file (when loading) named in errors.
        window_required: a fixed-input backbone needs ``input.window_samples`` (classifiers: records are scored
            through it; an encoder without one leaves the window to its user, e.g. the fine-tuning task's crop).

    Raises:
        ArtifactError: naming the field and the value.
    """
    from ecgfm.data.record import CANONICAL_LEADS

    inp = meta.get("input") or {}
    leads = inp.get("leads")
    if leads is not None:
        bad = [x for x in leads if x not in CANONICAL_LEADS]
        if bad or len(set(leads)) != len(leads) or not leads:
            raise ArtifactError(where, f"input.leads must be distinct canonical lead names, got {leads}")
        _check_leads_fit_backbone(list(leads), meta.get("architecture") or {}, where)
    for key in ("window_samples", "stride_samples"):
        v = inp.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ArtifactError(where, f"input.{key} must be a positive integer or null, got {v!r}")
    _check_window_fits_backbone(inp.get("window_samples"), meta.get("architecture") or {}, where,
                                window_required=window_required)
    if "lead_aware" in meta and meta["lead_aware"] is not None and not isinstance(meta["lead_aware"], bool):
        raise ArtifactError(where, f"lead_aware must be true, false or null, got {meta['lead_aware']!r}")
    fs, pre_fs = inp.get("fs"), (meta.get("preprocess") or {}).get("fs")
    if fs is not None and pre_fs is not None and abs(float(fs) - float(pre_fs)) > 1e-6:
        raise ArtifactError(where, f"input.fs ({fs} Hz) and preprocess.fs ({pre_fs} Hz) disagree: the model reads "
                                   f"records at the preprocessing's rate")


def _input_length_limits(arch: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(patch_size, seq_len)`` of a described backbone that takes only inputs whose length is a positive multiple
    of ``patch_size`` and at most ``seq_len`` (ViT-1D, ST-MEM: from its complete ``init_args``, see
    :mod:`ecgfm.backbones.registry`); None for a backbone without such a limit (the CNNs, HuBERT-ECG)."""
    args = arch.get("init_args") if isinstance(arch, Mapping) else None
    if not isinstance(args, Mapping):
        return None
    patch, seq_len = args.get("patch_size"), args.get("seq_len")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (patch, seq_len)):
        return int(patch), int(seq_len)
    return None


def _check_window_fits_backbone(window: Any, arch: Mapping[str, Any], where: Path, *,
                                window_required: bool = False) -> None:
    """``input.window_samples`` against the input lengths the described backbone takes: a ViT-1D / ST-MEM
    classifier saved with a window longer than ``seq_len`` or not a multiple of ``patch_size`` (or with none, so
    that whole records reached it) was written and loaded, and every ``predict_proba`` then failed inside the
    network with a message naming neither the artifact nor the record.

    Args:
        window: ``input.window_samples`` (a positive int or None, already checked).
        arch: the description's ``architecture`` (``name``, ``init_args``).
        where: the folder or file named in the error.
        window_required: refuse no window for such a backbone (classifiers).

    Raises:
        ArtifactError: naming the window, the backbone, its ``patch_size`` and ``seq_len``. A backbone without
            ``patch_size`` / ``seq_len`` in its ``init_args`` takes any window (or none) and is not checked.
    """
    limits = _input_length_limits(arch)
    if limits is None:
        return
    patch, seq_len = limits
    name = arch.get("name")
    takes = (f"backbone {name!r} takes only inputs whose length is a positive multiple of patch_size={patch} "
             f"samples and at most seq_len={seq_len} samples")
    if window is None:
        if window_required:
            raise ArtifactError(where, f"no input.window_samples, but {takes}: whole records would reach the network "
                                       f"and every prediction would fail there; give the window the model was "
                                       f"trained with (window_samples=, e.g. {seq_len})")
        return
    if isinstance(window, int) and not isinstance(window, bool) and (window % patch or window > seq_len):
        why = (f"longer than seq_len={seq_len}" if window > seq_len else
               f"not a multiple of patch_size={patch}")
        raise ArtifactError(where, f"input.window_samples={window} does not fit: {takes} ({window} is {why}), so "
                                   f"every prediction would fail in the network; give the window the model was "
                                   f"trained with (e.g. {seq_len})")


def _check_leads_fit_backbone(leads: list[str], arch: Mapping[str, Any], where: Path) -> None:
    """``input.leads`` against the rows the described backbone reads (from its complete ``init_args``, see
    :mod:`ecgfm.backbones.registry`): a 12-lead ResNet saved with ``leads=["I", "II"]`` was written and loaded, and
    every record then failed in the network (or a backbone reading ``input_leads`` picked the wrong rows).

    Args:
        leads: ``input.leads`` (distinct canonical names).
        arch: the description's ``architecture`` (``name``, ``init_args``).
        where: the file named in the error.

    Raises:
        ArtifactError: ``input_leads`` set and the leads not the 12 canonical ones in canonical order (such a
            backbone picks its leads from a canonical 12-lead input), or a lead count other than ``num_leads`` /
            ``in_channels``. A backbone without either (HuBERT-ECG reads any number of rows) is not checked.
    """
    args = arch.get("init_args") if isinstance(arch, Mapping) else None
    if not isinstance(args, Mapping):
        return
    name = arch.get("name")
    if args.get("input_leads") is not None:
        if leads != list(CANONICAL_LEADS):
            raise ArtifactError(where, f"input.leads {leads} do not fit backbone {name!r}: it reads input_leads "
                                       f"{list(args['input_leads'])} from a canonical 12-lead input, so input.leads "
                                       f"must be the 12 canonical leads in canonical order")
        return
    for key in ("num_leads", "in_channels"):
        n = args.get(key)
        if isinstance(n, int) and not isinstance(n, bool):
            if len(leads) != n:
                raise ArtifactError(where, f"input.leads names {len(leads)} lead(s) {leads} but backbone {name!r} "
                                           f"reads {n} input channels ({key}={n}): pass one lead name per input "
                                           f"channel, in the channel order it was trained with")
            return


def _check_classifier_meta(meta: Mapping[str, Any], where: Path) -> None:
    """The fields of a classifier's description that decide how records are scored, as :func:`save_classifier`
    writes them: a hand-edited or foreign JSON with another value was read silently (``"logits"`` as ``prob``, a
    lead twice, a stride of 0 as "the window").

    Raises:
        ArtifactError: naming the field and the value.
    """
    agg = meta.get("window_aggregate", "prob")
    if agg not in WINDOW_AGGREGATES:
        raise ArtifactError(where, f"window_aggregate must be one of {WINDOW_AGGREGATES}, got {agg!r}")
    if not isinstance(meta.get("multilabel"), bool):   # a missing entry was read as softmax
        raise ArtifactError(where, f"multilabel must be true or false (sigmoid or softmax outputs), got "
                                   f"{meta.get('multilabel')!r}" + ("" if "multilabel" in meta else " (missing)"))
    _check_input_meta(meta, where, window_required=True)
    classes = meta.get("classes")
    # the names are predict_proba's columns: none (an empty DataFrame schema, failing in pandas) or one twice
    # (duplicate columns) was read silently
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ArtifactError(where, f"classes must be a non-empty list of class names (strings), got {classes!r}"
                                   + ("" if "classes" in meta else " (missing)"))
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ArtifactError(where, f"classes lists {twice} more than once ({classes}): every output needs its own "
                                   f"name")
    if len(classes) == 1 and not meta["multilabel"]:
        # softmax over one output is 1 for every record: predict_proba said 1.0 whatever the ECG, and every
        # probability explanation was 0; the training pipeline refuses a single-label task of one class
        raise ArtifactError(where, f"one class ({classes[0]!r}) with multilabel false: softmax over one output is "
                                   f"always 1, so every record would score 1.0; a one-logit (binary, BCE-trained) "
                                   f"classifier is multi-label (sigmoid): save it with multilabel=True "
                                   f"(\"multilabel\": true), or give it one output per class")
    n_out = ((meta.get("head") or {}).get("args") or {}).get("num_classes")
    if n_out is not None and len(classes) != int(n_out):
        raise ArtifactError(where, f"{len(classes)} classes for a head of {n_out} outputs")
    thr = meta.get("thresholds")
    if thr is not None:
        n = len(classes)
        if (n is not None and len(thr) != int(n)) or not all(isinstance(t, (int, float)) and np.isfinite(t)
                                                               for t in thr):
            raise ArtifactError(where, f"thresholds must be {n} finite numbers (one per class), got {thr}")
    unchosen = meta.get("thresholds_not_chosen")
    if unchosen is not None and (thr is None or not isinstance(unchosen, list)
                                 or not set(map(str, unchosen)) <= set(classes)):
        raise ArtifactError(where, f"thresholds_not_chosen must list classes of {classes} of a classifier with "
                                   f"thresholds, got {unchosen!r}")


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[EncoderClassifier, PreprocessSpec | None, dict[str, Any]]:
    """Load a classifier artifact (format version 1 or 2).

    Returns:
        ``(EncoderClassifier in eval mode, PreprocessSpec or None, meta)`` with ``meta`` in the version-2 layout.

    Raises:
        ArtifactError: not a classifier folder (an encoder folder gets the command that makes a classifier),
            missing or malformed files, unknown backbone or head, weights that do not fit.
    """
    d = _folder_of(path)
    if artifact_kind(d) == "encoder":
        raise ArtifactError(d, "this is an encoder (a pretrained backbone without a classification head), not a "
                               "classifier. Make a classifier from it first, e.g. `python finetune.py "
                               f"checkpoint={d} task=ptbxl_super` (every fine-tune cell saves a classifier "
                               "folder) or `python probe.py checkpoint=... save_classifier=true` (installed: "
                               "ecgfm-finetune / ecgfm-probe, same arguments); then explain that folder.")
    return _consistent(lambda: _load_classifier(d, map_location), d)


def _load_classifier(d: Path, map_location: str | torch.device
                     ) -> tuple[EncoderClassifier, PreprocessSpec | None, dict[str, Any]]:
    d, meta = read_meta(d, "classifier")
    mpath, wpath = d / meta_file("classifier"), d / weights_file("classifier")
    _check_classifier_meta(meta, mpath)
    arch, hd = meta.get("architecture") or {}, meta.get("head") or {}
    if hd.get("name") not in HEADS:
        raise ArtifactError(mpath, f"unknown head {hd.get('name')!r}; known: {sorted(HEADS)}")
    shapes = _header_shapes(wpath)
    backbone = build_backbone(arch.get("name"), arch.get("init_args") or {}, mpath, shapes, prefix="encoder.")
    try:
        head = HEADS[hd["name"]](**dict(hd.get("args") or {}))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(mpath, f"cannot build head {hd['name']!r} with args {hd.get('args')}: {exc}") from exc
    model = EncoderClassifier(backbone, head)
    _load_weights(model, wpath, map_location, meta.get("weights_sha256"), mpath)
    try:
        spec = PreprocessSpec.from_dict(meta["preprocess"]) if meta.get("preprocess") is not None else None
    except (TypeError, ValueError) as exc:
        raise ArtifactError(mpath, f"bad preprocess entry: {exc}") from exc
    return model.to(map_location).eval(), spec, dict(meta, dir=str(d))
