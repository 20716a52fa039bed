"""ResNet1D-18 for multichannel signals (12-lead ECG): [batch, time, channels] -> [batch, 256].

Stem: Conv1D(32, 15, stride 2) + BatchNorm + ReLU + MaxPool(3, stride 2); four stages of two
BasicBlocks (two Conv1D(kernel 15) + BatchNorm, identity or 1x1-projection shortcut) with
32/64/128/256 channels, stride 2 at the start of stages 2-4; global average pooling -> 256-d.
For a 1024 x 12 input: 4.6M weights.

BatchNorm momentum is 0.9 (moving = 0.9 moving + 0.1 batch), PyTorch's default 0.1 as the
reference implementations use it; Keras' default 0.99 would leave most of the moving
statistics at their initial 0/1 after a short warm-up.
"""

import keras

from keras_metapt.nets.blocks import BN_MOMENTUM, basic_block

__all__ = ["resnet1d18"]


def resnet1d18(input_shape=(1024, 12), channels=(32, 64, 128, 256), blocks=(2, 2, 2, 2),
               kernel_size=15, name="resnet1d18"):
    """A built Keras model: signals [batch, time, leads] -> features [batch, channels[-1]]."""
    inputs = keras.Input(input_shape, name="signals")
    x = keras.layers.Conv1D(channels[0], kernel_size, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling1D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (width, count) in enumerate(zip(channels, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, width, stride, kernel_size, f"stage{stage + 1}_block{block + 1}")
    features = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, features, name=name)
