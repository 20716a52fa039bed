"""Networks: encoders for the experiments."""

from keras_metapt.nets.gin import GIN

__all__ = ["GIN"]
