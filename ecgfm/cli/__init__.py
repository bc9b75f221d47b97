"""Console scripts: one command per job, found after ``pip install`` from any directory.

========================  ==========================  =====================================
command                   root-script equivalent      config (inside the package)
========================  ==========================  =====================================
``ecgfm-train``           ``python train.py``         ``ecgfm/conf/train.yaml``
``ecgfm-prepare``         ``python prepare.py``       ``ecgfm/conf/prepare.yaml``
``ecgfm-probe``           ``python probe.py``         ``ecgfm/conf/probe.yaml``
``ecgfm-finetune``        ``python finetune.py``      ``ecgfm/conf/finetune.yaml``
``ecgfm-explain``         ``python explain.py``       ``ecgfm/conf/explain.yaml``
========================  ==========================  =====================================

Each takes Hydra overrides (``ecgfm-train +experiment=mae trainer.max_steps=5``). The configs are found through
Hydra's package search path (``pkg://ecgfm.conf``), so a wheel install needs no checkout. Relative paths in the
configs are relative to the directory the command runs from.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from typing import Any, Callable


def launcher_checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``@hydra.main`` entry point: a multirun (``-m``) with a ``hydra/launcher=<name>`` override whose plugin
    is not installed (the SLURM launcher is the ``ecgfm[slurm]`` extra) ends with one ``error: ...`` line and exit
    status 2, before Hydra fails on it with a traceback ("Unknown plugin class"). A single run (which ignores the
    launcher) and a call with a config (tests) are passed through."""
    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        # a launcher acts in a multirun only (a single run ignores hydra/launcher and runs here)
        if not args and not kwargs and {"-m", "--multirun"} & set(sys.argv[1:]):
            problem = missing_launcher(sys.argv[1:])
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                raise SystemExit(2)
        return fn(*args, **kwargs)
    return entry


def missing_launcher(argv: list[str]) -> str | None:
    """What is wrong with a ``hydra/launcher=<name>`` override of ``argv`` whose config ships with ecgfm
    (``ecgfm/conf/hydra/launcher/<name>.yaml``) but whose plugin module cannot be imported, or None."""
    from ecgfm.conf import config_dir

    for arg in argv:
        m = re.fullmatch(r"\+*hydra/launcher=([\w-]+)", arg.strip())
        if not m:
            continue
        node = config_dir() / "hydra" / "launcher" / f"{m.group(1)}.yaml"
        target = re.search(r"(?m)^_target_:\s*([\w.]+)", node.read_text()) if node.is_file() else None
        if target is None:
            continue
        module = target.group(1).rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:   # a parent package is missing (or fails to import)
            found = False
        if not found:
            return (f"{arg}: its Hydra plugin ({module}) is not installed: pip install 'ecgfm[slurm]' (in a "
                    f"checkout: pip install -e '.[slurm]'), or drop the launcher override to run here")
    return None
