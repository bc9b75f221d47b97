"""The one reader of label / metadata tables (CSV) used by every source.

CinC 2017 ``REFERENCE.csv``, PTB-XL ``ptbxl_database.csv`` and ``scp_statements.csv`` and the labels CSV of a
folder of records are all read by :func:`read_label_table`, so they share its rules:

- the bytes are decoded strictly (UTF-8 by default, a UTF-8 or UTF-16 byte-order mark is honoured and removed);
  an undecodable byte is an error naming the file, the line and the encoding tried, never a bare
  ``UnicodeDecodeError`` and never a silent replacement character;
- header names and cells are stripped of surrounding white space (``record_id, label`` names the columns
  ``record_id`` and ``label``);
- a duplicated id is an error naming the file, the id and both line numbers (a later row never silently
  replaces an earlier one); ids are compared after the source's normalisation (``1`` and ``1.0`` are the same
  PTB-XL ``ecg_id``);
- a row with more non-empty cells than the header has columns, or with fewer cells, is an error naming the line
  (cells would otherwise shift into the wrong columns); trailing empty cells are tolerated;
- a row with an empty id is an error; blank lines are skipped.

Parsing is done by the standard :mod:`csv` module (quoted cells, embedded newlines and commas); line numbers are
physical lines of the file (1-based), as an editor shows them.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ecgfm.data.record import ECGDataError

__all__ = ["LabelTable", "decode_table_bytes", "read_label_table", "table_frame"]

_TRUE_FALSE = {"true": True, "false": False}


@dataclass
class LabelTable:
    """A table read by :func:`read_label_table`.

    Attributes:
        path: the file.
        columns: header names (stripped), in file order.
        id_column: name of the id column.
        rows: id (normalised) -> ``{column: cell}`` (stripped strings; a missing trailing cell is ``""``), in file
            order.
        lines: id (normalised) -> line number of its row (1-based, the row's first line).
    """

    path: Path
    columns: list[str]
    id_column: str
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


def decode_table_bytes(raw: bytes, path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """Decode a table's bytes strictly, honouring (and removing) a byte-order mark.

    Args:
        raw: file content.
        path: the file, for error messages.
        encoding: encoding of files without a UTF-16 byte-order mark (a UTF-8 mark is removed in any case).

    Raises:
        ECGDataError: undecodable bytes (the message names the line, the bytes and the encoding tried).
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # the codec reads and removes the mark
    elif raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ECGDataError(path, f"line {line}: bytes {raw[exc.start:exc.end]!r} are not valid {encoding} "
                                 f"(encoding tried: {encoding}); save the file as UTF-8 or give its encoding "
                                 f"(folder sources: folder.labels_encoding=latin-1 on the command line, "
                                 f"labels_encoding='latin-1' in Python)") from None
    except LookupError:
        raise ECGDataError(path, f"unknown text encoding {encoding!r}") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_label_table(path: str | os.PathLike, *, id_column: str | int = 0, header: bool = True,
                     columns: Sequence[str] | None = None, encoding: str = "utf-8",
                     normalise_id: Callable[[str], str] | None = None, what: str = "table") -> LabelTable:
    """Read a CSV label / metadata table with one row per id (see the module docstring for the rules).

    Args:
        path: the CSV file.
        id_column: name (as written in the header, stripped) or position of the id column.
        header: whether the first non-blank line is a header; without one, ``columns`` names the columns.
        columns: column names when ``header`` is False.
        encoding: text encoding (a UTF-8 / UTF-16 byte-order mark is honoured whatever this says).
        normalise_id: maps an id cell (stripped) to the id used as key and for duplicate detection; may raise
            ``ValueError`` for an id that is not valid (reported with its line).
        what: what the table is, for the "not found" message (``"labels CSV"``, ``"REFERENCE.csv"`` ...).

    Returns:
        The :class:`LabelTable`.

    Raises:
        ECGDataError: missing or undecodable file, empty table, repeated header name, missing id column,
            ragged row, empty / invalid / duplicated id. Every message names the file; row problems name the
            line(s).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ECGDataError(p, f"{what} not found") from None
    except OSError as exc:
        raise ECGDataError(p, f"cannot read {what}: {exc}") from None
    text = decode_table_bytes(raw, p, encoding)
    check_quotes_closed(p, text)
    # skipinitialspace: a quoted cell after ", " is quoted (kept its quotes before: '"AF"' was a class of its own)
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    prev_line = 0
    names: list[str] | None = None if header else [str(c).strip() for c in (columns or [])]
    if not header and not names:
        raise ValueError("read_label_table: header=False needs the column names")
    table: LabelTable | None = None
    id_idx = -1
    try:
        for cells in reader:
            start, prev_line = prev_line + 1, reader.line_num
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue  # blank line
            if names is None:  # the header line
                names = cells
                while names and not names[-1] and len(names) > 1:
                    names.pop()  # trailing empty header cells (a trailing comma)
                continue
            if table is None:
                table, id_idx = _new_table(p, names, id_column)
            _add_row(table, cells, start, id_idx, normalise_id)
    except csv.Error as exc:
        raise ECGDataError(p, f"line {reader.line_num}: malformed CSV: {exc}") from None
    if names is None:
        raise ECGDataError(p, "empty table (no header line)")
    if table is None:
        table, _ = _new_table(p, names, id_column)
    return table


def check_quotes_closed(p: Path, text: str) -> None:
    """Refuse a table with a double quote never closed: the csv module's lenient mode reads every later row into
    that one cell (their records then load unlabelled). Its strict mode says so ("unexpected end of data") but also
    refuses cells the lenient mode reads well (a space after a closing quote: ``"A01" ,AF``), so it is only asked
    about the quotes: another strict complaint is left to the lenient read (which cannot see an unclosed quote after
    such a cell: rare, and no worse than before 2026-12-07).

    Raises:
        ECGDataError: a quote opened and never closed, naming its line.
    """
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    last = 0
    try:
        for _ in reader:
            last = reader.line_num
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise ECGDataError(p, f"line {last + 1}: malformed CSV: a double quote opened on line {last + 1} is "
                                  f"never closed (every later row would be read into that cell)") from None


def _new_table(p: Path, names: list[str], id_column: str | int) -> tuple[LabelTable, int]:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ECGDataError(p, f"column {name!r} appears twice in the header {names}")
        seen.add(name)
    if isinstance(id_column, int):
        if not -len(names) <= id_column < len(names):
            raise ECGDataError(p, f"id column #{id_column} not found; columns are {names}")
        idx = id_column % len(names)
    else:
        key = str(id_column).strip()
        if key not in names:
            raise ECGDataError(p, f"id column {key!r} not found; columns are {names}")
        idx = names.index(key)
    return LabelTable(path=p, columns=list(names), id_column=names[idx]), idx


def _add_row(table: LabelTable, cells: list[str], line: int, id_idx: int,
             normalise_id: Callable[[str], str] | None) -> None:
    n = len(table.columns)
    if len(cells) > n and any(cells[n:]):
        raise ECGDataError(table.path, f"line {line}: {len(cells)} cells, but the header has {n} columns "
                                       f"{table.columns}")
    if len(cells) < n:
        raise ECGDataError(table.path, f"line {line}: {len(cells)} cell{'s' if len(cells) != 1 else ''}, but the "
                                       f"header has {n} columns {table.columns}")
    row = dict(zip(table.columns, cells))
    cell = cells[id_idx]
    if not cell:
        raise ECGDataError(table.path, f"line {line}: empty id in column {table.id_column!r}")
    if normalise_id is not None:
        try:
            key = normalise_id(cell)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ECGDataError(table.path, f"line {line}: id {cell!r} in column {table.id_column!r} is not "
                                           f"valid: {exc}") from None
    else:
        key = cell
    first = table.lines.get(key)
    if first is not None:
        raise ECGDataError(table.path, f"duplicate id {key!r} in column {table.id_column!r}: lines {first} and "
                                       f"{line} (each id must appear once)")
    table.rows[key] = row
    table.lines[key] = line


def table_frame(table: LabelTable, index: Callable[[str], object] | None = None) -> pd.DataFrame:
    """The table as a pandas DataFrame indexed by id, with column types inferred like ``pandas.read_csv``.

    Empty cells become NaN; a column whose non-empty cells are all numbers becomes numeric (float when it has
    empty cells), one of only ``True`` / ``False`` without empty cells becomes bool; the rest stay strings.

    Args:
        table: from :func:`read_label_table`.
        index: maps each (normalised) id to its index value (default: the id string).
    """
    keys = list(table.rows)
    data = {}
    for col in table.columns:
        if col == table.id_column:
            continue
        values = [table.rows[k][col] for k in keys]
        data[col] = _infer_column(values)
    frame = pd.DataFrame(data, index=pd.RangeIndex(len(keys)))
    frame.index = pd.Index([index(k) if index else k for k in keys], name=table.id_column)
    return frame


def _infer_column(values: list[str]) -> pd.Series:
    series = pd.Series([v if v else np.nan for v in values], dtype=object)
    try:
        return pd.to_numeric(series)
    except (ValueError, TypeError):
        pass
    lowered = {v.lower() for v in values}
    if values and lowered <= set(_TRUE_FALSE):
        return pd.Series([_TRUE_FALSE[v.lower()] for v in values], dtype=bool)
    return series
