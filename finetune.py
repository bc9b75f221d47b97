"""Full fine-tuning and supervised baselines (see conf/finetune.yaml and docs/BENCHMARK.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    from ecgfm.evaluate.sweep import finetune_main

    finetune_main(cfg)


if __name__ == "__main__":
    main()
