"""The one in-memory ECG record type shared by every stage of ecgfm.

Every reader returns an :class:`ECGRecord`; the cache stores and restores them; the synthetic corpus
generates them. Signals are always ``(12, samples)`` float32 millivolts in :data:`CANONICAL_LEADS` order,
with a boolean presence mask: a 1-lead or 2-lead recording fills only its rows, the rest are zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

CANONICAL_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
N_LEADS = len(CANONICAL_LEADS)

# Alias (lower-case, stripped) -> canonical lead. Covers the spellings used by PhysioNet databases
# (MIT-BIH "MLII", "MLI", "MLIII"), PTB-XL/PTB ("avr", "AVR"), CinC 2017 (single lead, "ECG" is
# handled by the reader since it has no canonical position) and CPSC ("I", "II").
LEAD_ALIASES: dict[str, str] = {name.lower(): name for name in CANONICAL_LEADS}
LEAD_ALIASES.update({
    "mli": "I", "mlii": "II", "mliii": "III", "lead i": "I", "lead ii": "II", "lead iii": "III",
    "d1": "I", "d2": "II", "d3": "III", "di": "I", "dii": "II", "diii": "III",
    "mlv1": "V1", "mlv2": "V2", "mlv3": "V3", "mlv4": "V4", "mlv5": "V5", "mlv6": "V6",
})
# Real, well-known leads that have no place in the 12-lead layout: dropped with a note in the header.
NON_STANDARD_LEADS: frozenset[str] = frozenset({"vx", "vy", "vz", "x", "y", "z", "v7", "v8", "v9",
                                                "v3r", "v4r", "v5r", "cm5", "ecg"})


def printable(text: Any) -> str:
    """``str(text)`` that can be written as UTF-8: bytes of an undecodable file name (kept by Python as lone
    surrogates) are shown as ``\\xNN``."""
    s = str(text)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "surrogateescape" if _only_escapes(s) else "backslashreplace").decode(
            "utf-8", "backslashreplace")
    return s


def _only_escapes(s: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in s)


class ECGDataError(ValueError):
    """Bad ECG input. The message always names the file (or record) and the problem.

    Both are made printable (:func:`printable`), so that a report of the error can always be written.
    """

    def __init__(self, path: Any, problem: str):
        self.path = printable(path)
        self.problem = printable(problem)
        super().__init__(f"{self.path}: {self.problem}")


def canonical_lead(name: str) -> str | None:
    """Map a lead name as written in a header to its canonical name.

    Returns:
        The canonical name, or ``None`` for a known non-standard lead (Frank vx/vy/vz, ...).

    Raises:
        KeyError: for a name that is neither a known lead nor a known non-standard lead.
    """
    key = str(name).strip().lower()
    if key in LEAD_ALIASES:
        return LEAD_ALIASES[key]
    if key in NON_STANDARD_LEADS:
        return None
    raise KeyError(name)


#: What an unknown lead name's hint asks for in place of a standard lead (never a real lead: pasted as is, a
#: suggested ``'II'`` mapped ECG1 or I-ref to lead II without a word).
LEAD_PLACEHOLDER = "<standard lead, e.g. I, II, V1>"


def map_leads(signal: np.ndarray, names: Sequence[str], path: Any = "<memory>",
              rename_hint: Callable[[str], str] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Place the rows of ``signal`` into the canonical 12-lead layout.

    Args:
        signal: ``(n_channels, samples)`` array in the order of ``names``.
        names: lead name of each row, as written by the publisher.
        path: file the signal came from, for error messages.
        rename_hint: given an unknown lead name, how the caller's user maps it to a standard lead (e.g. a reader's
            ``rename_leads={...}``), for the error message; default: give the standard name instead.

    Returns:
        ``(signal12, mask, dropped)``: ``(12, samples)`` float32, ``(12,)`` bool presence mask, and the names
        of non-standard leads that were dropped.

    Raises:
        ECGDataError: unknown lead name, a lead given twice, or no standard lead at all.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[0] != len(names):
        raise ECGDataError(path, f"signal shape {signal.shape} does not match {len(names)} lead names")
    out = np.zeros((N_LEADS, signal.shape[1]), dtype=np.float32)
    mask = np.zeros(N_LEADS, dtype=bool)
    dropped: list[str] = []
    for row, name in enumerate(names):
        try:
            lead = canonical_lead(name)
        except KeyError:
            how = (rename_hint(str(name)) if rename_hint is not None
                   else "name the row by that standard lead instead")
            raise ECGDataError(path, f"unknown lead name {name!r} (known: {', '.join(CANONICAL_LEADS)} "
                                     f"and aliases such as MLII); if it is a standard lead under another name, "
                                     f"{how}") from None
        if lead is None:
            dropped.append(str(name))
            continue
        idx = CANONICAL_LEADS.index(lead)
        if mask[idx]:
            raise ECGDataError(path, f"lead {lead} appears twice (names {list(names)})")
        out[idx] = signal[row]
        mask[idx] = True
    if not mask.any():
        raise ECGDataError(path, f"no standard ECG lead among {list(names)}")
    return out, mask, dropped


#: The four limb leads a 12-lead cart computes from I and II (Einthoven: III = II - I; Goldberger's augmented leads:
#: aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2). Exact for the ideal lead system, which is how carts
#: that store 8 leads (I, II, V1-V6) expect them to be restored.
DERIVABLE_LIMB_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")


def derive_limb_leads(signal12: np.ndarray, mask: np.ndarray, leads: Sequence[str] = DERIVABLE_LIMB_LEADS,
                      flat_threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fill absent limb leads from I and II (see :data:`DERIVABLE_LIMB_LEADS`).

    Args:
        signal12: ``(12, T)`` raw signal in the canonical lead order (not normalised per lead: the identities are
            linear in the recorded voltages).
        mask: ``(12,)`` bool presence mask.
        leads: which of III / aVR / aVL / aVF may be derived.
        flat_threshold: I and II must each vary by at least this (standard deviation over their finite samples,
            mV; the preprocessing's ``flat_threshold``): a flat lead I (electrode off) would make III = II and
            aVR = aVL = -II / 2, leads never recorded, while preprocessing then drops lead I itself.

    Returns:
        ``(signal12, mask, derived)``: copies with the derived rows filled and marked present, and the derived lead
        names (empty, and the inputs returned unchanged, when I or II is absent, flat or all NaN, or nothing is
        missing).
    """
    idx = {lead: CANONICAL_LEADS.index(lead) for lead in ("I", "II", *DERIVABLE_LIMB_LEADS)}
    mask = np.asarray(mask, dtype=bool)
    todo = [lead for lead in DERIVABLE_LIMB_LEADS if lead in leads and not mask[idx[lead]]]
    if not todo or not (mask[idx["I"]] and mask[idx["II"]]):
        return signal12, mask, []
    for lead in ("I", "II"):
        row = np.asarray(signal12[idx[lead]], dtype=np.float64)
        row = row[np.isfinite(row)]
        if row.size == 0 or not row.std() >= max(float(flat_threshold), 1e-12):
            return signal12, mask, []
    out, m = np.array(signal12, dtype=np.float32, copy=True), mask.copy()
    i, ii = out[idx["I"]], out[idx["II"]]
    formula = {"III": lambda: ii - i, "aVR": lambda: -(i + ii) / 2, "aVL": lambda: i - ii / 2,
               "aVF": lambda: ii - i / 2}
    for lead in todo:
        out[idx[lead]] = formula[lead]()
        m[idx[lead]] = True
    return out, m, todo


@dataclass
class ECGRecord:
    """One ECG recording in ecgfm's canonical form.

    Attributes:
        signal: ``(12, samples)`` float32 millivolts in :data:`CANONICAL_LEADS` order; absent leads are 0.
        fs: sampling rate in Hz.
        lead_mask: ``(12,)`` bool, True where the lead was recorded.
        record_id: identifier unique within ``source``.
        source: dataset name (``"ptbxl"``, ``"cinc2017"``, ``"synthetic"``, ...).
        patient_id: patient identifier where the dataset gives one, else None.
        labels: dataset-native label codes (SCP codes, SNOMED-CT codes, ``"A"``/``"N"``, synthetic class...).
        meta: JSON-serialisable facts used by tasks and splits (``strat_fold``, ``age``, ``sex``,
            ``scp_codes`` with likelihoods, ...).
        header: JSON-serialisable original header facts: ``units``, ``gain``, ``fmt``, ``lead_names``
            (as published), ``dropped_leads``, ``path``, ``fs_original``... Provenance marker:
            ``derived_leads``, the canonical names of present leads that were computed from other leads rather
            than recorded (e.g. ``["III", "aVR", "aVL", "aVF"]`` from I and II for generated ECGs); absent or
            empty when every present lead was recorded. Kept by the cache (``index.jsonl``).
        evidence: optional ``(12, samples)`` bool ground-truth mask of the class-defining feature
            (synthetic corpus).
        annotations: optional dict of annotation arrays (``{"sample": (n,), "symbol": (n,)}`` for beats,
            ``{"af_episodes": [(start, end), ...]}`` ...).
    """

    signal: np.ndarray
    fs: float
    lead_mask: np.ndarray
    record_id: str
    source: str
    patient_id: str | None = None
    labels: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)
    evidence: np.ndarray | None = None
    annotations: dict[str, Any] | None = None

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[1])

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.n_samples / float(self.fs)

    @property
    def present_leads(self) -> tuple[str, ...]:
        return tuple(name for name, m in zip(CANONICAL_LEADS, self.lead_mask) if m)

    @property
    def derived_leads(self) -> tuple[str, ...]:
        """Present leads computed from other leads rather than recorded (``header["derived_leads"]``)."""
        return tuple(str(v) for v in self.header.get("derived_leads", ()) or ())

    @property
    def key(self) -> str:
        """Globally unique key ``source/record_id``."""
        return f"{self.source}/{self.record_id}"

    def replace(self, **changes: Any) -> "ECGRecord":
        return dataclasses.replace(self, **changes)

    def validate(self, path: Any | None = None) -> "ECGRecord":
        """Check the invariants; raise :class:`ECGDataError` naming ``path`` (or the record key).

        Checks: shape ``(12, samples)``, float32, positive finite rate, non-empty, mask shape, and
        that present leads are not entirely NaN.
        """
        where = path if path is not None else self.header.get("path", self.key)
        if not np.isfinite(self.fs) or self.fs <= 0 or self.fs > 100_000:
            raise ECGDataError(where, f"impossible sampling rate {self.fs!r} Hz")
        sig = self.signal
        if sig.ndim != 2 or sig.shape[0] != N_LEADS:
            raise ECGDataError(where, f"signal must be (12, samples), got {sig.shape}")
        if sig.shape[1] == 0:
            raise ECGDataError(where, "zero-length record (0 samples)")
        if sig.dtype != np.float32:
            raise ECGDataError(where, f"signal must be float32, got {sig.dtype}")
        if self.lead_mask.shape != (N_LEADS,) or self.lead_mask.dtype != bool:
            raise ECGDataError(where, f"lead_mask must be (12,) bool, got {self.lead_mask.shape} "
                                      f"{self.lead_mask.dtype}")
        if not self.lead_mask.any():
            raise ECGDataError(where, "no lead present")
        # one row at a time: a copy of every present lead would double the memory of a long record
        if all(np.isnan(sig[i]).all() for i in np.flatnonzero(self.lead_mask)):
            raise ECGDataError(where, "every sample of every lead is NaN")
        if self.evidence is not None and self.evidence.shape != sig.shape:
            raise ECGDataError(where, f"evidence mask {self.evidence.shape} does not match {sig.shape}")
        return self


@runtime_checkable
class RecordSource(Protocol):
    """A readable collection of records: what the cache converts and the naive loaders iterate.

    Implementations: every reader in :mod:`ecgfm.data.readers` and the synthetic corpus.
    ``record_ids()`` must be deterministic (sorted); ``load`` raises :class:`ECGDataError` for bad input.
    Sources must be picklable (they are sent to conversion worker processes).
    """

    name: str

    def record_ids(self) -> list[str]: ...

    def load(self, record_id: str) -> ECGRecord: ...
