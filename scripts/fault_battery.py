#!/usr/bin/env python
"""Fault battery of issue 9: inject each fault through the public commands on tiny data and check what they do.

    python scripts/fault_battery.py                 # every row; exit status 1 if any row fails
    python scripts/fault_battery.py --list          # the rows, their issue item and expected outcome
    python scripts/fault_battery.py --only corrupt_shard_train --only prepare_without_out
    python scripts/fault_battery.py --json out.json --jobs 2 --keep

Each row builds tiny data in a temporary folder (synthetic records, ``wfdb.wrsamp`` records or copies of the shared
fixture records in ``../shared/data/fixture``), injects one fault, runs the public command (``python prepare.py``,
``train.py``, ``probe.py``, ``explain.py`` from the repository root, with ``sys.executable``) as a subprocess and
classifies what it observed (the state a row damages first, such as a first conversion, a finished probe cell or a
token file, is built by the same code in this process: :func:`in_process`):

* ``error``   non-zero exit, the message names what is wrong (the words the row expects) and stderr holds no Python
  traceback (a one-line ``error: ...`` is the goal). ``error+traceback``: right exit and words, but a traceback.
* ``skip``    exit 0; the bad input is left out and named with its reason (``skipped.csv`` / the printed report /
  the run summary), the good inputs are used.
* ``recover`` exit 0; the damage is repaired or rebuilt (with a log line naming it) and the result is right.
* ``correct`` exit 0 and the result is right where the old code gave a silently wrong one (no repair needed).

An expected outcome written ``error/recover`` accepts either (the issue allows both for that fault). Anything else is
reported as observed (``error+traceback``, ``wrong message``, ``exit 0``, ``exit 1``, ``timeout``, ``battery error``
...) and fails the row. The table (fault, item, expected, observed, pass, seconds) is printed at the end; ``--json`` also writes it
with each row's details. docs/RELIABILITY.md holds the table and the guarantees behind it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
FIXTURE = SHARED / "fixture"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: tiny MAE run: every train.py row uses it (plus its own overrides)
TINY_TRAIN = ["+experiment=mae", "backbone=vit1d_test", "data.batch_size=8", "data.val_fraction=0.2",
              "data.num_workers=0", "trainer.max_steps=2", "checkpoint.every_n_train_steps=2",
              "checkpoint.save_top_k=-1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              "trainer.log_every_n_steps=1", "torch_threads=1", "method.warmup_steps=1", "method.decoder_dim=16",
              "method.decoder_heads=2", "method.decoder_depth=1", "logger=csv"]
#: the synthetic corpus of train.py rows that do not bring their own cache
TINY_SYNTH = ["data.params.n_records=24", "data.params.duration=6.0"]
#: tiny probe on the synthetic task
TINY_PROBE = ["task=synthetic", "task.params.n_records=60", "bootstrap.n=20", "probe.Cs=[1.0]", "plot=false",
              "torch_threads=1", "prepare_workers=0", "fraction=1.0", "seed=0"]
TIMEOUT = 300
#: seconds the workers of a killed command get to exit with it (rows workers_exit_*)
WORKER_EXIT_S = 15.0
#: in-process library calls (building caches, exporting encoders, opening caches) are not thread-safe: one at a time
LIB = threading.RLock()


# ------------------------------------------------------------------------------------------------ running commands
@dataclass
class Proc:
    cmd: list[str]
    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool = False

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def tail(self, n: int = 6) -> str:
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()] or \
            [ln for ln in self.out.strip().splitlines() if ln.strip()]
        return " | ".join(lines[-n:])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             HYDRA_FULL_ERROR="0", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def run(script: str, *overrides: str, cwd: Path = ROOT, timeout: float = TIMEOUT, extra_env: dict | None = None
        ) -> Proc:
    """``python <script> overrides...`` (a root script of this repository) as a subprocess."""
    cmd = [sys.executable, str(ROOT / script), *overrides]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env={**env(), **(extra_env or {})}, errors="replace")
        return Proc(cmd, p.returncode, p.stdout, p.stderr, time.time() - t0)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Proc(cmd, None, out, err, time.time() - t0, timed_out=True)


def in_process(script: str, *overrides: str) -> Proc:
    """What ``python <script> overrides...`` runs (its config composed with ``overrides``, then the command's
    function), in this process and one call at a time: for a row's *setup* (the cache, cell or token file the
    checked command then meets), never for the run a row checks. A subprocess paid seconds of start-up and imports
    for a result the row does not look at. ``script``: ``prepare.py`` or ``probe.py``. ``rc`` 0, or 1 with the error
    as ``err``."""
    import contextlib
    import io

    from hydra import compose, initialize_config_dir

    from ecgfm.conf import config_dir

    def prepare(cfg: Any) -> Any:
        from ecgfm.cli.prepare import resolve_out
        from ecgfm.config import validate_prepare_config
        from ecgfm.data.cache import prepare_from_config

        return prepare_from_config(validate_prepare_config(resolve_out(cfg)))

    def probe(cfg: Any) -> Any:
        from ecgfm.evaluate.sweep import probe_main

        return probe_main(cfg)

    fn = {"prepare.py": prepare, "probe.py": probe}[script]
    cmd = [f"{script} (in process)", *overrides]
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with LIB:
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name=script.removesuffix(".py"), overrides=list(overrides))
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                fn(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported as the row's "setup failed" (SystemExit too)
            return Proc(cmd, 1, out.getvalue(), f"{err.getvalue()}error: {type(exc).__name__}: {exc}",
                        time.time() - t0)
    return Proc(cmd, 0, out.getvalue(), err.getvalue(), time.time() - t0)


def has_traceback(p: Proc) -> bool:
    return "Traceback (most recent call last)" in p.err or "Error executing job with overrides" in p.err


# ------------------------------------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    observed: str
    ok: bool
    detail: str = ""


class Check:
    """Collects the conditions of one row; ``result(kind)`` turns them into an :class:`Outcome`."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.notes: list[str] = []

    def that(self, cond: Any, what: str) -> bool:
        if not cond:
            self.failures.append(what)
        return bool(cond)

    def note(self, what: str) -> None:
        self.notes.append(what)

    def result(self, kind: str, p: Proc | None = None) -> Outcome:
        if p is not None and p.timed_out:
            return Outcome("timeout", False, f"after {p.seconds:.0f} s: {p.tail()}")
        if p is not None and p.rc != 0:
            return Outcome(f"exit {p.rc}", False, p.tail())
        if p is not None and has_traceback(p):
            self.failures.append("exit 0, but a traceback was printed")
        detail = "; ".join(x for x in self.failures + self.notes if x)
        if self.failures:
            return Outcome(f"{kind}?", False, detail)
        return Outcome(kind, True, detail)


def expect_error(p: Proc, *patterns: str, forbid: tuple[str, ...] = (), extra: Check | None = None) -> Outcome:
    """A refused run: non-zero exit, every regex of ``patterns`` in stderr+stdout (case-insensitive), no
    traceback, none of ``forbid``, and the extra conditions of ``extra``."""
    if p.timed_out:
        return Outcome("timeout", False, f"after {p.seconds:.0f} s: {p.tail()}")
    if p.rc == 0:
        return Outcome("exit 0", False, f"expected a refusal; {p.tail(3)}")
    missing = [pat for pat in patterns if not re.search(pat, p.text, re.I | re.S)]
    bad = [f for f in forbid if f in p.text]
    problems = []
    if missing:
        problems.append(f"message lacks {missing}")
    if bad:
        problems.append(f"message holds {bad}")
    if extra is not None:
        problems += extra.failures
    err_lines = [ln for ln in p.err.strip().splitlines() if ln.strip()]
    if not has_traceback(p) and not (err_lines and err_lines[-1].startswith("error:")):
        problems.append("the last stderr line is not one 'error: ...' line")
    last = p.tail(2)
    if has_traceback(p):
        observed = "error+traceback" if not problems else "crash"
        return Outcome(observed, False, "; ".join(problems + [f"traceback; last lines: {last}"]))
    if problems:
        return Outcome("wrong message", False, "; ".join(problems + [f"last lines: {last}"]))
    return Outcome("error", True, last)


# ------------------------------------------------------------------------------------------------ shared fixtures
class Shared:
    """Built once per battery run, on first use (thread-safe): a trained tiny run, a probed task cache..."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._locks: dict[str, threading.Lock] = {}
        self._values: dict[str, Any] = {}
        self._guard = threading.Lock()

    def get(self, name: str, build: Callable[[Path], Any]) -> Any:
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._values:
                folder = self.base / f"shared-{name}"
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    self._values[name] = build(folder)
                except Exception as exc:  # noqa: BLE001 - reported by every row that needs it
                    self._values[name] = exc
            value = self._values[name]
        if isinstance(value, Exception):
            raise RuntimeError(f"shared fixture {name!r} failed: {value}") from value
        return value

    @property
    def cache_root(self) -> Path:
        """One cache root for the synthetic pretraining corpus of train.py rows (prepared once, then reused)."""
        p = self.base / "shared-cache"
        p.mkdir(exist_ok=True)
        return p


def trained_run(shared: Shared) -> Path:
    """A finished tiny MAE run (4 steps, checkpoints at steps 2 and 4, last.ckpt, encoder/, summary.json)."""
    def build(folder: Path) -> Path:
        out = folder / "run"
        p = run("train.py", *TINY_TRAIN, *TINY_SYNTH, "trainer.max_steps=4", "method.max_steps=8",
                f"paths.cache_root={shared.cache_root}", f"hydra.run.dir={out}")
        if p.rc != 0 or not (out / "encoder" / "encoder.json").exists():
            raise RuntimeError(f"tiny training run failed: {p.tail()}")
        return out
    return shared.get("trained_run", build)


def probed_task(shared: Shared) -> Path:
    """A cache root holding the synthetic probe task's cache and its feature file (one probe.py run, in this
    process: every row using it runs its own probe.py); beside it, ``results/`` holds that run's finished cell."""
    def build(folder: Path) -> Path:
        root = folder / "cache"
        p = in_process("probe.py", *TINY_PROBE, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}",
                       f"results_dir={folder / 'results'}")
        if p.rc != 0:
            raise RuntimeError(f"probe run failed: {p.tail()}")
        return root
    return shared.get("probed_task", build)


def toy_encoder(path: Path, seed: int, fs: float = 100.0) -> Path:
    """An exported resnet1d_test encoder of the method "ToyModule" with seeded random weights."""
    import torch

    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    with LIB:
        torch.manual_seed(seed)
        return Path(export_encoder(create_backbone("resnet1d_test"), path, PreprocessSpec(fs=fs),
                                   extra={"method": "ToyModule", "crop_samples": int(2.5 * fs), "fs": fs}))


def synthetic_cache(path: Path, fs: float = 100.0, n: int = 16, duration: float = 6.0, shard_records: int = 4
                    ) -> Path:
    """A small synthetic corpus cache written by the library (ecgfm.data.cache.prepare_corpus)."""
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    with LIB:
        prepare_corpus(SyntheticSource(n, seed=3, fs=500.0, duration=duration), path, PreprocessSpec(fs=fs),
                       shard_records=shard_records, workers=0, progress=False)
    return path


def open_cache(path: Path):
    """``CorpusCache(path)`` (its open-time checks included), one thread at a time."""
    from ecgfm.data.cache import CorpusCache

    with LIB:
        return CorpusCache(path)


def poison(cache_dir: Path, records: list[int], vouch: bool) -> list[Path]:
    """Write NaN over the stored signal of ``records``; returns their shard files. ``vouch``: update the manifest's
    checksums too, as if the NaNs had been there when the cache was written (only the loaders can catch them)."""
    import numpy as np

    with LIB:
        cache = open_cache(cache_dir)
        cols = cache.columns()
        where = [(cache_dir / cache.manifest["shards"][int(cols["shard"][i])]["bin"], int(cols["offset"][i]),
                  int(cols["n_leads"][i]) * int(cols["n_samples"][i])) for i in records]
        del cache
        for shard, offset, n in where:
            with open(shard, "r+b") as fh:
                fh.seek(offset)
                fh.write(np.full(n, np.nan, np.float32).tobytes())
        if vouch:
            mpath = cache_dir / "manifest.json"
            manifest = json.loads(mpath.read_text())
            for entry in manifest["shards"]:
                entry["bin_sha256"] = hashlib.sha256((cache_dir / entry["bin"]).read_bytes()).hexdigest()
            mpath.write_text(json.dumps(manifest))
    return [w[0] for w in where]


def copy_ptbxl(dest: Path, n: int = 4) -> Path:
    """The first ``n`` PTB-XL fixture records (100 Hz) and the two CSVs, in ``dest``."""
    src = FIXTURE / "ptbxl"
    dest.mkdir(parents=True, exist_ok=True)
    heads = sorted((src / "records100").rglob("*_lr.hea"))[:n]
    for hea in heads:
        rel = hea.relative_to(src)
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copy2(hea.with_suffix(ext), dest / rel.with_suffix(ext))
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy2(src / name, dest / name)
    return dest


def copy_cinc2017(dest: Path, names=("A00002", "A00003", "A00006")) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        for ext in ("hea", "mat"):
            shutil.copy(SHARED / "cinc2017" / f"{name}.{ext}", dest)
    return dest


def folder_of_ptbxl(dest: Path, names=("00001_lr", "00002_lr", "00003_lr")) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        for ext in ("hea", "dat"):
            shutil.copy(FIXTURE / "ptbxl" / "records100" / "00000" / f"{name}.{ext}", dest)
    return dest


def read_skipped(cache_dir: Path) -> list[dict[str, str]]:
    path = cache_dir / "skipped.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def prepare_args(out: Path, *extra: str) -> list[str]:
    return [f"out={out}", "workers=0", "progress=false", *extra]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ================================================================================================ the rows
@dataclass
class Fault:
    name: str
    item: int
    expected: str
    what: str
    fn: Callable[[Path, Shared], Outcome]


FAULTS: list[Fault] = []


def fault(name: str, item: int, expected: str, what: str):
    def deco(fn):
        FAULTS.append(Fault(name, item, expected, what, fn))
        return fn
    return deco


# ---------------------------------------------------------------------------- 1. corrupt shard
@fault("corrupt_shard_train", 1, "error", "NaN bytes written into one cache shard; train.py data=cached")
def _corrupt_shard_train(tmp: Path, shared: Shared) -> Outcome:
    cache = synthetic_cache(tmp / "syn")
    (shard,) = poison(cache, [5], vouch=False)
    p = run("train.py", *TINY_TRAIN, "data=cached", f"data.cache_dirs=[{cache}]", f"hydra.run.dir={tmp / 'run'}")
    c = Check()
    c.that(not (tmp / "run" / "encoder").exists(), "an encoder was exported")
    return expect_error(p, re.escape(shard.name), "checksum", extra=c)


@fault("corrupt_shard_probe", 1, "recover",
       "NaN bytes in a shard of a probe task's (keyed, rebuildable) cache; probe.py re-converts the shard")
def _corrupt_shard_probe(tmp: Path, shared: Shared) -> Outcome:
    import numpy as np

    root = tmp / "cache"
    shutil.copytree(probed_task(shared), root)
    shutil.rmtree(root / "features")       # the frozen pass must read the signals again
    (cache,) = [d for d in root.iterdir() if d.name.startswith("synthetic-")]
    (shard,) = poison(cache, [3], vouch=False)
    p = run("probe.py", *TINY_PROBE, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}",
            f"results_dir={tmp / 'results'}", f"hydra.run.dir={tmp / 'hydra'}")
    c = Check()
    if p.rc == 0:
        c.that(re.search(rf"{re.escape(shard.stem)}.*(damaged|checksum)", p.text), f"no log line naming {shard.name}")
        c.that(np.isfinite(open_cache(cache).signal(3)).all(), "record 3 still holds NaN")
    return c.result("recover", p)


@fault("nonfinite_probe_error", 1, "error",
       "NaN samples vouched for by a task cache's manifest; probe.py's frozen pass stops naming shard + record")
def _nonfinite_probe(tmp: Path, shared: Shared) -> Outcome:
    root = tmp / "cache"
    shutil.copytree(probed_task(shared), root)
    shutil.rmtree(root / "features")
    (cache,) = [d for d in root.iterdir() if d.name.startswith("synthetic-")]
    (shard,) = poison(cache, [3], vouch=True)
    key = open_cache(cache).keys[3]
    p = run("probe.py", *TINY_PROBE, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}",
            f"results_dir={tmp / 'results'}", f"hydra.run.dir={tmp / 'hydra'}")
    c = Check()
    c.that(not list((tmp / "results").rglob("*.json")), "a results cell was written")
    return expect_error(p, "non-finite", re.escape(shard.name), re.escape(key), extra=c)


@fault("corrupt_shard_verify", 1, "recover", "NaN bytes in a shard; prepare.py ... verify=true repairs it")
def _corrupt_shard_verify(tmp: Path, shared: Shared) -> Outcome:
    import numpy as np

    out = tmp / "syn"
    args = ["sources=[synthetic]", "synthetic.n_records=8", "synthetic.duration=3.0", "synthetic.fs=100.0",
            "spec.fs=100", "shard_records=2", *prepare_args(out)]
    first = in_process("prepare.py", *args)   # setup: the cache to damage (the checked run is the verify=true one)
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    (shard,) = poison(out, [3], vouch=False)
    p = run("prepare.py", *args, "verify=true")
    c = Check()
    if p.rc == 0:
        c.that(re.search(r"repaired 1 damaged shard", p.text), "no 'repaired 1 damaged shard' line")
        c.that(shard.name.split(".")[0] in p.text, f"the log does not name {shard.name}")
        cache = open_cache(out)
        c.that(np.isfinite(cache.signal(3)).all(), "record 3 still holds NaN")
    return c.result("recover", p)


@fault("nonfinite_train_error", 1, "error",
       "NaN samples vouched for by the manifest (written at preparation); train.py stops naming shard + records")
def _nonfinite_train_error(tmp: Path, shared: Shared) -> Outcome:
    cache = synthetic_cache(tmp / "syn")
    (shard, *_) = poison(cache, [0, 1, 2, 3], vouch=True)
    p = run("train.py", *TINY_TRAIN, "data=cached", f"data.cache_dirs=[{cache}]", f"hydra.run.dir={tmp / 'run'}")
    c = Check()
    c.that(not (tmp / "run" / "encoder").exists(), "an encoder was exported")
    return expect_error(p, "non-finite", re.escape(shard.name), r"synthetic/", r"nonfinite=.?skip", extra=c)


@fault("nonfinite_train_skip", 1, "skip", "the same damage with nonfinite=skip: records left out and counted")
def _nonfinite_train_skip(tmp: Path, shared: Shared) -> Outcome:
    import numpy as np

    cache = synthetic_cache(tmp / "syn")
    poison(cache, [0, 5], vouch=True)
    out = tmp / "run"
    p = run("train.py", *TINY_TRAIN, "data=cached", f"data.cache_dirs=[{cache}]", "nonfinite=skip",
            "trainer.max_steps=4", "data.val_fraction=0.0", f"hydra.run.dir={out}")
    c = Check()
    if p.rc == 0:
        s = json.loads((out / "summary.json").read_text())
        c.that(s.get("nonfinite_records_skipped", 0) > 0, f"summary counts {s.get('nonfinite_records_skipped')} "
                                                          "skipped records")
        c.that(np.isfinite(s.get("last_loss", float("nan"))), "last loss not finite")
        c.that("non-finite" in p.out, "the final block does not mention the skipped records")
        c.note(f"{s.get('nonfinite_records_skipped')} record(s) skipped: {s.get('nonfinite_skipped_keys')}")
    return c.result("skip", p)


# ---------------------------------------------------------------------------- 2. stale caches
def _prepared_ptbxl(tmp: Path) -> tuple[Path, Path, list[str], Proc]:
    root = copy_ptbxl(tmp / "ptbxl", n=4)
    out = tmp / "cache"
    args = ["sources=[ptbxl]", f"ptbxl.root={root}", "shard_records=2", *prepare_args(out)]
    return root, out, args, in_process("prepare.py", *args)   # setup: the cache the checked prepare.py run meets


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "shards").glob("*.bin"))}


@fault("stale_label_edit", 2, "recover",
       "a label edited in ptbxl_database.csv after prepare; prepare.py again relabels without a signal rebuild")
def _stale_label_edit(tmp: Path, shared: Shared) -> Outcome:
    root, out, args, first = _prepared_ptbxl(tmp)
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    bins = _shard_stats(out)
    before = open_cache(out)
    rid = before.index["record_id"][1]
    path = root / "ptbxl_database.csv"
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    head = rows[0]
    for row in rows[1:]:
        if int(float(row[head.index("ecg_id")])) == int(rid):
            row[head.index("scp_codes")] = "{'MI': 100.0}"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    p = run("prepare.py", *args)
    c = Check()
    if p.rc == 0:
        c.that("ptbxl_database.csv" in p.text, "the output does not name ptbxl_database.csv")
        c.that(re.search(r"relabelled", p.text), "no 'relabelled' line")
        c.that(tuple(open_cache(out).record(1).labels) == ("MI",), "the cache still holds the old label")
        c.that(_shard_stats(out) == bins, "signal shards were rewritten for a label edit")
    return c.result("recover", p)


@fault("stale_record_replaced", 2, "recover",
       "a record's .dat replaced by another after prepare; prepare.py again re-converts its shard, naming the file")
def _stale_record_replaced(tmp: Path, shared: Shared) -> Outcome:
    import numpy as np
    root, out, args, first = _prepared_ptbxl(tmp)
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    before = open_cache(out)
    sig1 = before.signal(1)
    dats = sorted(root.rglob("*_lr.dat"))
    shutil.copy(dats[1], dats[0])
    os.utime(dats[0], ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    p = run("prepare.py", *args)
    c = Check()
    if p.rc == 0:
        c.that(dats[0].name in p.text, f"the output does not name {dats[0].name}")
        after = open_cache(out)
        c.that(np.array_equal(after.signal(0), sig1), "record 0 still holds its old signal")
    return c.result("recover", p)


@fault("stale_record_retimed", 2, "recover",
       "every record file copied over itself after prepare (new times, same bytes); prepare.py again converts "
       "nothing")
def _stale_record_retimed(tmp: Path, shared: Shared) -> Outcome:
    root, out, args, first = _prepared_ptbxl(tmp)
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    bins = _shard_stats(out)
    files = sorted(root.rglob("*_lr.*"))
    for f in files:                          # a copy without preserved times: a new file, the same bytes
        data = f.read_bytes()
        f.unlink()
        f.write_bytes(data)
    p = run("prepare.py", *args)
    c = Check()
    if p.rc == 0:
        c.that(_shard_stats(out) == bins, "signal shards were converted again for files whose bytes did not change")
        c.that(re.search(rf"{len(files)} record file\(s\) have new times but the bytes", p.text),
               "no line saying the record files kept their bytes")
        c.that(len(open_cache(out)) == 4, "the cache lost records")
    return c.result("recover", p)


@fault("stale_record_added", 2, "error",
       "a record file added to the source folder after prepare; prepare.py into the same out= refuses, naming it")
def _stale_record_added(tmp: Path, shared: Shared) -> Outcome:
    root, out, args, first = _prepared_ptbxl(tmp)
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    full = copy_ptbxl(tmp / "full", n=5)
    new = sorted(full.rglob("*_lr.hea"))[4]
    rel = new.relative_to(full)
    for ext in (".hea", ".dat"):
        shutil.copy2(new.with_suffix(ext), root / rel.with_suffix(ext))
    manifest = file_digest(out / "manifest.json")
    p = run("prepare.py", *args)
    c = Check()
    c.that(file_digest(out / "manifest.json") == manifest, "the cache was changed")
    ecg_id = new.name.split("_")[0]
    return expect_error(p, "different preparation", "added", ecg_id, extra=c)


# ---------------------------------------------------------------------------- 3. label tables
@fault("label_bom_reference", 3, "correct", "CinC 2017 REFERENCE.csv with a UTF-8 BOM: the first record keeps its label")
def _label_bom(tmp: Path, shared: Shared) -> Outcome:
    root = copy_cinc2017(tmp / "cinc")
    (root / "REFERENCE.csv").write_bytes(b"\xef\xbb\xbfA00002,N\r\nA00003,A\r\nA00006,N\r\n")
    out = tmp / "cache"
    p = run("prepare.py", "sources=[cinc2017]", f"cinc2017.root={root}", *prepare_args(out))
    c = Check()
    if p.rc == 0:
        cache = open_cache(out)
        labels = {cache.index["record_id"][i]: tuple(cache.record(i).labels) for i in range(len(cache))}
        c.that(labels.get("A00002") == ("N",), f"A00002 (first line, after the BOM) labelled {labels.get('A00002')}")
        c.that(labels.get("A00003") == ("A",), f"A00003 labelled {labels.get('A00003')}")
    return c.result("correct", p)


@fault("label_duplicate_reference", 3, "error", "CinC 2017 REFERENCE.csv lists A00002 twice")
def _label_dup_cinc(tmp: Path, shared: Shared) -> Outcome:
    root = copy_cinc2017(tmp / "cinc")
    (root / "REFERENCE.csv").write_text("A00002,N\nA00003,A\nA00002,O\nA00006,N\n")
    out = tmp / "cache"
    p = run("prepare.py", "sources=[cinc2017]", f"cinc2017.root={root}", *prepare_args(out))
    c = Check()
    c.that(not (out / "manifest.json").exists(), "a cache was written")
    return expect_error(p, "REFERENCE.csv", "duplicate id 'A00002'", "lines 1 and 3", extra=c)


@fault("label_duplicate_ecg_id", 3, "error", "PTB-XL ptbxl_database.csv with a second row for ecg_id 1")
def _label_dup_ptbxl(tmp: Path, shared: Shared) -> Outcome:
    root = copy_ptbxl(tmp / "ptbxl", n=3)
    db = root / "ptbxl_database.csv"
    lines = db.read_text().splitlines(keepends=True)
    dup = "1" + lines[3][lines[3].index(","):]
    db.write_text("".join(lines[:3] + [dup] + lines[4:]))
    p = run("prepare.py", "sources=[ptbxl]", f"ptbxl.root={root}", *prepare_args(tmp / "cache"))
    return expect_error(p, "ptbxl_database.csv", "duplicate id '00001'", "lines 2 and 4")


@fault("label_header_spaces", 3, "correct", "folder labels CSV with the header 'record_id, label' (spaces)")
def _label_spaces(tmp: Path, shared: Shared) -> Outcome:
    root = folder_of_ptbxl(tmp / "f")
    (root / "labels.csv").write_text("record_id, label\n00001_lr, AF\n00002_lr , N\n00003_lr,N\n")
    out = tmp / "cache"
    p = run("prepare.py", "sources=[folder]", f"folder.root={root}", f"folder.labels_csv={root / 'labels.csv'}",
            "folder.label_columns=[label]", "spec.fs=100", *prepare_args(out))
    c = Check()
    if p.rc == 0:
        cache = open_cache(out)
        labels = {cache.index["record_id"][i]: tuple(cache.record(i).labels) for i in range(len(cache))}
        c.that(labels.get("00001_lr") == ("AF",) and labels.get("00002_lr") == ("N",), f"labels {labels}")
    return c.result("correct", p)


@fault("label_latin1", 3, "error", "folder labels CSV saved in Latin-1 (an 'ä' on line 3)")
def _label_latin1(tmp: Path, shared: Shared) -> Outcome:
    root = folder_of_ptbxl(tmp / "f")
    (root / "labels.csv").write_bytes("record_id,rhythm\n00001_lr,Vorhofflimmern\n00002_lr,Sinusrhythmus ä\n"
                                      .encode("latin-1"))
    p = run("prepare.py", "sources=[folder]", f"folder.root={root}", f"folder.labels_csv={root / 'labels.csv'}",
            "spec.fs=100", *prepare_args(tmp / "cache"))
    return expect_error(p, "labels.csv", "line 3", "utf-8")


@fault("label_latin1_encoding", 3, "correct", "the same Latin-1 labels CSV read with folder.labels_encoding=latin-1")
def _label_latin1_ok(tmp: Path, shared: Shared) -> Outcome:
    root = folder_of_ptbxl(tmp / "f")
    (root / "labels.csv").write_bytes("record_id,rhythm\n00001_lr,Vorhofflimmern\n00002_lr,Sinusrhythmus ä\n"
                                      .encode("latin-1"))
    out = tmp / "cache"
    p = run("prepare.py", "sources=[folder]", f"folder.root={root}", f"folder.labels_csv={root / 'labels.csv'}",
            "folder.labels_encoding=latin-1", "spec.fs=100", *prepare_args(out))
    c = Check()
    if p.rc == 0:
        cache = open_cache(out)
        labels = {cache.index["record_id"][i]: tuple(cache.record(i).labels) for i in range(len(cache))}
        c.that(labels.get("00002_lr") == ("Sinusrhythmus ä",), f"00002_lr labelled {labels.get('00002_lr')}")
    return c.result("correct", p)


# ---------------------------------------------------------------------------- 4. WFDB headers
def _wfdb_folder(shared: Shared) -> tuple[Path, Path, Proc]:
    """One folder of PTB-XL fixture records, one per header fault (00001, 00002 good), converted once."""
    def build(folder: Path) -> tuple[Path, Path, Proc]:
        root = folder / "f"
        names = [f"{i:05d}_lr" for i in range(1, 8)]
        folder_of_ptbxl(root, names)
        outside = folder_of_ptbxl(folder / "outside", ["00006_lr"])

        def edit(name: str, old: str, new: str) -> None:
            hea = root / f"{name}.hea"
            text = hea.read_text()
            assert old in text, (name, old)
            hea.write_text(text.replace(old, new))

        lines = (root / "00003_lr.hea").read_text().splitlines()          # 6 signals announced, 12 stored
        (root / "00003_lr.hea").write_text("\n".join(["00003_lr 6 100 1000"] + lines[1:7]) + "\n")
        raw = bytearray((root / "00004_lr.dat").read_bytes())               # checksum: one sample changed
        raw[0] ^= 0x01
        (root / "00004_lr.dat").write_bytes(bytes(raw))
        edit("00005_lr", "00005_lr 12 100 1000", "00005_lr 12 1 1000")      # fs 1 Hz
        (root / "00006_lr.dat").unlink()                                     # ../outside/00006_lr.dat
        edit("00006_lr", "00006_lr.dat ", "../outside/00006_lr.dat ")
        edit("00007_lr", "00007_lr.dat ", f"{outside / '00006_lr.dat'} ")   # absolute path
        bad = os.path.join(os.fsencode(root), b"0000\xff_lr.hea")            # non-UTF-8 file name
        with open(bad, "wb") as fh:
            fh.write((root / "00002_lr.hea").read_bytes())
        out = folder / "cache"
        p = run("prepare.py", "sources=[folder]", f"folder.root={root}", "spec.fs=100", *prepare_args(out))
        return root, out, p
    return shared.get("wfdb_folder", build)


def _wfdb_row(shared: Shared, rid: str, reason: str) -> Outcome:
    _, out, p = _wfdb_folder(shared)
    c = Check()
    if p.rc == 0:
        rows = {r["record_id"]: r for r in read_skipped(out)}
        row = rows.get(rid)
        if c.that(row is not None, f"{rid} has no line in skipped.csv (lines: {sorted(rows)})"):
            c.that(reason in row["reason"], f"skipped.csv reason {row['reason']!r} lacks {reason!r}")
        category = re.sub(r"\d+(\.\d+)?", "#", reason.split(":")[0])   # the report's category (numbers as #)
        c.that(re.search(rf"^\s+\d+\s+.*{re.escape(category)}", p.out, re.M),
               f"the printed report has no count line for {category!r}")
        c.that(re.search(r"2 records converted", p.out), "the two good records were not both converted")
    return c.result("skip", p)


@fault("wfdb_signal_count", 4, "skip", "header announces 6 signals, the .dat holds 12")
def _wfdb_count(tmp: Path, shared: Shared) -> Outcome:
    return _wfdb_row(shared, "00003_lr", "signal file size disagrees with the header")


@fault("wfdb_checksum", 4, "skip", "one sample changed: header checksum mismatch")
def _wfdb_checksum(tmp: Path, shared: Shared) -> Outcome:
    return _wfdb_row(shared, "00004_lr", "header checksum mismatch")


@fault("wfdb_fs_1hz", 4, "skip", "header sampling rate 1 Hz")
def _wfdb_fs(tmp: Path, shared: Shared) -> Outcome:
    return _wfdb_row(shared, "00005_lr", "implausible sampling rate for an ECG: '1' Hz")


@fault("wfdb_dotdot_path", 4, "skip", "signal file ../outside/x.dat")
def _wfdb_dotdot(tmp: Path, shared: Shared) -> Outcome:
    return _wfdb_row(shared, "00006_lr", "signal file outside the dataset root")


@fault("wfdb_absolute_path", 4, "skip", "signal file given as an absolute path")
def _wfdb_abs(tmp: Path, shared: Shared) -> Outcome:
    return _wfdb_row(shared, "00007_lr", "signal file outside the dataset root")


@fault("wfdb_non_utf8_name", 4, "skip", "a header whose file name is not valid UTF-8")
def _wfdb_name(tmp: Path, shared: Shared) -> Outcome:
    return _wfdb_row(shared, "0000\\xff_lr", "file name is not valid UTF-8")


# ---------------------------------------------------------------------------- 5. results
@fault("results_two_checkpoints", 5, "correct",
       "two different encoders of one method probed into one results folder: two rows, not two 'seeds'")
def _results_two(tmp: Path, shared: Shared) -> Outcome:
    a = toy_encoder(tmp / "a" / "encoder", seed=1)
    b = toy_encoder(tmp / "b" / "encoder", seed=2)
    res = tmp / "results"
    cache_root = tmp / "cache"
    cells = []
    # the first encoder's cell is set up in this process; the second probe.py run (into the same results folder)
    # is the command checked: its cell beside the first one's, and the results table it writes
    first = in_process("probe.py", *TINY_PROBE, f"checkpoint={a}", f"results_dir={res}",
                       f"paths.cache_root={cache_root}")
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    p = run("probe.py", *TINY_PROBE, f"checkpoint={b}", f"results_dir={res}", f"paths.cache_root={cache_root}",
            f"hydra.run.dir={tmp / 'h1'}")
    if p.rc != 0:
        return Check().result("correct", p)
    c = Check()
    for cell in sorted((res / "cells").rglob("*.json")):
        cells.append(json.loads(cell.read_text()))
    ids = {cell.get("checkpoint_id") for cell in cells}
    c.that(len(cells) == 2 and len(ids) == 2 and None not in ids, f"cells' checkpoint ids: {ids}")
    md = (res / "results.md").read_text() if (res / "results.md").exists() else ""
    section = md.split("## macro_auroc")[1].split("## ")[0] if "## macro_auroc" in md else ""
    rows = [ln for ln in section.splitlines() if "@" in ln and ln.startswith("|")]
    c.that(len(rows) == 2, f"results.md macro_auroc has {len(rows)} rows with a checkpoint hash (want 2)")
    c.that(all(r.rstrip(" |").endswith("(1)") for r in rows), "a row claims more than one seed")
    return c.result("correct", p)


@fault("results_recipe_changed", 5, "recover", "a finished probe cell rerun with another probe grid (probe.Cs)")
def _results_recipe(tmp: Path, shared: Shared) -> Outcome:
    root = tmp / "cache"
    shared_root = probed_task(shared)
    shutil.copytree(shared_root, root)
    res = tmp / "results"
    base = [*TINY_PROBE, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}", f"results_dir={res}"]
    # the finished cell: probed_task's results folder, written by this very probe command (TINY_PROBE,
    # random:resnet1d_test) on the cache copied above (cells are keyed by checkpoint and recipe, not by paths)
    shutil.copytree(shared_root.parent / "results", res)
    (cell,) = list((res / "cells").rglob("*.json"))
    before = json.loads(cell.read_text())
    p = run("probe.py", *[a for a in base if not a.startswith("probe.Cs")], "probe.Cs=[0.1]",
            f"hydra.run.dir={tmp / 'h1'}")
    c = Check()
    if p.rc == 0:
        c.that(re.search(r"recipe changed.*Cs.*recomputing|recipe changed.*recomputing", p.text),
               "no 'recipe changed ... recomputing' line naming Cs")
        after = json.loads(cell.read_text())
        c.that(after.get("recipe_id") != before.get("recipe_id"), "the cell was not recomputed")
    return c.result("recover", p)


# ---------------------------------------------------------------------------- 6. crop length / encoder rate
@fault("crop_500hz_cache", 6, "correct", "train.py on a 500 Hz cache with crop_seconds=2.5")
def _crop_500(tmp: Path, shared: Shared) -> Outcome:
    cache = synthetic_cache(tmp / "syn500", fs=500.0, n=12, duration=4.0, shard_records=6)
    out = tmp / "run"
    p = run("train.py", *TINY_TRAIN, "data=cached", f"data.cache_dirs=[{cache}]", "crop_seconds=2.5",
            "trainer.max_steps=1", f"hydra.run.dir={out}")
    c = Check()
    if p.rc == 0:
        s = json.loads((out / "summary.json").read_text())
        c.that(s.get("fs") == 500.0 and s.get("crop_samples") == 1250 and s.get("crop_seconds") == 2.5,
               f"summary fs {s.get('fs')} crop {s.get('crop_seconds')} s = {s.get('crop_samples')} samples")
        meta = json.loads((out / "encoder" / "encoder.json").read_text())
        extra = meta.get("extra", {})
        c.that(extra.get("crop_samples") == 1250 and extra.get("crop_seconds") == 2.5 and extra.get("fs") == 500.0,
               f"encoder.json extra crop {extra.get('crop_seconds')} s = {extra.get('crop_samples')} samples at "
               f"{extra.get('fs')} Hz")
        c.that(meta.get("architecture", {}).get("init_args", {}).get("seq_len") == 1250, "encoder seq_len != 1250")
        c.that("1250 samples" in p.out, "the final block does not state the crop in samples")
    return c.result("correct", p)


@fault("encoder_fs_resampled", 6, "correct",
       "a 100 Hz encoder probed on the 500 Hz synthetic task: task records resampled to 100 Hz")
def _fs_resampled(tmp: Path, shared: Shared) -> Outcome:
    enc = toy_encoder(tmp / "e100" / "encoder", seed=3, fs=100.0)
    res = tmp / "results"
    p = run("probe.py", *TINY_PROBE, f"checkpoint={enc}", f"results_dir={res}", f"paths.cache_root={tmp / 'cache'}",
            f"hydra.run.dir={tmp / 'h'}")
    c = Check()
    if p.rc == 0:
        (cell,) = [json.loads(x.read_text()) for x in (res / "cells").rglob("*.json")]
        c.that(cell.get("fs") == 100.0 and cell.get("window_samples") == 250,
               f"cell fs {cell.get('fs')}, window {cell.get('window_samples')} samples")
    return c.result("correct", p)


@fault("encoder_fs_mismatch", 6, "error", "a 100 Hz encoder probed with preprocess={fs:250.0}")
def _fs_mismatch(tmp: Path, shared: Shared) -> Outcome:
    enc = toy_encoder(tmp / "e100" / "encoder", seed=3, fs=100.0)
    p = run("probe.py", *TINY_PROBE, f"checkpoint={enc}", f"results_dir={tmp / 'r'}",
            f"paths.cache_root={tmp / 'cache'}", "preprocess={fs:250.0}", f"hydra.run.dir={tmp / 'h'}")
    return expect_error(p, r"trained at 100 Hz.*250")


# ---------------------------------------------------------------------------- 7. explanations
def _explained(shared: Shared) -> tuple[Path, Proc]:
    def build(folder: Path) -> tuple[Path, Proc]:
        out = folder / "explain"
        p = run("explain.py", "demo.n_records=40", "demo.epochs=1", "methods=[gradcam,saliency]",
                "faithfulness.enabled=false", "counterfactual.enabled=true", "counterfactual.max_steps=60",
                "formats=[png]", "data.params.n_records=4", "record=syn000000",   # named: a demo training record
                f"paths.cache_root={folder / 'cache'}", f"hydra.run.dir={out}")
        return out, p
    return shared.get("explained", build)


@fault("explain_lead_ranking", 7, "correct",
       "Grad-CAM on a CNN classifier (same map in every lead): explain.py must not print 'top leads'")
def _explain_leads(tmp: Path, shared: Shared) -> Outcome:
    out, p = _explained(shared)
    c = Check()
    if p.rc == 0:
        lines = [ln for ln in p.out.splitlines() if ln.strip().startswith("gradcam")]
        c.that(lines, "no gradcam line printed")
        c.that(all("top leads" not in ln and "no lead ranking" in ln for ln in lines), f"gradcam line: {lines}")
        rep = json.loads((out / "report.json").read_text())
        rec = rep["records"][0]["methods"]
        gc = next((v for k, v in rec.items() if k.startswith("gradcam")), {})
        c.that(gc.get("per_lead", {}).get("ranks_leads") is False, "report.json gradcam ranks_leads is not false")
        sal = [ln for ln in p.out.splitlines() if ln.strip().startswith("saliency")]
        c.that(sal and "top leads" in sal[0], "saliency (per-lead) lost its top leads")
    return c.result("correct", p)


@fault("explain_counterfactual_ends", 7, "correct",
       "explain.py counterfactual: the change is not concentrated at the first / last 0.5 s of the record")
def _explain_cf(tmp: Path, shared: Shared) -> Outcome:
    import torch

    out, p = _explained(shared)
    c = Check()
    if p.rc == 0:
        rep = json.loads((out / "report.json").read_text())
        rec = rep["records"][0]
        cf = rec.get("counterfactual") or {}
        opts = dict(cf.get("options") or {})
        c.that(opts.get("edge_s", 0) > 0, f"counterfactual options hold no end margin: {opts}")
        # recompute the change with the run's own classifier, record and options, and measure where it sits
        from ecgfm.data.synthetic import SyntheticSource
        from ecgfm.explain.counterfactual import counterfactual
        from ecgfm.explain.report import load_model

        with LIB:
            wrapper = load_model(out / "demo_classifier")
            record = SyntheticSource(4, seed=0, fs=500.0, duration=10.0).load(str(rec["record_id"]))
            x = wrapper.prepare(record, missing_leads="zero")
            kw = {k: v for k, v in opts.items() if k in ("lambda_prox", "lambda_smooth", "lr", "max_steps",
                                                           "edge_s", "ramp_s")}
            torch.manual_seed(0)
            res = counterfactual(wrapper, x.float(), target=cf["records"][0]["target"], **kw)
        mag = res.delta.abs()[0].sum(0)
        k = int(0.5 * wrapper.fs)
        ends = float(mag[:k].sum() + mag[-k:].sum()) / max(float(mag.sum()), 1e-12)
        span = 2 * k / mag.numel()
        c.that(ends <= span, f"{ends:.1%} of the change sits in the first/last 0.5 s ({span:.0%} of the record)")
        l1 = cf["records"][0].get("l1")
        c.note(f"recomputed change l1 {float(res.l1[0]):.3g} (explain.py: {l1:.3g})" if l1 is not None else "")
        c.note(f"{ends:.1%} of |change| in the first/last 0.5 s")
    return c.result("correct", p)


# ---------------------------------------------------------------------------- 8. prepare without out=
@fault("prepare_without_out", 8, "error/recover",
       "prepare.py without out= (run from a scratch folder): a clear error, or a default under the cache root")
def _prepare_no_out(tmp: Path, shared: Shared) -> Outcome:
    cwd = tmp / "cwd"
    cwd.mkdir()
    p = run("prepare.py", "sources=[synthetic]", "synthetic.n_records=2", "synthetic.duration=3.0", "workers=0",
            "progress=false", cwd=cwd)
    odd = [str(d.relative_to(cwd)) for d in cwd.rglob("*") if "???" in d.name]
    if p.rc == 0:   # the issue allows a default under the cache root instead of an error
        c = Check()
        c.that(not odd, f"created {odd}")
        made = sorted({m.parent for m in cwd.rglob("manifest.json")})
        c.that(made and all(m.is_relative_to(cwd / "cache") for m in made),
               f"no cache under <cwd>/cache (caches: {[str(m) for m in made]})")
        c.that(any(str(m) in p.text for m in made), "the output does not say where the cache went")
        return c.result("recover", p)
    c = Check()
    c.that(not odd, f"created {odd}")
    return expect_error(p, r"\bout\b", extra=c)


# ---------------------------------------------------------------------------- 9. checkpoints
@fault("ckpt_truncated_last", 9, "recover",
       "last.ckpt truncated to half; train.py into the same folder resumes from the newest one that loads")
def _ckpt_truncated(tmp: Path, shared: Shared) -> Outcome:
    out = tmp / "run"
    shutil.copytree(trained_run(shared), out)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    p = run("train.py", *TINY_TRAIN, *TINY_SYNTH, "trainer.max_steps=6", "method.max_steps=8",
            f"paths.cache_root={shared.cache_root}", f"hydra.run.dir={out}")
    c = Check()
    if p.rc == 0:
        s = json.loads((out / "summary.json").read_text())
        c.that(str(s.get("resumed_from", "")).endswith("step0000004.ckpt"), f"resumed from {s.get('resumed_from')}")
        c.that(s.get("steps") == 6, f"{s.get('steps')} steps")
        c.that(re.search(r"last\.ckpt.*skip|skip.*last\.ckpt", p.text, re.I), "no log line skipping last.ckpt")
    return c.result("recover", p)


@fault("ckpt_killed_mid_run", 9, "recover",
       "train.py SIGKILLed while it writes a checkpoint every step; every *.ckpt left loads and a rerun resumes")
def _ckpt_killed(tmp: Path, shared: Shared) -> Outcome:
    import torch

    out = tmp / "run"
    over = [a for a in TINY_TRAIN if not a.startswith(("trainer.max_steps", "checkpoint.every_n_train_steps"))]
    cmd = [sys.executable, str(ROOT / "train.py"), *over, *TINY_SYNTH, "trainer.max_steps=100000",
           "method.max_steps=100000", "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=2",
           f"paths.cache_root={shared.cache_root}", f"hydra.run.dir={out}"]
    log = open(tmp / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "checkpoints").glob("step*.ckpt"))) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)          # a few more steps: the kill lands somewhere in the save / train loop
        if proc.poll() is not None:
            return Outcome("setup failed", False, f"train.py ended (exit {proc.returncode}) before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    c = Check()
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    c.that(ckpts, "no checkpoint written before the kill")
    for ck in ckpts:
        try:
            state = torch.load(ck, map_location="cpu", weights_only=True)
            c.that("state_dict" in state and "global_step" in state, f"{ck.name}: not a whole checkpoint")
        except Exception as exc:  # noqa: BLE001
            c.that(False, f"{ck.name} does not load: {type(exc).__name__}: {str(exc)[:80]}")
    if c.failures:
        return c.result("recover")
    p = run("train.py", *TINY_TRAIN, *TINY_SYNTH, "trainer.max_steps=1", "method.max_steps=100000",
            f"paths.cache_root={shared.cache_root}", f"hydra.run.dir={out}")
    if p.rc == 0:
        s = json.loads((out / "summary.json").read_text())
        c.that(s.get("resumed_from"), "the rerun did not resume")
        c.note(f"{len(ckpts)} checkpoint(s) after the kill, all whole; resumed from "
               f"{Path(str(s.get('resumed_from'))).name}")
    return c.result("recover", p)


@fault("ckpt_deleted_no_overwrite", 9, "error",
       "every checkpoint of a finished run deleted; train.py into the same folder refuses to overwrite the encoder")
def _ckpt_deleted(tmp: Path, shared: Shared) -> Outcome:
    out = tmp / "run"
    shutil.copytree(trained_run(shared), out)
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    enc = out / "encoder" / "encoder.safetensors"
    before = file_digest(enc)
    p = run("train.py", *TINY_TRAIN, *TINY_SYNTH, "method.max_steps=8", f"paths.cache_root={shared.cache_root}",
            f"hydra.run.dir={out}")
    c = Check()
    c.that(enc.exists() and file_digest(enc) == before, "the exported encoder was overwritten")
    return expect_error(p, "overwrite=true", extra=c)


# ---------------------------------------------------------------------------- 10. derived files
@fault("features_truncated_npz", 10, "recover", "a probe's feature .npz truncated; probe.py recomputes it")
def _features_truncated(tmp: Path, shared: Shared) -> Outcome:
    root = tmp / "cache"
    shutil.copytree(probed_task(shared), root)
    (npz,) = list((root / "features").glob("*.npz"))
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    p = run("probe.py", *TINY_PROBE, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}",
            f"results_dir={tmp / 'results'}", f"hydra.run.dir={tmp / 'h'}")
    c = Check()
    if p.rc == 0:
        c.that(re.search(rf"feature cache .*{re.escape(npz.name)}.*recomputing", p.text), "no 'recomputing' log line")
        c.that(npz.exists() and npz.stat().st_size > 0, "feature file not rewritten")
        c.that(list((tmp / "results" / "cells").rglob("*.json")), "no cell written")
    return c.result("recover", p)


@fault("tokens_truncated_file", 10, "recover",
       "the attention probe's memory-mapped token file truncated; probe.py detects it and recomputes the tokens")
def _tokens_truncated(tmp: Path, shared: Shared) -> Outcome:
    root = tmp / "cache"
    shutil.copytree(probed_task(shared), root)
    attention = ("probe.mode=attention", "probe.attention.epochs=2", "probe.attention.lrs=[0.001]")

    def probe(results: str) -> Proc:
        return run("probe.py", *TINY_PROBE, *attention, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}",
                   f"results_dir={tmp / results}", f"hydra.run.dir={tmp / ('h' + results)}")

    # setup (in this process): the attention probe that writes the token file the checked probe.py run meets
    first = in_process("probe.py", *TINY_PROBE, *attention, "checkpoint=random:resnet1d_test",
                       f"paths.cache_root={root}", f"results_dir={tmp / 'r1'}")
    if first.rc != 0:
        return Outcome("setup failed", False, first.tail())
    (tok,) = list((root / "features").glob("*.tokens"))
    size = tok.stat().st_size
    tok.write_bytes(tok.read_bytes()[: size // 2])
    p = probe("r2")
    c = Check()
    if p.rc == 0:
        c.that(re.search(r"token cache .*recomputing", p.text) and tok.name in p.text,
               "no 'recomputing' log line naming the token file")
        again = list((root / "features").glob("*.tokens"))
        c.that(len(again) == 1 and again[0].stat().st_size == size, "token file not rewritten at its full size")
        c.that(list((tmp / "r2" / "cells").rglob("*.json")), "no cell written")
    return c.result("recover", p)


@fault("cache_index_missing", 10, "recover",
       "records.npy deleted and index.jsonl truncated in a task cache; probe.py rebuilds them")
def _cache_index(tmp: Path, shared: Shared) -> Outcome:
    root = tmp / "cache"
    shutil.copytree(probed_task(shared), root)
    (cache,) = [d for d in root.iterdir() if d.name.startswith("synthetic-")]
    shutil.rmtree(root / "features")       # the frozen pass must read the cache again
    (cache / "records.npy").unlink()
    idx = cache / "index.jsonl"
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    p = run("probe.py", *TINY_PROBE, "checkpoint=random:resnet1d_test", f"paths.cache_root={root}",
            f"results_dir={tmp / 'results'}", f"hydra.run.dir={tmp / 'h'}")
    c = Check()
    if p.rc == 0:
        c.that(re.search(r"records\.npy.*rebuilt|rebuilt.*records\.npy|records\.npy.*rebuilding", p.text),
               "no log line about rebuilding records.npy")
        c.that(re.search(r"index\.jsonl.*rebuil|rebuil.*index\.jsonl", p.text),
               "no log line about rebuilding index.jsonl")
        c.that((cache / "records.npy").exists(), "records.npy not rebuilt")
    return c.result("recover", p)


# ---------------------------------------------------------------------------- 11. encoder.json arguments
@fault("encoder_huge_args", 11, "error",
       "encoder.json init_args edited to embed_dim=200000 (a 480 GB model); probe.py refuses with little memory")
def _encoder_huge(tmp: Path, shared: Shared) -> Outcome:
    enc = tmp / "encoder"
    shutil.copytree(trained_run(shared) / "encoder", enc)
    meta_path = enc / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["architecture"]["init_args"]["embed_dim"] = 200_000
    meta_path.write_text(json.dumps(meta, indent=2))
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(f'FAULT_BATTERY_MAXRSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', "
               "file=sys.stderr); sys.exit(r.returncode)")
    t0 = time.time()
    cmd = [sys.executable, "-c", wrapper, sys.executable, str(ROOT / "probe.py"), *TINY_PROBE, f"checkpoint={enc}",
           f"results_dir={tmp / 'r'}", f"paths.cache_root={tmp / 'cache'}", f"hydra.run.dir={tmp / 'h'}"]
    try:
        sp = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env(),
                            errors="replace")
        p = Proc(cmd, sp.returncode, sp.stdout, sp.stderr, time.time() - t0)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", False, "probe.py did not finish")
    m = re.search(r"FAULT_BATTERY_MAXRSS_KB=(\d+)", p.err)
    rss_mb = int(m.group(1)) / 1024 if m else float("nan")
    p.err = re.sub(r"FAULT_BATTERY_MAXRSS_KB=\d+\n?", "", p.err)
    c = Check()
    c.that(rss_mb < 2048, f"peak memory {rss_mb:.0f} MiB")
    o = expect_error(p, r"do not fit|mismatch|cannot build", r"embed_dim|200000", extra=c)
    o.detail += f" (peak {rss_mb:.0f} MiB)"
    return o


# ---------------------------------------------------------------------------- 12. workers and a killed parent
def _kill_parent_and_watch(cmd: list[str], cwd: Path, n_kids: int, extra_env: dict | None = None,
                           wait_s: float = 150.0) -> Outcome:
    import psutil

    log = open(cwd / "child.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**env(), **(extra_env or {})},
                            start_new_session=True)
    kids: list = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + wait_s
        while time.time() < deadline and proc.poll() is None:
            try:
                kids = [k for k in parent.children(recursive=True)
                        if "resource_tracker" not in " ".join(k.cmdline())]
            except psutil.Error:
                kids = []
            if len(kids) >= n_kids:
                break
            time.sleep(0.3)
        if len(kids) < n_kids:
            log.close()
            tail = " | ".join((cwd / "child.log").read_text(errors="replace").strip().splitlines()[-3:])
            return Outcome("setup failed", False, f"{len(kids)} worker(s) seen (exit {proc.poll()}): {tail}")
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # 15 s: torch's DataLoader workers look for their parent every 5 s (and fresh interpreters may still be
        # importing), so a 5 s wait raced them; 2-3 s were seen on a busy 2-core machine
        gone, alive = psutil.wait_procs(kids, timeout=WORKER_EXIT_S)
        if alive:
            return Outcome("workers alive", False, f"{len(alive)} of {len(kids)} worker(s) still running "
                                                   f"{WORKER_EXIT_S:g} s after the parent was killed")
        return Outcome("correct", True, f"{len(kids)} worker(s) exited with their parent")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for k in kids:           # only the workers this row started
            try:
                if k.is_running():
                    k.kill()
            except Exception:  # noqa: BLE001
                pass
        log.close()


@fault("workers_exit_train", 12, "correct", "train.py with 2 loader workers SIGKILLed: its workers exit")
def _workers_train(tmp: Path, shared: Shared) -> Outcome:
    cache = synthetic_cache(tmp / "syn")
    over = [a for a in TINY_TRAIN if not a.startswith(("data.num_workers", "trainer.max_steps"))]
    cmd = [sys.executable, str(ROOT / "train.py"), *over, "data=cached", f"data.cache_dirs=[{cache}]",
           "data.num_workers=2", "trainer.max_steps=100000", "checkpoint.every_n_train_steps=100000",
           "data.val_fraction=0.0", f"hydra.run.dir={tmp / 'run'}"]
    return _kill_parent_and_watch(cmd, tmp, 2)


@fault("workers_exit_prepare", 12, "correct", "prepare.py workers=2 SIGKILLed mid-conversion: its workers exit")
def _workers_prepare(tmp: Path, shared: Shared) -> Outcome:
    cmd = [sys.executable, str(ROOT / "prepare.py"), "sources=[synthetic]", "synthetic.n_records=64",
           "synthetic.duration=2.5", "synthetic.fs=100.0", "spec.fs=100", "shard_records=4", "workers=2",
           "progress=false", f"out={tmp / 'p'}"]
    return _kill_parent_and_watch(cmd, tmp, 2, {"ECGFM_PREPARE_RECORD_DELAY": "0.5"})


# ---------------------------------------------------------------------------- 13. messages
@fault("prepare_bad_fs", 13, "error", "prepare.py spec.fs=abc")
def _prepare_fs(tmp: Path, shared: Shared) -> Outcome:
    p = run("prepare.py", "sources=[synthetic]", f"out={tmp / 'c'}", "spec.fs=abc", "workers=0")
    return expect_error(p, r"spec\.fs")


@fault("resume_text_file", 13, "error", "train.py resume=<a text file>")
def _resume_text(tmp: Path, shared: Shared) -> Outcome:
    note = tmp / "notes.txt"
    note.write_text("not a checkpoint\n")
    p = run("train.py", *TINY_TRAIN, *TINY_SYNTH, f"paths.cache_root={shared.cache_root}", f"resume={note}",
            f"hydra.run.dir={tmp / 'run'}")
    return expect_error(p, "resume", "not a checkpoint", forbid=("weights_only",))


@fault("explain_encoder_folder", 13, "error", "explain.py checkpoint=<an encoder folder>")
def _explain_encoder(tmp: Path, shared: Shared) -> Outcome:
    enc = toy_encoder(tmp / "run" / "encoder", seed=0)
    p = run("explain.py", f"checkpoint={enc}", "data.params.n_records=2", "faithfulness.enabled=false",
            "formats=[png]", f"paths.cache_root={tmp / 'cache'}", f"hydra.run.dir={tmp / 'explain'}")
    return expect_error(p, "this is an encoder", r"finetune\.py checkpoint=")


# ================================================================================================ the runner
@dataclass
class Row:
    fault: str
    item: int
    expected: str
    observed: str
    passed: bool
    seconds: float
    what: str
    detail: str = ""


def run_fault(f: Fault, base: Path, shared: Shared) -> Row:
    tmp = base / f.name
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        o = f.fn(tmp, shared)
    except Exception as exc:  # noqa: BLE001 - a battery bug or a missing feature: the row fails, the rest runs
        o = Outcome("battery error", False, f"{type(exc).__name__}: {exc}")
    passed = o.ok and o.observed in f.expected.split("/")
    return Row(f.name, f.item, f.expected, o.observed, passed, round(time.time() - t0, 1), f.what, o.detail)


def table(rows: list[Row], details: bool = True) -> str:
    head = ("fault", "item", "expected", "observed", "pass", "s")
    body = [(r.fault, str(r.item), r.expected, r.observed, "PASS" if r.passed else "FAIL", f"{r.seconds:.0f}")
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
    if details:
        failed = [r for r in rows if not r.passed]
        if failed:
            lines.append("")
            lines += [f"FAIL {r.fault}: {r.detail}" for r in failed]
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    out = ["| fault | item | injected | expected | observed | pass |", "|---|---|---|---|---|---|"]
    out += [f"| `{r.fault}` | {r.item} | {r.what} | {r.expected} | {r.observed} | {'yes' if r.passed else 'NO'} |"
            for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this row (repeatable; a prefix such as 'wfdb_' selects several)")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--json", metavar="PATH", help="also write the rows (with details) as JSON")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown (docs/RELIABILITY.md)")
    ap.add_argument("--jobs", type=int, default=2, help="rows run at once (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = ap.parse_args(argv)

    if args.list:
        for f in FAULTS:
            print(f"{f.name:28s} item {f.item:2d}  {f.expected:8s} {f.what}")
        return 0
    selected = FAULTS
    if args.only:
        selected = [f for f in FAULTS if any(f.name == o or f.name.startswith(o) for o in args.only)]
        unknown = [o for o in args.only if not any(f.name == o or f.name.startswith(o) for f in FAULTS)]
        if unknown:
            print(f"error: unknown fault(s) {unknown}; see --list", file=sys.stderr)
            return 2
    if not FIXTURE.exists():
        print(f"error: the fixture records are missing: {FIXTURE}", file=sys.stderr)
        return 2
    # the rows build data with the library in threads: import it once here (concurrent first imports can see a
    # half-initialised module, e.g. an empty backbone registry)
    import ecgfm.backbones  # noqa: F401
    import ecgfm.data.cache  # noqa: F401
    import ecgfm.data.synthetic  # noqa: F401
    import ecgfm.explain.counterfactual  # noqa: F401
    import ecgfm.explain.report  # noqa: F401
    import ecgfm.export  # noqa: F401
    import torch

    torch.set_num_threads(1)

    base = Path(tempfile.mkdtemp(prefix="ecgfm-faults-"))
    shared = Shared(base)
    t0 = time.time()
    rows: dict[str, Row] = {}
    console = sys.stdout        # in_process redirects sys.stdout / stderr for a moment in a row's thread
    print(f"fault battery: {len(selected)} row(s), {args.jobs} at a time, in {base}", flush=True)
    try:
        with futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = {pool.submit(run_fault, f, base, shared): f for f in selected}
            for job in futures.as_completed(jobs):
                r = job.result()
                rows[r.fault] = r
                print(f"  {'PASS' if r.passed else 'FAIL'}  {r.fault} ({r.seconds:.0f} s): {r.observed}", flush=True,
                      file=console)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    ordered = [rows[f.name] for f in selected]
    total = time.time() - t0
    print()
    print(table(ordered))
    n_pass = sum(r.passed for r in ordered)
    print(f"\n{n_pass}/{len(ordered)} rows pass in {total:.0f} s" + (f"; kept {base}" if args.keep else ""))
    if args.markdown:
        print()
        print(markdown(ordered))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": round(total, 1), "passed": n_pass, "rows": len(ordered),
                                               "table": [asdict(r) for r in ordered]}, indent=2))
    return 0 if n_pass == len(ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
