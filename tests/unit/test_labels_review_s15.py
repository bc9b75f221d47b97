"""Review s15 of the external validation across label vocabularies (ecgfm/data/labelmaps.py, scp_snomed.csv):

1. form-only ST/T and Q-wave codes suggest a superclass: a record carrying one and not positive for that class has an
   unknown label, so it is left out (counted as ``records.uncertain``), never scored as a negative;
2. the classes an external set cannot carry are computed from the codes its records hold, not from the whole table,
   and are left out of every external metric (Fmax included);
3. codes the table declares equivalent map to the same statements.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ecgfm.data.labelmaps import (
    SnomedTaskMap,
    load_scp_snomed,
    snomed_task_map,
    summary_lines,
)

SUPER = ["CD", "HYP", "MI", "NORM", "STTC"]
RBBB, STD, STE, TINV, TAB, QAB = "59118001", "429622005", "164931005", "59931005", "164934002", "164917005"
NSR, AF, IAVB, LBBB, PAC, PVC, MI, NST, LVH = ("426783006", "164889003", "270492004", "164909002", "284470004",
                                               "164884008", "164865005", "55930002", "164873001")


@pytest.fixture(scope="module")
def statements_root(fixture_dir: Path) -> Path:
    return fixture_dir / "ptbxl"


@pytest.fixture(scope="module")
def super_map(statements_root) -> SnomedTaskMap:
    return snomed_task_map("superdiagnostic", statements_root, SUPER)


# --- 1. form codes that suggest a superclass -------------------------------------------------------------------

def test_suggestive_form_statements_are_form_only_in_ptbxl(statements_root):
    from ecgfm.data.labelmaps import SUGGESTIVE_FORM_STATEMENTS
    from ecgfm.data.readers import load_scp_statements, ptbxl_task_map

    sup = ptbxl_task_map(load_scp_statements(statements_root), "superdiagnostic")
    for stmt, classes in SUGGESTIVE_FORM_STATEMENTS.items():   # a statement may suggest several classes (s18)
        assert stmt not in sup and classes and set(classes) <= set(SUPER), stmt


@pytest.mark.parametrize("codes, unknown", [
    ([RBBB, STD], {"HYP": [STD], "STTC": [STD]}),   # RBBB + ST depression: CD, but STTC (and HYP, s18) unknown
    ([RBBB, TINV], {"MI": [TINV], "STTC": [TINV]}),  # T inversion also suggests MI (s18)
    ([RBBB, TAB, STE], {"STTC": [STE, TAB]}),
    ([IAVB, QAB], {"MI": [QAB]}),            # Q waves suggest MI
    ([MI, QAB], {}),                         # ...known when the record is MI
    ([RBBB, STD, NST], {"HYP": [STD]}),      # ...and STTC known when an STTC code is there (HYP still unknown)
    ([RBBB], {}),
])
def test_uncertain_labels(super_map, codes, unknown):
    assert super_map.uncertain(codes) == unknown


def test_finer_tasks_derive_the_suggestions_of_their_superclass(statements_root):
    """Stated for superdiagnostic; since 2026-12-07 a finer task's classes inside a suggested superclass are unknown
    too (they were scored as clean negatives: test_snomed_review_s24)."""
    sub = snomed_task_map("subdiagnostic", statements_root, ["CRBBB", "NST_", "STTC", "IMI"])
    assert sub.uncertain([RBBB, STD]) == {"NST_": [STD], "STTC": [STD]} and sub.uncertain([RBBB, QAB]) == {"IMI": [QAB]}


def test_report_leaves_uncertain_records_out_and_counts_them(super_map):
    records = {
        "a": [RBBB, STD],     # CD, STTC unknown -> left out, counted as uncertain (was: scored, STTC negative)
        "b": [RBBB],          # CD, scored
        "c": [IAVB, QAB],     # CD, MI unknown -> uncertain
        "d": [STD],           # nothing mapped -> no_mapped_label (as before)
        "e": [MI, QAB],       # MI, scored
        "f": [NSR],           # NORM, scored
        "g": [NST],           # STTC, scored: a code of the set reaches STTC, so its labels can be scored
    }
    rep = super_map.report(records)
    r = rep["records"]
    assert (r["total"], r["evaluated"], r["no_mapped_label"], r["uncertain"]) == (7, 4, 1, 2)
    assert sorted(r["uncertain_examples"]) == ["a", "c"]
    assert r["uncertain_codes"] == {"MI": {QAB: 1}, "STTC": {STD: 1}}
    assert {c: v["positives"] for c, v in rep["classes"].items()}["CD"] == 1      # only "b"
    assert rep["codes"]["outside_task"][STD]["suggests"] == ["HYP", "STTC"]
    assert "suggesting a class" in "\n".join(summary_lines(rep))


def test_build_task_leaves_uncertain_records_out_of_the_splits(monkeypatch, super_map, statements_root):
    """The scored set follows the same rule (records with no mapped label were already left out). Since s18 the rule
    is applied by build_external, after the non-external records are excluded (the evaluable classes depend on
    them), to the scored records and the report alike."""
    import pandas as pd

    import ecgfm.data.cache as cache_mod
    import ecgfm.evaluate.tasks as tasks

    codes = [[RBBB, STD], [RBBB], [NSR], [AF], [LVH], [MI, QAB], [IAVB, QAB], [NST]]
    n = len(codes)
    index = pd.DataFrame({"meta": [{}] * n, "patient_id": [f"p{i}" for i in range(n)], "labels": [()] * n,
                          "record_id": [f"E{i}" for i in range(n)], "source": ["challenge2021"] * n})
    fake = SimpleNamespace(index=index, keys=[f"challenge2021/E{i}" for i in range(n)], fs=100.0)
    monkeypatch.setattr(tasks, "prepare_task_cache", lambda *a, **k: "/nowhere")
    monkeypatch.setattr(cache_mod, "CorpusCache", lambda d: fake)
    monkeypatch.setattr(tasks, "external_codes", lambda spec, cache: codes)
    spec = SimpleNamespace(name="ext", dataset="ext", sources=[], classes=None, multilabel=True, labels="record",
                           split={"kind": "all"}, min_count=1, crop_seconds=10.0, stride_seconds=10.0,
                           params={"label_map": "ptbxl:superdiagnostic", "label_root": str(statements_root)})
    monkeypatch.setattr(tasks, "_check_split_classes", lambda *a, **k: None)
    task_index = pd.DataFrame({"source": ["ptbxl"] * 3, "record_id": ["1", "2", "3"], "patient_id": ["1", "2", "3"],
                               "meta": [{}] * 3})
    task = SimpleNamespace(class_names=SUPER, name="ptbxl_super", dataset="ptbxl",
                           spec=SimpleNamespace(label_root=str(statements_root), labels="ptbxl:superdiagnostic"),
                           splits={"train": np.array([0]), "val": np.array([1]), "test": np.array([2])},
                           cache=SimpleNamespace(index=task_index))
    ext = tasks.build_external(spec, task, "/nowhere", SimpleNamespace(fs=100.0))
    assert ext.splits["test"].tolist() == [1, 2, 4, 5, 7]    # 0 and 6 uncertain, 3 (AF only) without a label
    assert any("suggesting a class" in n for n in ext.notes)


# --- 2. not-evaluable classes from the set's own codes ---------------------------------------------------------

def test_not_evaluable_classes_follow_the_codes_present(super_map):
    # CPSC 2018's nine classes (as the challenge coded them): none reaches HYP, MI or STTC
    cpsc = {f"r{i}": [c] for i, c in enumerate([NSR, AF, IAVB, LBBB, RBBB, PAC, PVC, STD, STE])}
    cpsc.update({"m1": [RBBB, NSR], "m2": [IAVB, LBBB]})
    rep = super_map.report(cpsc)
    assert rep["classes_without_code"] == []                 # the table reaches every class...
    assert rep["not_evaluable_classes"] == ["HYP", "MI", "STTC"]   # ...this set's codes do not
    assert "HYP, MI, STTC" in "\n".join(summary_lines(rep))
    # a sole-rule class counts only when its code is some record's only code
    assert "NORM" in super_map.report({"a": [RBBB, NSR]})["not_evaluable_classes"]
    assert "NORM" not in super_map.report({"a": [NSR]})["not_evaluable_classes"]
    # codes of excluded records are not the set's codes
    assert "HYP" in super_map.report({"a": [RBBB], "b": [LVH]}, excluded={"leak": ["b"]})["not_evaluable_classes"]


def test_fmax_leaves_out_classes_the_set_cannot_carry(super_map):
    from ecgfm.evaluate.metrics import evaluate_scores
    from ecgfm.evaluate.sweep import score_external

    recs = {f"k{i}": ([RBBB] if i < 20 else [NSR]) for i in range(40)}   # codes reach CD and NORM only
    rep = super_map.report(recs)
    y = np.zeros((40, 5), np.float32)
    y[:20, 0] = 1
    y[20:, 3] = 1
    rng = np.random.default_rng(0)
    p = np.clip(y * 0.6 + rng.uniform(0, 0.4, y.shape), 0, 1)
    p[:20, 4] = 0.95                                          # the head says STTC on the RBBB records
    task = SimpleNamespace(multilabel=True, class_names=SUPER)
    got = score_external(task, SimpleNamespace(labels=y, label_report=rep), np.arange(40), p, np.full(5, 0.5),
                         n_boot=20, seed=0)
    assert got["not_evaluable_classes"] == ["HYP", "MI", "STTC"]
    keep = [0, 3]
    without = evaluate_scores(y[:, keep], p[:, keep], True, ["CD", "NORM"], np.full(2, 0.5), n_boot=20, seed=0)
    assert got["fmax"]["value"] == pytest.approx(without["fmax"]["value"])
    assert got["macro_f1"]["value"] == pytest.approx(without["macro_f1"]["value"])
    charged = evaluate_scores(y, p, True, SUPER, np.full(5, 0.5), n_boot=20, seed=0)
    assert charged["fmax"]["value"] < without["fmax"]["value"]


# --- 3. equivalent codes --------------------------------------------------------------------------------------

def _header_equivalences(rows) -> set[tuple[str, str]]:
    return {tuple(sorted((r.snomed_code, r.equivalent))) for r in rows if r.equivalent}


def test_equivalent_codes_map_to_the_same_statements(statements_root):
    rows = load_scp_snomed()
    pairs = _header_equivalences(rows)
    assert ("284470004", "63593006") in pairs
    for a, b in pairs:   # the rows naming each other (a code may have rows of its own: 63593006 -> SVARR)
        assert ({(r.scp_codes, r.relation) for r in rows if r.snomed_code == a and r.equivalent == b}
                == {(r.scp_codes, r.relation) for r in rows if r.snomed_code == b and r.equivalent == a}), (a, b)
    for task, classes in [("rhythm", ["SVARR", "AFIB", "SR"]), ("form", ["PAC", "PVC", "STD_"]),
                          ("superdiagnostic", SUPER), ("diagnostic", ["CRBBB", "CLBBB", "NORM"])]:
        m = snomed_task_map(task, statements_root, classes)
        for a, b in pairs:
            own = {"SVARR"} if {a, b} == {"284470004", "63593006"} else set()   # PTB-XL SVARR: 63593006 only
            assert set(m.labels([a])) - own == set(m.labels([b])) - own, (task, a, b)


def test_loader_rejects_equivalent_codes_with_different_statements(tmp_path):
    from ecgfm.data.labelmaps import scp_snomed_table_path

    text = scp_snomed_table_path().read_text(encoding="utf-8")
    bad = text.replace("284470004,premature atrial contraction,PAC,PAC,same", "284470004,premature atrial contraction,"
                                                                             "PAC,PVC,same")
    assert bad != text
    path = tmp_path / "t.csv"
    path.write_text(bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="equivalent"):
        load_scp_snomed(path)


def test_records_are_not_dropped_for_a_class_the_set_cannot_score(statements_root):
    """CPSC 2018-like set: ST depression suggests STTC, but no code of the set reaches STTC (not evaluable, out of
    every metric), so RBBB + STD records stay scored (they used to be left out as uncertain for nothing)."""
    m = snomed_task_map("superdiagnostic", statements_root, SUPER)
    rbbb, std = RBBB, STD
    assert "STTC" in m.uncertain([rbbb, std])                      # alone, the label is unknown
    assert "STTC" not in m.reached_classes([[rbbb, std], [rbbb]])
    assert m.uncertain([rbbb, std], m.reached_classes([[rbbb, std], [rbbb]])) == {}
    rep = m.report({"a": [rbbb, std], "b": [rbbb]})
    assert rep["records"]["uncertain"] == 0 and rep["records"]["evaluated"] == 2
    assert "STTC" in rep["not_evaluable_classes"]


def test_cpsc_records_without_a_reference_row_are_warned(tmp_path, caplog):
    """A REFERENCE.csv that lacks some records read them as "no mapped label" without a word (a partial or another
    set's table quietly shrank the scored set)."""
    import logging
    from types import SimpleNamespace

    from ecgfm.evaluate.tasks import external_codes

    table = tmp_path / "REFERENCE.csv"
    table.write_text("Recording,First_label,Second_label,Third_label\nA0001,1,,\nA0002,2,,\n")
    cache = SimpleNamespace(index={"record_id": ["A0001", "A0002", "A0003", "A0004"], "labels": [()] * 4,
                                   "meta": [{}] * 4})
    spec = SimpleNamespace(params={"cpsc2018_reference": str(table)})
    with caplog.at_level(logging.WARNING, logger="ecgfm.evaluate.tasks"):
        codes = external_codes(spec, cache)
    assert codes[2] == codes[3] == [] and codes[0] and codes[1]
    assert any("no row for 2 of the 4 records (e.g. A0003, A0004)" in r.getMessage() for r in caplog.records)
