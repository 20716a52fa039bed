"""A small 2-D CNN encoder for images: [batch, height, width, channels] -> [batch, 128].

Three stages of Conv2D(3x3) + BatchNorm + ReLU (32, 64, 128 filters), max-pooling after the
first two, global average pooling. For 28 x 28 x 1 inputs: about 94K weights.

BatchNorm momentum is 0.9 (moving = 0.9 moving + 0.1 batch), PyTorch's default 0.1 as the
reference implementations use it; Keras' default 0.99 would leave most of the moving
statistics at their initial 0/1 after a short warm-up.
"""

import keras

__all__ = ["small_cnn2d"]

BN_MOMENTUM = 0.9


def small_cnn2d(input_shape=(28, 28, 1), filters=(32, 64, 128), name="small_cnn2d"):
    """A built Keras model: images -> features [batch, filters[-1]]."""
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    for i, width in enumerate(filters):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i < len(filters) - 1:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    features = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, features, name=name)
