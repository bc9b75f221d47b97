"""Shared by the resume tests: a callback that saves a checkpoint mid-run and stops."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class SaveAndStop(L.Callback):
    """After ``n`` micro-batches: a checkpoint written from ``on_train_batch_end`` (as a user's or ModelCheckpoint's
    periodic save), then ``should_stop``."""

    def __init__(self, n: int, path: Path) -> None:
        self.n, self.path, self.seen = n, path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.n:
            trainer.save_checkpoint(str(self.path))
            trainer.should_stop = True
