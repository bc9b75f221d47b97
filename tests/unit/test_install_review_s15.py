"""ecgfm as an installed library (review s15): packaging metadata (SPDX licence + LICENSE file, torch>=2.4,
every module-level import declared, py.typed shipped), scripts/check_wheel.sh builds from a clean copy and compares
the wheel's file list, code_version never reports the user's own git commit, explain accepts torch_threads like
train / probe / finetune, and user-facing hints name the installed commands and extras."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import ecgfm
import ecgfm.artifacts as artifacts
from ecgfm.config import ConfigError

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs) -> dict[str, str]:
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]): r for r in reqs}


# ------------------------------------------------------------------------------------------------ pyproject
def test_licence_is_an_spdx_expression_with_its_file():
    assert PROJECT["project"]["license"] == "MIT"
    assert PROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 the ecgfm developers" in text
    # PEP 639 (license = "<SPDX>", license-files) needs setuptools 77
    (req,) = [r for r in PROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert req == "setuptools>=77"


def test_torch_lower_bound_has_is_autocast_enabled_with_a_device():
    # ecgfm.accel calls torch.is_autocast_enabled("cpu"): the device argument exists from torch 2.4
    assert "torch.is_autocast_enabled(" in (ROOT / "ecgfm" / "accel.py").read_text(encoding="utf-8")
    assert _requirement_names(PROJECT["project"]["dependencies"])["torch"].replace(" ", "").startswith("torch>=2.4")


def test_every_module_level_third_party_import_is_a_declared_dependency():
    """A module-level import of an undeclared package breaks ``import ecgfm...`` after ``pip install ecgfm``
    (threadpoolctl was imported by ecgfm.evaluate.finetune without being declared)."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    declared = set(_requirement_names(PROJECT["project"]["dependencies"]))
    assert "threadpoolctl" in declared
    missing = []
    for f in sorted((ROOT / "ecgfm").rglob("*.py")):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:  # module level only (lazy imports are optional)
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "ecgfm":
                    continue
                if not {_norm(d) for d in dists.get(top, [])} & declared:
                    missing.append(f"{f.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_py_typed_ships():
    assert (ROOT / "ecgfm" / "py.typed").is_file()
    assert "py.typed" in PROJECT["tool"]["setuptools"]["package-data"]["ecgfm"]


# ------------------------------------------------------------------------------------------------ check_wheel.sh
def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org",
                           "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def _mini_checkout(tmp: Path, package_data: str) -> Path:
    """A tiny git checkout of an 'ecgfm' project with the real scripts/check_wheel.sh and the project's .venv."""
    root = tmp / "checkout"
    (root / "ecgfm" / "conf").mkdir(parents=True)
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check_wheel.sh", root / "scripts" / "check_wheel.sh")
    (root / ".venv").symlink_to(ROOT / ".venv")
    (root / ".gitignore").write_text(".venv\nbuild/\n*.egg-info/\n__pycache__/\n")
    (root / "LICENSE").write_text("MIT License\n")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "ecgfm"\nversion = "0.0.1"\nlicense = "MIT"\nlicense-files = ["LICENSE"]\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["ecgfm*"]\n\n'
        f'[tool.setuptools.package-data]\n{package_data}\n')
    (root / "ecgfm" / "__init__.py").write_text("")
    (root / "ecgfm" / "conf" / "__init__.py").write_text("")
    (root / "ecgfm" / "conf" / "train.yaml").write_text("a: 1\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    return root


def _check_contents(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "check_wheel.sh"), "--contents-only"], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_check_wheel_builds_from_a_clean_copy_and_compares_the_file_list(tmp_path):
    root = _mini_checkout(tmp_path, '"ecgfm.conf" = ["*.yaml"]')
    # a stale build/lib from an earlier in-place build: it used to ship in the wheel
    (root / "build" / "lib" / "ecgfm").mkdir(parents=True)
    (root / "build" / "lib" / "ecgfm" / "stray.py").write_text("STALE = True\n")
    # an uncommitted edit and a new (untracked, not ignored) module are checked too
    (root / "ecgfm" / "new_module.py").write_text("X = 1\n")
    proc = _check_contents(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS (contents only)" in proc.stdout and "the 4 files of ecgfm/" in proc.stdout
    assert not list(root.glob("*.egg-info")) and not (root / "build" / "bdist.linux-x86_64").exists()
    assert sorted(p.name for p in (root / "build" / "lib" / "ecgfm").iterdir()) == ["stray.py"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_check_wheel_fails_on_a_file_the_wheel_leaves_out(tmp_path):
    root = _mini_checkout(tmp_path, '"ecgfm.conf" = ["*.yml"]')   # train.yaml not matched: not shipped
    proc = _check_contents(root)
    assert proc.returncode != 0
    assert "a file of the checkout missing from the wheel: ecgfm/conf/train.yaml" in proc.stdout


# ------------------------------------------------------------------------------------------------ code_version
def _fake_package(parent: Path) -> Path:
    pkg = parent / "ecgfm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "artifacts.py").write_text("")
    return pkg


def _project_with_package(root: Path, pyproject: str) -> Path:
    """A committed git project at ``root`` with ``pyproject`` and an ``ecgfm`` package folder at its top level."""
    root.mkdir()
    (root / "pyproject.toml").write_text(pyproject)
    pkg = _fake_package(root)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "x")
    return pkg


@pytest.fixture
def fresh_code_version():
    artifacts.code_version.cache_clear()
    yield artifacts.code_version
    artifacts.code_version.cache_clear()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_of_a_wheel_in_the_users_repo_is_not_the_users_commit(tmp_path, monkeypatch,
                                                                           fresh_code_version):
    user = tmp_path / "my_analysis"
    user.mkdir()
    (user / "pyproject.toml").write_text('[project]\nname = "my-analysis"\n')
    _git(user, "init", "-q")
    _git(user, "add", "-A")
    _git(user, "commit", "-qm", "the user's work")
    sha = _git(user, "rev-parse", "--short=12", "HEAD")
    pkg = _fake_package(user / ".venv" / "lib" / "python3.11" / "site-packages")
    monkeypatch.setattr(artifacts, "__file__", str(pkg / "artifacts.py"))
    version = fresh_code_version()
    assert sha not in version and "git" not in version
    assert version == f"ecgfm {ecgfm.__version__}"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_of_a_package_vendored_into_another_project_is_not_that_projects_commit(
        tmp_path, monkeypatch, fresh_code_version):
    pkg = _project_with_package(tmp_path / "other", '[project]\nname = "not-ecgfm"\n')
    monkeypatch.setattr(artifacts, "__file__", str(pkg / "artifacts.py"))
    assert fresh_code_version() == f"ecgfm {ecgfm.__version__}"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_of_an_ecgfm_checkout_names_its_commit(tmp_path, monkeypatch, fresh_code_version):
    co = tmp_path / "ecgfm-src"
    pkg = _project_with_package(co, '[project]\nname = "ecgfm"\nversion = "0.1.0"\n')
    sha = _git(co, "rev-parse", "--short=12", "HEAD")
    monkeypatch.setattr(artifacts, "__file__", str(pkg / "artifacts.py"))
    assert fresh_code_version() == f"ecgfm {ecgfm.__version__} (git {sha})"
    fresh_code_version.cache_clear()
    (pkg / "artifacts.py").write_text("# edited\n")
    assert fresh_code_version() == f"ecgfm {ecgfm.__version__} (git {sha}+dirty)"


def test_project_name_reader(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text('[tool.x]\nname = "no"\n\n[project]\nversion = "1"\nname = "ecgfm"\n')
    assert artifacts._project_name(p) == "ecgfm"
    p.write_text("[project\nbroken")
    assert artifacts._project_name(p) is None
    assert artifacts._project_name(tmp_path / "missing.toml") is None


# ------------------------------------------------------------------------------------------------ explain torch_threads
def _explain_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "ecgfm" / "conf"), version_base="1.3"):
        return compose("explain", overrides=[f"out_dir={tmp}", *overrides])


def test_explain_composes_and_validates_torch_threads(tmp_path):
    from ecgfm.recipes import validate_explain_config

    assert validate_explain_config(_explain_cfg(tmp_path, "torch_threads=1")).torch_threads == 1
    assert validate_explain_config(_explain_cfg(tmp_path)).torch_threads is None
    for bad in ("torch_threads=0", "torch_threads=abc"):
        with pytest.raises(ConfigError) as info:
            validate_explain_config(_explain_cfg(tmp_path, bad))
        assert info.value.key == "torch_threads"


@pytest.mark.parametrize("overrides,expected", [(("torch_threads=3",), 3), (("threads=2",), 2),
                                                (("threads=2", "torch_threads=3"), 3)])
def test_explain_applies_torch_threads(tmp_path, monkeypatch, overrides, expected):
    import torch

    from ecgfm.explain.report import explain_main

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cfg = _explain_cfg(tmp_path, f"checkpoint={tmp_path / 'no_such_classifier'}", *overrides)
    with pytest.raises(Exception):  # stops at loading the (missing) classifier, after the threads are set
        explain_main(cfg)
    assert calls == [expected]


# ------------------------------------------------------------------------------------------------ hints
def test_train_next_commands_name_the_console_scripts(tmp_path):
    from ecgfm.train.report import final_block

    block = final_block({"encoder_dir": str(tmp_path / "enc"), "out_dir": str(tmp_path), "method": "mae",
                         "backbone": "vit", "steps": 5, "cache_dirs": ["cache/synthetic"]})
    assert f"python probe.py checkpoint={tmp_path / 'enc'} task=synthetic" in block
    assert "ecgfm-probe" in block and "ecgfm-finetune" in block


def test_model_card_and_encoder_error_name_the_console_scripts(tmp_path):
    card = artifacts.model_card({"kind": "classifier"}, "clf")
    assert "`python explain.py checkpoint=clf`" in card and "`ecgfm-explain checkpoint=clf`" in card
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "encoder.json").write_text("{}")
    with pytest.raises(artifacts.ArtifactError, match="this is an encoder.*finetune.py checkpoint=.*ecgfm-finetune"):
        artifacts.load_classifier(tmp_path / "enc")


def test_install_hints_do_not_assume_a_checkout():
    from ecgfm.data.readers.deepfake import INSTALL_HINT

    assert "pip install 'ecgfm[deepfake]'" in INSTALL_HINT
    offenders = []
    for f in [*(ROOT / "ecgfm").rglob("*.py"), *(ROOT / "ecgfm").rglob("*.yaml"), ROOT / "docs" / "TRAINING.md"]:
        lines = f.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            # `pip install -e .` only works in a checkout: name the installed form too (same or previous line)
            if "pip install -e" in line and "checkout" not in line + (lines[i - 1] if i else ""):
                offenders.append(f"{f.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not offenders, offenders
