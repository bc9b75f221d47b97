"""``ecgfm-prepare``: convert record sources into a sharded corpus cache (resumable; a report lists every skipped record)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ecgfm.conf import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Convert record sources into a sharded corpus cache (resumable; a report lists every skipped record)."""
    from ecgfm.data.cache import prepare_from_config

    prepare_from_config(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
