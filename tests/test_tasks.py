"""Episodes of keras_metapt.tasks.EpisodeSampler and PropertyTaskSampler.

References: the definition of an N-way K-shot episode, checked element by element against the
labels of the rows drawn (support class-major, query labels 0..N-1 each n_query times, no row
in both, every row of a chosen class); for property tasks, the label matrix itself (each
drawn row's label in the drawn task column); determinism per (seed, stream, index).
"""

import numpy as np
import pytest

from keras_metapt.tasks import (EpisodeSampler, PropertyTaskSampler, split_classes,
                                stack_episodes)


def labelled(num_classes=6, per_class=12):
    labels = np.repeat(np.arange(num_classes), per_class)
    # each example remembers its own row, so the test can read back which rows were drawn
    examples = np.arange(len(labels), dtype=np.float32)[:, None]
    return examples, labels


def test_an_episode_is_n_way_k_shot_class_major_with_disjoint_query():
    examples, labels = labelled()
    sampler = EpisodeSampler(examples, labels, classes=[0, 2, 3, 5], n_way=3, k_shot=2,
                             n_query=4)
    episode = sampler.episode(seed=7, index=0)
    support_rows = episode.support[:, 0].astype(int)
    query_rows = episode.query[:, 0].astype(int)
    assert support_rows.shape == (6,) and query_rows.shape == (12,)
    assert set(episode.classes) <= {0, 2, 3, 5} and len(set(episode.classes)) == 3
    np.testing.assert_array_equal(episode.query_labels, np.repeat(np.arange(3), 4))
    for i, c in enumerate(episode.classes):
        assert np.all(labels[support_rows[2 * i:2 * i + 2]] == c)
        assert np.all(labels[query_rows[episode.query_labels == i]] == c)
    assert not set(support_rows) & set(query_rows)
    assert len(set(query_rows)) == len(query_rows)


def test_episodes_repeat_per_seed_stream_and_index():
    examples, labels = labelled()
    sampler = EpisodeSampler(examples, labels, n_way=4, k_shot=1, n_query=3)
    a = sampler.episode(1, 5)
    np.testing.assert_array_equal(a.support, sampler.episode(1, 5).support)
    np.testing.assert_array_equal(a.query, sampler.episode(1, 5, stream=0).query)
    others = [sampler.episode(1, 6), sampler.episode(2, 5), sampler.episode(1, 5, stream=1)]
    assert all(not np.array_equal(a.query, b.query) for b in others)


def test_bad_episode_shapes_are_named():
    examples, labels = labelled(num_classes=3, per_class=5)
    with pytest.raises(ValueError, match="digits: 4-way episodes need 4 classes, 3 given"):
        EpisodeSampler(examples, labels, n_way=4, name="digits")
    with pytest.raises(ValueError, match="class 0 has 5 examples, an episode takes 6"):
        EpisodeSampler(examples, labels, n_way=2, k_shot=1, n_query=5)
    with pytest.raises(ValueError, match="3 examples but 15 labels"):
        EpisodeSampler(examples[:3], labels)


def test_split_classes_is_disjoint_complete_and_repeatable():
    """Reference: set algebra on the class list (disjoint, union = all, sizes)."""
    classes = np.arange(10)
    train, test = split_classes(classes, 4, seed=3)
    assert len(test) == 4 and len(train) == 6
    assert not set(train) & set(test) and set(train) | set(test) == set(classes)
    again = split_classes(classes, 4, seed=3)
    np.testing.assert_array_equal(again[1], test)
    assert any(not np.array_equal(split_classes(classes, 4, seed=s)[1], test)
               for s in range(4, 10))
    with pytest.raises(ValueError, match="num_test"):
        split_classes(classes, 10)


def test_stacked_episodes_carry_class_major_support_labels():
    examples, labels = labelled()
    sampler = EpisodeSampler(examples, labels, n_way=3, k_shot=2, n_query=4)
    episodes = [sampler.episode(seed=0, index=i) for i in range(5)]
    support, support_labels, query, query_labels = stack_episodes(episodes)
    assert support.shape == (5, 6, 1) and query.shape == (5, 12, 1)
    np.testing.assert_array_equal(support_labels[2], [0, 0, 1, 1, 2, 2])
    for i, e in enumerate(episodes):
        # each support row's original label is the episode class its new label names
        rows = e.support[:, 0].astype(int)
        np.testing.assert_array_equal(labels[rows], e.classes[support_labels[i]])
        np.testing.assert_array_equal(query_labels[i], e.query_labels)


def test_split_keeps_groups_on_one_side_and_leaves_other_draws_alone():
    """Reference: the plain draw (no groups), and the rule written out: a split group moves
    to the meta-test side, swapping with the last-drawn free meta-test classes."""
    classes = np.arange(10)
    for seed in range(40):
        plain_train, plain_test = split_classes(classes, 4, seed=seed)
        train, test = split_classes(classes, 4, seed=seed, together=((6, 9),))
        assert (6 in test) == (9 in test) and len(test) == 4
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), classes)
        if (6 in plain_test) == (9 in plain_test):
            np.testing.assert_array_equal(test, plain_test)
        else:
            assert set(test) - set(plain_test) == {6, 9} - set(plain_test)
            assert len(set(plain_test) - set(test)) == 1
    # digits with rotations, split seed 0 (the README's runs): 6 and 9 are both held out
    assert {6, 9} <= set(split_classes(classes, 5, seed=0, together=((6, 9),))[1])
    # one meta-test class, drawn from the group: no free class to swap with
    small = np.array([1, 6, 9])
    seed = next(s for s in range(100) if split_classes(small, 1, seed=s)[1][0] in (6, 9))
    with pytest.raises(ValueError, match=r"\(6, 9\)"):
        split_classes(small, 1, seed=seed, together=((6, 9),))


def property_labels(rows=60, tasks=5, seed=0):
    labels = (np.random.default_rng(seed).random((rows, tasks)) < 0.5).astype(np.float32)
    labels[:3, 1] = np.nan  # unknown labels are never drawn
    return labels


def test_a_property_episode_is_one_balanced_task_with_disjoint_query():
    labels = property_labels()
    sampler = PropertyTaskSampler(labels, tasks=[1, 3, 4], k_shot=3, n_query=5)
    seen = set()
    for index in range(20):
        e = sampler.episode(seed=2, index=index)
        seen.add(e.task)
        assert e.task in (1, 3, 4) and e.support.shape == (6,) and e.query.shape == (10,)
        np.testing.assert_array_equal(e.support_labels, [0, 0, 0, 1, 1, 1])
        np.testing.assert_array_equal(e.query_labels, np.repeat([0, 1], 5))
        np.testing.assert_array_equal(labels[e.support, e.task], e.support_labels)
        np.testing.assert_array_equal(labels[e.query, e.task], e.query_labels)
        assert len(set(e.support) | set(e.query)) == 16  # no row twice, none in both
    assert seen == {1, 3, 4}
    a = sampler.episode(2, 7)
    np.testing.assert_array_equal(a.query, sampler.episode(2, 7).query)
    assert not np.array_equal(a.query, sampler.episode(2, 7, stream=1).query)
    support, support_labels, _, query_labels = stack_episodes([a, sampler.episode(2, 8)])
    assert support.shape == (2, 6) and support_labels.shape == (2, 6)
    assert query_labels.shape == (2, 10)


def test_property_tasks_too_rare_for_an_episode_are_named():
    labels = property_labels()
    labels[:, 2] = 0
    labels[:4, 2] = 1
    with pytest.raises(ValueError, match="molecules: task 2 has 4 positives and 56 negatives, "
                                         "an episode takes 5 of each"):
        PropertyTaskSampler(labels, k_shot=2, n_query=3, name="molecules")
    with pytest.raises(ValueError, match=r"labels must be \[examples, tasks\]"):
        PropertyTaskSampler(labels[:, 0])
