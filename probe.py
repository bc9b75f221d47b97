"""Linear / MLP probes on frozen encoder features (see conf/probe.yaml and docs/BENCHMARK.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="probe")
def main(cfg: DictConfig) -> None:
    from ecgfm.evaluate.sweep import probe_main

    probe_main(cfg)


if __name__ == "__main__":
    main()
