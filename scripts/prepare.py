"""Convert ECG record sources into a corpus cache (see conf/prepare.yaml and ecgfm.data.cache).

    python scripts/prepare.py sources=[ptbxl,cinc2017] out=cache/pretrain spec.fs=100 workers=2
    python scripts/prepare.py sources=[folder] folder.root=/path/to/records out=cache/mine
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from ecgfm.data.cache import prepare_from_config  # noqa: E402


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    prepare_from_config(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
