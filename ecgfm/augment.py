"""ECG augmentations on batches ``(B, L, T)`` on the device, with per-sample random parameters.

The signal transforms come from the ``ecg-augmentations`` package (optional dependency ``ecgfm[augment]``),
which is already what we want: every transform is a ``torch.nn.Module`` acting on a whole ``(B, C, T)`` batch
with vectorised tensor ops, draws per-sample parameters from an optional ``torch.Generator`` on the data's device,
and applies each sample with probability ``p``. This module adds what it lacks for ecgfm:

* lead-mask awareness: :class:`ECGAugment` re-zeroes absent leads after every pipeline (noise or wander must not
  invent a lead that was never recorded), and :class:`PresentLeadMask` masks only *present* leads and always
  keeps at least one (the package's ``LeadMask`` does not know which leads exist);
* :class:`RandomResizedCropSameLength`: a resized crop whose output length is the input length, so the preset
  works for any crop length without knowing it in advance;
* :func:`simclr_augment`, a preset for SimCLR on ECGs, and :func:`make_generator` for reproducible draws. Mehari &
  Strodthoff 2022 trained SimCLR on ECGs with a random resized crop plus "TimeOut" (a window of 0-50 % of the crop,
  uniformly drawn, set to zero, applied to every view; github.com/hhi-aml/ecg-selfsupervised,
  ``--trafos RandomResizedCrop TimeOut``). The preset's resized-crop scale (0.5, 1.0) matches theirs; its time
  mask does not: 0.1-0.5 s with probability 0.5 zeroes about 6 % of a 2.5 s crop on average (at most 20 %) and
  1.5 % of a 10 s crop (at most 5 %), against TimeOut's 25 % (at most 50 %). It adds amplitude scaling, baseline
  wander, powerline and Gaussian noise, a low-pass filter and a lead mask at moderate probabilities (not part of
  their recipe).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

try:  # a core dependency of ecgfm (pyproject.toml), guarded for an environment that lacks it
    import ecg_augmentations as ea
    from ecg_augmentations.base import Transform, as_range, uniform
    from ecg_augmentations.ops import interp
except ImportError as exc:  # pragma: no cover - exercised only without the package
    raise ImportError("ecgfm.augment needs the ecg-augmentations package, a dependency of ecgfm: "
                      "pip install ecg-augmentations (or reinstall ecgfm)") from exc

__all__ = [
    "ECGAugment", "PresentLeadMask", "RandomResizedCropSameLength", "simclr_augment", "make_generator",
    "AmplitudeScale", "GaussianNoise", "BaselineWander", "PowerlineNoise", "TimeMask", "LowPassFilter",
    "HighPassFilter", "RandomCrop",
]

# Re-exported signal transforms (batched, device-side, generator-driven).
AmplitudeScale = ea.AmplitudeScale
GaussianNoise = ea.GaussianNoise
BaselineWander = ea.BaselineWander
PowerlineNoise = ea.PowerlineNoise
TimeMask = ea.TimeMask
LowPassFilter = ea.LowPassFilter
HighPassFilter = ea.HighPassFilter
RandomCrop = ea.RandomCrop


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (pass it to :class:`ECGAugment`)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


class PresentLeadMask(Transform):
    """Zero a random number of *present* leads per sample, always keeping at least one present lead.

    Args:
        n_leads: number of leads to mask, or a ``(low, high)`` range (inclusive), capped at present - 1.
        p: per-sample probability of applying the mask.

    Call as ``t(x, generator=None, lead_mask=None)`` with ``x (B, L, T)`` and ``lead_mask (B, L)`` bool
    (``None`` = all present).
    """

    uses_lead_mask = True

    def __init__(self, n_leads: int | tuple[int, int] = (1, 3), p: float = 1.0) -> None:
        super().__init__(p)
        self.n_leads = tuple(int(n) for n in as_range(n_leads, "n_leads", low=0))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"expected a batch (B, L, T), got shape {tuple(x.shape)}")
        b, c, _ = x.shape
        present = torch.ones(b, c, dtype=torch.bool, device=x.device) if lead_mask is None else lead_mask.bool()
        n_present = present.sum(1, keepdim=True)                                     # (B, 1)
        lo, hi = self.n_leads
        draw = uniform((0, 1), (b, 1), x, generator)
        count = (lo + draw * (hi - lo + 1)).floor().clamp(max=hi)                    # uniform integer in [lo, hi]
        count = torch.minimum(count, (n_present - 1).clamp(min=0).to(count.dtype))
        # random order of the present leads: absent leads get key 2 so they sort last
        keys = torch.where(present, uniform((0, 1), (b, c), x, generator), torch.full_like(x[:, :, 0], 2.0))
        rank = keys.argsort(dim=1).argsort(dim=1)
        drop = (rank < count) & present & self.gate(x, generator)[:, None]
        return x.masked_fill(drop[:, :, None], 0.0)


class KeepOneLead(Transform):
    """Zero every lead but one of a multi-lead sample: a single-lead view of a 12-lead record.

    Single-lead corpora (CinC 2017: lead I) then meet 12-lead records as the encoder sees them downstream, and a
    SimCLR pair of a one-lead and a 12-lead view of the same record asks the one lead for what the record shows.
    Written here because ``ecg_augmentations`` has only random lead dropout, which leaves several leads.

    Args:
        lead: row of the lead to keep (0: lead I, the lead of one-lead corpora in the canonical order); when the
            sample has it at zero (absent, or zeroed by an earlier transform), its strongest lead is kept instead.
        p: per-sample probability; a sample with one present lead is left as it is.

    Call as ``t(x, generator=None, lead_mask=None)`` with ``x (B, L, T)`` and ``lead_mask (B, L)`` bool.
    """

    uses_lead_mask = True

    def __init__(self, lead: int = 0, p: float = 1.0) -> None:
        super().__init__(p)
        if int(lead) < 0:
            raise ValueError(f"lead must be a row index >= 0, got {lead}")
        self.lead = int(lead)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] <= self.lead:
            raise ValueError(f"expected a batch (B, L > {self.lead}, T), got shape {tuple(x.shape)}")
        b, c, _ = x.shape
        present = torch.ones(b, c, dtype=torch.bool, device=x.device) if lead_mask is None else lead_mask.bool()
        energy = x.abs().sum(-1) * present                                             # (B, L)
        keep = torch.where(energy[:, self.lead] > 0, torch.full_like(energy[:, 0], self.lead, dtype=torch.long),
                           energy.argmax(1))
        single = (torch.arange(c, device=x.device)[None, :] == keep[:, None])          # (B, L)
        apply = self.gate(x, generator) & ((energy > 0).sum(1) > 1)
        return x.masked_fill((apply[:, None] & ~single)[:, :, None], 0.0)


class RandomResizedCropSameLength(Transform):
    """Crop a random window (fraction ``scale`` of the input) and resample it back to the input length.

    The time axis is stretched by ``1 / fraction`` (heart rate and intervals change accordingly). Shared across
    leads, linear interpolation (``ecg_augmentations.ops.interp``).

    Args:
        scale: window length as a fraction of the input, or a ``(low, high)`` range in ``(0, 1]``.
        p: per-sample probability.
    """

    def __init__(self, scale: float | tuple[float, float] = (0.5, 1.0), p: float = 1.0) -> None:
        super().__init__(p)
        self.scale = as_range(scale, "scale", low=1e-6, high=1)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, t = x.shape
        length = (uniform(self.scale, (b, 1, 1), x, generator) * t).clamp(min=1)
        start = uniform((0, 1), (b, 1, 1), x, generator) * (t - length)
        step = (length - 1) / max(t - 1, 1)
        idx = torch.arange(t, device=x.device, dtype=x.dtype)
        return interp(x, start + idx * step)


class ECGAugment(nn.Module):
    """Apply transforms in order to a batch and keep absent leads at zero.

    Each transform is called as ``t(x, generator=generator)``; transforms with ``uses_lead_mask = True`` also
    receive ``lead_mask``. After the last transform, leads absent in ``lead_mask`` are set to zero again.

    Args:
        transforms: sequence of ``ecg_augmentations`` transforms or lead-mask-aware transforms from this module.

    Shapes:
        ``x (B, L, T)``, ``lead_mask (B, L)`` bool -> ``(B, L, T')`` (``T' = T`` unless a transform crops).
    """

    def __init__(self, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"expected a batch (B, L, T), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point batch, got {x.dtype}")
        if lead_mask is not None and lead_mask.shape != x.shape[:2]:
            raise ValueError(f"lead_mask must be {tuple(x.shape[:2])}, got {tuple(lead_mask.shape)}")
        for t in self.transforms:
            if getattr(t, "uses_lead_mask", False):
                x = t(x, generator=generator, lead_mask=lead_mask)
            else:
                x = t(x, generator=generator)
        if lead_mask is not None:
            x = x * lead_mask.to(x.dtype)[:, :, None]
        return x


def simclr_augment(fs: float = 100.0, crop_scale: tuple[float, float] = (0.5, 1.0), p_crop: float = 0.8,
                   amplitude: tuple[float, float] = (0.7, 1.4), p_amplitude: float = 0.5,
                   noise_snr_db: tuple[float, float] = (10.0, 30.0), p_noise: float = 0.8,
                   wander_amplitude: tuple[float, float] = (0.05, 0.5), p_wander: float = 0.5,
                   powerline_hz: float = 50.0, p_powerline: float = 0.3,
                   time_mask_s: tuple[float, float] = (0.1, 0.5), p_time_mask: float = 0.5,
                   lead_mask_leads: tuple[int, int] = (1, 6), p_lead_mask: float = 0.5,
                   lowpass_hz: tuple[float, float] = (15.0, 45.0), p_lowpass: float = 0.3,
                   one_lead: int = 0, p_one_lead: float = 0.0) -> ECGAugment:
    """Augmentation preset for SimCLR on ECGs (two independent calls give the two views).

    Order: resized crop, amplitude scale, baseline wander, powerline noise, low-pass, Gaussian noise, time mask,
    lead mask, one-lead view. A probability of 0 drops the transform. Powerline noise is dropped when
    ``fs <= 2 * powerline_hz`` (it would alias), the low-pass cut-off range is capped at ``0.45 * fs``.

    Args:
        fs: sampling rate of the batches (Hz), i.e. the cache's ``PreprocessSpec.fs``.
        crop_scale: resized-crop window fraction range.
        p_crop: probability of the resized crop.
        amplitude: log-uniform amplitude factor range (shared by the leads of a sample).
        p_amplitude: probability of the amplitude scale.
        noise_snr_db: SNR range (dB) of the white noise.
        p_noise: probability of the Gaussian noise.
        wander_amplitude: baseline-wander amplitude range relative to each lead's std.
        p_wander: probability of baseline wander (0.05-0.5 Hz sinusoids).
        powerline_hz: mains frequency.
        p_powerline: probability of powerline noise.
        time_mask_s: masked window length range (s).
        p_time_mask: probability of the time mask.
        lead_mask_leads: range of the number of present leads zeroed.
        p_lead_mask: probability of the lead mask.
        lowpass_hz: low-pass cut-off range (Hz).
        p_lowpass: probability of the low-pass filter.
        one_lead: the lead a one-lead view keeps (:class:`KeepOneLead`).
        p_one_lead: probability of a one-lead view of a multi-lead sample (0: never, the default).

    Returns:
        An :class:`ECGAugment`.
    """
    if fs <= 0:
        raise ValueError(f"fs must be > 0, got {fs}")
    t: list[nn.Module] = []
    if p_crop > 0:
        t.append(RandomResizedCropSameLength(crop_scale, p=p_crop))
    if p_amplitude > 0:
        t.append(ea.AmplitudeScale(amplitude, p=p_amplitude))
    if p_wander > 0:
        t.append(ea.BaselineWander(fs, amplitude=wander_amplitude, freq=(0.05, min(0.5, fs / 4)), p=p_wander))
    if p_powerline > 0 and fs > 2 * powerline_hz:
        t.append(ea.PowerlineNoise(fs, freq=powerline_hz, p=p_powerline))
    if p_lowpass > 0:
        hi = min(lowpass_hz[1], 0.45 * fs)
        lo = min(lowpass_hz[0], hi)
        t.append(ea.LowPassFilter(fs, cutoff=(lo, hi), p=p_lowpass))
    if p_noise > 0:
        t.append(ea.GaussianNoise(noise_snr_db, p=p_noise))
    if p_time_mask > 0:
        t.append(ea.TimeMask(fs, duration=time_mask_s, p=p_time_mask))
    if p_lead_mask > 0:
        t.append(PresentLeadMask(lead_mask_leads, p=p_lead_mask))
    if p_one_lead > 0:
        t.append(KeepOneLead(one_lead, p=p_one_lead))
    return ECGAugment(t)
