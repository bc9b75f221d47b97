"""Data-layer review (s20): the edge spike of zero-padded polyphase resampling is warned about (the default,
``resample_padtype="constant"``, kept for the caches and encoders made with it), FolderSource reads a labels CSV's
``sex`` column into the canonical ``"M"`` / ``"F"`` / None (numeric codes only with ``sex_codes``; a cell it cannot
read is None with the cell kept as ``sex_raw`` and one warning, not an error), and the synthetic noise bank has its
own random stream (it was record 3's)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data import preprocess
from ecgfm.data.preprocess import PreprocessSpec, preprocess_signal, resample
from ecgfm.data.readers import FolderSource
from ecgfm.data.record import ECGDataError

# ------------------------------------------------------------------- 1. zero-padded resampling: edge spike


def _offset_record(offset: float = 1.0, fs: float = 500.0) -> tuple[np.ndarray, np.ndarray]:
    """Lead II only: a 1 Hz sine of 0.2 mV on a DC ``offset`` (mV), 10 s."""
    t = np.arange(int(10 * fs)) / fs
    sig = np.zeros((12, t.size), np.float32)
    sig[1] = offset + 0.2 * np.sin(2 * np.pi * t + 0.3)
    mask = np.zeros(12, bool)
    mask[1] = True
    return sig, mask


@pytest.fixture
def fresh_edge_warning(monkeypatch):
    monkeypatch.setattr(preprocess, "_WARNED_EDGE_SPIKE", set(), raising=False)


def _edge_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "resample_padtype" in r.getMessage()]


def test_zero_padded_resampling_spike_is_real_and_warned(caplog, fresh_edge_warning):
    sig, mask = _offset_record(1.0)
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.preprocess"):
        zero, _, _ = preprocess_signal(sig, 500, mask, PreprocessSpec(), where="rec1")
    line, _, _ = preprocess_signal(sig, 500, mask, PreprocessSpec(resample_padtype="line"))
    # the spike: in z units after the default 0.5 Hz high-pass and z-score, at the record's first samples only
    spike = np.abs(zero[1] - line[1])
    assert spike[:3].max() > 1.0 and spike[:3].max() > 10 * spike[300:700].max()
    messages = _edge_warnings(caplog)
    assert len(messages) == 1
    assert "rec1" in messages[0] and "lead II" in messages[0] and "resample_padtype=line" in messages[0]
    assert "500 -> 100 Hz" in messages[0]
    # once per process: a second such record is not reported again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.preprocess"):
        preprocess_signal(sig, 500, mask, PreprocessSpec(), where="rec2")
    assert not _edge_warnings(caplog)


@pytest.mark.parametrize("case", ["centred", "line", "not_resampled", "fourier"])
def test_no_edge_warning_without_the_spike(caplog, fresh_edge_warning, case):
    sig, mask = _offset_record(0.0 if case == "centred" else 1.0, fs=100.0 if case == "not_resampled" else 500.0)
    spec = {"centred": PreprocessSpec(), "line": PreprocessSpec(resample_padtype="line"),
            "not_resampled": PreprocessSpec(), "fourier": PreprocessSpec(resample_method="fourier")}[case]
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.preprocess"):
        preprocess_signal(sig, 100.0 if case == "not_resampled" else 500.0, mask, spec)
    assert not _edge_warnings(caplog)


def test_default_padding_is_unchanged_scipy_constant():
    """The warning changes nothing the caches and encoders were made with: the default output is still scipy's
    zero-padded resample_poly, bit for bit, and the default spec's fingerprint is the one they are stored under."""
    from scipy import signal as sps

    sig, _ = _offset_record(1.0)
    np.testing.assert_array_equal(resample(sig[1:2], 500, 100),
                                  sps.resample_poly(sig[1:2], 1, 5, axis=-1).astype(np.float32))
    assert PreprocessSpec().resample_padtype == "constant" and "resample_padtype" not in PreprocessSpec().to_dict()
    assert PreprocessSpec().fingerprint() == "15af357ac92c9c3a"


# ------------------------------------------------------------------- 2. FolderSource: canonical sex


def _folder(fixture_dir: Path, tmp_path: Path, csv_text: str) -> Path:
    """Two PTB-XL records and sub/HR06000 (header: "# Sex: Female") with ``csv_text`` as labels.csv."""
    from tests.unit.test_readers import _folder_with_records

    root = _folder_with_records(fixture_dir, tmp_path)
    (root / "labels.csv").write_text(csv_text)
    return root


def _sexes(src: FolderSource) -> tuple:
    return tuple(src.load(r).meta.get("sex") for r in ("00001_lr", "00002_lr", "sub/HR06000"))


def test_folder_sex_spellings_are_canonical_as_other_readers(fixture_dir, tmp_path):
    root = _folder(fixture_dir, tmp_path, "record_id,sex,AF\n00001_lr, male ,1\n00002_lr,F,0\nHR06000,,1\n")
    src = FolderSource(root, labels_csv="labels.csv")
    # was ("male", "F", "F"): the raw cell; an empty cell keeps the header's value (HR06000: "# Sex: Female")
    assert _sexes(src) == ("M", "F", "F")
    (root / "labels.csv").write_text("record_id,Sex,AF\n00001_lr,Woman,1\n00002_lr,unknown,0\nHR06000,U,1\n")
    rec = FolderSource(root, labels_csv="labels.csv").load("00001_lr")
    assert rec.meta["sex"] == "F" and "Sex" not in rec.meta          # one key, "sex", as every reader writes it
    # an unknown cell is unknown (None); as an empty cell, it leaves the header's value (HR06000's "F")
    assert _sexes(FolderSource(root, labels_csv="labels.csv")) == ("F", None, "F")


def _sex_logs(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ecgfm.data.readers.folder" and r.levelno == level and "meta['sex_raw']" in r.getMessage()]


def test_folder_numeric_sex_without_sex_codes_is_unknown_and_warned_once(fixture_dir, tmp_path, caplog):
    root = _folder(fixture_dir, tmp_path, "record_id,sex,AF\n00001_lr,0,1\n00002_lr,1,0\nHR06000,1.0,1\n")
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root, labels_csv="labels.csv")   # was refused (ECGDataError), before that kept raw
    # not guessed: unknown (HR06000's header "# Sex: Female" stays, as for an empty cell), the cell kept as sex_raw
    assert _sexes(src) == (None, None, "F")
    assert [src.load(r).meta["sex_raw"] for r in ("00001_lr", "00002_lr", "sub/HR06000")] == [0, 1, 1.0]
    assert src.load("00001_lr").labels == ("AF",)
    warnings = _sex_logs(caplog, logging.WARNING)
    assert len(warnings) == 1 and not _sex_logs(caplog, logging.INFO)
    msg = warnings[0]
    assert "labels.csv" in msg and "3 cell(s) of column 'sex'" in msg and "first on line 2: '0'" in msg
    assert "values '0', '1', '1.0'" in msg and "PTB-XL: 0 male" in msg and "sex_codes={0: 'M', 1: 'F'}" in msg
    # with sex_codes: read as today, no warning, no sex_raw
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        ptbxl = FolderSource(root, labels_csv="labels.csv", sex_codes={0: "M", 1: "F"})
    assert _sexes(ptbxl) == ("M", "F", "F") and "sex_raw" not in ptbxl.load("00001_lr").meta
    assert not _sex_logs(caplog, logging.WARNING) and not _sex_logs(caplog, logging.INFO)
    ukb = FolderSource(root, labels_csv="labels.csv", sex_codes={"0": "female", "1.0": "male"})   # keys by value
    assert _sexes(ukb) == ("F", "M", "M")
    unknown = FolderSource(root, labels_csv="labels.csv", sex_codes={0: None, 1: None})
    assert unknown.load("00001_lr").meta["sex"] is None and "sex_raw" not in unknown.load("00001_lr").meta
    # the codes are part of the source's description (its cache key), and absent when not given
    from ecgfm.data.cache import describe_source

    assert describe_source(ptbxl)["sex_codes"] == {"0": "M", "1": "F"}
    assert "sex_codes" not in describe_source(FolderSource(root))
    # a bad sex_codes argument is still refused
    with pytest.raises(ValueError, match=r"sex_codes\[2\] = 'X'"):
        FolderSource(root, labels_csv="labels.csv", sex_codes={0: "M", 1: "F", 2: "X"})
    with pytest.raises(ValueError, match=r"sex_codes must be a mapping"):
        FolderSource(root, labels_csv="labels.csv", sex_codes=["M", "F"])


def test_folder_unrecognised_sex_is_unknown_and_warned_by_line(fixture_dir, tmp_path, caplog):
    root = _folder(fixture_dir, tmp_path, "record_id,sex,AF\n00001_lr,M,1\n00002_lr,?? ,0\nHR06000,2,1\n")
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root, labels_csv="labels.csv")   # was refused: one cell refused the data set
    assert _sexes(src) == ("M", None, "F")
    assert src.load("00002_lr").meta["sex_raw"] == "??" and src.load("sub/HR06000").meta["sex_raw"] == 2
    assert "sex_raw" not in src.load("00001_lr").meta
    (msg,) = _sex_logs(caplog, logging.WARNING)
    assert "2 cell(s)" in msg and "first on line 3: '??'" in msg and "sex_codes={'??': 'M' | 'F' | None}" in msg
    # mapped: read, no warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        mapped = FolderSource(root, labels_csv="labels.csv", sex_codes={"??": None, 2: "F"})
    assert _sexes(mapped) == ("M", None, "F") and not _sex_logs(caplog, logging.WARNING)
    (root / "labels.csv").write_text("record_id,sex,SEX,AF\n00001_lr,M,M,1\n")
    with pytest.raises(ECGDataError, match=r"several sex columns \['sex', 'SEX'\]"):
        FolderSource(root, labels_csv="labels.csv")


def test_folder_other_sex_is_none_with_sex_raw_and_info(fixture_dir, tmp_path, caplog):
    root = _folder(fixture_dir, tmp_path, "record_id,sex,AF\n00001_lr,Other,1\n00002_lr,X,0\nHR06000,F,1\n")
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root, labels_csv="labels.csv")
    # no category invented: meta["sex"] holds M / F / None only; the cell is kept
    assert _sexes(src) == (None, None, "F")
    assert src.load("00001_lr").meta["sex_raw"] == "Other" and src.load("00002_lr").meta["sex_raw"] == "X"
    assert not _sex_logs(caplog, logging.WARNING)   # nothing to fix: an INFO, once
    (msg,) = _sex_logs(caplog, logging.INFO)
    assert "2 cell(s)" in msg and "other than male / female" in msg and "first on line 2: 'Other'" in msg
    # sex_codes still wins (e.g. a data set whose "X" means unknown)
    assert "sex_raw" not in FolderSource(root, labels_csv="labels.csv", sex_codes={"x": None}).load("00002_lr").meta


def test_folder_sex_as_label_column_keeps_its_labels(fixture_dir, tmp_path):
    root = _folder(fixture_dir, tmp_path, "record_id,sex,AF\n00001_lr,male,1\n00002_lr,female,0\n")
    src = FolderSource(root, labels_csv="labels.csv", label_columns=["sex"])
    rec = src.load("00001_lr")
    assert rec.labels == ("male",) and rec.meta["sex"] == "M"


def test_folder_binary_sex_label_column_is_read_as_labels(fixture_dir, tmp_path, caplog):
    """A 0/1 sex column as the label of a sex-prediction task was refused (unmapped numbers): its labels are read as
    any flag column's, meta["sex"] is unknown with one warning."""
    root = _folder(fixture_dir, tmp_path, "record_id,sex,AF\n00001_lr,0,1\n00002_lr,1,0\nHR06000,,1\n")
    with caplog.at_level(logging.INFO, logger="ecgfm.data.readers.folder"):
        src = FolderSource(root, labels_csv="labels.csv", label_columns=["sex"])
    recs = [src.load(r) for r in ("00001_lr", "00002_lr", "sub/HR06000")]
    assert [r.labels for r in recs] == [(), ("sex",), ()]                  # a flag column: label "sex" where 1
    assert [r.meta["labels_known"] for r in recs] == [True, True, False]   # 0 is a known negative, empty unknown
    assert [r.meta["sex"] for r in recs] == [None, None, "F"]
    assert [r.meta.get("sex_raw") for r in recs] == [0, 1, None]
    (msg,) = _sex_logs(caplog, logging.WARNING)
    assert "2 cell(s)" in msg and "also a label column" in msg
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [msg]   # nothing else
    # the labels are those of the same column under another name (the label reading path is unaffected)
    (root / "labels.csv").write_text("record_id,is_female,AF\n00001_lr,0,1\n00002_lr,1,0\nHR06000,,1\n")
    other = FolderSource(root, labels_csv="labels.csv", label_columns=["is_female"])
    assert [other.load(r.record_id).labels for r in recs] == [(), ("is_female",), ()]
    assert [other.load(r.record_id).meta["labels_known"] for r in recs] == [True, True, False]
    # with sex_codes, meta["sex"] is read and the labels stay the same
    (root / "labels.csv").write_text("record_id,sex,AF\n00001_lr,0,1\n00002_lr,1,0\nHR06000,,1\n")
    coded = FolderSource(root, labels_csv="labels.csv", label_columns=["sex"], sex_codes={0: "M", 1: "F"})
    assert [(coded.load(r.record_id).labels, coded.load(r.record_id).meta["sex"]) for r in recs] == [
        ((), "M"), (("sex",), "F"), ((), "F")]


# ------------------------------------------------------------------- 3. synthetic: the noise bank's own stream


@pytest.mark.parametrize("seed", [0, 7])
def test_noise_bank_stream_is_no_records_stream(seed):
    """The bank was ``default_rng([seed, 3])``, record 3's stream: record 3's parameters were the bank's numbers."""
    from ecgfm.data import synthetic

    bank = synthetic._noise_bank(seed, 16)[:16]
    for index in range(12):   # a record's own stream, drawn as the bank draws
        same = np.random.default_rng([seed, index]).standard_normal(16, dtype=np.float32)
        assert not np.array_equal(bank, same), index
    state = np.random.SeedSequence(seed, spawn_key=(3,)).generate_state(4)
    keys = [[seed, k] for k in range(12)] + [[seed, k, t] for k in range(12) for t in (1, 2)]
    assert not any(np.array_equal(state, np.random.SeedSequence(key).generate_state(4)) for key in keys)


def test_record_3_parameters_are_independent_of_the_bank():
    """Record 3's uniform draws were the bank's 64-bit words: correlated with the magnitudes of its odd samples
    (0.43 over 200 seeds before the fix, 0.00 for other records)."""
    from ecgfm.data import synthetic

    n_beats = synthetic._n_beats(10.0)
    us, bs = [], []
    for seed in range(60):
        u = synthetic._draw(np.array([3]), seed, n_beats)[0][0, :40]
        bank = synthetic._noise_bank(seed, 0)[:80]
        us.append(u)
        bs.append(np.abs(bank[1::2]))
    assert abs(np.corrcoef(np.concatenate(us), np.concatenate(bs))[0, 1]) < 0.1


def test_generator_version_is_in_the_synthetic_description():
    """Records changed (their muscle noise): the source's description, hence a cache's plan / content fingerprint
    and a built source's cache key, says which generator made them."""
    from ecgfm.data.cache import describe_source
    from ecgfm.data.synthetic import GENERATOR_VERSION, SyntheticSource

    src = SyntheticSource(3, fs=100.0, duration=2.5)
    assert GENERATOR_VERSION == 2
    assert describe_source(src)["generator_version"] == 2 and "generator=2" in repr(src)


def test_caches_of_changed_readers_are_prepared_again():
    """FolderSource's sex codes and the synthetic generator's noise bank changed records: their cache keys name
    the new versions, so a cache written before is prepared again, not reused."""
    from ecgfm.data.prepare import SOURCE_VERSIONS, cache_key
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.data.synthetic import GENERATOR_VERSION

    assert SOURCE_VERSIONS["FolderSource"] >= 4 and SOURCE_VERSIONS["SyntheticSource"] == GENERATOR_VERSION >= 2
    spec = PreprocessSpec(fs=100.0)
    src = [{"_target_": "ecgfm.data.synthetic.SyntheticSource", "n_records": 4, "seed": 0}]
    key = cache_key(src, spec)
    import ecgfm.data.prepare as P

    old = dict(P.SOURCE_VERSIONS)
    try:
        P.SOURCE_VERSIONS.pop("SyntheticSource")
        assert cache_key(src, spec) != key
    finally:
        P.SOURCE_VERSIONS.clear()
        P.SOURCE_VERSIONS.update(old)
