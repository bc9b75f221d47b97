"""Any folder of WFDB records (``.hea`` + ``.dat``/``.xyz``/..., or ``.hea`` + ``.mat``), with optional labels."""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ecgfm.data.readers._scan import absolute_path, check_decodable, is_decodable, scan_records
from ecgfm.data.readers.formats import check_fs_range, multi_segment_members, normalise_sex, read_wfdb
from ecgfm.data.readers.tables import LabelTable, read_label_table
from ecgfm.data.record import ECGDataError, ECGRecord

__all__ = ["LABELS_KNOWN", "NON_LABEL_COLUMNS", "OTHER_SEX", "PATIENT_COLUMNS", "UNKNOWN_SEX", "FolderSource",
           "WFDBFolderSource"]

log = logging.getLogger(__name__)

#: ``record.meta`` key set by a source whose label table lists the record: True when the record's row has a filled
#: 0/1 flag cell (a 0 is an explicit negative), also in a table that has a column of class names beside its flag
#: columns, so a record without a class of a task is a *negative* for it (``ecgfm.evaluate.tasks.build_task`` keeps
#: it in a multi-label task as an all-zero row, also when it carries flags outside the task's classes; a single-label
#: task does not read it: a record without one of its classes stays in no split); False otherwise: no row, empty
#: flag cells, or label names only (a name outside a task's vocabulary, "Normal" for NORM, says nothing about its
#: classes): in no split.
LABELS_KNOWN = "labels_known"

#: Column names taken as the patient column when ``patient_column`` is not given, compared lower-cased without
#: the characters that are not letters or digits, so ``PatientID``, ``Patient ID``, ``patientId`` and ``subjectID``
#: are patient columns too.
PATIENT_COLUMNS: tuple[str, ...] = ("patient_id", "patient", "subject_id", "subject")

#: Columns never taken as label columns by default (compared as :data:`PATIENT_COLUMNS`, so ``Record ID`` or
#: ``ECG-ID`` too): demographics and record / patient ids. ``label_columns`` can still name them.
NON_LABEL_COLUMNS = frozenset({"age", "sex", "gender", "height", "weight", "bmi", "race", "ethnicity",
                               "record_id", "record", "ecg_id", "id", "filename", "file_name", "file", "path",
                               *PATIENT_COLUMNS})


def _column_key(name: str) -> str:
    """A CSV column name as compared with :data:`PATIENT_COLUMNS` and :data:`NON_LABEL_COLUMNS`: lower-case, every
    character but letters and digits removed (``"Patient ID"``, ``"PatientID"`` and ``"patient_id"`` are
    ``"patientid"``)."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


_PATIENT_KEYS = frozenset(map(_column_key, PATIENT_COLUMNS))
_NON_LABEL_KEYS = frozenset(map(_column_key, NON_LABEL_COLUMNS))

_SPLIT_COLUMNS = frozenset({"split", "fold", "stratfold"})   # compared as _column_key: Split, StratFold, strat_fold
#: Cells of a labels CSV's ``sex`` column read as unknown (None), as an empty cell (compared lower-cased).
UNKNOWN_SEX = frozenset({"unknown", "unk", "u", "na", "n/a", "none", "null", "?"})
#: Cells of a labels CSV's ``sex`` column that name a sex other than male / female (compared lower-cased): read as
#: ``meta["sex"] = None`` (it holds M / F / None only, as every reader writes it) with the cell kept as
#: ``meta["sex_raw"]``, reported once per source at INFO (nothing to fix).
OTHER_SEX = frozenset({"o", "other", "x", "intersex", "nonbinary", "non-binary", "non binary", "diverse"})
#: Cells of a 0/1 flag column read as 1 / 0 besides numbers equal to 1 / 0 (``1``, ``1.0``, ``1.00``; compared
#: lower-cased).
_TRUE_WORDS = frozenset({"true", "yes"})
_FALSE_WORDS = frozenset({"false", "no"})
#: Cells that say "missing value" (compared lower-cased; any spelling of NaN too): in a column of 0/1 flags they
#: are refused, naming the line and column (an empty cell is the one spelling of an unknown label).
_MISSING = frozenset({"nan", "na", "n/a", "null", "none"})


def _flag_value(value: str) -> bool | None:
    """A label cell read as a 0/1 flag: True for ``1`` (any number equal to 1: ``1.0``, ``1.00``), ``true`` or
    ``yes``; False for ``0`` (``0.0``...), ``false`` or ``no`` (any case); None for anything else (an empty cell,
    text, another number)."""
    s = value.strip().lower()
    if s in _TRUE_WORDS:
        return True
    if s in _FALSE_WORDS:
        return False
    if _is_number(s) and float(s) in (0.0, 1.0):
        return float(s) == 1.0
    return None


def _is_flag_cell(value: str) -> bool:
    """Whether a label cell fits a 0/1 flag column: empty (unknown) or a flag (:func:`_flag_value`)."""
    return not value.strip() or _flag_value(value) is not None


def _is_missing(value: str) -> bool:
    """Whether a cell spells a missing value (``NaN``, ``NA``, ``N/A``, ``null``, ``none``; any case)."""
    s = value.strip().lower()
    return s in _MISSING or (_is_number(s) and math.isnan(float(s)))


def _is_true(value: str) -> bool:
    return _flag_value(value) is True


def _patient_id(cell: str) -> str | None:
    """A patient cell as the record's patient id: None when empty or a missing-value spelling (``NaN``, ``NA``,
    ``null``: unknown, the record is its own patient, not one patient shared by every such record); a whole number
    by value, as :func:`~ecgfm.data.readers.ptbxl.ptbxl_patient` reads PTB-XL's (``"12"`` and ``"12.0"`` are
    patient ``"12"``: a table saved through a spreadsheet or pandas writes ``12.0``, and one patient must not be two
    in a patient-level split); any other cell as written (``"P012"``, ``"12E3"``, ``"1_000"``)."""
    s = str(cell).strip()
    if not s or _is_missing(s):
        return None
    m = _WHOLE_NUMBER.fullmatch(s)
    return str(int(m.group(1))) if m else s


#: A whole number as a table writes it: digits, optionally signed, optionally with a zero fraction (``12.0``).
_WHOLE_NUMBER = re.compile(r"([+-]?[0-9]+)(?:\.0*)?")


class FolderSource:
    """Every WFDB record under ``root`` (recursive), optionally labelled from a CSV.

    ``record_id`` is the record's path relative to ``root`` without extension (``"rec1"``, ``"sub/rec2"``); the
    CSV may also give the bare file name (``"rec2"``) where it is unique in the tree (one that records in several
    sub-folders share is refused as ambiguous, naming them: write the path, ``"site_a/rec2"``).

    A multi-segment WFDB record (PhysioNet long-term and ICU databases) is one record, its master header's: the
    segment headers and the layout header it lists are not records of their own (a log line gives their count), so
    that one recording is neither several records (which a split could put on both sides) nor a skipped zero-length
    layout header. A master that lists a segment missing from the folder stays a record, whose load fails naming
    the missing file (a skipped record in a conversion report).

    The labels CSV has one row per record with the id in ``id_column`` and one or more label columns:

    - a column whose values are all 0/1 (numbers equal to 0 / 1 such as ``1.0`` or ``1.00``, true/false or
      yes/no in any case, or empty) is a binary column: the record gets the column name as a label where the
      value is 1 (true, yes); an empty cell is unknown. A missing-value spelling (``NaN``, ``NA``, ``null``...)
      among 0/1 flags is refused naming the line and column: leave such a cell empty;
    - any other column holds label names, several separated by ``;`` (empty = none). A cell holding ``,``
      (``"AF,RBBB"`` quoted) is read as one class name, with one WARNING per column naming the file, the column,
      the first such line and the count: separate classes with ``;``.

    Labelled, negative and unlabelled records: a record whose row has a filled 0/1 flag cell has *known* labels
    (``meta["labels_known"]`` is True, :data:`LABELS_KNOWN`), also when the table has a column of class names beside
    its flag columns: a row of 0 in a task's flag columns is a negative for them, kept by a multi-label task as an
    all-zero row (a single-label task keeps only records with one of its classes). A record without a row, with
    empty flag cells, or labelled by names only (no flag column) is known only by its names
    (``meta["labels_known"]`` False): with none of a task's classes it is in no split.

    Default label columns: every column except the id, the patient column, split columns (``split``, ``fold``,
    ``strat_fold``) and :data:`NON_LABEL_COLUMNS` (age, sex, gender, height, weight, ... and record / patient id
    columns such as ``subject_id``, compared lower-cased without non-alphanumerics: ``Subject ID``, ``PatientID``);
    the columns chosen are logged (INFO). A default label column that holds numbers other than 0/1 (a heart rate, a
    class number) is refused, and so are several default columns of text (``diagnosis,site,device``: a site or
    device name would become a class): name the label columns with ``label_columns`` (a column named there is read
    as label names, numbers included). Any number of 0/1 flag
    columns, with at most one column of class names, are taken by default.

    ``meta`` holds the raw CSV values of the record (``{column: value}`` for every column but the id, so a
    split or fold column is available to the split helpers) plus age/sex from the header comments and, with a
    labels CSV, ``labels_known``. The exception is a ``sex`` column (any case): it is read into ``meta["sex"]`` as
    every other reader writes it, ``"M"``, ``"F"`` or None (unknown), from the spellings M / F / male / female /
    man / woman (any case) and ``sex_codes``; an empty cell or one of :data:`UNKNOWN_SEX` (``unknown``, ``U``,
    ``NA``...) is unknown (None). A cell read as None leaves the header's value where the header gives one.
    A cell the reader cannot read is not an error (nothing in ecgfm reads ``meta["sex"]``): its ``meta["sex"]``
    is None and the cell itself is kept as ``meta["sex_raw"]`` (a number as a number, like the other columns'
    cells):

    - a number not in ``sex_codes`` (its meaning depends on the data set: PTB-XL codes 0 male, 1 female; UK
      Biobank 0 female, 1 male, so the reader does not guess) or text that is neither a sex, unknown nor in
      ``sex_codes``: one WARNING per source naming the file, the first such line and value, how many cells and
      which values, and how to map them with ``sex_codes``;
    - a sex other than male / female (:data:`OTHER_SEX`: ``O``, ``other``, ``X``, ``intersex``...): no category is
      invented; one INFO per source (nothing to fix).

    A ``sex`` column named in ``label_columns`` (a sex-prediction task, e.g. 0/1 flags) is read as labels exactly
    as any other label column; its ``meta["sex"]`` / ``meta["sex_raw"]`` are read as above (at most the one
    warning).

    Args:
        root: folder to scan (relative: to the current directory; kept absolute,
            :func:`~ecgfm.data.readers._scan.absolute_path`).
        labels_csv: optional CSV path (relative paths are taken relative to ``root`` first, then the current
            directory; kept absolute).
        id_column: CSV column holding the record id.
        label_columns: CSV columns to use as labels (default: every column except ``id_column``,
            ``patient_column``, split columns named ``split``, ``fold`` or ``strat_fold`` and
            :data:`NON_LABEL_COLUMNS`; see above).
        name: value of ``record.source``.
        patient_column: CSV column giving the patient id (for patient-wise splits). Default: the column named
            ``patient_id``, ``patient``, ``subject_id`` or ``subject`` (:data:`PATIENT_COLUMNS`, compared lower-cased
            without non-alphanumerics: ``PatientID``, ``Patient ID`` and ``subjectID`` too) when the CSV has
            exactly one of them (several is an error); ``""`` for none. Whole numbers are compared by value (``12`` and
            ``12.0`` are patient ``"12"``); other ids as written.
        include_unlabelled: with a CSV, also list records that have no CSV row (loaded with ``labels=()``).
        rename_leads: optional published-name -> lead-name mapping applied before the lead mapping, e.g.
            ``{"ECG": "I"}`` for single-lead devices that do not name their lead.
        labels_encoding: text encoding of the labels CSV (default UTF-8; a byte-order mark is honoured).
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default
            :data:`~ecgfm.data.readers.formats.FS_RANGE`); a header outside is a skipped record.
        sex_codes: what the cells of the labels CSV's ``sex`` column mean, for codes that are not spelled out:
            ``{cell: "M" | "F" | None}`` (None: unknown), e.g. ``{0: "M", 1: "F"}`` for a PTB-XL-style table (in a
            config: ``sex_codes: {0: M, 1: F}``). Numbers are compared by value (``0``, ``"0"`` and ``0.0`` are
            one key), text case-insensitively; a code given here wins over the built-in spellings. None (default):
            spelled-out values only.

    Raises:
        ECGDataError: no record found, labels CSV missing or undecodable (naming the line and encoding), id /
            label / patient column missing, several candidate patient columns, a default label column holding
            numbers other than 0/1 (naming the column and a line), several default label columns of text (naming
            them), a missing-value cell (``NaN``...) in a 0/1 flag column (naming the line and column), a column
            named ``labels_known``, a duplicated id (naming both lines), a ragged row, a bare file name that
            records in several sub-folders share (naming the line and their paths), CSV ids that match no record
            (the message lists them), several ``sex`` columns. A ``sex`` cell that cannot be read is not an
            error (a warning, see above). The CSV is read by :func:`~ecgfm.data.readers.tables.read_label_table`.
        ValueError: ``sex_codes`` not a mapping, or a value of it that is not M / F (or male / female) / None.
    """

    def __init__(self, root: str | os.PathLike, labels_csv: str | os.PathLike | None = None,
                 id_column: str = "record_id", label_columns: Sequence[str] | None = None,
                 name: str = "folder", patient_column: str | None = None, include_unlabelled: bool = True,
                 rename_leads: Mapping[str, str] | None = None, labels_encoding: str = "utf-8",
                 fs_range: Sequence[float] | None = None, sex_codes: Mapping[Any, str | None] | None = None):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        if sex_codes is not None:   # public only when given: the description (cache key) of other sources stays
            self.sex_codes = _sex_codes(sex_codes)
        self.name = str(name)
        self.fs_range = check_fs_range(fs_range)
        self.rename_leads = {str(k): str(v) for k, v in rename_leads.items()} if rename_leads else None
        self.include_unlabelled = bool(include_unlabelled)
        self._files, self._segments = _without_segments(
            self.root, scan_records(self.root, ".hea", recursive=True, ids="relative"))
        if not self._files:
            raise ECGDataError(self.root, "no WFDB records (*.hea) found in the folder or its sub-folders")
        self.labels_csv: Path | None = None
        self.label_columns: list[str] = []
        self._labels: dict[str, tuple[str, ...]] = {}
        self._known: set[str] = set()   # records whose row has a filled flag cell (labels known)
        self._meta: dict[str, dict[str, Any]] = {}
        self._patients: dict[str, str | None] = {}
        if labels_csv is not None:
            self._read_labels(labels_csv, id_column, label_columns, patient_column, labels_encoding)
            norow = sorted(set(self._files) - set(self._labels))
            if norow:   # said, as CinC2017Source says it for REFERENCE.csv (they were unlabelled without a word)
                log.warning("%s: %d record(s) of the folder have no row in %s and %s (%s%s)", self.root, len(norow),
                            self.labels_csv, "load unlabelled (labels=()): a task leaves them out of every split"
                            if self.include_unlabelled else "are left out (include_unlabelled=false)",
                            ", ".join(norow[:5]), " ..." if len(norow) > 5 else "")
        ids = self._files if (labels_csv is None or self.include_unlabelled) else self._labels
        self._ids = sorted(ids)

    def _read_labels(self, labels_csv: str | os.PathLike, id_column: str, label_columns: Sequence[str] | None,
                     patient_column: str | None, encoding: str) -> None:
        path = Path(labels_csv)
        if not path.is_absolute() and (self.root / path).is_file():
            path = self.root / path
        path = absolute_path(path)   # else against the working directory, kept absolute (a public setting: key)
        if not path.is_file():
            raise ECGDataError(path, "labels CSV not found")
        self.labels_csv = path
        # An id is the relative path without extension; a file name alone is accepted when it is unique (refused,
        # naming the paths, when sub-folders share it). Ids are compared after this mapping, so "rec2" and
        # "sub/rec2" on two lines are a duplicate.
        stems: dict[str, list[str]] = {}
        for rid in self._files:
            stems.setdefault(rid.rsplit("/", 1)[-1], []).append(rid)

        def record_id(cell: str) -> str:
            if cell in self._files:
                return cell
            found = stems.get(cell, [])
            if len(found) > 1:   # reported as "matches no record" otherwise, although it matches several
                shown = ", ".join(repr(r) for r in sorted(found)[:4]) + (" ..." if len(found) > 4 else "")
                n_names = sum(len(v) > 1 for v in stems.values())
                raise ValueError(f"ambiguous: {len(found)} records under {self.root} have this file name ({shown}; "
                                 f"{n_names} file name(s) occur in several sub-folders); record ids are paths "
                                 f"relative to the folder without extension: write the path of the record meant, "
                                 f"e.g. {sorted(found)[0]!r}")
            return found[0] if found else cell

        table = read_label_table(path, id_column=id_column, encoding=encoding, normalise_id=record_id,
                                 what="labels CSV")
        columns = table.columns
        id_column = table.id_column
        rows = list(table.rows.values())
        if LABELS_KNOWN in columns:
            raise ECGDataError(path, f"column name {LABELS_KNOWN!r} is reserved (records' meta[{LABELS_KNOWN!r}] says "
                                     f"whether their labels are known); rename the column")
        if patient_column is not None:
            patient_column = str(patient_column).strip()
        if patient_column is None:
            found = [c for c in columns if _column_key(c) in _PATIENT_KEYS and c != id_column]
            if len(found) > 1:
                raise ECGDataError(path, f"several patient columns {found}: give the one identifying the patient "
                                         f"as patient_column (or patient_column='' for none)")
            patient_column = found[0] if found else None
        elif patient_column == "":
            patient_column = None
        if patient_column is not None and patient_column not in columns:
            raise ECGDataError(path, f"patient column {patient_column!r} not found; columns are {columns}")
        # public (set only with a labels CSV, so the description of a source without one is as before): every
        # setting that shapes what a record loads as is part of the source's description, hence of its caches'
        # identity (a changed patient column was answered with the old cache's patients)
        self.id_column, self.patient_column, self.labels_encoding = id_column, patient_column, str(encoding)
        default = label_columns is None
        if default:
            # a patient-like column is left out also when it is not the patient column (patient_column given, or
            # ''): its ids read as class names would make every patient a class
            label_columns = [c for c in columns
                             if c not in (id_column, patient_column) and _column_key(c) not in _SPLIT_COLUMNS
                             and _column_key(c) not in _NON_LABEL_KEYS]
            blank = [columns.index(c) + 1 for c in label_columns if not str(c).strip()]
            if blank:   # its cells would be labels named '' (a pandas to_csv() index column is one)
                raise ECGDataError(path, f"column(s) {blank} of the header {columns} have no name, so they would be "
                                         f"read as label columns: name them, drop them (a pandas DataFrame.to_csv() "
                                         f"writes its index as an unnamed first column: pass index=False), or give "
                                         f"label_columns")
            skipped = [c for c in columns if c not in label_columns and c != id_column]
            log.info("%s: label columns %s (by default every column but the id, patient, split and demographic "
                     "columns%s); give label_columns to choose others", path, label_columns,
                     f": not {skipped}" if skipped else "")
        elif isinstance(label_columns, str):
            label_columns = [label_columns]
        label_columns = [str(c).strip() for c in label_columns]
        missing = [c for c in label_columns if c not in columns]
        if missing:
            raise ECGDataError(path, f"label column(s) {missing} not found; columns are {columns}")
        if not label_columns:
            raise ECGDataError(path, f"no label column (columns are {columns}: only ids, patient, split or "
                                     f"demographic columns); give label_columns")
        self.label_columns = list(label_columns)
        ids = list(table.rows)
        unknown = [i for i in ids if i not in self._files]
        if unknown:
            parts = {i: self._segments[i] for i in unknown if i in self._segments}
            shown = list(parts.items())[:5]
            segments = (f"; {len(parts)} of them are segments of multi-segment records, read whole under the "
                        f"master's id ({', '.join(f'{k!r} of {v!r}' for k, v in shown)}"
                        f"{' ...' if len(parts) > 5 else ''}): label the master" if parts else "")
            raise ECGDataError(path, f"{len(unknown)} id(s) in the CSV match no record under {self.root}: "
                                     f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''} (record ids are "
                                     f"paths relative to the folder without extension, e.g. "
                                     f"{next(iter(self._files))!r}){segments}")
        binary = {c: all(_is_flag_cell(r[c]) for r in rows) for c in self.label_columns}
        for col in self.label_columns:
            if not binary[col]:
                _check_missing_flags(table, ids, col)
        if default:  # a numeric column that is not 0/1 is a measurement or a class number, not label names
            for col in self.label_columns:
                if binary[col] or not all(_is_number(r[col]) for r in rows if r[col]):
                    continue
                rid = next(i for i, r in zip(ids, rows) if not _is_flag_cell(r[col]) and not _is_missing(r[col]))
                raise ECGDataError(path, f"column {col!r} holds numbers other than 0/1 (e.g. {table.rows[rid][col]!r} "
                                         f"on line {table.lines[rid]}): it is not taken as a label column by default; "
                                         f"name the label columns with label_columns (a column named there is read as "
                                         f"class names)")
            text = [c for c in self.label_columns if not binary[c]]
            if len(text) > 1:   # e.g. diagnosis, site, device: every one of them would become classes
                examples = ", ".join(f"{c}={_first_cell(table, ids, c)}" for c in text[:4])
                raise ECGDataError(path, f"{len(text)} columns hold text and would all be read as class names by "
                                         f"default: {text} ({examples}), so a record's labels would mix them (a "
                                         f"site or device name read as a diagnosis); name the label column(s) "
                                         f"with label_columns, e.g. label_columns=[{text[0]!r}] in Python, "
                                         f"'task.params.label_columns=[{text[0]}]' with task=folder or "
                                         f"'folder.label_columns=[{text[0]}]' with prepare.py (by default 0/1 flag "
                                         f"columns and at most one column of class names are taken)")
        for col in self.label_columns:
            if not binary[col]:
                _warn_commas(table, ids, col)
                _warn_case_variants(table, ids, col)
        sex_columns = [c for c in columns if c.lower() == "sex" and c != id_column]
        if len(sex_columns) > 1:
            raise ECGDataError(path, f"several sex columns {sex_columns}: keep one (it is read into meta['sex'])")
        sex_column = sex_columns[0] if sex_columns else None
        codes = getattr(self, "sex_codes", None)
        unread: list[tuple[int, str]] = []   # (line, cell) of sex cells not read: unmapped numbers, other text
        others: list[tuple[int, str]] = []   # (line, cell) of sexes other than male / female
        flag_columns = [c for c in self.label_columns if binary[c]]
        for rid, row in zip(ids, rows):
            # a filled flag cell (0 an explicit negative) makes the row's labels known, also beside a column of
            # class names: else a row of 0 flags with an empty class-name cell was in no split
            if any(row[col] for col in flag_columns):
                self._known.add(rid)
            labels: list[str] = []
            for col in self.label_columns:
                value = row[col]
                if binary[col]:
                    if _is_true(value):
                        labels.append(col)
                else:
                    labels.extend(v.strip() for v in value.split(";") if v.strip())
            self._labels[rid] = tuple(dict.fromkeys(labels))  # de-duplicated, CSV order kept
            self._meta[rid] = {col: _json_value(row[col]) for col in columns if col not in (id_column, sex_column)}
            if sex_column is not None:
                sex, why = _sex_cell(row[sex_column], codes)
                self._meta[rid]["sex"] = sex
                if why is not None:
                    self._meta[rid]["sex_raw"] = _json_value(row[sex_column])
                    (unread if why == "unread" else others).append((table.lines[rid], row[sex_column].strip()))
            if patient_column is not None:
                self._patients[rid] = _patient_id(row[patient_column])
        if sex_column is not None:
            _report_sex(path, sex_column, sex_column in self.label_columns, unread, others)

    def __repr__(self) -> str:
        return f"FolderSource(root={str(self.root)!r}, name={self.name!r}, n={len(self._ids)})"

    def __len__(self) -> int:
        return len(self._ids)

    def record_ids(self) -> list[str]:
        return list(self._ids)

    def label_files(self) -> list[Path]:
        """``[labels_csv]`` when the source has one (for the cache's freshness check), else ``[]``."""
        return [self.labels_csv] if self.labels_csv is not None else []

    def load(self, record_id: str) -> ECGRecord:
        rel = self._files.get(record_id)
        if rel is None:
            raise ECGDataError(self.root, f"no record {record_id!r} in the folder")
        check_decodable(self.root, rel, ".hea")
        record = read_wfdb(self.root / rel, source=self.name, rename_leads=self.rename_leads, root=self.root,
                           fs_range=self.fs_range)
        # the CSV's cells on top of the header's values, except empty cells (unknown: the header's age / sex stay)
        meta = {**record.meta, **{k: v for k, v in self._meta.get(record_id, {}).items()
                                  if v is not None or k not in record.meta}}
        if self.labels_csv is not None:
            meta[LABELS_KNOWN] = record_id in self._known
        return record.replace(record_id=record_id, labels=self._labels.get(record_id, ()), meta=meta,
                              patient_id=self._patients.get(record_id))


def _without_segments(root: Path, files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Leave the segment and layout headers of multi-segment records out of a folder's records.

    Every header is opened once to see whether it is a master (its record line is ``name/n_segments ...``), about
    20 us per header (0.2 s for 10,000 headers in the page cache); segment names are relative to the master's
    folder.

    Args:
        root: the scanned folder.
        files: record id -> path relative to ``root`` without ``.hea`` (:func:`scan_records`).

    Returns:
        ``(records, segments)``: ``files`` without the headers a master lists, and segment id -> master id for
        those left out.
    """
    by_rel = {rel: rid for rid, rel in files.items()}
    segments: dict[str, str] = {}
    n_masters = 0
    for rid, rel in files.items():
        if not is_decodable(rel):   # refused on load (check_decodable)
            continue
        try:
            names = multi_segment_members(root / f"{rel}.hea")
        except ECGDataError:   # unreadable header: its load reports it
            continue
        if not names:
            continue
        n_masters += 1
        folder = posixpath.dirname(rel)
        for name in names:
            member = by_rel.get(posixpath.normpath(posixpath.join(folder, name)))
            if member is not None and member != rid:
                segments[member] = rid
    if segments:
        log.info("%s: %d multi-segment record(s), each read whole from its master header: their %d segment and "
                 "layout header(s) are not records of their own", root, n_masters, len(segments))
    return {rid: rel for rid, rel in files.items() if rid not in segments}, segments


def _is_number(value: str) -> bool:
    """Whether a (stripped) CSV cell is a number (``"72"``, ``"-1.5"``, ``"nan"``)."""
    try:
        float(value)
    except ValueError:
        return False
    return True


def _first_cell(table: LabelTable, ids: Sequence[str], column: str) -> str:
    """``'value' (line n)`` for the first non-empty cell of ``column`` in a label table, for messages."""
    for rid in ids:
        if table.rows[rid][column]:
            return f"{table.rows[rid][column]!r} (line {table.lines[rid]})"
    return "empty"


def _check_missing_flags(table: LabelTable, ids: Sequence[str], column: str) -> None:
    """Refuse a column of 0/1 flags that holds missing-value spellings (``NaN``, ``NA``, ``null``...).

    Read as class names, such a column would make ``1``, ``0`` and ``NaN`` classes; read as flags, the missing
    value would have to be guessed. An empty cell is the one spelling of an unknown label.

    Raises:
        ECGDataError: naming the file, the first such line, the column, the cell and the count.
    """
    cells = [(rid, table.rows[rid][column]) for rid in ids if table.rows[rid][column]]
    flags = [v for _, v in cells if _flag_value(v) is not None]
    missing = [(rid, v) for rid, v in cells if _flag_value(v) is None and _is_missing(v)]
    if not missing or len(flags) + len(missing) != len(cells):
        return   # no missing value, or a cell that is neither: a column of class names
    if not flags and not any(_is_number(v) for _, v in missing):
        return   # only words such as "none": class names
    rid, cell = missing[0]
    raise ECGDataError(table.path, f"line {table.lines[rid]}, column {column!r}: missing value {cell!r} in a column "
                                   f"of 0/1 flags ({len(missing)} such cell(s)); leave the cell empty for a record "
                                   f"whose {column!r} label is unknown, or write 0 / 1")


def _warn_commas(table: LabelTable, ids: Sequence[str], column: str) -> None:
    """One WARNING for the cells of a class-name column holding ``,`` (a quoted ``"AF,RBBB"``): classes are split at
    ``;`` only, so each such cell is one class name."""
    found = [rid for rid in ids if "," in table.rows[rid][column]]
    if found:
        first = found[0]
        log.warning("%s: %d cell(s) of label column %r hold ',' (first on line %d: %r): classes are separated by "
                    "';' only, so each such cell is read as one class name; write AF;RBBB for two classes",
                    table.path, len(found), column, table.lines[first], table.rows[first][column])


def _warn_case_variants(table: LabelTable, ids: Sequence[str], column: str) -> None:
    """One WARNING for class names of a class-name column that differ only in case or surrounding spaces (``NORM``
    and ``norm``): each spelling is a class of its own (a task would score them as two), so say which."""
    spellings: dict[str, set[str]] = {}
    for rid in ids:
        for name in (v.strip() for v in table.rows[rid][column].split(";") if v.strip()):
            spellings.setdefault(" ".join(name.lower().split()), set()).add(name)
    twins = [sorted(v) for v in spellings.values() if len(v) > 1]
    if twins:
        log.warning("%s: label column %r spells %d class(es) several ways (%s): each spelling is a class of its own; "
                    "write one spelling if they are one class", table.path, column, len(twins),
                    "; ".join(" / ".join(repr(n) for n in t) for t in twins[:5]))


def _sex_key(value: Any) -> str:
    """The key a ``sex`` cell or a ``sex_codes`` key is compared by: a number by value (``"1"``, ``1``, ``1.0`` ->
    ``"1"``), text stripped and lower-cased."""
    s = str(value).strip()
    if _is_number(s):
        f = float(s)
        return str(int(f)) if f.is_integer() else repr(f)
    return s.lower()


def _sex_codes(codes: Mapping[Any, str | None]) -> dict[str, str | None]:
    """``sex_codes`` checked: keys by :func:`_sex_key`, values ``"M"`` / ``"F"`` / None."""
    if not isinstance(codes, Mapping):
        raise ValueError(f"sex_codes must be a mapping {{cell: 'M' | 'F' | None}}, e.g. {{0: 'M', 1: 'F'}}; got "
                         f"{codes!r}")
    out: dict[str, str | None] = {}
    for key, value in codes.items():
        sex = None if value is None else normalise_sex(str(value))
        if value is not None and sex is None:
            raise ValueError(f"sex_codes[{key!r}] = {value!r}: give 'M', 'F' (or male / female) or None (unknown)")
        out[_sex_key(key)] = sex
    return out


def _sex_cell(cell: str, codes: Mapping[str, str | None] | None) -> tuple[str | None, str | None]:
    """``(sex, why)`` of a labels CSV's ``sex`` cell: ``sex`` is ``"M"`` / ``"F"`` / None (unknown), as the other
    readers write ``meta["sex"]``; ``why`` is None when the cell was read (a sex, unknown, or in ``codes``),
    ``"other"`` for a sex other than male / female (:data:`OTHER_SEX`) and ``"unread"`` for a number not in
    ``codes`` (its meaning depends on the data set) or text that is neither; ``sex`` is None for both."""
    text = str(cell).strip()
    if not text:
        return None, None
    key = _sex_key(text)
    if codes and key in codes:
        return codes[key], None
    if _is_number(text):
        return None, (None if not math.isfinite(float(text)) else "unread")
    sex = normalise_sex(text)
    if sex is not None:
        return sex, None
    if key in UNKNOWN_SEX:
        return None, None
    return None, ("other" if key in OTHER_SEX else "unread")


def _report_sex(path: Path, column: str, is_label: bool, unread: Sequence[tuple[int, str]],
                others: Sequence[tuple[int, str]]) -> None:
    """One WARNING for the ``sex`` cells not read (``unread``: ``(line, cell)``) and one INFO for the sexes other
    than male / female (``others``) of a labels CSV, each naming the first line and value, the count and values."""
    def values(cells: Sequence[tuple[int, str]]) -> str:
        distinct = list(dict.fromkeys(cell for _, cell in cells))
        return ", ".join(map(repr, distinct[:8])) + (f" and {len(distinct) - 8} more" if len(distinct) > 8 else "")

    kept = ("their meta['sex'] is None (unknown; a header's sex stays where the header gives one) and the cell is "
            "kept as meta['sex_raw']")
    label = (f" (column {column!r} is also a label column: its labels are read from its cells as any label "
             f"column's)" if is_label else "")
    if unread:
        line, cell = min(unread)
        numbers = ("; a number's meaning depends on the data set (PTB-XL: 0 male, 1 female; UK Biobank: 0 female, "
                   "1 male), so the reader does not guess" if any(_is_number(c) for _, c in unread) else "")
        example = ("FolderSource(..., sex_codes={0: 'M', 1: 'F'}) for PTB-XL ({0: 'F', 1: 'M'} for UK Biobank) or "
                   "'sex_codes: {0: M, 1: F}' in the source's config" if _is_number(cell) else
                   f"FolderSource(..., sex_codes={{{cell!r}: 'M' | 'F' | None}}) or 'sex_codes: {{{cell}: ...}}' in "
                   f"the source's config")
        log.warning("%s: %d cell(s) of column %r are neither male / female (M, F, male, female, man, woman), unknown "
                    "(empty, %s) nor in sex_codes, first on line %d: %r (values %s)%s: %s. To read them, map them with "
                    "sex_codes, e.g. %s; None for a code meaning unknown%s", path, len(unread), column,
                    ", ".join(sorted(UNKNOWN_SEX)), line, cell, values(unread), numbers, kept, example, label)
    if others:
        line, cell = min(others)
        log.info("%s: %d cell(s) of column %r name a sex other than male / female, first on line %d: %r (values %s): "
                 "meta['sex'] holds M / F / None only, so %s%s", path, len(others), column, line, cell,
                 values(others), kept, label)


def _json_value(value: Any) -> Any:
    """CSV cell -> int / float / str (JSON-able), empty -> None."""
    s = str(value if value is not None else "").strip()
    if not s:
        return None
    for cast in (int, float):
        try:
            v = cast(s)
        except ValueError:
            continue
        return v if not (isinstance(v, float) and not math.isfinite(v)) else None
    return s


class WFDBFolderSource(FolderSource):
    """A :class:`FolderSource` without labels, named ``"wfdb"`` by default (e.g. PTB Diagnostic records)."""

    def __init__(self, root: str | os.PathLike, name: str = "wfdb", rename_leads: Mapping[str, str] | None = None,
                 fs_range: Sequence[float] | None = None):
        super().__init__(root, name=name, rename_leads=rename_leads, fs_range=fs_range)
