"""The two non-meta-learned references of a task family, on the `TaskMetaLearner` protocol.

- `FromScratch`: every task adapts from the same random initialisation; ``meta_step`` does
  nothing (no cost, nothing learned).
- `MultitaskPretraining`: "pre-train, then fine-tune": ``meta_step`` is one Adam step of
  ordinary supervised training of the conv classifier (`keras_metapt.taskmeta.classifier`)
  on the pooled examples of a meta-batch's tasks with their *original* class labels (a
  ``num_classes``-way head); a task adapts from the pre-trained encoder with a fresh zero
  ``n_way`` head. Cost per meta-step: one gradient over the pooled batch.
"""

import keras
import tensorflow as tf

from keras_metapt.taskmeta.classifier import classification_loss
from keras_metapt.taskmeta.learner import TaskMetaLearner

__all__ = ["FromScratch", "MultitaskPretraining"]


class FromScratch(TaskMetaLearner):
    """Adaptation from a fixed initialisation; ``meta_step`` leaves it unchanged."""

    def __init__(self, loss_fn, initial_params, *, inner_steps=5, inner_learning_rate=0.01,
                 name="from_scratch"):
        super().__init__(loss_fn, initial_params, inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate, name=name)

    def _meta_step(self, support, query, weights):
        del support, query, weights
        self.meta_steps.assign_add(1)
        return {}


class MultitaskPretraining(TaskMetaLearner):
    """Supervised pre-training of the conv classifier's encoder over all meta-training
    classes, then fine-tuning per task (see the module docstring).

    Args:
      initial_params: conv classifier params (`conv_classifier_params`) with the task head
        ([features, n_way], [n_way]) last; the task head stays zero.
      num_classes: classes of the pre-training head (labels in [0, num_classes)).
      optimizer: Keras optimizer of the pre-training (default Adam(1e-3)).
    ``meta_step(support)``: support = (images [M, n, ...], original labels [M, n]).
    Metrics: ``pretraining_loss`` (before the step).
    """

    def __init__(self, initial_params, num_classes, *, inner_steps=5, inner_learning_rate=0.01,
                 optimizer=None, name="multitask_pretraining"):
        super().__init__(classification_loss, list(initial_params), inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate, name=name)
        features = int(self.initialisation[-2].shape[0])
        self.pretraining_head = [tf.Variable(tf.zeros([features, int(num_classes)]),
                                             name="pretraining_kernel"),
                                 tf.Variable(tf.zeros([int(num_classes)]),
                                             name="pretraining_bias")]
        self.optimizer = optimizer or keras.optimizers.Adam(1e-3)
        self.trained = self.initialisation[:-2] + self.pretraining_head
        self.optimizer.build(self.trained)

    def checkpoint_items(self):
        return dict(super().checkpoint_items(), pretraining_head=self.pretraining_head,
                    optimizer=self.optimizer)

    def _meta_step(self, support, query, weights):
        del query, weights
        images, labels = support
        images = tf.reshape(images, [-1] + images.shape[2:].as_list())
        labels = tf.reshape(labels, [-1])
        with tf.GradientTape() as tape:
            loss = classification_loss(self.trained, (images, labels))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trained), self.trained))
        self.meta_steps.assign_add(1)
        return {"pretraining_loss": loss}
