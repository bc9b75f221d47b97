"""The one place for file plumbing: atomic writes, JSON of NumPy / paths / configs, hashing, and file locks.

Every module that keeps something on disk writes through these functions, so "written" always means: a temporary
file in the same folder, flushed and fsync'ed, renamed over the final name, and the folder fsync'ed. A crash or a
full disk leaves either the old file or the new one under the final name, never a torn one. The standard library
has no atomic write, so these few lines are written by hand (as in most projects of this kind).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["jsonable", "dumps", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "read_json", "sha256_file", "sha256_bytes", "safetensors_sha256", "cached_safetensors_sha256", "file_key",
           "sort_safetensors_metadata", "fsync_dir", "file_lock", "LockBusy", "to_container"]


def to_container(value: Any) -> Any:
    """An OmegaConf node as plain Python data (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def jsonable(value: Any) -> Any:
    """Plain JSON data from NumPy scalars / arrays, tuples, sets (as sorted lists), paths, OmegaConf nodes and
    dataclass-like objects; non-finite floats become ``None`` (JSON has no NaN); anything else becomes its ``str``."""
    # the plain types first: this runs on every record's metadata while a cache is built (hot path)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):   # sorted: a set of strings iterates in a per-process (hash seed) order
        items = [jsonable(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    converted = to_container(value)
    if converted is not value:
        return jsonable(converted)
    return str(value)


def dumps(obj: Any, indent: int | None = None, convert: bool = True) -> str:
    """Deterministic JSON text (sorted keys) of :func:`jsonable` ``(obj)``; compact unless ``indent``.

    ``convert=False`` skips the :func:`jsonable` walk for data that is already plain JSON (hot paths, e.g. the
    corpus cache's per-record indexes); anything else then raises ``TypeError`` / ``ValueError`` (NaN)."""
    seps = (",", ":") if indent is None else (",", ": ")
    return json.dumps(jsonable(obj) if convert else obj, sort_keys=True, indent=indent, separators=seps,
                      ensure_ascii=False, allow_nan=False)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a power cut (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _new_temporary(final: Path) -> str:
    """An empty new file beside ``final`` (hidden, ``.tmp``), created with mode ``0o666`` so that the kernel applies
    the process umask as it does to a plain ``open()``: ``mkstemp``'s ``0o600`` would survive the rename and leave
    caches and artifacts unreadable by the group on a shared file system."""
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"no free temporary name beside {final}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temporary file beside it (created with the mode a
    plain ``open()`` gives, the umask applied), which is fsync'ed and renamed over ``path``. On any error the
    temporary file is removed and ``path`` is untouched.

    Args:
        path: final file name (its folder is created).
        write: callable receiving the temporary path (e.g. ``lambda p: save_file(state, p)``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(final)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(final.parent)
    return final


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` atomically; returns its sha256 hex digest."""
    atomic_write(path, lambda p: Path(p).write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write :func:`dumps` ``(obj)`` atomically (``indent`` 1 by default: readable and compact)."""
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; ``ValueError`` naming the file when it is not valid UTF-8 JSON."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid JSON ({what}): {exc}") from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# safetensors (0.8) writes the free-text ``__metadata__`` of a file from a Rust HashMap, whose order changes from
# process to process: the same tensors saved twice gave different bytes, and so a different checkpoint identity (a
# cell computed from those very weights then looked stale). No safetensors option fixes the order, so the header is
# put in one canonical form here: the metadata keys sorted, the JSON as compact as safetensors writes it, the same
# length (the header is space-padded). Nothing else in the file moves.
def _canonical_safetensors_header(head: bytes) -> bytes | None:
    """``head`` (a safetensors JSON header with its padding) with the ``__metadata__`` keys sorted, or None where
    it has no metadata or is not in safetensors' own compact form (then its bytes are taken as they are)."""
    try:
        body = head.decode("utf-8").rstrip(" ")
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or json.dumps(doc, separators=(",", ":"), ensure_ascii=False) != body:
        return None
    doc["__metadata__"] = dict(sorted(meta.items()))
    out = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return out + b" " * (len(head) - len(out))


def _safetensors_header(f: Any) -> bytes | None:
    raw = f.read(8)
    if len(raw) < 8:
        return None
    n = struct.unpack("<Q", raw)[0]
    head = f.read(n) if n < (1 << 27) else b""
    return head if len(head) == n else None


def safetensors_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a ``.safetensors`` file in its canonical form (metadata keys sorted; see above): the same tensors
    and metadata give the same digest whichever order the writer put the metadata in. Equal to
    :func:`sha256_file` for a file already in that form (every file ecgfm writes); any file that is not
    safetensors' compact form is hashed as it is."""
    with open(path, "rb") as f:
        return _safetensors_sha256_of(f, chunk)


def _safetensors_sha256_of(f: Any, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    head = _safetensors_header(f)
    fixed = None if head is None else _canonical_safetensors_header(head)
    if fixed is None:
        f.seek(0)
    else:
        h.update(struct.pack("<Q", len(fixed)) + fixed)
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


_SHA_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def file_key(path: str | os.PathLike) -> tuple[str, int, int, int, int]:
    """``(resolved path, size, mtime_ns, ctime_ns, inode)``: what a rewrite of the file changes (ctime and inode
    too: on a kernel with coarse timestamps a rewrite within one tick of the same size keeps the mtime)."""
    p = Path(path)
    return _key(p, p.stat())


def _key(p: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    return str(p.resolve()), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)


def cached_safetensors_sha256(path: str | os.PathLike) -> str:
    """:func:`safetensors_sha256`, remembered per :func:`file_key` in this process (loads of one artifact, cells of
    one encoder: hashed once). The key is the stat of the file that was opened and hashed (a stat of the path
    before the open could pair one file's key with a file renamed over it in between)."""
    with open(path, "rb") as f:
        key = _key(Path(path), os.fstat(f.fileno()))
        if key not in _SHA_CACHE:
            _SHA_CACHE[key] = _safetensors_sha256_of(f)
    return _SHA_CACHE[key]


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite a just-written ``.safetensors`` file's header in place into its canonical form (same length), so
    that saving the same tensors twice gives the same bytes."""
    with open(path, "r+b") as f:
        head = _safetensors_header(f)
        fixed = None if head is None else _canonical_safetensors_header(head)
        if fixed is not None and fixed != head:
            f.seek(8)
            f.write(fixed)


class LockBusy(RuntimeError):
    """A non-blocking :func:`file_lock` found the lock held by another process."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True, what: str = "") -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) on ``path`` for the duration of the ``with`` block.

    Args:
        path: lock file (created with its folder).
        blocking: wait for the lock (concurrent DDP ranks / sweep jobs preparing one cache: the others wait), or
            raise :class:`LockBusy` at once (two conversions of the same cache: the second is refused).
        what: text for the :class:`LockBusy` message (default: the lock's folder).

    The lock is released when the block ends or the process dies (the kernel drops flocks of closed files).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no locking
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise LockBusy(what or f"{p.parent}: locked by another process ({p})") from None
        yield
    finally:
        os.close(fd)  # closing releases the flock
