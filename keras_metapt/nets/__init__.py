"""Networks: encoders and heads for the experiments."""

from keras_metapt.nets.classifiers import IMAGE_CLASSIFIERS, image_classifier
from keras_metapt.nets.cnn2d import small_cnn2d
from keras_metapt.nets.gin import GIN
from keras_metapt.nets.heads import linear_head, projection_head
from keras_metapt.nets.resnet1d import resnet1d18
from keras_metapt.nets.resnet2d import RESNET2D_BLOCKS, resnet2d

__all__ = ["GIN", "resnet1d18", "resnet2d", "RESNET2D_BLOCKS", "small_cnn2d", "projection_head",
           "linear_head", "IMAGE_CLASSIFIERS", "image_classifier"]
