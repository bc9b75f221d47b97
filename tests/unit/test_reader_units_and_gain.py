"""WFDB reader: channels that are not ECG leads are dropped by their units, ADC gain 0 is WFDB's "uncalibrated"
(default 200 adu/mV), and a challenge ``.mat`` holding NaN says NaN.

* an ICU-style record (II, V, AVR in mV next to ABP in mmHg, PLETH and RESP in NU) was refused whole ("lead 'ABP' has
  units 'mmHg', which are not a voltage"), and ``rename_leads`` could not help because units were checked before
  lead names were mapped;
* a header gain of 0 was called "impossible", though the WFDB header(5) page defines it as an uncalibrated signal
  and ``wfdb.rdheader`` reads it as 200;
* a float ``val`` with NaN was reported as "holds non-integer values".
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm.data.readers import read_challenge, read_wfdb
from ecgfm.data.readers.formats import parse_header, read_header
from ecgfm.data.record import CANONICAL_LEADS

from tests.unit.test_reader_bad_input import _raises

FS, N = 250, 1000
LOGGER = "ecgfm.data.readers.formats"




def _icu(tmp_path: Path, names: list[str], units: list[str], name: str = "icu") -> tuple[Path, np.ndarray]:
    """A format-16 record of ``names`` with ``units``: ECG-like rows in mV, ABP around 90 mmHg, PLETH / RESP in
    NU. Returns the header and the signal as wfdb reads it back ``(n_sig, N)``."""
    t = np.arange(N) / FS
    rows = []
    for k, (lead, unit) in enumerate(zip(names, units)):
        if unit == "mmHg":
            rows.append(90 + 30 * np.sin(2 * np.pi * 1.2 * t))
        elif unit == "NU":
            rows.append(0.5 + 0.4 * np.sin(2 * np.pi * (0.25 + k) * t))
        else:
            rows.append((0.3 + 0.1 * k) * np.sin(2 * np.pi * (1 + k) * t))
    sig = np.column_stack(rows)
    wfdb.wrsamp(name, fs=FS, units=units, sig_name=names, p_signal=sig, fmt=["16"] * len(names),
                write_dir=str(tmp_path))
    return tmp_path / f"{name}.hea", wfdb.rdrecord(str(tmp_path / name)).p_signal.T


ICU_NAMES = ["II", "V", "AVR", "ABP", "PLETH", "RESP"]
ICU_UNITS = ["mV", "mV", "mV", "mmHg", "NU", "NU"]


# ------------------------------------------------------------------------------------- non-voltage channels
def test_icu_record_drops_non_voltage_channels(tmp_path, caplog):
    hea, phys = _icu(tmp_path, ICU_NAMES, ICU_UNITS)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = read_wfdb(hea, rename_leads={"V": "V5"})   # "V": a chest lead of unknown position, the user's call
    assert rec.header["dropped_leads"] == ["ABP", "PLETH", "RESP"]
    assert rec.header["dropped_units"] == {"ABP": "mmHg", "PLETH": "NU", "RESP": "NU"}
    assert rec.header["lead_names"] == ICU_NAMES and rec.header["units"] == ICU_UNITS   # as published
    present = [CANONICAL_LEADS[i] for i in np.flatnonzero(rec.lead_mask)]
    assert present == ["II", "aVR", "V5"]
    for lead, row in (("II", 0), ("V5", 1), ("aVR", 2)):
        np.testing.assert_allclose(rec.signal[CANONICAL_LEADS.index(lead)], phys[row], atol=1e-6)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(hea) in m and "ABP [mmHg]" in m and "not a voltage" in m for m in warned), warned


def test_icu_record_with_an_unknown_voltage_name_keeps_the_lead_name_error(tmp_path):
    # the units no longer stop the record; the voltage channel "V" still needs a name (rename_leads)
    hea, _ = _icu(tmp_path, ICU_NAMES, ICU_UNITS)
    err = _raises(hea, r"unknown lead name 'V'", read_wfdb, hea)
    assert "rename_leads" in err.problem and "not a voltage" not in err.problem


def test_frank_and_non_voltage_channels_are_listed_in_header_order(tmp_path):
    hea, _ = _icu(tmp_path, ["I", "vx", "ABP", "II"], ["mV", "mV", "mmHg", "mV"], name="mix")
    rec = read_wfdb(hea)
    assert rec.header["dropped_leads"] == ["vx", "ABP"] and rec.header["dropped_units"] == {"ABP": "mmHg"}
    assert rec.lead_mask.sum() == 2


def test_record_without_a_voltage_channel_is_refused(tmp_path):
    hea, _ = _icu(tmp_path, ["ABP", "PLETH"], ["mmHg", "NU"], name="novolt")
    _raises(hea, r"no channel has voltage units .*ABP \[mmHg\], PLETH \[NU\]", read_wfdb, hea)


@pytest.mark.parametrize("rename", [None, {"ABP": "I"}])
def test_standard_lead_in_non_voltage_units_is_still_refused(tmp_path, rename):
    # "II" (or a channel renamed to I) in mmHg is a corrupt header, not an ICU channel to drop silently
    names, units = (["II", "ABP"], ["mmHg", "mV"]) if rename is None else (["II", "ABP"], ["mV", "mmHg"])
    hea, _ = _icu(tmp_path, names, units, name="bad")
    lead = "II" if rename is None else "ABP"
    _raises(hea, rf"lead '{lead}' has units 'mmHg', which are not a voltage", read_wfdb, hea, rename_leads=rename)


def test_records_of_ecg_leads_only_are_unchanged(tmp_path, caplog):
    hea, _ = _icu(tmp_path, ["I", "II"], ["mV", "uV"], name="plain")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = read_wfdb(hea)
    assert rec.header["dropped_leads"] == [] and "dropped_units" not in rec.header
    assert "uncalibrated_leads" not in rec.header and not caplog.records


# ---------------------------------------------------------------------------------------------------- gain 0
def _with_gain(tmp_path: Path, gain: str) -> Path:
    hea, _ = _icu(tmp_path, ["I", "II"], ["mV", "mV"], name="g")
    text = hea.read_text().splitlines()
    text[1] = re.sub(r"^(\S+ 16 )[^(]+\(", rf"\g<1>{gain}(", text[1])   # the first signal's gain only
    hea.write_text("\n".join(text) + "\n")
    return hea


def test_gain_zero_is_uncalibrated_default_200(tmp_path, caplog):
    hea = _with_gain(tmp_path, "0")
    h = read_header(hea)
    assert h.adc_gain[0] == 200.0 and h.uncalibrated == ["I"]
    assert wfdb.rdheader(str(hea.with_suffix(""))).adc_gain[0] == 200.0      # what wfdb reads
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = read_wfdb(hea)
    expected = wfdb.rdrecord(str(hea.with_suffix(""))).p_signal.T[0]          # digital / 200
    np.testing.assert_allclose(rec.signal[CANONICAL_LEADS.index("I")], expected, atol=1e-6)
    assert rec.header["gain"][0] == 200.0 and rec.header["uncalibrated_leads"] == ["I"]
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(hea) in m and "uncalibrated" in m and "200" in m for m in warned), warned


@pytest.mark.parametrize("gain", ["-1000", "nan", "inf", "x"])
def test_other_impossible_gains_are_still_refused(tmp_path, gain):
    hea = _with_gain(tmp_path, gain)
    _raises(hea, rf"impossible ADC gain '{re.escape(gain)}' for I", read_wfdb, hea)


def test_gain_zero_in_a_challenge_header(tmp_path):
    val = np.random.default_rng(0).integers(-500, 500, (2, 500)).astype(np.int16)
    sums = [(int(v.astype(np.int64).sum()) + 32768) % 65536 - 32768 for v in val]
    scipy.io.savemat(tmp_path / "C0.mat", {"val": val}, format="4")
    lines = ["C0 2 500 500"] + [f"C0.mat 16+24 {g}(0)/mV 16 0 {int(v[0])} {c} 0 {lead}"
                                for v, g, c, lead in zip(val, ("0", "1000"), sums, ("I", "II"))]
    (tmp_path / "C0.hea").write_text("\n".join(lines) + "\n")
    rec = read_challenge(tmp_path / "C0")
    np.testing.assert_allclose(rec.signal[0], val[0] / 200.0, atol=1e-6)
    np.testing.assert_allclose(rec.signal[1], val[1] / 1000.0, atol=1e-6)
    assert rec.header["uncalibrated_leads"] == ["I"]


def test_parse_header_gain_zero_without_description():
    h = parse_header("r 1 250 10\nr.dat 16 0 16 0 0 0 0\n")
    assert h.adc_gain == [200.0] and h.uncalibrated == ["signal 0"]


# --------------------------------------------------------------------------------------- challenge .mat NaN
def _float_mat(tmp_path: Path, val: np.ndarray) -> Path:
    lines = ["F1 2 500 500"] + [f"F1.mat 16+24 1000(0)/mV 16 0 0 0 0 {lead}" for lead in ("I", "II")]
    (tmp_path / "F1.hea").write_text("\n".join(lines) + "\n")
    scipy.io.savemat(tmp_path / "F1.mat", {"val": val}, format="4")
    return tmp_path / "F1.hea"


def test_challenge_mat_with_nan_says_nan(tmp_path):
    val = np.round(np.random.default_rng(0).normal(0, 300, (2, 500)))
    val[1, 480:] = np.nan
    hea = _float_mat(tmp_path, val)
    err = _raises(tmp_path / "F1.mat", r"'val' holds NaN \(20 NaN of 1000 values, first in II at sample 480",
                  read_challenge, hea)
    assert "non-integer" not in err.problem and "-32768" in err.problem


def test_challenge_mat_with_infinity_says_infinite(tmp_path):
    val = np.round(np.random.default_rng(0).normal(0, 300, (2, 500)))
    val[0, 3] = np.inf
    _raises(tmp_path / "F1.mat", r"'val' holds infinite values \(1 infinite of 1000 values, first in I at sample 3",
            read_challenge, _float_mat(tmp_path, val))


def test_challenge_mat_with_fractions_is_still_non_integer(tmp_path):
    val = np.random.default_rng(0).normal(0, 1, (2, 500))   # millivolts where ADC units belong
    _raises(tmp_path / "F1.mat", r"'val' holds non-integer values", read_challenge, _float_mat(tmp_path, val))
