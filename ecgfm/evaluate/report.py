"""Results tables and plots, rebuilt from the per-cell JSON files of a sweep.

A sweep writes one JSON per cell (``<results_dir>/cells/<mode>/<task>/<checkpoint slug>/f<fraction>_s<seed>.json``,
see :mod:`ecgfm.evaluate.sweep`). :func:`build_report` reads every cell and writes

* ``results.csv``: the tidy table, one row per (cell, evaluated split, metric) with columns
  :data:`TIDY_COLUMNS` (``split`` is ``test`` or ``external:<dataset>``; ``seed`` is the label-subset / head
  seed; every value carries its 95 % bootstrap CI over the records of that split);
* ``results.md``: per task and split, a table of checkpoints x label fractions: mean over seeds +- standard
  deviation over seeds, then the mean of the per-seed 95 % bootstrap CIs in brackets, and the number of seeds;
* ``results.png``: macro AUROC against label fraction (log axis), one line per method and mode, shaded band =
  mean per-seed 95 % CI;
* ``comparisons.csv`` (and a section of ``results.md``): every method minus its random-init twin on the same test
  records (same mode, task, fraction, seed), with a paired bootstrap CI (needs the predictions the cells store);
  and every method minus the handcrafted baseline (``checkpoint=handcrafted``, :func:`baseline_comparisons`) when
  the results hold it (column ``baseline`` names the reference row).

Rows are grouped by checkpoint *identity*, not by method name: each cell stores the content hash of its
checkpoint (``checkpoint_id``) and of its full recipe (``recipe_id``, :mod:`ecgfm.evaluate.identity`). Only cells
of one checkpoint and one recipe are averaged over seeds. A row's ``label`` is the method name, plus ``@`` and a
short checkpoint hash when that method (and backbone) has several checkpoints in the table, plus the recipe hash
when one checkpoint was run with several recipes; cells written before identities existed are labelled
``@legacy-...`` and never merged with others.

Run it by hand with ``python -m ecgfm.evaluate.report <results_dir>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ecgfm.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)
TIDY_COLUMNS = ["mode", "task", "dataset", "split", "label", "method", "checkpoint", "checkpoint_id", "recipe_id",
                "backbone", "fraction", "seed", "n_train", "n_test", "metric", "value", "ci_low", "ci_high", "cell"]
SUMMARY_METRICS = ("macro_auroc", "macro_f1", "fmax", "accuracy")
MODE_NAMES = {"linear": "linear probe", "mlp": "MLP probe", "finetune": "fine-tune"}
GROUP_KEYS = ["task", "dataset", "split", "mode", "label", "method", "backbone", "checkpoint_id", "recipe_id",
              "fraction"]


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def cell_identity(cell: dict[str, Any]) -> tuple[str, str]:
    """``(checkpoint_id, recipe_id)`` of a cell; a cell written before identities existed gets
    ``legacy-<hash of its checkpoint string>`` and ``legacy`` (never equal to a real identity)."""
    ck = cell.get("checkpoint_id")
    if not ck:
        ck = "legacy-" + hashlib.sha256(str(cell.get("checkpoint")).encode()).hexdigest()[:6]
    return str(ck), str(cell.get("recipe_id") or "legacy")


def assign_labels(cells: list[dict[str, Any]]) -> None:
    """Set ``cell["label"]``: the method name, ``@<checkpoint hash>`` when the method (and backbone) has several
    checkpoint identities among ``cells``, ``[recipe <hash>]`` when one checkpoint has several recipes in the same
    (mode, task)."""
    ckpts: dict[tuple, set[str]] = {}
    recipes: dict[tuple, set[str]] = {}
    for c in cells:
        ck, rc = cell_identity(c)
        ckpts.setdefault((c.get("method"), c.get("backbone")), set()).add(ck)
        recipes.setdefault((c.get("mode"), c.get("task"), c.get("method"), c.get("backbone"), ck), set()).add(rc)
    for c in cells:
        ck, rc = cell_identity(c)
        label = str(c.get("method"))
        if len(ckpts[(c.get("method"), c.get("backbone"))]) > 1 or ck.startswith("legacy-"):
            label += f"@{ck if ck.startswith('legacy-') else ck[:7]}"
        if len(recipes[(c.get("mode"), c.get("task"), c.get("method"), c.get("backbone"), ck)]) > 1:
            label += f" [recipe {rc[:7]}]"
        c["label"] = label


def load_cells(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished cell JSON under ``<results_dir>/cells`` (sorted by path)."""
    root = Path(results_dir) / "cells"
    cells = []
    for p in sorted(root.rglob("*.json")):
        try:
            cell = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{p}: unreadable results cell ({exc}); delete it to recompute the cell") from exc
        cell["_path"] = str(p.relative_to(root))
        cells.append(cell)
    assign_labels(cells)
    return cells


def tidy_rows(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Cells -> the tidy table (:data:`TIDY_COLUMNS`), including per-class AUROC rows ``auroc[<class>]``."""
    rows = []
    cells = list(cells)
    if any("label" not in c for c in cells):
        assign_labels(cells)
    for cell in cells:
        base = {k: cell.get(k) for k in ("mode", "task", "dataset", "label", "method", "checkpoint", "backbone",
                                         "fraction", "seed", "n_train")}
        base["checkpoint_id"], base["recipe_id"] = cell_identity(cell)
        for split, metrics in (cell.get("results") or {}).items():
            common = dict(base, split=split, n_test=metrics.get("n"), cell=cell.get("_path", ""))
            for metric in SUMMARY_METRICS:
                if metric in metrics:
                    m = metrics[metric]
                    rows.append(dict(common, metric=metric, value=m["value"], ci_low=m["ci_low"],
                                     ci_high=m["ci_high"]))
            for cls, m in (metrics.get("per_class_auroc") or {}).items():
                rows.append(dict(common, metric=f"auroc[{cls}]", value=m["value"], ci_low=m["ci_low"],
                                 ci_high=m["ci_high"]))
    df = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    if len(df):
        df = df.sort_values(["task", "split", "mode", "label", "fraction", "seed", "metric"], kind="mergesort")
    return df.reset_index(drop=True)


def summarize(df: pd.DataFrame, metric: str = "macro_auroc") -> pd.DataFrame:
    """Mean / sd over seeds and mean per-seed CI bounds per (task, dataset, split, mode, checkpoint identity,
    recipe, fraction) (:data:`GROUP_KEYS`): only seeds of one checkpoint and one recipe are averaged. A seed
    present twice in a group (the same checkpoint reached through two paths) counts once."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=GROUP_KEYS + ["mean", "sd", "ci_low", "ci_high", "n_seeds", "n_test"])
    sub = sub.copy()
    if "label" not in sub.columns:
        sub["label"] = sub["method"]
    for col, fill in (("checkpoint_id", "legacy"), ("recipe_id", "legacy")):
        if col not in sub.columns:
            sub[col] = fill
        sub[col] = sub[col].fillna(fill)
    keys = GROUP_KEYS
    dup = sub.duplicated(keys + ["seed"], keep="first")
    if dup.any():
        log.warning("%d %s row(s) repeat a (checkpoint, recipe, seed) already in the table (the same checkpoint "
                    "under another path?): counted once", int(dup.sum()), metric)
        sub = sub[~dup]
    g = sub.groupby(keys, dropna=False)
    out = g.agg(mean=("value", "mean"), sd=("value", "std"), ci_low=("ci_low", "mean"),
                ci_high=("ci_high", "mean"), n_seeds=("seed", "nunique"), n_test=("n_test", "max"))
    return out.reset_index()


def _fmt_frac(f: float) -> str:
    return f"{100 * float(f):g} %"


def markdown_table(df: pd.DataFrame, metrics: Iterable[str] = ("macro_auroc", "macro_f1")) -> str:
    """The Markdown report: one table per (metric, task, split)."""
    lines = ["# Results", "",
             "Each entry: mean over seeds +- sd over seeds [mean of the per-seed 95 % bootstrap CIs over the "
             "records of the split] (number of seeds). `seed` draws the label subset (stratified, patient-level, "
             "nested) and initialises the head. One row per checkpoint identity (content hash) and recipe: "
             "`method@<hash>` when a method has several checkpoints here, `[recipe <hash>]` when one checkpoint "
             "was run with several recipes; only seeds of one row are averaged.", ""]
    for metric in metrics:
        summ = summarize(df, metric)
        if summ.empty:
            continue
        for (task, dataset, split), block in summ.groupby(["task", "dataset", "split"], sort=True):
            n_test = int(block["n_test"].max()) if block["n_test"].notna().any() else 0
            lines += [f"## {metric} | task {task} | dataset {dataset} | split {split} (n = {n_test} records)", ""]
            fracs = sorted(block["fraction"].unique())
            lines.append("| method | backbone | mode | " + " | ".join(_fmt_frac(f) for f in fracs) + " |")
            lines.append("|---|---|---|" + "---|" * len(fracs))
            for (method, backbone, mode), rows in block.groupby(["label", "backbone", "mode"], sort=True):
                cells = []
                for f in fracs:
                    r = rows[rows["fraction"] == f]
                    if r.empty:
                        cells.append("")
                        continue
                    r = r.iloc[0]
                    sd = 0.0 if not np.isfinite(r["sd"]) else r["sd"]
                    cells.append(f"{r['mean']:.3f} +- {sd:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                                 f"({int(r['n_seeds'])})")
                lines.append(f"| {method} | {backbone} | {MODE_NAMES.get(mode, mode)} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_results(df: pd.DataFrame, out_path: str | os.PathLike, metric: str = "macro_auroc") -> Path | None:
    """Metric vs label fraction, one line per (method, mode), CI bands; one panel per (task, split)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    summ = summarize(df, metric)
    if summ.empty:
        return None
    panels = list(summ.groupby(["task", "dataset", "split"], sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, ((task, dataset, split), block) in zip(axes[0], panels):
        several = block["backbone"].nunique() > 1
        for (method, backbone, mode), rows in block.groupby(["label", "backbone", "mode"], sort=True):
            rows = rows.sort_values("fraction")
            x = rows["fraction"].to_numpy(dtype=float)
            label = f"{method}{f' [{backbone}]' if several else ''} ({MODE_NAMES.get(mode, mode)})"
            line, = ax.plot(x, rows["mean"], marker="o", label=label,
                            linestyle="--" if mode != "finetune" else "-")
            ax.fill_between(x, rows["ci_low"].astype(float), rows["ci_high"].astype(float),
                            color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        fracs = sorted(block["fraction"].astype(float).unique())
        ax.set_xticks(fracs)
        ax.set_xticklabels([_fmt_frac(f) for f in fracs])
        ax.minorticks_off()
        if len(fracs) == 1:
            ax.set_xlim(fracs[0] / 2, fracs[0] * 2)
        ax.set_xlabel("label fraction of the training split")
        ax.set_ylabel(f"{metric} ({split})")
        ax.set_title(f"{task} ({dataset}, {split})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_path)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return out


def paired_comparisons(cells: Iterable[dict[str, Any]], baseline: str = "random-init", n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """Macro AUROC of every method minus its ``baseline`` twin's, on the same test records (paired bootstrap,
    :func:`ecgfm.evaluate.metrics.paired_bootstrap_delta`).

    The twin is a ``baseline`` cell of the same mode, task, fraction and seed, the same architecture (backbone
    name and arguments; the backbone name for cells without it) and the same recipe: never the random-init cell
    of another backbone or another probe grid. Several matching twins (e.g. two init seeds) give one row each.

    Needs the ``predictions`` stored in the cells. Returns one row per (mode, task, split, method checkpoint,
    baseline, fraction, seed) with ``label``, ``baseline`` (the twin's label), ``delta, ci_low, ci_high,
    p_not_positive, n``.
    """
    cells = [c for c in cells if c.get("predictions")]
    if any("label" not in c for c in cells):
        assign_labels(cells)

    def twin_key(c: dict[str, Any]) -> tuple:
        return (c["mode"], c["task"], float(c["fraction"]), int(c["seed"]),
                c.get("architecture") or c.get("backbone"), c.get("recipe_id"))

    base: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("method") == baseline:
            base.setdefault(twin_key(c), []).append(c)
    rows = []
    for c in cells:
        if c.get("method") == baseline:
            continue
        for b in base.get(twin_key(c), []):
            rows += _paired_rows(c, b, n_boot, seed)
    return pd.DataFrame(rows, columns=["mode", "task", "dataset", "split", "method", "label", "baseline", "fraction",
                                       "seed", "delta", "ci_low", "ci_high", "p_not_positive", "n"])


def _paired_rows(c: dict[str, Any], b: dict[str, Any], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Paired deltas of cell ``c`` against its twin ``b`` on every split both predicted."""
    from ecgfm.evaluate.metrics import paired_bootstrap_delta

    rows = []
    for split, pa in c["predictions"].items():
        pb = b["predictions"].get(split)
        if pb is None:
            continue
        pos = {k: i for i, k in enumerate(pb["keys"])}
        common = [(i, pos[k]) for i, k in enumerate(pa["keys"]) if k in pos]
        if len(common) < 2:
            continue
        ia, ib = np.array(common).T
        y = np.asarray(pa["y"])[ia]
        sa, sb = np.asarray(pa["scores"])[ia], np.asarray(pb["scores"])[ib]
        if not c.get("multilabel", True):
            y = y.argmax(axis=1)
        try:
            d = paired_bootstrap_delta(y, sa, sb, n_boot=n_boot, seed=seed)
        except ValueError:
            continue
        rows.append({"mode": c["mode"], "task": c["task"], "dataset": c.get("dataset"), "split": split,
                     "method": c["method"], "label": c.get("label", c["method"]),
                     "baseline": b.get("label", b.get("method")), "fraction": float(c["fraction"]),
                     "seed": int(c["seed"]), **d})
    return rows


#: method label of the handcrafted baseline rows (:data:`ecgfm.evaluate.handcrafted.METHOD`)
HANDCRAFTED_METHOD = "handcrafted (RR/HRV + morphology)"


def baseline_comparisons(cells: Iterable[dict[str, Any]], baseline: str = HANDCRAFTED_METHOD, n_boot: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Macro AUROC of every row minus the ``baseline`` method's (the handcrafted-feature probe) on the same test
    records, with a paired bootstrap CI (:func:`ecgfm.evaluate.metrics.paired_bootstrap_delta`).

    Unlike :func:`paired_comparisons` the baseline has no architecture to share: a cell is paired with the
    ``baseline`` cells of the same task, label fraction and seed (so the same training subset) and the same probe
    mode (a fine-tune cell with the baseline's linear probe); only records both cells predicted are compared
    (matched by record key). Same columns as :func:`paired_comparisons`.
    """
    cells = [c for c in cells if c.get("predictions")]
    if any("label" not in c for c in cells):
        assign_labels(cells)
    base: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("method") == baseline:
            base.setdefault((c["mode"], c["task"], float(c["fraction"]), int(c["seed"])), []).append(c)
    rows = []
    for c in cells:
        if c.get("method") == baseline:
            continue
        mode = "linear" if c["mode"] == "finetune" else c["mode"]
        for b in base.get((mode, c["task"], float(c["fraction"]), int(c["seed"])), []):
            rows += _paired_rows(c, b, n_boot, seed)
    return pd.DataFrame(rows, columns=["mode", "task", "dataset", "split", "method", "label", "baseline", "fraction",
                                       "seed", "delta", "ci_low", "ci_high", "p_not_positive", "n"])


def comparison_markdown(comp: pd.DataFrame, reference: str = "random-init", title: str | None = None) -> str:
    """Markdown of :func:`paired_comparisons` (or :func:`baseline_comparisons` with ``reference`` its method):
    mean delta over seeds, and each seed's delta with its 95 % CI."""
    if comp.empty:
        return ""
    title = title or "Paired comparison with the random-init twin"
    lines = [f"## {title} (macro AUROC difference, same test records)", "",
             f"delta = method - {reference}; per seed: delta [95 % paired bootstrap CI].", "",
             "| mode | task | split | method | twin | fraction | mean delta | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    comp = comp.assign(label=comp["label"].fillna(comp["method"]) if "label" in comp else comp["method"])
    keys = ["mode", "task", "split", "label", "baseline", "fraction"]
    for key, g in comp.sort_values(keys + ["seed"]).groupby(keys, sort=True):
        per = "; ".join(f"s{int(r.seed)}: {r.delta:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in g.itertuples())
        lines.append(f"| {MODE_NAMES.get(key[0], key[0])} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | "
                     f"{_fmt_frac(key[5])} | {g['delta'].mean():+.3f} | {per} |")
    lines.append("")
    return "\n".join(lines)


def build_report(results_dir: str | os.PathLike, plot: bool = True, compare: bool = True,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Rebuild ``results.csv``, ``results.md`` and ``results.png`` from every cell of ``results_dir``.

    Args:
        results_dir: the sweep's results folder.
        plot: draw ``results.png``.
        compare: add the paired comparisons with the random-init twin and with the handcrafted baseline.
        n_boot: resamples of the paired bootstrap.

    Returns:
        ``{"csv", "markdown", "plot" (or None), "n_cells"}``.
    """
    root = Path(results_dir)
    cells = load_cells(root)
    df = tidy_rows(cells)
    _atomic_write_text(root / "results.csv", df.to_csv(index=False))
    md = markdown_table(df)
    if compare:
        comp = paired_comparisons(cells, n_boot=n_boot)
        hand = baseline_comparisons(cells, n_boot=n_boot)
        if not comp.empty or not hand.empty:
            both = pd.concat([d for d in (comp, hand) if not d.empty], ignore_index=True)
            _atomic_write_text(root / "comparisons.csv", both.to_csv(index=False))
        if not comp.empty:
            md += "\n" + comparison_markdown(comp)
        if not hand.empty:
            md += "\n" + comparison_markdown(hand, reference=HANDCRAFTED_METHOD,
                                              title="Paired comparison with the handcrafted baseline")
    _atomic_write_text(root / "results.md", md)
    png = plot_results(df, root / "results.png") if plot and len(df) else None
    return {"csv": str(root / "results.csv"), "markdown": str(root / "results.md"),
            "plot": None if png is None else str(png), "n_cells": len(cells)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rebuild the results table and plot from a sweep's cell files.")
    ap.add_argument("results_dir")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    out = build_report(args.results_dir, plot=not args.no_plot)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
