"""Batched attribution for ECG models: one protocol, captum underneath.

``Explainer(wrapper).explain(inputs (B, L, T), target, method, **options) -> Attribution``: values shaped like
the input (signed), the method and options used, the target, timing, and (IG / DeepLift) the convergence delta.

Methods (:data:`METHODS`; captum wherever captum has the method):

===================== ===========================================================================================
``saliency``          gradient of the target score (captum ``Saliency(abs=False)``; Simonyan et al. 2014)
``input_x_gradient``  input x gradient (captum ``InputXGradient``)
``smoothgrad``        mean gradient over noisy copies (captum ``NoiseTunnel``; Smilkov et al. 2017)
``integrated_gradients`` / ``ig``  path integral from a baseline (captum ``IntegratedGradients``, Gauss-Legendre
                      quadrature by default: for the same completeness error it needs far fewer steps than the
                      Riemann sums of hand-written loops; Sundararajan et al. 2017)
``deeplift``          DeepLift rescale rule (captum ``DeepLift``; Shrikumar et al. 2017)
``gradient_shap``     expected gradients over a baseline distribution (captum ``GradientShap``): ``"zeros"``,
                      ``"smoothed"`` (each record's own low-pass copy), any baseline of :func:`make_baseline`, or
                      ``bank=`` a bank ``(N, L, T)`` of real normal ECGs (:func:`baseline_bank`)
``occlusion``         lead x time windows replaced by a baseline (captum ``Occlusion``, forward only)
``lead_ablation``     one lead at a time replaced (captum ``FeatureAblation``, per-lead feature mask)
``wave_ablation``     P / QRS / T segments replaced (``FeatureAblation`` with masks from :mod:`ecgfm.explain.waves`)
``gradcam``           Grad-CAM on a layer (captum ``LayerGradCam`` for CNN maps; ViT tokens via
                      ``tokens_to_grid``), upsampled to ``(L, T)`` (Selvaraju et al. 2017)
``gradcam++``         Grad-CAM++ (Chattopadhay et al. 2018; hand-written on the wrapper's activations/gradients
                      because captum has no Grad-CAM++)
``attention_rollout`` ViT-1D attention rollout (Abnar & Zuidema 2020; hand-written: captum has none)
===================== ===========================================================================================

**Baselines.** Path and reference methods (IG, DeepLift, GradientSHAP) and occlusion default to each record's
own ``"smoothed"`` copy (a 1 Hz low-pass: the isoelectric line and wander without P/QRS/T waves) rather than zeros:
removing the waves is the question asked ("which waves matter"), and a zero baseline is degenerate for
scale-invariant models. Measured on ``vit1d_test`` (random weights, 4 random inputs): ViT-1D normalises every
patch (``LayerNorm(patch)``), so ``f(a * x) = f(x)`` for ``a > 0`` (``f(0.01 x) == f(x)`` to print precision)
and the whole change ``f(x) - f(0)`` happens at ``a = 0``: IG's completeness error was 0.48 (logits ~0.2) with
16 and with 128 steps from zeros, but 0.014 (16 steps) and 2e-7 (128 steps) from the smoothed baseline. The same
holds for the cosine similarity of a bias-free CNN's embeddings. Pass ``baselines="zeros"`` for the textbook
setting.

For ablation methods each feature's output change is spread uniformly over its samples, so the sum of the
values over a lead (``lead_ablation``) or over a segment (``wave_ablation``) is that feature's effect.

**Explaining an encoder** (:meth:`Explainer.explain_embedding`): with no classifier at all, attribute the cosine
similarity between each input's embedding and a reference ECG's embedding, or the projection of the embedding on
a direction (default: the input's own embedding direction, i.e. which samples build the representation).
Every method above works on that objective (attention rollout is target-free anyway).

GradientSHAP's bank of real normal ECGs: :func:`baseline_bank` (records through the model's preprocessing).

**Lead resolution.** Not every method can rank leads. Grad-CAM / Grad-CAM++ on a CNN's last feature map (the first
convolution already mixed the leads) or on a transformer whose tokens span all leads produce one map for every
lead, so every lead gets exactly 1/L of the attribution: a "top leads" list from it would be an artefact of
sorting equal numbers. Each :class:`Attribution` therefore says ``lead_resolution`` (``"per-lead"``, ``"none"``:
one map broadcast to every lead, ``"interpolated"``: fewer rows than leads) and ``ranks_leads``, which is also
False whenever the per-lead totals are degenerate (all equal up to float noise, all zero, non-finite) whatever
the method; :meth:`Attribution.top_leads` then returns None instead of a ranking (:func:`lead_ranking`). A
transformer with one token row per lead (ViT-1D, ST-MEM) gives per-lead maps, each row on its own lead also when the
encoder reads a subset of the leads or another order (``input_leads``: the other leads' rows are zero,
:meth:`ECGWrapper.token_grid`).
"""

from __future__ import annotations

import contextlib

import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import signal as sps
from torch import Tensor, nn

from ecgfm.explain import waves as waves_mod
from ecgfm.explain.wrapper import ECGWrapper

# ---------------------------------------------------------------------------------------------------------------
# Attribution


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist() if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 64 else f"array{v.shape}"
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


LEAD_RESOLUTIONS = ("per-lead", "none", "interpolated")


def lead_ranking(per_lead: Tensor | np.ndarray | Sequence[float], k: int = 3, rtol: float = 1e-4
                 ) -> list[int] | None:
    """Indices of the (at most ``k``) leads whose importance clearly exceeds the rest, largest first.

    A lead is listed only if its value exceeds the largest value left out by more than ``rtol`` times the
    largest magnitude, so ties at the cut are never broken by sort order and equal shares (e.g. a map broadcast
    to every lead) give no ranking at all. A lead whose value is not positive (beyond ``rtol``) is never listed:
    with ``k`` at least the number of leads nothing is left out to compare with, and a lead holding no share of
    the attribution is not a "top lead".

    Args:
        per_lead: ``(L,)`` importance per lead (e.g. :meth:`Attribution.per_lead` ``[i]`` or change shares).
        k: at most this many leads.
        rtol: relative tolerance below which two values count as equal.

    Returns:
        lead indices, or None when no lead stands out (all equal, all zero, or non-finite values).
    """
    v = np.asarray(per_lead.detach().cpu() if isinstance(per_lead, Tensor) else per_lead, dtype=np.float64)
    v = v.reshape(-1)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    scale = float(np.abs(v).max())
    if scale == 0.0:
        return None
    tol = rtol * scale
    order = np.argsort(-v, kind="stable")
    k = max(0, min(int(k), v.size))
    # the cut: the largest value left out, and never below 0 (a zero share is no evidence for a lead, also when
    # k >= the number of leads leaves nothing out)
    cut = max(float(v[order[k]]), 0.0) if k < v.size else 0.0
    top = [int(i) for i in order[:k] if v[i] > cut + tol]
    return top or None


def ranked_leads(per_lead: Tensor | np.ndarray | Sequence[float], counted: Any = None, k: int = 3
                 ) -> list[int] | None:
    """:func:`lead_ranking` over the leads that can hold attribution only (``counted``: ``(L,)`` bool, e.g. the
    record's leads the model reads; None: all), at most ``n - 1`` of those ``n`` (so ``n`` equal shares rank
    nothing, and one lead ranks nothing); indices into ``per_lead``. The report's ``top`` and the lead-importance
    chart both read it."""
    v = np.asarray(per_lead.detach().cpu() if isinstance(per_lead, Tensor) else per_lead, dtype=np.float64)
    v = v.reshape(-1)
    idx = np.flatnonzero(np.ones(v.size, bool) if counted is None else np.asarray(counted, bool).reshape(-1))
    if idx.size < 2:
        return None
    top = lead_ranking(v[idx], k=min(int(k), idx.size - 1))
    return None if top is None else [int(idx[i]) for i in top]


def _reduce(values: Tensor, reduce: str) -> Tensor:
    if reduce == "abs":
        return values.abs()
    if reduce == "positive":
        return values.clamp_min(0)
    if reduce == "negative":
        return (-values).clamp_min(0)
    if reduce == "signed":
        return values
    raise ValueError(f"reduce must be 'abs', 'positive', 'negative' or 'signed', got {reduce!r}")


@dataclass
class Attribution:
    """An explanation of a batch of ECGs.

    Attributes:
        values: ``(B, L, T)`` signed attribution, aligned with ``inputs``.
        method: canonical method name (a key of :data:`METHODS`).
        options: options actually used (defaults filled in).
        target: ``(B,)`` long class indices, or None for an embedding objective.
        inputs: ``(B, L, T)`` explained inputs (model space).
        fs: sampling rate of ``inputs`` in Hz.
        lead_names: lead of each row.
        elapsed_s: wall time of the attribution call.
        delta: ``(B,)`` convergence delta (sum of attributions - (f(x) - f(baseline))) for IG / DeepLift /
            GradientSHAP, else None.
        scores: faithfulness / sanity scores attached later (:mod:`ecgfm.explain.faithfulness`).
        call_options: the method options as passed (tensors included: ``options`` shows a tensor baseline as its
            shape), so that a check can explain again with exactly the same ones.

    ``lead_resolution`` comes from ``options["lead_resolution"]`` (set by methods whose map may lack a lead axis;
    ``"per-lead"`` otherwise); see the module docstring.
    """

    values: Tensor
    method: str
    options: dict
    target: Tensor | None
    inputs: Tensor
    fs: float
    lead_names: tuple[str, ...]
    elapsed_s: float
    delta: Tensor | None = None
    scores: dict = field(default_factory=dict)
    call_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.values.shape != self.inputs.shape:
            raise ValueError(f"attribution values {tuple(self.values.shape)} do not match inputs "
                             f"{tuple(self.inputs.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])

    @property
    def lead_resolution(self) -> str:
        """``"per-lead"``, ``"none"`` (one map broadcast to every lead) or ``"interpolated"``."""
        return str(self.options.get("lead_resolution", "per-lead"))

    @property
    def ranks_leads(self) -> bool:
        """Whether this attribution can rank leads: the method resolves leads and, for every input, the
        per-lead totals are not degenerate (:func:`lead_ranking`)."""
        if self.lead_resolution != "per-lead":
            return False
        return all(r is not None for r in self.top_leads())

    def top_leads(self, k: int = 3, reduce: str = "abs", recorded: Any = None,
                  counted: Any = None) -> list[list[str] | None]:
        """Per input, the (at most ``k``) most important leads, or None where the attribution cannot rank leads
        (a lead-agnostic method, or degenerate equal / zero per-lead totals). ``recorded``: see :meth:`per_lead`.
        ``counted``: ``(L,)`` bool, rank only those leads (:func:`ranked_leads`: e.g. a record's leads the model
        reads, as the lead-importance chart ranks them); None: every lead (:func:`lead_ranking`)."""
        if self.lead_resolution != "per-lead":
            return [None] * self.batch_size
        out: list[list[str] | None] = []
        for row in self.per_lead(reduce, recorded=recorded):
            idx = lead_ranking(row, k) if counted is None else ranked_leads(row, counted, k)
            out.append(None if idx is None else [self.lead_names[j] for j in idx])
        return out

    def _recorded_mask(self, recorded: Any) -> Tensor | None:
        """``(B, L, T)`` bool of the samples ``recorded`` marks (absent leads not removed: their values are 0), or
        None for None."""
        if recorded is None:
            return None
        return recorded_samples(torch.ones_like(self.values), recorded)

    def per_lead(self, reduce: str = "abs", recorded: Any = None) -> Tensor:
        """``(B, L)`` importance of each lead: sum over time of ``|values|`` (``reduce``: ``"abs"``,
        ``"positive"``, ``"negative"`` or ``"signed"``).

        ``recorded``: optional ``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool recorded samples
        (:func:`recorded_samples`, e.g. ``arange(T) < n_real`` for a record zero-padded to the model's window):
        only these are summed (a gradient map is not 0 on the padding). Default: every sample."""
        vals = _reduce(self.values, reduce)
        keep = self._recorded_mask(recorded)
        return vals.sum(-1) if keep is None else (vals * keep).sum(-1)

    def per_beat(self, r_peaks: Sequence[np.ndarray] | None = None, reduce: str = "abs",
                 recorded: Any = None) -> list[Tensor]:
        """Importance of each beat (beats split at the midpoints between R peaks).

        Args:
            r_peaks: per input, R-peak sample indices; ``None`` detects them on the inputs (on their ``recorded``
                span; :func:`ecgfm.explain.waves.detect_r_peaks`).
            reduce: see :meth:`per_lead`.
            recorded: optional ``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool recorded samples
                (:func:`recorded_samples`, e.g. ``arange(T) < n_real`` for a record zero-padded to the model's
                window): the first and last beats end at the edges of the recorded span
                (:func:`ecgfm.explain.waves.beat_bounds`), not at the edges of the window, and only recorded
                samples are summed, so the zero padding of a short record is in no beat. Default: every sample.

        Returns:
            per input, a ``(n_beats, L)`` tensor.
        """
        keep = self._recorded_mask(recorded)                                  # (B, L, T) or None
        if r_peaks is None:
            r_peaks = waves_mod.detect_r_peaks_batch(self.inputs, self.fs,
                                                     recorded=None if keep is None else keep.cpu())
        vals = _reduce(self.values, reduce)
        if keep is not None:
            vals = vals * keep.to(vals.device)
        out = []
        for b, r in enumerate(r_peaks):
            span = None if keep is None else keep[b].any(0).cpu()            # (T,) recorded in any lead
            bounds = waves_mod.beat_bounds(r, vals.shape[-1], recorded=span)
            out.append(torch.stack([vals[b, :, s:e].sum(-1) for s, e in bounds])
                       if len(bounds) else vals.new_zeros(0, vals.shape[1]))
        return out

    def per_wave(self, windows: Sequence[dict] | dict | None = None, reduce: str = "abs", by_lead: bool = False,
                 normalize: bool = False, recorded: Any = None) -> dict[str, Tensor]:
        """Importance of each wave type (P, QRS, T and the remainder ``"other"``).

        Args:
            windows: per input (or one for all) the output of :func:`ecgfm.explain.waves.wave_windows`; ``None``
                detects R peaks on the inputs (on their ``recorded`` span) and uses the standard offsets.
            reduce: see :meth:`per_lead`.
            by_lead: return ``(B, L)`` per wave instead of ``(B,)``.
            normalize: divide by the number of samples of the wave, and without ``by_lead`` by the number of
                leads too (mean attribution per lead and sample), so long T windows are not favoured over short
                QRS windows.
            recorded: optional ``(T,)``, ``(B, T)`` or ``(B, L, T)`` bool recorded samples
                (:func:`recorded_samples`, e.g. ``arange(T) < n_real``): only these count, in the sums and in the
                sample counts of ``normalize``, so the zero padding of a short record is neither "other" nor part
                of a window. Default: every sample.

        Returns:
            ``{"P": (B,), "QRS": (B,), "T": (B,), "other": (B,)}`` (``(B, L)`` with ``by_lead``).
        """
        n_t = self.values.shape[-1]
        keep = self._recorded_mask(recorded)                                  # (B, L, T) or None
        if windows is None:
            windows = [waves_mod.wave_windows(r, self.fs, n_t) for r in waves_mod.detect_r_peaks_batch(
                self.inputs, self.fs, recorded=None if keep is None else keep.cpu())]
        elif isinstance(windows, dict):
            windows = [windows] * self.batch_size
        vals = _reduce(self.values, reduce)
        # a lead the record does not have (zero-filled row) is not averaged in: a one-lead record's density would
        # be 1/12 of the same map's on its lead
        present = present_rows(self.inputs).to(vals.device)                  # (B, L)
        out: dict[str, list[Tensor]] = {w: [] for w in (*waves_mod.WAVES, "other")}
        for b, win in enumerate(windows):
            masks = waves_mod.wave_mask(win, n_t)
            other = ~np.any(np.stack([masks[w] for w in waves_mod.WAVES]), 0)
            masks["other"] = other
            for w in out:
                m = torch.as_tensor(masks[w], device=vals.device)           # (T,)
                if keep is not None:
                    m = m & keep[b].to(vals.device)                           # (L, T): recorded samples only
                s = (vals[b] * m).sum(-1)
                if normalize:   # mean per sample of each lead; over the record's present leads without by_lead
                    s = s / (m.sum() if keep is None else m.sum(-1)).clamp_min(1)
                out[w].append(s if by_lead else (s[present[b]].sum() / present[b].sum().clamp_min(1) if normalize
                                                 else s.sum()))
        return {w: torch.stack(v) for w, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no full arrays): method, options, targets, timing, per-lead importance,
        delta statistics and attached scores."""
        d: dict[str, Any] = {
            "method": self.method,
            "options": _jsonable(self.options),
            "shape": list(self.values.shape),
            "fs": float(self.fs),
            "lead_names": list(self.lead_names),
            "target": None if self.target is None else self.target.detach().cpu().tolist(),
            "elapsed_s": float(self.elapsed_s),
            "per_lead": self.per_lead().detach().cpu().tolist(),
            "lead_resolution": self.lead_resolution,
            "ranks_leads": self.ranks_leads,
            "top_leads": self.top_leads(),
            "scores": _jsonable(self.scores),
        }
        if self.delta is not None:
            a = self.delta.detach().abs().float().cpu()
            d["delta_abs_mean"] = float(a.mean())
            d["delta_abs_max"] = float(a.max())
        return d


# ---------------------------------------------------------------------------------------------------------------
# Baselines


def smoothed_copy(x: Tensor, fs: float, cutoff_hz: float = 1.0) -> Tensor:
    """The record's own baseline: a zero-phase 2nd-order Butterworth low-pass copy (``(B, L, T)`` ->
    ``(B, L, T)``). Below ``cutoff_hz`` only baseline wander / isoelectric level survive; P, QRS and T waves
    are removed, so replacing a segment with it removes the wave without adding a step to zero."""
    arr = x.detach().float().cpu().numpy()
    sos = sps.butter(2, min(cutoff_hz, 0.45 * fs), btype="lowpass", fs=fs, output="sos")
    padlen = min(arr.shape[-1] - 1, 3 * (2 * len(sos) + 1))
    out = sps.sosfiltfilt(sos, arr, axis=-1, padlen=max(padlen, 0))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)


def median_baseline(x: Tensor, fs: float) -> Tensor:
    """Baseline estimated by two median filters (200 ms then 600 ms; de Chazal et al. 2004):
    ``(B, L, T) -> (B, L, T)``. Slower than :func:`smoothed_copy`, robust to large QRS complexes."""
    from scipy.ndimage import median_filter

    arr = x.detach().float().cpu().numpy()
    w1 = max(1, int(round(0.2 * fs))) | 1
    w2 = max(1, int(round(0.6 * fs))) | 1
    out = median_filter(median_filter(arr, size=(1, 1, w1), mode="nearest"), size=(1, 1, w2), mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)


def make_baseline(kind: str | float | Tensor | np.ndarray | None, x: Tensor, fs: float) -> Tensor:
    """A baseline for ``x (B, L, T)``: ``"zeros"``, ``"smoothed"`` (:func:`smoothed_copy`), ``"median"``
    (:func:`median_baseline`), a constant, or a tensor / NumPy array ``(L, T)``, ``(1, L, T)`` or ``(B, L, T)``.

    Returns:
        ``(B, L, T)`` or ``(1, L, T)`` tensor on ``x``'s device.

    Raises:
        ValueError: unknown kind or a tensor of the wrong shape.
    """
    # a string is tested as one first: ``kind == "zeros"`` on a NumPy array compares element-wise ("the truth
    # value of an array is ambiguous")
    if kind is None or (isinstance(kind, str) and kind == "zeros"):
        return torch.zeros_like(x)
    if isinstance(kind, str):
        if kind == "smoothed":
            return smoothed_copy(x, fs)
        if kind == "median":
            return median_baseline(x, fs)
        raise ValueError(f"unknown baseline {kind!r}; use 'zeros', 'smoothed', 'median', a number or a tensor")
    if isinstance(kind, (int, float)):
        return torch.full_like(x, float(kind))
    t = torch.as_tensor(kind, dtype=x.dtype, device=x.device)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[1:] != x.shape[1:] or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"baseline tensor {tuple(t.shape)} does not fit inputs {tuple(x.shape)}")
    return t


def baseline_bank(wrapper: ECGWrapper, records: Sequence[Any], n_samples: int | None = None,
                  max_records: int | None = None, seed: int = 0) -> Tensor:
    """A bank of reference ECGs (e.g. PTB-XL records labelled NORM) for GradientSHAP's ``bank=``.

    Each record goes through :meth:`ECGWrapper.prepare` (the model's rate, leads and preprocessing; absent leads
    zero) and is cropped (random start, ``seed``) or zero-padded to ``n_samples`` (default: the wrapper's fixed
    length, else the shortest record).

    Args:
        wrapper: the model wrapper.
        records: :class:`~ecgfm.data.record.ECGRecord` objects.
        n_samples: length of the bank's ECGs.
        max_records: keep at most this many (a random subset).
        seed: crop / subset seed.

    Returns:
        ``(N, L, T)`` tensor on the wrapper's device.
    """
    from ecgfm.data.preprocess import crop_or_pad

    records = list(records)
    if not records:
        raise ValueError("baseline_bank needs at least one record")
    rng = np.random.default_rng(seed)
    if max_records is not None and len(records) > max_records:
        records = [records[i] for i in sorted(rng.choice(len(records), max_records, replace=False))]
    xs = [wrapper.prepare(r, missing_leads="zero")[0].cpu().numpy() for r in records]
    length = n_samples or wrapper.n_samples or min(x.shape[-1] for x in xs)
    bank = np.stack([crop_or_pad(x, length, rng=rng)[0] for x in xs]).astype(np.float32)
    return torch.from_numpy(bank).to(wrapper.device)


# ---------------------------------------------------------------------------------------------------------------
# Forward objectives


class _ClassObjective(nn.Module):
    """``(B, L, T) -> (B, C)`` logits or probabilities of the wrapped model."""

    def __init__(self, wrapper: ECGWrapper, output: str):
        super().__init__()
        if output not in ("logit", "proba"):
            raise ValueError(f"output must be 'logit' or 'proba', got {output!r}")
        self.wrapper = wrapper
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        out = self.wrapper(x)
        return self.wrapper.postprocess_fn(out) if self.output == "proba" else out


class EmbeddingObjective(nn.Module):
    """``(B, L, T), ref (B, D) -> (B, 1)``: cosine similarity of the embedding with ``ref`` (``mode="cosine"``)
    or its projection on the unit direction ``ref`` (``mode="projection"``). ``ref`` travels as captum's
    ``additional_forward_args`` so that it follows each input through the method's batch expansion."""

    def __init__(self, wrapper: ECGWrapper, mode: str):
        super().__init__()
        self.wrapper = wrapper
        self.mode = mode

    def forward(self, x: Tensor, ref: Tensor) -> Tensor:
        emb = self.wrapper.embed(x)
        if self.mode == "cosine":
            return F.cosine_similarity(emb, ref, dim=1, eps=1e-8)[:, None]
        return (emb * ref).sum(1, keepdim=True)


class _Shifted(nn.Module):
    """``f((z + shift) * keep + held, *args)``: lets captum's GradientShap use a per-input baseline
    (``z = x - baseline``, baseline distribution ``{0}``) while staying batched; ``keep`` / ``held`` as in
    :class:`_Present`."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, z: Tensor, shift: Tensor, keep: Tensor, held: Tensor | None, *args: Tensor) -> Tensor:
        v = (z + shift) * keep
        return self.fn(v if held is None else v + held, *args)


class _Present(nn.Module):
    """``fn(x * keep + held, *args)`` with ``keep (B, L, 1)`` = the record's present leads: the noise and the
    baselines of a sampling method (GradientSHAP, SmoothGrad) never reach a lead the record does not have (the
    absent rows are cleared from the map afterwards, but the present leads' maps were computed on inputs that had
    them). With ``recorded`` samples (:func:`_keep_and_held`), ``keep (B, L, T)`` is also 0 outside them (the zero
    padding of a short record) and ``held`` holds those samples at the input's own values (None: nothing held)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, keep: Tensor, held: Tensor | None, *args: Tensor) -> Tensor:
        v = x * keep
        return self.fn(v if held is None else v + held, *args)


def _keep(x: Tensor) -> Tensor:
    """``(B, L, 1)`` float: 1 for the present leads of ``x (B, L, T)``, 0 for the absent (zero-filled) ones."""
    return present_rows(x)[:, :, None].to(x.dtype)


def _keep_and_held(x: Tensor, recorded: Any) -> tuple[Tensor, Tensor | None]:
    """``(keep, held)`` for :class:`_Present` / :class:`_Shifted`: without ``recorded``, the present leads
    (:func:`_keep`, ``(B, L, 1)``) and None; with it, ``keep (B, L, T)`` float of the recorded samples of present
    leads (:func:`recorded_samples`) and ``held = x * (1 - keep)``, the input's values elsewhere (zeros for absent
    leads and for the zero padding of a short record), so no noise or baseline is written there."""
    if recorded is None:
        return _keep(x), None
    keep = recorded_samples(x, recorded).to(x.dtype)
    return keep, x.detach() * (1 - keep)


def _confined_baseline(base: Tensor, x: Tensor, recorded: Any) -> Tensor:
    """``base`` (``(1 | B, L, T)``, :func:`make_baseline`) on the recorded samples of ``x``'s present leads
    (:func:`recorded_samples`) and ``x`` itself elsewhere, as :func:`ecgfm.explain.faithfulness.perturbation_curve`
    replaces segments: a path or a replacement from it never writes signal into the zero padding of a short record
    (the smoothed copy carried the low-passed end of the recording into it) or into an absent lead. ``base``
    unchanged when ``recorded`` is None."""
    if recorded is None:
        return base
    return torch.where(recorded_samples(x, recorded), base.expand_as(x), x.detach())


@dataclass
class _Job:
    """Everything a method implementation needs."""

    wrapper: ECGWrapper
    fn: nn.Module                 # (B, L, T), *args -> (B, K)
    x: Tensor                     # (B, L, T)
    target: Tensor                # (B,) column of fn's output to explain
    args: tuple | None            # per-input additional forward args (or None)
    fs: float

    def call(self, x: Tensor) -> Tensor:
        """``(B, K)`` outputs on ``x`` (same batch as ``self.x``)."""
        return self.fn(x, *(self.args or ()))

    def first(self) -> Tensor:
        """Outputs for the first input only (a cheap probe pass for layer discovery)."""
        return self.fn(self.x[:1], *(a[:1] for a in (self.args or ())))

    def score(self, x: Tensor) -> Tensor:
        """``(B,)`` explained score."""
        return self.call(x).gather(1, self.target[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Method implementations: (job, **options) -> (values, delta, options_used)


def _option_error(method: str, name: str, problem: str) -> Exception:
    """A method option out of range, named as ``method_options.<method>.<name>`` (as :func:`check_method_options`
    names unknown options)."""
    from ecgfm.config import ConfigError

    return ConfigError(f"method_options.{method}.{name}", problem)


def _check_positive_int(method: str, name: str, value: Any, upper: int | None = None) -> int:
    """``value`` as a positive int (at most ``upper``), or an error naming the option (0 samples divided by zero
    inside captum, a bool was read as 1, a fraction failed in its quadrature).

    Raises:
        ecgfm.config.ConfigError: not a whole number from 1 to ``upper``.
    """
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1
    if not ok or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise _option_error(method, name, f"must be a whole number of at least 1{bound}, got {value!r}")
    return int(value)


def _check_number(method: str, name: str, value: Any, positive: bool = True) -> float:
    """``value`` as a finite number, positive (or, ``positive=False``, not negative), or an error naming the option
    (a negative window was clamped to one sample, a negative noise level failed in torch's sampler).

    Raises:
        ecgfm.config.ConfigError: not a finite number in range.
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(float(value)) and (float(value) > 0 if positive else float(value) >= 0)
    if not ok:
        what = "a positive number" if positive else "a number of at least 0"
        raise _option_error(method, name, f"must be {what}, got {value!r}")
    return float(value)


def _m_saliency(job: _Job, abs: bool = False) -> tuple[Tensor, None, dict]:
    from captum.attr import Saliency

    v = Saliency(job.fn).attribute(job.x, target=job.target, abs=abs, additional_forward_args=job.args)
    return v, None, {"abs": abs}


def _m_input_x_gradient(job: _Job) -> tuple[Tensor, None, dict]:
    from captum.attr import InputXGradient

    return InputXGradient(job.fn).attribute(job.x, target=job.target, additional_forward_args=job.args), None, {}


class _Scaled(nn.Module):
    """``fn(z * s, *args)``: ``fn`` seen through per-record units ``s (B, 1, 1)``, so that one noise level in ``z``
    is ``noise_level * s_i`` for record ``i`` in the input space (captum's NoiseTunnel takes one stdev per input
    tensor, not per record). ``rec`` / ``held`` (both None, or ``(B, L, T)``: the recorded samples, bool, and the
    input's values outside them) hold the samples outside the recorded span at the input's values, noise-free."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, z: Tensor, s: Tensor, keep: Tensor, rec: Tensor | None, held: Tensor | None,
                *args: Any) -> Tensor:
        v = z * s
        if rec is not None:
            # the noise never reaches the zero padding of a short record: the forward value there is the input's
            # own (exactly: v - v.detach() is 0), but the gradient passes straight through, so the map there is
            # still the smoothed gradient at those samples, as without ``recorded``, not a zero made by a mask
            v = torch.where(rec, v, held + (v - v.detach()))
        return self.fn(v * keep, *args)   # keep: noise never reaches an absent lead (see _Present)


def _m_smoothgrad(job: _Job, n_samples: int = 50, noise_level: float = 0.15, batch_size: int | None = None,
                  squared: bool = False, recorded: Any = None) -> tuple[Tensor, None, dict]:
    """Noise of ``noise_level * std(x_i)`` for each record ``i`` (Smilkov et al. scale it to each input: 10-20 % of
    its range), drawn per record from its content, so a record's map does not depend on the records it is batched
    with. The standard deviation is the record's signal's: over its present leads and its ``recorded`` samples
    (:func:`recorded_samples`; default every sample), so that zero-filled leads and the zero padding of a short
    record do not shrink the noise (lead I alone got about a third of the noise it got among 12 leads); and with
    ``recorded`` the noise is confined to those samples: every noisy copy holds the zero padding at zero (the map
    there is still the smoothed gradient)."""
    from captum.attr import NoiseTunnel, Saliency

    _check_positive_int("smoothgrad", "n_samples", n_samples)
    _check_number("smoothgrad", "noise_level", noise_level, positive=False)
    if batch_size is not None:
        _check_positive_int("smoothgrad", "batch_size", batch_size)
    x = job.x.detach()
    signal = recorded_samples(x, recorded)                                 # (B, L, T) present, recorded
    s = torch.stack([x[b][signal[b]].std() if int(signal[b].sum()) > 1 else x.new_zeros(())
                     for b in range(x.shape[0])])
    s = torch.nan_to_num(s).clamp_min(1e-8)[:, None, None]                 # (B, 1, 1) each record's scale
    keep = _keep(x)                                                        # (B, L, 1) present leads
    # (B, L, T) each: the recorded samples and the input's values elsewhere (see _Scaled)
    rec, held = (None, None) if recorded is None else (signal, x * (~signal).to(x.dtype))
    if batch_size is None:  # about 256 ECG copies per forward pass
        batch_size = max(1, min(n_samples, 256))
    tunnel = NoiseTunnel(Saliency(_Scaled(job.fn)))
    rows = []
    # one record at a time, its noise drawn from a generator seeded by its content (NoiseTunnel draws from the
    # global RNG for the whole batch, so a record's map depended on the records batched with it)
    for b in range(x.shape[0]):
        with _seeded_by_record(x[b]):
            rows.append(tunnel.attribute(
                x[b:b + 1] / s[b:b + 1], nt_type="smoothgrad_sq" if squared else "smoothgrad", nt_samples=n_samples,
                nt_samples_batch_size=batch_size, stdevs=float(noise_level), target=job.target[b:b + 1], abs=False,
                additional_forward_args=(s[b:b + 1], keep[b:b + 1], None if rec is None else rec[b:b + 1],
                                         None if held is None else held[b:b + 1], *_record_args(job, b))))
    g = torch.cat(rows)
    v = g / (s ** 2 if squared else s)                                     # d/dz = s d/dx
    return v, None, {"n_samples": n_samples, "noise_level": noise_level,
                     "stdev": [float(noise_level * v_) for v_ in s.flatten().tolist()], "squared": squared,
                     "batch_size": batch_size}


def _internal_batch(job: _Job, n_steps: int, internal_batch_size: int | None) -> int:
    if internal_batch_size is None:
        # ECG copies per forward/backward pass; on CPU a few hundred saturate the cores (bench_explain.py)
        internal_batch_size = 2048 if job.x.is_cuda else 256
    return max(int(internal_batch_size), job.x.shape[0])


def _m_integrated_gradients(job: _Job, n_steps: int = 16, method: str = "gausslegendre",
                            baselines: Any = "smoothed", internal_batch_size: int | None = None,
                            recorded: Any = None) -> tuple[Tensor, Tensor, dict]:
    """``recorded``: the recorded samples (:func:`recorded_samples`); the baseline equals the input outside them
    and on absent leads (:func:`_confined_baseline`), so the path never writes signal into the zero padding of a
    short record. Default: every sample."""
    from captum.attr import IntegratedGradients

    _check_positive_int("integrated_gradients", "n_steps", n_steps)
    base = _confined_baseline(make_baseline(baselines, job.x, job.fs), job.x, recorded)
    ibs = _internal_batch(job, n_steps, internal_batch_size)
    v, delta = IntegratedGradients(job.fn, multiply_by_inputs=True).attribute(
        job.x, baselines=base, target=job.target, n_steps=n_steps, method=method,
        internal_batch_size=ibs, return_convergence_delta=True, additional_forward_args=job.args)
    return v, delta, {"n_steps": n_steps, "method": method, "baselines": _baseline_name(baselines),
                      "internal_batch_size": ibs}


def _baseline_name(b: Any) -> Any:
    return b if isinstance(b, (str, int, float)) or b is None else f"tensor{tuple(torch.as_tensor(b).shape)}"


def _m_deeplift(job: _Job, baselines: Any = "smoothed", recorded: Any = None) -> tuple[Tensor, Tensor, dict]:
    """Note: captum's DeepLift needs every non-linearity to be its own ``nn.Module`` instance (a ReLU module
    reused twice or ``F.relu`` falls back to plain gradients for that non-linearity). ``recorded``: as for
    integrated gradients (the baseline equals the input outside the recorded samples)."""
    from captum.attr import DeepLift

    base = _confined_baseline(make_baseline(baselines, job.x, job.fs), job.x, recorded)
    if base.shape[0] == 1:
        base = base.expand_as(job.x).contiguous()
    # captum's DeepLift hooks read each non-linearity's input after the forward pass; an in-place ReLU has
    # overwritten it. Switch them off for the call (restored afterwards).
    inplace = [m for m in job.fn.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    try:
        v, delta = DeepLift(job.fn).attribute(job.x.detach().clone().requires_grad_(True), baselines=base,
                                              target=job.target, return_convergence_delta=True,
                                              additional_forward_args=job.args)
    except RuntimeError as exc:
        raise ValueError(_deeplift_failure(job, exc)) from exc
    finally:
        for m in inplace:
            m.inplace = True
    return v, delta, {"baselines": _baseline_name(baselines)}


def _differentiable(job: _Job) -> bool:
    """Whether the job's explained score has a gradient with respect to the input (not for a model that runs its
    features under ``torch.no_grad()`` or detaches them: a frozen backbone of a linear probe, whose trainable head
    still gives an output that requires grad)."""
    try:
        with torch.enable_grad():
            x = job.x[:1].detach().clone().requires_grad_(True)
            out = job.fn(x, *_record_args(job, 0))
            if not out.requires_grad:
                return False
            return torch.autograd.grad(out.sum(), x, allow_unused=True)[0] is not None
    except Exception:  # noqa: BLE001 - only a diagnosis: the caller reports captum's own error then
        return True


def _deeplift_failure(job: _Job, exc: RuntimeError) -> str:
    """Why captum's DeepLift failed, by its cause (it blamed a reused non-linearity for a model without a gradient
    through its input too): no gradient from the output to the input, or a non-linearity module run more than once
    (captum's hooks keep one input per module), else captum's own message."""
    if not _differentiable(job):
        return (f"DeepLift cannot run on this model: its output has no gradient with respect to its input (the "
                f"model runs part of its forward pass under torch.no_grad() or detaches it, e.g. a frozen "
                f"backbone), so no gradient method can explain it; use a perturbation method (occlusion, "
                f"lead_ablation, wave_ablation) ({exc})")
    if "more than once" in str(exc):
        return (f"DeepLift cannot run on this model: a non-linearity module is used more than once in its forward "
                f"pass and needs one instance per use; use integrated_gradients instead ({exc})")
    return f"DeepLift cannot run on this model ({exc}); use integrated_gradients instead"


def _m_gradient_shap(job: _Job, baselines: Any = "smoothed", n_samples: int = 25, stdevs: float = 0.0,
                     bank: Any = None, recorded: Any = None) -> tuple[Tensor, Tensor, dict]:
    """``baselines`` as every other method reads them (:func:`make_baseline`: ``"zeros"``, ``"smoothed"`` /
    ``"median"``, a number, a tensor of one baseline per record ``(B, L, T)`` or one for all ``(L, T)``), each
    record's own baseline batched through :class:`_Shifted`; or ``bank``, an ``(N, L, T)`` bank of reference ECGs
    sampled uniformly for every record (:func:`baseline_bank`), which replaces ``baselines``. The two are separate
    arguments because an ``(N, L, T)`` tensor with ``N`` equal to the batch size reads both ways. Noise
    (``stdevs``) and bank baselines never reach the record's absent leads, nor, with ``recorded``
    (:func:`recorded_samples`), the samples outside them (the zero padding of a short record, held at the input's
    values: the map is 0 there, as integrated gradients' is)."""
    from captum.attr import GradientShap

    _check_positive_int("gradient_shap", "n_samples", n_samples)
    _check_number("gradient_shap", "stdevs", stdevs, positive=False)
    x = job.x
    keep, held = _keep_and_held(x, recorded)
    shift = None
    if bank is not None:
        opts = {"bank": _baseline_name(bank), "n_samples": n_samples, "stdevs": stdevs}
        bank = torch.as_tensor(bank, dtype=x.dtype, device=x.device)
        if bank.ndim == 2:
            bank = bank[None]
        if bank.ndim != 3 or bank.shape[1:] != x.shape[1:]:
            raise ValueError(f"baseline bank {tuple(bank.shape)} must be (N, {x.shape[1]}, {x.shape[2]})")
    else:
        opts = {"baselines": _baseline_name(baselines), "n_samples": n_samples, "stdevs": stdevs}
        if baselines is None or (isinstance(baselines, str) and baselines == "zeros"):
            bank = torch.zeros_like(x[:1])         # one zero ECG: captum's plain path, as before
        else:
            try:
                shift = _confined_baseline(make_baseline(baselines, x, job.fs), x, recorded).expand_as(x)
            except ValueError as exc:
                raise ValueError(f"{exc}; gradient_shap takes a bank of reference ECGs as bank=(N, L, T)") from None
    vs, deltas = [], []
    # one record at a time with draws seeded by its content: captum draws the interpolation points (numpy) and
    # the baselines of the whole batch together, so a record's map depended on its batch and the global RNGs
    for b in range(x.shape[0]):
        with _seeded_by_record(x[b]):
            if shift is not None:
                v, delta = GradientShap(_Shifted(job.fn)).attribute(
                    x[b:b + 1] - shift[b:b + 1], baselines=torch.zeros_like(x[:1]), target=job.target[b:b + 1],
                    n_samples=n_samples, stdevs=stdevs, return_convergence_delta=True,
                    additional_forward_args=(shift[b:b + 1], keep[b:b + 1], _row(held, b),
                                             *_record_args(job, b)))
            else:
                v, delta = GradientShap(_Present(job.fn)).attribute(
                    x[b:b + 1], baselines=bank, target=job.target[b:b + 1], n_samples=n_samples, stdevs=stdevs,
                    return_convergence_delta=True,
                    additional_forward_args=(keep[b:b + 1], _row(held, b), *_record_args(job, b)))
        vs.append(v)
        deltas.append(delta.reshape(-1).mean()[None])   # captum: one delta per (input, sample): their mean
    return torch.cat(vs), torch.cat(deltas), opts


def _row(t: Tensor | None, b: int) -> Tensor | None:
    """Row ``b`` of ``t`` as a batch of one, or None."""
    return None if t is None else t[b:b + 1]


def _default_window(fs: float, seconds: float) -> int:
    return max(1, int(round(seconds * fs)))


def _m_occlusion(job: _Job, window_s: float = 0.2, stride_s: float | None = None, lead_window: int = 1,
                 baselines: Any = "smoothed", perturbations_per_eval: int = 64, recorded: Any = None,
                 ) -> tuple[Tensor, None, dict]:
    """Slide a ``lead_window`` x ``window_s`` patch over (lead, time), replacing it by the baseline (default: the
    record's own smoothed copy, so no artificial step to zero is introduced). ``recorded``: the baseline equals the
    input outside the recorded samples (:func:`_confined_baseline`): a patch over the zero padding replaces
    nothing."""
    from captum.attr import Occlusion

    # a negative window or stride was clamped to one sample without a word, and lead_window=0 gave an all-NaN map
    _check_number("occlusion", "window_s", window_s)
    if stride_s is not None:
        _check_number("occlusion", "stride_s", stride_s)
    _check_positive_int("occlusion", "lead_window", lead_window, upper=int(job.x.shape[1]))
    _check_positive_int("occlusion", "perturbations_per_eval", perturbations_per_eval)
    w = _default_window(job.fs, window_s)
    s = _default_window(job.fs, stride_s if stride_s is not None else window_s / 2)
    base = _confined_baseline(make_baseline(baselines, job.x, job.fs), job.x, recorded)
    if base.shape[0] == 1:
        base = base.expand_as(job.x).contiguous()
    with torch.inference_mode():
        v = Occlusion(job.fn).attribute(job.x, sliding_window_shapes=(lead_window, w), strides=(lead_window, s),
                                        baselines=base, target=job.target,
                                        perturbations_per_eval=perturbations_per_eval,
                                        additional_forward_args=job.args)
    return v.clone(), None, {"window_s": window_s, "window": w, "stride": s, "lead_window": lead_window,
                             "baselines": _baseline_name(baselines),
                             "perturbations_per_eval": perturbations_per_eval}


def _ablate(job: _Job, mask: Tensor, base: Tensor, perturbations_per_eval: int) -> Tensor:
    """captum FeatureAblation with ``mask`` ``(1 | B, L, T)``; each feature's effect spread over its samples."""
    from captum.attr import FeatureAblation

    if base.shape[0] == 1:
        base = base.expand_as(job.x).contiguous()
    with torch.inference_mode():
        v = FeatureAblation(job.fn).attribute(job.x, baselines=base, target=job.target, feature_mask=mask,
                                              perturbations_per_eval=perturbations_per_eval,
                                              additional_forward_args=job.args)
    v = v.clone()
    m = mask.expand_as(job.x).reshape(job.x.shape[0], -1)
    # the samples of absent (zero-filled) leads are cleared from every map afterwards: a feature's effect is spread
    # over its present samples only, so that its sum stays the effect (it was 1/3 of it for a 1-of-3-lead record)
    here = present_rows(job.x)[:, :, None].expand_as(job.x).reshape(job.x.shape[0], -1).to(torch.float32)
    counts = torch.zeros(m.shape[0], int(m.max()) + 1, device=m.device).scatter_add_(1, m, here)
    size = counts.gather(1, m).reshape(job.x.shape)
    return v * here.reshape(job.x.shape).to(v.dtype) / size.clamp_min(1)


def _m_lead_ablation(job: _Job, baselines: Any = "zeros", perturbations_per_eval: int = 12, recorded: Any = None,
                     ) -> tuple[Tensor, None, dict]:
    """Baseline ``"zeros"`` = lead absent, ecgfm's convention for missing leads. ``recorded``: the baseline equals
    the input outside the recorded samples (:func:`_confined_baseline`)."""
    _check_positive_int("lead_ablation", "perturbations_per_eval", perturbations_per_eval)
    b, n_l, n_t = job.x.shape
    mask = torch.arange(n_l, device=job.x.device)[None, :, None].expand(1, n_l, n_t)
    v = _ablate(job, mask, _confined_baseline(make_baseline(baselines, job.x, job.fs), job.x, recorded),
                perturbations_per_eval)
    return v, None, {"baselines": _baseline_name(baselines), "perturbations_per_eval": perturbations_per_eval}


def _m_wave_ablation(job: _Job, r_peaks: Sequence[np.ndarray] | None = None, per_beat: bool = False,
                     by_lead: bool = False, baselines: Any = "smoothed", perturbations_per_eval: int = 16,
                     recorded: Any = None) -> tuple[Tensor, None, dict]:
    """P / QRS / T segments (all beats of a wave together, or each beat with ``per_beat``) replaced by the
    baseline; the remainder (PR, ST-free TP segments) is the feature ``"other"``. ``recorded``: the baseline equals
    the input outside the recorded samples (:func:`_confined_baseline`), so ablating ``"other"`` leaves the zero
    padding of a short record at zero."""
    _check_positive_int("wave_ablation", "perturbations_per_eval", perturbations_per_eval)
    b, n_l, n_t = job.x.shape
    if r_peaks is None:
        r_peaks = waves_mod.detect_r_peaks_batch(job.x, job.fs)
    masks = []
    for r in r_peaks:
        win = waves_mod.wave_windows(r, job.fs, n_t)
        masks.append(waves_mod.wave_feature_mask(win, n_l, n_t, per_beat=per_beat, by_lead=by_lead)[0])
    mask = torch.stack(masks).to(job.x.device)
    v = _ablate(job, mask, _confined_baseline(make_baseline(baselines, job.x, job.fs), job.x, recorded),
                perturbations_per_eval)
    return v, None, {"per_beat": per_beat, "by_lead": by_lead, "baselines": _baseline_name(baselines),
                     "n_beats": [int(len(r)) for r in r_peaks], "perturbations_per_eval": perturbations_per_eval}


def _grid_lead_resolution(cam: Tensor, n_leads: int) -> str:
    """How a ``(B, 1, H, W)`` map resolves ``n_leads`` leads (see :data:`LEAD_RESOLUTIONS`)."""
    h = int(cam.shape[2])
    return "per-lead" if h == n_leads else ("none" if h == 1 else "interpolated")


def _upsample_grid(cam: Tensor, n_leads: int, n_t: int, offset: float | None = None) -> Tensor:
    """``(B, 1, H, W)`` -> ``(B, L, T)``: rows equal to the leads keep their lead, a single row is broadcast to
    every lead; time is linearly interpolated with column ``k`` centred on input sample ``offset + k*s``,
    ``s = ceil(T / W)`` the layer's total stride, when the columns tile the input as a "same"-padded strided CNN's
    do (``W = ceil(T / s)``: when ``s`` does not divide ``T``, stretching ``W`` columns over ``T`` samples would
    drift by up to ``s`` samples along the record); values beyond the first / last column's centre are held.
    ``offset`` None: ``(s - 1) / 2``, the centre of samples ``k*s .. k*s + s - 1`` (a ViT's patches, non-overlapping
    pooling); a CNN layer's columns sit where :func:`_measured_column_offset` finds them (for ecgfm's stride-32
    ResNets ~13-15 samples after ``k*s``, not at the centre ``k*s`` of their symmetric receptive field). Other
    layouts (unpadded convolutions, floor-mode pooling) are stretched over the ``T`` samples."""
    b, _, h, w = cam.shape
    stride = -(-n_t // w) if w < n_t else None
    if stride is not None and -(-n_t // stride) != w:
        # the columns do not tile the input as a "same"-padded stride-s layer's do (an unpadded convolution has
        # T - k + 1 columns, a floor-mode pooling floor(T / s)): stretched over the input as before
        stride = None
    if h not in (1, n_leads):
        cam = F.interpolate(cam, size=(n_leads, w), mode="bilinear", align_corners=False)
    rows = cam[:, 0]                                                                  # (B, H', W)
    if stride is None:
        up = F.interpolate(rows, size=n_t, mode="linear", align_corners=False)
    else:
        centre = (stride - 1) / 2 if offset is None else float(offset)
        pos = ((torch.arange(n_t, dtype=torch.float64, device=cam.device) - centre) / stride).clamp(0, w - 1)
        i0 = pos.floor().long()
        i1 = (i0 + 1).clamp_max(w - 1)
        frac = (pos - i0).to(rows.dtype)
        up = rows[..., i0] * (1 - frac) + rows[..., i1] * frac
    return up.expand(b, n_leads, n_t).contiguous()


_SWEEP_ROUNDS = 4   # waves per phase of the stride in _measured_column_offset's sweep (4 x 32 waves in all)


def _probe_key(x_row: Tensor) -> tuple[tuple[bool, ...], float]:
    """What :func:`_measured_column_offset`'s probe is built from for one record ``x_row (L, T)``: its present leads
    and its signal's sd rounded to a power of two (the probe's amplitude). Records with the same key get the same
    probe, hence the same column offset."""
    present = present_rows(x_row[None].detach())[0]                                   # (L,)
    sd = float(x_row.detach()[present].std()) if bool(present.any()) and x_row.shape[-1] > 1 else 1.0
    scale = 2.0 ** round(math.log2(max(sd, 1e-3))) if math.isfinite(sd) else 1.0
    return tuple(bool(p) for p in present.tolist()), scale


def _column_offsets(job: "_Job", layer: str, layer_layout: str | None) -> list[float | None]:
    """:func:`_measured_column_offset` of every record of the job, measured once per distinct probe
    (:func:`_probe_key`: present leads and amplitude) on the first record that has it, so that a record's map is
    placed as when it is explained alone, whatever records share its batch (measured once on the batch's first
    record, a 3-lead record behind a 12-lead one was drawn with the 12-lead record's offset)."""
    measured: dict[tuple, float | None] = {}
    out = []
    for b in range(job.x.shape[0]):
        key = _probe_key(job.x[b])
        if key not in measured:
            measured[key] = _measured_column_offset(job, layer, layer_layout, record=b)
        out.append(measured[key])
    return out


def _upsample_per_record(cam: Tensor, n_leads: int, n_t: int, offsets: Sequence[float | None]) -> Tensor:
    """:func:`_upsample_grid` of each record of ``cam (B, 1, H, W)`` with its own column offset."""
    if len(set(offsets)) == 1:
        return _upsample_grid(cam, n_leads, n_t, offsets[0])
    return torch.cat([_upsample_grid(cam[b:b + 1], n_leads, n_t, o) for b, o in enumerate(offsets)])


def _measured_column_offset(job: "_Job", layer: str, layer_layout: str | None, record: int = 0) -> float | None:
    """Where a CNN layer's columns sit on the input, measured: column ``k`` is drawn at ``offset + k*s``, the centre
    of the wave positions that move column ``k`` more than any other column. None when it cannot be measured
    (:func:`_upsample_grid` then uses patch centres or stretches the map).

    Measured on a probe, not on the records: seeded Gaussian noise on the present leads of record ``record`` of the
    job (default the first), at its sd rounded to a power of two (:func:`_probe_key`). So every record of one lead
    set, amplitude class (sd to a power of two) and length gets the same placement (measured on the record itself, the offset moved by a sample or two from
    record to record, and maps of two records, e.g. with and without a wave, were drawn shifted against each other);
    and noise leaves no ReLU dead over a flat stretch. A batch mixing lead sets is measured once per probe
    (:func:`_column_offsets`).

    1. Receptive field: the input samples that the middle column and the next one depend on (non-zero gradient,
       summed over channels and four noise draws). None when that support reaches either end of the input (a
       receptive field wider than the record, or a global operation such as squeeze-excitation or attention), when
       the two supports are not the same stretch one stride apart (the columns are not a strided layer's; either
       edge may differ by ``max(1, s // 4)`` samples, as a unit dead at the edge of one field trims it by a few
       samples: 4 to 16 in narrow resnets, which the exact check refused), or when the layer has no time columns
       (transformer tokens).
    2. Wave sweep: Gaussian waves (sd ``s / 16`` samples, at least 1; height the probe's sd, on the present leads)
       are added to the first noise draw, ``_SWEEP_ROUNDS`` times at each of ``N = max(s, 32)`` evenly spaced
       phases of one stride, spread over the columns away from the input's ends and placed, several per forward
       pass, so far apart that no column which can read one wave reads another. For each wave, the column (among
       those whose field holds it) whose channels change most (sum of ``|change|``) is the one that responds.
       ``offset`` is the mean of ``wave position - s * responding column``, rounded to 0.1 sample: the centre of
       the stretch of input each column answers for, where a map's change caused by a wave there should be drawn.
       It costs ``4 N`` forward passes of one input at most (fewer on long inputs, where waves share a pass).

    Why measured and not assumed: neither the patch centre ``k*s + (s-1)/2`` nor the centre of the receptive
    field's support is right for every strided CNN. ecgfm's ResNets have a support symmetric about ``k*s``
    ("same"-padded strided convolutions), but the ``AvgPool(2)`` shortcut of each strided block reads samples
    ``2j, 2j + 1``, so most of a trained network's weight lies to the right: the demo's stride-32 resnet1d_tiny
    answers for samples ``k*s - 3 .. k*s + 28`` (offset ~13-15), and the support midpoint (0, used from 2026-12-06
    until this sweep) drew its maps ~13 samples (~130 ms at 100 Hz) early. The |gradient|-weighted centre of the
    receptive field is not used either: its wide, faint tails pull it away from where the column responds
    (1.5 samples off on the trained demo at 1000 samples, 5.7 at 5000; 8-16 on untrained resnet1d_tiny models).
    """
    module = job.wrapper.layer(layer)
    store: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        store["o"] = out[0] if isinstance(out, (tuple, list)) else out

    def columns(out: Any) -> Tensor | None:
        """The layer output as ``(B, C', W)`` time columns, or None (transformer tokens, no time axis)."""
        if not isinstance(out, Tensor) or out.ndim not in (3, 4) or (out.ndim == 3
                                                                      and job.wrapper._is_token_output(out)):
            return None   # transformer tokens: every token reads the whole input; patch centres are exact
        if out.ndim == 3 and _feature_layout(job, out, layer, layer_layout) == "BTC":
            out = out.transpose(1, 2)
        return out.flatten(1, -2)

    n_t = job.x.shape[-1]
    # the probe: seeded noise on the record's present leads, at its sd rounded to a power of two, so that every
    # record (of that lead set, amplitude class and length) gets the same placement; noise leaves no ReLU dead over a flat stretch,
    # which would cut the support short
    first = job.x[record:record + 1].detach()
    leads, scale = _probe_key(first[0])
    present = torch.tensor(leads, device=first.device)[None, :, None].to(first.dtype)   # (1, L, 1)
    g = torch.Generator(device="cpu").manual_seed(0)
    probes = torch.randn((4,) + tuple(first.shape[1:]), generator=g).to(first.device, first.dtype) * scale * present
    x = probes[:1]
    args0 = _record_args(job, record)
    per_record = [isinstance(a, Tensor) and a.shape[:1] == job.x.shape[:1] for a in (job.args or ())]

    def batch_args(n: int) -> tuple:
        return tuple(a.expand(n, *a.shape[1:]) if per else a for a, per in zip(args0, per_record))
    handle = module.register_forward_hook(hook)
    try:
        with job.wrapper.evaluating():
            with torch.enable_grad():
                xg = probes.clone().requires_grad_(True)      # four noise draws: a unit dead at the edge of
                job.fn(xg, *batch_args(len(xg)))               # one draw's field does not trim the support
                out = columns(store.pop("o", None))
                if out is None:
                    return None
                w = out.shape[-1]
                stride = -(-n_t // w) if 1 < w < n_t else None
                if stride is None or -(-n_t // stride) != w:
                    return None
                support = []
                for k in (w // 2, w // 2 + 1):
                    (gk,) = torch.autograd.grad(out[..., k].sum(), xg, retain_graph=k == w // 2)
                    mass = gk.detach().abs().sum(dim=(0, 1))                           # (T,)
                    nz = torch.nonzero(mass > 1e-12 * float(mass.max().clamp_min(1e-30))).flatten()
                    if len(nz) == 0 or int(nz[0]) == 0 or int(nz[-1]) == n_t - 1:
                        return None
                    support.append((int(nz[0]) - k * stride, int(nz[-1]) - k * stride))
                del xg, out
            if any(abs(a - b) > max(1, stride // 4) for a, b in zip(*support)):
                return None                   # a strided layer's columns read the same stretch, one stride on
            lo, hi = min(support[0][0], support[1][0]), max(support[0][1], support[1][1])
            # a wave at k*s .. k*s + s lies in the fields of columns k + kl .. k + kr; waves gap columns apart
            # are never read by one column
            kl, kr = -(hi // stride) - 1, -(lo // stride) + 1
            gap = max(kr + hi // stride + 1, 2 - kl - lo // stride)
            sites = [k for k in range(w) if k * stride + lo - stride >= 0
                     and k * stride + hi + stride <= n_t - 1] or [w // 2]
            n_phase = max(stride, 32)
            n_wave = n_phase * _SWEEP_ROUNDS
            waves: list[tuple[int, int, float]] = []                      # (forward pass, column, wave position)
            n_pass = 0
            while len(waves) < n_wave:         # pass p: every gap-th site from the (p mod gap)-th on
                for k in sites[n_pass % min(gap, len(sites))::gap][:n_wave - len(waves)]:
                    waves.append((n_pass, k, k * stride + (len(waves) % n_phase) * stride / n_phase))
                n_pass += 1
            t = torch.arange(n_t, dtype=x.dtype, device=x.device)
            shape = torch.exp(-0.5 * ((t - torch.tensor([v[2] for v in waves], dtype=x.dtype, device=x.device)
                                       [:, None]) / max(1.0, stride / 16)) ** 2)          # (n_wave, T)
            inputs = torch.zeros(n_pass, n_t, dtype=x.dtype, device=x.device).index_add_(
                0, torch.tensor([v[0] for v in waves], device=x.device), shape)          # (n_pass, T)
            height = scale * present                                                   # (1, L, 1)
            with torch.no_grad():
                job.fn(x, *args0)
                a0 = columns(store.pop("o"))
                resp = []
                for first in range(0, n_pass, 32):
                    chunk = inputs[first:first + 32]
                    job.fn(x + height * chunk[:, None], *batch_args(len(chunk)))
                    resp.append((columns(store.pop("o")) - a0).abs().sum(1).float().cpu())  # (n, W)
                resp = torch.cat(resp)
    finally:
        handle.remove()
    d = []
    for p, k, pos in waves:
        j0 = max(0, k + kl)
        r = resp[p, j0:k + kr + 1]
        if float(r.max()) > 0:
            d.append(pos - stride * (j0 + int(r.argmax())))
    if len(d) < n_wave // 2:      # the layer does not respond to waves (dead units, a constant output)
        return None
    return round(float(np.mean(d)), 1)


def _default_layer(job: "_Job") -> str:
    """The last module, in execution order, whose output still has a time axis: ``(B, C, T')`` maps of a CNN
    (for ecgfm's xresnet1d the whole ``stages`` output, i.e. ``forward_features``), ``(B, N, D)`` tokens of a
    transformer (ViT-1D: the final norm). One probe forward pass on the first input finds it."""
    order: list[str] = []
    handles = []

    def make(name: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(out, Tensor) and out.ndim in (3, 4) and out.shape[-1] > 1:
                order.append(name)
        return hook

    for name, module in job.wrapper.model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make(name)))
    try:
        with torch.no_grad():
            job.first()
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("no layer with a time axis found: pass layer= "
                         f"(available: {', '.join(job.wrapper.layer_names())})")
    return order[-1]


LAYER_LAYOUTS = ("BCT", "BTC")


def _feature_layout(job: _Job, out: Tensor, layer: str, layer_layout: str | None) -> str | None:
    """``"BCT"`` / ``"BTC"`` for a 3-D feature map (not transformer tokens) of ``layer``, None otherwise. A
    channels-first model's maps are ``(B, C, T')``; a channels-last model (``input_layout="BTL"``) may give
    either, which the shape cannot tell (``(B, 500, 16)`` is 500 positions of 16 channels or the reverse), so it
    must be said (``layer_layout=``): read the wrong way, the map would put channels on the time axis."""
    if out.ndim != 3 or job.wrapper._is_token_output(out):
        return None
    if layer_layout is not None:
        if layer_layout not in LAYER_LAYOUTS:
            raise ValueError(f"layer_layout must be one of {LAYER_LAYOUTS}, got {layer_layout!r}")
        return layer_layout
    if job.wrapper.input_layout == "BTL":
        raise ValueError(f"a channels-last model (input_layout='BTL'): is the output {tuple(out.shape)} of layer "
                         f"{layer!r} (batch, channels, time) or (batch, time, channels)? pass "
                         f"layer_layout='BCT' or 'BTC' in the method's options")
    return "BCT"


def _layer_job_grads(job: _Job, layer: str, layer_layout: str | None = None) -> tuple[Tensor, Tensor]:
    """Grid-shaped ``(B, D, H, W)`` activations and gradients of ``layer`` for the job's objective (a
    ``(B, T', C)`` feature map is put channels first, see :func:`_feature_layout`)."""
    acts, grads, _ = job.wrapper.activations_and_gradients(job.x, layer, objective=job.score)
    if _feature_layout(job, acts, layer, layer_layout) == "BTC":
        acts, grads = acts.transpose(1, 2), grads.transpose(1, 2)
    return job.wrapper.grid_reshape(acts), job.wrapper.grid_reshape(grads)


def _m_gradcam(job: _Job, layer: str | None = None, relu: bool = True, layer_layout: str | None = None
               ) -> tuple[Tensor, None, dict]:
    layer = layer or _default_layer(job)
    module = job.wrapper.layer(layer)
    n_l, n_t = job.x.shape[1:]
    probe: dict[str, Tensor] = {}
    h = module.register_forward_hook(lambda _m, _i, o: probe.setdefault("o", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            job.first()
    finally:
        h.remove()
    if "o" not in probe:
        raise ValueError(f"layer {layer!r} was not used in the forward pass")
    is_tokens = probe["o"].ndim == 3 and job.wrapper._is_token_output(probe["o"])
    layout = _feature_layout(job, probe["o"], layer, layer_layout)
    if not is_tokens and (probe["o"].ndim == 4 or layout == "BCT"):   # captum averages over dims 2+
        from captum.attr import LayerGradCam

        cam = LayerGradCam(job.fn, module).attribute(job.x, target=job.target, relu_attributions=relu,
                                                     additional_forward_args=job.args)
        if cam.ndim == 3:
            cam = cam[:, :, None, :]
        impl = "captum.LayerGradCam"
    else:
        acts, grads = _layer_job_grads(job, layer, layer_layout)
        # global average of the gradients over the positions the model has: a lead-aware model on a lead subset,
        # or an encoder reading input_leads, has no token at the other leads' (zero) rows of the grid
        tokens = job.wrapper.grid_token_rows()
        rows = tokens if tokens is not None and grads.shape[2] == job.wrapper.n_leads else grads.shape[2]
        weights = grads.sum(dim=(2, 3), keepdim=True) / (rows * grads.shape[3])
        cam = (weights * acts).sum(1, keepdim=True)
        if relu:
            cam = cam.clamp_min(0)
        impl = "tokens_to_grid"
    offsets = [None] * job.x.shape[0] if is_tokens else _column_offsets(job, layer, layer_layout)
    return _upsample_per_record(cam.detach(), n_l, n_t, offsets), None, {
        "layer": layer, "relu": relu, "impl": impl, "layer_layout": layout,
        "lead_resolution": _grid_lead_resolution(cam, n_l), **_offset_option(offsets)}


def _m_gradcam_pp(job: _Job, layer: str | None = None, layer_layout: str | None = None
                  ) -> tuple[Tensor, None, dict]:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential-score closed form:
    alpha = g^2 / (2 g^2 + sum(A) g^3), w_c = sum(alpha * relu(g)))."""
    layer = layer or _default_layer(job)
    n_l, n_t = job.x.shape[1:]
    acts, grads = _layer_job_grads(job, layer, layer_layout)
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * grads.clamp_min(0)).sum(dim=(2, 3), keepdim=True)
    cam = (weights * acts).sum(1, keepdim=True).clamp_min(0)
    offsets = _column_offsets(job, layer, layer_layout)
    return _upsample_per_record(cam, n_l, n_t, offsets), None, {"layer": layer,
                                                                "lead_resolution": _grid_lead_resolution(cam, n_l),
                                                                **_offset_option(offsets)}


def _offset_option(offsets: float | None | Sequence[float | None]) -> dict[str, Any]:
    """How a layer map's columns were placed on the input (options of Grad-CAM / Grad-CAM++): one offset, or one
    per record (:func:`_column_offsets`), said once when every record has the same and per record otherwise."""
    if not isinstance(offsets, (list, tuple)):
        offsets = [offsets]

    def words(offset: float | None) -> str:
        return "patch centres (k*s + (s-1)/2) or stretched" if offset is None else f"{offset:g} + k*s"

    if len(set(offsets)) <= 1:
        offset = offsets[0] if offsets else None
        if offset is None:
            return {"column_centres": words(None)}
        return {"column_centres": f"measured by a wave sweep: the centre of the wave positions each column "
                                  f"responds to most ({words(offset)})"}
    # records of different lead sets (or amplitudes) in one batch: each placed with its own probe's offset
    per = "; ".join(f"record {b}: {words(o)}" for b, o in enumerate(offsets))
    return {"column_centres": f"measured by a wave sweep per record's lead set: the centre of the wave positions "
                              f"each column responds to most ({per})"}


def _m_attention_rollout(job: _Job, head_fusion: str = "mean", residual: float = 0.5,
                         ) -> tuple[Tensor, None, dict]:
    """Attention rollout (Abnar & Zuidema 2020): ``A_l' = residual * I + (1 - residual) * fuse_heads(A_l)``,
    rows normalised, ``R = A_L' ... A_1'``; the relevance of input token j is the mean over the pooled (patch)
    output tokens of ``R[:, j]``, mapped back to (lead, time) with
    ``tokens_to_grid`` (each row on its own lead: :meth:`ECGWrapper.token_grid`). Target-free (the same map for every
    class)."""
    enc = job.wrapper.encoder
    fn = getattr(enc, "attention_maps", None)
    to_grid = getattr(enc, "tokens_to_grid", None)
    if not callable(fn) or not callable(to_grid):
        raise ValueError("attention_rollout needs a ViT-1D encoder with attention_maps(x) and tokens_to_grid")
    leads = job.wrapper.present_lead_indices()
    with torch.no_grad():
        if leads is None:
            maps = fn(job.x)
        else:   # a lead-aware model on a record's present leads: the attention it runs has only their tokens
            from ecgfm.backbones.vit1d import block_attention_maps

            maps = block_attention_maps(enc.blocks, enc.embed_lead_tokens(job.x, leads.to(job.x.device)))
        n = maps[0].shape[-1]
        eye = torch.eye(n, device=job.x.device)
        roll = eye.expand(job.x.shape[0], n, n)
        for a in maps:
            if head_fusion == "mean":
                a = a.mean(1)
            elif head_fusion == "max":
                a = a.amax(1)
            elif head_fusion == "min":
                a = a.amin(1)
            else:
                raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
            a = residual * eye + (1 - residual) * a
            a = a / a.sum(-1, keepdim=True)
            roll = a @ roll
        # ViT-1D has no class token and pools the mean of its patch tokens: average the rows of those tokens
        # (SEP tokens are not pooled, so their rows are left out; tokens_to_grid drops their columns).
        count = getattr(enc, "num_patch_tokens", None)
        if leads is not None:
            k = n - 2 * len(leads)                                 # the present leads' patch tokens
        else:
            k = int(count(roll)) if callable(count) else n
        rel = roll[:, :k].mean(1)                                  # (B, N_tok)
        grid = job.wrapper.token_grid(rel[:, :, None], job.x.shape[-1])   # (B, 1, leads, patches)
    return _upsample_grid(grid, *job.x.shape[1:]), None, {
        "head_fusion": head_fusion, "residual": residual,
        "lead_resolution": _grid_lead_resolution(grid, job.x.shape[1])}


METHODS: dict[str, Callable[..., tuple[Tensor, Tensor | None, dict]]] = {
    "saliency": _m_saliency,
    "input_x_gradient": _m_input_x_gradient,
    "smoothgrad": _m_smoothgrad,
    "integrated_gradients": _m_integrated_gradients,
    "deeplift": _m_deeplift,
    "gradient_shap": _m_gradient_shap,
    "occlusion": _m_occlusion,
    "lead_ablation": _m_lead_ablation,
    "wave_ablation": _m_wave_ablation,
    "gradcam": _m_gradcam,
    "gradcam++": _m_gradcam_pp,
    "attention_rollout": _m_attention_rollout,
}
ALIASES: dict[str, str] = {
    "ig": "integrated_gradients", "grad_cam": "gradcam", "gradcampp": "gradcam++", "gradcam_pp": "gradcam++",
    "grad_cam++": "gradcam++", "gradshap": "gradient_shap", "ixg": "input_x_gradient", "rollout": "attention_rollout",
}
# Methods that only run forward passes (no gradient): used by faithfulness checks and benchmarks.
FORWARD_ONLY = frozenset({"occlusion", "lead_ablation", "wave_ablation", "attention_rollout"})


def canonical_method(name: str) -> str:
    """Canonical name of a method or alias (case-insensitive).

    Raises:
        ValueError: unknown method (lists the known ones).
    """
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; known: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return key


# ---------------------------------------------------------------------------------------------------------------
# Explainer


def present_rows(x: Tensor) -> Tensor:
    """``(B, L)`` bool: the rows of ``(B, L, T)`` inputs that are not all zero (absent leads are zero-filled)."""
    return x.detach().abs().amax(-1) > 0


def recorded_samples(x: Tensor, recorded: Any = None) -> Tensor:
    """``(B, L, T)`` bool: the samples of ``(B, L, T)`` inputs that are recorded signal.

    A sample is recorded when its lead is present (:func:`present_rows`) and ``recorded`` marks it: the zero
    padding of a record shorter than the model's window (``t >= n_real``) is neither signal to delete, insert or
    change nor a sample a map can be right or wrong about.

    Args:
        x: ``(B, L, T)`` model inputs.
        recorded: None (every sample of a present lead), or a bool mask of ``(T,)``, ``(B, T)`` or ``(B, L, T)``
            (numpy or torch), e.g. ``arange(T) < n_real``.

    Returns:
        ``(B, L, T)`` bool on ``x``'s device.

    Raises:
        ValueError: a mask that does not broadcast to ``x``.
    """
    keep = present_rows(x)[:, :, None].expand(x.shape)
    if recorded is None:
        return keep
    r = torch.as_tensor(np.asarray(recorded) if not isinstance(recorded, Tensor) else recorded,
                        device=x.device).bool()
    if r.ndim == 1:
        r = r[None, None, :]
    elif r.ndim == 2:
        r = r[:, None, :]
    try:
        return keep & r.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"recorded mask {tuple(r.shape)} does not match inputs {tuple(x.shape)}: give (T,), "
                         "(B, T) or (B, L, T)") from None


@contextlib.contextmanager
def _seeded_by_record(x_row: Tensor):
    """Seed torch (every device) and numpy's global RNG from one record's content (:func:`record_seed`) for the
    block, restoring both afterwards: captum's stochastic methods draw from them for the whole batch."""
    seed = record_seed(x_row)
    state = np.random.get_state()
    # every CUDA device: torch.manual_seed reseeds them all, and fork_rng restores only those it is given
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            np.random.set_state(state)


def _record_args(job: "_Job", b: int) -> tuple:
    """The job's additional forward arguments for record ``b`` alone (per-record tensors sliced)."""
    return tuple(a[b:b + 1] if isinstance(a, Tensor) and a.shape[:1] == job.x.shape[:1] else a
                 for a in (job.args or ()))


def check_method_options(key: str, options: Mapping[str, Any]) -> None:
    """Refuse options a method does not take (``key`` canonical, see :func:`canonical_method`).

    Raises:
        ecgfm.config.ConfigError: (a ``ValueError``) naming ``method_options.<key>``, the unknown options and the
            known ones.
    """
    from ecgfm.config import ConfigError

    known = [p for p in inspect.signature(METHODS[key]).parameters if p != "job"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"method_options.{key}", f"unknown option(s) {unknown} for method {key!r}; known: {known}")


def record_seed(x_row: Tensor, seed: int = 0) -> int:
    """A seed drawn from one record's content (plus ``seed``): the same record gets the same random draws alone or
    anywhere in a batch."""
    import hashlib

    digest = hashlib.sha256(x_row.detach().float().cpu().numpy().tobytes()).digest()
    return (int.from_bytes(digest[:8], "little") + int(seed)) % (2 ** 63)


def _absent_leads_zeroed(values: Tensor, delta: Tensor | None, x: Tensor, used: dict
                         ) -> tuple[Tensor, Tensor | None]:
    """``values`` with the rows of absent leads (all-zero, zero-filled rows of ``x``) set to 0, and the convergence
    ``delta`` kept true of the map returned (``sum(values) - (f(x) - f(baseline))`` loses what was cleared).

    A model that was not trained with lead masks still has a gradient on a zero-filled row, and broadcast maps
    (Grad-CAM) paint every row: without this, leads the record does not have were ranked, charted and counted as
    evidence. ``used["absent_leads_zeroed"]`` records how many (record, lead) rows were cleared.
    """
    absent = ~present_rows(x)                                      # (B, L)
    if not bool(absent.any()):
        return values, delta
    used["absent_leads_zeroed"] = int(absent.sum())
    mask = absent[:, :, None].to(values.device)
    if delta is not None:
        removed = (values * mask).flatten(1).sum(1)
        delta = delta - removed.to(delta.device, delta.dtype)
    return values.masked_fill(mask, 0.0), delta


class Explainer:
    """Batched attributions for a wrapped ECG model.

    Args:
        wrapper: the :class:`~ecgfm.explain.wrapper.ECGWrapper`.

    Example:
        >>> att = Explainer(wrapper).explain(x, target=None, method="ig", n_steps=16)
        >>> att.values.shape == x.shape, att.per_lead().shape  # (B, L)
    """

    METHODS = tuple(METHODS)

    def __init__(self, wrapper: ECGWrapper):
        if not isinstance(wrapper, ECGWrapper):
            raise ValueError(f"Explainer needs an ECGWrapper, got {type(wrapper).__name__}")
        self.wrapper = wrapper

    def _inputs(self, inputs: Any, fs: float | None, lead_names: Sequence[str] | None) -> Tensor:
        if isinstance(inputs, Tensor) and fs is None and lead_names is None:
            x = inputs.to(self.wrapper.device, torch.float32)
            if x.ndim == 2:
                x = x[None]
            return self.wrapper.check(x)
        return self.wrapper.prepare(inputs, fs=fs, lead_names=lead_names)

    def explain(self, inputs: Any, target: Any = None, method: str = "integrated_gradients",
                output: str = "logit", fs: float | None = None, lead_names: Sequence[str] | None = None,
                **options: Any) -> Attribution:
        """Explain a batch.

        Args:
            inputs: ``(B, L, T)`` tensor in the model's input space (checked), or raw data / records with
                ``fs`` / ``lead_names``, converted by :meth:`ECGWrapper.prepare`.
            target: class index / name per input or for all; ``None``: each input's predicted class.
            method: a key of :data:`METHODS` or an alias (``"ig"``, ``"gradcampp"`` ...).
            output: ``"logit"`` (default) or ``"proba"`` (explain the post-processed probability).
            fs: sampling rate of raw ``inputs`` (triggers conversion).
            lead_names: lead names of raw ``inputs`` (triggers conversion).
            **options: method options (see each method; e.g. ``n_steps``, ``baselines``, ``layer``,
                ``window_s``).

        Returns:
            :class:`Attribution` with ``values`` shaped like the (converted) inputs.

        Raises:
            ValueError: unknown method or option, a target outside the classes, bad inputs.
        """
        key = canonical_method(method)
        x = self._inputs(inputs, fs, lead_names)
        fn = _ClassObjective(self.wrapper, output)
        with self.wrapper.evaluating():
            with torch.no_grad():
                logits = fn(x)
            t = self.wrapper.resolve_target(target, logits)
            job = _Job(self.wrapper, fn, x, t, None, self.wrapper.fs)
            values, delta, used, elapsed = self._run(key, job, options)
        values, delta = _absent_leads_zeroed(values, delta, x, used)
        return Attribution(values=values, method=key, options={**used, "output": output}, target=t,
                           inputs=x.detach(), fs=self.wrapper.fs, lead_names=self.wrapper.lead_names,
                           elapsed_s=elapsed, delta=delta, call_options={**options, "output": output})

    def explain_embedding(self, inputs: Any, reference: Any = None, direction: Tensor | None = None,
                          method: str = "integrated_gradients", fs: float | None = None,
                          lead_names: Sequence[str] | None = None, **options: Any) -> Attribution:
        """Explain the encoder itself, with no classifier.

        The explained score of input ``i`` is ``cos(embed(x_i), embed(r_i))`` for a reference ECG ``r`` (one
        for all or one per input: what makes two ECGs similar to the encoder), or ``<embed(x_i), u>`` for a
        unit direction ``u`` in embedding space (e.g. a linear-probe weight or a difference of class means).
        Default (neither given): ``u`` is the input's own embedding direction, i.e. what builds the input's
        representation (relative to the baseline for path methods).

        Args:
            inputs: as in :meth:`explain`.
            reference: ``(L, T)`` / ``(1, L, T)`` / ``(B, L, T)`` reference ECG(s) in model space, or None.
            direction: ``(D,)`` embedding direction (exclusive with ``reference``).
            method: any method (see :meth:`explain`).
            fs, lead_names: as in :meth:`explain`.
            **options: method options.

        Returns:
            :class:`Attribution` with ``target=None`` and ``options["objective"]`` describing the score.
        """
        key = canonical_method(method)
        if reference is not None and direction is not None:
            raise ValueError("pass either reference= or direction=, not both")
        x = self._inputs(inputs, fs, lead_names)
        with self.wrapper.evaluating():
            return self._explain_embedding(key, x, reference, direction, options)

    def _explain_embedding(self, key: str, x: Tensor, reference: Any, direction: Tensor | None,
                           options: dict) -> Attribution:
        b = x.shape[0]
        with torch.no_grad():
            if reference is None:
                if direction is None:
                    # Default: the input's own embedding direction. (Its cosine similarity would be maximal at
                    # the input, so every gradient-based method would return zeros there.)
                    d = self.wrapper.embed(x)
                    desc = "projection on the input's own (unit) embedding direction"
                else:
                    d = torch.as_tensor(direction, dtype=torch.float32, device=x.device).flatten()[None]
                    emb_dim = self.wrapper.embed(x[:1]).shape[1]
                    if d.shape[1] != emb_dim:
                        raise ValueError(f"direction has {d.shape[1]} values but the embedding has {emb_dim}")
                    desc = "projection on a given embedding direction"
                ref = (d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).expand(b, -1).contiguous()
                mode = "projection"
            else:
                r = torch.as_tensor(reference, dtype=torch.float32, device=x.device)
                r = self.wrapper.check(r[None] if r.ndim == 2 else r, where="<reference>")
                if r.shape[0] not in (1, b):
                    raise ValueError(f"reference batch {r.shape[0]} must be 1 or {b}")
                desc = "cosine similarity with a reference ECG's embedding"
                ref = self.wrapper.embed(r).expand(b, -1).contiguous()
                mode = "cosine"
        fn = EmbeddingObjective(self.wrapper, mode)
        job = _Job(self.wrapper, fn, x, torch.zeros(b, dtype=torch.long, device=x.device), (ref,),
                   self.wrapper.fs)
        values, delta, used, elapsed = self._run(key, job, options)
        values, delta = _absent_leads_zeroed(values, delta, x, used)
        return Attribution(values=values, method=key, options={**used, "objective": desc}, target=None,
                           inputs=x.detach(), fs=self.wrapper.fs, lead_names=self.wrapper.lead_names,
                           elapsed_s=elapsed, delta=delta)

    def _run(self, key: str, job: _Job, options: dict) -> tuple[Tensor, Tensor | None, dict, float]:
        impl = METHODS[key]
        check_method_options(key, options)
        # captum's one-off import (~0.5-1 s; every method but attention rollout uses it) is not part of a method's
        # time: a first call's elapsed_s was mostly import (0.86 s against 0.03 s warm for IG), so the first
        # method of a report looked the slowest
        import captum.attr  # noqa: F401
        t0 = time.perf_counter()
        with warnings.catch_warnings():   # eval mode: set by explain / explain_embedding around the whole job
            # captum notes that it switched on requires_grad / hooked non-linearities: expected here.
            warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
            warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")
            values, delta, used = impl(job, **options)
        if job.x.is_cuda:
            torch.cuda.synchronize(job.x.device)
        elapsed = time.perf_counter() - t0
        values = values.detach().to(job.x.dtype)
        if values.shape != job.x.shape:
            raise RuntimeError(f"method {key} returned {tuple(values.shape)} for inputs {tuple(job.x.shape)}")
        return values, (None if delta is None else delta.detach()), used, elapsed


def random_attribution(like: Attribution | Tensor, seed: int = 0) -> Tensor:
    """A random attribution (standard normal) shaped like ``like``: the reference every method must beat.

    Each record (row) draws its own values from ``seed`` and the record's content, so two records never share one
    random ordering, and a record gets the same ordering alone or anywhere in a batch (one generator seeded by
    ``seed`` would give row ``b`` of every batch the same values)."""
    values = like.values if isinstance(like, Attribution) else like
    x = like.inputs if isinstance(like, Attribution) else like
    rows = []
    for b in range(values.shape[0]):
        g = torch.Generator().manual_seed(record_seed(x[b], seed))
        rows.append(torch.randn(tuple(values.shape[1:]), generator=g))
    return torch.stack(rows).to(values.device)
