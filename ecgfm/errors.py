"""How every command ends on a mistake the user can fix: one ``error: ...`` line, exit status 2.

The entry points (``ecgfm-train``, ``-prepare``, ``-probe``, ``-finetune``, ``-explain``) each know which exceptions
are user errors (a config key, bad data, a refused artifact, a diverged run...); :func:`run_command` turns those
into one line on stderr (also logged) and :data:`EXIT_USER_ERROR`, and a full disk into a line saying that what was
written is whole. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import Any, Callable, NoReturn

log = logging.getLogger("ecgfm")

#: Exit status of a command stopped by a user error.
EXIT_USER_ERROR = 2


def bad_arguments(exc: TypeError) -> bool:
    """Whether a ``TypeError`` is a call with arguments the callee does not take (a misspelt or missing config key
    passed on to a constructor), not a bug inside it."""
    text = str(exc)
    return "unexpected keyword argument" in text or "required positional argument" in text or \
        "required keyword-only argument" in text


class ConfigError(ValueError):
    """A configuration mistake. The message starts with the dotted key that is wrong."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"config key '{key}': {problem}" if key else problem)


class JobFailed(Exception):
    """A user error inside one job of a Hydra multirun (see :func:`fail`)."""


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr (and log it), then exit with :data:`EXIT_USER_ERROR`.

    Inside a Hydra multirun the job raises :class:`JobFailed` instead: Hydra's launcher records an exception as that
    job's failure and runs the other jobs (a ``SystemExit`` went past it and ended the whole sweep at the first
    failing point); the sweep then ends with that error and a non-zero status.
    """
    line = " ".join(str(message).split())
    log.error("%s", line)
    print(f"error: {line}", file=sys.stderr, flush=True)
    if in_multirun():
        raise JobFailed(line) from None
    raise SystemExit(EXIT_USER_ERROR)


def run_command(fn: Callable[[Any], Any], cfg: Any, user_errors: tuple[type[BaseException], ...]) -> Any:
    """``fn(cfg)``, with ``user_errors`` and a full disk (``ENOSPC`` / ``EDQUOT``) ending as one line.

    Raises:
        SystemExit: :data:`EXIT_USER_ERROR` after a user error or a full disk.
    """
    try:
        return fn(cfg)
    except user_errors as err:
        fail(str(err))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(f"{err.filename or ''}: disk full ({err.strerror}); files are written atomically, so what is already "
             "there is whole: free space and rerun the same command to resume")
    except Exception as err:
        # a reader refusing its data while Hydra builds it from a config (a labels CSV naming no record): Hydra
        # wraps it as "Error in call to target ..." with a HYDRA_FULL_ERROR hint; the user's error is the cause
        from hydra.errors import InstantiationException

        if isinstance(err, InstantiationException) and isinstance(err.__cause__, user_errors):
            fail(str(err.__cause__))
        raise
