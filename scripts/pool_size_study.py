"""What more pretraining data buys at a fixed compute budget (issue 12 item 7): the CPU-budget MAE recipe
(``+experiment=mae_cpu30``, 1,800 steps x 64 crops of 10 s) pretrained on three pools, then linear-probed:

* ``real``: the held-out-free pool of the shared real corpora (``data=pretrain_pool_heldout_free``);
* ``real+20k`` / ``real+100k``: the same plus 20,000 / 100,000 generated 12-lead ECGs (deepfake-ecg's Pulse2Pulse
  GAN, ``data=pretrain_pool_plus_deepfake``; the 20k records are the first 20k of the 100k).

Caches are drawn in proportion to their records, so at a fixed step budget every pool record has the same expected
number of draws and the generated records *dilute* the real ones: the study measures "more (generated) data at the
same compute". Every encoder is linear-probed beside the random-init twin of the architecture on the benchmark's
tasks, fractions and seeds; the report gives each row's test macro AUROC (mean of seeds, mean per-seed 95 % CI),
its validation AUROC (mean of seeds with their min-max: a spread over seeds, not a CI: the cells keep no
per-record validation predictions to bootstrap), and the paired differences (95 % CI, records resampled jointly over the seeds) against the
real-only encoder and against the twin::

    python scripts/pool_size_study.py                       # pretrain (resumes / skips finished runs), probe, report
    python scripts/pool_size_study.py --stages report       # tables and plot only

Outputs: ``<out>/<pool>/`` (training runs, ``pretrain_time.json``), ``<out>/results/`` (probe cells),
``<out>/pool_size.md`` and ``docs/benchmark/pool_size.{md,png,csv}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_real import resolve_from_caller  # noqa: E402  (scripts/, beside this file)

PY = sys.executable
#: pool name -> (run folder under --out, generated records, train.py data overrides)
POOLS: dict[str, tuple[str, int, list[str]]] = {
    "real": ("real", 0, ["data=pretrain_pool_heldout_free"]),
    "real+20k": ("df20k", 20_000, ["data=pretrain_pool_plus_deepfake", "data.params.deepfake_n=20000"]),
    "real+100k": ("df100k", 100_000, ["data=pretrain_pool_plus_deepfake", "data.params.deepfake_n=100000"]),
}
STAGES = ["pretrain", "probe", "report"]


def run_dir(args: argparse.Namespace, pool: str) -> Path:
    return Path(args.out) / POOLS[pool][0]


def encoder(args: argparse.Namespace, pool: str) -> str:
    return str(run_dir(args, pool) / "encoder")


def seed_spread(values: Any) -> str:
    """Mean over seeds with the seeds' min-max, labelled (a spread over seeds, not a confidence interval), e.g.
    ``0.812 (seeds 0.800-0.820)``; ``0.812 (one seed)``; ``–`` without a finite value. Shared with
    scripts/crop_ablation.py."""
    import numpy as np

    v = np.asarray([float(x) for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.3f} (one seed)"
    return f"{v.mean():.3f} (seeds {v.min():.3f}-{v.max():.3f})"


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def stage_pretrain(args: argparse.Namespace, env: dict[str, str]) -> None:
    """One ``mae_cpu30`` run per pool (a finished run, one with ``encoder/encoder.json``, is skipped); the fixed
    step budget is what is compared, so ``trainer.max_time`` is raised to ``--max-time`` (the recipe's 30 min would
    cut a run on a slower or shared machine short of its steps)."""
    for pool in args.pools:
        out = run_dir(args, pool)
        if (out / "encoder" / "encoder.json").is_file():
            print(f"[pool-size] {pool}: pretrained already ({out})", flush=True)
            continue
        cmd = [PY, "train.py", "+experiment=mae_cpu30", *POOLS[pool][2], f"paths.data_root={args.data_root}",
               f"paths.cache_root={args.cache_root}", f"hydra.run.dir={out}", f"torch_threads={args.threads}",
               f"trainer.max_time={args.max_time}", *args.train_overrides]
        print("[pool-size] $ " + " ".join(cmd), flush=True)
        cpu0, t0 = _cpu_children(), time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        summary = json.loads((out / "summary.json").read_text())
        leg = {"wall_s": round(time.perf_counter() - t0, 1), "fit_time_s": summary.get("fit_time_s") or 0.0,
               "cpu_s": round(_cpu_children() - cpu0, 1)}
        # a resumed run's summary counts every step but times only this leg: add the legs before it
        times = out / "pretrain_time.json"
        legs = (json.loads(times.read_text()).get("legs") or []) if summary.get("resumed_from") and \
            times.is_file() else []
        legs.append(leg)
        times.write_text(json.dumps({
            "pool": pool, "experiment": "mae_cpu30", "steps": summary.get("steps"), "legs": legs,
            "resumed": bool(summary.get("resumed_from")),
            **{k: round(sum(float(x[k]) for x in legs), 1) for k in ("wall_s", "fit_time_s", "cpu_s")},
            "threads": args.threads, "command": " ".join(cmd[1:])}, indent=1))


def stage_probe(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Linear probes of every pool's encoder and the random-init twin (one multirun)."""
    ckpts = [encoder(args, p) for p in args.pools]
    cmd = [PY, "probe.py", "-m", f"checkpoint={','.join(ckpts + ['random:' + ckpts[0]])}",
           f"task={','.join(args.tasks)}", f"fraction={','.join(args.fractions)}", f"seed={','.join(args.seeds)}",
           f"results_dir={Path(args.out) / 'results'}", f"paths.cache_root={args.cache_root}",
           f"paths.data_root={args.data_root}", f"bootstrap.n={args.bootstrap}", "prepare_workers=2",
           f"torch_threads={args.threads}", f"stride_seconds={args.stride_seconds}", "report=never",
           *args.eval_overrides]
    print("[pool-size] $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def _run_data_settings(run: Path, summary: dict | None = None) -> tuple[int, float]:
    """``(records drawn per optimiser step, data.val_fraction)`` of a pretraining run: ``data.batch_size`` x
    gradient accumulation x processes (the run's summary.json, else its config.yaml: ``trainer.devices`` x
    ``trainer.num_nodes`` when integers), the recipe's 64 / 0.05 where the run has no config."""
    import yaml

    cfg_file = run / "config.yaml"
    cfg = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    data, trainer, summary = cfg.get("data") or {}, cfg.get("trainer") or {}, summary or {}

    def _int(v: object) -> int:
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1

    accum = summary.get("accumulate_grad_batches") or _int(trainer.get("accumulate_grad_batches", 1))
    world = summary.get("world_size") or _int(trainer.get("devices", 1)) * _int(trainer.get("num_nodes", 1))
    return int(data.get("batch_size", 64)) * int(accum) * int(world), float(data.get("val_fraction", 0.05))


def pool_records(args: argparse.Namespace, pool: str) -> int | None:
    """Records in the pool's caches (the run's summary.json names them)."""
    from ecgfm.data.cache import CorpusCache

    try:
        dirs = json.loads((run_dir(args, pool) / "summary.json").read_text())["cache_dirs"]
    except (OSError, ValueError, KeyError):
        return None
    return sum(len(CorpusCache(d)) for d in dirs)


def report(args: argparse.Namespace) -> str:
    """The pool-size tables (Markdown, CSV) and plot; returns the Markdown."""
    import pandas as pd

    from ecgfm.evaluate import report as R

    cells = [c for c in R.load_cells(Path(args.out) / "results") if c.get("mode") == "linear"]
    names = {encoder(args, p): p for p in args.pools}
    names["random:" + encoder(args, args.pools[0])] = "random-init twin"
    cells = [c for c in cells if c.get("checkpoint") in names]
    for c in cells:
        c["label"] = names[c["checkpoint"]]
    if not cells:
        raise SystemExit(f"[pool-size] no probe cells under {Path(args.out) / 'results'}: run the probe stage")
    ref_name = f"{args.pools[0]} pool"     # the first pool is the reference, whichever it is
    ref = R.BaselineSpec(ref_name, f"Paired comparison with the {ref_name}", ("mae",),
                         same_architecture=True, checkpoints=(encoder(args, args.pools[0]),))
    _, vs_real = R.compare_with_baseline(cells, ref, n_boot=args.bootstrap)
    _, vs_twin = R.compare_with_baseline(cells, R.TWIN, n_boot=args.bootstrap)
    rows = []
    for c in cells:
        t = c["results"]["test"]["macro_auroc"]
        rows.append({"pool": c["label"], "task": c["task"], "fraction": float(c["fraction"]), "seed": int(c["seed"]),
                     "val": c.get("val_macro_auroc"), "test": t["value"], "ci_low": t["ci_low"],
                     "ci_high": t["ci_high"], "n_test": c["results"]["test"].get("n")})
    per_seed = pd.DataFrame(rows).sort_values(["task", "fraction", "pool", "seed"])
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(docs / "pool_size.csv", index=False, float_format="%.4f")

    def delta(table: pd.DataFrame, pool: str, task: str, frac: float) -> str:
        hit = table[(table["label"] == pool) & (table["task"] == task) & (table["fraction"] == frac)
                    & (table["split"] == "test")]
        if hit.empty:
            return "–"
        d = hit.iloc[0]
        at = per_seed[(per_seed["task"] == task) & (per_seed["fraction"] == frac)]
        rows_seeds = [set(at[at["pool"] == name]["seed"].astype(str)) for name in (pool, d["baseline"])
                      if name in set(at["pool"])]
        # the paired delta averages the seeds both rows have: say so when the printed means average others
        note = f" (seeds {d['seeds']})" if any(set(str(d["seeds"]).split()) != r for r in rows_seeds) else ""
        return f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{note}"

    order = list(args.pools) + ["random-init twin"]
    lines = ["| task | labels | pool | generated records | pool records | draws per record | val AUROC, mean "
             "(min-max over seeds, not a CI) | "
             f"test AUROC [mean per-seed 95 % CI] | Δ vs {args.pools[0]} [paired 95 % CI] | Δ vs random-init twin |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    meta = {}
    for p in args.pools:
        n = pool_records(args, p)
        t = json.loads((run_dir(args, p) / "summary.json").read_text()) if (run_dir(args, p) / "summary.json"
                                                                             ).is_file() else {}
        steps = t.get("steps")
        per_step, val = _run_data_settings(run_dir(args, p), t)
        draws = f"{steps * per_step / ((1 - val) * n):.1f}" if n and steps else "–"   # the run's own batch / val split
        meta[p] = (POOLS[p][1], n, draws, steps)
    for (task, frac), g in per_seed.groupby(["task", "fraction"], sort=True):
        for pool in order:
            s = g[g["pool"] == pool]
            if s.empty:
                continue
            gen, n, draws, _ = meta.get(pool, ("–", None, "–", None))
            lines.append(f"| {task} | {100 * frac:g} % | {pool} | {gen if pool in meta else '–'} | "
                         f"{n if n else '–'} | {draws} | {seed_spread(s['val'])} | {s['test'].mean():.3f} "
                         f"[{s['ci_low'].mean():.3f}, {s['ci_high'].mean():.3f}] (seeds "
                         f"{' '.join(str(x) for x in s['seed'])}, n={int(s['n_test'].max())}) | "
                         f"{delta(vs_real, pool, task, frac) if pool != args.pools[0] else 'reference'} | "
                         f"{delta(vs_twin, pool, task, frac) if pool in meta else '–'} |")
    steps = {p: m[3] for p, m in meta.items()}
    times = []
    for p in args.pools:
        f = run_dir(args, p) / "pretrain_time.json"
        if f.is_file():
            t = json.loads(f.read_text())
            legs = len(t.get("legs") or [1])
            # cpu_s is the whole train.py process: with caches built by that run (a first run) it includes
            # building them; fit_time_s is the fit only
            times.append(f"{p}: {t.get('steps')} steps, fit {t.get('fit_time_s', 0):.0f} s, "
                         f"{t.get('cpu_s', 0):.0f} CPU-s of the train.py process (with any cache it built), "
                         f"{t.get('threads')} thread(s)"
                         + (f" ({legs} runs: resumed)" if legs > 1 else
                            " (resumed: the runs before it were not timed, the time is the last run's only)"
                            if t.get("resumed") else ""))
    md = ("Linear probe (mean window embedding), test macro AUROC, mean over seeds; differences are paired on the "
          "same test records, records resampled jointly over the seeds. The validation AUROC (the one the probe's C "
          "was chosen on) is given with its spread over seeds, not a CI (no per-record validation predictions are "
          "kept). Pretraining steps: "
          + ", ".join(f"{p} {s}" for p, s in steps.items()) + ".\n\n" + "\n".join(lines) + "\n\n"
          + ("Pretraining cost: " + "; ".join(times) + ".\n" if times else ""))
    (Path(args.out) / "pool_size.md").write_text(md)
    (docs / "pool_size.md").write_text(md)
    plot(per_seed, order, meta, docs / "pool_size.png")
    print(md, flush=True)
    return md


def plot(per_seed: Any, order: list[str], meta: dict[str, tuple], path: Path) -> None:
    """Test macro AUROC (mean of seeds, mean CI) against the number of generated records, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(per_seed["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for frac, g in per_seed[per_seed["task"] == task].groupby("fraction"):
            xs, ys, lo, hi = [], [], [], []
            for pool in order:
                s = g[g["pool"] == pool]
                if s.empty or pool not in meta:
                    continue
                xs.append(meta[pool][0] + 1)
                ys.append(s["test"].mean())
                lo.append(s["ci_low"].mean())
                hi.append(s["ci_high"].mean())
            line, = ax.plot(xs, ys, marker="o", label=f"MAE, {100 * frac:g} % labels")
            ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
            twin = g[g["pool"] == "random-init twin"]
            if not twin.empty:
                ax.axhline(twin["test"].mean(), ls=":", color=line.get_color(),
                           label=f"random-init twin, {100 * frac:g} %")
        ax.set_xscale("log")
        ax.set_xlabel("generated records added to the real pool (+1, log scale)")
        ax.set_ylabel("test macro AUROC")
        budget = sorted({m[3] for m in meta.values() if m[3]})
        ax.set_title(f"{task}: MAE, {' / '.join(f'{b:,}' for b in budget) or '?'} pretraining steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="the study's folder (default runs/pool_size in the project; a relative path is taken from "
                         "the folder the command was started in, as --docs, --cache-root and --data-root)")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmark"))
    ap.add_argument("--cache-root", default=None, help="default: cache in the project")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS),
                    help="the first is the reference of the paired differences")
    ap.add_argument("--tasks", nargs="+", default=["ptbxl_super", "cinc2017"])
    ap.add_argument("--fractions", nargs="+", default=["0.1", "1"])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--stride-seconds", default="10")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-time", default="00:02:00:00", help="trainer.max_time (the budget is the step count)")
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    ap.add_argument("--train-overrides", nargs="*", default=[])
    ap.add_argument("--eval-overrides", nargs="*", default=[])
    args = ap.parse_args(argv)
    # train.py / probe.py run in the project root while this script reads their outputs itself: paths are taken
    # from the caller's folder and the script works from the project root (as scripts/benchmark_real.py does)
    resolve_from_caller(args, Path.cwd(), in_project=("out", "cache_root"), absolute=("docs", "data_root"),
                        defaults={"out": ROOT / "runs" / "pool_size", "cache_root": ROOT / "cache"})
    os.chdir(ROOT)
    run_stages(args, stage_pretrain, stage_probe, report)


def run_stages(args: argparse.Namespace, pretrain: Any, probe: Any, make_report: Any) -> None:
    """Run the study's stages named in ``args.stages`` in order (pretrain, probe, report); the child processes get
    ``args.threads`` BLAS threads, offline wandb and a headless matplotlib (shared with scripts/crop_ablation.py)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               MPLBACKEND="Agg", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    if "pretrain" in args.stages:
        pretrain(args, env)
    if "probe" in args.stages:
        probe(args, env)
    if "report" in args.stages:
        make_report(args)


if __name__ == "__main__":
    main()
