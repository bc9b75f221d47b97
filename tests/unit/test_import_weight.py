"""Start-up weight of the commands: a frozen probe of a CNN encoder does not import Lightning or timm.

Lightning (with torchmetrics, torchvision and torch._dynamo) and timm cost about 4 s of every command's start-up on
a 2-core machine (a tiny ``probe.py`` run: 9.8 s -> 5.6 s once they were left out; 1.05 -> 0.80 GB peak memory).
They are imported where they are used: timm when a transformer backbone is built, Lightning by training and
fine-tuning. Checked in a fresh interpreter, since the test process has both loaded already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("lightning", "timm", "torchvision", "torch._dynamo", "torchmetrics")


def _loaded_after(*stages: str) -> list[list[str]]:
    """The HEAVY modules loaded after each of ``stages``, run one after the other in one fresh interpreter."""
    report = f"\nimport sys\nprint('LOADED', *(m for m in {HEAVY!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", "".join(code + report for code in stages)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("LOADED")]


CNN_PROBE_PATH = ("import ecgfm.cli.probe, ecgfm.evaluate.sweep, ecgfm.evaluate.probe, ecgfm.evaluate.batchnorm\n"
                  "import ecgfm.artifacts, ecgfm.data.splits\n"
                  "from ecgfm.backbones import create_backbone, list_backbones\n"
                  "assert {'vit1d_test', 'stmem_vit', 'hubert_ecg'} <= set(list_backbones())  # registered, not built\n"
                  "create_backbone('resnet1d_test')\n")
TRANSFORMER = "from ecgfm.backbones import create_backbone\ncreate_backbone('vit1d_test')\n"


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """One fresh interpreter for both tests (each started its own, ~5 s apiece): what a CNN probe's code path
    loads, then what building a transformer after it adds."""
    cnn_probe, transformer = _loaded_after(CNN_PROBE_PATH, TRANSFORMER)
    return {"cnn_probe": cnn_probe, "transformer": transformer}


def test_probe_path_of_a_cnn_encoder_imports_neither_lightning_nor_timm(loaded):
    assert loaded["cnn_probe"] == [], f"imported by a CNN probe's code path: {loaded['cnn_probe']}"


def test_building_a_transformer_imports_timm_where_it_is_used(loaded):
    assert "timm" not in loaded["cnn_probe"] and "timm" in loaded["transformer"]


def test_moved_functions_keep_their_old_import_paths():
    """check_single_label moved to ecgfm.data.splits and the BatchNorm statistics to ecgfm.evaluate.batchnorm;
    the old names still import (user code and notes written before 2026-12-07 use them)."""
    from ecgfm.data import datamodules, splits
    from ecgfm.evaluate import batchnorm, finetune

    assert datamodules.check_single_label is splits.check_single_label
    for name in ("never_estimated", "recalibrate_batchnorm", "random_init_batchnorm_statistics"):
        assert getattr(finetune, name) is getattr(batchnorm, name)
