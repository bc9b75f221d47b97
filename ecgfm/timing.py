"""Throughput with a confidence interval, and a portable peak-memory reading, for the benchmark scripts
(``scripts/bench_*.py``).

A rate is items per second of *all* the timed work: ``1 / mean(seconds per item)`` over timed blocks, with the
95 % t-interval of the mean seconds per item, inverted. The mean of per-block *rates* is not a throughput: a few
fast blocks raise it far above items / time whenever block times vary (one 10 ms and one 100 ms step average to
~5.5x the rate of the slow one, while the run did 2 steps in 110 ms). Not in a library: scipy gives the t quantile,
the inversion is one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


def rate_interval(items: Sequence[float] | float, seconds: Sequence[float]) -> tuple[float, float, float]:
    """Items per second over timed blocks, with a 95 % interval.

    Args:
        items: items (samples, windows) done in each block, or one count for every block.
        seconds: wall time of each block.

    Returns:
        ``(rate, low, high)``: ``1 / mean(seconds_i / items_i)`` (= total items / total time when every block did
        the same number of items) and the t-interval of the mean time per item, inverted (``high`` is ``inf``
        when that interval reaches 0); NaN bounds with fewer than two blocks.
    """
    t = np.asarray(seconds, dtype=np.float64)
    n = np.broadcast_to(np.asarray(items, dtype=np.float64), t.shape)
    if t.size == 0 or (n <= 0).any() or (t <= 0).any():
        raise ValueError(f"rate_interval needs positive block times and item counts, got {t.tolist()} / "
                         f"{n.tolist()}")
    per = t / n
    mean = float(per.mean())
    if per.size < 2:
        return 1.0 / mean, float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.975, per.size - 1) * per.std(ddof=1) / math.sqrt(per.size))
    return 1.0 / mean, 1.0 / (mean + half), (1.0 / (mean - half) if mean > half else float("inf"))


def max_rss_bytes() -> int:
    """Peak resident set size of this process since start, in bytes, from ``getrusage`` (the fallback where
    ``/proc/self/status`` cannot be read): ``ru_maxrss`` is in bytes on macOS and in KiB on Linux and the other
    platforms."""
    import resource
    import sys

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def proc_status_bytes(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (``VmHWM``: peak resident set size since start or since
    :func:`reset_peak_rss`; ``VmRSS``: resident set size now), in bytes; None where the file cannot be read (off
    Linux) or has no such field. The one place the benchmark scripts read ``/proc`` for memory figures."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024                     # "VmHWM:   123456 kB"
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes: ``VmHWM`` (since start, or since the last
    :func:`reset_peak_rss` that was accepted), else :func:`max_rss_bytes` (since start: ``getrusage`` has no reset)."""
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else max_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (``VmHWM``) to its current size, by writing 5 to
    ``/proc/self/clear_refs`` (Linux). Returns whether the reset was accepted: where it was not, ``VmHWM`` stays
    the peak since start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
