"""``ecgfm-explain``: explain a classifier artifact's predictions: attribution figures, faithfulness, report.json."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecgfm.cli import launcher_checked
from ecgfm.conf import CONFIG_PATH


@launcher_checked
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="explain")
def main(cfg: DictConfig) -> None:
    """Explain a classifier artifact's predictions: attribution figures, faithfulness, report.json."""
    from ecgfm.evaluate.sweep import run_cli
    from ecgfm.explain.report import explain_main

    run_cli(explain_main, cfg)  # a user error (e.g. an encoder folder): one "error: ..." line, exit status 2


if __name__ == "__main__":
    main()
