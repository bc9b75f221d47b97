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


def test_sinus_rhythm_beside_a_rhythm_excluding_sr_is_not_sr(root):
    """PTB-XL never labels SR beside SBRAD / STACH / SARRH / AFIB / PACE; the challenge coded those sinus rhythms
    with 426783006 too (HR06002: 426783006 + sinus bradycardia, PTB-XL SBRAD alone, was scored SR and SBRAD)."""
    import pandas as pd

    rhythm = snomed_task_map("rhythm", root, ["SR", "SBRAD", "STACH", "AFIB"])
    assert rhythm.labels([SR, SINUS_BRADY, IRBBB]) == ["SBRAD"]
    assert rhythm.labels([SR, "427084000"]) == ["STACH"]
    assert rhythm.labels([SR]) == ["SR"] and rhythm.labels([SR, IRBBB]) == ["SR"] and rhythm.labels([SR, PAC]) == ["SR"]
    sup = snomed_task_map("superdiagnostic", root, ["NORM", "MI", "STTC", "CD", "HYP"])
    assert sup.labels([SR]) == ["NORM"] and sup.labels([SR, SINUS_BRADY]) == []      # unchanged there
    # the rule's evidence in the fixture copy: no SR record carries one of those rhythms
    from ast import literal_eval

    from ecgfm.data.labelmaps import RHYTHMS_EXCLUDING_SR

    db = pd.read_csv(root / "ptbxl_database.csv")
    codes = [set(literal_eval(c)) for c in db["scp_codes"]]
    assert not any("SR" in c and c & set(RHYTHMS_EXCLUDING_SR) for c in codes)
