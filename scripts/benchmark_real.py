"""The acceptance benchmark on the shared real data, in one command (driven by scripts/benchmark_real.sh).

Stages (each one skips what is already done, so an interrupted run resumes):

1. **pool**: the shared unlabelled pretraining pool = PTB-XL at 100 Hz (all 1,999 records) + CinC 2017, *minus the
   downstream validation and test records* (PTB-XL ``strat_fold`` 9 and 10; the CinC 2017 validation / test sides
   of the ``cinc2017`` task's stratified split), + CPSC 2018 / CPSC 2021 / MIT-BIH (``pool_other``, no downstream
   task): the pool of ``data=pretrain_pool_heldout_free``. Without that exclusion the leakage guard rejects every
   encoder (``conf/data/pretrain_pool.yaml`` holds every record). Written as caches with
   :class:`ecgfm.evaluate.tasks.ExcludingSource`; every recipe trains on them (``data=cached``).
2. **pretrain**: ``train.py +experiment=<recipe> data=cached data.cache_dirs=[pool caches]`` for MAE, SimCLR,
   CLOCS, the hybrid (CREMA), SimCLR on the 1-D ResNet (``simclr_cnn``) and the same with the handcrafted pretext
   regression (``simclr_cnn_hc``, ``method.aux_targets=handcrafted``; ``simclr_cnn_hc_s1``: the same recipe with
   pretraining seed 1; ``simclr_cnn_hcc``: crop-level rhythm targets, ``aux_targets=handcrafted_crop``;
   ``simclr_cnn_hc1l``: one-lead views of multi-lead records, ``method.p_one_lead=0.5``;
   ``--embed-dim`` / ``--depth`` / ``--heads`` are ViT sizes and refused for both). A finished run in ``--out``
   is reused only for the same recipe and the same composed config (experiment, method, backbone, data and
   train.yaml files as they are now); a record written before that hash existed is checked by its older rule (the
   experiment files only), with a log line, rather than retraining every encoder. Recipe: without ``--steps``, the
   CPU-budget recipe ``conf/experiment/<method>_cpu30.yaml`` when it exists (its own steps, checkpoint interval,
   crop and backbone), else ``+experiment=<method>`` for 300 steps; ``--steps N``: ``+experiment=<method>`` for
   ``N`` steps (checkpoint every ``N // 4``). Every periodic checkpoint is kept (``checkpoint.save_top_k=-1``, for
   the learning curve). The wall time and CPU time (train.py and its child processes) of each method are printed
   and written to ``pretrain/<method>/pretrain_time.json``: an interrupted run's legs are each recorded
   (``pretrain_legs.json``) and summed when a rerun resumes it (``time_scope``; :func:`pretrain_leg_times`).
3. **curve**: the learning curve: every intermediate checkpoint of each method's run
   (``pretrain/<method>/checkpoints/step<N>.ckpt``, plus the final encoder) exported to
   ``pretrain/<method>/curve/step<N>/encoder`` and linear-probed on the tasks (fraction 1, seed 0; validation and
   test macro AUROC) into ``<out>/curve/results``; ``<out>/curve/learning_curve.{png,md}``, copied to
   ``docs/benchmark/`` by the report of the same command, or by this stage when it runs without one, under the
   report's docs check (below).
4. **probe**: ``probe.py -m checkpoint=<encoders>,random:<encoder of each architecture>,handcrafted
   task=ptbxl_super,cinc2017 fraction=0.1,1 seed=0,1,2`` (linear probe, one frozen pass per checkpoint and corpus;
   ``handcrafted`` = the RR / HRV + morphology feature baseline).
5. **finetune**: ``finetune.py -m checkpoint=<encoders>,random:<...>,supervised:<first encoder>
   task=ptbxl_super,cinc2017 'fraction=[0.1,1]' 'seed=[0,1,2]'`` and the strong supervised CNN
   (``supervised:resnet1d_tiny`` by default; ``--xresnet xresnet1d50`` for the full-size one) on every task, with
   the encoders' window (``window_seconds`` = their pretraining crop) and the fine-tunes' record aggregation
   (``supervised.window_aggregate`` = ``finetune.window_aggregate``).
6. **report**: results.csv / results.md (acceptance block, paired comparisons with the random-init twin, the
   handcrafted baseline and the supervised CNN, pretraining wall times) / results.png / comparisons*.csv in
   ``<out>/results`` and a copy in ``docs/benchmark/real_*``, the learning curve and the generated block of
   ``docs/BENCHMARK.md``.

Docs check: the copies in ``--docs`` (and the generated block of the ``BENCHMARK.md`` beside it) are replaced only
when the run's tables hold every row they show: results rows (label, method, backbone, mode, task, fraction, seed),
pretraining wall-time rows (method) and learning-curve rows (task, method, step). A partial run (``--methods mae``,
a checkout holding some cells) leaves them as they are, names the rows it would drop and keeps its own copies in
``<out>``; ``--replace-docs`` replaces them anyway.

Knobs (command-line flags): ``--steps`` pretraining steps per method, ``--recipe``, ``--ft-epochs``,
``--cnn-epochs``, ``--seeds``, ``--fractions``, ``--methods``, ``--threads``, ``--embed-dim`` / ``--depth`` /
``--heads`` / ``--batch-size`` (default: the recipe's; 64 / 3 / 4 / 64 with the plain ``+experiment=<method>``
recipe), ``--xresnet``, ``--no-handcrafted``, ``--docs``,
``--stages``, ``--train-overrides`` / ``--eval-overrides`` / ``--probe-overrides`` / ``--finetune-overrides`` (extra
Hydra overrides of train.py / probe.py and finetune.py / probe.py / finetune.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
#: benchmark method -> conf/experiment name
EXPERIMENTS = {"mae": "mae", "simclr": "simclr", "clocs": "clocs", "hybrid": "crema", "simclr_cnn": "simclr_cnn",
               "simclr_cnn_hc": "simclr_cnn_hc", "simclr_cnn_hc_s1": "simclr_cnn_hc",
               "simclr_cnn_hcc": "simclr_cnn_hcc", "simclr_cnn_hc1l": "simclr_cnn_hc1l"}
#: train.py overrides of a benchmark method beyond its experiment: a second pretraining seed of one recipe (its
#: rows are labelled by checkpoint, ``<method>@<hash>``, beside the first seed's)
METHOD_OVERRIDES = {"simclr_cnn_hc_s1": ["seed=1"]}
#: suffix of the CPU-budget recipes (conf/experiment/<experiment>_cpu30.yaml)
CPU_RECIPE_SUFFIX = "_cpu30"
DEFAULT_STEPS = 300
#: today's sizes of the plain +experiment=<method> recipe (the CPU-budget recipe brings its own)
BASE_SIZES = {"embed_dim": 64, "depth": 3, "heads": 4, "batch_size": 64}
STAGES = ["pool", "pretrain", "curve", "probe", "finetune", "report"]
#: fewer checkpoints than this on a learning curve are called out in its table
MIN_CURVE_POINTS = 4
CURVE_FRACTION, CURVE_SEED = "1", "0"


def log(msg: str) -> None:
    print(f"[benchmark_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd`` in the project root; returns its wall time in seconds."""
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    log(f"  done in {wall:.0f} s")
    return wall


def stage_pool(args: argparse.Namespace) -> list[str]:
    """Pool caches without the downstream validation / test records.

    The same pool as ``train.py data=pretrain_pool_heldout_free`` (both go through
    :func:`ecgfm.evaluate.tasks.heldout_free_source`); the cache folders are keyed by the excluded set, so an
    unchanged split reuses them.
    """
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.readers import CinC2017Source, CPSC2018Source, CPSC2021Source, MITBIHSource, PTBXLSource
    from ecgfm.evaluate.tasks import heldout_free_source
    from ecgfm.data.prepare import prepare_cache

    spec = PreprocessSpec()  # conf/train.yaml's preprocessing (the encoders export it; tasks reuse it)
    data_root = Path(args.data_root)
    pools = []
    for name, source in (("pool_ptbxl", PTBXLSource(data_root / "ptbxl", fs=100, include_unlabelled=True)),
                         ("pool_cinc2017", CinC2017Source(data_root / "cinc2017"))):
        # the validation / test records of every task evaluated (--tasks, and always both benchmark tasks), every
        # PTB-XL record of strat_fold 9 / 10, and the records whose signal is a near-copy of one of those
        held = sorted({"ptbxl_super", "cinc2017", *args.tasks})
        src = heldout_free_source(source, held, parts=("val", "test"),
                                  data_root=str(data_root), cache_root=args.cache_root, preprocess=spec,
                                  exclude_ptbxl_folds=(9, 10), workers=args.workers, progress=True)
        pools.append(prepare_cache([src], args.cache_root, spec, name=name, workers=args.workers, progress=True))
        copies, n_copies = ", ".join(f"{p} ~ {e}" for e, p, _ in src.copies), len({p for _, p, _ in src.copies})
        log(f"{name}: {len(src.record_ids())} records ({len(src.exclude)} excluded: held-out val/test records"
            + (f" and {n_copies} near-cop{'y' if n_copies == 1 else 'ies'} of them by signal: {copies}"
               if copies else "")
            + f") -> {pools[-1]}")
    # the other shared corpora, none of them a downstream task (as data=pretrain_pool_heldout_free's pool_other)
    corpora = ((CPSC2018Source, "cpsc2018"), (CPSC2021Source, "cpsc2021"), (MITBIHSource, "physionet-samples"))
    other = [cls(data_root / sub) for cls, sub in corpora if (data_root / sub).is_dir()]
    missing = [sub for _, sub in corpora if not (data_root / sub).is_dir()]
    if missing:   # data=pretrain_pool_heldout_free refuses a missing root; here the pool is smaller: said so
        log(f"WARNING: pool_other leaves out {', '.join(missing)} (no such folder under {data_root}): this pool is "
            f"not the CPU recipe's (data=pretrain_pool_heldout_free)")
    if other:
        pools.append(prepare_cache(other, args.cache_root, spec, name="pool_other", workers=args.workers,
                                   progress=True))
        log(f"pool_other: {', '.join(type(s).__name__ for s in other)} -> {pools[-1]}")
    return pools


def pretrain_recipe(args: argparse.Namespace, method: str) -> tuple[str, list[str]]:
    """``(experiment name, train.py overrides)`` of ``method`` (see the module docstring).

    ``--recipe auto``: the CPU-budget recipe when ``--steps`` is not given and
    ``conf/experiment/<experiment>_cpu30.yaml`` exists, else ``+experiment=<experiment>``; ``cpu30`` / ``base``
    force one (``cpu30`` with ``--steps N`` overrides its steps).
    """
    exp = EXPERIMENTS[method]
    cpu = exp + CPU_RECIPE_SUFFIX
    has_cpu = (ROOT / "ecgfm" / "conf" / "experiment" / f"{cpu}.yaml").is_file()
    if args.recipe == "cpu30" and not has_cpu:
        raise SystemExit(f"--recipe cpu30: ecgfm/conf/experiment/{cpu}.yaml does not exist")
    use_cpu = args.recipe == "cpu30" or (args.recipe == "auto" and args.steps is None and has_cpu)
    name = cpu if use_cpu else exp
    over: list[str] = []
    sizes = {k: getattr(args, k) for k in BASE_SIZES}
    if not _vit_experiment(name):   # a CNN has no width / depth / heads of a ViT
        bad = [f"--{k.replace('_', '-')}" for k in ("embed_dim", "depth", "heads") if sizes[k] is not None]
        if bad:
            raise SystemExit(f"{' '.join(bad)}: method {method} pretrains a CNN (+experiment={name}), which has "
                             "no ViT sizes")
        sizes = {"batch_size": sizes["batch_size"]}
    if use_cpu:
        if args.steps is not None:
            over += [f"trainer.max_steps={args.steps}",
                     f"checkpoint.every_n_train_steps={max(args.steps // MIN_CURVE_POINTS, 1)}"]
    else:
        steps = DEFAULT_STEPS if args.steps is None else args.steps
        over += [f"trainer.max_steps={steps}",
                 f"checkpoint.every_n_train_steps={max(steps // MIN_CURVE_POINTS, 1)}"]
        sizes = {k: BASE_SIZES[k] if v is None else v for k, v in sizes.items()}
    names = {"embed_dim": "backbone.embed_dim", "depth": "backbone.depth", "heads": "backbone.num_heads",
             "batch_size": "data.batch_size"}
    over += [f"{names[k]}={v}" for k, v in sizes.items() if v is not None]
    return name, over + METHOD_OVERRIDES.get(method, [])


def experiment_sha256(name: str) -> str:
    """Content hash of ``conf/experiment/<name>.yaml`` and the experiment files it extends (a plain ``defaults``
    entry naming another one), so that a pretraining run of an edited recipe (other steps, lr, crop) is not
    reused as the current recipe's.

    The older reuse check (``recipe_sha256`` of a run's record): blind to the method / backbone / data /
    train.yaml files the experiment pulls in. New records carry :func:`config_sha256`; this one is kept to check
    the records written before it (:func:`stage_pretrain`)."""
    import hashlib

    from omegaconf import OmegaConf

    h = hashlib.sha256()
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop(0)
        path = ROOT / "ecgfm" / "conf" / "experiment" / f"{n}.yaml"
        if n in seen or not path.is_file():
            continue
        seen.add(n)
        h.update(n.encode() + b"\0" + path.read_bytes())
        todo += [d for d in OmegaConf.load(path).get("defaults") or [] if isinstance(d, str) and d != "_self_"]
    return h.hexdigest()[:16]


def config_sha256(name: str, overrides: Sequence[str] = ()) -> str:
    """Content hash of the config a pretraining run of ``+experiment=<name>`` composes to.

    :func:`experiment_sha256` reads the experiment files only, so an edited ``conf/method/*.yaml``,
    ``conf/backbone/*.yaml``, ``conf/train.yaml`` or ``conf/data/cached.yaml`` kept reusing the encoder trained
    before the edit. This hash composes ``train`` with Hydra's compose API as ``train.py`` does (``+experiment``,
    ``data=cached`` and ``overrides``: a ``backbone=...`` / ``method=...`` override brings its own file), so it
    covers every file the run reads and nothing else: a comment or key order edited in a YAML keeps the encoder.
    Interpolations are hashed unresolved (``${hydra:runtime.output_dir}`` or an environment variable differ between
    machines, their text does not). The run-specific arguments of the train command (output folder, cache paths,
    threads, progress bar) are left out: another ``--threads`` is the same recipe.

    Args:
        name: the ``conf/experiment`` name.
        overrides: the recipe's train.py overrides (:func:`pretrain_recipe`'s, then ``--train-overrides``).

    Returns:
        16 hex digits.
    """
    import hashlib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    # a caller inside an initialised Hydra (a test composing its own config) keeps it: compose needs its own
    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"+experiment={name}", "data=cached", *overrides])
    finally:
        gh.clear()
        if outer is not None:
            gh.initialize(outer)
    text = json.dumps(OmegaConf.to_container(cfg, resolve=False), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _vit_experiment(name: str) -> bool:
    """Whether ``conf/experiment/<name>.yaml`` pretrains a ViT-1D (its ``/backbone`` override, or that of the
    experiment it extends: a plain ``defaults`` entry naming another experiment file; a file without either, or no
    file, is taken as the default ViT)."""
    from omegaconf import OmegaConf

    path = ROOT / "ecgfm" / "conf" / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return True
    cfg = OmegaConf.load(path)
    for d in cfg.get("defaults") or []:
        if isinstance(d, str) and d not in ("_self_", name) and (path.parent / f"{d}.yaml").is_file():
            return _vit_experiment(d)
        for key, value in (d.items() if isinstance(d, dict) or OmegaConf.is_dict(d) else []):
            if str(key).endswith("backbone"):
                return str(value).startswith("vit")
    return True


def stage_pretrain(args: argparse.Namespace, pools: list[str], env: dict[str, str]) -> dict[str, str]:
    """Pretrain every method (skipping finished runs of the same recipe); prints and records each method's wall time.

    A finished run is reused only when it was trained with the recipe asked for now: experiment, its overrides,
    ``--train-overrides``, the pool and :func:`config_sha256`, the hash of the composed config (experiment, method,
    backbone, data and train.yaml files as they are now). Another ``--steps`` / size / recipe, or an edited config
    file, into the same ``--out`` is refused, naming both, instead of probing the older encoder under the new
    settings.

    Older records are checked by the rule they were written under, with a line saying so, rather than retraining
    every encoder of an existing ``--out`` (hours of CPU): a record with ``recipe_sha256`` (the experiment files
    only, :func:`experiment_sha256`) is compared on that hash, name, overrides and pool, so an edit of a method /
    backbone / train.yaml file since that run is not seen; a record with neither hash on name, overrides and pool.
    A run without a record (an encoder copied into ``pretrain/<method>``) is reused with a line saying it could
    not be checked. Records are not rewritten: a hash taken now would vouch for a config the encoder may not have
    been trained with.
    """
    encoders = {}
    times = []
    for method in args.methods:
        out = Path(args.out) / "pretrain" / method
        enc = out / "encoder"
        record = out / "pretrain_time.json"
        name, over = pretrain_recipe(args, method)
        overrides = [*over, *args.train_overrides]
        requested = {"experiment": name, "overrides": overrides, "pool": list(pools),
                     "config_sha256": config_sha256(name, overrides)}
        if (enc / "encoder.json").is_file():
            had = _read_json(record).get("requested")
            check = requested
            if had is not None and "config_sha256" not in had:
                check = {k: requested[k] for k in ("experiment", "overrides", "pool")}
                if "recipe_sha256" in had:
                    check["recipe_sha256"] = experiment_sha256(name)
                    log(f"pretrain: {method}: {record} records the older experiment-file hash (recipe_sha256), not "
                        f"the composed config's: checked by that rule (experiment files, name, overrides, pool); an "
                        f"edit of a method / backbone / data / train.yaml file since is not seen (delete {out} to "
                        f"train it again under the current check)")
                else:   # recorded before the recipe's content was hashed
                    log(f"pretrain: {method}: {enc} records no recipe content hash: checked on name, overrides and "
                        f"pool only")
            if had is None:
                log(f"pretrain: {method}: reusing {enc} (no recorded recipe to check against {requested})")
            elif had != check:
                raise SystemExit(f"error: pretrain/{method} in {args.out} was trained with {had}, but this run asks "
                                 f"for {check}: use another --out, or delete {out} to train it again")
        else:
            cmd = [PY, "train.py", f"+experiment={name}", "data=cached", f"data.cache_dirs=[{','.join(pools)}]",
                   f"hydra.run.dir={out}", f"torch_threads={args.threads}", "data.num_workers=0",
                   f"paths.cache_root={args.cache_root}", "trainer.enable_progress_bar=false",
                   "checkpoint.save_top_k=-1", *over, *args.train_overrides]
            legs_file = out / LEGS_FILE
            # whether this leg can resume (train.py resumes from a checkpoint in its folder): a leg started without
            # one begins the run afresh, and the legs before it are not part of the run (pretrain_leg_times)
            resumable = any((out / "checkpoints").glob("*.ckpt")) or any(out.glob("hpc_ckpt_*.ckpt"))
            cpu0, t0, status = _children_cpu_s(), time.perf_counter(), "failed"
            try:
                wall = run(cmd, env)
                status = "finished"
            except subprocess.CalledProcessError as err:
                status = f"exit status {err.returncode}"
                raise
            finally:   # every leg, an interrupted or failed one too: a rerun resumes it and adds its own (a rerun that
                # starts afresh leaves it out of the times: pretrain_leg_times)
                leg = {"wall_s": round(wall if status == "finished" else time.perf_counter() - t0, 1),
                       "cpu_s": round(_children_cpu_s() - cpu0, 1),     # train.py and any process it waited for
                       "status": status, "checkpoint_at_start": resumable,
                       "ended_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
                from ecgfm.io import atomic_write_json

                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(legs_file, {"legs": [*(_read_json(legs_file).get("legs") or []), leg]}, indent=2)
            summary = _read_json(out / "summary.json")
            legs = _read_json(legs_file).get("legs") or [leg]
            info = {"method": method, "experiment": name, **pretrain_leg_times(summary, legs),
                    "steps": summary.get("steps"),
                    "cpu_scope": "train.py and its child processes, user + sys "
                                 "(getrusage RUSAGE_CHILDREN before / after)",
                    "threads": args.threads, "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                    "command": " ".join(cmd[1:]), "requested": requested}
            from ecgfm.io import atomic_write_json

            atomic_write_json(record, info, indent=2)
        info = _read_json(record)
        if info:
            cpu = f", {info['cpu_s']} CPU-s" if info.get("cpu_s") is not None else ""
            times.append(f"{method}: {info.get('wall_s')} s wall{cpu} ({info.get('steps')} steps, +experiment="
                         f"{info.get('experiment')})")
        encoders[method] = str(enc)
    if times:
        log("pretraining wall time per method: " + "; ".join(times))
    return encoders


def _in_project(path: Path) -> str:
    """``path`` (absolute) relative to the project root when it is inside it, else absolute."""
    try:
        return str(path.relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


def resolve_from_caller(args: argparse.Namespace, caller: Path, in_project: Sequence[str] = (),
                        absolute: Sequence[str] = (), defaults: dict[str, Path] | None = None) -> None:
    """Make the path options of ``args`` independent of the working directory, in place, before a script that runs
    its commands (train.py, probe.py, finetune.py) in the project root changes into it (shared with
    scripts/pool_size_study.py and scripts/crop_ablation.py).

    A relative path given on the command line is taken from ``caller`` (the folder the command was started in); an
    option left ``None`` takes its entry of ``defaults`` (absolute), or stays ``None`` when it has none. The options
    named in ``in_project`` are then written relative to the project root when they are inside it (the strings
    cell folders, curve stamps and recorded pools are named from, so an existing run's cells are found again),
    else absolute; those in ``absolute`` are written absolute.

    Args:
        args: the parsed options (attribute names, e.g. ``out``, ``cache_root``).
        caller: the folder relative paths are taken from.
        in_project: options kept relative to the project root when inside it.
        absolute: options made absolute.
        defaults: absolute paths for options left ``None``.
    """
    defaults = defaults or {}
    for name in (*in_project, *absolute):
        given = getattr(args, name)
        if given is None and name not in defaults:
            continue
        path = (Path(defaults[name]) if given is None else caller / given).resolve()
        setattr(args, name, _in_project(path) if name in in_project else str(path))


#: ``pretrain/<method>/`` file listing every train.py run (leg) of the stage into that folder, finished or not
LEGS_FILE = "pretrain_legs.json"


def pretrain_leg_times(summary: dict, legs: list[dict]) -> dict:
    """The time fields of ``pretrain_time.json`` for a run whose train.py legs are ``legs`` (this stage's records,
    oldest first; the last one finished) and whose final summary is ``summary``.

    Only the legs the final run is built on are counted: a run that did not resume (``summary.resumed_from`` unset)
    is its last leg alone, and a resumed one goes back to the latest earlier leg that started without a checkpoint
    in the folder (``checkpoint_at_start`` false; legs recorded before that field are taken as part of the run).
    Legs before that, attempts the final run did not continue (e.g. a crash before the first checkpoint, then a
    fresh start), are left out of the totals and given as ``discarded_legs`` / ``discarded_wall_s`` /
    ``discarded_cpu_s``.

    ``wall_s`` / ``cpu_s``: the counted legs together (an interrupted leg's time counts: it was spent, though the
    steps after its last checkpoint were trained again); ``fit_time_s``: train.py's fit time of every leg (its
    ``fit_time_total_s``; the steps the run kept). ``*_last_leg`` give the last leg alone. ``legs``: the legs
    counted. ``time_scope`` says what the totals cover: ``"all legs"``, or ``"last leg only"`` for a resumed run
    whose earlier legs were not recorded here (run before this record existed, or by hand), whose ``steps`` count
    every leg while its times do not.
    """
    last = legs[-1]
    resumed = bool(summary.get("resumed_from"))
    start = len(legs) - 1
    if resumed:   # back to the leg that started the run: the latest earlier one that had no checkpoint to resume
        fresh = [i for i, leg in enumerate(legs[:-1]) if leg.get("checkpoint_at_start") is False]
        start = fresh[-1] if fresh else 0
    discarded, legs = legs[:start], legs[start:]
    total_fit = summary.get("fit_time_total_s")
    complete = not resumed or len(legs) > 1
    fit_all = not resumed or (complete and total_fit is not None)   # a train.py too old to write the total: no
    fit = total_fit if fit_all and total_fit is not None else summary.get("fit_time_s")
    return {"wall_s": round(sum(float(x["wall_s"]) for x in legs), 1) if complete else last["wall_s"],
            "cpu_s": round(sum(float(x["cpu_s"]) for x in legs), 1) if complete else last["cpu_s"],
            "fit_time_s": fit, "wall_s_last_leg": last["wall_s"], "cpu_s_last_leg": last["cpu_s"],
            "fit_time_s_last_leg": summary.get("fit_time_s"), "legs": len(legs), "resumed": resumed,
            "time_scope": ("all legs" if fit_all else "all legs; fit time last leg only") if complete
            else "last leg only",
            "discarded_legs": len(discarded),
            "discarded_wall_s": round(sum(float(x["wall_s"]) for x in discarded), 1),
            "discarded_cpu_s": round(sum(float(x["cpu_s"]) for x in discarded), 1)}


def pretrain_time_scope(info: dict, summary: dict) -> str:
    """What a ``pretrain_time.json`` record's times cover: its ``time_scope``, or for a record written before that
    field (one train.py run timed), ``"last leg only"`` when the run's ``summary.json`` says it resumed."""
    if info.get("time_scope"):
        return str(info["time_scope"])
    return "last leg only" if summary.get("resumed_from") else "all legs"


def _children_cpu_s() -> float:
    """User + system CPU seconds of every child process this process has waited for so far (a subprocess's CPU is
    the difference of two calls around it; its own children count once it has waited for them)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def eval_overrides(args: argparse.Namespace, results_dir: Path | None = None) -> list[str]:
    """Overrides shared by the probe.py / finetune.py commands (their Hydra logs go under ``<out>/logs``, not the
    project's ``outputs/``: a benchmark keeps its logs beside its results, and two benchmarks started in one
    second in one checkout do not write one ``outputs/multirun/<tool>/<time>`` folder)."""
    return [f"results_dir={results_dir or Path(args.out) / 'results'}", f"paths.output_root={Path(args.out) / 'logs'}",
            f"paths.cache_root={args.cache_root}",
            f"paths.data_root={args.data_root}", f"bootstrap.n={args.bootstrap}", f"prepare_workers={args.workers}",
            f"torch_threads={args.threads}", *args.eval_overrides]


def random_twins(encoders: list[str]) -> list[str]:
    """``random:<encoder>`` for the first encoder of each distinct architecture and input (backbone name and
    arguments, input window / rate / leads, preprocessing): the report pairs an encoder with the twin of the same
    recipe, so two encoders of one architecture but another crop or preprocessing each need their own."""
    from ecgfm.evaluate.sweep import encoder_meta

    seen: dict[str, str] = {}
    for enc in encoders:
        try:
            meta = encoder_meta(enc)
            arch = json.dumps([meta["name"], meta["init_args"], meta.get("input"), meta.get("preprocess")],
                              sort_keys=True, default=str)
        except (OSError, ValueError):   # not exported yet: one twin per folder
            arch = enc
        seen.setdefault(arch, enc)
    return [f"random:{e}" for e in seen.values()]


def encoder_window_seconds(encoder: str) -> float | None:
    """The pretraining crop of an exported encoder in seconds (None when it does not say)."""
    from ecgfm.evaluate.sweep import encoder_meta

    try:
        info = encoder_meta(encoder)
    except Exception:  # noqa: BLE001 - a missing / unreadable export: the tasks' crop is used instead
        return None
    extra = info.get("extra") or {}
    if extra.get("crop_seconds"):
        return float(extra["crop_seconds"])
    if extra.get("crop_samples") and extra.get("fs"):
        return float(extra["crop_samples"]) / float(extra["fs"])
    return None


def finetune_budget(epochs: int) -> list[str]:
    """The fine-tuning budget overrides for ``epochs`` epochs: patience half of them (at least 2), warmup 1 epoch
    below 10 epochs and 2 from 10 on. The SSL / twin rows take ``--ft-epochs`` and the CNN baseline ``--cnn-epochs``
    (default ``--ft-epochs``), each with its own patience and warmup: a user override after them still wins."""
    return [f"finetune.epochs={epochs}", f"finetune.patience={max(2, epochs // 2)}",
            f"finetune.warmup_epochs={1 if epochs < 10 else 2}"]


def finetune_aggregate(overrides: Sequence[str] = ()) -> str:
    """The record aggregation of the encoder fine-tunes: the last ``finetune.window_aggregate=`` of ``overrides``
    (the user's --eval-overrides / --finetune-overrides), else conf/finetune.yaml's, so the supervised baselines
    aggregate as the fine-tunes they are compared with do."""
    from omegaconf import OmegaConf

    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("finetune.window_aggregate=")]
    if given:
        return given[-1]
    return str(OmegaConf.load(ROOT / "ecgfm" / "conf" / "finetune.yaml").finetune.window_aggregate)


# ------------------------------------------------------------------------------------------------ learning curve
_STEP_CKPT = re.compile(r"^step(\d+)(?:-v(\d+))?\.ckpt$")
_CURVE_DIR = re.compile(r"step(\d+)$")


def curve_sources(run_dir: Path) -> dict[int, Path]:
    """``{step: source}`` of a pretraining run: its periodic ``checkpoints/step<N>.ckpt`` and the final exported
    ``encoder`` (at ``extra.steps``, which wins over a checkpoint of the same step)."""
    out: dict[int, Path] = {}
    found = []
    for p in (run_dir / "checkpoints").glob("step*.ckpt"):
        m = _STEP_CKPT.match(p.name)
        if m and int(m.group(1)) > 0:
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    for step, _version, p in sorted(found):   # Lightning's step<N>-v1.ckpt is the newer file of a step: it wins
        out[step] = p
    from ecgfm.evaluate.sweep import encoder_meta

    steps = (encoder_meta(run_dir / "encoder").get("extra") or {}).get("steps")
    if steps:
        out[int(steps)] = run_dir / "encoder"
    return out


def _source_stamp(source: Path) -> str:
    """Which file a curve point was exported from: path, size and modification time of the checkpoint (or of the
    final export's weights), so that a retrained run's points are exported anew, not reused."""
    f = source / "encoder.safetensors" if source.is_dir() else source
    st = f.stat()
    return f"{f}|{st.st_size}|{st.st_mtime_ns}"


def export_curve_point(source: Path, final_encoder: Path, dest: Path, step: int) -> Path:
    """Export the encoder of ``source`` (a Lightning checkpoint, or the final export folder, copied) into ``dest``
    with the final export's preprocessing and provenance (``extra``: crop, rate, method, ``pretrain_caches`` for
    the leakage guard) and ``steps = step``. Skipped when ``dest`` is already the export of this very source file
    (``curve_stamp``); a point of an older run (retrained since) is exported again."""
    from ecgfm.evaluate.sweep import encoder_meta

    stamp = _source_stamp(source)
    if (dest / "encoder.json").is_file():
        if (encoder_meta(dest).get("extra") or {}).get("curve_stamp") == stamp:
            return dest
        log(f"curve: {dest} was exported from another file than {source} (an older run): exported again")
        shutil.rmtree(dest)
    from ecgfm.export import backbone_from_lightning_checkpoint, export_encoder, load_encoder

    _, spec, info = load_encoder(final_encoder)
    backbone = load_encoder(source)[0] if source.is_dir() else backbone_from_lightning_checkpoint(source)[0]
    extra = dict(info.get("extra") or {})
    extra.update(steps=int(step), curve_checkpoint=str(source), curve_stamp=stamp)
    return export_encoder(backbone, dest, spec, extra=extra)


def curve_encoders(args: argparse.Namespace) -> dict[str, dict[int, str]]:
    """Export every learning-curve point of every method (``pretrain/<method>/curve/step<N>/encoder``);
    ``{method: {step: export folder}}``."""
    out: dict[str, dict[int, str]] = {}
    for method in args.methods:
        run_dir = Path(args.out) / "pretrain" / method
        final = run_dir / "encoder"
        if not (final / "encoder.json").is_file():
            log(f"curve: {method}: no finished pretraining run in {run_dir}: skipped")
            continue
        points = {}
        for step, src in sorted(curve_sources(run_dir).items()):
            dest = run_dir / "curve" / f"step{step}" / "encoder"
            dest.parent.mkdir(parents=True, exist_ok=True)
            points[step] = str(export_curve_point(src, final, dest, step))
        if len(points) < MIN_CURVE_POINTS:
            log(f"curve: {method}: only {len(points)} checkpoint(s) saved ({sorted(points)}); a curve wants >= "
                f"{MIN_CURVE_POINTS} (checkpoint.every_n_train_steps <= max_steps / {MIN_CURVE_POINTS}, "
                f"checkpoint.save_top_k=-1)")
        out[method] = points
    return out


def stage_curve(args: argparse.Namespace, env: dict[str, str]) -> dict[str, dict[int, str]]:
    """Export the curve points and linear-probe them (fraction 1, seed 0) into ``<out>/curve/results``."""
    points = curve_encoders(args)
    ckpts = [p for per in points.values() for p in per.values()]
    if ckpts:
        run([PY, "probe.py", "-m", f"checkpoint={','.join(ckpts)}", f"task={','.join(args.tasks)}",
             f"fraction={CURVE_FRACTION}", f"seed={CURVE_SEED}", "report=never",
             *eval_overrides(args, Path(args.out) / "curve" / "results"), *args.probe_overrides], env)
    if "report" in args.stages:
        # the report of this very invocation copies the curve into --docs together with the tables, under one
        # check: copying it here first would leave a new curve beside old tables when that check keeps the docs
        curve_outputs(args)
    else:
        curve_report(args)
    return points


def curve_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (method, step, task) probed: validation and test macro AUROC (test with its 95 % CI)."""
    from ecgfm.evaluate.report import load_cells

    res = Path(args.out) / "curve" / "results"
    if not (res / "cells").is_dir():
        return []
    where: dict[str, tuple[str, int]] = {}
    for method in args.methods:
        run_dir = Path(args.out) / "pretrain" / method
        current = set(curve_sources(run_dir)) if (run_dir / "encoder" / "encoder.json").is_file() else set()
        for d in sorted((run_dir / "curve").glob("step*")):
            m = _CURVE_DIR.search(d.name)
            if m and int(m.group(1)) in current:   # a step folder of an older run (not saved by this one): left out
                where[str(d / "encoder")] = (method, int(m.group(1)))
    from ecgfm.evaluate.identity import checkpoint_identity

    ids: dict[str, str | None] = {}
    for path in where:
        try:
            ids[path] = checkpoint_identity(path)["id"]
        except (OSError, ValueError) as exc:   # an export that never finished (or was removed): no point
            log(f"curve: {path}: no readable export ({exc}): left out")
            ids[path] = None
    rows = []
    modes: set[str] = set()
    for c in load_cells(res):
        key = where.get(str(c.get("checkpoint")))
        if key is None or "test" not in (c.get("results") or {}):
            continue
        if ids[str(c["checkpoint"])] is None:
            continue
        if c.get("checkpoint_id") != ids[str(c["checkpoint"])]:   # computed from other weights (an older run)
            log(f"curve: {c['checkpoint']} ({c.get('task')}): its cell was computed from other weights than the "
                f"folder holds now: left out (rerun --stages curve)")
            continue
        if c.get("mode") != "linear":
            modes.add(str(c.get("mode")))
            continue
        t = c["results"]["test"]["macro_auroc"]
        rows.append({"method": key[0], "step": key[1], "task": c["task"], "val": float(c["val_macro_auroc"]),
                     "test": float(t["value"]), "ci_low": float(t["ci_low"]), "ci_high": float(t["ci_high"]),
                     "n_test": int(c["results"]["test"]["n"]), "n_val": int((c.get("splits") or {}).get("val", 0))})
    if modes:   # e.g. --probe-overrides probe.layers=stages reached the curve probe: its cells are not the curve's
        log(f"curve: cells of probe variant(s) {sorted(modes)} left out: the learning curve is the plain linear "
            f"probe (run --stages curve without probe-variant overrides)")
    return sorted(rows, key=lambda r: (r["task"], r["method"], r["step"]))


CURVE_FILES = ("learning_curve.md", "learning_curve.png")


def curve_outputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``learning_curve.md`` / ``.png`` in ``<out>/curve`` from the curve cells of ``args.methods``; the run's own
    copy, written whatever ``--docs`` holds. Without probed points they are removed (an older run's curve must not
    pass for this one). Returns the rows (:func:`curve_rows`)."""
    rows = curve_rows(args)
    out_dir = Path(args.out) / "curve"
    if not rows:
        log("curve: no probed curve points yet")
        for name in CURVE_FILES:
            (out_dir / name).unlink(missing_ok=True)
        return rows
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning_curve.md").write_text(curve_markdown(rows))
    plot_curve(rows, out_dir / "learning_curve.png")
    log(f"curve: {len(rows)} points -> {out_dir / 'learning_curve.md'}, {out_dir / 'learning_curve.png'}")
    return rows


def copy_curve_to_docs(args: argparse.Namespace) -> dict[str, str] | None:
    """Mirror ``<out>/curve/learning_curve.{md,png}`` into ``--docs`` (a file the run has not is removed there).

    Writes without checking: callers first ask :func:`docs_losses` (:func:`curve_report`, :func:`report`)."""
    src, docs = Path(args.out) / "curve", Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    for name in CURVE_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, docs / name)
        else:
            (docs / name).unlink(missing_ok=True)
    if not (docs / "learning_curve.md").is_file():
        return None
    log(f"curve: copied to {docs / 'learning_curve.md'}, {docs / 'learning_curve.png'}")
    return {"markdown": str(docs / "learning_curve.md"), "plot": str(docs / "learning_curve.png")}


def curve_report(args: argparse.Namespace) -> dict[str, str] | None:
    """The learning curve of a curve stage run without the report: ``<out>/curve`` always
    (:func:`curve_outputs`), ``--docs`` only when that loses none of the rows the docs copy shows (or with
    ``--replace-docs``), as the report's tables. Returns the docs paths, or None when nothing was copied."""
    curve_outputs(args)
    lost = docs_losses(args)
    if lost and not args.replace_docs:
        docs = Path(args.docs)
        warn_docs_kept(args, lost, f"{docs / 'learning_curve.md'} and {docs / 'learning_curve.png'}")
        return None
    return copy_curve_to_docs(args)


def curve_markdown(rows: list[dict[str, Any]]) -> str:
    """The learning-curve table: per task, method x pretraining step, validation and test macro AUROC."""
    lines = ["# Learning curve: linear probe vs pretraining steps", "",
             f"Linear probe (fraction {CURVE_FRACTION}, seed {CURVE_SEED}) of each saved pretraining checkpoint; "
             f"validation = macro AUROC of the chosen `C` on the validation split (point estimate), test = macro "
             f"AUROC [95 % bootstrap CI over the test records].", ""]
    for task in sorted({r["task"] for r in rows}):
        at = [r for r in rows if r["task"] == task]
        lines += [f"## {task} (n = {at[0]['n_val']} validation, {at[0]['n_test']} test records)", "",
                  "| method | step | validation macro AUROC | test macro AUROC [95 % CI] |", "|---|---|---|---|"]
        for r in at:
            lines.append(f"| {r['method']} | {r['step']} | {r['val']:.3f} | {r['test']:.3f} "
                         f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
        lines.append("")
    notes = []
    for method in sorted({r["method"] for r in rows}):
        steps = sorted({r["step"] for r in rows if r["method"] == method})
        if len(steps) < MIN_CURVE_POINTS:
            notes.append(f"- {method}: only {len(steps)} saved checkpoint(s) ({', '.join(map(str, steps))}), fewer "
                         f"than {MIN_CURVE_POINTS} points.")
    if notes:
        lines += ["Fewer points than wanted:", "", *notes, ""]
    return "\n".join(lines)


def plot_curve(rows: list[dict[str, Any]], path: Path) -> Path:
    """Macro AUROC vs pretraining steps: one panel per task, one colour per method; test = solid line with 95 %
    CI bars, validation = dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in methods:
            pts = [r for r in rows if r["task"] == task and r["method"] == m]
            if not pts:
                continue
            x = [r["step"] for r in pts]
            y = [r["test"] for r in pts]
            err = [[r["test"] - r["ci_low"] for r in pts], [r["ci_high"] - r["test"] for r in pts]]
            ax.errorbar(x, y, yerr=err, color=colors[m], marker="o", capsize=3, label=f"{m} test (95 % CI)")
            ax.plot(x, [r["val"] for r in pts], color=colors[m], marker="x", linestyle="--", label=f"{m} validation")
        ax.set_xlabel("pretraining steps")
        ax.set_ylabel("macro AUROC (linear probe, 100 % of labels)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
#: set by benchmark_real.sh to the folder it was started in (it changes into the project root)
CALLER_DIR_ENV = "ECGFM_BENCHMARK_CALLER_DIR"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="the run folder (default runs/benchmark_real in the project; a relative path is taken from "
                         "the folder the command was started in, as --docs, --cache-root and --data-root)")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmark"),
                    help="where the report copies real_results.* and learning_curve.* (see the docs check above)")
    ap.add_argument("--cache-root", default=None, help="default: cache in the project")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--methods", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--steps", type=int, default=None,
                    help=f"pretraining steps per method (default: the {CPU_RECIPE_SUFFIX} recipe's own steps when it "
                         f"exists, else {DEFAULT_STEPS} with +experiment=<method>)")
    ap.add_argument("--recipe", choices=["auto", "cpu30", "base"], default="auto",
                    help=f"pretraining recipe: auto ({CPU_RECIPE_SUFFIX} without --steps when it exists), cpu30, "
                         "base (+experiment=<method>)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (base recipe: 64)")
    ap.add_argument("--embed-dim", type=int, default=None, help="default: the recipe's (base recipe: 64)")
    ap.add_argument("--depth", type=int, default=None, help="default: the recipe's (base recipe: 3)")
    ap.add_argument("--heads", type=int, default=None, help="default: the recipe's (base recipe: 4)")
    ap.add_argument("--tasks", nargs="+", default=["ptbxl_super", "cinc2017"])
    ap.add_argument("--fractions", nargs="+", default=["0.1", "1"])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--cnn-epochs", type=int, default=None,
                    help="epochs of the supervised CNN baseline (default --ft-epochs; early stopping applies)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="cache preparation processes")
    ap.add_argument("--xresnet", default="resnet1d_tiny",
                    help="strong supervised CNN baseline (resnet1d / xresnet1d family) on every task ('' to skip; "
                         "xresnet1d50 = full size)")
    ap.add_argument("--replace-docs", action="store_true",
                    help="let the report / curve stage replace docs copies that show rows this run lacks: results "
                         "rows, pretraining wall-time rows (method), learning-curve rows (task, method, step) "
                         "(default: such a partial run leaves --docs and the BENCHMARK.md beside it alone and says "
                         "so; its own copies are in --out)")
    ap.add_argument("--no-handcrafted", action="store_true", help="leave the handcrafted-feature probe out")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--train-overrides", nargs="*", default=[])
    ap.add_argument("--eval-overrides", nargs="*", default=[], help="extra overrides of probe.py and finetune.py")
    ap.add_argument("--probe-overrides", nargs="*", default=[], help="extra overrides of probe.py (probe, curve)")
    ap.add_argument("--finetune-overrides", nargs="*", default=[], help="extra overrides of finetune.py")
    args = ap.parse_args(argv)
    # train.py / probe.py / finetune.py run in the project root while this script reads and writes the same folders
    # itself: a relative path meant two places when started elsewhere (the encoder under ROOT/<out>, the time records
    # under ./<out>, a rerun training again). Every path is made absolute here, from the caller's folder
    # (benchmark_real.sh changes into the project root and passes where it was started).
    # Inside the project, --out and --cache-root stay relative to it, as they were named before: cell folders,
    # curve stamps and recorded pools are named from these strings, so the cells of an existing run are found again
    # (absolute strings would recompute every cell); the script then works from the project root, like its commands.
    resolve_from_caller(args, Path(os.environ.get(CALLER_DIR_ENV) or os.getcwd()), in_project=("out", "cache_root"),
                        absolute=("docs", "data_root"),
                        defaults={"out": ROOT / "runs" / "benchmark_real", "cache_root": ROOT / "cache"})
    os.chdir(ROOT)
    if "probe" in args.stages and not args.no_handcrafted and any(
            o.split("=", 1)[0].lstrip("+") == "probe.layers" and o.split("=", 1)[1] != "last"
            for o in args.probe_overrides if "=" in o):
        ap.error("--probe-overrides probe.layers=... pools an encoder's stages, which the handcrafted baseline "
                 "has not (probe.py refuses it): add --no-handcrafted")
    seeded = [m for m in args.methods if any(o.startswith("seed=") for o in METHOD_OVERRIDES.get(m, []))]
    if seeded and any(o.lstrip("+~").startswith("seed=") for o in args.train_overrides):
        ap.error(f"--train-overrides sets seed=, which would replace the pretraining seed of {', '.join(seeded)} "
                 f"(a second seed of a recipe): leave those methods out or the seed override")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               MPLBACKEND="Agg", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    t0 = time.perf_counter()
    if "pretrain" in args.stages:   # a recipe that does not exist is refused before the pools are prepared
        for m in args.methods:
            pretrain_recipe(args, m)
    pools = stage_pool(args) if "pool" in args.stages or "pretrain" in args.stages else []
    encoders = stage_pretrain(args, pools, env) if "pretrain" in args.stages else {
        m: str(Path(args.out) / "pretrain" / m / "encoder") for m in args.methods}
    if "curve" in args.stages:
        stage_curve(args, env)
    ckpts = list(encoders.values())
    first = ckpts[0]
    twins = random_twins(ckpts)
    tasks = ",".join(args.tasks)
    if "probe" in args.stages:
        extra = [] if args.no_handcrafted else ["handcrafted"]
        run([PY, "probe.py", "-m", f"checkpoint={','.join(ckpts + twins + extra)}", f"task={tasks}",
             f"fraction={','.join(args.fractions)}", f"seed={','.join(args.seeds)}", *eval_overrides(args),
             *args.probe_overrides], env)
    if "finetune" in args.stages:
        agg = finetune_aggregate([*eval_overrides(args), *args.finetune_overrides])
        common = [f"supervised.window_aggregate={agg}", f"fraction=[{','.join(args.fractions)}]",
                  f"seed=[{','.join(args.seeds)}]", *eval_overrides(args), *args.finetune_overrides]
        ft = [*finetune_budget(args.ft_epochs), *common]
        run([PY, "finetune.py", "-m", f"checkpoint={','.join(ckpts + twins + ['supervised:' + first])}",
             f"task={tasks}", *ft], env)
        if args.xresnet:
            win = encoder_window_seconds(first)
            cnn = [*finetune_budget(args.cnn_epochs or args.ft_epochs), *common]
            run([PY, "finetune.py", "-m", f"checkpoint=supervised:{args.xresnet}", f"task={tasks}",
                 *([f"window_seconds={win:g}"] if win else []), *cnn], env)
    if "report" in args.stages:
        report(args)
    log(f"total {time.perf_counter() - t0:.0f} s")


def pretrain_times_markdown(args: argparse.Namespace) -> str:
    """The pretraining wall-time section (from ``pretrain/<method>/pretrain_time.json``)."""
    rows = []
    for method in args.methods:
        folder = Path(args.out) / "pretrain" / method
        info = _read_json(folder / "pretrain_time.json")
        if info:
            scope = pretrain_time_scope(info, _read_json(folder / "summary.json"))
            legs = int(info.get("legs") or 1)
            # a resumed run: its steps count every leg; say whether its times do too. "resumed" only where the run
            # did (a record written before the discarded legs were left out may sum a fresh run with the attempts
            # before it: say that instead)
            resumed = info.get("resumed", True)
            summed = (f"{legs} legs (resumed), times summed" if resumed else
                      f"{legs} train.py runs summed, the last not resumed (its steps and fit time are its own)")
            dropped = int(info.get("discarded_legs") or 0)
            note = "; ".join(n for n in (
                f"resumed: times of the last leg only ({info.get('steps')} steps are every leg's)"
                if scope == "last leg only" else
                (summed + ("; fit time of the last leg only" if "fit time last" in scope else "")
                 if legs > 1 else ""),
                (f"{dropped} earlier attempt(s) not continued by this run left out ({info.get('discarded_wall_s')} s "
                 f"wall, {info.get('discarded_cpu_s')} CPU-s)" if dropped else ""),
                str(info.get("note") or "")) if n)
            rows.append(f"| {method} | +experiment={info.get('experiment')} | {info.get('steps')} | "
                        f"{info.get('wall_s')} | {info.get('fit_time_s') and round(float(info['fit_time_s']), 1)} | "
                        f"{info.get('cpu_s', '-')} | {info.get('threads')} | {info.get('finished_utc')} | "
                        f"{note} |")
    if not rows:
        return ""
    return "\n".join(["## Pretraining wall time", "",
                      "| method | recipe | steps | wall time (s, whole train.py) | fit time (s) | CPU time (s, user + sys) "
                      "| threads | finished (UTC) | note |", "|---|---|---|---|---|---|---|---|---|", *rows, ""])


RESULTS_START, RESULTS_END = "<!-- RESULTS START -->", "<!-- RESULTS END -->"


def results_sections(markdown: str, keep: tuple[str, ...]) -> str:
    """The ``## ...`` sections of ``markdown`` whose heading starts with one of ``keep`` (in their order)."""
    parts = re.split(r"(?m)^(?=## )", markdown)
    return "".join(p for p in parts if p.startswith(tuple(f"## {k}" for k in keep))).strip()


def update_benchmark_doc(doc: Path, results_md: Path, curve_md: Path | None) -> None:
    """Replace the generated block of docs/BENCHMARK.md (between the RESULTS markers) with the acceptance block,
    the macro AUROC tables, the paired comparisons and the pretraining wall times of ``results.md`` and the
    learning curve table, so that one command regenerates what the document shows. A document without the
    markers is left alone (a warning says so)."""
    if not doc.is_file() or not results_md.is_file():
        return
    text = doc.read_text()
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == RESULTS_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == RESULTS_END]
    if not starts or not ends:
        log(f"warning: {doc} has no {RESULTS_START} / {RESULTS_END} marker lines: not updated")
        return
    if len(starts) > 1 or len(ends) > 1 or ends[0] < starts[0]:
        raise SystemExit(f"error: {doc}: the generated block must be one {RESULTS_START} line followed by one "
                         f"{RESULTS_END} line (found {len(starts)} / {len(ends)}): not updated")
    md = results_md.read_text()
    body = results_sections(md, ("Acceptance", "macro_auroc", "Paired comparison", "Pretraining wall time"))
    block = [RESULTS_START, "",
             f"Generated by `bash scripts/benchmark_real.sh` (report stage, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) "
             f"from the cells in `{_shown(results_md.parent)}`; every table of the run (macro F1, Fmax, per class) is in "
             "[benchmark/real_results.md](benchmark/real_results.md), per-seed paired differences in "
             "`benchmark/real_comparisons.csv`.", "", "![macro AUROC vs label fraction](benchmark/real_results.png)", "",
             body.replace("\n## ", "\n#### ").replace("## ", "#### ", 1) if body.startswith("## ") else body]
    if curve_md is not None:
        curve = curve_md.read_text().strip()
        curve = re.sub(r"\A# .*\n", "", curve)                   # its title: the heading below says it
        curve = re.sub(r"(?m)^## ", "##### ", curve)               # one heading per task, under that one
        block += ["", "#### Learning curve (linear probe, 100 % of the labels, seed 0)", "",
                  "![learning curve](benchmark/learning_curve.png)", "", curve.strip()]
    block += ["", RESULTS_END]
    doc.write_text("\n".join(lines[:starts[0]] + block + lines[ends[0] + 1:]))
    log(f"updated the generated block of {doc}")


def _shown(path: Path) -> str:
    """``path`` relative to the project when it is inside it (as the document names it), else absolute."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


#: decimals kept of the metric columns in the docs copy of results.csv (the run's own results.csv keeps all)
DOCS_DECIMALS = 6


def docs_results_csv(src: Path, dst: Path) -> None:
    """The committed copy of the tidy results table: without the ``cell`` column (a path into the run folder,
    which is not in git; the run's own ``results.csv`` keeps it) and with the value / CI columns rounded to
    :data:`DOCS_DECIMALS` decimals, so that the table stays a small text file as methods are added."""
    import pandas as pd

    df = pd.read_csv(src)
    df = df.drop(columns=[c for c in ("cell",) if c in df.columns])
    for col in ("value", "ci_low", "ci_high"):
        if col in df.columns:
            df[col] = df[col].round(DOCS_DECIMALS)
    df.to_csv(dst, index=False)


def rows_not_in(old_csv: Path, new_csv: Path) -> list[str]:
    """The table rows (row label, method, backbone, probe mode, task, label fraction, seed) of a committed
    ``real_results.csv`` that a new ``results.csv`` lacks, as ``"label / ... / seed"`` strings (empty when there is
    no committed table).
    A report built from a checkout that holds only some cells (one retrained encoder, say) must not replace the
    full run's tables with a partial one."""
    import pandas as pd

    if not old_csv.is_file():
        return []
    key = ["label", "method", "backbone", "mode", "task", "fraction", "seed"]
    old = pd.read_csv(old_csv, usecols=lambda c: c in key)
    if not set(key) <= set(old.columns):
        return []   # not a table of this format: nothing to protect
    new = pd.read_csv(new_csv, usecols=lambda c: c in key) if new_csv.is_file() else pd.DataFrame(columns=key)
    def rows(df: Any) -> set[tuple[str, ...]]:
        df = df[key].copy()
        df["fraction"] = pd.to_numeric(df["fraction"], errors="coerce").map(lambda f: f"{f:g}")
        return set(map(tuple, df.astype(str).values))

    have = rows(new) if len(new) else set()
    return [" / ".join(t) for t in sorted(rows(old) - have)]


def _read_text(path: Path) -> str:
    """The text of ``path``; "" when it is missing (a docs copy not made yet has no rows to lose)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def markdown_section(text: str, title: str) -> str:
    """The first section of ``text`` whose heading (any level) starts with ``title``: its heading line and every
    line up to the next heading of the same or a higher level ("" when there is none). The same table sits under
    ``## `` in results.md and ``#### `` in the generated block of BENCHMARK.md."""
    out: list[str] = []
    level = None
    for line in text.split("\n"):
        m = re.match(r"^(#+) (.*)", line)
        if level is None:
            if m and m.group(2).startswith(title):
                level = len(m.group(1))
                out.append(line)
        elif m and len(m.group(1)) <= level:
            break
        else:
            out.append(line)
    return "\n".join(out)


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row of ``text`` (separator rows left out)."""
    rows = []
    for line in text.split("\n"):
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not all(set(c) <= set("-: ") for c in cells):
            rows.append(cells)
    return rows


def wall_time_rows(section: str) -> set[str]:
    """The methods of a pretraining wall-time table (:func:`pretrain_times_markdown`)."""
    return {r[0] for r in _table_rows(section) if r and r[0] not in ("", "method")}


_CURVE_TASK = re.compile(r"^#+ (\S+) \(n = ")


def curve_table_rows(text: str) -> set[str]:
    """The ``"task / method / step"`` rows of learning-curve tables (:func:`curve_markdown`, or its copy in the
    generated block of BENCHMARK.md, where the task headings are ``##### ``). Keyed by step too: a run of the
    same methods whose checkpoints fall on other steps (another recipe) replaces the curve only when asked."""
    rows: set[str] = set()
    task = None
    for line in text.split("\n"):
        if line.startswith("#"):
            m = _CURVE_TASK.match(line)
            task = m.group(1) if m else None
            continue
        if task is None or not line.strip().startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1].isdigit():
            rows.add(f"{task} / {cells[0]} / {cells[1]}")
    return rows


def generated_block(doc: Path) -> str:
    """The text between the RESULTS marker lines of ``doc`` ("" without the markers or the file)."""
    lines = _read_text(doc).split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == RESULTS_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == RESULTS_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        return ""
    return "\n".join(lines[starts[0] + 1:ends[0]])


def docs_losses(args: argparse.Namespace, res_dir: Path | None = None) -> dict[str, list[str]]:
    """The rows that the ``--docs`` copies show and this run's would lack, per table (empty: nothing is lost).

    A run over some methods (``--methods mae`` after a full run) builds a learning curve and a wall-time table of
    those methods only; copied over the docs, they silently dropped the other methods' rows. The rule of the
    results tables (:func:`rows_not_in`) holds for them too.

    Args:
        args: the run's arguments (``out``, ``docs``).
        res_dir: the report's results folder: the results tables, the pretraining wall-time table of its
            ``results.md`` and the learning curve of ``<out>/curve``, against ``real_results.*``,
            ``learning_curve.md`` and the generated block of the ``BENCHMARK.md`` beside ``--docs`` (the report
            rewrites all of them). None: the learning curve alone against ``learning_curve.md`` (what the curve
            stage writes).

    Returns:
        ``{table: [rows]}``, only the tables that lose rows.
    """
    docs = Path(args.docs)
    shown_curve = _read_text(docs / "learning_curve.md")
    lost: dict[str, list[str]] = {}
    if res_dir is not None:
        block = generated_block(docs.resolve().parent / "BENCHMARK.md")
        lost["results"] = rows_not_in(docs / "real_results.csv", res_dir / "results.csv")
        title = "Pretraining wall time"
        shown = (wall_time_rows(markdown_section(_read_text(docs / "real_results.md"), title))
                 | wall_time_rows(markdown_section(block, title)))
        lost["pretraining wall time"] = sorted(shown - wall_time_rows(
            markdown_section(_read_text(res_dir / "results.md"), title)))
        shown_curve += "\n" + markdown_section(block, "Learning curve")
    lost["learning curve"] = sorted(curve_table_rows(shown_curve) - curve_table_rows(
        _read_text(Path(args.out) / "curve" / "learning_curve.md")))
    return {k: v for k, v in lost.items() if v}


def warn_docs_kept(args: argparse.Namespace, lost: dict[str, list[str]], kept: str) -> None:
    """Say which docs rows a run would have dropped (:func:`docs_losses`) and that ``kept`` was left alone."""
    what = "; ".join(f"{part}: {len(rows)} row(s) ({'; '.join(rows[:6])}{' ...' if len(rows) > 6 else ''})"
                     for part, rows in lost.items())
    log(f"warning: {args.docs} shows rows that this run lacks ({what}): a partial run would replace them, so {kept} "
        f"were left as they are; this run's tables are in {args.out} (results/, curve/) (to have them as docs, "
        f"pass --docs /tmp/<dir>/docs/benchmark: a folder outside this repository, since the report also rewrites "
        f"the BENCHMARK.md beside its parent; or --replace-docs to replace the committed ones anyway)")


def report(args: argparse.Namespace) -> None:
    """Rebuild the tables, append the pretraining wall times, copy them and the learning curve to docs/benchmark
    (unless they would lose rows the committed tables, wall-time table or learning curve show:
    :func:`docs_losses`; this run's copies stay in ``<out>``), and print the acceptance block."""
    from ecgfm.evaluate.report import build_report

    res_dir = Path(args.out) / "results"
    out = build_report(res_dir, n_boot=args.bootstrap)
    times = pretrain_times_markdown(args)
    if times:
        md = res_dir / "results.md"
        md.write_text(md.read_text() + "\n" + times)
    curve_outputs(args)     # the run's own curve, whatever the docs check below decides
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    lost = docs_losses(args, res_dir)
    if lost and not args.replace_docs:
        warn_docs_kept(args, lost, f"{docs} and the generated block of {docs.resolve().parent / 'BENCHMARK.md'}")
        text = "\n".join(f"{r['status']}: {r['criterion']}: {r['evidence'].replace(' <br> ', '; ')}"
                         for r in out.get("acceptance") or [])
        log("acceptance (issue 12) of this run's cells, test macro AUROC (not written to the docs):\n" + text)
        return
    copy_curve_to_docs(args)    # first: the generated block copies the learning-curve table from docs
    for name in ("results.csv", "results.md", "results.png", "comparisons.csv", "comparisons_mean.csv"):
        if not (res_dir / name).exists():   # not made by this report: an older copy in docs would pass for current
            (docs / f"real_{name}").unlink(missing_ok=True)
        elif name == "results.csv":
            docs_results_csv(res_dir / name, docs / f"real_{name}")
        else:
            shutil.copy(res_dir / name, docs / f"real_{name}")
    # the document beside the docs folder (docs/BENCHMARK.md for the default --docs docs/benchmark)
    update_benchmark_doc(docs.resolve().parent / "BENCHMARK.md", res_dir / "results.md",
                         docs / "learning_curve.md" if (docs / "learning_curve.md").is_file() else None)
    text = "\n".join(f"{r['status']}: {r['criterion']}: {r['evidence'].replace(' <br> ', '; ')}"
                     for r in out.get("acceptance") or [])
    (docs / "real_headline.txt").write_text(text + "\n")
    log("acceptance (issue 12), test macro AUROC:\n" + text)
    log(json.dumps({k: v for k, v in out.items() if k != "acceptance"}))


if __name__ == "__main__":
    main()
