"""ecgfm.Encoder / Classifier inputs: an artifact without preprocessing still masks flat leads and fills NaN runs
(as the sweep's features of it do), classifiers trained on zero-filled leads are not run with lead masks, and a
batch of one keeps its batch axis in any container."""

from __future__ import annotations

import json

import numpy as np
import torch

import ecgfm
from ecgfm.artifacts import EncoderClassifier, save_encoder
from ecgfm.backbones import create_backbone
from ecgfm.data.preprocess import PreprocessSpec, preprocess_signal
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.explain.classifier import save_classifier


def test_encoder_without_preprocessing_masks_flat_leads_and_fills_nan(tmp_path):
    torch.manual_seed(0)
    bb = create_backbone("vit1d_test").eval()
    save_encoder(tmp_path / "enc", bb, None, fs=100.0, window_samples=250)
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    x = np.random.default_rng(0).standard_normal((12, 250)).astype(np.float32)
    x[11] = 0.0                                                   # V6 disconnected
    x12, _, mask = preprocess_signal(x, 100.0, np.ones(12, bool), PreprocessSpec.raw(100.0))   # the sweep's view
    assert not mask[11]
    with torch.no_grad():
        ref = bb.embed(torch.from_numpy(x12[None]), lead_mask=torch.from_numpy(mask[None])).numpy()[0]
    np.testing.assert_allclose(enc.embed(x, fs=100), ref, atol=1e-6)
    x[0, 100:110] = np.nan
    assert np.isfinite(enc.embed(x, fs=100)).all()


def test_batch_of_one_keeps_its_axis_in_any_container(tmp_path):
    save_encoder(tmp_path / "enc", create_backbone("vit1d_test").eval(), None, fs=100.0, window_samples=250)
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    x = np.random.default_rng(1).standard_normal((1, 12, 250)).astype(np.float32)
    for batch in (x, x.tolist(), torch.from_numpy(x)):
        assert enc.embed(batch, fs=100).shape == (1, 16)
    assert enc.embed(x[0], fs=100).shape == (16,)


def test_classifiers_trained_on_zero_filled_leads_are_not_run_with_lead_masks(tmp_path):
    """The explain demos' (and the zoo's) classifiers, and version-1 folders, never saw a lead mask: a lead-aware
    ViT must score a partial record on zero-filled leads, as trained."""
    torch.manual_seed(0)
    bb = create_backbone("vit1d_test")
    head = torch.nn.Linear(bb.num_features, 3)
    model = EncoderClassifier(bb, head).eval()
    spec = PreprocessSpec(fs=100.0)
    x = np.random.default_rng(0).standard_normal((1, 250)).astype(np.float32)
    from ecgfm.data.record import map_leads

    x12, m, _ = map_leads(x, ["II"])
    x12, _, m = preprocess_signal(x12, 100.0, m, spec)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x12[None])), -1).double().numpy()[0]   # zero-filled leads
    save_classifier(tmp_path / "demo", bb, head, spec, ["a", "b", "c"], multilabel=False, n_samples=250)
    v1 = tmp_path / "v1"
    v1.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(v1 / "classifier.safetensors"),
              metadata={"format": "ecgfm-classifier"})
    (v1 / "classifier.json").write_text(json.dumps({
        "format": "ecgfm-classifier", "format_version": 1,
        "backbone": {"name": "vit1d_test", "init_args": dict(bb.init_args)},
        "head": {"name": "linear", "args": {"in_dim": bb.num_features, "num_classes": 3, "bias": True}},
        "preprocess": spec.to_dict(), "fs": 100.0, "n_samples": 250, "class_names": ["a", "b", "c"],
        "postprocess": "softmax", "extra": {}}))
    for folder in (tmp_path / "demo", v1):
        clf = ecgfm.Classifier.load(folder)
        assert not clf.lead_aware
        np.testing.assert_allclose(clf.predict_proba(x, fs=100, leads=["II"]).to_numpy()[0], want, atol=1e-6)


def test_a_model_reading_a_lead_subset_is_preprocessed_on_its_leads_only(tmp_path):
    """ECGFounder's 1-lead layout (reads lead I) with a record-scope z-score: the statistics took every present
    lead, so the same lead I gave another embedding inside a 12-lead record. The API and the sweep's task caches
    now keep only the leads the backbone reads (PreprocessSpec.leads)."""
    from ecgfm.data.preprocess import with_input_leads
    from ecgfm.evaluate.sweep import resolve_checkpoint
    from ecgfm.export import export_encoder

    bb = create_backbone("net1d_test", in_channels=1, input_leads=["I"]).eval()
    spec = PreprocessSpec(fs=100.0, highpass=None, normalize="zscore", normalize_scope="record", clip=None)
    export_encoder(bb, tmp_path / "enc", spec, extra={"fs": 100.0, "crop_samples": 500})
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    rng = np.random.default_rng(0)
    lead_i = rng.standard_normal(500).astype(np.float32)
    x12 = 5.0 * rng.standard_normal((12, 500)).astype(np.float32)
    x12[0] = lead_i
    np.testing.assert_allclose(enc.embed(x12, fs=100), enc.embed(lead_i[None], fs=100, leads=["I"]), atol=1e-6)
    desc = resolve_checkpoint(str(tmp_path / "enc"), 500, load_weights=False)
    assert desc.preprocess.leads == ("I",)
    assert desc.preprocess.fingerprint() != spec.fingerprint()          # a cache of its own
    assert with_input_leads(spec, None) is spec and with_input_leads(spec, list(CANONICAL_LEADS)) is spec


def test_a_record_read_back_from_a_cache_is_not_preprocessed_twice(tmp_path):
    """CorpusCache.record gives the preprocessed signal: the API and the explain wrapper take it as it is when the
    cache has the model's spec (it was filtered and normalised a second time), and refuse it under another spec."""
    import pytest

    from ecgfm.data.cache import CorpusCache, prepare_corpus
    from ecgfm.data.record import ECGDataError
    from ecgfm.data.synthetic import SyntheticSource
    from ecgfm.explain.wrapper import ECGWrapper

    spec = PreprocessSpec(fs=100.0)
    src = SyntheticSource(n_records=2, seed=0, fs=500.0, duration=5.0)
    prepare_corpus(src, tmp_path / "c", spec, workers=0, progress=False)
    cache = CorpusCache(tmp_path / "c")
    raw = src.load(src.record_ids()[0])
    assert cache.record(0).record_id == raw.record_id
    bb = create_backbone("vit1d_test").eval()
    save_encoder(tmp_path / "enc", bb, spec, fs=100.0, window_samples=250)
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    np.testing.assert_allclose(enc.embed(cache.record(0)), enc.embed(raw), atol=1e-5)
    w = ECGWrapper(EncoderClassifier(bb, torch.nn.Linear(16, 2)), fs=100.0, preprocess=spec)
    torch.testing.assert_close(w.prepare(cache.record(0)), w.prepare(raw), atol=1e-5, rtol=1e-4)
    other = PreprocessSpec(fs=100.0, highpass=1.0)
    save_encoder(tmp_path / "enc2", bb, other, fs=100.0, window_samples=250)
    with pytest.raises(ECGDataError, match="already preprocessed"):
        ecgfm.Encoder.load(tmp_path / "enc2").embed(cache.record(0))
    with pytest.raises(ECGDataError, match="already preprocessed"):
        ECGWrapper(EncoderClassifier(bb, torch.nn.Linear(16, 2)), fs=100.0, preprocess=other).prepare(cache.record(0))


def test_a_cinc2017_record_file_is_scored_with_its_lead_named(tmp_path):
    """A CinC 2017 record's one lead is named 'ECG' (AliveCor); the CinC 2017 reader reads it as lead I. The API
    refused the very files its benchmark cell scored, with no way out, and naming the lead II by hand (accepted)
    put it in another row. Now the error says rename_leads={'ECG': 'I'}, which gives the reader's view."""
    from pathlib import Path

    import pytest

    from ecgfm.data.readers.formats import read_challenge
    from ecgfm.data.record import ECGDataError

    rec = Path(__file__).resolve().parents[3] / "shared" / "data" / "cinc2017" / "A00002.hea"
    if not rec.is_file():
        pytest.skip(f"{rec} not found (the shared CinC 2017 records)")
    torch.manual_seed(0)
    bb = create_backbone("vit1d_test")
    head = torch.nn.Linear(bb.num_features, 4)
    save_classifier(tmp_path / "clf", bb, head, PreprocessSpec(fs=100.0), ["N", "A", "O", "~"], multilabel=False,
                    n_samples=250)
    clf = ecgfm.Classifier.load(tmp_path / "clf")
    with pytest.raises(ECGDataError, match=r"rename_leads=\{'ECG': 'I'\}"):
        clf.predict_proba(rec)
    got = clf.predict_proba(rec, rename_leads={"ECG": "I"}).to_numpy()[0]
    reader = read_challenge(rec, rename_leads={"ECG": "I"})
    want = clf.predict_proba(reader.signal[:1], fs=reader.fs, leads=["I"]).to_numpy()[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="rename_leads"):
        clf.predict_proba(reader.signal[:1], fs=reader.fs, leads=["I"], rename_leads={"ECG": "I"})


def test_an_encoder_of_a_rate_keeping_cache_resamples_like_the_sweep(tmp_path):
    """An encoder whose preprocessing keeps the record rate (spec.fs null) but was trained at 100 Hz: the sweep and
    the explain wrapper resample other rates to 100 Hz; the API refused them."""
    torch.manual_seed(0)
    bb = create_backbone("vit1d_test").eval()
    save_encoder(tmp_path / "keep", bb, PreprocessSpec(fs=None), fs=100.0, window_samples=250)
    save_encoder(tmp_path / "at100", bb, PreprocessSpec(fs=100.0), fs=100.0, window_samples=250)
    x = np.random.default_rng(2).standard_normal((12, 500)).astype(np.float32)
    got = ecgfm.Encoder.load(tmp_path / "keep").embed(x, fs=200)
    np.testing.assert_allclose(got, ecgfm.Encoder.load(tmp_path / "at100").embed(x, fs=200), atol=1e-6)


def test_a_record_of_the_models_own_rate_keeping_cache_is_not_refused(tmp_path):
    """Resampling other rates to the model's (test above) must not make the API refuse a record read back from the
    model's own rate-keeping cache as "preprocessed with another spec"."""
    from ecgfm.data.cache import CorpusCache, prepare_corpus
    from ecgfm.data.synthetic import SyntheticSource

    spec = PreprocessSpec(fs=None)
    prepare_corpus(SyntheticSource(n_records=1, seed=0, fs=100.0, duration=5.0), tmp_path / "c", spec, workers=0,
                   progress=False)
    rec = CorpusCache(tmp_path / "c").record(0)
    torch.manual_seed(0)
    bb = create_backbone("vit1d_test").eval()
    save_encoder(tmp_path / "enc", bb, spec, fs=100.0, window_samples=250)
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    got = enc.embed(rec)
    with torch.no_grad():   # the cache's signal as it is (already preprocessed), windows of 250 samples
        x = torch.from_numpy(np.ascontiguousarray(rec.signal[:, :500].reshape(12, 2, 250).transpose(1, 0, 2)))
        want = bb.embed(x, lead_mask=torch.from_numpy(np.asarray(rec.lead_mask, bool))[None].expand(2, -1))
    np.testing.assert_allclose(got, want.mean(0).numpy(), atol=1e-5)


def test_a_record_preprocessed_by_the_public_function_is_not_preprocessed_again(tmp_path):
    """preprocess_record did not mark its output: the API filtered and normalised it a second time, and one
    preprocessed with another spec was accepted."""
    import pytest

    from ecgfm.data.preprocess import preprocess_record
    from ecgfm.data.record import ECGDataError
    from ecgfm.data.synthetic import SyntheticSource

    raw = SyntheticSource(n_records=1, seed=0, fs=100.0, duration=5.0).load(
        SyntheticSource(n_records=1, seed=0, fs=100.0, duration=5.0).record_ids()[0])
    spec = PreprocessSpec(fs=100.0)
    torch.manual_seed(0)
    save_encoder(tmp_path / "enc", create_backbone("vit1d_test").eval(), spec, fs=100.0, window_samples=250)
    enc = ecgfm.Encoder.load(tmp_path / "enc")
    done = preprocess_record(raw, spec)
    assert done.header["preprocessed"] == spec.to_dict()
    np.testing.assert_allclose(enc.embed(done), enc.embed(raw), atol=1e-5)      # the same, not filtered twice
    other = preprocess_record(raw, PreprocessSpec(fs=100.0, lowpass=30.0))
    with pytest.raises(ECGDataError, match="already preprocessed"):
        enc.embed(other)
    with pytest.raises(ECGDataError, match="already preprocessed"):
        preprocess_record(done, spec)


def test_a_bad_sampling_rate_is_one_clear_error(tmp_path):
    """fs=True was read as 1 Hz (another prediction, no error); fs=0 / NaN / negative crashed in the resampler."""
    import numpy as np
    import pytest
    import torch

    from ecgfm.api import Encoder
    from ecgfm.backbones import create_backbone
    from ecgfm.data.preprocess import PreprocessSpec
    from ecgfm.export import export_encoder

    torch.manual_seed(0)
    export_encoder(create_backbone("resnet1d_test"), tmp_path / "enc", PreprocessSpec(fs=100.0))
    enc = Encoder.load(tmp_path / "enc")
    x = np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32)
    for bad in (True, 0, float("nan"), -500, "500"):
        with pytest.raises(ValueError, match="fs must be a positive sampling rate"):
            enc.embed(x, fs=bad)
    ref = enc.embed(x, fs=100)
    for ok in (np.float64(100.0), np.array(100.0), torch.tensor(100.0), 100.0):   # np.load(npz)["fs"] is 0-d
        np.testing.assert_array_equal(enc.embed(x, fs=ok), ref)


def test_lists_of_records_grad_tensors_empty_batches_and_strides():
    """A list of records of different lengths failed with numpy's "inhomogeneous shape", a tensor that requires
    grad with "Can't call numpy()", an empty batch with "need at least one array to stack", and stride_samples=2.5
    silently became 2 (0: the default)."""
    import pytest
    import torch

    from ecgfm.api import Encoder
    from ecgfm.backbones import create_backbone
    from ecgfm.data.record import CANONICAL_LEADS

    torch.manual_seed(0)
    backbone = create_backbone("vit1d_test").eval()
    enc = Encoder(backbone, None, {"input": {"fs": 100.0, "leads": list(CANONICAL_LEADS), "window_samples": 250,
                                             "stride_samples": 250}}, "cpu")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 500)).astype(np.float32), rng.normal(size=(12, 750)).astype(np.float32)
    z = enc.embed([a, b], fs=100)
    assert z.shape[0] == 2
    np.testing.assert_allclose(z[0], enc.embed(a, fs=100), atol=1e-6)
    np.testing.assert_allclose(z[1], enc.embed(b, fs=100), atol=1e-6)
    t = torch.from_numpy(a).requires_grad_(True)
    np.testing.assert_allclose(enc.embed(t, fs=100), enc.embed(a, fs=100), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        enc.embed(np.zeros((0, 12, 500), np.float32), fs=100)
    with pytest.raises(ValueError, match="empty"):
        enc.embed([], fs=100)
    for bad in (2.5, 0, -1):
        with pytest.raises(ValueError, match="stride_samples"):
            enc.embed(a, fs=100, stride_samples=bad)
    np.testing.assert_allclose(enc.embed(a, fs=100, stride_samples=100.0), enc.embed(a, fs=100, stride_samples=100))
