"""Finding record files in a folder (shared by the sources)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ecgfm.data.record import ECGDataError, printable

__all__ = ["absolute_path", "check_decodable", "is_decodable", "scan_records"]


def absolute_path(path: str | os.PathLike) -> Path:
    """``path`` as the absolute path a source keeps (its ``root``, ``labels_csv``...): relative paths are taken
    against the current working directory (the one rule of :func:`ecgfm.data.cache.project_root`).

    A source's repr and public settings key its prepared cache (:func:`ecgfm.data.prepare.prepare_cache`), so the
    root must be kept absolute: ``data/cpsc2018`` run from two folders names two corpora (one relative key served
    the second the first one's records), and ``../shared/data`` and ``/work/shared/data`` name one (two keys
    prepared it twice). ``os.path.abspath`` semantics: ``..`` and ``.`` are folded, symlinks are not followed (the
    folder is named as the user reaches it). An absolute path is kept exactly as given (``Path(path)``), so the
    keys of absolute roots do not change; a relative one whose folded form would name another folder (``link/..``
    after a symlinked folder) keeps its ``..``.

    Args:
        path: a file or folder path.

    Returns:
        The absolute :class:`~pathlib.Path`.
    """
    given = os.fspath(path)
    if os.path.isabs(given):
        return Path(given)
    joined = os.path.join(os.getcwd(), given)
    folded = os.path.normpath(joined)   # == os.path.abspath(given)
    return Path(folded if os.path.realpath(folded) == os.path.realpath(joined) else joined)


def is_decodable(name: str) -> bool:
    """False for a file name that was not valid UTF-8 on disk (Python keeps its bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_decodable(root: str | os.PathLike, rel: str, suffix: str = "") -> None:
    """Raise :class:`ECGDataError` for a record whose path (relative to ``root``) is not valid UTF-8.

    Such a record is listed by :func:`scan_records` under a printable id (bytes escaped as ``\\xNN``) so that
    conversion can report it as a skipped record, and is refused here, when it is loaded: its id could not be
    matched to a labels table, nor written into the cache's UTF-8 index, and one such name must not stop the
    conversion of the others.
    """
    if not is_decodable(rel):
        raise ECGDataError(Path(root) / f"{rel}{suffix}",
                           "file name is not valid UTF-8: rename the file (undecodable bytes shown as \\xNN)")


def _folders(base: Path, recursive: bool) -> Iterator[tuple[str, list[str]]]:
    """``(folder relative to base as a POSIX path, its file names sorted)`` for ``base`` and, when ``recursive``, every
    folder below it, symlinked ones included.

    The folders reached without a link come first, then the symlinked ones (each in the order found, sorted), so
    that a folder reached both ways keeps its real path, and a dataset's record ids do not change because a link
    to one of its folders was added. A folder is listed once, where it is first reached: the real paths of the
    folders listed are kept, so a link to a folder above is not followed forever.
    """
    visited = {os.path.realpath(base)}
    pending = ["."]   # trees to walk, relative to base: base itself, then the symlinked folders found
    while pending:
        top = pending.pop(0)
        if top != ".":
            real = os.path.realpath(base / top)
            if real in visited:
                continue
            visited.add(real)
        for dirpath, dirnames, filenames in os.walk(base / top):
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            yield rel_dir, sorted(filenames)
            if not recursive:
                return
            kept = []
            for d in sorted(dirnames):
                path = os.path.join(dirpath, d)
                if os.path.islink(path):
                    pending.append(d if rel_dir == "." else f"{rel_dir}/{d}")
                    continue
                real = os.path.realpath(path)
                if real not in visited:
                    visited.add(real)
                    kept.append(d)
            dirnames[:] = kept   # pruned in place: os.walk descends into these only


def scan_records(root: str | os.PathLike, suffix: str = ".hea", recursive: bool = False,
                 ids: str = "stem") -> dict[str, str]:
    """Map record id -> path relative to ``root`` without ``suffix``, for every ``*suffix`` file.

    The suffix is matched case-insensitively (``REC.HEA``, as Windows tools write it, is a record too; the readers
    find such a header, see :func:`~ecgfm.data.readers.formats.header_path`). Hidden files (``.name``) are left out.

    Args:
        root: folder to scan.
        suffix: file ending that marks a record (``.hea``, ``.mat``).
        recursive: descend into sub-folders, symlinked ones included (a dataset assembled from links); a folder
            reached twice (by its own path and a link, two links, or a link to a folder above) is scanned once,
            preferably by its path without links.
        ids: ``"stem"`` (file name without suffix; must be unique) or ``"relative"`` (relative POSIX path
            without suffix, unique by construction).

    Returns:
        id -> relative path. A name that is not valid UTF-8 gets a printable id (its bytes escaped as ``\\xNN``)
        mapped to the real path: sources refuse it on load (:func:`check_decodable`), so the conversion reports
        it as a skipped record instead of failing as a whole.

    Raises:
        ECGDataError: ``root`` is not a folder, or two files share a stem with ``ids="stem"`` (or a relative path
            with ``ids="relative"``: ``rec.hea`` and ``rec.HEA``).
    """
    base = Path(root)
    if not base.is_dir():
        raise ECGDataError(base, "record folder not found")
    found: dict[str, str] = {}
    found_file: dict[str, str] = {}   # id -> the file's path relative to root, for the message on a duplicate
    n = len(suffix)
    for rel_dir, filenames in _folders(base, recursive):
        for fname in filenames:
            if not fname.lower().endswith(suffix.lower()) or fname.startswith("."):
                continue
            stem = fname[:-n]
            rel = stem if rel_dir == "." else f"{rel_dir}/{stem}"
            rel_file = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            key = printable(stem if ids == "stem" else rel)
            if key in found:
                raise ECGDataError(base / rel_file, f"record id {key!r} appears twice (also {found_file[key]})")
            found[key] = rel
            found_file[key] = rel_file
    return dict(sorted(found.items()))
