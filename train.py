"""Pretrain an ECG encoder: ``python train.py +experiment=mae`` (see docs/TRAINING.md and conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from ecgfm.pipelines import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
