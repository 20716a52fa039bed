"""Task distributions: N-way K-shot classification episodes drawn from a labelled set.

An episode picks ``n_way`` of the sampler's classes, then ``k_shot`` support and ``n_query``
query examples of each (without replacement), and relabels the chosen classes 0 .. n_way - 1
in the order drawn. Support and query are class-major: rows [i * k_shot, (i + 1) * k_shot) of
the support are class i. Episode ``index`` of stream ``seed`` is a fixed draw (NumPy's
generator seeded by (tag, seed, stream, index)), so arms compared on the same stream see the same
episodes, and a resumed run draws what the uninterrupted run would have.

Binary property tasks (`PropertyTaskSampler`): the tasks are the columns of a 0/1 label
matrix [examples, tasks] (e.g. molecules' substructures and descriptors); an episode picks
one task, then ``k_shot`` negatives and ``k_shot`` positives for the support and
``n_query`` of each for the query (a balanced 2-way episode whose labels keep their
meaning: 1 = the property holds). Episodes hold row indices into the examples.
"""

from typing import NamedTuple

import numpy as np

__all__ = ["Episode", "EpisodeSampler", "PropertyEpisode", "PropertyTaskSampler",
           "split_classes", "stack_episodes"]

_EPISODE_TAG = 103  # keeps episode streams apart from the apps' other NumPy streams


def _episode_generator(seed, index, stream):
    return np.random.default_rng([_EPISODE_TAG, int(seed), int(stream), int(index)])


class Episode(NamedTuple):
    support: np.ndarray       # [n_way * k_shot, ...]
    query: np.ndarray         # [n_way * n_query, ...]
    query_labels: np.ndarray  # [n_way * n_query] int32 in [0, n_way)
    classes: np.ndarray       # [n_way]: the original labels of episode classes 0 .. n_way - 1

    @property
    def support_labels(self):
        """[n_way * k_shot] int32: the class-major support's labels 0 .. n_way - 1."""
        n_way = len(self.classes)
        return np.repeat(np.arange(n_way, dtype=np.int32), len(self.support) // n_way)


class EpisodeSampler:
    """Episodes over ``classes`` (default: every label present) of ``(examples, labels)``.

    Raises ValueError naming the sampler (``name``) when fewer than ``n_way`` classes are
    given, or a class has fewer than ``k_shot + n_query`` examples.
    """

    def __init__(self, examples, labels, classes=None, *, n_way=5, k_shot=5, n_query=15,
                 name="episodes"):
        labels = np.asarray(labels)
        if len(examples) != len(labels):
            raise ValueError(f"{name}: {len(examples)} examples but {len(labels)} labels")
        self.classes = np.unique(labels) if classes is None else np.asarray(classes)
        self.n_way, self.k_shot, self.n_query = int(n_way), int(k_shot), int(n_query)
        self.name = name
        if min(self.n_way, self.k_shot, self.n_query) < 1:
            raise ValueError(f"{name}: n_way, k_shot and n_query must be >= 1, got "
                             f"{n_way}, {k_shot}, {n_query}")
        if self.n_way > len(self.classes):
            raise ValueError(f"{name}: {self.n_way}-way episodes need {self.n_way} classes, "
                             f"{len(self.classes)} given ({list(self.classes)})")
        self.examples = examples
        self.rows = {}
        for c in self.classes:
            rows = np.flatnonzero(labels == c)
            if len(rows) < self.k_shot + self.n_query:
                raise ValueError(f"{name}: class {c} has {len(rows)} examples, an episode "
                                 f"takes {self.k_shot + self.n_query} (k_shot + n_query)")
            self.rows[c] = rows

    def sample(self, rng):
        """One episode drawn with the NumPy generator ``rng``."""
        chosen = rng.choice(self.classes, self.n_way, replace=False)
        per_class = self.k_shot + self.n_query
        rows = np.stack([rng.choice(self.rows[c], per_class, replace=False) for c in chosen])
        support = self.examples[rows[:, :self.k_shot].reshape(-1)]
        query = self.examples[rows[:, self.k_shot:].reshape(-1)]
        labels = np.repeat(np.arange(self.n_way, dtype=np.int32), self.n_query)
        return Episode(support, query, labels, chosen)

    def episode(self, seed, index, stream=0):
        """Episode ``index`` of the stream (``seed``, ``stream``): the same draw every time."""
        return self.sample(_episode_generator(seed, index, stream))


class PropertyEpisode(NamedTuple):
    support: np.ndarray       # [2 k_shot] rows: k_shot negatives, then k_shot positives
    query: np.ndarray         # [2 n_query] rows, negatives then positives
    query_labels: np.ndarray  # [2 n_query] int32 in {0, 1}
    task: int                 # the label column

    @property
    def support_labels(self):
        """[2 k_shot] int32: zeros, then ones."""
        return np.repeat(np.arange(2, dtype=np.int32), len(self.support) // 2)


class PropertyTaskSampler:
    """Balanced episodes of binary property tasks: the columns ``tasks`` (default all) of
    ``labels`` [n, T] (0/1; NaN = unknown, never drawn).

    Raises ValueError naming the sampler (``name``) and the task when a task has fewer than
    ``k_shot + n_query`` positives or negatives.
    """

    def __init__(self, labels, tasks=None, *, k_shot=5, n_query=15, name="property tasks"):
        labels = np.asarray(labels, np.float64)
        if labels.ndim != 2:
            raise ValueError(f"{name}: labels must be [examples, tasks], got shape "
                             f"{labels.shape}")
        self.tasks = np.arange(labels.shape[1]) if tasks is None else np.asarray(tasks)
        self.k_shot, self.n_query, self.name = int(k_shot), int(n_query), name
        if min(self.k_shot, self.n_query) < 1 or len(self.tasks) < 1:
            raise ValueError(f"{name}: k_shot and n_query must be >= 1 and one task given, "
                             f"got {k_shot}, {n_query}, {len(self.tasks)} tasks")
        self.rows = {}
        for t in self.tasks:
            negatives, positives = (np.flatnonzero(labels[:, t] == v) for v in (0, 1))
            fewest = min(len(negatives), len(positives))
            if fewest < self.k_shot + self.n_query:
                raise ValueError(f"{name}: task {t} has {len(positives)} positives and "
                                 f"{len(negatives)} negatives, an episode takes "
                                 f"{self.k_shot + self.n_query} of each (k_shot + n_query)")
            self.rows[int(t)] = (negatives, positives)

    def sample(self, rng):
        """One episode drawn with the NumPy generator ``rng``."""
        task = int(rng.choice(self.tasks))
        per_class = self.k_shot + self.n_query
        rows = np.stack([rng.choice(r, per_class, replace=False) for r in self.rows[task]])
        labels = np.repeat(np.arange(2, dtype=np.int32), self.n_query)
        return PropertyEpisode(rows[:, :self.k_shot].reshape(-1),
                               rows[:, self.k_shot:].reshape(-1), labels, task)

    def episode(self, seed, index, stream=0):
        """Episode ``index`` of the stream (``seed``, ``stream``): the same draw every time."""
        return self.sample(_episode_generator(seed, index, stream))


def split_classes(classes, num_test, seed=0, together=()):
    """(meta-train classes, meta-test classes): ``num_test`` of ``classes`` drawn without
    replacement by the NumPy generator seeded (tag, seed), the rest for meta-training; both
    sorted and disjoint. ``together``: groups of classes that must fall on one side (e.g.
    (6, 9) when classes are rotated: a 6 turned by 180 degrees is a 9); a group the draw
    splits moves wholly to the meta-test side, each of its meta-training members swapping
    with the last-drawn meta-test class in no group. A draw that splits no group is kept as
    it is. Raises ValueError unless 1 <= num_test < len(classes), or when the swaps cannot
    be made."""
    classes = np.unique(np.asarray(classes))
    if not 1 <= int(num_test) < len(classes):
        raise ValueError(f"num_test must be in [1, {len(classes) - 1}] for {len(classes)} "
                         f"classes, got {num_test}")
    rng = np.random.default_rng([_EPISODE_TAG, 1, int(seed)])
    drawn = list(rng.choice(classes, int(num_test), replace=False))
    grouped = {int(c) for group in together for c in group}
    for group in together:
        members = [c for c in group if c in classes]
        inside = [c for c in members if c in drawn]
        if not inside or len(inside) == len(members):
            continue
        for c in members:
            if c in drawn:
                continue
            free = [d for d in drawn if int(d) not in grouped]
            if not free:
                raise ValueError(f"cannot keep classes {tuple(group)} together: no free "
                                 f"meta-test class left to swap with")
            drawn[drawn.index(free[-1])] = c
    test = np.sort(np.asarray(drawn, classes.dtype))
    return np.setdiff1d(classes, test), test


def stack_episodes(episodes):
    """A meta-batch of M episodes as arrays with a leading task dimension:
    (support [M, n_way * k_shot, ...], support_labels [M, n_way * k_shot],
    query [M, n_way * n_query, ...], query_labels [M, n_way * n_query])."""
    return (np.stack([e.support for e in episodes]),
            np.stack([e.support_labels for e in episodes]),
            np.stack([e.query for e in episodes]),
            np.stack([e.query_labels for e in episodes]))
