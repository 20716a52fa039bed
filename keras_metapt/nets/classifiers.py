"""Image classifiers for 28 x 28 x 1 inputs: a body of `keras_metapt.nets` and a linear layer.

Bodies (``width`` w): "mlp" (two ReLU layers of 32 w units), "cnn" (`small_cnn2d` with w, 2w,
4w filters), "resnet10" / "resnet18" / "resnet34" (`resnet2d` of width w).
"""

import keras

from keras_metapt.nets.cnn2d import small_cnn2d
from keras_metapt.nets.resnet2d import resnet2d

__all__ = ["IMAGE_CLASSIFIERS", "image_classifier"]

IMAGE_CLASSIFIERS = ("mlp", "cnn", "resnet10", "resnet18", "resnet34")


def image_classifier(network, width=16, num_classes=10, input_shape=(28, 28, 1)):
    """A built model: images -> ``num_classes`` logits (initialised from Keras' global seed)."""
    if network not in IMAGE_CLASSIFIERS:
        raise ValueError(f"network must be one of {IMAGE_CLASSIFIERS}, got {network!r}")
    w = int(width)
    if network == "mlp":
        body = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(32 * w, "relu"),
                                 keras.layers.Dense(32 * w, "relu")], name="mlp")
    elif network == "cnn":
        body = small_cnn2d(input_shape, filters=(w, 2 * w, 4 * w))
    else:
        body = resnet2d(int(network[len("resnet"):]), input_shape, width=w)
    return keras.Sequential([keras.Input(input_shape), body, keras.layers.Dense(num_classes)],
                            name=f"{network}_classifier")
