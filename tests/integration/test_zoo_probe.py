"""Imported encoders go through the probe like any ecgfm encoder: features at their own rate and window, cells
beside an ecgfm encoder, one results table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgfm.data.preprocess import preprocess_signal
from ecgfm.evaluate.features import extract_features
from ecgfm.export import load_encoder
from ecgfm.zoo import import_encoder

ROOT = Path(__file__).resolve().parents[2]
PEERS = (ROOT / ".." / "shared" / "fixtures" / "peers").resolve()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    if not PEERS.is_dir():
        pytest.skip(f"peer fixtures not found at {PEERS}")
    d = tmp_path_factory.mktemp("zoo")
    return {"stmem": import_encoder("stmem", PEERS / "stmem_vit_tiny.pth", d / "stmem", num_heads=4),
            "ecgfounder": import_encoder("ecgfounder", PEERS / "ecgfounder_net1d_tiny.pth", d / "ecgfounder")}


class _Cache:
    """The two members of a corpus cache that feature extraction reads."""

    def __init__(self, signals: list[np.ndarray]):
        self.signals = signals

    def __len__(self) -> int:
        return len(self.signals)

    def signal(self, i: int) -> np.ndarray:
        return self.signals[i]


@pytest.mark.parametrize("kind", ["stmem", "ecgfounder"])
def test_extract_features_applies_the_encoders_rate_and_window(encoders, kind):
    backbone, spec, info = load_encoder(encoders[kind])
    rng = np.random.default_rng(0)
    t = np.arange(int(12 * 360)) / 360.0            # 12 s records at 360 Hz, one lead present (as CinC 2017)
    mask = np.zeros(12, bool)
    mask[0] = True
    signals = []
    for _ in range(3):
        raw = np.zeros((12, t.size), np.float32)
        raw[0] = np.sin(2 * np.pi * 1.1 * t) + 0.1 * rng.standard_normal(t.size)
        sig, fs, _ = preprocess_signal(raw, 360.0, mask, spec)
        assert fs == spec.fs
        signals.append(sig)
    window = int(info["extra"]["crop_samples"])
    feats = extract_features(backbone, _Cache(signals), window, window // 4, batch_size=4)
    assert feats.features.shape[1] == backbone.num_features and np.isfinite(feats.features).all()
    assert set(feats.record.tolist()) == {0, 1, 2}
    # the first window of record 0 is the encoder's embedding of that crop
    with torch.no_grad():
        first = backbone.embed(torch.from_numpy(signals[0][None, :, :window])).numpy()
    np.testing.assert_allclose(feats.features[0], first[0], atol=1e-5)


def test_probe_sweep_with_zoo_and_ecgfm_encoders_writes_one_table(encoders, tmp_path):
    from hydra import compose, initialize_config_dir

    from ecgfm.evaluate.sweep import probe_main

    def cfg(checkpoint: str):
        with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            return compose("probe", overrides=[
                f"paths.cache_root={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}", "prepare_workers=0",
                "task=synthetic", "task.params.n_records=60", "bootstrap.n=20", "torch_threads=1", "fraction=1.0",
                "seed=0", "probe.Cs=[1.0]", f"checkpoint={checkpoint}"])

    cells = {}
    for name, ckpt in [("ecgfm", "random:resnet1d_test"), ("stmem", str(encoders["stmem"])),
                       ("ecgfounder", str(encoders["ecgfounder"]))]:
        out = probe_main(cfg(ckpt))
        assert len(out["cells_written"]) == 1, name
        cells[name] = json.loads(Path(out["cells_written"][0]).read_text())
    assert cells["stmem"]["method"] == "zoo:stmem" and cells["ecgfounder"]["method"] == "zoo:ecgfounder"
    assert cells["stmem"]["window_samples"] == 2250 and cells["stmem"]["fs"] == 250.0
    assert cells["ecgfounder"]["window_samples"] == 5000 and cells["ecgfounder"]["fs"] == 500.0
    assert cells["ecgfounder"]["preprocess"]["median_baseline"] == 0.4
    for c in cells.values():
        assert 0.0 <= c["results"]["test"]["macro_auroc"]["value"] <= 1.0
    import pandas as pd

    df = pd.read_csv(tmp_path / "results" / "results.csv")
    assert {"random-init", "zoo:stmem", "zoo:ecgfounder"} <= set(df["method"])
    md = (tmp_path / "results" / "results.md").read_text()
    assert "zoo:stmem" in md and "zoo:ecgfounder" in md


def test_python_api_embeds_with_the_encoders_pipeline(encoders):
    """ecgfm.Encoder applies the imported encoder's preprocessing, rate, lead mapping and window."""
    import ecgfm

    enc = ecgfm.Encoder.load(encoders["ecgfounder"])
    backbone, spec, _ = load_encoder(encoders["ecgfounder"])
    rng = np.random.default_rng(1)
    t = np.arange(3000) / 300.0                      # 10 s at 300 Hz, one lead (lead I)
    lead_i = (np.sin(2 * np.pi * 1.3 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    z = enc.embed(lead_i[None], fs=300.0, leads=["I"])
    assert z.shape == (backbone.num_features,) and np.isfinite(z).all()
    raw = np.zeros((12, t.size), np.float32)
    raw[0] = lead_i
    mask = np.zeros(12, bool)
    mask[0] = True
    sig, fs, _ = preprocess_signal(raw, 300.0, mask, spec)
    assert fs == 500.0 and sig.shape[1] == 5000      # exactly one 10 s window
    with torch.no_grad():
        ref = backbone.embed(torch.from_numpy(sig[None])).numpy()[0]
    np.testing.assert_allclose(z, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["stmem", "ecgfounder"])
def test_finetune_cell_from_an_imported_encoder(encoders, kind, tmp_path):
    """Fine-tuning starts from the imported weights (layer-wise decay over ST-MEM's blocks / Net1D's stages)."""
    from hydra import compose, initialize_config_dir

    from ecgfm.evaluate.sweep import finetune_main

    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[
            f"paths.cache_root={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=40", "bootstrap.n=10", "torch_threads=1", "fraction=1.0",
            "seed=0", "finetune.epochs=1", "finetune.batch_size=16", f"checkpoint={encoders[kind]}"])
    out = finetune_main(cfg)
    assert len(out["cells_written"]) == 1
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["method"] == f"zoo:{kind}" and 0.0 <= cell["results"]["test"]["macro_auroc"]["value"] <= 1.0


def test_explain_an_imported_classifier(tmp_path):
    """ECGFounder's head imported as a classifier goes through the explain stage like any ecgfm classifier."""
    if not PEERS.is_dir():
        pytest.skip(f"peer fixtures not found at {PEERS}")
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.explain.report import explain_records, load_model
    from ecgfm.zoo import import_classifier

    clf = import_classifier("ecgfounder", PEERS / "ecgfounder_net1d_tiny.pth", tmp_path / "clf",
                            class_names=["a", "b", "c", "d", "e"])
    wrapper = load_model(clf)
    rec = SyntheticSource(2, seed=0, fs=250.0, duration=10.0).load("syn000001")
    report = explain_records(wrapper, [rec], tmp_path / "out", methods=["saliency"], target="c",
                             faithfulness=False, formats=["png"])
    r = report["records"][0]
    assert r["target"]["class"] == "c" and r["fs_original"] == 250.0
