"""Docs-review fixes (session 15): atomic writes honour the umask; a probe's classifier artifact is announced."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ecgfm.io import atomic_write, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_a_plainly_created_file(tmp_path, umask, mode):
    """mkstemp's temporary file is 0600 and was renamed as such: encoder.json, model cards, cache manifests and
    feature files were unreadable by the group / others on a shared file system despite a 0022 umask."""
    old = os.umask(umask)
    try:
        written = [atomic_write_text(tmp_path / "a.txt", "x"), atomic_write_json(tmp_path / "b.json", {"a": 1}),
                   atomic_write(tmp_path / "c.bin", lambda p: Path(p).write_bytes(b"\0"))]
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(old)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_probe_with_save_classifier_announces_its_artifact(tmp_path, capsys):
    """finetune.py printed 'classifier artifact: ...' with how to explain / use it; probe.py save_classifier=true
    wrote the artifact and said nothing. Both now print the same lines; a probe without an artifact prints none."""
    from hydra import compose, initialize_config_dir

    from ecgfm.evaluate.sweep import probe_main

    def cfg(*extra: str):
        base = [f"paths.cache_root={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}", "prepare_workers=0",
                "task=synthetic", "task.params.n_records=120", "bootstrap.n=20", "plot=false", "torch_threads=1",
                "checkpoint=random:resnet1d_test", "fraction=1.0", "seed=0", "probe.Cs=[1.0]"]
        with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
            return compose("probe", overrides=base + list(extra))

    out = probe_main(cfg("save_classifier=true"))
    printed = capsys.readouterr().out
    folder = json.loads(Path(out["cells_written"][0]).read_text())["classifier"]
    assert Path(folder).is_dir()
    assert f"classifier artifact: {folder}\n" in printed
    assert f"explain it:  python explain.py checkpoint={folder}\n" in printed   # pasteable: the hint on its own line
    assert "(installed: ecgfm-explain checkpoint=...)" in printed
    assert f"use it:      ecgfm.Classifier.load('{folder}')" in printed

    probe_main(cfg("probe.Cs=[0.5]", f"results_dir={tmp_path / 'other'}"))
    assert "classifier artifact:" not in capsys.readouterr().out
