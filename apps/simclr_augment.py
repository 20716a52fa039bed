r"""Experiment 2: SimCLR pre-training with a meta-learned augmentation (ECG or images).

For each seed, three ways to obtain an encoder:
  (a) no_pt:  random initialisation;
  (b) simclr: SimCLR pre-training with the fixed default augmentations (per-channel cutout and
              Gaussian noise for signals; crop and flip for images);
  (c) meta:   the same SimCLR, each view also passed through a learned warp (a time warp for
              signals, a spatial warp for images) whose magnitude network and scale are
              meta-learned by MetaPretrainer (Raghu et al. 2021) for the downstream task;
then linear evaluation (frozen encoder) and full fine-tuning on the labelled examples
(MetaTrain + MetaVal), reporting test AUROC (macro over classes; mean +- std over seeds).

Data (nothing is downloaded):
  --modality=ecg:   PTB-XL from --ptbxl_dir (the official layout; prepared once as a TFDS
                    dataset under --tfds_data_dir). PT on folds 1-9 (labels unused), labelled FT
                    data = the first --num_labelled examples of a seeded permutation of folds
                    1-9, test = fold 10. Encoder: ResNet1D-18. Labels: 5 diagnostic superclasses.
  --modality=image: Fashion-MNIST IDX files from --images_dir (Debian: apt install
                    dataset-fashion-mnist), or --image_folder (one sub-folder per class).
                    --label_fraction of the training images are labelled. Encoder: small CNN.

    python apps/simclr_augment.py --modality=image                 # CPU-sized default
    python apps/simclr_augment.py --modality=ecg --ptbxl_dir=/data/ptb-xl --num_pt=0

Writes <output_dir>/summary.md and summary.json, per-run results under results/ (a rerun
skips finished runs; the meta arm also resumes from its checkpoint), warp_<modality>.png
(inputs before and after the learned warp), and exports the meta arm's encoder and fine-tuned
model of the last seed as SavedModels under <saved_models_dir>/<run_name>_{encoder,finetuned}/
<version>/, with the learned augmentation's weights in <run_name>_meta_parameters.json/.npz.
"""

import json
import os

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402  (sets the Keras backend first)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_metapt import export  # noqa: E402
from keras_metapt.callbacks import EpochTimer, MetaCheckpoint  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402
from keras_metapt.hyper import (LearnedSpatialWarp, LearnedTimeWarp, SignalCutoutNoise,  # noqa: E402
                                TwoViews, image_crop_flip)
from keras_metapt.losses import masked_multitask_bce  # noqa: E402
from keras_metapt.nets import linear_head, projection_head, resnet1d18, small_cnn2d  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("modality", "image", ["ecg", "image"], "ecg: PTB-XL and ResNet1D-18; image: "
                  "Fashion-MNIST (or an image folder) and a small CNN.")
flags.DEFINE_string("ptbxl_dir", None, "ECG: PTB-XL folder (ptbxl_database.csv, "
                    "scp_statements.csv, records100/).")
flags.DEFINE_string("tfds_data_dir", None, "ECG: where the PTB-XL TFDS dataset is prepared "
                    "(default <output_dir>/tfds).")
flags.DEFINE_enum("ptbxl_config", "100hz", ["100hz", "500hz"], "ECG: records100 or records500.")
flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Image: folder of MNIST-layout "
                    "IDX files (train-images-idx3-ubyte[.gz], ...).")
flags.DEFINE_string("image_folder", None, "Image: instead of IDX files, a folder with one "
                    "sub-folder of images per class (20% of each class held out as test).")
flags.DEFINE_integer("num_pt", 6000, "PT examples (a seeded subset of the training part; "
                     "0: all).")
flags.DEFINE_integer("num_labelled", 500, "ECG: labelled FT examples (first N of a seeded "
                     "permutation of folds 1-9).")
flags.DEFINE_float("label_fraction", 0.01, "Image: fraction of the training images labelled.")
flags.DEFINE_float("meta_val_fraction", 0.5, "Fraction of the labelled examples used as "
                   "MetaVal (the rest is MetaTrain); the final FT uses both.")
flags.DEFINE_integer("num_test", 2000, "Test examples (0: all).")
flags.DEFINE_integer("split_seed", 0, "Seed of the PT subset and of the labelled subset (fixed "
                     "across --seeds).")
flags.DEFINE_list("arms", ["no_pt", "simclr", "meta"], "Arms to run.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initialisation, augmentation noise, order).")
flags.DEFINE_integer("batch_size", 128, "PT batch size (each example gives 2 views).")
flags.DEFINE_integer("ft_batch_size", 32, "MetaTrain / MetaVal / fine-tuning batch size.")
flags.DEFINE_integer("pt_epochs", 5, "PT epochs (the meta arm's first epoch is its warm-up).")
flags.DEFINE_float("pt_lr", 1e-3, "PT Adam learning rate (also the Neumann alpha).")
flags.DEFINE_float("temperature", 0.5, "NT-Xent temperature.")
flags.DEFINE_float("hyper_lr", 1e-2, "Adam learning rate of the augmentation network.")
flags.DEFINE_integer("hyperstep_every", 10, "N: PT steps between hypersteps.")
flags.DEFINE_integer("unroll_steps", 1, "K: differentiable FT-head steps per hyperstep.")
flags.DEFINE_integer("neumann_terms", 1, "i: Neumann terms of the inverse-Hessian product.")
flags.DEFINE_float("warp_scale", 0.05, "Initial global scale of the learned warp (a fraction "
                   "of the signal length / image size).")
flags.DEFINE_integer("ft_epochs", 30, "Epochs of linear evaluation and of full fine-tuning.")
flags.DEFINE_float("ft_lr", 1e-3, "Fine-tuning Adam learning rate.")
flags.DEFINE_bool("xla", False, "Compile PT steps with XLA (jit_compile).")
km.distribute.define_strategy_flags(
    "pre-training (each replica contrasts its own shard)")
flags.DEFINE_string("output_dir", "runs/simclr_augment", "Results, plots and checkpoints.")
flags.DEFINE_string("saved_models_dir", "saved_models", "Where SavedModels are exported.")
flags.DEFINE_string("run_name", None, "Name prefix of the exports (default simclr_<modality>).")
flags.DEFINE_bool("resume", True, "Skip runs whose results exist in --output_dir.")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0 silent, 1 progress bar, 2 per epoch).")


# ----------------------------------------------------------------------------- data

def load_data():
    """dict: pt (x), labelled (x, y), test (x, y), num_classes, multilabel, class names."""
    rng = np.random.default_rng(FLAGS.split_seed)
    if FLAGS.modality == "ecg":
        if not FLAGS.ptbxl_dir:
            raise app.UsageError("--modality=ecg needs --ptbxl_dir (the PTB-XL folder)")
        from keras_metapt.data.ptbxl import SUPERCLASSES, build_ptbxl, ptbxl_arrays
        builder = build_ptbxl(FLAGS.ptbxl_dir,
                              FLAGS.tfds_data_dir or os.path.join(FLAGS.output_dir, "tfds"),
                              FLAGS.ptbxl_config)
        x, y, _ = ptbxl_arrays(builder, "train")
        x_test, y_test, _ = ptbxl_arrays(builder, "test")
        order = rng.permutation(len(x))
        labelled = order[:FLAGS.num_labelled]
        classes, multilabel = SUPERCLASSES, True
    else:
        if FLAGS.image_folder:
            x_all, y_all, classes = image_data.load_image_folder(FLAGS.image_folder)
            order = rng.permutation(len(x_all))
            cut = int(0.8 * len(order))
            x, y = x_all[order[:cut]], y_all[order[:cut]]
            x_test, y_test = x_all[order[cut:]], y_all[order[cut:]]
        else:
            (x, y), (x_test, y_test) = image_data.load_idx_dataset(FLAGS.images_dir)
            classes = image_data.FASHION_MNIST_CLASSES
        labelled = image_data.labelled_subset(len(x), fraction=FLAGS.label_fraction,
                                              seed=FLAGS.split_seed)
        multilabel = False
    pt_pool = rng.permutation(len(x))
    if FLAGS.num_pt:
        pt_pool = pt_pool[:FLAGS.num_pt]
    if FLAGS.num_test:
        x_test, y_test = x_test[:FLAGS.num_test], y_test[:FLAGS.num_test]
    if len(labelled) < 2 * FLAGS.ft_batch_size:
        raise app.UsageError(f"{len(labelled)} labelled examples; need at least "
                             f"2 x --ft_batch_size={FLAGS.ft_batch_size}")
    if len(pt_pool) < FLAGS.batch_size:
        raise app.UsageError(f"{len(pt_pool)} PT examples < --batch_size={FLAGS.batch_size}")
    return {"pt": x[pt_pool], "labelled": (x[labelled], y[labelled]), "test": (x_test, y_test),
            "classes": tuple(classes), "multilabel": multilabel}


# ----------------------------------------------------------------------------- models

def make_encoder(shape, seed):
    keras.utils.set_random_seed(seed)
    if FLAGS.modality == "ecg":
        return resnet1d18(shape)
    return small_cnn2d(shape)


def make_views(shape, seed, learned):
    if FLAGS.modality == "ecg":
        fixed = SignalCutoutNoise(seed=seed)
        warp = LearnedTimeWarp(initial_scale=FLAGS.warp_scale, seed=seed + 1) if learned else None
    else:
        fixed = image_crop_flip(shape[0], shape[1], seed=seed)
        warp = LearnedSpatialWarp(initial_scale=FLAGS.warp_scale, seed=seed + 1) if learned else None
    views = TwoViews(fixed, warp)
    views.build((None,) + tuple(shape))
    return views


def ft_loss_fn(multilabel):
    if multilabel:
        return lambda y, logits: masked_multitask_bce(y, logits)
    return lambda y, logits: tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def batched(arrays, batch_size, seed=None):
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if seed is not None:
        ds = ds.shuffle(len(arrays[0]) if isinstance(arrays, tuple) else len(arrays), seed=seed,
                        reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=True)


def pretrain_simclr(encoder, data, seed, strategy):
    with strategy.scope():
        model = km.simclr.SimCLR(encoder, projection_head(encoder.output_shape[-1]),
                                 make_views(data["pt"].shape[1:], seed, learned=False),
                                 FLAGS.temperature)
        model.compile(keras.optimizers.Adam(FLAGS.pt_lr), jit_compile=FLAGS.xla)
    steps = len(data["pt"]) // FLAGS.batch_size
    timer = EpochTimer()
    model.fit(batched(data["pt"], FLAGS.batch_size, seed).repeat(), epochs=FLAGS.pt_epochs,
              steps_per_epoch=steps, verbose=FLAGS.verbose, callbacks=[timer], shuffle=False)
    # the first epoch traces and compiles
    return timer.examples_per_second(steps, FLAGS.batch_size, skip=1), timer.seconds


def pretrain_meta(encoder, data, seed, strategy, run_dir):
    x_lab, y_lab = data["labelled"]
    n_val = int(FLAGS.meta_val_fraction * len(x_lab))
    meta_val, meta_train = (x_lab[:n_val], y_lab[:n_val]), (x_lab[n_val:], y_lab[n_val:])
    outputs = len(data["classes"])
    with strategy.scope():
        views = make_views(data["pt"].shape[1:], seed, learned=True)
        model = km.simclr.simclr_meta_pretrainer(
            encoder, projection_head(encoder.output_shape[-1]), views,
            linear_head(encoder.output_shape[-1], outputs), ft_loss_fn(data["multilabel"]),
            temperature=FLAGS.temperature, hyperstep_every=FLAGS.hyperstep_every,
            unroll_steps=FLAGS.unroll_steps, neumann_terms=FLAGS.neumann_terms)
        model.compile(keras.optimizers.Adam(FLAGS.pt_lr), keras.optimizers.Adam(FLAGS.ft_lr),
                      keras.optimizers.Adam(FLAGS.hyper_lr),
                      jit_compile=FLAGS.xla and strategy.num_replicas_in_sync == 1)
    ft_batch = FLAGS.ft_batch_size
    stream = km.meta_dataset(batched(data["pt"], FLAGS.batch_size, seed),
                             batched(meta_train, min(ft_batch, len(meta_train[0])), seed),
                             batched(meta_val, min(ft_batch, len(meta_val[0])), seed),
                             FLAGS.unroll_steps)
    steps = len(data["pt"]) // FLAGS.batch_size
    timer = EpochTimer()
    model.fit(stream, epochs=FLAGS.pt_epochs, steps_per_epoch=steps, verbose=FLAGS.verbose,
              callbacks=[MetaCheckpoint(os.path.join(run_dir, "ckpt")), timer])
    # epoch 1 is the warm-up (no hyperstep), epoch 2 compiles the hyperstep
    skip = 2 if FLAGS.pt_epochs > 2 else 1
    return timer.examples_per_second(steps, FLAGS.batch_size, skip=skip), timer.seconds, model


def test_auroc(model, test, multilabel, num_classes):
    """Macro AUROC over the classes with both outcomes in the test set (count returned)."""
    from sklearn.metrics import roc_auc_score
    x_test, y_test = test
    logits = np.concatenate([model(x_test[i:i + 256], training=False).numpy()
                             for i in range(0, len(x_test), 256)])
    if multilabel:
        scores, targets = tf.sigmoid(logits).numpy(), y_test
    else:
        scores = tf.nn.softmax(logits).numpy()
        targets = np.eye(num_classes)[y_test]
    usable = [c for c in range(num_classes) if 0 < targets[:, c].sum() < len(targets)]
    if not usable:
        return float("nan"), 0
    return float(np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in usable])), len(usable)


def finetune(encoder_weights, data, seed, linear):
    """A fresh encoder with the given weights and a fresh linear head, trained on all
    labelled examples; returns (test AUROC, classes scored, model, encoder). BatchNorm stays
    in inference mode (its statistics come from PT): stable with a few hundred labels."""
    x_lab, y_lab = data["labelled"]
    encoder = make_encoder(x_lab.shape[1:], seed + 1000)
    if encoder_weights is not None:
        encoder.set_weights(encoder_weights)
    encoder.trainable = not linear
    head = linear_head(encoder.output_shape[-1], len(data["classes"]))
    inputs = keras.Input(x_lab.shape[1:])
    model = keras.Model(inputs, head(encoder(inputs, training=False)), name="finetuned")
    model.compile(keras.optimizers.Adam(FLAGS.ft_lr), loss=ft_loss_fn(data["multilabel"]))
    model.fit(batched((x_lab, y_lab), min(FLAGS.ft_batch_size, len(x_lab)), seed),
              epochs=FLAGS.ft_epochs, verbose=0, shuffle=False)
    auroc, scored = test_auroc(model, data["test"], data["multilabel"], len(data["classes"]))
    return auroc, scored, model, encoder


# ----------------------------------------------------------------------------- outputs

def plot_warp(views, x, path):
    """Inputs before and after the learned warp (the same noise draw for each row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    warp = views.learned
    x = tf.constant(x[:4])
    noise = tf.random.normal(warp.noise_shape(tf.shape(x)), seed=0)
    warped = warp.transform(x, noise).numpy()
    magnitude = (warp.magnitude(x) * warp.scale).numpy()
    if FLAGS.modality == "ecg":
        fig, axes = plt.subplots(len(x), 1, figsize=(10, 2.2 * len(x)), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            ax.plot(x[i, :1000, 1], lw=0.8, label="before (lead II)")
            ax.plot(warped[i, :1000, 1], lw=0.8, label="after the learned warp")
            ax.set_title(f"example {i}: magnitude m x scale = {magnitude[i]:.3f}", fontsize=9)
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].set_xlabel("sample (100 Hz)")
    else:
        fig, axes = plt.subplots(2, len(x), figsize=(2.2 * len(x), 4.6), squeeze=False)
        for i in range(len(x)):
            axes[0, i].imshow(x[i, ..., 0], cmap="gray")
            axes[0, i].set_title(f"m x scale {magnitude[i]:.3f}", fontsize=8)
            axes[1, i].imshow(warped[i, ..., 0], cmap="gray")
            for ax in axes[:, i]:
                ax.axis("off")
        axes[0, 0].text(-4, 14, "before", rotation=90, va="center")
        axes[1, 0].text(-4, 14, "after", rotation=90, va="center")
    fig.suptitle("Learned augmentation: inputs before and after the warp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarise(results_dir):
    records = [json.load(open(os.path.join(results_dir, f)))
               for f in sorted(os.listdir(results_dir)) if f.endswith(".json")]
    lines = ["| arm | linear eval test AUROC | full FT test AUROC | PT examples/s | seeds |",
             "|---|---:|---:|---:|---:|"]
    summary = {}
    for arm in ("no_pt", "simclr", "meta"):
        rows = [r for r in records if r["arm"] == arm]
        if not rows:
            continue
        lin = np.array([r["test_auroc_linear"] for r in rows])
        full = np.array([r["test_auroc_full"] for r in rows])
        eps = [r["pt_examples_per_second"] for r in rows if "pt_examples_per_second" in r]
        summary[arm] = {"linear_mean": lin.mean(), "linear_std": lin.std(),
                        "full_mean": full.mean(), "full_std": full.std(), "seeds": len(rows),
                        "pt_examples_per_second": float(np.mean(eps)) if eps else None}
        speed = f"{np.mean(eps):.0f}" if eps else "-"
        lines.append(f"| {arm} | {lin.mean():.4f} +- {lin.std():.4f} | {full.mean():.4f} +- "
                     f"{full.std():.4f} | {speed} | {len(rows)} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(FLAGS.output_dir, "summary.md"), "w") as f:
        f.write(table)
    with open(os.path.join(FLAGS.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return table, summary


def run_seed(seed, data, results_dir, strategy, last_seed):
    run_name = FLAGS.run_name or f"simclr_{FLAGS.modality}"
    shape = data["pt"].shape[1:]
    for arm in FLAGS.arms:
        path = os.path.join(results_dir, f"{arm}_seed{seed}.json")
        if FLAGS.resume and os.path.exists(path):
            print(f"seed {seed} {arm}: done earlier ({path})")
            continue
        print(f"seed {seed} {arm}: " + ("pre-training" if arm != "no_pt" else "no pre-training"))
        with strategy.scope():
            encoder = make_encoder(shape, seed)
        record = {"arm": arm, "seed": seed, "replicas": strategy.num_replicas_in_sync,
                  "pt_examples": len(data["pt"]), "labelled_examples": len(data["labelled"][0]),
                  "test_examples": len(data["test"][0])}
        model = None
        if arm == "simclr":
            record["pt_examples_per_second"], record["pt_epoch_seconds"] = pretrain_simclr(
                encoder, data, seed, strategy)
        elif arm == "meta":
            run_dir = os.path.join(FLAGS.output_dir, f"meta_seed{seed}")
            record["pt_examples_per_second"], record["pt_epoch_seconds"], model = pretrain_meta(
                encoder, data, seed, strategy, run_dir)
            warp = model.meta_layer.learned
            record["warp_scale"] = float(warp.scale.numpy())
            record["mean_warp_magnitude"] = float(np.mean(
                (warp.magnitude(tf.constant(data["pt"][:256])) * warp.scale).numpy()))
            record["warp_png"] = plot_warp(model.meta_layer, data["pt"],
                                           os.path.join(FLAGS.output_dir,
                                                        f"warp_{FLAGS.modality}_seed{seed}.png"))
        weights = encoder.get_weights()
        for mode in ("linear", "full"):
            auroc, scored, ft_model, ft_encoder = finetune(weights, data, seed, mode == "linear")
            record[f"test_auroc_{mode}"] = auroc
            record[f"classes_scored_{mode}"] = scored
            print(f"  {mode} evaluation: test AUROC {auroc:.4f} (macro over {scored} classes)")
            if arm == "meta" and mode == "full" and last_seed:
                spec = tf.TensorSpec((None,) + tuple(shape), tf.float32)
                record["saved_models"] = {
                    "finetuned": export.export_saved_model(ft_model, FLAGS.saved_models_dir,
                                                           f"{run_name}_finetuned", spec),
                    "encoder": export.export_saved_model(ft_encoder, FLAGS.saved_models_dir,
                                                         f"{run_name}_encoder", spec,
                                                         output_name="features"),
                    "meta_parameters": export.export_meta_parameters(
                        model.meta_layer.learned, os.path.join(
                            FLAGS.saved_models_dir, f"{run_name}_meta_parameters.json"))}
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results_dir = os.path.join(FLAGS.output_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    strategy = km.distribute.strategy_from_flags()
    data = load_data()
    print(f"{FLAGS.modality}: {len(data['pt'])} PT examples {data['pt'].shape[1:]}, "
          f"{len(data['labelled'][0])} labelled, {len(data['test'][0])} test, "
          f"{len(data['classes'])} classes; {strategy.num_replicas_in_sync} replica(s)")
    seeds = [int(s) for s in FLAGS.seeds]
    for seed in seeds:
        run_seed(seed, data, results_dir, strategy, last_seed=seed == seeds[-1])
    table, _ = summarise(results_dir)
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)
