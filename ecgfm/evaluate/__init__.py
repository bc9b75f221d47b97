"""Downstream evaluation: tasks, label fractions, linear / MLP probes, fine-tuning, metrics, sweeps, reports.

Modules (each documents its contract):

* :mod:`ecgfm.evaluate.tasks`: ``TaskSpec.from_config(cfg.task)``, ``build_task(spec, cache_root, preprocess)
  -> TaskData`` (cache, ``labels (N, C)``, ``class_names``, ``multilabel``, ``splits``, ``patient_ids``),
  ``holdout_record_ids``, ``ExcludingSource``, ``heldout_free_source`` / ``tasks_holdout_record_ids`` (pretraining
  pools without downstream val/test records: ``data=pretrain_pool_heldout_free``).
* :mod:`ecgfm.evaluate.fractions`: ``fraction_subsets(train_rows, labels, patient_ids, fractions, seed)``:
  stratified, patient-level, nested label subsets, identical for every method.
* :mod:`ecgfm.evaluate.features`: ``cached_features(backbone, cache, window, stride, feature_dir) -> FeatureSet``:
  one frozen pass per (encoder weights, corpus, window settings), cached on disk; ``STATS`` counts passes.
* :mod:`ecgfm.evaluate.probe`: ``LinearProbe`` (scikit-learn logistic regression), ``MLPProbe``,
  ``run_probe_grid(ProbeData, fractions, seeds, ...)``: many heads on one feature extraction.
* :mod:`ecgfm.evaluate.finetune`: ``FinetuneModule`` (Lightning; warm-up, layer-wise lr decay, early stopping),
  ``run_finetune``.
* :mod:`ecgfm.evaluate.metrics`: ``evaluate_scores`` (macro / per-class AUROC, macro F1 with validation
  thresholds, Fmax, accuracy; percentile bootstrap CIs over records), ``paired_bootstrap_delta``.
* :mod:`ecgfm.evaluate.leakage`: ``check_leakage`` (shared records / patients between pretraining and test data,
  PTB-XL inside PhysioNet 2021 included) and ``LeakageError``.
* :mod:`ecgfm.evaluate.sweep`: ``probe_main(cfg)`` / ``finetune_main(cfg)``, what ``probe.py`` / ``finetune.py``
  call: one resumable results cell per (mode, task, checkpoint, fraction, seed).
* :mod:`ecgfm.evaluate.report`: ``build_report(results_dir)``: tidy CSV, Markdown table, plot, paired comparisons.

See docs/BENCHMARK.md for the protocol and the commands.
"""
