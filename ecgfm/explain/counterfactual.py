"""Gradient-based counterfactual ECGs: the smallest smooth change that makes the model predict a target class.

For inputs ``x (B, L, T)`` and a target class ``c``, an additive change ``delta`` is optimised with Adam to
minimise (Wachter, Mittelstadt & Russell 2018, "Counterfactual explanations without opening the black box",
with the temporal-smoothness term of time-series counterfactuals)::

    loss(delta) = CE(f(x + delta), c)                                  # (BCE on logit c for multi-label models)
                + lambda_prox   * sum |delta| / fs  (or sum delta^2 / fs)  # proximity: change little (per second)
                + lambda_smooth * sum |delta[t+1] - delta[t]|          # total variation: no spikes / noise
                + lambda_plaus  * (R(x + delta) - R(x))                # optional plausibility prior

**Record ends.** A network with zero padding sees its first and last samples through a truncated receptive
field, so an unconstrained search finds the cheapest flip at the ends (a step in the first 0.3 s). By default the
change is therefore multiplied by an edge taper (:func:`edge_taper`): zero in the first and last ``edge_s``
seconds, rising smoothly (raised cosine) over the next ``ramp_s``; and the total variation is taken on the change
padded with zeros, so a change that does reach an end pays for its jump there.

The proximity and smoothness terms are sums over leads and time (an integral over time for the proximity), not
means: a mean divides their gradient by the number of samples (12,000 for 10 s at 100 Hz), which leaves it far
below the classification gradient whatever the weight, and the optimiser then ignores them.

where ``R`` is the masked-patch reconstruction error of a pretrained MAE (:class:`MAEPrior`, wrapping an
:class:`ecgfm.methods.mae.MAEModule`): an ECG the MAE cannot reconstruct from its visible patches is unlike the
ECGs it was pretrained on. Each input stops as soon as its prediction flips to ``c`` (argmax for softmax models,
probability of ``c`` at or above its threshold for sigmoid ones: the classifier's own, else 0.5); its counterfactual
is the first flipped iterate. Everything is batched and written here: no generator or code is downloaded (unlike
ExECG's counterfactual, which fetches and executes generator code).

The result (:class:`Counterfactual`) reports validity, L1 / L2 distances (model input units, i.e. after the
model's normalisation; means over the record's present leads and recorded samples), and which leads and which
P / QRS / T segments (:mod:`ecgfm.explain.waves`) changed most.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm.explain import waves as waves_mod
from ecgfm.explain.attribution import present_rows, recorded_samples
from ecgfm.explain.wrapper import ECGWrapper
from ecgfm.recipes import check_counterfactual_options

PROXIMITY = ("l1", "l2")


class MAEPrior(nn.Module):
    """Plausibility prior: per-input masked-patch reconstruction error of a pretrained MAE.

    A record's absent leads (``lead_mask`` false; by default its all-zero rows, ecgfm's convention) are masked and
    encoded as the MAE's training step does (:meth:`ecgfm.methods.mae.MAEModule.encode_lead_sets`): with
    ``lead_aware`` (default) only the present leads' visible patches and SEP tokens reach the encoder, otherwise the
    zero-filled leads are encoded as in its pretraining; either way only hidden patches of present leads count in
    the error (the training loss's patches), so an absent lead's zeros never score as (im)plausible signal.

    Args:
        mae: an :class:`ecgfm.methods.mae.MAEModule` (its backbone must take the classifier's input space:
            same leads, rate, length and normalisation).
        n_masks: number of fixed random masks averaged (fixed so the prior is a deterministic, differentiable
            function of the input).
        seed: seed of the masks.
    """

    def __init__(self, mae: nn.Module, n_masks: int = 4, seed: int = 0):
        super().__init__()
        for attr in ("encode_lead_sets", "forward_decoder", "patchify"):
            if not callable(getattr(mae, attr, None)):
                raise ValueError(f"MAEPrior needs an ecgfm MAEModule (missing {attr}); got {type(mae).__name__}")
        if n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {n_masks}")
        self.mae = mae.eval()
        self.n_masks = int(n_masks)
        self.seed = int(seed)
        for p in self.mae.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor, lead_mask: Tensor | None = None, recorded: Any = None) -> Tensor:
        """Mean squared reconstruction error over the hidden patches of each input's present leads (normalised
        patches when the MAE was trained with ``norm_pix_loss``) that hold a recorded sample.

        Args:
            x: ``(B, L, T)`` model-space inputs.
            lead_mask: optional ``(B, L)`` bool, false = absent lead (not encoded with a lead-aware MAE, never
                counted). None: the rows of ``x`` that are not all zero (:func:`present_rows`).
            recorded: optional recorded samples (``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool,
                :func:`~ecgfm.explain.attribution.recorded_samples`): patches after an input's last recorded sample
                (the zero padding of a short record) are not counted, as in the MAE's training loss
                (:meth:`~ecgfm.methods.mae.MAEModule.counted_patches`). None: every sample.

        Returns:
            ``(B,)`` prior values.
        """
        from ecgfm.losses.mae import masked_patch_mse

        norm = bool(getattr(self.mae, "norm_pix_loss", True))
        present = present_rows(x) if lead_mask is None else lead_mask.to(device=x.device, dtype=torch.bool)
        if present.shape != x.shape[:2]:
            raise ValueError(f"lead_mask must have shape {tuple(x.shape[:2])}, got {tuple(present.shape)}")
        n_rec = None
        if recorded is not None:   # each input's last recorded sample + 1 (the padding follows it)
            rec = recorded_samples(torch.ones_like(x), recorded)                          # (B, L, T)
            t_idx = torch.arange(1, x.shape[-1] + 1, device=x.device)
            n_rec = torch.where(rec.any(1), t_idx, 0).amax(-1)                            # (B,)
        per_input = []
        # one input at a time: the masks are drawn per batch, so in a batch an input's mask would depend on its
        # position and the batch size; alone, each input gets masks k = 0..n_masks-1 wherever it sits
        for i in range(x.shape[0]):
            xi, mi = x[i:i + 1], present[i:i + 1]                                   # (1, L, T), (1, L)
            target = self.mae.patchify(xi)                                          # (1, L, N, P)
            err = xi.new_zeros(())
            for k in range(self.n_masks):
                gen = torch.Generator(device=x.device).manual_seed(self.seed + k)
                # one record is one lead set: encoded over its present leads as in the MAE's training step
                ((*_, latent, mask, ids_restore),) = self.mae.encode_lead_sets(xi, mi, gen)
                pred = self.mae.forward_decoder(latent, ids_restore, mask.shape[2])  # (1, L, N, P)
                counted = self.mae.counted_patches(                                 # (L, N) hidden, present,
                    mask, mi, None if n_rec is None else n_rec[i:i + 1])[0]          # with a recorded sample
                err = err + masked_patch_mse(pred[0], target[0], counted, norm_pix=norm)
            per_input.append(err / self.n_masks)
        return torch.stack(per_input)


def _prior_values(prior: nn.Module, x: Tensor, present: Tensor, recorded: Any = None) -> Tensor:
    """``prior(x)`` with the records' lead mask ``present (B, L)`` and recorded samples for a prior that takes them
    (:class:`MAEPrior`), so the original and the changed inputs are scored over the same present leads and recorded
    samples."""
    import inspect

    try:
        params = inspect.signature(prior.forward if isinstance(prior, nn.Module) else prior).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {}
    if "lead_mask" in params:
        kwargs["lead_mask"] = present
    if "recorded" in params and recorded is not None:
        kwargs["recorded"] = recorded
    return prior(x, **kwargs)


def total_variation(delta: Tensor) -> Tensor:
    """``(B, L, T) -> (B,)`` total variation along time, summed over leads."""
    return (delta[..., 1:] - delta[..., :-1]).abs().flatten(1).sum(1)


def edge_taper(n_t: int, fs: float, edge_s: float, ramp_s: float) -> Tensor:
    """``(T,)`` weights of the change along time: 0 in the first and last ``edge_s`` seconds, a raised-cosine
    ramp over the next ``ramp_s`` seconds, 1 in between. Each margin is capped at a quarter (edge) and an eighth
    (ramp) of the record, so short records keep a free middle. ``edge_s = ramp_s = 0``: all ones."""
    w = torch.ones(n_t)
    edge = min(int(round(edge_s * fs)), n_t // 4)
    ramp = min(int(round(ramp_s * fs)), n_t // 8)
    if edge == 0 and ramp == 0:
        return w
    rise = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(ramp, dtype=torch.float32) + 1) / (ramp + 1))
    head = torch.cat([torch.zeros(edge), rise])
    w[:len(head)] = head
    w[n_t - len(head):] = head.flip(0)
    return w


def class_thresholds(threshold: float | Sequence[float] | Tensor | None, wrapper: ECGWrapper | None,
                     n_classes: int) -> Tensor:
    """``(C,)`` per-class probability a multi-label prediction needs: ``threshold`` (one for all, or one per class),
    else the classifier's own (chosen on validation, ``wrapper.thresholds``), else 0.5."""
    if threshold is None:
        threshold = getattr(wrapper, "thresholds", None)
    if threshold is None:
        threshold = 0.5
    t = torch.as_tensor(threshold, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(n_classes)
    if t.numel() != n_classes:
        raise ValueError(f"{t.numel()} thresholds for {n_classes} classes")
    return t.clone()


def _is_valid(proba: Tensor, target: Tensor, multilabel: bool, threshold: Tensor | float) -> Tensor:
    if multilabel:
        thr = torch.as_tensor(threshold, dtype=proba.dtype, device=proba.device).flatten()
        thr = thr.expand(proba.shape[1]) if thr.numel() == 1 else thr
        return proba.gather(1, target[:, None])[:, 0] >= thr[target]   # predicted as Classifier.predict decides
    return proba.argmax(1) == target


@dataclass
class Counterfactual:
    """Counterfactuals of a batch.

    Attributes:
        original: ``(B, L, T)`` inputs (model space).
        counterfactual: ``(B, L, T)`` counterfactual inputs.
        target: ``(B,)`` requested classes.
        original_proba: ``(B, C)`` model probabilities on the originals.
        counterfactual_proba: ``(B, C)`` on the counterfactuals.
        valid: ``(B,)`` bool, the prediction is the target on the counterfactual.
        already_target: ``(B,)`` bool, the original was already predicted as the target (its "counterfactual"
            changes nothing: not an explanation; :func:`default_target` avoids it).
        steps: ``(B,)`` optimisation steps taken before the returned counterfactual: with early stopping, the
            index of its first flipped iterate (0: the input itself was already the target); otherwise (or not
            flipped within the budget) ``max_steps``, the counterfactual being the last iterate.
        l1: ``(B,)`` mean |delta| over the record's recorded signal: its present leads and recorded samples (the
            zero-filled leads and the zero padding the change never touches are left out, so the same change reads
            the same on a one-lead or a short record).
        l2: ``(B,)`` root mean square of delta over the same samples.
        per_lead: ``(B, L)`` share of the total |delta| in each lead.
        per_wave: ``{"P", "QRS", "T", "other"}`` -> ``(B,)`` share of |delta| in each wave type.
        segments: per input, the most-changed (lead, wave) pairs, largest first (``{"lead", "wave", "share"}``).
        plausibility: ``{"original": (B,), "counterfactual": (B,)}`` MAE reconstruction errors, when a prior was
            used.
        lead_names: lead of each row.
        fs: sampling rate.
        class_names: names of the classes (when the wrapper has them).
        options: the optimisation settings.
        history: mean loss every 10 steps.
        elapsed_s: wall time.
        multilabel: the model's classes are independent (sigmoid): a prediction is the set of classes at or above
            their thresholds, not the arg-max class (:meth:`to_dict`).
        thresholds: ``(C,)`` the per-class thresholds the counterfactual was judged with (multi-label), else None.
    """

    original: Tensor
    counterfactual: Tensor
    target: Tensor
    original_proba: Tensor
    counterfactual_proba: Tensor
    valid: Tensor
    steps: Tensor
    l1: Tensor
    l2: Tensor
    per_lead: Tensor
    per_wave: dict[str, Tensor]
    segments: list[list[dict[str, Any]]]
    lead_names: tuple[str, ...]
    fs: float
    class_names: tuple[str, ...] | None = None
    plausibility: dict[str, Tensor] | None = None
    options: dict = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    already_target: Tensor | None = None
    multilabel: bool = False
    thresholds: Tensor | None = None

    @property
    def delta(self) -> Tensor:
        """``(B, L, T)`` counterfactual minus original."""
        return self.counterfactual - self.original

    def top_leads(self, k: int = 3) -> list[list[str] | None]:
        """Per input, the (at most ``k``) leads whose change is clearly largest, or None when the change does not
        rank the leads (equal in every lead, or all zero; see
        :func:`ecgfm.explain.attribution.lead_ranking`)."""
        from ecgfm.explain.attribution import lead_ranking

        out: list[list[str] | None] = []
        for row in self.per_lead:
            idx = lead_ranking(row, k)
            out.append(None if idx is None else [self.lead_names[j] for j in idx])
        return out

    def _name(self, c: int) -> Any:
        return self.class_names[c] if self.class_names else int(c)

    def _prediction(self, proba: Tensor) -> Any:
        """The model's prediction from one input's ``(C,)`` probabilities, as :func:`ecgfm.api.decisions` makes it
        (and the report's ``predicted``): the arg-max class of a single-label model; for a multi-label model the
        list of classes at or above their thresholds (:attr:`thresholds`, 0.5 where None), most probable first,
        empty when none is."""
        from ecgfm.api import decisions

        p = proba.detach().double().cpu().numpy()
        if not self.multilabel:
            return self._name(int(p.argmax()))
        thr = None if self.thresholds is None else self.thresholds.detach().double().cpu().numpy()
        chosen = np.flatnonzero(decisions(p, True, thr))
        return [self._name(int(c)) for c in sorted(chosen, key=lambda c: -p[c])]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary, one entry per input. ``original_prediction`` / ``counterfactual_prediction`` are the
        predicted class of a single-label model, and the list of predicted classes (at or above their thresholds;
        possibly empty) of a multi-label one (:meth:`_prediction`)."""
        out = []
        top = self.top_leads()
        for i in range(self.original.shape[0]):
            t = int(self.target[i])
            d = {
                "target": self._name(t),
                # a multi-label model's prediction is a set of classes (its thresholds), as the report's
                # "predicted": the arg-max named a class the record's own prediction did not hold
                "original_prediction": self._prediction(self.original_proba[i]),
                "original_target_proba": float(self.original_proba[i, t]),
                "counterfactual_prediction": self._prediction(self.counterfactual_proba[i]),
                "counterfactual_target_proba": float(self.counterfactual_proba[i, t]),
                "valid": bool(self.valid[i]),
                "already_target": None if self.already_target is None else bool(self.already_target[i]),
                "steps": int(self.steps[i]),
                "l1": float(self.l1[i]),
                "l2": float(self.l2[i]),
                "top_leads": top[i],
                "ranks_leads": top[i] is not None,
                "per_lead_share": {n: float(v) for n, v in zip(self.lead_names, self.per_lead[i].tolist())},
                "per_wave_share": {w: float(v[i]) for w, v in self.per_wave.items()},
                # (lead, wave) pairs rank leads too: without a lead ranking, only the waves are ranked
                "top_segments": self.segments[i][:5] if top[i] is not None else sorted(
                    ({"lead": "all", "wave": w, "share": float(v[i])} for w, v in self.per_wave.items()),
                    key=lambda r: -r["share"]),
            }
            if self.plausibility is not None:
                d["mae_reconstruction_error"] = {k: float(v[i]) for k, v in self.plausibility.items()}
            out.append(d)
        return {"units": "model input units (after the model's normalisation)", "options": dict(self.options),
                "elapsed_s": float(self.elapsed_s), "records": out}


def change_summary(delta: Tensor, original: Tensor, fs: float, lead_names: Sequence[str],
                   r_peaks: Sequence[np.ndarray] | None = None
                   ) -> tuple[Tensor, dict[str, Tensor], list[list[dict[str, Any]]]]:
    """Where a change ``delta (B, L, T)`` sits: per-lead share, per-wave share and ranked (lead, wave) pairs.

    Wave windows come from R peaks detected on ``original`` (:func:`ecgfm.explain.waves.detect_r_peaks`)
    unless given.

    Returns:
        ``(per_lead (B, L), per_wave {"P", "QRS", "T", "other"} -> (B,), segments)``; ``segments[i]`` lists
        ``{"lead", "wave", "share"}`` sorted by decreasing share of the total |delta|.
    """
    mag = delta.detach().abs().float().cpu()
    b, n_l, n_t = mag.shape
    total = mag.flatten(1).sum(1).clamp_min(1e-12)
    per_lead = mag.sum(-1) / total[:, None]
    if r_peaks is None:
        r_peaks = waves_mod.detect_r_peaks_batch(original, fs)
    names = (*waves_mod.WAVES, "other")
    per_wave = {w: torch.zeros(b) for w in names}
    segments: list[list[dict[str, Any]]] = []
    for i in range(b):
        masks = waves_mod.wave_mask(waves_mod.wave_windows(r_peaks[i], fs, n_t), n_t)
        masks["other"] = ~np.any(np.stack([masks[w] for w in waves_mod.WAVES]), 0)
        rows = []
        for w in names:
            m = torch.as_tensor(masks[w])
            by_lead = (mag[i] * m).sum(-1) / total[i]                       # (L,)
            per_wave[w][i] = by_lead.sum()
            rows += [{"lead": str(lead_names[j]), "wave": w, "share": float(by_lead[j])} for j in range(n_l)]
        segments.append(sorted(rows, key=lambda r: -r["share"]))
    return per_lead, per_wave, segments


def counterfactual(wrapper: ECGWrapper, inputs: Tensor, target: Any, lambda_prox: float = 0.1,
                   proximity: str = "l1", lambda_smooth: float = 0.003, prior: nn.Module | None = None,
                   lambda_plaus: float = 0.1, lr: float = 0.01, max_steps: int = 500, early_stop: bool = True,
                   threshold: float | Sequence[float] | None = None, leads: Sequence[str] | None = None,
                   knot_s: float | None = 0.04,
                   edge_s: float = 0.3, ramp_s: float = 0.1, recorded: Any = None) -> Counterfactual:
    """Counterfactual ECGs for a target class.

    Args:
        wrapper: the model (its parameters are not changed).
        inputs: ``(B, L, T)`` model-space inputs (use :meth:`ECGWrapper.prepare` for raw data).
        target: class index or name, one for all or one per input. ``None``: each input's own most probable
            class (:meth:`ECGWrapper.resolve_target`); for a single-label model that is the class the input is
            already predicted as, so the result changes nothing (``steps`` 0, ``already_target`` and ``valid``
            true) and explains nothing: give a class, or each input's :func:`default_target` (a class it is not
            predicted as, what the report uses).
        lambda_prox: weight of the proximity term (>= 0).
        proximity: ``"l1"`` (sparse changes) or ``"l2"``.
        lambda_smooth: weight of the total-variation term (>= 0).
        prior: optional plausibility prior ``(B, L, T) -> (B,)`` (e.g. :class:`MAEPrior`).
        lambda_plaus: weight of the prior (>= 0).
        lr: Adam learning rate (model input units per step; > 0).
        max_steps: step budget.
        early_stop: stop each input at its first flipped iterate. False: every input takes all ``max_steps``
            steps and its counterfactual is the last iterate (``steps`` reads ``max_steps``; ``valid`` says whether
            that iterate is predicted as the target).
        threshold: probability in ``(0, 1)`` a multi-label (sigmoid) model must give the target (one, or one per
            class);
            default the classifier's own thresholds (``wrapper.thresholds``, chosen on validation), else 0.5.
        leads: restrict the change to these leads (default None: all; an empty list is refused, it would leave
            nothing to change). A record's absent leads (all-zero rows, ecgfm's convention) are never changed.
        knot_s: the change is piecewise linear between knots ``knot_s`` seconds apart (default 40 ms, one small
            ECG-paper square), i.e. it has no content above about ``1 / (2 knot_s)`` Hz. Adam moves every free
            parameter by about ``lr`` per step whatever its gradient, so a free per-sample change turns into
            high-frequency, adversarial-looking noise before the total-variation term can act; the knots rule
            that out by construction. ``None``: one free value per sample.
        edge_s: seconds at each end of the record left unchanged (see the module docstring: the ends are where
            zero padding makes a model cheapest to fool). 0: the whole record may change (the zero-padded total
            variation still charges a jump at an end).
        ramp_s: seconds over which the change ramps in after the untouched ends (raised cosine, no step).
        recorded: the recorded samples (``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool, e.g. ``t < n_real`` for a
            record zero-padded to the model's window; :func:`~ecgfm.explain.attribution.recorded_samples`): the
            change is confined to them, as to the present leads (a change written into the padding is signal the
            patient's record does not have), and the untouched end margin sits at the recording's end. Default:
            every sample. The L1 / L2 distances are means over these samples of the present leads.

    Returns:
        :class:`Counterfactual`.

    Raises:
        ValueError: bad inputs (see :meth:`ECGWrapper.check`), a target outside the classes, unknown
            ``proximity`` or lead names, an empty ``leads``.
        ecgfm.config.ConfigError: (a ``ValueError``) naming the setting that cannot work: ``threshold`` outside
            ``(0, 1)``, a negative ``lambda_*``, ``lr`` not positive
            (:func:`ecgfm.recipes.check_counterfactual_options`).
    """
    check_counterfactual_options({"threshold": threshold, "lambda_prox": lambda_prox, "lambda_smooth": lambda_smooth,
                                  "lambda_plaus": lambda_plaus, "lr": lr}, prefix="")
    if proximity not in PROXIMITY:
        raise ValueError(f"proximity must be one of {PROXIMITY}, got {proximity!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not (edge_s >= 0 and ramp_s >= 0):
        raise ValueError(f"edge_s and ramp_s must be >= 0 seconds, got edge_s={edge_s}, ramp_s={ramp_s}")
    if leads is not None and len(leads) == 0:
        raise ValueError("leads is empty: no lead could change, so no counterfactual can be found; give the leads "
                         "the change may use, or None for all")
    x = wrapper.check(torch.as_tensor(inputs, dtype=torch.float32).to(wrapper.device), "<counterfactual inputs>")
    with wrapper.evaluating():   # eval mode inside; each sub-module's own mode restored after
        return _counterfactual(wrapper, x, target, lambda_prox, proximity, lambda_smooth, prior, lambda_plaus, lr,
                               max_steps, early_stop, threshold, leads, knot_s, edge_s, ramp_s, recorded)


def _counterfactual(wrapper: ECGWrapper, x: Tensor, target: Any, lambda_prox: float, proximity: str,
                    lambda_smooth: float, prior: nn.Module | None, lambda_plaus: float, lr: float, max_steps: int,
                    early_stop: bool, threshold: Any, leads: Sequence[str] | None, knot_s: float | None,
                    edge_s: float, ramp_s: float, recorded: Any) -> Counterfactual:
    """:func:`counterfactual` on checked inputs ``x``, the model in eval mode."""
    multilabel = wrapper.postprocess == "sigmoid"
    t0 = time.perf_counter()
    with torch.no_grad():
        logits0 = wrapper(x)
        tgt = wrapper.resolve_target(target, logits0)
        proba0 = wrapper.postprocess_fn(logits0)
        present = present_rows(x)                                       # (B, L) the records' leads
        plaus0 = _prior_values(prior, x, present, recorded) if prior is not None else None
    threshold = class_thresholds(threshold, wrapper, proba0.shape[1]).to(x.device)
    lead_mask = torch.ones(1, x.shape[1], 1, device=x.device)
    if leads is not None:
        unknown = [lead for lead in leads if lead not in wrapper.lead_names]
        if unknown:
            raise ValueError(f"unknown leads {unknown}; the model's leads are {wrapper.lead_names}")
        lead_mask = torch.tensor([[[float(n in leads)] for n in wrapper.lead_names]], device=x.device)
    # a record's absent (zero-filled) leads stay absent: a change there would be signal the patient does not have
    # (and, for a model that reads zero rows as signal, the cheapest one to add), reported as the counterfactual
    lead_mask = lead_mask * present[:, :, None].to(lead_mask.dtype)                          # (B, L, 1)
    n_t = x.shape[-1]
    if recorded is None:
        lead_mask = lead_mask * edge_taper(n_t, wrapper.fs, edge_s, ramp_s).to(x.device)     # (1, L, T)
    else:
        # the zero padding of a short record stays zero, and the untouched end margin is at the recording's end
        # (where the padding starts), not at the padded window's
        rec = recorded_samples(x, recorded)                                                  # (B, L, T)
        t_idx = torch.arange(1, n_t + 1, device=x.device)
        ends = torch.where(rec.any(1), t_idx, 0).amax(-1).tolist()      # each input's last recorded sample + 1
        tapers = []
        for n_rec in ends:
            w = torch.zeros(n_t)
            if n_rec > 0:
                w[:n_rec] = edge_taper(n_rec, wrapper.fs, edge_s, ramp_s)
            tapers.append(w)
        lead_mask = lead_mask * torch.stack(tapers)[:, None, :].to(x.device) * rec.to(lead_mask.dtype)
    step_n = 1 if knot_s is None else max(1, int(round(knot_s * wrapper.fs)))
    n_knots = n_t if step_n == 1 else -(-(n_t - 1) // step_n) + 1

    def expand(z: Tensor) -> Tensor:
        """``(B, L, K)`` knot values -> ``(B, L, T)`` piecewise-linear change."""
        if n_knots == n_t:
            return z
        full = F.interpolate(z, size=(n_knots - 1) * step_n + 1, mode="linear", align_corners=True)
        return full[..., :n_t]

    delta = torch.zeros(*x.shape[:2], n_knots, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    steps = torch.full((x.shape[0],), max_steps, dtype=torch.long, device=x.device)
    best = x.clone()
    history: list[float] = []
    for step in range(max_steps):
        d = expand(delta) * lead_mask
        xc = x + d
        logits = wrapper(xc)
        with torch.no_grad():
            flipped = _is_valid(wrapper.postprocess_fn(logits), tgt, multilabel, threshold)
            newly = flipped & ~done
            best[newly] = xc[newly].detach()
            steps[newly] = step
            done |= flipped if early_stop else torch.zeros_like(done)
        if early_stop and bool(done.all()):
            break
        if multilabel:
            cls = F.binary_cross_entropy_with_logits(logits.gather(1, tgt[:, None])[:, 0],
                                                     torch.ones_like(tgt, dtype=logits.dtype), reduction="none")
        else:
            cls = F.cross_entropy(logits, tgt, reduction="none")
        prox = (d.abs() if proximity == "l1" else d.pow(2)).flatten(1).sum(1) / wrapper.fs
        loss = cls + lambda_prox * prox + lambda_smooth * total_variation(F.pad(d, (1, 1)))  # ends charged
        if prior is not None:
            loss = loss + lambda_plaus * (_prior_values(prior, xc, present, recorded) - plaus0)
        loss = (loss * (~done).float()).sum()                              # finished inputs stop moving
        (grad,) = torch.autograd.grad(loss, delta)
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            history.append(float(loss.detach()) / max(1, int((~done).sum())))
    with torch.no_grad():
        final = x + expand(delta.detach()) * lead_mask
        still = ~done
        best[still] = final[still]
        proba1 = wrapper.postprocess_fn(wrapper(best))
        valid = _is_valid(proba1, tgt, multilabel, threshold)
        plaus1 = _prior_values(prior, best, present, recorded) if prior is not None else None
    if not early_stop:   # the counterfactual is the last iterate, after every step
        steps.fill_(max_steps)
    diff = best - x
    per_lead, per_wave, segments = change_summary(diff, x, wrapper.fs, wrapper.lead_names)
    # distances per sample of the record's signal (present leads, recorded samples), not of the whole window
    signal = recorded_samples(x, recorded).to(diff.dtype)
    n_signal = signal.flatten(1).sum(1).clamp_min(1.0)
    return Counterfactual(
        original=x.detach(), counterfactual=best.detach(), target=tgt, original_proba=proba0.detach(),
        counterfactual_proba=proba1.detach(), valid=valid, steps=steps,
        l1=(diff.abs() * signal).flatten(1).sum(1) / n_signal,
        l2=((diff.pow(2) * signal).flatten(1).sum(1) / n_signal).sqrt(), per_lead=per_lead, per_wave=per_wave,
        segments=segments,
        lead_names=wrapper.lead_names, fs=wrapper.fs, class_names=wrapper.class_names,
        plausibility=None if prior is None else {"original": plaus0.detach(), "counterfactual": plaus1.detach()},
        options={"lambda_prox": lambda_prox, "proximity": proximity, "lambda_smooth": lambda_smooth,
                 "lambda_plaus": lambda_plaus if prior is not None else None, "lr": lr, "max_steps": max_steps,
                 "early_stop": early_stop, "threshold": [round(float(t), 6) for t in threshold] if multilabel
                 else None, "leads": list(leads) if leads else None,
                 "knot_s": knot_s, "edge_s": float(edge_s), "ramp_s": float(ramp_s),
                 "prior": type(prior).__name__ if prior is not None else None},
        history=history, elapsed_s=time.perf_counter() - t0,
        already_target=_is_valid(proba0.detach(), tgt, multilabel, threshold),
        multilabel=multilabel, thresholds=threshold.detach().cpu() if multilabel else None)


def default_target(proba: Tensor, multilabel: bool, threshold: float | Sequence[float] | Tensor = 0.5
                   ) -> int | None:
    """The class a counterfactual of one record should move to when none is asked for: one the model does not
    already predict. Single-label: the second most probable class. Multi-label (sigmoid): the most probable class
    below its threshold (predicted: at or above it, as ``Classifier.predict`` decides; the second most probable
    may be a predicted label too, whose "counterfactual" is the record itself). None when every class is already
    predicted.

    Args:
        proba: ``(C,)`` probabilities of the record.
        multilabel: sigmoid outputs (independent labels).
        threshold: probability a multi-label prediction needs: one for all classes or ``(C,)`` (a classifier's own
            validation thresholds, :func:`class_thresholds`).
    """
    order = [int(i) for i in proba.argsort(descending=True)]
    if not multilabel:
        return order[1] if len(order) > 1 else None
    thr = class_thresholds(threshold, None, len(order))
    below = [i for i in order if float(proba[i]) < float(thr[i])]   # not predicted (predict: p >= threshold)
    return below[0] if below else None
