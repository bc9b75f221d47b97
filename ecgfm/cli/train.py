"""``ecgfm-train``: pretrain an encoder (MAE / SimCLR / CLOCS / CREMA); prints where the encoder artifact and logs are."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecgfm.cli import launcher_checked
from ecgfm.conf import CONFIG_PATH


@launcher_checked
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    """Pretrain an encoder (MAE / SimCLR / CLOCS / CREMA); prints where the encoder artifact and logs are.

    A mistake the user can fix (config, data, divergence, checkpoint) ends with one ``error: ...`` line and exit
    status 2 (:func:`ecgfm.train.report.run_cli`).
    """
    from ecgfm.train import train
    from ecgfm.train.report import run_cli

    def checked(cfg: DictConfig) -> dict:
        _check_out_dir(cfg)
        return train(cfg)

    run_cli(checked, cfg)


def _check_out_dir(cfg: DictConfig) -> None:
    """``out_dir`` on the command line must be the Hydra run folder: train.log and .hydra/ (the composed config)
    go to ``hydra.run.dir``, so another out_dir would split the run over two folders.

    Raises:
        ecgfm.config.ConfigError: ``out_dir`` differs from Hydra's output folder.
    """
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from ecgfm.config import ConfigError

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    if Path(str(cfg.out_dir)).resolve() != run_dir:
        raise ConfigError("out_dir", f"{cfg.out_dir} is not the run folder Hydra writes train.log and .hydra/ to "
                                     f"({run_dir}): give hydra.run.dir={cfg.out_dir} instead (out_dir follows it)")


if __name__ == "__main__":
    main()
