"""Classifier artifacts as :class:`~ecgfm.explain.wrapper.ECGWrapper` objects, and quick classifier training for
the explain stage's demos.

The on-disk format is the one artifact format of :mod:`ecgfm.artifacts` (kind ``classifier``); this module only
adapts it to the explain stage: :func:`save_classifier` keeps the argument names the explain demos use and
:func:`load_classifier` returns a ready :class:`~ecgfm.explain.wrapper.ECGWrapper` carrying the preprocessing,
rate, lead order and class names.

:func:`train_classifier` fits a classifier on in-memory arrays with Lightning and ecgfm's
:class:`~ecgfm.evaluate.finetune.FinetuneModule` (the demo script, the notebook and the tests use it).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ecgfm import artifacts
from ecgfm.artifacts import HEADS, EncoderClassifier, head_description
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError
from ecgfm.evaluate.metrics import macro_auroc_ci
from ecgfm.explain.wrapper import ECGWrapper

__all__ = ["HEADS", "EncoderClassifier", "head_description", "save_classifier", "is_classifier_dir",
           "load_classifier", "classifier_info", "wrapper_from_artifact", "train_classifier",
           "train_synthetic_demo", "load_ptbxl_superdiagnostic", "train_ptbxl_demo"]

META_FILE = artifacts.meta_file("classifier")
WEIGHTS_FILE = artifacts.weights_file("classifier")


def save_classifier(out_dir: str | os.PathLike, backbone: nn.Module, head: nn.Module,
                    preprocess: PreprocessSpec | Mapping[str, Any] | None, class_names: Sequence[str],
                    multilabel: bool, fs: float | None = None, n_samples: int | None = None,
                    lead_names: Sequence[str] = CANONICAL_LEADS, head_spec: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a classifier artifact (:func:`ecgfm.artifacts.save_classifier`) with the explain demos' arguments
    (also used by the model zoo's importer), marked ``lead_aware: false``: these models were trained (or, imported,
    written) for zero-filled absent leads, not for a lead mask.

    Args:
        out_dir: directory (created).
        backbone: a registered backbone (built by :func:`ecgfm.backbones.create_backbone`).
        head: ``(B, D) -> (B, C)`` module.
        preprocess: preprocessing the classifier was trained with (its ``fs`` is the model rate unless ``fs``).
        class_names: the ``C`` output names.
        multilabel: sigmoid outputs (else softmax).
        fs: model rate in Hz (default ``preprocess.fs``).
        n_samples: fixed input length (the window), if any.
        lead_names: lead order of the input rows.
        head_spec: ``{"name": key of HEADS, "args": {...}}`` (default: recognised from the head's layers).
        extra: JSON-able information (training data, metrics); ``data`` / ``val_macro_auroc`` also go to the
            model card, and so does a ``provenance`` dict (licence, citation, source: the model zoo's), merged into
            the artifact's provenance as :func:`ecgfm.export.export_encoder` does.

    Returns:
        ``out_dir``.
    """
    extra = dict(extra or {})
    evaluation = {"validation macro AUROC": extra["val_macro_auroc"]} if "val_macro_auroc" in extra else None
    provenance = {"data": extra["data"]} if "data" in extra else {}
    if isinstance(extra.get("provenance"), dict):
        # as export_encoder does for encoders: an imported model's licence, citation and source checksum (the
        # model zoo) belong on the classifier's card too; a non-commercial licence must not vanish with the head
        provenance.update(extra["provenance"])
    # the demo classifiers train on zero-filled absent leads (train_classifier passes no lead mask): a lead-aware
    # backbone must run them the same way, not on masked tokens it was never trained on
    return artifacts.save_classifier(out_dir, backbone, head, preprocess, class_names, multilabel, fs=fs,
                                     window_samples=n_samples, leads=lead_names, head_spec=head_spec,
                                     provenance=provenance or None, evaluation=evaluation, extra=extra,
                                     lead_aware=False)


def is_classifier_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a classifier artifact folder (or one of its files)."""
    return artifacts.artifact_kind(path) == "classifier"


def wrapper_from_artifact(model: nn.Module, spec: PreprocessSpec | None, meta: Mapping[str, Any]) -> ECGWrapper:
    """An :class:`ECGWrapper` around a loaded classifier artifact (:func:`ecgfm.artifacts.load_classifier`)."""
    return ECGWrapper.from_classifier(model, spec, meta, window="center")


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ECGWrapper:
    """Load a classifier artifact folder as an :class:`ECGWrapper`.

    Raises:
        ECGDataError: not a classifier folder (an encoder folder is told how to make one), missing or malformed
            files, unknown backbone / head, weights that do not fit (the file and the problem named).
    """
    try:
        model, spec, meta = artifacts.load_classifier(path, map_location=map_location)
    except artifacts.ArtifactError as exc:
        raise ECGDataError(exc.path, exc.problem) from exc
    return wrapper_from_artifact(model, spec, meta)


def classifier_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed description of a classifier artifact (version-2 layout)."""
    return artifacts.read_meta(path, "classifier")[1]


class _ArrayDataset(torch.utils.data.Dataset):
    """``{"x", "y", "index"}`` items from arrays, with an optional random circular time shift (training)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, shift: bool, seed: int):
        self.x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        self.y = torch.as_tensor(y)
        self.shift = shift
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if self.shift:
            x = torch.roll(x, int(torch.randint(0, x.shape[-1], (1,), generator=self.gen)), dims=-1)
        return {"x": x, "y": self.y[i], "index": torch.tensor(i)}


def train_classifier(backbone: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None = None,
                     y_val: np.ndarray | None = None, multilabel: bool = False, num_classes: int | None = None,
                     epochs: int = 10, batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4,
                     seed: int = 0, shift: bool = False, accelerator: str = "cpu") -> tuple[nn.Module, dict]:
    """Train ``backbone`` + a linear head on arrays with Lightning (:class:`FinetuneModule`).

    Args:
        backbone: registered backbone (modified in place).
        x_train: ``(N, L, T)`` float32 model-space inputs.
        y_train: ``(N,)`` int class indices, or ``(N, C)`` 0/1 indicators when ``multilabel``.
        x_val, y_val: optional validation arrays; the best epoch by validation macro AUROC is kept.
        multilabel: sigmoid / BCE (else softmax / CE).
        num_classes: ``C`` (default from the labels).
        epochs, batch_size, lr, weight_decay: recipe (AdamW, warm-up + cosine, no layer decay).
        seed: seed of initialisation and batch order.
        shift: random circular time shifts as augmentation.
        accelerator: Lightning accelerator.

    Returns:
        ``(head, info)``: the trained head (the backbone is trained in place) and ``{"epochs_run", "best_epoch",
        "best_val_macro_auroc", "seconds"}``.
    """
    import lightning as L

    from ecgfm.evaluate.finetune import VAL_METRIC, BestWeights, FinetuneModule

    t0 = time.perf_counter()
    L.seed_everything(int(seed), workers=True, verbose=False)
    y_train = np.asarray(y_train)
    if num_classes is None:
        num_classes = int(y_train.shape[1]) if multilabel else int(y_train.max()) + 1
    module = FinetuneModule(backbone, num_classes, multilabel, lr=lr, weight_decay=weight_decay, layer_decay=1.0,
                            warmup_epochs=min(1.0, epochs / 4), max_epochs=epochs, head="linear",
                            window_aggregate="prob")
    train_dl = torch.utils.data.DataLoader(_ArrayDataset(x_train, y_train, shift, seed), batch_size=batch_size,
                                           shuffle=True, drop_last=len(y_train) > batch_size,
                                           generator=torch.Generator().manual_seed(seed))
    callbacks, val_dl = [], None
    if x_val is not None and y_val is not None:
        val_dl = torch.utils.data.DataLoader(_ArrayDataset(x_val, np.asarray(y_val), False, seed),
                                             batch_size=max(batch_size, 64))
        callbacks.append(BestWeights(VAL_METRIC))
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # no "GPU available" / "Tip" chatter for a seconds-long fit
        lg.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(max_epochs=int(epochs), accelerator=accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=1.0 if val_dl else 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*validation_step.*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    best = callbacks[0] if callbacks else None
    info = {"epochs_run": int(trainer.current_epoch), "best_epoch": None if best is None else best.best_epoch,
            "best_val_macro_auroc": None if best is None else float(best.best), "seconds": time.perf_counter() - t0}
    backbone.eval()
    module.head.eval()
    return module.head, info


# ---------------------------------------------------------------------------------------------------------------
# Demo classifiers (explain.py without a checkpoint, scripts/train_explain_demo.py, notebooks/explain.ipynb)

# A small xresnet1d (~60 k parameters): trains in about a minute on 2 CPU cores on 400 PTB-XL records.
DEMO_BACKBONE = {"name": "resnet1d_tiny", "init_args": {"widths": [16, 32, 32, 64], "stem_widths": [16, 16, 16]}}


def _trained_leads(x: np.ndarray) -> list[str]:
    """The leads present in any of the training records ``x (N, 12, T)`` (preprocessed: an absent lead is a zero
    row), as a sweep writes ``extra.trained_leads``: canonical names in canonical order. The API and the explain
    stage check records against them (a record sharing none of them is refused, absent ones are named)."""
    seen = np.any(np.asarray(x) != 0, axis=(0, 2))
    return [lead for lead, m in zip(CANONICAL_LEADS, seen) if m]


def _predict(wrapper: ECGWrapper, x: np.ndarray, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([wrapper.predict_proba(torch.as_tensor(x[i:i + batch]))
                          for i in range(0, len(x), batch)]).numpy()


def train_synthetic_demo(out_dir: str | os.PathLike, n_records: int = 360, seed: int = 0, epochs: int = 12,
                         duration: float = 10.0, backbone: Mapping[str, Any] | None = None, lr: float = 3e-3,
                         batch_size: int = 32) -> tuple[ECGWrapper, dict[str, Any]]:
    """Train and save a small single-label classifier of the synthetic classes (records at 500 Hz converted to
    100 Hz, z-scored; 80 % train / 20 % validation by record index).

    Returns:
        ``(wrapper, info)`` with the validation macro AUROC (95 % bootstrap CI) in ``info``; the artifact's
        ``extra.trained_leads`` names the leads of the training records (all 12), as a sweep's artifacts do.
    """
    from ecgfm.backbones.registry import create_backbone
    from ecgfm.data.preprocess import preprocess_signal
    from ecgfm.data.synthetic import SYNTHETIC_CLASSES, generate_arrays

    spec = PreprocessSpec(fs=100.0)
    x_raw, y, _ = generate_arrays(n_records, seed=seed, fs=500.0, duration=duration)
    x = np.stack([preprocess_signal(s, 500.0, np.ones(12, bool), spec)[0] for s in x_raw])
    n_tr = int(0.8 * len(y))
    bb_desc = dict(backbone or DEMO_BACKBONE)
    torch.manual_seed(seed)                                              # the backbone's initial weights
    bb = create_backbone(bb_desc["name"], **dict(bb_desc.get("init_args") or {}))
    head, info = train_classifier(bb, x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], multilabel=False,
                                  num_classes=len(SYNTHETIC_CLASSES), epochs=epochs, lr=lr, batch_size=batch_size,
                                  seed=seed)
    wrapper = ECGWrapper.from_encoder_and_head(bb, head, spec, class_names=SYNTHETIC_CLASSES,
                                               n_samples=x.shape[-1], postprocess="softmax")
    info["val_macro_auroc"] = macro_auroc_ci(y[n_tr:], _predict(wrapper, x[n_tr:]), n_boot=500, seed=0)
    info["data"] = (f"synthetic seed {seed} (500 Hz, {duration:g} s records): records 0-{n_tr - 1} train, "
                    f"{n_tr}-{len(y) - 1} validation")
    info["trained_leads"] = _trained_leads(x[:n_tr])
    save_classifier(out_dir, bb, head, spec, SYNTHETIC_CLASSES, multilabel=False, n_samples=x.shape[-1],
                    extra=info)
    return wrapper, info


def load_ptbxl_superdiagnostic(root: str | os.PathLike, spec: PreprocessSpec, max_id: int = 500
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """PTB-XL superdiagnostic data (labelled records with ``ecg_id <= max_id`` and at least one superclass).

    Returns:
        ``(x (N, 12, T) preprocessed, y (N, C) 0/1, folds (N,), record_ids, class_names)``.
    """
    from ecgfm.data.preprocess import preprocess_record
    from ecgfm.data.readers import PTBXLSource

    src = PTBXLSource(root, fs=100, include_unlabelled=False)
    labels = src.labels("superdiagnostic")
    folds = src.folds()
    ids = [r for r in src.record_ids() if int(r) <= max_id and labels.get(r)]
    classes = sorted({c for r in ids for c in labels[r]})
    xs = [preprocess_record(src.load(r), spec).signal for r in ids]
    y = np.array([[float(c in labels[r]) for c in classes] for r in ids], dtype=np.float32)
    return np.stack(xs), y, np.array([folds[r] for r in ids]), ids, classes


def train_ptbxl_demo(root: str | os.PathLike, out_dir: str | os.PathLike, epochs: int = 30, seed: int = 0,
                     lr: float = 3e-3, batch_size: int = 32, backbone: Mapping[str, Any] | None = None,
                     max_id: int = 500) -> tuple[ECGWrapper, dict[str, Any]]:
    """Train and save the explain demo classifier: PTB-XL superdiagnostic (multi-label), ids 1-``max_id`` at
    100 Hz, whole 10 s records, ``strat_fold`` 1-8 train / 9 validation (fold 10 untouched).

    Returns:
        ``(wrapper, info)``; ``info["val_macro_auroc"]`` is the fold-9 macro AUROC with a 95 % bootstrap CI (the
        model-selection value: the best epoch is chosen on fold 9, so optimistic), and ``info["trained_leads"]``
        (saved as the artifact's ``extra.trained_leads``, as a sweep writes it) the leads present in the training
        records, so that the API warns about a record's absent leads and refuses one sharing none of them.
    """
    from ecgfm.backbones.registry import create_backbone

    spec = PreprocessSpec(fs=100.0)
    x, y, folds, ids, classes = load_ptbxl_superdiagnostic(root, spec, max_id)
    tr, va = np.isin(folds, list(range(1, 9))), folds == 9
    bb_desc = dict(backbone or DEMO_BACKBONE)
    torch.manual_seed(seed)                                              # the backbone's initial weights
    bb = create_backbone(bb_desc["name"], **dict(bb_desc.get("init_args") or {}))
    head, info = train_classifier(bb, x[tr], y[tr], x[va], y[va], multilabel=True, epochs=epochs, lr=lr,
                                  batch_size=batch_size, seed=seed)
    wrapper = ECGWrapper.from_encoder_and_head(bb, head, spec, class_names=classes, n_samples=x.shape[-1],
                                               postprocess="sigmoid")
    info["val_macro_auroc"] = macro_auroc_ci(y[va], _predict(wrapper, x[va]), n_boot=500, seed=0)
    info.update(data=f"PTB-XL superdiagnostic, ecg_id <= {max_id}, 100 Hz; strat_fold 1-8 train "
                     f"({int(tr.sum())} records), 9 validation ({int(va.sum())})", classes=classes,
                trained_leads=_trained_leads(x[tr]))
    save_classifier(out_dir, bb, head, spec, classes, multilabel=True, n_samples=x.shape[-1], extra=info)
    return wrapper, info
