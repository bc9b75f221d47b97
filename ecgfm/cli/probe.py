"""``ecgfm-probe``: linear / MLP probes on frozen encoder features (cells x fractions x seeds, bootstrap CIs)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecgfm.cli import launcher_checked
from ecgfm.conf import CONFIG_PATH


@launcher_checked
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="probe")
def main(cfg: DictConfig) -> None:
    """Linear / MLP probes on frozen encoder features (cells x fractions x seeds, bootstrap CIs)."""
    from ecgfm.evaluate.sweep import probe_main, run_cli

    run_cli(probe_main, cfg)  # a user error: one "error: ..." line, exit status 2


if __name__ == "__main__":
    main()
