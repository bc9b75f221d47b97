"""Readers for one ECG record in a file format: WFDB, PhysioNet challenge ``.hea`` + ``.mat``, CPSC 2018 MATLAB.

Every reader returns a validated :class:`~ecgfm.data.record.ECGRecord` (``(12, T)`` float32 mV, canonical lead
order via :func:`~ecgfm.data.record.map_leads`) whose ``header`` keeps the original facts (units, gain,
baseline, format, lead names as published, dropped leads, path, rate), and raises
:class:`~ecgfm.data.record.ECGDataError` naming the file and the problem for bad input.

What is written by hand, and why (``wfdb`` is used for everything else):

- the WFDB header parser (:func:`parse_header`): ``wfdb.rdheader`` silently replaces values it cannot parse by
  defaults (a negative or NaN rate becomes 250 Hz), hiding corrupt headers, and costs ~5 ms per header (pandas
  look-ups per field), 10x the cost of reading a 10 s 12-lead signal. An ADC gain of 0 is not corrupt: the WFDB
  header(5) page defines it as an uncalibrated signal, read with the default 200 adu/mV (as ``wfdb.rdheader``
  does); the record is read, a warning says so and ``header["uncalibrated_leads"]`` names the signals;
- a signal-file size check before decoding: on a truncated file ``wfdb.rdrecord`` fails with messages that
  name neither the file nor the problem ("operands could not be broadcast together...", "Samples were not
  loaded correctly");
- decoding of the plain-integer formats 16, 61, 32 and 80 with ``numpy.fromfile`` (same rules as
  ``wfdb.rdrecord(physical=True)``, tested to agree); every other format (212, 24, 310, 311, FLAC, several
  samples per frame, skew) is decoded by ``wfdb.rdrecord``.

Strict validation (nothing is read that the header does not account for exactly; each failure is an
:class:`~ecgfm.data.record.ECGDataError`, i.e. a skipped record with its reason in a conversion report):

- signal files named by a header must resolve inside the dataset root (``root``; default the header's folder):
  an absolute name or one that climbs out with ``..`` is refused before anything is opened;
- the byte size of each signal file must agree with signals x samples x bytes per sample of its format (plus
  the byte offset); a file too long means the header's signal count or length is wrong (leads would be
  scrambled), one too short is truncated. For ``.mat`` files, the ``val`` array's shape must agree;
- the header's checksums (16-bit sums of each signal's samples) must match the samples, computed on the integer
  samples already read (one vectorised sum). Headers whose checksums are all 0 (CinC 2017 writes 0 as a
  placeholder) are not verified; ``record.header["checksum"]`` says ``"verified"`` or why not;
- the sampling rate must be plausible: within ``fs_range`` (default :data:`FS_RANGE`, 50-10,000 Hz);
- the record must fit in memory: more than :data:`MAX_RECORD_SAMPLES` values (signals x samples, ~2 GB as float32;
  estimated from the header before any sample is read) is refused with a message saying to split it. Samples are
  converted to float32 in blocks, so that reading a record takes little more than its float32 array.

Multi-segment records (PhysioNet long-term and ICU databases: a master header listing segments, each a
single-segment record, ``~`` for a gap, and for a variable layout a layout header naming the signals) are read
whole by :func:`read_wfdb` (:func:`parse_multi_header`): one record, the segments concatenated, gaps and the
signals a segment lacks as NaN, every segment checked as above. The segments are read here rather than by
``wfdb.rdrecord(m2s=True)``, whose errors on a truncated segment name no file, which fails on a gap in a
fixed-layout record, and which joins a signal's segments without converting their units.

Channels that are not ECG leads (an ICU monitor's ``ABP`` in mmHg, ``PLETH`` / ``RESP`` in normalised units) are
dropped by their units, before the lead names are mapped, with a warning naming the file; they are listed in
``header["dropped_leads"]`` and their units in ``header["dropped_units"]``. A record is refused when no channel
with voltage units remains, or when a standard ECG lead name (after ``rename_leads``) carries units that are not a
voltage (a corrupt header: dropping that lead would silently lose it).
"""

from __future__ import annotations

import codecs
import functools
import logging
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.io
import wfdb

from ecgfm.data.record import (
    CANONICAL_LEADS,
    LEAD_PLACEHOLDER,
    ECGDataError,
    ECGRecord,
    canonical_lead,
    map_leads,
)

log = logging.getLogger(__name__)

__all__ = [
    "FS_RANGE",
    "MAX_FS",
    "MAX_RECORD_SAMPLES",
    "MultiSegmentHeader",
    "WFDBHeader",
    "check_fs_range",
    "header_path",
    "is_multi_segment",
    "multi_segment_members",
    "normalise_sex",
    "parse_header",
    "parse_header_comments",
    "parse_multi_header",
    "read_challenge",
    "read_cpsc2018",
    "read_header",
    "read_wfdb",
]

#: Highest possible sampling rate (Hz) of any header; anything above is a corrupt header whatever ``fs_range`` says.
MAX_FS = 100_000.0

#: Default range of plausible ECG sampling rates (Hz, inclusive): a header outside it is treated as corrupt
#: (1 Hz, or 100 kHz, are typos or wrong units, not ECGs). Every reader and source takes ``fs_range`` to change it.
FS_RANGE: tuple[float, float] = (50.0, 10_000.0)


def check_fs_range(fs_range: Sequence[float] | None) -> tuple[float, float]:
    """Validate a ``(low, high)`` sampling-rate range in Hz (None: :data:`FS_RANGE`).

    Raises:
        ValueError: not two finite numbers with ``0 < low <= high <= MAX_FS``.
    """
    if fs_range is None:
        return FS_RANGE
    try:
        low, high = (float(v) for v in fs_range)
    except (TypeError, ValueError):
        raise ValueError(f"fs_range must be two numbers (low, high) in Hz, got {fs_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= MAX_FS):
        raise ValueError(f"fs_range must satisfy 0 < low <= high <= {MAX_FS:g} Hz, got {fs_range!r}")
    return low, high


# Bytes per sample of each WFDB storage format (WFDB signal(5) man page). FLAC formats (508/516/524) are
# compressed: their size cannot be predicted and is not checked.
_BYTES_PER_SAMPLE: dict[str, float] = {
    "8": 1.0, "80": 1.0, "16": 2.0, "61": 2.0, "160": 2.0, "24": 3.0, "32": 4.0,
    "212": 1.5, "310": 4.0 / 3.0, "311": 4.0 / 3.0,
}
_COMPRESSED_FORMATS = frozenset({"508", "516", "524"})

# Multiplier from a header's units to millivolts (lower-case keys): WFDB's symbols (mV, uV, V) and the spellings
# found in headers written by other tools (full words, singular or plural; "mvolts").
_TO_MV: dict[str, float] = {
    "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6,
    **{f"{word}{plural}": factor for word, factor in (
        ("volt", 1e3), ("millivolt", 1.0), ("mvolt", 1.0), ("microvolt", 1e-3), ("uvolt", 1e-3),
        ("µvolt", 1e-3), ("μvolt", 1e-3), ("nanovolt", 1e-6)) for plural in ("", "s")},
}
# Units that are clearly not a voltage (lower-case): pressure, normalised or dimensionless units, rates,
# temperature, impedance... A channel in other units that are not in _TO_MV either is reported as
# "unrecognised units" (a typo of a voltage is possible), not as a non-voltage.
_NOT_VOLTAGE: frozenset[str] = frozenset({
    "mmhg", "cmh2o", "kpa", "pa", "nu", "%", "bpm", "/min", "degc", "°c", "degf", "ohm", "ohms", "kohm", "l",
    "ml", "l/s", "l/min", "ml/s", "hz", "ma", "ua", "mmol/l",
})

#: Largest record (signals x samples, with at least the 12 rows of ecgfm's layout) read in one piece: 500 million
#: float32 values, ~2 GB. A longer record (a multi-day Holter) is refused with a message saying to split it, rather
#: than exhausting memory while its samples are converted (tests monkeypatch it).
MAX_RECORD_SAMPLES = 500_000_000

_KEY_VALUE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9 _()/.-]*?)\s*:\s*(.*?)\s*$")


def header_path(path: str | os.PathLike) -> Path:
    """The ``.hea`` path of a record given as ``name``, ``name.hea``, ``name.dat`` or ``name.mat``.

    A header whose extension is not lower-case (``NAME.HEA``, as Windows tools write it) is found too: when no
    ``name.hea`` (or the header as given) exists, the folder is searched for the one file whose name differs only in
    the case of the extension (the name itself must match exactly).
    """
    p = Path(path)
    if p.suffix.lower() == ".hea":
        return _suffix_case_variant(p)
    if p.suffix.lower() in (".dat", ".mat", ".xyz", ".atr"):
        p = p.with_suffix("")
    return _suffix_case_variant(p.with_name(p.name + ".hea"))


def _suffix_case_variant(path: Path) -> Path:
    """``path`` when it is a file, else the one file of its folder whose name differs from it only in the case of
    the extension (``rec.HEA`` for ``rec.hea``); ``path`` when there is none, or several (``rec.Hea`` and
    ``rec.HEA``: ambiguous), for the reader to report it missing."""
    if path.is_file():
        return path
    stem, n = path.name[:-len(path.suffix)], len(path.suffix)
    try:
        mtime = os.stat(path.parent).st_mtime_ns
    except OSError:   # no such folder
        return path
    key = (stem, path.suffix.lower())
    variants = _case_variants(str(path.parent), mtime).get(key)
    if variants is None:   # not in the memo: listed afresh (a file added within the folder time's resolution)
        variants = _case_variants.__wrapped__(str(path.parent), mtime).get(key, [])
    return path.with_name(variants[0]) if len(variants) == 1 else path


@functools.lru_cache(maxsize=16)
def _case_variants(folder: str, mtime_ns: int) -> dict[tuple[str, str], list[str]]:
    """``{(stem, lower-case extension): [file names]}`` of a folder's files, listed once per folder version
    (``mtime_ns``: a file added or renamed is seen): reading a folder of ``REC.HEA`` records listed the whole folder
    once per record, quadratic in its size (14 ms per record in a folder of 20k files)."""
    del mtime_ns   # part of the memo key only
    out: dict[tuple[str, str], list[str]] = {}
    try:
        entries = [e for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return out
    for e in entries:
        stem, dot, ext = e.name.rpartition(".")
        if dot:
            out.setdefault((stem, "." + ext.lower()), []).append(e.name)
    return out


def _float_token(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


@dataclass
class WFDBHeader:
    """The fields of a WFDB header (attribute names as in ``wfdb.Record``), parsed and validated.

    Per-signal fields are lists of length ``n_sig``. ``sig_len`` is None when the header leaves the length
    to the signal file size; ``init_value`` / ``checksum`` entries are None where the header omits them.
    ``uncalibrated`` names the signals whose header gain is 0 (WFDB: uncalibrated; ``adc_gain`` holds the
    default 200 for them).
    """

    record_name: str
    n_sig: int
    fs: float
    sig_len: int | None
    file_name: list[str]
    fmt: list[str]
    samps_per_frame: list[int]
    skew: list[int]
    byte_offset: list[int]
    adc_gain: list[float]
    baseline: list[int]
    units: list[str]
    adc_res: list[int]
    adc_zero: list[int]
    sig_name: list[str]
    comments: list[str] = field(default_factory=list)
    init_value: list[int | None] = field(default_factory=list)
    checksum: list[int | None] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)


_RX_FMT = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")
_RX_GAIN = re.compile(r"^([^(/]*)(?:\(([^)]*)\))?(?:/(.*))?$")


def _int_field(token: str, what: str, line: str, hea: Path) -> int:
    try:
        return int(token)
    except ValueError:
        raise ECGDataError(hea, f"{what} {token!r} is not an integer in line {line!r}") from None


def _record_line(text: str, hea: Path) -> tuple[list[str], list[str], str, list[str]]:
    """``(comments, lines, record line, its tokens)`` of a header's text (single- or multi-segment).

    Raises:
        ECGDataError: no record line.
    """
    comments, lines = _header_lines(text)
    if not lines:
        raise ECGDataError(hea, "empty header (no record line)")
    return comments, lines, lines[0], lines[0].split()


def _header_lines(text: str) -> tuple[list[str], list[str]]:
    """``(comments, lines)`` of a header's text: comment lines without their ``#``, the other non-empty lines.

    A leading UTF-8 byte order mark (written by Windows editors) is not part of the first line.
    """
    comments: list[str] = []
    lines: list[str] = []
    for raw in text.removeprefix("\ufeff").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
        else:
            lines.append(line)
    return comments, lines


def _record_rate(rec: Sequence[str], rec_line: str, hea: Path, fs_low: float, fs_high: float) -> float:
    """The sampling rate (Hz) of a record line split into tokens, checked to be given, finite and plausible.

    Raises:
        ECGDataError: no rate, an impossible one, or one outside ``[fs_low, fs_high]``.
    """
    if len(rec) < 3:
        # WFDB would assume 250 Hz; every ECG corpus states its rate, and a wrong one silently stretches or
        # squeezes every interval (a 500 Hz record read as 250 Hz lasts twice as long)
        raise ECGDataError(hea, f"record line {rec_line!r} gives no sampling rate (WFDB's default would be 250 Hz, "
                                f"not assumed here): add it to the header")
    fs_token = rec[2].split("/")[0]
    fs_value = _float_token(fs_token)
    if fs_value is None or not math.isfinite(fs_value) or fs_value <= 0 or fs_value > MAX_FS:
        raise ECGDataError(hea, f"impossible sampling rate {fs_token!r} Hz in record line {rec_line!r} "
                                f"(must be a finite number in (0, {MAX_FS:g}])")
    if not fs_low <= fs_value <= fs_high:
        raise ECGDataError(hea, f"implausible sampling rate for an ECG: {fs_token!r} Hz in record line "
                                f"{rec_line!r} (allowed {fs_low:g}-{fs_high:g} Hz; set fs_range to accept "
                                "it)")
    return fs_value


def parse_header(text: str, hea: str | os.PathLike = "<header>", fs_range: Sequence[float] | None = None,
                 *, layout: bool = False) -> WFDBHeader:
    """Parse and validate the text of a single-segment WFDB header (format of the WFDB ``header(5)`` page).

    Written by hand instead of calling ``wfdb.rdheader`` for two reasons: ``wfdb.rdheader`` silently replaces
    values it cannot parse by defaults (a negative or NaN rate becomes 250 Hz), which hides corrupt headers; and
    it looks every field up in pandas tables, ~5 ms per header, 10x the cost of reading a 10 s 12-lead signal,
    which would dominate the conversion of a corpus. The result agrees with ``wfdb.rdheader`` on valid headers
    (tested).

    An ADC gain of 0 is valid: WFDB header(5) defines it as an uncalibrated signal, whose gain is the default
    200 adu/mV; ``adc_gain`` holds 200 (as ``wfdb.rdheader`` reads it) and ``uncalibrated`` names the signal
    (the readers warn when they read the record).

    A multi-segment master header is refused here (its record line is ``name/n_segments ...``): it is parsed by
    :func:`parse_multi_header`, and :func:`read_wfdb` reads such a record whole.

    Args:
        text: the header's text.
        hea: the header file, for error messages.
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default :data:`FS_RANGE`).
        layout: the header is the layout header of a variable-layout multi-segment record, which describes the
            signals and holds no samples: a length of 0 is accepted (refused otherwise).

    Raises:
        ECGDataError: malformed lines, a signal count that disagrees with the number of signal lines, a
            multi-segment master header, impossible or implausible rate, impossible length, gain or format.
    """
    hea = Path(hea)
    fs_low, fs_high = check_fs_range(fs_range)
    comments, lines, rec_line, rec = _record_line(text, hea)
    if len(rec) < 2:
        raise ECGDataError(hea, f"malformed record line {rec_line!r} (expected 'name n_signals [fs [n_samples]]')")
    if "/" in rec[0]:
        # a master header lists segments, not signals; read_wfdb reads it (parse_multi_header), but a segment
        # or a layout header must be single-segment (WFDB does not nest multi-segment records)
        raise ECGDataError(hea, f"multi-segment master header where a single-segment header is expected (record "
                                f"line {rec_line!r}): read the record with read_wfdb; a segment of a multi-segment "
                                f"record cannot itself be multi-segment")
    n_sig = _int_field(rec[1], "number of signals", rec_line, hea)
    if n_sig < 1:
        raise ECGDataError(hea, f"impossible number of signals {n_sig} in record line {rec_line!r}")
    fs = _record_rate(rec, rec_line, hea, fs_low, fs_high)
    sig_len: int | None = None
    if len(rec) >= 4:
        sig_len = _int_field(rec[3], "number of samples", rec_line, hea)
        if sig_len < 0:
            raise ECGDataError(hea, f"impossible number of samples {sig_len} in record line {rec_line!r}")
        if sig_len == 0 and not layout:
            raise ECGDataError(hea, "zero-length record (the header gives 0 samples)")
    sig_lines = lines[1:]
    if len(sig_lines) != n_sig:
        # header(5): after the signal lines only comment lines ('#') may follow. Extra lines are refused rather than
        # ignored: they mean a wrong signal count, and reading the first n_sig would lose a lead (one file per
        # signal) or scramble the leads (signals interleaved in one file whose length the header leaves out)
        raise ECGDataError(hea, f"header announces {n_sig} signals but has {len(sig_lines)} signal lines"
                                + (" (after the signal lines only comment lines starting with '#' may follow): "
                                   f"correct the signal count in the record line {rec_line!r} or remove the extra "
                                   "lines" if len(sig_lines) > n_sig else ""))
    h = WFDBHeader(record_name=rec[0], n_sig=n_sig, fs=fs, sig_len=sig_len, file_name=[], fmt=[],
                   samps_per_frame=[], skew=[], byte_offset=[], adc_gain=[], baseline=[], units=[], adc_res=[],
                   adc_zero=[], sig_name=[], comments=comments)
    for i, line in enumerate(sig_lines):
        tok = line.split(maxsplit=8)
        if len(tok) < 2:
            raise ECGDataError(hea, f"malformed signal line {line!r} (expected 'file format [gain ...]')")
        m = _RX_FMT.match(tok[1])
        if m is None:
            raise ECGDataError(hea, f"malformed storage format {tok[1]!r} in line {line!r}")
        name = tok[8].strip() if len(tok) >= 9 else f"signal {i}"
        gain, baseline, units = 200.0, None, "mV"  # WFDB defaults
        if len(tok) >= 3:
            g = _RX_GAIN.match(tok[2])
            gain_value = _float_token(g.group(1)) if g else None
            if gain_value is None or not math.isfinite(gain_value) or gain_value < 0:
                shown = g.group(1) if g else tok[2]
                raise ECGDataError(hea, f"impossible ADC gain {shown!r} for {name} in line {line!r} (must be a "
                                        "finite number > 0 ADC units per physical unit, or 0 for an "
                                        "uncalibrated signal)")
            if gain_value == 0:
                # not corrupt: WFDB defines gain 0 as an uncalibrated signal, read with the default gain of
                # 200 adu/mV (wfdb.rdheader gives 200 too); the reader warns that the amplitudes are not mV
                h.uncalibrated.append(name)
                gain_value = 200.0
            gain = gain_value
            if g.group(2) is not None:
                baseline = _int_field(g.group(2), "baseline", line, hea)
            if g.group(3):
                units = g.group(3)
        adc_res = _int_field(tok[3], "ADC resolution", line, hea) if len(tok) >= 4 else 0
        adc_zero = _int_field(tok[4], "ADC zero", line, hea) if len(tok) >= 5 else 0
        h.file_name.append(tok[0])
        h.fmt.append(m.group(1))
        h.samps_per_frame.append(int(m.group(2) or 1))
        h.skew.append(int(m.group(3) or 0))
        h.byte_offset.append(int(m.group(4) or 0))
        h.adc_gain.append(gain)
        h.baseline.append(adc_zero if baseline is None else baseline)
        h.units.append(units)
        h.adc_res.append(adc_res)
        h.adc_zero.append(adc_zero)
        h.sig_name.append(tok[8].strip() if len(tok) >= 9 else "")
        h.init_value.append(_int_field(tok[5], "initial value", line, hea) if len(tok) >= 6 else None)
        h.checksum.append(_int_field(tok[6], "checksum", line, hea) if len(tok) >= 7 else None)
    return h


def read_header(path: str | os.PathLike, fs_range: Sequence[float] | None = None) -> WFDBHeader:
    """Read and validate the WFDB header of a record (given with or without ``.hea``); see :func:`parse_header`.

    The text is decoded as UTF-8, or as Latin-1 when it is not valid UTF-8 (older headers' comments).

    Raises:
        ECGDataError: missing or unreadable header, impossible or implausible rate, impossible gain or length.
    """
    hea = header_path(path)
    return parse_header(_header_text(hea), hea, fs_range)


def _header_text(hea: Path) -> str:
    """The text of a header file: UTF-8, or Latin-1 when it is not valid UTF-8 (older headers' comments).

    A leading UTF-8 byte order mark (written by Windows editors) is left out: it would otherwise be read as part
    of the record name, or make a first comment line look like the record line.

    Raises:
        ECGDataError: missing or unreadable file.
    """
    try:
        raw = hea.read_bytes()
    except FileNotFoundError:
        raise ECGDataError(hea, "header file not found") from None
    except OSError as exc:
        raise ECGDataError(hea, f"cannot read header: {exc}") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)   # before decoding: a Latin-1 fallback would turn it into 'ï»¿'
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # every byte decodes: never fails


@dataclass
class MultiSegmentHeader:
    """The master header of a multi-segment WFDB record (attribute names as in ``wfdb.MultiRecord``), parsed and
    validated.

    ``seg_name`` / ``seg_len`` list the segments in order: a segment is the name of a single-segment record in the
    master's folder, ``"~"`` a gap (no samples were recorded: read as NaN). In a variable-layout record the first
    segment is the layout header (length 0), which names the record's signals; each segment then holds some of
    them. ``sig_len`` is the record's length, the sum of ``seg_len``.
    """

    record_name: str
    n_sig: int
    fs: float
    sig_len: int
    seg_name: list[str]
    seg_len: list[int]
    comments: list[str] = field(default_factory=list)

    @property
    def layout(self) -> str:
        """``"variable"`` (the first segment is a layout header of length 0) or ``"fixed"`` (WFDB's terms)."""
        return "variable" if self.seg_len[0] == 0 else "fixed"


def is_multi_segment(text: str) -> bool:
    """Whether a header's text is a multi-segment master header (its record line is ``name/n_segments ...``)."""
    lines = _header_lines(text)[1]
    return bool(lines) and "/" in lines[0].split()[0]


def parse_multi_header(text: str, hea: str | os.PathLike = "<header>", fs_range: Sequence[float] | None = None,
                       ) -> MultiSegmentHeader:
    """Parse and validate the master header of a multi-segment WFDB record (WFDB ``header(5)`` page).

    The record line is ``name/n_segments n_signals fs [n_samples]``, followed by one line ``segment_name
    n_samples`` per segment (``~`` for a gap). Written by hand for the reasons given in :func:`parse_header`
    (``wfdb.rdheader`` replaces a rate it cannot parse by 250 Hz); the rate is checked as there.

    Args:
        text: the master header's text.
        hea: the header file, for error messages.
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default :data:`FS_RANGE`).

    Raises:
        ECGDataError: not a master header, a malformed record or segment line, a segment count that disagrees
            with the segment lines, impossible or implausible rate, a length that is not the sum of the
            segments' lengths, a zero-length segment other than the first (the layout header), a record of
            nothing but gaps.
    """
    hea = Path(hea)
    fs_low, fs_high = check_fs_range(fs_range)
    comments, lines, rec_line, rec = _record_line(text, hea)
    name, _, n_seg_token = rec[0].partition("/")
    if len(rec) < 2 or not name or "/" in n_seg_token:
        raise ECGDataError(hea, f"malformed multi-segment record line {rec_line!r} (expected 'name/n_segments "
                                f"n_signals fs [n_samples]')")
    n_seg = _int_field(n_seg_token, "number of segments", rec_line, hea)
    if n_seg < 1:
        raise ECGDataError(hea, f"impossible number of segments {n_seg} in record line {rec_line!r}")
    n_sig = _int_field(rec[1], "number of signals", rec_line, hea)
    if n_sig < 1:
        raise ECGDataError(hea, f"impossible number of signals {n_sig} in record line {rec_line!r}")
    fs = _record_rate(rec, rec_line, hea, fs_low, fs_high)
    sig_len = None
    if len(rec) >= 4:
        sig_len = _int_field(rec[3], "number of samples", rec_line, hea)
        if sig_len < 0:
            raise ECGDataError(hea, f"impossible number of samples {sig_len} in record line {rec_line!r}")
    if len(lines) - 1 != n_seg:
        raise ECGDataError(hea, f"multi-segment header announces {n_seg} segments but has {len(lines) - 1} "
                                f"segment lines (expected one 'segment_name n_samples' line per segment)")
    seg_name: list[str] = []
    seg_len: list[int] = []
    for i, line in enumerate(lines[1:]):
        tok = line.split()
        if len(tok) != 2:
            raise ECGDataError(hea, f"malformed segment line {line!r} in a multi-segment header (expected "
                                    "'segment_name n_samples')")
        n = _int_field(tok[1], "segment length", line, hea)
        if n < 0:
            raise ECGDataError(hea, f"impossible segment length {n} in line {line!r}")
        if n == 0 and (i > 0 or tok[0] == "~"):
            # WFDB gives length 0 only to the layout header of a variable-layout record, which comes first
            raise ECGDataError(hea, f"segment {tok[0]!r} has 0 samples (line {line!r}): only the first segment, "
                                    "the layout header of a variable-layout record, may")
        seg_name.append(tok[0])
        seg_len.append(n)
    total = sum(seg_len)
    if sig_len is not None and sig_len != total:
        raise ECGDataError(hea, f"the record line announces {sig_len} samples but the segments add up to {total} "
                                f"(record line {rec_line!r})")
    if total == 0:
        raise ECGDataError(hea, "zero-length record (its segments hold 0 samples)")
    if all(s == "~" for s, n in zip(seg_name, seg_len) if n):
        raise ECGDataError(hea, "every segment is a gap ('~'): the record holds no samples")
    return MultiSegmentHeader(record_name=name, n_sig=n_sig, fs=fs, sig_len=total, seg_name=seg_name,
                              seg_len=seg_len, comments=comments)


def multi_segment_members(path: str | os.PathLike) -> list[str] | None:
    """The segment and layout headers a multi-segment master header refers to, or None for any other header.

    For a folder scan, which must not take them as records of their own. Lenient on purpose: only the names are
    taken (first token of each segment line, gaps ``~`` left out), so that a malformed master still claims its
    segments; reading the master reports what is wrong with it.

    Args:
        path: the header, with or without ``.hea``.

    Returns:
        Segment record names as written in the master (relative to its folder, without ``.hea``), or None when
        the header is not a master header.

    Raises:
        ECGDataError: missing or unreadable header.
    """
    return _master_segments(_header_lines(_header_text(header_path(path)))[1])


def _master_segments(lines: Sequence[str]) -> list[str] | None:
    """Segment (and layout) record names of a master header's non-comment ``lines`` (gaps ``~`` left out), or
    None when the record line is not a master's. Names only, nothing validated."""
    if not lines or "/" not in lines[0].split()[0]:
        return None
    return [tok[0] for tok in (line.split() for line in lines[1:]) if tok and tok[0] != "~"]


def header_input_files(path: str | os.PathLike) -> list[str]:
    """Every file a WFDB header reads from: its signal files, and for a multi-segment master its segment (and
    layout) headers with their signal files. Lenient (names only, nothing validated, ``[]`` for an unreadable
    header): for the cache's stale-input check, which otherwise watches only the files sharing the header's stem
    and so missed an edited segment ``ms_0002.dat`` of master ``ms.hea`` (or a ``.dat`` of another name).

    Args:
        path: the header (``.hea``).

    Returns:
        Absolute paths, in header order, without duplicates.
    """
    out: list[str] = []
    seen: set[str] = set()   # headers read: corrupt masters that list each other must not recurse forever

    def add(f: str) -> None:
        if f not in out:
            out.append(f)

    def signal_files(hea: str) -> None:
        if hea in seen:
            return
        seen.add(hea)
        try:
            lines = _header_lines(Path(hea).read_text(errors="replace"))[1]
        except OSError:
            return
        if not lines:
            return
        rec = lines[0].split()
        folder = os.path.dirname(hea)
        segments = _master_segments(lines)
        if segments is not None:   # a master: its segments (and the layout header), each with its own signal files
            for name in segments:
                seg = os.path.abspath(os.path.join(folder, name + ".hea"))
                if not os.path.isabs(name) and seg != hea:
                    add(seg)
                    signal_files(seg)
            return
        n_sig = int(rec[1]) if len(rec) > 1 and rec[1].isdigit() else 0
        for tok in (line.split() for line in lines[1:1 + n_sig]):
            if tok and tok[0] not in ("~", "-") and not os.path.isabs(tok[0]):
                add(os.path.abspath(os.path.join(folder, tok[0])))

    signal_files(os.path.abspath(str(path)))
    return out


def header_comment_values(comments: Sequence[str], key: str) -> list[str]:
    """Every value of ``key`` (case-insensitive) in header comment lines, in order (a key may repeat: the
    challenge's ``# Dx:`` lines)."""
    out = []
    for line in comments:
        m = _KEY_VALUE.match(str(line))
        if m and m.group(1).strip().lower() == key.lower():
            out.append(m.group(2))
    return out


def parse_header_comments(comments: Sequence[str]) -> dict[str, str]:
    """``key: value`` pairs of header comment lines (keys lower-cased), e.g. ``{"age": "59", "dx": "..."}``."""
    out: dict[str, str] = {}
    for line in comments:
        m = _KEY_VALUE.match(str(line))
        if m and m.group(1).lower() not in out:
            out[m.group(1).strip().lower()] = m.group(2)
    return out


def _age_sex(fields: Mapping[str, str]) -> dict[str, Any]:
    """Normalise ``age`` (float or None) and ``sex`` ("M", "F" or None) from parsed comment fields."""
    out: dict[str, Any] = {}
    if "age" in fields:
        age = _float_token(fields["age"].strip())
        out["age"] = age if age is not None and math.isfinite(age) and age >= 0 else None
    if "sex" in fields:
        out["sex"] = normalise_sex(fields["sex"])
    return out


def normalise_sex(value: Any) -> str | None:
    """``"M"``, ``"F"`` or None from the spellings used by the corpora (Male/female/M/f/0=male/1=female)."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return {0: "M", 1: "F"}.get(int(value))
    s = str(value).strip().lower()
    if s in ("m", "male", "man"):
        return "M"
    if s in ("f", "female", "woman"):
        return "F"
    return None


def _units_factor(unit: str | None) -> float | None:
    """Multiplier from ``unit`` to millivolts, or None when ``unit`` is not a voltage (WFDB: no units = mV)."""
    return _TO_MV.get((unit or "mV").strip().lower())


def _units_problem(unit: str | None) -> str:
    """What is wrong with units that are not in :data:`_TO_MV`: clearly not a voltage (mmHg), or unrecognised."""
    if str(unit).strip().lower() in _NOT_VOLTAGE:
        return f"units {unit!r}, which are not a voltage"
    return (f"unrecognised units {unit!r} (voltage units read: mV, uV, V, nV, or the words volts, millivolts, "
            f"microvolts)")


def _rename_hint(source: str) -> Callable[[str], str]:
    """How the user maps an unknown lead name of a record read for ``source`` to a standard lead.

    Every reader takes ``rename_leads``; the prepare hint (``+folder.rename_leads``) is added only when the record
    source that read it takes ``rename_leads`` too (the folder sources, or a source name no registered source has,
    i.e. a folder source given another ``name``): PTB-XL's or a challenge's source does not.

    An inverted lead (``-aVR``, the negation of aVR) gets no ``rename_leads`` hint: renaming does not flip the
    sign, so the lead would be read upside down as aVR.
    """
    def hint(name: str) -> str:
        inverted = _inverted_lead(name)
        if inverted is not None:
            return (f"map it with rename_leads; {name!r} however is an inverted lead (its negation is {inverted}), "
                    f"which renaming cannot map: rename_leads={{{name!r}: {inverted!r}}} would not flip its sign, "
                    f"so the lead would be read upside down as {inverted}. Negate its samples and name it "
                    f"{inverted} in the header, or remove that signal from the record")
        text = f"map it: rename_leads={{{name!r}: {LEAD_PLACEHOLDER!r}}} (the API, read_wfdb)"
        if _source_takes_rename(source):   # the reader's type, which a user's own preset may not be named after
            preset = source if _registered(source) else "folder"
            text += (f", '+<preset>.rename_leads={{{name}:<lead>}}' for prepare (<preset>: the sources=[...] "
                     f"entry that read it, e.g. {preset})")
        return text

    return hint


def _inverted_lead(name: str) -> str | None:
    """The standard lead whose negation ``name`` is (``"-aVR"`` -> ``"aVR"``), or None."""
    text = str(name).strip()
    if not text.startswith("-") or not _is_standard_lead(text[1:]):
        return None
    return canonical_lead(text[1:])


# Channel names that say only "an ECG" (CinC 2017's one AliveCor lead), unlike the other known non-standard names
# (Frank X/Y/Z, V7, CM5...), which are real leads of their own: a record of nothing else gets the rename_leads hint.
_GENERIC_LEAD_NAMES = frozenset({"ecg"})


def _registered(source: str) -> bool:
    """Whether ``source`` is the name of a registered record source (a ``sources=[...]`` preset)."""
    from ecgfm.data.readers import SOURCES   # here: the package imports this module

    return source in SOURCES


def _source_takes_rename(source: str) -> bool:
    """Whether the record source registered as ``source`` takes ``rename_leads`` (True for unregistered names)."""
    import inspect

    from ecgfm.data.readers import SOURCES   # here: the package imports this module

    target = SOURCES.get(source)
    if target is None:
        return True
    if isinstance(target, str):   # registered lazily by "module:Class": generated records, no header lead names
        return False
    return "rename_leads" in inspect.signature(target).parameters


def _is_standard_lead(name: str) -> bool:
    """Whether ``name`` is one of the twelve standard leads (or an alias such as MLII)."""
    try:
        return canonical_lead(name) is not None
    except KeyError:
        return False


def _signal_file(hea: Path, fname: str, root: str | os.PathLike | None, what: str = "signal file") -> Path:
    """The path of a signal file named in a header, refused unless it lies inside ``root``.

    WFDB names signal files relative to the header's folder. A name that is absolute, or that climbs out of the
    dataset with ``..``, would read a file the dataset does not hold: refused, before anything is opened. The
    check is on the normalised path (symbolic links inside the dataset are followed as the user set them up).

    Args:
        hea: the header file.
        fname: the file name as written in the header.
        root: the dataset root (default: the header's folder).
        what: what the file is, for the message (a multi-segment master names ``"segment header"`` files).

    Raises:
        ECGDataError: the file lies outside ``root``.
    """
    base = os.path.abspath(root if root is not None else hea.parent)
    if os.path.isabs(fname) or re.match(r"^[A-Za-z]:[\\/]", fname) or fname.startswith("\\"):
        raise ECGDataError(hea, f"{what} outside the dataset root: the header names the absolute path "
                                f"{fname!r} ({what}s must be relative to the header's folder, inside {base})")
    path = os.path.abspath(os.path.join(hea.parent, fname))
    if os.path.commonpath([path, base]) != base:
        raise ECGDataError(hea, f"{what} outside the dataset root: the header names {fname!r}, which "
                                f"resolves to {path} (outside {base})")
    return Path(path)


# Samples per group and bytes per group of the packed formats (2 samples in 3 bytes, 3 samples in 4 bytes).
_PACKED: dict[str, tuple[int, int]] = {"212": (2, 3), "310": (3, 4), "311": (3, 4)}


def _check_signal_files(header: WFDBHeader, hea: Path, root: str | os.PathLike | None = None) -> None:
    """Check every signal file: inside ``root``, present, and exactly as large as the header says.

    Size = byte offset + signals x samples (x samples per frame) x bytes per sample of the format; packed
    formats (212, 310, 311) may end with one partly filled group. A file too short is truncated; one too long
    means the header's signal count or length is wrong and the samples would be assigned to the wrong leads.
    Without a length in the header, the size must be a whole number of frames (plain-integer formats). Done
    before decoding, so that the message names the file and the problem (wfdb's errors name neither).
    """
    per_file: dict[str, list[int]] = {}
    for i, fname in enumerate(header.file_name):
        per_file.setdefault(fname, []).append(i)
    spf = header.samps_per_frame or [1] * header.n_sig
    for fname, idx in per_file.items():
        if fname in ("-", "~"):  # WFDB null / absent signal file
            continue
        f = _signal_file(hea, fname, root)
        if not f.is_file():
            raise ECGDataError(hea, f"signal file {fname!r} named in the header is missing (looked for {f})")
        fmt = str(header.fmt[idx[0]])
        declared = sorted({str(header.fmt[i]) for i in idx})
        for one in declared:
            if one not in _COMPRESSED_FORMATS and one not in _BYTES_PER_SAMPLE:
                raise ECGDataError(f, f"unsupported WFDB storage format {one!r} (header {hea.name})")
        if len(declared) > 1:   # wfdb decodes the whole file in its first signal's format, without a word
            raise ECGDataError(hea, f"signals sharing the signal file {fname!r} declare different formats "
                                    f"{declared}: a WFDB signal file has one format (fix the header)")
        if fmt in _COMPRESSED_FORMATS:
            continue
        offset = int((header.byte_offset or [0] * header.n_sig)[idx[0]] or 0)
        size = f.stat().st_size
        per_frame = sum(int(spf[i] or 1) for i in idx)
        what = (f"format {fmt}, {len(idx)} signal{'s' if len(idx) != 1 else ''}"
                f"{f', {per_frame} samples per frame' if per_frame != len(idx) else ''}"
                f"{f', offset {offset}' if offset else ''}")
        if header.sig_len is None:  # length left to the file size (allowed by WFDB)
            frame_bytes = per_frame * _BYTES_PER_SAMPLE[fmt]
            if fmt not in _PACKED and (size - offset) % frame_bytes:
                raise ECGDataError(f, f"signal file size disagrees with the header: {size} bytes is not a whole "
                                      f"number of {frame_bytes:g}-byte frames after the offset ({what}; wrong "
                                      f"signal count in the header {hea.name}?)")
            continue
        n_samples = header.sig_len * per_frame
        group, group_bytes = _PACKED.get(fmt, (1, int(_BYTES_PER_SAMPLE[fmt])))
        low = offset + (n_samples * group_bytes) // group
        high = offset + -(-n_samples // group) * group_bytes
        if size < low:
            raise ECGDataError(f, f"truncated signal file: {size} bytes, but the header {hea.name} needs "
                                  f"{low} ({what}, {header.sig_len} samples)")
        if size > high:
            raise ECGDataError(f, f"signal file size disagrees with the header: {size} bytes, but the header "
                                  f"{hea.name} accounts for {high} ({what}, {header.sig_len} samples); wrong "
                                  f"signal count or length in the header")


def _record_length(header: WFDBHeader, hea: Path, root: str | os.PathLike | None = None) -> int | None:
    """Samples per signal of a record: the header's length, or when it leaves the length out, what its largest
    uncompressed signal file holds (None when nothing tells: compressed or missing files)."""
    if header.sig_len is not None:
        return header.sig_len
    per_file: dict[str, list[int]] = {}
    for i, fname in enumerate(header.file_name):
        per_file.setdefault(fname, []).append(i)
    longest = None
    for fname, idx in per_file.items():
        fmt = str(header.fmt[idx[0]])
        if fname in ("-", "~") or fmt not in _BYTES_PER_SAMPLE:
            continue
        f = _signal_file(hea, fname, root)
        if not f.is_file():
            continue
        per_frame = sum(int((header.samps_per_frame or [1] * header.n_sig)[i] or 1) for i in idx)
        size = f.stat().st_size - int((header.byte_offset or [0] * header.n_sig)[idx[0]] or 0)
        n = int(max(size, 0) // (per_frame * _BYTES_PER_SAMPLE[fmt]))
        longest = n if longest is None else max(longest, n)
    return longest


def _check_record_size(where: Path, n_sig: int, n_samples: int | None, fs: float,
                       samps_per_frame: Sequence[int] | None = None) -> None:
    """Refuse a record too long to convert in one piece, before its samples are read.

    The limit is :data:`MAX_RECORD_SAMPLES` values over the record's rows: its signals, and at least the 12 rows of
    ecgfm's layout, which every record is placed in; with several samples per frame, every sample of a frame
    counts (the decoder holds them all).

    Raises:
        ECGDataError: naming the file, the record's duration, samples and signals, and how to split it.
    """
    if n_samples is None:
        return
    per_frame = sum(int(n or 1) for n in samps_per_frame) if samps_per_frame else int(n_sig)
    rows = max(int(n_sig), 12, per_frame)
    if rows * n_samples <= MAX_RECORD_SAMPLES:
        return
    hours = n_samples / fs / 3600.0
    gb = rows * n_samples * 4 / 1e9
    raise ECGDataError(where, f"record of {hours:.1f} h ({n_samples} samples x {n_sig} signals, ~{gb:.1f} GB as "
                              f"float32{' in the 12-lead layout' if n_sig < 12 else ''}): too long to convert in "
                              f"one piece (limit {MAX_RECORD_SAMPLES / 1e9 * 4:.1f} GB, MAX_RECORD_SAMPLES of "
                              f"ecgfm.data.readers.formats), split it (e.g. wfdb.rdrecord sampfrom/sampto)")


def _checksum_status(header: WFDBHeader) -> str:
    """Whether the header's checksums can be verified: ``"verified"`` (they will be), or why not."""
    given = [c for c in header.checksum if c is not None]
    if not given:
        return "not in header"
    if not any(given):
        return "not verified: all 0 (placeholder)"
    return "verified"


def _verify_checksums(header: WFDBHeader, sums: Sequence[int] | np.ndarray, where: Path,
                      signals: Sequence[int] | None = None) -> None:
    """Compare the header's checksums with the 16-bit sums of the samples.

    Args:
        header: the parsed header.
        sums: sum of the integer (digital) samples of each signal in ``signals``.
        where: file named in the error.
        signals: the header's signal indices that ``sums`` covers (default: all, in order).

    Raises:
        ECGDataError: a checksum differs (modulo 2**16; headers write them signed or unsigned).
    """
    if _checksum_status(header) != "verified":
        return
    idx = list(range(header.n_sig)) if signals is None else list(signals)
    bad = []
    for i, total in zip(idx, np.asarray(sums, dtype=np.int64).tolist()):
        expected = header.checksum[i]
        if expected is not None and (int(total) - int(expected)) % 65536:
            got = (int(total) + 32768) % 65536 - 32768
            bad.append(f"{header.sig_name[i] or f'signal {i}'} header {expected}, samples {got}")
    if bad:
        raise ECGDataError(where, f"header checksum mismatch: {len(bad)} of {header.n_sig} signals "
                                  f"({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); corrupt signal file "
                                  "or a header that does not describe it")


def _finish(signal: np.ndarray, names: Sequence[str], header: WFDBHeader, hea: Path, source: str,
            extra_header: Mapping[str, Any] | None = None, rename: Mapping[str, str] | None = None,
            ) -> ECGRecord:
    """Convert ``(n_sig, T)`` physical values to mV, place them in the 12-lead layout, build the record.

    Channels whose units are not a voltage (an ICU monitor's ABP in mmHg, PLETH / RESP in NU) are not ECG leads:
    they are dropped before the lead names are mapped (so their names need no ``rename_leads``), with a warning
    naming the file, and listed in ``dropped_leads`` with their units in ``dropped_units``. Gain-0 (uncalibrated)
    signals are read with the default 200 adu/mV, with a warning, and listed in ``uncalibrated_leads``.

    Raises:
        ECGDataError: zero-length or all-NaN record; a standard lead name (after ``rename``) with units that are
            not a voltage; no channel with voltage units; what :func:`~ecgfm.data.record.map_leads` refuses
            (unknown lead name, a lead twice, no standard lead).
    """
    if signal.shape[1] == 0:
        raise ECGDataError(hea, "zero-length record (0 samples)")
    if all(np.isnan(row).all() for row in signal):   # row by row: no (n_sig, T) temporary for a long record
        raise ECGDataError(hea, "every sample of every signal is NaN")
    units = list(header.units or [None] * header.n_sig)
    published = [str(n) for n in names]
    # rename keys match the published names as lead names match (case and surrounding space ignored): {"ECG": "I"}
    # left a channel the header calls "ecg" unrenamed before 2026-12-07, dropped as a non-standard lead
    folded = _fold_rename(rename, hea)
    mapped = [folded.get(n.strip().lower(), n) for n in published]
    keep: list[int] = []
    non_voltage: dict[str, str] = {}
    for row, (unit, lead) in enumerate(zip(units, published)):
        factor = _units_factor(unit)
        if factor is None:
            if _is_standard_lead(mapped[row]):
                # a standard ECG lead in mmHg is a corrupt header, not a non-ECG channel: dropping it would
                # silently lose a lead the record has
                raise ECGDataError(hea, f"lead {lead!r} has {_units_problem(unit)}; a standard ECG lead must be a "
                                        f"voltage: fix the header's units")
            non_voltage[lead or f"signal {row}"] = str(unit)
            continue
        if not mapped[row].strip():
            # WFDB takes a signal's name from the description field ending its signal line, which may be left out
            raise ECGDataError(hea, f"signal {row} (signal line {row + 1} of {len(published)}) has no name in the "
                                    f"header (its line has no description field, which WFDB uses as the lead "
                                    f"name): add the lead's name at the end of that line")
        keep.append(row)
        if factor != 1.0:
            signal[row] *= factor
    shown = ", ".join(f"{k} [{v}]" for k, v in non_voltage.items())
    if not keep:
        raise ECGDataError(hea, f"no channel has voltage units (mV, uV, V...), so the record holds no ECG lead: "
                                f"{shown}")
    if non_voltage:
        odd = sorted({u for u in non_voltage.values() if u.strip().lower() not in _NOT_VOLTAGE})
        log.warning("%s: dropped %d channel(s) whose units are not a voltage (not ECG leads): %s%s", hea,
                    len(non_voltage), shown,
                    f" (unrecognised units {odd}: if they are a voltage, fix the header)" if odd else "")
    # every row kept (the usual case): no copy of a possibly long signal
    rows = signal if len(keep) == len(signal) else signal[keep]
    hint = _rename_hint(source)
    try:
        signal12, mask, dropped_ecg = map_leads(rows, [mapped[r] for r in keep], hea, rename_hint=hint)
    except ECGDataError as exc:
        generic = [mapped[r] for r in keep if mapped[r].strip().lower() in _GENERIC_LEAD_NAMES]
        if not exc.problem.startswith("no standard ECG lead") or not generic:
            raise
        raise ECGDataError(exc.path, f"{exc.problem}: {generic[0]!r} names no particular lead; if it is a standard "
                                     f"lead, {hint(generic[0])}") from None
    generic = [name for name in dropped_ecg if name.strip().lower() in _GENERIC_LEAD_NAMES]
    if generic:   # beside standard leads a channel named only "ECG" is dropped, often a recorded lead: say so
        log.warning("%s: dropped channel(s) %s, which name no particular lead (kept: %s); if one is a standard "
                    "lead, %s", hea, generic, [lead for lead, on in zip(CANONICAL_LEADS, mask) if on],
                    hint(generic[0]))
    # every dropped channel in the header's order: non-voltage ones by published name, the others (Frank vx...)
    # by their mapped name as map_leads reports them
    left, kept = list(dropped_ecg), set(keep)
    dropped: list[str] = []
    for row, lead in enumerate(published):
        if row not in kept:
            dropped.append(lead)
        elif mapped[row] in left:
            dropped.append(left.pop(left.index(mapped[row])))
    if header.uncalibrated:
        log.warning("%s: ADC gain 0 (uncalibrated, WFDB) for %s: read with the default 200 adu/mV, so the "
                    "amplitudes are not calibrated millivolts", hea, ", ".join(header.uncalibrated))
    fields = parse_header_comments(header.comments or [])
    info: dict[str, Any] = {
        "path": str(hea),
        "fs_original": float(header.fs),
        "units": [str(u) if u is not None else "mV" for u in units],
        "gain": [float(g) for g in header.adc_gain],
        "baseline": [int(b) for b in header.baseline],
        "fmt": [str(f) for f in header.fmt],
        "lead_names": published,
        "dropped_leads": dropped,
        "n_samples_original": int(signal.shape[1]),
        "comments": [str(c) for c in (header.comments or [])],
    }
    if non_voltage:
        info["dropped_units"] = dict(non_voltage)
    if header.uncalibrated:
        info["uncalibrated_leads"] = list(header.uncalibrated)
    if rename:
        info["lead_renamed"] = {n: folded[n.strip().lower()] for n in published if n.strip().lower() in folded}
    if extra_header:
        info.update(extra_header)
    record = ECGRecord(signal=signal12, fs=float(header.fs), lead_mask=mask, record_id=header.record_name,
                       source=source, meta=_age_sex(fields), header=info)
    return record.validate(hea)


def _fold_rename(rename: Mapping[str, str] | None, where: Path) -> dict[str, str]:
    """``rename_leads`` keyed by the folded (stripped, lower-case) published name; two keys folding to one name
    with different targets are refused."""
    folded: dict[str, str] = {}
    for key, lead in (rename or {}).items():
        k = str(key).strip().lower()
        if k in folded and folded[k] != lead:
            raise ECGDataError(where, f"rename_leads maps {key!r} and another spelling of it to different leads "
                                      f"({folded[k]!r}, {lead!r}); lead names are matched whatever their case")
        folded[k] = lead
    return folded


def read_wfdb(path: str | os.PathLike, source: str = "wfdb", rename_leads: Mapping[str, str] | None = None,
              root: str | os.PathLike | None = None, fs_range: Sequence[float] | None = None) -> ECGRecord:
    """Read one WFDB record (any format wfdb decodes: 16, 212, 24, 32, 80, ..., several signal files).

    A multi-segment record (PhysioNet long-term and ICU databases; its master header's record line is
    ``name/n_segments ...``) is read whole, as one record: its segments concatenated in time, gaps (``~``
    segments) and the signals a segment of a variable-layout record does not hold as NaN, each segment checked as
    a single-segment record is (see :func:`_read_multi_segment`). ``header["multi_segment"]`` then gives the layout
    (``"fixed"`` / ``"variable"``), the number of segments and of gap samples.

    Args:
        path: the record, with or without ``.hea`` (for a multi-segment record, its master header).
        source: value of ``record.source``.
        rename_leads: optional published-name -> lead-name mapping applied before :func:`map_leads`
            (e.g. ``{"ECG": "I"}``; keys match the published names whatever their case or surrounding space, as
            lead names do); recorded in ``header["lead_renamed"]``.
        root: dataset root: signal files named by the header must lie inside it (default: the header's folder).
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default :data:`FS_RANGE`).

    Returns:
        The record: ``signal (12, T)`` float32 mV, ``record_id`` = record name (a multi-segment record's: the
        master's), ``meta`` with ``age`` /
        ``sex`` when the header comments give them, non-standard leads (Frank vx/vy/vz) and channels whose units
        are not a voltage (ABP, PLETH...) listed in ``header["dropped_leads"]`` (the latter's units in
        ``header["dropped_units"]``), gain-0 (uncalibrated) signals in ``header["uncalibrated_leads"]``,
        ``header["checksum"]`` = ``"verified"`` or why not.

    Raises:
        ECGDataError: missing header or signal file, a signal file outside ``root``, a signal file whose size
            disagrees with the header (truncated, or wrong signal count / length), a header checksum that does
            not match the samples, impossible or implausible rate, impossible gain, zero-length or all-NaN
            record, no channel with voltage units, a standard lead whose units are not a voltage (or are
            unrecognised), a signal without a name, unknown lead names, a record longer than
            :data:`MAX_RECORD_SAMPLES`; for a multi-segment record also a malformed master header, a segment or
            layout header that is missing (naming it) or disagrees with the master (rate, length, signals), and
            every check above on each segment (the message names the segment's file and the master).
    """
    hea = header_path(path)
    text = _header_text(hea)
    if is_multi_segment(text):
        return _read_multi_segment(hea, parse_multi_header(text, hea, fs_range), source, rename_leads, root,
                                   fs_range)
    header = parse_header(text, hea, fs_range)
    if any(str(f).lower().endswith(".mat") for f in header.file_name):
        return _read_mat_record(hea, header, source, rename_leads, root)
    _check_signal_files(header, hea, root)
    _check_record_size(hea, header.n_sig, _record_length(header, hea, root), header.fs, header.samps_per_frame)
    signal = _decode_simple(header, hea)
    if signal is None:
        signal = _decode_with_wfdb(header, hea)
    return _finish(signal, header.sig_name, header, hea, source, rename=rename_leads,
                   extra_header={"checksum": _checksum_status(header)})


def _read_multi_segment(hea: Path, master: MultiSegmentHeader, source: str,
                        rename_leads: Mapping[str, str] | None, root: str | os.PathLike | None,
                        fs_range: Sequence[float] | None) -> ECGRecord:
    """Read a multi-segment record whole: its segments concatenated in time into one ``(n_sig, T)`` signal.

    Each segment is a single-segment record read as :func:`read_wfdb` reads one, with the same checks (signal
    files inside ``root`` and of the size the header says, checksums, rate), instead of with
    ``wfdb.rdrecord(m2s=True)``, which falls short here (wfdb 4.3): a truncated segment file fails with "cannot
    reshape array of size 500 into shape (12)" (no file named), a gap in a fixed-layout record with
    "'NoneType' object has no attribute 'p_signal'", and in a variable-layout record signals whose units differ
    between segments (uV in one, mV in the next) are joined without conversion. The result agrees with
    ``wfdb.rdrecord(master, m2s=True, physical=True)`` on the records it reads (tested).

    Gaps (``~`` segments) and, in a variable-layout record, the signals a segment does not hold are NaN. Signals
    are matched to the record's by position in a fixed-layout record (every segment has the master's signals),
    by name in a variable-layout one (the layout header names them). A signal's units are those of the first
    segment holding it (a layout header's units are a template, which wfdb does not trust either); a later
    segment in other voltage units (uV where the first said mV) is converted. The record's other header facts
    (gain, format) are the layout header's, or the first segment's in a fixed layout.

    Raises:
        ECGDataError: naming the segment's file and the master: a segment or layout header that is missing, lies
            outside ``root`` or is malformed; a segment whose rate, length or signals disagree with the master or
            the layout; a voltage in one segment and a non-voltage in another on one signal; everything
            :func:`read_wfdb` checks in a single-segment record (missing or truncated signal file, checksum
            mismatch, ...).
    """
    _check_record_size(hea, master.n_sig, master.sig_len, master.fs)
    base = root if root is not None else hea.parent
    segments = list(zip(master.seg_name, master.seg_len))
    reference: WFDBHeader | None = None   # names the record's signals: the layout header, or the first segment
    where = ""
    if master.layout == "variable":
        name = segments.pop(0)[0]
        try:
            lhea = _signal_file(hea, f"{name}.hea", base, "layout header")
            if not lhea.is_file():
                raise ECGDataError(lhea, "layout header not found")
            reference = parse_header(_header_text(lhea), lhea, fs_range, layout=True)
            if reference.sig_len:
                raise ECGDataError(lhea, f"layout header gives {reference.sig_len} samples: a layout header "
                                         "describes the signals and holds none (0)")
            _check_segment_rate(reference, master, lhea)
            if reference.n_sig != master.n_sig:
                raise ECGDataError(lhea, f"layout header lists {reference.n_sig} signals, the master announces "
                                         f"{master.n_sig}")
            twice = sorted({n for n in reference.sig_name if reference.sig_name.count(n) > 1})
            if twice:
                # a variable layout matches each segment's signals to the record's by name
                raise ECGDataError(lhea, f"layout header names signal(s) {twice} more than once: segments' "
                                         "signals are matched by name")
        except ECGDataError as exc:
            raise _in_master(exc, name, hea) from None
        where = f"layout header {lhea.name}"
    names: list[str] = list(reference.sig_name) if reference is not None else []
    units: list[str] = list(reference.units) if reference is not None else []
    units_from: list[str | None] = [None] * master.n_sig   # the segment header that gave a signal its units
    signal = np.full((master.n_sig, master.sig_len), np.nan, dtype=np.float32)
    uncalibrated: dict[str, None] = {}
    checksums: list[str] = []
    pos = 0
    for name, n in segments:
        if name == "~":   # a gap: nothing was recorded, the samples stay NaN
            pos += n
            continue
        try:
            shea = _signal_file(hea, f"{name}.hea", base, "segment header")
            if not shea.is_file():
                raise ECGDataError(shea, "segment header not found")
            seg = read_header(shea, fs_range)
            _check_segment_rate(seg, master, shea)
            if seg.sig_len is not None and seg.sig_len != n:
                raise ECGDataError(shea, f"segment header gives {seg.sig_len} samples, the master {n}")
            if any(str(f).lower().endswith(".mat") for f in seg.file_name):
                raise ECGDataError(shea, "segments with .mat signal files are not supported")
            if reference is None:   # fixed layout: the first segment read names the record's signals
                if seg.n_sig != master.n_sig:
                    raise ECGDataError(shea, f"segment has {seg.n_sig} signals, the master announces "
                                             f"{master.n_sig}")
                reference, names, units = seg, list(seg.sig_name), list(seg.units)
                where = f"first segment {shea.name}"
            rows = _segment_rows(seg, names, master.layout, shea, where)
            _check_signal_files(seg, shea, base)
            data = _decode_simple(seg, shea)
            if data is None:
                data = _decode_with_wfdb(seg, shea)
            if data.shape[1] != n:
                raise ECGDataError(shea, f"segment holds {data.shape[1]} samples, the master gives it {n}")
            for r, target in enumerate(rows):
                if units_from[target] is None:
                    units[target], units_from[target] = seg.units[r], f"segment {shea.name}"
                signal[target, pos:pos + n] = data[r] * _unit_ratio(seg.units[r], units[target], names[target],
                                                                    shea, units_from[target])
        except ECGDataError as exc:
            raise _in_master(exc, name, hea) from None
        uncalibrated.update(dict.fromkeys(seg.uncalibrated))
        checksums.append(_checksum_status(seg))
        pos += n
    assert reference is not None   # parse_multi_header refuses a record of nothing but gaps
    header = replace(reference, record_name=master.record_name, n_sig=master.n_sig, fs=master.fs,
                     sig_len=master.sig_len, sig_name=names, units=units, uncalibrated=list(uncalibrated),
                     comments=[*master.comments, *(reference.comments if master.layout == "variable" else [])])
    counts = Counter(checksums)
    status = (checksums[0] if len(counts) == 1
              else "; ".join(f"{k} in {v} of {len(checksums)} segments" for k, v in counts.items()))
    n_gap = sum(n for s, n in segments if s == "~")
    return _finish(signal, names, header, hea, source, rename=rename_leads,
                   extra_header={"checksum": status, "multi_segment": {
                       "layout": master.layout, "n_segments": len(segments), "gap_samples": n_gap}})


def _in_master(exc: ECGDataError, segment: str, hea: Path) -> ECGDataError:
    """``exc`` (naming a segment's file) with the multi-segment record it belongs to added to the problem."""
    return ECGDataError(exc.path, f"{exc.problem} (segment {segment!r} of the multi-segment record {hea})")


def _check_segment_rate(seg: WFDBHeader, master: MultiSegmentHeader, shea: Path) -> None:
    """Refuse a segment (or layout) header whose sampling rate is not the master's (its samples would be
    joined at the wrong time scale)."""
    if not math.isclose(seg.fs, master.fs, rel_tol=1e-9):
        raise ECGDataError(shea, f"sampling rate {seg.fs:g} Hz differs from the multi-segment record's "
                                 f"{master.fs:g} Hz")


def _segment_rows(seg: WFDBHeader, names: Sequence[str], layout: str, shea: Path, where: str) -> list[int]:
    """The record's signal index of each signal of a segment.

    Fixed layout: by position, the names must agree (a different name means a different signal in that row).
    Variable layout: by name, each of the segment's signals must be one of the layout header's, once.

    Raises:
        ECGDataError: naming the segment header and the signal.
    """
    if layout == "fixed":
        if list(seg.sig_name) != list(names):
            raise ECGDataError(shea, f"segment's signals {seg.sig_name} differ from the {where}'s {list(names)} "
                                     "(a fixed-layout record has the same signals in every segment)")
        return list(range(len(names)))
    rows = []
    for s in seg.sig_name:
        if s not in names:
            raise ECGDataError(shea, f"signal {s!r} is not in the {where} (signals {list(names)})")
        if seg.sig_name.count(s) > 1:
            raise ECGDataError(shea, f"signal {s!r} appears more than once in the segment")
        rows.append(names.index(s))
    return rows


def _unit_ratio(unit: str, record_unit: str, name: str, shea: Path, where: str) -> float:
    """Factor from a segment's units of a signal to the record's units of it (1 when they agree).

    Two voltages convert (uV in this segment, mV in the first). Two different units that are not voltages leave
    the values as they are: such a channel is not an ECG lead and is dropped (:func:`_finish`).

    Args:
        unit: the segment's units of the signal.
        record_unit: the record's units of it.
        name: the signal's name, for the message.
        shea: the segment header, for the message.
        where: what gave the record's units (``"segment x.hea"``), for the message.

    Raises:
        ECGDataError: a voltage on one side and not on the other (the segments disagree on what the signal is).
    """
    if unit.strip().lower() == record_unit.strip().lower():
        return 1.0
    mine, theirs = _units_factor(unit), _units_factor(record_unit)
    if mine is not None and theirs is not None:
        return mine / theirs
    if mine is None and theirs is None:
        return 1.0
    raise ECGDataError(shea, f"signal {name!r} has units {unit!r} in this segment but {record_unit!r} in "
                             f"{where}: a voltage and a non-voltage on one signal")


# Values converted at once to physical units (float64 arithmetic) when a record is decoded: bounds the temporaries.
_DECODE_BLOCK = 1 << 18

# numpy dtype and invalid-sample value of the WFDB formats that are plain arrays of integers.
_SIMPLE_FORMATS: dict[str, tuple[str, int, int]] = {  # fmt -> (dtype, offset added, invalid value)
    "16": ("<i2", 0, -32768), "61": (">i2", 0, -32768), "32": ("<i4", 0, -2**31), "80": ("u1", -128, -128),
}
# Formats a .mat signal file can hold (plain integer arrays; wfdb reads .mat files in these).
_MAT_FORMATS = ("16", "24", "32", "61", "80")
# Invalid-sample value of every format wfdb decodes (WFDB signal(5); None: the format has none).
_INVALID: dict[str, int | None] = {"8": None, "16": -32768, "61": -32768, "80": -128, "160": -32768,
                                   "212": -2048, "24": -8388608, "32": -2**31, "310": -512, "311": -512,
                                   "508": -128, "516": -32768, "524": -8388608}


def _decode_simple(header: WFDBHeader, hea: Path) -> np.ndarray | None:
    """Decode records stored as interleaved plain integers (formats 16, 61, 32, 80) with numpy.

    Written by hand for speed (see :func:`parse_header`: ``wfdb.rdrecord`` parses the header again); it
    applies the same rules as ``wfdb.rdrecord(physical=True)`` (tested to agree): physical value =
    (digital - baseline) / gain, invalid-sample value -> NaN. The header's checksums are verified on the
    integer samples (one vectorised sum per file). Returns None for anything else (format 212, 24, difference
    formats, several samples per frame, skew), which goes to wfdb.

    Returns:
        ``(n_sig, T)`` float32 physical values, or None.

    Raises:
        ECGDataError: truncated file, files of different lengths, checksum mismatch.
    """
    if any(f not in _SIMPLE_FORMATS for f in header.fmt):
        return None
    if any(n != 1 for n in header.samps_per_frame) or any(k != 0 for k in header.skew):
        return None
    out: np.ndarray | None = None
    groups: dict[str, list[int]] = {}
    for i, fname in enumerate(header.file_name):
        groups.setdefault(fname, []).append(i)
    for fname, idx in groups.items():
        fmts = {header.fmt[i] for i in idx}
        if len(fmts) != 1 or fname in ("-", "~"):
            return None
        dtype, shift, invalid = _SIMPLE_FORMATS[fmts.pop()]
        width = np.dtype(dtype).itemsize
        count = -1 if header.sig_len is None else header.sig_len * len(idx)
        raw = np.fromfile(hea.parent / fname, dtype=dtype, count=count, offset=header.byte_offset[idx[0]])
        n = raw.size // len(idx)
        if header.sig_len is not None and n != header.sig_len:
            raise ECGDataError(hea.parent / fname, f"truncated signal file: read {n} samples per signal, the "
                                                   f"header {hea.name} announces {header.sig_len} ({width} bytes "
                                                   "per sample)")
        frames = raw[: n * len(idx)].reshape(n, len(idx))   # a view: (samples, signals of this file)
        if n:  # an empty file is reported as a zero-length record
            sums = frames.sum(axis=0, dtype=np.int64) + shift * n
            _verify_checksums(header, sums, hea.parent / fname, idx)
        if out is None:
            out = np.empty((header.n_sig, n), dtype=np.float32)
        elif out.shape[1] != n:
            raise ECGDataError(hea, f"signal files hold different numbers of samples ({out.shape[1]} and {n})")
        baseline = np.asarray([header.baseline[i] for i in idx], dtype=np.float64)[:, None]
        gain = np.asarray([header.adc_gain[i] for i in idx], dtype=np.float64)[:, None]
        # converted in blocks of samples: the float64 arithmetic (values as before, exactly) never holds more than
        # _DECODE_BLOCK values, instead of int64 + float64 copies of a whole long record (~13x its file size)
        step = max(1, _DECODE_BLOCK // len(idx))
        for start in range(0, n, step):
            digital = frames[start:start + step].T.astype(np.int64) + shift
            phys = ((digital - baseline) / gain).astype(np.float32)
            phys[digital == invalid] = np.nan
            out[idx, start:start + step] = phys
    return out


def _decode_with_wfdb(header: WFDBHeader, hea: Path) -> np.ndarray:
    """Decode any other WFDB format (212, 24, 310, FLAC, several samples per frame, ...) with wfdb.

    Reads the integer samples once (``physical=False``, every sample of every frame), verifies the header's
    checksums on them and converts to physical values as ``wfdb.rdrecord(physical=True)`` does: (digital -
    baseline) / gain, invalid-sample value -> NaN. Several samples per frame are averaged exactly (wfdb truncates
    the mean to an integer); a frame holding an invalid sample is NaN (wfdb would average the sentinel in).
    """
    try:
        rec = _wfdb_rdrecord(hea, header, physical=False, smooth_frames=False, return_res=64)
    except Exception as exc:
        raise ECGDataError(hea, f"wfdb could not decode the signal: {type(exc).__name__}: {exc}") from None
    channels = None if rec.e_d_signal is None else list(rec.e_d_signal)
    del rec   # the list above holds wfdb's arrays, freed one by one as they are converted
    if channels is None or len(channels) != header.n_sig:
        raise ECGDataError(hea, f"decoded {0 if channels is None else len(channels)} signals, expected "
                                f"{header.n_sig}")
    spf = [int(n or 1) for n in header.samps_per_frame]
    lengths = {len(c) // s for c, s in zip(channels, spf)}
    if len(lengths) != 1 or any(len(c) % s for c, s in zip(channels, spf)):
        raise ECGDataError(hea, f"decoded signals of different lengths {sorted(lengths)}")
    n = lengths.pop()
    if header.sig_len is not None and n != header.sig_len:
        raise ECGDataError(hea, f"decoded {n} samples but the header announces {header.sig_len}")
    if n:
        _verify_checksums(header, [int(np.asarray(c, dtype=np.int64).sum()) for c in channels], hea)
    out = np.empty((header.n_sig, n), dtype=np.float32)
    for i, k in enumerate(spf):
        samples = np.asarray(channels[i], dtype=np.int64)
        channels[i] = None   # wfdb's copy of this signal is freed once converted
        baseline, gain = float(header.baseline[i]), float(header.adc_gain[i])
        invalid = _INVALID.get(str(header.fmt[i]))
        # in blocks of frames: the float64 temporaries of a long record stay small (values as converted whole)
        step = max(1, _DECODE_BLOCK // k)
        for start in range(0, n, step):
            digital = samples[start * k:(start + step) * k]
            phys = (digital - baseline) / gain
            if invalid is not None:
                phys[digital == invalid] = np.nan
            out[i, start:start + step] = phys.reshape(-1, k).mean(axis=1) if k > 1 else phys
        del samples
    return out


def _wfdb_rdrecord(hea: Path, header: WFDBHeader, **kwargs: Any) -> wfdb.Record:
    """``wfdb.rdrecord(**kwargs)`` of the record whose header is ``hea``, also when its extension is not ``.hea``.

    wfdb opens ``<record name>.hea``, so it cannot open a header named ``REC.HEA`` on a case-sensitive file system;
    such a record is read through links named as wfdb expects (the header and its signal files) in a temporary
    folder.
    """
    if hea.suffix == ".hea":
        return wfdb.rdrecord(str(hea.with_suffix("")), **kwargs)
    with tempfile.TemporaryDirectory(prefix="ecgfm-wfdb-") as tmp:
        os.symlink(hea.resolve(), os.path.join(tmp, hea.stem + ".hea"))
        for fname in sorted(set(header.file_name) - {"-", "~"}):
            target = os.path.join(tmp, fname)
            os.makedirs(os.path.dirname(target), exist_ok=True)   # a signal file named with its sub-folder
            os.symlink((hea.parent / fname).resolve(), target)
        return wfdb.rdrecord(os.path.join(tmp, hea.stem), **kwargs)


def read_challenge(path: str | os.PathLike, source: str = "challenge",
                   rename_leads: Mapping[str, str] | None = None, root: str | os.PathLike | None = None,
                   fs_range: Sequence[float] | None = None) -> ECGRecord:
    """Read a PhysioNet challenge record: WFDB ``.hea`` + MATLAB ``.mat`` holding ``val`` in ADC units.

    Physical values are ``(val - baseline) / gain`` with gain, baseline and units from the header; the
    16-bit invalid-sample value ``-32768`` becomes NaN, as in WFDB. Used for CinC 2017, 2020 and 2021.

    Args:
        path: the record, with or without ``.hea`` / ``.mat``.
        source: value of ``record.source``.
        rename_leads: optional published-name -> lead-name mapping (CinC 2017: ``{"ECG": "I"}``).
        root: dataset root: the ``.mat`` file named by the header must lie inside it (default: the header's
            folder).
        fs_range: plausible sampling rates ``(low, high)`` in Hz (default :data:`FS_RANGE`).

    Returns:
        The validated record; ``meta`` holds ``age`` / ``sex`` from ``# Age:`` / ``# Sex:`` and the raw
        ``# Dx:`` string as ``dx_text`` when present.

    Raises:
        ECGDataError: missing/unreadable/corrupt ``.mat`` or one outside ``root``, a ``val`` array whose shape
            disagrees with the header or that holds non-integer values, a format-16 record whose ``val`` is
            unsigned (uint16: negative samples would read as ~+65 mV, and the 16-bit checksums would still match)
            or holds values outside the signed 16-bit range, a header checksum that does not match ``val``, plus
            everything :func:`read_wfdb` checks in the header.
    """
    hea = header_path(path)
    return _read_mat_record(hea, read_header(hea, fs_range), source, rename_leads, root)


def _read_mat_record(hea: Path, header: WFDBHeader, source: str, rename_leads: Mapping[str, str] | None,
                     root: str | os.PathLike | None = None) -> ECGRecord:
    files = sorted(set(header.file_name))
    if len(files) != 1 or not files[0].lower().endswith(".mat"):
        raise ECGDataError(hea, f"expected one .mat signal file in the header, found {files}")
    mat = _signal_file(hea, files[0], root)
    if not mat.is_file():
        raise ECGDataError(hea, f"signal file {files[0]!r} named in the header is missing (looked for {mat})")
    _check_record_size(hea, header.n_sig, header.sig_len, header.fs)
    content = _loadmat(mat, "val")
    if "val" not in content:
        raise ECGDataError(mat, _no_val_problem(mat))
    val = np.asarray(content["val"])
    if val.ndim != 2 or not np.issubdtype(val.dtype, np.number) or np.issubdtype(val.dtype, np.complexfloating):
        raise ECGDataError(mat, f"'val' must be a 2-D real numeric array, got {val.dtype} {val.shape}")
    n_sig = header.n_sig
    if val.shape[0] != n_sig:
        transposed = val.shape[1] == n_sig and (header.sig_len is None or val.shape[0] == header.sig_len)
        raise ECGDataError(mat, f"'val' has {val.shape[0]} rows but the header {hea.name} lists {n_sig} signals"
                                + (f"; it looks transposed (shape {val.shape} is samples x signals): save it as "
                                   f"signals x samples, {n_sig} x {val.shape[0]}" if transposed else ""))
    if header.sig_len is not None and val.shape[1] != header.sig_len:
        raise ECGDataError(mat, f"'val' has {val.shape[1]} samples but the header {hea.name} announces "
                                f"{header.sig_len} (truncated or mismatched file)")
    if not np.issubdtype(val.dtype, np.integer):
        finite = np.isfinite(val)
        if not finite.all():
            # say what the values are: "non-integer" hides that the file marks missing samples with NaN
            r, c = np.argwhere(~finite)[0]
            what = "NaN" if np.isnan(val[r, c]) else "infinite values"
            n_nan, n_inf = int(np.isnan(val).sum()), int(np.isinf(val).sum())
            counts = ", ".join(f"{k} {name}" for k, name in ((n_nan, "NaN"), (n_inf, "infinite")) if k)
            raise ECGDataError(mat, f"'val' holds {what} ({counts} of {val.size} values, first in "
                                    f"{header.sig_name[int(r)] or f'signal {int(r)}'} at sample {int(c)}; "
                                    f"{val.dtype}): the challenge format stores ADC units, which are integers; "
                                    f"mark a missing sample with the format's invalid-sample value (-32768 for "
                                    f"format 16, which reads back as NaN)")
        if (val != np.round(val)).any():
            raise ECGDataError(mat, f"'val' holds non-integer values ({val.dtype}): the challenge format stores "
                                    "ADC units, which are integers")
    _check_signed_16(val, header, hea, mat)
    fmts = [str(f).split("+")[0] for f in header.fmt]
    other = sorted({f for f in fmts if f not in _MAT_FORMATS})
    if other:   # a .mat holds plain integers: 16 / 61 / 24 / 32, or 80 (bytes offset by 128, as wfdb2mat writes)
        raise ECGDataError(mat, f"the header {hea.name} declares format(s) {other} for a .mat signal file; a .mat "
                                f"holds formats {', '.join(_MAT_FORMATS)} only")
    digital = val.astype(np.int64)
    rows80 = [i for i, f in enumerate(fmts) if f == "80"]
    if rows80:
        if val.dtype.itemsize != 1 or not np.issubdtype(val.dtype, np.integer):
            raise ECGDataError(mat, f"'val' is {val.dtype}, but the header {hea.name} declares format 80 (8-bit "
                                    f"samples stored as bytes offset by 128): save 'val' as uint8")
        # wfdb reads format 80 as bytes minus 128 (wfdb2mat's uint8 files hold sample + 128): read the same
        digital[rows80] = digital[rows80] % 256 - 128
    _verify_checksums(header, digital.sum(axis=1), mat)
    gain = np.asarray(header.adc_gain, dtype=np.float64)[:, None]
    baseline = np.asarray(header.baseline, dtype=np.float64)[:, None]
    signal = ((digital - baseline) / gain).astype(np.float32)
    for i, f in enumerate(fmts):   # each signal's own invalid-sample value reads as NaN, as wfdb and .dat files do
        invalid = _INVALID.get(f)
        if invalid is not None:
            signal[i, digital[i] == invalid] = np.nan
    fields = parse_header_comments(header.comments or [])
    record = _finish(signal, header.sig_name, header, hea, source,
                     extra_header={"signal_file": str(mat), "checksum": _checksum_status(header)},
                     rename=rename_leads)
    if "dx" in fields:
        record.meta["dx_text"] = fields["dx"]
    return record


def _loadmat(mat: Path, name: str) -> dict[str, Any]:
    """``scipy.io.loadmat`` of the variable ``name`` of a .mat file (MATLAB v4 to v7).

    Raises:
        ECGDataError: naming the file: a MATLAB v7.3 file (HDF5-based; scipy does not read it, and ecgfm has no
            HDF5 dependency), with how to re-save it; any other unreadable or corrupt file, with scipy's error.
    """
    try:
        return scipy.io.loadmat(str(mat), variable_names=[name])
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for corrupt files
        if _is_mat_v73(mat):
            raise ECGDataError(mat, "MATLAB v7.3 (HDF5-based) .mat file, which is not supported: re-save it as a "
                                    f"v7 (or v4) MAT-file, e.g. in MATLAB save(file, '{name}', '-v7'), or from "
                                    "Python with scipy.io.savemat") from None
        raise ECGDataError(mat, f"unreadable or corrupt .mat file: {type(exc).__name__}: {exc}") from None


def _is_mat_v73(mat: Path) -> bool:
    """Whether a file's 128-byte MAT-file header says MATLAB v7.3 (version 0x0200, read as scipy does)."""
    try:
        with open(mat, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    if head.startswith(b"MATLAB 7.3"):
        return True
    if len(head) < 128 or head[126:128] not in (b"IM", b"MI"):
        return False
    return (head[125] if head[126:127] == b"I" else head[124]) == 2


def _no_val_problem(mat: Path) -> str:
    """Why a challenge ``.mat`` file without ``val`` cannot be read: the variables it holds, and for a struct
    ``ECG`` (the original CPSC 2018 release) which source reads it."""
    try:
        found = scipy.io.whosmat(str(mat))
    except Exception:   # loadmat read the file; listing it should not fail, and must not hide the problem
        found = []
    shown = ", ".join(f"{name!r} ({kind} {'x'.join(str(d) for d in shape)})" for name, shape, kind in found[:10])
    text = (f"the .mat file holds no 'val' array (the challenge format's ADC samples, signals x samples); it holds "
            f"{shown + (' ...' if len(found) > 10 else '') if found else 'no variable'}")
    if any(name == "ECG" and kind == "struct" for name, _shape, kind in found):
        text += ("; a struct 'ECG' is the original CPSC 2018 release (ECG.data in mV, no header needed): read it "
                 "with sources=[cpsc2018] (cpsc2018.root=<folder>) or ecgfm.data.readers.read_cpsc2018")
    return text


def _check_signed_16(val: np.ndarray, header: WFDBHeader, hea: Path, mat: Path) -> None:
    """Refuse a ``val`` array that cannot hold the signed 16-bit samples its header's format 16 (or 61) declares.

    An unsigned array (e.g. the int16 samples re-saved as uint16) turns every negative sample into a value near
    +65,536 ADC units (+65 mV at a gain of 1000/mV), and the header checksums, being sums modulo 2**16, still
    match; a value outside -32768..32767 cannot be a 16-bit sample either.

    Raises:
        ECGDataError: naming the ``.mat`` file, its dtype or the first out-of-range value and its signal.
    """
    rows = [i for i, f in enumerate(header.fmt) if str(f) in ("16", "61")]
    if not rows:
        return
    if np.issubdtype(val.dtype, np.unsignedinteger):
        raise ECGDataError(mat, f"'val' is unsigned ({val.dtype}), but the header {hea.name} declares format 16 "
                                f"(signed 16-bit samples): negative samples would read as about +65536 ADC units; "
                                f"save 'val' as int16")
    sub = val[rows]
    bad = (sub < -32768) | (sub > 32767)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        i = rows[int(r)]
        raise ECGDataError(mat, f"'val' holds {int(bad.sum())} value(s) outside the signed 16-bit range "
                                f"-32768..32767 that the header {hea.name} declares (format 16), e.g. "
                                f"{sub[r, c].item()!r} in {header.sig_name[i] or f'signal {i}'} at sample {int(c)}")


def read_cpsc2018(path: str | os.PathLike, source: str = "cpsc2018") -> ECGRecord:
    """Read an original CPSC 2018 MATLAB v5 file: struct ``ECG`` with ``data`` (12 x N, mV), ``age``, ``sex``.

    The 2018 release has no header: the rate is 500 Hz and the rows are in the standard 12-lead order
    (I, II, III, aVR, aVL, aVF, V1-V6), as documented by the challenge. The values are millivolts (the
    2020 PhysioNet re-release stores the same records as ``data * 1000`` with gain 1000/mV).

    Raises:
        ECGDataError: unreadable file, missing ``ECG`` struct or ``data`` field, wrong shape, ``data`` not
            floating-point (integers are ADC units, e.g. the int16 microvolts of a re-export, not millivolts),
            empty or NaN, an ``age`` that is not a number.
    """
    p = Path(path)
    # found as X.MAT too (the folder scan matches extensions case-insensitively)
    p = _suffix_case_variant(p if p.suffix.lower() == ".mat" else p.with_name(p.name + ".mat"))
    if not p.is_file():
        raise ECGDataError(p, "file not found")
    content = _loadmat(p, "ECG")
    ecg = content.get("ECG")
    if ecg is None or ecg.dtype.names is None or "data" not in ecg.dtype.names or ecg.size < 1:
        raise ECGDataError(p, "expected a MATLAB struct 'ECG' with a field 'data' (CPSC 2018 format)")
    entry = ecg.flat[0]
    data = np.asarray(entry["data"])
    if data.ndim != 2 or data.shape[0] != 12 or not np.issubdtype(data.dtype, np.number):
        raise ECGDataError(p, f"ECG.data must be a numeric 12 x N array, got {data.dtype} {data.shape}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ECGDataError(p, f"ECG.data is {data.dtype}: CPSC 2018 stores millivolts as floating-point numbers; "
                              f"integers are ADC units (an int16 re-export holds microvolts, 1000 x too large), "
                              f"so convert them to mV as floats")
    if data.shape[1] == 0:
        raise ECGDataError(p, "zero-length record (0 samples)")
    signal = data.astype(np.float32)
    if np.isnan(signal).all():
        raise ECGDataError(p, "every sample of every signal is NaN")
    names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    signal12, mask, dropped = map_leads(signal, names, p)
    meta: dict[str, Any] = {}
    if "age" in ecg.dtype.names:
        age = np.asarray(entry["age"]).ravel()
        numeric = np.issubdtype(age.dtype, np.number) and not np.issubdtype(age.dtype, np.complexfloating)
        if age.size and not numeric:
            raise ECGDataError(p, f"ECG.age must be a number, got {str(age[0])!r} ({age.dtype})")
        meta["age"] = float(age[0]) if age.size and np.isfinite(age[0]) else None
    if "sex" in ecg.dtype.names:
        sex = np.asarray(entry["sex"]).ravel()
        meta["sex"] = normalise_sex(sex[0]) if sex.size else None
    header = {"path": str(p), "fs_original": 500.0, "units": ["mV"] * 12, "gain": [1.0] * 12,
              "baseline": [0] * 12, "fmt": ["mat-v5-double"] * 12, "lead_names": names,
              "dropped_leads": dropped, "n_samples_original": int(signal.shape[1]), "comments": []}
    return ECGRecord(signal=signal12, fs=500.0, lead_mask=mask, record_id=p.stem, source=source,
                     meta=meta, header=header).validate(p)
