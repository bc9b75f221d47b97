"""Readers for real ECG corpora in their published formats.

One-record readers (:func:`read_wfdb`, :func:`read_challenge`, :func:`read_cpsc2018`), one label-table reader
(:func:`read_label_table`, used by every source that reads a CSV) and one
:class:`~ecgfm.data.record.RecordSource` per corpus. Every reader returns a validated
:class:`~ecgfm.data.record.ECGRecord` (``(12, T)`` float32 mV in canonical lead order) and raises
:class:`~ecgfm.data.record.ECGDataError` naming the file and the problem for bad input.

One generated corpus is registered beside them: :class:`~ecgfm.data.readers.deepfake.DeepfakeSource`
(``"deepfake"``, the deepfake-ecg package's Pulse2Pulse GAN; optional dependency, imported on first use).

``get_source(name, **kwargs)`` builds a source by name (used by the Hydra data configs)::

    src = get_source("ptbxl", root="../shared/data/ptbxl", fs=100)
    rec = src.load(src.record_ids()[0])
"""

from __future__ import annotations

import importlib
from typing import Any

from ecgfm.data.readers.deepfake import DeepfakeSource
from ecgfm.data.readers.folder import FolderSource, WFDBFolderSource
from ecgfm.data.readers.formats import (
    FS_RANGE,
    WFDBHeader,
    check_fs_range,
    header_path,
    normalise_sex,
    parse_header,
    parse_header_comments,
    read_challenge,
    read_cpsc2018,
    read_header,
    read_wfdb,
)
from ecgfm.data.readers.physionet import (
    BEAT_SYMBOLS,
    CHALLENGE_EQUIVALENT_CODES,
    CINC2017_CLASSES,
    CPSC2021_CLASSES,
    Challenge2021Source,
    CinC2017Source,
    CPSC2018Source,
    CPSC2021Source,
    MITBIHSource,
    challenge_subset,
    merge_equivalent_codes,
)
from ecgfm.data.readers.ptbxl import (
    PTBXL_TASKS,
    PTBXLSource,
    load_ptbxl_table,
    load_scp_statements,
    ptbxl_label_space,
    ptbxl_record_id,
    ptbxl_diagnostic_codes,
    ptbxl_task_labels,
    ptbxl_task_map,
)
from ecgfm.data.readers.tables import LabelTable, read_label_table

#: Source name -> class (or ``"module:Class"`` imported on first use, to avoid import cycles).
SOURCES: dict[str, Any] = {
    "ptbxl": PTBXLSource,
    "cinc2017": CinC2017Source,
    "challenge2021": Challenge2021Source,
    "cinc2021": Challenge2021Source,
    "cpsc2021": CPSC2021Source,
    "cpsc2018": CPSC2018Source,
    "mitbih": MITBIHSource,
    "mitdb": MITBIHSource,
    "folder": FolderSource,
    "wfdb": WFDBFolderSource,
    "synthetic": "ecgfm.data.synthetic:SyntheticSource",
    "deepfake": DeepfakeSource,
}


def get_source(name: str, /, **kwargs: Any):
    """Build the record source registered as ``name`` (see :data:`SOURCES`) with ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        target = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown record source {name!r}; known: {sorted(SOURCES)}") from None
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target(**kwargs)


__all__ = [
    "BEAT_SYMBOLS",
    "CHALLENGE_EQUIVALENT_CODES",
    "CINC2017_CLASSES",
    "CPSC2021_CLASSES",
    "FS_RANGE",
    "PTBXL_TASKS",
    "SOURCES",
    "CPSC2018Source",
    "CPSC2021Source",
    "Challenge2021Source",
    "CinC2017Source",
    "DeepfakeSource",
    "FolderSource",
    "LabelTable",
    "MITBIHSource",
    "PTBXLSource",
    "WFDBFolderSource",
    "WFDBHeader",
    "challenge_subset",
    "check_fs_range",
    "get_source",
    "header_path",
    "load_ptbxl_table",
    "load_scp_statements",
    "merge_equivalent_codes",
    "normalise_sex",
    "parse_header",
    "parse_header_comments",
    "ptbxl_label_space",
    "ptbxl_record_id",
    "ptbxl_diagnostic_codes",
    "ptbxl_task_labels",
    "ptbxl_task_map",
    "read_challenge",
    "read_cpsc2018",
    "read_header",
    "read_label_table",
    "read_wfdb",
]
