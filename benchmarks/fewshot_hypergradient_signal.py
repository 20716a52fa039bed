r"""Is there a signal in the hypergradient of the feature-wise transformation scales?

    python -m benchmarks.fewshot_hypergradient_signal             # ~3 min on 2 CPU cores
    python -m benchmarks.fewshot_hypergradient_signal --draws=50 --width=8

Takes the encoder of apps/cross_domain_fewshot.py (every flag of the app applies: --width,
--k_shot, --lr, --evograd_*, ...) at its initialisation for --seed and computes the
hypergradient of the transformation scales phi on --draws training steps' episodes (each
step's pseudo-seen/pseudo-unseen pair and noise, as the app draws them), without moving the
encoder or phi, for the second-order one-step look-ahead and for EvoGrad. Per scale it
tests the mean over draws against 0 (t = mean / (std / sqrt(n))). With no signal, |t| >
1.96 for about 5% of the scales, by chance; a usable signal shows as many more. Also the
fraction of scales whose mean hypergradient is negative (Adam then raises that scale).

Writes benchmarks/results/fewshot_hypergradient_signal.{md,json} (or --output_dir).
"""

import os
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import runner  # noqa: E402
from apps import cross_domain_fewshot as app_module  # noqa: E402  (defines the app's flags)

FLAGS = flags.FLAGS
flags.DEFINE_integer("draws", 200, "Training steps' episodes per estimator (n of the t tests).")
flags.DEFINE_integer("seed", 0, "Seed of the encoder and of the episodes.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where fewshot_hypergradient_signal.md and .json are written.")

ARMS = ("ft_second_order", "ft_evograd")


def hypergradients(config, domains, arm, seed, draws):
    """[draws, n_scales]: gamma scales of every block first, then beta scales."""
    trainer = app_module.make_trainer(arm, seed, config)
    problem = trainer.problem()

    @tf.function
    def one(params, phi, seen, unseen, noise_seed, estimator_seed):
        return trainer.estimator(problem, params, phi, seen + (noise_seed,), unseen,
                                 seed=estimator_seed).hypergrad

    rows = []
    for step in range(draws):
        seen, unseen, _ = app_module.step_episodes(domains, seed, step)
        g = one(trainer.encoder.values(), trainer.transforms.hparams(),
                app_module.as_tensors(seen), app_module.as_tensors(unseen),
                tf.constant([seed, 2 * step], tf.int64), tf.constant([seed, 2 * step + 1],
                                                                     tf.int64))
        rows.append(np.concatenate([x.numpy().ravel() for x in g[0::2]]
                                   + [x.numpy().ravel() for x in g[1::2]]))
    return np.array(rows)


def signal(samples):
    n = len(samples)
    t = runner.one_sample_t(samples)
    return {"draws": n, "scales": int(samples.shape[1]),
            "fraction_abs_t_above_1.96": float(np.mean(np.abs(t) > 1.96)),
            "median_abs_t": float(np.median(np.abs(t))),
            "fraction_mean_negative": float(np.mean(samples.mean(0) < 0))}


def main(argv):
    del argv
    config = app_module.Config.from_flags()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    domains = app_module.load_domains(config)
    start, results = time.perf_counter(), {}
    for arm in ARMS:
        results[arm] = signal(hypergradients(config, domains, arm, FLAGS.seed, FLAGS.draws))
        print(f"  {arm}: {results[arm]}", flush=True)
    lines = ["# Hypergradient of the feature-wise transformation scales: signal or noise?", "",
             f"`python -m benchmarks.fewshot_hypergradient_signal --draws={FLAGS.draws}"
             f" --width={config.width}`; encoder at initialisation (seed {FLAGS.seed}); "
             f"{time.perf_counter() - start:.0f} s.", "",
             "| estimator | draws | scales | share with \\|t\\| > 1.96 (chance: 5%) | "
             "median \\|t\\| | share with mean < 0 |", "|---|---:|---:|---:|---:|---:|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['draws']} | {r['scales']} | "
                     f"{r['fraction_abs_t_above_1.96']:.1%} | {r['median_abs_t']:.2f} | "
                     f"{r['fraction_mean_negative']:.1%} |")
    text = "\n".join(lines) + "\n"
    runner.write_report(FLAGS.results_dir, "fewshot_hypergradient_signal", text,
                        {"seed": FLAGS.seed, "config": config.results_config(),
                         "results": results})
    print(text)


if __name__ == "__main__":
    app.run(main)
