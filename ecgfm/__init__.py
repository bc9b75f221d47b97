"""ecgfm: self-supervised ECG foundation models (data, pretraining, benchmarking, explanation)."""

__version__ = "0.1.0"
