"""Fine-tuning with absent leads: a backbone taking ``lead_mask`` (ViT-1D) gets each batch's record lead mask in
training, validation and test, as lead-aware frozen features do, so the LP-FT model before its first step is the
lead-aware linear probe on a one-lead task; the lead embedding is not weight-decayed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgfm.backbones.registry import create_backbone
from ecgfm.data.cache import CorpusCache, prepare_corpus
from ecgfm.data.preprocess import PreprocessSpec, sliding_windows
from ecgfm.data.synthetic import SYNTHETIC_CLASSES, SyntheticSource
from ecgfm.evaluate.features import extract_features
from ecgfm.evaluate.finetune import FINETUNE_NO_DECAY_NAMES, FinetuneModule, fit_probe_head, init_head_from_probe, \
    run_finetune
from ecgfm.optim import param_groups

WINDOW = STRIDE = 250   # vit1d_test's sequence length; 6 s records at 100 Hz -> 3 windows each


@pytest.fixture(scope="module")
def one_lead(tmp_path_factory):
    """A single-label synthetic task recorded on lead II only (the other 11 leads absent), in a corpus cache."""
    root = tmp_path_factory.mktemp("leads") / "syn_ii"
    prepare_corpus(SyntheticSource(120, seed=0, fs=100.0, duration=6.0, leads=["II"]), root, PreprocessSpec(fs=100),
                   workers=0, progress=False)
    cache = CorpusCache(root)
    assert cache.lead_masks.sum(axis=1).tolist() == [1] * len(cache)
    labels = cache.labels_matrix(list(SYNTHETIC_CLASSES))
    idx = np.random.default_rng(0).permutation(len(cache))
    splits = {"train": np.sort(idx[:70]), "val": np.sort(idx[70:95]), "test": np.sort(idx[95:])}
    return str(root), cache, labels, splits


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("vit1d_test")


def _windows(cache, rows):
    x = np.concatenate([sliding_windows(cache.signal(int(i)), WINDOW, STRIDE) for i in rows])
    owner = np.concatenate([[int(i)] * len(sliding_windows(cache.signal(int(i)), WINDOW, STRIDE)) for i in rows])
    mask = torch.from_numpy(np.asarray(cache.lead_masks, dtype=bool)[owner])
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), mask


def test_lp_init_is_the_lead_aware_probe_window_by_window(one_lead):
    _, cache, labels, splits = one_lead
    backbone = _vit()
    probe, info = fit_probe_head(backbone, cache, labels, splits, False, WINDOW, STRIDE, Cs=(0.1, 1.0),
                                 aggregate="prob")
    assert info["lead_aware"] is True
    model = FinetuneModule(backbone, labels.shape[1], multilabel=False)
    assert model.lead_aware
    init_head_from_probe(model.head, probe)
    model.eval()
    x, mask = _windows(cache, splits["val"][:8])
    with torch.no_grad():
        p_model = model.probs(model(x, mask)).double().numpy()
        aware = backbone.embed(x, lead_mask=mask).numpy()
        padded = backbone.embed(x).numpy()
    assert not np.allclose(aware, padded, atol=1e-3)   # the lead mask changes the features: the test has teeth
    np.testing.assert_allclose(p_model, probe.predict_proba(aware), atol=1e-5, rtol=0)


@pytest.mark.parametrize("aggregate", ["logit", "prob"])
def test_run_finetune_before_the_first_step_is_the_probe_on_one_lead(one_lead, aggregate):
    """lr 0: run_finetune's record-level test probabilities are the probe's on probe.py's lead-aware features."""
    cache_dir, cache, labels, splits = one_lead
    recipe = dict(epochs=1, batch_size=32, warmup_epochs=0, patience=3, lr=0.0, head_init="lp", lp_Cs=(0.1, 1.0),
                  window_aggregate=aggregate)
    out = run_finetune(_vit(), cache_dir, labels, splits, False, WINDOW, STRIDE, recipe, seed=0, predict_val=False)
    assert out["lp"]["lead_aware"] is True
    probe, _ = fit_probe_head(_vit(), cache, labels, splits, False, WINDOW, STRIDE, Cs=(0.1, 1.0),
                              aggregate=aggregate)
    rows, p = out["test"]
    feats = extract_features(_vit(), cache, WINDOW, STRIDE, rows=rows, lead_aware=True)
    if aggregate == "logit":
        expected = probe.predict_proba(feats.record_means()[rows])
    else:
        w, pos = feats.windows_of(rows)
        pw = probe.predict_proba(w)
        expected = np.stack([pw[pos == k].mean(axis=0) for k in range(len(rows))])
    np.testing.assert_allclose(p, expected, atol=1e-5, rtol=0)


def test_training_and_validation_pass_the_lead_mask(one_lead, monkeypatch):
    cache_dir, _, labels, splits = one_lead
    backbone = _vit()
    seen: list[bool] = []
    real = backbone.embed

    def spy(x, lead_mask=None):
        seen.append(lead_mask is not None and not bool(lead_mask.all()))
        return real(x, lead_mask=lead_mask)

    monkeypatch.setattr(backbone, "embed", spy)
    recipe = dict(epochs=1, batch_size=32, warmup_epochs=0, patience=3, head_init="random")
    run_finetune(backbone, cache_dir, labels, splits, False, WINDOW, STRIDE, recipe, seed=0, predict_val=False)
    assert seen and all(seen)   # every training, validation and test forward pass saw the one-lead masks
    seen.clear()
    run_finetune(backbone, cache_dir, labels, splits, False, WINDOW, STRIDE, recipe, seed=0, predict_val=False,
                 lead_aware=False)
    assert seen and not any(seen)   # lead_aware=False: zero-padded input


def test_cnn_is_zero_padded_and_lead_embedding_is_not_decayed():
    torch.manual_seed(0)
    cnn = FinetuneModule(create_backbone("resnet1d_test"), 4, multilabel=False)
    assert not cnn.lead_aware
    x = torch.zeros(2, 12, WINDOW)
    x[:, 1] = torch.randn(2, WINDOW)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 1] = True
    cnn.eval()
    with torch.no_grad():
        assert torch.equal(cnn(x, mask), cnn(x))   # the CNN ignores the mask: absent leads are zeros
    assert "lead_embed" in FINETUNE_NO_DECAY_NAMES
    vit = FinetuneModule(_vit(), 4, multilabel=False)
    groups = param_groups(vit, 0.05, lr=1e-3, layer_decay=0.75, no_decay_names=FINETUNE_NO_DECAY_NAMES)
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay["backbone.lead_embed"] == 0.0 and max(decay.values()) == 0.05


@pytest.mark.parametrize("head_init", ["random", "lp"])
def test_an_exported_encoder_in_eval_mode_is_fine_tuned_in_train_mode(one_lead, monkeypatch, head_init):
    """An exported encoder comes back in eval mode (load_encoder) and Lightning's fit keeps the mode it finds: every
    training step must still see BatchNorm and dropout in training mode, with a random or an LP-initialised head."""
    cache_dir, _, labels, splits = one_lead
    torch.manual_seed(0)
    backbone = create_backbone("resnet1d_test").eval()
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in backbone.modules())   # BN: the mode matters
    modes: list[bool] = []
    real = FinetuneModule.training_step

    def spy(self, batch, batch_idx):
        modes.append(all(m.training for m in self.modules()))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(FinetuneModule, "training_step", spy)
    recipe = dict(epochs=1, batch_size=32, warmup_epochs=0, patience=3, head_init=head_init, lp_Cs=(1.0,))
    out = run_finetune(backbone, cache_dir, labels, splits, False, WINDOW, STRIDE, recipe, seed=0, predict_val=False)
    assert modes and all(modes)
    assert not out["model"].training   # handed back in eval mode, as documented
