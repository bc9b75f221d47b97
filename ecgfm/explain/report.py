"""Explanation reports: figures + a JSON summary for a few records, and the ``explain.py`` entry point.

:func:`explain_records` is the Python API: for each record it converts the signal with the model's own
preprocessing (:meth:`~ecgfm.explain.wrapper.ECGWrapper.prepare`), predicts, runs each attribution method
(:class:`~ecgfm.explain.attribution.Explainer`), scores it (:func:`~ecgfm.explain.faithfulness.faithfulness_report`:
deletion / insertion AOPC against random attributions, localisation when the record has a ground-truth evidence
mask), optionally computes a counterfactual (:func:`~ecgfm.explain.counterfactual.counterfactual`), and writes

* ``<record>_chart_<method>.{png,svg,pdf}``: the clinical 12-lead chart with the signed attribution overlay;
* ``<record>_methods.*``: the method comparison (one row per method);
* ``<record>_leads.*``: per-lead importance bars;
* ``<record>_counterfactual.*`` (when requested);
* ``report.json``: predictions with class names, per method the per-lead and per-wave importance, timing and
  faithfulness scores, and the counterfactual summary.

The chart shows the record in millivolts at the model's rate, filtered like the model input but not normalised
(the model itself sees the normalised signal; the attribution is aligned sample by sample).

:func:`explain_main` is what ``python explain.py`` runs (see ``conf/explain.yaml``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ecgfm.artifacts import ArtifactError, artifact_kind, derive_trained_limb_leads
from ecgfm.artifacts import load_classifier as load_classifier_artifact
from ecgfm.config import ConfigError
from ecgfm.data.preprocess import PreprocessSpec, preprocessed_spec, resample
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord
from ecgfm.explain import visualize as viz
from ecgfm.explain import waves as waves_mod
from ecgfm.explain.attribution import METHODS, Explainer, canonical_method, check_method_options
from ecgfm.explain.classifier import train_synthetic_demo, wrapper_from_artifact
from ecgfm.explain.wrapper import ECGWrapper
from ecgfm.recipes import check_counterfactual_options

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("integrated_gradients", "gradcam", "occlusion")


def load_model(checkpoint: str | os.PathLike, map_location: str = "cpu") -> ECGWrapper:
    """Load a classifier for explanation: a classifier artifact folder (from fine-tuning, probing, the zoo or the
    demos) or a ``weights_only`` torch classifier checkpoint (:meth:`ECGWrapper.from_checkpoint`).

    Raises:
        ECGDataError: the path does not exist, holds no usable model, or is an encoder (a pretrained backbone has
            no classes to explain: the message gives the command that makes a classifier from it).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise ECGDataError(path, "checkpoint not found")
    kind = artifact_kind(path)
    try:
        if kind is not None:  # an encoder folder gets ArtifactError's "this is an encoder ..." advice
            model, spec, meta = load_classifier_artifact(path, map_location=map_location)
            return wrapper_from_artifact(model, spec, meta)
    except ArtifactError as exc:
        raise ECGDataError(exc.path, exc.problem) from exc
    return ECGWrapper.from_checkpoint(path, map_location=map_location)


def display_signal(record: ECGRecord, wrapper: ECGWrapper) -> tuple[np.ndarray, str]:
    """The record at the model's rate and lead order, filtered like the model input but not normalised:
    ``((L_model, T) float32, units)`` (absent leads are 0). A raw (reader's) record is drawn in mV; a record read
    back from a corpus cache is already normalised (``header["preprocessed"]``): its values are drawn as they are,
    in ``"normalised units"`` (a chart in mV would claim amplitudes and a gain the record no longer has).

    Limb leads the model derives from I and II (:func:`display_signal_and_derived`) are drawn derived, as the
    model reads them. Leads the model does not read (:attr:`ECGWrapper.read_leads`) are drawn as recorded: the
    chart labels them "not read by the model"."""
    rows, units, _ = display_signal_and_derived(record, wrapper)
    return rows, units


def display_signal_and_derived(record: ECGRecord, wrapper: ECGWrapper) -> tuple[np.ndarray, str, list[str]]:
    """:func:`display_signal` and the leads it derived.

    A classifier that records its training leads (``extra.trained_leads``) and derives (``extra.derive_limb_leads``:
    imports and demos, not a sweep's classifier) reads III / aVR / aVL / aVF derived from I and II when a raw
    record lacks them (:meth:`ECGWrapper._prepare_one`, through
    :func:`ecgfm.artifacts.derive_trained_limb_leads`). The drawn signal applies the same derivation on the
    canonical 12 x T layout before mapping rows to the model's order, so that those rows show the signal the
    attribution is about (zero rows drew them as flat recorded traces with attribution coloured on them).

    Args:
        record: the explained record.
        wrapper: the model's wrapper (rate, lead order, preprocessing, ``trained_leads``).

    Returns:
        ``(rows (L_model, T) float32, units, derived)``: ``derived`` names the model's leads that were computed
        from I and II rather than recorded (empty when none was).
    """
    x12 = np.zeros((len(CANONICAL_LEADS), record.n_samples), dtype=np.float32)
    had = np.zeros(len(CANONICAL_LEADS), dtype=bool)
    for i in range(len(CANONICAL_LEADS)):
        if record.lead_mask[i]:
            x12[i], had[i] = record.signal[i], True
    preprocessed = preprocessed_spec(record, wrapper.spec, "the explained model") is not None
    now = had
    if not preprocessed and wrapper.trained_leads and wrapper.derive_limb_leads:   # as the wrapper derives them
        flat = wrapper.spec.flat_threshold if wrapper.spec is not None else 0.0
        x12, now = derive_trained_limb_leads(x12, had.copy(), wrapper.trained_leads, wrapper.lead_names, flat,
                                             record.key)
        now = np.asarray(now, dtype=bool)
    rows = np.zeros((wrapper.n_leads, record.n_samples), dtype=np.float32)
    mask = np.zeros(wrapper.n_leads, dtype=bool)
    derived: list[str] = []
    for j, lead in enumerate(wrapper.lead_names):
        i = CANONICAL_LEADS.index(lead)
        if now[i]:
            rows[j] = x12[i]
            mask[j] = True
            if not had[i]:
                derived.append(lead)
    if preprocessed:
        return rows, ("mV" if wrapper.spec.normalize == "none" else "normalised units"), derived
    if wrapper.spec is not None:
        # every lead of the record, those the model does not read too (``leads``: None): a model reading a subset
        # (input_leads, a spec's leads) had the others zeroed here, and the chart called them "not recorded"
        spec = PreprocessSpec(**{**wrapper.spec.to_dict(), "fs": wrapper.fs, "normalize": "none", "clip": None,
                                 "leads": None})
        return wrapper.preprocess_rows(rows, record.fs, mask, spec, record.key)[0], "mV", derived
    return resample(np.nan_to_num(rows), record.fs, wrapper.fs), "mV", derived


def _window_text(window: dict[str, float] | None, record: ECGRecord) -> str:
    """`` | window 10.00-20.00 s of 30.00 s`` for the window of a longer record that was explained ('' for the
    whole record): the drawn time axis starts at the window, not at the record's start."""
    if not window:
        return ""
    return (f" | window {window['start_s']:.2f}-{window['start_s'] + window['length_s']:.2f} s of "
            f"{record.n_samples / record.fs:.2f} s")


def _probability_text(p_record: float, p_window: float, window: dict[str, float] | None) -> str:
    """``p = 0.68`` (the model's input is the whole record) or ``p(record) = 0.68, p(window 10.0-20.0 s) = 0.29``:
    the record's probability (the API's, over all its windows) and the explained window's own."""
    if not window:
        return f"p = {p_record:.2f}"
    return (f"p(record) = {p_record:.2f}, p(window {window['start_s']:.1f}-"
            f"{window['start_s'] + window['length_s']:.1f} s) = {p_window:.2f}")


def choose_window(terms: np.ndarray, target: int) -> int:
    """The window a record's explanation explains: the one that adds most to the record's score of ``target``.

    The record's score is the mean over its windows of ``terms`` (:meth:`ECGWrapper.score_windows`: the windows'
    probabilities, or logits for ``window_aggregate="logit"``), so window ``w`` adds ``terms[w, target] / W``; the
    first such window on a tie.

    Args:
        terms: ``(W, C)`` what the record's mean is taken over.
        target: the explained class.
    """
    return int(np.argmax(np.asarray(terms)[:, int(target)]))


def _curve_settings(fo: Mapping[str, Any]) -> dict[str, Any]:
    """The deletion / insertion settings a faithfulness report ran with (``fo``, else
    :func:`~ecgfm.explain.faithfulness.perturbation_curve`'s defaults), JSON-ready: a tensor baseline is named."""
    from ecgfm.explain.faithfulness import perturbation_curve

    defaults = inspect.signature(perturbation_curve).parameters
    out = {k: fo.get(k, defaults[k].default) for k in ("segment_s", "steps", "baseline")}
    if not (out["baseline"] is None or isinstance(out["baseline"], (str, int, float))):
        out["baseline"] = f"custom {type(out['baseline']).__name__}"
    return {**out, "n_random": int(fo.get("n_random", 3))}


def _baseline_text(baseline: Any) -> str:
    """How deleted segments are replaced, for the report's note."""
    if baseline is None or isinstance(baseline, str):
        return {"smoothed": "the record's own smoothed baseline", "zeros": "zeros", None: "zeros",
                "median": "the record's two-stage median baseline"}.get(baseline, f"the {baseline!r} baseline")
    return f"the constant {baseline:g}" if isinstance(baseline, (int, float)) else "the caller's baseline tensor"


def _evidence(record: ECGRecord, wrapper: ECGWrapper, n_t: int, start: int = 0) -> np.ndarray | None:
    """The record's ground-truth evidence mask over the model input, at the model's rate and lead order, or None.

    Args:
        record: the record (``evidence (12, T_record)`` bool at the record's rate).
        wrapper: the model's wrapper (rate, lead order).
        n_t: samples of the model input.
        start: the input's first sample in the record, at the model's rate (the centred window of a record longer
            than the model's window); model sample ``k`` is record time ``(start + k) / fs_model``. Samples past
            the record's end (zero padding) hold no evidence, nor do absent leads (no signal there to point at).
    """
    if record.evidence is None or not record.evidence.any():
        return None
    ev = record.evidence & np.asarray(record.lead_mask, dtype=bool)[:, None]
    idx = ((int(start) + np.arange(n_t)) * record.fs / wrapper.fs).astype(np.int64)
    inside = idx < ev.shape[1]
    idx = np.minimum(idx, ev.shape[1] - 1)
    return np.stack([ev[CANONICAL_LEADS.index(lead)][idx] & inside for lead in wrapper.lead_names])


#: ``target.chosen`` of a report record whose multi-label model predicts no class at its thresholds
NONE_PREDICTED = "none predicted; explaining the most probable"


def _decided(wrapper: ECGWrapper, proba: torch.Tensor) -> np.ndarray:
    """``(C,)`` bool: the classes the model predicts for a record of probabilities ``proba (C,)``, decided as
    :meth:`ecgfm.api.Classifier.predict` decides (:func:`ecgfm.api.decisions`): the arg-max (single-label), or each
    class at or above its threshold (multi-label: the artifact's validation thresholds, else 0.5)."""
    from ecgfm.api import decisions

    p = proba.detach().cpu().double().numpy()
    return decisions(p, wrapper.postprocess == "sigmoid", wrapper.thresholds).astype(bool)


def _predictions(wrapper: ECGWrapper, proba: torch.Tensor) -> list[dict[str, Any]]:
    """Every class by decreasing probability, each with ``predicted`` (the model's decision, :func:`_decided`)
    and, for a multi-label model, the ``threshold`` that decision used."""
    from ecgfm.api import decision_thresholds

    names = wrapper.class_names or tuple(str(i) for i in range(proba.shape[-1]))
    order = proba.argsort(descending=True).tolist()
    decided = _decided(wrapper, proba)
    multilabel = wrapper.postprocess == "sigmoid"
    thresholds = decision_thresholds(wrapper.thresholds, int(proba.shape[-1])) if multilabel else None
    out = []
    for c in order:
        row = {"class": names[c], "index": int(c), "probability": float(proba[c]), "predicted": bool(decided[c])}
        if multilabel:
            row["threshold"] = float(thresholds[c])
        out.append(row)
    return out


def predicted_target(wrapper: ECGWrapper, proba: torch.Tensor) -> tuple[int, str]:
    """The class a record's explanation explains when no ``target`` is given, and why.

    The most probable of the classes the model predicts (:func:`_decided`: single-label, the arg-max; multi-label,
    those at or above their thresholds, so a class above 0.5 that misses its validation threshold is not it); a
    multi-label record with no predicted class explains its most probable class instead, said as
    :data:`NONE_PREDICTED`.

    Args:
        wrapper: the model.
        proba: ``(C,)`` the record's probabilities.

    Returns:
        ``(class index, "predicted" | NONE_PREDICTED)``.
    """
    p = proba.detach().cpu().double().numpy()
    decided = _decided(wrapper, proba)
    if decided.any():
        idx = np.flatnonzero(decided)
        return int(idx[np.argmax(p[idx])]), "predicted"
    return int(np.argmax(p)), NONE_PREDICTED


def _prediction_text(rec: Mapping[str, Any]) -> str:
    """A report record's prediction and explained class, for the console: single-label ``predicted A p=..;
    explained A``; multi-label the classes predicted at the thresholds, or "none predicted; explaining the most
    probable"."""
    preds, tgt = rec["predictions"], rec["target"]
    if not any("threshold" in p for p in preds):   # single-label (or a report without decisions)
        return f"predicted {preds[0]['class']} p={preds[0]['probability']:.3f}; explained {tgt['class']}"
    chosen = [p for p in preds if p.get("predicted")]
    if not chosen:
        top = preds[0]
        return (f"{NONE_PREDICTED}, {tgt['class']} p={tgt['probability']:.3f} (below its threshold "
                f"{top['threshold']:.3g})" if tgt.get("chosen") == NONE_PREDICTED else
                f"none predicted at the thresholds; explained {tgt['class']} ({tgt.get('chosen', 'target=')})")
    said = ", ".join(f"{p['class']} p={p['probability']:.3f}" for p in chosen)
    return f"predicted {said} (at the thresholds); explained {tgt['class']}"


def _wave_summary(att, windows: dict[str, np.ndarray], recorded: Any = None) -> dict[str, Any]:
    """Per-wave shares of the first input (:meth:`~ecgfm.explain.attribution.Attribution.per_wave`).

    Args:
        att: the attribution (``(1, L, T)``).
        windows: :func:`ecgfm.explain.waves.wave_windows` of the record.
        recorded: ``(T,)`` / ``(1, T)`` bool recorded samples, or None (all): the zero padding of a short record is
            left out of every wave, "other" included, and of the per-sample densities.

    Returns:
        ``{wave: {"share_abs", "density_abs", "sum_signed"}}`` for P, QRS, T and other.
    """
    share = att.per_wave(windows, reduce="abs", recorded=recorded)
    total = sum(float(v[0]) for v in share.values()) or 1.0
    density = att.per_wave(windows, reduce="abs", normalize=True, recorded=recorded)
    signed = att.per_wave(windows, reduce="signed", recorded=recorded)
    return {w: {"share_abs": float(share[w][0]) / total, "density_abs": float(density[w][0]),
                "sum_signed": float(signed[w][0])} for w in share}


def _lead_summary(att, lead_names: Sequence[str], recorded: Any = None, counted: Any = None) -> dict[str, Any]:
    """Per-lead shares of the first input; ``top`` is None (with a ``note``) when the attribution cannot rank
    leads (:attr:`ecgfm.explain.attribution.Attribution.ranks_leads`). ``recorded`` (``(T,)`` / ``(1, T)`` bool, or
    None: all): only the recorded samples are summed, not the zero padding of a short record. ``counted``
    (``(L,)`` bool: the record's leads the model reads; None: all): the leads ranked, as the lead-importance chart
    ranks them (:func:`~ecgfm.explain.attribution.ranked_leads`: a 3-lead record's equal shares rank nothing)."""
    per = att.per_lead("abs", recorded=recorded)[0]
    signed = att.per_lead("signed", recorded=recorded)[0]
    total = float(per.sum()) or 1.0
    top = att.top_leads(3, recorded=recorded, counted=counted)[0]
    out = {"share_abs": {n: float(v) / total for n, v in zip(lead_names, per.tolist())},
           "sum_signed": {n: float(v) for n, v in zip(lead_names, signed.tolist())},
           "top": top, "ranks_leads": top is not None, "lead_resolution": att.lead_resolution}
    if top is None:
        out["note"] = ("no lead ranking: this method gives every lead the same map (lead resolution "
                       f"{att.lead_resolution!r})" if att.lead_resolution != "per-lead" else
                       "no lead ranking: the per-lead totals are equal (or zero)")
    return out


def _scored_text(faithfulness_options: Mapping[str, Any] | None) -> str:
    """What the report's perturbation curves score, for its ``notes``: the explained class's logit or
    probability (:func:`ecgfm.explain.faithfulness.scored_output`)."""
    output = (faithfulness_options or {}).get("output")
    if output == "proba":
        return "explained class's probability (faithfulness_options output='proba')"
    if output == "logit":
        return "explained class's logit (faithfulness_options output='logit')"
    return ("explained class's logit, the score the attributions explain (each method's faithfulness.output; "
            "faithfulness_options output='proba' scores the probability instead)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array{value.shape}"
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def explain_records(wrapper: ECGWrapper, records: Sequence[ECGRecord], out_dir: str | os.PathLike,
                    methods: Sequence[str] = DEFAULT_METHODS, target: Any = None,
                    method_options: Mapping[str, Mapping[str, Any]] | None = None, faithfulness: bool = True,
                    faithfulness_options: Mapping[str, Any] | None = None,
                    counterfactual: Mapping[str, Any] | None = None, formats: Sequence[str] = viz.FORMATS,
                    overlay: str = "line", chart_methods: Sequence[str] | None = None, dpi: int = 150,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Explain records and write figures and ``report.json`` into ``out_dir``.

    Args:
        wrapper: the model (:func:`load_model`).
        records: records in any rate / lead layout (converted by the model's preprocessing; absent leads are
            fed as zeros, ecgfm's convention).
        out_dir: output folder (created).
        methods: attribution methods (names or aliases of :data:`ecgfm.explain.attribution.METHODS`).
        target: class (index or name) to explain for every record; None: each record's predicted class
            (:func:`predicted_target`: multi-label, the most probable class at or above its threshold, as
            :meth:`ecgfm.api.Classifier.predict` decides; none predicted: the most probable, said in the report).
        method_options: per method (canonical name or alias) extra options, e.g. ``{"ig": {"n_steps": 32}}``.
        faithfulness: compute deletion / insertion AOPC vs random (and localisation when the record has an
            evidence mask).
        faithfulness_options: options of :func:`~ecgfm.explain.faithfulness.faithfulness_report`
            (``n_random``, ``segment_s``, ``steps``, ``order``, ``output``: ``"logit"`` / ``"proba"``, the score
            the curves track; None or absent: the output each attribution explains...).
        counterfactual: None (off) or options of :func:`~ecgfm.explain.counterfactual.counterfactual` with a
            ``target`` (class name / index; default: the second most probable class).
        formats: figure formats (``png``, ``svg``, ``pdf``).
        overlay: chart overlay style (``"line"`` or ``"band"``).
        chart_methods: methods that get a full 12-lead chart (default: all).
        dpi: raster resolution.
        extra: JSON-able facts added to the report (checkpoint, data source...).

    Returns:
        the report (also written to ``out_dir/report.json``).

    Raises:
        ValueError / ECGDataError: unknown method, bad record, target outside the classes, a faithfulness
            ``output`` other than ``"logit"`` / ``"proba"``.
        ecgfm.config.ConfigError: (a ``ValueError``) a counterfactual setting that cannot work, before any record
            is explained: ``counterfactual.target`` not one of the classes, ``counterfactual.threshold`` outside
            ``(0, 1)`` or neither one value nor one per class, a negative weight, a non-positive ``lr``.
    """
    from ecgfm.explain.faithfulness import faithfulness_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = [canonical_method(m) for m in methods]
    if not keys:
        raise ValueError("give at least one attribution method")
    opts = {canonical_method(k): dict(v) for k, v in (method_options or {}).items()}
    for key, o in opts.items():   # a misspelt option fails here, before any record is explained
        check_method_options(key, o)
    unused = sorted(set(opts) - set(keys))
    if unused:   # options of a method not run were accepted and ignored
        from ecgfm.config import ConfigError

        raise ConfigError(f"method_options.{unused[0]}", f"options given for method(s) {unused} not in methods "
                                                          f"{keys}: add them to methods or drop their options")
    if counterfactual is not None:   # so does a counterfactual setting that cannot work
        check_counterfactual_options(counterfactual)
        _check_counterfactual_target(counterfactual, wrapper)   # its class and threshold count too
    problem = _output_problem((faithfulness_options or {}).get("output")) if faithfulness else None
    if problem:   # and a score the curves cannot track (it failed after the first attribution had been computed)
        raise ValueError(f"faithfulness_options['output'] {problem}")
    chart_keys = keys if chart_methods is None else [canonical_method(m) for m in chart_methods]
    explainer = Explainer(wrapper)
    report: dict[str, Any] = {
        "model": {"class_names": list(wrapper.class_names or []), "fs": wrapper.fs, "n_samples": wrapper.n_samples,
                  "lead_names": list(wrapper.lead_names), "postprocess": wrapper.postprocess,
                  "thresholds": None if wrapper.thresholds is None else list(wrapper.thresholds),
                  "preprocess": None if wrapper.spec is None else wrapper.spec.to_dict()},
        "methods": keys, "extra": dict(extra or {}), "records": [],
        "notes": {
            "predictions": "every class by decreasing probability, the record's probabilities as "
                           "ecgfm.Classifier.predict_proba gives them (a record longer than the model's window: all "
                           "its sliding windows, aggregated per the classifier's window_aggregate); predicted: the "
                           "model's decision, as ecgfm.Classifier.predict makes it (single-label: the most probable "
                           "class; multi-label: each class with probability >= its threshold, the classifier's "
                           "validation thresholds, 0.5 without them); the record's 'predicted' lists them",
            "target": "the explained class; probability: the record's (as in predictions); window_probability: the "
                      "explained window's own (the same unless the record is longer than the model's window); "
                      "chosen: 'target=' (given), 'predicted' (the most probable predicted class) or "
                      f"'{NONE_PREDICTED}' (a multi-label record with no class at its threshold)",
            "window": "null: the model's input is the whole record (zero-padded when shorter than its window); else "
                      "the explained window of a longer record (start_s, length_s at the model's rate): of the "
                      "windows the record is scored on (index of n_windows, every stride_s, the last aligned to the "
                      "record's end), the one adding most to the record's score of the explained class (its "
                      "probability, or its logit for a classifier aggregating logits); the attributions, the "
                      "faithfulness scores and the counterfactual are of that window",
            "unread_leads": "the record's leads that the model does not read (its encoder's input_leads, its "
                            "preprocessing's leads): drawn, labelled 'not read by the model', with no attribution",
            "per_lead.share_abs": "share of the summed |attribution| in each lead (recorded samples: the zero "
                                  "padding of a short record is not summed)",
            "per_wave": "P / QRS / T windows from R peaks detected on the model input's recorded samples "
                        "(ecgfm.explain.waves); share_abs: share of |attribution|; density_abs: mean |attribution| "
                        "per lead and sample; the zero padding of a short record is in no wave and not in 'other'",
            "faithfulness": "deletion AOPC (higher = more faithful) and insertion AUC (higher = better) of the "
                            + _scored_text(faithfulness_options) + "; (lead x segment_s) segments ordered by "
                            + ("|attribution| (largest first)" if (faithfulness_options or {}).get("order") == "abs"
                               else "signed attribution (most supporting first)")
                            + " (ties in a random order drawn from the record) and replaced by "
                            + _baseline_text((faithfulness_options or {}).get("baseline", "smoothed"))
                            + "; segment_s / steps / baseline / n_random: the settings used; localisation (records "
                            "with an evidence mask) only when the explained class is one of the record's labels "
                            "or the record has none (else localisation_skipped says why); *_gain = method minus the mean of random attributions (> 0 beats "
                            "random); each method's faithfulness.order says which order it used; score_record / "
                            "score_baseline: the tracked score of the record and of its baseline (the curves' ends): "
                            "where the baseline scores above the record (n_baseline_above), insertion reads "
                            "backwards (a larger AUC is not better) and the console says so",
        },
    }
    for record in records:
        t0 = time.perf_counter()
        rid = f"{record.source}_{record.record_id}".replace("/", "_")
        # the record cut as ecgfm.Classifier.predict_proba cuts it: every sliding window of a record longer than
        # the model's window (one input otherwise)
        windows, starts = wrapper.record_windows(record, missing_leads="zero")
        present = (windows != 0).any(dim=-1).any(dim=0).cpu().numpy()   # (L,) the record's leads: absent = zero rows
        read = np.array([lead in wrapper.read_leads for lead in wrapper.lead_names])   # (L,) the leads it reads
        counted = present & read    # (L,) the leads that can hold attribution: what lead rankings rank
        # a lead-aware classifier sees the record's lead mask, as when it was validated and as
        # Classifier.predict_proba scores it
        with wrapper.present_leads(present):
            # the record's probabilities as the API makes them (its windows aggregated per window_aggregate), and
            # each window's own
            rec_p, win_p, terms = wrapper.score_windows(windows)
            proba = torch.from_numpy(rec_p)
            if target is not None:
                tgt, chosen = int(wrapper.resolve_target(target, logits=torch.zeros(1, len(rec_p)))[0]), "target="
            else:   # the class the model predicts (multi-label: at its thresholds, as Classifier.predict decides)
                tgt, chosen = predicted_target(wrapper, proba)
            # the explained window: among the API's windows, the one adding most to the record's score of the class
            k = choose_window(terms, tgt)
            x, start = windows[k:k + 1], int(starts[k])
            names = wrapper.class_names or tuple(str(i) for i in range(proba.shape[0]))
            shown, units, derived = display_signal_and_derived(record, wrapper)
            # the leads drawn as recorded: those the model reads and the record has (its input's non-zero rows),
            # and the record's leads the model does not read (labelled so, not "not recorded")
            drawn = present | (~read & (np.abs(np.nan_to_num(shown)).max(axis=1) > 0 if shown.shape[1] else False))
            crop = None
            if len(starts) > 1 or shown.shape[1] > x.shape[2]:
                shown = shown[:, start:start + x.shape[2]]
                crop = {"start_s": start / wrapper.fs, "length_s": x.shape[2] / wrapper.fs, "index": k,
                        "n_windows": len(starts),
                        "stride_s": (wrapper.stride_samples or x.shape[2]) / wrapper.fs,
                        "chosen": f"of the {len(starts)} windows the record is scored on, the one adding most to "
                                  f"its {'mean logit' if wrapper.window_aggregate == 'logit' else 'probability'} "
                                  f"of {names[tgt]}"}
            p_text = _probability_text(float(rec_p[tgt]), float(win_p[k, tgt]), crop)
            # zero padding the model saw (the wrapper warned when it padded): in the report and its console line
            padded = max(0, x.shape[2] - shown.shape[1]) / x.shape[2]
            padded_from_s = x.shape[2] * (1 - padded) / wrapper.fs if padded > 0 else None   # where it starts
            # the recorded samples of the model input (present leads, t < the record's end): the zero padding of a
            # short record is left out of the faithfulness budget, the localisation scores and the counterfactual
            n_real = min(shown.shape[1], x.shape[2])
            recorded = torch.arange(x.shape[2], device=x.device)[None] < n_real                  # (1, T)
            if shown.shape[1] != x.shape[2]:
                shown = shown[:, :x.shape[2]] if shown.shape[1] > x.shape[2] else np.pad(
                    shown, ((0, 0), (0, x.shape[2] - shown.shape[1])))
            # beats and their wave windows on the recorded samples only: with the padding in, a record padded to
            # more than twice its length had no beat (the band-passed median was 0 on every lead)
            r_peaks = waves_mod.detect_r_peaks(x[0], wrapper.fs, recorded=np.arange(x.shape[2]) < n_real)
            wave_win = waves_mod.wave_windows(r_peaks, wrapper.fs, n_real)
            evidence = _evidence(record, wrapper, x.shape[2], start)
            preds = _predictions(wrapper, proba)
            entry: dict[str, Any] = {
                "record_id": record.record_id, "source": record.source, "labels": list(record.labels),
                "fs_original": float(record.fs), "predictions": preds,
                # the classes predicted (Classifier.predict's decision), most probable first: none, one or several
                # for a multi-label model
                "predicted": [p["class"] for p in preds if p["predicted"]],
                # probability: the record's (the API's); window_probability: the explained window's own
                "target": {"class": names[tgt], "index": tgt, "probability": float(rec_p[tgt]),
                           "window_probability": float(win_p[k, tgt]), "chosen": chosen},
                "n_beats_detected": int(len(r_peaks)), "methods": {}, "figures": [],
                "window": crop,   # None: the model's input is the whole record; else the explained window
                "padded_fraction": float(padded),   # share of the model's input that is zero padding
                # the leads the model reads that this record lacks (explained as absent; the wrapper warned)
                "absent_leads": [lead for lead, here, r in zip(wrapper.lead_names, present.tolist(), read.tolist())
                                 if not here and r],
                # the record's leads the model does not read (drawn, labelled "not read by the model")
                "unread_leads": [lead for lead, d, r in zip(wrapper.lead_names, drawn.tolist(), read.tolist())
                                 if d and not r],
            }
            atts = {}
            for key in keys:
                m_opts = dict(opts.get(key, {}))
                if "recorded" in inspect.signature(METHODS[key]).parameters:
                    # noise and baselines on the recorded samples only: the zero padding of a short record stays 0
                    m_opts.setdefault("recorded", recorded)
                att = explainer.explain(x, target=tgt, method=key, **m_opts)
                atts[key] = att
                summary: dict[str, Any] = {"options": _jsonable(att.options), "elapsed_s": float(att.elapsed_s),
                                           "per_lead": _lead_summary(att, wrapper.lead_names, recorded,
                                                                     counted if counted.any() else None),
                                           "per_wave": _wave_summary(att, wave_win, recorded)}
                if att.delta is not None:
                    summary["convergence_delta_abs"] = float(att.delta.abs().max())
                    # completeness error on the scale of what the attributions explain, f(x) - f(baseline) =
                    # sum of attributions - delta (an absolute 1.09 says nothing without it)
                    explained = (att.values.flatten(1).sum(1) - att.delta).abs()
                    summary["convergence_delta_rel"] = float((att.delta.abs() / explained.clamp_min(1e-12)).max())
                if not bool(att.values.abs().gt(0).any()):
                    # e.g. Grad-CAM's ReLU when the layer holds no positive evidence for the class
                    summary["warning"] = "all-zero attribution: the method found no evidence for this class"
                if faithfulness:
                    fo = dict(faithfulness_options or {})
                    fo.setdefault("n_random", 3)
                    # signed order: delete / insert the segments that most support the explained class first
                    # (Samek et al.'s "most relevant first"); |attribution| would mix in the evidence against it.
                    fo.setdefault("order", "signed")
                    # the evidence mask marks the feature of the record's labelled class: localisation of
                    # another class's explanation (a wrong prediction, target=) against it measures nothing
                    # (a record without labels: its mask is taken as the explained class's, as given)
                    own = evidence is not None and (not record.labels or names[tgt] in record.labels)
                    mask = torch.as_tensor(evidence[None]) if own else None
                    scores = faithfulness_report(explainer, att, mask=mask, recorded=recorded, **fo)
                    # scores["output"]: the score the curves tracked (the output the attribution explains unless
                    # faithfulness_options set one); the curves' settings as used, so the numbers can be read
                    summary["faithfulness"] = {**_jsonable(scores), "order": fo["order"],
                                               **_curve_settings(fo)}
                    if own:
                        summary["faithfulness"]["localisation_class"] = names[tgt] if record.labels else None
                    elif evidence is not None:
                        summary["faithfulness"]["localisation_skipped"] = (
                            f"the record's evidence mask marks its labelled class(es) {list(record.labels)}, not "
                            f"the explained class {names[tgt]!r}")
                entry["methods"][key] = summary
                if key in chart_keys:
                    fig = viz.plot_ecg_chart(shown, wrapper.fs, wrapper.lead_names, attribution=att.values[0],
                                             overlay=overlay, record_id=f"{record.source}/{record.record_id}",
                                             units=units, window_start_s=None if crop is None else crop["start_s"],
                                             present=drawn, read=read,
                                             derived=derived,
                                             padded_from_s=padded_from_s,
                                             title=f"{record.source} {record.record_id} | labels: "
                                                   f"{', '.join(record.labels) or '-'} | {key} for "
                                                   f"{names[tgt]} ({p_text})")
                    entry["figures"] += [str(p.name) for p in viz.save_figure(fig, out / f"{rid}_chart_{key}",
                                                                              formats, dpi)]
            fig = viz.plot_method_comparison(shown, wrapper.fs, {k: a.values[0] for k, a in atts.items()},
                                             wrapper.lead_names, units=units,
                                             present=drawn, read=read,
                                             padded_from_s=padded_from_s,
                                             title=f"{record.source} {record.record_id}: methods for {names[tgt]} "
                                                   f"({p_text})" + _window_text(crop, record))
            entry["figures"] += [p.name for p in viz.save_figure(fig, out / f"{rid}_methods", formats, dpi)]
            fig = viz.plot_lead_importance({k: a.per_lead(recorded=recorded)[0] for k, a in atts.items()},
                                           wrapper.lead_names, counted=counted if counted.any() else None,
                                           title=f"{record.record_id}: per-lead share of |attribution| ({names[tgt]})")
            entry["figures"] += [p.name for p in viz.save_figure(fig, out / f"{rid}_leads", formats, dpi)]
            if counterfactual is not None:
                from ecgfm.explain.counterfactual import counterfactual as make_cf
                from ecgfm.explain.counterfactual import class_thresholds, default_target

                cf_opts = dict(counterfactual)
                cf_target = cf_opts.pop("target", None)
                if cf_target is None:    # a class the model does not predict already (its own thresholds)
                    cf_target = default_target(proba, wrapper.postprocess == "sigmoid",
                                               class_thresholds(cf_opts.get("threshold"), wrapper, len(proba)))
                if cf_target is None:
                    entry["counterfactual"] = {"skipped": "every class is already predicted for this record: no "
                                                          "class to move it to (give counterfactual.target)"}
                    entry["elapsed_s"] = time.perf_counter() - t0
                    report["records"].append(entry)
                    continue
                cf = make_cf(wrapper, x, cf_target, recorded=recorded, **cf_opts)
                entry["counterfactual"] = cf.to_dict()
                cft = int(cf.target[0])
                # the counterfactual edits the explained window: its target's probability for the record (the
                # API's) next to the window's own (original_target_proba)
                entry["counterfactual"]["record_target_proba"] = float(rec_p[cft])
                cf_p = _probability_text(float(rec_p[cft]), float(win_p[k, cft]), crop)
                fig = viz.plot_counterfactual(cf.original[0], cf.counterfactual[0], wrapper.fs, wrapper.lead_names,
                                              windows=wave_win, title=f"{record.record_id}: counterfactual towards "
                                              f"{names[cft]} (valid{' for this window' if crop else ''}: "
                                              f"{bool(cf.valid[0])}; {cf_p})" + _window_text(crop, record))
                entry["figures"] += [p.name for p in viz.save_figure(fig, out / f"{rid}_counterfactual", formats,
                                                                     dpi)]
            entry["elapsed_s"] = time.perf_counter() - t0
            report["records"].append(entry)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2))
    return report


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _first_source_key(data_cfg: Any) -> str | None:
    """The config key of the record source :func:`source_from_config` builds from the ``data`` group node
    (``data.cache_dirs.<i>.sources.0``), or None."""
    from omegaconf import OmegaConf

    for i, entry in enumerate(OmegaConf.select(data_cfg, "cache_dirs", default=None) or []):
        if OmegaConf.is_config(entry) and OmegaConf.select(entry, "sources", default=None):
            return f"data.cache_dirs.{i}.sources.0"
    return None


def source_from_config(data_cfg: Any, source_cfg: Any = None) -> Any:
    """The record source of an explain run: ``source_cfg`` (a ``_target_`` node) when given, else the first
    record source of the ``data`` group node (``cache_dirs[*].sources[*]``, the node ``train.py`` prepares
    caches from), so ``data=ptbxl`` / ``data=synthetic`` / ``data=folder`` mean the same corpora everywhere.

    Raises:
        ValueError: no source found.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if source_cfg is not None:
        return instantiate(source_cfg)
    key = _first_source_key(data_cfg)
    if key is not None:
        return instantiate(OmegaConf.select(data_cfg, key.split(".", 1)[1]))
    raise ValueError("the data config names no record source (data.cache_dirs[*].sources); pass "
                     "source={_target_: ...} or choose data=ptbxl / synthetic / folder")


_PTBXL_DEMO_DATA = re.compile(r"PTB-XL .*ecg_id <= (\d+).*strat_fold (\d+)-(\d+) train.*?(\d+) validation")
_SYNTHETIC_DEMO_DATA = re.compile(r"synthetic seed (\d+)(?: \(500 Hz, ([0-9.]+) s records\))?: records (\d+)-(\d+) "
                                  r"train, (\d+)-(\d+) validation")


def _classifier_description(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """A classifier artifact's description (``classifier.json``), or None (a torch checkpoint, another kind, or an
    unreadable description: what is read from it here is only a note for the console)."""
    try:
        if artifact_kind(Path(checkpoint)) != "classifier":
            return None
        from ecgfm.explain.classifier import classifier_info

        return classifier_info(checkpoint)
    except Exception:   # noqa: BLE001 -- an unreadable description says nothing
        return None


def training_data(checkpoint: str | os.PathLike) -> str | None:
    """The training data a classifier artifact names (``provenance.data``, else ``extra.data``), or None (a
    torch checkpoint, or an artifact that does not say)."""
    meta = _classifier_description(checkpoint)
    if meta is None:
        return None
    data = (meta.get("provenance") or {}).get("data") or (meta.get("extra") or {}).get("data")
    return str(data) if data else None


def training_records(checkpoint: str | os.PathLike, source: Any = None) -> tuple[set[str], set[str]] | None:
    """The ``source/record_id`` keys a classifier artifact was trained and validated on (``extra.training_records``
    / ``extra.validation_records``, written by probe / fine-tune sweeps since 2026-12-06), or None.

    Record ids repeat across corpora (``syn000000`` of every synthetic seed, ``00001`` of two PTB-XL copies), so
    with ``source`` (the record source being explained) the keys are returned only when that source is one the
    classifier was trained on (:func:`same_corpus` against ``extra.training_sources``); otherwise None (cannot tell).
    """
    meta = _classifier_description(checkpoint)
    if meta is None:
        return None
    extra = meta.get("extra") or {}
    if not isinstance(extra.get("training_records"), list):
        return None
    if source is not None and not same_corpus(source, extra.get("training_sources")):
        return None
    return set(map(str, extra["training_records"])), set(map(str, extra.get("validation_records") or []))


#: Source settings that change which records are listed, or their labels and metadata, but never which ECG a
#: record id names (a folder's ids are the records' paths under its root, with or without a labels CSV), so they
#: are left out when :func:`same_corpus` asks whether two sources hold the same records.
NON_IDENTITY_SETTINGS = frozenset({"include_unlabelled", "labels_csv", "id_column", "label_columns", "patient_column",
                                   "labels_encoding", "sex_codes"})


def same_corpus(source: Any, described: Any) -> bool:
    """Whether record ``source`` is one of the ``described`` sources (a cache manifest's ``sources``: the
    :func:`ecgfm.data.cache.describe_source` of each), i.e. whether a record id names the same ECG in both: same
    type, name and settings, paths compared after resolving them, the settings of :data:`NON_IDENTITY_SETTINGS`
    left out (a task's folder lists only its labelled records, ``data=folder`` every record of the same root).
    False when nothing is described."""
    from ecgfm.data.cache import describe_source

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            described_source = "type" in value
            return {k: norm(v) for k, v in value.items() if not (described_source and k in NON_IDENTITY_SETTINGS)}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if isinstance(value, str) and os.sep in value and os.path.exists(value):
            return os.path.realpath(value)
        return value

    if not isinstance(described, list) or not described:
        return False
    try:
        mine = norm(describe_source(source))
    except Exception:   # noqa: BLE001 -- a source that cannot be described cannot be matched
        return False
    return any(norm(d) == mine for d in described if isinstance(d, dict))


def training_membership(data: str | None, record: ECGRecord,
                        records: tuple[set[str], set[str]] | None = None, source: Any = None) -> str | None:
    """Whether ``record`` was among the training records that ``data`` (:func:`training_data`) describes.

    Determinable for the descriptions the explain demos write (:func:`ecgfm.explain.classifier.train_ptbxl_demo`:
    PTB-XL ``ecg_id`` bound and ``strat_fold`` ranges; :func:`~ecgfm.explain.classifier.train_synthetic_demo`:
    synthetic record index ranges, same generator seed assumed); other descriptions (a sweep cell's "train split
    fraction ...") name no records.

    ``records`` (:func:`training_records`: the keys a sweep's artifact lists) decides first, by the record's key.
    For the synthetic demo, ``source`` (the explained records' source) must be the generator the demo drew from
    (same seed, 500 Hz, same duration); otherwise None.

    The PTB-XL demo trains only on the records of its folds that have a label of its task
    (:func:`~ecgfm.explain.classifier.load_ptbxl_superdiagnostic`: 00385, ``PACE`` only, is in fold 1 but was never
    seen), so a fold decides membership only with the record's task labels: read from its ``scp_codes`` and the
    ``scp_statements.csv`` under ``source.root`` (the PTB-XL source it was loaded from). Without them the record
    is said to be in the training (validation) folds, not in the training (validation) data.

    Returns:
        ``"training"`` (in the classifier's training records), ``"validation"`` (among the records its epoch was
        chosen on), ``"held out"`` (neither), ``"training folds"`` / ``"validation fold"`` (a PTB-XL record in the
        demo's training / validation folds whose task labels could not be read: a training / validation record
        only if it has a label of the task), or None when it cannot be determined.
    """
    if records is not None:
        train_keys, val_keys = records
        return "training" if record.key in train_keys else "validation" if record.key in val_keys else "held out"
    if not data:
        return None
    m = _PTBXL_DEMO_DATA.search(data)
    if m and record.source == "ptbxl" and str(record.record_id).isdigit():
        fold = (record.meta or {}).get("strat_fold")
        if fold is None:
            return None
        max_id, lo, hi, val = (int(g) for g in m.groups())
        if int(record.record_id) > max_id:
            return "held out"
        where = "training" if lo <= int(fold) <= hi else "validation" if int(fold) == val else None
        if where is None:
            return "held out"
        labelled = _has_task_label(data, record, source)
        if labelled is None:   # in the folds, but whether the demo's loader kept it is unknown: never claimed
            return "training folds" if where == "training" else "validation fold"
        return where if labelled else "held out"   # a record without a label of the task was left out of x / y
    m = _SYNTHETIC_DEMO_DATA.search(data)
    if m and record.source == "synthetic":
        digits = re.sub(r"\D", "", str(record.record_id))
        if not digits:
            return None
        seed, duration = int(m.group(1)), float(m.group(2)) if m.group(2) else 10.0
        # record i of a synthetic corpus is a function of (seed, rate, duration) only: another seed's syn000000
        # is another ECG (a source that does not say is not claimed)
        if source is None or (getattr(source, "seed", None), getattr(source, "fs", None),
                              getattr(source, "duration", None)) != (seed, 500.0, duration):
            return None
        lo, hi, vlo, vhi = (int(g) for g in m.groups()[2:])
        i = int(digits)
        return "training" if lo <= i <= hi else "validation" if vlo <= i <= vhi else "held out"
    return None


def _has_task_label(data: str, record: ECGRecord, source: Any) -> bool | None:
    """Whether a PTB-XL ``record`` has a label of the demo's task (``"PTB-XL <task>, ..."`` in ``data``), as the
    demo's loader decides (:meth:`ecgfm.data.readers.PTBXLSource.labels`: any likelihood), or None when that cannot
    be read: no ``scp_codes`` in the record's meta, no PTB-XL ``source`` with a ``scp_statements.csv`` under its
    root, or a task the description does not name."""
    from ecgfm.data.readers.ptbxl import PTBXL_TASKS, load_scp_statements, ptbxl_task_labels

    m = re.match(r"\s*PTB-XL (\w+),", data)
    codes = (record.meta or {}).get("scp_codes")
    root = getattr(source, "root", None)
    if not m or m.group(1) not in PTBXL_TASKS or not isinstance(codes, Mapping) or root is None \
            or getattr(source, "name", None) != "ptbxl" or not (Path(root) / "scp_statements.csv").is_file():
        return None
    try:
        return bool(ptbxl_task_labels(codes, m.group(1), load_scp_statements(root)))
    except Exception:   # noqa: BLE001 -- an unreadable table says nothing (the console line is only a note)
        return None


_MEMBERSHIP_TEXT = {"training": "IN THE CLASSIFIER'S TRAINING DATA (its explanation shows what the model learnt "
                                "from this record, not how it generalises)",
                    "validation": "in the classifier's validation data (used to choose its epoch)",
                    "held out": "not in the classifier's training or validation data",
                    "training folds": "in the classifier's training folds (a training record only if it has a label "
                                      "of its task, which could not be read here)",
                    "validation fold": "in the classifier's validation fold (a validation record only if it has a "
                                       "label of its task, which could not be read here)"}


def _check_names(cfg: Any) -> None:
    """Attribution methods and figure formats named in the config exist: checked before anything is computed
    (a bad format failed after every attribution had been computed)."""
    from ecgfm.explain.attribution import canonical_method
    from ecgfm.explain.visualize import FORMATS

    for i, m in enumerate(cfg.methods):
        try:
            canonical_method(m)
        except ValueError as exc:
            raise ConfigError(f"methods[{i}]", str(exc)) from None
    for i, f in enumerate(cfg.formats):
        if str(f) not in FORMATS:
            raise ConfigError(f"formats[{i}]", f"{f!r} is not a figure format; use {', '.join(FORMATS)}")
    problem = _output_problem(cfg.faithfulness.get("output"))
    if problem:
        raise ConfigError("faithfulness.output", problem)


def _output_problem(output: Any) -> str | None:
    """Why ``output`` is not a score the faithfulness curves can track (``faithfulness.output`` /
    ``faithfulness_options["output"]``), or None when it is one (None: the output the attribution explains)."""
    from ecgfm.explain.faithfulness import SCORED_OUTPUTS

    if output is None or output in SCORED_OUTPUTS:
        return None
    return (f"must be one of {', '.join(SCORED_OUTPUTS)} or null (the output each attribution explains), "
            f"got {output!r}")


def _check_target(target: Any, wrapper: ECGWrapper) -> None:
    """``target=`` names one of the model's classes (or its index): :meth:`ECGWrapper.resolve_target` on a dummy
    score row, before anything is computed."""
    if target is None:
        return
    try:
        wrapper.resolve_target(target, logits=torch.zeros(1, wrapper.num_classes))
    except ValueError as exc:
        raise ConfigError("target", str(exc)) from None


def _check_counterfactual_target(options: Mapping[str, Any] | None, wrapper: ECGWrapper) -> None:
    """The counterfactual block's ``target`` names one of the model's classes (or its index) and its ``threshold``
    is one value or one per class, checked before any record is explained (they were first resolved after the first
    record's attributions, faithfulness curves and charts, as a bare ``ValueError``).

    Args:
        options: the counterfactual options (``None``: off, nothing checked).
        wrapper: the model.

    Raises:
        ConfigError: ``counterfactual.target`` (an unknown class name or an index outside the classes) or
            ``counterfactual.threshold`` (a count that is neither 1 nor the number of classes).
    """
    if options is None:
        return
    from ecgfm.explain.counterfactual import class_thresholds

    target = options.get("target")
    if target is not None:
        try:
            wrapper.resolve_target(target, logits=torch.zeros(1, wrapper.num_classes))
        except ValueError as exc:
            raise ConfigError("counterfactual.target", str(exc)) from None
    try:
        class_thresholds(options.get("threshold"), wrapper, wrapper.num_classes)
    except (TypeError, ValueError) as exc:
        raise ConfigError("counterfactual.threshold", f"{exc} (give one threshold, or one per class: "
                                                      f"{wrapper.num_classes})") from None


def _raise_unknown_record(rid: str, all_ids: set[str], source: Any) -> None:
    """Refuse ``record=rid`` when a listed id ends with ``/rid`` (a bare file name of a folder record, which its
    labels CSV accepts but a record id is not): the error names those ids. Otherwise return, so the source's own
    lookup decides (and reports).

    Raises:
        ConfigError: ``record``, naming the ids that end with ``/rid``.
    """
    near = sorted(i for i in all_ids if i.endswith(f"/{rid}"))
    if not near:
        return
    shown = ", ".join(repr(i) for i in near[:5]) + (f" ({len(near)} in all)" if len(near) > 5 else "")
    raise ConfigError("record", f"no record {rid!r} in {source!r} (a record id is its path under the root, without "
                                f"extension); did you mean {'one of ' if len(near) > 1 else ''}{shown}?")


def explain_main(cfg: Any) -> dict[str, Any]:
    """Run an explanation from a Hydra config (``conf/explain.yaml``).

    Raises:
        ecgfm.config.ConfigError: a wrong key or value, named (``+faithfulness.stepz=3``, ``threads=abc``,
            ``faithfulness.output=probability``).
    """
    from omegaconf import OmegaConf

    from ecgfm.recipes import validate_explain_config

    validate_explain_config(cfg)
    _check_names(cfg)
    threads = cfg.get("torch_threads") if cfg.get("torch_threads") is not None else cfg.get("threads")
    if threads:  # torch_threads: the name train / probe / finetune use; it wins over explain's own `threads`
        torch.set_num_threads(int(threads))
    out_dir = Path(cfg.out_dir)
    from ecgfm.data.prepare import check_data_paths

    # a missing data folder named with its config key and paths.data_root, as train / probe / finetune do; only the
    # source explain reads (the first of the data group's: source_from_config), not every corpus of a pool
    if cfg.get("source") is not None:
        check_data_paths(cfg.source, "source")
    else:
        first = _first_source_key(cfg.get("data"))
        if first is not None:
            check_data_paths(OmegaConf.select(cfg, first), first)
    source = source_from_config(cfg.get("data"), cfg.get("source"))
    if cfg.checkpoint is None:
        if getattr(source, "name", "") != "synthetic":
            raise ConfigError("checkpoint", "checkpoint= is required for real data: a classifier artifact (finetune.py "
                                            "saves one per cell) or a torch checkpoint; in a checkout, "
                                            "scripts/train_explain_demo.py trains the PTB-XL demo classifier")
        log.info("no checkpoint given: training a small synthetic demo classifier (%s)", out_dir / "demo_classifier")
        demo = OmegaConf.to_container(cfg.demo, resolve=True)
        _, demo_info = train_synthetic_demo(out_dir / "demo_classifier", **demo)
        checkpoint = out_dir / "demo_classifier"
    else:
        checkpoint, demo_info = Path(cfg.checkpoint), None
    wrapper = load_model(checkpoint, map_location=cfg.device)
    _check_target(cfg.get("target"), wrapper)
    cf = cfg.get("counterfactual")
    cf_opts = None
    if cf is not None and cf.get("enabled", False):
        cf_opts = {k: v for k, v in OmegaConf.to_container(cf, resolve=True).items() if k != "enabled"}
    _check_counterfactual_target(cf_opts, wrapper)   # a misspelt class fails here, not after the first record
    ids = cfg.record
    if ids is None:
        first = 0
        if demo_info is not None:   # the demo classifier trained on the first 80 % of its synthetic records
            n_tr = int(0.8 * int(demo_info.get("n_records", cfg.demo.get("n_records", 360))))
            if n_tr >= len(source.record_ids()):
                # record 0 .. n_tr - 1 of the same generator are the demo's training records: none is left over
                raise ConfigError("record", f"the synthetic source has {len(source.record_ids())} records and the "
                                            f"demo classifier trained on the first {n_tr}: no validation record is "
                                            f"left to explain by default; give record= (or more "
                                            f"data.params.n_records)")
            first = n_tr
            log.info("no record given: explaining %s, a validation record of the demo classifier (records 0-%d "
                     "trained it)", source.record_ids()[first], n_tr - 1)
        ids = [source.record_ids()[first]]
    elif isinstance(ids, (str, int)):
        ids = [ids]
    all_ids = set(source.record_ids())
    records = []
    for rid in ids:
        rid = str(rid)
        if rid not in all_ids and rid.isdigit() and f"{int(rid):05d}" in all_ids:  # PTB-XL ids are zero-padded
            rid = f"{int(rid):05d}"
        if rid not in all_ids:
            _raise_unknown_record(rid, all_ids, source)
        records.append(source.load(rid))
    data = training_data(checkpoint)
    known = training_records(checkpoint, source)
    membership = {r.key: training_membership(data, r, known, source) for r in records}
    report = explain_records(
        wrapper, records, out_dir, methods=list(cfg.methods), target=cfg.get("target"),
        method_options=OmegaConf.to_container(cfg.method_options, resolve=True) if cfg.get("method_options") else None,
        faithfulness=bool(cfg.faithfulness.enabled),
        faithfulness_options={k: v for k, v in OmegaConf.to_container(cfg.faithfulness, resolve=True).items()
                              if k != "enabled"},
        counterfactual=cf_opts, formats=list(cfg.formats), overlay=cfg.overlay,
        extra={"checkpoint": str(checkpoint), "source": repr(source), "training_data": data})
    # one line naming the classifier's training data, and per record whether it was among those records
    print(f"classifier's training data: {data}" if data else
          f"classifier's training data: not recorded in {checkpoint} (provenance.data)")
    for rec in report["records"]:
        rec["training_membership"] = membership.get(f"{rec['source']}/{rec['record_id']}")
        w = rec.get("window")   # the attribution's input: one window of a longer record (the prediction: all)
        where = "whole record" if not w else \
            (f"window {w['start_s']:.2f}-{w['start_s'] + w['length_s']:.2f} s explained (window {w['index'] + 1} of "
             f"{w['n_windows']}, p(window) {rec['target']['window_probability']:.3f}; the prediction is the "
             f"record's, over all {w['n_windows']} windows)")
        if rec.get("padded_fraction"):
            where += f", zero-padded to the model's window ({rec['padded_fraction']:.0%} of its input is padding)"
        member = _MEMBERSHIP_TEXT.get(rec["training_membership"]) if rec["training_membership"] else None
        print(f"record {rec['source']}/{rec['record_id']} (labels {rec['labels']}), {where}: "
              + _prediction_text(rec) + (f"; {member}" if member else ""))
        for key, m in rec["methods"].items():
            leads = m["per_lead"]
            line = (f"  {key:22s} {m['elapsed_s']:.2f} s  " + (f"top leads {leads['top']}" if leads.get("top")
                                                               else leads.get("note", "no lead ranking")))
            f = m.get("faithfulness")
            if f:
                g = f["deletion_aopc_gain"]
                scored = f"{f['output']}, " if f.get("output") else ""   # the score the curves tracked
                line += (f"  deletion AOPC gain vs random ({scored}this record, {g['n']} record) {g['mean']:+.3f}")
                if f.get("n_baseline_above"):
                    line += (f" [its baseline scores above the record ({f['score_baseline']['mean']:.3g} > "
                             f"{f['score_record']['mean']:.3g}): insertion AUC reads backwards]")
            print(line)
    (out_dir / "report.json").write_text(json.dumps(_jsonable(report), indent=2))   # with the membership
    print(f"report: {out_dir / 'report.json'}")
    return report
