"""``ecgfm-prepare`` (and ``python prepare.py``): convert record sources into a sharded corpus cache (resumable; a
report lists every skipped record with its reason and prints counts per reason).

    ecgfm-prepare sources=[ptbxl,cinc2017] out=cache/pretrain spec.fs=100 workers=2
    ecgfm-prepare sources=[folder] folder.root=/path/to/records out=cache/mine
    ecgfm-prepare sources=[ptbxl]            # no out=: writes cache/ptbxl

Without ``out=``, the cache goes to ``<cache root>/<source names joined by '+'>`` (cache root ``cache``, relative to
the working directory; ``+cache_root=/elsewhere`` changes it) and the folder is printed; never to a folder named
``???``.
"""

from __future__ import annotations

from typing import Any, Sequence

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ecgfm.cli import launcher_checked
from ecgfm.conf import CONFIG_PATH

#: Folder holding the caches written without ``out=`` (relative paths are resolved like the config's others).
DEFAULT_CACHE_ROOT = "cache"


def default_out(sources: str | Sequence[str], cache_root: str = DEFAULT_CACHE_ROOT) -> str:
    """The cache folder used when no ``out`` is given: ``<cache_root>/<source names joined by '+'>``.

    Raises:
        ValueError: no source name.
    """
    names = [sources] if isinstance(sources, str) else [str(s) for s in sources]
    if not names or not all(n.strip() for n in names):
        raise ValueError(f"prepare: cannot name a default output folder for sources={sources!r}; give out=...")
    return f"{str(cache_root).rstrip('/')}/{'+'.join(n.strip() for n in names)}"


def resolve_out(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """A copy of the config with ``out`` filled in when it is missing (``???``), null or empty.

    An optional ``cache_root`` key (``+cache_root=...`` on the command line) is removed and used as the folder
    of the default; an explicit ``out`` is kept as given.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg))
    with open_dict(cfg):
        cache_root = cfg.pop("cache_root", None) or DEFAULT_CACHE_ROOT
        missing = "out" not in cfg or OmegaConf.is_missing(cfg, "out")
        if missing or cfg.out is None or str(cfg.out).strip() in ("", "???"):
            cfg.out = default_out(OmegaConf.to_container(cfg.sources) if isinstance(cfg.sources, ListConfig)
                                  else cfg.sources, str(cache_root))
            print(f"prepare: no out= given: writing the cache to {cfg.out}", flush=True)
    return cfg


@launcher_checked
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Convert the configured sources into a cache; prints the report (counts per skip reason).

    The config is checked first (:func:`ecgfm.config.validate_prepare_config`): a wrong key or value
    (``spec.fs=abc``) ends with one ``error: config key '...': ...`` line and exit status 2. So does a disk that
    fills up while shards are written (``error: <cache>: could not write shard ...: rerun ... to resume``): the
    finished shards are kept and no temporary file is left.
    """
    from ecgfm.config import ConfigError, validate_prepare_config
    from ecgfm.data.cache import PrepareStopped, prepare_from_config
    from ecgfm.data.record import ECGDataError
    from ecgfm.errors import run_command
    from ecgfm.io import LockBusy

    def prepare(cfg: DictConfig) -> Any:
        # a source argument it does not take or of the wrong type (+synthetic.n_recordz=5): a ConfigError naming
        # the preset (ecgfm.data.cache.build_sources); any other TypeError is a bug and keeps its traceback
        return prepare_from_config(validate_prepare_config(resolve_out(cfg)))

    # a wrong key or value, unreadable data, a cache built from other inputs or spec, two sources of one name
    # (ValueError), a concurrent prepare of the same cache (RuntimeError / LockBusy), a shard or index file that
    # could not be written or memory / disk / file handles running out while a record is read (PrepareStopped:
    # names the cache folder and the cause, finished shards kept, a rerun resumes): one line and exit status 2
    run_command(prepare, cfg, (ConfigError, ECGDataError, LockBusy, PrepareStopped, ValueError, RuntimeError))


if __name__ == "__main__":
    main()
