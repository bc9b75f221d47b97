"""ecgfm.timing.rate_interval: a throughput is items / time, not the mean of per-block rates."""

from __future__ import annotations

import math

import pytest

from ecgfm.timing import rate_interval


def test_rate_is_items_over_time_not_a_mean_of_rates():
    rate, lo, hi = rate_interval(8, [0.01, 0.1])          # 16 samples in 0.11 s
    assert rate == pytest.approx(16 / 0.11)               # the mean of rates would say 440
    assert lo < rate < hi
    same, lo1, hi1 = rate_interval(8, [0.05] * 4)
    assert same == pytest.approx(160.0) and lo1 == pytest.approx(160.0) and hi1 == pytest.approx(160.0)


def test_rate_with_unequal_blocks_and_degenerate_inputs():
    rate, _, _ = rate_interval([100, 50], [1.0, 0.5])     # both blocks at 100 items/s
    assert rate == pytest.approx(100.0)
    one, lo, hi = rate_interval([10], [2.0])
    assert one == 5.0 and math.isnan(lo) and math.isnan(hi)
    assert rate_interval(1, [0.001, 1.0])[2] == math.inf  # the interval of the time per item reaches 0
    with pytest.raises(ValueError, match="positive"):
        rate_interval(0, [1.0, 1.0])


def test_bench_data_loader_rate_is_samples_over_time(monkeypatch):
    """scripts/bench_data.py's loader throughput on a fake loader whose blocks alternate 1 ms / 50 ms: samples /
    timed time (the old mean of per-block rates said ~3x that). A fake clock, not real sleeps: a loaded CI machine
    oversleeps by milliseconds and made the exact rate a timing lottery."""
    import importlib.util
    import types
    from pathlib import Path

    import numpy as np

    spec = importlib.util.spec_from_file_location(
        "bench_data", Path(__file__).resolve().parents[2] / "scripts" / "bench_data.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    clock = [0.0]
    monkeypatch.setattr(bd, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    slept: list[float] = []

    def loader():
        for k in range(12):
            d = 0.0 if k < 2 else (0.001 if (k - 2) // 2 % 2 == 0 else 0.05)   # 2 warm-up batches, then blocks
            clock[0] += d
            slept.append(d)
            yield {"x": np.zeros((256, 1))}

    class Loader:
        def __iter__(self):
            return loader()

    rate, lo, hi, total = bd._time_loader(Loader(), n_batches=8, blocks=4)
    assert total == 8 * 256
    timed = sum(slept[2:10])
    assert rate == pytest.approx(total / timed) and lo <= rate <= hi
    assert rate < 0.5 * np.mean([512 / 0.002, 512 / 0.1])   # not the mean of the per-block rates


def test_training_throughput_leaves_validation_time_out(monkeypatch):
    """ThroughputCallback's train/samples_per_s: 8 samples per 0.1 s step; a 1 s validation between steps must not
    show as a collapsed rate for the windows spanning it."""
    import types

    import torch

    import ecgfm.train.loop as loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    logged: list[float] = []
    trainer = types.SimpleNamespace(world_size=1, sanity_checking=False)
    module = types.SimpleNamespace(log=lambda name, value, **kw: logged.append(value))
    cb = loop.ThroughputCallback(window_size=3)
    cb.on_train_start(trainer, module)
    batch = {"x": torch.zeros(8, 12, 10)}
    for step in range(8):
        clock[0] += 0.1
        cb.on_train_batch_end(trainer, module, None, batch, step)
        if step == 3:                                   # an end-of-epoch validation of 1 s
            cb.on_validation_start(trainer, module)
            clock[0] += 1.0
            cb.on_validation_end(trainer, module)
    assert logged and all(v == pytest.approx(80.0) for v in logged)
