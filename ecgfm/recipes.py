"""Typed recipes and config schemas of the evaluation entry points: ``probe.py``, ``finetune.py``, ``explain.py``.

The training entry points have theirs in :mod:`ecgfm.config` (``TrainConfig``, ``PrepareConfig``); this module
follows the same pattern for the three downstream ones:

* **recipes** (:class:`FinetuneRecipe`, :class:`ProbeRecipe`): the small typed objects the library functions take
  (``run_finetune(..., recipe)``), with **one default per setting**: the dataclass. ``conf/finetune.yaml`` and
  ``conf/probe.yaml`` spell the same values out so that users see and override them
  (``finetune.lr=1e-3``), and ``tests/unit/test_recipes.py`` keeps the YAML and the dataclass identical.
  The supervised-from-scratch recipe is not a second set of defaults but a documented override block
  (``supervised:`` in ``conf/finetune.yaml``, applied by :func:`finetune_recipe` over ``finetune:``).
* **config schemas** (:class:`ProbeConfig`, :class:`FinetuneConfig`, :class:`ExplainConfig`): the whole composed
  config of each entry point. :func:`validate_probe_config` / :func:`validate_finetune_config` /
  :func:`validate_explain_config` merge the composed config into ``OmegaConf.structured(<schema>)`` at the start
  of ``probe_main`` / ``finetune_main`` / ``explain_main``, so a typo (``+finetune.lrr=1``) or a bad type
  (``finetune.epochs=abc``, ``probe.Cs=x``) fails at once with :class:`ecgfm.config.ConfigError` naming the key,
  before any cache is prepared or model built. Free-form nodes (the ``task`` / ``eval_data`` / ``data`` groups
  and their ``_target_`` record sources, ``preprocess`` overrides) are typed ``Any`` here and checked by the
  code that reads them (:class:`ecgfm.evaluate.tasks.TaskSpec`, :class:`ecgfm.data.preprocess.PreprocessSpec`).

This module imports no torch: the constants of accepted values live here and :mod:`ecgfm.evaluate.finetune`
re-exports them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ecgfm.config import ConfigError, PathsConfig, _close, _missing_keys, _reformat, check_params_used

#: accepted values of ``finetune.head``.
HEADS = ("linear", "mlp")
#: accepted values of ``finetune.head_init``.
HEAD_INITS = ("lp", "random")
#: accepted values of ``finetune.window_aggregate``.
WINDOW_AGGREGATES = ("prob", "logit")
#: accepted values of ``finetune.lp_features`` (what the LP-FT head's probe is fitted on).
LP_FEATURES = ("records", "windows")
#: L2 grid of the linear probes (``probe.Cs`` and the LP-FT head's ``finetune.lp_Cs``).
LP_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: accepted values of ``probe.mode`` and ``probe.aggregate`` (:mod:`ecgfm.evaluate.probe`).
PROBE_MODES = ("linear", "mlp", "attention")
PROBE_AGGREGATES = ("mean_embedding", "mean_std", "mean_prediction")
PROBE_LAYERS = ("last", "stages")
#: accepted values of ``probe.side_features`` (record features appended to an encoder's, besides None).
PROBE_SIDE_FEATURES = ("handcrafted",)
#: accepted values of ``report`` (probe.py / finetune.py).
REPORT_WHEN = ("auto", "always", "never")
#: accepted values of explain.py's ``overlay`` and ``faithfulness.order``.
OVERLAYS = ("line", "band")
FAITHFULNESS_ORDERS = ("signed", "abs")


# ------------------------------------------------------------------------------------------------------ recipes
@dataclass
class FinetuneRecipe:
    """How :func:`ecgfm.evaluate.finetune.run_finetune` trains (``finetune:`` of ``conf/finetune.yaml``).

    Attributes:
        epochs: maximum number of epochs (the cosine schedule's length).
        batch_size: training crops per step (also the evaluation batch size).
        lr: peak learning rate of the head; layer ``l`` gets ``lr * layer_decay ** (top - l)``. Chosen on
            validation (2026-12-06: the pretext CNN encoder, 10 % of the labels, seeds 0-2, CinC 2017 and PTB-XL
            super: 1e-3 0.868 > 3e-4 0.863 > 1e-4 0.861, mean validation macro AUROC; docs/BENCHMARK.md "The
            fine-tuning recipe chosen on validation"). The 2026-11-26 choice of 3e-4 compared test numbers.
        weight_decay: AdamW weight decay (not on biases, 1-D parameters, norm / embedding layers).
        layer_decay: layer-wise learning-rate decay factor (1.0: none).
        warmup_epochs: linear warm-up in epochs (may be fractional), then cosine decay to 0.
        patience: early stopping on validation macro AUROC after this many epochs without improvement.
        min_epochs: epochs before early stopping may stop the run.
        min_epoch_samples: training crops per epoch at least (0: one pass over the training records). A small
            labelled subset is then repeated, each pass in a fresh order, so an epoch (and so the schedule, each
            validation and the patience) means about as many optimiser steps at 10 % of the labels as at 100 %:
            with one pass, 180 records at batch 64 are 2 steps an epoch (80 steps in 40 epochs, 52 records
            dropped each epoch). Left out of a cell's recipe identity when 0 (cells from before it existed).
        head: ``"linear"`` or ``"mlp"`` (:class:`ecgfm.heads.MLPHead`).
        head_init: ``"lp"``: LP-FT (Kumar et al. 2022), the head starts as a linear probe of the frozen features
            of the training split and is kept if no epoch beats it on validation (needs ``head="linear"``); before
            the probe, a random-init network's never-estimated BatchNorm running statistics are computed on one
            pass of the training crops (a pretrained encoder's are kept;
            :func:`ecgfm.evaluate.batchnorm.recalibrate_batchnorm`); ``"random"``: a randomly initialised head.
        lp_Cs: L2 grid of that probe, chosen on validation macro AUROC.
        lp_features: what that probe is fitted on: ``"records"`` (each training record's mean window embedding,
            the benchmark probe's ``mean_embedding``; with ``window_aggregate="prob"`` the windows are used
            whatever this says) or ``"windows"`` (every window, labelled with its record's labels: fine-tuning's
            per-crop loss then starts at the probe's). Chosen on validation (docs/BENCHMARK.md, "The fine-tuning
            recipe chosen on validation").
        window_aggregate: a record's prediction from its windows: ``"logit"`` (softmax / sigmoid of the mean
            window logit = a linear head on the mean window embedding, the probe's ``mean_embedding``) or
            ``"prob"`` (mean window probability, the PTB-XL benchmark's aggregation).
        val_sliding: early stopping / best weights on whole validation records (sliding windows, the test-time
            prediction, so the LP-FT candidate is scored as the probe is); False: one centred crop per record
            (faster).
        num_workers: DataLoader worker processes (speed only: not part of a cell's identity).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 2.0
    patience: int = 5
    min_epochs: int = 1
    min_epoch_samples: int = 0
    head: str = "linear"
    head_init: str = "lp"
    lp_Cs: List[float] = field(default_factory=lambda: list(LP_CS))
    lp_features: str = "records"
    window_aggregate: str = "logit"
    val_sliding: bool = True
    num_workers: int = 0


#: The ``supervised:`` override block of ``conf/finetune.yaml``: what the supervised-from-scratch baseline
#: (``checkpoint=supervised:<...>``) changes in :class:`FinetuneRecipe`: no pretrained features to probe or to
#: protect with layer decay, the PTB-XL benchmark's lr, and a budget in optimiser steps rather than passes (at
#: least 2,048 crops an epoch, so a 10 % subset trains as many steps as the full set). Validation and window
#: aggregation are the fine-tunes' (whole records, mean logit), so its rows pair with theirs like for like.
#: Documentation and tests only: the YAML block is what runs.
SUPERVISED_OVERRIDES: dict[str, Any] = {"layer_decay": 1.0, "warmup_epochs": 0, "head_init": "random", "lr": 1.0e-3,
                                        "min_epoch_samples": 2048, "val_sliding": True, "window_aggregate": "logit"}


@dataclass
class ProbeMLPRecipe:
    """Settings of the MLP probe (:class:`ecgfm.evaluate.probe.MLPProbe`; ``probe.mlp`` of ``conf/probe.yaml``)."""

    hidden_dim: int = 256
    epochs: int = 300
    dropout: float = 0.2
    weight_decay: float = 1.0e-4
    patience: int = 5
    eval_every: int = 10


@dataclass
class ProbeAttentionRecipe:
    """Settings of the attention probe (:class:`ecgfm.evaluate.probe.AttentionProbe` with
    :class:`ecgfm.heads.AttentionPoolingHead` on frozen tokens; ``probe.attention`` of ``conf/probe.yaml``).

    Attributes:
        lrs: AdamW learning-rate grid, chosen on validation macro AUROC.
        weight_decays: AdamW weight-decay grid (every lr x weight decay pair is a head), chosen likewise.
        num_queries: learnable queries of the head.
        num_heads: attention heads (must divide the encoder's token width).
        epochs: maximum epochs (early stopping on validation macro AUROC).
        batch_size: records per step.
        patience: epochs without validation improvement before stopping.
        dropout: attention dropout.
    """

    lrs: List[float] = field(default_factory=lambda: [0.003, 0.001])
    weight_decays: List[float] = field(default_factory=lambda: [0.01])
    num_queries: int = 1
    num_heads: int = 4
    epochs: int = 30
    batch_size: int = 64
    patience: int = 5
    dropout: float = 0.0


@dataclass
class ProbeRecipe:
    """Probes on frozen features (``probe:`` of ``conf/probe.yaml``; :func:`ecgfm.evaluate.probe.run_probe_grid`).

    Attributes:
        mode: ``"linear"`` (scikit-learn logistic regression), ``"mlp"`` (:class:`ecgfm.heads.MLPHead`) or
            ``"attention"`` (:class:`ecgfm.heads.AttentionPoolingHead` over all frozen tokens of a record).
        aggregate: ``"mean_embedding"`` (one mean window embedding per record), ``"mean_std"`` (mean and standard
            deviation of the window embeddings, concatenated: keeps window-to-window variability) or
            ``"mean_prediction"`` (train on windows, average window predictions). The attention probe pools by
            itself and takes ``"mean_embedding"`` only.
        Cs: linear: L2 grid, chosen on validation macro AUROC.
        lrs: MLP: learning-rate grid, chosen on validation macro AUROC.
        max_iter: L-BFGS iterations of the linear probe.
        mlp: MLP probe settings.
        attention: attention probe settings.
        side_features: None, or ``"handcrafted"``: the handcrafted baseline's record features
            (:mod:`ecgfm.evaluate.handcrafted`) appended to the encoder's aggregated record features (linear / MLP
            heads, ``mean_embedding`` / ``mean_std``): does the encoder add information to RR / HRV features? Its
            cells are a row of their own (``linear+handcrafted``), never the encoder's frozen probe.
        layers: ``"last"`` (the encoder's pooled embedding) or ``"stages"`` (every stage of a CNN pooled the same
            way and concatenated: multi-scale frozen features, ``embed_stages``); linear / MLP heads; its cells
            are a row of their own (``linear+stages``).
    """

    mode: str = "linear"
    aggregate: str = "mean_embedding"
    Cs: List[float] = field(default_factory=lambda: list(LP_CS))
    lrs: List[float] = field(default_factory=lambda: [0.001, 0.01])
    max_iter: int = 1000
    mlp: ProbeMLPRecipe = field(default_factory=ProbeMLPRecipe)
    attention: ProbeAttentionRecipe = field(default_factory=ProbeAttentionRecipe)
    side_features: Optional[str] = None
    layers: str = "last"


# ----------------------------------------------------------------------------------------------- config schemas
@dataclass
class BootstrapConfig:
    """Percentile bootstrap over test records (``n=0``: no confidence intervals)."""

    n: int = 1000
    seed: int = 0


@dataclass
class FeaturesConfig:
    """Frozen-feature cache shared by probe.py and the LP-FT head (``features.dir``)."""

    dir: str = "${paths.cache_root}/features"
    batch_size: int = 256
    lead_aware: Optional[bool] = None  # absent leads make no tokens (backbones taking lead_mask), in probe.py's
    #   frozen features and in finetune.py's forward pass and LP-FT head alike; None: as the encoder was pretrained
    #   (its method_hparams.lead_aware; True when not recorded), see ecgfm.evaluate.sweep.resolve_lead_aware


@dataclass
class _CellConfig:
    """Settings common to ``conf/probe.yaml`` and ``conf/finetune.yaml`` (see the comments there)."""

    checkpoint: str = "random:vit1d_tiny"
    fraction: Any = 1.0                 # a float in (0, 1] or a list of them
    seed: Any = 0                       # an int or a list of them
    results_dir: str = "${paths.output_root}/benchmark"
    overwrite: bool = False
    plot: bool = True
    report: str = "auto"
    allow_leakage: bool = False
    pretrain_caches: List[str] = field(default_factory=list)
    preprocess: Any = None              # None or a PreprocessSpec mapping (checked by PreprocessSpec.from_dict)
    init_seed: int = 0
    backbone_args: Dict[str, Any] = field(default_factory=dict)
    window_seconds: Optional[float] = None
    stride_seconds: Optional[float] = None
    prepare_workers: int = 2
    torch_threads: Optional[int] = None
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: Any = None                    # free-form: TaskSpec.from_config checks it
    eval_data: Any = None


@dataclass
class ProbeConfig(_CellConfig):
    """Schema of ``conf/probe.yaml`` after composition (the ``hydra`` node excluded)."""

    save_classifier: bool = False
    device: str = "cpu"
    probe: ProbeRecipe = field(default_factory=ProbeRecipe)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


@dataclass
class FinetuneConfig(_CellConfig):
    """Schema of ``conf/finetune.yaml`` after composition (the ``hydra`` node excluded).

    ``supervised`` is an override block over ``finetune`` (keys of :class:`FinetuneRecipe`, checked by
    :func:`validate_finetune_config`), used for ``checkpoint=supervised:<...>``.
    """

    accelerator: str = "cpu"
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    supervised: Dict[str, Any] = field(default_factory=lambda: dict(SUPERVISED_OVERRIDES))
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


@dataclass
class FaithfulnessConfig:
    """Deletion / insertion AOPC against random attributions (:mod:`ecgfm.explain.faithfulness`)."""

    enabled: bool = True
    n_random: int = 3
    segment_s: float = 0.1
    steps: int = 20
    order: str = "signed"
    output: Optional[str] = None   # logit | proba; None: the output each attribution explains (checked by explain)


@dataclass
class CounterfactualConfig:
    """Gradient counterfactual (:mod:`ecgfm.explain.counterfactual`); ``target`` None: a class not already predicted
    (the second most probable for softmax, the most probable below its threshold for sigmoid); ``threshold`` None:
    a multi-label classifier's own validation thresholds (else 0.5), or one value / one per class in ``(0, 1)``;
    ``lambda_prox`` / ``lambda_smooth`` >= 0 and ``lr`` > 0 (:func:`check_counterfactual_options`)."""

    enabled: bool = False
    target: Any = None
    threshold: Any = None
    max_steps: int = 500
    lambda_prox: float = 0.1
    lambda_smooth: float = 0.003
    lr: float = 0.01


def check_counterfactual_options(options: Mapping[str, Any], prefix: str = "counterfactual.") -> None:
    """Refuse counterfactual settings that cannot work (:func:`ecgfm.explain.counterfactual.counterfactual` and
    the explain config's ``counterfactual`` block both check with it): a ``threshold`` (one value or one per class)
    outside ``(0, 1)``, a negative or non-finite ``lambda_prox`` / ``lambda_smooth`` / ``lambda_plaus``, an ``lr``
    that is not positive and finite. Keys that are absent or None are not checked.

    Args:
        options: the settings (a mapping; other keys are ignored).
        prefix: put before the key in the error (``"counterfactual."`` for the config, ``""`` for arguments).

    Raises:
        ConfigError: naming the first bad key.
    """
    threshold = options.get("threshold")
    if threshold is not None:
        values = threshold.tolist() if hasattr(threshold, "tolist") else threshold   # a numpy array / tensor
        values = list(values) if isinstance(values, (list, tuple, ListConfig)) else [values]
        try:
            bad = [v for v in values if isinstance(v, bool) or not 0.0 < float(v) < 1.0]
        except (TypeError, ValueError):
            bad = [threshold]
        if bad or not values:
            raise ConfigError(f"{prefix}threshold", f"must be a probability strictly between 0 and 1 (one, or one per "
                                                    f"class), got {threshold!r}")
    for key in ("lambda_prox", "lambda_smooth", "lambda_plaus"):
        value = options.get(key)
        if value is not None and not 0.0 <= float(value) < float("inf"):
            raise ConfigError(f"{prefix}{key}", f"must be a finite weight >= 0, got {value!r}")
    lr = options.get("lr")
    if lr is not None and not 0.0 < float(lr) < float("inf"):
        raise ConfigError(f"{prefix}lr", f"must be a positive, finite learning rate, got {lr!r}")


@dataclass
class ExplainDemoConfig:
    """The synthetic demo classifier trained when ``checkpoint`` is null
    (:func:`ecgfm.explain.classifier.train_synthetic_demo`)."""

    n_records: int = 360
    seed: int = 0
    epochs: int = 12


@dataclass
class ExplainConfig:
    """Schema of ``conf/explain.yaml`` after composition (the ``hydra`` node excluded).

    ``seed``, ``crop_samples``, ``preprocess`` and ``paths`` only exist as interpolation targets of the shared
    ``data`` configs (only their record source is read).
    """

    checkpoint: Optional[str] = None
    record: Any = None                  # a record id, a list of them, or None (the first record)
    methods: List[str] = field(default_factory=lambda: ["integrated_gradients", "gradcam", "occlusion"])
    target: Any = None                  # class name or index; None: each record's predicted class
    method_options: Any = None          # {method: {option: value}}
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    formats: List[str] = field(default_factory=lambda: ["png", "svg", "pdf"])
    overlay: str = "line"
    device: str = "cpu"
    threads: Optional[int] = 1
    torch_threads: Optional[int] = None  # train / probe / finetune's name for it: wins over `threads` when set
    source: Any = None                  # free-form record source node ({_target_: ...})
    demo: ExplainDemoConfig = field(default_factory=ExplainDemoConfig)
    out_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 0
    crop_samples: int = 250
    preprocess: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = None                    # free-form: the data group (its record source is instantiated)


# --------------------------------------------------------------------------------------------------- validation
def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}, got {value!r}"
                               f"{_close(str(value), list(allowed))}")


def _plain(cfg: Any) -> DictConfig:
    """An unstructured copy of the composed config without its ``hydra`` node (interpolations kept)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    else:
        plain = OmegaConf.create(dict(cfg))
    if "hydra" in plain:
        del plain["hydra"]
    return plain


def _typed_field_names(schema: type) -> list[str]:
    return [f.name for f in fields(schema) if f.type not in ("Any", Any)]


def _merge(schema: type, plain: DictConfig, skip_missing: tuple[str, ...] = ()) -> DictConfig:
    """Merge ``plain`` into ``OmegaConf.structured(schema)`` and resolve its typed fields (not the ``Any`` ones,
    nor ``${hydra:...}`` interpolations, which only resolve inside a Hydra run); errors name the key."""
    missing = [k for k in _missing_keys(plain) if k.split(".")[0].split("[")[0] not in skip_missing]
    if missing:
        raise ConfigError(missing[0], "mandatory value '???' is not set (give it on the command line)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        for name in _typed_field_names(schema):
            node = merged._get_node(name)
            if node is not None and node._is_interpolation() and "${hydra:" in str(node._value()):
                continue
            value = merged[name]
            if isinstance(value, (DictConfig, ListConfig)):
                OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as err:
        raise _reformat(err, schema) from None
    return merged


def _check_device(key: str, value: str) -> None:
    """A torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``); raises ConfigError."""
    import torch

    try:
        dev = torch.device(str(value))
    except RuntimeError as exc:
        raise ConfigError(key, f"{value!r} is not a device ({exc}); use cpu, cuda, cuda:<n> or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, f"{value!r}: this machine has no CUDA device; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(key, f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(key, f"{value!r}: MPS is not available here; use cpu")


def _check_accelerator(value: str) -> None:
    """A Lightning accelerator this machine has (``cpu``, ``gpu`` / ``cuda``, ``mps``, ``auto``)."""
    import torch

    v = str(value).lower()
    if v in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("accelerator", f"{value!r}: this machine has no CUDA device; use cpu (or auto)")
    if v not in ("cpu", "gpu", "cuda", "mps", "auto", "tpu"):
        raise ConfigError("accelerator", f"{value!r}: use cpu, gpu, mps or auto")


def _check_cells(merged: DictConfig) -> None:
    """Value checks of the settings shared by probe.py and finetune.py."""
    fractions = list(merged.fraction) if isinstance(merged.fraction, ListConfig) else [merged.fraction]
    if not fractions:
        raise ConfigError("fraction", "is an empty list: give at least one label fraction")
    for f in fractions:
        try:
            ok = 0.0 < float(f) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError("fraction", f"must be a label fraction in (0, 1] or a list of them, got {f!r}")
    seeds = list(merged.seed) if isinstance(merged.seed, ListConfig) else [merged.seed]
    if not seeds:
        raise ConfigError("seed", "is an empty list: give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError("seed", f"must be an integer or a list of integers, got {s!r}")
    _one_of("report", merged.report, REPORT_WHEN)
    if merged.bootstrap.n < 0:
        raise ConfigError("bootstrap.n", f"must be >= 0, got {merged.bootstrap.n}")
    if merged.features.batch_size < 1:
        raise ConfigError("features.batch_size", f"must be >= 1, got {merged.features.batch_size}")
    if merged.prepare_workers < 0:
        raise ConfigError("prepare_workers", f"must be >= 0, got {merged.prepare_workers}")
    for key in ("window_seconds", "stride_seconds"):
        if merged[key] is not None and not merged[key] > 0:
            raise ConfigError(key, f"must be positive (or null), got {merged[key]}")
    for key in ("task", "eval_data"):
        node = merged._get_node(key)
        if key == "task" and (node is None or node._is_none()):
            raise ConfigError("task", "is not set (choose one of the conf/task/ options)")
        if not (node is None or node._is_none() or isinstance(node, DictConfig)):
            raise ConfigError(key, f"must be a task config (a mapping), got {node._value()!r}")
    if merged.preprocess is not None:
        from ecgfm.data.preprocess import PreprocessSpec

        if not isinstance(merged.preprocess, DictConfig):
            raise ConfigError("preprocess", f"must be null or a mapping of PreprocessSpec fields, got "
                                            f"{merged.preprocess!r}")
        try:
            spec = PreprocessSpec.from_dict(OmegaConf.to_container(merged.preprocess, resolve=True))
        except (ValueError, TypeError) as err:
            raise ConfigError("preprocess", str(err)) from None
        if spec.notch_problem():   # refused in every new configuration (train, prepare, probe / fine-tune)
            raise ConfigError("preprocess.notch", spec.notch_problem())


def check_finetune_recipe(recipe: FinetuneRecipe | DictConfig, key: str = "finetune",
                          overridden: Mapping[str, str] | None = None) -> None:
    """Value checks of a fine-tuning recipe (types are the dataclass's).

    Args:
        recipe: the recipe.
        key: config node named in messages.
        overridden: ``{setting: node}`` for settings that came from another node (the ``supervised`` block).

    Raises:
        ConfigError: naming ``<key>.<setting>`` (e.g. ``finetune.head_init``).
    """
    where = dict(overridden or {})

    def k(name: str) -> str:
        return f"{where.get(name, key)}.{name}"

    _one_of(k("head"), recipe.head, HEADS)
    _one_of(k("head_init"), recipe.head_init, HEAD_INITS)
    if recipe.head_init == "lp" and recipe.head != "linear":
        raise ConfigError(k("head_init"), f"'lp' initialises a linear head from a linear probe, but "
                                          f"{k('head')} is {recipe.head!r}: use head=linear or head_init=random")
    _one_of(k("window_aggregate"), recipe.window_aggregate, WINDOW_AGGREGATES)
    _one_of(k("lp_features"), recipe.lp_features, LP_FEATURES)
    for name in ("epochs", "batch_size"):
        if getattr(recipe, name) < 1:
            raise ConfigError(k(name), f"must be >= 1, got {getattr(recipe, name)}")
    for name in ("lr", "weight_decay", "warmup_epochs", "patience", "min_epochs", "min_epoch_samples",
                 "num_workers"):
        if getattr(recipe, name) < 0:
            raise ConfigError(k(name), f"must be >= 0, got {getattr(recipe, name)}")
    if not recipe.layer_decay > 0:
        raise ConfigError(k("layer_decay"), f"must be positive, got {recipe.layer_decay}")
    if recipe.warmup_epochs >= recipe.epochs and recipe.lr > 0:
        # as pretraining's method.warmup_steps check (a warning there too: short test runs do this on purpose)
        warnings.warn(f"{k('warmup_epochs')}={recipe.warmup_epochs} >= {k('epochs')}={recipe.epochs}: the whole "
                      f"run is warm-up, it never reaches lr={recipe.lr} nor decays", UserWarning, stacklevel=2)
    if recipe.head_init == "lp" and not list(recipe.lp_Cs):
        raise ConfigError(k("lp_Cs"), "is empty: the LP-FT head needs at least one C")


def validate_probe_config(cfg: Any) -> DictConfig:
    """Validate a composed ``conf/probe.yaml`` (:class:`ProbeConfig`).

    Returns:
        The config merged into the schema (typed; interpolations kept).

    Raises:
        ConfigError: naming the first wrong key.
    """
    plain = _plain(cfg)
    check_params_used(plain)
    merged = _merge(ProbeConfig, plain)
    _check_cells(merged)
    _one_of("probe.mode", merged.probe.mode, PROBE_MODES)
    _one_of("probe.aggregate", merged.probe.aggregate, PROBE_AGGREGATES)
    _one_of("probe.layers", merged.probe.layers, PROBE_LAYERS)
    if merged.probe.layers != "last" and (merged.probe.mode == "attention" or merged.save_classifier):
        key = "probe.mode" if merged.probe.mode == "attention" else "save_classifier"
        raise ConfigError(key, f"probe.layers={merged.probe.layers!r} pools every stage into one feature row per "
                               f"window; the attention probe reads the last layer's tokens and a classifier "
                               f"artifact a head on the last layer's embedding: use probe.layers=last")
    if merged.probe.mode == "linear" and not list(merged.probe.Cs):
        raise ConfigError("probe.Cs", "is empty: the linear probe needs at least one C")
    if merged.probe.mode == "mlp" and not list(merged.probe.lrs):
        raise ConfigError("probe.lrs", "is empty: the MLP probe needs at least one learning rate")
    if merged.probe.mode == "attention":
        _check_attention(merged)
    if merged.probe.side_features is not None:
        _one_of("probe.side_features", merged.probe.side_features, PROBE_SIDE_FEATURES)
        if merged.probe.mode == "attention" or merged.probe.aggregate == "mean_prediction":
            what = "probe.mode" if merged.probe.mode == "attention" else "probe.aggregate"
            raise ConfigError("probe.side_features", f"record features are appended to one feature row per record; "
                                                     f"{what}={merged.probe[what.split('.')[1]]!r} has none (use "
                                                     f"a linear or MLP probe on mean_embedding or mean_std)")
        if merged.save_classifier:
            raise ConfigError("save_classifier", "a classifier artifact is a head on the encoder alone; with "
                                                 "probe.side_features it would need the handcrafted features too: "
                                                 "use save_classifier=false")
    if merged.save_classifier and merged.probe.mode == "mlp":   # was refused only after the whole grid had run
        raise ConfigError("save_classifier", "a classifier artifact is a linear head (a linear probe folded into "
                                             "nn.Linear); probe.mode='mlp' is not saved as one: use probe.mode=linear, "
                                             "or fine-tune with finetune.head=mlp")
    if merged.save_classifier and (merged.probe.mode == "attention" or merged.probe.aggregate == "mean_std"):
        what = "probe.mode" if merged.probe.mode == "attention" else "probe.aggregate"
        raise ConfigError("save_classifier", f"a classifier artifact is a linear head on the mean window embedding; "
                                             f"{what}={merged.probe[what.split('.')[1]]!r} is not one: use "
                                             f"save_classifier=false")
    _check_device("device", merged.device)
    return merged


def _check_attention(merged: DictConfig) -> None:
    """Value checks of ``probe.attention`` (and the aggregation it allows)."""
    att = merged.probe.attention
    if merged.probe.aggregate != "mean_embedding":
        raise ConfigError("probe.aggregate", f"the attention probe pools all tokens of a record itself; leave "
                                             f"probe.aggregate at mean_embedding (got {merged.probe.aggregate!r})")
    for name in ("lrs", "weight_decays"):
        values = list(att[name])
        if not values:
            raise ConfigError(f"probe.attention.{name}", "is empty: the attention probe needs at least one value")
        bad = [v for v in values if not (v > 0 if name == "lrs" else v >= 0)]
        if bad:
            raise ConfigError(f"probe.attention.{name}", f"must be {'positive' if name == 'lrs' else '>= 0'}, got "
                                                         f"{bad[0]}")
    for name in ("num_queries", "num_heads", "epochs", "batch_size", "patience"):
        if att[name] < 1:
            raise ConfigError(f"probe.attention.{name}", f"must be >= 1, got {att[name]}")
    if not 0.0 <= att.dropout < 1.0:
        raise ConfigError("probe.attention.dropout", f"must be in [0, 1), got {att.dropout}")


def validate_finetune_config(cfg: Any) -> DictConfig:
    """Validate a composed ``conf/finetune.yaml`` (:class:`FinetuneConfig`), the ``supervised`` override block
    included (its keys and types are :class:`FinetuneRecipe`'s).

    Returns:
        The config merged into the schema (typed; interpolations kept).

    Raises:
        ConfigError: naming the first wrong key (``finetune.epochs``, ``supervised.lrr``...).
    """
    plain = _plain(cfg)
    check_params_used(plain)
    merged = _merge(FinetuneConfig, plain)
    _check_cells(merged)
    supervised = str(merged.checkpoint).strip().startswith("supervised:")
    sup_recipe = finetune_recipe(merged, supervised=True)  # types of the override block, whatever the checkpoint
    if supervised:  # value checks on the recipe that runs (supervised: finetune.head=mlp with head_init random)
        check_finetune_recipe(sup_recipe, "finetune", {str(name): "supervised" for name in merged.supervised})
    else:
        check_finetune_recipe(merged.finetune, "finetune")
    _check_accelerator(merged.accelerator)
    return merged


def finetune_recipe(cfg: Any, supervised: bool = False) -> FinetuneRecipe:
    """The :class:`FinetuneRecipe` of a fine-tuning config: ``finetune``, with the ``supervised`` block over it for
    a supervised-from-scratch baseline.

    Args:
        cfg: a composed or validated ``conf/finetune.yaml`` (or any mapping with ``finetune`` / ``supervised``).
        supervised: apply the ``supervised`` overrides.

    Raises:
        ConfigError: an unknown key or a bad value (``finetune.lrr``, ``supervised.epochs=abc``).
    """
    base = OmegaConf.structured(FinetuneRecipe)
    parts = [("finetune", cfg.get("finetune"))] + ([("supervised", cfg.get("supervised"))] if supervised else [])
    for key, node in parts:
        if node is None:
            continue
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node)
                                else dict(node))
        try:
            base = OmegaConf.merge(base, node)
        except OmegaConfBaseException as err:
            inner = _reformat(err, FinetuneRecipe)
            raise ConfigError(f"{key}.{inner.key}" if inner.key else key, inner.problem) from None
    recipe = OmegaConf.to_object(base)
    assert isinstance(recipe, FinetuneRecipe)
    return recipe


def as_finetune_recipe(recipe: FinetuneRecipe | Mapping[str, Any] | None = None, **overrides: Any) -> FinetuneRecipe:
    """A :class:`FinetuneRecipe` from a recipe, a mapping of its fields, or nothing (the defaults), with
    ``overrides`` applied; type-checked and value-checked.

    Raises:
        ConfigError: an unknown key or a bad value, named ``finetune.<key>``.
    """
    values = dict(vars(recipe)) if isinstance(recipe, FinetuneRecipe) else dict(recipe or {})
    values.update(overrides)
    out = finetune_recipe({"finetune": values})
    check_finetune_recipe(out)
    return out


def validate_explain_config(cfg: Any) -> DictConfig:
    """Validate a composed ``conf/explain.yaml`` (:class:`ExplainConfig`).

    Returns:
        The config merged into the schema (typed; interpolations kept, ``data`` and ``source`` unresolved).

    Raises:
        ConfigError: naming the first wrong key.
    """
    plain = _plain(cfg)
    # the data group's other settings (data.root of data=folder...) do not matter when `source` replaces it
    skip = ("data",) if plain.get("source") is not None else ()
    if not skip:
        check_params_used(plain, ("data",))
    merged = _merge(ExplainConfig, plain, skip_missing=skip)
    if not list(merged.methods):
        raise ConfigError("methods", "is empty: name at least one attribution method")
    if isinstance(merged.get("record"), ListConfig) and not list(merged.record):
        raise ConfigError("record", "is an empty list: name at least one record (or null for the first)")
    _one_of("overlay", merged.overlay, OVERLAYS)
    _check_device("device", merged.device)
    _one_of("faithfulness.order", merged.faithfulness.order, FAITHFULNESS_ORDERS)
    for key in ("faithfulness.n_random", "faithfulness.steps", "counterfactual.max_steps", "demo.n_records",
                "demo.epochs"):
        if OmegaConf.select(merged, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {OmegaConf.select(merged, key)}")
    if not merged.faithfulness.segment_s > 0:
        raise ConfigError("faithfulness.segment_s", f"must be positive, got {merged.faithfulness.segment_s}")
    check_counterfactual_options(OmegaConf.to_container(merged.counterfactual, resolve=True))
    for key in ("threads", "torch_threads"):
        if merged[key] is not None and merged[key] < 1:
            raise ConfigError(key, f"must be >= 1 (or null), got {merged[key]}")
    for key in ("source", "method_options"):
        node = merged._get_node(key)
        if not (node is None or node._is_none() or isinstance(node, DictConfig)):
            raise ConfigError(key, f"must be a mapping (or null), got {node._value()!r}")
    if merged.get("source") is None and not isinstance(merged._get_node("data"), DictConfig):
        raise ConfigError("data", "is not set (choose one of the conf/data/ options, or give source={_target_: ...})")
    return merged


__all__ = ["FinetuneRecipe", "ProbeRecipe", "ProbeMLPRecipe", "ProbeAttentionRecipe", "ProbeConfig",
           "FinetuneConfig", "ExplainConfig",
           "BootstrapConfig", "FeaturesConfig", "FaithfulnessConfig", "CounterfactualConfig", "ExplainDemoConfig",
           "SUPERVISED_OVERRIDES", "HEADS", "HEAD_INITS", "WINDOW_AGGREGATES", "LP_CS", "PROBE_MODES",
           "PROBE_AGGREGATES", "PROBE_LAYERS", "REPORT_WHEN", "OVERLAYS", "FAITHFULNESS_ORDERS", "check_finetune_recipe",
           "validate_probe_config", "validate_finetune_config", "validate_explain_config",
           "check_counterfactual_options", "finetune_recipe",
           "as_finetune_recipe"]
