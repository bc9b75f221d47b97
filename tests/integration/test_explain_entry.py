"""The explain entry point end to end (synthetic and real PTB-XL records, tiny classifier, seconds), the
classifier format, and the errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.record import ECGDataError
from ecgfm.data.synthetic import SYNTHETIC_CLASSES, SyntheticSource
from ecgfm.explain.classifier import classifier_info, load_classifier, save_classifier
from ecgfm.explain.report import explain_main, explain_records, load_model

ROOT = Path(__file__).resolve().parents[2]




def _classifier(out: Path, classes, n_samples: int = 1000) -> Path:
    torch.manual_seed(0)
    bb = create_backbone("resnet1d_test")
    head = torch.nn.Linear(bb.num_features, len(classes))
    return save_classifier(out, bb, head, PreprocessSpec(fs=100.0), classes, multilabel=False, n_samples=n_samples,
                           extra={"note": "untrained test classifier"})


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory) -> Path:
    return _classifier(tmp_path_factory.mktemp("clf") / "synthetic", SYNTHETIC_CLASSES)


def _cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("explain", overrides=[f"out_dir={tmp}", "formats=[png,svg,pdf]",
                                             "faithfulness.n_random=1", "faithfulness.steps=5"] + list(overrides))


def test_explain_entry_synthetic(tmp_path, synthetic_ckpt, capsys):
    cfg = _cfg(tmp_path, f"checkpoint={synthetic_ckpt}", "record=syn000006", "methods=[ig,gradcam,occlusion]",
               "formats=[png]",
               "method_options={ig: {n_steps: 8}}", "counterfactual.enabled=true", "counterfactual.max_steps=20",
               "counterfactual.threshold=0.3")   # accepted (a multi-label model's "predicted"; softmax: unused)
    report = explain_main(cfg)
    w = report["records"][0]["window"]
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("record "))
    # the printed line names what the attribution saw: the whole record, or the explained window of a longer one
    # (whose prediction is the record's, over all its windows)
    assert ("whole record" in line) if not w else (f"window {w['start_s']:.2f}-" in line and "the record's" in line)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"] == ["integrated_gradients", "gradcam", "occlusion"]
    rec = saved["records"][0]
    assert rec["record_id"] == "syn000006" and rec["labels"][0] in SYNTHETIC_CLASSES
    assert report["records"][0]["target"] == rec["target"]
    names = {p["class"] for p in rec["predictions"]}
    assert names == set(SYNTHETIC_CLASSES)
    np.testing.assert_allclose(sum(p["probability"] for p in rec["predictions"]), 1.0, rtol=1e-5)
    for key, m in rec["methods"].items():
        assert set(m["per_lead"]["share_abs"]) == set(saved["model"]["lead_names"])
        assert set(m["per_wave"]) == {"P", "QRS", "T", "other"}
        assert m["elapsed_s"] >= 0
        f = m["faithfulness"]
        assert {"deletion_aopc", "random_deletion_aopc", "deletion_aopc_gain", "insertion_auc"} <= set(f)
        # the synthetic record has an evidence mask: of its labelled class, so scored for that class only
        if rec["target"]["class"] in rec["labels"]:
            assert "localisation" in f and f["localisation_class"] == rec["target"]["class"]
        else:
            assert "localisation" not in f and "not the explained class" in f["localisation_skipped"]
    assert "convergence_delta_abs" in rec["methods"]["integrated_gradients"]
    assert rec["counterfactual"]["records"][0]["top_leads"]
    assert rec["counterfactual"]["options"]["threshold"] is None     # single-label: no threshold applies
    files = {p.name for p in tmp_path.iterdir()}
    for stem in ("chart_integrated_gradients", "chart_gradcam", "chart_occlusion", "methods", "leads",
                 "counterfactual"):
        assert f"synthetic_syn000006_{stem}.png" in files         # (svg / pdf: tests/unit/test_visualize.py)
    assert set(rec["figures"]) <= files


def test_explain_entry_real_ptbxl_record(tmp_path, fixture_dir):
    from ecgfm.data.readers import ptbxl_label_space

    classes = ptbxl_label_space(fixture_dir / "ptbxl", "superdiagnostic")
    ckpt = _classifier(tmp_path / "clf", classes)
    cfg = _cfg(tmp_path / "run", f"checkpoint={ckpt}", "data=ptbxl", "record=8", "methods=[saliency]",
               f"paths.data_root={fixture_dir}", "faithfulness.enabled=false", "formats=[png]")
    rec = explain_main(cfg)["records"][0]
    assert rec["record_id"] == "00008" and rec["source"] == "ptbxl" and rec["fs_original"] == 100.0
    assert {p["class"] for p in rec["predictions"]} == set(classes)
    assert "faithfulness" not in rec["methods"]["saliency"]
    assert (tmp_path / "run" / "ptbxl_00008_chart_saliency.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="checkpoint= is required"):
        explain_main(_cfg(tmp_path / "run2", "data=ptbxl", f"paths.data_root={fixture_dir}"))


def test_explain_records_api_other_rate(tmp_path, synthetic_ckpt):
    wrapper = load_model(synthetic_ckpt)
    rec = SyntheticSource(4, seed=3, fs=250.0).load("syn000002")          # 250 Hz: converted by prepare
    report = explain_records(wrapper, [rec], tmp_path, methods=["saliency"], target="st_elevation",
                             faithfulness=False, formats=["png"])
    r = report["records"][0]
    assert r["target"]["class"] == "st_elevation" and r["fs_original"] == 250.0


def test_classifier_round_trip_and_errors(tmp_path, synthetic_ckpt):
    w1 = load_model(synthetic_ckpt)
    w2 = load_classifier(synthetic_ckpt / "classifier.json")
    x = torch.randn(2, 12, 1000)
    torch.testing.assert_close(w1(x), w2(x))
    info = classifier_info(synthetic_ckpt)
    assert info["format"] == "ecgfm-artifact" and info["kind"] == "classifier"
    assert info["architecture"]["name"] == "resnet1d_test"
    assert w1.class_names == SYNTHETIC_CLASSES and w1.n_samples == 1000 and w1.spec == PreprocessSpec(fs=100.0)
    # bad files
    with pytest.raises(ECGDataError, match="not found"):
        load_model(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "classifier.json").write_text(json.dumps({**info, "architecture": {"name": "os.system", "init_args": {}}}))
    (bad / "classifier.safetensors").write_bytes((synthetic_ckpt / "classifier.safetensors").read_bytes())
    with pytest.raises(ECGDataError, match="unknown backbone"):
        load_classifier(bad)
    (bad / "classifier.json").write_text("{not json")
    with pytest.raises(ECGDataError, match="JSON"):
        load_classifier(bad)
    (bad / "classifier.json").write_text(json.dumps({**info, "head": {"name": "linear", "args": {
        "in_dim": 3, "num_classes": 9}}}))
    with pytest.raises(ECGDataError, match="do not fit"):
        load_classifier(bad)
    with pytest.raises(ValueError, match="class_names"):
        save_classifier(tmp_path / "x", create_backbone("resnet1d_test"), torch.nn.Linear(32, 2), None, ["a"],
                        multilabel=True, fs=100.0)


def test_entry_bad_input(tmp_path, synthetic_ckpt):
    with pytest.raises(ECGDataError, match="not a synthetic record id"):
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", "record=00008"))
    with pytest.raises(ValueError, match="unknown attribution method"):
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", "methods=[magic]"))
    with pytest.raises(ValueError, match="outside"):
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", "target=42", "methods=[saliency]"))
    with pytest.raises(ValueError, match="unknown class name"):
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", "target=AFIB", "methods=[saliency]"))
    with pytest.raises(ValueError, match="no layer named"):
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", "methods=[gradcam]",
                          "method_options={gradcam: {layer: encoder.nope}}", "faithfulness.enabled=false"))


@pytest.mark.slow
def test_explain_py_subprocess(tmp_path, synthetic_ckpt):
    """The real command line (Hydra decorator included)."""
    out = subprocess.run([sys.executable, "explain.py", f"checkpoint={synthetic_ckpt}", "methods=[saliency]",
                          "faithfulness.enabled=false", "formats=[png]", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "report:" in out.stdout and (tmp_path / "report.json").exists()


def test_evidence_is_mapped_into_the_explained_window(tmp_path):
    """A 20 s record explained by a 10 s model: its ground-truth evidence at 17.0-17.5 s is in the API's second
    window (10-20 s), the one that adds most to the record's score of class a, and there it is model samples 700-749,
    where a model reading only those samples puts all its attribution; localisation scores are 1 (mapped from the
    record's start they would score another stretch). (Review s23: the centred window, 5-15 s, was explained
    before; it is not one of the windows the API scores.)"""
    from torch import nn

    from ecgfm.data.record import ECGRecord
    from ecgfm.explain.wrapper import ECGWrapper

    fs = 100.0
    sig = (0.01 * np.random.default_rng(0).standard_normal((12, 2000))).astype(np.float32)
    sig[:, 1700:1750] += 1.0
    ev = np.zeros((12, 2000), bool)
    ev[:, 1700:1750] = True
    rec = ECGRecord(signal=sig, fs=fs, lead_mask=np.ones(12, bool), record_id="r", source="demo", evidence=ev)

    class Reader(nn.Module):            # class a: the sum of model samples 700-749, class b: its negative
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2)
            with torch.no_grad():
                self.lin.weight[:] = torch.tensor([[1.0], [-1.0]])
                self.lin.bias.zero_()

        def embed(self, x):
            return x[:, :, 700:750].sum((1, 2))[:, None]

        def forward(self, x):
            return self.lin(self.embed(x))

    w = ECGWrapper(Reader(), fs=fs, n_samples=1000, window="center", postprocess="softmax", class_names=("a", "b"))
    rep = explain_records(w, [rec], tmp_path / "out", methods=["saliency"], target="a", formats=["png"],
                          faithfulness_options={"n_random": 1, "steps": 4})
    assert rep["records"][0]["window"]["start_s"] == pytest.approx(10.0)
    loc = rep["records"][0]["methods"]["saliency"]["faithfulness"]["localisation"]
    for key in ("mass_abs", "rank_accuracy", "pointing_game", "auroc"):
        assert loc[key]["mean"] == pytest.approx(1.0), key
    assert loc["mask_fraction"]["mean"] == pytest.approx(50 / 1000)


def test_a_record_shorter_than_the_window_is_said_to_be_padded(tmp_path):
    """A 2 s record through a 10 s model: 80 % of what was explained is zero padding; the report said "whole
    record" and nothing warned (Classifier.predict_proba warns for the same record)."""
    from torch import nn

    from ecgfm.data.record import ECGRecord
    from ecgfm.explain.wrapper import ECGWrapper

    fs = 100.0
    sig = (0.1 * np.random.default_rng(0).standard_normal((12, 200))).astype(np.float32)
    rec = ECGRecord(signal=sig, fs=fs, lead_mask=np.ones(12, bool), record_id="short", source="demo")
    w = ECGWrapper(nn.Sequential(nn.Flatten(), nn.Linear(12 * 1000, 2)), fs=fs, n_samples=1000, window="center",
                   postprocess="softmax", class_names=("a", "b"))
    with pytest.warns(UserWarning, match="80% of what the model sees"):
        rep = explain_records(w, [rec], tmp_path / "out", methods=["saliency"], target="a", formats=["png"],
                              faithfulness=False, dpi=30)
    assert rep["records"][0]["padded_fraction"] == pytest.approx(0.8)


def test_the_report_says_which_faithfulness_order_it_used(tmp_path):
    """faithfulness.order=abs was used but report.json's note said "signed attribution" whatever was run."""
    from torch import nn

    from ecgfm.data.record import ECGRecord
    from ecgfm.explain.wrapper import ECGWrapper

    sig = (0.1 * np.random.default_rng(1).standard_normal((12, 1000))).astype(np.float32)
    rec = ECGRecord(signal=sig, fs=100.0, lead_mask=np.ones(12, bool), record_id="r", source="demo")
    torch.manual_seed(0)
    w = ECGWrapper(nn.Sequential(nn.Flatten(), nn.Linear(12 * 1000, 2)), fs=100.0, n_samples=1000,
                   postprocess="softmax", class_names=("a", "b"))
    for order in ("abs", "signed"):
        rep = explain_records(w, [rec], tmp_path / order, methods=["saliency"], target="a", formats=["png"],
                              faithfulness_options={"n_random": 1, "steps": 4, "order": order}, dpi=30)
        assert rep["records"][0]["methods"]["saliency"]["faithfulness"]["order"] == order
        said = rep["notes"]["faithfulness"]
        assert ("|attribution| (largest first)" in said) == (order == "abs"), said


@pytest.mark.parametrize("lead_aware", [True, False])
def test_a_one_lead_record_is_explained_as_the_classifier_scores_it(tmp_path, lead_aware):
    """A classifier artifact says how absent leads reached its ViT (``lead_aware``): the explain report's prediction
    for a lead-II record is that model's on its lead mask (or zero-padded), and the attribution explains it."""
    from ecgfm.artifacts import EncoderClassifier
    from ecgfm.data.record import CANONICAL_LEADS, ECGRecord
    from ecgfm.explain.classifier import wrapper_from_artifact

    torch.manual_seed(0)
    model = EncoderClassifier(create_backbone("vit1d_test"), torch.nn.Linear(create_backbone("vit1d_test")
                                                                             .num_features, 3)).eval()
    meta = {"input": {"fs": 100.0, "leads": list(CANONICAL_LEADS), "window_samples": 250}, "multilabel": False,
            "classes": ["a", "b", "c"], "lead_aware": lead_aware}
    wrapper = wrapper_from_artifact(model, None, meta)
    sig = np.zeros((12, 250), np.float32)
    sig[1] = np.sin(np.arange(250) / 7.0)
    mask = np.zeros(12, bool)
    mask[1] = True
    rec = ECGRecord(signal=sig, fs=100.0, lead_mask=mask, record_id="r", source="demo")
    rep = explain_records(wrapper, [rec], tmp_path / "out", methods=["saliency"], faithfulness=False,
                          formats=["png"])
    got = np.array([p["probability"] for p in sorted(rep["records"][0]["predictions"], key=lambda p: p["index"])])
    x = torch.from_numpy(sig)[None]
    with torch.no_grad():
        masked = model(x, torch.from_numpy(mask)[None]).softmax(-1)[0].numpy()
        padded = model(x).softmax(-1)[0].numpy()
    assert np.abs(masked - padded).max() > 1e-4                 # the mask matters: the test has teeth
    np.testing.assert_allclose(got, masked if lead_aware else padded, rtol=1e-5, atol=1e-6)


def test_the_demo_explains_a_record_its_classifier_did_not_train_on(tmp_path):
    """explain.py without a checkpoint trains the demo classifier on the first 80 % of its synthetic records; with no
    record given it explained record 0, one of them."""
    rep = explain_main(_cfg(tmp_path, "demo.n_records=20", "demo.epochs=1", "methods=[saliency]",
                            "faithfulness.enabled=false", "formats=[]"))
    assert rep["records"][0]["record_id"] == "syn000016"
    # a source with no record beyond the demo's training ones: refused (record 0, a training record, was explained
    # and logged as a validation record)
    from ecgfm.config import ConfigError

    with pytest.raises(ConfigError, match="no validation record is left"):
        explain_main(_cfg(tmp_path / "few", "demo.n_records=20", "demo.epochs=1", "data.params.n_records=16",
                          "methods=[saliency]", "faithfulness.enabled=false", "formats=[]"))


@pytest.mark.parametrize("target", ["nosuch", "99"])
def test_an_unknown_target_is_refused_before_anything_runs(tmp_path, synthetic_ckpt, target):
    from ecgfm.config import ConfigError

    with pytest.raises(ConfigError, match="target"):
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", f"target={target}", "methods=[saliency]"))
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("override, key", [("methods=[foo]", "methods[0]"), ("formats=[bmp]", "formats[0]"),
                                           ("+method_options={ig: {n_stepz: 4}}", "method_options.integrated_gradients")])
def test_unknown_methods_and_formats_are_refused_before_anything_runs(tmp_path, synthetic_ckpt, override, key):
    from ecgfm.config import ConfigError

    with pytest.raises(ConfigError) as info:
        explain_main(_cfg(tmp_path, f"checkpoint={synthetic_ckpt}", override))
    assert info.value.key == key and not (tmp_path / "report.json").exists()


def test_chart_of_a_cache_record_is_not_labelled_mv_and_a_window_says_so(tmp_path, monkeypatch):
    """A record read back from a corpus cache is already z-scored: its chart says "normalised units", not mV (it
    drew z-scores as mV with a gain to match); the chart of a long record's explained window names the window."""
    import dataclasses

    from torch import nn

    from ecgfm.data.preprocess import PreprocessSpec, preprocess_signal
    from ecgfm.data.synthetic import generate_record
    from ecgfm.explain import report as rep
    from ecgfm.explain import visualize as viz
    from ecgfm.explain.wrapper import ECGWrapper

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.h = nn.Conv1d(12, 4, 5, padding=2), nn.Linear(4, 2)

        def forward(self, x):
            return self.h(self.c(x).mean(-1))

    headers = []
    orig = viz.plot_ecg_chart

    def spy(*args, **kw):
        fig = orig(*args, **kw)
        headers.append([t.get_text() for t in fig.texts if t.get_gid() == "chart_header"][0].replace("\n", " "))
        return fig

    monkeypatch.setattr(viz, "plot_ecg_chart", spy)
    spec = PreprocessSpec(fs=100.0)
    w = ECGWrapper(Tiny(), fs=100.0, preprocess=spec, class_names=("a", "b"), n_samples=1000, window="center")
    raw = generate_record(3, seed=0, fs=100.0, duration=10.0)
    sig, _, _ = preprocess_signal(raw.signal, raw.fs, raw.lead_mask, spec)
    cached = dataclasses.replace(raw, signal=sig, header={**raw.header, "preprocessed": spec.to_dict()})
    long = generate_record(4, seed=0, fs=100.0, duration=30.0)
    for rec in (raw, cached, long):
        out = rep.explain_records(w, [rec], tmp_path, methods=["saliency"], faithfulness=False, formats=["png"],
                                  dpi=30)
    assert "mm/mV" in headers[0] and "window" not in headers[0]
    assert "mm/normalised units" in headers[1] and "mV" not in headers[1]
    # the explained window is one of the API's windows (0-10, 10-20, 20-30 s), and the chart names it
    start = out["records"][0]["window"]["start_s"]
    assert start in (0.0, 10.0, 20.0)
    assert f"window {start:.2f}-{start + 10:.2f} s of the record" in headers[2]
