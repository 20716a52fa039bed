r"""Cross-domain few-shot classification with feature-wise transformation layers (Tseng et al.
2020), fixed or meta-learned for unseen domains by EvoGrad (Bohdal et al. 2021) or by the
original second-order one-step look-ahead, on prototypical networks.

Domains (all offline; the CPU stand-in for the paper's miniImageNet -> CUB / Cars / Places /
Plantae, which cannot be had here):
- seen domain "clothing": Fashion-MNIST training images of T-shirt/top, Trouser, Pullover,
  Dress, Coat and Shirt (6 classes);
- seen domain "footwear_bags": Fashion-MNIST training images of Sandal, Sneaker, Bag and Ankle
  boot (4 classes);
- unseen domain "digits": scikit-learn's bundled handwritten digits (1,797 8x8 images of 0-9,
  scaled to [0, 1] and resized bilinearly to 28x28), used for testing only.
Every training step picks one seen domain at random as the pseudo-seen domain of the step and
the other as its pseudo-unseen domain, as the paper's leave-one-out training does with its seen
domains. The encoder (4 blocks of conv 3x3 -> batch normalisation -> [transformation] ->
ReLU -> max-pool, --width channels) trains by Adam on a --train_n_way --k_shot episode of the
pseudo-seen domain. Arms, with the same initial encoder and the same training episodes for a
seed:

- protonet: no transformation layers;
- ft_fixed: transformation layers at their initial scales (softplus(0.3), softplus(0.5));
- ft_evograd, ft_second_order: the layers' scales phi (2 x width per block) are meta-learned
  every step: the hypergradient of the loss of a pseudo-unseen episode (layers off) after the
  encoder's response to the pseudo-seen loss (layers on), by keras_metapt.EvoGrad (K copies of
  the encoder perturbed by sigma times Rademacher noise, temperature tau, as the EvoGrad
  paper's code) or keras_metapt.Unrolled with one SGD step at the encoder's rate (the
  original's look-ahead), then an Adam step on phi (--ft_lr).

Test: --test_episodes episodes (600 by default) of --test_n_way classes of the unseen domain,
for each of --test_shots, the same episodes for every arm and seed; transformations off.
Batch normalisation uses each episode's own statistics (support and query together).

    python apps/cross_domain_fewshot.py                      # CPU default, 5 seeds, 4 arms
    python apps/cross_domain_fewshot.py --arms=protonet,ft_evograd --seeds=0,1,2

Writes <output_dir>/summary.md (per arm: mean test accuracy +- std over seeds per shot count;
paired differences to --baseline with 95% t intervals over seeds; the mean 95% interval of a
seed's accuracy over its episodes; seconds per step; the learned noise scales), summary.json,
and cross_domain_fewshot.png (learned scales over training; test accuracy per arm). Every
(arm, seed) checkpoints every --checkpoint_every steps under <output_dir>/<arm>_seed<k> and
resumes from there; finished arms are reused (runner.run_grid). A seed fixes a run:
bit-identical on CPU.
"""

import dataclasses
import os
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make `apps` importable
    sys.path.insert(0, ROOT)

import keras_metapt as km  # noqa: E402  (sets the Keras backend first)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import runner  # noqa: E402
from keras_metapt import fewshot, optim, tasks  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402

FLAGS = flags.FLAGS
ARMS = ("protonet", "ft_fixed", "ft_evograd", "ft_second_order")
SEEN_DOMAINS = {"clothing": (0, 1, 2, 3, 4, 6), "footwear_bags": (5, 7, 8, 9)}
ROLE_TAG = 105  # the NumPy stream that picks each step's pseudo-seen domain
PSEUDO_SEEN_STREAM, PSEUDO_UNSEEN_STREAM = 0, 1
TEST_STREAM = 2

flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Folder of MNIST-layout IDX "
                    "files of Fashion-MNIST (the seen domains); default Debian's package.")
flags.DEFINE_list("arms", list(ARMS), "Arms to run, out of " + ", ".join(ARMS) + ".")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (initial encoder, training "
                  "episodes, domain roles, noise); every arm of a seed sees the same.")
flags.DEFINE_enum("baseline", "protonet", list(ARMS), "Arm that summary.md/json compare every "
                  "other arm with, paired by seed.")
flags.DEFINE_integer("num_steps", 1000, "Training steps (episodes) per arm.")
flags.DEFINE_integer("width", 32, "Channels of every encoder block (and features).")
flags.DEFINE_integer("train_n_way", 4, "Classes per training episode (at most 4: the "
                     "footwear_bags domain has 4).")
flags.DEFINE_integer("k_shot", 5, "Support examples per class in training episodes.")
flags.DEFINE_integer("n_query", 10, "Query examples per class in training episodes.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate of the encoder (also the rate of the "
                   "second-order arm's one-step look-ahead).")
flags.DEFINE_float("ft_lr", 1e-2, "Adam learning rate of the transformation scales "
                   "(epsilon 1e-12: the step does not depend on the hypergradient's scale). "
                   "The paper's 1e-3 over ~40,000 steps, scaled to the CPU default's 1,000 "
                   "steps so that the scales can move as far.")
flags.DEFINE_float("ft_gamma_init", 0.3, "Initial theta_gamma (noise scale softplus(theta)).")
flags.DEFINE_float("ft_beta_init", 0.5, "Initial theta_beta (noise scale softplus(theta)).")
flags.DEFINE_integer("evograd_copies", 2, "EvoGrad: K perturbed copies of the encoder.")
flags.DEFINE_float("evograd_sigma", 1e-3, "EvoGrad: scale of the copies' noise.")
flags.DEFINE_float("evograd_temperature", 0.05, "EvoGrad: softmax temperature tau.")
flags.DEFINE_enum("evograd_noise", "rademacher", ["rademacher", "gaussian"], "EvoGrad: noise "
                  "of the copies (the EvoGrad paper's code uses signs).")
flags.DEFINE_integer("test_n_way", 5, "Classes per test episode (unseen domain).")
flags.DEFINE_list("test_shots", ["5", "1"], "Support examples per class of the test episodes; "
                  "one accuracy per entry.")
flags.DEFINE_integer("test_n_query", 15, "Query examples per class in test episodes.")
flags.DEFINE_integer("test_episodes", 600, "Test episodes per shot count.")
flags.DEFINE_integer("test_seed", 0, "Seed of the test episodes (the same for every arm and "
                     "seed).")
flags.DEFINE_integer("checkpoint_every", 250, "Steps between checkpoints (and log lines).")
flags.DEFINE_bool("xla", False, "Compile the steps with XLA (runs then need not repeat bit for "
                  "bit; see apps/runner.py).")
flags.DEFINE_string("output_dir", "runs/cross_domain_fewshot", "Results, plot and checkpoints.")
flags.DEFINE_bool("resume", True, "Reuse finished (arm, seed) results and resume unfinished ones "
                  "from their last checkpoint, when made with the same settings.")
flags.DEFINE_integer("verbose", 1, "0: silent; 1: a progress bar; 2: a line per checkpoint.")
flags.DEFINE_bool("plot", True, "Write cross_domain_fewshot.png.")
runner.define_strategy_flags("training (only the default, one device, is supported here)")
flags.adopt_module_key_flags(runner)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort)."""

    images_dir: str
    num_steps: int
    width: int
    train_n_way: int
    k_shot: int
    n_query: int
    lr: float
    ft_lr: float
    ft_gamma_init: float
    ft_beta_init: float
    evograd_copies: int
    evograd_sigma: float
    evograd_temperature: float
    evograd_noise: str
    test_n_way: int
    test_shots: tuple
    test_n_query: int
    test_episodes: int
    test_seed: int
    checkpoint_every: int
    xla: bool
    verbose: int
    plot: bool

    ARMS = ARMS
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("verbose", "plot", "checkpoint_every")
    DATA_PATHS = ("images_dir",)
    BOUNDS = {"num_steps": "[1, inf)", "width": "[1, inf)", "train_n_way": "[2, 4]",
              "k_shot": "[1, inf)", "n_query": "[1, inf)", "lr": "(0, inf)",
              "ft_lr": "[0, inf)", "ft_gamma_init": "(-inf, inf)",
              "ft_beta_init": "(-inf, inf)", "evograd_copies": "[2, inf)",
              "evograd_sigma": "(0, inf)", "evograd_temperature": "(0, inf)",
              "test_n_way": "[2, 10]", "test_n_query": "[1, inf)",
              "test_episodes": "[1, inf)", "test_seed": "[0, inf)",
              "checkpoint_every": "[1, inf)", "verbose": "[0, 2]"}

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != "default":
            raise app.UsageError(f"--strategy={self.strategy}: this app runs on one device")
        object.__setattr__(self, "test_shots", runner.distinct_counts("test_shots",
                                                                      self.test_shots))


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Domains:
    seen: dict       # name -> EpisodeSampler (training episodes)
    unseen: dict     # k_shot -> EpisodeSampler (test episodes)


def load_domains(config):
    """The two seen domains' samplers and the unseen domain's sampler per shot count."""
    (x, y), _ = image_data.load_idx_dataset(config.images_dir)
    try:
        seen = {name: tasks.EpisodeSampler(x, y, classes, n_way=config.train_n_way,
                                           k_shot=config.k_shot, n_query=config.n_query,
                                           name=f"seen domain {name}")
                for name, classes in SEEN_DOMAINS.items()}
        digits, labels = image_data.load_digits_28x28()
        unseen = {k: tasks.EpisodeSampler(digits, labels, n_way=config.test_n_way, k_shot=k,
                                          n_query=config.test_n_query,
                                          name=f"unseen domain digits ({k}-shot)")
                  for k in config.test_shots}
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    return Domains(seen, unseen)


def step_episodes(domains, seed, step):
    """(pseudo-seen episode, pseudo-unseen episode, pseudo-seen domain name) of a step."""
    names = sorted(domains.seen)
    order = np.random.default_rng([ROLE_TAG, seed, step]).permutation(len(names))
    seen_name, unseen_name = names[order[0]], names[order[1]]
    return (domains.seen[seen_name].episode(seed, step, PSEUDO_SEEN_STREAM),
            domains.seen[unseen_name].episode(seed, step, PSEUDO_UNSEEN_STREAM), seen_name)


def as_tensors(episode):
    return tuple(tf.constant(a) for a in (episode.support, episode.query, episode.query_labels))


# ----------------------------------------------------------------------------- one arm

def make_trainer(arm, seed, config):
    """The arm's `keras_metapt.fewshot.PrototypicalTrainer` (the encoder drawn from ``seed``,
    the same for every arm)."""
    encoder = fewshot.ConvEncoder(config.width, seed=seed)
    transforms = transform_optimizer = estimator = None
    if arm != "protonet":
        transforms = km.hyper.FeatureWiseTransforms(encoder.channels(), config.ft_gamma_init,
                                                    config.ft_beta_init)
    if arm == "ft_evograd":
        estimator = km.EvoGrad(num_copies=config.evograd_copies, sigma=config.evograd_sigma,
                               temperature=config.evograd_temperature,
                               noise=config.evograd_noise)
    elif arm == "ft_second_order":
        estimator = km.Unrolled(optim.sgd(config.lr), num_steps=1)  # rate: the encoder's
    if estimator is not None:
        transform_optimizer = keras.optimizers.Adam(config.ft_lr, epsilon=1e-12)
    return fewshot.PrototypicalTrainer(
        encoder, n_way=config.train_n_way, learning_rate=config.lr, transforms=transforms,
        transform_optimizer=transform_optimizer, estimator=estimator, seed=seed,
        jit_compile=config.xla)


def test_accuracies(trainer, domains, config):
    """{k_shot: [accuracy of each test episode]} on the unseen domain."""
    return {k: [trainer.episode_accuracy(sampler.episode(config.test_seed, i, TEST_STREAM),
                                         config.test_n_way)
                for i in range(config.test_episodes)]
            for k, sampler in domains.unseen.items()}


def run_arm(config, domains, arm, seed):
    """Trains one arm for config.num_steps, resuming from its last checkpoint, then tests."""
    trainer = make_trainer(arm, seed, config)
    history, save = runner.resume_run(
        runner.run_directory(config, arm, seed), trainer.checkpoint_items(),
        {"step": [], "train_loss": [], "pseudo_unseen_loss": [], "seconds_per_step": [],
         "gamma_scale": [], "beta_scale": []}, trainer.step.numpy, key="step")
    progbar = keras.utils.Progbar(config.num_steps, verbose=config.verbose == 1,
                                  stateful_metrics=["loss", "pseudo-unseen loss"])
    while int(trainer.step.numpy()) < config.num_steps:
        first = int(trainer.step.numpy())
        last = min(first + config.checkpoint_every, config.num_steps)
        start, losses, outer_losses = time.perf_counter(), [], []
        for step in range(first, last):
            seen, unseen, _ = step_episodes(domains, seed, step)
            loss, outer = trainer.train_step(
                as_tensors(seen), as_tensors(unseen) if trainer.meta_learned else None)
            losses.append(float(loss))
            outer_losses.append(float(outer))
            progbar.update(step + 1, [("loss", losses[-1])]
                           + [("pseudo-unseen loss", outer_losses[-1])] * trainer.meta_learned)
        history["step"].append(last)
        history["seconds_per_step"].append((time.perf_counter() - start) / (last - first))
        history["train_loss"].append(float(np.mean(losses)))
        history["pseudo_unseen_loss"].append(float(np.mean(outer_losses)))
        scales = (trainer.transforms.noise_scales() if trainer.transforms is not None
                  else {"gamma": [], "beta": []})
        history["gamma_scale"].append([float(s.mean()) for s in scales["gamma"]])
        history["beta_scale"].append([float(s.mean()) for s in scales["beta"]])
        if config.verbose == 2:
            runner.log(f"  step {last}/{config.num_steps}: train loss "
                       f"{history['train_loss'][-1]:.4f}")
        save(history)
    accuracies = test_accuracies(trainer, domains, config)
    record = {"history": history,
              # the first chunk holds the tracing: the later ones time the steps
              "seconds_per_step": float(np.median(history["seconds_per_step"][1:]
                                                  or history["seconds_per_step"]))}
    for k, values in accuracies.items():
        mean, half = runner.mean_and_interval(values)
        record[f"test_accuracy_{k}shot"] = mean
        record[f"test_ci95_{k}shot"] = half
        record[f"test_episode_accuracies_{k}shot"] = values
    if trainer.transforms is not None:
        scales = trainer.transforms.noise_scales()
        record["noise_scales"] = {key: [s.tolist() for s in values]
                                  for key, values in scales.items()}
    runner.log("  unseen-domain test accuracy: " + ", ".join(
        f"{k}-shot {record[f'test_accuracy_{k}shot']:.4f} +- {record[f'test_ci95_{k}shot']:.4f}"
        for k in config.test_shots))
    return record


# ----------------------------------------------------------------------------- report

def method_table(records, config):
    """Per arm: the mean over seeds of a seed's 95% interval over its test episodes, seconds
    per step, and the final noise scales (mean over blocks and channels)."""
    shots = config.test_shots
    lines = ["", "| arm | " + " | ".join(f"{k}-shot 95% interval over episodes (mean over "
                                         f"seeds)" for k in shots)
             + " | s / step | noise scale gamma | noise scale beta |",
             "|---" + "|---:" * (len(shots) + 3) + "|"]
    for arm in ARMS:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if not rows:
            continue
        cells = [f"+-{np.mean([r[f'test_ci95_{k}shot'] for r in rows]):.4f}" for k in shots]
        cells.append(f"{np.mean([r['seconds_per_step'] for r in rows]):.4f}")
        for key in ("gamma", "beta"):
            cells.append(f"{np.mean([np.mean(np.concatenate(r['noise_scales'][key])) for r in rows]):.3f}"
                         if "noise_scales" in rows[0] else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records, config, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    arms = [a for a in ARMS if any(arm == a for arm, _ in records)]
    for arm in arms:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if arm.startswith("ft_") and rows[0]["history"]["gamma_scale"]:
            steps = rows[0]["history"]["step"]
            for key, style in (("gamma_scale", "-"), ("beta_scale", "--")):
                values = np.mean([np.mean(r["history"][key], axis=1) for r in rows], axis=0)
                left.plot(steps, values, style, label=f"{arm} {key.split('_')[0]}")
    width = 0.8 / max(len(config.test_shots), 1)
    for j, k in enumerate(config.test_shots):
        means, errors = [], []
        for arm in arms:
            values = [r[f"test_accuracy_{k}shot"] for (a, _), r in records.items() if a == arm]
            means.append(np.mean(values))
            errors.append(np.std(values))
        right.bar(np.arange(len(arms)) + j * width, means, width, yerr=errors, capsize=3,
                  label=f"{k}-shot")
    right.set_xticks(np.arange(len(arms)) + width * (len(config.test_shots) - 1) / 2, arms)
    left.set(xlabel="training step", ylabel="noise scale softplus(theta) (mean)",
             title="feature-wise transformation scales")
    right.set(ylabel="test accuracy (unseen domain)",
              title=f"{config.test_n_way}-way digits, mean +- std over seeds")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines or ax.patches:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    config, _ = runner.setup(Config)
    domains = load_domains(config)
    runner.log("seen domains: " + ", ".join(
        f"{name} ({len(sampler.classes)} classes)" for name, sampler in domains.seen.items())
        + f"; unseen domain: digits ({len(next(iter(domains.unseen.values())).classes)} "
        "classes)")
    records = runner.run_grid(config, lambda arm, seed, _: run_arm(config, domains, arm, seed))
    modes = tuple(f"{k}shot" for k in config.test_shots)
    table, _ = runner.summarise(
        records, config, modes, metric="test_accuracy", rate_column=False,
        labels={f"{k}shot": f"{config.test_n_way}-way {k}-shot unseen-domain accuracy"
                for k in config.test_shots}, appendix=method_table(records, config))
    print("\n" + table)
    if config.plot:
        plot(records, config, os.path.join(config.output_dir, "cross_domain_fewshot.png"))


if __name__ == "__main__":
    app.run(main)
