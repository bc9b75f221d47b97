"""Sources for the PhysioNet / CPSC corpora: CinC 2017, challenge 2020/2021, CPSC 2021, CPSC 2018, MIT-BIH."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import wfdb

from ecgfm.data.readers._scan import absolute_path, check_decodable, scan_records
from ecgfm.data.readers.formats import (
    _suffix_case_variant,
    check_fs_range,
    header_comment_values,
    read_challenge,
    read_cpsc2018,
    read_wfdb,
)
from ecgfm.data.readers.tables import read_label_table
from ecgfm.data.record import ECGDataError, ECGRecord

__all__ = [
    "BEAT_SYMBOLS",
    "CHALLENGE_EQUIVALENT_CODES",
    "CINC2017_CLASSES",
    "CPSC2021_CLASSES",
    "CPSC2018Source",
    "CPSC2021Source",
    "Challenge2021Source",
    "CinC2017Source",
    "MITBIHSource",
    "challenge_subset",
    "merge_equivalent_codes",
    "parse_dx_codes",
]

log = logging.getLogger(__name__)

#: CinC 2017 classes: normal sinus rhythm, atrial fibrillation, other rhythm, too noisy to classify.
CINC2017_CLASSES: tuple[str, ...] = ("N", "A", "O", "~")

#: SNOMED-CT codes the challenge 2020/2021 scoring treats as the same class (evaluate_model.py,
#: ``equivalent_classes``): the second code of each pair is replaced by the first.
CHALLENGE_EQUIVALENT_CODES: dict[str, str] = {
    "59118001": "713427006",   # RBBB -> CRBBB (complete right bundle branch block)
    "63593006": "284470004",   # SVPB -> PAC (premature atrial contraction)
    "17338001": "427172004",   # VPB -> PVC (premature ventricular contraction)
    "164909002": "733534002",  # LBBB -> CLBBB (complete left bundle branch block)
}

#: CPSC 2021 record classes (header comment -> label).
CPSC2021_CLASSES: dict[str, str] = {
    "non atrial fibrillation": "non_af",
    "paroxysmal atrial fibrillation": "paroxysmal_af",
    "persistent atrial fibrillation": "persistent_af",
}

#: PhysioNet beat annotation symbols (the rest are rhythm, noise and other non-beat annotations).
BEAT_SYMBOLS: frozenset[str] = frozenset("NLRBaJASVrFejnE/fQ?")


def merge_equivalent_codes(codes: list[str]) -> list[str]:
    """Sorted, de-duplicated codes with the challenge's equivalent pairs merged (see
    :data:`CHALLENGE_EQUIVALENT_CODES`)."""
    return sorted({CHALLENGE_EQUIVALENT_CODES.get(c, c) for c in codes})


#: What separates the codes of a ``# Dx:`` value: commas (as published), semicolons or white space.
_DX_SEPARATORS = re.compile(r"[,;\s]+")
#: A SNOMED CT id as written in a ``# Dx:`` line: digits, optionally with a zero fraction (``"426783006.0"``, as a
#: spreadsheet or a float column writes it).
_DX_CODE = re.compile(r"([0-9]+)(?:\.0*)?")


def parse_dx_codes(values: Sequence[str], path: str | os.PathLike) -> list[str]:
    """The SNOMED CT codes of a challenge header's ``# Dx:`` values, in order.

    Codes are separated by ``,`` (as published), ``;`` or white space (``"164889003 59118001"`` is two codes, not
    one fused class); an integer written as a float is the integer (``"67741000119109.0"`` is ``"67741000119109"``:
    one class, not two), leading zeros are dropped.

    Args:
        values: the text after ``Dx:`` of every ``# Dx:`` line.
        path: the header file, for error messages.

    Raises:
        ECGDataError: a code that is not a whole number (SNOMED CT ids are integers): free text such as
            ``sinus bradycardia``, ``426783006.5`` or ``6.77E+13``; the message names the header file and the code.
    """
    codes: list[str] = []
    for value in values:
        for code in _DX_SEPARATORS.split(str(value).strip()):
            if not code:
                continue
            m = _DX_CODE.fullmatch(code)
            if m is None:
                raise ECGDataError(path, f"'# Dx:' code {code!r} (line '# Dx: {str(value).strip()}') is not a SNOMED "
                                         f"CT code: they are whole numbers, separated by ',' (e.g. "
                                         f"'# Dx: 426783006,164889003')")
            codes.append(str(int(m.group(1))))
    return codes


def challenge_subset(record_id: str) -> str:
    """Sub-database of a challenge 2020/2021 record from its id prefix.

    A: CPSC 2018, Q: CPSC 2018 extra, I: St Petersburg INCART, S: PTB, HR: PTB-XL, E: Georgia,
    JS: Chapman-Shaoxing (JS00001-JS10646) or Ningbo (JS10647 on), as listed by the challenge.
    """
    rid = record_id.upper()
    if rid.startswith("HR"):
        return "ptbxl"
    if rid.startswith("JS"):
        digits = rid[2:]
        return "chapman_shaoxing" if digits.isdigit() and int(digits) <= 10646 else "ningbo"
    return {"A": "cpsc2018", "Q": "cpsc2018_extra", "I": "incart", "S": "ptb", "E": "georgia"}.get(rid[:1],
                                                                                                  "unknown")


class _FolderIndex:
    """Shared plumbing of the folder-based sources: ``self._files`` maps record id -> path relative to root.

    ``root`` (and ``ptbxl_root``) are kept absolute (:func:`~ecgfm.data.readers._scan.absolute_path`: a relative one
    against the current directory), as the repr shows them: it keys prepared caches.
    """

    name = "source"
    _what = "record"
    _suffix = ".hea"
    root: Path
    _files: dict[str, str]
    fs_range: tuple[float, float] | None = None

    def record_ids(self) -> list[str]:
        """Sorted record ids (file names without extension)."""
        return list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self._files)})"

    def label_files(self) -> list[Path]:
        """The label tables this source reads (none: labels come from the headers), for the cache's freshness
        check."""
        return []

    def _base(self, record_id: str) -> Path:
        rel = self._files.get(record_id)
        if rel is None:
            raise ECGDataError(self.root, f"no {self._what} {record_id!r} in this folder")
        check_decodable(self.root, rel, self._suffix)
        return self.root / rel


class CinC2017Source(_FolderIndex):
    """PhysioNet/CinC 2017 AF challenge: single-lead AliveCor ECG at 300 Hz, records of different lengths.

    The AliveCor lead (published as ``ECG``) is recorded between the two hands, a lead-I configuration, so
    it is placed in the ``I`` row; ``header["lead_renamed"] == {"ECG": "I"}`` records the choice.
    Labels from ``REFERENCE.csv`` (no header line): ``(label,)`` with label in :data:`CINC2017_CLASSES`, and
    ``meta["label"]``. Records without a reference row load unlabelled, with one logged warning (when the source
    is built) naming their count, the first ids and the folder; reference rows without a record (a partial
    download) are left out with a logged warning naming the same.

    Args:
        root: folder with ``A*.hea`` + ``A*.mat`` and ``REFERENCE.csv`` (read with
            :func:`~ecgfm.data.readers.tables.read_label_table`).
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default
            :data:`~ecgfm.data.readers.formats.FS_RANGE`).
    """

    name = "cinc2017"
    _what = "CinC 2017 record"

    def __init__(self, root: str | os.PathLike, fs_range: Sequence[float] | None = None):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        self.fs_range = check_fs_range(fs_range)
        self._files = scan_records(self.root, ".hea")
        if not self._files:
            raise ECGDataError(self.root, "no CinC 2017 records (*.hea) found")
        ref = self.root / "REFERENCE.csv"
        if not ref.is_file():
            raise ECGDataError(ref, "CinC 2017 REFERENCE.csv not found")
        table = read_label_table(ref, header=False, columns=("record", "label"), id_column="record",
                                 what="CinC 2017 REFERENCE.csv")
        self._labels: dict[str, str] = {}
        for rid, row in table.rows.items():
            if row["label"] not in CINC2017_CLASSES:
                raise ECGDataError(ref, f"line {table.lines[rid]}: expected 'record,label' with label in "
                                        f"{CINC2017_CLASSES}, got label {row['label']!r}")
            self._labels[rid] = row["label"]
        missing = sorted(r for r in self._labels if r not in self._files)
        if missing:  # a partial download: the labelled set would shrink without a word
            log.warning("%s: %d labelled row(s) of REFERENCE.csv have no record (.hea) in %s and are left out "
                        "(%s%s); complete the download if they should be there", ref, len(missing), self.root,
                        ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
        unlabelled = sorted(r for r in self._files if r not in self._labels)
        if unlabelled:  # a truncated REFERENCE.csv: these records would pass as unlabelled without a word
            log.warning("%s: %d record(s) in %s have no row in REFERENCE.csv and load unlabelled (labels=()) (%s%s); "
                        "check REFERENCE.csv if they should be labelled", ref, len(unlabelled), self.root,
                        ", ".join(unlabelled[:5]), " ..." if len(unlabelled) > 5 else "")

    def label_files(self) -> list[Path]:
        """``[REFERENCE.csv]``: the label table this source reads (for the cache's freshness check)."""
        return [self.root / "REFERENCE.csv"]

    def load(self, record_id: str) -> ECGRecord:
        base = self._base(record_id)
        record = read_challenge(base, source=self.name, rename_leads={"ECG": "I"}, root=self.root,
                                fs_range=self.fs_range)
        label = self._labels.get(record_id)
        meta = dict(record.meta)
        if label is not None:
            meta["label"] = label
        return record.replace(record_id=record_id, labels=(label,) if label else (), meta=meta)


class Challenge2021Source(_FolderIndex):
    """PhysioNet/CinC challenge 2020/2021 records (``.hea`` + ``.mat``, 12 leads), searched recursively.

    ``labels`` and ``meta["dx"]``: the ``# Dx:`` SNOMED-CT codes with the scoring's equivalent pairs merged
    (sorted); ``meta["dx_raw"]``: the codes as published (read by :func:`parse_dx_codes`: separated by ``,``,
    ``;`` or white space, ``"123.0"`` read as ``"123"``; a code that is not a whole number is an error naming the
    header file and the code, raised on load); ``meta["subset"]``: the sub-database from the id
    prefix (:func:`challenge_subset`); ``meta["ptbxl_ecg_id"]``: for ``HR`` records, the PTB-XL ``ecg_id``
    (``HR06000`` is PTB-XL record 6000), used to guard against PTB-XL leakage. ``age`` / ``sex`` as parsed.
    The challenge's headers carry no patient id; with ``ptbxl_root`` an ``HR`` record whose ecg_id has a row in
    that PTB-XL folder's ``ptbxl_database.csv`` gets its PTB-XL ``patient_id`` (``record.patient_id`` and
    ``meta["ptbxl_patient_id"]``), so the leakage guard sees a PTB-XL patient behind another ecg_id and a
    patient-level split keeps that patient's records together.

    Args:
        root: folder (tree) holding the records.
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default
            :data:`~ecgfm.data.readers.formats.FS_RANGE`).
        ptbxl_root: a PTB-XL folder holding ``ptbxl_database.csv`` (optional; records without a row keep no
            patient id).
    """

    name = "challenge2021"
    _what = "challenge record"

    def __init__(self, root: str | os.PathLike, fs_range: Sequence[float] | None = None,
                 ptbxl_root: str | os.PathLike | None = None):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        self.fs_range = check_fs_range(fs_range)
        self._files = scan_records(self.root, ".hea", recursive=True)
        if not self._files:
            raise ECGDataError(self.root, "no challenge records (*.hea) found")
        self._ptbxl_patients: dict[int, str] = {}
        if ptbxl_root is not None:
            # a public setting (in the cache's source description) only when given: a source without it describes
            # itself as before, so its existing caches stay current
            self.ptbxl_root = absolute_path(ptbxl_root)
            from ecgfm.data.readers.ptbxl import load_ptbxl_table, ptbxl_patient   # the one checked reader

            table = load_ptbxl_table(self.ptbxl_root)
            self._ptbxl_patients = {int(e): ptbxl_patient(p) for e, p in table["patient_id"].items()
                                    if ptbxl_patient(p) is not None}

    def label_files(self) -> list[Path]:
        """``ptbxl_database.csv`` when ``ptbxl_root`` is given (patient ids come from it), for the cache's
        freshness check; the labels themselves come from the headers."""
        root = getattr(self, "ptbxl_root", None)
        return [] if root is None else [root / "ptbxl_database.csv"]

    def load(self, record_id: str) -> ECGRecord:
        base = self._base(record_id)
        record = read_challenge(base, source=self.name, root=self.root, fs_range=self.fs_range)
        # every "# Dx:" line (the challenge's own get_labels reads them all)
        raw = parse_dx_codes(header_comment_values(record.header.get("comments", []), "dx"),
                             record.header.get("path", base.with_suffix(".hea")))
        merged = merge_equivalent_codes(raw)
        meta: dict[str, Any] = dict(record.meta)
        meta.pop("dx_text", None)
        meta.update({"dx": merged, "dx_raw": raw, "subset": challenge_subset(record_id)})
        patient = record.patient_id
        if record_id.upper().startswith("HR") and record_id[2:].isdigit():
            meta["ptbxl_ecg_id"] = int(record_id[2:])
            if meta["ptbxl_ecg_id"] in self._ptbxl_patients:
                patient = meta["ptbxl_patient_id"] = self._ptbxl_patients[meta["ptbxl_ecg_id"]]
        return record.replace(record_id=record_id, labels=tuple(merged), meta=meta, patient_id=patient)


def _af_episodes(ann: wfdb.Annotation, sig_len: int) -> list[list[int]]:
    """``[[start, end], ...]`` sample ranges (inclusive) between ``(AFIB``/``(AFL`` and the next rhythm change.

    CPSC 2021 convention: an episode opens at an ``(AFIB`` or ``(AFL`` rhythm annotation and closes at the
    next rhythm annotation (``(N``); one still open at the end closes at the last sample. Ends are
    clipped to the last sample.
    """
    episodes: list[list[int]] = []
    start: int | None = None
    for sample, symbol, note in zip(ann.sample, ann.symbol, ann.aux_note or [""] * len(ann.sample)):
        if symbol != "+":
            continue
        rhythm = str(note).strip("\x00 ").upper()
        if rhythm in ("(AFIB", "(AFL"):
            if start is None:
                start = int(sample)
        elif start is not None:
            episodes.append([start, int(sample)])
            start = None
    if start is not None:
        episodes.append([start, int(sig_len) - 1])
    # Some published annotations put the closing "(N" one sample past the end (data_101_6): clip to the record.
    return [[min(s, int(sig_len) - 1), min(e, int(sig_len) - 1)] for s, e in episodes]


def _read_atr(base: Path, n_samples: int, fs: float, extension: str = "atr") -> wfdb.Annotation | None:
    """The record's WFDB annotations, or None when the file is absent; positions in samples at the record's rate
    ``fs`` (an annotation file may store them at a time resolution of its own, ``ann.fs``: they are rescaled; read
    as record samples before 2026-12-07, a 100 Hz file on a 200 Hz record put every beat at half its time).

    Checked beyond ``wfdb.rdann`` (which reads until the bytes run out): the file ends with the format's
    end-of-file marker (a 16-bit 0; a cut-off file would silently lose its last beats and the ``(N`` closing an AF
    episode), and every annotation lies in the record (``0 <= sample <= n_samples``; one past the end is a known
    published quirk): annotations of another record, or at another rate, are refused instead of clipped.
    """
    # found as X.ATR too (the folder scan matches extensions case-insensitively); wfdb is given its real extension
    path = _suffix_case_variant(base.with_name(base.name + "." + extension))
    if not path.is_file():
        return None
    extension = path.suffix[1:]
    with open(path, "rb") as f:
        f.seek(max(path.stat().st_size - 2, 0))
        tail = f.read(2)
    if tail != b"\0\0":
        raise ECGDataError(path, "annotation file does not end with the WFDB end-of-file marker (0x0000): "
                                 "truncated or damaged")
    try:
        ann = wfdb.rdann(str(base), extension)
    except Exception as exc:
        raise ECGDataError(path, f"unreadable annotation file: {type(exc).__name__}: {exc}") from None
    samples = np.asarray(ann.sample, dtype=np.int64)
    ann_fs = float(ann.fs) if getattr(ann, "fs", None) else None
    if ann_fs is not None and not (np.isfinite(ann_fs) and ann_fs > 0):
        raise ECGDataError(path, f"annotation time resolution {ann.fs!r} Hz is not a positive rate")
    if ann_fs is not None and abs(ann_fs - float(fs)) > 1e-6 * float(fs):
        samples = np.round(samples * (float(fs) / ann_fs)).astype(np.int64)
        ann.sample, ann.fs = samples, float(fs)
    if samples.size and (samples.min() < 0 or samples.max() > n_samples):
        raise ECGDataError(path, f"annotations at samples {int(samples.min())}..{int(samples.max())} but the record "
                                 f"has {n_samples} samples: annotations of another record or another rate")
    return ann


class CPSC2021Source(_FolderIndex):
    """CPSC 2021 paroxysmal AF: 2-lead (I, II) 200 Hz WFDB records with ``.atr`` annotations.

    ``labels``: the record class from the header comment, one of ``non_af``, ``paroxysmal_af``,
    ``persistent_af`` (also ``meta["class"]``). ``annotations``: ``{"r_peaks": (n,) int64 sample indices of
    beat annotations, "af_episodes": [[start, end], ...]}`` (inclusive, in samples), or None when the
    ``.atr`` file is absent. ``patient_id``: the patient number of ``data_<patient>_<record>``.

    Args:
        root: folder with ``data_*.hea`` / ``.dat`` / ``.atr``.
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default
            :data:`~ecgfm.data.readers.formats.FS_RANGE`).
    """

    name = "cpsc2021"
    _what = "CPSC 2021 record"

    def __init__(self, root: str | os.PathLike, fs_range: Sequence[float] | None = None):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        self.fs_range = check_fs_range(fs_range)
        self._files = scan_records(self.root, ".hea")
        if not self._files:
            raise ECGDataError(self.root, "no CPSC 2021 records (*.hea) found")

    def load(self, record_id: str) -> ECGRecord:
        base = self._base(record_id)
        record = read_wfdb(base, source=self.name, root=self.root, fs_range=self.fs_range)
        comments = [c.strip().lower() for c in record.header.get("comments", []) if c.strip()]
        cls = next((CPSC2021_CLASSES[c] for c in comments if c in CPSC2021_CLASSES), None)
        if cls is None:
            raise ECGDataError(record.header["path"], f"no CPSC 2021 record class among the header comments "
                                                      f"{comments} (expected one of {list(CPSC2021_CLASSES)})")
        parts = record_id.split("_")
        patient = parts[1] if len(parts) == 3 and parts[0] == "data" else None
        ann = _read_atr(base, record.n_samples, record.fs)
        annotations = None
        if ann is not None:
            beats = np.array([s in BEAT_SYMBOLS for s in ann.symbol], dtype=bool)
            annotations = {"r_peaks": np.asarray(ann.sample, dtype=np.int64)[beats],
                           "af_episodes": _af_episodes(ann, record.n_samples)}
            if (cls == "non_af") == bool(annotations["af_episodes"]):   # the header and the .atr must agree
                raise ECGDataError(base.with_name(base.name + ".atr"),
                                   f"{len(annotations['af_episodes'])} AF episode(s) annotated but the header says "
                                   f"{cls!r}")
        return record.replace(record_id=record_id, patient_id=patient, labels=(cls,),
                              meta={**record.meta, "class": cls}, annotations=annotations)


class CPSC2018Source(_FolderIndex):
    """Original CPSC 2018 MATLAB files (``A*.mat``, struct ``ECG``): 12 leads at 500 Hz, unlabelled here.

    Args:
        root: folder with the ``.mat`` files.
    """

    name = "cpsc2018"
    _what = "CPSC 2018 record"
    _suffix = ".mat"

    def __init__(self, root: str | os.PathLike):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        self._files = scan_records(self.root, ".mat")
        if not self._files:
            raise ECGDataError(self.root, "no CPSC 2018 records (*.mat) found")

    def load(self, record_id: str) -> ECGRecord:
        base = self._base(record_id)
        return read_cpsc2018(base.with_name(base.name + ".mat"), source=self.name).replace(record_id=record_id)


#: MIT-BIH Arrhythmia records of one subject (the database's directory of records): record -> the record whose
#: name is used as both records' patient id.
MITBIH_SAME_SUBJECT = {"202": "201"}


class MITBIHSource(_FolderIndex):
    """MIT-BIH Arrhythmia records (WFDB format 212, 360 Hz, 2 leads) with their beat annotations.

    Lists every record of ``root`` that has an ``.atr`` file (other records in the folder are ignored).
    MLII is placed in lead II, V1/V2/V4/V5 in their rows. ``annotations``: ``{"sample": (n,) int64,
    "symbol": (n,) str, "aux_note": (n,) str}`` (all annotations, beats and rhythm changes). ``meta``: age
    and sex from the header comment ``# 69 M ...``. ``patient_id``: the record name, except that records 201 and
    202 share one (the database's directory: they "came from the same male subject"), so patient-level splits keep
    them together.

    Args:
        root: folder with ``*.hea`` / ``*.dat`` / ``*.atr``.
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default
            :data:`~ecgfm.data.readers.formats.FS_RANGE`).
    """

    name = "mitbih"
    _what = "MIT-BIH record"

    def __init__(self, root: str | os.PathLike, fs_range: Sequence[float] | None = None):
        self.root = absolute_path(root)   # absolute: the repr keys prepared caches (prepare_cache)
        self.fs_range = check_fs_range(fs_range)
        heads = scan_records(self.root, ".hea")
        atrs = scan_records(self.root, ".atr")
        self._files = {k: v for k, v in heads.items() if k in atrs}
        if not self._files:
            raise ECGDataError(self.root, "no MIT-BIH records (*.hea with *.atr) found")
        left = sorted(k for k in heads if k not in atrs)
        if left:   # as documented, and said: a record that lost its .atr must not vanish without a word
            log.warning("%s: %d record header(s) without an .atr annotation file left out of the MIT-BIH source "
                        "(e.g. %s)", self.root, len(left), ", ".join(left[:5]))

    def load(self, record_id: str) -> ECGRecord:
        base = self._base(record_id)
        record = read_wfdb(base, source=self.name, root=self.root, fs_range=self.fs_range)
        meta = dict(record.meta)
        for comment in record.header.get("comments", []):  # "<age> <sex> ..." (first such comment)
            tok = str(comment).split()
            if len(tok) >= 2 and tok[0].isdigit() and tok[1].upper() in ("M", "F"):
                meta.update({"age": float(tok[0]), "sex": tok[1].upper()})
                break
        ann = _read_atr(base, record.n_samples, record.fs)
        if ann is None:
            raise ECGDataError(base.with_name(base.name + ".atr"), "annotation file not found")
        annotations = {"sample": np.asarray(ann.sample, dtype=np.int64),
                       "symbol": np.asarray(ann.symbol, dtype=str),
                       "aux_note": np.asarray([str(n).strip("\x00") for n in (ann.aux_note or [])], dtype=str)}
        name = Path(record_id).name
        patient = record_id[: len(record_id) - len(name)] + MITBIH_SAME_SUBJECT.get(name, name)
        return record.replace(record_id=record_id, patient_id=patient, meta=meta, annotations=annotations)
