"""Review s15 of ecgfm/data/preprocess.py: mains at 100 Hz (``notch_at_source``), resampling edge padding
(``resample_padtype``), unstable ``ba`` designs and non-finite outputs, and docstrings that said more than the code
does. Every existing spec keeps its dict, fingerprint and output (hard-coded below from the code before the review).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ecgfm.data.preprocess as P
from ecgfm.data.preprocess import PreprocessSpec, butterworth, preprocess_signal, resample
from ecgfm.data.record import ECGDataError


def _record(fs: int = 500, seconds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A fixed synthetic 12-lead record (two leads absent): 1.1 Hz 'beats', 0.3 mV 50 Hz mains, DC offsets, slow
    wander and a 17 Hz component."""
    t = np.arange(int(fs * seconds)) / fs
    sig = np.zeros((12, t.size), np.float32)
    for i in range(12):
        sig[i] = (np.sin(2 * np.pi * 1.1 * t + i) + 0.3 * np.cos(2 * np.pi * 50 * t) + 0.5 + 0.1 * i
                  + 0.2 * np.sin(2 * np.pi * 0.2 * t) + 0.05 * np.sin(2 * np.pi * 17 * t * (1 + 0.01 * i)))
    mask = np.ones(12, bool)
    mask[[3, 7]] = False
    return sig, mask


def _existing_specs() -> dict[str, PreprocessSpec]:
    from ecgfm.zoo import ecgfounder, hubert_ecg, stmem

    return {"default": PreprocessSpec(),
            "notch500": PreprocessSpec(fs=500, notch=50, lowpass=40),
            "fourier_cascade": PreprocessSpec(fs=250, resample_method="fourier", bandpass_mode="cascade", lowpass=40,
                                              highpass=0.67, filter_order=5),
            "ecgfounder": ecgfounder.preprocess({}),
            "stmem": stmem.preprocess({}),
            "hubert": hubert_ecg.preprocess({})}


# name: (fingerprint, sum of |output|, 21 output samples (leads I, aVL, V6 at 7 fixed times), output rate, output
# samples), computed with the code before this review. Since 2026-12-06 a spec written with whole numbers (fs=500) has
# the fingerprint of the same spec written with floats (fs=500.0; every shipped spec): notch500 was e5b00e3814fe74f2
# and fourier_cascade 15d409db3b6f3bad before (their outputs are unchanged). The outputs were first pinned by a
# sha256 of their bytes; that is not portable: the notch's filtfilt rounds differently on a CPU without AVX-512 (the
# 2026-12-06 machine, numpy's X86_V3 kernels) than on the one the digests were taken on, by float32 ulps. So the
# output is compared with a tolerance far below any change of the preprocessing (1e-5 on a signal of unit scale).
_EXPECTED = {
    "default": ("15af357ac92c9c3a", 8848.9130, (0.157900, 0.274105, -0.283086, -1.453375, 0.189442, 0.117652, -0.127990, -0.456874, -0.717564, 1.308689, 0.150570, 1.602011, 0.007762, -0.313627, -0.553598, -0.460263, 1.363181, 0.424103, 1.642185, 0.044882, -0.274019), 100.0, 1000),
    "ecgfounder": ("d5afd6baeedf1a95", 30299.2937, (-0.987609, -1.418184, 0.007708, -1.018615, 0.007708, 0.477664, 0.731189, -4.198374, -4.727417, 0.007708, 0.007708, 2.087025, -0.196670, -0.056645, -3.165074, -3.719885, 1.289248, 0.007708, 2.150922, -0.854423, -0.697119), 500.0, 5000),
    "fourier_cascade": ("5e68af8fc0a06c39", 22251.0813, (-0.171253, -0.484479, -0.593811, -1.341625, 0.021229, 0.102879, 0.269488, -0.758824, -1.105409, 1.087232, 0.338289, 1.475865, -0.224158, -0.086267, -0.778562, -1.122584, 1.286590, 0.656382, 1.524160, -0.289869, -0.159723), 250.0, 2500),
    "hubert": ("aea1da85b593b964", 4180.8095, (0.151846, 0.228294, 0.041431, -0.624601, 0.090602, -0.363972, -0.458850, 0.010924, -0.070585, 0.735212, -0.133833, 0.088030, 0.313098, 0.190431, -0.038889, 0.010565, 0.751482, -0.051732, 0.025308, 0.396543, 0.278876), 100.0, 1000),
    "notch500": ("032ba4ffc3a8c351", 44698.6374, (0.001018, -0.146580, -0.512398, -1.274035, -0.006778, -0.556373, -0.399208, -0.621218, -0.786056, 1.039953, 0.342862, 1.422572, -0.722186, -0.587964, -0.634310, -0.804558, 1.239113, 0.659911, 1.477775, -0.585913, -0.451043), 500.0, 5000),
    "stmem": ("db787876bcaeec12", 22250.8736, (-0.155715, -0.465438, -0.573546, -1.312997, 0.034614, 0.115351, 0.280097, -0.748490, -1.095165, 1.098052, 0.348912, 1.486787, -0.213683, -0.075756, -0.771078, -1.115128, 1.294245, 0.663985, 1.531835, -0.282344, -0.152188), 250.0, 2500),
}


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_existing_specs_keep_fingerprint_dict_and_output(name):
    spec = _existing_specs()[name]
    fingerprint, abs_sum, samples, fs_out, n_out = _EXPECTED[name]
    assert spec.fingerprint() == fingerprint
    assert "notch_at_source" not in spec.to_dict() and "resample_padtype" not in spec.to_dict()
    sig, mask = _record()
    y, fs, _ = preprocess_signal(sig, 500, mask, spec)
    assert (fs, y.shape) == (fs_out, (12, n_out))
    y = y.astype(np.float64)
    n = y.shape[1]
    at = y[[0, 5, 11]][:, [0, 1, n // 7, n // 3, n // 2, n - 2, n - 1]].ravel()
    assert np.abs(y).sum() == pytest.approx(abs_sum, rel=1e-6)
    np.testing.assert_allclose(at, samples, rtol=0, atol=1e-5)


def test_default_spec_fingerprint_is_unchanged():
    assert PreprocessSpec().fingerprint() == "15af357ac92c9c3a"
    assert PreprocessSpec.from_dict(PreprocessSpec().to_dict()) == PreprocessSpec()


# ------------------------------------------------------------------------------- 1. notch at the source rate
def _mains_record() -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(500 * 10) / 500
    ecg = np.zeros((12, t.size), np.float32)
    mask = np.zeros(12, bool)
    mask[0] = True
    ecg[0] = np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.cos(2 * np.pi * 50 * t)
    return ecg, mask


def _alternation(y: np.ndarray) -> float:
    k = np.arange(y.shape[-1])[100:-100]
    return abs(float(np.mean(y[0][100:-100] * (-1.0) ** k)))


def test_notch_at_source_removes_50hz_mains_from_a_100hz_output():
    ecg, mask = _mains_record()
    y, _, _ = preprocess_signal(ecg, 500, mask, PreprocessSpec(fs=100, normalize="none", clip=None))
    assert 0.12 < _alternation(y) < 0.18   # ~half of the 0.3 mV mains survives 500 -> 100 Hz (documented)
    spec = PreprocessSpec(fs=100, notch=50, notch_at_source=True, normalize="none", clip=None)
    assert spec.notch_problem() is None
    y2, fs, _ = preprocess_signal(ecg, 500, mask, spec)
    assert fs == 100.0 and _alternation(y2) < 0.005
    # the same as notching at 500 Hz by hand, then resampling and filtering
    by_hand = P.bandpass(resample(P.notch(ecg[[0]], 500.0, 50.0), 500, 100), 100.0, 0.5, None, 3)
    np.testing.assert_array_equal(y2[[0]], by_hand)


def test_notch_at_source_spec_fields_and_config():
    spec = PreprocessSpec(fs=100, notch=50, notch_at_source=True)
    assert spec.to_dict()["notch_at_source"] is True
    assert spec.fingerprint() != PreprocessSpec(fs=100, notch=50).fingerprint()
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert "notch_at_source" in PreprocessSpec(fs=100, notch=50).notch_problem()   # the refusal says how to fix it
    with pytest.raises(ValueError, match="notch_at_source=True needs a notch"):
        PreprocessSpec(notch_at_source=True)
    with pytest.raises(ValueError, match="exclusive"):
        PreprocessSpec(notch=50, notch_at_source=True, notch_first=True)
    with pytest.raises(ValueError, match="true or false"):
        PreprocessSpec(notch=50, notch_at_source="yes")
    # a training config at 100 Hz with a 50 Hz notch at the source rate is accepted (without it: refused)
    from hydra import compose, initialize_config_dir

    from ecgfm.conf import config_dir
    from ecgfm.config import ConfigError, validate_prepare_config, validate_train_config

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=mae", "preprocess.notch=50",
                                                      "preprocess.notch_at_source=true", "out_dir=/tmp/x"])
        bad = compose(config_name="train", overrides=["+experiment=mae", "preprocess.notch=50", "out_dir=/tmp/x"])
        prep = compose(config_name="prepare", overrides=["out=/tmp/x", "spec.notch=50", "+spec.notch_at_source=true"])
    validate_train_config(cfg)
    with pytest.raises(ConfigError, match="preprocess.notch"):
        validate_train_config(bad)
    assert PreprocessSpec.from_dict(validate_prepare_config(prep)["spec"]).notch_at_source is True


def test_notch_at_source_refuses_a_record_too_slow_for_the_notch():
    ecg, mask = _mains_record()
    spec = PreprocessSpec(fs=100, notch=50, notch_at_source=True)
    with pytest.raises(ECGDataError, match="rate 100 Hz"):
        preprocess_signal(ecg[:, ::5], 100, mask, spec)


def test_notch_at_source_without_resampling_is_notch_first():
    sig, mask = _record()
    a, _, _ = preprocess_signal(sig, 500, mask, PreprocessSpec(fs=None, notch=50, lowpass=40, notch_at_source=True))
    b, _, _ = preprocess_signal(sig, 500, mask, PreprocessSpec(fs=None, notch=50, lowpass=40, notch_first=True))
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------- 2. resampling edge padding
def test_resample_padtype_removes_the_edge_spike_of_a_dc_offset():
    from scipy import signal as sps

    x = np.ones((1, 5000), np.float32)
    zero = resample(x, 500, 100)
    assert abs(zero[0, 0] - 1.0) > 0.3   # zeros beyond the ends: the offset drops at each end
    np.testing.assert_array_equal(zero, sps.resample_poly(x, 1, 5, axis=-1).astype(np.float32))
    for padtype in ("line", "mean", "median", "edge"):
        y = resample(x, 500, 100, padtype=padtype)
        assert y.shape == zero.shape and np.abs(y - 1.0).max() < 1e-5, padtype
    with pytest.raises(ValueError, match="padtype"):
        resample(x, 500, 100, padtype="wrap")
    with pytest.raises(ValueError, match="polyphase"):
        resample(x, 500, 100, method="fourier", padtype="line")


def test_resample_padtype_spec_field():
    t = np.arange(5000) / 500
    sig = np.zeros((12, t.size), np.float32)
    mask = np.zeros(12, bool)
    mask[0] = True
    sig[0] = 2.0 + 0.5 * np.sin(2 * np.pi * 1.0 * t)   # a 2 mV offset
    raw = dict(highpass=None, normalize="none", clip=None)
    zero, _, _ = preprocess_signal(sig, 500, mask, PreprocessSpec(**raw))
    line, _, _ = preprocess_signal(sig, 500, mask, PreprocessSpec(**raw, resample_padtype="line"))
    ref = 2.0 + 0.5 * np.sin(2 * np.pi * np.arange(1000) / 100)
    assert np.abs(zero[0] - ref)[:3].max() > 0.5
    assert np.abs(line[0] - ref).max() < 0.01
    spec = PreprocessSpec(resample_padtype="mean")
    assert spec.to_dict()["resample_padtype"] == "mean" and PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="resample_padtype"):
        PreprocessSpec(resample_padtype="wrap")
    with pytest.raises(ValueError, match="polyphase"):
        PreprocessSpec(resample_method="fourier", resample_padtype="line")


# ---------------------------------------------------------------- 3. unstable ba designs and non-finite outputs
@pytest.mark.parametrize("order", [6, 8])
def test_ba_design_refuses_unstable_coefficients(order):
    x = np.ones((1, 5000))
    x[:, 2500:] += 1.0
    with pytest.raises(ValueError, match=f"filter_order={order}.*filter_design='sos'"):
        butterworth(x, 500, 0.5, None, order, "cascade", "ba")
    with pytest.raises(ValueError, match="filter_design='ba'"):   # a spec at that rate: refused when built
        PreprocessSpec(fs=500, filter_order=order, filter_design="ba", bandpass_mode="cascade")
    spec = PreprocessSpec(fs=None, filter_order=order, filter_design="ba", bandpass_mode="cascade")
    with pytest.raises(ValueError, match="filter_design='ba'"):   # the record's own rate: refused when applied
        preprocess_signal(np.tile(x.astype(np.float32), (12, 1)), 500, np.ones(12, bool), spec)


def test_ba_design_accepts_stable_coefficients():
    x = np.ones((1, 5000))
    x[:, 2500:] += 1.0
    for fs, hp, lp, order, mode in [(500, 0.5, None, 4, "cascade"), (500, 0.67, 40.0, 4, "bandpass"),
                                    (250, 0.67, 40.0, 5, "cascade"), (100, 0.05, 47.0, 4, "bandpass")]:
        a = butterworth(x, fs, hp, lp, order, mode, "ba")
        b = butterworth(x, fs, hp, lp, order, mode, "sos")
        assert np.abs(a - b).max() < 1e-3, (fs, hp, lp, order)
    # designs a few hundredths of a standard deviation off their sections filter worked before and still do (a pole
    # criterion had refused them): the error is measured
    for fs, order in [(250, 6), (1000, 4), (500, 5)]:
        butterworth(x, fs, 0.5 if fs != 250 else 0.67, 40.0, order, "bandpass", "ba")


def test_non_finite_filter_output_is_refused(monkeypatch):
    sig, mask = _record()

    def broken(x, *args, **kwargs):
        return np.full_like(np.asarray(x, dtype=np.float32), np.nan)

    monkeypatch.setattr(P, "butterworth", broken)
    monkeypatch.setattr(P, "bandpass", broken)
    for spec in (PreprocessSpec(), PreprocessSpec(filter_design="ba", bandpass_mode="cascade", normalize="none")):
        with pytest.raises(ECGDataError, match="not finite.*filter_order"):
            preprocess_signal(sig, 500, mask, spec)


def test_non_finite_normalised_output_is_refused(monkeypatch):
    sig, mask = _record()
    monkeypatch.setattr(P, "_normalize_rows", lambda x, *a: np.full_like(x, np.inf))
    with pytest.raises(ECGDataError, match="normalised signal is not finite"):
        preprocess_signal(sig, 500, mask, PreprocessSpec(clip=None))


# ----------------------------------------------------------------------------------- 4. and 5. the docstrings
def test_module_docstring_says_what_is_bit_identical():
    doc = " ".join(P.__doc__.split())
    assert "bit-identical to the plain scipy calls" not in doc
    assert "3 * (2 * len(sos) + 1)" in doc and "scipy's default padding" in doc
    # and that is what the code does: a single high-pass by the two paths differs, mostly at the edges
    x = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32)
    a = P.bandpass(x, 100.0, 0.5, None, 3)
    b = butterworth(x, 100.0, 0.5, None, 3, "cascade", "sos")
    d = np.abs(a - b)
    assert d[:, :20].max() > 0.1 and d[:, :20].max() > 20 * d[:, 300:700].max()


def test_docstrings_list_every_step_and_describe_the_evidence_resampling():
    doc = " ".join(P.__doc__.split())
    assert "clipping to ``[-clip, clip]``" in doc and "notch_at_source" in doc
    assert "at or before" in " ".join(P.preprocess_record.__doc__.split())
    assert "nearest-neighbour" not in P.preprocess_record.__doc__
    rdoc = " ".join(P.resample.__doc__.split())
    assert "ceil(T * up / down)" in rdoc and "int(T * fs_out / fs_in)" in rdoc
    # the evidence mask takes the sample at or before (not the nearest), and the lengths are as documented
    from ecgfm.data.record import ECGRecord

    n = 3601
    sig = np.random.default_rng(1).standard_normal((12, n)).astype(np.float32)
    evidence = np.zeros((12, n), bool)
    evidence[:, 3] = True   # 360 -> 100 Hz: output sample 1 is at input 3.6: nearest would take input 4, floor 3
    rec = ECGRecord(signal=sig, fs=360.0, lead_mask=np.ones(12, bool), record_id="r", source="test", evidence=evidence)
    out = P.preprocess_record(rec, PreprocessSpec())
    assert out.signal.shape[1] == math.ceil(n * 5 / 18)
    assert out.evidence[0, 1] and not out.evidence[0, 0] and not out.evidence[0, 2]
    assert resample(sig, 360, 100, method="fourier").shape[1] == int(n * 100 / 360)


def test_a_run_started_before_the_new_fields_still_resumes(tmp_path):
    """A run folder whose config.yaml predates notch_at_source / resample_padtype (every run started before them)
    was refused on a rerun ('preprocess.notch_at_source: None -> False'): an absent added field reads as its default;
    setting it now is still a change of recipe."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ecgfm.config import ConfigError
    from ecgfm.conf import config_dir
    from ecgfm.train.checkpoints import check_resume_config

    def cfg(*overrides: str):   # the composed train config, less the parts that only resolve inside a Hydra run
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            tree = OmegaConf.to_container(compose(config_name="train", overrides=["+experiment=mae", *overrides]))
        tree.pop("logger", None)
        tree["out_dir"] = str(tmp_path)
        return OmegaConf.create(tree)

    old = OmegaConf.to_container(cfg(), resolve=True)   # as a run writes it
    for name in ("notch_at_source", "resample_padtype"):
        del old["preprocess"][name]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    check_resume_config(tmp_path, cfg())                                   # same recipe: resumes
    with pytest.raises(ConfigError, match=r"preprocess\.resample_padtype: 'constant' -> 'line'"):
        check_resume_config(tmp_path, cfg("preprocess.resample_padtype=line"))


def test_an_unstable_ba_spec_is_refused_when_built():
    """Refused when the spec is made (a config, an artifact), not record by record in a prepare run that then
    skips every record; stable ba specs (ECGFounder's) are built as before."""
    with pytest.raises(ValueError, match="filter_design='ba' with filter_order=6"):
        PreprocessSpec(fs=500, filter_order=6, filter_design="ba", bandpass_mode="cascade")
    PreprocessSpec(fs=500, highpass=0.5, lowpass=40.0, filter_order=4, filter_design="ba")
    PreprocessSpec(fs=None, filter_order=8, filter_design="ba")      # the rate decides: checked when applied
