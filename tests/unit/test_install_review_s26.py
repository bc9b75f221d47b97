"""Review s26 of ecgfm as an installed library: declared dependency floors that the code needs, cell folders that do
not depend on how a checkpoint path is spelled, and optional loggers refused in one line when not installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ecgfm.evaluate.sweep import checkpoint_slug

ROOT = Path(__file__).resolve().parents[2]


def _floor(requirement: str) -> tuple[int, ...]:
    version = re.search(r">=\s*([0-9.]+)", requirement).group(1)
    return tuple(int(p) for p in version.split("."))


def test_lightning_floor_has_fit_weights_only():
    """train/run.py calls Trainer.fit(..., weights_only=True), which Lightning has from 2.6.0 on: with the declared
    lightning>=2.2 pip kept a 2.2-2.5 install and every training run failed after preparing its cache."""
    (lightning,) = re.findall(r'(?m)^\s*"(lightning\b[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert _floor(lightning) >= (2, 6), lightning
    assert "weights_only=True" in (ROOT / "ecgfm" / "train" / "run.py").read_text()


@pytest.mark.parametrize("spellings", [
    ["runs/mae/encoder", "./runs/mae/encoder", "runs/mae/encoder/", "runs//mae/encoder", "runs/x/../mae/encoder"],
    ["random:runs/mae/encoder", "random:./runs/mae/encoder/"],
])
def test_a_checkpoint_path_names_one_cell_folder_however_it_is_spelled(spellings):
    slugs = {checkpoint_slug(s) for s in spellings}
    assert len(slugs) == 1, slugs


@pytest.mark.parametrize("checkpoint", ["./runs/mae/encoder", "../x", ".hidden/enc", "random:../y"])
def test_a_cell_folder_is_never_hidden(checkpoint):
    slug = checkpoint_slug(checkpoint)
    assert not slug.startswith((".", "_", "-")) and "/" not in slug, slug


def test_plain_spellings_keep_their_cell_folder_names():
    """Cells written before keep being found: the names of plain spellings are unchanged (values from the old code)."""
    assert checkpoint_slug("runs/mae/encoder") == "runs_mae_encoder-4979b0"
    assert checkpoint_slug("handcrafted") == "handcrafted-2db522"
    assert checkpoint_slug("supervised:resnet1d_tiny") == "supervised_resnet1d_tiny-635522"
    assert checkpoint_slug("random:runs/mae/encoder") == "random_runs_mae_encoder-650356"
