"""The Python API: load an artifact, give it an ECG as its publisher ships it, get embeddings or probabilities.

>>> enc = ecgfm.Encoder.load("runs/mae/encoder")
>>> z = enc.embed(signal, fs=500, leads=["I", "II", ..., "V6"])      # (12, 5000) array -> (D,) vector
>>> clf = ecgfm.Classifier.load("results/finetune/.../classifier")
>>> clf.predict_proba("path/to/record")                                 # a WFDB record -> DataFrame (1, C)

Both apply the artifact's own preprocessing, so a caller never re-implements it:

1. **Leads**: rows named by ``leads`` are placed into the canonical 12-lead layout (aliases such as ``MLII``
   accepted, non-standard leads dropped, absent leads zero and masked), then into the artifact's input order. A
   network whose ``embed`` takes ``lead_mask`` (ViT-1D) gets the mask, so absent leads make no tokens, as in the
   project's frozen features and fine-tuning (``lead_aware`` in the artifact's description; absent: as the
   encoder was pretrained, ``method_hparams.lead_aware``, else true).
2. **Preprocessing**: :func:`ecgfm.data.preprocess.preprocess_signal` with the artifact's spec: resampling from
   ``fs`` to the artifact's rate, filters, baseline removal, normalisation.
3. **Windows**: records are cut into the artifact's window (sliding, the last window aligned to the end; a shorter
   record is zero-padded, as the benchmark's caches pad it, with a ``UserWarning`` naming the record, its length,
   the window and the padded fraction: the padding is embedded with it), the windows go through the network in
   batches, and window outputs are averaged: the mean window embedding (encoders), or the mean window probability
   / the activation of the mean logit as the classifier was validated with (classifiers; ``window_aggregate`` in
   its description).

Inputs: a NumPy array ``(leads, samples)`` for one record or ``(batch, leads, samples)`` for records of one
length, or a WFDB record path (``.hea`` + ``.dat``, or challenge ``.hea`` + ``.mat``), whose rate and lead names
come from its header. Nothing is downloaded; artifacts load without pickle (:mod:`ecgfm.artifacts`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ecgfm.artifacts import (EncoderClassifier, artifact_lead_aware, derive_trained_limb_leads, derives_limb_leads,
                             load_classifier, load_encoder, trained_leads_words, warn_record_leads)
from ecgfm.data.preprocess import (PreprocessSpec, kept_leads, model_input_leads, preprocess_signal,
                                   preprocessed_spec, recorded_extent, sliding_windows, with_input_leads)
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord, canonical_lead, map_leads

__all__ = ["Encoder", "Classifier", "load_record"]

log = logging.getLogger(__name__)

# An array record whose largest lead peak-to-peak amplitude is below this many "mV" looks like volts: an ECG in mV
# swings about 0.5-5 mV in its largest lead (in volts: 0.0005-0.005), and no recorded ECG stays under 50 uV in
# every lead. Volts are never harmless: the flat-lead threshold (PreprocessSpec.flat_threshold, in mV) then marks
# recorded leads absent.
VOLTS_MAX_PTP_MV = 0.05

# An array record whose largest lead peak-to-peak amplitude is above this many "mV" looks like microvolts or ADC
# counts (an ECG in mV swings about 0.5-5 mV in its largest lead; even a tall QRS with baseline wander stays under
# 10-15 mV, so 50 mV is far above any physiological lead, while the same record in microvolts swings 500-5000 and in
# ADC counts, at the usual 100-1000 counts per mV, hundreds to thousands). Such a scale is harmless only to an
# artifact whose preprocessing normalises (normalisation cancels it): one that does not (``normalize: none``, e.g.
# saved with ``preprocess=None``, PreprocessSpec.raw) feeds it to the network as it is, and a record in microvolts
# was scored [0.37, 0.38, 0.25] in mV and [1, 0, 0] in microvolts, silently.
UNNORMALISED_MAX_PTP_MV = 50.0


def load_record(path: str | os.PathLike, rename_leads: Mapping[str, str] | None = None
                ) -> tuple[np.ndarray, float, list[str]]:
    """Read one WFDB record (``.hea`` + ``.dat``) or challenge record (``.hea`` + ``.mat``).

    Args:
        path: the record (its header, or the name without extension).
        rename_leads: header lead name -> standard lead, for leads the header does not name by a standard name
            (a CinC 2017 record's one AliveCor lead ``ECG`` is lead I, as ecgfm's CinC 2017 reader reads it:
            ``{"ECG": "I"}``).

    Returns:
        ``(signal (present leads, T) float32 mV in canonical order, fs, lead names present)``.

    Raises:
        ECGDataError: an unreadable record, or one without a standard lead (the message says how to name it).
    """
    from ecgfm.data.readers.formats import header_path, read_wfdb

    hea = header_path(path)
    try:
        # read_wfdb reads the .mat file when the header names one (a challenge record): a <name>.mat lying beside a
        # .dat record is not taken for its signal
        rec = read_wfdb(hea, rename_leads=rename_leads)
    except ECGDataError as exc:
        if rename_leads is None and "no standard ECG lead among ['ECG']" in str(exc):
            raise ECGDataError(hea, "its one lead is named 'ECG', not a standard lead name; a CinC 2017 (AliveCor) "
                                    "record's lead is lead I, as ecgfm's CinC 2017 reader (and every benchmark "
                                    "cell of it) reads it: pass rename_leads={'ECG': 'I'}") from None
        raise
    present = [name for name, m in zip(CANONICAL_LEADS, rec.lead_mask) if m]
    return rec.signal[np.asarray(rec.lead_mask, dtype=bool)], float(rec.fs), present


class _Model:
    """What :class:`Encoder` and :class:`Classifier` share: input handling and windowing."""

    #: the artifact's kind, for the wording of messages (:func:`ecgfm.artifacts.trained_leads_words`)
    kind: str = "model"

    def __init__(self, network: nn.Module, spec: PreprocessSpec | None, meta: dict[str, Any], device: str):
        self.network = network.to(device).eval()
        self.spec = spec
        self.meta = meta
        self.device = torch.device(device)
        inp = meta.get("input") or {}
        self.fs: float | None = inp.get("fs") if inp.get("fs") is not None else (spec.fs if spec else None)
        self.leads: tuple[str, ...] = tuple(inp.get("leads") or CANONICAL_LEADS)
        self.window_samples: int | None = inp.get("window_samples")
        self.stride_samples: int | None = inp.get("stride_samples") or self.window_samples
        if self.fs is None and self.window_samples:
            # written before save_encoder required a rate with a window: the window is a number of samples at no
            # stated rate, so records are cut at the caller's rate (embed(x, fs=100) == embed(x, fs=500))
            warnings.warn(f"{meta.get('dir', 'this artifact')}: the artifact has a window of {self.window_samples} "
                          f"samples but no input rate (input.fs and preprocess.fs are null): records are not "
                          f"resampled and their windows are cut at the rate each record is given at; re-save it "
                          f"with fs= (ecgfm.artifacts.save_encoder)", UserWarning, stacklevel=3)
        # what every record goes through: the artifact's spec (an artifact without one: what every cache gives its
        # records, PreprocessSpec.raw, as the sweep's features of it), restricted to the leads the backbone reads
        # a record read back from a cache prepared with the artifact's own spec is not preprocessed again
        self._cache_pre = with_input_leads(spec if spec is not None else PreprocessSpec.raw(self.fs),
                                           model_input_leads(network))
        if spec is not None and spec.fs is None and self.fs is not None:
            # a cache that keeps each record's rate (spec.fs null) under a model trained at one rate: records of
            # another rate are resampled to it, as the sweep (rate_checked_spec) and the explain wrapper do
            spec = dataclasses.replace(spec, fs=float(self.fs))
        # an artifact whose input rows are a subset of the leads (input.leads I, II, V1 on a 3-channel network) is
        # preprocessed on those leads only, as the training pipeline prepares a model's records (a task cache keeps
        # only the leads the model reads: ecgfm.evaluate.sweep, with_input_leads) and the explain wrapper does; a
        # record-scope normalisation over all 12 of the record's leads gave another input than the explain stage's
        self._pre = with_input_leads(with_input_leads(spec if spec is not None else PreprocessSpec.raw(self.fs),
                                                      model_input_leads(network)), self.leads)

    # ------------------------------------------------------------------------------------------ inputs
    def _records(self, signal: Any, fs: float | None, leads: Sequence[str] | None,
                 rename_leads: Mapping[str, str] | None = None
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
        """Model-space records ``[(x (L_model, T_i), lead mask (L_model,) bool)]`` and their names."""
        if fs is not None:
            _rate(fs)   # checked here; used as given (messages keep the caller's spelling)
        if isinstance(leads, (str, bytes)):   # "II" read as ['I', 'I'] ("lead I appears twice"), "V1" as ['V', '1']
            raise ValueError(f"leads must be a list of names, e.g. ['II'], got the string {leads!r}"
                             + (f": pass leads=[{leads!r}]" if isinstance(leads, str) else ""))
        if rename_leads is not None and not _paths(signal):
            raise ValueError("rename_leads= renames the leads of a record file's header; an array names its rows "
                             "with leads=, and an ECGRecord has standard lead names already")
        if isinstance(signal, ECGRecord):
            mask = np.asarray(signal.lead_mask, dtype=bool)
            names = [lead for lead, m in zip(CANONICAL_LEADS, mask) if m]
            if fs is not None and float(fs) != float(signal.fs):
                raise ValueError(f"{signal.key}: fs={fs} given but the record is at {signal.fs} Hz")
            _same_leads(signal.key, leads, names)
            try:   # a record of the artifact's own cache (a rate-keeping one too: the rate is checked below)
                done = preprocessed_spec(signal, self._cache_pre, "this artifact")
            except ECGDataError:
                done = preprocessed_spec(signal, self._pre, "this artifact")
            return [self._prepare(signal.signal[mask], float(signal.fs), names, signal.key,
                                  preprocessed=done is not None)], [signal.key]
        if isinstance(signal, (list, tuple)) and signal and (
                _paths(signal) or all(isinstance(s, ECGRecord) for s in signal)):
            # a list of record files or records: each read and prepared as one is ("could not convert string to
            # float" before 2026-12-07)
            out: tuple[list[tuple[np.ndarray, np.ndarray]], list[str]] = ([], [])
            for one in signal:
                recs, names = self._records(one, fs, leads, rename_leads)
                out[0].extend(recs)
                out[1].extend(names)
            return out
        if isinstance(signal, (str, os.PathLike)):
            sig, rec_fs, names = load_record(signal, rename_leads)
            if fs is not None and float(fs) != rec_fs:
                raise ValueError(f"{signal}: fs={fs} given but the header says {rec_fs} Hz")
            _same_leads(str(signal), leads, names)
            return [self._prepare(sig, rec_fs, names, str(signal))], [str(signal)]
        if isinstance(signal, torch.Tensor):   # a tensor that requires grad (or lives on a GPU) has no .numpy()
            signal = signal.detach().cpu()
        if isinstance(signal, (list, tuple)) and not signal:
            raise ValueError("no records: the batch is empty")
        if _record_list(signal):
            # a list of (leads, samples_i) records of any lengths: one record each (they are prepared one by one)
            batch = [np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float32)
                     for s in signal]
            if len({b.shape[0] for b in batch}) != 1:
                transposed = len({b.shape[1] for b in batch}) == 1 and all(
                    _transposed_hint(signal, [b]) for b in batch)
                raise ValueError(f"the records of the list have different lead counts "
                                 f"({sorted({b.shape[0] for b in batch})}): "
                                 + (_transposed_hint(signal, batch) if transposed else
                                    "pass records of one lead layout"))
        else:
            x = np.asarray(signal, dtype=np.float32)
            if x.ndim not in (2, 3):
                raise ValueError(f"signal must be (leads, samples), (batch, leads, samples) or a list of (leads, "
                                 f"samples_i) records, got shape {x.shape}")
            batch = x[None] if x.ndim == 2 else x
        if len(batch) == 0:
            raise ValueError("no records: the batch is empty")
        if fs is None:
            raise ValueError("pass fs= (the sampling rate of the signal in Hz)")
        names = list(leads) if leads is not None else None
        n_rows = batch[0].shape[0]
        if names is None:
            if n_rows != len(CANONICAL_LEADS):
                raise ValueError(_transposed_hint(signal, batch) or
                                 f"the signal has {n_rows} leads: pass leads=[names of its rows] "
                                 f"(e.g. ['II'] for one lead)")
            names = list(CANONICAL_LEADS)
        if len(names) != n_rows:
            hint = _transposed_hint(signal, batch)
            raise ValueError(f"{len(names)} lead names for {n_rows} signal rows" + (f"; {hint}" if hint else ""))
        recs = [self._prepare(b, float(fs), names, f"record {i}", check_units=True)
                for i, b in enumerate(batch)]
        return recs, [str(i) for i in range(len(batch))]

    def _prepare(self, sig: np.ndarray, fs: float, names: Sequence[str], where: str, preprocessed: bool = False,
                 check_units: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One record ``(rows, T)`` named by ``names`` -> ``(x (L_model, T'), mask (L_model,))`` at the model rate.

        Args:
            sig: the record's rows.
            fs: its rate in Hz.
            names: the rows' lead names.
            where: the record, for messages.
            preprocessed: a cache record prepared with this artifact's spec (not preprocessed again).
            check_units: an array from the caller: warn when it does not look like millivolts (volts, or microvolts
                / ADC counts for an artifact that does not normalise: :func:`warn_if_not_millivolts`).
        """
        x12, mask, _dropped = map_leads(sig, names, where)
        if not preprocessed:   # as the cache path cuts them (preprocess_record): not filled, whatever the input
            x12 = _trim_missing_edges(x12, mask, self._pre.leads)
        if check_units:
            warn_if_not_millivolts(x12, mask, where, self._pre)
        if preprocessed:   # a cache record prepared with this very spec: as the sweep's features read it
            out_fs = fs
        else:
            extra = self.meta.get("extra") or {}
            x12, mask = derive_trained_limb_leads(x12, mask, extra.get("trained_leads") if derives_limb_leads(extra)
                                                  else None, self.leads, self._pre.flat_threshold, where)
            raw, given = x12, np.asarray(mask, dtype=bool).copy()
            if not kept_leads(given, self._pre.leads).any():
                # the preprocessing keeps only the model's leads (with_input_leads): named as below, not by
                # preprocess_signal's "none of the leads the preprocessing keeps"
                self._no_input_lead(given, where)
            x12, out_fs, mask = preprocess_signal(x12, fs, mask, self._pre, where)
            self._warn_flat_leads(raw, given, np.asarray(mask, dtype=bool), where)
        if self.fs is not None and abs(float(out_fs) - float(self.fs)) > 1e-6:
            raise ECGDataError(where, f"the signal is at {out_fs} Hz after preprocessing but the model expects "
                                      f"{self.fs} Hz (the artifact's preprocessing spec has no resampling rate)")
        order = [CANONICAL_LEADS.index(lead) for lead in self.leads]
        mask = np.asarray(mask, dtype=bool)
        if not mask[order].any():  # the network would see only zeros: an embedding of nothing, not of this record
            self._no_input_lead(mask, where)
        self._check_trained_leads(mask, where)
        return np.ascontiguousarray(x12[order], dtype=np.float32), mask[order]

    def _no_input_lead(self, mask: np.ndarray, where: str) -> None:
        """Refuse a record without any of the model's input leads (the network would see only zeros).

        Args:
            mask: ``(12,)`` the record's present leads.
            where: the record, for the message.

        Raises:
            ECGDataError: always, naming the model's leads and the record's.
        """
        have = [lead for lead, m in zip(CANONICAL_LEADS, mask) if m]
        # the leads the network reads: its backbone's input_leads (ECGFounder's lead I) where it has them
        read = [lead for lead in self.leads if self._pre.leads is None or lead in self._pre.leads]
        raise ECGDataError(where, f"none of the model's input leads ({', '.join(read)}) is present in "
                                  f"the record (present after preprocessing: {', '.join(have) or 'none'})")

    def _warn_flat_leads(self, raw: np.ndarray, given: np.ndarray, kept: np.ndarray, where: str) -> None:
        """Warn about the leads that preprocessing marked absent as flat although they vary.

        A lead that is all zeros, all NaN or constant is a disconnected lead, absent without a word; one that varies
        but by less than the flat-lead threshold (``flat_threshold``, a standard deviation in mV) is named, since
        it was given as recorded (a signal in volts loses most of its leads so, and the output changes).

        Args:
            raw: ``(12, T)`` the record as given to preprocessing.
            given: ``(12,)`` its present leads before preprocessing.
            kept: ``(12,)`` those left present after it.
            where: the record, for the message.
        """
        _, done = trained_leads_words(self.kind)
        read = self._pre.leads
        flat = []
        for i in np.flatnonzero(given & ~kept):
            if read is not None and CANONICAL_LEADS[i] not in read:
                continue    # a lead the model does not read, not a flat one
            values = raw[i][np.isfinite(raw[i])]
            if values.size and float(values.max() - values.min()) > 0:
                flat.append(CANONICAL_LEADS[i])
        if flat:
            warnings.warn(f"{where}: lead(s) {', '.join(flat)} vary, but by less than the flat-lead threshold "
                          f"(standard deviation below {self._pre.flat_threshold:g} mV): marked absent as flat "
                          f"(disconnected) and {done} without them; if they are recorded leads, check the signal's "
                          f"units (the API expects millivolts)", UserWarning, stacklevel=5)

    def _check_trained_leads(self, mask: np.ndarray, where: str) -> None:
        """Records against the leads of the artifact's training records (:func:`ecgfm.artifacts.
        warn_record_leads`): none of them refused, leads never seen and the model's input leads the record lacks
        named in warnings. The messages name the artifact by its kind (the encoder's records are embedded, the
        classifier's scored)."""
        warn_record_leads((self.meta.get("extra") or {}).get("trained_leads"),
                          [lead for lead, m in zip(CANONICAL_LEADS, mask) if m], self.leads, where, kind=self.kind)

    def _windows(self, x: np.ndarray, stride: int | None, where: str = "record") -> np.ndarray:
        """``(L, T) -> (W, L, window)`` (the whole record when the artifact has no window).

        A record shorter than the window is zero-padded at the end (as the benchmark's caches are) and the network
        embeds the padding with it: a ``UserWarning`` names the record, its length, the window and the padded
        fraction, since the result is not the model's embedding of the record alone.
        """
        if stride is not None:
            ok = not isinstance(stride, bool) and isinstance(stride, (int, float, np.integer, np.floating)) and \
                float(stride).is_integer() and stride >= 1
            if not ok:   # 2.5 became 2 and 0 meant "the default" without a word
                raise ValueError(f"stride_samples must be a positive whole number of samples at the model rate "
                                 f"(None: the artifact's stride), got {stride!r}")
            stride = int(stride)
        if not self.window_samples:
            if stride is not None:   # accepted and ignored before: this artifact embeds whole records
                raise ValueError(f"stride_samples={stride}: this artifact has no window (window_samples is unset), "
                                 f"so it embeds the whole record in one pass; leave stride_samples out")
            return x[None]
        t, window = int(x.shape[-1]), int(self.window_samples)
        if t < window:
            fs = float(self.fs) if self.fs else None
            secs = (lambda n: f" ({n / fs:.3g} s at {fs:g} Hz)") if fs else (lambda n: "")  # noqa: E731
            warnings.warn(f"{where}: {t} samples{secs(t)} after preprocessing, shorter than the model's window of "
                          f"{window} samples{secs(window)}: zero-padded at the end, so {(window - t) / window:.0%} "
                          f"of the window the network sees is padding, and the padding shapes the output (not the "
                          f"model's output for the record alone); pass records at least one window long",
                          UserWarning, stacklevel=3)
        return sliding_windows(x, int(self.window_samples), int(stride or self.stride_samples or self.window_samples))

    @property
    def lead_aware(self) -> bool:
        """Absent leads reach the network as a ``lead_mask`` (it takes one and the artifact does not say
        ``lead_aware: false``, nor, without a ``lead_aware`` of its own, that the encoder was pretrained with absent
        leads as zero rows: :func:`~ecgfm.artifacts.artifact_lead_aware`, which the explain stage reads too);
        otherwise they are zero rows."""
        return artifact_lead_aware(self.meta) and bool(getattr(self.network, "accepts_lead_mask", False))

    @torch.no_grad()
    def _forward(self, windows: np.ndarray, fn: Any, batch_size: int, mask: np.ndarray | None = None
                 ) -> np.ndarray:
        """``fn`` over ``windows (W, L, T)`` in batches -> ``(W, ...)`` float64; ``fn(x, lead_mask)`` gets the
        record's ``mask (L,)`` (None when every lead is present or the model is not :attr:`lead_aware`)."""
        m = None if mask is None or mask.all() or not self.lead_aware else torch.from_numpy(mask).to(self.device)
        out = []
        for i in range(0, len(windows), batch_size):
            x = torch.from_numpy(windows[i:i + batch_size]).to(self.device)
            out.append(fn(x, None if m is None else m.expand(len(x), -1)).double().cpu().numpy())
        return np.concatenate(out)

def _trim_missing_edges(x12: np.ndarray, mask: np.ndarray, leads: Sequence[str] | None) -> np.ndarray:
    """``(12, T) -> (12, T')`` without the leading / trailing samples missing in every present lead (of ``leads``,
    the leads the preprocessing keeps): records of unequal length stacked into one array are padded so, and those
    samples are not part of the record (filled by interpolation, a 5 s record padded to 10 s was embedded as four
    windows, two of them made up); a file's or a record's are cut off as the cache path cuts them
    (:func:`ecgfm.data.preprocess.trim_unrecorded_edges`: one rule for every input; before 2026-12-07 only arrays
    were cut). NaN inside the record, or in some leads only, is left to preprocessing (interpolated)."""
    rows = kept_leads(mask, leads)
    first, last = recorded_extent(x12[rows]) if rows.any() else (0, x12.shape[-1])
    return x12 if (first, last) == (0, x12.shape[-1]) else x12[:, first:last]


def normalises(spec: PreprocessSpec | None) -> bool:
    """Whether preprocessing with ``spec`` normalises the signal (so that its scale, its units, cancel): not for
    ``normalize: none`` (:meth:`PreprocessSpec.raw`, what an artifact saved with ``preprocess=None`` is read with),
    nor for no spec at all (an :class:`~ecgfm.explain.wrapper.ECGWrapper` without one only resamples)."""
    return spec is not None and spec.normalize != "none"


def lead_peak_to_peak(x: np.ndarray, mask: np.ndarray | None = None) -> list[float]:
    """Peak-to-peak amplitude of each lead of ``x`` ``(L, T)`` that ``mask`` ``(L,)`` marks present (default all)
    and that varies, over its finite samples (all-NaN, all-zero and constant leads left out): what the unit checks
    of the API and the explain chart read."""
    here = np.ones(len(x), dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    ptp = []
    for i in np.flatnonzero(here):
        values = x[i][np.isfinite(x[i])]
        if values.size and float(values.max() - values.min()) > 0:
            ptp.append(float(values.max() - values.min()))
    return ptp


def warn_if_not_millivolts(x12: np.ndarray, mask: np.ndarray, where: str, spec: PreprocessSpec | None) -> None:
    """Warn when an array record's amplitude says it is not in millivolts, the unit every artifact expects. The
    one check of the API (:class:`Encoder`, :class:`Classifier`) and of the explain stage
    (:meth:`ecgfm.explain.wrapper.ECGWrapper.prepare`).

    Only the present leads that vary count (all-zero, all-NaN or constant leads are absent, not small), by their
    largest peak-to-peak amplitude:

    * below :data:`VOLTS_MAX_PTP_MV`: looks like volts, whatever the preprocessing (volts fall under the flat-lead
      threshold, in mV, and lose leads);
    * above :data:`UNNORMALISED_MAX_PTP_MV`: looks like microvolts or ADC counts, flagged only when ``spec`` does
      not normalise (:func:`normalises`): there the scale reaches the network; a normalising spec cancels it.

    Args:
        x12: ``(L, T)`` the record's leads (the canonical 12, or a model's own leads: the order does not matter).
        mask: ``(L,)`` its present leads.
        where: the record, for the message.
        spec: the preprocessing the record goes through (the artifact's effective spec; None: none, resampling
            only).
    """
    ptp = lead_peak_to_peak(x12, mask)
    if not ptp:
        return
    largest = max(ptp)
    if largest < VOLTS_MAX_PTP_MV:
        warnings.warn(f"{where}: its largest lead peak-to-peak amplitude is {largest:.3g}, where an ECG in "
                      f"millivolts swings about 0.5-5 mV: the signal looks like volts, but the API expects "
                      f"millivolts (multiply it by 1000); as given, leads under the flat-lead threshold are marked "
                      f"absent and the output changes", UserWarning, stacklevel=6)
    elif largest > UNNORMALISED_MAX_PTP_MV and not normalises(spec):
        warnings.warn(f"{where}: its largest lead peak-to-peak amplitude is {largest:.3g}, where an ECG in "
                      f"millivolts swings about 0.5-5 mV (no lead above {UNNORMALISED_MAX_PTP_MV:g}): the signal "
                      f"looks like microvolts or ADC counts, but the API expects millivolts (divide microvolts by "
                      f"1000, ADC counts by the gain in counts per mV); "
                      + ("this model's preprocessing does not normalise (normalize: none)" if spec is not None else
                         "this model is wrapped without preprocessing (no spec: resampling only)")
                      + ", so the scale reaches the network and the output changes",
                      UserWarning, stacklevel=6)


def _transposed_hint(signal: Any, batch: Sequence[np.ndarray]) -> str | None:
    """The message for an array that looks transposed (``(samples, leads)``: more rows than columns, at most 15
    columns), saying how to pass it with rows as leads; None otherwise."""
    rows, cols = (int(n) for n in batch[0].shape[:2])
    if not (rows > cols and cols <= 15):
        return None
    fix = ("[s.T for s in signal]" if _record_list(signal) else
           "signal.transpose(0, 2, 1)" if np.ndim(signal) == 3 else "signal.T")
    what = "the signal has" if fix == "signal.T" else "the signal's records have"
    return (f"{what} {rows} rows and {cols} columns: rows must be leads ((leads, samples)), and this looks like "
            f"(samples, leads): pass {fix}")


def _paths(signal: Any) -> bool:
    """Whether ``signal`` is a record file's path, or a non-empty list / tuple of them."""
    if isinstance(signal, (str, os.PathLike)):
        return True
    return isinstance(signal, (list, tuple)) and bool(signal) and all(isinstance(s, (str, os.PathLike))
                                                                       for s in signal)


def _record_list(signal: Any) -> bool:
    """Whether ``signal`` is a list / tuple of ``(leads, samples_i)`` records (lengths may differ)."""
    return isinstance(signal, (list, tuple)) and bool(signal) and all(
        isinstance(s, (np.ndarray, torch.Tensor)) and s.ndim == 2 for s in signal)


def _rate(fs: Any) -> float:
    """A sampling rate given as a number, a 0-d array (``np.load(npz)["fs"]``) or a scalar tensor, as a float.

    Raises:
        ValueError: a bool (``True`` was read as 1 Hz), text, several values, or not a finite positive number (0,
            NaN or negative rates crashed inside the resampler).
    """
    if hasattr(fs, "detach"):
        fs = fs.detach().cpu().numpy()
    value = np.asarray(fs)
    if value.ndim != 0 or value.dtype.kind not in "iuf" or not np.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"fs must be a positive sampling rate in Hz, got {fs!r}")
    return float(value)


def _batch_size(value: Any) -> int:
    """``batch_size`` (windows per forward pass) as a positive int.

    Raises:
        ValueError: a bool (``True`` was read as 1), a fraction, or not at least 1 (0 and -1 failed inside
            ``range`` and ``np.concatenate``).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"batch_size must be a positive whole number of windows per forward pass, got {value!r}")
    return int(value)


def _where(name: str) -> str:
    """A record's name in messages: ``record 3`` for the rows of an array, else the path or record key."""
    return f"record {name}" if name.isdigit() else name


def _same_leads(where: str, given: Sequence[str] | None, found: Sequence[str]) -> None:
    """A record or file names its own leads: ``leads=`` may only repeat them (it was silently ignored)."""
    if given is None:
        return

    def canon(name: Any) -> str:
        try:
            return canonical_lead(str(name)) or str(name)
        except KeyError:
            return str(name)

    if [canon(n) for n in given] != [canon(n) for n in found]:
        raise ValueError(f"{where}: leads={list(given)} given, but it holds {list(found)}: a record or file names its "
                         "own leads (pass leads= only with an array)")


class Encoder(_Model):
    """An encoder artifact, ready to embed ECGs. Build with :meth:`load`."""

    kind = "encoder"

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "Encoder":
        """Load an encoder folder (written by ``train.py``, :mod:`ecgfm.zoo` or :func:`ecgfm.artifacts.save_encoder`).

        Raises:
            ecgfm.artifacts.ArtifactError: not an encoder folder, or files that do not load.
        """
        backbone, spec, info = load_encoder(path)
        return cls(backbone, spec, info, device)

    @property
    def num_features(self) -> int:
        """Embedding size ``D``."""
        return int(getattr(self.network, "num_features", 0) or self.meta.get("num_features") or 0)

    def embed(self, signal: Any, fs: float | None = None, leads: Sequence[str] | None = None,
              per_window: bool = False, stride_samples: int | None = None, batch_size: int = 64,
              rename_leads: Mapping[str, str] | None = None) -> np.ndarray | list[np.ndarray]:
        """Embed one record or a batch.

        Args:
            signal: ``(L, T)`` or ``(B, L, T)`` array in mV (samples NaN in every lead at the start or end of a
                row are padding, left out), a list of ``(L, T_i)`` arrays / tensors (records of any lengths), a
                WFDB record path, or an
                :class:`~ecgfm.data.record.ECGRecord` from an ecgfm reader; or a list of paths or of records (a
                batch: one result per record).
            fs: the signal's sampling rate in Hz (read from the header / record for a path / record).
            leads: names of the signal's rows (default: the 12 standard leads in order I..V6).
            per_window: return every window's embedding instead of their mean.
            stride_samples: hop between windows at the model rate (default: the window, no overlap).
            batch_size: windows per forward pass (a positive int; anything else is a ``ValueError``).
            rename_leads: for a record path (or a list of them): header lead name -> standard lead (see
                :func:`load_record`).

        Returns:
            ``(D,)`` for one record or ``(B, D)`` for a batch (float32); with ``per_window`` a ``(W, D)`` array
            per record (a list for a batch).
        """
        batch_size = _batch_size(batch_size)
        recs, _names = self._records(signal, fs, leads, rename_leads)
        # one record: a record, a path, or a (leads, samples) array / list / tensor; a (1, leads, samples) batch of
        # one keeps its batch axis whatever container it comes in
        single = len(recs) == 1 and (isinstance(signal, (ECGRecord, str, os.PathLike))
                                     or (not _record_list(signal) and np.ndim(signal) == 2))
        outs = []
        embed = self.network.embed
        for (x, mask), name in zip(recs, _names):
            z = self._forward(self._windows(x, stride_samples, _where(name)),
                              lambda t, m: embed(t) if m is None else embed(t, lead_mask=m), batch_size, mask)
            outs.append((z if per_window else z.mean(axis=0)).astype(np.float32))
        if per_window:
            return outs[0] if single else outs
        return outs[0] if single else np.stack(outs)


class Classifier(_Model):
    """A classifier artifact, ready to score ECGs. Build with :meth:`load`."""

    kind = "classifier"

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "Classifier":
        """Load a classifier folder (written by fine-tuning, probing, the explain demo or the zoo).

        Raises:
            ecgfm.artifacts.ArtifactError: not a classifier folder (an encoder folder is told how to make one), or
                files that do not load.
        """
        model, spec, meta = load_classifier(path)
        return cls(model, spec, meta, device)

    @property
    def classes(self) -> list[str]:
        """The ``C`` class names, in output order."""
        return list(self.meta.get("classes") or [])

    @property
    def multilabel(self) -> bool:
        return bool(self.meta.get("multilabel"))

    @property
    def thresholds(self) -> np.ndarray | None:
        """``(C,)`` decision thresholds chosen on validation (multi-label), or ``None``; see
        :attr:`thresholds_not_chosen` for classes whose entry is a placeholder."""
        t = self.meta.get("thresholds")
        return None if t is None else np.asarray(t, dtype=np.float64)

    @property
    def thresholds_not_chosen(self) -> list[str]:
        """Classes whose decision threshold is the 0.5 placeholder, not chosen on validation (no positive
        validation record when the classifier was made); empty for artifacts written before 2026-12-07."""
        return [str(c) for c in self.meta.get("thresholds_not_chosen") or []]

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)`` -> probabilities (sigmoid or softmax over the last axis).

        Raises:
            ValueError: one output with softmax (always 1; the loader refuses such artifacts already).
        """
        if self.multilabel:
            return torch.sigmoid(logits)
        if logits.shape[-1] == 1:
            raise ValueError(f"{self.meta.get('dir', 'this classifier')}: one output with softmax "
                             f"(multilabel false) is always 1: a one-logit classifier is multi-label (sigmoid)")
        return torch.softmax(logits, dim=-1)

    def predict_proba(self, signal: Any, fs: float | None = None, leads: Sequence[str] | None = None,
                      batch_size: int = 64, rename_leads: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Class probabilities per record.

        Args:
            signal: ``(L, T)`` or ``(B, L, T)`` array in mV (samples NaN in every lead at the start or end of a
                row are padding, left out), a list of ``(L, T_i)`` arrays / tensors (records of any lengths), a
                WFDB record path, or an
                :class:`~ecgfm.data.record.ECGRecord` from an ecgfm reader; or a list of paths or of records (a
                batch: one result per record).
            fs: the signal's sampling rate in Hz (read from the header / record for a path / record).
            leads: names of the signal's rows (default: the 12 standard leads in order I..V6).
            batch_size: windows per forward pass (a positive int; anything else is a ``ValueError``).
            rename_leads: for a record path (or a list of them): header lead name -> standard lead (see
                :func:`load_record`).

        Returns:
            A ``(records, C)`` DataFrame of float64 probabilities, columns = :attr:`classes`, index = record
            number (or the path). Records are scored over sliding windows, aggregated as the classifier was
            validated (``window_aggregate``).
        """
        batch_size = _batch_size(batch_size)
        recs, names = self._records(signal, fs, leads, rename_leads)
        aggregate = self.meta.get("window_aggregate", "prob")
        rows = []
        net = self.network
        logits = (lambda t, m: net(t)) if not isinstance(net, EncoderClassifier) else net
        for (x, mask), name in zip(recs, names):
            w = self._windows(x, None, _where(name))
            rows.append(aggregate_window_logits(self._forward(w, logits, batch_size, mask), aggregate,
                                                self._activate)[0])
        return pd.DataFrame(np.stack(rows), index=names, columns=self.classes)

    def predict(self, signal: Any, fs: float | None = None, leads: Sequence[str] | None = None,
                rename_leads: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Decisions: the arg-max class (single-label) or probabilities above the validation thresholds
        (multi-label; 0.5 where none were stored), as a 0/1 DataFrame like :meth:`predict_proba`. A class whose
        threshold was not chosen on validation (:attr:`thresholds_not_chosen`) is decided at 0.5 with a warning."""
        p = self.predict_proba(signal, fs, leads, rename_leads=rename_leads)
        if self.multilabel and self.thresholds_not_chosen:
            warnings.warn(f"{self.meta.get('dir', 'this classifier')}: class(es) {', '.join(self.thresholds_not_chosen)}"
                          f" had no positive validation record, so their decision threshold is a 0.5 placeholder, "
                          f"not chosen on validation: read their decisions with care (predict_proba is unaffected)",
                          stacklevel=2)
        return pd.DataFrame(decisions(p.to_numpy(), self.multilabel, self.thresholds), index=p.index,
                            columns=p.columns)


def aggregate_window_logits(window_logits: Any, aggregate: str, activate: Any) -> tuple[np.ndarray, np.ndarray]:
    """A record's class probabilities from its windows' logits, as :meth:`Classifier.predict_proba` makes them
    (and the explain stage's report, :func:`ecgfm.explain.report.explain_records`, so that its "predicted" is the
    API's decision): ``"prob"``, the mean of the windows' probabilities; ``"logit"``, the probabilities of the mean
    window logit (the artifact's ``window_aggregate``, as the classifier was validated).

    Args:
        window_logits: ``(W, C)`` logits of the record's windows (:func:`~ecgfm.data.preprocess.sliding_windows`).
        aggregate: ``"prob"`` or ``"logit"``.
        activate: logits ``(N, C)`` tensor -> probabilities (softmax or sigmoid over the last axis).

    Returns:
        ``(proba (C,), terms (W, C))`` float64: the record's probabilities and what was averaged, each window's
        probabilities (``"prob"``) or logits (``"logit"``): window ``w`` adds ``terms[w] / W`` to the record's mean.

    Raises:
        ValueError: ``aggregate`` neither ``"prob"`` nor ``"logit"``.
    """
    if aggregate not in ("prob", "logit"):
        raise ValueError(f"window_aggregate must be 'prob' or 'logit', got {aggregate!r}")
    z = np.asarray(window_logits.detach().cpu() if isinstance(window_logits, torch.Tensor) else window_logits)
    if aggregate == "logit":
        terms = z.astype(np.float64)
        proba = activate(torch.from_numpy(terms.mean(axis=0))[None])[0].double().numpy()
        return proba, terms
    # each window activated as the network's float32 output (exact: the logits are float32 values)
    terms = activate(torch.from_numpy(z.astype(np.float32))).double().numpy()
    return terms.mean(axis=0), terms


def decisions(proba: Any, multilabel: bool, thresholds: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Class decisions from probabilities, as :meth:`Classifier.predict` makes them (and the explain stage's report
    names its "predicted" classes): the arg-max class (single-label), or every class whose probability is at least
    its threshold (multi-label: ``thresholds``, chosen on validation and stored in the artifact; 0.5 where none
    were stored), so a multi-label record may have several predicted classes or none.

    Args:
        proba: ``(B, C)`` (or ``(C,)``) probabilities.
        multilabel: independent (sigmoid) classes.
        thresholds: ``(C,)`` per-class thresholds (multi-label), or None (0.5).

    Returns:
        ``(B, C)`` (or ``(C,)``) int 0/1.

    Raises:
        ValueError: multi-label ``thresholds`` not of one value per class.
    """
    p = np.asarray(proba, dtype=np.float64)
    if multilabel:
        return (p >= decision_thresholds(thresholds, p.shape[-1])).astype(int)
    return np.eye(p.shape[-1], dtype=int)[p.argmax(axis=-1)]


def decision_thresholds(thresholds: Sequence[float] | np.ndarray | None, n_classes: int) -> np.ndarray:
    """``(C,)`` float64 per-class decision thresholds of a multi-label model: ``thresholds`` (the artifact's
    validation thresholds), or 0.5 for every class where none were stored.

    Raises:
        ValueError: ``thresholds`` not of one value per class (a single value is not broadcast: it would apply one
            class's threshold to all).
    """
    if thresholds is None:
        return np.full(int(n_classes), 0.5)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (int(n_classes),):
        raise ValueError(f"thresholds: one per class expected ({n_classes}), got shape {t.shape}")
    return t
