"""Review (s27): provenance of derived leads after preprocessing, spec booleans given as 0 / 1, and the pool-size
study's draws per record counting every record an optimiser step draws."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.preprocess import PreprocessSpec, preprocess_record
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord

DERIVED = ["III", "aVR", "aVL", "aVF"]


def _record(flat: tuple[str, ...] = ()) -> ECGRecord:
    rng = np.random.default_rng(0)
    sig = rng.normal(0, 0.3, (12, 1000)).astype(np.float32)
    for lead in flat:
        sig[CANONICAL_LEADS.index(lead)] = 0.0
    return ECGRecord(signal=sig, fs=100.0, lead_mask=np.ones(12, bool), record_id="r", source="gen",
                     header={"derived_leads": list(DERIVED)})


def test_derived_leads_name_only_leads_still_present():
    # a lead subset: none of the derived leads is kept, so none is derived
    out = preprocess_record(_record(), PreprocessSpec(leads=("I", "II", "V1")))
    assert [CANONICAL_LEADS[i] for i in np.flatnonzero(out.lead_mask)] == ["I", "II", "V1"]
    assert out.header["derived_leads"] == []
    # a flat derived lead is dropped from the mask, and from the derived list with it
    out = preprocess_record(_record(flat=("aVL",)), PreprocessSpec())
    assert not out.lead_mask[CANONICAL_LEADS.index("aVL")]
    assert out.header["derived_leads"] == ["III", "aVR", "aVF"]
    # all present: the list is unchanged
    assert preprocess_record(_record(), PreprocessSpec()).header["derived_leads"] == DERIVED


def test_notch_first_given_as_an_integer_is_the_same_spec():
    assert PreprocessSpec(notch_first=0).fingerprint() == PreprocessSpec().fingerprint()
    assert PreprocessSpec(notch=50.0, notch_first=1).fingerprint() == \
        PreprocessSpec(notch=50.0, notch_first=True).fingerprint()
    with pytest.raises(ValueError, match="notch_first must be true or false"):
        PreprocessSpec(notch_first="yes")


def _pool_size_study():
    path = Path(__file__).resolve().parents[2] / "scripts" / "pool_size_study.py"
    spec = importlib.util.spec_from_file_location("pool_size_study_s27", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pool_size_draws_count_accumulation_and_processes(tmp_path):
    ps = _pool_size_study()
    (tmp_path / "config.yaml").write_text(json.dumps({"data": {"batch_size": 32, "val_fraction": 0.1},
                                                      "trainer": {"accumulate_grad_batches": 2, "devices": 4,
                                                                  "num_nodes": 1}}))
    assert ps._run_data_settings(tmp_path) == (32 * 2 * 4, 0.1)          # from the config
    assert ps._run_data_settings(tmp_path, {"world_size": 2, "accumulate_grad_batches": 3}) == (32 * 3 * 2, 0.1)
    (tmp_path / "config.yaml").write_text(json.dumps({"data": {"batch_size": 16}, "trainer": {"devices": "auto"}}))
    assert ps._run_data_settings(tmp_path) == (16, 0.05)                   # 'auto': the summary is needed for it
    assert ps._run_data_settings(tmp_path / "none") == (64, 0.05)          # no config: the recipe's


def test_simclr_leaves_out_a_pair_whose_augmented_view_is_all_zero(monkeypatch):
    """A resized crop wholly inside a crop's zero padding is an all-zero view (the presets' noises scale with the
    signal): its pair is no pair, as a pair with an all-zero crop is not."""
    import torch

    import ecgfm.methods.simclr as simclr
    from ecgfm.backbones.vit1d import ViT1D

    torch.manual_seed(0)
    m = simclr.SimCLRModule(ViT1D(seq_len=100, patch_size=10, num_leads=12, embed_dim=16, depth=1, num_heads=2),
                            proj_dim=8, proj_hidden=16, fs=100.0).train()
    B = 6
    x = torch.randn(B, 12, 100)
    x[:2, :, 20:] = 0.0                       # two records recorded over a fifth of the crop
    batch = {"x": x, "lead_mask": torch.ones(B, 12, dtype=torch.bool), "index": torch.arange(B)}
    v1, v2 = x.clone(), x.clone() * 1.1
    v1[0] = 0.0                               # the resized crop of record 0 fell in its padding
    v2[1] = 0.0                               # and the second view of record 1
    monkeypatch.setattr(m, "views", lambda b: (v1, v2))
    seen = []
    real = simclr.nt_xent
    monkeypatch.setattr(simclr, "nt_xent", lambda z1, z2, **kw: seen.append(z1.shape[0]) or real(z1, z2, **kw))
    m.shared_step(batch)
    assert seen == [B - 2]


def test_explain_refuses_options_of_a_method_it_does_not_run(tmp_path):
    """method_options={occlusion: ...} beside methods=[ig] ran IG alone, exit 0, the occlusion options nowhere."""
    from ecgfm.config import ConfigError
    from ecgfm.explain.report import explain_records

    with pytest.raises(ConfigError, match=r"method_options\.occlusion.*not in methods \['integrated_gradients'\]"):
        explain_records(None, [], tmp_path, methods=["ig"], method_options={"occlusion": {"window_s": 0.1}})


def test_embed_refuses_a_stride_for_an_artifact_without_a_window(tmp_path):
    """The stride was checked, then dropped: one whole-record embedding came back for per_window=True."""
    import ecgfm
    from ecgfm.artifacts import save_encoder
    from ecgfm.backbones import create_backbone

    save_encoder(tmp_path / "nowin", create_backbone("resnet1d_test"), PreprocessSpec(fs=100.0), fs=100.0)
    enc = ecgfm.Encoder.load(tmp_path / "nowin")
    x = np.random.default_rng(0).normal(size=(12, 1000)).astype(np.float32)
    assert enc.embed(x, fs=100, per_window=True).shape[0] == 1           # whole record, as documented
    with pytest.raises(ValueError, match="stride_samples=100: this artifact has no window"):
        enc.embed(x, fs=100, per_window=True, stride_samples=100)


# ------------------------------------------------------------------------------------------ tasks (review s27)
def _task(**extra) -> dict:
    base = {"name": "t", "dataset": "syn", "sources": [{"_target_": "ecgfm.data.synthetic.SyntheticSource"}]}
    return {**base, **extra}


def test_stratified_fraction_names_are_normalised_or_refused():
    from ecgfm.config import ConfigError
    from ecgfm.evaluate.tasks import TaskSpec

    spec = TaskSpec.from_config(_task(split={"kind": "stratified",
                                             "fractions": {"train": 0.7, "Validation": 0.15, "test": 0.15}}))
    assert spec.split["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15}   # was a side named 'validation'
    with pytest.raises(ConfigError, match=r"split\.fractions\.tests.*none of train / val / test"):
        TaskSpec.from_config(_task(split={"kind": "stratified", "fractions": {"train": 0.8, "tests": 0.2}}))
    with pytest.raises(ConfigError, match=r"split\.fractions\.validation.*twice"):
        TaskSpec.from_config(_task(split={"kind": "stratified",
                                          "fractions": {"train": 0.6, "val": 0.2, "validation": 0.2}}))


def test_min_count_beside_fixed_classes_is_refused():
    from ecgfm.config import ConfigError
    from ecgfm.evaluate.tasks import TaskSpec

    with pytest.raises(ConfigError, match=r"task\.min_count.*fixed classes list would do nothing"):
        TaskSpec.from_config(_task(classes=["a", "b"], min_count=100))
    assert TaskSpec.from_config(_task(classes=["a", "b"])).min_count == 1


def test_records_labelled_only_with_an_untrainable_class_leave_every_split():
    """Multi-label: such records stayed in val / test as negatives of every class (single-label ones left)."""
    from ecgfm.evaluate.tasks import TaskSpec, _drop_untrainable_classes

    spec = TaskSpec.from_config(_task(multilabel=True))
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [0, 1]], np.float32)    # class 1 has no train positive
    splits = {"train": np.array([0]), "val": np.array([1, 2, 3]), "test": np.array([4])}
    notes: list[str] = []
    y2, names, sp = _drop_untrainable_classes(spec, y, ["a", "b"], splits, notes)
    assert names == ["a"] and y2.shape == (5, 1)
    # 1 and 4 had only 'b': in no split; 2 keeps 'a'; 3 had no label before (a known negative): stays
    assert sp["val"].tolist() == [2, 3] and sp["test"].tolist() == [] and sp["train"].tolist() == [0]
    assert "labelled only with those class(es) are in no split: 1 val, 1 test" in notes[-1]


# ---------------------------------------------------------------------------------------- explain (review s27)
def test_explain_localises_only_the_labelled_class_and_records_the_curve_settings(tmp_path):
    """Localisation of an 'atrial_fibrillation' explanation was scored against an AV-block record's PR mask; the
    note said 'smoothed baseline' for baseline='zeros' and the curves' settings were nowhere."""
    import torch
    from torch import nn

    from ecgfm.data.synthetic import SYNTHETIC_CLASSES, generate_record
    from ecgfm.explain.report import explain_records
    from ecgfm.explain.wrapper import ECGWrapper

    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.head = nn.Conv1d(12, 4, 7, padding=3), nn.Linear(4, c)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(-1))

    rec = generate_record(3, fs=100.0, duration=10.0, cls="first_degree_av_block")
    w = ECGWrapper(Tiny(len(SYNTHETIC_CLASSES)).eval(), fs=100.0, n_samples=1000, class_names=SYNTHETIC_CLASSES)
    fo = {"n_random": 1, "steps": 5, "baseline": "zeros", "segment_s": 0.5}
    out = {}
    for tgt in ("first_degree_av_block", "atrial_fibrillation"):
        rep = explain_records(w, [rec], tmp_path / tgt, methods=["saliency"], target=tgt, formats=["png"],
                              faithfulness_options=fo)
        out[tgt] = rep["records"][0]["methods"]["saliency"]["faithfulness"]
    own, other = out["first_degree_av_block"], out["atrial_fibrillation"]
    assert "localisation" in own and own["localisation_class"] == "first_degree_av_block"
    assert "localisation" not in other and "not the explained class 'atrial_fibrillation'" in \
        other["localisation_skipped"]
    assert {k: own[k] for k in ("segment_s", "steps", "baseline", "n_random")} == \
        {"segment_s": 0.5, "steps": 5, "baseline": "zeros", "n_random": 1}
    note = rep["notes"]["faithfulness"]
    assert "replaced by zeros" in note and "smoothed" not in note


def test_lead_importance_uniform_line_counts_the_leads_that_can_hold_attribution():
    from ecgfm.data.record import CANONICAL_LEADS
    from ecgfm.explain.visualize import plot_lead_importance

    imp = np.zeros(12)
    imp[[0, 1, 7]] = 5.0                       # equal shares over a 3-lead record's leads
    counted = imp > 0
    ax = plot_lead_importance({"gradcam": imp}, CANONICAL_LEADS, counted=counted).axes[0]
    uniform = [ln for ln in ax.lines if ln.get_label().startswith("uniform")][0]
    assert uniform.get_ydata()[0] == pytest.approx(1 / 3) and uniform.get_label() == "uniform over 3 leads"
    assert ax.containers[0].get_label() == "gradcam (no lead ranking)"
    with pytest.raises(ValueError, match="counted must mark at least one"):
        plot_lead_importance({"gradcam": imp}, CANONICAL_LEADS, counted=np.zeros(12, bool))


def test_known_flag_records_stay_as_negatives_when_their_only_class_leaves():
    """A folder task's record with known 0/1 flags is a negative for every class it lacks (build_task keeps
    such records); its only positive flag being an untrainable class does not make it unlabelled."""
    from ecgfm.evaluate.tasks import TaskSpec, _drop_untrainable_classes

    spec = TaskSpec.from_config(_task(multilabel=True))
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], np.float32)      # pvc: no train positive
    splits = {"train": np.array([0, 1]), "val": np.array([2, 3]), "test": np.array([], np.int64)}
    known = np.array([True, True, True, False])          # record 3's labels were names, not known flags
    _, names, sp = _drop_untrainable_classes(spec, y, ["af", "rbbb", "pvc"], splits, [], known)
    assert names == ["af", "rbbb"] and sp["val"].tolist() == [2]


def test_report_top_leads_rank_the_records_read_leads_like_the_chart():
    import torch

    from ecgfm.explain.attribution import Attribution
    from ecgfm.explain.report import _lead_summary

    vals = torch.zeros(1, 12, 50)
    vals[0, [0, 1, 7]] = 1.0                               # equal shares over a 3-lead record's leads
    att = Attribution(values=vals, method="saliency", options={}, target=None, inputs=vals, fs=100.0,
                      lead_names=tuple(CANONICAL_LEADS), elapsed_s=0.0)
    counted = vals[0].abs().sum(1).numpy() > 0
    assert _lead_summary(att, CANONICAL_LEADS, counted=counted)["top"] is None      # was [I, II, V2]
    vals[0, 7] = 3.0
    assert _lead_summary(att, CANONICAL_LEADS, counted=counted)["top"] == ["V2"]


# ------------------------------------------------------------------------------ cache digest (review s27)
class _NpySource:
    """One ``.npy`` file ``(12, T)`` per record in ``root``."""

    name = "npy"

    def __init__(self, root):
        self.root = Path(root)

    def record_ids(self):
        return sorted(p.stem for p in self.root.glob("*.npy"))

    def load(self, rid):
        p = self.root / f"{rid}.npy"
        return ECGRecord(signal=np.load(p).astype(np.float32), fs=100.0, lead_mask=np.ones(12, bool),
                         record_id=rid, source=self.name, labels=("x",), header={"path": str(p)})


def test_cache_digest_sees_a_recording_replaced_by_another_of_the_same_length(tmp_path):
    """The digest hashed the index and records table only: a record file replaced by another recording of the
    same length, prepared again in place, kept the digest (memoised signal-copy checks and the 'CHANGED since
    pretraining' note read a stale cache as unchanged)."""
    from ecgfm.data.cache import cache_digest, digest_matches, prepare_corpus

    root, out = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(root / f"r{i}.npy", (0.1 * rng.standard_normal((12, 500))).astype(np.float32))
    prepare_corpus(_NpySource(root), out, PreprocessSpec(fs=100.0), shard_records=2, workers=0, progress=False)
    before, legacy = cache_digest(out), cache_digest(out, legacy=True)
    assert before.startswith("v2:") and not legacy.startswith("v2:")
    np.save(root / "r0.npy", (0.1 * np.random.default_rng(9).standard_normal((12, 500))).astype(np.float32))
    prepare_corpus(_NpySource(root), out, PreprocessSpec(fs=100.0), shard_records=2, workers=0, progress=False)
    assert cache_digest(out) != before and digest_matches(out, before) is False
    # a digest recorded before (no prefix) is compared in its own form: same index and table, so it matches
    assert cache_digest(out, legacy=True) == legacy and digest_matches(out, legacy) is True
    assert digest_matches(out, None) is None and digest_matches(tmp_path / "none", before) is None


# ------------------------------------------------------------------------------------- readers (review s27)
FIXTURE_REC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fixture" / "ptbxl" / "records100" \
    / "00000" / "00001_lr"
needs_fixture = pytest.mark.skipif(not FIXTURE_REC.with_suffix(".hea").is_file(),
                                   reason="needs ../shared/data/fixture (the shared fixture)")


def _mat_record(tmp_path: Path, val: np.ndarray, fmt: str, gain: int, names: list[str]) -> Path:
    import scipy.io

    tmp_path.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(tmp_path / "rm.mat", {"val": val}, format="4")
    lines = [f"rm {len(names)} 100 {val.shape[1]}"] + [f"rm.mat {fmt}+24 {gain}(0)/mV 16 0 0 0 0 {n}" for n in names]
    (tmp_path / "rm.hea").write_text("\n".join(lines) + "\n")
    return tmp_path / "rm"


@needs_fixture
def test_mat_records_read_as_wfdb_reads_them(tmp_path):
    """Format 80 (wfdb2mat's uint8 bytes = sample + 128) read 128 ADC units high; the invalid-sample value of
    formats other than 16 (format 32: -2**31) read as -2.1e6 mV instead of NaN; a packed format in a .mat was
    taken as plain integers."""
    import wfdb

    from ecgfm.data.readers.formats import read_wfdb

    w = wfdb.rdrecord(str(FIXTURE_REC), physical=False)
    dig = w.d_signal.T.astype(np.int64)
    dig8 = np.clip(np.round(dig / 10), -127, 127).astype(np.int64)
    p = _mat_record(tmp_path / "f80", (dig8 + 128).astype(np.uint8), "80", 100, list(w.sig_name))
    ours, theirs = read_wfdb(str(p)), wfdb.rdrecord(str(p))
    np.testing.assert_allclose(ours.signal[0], theirs.p_signal[:, 0], atol=1e-6)
    np.testing.assert_allclose(ours.signal[0, :5], dig8[0, :5] / 100, atol=1e-6)
    d32 = dig.astype(np.int32)
    d32[0, 10:20] = -2**31
    p = _mat_record(tmp_path / "f32", d32, "32", 1000, list(w.sig_name))
    sig = read_wfdb(str(p)).signal
    assert np.isnan(sig[0, 10:20]).all() and np.isfinite(sig[0, :10]).all()
    p = _mat_record(tmp_path / "f212", dig.astype(np.int16), "212", 1000, list(w.sig_name))
    with pytest.raises(ECGDataError, match=r"declares format\(s\) \['212'\] for a \.mat signal file"):
        read_wfdb(str(p))


@needs_fixture
def test_signals_of_one_file_declaring_two_formats_are_refused(tmp_path):
    import shutil

    from ecgfm.data.readers.formats import read_wfdb

    d = tmp_path / "mix"
    d.mkdir()
    shutil.copy(FIXTURE_REC.with_suffix(".dat"), d / "00001_lr.dat")
    lines = FIXTURE_REC.with_suffix(".hea").read_text().splitlines()
    lines[2] = lines[2].replace(".dat 16 ", ".dat 61 ", 1)          # lead II says 61 inside a format-16 file
    (d / "00001_lr.hea").write_text("\n".join(lines) + "\n")
    with pytest.raises(ECGDataError, match=r"declare different formats \['16', '61'\]"):
        read_wfdb(str(d / "00001_lr"))


@needs_fixture
def test_a_labels_csv_column_without_a_name_is_refused_as_a_default_label_column(tmp_path):
    """Its cells became labels named '' (a pandas to_csv() index column); named label_columns still read."""
    import shutil

    from ecgfm.data.readers.folder import FolderSource

    for ext in (".hea", ".dat"):
        shutil.copy(FIXTURE_REC.with_suffix(ext), tmp_path / f"00001_lr{ext}")
    (tmp_path / "labels.csv").write_text("record_id,,AF\n00001_lr,1,0\n")
    with pytest.raises(ECGDataError, match=r"column\(s\) \[2\] of the header .* have no name"):
        FolderSource(tmp_path, labels_csv="labels.csv")
    assert FolderSource(tmp_path, labels_csv="labels.csv", label_columns=["AF"]).label_columns == ["AF"]


@needs_fixture
def test_folder_records_without_a_labels_csv_row_are_named_in_a_warning(tmp_path, caplog):
    import logging
    import shutil

    from ecgfm.data.readers.folder import FolderSource

    for rid in ("00001_lr", "00002_lr"):
        for ext in (".hea", ".dat"):
            shutil.copy(FIXTURE_REC.with_suffix(ext), tmp_path / f"{rid}{ext}")
        text = (tmp_path / f"{rid}.hea").read_text().replace("00001_lr", rid)
        (tmp_path / f"{rid}.hea").write_text(text)
    (tmp_path / "labels.csv").write_text("record_id,AF\n00001_lr,1\n")
    with caplog.at_level(logging.WARNING, logger="ecgfm.data.readers.folder"):
        src = FolderSource(tmp_path, labels_csv="labels.csv")
    assert "1 record(s) of the folder have no row in" in caplog.text and "(00002_lr)" in caplog.text
    assert src.record_ids() == ["00001_lr", "00002_lr"] and src.load("00002_lr").labels == ()
