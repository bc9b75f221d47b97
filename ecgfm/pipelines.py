"""Compatibility module: the training pipeline now lives in :mod:`ecgfm.train` (``run``, ``build``, ``loop``,
``checkpoints``, ``safety``, ``report``) and cache preparation in :mod:`ecgfm.data.prepare`.

``from ecgfm.pipelines import train`` (and the other names below) keeps working; new code imports from the
packages themselves. Nothing in :mod:`ecgfm.evaluate` or :mod:`ecgfm.explain` imports either.
"""

from __future__ import annotations

# the cache-preparation path lives in the data layer (one path rule, one lock); names re-exported for now
from ecgfm.data.prepare import (PREPARED_MARKER, build_cache_dirs, cache_key, check_data_paths,  # noqa: F401
                                prepare_cache)
from ecgfm.train.build import (build_callbacks, build_logger, check_backbone_fits_crop,  # noqa: F401
                               compile_backbone, data_rate)
from ecgfm.train.checkpoints import (AtomicCheckpointIO, DataFacts, NotACheckpointError,  # noqa: F401
                                     find_resume_checkpoint, guard_fresh_start)
from ecgfm.train.loop import (LossHistory, ResumableBatchSampler, ResumableDataLoader,  # noqa: F401
                              StepSeedCallback, ThroughputCallback, make_resumable)
from ecgfm.train.run import train  # noqa: F401
from ecgfm.train.safety import (NonFiniteDataError, NonFiniteGuard, NonFiniteLossError,  # noqa: F401
                                NonFiniteWeightsError)

__all__ = ["train", "prepare_cache", "build_cache_dirs", "cache_key", "check_data_paths", "PREPARED_MARKER",
           "build_callbacks", "build_logger", "check_backbone_fits_crop", "compile_backbone", "data_rate",
           "AtomicCheckpointIO", "DataFacts", "NotACheckpointError", "find_resume_checkpoint", "guard_fresh_start",
           "LossHistory", "ResumableBatchSampler", "ResumableDataLoader", "StepSeedCallback", "ThroughputCallback",
           "make_resumable", "NonFiniteDataError", "NonFiniteGuard", "NonFiniteLossError", "NonFiniteWeightsError"]
