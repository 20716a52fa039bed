"""The two non-meta-learned references of a task family, on the `TaskMetaLearner` protocol.

- `FromScratch`: every task adapts from the same random initialisation; ``meta_step`` does
  nothing (no cost, nothing learned).
- `MultitaskPretraining`: "pre-train, then fine-tune": ``meta_step`` is one Adam step of
  ordinary supervised training of the learner on the pooled examples of a meta-batch's
  tasks with their *original* labels (a ``num_classes``-output head: the classes of the
  image families, or every meta-training task of the molecule family, multi-label); a task
  adapts from the pre-trained encoder with a fresh zero head. Cost per meta-step: one
  gradient over the pooled batch.
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
    """Supervised pre-training of the learner's encoder over all meta-training classes (or
    tasks), then fine-tuning per task (see the module docstring).

    Args:
      initial_params: the learner's params with the task head ([features, n_way], [n_way])
        last; the task head stays zero.
      num_classes: outputs of the pre-training head.
      optimizer: Keras optimizer of the pre-training (default Adam(1e-3)).
      loss_fn: the learner's loss (default the conv classifier's `classification_loss`),
        used with the task head to adapt and with the pre-training head to pre-train.
    ``meta_step(support)``: support = (examples [M, n, ...], original labels [M, n, ...]);
    the M sets are pooled by merging their first two dimensions (a learner whose examples
    cannot be merged so, e.g. packed graphs, passes its pooled set as M = 1).
    Metrics: ``pretraining_loss`` (before the step).
    """

    def __init__(self, initial_params, num_classes, *, inner_steps=5, inner_learning_rate=0.01,
                 optimizer=None, loss_fn=classification_loss, name="multitask_pretraining"):
        super().__init__(loss_fn, list(initial_params), inner_steps=inner_steps,
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
        pooled = tf.nest.map_structure(lambda x: tf.reshape(x, [-1] + x.shape[2:].as_list()),
                                       support)
        with tf.GradientTape() as tape:
            loss = self.loss_fn(self.trained, pooled)
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trained), self.trained))
        self.meta_steps.assign_add(1)
        return {"pretraining_loss": loss}
