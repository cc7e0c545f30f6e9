"""The shared replay memory: size bound, balance, herding quality, checkpointing."""

from __future__ import annotations

import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.data.digits import load_digits_arrays
from cl_bench.strategies.buffer import MemoryBuffer, herding_order


def fake_task(classes, per_class=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(per_class)
    x = torch.randint(0, 256, (len(y), 1, 4, 4), generator=g, dtype=torch.uint8)
    x[:, 0, 0, 0] = y.to(torch.uint8)  # the label is readable from the sample
    return x, y


def test_reservoir_never_exceeds_its_size_and_samples_the_stream_uniformly():
    buf, g = MemoryBuffer(100, "none", "reservoir"), torch.Generator().manual_seed(0)
    offered = 0
    for t in range(5):
        x, y = fake_task([2 * t, 2 * t + 1], per_class=200, seed=t)
        for start in range(0, len(y), 32):
            buf.add_reservoir(x[start : start + 32], y[start : start + 32], t, g)
            offered += len(y[start : start + 32])
            assert len(buf) == min(100, offered) <= 100
    stored_y = buf.y[: len(buf)]
    assert torch.equal(buf.x[: len(buf), 0, 0, 0].long(), stored_y)  # samples stay with their labels
    assert torch.equal(buf.task[: len(buf)], stored_y // 2)
    # uniform over the 2,000 samples seen: each task holds about 20 of the 100 slots
    per_task = torch.bincount(buf.task[: len(buf)], minlength=5)
    assert per_task.min() >= 8 and per_task.max() <= 32, per_task


def test_class_balanced_memory_shrinks_old_classes_to_a_prefix():
    buf, g = MemoryBuffer(200, "class", "random"), torch.Generator().manual_seed(0)
    previous = None
    for t in range(5):
        x, y = fake_task([2 * t, 2 * t + 1], seed=t)
        buf.update(x, y, t, g)
        counts = torch.bincount(buf.y[: len(buf)], minlength=10)[: 2 * t + 2]
        quota = min(200 // (2 * t + 2), 50)
        assert len(buf) <= 200 and (counts == quota).all(), counts
        if previous is not None:  # every old class kept exactly its first `quota` exemplars
            for c in range(2 * t):
                old = previous[0][(previous[1] == c) & (previous[2] < quota)]
                new = buf.x[: len(buf)][buf.y[: len(buf)] == c]
                assert torch.equal(old.sort(0).values, new.sort(0).values)
        previous = (buf.x[: len(buf)].clone(), buf.y[: len(buf)].clone(), buf.rank[: len(buf)].clone())


def test_task_balanced_memory_is_balanced_over_tasks_and_within_each_task():
    buf, g = MemoryBuffer(120, "task", "random"), torch.Generator().manual_seed(0)
    for t in range(4):
        x, y = fake_task([3 * t, 3 * t + 1, 3 * t + 2], seed=t)
        buf.update(x, y, t, g)
        per_task = torch.bincount(buf.task[: len(buf)])
        assert len(buf) <= 120 and (per_task == 120 // (t + 1)).all()
        for k in range(t + 1):
            per_class = torch.bincount(buf.y[buf.indices(task=k)])[3 * k :]
            assert per_class.max() - per_class.min() <= 1


@pytest.mark.parametrize("balance", ["class", "task"])
@pytest.mark.parametrize("selection", ["random", "herding"])
@pytest.mark.parametrize("capacity", [1, 7, 23, 50])
def test_balanced_memory_stays_within_budget_with_uneven_and_growing_classes(balance, selection, capacity):
    """Tasks of 3, 1, 4, 2 and 5 classes (the class count grows unevenly, no capacity here
    divides it), some classes with fewer samples than their quota: after every update the
    memory holds at most `capacity` samples, every group at most floor(capacity / groups)."""
    buf, g = MemoryBuffer(capacity, balance, selection), torch.Generator().manual_seed(0)
    features = lambda raw: raw.flatten(1).float()  # noqa: E731
    first = 0
    for t, n_classes in enumerate([3, 1, 4, 2, 5]):
        classes = list(range(first, first + n_classes))
        first += n_classes
        x, y = fake_task(classes, per_class=3 if t == 2 else 20, seed=t)
        buf.update(x, y, t, g, features=features)
        assert len(buf) <= capacity and buf.nbytes <= capacity * (16 + 3 * 8)
        groups = first if balance == "class" else t + 1
        stored = buf.y[: len(buf)] if balance == "class" else buf.task[: len(buf)]
        assert len(buf) == 0 or torch.bincount(stored).max().item() <= capacity // groups
        assert buf.summary()["exemplars"] == len(buf) <= capacity


def test_herding_mean_is_closer_to_the_class_mean_than_random_picks():
    train, _ = load_digits_arrays()
    feats = torch.nn.functional.normalize(train.x[train.y == 3].flatten(1).double(), dim=1)
    target, m = feats.mean(0), 10
    herd = herding_order(feats, m)
    assert len(herd.unique()) == m
    herd_dist = (feats[herd].mean(0) - target).norm()
    g = torch.Generator().manual_seed(0)
    random_dists = torch.stack(
        [(feats[torch.randperm(len(feats), generator=g)[:m]].mean(0) - target).norm() for _ in range(50)]
    )
    assert herd_dist < random_dists.min(), (herd_dist, random_dists.min())
    assert herd_dist < 0.5 * random_dists.mean()


def test_herding_selection_in_the_buffer_uses_the_features():
    x, y = fake_task([0, 1], per_class=40)
    buf = MemoryBuffer(20, "class", "herding")
    buf.update(x, y, 0, torch.Generator().manual_seed(0), features=lambda raw: raw.flatten(1).float())
    for c in (0, 1):
        feats = torch.nn.functional.normalize(x[y == c].flatten(1).double(), dim=1)
        expected = x[y == c][herding_order(feats, 10)]
        stored = buf.x[buf.indices(label=c)]
        assert torch.equal(stored[buf.rank[buf.indices(label=c)].argsort()], expected)


def test_state_dict_round_trip_and_memory_accounting():
    buf, g = MemoryBuffer(30, "none", "reservoir"), torch.Generator().manual_seed(0)
    x, y = fake_task([0, 1], per_class=40)
    buf.add_reservoir(x, y, 0, g)
    assert buf.nbytes == 30 * (16 + 3 * 8)
    other = MemoryBuffer(30, "none", "reservoir")
    other.load_state_dict(buf.state_dict())
    assert len(other) == 30 and other.seen == 80
    assert torch.equal(other.x, buf.x) and torch.equal(other.y, buf.y) and torch.equal(other.task, buf.task)
    assert other.summary()["exemplars"] == 30 and other.summary()["bytes"] == buf.nbytes


@pytest.mark.parametrize("balance, selection", [("none", "reservoir"), ("class", "random"), ("task", "random")])
def test_a_memory_larger_than_the_stream_keeps_everything_and_allocates_only_that(balance, selection):
    """memory_size=10**12 does what it says (every sample offered is kept) instead of
    failing to allocate 10**12 slots; the results equal those of a memory just big enough."""
    huge, exact = (MemoryBuffer(n, balance, selection) for n in (10**12, 160))
    for buf in (huge, exact):
        g = torch.Generator().manual_seed(0)
        for task_id, classes in enumerate(([0, 1], [2, 3])):
            x, y = fake_task(classes, per_class=40)
            if balance == "none":
                for i in range(0, len(y), 16):  # batches offered online, as ER does
                    buf.add_reservoir(x[i : i + 16], y[i : i + 16], task_id, g)
            else:
                buf.update(x, y, task_id, g)
    assert len(huge) == len(exact) == 160 and len(huge.x) <= 2 * 160
    assert torch.equal(huge.x[:160], exact.x[:160]) and torch.equal(huge.y[:160], exact.y[:160])
    restored = MemoryBuffer(10**12, balance, selection)
    restored.load_state_dict(huge.state_dict())
    assert torch.equal(restored.x[: len(restored)], huge.x[:160])


def test_zero_capacity_stores_nothing():
    buf, g = MemoryBuffer(0, "none", "reservoir"), torch.Generator().manual_seed(0)
    x, y = fake_task([0, 1])
    buf.add_reservoir(x, y, 0, g)
    assert len(buf) == 0 and buf.nbytes == 0


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, "none", "reservoir"), "strategy.memory_size"),
        ((10, "none", "kmeans"), "strategy.selection"),
        ((10, "class", "reservoir"), "strategy.selection"),
        ((10, "none", "herding"), "strategy.selection"),
    ],
)
def test_bad_settings_fail_naming_the_key(args, message):
    with pytest.raises(CLBenchError, match=message):
        MemoryBuffer(*args)
