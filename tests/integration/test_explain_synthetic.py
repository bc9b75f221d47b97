"""Acceptance checks of the explain stage on a classifier trained on the synthetic corpus.

Task: normal sinus rhythm vs premature ventricular beats (100 Hz, 2.5 s). The synthetic corpus marks each ectopic
beat (QRS onset to T offset, all leads) as the class evidence, so a faithful explanation of "PVC" should put its
mass there. The tiny CNN trains in a few seconds (session fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.data.preprocess import bandpass
from ecgfm.data.record import ECGDataError
from ecgfm.data.synthetic import SYNTHETIC_CLASSES, generate_arrays
from ecgfm.explain.attribution import Explainer
from ecgfm.explain.faithfulness import compare_with_random, localisation, mean_ci, randomisation_check
from ecgfm.explain.wrapper import ECGWrapper

FS = 100.0
T = 250
PVC = SYNTHETIC_CLASSES.index("premature_ventricular_beats")
NSR = SYNTHETIC_CLASSES.index("normal_sinus")


class TinyCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(12, width, 7, padding=3), nn.ReLU(),
                                      nn.Conv1d(width, width, 7, padding=3, stride=2), nn.ReLU(),
                                      nn.Conv1d(width, width, 7, padding=3, stride=2), nn.ReLU())
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


@pytest.fixture(scope="session")
def trained():
    """(wrapper, validation PVC records (12, 12, T), their evidence masks, validation accuracy)."""
    x, y, ev = generate_arrays(2700, seed=0, fs=FS, duration=T / FS)
    keep = np.isin(y, [NSR, PVC])
    x, y, ev = bandpass(x[keep], FS, 0.5, None), (y[keep] == PVC).astype(np.int64), ev[keep]
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    n_train = int(0.75 * len(yt))
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        perm = torch.randperm(n_train)
        for i in range(0, n_train, 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt[n_train:]).argmax(1) == yt[n_train:]).float().mean().item()
    val = torch.arange(n_train, len(yt))
    val = val[yt[val] == 1][:12]
    wrapper = ECGWrapper(model, fs=FS, class_names=("normal_sinus", "premature_ventricular_beats"),
                         n_samples=T, encoder=model.features)
    return wrapper, xt[val], torch.from_numpy(ev[val.numpy()]), acc


def test_classifier_learned_the_task(trained):
    wrapper, x, _, acc = trained
    assert acc >= 0.9, acc
    assert (wrapper.predict_proba(x)[:, 1] > 0.5).float().mean() >= 0.8


def test_ig_completeness_and_agreement_with_captum(trained):
    from captum.attr import IntegratedGradients

    wrapper, x, _, _ = trained
    att = Explainer(wrapper).explain(x, target=1, method="ig", baselines="zeros", n_steps=16)
    ref = IntegratedGradients(wrapper.model).attribute(x, baselines=torch.zeros_like(x), target=1, n_steps=16,
                                                       method="gausslegendre")
    assert torch.allclose(att.values, ref, atol=1e-5)
    with torch.no_grad():
        diff = wrapper(x)[:, 1] - wrapper(torch.zeros_like(x))[:, 1]
    # the Riemann error of a ReLU network's kinks shrinks with the steps: the max over records (2 % at 64 steps
    # with the synthetic noise of generator 2, 0.4 % before) is checked where it has converged
    rels = {}
    for steps in (16, 64, 256):
        if steps != 16:
            att = Explainer(wrapper).explain(x, target=1, method="ig", baselines="zeros", n_steps=steps)
        err = (att.values.sum((1, 2)) - diff).abs()
        assert torch.allclose(err, att.delta.abs(), atol=1e-4)
        rel = err / diff.abs()
        print(f"\n[synthetic PVC val, n={len(x)}] IG ({steps} Gauss-Legendre steps) completeness error mean "
              f"{err.mean():.2e} max {err.max():.2e}; relative to |f(x) - f(0)| (mean {diff.abs().mean():.2f}): "
              f"mean {rel.mean():.2%} max {rel.max():.2%}")
        rels[steps] = rel
    assert rels[64].mean() < 0.01 and rels[256].max() < 0.01
    assert rels[256].max() < rels[64].max() < rels[16].max()


@pytest.mark.parametrize("method,options", [("input_x_gradient", {}), ("integrated_gradients", {}),
                                            ("occlusion", {"window_s": 0.2})])
def test_attribution_mass_inside_evidence_and_beats_random(trained, method, options):
    wrapper, x, ev, _ = trained
    att = Explainer(wrapper).explain(x, target=1, method=method, **options)
    loc = localisation(att, ev)
    mass = mean_ci(loc["mass_positive"])
    chance = loc["mask_fraction"].mean().item()
    cmp = compare_with_random(wrapper, x, att, n_random=1, steps=8)
    gain = cmp["deletion_aopc_gain"]
    print(f"\n[synthetic PVC val, n={len(x)}] {method}: positive mass in evidence {mass['mean']:.3f} "
          f"(95% CI {mass['lo']:.3f}-{mass['hi']:.3f}; chance {chance:.3f}); AUROC "
          f"{mean_ci(loc['auroc'])['mean']:.3f}; deletion AOPC {cmp['deletion_aopc']['mean']:.3f} vs random "
          f"{cmp['random_deletion_aopc']['mean']:.3f} (gain CI {gain['lo']:.3f}-{gain['hi']:.3f})")
    assert mass["mean"] > 0.5 and mass["mean"] > 2 * chance
    assert gain["lo"] > 0


@pytest.mark.parametrize("method", ["saliency", pytest.param("integrated_gradients", marks=pytest.mark.slow)])
def test_randomisation_changes_attributions(trained, method):
    wrapper, x, _, _ = trained
    opts = {"n_steps": 8} if method == "integrated_gradients" else {}
    res = randomisation_check(Explainer(wrapper), x[:8], method, target=1, **opts)
    print(f"\n[synthetic PVC val, n=8] {method} cascading randomisation, Spearman after each layer (abs / signed): "
          + ", ".join(f"{s['layer']} {s['spearman_abs']['mean']:.2f} / {s['spearman_signed']['mean']:.2f}"
                      for s in res["summary"]))
    assert res["spearman_abs"][-1].mean() < 0.9 and res["spearman_signed"][-1].mean() < 0.5


def test_explaining_the_encoder_without_the_head(trained):
    wrapper, x, ev, _ = trained
    att = Explainer(wrapper).explain_embedding(x[:4], method="ig", n_steps=32)
    assert att.values.shape == (4, 12, T) and att.delta.abs().max() < 0.05 * att.values.sum((1, 2)).abs().max()
    sim = Explainer(wrapper).explain_embedding(x[:4], reference=x[4], method="occlusion")
    assert sim.values.shape == (4, 12, T)


def test_bad_inputs_fail_clearly(trained):
    wrapper, x, _, _ = trained
    ex = Explainer(wrapper)
    with pytest.raises(ValueError, match="11 leads but the model expects 12"):
        ex.explain(x[:1, :11], method="saliency")
    with pytest.raises(ECGDataError, match="sampling rate unknown"):
        wrapper.prepare(np.zeros((12, 1250), dtype=np.float32))          # 500 Hz data, rate not given
    with pytest.raises(ValueError, match="1250 samples but the model expects 250"):
        ex.explain(torch.zeros(1, 12, 1250), method="saliency")
    assert wrapper.prepare(np.zeros((12, 1250), dtype=np.float32), fs=500).shape == (1, 12, T)
    bad = x[:1].clone()
    bad[0, 4, 100] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ex.explain(bad, method="ig")
    with pytest.raises(ValueError, match=r"target \[2\] outside the model's 2 classes"):
        ex.explain(x[:1], target=2, method="ig")
    with pytest.raises(ValueError, match="no layer named 'features.9'"):
        ex.explain(x[:1], method="gradcam", layer="features.9")


def test_bench_script_smoke(tmp_path):
    """scripts/bench_explain.py end to end at toy size: the loop, captum and ecgfm IG agree and the ecgfm
    quadrature is at least as complete as the loop's Riemann sum."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_explain.py"
    spec = importlib.util.spec_from_file_location("bench_explain", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    res = bench.main(["--n", "2", "--fs", "100", "--duration", "2.5", "--repeats", "1", "--loop-n", "1",
                      "--ig-steps", "10", "--sg-samples", "2", "--train-steps", "2", "--occ-window", "0.5",
                      "--occ-stride", "0.5", "--json", str(out)])
    assert json.loads(out.read_text())["n_ecgs"] == 2
    assert res["ig_captum_riemann"]["max_abs_diff_vs_loop"] < 1e-5
    assert res["ig_ecgfm"]["completeness_mean"] <= res["ig_loop"]["completeness_mean"]
    assert res["occlusion_ecgfm"]["max_abs_diff_vs_loop"] < 1e-4
    for key in ("ig_loop", "ig_ecgfm", "smoothgrad_ecgfm", "occlusion_ecgfm"):
        assert res[key]["ecgs_per_s"] > 0
