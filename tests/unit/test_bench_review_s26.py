"""Review s26 of the benchmark scripts and notebooks (/tmp/s26/bench/REPORT.md, items 1-8): what each script or
notebook cell prints describes what ran. Every test runs the script (or the notebook cell) at toy size, or the small
function it prints through, with the expensive steps stubbed where they do not matter."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_s26", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(nb: str, i: int) -> str:
    return "".join(json.loads((ROOT / "notebooks" / nb).read_text())["cells"][i]["source"])


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- 1. bench_train under bf16
def test_bench_train_bf16_peak_times_the_linear_path_autocast_takes(monkeypatch, one_thread):
    """MFU = FLOPs x steps/s / peak; under --bf16 on CPU the peak timed torch.matmul only, which (without native
    bf16) runs several times slower than the F.linear (oneDNN) path autocast's linears take: MFU read > 100 %.
    The peak must time F.linear too, and be the fastest product timed (structural: no speed is compared here)."""
    bt = _script("bench_train")
    calls = []
    real_linear, real_matmul = torch.nn.functional.linear, torch.matmul

    def linear(a, b, *rest):
        calls.append(("linear", a.dtype))
        time.sleep(0.001)          # the fast product
        return real_linear(a, b, *rest)

    def matmul(a, b):
        calls.append(("matmul", a.dtype))
        time.sleep(0.02)           # the slow kernel
        return real_matmul(a, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    monkeypatch.setattr(torch, "matmul", matmul)
    n = 32
    peak = bt.matmul_peak("cpu", torch.bfloat16, n, 2)
    assert ("linear", torch.bfloat16) in calls and ("matmul", torch.bfloat16) in calls
    assert peak > 2 * n ** 3 / 0.02, f"peak {peak:.3g} FLOP/s is the slow product's"


def test_bench_train_bf16_labels_say_what_ran_and_flag_an_mfu_above_100(monkeypatch, one_thread):
    """Under --bf16 the linears take F.linear (ecgfm.accel uses oneDNN only outside autocast and compile): no
    'CPU linears on oneDNN' header, no reference_onednn row that reruns the reference; and an MFU above 100 % (here
    forced by a tiny peak) is flagged as an underestimated peak, not printed as a utilisation."""
    bt = _script("bench_train")
    monkeypatch.setattr(bt, "matmul_peak", lambda *a, **k: 1e6)        # 1 MFLOP/s: every MFU is far above 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = bt.main(["--size", "test", "--seq-len", "250", "--patch-size", "25", "--decoder-dim", "16",
                          "--decoder-depth", "1", "--decoder-heads", "2", "--steps", "2", "--warmup", "1",
                          "--threads", "1", "--bf16", "--methods", "reference,reference_onednn,mae_stmem"])
    text = out.getvalue()
    assert "CPU linears on oneDNN" not in text and "both with oneDNN linears" not in text
    assert "CPU linears on F.linear (oneDNN path not used under bf16 autocast" in text
    assert "reference_onednn skipped" in text
    assert [r["method"] for r in report["results"]] == ["reference", "mae_stmem"]
    assert all(r["mfu"] > 1 for r in report["results"])
    assert "WARNING: MFU above 100 % (reference, mae_stmem): the measured peak is underestimated" in text
    assert report["mfu_above_peak"] == ["reference", "mae_stmem"]


# ---------------------------------------------------------------------------------- 2. bench_explain SmoothGrad
def test_bench_explain_smoothgrad_label_matches_what_a_pass_holds(one_thread):
    """The row said '<bs> noise samples x <n> ECGs per pass'; ecgfm's smoothgrad explains one record at a time, so
    a pass holds at most min(bs, --sg-samples) noisy copies of ONE ECG. The label now says that number, which is
    what a forward pass holds, and no batch size above --sg-samples is tried."""
    be = _script("bench_explain")
    from ecgfm.explain.attribution import Explainer
    from ecgfm.explain.wrapper import ECGWrapper

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = be.main(["--n", "4", "--fs", "100", "--duration", "2.5", "--repeats", "1", "--train-steps", "0",
                       "--loop-n", "1", "--ig-steps", "4", "--sg-samples", "4", "--threads", "1"])
    m = re.search(r"SmoothGrad ecgfm \(NoiseTunnel, (\d+) noise copies of one ECG per pass, ECGs one at a time\)",
                  out.getvalue())
    assert m is not None, out.getvalue()
    copies, bs = int(m.group(1)), res["smoothgrad_ecgfm"]["nt_samples_batch_size"]
    assert bs <= 4 and copies == min(bs, 4)
    model = be.SmallCNN().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seen: list[int] = []
    model.register_forward_hook(lambda mod, inp, o: seen.append(int(inp[0].shape[0])))
    Explainer(ECGWrapper(model, fs=100.0)).explain(torch.randn(4, 12, 250), target=torch.zeros(4, dtype=torch.long),
                                                   method="smoothgrad", n_samples=4, noise_level=0.15, batch_size=bs)
    # the first forward is explain's own pass over the 4 ECGs (their logits resolve the targets), not a noise pass:
    # counted, it made the test fail whenever the benchmark's timing chose a batch below 4
    noise = seen[1:]
    assert seen[0] == 4 and max(noise) == copies, f"label says {copies} copies per pass, passes held {max(noise)}"


# ------------------------------------------------------------------------ 3, 7. benchmark.ipynb cells 3 and 4
def _toy_summary():
    from ecgfm.evaluate.report import summarize

    base = dict(mode="linear", task="t", dataset="d", split="test", label="mae", method="mae", backbone="b",
                checkpoint="c", checkpoint_id="ck", recipe_id="r", fraction=1.0, seed=0, n_train=10, n_test=50,
                metric="macro_auroc", value=0.8, ci_low=0.7, ci_high=0.9, cell="x", leakage="")
    rows = [base]                                                                  # one seed
    rows += [dict(base, label="simclr", method="simclr", checkpoint_id="ck2", seed=s, value=0.75)
             for s in (0, 1, 2)]                                                   # three seeds, one result
    rows += [dict(base, label="byol", method="byol", checkpoint_id="ck3", seed=s, value=0.7 + 0.02 * s,
                  ci_low=np.nan, ci_high=np.nan) for s in (0, 1)]                  # a spread, no bootstrap
    return summarize(pd.DataFrame(rows), "macro_auroc")


def test_benchmark_notebook_gives_no_sd_of_zero_for_one_result_and_no_nan_ci():
    """results.md prints 'n/a' for the sd of one seed (or of seeds that all gave one result) and 'no CI' without a
    bootstrap; the notebook's table printed '+- 0.000' and '[nan, nan]'."""
    ns = {"summary": _toy_summary(), "pd": pd}
    exec(_cell("benchmark.ipynb", 3), ns)
    entries = dict(zip(ns["table"]["label"], ns["table"]["entry"]))
    assert entries["mae"] == "0.800 +- n/a [0.700, 0.900] (1)"
    assert entries["simclr"] == "0.750 +- n/a [0.700, 0.900] (3, identical)"
    assert entries["byol"] == "0.710 +- 0.014 [no CI] (2)"
    assert not [e for e in entries.values() if "+- 0.000" in e or "nan" in e]


def test_benchmark_notebook_per_class_plots_every_task(monkeypatch):
    """Cell 4 kept the largest fraction of the whole table: a task swept to a smaller maximum got no plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    rows = [dict(task=t, split="test", label="mae", mode="linear", fraction=f, seed=0, metric=f"auroc[{c}]",
                 value=0.8) for t, fr in (("ptbxl_super", (0.1, 1.0)), ("cinc2017", (0.1, 0.5)))
            for f in fr for c in ("A", "B")]
    ns = {"df": pd.DataFrame(rows), "plt": plt, "pd": pd}
    try:
        exec(_cell("benchmark.ipynb", 4), ns)
    finally:
        plt.close("all")
    top = ns["top"]
    assert set(top["task"]) == {"ptbxl_super", "cinc2017"}
    assert dict(top.groupby("task")["fraction"].unique().map(list)) == {"ptbxl_super": [1.0], "cinc2017": [0.5]}


# ------------------------------------------------------------------------------- 4. explain.ipynb cell 7 timing
_EXPLAIN_CELL_HARNESS = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, "scripts")
import torch
torch.set_num_threads(1)
from bench_explain import SmallCNN
from ecgfm.explain import Explainer
from ecgfm.explain.wrapper import ECGWrapper
assert "captum" not in sys.modules          # a fresh kernel: the notebook's imports do not load captum
torch.manual_seed(0)
wrapper = ECGWrapper(SmallCNN(5).eval(), fs=100.0, class_names=["NORM", "MI", "STTC", "CD", "HYP"])
x = torch.randn(1, 12, 1000)
ns = dict(Explainer=Explainer, wrapper=wrapper, x=x, record=SimpleNamespace(record_id="r"), OUT=Path("."),
          display_signal=lambda r, w: (x[0].numpy(), "a.u."), display=lambda *a, **k: None,
          Image=lambda *a, **k: None,
          viz=SimpleNamespace(plot_ecg_chart=lambda *a, **k: None, save_figure=lambda *a, **k: ["f.png"]))
calls = []   # (method, result) of every Explainer.explain call, in order
real = Explainer.explain
def spy(self, *a, **k):
    out = real(self, *a, **k)
    calls.append((k.get("method", a[2] if len(a) > 2 else None), out))
    return out
Explainer.explain = spy
exec(CELL, ns)
from ecgfm.explain.attribution import canonical_method
names = [canonical_method(m) for m, _ in calls]
first = {m: names.index(m) for m in set(names)}
printed = {canonical_method(m): next(i for i, (_, o) in enumerate(calls) if o is att)
           for m, att in ns["atts"].items()}
print(json.dumps({"first_call": {m: first[m] for m in printed}, "printed_call": printed}))
"""


def test_explain_notebook_times_the_methods_after_a_warm_up(tmp_path):
    """notebooks/explain.ipynb cell 7 printed elapsed_s of IG, Grad-CAM and occlusion from a fresh kernel, IG first:
    IG's figure carried the captum import and first-call set-up (~0.6-0.8 s against ~0.03 s warm). The cell, run
    in a fresh process on a small CNN (plots stubbed): the IG time it prints is a warm one, and it says so."""
    script = tmp_path / "cell7.py"
    script.write_text(f"CELL = {_cell('explain.ipynb', 7)!r}\n" + _EXPLAIN_CELL_HARNESS)
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    t = json.loads(out.stdout.strip().splitlines()[-1])
    # structural, not a timing comparison: every method the cell times was called once before the call it prints
    assert all(t["printed_call"][m] > t["first_call"][m] for m in t["printed_call"]), t
    assert set(t["printed_call"]) >= {"integrated_gradients"}, t
    assert "after an untimed warm-up call of each" in out.stdout


# --------------------------------------------------------------------------------------- 5. bench_token_cache
def test_bench_token_cache_rise_is_above_the_process_size_not_its_earlier_peak(tmp_path, monkeypatch, one_thread):
    """A transient peak while loading (an exported encoder's weights are read, then copied) was subtracted from the
    extraction's rise: the base was the peak so far (VmHWM). Now the base is the process's size (VmRSS) with the
    peak reset there, as bench_probe resets it before a cell; where the reset is refused no rise is given."""
    tc = _script("bench_token_cache")
    import ecgfm.evaluate.sweep as S

    cache = tc._synthetic_cache(20, tmp_path)
    real = S.resolve_checkpoint

    def loading_with_a_transient(*a, **k):
        out = real(*a, **k)
        junk = np.ones(400 * 2**18, np.float32)          # 400 MiB touched, then freed (as a weights copy would be)
        del junk
        return out

    monkeypatch.setattr(S, "resolve_checkpoint", loading_with_a_transient)
    args = types.SimpleNamespace(threads=1, cache=str(cache), window_seconds=10.0, stride_seconds=5.0,
                                 checkpoint="random:resnet1d_tiny", mode="memory")
    r = tc._child(args)
    assert r["rss_above_mib"] > 10, f"extraction rise read {r['rss_above_mib']:.0f} MiB above a base of " \
                                    f"{r['rss_before_mib']:.0f} MiB (the loading peak, not the process's size)"
    assert r["peak_reset"] is True and "MiB above the" in tc._rise_text(r)
    import bench_probe                                   # the reset bench_token_cache reuses

    monkeypatch.setattr(bench_probe, "reset_peak_rss", lambda: False)
    r = tc._child(args)
    assert r["peak_reset"] is False and r["rss_above_mib"] is None
    assert tc._rise_text(r).startswith("peak RSS rise n/a (peak reset refused")


# --------------------------------------------------------------------------------------------- 6, 8. bench_probe
@pytest.fixture(scope="module")
def bench_probe_run(tmp_path_factory):
    """One --no-warmup run of bench_probe (2 cells) with a kept work folder, counting build_report calls wherever
    they come from (the per-cell report of probe_main, or the script's own)."""
    import ecgfm.evaluate.report as R
    import ecgfm.evaluate.sweep as S

    bp = _script("bench_probe")
    work = tmp_path_factory.mktemp("bench_probe_s26")
    calls: list[str] = []
    real_s, real_r = S.build_report, R.build_report
    S.build_report = lambda *a, **k: (calls.append("probe_main"), real_s(*a, **k))[1]
    R.build_report = lambda *a, **k: (calls.append("script"), real_r(*a, **k))[1]
    before = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            bp.main(["--checkpoints", "random:resnet1d_test", "--tasks", "synthetic", "--fractions", "1",
                     "--seeds", "0", "1", "--synthetic-records", "40", "--bootstrap", "10", "--threads", "1",
                     "--no-warmup", "--work", str(work), "prepare_workers=0", "probe.Cs=[1.0]"])
    finally:
        S.build_report, R.build_report = real_s, real_r
        torch.set_num_threads(before)
    return out.getvalue(), calls, work


def test_bench_probe_builds_the_report_once_like_a_multirun(bench_probe_run):
    """bench_probe says it runs the cells as `python probe.py -m` does; a multirun builds the report once
    (ReportCallback), bench_probe's compose()d cells rebuilt it after every cell (report=auto is not a multirun),
    inside the per-cell seconds it prints. Now: report=never per cell, one build after the timed cells."""
    text, calls, work = bench_probe_run
    assert calls == ["script"], calls                                   # one lead mode: one table, after the cells
    table = (work / "results" / "aware" / "results.md").read_text()
    assert "## macro_auroc | task synthetic" in table and "s0,1 (2" in table        # both seeds' cells in it
    md = work / "results" / "results.md"                                # the path printed: the tables, per mode
    assert md.is_file() and "**Lead mode aware**" in md.read_text() and table in md.read_text()
    assert f"results table: {md} (one per lead mode; built once after the timed cells" in text


def test_bench_probe_cold_run_says_first_call_set_up_not_process_start_up(bench_probe_run):
    """The windows/s come from STATS["seconds"], timed inside extract_features: a cold run's first extraction
    includes first-call set-up, not process start-up."""
    text, _, _ = bench_probe_run
    assert "cold: the first extraction includes first-call set-up (--no-warmup)" in text
    assert "process start-up" not in text


# ------------------------------------------------------------------------------------------- 8. perclass_val
def test_perclass_val_says_it_fits_on_the_full_training_split(tmp_path, monkeypatch, capsys):
    """A --cell contributes only its feature file: the regression is fitted on all training records whatever the
    cell's fraction (an f0.1 cell gives 100 %-label numbers); the output said nothing of it."""
    from tests.unit.test_scripts_review_s20 import run_perclass_val

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 5))
    x[np.arange(120), y] += 1.5
    train, val = np.arange(0, 120, 2), np.arange(1, 120, 2)
    out = run_perclass_val(tmp_path, monkeypatch, capsys, x, y, train, val, bootstrap=20, fraction=0.1)
    assert ("train: all 60 training records (the cell's fraction is not used; the cells were run at fraction 0.1)"
            in out)


# --------------------------------------------------------------------------------------------- 8. bench_data
def test_bench_data_loader_timing_drains_the_workers_prefetched_batches(monkeypatch):
    """DataLoader workers hold prefetch_factor x num_workers batches ready before the first is asked for; timing
    started after 1-2 warm-up batches gave the first block some of them free. A fake loader (2 workers x 2
    prefetched = 4 ready batches, 1 ms each to hand over, then 10 ms a batch) on a fake clock: the rate is the
    production rate."""
    bd = _script("bench_data")
    clock = [0.0]
    monkeypatch.setattr(bd, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Loader:
        num_workers, prefetch_factor = 2, 2

        def __iter__(self):
            for k in range(100):
                clock[0] += 0.001 if k < 4 else 0.01        # the 4 prefetched batches are ready at once
                yield {"x": np.zeros((8, 1))}

    rate, lo, hi, total = bd._time_loader(Loader(), n_batches=10, blocks=5, warmup=1)
    assert total == 80
    assert rate == pytest.approx(8 / 0.01), f"{rate:.0f} samples/s: prefetched batches timed as free"
    assert bd.prefetched_batches(Loader()) == 4
    no_workers = types.SimpleNamespace(num_workers=0, prefetch_factor=None)
    assert bd.prefetched_batches(no_workers) == 0
