"""One chain through artifacts: pretrain -> encoder artifact -> fine-tune (saves a classifier artifact) ->
Classifier.predict_proba reproduces the cell's test predictions -> explain.py explains that folder; the Python API
on encoder artifacts (any fs, any lead order)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import ecgfm
from ecgfm.conf import config_dir
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError
from ecgfm.data.synthetic import SyntheticSource, generate_arrays
from ecgfm.evaluate.sweep import finetune_main


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """A tiny pretrained encoder (train.py's pipeline) and a fine-tune cell of it on the synthetic task."""
    from ecgfm.pipelines import train

    tmp = tmp_path_factory.mktemp("chain")
    run = tmp / "run"
    summary = train(_compose("train", ["+experiment=mae", "backbone=vit1d_test", "trainer.max_steps=3",
                                       "data.params.n_records=24", "data.batch_size=8", f"paths.cache_root={tmp / 'cache'}",
                                       f"out_dir={run}", "logger=csv", "torch_threads=1"]))
    enc_dir = Path(summary["encoder_dir"])
    cfg = _compose("finetune", [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}",
                                "prepare_workers=0", "task=synthetic", "task.params.n_records=90", "bootstrap.n=20",
                                "plot=false", "torch_threads=1", f"checkpoint={enc_dir}", "fraction=1.0", "seed=0",
                                "finetune.epochs=1", "finetune.batch_size=32", "finetune.patience=1"])
    out = finetune_main(cfg)
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    return {"tmp": tmp, "encoder": enc_dir, "cell": cell, "n_records": 90}


def test_finetune_cell_saves_a_classifier_artifact_with_its_test_predictions(chain):
    folder = Path(chain["cell"]["classifier"])
    assert (folder / "classifier.json").is_file() and (folder / "classifier.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "test macro AUROC" in card and "Classifier.load" in card
    meta = json.loads((folder / "classifier.json").read_text())
    assert meta["kind"] == "classifier" and meta["provenance"]["seed"] == 0
    assert meta["window_aggregate"] in ("prob", "logit") and meta["input"]["window_samples"] == 250
    preds = pd.read_csv(folder / "predictions_test.csv")
    assert list(preds["record"]) == chain["cell"]["predictions"]["test"]["keys"]
    assert [c for c in preds.columns if c.startswith("p_")] == [f"p_{c}" for c in meta["classes"]]
    np.testing.assert_array_equal(preds[[f"p_{c}" for c in meta["classes"]]].to_numpy(),
                                  np.asarray(chain["cell"]["predictions"]["test"]["scores"]))


def test_predict_proba_reproduces_the_cells_test_predictions(chain):
    """Classifier.load(folder).predict_proba on the raw records gives the scores the cell stored."""
    folder = Path(chain["cell"]["classifier"])
    clf = ecgfm.Classifier.load(folder)
    source = SyntheticSource(n_records=chain["n_records"], seed=1, fs=500.0, duration=10.0)
    pred = chain["cell"]["predictions"]["test"]
    by_id = {r: source.load(r) for r in source.record_ids()}
    got = np.concatenate([clf.predict_proba(by_id[key.split("/", 1)[1]]).to_numpy() for key in pred["keys"]])
    want = np.asarray(pred["scores"], dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert list(clf.predict_proba(by_id[pred["keys"][0].split("/", 1)[1]]).columns) == clf.classes


def test_explain_runs_on_the_classifier_folder_and_refuses_the_encoder(chain):
    from ecgfm.explain.report import explain_main

    out = chain["tmp"] / "explain"
    folder = chain["cell"]["classifier"]
    cfg = _compose("explain", [f"checkpoint={folder}", f"out_dir={out}", "methods=[saliency]",
                               "faithfulness.enabled=false", "formats=[png]", "data.params.n_records=4"])
    report = explain_main(cfg)
    assert (out / "report.json").is_file() and report["records"]
    cfg = _compose("explain", [f"checkpoint={chain['encoder']}", f"out_dir={out}", "methods=[saliency]",
                               "faithfulness.enabled=false", "formats=[png]", "data.params.n_records=4"])
    with pytest.raises(ECGDataError, match="this is an encoder.*finetune.py checkpoint="):
        explain_main(cfg)


def test_encoder_embed_is_rate_and_lead_order_invariant(chain):
    from ecgfm.data.preprocess import resample

    enc = ecgfm.Encoder.load(chain["encoder"])
    x, _, _ = generate_arrays(2, seed=3, fs=500.0, duration=10.0)
    z500 = enc.embed(x[0], fs=500, leads=list(CANONICAL_LEADS))
    assert z500.shape == (enc.num_features,) and np.isfinite(z500).all()
    perm = np.random.default_rng(0).permutation(12)
    z250 = enc.embed(resample(x[0], 500.0, 250.0)[perm], fs=250, leads=[CANONICAL_LEADS[i] for i in perm])
    cos = float(z500 @ z250 / np.linalg.norm(z500) / np.linalg.norm(z250))
    assert cos >= 0.99, cos
    batch = enc.embed(x, fs=500)
    assert batch.shape == (2, enc.num_features)
    np.testing.assert_allclose(batch[0], z500, rtol=1e-5, atol=1e-5)
    windows = enc.embed(x[0], fs=500, per_window=True)
    assert windows.ndim == 2 and windows.shape[1] == enc.num_features
    one_lead = enc.embed(x[0][1:2], fs=500, leads=["II"])
    assert np.isfinite(one_lead).all()
    with pytest.raises(ValueError, match="pass leads="):
        enc.embed(x[0][:3], fs=500)
    with pytest.raises(ValueError, match="pass fs="):
        enc.embed(x[0])


def test_encoder_embed_reads_a_wfdb_record(fixture_dir, chain):
    rec = sorted((fixture_dir / "ptbxl" / "records100").rglob("*.hea"))[0]
    enc = ecgfm.Encoder.load(chain["encoder"])
    z = enc.embed(str(rec.with_suffix("")))
    assert z.shape == (enc.num_features,) and np.isfinite(z).all()


@pytest.mark.parametrize("aggregate", ["mean_embedding", "mean_prediction"])
def test_probe_cell_saves_a_classifier_on_request(chain, aggregate):
    from ecgfm.evaluate.sweep import probe_main

    tmp = chain["tmp"]
    cfg = _compose("probe", [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / f'probe_{aggregate}'}",
                             "prepare_workers=0", "task=synthetic", "task.params.n_records=90", "bootstrap.n=20",
                             "plot=false", "torch_threads=1", f"checkpoint={chain['encoder']}", "fraction=1.0",
                             "seed=0", "probe.Cs=[1.0]", f"probe.aggregate={aggregate}", "save_classifier=true"])
    cell = json.loads(Path(probe_main(cfg)["cells_written"][0]).read_text())
    clf = ecgfm.Classifier.load(cell["classifier"])
    assert clf.meta["window_aggregate"] == ("logit" if aggregate == "mean_embedding" else "prob")
    source = SyntheticSource(n_records=chain["n_records"], seed=1, fs=500.0, duration=10.0)
    pred = cell["predictions"]["test"]
    got = np.concatenate([clf.predict_proba(source.load(k.split("/", 1)[1])).to_numpy() for k in pred["keys"]])
    np.testing.assert_allclose(got, np.asarray(pred["scores"]), rtol=0, atol=1e-4)  # float32 head vs float64 probe


@pytest.mark.parametrize("lead_aware", [True, False])
def test_classifier_of_a_one_lead_task_is_scored_as_it_was_trained(chain, lead_aware, caplog):
    """A fine-tune cell on lead II alone records how absent leads reached the ViT (``features.lead_aware``) in its
    classifier artifact, and Classifier.predict_proba on the raw one-lead records reproduces the cell's scores either
    way (scored the other way, the lead masks would change the tokens)."""
    tmp = chain["tmp"]
    flag = str(lead_aware).lower()
    cfg = _compose("finetune", [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / f'one_lead_{flag}'}",
                                "prepare_workers=0", "task=synthetic", "task.params.n_records=60",
                                "+task.sources.0.leads=[II]", "bootstrap.n=20", "plot=false", "torch_threads=1",
                                f"checkpoint={chain['encoder']}", "fraction=1.0", "seed=0", "finetune.epochs=1",
                                "finetune.batch_size=32", "finetune.patience=1", f"features.lead_aware={flag}"])
    cell = json.loads(Path(finetune_main(cfg)["cells_written"][0]).read_text())
    clf = ecgfm.Classifier.load(cell["classifier"])
    assert clf.meta["lead_aware"] is lead_aware and clf.lead_aware is lead_aware
    source = SyntheticSource(n_records=60, seed=1, fs=500.0, duration=10.0, leads=["II"])
    pred = cell["predictions"]["test"]
    records = [source.load(k.split("/", 1)[1]) for k in pred["keys"]]
    got = np.concatenate([clf.predict_proba(r).to_numpy() for r in records])
    np.testing.assert_allclose(got, np.asarray(pred["scores"]), rtol=0, atol=1e-5)
    clf.meta["lead_aware"] = not lead_aware                      # the other way: other numbers (the test has teeth)
    other = np.concatenate([clf.predict_proba(r).to_numpy() for r in records])
    assert np.abs(other - got).max() > 1e-4
    if lead_aware:
        # the artifact names the leads it was trained on: lead I alone is refused (it scored zeros in lead II's row
        # without a word), leads it never saw beside lead II are named
        from ecgfm.data.record import ECGDataError

        clf.meta["lead_aware"] = lead_aware
        assert clf.meta["extra"]["trained_leads"] == ["II"]
        assert clf.meta["extra"]["derive_limb_leads"] is False   # records given as its cell scored them
        x = records[0].signal[records[0].lead_mask]
        with pytest.raises(ECGDataError, match="trained on records with leads II"):
            clf.predict_proba(x, fs=records[0].fs, leads=["I"])
        with caplog.at_level("WARNING", logger="ecgfm.api"):
            clf.predict_proba(np.concatenate([x, x]), fs=records[0].fs, leads=["II", "V1"])
        assert any("V1" in r.getMessage() and "never present" in r.getMessage() for r in caplog.records)
