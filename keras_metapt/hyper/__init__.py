"""What is meta-learned: hyperparameter parameterisations."""

from keras_metapt.hyper.schedules import piecewise_constant

__all__ = ["piecewise_constant"]
