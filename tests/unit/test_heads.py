"""ProjectionHead options: shapes, layer structure, the no-BatchNorm variants, and SimCLR v1's head (CREMA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecgfm.heads import ProjectionHead


def _kinds(head: ProjectionHead) -> list[str]:
    return [type(m).__name__ + ("(bias)" if getattr(m, "bias", None) is not None and isinstance(m, nn.Linear)
                                else "") for m in head.net]


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("batch_norm,final", [(True, True), (True, False), (False, True), (False, False)])
def test_output_shape(layers, batch_norm, final):
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 8, num_layers=layers, batch_norm=batch_norm, final_batch_norm=final)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    n_bn = sum(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert n_bn == (layers - 1 + int(final) if batch_norm else 0)


def test_layer_structure():
    # default (SimCLR / CLOCS): unchanged, a non-affine BatchNorm on the output
    assert _kinds(ProjectionHead(16, 32, 8)) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    # SimCLR v1 / CREMA: Linear -> BN -> ReLU -> Linear with bias
    assert _kinds(ProjectionHead(16, 32, 8, final_batch_norm=False)) == ["Linear", "BatchNorm1d", "ReLU",
                                                                         "Linear(bias)"]
    assert _kinds(ProjectionHead(16, 32, 8, batch_norm=False)) == ["Linear(bias)", "ReLU", "Linear(bias)"]
    assert dict(ProjectionHead(16, 32, 8).named_parameters()).keys() == {"net.0.weight", "net.1.weight",
                                                                         "net.1.bias", "net.3.weight"}


def test_no_batch_norm_head_works_on_a_single_sample_in_training():
    head = ProjectionHead(16, 32, 8, batch_norm=False).train()
    assert head(torch.randn(1, 16)).shape == (1, 8)
    with pytest.raises(ValueError, match="more than 1 value"):   # BatchNorm cannot: why the option exists
        ProjectionHead(16, 32, 8).train()(torch.randn(1, 16))


def test_simclr_v1_head_equals_the_linear_bn_relu_linear_mlp():
    """The bias of a Linear before a BatchNorm cancels: same outputs and weight gradients as the biased MLP."""
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 8, final_batch_norm=False)
    ref = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))  # CREMA's old head
    with torch.no_grad():
        ref[0].weight.copy_(head.net[0].weight)
        ref[0].bias.normal_()                                      # any bias: removed by the batch mean
        for i in (1, 3):
            ref[i].load_state_dict(head.net[i].state_dict())
    x = torch.randn(6, 16)
    out, out_ref = head(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert ref[0].bias.grad.abs().max() < 1e-5                     # the bias never gets a gradient
    torch.testing.assert_close(head.net[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.net[3].bias.grad, ref[3].bias.grad, rtol=1e-4, atol=1e-5)
    # at inference (running statistics), identical when the running mean accounts for the bias
    with torch.no_grad():
        ref[1].running_mean.copy_(head.net[1].running_mean + ref[0].bias)
    head.eval()
    ref.eval()
    torch.testing.assert_close(head(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(16, 32, 8, num_layers=0)
    with pytest.raises(ValueError, match="dimensions"):
        ProjectionHead(16, 0, 8)


def test_attention_pool_refuses_a_mask_that_is_not_bool():
    """nn.MultiheadAttention adds a float mask to the scores: a 0/1 float mask gave padding more weight."""
    import pytest
    import torch

    from ecgfm.heads import AttentionPoolingHead

    head = AttentionPoolingHead(8, 3, num_heads=2)
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 4 + [True], [False] * 5])
    head(tokens, mask)
    for bad in (mask.float(), mask.long(), mask[:, :4]):
        with pytest.raises(ValueError, match="key_padding_mask must be bool"):
            head(tokens, bad)
