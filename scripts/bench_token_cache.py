"""Peak memory and time of frozen-token extraction (the attention probe's input): collected in memory
(``extract_tokens``) against streamed to the memory-mapped token cache (``cached_tokens``), each in a fresh process.

Prints, per mode, the tokens (count x width, MiB float16), the time, and the peak resident set size during the
extraction above the process's size (VmRSS) once the encoder and the corpus are open, so the difference is what
holding the tokens costs. The peak is reset at that point as ``scripts/bench_probe.py`` resets it before a cell
(freed memory handed back, then Linux ``clear_refs``), so a transient peak while loading (an exported encoder's
weights are read, then copied) is neither counted nor subtracted; where the reset is refused no rise is given::

    python scripts/bench_token_cache.py                                   # random 1-D ResNet, 300 synthetic records
    python scripts/bench_token_cache.py --checkpoint runs/cnn_ssl/simclr_d3600/encoder \\
        --cache cache/cinc2017-918a13402267 --window-seconds 10 --stride-seconds 5

Figures (2026-12-05, 1 thread, CinC 2017 through the SimCLR 1-D ResNet, 10 s windows every 5 s, 454,624 tokens x
256 = 222 MiB): in memory +736 MiB, streamed +233 MiB, 27-28 s each (docs/BENCHMARK.md, attention probe).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def _rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM; ``getrusage`` where /proc is not readable), MiB."""
    from ecgfm.timing import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def _reset_base() -> tuple[float | None, bool]:
    """The process's size now (VmRSS, MiB; None where /proc is not readable) after handing freed memory back, and
    whether its peak (VmHWM) was reset to it: bench_probe's reset before a cell (``_reset_peak_memory``), reused."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import bench_probe
    from ecgfm.timing import proc_status_bytes

    bench_probe._reset_peak_memory()
    rss = proc_status_bytes("VmRSS")
    return (None if rss is None else rss / 2**20), bool(bench_probe._PEAK_RESET["ok"])


def _rise_text(r: dict) -> str:
    """The printed memory figure of one extraction (``r``: :func:`_child`'s result)."""
    if r.get("rss_above_mib") is None:
        held = "" if r.get("rss_before_mib") is None else f"; the process held {r['rss_before_mib']:.0f} MiB before it"
        return (f"peak RSS rise n/a (peak reset refused: the peak {r['rss_peak_mib']:.0f} MiB is the process's since "
                f"start{held})")
    return (f"peak RSS {r['rss_above_mib']:.0f} MiB above the {r['rss_before_mib']:.0f} MiB of the loaded encoder and "
            "corpus")


def _child(args: argparse.Namespace) -> dict:
    """One extraction in this process; the result as a dict."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from ecgfm.data.cache import CorpusCache
    from ecgfm.evaluate.features import cached_tokens, extract_tokens
    from ecgfm.evaluate.sweep import resolve_checkpoint

    torch.set_num_threads(args.threads)
    cache = CorpusCache(args.cache)
    fs = float(cache.manifest.get("spec", {}).get("fs") or 100.0)
    window, stride = int(round(args.window_seconds * fs)), int(round(args.stride_seconds * fs))
    backbone = resolve_checkpoint(args.checkpoint, window).backbone
    base, reset = _reset_base()          # the size of the loaded process, its peak reset to it
    with tempfile.TemporaryDirectory(prefix="bench_tokens_") as scratch:  # the token cache is removed afterwards
        t0 = time.perf_counter()
        if args.mode == "memory":
            ts = extract_tokens(backbone, cache, window, stride)
        else:
            ts = cached_tokens(backbone, cache, window, stride, scratch)
        seconds = time.perf_counter() - t0
        peak = _rss_mib()
        result = {"mode": args.mode, "array": type(ts.tokens).__name__, "tokens": int(ts.tokens.shape[0]),
                  "dim": ts.dim, "tokens_mib": ts.nbytes / 2**20, "seconds": seconds, "rss_before_mib": base,
                  "rss_peak_mib": peak, "peak_reset": reset,
                  "rss_above_mib": peak - base if reset and base is not None else None}
        del ts
    return result


def _synthetic_cache(n: int, work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from ecgfm.data.cache import prepare_corpus
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import SyntheticSource

    out = work / "synthetic"
    prepare_corpus(SyntheticSource(n, seed=0, fs=100.0, duration=30.0), out, PreprocessSpec(fs=100), workers=0,
                   progress=False)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="random:resnet1d_tiny", help="exported encoder or random:<backbone>")
    ap.add_argument("--cache", default=None, help="a corpus cache folder (default: synthetic 30 s records)")
    ap.add_argument("--records", type=int, default=300, help="synthetic records (without --cache)")
    ap.add_argument("--window-seconds", type=float, default=10.0)
    ap.add_argument("--stride-seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["memory", "streamed"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:                                      # the child: one extraction, JSON on the last line
        print(json.dumps(_child(args)))
        return []
    with tempfile.TemporaryDirectory(prefix="bench_token_cache_") as work:
        cache = args.cache or str(_synthetic_cache(args.records, Path(work)))
        out = []
        for mode in ("memory", "streamed"):
            cmd = [sys.executable, __file__, "--mode", mode, "--checkpoint", args.checkpoint, "--cache", cache,
                   "--window-seconds", str(args.window_seconds), "--stride-seconds", str(args.stride_seconds),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            out.append(r)
            print(f"{mode:<8} ({r['array']}): {r['tokens']:,} tokens x {r['dim']} = {r['tokens_mib']:.0f} MiB "
                  f"float16 in {r['seconds']:.1f} s; {_rise_text(r)} ({args.threads} thread(s))")
    return out


if __name__ == "__main__":
    main()
