"""The pretraining-crop ablation behind the CPU recipe's 10 s crops (issue 12 item 2): MAE ``+experiment=mae_cpu30``
pretrained on 2.5 s and on 10 s crops (same pool, steps, batch and model), each linear-probed with 2.5 s and with
10 s windows (a ViT-1D is rebuilt for windows longer than its crop, same weights), on the benchmark's tasks,
fractions and seeds. The report gives validation macro AUROC (mean of seeds with their min-max: a spread over seeds,
not a CI, as the cells keep no per-record validation predictions), test macro AUROC (mean of seeds with the mean of
the per-seed 95 % bootstrap CIs) and every cell's paired difference (95 % CI, records resampled jointly over the
seeds) against the recipe (10 s crops, 10 s windows)::

    python scripts/crop_ablation.py                      # pretrain (finished runs skipped), probe, report
    python scripts/crop_ablation.py --stages report
    python scripts/crop_ablation.py --encoder-10s runs/pool_size/real/encoder   # reuse the pool-size study's run

The 2.5 s run costs about a quarter of the 10 s run's compute (a quarter of the tokens per crop): the ablation
holds the step budget fixed, not the compute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_real import resolve_from_caller  # noqa: E402  (scripts/, beside this file)
from pool_size_study import run_stages, seed_spread  # noqa: E402

PY = sys.executable
STAGES = ["pretrain", "probe", "report"]
CROPS = ("2.5", "10")
RECIPE = "crop 10 s / window 10 s"


def encoders(args: argparse.Namespace) -> dict[str, str]:
    """Pretraining crop (s) -> exported encoder folder."""
    out = Path(args.out)
    return {"2.5": args.encoder_2p5s or str(out / "mae_2p5s" / "encoder"),
            "10": args.encoder_10s or str(out / "mae_10s" / "encoder")}


def stage_pretrain(args: argparse.Namespace, env: dict[str, str]) -> None:
    for crop, enc in encoders(args).items():
        if (Path(enc) / "encoder.json").is_file():
            print(f"[crop-ablation] {crop} s crops: pretrained already ({enc})", flush=True)
            continue
        cmd = [PY, "train.py", "+experiment=mae_cpu30", f"crop_seconds={crop}", f"paths.data_root={args.data_root}",
               f"paths.cache_root={args.cache_root}", f"hydra.run.dir={Path(enc).parent}",
               f"torch_threads={args.threads}", f"trainer.max_time={args.max_time}"]
        print("[crop-ablation] $ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def stage_probe(args: argparse.Namespace, env: dict[str, str]) -> None:
    """One results folder per probe window (the window is not part of a cell's path)."""
    for window in CROPS:
        cmd = [PY, "probe.py", "-m", f"checkpoint={','.join(encoders(args).values())}",
               f"window_seconds={window}", f"stride_seconds={window}", f"results_dir={Path(args.out) / f'results_w{window}'}",
               f"task={','.join(args.tasks)}", f"fraction={','.join(args.fractions)}", f"seed={','.join(args.seeds)}",
               f"paths.cache_root={args.cache_root}", f"paths.data_root={args.data_root}",
               f"bootstrap.n={args.bootstrap}", "prepare_workers=2", f"torch_threads={args.threads}", "report=never"]
        print("[crop-ablation] $ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def report(args: argparse.Namespace) -> str:
    import pandas as pd

    from ecgfm.evaluate import report as R

    crop_of = {str(Path(e)): c for c, e in encoders(args).items()}
    cells = []
    for window in CROPS:
        for c in R.load_cells(Path(args.out) / f"results_w{window}"):
            crop = crop_of.get(str(Path(c["checkpoint"])))
            if crop is None or c.get("mode") != "linear":
                continue
            c["label"] = f"crop {crop} s / window {window} s"
            c["method"] = "recipe" if c["label"] == RECIPE else "variant"
            # the probe recipe and the ViT are the same but for the crop / window, which the row names: pair them
            c["recipe_id"], c["architecture"] = "linear", "vit1d"
            cells.append(c)
    if not cells:
        raise SystemExit(f"[crop-ablation] no probe cells under {args.out}/results_w*: run the probe stage")
    spec = R.BaselineSpec("recipe", "Paired comparison with 10 s crops / 10 s windows", ("recipe",),
                          same_architecture=True)
    _, deltas = R.compare_with_baseline(cells, spec, n_boot=args.bootstrap)
    rows = pd.DataFrame([{"task": c["task"], "fraction": float(c["fraction"]), "label": c["label"],
                          "val": c["val_macro_auroc"], "test": c["results"]["test"]["macro_auroc"]["value"],
                          "ci_low": _num(c["results"]["test"]["macro_auroc"].get("ci_low")),
                          "ci_high": _num(c["results"]["test"]["macro_auroc"].get("ci_high")),
                          "seed": c["seed"]} for c in cells])
    lines = ["| task | labels | pretraining crop / probe window | validation, mean (min-max over seeds, not a CI) | "
             "test, mean [mean per-seed 95 % CI] | Δ test vs 10 s / 10 s [paired 95 % CI] |",
             "|---|---|---|---|---|---|"]
    for (task, frac, label), g in rows.groupby(["task", "fraction", "label"]):
        d = deltas[(deltas["task"] == task) & (deltas["fraction"] == frac) & (deltas["label"] == label)
                   & (deltas["split"] == "test")]
        ds = "reference" if label == RECIPE else "–" if d.empty else \
            f"{d.iloc[0]['delta']:+.3f} [{d.iloc[0]['ci_low']:+.3f}, {d.iloc[0]['ci_high']:+.3f}]"
        if not d.empty and label != RECIPE:   # the delta averages the seeds both rows have: say so if not all
            ref = rows[(rows["task"] == task) & (rows["fraction"] == frac) & (rows["label"] == RECIPE)]
            both = set(str(d.iloc[0]["seeds"]).split())
            if any(both != {str(x) for x in r["seed"]} for r in (g, ref)):
                ds += f" (seeds {d.iloc[0]['seeds']})"
        ci = (f" [{g['ci_low'].mean():.3f}, {g['ci_high'].mean():.3f}]"
              if g["ci_low"].notna().all() and g["ci_high"].notna().all() else " (no CI)")
        lines.append(f"| {task} | {100 * frac:g} % | {label} | {seed_spread(g['val'])} | {g['test'].mean():.3f}{ci} "
                     f"(seeds {' '.join(str(s) for s in sorted(g['seed']))}) | {ds} |")
    md = "\n".join(lines) + "\n"
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "crop_ablation.md").write_text(md)
    print(md, flush=True)
    return md


def _num(x) -> float:
    """A stored CI bound as a float: NaN for a missing one (JSON null: no bootstrap)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="the ablation's folder (default runs/ablation_crop in the project; a relative path is taken "
                         "from the folder the command was started in, as --docs, --encoder-*, --cache-root and "
                         "--data-root)")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmark"))
    ap.add_argument("--encoder-2p5s", default=None, help="default: <out>/mae_2p5s/encoder")
    ap.add_argument("--encoder-10s", default=None, help="default: <out>/mae_10s/encoder")
    ap.add_argument("--cache-root", default=None, help="default: cache in the project")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--tasks", nargs="+", default=["ptbxl_super", "cinc2017"])
    ap.add_argument("--fractions", nargs="+", default=["0.1", "1"])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-time", default="00:02:00:00")
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    args = ap.parse_args(argv)
    # train.py / probe.py run in the project root while this script checks and reads their outputs itself: paths
    # are taken from the caller's folder and the script works from the project root (as benchmark_real.py does)
    args.encoder_2p5s, args.encoder_10s = args.encoder_2p5s or None, args.encoder_10s or None   # '': the default
    resolve_from_caller(args, Path.cwd(), in_project=("out", "cache_root", "encoder_2p5s", "encoder_10s"),
                        absolute=("docs", "data_root"),
                        defaults={"out": ROOT / "runs" / "ablation_crop", "cache_root": ROOT / "cache"})
    os.chdir(ROOT)
    run_stages(args, stage_pretrain, stage_probe, report)


if __name__ == "__main__":
    main()
