"""Finding record files in a folder (shared by the sources)."""

from __future__ import annotations

import os
from pathlib import Path

from ecgfm.data.record import ECGDataError


def scan_records(root: str | os.PathLike, suffix: str = ".hea", recursive: bool = False,
                 ids: str = "stem") -> dict[str, str]:
    """Map record id -> path relative to ``root`` without ``suffix``, for every ``*suffix`` file.

    Args:
        root: folder to scan.
        suffix: file ending that marks a record (``.hea``, ``.mat``).
        recursive: descend into sub-folders (symlinked folders are not followed).
        ids: ``"stem"`` (file name without suffix; must be unique) or ``"relative"`` (relative POSIX path
            without suffix, unique by construction).

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
            key = stem if ids == "stem" else rel
            if key in found:
                raise ECGDataError(base / f"{rel}{suffix}",
                                   f"record id {key!r} appears twice (also {found[key]}{suffix})")
            found[key] = rel
        if not recursive:
            break
    return dict(sorted(found.items()))
