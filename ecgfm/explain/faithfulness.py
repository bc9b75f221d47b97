"""Is an explanation faithful to the model, and does it find the ground truth?

Three families of checks, batched on tensors:

1. **Perturbation curves** (Samek et al. 2017, "Evaluating the visualization of what a deep neural network has
   learned", IEEE TNNLS): (lead, time) segments are removed in order of decreasing attribution (``deletion``,
   "most relevant first") or inserted into a blank record (``insertion``), and the target score is tracked.
   ``AOPC = 1/(K+1) sum_k (f(x^(0)) - f(x^(k)))`` (higher = more faithful for deletion); the area under the
   insertion curve (higher = better). Removed samples are replaced by the record's own baseline
   (:func:`ecgfm.explain.attribution.smoothed_copy`, or the two-stage median baseline), never by zeros, so the
   curve measures the loss of waves, not the model's reaction to artificial steps. Every method must beat a random
   attribution (:func:`compare_with_random`).
2. **Model-parameter randomisation** (Adebayo et al. 2018, "Sanity checks for saliency maps", NeurIPS): layers are
   re-initialised from the output towards the input (cascading) or one at a time (independent), the explanation is
   recomputed and its Spearman rank correlation with the original is reported; a faithful method's correlation
   drops.
3. **Localisation** against a ground-truth mask (the synthetic corpus's evidence, or wave delineations): relevance
   mass accuracy (fraction of positive / absolute attribution inside the mask; Arras, Osman & Samek 2022, "CLEVR-XAI",
   Information Fusion), relevance rank accuracy (same paper), pointing game (Zhang et al. 2018, IJCV) and the
   AUROC of the attribution magnitude as a detector of mask samples.

Why not quantus: it is not a dependency of ecgfm, it works per sample on numpy arrays with image-oriented
perturbation defaults (patches, zero/black baselines), and these definitions are each a few tensor lines: here
they run batched on the model's device with ECG-appropriate baselines and (lead, time) segments.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ecgfm.explain.attribution import (Attribution, Explainer, canonical_method, make_baseline, present_rows,
                                      random_attribution, record_seed, recorded_samples)
from ecgfm.explain.wrapper import ECGWrapper
from ecgfm.evaluate.metrics import bootstrap_mean


def mean_ci(values: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of per-record values with a percentile bootstrap confidence interval over records.

    Returns:
        ``{"mean", "lo", "hi", "n"}`` (NaNs are dropped and ``n`` counts the values kept; ``lo`` / ``hi`` are None
        for fewer than two values: one record has no interval, and ``lo == hi == mean`` would read as certainty).
    """
    v = torch.as_tensor(values).detach().cpu().double().numpy()
    r = bootstrap_mean(v, n_boot=n_boot, seed=seed, ci=level)   # the project's one bootstrap (evaluate/metrics.py)
    if r["n"] < 2:
        return {"mean": r["value"], "lo": None, "hi": None, "n": r["n"]}
    return {"mean": r["value"], "lo": r["ci_low"], "hi": r["ci_high"], "n": r["n"]}


# ---------------------------------------------------------------------------------------------------------------
# Perturbation curves


def _values(attribution: Attribution | Tensor) -> Tensor:
    return attribution.values if isinstance(attribution, Attribution) else attribution


def segment_scores(values: Tensor, segment: int, order: str = "abs") -> Tensor:
    """Sum attribution over non-overlapping time segments of each lead: ``(B, L, T) -> (B, L, S)``,
    ``S = ceil(T / segment)``. ``order``: ``"abs"`` (magnitude) or ``"signed"`` (positive evidence first)."""
    if order not in ("abs", "signed"):
        raise ValueError(f"order must be 'abs' or 'signed', got {order!r}")
    v = values.abs() if order == "abs" else values
    b, n_l, n_t = v.shape
    n_s = -(-n_t // segment)
    pad = n_s * segment - n_t
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    return v.reshape(b, n_l, n_s, segment).sum(-1)


def _target_score(wrapper: ECGWrapper, x: Tensor, target: Tensor, output: str) -> Tensor:
    out = wrapper(x)
    if output == "proba":
        out = wrapper.postprocess_fn(out)
    elif output != "logit":
        raise ValueError(f"output must be 'proba' or 'logit', got {output!r}")
    return out.gather(1, target[:, None])[:, 0]


#: the scores a perturbation curve can track (``output=`` of :func:`perturbation_curve`; explain.py's
#: ``faithfulness.output``): the explained class's logit, or its probability (the wrapper's postprocessing).
SCORED_OUTPUTS: tuple[str, ...] = ("logit", "proba")


def scored_output(attribution: Attribution | Tensor, output: str | None = None) -> str:
    """The score a perturbation curve tracks: ``output`` when given, else the output the attribution explains
    (``attribution.options["output"]``: :meth:`~ecgfm.explain.attribution.Explainer.explain` records ``"logit"``
    or ``"proba"``), else ``"proba"`` (a bare tensor, or an attribution that does not say).

    Scoring the probability of a logit explanation mixes in the other classes: under softmax a sample that raises
    the explained logit can lower its probability (when it raises another logit more), so a correct logit map
    scored below random (deletion AOPC gain -0.19 on the probability, +0.45 on the logit it explains).

    Raises:
        ValueError: ``output`` is neither ``"logit"`` nor ``"proba"``.
    """
    if output is None and isinstance(attribution, Attribution):
        output = attribution.options.get("output")
        if output not in ("logit", "proba"):
            output = None
    output = "proba" if output is None else output
    if output not in ("logit", "proba"):
        raise ValueError(f"output must be 'proba' or 'logit', got {output!r}")
    return output


def perturbation_curve(wrapper: ECGWrapper, inputs: Tensor, attribution: Attribution | Tensor,
                       target: Tensor | None = None, mode: str = "deletion", segment_s: float = 0.1,
                       steps: int = 20, baseline: Any = "smoothed", order: str = "abs", output: str | None = None,
                       recorded: Any = None) -> dict[str, Tensor]:
    """Deletion or insertion curve of the target score over (lead, time) segments.

    Args:
        wrapper: the model.
        inputs: ``(B, L, T)`` model-space inputs.
        attribution: the explanation (its ``target`` is used when ``target`` is None) or ``(B, L, T)`` values.
        target: ``(B,)`` class indices; default: the attribution's target, else the predicted class.
        mode: ``"deletion"`` (replace the most relevant segments first) or ``"insertion"`` (start from the
            baseline and put back the most relevant segments first).
        segment_s: segment length in seconds (one lead x ``segment_s``).
        steps: ``K``; the curve has ``K + 1`` points at fractions ``0, 1/K, ..., 1`` of the segments.
        baseline: replacement (see :func:`ecgfm.explain.attribution.make_baseline`; default the record's own
            smoothed copy).
        order: ``"abs"`` (attribution magnitude) or ``"signed"``.
        output: ``"proba"`` (post-processed) or ``"logit"``; None (default): the output the attribution explains
            (:func:`scored_output`: its ``options["output"]``, ``"logit"`` for :meth:`Explainer.explain`'s default),
            ``"proba"`` for bare values.
        recorded: the recorded samples (:func:`~ecgfm.explain.attribution.recorded_samples`: ``(T,)``,
            ``(B, T)`` or ``(B, L, T)`` bool, e.g. ``t < n_real`` for a record zero-padded to the model's window);
            default every sample of a present lead. Segments without a recorded sample are ranked last and left
            out of the budget, and unrecorded samples are never replaced, as for absent leads.

    Returns:
        ``{"fractions": (K+1,), "curve": (B, K+1), "aopc": (B,), "auc": (B,)}``. ``aopc`` is Samek's
        ``mean_k (f(x^(0)) - f(x^(k)))`` (meaningful for deletion), ``auc`` the trapezoidal area under the
        curve over fractions in [0, 1] (meaningful for insertion: higher is better).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    output = scored_output(attribution, output)
    with wrapper.evaluating():
        return _perturbation_curve(wrapper, inputs, attribution, target, mode, segment_s, steps, baseline, order,
                                   output, recorded)


def _perturbation_curve(wrapper: ECGWrapper, inputs: Tensor, attribution: Attribution | Tensor,
                        target: Tensor | None, mode: str, segment_s: float, steps: int, baseline: Any, order: str,
                        output: str, recorded: Any = None) -> dict[str, Tensor]:
    values = _values(attribution).to(inputs.device)
    if values.shape != inputs.shape:
        raise ValueError(f"attribution {tuple(values.shape)} does not match inputs {tuple(inputs.shape)}")
    x = inputs.detach()
    if target is None and isinstance(attribution, Attribution) and attribution.target is not None:
        target = attribution.target
    target = wrapper.resolve_target(target, x=x).to(x.device)
    b, n_l, n_t = x.shape
    seg = max(1, int(round(segment_s * wrapper.fs)))
    scores = segment_scores(values, seg, order)                           # (B, L, S)
    # segments of absent (zero-filled) leads are not part of the record: ranked last and never counted in the
    # budget, for the method and the random reference alike (deleting a zero row changes nothing, so a budget
    # share spent there made any map that avoids absent leads look better than random). The same holds for the
    # zero padding of a record shorter than the window: a segment counts when it holds a recorded sample.
    keep = recorded_samples(x, recorded)                                  # (B, L, T)
    present = segment_scores(keep.float(), seg, "abs").gt(0).reshape(b, -1)
    scores = scores.reshape(b, -1).masked_fill(~present, float("-inf"))
    n_seg = scores.shape[1]
    n_valid = present.sum(1).clamp_min(1)                                 # (B,)
    # rank[i, j] = position of segment j in decreasing-score order. Ties are broken in a random order drawn from
    # the record (not lead-major: an all-zero map, or the zero tail of a Grad-CAM map after its ReLU, deleted all
    # of lead I first and scored +0.014 or -0.005 against random depending only on which lead the model reads)
    shuffle = torch.stack([torch.randperm(n_seg, generator=torch.Generator().manual_seed(record_seed(x[i], 1)))
                           for i in range(b)]).to(x.device)                   # (B, n_seg) random tie order
    by_score = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(scores, dtype=torch.long)
    ranks.scatter_(1, shuffle.gather(1, by_score), torch.arange(n_seg, device=x.device).expand(b, -1).contiguous())
    ranks = ranks.reshape(b, n_l, -1).repeat_interleave(seg, dim=2)[:, :, :n_t]   # (B, L, T)
    base = make_baseline(baseline, x, wrapper.fs).expand_as(x)
    # absent leads stay as they are (zero rows) at every step, whatever the baseline: they are never in the budget,
    # and an insertion curve must end at f(x)
    base = torch.where(keep, base, x)
    fractions = torch.linspace(0, 1, steps + 1)
    curve = []
    with torch.inference_mode():
        for f in fractions.tolist():
            k = torch.round(f * n_valid.double()).long().to(x.device)    # (B,) segments of present leads
            removed = ranks < k[:, None, None]
            if mode == "deletion":
                xk = torch.where(removed, base, x)
            else:
                xk = torch.where(removed, x, base)
            curve.append(_target_score(wrapper, xk, target, output))
    curve_t = torch.stack(curve, 1).clone().float()                       # (B, K+1)
    aopc = (curve_t[:, :1] - curve_t).mean(1)
    auc = torch.trapezoid(curve_t, fractions.to(curve_t.device), dim=1)
    return {"fractions": fractions, "curve": curve_t, "aopc": aopc, "auc": auc}


def compare_with_random(wrapper: ECGWrapper, inputs: Tensor, attribution: Attribution | Tensor,
                        target: Tensor | None = None, n_random: int = 3, seed: int = 0,
                        **curve_kwargs: Any) -> dict[str, Any]:
    """Deletion and insertion of an attribution against random attributions on the same records.

    Args:
        wrapper: the model.
        inputs: ``(B, L, T)`` model-space inputs.
        attribution: the explanation or ``(B, L, T)`` values.
        target: ``(B,)`` class indices (default: the attribution's).
        n_random: random attributions to compare with.
        seed: seed of the first random attribution.
        **curve_kwargs: :func:`perturbation_curve` options; ``output`` (default: the output the attribution
            explains, :func:`scored_output`) is the same for the method and the random references.

    Returns:
        ``{"deletion_aopc", "random_deletion_aopc", "deletion_aopc_gain", "insertion_auc",
        "random_insertion_auc", "insertion_auc_gain"}`` each a :func:`mean_ci` dict over records (gains are
        paired per record: method minus the mean of ``n_random`` random attributions; > 0 beats random),
        ``"score_record"`` / ``"score_baseline"`` (:func:`mean_ci` of the tracked score of the record and of the
        record with every segment replaced by the baseline: the two ends of the curves), ``"n_baseline_above"``
        (records whose baseline scores above the record itself: for them insertion starts above where it ends, so
        a larger insertion AUC is no longer better, and deletion's drop can be negative for any map),
        ``"output"`` (the score tracked: ``"logit"`` or ``"proba"``), plus ``"curves"`` with the raw tensors.
    """
    if target is None and isinstance(attribution, Attribution):
        target = attribution.target
    # resolved once: the random references are bare tensors, which would default to the probability
    curve_kwargs["output"] = scored_output(attribution, curve_kwargs.get("output"))
    res: dict[str, Any] = {"curves": {}, "output": curve_kwargs["output"]}
    for mode, key in (("deletion", "aopc"), ("insertion", "auc")):
        own = perturbation_curve(wrapper, inputs, attribution, target, mode=mode, **curve_kwargs)
        rnd = [perturbation_curve(wrapper, inputs, random_attribution(inputs, seed + i), target, mode=mode,
                                  **curve_kwargs)[key] for i in range(n_random)]
        rnd_mean = torch.stack(rnd).mean(0)
        res[f"{mode}_{key}"] = mean_ci(own[key])
        res[f"random_{mode}_{key}"] = mean_ci(rnd_mean)
        res[f"{mode}_{key}_gain"] = mean_ci(own[key] - rnd_mean)
        res["curves"][mode] = {"method": own["curve"], "random": rnd_mean, "fractions": own["fractions"]}
    ends = res["curves"]["deletion"]["method"]                             # (B, K+1): f(x) ... f(baseline)
    res["score_record"], res["score_baseline"] = mean_ci(ends[:, 0]), mean_ci(ends[:, -1])
    res["n_baseline_above"] = int((ends[:, -1] > ends[:, 0]).sum())
    return res


# ---------------------------------------------------------------------------------------------------------------
# Model-parameter randomisation


def spearman(a: Tensor, b: Tensor, keep: Tensor | None = None) -> Tensor:
    """Per-sample Spearman rank correlation of two ``(B, ...)`` tensors: ``(B,)``; NaN for a constant map.

    Ties get their average rank (:func:`scipy.stats.rankdata`), as :func:`scipy.stats.spearmanr` does: ReLU'd
    maps (Grad-CAM) are mostly exact zeros, and ranks broken by position there correlated two unrelated maps.
    ``keep`` (bool, shaped like ``a``) restricts each sample to its kept entries: the samples of absent leads, 0
    in every map, are shared ties that made two unrelated maps of a one-lead record correlate at ~1.
    """
    from scipy.stats import rankdata

    fa = a.reshape(a.shape[0], -1).detach().double().cpu().numpy()
    fb = b.reshape(b.shape[0], -1).detach().double().cpu().numpy()
    fk = None if keep is None else keep.reshape(keep.shape[0], -1).detach().bool().cpu().numpy()
    out = []
    for i in range(fa.shape[0]):
        x, y = (fa[i], fb[i]) if fk is None else (fa[i][fk[i]], fb[i][fk[i]])
        if x.size == 0:
            out.append(float("nan"))
            continue
        rx, ry = rankdata(x), rankdata(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        den = float(np.linalg.norm(rx) * np.linalg.norm(ry))
        out.append(float((rx * ry).sum() / den) if den > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float32, device=a.device)


def parametrised_layers(model: nn.Module) -> list[str]:
    """Names of modules holding parameters directly, from the output side to the input side (reverse
    registration order, the order of Adebayo et al.'s cascading randomisation)."""
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def _randomise(module: nn.Module, generator_seed: int) -> None:
    """Re-initialise a module's own parameters: its ``reset_parameters`` when it has one that draws random
    values (conv / linear), else N(0, 0.02) for every parameter (norm layers, embeddings, tokens)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                centre = 1.0 if name == "weight" and p.ndim == 1 else 0.0  # norm-layer scales around 1
                p.copy_(centre + 0.02 * torch.randn(p.shape))


def randomisation_check(explainer: Explainer, inputs: Tensor, method: str, target: Any = None,
                        mode: str = "cascading", layers: Sequence[str] | None = None, max_layers: int | None = None,
                        seed: int = 0, method_options: dict[str, Any] | None = None, recorded: Any = None,
                        **options: Any) -> dict[str, Any]:
    """Adebayo et al. (2018) model-parameter randomisation test.

    Args:
        explainer: explainer of the trained model (left untouched: randomisation happens on a deep copy).
        inputs: ``(B, L, T)``.
        method: attribution method (see :data:`ecgfm.explain.attribution.METHODS`).
        target: explained classes (default: the trained model's predictions, kept fixed for every randomised
            model).
        mode: ``"cascading"`` (randomise layers cumulatively from the output side) or ``"independent"`` (one
            layer at a time).
        layers: layer names to randomise (default :func:`parametrised_layers`, output side first).
        max_layers: randomise only the first ``max_layers`` of them.
        seed: seed of the re-initialisation and of stochastic methods.
        method_options: method options as a mapping (also those named like an argument here, e.g. integrated
            gradients' ``method``).
        recorded: the recorded samples (``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool, e.g. ``t < n_real`` for a
            record zero-padded to the model's window; :func:`~ecgfm.explain.attribution.recorded_samples`): only
            these are ranked. Default: every sample of a present lead. Input x gradient and IG from a zero
            baseline are exactly 0 on the padding in every map; those shared ties made the correlations of a 3 s
            record in a 10 s window read 0.98 where its recorded samples gave 0.5.
        **options: more method options (a method with a ``recorded`` option, e.g. SmoothGrad, integrated
            gradients, DeepLift, GradientSHAP, occlusion, lead / wave ablation, gets ``recorded`` unless its options
            set one).

    Returns:
        ``{"layers": [...], "spearman_abs": (n_layers, B), "spearman_signed": (n_layers, B), "summary": [{"layer",
        "spearman_abs": mean_ci, "spearman_signed": mean_ci}, ...]}``. A faithful method's correlations fall
        well below 1 (Adebayo et al. call a map that keeps a high rank correlation "independent of the model").
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    wrapper = explainer.wrapper
    options = {**(method_options or {}), **options}
    if recorded is not None and "recorded" in _explain_option_names(canonical_method(method)):
        options.setdefault("recorded", recorded)   # noise / baselines confined to the same recorded samples
    torch.manual_seed(seed)
    original = explainer.explain(inputs, target=target, method=method, **options)
    target_t = original.target
    layers = list(layers) if layers is not None else parametrised_layers(wrapper.model)
    if max_layers is not None:
        layers = layers[:max_layers]
    if not layers:
        raise ValueError("the model has no parametrised layer to randomise")
    s_abs, s_signed = [], []
    present = present_leads_of(original)
    keep = None if present is None else present[:, :, None].expand_as(original.values)   # absent leads: no ranks
    if recorded is not None:   # nor the zero padding of a short record
        rec = recorded_samples(original.inputs, recorded).to(original.values.device)
        keep = rec if keep is None else keep & rec
    copy_w = copy.deepcopy(wrapper)
    for i, name in enumerate(layers):
        if mode == "independent":
            copy_w = copy.deepcopy(wrapper)
        _randomise(copy_w.layer(name), seed + 1 + i)
        torch.manual_seed(seed)
        att = Explainer(copy_w).explain(original.inputs, target=target_t, method=method, **options)
        s_abs.append(spearman(original.values.abs(), att.values.abs(), keep))
        s_signed.append(spearman(original.values, att.values, keep))
    sa, ss = torch.stack(s_abs), torch.stack(s_signed)
    return {"mode": mode, "method": original.method, "layers": layers, "spearman_abs": sa, "spearman_signed": ss,
            "summary": [{"layer": n, "spearman_abs": mean_ci(sa[i]), "spearman_signed": mean_ci(ss[i])}
                        for i, n in enumerate(layers)]}


# ---------------------------------------------------------------------------------------------------------------
# Localisation


def present_leads_of(attribution: Attribution | Tensor) -> Tensor | None:
    """``(B, L)`` bool: the leads of an :class:`Attribution`'s inputs that are not all zero (absent leads are
    zero-filled); None for a bare tensor (no inputs to tell)."""
    if isinstance(attribution, Attribution):
        return present_rows(attribution.inputs).to(attribution.values.device)
    return None


def localisation(attribution: Attribution | Tensor, mask: Any, recorded: Any = None) -> dict[str, Tensor]:
    """Agreement of an attribution with a ground-truth mask, per record.

    Args:
        attribution: ``(B, L, T)`` values or an :class:`Attribution`.
        mask: ``(B, L, T)`` bool ground truth (or ``(B, T)``, broadcast over leads).
        recorded: the recorded samples (``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool, e.g. ``t < n_real`` for a
            record zero-padded to the model's window); only these are scored. Default: every sample (of the
            present leads of an :class:`Attribution`). A map near 0 on padding would otherwise get free correct
            negatives there (a noise map scored AUROC 0.83 on a 4 s record in a 10 s window, 0.52 on its 4 s).

    Returns:
        ``(B,)`` tensors: ``mass_positive`` (share of positive attribution inside the mask: relevance mass
        accuracy; NaN for a map without positive attribution), ``mass_abs`` (same with |attribution|; NaN for an
        all-zero map), ``rank_accuracy`` (share of the ``|mask|`` highest
        |attribution| samples inside the mask; samples tied at the cut share it), ``pointing_game`` (the share of
        the samples at the largest |attribution| that fall inside the mask: 1 for a single maximum inside; NaN for
        an all-zero map), ``auroc`` (|attribution| as a detector of mask samples; NaN when the mask is empty or
        full), ``mask_fraction`` (the share of samples in the mask: what a random attribution scores on the mass
        and rank measures, and the AUROC of chance is 0.5). Samples of absent (all-zero, zero-filled) leads of an
        :class:`Attribution`'s inputs, and samples ``recorded`` leaves out, are left out of every score.
    """
    from sklearn.metrics import roc_auc_score

    v = _values(attribution).detach().float()
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask, device=v.device).bool()
    if m.ndim == 2:
        m = m[:, None, :].expand_as(v)
    if m.shape != v.shape:
        raise ValueError(f"mask {tuple(m.shape)} does not match attribution {tuple(v.shape)}")
    b = v.shape[0]
    # samples of absent (zero-filled) leads are not part of the record: neither candidates for the top of the map
    # nor part of the chance level
    present = present_leads_of(attribution)
    keep = present[:, :, None].expand_as(v) if present is not None else torch.ones_like(m)
    if recorded is not None:   # the zero padding of a short record is not part of it either
        keep = keep & recorded_samples(torch.ones_like(v), recorded).to(keep.device)
    keep = keep.reshape(b, -1)
    vf, mf = v.reshape(b, -1), (m.reshape(b, -1) & keep).float()
    pos, mag = vf.clamp_min(0) * keep, vf.abs() * keep
    # a map without positive (or any) attribution has no mass to place: NaN, as the pointing game gives it
    mass_pos = torch.where(pos.sum(1) > 0, (pos * mf).sum(1) / pos.sum(1).clamp_min(1e-12), float("nan"))
    mass_abs = torch.where(mag.sum(1) > 0, (mag * mf).sum(1) / mag.sum(1).clamp_min(1e-12), float("nan"))
    rank_acc, pointing, aurocs, frac = [], [], [], []
    for i in range(b):
        a, inside = mag[i][keep[i]].cpu().numpy(), mf[i][keep[i]].cpu().numpy().astype(bool)
        frac.append(float(inside.mean()) if inside.size else float("nan"))
        k = int(inside.sum())
        top = float(a.max()) if a.size else 0.0
        if top <= 0 or k == 0:   # an all-zero map points nowhere; an empty mask has nothing to find
            pointing.append(float("nan"))
            rank_acc.append(float("nan"))
        else:
            # ties share the credit: the samples tied at the maximum, and at the k-th value, count in proportion
            at_max = a == top
            pointing.append(float(inside[at_max].mean()))
            t = np.partition(a, a.size - k)[a.size - k]
            above, tied = a > t, a == t
            rank_acc.append(float((inside & above).sum() + (inside & tied).sum() * (k - above.sum()) / tied.sum())
                            / k)
        aurocs.append(float("nan") if inside.all() or not inside.any() else float(roc_auc_score(inside, a)))
    empty = mf.sum(1) == 0   # nothing to find (an empty mask, or a record without present leads): not a score of 0
    mass_pos = mass_pos.masked_fill(empty, float("nan"))
    mass_abs = mass_abs.masked_fill(empty, float("nan"))
    return {"mass_positive": mass_pos, "mass_abs": mass_abs, "rank_accuracy": torch.tensor(rank_acc),
            "pointing_game": torch.tensor(pointing), "auroc": torch.tensor(aurocs), "mask_fraction": torch.tensor(frac)}


def faithfulness_report(explainer: Explainer, attribution: Attribution, mask: Any = None,
                        randomisation: bool = False, n_random: int = 3, seed: int = 0, attach: bool = True,
                        randomisation_layers: int | None = 3, recorded: Any = None,
                        **curve_kwargs: Any) -> dict[str, Any]:
    """All scores for one attribution, as JSON-able :func:`mean_ci` summaries over the records.

    Args:
        explainer: the explainer that produced ``attribution``.
        attribution: the explanation.
        mask: optional ground truth ``(B, L, T)`` for :func:`localisation`.
        randomisation: also run :func:`randomisation_check` (cascading, first ``randomisation_layers``).
        n_random: random attributions for :func:`compare_with_random`.
        seed: seed for the random attributions and the randomisation.
        attach: store the result in ``attribution.scores``.
        randomisation_layers: layers randomised by the randomisation check.
        recorded: the recorded samples (``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool; default every sample of a
            present lead): the zero padding of a record shorter than the model's window is left out of the
            perturbation budget, of the localisation scores and of the randomisation check's rank correlations
            (:func:`perturbation_curve`, :func:`localisation`, :func:`randomisation_check`).
        **curve_kwargs: :func:`perturbation_curve` options (``segment_s``, ``steps``, ``baseline``, ``output``:
            default the output the attribution explains...).

    Returns:
        ``{"deletion_aopc": {...}, "random_deletion_aopc": {...}, ..., "output": "logit" | "proba" (the score the
        curves track), "localisation": {...}, "randomisation": [...]}``.
    """
    if attribution.target is None and "objective" in attribution.options:
        raise ValueError("faithfulness_report scores class explanations; this attribution explains an encoder "
                         f"embedding ({attribution.options['objective']}), which has no class score to delete from")
    out: dict[str, Any] = {}
    if recorded is not None:
        curve_kwargs["recorded"] = recorded
    cmp = compare_with_random(explainer.wrapper, attribution.inputs, attribution, attribution.target,
                              n_random=n_random, seed=seed, **curve_kwargs)
    out.update({k: v for k, v in cmp.items() if k != "curves"})
    if mask is not None:
        loc = localisation(attribution, mask, recorded=recorded)
        out["localisation"] = {k: mean_ci(v) for k, v in loc.items()}
    if randomisation:
        # re-explain with the options as passed (a tensor baseline included), else those recorded as used
        opts = dict(attribution.call_options) or {
            k: v for k, v in attribution.options.items() if k in _explain_option_names(attribution.method)
            and not (isinstance(v, str) and v.startswith("tensor("))}
        rc = randomisation_check(explainer, attribution.inputs, attribution.method, target=attribution.target,
                                 max_layers=randomisation_layers, seed=seed, method_options=opts,
                                 recorded=recorded)
        out["randomisation"] = rc["summary"]
    if attach:
        attribution.scores.update(out)
    return out


def _explain_option_names(method: str) -> set[str]:
    import inspect

    from ecgfm.explain.attribution import METHODS

    names = set(inspect.signature(METHODS[method]).parameters) - {"job"}
    return names | {"output"}
