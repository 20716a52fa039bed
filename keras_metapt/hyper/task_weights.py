"""Per-task loss weights for multitask pre-training."""

import keras
import tensorflow as tf

__all__ = ["TaskWeights"]


@keras.saving.register_keras_serializable(package="keras_metapt")
class TaskWeights(keras.layers.Layer):
    """w_t = 2 sigmoid(phi_t), one logit phi_t per PT task, phi = 0 initially (all weights 1).

    Weights stay in (0, 2): a task can be switched off or counted up to twice. Calling the
    layer returns the weight vector whatever the input (which is ignored), so the layer fits
    `MetaPretrainer(meta_role="loss")`. Thousands of tasks cost one vector.
    """

    def __init__(self, num_tasks, task_names=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if task_names is not None and len(task_names) != int(num_tasks):
            raise ValueError(f"{len(task_names)} task_names for num_tasks={num_tasks}")
        self.num_tasks = int(num_tasks)
        self.task_names = list(task_names) if task_names is not None else None
        self.logits = self.add_weight(shape=(self.num_tasks,), initializer="zeros",
                                      name="task_weight_logits")
        self.built = True

    def call(self, inputs=None):
        del inputs
        return 2.0 * tf.sigmoid(self.logits)

    def task_weights(self):
        """The current weights as a NumPy array."""
        return 2.0 / (1.0 + tf.exp(-tf.convert_to_tensor(self.logits)).numpy())

    def get_config(self):
        config = super().get_config()
        config.update(num_tasks=self.num_tasks, task_names=self.task_names)
        return config
