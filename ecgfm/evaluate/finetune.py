"""Full fine-tuning (and supervised training from scratch) with Lightning.

:class:`FinetuneModule` = backbone + a linear (or MLP) head, trained on random crops with

* AdamW, linear warm-up then cosine decay (per step);
* layer-wise learning-rate decay (BEiT / MAE fine-tuning): parameter group ``l`` of ``L`` gets
  ``lr * layer_decay ** (L - l)``. ViT-1D: patch / lead / SEP embeddings are layer 0, block ``i`` is layer
  ``i + 1``, the final norm and the head are the top. XResNet1d: the stem is layer 0, stage ``i`` is layer
  ``i + 1``, the head is the top ("per-stage" decay). timm's ``param_groups_layer_decay`` implements the same rule
  but needs a timm ``group_matcher`` that ecgfm's backbones do not define, hence :func:`layer_ids` (a few lines).
  Biases and normalisation weights (1-D parameters) get no weight decay, as in timm;
* validation after every epoch (one centred crop per record, or whole records with ``val_sliding=True``), early
  stopping on validation macro AUROC (Lightning ``EarlyStopping``), and the best epoch's weights restored
  (kept in memory: no pickled checkpoint is written or read);
* final validation (for the F1 thresholds) and test predictions on whole records: sliding windows, window
  probabilities averaged per record (the PTB-XL benchmark's test-time aggregation).

Multi-label: ``BCEWithLogits``, sigmoid probabilities; single-label: cross-entropy, softmax.
:func:`run_finetune` trains one model and returns record-level validation and test probabilities; thresholds and
metrics are computed by the caller (:mod:`ecgfm.evaluate.sweep`).
"""

from __future__ import annotations

import copy
import math
import re
import time
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from ecgfm.accel import adamw_kwargs
from ecgfm.evaluate.metrics import macro_auroc

VAL_METRIC = "val/macro_auroc"


def layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Layer index of every backbone parameter for layer-wise decay, and the index of the top (head) layer.

    Returns:
        ``(name -> layer id, top)``; ids run from 0 (input side) to ``top - 1``; the head gets ``top``.
    """
    names = [n for n, _ in backbone.named_parameters()]
    if hasattr(backbone, "blocks") and isinstance(getattr(backbone, "blocks"), nn.ModuleList):
        depth = len(backbone.blocks)
        ids = {}
        for n in names:
            m = re.match(r"blocks\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (depth + 1 if n.startswith("norm") else 0)
        return ids, depth + 2
    if hasattr(backbone, "stages") and isinstance(getattr(backbone, "stages"), nn.Sequential):
        n_stages = len(backbone.stages)
        ids = {}
        for n in names:
            m = re.match(r"stages\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (0 if n.startswith("stem") else n_stages + 1)
        return ids, n_stages + 2
    return {n: 0 for n in names}, 1


def param_groups(backbone: nn.Module, head: nn.Module, lr: float, weight_decay: float, layer_decay: float
                 ) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr scales (``lr_scale``) and no decay for 1-D parameters."""
    ids, top = layer_ids(backbone)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}

    def add(name: str, p: nn.Parameter, layer: int) -> None:
        if not p.requires_grad:
            return
        decay = p.ndim > 1
        g = groups.setdefault((layer, decay), {"params": [], "names": [], "weight_decay": weight_decay if decay
                                               else 0.0, "lr_scale": layer_decay ** (top - layer)})
        g["params"].append(p)
        g["names"].append(name)

    for n, p in backbone.named_parameters():
        add(f"backbone.{n}", p, ids[n])
    for n, p in head.named_parameters():
        add(f"head.{n}", p, top)
    out = []
    for (layer, _), g in sorted(groups.items()):
        g["lr"] = lr * g["lr_scale"]
        g["layer"] = layer
        out.append(g)
    return out


class FinetuneModule(L.LightningModule):
    """Backbone + classification head for fine-tuning.

    Args:
        backbone: encoder (``embed (B, 12, T) -> (B, D)``), pretrained or randomly initialised.
        num_classes: ``C``.
        multilabel: sigmoid/BCE (else softmax/CE).
        lr: peak learning rate of the head (top layer).
        weight_decay: AdamW weight decay (not on 1-D parameters).
        layer_decay: layer-wise lr decay factor (1.0: none).
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        max_epochs: schedule length (cosine decay to 0 at the end).
        head: ``"linear"`` or ``"mlp"`` (:class:`ecgfm.heads.MLPHead`).
        freeze_backbone: train the head only (a linear probe trained end-to-end on crops).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, multilabel: bool, lr: float = 1e-3,
                 weight_decay: float = 0.05, layer_decay: float = 0.75, warmup_epochs: float = 1.0,
                 max_epochs: int = 30, head: str = "linear", freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        d = int(backbone.num_features)
        if head == "linear":
            self.head: nn.Module = nn.Linear(d, num_classes)
        elif head == "mlp":
            from ecgfm.heads import MLPHead

            self.head = MLPHead(d, num_classes)
        else:
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
        self.multilabel = multilabel
        self.lr, self.weight_decay, self.layer_decay = float(lr), float(weight_decay), float(layer_decay)
        self.warmup_epochs, self.max_epochs = float(warmup_epochs), int(max_epochs)
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        self._val_probs: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self._val_y: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 12, T) -> (B, C)`` logits."""
        return self.head(self.backbone.embed(x))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits, y.float())
        return nn.functional.cross_entropy(logits, y.long())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["x"]), batch["y"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_probs, self._val_index, self._val_y = [], [], []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["x"])
        self._val_probs.append(self.probs(logits).detach().cpu())
        self._val_index.append(batch["index"].cpu())
        self._val_y.append(batch["y"].cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        p, y = aggregate_windows(torch.cat(self._val_probs).double().numpy(), torch.cat(self._val_index).numpy(),
                                 torch.cat(self._val_y).numpy())[1:]
        auc = macro_auroc(y, p)
        self.log(VAL_METRIC, float(auc) if np.isfinite(auc) else 0.0, prog_bar=True)

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.backbone, self.head, self.lr, self.weight_decay, self.layer_decay)
        groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        opt = torch.optim.AdamW(groups, lr=self.lr, **adamw_kwargs([p for g in groups for p in g["params"]]))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or self.max_epochs))
        warm = int(round(self.warmup_epochs * per_epoch))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class BestWeights(L.Callback):
    """Keep (in memory) the weights of the epoch with the best validation metric; restore them at the end."""

    def __init__(self, monitor: str = VAL_METRIC):
        self.monitor = monitor
        self.best = -math.inf
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            self.best_epoch = int(trainer.current_epoch)
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.state_dict().items()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


def aggregate_windows(probs: np.ndarray, index: np.ndarray, y: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean window probability per record.

    Args:
        probs: ``(W, C)`` window probabilities.
        index: ``(W,)`` record of each window.
        y: ``(W, ...)`` window labels (a record's windows share them).

    Returns:
        ``(records (R,) sorted, probs (R, C), labels (R, ...) or None)``.
    """
    records, inverse = np.unique(index, return_inverse=True)
    out = np.zeros((len(records), probs.shape[1]))
    np.add.at(out, inverse, probs)
    out /= np.bincount(inverse, minlength=len(records))[:, None]
    labels = None
    if y is not None:
        first = np.zeros(len(records), dtype=np.int64)
        first[inverse[::-1]] = np.arange(len(index))[::-1]
        labels = y[first]
    return records, out, labels


@torch.no_grad()
def predict_records(model: FinetuneModule, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Record-level probabilities over a sliding-window loader: ``(records (R,), probs (R, C))``."""
    model.eval()
    probs, index = [], []
    for batch in loader:
        probs.append(model.probs(model(batch["x"].to(model.device))).double().cpu().numpy())
        index.append(batch["index"].numpy())
    recs, p, _ = aggregate_windows(np.concatenate(probs), np.concatenate(index))
    return recs, p


def run_finetune(backbone: nn.Module, cache_dir: str, labels: np.ndarray, splits: dict[str, np.ndarray],
                 multilabel: bool, crop_samples: int, stride_samples: int, seed: int = 0, epochs: int = 30,
                 batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, layer_decay: float = 0.75,
                 warmup_epochs: float = 1.0, patience: int = 5, head: str = "linear", freeze_backbone: bool = False,
                 accelerator: str = "cpu", num_workers: int = 0, min_epochs: int = 1,
                 val_sliding: bool = False, predict_val: bool = True,
                 external: dict[str, tuple[str, np.ndarray, np.ndarray]] | None = None,
                 ) -> dict[str, Any]:
    """Fine-tune ``backbone`` on the ``train`` rows; early-stop on ``val``; predict val / test (and externals).

    Args:
        backbone: the encoder (modified in place: pass a fresh copy).
        cache_dir: corpus cache of the task.
        labels: ``(N, C)`` indicators for every cache row.
        splits: ``train`` (already the label-fraction subset), ``val``, ``test`` cache rows.
        multilabel: multi-label task.
        crop_samples: training crop and evaluation window in samples.
        stride_samples: evaluation sliding-window hop.
        seed: seed of initialisation of the head, crop positions and order.
        epochs, batch_size, lr, weight_decay, layer_decay, warmup_epochs, patience, head, freeze_backbone:
            training recipe (see :class:`FinetuneModule`).
        accelerator: Lightning accelerator.
        num_workers: DataLoader workers.
        min_epochs: epochs before early stopping may trigger.
        val_sliding: early-stop on whole-record (sliding-window) validation AUROC; False (default, cheaper):
            on one centred crop per validation record. The final validation (thresholds) and test predictions
            always use sliding windows over whole records.
        predict_val: return whole-record validation predictions (needed for multi-label F1 thresholds only).
        external: ``{name: (cache_dir, labels (M, C), rows)}`` evaluated without retraining.

    Returns:
        ``{"val": (rows, probs) or None, "test": (rows, probs), "external": {name: (rows, probs)}, "best_epoch",
        "best_val_macro_auroc", "epochs_run", "seconds"}``; ``rows`` are cache rows (sorted).
    """
    from ecgfm.data.datamodules import DownstreamDataModule

    t0 = time.perf_counter()
    L.seed_everything(int(seed), workers=True, verbose=False)
    target = labels if multilabel else labels.argmax(axis=1)
    dm = DownstreamDataModule(cache_dir, target, splits, crop_samples=crop_samples, batch_size=batch_size,
                              num_workers=num_workers, multilabel=multilabel,
                              test_stride=stride_samples if val_sliding else None,
                              seed=int(seed), drop_last=len(splits["train"]) > batch_size)
    windows = DownstreamDataModule(cache_dir, target, splits, crop_samples=crop_samples, batch_size=batch_size,
                                   num_workers=num_workers, multilabel=multilabel, test_stride=stride_samples)
    model = FinetuneModule(backbone, labels.shape[1], multilabel, lr=lr, weight_decay=weight_decay,
                           layer_decay=layer_decay, warmup_epochs=warmup_epochs, max_epochs=epochs, head=head,
                           freeze_backbone=freeze_backbone)
    best = BestWeights()
    early = L.pytorch.callbacks.EarlyStopping(monitor=VAL_METRIC, mode="max", patience=int(patience))
    trainer = L.Trainer(max_epochs=int(epochs), min_epochs=int(min_epochs), accelerator=accelerator, devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[best, early], num_sanity_val_steps=0,
                        deterministic=False)
    trainer.fit(model, datamodule=dm)
    out: dict[str, Any] = {"val": predict_records(model, windows.val_dataloader()) if predict_val else None,
                           "test": predict_records(model, windows.test_dataloader()), "external": {}}
    for name, (ext_dir, ext_labels, rows) in (external or {}).items():
        ext_target = ext_labels if multilabel else ext_labels.argmax(axis=1)
        edm = DownstreamDataModule(ext_dir, ext_target, {"train": rows[:0], "val": rows[:0], "test": rows},
                                   crop_samples=crop_samples, batch_size=batch_size, num_workers=num_workers,
                                   multilabel=multilabel, test_stride=stride_samples)
        out["external"][name] = predict_records(model, edm.test_dataloader())
    out.update(best_epoch=best.best_epoch, best_val_macro_auroc=best.best, epochs_run=int(trainer.current_epoch),
               seconds=time.perf_counter() - t0)
    return out


def count_trainable(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


__all__: Sequence[str] = ("FinetuneModule", "BestWeights", "layer_ids", "param_groups", "aggregate_windows",
                          "predict_records", "run_finetune", "count_trainable")
