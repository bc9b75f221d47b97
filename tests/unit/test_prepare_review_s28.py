"""A built source's cache key names its data by absolute path (review s28, finding 1).

``prepare_cache`` keys an already-built source (``data=pretrain_pool_heldout_free`` passes built ones; its default
data root is the relative ``../shared/data``) by its repr and public settings. They held the root as given, so the
same relative root in two working directories (two corpora) shared one key and the second was served the first
one's records, and one corpus named relatively (train.py) and absolutely (benchmark_real.py) was prepared twice.
The readers now keep their paths absolute (``os.path.abspath`` semantics: symlinks are not followed), and an
absolute path is kept exactly as given, so existing keys of absolute roots do not change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ecgfm.data.cache import CorpusCache, describe_source
from ecgfm.data.prepare import cache_key, prepare_cache, source_description
from ecgfm.data.preprocess import PreprocessSpec
from ecgfm.data.readers import (
    Challenge2021Source,
    CinC2017Source,
    CPSC2018Source,
    CPSC2021Source,
    FolderSource,
    MITBIHSource,
    PTBXLSource,
    WFDBFolderSource,
)
from ecgfm.evaluate.tasks import ExcludingSource

SPEC = PreprocessSpec(fs=100)


def _key(source) -> str:
    return cache_key([source_description(source)], SPEC)


def _copy(files, dest: Path) -> list[str]:
    dest.mkdir(parents=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return sorted(f.stem for f in files)


def _ids(folder: str) -> list[str]:
    index = CorpusCache(folder).index
    return sorted(index["record_id"])


def test_one_relative_root_in_two_folders_is_two_caches_with_their_own_records(tmp_path, monkeypatch,
                                                                                 shared_data):
    """The reproducer: ``data/cpsc2018`` from two working directories holding other records, one absolute
    cache_root -> two keys, each cache holding its own folder's records (was: one key, B served A's records)."""
    mats = sorted((shared_data / "cpsc2018").glob("A*.mat"))
    cache_root = str(tmp_path / "cache")
    held, got = {}, {}
    for name, files in (("A", mats[:2]), ("B", mats[2:4])):
        held[name] = _copy(files, tmp_path / name / "data" / "cpsc2018")
        monkeypatch.chdir(tmp_path / name)
        got[name] = prepare_cache([CPSC2018Source("data/cpsc2018")], cache_root, SPEC, name="pool_other",
                                  progress=False)
    assert got["A"] != got["B"]
    assert _ids(got["A"]) == held["A"] and _ids(got["B"]) == held["B"]


def test_a_pool_wrapping_a_relative_root_is_keyed_by_its_absolute_root(tmp_path, monkeypatch, fixture_dir):
    """The held-out-free pool's route: an ExcludingSource over a relative root, from two working directories."""
    heas = sorted((fixture_dir / "cinc2021").glob("*.hea"))
    cache_root = str(tmp_path / "cache")
    held, got = {}, {}
    for name, picked in (("A", heas[:2]), ("B", heas[1:])):
        files = [f for h in picked for f in sorted(h.parent.glob(h.stem + ".*"))]
        held[name] = sorted(h.stem for h in picked)
        _copy(files, tmp_path / name / "data")
        monkeypatch.chdir(tmp_path / name)
        pool = ExcludingSource(Challenge2021Source("data"), exclude=[])
        assert repr(pool).startswith(f"ExcludingSource(Challenge2021Source(root={str(tmp_path / name / 'data')!r}")
        got[name] = prepare_cache([pool], cache_root, SPEC, name="pool", progress=False)
    assert got["A"] != got["B"]
    assert _ids(got["A"]) == held["A"] and _ids(got["B"]) == held["B"]


def _sources(data: Path, fixture: Path, labels: Path):
    """``(label, build(path_of))``: every reader that can be built directly, ``path_of`` naming its folders."""
    return [
        ("ptbxl", lambda p: PTBXLSource(p(fixture / "ptbxl"), fs=100)),
        ("cinc2017", lambda p: CinC2017Source(p(data / "cinc2017"))),
        ("challenge", lambda p: Challenge2021Source(p(fixture / "cinc2021"), ptbxl_root=p(fixture / "ptbxl"))),
        ("cpsc2021", lambda p: CPSC2021Source(p(fixture / "cpsc2021"))),
        ("cpsc2018", lambda p: CPSC2018Source(p(data / "cpsc2018"))),
        ("mitbih", lambda p: MITBIHSource(p(data / "physionet-samples"))),
        ("folder", lambda p: FolderSource(p(fixture / "cinc2021"), labels_csv=p(labels), label_columns=["label"])),
        ("wfdb", lambda p: WFDBFolderSource(p(fixture / "ptbdb"))),
        ("pool", lambda p: ExcludingSource(PTBXLSource(p(fixture / "ptbxl"), fs=100), exclude=["00001"])),
    ]


@pytest.fixture
def labels_csv(tmp_path, fixture_dir) -> Path:
    path = tmp_path / "tables" / "labels.csv"
    path.parent.mkdir()
    ids = sorted(p.stem for p in (fixture_dir / "cinc2021").glob("*.hea"))
    path.write_text("record_id,label\n" + "".join(f"{r},x\n" for r in ids), encoding="utf-8")
    return path


@pytest.mark.parametrize("which", ["ptbxl", "cinc2017", "challenge", "cpsc2021", "cpsc2018", "mitbih", "folder",
                                   "wfdb", "pool"])
def test_one_corpus_named_relatively_and_absolutely_is_one_key(which, tmp_path, monkeypatch, shared_data,
                                                               fixture_dir, labels_csv):
    """``../shared/data`` (train.py's default) and the absolute path (benchmark_real.py) name one corpus: one key,
    one cache folder (was: two, the pool prepared twice). Paths with ``..`` too, as the relative default has."""
    cwd = tmp_path / "project"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    build = dict(_sources(shared_data, fixture_dir, labels_csv))[which]
    relative = build(lambda p: os.path.relpath(p, cwd))
    absolute = build(lambda p: str(p))
    assert os.path.relpath(shared_data, cwd).startswith("..")
    assert source_description(relative) == source_description(absolute)
    assert repr(relative) == repr(absolute)
    assert _key(relative) == _key(absolute)
    assert relative.record_ids() == absolute.record_ids()


@pytest.mark.parametrize("which", ["ptbxl", "cinc2017", "challenge", "cpsc2021", "cpsc2018", "mitbih", "folder",
                                   "wfdb", "pool"])
def test_an_absolute_root_keeps_its_key(which, shared_data, fixture_dir, labels_csv):
    """An absolute path is kept exactly as given (even with a ``..`` in it): the keys of caches prepared from
    absolute roots today (benchmark_real.py, ecgfm-prepare) are unchanged, repr and settings byte for byte."""
    given: list[str] = []

    def spelled(p: Path) -> str:   # an absolute spelling that abspath would fold: must not be folded
        given.append(f"{p.parent}/../{p.parent.name}/{p.name}")
        return given[-1]

    source = dict(_sources(shared_data, fixture_dir, labels_csv))[which](spelled)
    inner = source.source if which == "pool" else source
    kept = [inner.root] + [getattr(inner, k) for k in ("ptbxl_root", "labels_csv") if getattr(inner, k, None)]
    assert [str(p) for p in kept] == given
    assert f"root={given[0]!r}" in repr(source)
    assert source_description(source) == {"repr": repr(source), **describe_source(source)}


def test_a_symlinked_folder_is_named_as_given_not_followed(tmp_path, monkeypatch, fixture_dir):
    """``os.path.abspath`` semantics: ``../shared`` is a symlink in CI, and a root reached through it keeps the link
    in its key (the key of the absolute spelling through the link), not the link's target."""
    real = tmp_path / "store" / "cpsc2021"
    shutil.copytree(fixture_dir / "cpsc2021", real)
    (tmp_path / "shared").symlink_to(tmp_path / "store", target_is_directory=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    source = CPSC2021Source("../shared/cpsc2021")
    assert source.root == tmp_path / "shared" / "cpsc2021"
    assert _key(source) == _key(CPSC2021Source(tmp_path / "shared" / "cpsc2021"))
    assert _key(source) != _key(CPSC2021Source(real))


def test_dotdot_after_a_symlinked_folder_still_names_the_folder_the_system_reads(tmp_path, monkeypatch,
                                                                                 fixture_dir):
    """``link/../x`` where ``link`` is a symlink: folding ``..`` would name another folder, so it is kept."""
    heas = sorted((fixture_dir / "cinc2021").glob("*.hea"))
    (tmp_path / "far" / "deep").mkdir(parents=True)
    for name, picked in (("far", heas[:1]), ("near", heas[1:])):   # far/x (the system's) and near x (the fold's)
        _copy([f for h in picked for f in h.parent.glob(h.stem + ".*")], tmp_path / name / "x")
    (tmp_path / "near" / "link").symlink_to(tmp_path / "far" / "deep", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "near")
    source = Challenge2021Source("link/../x")
    assert source.root.is_absolute()
    assert source.record_ids() == [heas[0].stem] == Challenge2021Source(tmp_path / "far" / "x").record_ids()


class _OwnSource:
    """A source of another package keeping a relative public ``root`` (its repr names none)."""

    name = "own"

    def __init__(self, root: str):
        self.root = root

    def __repr__(self) -> str:
        return "_OwnSource()"

    def record_ids(self) -> list[str]:
        return []

    def load(self, record_id: str):
        raise KeyError(record_id)


def test_a_relative_path_setting_of_another_source_is_made_absolute_in_its_key(tmp_path, monkeypatch):
    """Not only ecgfm's readers: a built source whose public ``root`` is relative is keyed by the absolute path,
    wrapped or not; an absolute one is kept."""
    keys = []
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        desc = source_description(ExcludingSource(_OwnSource("data"), exclude=[]))
        assert desc["source"]["root"] == str(tmp_path / name / "data")
        keys.append(_key(_OwnSource("data")))
    assert keys[0] != keys[1]
    assert source_description(_OwnSource("/x/../y"))["root"] == "/x/../y"
