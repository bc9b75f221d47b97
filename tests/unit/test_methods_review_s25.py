"""Review s25 of the pretraining methods: CLOCS cmsc / cmsmlc need adjacent segments (``segments`` gave positives
that were one crop twice in validation), and views a contrastive loss leaves out enter no BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ecgfm.backbones import create_backbone
from ecgfm.config import check_views
from ecgfm.errors import ConfigError
from ecgfm.methods.clocs import CLOCSModule
from ecgfm.methods.simclr import SimCLRModule

CLOCS = "ecgfm.methods.clocs.CLOCSModule"


def _cfg(views, mode):
    return OmegaConf.create({"data": {"views": views}, "method": {"_target_": CLOCS, "mode": mode}})


@pytest.mark.parametrize("mode", ["cmsc", "cmsmlc"])
@pytest.mark.parametrize("views", ["segments", "single"])
def test_clocs_segment_modes_refuse_views_other_than_adjacent(mode, views):
    with pytest.raises(ConfigError, match=r"data\.views.*adjacent"):
        check_views(_cfg(views, mode))
    check_views(_cfg("adjacent", mode))


def test_clocs_cmlc_and_simclr_keep_their_views():
    check_views(_cfg("single", "cmlc"))
    for views in ("single", "segments", "adjacent"):
        check_views(OmegaConf.create({"data": {"views": views},
                                      "method": {"_target_": "ecgfm.methods.simclr.SimCLRModule"}}))


def test_clocs_refuses_a_second_view_that_is_the_first():
    torch.manual_seed(0)
    m = CLOCSModule(create_backbone("resnet1d_test"), mode="cmsc")
    x = torch.randn(4, 12, 250)
    with pytest.raises(ValueError, match="one crop twice"):
        m.shared_step({"x": x, "x2": x.clone(), "index": torch.arange(4)})


def _same_loss(module, valid_batch, full_batch):
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    alone = module.shared_step(valid_batch)[0].detach()
    module.load_state_dict(sd)
    beside = module.shared_step(full_batch)[0].detach()
    return float(alone), float(beside)


@pytest.mark.parametrize("backbone,proj_layers", [("resnet1d_test", 1), ("vit1d_test", 2)])
def test_clocs_views_that_do_not_exist_leave_the_valid_views_loss_alone(backbone, proj_layers):
    """cmlc with one-lead records: none of the view leads exists, so their views are left out of the loss; in
    training they used to enter the encoder's / projector's BatchNorm statistics (1.406 -> 1.394, 2.366 -> 1.804)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, 250, generator=g)
    lm = torch.ones(8, 12, dtype=torch.bool)
    lm[4:, 1:] = False
    full = {"x": x * lm[:, :, None], "lead_mask": lm, "patient": torch.arange(8), "index": torch.arange(8)}
    valid = {k: v[:4] for k, v in full.items()}
    torch.manual_seed(0)
    m = CLOCSModule(create_backbone(backbone), mode="cmlc", proj_layers=proj_layers).train()
    alone, beside = _same_loss(m, valid, full)
    assert beside == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("backbone", ["vit1d_test", "resnet1d_test"])
def test_simclr_pairs_left_out_leave_the_kept_pairs_loss_alone(backbone):
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(8, 12, 250, generator=g), torch.randn(8, 12, 250, generator=g)
    x2[4:] = 0                                   # no signal in the second view: the pair is left out
    full = {"x": x, "x2": x2, "index": torch.arange(8)}
    kept = {k: v[:4] for k, v in full.items()}
    torch.manual_seed(0)
    m = SimCLRModule(create_backbone(backbone), fs=100, p_crop=0, p_noise=0, p_amplitude=0, p_wander=0,
                     p_powerline=0, p_time_mask=0, p_lead_mask=0, p_lowpass=0).train()   # identity augmentation
    alone, beside = _same_loss(m, kept, full)
    assert beside == pytest.approx(alone, abs=1e-5)   # old: 2.279 alone, 2.738 beside (vit1d_test)
