"""ResNet-10/18/34-style 2-D encoders for small images (28 x 28 Fashion-MNIST):
[batch, height, width, channels] -> [batch, 8 * width].

Stem: Conv2D(width, 3x3) + BatchNorm + ReLU, no pooling (small inputs, as CIFAR ResNets);
four stages of BasicBlocks (two 3x3 Conv2D + BatchNorm, identity or 1x1-projection shortcut)
with width, 2, 4 and 8 x width channels, stride 2 at the start of stages 2-4; global average
pooling. Blocks per stage: ResNet-10 (1, 1, 1, 1), ResNet-18 (2, 2, 2, 2), ResNet-34
(3, 4, 6, 3). Weights for width 16 on 28 x 28 x 1: 0.31M (10), 0.70M (18), 1.34M (34);
width 64 is the standard ImageNet width (16x as many).
"""

import keras

from keras_metapt.nets.blocks import BN_MOMENTUM, basic_block

__all__ = ["resnet2d", "RESNET2D_BLOCKS"]

RESNET2D_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def resnet2d(depth=18, input_shape=(28, 28, 1), width=16, name=None):
    """A built Keras model: images -> features [batch, 8 * width]."""
    if depth not in RESNET2D_BLOCKS:
        raise ValueError(f"depth must be one of {sorted(RESNET2D_BLOCKS)}, got {depth}")
    if int(width) < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    inputs = keras.Input(input_shape, name="images")
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, count in enumerate(RESNET2D_BLOCKS[depth]):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, width * 2 ** stage, stride, 3, f"stage{stage + 1}_block{block + 1}",
                            conv=keras.layers.Conv2D)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, features, name=name or f"resnet2d{depth}")
