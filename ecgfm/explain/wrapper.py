"""A batched wrapper that makes any ECG classifier (or bare SSL encoder) explainable.

:class:`ECGWrapper` is the one object every explainer in :mod:`ecgfm.explain` talks to. It holds

* the model (an ecgfm encoder + head, or any user ``nn.Module``) and its input layout (``"BLT"`` or ``"BTL"``);
* what the model expects: sampling rate ``fs``, ``lead_names``, optional ``n_samples`` and the
  :class:`~ecgfm.data.preprocess.PreprocessSpec` it was trained with;
* the post-processing (``"softmax"``, ``"sigmoid"`` or none) that turns logits into probabilities.

Inputs to the explainers are always ``(batch, leads, samples)`` in the model's lead order and rate. Data in
another rate or lead order goes through :meth:`ECGWrapper.prepare`, which uses the shared preprocessing of
:mod:`ecgfm.data.preprocess`; anything ambiguous (unknown rate, wrong number of leads, NaN or infinite samples) is
an error, never a silent mis-feed.

Unlike ExECG's ``TorchModelWrapper`` (batch size 1, one hooked module), the wrapper is batched, exposes every
named layer's activations and gradients, the encoder's embeddings, and a reshape of transformer tokens back to a
``(lead, time-patch)`` grid so that layer methods (Grad-CAM, Grad-CAM++) work on ViT-1D as on CNNs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ecgfm.data.preprocess import (PreprocessSpec, model_input_leads, preprocess_signal, preprocessed_spec, resample,
                                   sliding_windows, with_input_leads)
from ecgfm.api import aggregate_window_logits, warn_if_not_millivolts
from ecgfm.artifacts import (ArtifactError, EncoderClassifier, artifact_kind, artifact_lead_aware,
                             derive_trained_limb_leads, derives_limb_leads, load_classifier, load_encoder,
                             warn_record_leads)
from ecgfm.data.record import CANONICAL_LEADS, ECGDataError, ECGRecord, canonical_lead

log = logging.getLogger(__name__)

POSTPROCESS = ("softmax", "sigmoid", None)
LAYOUTS = ("BLT", "BTL")


#: How an input longer or shorter than a fixed-length model's window is handled: refused, or the centred window
#: (zero-padded at the end when shorter), as for a classifier artifact trained on windows.
WINDOW_POLICIES = ("error", "center")


def window_start(n_total: int, n_window: int) -> int:
    """Start of the centred window of ``n_window`` samples in ``n_total`` (0 when the record is shorter)."""
    return max(0, (int(n_total) - int(n_window)) // 2)


def _non_finite_kind(value: Any) -> str:
    """How a non-finite sample is named in an error: ``"NaN"`` or ``"infinite (+inf)"`` / ``"infinite (-inf)"``."""
    v = float(value)
    return "NaN" if np.isnan(v) else f"infinite ({'+' if v > 0 else '-'}inf)"


def _find_encoder(model: nn.Module) -> nn.Module | None:
    """The encoder inside ``model``: ``model.encoder`` / ``model.backbone`` or ``model`` itself when it has
    ``embed``; else the first child of an ``nn.Sequential`` of two (encoder, head)."""
    for attr in ("encoder", "backbone"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    if callable(getattr(model, "embed", None)):
        return model
    if isinstance(model, nn.Sequential) and len(model) == 2:
        return model[0]
    return None


class ECGWrapper(nn.Module):
    """Wraps an ECG model for explanation.

    Args:
        model: ``nn.Module`` mapping ``(B, L, T)`` (or ``(B, T, L)`` with ``input_layout="BTL"``) to logits
            ``(B, C)`` (a ``(B,)`` output is treated as one logit). For an SSL encoder with no classifier, pass
            the encoder: ``forward`` then returns its embedding ``(B, D)`` and :meth:`embed` works.
        fs: sampling rate the model expects, in Hz. With a ``preprocess`` spec whose ``fs`` is set, they must
            agree.
        lead_names: lead order the model expects (canonical names, see
            :data:`ecgfm.data.record.CANONICAL_LEADS`).
        preprocess: the spec the model was trained with; :meth:`prepare` applies it to raw data. ``None``: raw
            data is only resampled and reordered.
        postprocess: ``"softmax"`` (single-label), ``"sigmoid"`` (multi-label) or ``None`` (the outputs are
            already the quantity to explain). A model of one output (one logit, e.g. a binary classifier trained
            with binary cross-entropy) takes ``"sigmoid"`` (or None): softmax over one output is always 1, so it is
            refused.
        input_layout: ``"BLT"`` (ecgfm) or ``"BTL"`` (channels-last user models). Explainers always pass
            ``(B, L, T)``; the wrapper transposes, for the model and for its encoder (:meth:`embed`), which reads
            the model's input.
        class_names: names of the output classes (sets ``num_classes``); checked against the model's outputs on
            the first forward pass.
        num_classes: number of outputs; found with one forward pass when needed and not given.
        n_samples: input length the model expects, if fixed (checked by :meth:`check`; lets :meth:`prepare`
            catch inputs at another rate).
        encoder: the encoder part of ``model`` (for :meth:`embed`; should be a sub-module of ``model``); found
            automatically for ecgfm classifiers (``model.encoder`` / ``model.backbone`` / a 2-module Sequential).
        lead_aware: the model was trained with lead masks (a classifier artifact's ``lead_aware`` with a backbone
            that takes ``lead_mask``, ViT-1D): inside :meth:`present_leads` its forward passes get the record's
            lead mask (absent leads make no tokens), as :class:`ecgfm.api.Classifier` scores it; otherwise absent
            leads are zero rows.
        thresholds: ``(C,)`` per-class decision thresholds of a multi-label classifier (chosen on validation,
            a classifier artifact's ``thresholds``): what "predicted" means for its counterfactuals; None: 0.5.
        trained_leads: the leads of the classifier's training records (a sweep artifact's
            ``extra.trained_leads``): :meth:`prepare` refuses a record sharing none of them and warns about leads
            never seen, as :class:`ecgfm.api.Classifier` does.
        derive_limb_leads: with ``trained_leads``, derive a raw record's absent III / aVR / aVL / aVF from I and II
            when the model read them in training (:func:`ecgfm.artifacts.derive_trained_limb_leads`); a classifier
            artifact says whether (:func:`ecgfm.artifacts.derives_limb_leads`: not for a sweep's classifier, whose
            cell scored such records without them), as :class:`ecgfm.api.Classifier` reads it.
        window_aggregate: ``"prob"`` (mean window probability) or ``"logit"`` (probabilities of the mean window
            logit): how :meth:`record_windows`' windows make a record's probabilities, the artifact's
            ``window_aggregate`` (:meth:`from_classifier`), as :meth:`ecgfm.api.Classifier.predict_proba` scores it.
        stride_samples: hop between those windows (None: ``n_samples``), the artifact's ``input.stride_samples``.

    The wrapper leaves the caller's model in the mode it is in: every forward pass it runs happens in eval mode
    (:meth:`evaluating`), each sub-module's own mode restored after.

    Inputs are cast to the model's parameter dtype (a float64 or bfloat16 model) and outputs returned as float32.

    Raises:
        ValueError: unknown ``postprocess`` / ``input_layout``, unknown lead names, ``fs`` disagreeing with
            ``preprocess.fs``, or ``postprocess="softmax"`` for a model of one output. A model whose outputs do not
            match ``class_names`` / ``num_classes`` / ``thresholds`` is refused on its first forward pass.
    """

    def __init__(self, model: nn.Module, fs: float, lead_names: Sequence[str] = CANONICAL_LEADS,
                 preprocess: PreprocessSpec | None = None, postprocess: str | None = "softmax",
                 input_layout: str = "BLT", class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, n_samples: int | None = None,
                 encoder: nn.Module | None = None, window: str = "error", lead_aware: bool = False,
                 thresholds: Sequence[float] | None = None, trained_leads: Sequence[str] | None = None,
                 derive_limb_leads: bool = True, window_aggregate: str = "prob", stride_samples: int | None = None):
        super().__init__()
        if window not in WINDOW_POLICIES:
            raise ValueError(f"window must be one of {WINDOW_POLICIES}, got {window!r}")
        self.window = window
        if window_aggregate not in ("prob", "logit"):
            raise ValueError(f"window_aggregate must be 'prob' or 'logit', got {window_aggregate!r}")
        #: how a record longer than the window is scored from its windows (:meth:`record_windows`), as the
        #: artifact says (``window_aggregate``) and :meth:`ecgfm.api.Classifier.predict_proba` does
        self.window_aggregate = window_aggregate
        if stride_samples is not None and (isinstance(stride_samples, bool) or int(stride_samples) < 1
                                           or float(stride_samples) != int(stride_samples)):
            raise ValueError(f"stride_samples must be a positive whole number of samples, got {stride_samples!r}")
        #: hop between those windows at the model's rate (None: the window, no overlap; the artifact's
        #: ``input.stride_samples``)
        self.stride_samples = None if stride_samples is None else int(stride_samples)
        if postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {postprocess!r}")
        if input_layout not in LAYOUTS:
            raise ValueError(f"input_layout must be one of {LAYOUTS}, got {input_layout!r}")
        if not (np.isfinite(fs) and fs > 0):
            raise ValueError(f"fs must be a positive sampling rate in Hz, got {fs!r}")
        if preprocess is not None and preprocess.fs is not None and float(preprocess.fs) != float(fs):
            raise ValueError(f"fs={fs} disagrees with the preprocessing spec's fs={preprocess.fs}")
        names = []
        for name in lead_names:
            try:
                lead = canonical_lead(name)
            except KeyError:
                lead = None
            if lead is None:
                raise ValueError(f"unknown lead name {name!r} in lead_names (known: {', '.join(CANONICAL_LEADS)})")
            names.append(lead)
        if len(set(names)) != len(names):
            raise ValueError(f"lead_names has duplicates: {list(lead_names)}")
        if class_names is not None:
            class_names = tuple(str(c) for c in class_names)
            if num_classes is not None and num_classes != len(class_names):
                raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names")
            num_classes = len(class_names)
        if thresholds is not None:
            thresholds = tuple(float(t) for t in thresholds)
            if num_classes is not None and len(thresholds) != num_classes:
                raise ValueError(f"{len(thresholds)} thresholds for {num_classes} classes")
            if not all(np.isfinite(t) for t in thresholds):
                raise ValueError(f"thresholds must be finite, got {thresholds}")
        if postprocess == "softmax" and num_classes == 1:
            raise ValueError(_one_output_softmax(class_names))
        self.thresholds: tuple[float, ...] | None = thresholds
        self.trained_leads: tuple[str, ...] | None = tuple(trained_leads) if trained_leads else None
        self.derive_limb_leads = bool(derive_limb_leads)
        self.model = model
        self.fs = float(fs)
        self.lead_names: tuple[str, ...] = tuple(names)
        # a model that reads a lead subset (ECGFounder 1-lead, ST-MEM --leads) is preprocessed on those leads only,
        # as the API and the sweep do (a record-scope z-score over leads it never reads would change its input)
        read = model_input_leads(encoder if encoder is not None else model)
        #: the leads the encoder reads, in its channel order (its ``init_args["input_leads"]``); None: every row
        self.input_leads: tuple[str, ...] | None = None if read is None else tuple(str(lead) for lead in read)
        self.spec = None if preprocess is None else with_input_leads(preprocess, self.input_leads)
        self.postprocess = postprocess
        self.input_layout = input_layout
        self.class_names = class_names
        self._num_classes = num_classes
        self.n_samples = None if n_samples is None else int(n_samples)
        # Kept out of the module tree (it is normally a sub-module of ``model``): registering it twice would make
        # hook-based methods (captum DeepLift's ``model.apply``) hook its layers twice.
        object.__setattr__(self, "encoder", encoder if encoder is not None else _find_encoder(model))
        # the caller's model keeps its mode (it was put in eval mode here for good, so a model being trained went
        # on with dropout off and BatchNorm frozen): every forward pass runs inside evaluating()
        self.lead_aware = bool(lead_aware) and bool(getattr(model, "accepts_lead_mask", False))
        self._present: Tensor | None = None   # (L,) lead mask of the record being explained (present_leads)
        self._present_time: int | None = None   # samples of the last input run under that mask

    @contextlib.contextmanager
    def present_leads(self, mask: Any) -> Iterator["ECGWrapper"]:
        """Inside, every forward pass of a :attr:`lead_aware` model gets ``mask`` (``(L,)`` bool in the model's
        lead order, the leads the explained record has) for each row of the batch, however captum expands it;
        a model that is not lead-aware, or a record with every lead, runs unmasked (absent leads: zero rows)."""
        m = torch.as_tensor(np.asarray(mask, dtype=bool)).flatten()
        if m.numel() != self.n_leads:
            raise ValueError(f"lead mask of {m.numel()} values for a model of {self.n_leads} leads")
        before = self._present
        self._present = m if self.lead_aware and not bool(m.all()) else None
        try:
            yield self
        finally:
            self._present = before

    def _mask_for(self, x: Tensor) -> Tensor | None:
        if self._present is None:
            return None
        self._present_time = int(x.shape[-1])
        return self._present.to(x.device).expand(x.shape[0], -1)

    def present_lead_indices(self) -> Tensor | None:
        """``(l,)`` int64 indices of the explained record's leads while a lead-aware model runs on a subset
        (:meth:`present_leads`); None when every lead is encoded."""
        return None if self._present is None else self._present.nonzero().flatten()

    def full_token_layout(self, tokens: Tensor, n_samples: int | None = None) -> Tensor:
        """Tokens of a lead-aware ViT run on the present leads only, ``(B, l*N + 2l, C)`` (a layer inside the
        encoder sees no token of an absent lead), in the full layout ``(B, L*N + 2L, C)`` with zero tokens at absent
        leads, so that ``tokens_to_grid`` puts every token on its own lead. Tokens already in the full layout, and
        every token outside :meth:`present_leads` of a subset, pass through.

        Args:
            tokens: ``(B, N_tok, C)``.
            n_samples: input samples (default: the last input run under the lead mask), for ``N`` patches per lead.
        """
        leads = self.present_lead_indices()
        enc = self.encoder
        n_leads, patch = getattr(enc, "num_leads", None), getattr(enc, "patch_size", None)
        n_samples = n_samples if n_samples is not None else self._present_time
        if leads is None or n_leads is None or patch is None or n_samples is None or len(self._present) != n_leads:
            return tokens
        n, l = int(n_samples) // int(patch), len(leads)
        if tokens.ndim != 3 or tokens.shape[1] != l * (n + 2):
            return tokens
        leads = leads.to(tokens.device)
        b, c = tokens.shape[0], tokens.shape[2]
        out = tokens.new_zeros(b, n_leads * (n + 2), c)
        out[:, : n_leads * n].view(b, n_leads, n, c)[:, leads] = tokens[:, : l * n].reshape(b, l, n, c)
        out[:, n_leads * n:].view(b, 2, n_leads, c)[:, :, leads] = tokens[:, l * n:].reshape(b, 2, l, c)
        return out

    def _input_lead_rows(self) -> list[int] | None:
        """The wrapper's lead index (row of ``x``) of each channel the encoder reads (:attr:`input_leads` order), or
        None when it reads every row as it is (no ``input_leads``, or a lead the wrapper does not have)."""
        if self.input_leads is None or not set(self.input_leads) <= set(self.lead_names):
            return None
        rows = [self.lead_names.index(lead) for lead in self.input_leads]
        return None if rows == list(range(self.n_leads)) else rows

    def grid_token_rows(self) -> int | None:
        """Rows of a token grid on the wrapper's leads (:meth:`token_grid`) that hold tokens: the present leads of a
        lead-aware model run on a subset (:meth:`present_leads`), else the leads the encoder reads
        (:attr:`input_leads`); None when every row does."""
        leads = self.present_lead_indices()
        if leads is not None:
            return len(leads)
        rows = self._input_lead_rows()
        return None if rows is None else len(rows)

    def token_grid(self, tokens: Tensor, n_samples: int | None = None) -> Tensor:
        """Transformer tokens ``(B, N_tok, C)`` as a ``(B, C, L, N)`` grid whose rows are the wrapper's leads.

        The encoder's ``tokens_to_grid`` gives one row per channel it reads: the full token layout of a lead-aware
        model run on a subset first (:meth:`full_token_layout`), and for an encoder that reads ``input_leads`` (a
        subset of the canonical input, or another order: ST-MEM with ``--leads``) its rows, in its channel order,
        are put on those leads' rows, the other leads' rows zero (no token read them).

        Args:
            tokens: ``(B, N_tok, C)``.
            n_samples: input samples (see :meth:`full_token_layout`).
        """
        grid = self.encoder.tokens_to_grid(self.full_token_layout(tokens, n_samples))
        rows = self._input_lead_rows()
        if rows is None or grid.ndim != 4 or grid.shape[2] != len(rows):
            return grid
        out = grid.new_zeros(grid.shape[0], grid.shape[1], self.n_leads, grid.shape[3])
        out[:, :, rows] = grid
        return out

    @contextlib.contextmanager
    def evaluating(self) -> Iterator["ECGWrapper"]:
        """Eval mode (dropout off, BatchNorm on its running statistics) inside, the mode found restored after:
        every forward pass of an explanation (the predicted target, reference embeddings, perturbation curves,
        concept activations) sees the model as it predicts, even when the caller left it in train mode (where
        dropout would pick a random target and BatchNorm would overwrite its statistics with the explained
        batch).

        Each sub-module's own flag is restored (``model.train(was_training)`` set every sub-module to the top
        level's mode: a backbone kept in eval mode inside a model in train mode, a linear probe's, was switched to
        train mode, and its "frozen" BatchNorm statistics moved on the next training step)."""
        modules = list(dict.fromkeys([*self.modules(),
                                      *(self.encoder.modules() if isinstance(self.encoder, nn.Module) else ())]))
        modes = [m.training for m in modules]
        self.model.eval()
        if isinstance(self.encoder, nn.Module):
            self.encoder.eval()
        try:
            yield self
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoder_and_head(cls, backbone: nn.Module, head: nn.Module | None, spec: PreprocessSpec | None,
                              fs: float | None = None, **kwargs: Any) -> "ECGWrapper":
        """Wrap an ecgfm encoder and a classification head (``head(backbone.embed(x))``).

        Args:
            backbone: ecgfm backbone (``embed(x) -> (B, D)``).
            head: ``(B, D) -> (B, C)``; ``None`` wraps the bare encoder (for :meth:`Explainer.explain_embedding`),
                with ``postprocess=None``.
            spec: preprocessing the encoder was trained with (its ``fs`` is the model's rate unless ``fs`` given).
            fs: model rate; required when ``spec`` is None or has no ``fs``.
            **kwargs: other :class:`ECGWrapper` arguments.
        """
        if fs is None:
            if spec is None or spec.fs is None:
                raise ValueError("pass fs= (the preprocessing spec does not fix the sampling rate)")
            fs = float(spec.fs)
        if head is None:
            kwargs.setdefault("postprocess", None)
            return cls(backbone, fs=fs, preprocess=spec, encoder=backbone, **kwargs)
        return cls(EncoderClassifier(backbone, head), fs=fs, preprocess=spec, encoder=backbone, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, head: nn.Module | None = None,
                        map_location: str | torch.device = "cpu", **kwargs: Any) -> "ECGWrapper":
        """Load an ecgfm classifier or encoder from disk (no unpickling: ``weights_only=True`` / safetensors).

        Accepted:

        * a classifier directory (``classifier.json`` + ``classifier.safetensors``, the on-disk classifier
          format of :mod:`ecgfm.explain.classifier`), loaded with
          :func:`~ecgfm.explain.classifier.load_classifier`;
        * an exported encoder (a directory or ``encoder.json`` written by :func:`ecgfm.export.export_encoder`):
          wrapped bare, or with ``head`` (whose weights the caller loaded);
        * a classifier checkpoint file: a ``torch.save``-d dict with ``backbone`` (``{"name", "init_args"}``),
          ``state_dict`` (of :class:`EncoderClassifier`: ``encoder.*`` and ``head.*`` keys; the head is a linear
          layer rebuilt from ``head.weight`` unless ``head`` is passed) and optional ``preprocess`` (spec dict),
          ``fs``, ``class_names``, ``postprocess`` (required, here or as an argument), ``n_samples``,
          ``lead_names``.

        Args:
            path: file or directory.
            head: head module for an exported encoder.
            map_location: device for the tensors.
            **kwargs: override any :class:`ECGWrapper` argument.

        Raises:
            ECGDataError: the file does not exist or is not one of the accepted forms.
        """
        path = Path(path)
        if not path.exists():
            raise ECGDataError(path, "checkpoint not found")
        kind = artifact_kind(path)
        if kind == "classifier":
            model, spec, meta = load_classifier(path, map_location=map_location)
            return cls.from_classifier(model, spec, meta, **kwargs)
        if kind == "encoder" or path.is_dir() or path.suffix == ".json":
            try:
                backbone, spec, info = load_encoder(path, map_location=map_location)
            except ArtifactError as exc:
                raise ECGDataError(path, exc.problem) from exc
            if spec is None and kwargs.get("fs") is None:   # saved without preprocessing: the rate it describes
                kwargs["fs"] = (info.get("input") or {}).get("fs")
            # absent leads as ecgfm.Encoder embeds them (a lead-aware ViT gets the lead mask unless pretrained
            # without one); it was False, so an encoder explained its embedding of a one-lead record from zero rows
            kwargs.setdefault("lead_aware", artifact_lead_aware(info))
            return cls.from_encoder_and_head(backbone.to(map_location), head, spec, **kwargs)
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ECGDataError(path, f"cannot load checkpoint with weights_only=True: {exc}") from exc
        if not isinstance(ckpt, dict) or "backbone" not in ckpt or "state_dict" not in ckpt:
            raise ECGDataError(path, "not an ecgfm classifier checkpoint (expected keys 'backbone' and "
                                     f"'state_dict', found {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)})")
        from ecgfm.backbones.registry import create_backbone

        info = ckpt["backbone"]
        backbone = create_backbone(info["name"], **dict(info.get("init_args", {})))
        state = ckpt["state_dict"]
        if head is None:
            head = _head_from_state(state, ckpt.get("head"), path)
        model = EncoderClassifier(backbone, head)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ECGDataError(path, f"checkpoint weights do not fit the model: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        spec = PreprocessSpec.from_dict(ckpt["preprocess"]) if ckpt.get("preprocess") is not None else None
        args: dict[str, Any] = {
            "fs": ckpt.get("fs", spec.fs if spec is not None else None),
            "class_names": ckpt.get("class_names"),
            "postprocess": ckpt.get("postprocess"),
            "n_samples": ckpt.get("n_samples"),
        }
        if ckpt.get("lead_names") is not None:
            args["lead_names"] = tuple(ckpt["lead_names"])
        args.update(kwargs)
        if "postprocess" not in ckpt and "postprocess" not in kwargs:   # softmax vs sigmoid: every probability
            raise ECGDataError(path, "the checkpoint does not say whether its classes exclude each other (no "
                                     "'postprocess' key): pass postprocess='softmax' (single-label) or 'sigmoid' "
                                     "(multi-label)")
        if args["fs"] is None:
            raise ECGDataError(path, "checkpoint has neither 'fs' nor a preprocessing spec with fs: pass fs=")
        return cls(model.to(map_location), preprocess=spec, encoder=backbone, **args)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def n_leads(self) -> int:
        return len(self.lead_names)

    @property
    def read_leads(self) -> tuple[str, ...]:
        """The wrapper's leads (:attr:`lead_names` order) the model reads: all of them, less those its encoder does
        not take (:attr:`input_leads`: ST-MEM with ``--leads``, a one-lead ECGFounder) and those its preprocessing
        drops (``PreprocessSpec.leads``). A record's other leads reach the model as zero rows whatever it holds
        there: they are "not read by the model", not "not recorded"."""
        keep = set(self.input_leads) if self.input_leads is not None else set(self.lead_names)
        if self.spec is not None and self.spec.leads is not None:
            keep &= set(self.spec.leads)
        return tuple(lead for lead in self.lead_names if lead in keep)

    @property
    def num_classes(self) -> int:
        """Number of model outputs (one probe forward pass when not given)."""
        if self._num_classes is None:
            t = self.n_samples or getattr(self.encoder, "seq_len", None) or int(round(2.5 * self.fs))
            # eval mode: in train mode the zero probe would overwrite BatchNorm's running statistics
            with torch.no_grad(), self.evaluating():
                out = self.forward(torch.zeros(1, self.n_leads, t, device=self.device))
            self._num_classes = int(out.shape[1])
        return self._num_classes

    # ------------------------------------------------------------------ forward
    def _model_dtype(self) -> torch.dtype | None:
        """The floating dtype of the model's parameters (or buffers), None when it has neither."""
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            if t.is_floating_point():
                return t.dtype
        return None

    def _to_model_dtype(self, x: Tensor) -> Tensor:
        """``x`` in the model's parameter dtype (inputs are float32: a float64 or bfloat16 model failed with
        torch's dtype mismatch); differentiable, so gradients reach the float32 input."""
        dtype = self._model_dtype()
        return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != dtype else x

    @staticmethod
    def _as_float32(out: Tensor) -> Tensor:
        """A floating output of another dtype (a float64 / bfloat16 model) as float32, what every caller reads."""
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out

    def _check_outputs(self, out: Tensor) -> None:
        """The model's ``(B, C)`` output against what the wrapper was told of it.

        Raises:
            ValueError: one output with ``postprocess="softmax"`` (always 1), or ``C`` other than the number of
                ``class_names`` / ``num_classes`` / ``thresholds`` (a name list shorter than the outputs named no
                predicted class beyond it, and ``num_classes`` reported the names' count).
        """
        if out.ndim != 2:
            return
        n = int(out.shape[1])
        if self.postprocess == "softmax" and n == 1:
            raise ValueError(_one_output_softmax(self.class_names))
        if self.class_names is not None and len(self.class_names) != n:
            raise ValueError(f"{len(self.class_names)} class_names {list(self.class_names)} but the model has {n} "
                             f"outputs: pass one name per output, in output order")
        if self._num_classes is not None and self._num_classes != n:
            raise ValueError(f"num_classes={self._num_classes} but the model has {n} outputs")
        if self.thresholds is not None and len(self.thresholds) != n:
            raise ValueError(f"{len(self.thresholds)} thresholds but the model has {n} outputs: pass one per output")

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, T) -> (B, C)`` logits (or ``(B, D)`` embeddings for a bare encoder), float32, run in eval mode
        (:meth:`evaluating`) on inputs in the model's dtype.

        Raises:
            ValueError: outputs that do not match ``class_names`` / ``num_classes`` / ``thresholds``, or one output
                with ``postprocess="softmax"`` (:meth:`_check_outputs`).
        """
        if self.input_layout == "BTL":
            x = x.transpose(1, 2)
        mask = self._mask_for(x)
        x = self._to_model_dtype(x)
        with self.evaluating():
            out = self.model(x) if mask is None else self.model(x, mask)
        if out.ndim == 1:
            out = out[:, None]
        self._check_outputs(out)
        return self._as_float32(out)

    def postprocess_fn(self, logits: Tensor) -> Tensor:
        """Apply the post-processing to ``(B, C)`` logits.

        Raises:
            ValueError: one column with ``postprocess="softmax"`` (always 1).
        """
        if self.postprocess == "softmax":
            if logits.ndim == 2 and logits.shape[1] == 1:
                raise ValueError(_one_output_softmax(self.class_names))
            return logits.softmax(dim=1)
        if self.postprocess == "sigmoid":
            return logits.sigmoid()
        return logits

    def predict_proba(self, x: Tensor) -> Tensor:
        """``(B, L, T) -> (B, C)`` probabilities (after ``postprocess``), without gradients, in eval mode
        (:meth:`evaluating`: dropout off, BatchNorm on its running statistics, the mode restored after), as every
        forward pass of an explanation runs."""
        self.check(x)
        with torch.inference_mode(), self.evaluating():
            return self.postprocess_fn(self.forward(x.to(self.device)))

    def probability_forward(self, x: Tensor) -> Tensor:
        """Differentiable ``(B, L, T) -> (B, C)`` probabilities (explain the probability, not the logit)."""
        return self.postprocess_fn(self.forward(x))

    def embed(self, x: Tensor) -> Tensor:
        """Encoder embeddings ``(B, L, T) -> (B, D)`` (differentiable, float32, in eval mode). The encoder reads
        the model's input, so a channels-last model's (``input_layout="BTL"``) gets ``(B, T, L)``.

        Raises:
            ValueError: when the wrapped model has no identifiable encoder.
        """
        if self.encoder is None:
            raise ValueError("the wrapped model has no encoder: pass encoder= to ECGWrapper, or build it with "
                             "ECGWrapper.from_encoder_and_head")
        if self.input_layout == "BTL":
            # the encoder is the part of the model that receives the model's input: (B, T, L) for a channels-last
            # model, whether it is the model itself or a sub-module (model.encoder got (B, L, T) before)
            x = x.transpose(1, 2)
        fn = getattr(self.encoder, "embed", None)
        mask = self._mask_for(x) if getattr(self.encoder, "accepts_lead_mask", False) else None
        x = self._to_model_dtype(x)
        with self.evaluating():
            out = (fn(x) if mask is None else fn(x, lead_mask=mask)) if callable(fn) else self.encoder(x)
        if out.ndim > 2:  # feature map (B, C, T') of a plain CNN encoder: global average pool
            out = out.flatten(2).mean(-1)
        return self._as_float32(out)

    # ------------------------------------------------------------------ input checks and conversion
    def check(self, x: Tensor, where: Any = "<inputs>") -> Tensor:
        """Validate a model-space batch ``(B, L, T)``: lead count, length, finiteness.

        Raises:
            ValueError: not 3-D, wrong number of leads, wrong length (when ``n_samples`` is fixed), NaN or inf.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"{where}: expected a torch.Tensor (B, leads, samples), got {type(x).__name__}; "
                             "use ECGWrapper.prepare for numpy arrays or records")
        if x.ndim != 3:
            raise ValueError(f"{where}: expected (batch, leads, samples), got shape {tuple(x.shape)}")
        if x.shape[1] != self.n_leads:
            raise ValueError(f"{where}: {x.shape[1]} leads but the model expects {self.n_leads} "
                             f"({', '.join(self.lead_names)}); pass lead_names= to ECGWrapper.prepare to convert")
        if self.n_samples is not None and x.shape[2] != self.n_samples:
            raise ValueError(f"{where}: {x.shape[2]} samples but the model expects {self.n_samples} "
                             f"({self.n_samples / self.fs:g} s at {self.fs:g} Hz); a recording at another rate "
                             "must go through ECGWrapper.prepare(x, fs=...)")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"{where}: NaN or infinite sample (first at batch {bad[0]}, lead "
                             f"{self.lead_names[bad[1]]}, sample {bad[2]})")
        return x

    def prepare(self, x: Any, fs: float | None = None, lead_names: Sequence[str] | None = None,
                where: Any = "<inputs>", missing_leads: str = "error") -> Tensor:
        """Convert raw ECGs into the model's input space ``(B, L_model, T_model)``.

        Steps: lead mapping (``lead_names`` -> the model's order, via the canonical layout), resampling to the
        model's rate and the model's :class:`~ecgfm.data.preprocess.PreprocessSpec` (filters, normalisation)
        when the wrapper has one, then :meth:`check`.

        Args:
            x: ``(L, T)`` or ``(B, L, T)`` numpy array / tensor in mV, an :class:`~ecgfm.data.record.ECGRecord`,
                or a list of records (same length after resampling).
            fs: sampling rate of ``x`` in Hz. Required for arrays, as :class:`ecgfm.api.Classifier` requires it,
                except that an array whose length equals the model's fixed ``n_samples`` is still read at the
                model's rate, with a ``UserWarning`` (a 500 Hz record of that many samples would be explained as a
                longer one at the model's rate); pass ``fs=``. Records carry their own rate.
            lead_names: lead names of the rows of ``x``; required when ``x`` does not already have the model's
                number of leads.
            where: name used in error messages (file, record id).
            missing_leads: ``"error"`` (default) or ``"zero"``: fill leads the model needs but ``x`` lacks with 0,
                ecgfm's absent-lead convention.

        Returns:
            float32 tensor on the model's device.

        Raises:
            ECGDataError: wrong lead count without ``lead_names``, unknown rate, NaN or infinite samples (in a
                record's present leads), missing leads.
        """
        if isinstance(x, ECGRecord):
            return self.prepare([x], where=x.key, missing_leads=missing_leads)
        if isinstance(x, (list, tuple)) and x and all(isinstance(r, ECGRecord) for r in x):
            rows = [self._prepare_one(r.signal, r.fs, CANONICAL_LEADS, r.lead_mask, r.key, missing_leads,
                                      preprocessed=preprocessed_spec(r, self.spec, "the explained model") is not None)
                    for r in x]
            self._check_same_length(x, rows)
            return self.check(torch.stack(rows), where)
        arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ECGDataError(where, f"expected (leads, samples) or (batch, leads, samples), got {arr.shape}")
        arr = arr.astype(np.float32, copy=False)
        if lead_names is None:
            if arr.shape[1] != self.n_leads:
                raise ECGDataError(where, f"{arr.shape[1]} leads given but the model expects {self.n_leads} "
                                          f"({', '.join(self.lead_names)}): pass lead_names= naming each row")
            lead_names = self.lead_names
        elif len(lead_names) != arr.shape[1]:
            raise ECGDataError(where, f"{len(lead_names)} lead_names for {arr.shape[1]} rows")
        if not np.isfinite(arr).all():
            # +-inf is refused as NaN is: preprocessing would fill either as missing, without a word
            b, l, t = (int(v[0]) for v in np.nonzero(~np.isfinite(arr)))
            raise ECGDataError(where, f"{_non_finite_kind(arr[b, l, t])} sample (batch {b}, lead {lead_names[l]}, "
                                      f"sample {t}); interpolate or drop it before explaining")
        if fs is None:
            if self.n_samples is not None and arr.shape[2] == self.n_samples:
                # kept for callers that pass model-length arrays (ecgfm.api.Classifier refuses the same call): said
                warnings.warn(f"{where}: no fs= given: the array's {arr.shape[2]} samples equal the model's window, "
                              f"so it is read at the model's rate ({self.fs:g} Hz, {self.n_samples / self.fs:.3g} "
                              f"s); an array at another rate is explained as a different signal: pass fs= (the "
                              f"sampling rate of the signal in Hz), as ecgfm.Classifier.predict_proba requires",
                              UserWarning, stacklevel=2)
                fs = self.fs
            else:
                raise ECGDataError(where, f"sampling rate unknown: pass fs= (the model expects {self.fs:g} Hz"
                                          + (f", {self.n_samples} samples" if self.n_samples else "") + ")")
        out = [self._prepare_one(a, float(fs), lead_names, None, f"{where}[{i}]", missing_leads)
               for i, a in enumerate(arr)]
        return self.check(torch.stack(out), where)

    def record_windows(self, record: ECGRecord, missing_leads: str = "error") -> tuple[Tensor, np.ndarray]:
        """A record cut into the windows :meth:`ecgfm.api.Classifier.predict_proba` scores it on: the whole record
        prepared as :meth:`prepare` prepares it, then every window of :attr:`n_samples` every :attr:`stride_samples`
        (:func:`~ecgfm.data.preprocess.sliding_windows`, the API's windowing: the last window aligned to the
        record's end; a shorter record zero-padded at the end, with :meth:`prepare`'s warning). A model without a
        fixed window, or one that refuses other lengths (``window="error"``), gets :meth:`prepare`'s one input.

        Args:
            record: the record.
            missing_leads: see :meth:`prepare`.

        Returns:
            ``(windows (W, L, T_model) float32, starts (W,) int64)``: each window's first sample in the record at
            the model's rate.
        """
        if self.n_samples is None or self.window != "center":
            return self.prepare(record, missing_leads=missing_leads), np.zeros(1, dtype=np.int64)
        full = self._prepare_one(record.signal, record.fs, CANONICAL_LEADS, record.lead_mask, record.key,
                                 missing_leads, crop=False,
                                 preprocessed=preprocessed_spec(record, self.spec, "the explained model") is not None)
        stride = self.stride_samples or self.n_samples
        windows = torch.from_numpy(sliding_windows(full.cpu().numpy(), self.n_samples, stride))
        # the same function on the sample indices gives each window's start (0 for a padded short record)
        starts = sliding_windows(np.arange(full.shape[1], dtype=np.int64)[None], self.n_samples, stride)[:, 0, 0]
        return self.check(windows.to(self.device), record.key), starts.astype(np.int64)

    def score_windows(self, windows: Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A record's probabilities from its windows (:meth:`record_windows`), aggregated as the artifact says
        (:attr:`window_aggregate`) by :func:`ecgfm.api.aggregate_window_logits`, the code
        :meth:`ecgfm.api.Classifier.predict_proba` scores records with. Run it inside :meth:`present_leads` for a
        lead-aware model, as the API passes the record's lead mask.

        Returns:
            ``(proba (C,), window_proba (W, C), terms (W, C))`` float64: the record's probabilities, each window's
            own, and what the record's mean is taken over (window probabilities, or logits for ``"logit"``).
        """
        with torch.no_grad(), self.evaluating():
            logits = torch.cat([self.forward(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)])
        logits = logits.detach().float().cpu()
        proba, terms = aggregate_window_logits(logits, self.window_aggregate, self.postprocess_fn)
        return proba, self.postprocess_fn(logits).double().numpy(), terms

    def _check_same_length(self, records: Sequence[ECGRecord], rows: Sequence[Tensor]) -> None:
        """Records prepared for one batch must have one length at the model's rate.

        A variable-length model (no ``n_samples``) keeps each record's own length, and a batch needs one.

        Raises:
            ECGDataError: two records of different lengths, both named with their lengths.
        """
        first = rows[0].shape[-1]
        for rec, t in zip(records[1:], rows[1:]):
            if t.shape[-1] != first:
                raise ECGDataError(
                    rec.key, f"{t.shape[-1]} samples ({t.shape[-1] / self.fs:.3g} s at {self.fs:g} Hz) after "
                    f"conversion, but record {records[0].key} has {first} ({first / self.fs:.3g} s): this model takes "
                    "inputs of any length, and one batch needs one length; crop or pad the records to one length "
                    "(ecgfm.data.preprocess.crop_or_pad) or explain them in separate calls")

    def _prepare_one(self, sig: np.ndarray, fs: float, names: Sequence[str], mask: np.ndarray | None,
                     where: Any, missing_leads: str, preprocessed: bool = False, crop: bool = True) -> Tensor:
        """One ``(n, T)`` signal -> ``(L_model, T')`` tensor (``preprocessed``: a cache record prepared with the
        model's own spec, only mapped to its leads; ``crop=False``: the whole record at the model's rate, not cut
        to the model's window, for :meth:`record_windows`)."""
        if missing_leads not in ("error", "zero"):
            raise ValueError(f"missing_leads must be 'error' or 'zero', got {missing_leads!r}")
        sig = np.asarray(sig, dtype=np.float32)
        if mask is None:
            mask = np.ones(len(names), dtype=bool)
        bad = ~np.isfinite(sig) & np.asarray(mask, dtype=bool)[:, None]
        if bad.any():
            # +-inf is refused as NaN is: preprocessing would fill either as missing, without a word (a lead all
            # inf became an absent lead)
            i, t = (int(v[0]) for v in np.nonzero(bad))
            raise ECGDataError(where, f"{_non_finite_kind(sig[i, t])} samples in a present lead (first: lead "
                                      f"{names[i]}, sample {t}); interpolate or drop them before explaining")
        by_name: dict[str, int] = {}
        for i, name in enumerate(names):
            try:
                lead = canonical_lead(name)
            except KeyError:
                raise ECGDataError(where, f"unknown lead name {name!r}") from None
            if lead is not None and mask[i]:
                by_name[lead] = i
        if not preprocessed and self.trained_leads and self.derive_limb_leads:
            sig, by_name = self._derive_limb_leads(sig, by_name, where)
        absent = [lead for lead in self.lead_names if lead not in by_name]
        if absent and missing_leads == "error":
            raise ECGDataError(where, f"leads {absent} needed by the model are missing (pass missing_leads='zero' "
                                      "to feed them as absent/zero)")
        rows = np.zeros((self.n_leads, sig.shape[1]), dtype=np.float32)
        present = np.zeros(self.n_leads, dtype=bool)
        for j, lead in enumerate(self.lead_names):
            if lead in by_name:
                rows[j] = sig[by_name[lead]]
                present[j] = True
        if not preprocessed:   # a cache record is normalised: its scale says nothing of its units
            # the API's check: volts; microvolts / ADC counts when the spec does not normalise (None: it only
            # resamples, so the scale reaches the model)
            warn_if_not_millivolts(rows, present, where, self.spec)
        if preprocessed:
            out_fs = float(fs)
            if abs(out_fs - float(self.fs)) > 1e-6:
                raise ECGDataError(where, f"a preprocessed record at {out_fs:g} Hz for a model at {self.fs:g} Hz")
        elif self.spec is not None:
            spec = self.spec if self.spec.fs is not None else PreprocessSpec(**{**self.spec.to_dict(), "fs": self.fs})
            rows, out_fs = self.preprocess_rows(rows, fs, present, spec, where)
        else:
            rows = resample(rows, fs, self.fs)
            out_fs = self.fs
        assert out_fs == self.fs
        # the leads the record has after preprocessing (a flat lead is zeroed there), checked as the API checks them
        self._check_leads(present & (np.abs(rows).max(axis=1) > 0 if rows.shape[1] else present), where)
        t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        if self.n_samples is not None and t.shape[1] < self.n_samples and self.window == "center":
            # as Classifier.predict_proba warns: the padding shapes the output
            warnings.warn(f"{where}: {t.shape[1] / self.fs:.3g} s at {self.fs:g} Hz, shorter than the model's "
                          f"window of {self.n_samples / self.fs:.3g} s: zero-padded at the end, so "
                          f"{1 - t.shape[1] / self.n_samples:.0%} of what the model sees (and what is explained) "
                          f"is padding", UserWarning, stacklevel=3)
        if not crop:
            return t.to(self.device)
        if self.n_samples is not None and t.shape[1] != self.n_samples and self.window == "center":
            start = window_start(t.shape[1], self.n_samples)
            t = t[:, start:start + self.n_samples] if t.shape[1] > self.n_samples else \
                torch.nn.functional.pad(t, (0, self.n_samples - t.shape[1]))
        if self.n_samples is not None and t.shape[1] != self.n_samples:
            raise ECGDataError(where, f"{t.shape[1]} samples at {self.fs:g} Hz after conversion but the model "
                                      f"expects {self.n_samples}; crop or pad first "
                                      "(ecgfm.data.preprocess.crop_or_pad)")
        return t.to(self.device)

    def _check_leads(self, present: np.ndarray, where: Any) -> None:
        """A record's leads against the classifier's training leads, as :class:`ecgfm.api.Classifier` checks them
        (:func:`ecgfm.artifacts.warn_record_leads`): a record sharing none of :attr:`trained_leads` is refused, leads
        never seen in training are named in a warning, and so are the leads the model reads (:attr:`input_leads`)
        that the record lacks (explained as absent: zero rows, or left out by a lead-aware model).

        Args:
            present: ``(L_model,)`` bool, the record's leads in the model's order after preprocessing.
            where: the record, for the messages.

        Raises:
            ECGDataError: no present lead among :attr:`trained_leads`.
        """
        have = [lead for lead, p in zip(self.lead_names, present) if p]
        warn_record_leads(self.trained_leads, have, tuple(self.input_leads or self.lead_names), where,
                          kind="classifier" if self.trained_leads else "model")

    def _derive_limb_leads(self, sig: np.ndarray, by_name: dict[str, int], where: Any
                           ) -> tuple[np.ndarray, dict[str, int]]:
        """``sig (n, T)`` with rows appended for the limb leads :func:`ecgfm.artifacts.derive_trained_limb_leads`
        derives from I and II (as ``Classifier.predict_proba`` prepares the record), and ``by_name`` naming them."""
        x12 = np.zeros((len(CANONICAL_LEADS), sig.shape[1]), dtype=np.float32)
        had = np.zeros(len(CANONICAL_LEADS), dtype=bool)
        for lead, i in by_name.items():
            x12[CANONICAL_LEADS.index(lead)], had[CANONICAL_LEADS.index(lead)] = sig[i], True
        flat = self.spec.flat_threshold if self.spec is not None else 0.0
        x12, now = derive_trained_limb_leads(x12, had, self.trained_leads, self.lead_names, flat, where)
        new = [j for j in np.flatnonzero(now & ~had)]
        if not new:
            return sig, by_name
        by_name = {**by_name, **{CANONICAL_LEADS[j]: sig.shape[0] + k for k, j in enumerate(new)}}
        return np.concatenate([sig, x12[new]]), by_name

    def preprocess_rows(self, rows: np.ndarray, fs: float, present: np.ndarray, spec: PreprocessSpec,
                        where: str) -> tuple[np.ndarray, float]:
        """Preprocess the model's rows ``(L_model, T)`` (model lead order) with ``spec``: through the canonical
        12-lead layout :func:`~ecgfm.data.preprocess.preprocess_signal` works on, then back to the model's order.
        Returns ``(rows (L_model, T'), fs')``."""
        idx = [CANONICAL_LEADS.index(lead) for lead in self.lead_names]
        full = np.zeros((len(CANONICAL_LEADS), rows.shape[1]), dtype=np.float32)
        mask = np.zeros(len(CANONICAL_LEADS), dtype=bool)
        full[idx], mask[idx] = rows, present
        out, out_fs, _ = preprocess_signal(full, fs, mask, spec, where)
        return out[idx], out_fs

    @classmethod
    def from_classifier(cls, model: nn.Module, spec: PreprocessSpec | None, meta: Mapping[str, Any],
                        **kwargs: Any) -> "ECGWrapper":
        """A wrapper around a loaded classifier artifact (:func:`ecgfm.artifacts.load_classifier`), reading it as
        :class:`ecgfm.api.Classifier` does: rate, leads, preprocessing, lead awareness, thresholds, training leads
        and whether absent limb leads are derived (:func:`ecgfm.artifacts.derives_limb_leads`). The one place both
        :meth:`from_checkpoint` and :func:`ecgfm.explain.classifier.wrapper_from_artifact` build it (the latter
        left the derivation rule out: a sweep's classifier was explained on limb leads its API never computes).

        Args:
            model: the loaded classifier (an :class:`~ecgfm.artifacts.EncoderClassifier`).
            spec: its preprocessing (None: the raw spec, as the API reads it).
            meta: its ``classifier.json``.
            **kwargs: override any :class:`ECGWrapper` argument.
        """
        inp = meta.get("input") or {}
        fs = float(inp["fs"])
        args = {"fs": fs, "lead_names": tuple(inp.get("leads") or CANONICAL_LEADS),
                # saved with preprocess=None: the API reads it with the raw spec (flat leads masked), so here too
                "preprocess": spec if spec is not None else PreprocessSpec.raw(fs),
                "postprocess": "sigmoid" if meta.get("multilabel") else "softmax",
                "class_names": meta.get("classes"), "n_samples": inp.get("window_samples"),
                # as the API reads it (null / absent: the encoder's pretraining setting, else true)
                "encoder": getattr(model, "encoder", None), "lead_aware": artifact_lead_aware(meta),
                "thresholds": meta.get("thresholds") if meta.get("multilabel") else None,
                "trained_leads": (meta.get("extra") or {}).get("trained_leads"),
                "derive_limb_leads": derives_limb_leads(meta.get("extra")),
                # a record longer than the window: scored over the same windows as the API scores it
                "window_aggregate": meta.get("window_aggregate", "prob"),
                "stride_samples": inp.get("stride_samples") or None, **kwargs}
        return cls(model, **args)

    # ------------------------------------------------------------------ layers
    def layer_names(self) -> list[str]:
        """Names of every sub-module of the wrapped model (as accepted by :meth:`layer`)."""
        return [name for name, _ in self.model.named_modules() if name]

    def layer(self, name: str | nn.Module) -> nn.Module:
        """The sub-module called ``name`` (a module is returned as is).

        Raises:
            ValueError: unknown name; the message lists the available names.
        """
        if isinstance(name, nn.Module):
            return name
        modules = dict(self.model.named_modules())
        if name not in modules or not name:
            raise ValueError(f"no layer named {name!r}; available layers: {', '.join(self.layer_names())}")
        return modules[name]

    def activations_and_gradients(self, x: Tensor, layer: str | nn.Module, target: Any = None,
                                  objective: Callable[[Tensor], Tensor] | None = None,
                                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Run ``x`` through the model, recording a layer's output and the gradient of the target score.

        Args:
            x: ``(B, L, T)``.
            layer: name (see :meth:`layer_names`) or module.
            target: class index (int or ``(B,)``); ``None`` takes each input's predicted class.
            objective: instead of a class score, a function ``(B, L, T) -> (B,)`` of the input through the same
                model (e.g. an embedding similarity); its hooked layer output is recorded.

        Returns:
            ``(activations, gradients, scores)``: the layer output (e.g. ``(B, C, T')`` or ``(B, N, D)``), the
            gradient of ``scores.sum()`` with respect to it (same shape) and the per-input scores ``(B,)``.
        """
        module = self.layer(layer)
        store: dict[str, Tensor] = {}

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            store["act"] = out

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad(), self.evaluating():
                x = x.to(self.device).detach().requires_grad_(True)
                if objective is not None:
                    scores = objective(x)
                else:
                    logits = self.forward(x)
                    idx = self.resolve_target(target, logits)
                    scores = logits.gather(1, idx[:, None])[:, 0]
                if "act" not in store:
                    raise ValueError(f"layer {layer!r} was not used in the forward pass")
                grads = torch.autograd.grad(scores.sum(), store["act"])[0]
        finally:
            handle.remove()
        return store["act"].detach(), grads.detach(), scores.detach()

    def resolve_target(self, target: Any, logits: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        """Turn ``target`` (None, int, class name, sequence or tensor) into a ``(B,)`` long tensor.

        ``None`` picks each input's arg-max class (from ``logits``, or a forward pass on ``x``): the predicted class
        of a single-label model; of a multi-label one the most probable class, whatever :attr:`thresholds` say
        (:func:`ecgfm.explain.report.explain_records` explains by default the most probable class a multi-label
        model predicts at its thresholds, as :meth:`ecgfm.api.Classifier.predict` decides).

        Raises:
            ValueError: an index outside ``[0, num_classes)``, an unknown class name or a length mismatch.
        """
        if logits is None:
            if x is None:
                raise ValueError("resolve_target needs logits or inputs")
            with torch.no_grad(), self.evaluating():
                logits = self.forward(x.to(self.device))
        b, c = logits.shape
        if target is None:
            return logits.argmax(dim=1)
        if isinstance(target, str):
            target = self._class_index(target)
        if isinstance(target, (list, tuple)):
            target = [self._class_index(t) if isinstance(t, str) else t for t in target]
        raw = np.asarray(target.detach().cpu() if isinstance(target, Tensor) else target)
        # a bool or a fraction is not a class index: int() would make 1.7 class 1 and True class 1 without a word
        if raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not np.all(np.isfinite(raw) & (raw == np.round(raw)))):
            raise ValueError(f"target must be a class index (int) or name, or one per input, got {target!r}")
        t = torch.as_tensor(raw.astype(np.int64), device=logits.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim != 1 or t.shape[0] != b:
            raise ValueError(f"target must be an int or one class per input ({b}), got shape {tuple(t.shape)}")
        if (t < 0).any() or (t >= c).any():
            names = f" ({', '.join(self.class_names)})" if self.class_names else ""
            raise ValueError(f"target {t.tolist()} outside the model's {c} classes [0, {c - 1}]{names}")
        return t.clone()

    def _class_index(self, name: str) -> int:
        if not self.class_names or name not in self.class_names:
            raise ValueError(f"unknown class name {name!r}; classes: {self.class_names}")
        return self.class_names.index(name)

    # ------------------------------------------------------------------ token grids
    def grid_reshape(self, layer_output: Tensor) -> Tensor:
        """Reshape a layer output to a ``(B, D, rows, time)`` grid for layer attribution methods.

        * ``(B, C, T')`` CNN feature maps -> ``(B, C, 1, T')`` (the lead axis was mixed by the first conv);
        * ``(B, C, H, W)`` 2-D maps pass through;
        * ``(B, N, D)`` transformer tokens -> ``(B, D, leads, patches)`` with the backbone's
          ``tokens_to_grid`` (ViT-1D drops its class/separator tokens there); the tokens of a lead-aware model run
          on a record's present leads only are first put in the full layout (:meth:`full_token_layout`), and the
          rows of an encoder that reads ``input_leads`` go to those leads (:meth:`token_grid`).

        Raises:
            ValueError: tokens from a model without ``tokens_to_grid``, or an unsupported rank.
        """
        if layer_output.ndim == 4:
            return layer_output
        if layer_output.ndim == 3 and self._is_token_output(layer_output):
            to_grid = getattr(self.encoder, "tokens_to_grid", None)
            if not callable(to_grid):
                raise ValueError("transformer tokens (B, N, D) but the encoder has no tokens_to_grid(tokens)")
            return self.token_grid(layer_output)
        if layer_output.ndim == 3:
            return layer_output[:, :, None, :]
        raise ValueError(f"cannot reshape a layer output of shape {tuple(layer_output.shape)} to a grid")

    def _is_token_output(self, out: Tensor) -> bool:
        """Heuristic: a 3-D output is tokens ``(B, N, D)`` when the encoder is a token model (has
        ``tokens_to_grid``) and the last axis is its width."""
        to_grid = getattr(self.encoder, "tokens_to_grid", None)
        width = getattr(self.encoder, "embed_dim", getattr(self.encoder, "num_features", None))
        return callable(to_grid) and width is not None and out.shape[-1] == width


def _one_output_softmax(class_names: Sequence[str] | None) -> str:
    """The message refusing ``postprocess="softmax"`` for a model of one output."""
    named = f" ({class_names[0]!r})" if class_names else ""
    return (f"the model has one output{named} and postprocess='softmax': softmax over one output is always 1, so "
            f"every probability would be 1 and every probability explanation 0; a one-logit (binary, BCE-trained) "
            f"model takes postprocess='sigmoid' (or None to explain the logit)")


def _head_from_state(state: dict[str, Tensor], info: dict | None, path: Path) -> nn.Module:
    """Rebuild a linear head from its weights (``head.weight`` ``(C, D)``); other heads must be passed."""
    if "head.weight" in state and state["head.weight"].ndim == 2:
        w = state["head.weight"]
        return nn.Linear(w.shape[1], w.shape[0], bias="head.bias" in state)
    raise ECGDataError(path, f"cannot infer the head from the checkpoint (head info {info}, head keys "
                             f"{sorted(k for k in state if k.startswith('head.'))[:6]}); pass head=")
