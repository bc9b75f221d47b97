"""Explain a classifier's predictions: figures + report.json (see conf/explain.yaml and docs/EXPLAIN.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from ecgfm.explain.report import explain_main

    explain_main(cfg)


if __name__ == "__main__":
    main()
