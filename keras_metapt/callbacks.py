"""Keras callbacks for meta-pre-training: checkpoint/resume, safety, TensorBoard, plots."""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_metapt.errors import InputMismatchError, NonFiniteHypergradientError

__all__ = ["MetaCheckpoint", "StopOnNonFiniteHypergradient", "MetaParameterSummaries",
           "TaskWeightsPlot", "TaskWeightsHistory", "plot_weights_by_group", "EpochTimer"]


def _write_json_atomically(path, value):
    """Writes ``value`` as JSON to a temporary name beside ``path``, then renames it: a run
    killed mid-write leaves the previous file, never a half-written one. Makes the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


class MetaCheckpoint(keras.callbacks.Callback):
    """Saves the whole training state at the end of every ``every_n_epochs`` epochs, and
    restores the latest one when `MetaPretrainer.fit` starts (``on_train_begin``, as Keras'
    `BackupAndRestore` does): fit then starts at the checkpoint's epoch, and the data stream
    skips the steps already taken (`MetaPretrainer.resume_stream_at`), so the resumed run
    continues exactly where the checkpoint was made.

    State: all model variables (encoder, heads, phi, BatchNorm statistics, RNG seed states),
    the PT, FT and hyper optimizers' variables and the step counter (see
    `MetaPretrainer.state_variables`). Files: ``<directory>/state-<epoch>.npz`` (written to a
    temporary name, then renamed, so a killed run never leaves a half-written checkpoint) and
    ``<directory>/latest.json``. The last ``keep`` checkpoints are kept.
    """

    def __init__(self, directory, every_n_epochs=1, keep=2):
        super().__init__()
        self.directory = directory
        self.every_n_epochs = int(every_n_epochs)
        self.keep = int(keep)

    def _latest(self):
        path = os.path.join(self.directory, "latest.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def restore(self, model):
        """Restores the latest checkpoint into ``model``; returns its epoch, or None."""
        latest = self._latest()
        if latest is None:
            return None
        path = os.path.join(self.directory, latest["file"])
        with np.load(path) as data:
            stored = dict(data)
        current = model.state_variables()
        names = [name for name, _ in current]
        missing = [n for n in names if n not in stored]
        extra = [n for n in stored if n not in set(names)]
        if missing or extra:
            raise InputMismatchError(
                f"checkpoint {path} does not match this model: missing {missing[:3]}, "
                f"unexpected {extra[:3]} (was it written by a different configuration?)")
        for name, var in current:
            value = stored[name]
            if tuple(value.shape) != tuple(var.shape):
                raise InputMismatchError(f"checkpoint {path}: {name} has shape {value.shape}, "
                                         f"the model's is {tuple(var.shape)}")
            var.assign(value)
        print(f"MetaCheckpoint: resumed from {path} (epoch {latest['epoch']}, "
              f"step {latest['step']})")
        return int(latest["epoch"])

    def on_train_begin(self, logs=None):
        epoch = self.restore(self.model)
        if epoch is not None:
            # Keras' fit starts at model._initial_epoch when set (as BackupAndRestore does;
            # pinned by tests/test_keras_overrides.py).
            self.model._initial_epoch = epoch
            self.model.resume_stream_at(epoch * self.params["steps"])

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every_n_epochs:
            return
        os.makedirs(self.directory, exist_ok=True)
        arrays = {name: np.asarray(keras.ops.convert_to_numpy(var.value))
                  for name, var in self.model.state_variables()}
        name = f"state-{done:06d}.npz"
        tmp = os.path.join(self.directory, f".{name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, os.path.join(self.directory, name))
        meta = {"file": name, "epoch": done, "step": int(self.model.meta_step.numpy())}
        _write_json_atomically(os.path.join(self.directory, "latest.json"), meta)
        olds = sorted(f for f in os.listdir(self.directory) if f.startswith("state-"))
        for old in olds[:-self.keep]:
            os.remove(os.path.join(self.directory, old))


class StopOnNonFiniteHypergradient(keras.callbacks.Callback):
    """Stops fit with NonFiniteHypergradientError once a hyperstep was skipped because its
    hypergradient was NaN/Inf. The step itself never applies such an update (XLA cannot raise
    from inside the compiled step), and the count shows as ``nonfinite_hypersteps``.

    By default the check runs at the end of each epoch: a batch-level hook makes Keras fetch
    every metric after every batch, which costs about 0.5 ms per step on a CPU.
    ``check_every_batch=True`` stops at the first such batch instead. `MetaPretrainer.fit`
    adds one (epoch-level) unless the callbacks include one.
    """

    def __init__(self, check_every_batch=False):
        super().__init__()
        if check_every_batch:
            self.on_train_batch_end = self._check_batch

    def _raise(self, where, logs):
        if logs and logs.get("nonfinite_hypersteps", 0) > 0:
            raise NonFiniteHypergradientError(
                f"{int(logs['nonfinite_hypersteps'])} hyperstep(s) produced a non-finite "
                f"hypergradient ({where}, meta step {int(self.model.meta_step.numpy())}); phi was "
                "not updated. Lower the hyper learning rate or neumann_alpha, or check the losses.")

    def _check_batch(self, batch, logs=None):
        self._raise(f"batch {batch}", logs)

    def on_epoch_end(self, epoch, logs=None):
        self._raise(f"epoch {epoch + 1}", logs)


def _task_weights(meta_layer):
    if hasattr(meta_layer, "task_weights"):
        return np.asarray(meta_layer.task_weights()), "task weight"
    flat = np.concatenate([np.ravel(v.numpy()) for v in meta_layer.trainable_variables])
    return flat, "phi"


class MetaParameterSummaries(keras.callbacks.Callback):
    """TensorBoard summaries of phi every ``every_n_epochs`` epochs: a histogram of the task
    weights (or of raw phi) and its mean/min/max as scalars. Use with keras.callbacks.TensorBoard
    (which logs the training metrics) on the same ``log_dir``."""

    def __init__(self, log_dir, every_n_epochs=1):
        super().__init__()
        self.log_dir = log_dir
        self.every_n_epochs = int(every_n_epochs)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "meta"))
        values, label = _task_weights(self.model.meta_layer)
        tag = label.replace(" ", "_")
        with self._writer.as_default(step=epoch + 1):
            tf.summary.histogram(f"{tag}s", values)
            tf.summary.scalar(f"{tag}_mean", float(values.mean()))
            tf.summary.scalar(f"{tag}_min", float(values.min()))
            tf.summary.scalar(f"{tag}_max", float(values.max()))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class TaskWeightsPlot(keras.callbacks.Callback):
    """Saves a PNG of the learned task weights, sorted, labelled with task names.

    With many tasks, the ``max_labels`` largest and smallest are labelled. Written at the end of
    training and every ``every_n_epochs`` epochs (0: only at the end).
    """

    def __init__(self, path, task_names=None, every_n_epochs=0, max_labels=40, groups=None,
                 is_real=None):
        super().__init__()
        self.path = path
        self.task_names = task_names
        self.every_n_epochs = int(every_n_epochs)
        self.max_labels = int(max_labels)
        self.groups = None if groups is None else list(groups)
        self.is_real = None if is_real is None else np.asarray(is_real, bool)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.save(title_suffix=f" (epoch {epoch + 1})")

    def on_train_end(self, logs=None):
        self.save()

    def save(self, title_suffix=""):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        values, label = _task_weights(self.model.meta_layer)
        if self.groups is not None:
            return plot_weights_by_group(self.path, values, self.groups, self.is_real,
                                         f"Learned {label}s by task family{title_suffix}", label)
        names = self.task_names or getattr(self.model.meta_layer, "task_names", None) \
            or [f"task {i}" for i in range(len(values))]
        order = np.argsort(values)[::-1]
        n = len(values)
        width = min(max(6.0, 0.22 * min(n, 2 * self.max_labels)), 18.0)
        fig, ax = plt.subplots(figsize=(width, 4.5))
        ax.bar(np.arange(n), values[order], color="tab:blue", width=1.0 if n > 200 else 0.8)
        ax.axhline(1.0 if label == "task weight" else 0.0, color="gray", lw=0.8, ls="--")
        if n <= 2 * self.max_labels:
            ax.set_xticks(np.arange(n), [names[i] for i in order], rotation=90, fontsize=7)
        else:
            shown = list(range(self.max_labels)) + list(range(n - self.max_labels, n))
            ax.set_xticks(shown, [names[order[i]] for i in shown], rotation=90, fontsize=6)
        ax.set_ylabel(f"learned {label}")
        ax.set_title(f"Learned {label}s, sorted{title_suffix}")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fig.savefig(self.path, dpi=110)
        plt.close(fig)


def plot_weights_by_group(path, weights, groups, is_real=None, title="", label="task weight"):
    """Strip plot of one weight per task, one column per group (e.g. task family); with
    ``is_real``, real and control (permuted) tasks in two colours. Writes a PNG to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    weights, groups = np.asarray(weights), list(groups)
    names = list(dict.fromkeys(groups))
    rng = np.random.default_rng(0)  # jitter only
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(names)), 4.5))
    kinds = [("tasks", np.ones(len(weights), bool), "tab:blue")] if is_real is None else [
        ("real tasks", np.asarray(is_real, bool), "tab:blue"),
        ("permuted (control) tasks", ~np.asarray(is_real, bool), "tab:red")]
    for kind, mask, colour in kinds:
        xs, ys = [], []
        for column, name in enumerate(names):
            members = mask & (np.array(groups) == name)
            xs.append(column + rng.uniform(-0.3, 0.3, members.sum()))
            ys.append(weights[members])
        ax.scatter(np.concatenate(xs), np.concatenate(ys), s=6, alpha=0.6, color=colour,
                   label=kind)
    ax.axhline(1.0 if label == "task weight" else 0.0, color="gray", lw=0.8, ls="--")
    counts = [groups.count(n) for n in names]
    ax.set_xticks(range(len(names)), [f"{n}\n({c} tasks)" for n, c in zip(names, counts)])
    ax.set_ylabel(f"learned {label}")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class TaskWeightsHistory(keras.callbacks.Callback):
    """Records the task-weight distribution at the end of every epoch in ``epochs`` (a list of
    dicts: quantiles 0/10/50/90/100%, mean, share below 0.5 and above 1.5, and with ``is_real``
    the AUROC for "task is real" of the weights (``auroc_real``: real tasks weigh more) and of
    their distance from 1 (``auroc_real_moved``: real tasks moved further)) and prints one line
    per epoch when verbose.

    ``path``: a JSON file the list is written to after every epoch and read back when training
    begins, so a resumed run (`MetaCheckpoint`) keeps the epochs before the interruption; an
    epoch run again replaces its entry. Put it before `MetaCheckpoint` in the callbacks.
    """

    def __init__(self, is_real=None, path=None, verbose=True):
        super().__init__()
        self.is_real = None if is_real is None else np.asarray(is_real, bool)
        self.path = path
        self.verbose = bool(verbose)
        self.epochs = []

    def on_train_begin(self, logs=None):
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.epochs = json.load(f)

    def on_epoch_end(self, epoch, logs=None):
        from keras_metapt.data.task_controls import weight_auroc
        values, _ = _task_weights(self.model.meta_layer)
        q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
        entry = {"epoch": epoch + 1, "mean": float(values.mean()),
                 "quantiles": {k: float(v) for k, v in zip(("0", "10", "50", "90", "100"), q)},
                 "below_0.5": float((values < 0.5).mean()), "above_1.5": float((values > 1.5).mean())}
        if self.is_real is not None:
            entry["auroc_real"] = weight_auroc(values, self.is_real)
            entry["auroc_real_moved"] = weight_auroc(np.abs(values - 1.0), self.is_real)
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1] + [entry]
        if self.path:
            _write_json_atomically(self.path, self.epochs)
        if self.verbose:
            print(f"epoch {epoch + 1}: weights min/10%/median/90%/max "
                  + "/".join(f"{v:.3f}" for v in q)
                  + (f", AUROC(real) of weights {entry['auroc_real']:.3f}, of |weight - 1| "
                     f"{entry['auroc_real_moved']:.3f}" if "auroc_real" in entry else ""),
                  flush=True)


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch (``seconds``), and throughput that leaves out the
    epochs which trace and compile: ``examples_per_second(steps, batch_size, skip)`` averages
    over the epochs after the first ``skip`` (for a MetaPretrainer with a one-epoch warm-up the
    first hyperstep compiles in epoch 2, so skip=2).

    With ``path`` (a JSON file) the epochs are kept there and read back when training begins,
    so a run resumed from a checkpoint (`MetaCheckpoint`) reports the epochs timed before the
    interruption too; the first epoch of every process traces again and is left out of the
    throughput. A run resumed after its last epoch then has its throughput from the file.
    """

    def __init__(self, path=None):
        super().__init__()
        self.path = path
        self.epochs = []  # {"epoch", "seconds", "first_in_process"}, in epoch order
        self._start = None
        self._first = True

    @property
    def seconds(self):
        return [entry["seconds"] for entry in self.epochs]

    def on_train_begin(self, logs=None):
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.epochs = json.load(f)

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": int(epoch), "seconds": time.perf_counter() - self._start,
                 "first_in_process": self._first}
        self._first = False
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch] + [entry]
        if self.path:
            _write_json_atomically(self.path, self.epochs)

    def examples_per_second(self, steps, batch_size, skip=1):
        """Mean examples/s over the epochs after the first ``skip`` that were not the first of
        their process; else the last epoch's; NaN if no epoch was timed."""
        timed = [e["seconds"] for e in self.epochs
                 if e["epoch"] >= skip and not e["first_in_process"]] or self.seconds[-1:]
        if not timed:
            return float("nan")
        return len(timed) * steps * batch_size / sum(timed)
