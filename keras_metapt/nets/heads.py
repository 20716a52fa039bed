"""Heads on encoder features: the SimCLR projection head and a linear classifier.

Their last layer computes in float32 under any Keras dtype policy (mixed precision: float32
outputs for the losses and for scores, as Keras' mixed-precision guide recommends)."""

import keras

__all__ = ["projection_head", "linear_head"]


def projection_head(input_dim=256, hidden=256, output_dim=128, name="projection_head"):
    """SimCLR projection g: features -> Dense(hidden) + ReLU -> Dense(output_dim) (built)."""
    return keras.Sequential([keras.Input((input_dim,)),
                             keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(output_dim, dtype="float32")], name=name)


def linear_head(input_dim, outputs, name="linear_head"):
    """Dense(outputs) logits on features (built)."""
    return keras.Sequential([keras.Input((input_dim,)), keras.layers.Dense(outputs, dtype="float32")],
                            name=name)
