"""ECG augmentations: shapes, seeded determinism, per-sample parameters, lead-mask respect."""

from __future__ import annotations

import pytest
import torch

from ecgfm.augment import (
    AmplitudeScale,
    ECGAugment,
    GaussianNoise,
    KeepOneLead,
    PresentLeadMask,
    RandomResizedCropSameLength,
    make_generator,
    simclr_augment,
)




def _batch(b=6, t=250, seed=0):
    g = torch.Generator().manual_seed(seed)
    tt = torch.arange(t) / 100.0
    x = torch.sin(2 * torch.pi * 1.2 * tt)[None, None, :] + 0.3 * torch.randn(b, 12, t, generator=g)
    mask = torch.ones(b, 12, dtype=torch.bool)
    mask[0, 6:] = False           # limb leads only
    mask[1, [0, 2, 5]] = False
    mask[2, 1:] = False           # single lead
    x = x * mask[:, :, None]
    return x.float(), mask


def test_simclr_preset_shapes_determinism_and_views_differ():
    x, mask = _batch()
    aug = simclr_augment(fs=100.0)
    a = aug(x, mask, make_generator(7))
    b = aug(x, mask, make_generator(7))
    c = aug(x, mask, make_generator(8))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)                       # same seed -> same views
    assert not torch.allclose(a, c)                # other seed -> other views
    gen = make_generator(0)
    v1, v2 = aug(x, mask, gen), aug(x, mask, gen)  # two SimCLR views from one generator
    assert not torch.allclose(v1, v2)


def test_absent_leads_stay_zero_with_every_transform_on():
    x, mask = _batch()
    aug = simclr_augment(fs=250.0, p_crop=1, p_amplitude=1, p_noise=1, p_wander=1, p_powerline=1,
                         p_time_mask=1, p_lead_mask=1, p_lowpass=1)
    out = aug(x, mask, make_generator(1))
    assert torch.all(out[~mask] == 0)
    # at least one present lead survives per sample
    assert torch.all((out.abs().sum(-1) > 0).sum(1) >= 1)


def test_present_lead_mask_only_masks_present_leads_and_keeps_one():
    x, mask = _batch(b=64, seed=3)
    x = x + 1.0 * mask[:, :, None]   # no lead is all-zero unless absent or masked
    t = PresentLeadMask(n_leads=(1, 11), p=1.0)
    out = t(x, generator=make_generator(2), lead_mask=mask)
    alive = out.abs().sum(-1) > 0
    assert torch.all(alive <= mask)                 # never "creates" leads
    assert torch.all(alive.sum(1) >= 1)             # keeps at least one present lead
    dropped = mask & ~alive
    assert dropped[3:].sum(1).min() >= 1            # samples with >= 2 present leads lost at least one
    assert dropped[2].sum() == 0                    # single-lead sample untouched
    assert len(set(dropped.sum(1).tolist())) > 1    # per-sample random counts


def test_keep_one_lead_makes_a_lead_i_view_of_multi_lead_samples():
    x, mask = _batch(b=64, seed=4)
    x = x + 1.0 * mask[:, :, None]
    x[3, 0] = 0.0                                   # lead I zeroed (e.g. by the lead mask): another lead is kept
    out = KeepOneLead(lead=0, p=1.0)(x, generator=make_generator(0), lead_mask=mask)
    alive = out.abs().sum(-1) > 0
    assert torch.all(alive.sum(1) == 1)             # one lead left in every sample
    assert torch.equal(out[2], x[2])                # a one-lead sample is left as it is
    keep = alive.float().argmax(1)
    no_lead_i = torch.tensor([1, 3])                # absent in sample 1, zeroed in sample 3
    assert (keep[~torch.isin(torch.arange(64), no_lead_i)] == 0).all()
    assert (keep[no_lead_i] != 0).all() and mask[1, keep[1]]
    assert torch.equal(out[5, 0], x[5, 0])          # the kept lead is untouched
    half = KeepOneLead(lead=0, p=0.5)(x, generator=make_generator(1), lead_mask=mask)
    singles = int(((half.abs().sum(-1) > 0).sum(1) == 1).sum())
    assert 16 < singles < 48                        # per-sample draws
    aug = simclr_augment(fs=100.0, p_one_lead=1.0)
    assert isinstance(aug.transforms[-1], KeepOneLead)
    assert not any(isinstance(t, KeepOneLead) for t in simclr_augment(fs=100.0).transforms)   # off by default
    with pytest.raises(ValueError, match="lead"):
        KeepOneLead(lead=-1)
    with pytest.raises(ValueError, match="L > 12"):
        KeepOneLead(lead=12)(x)


def test_per_sample_parameters():
    x = torch.ones(16, 12, 100)
    out = AmplitudeScale((0.5, 2.0))(x, generator=make_generator(0))
    factors = out[:, 0, 0]
    assert factors.unique().numel() == 16
    assert torch.all(out == factors[:, None, None])  # one factor per sample, shared across leads and time


def test_resized_crop_same_length_identity_at_full_scale_and_stretch():
    x, _ = _batch(b=3)
    same = RandomResizedCropSameLength(scale=1.0)(x, generator=make_generator(0))
    assert torch.allclose(same, x, atol=1e-5)
    half = RandomResizedCropSameLength(scale=0.5)(x, generator=make_generator(0))
    assert half.shape == x.shape and not torch.allclose(half, x)


def test_noise_snr_and_probability_zero():
    x, mask = _batch(b=4)
    out = GaussianNoise(snr_db=20.0)(x, generator=make_generator(0))
    noise = out - x
    present = mask[:, :, None].expand_as(x)
    ratio = (x[present].var() / noise[present].var()).item()
    assert 70 < ratio < 130                          # 20 dB = factor 100 in power
    assert torch.equal(ECGAugment([GaussianNoise(20.0, p=0.0)])(x, mask, make_generator(0)), x)


def test_bad_input():
    aug = simclr_augment()
    with pytest.raises(ValueError, match="batch"):
        aug(torch.zeros(12, 100))
    with pytest.raises(ValueError, match="lead_mask"):
        aug(torch.zeros(2, 12, 100), torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="fs"):
        simclr_augment(fs=0)
