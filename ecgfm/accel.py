"""CPU fast paths that keep the model's mathematics: float32 linear layers on oneDNN, fused AdamW.

Why this exists (measured on the 2-core AMD EPYC these projects run on, ``scripts/bench_train.py``): PyTorch's CPU
``nn.Linear`` calls MKL's ``sgemm``, and MKL takes a generic code path on non-Intel CPUs. The same float32
products computed by oneDNN (which PyTorch already ships, and which picks its kernels from the CPU's instruction
set, not its vendor) ran at 170-200 GFLOP/s against MKL's 130-160 GFLOP/s for the ViT-S token x width shapes.
No library exposes a float32 training ``Linear`` on oneDNN for dense tensors (PyTorch only routes bf16/fp16 or
reduced-precision fp32 matmuls there), so :class:`OneDNNLinearFunction` is a small autograd function over
``torch.ops.mkldnn._linear_pointwise`` (the dense-tensor oneDNN linear that PyTorch's own inductor uses):

* forward: ``y = x W^T + b``, one oneDNN inner product;
* backward: ``dx = dy W`` as a oneDNN inner product, ``dW = dy^T x`` on oneDNN when the layer narrows
  (``out < in``) and on MKL otherwise (oneDNN copies the transposed ``dy`` first, which only pays off when it is
  the small operand), ``db = sum(dy)``.

Every product is an IEEE float32 GEMM (no TF32/bf16 down-conversion); results differ from MKL's only in summation
order (relative differences ~1e-7, tested). The fast path is taken only for float32 CPU tensors outside autocast;
anything else (CUDA, bf16 autocast, float64 for gradcheck, code being traced by ``torch.compile``, a PyTorch
without the op) goes through ``F.linear``.

:func:`use_onednn_linears` switches the ``nn.Linear`` modules of a model to :class:`OneDNNLinear` in place
(parameter names and state dicts are unchanged, so checkpoints and exported encoders are unaffected).
``mode="auto"`` does so only where it helps: oneDNN present and a CPU that is not an Intel one (where MKL is the
tuned path). :func:`adamw_kwargs` gives the fused AdamW implementation on CPU as well as on CUDA.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPU_LINEAR_MODES", "OneDNNLinear", "OneDNNLinearFunction", "adamw_kwargs", "cpu_vendor",
           "onednn_flop_formulas", "onednn_linear",
           "onednn_linear_available", "resolve_cpu_linear", "use_onednn_linears"]

CPU_LINEAR_MODES = ("auto", "onednn", "aten")


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """True when this PyTorch build has the dense oneDNN linear op and it gives the right answer."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) or ``"unknown"``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def resolve_cpu_linear(mode: str) -> bool:
    """Whether CPU linear layers should run on oneDNN for ``mode`` (see :data:`CPU_LINEAR_MODES`).

    Raises:
        ValueError: unknown mode, or ``"onednn"`` asked for on a build without the op.
    """
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"cpu_linear must be one of {CPU_LINEAR_MODES}, got {mode!r}")
    if mode == "aten":
        return False
    if mode == "onednn":
        if not onednn_linear_available():
            raise ValueError("cpu_linear='onednn' but this PyTorch build has no working "
                             "torch.ops.mkldnn._linear_pointwise; use 'auto' or 'aten'")
        return True
    return onednn_linear_available() and cpu_vendor() != "GenuineIntel"


def _inner_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a (M, K) @ b (N, K)^T (+ bias) -> (M, N)`` on oneDNN (``b`` may be a strided view; oneDNN copies it)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class OneDNNLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with forward and backward GEMMs on oneDNN (float32, CPU).

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or ``None`` -> ``y (..., out)``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])                                           # (M, in)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _inner_product(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable   # oneDNN's op has no autograd: a second derivative raises
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:   # (was silently zero)
        x2, weight = ctx.saved_tensors
        out_f, in_f = weight.shape
        g = grad_out.reshape(-1, out_f)                                            # (M, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _inner_product(g, weight.t()).reshape(*grad_out.shape[:-1], in_f)   # dy W: (..., in)
        if ctx.needs_input_grad[1]:
            # dW = dy^T x (out, in). oneDNN copies a transposed first operand (here dy^T, (out, M)), MKL takes it
            # as is: oneDNN wins only when that copy is the small one (out < in); timed per ViT-S/decoder shape.
            grad_w = _inner_product(g.t(), x2.t()) if out_f < in_f else torch.mm(g.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on oneDNN where that is exact float32 CPU work, ``F.linear`` otherwise."""
    # Under torch.compile the plain op is traced instead: inductor lowers this oneDNN op only for constant
    # (frozen, inference) weights, and does its own GEMM selection anyway.
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and onednn_linear_available()):
        return OneDNNLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose float32 CPU forward/backward run on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module, mode: str = "auto") -> int:
    """Switch every plain ``nn.Linear`` in ``module`` to :class:`OneDNNLinear` in place (when ``mode`` asks for it).

    Args:
        module: any model; only modules whose type is exactly ``nn.Linear`` change (subclasses with their own
            forward, e.g. quantised or LoRA layers, are left alone).
        mode: ``"auto"`` (oneDNN where available and the CPU is not an Intel one), ``"onednn"`` or ``"aten"``.

    Returns:
        The number of layers switched (0 when ``mode`` resolves to ATen).
    """
    if not resolve_cpu_linear(mode):
        return 0
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n


def onednn_flop_formulas() -> dict[Any, Any]:
    """``custom_mapping`` for :class:`torch.utils.flop_counter.FlopCounterMode`, which has no formula for the oneDNN
    linear op: ``2 * M * K * N`` for ``x (M, K) @ W (N, K)^T`` (the bias add is not counted, as for ``addmm``)."""
    if not onednn_linear_available():
        return {}

    def linear_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        m = 1
        for d in x_shape[:-1]:
            m *= int(d)
        return 2 * m * int(x_shape[-1]) * int(w_shape[0])

    return {torch.ops.mkldnn._linear_pointwise: linear_flops}  # keyed by overload packet, as FlopCounterMode looks up


def adamw_kwargs(params: list[torch.Tensor]) -> dict[str, bool]:
    """The fastest AdamW implementation for ``params``: ``fused`` on CUDA, and on CPU where PyTorch has it
    (>= 2.4); ``foreach`` otherwise. Fused and for-each AdamW compute the same update."""
    if params and all(p.is_cuda for p in params):
        return {"fused": True}
    if params and all(p.device.type == "cpu" for p in params) and _cpu_fused_adamw():
        return {"fused": True}
    return {"foreach": True}


@functools.lru_cache(maxsize=None)
def _cpu_fused_adamw() -> bool:
    try:
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
        return bool(torch.isfinite(p).all())
    except (RuntimeError, TypeError, ValueError):
        return False
