"""Every BatchNormalization in our nets uses momentum 0.9 (PyTorch's 0.1, the reference
implementations' setting), as the nets' docstrings state; and the GIN keeps it through
get_config / from_config."""

import keras

from keras_metapt.nets import GIN, resnet1d18, small_cnn2d


def batchnorms(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]


def test_batchnorm_momentum_is_pytorch_default():
    gin = GIN([5, 3], [4, 2], num_graphs=2, num_layers=2, hidden=8)
    models = [gin, resnet1d18((64, 12), channels=(8, 8, 8, 8)), small_cnn2d((28, 28, 1), (4, 4, 4))]
    for model in models:
        layers = batchnorms(model)
        assert layers and all(layer.momentum == 0.9 for layer in layers), model.name
    assert GIN.from_config(gin.get_config()).bn_momentum == 0.9
