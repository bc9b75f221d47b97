"""scripts/bench_token_cache.py: both extractions give the same tokens, the streamed ones memory-mapped, with their
memory figures (in-process: the script runs each mode in a fresh process only to measure peak memory)."""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_token_cache_measures_memory_and_streamed_extraction(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the streamed token cache goes
    spec = importlib.util.spec_from_file_location("bench_token_cache", ROOT / "scripts" / "bench_token_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cache = mod._synthetic_cache(4, tmp_path)
    runs = [mod._child(argparse.Namespace(mode=m, checkpoint="random:resnet1d_test", cache=str(cache),
                                          window_seconds=5.0, stride_seconds=5.0, threads=1))
            for m in ("memory", "streamed")]
    mem, streamed = runs
    assert (mem["array"], streamed["array"]) == ("ndarray", "memmap")
    assert mem["tokens"] == streamed["tokens"] > 0 and mem["dim"] == streamed["dim"]
    assert mem["tokens_mib"] == streamed["tokens_mib"] > 0 and mem["seconds"] > 0
    assert mem["rss_before_mib"] > 0 and streamed["rss_above_mib"] >= 0
    assert not list(scratch.glob("bench_tokens_*")), "the streamed token cache is left behind"
