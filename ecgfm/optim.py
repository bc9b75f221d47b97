"""The one optimiser and learning-rate schedule of ecgfm: AdamW parameter groups and a warm-up cosine schedule.

Used by pretraining (:class:`ecgfm.methods.base.PretrainModule`) and fine-tuning
(:class:`ecgfm.evaluate.finetune.FinetuneModule`):

* :func:`param_groups`: no weight decay for biases, every parameter with ``ndim <= 1``, normalisation layers,
  ``nn.Embedding`` tables and token / embedding parameters (:data:`NO_DECAY_NAMES`, plus the names a module lists in
  a timm-style ``no_weight_decay()``); optionally **layer-wise lr decay** (BEiT / MAE fine-tuning): a parameter of
  layer ``l`` gets ``lr * layer_decay ** (top - l)``. The layer of a backbone parameter comes from the backbone
  itself (``backbone.layer_id(name)`` and ``backbone.num_layer_ids``, see
  :class:`ecgfm.backbones.registry.Backbone`); every parameter outside the backbone (heads, decoders) is the top
  layer ``num_layer_ids``, which a ViT's final norm shares (MAE's ``param_groups_lrd``: the last block is one decay
  step below the head).
* :func:`warmup_cosine`: linear warm-up from ``1/(warmup+1)`` to 1, then cosine decay to 0 at ``max_steps``,
  applied per optimiser step by ``torch.optim.lr_scheduler.LambdaLR`` (:func:`warmup_cosine_scheduler`).
* :func:`adamw`: ``torch.optim.AdamW`` over those groups, fused where PyTorch has it
  (:func:`ecgfm.accel.adamw_kwargs`).
* :func:`lightning_optimizers`: the three together, in the form ``LightningModule.configure_optimizers`` returns.

Why written here rather than taken from timm: ``timm.optim.param_groups_layer_decay`` needs a timm
``group_matcher`` on the model and does not look at module types (norm layers, embeddings); its signature has
changed between releases. The schedule is a ``LambdaLR`` over a five-line formula rather than
``SequentialLR(LinearLR, CosineAnnealingLR)`` because those chainable schedulers update the rate recursively
(float drift from the closed form) and start the warm-up at a different point; timm's ``CosineLRScheduler`` is
stepped by epoch / ``step_update`` and does not plug into Lightning's scheduler interface.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ecgfm.accel import adamw_kwargs

__all__ = ["NO_DECAY_NAMES", "NORM_TYPES", "param_groups", "layer_of", "warmup_cosine", "warmup_cosine_scheduler",
           "adamw", "lightning_optimizers"]

#: Parameter names (last component) that are embeddings / tokens and get no weight decay, as in timm / MAE.
NO_DECAY_NAMES: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token", "lead_embed", "sep_embed", "dist_token",
                                   "pos_embedding")
#: Normalisation layers whose parameters get no weight decay.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                           nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _no_decay_set(model: nn.Module) -> set[str]:
    """Full names of the parameters of norm layers and ``nn.Embedding`` and of those listed by ``no_weight_decay()``."""
    skip: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, NORM_TYPES + (nn.Embedding,)):
            skip.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        nwd = getattr(module, "no_weight_decay", None)
        if callable(nwd):
            skip.update(prefix + n for n in nwd())
    return skip


def layer_of(model: nn.Module, backbone_attr: str = "backbone") -> tuple[Callable[[str], int], int]:
    """Layer id of every parameter of ``model`` for layer-wise lr decay, from its backbone.

    A parameter ``<backbone_attr>.<name>`` gets ``backbone.layer_id(name)`` (``0`` = input side, at most the top:
    a final norm shares it); every other parameter (a head, a decoder) gets the top id ``backbone.num_layer_ids``.
    A backbone without ``layer_id`` /
    ``num_layer_ids`` is one layer: all its parameters are layer 0 and the top is 1.

    Args:
        model: a module holding the backbone as attribute ``backbone_attr``.
        backbone_attr: name of that attribute.

    Returns:
        ``(parameter name -> layer id, top id)``.
    """
    backbone = getattr(model, backbone_attr)
    bb_layer = getattr(backbone, "layer_id", None)
    top = int(getattr(backbone, "num_layer_ids", 1)) if callable(bb_layer) else 1
    prefix = f"{backbone_attr}."

    def layer(name: str) -> int:
        if not name.startswith(prefix):
            return top
        return int(bb_layer(name[len(prefix):])) if callable(bb_layer) else 0

    return layer, top


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None, layer_decay: float | None = None,
                 backbone_attr: str = "backbone", no_decay_names: Iterable[str] = NO_DECAY_NAMES
                 ) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters: weight decay or not, and layer-wise lr scales.

    No weight decay for: biases, every parameter with ``ndim <= 1``, parameters of normalisation layers and
    ``nn.Embedding``, parameters whose last name component is in ``no_decay_names``, and names a module lists in a
    timm-style ``no_weight_decay()`` method. Frozen parameters are left out; a parameter shared by two modules is
    counted once.

    Args:
        model: the module whose ``named_parameters()`` are grouped.
        weight_decay: decay of the decayed groups.
        lr: peak learning rate; with ``layer_decay`` every group gets ``"lr" = lr * lr_scale``.
        layer_decay: ``None``: no layer split (one decayed and one undecayed group, in that order). A float
            (``1.0`` included): one pair of groups per layer (:func:`layer_of`), layer ``l`` scaled by
            ``layer_decay ** (top - l)``; needs ``lr``.
        backbone_attr: attribute of ``model`` holding the backbone (for ``layer_decay``).
        no_decay_names: last name components that get no weight decay (default :data:`NO_DECAY_NAMES`).

    Returns:
        Groups ordered by layer, the decayed group of a layer first; each ``{"params", "names", "weight_decay"}``,
        plus ``"lr"``, ``"lr_scale"`` and ``"layer"`` with ``layer_decay``; empty groups are dropped. ``"names"``
        is for inspection (:func:`adamw` removes it).
    """
    if layer_decay is not None and lr is None:
        raise ValueError("param_groups: layer_decay needs lr")
    names_nd = set(no_decay_names)
    skip = _no_decay_set(model)
    layer, top = layer_of(model, backbone_attr) if layer_decay is not None else ((lambda _: 0), 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip or name.rsplit(".", 1)[-1] in names_nd
        lid = layer(name)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [],
                                                "weight_decay": 0.0 if no_decay else float(weight_decay)})
        g["params"].append(p)
        g["names"].append(name)
    out = []
    for (lid, _), g in sorted(groups.items()):
        if layer_decay is not None:
            g["lr_scale"] = float(layer_decay) ** (top - lid)
            g["lr"] = float(lr) * g["lr_scale"]
            g["layer"] = lid
        out.append(g)
    return out


def warmup_cosine(step: int, warmup_steps: int, max_steps: int) -> float:
    """LR multiplier: linear warm-up from ``1/(warmup+1)`` to 1 over ``warmup_steps``, then cosine to 0.

    Args:
        step: optimiser step (0-based).
        warmup_steps: number of warm-up steps (0 = none).
        max_steps: step at which the multiplier reaches 0 (and stays there); ``max_steps <= warmup_steps``: the
            multiplier stays 1 after the warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int
                            ) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`warmup_cosine` to every group's initial lr; step it once per optimiser step."""
    warm, total = int(warmup_steps), int(max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warm, total))


def adamw(groups: Sequence[dict[str, Any]], lr: float, betas: Sequence[float] = (0.9, 0.999),
          fused_ok: bool = True) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups` output (``"names"`` dropped), fused where available.

    Args:
        groups: parameter groups.
        lr: default lr (groups with their own ``"lr"`` keep it).
        betas: AdamW betas.
        fused_ok: False: the for-each implementation even where a fused one exists (:func:`fused_allowed`).
    """
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    params = [p for g in groups for p in g["params"]]
    kwargs = adamw_kwargs(params) if fused_ok else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kwargs)


def fused_allowed(trainer: Any) -> bool:
    """Whether a fused AdamW may run under ``trainer``: not with mixed precision and gradient clipping together
    (Lightning refuses to clip the gradients of an optimiser that unscales them itself: ``trainer=gpu`` /
    ``trainer=ddp``, bf16-mixed with ``gradient_clip_val`` 1.0, stopped at the first step). For-each AdamW computes
    the same update."""
    if trainer is None:
        return True
    mixed = "mixed" in str(getattr(trainer, "precision", ""))
    return not (mixed and getattr(trainer, "gradient_clip_val", None))


def lightning_optimizers(groups: Sequence[dict[str, Any]], lr: float, warmup_steps: int, max_steps: int,
                         betas: Sequence[float] = (0.9, 0.999), trainer: Any = None) -> dict[str, Any]:
    """AdamW (:func:`adamw`) with the per-step warm-up cosine schedule, as ``configure_optimizers`` returns it.

    Args:
        groups: :func:`param_groups` output.
        lr: peak learning rate (default of groups without their own ``"lr"``).
        warmup_steps: linear warm-up steps.
        max_steps: step at which the schedule reaches 0.
        betas: AdamW betas.
        trainer: the Lightning trainer that will step it (its precision and clipping decide :func:`fused_allowed`).

    Returns:
        ``{"optimizer": AdamW, "lr_scheduler": {"scheduler": LambdaLR, "interval": "step", "frequency": 1}}``.
    """
    opt = adamw(groups, lr, betas, fused_ok=fused_allowed(trainer))
    sched = warmup_cosine_scheduler(opt, warmup_steps, max_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
