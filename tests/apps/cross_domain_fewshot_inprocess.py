"""In-process checks of apps/cross_domain_fewshot.py, run by
tests/apps/test_cross_domain_fewshot.py in a subprocess: importing the app defines its absl
flags, which would clash with other modules' flags in the test process.

References: an uninterrupted run for "a resumed arm gives the same result, bit for bit" (CPU,
op determinism); pairing by seed checked on the built encoders and the drawn episodes;
scikit-learn's 8x8 digits for the unseen domain's images.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from apps import cross_domain_fewshot as cdfs, runner
from keras_metapt.data import images as image_data
from tests.apps.test_cross_domain_fewshot import ARMS, FLAG_NAMES, TINY, write_fashion_like


def tiny_config(tmp_path, images, **changes):
    values = dict(output_dir=str(tmp_path / "run"), resume=True, strategy="default",
                  devices=None, tpu_address=None, arms=ARMS, seeds=(0,), baseline="protonet",
                  images_dir=images, lr=1e-3, ft_lr=1e-2, ft_gamma_init=0.3, ft_beta_init=0.5,
                  evograd_copies=2, evograd_sigma=1e-3, evograd_temperature=0.05,
                  evograd_noise="rademacher", test_shots=("1",), test_seed=0, xla=False,
                  verbose=0, plot=False, **TINY)
    values.update(changes)
    return cdfs.Config(**values)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=20, seed=4)
    return str(path)


def test_config_fields_are_the_flags_the_help_test_expects():
    assert sorted(f.name for f in dataclasses.fields(cdfs.Config)) == sorted(FLAG_NAMES)
    assert cdfs.ARMS == ARMS
    # the seen domains split Fashion-MNIST's ten classes
    assert sorted(sum(cdfs.SEEN_DOMAINS.values(), ())) == list(range(10))


def test_unseen_domain_is_sklearn_digits_upsampled():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = image_data.load_digits_28x28()
    assert images.shape == (1797, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(labels, digits.target)
    # bilinear upsampling by 3.5 keeps each image's mean intensity up to the border
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), digits.images.mean(axis=(1, 2)) / 16,
                               atol=0.03)


def test_an_interrupted_arm_resumes_to_the_same_result(tmp_path, images, monkeypatch, capsys):
    config = tiny_config(tmp_path, images, num_steps=6)
    domains = cdfs.load_domains(config)
    runner.seed_everything(0)
    reference = cdfs.run_arm(config, domains, "ft_evograd", 0)

    config = tiny_config(tmp_path, images, num_steps=6, output_dir=str(tmp_path / "cut"))
    save = tf.train.CheckpointManager.save
    calls = []

    def stop_before_second_save(self, *args, **kwargs):
        # killed after steps 3-4 wrote their history, before their checkpoint: the resumed
        # run must drop that history entry and redo the steps from the step-2 checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed before the second checkpoint")
        return save(self, *args, **kwargs)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", stop_before_second_save)
    runner.seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        cdfs.run_arm(config, domains, "ft_evograd", 0)
    monkeypatch.undo()
    runner.seed_everything(0)
    resumed = cdfs.run_arm(config, domains, "ft_evograd", 0)
    assert "resumed at step 2" in capsys.readouterr().out
    assert resumed["history"]["step"] == [2, 4, 6]
    for key in ("test_episode_accuracies_1shot", "noise_scales"):
        assert resumed[key] == reference[key], key
    for key in ("train_loss", "pseudo_unseen_loss", "gamma_scale", "beta_scale"):
        assert resumed["history"][key] == reference["history"][key], key


def test_arms_of_a_seed_share_the_initial_encoder_and_the_episodes(tmp_path, images):
    config = tiny_config(tmp_path, images)
    weights = {arm: [w.numpy() for w in cdfs.make_trainer(arm, 3, config).encoder.weight_list]
               for arm in ARMS}
    for arm in ARMS[1:]:
        for a, b in zip(weights["protonet"], weights[arm]):
            np.testing.assert_array_equal(a, b)
    domains = cdfs.load_domains(config)
    first = cdfs.step_episodes(domains, 3, 7)
    again = cdfs.step_episodes(domains, 3, 7)
    for a, b in zip(first[:2], again[:2]):
        np.testing.assert_array_equal(a.support, b.support)
        np.testing.assert_array_equal(a.query_labels, b.query_labels)
    # the two roles go to different domains, and both roles occur over the steps
    names = [cdfs.step_episodes(domains, 3, step)[2] for step in range(20)]
    assert set(names) == set(cdfs.SEEN_DOMAINS)
    other_seed = cdfs.step_episodes(domains, 4, 7)
    assert not np.array_equal(first[0].support, other_seed[0].support)
