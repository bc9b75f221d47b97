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

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("lightning", "timm", "torchvision", "torch._dynamo", "torchmetrics")


def _loaded_after(code: str) -> list[str]:
    probe = code + f"\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_probe_path_of_a_cnn_encoder_imports_neither_lightning_nor_timm():
    loaded = _loaded_after(
        "import ecgfm.cli.probe, ecgfm.evaluate.sweep, ecgfm.evaluate.probe, ecgfm.evaluate.batchnorm\n"
        "import ecgfm.artifacts, ecgfm.data.splits\n"
        "from ecgfm.backbones import create_backbone, list_backbones\n"
        "assert {'vit1d_test', 'stmem_vit', 'hubert_ecg'} <= set(list_backbones())   # registered, not built\n"
        "create_backbone('resnet1d_test')\n")
    assert loaded == [], f"imported by a CNN probe's code path: {loaded}"


def test_building_a_transformer_imports_timm_where_it_is_used():
    loaded = _loaded_after("from ecgfm.backbones import create_backbone\ncreate_backbone('vit1d_test')\n")
    assert "timm" in loaded


def test_moved_functions_keep_their_old_import_paths():
    """check_single_label moved to ecgfm.data.splits and the BatchNorm statistics to ecgfm.evaluate.batchnorm;
    the old names still import (user code and notes written before 2026-12-07 use them)."""
    from ecgfm.data import datamodules, splits
    from ecgfm.evaluate import batchnorm, finetune

    assert datamodules.check_single_label is splits.check_single_label
    for name in ("never_estimated", "recalibrate_batchnorm", "random_init_batchnorm_statistics"):
        assert getattr(finetune, name) is getattr(batchnorm, name)
