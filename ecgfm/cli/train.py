"""``ecgfm-train``: pretrain an encoder (MAE / SimCLR / CLOCS / CREMA); prints where the encoder artifact and logs are."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecgfm.conf import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    """Pretrain an encoder (MAE / SimCLR / CLOCS / CREMA); prints where the encoder artifact and logs are."""
    from ecgfm.pipelines import train as run

    run(cfg)


if __name__ == "__main__":
    main()
