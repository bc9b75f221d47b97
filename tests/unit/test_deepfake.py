"""The deepfake-ecg corpus source (ecgfm.data.readers.deepfake): safe weight loading, determinism, derived leads,
the cache and a short training run on it. Generates a few records only (one 16-record chunk ~0.3 s of CPU)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepfakeecg", reason="deepfake-ecg is not installed: pip install deepfake-ecg "
                                          "(scripts/setup.sh installs it with the dev extras)")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from ecgfm.data.cache import CorpusCache, prepare_corpus  # noqa: E402
from ecgfm.data.readers import DeepfakeSource, get_source  # noqa: E402
from ecgfm.data.readers import deepfake as df  # noqa: E402
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "ecgfm" / "conf"
LEAD = {name: i for i, name in enumerate(CANONICAL_LEADS)}


@pytest.fixture(scope="module")
def source() -> DeepfakeSource:
    return DeepfakeSource(n=6, seed=1, batch_size=4)


@pytest.fixture(scope="module")
def signals(source) -> np.ndarray:
    return np.stack([source.load(r).signal for r in source.record_ids()])


def test_records_ids_layout_and_registry(source):
    assert source.record_ids() == [f"deepfake_s1_{i}" for i in range(6)]
    assert get_source("deepfake", n=3, seed=2).record_ids() == ["deepfake_s2_0", "deepfake_s2_1", "deepfake_s2_2"]
    rec = source.load("deepfake_s1_2")
    assert rec.signal.shape == (12, 5000) and rec.signal.dtype == np.float32 and rec.fs == 500.0
    assert rec.lead_mask.all() and rec.patient_id is None and rec.labels == () and rec.source == "deepfake"
    assert rec.meta == {"generator": "deepfake-ecg", "seed": 1, "index": 2}
    assert 0.01 < float(np.abs(rec.signal).max()) < 6.0      # mV: the generator's range is +-6 mV
    for bad in ("deepfake_s0_1", "deepfake_s1_6", "deepfake_s1_01", "syn000001"):
        with pytest.raises(ECGDataError, match="deepfake/"):
            source.load(bad)


def test_same_records_whatever_batch_size_order_n_or_pickling(source, signals):
    for other in (DeepfakeSource(n=6, seed=1, batch_size=1),
                  pickle.loads(pickle.dumps(DeepfakeSource(n=40, seed=1, batch_size=16)))):
        again = np.stack([other.load(f"deepfake_s1_{i}").signal for i in reversed(range(6))])[::-1]
        np.testing.assert_array_equal(again, signals)
    # reading in order (a shard's conversion) generates each chunk once, from the chunk of the first record read
    spy = DeepfakeSource(n=40, seed=1, batch_size=16)
    blocks = []
    real_block = spy.generate_block
    spy.generate_block = lambda idx: blocks.append(list(idx)) or real_block(idx)
    np.testing.assert_array_equal(spy.load("deepfake_s1_5").signal, signals[5])
    for i in range(6, 40):
        spy.load(f"deepfake_s1_{i}")
    assert [(b[0], b[-1]) for b in blocks] == [(0, 15), (16, 31), (32, 39)]
    other_seed = DeepfakeSource(n=1, seed=2).load("deepfake_s2_0").signal
    assert not np.allclose(other_seed, signals[0])
    assert not np.allclose(signals[0], signals[1])


def test_generated_leads_are_integer_microvolts_and_limb_leads_derived(signals):
    uv = signals[:, [LEAD[n] for n in df.GENERATED_LEADS]] * 1000.0
    np.testing.assert_allclose(uv, np.round(uv), atol=1e-3)
    lead_i, lead_ii = signals[:, LEAD["I"]], signals[:, LEAD["II"]]
    np.testing.assert_allclose(signals[:, LEAD["III"]], lead_ii - lead_i, atol=1e-6)
    np.testing.assert_allclose(signals[:, LEAD["aVR"]], -(lead_i + lead_ii) / 2, atol=1e-6)
    np.testing.assert_allclose(signals[:, LEAD["aVL"]], lead_i - lead_ii / 2, atol=1e-6)
    np.testing.assert_allclose(signals[:, LEAD["aVF"]], lead_ii - lead_i / 2, atol=1e-6)
    # Goldberger: aVR + aVL + aVF = 0
    np.testing.assert_allclose(signals[:, LEAD["aVR"]] + signals[:, LEAD["aVL"]] + signals[:, LEAD["aVF"]], 0,
                               atol=2e-6)
    with pytest.raises(ValueError, match="expected"):
        df.twelve_leads(np.zeros((12, 10)))


def test_derived_leads_are_marked(source):
    rec = source.load("deepfake_s1_0")
    assert rec.derived_leads == ("III", "aVR", "aVL", "aVF")
    assert rec.header["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
    assert rec.header["lead_names"] == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert source.derived_leads == "III,aVR,aVL,aVF"
    assert len(source.weights_sha256) == 64 and source.package_version
    assert source.fingerprint() != DeepfakeSource(n=7, seed=1).fingerprint()
    assert source.fingerprint() == DeepfakeSource(n=6, seed=1, batch_size=64).fingerprint()


def test_prepare_keeps_derived_marker_in_index_and_manifest(tmp_path, source):
    prepare_corpus(source, tmp_path / "c", {"fs": 100.0}, workers=0, progress=False)
    cache = CorpusCache(tmp_path / "c")
    assert len(cache) == 6 and cache.fs == 100.0
    rec = cache.record(0)
    assert rec.derived_leads == ("III", "aVR", "aVL", "aVF") and rec.signal.shape == (12, 1000)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (desc,) = manifest["sources"]
    assert desc["derived_leads"] == "III,aVR,aVL,aVF" and desc["weights_sha256"] == source.weights_sha256
    assert desc["n"] == 6 and desc["seed"] == 1 and desc["package_version"] == source.package_version
    assert (cache.patients == -1).all()          # no patient ids: each record its own group


def test_conversion_workers_give_byte_identical_caches(tmp_path):
    # two worker processes (the source is pickled to them and builds its model there) vs in-process conversion
    shas = []
    for workers in (0, 2):
        src = DeepfakeSource(n=20, seed=4, batch_size=8)
        prepare_corpus(src, tmp_path / f"w{workers}", {"fs": 100.0}, shard_records=8, workers=workers,
                       progress=False)
        manifest = json.loads((tmp_path / f"w{workers}" / "manifest.json").read_text())
        shas.append([(sh["bin_sha256"], sh["index_sha256"]) for sh in manifest["shards"]] + [manifest["files"]])
    assert len(shas[0]) == 4 and shas[0] == shas[1]


# ------------------------------------------------------------------------------------------------ weights loading

def test_weights_loaded_with_weights_only_and_map_location(monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = df.load_generator(device="cpu")
    assert torch.equal(torch.rand(3), expected)     # building the model leaves the global RNG alone
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 10_000_000


class _NotWeights:
    pass


def _good_state() -> dict:
    return {k: v.clone() for k, v in df._build_generator_module().state_dict().items()}


@pytest.mark.parametrize("kind, message", [
    ("pickle", "cannot be loaded as a weights-only torch checkpoint onto 'cpu'"),
    ("bare_state", "expected a dict {'stat_dict'"),
    ("missing_key", "missing keys ['conv_1.bias']"),
    ("extra_key", "unexpected keys ['extra.weight']"),
    ("bad_shape", "'conv_1.weight' has shape (1, 2)"),
    ("not_a_file", "cannot be loaded as a weights-only torch checkpoint"),
])
def test_bad_checkpoint_gives_clear_error_naming_the_file(tmp_path, kind, message):
    path = tmp_path / f"{kind}.pt"
    state = _good_state()
    if kind == "pickle":
        torch.save({"stat_dict": _NotWeights()}, path)
    elif kind == "bare_state":
        torch.save(state, path)
    elif kind == "missing_key":
        del state["conv_1.bias"]
        torch.save({"stat_dict": state}, path)
    elif kind == "extra_key":
        state["extra.weight"] = torch.zeros(1)
        torch.save({"stat_dict": state}, path)
    elif kind == "bad_shape":
        state["conv_1.weight"] = torch.zeros(1, 2)
        torch.save({"stat_dict": state}, path)
    else:
        path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ECGDataError) as info:
        df.load_generator(path)
    assert str(path) in str(info.value) and message in str(info.value)
    # the source reports it on first generation (building it only hashes the file)
    src = DeepfakeSource(n=2, checkpoint=path)
    with pytest.raises(ECGDataError, match=str(path)):
        src.load("deepfake_s0_0")


def test_checkpoint_changed_after_the_source_was_built(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"stat_dict": _good_state()}, path)
    src = DeepfakeSource(n=2, checkpoint=path)
    torch.save({"stat_dict": _good_state(), "extra": 1}, path)
    with pytest.raises(ECGDataError, match="changed since this source was built"):
        src.load("deepfake_s0_0")
    with pytest.raises(ECGDataError, match="not found"):
        DeepfakeSource(n=2, checkpoint=tmp_path / "missing.pt")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepfakeecg.models.pulse2pulse", None)
    with pytest.raises(ImportError, match="pip install deepfake-ecg"):
        DeepfakeSource(n=2)


def test_bad_arguments():
    for kwargs in ({"n": 0}, {"n": 2, "seed": -1}, {"n": 2, "batch_size": 0}, {"n": 2, "torch_threads": 0}):
        with pytest.raises(ValueError):
            DeepfakeSource(**kwargs)


# ------------------------------------------------------------------------------------------------ configs, training

def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_pool_config_adds_generated_records_to_the_heldout_free_pool(tmp_path):
    real = _compose(["data=pretrain_pool_heldout_free", f"paths.cache_root={tmp_path}"]).data.cache_dirs
    cfg = _compose(["data=pretrain_pool_plus_deepfake", "data.params.deepfake_n=12", "data.params.deepfake_seed=3",
                    f"paths.cache_root={tmp_path}"])
    dirs = cfg.data.cache_dirs
    assert len(dirs) == len(real) + 1
    assert [d.name for d in dirs[:-1]] == [d.name for d in real]     # the real entries are kept in step
    assert dirs[-1].name == "deepfake" and dirs[-1].preprocess == cfg.preprocess
    src = instantiate(dirs[-1].sources[0])
    assert isinstance(src, DeepfakeSource) and src.n == 12 and src.seed == 3
    assert src.record_ids()[-1] == "deepfake_s3_11"


def test_prepare_and_train_a_few_steps_on_generated_records(tmp_path):
    from ecgfm.pipelines import train

    out = tmp_path / "run"
    cfg = _compose(["+experiment=mae", "data=deepfake", "data.params.n=8", f"out_dir={out}",
                    f"paths.cache_root={tmp_path / 'cache'}", "data.cache_dirs.0.workers=0", "data.num_workers=0",
                    "backbone=vit1d_test", "data.batch_size=4", "data.val_fraction=0.25", "trainer.max_steps=2",
                    "checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
                    "trainer.enable_model_summary=false", "torch_threads=1", "trainer.log_every_n_steps=1",
                    "method.warmup_steps=1", "method.decoder_dim=16", "method.decoder_heads=2",
                    "method.decoder_depth=1"])
    summary = train(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])
    (folder,) = (tmp_path / "cache").glob("deepfake-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["converted"] == 8
    assert manifest["sources"][0]["derived_leads"] == "III,aVR,aVL,aVF"
    assert manifest["spec"]["fs"] == cfg.preprocess.fs      # the same preprocessing as the real records


def test_prepare_script_preset_builds_the_same_records(tmp_path, source):
    """conf/prepare.yaml's deepfake preset (scripts/prepare.py sources=[deepfake]) gives the records of
    DeepfakeSource(n, seed): what data=deepfake caches."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ecgfm.data.cache import prepare_from_config, project_root

    with initialize_config_dir(str(project_root() / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=["sources=[deepfake]", "deepfake.n=6", "deepfake.seed=1",
                                            f"out={tmp_path / 'df'}", "workers=0", "progress=false",
                                            "spec.fs=100"])
    assert cfg.deepfake.torch_threads == 1 and cfg.deepfake.device == "cpu"
    rep = prepare_from_config(OmegaConf.to_container(cfg, resolve=True))
    assert rep.n_converted == 6
    cache = CorpusCache(tmp_path / "df")
    assert cache.record(0).derived_leads == ("III", "aVR", "aVL", "aVF")
    prepare_corpus(source, tmp_path / "direct", dict(OmegaConf.to_container(cfg.spec)), workers=0, progress=False)
    direct = CorpusCache(tmp_path / "direct")
    for i in range(6):
        np.testing.assert_array_equal(cache.record(i).signal, direct.record(i).signal)
