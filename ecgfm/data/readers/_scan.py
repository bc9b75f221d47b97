"""Finding record files in a folder (shared by the sources)."""

from __future__ import annotations

import os
from pathlib import Path

from ecgfm.data.record import ECGDataError, printable

__all__ = ["check_decodable", "is_decodable", "scan_records"]


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


def scan_records(root: str | os.PathLike, suffix: str = ".hea", recursive: bool = False,
                 ids: str = "stem") -> dict[str, str]:
    """Map record id -> path relative to ``root`` without ``suffix``, for every ``*suffix`` file.

    Args:
        root: folder to scan.
        suffix: file ending that marks a record (``.hea``, ``.mat``).
        recursive: descend into sub-folders (symlinked folders are not followed).
        ids: ``"stem"`` (file name without suffix; must be unique) or ``"relative"`` (relative POSIX path
            without suffix, unique by construction).

    Returns:
        id -> relative path. A name that is not valid UTF-8 gets a printable id (its bytes escaped as ``\\xNN``)
        mapped to the real path: sources refuse it on load (:func:`check_decodable`), so the conversion reports
        it as a skipped record instead of failing as a whole.

    Raises:
        ECGDataError: ``root`` is not a folder, or two files share a stem with ``ids="stem"``.
    """
    base = Path(root)
    if not base.is_dir():
        raise ECGDataError(base, "record folder not found")
    found: dict[str, str] = {}
    n = len(suffix)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(base).as_posix()
        for fname in sorted(filenames):
            if not fname.endswith(suffix) or fname.startswith("."):
                continue
            stem = fname[:-n]
            rel = stem if rel_dir == "." else f"{rel_dir}/{stem}"
            key = printable(stem if ids == "stem" else rel)
            if key in found:
                raise ECGDataError(base / f"{rel}{suffix}",
                                   f"record id {key!r} appears twice (also {found[key]}{suffix})")
            found[key] = rel
        if not recursive:
            break
    return dict(sorted(found.items()))
