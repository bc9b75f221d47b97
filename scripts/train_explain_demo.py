"""Train the small classifier that the explain demo (explain.py, notebooks/explain.ipynb) uses.

PTB-XL superdiagnostic statements (NORM, MI, STTC, CD, HYP; multi-label), the labelled records of the shared copy
(ecg_id 1-500) at 100 Hz, whole 10 s records, strat_fold 1-8 train / 9 validation (fold 10 is not used), a small
xresnet1d (``ecgfm.explain.classifier.DEMO_BACKBONE``), ~1-2 min on 2 CPU cores. Saved as a classifier
folder (classifier.json + classifier.safetensors)::

    python scripts/train_explain_demo.py [--root ../shared/data/ptbxl] [--out outputs/explain_demo/ptbxl_super]
    python explain.py checkpoint=outputs/explain_demo/ptbxl_super data=ptbxl record=8

It is a demonstration model (a few hundred training records): its validation AUROC is printed with a bootstrap
confidence interval, and it is the model-selection value (the epoch kept is the one best on fold 9, so it is
optimistic); do not read clinical performance into it. The folder records the leads of its training records
(``extra.trained_leads``), so ``ecgfm.Classifier`` names the leads a partial-lead record lacks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="../shared/data/ptbxl", help="PTB-XL folder (records100/, ptbxl_database.csv)")
    p.add_argument("--out", default="outputs/explain_demo/ptbxl_super", help="classifier folder to write")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    # One thread: for this ~60 k-parameter CNN, two threads were 5-40x slower per batch on the shared 2-core
    # development machine (intra-op parallelism does not pay off at this size).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    import torch

    from ecgfm.explain.classifier import train_ptbxl_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    _, info = train_ptbxl_demo(args.root, args.out, epochs=args.epochs, seed=args.seed, lr=args.lr)
    auc = info["val_macro_auroc"]
    print(f"data: {info['data']}")
    print(f"classes: {', '.join(info['classes'])}")
    # as finetune.py says of its validation line: the epoch kept is the one best on this fold, so the value is the
    # model-selection value, not a held-out estimate
    print(f"validation (strat_fold 9, {auc['n']} records) macro AUROC {auc['value']:.3f} "
          f"(95% bootstrap CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f}; the model-selection value: the epoch was "
          f"chosen on this fold, so optimistic); best epoch "
          f"{'?' if info['best_epoch'] is None else int(info['best_epoch']) + 1} of {info['epochs_run']} (1-based)")
    print(f"trained leads (extra.trained_leads): {', '.join(info.get('trained_leads') or []) or 'not recorded'}")
    print(f"saved {Path(args.out).resolve()} in {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"val_macro_auroc": auc}))


if __name__ == "__main__":
    main()
