"""What is meta-learned: Keras layers whose weights are the meta-parameters phi."""

from keras_metapt.hyper.augment import (LearnedAugmentation, LearnedGaussianNoise,
                                        LearnedSpatialWarp, LearnedTimeWarp, RandomCropFlip,
                                        SignalCutoutNoise, TwoViews)
from keras_metapt.hyper.example_weights import (MetaWeightNet, meta_weight_net_weights,
                                                normalised_weighted_loss)
from keras_metapt.hyper.feature_transform import (FeatureWiseTransforms,
                                                  feature_wise_transform)
from keras_metapt.hyper.metaperturb import MetaPerturb, metaperturb
from keras_metapt.hyper.schedules import clipped_schedule_step, piecewise_constant
from keras_metapt.hyper.task_weights import TaskWeights

__all__ = ["TaskWeights", "LearnedAugmentation", "LearnedGaussianNoise", "LearnedTimeWarp",
           "LearnedSpatialWarp", "SignalCutoutNoise", "RandomCropFlip", "TwoViews",
           "piecewise_constant", "clipped_schedule_step", "MetaWeightNet",
           "meta_weight_net_weights",
           "normalised_weighted_loss", "FeatureWiseTransforms", "feature_wise_transform",
           "MetaPerturb", "metaperturb"]
