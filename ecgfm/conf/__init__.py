"""The Hydra configuration tree shipped inside the package (``pkg://ecgfm.conf``).

Entry points find it through Hydra's package search path, never by walking up from a source file, so a wheel
install finds the same configs as a checkout. :func:`config_dir` gives its folder for code that reads one YAML file
directly (task and backbone presets) or composes with ``initialize_config_dir``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: Hydra ``config_path`` of every entry point.
CONFIG_PATH = "pkg://ecgfm.conf"


def config_dir() -> Path:
    """The folder holding ``train.yaml``, ``probe.yaml``, ... and the config groups (``task/``, ``backbone/``)."""
    return Path(str(files(__name__)))


__all__ = ["CONFIG_PATH", "config_dir"]
