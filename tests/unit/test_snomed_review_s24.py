"""SCP <-> SNOMED mapping review (2026-12-07): three ways a PTB-XL head was scored on wrong external labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgfm.data.labelmaps import SUGGESTIVE_FORM_STATEMENTS, derived_suggestions, snomed_task_map

SR, SINUS_BRADY, PAC, SVPB = "426783006", "426177001", "284470004", "63593006"
T_ABNORMAL, ST_DEPRESSION, Q_WAVE, IVCD, IRBBB = "164934002", "429622005", "164917005", "698252002", "713426002"


@pytest.fixture(scope="module")
def root(fixture_dir: Path) -> Path:
    return fixture_dir / "ptbxl"


def test_premature_atrial_contractions_are_not_svarr(root):
    rhythm = snomed_task_map("rhythm", root, ["SR", "SVARR", "AFIB"])
    assert rhythm.labels([SR, PAC]) == ["SR"]              # was ["SR", "SVARR"]: every PAC record an SVARR positive
    assert rhythm.labels([SVPB]) == ["SVARR"]             # the challenge's code for PTB-XL SVARR still gives it
    every = snomed_task_map("all", root, ["SR", "SVARR", "PAC"])
    assert every.labels([PAC]) == ["PAC"] and every.labels([SVPB]) == ["PAC", "SVARR"]


def test_t_wave_abnormal_is_no_tab_positive(root):
    form = snomed_task_map("form", root, ["TAB_", "NT_", "NDT", "INVT"])
    assert form.labels([SR, T_ABNORMAL]) == []             # was ["TAB_"] (HR06000 is PTB-XL NT_)
    assert set(form.uncertain([SR, T_ABNORMAL])) == {"TAB_", "NT_", "NDT"}
    sup = snomed_task_map("superdiagnostic", root, ["NORM", "MI", "STTC", "CD", "HYP"])
    assert sup.uncertain([IVCD, T_ABNORMAL]) == {"STTC": [T_ABNORMAL]}   # unchanged: STTC unknown


def test_finer_tasks_leave_out_the_subclasses_of_a_suggested_superclass(root):
    sub = snomed_task_map("subdiagnostic", root, ["NST_", "STTC", "ISCA", "ISCI", "ISC_", "IVCD", "IRBBB", "AMI",
                                                  "IMI", "LVH"])
    assert sub.labels([IVCD, T_ABNORMAL]) == ["IVCD"]
    assert "STTC" in sub.uncertain([IVCD, T_ABNORMAL])
    left = sub.uncertain([IRBBB, ST_DEPRESSION])          # was {}: NST_, STTC, ISC_... scored as clean negatives
    assert {"NST_", "STTC", "ISCA", "ISCI", "ISC_", "LVH"} <= set(left) and "IRBBB" not in left
    assert set(sub.uncertain([IRBBB, Q_WAVE])) == {"AMI", "IMI"}
    # the rule: a subclass whose statements all lie in the suggested superclass; CD classes never
    fam = derived_suggestions({"NST_": "NST_", "ISCAL": "ISCA", "IRBBB": "IRBBB"},
                              {"NST_": "STTC", "ISCAL": "STTC", "IRBBB": "CD"})
    assert fam["STD_"] == ("ISCA", "NST_") and "QWAVE" not in fam
    assert set(SUGGESTIVE_FORM_STATEMENTS) >= set(fam)
