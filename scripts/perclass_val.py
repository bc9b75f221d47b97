"""Per-class validation AUROC of frozen record features: which classes an encoder wins or loses against the
handcrafted baseline, without touching the test split.

    python scripts/perclass_val.py --task cinc2017 \
        --cell "pretext s0=runs/cnn_ssl/simclr_hc_w1/select/linear5/cells/linear/cinc2017/<encoder>/f1_s0.json" \
        --handcrafted --concat "pretext s0"

Each ``--cell NAME=PATH`` is a probe.py results cell; its cached window features (``feature_key`` under
``<cache_root>/features``) are averaged per record (the linear probe's ``mean_embedding``), standardised on the
train split, and a logistic regression (``C`` chosen on validation from :data:`CS`) is fitted on train and
scored on validation, one AUROC per class (one-vs-rest), each with a percentile bootstrap 95 % CI over the
validation records (:func:`ecgfm.evaluate.metrics.evaluate_scores`, ``--bootstrap`` resamples; ``C`` held fixed).
``C`` is chosen on the very validation split the AUROCs are computed on, so they are optimistic (the output says
so); the CIs do not include that selection. ``--handcrafted`` adds the 40 handcrafted features, ``--concat NAME``
the concatenation of NAME's features with them. The test split is never read.

The regression is always fitted on the task's **full** training split: a ``--cell`` contributes only its feature
file, not its label fraction (an ``f0.1_*`` cell gives 100 %-label numbers); the output says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CS = (0.001, 0.01, 0.1, 1.0, 10.0)


def record_means(path: Path) -> np.ndarray:
    """``(n_records, D)`` mean window feature of each record of a cached feature file
    (:meth:`ecgfm.evaluate.features.FeatureSet.record_means`: NaN rows for records skipped at extraction)."""
    from ecgfm.evaluate.features import FeatureSet

    z = np.load(path, allow_pickle=False)
    skipped = z["skipped"] if "skipped" in z.files else np.zeros(0, np.int64)
    return FeatureSet(features=z["features"], record=z["record"], n_records=int(z["n_records"]),
                      skipped=skipped).record_means()


def per_class_val(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, n_classes: int
                  ) -> tuple[float, list[float]]:
    """``(C, per-class validation AUROC)`` of the logistic regression whose mean AUROC is highest over :data:`CS`."""
    c, per, _ = _fit_best(x, y, train, val, n_classes)
    return c, per


def per_class_val_ci(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, class_names: list[str],
                     n_boot: int = 1000, seed: int = 0) -> tuple[float, dict]:
    """:func:`per_class_val` with percentile bootstrap 95 % CIs over the validation records: ``(C, metrics)`` with
    ``metrics`` from :func:`ecgfm.evaluate.metrics.evaluate_scores` (``"macro_auroc"`` and ``"per_class_auroc"``
    ``{name: {"value", "ci_low", "ci_high"}}``). The CIs resample the validation records with ``C`` fixed: they do
    not include the choice of ``C`` on the same records (which makes the values optimistic)."""
    from ecgfm.evaluate.metrics import evaluate_scores

    c, _, p = _fit_best(x, y, train, val, len(class_names))
    return c, evaluate_scores(y[val], p, False, list(class_names), n_boot=n_boot, seed=seed)


def _fit_best(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, n_classes: int
              ) -> tuple[float, list[float], np.ndarray]:
    """``(C, per-class validation AUROC, (n_val, n_classes) validation probabilities in class order)`` of the
    logistic regression whose mean validation AUROC is highest over :data:`CS`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x[train])
    best: tuple[float, list[float], np.ndarray] | None = None
    for c in CS:
        clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(x[train]), y[train])
        p = clf.predict_proba(sc.transform(x[val]))
        col = {int(k): j for j, k in enumerate(clf.classes_)}   # a class absent from train has no column
        missing = [k for k in range(n_classes) if k not in col]
        if missing:
            raise ValueError(f"classes {missing} have no training record: their validation AUROC is undefined")
        per = [float(roc_auc_score(y[val] == k, p[:, col[k]])) for k in range(n_classes)]
        if best is None or np.mean(per) > np.mean(best[1]):
            best = (c, per, p[:, [col[k] for k in range(n_classes)]])
    assert best is not None
    return best


def _with_ci(s: dict) -> str:
    """``0.912 [0.890, 0.930]``; the value alone, marked, when there is no CI (``--bootstrap 0``, too few records)."""
    if np.isfinite(s["ci_low"]) and np.isfinite(s["ci_high"]):
        return f"{s['value']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    return f"{s['value']:.3f} (no CI)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="cinc2017", help="a single-label task (conf/task/<name>.yaml)")
    ap.add_argument("--cell", action="append", default=[], help="NAME=path of a probe.py results cell (json)")
    ap.add_argument("--handcrafted", action="store_true", help="add the handcrafted features' row")
    ap.add_argument("--concat", action="append", default=[], help="NAME of a --cell to concatenate with them")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--cache-root", default="cache")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the validation records")
    args = ap.parse_args(argv)

    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.evaluate.handcrafted import cached_handcrafted
    from ecgfm.evaluate.tasks import build_task, load_task_spec

    feats: dict[str, np.ndarray] = {}
    preprocess = None
    cells: dict[str, dict] = {}
    for item in args.cell:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"--cell {item!r}: expected NAME=path")
        cell = json.loads(Path(path).read_text())
        if cell.get("task") != args.task:
            ap.error(f"--cell {path}: a {cell.get('task')} cell, not {args.task}")
        if preprocess is not None and cell["preprocess"] != preprocess:
            ap.error(f"--cell {path}: its preprocessing differs from the first cell's (another cache of the task)")
        preprocess = preprocess or cell["preprocess"]
        cells[path] = cell
        feats[name] = record_means(Path(args.cache_root) / "features" / f"{cell['feature_key']}.npz")
    if preprocess is None:
        ap.error("give at least one --cell (its preprocessing opens the task's cache)")
    spec = load_task_spec(args.task, data_root=args.data_root, cache_root=args.cache_root)
    task = build_task(spec, args.cache_root, PreprocessSpec.from_dict(preprocess))
    for path, cell in cells.items():   # feature row i must be record i of this very cache: else labels mismatch
        if cell.get("cache_dir") and Path(cell["cache_dir"]).resolve() != Path(task.cache_dir).resolve():
            ap.error(f"--cell {path}: its features come from {cell['cache_dir']}, but --task {args.task} with "
                     f"--data-root {args.data_root} builds {task.cache_dir} (other data or settings); pass the "
                     f"--data-root / --cache-root the cell was computed with")
    for name, f in feats.items():
        if len(f) != len(task.cache):
            ap.error(f"--cell {name}: {len(f)} feature rows for a cache of {len(task.cache)} records")
    if task.multilabel:
        ap.error(f"{args.task} is multi-label; this script scores single-label tasks")
    if args.handcrafted or args.concat:
        hc = cached_handcrafted(task.cache, str(Path(args.cache_root) / "features"))
        feats["handcrafted"] = np.zeros((len(task.cache), hc.dim))
        feats["handcrafted"][hc.record] = hc.features
    for name in args.concat:
        feats[f"{name} + handcrafted"] = np.hstack([feats[name], feats["handcrafted"]])
    train, val = task.splits["train"], task.splits["val"]
    y = task.labels.argmax(1)
    counts = np.bincount(y[val], minlength=len(task.class_names))
    print(f"{args.task} validation split (n = {len(val)}): "
          + ", ".join(f"{c} {k}" for c, k in zip(task.class_names, counts)))
    fractions = sorted({float(c["fraction"]) for c in cells.values() if c.get("fraction") is not None})
    print(f"train: all {len(train)} training records (the cell's fraction is not used"
          + (f"; the cells were run at fraction {', '.join(f'{f:g}' for f in fractions)})" if fractions else ")"))
    print(f"C is chosen on this same validation split (the highest macro AUROC over C in {list(CS)}): the AUROCs are "
          f"optimistic. [95 % CI]: percentile bootstrap over the validation records ({args.bootstrap} resamples, "
          f"C fixed: the choice of C is not resampled).")
    print("| features | C | macro [95 % CI] | " + " | ".join(task.class_names) + " |")
    print("|---|---|---|" + "---|" * len(task.class_names))
    for name, x in feats.items():
        ok = np.isfinite(x).all(axis=1)             # records skipped at feature extraction (NaN rows)
        if not ok[train].all() or not ok[val].all():
            print(f"{name}: {int((~ok[train]).sum())} train / {int((~ok[val]).sum())} validation records skipped "
                  f"at feature extraction are left out")
        c, m = per_class_val_ci(x, y, train[ok[train]], val[ok[val]], list(task.class_names), args.bootstrap)
        print(f"| {name} | {c:g} | {_with_ci(m['macro_auroc'])} | "
              + " | ".join(_with_ci(m["per_class_auroc"][k]) for k in task.class_names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
