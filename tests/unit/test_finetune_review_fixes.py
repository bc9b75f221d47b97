"""Review fixes of fine-tuning and the probes: a frozen backbone stays frozen (BatchNorm statistics included), an
undefined validation AUROC is refused instead of scored 0, single-label rows must be one-hot, and the documented
window aggregation matches the default."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import numpy as np
import pytest
import torch

import ecgfm.evaluate.finetune as finetune_mod
from ecgfm.backbones.registry import create_backbone
from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.datamodules import DownstreamDataModule
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SYNTHETIC_CLASSES, SyntheticSource
from ecgfm.evaluate.features import FeatureSet
from ecgfm.evaluate.finetune import FinetuneModule, aggregate_windows, fit_probe_head, quiet_lightning, run_finetune
from ecgfm.evaluate.probe import LinearProbe, MLPProbe, ProbeData, run_probe_grid
from ecgfm.recipes import FinetuneRecipe

WINDOW = STRIDE = 250
TINY = dict(epochs=1, batch_size=16, warmup_epochs=0, patience=1, lp_Cs=(1.0,))


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A 60-record, 9-class single-label synthetic corpus (6 s at 100 Hz) with one-hot labels."""
    root = tmp_path_factory.mktemp("review") / "syn"
    prepare_corpus(SyntheticSource(60, seed=0, fs=100.0, duration=6.0), root, PreprocessSpec(fs=100), workers=0,
                   progress=False)
    cache = CorpusCache(root)
    labels = cache.labels_matrix(list(SYNTHETIC_CLASSES)).astype(np.float32)
    assert (labels.sum(axis=1) == 1).all()
    splits = {"train": np.arange(0, 40), "val": np.arange(40, 50), "test": np.arange(50, 60)}
    assert len(np.unique(labels[splits["val"]].argmax(axis=1))) > 1
    return str(root), cache, labels, splits


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("resnet1d_test")


# ------------------------------------------------------------------------------------------- frozen backbone
def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(syn):
    root, _, labels, splits = syn
    backbone = _resnet()
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in backbone.modules())   # BN: the test has teeth
    model = FinetuneModule(backbone, labels.shape[1], False, lr=1e-2, warmup_epochs=0, max_epochs=2,
                           freeze_backbone=True)
    model.train()
    assert model.head.training and not any(m.training for m in backbone.modules())
    before = copy.deepcopy(backbone.state_dict())
    head_before = model.head.weight.detach().clone()
    dm = DownstreamDataModule(root, labels, splits, crop_samples=WINDOW, batch_size=16, multilabel=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval mode.*")
        trainer.fit(model, datamodule=dm)   # two epochs with a validation in between (modes restored after it)
    after = backbone.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed   # running_mean / running_var / num_batches_tracked included
    assert not torch.equal(model.head.weight.detach(), head_before)   # the head did train
    model.train()
    assert not backbone.training and model.head.training


def test_unfrozen_backbone_still_trains_in_train_mode():
    model = FinetuneModule(_resnet(), 3, False)
    model.eval()
    model.train()
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------------- undefined validation AUROC
def test_run_finetune_refuses_validation_without_a_defined_class(syn):
    root, _, labels, splits = syn
    k = labels.argmax(axis=1)
    val = np.flatnonzero(k == k[0])[:4]                 # every validation record has the same class
    rest = np.setdiff1d(np.arange(len(k)), val)
    sp = {"train": rest[:40], "val": val, "test": rest[40:]}
    with pytest.raises(ValueError, match=r"split 'val' \(4 records\) has no class with both positive and negative"
                                         r".*positives per class"):
        run_finetune(_resnet(), root, labels, sp, False, WINDOW, STRIDE, TINY, seed=0)
    with pytest.raises(ValueError, match=r"split 'val'.*undefined"):
        run_finetune(_resnet(), root, labels, sp, False, WINDOW, STRIDE, dict(TINY, head_init="random"), seed=0)


def test_fit_probe_head_refuses_validation_without_a_defined_class(syn):
    _, cache, labels, splits = syn
    multi = np.zeros_like(labels)
    multi[:, 0] = 1                                      # multi-label: class 0 everywhere ...
    multi[splits["train"][::2], 1] = 1                   # ... class 1 in training only: nothing defined on val
    with pytest.raises(ValueError, match=r"split 'val' \(10 records\).*0: 10, 1: 0"):
        fit_probe_head(_resnet(), cache, multi, splits, True, WINDOW, STRIDE, Cs=(1.0,))


def _blobs(n=120, d=8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, c, n)
    y = np.eye(c, dtype=np.float32)[k]
    x = rng.normal(0, 3, (c, d))[k] + rng.normal(0, 1, (n, d))
    fs = FeatureSet(features=x.astype(np.float32), record=np.arange(n), n_records=n)
    return fs, y, k


@pytest.mark.parametrize("mode", ["linear", "mlp"])
def test_probe_grid_refuses_validation_without_a_defined_class(mode):
    fs, y, k = _blobs()
    val = np.flatnonzero(k == 1)[:10]
    rest = np.setdiff1d(np.arange(len(k)), val)
    splits = {"train": rest[:80], "val": val, "test": rest[80:]}
    data = ProbeData(fs, y, splits, False, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"split 'val' \(10 records\).*\{a: 0, b: 10, c: 0\}"):
        run_probe_grid(data, [1.0], [0], mode=mode, Cs=[0.1, 1.0], lrs=[1e-3], n_boot=0,
                       mlp_kwargs=dict(epochs=10, eval_every=5))


def test_probe_grid_accepts_validation_with_one_defined_class():
    """Multi-label validation where only some classes have both values: macro AUROC is defined, no refusal."""
    fs, y, k = _blobs()
    multi = y.copy()
    splits = {"train": np.arange(0, 80), "val": np.arange(80, 100), "test": np.arange(100, 120)}
    multi[splits["val"], 2] = 0                          # class 2 has no validation positive
    res = run_probe_grid(ProbeData(fs, multi, splits, True, ["a", "b", "c"]), [1.0], [0], Cs=[1.0], n_boot=0)
    assert np.isfinite(res[0]["val_macro_auroc"])


# --------------------------------------------------------------------------------- single-label one-hot rows
def _multi_hot(labels: np.ndarray) -> np.ndarray:
    y = labels.copy()
    y[0] = 0
    y[0, [0, 2]] = 1                                     # record 0: two classes
    y[1] = 0                                             # record 1: no class
    return y


def test_datamodule_refuses_non_one_hot_rows_of_the_splits(syn):
    root, _, labels, splits = syn
    with pytest.raises(ValueError, match=r"split 'train'.*2 of its 40 rows.*row 0 \(2 positives\), "
                                         r"row 1 \(0 positives\)"):
        DownstreamDataModule(root, _multi_hot(labels), splits, crop_samples=WINDOW, multilabel=False)
    # the same rows outside every split are not used: accepted, and one-hot rows give their class
    outside = {"train": splits["train"][2:], "val": splits["val"], "test": splits["test"]}
    dm = DownstreamDataModule(root, _multi_hot(labels), outside, crop_samples=WINDOW, multilabel=False)
    rows = np.concatenate([outside[k] for k in ("train", "val", "test")])
    np.testing.assert_array_equal(dm.labels[rows], labels[rows].argmax(axis=1))
    # multi-hot rows stay fine for a multi-label module
    DownstreamDataModule(root, _multi_hot(labels), splits, crop_samples=WINDOW, multilabel=True)


def test_run_finetune_and_lp_probe_refuse_non_one_hot_rows(syn):
    root, cache, labels, splits = syn
    bad = labels.copy()
    t = int(splits["test"][3])
    bad[t] = 1                                           # a test record with every class
    with pytest.raises(ValueError, match=rf"split 'test'.*row {t} \(9 positives\)"):
        run_finetune(_resnet(), root, bad, splits, False, WINDOW, STRIDE, TINY, seed=0)
    ext_labels = labels.copy()
    ext_labels[5] = 0
    with pytest.raises(ValueError, match=r"external set 'ext'.*row 5 \(0 positives\)"):
        run_finetune(_resnet(), root, labels, splits, False, WINDOW, STRIDE, TINY, seed=0,
                     external={"ext": (root, ext_labels, np.arange(10))})
    with pytest.raises(ValueError, match=r"split 'train'.*row 0 \(2 positives\)"):
        fit_probe_head(_resnet(), cache, _multi_hot(labels), splits, False, WINDOW, STRIDE, Cs=(1.0,))


def test_probes_refuse_non_one_hot_rows():
    fs, y, k = _blobs()
    x = fs.features
    bad = y.copy()
    bad[3] = [1, 1, 0]
    bad[7] = 0
    with pytest.raises(ValueError, match=r"LinearProbe\.fit labels.*row 3 \(2 positives\), row 7 \(0 positives\)"):
        LinearProbe(False).fit(x, bad)
    with pytest.raises(ValueError, match=r"MLPProbe\.fit labels.*row 3"):
        MLPProbe(False, epochs=1).fit(x, bad)
    splits = {"train": np.arange(0, 80), "val": np.arange(80, 100), "test": np.arange(100, 120)}
    with pytest.raises(ValueError, match=r"split 'train'.*row 3 \(2 positives\)"):
        run_probe_grid(ProbeData(fs, bad, splits, False, ["a", "b", "c"]), [1.0], [0], Cs=[1.0], n_boot=0)
    # rows outside the splits are ignored; one-hot rows fit as before (multi-label accepts multi-hot)
    out = {"train": np.arange(10, 80), "val": splits["val"], "test": splits["test"]}
    run_probe_grid(ProbeData(fs, bad, out, False, ["a", "b", "c"]), [1.0], [0], Cs=[1.0], n_boot=0)
    LinearProbe(True).fit(x, bad)


# ---------------------------------------------------------------------------------------- documentation
def test_docs_describe_the_default_logit_aggregation():
    assert FinetuneRecipe.window_aggregate == "logit"
    for doc in (finetune_mod.__doc__, aggregate_windows.__doc__):
        assert "mean window logit" in doc or "window logits" in doc
    assert not aggregate_windows.__doc__.lstrip().startswith("Mean window probability")
    assert "probabilities averaged per record (the PTB-XL" not in finetune_mod.__doc__.replace("\n  ", " ")
