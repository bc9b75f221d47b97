"""Review findings of the nineteenth session on pretraining batches and the MAE losses: crops of records shorter
than a crop end in zero padding, which the batch now names (``recorded``) and the MAE / CREMA losses leave out
(each test fails on the code before the fix)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ecgfm.backbones import create_backbone
from ecgfm.data.cache import prepare_corpus
from ecgfm.data.datamodules import PretrainDataModule
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.synthetic import SyntheticSource
from ecgfm.losses.mae import masked_patch_mse
from ecgfm.methods.crema import CREMAModule
from ecgfm.methods.mae import MAEModule

DEC = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, warmup_steps=0, max_steps=10)


@pytest.fixture(scope="module")
def short_cache(tmp_path_factory):
    """40 synthetic 2.5 s records at 100 Hz (250 samples) in a cache: shorter than a 3 s crop."""
    root = tmp_path_factory.mktemp("short") / "syn"
    prepare_corpus(SyntheticSource(40, seed=0, fs=100.0, duration=2.5), root, PreprocessSpec(fs=100), workers=0,
                   progress=False)
    return root


def _batch(cache, crop_seconds: float) -> tuple[PretrainDataModule, dict[str, torch.Tensor], list[str]]:
    dm = PretrainDataModule([str(cache)], crop_samples=int(crop_seconds * 100), batch_size=8, num_workers=0,
                            val_fraction=0.1, samples_per_epoch=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    return dm, next(iter(dm.train_dataloader())), [str(w.message) for w in caught]


def test_crops_name_their_recorded_samples_and_setup_warns_with_the_share(short_cache):
    dm, batch, caught = _batch(short_cache, 3.0)
    assert batch["recorded"].dtype == torch.int64 and batch["recorded"].tolist() == [250] * 8
    assert batch["x"][:, :, 250:].abs().sum() == 0 and batch["x"][:, :, :250].abs().sum() > 0
    assert any("longer than the training records of 100.0% of the draws" in m and "zero padding" in m
               for m in caught), caught
    dm2, batch2, caught2 = _batch(short_cache, 1.0)
    assert batch2["recorded"].tolist() == [100] * 8          # a crop inside the record: every sample recorded
    assert not any("zero padding" in m for m in caught2), caught2


def _mae_batch(recorded: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(recorded), 12, 250, generator=g)
    for b, r in enumerate(recorded):
        x[b, :, r:] = 0                                  # as the data module pads
    lead_mask = torch.ones(len(recorded), 12, dtype=torch.bool)
    lead_mask[0, 7:] = False
    return {"x": x, "lead_mask": lead_mask, "index": torch.arange(len(recorded)),
            "recorded": torch.tensor(recorded, dtype=torch.int64)}


@pytest.mark.parametrize("lead_aware", [True, False])
def test_mae_loss_leaves_patches_without_a_recorded_sample_out(lead_aware):
    """vit1d_test: 250 samples in 10 patches of 25. Recorded 110 samples: patches 0-4 count (patch 4 holds samples
    100-124, 10 of them recorded), 5-9 are padding; the loss is the full pass's MSE over the hidden patches of
    present leads with a recorded sample, not over the padded ones (whose target is 0)."""
    torch.manual_seed(0)
    m = MAEModule(create_backbone("vit1d_test"), lead_aware=lead_aware, **DEC).eval()
    batch = _mae_batch([110, 250, 60])
    loss, _ = m.shared_step(batch)
    out = m(batch["x"], batch["lead_mask"])                  # the same fixed evaluation masks
    time_ok = (torch.arange(10) * 25)[None, :] < batch["recorded"][:, None]                # (B, N)
    counted = out["mask"] & batch["lead_mask"][:, :, None] & time_ok[:, None, :]
    expected = masked_patch_mse(out["pred"], m.patchify(batch["x"]), counted, norm_pix=m.norm_pix_loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    with_padding = masked_patch_mse(out["pred"], m.patchify(batch["x"]), out["mask"] & batch["lead_mask"][:, :, None],
                                    norm_pix=m.norm_pix_loss)
    assert abs(float(loss) - float(with_padding)) > 1e-4     # the padded patches did count before
    assert m.counted_patches(out["mask"], batch["lead_mask"], batch["recorded"]).sum() == counted.sum()
    # the full pass given the batch's recorded samples is the training step's loss again
    full_pass = m(batch["x"], batch["lead_mask"], recorded=batch["recorded"])
    torch.testing.assert_close(full_pass["loss"], loss, rtol=1e-5, atol=1e-7)
    # a batch without "recorded" (every sample recorded) is scored as before
    full = {k: v for k, v in _mae_batch([250, 250, 250]).items() if k != "recorded"}
    torch.testing.assert_close(m.shared_step(full)[0], m.shared_step(dict(full, recorded=torch.full((3,), 250)))[0])


def test_crema_reconstruction_term_leaves_padding_out_too():
    torch.manual_seed(0)
    mae = MAEModule(create_backbone("vit1d_test"), **DEC).eval()
    torch.manual_seed(0)
    crema = CREMAModule(create_backbone("vit1d_test"), contrastive_weight=0.0, **DEC).eval()
    crema.load_state_dict(mae.state_dict(), strict=False)
    batch = _mae_batch([110, 250, 60])
    assert crema.shared_step(batch)[0].item() == mae.shared_step(batch)[0].item()
    no_rec = {k: v for k, v in batch.items() if k != "recorded"}
    assert crema.shared_step(no_rec)[0].item() != crema.shared_step(batch)[0].item()



def test_mae_prior_of_a_counterfactual_leaves_the_padding_out_like_the_training_loss():
    """The counterfactual's plausibility prior counted the padded patches the MAE is no longer trained on (their
    error then came from untrained outputs): given the recorded samples it counts the training loss's patches."""
    from ecgfm.explain.counterfactual import MAEPrior

    torch.manual_seed(0)
    m = MAEModule(create_backbone("vit1d_test"), **DEC).eval()
    batch = _mae_batch([60])
    prior = MAEPrior(m, n_masks=2)
    rec = torch.arange(250) < 60
    with_rec, without = prior(batch["x"], recorded=rec), prior(batch["x"])
    # by hand: the prior's first mask, counted patches from counted_patches with 60 recorded samples
    manual = []
    for k in range(2):
        gen = torch.Generator().manual_seed(k)
        ((*_, latent, mask, ids_restore),) = m.encode_lead_sets(batch["x"], batch["lead_mask"][:1] | True, gen)
        pred = m.forward_decoder(latent, ids_restore, mask.shape[2])
        counted = m.counted_patches(mask, None, torch.tensor([60]))
        manual.append(masked_patch_mse(pred, m.patchify(batch["x"]), counted, norm_pix=m.norm_pix_loss))
    torch.testing.assert_close(with_rec[0], torch.stack(manual).mean(), rtol=1e-5, atol=1e-6)
    assert abs(float(with_rec[0]) - float(without[0])) > 1e-4
