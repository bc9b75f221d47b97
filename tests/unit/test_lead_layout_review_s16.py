"""Review s16: a lead-aware ViT-1D encoder must get, outside its training step, the token layout it learned.

1. Evaluation follows the pretraining's ``method.lead_aware`` (``features.lead_aware: null``), warns on an explicit
   contradiction, and the resolved value is the recipe identity's (cells of lead-aware encoders keep theirs).
2. ``MAEModule.forward`` groups a batch by lead set as ``shared_step`` does.
3. ``MAEPrior`` (explain) encodes a record's present leads only and counts only their patches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.evaluate import sweep as S
from ecgfm.evaluate.identity import recipe_identity
from ecgfm.export import export_encoder
from ecgfm.methods.mae import MAEModule

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ 1. evaluation layout
def _export(path: Path, hparams: dict | None) -> Path:
    """A ``vit1d_test`` encoder exported as train.py does (``method_hparams`` in provenance and extra)."""
    torch.manual_seed(0)
    extra = {"method": "MAEModule", "fs": 100.0, "crop_samples": 250}
    if hparams is not None:
        extra["method_hparams"] = hparams
    return export_encoder(create_backbone("vit1d_test"), path, PreprocessSpec(fs=100.0), extra=extra)


def _probe_cfg(tmp: Path, *overrides: str):
    base = [f"paths.cache_root={tmp / 'cache'}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=30", "bootstrap.n=0", "plot=false", "torch_threads=1",
            "report=never", "fraction=1.0", "probe.Cs=[1.0]"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("probe", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("s16_encoders")
    return {"zero_filled": _export(tmp / "zero", {"_target_": "ecgfm.methods.mae.MAEModule", "lead_aware": False}),
            "aware": _export(tmp / "aware", {"_target_": "ecgfm.methods.mae.MAEModule", "lead_aware": True}),
            "unrecorded": _export(tmp / "old", None)}


def test_the_pretraining_setting_is_read_from_the_export(encoders):
    info = {k: S.encoder_meta(p) for k, p in encoders.items()}
    assert S.pretraining_lead_aware(info["zero_filled"]) is False
    assert S.pretraining_lead_aware(info["aware"]) is True
    assert S.pretraining_lead_aware(info["unrecorded"]) is None
    assert S.pretraining_lead_aware({}) is None


def test_default_follows_the_pretraining(encoders, caplog):
    desc = S.resolve_checkpoint(str(encoders["zero_filled"]), 0, load_weights=False)
    with caplog.at_level(logging.WARNING, logger=S.log.name):
        assert S.resolve_lead_aware(None, desc) is False            # was: always true (a layout it never saw)
        assert not caplog.records
        assert S.resolve_lead_aware(False, desc) is False and not caplog.records
    for name in ("aware", "unrecorded"):
        assert S.resolve_lead_aware(None, S.resolve_checkpoint(str(encoders[name]), 0, load_weights=False)) is True
    # a random twin of the zero-filled export was never trained: nothing to follow
    twin = S.resolve_checkpoint(f"random:{encoders['zero_filled']}", 0, load_weights=False)
    assert S.resolve_lead_aware(None, twin) is True
    assert S.resolve_lead_aware(None, S.resolve_checkpoint("random:vit1d_test", 0, load_weights=False)) is True


def test_an_explicit_contradiction_warns_naming_both(encoders, caplog):
    zero = S.resolve_checkpoint(str(encoders["zero_filled"]), 0, load_weights=False)
    aware = S.resolve_checkpoint(str(encoders["aware"]), 0, load_weights=False)
    with caplog.at_level(logging.WARNING, logger=S.log.name):
        assert S.resolve_lead_aware(True, zero) is True
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "features.lead_aware=true" in msg and "method.lead_aware=false" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=S.log.name):
        assert S.resolve_lead_aware(False, aware) is False
    msg = caplog.records[0].getMessage()
    assert "features.lead_aware=false" in msg and "method.lead_aware=true" in msg


def _recipe(tmp: Path, checkpoint: str, *overrides: str) -> dict:
    cfg = _probe_cfg(tmp, f"checkpoint={checkpoint}", *overrides)
    ctx = S._context(cfg, "linear")
    desc = S.resolve_checkpoint(checkpoint, 0, load_weights=False)
    return S._recipe(ctx, desc, S._probe_recipe(S._container(cfg.probe)))


def test_default_cells_keep_their_recipe_identity(encoders, tmp_path):
    """``features.lead_aware: null`` resolves before it enters the recipe: a default cell of a lead-aware (or
    unrecorded, or random-init) encoder has the identity it had under the old default ``true``."""
    for checkpoint in (str(encoders["aware"]), str(encoders["unrecorded"]), "random:vit1d_test"):
        default = _recipe(tmp_path, checkpoint)
        assert default["lead_aware"] is True
        assert recipe_identity(default) == recipe_identity(_recipe(tmp_path, checkpoint, "features.lead_aware=true"))
    # the zero-filled encoder's default cell is the one an explicit false (the layout it was pretrained on) gave
    zero = str(encoders["zero_filled"])
    default = _recipe(tmp_path, zero)
    assert default["lead_aware"] is False
    assert recipe_identity(default) == recipe_identity(_recipe(tmp_path, zero, "features.lead_aware=false"))
    assert recipe_identity(default) != recipe_identity(_recipe(tmp_path, zero, "features.lead_aware=true"))


def test_config_validation_accepts_null_true_false(tmp_path):
    from ecgfm.config import ConfigError
    from ecgfm.recipes import validate_finetune_config, validate_probe_config

    assert _probe_cfg(tmp_path).features.lead_aware is None
    for value in ("null", "true", "false"):
        validate_probe_config(_probe_cfg(tmp_path, f"features.lead_aware={value}"))
    with pytest.raises(ConfigError, match="lead_aware"):
        validate_probe_config(_probe_cfg(tmp_path, "features.lead_aware=maybe"))
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        ft = compose("finetune", overrides=[f"paths.cache_root={tmp_path}"])
    assert ft.features.lead_aware is None
    validate_finetune_config(ft)


class _Stop(Exception):
    pass


def test_probe_extraction_gets_the_resolved_setting(encoders, tmp_path, monkeypatch):
    """The features of a zero-filled-pretrained encoder are extracted zero-filled by default."""
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs.get("lead_aware"))
        raise _Stop

    monkeypatch.setattr(S, "cached_features", fake)
    for checkpoint, want in ((encoders["zero_filled"], False), (encoders["aware"], True)):
        with pytest.raises(_Stop):
            S.probe_main(_probe_cfg(tmp_path, f"checkpoint={checkpoint}"))
        assert seen[-1] is want


def test_finetune_gets_the_resolved_setting(encoders, tmp_path, monkeypatch):
    """finetune.py's model (forward pass and LP-FT features) follows the pretraining by default too."""
    import ecgfm.evaluate.finetune as F

    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs.get("lead_aware"))
        raise _Stop

    monkeypatch.setattr(F, "run_finetune", fake)
    base = [f"paths.cache_root={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=30", "bootstrap.n=0", "plot=false", "torch_threads=1",
            "report=never", "fraction=1.0"]
    for checkpoint, want in ((encoders["zero_filled"], False), (encoders["aware"], True)):
        with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            cfg = compose("finetune", overrides=base + [f"checkpoint={checkpoint}"])
        with pytest.raises(_Stop):
            S.finetune_main(cfg)
        assert seen[-1] is want


# ------------------------------------------------------------------------------------ 2. MAEModule.forward
def _mae(**kwargs) -> MAEModule:
    torch.manual_seed(0)
    return MAEModule(create_backbone("vit1d_test"), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                     warmup_steps=0, max_steps=10, **kwargs)


def _mixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``x (4, 12, 250)``: rows 0, 2 with 12 leads, rows 1, 3 with lead I only (zero-filled elsewhere)."""
    g = torch.Generator().manual_seed(3)
    lead_mask = torch.ones(4, 12, dtype=torch.bool)
    lead_mask[[1, 3], 1:] = False
    return torch.randn(4, 12, 250, generator=g) * lead_mask[:, :, None], lead_mask


@pytest.mark.parametrize("train", [False, True])
def test_forward_masks_and_encodes_as_the_training_step(train):
    m = _mae().train(train)
    x, lead_mask = _mixed_batch()
    torch.manual_seed(11)
    out = m(x, lead_mask)
    torch.manual_seed(11)
    step, _ = m.shared_step({"x": x, "lead_mask": lead_mask})
    torch.testing.assert_close(out["loss"], step, rtol=1e-5, atol=1e-6)   # was 1.715 against 1.705 (repro)
    # no visible patch on an absent lead: the one-lead rows keep floor(10 * 0.25) = 2 visible patches of lead I
    assert out["mask"].shape == (4, 12, 10) and out["pred"].shape == (4, 12, 10, 25)
    assert int((~out["mask"] & ~lead_mask[:, :, None]).sum()) == 0
    assert (~out["mask"][[1, 3], 0]).sum(1).tolist() == [2, 2]
    assert (~out["mask"][[0, 2]]).sum((1, 2)).tolist() == [30, 30]
    # one latent per lead-set group, with the group's own visible tokens (+ 2L SEP slots)
    assert sorted(lat.shape[1] - 24 for lat in out["latent"]) == [2, 30]
    assert sorted(len(rows) for rows, _ in out["groups"]) == [2, 2]
    # the prediction rows are in batch order: row 1 is a one-lead row's (from its group's decoder pass)
    for rows, lat in zip([r for r, _ in out["groups"]], out["latent"]):
        assert torch.equal(out["mask"][rows].sum((1, 2)), torch.full((len(rows),), 120 - (lat.shape[1] - 24)))


def test_forward_with_every_lead_or_zero_filled_is_unchanged():
    """A batch with every lead (or lead_aware=False) is one group: the old full pass, one latent tensor."""
    x, lead_mask = _mixed_batch()
    m = _mae(lead_aware=False).eval()
    out = m(x, lead_mask, generator=torch.Generator().manual_seed(0))
    lat, mask, restore = m.forward_encoder(x, torch.Generator().manual_seed(0))
    assert torch.equal(out["latent"], lat) and torch.equal(out["mask"], mask)
    torch.testing.assert_close(out["loss"], m.forward_loss(x, m.forward_decoder(lat, restore, 10), mask, lead_mask))
    m = _mae().eval()
    full = torch.ones(4, 12, dtype=torch.bool)
    out = m(x, full, generator=torch.Generator().manual_seed(0))
    lat, mask, _ = m.forward_encoder(x, torch.Generator().manual_seed(0))
    assert torch.equal(out["latent"], lat) and torch.equal(out["mask"], mask)


# ------------------------------------------------------------------------------------ 3. MAEPrior (explain)
def _one_lead(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (1, 12, 250)`` with lead I only, and its ``lead_mask (1, 12)``."""
    x = torch.zeros(1, 12, 250)
    x[0, 0] = torch.randn(250, generator=torch.Generator().manual_seed(seed))
    lead_mask = torch.zeros(1, 12, dtype=torch.bool)
    lead_mask[0, 0] = True
    return x, lead_mask


def _reference_prior(m: MAEModule, x: torch.Tensor, lead_mask: torch.Tensor, n_masks: int) -> torch.Tensor:
    """What the MAE's training step scores for one record: its present leads encoded, their hidden patches
    counted, the masks of the prior's generators."""
    present = lead_mask[0].nonzero().flatten()
    errs = []
    for k in range(n_masks):
        gen = torch.Generator().manual_seed(k)
        lat, mask, restore = m.forward_encoder(x, gen, present=present if m.lead_aware else None)
        errs.append(m.reconstruction_loss(x, lat, mask, restore, lead_mask))
    return torch.stack(errs).mean()


@pytest.mark.parametrize("aware", [True, False])
def test_mae_prior_encodes_and_counts_present_leads_only(aware, monkeypatch):
    from ecgfm.explain.counterfactual import MAEPrior

    m = _mae(lead_aware=aware)
    prior = MAEPrior(m, n_masks=2)
    x, lead_mask = _one_lead()
    seen = []
    real = m.backbone.forward_features

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.shape[1])
        return out

    monkeypatch.setattr(m.backbone, "forward_features", spy)
    value = prior(x)                                          # lead mask read off the all-zero rows
    # lead-aware: 2 visible patches of lead I (+ 24 SEP slots) as in training, not 30 patches over 12 leads (old);
    # zero-filled pretraining: the 12-lead grid it was trained on
    assert seen[0] == (2 + 24 if aware else 30 + 24)
    with torch.no_grad():   # only lead I's hidden patches count (old: 82 of 90 counted patches on absent leads)
        torch.testing.assert_close(value[0], _reference_prior(m, x, lead_mask, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prior(x, lead_mask=lead_mask), value)


def test_mae_prior_of_a_full_record_is_unchanged():
    """Every lead present: one group, the old masks and loss (all patches of the 12 leads)."""
    from ecgfm.explain.counterfactual import MAEPrior
    from ecgfm.losses.mae import masked_patch_mse

    m = _mae()
    x = torch.randn(2, 12, 250, generator=torch.Generator().manual_seed(4))
    got = MAEPrior(m, n_masks=2)(x)
    want = []
    with torch.no_grad():
        for i in range(2):
            errs = []
            for k in range(2):
                lat, mask, restore = m.forward_encoder(x[i:i + 1], torch.Generator().manual_seed(k))
                pred = m.forward_decoder(lat, restore, 10)
                errs.append(masked_patch_mse(pred[0], m.patchify(x[i:i + 1])[0], mask[0], norm_pix=True))
            want.append(torch.stack(errs).mean())
    torch.testing.assert_close(got, torch.stack(want))


def test_counterfactual_scores_the_prior_over_the_records_leads():
    from ecgfm.explain.counterfactual import _prior_values

    calls = []

    class Prior(torch.nn.Module):
        def forward(self, x, lead_mask=None):
            calls.append(lead_mask)
            return x.new_zeros(x.shape[0])

    x, lead_mask = _one_lead()
    _prior_values(Prior(), x, lead_mask)
    assert torch.equal(calls[0], lead_mask)
    assert _prior_values(lambda z: z.sum((1, 2)), x, lead_mask).shape == (1,)   # a plain callable: x only


def test_python_encoder_api_uses_the_pretraining_layout_too():
    """ecgfm.Encoder read ``lead_aware`` at the top of encoder.json only (never written): an encoder pretrained on
    zero-filled absent leads was embedded lead-aware from Python while probes used its pretraining layout."""
    import types

    from ecgfm.api import Encoder

    net = types.SimpleNamespace(accepts_lead_mask=True)
    for meta, expected in (({"provenance": {"method_hparams": {"lead_aware": False}}}, False),
                           ({"extra": {"method_hparams": {"lead_aware": True}}}, True),
                           ({}, True),
                           ({"lead_aware": False, "provenance": {"method_hparams": {"lead_aware": True}}}, False)):
        enc = Encoder.__new__(Encoder)
        enc.meta, enc.network = meta, net
        assert enc.lead_aware is expected, meta
