"""ResNet1D-18, the small 2-D CNN and the heads: the architecture stated in their docstrings.

References: the shapes and layer counts of the specification (BasicBlocks [2, 2, 2, 2],
kernel 15, channels 32/64/128/256, stride-2 stem, GAP -> 256; projection 256 -> 256 -> 128).
"""

import keras
import numpy as np

from keras_metapt.nets import linear_head, projection_head, resnet1d18, small_cnn2d


def test_resnet1d18_architecture():
    model = resnet1d18((1024, 12))
    assert model.output_shape == (None, 256)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv1D)]
    main_convs = [c for c in convs if c.kernel_size == (15,)]
    assert len(main_convs) == 1 + 2 * 8  # stem + two per BasicBlock, 8 blocks
    assert convs[0].strides == (2,) and convs[0].filters == 32
    assert sorted({c.filters for c in main_convs}) == [32, 64, 128, 256]
    out = model(np.zeros((2, 1024, 12), np.float32))
    assert out.shape == (2, 256)


def test_small_cnn_and_heads():
    encoder = small_cnn2d((28, 28, 1))
    assert encoder(np.zeros((3, 28, 28, 1), np.float32)).shape == (3, 128)
    head = projection_head(128, 256, 128)
    assert [w.shape for w in head.trainable_weights] == [(128, 256), (256,), (256, 128), (128,)]
    assert linear_head(128, 10)(np.zeros((2, 128), np.float32)).shape == (2, 10)
