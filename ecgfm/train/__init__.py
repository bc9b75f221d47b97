"""Training: config in, checkpoints + exported encoder + summary out.

* :mod:`ecgfm.train.run`: :func:`train`, the pipeline behind ``ecgfm-train`` / ``python train.py``;
* :mod:`ecgfm.train.build`: data rate and crop, backbone checks, callbacks and logger from the config;
* :mod:`ecgfm.train.loop`: per-step reseeding, throughput, loss history, the resumable training loader;
* :mod:`ecgfm.train.safety`: non-finite inputs / loss / weights stop a run with an error naming the shard, records
  and step (or records are skipped with ``nonfinite=skip``, counted in the summary);
* :mod:`ecgfm.train.checkpoints`: atomic checkpoint writes (a Lightning ``CheckpointIO``), resume from the newest
  checkpoint that loads, refusal to overwrite a finished run by a fresh start or to resume on data of another rate;
* :mod:`ecgfm.train.report`: the command-line wrapper (one-line errors, the final "where is what" block).

Nothing in :mod:`ecgfm.evaluate` or :mod:`ecgfm.explain` imports this package: stages talk through artifacts.
:mod:`ecgfm.pipelines` re-exports these names for older code.
"""

from ecgfm.train.run import train

__all__ = ["train"]
