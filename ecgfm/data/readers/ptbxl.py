"""PTB-XL in its original layout, and the label tasks of the PTB-XL benchmark.

Layout (Wagner et al., Sci Data 2020): ``ptbxl_database.csv`` (one row per ``ecg_id``: ``patient_id``,
``scp_codes`` as a Python dict literal ``{code: likelihood}``, ``strat_fold`` 1-10, ``age``, ``sex`` 0=male
1=female, ...), ``scp_statements.csv`` (the 71 SCP statements with their ``diagnostic`` / ``form`` / ``rhythm``
flags and ``diagnostic_class`` / ``diagnostic_subclass``), ``records100/NNNNN/{id:05d}_lr`` and
``records500/NNNNN/{id:05d}_hr`` WFDB records.

The label tasks follow ``compute_label_aggregations`` in the benchmark code of Strodthoff et al., "Deep
learning for ECG analysis: benchmarks and insights from PTB-XL" (IEEE JBHI 2021), ``code/utils/utils.py``:

- ``all``: every key of ``scp_codes`` (71 possible statements);
- ``diagnostic``: keys whose statement has ``diagnostic == 1`` (44);
- ``subdiagnostic``: their ``diagnostic_subclass`` (23);
- ``superdiagnostic``: their ``diagnostic_class`` (5: NORM, MI, STTC, CD, HYP);
- ``form`` / ``rhythm``: keys whose statement has ``form == 1`` / ``rhythm == 1`` (19 / 12).

The benchmark keeps a statement whatever its likelihood (it uses the dict's keys; a likelihood of 0 means
"unknown", not "absent"); ``min_likelihood`` (default 0.0, i.e. the benchmark's behaviour) can drop
diagnostic statements below a likelihood instead. PTB-XL gives likelihoods for diagnostic statements only: form
and rhythm statements carry 0 ("not given", e.g. every ``SR``), so a threshold never drops a statement that is
not diagnostic (before, ``min_likelihood=50`` silently emptied the rhythm task: SR on 0 of 407 records).
"""

from __future__ import annotations

import ast
import logging
import math
import os
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import pandas as pd

from ecgfm.data.readers._scan import absolute_path, check_decodable
from ecgfm.data.readers.formats import check_fs_range, normalise_sex, read_wfdb
from ecgfm.data.readers.tables import read_label_table, table_frame
from ecgfm.data.record import ECGDataError, ECGRecord

__all__ = [
    "PTBXL_TASKS",
    "PTBXLSource",
    "load_ptbxl_table",
    "load_scp_statements",
    "ptbxl_label_space",
    "ptbxl_record_id",
    "ptbxl_task_labels",
    "ptbxl_task_map",
]

log = logging.getLogger(__name__)

PTBXL_TASKS: tuple[str, ...] = ("all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm")
_RATES = {100: ("records100", "_lr"), 500: ("records500", "_hr")}


def _parse_scp_codes(text: Any, where: Path, ecg_id: Any) -> dict[str, float]:
    # ast.literal_eval parses the dict literal without executing code (the benchmark uses it too).
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ECGDataError(where, f"ecg_id {ecg_id}: scp_codes {text!r} is not a dict literal") from None
    if not isinstance(value, dict):
        raise ECGDataError(where, f"ecg_id {ecg_id}: scp_codes {text!r} is not a dict")
    codes: dict[str, float] = {}
    for k, v in value.items():
        # a likelihood is a number (0-100); a string, None or NaN would be compared wrongly with min_likelihood
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ECGDataError(where, f"ecg_id {ecg_id}: scp_codes likelihood of {k!r} is {v!r}, not a finite "
                                      f"number (scp_codes {text!r})")
        codes[str(k)] = float(v)
    return codes


def ptbxl_record_id(ecg_id: Any) -> str:
    """The zero-padded record id of a PTB-XL ``ecg_id`` (``1``, ``"1"``, ``"1.0"`` -> ``"00001"``).

    Raises:
        ValueError: not a positive whole number.
    """
    text = str(ecg_id).strip()
    try:
        value = int(text)
    except ValueError:
        f = float(text)  # raises ValueError for text
        if not math.isfinite(f) or not f.is_integer():
            raise ValueError("not a whole number") from None
        value = int(f)
    if value < 1:
        raise ValueError("not a positive number")
    return f"{value:05d}"


def ptbxl_patient(value: Any) -> str | None:
    """A ``patient_id`` cell of ``ptbxl_database.csv`` (pandas reads ``15709.0``) as ``"15709"``; None if empty."""
    number = _finite_or_none(value)
    return None if number is None else str(int(number))


def load_ptbxl_table(root: str | os.PathLike) -> pd.DataFrame:
    """``ptbxl_database.csv`` indexed by ``ecg_id`` (int), with ``scp_codes`` parsed into ``{code: likelihood}``.

    Read with :func:`~ecgfm.data.readers.tables.read_label_table` (BOM-tolerant, names and cells stripped,
    strict decoding); column types are inferred as ``pandas.read_csv`` does.

    Raises:
        ECGDataError: missing or undecodable file, missing columns, a duplicated or non-integer ``ecg_id``
            (naming the lines), unparsable ``scp_codes`` or a likelihood in it that is not a finite number, a
            ``strat_fold`` that is not a whole number 1-10, a negative or non-numeric ``age``, a ``sex`` other than
            0 / 1 / M / F (empty cells are unknown).
    """
    path = Path(root) / "ptbxl_database.csv"
    table = read_label_table(path, id_column="ecg_id", normalise_id=ptbxl_record_id, what="PTB-XL metadata file")
    missing = {"patient_id", "scp_codes", "strat_fold", "age", "sex"} - set(table.columns)
    if missing:
        raise ECGDataError(path, f"missing columns {sorted(missing)}")
    df = table_frame(table, index=int)
    df["scp_codes"] = [_parse_scp_codes(t, path, i) for i, t in zip(df.index, df["scp_codes"])]
    for ecg_id, fold, age, sex in zip(df.index, df["strat_fold"], df["age"], df["sex"]):
        _check_cells(path, ecg_id, fold, age, sex)
    return df


def _sex_of(value: Any) -> str | None:
    """``"M"`` / ``"F"`` / None of a ``sex`` cell (0 / 1 as PTB-XL writes it, or a spelled-out sex)."""
    number = _finite_or_none(value)
    return normalise_sex(value if number is None else number)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _check_cells(where: Path, ecg_id: Any, fold: Any, age: Any, sex: Any) -> None:
    """Refuse the cells the reader would otherwise change without a word: a ``strat_fold`` that is not a whole number
    1-10 (3.7 read as fold 3, "x" as no fold: the splits would move the record), a negative or non-numeric ``age``
    (PTB-XL writes 300 for ages above 89), a ``sex`` other than 0 / 1 (or M / F). Empty cells stay unknown."""
    if not _blank(fold):
        f = _finite_or_none(fold)
        if f is None or not f.is_integer() or not 1 <= f <= 10:
            raise ECGDataError(where, f"ecg_id {ecg_id}: strat_fold {fold} is not a whole number 1-10")
    if not _blank(age):
        a = _finite_or_none(age)
        if a is None or a < 0:
            raise ECGDataError(where, f"ecg_id {ecg_id}: age {age} is not a non-negative number")
    if not _blank(sex) and _sex_of(sex) is None:
        raise ECGDataError(where, f"ecg_id {ecg_id}: sex {sex} is not 0 (male) / 1 (female)")


def load_scp_statements(root: str | os.PathLike) -> pd.DataFrame:
    """``scp_statements.csv`` indexed by SCP code (71 rows); a duplicated code is an error naming both lines."""
    path = Path(root) / "scp_statements.csv"
    table = read_label_table(path, id_column=0, what="PTB-XL scp_statements.csv")
    missing = {"diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"} - set(table.columns)
    if missing:
        raise ECGDataError(path, f"missing columns {sorted(missing)}")
    df = table_frame(table)
    df.index.name = None
    return df


def _check_task(task: str) -> None:
    if task not in PTBXL_TASKS:
        raise ValueError(f"unknown PTB-XL task {task!r}; choose one of {PTBXL_TASKS}")


def ptbxl_task_map(statements: pd.DataFrame, task: str) -> dict[str, str]:
    """Map each SCP code that counts for ``task`` to its label (the code itself, or its (sub)class)."""
    _check_task(task)

    def flag(col: str) -> pd.Series:
        return statements[col].fillna(0).astype(float) == 1.0

    if task == "all":
        return {str(c): str(c) for c in statements.index}
    if task in ("form", "rhythm"):
        return {str(c): str(c) for c in statements.index[flag(task)]}
    diag = statements[flag("diagnostic")]
    if task == "diagnostic":
        return {str(c): str(c) for c in diag.index}
    col = "diagnostic_subclass" if task == "subdiagnostic" else "diagnostic_class"
    out: dict[str, str] = {}
    for code, value in zip(diag.index, diag[col]):
        if isinstance(value, str) and value and value.lower() != "nan":
            out[str(code)] = value
    return out


def ptbxl_diagnostic_codes(statements: pd.DataFrame) -> frozenset[str]:
    """The SCP codes of diagnostic statements (``diagnostic == 1``): the only ones PTB-XL gives likelihoods for."""
    return frozenset(str(c) for c in statements.index[statements["diagnostic"].fillna(0).astype(float) == 1.0])


def ptbxl_task_labels(scp_codes: Mapping[str, float], task: str,
                      statements: pd.DataFrame | Mapping[str, str], min_likelihood: float = 0.0,
                      diagnostic_codes: Collection[str] | None = None) -> list[str]:
    """Labels of one record for a PTB-XL benchmark task.

    Args:
        scp_codes: ``{code: likelihood}`` of the record (``record.meta["scp_codes"]``).
        task: one of :data:`PTBXL_TASKS`.
        statements: ``scp_statements.csv`` as from :func:`load_scp_statements`, or a code -> label map from
            :func:`ptbxl_task_map` (faster in loops; then ``task`` must match the map).
        min_likelihood: keep a diagnostic code only if its likelihood is >= this (a diagnostic code given with
            likelihood 0, "unknown", is then dropped too). Codes of other statements (form, rhythm: PTB-XL gives
            them no likelihood) are kept whatever the threshold. The default 0.0 keeps every code, as the benchmark
            does (for ``all`` the benchmark keeps every key even if it is not a statement).
        diagnostic_codes: the diagnostic codes (:func:`ptbxl_diagnostic_codes`); taken from ``statements`` when it
            is the table. Needed with a ``min_likelihood`` above 0 when ``statements`` is a map of a ``form``,
            ``rhythm`` or ``all`` task (a map of a diagnostic task holds diagnostic codes only).

    Returns:
        Sorted, de-duplicated labels.

    Raises:
        ValueError: an unknown task, or a threshold with a non-diagnostic task's map and no ``diagnostic_codes``.
    """
    _check_task(task)
    if isinstance(statements, pd.DataFrame):
        mapping = ptbxl_task_map(statements, task)
        if diagnostic_codes is None and min_likelihood > 0:
            diagnostic_codes = ptbxl_diagnostic_codes(statements)
    else:
        mapping = statements
    if min_likelihood > 0 and diagnostic_codes is None:
        if task in ("form", "rhythm", "all"):
            raise ValueError(f"ptbxl_task_labels: min_likelihood={min_likelihood} with a {task!r} code map needs "
                             f"diagnostic_codes (only diagnostic statements have likelihoods): pass the statements "
                             f"table or ptbxl_diagnostic_codes(statements)")
        diagnostic_codes = frozenset(mapping)
    out = set()
    for code, likelihood in scp_codes.items():
        if min_likelihood > 0 and code in diagnostic_codes and float(likelihood) < min_likelihood:
            continue
        if task == "all":
            out.add(str(code))
        elif code in mapping:
            out.add(mapping[code])
    return sorted(out)


def ptbxl_label_space(root: str | os.PathLike, task: str) -> list[str]:
    """Every label a task can take, from ``scp_statements.csv`` (sorted; independent of the records present).

    71 for ``all``, 44 ``diagnostic``, 23 ``subdiagnostic``, 5 ``superdiagnostic``, 19 ``form``, 12 ``rhythm``.
    """
    return sorted(set(ptbxl_task_map(load_scp_statements(root), task).values()))


def _finite_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class PTBXLSource:
    """Every PTB-XL record file present under ``root`` at one rate.

    Ids have gaps; records without a row in ``ptbxl_database.csv`` load as unlabelled pretraining data
    (``labels=()``, ``meta={}``, ``patient_id=None``). Labelled records get ``patient_id`` (string),
    ``labels`` = their SCP codes (sorted keys of ``scp_codes``, any likelihood) and ``meta`` =
    ``{"scp_codes", "strat_fold", "age", "sex"}``. ``record_id`` is the zero-padded ``ecg_id`` (``"00001"``).
    Rows of ``ptbxl_database.csv`` without a signal file at this rate (a partial download) are left out with a
    logged warning naming their count, the first ids and the record folder; so are, with
    ``include_unlabelled=False``, signal files without a row.

    Args:
        root: folder holding ``records100/`` and/or ``records500/`` and (optionally) the CSVs (relative: to the
            current directory; kept absolute, :func:`~ecgfm.data.readers._scan.absolute_path`).
        fs: 100 or 500 (which record folder to read).
        include_unlabelled: also list records that have no metadata row.
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default
            :data:`~ecgfm.data.readers.formats.FS_RANGE`).

    Raises:
        ECGDataError: no record folder or record; an unreadable ``ptbxl_database.csv`` (undecodable, a duplicated
            or non-integer ``ecg_id``, ...; see :func:`load_ptbxl_table`).
    """

    name = "ptbxl"

    def __init__(self, root: str | os.PathLike, fs: int = 100, include_unlabelled: bool = True,
                 fs_range: Sequence[float] | None = None):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        self.fs_range = check_fs_range(fs_range)
        if int(fs) not in _RATES:
            raise ValueError(f"PTB-XL fs must be 100 or 500, got {fs!r}")
        self.fs = int(fs)
        self.include_unlabelled = bool(include_unlabelled)
        folder, suffix = _RATES[self.fs]
        base = self.root / folder
        if not base.is_dir():
            raise ECGDataError(base, f"PTB-XL record folder for {self.fs} Hz not found")
        self._files: dict[str, str] = {}
        # os.scandir: one pass over the 2 levels of the layout (faster than glob on 20k files).
        for sub in sorted(os.scandir(base), key=lambda e: e.name):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(suffix + ".hea"):
                    stem = entry.name[: -len(suffix) - 4]
                    if stem.isdigit():
                        rid, rel = f"{int(stem):05d}", f"{folder}/{sub.name}/{entry.name[:-4]}"
                        if rid in self._files:    # one ecg_id, two signals: which one its metadata row is about?
                            raise ECGDataError(self.root / rel, f"PTB-XL ecg_id {int(stem)} appears twice "
                                                                f"(also {self.root / self._files[rid]}.hea)")
                        self._files[rid] = rel
        self._rows: dict[str, tuple[str | None, dict[str, Any]]] = {}
        if (self.root / "ptbxl_database.csv").is_file():
            df = load_ptbxl_table(self.root)
            for ecg_id, pid, codes, fold, age, sex in zip(df.index, df["patient_id"], df["scp_codes"],
                                                          df["strat_fold"], df["age"], df["sex"]):
                fold_f = _finite_or_none(fold)
                meta = {"scp_codes": codes, "strat_fold": int(fold_f) if fold_f is not None else None,
                        "age": _finite_or_none(age),
                        "sex": _sex_of(sex)}
                self._rows[f"{int(ecg_id):05d}"] = (ptbxl_patient(pid), meta)
        elif not self.include_unlabelled:
            raise ECGDataError(self.root / "ptbxl_database.csv",
                               "PTB-XL metadata file not found (needed with include_unlabelled=False)")
        missing = sorted(i for i in self._rows if i not in self._files)
        if missing:  # a partial download or sync: the folds (the test fold too) would shrink without a word
            log.warning("%s: %d labelled row(s) of ptbxl_database.csv have no %d Hz signal file in %s and are left "
                        "out (ecg_id %s%s); complete the download if they should be there", self.root, len(missing),
                        self.fs, base, ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
        ids = self._files if self.include_unlabelled else [i for i in self._files if i in self._rows]
        unlisted = [] if self.include_unlabelled else sorted(i for i in self._files if i not in self._rows)
        if unlisted:  # the opposite case of `missing`: signal files that ptbxl_database.csv does not list
            log.warning("%s: %d %d Hz signal file(s) in %s have no row in ptbxl_database.csv and are left out "
                        "(include_unlabelled=false; ecg_id %s%s); set include_unlabelled=true to read them as "
                        "unlabelled records", self.root, len(unlisted), self.fs, base, ", ".join(unlisted[:5]),
                        " ..." if len(unlisted) > 5 else "")
        self._ids = sorted(ids)
        if not self._ids:
            raise ECGDataError(base, "no PTB-XL records found")

    def __repr__(self) -> str:
        return f"PTBXLSource(root={str(self.root)!r}, fs={self.fs}, n={len(self._ids)})"

    def __len__(self) -> int:
        return len(self._ids)

    def record_ids(self) -> list[str]:
        """Sorted zero-padded ecg_ids of the records present (``"00001"``, ...)."""
        return list(self._ids)

    def label_files(self) -> list[Path]:
        """The metadata tables present (``ptbxl_database.csv``, ``scp_statements.csv``), for the cache's freshness
        check."""
        return [p for p in (self.root / "ptbxl_database.csv", self.root / "scp_statements.csv") if p.is_file()]

    def is_labelled(self, record_id: str) -> bool:
        return record_id in self._rows

    def load(self, record_id: str) -> ECGRecord:
        """Read one record; raises :class:`ECGDataError` for an unknown id or a bad file."""
        rel = self._files.get(record_id)
        if rel is None:
            raise ECGDataError(self.root, f"no PTB-XL record {record_id!r} at {self.fs} Hz")
        check_decodable(self.root, rel, ".hea")
        record = read_wfdb(self.root / rel, source=self.name, root=self.root, fs_range=self.fs_range)
        pid, meta = self._rows.get(record_id, (None, None))
        if meta is None:
            return record.replace(record_id=record_id, meta={}, labels=())
        meta = {**meta, "scp_codes": dict(meta["scp_codes"])}
        return record.replace(record_id=record_id, patient_id=pid, meta=meta,
                              labels=tuple(sorted(meta["scp_codes"])))

    def labels(self, task: str = "superdiagnostic", min_likelihood: float = 0.0) -> dict[str, list[str]]:
        """Task labels of every labelled record listed by this source, without reading any signal."""
        statements = load_scp_statements(self.root)
        mapping, diagnostic = ptbxl_task_map(statements, task), ptbxl_diagnostic_codes(statements)
        return {rid: ptbxl_task_labels(self._rows[rid][1]["scp_codes"], task, mapping, min_likelihood, diagnostic)
                for rid in self._ids if rid in self._rows}

    def folds(self) -> dict[str, int | None]:
        """``strat_fold`` of every labelled record listed by this source."""
        return {rid: self._rows[rid][1]["strat_fold"] for rid in self._ids if rid in self._rows}
