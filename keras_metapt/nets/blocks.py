"""The residual BasicBlock shared by the 1-D and 2-D ResNets.

BatchNorm momentum is 0.9 (moving = 0.9 moving + 0.1 batch), PyTorch's default 0.1 as the
reference implementations use it; Keras' default 0.99 would leave most of the moving
statistics at their initial 0/1 after a short warm-up.
"""

import keras

__all__ = ["BN_MOMENTUM", "basic_block"]

BN_MOMENTUM = 0.9


def basic_block(x, channels, stride, kernel_size, name, conv=keras.layers.Conv1D):
    """Two ``conv`` + BatchNorm (ReLU between), identity or 1x1-projection shortcut, ReLU."""
    shortcut = x
    y = conv(channels, kernel_size, strides=stride, padding="same", use_bias=False,
             name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv(channels, kernel_size, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != channels:
        shortcut = conv(channels, 1, strides=stride, use_bias=False,
                        name=f"{name}_proj")(shortcut)
        shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM,
                                                   name=f"{name}_proj_bn")(shortcut)
    added = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(added)
