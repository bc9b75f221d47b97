"""SCP <-> SNOMED CT table (ecgfm/data/scp_snomed.csv) and its translation into PTB-XL task classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgfm.data.labelmaps import (
    CPSC2018_CLASSES,
    RELATIONS,
    SnomedTaskMap,
    load_scp_snomed,
    scp_snomed_table_path,
    snomed_task_map,
    summary_lines,
)
from ecgfm.data.readers.physionet import CHALLENGE_EQUIVALENT_CODES

SUPER = ["CD", "HYP", "MI", "NORM", "STTC"]


@pytest.fixture(scope="module")
def rows():
    return load_scp_snomed()


@pytest.fixture(scope="module")
def statements_root(fixture_dir: Path) -> Path:
    return fixture_dir / "ptbxl"


def test_table_is_package_data_and_well_formed(rows):
    assert scp_snomed_table_path().is_file()
    assert scp_snomed_table_path().parent.name == "data"
    assert len(rows) >= 60
    for r in rows:
        assert r.snomed_code.isdigit(), r
        assert r.relation in RELATIONS
        assert r.snomed_name and r.abbreviation
        assert (len(r.scp_codes) > 1) == (r.relation == "broader")


def test_no_contradicting_direct_rows(rows):
    """A code's same / narrower rows name distinct statements; name and CPSC class agree across a code's rows."""
    by_code: dict[str, list] = {}
    for r in rows:
        by_code.setdefault(r.snomed_code, []).append(r)
    for code, group in by_code.items():
        direct = [r.scp_codes[0] for r in group if r.relation in ("same", "narrower")]
        assert len(direct) == len(set(direct)), code
        assert len({r.snomed_name for r in group}) == 1, code
        assert len({r.cpsc2018 for r in group}) == 1, code


def test_equivalents_symmetric_and_match_the_reader(rows):
    equiv = {(r.snomed_code, r.equivalent) for r in rows if r.equivalent}
    assert equiv, "the challenge's equivalent classes are recorded"
    for a, b in equiv:
        assert (b, a) in equiv, f"{a} ~ {b} is not symmetric"
    # the reader merges the challenge's equivalent pairs; the table records each of them
    for a, b in CHALLENGE_EQUIVALENT_CODES.items():
        assert (a, b) in equiv and (b, a) in equiv, (a, b)
        stmts_a = {r.scp_codes for r in rows if r.snomed_code == a and r.equivalent == b}
        stmts_b = {r.scp_codes for r in rows if r.snomed_code == b and r.equivalent == a}
        assert stmts_a == stmts_b


def test_cpsc2018_classes_each_have_one_code(rows):
    coded = {}
    for r in rows:
        if r.cpsc2018:
            coded.setdefault(r.cpsc2018, set()).add(r.snomed_code)
    assert set(coded) == set(CPSC2018_CLASSES)
    assert all(len(v) == 1 for v in coded.values()), coded


def test_every_statement_exists_in_ptbxl(rows, statements_root):
    from ecgfm.data.readers import load_scp_statements

    known = set(load_scp_statements(statements_root).index)
    unknown = {s for r in rows for s in r.scp_codes} - known
    assert not unknown, f"statements not in scp_statements.csv: {sorted(unknown)}"


@pytest.mark.parametrize("body, match", [
    ("12ab,x,X,NORM,same,name,,,,\n", "not numeric"),
    ("1,x,X,NORM,same,name,,,,\n1,x,X,NORM,same,name,,,,\n", "duplicates"),
    ("1,x,X,NORM,same,name,,2,,\n2,y,Y,NORM,same,name,,,,\n", "names 1 back"),
    ("1,x,X,NORM,same,name,,2,,\n2,y,Y,SR,same,name,,1,,\n", "different statements"),
    ("1,x,X,NORM SR,same,name,,,,\n", "one statement"),
    ("1,x,X,NORM,similar,name,,,,\n", "relation"),
    ("1,x,X,NORM,same,name,,,Foo,\n", "CPSC 2018 class"),
])
def test_loader_rejects_bad_tables(tmp_path, body, match):
    header = ("# comment\nsnomed_code,snomed_name,abbreviation,scp_codes,relation,evidence,challenge_ptbxl_n,"
              "equivalent,cpsc2018,note\n")
    path = tmp_path / "t.csv"
    path.write_text(header + body)
    with pytest.raises(ValueError, match=match):
        load_scp_snomed(path)


@pytest.fixture(scope="module")
def super_map(statements_root) -> SnomedTaskMap:
    return snomed_task_map("superdiagnostic", statements_root, SUPER)


@pytest.mark.parametrize("codes, expected", [
    (["164865005"], ["MI"]),                       # myocardial infarction: every MI statement is superclass MI
    (["54329005"], ["MI"]),                        # anterior MI -> AMI
    (["426783006"], ["NORM"]),                     # sinus rhythm alone -> normal ECG
    (["426783006", "427084000"], []),              # sinus rhythm + sinus tachycardia: not 'alone', STACH is rhythm
    (["426783006", "164873001"], ["HYP"]),         # sinus rhythm + LVH: not normal
    (["164889003"], []),                           # atrial fibrillation: a rhythm statement, no superclass
    (["713427006", "111975006"], ["CD", "STTC"]),  # CRBBB + prolonged QT (LNGQT is STTC)
    (["59118001"], ["CD"]),                        # RBBB, the challenge's equivalent of CRBBB
    (["733534002"], ["CD"]),                       # complete LBBB, equivalent of LBBB
    (["266249003"], ["HYP"]),                      # ventricular hypertrophy: LVH / RVH / SEHYP all HYP
    (["164861001"], ["STTC"]),                     # myocardial ischemia: the ISC* statements, all STTC
    (["55827005"], []),                            # LV high voltage: left out of the table (unverified)
    ([], []),
])
def test_superdiagnostic_labels(super_map, codes, expected):
    assert super_map.labels(codes) == expected


def test_statement_level_tasks_map_class_by_class(statements_root):
    diag = snomed_task_map("diagnostic", statements_root, ["IMI", "AMI", "2AVB", "CRBBB", "NORM"])
    assert diag.labels(["164865005"]) == []          # MI in general names no single statement: ambiguous
    assert diag.fates["164865005"].kind == "ambiguous"
    assert diag.labels(["54329005"]) == ["AMI"]
    assert diag.labels(["54016002"]) == ["2AVB"]     # Mobitz I is a second degree AV block
    assert diag.labels(["59118001", "426783006"]) == ["CRBBB"]
    sub = snomed_task_map("subdiagnostic", statements_root, ["IMI", "AMI", "LMI", "PMI"])
    assert sub.labels(["164865005"]) == [] and sub.fates["164865005"].kind == "ambiguous"
    rhythm = snomed_task_map("rhythm", statements_root, ["AFIB", "SR", "STACH", "BIGU"])
    # sinus rhythm + sinus tachycardia is STACH alone, as PTB-XL labels it (["SR", "STACH"] before 2026-12-07:
    # labelmaps.RHYTHMS_EXCLUDING_SR)
    assert rhythm.labels(["426783006", "427084000"]) == ["STACH"]
    assert rhythm.labels(["426783006"]) == ["SR"]
    assert rhythm.labels(["11157007"]) == ["BIGU"]
    assert rhythm.fates["164865005"].kind == "outside_task"


def test_report_lists_unmapped_classes_codes_and_records(super_map):
    records = {
        "a": ["426783006"],                  # NORM
        "b": ["164865005", "55827005"],      # MI, plus a code unknown to the table
        "c": ["164889003"],                  # AF only: no superdiagnostic label -> left out, not negative
        "d": ["55827005"],                   # unknown only -> left out
        "e": ["713427006"],                  # excluded for another reason
    }
    rep = super_map.report(records, excluded={"leak": ["e"]})
    assert rep["classes"]["NORM"] == {"snomed_codes": ["426783006"], "positives": 1}
    assert rep["classes"]["MI"]["positives"] == 1
    assert set(rep["classes_without_positives"]) == {"CD", "HYP", "STTC"}
    assert rep["classes_without_code"] == []
    assert rep["codes"]["unknown"] == {"55827005": {"records": 2}}
    assert rep["codes"]["outside_task"]["164889003"]["statements"] == ["AFIB"]
    assert "713427006" not in rep["codes"]["mapped"]  # the excluded record's codes are not counted
    r = rep["records"]
    assert (r["total"], r["evaluated"], r["no_mapped_label"], r["partially_mapped"]) == (5, 2, 2, 1)
    assert sorted(r["no_mapped_label_examples"]) == ["c", "d"] and r["excluded"] == {"leak": 1}
    text = "\n".join(summary_lines(rep))
    assert "55827005 x2" in text and "left out" in text and "leak" in text


def test_classes_without_code_are_listed(statements_root):
    m = snomed_task_map("diagnostic", statements_root, ["AMI", "DIG", "EL"])
    rep = m.report({"a": ["54329005"]})
    assert rep["classes_without_code"] == ["DIG", "EL"]
    assert list(rep["classes"]) == ["AMI"]


def test_cpsc2018_reference_table(tmp_path):
    from ecgfm.evaluate.tasks import _cpsc2018_codes

    ref = tmp_path / "REFERENCE.csv"
    ref.write_text("Recording,First_label,Second_label,Third_label\nX1,1,,\nX2,5,8,\nX3,AF,,\n")
    assert _cpsc2018_codes(str(ref)) == {"X1": ["426783006"], "X2": ["429622005", "59118001"],
                                         "X3": ["164889003"]}
    ref.write_text("Recording,First_label\nX1,10\n")
    with pytest.raises(ValueError, match="line 2"):
        _cpsc2018_codes(str(ref))
    ref.write_text("X1,1,,\nX3,AF,,\n")                    # no header row: the first record is a record
    assert _cpsc2018_codes(str(ref)) == {"X1": ["426783006"], "X3": ["164889003"]}
