"""ER-ACE (Caccia et al. 2022): the asymmetric cross-entropy as exact invariants, through the Runner.

At every step, with a hook on the network's output: the incoming batch's loss gives
exactly zero gradient to the logits outside its mask (seen classes absent from the batch:
the old classes after a task switch), and a nonzero one inside it; the replay batch's
loss does reach the old classes' logits. The mask is the authors' (present classes and
the classes not seen yet), from the first step (task_free=true) or from the second task
(task_free=false, whose first task is then finetune's). Plus budget, resume, scenarios
and refused values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.buffer import MemoryBuffer
from cl_bench.strategies.er_ace import ERACE
from tests.conftest import compose_cfg, run_killed_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("dataset=split_digits", "dataset.max_train_per_class=10", "train.epochs=2", "train.batch_size=8",
        "checkpoint=false", "seed=1", "strategy=er_ace")


def runner_for(tmp_path, *overrides, name="run") -> Runner:
    return Runner(compose_cfg(*TINY, *overrides), tmp_path / name)


def spy_output_gradients(monkeypatch) -> list:
    """Per step: (task id, labels, seen classes before the step, [grad of each forward's logits])."""
    original, steps = ERACE.train_step, []

    def train_step(self, batch):
        grads: dict[int, torch.Tensor] = {}  # forward number -> gradient of its logits

        def hook(module, inputs, output):
            k = len(grads)
            grads[k] = None
            output.register_hook(lambda g: grads.__setitem__(k, g.detach().clone()))

        seen_before = self.seen_classes.clone()
        handle = self.model.register_forward_hook(hook)
        try:
            out = original(self, batch)
        finally:
            handle.remove()
        steps.append((batch.task.id, batch.y.clone(), seen_before, [grads[k] for k in sorted(grads)]))
        return out

    monkeypatch.setattr(ERACE, "train_step", train_step)
    return steps


@pytest.mark.parametrize("task_free", [True, False])
def test_incoming_loss_leaves_masked_logits_without_gradient_and_replay_reaches_them(task_free, tmp_path, monkeypatch):
    steps = spy_output_gradients(monkeypatch)
    runner_for(tmp_path, f"strategy.task_free={str(task_free).lower()}").run()
    replay_reached_old = 0
    for task_id, y, seen_before, grads in steps:
        present = torch.zeros(10, dtype=torch.bool)
        present[y] = True
        seen = seen_before | present
        keep = present | ~seen
        incoming = grads[0]
        if task_free or task_id > 0:
            assert torch.all(incoming[:, ~keep] == 0), "the incoming loss reached a masked logit"
            assert torch.all(incoming[:, keep].abs().sum(0) > 0), "a kept logit got no gradient"
            if task_id > 0:
                old = torch.arange(10) < 2 * task_id  # natural class order: task t holds classes 2t, 2t+1
                assert not keep[old].any()
                assert len(grads) == 2, "no replay batch after the first task"
                replay_reached_old += bool((grads[1][:, old].abs().sum(0) > 0).all())
        else:  # task_free=false, first task: plain cross-entropy over the whole head, no replay
            assert len(grads) == 1 and torch.all(incoming.abs().sum(0) > 0)
    assert replay_reached_old == sum(1 for t, *_ in steps if t > 0) > 0


def test_task_free_false_trains_the_first_task_as_finetune(tmp_path):
    """Mammoth's default: no mask and no replay in the first task, so its row equals finetune's."""
    common = ("backbone=reduced_resnet18", "backbone.nf=4", "train.momentum=0.9", "train.weight_decay=5e-4")
    mine = runner_for(tmp_path, *common, "strategy.task_free=false", name="ace").run()
    finetune = runner_for(tmp_path, *common, "strategy=finetune", name="ft").run()
    R, R_ft = np.asarray(mine["accuracy_matrix"]), np.asarray(finetune["accuracy_matrix"])
    assert np.array_equal(R[0], R_ft[0]) and not np.array_equal(R[1:], R_ft[1:])


def test_memory_stays_within_budget(tmp_path, monkeypatch):
    original, sizes = MemoryBuffer.add_reservoir, []

    def checked(self, *args):
        original(self, *args)
        sizes.append(len(self))
        assert len(self) <= 33 and len(self.x) <= 33

    monkeypatch.setattr(MemoryBuffer, "add_reservoir", checked)
    s = runner_for(tmp_path, "strategy.memory_size=33").run()
    assert max(sizes) == 33 and s["strategy_info"]["exemplars"] == 33


def test_resume_after_kill_gives_the_same_matrix(tmp_path, monkeypatch):
    overrides = ("strategy=er_ace", "train.epochs=1", "dataset.max_train_per_class=20", "seed=3",
                 "strategy.memory_size=50")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


def test_runs_in_task_il_and_refuses_domain_il(tmp_path):
    s = runner_for(tmp_path, "scenario=task_il").run()
    assert np.asarray(s["accuracy_matrix"])[-1].mean() > 0.6
    with pytest.raises(CLBenchError, match="does not support scenario=domain_il"):
        runner_for(tmp_path, "scenario=domain_il", name="d").run()


@pytest.mark.parametrize(
    "override,key",
    [
        ("strategy.replay_batch_size=0", "strategy.replay_batch_size"),
        ("strategy.memory_size=-1", "strategy.memory_size"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(override, key, tmp_path, monkeypatch):
    monkeypatch.setattr(Runner, "_train_task", lambda *a: pytest.fail("training started"))
    with pytest.raises(CLBenchError) as err:
        runner_for(tmp_path, override).run()
    assert key in str(err.value) and "\n" not in str(err.value)
