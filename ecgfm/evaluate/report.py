"""Results tables and plots, rebuilt from the per-cell JSON files of a sweep.

A sweep writes one JSON per cell (``<results_dir>/cells/<mode>/<task>/<checkpoint slug>/f<fraction>_s<seed>.json``,
see :mod:`ecgfm.evaluate.sweep`). :func:`build_report` reads every cell and writes

* ``results.csv``: the tidy table, one row per (cell, evaluated split, metric) with columns
  :data:`TIDY_COLUMNS` (``split`` is ``test`` or ``external:<dataset>``; ``seed`` is the label-subset / head
  seed; every value carries its 95 % bootstrap CI over the records of that split);
* ``results.md``: per task and split, a table of checkpoints x label fractions: mean over seeds +- standard
  deviation over seeds, then the mean of the per-seed 95 % bootstrap CIs in brackets, the seeds (ids) and their
  number;
* ``results.png``: macro AUROC against label fraction (log axis), one line per method and mode, shaded band =
  mean per-seed 95 % CI;
* ``comparisons.csv`` / ``comparisons_mean.csv`` (and sections of ``results.md``): every row minus each baseline
  row of :data:`BASELINES` on the same records of each split (test and external; same task, label fraction and
  seed; needs the predictions the cells store): the random-init twin (same mode, architecture and recipe; a probe's
  twin is one initialisation for every seed, :data:`TWIN_INIT_NOTE`), the handcrafted-feature probe
  (``checkpoint=handcrafted``) and the supervised-from-scratch CNN (``supervised:<resnet1d / xresnet1d>``), one
  mechanism (:class:`BaselineSpec`, :func:`compare_with_baseline`): per seed a paired bootstrap 95 % CI, and the
  mean over seeds with a two-level bootstrap CI (per resample the seeds drawn with replacement and the records
  resampled jointly for them, :func:`seed_mean_paired_delta`); ``excludes_zero`` flags a CI that excludes 0
  (column ``reference`` names the baseline kind, ``baseline`` its row);
* an acceptance block at the top of ``results.md`` (:func:`acceptance`): the criteria of issue 12, MET,
  MISSED or NOT MEASURED with the numbers, computed from the cells.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ecgfm.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)
TIDY_COLUMNS = ["mode", "task", "dataset", "split", "label", "method", "checkpoint", "checkpoint_id", "recipe_id",
                "backbone", "fraction", "seed", "n_train", "n_test", "metric", "value", "ci_low", "ci_high", "cell",
                "leakage"]
SUMMARY_METRICS = ("macro_auroc", "macro_f1", "fmax", "accuracy")
MODE_NAMES = {"linear": "linear probe", "mlp": "MLP probe", "attention": "attention probe", "finetune": "fine-tune",
              "linear+mean_std": "linear probe, mean+std", "mlp+mean_std": "MLP probe, mean+std",
              "linear+mean_prediction": "linear probe, window-level", "mlp+mean_prediction": "MLP probe, window-level",
              "linear+handcrafted": "linear probe + handcrafted features",
              "mlp+handcrafted": "MLP probe + handcrafted features",
              "linear+mean_std+handcrafted": "linear probe, mean+std + handcrafted features",
              "mlp+mean_std+handcrafted": "MLP probe, mean+std + handcrafted features",
              "linear+stages": "linear probe, all stages", "mlp+stages": "MLP probe, all stages",
              "linear+mean_std+stages": "linear probe, mean+std, all stages",
              "mlp+mean_std+stages": "MLP probe, mean+std, all stages"}
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


def leakage_status(cell: dict[str, Any]) -> str:
    """What the leakage guard said of a cell: ``leaked`` (pretraining data overlapped an evaluated split, or an
    external set held the task's own training / validation records, kept with ``allow_leakage=true``), ``unchecked`` (the encoder's pretraining data was unknown), ``ok``, or ``""`` (a cell
    written before the guard)."""
    rep = cell.get("leakage")
    if not isinstance(rep, dict):
        return ""
    if rep.get("leaked"):
        return "leaked"
    return "ok" if rep.get("checked") else "unchecked"


def _leakage_mark(cell: dict[str, Any]) -> str:
    """The row label suffix of :func:`leakage_status`: the overlap named by what it is (pretraining data, or an
    external set holding the task's own training / validation records, ``external:<set>/task_train_val``)."""
    status = leakage_status(cell)
    if status != "leaked":
        return LEAKAGE_MARKS.get(status, "")
    rep = cell.get("leakage") or {}
    parts = [k for k, v in rep.items() if isinstance(v, dict) and v.get("leaked")]
    only_task = bool(parts) and all(k.endswith("/task_train_val") for k in parts)
    return LEAKAGE_MARKS["leaked_task" if only_task else "leaked"]


#: row label suffix of a cell the leakage guard did not clear (:func:`leakage_status`)
LEAKAGE_MARKS = {"leaked": " [LEAKED: pretraining data overlaps an evaluated split]",
                 "leaked_task": " [LEAKED: the external set overlaps the task's train / val records]",
                 "unchecked": " [leakage not checked]"}


def assign_labels(cells: list[dict[str, Any]]) -> None:
    """Set ``cell["label"]``: the method name, `` (<backbone>)`` when the method has rows of several backbones
    (e.g. ``supervised (resnet1d_tiny)`` beside ``supervised (vit1d_tiny)``), ``@<checkpoint hash>`` when the
    method (and backbone) has several checkpoint identities among ``cells``, ``[recipe <hash>]`` when one
    checkpoint has several recipes in the same (mode, task); and :data:`LEAKAGE_MARKS` when the leakage guard did
    not clear the cell (leaked rows are never chosen by the acceptance block; unchecked ones may be)."""
    ckpts: dict[tuple, set[str]] = {}
    recipes: dict[tuple, set[str]] = {}
    backbones: dict[Any, set[str]] = {}
    for c in cells:
        ck, rc = cell_identity(c)
        ckpts.setdefault((c.get("method"), c.get("backbone")), set()).add(ck)
        recipes.setdefault((c.get("mode"), c.get("task"), c.get("method"), c.get("backbone"), ck), set()).add(rc)
        backbones.setdefault(c.get("method"), set()).add(str(c.get("backbone")))
    for c in cells:
        ck, rc = cell_identity(c)
        label = str(c.get("method"))
        if len(backbones[c.get("method")]) > 1:
            label += f" ({c.get('backbone')})"
        if len(ckpts[(c.get("method"), c.get("backbone"))]) > 1 or ck.startswith("legacy-"):
            label += f"@{ck if ck.startswith('legacy-') else ck[:7]}"
        if len(recipes[(c.get("mode"), c.get("task"), c.get("method"), c.get("backbone"), ck)]) > 1:
            label += f" [recipe {rc[:7]}]"
        c["label"] = label + _leakage_mark(c)


def load_cells(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished cell JSON under ``<results_dir>/cells`` (sorted by path). The JSON files of a cell's
    classifier artifact (``<cell>.classifier/classifier.json``) are not cells and are left out."""
    root = Path(results_dir) / "cells"
    cells = []
    for p in sorted(root.rglob("*.json")):
        if any(part.endswith(".classifier") for part in p.relative_to(root).parts[:-1]):
            continue
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
        base["leakage"] = leakage_status(cell)
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
        return pd.DataFrame(columns=GROUP_KEYS + ["mean", "sd", "ci_low", "ci_high", "n_seeds", "n_seeds_run",
                                                  "n_results", "n_test", "seeds"])
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
    # what a seed gave: seeds of a deterministic recipe at 100 % of the labels (same training records, L-BFGS) give
    # one and the same result, which the table must not show as several replicates with a spread of 0
    for col in ("value", "ci_low", "ci_high"):   # a cell without a CI stores null (JSON has no NaN): NaN here
        sub[col] = pd.to_numeric(sub[col], errors="coerce").astype(float)
    sub.loc[~np.isfinite(sub["value"]), "value"] = np.nan   # a seed without a finite value is not counted
    sub["_result"] = [f"{v:.12g}|{lo:.12g}|{hi:.12g}" for v, lo, hi in
                      zip(sub["value"], sub["ci_low"], sub["ci_high"])]
    sub.loc[sub["value"].isna(), "_result"] = np.nan
    # which seeds the mean is over (those with a value): rows of one fraction averaged over different seeds were
    # trained on different label subsets, which a count alone does not show
    sub["_seed"] = sub["seed"].where(sub["value"].notna())
    g = sub.groupby(keys, dropna=False)
    out = g.agg(mean=("value", "mean"), sd=("value", "std"), ci_low=("ci_low", "mean"),
                ci_high=("ci_high", "mean"), n_seeds=("value", "count"), n_seeds_run=("seed", "nunique"),
                n_results=("_result", "nunique"), n_test=("n_test", "max"), n_test_min=("n_test", "min"),
                seeds=("_seed", _seed_list))
    lost = out["n_seeds"] < out["n_seeds_run"]
    if lost.any():
        log.warning("%d %s row(s) have seeds without a value (NaN): the mean is over the seeds with one, and the "
                    "table says how many", int(lost.sum()), metric)
    mixed = out["n_test_min"].notna() & (out["n_test_min"] != out["n_test"])
    if mixed.any():
        log.warning("%d %s row(s) average seeds scored on different numbers of records (cells of another record "
                    "set?): marked in the table", int(mixed.sum()), metric)
    return out.reset_index()


def _seed_list(values: Iterable[Any]) -> str:
    """The distinct seeds of ``values`` (NaN / None dropped), sorted, space-separated: ``"0 1 2"`` (the form of
    ``comparisons_mean.csv``'s ``seeds``)."""
    out = set()
    for v in values:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            continue
        try:
            out.add(int(v))
        except (TypeError, ValueError):
            out.add(str(v))
    return " ".join(str(v) for v in sorted(out, key=lambda v: (isinstance(v, str), v)))


def _seed_ids(seeds: Any) -> str:
    """A seed list (:func:`_seed_list`'s ``"0 1 2 4"``) in short: runs of consecutive seeds as ranges, ``0-2,4``."""
    parts = str(seeds if isinstance(seeds, str) else "").split()
    if not all(p.lstrip("-").isdigit() for p in parts):
        return ",".join(parts)
    nums, runs = sorted(int(p) for p in parts), []
    for v in nums:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" if b > a + 1 else f"{a},{b}" for a, b in runs)


def _one_result(r: pd.Series) -> bool:
    """A summary row whose seeds gave one result (one seed, or seeds that all gave the same numbers)."""
    return int(r["n_seeds"]) < 2 or int(r.get("n_results", 2) or 0) == 1


def _seeds_text(r: pd.Series, short: bool = False) -> str:
    """How many seeds a summary row averages: ``3`` / ``3 seeds``; ``3, identical`` when every seed gave the same
    result; ``2 of 3 with a value`` when some seed has none (NaN)."""
    n = int(r["n_seeds"])
    text = f"{n}" if short else f"{n} seed{'s' if n != 1 else ''}"
    run = int(r.get("n_seeds_run", n) or n)
    if run > n:
        text += f" of {run} with a value"
    if n > 1 and int(r.get("n_results", 2) or 0) == 1:
        text += ", identical"
    return text


def _fmt_frac(f: float) -> str:
    return f"{100 * float(f):g} %"


def markdown_table(df: pd.DataFrame, metrics: Iterable[str] = ("macro_auroc", "macro_f1")) -> str:
    """The Markdown report: one table per (metric, task, split)."""
    lines = ["# Results", "",
             "Each entry: mean over seeds +- sd over seeds (n/a for one seed) [mean of the per-seed 95 % bootstrap "
             "CIs over the records of the split] s<seed ids> (number of seeds; `identical`: every seed gave the same "
             "result, e.g. a deterministic probe on 100 % of the labels, so one result, not replicates): `s0-2` = "
             "seeds 0, 1 and 2; rows of one label fraction averaged over different seeds were trained on different "
             "label subsets, so compare them with the paired sections below. `seed` draws the "
             "label subset (stratified, patient-level, nested) and initialises the head. One row per checkpoint "
             "identity (content hash) and recipe: `method@<hash>` when a method has several checkpoints here, "
             "`[recipe <hash>]` when one checkpoint was run with several recipes; only seeds of one row are "
             "averaged.", ""]
    for metric in metrics:
        summ = summarize(df, metric)
        if summ.empty:
            continue
        for (task, dataset, split), block in summ.groupby(["task", "dataset", "split"], sort=True):
            ns = sorted({int(v) for v in block["n_test"].dropna()})
            # rows scored on different record sets (e.g. another task size) must not share one n
            n_text = f"n = {ns[0]} records" if len(ns) == 1 else \
                f"n = {', '.join(map(str, ns))} records: rows differ, not comparable" if ns else "n = 0 records"
            lines += [f"## {metric} | task {task} | dataset {dataset} | split {split} ({n_text})", ""]
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
                    # one seed (or seeds that all gave one result) has no spread over seeds (not 0); bootstrap.n=0
                    # gives no CI (not [nan, nan])
                    sd = "n/a" if _one_result(r) or not np.isfinite(r["sd"]) else f"{r['sd']:.3f}"
                    ci = _ci_text(r["ci_low"], r["ci_high"])
                    mixed = pd.notna(r.get("n_test_min")) and r["n_test_min"] != r["n_test"]
                    ids = _seed_ids(r.get("seeds"))
                    cells.append(f"{r['mean']:.3f} +- {sd} {ci} " + (f"s{ids} " if ids else "")
                                 + f"({_seeds_text(r, short=True)})" + (f" (seeds on n = {int(r['n_test_min'])}-"
                                                               f"{int(r['n_test'])} records)" if mixed else ""))
                lines.append(f"| {method} | {backbone} | {MODE_NAMES.get(mode, mode)} | " + " | ".join(cells) + " |")
            # a label fraction is a subset size: say it (min_per_class can top a small fraction up to another's)
            at = df[(df["task"] == task) & (df["dataset"] == dataset) & (df["split"] == split)
                    & (df["metric"] == metric)] if "n_train" in df else df.iloc[:0]
            sizes = []
            for f in fracs:
                n = sorted({int(v) for v in at[at["fraction"] == f]["n_train"].dropna()})
                if n:
                    sizes.append(f"{_fmt_frac(f)}: {n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'}")
            if sizes:
                lines += ["", "Training records per label fraction: " + "; ".join(sizes) + "."]
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


#: method label of the handcrafted baseline rows (:data:`ecgfm.evaluate.handcrafted.METHOD`)
HANDCRAFTED_METHOD = "handcrafted (RR/HRV + morphology)"
#: backbone families of the "strong supervised CNN" baseline (``supervised:<resnet1d / xresnet1d backbone>``)
SUPERVISED_CNN_FAMILIES: tuple[str, ...] = ("resnet1d", "xresnet1d")
#: columns of the per-seed paired comparison rows (``comparisons.csv``)
COMPARISON_COLUMNS = ["reference", "mode", "task", "dataset", "split", "method", "label", "baseline",
                      "baseline_mode", "fraction", "seed", "delta", "ci_low", "ci_high", "p_not_positive", "n",
                      "n_degenerate", "excludes_zero"]
#: columns of the seed-mean paired comparison rows (``comparisons_mean.csv``)
COMPARISON_MEAN_COLUMNS = ["reference", "mode", "task", "dataset", "split", "method", "label", "baseline",
                           "baseline_mode", "fraction", "seeds", "n_seeds", "n_results", "delta", "ci_low",
                           "ci_high", "p_not_positive", "n", "n_degenerate", "excludes_zero"]


@dataclass(frozen=True)
class BaselineSpec:
    """One kind of baseline row and how a row is paired with it (:func:`compare_with_baseline`).

    A row cell is paired with the baseline cells of the same task, label fraction and seed (the same training
    subset), in the mode ``mode_map`` gives for the row's mode, and (``same_architecture``) the same architecture
    and recipe. Only records both cells predicted are compared (matched by record key).

    Args:
        name: short name (the ``reference`` column), e.g. ``"random-init twin"``.
        title: section title of ``results.md``.
        methods: ``method`` values of the baseline cells.
        backbone_families: when set, a baseline cell's ``backbone`` must start with one of these prefixes.
        mode_map: row mode -> baseline mode (key ``"*"``: any other mode); a mode absent from it (and no ``"*"``)
            is paired with the baseline cells of the same mode.
        same_architecture: also require the same architecture (backbone name and arguments) and recipe: the
            random-init twin of exactly this network.
        checkpoints: when set, a baseline cell's ``checkpoint`` (the value the sweep was given) must be one of
            these: one encoder as the reference of others of the same method (e.g. the real-data-only MAE of the
            pool-size study against the MAEs pretrained with generated records).
    """

    name: str
    title: str
    methods: tuple[str, ...]
    backbone_families: tuple[str, ...] | None = None
    mode_map: tuple[tuple[str, str], ...] = ()
    same_architecture: bool = False
    checkpoints: tuple[str, ...] | None = None

    def is_baseline(self, cell: dict[str, Any]) -> bool:
        """Whether ``cell`` is a row of this baseline."""
        if cell.get("method") not in self.methods:
            return False
        if self.checkpoints is not None and str(cell.get("checkpoint")) not in self.checkpoints:
            return False
        if self.backbone_families is None:
            return True
        return str(cell.get("backbone") or "").startswith(self.backbone_families)

    def baseline_mode(self, mode: str) -> str:
        """The baseline's mode a row of ``mode`` is paired with."""
        table = dict(self.mode_map)
        return table.get(mode, table.get("*", mode))

    def key(self, cell: dict[str, Any], mode: str) -> tuple:
        """Pairing key of ``cell`` in ``mode`` (a baseline cell's own mode, or the mode a row maps to)."""
        arch = (cell.get("architecture") or cell.get("backbone"), cell.get("recipe_id")) \
            if self.same_architecture else ()
        return (mode, cell["task"], float(cell["fraction"]), int(cell["seed"])) + arch


#: every row minus its random-init twin: same mode, task, fraction, seed, architecture and recipe
TWIN = BaselineSpec("random-init twin", "Paired comparison with the random-init twin", ("random-init",),
                    same_architecture=True)
#: every row (any probe variant or fine-tune) minus the handcrafted-feature linear probe
HANDCRAFTED = BaselineSpec("handcrafted", "Paired comparison with the handcrafted baseline", (HANDCRAFTED_METHOD,),
                           mode_map=(("*", "linear"),))
#: every row (probe or fine-tune) minus the supervised-from-scratch CNN (a fine-tune cell)
SUPERVISED_CNN = BaselineSpec("supervised CNN", "Paired comparison with the supervised-from-scratch CNN",
                              ("supervised",), backbone_families=SUPERVISED_CNN_FAMILIES,
                              mode_map=(("*", "finetune"),))
#: the baselines of :func:`build_report`, in table order
BASELINES: tuple[BaselineSpec, ...] = (TWIN, HANDCRAFTED, SUPERVISED_CNN)


def matched_pairs(cells: Iterable[dict[str, Any]], spec: BaselineSpec) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(row cell, baseline cell)`` pairs of ``spec`` among the cells holding predictions (see
    :class:`BaselineSpec`); a baseline cell is never compared with a cell of its own baseline, nor a cell with one
    whose ``train_records`` digest (the identity of its training records) differs: that pair is left out with a
    warning. Cells written before the digest existed pair as before."""
    cells = [c for c in cells if c.get("predictions")]
    if any("label" not in c for c in cells):
        assign_labels(cells)
    base: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        if spec.is_baseline(c):
            base.setdefault(spec.key(c, c["mode"]), []).append(c)
    pairs = []
    for c in cells:
        if spec.is_baseline(c):
            continue
        for b in base.get(spec.key(c, spec.baseline_mode(c["mode"])), []):
            ta, tb = c.get("train_records"), b.get("train_records")
            if ta is not None and tb is not None and ta != tb:
                # same (fraction, seed), other labelled records (subsets are drawn over cache rows, and the two
                # caches order or hold the records differently): not the paired comparison it would claim to be
                log.warning("not paired with its %s baseline: %s and %s (%s, fraction %g, seed %s) were trained on "
                            "different records (train_records %s vs %s)", spec.name, c.get("checkpoint"),
                            b.get("checkpoint"), c.get("task"), float(c.get("fraction", float("nan"))),
                            c.get("seed"), ta, tb)
                continue
            pairs.append((c, b))
    return pairs


def _aligned(c: dict[str, Any], b: dict[str, Any], split: str) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                        np.ndarray] | None:
    """Records both cells predicted on ``split``: ``(keys, y, scores of c, scores of b)`` (``y`` class indices for
    single-label tasks, indicator rows for multi-label), or None when fewer than two are shared.

    Raises:
        ValueError: the two cells order their score columns differently (``classes``), or give one record two
            different labels: their scores cannot be paired.
    """
    pa, pb = c["predictions"].get(split), b["predictions"].get(split)
    if pa is None or pb is None:
        return None
    pos = {k: i for i, k in enumerate(pb["keys"])}
    common = [(i, pos[k]) for i, k in enumerate(pa["keys"]) if k in pos]
    if len(common) < 2:
        return None
    ia, ib = np.array(common).T
    y = np.asarray(pa["y"])[ia]

    def name(cell: dict[str, Any]) -> str:
        return f"{cell.get('mode')} / {cell.get('task')} / {cell.get('checkpoint')} / seed {cell.get('seed')}"

    ca, cb = c.get("classes"), b.get("classes")
    if ca is not None and cb is not None and list(ca) != list(cb):
        raise ValueError(f"cannot pair cell {name(c)} with {name(b)}: class columns {list(ca)} vs {list(cb)}")
    if not np.array_equal(y, np.asarray(pb["y"])[ib]):
        raise ValueError(f"cannot pair cell {name(c)} with {name(b)}: the same {split} records carry different "
                         f"labels (caches built from different label files?)")
    if not c.get("multilabel", True):
        y = y.argmax(axis=1)
    keys = [pa["keys"][i] for i in ia]
    return keys, y, np.asarray(pa["scores"], dtype=np.float64)[ia], np.asarray(pb["scores"], dtype=np.float64)[ib]


def _aligned_or_skipped(c: dict[str, Any], b: dict[str, Any], split: str
                        ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_aligned`, with a pair that cannot be paired (other class columns, or one record labelled two ways:
    e.g. a baseline cell left from an older label table) left out with a warning instead of failing the whole
    report."""
    try:
        return _aligned(c, b, split)
    except ValueError as exc:
        log.warning("left out of the paired comparisons: %s", exc)
        return None


def _excludes_zero(lo: float, hi: float) -> str:
    """``"+"`` (CI above 0), ``"-"`` (below 0) or ``""`` (it contains 0)."""
    return "+" if lo > 0 else "-" if hi < 0 else ""


def _comparison_row(reference: str, c: dict[str, Any], b: dict[str, Any], split: str, d: dict[str, float]
                    ) -> dict[str, Any]:
    """A per-seed comparison row (:data:`COMPARISON_COLUMNS`) of cell ``c`` minus baseline cell ``b``."""
    return {"reference": reference, "mode": c["mode"], "task": c["task"], "dataset": c.get("dataset"),
            "split": split, "method": c["method"], "label": c.get("label", c["method"]),
            "baseline": b.get("label", b.get("method")), "baseline_mode": b["mode"],
            "fraction": float(c["fraction"]), "seed": int(c["seed"]), **d,
            "excludes_zero": _excludes_zero(d["ci_low"], d["ci_high"])}


def _paired_rows(c: dict[str, Any], b: dict[str, Any], n_boot: int, seed: int,
                 reference: str = TWIN.name) -> list[dict[str, Any]]:
    """Paired deltas of cell ``c`` against baseline cell ``b`` on every split both predicted."""
    from ecgfm.evaluate.metrics import paired_bootstrap_delta

    rows = []
    for split in c["predictions"]:
        got = _aligned_or_skipped(c, b, split)
        if got is None:
            continue
        _, y, sa, sb = got
        try:
            d = paired_bootstrap_delta(y, sa, sb, n_boot=n_boot, seed=seed)
        except ValueError:
            continue
        rows.append(_comparison_row(reference, c, b, split, d))
    return rows


def seed_mean_paired_delta(y: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 1000,
                           seed: int = 0, ci: float = 0.95, max_redraws: int = 50, per_seed: bool = False
                           ) -> dict[str, float] | tuple[dict[str, float], list[dict[str, float]]]:
    """Mean over seeds of the macro AUROC difference ``A_s - B_s`` on the same records, with a two-level paired
    percentile bootstrap: each resample draws the seeds with replacement *and* resamples the records (jointly for
    every seed and both models: the bootstrap of :mod:`ecgfm.evaluate.metrics`, one resample scores every score
    set, degenerate resamples redrawn), and averages the drawn seeds' deltas on those records.

    Resampling the seeds puts the seed-to-seed variation (label subset, head initialisation) into the CI: with the
    records alone the CI was conditional on the seeds that happened to be run, and "CI excludes 0" fired about 3x
    as often as its nominal 5 % under a null where each run lands at a random quality. Seeds whose score pairs are
    identical (e.g. a deterministic probe on 100 % of the labels: the same training records for every seed) are
    one result, counted once (point estimate and CI; ``n_results``). With two or three results the seed level is
    still rough (a bootstrap over k values under-states their spread by ``(k - 1) / k``).

    With one seed (or identical seeds) this is :func:`ecgfm.evaluate.metrics.paired_bootstrap_delta` (same
    resamples); so is each seed's own delta of ``per_seed`` (the resamples depend on the labels and the seed only;
    every seed's row is returned, identical ones included).

    Args:
        y: ``(n,)`` class indices or ``(n, C)`` indicators of the shared records.
        pairs: per seed ``(scores_a (n, C), scores_b (n, C))``, rows in the order of ``y``.
        n_boot: resamples.
        seed: bootstrap seed (records and seed draws: the same numbers for the same inputs).
        ci: confidence level.
        max_redraws: redraw rounds of degenerate resamples.
        per_seed: also return each seed's delta with its CI from the same record resamples.

    Returns:
        ``{"delta", "ci_low", "ci_high", "p_not_positive", "n", "n_degenerate", "n_results"}`` (and, with
        ``per_seed``, the list of those of each pair, records resampled only, without ``n_results``);
        ``n_degenerate``: resamples still degenerate after the redraws (their deltas average over fewer classes;
        the same resamples for every seed); ``n_results``: the distinct score pairs the mean and CI are over.
    """
    from ecgfm.evaluate.metrics import _as_onehot, _resampled_aurocs, defined_classes, per_class_auroc

    def stats(point: float, d: np.ndarray, n_results: int | None = None) -> dict[str, float]:
        d = d[np.isfinite(d)]
        extra = {} if n_results is None else {"n_results": n_results}
        if d.size == 0:   # n_boot = 0 (no CIs asked for) or no resample with a defined class: no CI, not a crash
            return {"delta": float(point), "ci_low": float("nan"), "ci_high": float("nan"),
                    "p_not_positive": float("nan"), "n": int(n), "n_degenerate": n_degenerate, **extra}
        lo, hi = np.percentile(d, [50 * (1 - ci), 100 - 50 * (1 - ci)])
        return {"delta": float(point), "ci_low": float(lo), "ci_high": float(hi),
                "p_not_positive": float(np.mean(d <= 0)), "n": int(n), "n_degenerate": n_degenerate, **extra}

    if not pairs:
        raise ValueError("no score pairs")
    sets = [np.asarray(s, dtype=np.float64) for pair in pairs for s in pair]
    n, n_classes = sets[0].shape
    if any(s.shape != (n, n_classes) for s in sets) or len(y) != n:
        raise ValueError(f"every score set must be ({len(y)}, C) like the first, got {[s.shape for s in sets]}")
    yo = _as_onehot(np.asarray(y), n_classes)
    defined = np.flatnonzero(defined_classes(yo))
    if len(defined) == 0:
        raise ValueError("no class has both label values: AUROC is undefined")
    points = [float(np.mean(per_class_auroc(yo, a)[defined] - per_class_auroc(yo, b)[defined])) for a, b in pairs]
    _, res = _resampled_aurocs(yo, sets, defined, n_boot, np.random.default_rng(seed), max_redraws)
    n_degenerate = int(np.isnan(res[0]).any(axis=1).sum())   # labels and weights only: one count for every set
    with np.errstate(invalid="ignore"):
        each = [np.nanmean(res[2 * i] - res[2 * i + 1], axis=1) for i in range(len(pairs))]
    # one result per distinct score pair: seeds that predicted exactly alike are not independent replicates
    distinct: list[int] = []
    for i in range(len(pairs)):
        if not any(np.array_equal(sets[2 * i], sets[2 * j]) and np.array_equal(sets[2 * i + 1], sets[2 * j + 1])
                   for j in distinct):
            distinct.append(i)
    k = len(distinct)
    per = np.stack([each[i] for i in distinct], axis=1)   # (B, k): each result's delta on each record resample
    if k > 1:
        # the seed level: per resample k draws of the results with replacement, from a generator of its own (seeded
        # from ``seed``, so a report is reproducible and the record resamples stay those of one seed alone)
        pick = np.random.default_rng([int(seed), 1]).integers(0, k, size=per.shape)
        samples = np.take_along_axis(per, pick, axis=1).mean(axis=1)
    else:
        samples = per[:, 0]
    mean = stats(float(np.mean([points[i] for i in distinct])), samples, k)
    if not per_seed:
        return mean
    return mean, [stats(p, d) for p, d in zip(points, each)]


def compare_with_baseline(cells: Iterable[dict[str, Any]], spec: BaselineSpec, n_boot: int = 1000, seed: int = 0
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every row minus the ``spec`` baseline on the same test records: per seed and the mean over seeds.

    Args:
        cells: result cells (with ``predictions``).
        spec: the baseline (:data:`TWIN`, :data:`HANDCRAFTED`, :data:`SUPERVISED_CNN` or your own).
        n_boot: bootstrap resamples.
        seed: bootstrap seed (the same resamples for every pair of a split).

    Returns:
        ``(per_seed, mean)``: per-seed rows (:data:`COMPARISON_COLUMNS`: delta with its paired 95 % CI,
        ``excludes_zero`` ``"+"`` / ``"-"`` / ``""``) and one row per (mode, task, split, row label, baseline label,
        fraction) (:data:`COMPARISON_MEAN_COLUMNS`): the mean delta over the seeds both rows have (``seeds``;
        ``n_results``: how many of them gave distinct predictions, identical ones counted once), its two-level CI
        (seeds drawn with replacement, records resampled jointly for them: :func:`seed_mean_paired_delta`), on the
        records every seed predicted.
    """
    pairs = matched_pairs(cells, spec)
    per_seed: list[dict[str, Any]] = []
    groups: dict[tuple, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for c, b in pairs:
        groups.setdefault((c["mode"], c["task"], c.get("label", c["method"]), b.get("label", b["method"]),
                           b["mode"], float(c["fraction"])), []).append((c, b))
    means: list[dict[str, Any]] = []
    for (mode, task, label, blabel, bmode, frac), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        seen: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        for c, b in group:
            seen.setdefault(int(c["seed"]), (c, b))   # a seed reached twice (same checkpoint, two paths) counts once
        c0 = next(iter(seen.values()))[0]
        splits = list(c0["predictions"])
        for s, (c, b) in seen.items():   # splits some seed lacks: per-seed rows only
            for split in c["predictions"]:
                if split not in splits:
                    splits.append(split)
        for split in splits:
            aligned = {s: _aligned_or_skipped(c, b, split) for s, (c, b) in sorted(seen.items())}
            aligned = {s: a for s, a in aligned.items() if a is not None}
            shared = set.intersection(*(set(a[0]) for a in aligned.values())) if aligned else set()
            ref_keys = [k for k in next(iter(aligned.values()))[0] if k in shared] if aligned else []
            joint: dict[int, dict[str, float]] = {}
            d = None
            if len(ref_keys) >= 2:
                score_pairs, y, same_labels = [], None, True
                for s in aligned:
                    keys, ys, sa, sb = aligned[s]
                    pos = {k: i for i, k in enumerate(keys)}
                    idx = np.array([pos[k] for k in ref_keys])
                    if y is not None and not np.array_equal(ys[idx], y):
                        same_labels = False   # seeds disagree on a record's labels: no joint resampling
                    y = ys[idx] if y is None else y
                    score_pairs.append((sa[idx], sb[idx]))
                if not same_labels:
                    log.warning("%s vs %s (%s, %s, fraction %g, %s): the seeds' cells hold different labels for the "
                                "same records (computed on different label tables?): no seed mean, per-seed "
                                "comparisons only", label, blabel, mode, task, frac, split)
                    d, each = None, []
                else:
                    try:
                        d, each = seed_mean_paired_delta(y, score_pairs, n_boot=n_boot, seed=seed, per_seed=True)
                    except ValueError:
                        d, each = None, []
                # a seed scored on exactly the shared records: its own paired bootstrap is the joint one's
                joint = {s: e for s, e in zip(aligned, each) if len(aligned[s][0]) == len(ref_keys)}
            for s, (c, b) in sorted(seen.items()):
                if s in joint:
                    per_seed.append(_comparison_row(spec.name, c, b, split, joint[s]))
                elif split in c["predictions"]:
                    per_seed += [r for r in _paired_rows(c, b, n_boot, seed, reference=spec.name)
                                 if r["split"] == split]
            if d is None:
                continue
            means.append({"reference": spec.name, "mode": mode, "task": task, "dataset": c0.get("dataset"),
                          "split": split, "method": c0["method"], "label": label, "baseline": blabel,
                          "baseline_mode": bmode, "fraction": frac,
                          "seeds": " ".join(str(s) for s in sorted(aligned)), "n_seeds": len(aligned), **d,
                          "excludes_zero": _excludes_zero(d["ci_low"], d["ci_high"])})
    return (pd.DataFrame(per_seed, columns=COMPARISON_COLUMNS), pd.DataFrame(means, columns=COMPARISON_MEAN_COLUMNS))


def paired_comparisons(cells: Iterable[dict[str, Any]], baseline: str = "random-init", n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """Macro AUROC of every method minus its ``baseline`` twin's, on the same test records (paired bootstrap,
    :func:`ecgfm.evaluate.metrics.paired_bootstrap_delta`): the per-seed rows of :func:`compare_with_baseline`
    with :data:`TWIN` (``baseline`` another method name: a twin spec of that method).

    The twin is a ``baseline`` cell of the same mode, task, fraction and seed, the same architecture (backbone
    name and arguments; the backbone name for cells without it) and the same recipe: never the random-init cell
    of another backbone or another probe grid. Several matching twins (e.g. two init seeds) give one row each.
    """
    spec = TWIN if baseline == "random-init" else replace(TWIN, name=f"{baseline} twin", methods=(baseline,))
    return compare_with_baseline(cells, spec, n_boot=n_boot, seed=seed)[0]


def baseline_comparisons(cells: Iterable[dict[str, Any]], baseline: str = HANDCRAFTED_METHOD, n_boot: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Macro AUROC of every row minus the ``baseline`` method's (default the handcrafted-feature probe) on the
    same test records: the per-seed rows of :func:`compare_with_baseline` with :data:`HANDCRAFTED` (a fine-tune
    cell is paired with the baseline's linear probe)."""
    spec = HANDCRAFTED if baseline == HANDCRAFTED_METHOD else replace(HANDCRAFTED, name=baseline,
                                                                      methods=(baseline,))
    return compare_with_baseline(cells, spec, n_boot=n_boot, seed=seed)[0]


#: what the random-init twin's CI covers (:func:`comparison_markdown` of :data:`TWIN`): the sweep builds a probe's
#: twin from ``init_seed`` for every seed, a fine-tune's from ``init_seed + seed``
TWIN_INIT_NOTE = ("The random-init twin of a probe row (every mode but fine-tuning) is one random initialisation "
                  "(`init_seed`) for every seed: the seed-mean CI resamples the split's records and the seeds that "
                  "were run (their label subsets and the row's own head initialisations), but every seed's twin is "
                  "the same network: the CI covers the seeds' spread, not the spread over random initialisations "
                  "of the twin (and with 2-3 seeds its seed level is rough). A fine-tune row's twin is initialised "
                  "from `init_seed + seed`, one initialisation per seed.")


def _flag(excl: Any) -> str:
    return {"+": "yes (> 0)", "-": "yes (< 0)"}.get(str(excl) if isinstance(excl, str) else "", "no")


def comparison_markdown(comp: pd.DataFrame, reference: str = "random-init", title: str | None = None,
                        means: pd.DataFrame | None = None) -> str:
    """Markdown of a paired comparison: per (mode, task, split, row, baseline, fraction) the mean delta over seeds
    (with its joint paired 95 % CI and whether it excludes 0, when ``means`` from :func:`compare_with_baseline`
    is given) and each seed's delta with its 95 % CI (``*``: the CI excludes 0)."""
    if comp.empty:
        return ""
    title = title or TWIN.title
    lines = [f"## {title} (macro AUROC difference, same records of each split)", "",
             f"delta = row - {reference}, each row paired with the baseline on the records of its own split (`test`, "
             f"or an external split `external:<dataset>`). Mean over seeds with its two-level paired 95 % bootstrap "
             f"CI (each resample draws the seeds with replacement and resamples the records of that split jointly for "
             f"them and both rows, so the spread over seeds, i.e. label subsets and initialisations, is in the CI; "
             f"seeds that gave identical predictions count once, `identical`; n = the records both rows of every "
             f"seed predicted); per seed: delta [95 % paired bootstrap CI over records], `*` = that CI excludes 0, "
             f"with its "
             f"n when it differs. Resamples in which a class lost all its positives or negatives are redrawn; those "
             f"still degenerate after that average the delta over fewer classes and are counted where there are "
             f"any (`n_degenerate` in the CSV files).", "",
             *([TWIN_INIT_NOTE, ""] if reference == TWIN.name else []),
             "| mode | task | split | method | baseline | fraction | mean delta [95 % CI] | CI excludes 0 | per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    comp = comp.assign(label=comp["label"].fillna(comp["method"]) if "label" in comp else comp["method"])
    keys = ["mode", "task", "split", "label", "baseline", "fraction"]
    mean_of: dict[tuple, Any] = {}
    if means is not None and not means.empty:
        for r in means.itertuples():
            mean_of[(r.mode, r.task, r.split, r.label, r.baseline, float(r.fraction))] = r
    for key, g in comp.sort_values(keys + ["seed"]).groupby(keys, sort=True):
        m = mean_of.get(key[:5] + (float(key[5]),))
        n_mean = int(m.n) if m is not None and pd.notna(getattr(m, "n", None)) else None
        per = "; ".join(f"s{int(r.seed)}: {r.delta:+.3f} {_ci_text(r.ci_low, r.ci_high, signed=True)}"
                        f"{'*' if r.ci_low > 0 or r.ci_high < 0 else ''}"
                        + (f" (n = {int(r.n)})" if "n" in g and pd.notna(r.n) and int(r.n) != n_mean else "")
                        for r in g.itertuples())
        if m is not None:
            deg = getattr(m, "n_degenerate", None)
            nres = getattr(m, "n_results", None)
            same = int(m.n_seeds) > 1 and pd.notna(nres) and int(nres) == 1
            mean = (f"{m.delta:+.3f} {_ci_text(m.ci_low, m.ci_high, signed=True)} ({int(m.n_seeds)} seeds"
                    + (", identical" if same else "")
                    + (f", n = {n_mean}" if n_mean is not None else "")
                    + (f"; {int(deg)} resamples over fewer classes" if pd.notna(deg) and int(deg) > 0 else "")
                    + ")")
            flag = _flag(m.excludes_zero)
        else:
            # no seed-mean row (e.g. the seeds' cells disagree on the labels of a record): the plain mean of the
            # per-seed deltas, which has no joint resample behind it, so no CI
            mean, flag = f"{g['delta'].mean():+.3f} [no CI] (mean of the seeds, not jointly resampled)", "n/a"
        bmode = g["baseline_mode"].iloc[0] if "baseline_mode" in g else key[0]
        base = key[4] if bmode == key[0] or pd.isna(bmode) else f"{key[4]} ({MODE_NAMES.get(bmode, bmode)})"
        lines.append(f"| {MODE_NAMES.get(key[0], key[0])} | {key[1]} | {key[2]} | {key[3]} | {base} | "
                     f"{_fmt_frac(key[5])} | {mean} | {flag} | {per} |")
    lines.append("")
    return "\n".join(lines)


#: SSL methods the acceptance block counts as contrastive (CREMA, the MAE + contrastive hybrid, is not counted)
CONTRASTIVE_METHODS: tuple[str, ...] = ("simclr", "clocs")
#: the macro AUROC a best SSL linear probe must reach (issue 12)
ACCEPT_PROBE_AUROC = 0.85


def _rows_at(summ: pd.DataFrame, task: str, mode: str, fraction: float, labels: set[str] | None = None
             ) -> pd.DataFrame:
    """Test-split summary rows of ``task`` / ``mode`` / ``fraction`` (restricted to ``labels``), best first."""
    if summ.empty:
        return summ
    sel = summ[(summ["task"] == task) & (summ["split"] == "test") & (summ["mode"] == mode)
               & np.isclose(summ["fraction"].astype(float), float(fraction))]
    if labels is not None:
        sel = sel[sel["label"].isin(labels)]
    return sel.sort_values("mean", ascending=False)


#: frozen-feature probe modes of an encoder alone (:func:`ecgfm.evaluate.sweep.probe_variant`): every mode but
#: fine-tuning and the probes that also see the handcrafted features (``...+handcrafted``: their own rows, never
#: "the SSL encoder's frozen probe" of the acceptance criteria)
def _is_probe_mode(mode: Any) -> bool:
    return isinstance(mode, str) and mode != "finetune" and not mode.endswith("+handcrafted")


def _best_on_val(cells: list[dict[str, Any]], summ: pd.DataFrame, task: str, fraction: float,
                 labels: set[str], is_mode: Callable[[Any], bool] = _is_probe_mode) -> pd.Series | None:
    """The test-split summary row of the SSL row (any encoder in ``labels``, any mode ``is_mode`` accepts: by
    default every frozen probe variant; fine-tuning for criterion 4) with the highest *validation* macro AUROC (mean
    over seeds of the cells' ``val_macro_auroc``: the chosen probe's, or fine-tuning's early-stopping best): "the
    best SSL row" is chosen on validation, as every recipe choice here, and then read on test once. None when
    nothing is measured."""
    val = _val_means(cells, task, fraction, labels, is_mode)
    for (label, mode), v in sorted(val.items(), key=lambda kv: -kv[1]):
        rows = _rows_at(summ, task, mode, fraction, {label})
        if not rows.empty:
            row = rows.iloc[0].copy()
            row["val_mean"] = v
            return row
    return None


def _val_means(cells: list[dict[str, Any]], task: str, fraction: float, labels: set[str],
               is_mode: Callable[[Any], bool] = _is_probe_mode) -> dict[tuple[str, str], float]:
    """The validation score :func:`_best_on_val` ranks rows by: per ``(label, mode)`` of ``task`` at ``fraction``
    (labels in ``labels``, modes ``is_mode`` accepts), the mean over seeds of the cells' finite
    ``val_macro_auroc``.

    Args:
        cells: the result cells (labels assigned).
        task: task name.
        fraction: label fraction.
        labels: row labels to score.
        is_mode: which modes count.

    Returns:
        ``{(label, mode): mean validation macro AUROC}``; a row without a finite validation score is absent.
    """
    val: dict[tuple[str, str], dict[Any, float]] = {}
    for c in cells:
        if (c.get("task") == task and c.get("label") in labels and is_mode(c.get("mode"))
                and np.isclose(float(c.get("fraction", -1)), float(fraction))
                and c.get("val_macro_auroc") is not None and np.isfinite(float(c["val_macro_auroc"]))):
            # one score per seed: a seed reached twice (two checkpoint paths) counts once, as in summarize()
            val.setdefault((c["label"], c["mode"]), {}).setdefault(c.get("seed"), float(c["val_macro_auroc"]))
    return {k: float(np.mean(list(v.values()))) for k, v in val.items()}


def _val_mean_over(cells: list[dict[str, Any]], settings: Sequence[tuple[str, float]], labels: set[str],
                   mode: str) -> dict[str, float]:
    """:func:`_best_on_val`'s validation score of each row of ``mode`` over several (task, fraction) settings: the
    mean over ``settings`` of its per-setting score (:func:`_val_means`), for a row that has one at every setting
    (a criterion that spans settings chooses one row for all of them, on validation).

    Args:
        cells: the result cells (labels assigned).
        settings: ``(task, fraction)`` pairs.
        labels: row labels to score.
        mode: the mode of the rows.

    Returns:
        ``{label: mean validation macro AUROC over the settings}``; a row missing a setting is absent.
    """
    per = [_val_means(cells, task, frac, labels, lambda m: m == mode) for task, frac in settings]
    return {lab: float(np.mean([p[(lab, mode)] for p in per])) for lab in sorted(labels)
            if all((lab, mode) in p for p in per)}


def _row_cells(cells: list[dict[str, Any]], label: str, task: str, mode: str, fraction: float
               ) -> list[dict[str, Any]]:
    """The cells behind one summary row (one per seed: a seed reached twice counts once, as in :func:`summarize`)."""
    out: dict[Any, dict[str, Any]] = {}
    for c in cells:
        if (c.get("label") == label and c.get("task") == task and c.get("mode") == mode
                and np.isclose(float(c.get("fraction", -1)), float(fraction))):
            out.setdefault(c.get("seed"), c)
    return list(out.values())


def _lp_kept_note(cells: list[dict[str, Any]]) -> str:
    """`` (LP init kept in k of n seeds)`` when ``k > 0`` of the fine-tune cells ``cells`` (those storing
    ``best_epoch``) kept their LP-FT linear-probe initialisation (``best_epoch == -1``: validation preferred it to
    every fine-tuned epoch, so that seed is in effect a linear probe); ``""`` otherwise. A cell whose recipe has a
    random head (``finetune.head_init == "random"``) has no LP initialisation to keep."""
    have = [c for c in cells if c.get("best_epoch") is not None
            and (c.get("finetune") or {}).get("head_init") != "random"]
    k = sum(int(c["best_epoch"]) == -1 for c in have)
    return f" (LP init kept in {k} of {len(have)} seeds)" if k else ""


def _last_epoch_note(cells: list[dict[str, Any]]) -> str:
    """`` (best epoch = last epoch in k of n seeds: may be under-trained)`` when ``k > 0`` of the fine-tune cells
    ``cells`` (those storing ``best_epoch`` and ``epochs_run``) were best at their last epoch
    (``best_epoch == epochs_run - 1``: validation was still improving when training stopped); ``""`` otherwise."""
    have = [c for c in cells if c.get("best_epoch") is not None and c.get("epochs_run") is not None]
    k = sum(int(c["best_epoch"]) == int(c["epochs_run"]) - 1 for c in have)
    return f" (best epoch = last epoch in {k} of {len(have)} seeds: may be under-trained)" if k else ""


def _mean_delta(means: pd.DataFrame | None, task: str, mode: str, fraction: float, label: str,
                baseline: str | None = None) -> pd.Series | None:
    """The seed-mean paired comparison row of ``label`` (test split), or None (also when it has no CI, e.g. a
    report built with ``n_boot=0``: "the CI excludes 0" is then not measured, never taken as met).

    ``baseline``: only the comparison with that baseline row (its label); None: any of the table's baselines (the
    one with the lowest CI bound), for tables that pair each row with one baseline."""
    if means is None or means.empty:
        return None
    sel = means[(means["task"] == task) & (means["split"] == "test") & (means["mode"] == mode)
                & (means["label"] == label) & np.isclose(means["fraction"].astype(float), float(fraction))]
    if baseline is not None:
        sel = sel[sel["baseline"] == baseline]
    sel = sel[np.isfinite(sel["ci_low"].astype(float)) & np.isfinite(sel["ci_high"].astype(float))]
    return None if sel.empty else sel.sort_values("ci_low").iloc[0]


def _fmt_delta(d: pd.Series | None, against: str) -> str:
    if d is None:
        return f"no paired comparison with the {against}"
    return (f"{d['delta']:+.3f} {_ci_text(d['ci_low'], d['ci_high'], signed=True)} vs {d['baseline']} "
            f"({int(d['n_seeds'])} seeds, n = {int(d['n'])})")


def _ci_text(lo: Any, hi: Any, signed: bool = False) -> str:
    """``[lo, hi]`` to 3 decimals (with signs for differences), or ``[no CI]`` when either bound is not a finite
    number (``bootstrap.n=0``, or no resample with a defined class): never ``[nan, nan]``."""
    try:
        ok = np.isfinite(float(lo)) and np.isfinite(float(hi))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return "[no CI]"
    fmt = "+.3f" if signed else ".3f"
    return f"[{float(lo):{fmt}}, {float(hi):{fmt}}]"


def _fmt_probe(r: pd.Series) -> str:
    """A probe row with its variant and validation score: ``label (linear probe) test ... (val 0.xxx)``."""
    return (f"{r['label']} ({MODE_NAMES.get(r['mode'], r['mode'])}) test {r['mean']:.3f} "
            f"{_ci_text(r['ci_low'], r['ci_high'])} ({_seeds_text(r)}; validation {r['val_mean']:.3f})")


def _fmt_row(r: pd.Series) -> str:
    return f"{r['label']} {r['mean']:.3f} {_ci_text(r['ci_low'], r['ci_high'])} ({_seeds_text(r)})"


#: the tasks of issue 12's acceptance criteria (:func:`acceptance`); results without cells of either get no block
ACCEPTANCE_TASKS = ("cinc2017", "ptbxl_super")


def _rows_paired_delta(cells: list[dict[str, Any]], task: str, mode: str, fraction: float, label: str,
                       baseline: str, n_boot: int) -> pd.Series | None:
    """The seed-mean paired comparison (test split; :func:`compare_with_baseline`, so the same pairing rules:
    same seed, same training records, records matched by key) of row ``label`` minus row ``baseline``, both in
    ``mode`` at ``task`` / ``fraction``, whatever their architectures; None when they share no seed (or no
    record)."""
    sub = [c for c in cells if c.get("task") == task and c.get("mode") == mode and c.get("predictions")
           and np.isclose(float(c.get("fraction", -1)), float(fraction)) and c.get("label") in (label, baseline)]
    methods = tuple(sorted({str(c.get("method")) for c in sub if c.get("label") == baseline}))
    if not methods or any(c.get("label") == label and c.get("method") in methods for c in sub):
        return None   # the row would count as its own baseline: no pairing by method possible
    spec = BaselineSpec(baseline, "", methods)
    _, mean = compare_with_baseline(sub, spec, n_boot=n_boot)
    mean = mean[(mean["split"] == "test") & (mean["label"] == label) & (mean["baseline"] == baseline)]
    return None if mean.empty else mean.iloc[0]


def acceptance(cells: Iterable[dict[str, Any]], summ: pd.DataFrame, means: dict[str, pd.DataFrame],
               tasks: tuple[str, str] = ACCEPTANCE_TASKS, fractions: tuple[float, float] = (0.1, 1.0),
               n_boot: int = 1000) -> list[dict[str, str]]:
    """The acceptance criteria of issue 12, evaluated on the results (never hard-coded numbers).

    SSL rows are the cells of pretrained checkpoints (``checkpoint_kind == "pretrained"``); numbers are test-split
    macro AUROC means over seeds; "CI excludes 0" is the seed-mean two-level paired bootstrap CI of
    :func:`compare_with_baseline` (seeds drawn with replacement, records resampled jointly for them).

    1. CinC 2017 at 100 %: the best SSL frozen probe (any encoder, any probe variant: linear, MLP, attention,
       mean+std; the one with the highest validation macro AUROC, then read on test) >= :data:`ACCEPT_PROBE_AUROC`
       and above the handcrafted baseline with a paired CI excluding 0;
    2. SSL above its random-init twin (linear probe) with a paired CI excluding 0 at 10 % and 100 % of the labels
       on CinC 2017 and PTB-XL super, for MAE and for at least one contrastive method
       (:data:`CONTRASTIVE_METHODS`): per group one encoder, chosen on validation (the highest validation macro
       AUROC of its linear probe, mean over seeds and over the four settings, among the group's encoders with a
       paired comparison at every setting), must clear its twin at all four settings; the other encoders' deltas
       are listed for information only (any encoder that clears them on test, or a different one per setting,
       would be a best-of-k choice made on test);
    3. PTB-XL super at 100 %: the best SSL frozen probe (chosen on validation as in 1) >= :data:`ACCEPT_PROBE_AUROC`;
    4. at 10 % of the labels on both tasks: the best fine-tuned SSL row (chosen on validation as in 1, then read
       on test) >= the supervised-from-scratch CNN: the ``supervised:`` rows and the fine-tunes of random-init CNN
       twins (trained from scratch on the same labels with the fine-tunes' recipe), decided on the paired
       comparison: the seed-mean delta (SSL - CNN, same test records) over the seeds both rows have must be >= 0
       (the point estimate; its CI is in the evidence), never the two rows' means, which may average different
       seeds (label subsets). Of several CNN rows the one with the lowest paired delta decides, which only makes
       the criterion harder; a CNN row without a paired comparison (no shared seed) is named and not counted, and
       none at all is NOT MEASURED. The evidence names the paired seeds and each row's seeds, and says how many
       seeds of the SSL row kept their LP-FT probe initialisation (``best_epoch == -1``: in effect a linear probe)
       and how many of the CNN's were best at their last epoch (``best_epoch == epochs_run - 1``: possibly
       under-trained), when any did.

    Args:
        cells: the result cells (labels assigned).
        summ: :func:`summarize` of the tidy table (macro AUROC).
        means: seed-mean comparison frames by :attr:`BaselineSpec.name`.
        tasks: ``(CinC 2017 task, PTB-XL super task)``.
        fractions: ``(low, full)`` label fractions.
        n_boot: bootstrap resamples of criterion 4's paired comparisons (computed here, pair by pair).

    Returns:
        One dict per criterion: ``{"criterion", "status", "evidence"}``; status ``"MET"``, ``"MISSED"`` (a measured
        part falls short) or ``"NOT MEASURED"`` (no measured part falls short, but cells a part needs are absent).
    """
    cinc, ptb = tasks
    low, full = fractions
    cells = list(cells)
    # SSL rows: encoders this project pretrained; imported models (zoo:<name>) are not (ECGFounder was trained with
    # labels, other imports on data the leakage guard cannot see)
    ssl = {c["label"] for c in cells if c.get("checkpoint_kind") == "pretrained" and "label" in c
           and not str(c.get("method", "")).startswith("zoo:")}
    ssl_method = {c["label"]: str(c.get("method")) for c in cells if c.get("label") in ssl}
    out: list[dict[str, str]] = []

    # 1. CinC 2017 probe >= 0.85 and above handcrafted (the best SSL frozen probe chosen on validation)
    crit1 = (f"{cinc} {_fmt_frac(full)}: best SSL frozen probe (chosen on validation) >= {ACCEPT_PROBE_AUROC:.2f} "
             f"and above the handcrafted baseline (paired CI excludes 0)")
    best = _best_on_val(cells, summ, cinc, full, ssl)
    if best is None:
        out.append({"criterion": crit1, "status": NOT_MEASURED, "evidence": "not measured: no SSL probe cells"})
    else:
        d = _mean_delta(means.get(HANDCRAFTED.name), cinc, best["mode"], full, best["label"])
        if best["mean"] < ACCEPT_PROBE_AUROC or (d is not None and d["ci_low"] <= 0):
            status = "MISSED"
        else:
            status = "MET" if d is not None else NOT_MEASURED   # no handcrafted cells to compare with
        out.append({"criterion": crit1, "status": status,
                    "evidence": f"best on validation: {_fmt_probe(best)}; {_fmt_delta(d, 'handcrafted baseline')}"})

    # 2. SSL beats the random-init twin: one encoder of the group, chosen on validation, must clear its twin at every
    # (task, fraction). "For MAE and at least one contrastive method" quantifies over methods; letting any encoder
    # of a group that clears every setting on test pass it (or, worse, a different one per setting) would be a
    # best-of-k choice made on the test split. The encoder is the one of the highest validation macro AUROC (the
    # rule of criteria 1, 3 and 4) averaged over the four settings, then read on test once.
    twin = means.get(TWIN.name)
    settings = [(task, frac) for task in (cinc, ptb) for frac in (low, full)]
    deltas: dict[str, dict[tuple[str, float], Any]] = {}
    parts = []
    for task, frac in settings:
        rows = _rows_at(summ, task, "linear", frac, ssl)
        got = {lab: _mean_delta(twin, task, "linear", frac, lab) for lab in
               (rows["label"] if not rows.empty else [])}
        for lab, d in got.items():
            deltas.setdefault(lab, {})[(task, frac)] = d
        detail = "; ".join(f"{lab} -" if d is None else
                           f"{lab} {d.delta:+.3f} {_ci_text(d.ci_low, d.ci_high, signed=True)}"
                           for lab, d in got.items()) or "no cells"
        parts.append(f"{task} {_fmt_frac(frac)}: {detail}")
    groups = {"MAE": lambda m: m == "mae", "contrastive": lambda m: m in CONTRASTIVE_METHODS}
    verdicts, said = [], []

    def where(ws: Sequence[tuple[str, float]]) -> str:
        return ", ".join(f"{t} {_fmt_frac(f)}" for t, f in ws)

    for name, of_group in groups.items():
        labs = [lab for lab in deltas if of_group(ssl_method[lab])]

        def clears(lab: str, at: tuple[str, float]) -> bool | None:
            d = deltas[lab].get(at)
            return None if d is None else bool(d["ci_low"] > 0)

        failing = {lab: [w for w in settings if clears(lab, w) is False] for lab in labs}
        failing = {lab: ws for lab, ws in failing.items() if ws}
        # candidates: the group's encoders with a validation score and a paired comparison at every setting (having
        # a twin is a fact of the sweep, not a test score); the one best on validation is the group's encoder
        val = _val_mean_over(cells, settings, set(labs), "linear")
        able = [lab for lab in labs if lab in val and all(deltas[lab].get(w) is not None for w in settings)]
        if able:
            chosen = min(able, key=lambda lab: (-val[lab], lab))
            how = (f"{chosen} (chosen on validation: mean validation macro AUROC {val[chosen]:.3f} over the "
                   f"{len(settings)} settings, the best of {len(able)} encoder{'s' if len(able) != 1 else ''} with a "
                   f"paired comparison at every setting)")
            if chosen not in failing:
                verdicts.append("ok")
                said.append(f"{name}: yes: {how} clears its twin at all {len(settings)} settings")
            else:
                verdicts.append("no")
                said.append(f"{name}: no: {how} does not clear its twin at {where(failing[chosen])}")
        elif labs and len(failing) == len(labs):   # every encoder misses somewhere: whichever is chosen misses
            verdicts.append("no")
            said.append(f"{name}: no (no encoder clears its twin at every setting: " + "; ".join(
                f"{lab} not at {where(ws)}" for lab, ws in failing.items()) + ")")
        else:
            verdicts.append("not measured")
            said.append(f"{name}: not measured (" + (
                "no encoder of the group has paired comparisons" if not labs else
                "no encoder has a validation score and a paired comparison at every setting") + ")")
    out.append({"criterion": f"SSL > random-init twin (linear probe, paired CI excludes 0) at {_fmt_frac(low)} and "
                             f"{_fmt_frac(full)} on {cinc} and {ptb}, for MAE and >= 1 contrastive method "
                             f"({', '.join(CONTRASTIVE_METHODS)}): each group's encoder chosen on validation, at "
                             f"every setting",
                "status": _overall(verdicts),
                "evidence": " <br> ".join(said + ["paired deltas of every encoder (for information):"] + parts)})

    # 3. PTB-XL super probe >= 0.85 (the best SSL frozen probe chosen on validation)
    best = _best_on_val(cells, summ, ptb, full, ssl)
    out.append({"criterion": f"{ptb} {_fmt_frac(full)}: best SSL frozen probe (chosen on validation) >= "
                             f"{ACCEPT_PROBE_AUROC:.2f}",
                "status": (NOT_MEASURED if best is None else
                           "MET" if best["mean"] >= ACCEPT_PROBE_AUROC else "MISSED"),
                "evidence": f"best on validation: {_fmt_probe(best)}" if best is not None else "not measured"})

    # 4. fine-tuned SSL (chosen on validation) >= the supervised-from-scratch CNN at the low fraction: the
    # supervised: recipe's rows, and random-init CNNs fine-tuned with the fine-tunes' recipe (the twins' fine-tunes:
    # also trained from scratch on the labels; on PTB-XL at 10 % that recipe beat the supervised: one by +0.10 once
    # the twins' BatchNorm statistics were computed, 2026-12-06)
    cnn = {c["label"] for c in cells if SUPERVISED_CNN.is_baseline(c) and "label" in c}
    twin_cnn = {c["label"] for c in cells if TWIN.is_baseline(c) and c.get("mode") == "finetune" and "label" in c
                and str(c.get("backbone") or "").startswith(SUPERVISED_CNN_FAMILIES)}
    parts, verdicts = [], []
    for task in (cinc, ptb):
        s = _best_on_val(cells, summ, task, low, ssl, lambda mode: mode == "finetune")
        c_rows = _rows_at(summ, task, "finetune", low, cnn | twin_cnn)
        if s is None or c_rows.empty:
            verdicts.append("not measured")
            parts.append(f"{task}: not measured ({'no SSL fine-tune' if s is None else 'no supervised CNN'} "
                         f"cells at {_fmt_frac(low)})")
            continue
        # decided on the paired comparison (the seed-mean delta over the seeds both rows have, on the same records),
        # never on the two rows' table means: those can average different seeds, i.e. different label subsets (a CNN
        # run with more seeds, a crashed seed), and then say "SSL >= CNN" when SSL is worse on every shared seed. The
        # paired number is against that CNN row itself, never another baseline of the table (a random-init twin
        # table also pairs a ViT row with its ViT twin); of several CNN rows, the one the SSL row beats by least
        # (or loses to by most) decides, which only makes the criterion harder
        paired, unpaired = [], []
        for _, cr in c_rows.iterrows():
            ref = TWIN if cr["label"] in twin_cnn else SUPERVISED_CNN
            # computed here for this pair of rows: the report's tables pair an SSL row with its own twin only (a
            # ViT SSL row has no row against a random-init CNN's fine-tune there)
            d = _rows_paired_delta(cells, task, "finetune", low, s["label"], cr["label"], n_boot)
            if d is None or not np.isfinite(float(d["delta"])):
                unpaired.append(f"{cr['label']} s{_seed_ids(cr.get('seeds'))}")
            else:
                paired.append((cr, ref, d))
        not_paired = (f" (CNN rows without a paired comparison on shared seeds, not counted: "
                      f"{'; '.join(unpaired)})" if unpaired else "")
        if not paired:
            verdicts.append("not measured")
            parts.append(f"{task}: not measured: no paired comparison of SSL {_fmt_row(s)} "
                         f"s{_seed_ids(s.get('seeds'))} with a supervised CNN row on shared seeds{not_paired}")
            continue
        c, ref, d = min(paired, key=lambda x: (float(x[2]["delta"]), -float(x[0]["mean"]), str(x[0]["label"])))
        ok = bool(float(d["delta"]) >= 0)
        verdicts.append("ok" if ok else "no")
        # an LP-FT seed that kept its probe initialisation is a linear probe there; a CNN best at its last epoch
        # may have been stopped before it converged
        lp_kept = _lp_kept_note(_row_cells(cells, s["label"], task, "finetune", low))
        last = _last_epoch_note(_row_cells(cells, c["label"], task, "finetune", low))
        how = "random-init CNN, fine-tune recipe" if c["label"] in twin_cnn else "supervised recipe"
        parts.append(f"{task}: {'ok' if ok else 'no'}: SSL {_fmt_row(s)}{lp_kept} (best on validation: "
                     f"{s['val_mean']:.3f}) vs CNN from scratch ({how}) {_fmt_row(c)}{last}; paired "
                     f"(decides) over seeds {_seed_ids(d.get('seeds'))}, those both rows have (SSL row: seeds "
                     f"{_seed_ids(s.get('seeds'))}; CNN row: seeds {_seed_ids(c.get('seeds'))}): "
                     f"{_fmt_delta(d, ref.name)}{not_paired}")
    out.append({"criterion": f"{_fmt_frac(low)} of the labels: best fine-tuned SSL (chosen on validation) >= "
                             f"supervised-from-scratch CNN (the supervised recipe or a random-init CNN fine-tuned "
                             f"with the fine-tunes' recipe, the hardest one) on {cinc} and {ptb}: paired mean delta "
                             f">= 0 over the seeds both rows have",
                "status": _overall(verdicts), "evidence": " <br> ".join(parts)})
    return out


NOT_MEASURED = "NOT MEASURED"


def _overall(verdicts: Sequence[str]) -> str:
    """A criterion's status from its parts' ``ok`` / ``no`` / ``not measured``: a measured miss is MISSED whatever
    else is absent; otherwise any part without cells leaves the criterion NOT MEASURED."""
    if "no" in verdicts:
        return "MISSED"
    return NOT_MEASURED if "not measured" in verdicts else "MET"


def acceptance_markdown(rows: list[dict[str, str]]) -> str:
    """The acceptance block of ``results.md`` (:func:`acceptance`)."""
    if not rows:
        return ""
    lines = ["## Acceptance (issue 12), computed from the cells", "",
             "Test-split macro AUROC, mean over seeds [mean per-seed 95 % CI] (seeds); paired deltas: mean over "
             "the seeds both rows have [two-level paired 95 % bootstrap CI: seeds and records resampled]. Criterion "
             "4 is decided on the paired delta (>= 0), not on the two rows' means. \"Chosen on validation\": the "
             "row (encoder, probe type) of "
             "the highest validation macro AUROC, mean over seeds (criterion 2: also over its four settings), then "
             "read on test once. A linear probe's validation score is the max over its C grid, an MLP / attention "
             "probe's the max over its lr (and weight-decay) grid and every early-stopped epoch, so the latter carry "
             "more selection optimism when probe types compete on validation. `LP init kept`: an LP-FT fine-tune "
             "seed whose validation preferred its linear-probe initialisation to every fine-tuned epoch "
             "(`best_epoch` -1), in effect a linear probe.", "",
             "| # | criterion | status | numbers |", "|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['criterion']} | **{r['status']}** | {r['evidence']} |")
    lines.append("")
    return "\n".join(lines)


#: share of bootstrap resamples over fewer classes above which a cell's CI is not that of its macro average
DEGENERATE_SHARE = 0.1


def classes_left_out(result: Mapping[str, Any]) -> tuple[list[str], int]:
    """The classes a split's macro averages leave out, and the task's class count.

    ``excluded_classes`` (no positive or no negative record in the split) and, on an external set whose labels were
    translated from SNOMED CT, ``not_evaluable_classes`` (no code of the set reaches the class: its label is
    unknown, so :func:`ecgfm.evaluate.sweep.score_external` scores the other classes only; before 2026-12-07 no
    table or log line said so).

    Returns:
        ``(names left out, number of task classes)``.
    """
    excluded = list(result.get("excluded_classes") or [])
    gone = [c for c in (result.get("not_evaluable_classes") or []) if c not in excluded]
    scored = result.get("per_class_auroc") or {}
    n_classes = len(scored) + len([c for c in gone if c not in scored])
    return excluded + gone, n_classes


def degenerate_ci(result: Mapping[str, Any]) -> bool:
    """True when over :data:`DEGENERATE_SHARE` of the split's bootstrap resamples averaged over fewer classes
    (``n_degenerate`` of ``n_boot``): its CI is then not that of the macro average over all classes."""
    n_boot, deg = result.get("n_boot"), int(result.get("n_degenerate") or 0)
    return isinstance(n_boot, int) and n_boot > 0 and deg > DEGENERATE_SHARE * n_boot


def excluded_classes_markdown(cells: Iterable[dict[str, Any]]) -> str:
    """A section naming every cell whose macro AUROC leaves a class out (no positive or no negative record in the
    split: ``excluded_classes``) or whose CI has resamples still degenerate after the redraws (``n_degenerate``:
    their macro AUROC averages over fewer classes), so that a macro average
    over fewer classes never passes for one over all; empty when there is none."""
    rows = []
    for c in cells:
        for split, r in sorted((c.get("results") or {}).items()):
            if split == "val":   # what the tables show: test and external splits
                continue
            left, _ = classes_left_out(r)
            gone = set(r.get("not_evaluable_classes") or [])
            left = [f"{c} (not evaluable: no code of the set maps to it)" if c in gone else c for c in left]
            deg = int(r.get("n_degenerate") or 0)
            if left or deg:
                n_boot = r.get("n_boot")
                # many resamples over fewer classes (a class with 1-2 positives): the interval is that of another
                # average (without the rare classes, whose AUROCs are the extreme ones), not of the point's
                flag = " **(over 10 %: the CI is not that of the macro average over all classes)**" \
                    if degenerate_ci(r) else ""
                rows.append(f"| {c.get('label', c.get('method'))} | {MODE_NAMES.get(c.get('mode'), c.get('mode'))} | "
                            f"{c.get('task')} | {split} | {_fmt_frac(c.get('fraction', 1))} | {c.get('seed')} | "
                            f"{', '.join(map(str, left)) or '-'} | {deg} of {n_boot if n_boot is not None else '?'}{flag} |")
    if not rows:
        return ""
    log.warning("%d cell split(s) average macro AUROC over fewer classes than the task has, or redrew degenerate "
                "resamples: listed in the report", len(rows))
    return "\n".join(["", "## macro_auroc: classes left out of a cell's macro average", "",
                      "A class without both a positive and a negative record in a split has no AUROC, nor has a "
                      "class of an external set that no code of the set maps to: that cell's "
                      "macro AUROC is over the other classes. Bootstrap resamples in which a class had no positive or "
                      "no negative record were redrawn (up to 50 rounds); the last column counts those still degenerate "
                      "after that (`n_degenerate`), whose macro AUROC averages over the remaining classes.", "",
                      "| method | mode | task | split | fraction | seed | classes left out | resamples over fewer "
                      "classes |",
                      "|---|---|---|---|---|---|---|---|", *rows, ""])


def f1_no_threshold_markdown(cells: Iterable[dict[str, Any]]) -> str:
    """A section naming, per cell and split, the classes its macro F1 leaves out for want of a validation positive
    (``f1_no_threshold_classes`` of :func:`ecgfm.evaluate.metrics.evaluate_scores`: no threshold could be chosen,
    the placeholder 0.5 is not a measurement); empty when no cell has one (cells computed before 2026-12-07 do not
    record it: their macro F1 counted those classes at 0.5)."""
    rows = []
    for c in cells:
        for split, r in sorted((c.get("results") or {}).items()):
            left = list(r.get("f1_no_threshold_classes") or []) if split != "val" else []
            if left:
                rows.append(f"| {c.get('label', c.get('method'))} | {MODE_NAMES.get(c.get('mode'), c.get('mode'))} | "
                            f"{c.get('task')} | {split} | {_fmt_frac(c.get('fraction', 1))} | {c.get('seed')} | "
                            f"{', '.join(map(str, left))} |")
    if not rows:
        return ""
    return "\n".join(["", "## macro_f1: classes without a validation positive, left out of a cell's macro F1", "",
                      "A multi-label class without a positive validation record has no F1 threshold chosen on "
                      "validation (a placeholder 0.5 makes the hard predictions): its F1 would measure the "
                      "placeholder, not the model, so that cell's macro F1 (and its CI) is over the other classes "
                      "with a positive record. Macro AUROC is not affected.", "",
                      "| method | mode | task | split | fraction | seed | classes left out of macro F1 |",
                      "|---|---|---|---|---|---|---|", *rows, ""])


def handcrafted_missing_markdown(cells: Iterable[dict[str, Any]]) -> str:
    """A section with, per task, data set and split, how many records the handcrafted features (the handcrafted
    row, and ``probe.side_features=handcrafted``) had to fill (``handcrafted_missing`` of the cells: fewer than 3
    beats for the RR group, 4 for successive differences, 3 complete beats for morphology; 0 + an indicator
    column), once per (task, data set, split); empty when no cell used handcrafted features. Cells computed before
    2026-12-07 do not record it."""
    seen: dict[tuple[str, str, str], dict[str, int]] = {}
    for c in cells:
        for split, counts in sorted((c.get("handcrafted_missing") or {}).items()):
            seen.setdefault((str(c.get("task")), str(c.get("dataset")), str(split)), counts)
    if not seen:
        return ""
    rows = [f"| {task} | {dataset} | {split} | {n.get('records', '?')} | {n.get('missing_rr', '?')} | "
            f"{n.get('missing_drr', '?')} | {n.get('missing_morph', '?')} |"
            for (task, dataset, split), n in sorted(seen.items())]
    return "\n".join(["", "## Handcrafted features: records filled for too few beats", "",
                      "Records whose R-peaks were too few for a feature group: the probe scores that group at the "
                      "medians of its training records and sets the group's indicator column (whose weight means "
                      "something only when training records lacked the group too); a handcrafted number resting "
                      "on many such records says little about rhythm.", "",
                      "| task | data set | split | records | no RR (< 3 beats) | no successive differences (< 4) | "
                      "no morphology (< 3 whole beats) |",
                      "|---|---|---|---|---|---|---|", *rows, ""])


def task_notes_markdown(cells: Iterable[dict[str, Any]]) -> str:
    """A section with the notes the tasks' builds left in their cells (``task_notes``: classes left out of a task
    for want of a training positive or of records, records in no split, patient-id caveats, classes without a
    positive in a split, an external set's exclusions: ``external_notes``), once per (task, data set), with how many of that task's
    cells carry each: a table row computed on a reduced class space or split says so beside the table, not only in
    the log of the run that computed it.

    Args:
        cells: result cells.

    Returns:
        The markdown section; empty when no cell has a note.
    """
    notes: dict[tuple[str, str], dict[str, int]] = {}
    totals: dict[tuple[str, str], int] = {}
    for c in cells:
        own = [((str(c.get("task")), str(c.get("dataset") or c.get("task"))), c.get("task_notes"))]
        if c.get("external_dataset"):
            own.append(((str(c.get("task")), f"external:{c['external_dataset']}"), c.get("external_notes")))
        for key, got in own:
            totals[key] = totals.get(key, 0) + 1
            for note in dict.fromkeys(str(n) for n in (got or [])):
                notes.setdefault(key, {})
                notes[key][note] = notes[key].get(note, 0) + 1
    if not notes:
        return ""
    lines = ["", "## Task notes", "",
             "What building each task's labels and splits left out or assumed (the cells' `task_notes`).", "",
             "| task | data | note | cells |", "|---|---|---|---|"]
    for (task, data), got in sorted(notes.items()):
        for note, k in got.items():
            text = note.replace("|", "/").replace("\n", " ")
            lines.append(f"| {task} | {data} | {text} | {k} of {totals[(task, data)]} |")
    lines.append("")
    return "\n".join(lines)


def superseded_cells(cells: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """``(checkpoint, checkpoint_id)`` of cells computed from an exported encoder whose folder now holds other
    weights (overwritten in place by a later run): their rows stay in the tables (labelled ``method@<hash>``) but
    no acceptance criterion may choose them, since those weights exist nowhere any more. The folder is the cell's
    recorded ``checkpoint_path`` (absolute), or its checkpoint string when that is absolute; a relative string
    without a recorded path (cells before 2026-12-06), a folder that is gone or unreadable, and pseudo-checkpoints
    (``random:``, ``supervised:``, ``zoo:``, ``handcrafted``) are not judged (the unjudged relative ones are
    counted in a warning). A warning names each superseded one."""
    from ecgfm.evaluate.identity import checkpoint_identity

    now: dict[str, str | None] = {}
    out: set[tuple[str, str]] = set()
    unjudged: set[str] = set()
    for c in cells:
        ck, cid = str(c.get("checkpoint") or ""), cell_identity(c)[0]
        if not ck or ck == "handcrafted" or ":" in ck:
            continue
        # the folder the cell was computed from: its recorded absolute path, or the string if it is absolute (a
        # relative one resolved from the report's folder could name other weights: not judged)
        where = c.get("checkpoint_path") or (ck if os.path.isabs(ck) else None)
        if where is None:
            unjudged.add(ck)
            continue
        if not Path(where).exists():
            continue
        if where not in now:
            try:
                now[where] = checkpoint_identity(where)["id"]
            except Exception:  # noqa: BLE001 - an unreadable folder is not judged (the report must still be built)
                now[where] = None
        if now[where] is not None and not cid.startswith("legacy") and cid != now[where] and (ck, cid) not in out:
            out.add((ck, cid))
            log.warning("%s: cells of checkpoint identity %s were computed from weights this folder no longer "
                        "holds (now %s): kept in the tables, left out of the acceptance block", where, cid,
                        now[where])
    if unjudged:
        log.warning("%d checkpoint(s) of cells written before cells recorded their checkpoint's folder (e.g. %s) "
                    "could not be checked for weights overwritten since: rerun their sweep (reused cells record "
                    "it) to include them", len(unjudged), sorted(unjudged)[0])
    return out


def build_report(results_dir: str | os.PathLike, plot: bool = True, compare: bool = True,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Rebuild ``results.csv``, ``results.md`` and ``results.png`` from every cell of ``results_dir``.

    Args:
        results_dir: the sweep's results folder.
        plot: draw ``results.png``.
        compare: add the paired comparisons with every baseline of :data:`BASELINES` (``comparisons.csv``: per
            seed; ``comparisons_mean.csv``: mean over seeds with the joint CI) and the acceptance block.
        n_boot: resamples of the paired bootstrap.

    Returns:
        ``{"csv", "markdown", "plot" (or None), "n_cells", "comparisons" (or None), "acceptance" (list of
        criteria, empty without ``compare``)}``.
    """
    root = Path(results_dir)
    cells = load_cells(root)
    df = tidy_rows(cells)
    _atomic_write_text(root / "results.csv", df.to_csv(index=False))
    md = (markdown_table(df) + excluded_classes_markdown(cells) + f1_no_threshold_markdown(cells)
          + handcrafted_missing_markdown(cells) + task_notes_markdown(cells))
    comp_path, accepted = None, []
    if compare:
        per_seed, means = [], {}
        sections = []
        for spec in BASELINES:
            comp, mean = compare_with_baseline(cells, spec, n_boot=n_boot)
            means[spec.name] = mean
            if comp.empty:
                continue
            per_seed.append(comp)
            sections.append(comparison_markdown(comp, reference=spec.name, title=spec.title, means=mean))
        all_means = [m for m in means.values() if not m.empty]
        if per_seed:
            comp_path = root / "comparisons.csv"
            _atomic_write_text(comp_path, pd.concat(per_seed, ignore_index=True).to_csv(index=False))
        if all_means:
            _atomic_write_text(root / "comparisons_mean.csv",
                               pd.concat(all_means, ignore_index=True).to_csv(index=False))
        for name, fresh in (("comparisons.csv", per_seed), ("comparisons_mean.csv", all_means)):
            if not fresh:   # nothing to compare now: an older run's file would be read (and copied) as current
                (root / name).unlink(missing_ok=True)
        clear = df[df["leakage"] != "leaked"] if "leakage" in df else df   # a leaked row never meets a criterion
        gone = superseded_cells(cells)
        if gone:   # weights that exist nowhere any more: shown in the tables, never chosen by a criterion
            clear = clear[[(str(ck), cid) not in gone for ck, cid in zip(clear["checkpoint"], clear["checkpoint_id"])]]
        # the issue-12 acceptance block only where its tasks have cells (a user's synthetic or own-task sweep got
        # four NOT MEASURED criteria about CinC 2017 / PTB-XL it never ran)
        if {str(c.get("task")) for c in cells} & set(ACCEPTANCE_TASKS):
            accepted = acceptance([c for c in cells if leakage_status(c) != "leaked"
                                   and (str(c.get("checkpoint")), cell_identity(c)[0]) not in gone],
                                  summarize(clear, "macro_auroc"), means, n_boot=n_boot)
        if len(df):
            md = md.replace("# Results\n", "# Results\n\n" + acceptance_markdown(accepted), 1)
        md += "".join("\n" + s for s in sections)
    _atomic_write_text(root / "results.md", md)
    png = plot_results(df, root / "results.png") if plot and len(df) else None
    if png is None and not len(df):
        (root / "results.png").unlink(missing_ok=True)   # no cells: no figure of older ones
    return {"csv": str(root / "results.csv"), "markdown": str(root / "results.md"),
            "plot": None if png is None else str(png), "n_cells": len(cells),
            "comparisons": None if comp_path is None else str(comp_path), "acceptance": accepted}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rebuild the results table and plot from a sweep's cell files.")
    ap.add_argument("results_dir")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    from ecgfm.errors import run_command

    def run(results_dir: str) -> dict[str, Any]:
        cells = Path(results_dir) / "cells"
        if not cells.is_dir():   # a typo would otherwise get a new, empty table and four MISSED criteria
            raise ValueError(f"{results_dir}: no results folder (expected {cells} with the cell files written by "
                             f"probe.py / finetune.py)")
        return build_report(results_dir, plot=not args.no_plot)

    out = run_command(run, args.results_dir, (ValueError,))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
