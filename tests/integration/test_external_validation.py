"""External validation: a head trained on one dataset is scored on another folder of the same label space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ecgfm.data.synthetic import write_wfdb
from ecgfm.evaluate.sweep import finetune_main, probe_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hospital_b(tmp_path_factory) -> Path:
    """A labelled WFDB folder from another synthetic corpus (seed 2): labels.csv record_id, label, patient_id."""
    out = tmp_path_factory.mktemp("hospital_b")
    write_wfdb(out, 45, seed=2, fs=500.0, duration=10.0)
    return out


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cfg(name: str, tmp: Path, cache: Path, *overrides: str):
    base = [f"paths.cache_root={cache}", f"results_dir={tmp / 'results'}", "prepare_workers=0",
            "task=synthetic", "task.params.n_records=180", "bootstrap.n=50", "plot=false", "torch_threads=1",
            "checkpoint=random:resnet1d_test"]
    if any(o.startswith("task=") for o in overrides):  # another task: drop the synthetic task's knobs
        base = [b for b in base if not b.startswith("task")]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose(name, overrides=base + list(overrides))


def _ext(root: Path) -> list[str]:
    return ["eval_data=folder", f"eval_data.root={root}", "eval_data.params.label_columns=[label]",
            "eval_data.params.patient_column=patient_id"]


def test_probe_head_scored_on_external_folder(tmp_path, cache_root, hospital_b):
    out = probe_main(_cfg("probe", tmp_path, cache_root, "fraction=1.0", "seed=0", *_ext(hospital_b)))
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    ext = cell["results"]["external:external_folder"]
    assert ext["n"] == 45
    assert ext["macro_auroc"]["value"] > 0.75  # same label space, new records, no retraining
    assert cell["results"]["test"]["n"] == cell["splits"]["test"]
    assert "@folder" in out["cells_written"][0]  # external cells are filed apart from plain ones
    import pandas as pd

    df = pd.read_csv(tmp_path / "results" / "results.csv")
    assert set(df["split"]) == {"test", "external:external_folder"}


def test_finetune_head_scored_on_external_folder(tmp_path, cache_root, hospital_b):
    out = finetune_main(_cfg("finetune", tmp_path, cache_root, "fraction=1.0", "seed=0", "finetune.epochs=1",
                             "finetune.batch_size=32", *_ext(hospital_b)))
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["results"]["external:external_folder"]["n"] == 45


def test_external_label_space_must_match(tmp_path, cache_root, hospital_b):
    cfg = _cfg("probe", tmp_path, cache_root, *_ext(hospital_b), "+eval_data.classes=[foo,bar]")
    with pytest.raises(ValueError, match="label space"):
        probe_main(cfg)


def test_bring_your_own_folder_as_the_training_task(tmp_path, cache_root, hospital_b):
    cfg = _cfg("probe", tmp_path, cache_root, "task=folder", f"task.root={hospital_b}",
               "task.params.label_columns=[label]", "task.params.patient_column=patient_id", "task.multilabel=false",
               "fraction=1.0", "seed=0")
    out = probe_main(cfg)
    cell = json.loads(Path(out["cells_written"][0]).read_text())
    assert cell["dataset"] == "folder" and sum(cell["splits"].values()) == 45
    assert cell["multilabel"] is False and len(cell["classes"]) >= 5
    m = cell["results"]["test"]
    assert 0.0 <= m["macro_auroc"]["value"] <= 1.0 and m["n"] == cell["splits"]["test"]


def test_folder_source_names_can_be_set_and_defaults_keep_their_identity(tmp_path, cache_root, hospital_b):
    """A folder's source name (its records' identities in the leakage guard) is set on the source node, as the
    leakage error says (``+task.sources.0.name=...``, ``eval_data.sources.0.name=...``,
    ``+data.cache_dirs.0.sources.0.name=...``); the default nodes carry no new keys, so caches and cells of
    before keep their keys."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _cfg("probe", tmp_path, cache_root, "task=folder", f"task.root={hospital_b}", *_ext(hospital_b),
               "+task.sources.0.name=hospital_a", "eval_data.sources.0.name=hospital_c")
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert instantiate(plain["task"]["sources"][0]).name == "hospital_a"
    assert plain["eval_data"]["sources"][0]["name"] == "hospital_c"
    default = OmegaConf.to_container(_cfg("probe", tmp_path, cache_root, "task=folder", f"task.root={hospital_b}"),
                                     resolve=True)
    assert "name" not in default["task"]["sources"][0] and "source_name" not in default["task"]["params"]
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        tr = compose("train", overrides=["data=folder", f"data.params.root={hospital_b}",
                                         "+data.cache_dirs.0.sources.0.name=hospital_a"])
    assert OmegaConf.to_container(tr.data, resolve=True)["cache_dirs"][0]["sources"][0]["name"] == "hospital_a"

def test_a_missing_folder_names_the_key_the_user_sets(tmp_path, cache_root):
    """``eval_data.root=/nosuch`` is reported as ``eval_data.root`` (not the reader argument inside the source
    list), before anything is prepared; the same for ``data=folder``'s ``data.params.root``."""
    from ecgfm.data.prepare import check_data_paths
    from ecgfm.data.record import ECGDataError

    missing = tmp_path / "nosuch"
    with pytest.raises(ECGDataError, match=r"config key 'eval_data.root'; .*set eval_data.root=/path"):
        probe_main(_cfg("probe", tmp_path, cache_root, *_ext(missing)))
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        tr = compose("train", overrides=["data=folder", f"data.params.root={missing}"])
    with pytest.raises(ECGDataError, match=r"config key 'data.params.root'"):
        check_data_paths(tr.data)
