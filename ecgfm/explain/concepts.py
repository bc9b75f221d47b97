"""Testing with Concept Activation Vectors (TCAV; Kim et al. 2018, ICML) for ECG models, with significance tests
and caches that can never be stale.

A *concept* is a set of ECGs sharing a property ("atrial fibrillation", "ST elevation", PTB-XL code ``STE_``...),
built from any labelled ecgfm data (:func:`concept_from_arrays`, :func:`concept_from_source`). At a layer, a
linear classifier (scikit-learn ``LogisticRegression``) separates the concept's activations from those of a
random set; its normal vector is the CAV ``v``. The TCAV score of a target class ``k`` is the fraction of
explained inputs whose directional derivative ``grad_h f_k . v`` is positive (Kim et al.'s sign-count score; the
mean derivative is reported too).

**Significance** (Kim et al. Sec. 3.2): the CAV is retrained against ``n`` different random sets, giving ``n``
concept scores, and ``n`` random-vs-random scores (random set ``i`` against random set ``i+1``) estimate the
null; a two-sided Welch t-test compares the two, and p-values are Bonferroni-corrected over all (concept, layer)
pairs tested in one call.

**Activations.** A layer's output is turned into a ``(B, D, rows, time)`` grid by
:meth:`~ecgfm.explain.wrapper.ECGWrapper.grid_reshape` (CNN maps and ViT-1D tokens alike) and, with
``pool="mean"`` (default), averaged over the grid: ECG concepts (a rhythm, an ST shift) occur anywhere in time,
so a position-free CAV generalises across beats; the matching directional derivative is the sum of the
gradient over grid positions (moving every position along ``v``). ``pool="flatten"`` keeps every position
(Kim et al.'s original, for fixed-position inputs).

**Why not captum.concept.TCAV.** captum's TCAV stores activations and CAVs on disk under keys made of the layer
and concept *names* only (``./cav/<model_id>/<concept ids>-<layer>``): retrain the model or change a concept's
examples and it silently reuses the stale vectors (the problem ExECG inherits). It also runs no random-vs-random
test. The pieces TCAV needs are a few lines on top of the wrapper's batched
:meth:`~ecgfm.explain.wrapper.ECGWrapper.activations_and_gradients` and scikit-learn, so they are written here
with caches (:class:`TCAVCache`) keyed by the SHA-256 of the model's ``state_dict`` and of the concept examples'
bytes, stored as safetensors + JSON (no pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ecgfm.explain.wrapper import ECGWrapper

POOLS = ("mean", "flatten")


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints and cache


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (names, dtypes, shapes and bytes), hex."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(x: Tensor | np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes, hex."""
    a = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x))
    h = hashlib.sha256(f"{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TCAVCache:
    """Activation and CAV cache keyed by content (model weights + data + settings), never by name.

    Entries are ``<key>.safetensors`` (tensors) + ``<key>.json`` (the key's ingredients, for inspection). With
    ``directory=None`` the cache lives in memory only. ``hits`` / ``misses`` count lookups. :meth:`put` stores copies
    and :meth:`get` hands out copies, so a caller's in-place edit of a tensor it got never changes an entry. An
    entry file that cannot be read (truncated, corrupt) is a miss, with a warning naming it: the value is recomputed
    and the file rewritten.

    Args:
        directory: folder for the entries (created), or None.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._mem: dict[str, dict[str, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, Tensor] | None:
        """A copy of the entry ``key``, or None (a miss: not stored, or its file cannot be read)."""
        if key in self._mem:
            self.hits += 1
            return {k: v.clone() for k, v in self._mem[key].items()}
        path = None if self.directory is None else self.directory / f"{key}.safetensors"
        if path is not None and path.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                value = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                # a content-keyed entry can always be recomputed: a broken file is a miss (put rewrites it)
                warnings.warn(f"TCAV cache entry {path} cannot be read ({type(exc).__name__}: {exc}): ignored and "
                              f"recomputed", stacklevel=2)
            else:
                self._mem[key] = value
                self.hits += 1
                return {k: v.clone() for k, v in value.items()}
        self.misses += 1
        return None

    def put(self, key: str, value: dict[str, Tensor], info: dict[str, Any]) -> None:
        """Store a copy of ``value`` under ``key`` (and its ingredients ``info`` next to the file)."""
        value = {k: v.detach().cpu().clone().contiguous() for k, v in value.items()}
        self._mem[key] = value
        if self.directory is not None:
            from safetensors.torch import save_file

            tmp = self.directory / f".{key}.tmp"
            save_file(value, str(tmp))
            os.replace(tmp, self.directory / f"{key}.safetensors")
            (self.directory / f"{key}.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------------------------
# Concept sets


@dataclass
class ConceptSet:
    """Examples of a concept (or a random set) in the model's input space.

    The set holds its own float32 copy of the examples (taken when ``inputs`` is given or reassigned, and checked
    then), so a later change of the array it was built from does not change it.

    Attributes:
        name: concept name (``"st_elevation"``, ``"random_0"``...).
        inputs: ``(N, L, T)`` float32 model-space inputs.
        source: where they came from (for the report).

    Raises:
        ValueError: ``inputs`` not shaped ``(N >= 2, leads, samples)``.
    """

    name: str
    inputs: Tensor
    source: str = ""

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr == "inputs":   # a copy: the examples the fingerprint hashes are the set's own
            value = torch.as_tensor(value, dtype=torch.float32).detach().clone()
            if value.ndim != 3 or value.shape[0] < 2:
                raise ValueError(f"concept {getattr(self, 'name', '?')!r}: need (N >= 2, leads, samples) inputs, "
                                 f"got {tuple(value.shape)}")
        super().__setattr__(attr, value)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the examples (the data part of every cache key), of the examples held now: computed on every
        read (about a millisecond per MB), so an in-place edit of ``inputs`` can never keep an old key."""
        return data_fingerprint(self.inputs)


def concept_from_arrays(x: np.ndarray | Tensor, labels: Sequence[Any], concept: Any, n: int | None = None,
                        seed: int = 0, name: str | None = None) -> ConceptSet:
    """Concept set of the rows of ``x`` whose label equals ``concept`` (or contains it, for label lists).

    Args:
        x: ``(N, L, T)`` model-space inputs.
        labels: per row, a label or a collection of labels.
        concept: the label defining the concept.
        n: keep at most ``n`` examples (random, seeded).
        seed: sampling seed.
        name: concept name (default ``str(concept)``).

    Raises:
        ValueError: ``labels`` not one per row of ``x``, fewer than 2 matching rows.
    """
    if len(labels) != len(x):
        raise ValueError(f"concept {concept!r}: {len(labels)} labels for {len(x)} rows of x; give one label (or "
                         f"collection of labels) per row")
    hit = np.array([(concept in lab) if isinstance(lab, (list, tuple, set, frozenset)) else lab == concept
                    for lab in labels])
    idx = np.flatnonzero(hit)
    if idx.size < 2:
        raise ValueError(f"concept {concept!r}: only {idx.size} matching example(s) in {len(labels)} rows")
    if n is not None and idx.size > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    return ConceptSet(str(name or concept), torch.as_tensor(np.asarray(x)[idx] if not isinstance(x, Tensor)
                                                            else x[torch.as_tensor(idx)]), source="arrays")


def random_sets(x: np.ndarray | Tensor, n_sets: int, size: int, seed: int = 0, exclude: Sequence[int] = (),
                prefix: str = "random") -> list[ConceptSet]:
    """``n_sets`` random example sets of ``size`` rows of ``x`` (rows in ``exclude`` are never drawn).

    Raises:
        ValueError: not enough rows.
    """
    pool = np.setdiff1d(np.arange(len(x)), np.asarray(exclude, dtype=np.int64))
    if pool.size < size:
        raise ValueError(f"random sets of {size} need at least {size} rows, have {pool.size}")
    rng = np.random.default_rng(seed)
    xt = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    return [ConceptSet(f"{prefix}_{i}", xt[torch.as_tensor(np.sort(rng.choice(pool, size, replace=False)))],
                       source="random") for i in range(n_sets)]


def concept_from_source(source: Any, wrapper: ECGWrapper, label: str, n: int, seed: int = 0,
                        record_ids: Sequence[str] | None = None, label_fn: Any = None, n_samples: int | None = None,
                        name: str | None = None) -> ConceptSet:
    """Concept set from any :class:`~ecgfm.data.record.RecordSource` (PTB-XL SCP codes such as ``"AFIB"`` or
    ``"STE_"``, synthetic classes, SNOMED codes...), converted by the wrapper's preprocessing.

    Args:
        source: the record source.
        wrapper: the model (its :meth:`~ECGWrapper.prepare` converts the records).
        label: label that defines the concept (matched against ``label_fn(record)``, default ``record.labels``).
        n: number of examples (the first ``n`` matching records in a seeded random order).
        seed: order seed.
        record_ids: candidate ids (default all of the source).
        label_fn: ``record -> collection of labels``.
        n_samples: crop/pad every converted record to this length (default the wrapper's ``n_samples``).
        name: concept name (default ``label``).

    Raises:
        ValueError: fewer than 2 matching records.
    """
    from ecgfm.data.preprocess import crop_or_pad

    ids = list(record_ids if record_ids is not None else source.record_ids())
    order = np.random.default_rng(seed).permutation(len(ids))
    n_samples = n_samples or wrapper.n_samples
    out = []
    for j in order:
        rec = source.load(ids[j])
        labels = label_fn(rec) if label_fn is not None else rec.labels
        if label not in labels:
            continue
        x = wrapper.prepare(rec, missing_leads="zero")[0].cpu().numpy()
        if n_samples is not None:
            x, _ = crop_or_pad(x, int(n_samples))
        out.append(x)
        if len(out) >= n:
            break
    if len(out) < 2:
        raise ValueError(f"concept {label!r}: found {len(out)} matching record(s) in {getattr(source, 'name', source)}")
    return ConceptSet(str(name or label), torch.as_tensor(np.stack(out)), source=str(getattr(source, "name", "")))


# ---------------------------------------------------------------------------------------------------------------
# TCAV


@dataclass
class TCAVResult:
    """TCAV scores for one target class.

    Attributes:
        target: class index.
        target_name: class name (or the index as a string).
        rows: one dict per (concept, layer): ``concept``, ``layer``, ``scores`` (one per random set),
            ``score_mean``, ``score_std``, ``magnitude_mean`` (mean directional derivative), ``random_scores``,
            ``random_mean``, ``random_std``, ``cav_accuracy`` (held-out accuracy of the concept CAVs, mean over
            the random sets; a split, or leave-one-out for sets under 3 examples; NaN when a set has 1 example,
            see :meth:`TCAV.cav`), ``cav_accuracy_estimate`` (which estimate ``cav_accuracy`` is: ``"held-out
            split"``, ``"leave-one-out"``, ``"mixed: held-out split and leave-one-out"`` when the random sets'
            sizes led to both, or ``"none"`` when ``cav_accuracy`` is NaN; :func:`cav_accuracy_estimate`),
            ``t``, ``p``, ``p_adjusted`` (Bonferroni), ``significant``.
        alpha: significance level.
        n_tests: number of (concept, layer) tests in the correction.
    """

    target: int
    target_name: str
    rows: list[dict[str, Any]]
    alpha: float
    n_tests: int

    def row(self, concept: str, layer: str | None = None) -> dict[str, Any]:
        for r in self.rows:
            if r["concept"] == concept and (layer is None or r["layer"] == layer):
                return r
        raise KeyError(f"no TCAV result for concept {concept!r} at layer {layer!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "target_name": self.target_name, "alpha": self.alpha,
                "n_tests": self.n_tests, "correction": "bonferroni",
                "test": "two-sided Welch t-test of concept-vs-random against random-vs-random TCAV scores",
                "rows": [{k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in r.items()}
                         for r in self.rows]}


#: what :func:`_fit_cav_classifier` reports as the CAV accuracy (``cav_accuracy_estimate`` of a TCAV row)
CAV_ESTIMATES = ("held-out split", "leave-one-out", "none")


def cav_accuracy_estimate(n_concept: int, n_random: int, test_fraction: float) -> str:
    """Which held-out estimate of its accuracy a CAV of ``n_concept`` against ``n_random`` examples gets
    (:func:`_fit_cav_classifier`): ``"held-out split"`` when the stratified ``test_fraction`` split holds at least
    2 examples and each set has at least 3, else ``"leave-one-out"`` when each set has at least 2, else ``"none"``
    (the accuracy is NaN). A function of the set sizes and ``test_fraction`` alone, both in the CAV's cache key."""
    smallest = min(int(n_concept), int(n_random))
    if int(round(test_fraction * (int(n_concept) + int(n_random)))) >= 2 and smallest >= 3:
        return "held-out split"
    return "leave-one-out" if smallest >= 2 else "none"


def _estimate_of_mean(kinds: Sequence[str]) -> str:
    """The estimate a mean of CAV accuracies is, from each CAV's (:func:`cav_accuracy_estimate`): ``"none"`` when
    one has none (the mean is NaN), the common kind, or ``"mixed: held-out split and leave-one-out"``."""
    if "none" in kinds:
        return "none"
    found = sorted(set(kinds), key=CAV_ESTIMATES.index)
    return found[0] if len(found) == 1 else "mixed: " + " and ".join(found)


def _fit_cav_classifier(z: np.ndarray, y: np.ndarray, C: float, test_fraction: float, seed: int) -> tuple[Any, float]:
    """The logistic-regression CAV classifier on standardised features ``z`` / labels ``y`` and its held-out
    accuracy.

    A stratified ``test_fraction`` split when it holds at least 2 examples and each class has at least 3 (the
    classifier is the one fitted on the training part); else the classifier is fitted on every example and scored
    by leave-one-out cross-validation (each example by a classifier fitted on the others), which needs at least 2
    examples per class (so that every fit sees both); else the accuracy is NaN (no held-out estimate: a training
    accuracy would read as one)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_score, train_test_split

    counts = np.bincount(y.astype(int), minlength=2)
    estimate = cav_accuracy_estimate(counts[1], counts[0], test_fraction)
    if estimate == "held-out split":
        n_test = int(round(test_fraction * len(y)))
        z_tr, z_te, y_tr, y_te = train_test_split(z, y, test_size=n_test, stratify=y, random_state=seed)
        clf = LogisticRegression(C=C, max_iter=2000).fit(z_tr, y_tr)
        return clf, float(clf.score(z_te, y_te))
    clf = LogisticRegression(C=C, max_iter=2000).fit(z, y)
    if estimate == "leave-one-out":
        return clf, float(np.mean(cross_val_score(LogisticRegression(C=C, max_iter=2000), z, y, cv=LeaveOneOut())))
    return clf, float("nan")


class TCAV:
    """TCAV on an :class:`ECGWrapper`.

    Args:
        wrapper: the model.
        layers: layer names (see :meth:`ECGWrapper.layer_names`).
        cache: a :class:`TCAVCache` (default: in-memory).
        pool: ``"mean"`` (position-free CAVs, default) or ``"flatten"``.
        C: inverse L2 strength of the logistic-regression CAV classifier.
        test_fraction: share of each (concept + random) pair held out to report the CAV accuracy, strictly between
            0 and 1 (sets under 3 examples, or a split under 2 examples: leave-one-out instead, see :meth:`cav`).
        batch_size: forward batch size.
        seed: seed of the CAV train/test splits.

    Raises:
        ValueError: unknown layer or pool, ``test_fraction`` not strictly between 0 and 1.
    """

    def __init__(self, wrapper: ECGWrapper, layers: Sequence[str], cache: TCAVCache | None = None,
                 pool: str = "mean", C: float = 1.0, test_fraction: float = 0.3, batch_size: int = 64,
                 seed: int = 0):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not layers:
            raise ValueError("give at least one layer")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be strictly between 0 and 1 (the share of each concept + random "
                             f"pair held out to score its CAV), got {test_fraction!r}")
        for layer in layers:
            wrapper.layer(layer)  # raises with the list of names
        self.wrapper = wrapper
        self.layers = list(layers)
        self.cache = cache if cache is not None else TCAVCache()
        self.pool = pool
        self.C = float(C)
        self.test_fraction = float(test_fraction)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    # -------------------------------------------------------------- activations
    def _pool(self, t: Tensor) -> Tensor:
        grid = self.wrapper.grid_reshape(t)                               # (B, D, rows, time)
        if self.pool == "mean":
            return grid.flatten(2).mean(-1)
        return grid.flatten(1)

    def _grad_pool(self, g: Tensor) -> Tensor:
        grid = self.wrapper.grid_reshape(g)
        if self.pool == "mean":
            # d f / d eps for h(t) += eps * v at every position: sum over positions of grad . v
            return grid.flatten(2).sum(-1)
        return grid.flatten(1)

    def _layer_output(self, x: Tensor, layer: str) -> Tensor:
        store: dict[str, Tensor] = {}

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store["a"] = out[0] if isinstance(out, (tuple, list)) else out

        handle = self.wrapper.layer(layer).register_forward_hook(hook)
        try:
            with torch.no_grad(), self.wrapper.evaluating():
                self.wrapper(x.to(self.wrapper.device))
        finally:
            handle.remove()
        return store["a"]

    def activations(self, concept: ConceptSet, layer: str) -> Tensor:
        """``(N, D)`` pooled activations of a concept's examples at ``layer`` (cached by model + data; the caller's
        own copy)."""
        return self._activations(concept, layer, concept.fingerprint)

    def _activations(self, concept: ConceptSet, layer: str, data_fp: str) -> Tensor:
        """:meth:`activations` with the concept's fingerprint ``data_fp`` computed once by the caller."""
        self.wrapper.check(concept.inputs, f"concept {concept.name!r}")   # the model's input space, as inputs are
        key = _key("act", self._model_fp(), layer, data_fp, self.pool)
        hit = self.cache.get(key)
        if hit is not None:
            return hit["act"]
        parts = [self._pool(self._layer_output(concept.inputs[i:i + self.batch_size], layer)).cpu()
                 for i in range(0, concept.inputs.shape[0], self.batch_size)]
        act = torch.cat(parts).float()
        self.cache.put(key, {"act": act}, {"kind": "activations", "layer": layer, "concept": concept.name,
                                           "model": self._model_fp(), "data": data_fp,
                                           "pool": self.pool})
        return act

    def _model_fp(self) -> str:
        # Recomputed on every call so that a weight change between calls can never hit an old entry.
        return model_fingerprint(self.wrapper.model)

    # -------------------------------------------------------------- CAVs
    def cav(self, concept: ConceptSet, random: ConceptSet, layer: str) -> tuple[Tensor, float]:
        """Unit CAV ``(D,)`` separating ``concept`` from ``random`` at ``layer`` (pointing to the concept) and the
        classifier's held-out accuracy (cached by model + both data sets + settings).

        The accuracy is held out (:func:`_fit_cav_classifier`): a stratified ``test_fraction`` split when each set
        has at least 3 examples and the split holds at least 2 (the CAV from the training part), else leave-one-out
        cross-validation (sets of 2; the CAV from every example); NaN when no held-out estimate exists (a set of
        1). It is never the classifier's accuracy on its own training examples."""
        # "heldout2": entries of older versions stored the training accuracy of small sets as the held-out one.
        # Which estimate the accuracy is (cav_accuracy_estimate) is not stored: the set sizes (in the fingerprints)
        # and test_fraction in this key fix it, so a "heldout2" entry needs no new version for it.
        fp_c, fp_r = concept.fingerprint, random.fingerprint
        key = _key("cav", "heldout2", self._model_fp(), layer, fp_c, fp_r, self.pool,
                   self.C, self.test_fraction, self.seed)
        hit = self.cache.get(key)
        if hit is not None:
            return hit["cav"], float(hit["accuracy"])
        a_c = self._activations(concept, layer, fp_c).numpy()
        a_r = self._activations(random, layer, fp_r).numpy()
        feats = np.concatenate([a_c, a_r]).astype(np.float64)
        y = np.concatenate([np.ones(len(a_c)), np.zeros(len(a_r))])
        # Standardise so that C means the same at every layer; the CAV is mapped back to activation space.
        mu, sd = feats.mean(0), feats.std(0) + 1e-8
        z = (feats - mu) / sd
        clf, acc = _fit_cav_classifier(z, y, self.C, self.test_fraction, self.seed)
        w = clf.coef_[0] / sd                                              # direction in activation space
        v = torch.as_tensor(w / max(np.linalg.norm(w), 1e-12), dtype=torch.float32)
        self.cache.put(key, {"cav": v, "accuracy": torch.tensor(acc)},
                       {"kind": "cav", "layer": layer, "concept": concept.name, "random": random.name,
                        "model": self._model_fp(), "concept_data": fp_c,
                        "random_data": fp_r, "C": self.C, "pool": self.pool})
        return v, acc

    # -------------------------------------------------------------- scores
    def gradients(self, inputs: Tensor, target: Any, layer: str) -> Tensor:
        """``(B, D)`` pooled gradients of the target logit at ``layer``."""
        out = []
        for i in range(0, inputs.shape[0], self.batch_size):
            t = target[i:i + self.batch_size] if torch.is_tensor(target) and target.ndim else target  # per input
            _, g, _ = self.wrapper.activations_and_gradients(inputs[i:i + self.batch_size], layer, target=t)
            out.append(self._grad_pool(g).cpu().float())
        return torch.cat(out)

    @staticmethod
    def score(grads: Tensor, cav: Tensor) -> tuple[float, float]:
        """TCAV score (fraction of positive directional derivatives) and mean derivative."""
        d = grads @ cav
        return float((d > 0).float().mean()), float(d.mean())

    def run(self, inputs: Tensor, target: Any, concepts: Sequence[ConceptSet], randoms: Sequence[ConceptSet],
            alpha: float = 0.05) -> TCAVResult:
        """TCAV scores of ``concepts`` for ``target`` on ``inputs`` with the random-vs-random test.

        Args:
            inputs: ``(B, L, T)`` model-space inputs to explain (typically examples of the target class).
            target: class index or name (one class for all inputs).
            concepts: concept sets.
            randoms: at least 3 random sets (Kim et al. use tens; 5-10 gives usable p-values); the null scores
                pair set ``i`` with set ``i + 1`` (cyclically), so 2 sets would give one pair twice, swapped.
            alpha: significance level after Bonferroni correction.

        Returns:
            :class:`TCAVResult`.

        Raises:
            ValueError: fewer than 3 random sets, a target that is not one class, a concept or random set that is
                not in the model's input space (:meth:`ECGWrapper.check`) or not shaped as ``inputs``.
        """
        from scipy import stats

        if len(randoms) < 3:
            raise ValueError(f"need at least 3 random sets for the significance test (the random-vs-random null pairs "
                             f"set i with set i + 1: with 2 that is one pair twice), got {len(randoms)}")
        x = self.wrapper.check(torch.as_tensor(inputs, dtype=torch.float32).to(self.wrapper.device),
                               "<TCAV inputs>")
        tgt = self.wrapper.resolve_target(target, x=x)
        if len(set(tgt.tolist())) != 1:
            raise ValueError("TCAV explains one target class at a time")
        for c in [*concepts, *randoms]:   # a set at another rate or length: its CAV would learn that, not a concept
            self.wrapper.check(c.inputs, f"concept {c.name!r}")
            if tuple(c.inputs.shape[1:]) != tuple(x.shape[1:]):
                raise ValueError(f"concept {c.name!r}: examples of shape (leads, samples) {tuple(c.inputs.shape[1:])}"
                                 f" but the explained inputs are {tuple(x.shape[1:])}; prepare every set as the "
                                 f"inputs (same rate, window and leads, ECGWrapper.prepare)")
        k = int(tgt[0])
        n_tests = len(concepts) * len(self.layers)
        rows = []
        for layer in self.layers:
            grads = self.gradients(x, tgt, layer)
            null = []
            for i in range(len(randoms)):
                v, _ = self.cav(randoms[i], randoms[(i + 1) % len(randoms)], layer)
                null.append(self.score(grads, v)[0])
            for concept in concepts:
                scores, mags, accs, kinds = [], [], [], []
                for r in randoms:
                    v, acc = self.cav(concept, r, layer)
                    s, m = self.score(grads, v)
                    scores.append(s)
                    mags.append(m)
                    accs.append(acc)
                    # from the set sizes, not the cache: a cached CAV's accuracy was estimated the same way
                    kinds.append(cav_accuracy_estimate(len(concept.inputs), len(r.inputs), self.test_fraction))
                s_arr, n_arr = np.asarray(scores), np.asarray(null)
                if np.ptp(np.concatenate([s_arr, n_arr])) == 0:
                    t_stat, p = 0.0, 1.0
                elif np.ptp(s_arr) == 0 and np.ptp(n_arr) == 0:
                    # two constant groups that differ: Welch's t is infinite (p = 0) on no evidence of spread;
                    # undetermined, not significant
                    t_stat, p = float("nan"), 1.0
                else:
                    with warnings.catch_warnings():
                        # all concept scores equal (e.g. 1.0): scipy warns about the zero variance, Welch's test
                        # is still defined by the other group's variance
                        warnings.filterwarnings("ignore", message="Precision loss")
                        res = stats.ttest_ind(s_arr, n_arr, equal_var=False)
                    t_stat, p = float(res.statistic), float(res.pvalue)
                    if not np.isfinite(p):
                        t_stat, p = 0.0, 1.0
                p_adj = min(1.0, p * n_tests)
                rows.append({"concept": concept.name, "layer": layer, "scores": scores,
                             "score_mean": float(s_arr.mean()), "score_std": float(s_arr.std(ddof=1)),
                             "magnitude_mean": float(np.mean(mags)), "random_scores": list(map(float, n_arr)),
                             "random_mean": float(n_arr.mean()), "random_std": float(n_arr.std(ddof=1)),
                             "cav_accuracy": float(np.mean(accs)), "cav_accuracy_estimate": _estimate_of_mean(kinds),
                             "t": t_stat, "p": p, "p_adjusted": p_adj,
                             "significant": bool(p_adj < alpha), "n_random": len(randoms),
                             "n_inputs": int(x.shape[0])})
        names = self.wrapper.class_names
        return TCAVResult(target=k, target_name=names[k] if names else str(k), rows=rows, alpha=alpha,
                          n_tests=n_tests)
