"""The acceptance benchmark on the shared real data, in one command (driven by scripts/benchmark_real.sh).

Stages (each one skips what is already done, so an interrupted run resumes):

1. **pool**: the shared unlabelled pretraining pool = PTB-XL at 100 Hz (all 1,999 records) + CinC 2017, *minus the
   downstream validation and test records* (PTB-XL ``strat_fold`` 9 and 10; the CinC 2017 validation / test sides
   of the ``cinc2017`` task's stratified split). Without that exclusion the leakage guard rejects every encoder
   (``conf/data/pretrain_pool.yaml`` holds every record). Written as two caches with
   :class:`ecgfm.evaluate.tasks.ExcludingSource`.
2. **pretrain**: ``train.py +experiment=<method> data=cached data.cache_dirs=[pool caches]`` for MAE, SimCLR,
   CLOCS and the hybrid (CREMA), same small ViT-1D, same steps.
3. **probe**: ``probe.py -m checkpoint=<4 encoders>,random:<encoder> task=ptbxl_super,cinc2017
   fraction=0.1,1 seed=0,1,2`` (linear probe, one frozen pass per checkpoint and corpus).
4. **finetune**: ``finetune.py -m checkpoint=<4 encoders>,random:<encoder>,supervised:<encoder>
   task=ptbxl_super,cinc2017 'fraction=[0.1,1]' 'seed=[0,1,2]'`` and the xresnet1d-family supervised baseline on
   PTB-XL (``supervised:resnet1d_tiny`` by default; ``--xresnet xresnet1d50`` for the full-size one).
5. **report**: results.csv / results.md / results.png in ``<out>/results`` and a copy in ``docs/benchmark/``,
   plus the headline comparison (SSL vs the random-init twin under linear probe on CinC 2017).

Knobs (command-line flags; defaults sized for ~30-40 min on 2 CPU cores): ``--steps`` pretraining steps per
method, ``--ft-epochs``, ``--seeds``, ``--fractions``, ``--methods``, ``--threads``, ``--embed-dim`` / ``--depth``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
EXPERIMENTS = {"mae": "mae", "simclr": "simclr", "clocs": "clocs", "hybrid": "crema"}


def log(msg: str) -> None:
    print(f"[benchmark_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> None:
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    log(f"  done in {time.perf_counter() - t0:.0f} s")


def stage_pool(args: argparse.Namespace) -> list[str]:
    """Pool caches without the downstream validation / test records.

    The same pool as ``train.py data=pretrain_pool_heldout_free`` (both go through
    :func:`ecgfm.evaluate.tasks.heldout_free_source`); the cache folders are keyed by the excluded set, so an
    unchanged split reuses them.
    """
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.readers import CinC2017Source, PTBXLSource
    from ecgfm.evaluate.tasks import heldout_free_source
    from ecgfm.data.prepare import prepare_cache

    spec = PreprocessSpec()  # conf/train.yaml's preprocessing (the encoders export it; tasks reuse it)
    data_root = Path(args.data_root)
    pools = []
    for name, source in (("pool_ptbxl", PTBXLSource(data_root / "ptbxl", fs=100, include_unlabelled=True)),
                         ("pool_cinc2017", CinC2017Source(data_root / "cinc2017"))):
        # the validation / test records of both tasks, and every PTB-XL record of strat_fold 9 / 10
        src = heldout_free_source(source, ["ptbxl_super", "cinc2017"], parts=("val", "test"),
                                  data_root=str(data_root), cache_root=args.cache_root, preprocess=spec,
                                  exclude_ptbxl_folds=(9, 10), workers=args.workers, progress=True)
        pools.append(prepare_cache([src], args.cache_root, spec, name=name, workers=args.workers, progress=True))
        log(f"{name}: {len(src.record_ids())} records ({len(src.exclude)} held-out val/test records excluded) -> "
            f"{pools[-1]}")
    return pools


def stage_pretrain(args: argparse.Namespace, pools: list[str], env: dict[str, str]) -> dict[str, str]:
    encoders = {}
    for method in args.methods:
        out = Path(args.out) / "pretrain" / method
        enc = out / "encoder"
        if not (enc / "encoder.json").is_file():
            run([PY, "train.py", f"+experiment={EXPERIMENTS[method]}", "data=cached",
                 f"data.cache_dirs=[{','.join(pools)}]", f"hydra.run.dir={out}", f"trainer.max_steps={args.steps}",
                 f"torch_threads={args.threads}", f"backbone.embed_dim={args.embed_dim}",
                 f"backbone.depth={args.depth}", f"backbone.num_heads={args.heads}",
                 f"data.batch_size={args.batch_size}", "data.num_workers=0", f"paths.cache_root={args.cache_root}",
                 "trainer.enable_progress_bar=false", f"checkpoint.every_n_train_steps={max(args.steps // 2, 1)}",
                 *args.train_overrides], env)
        encoders[method] = str(enc)
    return encoders


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [f"results_dir={Path(args.out) / 'results'}", f"paths.cache_root={args.cache_root}",
            f"paths.data_root={args.data_root}", f"bootstrap.n={args.bootstrap}", f"prepare_workers={args.workers}",
            f"torch_threads={args.threads}"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/benchmark_real")
    ap.add_argument("--cache-root", default="cache")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--methods", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per method")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tasks", nargs="+", default=["ptbxl_super", "cinc2017"])
    ap.add_argument("--fractions", nargs="+", default=["0.1", "1"])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="cache preparation processes")
    ap.add_argument("--xresnet", default="resnet1d_tiny",
                    help="xresnet1d-family supervised baseline on PTB-XL ('' to skip; xresnet1d50 = full size)")
    ap.add_argument("--stages", nargs="+", default=["pool", "pretrain", "probe", "finetune", "report"])
    ap.add_argument("--train-overrides", nargs="*", default=[])
    args = ap.parse_args(argv)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               MPLBACKEND="Agg", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    t0 = time.perf_counter()
    pools = stage_pool(args) if "pool" in args.stages or "pretrain" in args.stages else []
    encoders = stage_pretrain(args, pools, env) if "pretrain" in args.stages else {
        m: str(Path(args.out) / "pretrain" / m / "encoder") for m in args.methods}
    first = encoders[args.methods[0]]
    ckpts = list(encoders.values())
    tasks = ",".join(args.tasks)
    if "probe" in args.stages:
        run([PY, "probe.py", "-m", f"checkpoint={','.join(ckpts + ['random:' + first])}", f"task={tasks}",
             f"fraction={','.join(args.fractions)}", f"seed={','.join(args.seeds)}", *common_overrides(args)], env)
    if "finetune" in args.stages:
        ft = [f"finetune.epochs={args.ft_epochs}", f"finetune.patience={max(2, args.ft_epochs // 2)}",
              f"finetune.warmup_epochs={1 if args.ft_epochs < 10 else 2}",
              f"fraction=[{','.join(args.fractions)}]", f"seed=[{','.join(args.seeds)}]", *common_overrides(args)]
        run([PY, "finetune.py", "-m", f"checkpoint={','.join(ckpts + ['random:' + first, 'supervised:' + first])}",
             f"task={tasks}", *ft], env)
        if args.xresnet and "ptbxl_super" in args.tasks:
            run([PY, "finetune.py", f"checkpoint=supervised:{args.xresnet}", "task=ptbxl_super", *ft], env)
    if "report" in args.stages:
        report(args)
    log(f"total {time.perf_counter() - t0:.0f} s")


def report(args: argparse.Namespace) -> None:
    import pandas as pd

    from ecgfm.evaluate.report import build_report, summarize

    res_dir = Path(args.out) / "results"
    out = build_report(res_dir)
    docs = ROOT / "docs" / "benchmark"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("results.csv", "results.md", "results.png"):
        if (res_dir / name).exists():
            shutil.copy(res_dir / name, docs / f"real_{name}")
    df = pd.read_csv(out["csv"])
    s = summarize(df, "macro_auroc")
    lines = []
    for task in sorted(s["task"].unique()):
        lp = s[(s["task"] == task) & (s["mode"] == "linear") & (s["split"] == "test")]
        for frac in sorted(lp["fraction"].unique()):
            at = lp[lp["fraction"] == frac]
            rnd = at[at["method"] == "random-init"]
            if rnd.empty:
                continue
            base = float(rnd["mean"].iloc[0])
            for _, r in at[at["method"] != "random-init"].iterrows():
                lines.append(f"{task} | linear probe | fraction {frac:g} | test | {r['method']}: "
                             f"{r['mean']:.3f} vs random-init {base:.3f}: difference {r['mean'] - base:+.3f} "
                             f"(mean over {int(r['n_seeds'])} seeds)")
    text = "\n".join(lines)
    (docs / "real_headline.txt").write_text(text + "\n")
    log("SSL vs random-init twin (linear probe, macro AUROC, test split):\n" + text)
    log(json.dumps(out))


if __name__ == "__main__":
    main()
