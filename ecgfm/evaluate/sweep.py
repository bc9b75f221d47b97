"""The entry points behind ``probe.py`` and ``finetune.py``: one results cell per (mode, task, checkpoint,
label fraction, seed), resumable, filed as JSON and gathered into one table.

A Hydra multirun such as::

    python probe.py -m checkpoint=runs/mae/encoder,random:runs/mae/encoder task=ptbxl_super,cinc2017 \\
        fraction=0.01,0.1,1 seed=0,1,2

runs one job per combination. Each job

1. skips at once when its cell file exists (unless ``overwrite=true``): a rerun only does the missing cells;
2. resolves ``checkpoint``: a path to an exported encoder (:func:`ecgfm.export.load_encoder`), or
   ``random:<backbone name | export path>`` (same architecture, random weights from ``init_seed``: the
   random-init twin), or ``supervised:<backbone name | export path>`` (fine-tuning only: supervised training
   from scratch with the ``supervised`` recipe);
3. builds the task (:mod:`ecgfm.evaluate.tasks`) on a cache prepared with the *encoder's* preprocessing;
4. runs the leakage guard (:mod:`ecgfm.evaluate.leakage`) on the test split (and the external set);
5. probe: loads / extracts the frozen features (:mod:`ecgfm.evaluate.features`; one encoder pass per
   checkpoint and corpus for the whole sweep) and trains the heads (:func:`ecgfm.evaluate.probe.run_probe_grid`);
   fine-tune: trains the whole network (:func:`ecgfm.evaluate.finetune.run_finetune`);
6. writes the cell atomically and rebuilds ``results.csv`` / ``results.md`` / ``results.png``
   (:mod:`ecgfm.evaluate.report`) in ``results_dir``.

``fraction`` and ``seed`` may also be lists in a single run (``'fraction=[0.1,1]' 'seed=[0,1,2]'``): the probe
then trains every head of the grid in one process on one feature extraction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ecgfm.conf import config_dir
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.evaluate.features import cached_features, encoder_fingerprint
from ecgfm.evaluate.leakage import check_leakage, index_identities, pretrain_identities
from ecgfm.evaluate.metrics import choose_thresholds, evaluate_scores
from ecgfm.evaluate.report import build_report
from ecgfm.evaluate.tasks import TaskData, TaskSpec, build_task

log = logging.getLogger(__name__)
KEYWORDS = ("random", "supervised")


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclass
class Encoder:
    """A resolved ``checkpoint`` value."""

    checkpoint: str
    kind: str  # "pretrained" | "random" | "supervised"
    method: str
    backbone: torch.nn.Module | None
    preprocess: PreprocessSpec
    info: dict[str, Any] = field(default_factory=dict)
    crop_samples: int | None = None
    export_dir: str | None = None

    @property
    def backbone_name(self) -> str:
        return str(getattr(self.backbone, "name", self.info.get("name", "?")))


def checkpoint_slug(checkpoint: str) -> str:
    """Readable, file-system safe cell folder name of a checkpoint value (+ a short hash against collisions)."""
    text = str(checkpoint)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _method_of(info: dict[str, Any], path: str) -> str:
    method = str((info.get("extra") or {}).get("method") or "").strip()
    if method:
        return re.sub(r"module$", "", method, flags=re.IGNORECASE).lower() or method
    return Path(path).resolve().name


def _backbone_from_conf(name: str, crop_samples: int, overrides: dict[str, Any]) -> torch.nn.Module:
    """Build ``name`` the way pretraining does: ``conf/backbone/<name>.yaml`` (with ``crop_samples``) when it
    exists, else :func:`ecgfm.backbones.create_backbone` with ``overrides``."""
    from hydra.utils import instantiate

    from ecgfm.backbones import create_backbone

    conf = config_dir() / "backbone" / f"{name}.yaml"
    if conf.is_file():
        node = OmegaConf.create({"crop_samples": int(crop_samples), "b": OmegaConf.load(conf)})
        cfg = OmegaConf.to_container(node, resolve=True)["b"]
        cfg.update(overrides)
        return instantiate(cfg, _convert_="all")
    return create_backbone(name, **overrides)


def resolve_checkpoint(checkpoint: str, crop_samples: int, init_seed: int = 0,
                       backbone_args: dict[str, Any] | None = None, preprocess: PreprocessSpec | None = None,
                       load_weights: bool = True) -> Encoder:
    """Turn a ``checkpoint`` value into an :class:`Encoder` (see the module docstring).

    Args:
        checkpoint: export path, ``random:<name|path>`` or ``supervised:<name|path>``.
        crop_samples: window length used when a registry name must be built (ViT ``seq_len``).
        init_seed: torch seed of random initialisations.
        backbone_args: constructor overrides for registry names.
        preprocess: preprocessing override (default: the export's, or ``PreprocessSpec()`` for registry names).
        load_weights: build the network (False: only the description, for cheap skip checks).
    """
    from ecgfm.export import load_encoder

    text = str(checkpoint).strip()
    kind, _, target = text.partition(":")
    if kind in KEYWORDS and target:
        info: dict[str, Any] = {}
        export_dir = None
        if Path(target).is_dir():
            export_dir = target
            meta = Path(target) / "encoder.json"
            if not meta.is_file():
                raise FileNotFoundError(f"checkpoint {text!r}: {meta} missing (a random twin copies the architecture "
                                        f"of an exported encoder folder)")
            info = json.loads(meta.read_text())
            spec = PreprocessSpec.from_dict(info.get("preprocess"))
            crop = (info.get("extra") or {}).get("crop_samples")
            backbone = None
            if load_weights:
                from ecgfm.backbones import create_backbone

                torch.manual_seed(int(init_seed))
                backbone = create_backbone(info["name"], **dict(info.get("init_args") or {}))
        else:
            spec = PreprocessSpec()
            crop = None
            backbone = None
            if load_weights:
                torch.manual_seed(int(init_seed))
                backbone = _backbone_from_conf(target, crop_samples, dict(backbone_args or {}))
        method = "random-init" if kind == "random" else "supervised"
        return Encoder(text, kind, method, backbone, preprocess or spec, info, crop, export_dir)
    if ":" in text and not Path(text).exists() and kind not in KEYWORDS and len(kind) > 1:
        raise ValueError(f"checkpoint {text!r}: unknown keyword {kind!r}; use a path to an exported encoder, "
                         f"random:<backbone|path> or supervised:<backbone|path>")
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {text!r}: no such exported encoder folder (expected encoder.json + "
                                f"encoder.safetensors, written by train.py / ecgfm.export.export_encoder)")
    if load_weights:
        backbone, spec, info = load_encoder(path)
    else:
        meta = path / "encoder.json" if path.is_dir() else path.parent / "encoder.json"
        info = json.loads(meta.read_text())
        spec, backbone = PreprocessSpec.from_dict(info.get("preprocess")), None
    export_dir = str(path if path.is_dir() else path.parent)
    crop = (info.get("extra") or {}).get("crop_samples")
    return Encoder(text, "pretrained", _method_of(info, export_dir), backbone, preprocess or spec, info,
                   None if crop is None else int(crop), export_dir)


# ------------------------------------------------------------------------------------------------ helpers
def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return list(value)
    return [value]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) \
        else node


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def cell_path(results_dir: str | os.PathLike, mode: str, task: str, checkpoint: str, fraction: float, seed: int,
              eval_name: str | None = None) -> Path:
    """Where one cell's JSON lives; the path is the cell's identity (rerun skip check)."""
    task_dir = task if not eval_name else f"{task}@{eval_name}"
    return (Path(results_dir) / "cells" / mode / task_dir / checkpoint_slug(checkpoint)
            / f"f{float(fraction):g}_s{int(seed)}.json")


def _window(cfg: DictConfig, task_crop_seconds: float, fs: float, encoder_crop: int | None) -> int:
    if cfg.get("window_seconds") is not None:
        return int(round(float(cfg.window_seconds) * fs))
    if encoder_crop:
        return int(encoder_crop)
    return int(round(task_crop_seconds * fs))


def _pretraining_identities(enc: Encoder, extra_caches: Sequence[str]) -> tuple[dict, list[str]]:
    """Identities of the encoder's pretraining data: encoder.json, the run's summary.json, explicit caches."""
    caches = [str(c) for c in extra_caches]
    if enc.export_dir is not None and enc.kind == "pretrained":
        summary = Path(enc.export_dir).parent / "summary.json"
        extra = enc.info.get("extra") or {}
        if not extra.get("pretrain_record_keys") and not extra.get("pretrain_caches") and summary.is_file():
            for c in json.loads(summary.read_text()).get("cache_dirs") or []:
                # older train.py runs recorded the cache folders as given, relative to where they ran
                p = Path(str(c))
                if not p.is_absolute() and not p.exists():
                    p = Path.cwd() / p
                caches.append(str(p))
    return pretrain_identities(enc.info if enc.kind == "pretrained" else {}, caches)


def leakage_check(enc: Encoder, task: TaskData, external: TaskData | None, allow: bool,
                  pretrain_caches: Sequence[str]) -> dict[str, Any]:
    """Run the leakage guard for the test split (and the external set); returns a JSON-able report."""
    if enc.kind != "pretrained" and not pretrain_caches:
        return {"checked": True, "leaked": False, "note": f"{enc.method}: no pretraining data"}
    pre, provenance = _pretraining_identities(enc, pretrain_caches)
    if not provenance:
        log.warning("leakage not checked for %s: its pretraining data is unknown (encoder.json has no "
                    "extra.pretrain_caches / pretrain_record_keys and no summary.json beside it; pass "
                    "pretrain_caches=[...])", enc.checkpoint)
        return {"checked": False, "leaked": False, "note": "pretraining data unknown"}
    out: dict[str, Any] = {"provenance": provenance}
    parts = [("test", task, task.splits["test"])]
    if external is not None:
        parts.append((f"external:{external.dataset}", external, external.splits["test"]))
    for name, t, rows in parts:
        rep = check_leakage(pre, index_identities(t.cache.index, rows), allow=allow,
                            what=f"{t.name} {name} split ({t.dataset})")
        out[name] = rep.to_dict()
    out["checked"] = True
    out["leaked"] = any(v.get("leaked") for k, v in out.items() if isinstance(v, dict))
    return out


@dataclass
class _Context:
    cfg: DictConfig
    mode: str
    task_spec: TaskSpec
    eval_spec: TaskSpec | None
    fractions: list[float]
    seeds: list[int]
    results_dir: Path


def _context(cfg: DictConfig, mode: str) -> _Context:
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    task_spec = TaskSpec.from_config(cfg.task)
    eval_node = cfg.get("eval_data")
    eval_spec = TaskSpec.from_config(eval_node) if eval_node else None
    if eval_spec is not None and eval_spec.split.get("kind") != "all":
        eval_spec.split = {"kind": "all"}  # an external set is test data only
    fractions = [float(f) for f in _as_list(cfg.fraction)]
    seeds = [int(s) for s in _as_list(cfg.seed)]
    return _Context(cfg, mode, task_spec, eval_spec, fractions, seeds, Path(str(cfg.results_dir)))


def _todo(ctx: _Context, checkpoint: str) -> list[tuple[float, int]]:
    """Cells of this job still to compute: missing ones, and (for exported encoders) ones whose stored encoder
    fingerprint differs from the weights now at that path (a retrained encoder never reuses stale cells)."""
    eval_name = ctx.eval_spec.name if ctx.eval_spec else None
    out = []
    current: str | None = None
    for s in ctx.seeds:
        for f in ctx.fractions:
            p = cell_path(ctx.results_dir, ctx.mode, ctx.task_spec.name, checkpoint, f, s, eval_name)
            if ctx.cfg.get("overwrite") or not p.exists():
                out.append((f, s))
                continue
            if ":" in checkpoint.split("/")[0]:  # random:/supervised: weights are a function of the config
                continue
            stored = json.loads(p.read_text()).get("encoder_fingerprint")
            if current is None:
                from ecgfm.export import load_encoder

                current = encoder_fingerprint(load_encoder(checkpoint)[0])
            if stored != current:
                log.warning("%s: the encoder at %s changed since this cell was computed: recomputing", p, checkpoint)
                out.append((f, s))
    return out


def _prepare(ctx: _Context, enc: Encoder) -> tuple[TaskData, TaskData | None]:
    cfg = ctx.cfg
    cache_root = str(cfg.paths.cache_root)
    workers = int(cfg.get("prepare_workers", 0))
    task = build_task(ctx.task_spec, cache_root, enc.preprocess, workers=workers)
    ext = None
    if ctx.eval_spec is not None:
        ext = build_task(ctx.eval_spec, cache_root, enc.preprocess, classes=task.class_names, workers=workers)
    return task, ext


def _cell_common(ctx: _Context, enc: Encoder, task: TaskData, ext: TaskData | None, window: int, stride: int,
                 leakage: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": ctx.mode, "task": task.name, "dataset": task.dataset, "method": enc.method,
        "checkpoint": enc.checkpoint, "checkpoint_kind": enc.kind, "backbone": enc.backbone_name,
        "encoder_fingerprint": encoder_fingerprint(enc.backbone) if enc.backbone is not None else None,
        "preprocess": enc.preprocess.to_dict(), "window_samples": int(window), "stride_samples": int(stride),
        "fs": float(task.cache.fs or 0.0), "classes": task.class_names, "multilabel": task.multilabel,
        "splits": {k: int(len(v)) for k, v in task.splits.items()}, "task_notes": task.notes,
        "external_dataset": ext.dataset if ext is not None else None,
        "external_notes": ext.notes if ext is not None else None, "leakage": leakage,
        "cache_dir": task.cache_dir,
    }


def _in_multirun() -> bool:
    """True inside a job of a Hydra multirun (the sweep's ReportCallback then builds the table once at the end)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def _finish(ctx: _Context, written: list[str], skipped: int, t0: float) -> dict[str, Any]:
    when = str(ctx.cfg.get("report", "auto"))
    report = None
    if when == "always" or (when == "auto" and not _in_multirun()):
        report = build_report(ctx.results_dir, plot=bool(ctx.cfg.get("plot", True)))
    out = {"cells_written": written, "cells_skipped": skipped, "report": report,
           "seconds": time.perf_counter() - t0}
    log.info("%s: %d cell(s) written, %d skipped in %s%s", ctx.mode, len(written), skipped, ctx.results_dir,
             f"; table {report['markdown']}" if report else "")
    return out


try:  # Hydra >= 1.1
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class ReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (``hydra.callbacks.report`` in conf/probe.yaml and conf/finetune.yaml): after a multirun,
    rebuild the results table and plot once from every cell (also after a SLURM sweep via submitit)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.get("report", "auto")) == "never":
            return
        out = build_report(str(config.results_dir), plot=bool(config.get("plot", True)))
        log.info("sweep finished: %d cells; table %s", out["n_cells"], out["markdown"])


# ------------------------------------------------------------------------------------------------ probe
def probe_main(cfg: DictConfig) -> dict[str, Any]:
    """Linear / MLP probe cells (``conf/probe.yaml``). Returns a summary (cells written / skipped, report paths).

    Raises:
        ValueError: ``supervised:`` checkpoints (a fine-tuning baseline), bad task or probe settings.
        LeakageError: pretraining and test data overlap and ``allow_leakage`` is false.
    """
    t0 = time.perf_counter()
    mode = str(cfg.probe.mode)
    ctx = _context(cfg, mode)
    checkpoint = str(cfg.checkpoint)
    if checkpoint.startswith("supervised:"):
        raise ValueError(f"checkpoint {checkpoint!r}: 'supervised:' is a fine-tuning baseline (supervised training "
                         f"from scratch); run it with finetune.py. For frozen random features use 'random:'.")
    todo = _todo(ctx, checkpoint)
    n_all = len(ctx.fractions) * len(ctx.seeds)
    if not todo:
        log.info("every cell of %s / %s / %s exists: nothing to do", mode, ctx.task_spec.name, checkpoint)
        return _finish(ctx, [], n_all, t0)
    probe_cfg = cfg.probe
    override = _spec_override(cfg)
    fs_guess = float((override or PreprocessSpec()).fs or 100.0)
    enc = resolve_checkpoint(checkpoint, _window(cfg, ctx.task_spec.crop_seconds, fs_guess, None),
                             int(cfg.init_seed), _container(cfg.get("backbone_args")) or {}, override)
    task, ext = _prepare(ctx, enc)
    leakage = leakage_check(enc, task, ext, bool(cfg.allow_leakage), _container(cfg.pretrain_caches) or [])
    fs = float(task.cache.fs or 100.0)
    window = _window(cfg, ctx.task_spec.crop_seconds, fs, enc.crop_samples)
    stride = int(round(float(cfg.stride_seconds) * fs)) if cfg.get("stride_seconds") is not None \
        else task.stride_samples
    feat_dir = str(cfg.features.dir)
    assert enc.backbone is not None
    efp = encoder_fingerprint(enc.backbone)
    feats = cached_features(enc.backbone, task.cache, window, stride, feat_dir,
                            batch_size=int(cfg.features.batch_size), device=str(cfg.device), encoder_fp=efp)
    external = {}
    if ext is not None:
        efeats = cached_features(enc.backbone, ext.cache, window, stride, feat_dir,
                                 batch_size=int(cfg.features.batch_size), device=str(cfg.device), encoder_fp=efp)
        external[f"external:{ext.dataset}"] = (efeats, ext.labels, ext.splits["test"])
    from ecgfm.evaluate.probe import ProbeData, run_probe_grid

    data = ProbeData(features=feats, labels=task.labels, splits=task.splits, multilabel=task.multilabel,
                     class_names=task.class_names, patient_ids=list(task.patient_ids), external=external)
    common = _cell_common(ctx, enc, task, ext, window, stride, leakage)
    common["feature_key"] = feats.key
    common["feature_seconds"] = feats.seconds
    written = []
    eval_name = ctx.eval_spec.name if ctx.eval_spec else None
    for seed in sorted({s for _, s in todo}):
        fracs = [f for f, s in todo if s == seed]
        results = run_probe_grid(
            data, fractions=fracs, seeds=[seed], mode=mode, Cs=[float(c) for c in probe_cfg.Cs],
            lrs=[float(x) for x in probe_cfg.lrs], aggregate=str(probe_cfg.aggregate),
            n_boot=int(cfg.bootstrap.n), bootstrap_seed=int(cfg.bootstrap.seed), max_iter=int(probe_cfg.max_iter),
            mlp_kwargs=_container(probe_cfg.mlp) or {})
        for r in results:
            cell = dict(common, fraction=r["fraction"], seed=r["seed"], n_train=r["n_train"],
                        hparam=r["hparam"], grid=r["grid"], val_macro_auroc=r["val_macro_auroc"],
                        results={"test": r["test"], **r["external"]}, seconds=r["seconds"],
                        probe={"aggregate": str(probe_cfg.aggregate), "head": mode},
                        predictions=_predictions(r["predictions"], task, ext))
            p = cell_path(ctx.results_dir, mode, task.name, checkpoint, r["fraction"], r["seed"], eval_name)
            _atomic_json(p, cell)
            written.append(str(p))
            _log_cell(cell)
    return _finish(ctx, written, n_all - len(todo), t0)


def _predictions(preds: dict[str, tuple[np.ndarray, np.ndarray]], task: TaskData, ext: TaskData | None
                 ) -> dict[str, Any]:
    """Record-level test (and external) predictions for paired comparisons between methods: record keys,
    targets (indicator rows) and scores at full float64 precision (rounding ties near-one-hot fine-tuned
    probabilities and destroys their ranking: a stored-score AUROC of 0.547 against 0.721 was seen)."""
    out = {}
    for split, (rows, p) in preds.items():
        t = task if split == "test" else ext
        assert t is not None
        rows = np.asarray(rows, dtype=np.int64)
        out[split] = {"keys": t.record_keys(rows), "y": t.labels[rows].astype(np.int8).tolist(),
                      "scores": np.asarray(p, dtype=np.float64).tolist()}
    return out


def _spec_override(cfg: DictConfig) -> PreprocessSpec | None:
    node = cfg.get("preprocess")
    return None if node is None else PreprocessSpec.from_dict(_container(node))


def _log_cell(cell: dict[str, Any]) -> None:
    for split, m in cell["results"].items():
        a = m["macro_auroc"]
        log.info("%s | %s | %s | %s | fraction %g | seed %d | %s (n=%d): macro AUROC %.3f [95%% CI %.3f, %.3f]",
                 cell["mode"], cell["task"], cell["dataset"], cell["method"], cell["fraction"], cell["seed"], split,
                 m["n"], a["value"], a["ci_low"], a["ci_high"])


# ------------------------------------------------------------------------------------------------ fine-tune
def finetune_main(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tuning / supervised-from-scratch cells (``conf/finetune.yaml``); same cell layout as the probe."""
    t0 = time.perf_counter()
    ctx = _context(cfg, "finetune")
    checkpoint = str(cfg.checkpoint)
    todo = _todo(ctx, checkpoint)
    n_all = len(ctx.fractions) * len(ctx.seeds)
    if not todo:
        log.info("every cell of finetune / %s / %s exists: nothing to do", ctx.task_spec.name, checkpoint)
        return _finish(ctx, [], n_all, t0)
    desc = resolve_checkpoint(checkpoint, 0, load_weights=False, preprocess=_spec_override(cfg))
    task, ext = _prepare(ctx, desc)
    fs = float(task.cache.fs or 100.0)
    window = _window(cfg, ctx.task_spec.crop_seconds, fs, desc.crop_samples)
    stride = int(round(float(cfg.stride_seconds) * fs)) if cfg.get("stride_seconds") is not None \
        else task.stride_samples
    recipe = dict(_container(cfg.finetune))
    if desc.kind == "supervised":
        recipe.update(_container(cfg.supervised) or {})
    from ecgfm.evaluate.finetune import LP_CS, run_finetune
    from ecgfm.evaluate.fractions import fraction_subsets

    written: list[str] = []
    eval_name = ctx.eval_spec.name if ctx.eval_spec else None
    leakage = None
    for seed in sorted({s for _, s in todo}):
        fracs = [f for f, s in todo if s == seed]
        target = task.labels if task.multilabel else task.labels.argmax(axis=1)
        subsets = fraction_subsets(task.splits["train"], target, list(task.patient_ids), fracs, seed=seed)
        for frac in fracs:
            enc = resolve_checkpoint(checkpoint, window, int(cfg.init_seed) + int(seed),
                                     _container(cfg.get("backbone_args")) or {}, _spec_override(cfg))
            if leakage is None:
                leakage = leakage_check(enc, task, ext, bool(cfg.allow_leakage), _container(cfg.pretrain_caches) or [])
            common = _cell_common(ctx, enc, task, ext, window, stride, leakage)
            splits = {"train": subsets[frac], "val": task.splits["val"], "test": task.splits["test"]}
            external = None
            if ext is not None:
                external = {f"external:{ext.dataset}": (ext.cache_dir, ext.labels, ext.splits["test"])}
            out = run_finetune(enc.backbone, task.cache_dir, task.labels, splits, task.multilabel, window, stride,
                               seed=seed, epochs=int(recipe["epochs"]), batch_size=int(recipe["batch_size"]),
                               lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]),
                               layer_decay=float(recipe["layer_decay"]),
                               warmup_epochs=float(recipe["warmup_epochs"]), patience=int(recipe["patience"]),
                               head=str(recipe.get("head", "linear")), accelerator=str(cfg.accelerator),
                               num_workers=int(recipe.get("num_workers", 0)),
                               min_epochs=int(recipe.get("min_epochs", 1)),
                               val_sliding=bool(recipe.get("val_sliding", False)),
                               predict_val=task.multilabel, external=external,
                               head_init=str(recipe.get("head_init", "lp")),
                               lp_Cs=[float(c) for c in recipe.get("lp_Cs", LP_CS)],
                               feature_dir=str(cfg.features.dir) if cfg.get("features") else None,
                               window_aggregate=str(recipe.get("window_aggregate", "prob")))
            results = _score(task, out, cfg, ext)
            preds = {"test": out["test"], **out["external"]}
            cell = dict(common, fraction=float(frac), seed=int(seed), n_train=int(len(splits["train"])),
                        hparam={k: recipe[k] for k in ("lr", "layer_decay", "warmup_epochs", "epochs")},
                        val_macro_auroc=float(out["best_val_macro_auroc"]), best_epoch=out["best_epoch"],
                        epochs_run=out["epochs_run"], results=results, seconds=out["seconds"], lp=out.get("lp"),
                        finetune=recipe, predictions=_predictions(preds, task, ext))
            p = cell_path(ctx.results_dir, "finetune", task.name, checkpoint, frac, seed, eval_name)
            _atomic_json(p, cell)
            written.append(str(p))
            _log_cell(cell)
    return _finish(ctx, written, n_all - len(todo), t0)


def _score(task: TaskData, out: dict[str, Any], cfg: DictConfig, ext: TaskData | None) -> dict[str, Any]:
    """Metrics of fine-tuning predictions: thresholds on validation, bootstrap CIs on test / external."""
    thresholds = None
    if task.multilabel:  # single-label predictions are the argmax: no threshold to choose
        val_rows, p_val = out["val"]
        thresholds = choose_thresholds(task.labels[val_rows], p_val)

    def score(labels: np.ndarray, rows: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        y = labels[rows] if task.multilabel else labels[rows].argmax(axis=1)
        return evaluate_scores(y, p, task.multilabel, task.class_names, thresholds, n_boot=int(cfg.bootstrap.n),
                               seed=int(cfg.bootstrap.seed))

    test_rows, p_test = out["test"]
    res = {"test": score(task.labels, test_rows, p_test)}
    for name, (rows, p) in out["external"].items():
        assert ext is not None
        res[name] = score(ext.labels, rows, p)
    return res
