"""MetaPerturb's two stages (Ryu et al. 2020): meta-train one shared perturbation function
(`keras_metapt.hyper.MetaPerturb`) jointly with one classifier per source task, then freeze it
and plug it, as a regulariser, into a different architecture trained on an unseen dataset.

Classifiers are pure functions of (params, images) with numbered insertion points ("sites")
where a regulariser ``regularise(h, site) -> h`` is applied (None: nothing):
- `ConvClassifier`: ``blocks`` x (conv 3x3 -> batch norm -> [site] -> ReLU -> 2x2 max-pool),
  then global average pooling and a linear head (the source architecture);
- `ResNetClassifier`: a ResNet-10-style network (stem conv-BN-ReLU, four stages of one
  BasicBlock, width, 2, 4, 8 x width channels, stride 2 at stages 2-4, 1x1 projection
  shortcuts), the site after each block's residual sum, before its ReLU (as the original), then
  global average pooling and a linear head (the target architecture).
Batch normalisation uses the statistics of the batch it is applied to (no running statistics);
evaluation runs in fixed batches.

Meta-training step (`SourceMetaTrainer.train_step`), tasks t = 1..T with their own theta_t:
- first order (``estimator=None``, as the original's code): an Adam step on every theta_t with
  its training loss under the perturbation, then an Adam step on phi along
  (1/T) sum_t d L_val,t(theta_t', phi) / d phi, the validation loss at the updated theta_t' with
  the perturbation on (fresh noise). Cost: 2 gradients per task.
- any estimator of `keras_metapt.hypergrad` (e.g. ``Unrolled(sgd(lr), 1)``, the second-order
  one-step look-ahead): its hypergradient of the same validation loss through one inner step on
  the sum of the tasks' training losses, then the Adam step on every theta_t;
- ``estimator_from_optimizer=lambda opt: Unrolled(opt, 1)``: the same through the step the
  networks really take: ``opt`` is the differentiable twin of their Keras Adam
  (`optim.mirror_keras`), started from its current moments and step count. Cost as one-step
  SGD plus Adam's elementwise work.
Target training (`TargetTrainer`): Adam on the classifier's loss with the frozen perturbation
(noise coefficient annealed linearly from 0 to 1 over ``anneal_steps``, as the original), with
dropout at the same sites, or with nothing; test predictions of the perturbed network average
the softmax over ``samples`` noise draws (the original's test), dropout is off at test.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_metapt import optim
from keras_metapt.fewshot import batch_normalised_conv
from keras_metapt.hypergrad.problem import BilevelProblem
from keras_metapt.reweighting import per_example_cross_entropy

__all__ = ["ConvClassifier", "ResNetClassifier", "metaperturb_regulariser",
           "dropout_regulariser", "SourceMetaTrainer", "TargetTrainer"]


def _he_kernel(rng, size, c_in, c_out):
    std = math.sqrt(2.0 / (size * size * c_in))
    return (rng.standard_normal((size, size, c_in, c_out)) * std).astype(np.float32)


def _head(rng, features, classes):
    limit = math.sqrt(6.0 / (features + classes))  # Glorot uniform, zero bias
    return [rng.uniform(-limit, limit, (features, classes)).astype(np.float32),
            np.zeros(classes, np.float32)]


class _Classifier(tf.Module):
    """Variables in the order ``logits`` takes them; the head (kernel, bias) last."""

    num_sites = 0

    def _make(self, arrays, names):
        self.weight_list = [tf.Variable(a, name=n) for a, n in zip(arrays, names)]

    def values(self):
        return [tf.convert_to_tensor(v) for v in self.weight_list]

    def copy_body_from(self, other):
        """Assigns every weight but the head from ``other`` (same architecture and width)."""
        mine, theirs = self.weight_list[:-2], other.weight_list[:-2]
        if [v.shape for v in mine] != [v.shape for v in theirs]:
            raise ValueError("copy_body_from needs the same architecture and width")
        for target, source in zip(mine, theirs):
            target.assign(source)

    def loss(self, params, images, labels, regularise=None):
        """Mean cross-entropy of ``logits``."""
        logits = self.logits(params, images, regularise)
        return tf.reduce_mean(per_example_cross_entropy(logits, labels))


class ConvClassifier(_Classifier):
    """The source architecture (module docstring): ``blocks`` sites, ``width`` features (28x28
    inputs and 4 blocks leave a 1x1 map). Kernels He-normal from ``seed``."""

    def __init__(self, num_classes, width=32, blocks=4, in_channels=1, seed=0,
                 name="conv_classifier"):
        super().__init__(name=name)
        rng = np.random.default_rng([107, int(seed)])
        arrays, names, c_in = [], [], int(in_channels)
        for b in range(int(blocks)):
            arrays += [_he_kernel(rng, 3, c_in, width), np.ones(width, np.float32),
                       np.zeros(width, np.float32)]
            names += [f"kernel_{b}", f"bn_gamma_{b}", f"bn_beta_{b}"]
            c_in = width
        arrays += _head(rng, width, num_classes)
        self._make(arrays, names + ["head_kernel", "head_bias"])
        self.blocks, self.num_sites = int(blocks), int(blocks)

    def logits(self, params, images, regularise=None):
        h = images
        for b in range(self.blocks):
            h = batch_normalised_conv(h, *params[3 * b:3 * b + 3])
            if regularise is not None:
                h = regularise(h, b)
            h = tf.nn.max_pool2d(tf.nn.relu(h), 2, 2, "VALID")
        return tf.matmul(tf.reduce_mean(h, [1, 2]), params[-2]) + params[-1]


class ResNetClassifier(_Classifier):
    """The target architecture (module docstring): 4 sites, 8 x ``width`` features."""

    STAGES = 4

    def __init__(self, num_classes, width=16, in_channels=1, seed=0, name="resnet_classifier"):
        super().__init__(name=name)
        rng = np.random.default_rng([108, int(seed)])
        arrays, names = [_he_kernel(rng, 3, in_channels, width), np.ones(width, np.float32),
                         np.zeros(width, np.float32)], ["stem_kernel", "stem_gamma", "stem_beta"]
        c_in = width
        for s in range(self.STAGES):
            c = width * 2 ** s
            for part, (size, fan_in) in (("conv1", (3, c_in)), ("conv2", (3, c)),
                                         ("proj", (1, c_in))):
                arrays += [_he_kernel(rng, size, fan_in, c), np.ones(c, np.float32),
                           np.zeros(c, np.float32)]
                names += [f"stage{s}_{part}_{n}" for n in ("kernel", "gamma", "beta")]
            c_in = c
        arrays += _head(rng, c_in, num_classes)
        self._make(arrays, names + ["head_kernel", "head_bias"])
        self.num_sites = self.STAGES

    def logits(self, params, images, regularise=None):
        h = tf.nn.relu(batch_normalised_conv(images, *params[:3]))
        for s in range(self.STAGES):
            stride = 1 if s == 0 else 2
            p = params[3 + 9 * s:3 + 9 * (s + 1)]
            y = tf.nn.relu(batch_normalised_conv(h, *p[0:3], stride=stride))
            y = batch_normalised_conv(y, *p[3:6])
            h = y + batch_normalised_conv(h, *p[6:9], stride=stride)
            if regularise is not None:
                h = regularise(h, s)
            h = tf.nn.relu(h)
        return tf.matmul(tf.reduce_mean(h, [1, 2]), params[-2]) + params[-1]


def metaperturb_regulariser(perturb, phi, seed, num_sites, noise_coeff=1.0, clip_value=None):
    """``regularise(h, site)``: ``perturb`` (a `MetaPerturb`) with weights ``phi`` at every site,
    each site's noise from its own split of ``seed``."""
    seeds = tf.random.experimental.stateless_split(seed, num_sites)
    return lambda h, site: perturb.apply(phi, h, seeds[site], noise_coeff, clip_value)


def dropout_regulariser(rate, seed, num_sites):
    """``regularise(h, site)``: inverted element-wise dropout at ``rate`` (stateless draws)."""
    seeds = tf.random.experimental.stateless_split(seed, num_sites)
    return lambda h, site: tf.nn.experimental.stateless_dropout(h, rate, seeds[site])


def _step_seeds(seed, step, count):
    base = tf.stack([tf.constant(int(seed), tf.int64), tf.cast(step, tf.int64)])
    return tf.unstack(tf.random.experimental.stateless_split(base, count))


class SourceMetaTrainer:
    """Joint meta-training of ``perturb`` (a `MetaPerturb`) with one classifier per source task
    (module docstring). ``train_step(train_batches, val_batches)`` takes one (images, labels)
    pair per task in each tuple and returns (mean training loss, mean validation loss).
    ``checkpoint_items()`` names the state to checkpoint. ``estimator_from_optimizer``
    (instead of ``estimator``): a function of an inner optimizer returning the estimator, given
    at every step the twin of the networks' Adam, with its state as ``opt_state``."""

    def __init__(self, classifiers, perturb, *, learning_rate=1e-3, perturb_learning_rate=1e-3,
                 estimator=None, estimator_from_optimizer=None, clip_value=None, seed=0,
                 jit_compile=False):
        if not classifiers:
            raise ValueError("give at least one source classifier")
        if estimator is not None and estimator_from_optimizer is not None:
            raise ValueError("give estimator or estimator_from_optimizer, not both")
        self.classifiers, self.perturb, self.estimator = list(classifiers), perturb, estimator
        self.estimator_from_optimizer = estimator_from_optimizer
        self.learning_rate, self.clip_value, self.seed = learning_rate, clip_value, int(seed)
        self.variables = [v for c in self.classifiers for v in c.weight_list]
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(self.variables)
        self.perturb_optimizer = keras.optimizers.Adam(perturb_learning_rate)
        self.perturb_optimizer.build(perturb.weight_variables())
        self.step = tf.Variable(0, dtype=tf.int64, name="step")
        self.train_step = tf.function(self._train_step, jit_compile=jit_compile)

    def checkpoint_items(self):
        items = {f"classifier_{i}": c for i, c in enumerate(self.classifiers)}
        items.update(optimizer=self.optimizer, perturb=self.perturb,
                     perturb_optimizer=self.perturb_optimizer, step=self.step)
        return items

    def _split(self, params):
        out, start = [], 0
        for c in self.classifiers:
            out.append(params[start:start + len(c.weight_list)])
            start += len(c.weight_list)
        return out

    def _mean_loss(self, params, phi, batches, seed):
        """(1/T) sum_t L_t(theta_t, phi) on batches[t], perturbed with noise from ``seed``."""
        seeds = tf.random.experimental.stateless_split(seed, len(self.classifiers))
        losses = []
        for t, (classifier, theta) in enumerate(zip(self.classifiers, self._split(params))):
            regularise = metaperturb_regulariser(self.perturb, phi, seeds[t],
                                                 classifier.num_sites,
                                                 clip_value=self.clip_value)
            losses.append(classifier.loss(theta, *batches[t], regularise))
        return tf.add_n(losses) / len(losses)

    def problem(self, learning_rate=True):
        """Inner: the sum over tasks of the perturbed training losses (each batch tuple carries
        its noise seed last); outer: the mean perturbed validation loss. ``learning_rate``:
        the inner step's rate is the trainer's (False: the inner optimizer's own, as for the
        twin of the networks' Adam, which reads the Keras optimizer's current rate)."""
        tasks = len(self.classifiers)

        def inner_loss(params, phi, batch):
            return tasks * self._mean_loss(params, phi, batch[:-1], batch[-1])

        def outer_loss(params, phi, batch):
            return self._mean_loss(params, phi, batch[:-1], batch[-1])

        if not learning_rate:
            return BilevelProblem(inner_loss, outer_loss)
        rate = self.learning_rate
        return BilevelProblem(inner_loss, outer_loss,
                              inner_optimizer_hparams=lambda h, s, n: {"learning_rate": rate},
                              inner_learning_rate=rate)

    def _theta_step(self, phi, batches, seed):
        params = [tf.convert_to_tensor(v) for v in self.variables]
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = self._mean_loss(params, phi, batches, seed)
        grads = tape.gradient(loss, params)
        # the mean over tasks divides each task's gradient by T: scale back (Adam is invariant
        # to it, but not its epsilon)
        self.optimizer.apply_gradients(zip([g * len(self.classifiers) for g in grads],
                                           self.variables))
        return loss

    def _train_step(self, train_batches, val_batches):
        train_seed, val_seed, estimator_seed = _step_seeds(self.seed, self.step, 3)
        phi = self.perturb.hparams()
        if self.estimator is None and self.estimator_from_optimizer is None:
            loss = self._theta_step(phi, train_batches, train_seed)
            params = [tf.convert_to_tensor(v) for v in self.variables]
            with tf.GradientTape() as tape:
                tape.watch(phi)
                outer = self._mean_loss(params, phi, val_batches, val_seed)
            hypergrad = tape.gradient(outer, phi)
        else:
            params = [tf.convert_to_tensor(v) for v in self.variables]
            estimator, opt_state = self.estimator, None
            if estimator is None:  # through the networks' own Adam, from its current state
                twin, opt_state = optim.mirror_keras(self.optimizer, self.variables)
                estimator = self.estimator_from_optimizer(twin)
            result = estimator(self.problem(learning_rate=opt_state is None), params, phi,
                               tuple(train_batches) + (train_seed,),
                               tuple(val_batches) + (val_seed,), opt_state=opt_state,
                               seed=estimator_seed)
            hypergrad, outer = result.hypergrad, result.outer_loss
            loss = self._theta_step(phi, train_batches, train_seed)
        self.perturb_optimizer.apply_gradients(zip(hypergrad, self.perturb.weight_variables()))
        self.step.assign_add(1)
        return loss, outer


class TargetTrainer:
    """Adam training of one classifier with ``regulariser`` in {"none", "dropout",
    "metaperturb"} (module docstring). For "metaperturb" give ``perturb`` (its current weights
    are copied and frozen); for "dropout" ``dropout_rate``."""

    REGULARISERS = ("none", "dropout", "metaperturb")

    def __init__(self, classifier, *, regulariser="none", learning_rate=1e-3, perturb=None,
                 dropout_rate=0.1, anneal_steps=1, clip_value=None, seed=0, jit_compile=False):
        if regulariser not in self.REGULARISERS:
            raise ValueError(f"regulariser must be one of {self.REGULARISERS}, got "
                             f"{regulariser!r}")
        if regulariser == "metaperturb" and perturb is None:
            raise ValueError("regulariser 'metaperturb' needs a perturb (a MetaPerturb)")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.classifier, self.regulariser, self.perturb = classifier, regulariser, perturb
        self.phi = ([tf.constant(v.numpy()) for v in perturb.weight_variables()]
                    if regulariser == "metaperturb" else None)
        self.dropout_rate, self.clip_value = float(dropout_rate), clip_value
        self.anneal_steps, self.seed = max(int(anneal_steps), 1), int(seed)
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(classifier.weight_list)
        self.step = tf.Variable(0, dtype=tf.int64, name="step")
        self.train_step = tf.function(self._train_step, jit_compile=jit_compile)
        self._jit_compile, self._probabilities = jit_compile, None

    def checkpoint_items(self):
        return {"classifier": self.classifier, "optimizer": self.optimizer, "step": self.step}

    def _regularise(self, seed, noise_coeff):
        sites = self.classifier.num_sites
        if self.regulariser == "metaperturb":
            return metaperturb_regulariser(self.perturb, self.phi, seed, sites, noise_coeff,
                                           self.clip_value)
        if self.regulariser == "dropout":
            return dropout_regulariser(self.dropout_rate, seed, sites)
        return None

    def noise_coeff(self, step):
        return tf.minimum(1.0, tf.cast(step + 1, tf.float32) / self.anneal_steps)

    def _train_step(self, images, labels):
        (seed,) = _step_seeds(self.seed, self.step, 1)
        params = self.classifier.values()
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = self.classifier.loss(params, images, labels,
                                        self._regularise(seed, self.noise_coeff(self.step)))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, params),
                                           self.classifier.weight_list))
        self.step.assign_add(1)
        return loss

    def _sample_probabilities(self, images, seed):
        regularise = (self._regularise(seed, 1.0) if self.regulariser == "metaperturb"
                      else None)
        return tf.nn.softmax(self.classifier.logits(self.classifier.values(), images,
                                                    regularise))

    def accuracy(self, images, labels, samples=1, batch_size=500, seed=0):
        """Test accuracy: the softmax averaged over ``samples`` noise draws for "metaperturb"
        (one deterministic pass otherwise), in batches of ``batch_size`` (a last batch of one
        image joins the one before: batch statistics need two)."""
        if batch_size < 2 or len(images) < 2:
            raise ValueError(f"accuracy needs batches and a set of at least 2 images, got "
                             f"batch_size={batch_size} and {len(images)} images")
        starts = list(range(0, len(images), batch_size))
        if len(images) - starts[-1] == 1 and len(starts) > 1:
            starts.pop()
        ends = starts[1:] + [len(images)]
        draws = samples if self.regulariser == "metaperturb" else 1
        if self._probabilities is None:  # any batch size, one trace
            self._probabilities = tf.function(
                self._sample_probabilities, jit_compile=self._jit_compile, input_signature=[
                    tf.TensorSpec([None, *images.shape[1:]], tf.float32),
                    tf.TensorSpec([2], tf.int64)])
        hits = 0
        for start, end in zip(starts, ends):
            x = tf.constant(images[start:end])
            probabilities = sum(self._probabilities(x, tf.constant([seed, start * 1000 + i],
                                                                   tf.int64))
                                for i in range(draws)) / draws
            hits += int(np.sum(np.argmax(probabilities.numpy(), -1) == labels[start:end]))
        return hits / len(images)
