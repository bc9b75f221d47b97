"""Checkpoints a crash, a full disk or a truncated copy cannot turn into a lost run.

* :class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` of every training run: each checkpoint (periodic,
  ``last.ckpt``, the final save) is written to a temporary file beside its final name, fsync'ed and renamed
  (:func:`ecgfm.io.atomic_write`), so the final name always holds a whole checkpoint; a file that does not load
  is reported as "not a checkpoint" rather than with torch's unpickling advice.
* :func:`find_resume_checkpoint` picks the checkpoint of a run folder to resume from: ``last.ckpt`` or Lightning's
  SLURM ``hpc_ckpt_*.ckpt`` (newest), else the periodic ``checkpoints/step*.ckpt`` of the furthest step, the first
  that loads, logging each one it skips and why.
* :class:`DataFacts` keeps the data's sampling rate and crop in every checkpoint and refuses a resume on data of
  another rate or crop.
* :func:`guard_fresh_start` refuses to start from step 0 in a folder that already holds a trained run (exported
  encoder or ``summary.json``) unless ``overwrite=true``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ecgfm.config import ConfigError
from ecgfm.data.cache import cache_digest, digest_matches
from ecgfm.io import atomic_write

log = logging.getLogger(__name__)

#: keys every Lightning training checkpoint has (an exported encoder or a bare state_dict lacks them)
_REQUIRED_KEYS = ("state_dict", "global_step")


class NotACheckpointError(ValueError):
    """A file that does not load as a Lightning training checkpoint (truncated, damaged, or something else)."""

    def __init__(self, path: Any, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: not a checkpoint ({reason})")


def _load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` that raises :class:`NotACheckpointError` with a short reason."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except IsADirectoryError:
        raise NotACheckpointError(p, "a folder; an exported encoder folder cannot be resumed") from None
    try:
        state = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip reader), EOFError, KeyError...: all "unreadable"
        if magic == b"PK\x03\x04":  # a zip archive, like every torch.save since 1.6: cut short or damaged
            detail = str(exc).splitlines()[0].split(". ")[0][:160] if str(exc) else type(exc).__name__
            raise NotACheckpointError(p, f"truncated or damaged: {detail}") from None
        raise NotACheckpointError(p, f"{p.stat().st_size} bytes that are not a PyTorch checkpoint file") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_KEYS):
        raise NotACheckpointError(p, "loads, but is not a Lightning training checkpoint (no state_dict / "
                                     "global_step)")
    return state


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be resumed from (``None`` when it loads). Cheap: tensors are memory-mapped, not read."""
    try:
        _load(path, mmap=True)
    except NotACheckpointError as err:
        return err.reason
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic saves (temp + fsync + rename), loads that name a non-checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically: on any error (full disk...) ``path`` keeps its old content.

        Args:
            checkpoint: the state Lightning dumps.
            path: final file name (a local path).
            storage_options: not supported (``TypeError`` when given, like ``TorchCheckpointIO``).
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` (plain data only); :class:`NotACheckpointError` when it does not load."""
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return _load(path, map_location=map_location)


def _candidates(out_dir: Path) -> list[Path]:
    found = [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt"),
             *(out_dir / "checkpoints").glob("*.ckpt")]
    unique = list(dict.fromkeys(p for p in found if p.is_file()))
    return sorted(unique, key=lambda p: p.stat().st_mtime_ns, reverse=True)


_STEP_IN_NAME = re.compile(r"step=?(\d+)")


def _resume_order(out_dir: Path) -> list[Path]:
    """The order in which a resume tries a run folder's checkpoints: ``last.ckpt`` and Lightning's SLURM saves
    first (the state of the run when it stopped; newest file first), then the periodic checkpoints by the step in
    their name (furthest first; modification time breaks ties). A run folder copied without its times (cp -r,
    scp -r) gets mtimes in the copy's listing order, so "the newest file" could be a periodic checkpoint older
    than last.ckpt; and a periodic checkpoint of a branch abandoned by ``resume=<earlier step>`` is never preferred
    to the last.ckpt of the branch that followed."""
    primary = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    primary.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def step_of(p: Path) -> int:
        m = _STEP_IN_NAME.search(p.stem)
        return int(m.group(1)) if m else -1

    periodic = [p for p in (out_dir / "checkpoints").glob("*.ckpt") if p.is_file() and p not in primary]
    periodic.sort(key=lambda p: (step_of(p), p.stat().st_mtime_ns), reverse=True)
    return primary + periodic


def find_resume_checkpoint(out_dir: str | os.PathLike, resume: Optional[str]) -> Optional[str]:
    """The checkpoint a run resumes from.

    Args:
        out_dir: the run folder.
        resume: an explicit checkpoint (``resume=``): it must exist and load.

    Returns:
        ``resume`` if given; else the first that loads of ``checkpoints/last.ckpt`` and ``hpc_ckpt_*.ckpt``
        (Lightning's SLURM pre-emption saves; newest file first), then the periodic ``checkpoints/*.ckpt`` by
        the step in their name (furthest first), each skipped one logged with its reason (:func:`_resume_order`);
        ``None`` when there is none.

    Raises:
        ConfigError: ``resume`` does not exist or is not a checkpoint.
    """
    if resume:
        path = Path(resume)
        if not path.exists():
            raise ConfigError("resume", f"checkpoint not found: {path.resolve()}")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError("resume", f"{path.resolve()} is not a checkpoint ({problem}); point resume= at a .ckpt "
                                        "file of a training run (its checkpoints/ folder)")
        return str(path)
    for path in _resume_order(Path(out_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log.warning("resume: skipping checkpoint %s: %s", path, problem)
    return None


def finished_run_files(out_dir: str | os.PathLike) -> list[Path]:
    """What a finished run leaves in its folder: the exported encoder and ``summary.json`` (those present)."""
    out = Path(out_dir)
    return [p for p in (out / "encoder", out / "summary.json") if p.exists()]


def guard_fresh_start(out_dir: str | os.PathLike, overwrite: bool, is_global_zero: bool = True) -> None:
    """Refuse a fresh start (no checkpoint to resume from) in a folder holding a trained run, unless ``overwrite``.

    With ``overwrite`` the run starts afresh: the earlier run's encoder, summary and checkpoints are removed (on
    rank 0) so that nothing of it can be mistaken for the new run's (or resumed from later).

    Args:
        out_dir: the run folder.
        overwrite: the ``overwrite`` option.
        is_global_zero: this process is rank 0 (the only one that deletes).

    Raises:
        ConfigError: the folder holds an encoder or ``summary.json`` and ``overwrite`` is false.
    """
    out = Path(out_dir)
    found = finished_run_files(out)
    if not overwrite:
        if found:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
            damaged = len(_candidates(out))
            why = f" ({damaged} damaged checkpoint(s) skipped, see the log)" if damaged else ""
            raise ConfigError("overwrite", f"{out} already holds a trained run ({names}) and no checkpoint to "
                                           f"resume from{why}: a fresh start would overwrite it. Pass overwrite=true "
                                           "to replace it, or give another run folder (hydra.run.dir=... / "
                                           "out_dir=...)")
        return
    # SLURM requeue saves too: Lightning's fit(ckpt_path=None) restores an hpc_ckpt_* under SLURM by itself, so a
    # "fresh" run would silently continue the old one (and ecgfm's resume picks them first)
    gone = [p for p in [*found, out / "checkpoints", *sorted(out.glob("hpc_ckpt_*.ckpt"))] if p.exists()]
    if is_global_zero and gone:
        for p in gone:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        log.warning("overwrite=true: removed the earlier run's %s from %s", ", ".join(p.name for p in gone), out)


def remove_stale_temporaries(out_dir: str | os.PathLike) -> None:
    """Delete temporary checkpoint files left by a process killed while saving (``checkpoints/.*.tmp``)."""
    for tmp in (Path(out_dir) / "checkpoints").glob(".*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


class DataFacts(L.Callback):
    """Saves the training data's sampling rate and crop in every checkpoint, and refuses to resume a checkpoint
    trained on another rate or crop (Lightning's callback ``state_dict`` / ``load_state_dict``).

    Crops are set in seconds and converted with the cache's rate, so resuming into a run whose cache has another
    rate would feed the weights signals of another time scale, with the same tensor shapes when the sample counts
    happen to agree: refused, naming both.

    It also keeps the training caches (their folder names hash the record sources and the preprocessing) and the
    mixture settings: a run continued from its own folder (``deliberate=False``) on other caches, mixture weights,
    validation fraction or views is refused (the steps would follow two data sets while the export names one);
    ``resume=<checkpoint>`` continues deliberately. Either way :attr:`seen_caches` holds every cache the weights
    were trained on, old and new, which the exported encoder records for the leakage guard.

    Args:
        fs: sampling rate of the training caches (Hz).
        crop_seconds: training crop in seconds.
        crop_samples: the same in samples at ``fs``.
        caches: the training cache folders.
        mixture: the data settings that decide what is drawn (``weights``, ``val_fraction``, ``views``).
        deliberate: ``resume=`` was given: other caches / mixture settings are accepted (and recorded).
    """

    def __init__(self, fs: float, crop_seconds: float, crop_samples: int, caches: Sequence[str] = (),
                 mixture: Mapping[str, Any] | None = None, deliberate: bool = False) -> None:
        self.facts = {"fs": float(fs), "crop_seconds": float(crop_seconds), "crop_samples": int(crop_samples)}
        self.caches = [str(Path(c).resolve()) for c in caches]
        self.mixture = dict(mixture or {})
        self.deliberate = bool(deliberate)
        self.seen_caches = list(self.caches)
        self.digests = {c: cache_digest(c) for c in self.caches}
        self.start_step: int | None = None   # the global step fit started from (a resumed run: the checkpoint's)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = int(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**self.facts, "caches": list(self.caches), "seen_caches": list(self.seen_caches),
                "mixture": dict(self.mixture), "cache_digests": {Path(c).name: d for c, d in self.digests.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_rate(state_dict)
        old = state_dict.get("caches")
        if old is not None and not self.deliberate:
            names = lambda cs: sorted(Path(c).name for c in cs)   # noqa: E731 - the content-hashed folder names
            was, now = state_dict.get("mixture") or {}, self.mixture
            diffs = ([f"caches {names(old)} -> {names(self.caches)}"] if names(old) != names(self.caches) else []) \
                + [f"data.{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now))
                   if was.get(k) != now.get(k)]
            # same folder names, other records: the cache was prepared again in place (a repaired or new file)
            saved = state_dict.get("cache_digests") or {}
            diffs += [f"cache {Path(c).name} was prepared again since (its records changed: the sampler's "
                      f"positions would draw other records)" for c in self.digests
                      if digest_matches(c, saved.get(Path(c).name)) is False]
            if diffs:
                raise ConfigError("resume", f"the run in this folder was trained on other data ({'; '.join(diffs)});"
                                            " continuing it would mix two data sets. Use another hydra.run.dir, "
                                            "overwrite=true to train again from step 0, or resume=<its checkpoint> "
                                            "to continue on purpose on the new data")
        self.seen_caches = list(dict.fromkeys([*(state_dict.get("seen_caches") or old or []), *self.caches]))

    def _check_rate(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict.get(k) for k in self.facts}
        if any(v is not None and not math.isclose(float(v), float(self.facts[k])) for k, v in saved.items()):
            raise ConfigError("resume", f"the checkpoint was trained on {saved['fs']:g} Hz data with "
                                        f"{saved['crop_seconds']:g} s = {saved['crop_samples']} sample crops; this "
                                        f"run's data is {self.facts['fs']:g} Hz with {self.facts['crop_seconds']:g} "
                                        f"s = {self.facts['crop_samples']} samples. Resume with the same data and "
                                        "crop_seconds, or start a new run folder")


#: config sections a run resumed from its own folder must share with the run that wrote the checkpoint (what it
#: learns and from what); the schedule length (``method.max_steps``, to extend a run), the trainer, checkpointing,
#: logging, threads and paths may change.
RESUME_FIXED = ("method", "backbone", "preprocess", "seed", "crop_seconds", "data.batch_size",
                "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")
RESUME_FREE = ("method.max_steps",)
#: what an absent (null) trainer setting means to Lightning: compared as that value (``gradient_clip_val`` null or
#: 0 = no clipping), so a config.yaml without the key is not a change. ``trainer.precision`` is not compared: it
#: follows the hardware (a run started on a GPU in bf16 may continue on a CPU in fp32), not the recipe.
_TRAINER_DEFAULTS = {"trainer.accumulate_grad_batches": 1, "trainer.gradient_clip_val": 0.0,
                     "trainer.gradient_clip_algorithm": "norm"}


def check_resume_config(out_dir: str | os.PathLike, cfg: Any) -> None:
    """Refuse to continue a run in ``out_dir`` with other settings than it was trained with.

    A rerun into a run folder resumes from its newest checkpoint; with another ``method.mask_ratio`` (say) the
    steps done and the steps to come would follow two recipes while ``config.yaml`` and the exported encoder name
    only the new one. The run's ``config.yaml`` is compared with ``cfg`` on :data:`RESUME_FIXED` (except
    :data:`RESUME_FREE`); no ``config.yaml`` (an older run): nothing to compare. A preprocessing field added to
    ecgfm after the run was started (absent from its ``config.yaml``) reads as its default, which keeps the old
    pipeline (:data:`ecgfm.data.preprocess._ADDED_DEFAULTS`).

    Raises:
        ConfigError: naming every differing key, with the two values and the ways out (another folder,
            ``overwrite=true`` to start again, ``resume=<checkpoint>`` to continue deliberately).
    """
    from omegaconf import OmegaConf

    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable record of the old run: say so, do not guess
        log.warning("resume: %s unreadable (%s): the old run's settings are not compared", path, exc)
        return
    new = OmegaConf.to_container(cfg, resolve=True)

    def flat(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}.{k}"))
            return out
        return {prefix: node}

    def pick(tree: dict[str, Any], key: str) -> dict[str, Any]:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return flat(node, key)

    from ecgfm.data.preprocess import _ADDED_DEFAULTS

    added = {f"preprocess.{name}": value for name, value in _ADDED_DEFAULTS.items()}
    diffs = []
    for key in RESUME_FIXED:
        a, b = pick(old, key), pick(new, key)
        for k in sorted(set(a) | set(b)):
            if k in added and (k not in a or k not in b):   # a field newer than one side's record: its default
                a.setdefault(k, added[k])
                b.setdefault(k, added[k])
            if k in _TRAINER_DEFAULTS:   # null is Lightning's default; 1 and 1.0 are one setting
                a[k] = _TRAINER_DEFAULTS[k] if a.get(k) is None else a[k]
                b[k] = _TRAINER_DEFAULTS[k] if b.get(k) is None else b[k]
                same = (float(a[k]) == float(b[k])) if all(isinstance(v, (int, float)) for v in (a[k], b[k])) \
                    else a[k] == b[k]
                if not same:
                    diffs.append(f"{k}: {a[k]!r} -> {b[k]!r}")
                continue
            if k not in RESUME_FREE and a.get(k) != b.get(k):
                diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    if diffs:
        raise ConfigError("resume", f"{Path(out_dir)} holds a run trained with other settings ({'; '.join(diffs[:6])}"
                                    f"{' ...' if len(diffs) > 6 else ''}); continuing it would mix two recipes. Use "
                                    f"another hydra.run.dir, overwrite=true to train it again from step 0, or "
                                    f"resume=<its checkpoint> to continue on purpose with the new settings")
