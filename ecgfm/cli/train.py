"""``ecgfm-train``: pretrain an encoder (MAE / SimCLR / CLOCS / CREMA); prints where the encoder artifact and logs are."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecgfm.conf import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    """Pretrain an encoder (MAE / SimCLR / CLOCS / CREMA); prints where the encoder artifact and logs are.

    A mistake the user can fix (config, data, divergence, checkpoint) ends with one ``error: ...`` line and exit
    status 2 (:func:`ecgfm.train.report.run_cli`).
    """
    from ecgfm.train import train
    from ecgfm.train.report import run_cli

    run_cli(train, cfg)


if __name__ == "__main__":
    main()
