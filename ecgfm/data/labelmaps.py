"""Label vocabularies across corpora: SCP-ECG statements (PTB-XL) <-> SNOMED CT codes (PhysioNet/CinC 2020/2021,
which also recoded CPSC 2018, Georgia, Ningbo...).

The table is package data, ``ecgfm/data/scp_snomed.csv`` (its comment header says where every code comes from, how
each row was verified, and which codes / statements were left out). It is read in the direction SNOMED -> SCP:
a record carrying a SNOMED code would have been given the row's SCP statement(s).

:class:`SnomedTaskMap` turns that table into a record labeller for one PTB-XL task (``superdiagnostic``,
``subdiagnostic``, ``diagnostic``, ``form``, ``rhythm`` or ``all``): a record is positive for a task class when one
of its codes maps to an SCP statement of that class (``same`` / ``narrower`` rows), when a ``broader`` code's
statements all fall into that one class, or through a ``sole`` rule (NORM <- sinus rhythm as the record's only
code). For the superdiagnostic task, a few form statements *suggest* superclasses
(:data:`SUGGESTIVE_FORM_STATEMENTS`: ST/T form codes -> STTC, ST depression also HYP, T inversion and Q waves MI); and
a ``broader`` code whose statements span several task classes (ambiguous: 164865005 myocardial infarction for the
subdiagnostic task) may stand for each of them. A record carrying such a code but not positive for such a class has
an unknown label for it and is left out (:meth:`SnomedTaskMap.uncertain`), never scored as a negative.
:meth:`SnomedTaskMap.select` decides which records are scored, after any exclusion, and
:meth:`SnomedTaskMap.report` lists, for the same selection, the task classes with a code and their positives, the
classes no code of the table reaches, the classes no code *present in these records* reaches (not evaluable), and
every code present by fate: mapped, known but outside the task, ambiguous for the task, or unknown to the table, so
nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "RELATIONS",
    "EVIDENCE",
    "CPSC2018_CLASSES",
    "RecordSelection",
    "SnomedRow",
    "RHYTHMS_EXCLUDING_SR",
    "SUGGESTIVE_FORM_STATEMENTS",
    "SnomedTaskMap",
    "load_scp_snomed",
    "scp_snomed_table_path",
    "snomed_task_map",
    "derived_suggestions",
    "summary_lines",
    "table_digest",
]

RELATIONS = ("same", "narrower", "broader", "sole")
EVIDENCE = ("challenge", "equivalent", "name", "meaning")
#: CPSC 2018 classes (as numbered 1-9 in its REFERENCE.csv).
CPSC2018_CLASSES = ("Normal", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE")
#: Form statements (PTB-XL ``form``, no diagnostic superclass) -> the superdiagnostic classes they suggest, used only
#: for the ``superdiagnostic`` task: a record carrying a code of one of them and NOT positive for a suggested class has
#: an unknown label for that class (left out of the scored set and counted as ``records.uncertain`` in the report),
#: not a negative. Rule: in the shared PTB-XL copy (500 labelled records), at least 4 records with the statement, and
#: at least two thirds of them, also carry a diagnostic statement of the class (every class that passes is listed);
#: or, for the ST/T statements too rare there, the class is the statement's own subject (STTC is "ST/T change"):
#:   STD_  ST depression      16 of 22 records with an STTC statement, 15 of 22 with HYP (11 MI, 3 CD: no)
#:   INVT  T inversion         5 of 5 with MI, 4 of 5 with STTC (3 HYP, 2 CD: no)
#:   TAB_  T abnormal          0 of 1 (too rare; by meaning)
#:   STE_  ST elevation        no record (by meaning)
#:   QWAVE Q waves            10 of 10 with an MI statement (5 CD, 3 STTC, 2 HYP: no)
#: Checked and left out by the same rule: LVOLT low QRS voltage (0 of 4 STTC, 2 of 4 MI), ABQRS (12 of 22 MI),
#: LPR (3 of 3 CD: too few records). The table has no row for LV high voltage (55827005 ~ VCLVH) nor for nonspecific
#: ST-T abnormality (428750005): those codes stay unknown (their records are counted as ``partially_mapped``).
SUGGESTIVE_FORM_STATEMENTS: dict[str, tuple[str, ...]] = {
    "STD_": ("HYP", "STTC"), "INVT": ("MI", "STTC"), "TAB_": ("STTC",), "STE_": ("STTC",), "QWAVE": ("MI",)}
#: PTB-XL rhythm statements that exclude SR (normal-rate sinus rhythm): none of the 407 SR records of the shared
#: PTB-XL copy carries SBRAD (9 records there), STACH (5), SARRH (26), AFIB (13) or PACE (6) (AFLT does once), while the
#: challenge coded sinus brady- / tachycardia and sinus arrhythmia records with 426783006 *sinus rhythm* too (its
#: PTB-XL count, 18,092, exceeds SR's 16,782). A record whose codes give one of them is not SR (HR06002: 426783006 +
#: 426177001 sinus bradycardia, PTB-XL SBRAD alone; it was scored SR and SBRAD before 2026-12-07).
RHYTHMS_EXCLUDING_SR: tuple[str, ...] = ("SBRAD", "STACH", "SARRH", "AFIB", "PACE")
_COLUMNS = ("snomed_code", "snomed_name", "abbreviation", "scp_codes", "relation", "evidence", "challenge_ptbxl_n",
            "equivalent", "cpsc2018", "note")


@dataclass(frozen=True)
class SnomedRow:
    """One row of the SCP <-> SNOMED table (see the CSV header for every field)."""

    snomed_code: str
    snomed_name: str
    abbreviation: str
    scp_codes: tuple[str, ...]
    relation: str
    evidence: str
    challenge_ptbxl_n: int | None
    equivalent: str | None
    cpsc2018: str | None
    note: str
    line: int


def scp_snomed_table_path() -> Path:
    """Path of the packaged table ``ecgfm/data/scp_snomed.csv``."""
    return Path(str(resources.files("ecgfm.data").joinpath("scp_snomed.csv")))


def load_scp_snomed(path: str | Path | None = None) -> list[SnomedRow]:
    """Read and check the SCP <-> SNOMED table.

    Args:
        path: a table in the packaged format (default :func:`scp_snomed_table_path`).

    Returns:
        The rows, in file order.

    Raises:
        ValueError: a malformed row (named by line): non-numeric code, unknown relation / evidence, a non-broader
            row with several statements, a duplicated (code, statements) pair, an asymmetric equivalence, equivalent
            codes with different rows, an unknown CPSC 2018 class.
    """
    path = Path(path) if path is not None else scp_snomed_table_path()
    text = path.read_text(encoding="utf-8")
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no table rows")
    reader = csv.reader(io.StringIO("\n".join(ln for _, ln in lines)))
    header = next(reader)
    if tuple(header) != _COLUMNS:
        raise ValueError(f"{path} line {lines[0][0]}: expected columns {list(_COLUMNS)}, got {header}")
    rows: list[SnomedRow] = []
    seen: dict[tuple[str, tuple[str, ...], str], int] = {}
    for (lineno, _), values in zip(lines[1:], reader):
        where = f"{path} line {lineno}"
        if len(values) != len(_COLUMNS):
            raise ValueError(f"{where}: expected {len(_COLUMNS)} fields, got {len(values)}")
        f = dict(zip(_COLUMNS, (v.strip() for v in values)))
        code = f["snomed_code"]
        if not code.isdigit():
            raise ValueError(f"{where}: SNOMED CT code {code!r} is not numeric")
        scp = tuple(f["scp_codes"].split())
        if not scp:
            raise ValueError(f"{where}: no SCP statement")
        if f["relation"] not in RELATIONS:
            raise ValueError(f"{where}: relation {f['relation']!r} not in {RELATIONS}")
        if f["evidence"] not in EVIDENCE:
            raise ValueError(f"{where}: evidence {f['evidence']!r} not in {EVIDENCE}")
        if f["relation"] != "broader" and len(scp) != 1:
            raise ValueError(f"{where}: a {f['relation']!r} row names one statement, got {list(scp)}")
        if f["relation"] == "broader" and len(scp) < 2:
            raise ValueError(f"{where}: a 'broader' row names at least two statements, got {list(scp)}")
        if f["equivalent"] and not f["equivalent"].isdigit():
            raise ValueError(f"{where}: equivalent code {f['equivalent']!r} is not numeric")
        if f["cpsc2018"] and f["cpsc2018"] not in CPSC2018_CLASSES:
            raise ValueError(f"{where}: CPSC 2018 class {f['cpsc2018']!r} not in {CPSC2018_CLASSES}")
        n = f["challenge_ptbxl_n"]
        if n and not n.isdigit():
            raise ValueError(f"{where}: challenge_ptbxl_n {n!r} is not a count")
        key = (code, tuple(sorted(scp)), f["relation"])
        if key in seen:
            raise ValueError(f"{where}: duplicates line {seen[key]} ({code} -> {' '.join(scp)})")
        seen[key] = lineno
        rows.append(SnomedRow(code, f["snomed_name"], f["abbreviation"], scp, f["relation"], f["evidence"],
                              int(n) if n else None, f["equivalent"] or None, f["cpsc2018"] or None, f["note"],
                              lineno))
    _check_consistency(rows, path)
    return rows


def _check_consistency(rows: Sequence[SnomedRow], path: Path) -> None:
    """Per-code facts agree across rows; equivalences are symmetric and map to the same statements."""
    by_code: dict[str, list[SnomedRow]] = {}
    for r in rows:
        by_code.setdefault(r.snomed_code, []).append(r)
    for code, group in by_code.items():
        for attr in ("snomed_name", "abbreviation", "cpsc2018"):
            values = {getattr(r, attr) for r in group}
            if len(values) > 1:
                raise ValueError(f"{path} lines {[r.line for r in group]}: code {code} has several {attr} "
                                 f"{sorted(map(str, values))}")
        direct = [r for r in group if r.relation in ("same", "narrower")]
        scps = [r.scp_codes[0] for r in direct]
        if len(set(scps)) != len(scps):
            raise ValueError(f"{path}: code {code} maps to {scps} twice")
    for r in rows:
        if r.equivalent is None:
            continue
        back = [o for o in by_code.get(r.equivalent, []) if o.equivalent == r.snomed_code]
        if not back:
            raise ValueError(f"{path} line {r.line}: {r.snomed_code} is equivalent to {r.equivalent}, but no row of "
                             f"{r.equivalent} names {r.snomed_code} back")
        if not any(o.scp_codes == r.scp_codes for o in back):
            raise ValueError(f"{path} line {r.line}: equivalent codes {r.snomed_code} / {r.equivalent} map to "
                             f"different statements")
        # the rows naming each other must agree; a code may have rows of its own (the challenge coded PTB-XL SVARR
        # with 63593006 and PAC with its equivalent 284470004: PAC records are not SVARR)
        stmts = {(o.scp_codes, o.relation) for o in by_code[r.snomed_code] if o.equivalent == r.equivalent}
        other = {(o.scp_codes, o.relation) for o in by_code[r.equivalent] if o.equivalent == r.snomed_code}
        if stmts != other:
            raise ValueError(f"{path} line {r.line}: equivalent codes {r.snomed_code} / {r.equivalent} have different "
                             f"rows: {sorted(stmts ^ other)}")


def table_digest(path: str | Path | None = None) -> str:
    """Short sha256 of the table file (recorded with every mapping report)."""
    path = Path(path) if path is not None else scp_snomed_table_path()
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@dataclass
class _CodeFate:
    classes: tuple[str, ...]          # task classes the code gives (any position in the record)
    sole_classes: tuple[str, ...]     # task classes it gives when it is the record's only code
    statements: tuple[str, ...]       # every SCP statement the table links it to
    kind: str                         # mapped | outside_task | ambiguous
    suggests: tuple[str, ...] = ()    # task classes a form statement of the code suggests (unknown if not positive)
    spans: tuple[str, ...] = ()       # task classes of an ambiguous broader row (the code may stand for each of them)
    direct: tuple[str, ...] = ()      # SCP statements of its same / narrower rows (what it names, not may stand for)


def _clean_codes(codes: Iterable[Any]) -> list[str]:
    """A record's SNOMED codes as sorted distinct strings, blanks dropped (the one normalisation every method uses)."""
    return sorted({str(c).strip() for c in codes if str(c).strip()})


@dataclass(frozen=True)
class RecordSelection:
    """Which records of a set are scored for a task (:meth:`SnomedTaskMap.select`); records by their keys.

    Attributes:
        evaluable: the task classes some code of the records left after ``excluded`` reaches
            (:meth:`SnomedTaskMap.reached_classes`); the others are not evaluable on the set.
        evaluated: the records scored: a mapped label, and every evaluable label known.
        no_mapped_label: records left out: no code maps into the task (labels unknown, not negative).
        uncertain: ``{record: {class: codes}}`` left out: a mapped label, but the label of an evaluable class is
            unknown (:meth:`SnomedTaskMap.uncertain`).
        excluded: ``{reason: records}`` removed beforehand for other reasons (leakage...).
    """

    evaluable: list[str]
    evaluated: list[str]
    no_mapped_label: list[str]
    uncertain: dict[str, dict[str, list[str]]]
    excluded: dict[str, list[str]]


class SnomedTaskMap:
    """SNOMED CT codes -> the classes of one PTB-XL task (see the module docstring).

    Args:
        statement_classes: ``{SCP statement: task class}`` for the statements that count for the task (from
            :func:`ecgfm.data.readers.ptbxl_task_map`).
        classes: the task's class list (the trained head's outputs); classes outside ``statement_classes``'
            values are listed as having no code.
        rows: the table (default :func:`load_scp_snomed`).
        task: the task's name, for the report.
        suggestions: ``{form statement: task classes}`` it suggests (a class or a sequence of classes; see
            :data:`SUGGESTIVE_FORM_STATEMENTS`, the default for ``task="superdiagnostic"``; none for the other
            tasks).
    """

    def __init__(self, statement_classes: Mapping[str, str], classes: Sequence[str],
                 rows: Sequence[SnomedRow] | None = None, task: str = "",
                 suggestions: Mapping[str, str | Sequence[str]] | None = None):
        self.task = task
        if suggestions is None:
            suggestions = SUGGESTIVE_FORM_STATEMENTS if task == "superdiagnostic" else {}
        self.suggestions = {str(k): tuple(sorted({str(v)} if isinstance(v, str) else {str(c) for c in v}))
                            for k, v in suggestions.items()}
        self.classes = [str(c) for c in classes]
        self.statement_classes = {str(k): str(v) for k, v in statement_classes.items()}
        self.rows = list(rows) if rows is not None else load_scp_snomed()
        self.names = {r.snomed_code: r.snomed_name for r in self.rows}
        wanted = set(self.classes)
        per_code: dict[str, dict[str, set[str]]] = {}
        for r in self.rows:
            slot = per_code.setdefault(r.snomed_code, {"any": set(), "sole": set(), "stmts": set(), "amb": set(),
                                                       "suggests": set(), "direct": set()})
            slot["stmts"].update(r.scp_codes)
            if r.relation in ("same", "narrower"):
                slot["direct"].update(r.scp_codes)   # (a form statement that is a task class itself, as in the
                # "all" task, still suggests the other classes: uncertain() never calls a positive class unknown)
                slot["suggests"].update(c for s in r.scp_codes if s in self.suggestions
                                        for c in self.suggestions[s] if c in wanted)
            mapped = [self.statement_classes[s] for s in r.scp_codes if s in self.statement_classes]
            if r.relation == "broader":
                targets = set(mapped)
                if len(targets) == 1 and len(mapped) == len(r.scp_codes):
                    slot["any"].update(targets & wanted)
                elif mapped:  # statements spread over several classes, or partly outside the task
                    slot["amb"].update(targets)
            elif r.relation == "sole":
                slot["sole"].update(set(mapped) & wanted)
            else:
                slot["any"].update(set(mapped) & wanted)
        self.fates: dict[str, _CodeFate] = {}
        for code, slot in per_code.items():
            if slot["any"] or slot["sole"]:
                kind = "mapped"
            elif slot["amb"]:
                kind = "ambiguous"
            else:
                kind = "outside_task"
            self.fates[code] = _CodeFate(tuple(sorted(slot["any"])), tuple(sorted(slot["sole"])),
                                         tuple(sorted(slot["stmts"])), kind, tuple(sorted(slot["suggests"])),
                                         tuple(sorted(slot["amb"] & wanted)), tuple(sorted(slot["direct"])))

    def codes_of(self, cls: str) -> list[str]:
        """SNOMED codes that can make a record positive for ``cls`` (sole-rule codes included)."""
        return sorted(c for c, f in self.fates.items() if cls in f.classes or cls in f.sole_classes)

    def labels(self, codes: Iterable[str]) -> list[str]:
        """Task classes of a record with these SNOMED codes (sorted; empty: no mapped label)."""
        codes = _clean_codes(codes)
        out: set[str] = set()
        for c in codes:
            fate = self.fates.get(c)
            if fate is not None:
                out.update(fate.classes)
        if len(set(codes)) == 1:
            fate = self.fates.get(codes[0])
            if fate is not None:
                out.update(fate.sole_classes)
        sr = self.statement_classes.get("SR")
        if sr in out:   # a sinus-rhythm code beside a rhythm PTB-XL never labels with SR (RHYTHMS_EXCLUDING_SR)
            named = {st for c in codes if c in self.fates for st in self.fates[c].direct}
            if named & set(RHYTHMS_EXCLUDING_SR) and all(self.statement_classes.get(st) != sr
                                                          for st in named - {"SR"}):
                out.discard(sr)
        return sorted(out)

    def uncertain(self, codes: Iterable[str], evaluable: Iterable[str] | None = None) -> dict[str, list[str]]:
        """``{task class: codes}`` whose label is unknown for a record with these codes, and the record is not
        positive for the class: a code suggests it (:data:`SUGGESTIVE_FORM_STATEMENTS`), or a ``broader`` code
        spans several task classes, it among them (ambiguous: 164865005 myocardial infarction may be AMI, IMI, LMI
        or PMI of the subdiagnostic task, so none of them is a known negative). Empty: every label is known.

        Args:
            codes: the record's SNOMED CT codes.
            evaluable: only these classes count (None: all): a class no code of the set reaches is left out of every
                metric anyway (:meth:`reached_classes`), so a record need not be dropped for it (CPSC 2018's ST
                depression records when STTC cannot be scored there).
        """
        codes = _clean_codes(codes)
        positive = set(self.labels(codes))
        keep = None if evaluable is None else set(evaluable)
        out: dict[str, list[str]] = {}
        for c in codes:
            fate = self.fates.get(c)
            for cls in (sorted(set(fate.suggests) | set(fate.spans)) if fate is not None else ()):
                if cls not in positive and (keep is None or cls in keep):
                    out.setdefault(cls, []).append(c)
        return out

    def reached_classes(self, records: Iterable[Sequence[str]]) -> list[str]:
        """The task classes some code of these records reaches (a code mapped to the class, or its sole-code rule
        with that code alone in a record); the others are not evaluable on these records."""
        present: set[str] = set()
        sole_present: set[str] = set()
        for codes in records:
            codes = _clean_codes(codes)
            present.update(codes)
            if len(codes) == 1:
                sole_present.update(codes)
        return [c for c in self.classes if any(
            c in f.classes and code in present or c in f.sole_classes and code in sole_present
            for code, f in self.fates.items())]

    def select(self, records: Mapping[str, Sequence[str]],
               excluded: Mapping[str, Sequence[str]] | None = None) -> RecordSelection:
        """Which records are scored: the evaluable classes are decided on the records left after ``excluded``, and
        the :meth:`uncertain` rule is applied to those records with those classes (one decision for the scored set
        and its :meth:`report`).

        Args:
            records: ``{record key: SNOMED codes}`` of the records considered (before any exclusion).
            excluded: ``{reason: record keys}`` removed for other reasons (leakage...).
        """
        excluded = {k: sorted(set(map(str, v))) for k, v in (excluded or {}).items() if len(v)}
        dropped = {k for keys in excluded.values() for k in keys}
        kept = {str(key): _clean_codes(codes)
                for key, codes in records.items() if str(key) not in dropped}
        reached = self.reached_classes(kept.values())
        evaluated: list[str] = []
        no_label: list[str] = []
        uncertain: dict[str, dict[str, list[str]]] = {}
        for key, codes in kept.items():
            if not self.labels(codes):
                no_label.append(key)
            elif unknown := self.uncertain(codes, reached):
                uncertain[key] = unknown
            else:
                evaluated.append(key)
        return RecordSelection(reached, evaluated, no_label, uncertain, excluded)

    def report(self, records: Mapping[str, Sequence[str]], excluded: Mapping[str, Sequence[str]] | None = None,
               examples: int = 10, selection: RecordSelection | None = None) -> dict[str, Any]:
        """How the codes of some records map into the task (JSON-able).

        Args:
            records: ``{record key: SNOMED codes}`` of the records considered (before any exclusion).
            excluded: ``{reason: record keys}`` removed from evaluation for other reasons (leakage...): they are
                counted under that reason and left out of the class and code counts.
            examples: record keys listed per group.
            selection: :meth:`select` of these records and exclusions, when the caller already made it (the scored
                set it built is then exactly the one reported); None: made here.

        Returns:
            ``classes`` (per mapped class: codes, positives), ``classes_without_code`` (no code of the table reaches
            them), ``not_evaluable_classes`` (no code present in the records considered reaches them: they include
            ``classes_without_code``; an external set's metrics leave them out), ``classes_without_positives`` (a
            code exists, no record has it),
            ``codes`` (``mapped`` / ``outside_task`` / ``ambiguous`` / ``unknown``: per code its name, classes or
            statements and record count; ``suggests`` / ``spans``: the classes it leaves unknown when not positive),
            ``records`` (total, evaluated, ``no_mapped_label`` (excluded: their
            labels are unknown for this task, they are not negatives), ``partially_mapped`` (evaluated, but also
            carrying an unknown or ambiguous code: some negatives may be missed positives), ``uncertain`` (left out,
            with a mapped label: a code suggests a class, or an ambiguous code spans it, and they are not positive
            for it; ``uncertain_codes`` counts them per class and code), excluded per reason).
        """
        sel = selection if selection is not None else self.select(records, excluded)
        dropped = {k for keys in sel.excluded.values() for k in keys}
        code_of = {str(key): _clean_codes(codes)
                   for key, codes in records.items()}
        code_records: Counter[str] = Counter(c for key, codes in code_of.items() if key not in dropped
                                             for c in codes)
        positives: Counter[str] = Counter(c for key in sel.evaluated for c in self.labels(code_of[key]))
        partial = [key for key in sel.evaluated if any(self.fates.get(c) is None or self.fates[c].kind == "ambiguous"
                                                       for c in code_of[key])]
        uncertain_codes: dict[str, Counter[str]] = {}
        for unknown in sel.uncertain.values():
            for cls, cs in unknown.items():
                uncertain_codes.setdefault(cls, Counter()).update(cs)
        classes = {c: {"snomed_codes": self.codes_of(c), "positives": int(positives.get(c, 0))}
                   for c in self.classes if self.codes_of(c)}
        codes_out: dict[str, dict[str, Any]] = {"mapped": {}, "outside_task": {}, "ambiguous": {}, "unknown": {}}
        for code, n in sorted(code_records.items(), key=lambda kv: (-kv[1], kv[0])):
            fate = self.fates.get(code)
            if fate is None:
                codes_out["unknown"][code] = {"records": int(n)}
                continue
            entry: dict[str, Any] = {"name": self.names.get(code, ""), "records": int(n)}
            if fate.kind == "mapped":
                entry["classes"] = list(fate.classes)
                if fate.sole_classes:
                    entry["classes_when_sole_code"] = list(fate.sole_classes)
            else:
                entry["statements"] = list(fate.statements)
            if fate.suggests:
                entry["suggests"] = list(fate.suggests)
            if fate.spans:
                entry["spans"] = list(fate.spans)
            codes_out[fate.kind][code] = entry
        return {
            "vocabulary": f"SNOMED CT -> PTB-XL {self.task}".strip(),
            "table": "ecgfm/data/scp_snomed.csv", "table_sha256": table_digest(),
            "classes": classes,
            "classes_without_code": [c for c in self.classes if not self.codes_of(c)],
            "not_evaluable_classes": [c for c in self.classes if c not in sel.evaluable],
            "classes_without_positives": [c for c, v in classes.items() if v["positives"] == 0],
            "codes": codes_out,
            "records": {
                "total": len(records), "evaluated": len(sel.evaluated),
                "no_mapped_label": len(sel.no_mapped_label),
                "no_mapped_label_examples": sel.no_mapped_label[:examples],
                "partially_mapped": len(partial), "partially_mapped_examples": partial[:examples],
                "uncertain": len(sel.uncertain), "uncertain_examples": list(sel.uncertain)[:examples],
                "uncertain_codes": {c: dict(sorted(n.items())) for c, n in sorted(uncertain_codes.items())},
                "excluded": {k: len(v) for k, v in sel.excluded.items()},
                "excluded_examples": {k: v[:examples] for k, v in sel.excluded.items()},
            },
        }


def snomed_task_map(task: str, label_root: str | Path, classes: Sequence[str]) -> SnomedTaskMap:
    """The :class:`SnomedTaskMap` of a PTB-XL task, from ``scp_statements.csv`` in ``label_root``.

    Args:
        task: a PTB-XL task (:data:`ecgfm.data.readers.PTBXL_TASKS`), e.g. ``"superdiagnostic"``.
        label_root: the PTB-XL folder holding ``scp_statements.csv``.
        classes: the task's classes (the trained head's outputs).
    """
    from ecgfm.data.readers import load_scp_statements, ptbxl_task_map

    statements = load_scp_statements(label_root)
    task_map = ptbxl_task_map(statements, task)
    suggestions = None if task == "superdiagnostic" else derived_suggestions(
        task_map, ptbxl_task_map(statements, "superdiagnostic"))
    return SnomedTaskMap(task_map, classes, task=task, suggestions=suggestions)


def derived_suggestions(task_map: Mapping[str, str], superclass_of: Mapping[str, str]
                        ) -> dict[str, tuple[str, ...]]:
    """:data:`SUGGESTIVE_FORM_STATEMENTS` for a finer task: a form statement suggesting superclass S suggests every
    task class whose statements all belong to S (subdiagnostic STTC -> NST_, STTC, ISC_, ISCA, ISCI; diagnostic:
    the statements themselves). If a record's STTC label is unknown, so is each STTC subclass it is not positive
    for; before 2026-12-07 only the superdiagnostic task left such records out, the finer tasks scored them as
    negatives.

    Args:
        task_map: ``{SCP statement: task class}`` of the task.
        superclass_of: ``{SCP statement: superdiagnostic class}``.
    """
    statements_of: dict[str, set[str]] = {}
    for stmt, cls in task_map.items():
        statements_of.setdefault(cls, set()).add(stmt)
    family: dict[str, set[str]] = {}
    for cls, stmts in statements_of.items():
        supers = {superclass_of.get(s) for s in stmts}
        if len(supers) == 1 and None not in supers:
            family.setdefault(next(iter(supers)), set()).add(cls)
    out = {form: tuple(sorted(set().union(*(family.get(sup, set()) for sup in supers))))
           for form, supers in SUGGESTIVE_FORM_STATEMENTS.items()}
    return {form: classes for form, classes in out.items() if classes}


def summary_lines(report: Mapping[str, Any], top: int = 8) -> list[str]:
    """A few printable lines of a :meth:`SnomedTaskMap.report`."""
    rec = report["records"]
    cls = ", ".join(f"{c} {v['positives']}" for c, v in report["classes"].items()) or "none"
    out = [f"{report['vocabulary']}: {rec['evaluated']} of {rec['total']} records evaluated; positives per class: "
           f"{cls}"]
    gone = report.get("not_evaluable_classes", report["classes_without_code"])
    if gone:
        out.append(f"  not evaluable (no SNOMED code of these records maps to them): {', '.join(gone)}")
    if report["classes_without_positives"]:
        out.append(f"  no positive record: {', '.join(report['classes_without_positives'])}")
    if rec["no_mapped_label"]:
        out.append(f"  {rec['no_mapped_label']} record(s) without a mapped label left out (unknown labels, not "
                   f"negatives), e.g. {', '.join(rec['no_mapped_label_examples'][:3])}")
    if rec.get("uncertain"):
        per = "; ".join(f"{c} <- {', '.join(n)}" for c, n in rec["uncertain_codes"].items())
        out.append(f"  {rec['uncertain']} record(s) with a code suggesting a class they are not positive for (a form "
                   f"code, or a broader code spanning several classes) left out (label unknown, not negative): {per}")
    if rec["partially_mapped"]:
        out.append(f"  {rec['partially_mapped']} evaluated record(s) also carry unmapped codes")
    for reason, n in rec["excluded"].items():
        out.append(f"  {n} record(s) excluded: {reason}")
    for kind in ("unknown", "ambiguous", "outside_task"):
        codes = report["codes"][kind]
        if codes:
            shown = ", ".join(f"{c}{' ' + v['name'] if v.get('name') else ''} x{v['records']}"
                              for c, v in list(codes.items())[:top])
            more = f" (+{len(codes) - top} more)" if len(codes) > top else ""
            out.append(f"  codes {kind.replace('_', ' ')}: {shown}{more}")
    return out
