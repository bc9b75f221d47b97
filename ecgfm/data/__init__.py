"""Data layer: the record type, readers, preprocessing, synthetic corpus, cache and DataModules."""

from ecgfm.data.preprocess import PreprocessSpec, preprocess_record
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord, RecordSource

__all__ = ["CANONICAL_LEADS", "ECGDataError", "ECGRecord", "PreprocessSpec", "RecordSource", "preprocess_record"]
