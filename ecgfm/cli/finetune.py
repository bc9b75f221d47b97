"""``ecgfm-finetune``: fine-tune an encoder (or a supervised baseline); every cell saves a classifier artifact."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecgfm.cli import launcher_checked
from ecgfm.conf import CONFIG_PATH


@launcher_checked
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def main(cfg: DictConfig) -> None:
    """Fine-tune an encoder (or a supervised baseline); every cell saves a classifier artifact."""
    from ecgfm.evaluate.sweep import finetune_main, run_cli

    run_cli(finetune_main, cfg)  # a user error: one "error: ..." line, exit status 2


if __name__ == "__main__":
    main()
