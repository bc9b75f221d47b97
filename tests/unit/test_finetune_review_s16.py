"""LP-FT on the inputs fine-tuning trains on (review of 2026-12-06):

* BatchNorm backbones: the probe was fitted on eval-mode features of a random CNN's initial running statistics
  (0 / 1), and fine-tuning in train mode (batch statistics) started with logits in the thousands; the running
  statistics are now recomputed on the training crops first (:func:`recalibrate_batchnorm`);
* ``finetune.lp_features=windows`` fits the probe on windows (fine-tuning's loss is per crop), with ``C`` chosen
  on the records aggregated as the model aggregates (:func:`aggregate_window_probabilities`); ``records`` (the
  default, chosen on validation) on record-mean embeddings as before.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm.backbones.registry import create_backbone
from ecgfm.data.datamodules import DownstreamDataModule
from ecgfm.evaluate.finetune import (
    FinetuneModule,
    aggregate_window_probabilities,
    fit_probe_head,
    init_head_from_probe,
    recalibrate_batchnorm,
    run_finetune,
)

from synthetic_tasks import synthetic_task  # noqa: E402  (tests/unit helper)

WINDOW = STRIDE = 250


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return synthetic_task(tmp_path_factory.mktemp("lpft_s16") / "syn", 120, seed=1, duration=7.5)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_backbone("resnet1d_test")


def _train_batch(task):
    cache_dir, _, labels, splits = task
    dm = DownstreamDataModule(cache_dir, labels.argmax(axis=1), splits, crop_samples=WINDOW, batch_size=48, seed=3,
                              multilabel=False)
    return next(iter(dm.train_dataloader()))


def test_recalibrated_running_statistics_match_the_batch_statistics(task):
    cache_dir, _, labels, splits = task
    model = FinetuneModule(_cnn(), labels.shape[1], multilabel=False)
    batch = _train_batch(task)

    def gap(m: FinetuneModule) -> float:   # on a copy: a train-mode forward updates the running statistics
        m = copy.deepcopy(m)
        with torch.no_grad():
            m.eval()
            e = m.backbone.embed(batch["x"])
            m.train()
            t = m.backbone.embed(batch["x"])
        return float((e - t).abs().mean() / t.abs().mean())

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all(m.momentum == 0.1 for m in norms)
    before = gap(model)                                 # initial running statistics 0 / 1: eval != train
    dm = DownstreamDataModule(cache_dir, labels.argmax(axis=1), splits, crop_samples=WINDOW, batch_size=32,
                              test_stride=STRIDE, multilabel=False)
    model.eval()
    assert recalibrate_batchnorm(model, dm.train_dataloader()) == len(norms)
    assert not model.training and all(m.momentum == 0.1 for m in norms)      # mode and momentum restored
    after = gap(model)
    assert after < 0.25 * before and after < 0.2
    vit = FinetuneModule(create_backbone("vit1d_test"), labels.shape[1], multilabel=False)
    assert recalibrate_batchnorm(vit, dm.train_dataloader()) == 0             # no BatchNorm: nothing to do


def test_lp_ft_on_a_batchnorm_cnn_starts_from_the_probe_loss(task):
    """At lr 0 the first epoch's train-mode loss is the probe's loss, not the thousands of the review's
    reproducer: the fine-tune of a random-init CNN was a linear probe in disguise (its first epoch wrecked the
    network, the best-weights restore handed back the probe)."""
    cache_dir, cache, labels, splits = task
    out = run_finetune(_cnn(), cache_dir, labels, splits, False, WINDOW, STRIDE,
                       dict(epochs=1, batch_size=32, warmup_epochs=0, patience=3, lr=0.0, head_init="lp",
                            lp_Cs=(0.1, 1.0), lp_features="windows"), seed=0)
    loss = float(re.search(r"train loss ([0-9.]+)", out["progress"][-1]).group(1))
    model = out["model"]
    model.eval()
    batch = _train_batch(task)
    with torch.no_grad():
        eval_loss = float(model.loss(model(batch["x"], batch["lead_mask"]), batch["y"]))
    assert loss < 3.0 * eval_loss + 0.5, (loss, eval_loss)
    assert float(model.head.weight.abs().max()) < 50.0


def test_lp_features_choose_record_means_or_windows(task):
    _, cache, labels, splits = task
    _, info = fit_probe_head(_cnn(), cache, labels, splits, False, WINDOW, STRIDE, Cs=(1.0,), aggregate="logit",
                             features="windows")
    assert info["windows"] == 3 * len(splits["train"]) and info["features"] == "windows"   # 3 windows a record
    _, info = fit_probe_head(_cnn(), cache, labels, splits, False, WINDOW, STRIDE, Cs=(1.0,), aggregate="logit")
    assert info["windows"] == len(splits["train"]) and info["features"] == "records"       # the default
    _, info = fit_probe_head(_cnn(), cache, labels, splits, False, WINDOW, STRIDE, Cs=(1.0,), aggregate="prob")
    assert info["features"] == "windows"                                     # mean probability: windows always
    with pytest.raises(ValueError, match="lp_features"):
        fit_probe_head(_cnn(), cache, labels, splits, False, WINDOW, STRIDE, Cs=(1.0,), features="crops")


def test_lp_features_is_a_checked_recipe_key():
    from ecgfm.config import ConfigError
    from ecgfm.recipes import as_finetune_recipe

    assert as_finetune_recipe().lp_features == "records"
    assert as_finetune_recipe(lp_features="windows").lp_features == "windows"
    with pytest.raises(ConfigError, match="finetune.lp_features"):
        as_finetune_recipe(lp_features="crops")


@pytest.mark.parametrize("multilabel", [False, True])
def test_window_probabilities_aggregate_as_the_model_does(multilabel):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (7, 4))
    pos = np.array([0, 0, 1, 2, 2, 2, 1])
    p = 1 / (1 + np.exp(-z)) if multilabel else np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    model = FinetuneModule(create_backbone("vit1d_test"), 4, multilabel=multilabel, window_aggregate="logit")
    mean = np.stack([z[pos == r].mean(axis=0) for r in range(3)])
    np.testing.assert_allclose(aggregate_window_probabilities(p, pos, 3, multilabel, "logit"),
                               model.record_probs(mean), atol=1e-9)
    np.testing.assert_allclose(aggregate_window_probabilities(p, pos, 3, multilabel, "prob"),
                               np.stack([p[pos == r].mean(axis=0) for r in range(3)]), atol=1e-12)


def test_lp_init_recipe_joins_the_cell_identity():
    from ecgfm.evaluate.sweep import _finetune_code_recipe

    assert "lp_init" in _finetune_code_recipe("finetune", "lp")
    assert "lp_init" not in _finetune_code_recipe("finetune", "random")
    assert _finetune_code_recipe("linear", "lp") == {}


def test_estimated_statistics_of_a_pretrained_encoder_are_kept(task):
    """Only never-estimated (random-init) statistics are computed: a pretrained encoder's come from its pool
    (re-estimating them on 10 % of CinC 2017 cost the pretext encoder's LP-FT 0.03 of validation AUROC)."""
    cache_dir, _, labels, splits = task
    model = FinetuneModule(_cnn(), labels.shape[1], multilabel=False)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    dm = DownstreamDataModule(cache_dir, labels.argmax(axis=1), splits, crop_samples=WINDOW, batch_size=32,
                              test_stride=STRIDE, multilabel=False)
    with torch.no_grad():                               # "pretraining": statistics of other data
        model.train()
        model(torch.randn(16, 12, WINDOW) * 3 + 1, torch.ones(16, 12, dtype=torch.bool))
    before = [m.running_mean.clone() for m in norms]
    assert recalibrate_batchnorm(model, dm.train_dataloader()) == 0
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
    assert recalibrate_batchnorm(model, dm.train_dataloader(), only_never_estimated=False) == len(norms)
    assert not all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))


def test_random_twin_frozen_features_get_batchnorm_statistics_of_the_training_windows(task):
    """A random-init CNN probed frozen: its never-estimated statistics (0 / 1) are computed on the training
    records' windows first (no labels), deterministically; the estimated ones are then left alone."""
    from ecgfm.evaluate.features import extract_features
    from ecgfm.evaluate.finetune import random_init_batchnorm_statistics

    _, cache, labels, splits = task
    rows = np.concatenate([splits["train"], splits["val"]])

    def feats(bb):
        return extract_features(bb.eval(), cache, WINDOW, STRIDE, batch_size=64, device="cpu", rows=rows).features

    raw = feats(_cnn())
    a, b = _cnn(), _cnn()
    assert random_init_batchnorm_statistics(a, cache, splits["train"], WINDOW) > 0
    random_init_batchnorm_statistics(b, cache, splits["train"], WINDOW)
    fa, fb = feats(a), feats(b)
    assert np.array_equal(fa, fb) and not a.training                          # deterministic, back in eval mode
    assert not np.allclose(fa, raw)                                            # other features than 0 / 1 give
    norms = [m for m in a.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all(int(m.num_batches_tracked) > 0 for m in norms)
    assert any(float(m.running_mean.abs().max()) > 0 for m in norms)
    assert random_init_batchnorm_statistics(a, cache, splits["train"], WINDOW) == 0   # estimated now: kept
    assert np.array_equal(feats(a), fa)


def test_random_twin_identity_says_its_statistics_are_computed():
    from ecgfm.evaluate.identity import checkpoint_identity

    assert "batchnorm" in checkpoint_identity("random:resnet1d_test")["basis"]
    assert "batchnorm" not in checkpoint_identity("supervised:resnet1d_test")["basis"]
