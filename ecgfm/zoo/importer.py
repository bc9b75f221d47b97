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
            shapes that do not fit, options that contradict the weights; the message names the kind, the file and
            the first offending keys.
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
    try:
        weights = spec.convert(state, options)
    except ZooImportError as exc:   # the converters see tensors, not the file: name it, keeping their message
        named = _naming_file(exc, checkpoint)
        if named is exc:
            raise
        raise named from exc
    for name, what in weights.assumed.items():   # guesses, not read from the weights: said aloud, and recorded
        warnings.warn(f"{kind}: {checkpoint}: {name} {what}", UserWarning, stacklevel=2)
    try:
        backbone = create_backbone(weights.backbone, **weights.init_args)
        backbone.load_state_dict(weights.state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ZooImportError(kind, f"the weights do not load into {weights.backbone} {weights.init_args}: {exc} "
                                   f"(checkpoint {checkpoint})") from exc
    return backbone.eval(), weights


def _naming_file(exc: ZooImportError, checkpoint: str | os.PathLike) -> ZooImportError:
    """``exc`` with ``checkpoint`` in its message: ``"<kind>: <original message> (checkpoint <checkpoint>)"``, so the
    original message is kept as it was, first.

    Args:
        exc: an error raised while converting the state dict read from ``checkpoint`` (key / shape / option
            checks, which see tensors only).
        checkpoint: the file the state dict was read from.

    Returns:
        A new :class:`ZooImportError` of the same kind, which the caller raises ``from exc``; ``exc`` itself when
        its message names the file already.
    """
    path = str(checkpoint)
    message = str(exc)
    if path in message:
        return exc
    prefix = f"{exc.kind}: "
    detail = message[len(prefix):] if message.startswith(prefix) else message
    return ZooImportError(exc.kind, f"{detail} (checkpoint {path})")


def _extra(spec: ZooKind, checkpoint: Path, weights: ImportedWeights, options: Mapping[str, Any],
           window: int) -> dict[str, Any]:
    """The ``extra`` block of an imported encoder or classifier: input rate and window, provenance and the import
    record (``zoo``), and the leads of the peer's training records (``trained_leads``).

    ``trained_leads`` is the peer's input lead order (:attr:`ZooKind.lead_order`) written as a sweep writes it: the
    canonical names in the canonical order. The peers were trained on records holding every lead they read, and
    the API and the explain stage act on it as on a sweep's classifier: a record without III / aVR / aVL / aVF but
    with I and II gets them derived, a record missing a lead the model reads is warned about (it used to be scored
    with a zero row, silently), and one sharing none of them is refused.

    Args:
        spec: the kind.
        checkpoint: the imported file (its name, size and sha256 are recorded).
        weights: the converted weights (architecture, what was inferred or assumed, ignored keys, head).
        options: the import options.
        window: the model's input length in samples.

    Returns:
        JSON-able plain data for ``export_encoder`` / ``save_classifier``.
    """
    pre = spec.preprocess(options)
    read = set(spec.lead_order(weights.init_args))
    return {
        "method": f"zoo:{spec.name}",
        "fs": pre.fs,
        "crop_samples": int(window),
        "trained_leads": [lead for lead in CANONICAL_LEADS if lead in read],
        "derive_limb_leads": True,   # trained on records holding every lead it reads (derives_limb_leads)
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


def _folder_lock(out: Path):
    """The lock :func:`ecgfm.artifacts.write_artifact` takes for the same folder (``.<name>.lock`` beside it,
    :func:`ecgfm.io.file_lock`), so an import and an artifact writer (or two imports) of one folder run one at a
    time. The lock file stays, as every writer's does: removing it while another process waits on it would let
    two writers hold "the" lock at once."""
    from ecgfm.io import file_lock

    return file_lock(out.parent / f".{out.name}.lock")


def _publish(out_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(folder)`` on a fresh folder beside ``out_dir`` and rename it to ``out_dir`` when it returns.

    Holds the lock file :func:`ecgfm.artifacts.write_artifact` takes for the same folder (:func:`_folder_lock`)
    from the existence check to the retitled model card: without it two imports (or an import and a sweep writing
    an artifact) into one folder could both pass the check and the later rename would silently replace the other's
    folder, or one's README could name the other's weights. ``write_artifact`` itself is not reused: it writes
    from tensors and a description, while the zoo writes through ``export_encoder`` / ``save_classifier`` and
    checks the reloaded result before the swap.

    Raises:
        FileExistsError: ``out_dir`` exists, is not an empty folder, and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.is_symlink():   # as write_artifact: a link to a versioned folder keeps linking, the folder is replaced
        out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        # checked under the lock: another writer may have filled the folder since the caller started
        if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
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


def _check_same(kind: str, reference: Callable[[torch.Tensor], torch.Tensor],
                loaded: Callable[[torch.Tensor], torch.Tensor], window: int, what: str = "embeddings") -> None:
    """The reloaded artifact must compute exactly what the imported model computes (guards every step in between).

    Args:
        kind: for the message.
        reference: ``(B, 12, window) -> output`` of the model in memory (e.g. ``backbone.embed``).
        loaded: the same of the reloaded artifact.
        window: input length in samples.
        what: the compared output, for the message.

    Raises:
        ZooImportError: the outputs differ, or the reloaded artifact does not run on a batch of the model's input.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, len(CANONICAL_LEADS), window, generator=g)
    with torch.no_grad():
        a = reference(x)
        try:
            b = loaded(x)
        except (RuntimeError, ValueError, IndexError) as exc:   # a misfit that only shows when the model runs
            raise ZooImportError(kind, f"the written artifact does not run on a ({2}, {len(CANONICAL_LEADS)}, "
                                       f"{window}) batch: {type(exc).__name__}: {exc}") from exc
    if a.shape != b.shape or not torch.equal(a, b):
        diff = (f"shape {tuple(b.shape)} vs {tuple(a.shape)}" if a.shape != b.shape else
                f"max abs difference {(a - b).abs().max().item():.3g}")
        raise ZooImportError(kind, f"the written artifact does not reproduce the imported model's {what} ({diff})")


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
        _check_same(kind, backbone.embed, load_encoder(folder)[0].embed, window)

    return _publish(out_dir, overwrite, write)


def _multilabel(spec: ZooKind, multilabel: bool | None) -> tuple[bool, str]:
    """The head's output activation (True: sigmoid, False: softmax) and where it comes from.

    Not in the weights, and a wrong one gives plausible but wrong probabilities (sigmoid over a softmax-trained
    head: rows summing to ~C/2 with no error), so it is never guessed: the caller's ``multilabel``, else the kind's
    activation where the peer's own code fixes it (:attr:`ZooKind.head_multilabel`), else an error.

    Raises:
        ZooImportError: ``multilabel`` is not a bool, or None for a kind whose heads' activation is the
            fine-tuner's choice.
    """
    if multilabel is not None:
        if not isinstance(multilabel, bool):   # "false" or 0.0 would be read as a truth value
            raise ZooImportError(spec.name, f"multilabel must be True (sigmoid) or False (softmax), got "
                                            f"{type(multilabel).__name__} {multilabel!r}")
        return multilabel, "option multilabel (--multilabel / --multiclass)"
    if spec.head_multilabel is not None:
        return spec.head_multilabel, spec.head_multilabel_source
    raise ZooImportError(spec.name, f"the output activation of the checkpoint's head (sigmoid or softmax) is not "
                                    f"stored in the weights, and {spec.name} does not fix it "
                                    f"({spec.head_multilabel_source}): pass "
                                    f"multilabel=False (--multiclass) for a head trained with cross-entropy "
                                    f"(softmax, one class per record) or multilabel=True (--multilabel) for one "
                                    f"trained with binary cross-entropy (sigmoid, independent labels)")


def import_classifier(kind: str, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      class_names: Sequence[str] | None = None, multilabel: bool | None = None,
                      overwrite: bool = False, **options: Any) -> Path:
    """Import a peer checkpoint with its classification layer as an ecgfm classifier artifact folder.

    Args:
        kind: a kind whose checkpoint holds a head (``ecgfounder``: ``dense``; a fine-tuned ``stmem``: ``head``).
        checkpoint: the local weights file.
        out_dir: the classifier folder to create.
        class_names: the ``C`` output names in order (default ``class_0 .. class_{C-1}``).
        multilabel: True: sigmoid outputs (independent labels); False: softmax (one class per record). None (the
            default) takes the kind's activation where the peer's code fixes it (``ecgfounder``: sigmoid, its heads
            are trained with ``BCEWithLogitsLoss``) and is an error otherwise (``stmem``: the fine-tuner chose the
            loss; ST-MEM's recipe defaults to cross-entropy, i.e. ``multilabel=False``). Recorded with its source
            in ``extra.zoo.head``.
        overwrite: replace an existing non-empty ``out_dir``.
        **options: as :func:`import_encoder`.

    Returns:
        ``out_dir`` (loads with :func:`ecgfm.explain.classifier.load_classifier`).

    Raises:
        FileNotFoundError, FileExistsError: see :func:`import_encoder`.
        ZooImportError: as :func:`load_peer` (including a head that is not ``(C, D)`` on the ``D``-wide embedding
            or whose bias is not ``(C,)``); no head in the checkpoint; ``class_names`` not ``C`` long or naming
            a class twice; no ``multilabel`` for a kind without a fixed activation; the written classifier does
            not reload or does not give the imported model's logits. Nothing is left at ``out_dir``.
    """
    from ecgfm.artifacts import load_classifier
    from ecgfm.explain.classifier import save_classifier

    spec = _kind(kind)
    backbone, weights = load_peer(kind, checkpoint, **options)
    if weights.head is None:
        raise ZooImportError(kind, f"{checkpoint} holds no classification layer to import as a classifier "
                                   f"(import it as an encoder instead)")
    multilabel, activation_from = _multilabel(spec, multilabel)
    w = weights.head["weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in weights.head)
    try:   # the converters check the shapes; this keeps any misfit they miss a ZooImportError (one CLI line)
        head.load_state_dict(weights.head, strict=True)
    except RuntimeError as exc:
        raise ZooImportError(kind, f"{checkpoint}: the classification layer does not load into a linear head "
                                   f"{tuple(w.shape)}: {exc}") from exc
    head.eval()
    names = [str(c) for c in class_names] if class_names is not None else [f"class_{i}" for i in range(w.shape[0])]
    if len(names) != w.shape[0]:
        raise ZooImportError(kind, f"{len(names)} class names given for a head with {w.shape[0]} outputs")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:   # the names are predict_proba's columns: one twice gave duplicate DataFrame columns
        raise ZooImportError(kind, f"class names {twice} are given more than once ({names}): every output needs "
                                   f"its own name")
    window = spec.window(weights.init_args, options)
    pre = spec.preprocess(options)
    extra = _extra(spec, Path(checkpoint), weights, options, window)
    extra["zoo"]["head"].update(multilabel=multilabel, activation="sigmoid" if multilabel else "softmax",
                                activation_from=activation_from)

    def write(folder: Path) -> None:
        save_classifier(folder, backbone, head, pre, names, multilabel, fs=pre.fs, n_samples=window,
                        lead_names=CANONICAL_LEADS,
                        head_spec={"name": "linear", "args": {"in_dim": int(w.shape[1]),
                                                              "num_classes": int(w.shape[0]),
                                                              "bias": "bias" in weights.head}},
                        extra=extra)
        # as import_encoder: reload what was written and run it once before it replaces anything at out_dir
        try:
            model, _, meta = load_classifier(folder)
        except ValueError as exc:   # ArtifactError: the file and the problem
            raise ZooImportError(kind, f"the written classifier does not reload: {exc}") from exc
        if meta.get("multilabel") is not multilabel:
            raise ZooImportError(kind, f"the written classifier says multilabel={meta.get('multilabel')!r}, "
                                       f"expected {multilabel}")
        _check_same(kind, lambda x: head(backbone.embed(x)), model, window, what="logits")

    return _publish(out_dir, overwrite, write)
