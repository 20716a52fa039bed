"""ResNet-10/18/34 for 28x28 images.

References: the architecture's counts written out: 1 stem conv + 2 convs per block (blocks per
stage (1,1,1,1), (2,2,2,2), (3,4,6,3)) + 3 projection convs (the first block of stages 2-4);
the weight count of ResNet-10 at width 1 summed by hand; stride 2 at stages 2-4 of a 28x28
input gives 4x4 before pooling.
"""

import keras
import numpy as np
import pytest

from keras_metapt.nets import RESNET2D_BLOCKS, resnet2d


@pytest.mark.parametrize("depth", [10, 18, 34])
def test_layer_counts_and_output(depth):
    model = resnet2d(depth, width=4)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 1 + 2 * sum(RESNET2D_BLOCKS[depth]) + 3
    assert model.output_shape == (None, 32)
    last_conv = [l for l in convs if "proj" not in l.name][-1]
    assert tuple(last_conv.output.shape[1:3]) == (4, 4)
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 32)


def test_resnet10_weight_count_by_hand():
    w = 1
    convs = 9 * 1 * w  # stem 3x3, 1 -> w
    bns = 4 * w        # gamma, beta, moving mean, moving var
    for stage in range(4):
        c_in = w * 2 ** max(stage - 1, 0)
        c = w * 2 ** stage
        convs += 9 * c_in * c + 9 * c * c
        bns += 2 * 4 * c
        if stage > 0:
            convs += c_in * c
            bns += 4 * c
    assert resnet2d(10, width=w).count_params() == convs + bns


def test_bad_depth_and_width_are_named():
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet2d(50)
    with pytest.raises(ValueError, match="width"):
        resnet2d(18, width=0)
