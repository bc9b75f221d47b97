"""Results tables and plots, rebuilt from the per-cell JSON files of a sweep.

A sweep writes one JSON per cell (``<results_dir>/cells/<mode>/<task>/<checkpoint slug>/f<fraction>_s<seed>.json``,
see :mod:`ecgfm.evaluate.sweep`). :func:`build_report` reads every cell and writes

* ``results.csv``: the tidy table, one row per (cell, evaluated split, metric) with columns
  :data:`TIDY_COLUMNS` (``split`` is ``test`` or ``external:<dataset>``; ``seed`` is the label-subset / head
  seed; every value carries its 95 % bootstrap CI over the records of that split);
* ``results.md``: per task and split, a table of methods x label fractions: mean over seeds +- standard deviation
  over seeds, then the mean of the per-seed 95 % bootstrap CIs in brackets, and the number of seeds;
* ``results.png``: macro AUROC against label fraction (log axis), one line per method and mode, shaded band =
  mean per-seed 95 % CI;
* ``comparisons.csv`` (and a section of ``results.md``): every method minus its random-init twin on the same test
  records (same mode, task, fraction, seed), with a paired bootstrap CI (needs the predictions the cells store).

Run it by hand with ``python -m ecgfm.evaluate.report <results_dir>``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

TIDY_COLUMNS = ["mode", "task", "dataset", "split", "method", "checkpoint", "backbone", "fraction", "seed",
                "n_train", "n_test", "metric", "value", "ci_low", "ci_high", "cell"]
SUMMARY_METRICS = ("macro_auroc", "macro_f1", "fmax", "accuracy")
MODE_NAMES = {"linear": "linear probe", "mlp": "MLP probe", "finetune": "fine-tune"}


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
    return cells


def tidy_rows(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Cells -> the tidy table (:data:`TIDY_COLUMNS`), including per-class AUROC rows ``auroc[<class>]``."""
    rows = []
    for cell in cells:
        base = {k: cell.get(k) for k in ("mode", "task", "dataset", "method", "checkpoint", "backbone",
                                         "fraction", "seed", "n_train")}
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
        df = df.sort_values(["task", "split", "mode", "method", "fraction", "seed", "metric"], kind="mergesort")
    return df.reset_index(drop=True)


def summarize(df: pd.DataFrame, metric: str = "macro_auroc") -> pd.DataFrame:
    """Mean / sd over seeds and mean per-seed CI bounds per (task, dataset, split, mode, method, fraction)."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=["task", "dataset", "split", "mode", "method", "backbone", "fraction", "mean",
                                     "sd", "ci_low", "ci_high", "n_seeds", "n_test"])
    keys = ["task", "dataset", "split", "mode", "method", "backbone", "fraction"]
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
             "nested) and initialises the head.", ""]
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
            for (method, backbone, mode), rows in block.groupby(["method", "backbone", "mode"], sort=True):
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
        for (method, backbone, mode), rows in block.groupby(["method", "backbone", "mode"], sort=True):
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def paired_comparisons(cells: Iterable[dict[str, Any]], baseline: str = "random-init", n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """Macro AUROC of every method minus the ``baseline`` method's, on the same test records, same mode, task,
    fraction and seed (paired bootstrap, :func:`ecgfm.evaluate.metrics.paired_bootstrap_delta`).

    Needs the ``predictions`` stored in the cells. Returns one row per (mode, task, split, method, fraction, seed)
    with ``delta, ci_low, ci_high, p_not_positive, n``.
    """
    from ecgfm.evaluate.metrics import paired_bootstrap_delta

    cells = [c for c in cells if c.get("predictions")]
    base = {(c["mode"], c["task"], float(c["fraction"]), int(c["seed"])): c for c in cells
            if c.get("method") == baseline}
    rows = []
    for c in cells:
        if c.get("method") == baseline:
            continue
        b = base.get((c["mode"], c["task"], float(c["fraction"]), int(c["seed"])))
        if b is None:
            continue
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
                         "method": c["method"], "baseline": baseline, "fraction": float(c["fraction"]),
                         "seed": int(c["seed"]), **d})
    return pd.DataFrame(rows, columns=["mode", "task", "dataset", "split", "method", "baseline", "fraction", "seed",
                                       "delta", "ci_low", "ci_high", "p_not_positive", "n"])


def comparison_markdown(comp: pd.DataFrame) -> str:
    """Markdown of :func:`paired_comparisons`: mean delta over seeds, and each seed's delta with its 95 % CI."""
    if comp.empty:
        return ""
    lines = ["## Paired comparison with the random-init twin (macro AUROC difference, same test records)", "",
             "delta = method - random-init; per seed: delta [95 % paired bootstrap CI].", "",
             "| mode | task | split | method | fraction | mean delta | per seed |", "|---|---|---|---|---|---|---|"]
    keys = ["mode", "task", "split", "method", "fraction"]
    for key, g in comp.sort_values(keys + ["seed"]).groupby(keys, sort=True):
        per = "; ".join(f"s{int(r.seed)}: {r.delta:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in g.itertuples())
        lines.append(f"| {MODE_NAMES.get(key[0], key[0])} | {key[1]} | {key[2]} | {key[3]} | {_fmt_frac(key[4])} | "
                     f"{g['delta'].mean():+.3f} | {per} |")
    lines.append("")
    return "\n".join(lines)


def build_report(results_dir: str | os.PathLike, plot: bool = True, compare: bool = True,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Rebuild ``results.csv``, ``results.md`` and ``results.png`` from every cell of ``results_dir``.

    Args:
        results_dir: the sweep's results folder.
        plot: draw ``results.png``.
        compare: add the paired comparison with the random-init twin.
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
        if not comp.empty:
            _atomic_write_text(root / "comparisons.csv", comp.to_csv(index=False))
            md += "\n" + comparison_markdown(comp)
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
