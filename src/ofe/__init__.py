"""ofe: measure, understand and minimise outlier features in transformer training."""

__version__ = "0.1.0"
