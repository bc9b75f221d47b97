"""Pretrain an ECG encoder: ``python train.py +experiment=mae`` (same as ``ecgfm-train``; see docs/TRAINING.md)."""

from ecgfm.cli.train import main

if __name__ == "__main__":
    main()
