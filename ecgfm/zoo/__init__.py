"""Published ECG foundation models imported as ecgfm encoders (the model zoo).

``python -m ecgfm.zoo KIND CHECKPOINT OUT_DIR [options]`` or :func:`import_encoder` reads a peer's checkpoint (a
local file; nothing is downloaded) without unpickling code, maps its weights onto a native ecgfm backbone (no peer
code is imported) and writes an encoder artifact that carries the peer's preprocessing, sampling rate, window,
lead order, licence and citation. The folder then works wherever an ecgfm encoder does (probe sweeps, fine-tuning,
explain, :mod:`ecgfm.api`). Kinds: ``stmem`` (:mod:`ecgfm.zoo.stmem`), ``ecgfounder``
(:mod:`ecgfm.zoo.ecgfounder`, whose ``dense`` layer also imports as a classifier: :func:`import_classifier`; a
fine-tuned ``stmem`` checkpoint's ``head`` too, given ``multilabel=``) and
``hubert_ecg`` (:mod:`ecgfm.zoo.hubert_ecg`); ``ecg_fm`` checkpoints cannot be read without unpickling objects and
are refused with the reason. See docs/ZOO.md.
"""

from ecgfm.zoo.base import ZooImportError
from ecgfm.zoo.importer import KINDS, import_classifier, import_encoder, load_peer

__all__ = ["KINDS", "ZooImportError", "import_classifier", "import_encoder", "load_peer"]
