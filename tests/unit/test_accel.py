"""CPU fast paths: oneDNN linears give F.linear's results and gradients; fused AdamW gives for-each AdamW's update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ecgfm import accel
from ecgfm.accel import (OneDNNLinear, adamw_kwargs, onednn_flop_formulas, onednn_linear, onednn_linear_available,
                         resolve_cpu_linear, use_onednn_linears)

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear op")


def _grads(fn, x, w, b, gy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@needs_onednn
@pytest.mark.parametrize("lead, in_f, out_f, bias", [
    ((7,), 16, 48, True),       # wide output (out > in): dW on MKL
    ((2, 5), 48, 16, True),     # narrow output (out < in): dW on oneDNN, 3-D input
    ((3, 2, 4), 24, 24, False),  # 4-D input, no bias
    ((1,), 1, 3, True),
])
def test_onednn_linear_matches_f_linear_forward_and_backward(lead, in_f, out_f, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, generator=g) if bias else None
    gy = torch.randn(*lead, out_f, generator=g)
    ours = _grads(accel.OneDNNLinearFunction.apply, x, w, b, gy)
    ref = _grads(F.linear, x, w, b, gy)
    for a, r, name in zip(ours, ref, ("y", "dx", "dW", "db")):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)
    # deterministic: the same call gives the same bits
    again = _grads(accel.OneDNNLinearFunction.apply, x, w, b, gy)
    assert all(a is None or torch.equal(a, c) for a, c in zip(ours, again))


@needs_onednn
def test_onednn_linear_skips_input_grad_when_not_needed_and_takes_strided_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 10, generator=g).t()             # non-contiguous (10, 12)
    w = torch.randn(5, 12, generator=g, requires_grad=True)
    y = onednn_linear(x, w)
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("OneDNNLinearFunction")
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(10, 5).t() @ x, rtol=1e-5, atol=1e-5)


def test_fallback_for_float64_autocast_and_empty_input():
    """Anything that is not exact float32 CPU work goes through F.linear (so gradcheck and bf16 behave as usual)."""
    layer = OneDNNLinear(6, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer = OneDNNLinear(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 6))
    assert y.dtype == torch.bfloat16
    assert layer(torch.zeros(0, 6)).shape == (0, 4)


def test_use_onednn_linears_switches_plain_linears_only_and_keeps_the_state_dict():
    class Custom(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 4)), Custom(4, 2))
    before = copy.deepcopy(model)
    assert use_onednn_linears(model, "aten") == 0
    assert all(type(m) is not OneDNNLinear for m in model.modules())
    if not onednn_linear_available():
        with pytest.raises(ValueError, match="no working"):
            use_onednn_linears(model, "onednn")
        return
    assert use_onednn_linears(model, "onednn") == 2
    assert type(model[0]) is OneDNNLinear and type(model[2][0]) is OneDNNLinear and type(model[3]) is Custom
    assert model.state_dict().keys() == before.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), before(x), rtol=1e-5, atol=1e-5)
    assert OneDNNLinear(3, 2).__reduce_ex__(2)  # picklable for spawned DDP workers


def test_resolve_cpu_linear_modes(monkeypatch):
    assert resolve_cpu_linear("aten") is False
    with pytest.raises(ValueError, match="cpu_linear must be one of"):
        resolve_cpu_linear("mkl")
    monkeypatch.setattr(accel, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_cpu_linear("auto") is False               # MKL is the tuned path on Intel CPUs
    monkeypatch.setattr(accel, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_cpu_linear("auto") is onednn_linear_available()


@needs_onednn
def test_flop_formula_counts_the_onednn_gemms():
    layer = OneDNNLinear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    counter = FlopCounterMode(display=False, custom_mapping=onednn_flop_formulas())
    with counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * (2 * 3 * 8 * 4)   # forward, dx, dW


def test_adamw_kwargs_fused_equals_foreach_update():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 2))
    fast = copy.deepcopy(ref)
    kw = adamw_kwargs(list(fast.parameters()))
    assert kw in ({"fused": True}, {"foreach": True})
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    opt_fast = torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    for step in range(4):
        x = torch.randn(9, 5, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ref, opt_ref), (fast, opt_fast)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert adamw_kwargs([]) == {"foreach": True}


def test_traced_by_torch_compile_uses_the_plain_linear():
    """Inductor cannot lower the oneDNN op with trainable weights, so compiled code must trace F.linear."""
    torch.manual_seed(0)
    layer = OneDNNLinear(6, 3)
    x = torch.randn(4, 6)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_a_model_with_onednn_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2))
    use_onednn_linears(model, "auto")
    x = torch.randn(4, 6)
    eager = model(x)
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_a_second_derivative_through_onednn_linears_raises_instead_of_zeros():
    """oneDNN's linear op has no autograd of its own: create_graph=True (a gradient penalty) silently gave zero
    second derivatives; now it raises."""
    if not onednn_linear_available():
        pytest.skip("no oneDNN linear on this CPU build")
    OneDNNLinearFunction = accel.OneDNNLinearFunction
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    y = OneDNNLinearFunction.apply(x, w, None)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.pow(2).sum().backward()
