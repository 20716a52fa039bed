"""Heads on encoder features: the SimCLR projection head and a linear classifier.

Under a mixed-precision policy their last layer computes in float32 (float32 outputs for the
losses and for scores, as Keras' mixed-precision guide recommends); otherwise it follows the
policy."""

import keras

from keras_metapt.functional import HALF_PRECISION


def _output_dtype():
    """float32 under a half-precision (mixed) global policy, else None (the policy)."""
    half = keras.config.dtype_policy().compute_dtype in HALF_PRECISION
    return "float32" if half else None

__all__ = ["projection_head", "linear_head"]


def projection_head(input_dim=256, hidden=256, output_dim=128, name="projection_head"):
    """SimCLR projection g: features -> Dense(hidden) + ReLU -> Dense(output_dim) (built)."""
    return keras.Sequential([keras.Input((input_dim,)),
                             keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(output_dim, dtype=_output_dtype())], name=name)


def linear_head(input_dim, outputs, name="linear_head"):
    """Dense(outputs) logits on features (built)."""
    return keras.Sequential([keras.Input((input_dim,)),
                             keras.layers.Dense(outputs, dtype=_output_dtype())], name=name)
