"""Saving, loading and quickly training an ecgfm classifier (encoder + head) for the explain stage.

``ecgfm.evaluate`` trains heads (:class:`~ecgfm.evaluate.finetune.FinetuneModule`) but keeps the best weights in
memory and writes no classifier to disk, so the explain stage defines the one on-disk classifier format here,
built like an exported encoder (:mod:`ecgfm.export`): no pickles.

A classifier directory holds

* ``classifier.safetensors``: the :class:`~ecgfm.explain.wrapper.EncoderClassifier` ``state_dict``
  (``encoder.*`` and ``head.*`` keys);
* ``classifier.json``: ``{"format": "ecgfm-classifier", "format_version": 1, "backbone": {"name",
  "init_args"}, "head": {"name", "args"}, "preprocess" (spec dict), "fs", "n_samples", "lead_names",
  "class_names", "postprocess", "extra"}``.

The backbone is rebuilt only through :func:`ecgfm.backbones.create_backbone` and the head only from
:data:`HEADS` (``linear``, ``linear_probe``, ``mlp``), so loading never instantiates an arbitrary class.
:func:`load_classifier` returns a ready :class:`~ecgfm.explain.wrapper.ECGWrapper` carrying the preprocessing,
rate, lead order and class names.

:func:`train_classifier` fits a classifier on in-memory arrays with Lightning and ecgfm's
:class:`~ecgfm.evaluate.finetune.FinetuneModule` (the demo script, the notebook and the tests use it).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError
from ecgfm.explain.wrapper import ECGWrapper, EncoderClassifier

FORMAT = "ecgfm-classifier"
FORMAT_VERSION = 1
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"


def _linear(in_dim: int, num_classes: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_dim, num_classes, bias=bias)


def _linear_probe(in_dim: int, num_classes: int, batch_norm: bool = True) -> nn.Module:
    from ecgfm.heads import LinearProbeHead

    return LinearProbeHead(in_dim, num_classes, batch_norm=batch_norm)


def _mlp(in_dim: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from ecgfm.heads import MLPHead

    return MLPHead(in_dim, num_classes, **kwargs)


# Head name -> factory(in_dim, num_classes, **args). Only these can be rebuilt from a classifier.json.
HEADS: dict[str, Callable[..., nn.Module]] = {"linear": _linear, "linear_probe": _linear_probe, "mlp": _mlp}


def head_description(head: nn.Module, num_classes: int | None = None) -> dict[str, Any]:
    """``{"name", "args"}`` rebuilding ``head`` through :data:`HEADS` (an ``nn.Linear`` is recognised; other
    heads need an explicit description, see :func:`save_classifier`)."""
    if isinstance(head, nn.Linear):
        return {"name": "linear", "args": {"in_dim": head.in_features, "num_classes": head.out_features,
                                           "bias": head.bias is not None}}
    raise ValueError(f"cannot describe a head of type {type(head).__name__} automatically: pass head_spec="
                     f"{{'name': one of {sorted(HEADS)}, 'args': {{...}}}}")


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable plain data: {exc}") from exc


def save_classifier(out_dir: str | os.PathLike, backbone: nn.Module, head: nn.Module,
                    preprocess: PreprocessSpec | Mapping[str, Any] | None, class_names: Sequence[str],
                    multilabel: bool, fs: float | None = None, n_samples: int | None = None,
                    lead_names: Sequence[str] = CANONICAL_LEADS, head_spec: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json``.

    Args:
        out_dir: directory (created).
        backbone: a registered backbone (built by :func:`ecgfm.backbones.create_backbone`).
        head: ``(B, D) -> (B, C)`` module.
        preprocess: preprocessing the classifier was trained with (its ``fs`` is the model rate unless ``fs``).
        class_names: the ``C`` output names.
        multilabel: sigmoid outputs (else softmax).
        fs: model rate in Hz (default ``preprocess.fs``).
        n_samples: fixed input length, if any.
        lead_names: lead order of the input rows.
        head_spec: ``{"name": key of HEADS, "args": {...}}`` (default: inferred for ``nn.Linear``).
        extra: JSON-able extra information (training data, metrics, command).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: unregistered backbone, unknown head, non-JSON-able arguments, class count mismatch.
    """
    from safetensors.torch import save_file

    from ecgfm.backbones.registry import list_backbones

    name = getattr(backbone, "name", "")
    if name not in list_backbones():
        raise ValueError(f"backbone name {name!r} is not registered (build it with ecgfm.backbones.create_backbone)")
    spec = None if preprocess is None else (preprocess if isinstance(preprocess, PreprocessSpec)
                                            else PreprocessSpec.from_dict(dict(preprocess)))
    fs = float(fs if fs is not None else (spec.fs if spec is not None and spec.fs is not None else float("nan")))
    if not np.isfinite(fs):
        raise ValueError("pass fs= (the preprocessing spec does not fix the sampling rate)")
    hs = dict(head_spec) if head_spec is not None else head_description(head)
    if hs.get("name") not in HEADS:
        raise ValueError(f"unknown head name {hs.get('name')!r}; known: {sorted(HEADS)}")
    model = EncoderClassifier(backbone, head)
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, len(lead_names), int(n_samples or round(2.5 * fs))))
    model.train(False)
    if out.shape[1] != len(class_names):
        raise ValueError(f"the head has {out.shape[1]} outputs but {len(class_names)} class_names were given")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "backbone": {"name": name, "init_args": _json(dict(getattr(backbone, "init_args", {})), "init_args")},
        "head": {"name": hs["name"], "args": _json(dict(hs.get("args", {})), "head args")},
        "preprocess": None if spec is None else spec.to_dict(),
        "fs": fs, "n_samples": None if n_samples is None else int(n_samples),
        "lead_names": list(lead_names), "class_names": [str(c) for c in class_names],
        "postprocess": "sigmoid" if multilabel else "softmax",
        "extra": _json(dict(extra or {}), "extra"),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out_path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_path


def is_classifier_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a classifier directory (or its JSON file)."""
    p = Path(path)
    return (p.is_dir() and (p / META_FILE).is_file()) or (p.name == META_FILE and p.is_file())


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ECGWrapper:
    """Load a classifier directory written by :func:`save_classifier` as an :class:`ECGWrapper`.

    Raises:
        ECGDataError: missing files, malformed JSON, wrong format, unknown backbone / head, weights that do not
            fit.
    """
    from safetensors.torch import load_file

    from ecgfm.backbones.registry import create_backbone, list_backbones

    p = Path(path)
    d = p.parent if p.name in (META_FILE, WEIGHTS_FILE) else p
    meta_path, weights_path = d / META_FILE, d / WEIGHTS_FILE
    for f in (meta_path, weights_path):
        if not f.is_file():
            raise ECGDataError(f, f"missing: a classifier directory needs {META_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ECGDataError(meta_path, f"not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ECGDataError(meta_path, f"not an ecgfm classifier description (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ECGDataError(meta_path, f"unsupported format_version {meta.get('format_version')!r}")
    bb = meta.get("backbone") or {}
    if bb.get("name") not in list_backbones():
        raise ECGDataError(meta_path, f"unknown backbone {bb.get('name')!r}; registered: {', '.join(list_backbones())}")
    hd = meta.get("head") or {}
    if hd.get("name") not in HEADS:
        raise ECGDataError(meta_path, f"unknown head {hd.get('name')!r}; known: {sorted(HEADS)}")
    try:
        backbone = create_backbone(bb["name"], **dict(bb.get("init_args") or {}))
        head = HEADS[hd["name"]](**dict(hd.get("args") or {}))
    except (TypeError, ValueError) as exc:
        raise ECGDataError(meta_path, f"cannot build the classifier: {exc}") from exc
    model = EncoderClassifier(backbone, head)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise ECGDataError(weights_path, f"cannot read safetensors weights: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ECGDataError(weights_path, f"weights do not fit the described classifier: {exc}") from exc
    spec = PreprocessSpec.from_dict(meta["preprocess"]) if meta.get("preprocess") is not None else None
    return ECGWrapper(model.to(map_location).eval(), fs=float(meta["fs"]),
                      lead_names=tuple(meta.get("lead_names") or CANONICAL_LEADS), preprocess=spec,
                      postprocess=meta.get("postprocess", "softmax"), class_names=meta.get("class_names"),
                      n_samples=meta.get("n_samples"), encoder=backbone)


def classifier_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``classifier.json`` of a classifier directory."""
    p = Path(path)
    d = p.parent if p.name in (META_FILE, WEIGHTS_FILE) else p
    return json.loads((d / META_FILE).read_text())


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
                            warmup_epochs=min(1.0, epochs / 4), max_epochs=epochs, head="linear")
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


def _macro_auroc_ci(y: np.ndarray, p: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict[str, float]:
    """Macro AUROC with a percentile bootstrap 95 % CI over records (classes without both labels skipped)."""
    from sklearn.metrics import roc_auc_score

    def macro(yy: np.ndarray, pp: np.ndarray) -> float:
        if yy.ndim == 1:
            yy = np.eye(pp.shape[1])[yy]
        cols = [c for c in range(yy.shape[1]) if 0 < yy[:, c].sum() < len(yy)]
        return float(np.mean([roc_auc_score(yy[:, c], pp[:, c]) for c in cols])) if cols else float("nan")

    rng = np.random.default_rng(seed)
    boots = [macro(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    boots = np.asarray([b for b in boots if np.isfinite(b)])
    return {"value": macro(y, p), "lo": float(np.quantile(boots, 0.025)) if boots.size else float("nan"),
            "hi": float(np.quantile(boots, 0.975)) if boots.size else float("nan"), "n_records": int(len(y))}


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
        ``(wrapper, info)`` with the validation macro AUROC (95 % bootstrap CI) in ``info``.
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
    info["val_macro_auroc"] = _macro_auroc_ci(y[n_tr:], _predict(wrapper, x[n_tr:]))
    info["data"] = f"synthetic seed {seed}: records 0-{n_tr - 1} train, {n_tr}-{len(y) - 1} validation"
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
        ``(wrapper, info)``; ``info["val_macro_auroc"]`` is the fold-9 macro AUROC with a 95 % bootstrap CI.
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
    info["val_macro_auroc"] = _macro_auroc_ci(y[va], _predict(wrapper, x[va]))
    info.update(data=f"PTB-XL superdiagnostic, ecg_id <= {max_id}, 100 Hz; strat_fold 1-8 train "
                     f"({int(tr.sum())} records), 9 validation ({int(va.sum())})", classes=classes)
    save_classifier(out_dir, bb, head, spec, classes, multilabel=True, n_samples=x.shape[-1], extra=info)
    return wrapper, info
