"""What ``ecgfm-train`` / ``python train.py`` prints: one ``error: ...`` line and a non-zero exit for a mistake the
user can fix (config, data, divergence, checkpoint), or a final block saying where everything is and what to run
next."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from ecgfm.config import ConfigError
from ecgfm.data.record import ECGDataError
from ecgfm.errors import EXIT_USER_ERROR, run_command  # noqa: F401  (EXIT_USER_ERROR: re-exported for callers)
from ecgfm.train.checkpoints import NotACheckpointError
from ecgfm.train.safety import NonFiniteLossError, NonFiniteWeightsError

log = logging.getLogger("ecgfm.train")

#: errors reported as one line (their messages name the key / file / step); anything else keeps its traceback
USER_ERRORS = (ConfigError, ECGDataError, NonFiniteLossError, NonFiniteWeightsError, NotACheckpointError)


def next_task(summary: Mapping[str, Any]) -> str:
    """A downstream task for the "next command" line: ``synthetic`` for synthetic pretraining, else
    ``ptbxl_super``."""
    caches = [Path(str(c)).name for c in summary.get("cache_dirs") or []]
    return "synthetic" if caches and all(c.startswith("synthetic") for c in caches) else "ptbxl_super"


def stopped_early(summary: Mapping[str, Any]) -> bool:
    """Whether a run was cut short: a time limit (``max_time``), an interrupt or a callback's early stop, or a
    learning-rate schedule left unfinished (``steps < schedule_steps``). A run that reached ``trainer.max_steps``,
    or ran all its ``trainer.max_epochs`` without a schedule left to run (none, or one it completed), finished."""
    stop, sched, steps = summary.get("stop_reason"), summary.get("schedule_steps"), summary.get("steps")
    if sched and steps is not None and int(steps) < int(sched):
        return True
    return stop not in (None, "max_steps", "max_epochs")


def train_on_advice(limit: str) -> str:
    """What to change to train a finished run on, for the limit that stopped it (``trainer.max_steps``,
    ``trainer.max_time ...``: its first word is the setting): "raise <setting> to train on", except for
    ``trainer.fast_dev_run``, which a ``trainer=debug`` run always stops at whatever it is raised to."""
    name = limit.split(" ")[0]
    return "leave out trainer=debug to train on" if name == "trainer.fast_dev_run" else f"raise {name} to train on"


def final_block(summary: Mapping[str, Any]) -> str:
    """The lines printed at the end of a training run (encoder, run folder, logs, summary, next commands)."""
    enc = summary.get("encoder_dir")
    crop = summary.get("crop_seconds")
    rows = [("encoder", f"{enc}   (fs {summary.get('fs'):g} Hz, crop {crop:g} s = {summary.get('crop_samples')} "
                        "samples)" if enc and crop is not None and summary.get("fs") else
             (enc or "not exported (export=false)")),
            ("run folder", summary.get("out_dir")),
            ("logs", summary.get("log_dir") or "no logger"),
            *([("log file", str(Path(str(summary.get("out_dir"))) / "train.log"))]
              if (Path(str(summary.get("out_dir"))) / "train.log").is_file() else []),
            ("summary", str(Path(str(summary.get("out_dir"))) / "summary.json")),
            ("checkpoint", summary.get("last_checkpoint") or "none")]
    counts = summary.get("records") or {}
    if counts.get("train") is not None:
        left = counts.get("skipped_while_preparing")
        rows.append(("records", f"{counts['train']} training, {counts.get('val')} validation"
                                + (f"; {left} left out while preparing the caches (their skipped.csv)" if left else "")))
    if summary.get("nonfinite_records_skipped"):
        rows.append(("skipped", f"{summary['nonfinite_records_skipped']} record(s) with non-finite values "
                                "(nonfinite=skip; keys in summary.json)"))
    width = max(len(k) for k, _ in rows)
    stop, sched = summary.get("stop_reason"), summary.get("schedule_steps")
    early = stopped_early(summary)
    # the registry name with its size: a config (vit1d_cpu) builds a registry backbone (vit1d_tiny) with other
    # arguments, so the name alone read as the registry default's 2.7 M parameters
    size = summary.get("n_parameters")
    name = f"{summary.get('method')} / {summary.get('backbone')}" + (f" ({size / 1e6:.2g} M parameters)" if size else "")
    what = (f"stopped early ({stop}): {name}, step {summary.get('steps')}" + (f" of {sched}" if sched else "")
            if early else f"training finished: {name}, {summary.get('steps')} steps"
                          + (" (max_epochs)" if stop == "max_epochs" else ""))
    advice = train_on_advice(str(summary.get("nothing_trained_limit") or "trainer.max_steps"))
    lines = [f"== {what} ==" if not summary.get("nothing_trained")
             else f"== already complete: {summary.get('method')} / {summary.get('backbone')}, {summary.get('steps')} "
                  f"steps; nothing trained ({advice}) =="]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if enc:
        task = next_task(summary)
        lines += ["  next (installed: ecgfm-probe / ecgfm-finetune, same arguments):",
                  f"    python probe.py checkpoint={enc} task={task}",
                  f"    python finetune.py checkpoint={enc} task={task}"]
    return "\n".join(lines)


def run_cli(train: Callable[[Any], dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """Run ``train(cfg)`` for a command line: user errors become one ``error: ...`` line on stderr (also logged)
    and exit status :data:`EXIT_USER_ERROR`; success prints :func:`final_block` on rank 0.

    Args:
        train: the training function (:func:`ecgfm.train.run.train`).
        cfg: the composed config.

    Returns:
        The run summary.

    Raises:
        SystemExit: status :data:`EXIT_USER_ERROR` after a user error or a full disk (``ENOSPC`` / ``EDQUOT``).
    """
    summary = run_command(train, cfg, USER_ERRORS)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(final_block(summary), flush=True)
    return summary
