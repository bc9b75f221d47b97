"""Leakage guard: shared records / patients between pretraining and test, across datasets."""

from __future__ import annotations

import pandas as pd
import pytest

from ecgfm.evaluate.leakage import (
    LeakageError,
    check_leakage,
    index_identities,
    keys_identities,
    pretrain_identities,
    record_identities,
)


def _index(rows):
    return pd.DataFrame(rows, columns=["record_id", "source", "patient_id", "meta"])


PTBXL_TEST = _index([
    ("00010", "ptbxl", "15709", {"strat_fold": 10}),
    ("00011", "ptbxl", "13243", {"strat_fold": 10}),
])


def test_same_record_is_an_error_unless_allowed():
    pre = index_identities(_index([("00010", "ptbxl", None, {}), ("00500", "ptbxl", None, {})]))
    with pytest.raises(LeakageError, match="1 record"):
        check_leakage(pre, index_identities(PTBXL_TEST), what="ptbxl_super test split")
    rep = check_leakage(pre, index_identities(PTBXL_TEST), allow=True)
    assert rep.leaked and rep.to_dict()["n_shared_records"] == 1
    assert rep.examples[0] == ("ptbxl/00010", "ptbxl/00010")


def test_shared_patient_other_record_is_detected():
    pre = index_identities(_index([("00200", "ptbxl", "15709.0", {})]))  # float-looking id, same patient
    with pytest.raises(LeakageError, match="1 patient"):
        check_leakage(pre, index_identities(PTBXL_TEST))


def test_physionet2021_hr_record_leaks_ptbxl():
    # Challenge2021Source sets meta["ptbxl_ecg_id"] on HR records: HR00011 is PTB-XL ecg_id 11
    pre = index_identities(_index([("HR00011", "challenge2021", None, {"ptbxl_ecg_id": 11}),
                                   ("E07500", "challenge2021", None, {})]))
    rep = check_leakage(pre, index_identities(PTBXL_TEST), allow=True)
    assert rep.shared_records == ["ptbxl/00011"]
    assert rep.examples == [("ptbxl/00011", "challenge2021/HR00011")]
    with pytest.raises(LeakageError):
        check_leakage(pre, index_identities(PTBXL_TEST))


def test_disjoint_is_clean_and_record_keys_from_export():
    pre = keys_identities(["ptbxl/00501", "cinc2017/A00002"])
    rep = check_leakage(pre, index_identities(PTBXL_TEST))
    assert not rep.leaked
    assert "rec:ptbxl/501" in pre
    rep = check_leakage(keys_identities(["cinc2017/A00002"]),
                        index_identities(_index([("A00002", "cinc2017", None, {})])), allow=True)
    assert rep.leaked
    with pytest.raises(ValueError, match="source/record_id"):
        keys_identities(["no-slash"])


def test_identities_of_unknown_patient_and_export_info():
    ids = record_identities("cinc2017", "A00001", None, {})
    assert ids == {"rec:cinc2017/A00001"}
    idents, prov = pretrain_identities({"extra": {"pretrain_record_keys": ["ptbxl/00010"]}})
    assert "rec:ptbxl/10" in idents and "pretrain_record_keys" in prov[0]
    with pytest.raises(LeakageError, match="cannot be opened"):
        pretrain_identities({}, pretrain_caches=["/nonexistent/cache"])


@pytest.mark.realdata
def test_real_fixture_ptbxl_task_and_physionet2021_hr_identity(fixture_dir, tmp_path):
    """Real readers: the PTB-XL fixture as the ptbxl_super task (folds) and the PhysioNet 2021 HR records, whose
    identities name their PTB-XL ecg_id (HR06000 is PTB-XL record 06000)."""
    from ecgfm.data.cache import CorpusCache
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.evaluate.tasks import TaskSpec, build_task
    from ecgfm.data.prepare import prepare_cache

    spec = TaskSpec.from_config({
        "name": "ptbxl_super", "dataset": "ptbxl", "labels": "ptbxl:superdiagnostic",
        "label_root": str(fixture_dir / "ptbxl"),
        "sources": [{"_target_": "ecgfm.data.readers.PTBXLSource", "root": str(fixture_dir / "ptbxl"), "fs": 100,
                     "include_unlabelled": False}],
        "split": {"kind": "folds", "key": "strat_fold", "train": [1, 2, 3, 4, 5, 6, 7, 8], "val": [9],
                  "test": [10]}})
    task = build_task(spec, str(tmp_path), PreprocessSpec())
    assert task.class_names == ["CD", "HYP", "MI", "NORM", "STTC"] and task.multilabel
    folds = [m.get("strat_fold") for m in task.cache.index["meta"]]
    assert all(folds[i] == 10 for i in task.splits["test"]) and all(folds[i] <= 8 for i in task.splits["train"])
    test_ids = index_identities(task.cache.index, task.splits["test"])
    assert any(k.startswith("pat:ptbxl/") for k in test_ids)

    hr_dir = prepare_cache([{"_target_": "ecgfm.data.readers.Challenge2021Source",
                             "root": str(fixture_dir / "cinc2021")}], str(tmp_path), PreprocessSpec(), name="c2021")
    hr = index_identities(CorpusCache(hr_dir).index)
    assert "rec:ptbxl/6000" in hr
    fake_ptbxl_test = index_identities(_index([("06000", "ptbxl", "1", {"strat_fold": 10})]))
    with pytest.raises(LeakageError, match="1 record"):
        check_leakage(hr, fake_ptbxl_test)
    assert not check_leakage(hr, test_ids).leaked  # ecg_id 1-100 are not among HR06000-06002


def test_excluding_source_hides_held_out_records():
    from ecgfm.data.record import ECGDataError
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.evaluate.tasks import ExcludingSource

    src = SyntheticSource(6, seed=0, fs=100.0, duration=3.0)
    ex = ExcludingSource(src, ["syn000001", "syn000004"])
    assert ex.name == "synthetic" and ex.record_ids() == ["syn000000", "syn000002", "syn000003", "syn000005"]
    assert ex.load("syn000002").record_id == "syn000002"
    with pytest.raises(ECGDataError, match="excluded"):
        ex.load("syn000004")
    # the repr keys the prepared cache: another held-out set of the same size is another cache
    assert repr(ex) != repr(ExcludingSource(src, ["syn000001", "syn000003"]))


def test_challenge_ids_name_the_corpus_they_come_from():
    """PhysioNet 2020/21 ships PTB-XL as HR<n> and CPSC 2018 as A<nnnn>: the same recordings, recognised from the id
    itself (a cache index with meta, or a bare pretraining key without)."""
    assert "rec:cpsc2018/A1980" in record_identities("challenge2021", "A1980")
    assert "rec:cpsc2018/A1980" in record_identities("cpsc2018", "TrainingSet3/A1980")
    assert "rec:ptbxl/10" in record_identities("challenge2021", "WFDB_PTBXL/HR00010")
    assert not any(i.startswith("rec:cpsc2018") for i in record_identities("cinc2017", "A00002"))
    pre = keys_identities(["challenge2021/HR00010", "cpsc2018/A1980"])
    test = {**index_identities(pd.DataFrame({"source": ["ptbxl"], "record_id": ["00010_lr"], "patient_id": [None],
                                             "meta": [{}]})),
            **index_identities(pd.DataFrame({"source": ["challenge2021"], "record_id": ["A1980"],
                                             "patient_id": [None], "meta": [{}]}))}
    rep = check_leakage(pre, test, allow=True)
    assert rep.leaked and rep.to_dict()["n_shared_records"] == 2
    with pytest.raises(ValueError, match="synthetic@seed"):
        keys_identities(["synthetic/syn0003"])


def test_the_report_says_how_many_records_the_patient_check_cannot_see():
    pre = index_identities(_index([("00001", "ptbxl", "7", {}), ("09999", "ptbxl", None, {})]))
    rep = check_leakage(pre, index_identities(PTBXL_TEST))
    assert rep.to_dict()["patient_check_blind_to"] == {"pretraining_records": 1, "test_records": 0}


def test_overlap_only_under_the_generic_folder_name_says_how_to_tell_folders_apart():
    """Two different folders read with FolderSource's default name share identities when their file names
    coincide: the error stays (it cannot know they differ) but names the knob that separates them."""
    pre = index_identities(_index([("rec1", "folder", None, {}), ("rec2", "folder", None, {})]))
    test = index_identities(_index([("rec1", "folder", None, {})]))
    with pytest.raises(LeakageError, match=r"\+task\.sources\.0\.name="):
        check_leakage(pre, test)
    other = index_identities(_index([("rec1", "hospital_b", None, {})]))   # named apart: nothing shared
    assert not check_leakage(pre, other).leaked
    with pytest.raises(LeakageError) as exc:            # a real corpus overlap gets no such hint
        check_leakage(index_identities(_index([("00010", "ptbxl", None, {})])), index_identities(PTBXL_TEST))
    assert "+task.sources.0.name=" not in str(exc.value)


def test_physionet2021_hr_record_gets_its_ptbxl_patient_from_the_database(fixture_dir, tmp_path):
    """With ``ptbxl_root`` an HR record carries its PTB-XL patient: a PTB-XL test record of the same patient under
    another ecg_id is then a shared patient (without it the patient check cannot see HR records at all)."""
    from ecgfm.data.readers import Challenge2021Source

    db = tmp_path / "ptbxl"
    db.mkdir()
    (db / "ptbxl_database.csv").write_text(
        "ecg_id,patient_id,age,sex,scp_codes,strat_fold\n"
        "5,777.0,60,0,\"{'NORM': 100.0}\",10\n"
        "6000,777.0,60,0,\"{'NORM': 100.0}\",3\n"
        "6001,,61,1,\"{'NORM': 100.0}\",4\n")
    src = Challenge2021Source(fixture_dir / "cinc2021", ptbxl_root=db)
    assert src.label_files() == [db / "ptbxl_database.csv"]
    rec = {rid: src.load(rid) for rid in ("HR06000", "HR06001", "HR06002")}
    assert rec["HR06000"].patient_id == "777" and rec["HR06000"].meta["ptbxl_patient_id"] == "777"
    assert rec["HR06001"].patient_id is None and "ptbxl_patient_id" not in rec["HR06001"].meta   # empty cell
    assert rec["HR06002"].patient_id is None                                                     # no row
    pre = index_identities(_index([(r.record_id, r.source, r.patient_id, r.meta) for r in rec.values()]))
    test = index_identities(_index([("00005", "ptbxl", "777", {"strat_fold": 10})]))
    rep = check_leakage(pre, test, allow=True)
    assert rep.shared_patients == ["pat:ptbxl/777"] and rep.n_pretrain_records_without_patient == 2
    plain = Challenge2021Source(fixture_dir / "cinc2021")       # no database: as before, blind to the patient
    assert plain.label_files() == [] and plain.load("HR06000").patient_id is None
    pre = index_identities(_index([(r, "challenge2021", None, plain.load(r).meta) for r in ("HR06000",)]))
    assert not check_leakage(pre, test).leaked


def test_unknown_patient_markers_are_not_a_shared_patient():
    """The splits read -1 / "-1" as an unknown patient; the leakage guard took "-1" as one patient shared by
    pretraining and test records."""
    from ecgfm.evaluate.leakage import _norm_patient

    assert [_norm_patient(p) for p in ("-1", -1, -1.0, " -1 ", "nan", None, "-1.0", "NaN", "none", "<NA>")] == \
        [None] * 10
    from ecgfm.data.splits import is_unknown_patient

    assert all(is_unknown_patient(p) for p in ("NaN", "NONE", "null", "<NA>")) and not is_unknown_patient("p1")
    assert _norm_patient(12.0) == "12" and _norm_patient("0012") == "0012"


def test_a_ptbxl_patient_is_one_patient_in_every_cache(fixture_dir, tmp_path):
    """The pretraining hold-out and CLOCS's positives read the cache's patient hashes: an HR record carrying its
    PTB-XL patient (``ptbxl_root``) hashed under "challenge2021", so the same patient in a PTB-XL cache beside it
    was two patients (one could train while the other validated). Now both hash as ``ptbxl/<patient>``."""
    from ecgfm.data.cache import CorpusCache, patient_hash, prepare_corpus, record_patient_hash
    from ecgfm.data.readers import Challenge2021Source

    assert record_patient_hash("challenge2021", "777", {"ptbxl_patient_id": "777"}) == patient_hash("ptbxl", "777")
    assert record_patient_hash("ptbxl_hr", "777", {}) == patient_hash("ptbxl", "777")   # any ptbxl* source name
    assert record_patient_hash("cpsc2018", "777", None) == patient_hash("cpsc2018", "777") != \
        patient_hash("ptbxl", "777")                                                       # other corpora unchanged
    assert record_patient_hash("challenge2021", None, {"ptbxl_patient_id": "nan"}) == -1
    db = tmp_path / "ptbxl"
    db.mkdir()
    (db / "ptbxl_database.csv").write_text(
        "ecg_id,patient_id,age,sex,scp_codes,strat_fold\n"
        "6000,777.0,60,0,\"{'NORM': 100.0}\",3\n")
    out = tmp_path / "cache"
    prepare_corpus(Challenge2021Source(fixture_dir / "cinc2021", ptbxl_root=db), out,
                   {"fs": 100.0}, workers=0, progress=False)
    cache = CorpusCache(out)
    by_id = dict(zip(cache.index["record_id"], cache.patients))
    assert by_id["HR06000"] == patient_hash("ptbxl", "777")          # the PTB-XL cache's hash of patient 777
    assert by_id["HR06001"] == -1                                    # no database row: unknown, as before
