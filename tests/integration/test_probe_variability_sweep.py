"""probe.py with the issue-12 probe options: ``probe.aggregate=mean_std``, ``probe.mode=attention`` (token cache)
and windows longer than a ViT-1D's ``seq_len``; each is its own recipe identity, and bad values fail by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ecgfm.config import ConfigError
from ecgfm.evaluate import features as F
from ecgfm.evaluate.sweep import EvaluationError, probe_main
from ecgfm.recipes import validate_probe_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=120", "bootstrap.n=20", "plot=false", "torch_threads=1",
            "report=never", "checkpoint=random:vit1d_test", "+backbone_args.seq_len=100",
            "+backbone_args.patch_size=25", "window_seconds=1", "stride_seconds=1"]
    if any(o.startswith("checkpoint=random:resnet") for o in overrides):   # a CNN: no ViT sizes
        base = [b for b in base if not b.startswith(("+backbone_args", "checkpoint="))]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("probe", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("variability")


def _cell(out: dict) -> dict:
    (path,) = out["cells_written"]
    return json.loads(Path(path).read_text())


def test_mean_std_and_attention_cells_are_distinct_and_tokens_are_cached_once(work):
    mean = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]")))
    std = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]", "probe.aggregate=mean_std")))
    assert std["probe"] == {"aggregate": "mean_std", "head": "linear"}
    assert std["recipe_id"] != mean["recipe_id"] and std["feature_key"] == mean["feature_key"]  # same features
    before = dict(F.STATS)
    over = ["probe.mode=attention", "probe.attention.lrs=[0.003]", "probe.attention.epochs=3",
            "probe.attention.num_heads=2"]
    att = _cell(probe_main(_cfg(work, *over)))
    assert att["mode"] == "attention" and att["probe"] == {"aggregate": "attention", "head": "attention"}
    assert set(att["hparam"]) == {"lr", "weight_decay"} and list(att["grid"]) == ["lr=0.003,wd=0.01"]
    assert att["token_cache"]["dtype"] == "float16" and att["feature_key"] != mean["feature_key"]
    assert att["token_cache"]["bytes"] == att["token_cache"]["tokens"] * att["token_cache"]["dim"] * 2
    assert F.STATS["token_extractions"] == before.get("token_extractions", 0) + 1
    # another recipe of the attention probe: the token cache is reused, no encoder pass
    again = _cell(probe_main(_cfg(work, *over[:-1], "probe.attention.num_heads=4", "overwrite=true")))
    assert F.STATS["token_extractions"] == before.get("token_extractions", 0) + 1
    assert F.STATS["token_cache_hits"] >= before.get("token_cache_hits", 0) + 1
    assert again["recipe_id"] != att["recipe_id"] and again["feature_key"] == att["feature_key"]


def test_long_window_vit_is_rebuilt_and_keyed_by_window(work):
    short = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]", "overwrite=true")))
    long = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]", "window_seconds=2", "overwrite=true")))
    assert long["window_samples"] == 2 * short["window_samples"] == 200
    assert long["feature_key"] != short["feature_key"] and long["recipe_id"] != short["recipe_id"]
    assert long["encoder_fingerprint"] == short["encoder_fingerprint"]   # same weights, seq_len 100


def test_learned_positions_refuse_long_windows(work):
    cfg = _cfg(work, "checkpoint=random:stmem_vit", "window_seconds=3", "probe.Cs=[1.0]")
    with pytest.raises(EvaluationError, match=r"seq_len=100 .*300 samples"):
        probe_main(cfg)


@pytest.mark.parametrize("override, key", [
    ("probe.aggregate=median", "probe.aggregate"),
    ("probe.mode=transformer", "probe.mode"),
    ("probe.attention.num_heads=0", "probe.attention.num_heads"),
    ("probe.attention.lrs=[]", "probe.attention.lrs"),
    ("probe.attention.weight_decays=[-1]", "probe.attention.weight_decays"),
    ("probe.attention.dropout=1.5", "probe.attention.dropout"),
    ("+probe.attention.queries=2", "probe.attention.queries"),
])
def test_bad_probe_values_name_the_key(work, override, key):
    mode = [] if override.startswith("probe.mode") or override.startswith("probe.aggregate") \
        else ["probe.mode=attention"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_probe_config(_cfg(work, *mode, override))


def test_attention_refuses_other_aggregates_and_classifier_artifacts(work):
    with pytest.raises(ConfigError, match=r"probe\.aggregate.*attention"):
        validate_probe_config(_cfg(work, "probe.mode=attention", "probe.aggregate=mean_std"))
    with pytest.raises(ConfigError, match="save_classifier"):
        validate_probe_config(_cfg(work, "probe.aggregate=mean_std", "save_classifier=true"))
    with pytest.raises(ConfigError, match="save_classifier"):
        validate_probe_config(_cfg(work, "probe.mode=attention", "save_classifier=true"))
    with pytest.raises(ValueError, match=r"num_heads=3 must divide the token width 16"):
        probe_main(_cfg(work, "probe.mode=attention", "probe.attention.num_heads=3", "overwrite=true",
                        "probe.attention.epochs=1"))


def test_long_window_classifier_artifact_embeds_its_windows(work):
    """save_classifier with a window longer than the encoder's seq_len: the artifact holds the rebuilt ViT-1D
    (seq_len = window) and reproduces the cell's test scores."""
    import numpy as np

    import ecgfm
    from ecgfm.data.synthetic import SyntheticSource

    cell = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]", "window_seconds=2", "stride_seconds=2",
                                 "save_classifier=true", "overwrite=true")))
    clf = ecgfm.Classifier.load(cell["classifier"])
    source = SyntheticSource(n_records=120, seed=1, fs=500.0, duration=10.0)
    pred = cell["predictions"]["test"]
    keys = pred["keys"][:8]
    got = np.concatenate([clf.predict_proba(source.load(k.split("/", 1)[1])).to_numpy() for k in keys])
    np.testing.assert_allclose(got, np.asarray(pred["scores"][:8]), rtol=0, atol=1e-4)


def test_finetune_rebuilds_a_vit_for_windows_longer_than_its_seq_len(work):
    """finetune.py with window_seconds beyond the encoder's seq_len: the ViT-1D is rebuilt (same weights) as in the
    probes, the cell's windows are the long ones and its classifier artifact reproduces the test scores; an encoder
    with learned positions is refused by name."""
    import numpy as np

    import ecgfm
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.evaluate.sweep import finetune_main

    base = [f"paths.cache_root={work / 'cache'}", f"results_dir={work / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=120", "bootstrap.n=20", "plot=false", "torch_threads=1",
            "checkpoint=random:vit1d_test", "+backbone_args.seq_len=100", "+backbone_args.patch_size=25",
            "window_seconds=2", "stride_seconds=2", "fraction=1.0", "seed=0", "finetune.epochs=1",
            "finetune.batch_size=32", "finetune.patience=1"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=base)
        refused = compose("finetune", overrides=base + ["checkpoint=random:stmem_vit", "window_seconds=3"])
    cell = _cell(finetune_main(cfg))
    assert cell["window_samples"] == 200
    clf = ecgfm.Classifier.load(cell["classifier"])
    source = SyntheticSource(n_records=120, seed=1, fs=500.0, duration=10.0)
    pred = cell["predictions"]["test"]
    got = np.concatenate([clf.predict_proba(source.load(k.split("/", 1)[1])).to_numpy() for k in pred["keys"][:8]])
    np.testing.assert_allclose(got, np.asarray(pred["scores"][:8]), rtol=0, atol=1e-5)
    with pytest.raises(EvaluationError, match=r"seq_len=100 .*300 samples"):
        finetune_main(refused)


def test_handcrafted_side_features_are_their_own_row_and_keep_older_identities(work):
    plain = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]")))
    again = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]", "probe.side_features=null", "overwrite=true")))
    assert again["recipe_id"] == plain["recipe_id"]               # the default keeps identities written before it
    out = probe_main(_cfg(work, "probe.Cs=[1.0]", "probe.side_features=handcrafted"))
    both = _cell(out)
    assert both["mode"] == "linear+handcrafted" and "/linear+handcrafted/" in out["cells_written"][0]
    assert both["probe"] == {"aggregate": "mean_embedding", "head": "linear", "side_features": "handcrafted"}
    assert both["recipe_id"] != plain["recipe_id"] and both["feature_key"].startswith(plain["feature_key"] + "+hc-")
    assert both["checkpoint_id"] == plain["checkpoint_id"] and both["results"]["test"]["macro_auroc"]["value"] > 0.5
    std = _cell(probe_main(_cfg(work, "probe.Cs=[1.0]", "probe.aggregate=mean_std", "probe.side_features=handcrafted")))
    assert std["mode"] == "linear+mean_std+handcrafted" and std["recipe_id"] != both["recipe_id"]


@pytest.mark.parametrize("override, key, match", [
    (["probe.side_features=rr"], "probe.side_features", "handcrafted"),
    (["probe.side_features=handcrafted", "probe.aggregate=mean_prediction"], "probe.side_features", "mean_prediction"),
    (["probe.side_features=handcrafted", "probe.mode=attention"], "probe.side_features", "attention"),
    (["probe.side_features=handcrafted", "save_classifier=true"], "save_classifier", "handcrafted"),
])
def test_side_features_refuse_what_has_no_record_row(work, override, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_probe_config(_cfg(work, *override))
    assert e.value.key == key


def test_side_features_are_refused_for_the_handcrafted_baseline(work):
    with pytest.raises(EvaluationError, match="already is them"):
        probe_main(_cfg(work, "checkpoint=handcrafted", "probe.side_features=handcrafted"))


def test_all_stage_features_are_their_own_row_and_keep_older_identities(work):
    """``probe.layers=stages``: every stage of a CNN pooled and concatenated (its last block is the plain
    embedding), its own cells (``linear+stages``), feature file and recipe; the default keeps older identities; a
    backbone without stages, the handcrafted baseline and the attention probe / classifier artifact refuse it."""
    import numpy as np
    import torch

    from ecgfm.backbones import create_backbone

    cnn = ["checkpoint=random:resnet1d_test", "window_seconds=2.5", "stride_seconds=2.5", "probe.Cs=[1.0]"]
    plain = _cell(probe_main(_cfg(work, *cnn)))
    again = _cell(probe_main(_cfg(work, *cnn, "probe.layers=last", "overwrite=true")))
    assert again["recipe_id"] == plain["recipe_id"]
    out = probe_main(_cfg(work, *cnn, "probe.layers=stages"))
    st = _cell(out)
    assert st["mode"] == "linear+stages" and "/linear+stages/" in out["cells_written"][0]
    assert st["probe"] == {"aggregate": "mean_embedding", "head": "linear", "layers": "stages"}
    assert st["recipe_id"] != plain["recipe_id"] and st["feature_key"] != plain["feature_key"]
    assert st["checkpoint_id"] == plain["checkpoint_id"] and st["results"]["test"]["macro_auroc"]["value"] > 0.5
    net = create_backbone("resnet1d_test").eval()
    x = torch.randn(3, 12, 250)
    with torch.no_grad():
        z, last = net.embed_stages(x), net.embed(x)
    assert z.shape == (3, 2 * (8 + 16)) and torch.equal(z[:, -last.shape[1]:], last)
    feats = F.extract_features(net, _Signals(np.random.default_rng(0).standard_normal((4, 12, 500))), 250, 250,
                               layers="stages")
    assert feats.features.shape == (8, 48)
    with pytest.raises(EvaluationError, match="no stage-wise embedding"):
        probe_main(_cfg(work, "probe.Cs=[1.0]", "probe.layers=stages"))            # the ViT of _cfg
    with pytest.raises(EvaluationError, match="handcrafted baseline has none"):
        probe_main(_cfg(work, "checkpoint=handcrafted", "probe.layers=stages"))
    for over, key in ((["probe.mode=attention"], "probe.mode"), (["save_classifier=true"], "save_classifier"),
                      (["probe.layers=all"], "probe.layers")):
        with pytest.raises(ConfigError) as e:
            validate_probe_config(_cfg(work, *cnn, "probe.layers=stages", *over))
        assert e.value.key == key


class _Signals:
    """The least a cache offers extract_features: ``len`` and ``signal(i)`` (12 x T float32)."""

    def __init__(self, x):
        self.x = x.astype("float32")

    def __len__(self):
        return len(self.x)

    def signal(self, i):
        return self.x[i]
