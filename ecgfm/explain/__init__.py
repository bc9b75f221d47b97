"""Explain stage: wrap a model, attribute its decisions, measure whether the explanations are faithful.

* :mod:`ecgfm.explain.wrapper`: :class:`ECGWrapper` (any torch model or an ecgfm encoder + head; batched; layer
  activations/gradients; embeddings; ViT token grids; safe input conversion).
* :mod:`ecgfm.explain.attribution`: :class:`Explainer` and :class:`Attribution` (saliency, input x gradient,
  SmoothGrad, integrated gradients, DeepLift, GradientSHAP, occlusion, lead / wave ablation, Grad-CAM,
  Grad-CAM++, attention rollout; explanations of an SSL encoder's embedding with no classifier).
* :mod:`ecgfm.explain.waves`: R-peak detection, P / QRS / T windows, feature masks.
* :mod:`ecgfm.explain.faithfulness`: deletion / insertion curves (AOPC), model-parameter randomisation,
  localisation against ground-truth masks.
"""

from ecgfm.explain.attribution import METHODS, Attribution, Explainer, random_attribution  # noqa: F401
from ecgfm.explain.faithfulness import (compare_with_random, faithfulness_report, localisation,  # noqa: F401
                                        perturbation_curve, randomisation_check)
from ecgfm.explain.wrapper import ECGWrapper, EncoderClassifier  # noqa: F401

__all__ = ["Attribution", "ECGWrapper", "EncoderClassifier", "Explainer", "METHODS", "compare_with_random",
           "faithfulness_report", "localisation", "perturbation_curve", "random_attribution", "randomisation_check"]
