"""Feature-extraction throughput and the one-frozen-pass-per-checkpoint-and-corpus property of probe sweeps.

Runs the cells of a probe sweep one by one, as ``python probe.py -m checkpoint=a,b task=... fraction=...
seed=...`` does with Hydra's basic launcher (one ``probe_main`` call per cell, in one process; like the multirun's
``ReportCallback``, the results table is built once after the cells, outside their times: ``report=never`` per cell,
and one ``build_report`` at the end where the work folder is kept), and reports

* feature-extraction throughput per checkpoint (windows/s, with the window settings; the corpus's records are
  not counted: a record gives as many windows as its length holds);
* the number of encoder passes over each corpus (``ecgfm.evaluate.features.STATS["extractions"]``; for
  ``checkpoint=handcrafted``, the baseline's feature passes, ``ecgfm.evaluate.handcrafted.STATS["extractions"]``,
  one row per whole record) against the number of cells, and the feature files on disk (one per checkpoint and
  corpus);
* the time spent training and scoring heads per cell.

Example (about a minute on 2 CPU cores)::

    python scripts/bench_probe.py --checkpoints random:vit1d_tiny random:resnet1d_tiny --tasks synthetic \\
        --fractions 0.1 0.3 1 --seeds 0 1 2

Real data: ``--tasks ptbxl_super cinc2017`` (prepares the caches on first use from ../shared/data).

Lead sets (issue 12): ``--lead-modes padded aware`` runs every checkpoint twice in the same process, once with
every window as a zero-padded 12-lead input (``features.lead_aware=false``, the extraction before lead-aware
backbones) and once lead-aware (absent leads make no tokens), each with its own feature folder, and prints the
speed-up; ``--leads I`` makes the synthetic corpus one-lead (lead I kept, the others absent). Peak memory of each
extraction is printed (peak resident set size of the process during that cell, reset before it where Linux
allows, and its rise above the size the process had when the cell started; where the reset is refused the peak is
the process's since start and no rise is given; and the peak CUDA allocation on a GPU). The default ``--repeats 1``
gives one round: no interval for windows/s or the speed-up (``--repeats 3`` or more for one)::

    python scripts/bench_probe.py --checkpoints random:vit1d_tiny --tasks synthetic --leads I \
        --lead-modes padded aware --fractions 1 --seeds 0
    python scripts/bench_probe.py --checkpoints random:vit1d_tiny --tasks cinc2017 --lead-modes padded aware \
        --fractions 1 --seeds 0 paths.data_root=/abs/path/to/shared/data
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecgfm.timing import max_rss_bytes, proc_status_bytes, rate_interval, reset_peak_rss  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=["random:vit1d_tiny", "random:resnet1d_tiny"])
    ap.add_argument("--tasks", nargs="+", default=["synthetic"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--synthetic-records", type=int, default=300)
    ap.add_argument("--work", default=None, help="folder for caches and results (default: a temporary folder)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--lead-modes", nargs="+", choices=["aware", "padded"], default=["aware"],
                    help="feature extraction: 'aware' (lead masks to backbones that take them, the default) and/or "
                         "'padded' (zero-padded 12-lead windows, as before)")
    ap.add_argument("--leads", nargs="+", default=None, help="synthetic corpus: keep only these leads (e.g. I)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every cell (torch_threads=...; default: the environment's)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="time the first extraction cold (default: one untimed run of each checkpoint, task and "
                         "lead mode first, so that first-call set-up (lazy imports, kernel set-up) and cache "
                         "preparation are not charged to whichever mode runs first)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed extractions per checkpoint, task and lead mode (>= 1): the sweep's own pass plus "
                         "repeats - 1 more into fresh feature folders, lead modes interleaved within each round; "
                         "with >= 2 the windows/s carry a 95%% interval over the passes and the lead-aware speed-up "
                         "is given per round (median, min-max)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for conf/probe.yaml")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    from hydra import compose, initialize_config_dir

    from ecgfm.evaluate.sweep import probe_main

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_probe_"))
    feat_dir = work / "cache" / "features"
    results_dir = work / "results"
    modes = list(dict.fromkeys(args.lead_modes))
    cells = [(c, t, m, f, s) for c in args.checkpoints for t in args.tasks for m in modes for f in args.fractions
             for s in args.seeds]
    def cell_cfg(ckpt: str, task: str, mode: str, frac: float, seed: int, results: Path, features: Path | None):
        over = [f"checkpoint={ckpt}", f"task={task}", f"fraction={frac}", f"seed={seed}",
                f"paths.cache_root={work / 'cache'}", f"results_dir={results}",
                # report=never: compose()d cells are no multirun, so report=auto would rebuild the whole table
                # (paired bootstraps included) after every cell, inside its time; it is built once below instead
                f"bootstrap.n={args.bootstrap}", "plot=false", "report=never",
                f"features.lead_aware={mode == 'aware'}",
                *([f"features.dir={features}"] if features is not None else []),
                *([f"torch_threads={args.threads}"] if args.threads else []), *args.overrides]
        if task == "synthetic":
            over.append(f"task.params.n_records={args.synthetic_records}")
            if args.leads:
                over.append(f"+task.sources.0.leads=[{','.join(args.leads)}]")
        with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            return compose("probe", overrides=over)

    if args.warmup:  # untimed, into folders of their own: the timed cells below extract again from scratch
        for ckpt in args.checkpoints:
            for task in args.tasks:
                for mode in modes:
                    probe_main(cell_cfg(ckpt, task, mode, args.fractions[0], args.seeds[0],
                                        work / "warmup" / "results" / mode, work / "warmup" / "features" / mode))
    per_cell = []
    t_all = time.perf_counter()
    passes: dict[tuple[str, str, str], dict] = {}
    for ckpt, task, mode, frac, seed in cells:
        cfg = cell_cfg(ckpt, task, mode, frac, seed, results_dir / mode, feat_dir / mode if len(modes) > 1 else None)
        stats, unit = _extraction_stats(ckpt)
        before = dict(stats)
        _reset_peak_memory()
        rss_start = _rss_mib()
        t0 = time.perf_counter()
        out = probe_main(cfg)
        dt = time.perf_counter() - t0
        extracted = stats["extractions"] - before.get("extractions", 0)
        if extracted:
            rows = stats[unit] - before.get(unit, 0)
            secs = stats["seconds"] - before.get("seconds", 0.0)
            cell = json.loads(Path(out["cells_written"][0]).read_text())
            passes[(ckpt, task, mode)] = {unit: rows, "unit": unit, "seconds": secs,
                                          "window_samples": cell["window_samples"],
                                          "stride_samples": cell["stride_samples"], "backbone": cell["backbone"],
                                          "peak_memory": _peak_memory(), "peak_reset": _PEAK_RESET["ok"],
                                          "rss_start": rss_start}
        per_cell.append({"checkpoint": ckpt, "task": task, "lead_mode": mode, "fraction": frac, "seed": seed,
                         "seconds": dt, "encoder_passes": extracted})
    total = time.perf_counter() - t_all
    n_files = len(list(feat_dir.rglob("*.npz")))
    # Repeated timings (--repeats): the sweep's pass is round 0; each further round extracts every checkpoint, task
    # and lead mode again into folders of its own (modes interleaved, so slow drift of the machine's load hits them
    # alike). Outside the sweep's totals and its one-pass count.
    timings = {k: [(p[p["unit"]], p["seconds"])] for k, p in passes.items()}
    for r in range(1, args.repeats):
        for key in passes:
            ckpt, task, mode = key
            stats, unit = _extraction_stats(ckpt)
            before = dict(stats)
            probe_main(cell_cfg(ckpt, task, mode, args.fractions[0], args.seeds[0],
                                work / "repeats" / str(r) / "results" / mode,
                                work / "repeats" / str(r) / "features" / mode))
            timings[key].append((stats[unit] - before.get(unit, 0),
                                 stats["seconds"] - before.get("seconds", 0.0)))

    kept = bool(args.keep or args.work)
    table = None
    if kept:   # once, after the timed cells and outside their times (a multirun's ReportCallback does the same)
        t_report = time.perf_counter()
        table = _build_tables(results_dir, modes, args.bootstrap)
        t_report = time.perf_counter() - t_report

    print(f"\n== probe sweep: {len(cells)} cells = {len(args.checkpoints)} checkpoint(s) x {len(args.tasks)} task(s) "
          f"x {len(modes)} lead mode(s) x {len(args.fractions)} fraction(s) x {len(args.seeds)} seed(s); torch threads: "
          f"{__import__('torch').get_num_threads()}; "
          + ("warm-up excluded (one untimed run per checkpoint, task and lead mode first)" if args.warmup
             else "cold: the first extraction includes first-call set-up (--no-warmup)"))
    if args.repeats < 3:
        print(f"note: --repeats {args.repeats}: "
              + ("one round, so no interval is given for the windows/s or the speed-up" if args.repeats == 1 else
                 "two rounds: the 95% intervals have one degree of freedom (wide, often unbounded)")
              + "; --repeats 3 or more for an interval")
    print("feature extraction (frozen encoder, every sliding window of every record of the corpus):")
    for key, p in passes.items():
        ckpt, task, mode = key
        speed = _speed(timings[key], p["unit"])
        if len(timings[key]) > 1:
            p[f"{p['unit']}_per_s"] = list(rate_interval([w for w, _ in timings[key]], [t for _, t in timings[key]]))
        shape = (f"window {p['window_samples']} / stride {p['stride_samples']} samples" if p["unit"] == "windows"
                 else "whole-record features, one row per record")
        print(f"  {ckpt:<28} {task:<12} {mode:<6} backbone {p['backbone']:<14} {shape}: {speed}; peak memory "
              f"{p['peak_memory']}, {_footprint(p)}")
    for ckpt in args.checkpoints:
        if _extraction_stats(ckpt)[1] != "windows":   # no encoder: the lead modes' speed-up is an encoder's
            continue
        for task in args.tasks:
            a, b = passes.get((ckpt, task, "aware")), passes.get((ckpt, task, "padded"))
            if a and b:
                ratios = [(wa / max(ta, 1e-9)) / max(wb / max(tb, 1e-9), 1e-9)
                          for (wa, ta), (wb, tb) in zip(timings[(ckpt, task, "aware")],
                                                        timings[(ckpt, task, "padded")])]
                speed = statistics.median(ratios)
                spread = (f" (median of {len(ratios)} rounds, min-max {min(ratios):.1f}-{max(ratios):.1f}x)"
                          if len(ratios) > 1 else " (one round; --repeats for a spread)")
                print(f"  lead-aware vs zero-padded 12-lead grid, {ckpt} on {task}: {speed:.1f}x windows/s{spread}")
                a["speedup_vs_padded"] = speed
                a["speedup_rounds"] = ratios
    n_pass = sum(c["encoder_passes"] for c in per_cell)
    expected = len(args.checkpoints) * len(set(_dataset(t) for t in args.tasks)) * len(modes)
    print(f"encoder passes over a corpus: {n_pass} for {len(cells)} cells "
          f"(expected {expected} = checkpoints x corpora x lead modes"
          + ("; checkpoint=handcrafted: its feature passes (handcrafted.STATS), no encoder"
             if any(_extraction_stats(c)[1] != "windows" for c in args.checkpoints) else "")
          + f"); feature files on disk: {n_files}")
    heads = [c["seconds"] for c in per_cell if not c["encoder_passes"]]
    if heads:
        print(f"cells without an encoder pass (heads on cached features): mean {sum(heads) / len(heads):.2f} s, "
              f"max {max(heads):.2f} s per cell (C grid x bootstrap {args.bootstrap})")
    print(f"total {total:.1f} s; " + (f"results table: {table} (one per lead mode; built once after the timed "
                                       f"cells, {t_report:.1f} s, not in the total)" if table else
                                       "results table not built (a results table deleted with the temporary work "
                                       "folder would only cost time; --keep or --work to build and keep it)"))
    ok = n_pass == expected
    print("ONE PASS PER CHECKPOINT AND CORPUS:", "yes" if ok else "NO")
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    return {"cells": len(cells), "encoder_passes": n_pass, "feature_files": n_files, "one_pass": ok,
            "passes": {"|".join(k): v for k, v in passes.items()}, "total_s": total}


_PEAK_RESET = {"ok": False}


def _extraction_stats(checkpoint: str) -> tuple[Any, str]:
    """The counters of the feature pass a cell of ``checkpoint`` makes, and the unit of its feature rows:
    ``(ecgfm.evaluate.features.STATS, "windows")`` for an encoder (one row per sliding window), and
    ``(ecgfm.evaluate.handcrafted.STATS, "records")`` for ``checkpoint=handcrafted`` (no encoder: one row of
    whole-record features per record, counted by that module). Handcrafted side features of an encoder's cells
    (``probe.side_features``) are not counted: they are no encoder pass."""
    from ecgfm.evaluate.sweep import HANDCRAFTED

    if str(checkpoint).strip() == HANDCRAFTED:
        from ecgfm.evaluate import handcrafted as H

        return H.STATS, "records"
    from ecgfm.evaluate import features as F

    return F.STATS, "windows"


def _build_tables(results_dir: Path, modes: list[str], n_boot: int) -> Path:
    """The results table of each lead mode's results folder (``<results_dir>/<mode>``, where its cells are), built
    once (``build_report``, no plot), and ``<results_dir>/results.md`` holding them one after the other."""
    from ecgfm.evaluate.report import build_report

    parts = []
    for mode in modes:
        (results_dir / mode).mkdir(parents=True, exist_ok=True)
        md = Path(build_report(results_dir / mode, plot=False, n_boot=n_boot)["markdown"])
        parts.append(f"**Lead mode {mode}** (`features.lead_aware={str(mode == 'aware').lower()}`; the table of "
                     f"`{mode}/results.md`):\n\n{md.read_text()}")
    out = results_dir / "results.md"
    out.write_text(f"# bench_probe: one results table per lead mode ({', '.join(modes)})\n\n" + "\n".join(parts))
    return out


def _rss_mib() -> float:
    """The process's resident set size now, in MiB (NaN where /proc is not readable)."""
    rss = proc_status_bytes("VmRSS")
    return float("nan") if rss is None else rss / 2 ** 20


def _speed(timings: list[tuple[int, float]], unit: str = "windows") -> str:
    """The extraction figures of one checkpoint, task and lead mode: ``timings`` are the ``(rows, seconds)`` of
    its timed passes (round 0 = the sweep's), the rows counted in ``unit`` (``"windows"``, or ``"records"`` for the
    handcrafted baseline). One pass: its rows, time and rate. Several: round 0's rows and time, then the rows, time
    and rate of all the passes together with the 95% interval of the rate over them (each figure labelled with the
    passes it covers)."""
    w0, t0 = timings[0]
    if len(timings) == 1:
        return f"{w0} {unit} in {t0:.2f} s = {w0 / max(t0, 1e-9):.0f} {unit}/s (one pass, no interval)"
    ws, ts = [w for w, _ in timings], [t for _, t in timings]
    rate, lo, hi = rate_interval(ws, ts)
    return (f"round 0: {w0} {unit} in {t0:.2f} s; all {len(timings)} passes: {sum(ws)} {unit} in {sum(ts):.2f} s = "
            f"{rate:.0f} {unit}/s (95% CI {lo:.0f}-{hi:.0f} over {len(timings)} passes)")


def _rise(p: dict) -> str:
    """The cell's own peak footprint: its peak RSS less the RSS it started from (libraries already loaded).
    Not computed where the peak could not be reset before the cell (``p["peak_reset"]`` false): the peak is then
    the process's since start (an earlier cell's, or the warm-up's), not this cell's."""
    if not p.get("peak_reset", False):
        return "rise n/a (peak reset refused)"
    try:
        peak = float(str(p["peak_memory"]).split("RSS ", 1)[1].split(" MiB", 1)[0])
    except (IndexError, ValueError):
        return "rise n/a"
    return f"{peak - p['rss_start']:+.0f} MiB"


def _footprint(p: dict) -> str:
    """:func:`_rise` with the RSS the process held when the cell started."""
    rise = _rise(p)
    if "n/a" not in rise:
        return f"{rise} above the {p['rss_start']:.0f} MiB the process held when the cell started"
    return f"{rise}; the process held {p['rss_start']:.0f} MiB when the cell started"


def _release_freed_memory() -> None:
    """Hand memory freed by earlier cells back to the system (garbage collection, glibc ``malloc_trim``), so that a
    cell starts from what the process really holds. Without it, an earlier cell's freed heap stayed resident and
    the next cell reused it: its "rise" read +0 to +29 MiB where it needs ~80 (lead-aware), +306 to +523 where it
    needs ~550 (padded), moving from run to run (a 2026-12-07 review)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: the rise may then read low (said where it is printed)
        pass


def _reset_peak_memory() -> None:
    """Release freed memory (:func:`_release_freed_memory`), then reset the process's peak RSS (Linux
    ``clear_refs`` 5) and the CUDA peak, where possible."""
    _release_freed_memory()
    _PEAK_RESET["ok"] = reset_peak_rss()
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> str:
    """Peak resident set size of the whole process during the cell (VmHWM since :func:`_reset_peak_memory`; "since
    start" when the reset was refused), plus the CUDA peak on a GPU."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        since = "process, this cell" if _PEAK_RESET["ok"] else "process, since start: reset refused"
        out = f"RSS {hwm / 2 ** 20:.0f} MiB ({since})"
    else:   # no /proc (off Linux): getrusage, which has no reset
        out = f"RSS {max_rss_bytes() / 2 ** 20:.0f} MiB (since start)"
    import torch

    if torch.cuda.is_available():
        out += f", CUDA {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB"
    return out



def _dataset(task: str) -> str:
    """PTB-XL tasks share one corpus (and one feature file)."""
    return "ptbxl" if task.startswith("ptbxl_") else task


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["one_pass"] else 1)
