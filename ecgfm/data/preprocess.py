"""The one definition of ECG preprocessing, shared by pretraining, downstream evaluation and explanation.

A :class:`PreprocessSpec` is a small serialisable object. The cache stores the spec it applied in its manifest,
an exported encoder stores it in its JSON, and downstream code reads it back and applies the same transform to
new records, so every stage sees the same signal.

Order of operations in :func:`preprocess_record` (fixed, documented so that results are reproducible):
1. NaN handling (linear interpolation inside a lead, +-inf counts as NaN; a lead that is entirely NaN or flat is
   marked absent);
2. with ``notch_at_source`` only: the powerline notch at the record's own rate (before resampling: step 5 is then
   skipped);
3. resampling to ``spec.fs`` with a polyphase filter (:func:`scipy.signal.resample_poly`, edge padding
   ``resample_padtype``: the default zero padding makes a spike at the ends of a lead with a DC offset, warned
   about; ``line`` does not, see :class:`PreprocessSpec`; or Fourier resampling);
4. band-pass / baseline-wander removal (zero-phase Butterworth, second-order sections);
5. powerline notch (zero-phase IIR notch at ``spec.notch`` Hz at ``spec.fs``; or before step 4 with ``notch_first``);
6. running-median baseline removal (``median_baseline``; off by default); a record whose filtered signal is not
   finite is refused here (:class:`~ecgfm.data.record.ECGDataError`);
7. per-lead normalisation (``zscore``, ``robust`` (median / IQR), ``range`` (min / max to -1 / 1) or ``none``) over
   the whole record (or one statistic over all present leads with ``normalize_scope="record"``);
8. clipping to ``[-clip, clip]`` (``clip``; 20 by default).
Crop / pad / sliding windows are applied afterwards by the loaders (:func:`crop_or_pad`, :func:`sliding_windows`).

Published models were trained with pipelines that differ in details, and an imported encoder (:mod:`ecgfm.zoo`)
must see its own. The spec therefore also expresses (each field's default keeps the pipeline above unchanged, and
a field at its default is left out of :meth:`PreprocessSpec.to_dict`, so the fingerprints of existing caches and
artifacts do not change): the resampling method (``resample_method``: polyphase or Fourier), the band-pass design
(``bandpass_mode``: one band-pass or a high-pass then a low-pass, each of ``filter_order``; ``filter_design``:
second-order sections with ``sosfiltfilt`` or transfer-function coefficients with ``filtfilt``), the notch quality
factor and whether it comes first (``notch_q``, ``notch_first``), a median-filter baseline removal after the filters
(``median_baseline`` seconds), the normalisation scope (``normalize_scope``: per lead, or one statistic over all
present leads and time together), a notch at the record's own rate before resampling (``notch_at_source``) and the
edge padding of polyphase resampling (``resample_padtype``).

Every step acts on each lead on its own (except ``normalize_scope="record"``, whose statistic pools the present
leads, never the absent ones), so :func:`preprocess_signal` processes only the present leads (a 1-lead
record costs 1/12 of a 12-lead one) and reuses the filter designs (Butterworth sections, polyphase FIR); the output
of that ``(k, T)`` block is bit-identical to running the same steps (the same functions, the same padding) on all 12
rows (tested). It is not, in general, identical to plain scipy calls with their defaults: the default path
(``bandpass_mode="bandpass"``, ``filter_design="sos"``, :func:`bandpass`) pads ``sosfiltfilt`` with
``3 * (2 * len(sos) + 1)`` samples, while :func:`butterworth` (every other ``bandpass_mode`` / ``filter_design``)
uses scipy's default padding (``sosfiltfilt``'s, which discounts trailing zero coefficients, or ``filtfilt``'s
``3 * max(len(a), len(b))``), so ``bandpass_mode="cascade"`` with a single cut-off differs from the default path, most
near the record's edges (up to ~0.2 z on real records). Polyphase resampling with the cached FIR is bit-identical to
:func:`scipy.signal.resample_poly`'s default design. ``scipy.signal`` is imported on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from ecgfm.data.record import CANONICAL_LEADS, N_LEADS, ECGDataError, ECGRecord

log = logging.getLogger(__name__)


class _LazySciPySignal:
    """``scipy.signal``, imported on first use: importing it costs ~1 s of CPU, which every process that only
    needs :class:`PreprocessSpec` (the conversion parent, DataLoader workers, CLI entries) would otherwise pay."""

    def __getattr__(self, name: str) -> Any:
        from scipy import signal

        return getattr(signal, name)


sps = _LazySciPySignal()

NORMALIZATIONS = ("none", "zscore", "robust", "range")
NORMALIZE_SCOPES = ("lead", "record")
RESAMPLE_METHODS = ("polyphase", "fourier")
BANDPASS_MODES = ("bandpass", "cascade")
FILTER_DESIGNS = ("sos", "ba")
#: Edge paddings of polyphase resampling (:func:`scipy.signal.resample_poly`'s ``padtype``) a spec may ask for.
RESAMPLE_PADTYPES = ("constant", "line", "mean", "median", "edge")
# Fields added after the first release: left out of to_dict() (and so of the fingerprint) while at their default,
# so every spec written before keeps its dict and fingerprint.
_ADDED_DEFAULTS: dict[str, Any] = {"resample_method": "polyphase", "bandpass_mode": "bandpass",
                                   "filter_design": "sos", "notch_q": 30.0, "notch_first": False,
                                   "median_baseline": None, "normalize_scope": "lead", "leads": None,
                                   "notch_at_source": False, "resample_padtype": "constant"}


@dataclass(frozen=True)
class PreprocessSpec:
    """Preprocessing parameters.

    Every number must be finite, and a boolean is refused for each of them (``true`` is not read as 1): only
    ``notch_first`` and ``notch_at_source`` are switches. The fingerprint (:meth:`fingerprint`) is taken over the
    fields as written, not over what they do: an option that cannot act (``notch_q`` or ``notch_first`` without
    ``notch``, ``resample_padtype`` with ``fs`` null, ``filter_design`` with neither cut-off) or the same ``leads`` in
    another order gives the same output under another fingerprint (another cache key); such specs are kept as they
    are, not refused or reordered, so that every spec already written keeps its fingerprint.

    Attributes:
        fs: target sampling rate in Hz (None keeps the record's rate).
        highpass: high-pass cut-off in Hz for baseline-wander removal (None: off).
        lowpass: low-pass cut-off in Hz (None: off). Must be below ``fs / 2``.
        notch: powerline frequency to remove in Hz (50 or 60; None: off).
        filter_order: Butterworth order of the band-pass.
        normalize: normalisation, one of ``none``, ``zscore``, ``robust`` (median / IQR), ``range`` (min / max to
            -1 / 1).
        flat_threshold: a present lead whose standard deviation (mV) is below this is marked absent (0 or more; 0
            marks no lead flat).
        clip: after normalisation, clip values to ``[-clip, clip]`` (a positive number; None: off).
        resample_method: ``polyphase`` (:func:`scipy.signal.resample_poly`, anti-aliased FIR) or ``fourier``
            (:func:`scipy.signal.resample`, as ST-MEM's ``Resample``).
        bandpass_mode: ``bandpass`` (one Butterworth band-pass of ``filter_order`` when both cut-offs are set) or
            ``cascade`` (a high-pass, then a low-pass, each a Butterworth of ``filter_order``: ST-MEM).
        filter_design: ``sos`` (second-order sections, :func:`scipy.signal.sosfiltfilt`) or ``ba`` (transfer
            function coefficients, :func:`scipy.signal.filtfilt`: ECGFounder). Both are zero-phase.
        notch_q: quality factor of the notch (:func:`scipy.signal.iirnotch`).
        notch_first: apply the notch before the band-pass (ECGFounder) instead of after it.
        median_baseline: after the filters, subtract a running median of this many seconds (kernel
            ``int(seconds * fs) + 1`` samples, made odd; zero padding at the edges as :func:`scipy.signal.medfilt`);
            None: off.
        normalize_scope: ``lead`` (one centre / scale per lead) or ``record`` (one centre / scale over all present
            leads and time together: ST-MEM, ECGFounder).
        leads: canonical leads kept; the others are marked absent before any step (None: all). For a model that
            reads a lead subset (ECGFounder's 1-lead model reads lead I): a ``record``-scope normalisation then
            takes its statistics over the model's leads only, as its authors' code does on its own input.
        notch_at_source: apply the notch at the record's own rate, before resampling (instead of at ``fs`` after
            it). Needed to remove mains at or above ``fs / 2``: at ``fs=100`` a 50 Hz notch cannot act after
            resampling, and the polyphase anti-aliasing filter is only -6 dB at the new Nyquist, so 500 -> 100 Hz
            keeps about half of 50 Hz mains as a sample-to-sample alternation. A record whose rate is at or below
            twice ``notch`` is then refused (:class:`~ecgfm.data.record.ECGDataError`). Needs ``notch``; not with
            ``notch_first``.
        resample_padtype: how polyphase resampling extends the record beyond its ends (``padtype`` of
            :func:`scipy.signal.resample_poly`): ``constant`` (zeros, the default), ``line``, ``mean``, ``median``
            or ``edge``. Polyphase only. Zero padding turns a lead's level at each end into a step, and resampling
            comes before the band-pass, so the high-pass does not remove the offset first: the step becomes a spike
            at each end of the record, about 0.42 z per unit of (end sample / lead standard deviation) after the
            default 0.5 Hz high-pass and z-score (median over 1,140 leads of CinC 2017, Challenge 2021, CPSC 2018 /
            2021 and MIT-BIH record 100; CPSC 2021's 200 Hz records, whose leads sit at about 20 standard deviations
            from zero: 10 z median, clipped at 20; a synthetic record with +0.5 mV: 3.0 standard deviations of error
            in the first 0.5 s, against 0.75 with ``line``, the high-pass's own edge error). ``line`` (or ``edge``)
            removes it (scipy's standard remedy: the line through the end samples is taken out before the zero
            padding and added back). ``constant`` stays the default, and is not changed in place, because every
            cache, exported encoder and zoo spec written so far was made with it and stores it by leaving the field
            out (:meth:`to_dict`): changing what it does would silently give them other inputs than they were
            trained or cached with. Instead :func:`preprocess_signal` warns (once per process) when a record it
            resamples with ``constant`` has a lead whose first or last sample is more than
            :data:`EDGE_SPIKE_WARN_RATIO` standard deviations from zero; ``resample_padtype: line`` is a new spec
            (a new fingerprint, so new caches). Records that are not resampled (already at ``fs``, e.g. PTB-XL's
            ``records100`` at 100 Hz) are not affected.
    """

    fs: float | None = 100.0
    highpass: float | None = 0.5
    lowpass: float | None = None
    notch: float | None = None
    filter_order: int = 3
    normalize: str = "zscore"
    flat_threshold: float = 1e-4
    clip: float | None = 20.0
    resample_method: str = "polyphase"
    bandpass_mode: str = "bandpass"
    filter_design: str = "sos"
    notch_q: float = 30.0
    notch_first: bool = False
    median_baseline: float | None = None
    normalize_scope: str = "lead"
    leads: tuple[str, ...] | None = None
    notch_at_source: bool = False
    resample_padtype: str = "constant"

    def __post_init__(self) -> None:
        if self.leads is not None:
            leads = tuple(str(lead) for lead in self.leads)
            bad = [lead for lead in leads if lead not in CANONICAL_LEADS]
            if bad or not leads or len(set(leads)) != len(leads):
                raise ValueError(f"PreprocessSpec.leads must be distinct canonical lead names {CANONICAL_LEADS}, "
                                 f"got {list(self.leads)}")
            object.__setattr__(self, "leads", leads)
        for name, allowed in (("normalize_scope", NORMALIZE_SCOPES), ("resample_method", RESAMPLE_METHODS),
                              ("bandpass_mode", BANDPASS_MODES), ("filter_design", FILTER_DESIGNS),
                              ("resample_padtype", RESAMPLE_PADTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PreprocessSpec.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # numbers in one type, so that equal specs have equal dicts and fingerprints (fs 100 from a YAML file vs
        # 100.0 from another: two cache keys for one preprocessing, and a cache record refused as preprocessed
        # "with another spec"); every shipped spec already wrote these as floats, so their fingerprints stay
        for name in ("fs", "highpass", "lowpass", "notch", "flat_threshold", "clip", "notch_q", "median_baseline"):
            value = getattr(self, name)
            if value is None:
                continue
            what = ("a number" if name in ("flat_threshold", "notch_q") else
                    "a number or null (null: keep each record's own rate)" if name == "fs" else
                    "a number or null (null: off)")
            if isinstance(value, (bool, np.bool_)):   # float(True) is 1.0: clip=true clipped every sample to +-1
                raise ValueError(f"PreprocessSpec.{name} must be {what}, got the boolean {value!r} (a boolean is "
                                 f"not read as 1 or 0)")
            try:
                object.__setattr__(self, name, float(value))
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"PreprocessSpec.{name} must be {what}, got {value!r}") from None
            if not math.isfinite(getattr(self, name)):   # NaN passes every comparison below as False
                raise ValueError(f"PreprocessSpec.{name} must be a finite number, got {value!r}")
        order = self.filter_order
        try:
            whole = not isinstance(order, (bool, np.bool_)) and float(order).is_integer()
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise ValueError(f"PreprocessSpec.filter_order must be a whole number, got {order!r}")
        object.__setattr__(self, "filter_order", int(order))
        if self.notch_q is None:   # notch_q: null (a hand-edited encoder.json) failed with a bare TypeError below
            raise ValueError("PreprocessSpec.notch_q must be a number (the notch's quality factor), got None")
        if not self.notch_q > 0:
            raise ValueError(f"PreprocessSpec.notch_q must be positive, got {self.notch_q}")
        if self.median_baseline is not None and not float(self.median_baseline) > 0:
            raise ValueError(f"PreprocessSpec.median_baseline must be a positive number of seconds, got "
                             f"{self.median_baseline}")
        if self.flat_threshold is None or not self.flat_threshold >= 0:
            raise ValueError(f"PreprocessSpec.flat_threshold must be a standard deviation in mV, 0 or more (0 marks "
                             f"no lead flat), got {self.flat_threshold!r}")
        if self.clip is not None and not self.clip > 0:   # clip=0 zeroed every sample, clip=-1 set every one to -1
            raise ValueError(f"PreprocessSpec.clip must be a positive number (values are clipped to [-clip, clip]) "
                             f"or null (null turns clipping off), got {self.clip!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"PreprocessSpec.normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.fs is not None and not (0 < float(self.fs) <= 100_000):
            raise ValueError(f"PreprocessSpec.fs must be a positive rate in Hz, got {self.fs!r}")
        if self.fs is not None and self.lowpass is not None and self.lowpass >= self.fs / 2:
            raise ValueError(f"PreprocessSpec.lowpass={self.lowpass} must be below fs/2={self.fs / 2}")
        if self.fs is not None and self.highpass is not None and self.highpass >= self.fs / 2:
            # the filter would be skipped (nothing to pass above Nyquist) while the spec says baseline was removed
            raise ValueError(f"PreprocessSpec.highpass={self.highpass} must be below fs/2={self.fs / 2} (a high-pass "
                             f"cut-off in Hz, e.g. 0.5)")
        if self.highpass is not None and self.highpass <= 0:
            raise ValueError(f"PreprocessSpec.highpass must be positive, got {self.highpass}")
        if self.lowpass is not None and self.lowpass <= 0:
            raise ValueError(f"PreprocessSpec.lowpass must be positive, got {self.lowpass}")
        if self.highpass is not None and self.lowpass is not None and self.highpass >= self.lowpass:
            raise ValueError(f"PreprocessSpec.highpass={self.highpass} must be below lowpass={self.lowpass}")
        if self.notch is not None and self.notch <= 0:
            raise ValueError(f"PreprocessSpec.notch must be a positive frequency in Hz, got {self.notch}")
        if int(self.filter_order) < 1:
            raise ValueError(f"PreprocessSpec.filter_order must be at least 1, got {self.filter_order}")
        if not isinstance(self.notch_at_source, (bool, np.bool_)) and self.notch_at_source not in (0, 1):
            raise ValueError(f"PreprocessSpec.notch_at_source must be true or false, got {self.notch_at_source!r}")
        object.__setattr__(self, "notch_at_source", bool(self.notch_at_source))
        if not isinstance(self.notch_first, (bool, np.bool_)) and self.notch_first not in (0, 1):
            raise ValueError(f"PreprocessSpec.notch_first must be true or false, got {self.notch_first!r}")
        object.__setattr__(self, "notch_first", bool(self.notch_first))   # 0 and False: one fingerprint
        if self.notch_at_source and self.notch is None:
            raise ValueError("PreprocessSpec.notch_at_source=True needs a notch frequency (notch); set "
                             "notch_at_source=False when notch is null")
        if self.notch_at_source and self.notch_first:
            raise ValueError("PreprocessSpec.notch_at_source and notch_first are exclusive (a notch at the source "
                             "rate comes before the band-pass already)")
        if self.resample_padtype != "constant" and self.resample_method != "polyphase":
            raise ValueError(f"PreprocessSpec.resample_padtype={self.resample_padtype!r} acts on polyphase "
                             f"resampling only, not resample_method={self.resample_method!r}")
        if self.filter_design == "ba" and self.fs is not None:   # refused here, not record by record in a prepare
            for cutoff, btype in _filter_steps(float(self.fs), self.highpass, self.lowpass, self.bandpass_mode):
                _butter_design(int(self.filter_order), cutoff, btype, float(self.fs), "ba")

    def notch_problem(self) -> str | None:
        """Why ``notch`` cannot act, or None: it is applied after resampling to ``fs``, so a notch at or above
        ``fs / 2`` does nothing while the spec (written into manifests and artifacts) says the powerline was removed.
        Not an error here, so that specs already written stay loadable; new configurations are refused
        (:mod:`ecgfm.config`). None with ``notch_at_source`` (the notch acts at each record's own rate, and a record
        too slow for it is refused when it is preprocessed)."""
        if self.notch_at_source:
            return None
        if self.fs is not None and self.notch is not None and self.notch >= self.fs / 2:
            return (f"notch={self.notch} Hz is at or above fs/2={self.fs / 2} Hz (it is applied at fs, where it does "
                    f"nothing); use notch=null, or notch_at_source=true to remove it at the record's own rate")
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; the fields added after the first release appear only when they differ from their
        defaults (so the dict and :meth:`fingerprint` of every earlier spec stay the same)."""
        out = asdict(self)
        if out.get("leads") is not None:
            out["leads"] = list(out["leads"])
        for name, default in _ADDED_DEFAULTS.items():
            if out[name] == default and type(out[name]) is type(default):
                del out[name]
        return out

    @classmethod
    def raw(cls, fs: float | None = None) -> "PreprocessSpec":
        """No filter, no normalisation, no clipping: lead mapping, flat-lead masking and resampling to ``fs`` only
        (the cache-side equivalent of an artifact saved with ``preprocess=None``)."""
        return cls(fs=fs, highpass=None, lowpass=None, notch=None, normalize="none", clip=None)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "PreprocessSpec":
        if data is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PreprocessSpec keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def fingerprint(self) -> str:
        """Short stable hash of the spec (used in cache keys)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def preprocessed_spec(record: ECGRecord, model_spec: PreprocessSpec | None, what: str = "the model"
                      ) -> PreprocessSpec | None:
    """The spec a record was already preprocessed with (a record read back from a corpus cache says so in
    ``header["preprocessed"]``), checked against the model's: None for a raw record (a reader's), which the caller
    preprocesses.

    Raises:
        ECGDataError: the record was preprocessed with another spec than the model's (preprocessing it again
            would filter and normalise twice): pass the raw record from its reader instead.
    """
    done = record.header.get("preprocessed")
    if done is None:
        return None
    spec = PreprocessSpec.from_dict(dict(done))
    if model_spec is None or spec.fingerprint() != model_spec.fingerprint():
        raise ECGDataError(record.header.get("path", record.key),
                           f"record already preprocessed (read back from a corpus cache, spec {spec.fingerprint()}) "
                           f"but {what} preprocesses with "
                           f"{'no spec' if model_spec is None else 'spec ' + model_spec.fingerprint()}: "
                           f"preprocessing it again would filter and normalise twice; pass the raw record (read "
                           f"it with its reader) or a cache prepared with {what}'s preprocessing")
    return spec


def model_input_leads(network: Any) -> Any:
    """``init_args["input_leads"]`` of the backbone inside ``network`` (the network itself, its ``encoder`` (an
    :class:`~ecgfm.artifacts.EncoderClassifier`) or ``backbone``, one level down again), or None."""
    seen: list[Any] = [network]
    for obj in seen:
        args = getattr(obj, "init_args", None)
        if isinstance(args, dict) and args.get("input_leads") is not None:
            return args["input_leads"]
        if len(seen) < 8:
            seen.extend(sub for sub in (getattr(obj, "encoder", None), getattr(obj, "backbone", None))
                        if sub is not None and all(sub is not o for o in seen))
    return None


def with_input_leads(spec: PreprocessSpec, input_leads: Any) -> PreprocessSpec:
    """``spec`` for a model that reads only ``input_leads`` (a backbone's ``init_args["input_leads"]``) of the
    canonical 12: the other leads absent from the start (:attr:`PreprocessSpec.leads`), so that no step (a
    ``record``-scope normalisation, above all) sees leads the model never reads. Unchanged for all 12 or None."""
    if input_leads is None or spec.leads is not None:
        return spec
    leads = tuple(str(lead) for lead in input_leads)
    if set(leads) >= set(CANONICAL_LEADS):
        return spec
    return replace(spec, leads=tuple(lead for lead in CANONICAL_LEADS if lead in leads))


#: Share of a lead's samples missing (NaN / inf) above which :func:`preprocess_signal` warns that it filled them.
MISSING_WARN_SHARE = 0.1

#: A lead's first or last sample, in units of the lead's standard deviation, beyond which zero-padded polyphase
#: resampling (``resample_padtype="constant"``) is warned about: the edge spike it makes is about 0.42 z per unit
#: after the default high-pass and z-score (median over 1,140 real leads), so about 2 z and more here. Not lower: at
#: 2 (a 0.8 z spike) 128 of the first 300 PTB-XL 500 Hz records warned, every prepare of a 500 Hz source did.
EDGE_SPIKE_WARN_RATIO = 5.0
_WARNED_EDGE_SPIKE: set[str] = set()   # "warned" once per process: a prepare of CinC 2017 would warn for 1 in 3


def _warn_edge_spike(x: np.ndarray, rows: np.ndarray, fs: float, spec: "PreprocessSpec", where: Any) -> None:
    """Warn (once per process) when zero-padded polyphase resampling of ``x`` (the present leads ``rows``) will
    make an edge spike of about ``0.42 * ratio`` z, ``ratio`` being a lead's end sample over its standard
    deviation (see :attr:`PreprocessSpec.resample_padtype`)."""
    if _WARNED_EDGE_SPIKE or x.shape[-1] < 2:
        return
    sd = x.std(axis=1)
    ends = np.maximum(np.abs(x[:, 0]), np.abs(x[:, -1]))
    ratio = np.divide(ends, sd, out=np.zeros_like(ends, dtype=np.float64), where=sd > 0)
    j = int(np.argmax(ratio))
    if not ratio[j] > EDGE_SPIKE_WARN_RATIO:
        return
    _WARNED_EDGE_SPIKE.add("warned")
    log.warning("%s: lead %s ends at %.3g mV, %.1f times its standard deviation: resampling %g -> %g Hz with "
                "resample_padtype='constant' (zero padding, the default) turns that into a spike at the record's "
                "edge (about %.1f z after the default high-pass and z-score; resampling comes before the filters). "
                "Set preprocess.resample_padtype=line to remove it (a new spec fingerprint: caches are prepared "
                "again; an encoder trained on constant-padded inputs keeps its own spec). Warned once per process",
                where, CANONICAL_LEADS[rows[j]], float(x[j, 0] if abs(x[j, 0]) >= abs(x[j, -1]) else x[j, -1]),
                float(ratio[j]), float(fs), float(spec.fs), 0.42 * float(ratio[j]))


def kept_leads(mask: np.ndarray, leads: Sequence[str] | None) -> np.ndarray:
    """``(12,)`` bool: the present leads of ``mask`` that a spec keeps (``PreprocessSpec.leads``; None: all).

    Args:
        mask: ``(12,)`` presence mask in the canonical lead order.
        leads: the leads the preprocessing keeps, or None.
    """
    out = np.asarray(mask, dtype=bool).copy()
    if leads is not None:
        out &= np.isin(np.array(CANONICAL_LEADS), list(leads))
    return out


def recorded_extent(sig: np.ndarray) -> tuple[int, int]:
    """``[first, last)``: the samples of ``sig (rows, T)`` from the first to the last at which some row is finite.

    Leading and trailing samples missing (NaN / inf) in every row are not part of the record: the padding of
    records of unequal length stacked into one array, or a recording whose every lead is invalid at its start or
    end. Every input path cuts them off (:func:`trim_unrecorded_edges` for records, the API for arrays) rather than
    filling them, so one record gives the model one input however it arrives.

    Args:
        sig: ``(rows, T)`` signal (the rows of the present leads).

    Returns:
        ``(first, last)`` sample indices; ``(0, T)`` when nothing is to cut (or no sample is finite: that record is
        refused later as having no usable lead).
    """
    t = int(sig.shape[-1])
    if sig.size == 0:
        return 0, t
    recorded = np.isfinite(sig).any(axis=0)
    if recorded.all() or not recorded.any():
        return 0, t
    return int(np.argmax(recorded)), t - int(np.argmax(recorded[::-1]))


def trim_unrecorded_edges(record: ECGRecord, leads: Sequence[str] | None = None) -> ECGRecord:
    """``record`` without the leading / trailing samples missing in every present lead (:func:`recorded_extent`;
    with ``leads``, every present lead of those), its annotations and evidence moved with it; the record itself
    when there is nothing to cut. The header records what was cut (``header["trimmed_edge_samples"] = [head,
    tail]``, at the record's rate) and a log line says so.

    Args:
        record: a raw record (``signal (12, T)``, canonical lead order).
        leads: the leads the preprocessing keeps (``PreprocessSpec.leads``; None: every present lead).

    Returns:
        The record, ``(12, T')`` with ``T' <= T``, annotations moved (:func:`_trim_annotations`).
    """
    rows = np.flatnonzero(kept_leads(record.lead_mask, leads))
    first, last = recorded_extent(np.asarray(record.signal)[rows]) if len(rows) else (0, record.n_samples)
    if (first, last) == (0, record.n_samples):
        return record
    n = last - first
    log.info("%s: its first %d and last %d samples are missing in every lead: cut off (not filled)",
             record.header.get("path", record.key), first, record.n_samples - last)
    evidence = None if record.evidence is None else record.evidence[:, first:last]
    annotations = _trim_annotations(record.annotations, first, n) if record.annotations else record.annotations
    header = {**record.header, "trimmed_edge_samples": [int(first), int(record.n_samples - last)]}
    return record.replace(signal=record.signal[:, first:last], evidence=evidence, annotations=annotations,
                          header=header)


def _interpolate_nans(x: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN (and +-inf) runs of a 1-D signal (edges hold the nearest valid value)."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return x
    idx = np.arange(x.shape[0])
    out = x.copy()
    out[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
    return out


@functools.lru_cache(maxsize=64)
def _polyphase_fir(up: int, down: int, dtype: str) -> np.ndarray:
    """The anti-aliasing FIR filter :func:`scipy.signal.resample_poly` designs by default (Kaiser window, beta 5,
    half length ``10 * max(up, down)``, cut-off ``1 / max(up, down)``), cast to the signal's dtype as it does.

    Cached and passed back as ``window=`` so that the design (a ``firwin`` call, ~40 % of the cost of resampling
    one 30 s single-lead record) is done once per rate pair; the output is bit-identical to the default call.
    """
    max_rate = max(up, down)
    return sps.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0)).astype(dtype)


def resample(sig: np.ndarray, fs_in: float, fs_out: float, method: str = "polyphase",
             padtype: str = "constant") -> np.ndarray:
    """Resampling along the last axis. ``(..., T) -> (..., T * fs_out / fs_in)``.

    ``method="polyphase"`` (default): anti-aliased polyphase filter by the exact ratio of integer rates (before
    2026-12-06 every ratio was reduced to a denominator of at most 1000: exact for 500, 360, 300, 257, 250, 200 ->
    100 Hz, but 4096 -> 100 Hz ran 30 ms per 10 min off; a cache prepared before then from such a rate pair keeps
    those samples until its folder is deleted); other rates by the nearest ratio of denominator <= 1000, with a
    warning when the time axis runs off. ``"fourier"``: :func:`scipy.signal.resample` to ``int(T * fs_out / fs_in)``
    samples (ST-MEM's ``Resample``), computed in float64.

    Output length: ``ceil(T * up / down)`` samples for polyphase (``up / down`` the rate ratio used), ``int(T * fs_out
    / fs_in)`` (rounded down) for Fourier. ``padtype`` (polyphase only) is :func:`scipy.signal.resample_poly`'s:
    ``constant`` (zeros beyond the ends, the default: a lead with a DC offset gets a step of its end values at each
    end, e.g. the first output sample of a lead at +0.5 mV is 0.3 mV, 0.2 mV short of it, at 500 -> 100 Hz), ``line``,
    ``mean``, ``median``, ``edge`` (``line`` and ``edge`` remove the step). See
    :attr:`PreprocessSpec.resample_padtype` for its size after filtering and why ``constant`` stays the default.
    """
    if padtype not in RESAMPLE_PADTYPES:
        raise ValueError(f"resample: padtype must be one of {RESAMPLE_PADTYPES}, got {padtype!r}")
    if float(fs_in) == float(fs_out):
        return sig
    if method == "fourier":
        if padtype != "constant":
            raise ValueError(f"resample: padtype={padtype!r} applies to method='polyphase' only")
        n_out = int(sig.shape[-1] * float(fs_out) / float(fs_in))
        if n_out < 1:   # scipy.signal.resample divides by zero
            raise ValueError(f"resample: {sig.shape[-1]} samples at {float(fs_in):g} Hz give no sample at "
                             f"{float(fs_out):g} Hz with method='fourier'")
        return sps.resample(np.asarray(sig, dtype=np.float64), n_out, axis=-1).astype(np.float32)
    if method != "polyphase":
        raise ValueError(f"resample: method must be one of {RESAMPLE_METHODS}, got {method!r}")
    if float(fs_in).is_integer() and float(fs_out).is_integer():   # exact: 4096 -> 100 is 25/1024, not 24/983
        ratio = Fraction(int(fs_out), int(fs_in))
    else:
        ratio = Fraction(float(fs_out) / float(fs_in)).limit_denominator(1000)
        err = abs(float(ratio) * float(fs_in) / float(fs_out) - 1.0)
        if err > 1e-6:   # the output is labelled fs_out: say how far its time axis runs off
            log.warning("resample %g -> %g Hz: approximated by the ratio %s, so the output's time runs off by %.2g s "
                        "per hour; resample_method='fourier' resamples to the exact length", float(fs_in),
                        float(fs_out), ratio, err * 3600.0)
    up, down = ratio.numerator, ratio.denominator
    sig = np.asarray(sig)
    if sig.dtype in (np.float32, np.float64) and max(up, down) > 1:
        window = _polyphase_fir(up, down, sig.dtype.str)
        return sps.resample_poly(sig, up, down, axis=-1, window=window, padtype=padtype).astype(np.float32)
    return sps.resample_poly(sig, up, down, axis=-1, padtype=padtype).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _butter_sos(order: int, hp: float | None, lp: float | None, fs: float) -> np.ndarray:
    """Butterworth design, cached: designing the filter was ~45 % of per-record preprocessing time."""
    if hp is not None and lp is not None:
        return sps.butter(order, [hp, lp], btype="bandpass", fs=fs, output="sos")
    if hp is not None:
        return sps.butter(order, hp, btype="highpass", fs=fs, output="sos")
    return sps.butter(order, lp, btype="lowpass", fs=fs, output="sos")


def bandpass(sig: np.ndarray, fs: float, highpass: float | None, lowpass: float | None,
             order: int = 3) -> np.ndarray:
    """Zero-phase Butterworth band-pass (or high-/low-pass) along the last axis."""
    nyq = fs / 2.0
    hp = highpass if highpass is not None and highpass < nyq else None
    lp = lowpass if lowpass is not None and lowpass < nyq else None
    if hp is None and lp is None:
        return sig
    sos = _butter_sos(order, hp, lp, float(fs))
    padlen = min(sig.shape[-1] - 1, 3 * (2 * len(sos) + 1))
    return sps.sosfiltfilt(sos, sig, axis=-1, padlen=max(padlen, 0)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _butter_design(order: int, cutoff: tuple[float, ...], btype: str, fs: float, design: str) -> Any:
    """Butterworth design as ``sos`` sections or ``(b, a)``, cached.

    Raises:
        ValueError: a ``ba`` design whose transfer-function coefficients cannot represent the filter (see
            :func:`_check_ba`).
    """
    wn = cutoff[0] if len(cutoff) == 1 else list(cutoff)
    coeffs = sps.butter(order, wn, btype=btype, fs=fs, output="sos" if design == "sos" else "ba")
    if design == "ba":
        _check_ba(coeffs, sps.butter(order, wn, btype=btype, fs=fs, output="sos"), order, cutoff, btype, fs)
    return coeffs


#: A ``ba`` design is refused when a pole of its rounded denominator lies this close to the unit circle or beyond,
BA_MAX_POLE_RADIUS = 1.0 - 1e-9
#: or when ``filtfilt`` with it is further than this (in units of the output's standard deviation) from
#: ``sosfiltfilt`` with the same Butterworth on a 10 s test signal (a step plus white noise): order 6, 0.5 Hz
#: high-pass at 500 Hz is 0.29 off (refused); ECGFounder's order 4, 0.5-40 Hz band-pass at 500 Hz 7e-5, order 5
#: 0.013 (accepted: the design its authors' code computes, close to the intended filter).
BA_MAX_ERROR = 0.05


@functools.lru_cache(maxsize=64)
def _ba_test_signal(n: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(n)
    x[n // 2:] += 3.0
    return x


def _check_ba(ba: Any, sos: np.ndarray, order: int, cutoff: tuple[float, ...], btype: str, fs: float) -> None:
    """Refuse transfer-function coefficients that do not filter as the Butterworth designed: high orders at low
    cut-offs (relative to ``fs``) put the poles so close to ``z = 1`` that rounding ``a`` moves them, or takes
    them out of the unit circle (``filtfilt`` then returns NaN or a wrong signal). Measured, not guessed from the
    pole positions: the design is run once on a test signal against its second-order sections."""
    b, a = ba
    realised = np.roots(a)
    radius = float(np.abs(realised).max()) if realised.size else 0.0
    error = float("inf")
    if radius < BA_MAX_POLE_RADIUS:
        x = _ba_test_signal(max(int(10 * fs), 64))
        ref = sps.sosfiltfilt(sos, x)
        with np.errstate(all="ignore"):
            error = float(np.max(np.abs(sps.filtfilt(b, a, x) - ref)) / max(float(np.std(ref)), 1e-12))
    if not error <= BA_MAX_ERROR:   # NaN (diverged) included
        raise ValueError(
            f"filter_design='ba' with filter_order={order}: the {btype} Butterworth at {list(cutoff)} Hz "
            f"(rate {fs:g} Hz) is numerically unstable as transfer-function coefficients (largest pole |z| = "
            f"{radius:.9f}; its output is {error:.2g} standard deviations off the second-order-sections filter): "
            f"use filter_design='sos' (second-order sections) or a lower filter_order")


def _zero_phase(sig: np.ndarray, design: str, coeffs: Any) -> np.ndarray:
    """Forward-backward filtering with scipy's default edge padding (odd extension of its default length),
    shortened for records shorter than that: ``sosfiltfilt`` for sections, ``filtfilt`` for ``(b, a)``."""
    t = sig.shape[-1]
    if design == "sos":
        sos = coeffs
        # scipy.signal.sosfiltfilt's default padlen (it discounts trailing zero coefficients of first-order sections)
        ntaps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
        return sps.sosfiltfilt(sos, sig, axis=-1, padlen=max(min(t - 1, 3 * ntaps), 0))
    b, a = coeffs
    return sps.filtfilt(b, a, sig, axis=-1, padlen=max(min(t - 1, 3 * max(len(a), len(b))), 0))


def _filter_steps(fs: float, highpass: float | None, lowpass: float | None,
                  mode: str) -> list[tuple[tuple[float, ...], str]]:
    """The Butterworth filters :func:`butterworth` runs: ``[(cut-offs, btype)]`` (a cut-off at or above Nyquist is
    skipped; ``bandpass`` mode makes one band-pass when both are set, ``cascade`` a high-pass then a low-pass)."""
    nyq = fs / 2.0
    hp = highpass if highpass is not None and highpass < nyq else None
    lp = lowpass if lowpass is not None and lowpass < nyq else None
    if mode == "bandpass" and hp is not None and lp is not None:
        return [((float(hp), float(lp)), "bandpass")]
    return ([((float(hp),), "highpass")] if hp is not None else []) + \
        ([((float(lp),), "lowpass")] if lp is not None else [])


def butterworth(sig: np.ndarray, fs: float, highpass: float | None, lowpass: float | None, order: int,
                mode: str = "cascade", design: str = "sos") -> np.ndarray:
    """Zero-phase Butterworth filtering with an explicit design, for pipelines that must be reproduced exactly.

    Args:
        sig: ``(..., T)`` signal.
        fs: its rate in Hz.
        highpass, lowpass: cut-offs in Hz (None: that side off; a cut-off at or above Nyquist is skipped).
        order: Butterworth order of each filter.
        mode: ``bandpass`` (one band-pass when both cut-offs are set) or ``cascade`` (high-pass, then low-pass).
        design: ``sos`` (:func:`scipy.signal.sosfiltfilt`) or ``ba`` (:func:`scipy.signal.filtfilt`).

    Returns:
        Filtered float32 ``(..., T)`` (computed in float64).
    """
    steps = _filter_steps(fs, highpass, lowpass, mode)
    if not steps:
        return sig
    x = np.asarray(sig, dtype=np.float64)
    for cutoff, btype in steps:
        x = _zero_phase(x, design, _butter_design(int(order), cutoff, btype, float(fs), design))
    return x.astype(np.float32)


def median_baseline(sig: np.ndarray, fs: float, seconds: float) -> np.ndarray:
    """Subtract a running median (baseline wander) of ``seconds`` along the last axis.

    The kernel is ``int(seconds * fs) + 1`` samples, made odd (ECGFounder's ``filter_bandpass``); the edges are
    zero-padded as :func:`scipy.signal.medfilt` does. :func:`scipy.ndimage.median_filter` computes the same
    medians, much faster than ``medfilt``.
    """
    from scipy import ndimage

    k = int(seconds * fs) + 1
    k += 1 - k % 2
    x = np.asarray(sig, dtype=np.float32)
    size = (1,) * (x.ndim - 1) + (k,)
    return (x - ndimage.median_filter(x, size=size, mode="constant", cval=0.0)).astype(np.float32)


def notch(sig: np.ndarray, fs: float, freq: float | None, quality: float = 30.0) -> np.ndarray:
    """Zero-phase IIR notch at ``freq`` Hz (skipped when ``freq`` is at or above Nyquist)."""
    if freq is None or freq >= fs / 2:
        return sig
    b, a = sps.iirnotch(freq, quality, fs=fs)
    padlen = min(sig.shape[-1] - 1, 3 * max(len(a), len(b)))
    return sps.filtfilt(b, a, sig, axis=-1, padlen=max(padlen, 0)).astype(np.float32)


def _normalize_rows(x: np.ndarray, method: str, scope: str = "lead") -> np.ndarray:
    """Normalise ``x`` ``(k, T)`` (``zscore``, ``robust`` or ``range``): every row over its samples
    (``scope="lead"``), or all rows with one centre and scale over all their samples together (``scope="record"``)."""
    axis = 1 if scope == "lead" else None
    if method == "zscore":
        center = x.mean(axis=axis, keepdims=True)
        scale = x.std(axis=axis, keepdims=True)
    elif method == "range":  # min and max to -1 and 1 (HuBERT-ECG's scaling)
        lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
        center, scale = (hi + lo) / 2, (hi - lo) / 2
    else:  # robust
        center = np.median(x, axis=axis, keepdims=True)
        q75, q25 = np.percentile(x, [75, 25], axis=axis, keepdims=True)
        scale = (q75 - q25) / 1.349
    return (x - center) / np.maximum(scale, 1e-6)


def normalize(sig: np.ndarray, mask: np.ndarray, method: str, scope: str = "lead") -> np.ndarray:
    """Normalisation of the present leads (per lead, or ``scope="record"``: one statistic over all present leads
    and time); absent leads stay 0. ``(12, T) -> (12, T)``."""
    if method == "none":
        return sig
    out = np.zeros_like(sig)
    out[mask] = _normalize_rows(sig[mask], method, scope)
    return out


def preprocess_signal(sig: np.ndarray, fs: float, mask: np.ndarray, spec: PreprocessSpec,
                      where: Any = "<memory>") -> tuple[np.ndarray, float, np.ndarray]:
    """Apply ``spec`` to a canonical ``(12, T)`` signal.

    Returns:
        ``(signal, fs, mask)`` after preprocessing; leads found NaN-only or flat are removed from the mask.

    Raises:
        ECGDataError: when no usable lead is left, the record is shorter than a filter needs, its rate is too low
            for a ``notch_at_source`` notch, or the filtered / normalised signal is not finite.
        ValueError: a ``filter_design="ba"`` filter that is numerically unstable at this rate.
    """
    sig = np.asarray(sig, dtype=np.float32)
    mask = kept_leads(mask, spec.leads)   # leads the model does not read: absent from the start
    if spec.leads is not None:
        if not mask.any():
            raise ECGDataError(where, f"none of the leads {list(spec.leads)} the preprocessing keeps is present")
    if sig.shape[-1] == 0:
        raise ECGDataError(where, "zero-length record (0 samples)")
    # Every step below acts on each lead on its own, so only the present leads are processed, as a compact
    # (k, T) block (a copy): the same numbers as processing all 12 rows, at k/12 of the cost (a 1-lead CinC 2017
    # record: 12x less resampling and filtering). The absent rows are zeros in the output.
    rows = np.flatnonzero(mask)
    x = sig[rows]
    finite = np.isfinite(x)
    keep = np.ones(len(rows), dtype=bool)
    if not finite.all():
        for j in np.flatnonzero(~finite.all(axis=1)):
            if not finite[j].any():
                keep[j] = False
                x[j] = 0.0
            else:
                share = 1.0 - float(finite[j].mean())
                if share > MISSING_WARN_SHARE:   # scored as if recorded: say so, with how much was made up
                    log.warning("%s: lead %s: %.0f%% of its samples are missing (NaN / inf) and were filled by "
                                "interpolation (runs at the edges hold the nearest value); trim records to their "
                                "recorded part", where, CANONICAL_LEADS[rows[j]], 100 * share)
                x[j] = _interpolate_nans(x[j])
    if len(rows):
        keep &= x.std(axis=1) >= spec.flat_threshold
    if not keep.all():
        mask[rows[~keep]] = False
        rows, x = rows[keep], x[keep]
    if not mask.any():
        raise ECGDataError(where, "no usable lead after preprocessing (all leads NaN or flat)")
    if spec.notch_at_source and spec.notch is not None:
        if not float(spec.notch) < float(fs) / 2:
            raise ECGDataError(where, f"notch={spec.notch} Hz with notch_at_source: the record's rate {float(fs):g} Hz "
                                      f"(Nyquist {float(fs) / 2:g} Hz) cannot carry {spec.notch} Hz mains, so the "
                                      "notch cannot act; use a spec without notch for records at this rate")
        if x.shape[-1] < 8:
            raise ECGDataError(where, f"record too short to preprocess ({x.shape[-1]} samples at {float(fs)} Hz)")
        x = notch(x, float(fs), spec.notch, spec.notch_q)
    out_fs = float(fs)
    if spec.fs is not None and float(spec.fs) != float(fs):
        if spec.resample_method == "fourier":   # its output length (rounded down) can be 0: refuse it here
            n_out = int(x.shape[-1] * float(spec.fs) / float(fs))
            if n_out < 8:
                raise ECGDataError(where, f"record too short to preprocess ({n_out} samples at {float(spec.fs)} Hz)")
        if spec.resample_method == "polyphase" and spec.resample_padtype == "constant":
            _warn_edge_spike(x, rows, fs, spec, where)
        x = resample(x, fs, spec.fs, spec.resample_method, spec.resample_padtype)
        out_fs = float(spec.fs)
    if x.shape[-1] < 8:
        raise ECGDataError(where, f"record too short to preprocess ({x.shape[-1]} samples at {out_fs} Hz)")
    if spec.notch_first and not spec.notch_at_source:
        x = notch(x, out_fs, spec.notch, spec.notch_q)
    if spec.bandpass_mode == "bandpass" and spec.filter_design == "sos":
        x = bandpass(x, out_fs, spec.highpass, spec.lowpass, spec.filter_order)  # the original path, unchanged
    else:
        x = butterworth(x, out_fs, spec.highpass, spec.lowpass, spec.filter_order, spec.bandpass_mode,
                        spec.filter_design)
    if not spec.notch_first and not spec.notch_at_source:
        x = notch(x, out_fs, spec.notch, spec.notch_q)
    if spec.median_baseline is not None:
        x = median_baseline(x, out_fs, spec.median_baseline)
    if not np.isfinite(x).all():   # never hand NaN / inf to a network
        raise ECGDataError(where, f"the filtered signal is not finite (fs={spec.fs}, highpass={spec.highpass}, "
                                  f"lowpass={spec.lowpass}, filter_order={spec.filter_order}, filter_design="
                                  f"{spec.filter_design!r}, bandpass_mode={spec.bandpass_mode!r}, notch={spec.notch}"
                                  f", median_baseline={spec.median_baseline}); check the record's amplitude and the "
                                  "filter settings (filter_design='sos' is the stable design)")
    if spec.normalize != "none":
        x = _normalize_rows(x, spec.normalize, spec.normalize_scope)
        if not np.isfinite(x).all():
            raise ECGDataError(where, f"the normalised signal is not finite (normalize={spec.normalize!r}, "
                                      f"normalize_scope={spec.normalize_scope!r}): the record's amplitude overflows "
                                      "float32")
    if spec.clip is not None:
        np.clip(x, -spec.clip, spec.clip, out=x)
    out = np.zeros((N_LEADS, x.shape[-1]), dtype=np.float32)
    out[rows] = x
    return out, out_fs, mask


_WARNED_NOT_ACTING: set[tuple[str, ...]] = set()


def filters_not_acting(spec: PreprocessSpec, fs: float) -> list[str]:
    """The filters of ``spec`` that cannot act on a record at ``fs`` Hz (cut-off or notch at or above its Nyquist
    frequency): :func:`preprocess_signal` skips them. A spec without ``fs`` (records kept at their own rates) can
    have any of them. With ``fs`` set, such cut-offs are refused by :class:`PreprocessSpec`, but a notch at or above
    ``fs / 2`` (without ``notch_at_source``) is refused only by the config checks
    (:meth:`PreprocessSpec.notch_problem`), so a spec made in Python (``PreprocessSpec(notch=50.0)`` at the default
    ``fs=100``) or written before those checks can list it."""
    nyq = float(fs) / 2
    named = [("highpass", spec.highpass), ("lowpass", spec.lowpass)]
    if not spec.notch_at_source:   # a notch at the source rate that cannot act is an error of its own
        named.append(("notch", spec.notch))
    return [f"{name}={value:g} Hz (at or above the Nyquist frequency {nyq:g} Hz of a {float(fs):g} Hz record)"
            for name, value in named if value is not None and float(value) >= nyq]


def filled_samples(sig: np.ndarray, mask: np.ndarray, leads: Sequence[str] | None = None) -> dict[str, int]:
    """``{lead: number of missing (NaN / inf) samples}`` of the present leads (of ``leads``) that
    :func:`preprocess_signal` fills by interpolation: leads with some finite sample only (an all-missing lead is
    dropped, not filled); empty when nothing is filled.

    Args:
        sig: ``(12, T)`` raw signal, canonical lead order.
        mask: ``(12,)`` presence mask.
        leads: the leads the preprocessing keeps (None: all).

    Returns:
        ``{lead name: number of missing samples}``.
    """
    keep = kept_leads(mask, leads)
    out: dict[str, int] = {}
    for j in np.flatnonzero(keep):
        bad = int((~np.isfinite(sig[j])).sum())
        if 0 < bad < sig.shape[-1]:
            out[CANONICAL_LEADS[j]] = bad
    return out


def preprocess_record(record: ECGRecord, spec: PreprocessSpec) -> ECGRecord:
    """Apply ``spec`` to a record: leading / trailing samples missing in every lead it keeps are cut off first
    (:func:`trim_unrecorded_edges`), and the missing samples left inside it, which :func:`preprocess_signal` fills by
    interpolation, are counted per lead in ``header["filled_samples"]`` (:func:`filled_samples`; a log line names
    them) so that a cache says which of its samples were never recorded. The evidence mask (if any) is resampled by
    taking, for each output sample, the
    input sample at or before its time (``floor(i * fs_in / fs_out)``), and the sample
    positions of its annotations (R peaks, beat samples, AF episode bounds) are moved to the new rate. The result
    says so in ``header["preprocessed"]`` (``spec``), as a record read back from a corpus cache does, so that a
    model given it does not filter and normalise it a second time (:func:`preprocessed_spec`).

    Raises:
        ECGDataError: the record was preprocessed already (a cache record, or the output of this function).
    """
    where = record.header.get("path", record.key)
    if record.header.get("preprocessed") is not None:
        raise ECGDataError(where, "record already preprocessed (header['preprocessed']); preprocessing it again "
                                  "would filter and normalise twice: pass the raw record from its reader")
    record = trim_unrecorded_edges(record, spec.leads)
    filled = filled_samples(record.signal, record.lead_mask, spec.leads)
    if filled:
        log.info("%s: %s missing sample(s) (NaN / inf) filled by interpolation: %s", where,
                 sum(filled.values()), ", ".join(f"{lead} {n}" for lead, n in filled.items()))
    sig, fs, mask = preprocess_signal(record.signal, record.fs, record.lead_mask, spec, where)
    evidence = record.evidence
    if evidence is not None and evidence.shape[1] != sig.shape[1]:
        idx = np.minimum((np.arange(sig.shape[1]) * record.fs / fs).astype(np.int64), evidence.shape[1] - 1)
        evidence = evidence[:, idx]
    header = dict(record.header)
    header.setdefault("fs_original", float(record.fs))
    if header.get("derived_leads"):   # a derived lead the spec's lead set or a flat / NaN check dropped is not one
        header["derived_leads"] = [v for v in header["derived_leads"]
                                   if v in CANONICAL_LEADS and mask[CANONICAL_LEADS.index(v)]]
    if filled:   # samples the model sees that were never recorded (at the record's own rate)
        header["filled_samples"] = filled
    header["preprocessed"] = spec.to_dict()
    skipped = filters_not_acting(spec, fs)
    if skipped:   # the spec says these filters ran: the record says they did not
        header["filters_not_applied"] = skipped
        if tuple(skipped) not in _WARNED_NOT_ACTING:
            _WARNED_NOT_ACTING.add(tuple(skipped))
            if spec.fs is None:
                how = "set PreprocessSpec.fs to resample every record to one rate, or leave the filter out"
            else:   # only a notch at or above Nyquist of spec.fs gets here (cut-offs there are refused by the spec)
                how = (f"a notch at fs={float(spec.fs):g} Hz cannot remove it: use notch=null, or "
                       f"notch_at_source=true to remove it at the record's own rate")
            log.warning("%s: %s cannot act and was not applied (records at this rate say so in "
                        "header['filters_not_applied']); %s", where, "; ".join(skipped), how)
    annotations = record.annotations
    if annotations and float(fs) != float(record.fs):
        annotations = {k: _rescale_samples(v, fs / float(record.fs), sig.shape[1]) for k, v in annotations.items()}
    return record.replace(signal=sig, fs=fs, lead_mask=mask, evidence=evidence, header=header,
                          annotations=annotations)


def _shift_samples(value: Any, offset: int, n_samples: int) -> Any:
    """Integer sample positions (as :func:`_rescale_samples` takes them) ``offset`` samples earlier, within
    ``[0, n_samples)``; negative sentinels and non-integer annotations are kept as they are."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return value
    moved = np.where(arr >= 0, np.clip(arr - offset, 0, n_samples - 1), arr).astype(arr.dtype)
    return moved.tolist() if isinstance(value, list) else moved


def _trim_annotations(annotations: dict[str, Any], first: int, n_samples: int) -> dict[str, Any]:
    """A record's annotations after cutting its first ``first`` samples and keeping ``n_samples``
    (:func:`trim_unrecorded_edges`): what lay in a cut-off part is left out, not moved onto the edge (a beat there
    would be made up).

    * beats (``"sample"`` with arrays of the same length beside it: ``symbol``, ``aux_note``, the synthetic
      corpus's per-beat wave onsets): the beats whose ``sample`` is cut off leave every such array; the integer
      ones are moved (negative sentinels kept);
    * other sample arrays (``r_peaks``): positions cut off are left out, the others moved;
    * intervals (``[[start, end], ...]``, ``af_episodes``): moved and clipped to the record, those wholly cut off
      left out;
    * anything else is kept as it is.
    """
    out = dict(annotations)
    beats = np.asarray(annotations.get("sample", []))
    if beats.ndim == 1 and beats.dtype.kind in "iu" and beats.size:
        keep = (beats >= first) & (beats < first + n_samples)
        for k, v in annotations.items():
            arr = np.asarray(v)
            if arr.ndim == 1 and len(arr) == len(beats):
                kept = arr[keep]
                if kept.dtype.kind in "iu":
                    kept = _shift_samples(kept, first, n_samples)
                out[k] = kept.tolist() if isinstance(v, list) else kept
    for k, v in annotations.items():
        arr = np.asarray(v)
        if out[k] is not v or arr.dtype.kind not in "iu" or arr.size == 0:
            continue   # a beat array (done above), or not sample positions
        if arr.ndim == 1:
            moved = _shift_samples(arr[(arr < 0) | ((arr >= first) & (arr < first + n_samples))], first, n_samples)
        elif arr.ndim == 2 and arr.shape[1] == 2:
            moved = arr - first
            moved = np.clip(moved[(moved[:, 1] >= 0) & (moved[:, 0] < n_samples)], 0, n_samples - 1)
        else:
            continue
        out[k] = np.asarray(moved, dtype=arr.dtype).tolist() if isinstance(v, list) else np.asarray(moved, arr.dtype)
    return out


def _rescale_samples(value: Any, ratio: float, n_samples: int) -> Any:
    """Integer sample positions (an array, or ``[[start, end], ...]`` lists) at ``ratio`` times the rate, within
    ``[0, n_samples)``; negative sentinels and non-integer annotations (symbols, notes) are kept as they are."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return value
    moved = np.where(arr >= 0, np.minimum(np.round(arr * ratio), n_samples - 1), arr).astype(arr.dtype)
    return moved.tolist() if isinstance(value, list) else moved


def crop_or_pad(sig: np.ndarray, length: int, start: int | None = None,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """Crop ``(..., T)`` to ``length`` samples (random start when ``start`` is None and ``rng`` given,
    else centred), or zero-pad at the end when shorter.

    Returns:
        ``(window, start)`` where ``window`` is ``(..., length)``.
    """
    if int(length) < 1:
        raise ValueError(f"crop_or_pad: length must be a positive number of samples, got {length}")
    t = sig.shape[-1]
    if t >= length:
        if start is None:
            start = int(rng.integers(0, t - length + 1)) if rng is not None else (t - length) // 2
        start = int(min(max(start, 0), t - length))
        return sig[..., start:start + length], start
    pad = [(0, 0)] * (sig.ndim - 1) + [(0, length - t)]
    return np.pad(sig, pad), 0


def sliding_windows(sig: np.ndarray, length: int, stride: int) -> np.ndarray:
    """All windows of ``length`` samples every ``stride`` samples (the last window is aligned to the end so
    the whole record is covered). ``(L, T) -> (n_windows, L, length)``; shorter records are zero-padded."""
    if int(length) < 1 or int(stride) < 1:
        raise ValueError(f"sliding_windows: length and stride must be positive, got length={length}, "
                         f"stride={stride}")
    t = sig.shape[-1]
    if t <= length:
        return crop_or_pad(sig, length, start=0)[0][None]
    starts = list(range(0, t - length + 1, stride))
    if starts[-1] != t - length:
        starts.append(t - length)
    return np.stack([sig[..., s:s + length] for s in starts])
