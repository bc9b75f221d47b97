"""Data-layer benchmark: corpus conversion, cached loading vs naive per-item loading, memory flatness.

    .venv/bin/python scripts/bench_data.py            # full: the shared PTB-XL (100 Hz) + CinC 2017, 10k vs 100k
    .venv/bin/python scripts/bench_data.py --quick    # small subsets, a minute or two

Measures, on the shared real data (``../shared/data``):
1. conversion of PTB-XL (1,999 records at 100 Hz) + CinC 2017 (2,558) with ``--workers`` processes (automatic
   shard size, as ``prepare_corpus`` defaults to): wall time, records/s, CPU seconds (user + system of the whole
   process tree: interpreter start-up, imports, workers; ``getrusage(RUSAGE_CHILDREN)``) per record, peak RSS
   of the converting process tree (psutil, sampled every 50 ms, parent + children), and the wall time that
   CPU time projects on an idle machine with ``--workers`` free cores (serial parent CPU + worker CPU / workers).
   The CPU figures do not depend on what else the machine runs; the wall time does (the load average is shown);
2. loader throughput (samples/s) of random 2.5 s crops (12 leads at 100 Hz) through ``PretrainDataModule``
   with ``--loader-workers`` workers, against a naive loader that calls ``wfdb.rdrecord`` + resampling per item
   with the same workers; the ratio (target >= 100x); plus the CPU cost per sample of both in one process;
3. peak RSS while converting synthetic corpora of 10k and 100k records (flat: memory does not grow with size);
4. (after 1) the cost of the cache's integrity check on open (stat check vs none vs full sha256) and of the
   input-freshness check (:func:`ecgfm.data.cache.input_changes`).

Throughputs are samples / time over timing blocks (ecgfm.timing.rate_interval: 1 / mean time per sample, not a
mean of per-block rates) with the 95% t-interval across blocks, inverted. Caches go to a temporary folder
(``--work``) that is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ecgfm.timing import rate_interval  # noqa: E402

DATA = (ROOT / ".." / "shared" / "data").resolve()


# ------------------------------------------------------------------------------------------------ measuring


def _tree_rss(pid: int) -> int:
    from ecgfm.data.cache import rss_tree_bytes

    return rss_tree_bytes(pid)


def _children_cpu() -> float:
    """User + system CPU seconds of every reaped descendant of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_measured(args: list[str]) -> tuple[dict, float, float, float]:
    """Run this script as a child with ``args``; returns (its JSON result, wall s, peak RSS MiB of its tree,
    CPU s of its tree). The child reaps its own workers, so RUSAGE_CHILDREN counts them when it has exited."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed with {proc.returncode}:\n{out[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak / 2**20, _children_cpu() - cpu0


def load_average() -> str:
    """The 1-minute load average and the CPU count, e.g. ``"load 0.4 on 2 CPUs"``."""
    try:
        return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:  # pragma: no cover
        return f"{os.cpu_count()} CPUs"


def integrity_costs(cache_dir: Path) -> dict:
    """Milliseconds per call of the cache's open-time integrity check (``check="stat"``, the default, vs
    ``"none"`` and ``"full"``) and of :func:`ecgfm.data.cache.input_changes` (medians of repeated calls)."""
    from ecgfm.data.cache import CorpusCache, input_changes

    def ms(fn, n: int) -> float:
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return float(np.median(times))

    inputs = json.loads((cache_dir / "inputs.json").read_text())
    bins = list((cache_dir / "shards").glob("*.bin"))
    return {"shards": len(bins), "shard_mib": sum(p.stat().st_size for p in bins) / 2**20,
            "open_none_ms": ms(lambda: CorpusCache(cache_dir, check="none"), 20),
            "open_stat_ms": ms(lambda: CorpusCache(cache_dir), 20),
            "open_full_ms": ms(lambda: CorpusCache(cache_dir, check="full"), 3),
            "input_files": len(inputs["records"]) + len(inputs["labels"]),
            "input_changes_ms": ms(lambda: input_changes(cache_dir), 5)}


# ------------------------------------------------------------------------------------------------ children


class SubsetSource:
    """The first ``n`` records of a source (picklable wrapper for --quick runs)."""

    def __init__(self, source, n: int):
        self.source, self.n, self.name = source, int(n), source.name

    def record_ids(self):
        return self.source.record_ids()[: self.n]

    def load(self, record_id):
        return self.source.load(record_id)


def _child_convert(spec_json: str) -> None:
    """Child: convert, print the report as JSON (last stdout line)."""
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.readers import CinC2017Source, PTBXLSource
    from ecgfm.data.synthetic import SyntheticSource

    job = json.loads(spec_json)
    if job["kind"] == "real":
        sources = [PTBXLSource(DATA / "ptbxl", fs=100), CinC2017Source(DATA / "cinc2017")]
        if job.get("limit"):
            sources = [SubsetSource(s, job["limit"]) for s in sources]
    else:
        sources = [SyntheticSource(job["n"], seed=0, fs=100.0, duration=job["duration"])]
    rep = prepare_corpus(sources, job["out"], PreprocessSpec(fs=100), shard_records=job["shard_records"],
                         workers=job["workers"], progress=False)
    print(json.dumps({"converted": rep.n_converted, "skipped": rep.n_skipped, "wall_s": rep.wall_s,
                      "records_per_s": rep.records_per_s, "peak_rss_mb_self": rep.peak_rss_mb,
                      "skipped_reasons": rep.skipped_reasons, "cpu_s": rep.cpu_s,
                      "cpu_s_workers": rep.cpu_s_workers, "n_shards": rep.n_shards,
                      "torch_imported": "torch" in sys.modules}))


class NaiveDataset:
    """Per item: wfdb.rdrecord + resample to 100 Hz + random crop (what a loader without a cache does)."""

    def __init__(self, paths: list[str], crop: int, fs: float = 100.0):
        self.paths, self.crop, self.fs = paths, crop, fs

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch
        import wfdb

        from ecgfm.data.preprocess import resample
        from ecgfm.data.record import map_leads

        rec = wfdb.rdrecord(self.paths[i])
        names = ["I" if n.upper() == "ECG" else n for n in rec.sig_name]
        sig12, mask, _ = map_leads(rec.p_signal.T.astype(np.float32), names, self.paths[i])
        sig12 = resample(np.nan_to_num(sig12), rec.fs, self.fs)
        rng = np.random.default_rng(i)
        t = sig12.shape[1]
        s = int(rng.integers(0, max(t - self.crop, 0) + 1))
        x = np.zeros((12, self.crop), np.float32)
        w = sig12[:, s:s + self.crop]
        x[:, : w.shape[1]] = w
        return {"x": torch.from_numpy(x), "lead_mask": torch.from_numpy(mask)}


def _time_loader(loader, n_batches: int, blocks: int, warmup: int = 2) -> tuple[float, float, float, int]:
    """samples/s over ``blocks`` blocks of ``n_batches // blocks`` batches (after ``warmup`` batches)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    per = max(n_batches // blocks, 1)
    counts, times = [], []
    for _ in range(blocks):
        t0, n = time.perf_counter(), 0
        for _ in range(per):
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                b = next(it)
            n += b["x"].shape[0]
        times.append(time.perf_counter() - t0)
        counts.append(n)
    m, lo, hi = rate_interval(counts, times)   # samples / time, not a mean of per-block rates
    return m, lo, hi, sum(counts)


def _cpu_per_sample(loader, n_batches: int) -> float:
    """CPU seconds per sample of ``loader`` run in this process (``num_workers=0``), after one warm-up batch."""
    it = iter(loader)
    next(it)
    t0, n = time.process_time(), 0
    for _ in range(n_batches):
        n += next(it)["x"].shape[0]
    return (time.process_time() - t0) / n


def _child_loaders(job_json: str) -> None:
    import torch
    from torch.utils.data import DataLoader

    from ecgfm.data.datamodules import PretrainDataModule

    job = json.loads(job_json)
    torch.set_num_threads(1)

    def datamodule(workers: int, batches: int) -> PretrainDataModule:
        return PretrainDataModule(job["caches"], crop_samples=job["crop"], batch_size=job["batch"],
                                  num_workers=workers, val_fraction=0.0, seed=0,
                                  samples_per_epoch=(batches + 8) * job["batch"])

    paths = sorted(glob.glob(str(DATA / "ptbxl" / "records100" / "*" / "*_lr.hea")))
    paths += sorted(glob.glob(str(DATA / "cinc2017" / "A*.hea")))
    paths = [p[:-4] for p in paths]
    rng = np.random.default_rng(0)
    paths = [paths[i] for i in rng.permutation(len(paths))]

    def naive_loader(workers: int) -> DataLoader:
        return DataLoader(NaiveDataset(paths, job["crop"]), batch_size=job["naive_batch"], num_workers=workers,
                          shuffle=False, persistent_workers=workers > 0)

    # CPU cost per sample in this one process (independent of the machine's load) ...
    cpu_fast = _cpu_per_sample(datamodule(0, 20).train_dataloader(), 20)
    cpu_naive = _cpu_per_sample(naive_loader(0), 8)
    # ... and throughput with the worker processes.
    fast = _time_loader(datamodule(job["workers"], job["fast_batches"]).train_dataloader(), job["fast_batches"],
                        job["blocks"])
    naive = _time_loader(naive_loader(job["workers"]), job["naive_batches"], job["blocks"], warmup=1)
    print(json.dumps({"fast": fast, "naive": naive, "cpu_fast": cpu_fast, "cpu_naive": cpu_naive}))


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="subsets: 200+200 real records, 500 vs 2,500 synthetic")
    ap.add_argument("--workers", type=int, default=2, help="conversion processes")
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (both loaders)")
    ap.add_argument("--work", default=None, help="folder for the caches (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--skip-synthetic", action="store_true", help="skip the 10k vs 100k memory comparison")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        {"convert": _child_convert, "loaders": _child_loaders}[args._child[0]](args._child[1])
        return
    for folder in ("ptbxl", "cinc2017"):
        if not (DATA / folder).is_dir():
            sys.exit(f"shared data not found at {DATA / folder} (expected ../shared/data beside the project)")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ecgfm-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    limit = 200 if quick else 0
    what = "PTB-XL 100 Hz + CinC 2017" + (f" (first {limit} records of each, --quick)" if quick else
                                          " (all 1,999 + 2,558 records)")
    results: dict = {"data": what, "workers": args.workers, "loader_workers": args.loader_workers,
                     "quick": quick}
    try:
        # 1. conversion --------------------------------------------------------------------------------------
        cache = work / "real"
        shutil.rmtree(cache, ignore_errors=True)
        job = {"kind": "real", "out": str(cache), "workers": args.workers, "shard_records": None, "limit": limit}
        load_before = load_average()
        rep, wall, peak, cpu = run_measured(["--_child", "convert", json.dumps(job)])
        n_rec = rep["converted"] + rep["skipped"]
        serial = cpu - rep["cpu_s_workers"]          # interpreter start, imports, plan, finalise, polling
        projected = serial + rep["cpu_s_workers"] / max(args.workers, 1)
        results["conversion"] = {"records": rep["converted"], "skipped": rep["skipped"], "wall_s": wall,
                                 "records_per_s": n_rec / wall, "cpu_s": cpu, "cpu_ms_per_record": 1000 * cpu / n_rec,
                                 "cpu_s_workers": rep["cpu_s_workers"], "projected_wall_s_idle": projected,
                                 "peak_rss_mb": peak, "n_shards": rep["n_shards"],
                                 "torch_imported": rep["torch_imported"], "skipped_reasons": rep["skipped_reasons"],
                                 "load_before": load_before, "load_after": load_average()}
        print(f"[conversion] {what}, {args.workers} workers, {rep['n_shards']} shards (automatic size): "
              f"{rep['converted']} records converted, {rep['skipped']} skipped (single run)", flush=True)
        print(f"    wall {wall:.1f} s (process start included; {load_before} before, {load_average()} after): "
              f"{n_rec / wall:.1f} records/s")
        print(f"    CPU {cpu:.1f} s user+sys for the whole process tree = {1000 * cpu / n_rec:.2f} ms per record "
              f"(workers {rep['cpu_s_workers']:.1f} s, parent incl. start-up and imports {serial:.1f} s; "
              f"budget: {1000 * 120 / 4557:.1f} ms per record = 120 CPU-s for the 4,557 records in 60 s on 2 cores)")
        print(f"    projected wall on an idle machine with {args.workers} free cores: {projected:.1f} s "
              f"(parent CPU + worker CPU / {args.workers}; target < 60 s for the full sets)")
        print(f"    peak RSS {peak:.0f} MiB (parent + workers, sampled every 50 ms); "
              f"torch imported by the conversion: {rep['torch_imported']}", flush=True)
        for reason, n in rep["skipped_reasons"].items():
            print(f"    skipped {n}: {reason}")

        # 1b. integrity and freshness checks of the finished cache (what every open / prepare_cache call costs)
        results["checks"] = integrity_costs(cache)
        ck = results["checks"]
        print(f"[checks] opening the cache ({ck['shards']} shards, {ck['shard_mib']:.0f} MiB): "
              f"{ck['open_stat_ms']:.1f} ms with the stat check vs {ck['open_none_ms']:.1f} ms without, "
              f"{ck['open_full_ms']:.0f} ms hashing everything; input freshness check "
              f"({ck['input_files']} files): {ck['input_changes_ms']:.0f} ms ({load_average()})", flush=True)

        # 2. loaders ----------------------------------------------------------------------------------------
        job = {"caches": [str(cache)], "crop": 250, "batch": 256, "workers": args.loader_workers,
               "fast_batches": 40 if quick else 200, "naive_batch": 16, "naive_batches": 10 if quick else 40,
               "blocks": 5}
        lo, _, _, _ = run_measured(["--_child", "loaders", json.dumps(job)])
        (fm, flo, fhi, fn), (nm, nlo, nhi, nn) = lo["fast"], lo["naive"]
        ratio = fm / nm
        cpu_ratio = lo["cpu_naive"] / lo["cpu_fast"]
        results["loader"] = {"cached_samples_per_s": [fm, flo, fhi], "cached_samples": fn,
                             "naive_samples_per_s": [nm, nlo, nhi], "naive_samples": nn, "ratio": ratio,
                             "cached_cpu_us_per_sample": 1e6 * lo["cpu_fast"],
                             "naive_cpu_us_per_sample": 1e6 * lo["cpu_naive"], "cpu_ratio": cpu_ratio,
                             "load_after": load_average()}
        print(f"[loader] random 2.5 s crops, 12 leads @ 100 Hz, {args.loader_workers} workers, {what}:")
        print(f"    PretrainDataModule (cache): {fm:,.0f} samples/s (95% CI {flo:,.0f}-{fhi:,.0f}, {fn} samples)")
        print(f"    naive wfdb.rdrecord + resample: {nm:,.1f} samples/s (95% CI {nlo:,.1f}-{nhi:,.1f}, "
              f"{nn} samples)")
        print(f"    ratio {ratio:,.0f}x (target >= 100x; interval of the ratio from the CI ends: "
              f"{flo / nhi:,.0f}-{fhi / nlo:,.0f}x; {load_average()})")
        print(f"    CPU per sample in one process (no workers; single measurement): cache "
              f"{1e6 * lo['cpu_fast']:,.1f} us, naive {1e6 * lo['cpu_naive']:,.0f} us: {cpu_ratio:,.0f}x",
              flush=True)

        # 3. memory flatness ---------------------------------------------------------------------------------
        if not args.skip_synthetic:
            # Equal worker counts in both runs (each run has more shards than workers), so the comparison
            # isolates growth with the corpus size.
            sizes, shard_records = ((500, 2_500), 100) if quick else ((10_000, 100_000), 1024)
            duration = 2.5
            mem = {}
            for n in sizes:
                out = work / f"syn{n}"
                shutil.rmtree(out, ignore_errors=True)
                job = {"kind": "synthetic", "n": n, "duration": duration, "out": str(out),
                       "workers": args.workers, "shard_records": shard_records}
                rep, wall, peak, cpu = run_measured(["--_child", "convert", json.dumps(job)])
                mem[n] = {"peak_rss_mb": peak, "wall_s": wall, "records_per_s": n / wall, "cpu_s": cpu,
                          "cpu_ms_per_record": 1000 * cpu / n}
                print(f"[memory] synthetic corpus of {n:,} records ({duration} s @ 100 Hz), {args.workers} workers, "
                      f"{rep['n_shards']} shards: peak RSS {peak:.0f} MiB (parent + workers, sampled), {wall:.1f} s "
                      f"wall, {n / wall:.0f} records/s, CPU {1000 * cpu / n:.2f} ms per record ({load_average()}; "
                      f"single run)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            a, b = sizes
            growth = mem[b]["peak_rss_mb"] / mem[a]["peak_rss_mb"]
            print(f"    peak memory with {b // a}x more records: x{growth:.2f} (flat when close to 1)")
            results["memory"] = {str(k): v for k, v in mem.items()} | {"growth": growth}
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
