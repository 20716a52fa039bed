"""In-process checks of apps/noisy_labels.py, run by tests/apps/test_noisy_labels.py in a
subprocess: importing the app defines its absl flags, which would clash with other modules'
flags in the test process.

References: an uninterrupted run for "a resumed arm gives the same result, bit for bit" (CPU,
op determinism); pairing by seed checked on the built models and batch orders.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from apps import noisy_labels, runner
from tests.apps.test_noisy_labels import TINY, write_fashion_like


def tiny_config(tmp_path, images, **changes):
    values = dict(output_dir=str(tmp_path / "run"), resume=True, strategy="default",
                  devices=None, tpu_address=None, arms=("uniform", "mwn_evograd"), seeds=(0,),
                  baseline="uniform", images_dir=images, noise="uniform", noise_rate=0.4,
                  split_seed=0, network="cnn", lr=0.05, weight_decay=5e-4, meta_lr=1e-3,
                  evograd_copies=2, evograd_sigma=1e-3, evograd_temperature=0.05,
                  evograd_noise="rademacher", mwn_input="evaluated", neumann_terms=1,
                  hyperdistill_gamma=0.9, hyperdistill_every=2, hyperdistill_reference_steps=3,
                  hyperdistill_anchor_every=0, xla=False, verbose=0, plot=False, **TINY)
    values.update(changes)
    return noisy_labels.Config(**values)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=50, seed=3)
    return str(path)


def test_config_fields_are_the_flags_the_help_test_expects():
    import dataclasses
    from tests.apps.test_noisy_labels import FLAG_NAMES
    assert sorted(f.name for f in dataclasses.fields(noisy_labels.Config)) == sorted(FLAG_NAMES)
    assert noisy_labels.ARMS == ARMS_EXPECTED and len(noisy_labels.WEIGHT_CURVE_LOSSES) == 81


def test_evograd_settings_reach_its_estimator_and_only_its_results(tmp_path, images):
    """--evograd_noise sets the EvoGrad arm's noise; the EvoGrad settings are in that arm's
    results config and in no other arm's (a change reruns mwn_evograd alone)."""
    for noise in ("rademacher", "gaussian"):
        config = tiny_config(tmp_path, images, evograd_noise=noise)
        assert noisy_labels.make_estimator("mwn_evograd", config).noise == noise
    evograd_keys = {"evograd_copies", "evograd_sigma", "evograd_temperature", "evograd_noise"}
    assert evograd_keys <= set(config.results_config_of("mwn_evograd"))
    for arm in ("uniform", "mwn_one_step"):
        assert not evograd_keys & set(config.results_config_of(arm))



def test_mwn_input_reaches_the_trainer_and_only_the_arms_it_applies_to(tmp_path, images):
    """--mwn_input sets the trainer's of mwn_evograd, mwn_hyperdistill and mwn_lookahead5
    (one-step and implicit evaluate at the current weights: always "evaluated", no extra
    forward); "current" is in those arms' results config and no other; "evaluated" is in none
    (results stored before the flag are still recognised); "copies_mean" reaches EvoGrad's
    trainer only."""
    applies = {"mwn_evograd", "mwn_hyperdistill", "mwn_lookahead5"}
    current = tiny_config(tmp_path, images, mwn_input="current")
    evaluated = tiny_config(tmp_path, images, mwn_input="evaluated")
    for arm in ("mwn_evograd", "mwn_lookahead5", "mwn_one_step", "mwn_implicit"):
        assert noisy_labels.make_trainer(arm, 0, current).mwn_input == (
            "current" if arm in applies else "evaluated")
        assert noisy_labels.make_trainer(arm, 0, evaluated).mwn_input == "evaluated"
    for arm in noisy_labels.ARMS:
        assert "mwn_input" not in evaluated.results_config_of(arm)
        assert ("mwn_input" in current.results_config_of(arm)) == (arm in applies)
    # "copies_mean": EvoGrad's alone; the other arms it reaches weigh the current losses,
    # under the same results key as --mwn_input=current (their stored results are reused)
    copies_mean = tiny_config(tmp_path, images, mwn_input="copies_mean")
    for arm in ("mwn_evograd", "mwn_lookahead5", "mwn_one_step"):
        assert noisy_labels.make_trainer(arm, 0, copies_mean).mwn_input == {
            "mwn_evograd": "copies_mean", "mwn_lookahead5": "current"}.get(arm, "evaluated")
    for arm in noisy_labels.ARMS:
        expected = current.results_config_of(arm)
        if arm == "mwn_evograd":
            expected["mwn_input"] = "copies_mean"
        assert copies_mean.results_config_of(arm) == expected


ARMS_EXPECTED = ("uniform", "clean_only", "mwn_one_step", "mwn_evograd", "mwn_implicit",
                 "mwn_hyperdistill", "mwn_lookahead5")


@pytest.mark.parametrize("arm", ["mwn_evograd", "mwn_hyperdistill"])
def test_an_interrupted_arm_resumes_to_the_same_result(tmp_path, images, monkeypatch, capsys,
                                                       arm):
    """mwn_hyperdistill: its estimator's state (w_0, step count, the scale's fit, with
    references at steps 2, 4, 6, 8 of 9) must be checkpointed too."""
    config = tiny_config(tmp_path, images, epochs=3)
    data = noisy_labels.load_data(config)
    runner.seed_everything(0)
    reference = noisy_labels.run_arm(config, data, arm, 0)

    config = tiny_config(tmp_path, images, epochs=3, output_dir=str(tmp_path / "cut"))
    save = tf.train.CheckpointManager.save

    calls = []

    def stop_before_second_save(self, *args, **kwargs):
        # killed after epoch 2 wrote its history, before its checkpoint: the resumed run
        # must drop that history entry and redo the epoch from the epoch-1 checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed before the second epoch's checkpoint")
        return save(self, *args, **kwargs)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", stop_before_second_save)
    runner.seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        noisy_labels.run_arm(config, data, arm, 0)
    monkeypatch.undo()
    runner.seed_everything(0)
    resumed = noisy_labels.run_arm(config, data, arm, 0)
    assert "resumed at epoch 1" in capsys.readouterr().out
    for key in ("test_accuracy_by_epoch", "train_loss_by_epoch", "weight_curve",
                "mean_weight_clean", "mean_weight_corrupted"):
        assert resumed[key] == reference[key], key


def test_arms_of_a_seed_start_from_the_same_weights_and_batches(tmp_path, images):
    """Pairing by seed: the classifier of every arm is drawn after the same seeding, and the
    batch order depends on (seed, epoch) only."""
    config = tiny_config(tmp_path, images)
    weights = {}
    for arm in ("uniform", "mwn_one_step", "mwn_evograd"):
        runner.seed_everything(5)
        trainer = noisy_labels.make_trainer(arm, 5, config)
        weights[arm] = [v.numpy() for v in trainer.model.weights]
    for arm in ("mwn_one_step", "mwn_evograd"):
        for a, b in zip(weights["uniform"], weights[arm]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(noisy_labels.batch_order(5, 3, 60, 20, 3),
                                  noisy_labels.batch_order(5, 3, 60, 20, 3))
    assert not np.array_equal(noisy_labels.batch_order(5, 3, 60, 20, 3),
                              noisy_labels.batch_order(6, 3, 60, 20, 3))
    # a set smaller than an epoch of steps: every pass a fresh permutation of all of it
    order = noisy_labels.batch_order(5, 0, 20, 10, 6)
    passes = order.reshape(3, 20)
    assert all(sorted(p) == list(range(20)) for p in passes)
    assert not np.array_equal(passes[0], passes[1])
